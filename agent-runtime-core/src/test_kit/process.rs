//! A server binary as a child process: started, its address read from its `listening on` line,
//! its stderr collected as it comes, killed when dropped.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};

/// A running server process; killed (and waited for) when dropped.
#[derive(Debug)]
pub struct ServerProcess {
    /// The process.
    pub child: Child,
    /// `http://ADDR` from its `listening on ADDR` line.
    pub base: String,
    /// Everything it wrote to stderr so far (its logs), read by a thread so that a chatty server
    /// never blocks on a full pipe. `AGENT_RUNTIME_TEST_LOGS=1` also echoes it as it comes.
    logs: Arc<Mutex<String>>,
}

impl ServerProcess {
    /// Runs `command` with stdout and stderr piped and waits for its first line,
    /// `listening on ADDR`. An error names what went wrong (no start, another first line).
    pub async fn start(mut command: Command) -> Result<ServerProcess, String> {
        let program = command.get_program().to_string_lossy().into_owned();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {program}: {e} (is it built?)"))?;
        let logs = drain_stderr(&mut child);
        let stdout = child.stdout.take();
        let first = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            if let Some(stdout) = stdout {
                BufReader::new(stdout).read_line(&mut line)?;
            }
            Ok::<_, std::io::Error>(line)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|line| line.map_err(|e| e.to_string()));
        let mut process = ServerProcess {
            child,
            base: String::new(),
            logs,
        };
        let first = first?;
        match first.trim().strip_prefix("listening on ") {
            Some(addr) => process.base = format!("http://{addr}"),
            None => {
                // Dropping `process` kills it; the log says why it did not start.
                let _ = process.child.kill();
                let status = process.child.wait().map_err(|e| e.to_string())?;
                return Err(format!(
                    "{program} did not start listening ({status}; first line {first:?}); it logged:\n{}",
                    process.logs()
                ));
            }
        }
        Ok(process)
    }

    /// What the server logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Stops the server with SIGTERM and waits; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let pid = self.child.id().to_string();
        let signalled = Command::new("kill").args(["-TERM", &pid]).status();
        signalled.is_ok_and(|s| s.success()) && self.child.wait().is_ok_and(|s| s.success())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the child's stderr to its end on a thread of its own.
fn drain_stderr(child: &mut Child) -> Arc<Mutex<String>> {
    let logs = Arc::new(Mutex::new(String::new()));
    if let Some(stderr) = child.stderr.take() {
        let (sink, echo) = (
            logs.clone(),
            std::env::var_os("AGENT_RUNTIME_TEST_LOGS").is_some(),
        );
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if echo {
                    eprintln!("[server] {line}");
                }
                let mut s = sink.lock().unwrap_or_else(PoisonError::into_inner);
                s.push_str(&line);
                s.push('\n');
            }
        });
    }
    logs
}
