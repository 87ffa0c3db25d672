//! `chat --demo` driven the way CI drives it: scripted answers on standard input, the whole
//! transcript checked. Covers approve (with the connection cut mid-turn and resumed), edit, reject,
//! a bad edit answered again, a question answered from the project, a hand-over to the coder, and
//! `/quit` at the approval prompt.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::process::{Command, Stdio};

/// Runs `chat --demo ARGS` with `input` on stdin; returns (normalized stdout, stderr).
fn chat(args: &[&str], input: &str) -> (String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chat"))
        .arg("--demo")
        .args(args)
        .env_remove("EDITOR")
        .env_remove("VISUAL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "chat failed\n{stdout}\n{stderr}");
    (normalize(&stdout), stderr)
}

/// Drops the lines that differ run to run (the address, the session id and temp path), the
/// token counts (they follow the agents' prompts, which are not what this test is about) and the
/// random call ids the runtime gives when the demo model reuses one (`call_<fresh>`).
fn normalize(stdout: &str) -> String {
    stdout
        .lines()
        .filter(|l| !l.starts_with("listening on ") && !l.starts_with("session "))
        .map(|l| match (l.starts_with("[done: "), l.find(';')) {
            (true, Some(cut)) => format!("{}]", &l[..cut]),
            _ => l.to_string(),
        })
        .map(
            |l| match l.strip_prefix("[approval] call_").and_then(|r| r.split_once(':')) {
                Some((id, rest)) if id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()) => {
                    format!("[approval] call_<fresh>:{rest}")
                }
                _ => l,
            },
        )
        .collect::<Vec<_>>()
        .join("\n")
}

const ARGS: &str =
    r#"{"content":"export const ProfileWidget = () => null;\n","path":"src/ProfileWidget.tsx"}"#;

const WIDGET: &str = "Создай src/ProfileWidget.tsx: виджет профиля";

const README: &str = "[demo] project file README.md (168 bytes)";

fn first_turn() -> String {
    format!(
        "type a message, or: /agent TYPE [text] · /agents · /pending · /cancel · /quit
you> {WIDGET}
[agent: orchestrator → coder] просят создать или изменить файл
Записываю src/ProfileWidget.tsx.
[tool] write_file {ARGS} (needs approval)
[done: awaiting_approval]
[approval needed] write_file {ARGS} — File modification requires approval"
    )
}

#[test]
fn approve_after_a_dropped_connection_shows_every_event_once_and_writes_the_file() {
    let (out, err) = chat(&["--drop-after", "3"], &format!("{WIDGET}\napprove\n/quit\n"));
    let expected = format!(
        "{}
approve / edit / reject? approve
[approval] call_0: approve
[tool result] write_file: {{\"bytes_written\":41,\"path\":\"src/ProfileWidget.tsx\"}}
Готово: src/ProfileWidget.tsx записан (41 байт).
[done: completed]
you> /quit
{README}
[demo] project file src/ProfileWidget.tsx (41 bytes)
bye",
        first_turn()
    );
    assert_eq!(out, expected);
    // The cut came after the switch and two tokens; the rest was replayed from seq 4 on.
    let notices: Vec<&str> = err.lines().skip(1).filter(|l| !l.is_empty()).collect();
    assert_eq!(notices.len(), 3, "{err}");
    assert_eq!(notices[0], "[connection dropped on purpose after event 3]");
    assert!(notices[1].ends_with("/events, Last-Event-ID: 3]"), "{err}");
    assert_eq!(notices[2], "[reconnected]");
}

#[test]
fn edit_runs_the_tool_with_the_arguments_typed_after_a_bad_line() {
    let (out, err) = chat(
        &[],
        &format!("{WIDGET}\nedit\nnot json\n{{\"path\":\"src/Edited.tsx\",\"content\":\"x\"}}\n/quit\n"),
    );
    let expected = format!(
        "{}
approve / edit / reject? edit
arguments now: {ARGS}
new arguments (one JSON object; empty keeps them): not json
not valid JSON: expected ident at line 1 column 2
new arguments (one JSON object; empty keeps them): {{\"path\":\"src/Edited.tsx\",\"content\":\"x\"}}
[approval] call_0: edit
[tool result] write_file: {{\"bytes_written\":1,\"path\":\"src/Edited.tsx\"}}
Готово: src/Edited.tsx записан (1 байт).
[done: completed]
you> /quit
{README}
[demo] project file src/Edited.tsx (1 bytes)
bye",
        first_turn()
    );
    assert_eq!(out, expected, "{err}");
}

#[test]
fn reject_with_feedback_runs_nothing_and_the_model_hears_why() {
    let (out, err) = chat(&[], &format!("{WIDGET}\nreject use .ts\n/quit\n"));
    let expected = format!(
        "{}
approve / edit / reject? reject use .ts
[approval] call_0: reject
[tool result] write_file: error {{\"code\":\"REJECTED\",\"message\":\"the user rejected this call: use .ts\"}}
Файл не записан: REJECTED: the user rejected this call: use .ts
[done: completed]
you> /quit
{README}
bye",
        first_turn()
    );
    assert_eq!(out, expected, "{err}");
}

#[test]
fn a_question_is_answered_from_the_project_and_a_change_request_hands_over_to_the_coder() {
    let (out, err) = chat(
        &[],
        "What is in this project?\nWhat does README.md say?\nAdd notes.md please\napprove\n/quit\n",
    );
    let expected = "type a message, or: /agent TYPE [text] · /agents · /pending · /cancel · /quit
you> What is in this project?
[agent: orchestrator → ask] the message is a question about the project
[tool] list_files {}
[tool result] list_files: {\"entries\":[\"README.md\"]}
Here is what I read (list_files): {\"entries\":[\"README.md\"]}
[done: completed]
you> What does README.md say?
[tool] read_file {\"path\":\"README.md\"}
[tool result] read_file: \"[README.md: lines 1-3 of 3]\\n# Demo project\\n\\nThe folder `chat --demo` works in. Ask about it (the ask agent reads it), or ask to create or change a file (the coder writes it, after your approval).\\n\"
Here is what I read (read_file): [README.md: lines 1-3 of 3] # Demo project The folder `chat --demo` works in. Ask about it (the ask agent reads it), or ask to create or change a file (the coder writes it, after your approval).
[done: completed]
you> Add notes.md please
[tool] switch_agent {\"agent_type\":\"coder\",\"reason\":\"a file needs writing\"}
[agent: ask → coder] a file needs writing
[tool result] switch_agent: \"Switched to the coder agent, which continues.\"
Writing notes.md.
[tool] write_file {\"content\":\"# notes\\n\\nAdd notes.md please\\n\",\"path\":\"notes.md\"} (needs approval)
[done: awaiting_approval]
[approval needed] write_file {\"content\":\"# notes\\n\\nAdd notes.md please\\n\",\"path\":\"notes.md\"} — File modification requires approval
approve / edit / reject? approve
[approval] call_<fresh>: approve
[tool result] write_file: {\"bytes_written\":29,\"path\":\"notes.md\"}
Done: notes.md written (29 bytes).
[done: completed]
you> /quit
[demo] project file README.md (168 bytes)
[demo] project file notes.md (29 bytes)
bye";
    assert_eq!(out, expected, "{err}");
}

#[test]
fn quit_at_the_approval_prompt_leaves_and_writes_nothing() {
    let (out, err) = chat(&[], &format!("{WIDGET}\n/quit\n"));
    let expected = format!(
        "{}
approve / edit / reject? /quit
{README}
bye",
        first_turn()
    );
    assert_eq!(out, expected, "{err}");
}

#[test]
fn quit_while_typing_edited_arguments_leaves_and_writes_nothing() {
    let (out, err) = chat(&[], &format!("{WIDGET}\nedit\n/quit\n"));
    let expected = format!(
        "{}
approve / edit / reject? edit
arguments now: {ARGS}
new arguments (one JSON object; empty keeps them): /quit
{README}
bye",
        first_turn()
    );
    assert_eq!(out, expected, "{err}");
}
