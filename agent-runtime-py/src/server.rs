//! `Runtime.serve`: the HTTP server of `agent-runtime-server`, run in this process on the
//! module's tokio runtime, with this runtime's settings. Stops on `stop()` or Ctrl-C.

use std::collections::BTreeMap;
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use tokio::sync::{oneshot, watch};

use crate::runtime;

/// How often a blocking `wait` looks for Ctrl-C.
const SIGNAL_POLL: Duration = Duration::from_millis(100);

/// A running HTTP server (from `Runtime.serve(block=False)`).
#[pyclass(module = "agent_runtime")]
pub struct Server {
    address: String,
    stop: Option<oneshot::Sender<()>>,
    done: watch::Receiver<Option<Result<(), String>>>,
}

/// Starts the server on `host:port` (port 0 picks a free port) with `env` as its settings.
pub fn start(py: Python<'_>, env: BTreeMap<String, String>, host: &str, port: u16) -> PyResult<Server> {
    let args = [
        "agent-runtime-server".to_string(),
        "--host".into(),
        host.to_string(),
        "--port".into(),
        port.to_string(),
    ];
    let config = agent_runtime_server::config::load(args, |name| env.get(name).cloned())
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    let rt = runtime()?;
    let addr = config.addr;
    let listener = py
        .detach(|| rt.block_on(tokio::net::TcpListener::bind(addr)))
        .map_err(|e| PyOSError::new_err(format!("HOST/PORT: cannot listen on {addr}: {e}")))?;
    let address = listener
        .local_addr()
        .map_err(|e| PyOSError::new_err(e.to_string()))?
        .to_string();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (done_tx, done_rx) = watch::channel(None);
    rt.spawn(async move {
        let stop = async move {
            let _ = stop_rx.await;
            "stop requested"
        };
        let result = agent_runtime_server::server::serve(config, listener, stop).await;
        let _ = done_tx.send(Some(result));
    });
    Ok(Server {
        address,
        stop: Some(stop_tx),
        done: done_rx,
    })
}

impl Server {
    /// Waits until the server has stopped; `None` when `SIGNAL_POLL` passed first.
    fn wait_for(&self, py: Python<'_>, timeout: Duration) -> PyResult<Option<Result<(), String>>> {
        let rt = runtime()?;
        let mut done = self.done.clone();
        Ok(py.detach(|| {
            rt.block_on(async {
                tokio::time::timeout(timeout, done.wait_for(Option::is_some))
                    .await
                    .ok()
                    .and_then(|r| r.ok().and_then(|v| v.clone()))
            })
        }))
    }
}

#[pymethods]
impl Server {
    /// The bound address, `host:port`.
    #[getter]
    fn address(&self) -> String {
        self.address.clone()
    }

    /// Stops gracefully (running turns end with `done: cancelled`) and waits until it has.
    fn stop(&mut self, py: Python<'_>) -> PyResult<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.wait_for(py, Duration::from_secs(30))? {
            Some(Err(e)) => Err(PyRuntimeError::new_err(e)),
            _ => Ok(()),
        }
    }

    /// Blocks until the server stops; Ctrl-C stops it gracefully and raises `KeyboardInterrupt`.
    fn wait(&mut self, py: Python<'_>) -> PyResult<()> {
        loop {
            match self.wait_for(py, SIGNAL_POLL)? {
                Some(Ok(())) => return Ok(()),
                Some(Err(e)) => return Err(PyRuntimeError::new_err(e)),
                None => {
                    if let Err(interrupt) = py.check_signals() {
                        self.stop(py)?;
                        return Err(interrupt);
                    }
                }
            }
        }
    }

    fn __repr__(&self) -> String {
        format!("<agent_runtime.Server http://{}>", self.address)
    }
}
