//! Streams handed to Python: a turn's events and the EventBus. A spawned task pumps the Rust
//! stream into a channel; `for` and `async for` both read that one channel, in order.
//!
//! `async for` is hand-rolled on `asyncio` futures rather than pyo3-async-runtimes: each
//! `__anext__` makes a future on the running loop, a tokio task receives the next item and hands
//! it over with `loop.call_soon_threadsafe`. The hand-over runs on the loop thread, where it can
//! see whether the awaiting task was cancelled meanwhile; if so the item goes back to the front of
//! the stream, so cancelling an `await` (e.g. `asyncio.wait_for` timing out) never loses an event.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::{Stream, StreamExt};
use pyo3::exceptions::PyStopAsyncIteration;
use pyo3::prelude::*;
use serde_json::Value;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::{convert, runtime};

/// How often a blocking `__next__` wakes up to let Python handle signals (Ctrl-C).
const SIGNAL_POLL: Duration = Duration::from_millis(100);
/// Items buffered between the pump and the reader.
const CHANNEL_CAPACITY: usize = 256;

/// The reader's end: items put back by a cancelled `await` come first.
struct Reader {
    rx: mpsc::Receiver<Value>,
    stash: VecDeque<Value>,
}

impl Reader {
    /// The next item, `None` at the end. Cancel-safe: dropping the future loses nothing.
    async fn next(&mut self) -> Option<Value> {
        match self.stash.pop_front() {
            Some(v) => Some(v),
            None => self.rx.recv().await,
        }
    }
}

type Shared = Arc<tokio::sync::Mutex<Reader>>;

/// A pumped stream: the reader, and the switch that stops the pump.
struct Channel {
    shared: Shared,
    stop: Arc<Notify>,
}

/// Starts pumping `stream` into a new channel on the runtime; the pump stops when the stream
/// ends, the reader is gone, or `stop` is notified.
fn pump<S>(stream: S) -> PyResult<Channel>
where
    S: Stream<Item = Value> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    let stop = Arc::new(Notify::new());
    let stopped = stop.clone();
    runtime()?.spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            let next = tokio::select! {
                next = stream.next() => next,
                () = tx.closed() => None,
                () = stopped.notified() => None,
            };
            let Some(item) = next else { break };
            if tx.send(item).await.is_err() {
                break;
            }
        }
    });
    Ok(Channel {
        shared: Arc::new(tokio::sync::Mutex::new(Reader {
            rx,
            stash: VecDeque::new(),
        })),
        stop,
    })
}

/// Blocking read of the next item with the GIL released; Ctrl-C raises `KeyboardInterrupt`.
fn next_blocking(py: Python<'_>, shared: &Shared) -> PyResult<Option<Py<PyAny>>> {
    let rt = runtime()?;
    loop {
        let shared = shared.clone();
        let got = py.detach(move || {
            rt.block_on(async move {
                tokio::time::timeout(SIGNAL_POLL, async { shared.lock().await.next().await }).await
            })
        });
        match got {
            Ok(Some(value)) => return convert::to_py(py, &value).map(Some),
            Ok(None) => return Ok(None),
            Err(_elapsed) => py.check_signals()?,
        }
    }
}

/// `__anext__`: a future on the running loop, resolved by a tokio task (see the module docs).
fn next_async(py: Python<'_>, shared: &Shared) -> PyResult<Py<PyAny>> {
    let event_loop = py.import("asyncio")?.call_method0("get_running_loop")?;
    let future = event_loop.call_method0("create_future")?;
    let (event_loop, fut) = (event_loop.unbind(), future.clone().unbind());
    let shared = shared.clone();
    runtime()?.spawn(async move {
        // Held until the hand-over is decided, so a put-back item stays ahead of later reads.
        let mut reader = shared.lock().await;
        let item = reader.next().await;
        let (reply_tx, reply_rx) = oneshot::channel();
        let handover = Handover {
            future: fut,
            item: Mutex::new(Some(item.clone())),
            reply: Mutex::new(Some(reply_tx)),
        };
        let scheduled = Python::attach(|py| {
            event_loop
                .bind(py)
                .call_method1("call_soon_threadsafe", (handover,))
                .is_ok()
        });
        // A dropped reply (the loop closed with the callback queued) counts as not taken.
        let taken = scheduled && reply_rx.await.unwrap_or(false);
        if !taken && let Some(v) = item {
            reader.stash.push_front(v);
        }
    });
    Ok(future.unbind())
}

/// The callback that resolves an `__anext__` future on the loop thread.
#[pyclass(module = "agent_runtime")]
struct Handover {
    future: Py<PyAny>,
    item: Mutex<Option<Option<Value>>>,
    reply: Mutex<Option<oneshot::Sender<bool>>>,
}

#[pymethods]
impl Handover {
    fn __call__(&self, py: Python<'_>) -> PyResult<()> {
        let future = self.future.bind(py);
        let taken = !future.call_method0("done")?.is_truthy()?;
        if taken {
            let item = self
                .item
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
                .flatten();
            match item {
                Some(v) => match convert::to_py(py, &v) {
                    Ok(obj) => future.call_method1("set_result", (obj,))?,
                    Err(e) => future.call_method1("set_exception", (e.into_value(py),))?,
                },
                None => future.call_method1(
                    "set_exception",
                    (PyStopAsyncIteration::new_err(()).into_value(py),),
                )?,
            };
        }
        if let Some(reply) = self.reply.lock().unwrap_or_else(PoisonError::into_inner).take() {
            let _ = reply.send(taken);
        }
        Ok(())
    }
}

/// The `#[pymethods]` of a class that reads a [`Channel`] in its `channel` field: `for` and
/// `async for` (both read the one channel, in order), `close` with its docstring, then the
/// class's own methods. One block, since a class has one `#[pymethods]` impl.
macro_rules! channel_methods {
    ($class:ty, $close_doc:literal, { $($own:tt)* }) => {
        #[pymethods]
        impl $class {
            fn __iter__(slf: Py<Self>) -> Py<Self> {
                slf
            }

            fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
                next_blocking(py, &self.channel.shared)
            }

            fn __aiter__(slf: Py<Self>) -> Py<Self> {
                slf
            }

            fn __anext__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
                next_async(py, &self.channel.shared)
            }

            #[doc = $close_doc]
            fn close(&self) {
                self.channel.stop.notify_one();
            }

            $($own)*
        }
    };
}

/// The events of a turn (or a replay) as dicts shaped like the SSE `data` JSON of API.md §4.
///
/// Iterate with `for event in stream` (blocks, GIL released, Ctrl-C interrupts) or
/// `async for event in stream` (under asyncio). Both read the same events in order; each event
/// is delivered once. The stream ends after the `done` event. Dropping it never cancels the turn.
#[pyclass(module = "agent_runtime", frozen)]
pub struct EventStream {
    channel: Channel,
}

impl EventStream {
    /// Wraps a core event stream.
    pub fn new(stream: agent_runtime_core::orchestrator::EventStream) -> PyResult<Self> {
        let values = stream.map(|event| {
            serde_json::to_value(&event).unwrap_or_else(
                |e| serde_json::json!({"type": "error", "code": "INTERNAL", "message": e.to_string()}),
            )
        });
        Ok(EventStream {
            channel: pump(values)?,
        })
    }
}

channel_methods!(
    EventStream,
    "Stops reading: iteration ends after what is already buffered. The turn goes on.",
    {
        /// Reads the stream to its end and returns every event as a list.
        fn collect(&self, py: Python<'_>) -> PyResult<Vec<Py<PyAny>>> {
            let mut out = Vec::new();
            while let Some(event) = next_blocking(py, &self.channel.shared)? {
                out.push(event);
            }
            Ok(out)
        }
    }
);

/// A subscription to the runtime's EventBus: dicts `{"kind", "session_id", "at", "data"}`
/// (`kind` such as `approval.requested`, `turn.completed`). A subscriber that fell behind gets
/// one `{"kind": "lagged", "missed": n}`. Never ends on its own while the runtime lives: stop
/// iterating (or `close()`) when done.
#[pyclass(module = "agent_runtime", frozen)]
pub struct Subscription {
    channel: Channel,
}

impl Subscription {
    /// Wraps a core subscription.
    pub fn new(sub: agent_runtime_core::events::Subscription) -> PyResult<Self> {
        use agent_runtime_core::events::BusError;
        let values = futures::stream::unfold(sub, |mut sub| async move {
            let value = match sub.recv().await {
                Ok(event) => serde_json::to_value(&event).ok()?,
                Err(BusError::Lagged(n)) => serde_json::json!({"kind": "lagged", "missed": n}),
                Err(BusError::Closed) => return None,
            };
            Some((value, sub))
        });
        Ok(Subscription {
            channel: pump(values)?,
        })
    }
}

channel_methods!(
    Subscription,
    "Stops the subscription; iteration ends after what is already buffered.",
    {
        /// The next event, or `None` if none arrives within `timeout` seconds.
        #[pyo3(signature = (timeout=None))]
        fn next(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Py<PyAny>>> {
            let Some(secs) = timeout else {
                return next_blocking(py, &self.channel.shared);
            };
            let deadline = std::time::Instant::now() + Duration::from_secs_f64(secs.max(0.0));
            let rt = runtime()?;
            loop {
                let wait = deadline
                    .saturating_duration_since(std::time::Instant::now())
                    .min(SIGNAL_POLL);
                let shared = self.channel.shared.clone();
                let got = py.detach(move || {
                    rt.block_on(async move {
                        tokio::time::timeout(wait, async { shared.lock().await.next().await }).await
                    })
                });
                match got {
                    Ok(Some(value)) => return convert::to_py(py, &value).map(Some),
                    Ok(None) => return Ok(None),
                    Err(_elapsed) if std::time::Instant::now() >= deadline => return Ok(None),
                    Err(_elapsed) => py.check_signals()?,
                }
            }
        }
    }
);
