//! The export side of telemetry: OTLP/HTTP exporters behind a bounded queue drained by one
//! thread, so a collector that is down or hangs costs a turn nothing but a counted drop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};

/// What the export thread is asked to do besides exporting what is queued.
enum Job {
    /// Export what is queued, then answer.
    Flush(SyncSender<()>),
    /// Export what is queued, answer, and stop.
    Stop(SyncSender<()>),
}

/// A span processor with a bounded queue: `on_end` never waits (a full queue drops the span and
/// counts it), one thread exports batches; spans of a failed or timed-out export are counted too.
/// The queue is a vector behind a mutex that the thread swaps for an empty one: a span is moved
/// once into it, with no allocation of its own. The thread is woken only when a batch is full,
/// for a flush, or by its schedule: never per span.
#[derive(Debug)]
pub(super) struct QueueProcessor {
    queue: Arc<Mutex<Vec<SpanData>>>,
    jobs: SyncSender<Job>,
    dropped: Arc<AtomicU64>,
    max_queue: usize,
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
        let (jobs, asked) = sync_channel(1);
        let queue = Arc::new(Mutex::new(Vec::with_capacity(batching.max_batch)));
        let (drained, counted) = (queue.clone(), dropped.clone());
        let (max_queue, max_batch) = (batching.max_queue, batching.max_batch);
        let worker = std::thread::Builder::new()
            .name("otel-export".into())
            .spawn(move || export_loop(exporter, drained, asked, batching, counted))?
            .thread()
            .clone();
        Ok(QueueProcessor {
            queue,
            jobs,
            dropped,
            max_queue,
            max_batch,
            worker,
        })
    }

    fn ask(&self, make: impl FnOnce(SyncSender<()>) -> Job, timeout: Duration) -> OTelSdkResult {
        let (done, answered) = sync_channel(1);
        // Waited for here only: flush and shutdown are not on a turn's path.
        self.jobs
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
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.len() >= self.max_queue {
            drop(queue);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        queue.push(span);
        let full = queue.len() == self.max_batch;
        drop(queue);
        if full {
            self.worker.unpark();
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
    queue: Arc<Mutex<Vec<SpanData>>>,
    jobs: Receiver<Job>,
    batching: Batching,
    dropped: Arc<AtomicU64>,
) {
    // The queue is swapped with `taken` (empty, sized for a batch), which becomes the next
    // queue; the exporter consumes each batch's vector.
    let max_batch = batching.max_batch;
    let mut taken: Vec<SpanData> = Vec::with_capacity(max_batch);
    let drain = |taken: &mut Vec<SpanData>| {
        let mut queued = queue.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::swap(&mut *queued, taken);
        drop(queued);
        while !taken.is_empty() {
            let mut spans = std::mem::replace(taken, Vec::with_capacity(max_batch));
            if spans.len() > max_batch {
                *taken = spans.split_off(max_batch);
            }
            let count = spans.len() as u64;
            if let Err(e) = futures::executor::block_on(exporter.export(spans)) {
                dropped.fetch_add(count, Ordering::Relaxed);
                tracing::debug!(error = %e, spans = count, "OTLP span export failed; spans dropped");
            }
        }
    };
    loop {
        let deadline = Instant::now() + batching.delay;
        drain(&mut taken);
        match jobs.try_recv() {
            Ok(Job::Flush(done)) => {
                drain(&mut taken);
                let _ = done.send(());
                continue;
            }
            Ok(Job::Stop(done)) => {
                drain(&mut taken);
                let _ = exporter.shutdown();
                let _ = done.send(());
                return;
            }
            Err(TryRecvError::Empty) => {}
            Err(TryRecvError::Disconnected) => {
                drain(&mut taken);
                return;
            }
        }
        // Woken early by a full batch or a flush; spurious wake-ups just drain sooner.
        std::thread::park_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}
