//! `execute_command` and the process runner the git tools share: a child in its own process group,
//! output read concurrently and capped, the whole group killed on exit, timeout or cancellation.
//!
//! Every process is started as the leader of a new process group (`process_group(0)`), so one
//! `kill(-pgid, SIGKILL)` reaches the shell and everything it started. The group is killed when the
//! command times out, when the turn is cancelled, when the runner's future is dropped, and also when
//! the command exits normally: a background process left behind (`server &`) would otherwise outlive
//! the call, beyond the runtime's control, and hold the output pipes open. A process that leaves the
//! group on purpose (`setsid`) escapes the kill; the runner then stops reading after a short grace so
//! the call still returns.
//!
//! Every process also runs in its agent's sandbox ([`super::isolation`]), entered before its first
//! instruction; a command the sandbox blocks fails like any other (its stderr says "Permission
//! denied" or "Operation not permitted") and the turn goes on.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::isolation::{CommandSandbox, Confinement};
use super::sandbox::project_root;
use super::{Tool, ToolContext, ToolFailure, bounded_text, no_nul, parse_args, schema_of};
use crate::protocol::ToolSpec;

/// The largest `timeout_secs` a call may ask for.
pub const MAX_COMMAND_TIMEOUT_SECS: u64 = 3600;

/// How long the output pipes are still read after the group was killed, for a process that escaped it.
const PIPE_GRACE: Duration = Duration::from_secs(2);

/// Arguments of `execute_command`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExecuteCommandArgs {
    /// The shell command, run with `sh -c` in the project root.
    command: String,
    /// Seconds before the command is killed with all its children; default the runtime's
    /// `COMMAND_TIMEOUT_SECS`.
    #[schemars(range(min = 1, max = 3600))]
    timeout_secs: Option<u64>,
}

/// `execute_command`: a shell command in the project root.
pub(crate) struct ExecuteCommand;

impl ExecuteCommand {
    fn prepare(arguments: &Value) -> Result<ExecuteCommandArgs, ToolFailure> {
        let args: ExecuteCommandArgs = parse_args("execute_command", arguments)?;
        if args.command.trim().is_empty() {
            return Err(ToolFailure::Invalid(
                "execute_command: `command` must not be empty".into(),
            ));
        }
        no_nul("command", &args.command)?;
        if let Some(t) = args.timeout_secs
            && !(1..=MAX_COMMAND_TIMEOUT_SECS).contains(&t)
        {
            return Err(ToolFailure::Invalid(format!(
                "execute_command: `timeout_secs` must be between 1 and {MAX_COMMAND_TIMEOUT_SECS}, got {t}"
            )));
        }
        Ok(args)
    }
}

#[async_trait]
impl Tool for ExecuteCommand {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "execute_command".into(),
            description: "Run a shell command (sh -c) with the project root as working directory. \
                          Answers with exit_code (null when killed), stdout, stderr (each cut when long) and \
                          timed_out. The command and everything it started are killed on timeout; background \
                          processes do not outlive the call."
                .into(),
            parameters: schema_of::<ExecuteCommandArgs>(),
        }
    }

    fn check(&self, ctx: &ToolContext, arguments: &Value) -> Result<(), ToolFailure> {
        Self::prepare(arguments)?;
        project_root(&ctx.project_root).map(|_| ())
    }

    fn touched_paths(&self, _arguments: &Value) -> Vec<String> {
        Vec::new()
    }

    #[tracing::instrument(name = "execute_command", skip_all)]
    async fn run(&self, ctx: &ToolContext, arguments: Value) -> Result<Value, ToolFailure> {
        let args = Self::prepare(&arguments)?;
        let root = project_root(&ctx.project_root)?;
        let timeout = args
            .timeout_secs
            .map(Duration::from_secs)
            .unwrap_or(ctx.command_timeout);
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(&args.command).current_dir(&root);
        let out = run_captured(
            cmd,
            &ctx.sandbox,
            &root,
            timeout,
            ctx.max_output_bytes,
            &ctx.cancel,
        )
        .await?;
        Ok(json!({
            "exit_code": out.exit_code,
            "stdout": out.stdout,
            "stderr": out.stderr,
            "timed_out": out.timed_out,
        }))
    }
}

/// What a finished (or killed) process left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Captured {
    /// The exit code; `None` when a signal ended it (a timeout's kill included).
    pub exit_code: Option<i32>,
    /// Standard output, cut at the cap with a note.
    pub stdout: String,
    /// Standard error, cut at the cap with a note.
    pub stderr: String,
    /// Killed because the timeout passed.
    pub timed_out: bool,
}

/// Kills the process group when dropped, so a cancelled or dropped runner leaves no process behind.
struct GroupKiller(Option<rustix::process::Pid>);

impl GroupKiller {
    fn kill(&mut self) {
        if let Some(pid) = self.0.take() {
            // ESRCH (the group is already gone) is the expected outcome after a clean exit.
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `cmd` (its program, args and cwd already set) in a new process group with stdin closed, in
/// `sandbox` for the project `root` (canonical); returns on exit or timeout, or fails with "cancelled"
/// when `cancel` fires.
pub(crate) async fn run_captured(
    mut cmd: Command,
    sandbox: &CommandSandbox,
    root: &Path,
    timeout: Duration,
    max_output_bytes: usize,
    cancel: &CancellationToken,
) -> Result<Captured, ToolFailure> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // Held until the command ended: the scratch directory is removed when it is dropped.
    let confinement = Confinement::prepare(sandbox, root)?;
    if let Some(c) = &confinement {
        c.apply(&mut cmd);
    }
    let mut child = cmd.spawn().map_err(|e| {
        ToolFailure::Failed(match &confinement {
            Some(_) => format!("cannot start the command in its sandbox: {e}"),
            None => format!("cannot start the command: {e}"),
        })
    })?;
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(rustix::process::Pid::from_raw);
    let mut killer = GroupKiller(pid);
    tracing::debug!(pid = ?pid, "command started");

    let stop_reading = CancellationToken::new();
    let stdout = child
        .stdout
        .take()
        .map(|r| tokio::spawn(read_capped(r, max_output_bytes, stop_reading.clone())));
    let stderr = child
        .stderr
        .take()
        .map(|r| tokio::spawn(read_capped(r, max_output_bytes, stop_reading.clone())));

    enum End {
        Exited(std::process::ExitStatus),
        TimedOut,
        Cancelled,
    }
    let end = tokio::select! {
        status = child.wait() => match status {
            Ok(s) => End::Exited(s),
            Err(e) => return Err(ToolFailure::Failed(format!("waiting for the command failed: {e}"))),
        },
        _ = tokio::time::sleep(timeout) => End::TimedOut,
        _ = cancel.cancelled() => End::Cancelled,
    };
    killer.kill();
    let status = match end {
        End::Exited(s) => Some(s),
        // Reap the killed leader so it does not linger as a zombie.
        End::TimedOut | End::Cancelled => child.wait().await.ok(),
    };

    let grace = {
        let stop = stop_reading.clone();
        tokio::spawn(async move {
            tokio::time::sleep(PIPE_GRACE).await;
            stop.cancel();
        })
    };
    let stdout = collect(stdout).await;
    let stderr = collect(stderr).await;
    grace.abort();

    drop(confinement);
    match end {
        End::Cancelled => {
            tracing::debug!("command cancelled");
            Err(ToolFailure::Failed("cancelled: the command was killed".into()))
        }
        End::TimedOut => {
            tracing::debug!(?timeout, "command timed out");
            Ok(Captured {
                exit_code: None,
                stdout,
                stderr,
                timed_out: true,
            })
        }
        End::Exited(_) => Ok(Captured {
            exit_code: status.and_then(|s| s.code()),
            stdout,
            stderr,
            timed_out: false,
        }),
    }
}

async fn collect(task: Option<tokio::task::JoinHandle<(Vec<u8>, u64)>>) -> String {
    match task {
        Some(t) => match t.await {
            Ok((kept, total)) => bounded_text(&kept, total),
            Err(_) => String::new(),
        },
        None => String::new(),
    }
}

/// Reads `reader` to its end (or until `stop`), keeping the first `max` bytes and counting the rest:
/// the child never blocks on a full pipe, and memory stays bounded whatever it prints.
async fn read_capped<R: AsyncRead + Unpin>(
    mut reader: R,
    max: usize,
    stop: CancellationToken,
) -> (Vec<u8>, u64) {
    let mut kept = Vec::new();
    let mut total: u64 = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = reader.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = stop.cancelled() => break,
        };
        total += n as u64;
        let take = max.saturating_sub(kept.len()).min(n);
        kept.extend_from_slice(&buf[..take]);
    }
    (kept, total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> (tempfile::TempDir, ToolContext) {
        let dir = tempfile::tempdir().unwrap();
        let ctx = ToolContext::new(dir.path());
        (dir, ctx)
    }

    #[test]
    fn bad_timeouts_and_commands_are_invalid() {
        let (_d, ctx) = ctx();
        let t = ExecuteCommand;
        assert_eq!(
            t.check(&ctx, &json!({"command": "true", "timeout_secs": 0})),
            Err(ToolFailure::Invalid(
                "execute_command: `timeout_secs` must be between 1 and 3600, got 0".into()
            ))
        );
        assert!(matches!(
            t.check(&ctx, &json!({"command": "true", "timeout_secs": 3601})),
            Err(ToolFailure::Invalid(_))
        ));
        assert_eq!(
            t.check(&ctx, &json!({"command": "  "})),
            Err(ToolFailure::Invalid(
                "execute_command: `command` must not be empty".into()
            ))
        );
        assert_eq!(
            t.check(&ctx, &json!({"command": "echo a\u{0}b"})),
            Err(ToolFailure::Invalid(
                "`command` must not contain NUL bytes".into()
            ))
        );
        assert_eq!(
            t.check(&ctx, &json!({"command": "true", "timeout_secs": 5})),
            Ok(())
        );
    }

    #[tokio::test]
    async fn the_sandbox_confines_a_command_unless_it_is_off() {
        let (_d, mut ctx) = ctx();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("x.txt");
        let cmd = json!({"command": format!("echo x > {}", target.display())});
        let out = ExecuteCommand.run(&ctx, cmd.clone()).await.unwrap();
        assert_eq!(
            (out["exit_code"].clone(), target.exists()),
            (json!(2), false),
            "{out}"
        );
        assert!(
            out["stderr"].as_str().unwrap().contains("Permission denied"),
            "{out}"
        );
        ctx.sandbox.mode = crate::tools::SandboxMode::Off;
        let out = ExecuteCommand.run(&ctx, cmd).await.unwrap();
        assert_eq!(
            (
                out["exit_code"].clone(),
                std::fs::read_to_string(&target).unwrap()
            ),
            (json!(0), "x\n".to_string())
        );
    }

    #[tokio::test]
    async fn stdout_and_stderr_are_read_concurrently() {
        let (_d, ctx) = ctx();
        // 200 KB on stderr before anything on stdout: a sequential reader would deadlock here.
        let out = ExecuteCommand
            .run(
                &ctx,
                json!({"command": "head -c 200000 /dev/zero >&2; echo done", "timeout_secs": 60}),
            )
            .await
            .unwrap();
        assert_eq!(out["stdout"], "done\n");
        assert_eq!(out["exit_code"], 0);
        assert!(
            out["stderr"]
                .as_str()
                .unwrap()
                .ends_with("[output cut: 167232 more bytes not shown]")
        );
    }
}
