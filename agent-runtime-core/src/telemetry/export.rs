//! The export side of telemetry: OTLP/HTTP exporters behind a bounded queue drained by one
//! encoding thread and two POSTing ones, so a collector that is down or hangs costs a turn nothing
//! but a counted drop, and a healthy one gets every span.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanProcessor};

use super::otlp::TraceExporter;

/// Export requests POSTed at once: while one waits for the collector's answer the next is sent,
/// so the collector's latency does not bound the spans exported per second.
const IN_FLIGHT: usize = 2;

/// The spans each of the queue's two vectors is allocated for: the queue's bound, up to 4,096
/// (a larger queue's vectors grow past that as they fill).
fn preallocated(max_queue: usize) -> usize {
    max_queue.min(4096)
}

/// What the export thread is asked to do besides exporting what is queued.
enum Job {
    /// Export what is queued, then answer.
    Flush(SyncSender<()>),
    /// Export what is queued, answer, and stop.
    Stop(SyncSender<()>),
}

/// A span processor with a bounded queue: `on_end` never waits (a full queue drops the span and
/// counts it), one thread exports batches; spans of a failed or timed-out export are counted too.
/// The queue is a vector behind a mutex that the thread swaps for an empty one of the same
/// capacity (the queue's bound): a span is moved once into it, with no allocation of its own. The thread is woken only when a batch is full,
/// for a flush, or by its schedule: never per span. It encodes each batch and hands the body to
/// one of [`IN_FLIGHT`] POSTing threads, so it is back at the queue while the collector answers.
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
    pub(super) fn start(
        exporter: TraceExporter,
        batching: Batching,
        dropped: Arc<AtomicU64>,
    ) -> std::io::Result<Self> {
        let (jobs, asked) = sync_channel(1);
        // Both vectors the queue alternates between hold a full queue (up to `preallocated`): a
        // span pushed is not the one that grows (and copies) them.
        let queue = Arc::new(Mutex::new(Vec::with_capacity(preallocated(batching.max_queue))));
        let (drained, counted) = (queue.clone(), dropped.clone());
        // A batch larger than the queue could never fill (the SDK's processor clamps it too).
        let batching = Batching {
            max_batch: batching.max_batch.min(batching.max_queue),
            ..batching
        };
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

/// An encoded export request and the spans it carries (counted as dropped if it fails).
struct Body {
    bytes: bytes::Bytes,
    spans: u64,
}

/// Export requests handed to the POSTing threads and not yet answered, and the signal that the
/// count fell.
type InFlight = Arc<(Mutex<usize>, std::sync::Condvar)>;

/// Starts the POSTing threads; they stop when the returned sender is dropped.
fn start_posters(
    exporter: &Arc<TraceExporter>,
    dropped: &Arc<AtomicU64>,
    in_flight: &InFlight,
) -> SyncSender<Body> {
    // A rendezvous: a body is handed over only to a poster that is free, so at most IN_FLIGHT
    // requests (and one encoded body) wait on the collector; the rest waits in the bounded queue.
    let (bodies, taken) = sync_channel::<Body>(0);
    let taken = Arc::new(Mutex::new(taken));
    for i in 0..IN_FLIGHT {
        let (exporter, dropped, in_flight, taken) = (
            exporter.clone(),
            dropped.clone(),
            in_flight.clone(),
            taken.clone(),
        );
        let started = std::thread::Builder::new()
            .name(format!("otel-post-{i}"))
            .spawn(move || {
                loop {
                    let next = taken.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok(body) = next else { return };
                    if let Err(e) = exporter.post(body.bytes) {
                        dropped.fetch_add(body.spans, Ordering::Relaxed);
                        tracing::debug!(error = %e, spans = body.spans, "OTLP span export failed; spans dropped");
                    }
                    let (count, fell) = &*in_flight;
                    *count.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
                    fell.notify_all();
                }
            });
        if let Err(e) = started {
            // One poster fewer only slows the export; none at all is caught by the send below.
            tracing::warn!(error = %e, "could not start an OTLP export thread");
        }
    }
    bodies
}

/// Sleeps until woken or the schedule is due, then exports everything queued, in batches.
fn export_loop(
    exporter: TraceExporter,
    queue: Arc<Mutex<Vec<SpanData>>>,
    jobs: Receiver<Job>,
    batching: Batching,
    dropped: Arc<AtomicU64>,
) {
    let exporter = Arc::new(exporter);
    let in_flight: InFlight = Arc::new((Mutex::new(0), std::sync::Condvar::new()));
    let bodies = start_posters(&exporter, &dropped, &in_flight);
    // The queue is swapped with `taken` (empty, sized for a full queue), which becomes the next
    // queue; each batch is encoded, dropped, and its body handed to a poster.
    let max_batch = batching.max_batch;
    let mut taken: Vec<SpanData> = Vec::with_capacity(preallocated(batching.max_queue));
    let drain = |taken: &mut Vec<SpanData>| {
        let mut queued = queue.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::swap(&mut *queued, taken);
        drop(queued);
        let mut start = 0;
        while start < taken.len() {
            let end = (start + max_batch).min(taken.len());
            let body = Body {
                bytes: exporter.encode(&taken[start..end]).into(),
                spans: (end - start) as u64,
            };
            *in_flight.0.lock().unwrap_or_else(|e| e.into_inner()) += 1;
            if let Err(lost) = bodies.send(body) {
                *in_flight.0.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
                dropped.fetch_add(lost.0.spans, Ordering::Relaxed);
            }
            start = end;
        }
        taken.clear();
    };
    // Waits until every body handed over has been answered (a flush's promise).
    let settle = || {
        let (count, fell) = &*in_flight;
        let mut n = count.lock().unwrap_or_else(|e| e.into_inner());
        while *n > 0 {
            n = fell.wait(n).unwrap_or_else(|e| e.into_inner());
        }
    };
    loop {
        let deadline = Instant::now() + batching.delay;
        drain(&mut taken);
        match jobs.try_recv() {
            Ok(Job::Flush(done)) => {
                drain(&mut taken);
                settle();
                let _ = done.send(());
                continue;
            }
            Ok(Job::Stop(done)) => {
                drain(&mut taken);
                settle();
                let _ = done.send(());
                return;
            }
            Err(TryRecvError::Empty) => {}
            Err(TryRecvError::Disconnected) => {
                drain(&mut taken);
                settle();
                return;
            }
        }
        // Woken early by a full batch or a flush; spurious wake-ups just drain sooner.
        std::thread::park_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::otlp::Target;
    use opentelemetry::trace::{Tracer as _, TracerProvider as _};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use prost::Message as _;
    use std::io::{BufRead, BufReader, Read, Write};

    /// What the receiver saw: spans per export request, in arrival order.
    type Received = Arc<Mutex<Vec<usize>>>;

    /// A real OTLP/HTTP receiver on loopback: decodes every request and counts its spans, then
    /// answers 200 after `latency` (a collector some milliseconds away). Keep-alive, a thread per
    /// connection.
    fn receiver(latency: Duration) -> (String, Received) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let received: Received = Arc::default();
        let seen = received.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let mut answer = conn.try_clone().unwrap();
                    let mut reader = BufReader::new(conn);
                    loop {
                        let mut length = 0;
                        loop {
                            let mut line = String::new();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            let line = line.trim_end().to_ascii_lowercase();
                            if line.is_empty() {
                                break;
                            }
                            if let Some(v) = line.strip_prefix("content-length:") {
                                length = v.trim().parse().unwrap();
                            }
                        }
                        let mut body = vec![0; length];
                        reader.read_exact(&mut body).unwrap();
                        let request = ExportTraceServiceRequest::decode(&body[..]).unwrap();
                        let spans = request
                            .resource_spans
                            .iter()
                            .flat_map(|r| &r.scope_spans)
                            .map(|s| s.spans.len())
                            .sum();
                        std::thread::sleep(latency);
                        seen.lock().unwrap().push(spans);
                        answer
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                            .unwrap();
                    }
                });
            }
        });
        (url, received)
    }

    #[test]
    fn a_collector_with_latency_receives_every_span_of_a_burst_and_none_is_dropped() {
        let (url, received) = receiver(Duration::from_millis(40));
        let mut exporter = TraceExporter::new(Target {
            url,
            headers: Vec::new(),
            timeout: Duration::from_secs(10),
        });
        opentelemetry_sdk::trace::SpanExporter::set_resource(
            &mut exporter,
            &opentelemetry_sdk::Resource::builder().build(),
        );
        let dropped = Arc::new(AtomicU64::new(0));
        let batching = Batching {
            max_queue: 2048,
            max_batch: 512,
            // Never due within the test: only full batches and the flush export.
            delay: Duration::from_secs(600),
        };
        let processor = QueueProcessor::start(exporter, batching, dropped.clone()).unwrap();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .build();
        let tracer = provider.tracer("burst");
        // Three bursts of a full queue each, a flush after each: the flush answers only when
        // both POSTing threads' requests have been answered.
        let made = 3 * 2048;
        for round in 0..3 {
            for i in 0..2048 {
                tracer.in_span(format!("span {round}.{i}"), |_| {});
            }
            provider.force_flush().unwrap();
            assert_eq!(
                received.lock().unwrap().iter().sum::<usize>(),
                (round + 1) * 2048,
                "received after flush {round}"
            );
        }
        let batches = received.lock().unwrap().clone();
        assert_eq!(
            (batches.iter().sum::<usize>(), dropped.load(Ordering::Relaxed)),
            (made, 0),
            "spans received and dropped, batches {batches:?}"
        );
        assert!(
            batches.iter().all(|&n| n <= 512),
            "a batch over 512 spans: {batches:?}"
        );
        provider.shutdown().unwrap();
    }
}
