//! The export side of telemetry: OTLP/HTTP exporters behind a bounded queue drained by one
//! thread, so a collector that is down or hangs costs a turn nothing but a counted drop.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};

/// What the export thread is asked to do.
enum Job {
    Span(Box<SpanData>),
    /// Export what is queued, then answer.
    Flush(SyncSender<()>),
    /// Export what is queued, answer, and stop.
    Stop(SyncSender<()>),
}

/// A span processor with a bounded queue: `on_end` never waits (a full queue drops the span and
/// counts it), one thread exports batches; spans of a failed or timed-out export are counted too.
/// The thread is woken only when a batch is full, for a flush, or by its schedule: never per span.
#[derive(Debug)]
pub(super) struct QueueProcessor {
    queue: SyncSender<Job>,
    dropped: Arc<AtomicU64>,
    /// Spans queued since the export thread last drained the queue.
    queued: Arc<AtomicUsize>,
    max_batch: usize,
    worker: std::thread::Thread,
}

/// How the export thread batches.
pub(super) struct Batching {
    pub max_queue: usize,
    pub max_batch: usize,
    pub delay: Duration,
}

impl QueueProcessor {
    /// Starts the export thread; `dropped` counts every span that was not delivered.
    pub(super) fn start<E: SpanExporter + 'static>(
        exporter: E,
        batching: Batching,
        dropped: Arc<AtomicU64>,
    ) -> std::io::Result<Self> {
        let (queue, jobs) = sync_channel(batching.max_queue);
        let counted = dropped.clone();
        let queued = Arc::new(AtomicUsize::new(0));
        let drained = queued.clone();
        let max_batch = batching.max_batch;
        let worker = std::thread::Builder::new()
            .name("otel-export".into())
            .spawn(move || export_loop(exporter, jobs, batching, counted, drained))?
            .thread()
            .clone();
        Ok(QueueProcessor {
            queue,
            dropped,
            queued,
            max_batch,
            worker,
        })
    }

    fn ask(&self, make: impl FnOnce(SyncSender<()>) -> Job, timeout: Duration) -> OTelSdkResult {
        let (done, answered) = sync_channel(1);
        // A full queue is waited for here only: flush and shutdown are not on a turn's path.
        self.queue
            .send(make(done))
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
        self.worker.unpark();
        answered
            .recv_timeout(timeout)
            .map_err(|_| OTelSdkError::Timeout(timeout))
    }
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        match self.queue.try_send(Job::Span(Box::new(span))) {
            Ok(()) => {
                if self.queued.fetch_add(1, Ordering::Relaxed) + 1 == self.max_batch {
                    self.worker.unpark();
                }
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.ask(Job::Flush, Duration::from_secs(30))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.ask(Job::Stop, timeout)
    }
}

/// Sleeps until woken or the schedule is due, then exports everything queued, in batches.
fn export_loop<E: SpanExporter>(
    exporter: E,
    jobs: Receiver<Job>,
    batching: Batching,
    dropped: Arc<AtomicU64>,
    queued: Arc<AtomicUsize>,
) {
    let mut batch: Vec<SpanData> = Vec::with_capacity(batching.max_batch);
    let send = |batch: &mut Vec<SpanData>| {
        if batch.is_empty() {
            return;
        }
        let spans = std::mem::take(batch);
        let n = spans.len() as u64;
        if let Err(e) = futures::executor::block_on(exporter.export(spans)) {
            dropped.fetch_add(n, Ordering::Relaxed);
            tracing::debug!(error = %e, spans = n, "OTLP span export failed; spans dropped");
        }
    };
    loop {
        let deadline = Instant::now() + batching.delay;
        loop {
            match jobs.try_recv() {
                Ok(Job::Span(span)) => {
                    queued.fetch_sub(1, Ordering::Relaxed);
                    batch.push(*span);
                    if batch.len() >= batching.max_batch {
                        send(&mut batch);
                    }
                }
                Ok(Job::Flush(done)) => {
                    send(&mut batch);
                    let _ = done.send(());
                }
                Ok(Job::Stop(done)) => {
                    send(&mut batch);
                    let _ = exporter.shutdown();
                    let _ = done.send(());
                    return;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    send(&mut batch);
                    return;
                }
            }
        }
        send(&mut batch);
        // Woken early by a full batch or a flush; spurious wake-ups just drain sooner.
        std::thread::park_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}
