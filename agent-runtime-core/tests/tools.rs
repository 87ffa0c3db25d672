//! The built-in tools against real files, real git repositories and real processes in temp dirs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers outside #[test]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use agent_runtime_core::tools::{
    MAX_LIST_ENTRIES, RuntimeExecutor, ToolContext, ToolExecutor, ToolFailure, ToolRegistry,
};
use serde_json::{Value, json};

/// A temp dir holding `proj/` (the project root) and `outside/` (a sibling the tools must not reach).
struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
    ctx: ToolContext,
    exec: RuntimeExecutor,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().canonicalize().unwrap();
    let root = base.join("proj");
    let outside = base.join("outside");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret.txt"), "secret\n").unwrap();
    let ctx = ToolContext::new(&root);
    Fixture {
        _dir: dir,
        root,
        outside,
        ctx,
        exec: RuntimeExecutor::default(),
    }
}

impl Fixture {
    async fn call(&self, tool: &str, args: Value) -> Result<Value, ToolFailure> {
        self.exec.execute(&self.ctx, tool, args).await
    }

    fn write(&self, rel: &str, content: &str) {
        let p = self.root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    fn git(&self, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(["-c", "user.name=test", "-c", "user.email=test@localhost"])
            .args(args)
            .current_dir(&self.root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn outside_entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

fn invalid(r: Result<Value, ToolFailure>) -> String {
    match r {
        Err(ToolFailure::Invalid(m)) => m,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

fn failed(r: Result<Value, ToolFailure>) -> String {
    match r {
        Err(ToolFailure::Failed(m)) => m,
        other => panic!("expected Failed, got {other:?}"),
    }
}

/// Whether a process is still running (a zombie waiting to be reaped counts as gone: it runs nothing).
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
            !matches!(state, Some(Some('Z' | 'X')))
        }
    }
}

/// Waits (bounded) until none of `pids` runs; SIGKILL is asynchronous, so death may trail the call.
async fn all_gone(pids: &[i32]) -> bool {
    for _ in 0..100 {
        if pids.iter().all(|&p| !running(p)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn read_pids(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path)
        .unwrap()
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect()
}

// ---------------------------------------------------------------- happy paths

#[tokio::test]
async fn read_file_returns_the_whole_file_or_a_line_range() {
    let f = fixture();
    f.write("src/lib.rs", "one\ntwo\nthree\nfour\n");
    assert_eq!(
        f.call("read_file", json!({"path": "src/lib.rs"})).await,
        Ok(json!("[src/lib.rs: lines 1-4 of 4]\none\ntwo\nthree\nfour\n"))
    );
    assert_eq!(
        f.call(
            "read_file",
            json!({"path": "src/lib.rs", "start_line": 2, "end_line": 3})
        )
        .await,
        Ok(json!("[src/lib.rs: lines 2-3 of 4]\ntwo\nthree\n"))
    );
}

#[tokio::test]
async fn read_file_accepts_an_absolute_path_inside_the_project() {
    let f = fixture();
    f.write("a.txt", "hi\n");
    let abs = f.root.join("a.txt");
    assert_eq!(
        f.call("read_file", json!({"path": abs.to_str().unwrap()})).await,
        Ok(json!(format!("[{}: lines 1-1 of 1]\nhi\n", abs.display())))
    );
}

#[tokio::test]
async fn write_file_creates_parent_directories_and_reports_bytes() {
    let f = fixture();
    assert_eq!(
        f.call(
            "write_file",
            json!({"path": "docs/new/README.md", "content": "# Hi\n"})
        )
        .await,
        Ok(json!({"path": "docs/new/README.md", "bytes_written": 5}))
    );
    assert_eq!(
        std::fs::read_to_string(f.root.join("docs/new/README.md")).unwrap(),
        "# Hi\n"
    );
    // Replacing an existing file.
    f.call(
        "write_file",
        json!({"path": "docs/new/README.md", "content": "x"}),
    )
    .await
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(f.root.join("docs/new/README.md")).unwrap(),
        "x"
    );
}

#[tokio::test]
async fn delete_file_removes_the_file() {
    let f = fixture();
    f.write("old.txt", "bye");
    assert_eq!(
        f.call("delete_file", json!({"path": "old.txt"})).await,
        Ok(json!({"deleted": "old.txt"}))
    );
    assert!(!f.root.join("old.txt").exists());
}

#[tokio::test]
async fn list_files_honours_gitignore_and_marks_directories() {
    let f = fixture();
    f.write(".gitignore", "target/\n*.log\n");
    f.write("Cargo.toml", "");
    f.write("debug.log", "");
    f.write("src/main.rs", "");
    f.write("src/util/mod.rs", "");
    f.write("src/trace.log", "");
    f.write("target/debug/app", "");
    f.git(&["init", "-q"]);

    assert_eq!(
        f.call("list_files", json!({})).await,
        Ok(json!({"entries": [".gitignore", "Cargo.toml", "src/"]}))
    );
    assert_eq!(
        f.call("list_files", json!({"path": ".", "recursive": true}))
            .await,
        Ok(
            json!({"entries": [".gitignore", "Cargo.toml", "src/", "src/main.rs", "src/util/", "src/util/mod.rs"]})
        )
    );
    assert_eq!(
        f.call("list_files", json!({"path": "src"})).await,
        Ok(json!({"entries": ["src/main.rs", "src/util/"]}))
    );
}

#[tokio::test]
async fn list_files_is_bounded_with_a_note() {
    let f = fixture();
    for i in 0..MAX_LIST_ENTRIES + 5 {
        f.write(&format!("f{i:05}"), "");
    }
    let out = f.call("list_files", json!({})).await.unwrap();
    let entries = out["entries"].as_array().unwrap();
    assert_eq!(entries.len(), MAX_LIST_ENTRIES);
    assert_eq!(entries[0], "f00000");
    assert_eq!(
        out["note"],
        format!("listing cut at {MAX_LIST_ENTRIES} entries; list a subdirectory or set recursive to false")
    );
}

#[tokio::test]
async fn search_in_code_finds_lines_and_skips_ignored_files() {
    let f = fixture();
    f.write(".gitignore", "build/\n");
    f.write("src/a.rs", "fn alpha() {}\nfn beta() {}\n");
    f.write("src/b.py", "def alpha():\n    pass\n");
    f.write("build/gen.rs", "fn alpha() {}\n");
    f.write("blob.bin", "fn alpha\0 binary");

    assert_eq!(
        f.call("search_in_code", json!({"query": r"alpha\("})).await,
        Ok(json!({"matches": ["src/a.rs:1: fn alpha() {}", "src/b.py:1: def alpha():"]}))
    );
    assert_eq!(
        f.call("search_in_code", json!({"query": "alpha", "glob": "*.rs"}))
            .await,
        Ok(json!({"matches": ["src/a.rs:1: fn alpha() {}"]}))
    );
    assert_eq!(
        f.call("search_in_code", json!({"query": "fn b", "path": "src/a.rs"}))
            .await,
        Ok(json!({"matches": ["src/a.rs:2: fn beta() {}"]}))
    );
    assert_eq!(
        f.call("search_in_code", json!({"query": "nothing-here"})).await,
        Ok(json!({"matches": []}))
    );
}

#[tokio::test]
async fn search_in_code_refuses_an_invalid_regex_or_glob() {
    let f = fixture();
    let m = invalid(f.call("search_in_code", json!({"query": "fn ("})).await);
    assert!(
        m.starts_with("search_in_code: `query` is not a valid regex"),
        "{m}"
    );
    let m = invalid(
        f.call("search_in_code", json!({"query": "x", "glob": "a[b"}))
            .await,
    );
    assert!(m.starts_with("search_in_code: `glob` is not a valid glob"), "{m}");
}

#[tokio::test]
async fn execute_command_captures_exit_code_stdout_and_stderr_in_the_project_root() {
    let f = fixture();
    assert_eq!(
        f.call(
            "execute_command",
            json!({"command": "pwd; echo oops >&2; exit 3"})
        )
        .await,
        Ok(json!({
            "exit_code": 3,
            "stdout": format!("{}\n", f.root.display()),
            "stderr": "oops\n",
            "timed_out": false,
        }))
    );
}

#[tokio::test]
async fn run_command_is_an_alias_of_execute_command() {
    let f = fixture();
    assert_eq!(
        f.call("run_command", json!({"command": "echo hi"})).await,
        Ok(json!({"exit_code": 0, "stdout": "hi\n", "stderr": "", "timed_out": false}))
    );
}

#[tokio::test]
async fn git_diff_shows_unstaged_and_staged_changes() {
    let f = fixture();
    f.git(&["init", "-q"]);
    f.write("a.txt", "one\n");
    f.write("b.txt", "bee\n");
    f.git(&["add", "-A"]);
    f.git(&["commit", "-q", "-m", "init"]);
    f.write("a.txt", "two\n");
    f.write("b.txt", "bee2\n");

    let diff = f.call("git_diff", json!({"path": "a.txt"})).await.unwrap();
    let diff = diff.as_str().unwrap();
    assert!(diff.contains("-one\n+two\n"), "{diff}");
    assert!(!diff.contains("b.txt"), "{diff}");

    assert_eq!(f.call("git_diff", json!({"staged": true})).await, Ok(json!("")));
    f.git(&["add", "b.txt"]);
    let staged = f.call("git_diff", json!({"staged": true})).await.unwrap();
    assert!(staged.as_str().unwrap().contains("-bee\n+bee2\n"), "{staged}");
}

#[tokio::test]
async fn git_commit_commits_the_given_paths_and_returns_the_sha() {
    let f = fixture();
    f.git(&["init", "-q"]);
    f.write("a.txt", "a\n");
    f.write("b.txt", "b\n");
    let out = f
        .call("git_commit", json!({"message": "add a", "paths": ["a.txt"]}))
        .await
        .unwrap();
    let head = f.git(&["rev-parse", "HEAD"]);
    assert_eq!(out, json!({"commit": head.trim()}));
    assert_eq!(f.git(&["log", "--format=%s"]), "add a\n");
    assert_eq!(f.git(&["status", "--porcelain"]), "?? b.txt\n");

    // Without paths: everything.
    let out = f.call("git_commit", json!({"message": "rest"})).await.unwrap();
    assert_eq!(out, json!({"commit": f.git(&["rev-parse", "HEAD"]).trim()}));
    assert_eq!(f.git(&["status", "--porcelain"]), "");

    // Nothing left to commit: a tool failure with git's message.
    let m = failed(f.call("git_commit", json!({"message": "empty"})).await);
    assert!(m.starts_with("git commit failed: "), "{m}");
}

#[tokio::test]
async fn git_tools_outside_a_repository_fail() {
    let f = fixture();
    let m = failed(f.call("git_diff", json!({})).await);
    assert!(m.starts_with("git diff failed: "), "{m}");
}

// ---------------------------------------------------------------- path confinement

#[tokio::test]
async fn escaping_paths_are_refused_for_read_write_and_delete() {
    let f = fixture();
    std::os::unix::fs::symlink(&f.outside, f.root.join("link")).unwrap();
    std::os::unix::fs::symlink(f.outside.join("new.txt"), f.root.join("dangling")).unwrap();
    let escapes = [
        "../outside/secret.txt",
        "a/../../outside/secret.txt",
        "/etc/passwd",
        "link/secret.txt",
    ];
    for p in escapes.iter().chain(&["link/new.txt", "dangling"]) {
        let expected = format!("path '{p}' resolves outside the project");
        assert_eq!(invalid(f.call("read_file", json!({"path": p})).await), expected);
        assert_eq!(
            invalid(f.call("write_file", json!({"path": p, "content": "pwned"})).await),
            expected
        );
        assert_eq!(invalid(f.call("delete_file", json!({"path": p})).await), expected);
        assert_eq!(invalid(f.call("list_files", json!({"path": p})).await), expected);
        assert_eq!(
            invalid(f.call("search_in_code", json!({"query": "x", "path": p})).await),
            expected
        );
        assert_eq!(invalid(f.call("git_diff", json!({"path": p})).await), expected);
        assert_eq!(
            invalid(f.call("git_commit", json!({"message": "m", "paths": [p]})).await),
            expected
        );
    }
    // Nothing was written, replaced or deleted outside.
    assert_eq!(f.outside_entries(), vec!["secret.txt"]);
    assert_eq!(
        std::fs::read_to_string(f.outside.join("secret.txt")).unwrap(),
        "secret\n"
    );
}

#[tokio::test]
async fn nul_bytes_in_paths_are_invalid() {
    let f = fixture();
    assert_eq!(
        invalid(f.call("read_file", json!({"path": "a\u{0}b"})).await),
        "`path` must not contain NUL bytes"
    );
    assert_eq!(
        invalid(
            f.call("write_file", json!({"path": "a\u{0}b", "content": ""}))
                .await
        ),
        "`path` must not contain NUL bytes"
    );
}

#[tokio::test]
async fn writes_into_git_metadata_are_refused() {
    let f = fixture();
    f.git(&["init", "-q"]);
    let m = invalid(
        f.call(
            "write_file",
            json!({"path": ".git/hooks/pre-commit", "content": "#!/bin/sh\n"}),
        )
        .await,
    );
    assert_eq!(
        m,
        "path '.git/hooks/pre-commit' is inside a .git directory, which tools may not modify"
    );
    assert!(!f.root.join(".git/hooks/pre-commit").exists());
}

/// A FIFO in the project (nobody writes to it) would block a plain `open` for ever: `read_file`
/// answers at once that it reads regular files only.
#[tokio::test]
async fn reading_a_fifo_fails_at_once_instead_of_hanging() {
    let f = fixture();
    let fifo = f.root.join("pipe");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        f.call("read_file", json!({"path": "pipe"})),
    )
    .await
    .expect("read_file blocked on a FIFO");
    assert_eq!(
        failed(answer),
        "'pipe' is not a regular file (a FIFO, socket or device): it is not read"
    );
}

#[tokio::test]
async fn missing_files_and_directories_where_files_are_needed_fail() {
    let f = fixture();
    f.write("dir/x.txt", "");
    assert_eq!(
        failed(f.call("read_file", json!({"path": "nope.txt"})).await),
        "no such file: 'nope.txt'"
    );
    assert_eq!(
        failed(f.call("read_file", json!({"path": "dir"})).await),
        "'dir' is a directory, not a file"
    );
    assert_eq!(
        failed(f.call("delete_file", json!({"path": "nope.txt"})).await),
        "no such file: 'nope.txt'"
    );
    assert_eq!(
        failed(f.call("delete_file", json!({"path": "dir"})).await),
        "'dir' is a directory, not a file"
    );
    assert_eq!(
        failed(f.call("write_file", json!({"path": "dir", "content": "x"})).await),
        "'dir' is a directory, not a file"
    );
    assert_eq!(
        failed(f.call("list_files", json!({"path": "dir/x.txt"})).await),
        "'dir/x.txt' is a file, not a directory"
    );
    assert_eq!(
        failed(f.call("list_files", json!({"path": "nope"})).await),
        "no such directory: 'nope'"
    );
    assert!(f.root.join("dir/x.txt").exists());
}

// ---------------------------------------------------------------- argument validation

#[tokio::test]
async fn malformed_arguments_are_invalid_and_name_the_field() {
    let f = fixture();
    let cases = [
        (
            "read_file",
            json!({}),
            "read_file: invalid arguments: missing field `path`",
        ),
        (
            "read_file",
            json!({"path": 7}),
            "read_file: invalid argument `path`: invalid type: integer `7`, expected a string",
        ),
        (
            "read_file",
            json!({"path": "a", "start_line": "two"}),
            "read_file: invalid argument `start_line`: invalid type: string \"two\", expected u64",
        ),
        (
            "write_file",
            json!({"path": "a", "content": "x", "mode": 644}),
            "write_file: invalid argument `mode`: unknown field `mode`, expected `path` or `content`",
        ),
        (
            "write_file",
            json!("a.txt"),
            "write_file: arguments must be a JSON object, got a string",
        ),
        (
            "list_files",
            json!(null),
            "list_files: arguments must be a JSON object, got null",
        ),
        (
            "execute_command",
            json!({"command": "ls", "timeout_secs": -1}),
            "execute_command: invalid argument `timeout_secs`: invalid value: integer `-1`, expected u64",
        ),
        (
            "git_commit",
            json!({"message": "m", "paths": "a.txt"}),
            "git_commit: invalid argument `paths`: invalid type: string \"a.txt\", expected a sequence",
        ),
        (
            "read_file",
            json!({"path": "a", "start_line": 5, "end_line": 2}),
            "read_file: `start_line` (5) is after `end_line` (2)",
        ),
        ("read_file", json!({"path": ""}), "`path` must not be empty"),
        ("no_such_tool", json!({}), "unknown tool 'no_such_tool'"),
    ];
    for (tool, args, expected) in cases {
        assert_eq!(
            f.call(tool, args.clone()).await,
            Err(ToolFailure::Invalid(expected.into())),
            "{tool} {args}"
        );
    }
}

#[tokio::test]
async fn check_validates_without_side_effects() {
    let f = fixture();
    let registry = ToolRegistry::builtin();
    let write = registry.get("write_file").unwrap();
    let args = json!({"path": "new/file.md", "content": "x"});
    assert_eq!(write.check(&f.ctx, &args), Ok(()));
    assert!(!f.root.join("new").exists());
    assert_eq!(write.touched_paths(&args), vec!["new/file.md".to_string()]);
    assert_eq!(
        registry
            .get("delete_file")
            .unwrap()
            .touched_paths(&json!({"path": "a.rs"})),
        vec!["a.rs".to_string()]
    );
    assert_eq!(
        registry
            .get("read_file")
            .unwrap()
            .touched_paths(&json!({"path": "a.rs"})),
        Vec::<String>::new()
    );
    let cmd = registry.get("run_command").unwrap();
    assert_eq!(cmd.check(&f.ctx, &json!({"command": "touch made"})), Ok(()));
    assert!(!f.root.join("made").exists());
}

#[test]
fn every_spec_is_an_object_schema_with_its_required_fields() {
    let registry = ToolRegistry::builtin();
    let names = registry.names();
    let specs = registry.specs(&names);
    let required: Vec<(String, Value)> = specs
        .iter()
        .map(|s| {
            assert_eq!(s.parameters["type"], "object", "{}", s.name);
            assert_eq!(s.parameters["additionalProperties"], false, "{}", s.name);
            (
                s.name.clone(),
                s.parameters.get("required").cloned().unwrap_or(json!([])),
            )
        })
        .collect();
    assert_eq!(
        required,
        vec![
            ("delete_file".to_string(), json!(["path"])),
            ("execute_command".to_string(), json!(["command"])),
            ("git_commit".to_string(), json!(["message"])),
            ("git_diff".to_string(), json!([])),
            ("list_files".to_string(), json!([])),
            ("read_file".to_string(), json!(["path"])),
            ("search_in_code".to_string(), json!(["query"])),
            ("write_file".to_string(), json!(["path", "content"])),
        ]
    );
    let write = registry.specs(&["write_file"]).remove(0);
    assert_eq!(
        write.parameters,
        json!({
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "path": {
                    "description": "The file, relative to the project root. Missing parent directories are created.",
                    "type": "string"
                },
                "content": {"description": "The whole new content of the file.", "type": "string"}
            },
            "required": ["path", "content"]
        })
    );
    // Unknown names are skipped, aliases resolved, order kept.
    let names: Vec<String> = registry
        .specs(&["run_command", "nope", "read_file"])
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, vec!["execute_command", "read_file"]);
}

// ---------------------------------------------------------------- processes

#[tokio::test]
async fn a_command_that_times_out_is_killed_with_its_children() {
    let f = fixture();
    let out = f
        .call(
            "execute_command",
            json!({"command": "sleep 30 & echo $! > pids; echo $$ >> pids; echo started; sleep 30", "timeout_secs": 1}),
        )
        .await;
    assert_eq!(
        out,
        Ok(json!({"exit_code": null, "stdout": "started\n", "stderr": "", "timed_out": true}))
    );
    let pids = read_pids(&f.root.join("pids"));
    assert_eq!(pids.len(), 2);
    assert!(all_gone(&pids).await, "still running: {pids:?}");
}

#[tokio::test]
async fn cancelling_the_turn_kills_a_running_command_and_its_children() {
    let f = fixture();
    let mut ctx = f.ctx.clone();
    ctx.command_timeout = Duration::from_secs(600);
    let exec = RuntimeExecutor::default();
    let pid_file = f.root.join("pids");
    let run = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            exec.execute(
                &ctx,
                "execute_command",
                json!({"command": "sleep 300 & echo $! > pids.tmp; echo $$ >> pids.tmp; mv pids.tmp pids; wait"}),
            )
            .await
        })
    };
    while !pid_file.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ctx.cancel.cancel();
    let result = run.await.unwrap();
    assert_eq!(
        result,
        Err(ToolFailure::Failed("cancelled: the command was killed".into()))
    );
    let pids = read_pids(&pid_file);
    assert_eq!(pids.len(), 2);
    assert!(all_gone(&pids).await, "still running: {pids:?}");
}

#[tokio::test]
async fn huge_output_is_cut_to_the_cap_with_a_note() {
    let f = fixture();
    let out = f
        .call(
            "execute_command",
            json!({"command": "yes | head -c 50000000; echo tail >&2"}),
        )
        .await
        .unwrap();
    let kept = "y\n".repeat(f.ctx.max_output_bytes / 2);
    assert_eq!(
        out,
        json!({
            "exit_code": 0,
            "stdout": format!("{kept}[output cut: {} more bytes not shown]", 50_000_000 - f.ctx.max_output_bytes),
            "stderr": "tail\n",
            "timed_out": false,
        })
    );
}

#[tokio::test]
async fn background_processes_do_not_outlive_the_command() {
    let f = fixture();
    let out = f
        .call(
            "execute_command",
            json!({"command": "sleep 300 & echo $! > pids; echo ok", "timeout_secs": 60}),
        )
        .await;
    assert_eq!(
        out,
        Ok(json!({"exit_code": 0, "stdout": "ok\n", "stderr": "", "timed_out": false}))
    );
    let pids = read_pids(&f.root.join("pids"));
    assert!(all_gone(&pids).await, "still running: {pids:?}");
}
