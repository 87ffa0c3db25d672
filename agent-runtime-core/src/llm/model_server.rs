//! The real small model for end-to-end tests (feature `test-utils`): SmolLM2-135M-Instruct behind
//! llama-cpp-python's OpenAI-compatible server, started and stopped through
//! `examples/real-model/model-server.sh`. Used by the core's and the server's `real_model` tests.
//!
//! The tests that use it are `#[ignore]`d with the reason (so `cargo test` lists them as ignored)
//! and run with `-- --ignored`; a model server that does not start then fails them with the set-up
//! command. `AGENT_RUNTIME_MODEL_URL` points the tests at a server that is already running instead.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The model alias the script serves.
pub const MODEL: &str = "smollm2-135m-instruct";

/// One model server at a time per test process: the script keeps one PID file. Hold it while a
/// [`ModelServer`] lives.
pub static SERVER_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A running model server; stopped on drop when this process started it.
#[derive(Debug)]
pub struct ModelServer {
    /// The OpenAI-compatible base URL (`http://127.0.0.1:PORT/v1`).
    pub base_url: String,
    started_here: bool,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/real-model/model-server.sh")
}

fn run_script(args: &[&str]) -> std::io::Result<Output> {
    Command::new("bash").arg(script()).args(args).output()
}

impl ModelServer {
    /// Starts the model server on a free port (or reuses one already running).
    ///
    /// # Panics
    /// When the server cannot start, naming the cause and the set-up command: a test that asked
    /// for the real model fails without it, it never passes.
    #[allow(clippy::panic)] // test support: a model that cannot start fails the test
    pub fn start() -> ModelServer {
        if let Ok(url) = std::env::var("AGENT_RUNTIME_MODEL_URL") {
            return ModelServer {
                base_url: url,
                started_here: false,
            };
        }
        let already = run_script(&["status"]).is_ok_and(|o| o.status.success());
        let started = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .and_then(|a| run_script(&["start", &a.port().to_string()]));
        let why = match started {
            Ok(out) if out.status.success() => {
                return ModelServer {
                    base_url: String::from_utf8_lossy(&out.stdout).trim().to_string(),
                    started_here: !already,
                };
            }
            Ok(out) => format!(
                "model-server.sh start failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => format!("cannot run model-server.sh: {e}"),
        };
        panic!(
            "the real model is not available: {why}\n\
             set it up once with `examples/real-model/model-server.sh setup` (~6 min), \
             or point AGENT_RUNTIME_MODEL_URL at a running server"
        );
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        if self.started_here {
            let _ = run_script(&["stop"]);
        }
    }
}
