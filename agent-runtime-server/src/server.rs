//! Start-up and shutdown: build the runtime (storage open, interrupted turns taken over), only
//! then say `listening on`; serve HTTP/1 and HTTP/2 until SIGTERM or SIGINT, then drain.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use agent_runtime_core::orchestrator::Orchestrator;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::app::App;
use crate::config::ServerConfig;
use crate::metrics::{MeteredBackend, Metrics};

/// How long open connections get to finish once turns were handed over and streams ended (at
/// most; never past the drain timeout, but at least `FLUSH`).
const DRAIN: Duration = Duration::from_secs(3);

/// The least time open connections get to flush their last bytes.
const FLUSH: Duration = Duration::from_millis(200);

/// Builds the runtime the configuration describes and makes it ready to serve (storage open,
/// migrations applied, interrupted turns closed). Errors are for the operator: the setting at
/// fault, the cause and the fix.
pub async fn runtime(config: &ServerConfig, metrics: &Arc<Metrics>) -> Result<Orchestrator, String> {
    let metrics = metrics.clone();
    Orchestrator::from_config(config.runtime.clone())
        .await
        .map_err(|e| e.operator_message())?
        .wrap_llm(|llm| Arc::new(MeteredBackend::new(llm, metrics)))
        .start()
        .await
        .map_err(|e| e.operator_message())
}

/// Serves until a shutdown signal. Prints `listening on ADDR` as the first line of stdout once
/// the server can serve, never before a failing start-up.
pub async fn run(config: ServerConfig) -> Result<(), String> {
    // Bind first: a taken port stops start-up before anything touches the database.
    let listener = TcpListener::bind(config.addr)
        .await
        .map_err(|e| format!("HOST/PORT: cannot listen on {}: {e}", config.addr))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let ready = Ready::new(config).await?;
    // Tests and scripts read the bound address (PORT=0 picks a free port) from this line.
    let mut out = std::io::stdout();
    let _ = writeln!(out, "listening on {addr}");
    let _ = out.flush();
    serve_ready(ready, listener, shutdown_signal()).await
}

/// Serves on an already bound `listener` until `stop` completes (its value names the reason in
/// the log), then drains ([`Orchestrator::drain`]): running turns are handed over at their next
/// step boundary, streams end, connections close.
/// Embedders (the Python module, examples) use this to pick the address and the stop themselves.
pub async fn serve(
    config: ServerConfig,
    listener: TcpListener,
    stop: impl std::future::Future<Output = &'static str>,
) -> Result<(), String> {
    serve_ready(Ready::new(config).await?, listener, stop).await
}

/// A server whose runtime is ready: what is left is accepting connections.
struct Ready {
    config: ServerConfig,
    rt: Orchestrator,
    metrics: Arc<Metrics>,
}

impl Ready {
    async fn new(config: ServerConfig) -> Result<Ready, String> {
        let metrics = Arc::new(Metrics::default());
        let rt = runtime(&config, &metrics).await?;
        metrics.follow_bus(&rt);
        Ok(Ready { config, rt, metrics })
    }
}

/// Serves the ready runtime on `listener` until `stop`, then shuts down gracefully.
async fn serve_ready(
    ready: Ready,
    listener: TcpListener,
    stop: impl std::future::Future<Output = &'static str>,
) -> Result<(), String> {
    let Ready { config, rt, metrics } = ready;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(%addr, storage = rt.storage().backend(), auth = config.internal_api_key.is_some(), "serving");
    let app = Arc::new(App {
        rt: rt.clone(),
        token: config.internal_api_key.clone(),
        max_request_bytes: config.max_request_bytes,
        keep_alive: config.keep_alive,
        request_timeout: config.request_timeout,
        metrics,
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A client that trickles its request head in gets a bounded time, then the connection closes.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.request_timeout);
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((socket, _peer)) = accepted else { continue };
                let _ = socket.set_nodelay(true);
                let app = app.clone();
                // Boxed: hyper keeps a connection's request future in a box of the future's own
                // size (about 14 KB, every route's state) for the connection's whole life, an SSE
                // stream's included; boxed here, that box is a pointer and the request's state is
                // freed as soon as its response head is ready.
                let service = service_fn(move |req| Box::pin(app.clone().handle(req)));
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(socket), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            signal = &mut stop => {
                tracing::info!(signal, "shutting down: no new connections");
                break;
            }
        }
    }
    drop(listener);
    let started = std::time::Instant::now();
    // New turns get 503 SHUTTING_DOWN; running ones reach a step boundary and are handed over
    // (another replica, or this process restarted, resumes them); streams end without `done`...
    let report = rt.drain(config.drain_timeout).await;
    if report.still_running > 0 {
        tracing::warn!(
            handed_over = report.handed_over,
            still_running = report.still_running,
            "DRAIN_TIMEOUT_SECS passed with turns still running; they are resumed elsewhere once this process exits"
        );
    } else {
        tracing::info!(handed_over = report.handed_over, "turns handed over");
    }
    // ...then open connections get a short while to flush.
    let left = config.drain_timeout.saturating_sub(started.elapsed());
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(left.clamp(FLUSH, DRAIN)) => tracing::warn!("closing connections still open"),
    }
    // Spans still queued go out now (bounded by the export timeout), off the async threads.
    if let Some(t) = rt.telemetry().cloned() {
        let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
    }
    drop(app);
    drop(rt);
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            },
            _ => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}
