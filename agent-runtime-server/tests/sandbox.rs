//! The process sandbox through the real server: commands scripted by the mock model try to escape the
//! project (write, read, connect, lift the sandbox) and each target is left untouched.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_runtime_core::llm::Script;
use agent_runtime_core::llm::mock::{MockLlmServer, MockResponse};
use common::*;
use serde_json::{Value, json};

/// Python from the system (a shim under the home directory would not be readable in the sandbox).
const PY: &str = "/usr/bin/python3";

/// A server whose default agent is `agent`, with a project folder and a folder outside it.
struct Setup {
    llm: MockLlmServer,
    s: Server,
    id: String,
    project: PathBuf,
    outside: tempfile::TempDir,
}

async fn setup(agent: &str, extra: &[(&str, &str)]) -> Setup {
    let llm = MockLlmServer::start().await.unwrap();
    let mut env = vec![
        ("AGENT_RUNTIME__AUTO_AGENT_SWITCHING", "false"),
        ("AGENT_RUNTIME__DEFAULT_AGENT", agent),
        ("HITL_ENABLED", "false"),
        ("COMMAND_TIMEOUT_SECS", "20"),
    ];
    env.extend_from_slice(extra);
    let s = Server::start_with(&llm.url(), None, &env).await;
    let project = s.dir.path().join("project");
    std::fs::create_dir(&project).unwrap();
    std::fs::write(project.join("main.txt"), "original\n").unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.txt"), "top secret\n").unwrap();
    std::fs::write(outside.path().join("target.txt"), "untouched\n").unwrap();
    let id = s
        .session(json!({"metadata": {"project_path": project.to_str().unwrap()}}))
        .await;
    Setup {
        llm,
        s,
        id,
        project,
        outside,
    }
}

impl Setup {
    /// Runs one `execute_command` through a turn; the turn must complete; returns the tool's result.
    async fn run(&self, command: &str) -> Value {
        self.llm.push(MockResponse::script(&Script::tool_call(
            "execute_command",
            json!({"command": command}),
        )));
        self.llm.push(MockResponse::script(&Script::text("done")));
        let events = self
            .s
            .send(&self.id, json!({"type": "user_message", "content": "go"}))
            .await;
        assert_eq!(
            kinds(&events).last().unwrap(),
            "done:completed",
            "{:?}",
            kinds(&events)
        );
        find(&events, "tool_result")["result"].clone()
    }

    fn out(&self) -> &Path {
        self.outside.path()
    }
}

/// Every file under `dir` with its content, sorted: what "left untouched" is compared on.
fn tree(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if p.is_symlink() {
            out.push((name, format!("-> {}", std::fs::read_link(&p).unwrap().display())));
        } else if p.is_dir() {
            for (n, c) in tree(&p) {
                out.push((format!("{name}/{n}"), c));
            }
        } else {
            out.push((name, std::fs::read_to_string(&p).unwrap_or_default()));
        }
    }
    out.sort();
    out
}

fn denied(result: &Value, what: &str) {
    let stderr = result["stderr"].as_str().unwrap_or_default();
    assert!(
        result["exit_code"] != json!(0)
            && (stderr.contains("Permission denied")
                || stderr.contains("Operation not permitted")
                || stderr.contains("Invalid cross-device link")),
        "{what}: expected a refusal, got {result}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_cannot_write_outside_the_project_by_any_path() {
    let t = setup("coder", &[]).await;
    std::os::unix::fs::symlink(t.out(), t.project.join("link")).unwrap();
    let outside_before = tree(t.out());
    let parent_before = tree(t.s.dir.path());
    let o = t.out().display().to_string();
    let cases = [
        ("absolute path", format!("echo x > {o}/abs.txt")),
        ("dot-dot", "echo x > ../escape.txt".to_string()),
        ("symlink planted inside", "echo x > link/sym.txt".to_string()),
        (
            "overwrite through a symlink",
            "echo pwned > link/target.txt".to_string(),
        ),
        (
            "hard link",
            format!("ln {o}/target.txt hard && echo pwned > hard"),
        ),
        ("/proc/self/root", format!("echo x > /proc/self/root{o}/proc.txt")),
        (
            "/proc/self/cwd",
            format!("cd {o} && echo x > /proc/self/cwd/cwd.txt"),
        ),
        ("a shell that cds out", format!("cd {o} && echo x > cd.txt")),
        ("rename out", format!("mv main.txt {o}/moved.txt")),
        ("the server's database", "echo x >> ../rt.db".to_string()),
    ];
    for (what, cmd) in &cases {
        let r = t.run(cmd).await;
        denied(&r, what);
    }
    assert_eq!(tree(t.out()), outside_before);
    assert_eq!(tree(t.s.dir.path()), parent_before);
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_cannot_read_a_secret_outside_the_project() {
    let t = setup("coder", &[]).await;
    std::os::unix::fs::symlink(t.out(), t.project.join("link")).unwrap();
    let o = t.out().display().to_string();
    for (what, cmd) in [
        ("absolute path", format!("cat {o}/secret.txt")),
        ("symlink planted inside", "cat link/secret.txt".to_string()),
        ("/proc/self/root", format!("cat /proc/self/root{o}/secret.txt")),
        ("listing", format!("ls {o}")),
    ] {
        let r = t.run(&cmd).await;
        denied(&r, what);
        assert!(!r.to_string().contains("top secret"), "{what}: {r}");
        assert!(!r.to_string().contains("target.txt"), "{what}: {r}");
    }
}

/// A Python one-liner that connects to 127.0.0.1:`port` and prints `connected`.
fn connect(port: u16) -> String {
    format!(
        "{PY} -c \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=3); print('connected')\""
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_cannot_open_ip_connections_unless_their_agent_is_allowed() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();

    let t = setup("coder", &[]).await;
    for p in [port, 5432] {
        let r = t.run(&connect(p)).await;
        denied(&r, &format!("connect to {p}"));
    }
    assert_eq!(
        listener.accept().map(|_| ()).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock),
        "a connection reached the listener"
    );
    // Unix sockets stay allowed.
    let r = t
        .run(&format!(
            "{PY} -c \"import socket; a, b = socket.socketpair(); a.send(b'u'); print(b.recv(1))\""
        ))
        .await;
    assert_eq!(
        (r["exit_code"].clone(), r["stdout"].clone()),
        (json!(0), json!("b'u'\n"))
    );

    // The same command from an agent listed in SANDBOX_NETWORK_AGENTS connects.
    let t = setup("coder", &[("SANDBOX_NETWORK_AGENTS", "coder")]).await;
    let r = t.run(&connect(port)).await;
    assert_eq!(
        (r["exit_code"].clone(), r["stdout"].clone()),
        (json!(0), json!("connected\n"))
    );
    assert!(listener.accept().is_ok(), "the allowed connection arrived");
}

#[tokio::test(flavor = "multi_thread")]
async fn debug_commands_cannot_write_the_project_but_have_a_private_scratch_dir() {
    let t = setup("debug", &[]).await;
    let before = tree(&t.project);
    for (what, cmd) in [
        ("overwrite", "echo pwned > main.txt"),
        ("create", "echo x > new.txt"),
        ("delete", "rm main.txt"),
        ("mkdir", "mkdir d"),
    ] {
        let r = t.run(cmd).await;
        denied(&r, what);
    }
    assert_eq!(tree(&t.project), before);
    let r = t
        .run("echo scratch > \"$TMPDIR/x\" && cat \"$TMPDIR/x\" && echo \"$TMPDIR\" && cat main.txt")
        .await;
    assert_eq!(r["exit_code"], 0, "{r}");
    let stdout = r["stdout"].as_str().unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!((lines[0], lines[2]), ("scratch", "original"));
    assert!(
        !Path::new(lines[1]).exists(),
        "the scratch directory {} is removed after the command",
        lines[1]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_cannot_lift_its_sandbox_nor_can_a_grandchild_after_its_parent_exits() {
    let t = setup("coder", &[]).await;
    let o = t.out().display().to_string();
    // landlock_create_ruleset (444), ptrace (101), io_uring_setup (425) are refused; clearing
    // no_new_privs is impossible (EINVAL).
    let probe = format!(
        "{PY} -c \"import ctypes; l = ctypes.CDLL(None, use_errno=True); \
         r = [(l.syscall(n, 0, 0, 0), ctypes.get_errno()) for n in (444, 101, 425)]; \
         r.append((l.prctl(38, 0, 0, 0, 0), ctypes.get_errno())); print(r)\""
    );
    let r = t.run(&probe).await;
    assert_eq!(
        r["stdout"],
        json!("[(-1, 1), (-1, 1), (-1, 1), (-1, 22)]\n"),
        "{r}"
    );
    // A grandchild in a session of its own survives the command, then tries a user namespace
    // (root inside it) and a plain write, and leaves a mark in the project to show it ran. The
    // command waits until `setsid` ran, or the group kill at its end would take the grandchild too.
    let r = t
        .run(&format!(
            "setsid sh -c 'sleep 1; unshare -Ur sh -c \"echo x > {o}/userns.txt\"; echo x > {o}/grand.txt; \
             echo ran > alive.txt' > /dev/null 2>&1 < /dev/null & sleep 0.5; echo started"
        ))
        .await;
    assert_eq!(r["stdout"], "started\n");
    let alive = t.project.join("alive.txt");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !alive.exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        std::fs::read_to_string(&alive).unwrap(),
        "ran\n",
        "the grandchild ran"
    );
    assert_eq!(
        tree(t.out()),
        vec![
            ("secret.txt".to_string(), "top secret\n".to_string()),
            ("target.txt".to_string(), "untouched\n".to_string())
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_coder_still_builds_and_commits_inside_its_root() {
    let t = setup("coder", &[]).await;
    let r = t
        .run(&format!(
            "git init -q && printf 'print(6 * 7)\\n' > calc.py && {PY} calc.py > out.txt && \
             git add -A && git -c user.name=t -c user.email=t@t commit -qm build && \
             git log --format=%s && mkdir -p build/deep && cp out.txt build/deep/"
        ))
        .await;
    assert_eq!(
        (r["exit_code"].clone(), r["stdout"].clone()),
        (json!(0), json!("build\n")),
        "{r}"
    );
    assert_eq!(
        std::fs::read_to_string(t.project.join("out.txt")).unwrap(),
        "42\n"
    );
    assert_eq!(
        std::fs::read_to_string(t.project.join("build/deep/out.txt")).unwrap(),
        "42\n"
    );
    // The git tools run in the same sandbox and still commit.
    std::fs::write(t.project.join("main.txt"), "changed\n").unwrap();
    t.llm.push(MockResponse::script(&Script::tool_call(
        "git_commit",
        json!({"message": "tool commit"}),
    )));
    t.llm.push(MockResponse::script(&Script::text("done")));
    let events =
        t.s.send(&t.id, json!({"type": "user_message", "content": "go"}))
            .await;
    let result = &find(&events, "tool_result")["result"];
    assert!(
        result["commit"].as_str().is_some_and(|c| c.len() == 40),
        "{result}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_agents_report_the_sandbox() {
    let t = setup(
        "coder",
        &[
            ("SANDBOX_NETWORK_AGENTS", "debug"),
            ("SANDBOX_READ_PATHS", "/tmp"),
        ],
    )
    .await;
    let health = t.s.get_json("/health").await;
    let abi = health["sandbox"]["landlock_abi"].as_i64().unwrap();
    assert!(abi >= 1, "this machine's kernel offers Landlock: {health}");
    assert_eq!(
        health["sandbox"],
        json!({"mode": "enforce", "landlock_abi": abi, "seccomp": true, "file_tools": "openat2"})
    );
    let agents = t.s.get_json("/agents").await;
    let rights: Vec<(String, Value)> = agents["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["type"].as_str().unwrap().to_string(),
                a["command_rights"].clone(),
            )
        })
        .collect();
    let r = |project: &str, network: bool| {
        json!({"sandbox": "enforce", "project": project, "network": network,
               "extra_read_paths": ["/tmp"], "extra_write_paths": []})
    };
    assert_eq!(
        rights,
        vec![
            ("orchestrator".to_string(), r("read_only", false)),
            ("coder".to_string(), r("read_write", false)),
            ("architect".to_string(), r("read_only", false)),
            ("debug".to_string(), r("read_only", true)),
            ("ask".to_string(), r("read_only", false)),
        ]
    );
}
