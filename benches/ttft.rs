//! Time to first token: straight from the model server vs. through the runtime (the
//! `Orchestrator` in process with the real `OpenAiBackend`, SQLite storage), same prompt, p50 of N.
//!
//! Needs the real model server (`examples/real-model/model-server.sh setup`). Uses the server at
//! `AGENT_RUNTIME_MODEL_URL` if set, else starts one with the script and stops it at the end.
//! `cargo run --release -p agent-runtime-benches --bin ttft [-- RUNS]` (default 20 runs).

use std::error::Error;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_runtime_core::agent::{AgentDefinition, AgentRegistry, PathRule};
use agent_runtime_core::config::RuntimeConfig;
use agent_runtime_core::llm::wire::request_body;
use agent_runtime_core::llm::{
    Capabilities, ChatMessage, ChatRequest, Chunk, ChunkStream, LlmBackend, OpenAiBackend, OpenAiConfig,
};
use agent_runtime_core::orchestrator::{CreateSession, Orchestrator, Submission};
use agent_runtime_core::protocol::{AssistantMessage, EventPayload};
use agent_runtime_core::storage;
use agent_runtime_core::test_kit::SseReader;
use futures::StreamExt;
use serde_json::Value;

type BoxResult<T> = Result<T, Box<dyn Error>>;

const MODEL: &str = "smollm2-135m-instruct";
const SYSTEM: &str = "You are a helpful assistant. Answer in one short sentence.";
const USER: &str = "Name a colour of the sky.";
/// Generated tokens per run: the first one is what is measured; a short answer keeps runs quick.
const MAX_TOKENS: u32 = 8;

/// The model server for the run; stopped on drop when this program started it.
struct Server {
    url: String,
    script: Option<std::path::PathBuf>,
}

impl Server {
    fn get() -> BoxResult<Server> {
        if let Ok(url) = std::env::var("AGENT_RUNTIME_MODEL_URL") {
            return Ok(Server { url, script: None });
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/real-model/model-server.sh");
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let out = Command::new("bash")
            .arg(&script)
            .args(["start", &port.to_string()])
            .output()?;
        if !out.status.success() {
            return Err(format!(
                "model-server.sh start failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .into());
        }
        Ok(Server {
            url: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            script: Some(script),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(script) = &self.script {
            let _ = Command::new("bash").arg(script).arg("stop").output();
        }
    }
}

/// The request both paths make: what the runtime sends for the bench agent's first call.
fn request() -> ChatRequest {
    ChatRequest::new(vec![ChatMessage::system(SYSTEM), ChatMessage::user(USER)])
        .with_temperature(0.0)
        .with_max_tokens(MAX_TOKENS)
}

/// POSTs the request with reqwest and returns the time until the first non-empty content delta;
/// reads the rest of the answer before returning.
async fn direct(client: &reqwest::Client, url: &str) -> BoxResult<Duration> {
    // include_usage as the backend sends it on its first call (the server ignores it).
    let body = request_body(MODEL, &request(), true);
    let started = Instant::now();
    let response = client
        .post(format!("{url}/chat/completions"))
        .json(&body)
        .send()
        .await?
        .error_for_status()?;
    let mut reader = SseReader::new(response);
    let mut first = None;
    while let Some(event) = reader.next().await? {
        if first.is_none() && event.data != "[DONE]" {
            let v: Value = serde_json::from_str(&event.data)?;
            let text = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
            if !text.is_empty() {
                first = Some(started.elapsed());
            }
        }
    }
    first.ok_or_else(|| "the server streamed no content".into())
}

/// Submits the same prompt to the runtime and returns the time until the first `token` event, and
/// the runtime's own share of it: submit → request sent to the backend, plus first chunk out of
/// the backend → `token` event in hand (the model's time in between left out). Reads the turn to
/// its end before returning.
async fn runtime(rt: &Orchestrator, stamps: &Stamps) -> BoxResult<(Duration, Duration)> {
    let session = rt.create_session(CreateSession::default()).await?;
    stamps.reset();
    let started = Instant::now();
    let mut events = rt.submit(&session.id, Submission::user(USER)).await?;
    let mut first = None;
    while let Some(e) = events.next().await {
        if first.is_none()
            && let EventPayload::AssistantMessage(AssistantMessage::Token { .. }) = e.payload
        {
            first = Some(Instant::now());
        }
    }
    let first = first.ok_or("the runtime streamed no token")?;
    let (requested, chunk) = stamps.get().ok_or("the backend saw no text chunk")?;
    let own = (requested - started) + (first - chunk);
    Ok((first - started, own))
}

/// The bench agent: the same system prompt, no tools, so the runtime's request is the direct one.
fn bench_runtime(
    url: &str,
    db: &Path,
    stamps: Stamps,
) -> BoxResult<impl Future<Output = BoxResult<Orchestrator>>> {
    let backend = OpenAiBackend::new(OpenAiConfig {
        base_url: url.to_string(),
        model: MODEL.into(),
        capabilities: Capabilities::llama_cpp_python(),
        ..OpenAiConfig::default()
    })?;
    let db_url = format!("sqlite://{}", db.join("ttft.db").display());
    Ok(async move {
        let mut agents = AgentRegistry::empty();
        agents.insert(AgentDefinition {
            agent_type: "bench".into(),
            name: "Bench".into(),
            description: "TTFT bench agent".into(),
            emoji: "⏱".into(),
            tools: vec![],
            restrictions: vec![],
            path_rule: PathRule::ReadOnly,
            system_prompt: SYSTEM.into(),
        });
        let store = storage::open(&db_url).await?;
        let rt = Orchestrator::builder(store, Arc::new(Capped(backend, stamps)))
            .agents(agents)
            .config(RuntimeConfig {
                default_agent: "bench".into(),
                auto_agent_switching: false,
                temperature: Some(0.0),
                ..RuntimeConfig::default()
            })
            .build()?;
        Ok(rt)
    })
}

/// When the backend was asked, and when its first text chunk came out (one run at a time).
#[derive(Debug, Clone, Default)]
struct Stamps(Arc<Mutex<(Option<Instant>, Option<Instant>)>>);

impl Stamps {
    fn reset(&self) {
        if let Ok(mut s) = self.0.lock() {
            *s = (None, None);
        }
    }

    fn requested(&self) {
        if let Ok(mut s) = self.0.lock() {
            s.0.get_or_insert_with(Instant::now);
        }
    }

    fn chunk(&self) {
        if let Ok(mut s) = self.0.lock() {
            s.1.get_or_insert_with(Instant::now);
        }
    }

    fn get(&self) -> Option<(Instant, Instant)> {
        let s = self.0.lock().ok()?;
        Some((s.0?, s.1?))
    }
}

/// The real backend with the bench's token cap (as the direct request has it), stamping when it
/// was asked and when its first text chunk came out.
#[derive(Debug)]
struct Capped(OpenAiBackend, Stamps);

#[async_trait::async_trait]
impl LlmBackend for Capped {
    async fn stream(&self, mut request: ChatRequest) -> agent_runtime_core::Result<ChunkStream> {
        request.max_tokens.get_or_insert(MAX_TOKENS);
        self.1.requested();
        let stamps = self.1.clone();
        let stream = self.0.stream(request).await?;
        Ok(Box::pin(stream.inspect(move |c| {
            if let Ok(Chunk::Text(t)) = c
                && !t.is_empty()
            {
                stamps.chunk();
            }
        })))
    }

    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> BoxResult<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(20);
    if runs == 0 {
        return Err("RUNS must be at least 1".into());
    }
    let server = Server::get()?;
    let db = tempfile::tempdir()?;
    let stamps = Stamps::default();
    let rt = bench_runtime(&server.url, db.path(), stamps.clone())?.await?;
    let client = reqwest::Client::new();

    // Warm-up: load the prompt into the server's cache, open connections, build the tokenizer.
    direct(&client, &server.url).await?;
    runtime(&rt, &stamps).await?;

    let mut d = Vec::with_capacity(runs);
    let mut r = Vec::with_capacity(runs);
    let mut own = Vec::with_capacity(runs);
    for _ in 0..runs {
        // Interleaved, so drift (other work on the machine) hits both alike.
        d.push(direct(&client, &server.url).await?);
        let (ttft, mine) = runtime(&rt, &stamps).await?;
        r.push(ttft);
        own.push(mine);
    }
    d.sort();
    r.sort();
    own.sort();

    println!("time to first token, {runs} runs each, same prompt (SmolLM2-135M-Instruct, llama-cpp-python)");
    println!("| path | p50 ms | p90 ms | min ms | max ms |");
    println!("|---|---|---|---|---|");
    for (name, v) in [
        ("model server, direct (reqwest)", &d),
        ("through the runtime (Orchestrator + OpenAiBackend + SQLite)", &r),
        ("the runtime's own share of it", &own),
    ] {
        println!(
            "| {name} | {} | {} | {} | {} |",
            ms(percentile(v, 0.5)),
            ms(percentile(v, 0.9)),
            ms(v[0]),
            ms(v[v.len() - 1])
        );
    }
    println!(
        "p50(runtime) - p50(direct) = {:.2} ms",
        (percentile(&r, 0.5).as_secs_f64() - percentile(&d, 0.5).as_secs_f64()) * 1000.0
    );
    drop(server);
    Ok(())
}
