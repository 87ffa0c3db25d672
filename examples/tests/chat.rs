//! `chat --demo` driven the way CI drives it: scripted answers on standard input, the whole
//! transcript checked. Covers approve (with the connection cut mid-turn and resumed), edit, reject,
//! and a bad edit answered again.

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

/// Drops the lines that differ run to run (the address, the session id and temp path) and the
/// token counts (they follow the agents' prompts, which are not what this test is about).
fn normalize(stdout: &str) -> String {
    stdout
        .lines()
        .filter(|l| !l.starts_with("listening on ") && !l.starts_with("session "))
        .map(|l| match (l.starts_with("[done: "), l.find(';')) {
            (true, Some(cut)) => format!("{}]", &l[..cut]),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

const ARGS: &str =
    r#"{"content":"export const ProfileWidget = () => null;\n","path":"src/ProfileWidget.tsx"}"#;

fn first_turn() -> String {
    format!(
        "type a message, or: /agent TYPE [text] · /agents · /pending · /cancel · /quit
you> Создай новый виджет профиля
[agent: orchestrator → coder] the user wants new code
Создаю виджет профиля.
[tool] write_file {ARGS} (needs approval)
[done: awaiting_approval]
[approval needed] write_file {ARGS} — File modification requires approval"
    )
}

#[test]
fn approve_after_a_dropped_connection_shows_every_event_once_and_writes_the_file() {
    let (out, err) = chat(
        &["--drop-after", "3"],
        "Создай новый виджет профиля\napprove\n/quit\n",
    );
    let expected = format!(
        "{}
approve / edit / reject? approve
[approval] call_0: approve
[tool result] write_file: {{\"bytes_written\":41,\"path\":\"src/ProfileWidget.tsx\"}}
Готово: виджет создан.
[done: completed]
you> /quit
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
        "Создай новый виджет профиля\nedit\nnot json\n{\"path\":\"src/Edited.tsx\",\"content\":\"x\"}\n/quit\n",
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
Готово: виджет создан.
[done: completed]
you> /quit
[demo] project file src/Edited.tsx (1 bytes)
bye",
        first_turn()
    );
    assert_eq!(out, expected, "{err}");
}

#[test]
fn reject_with_feedback_runs_nothing_and_the_model_hears_why() {
    let (out, err) = chat(&[], "Создай новый виджет профиля\nreject use .ts\n/quit\n");
    let expected = format!(
        "{}
approve / edit / reject? reject use .ts
[approval] call_0: reject
[tool result] write_file: error {{\"code\":\"REJECTED\",\"message\":\"the user rejected this call: use .ts\"}}
Готово: виджет создан.
[done: completed]
you> /quit
bye",
        first_turn()
    );
    assert_eq!(out, expected, "{err}");
}
