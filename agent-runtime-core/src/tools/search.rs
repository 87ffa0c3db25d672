//! `search_in_code`: a regex over the project's text files, honouring `.gitignore` like ripgrep.
//! The walk and every file it reads go through descriptors beneath the root ([`super::walk`]);
//! matching is the `regex` crate's, on bytes.

use std::io::Read;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use ignore::overrides::{Override, OverrideBuilder};
use regex::bytes::{Regex, RegexBuilder};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::beneath::describe;
use super::sandbox::{display_relative, project_root, resolve_in};
use super::walk::{Kind, walk};
use super::{Tool, ToolContext, ToolFailure, join_failure, parse_args, schema_of};
use crate::protocol::ToolSpec;

/// At most this many matching lines are returned by one search.
pub const MAX_SEARCH_MATCHES: usize = 200;
/// A matching line longer than this many characters is cut.
const MAX_LINE_CHARS: usize = 300;
/// Files larger than this are skipped (generated or data files, not code).
const MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;
/// Bound on the compiled regex, so a pathological pattern is refused instead of eating memory.
const REGEX_SIZE_LIMIT: usize = 10 * 1024 * 1024;

/// Arguments of `search_in_code`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SearchInCodeArgs {
    /// A regular expression (Rust regex syntax), matched against each line.
    query: String,
    /// A file or directory to search, relative to the project root; default the whole project.
    path: Option<String>,
    /// Only search files whose path matches this glob (e.g. `*.rs`, `src/**/*.ts`).
    glob: Option<String>,
}

/// `search_in_code`: matching lines as `file:line: text`.
pub(crate) struct SearchInCode;

struct Prepared {
    root: PathBuf,
    start: PathBuf,
    regex: Regex,
    glob: Option<Override>,
}

impl SearchInCode {
    fn prepare(ctx: &ToolContext, arguments: &Value) -> Result<Prepared, ToolFailure> {
        let args: SearchInCodeArgs = parse_args("search_in_code", arguments)?;
        if args.query.is_empty() {
            return Err(ToolFailure::Invalid(
                "search_in_code: `query` must not be empty".into(),
            ));
        }
        let regex = RegexBuilder::new(&args.query)
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| {
                ToolFailure::Invalid(format!("search_in_code: `query` is not a valid regex: {e}"))
            })?;
        let root = project_root(&ctx.project_root)?;
        let start = resolve_in(&root, args.path.as_deref().unwrap_or("."))?;
        let glob = match args.glob.as_deref() {
            None => None,
            Some(g) => {
                let invalid = |e: ignore::Error| {
                    ToolFailure::Invalid(format!("search_in_code: `glob` is not a valid glob: {e}"))
                };
                let mut b = OverrideBuilder::new(&root);
                b.add(g).map_err(invalid)?;
                Some(b.build().map_err(invalid)?)
            }
        };
        Ok(Prepared {
            root,
            start,
            regex,
            glob,
        })
    }
}

#[async_trait]
impl Tool for SearchInCode {
    fn has_side_effects(&self) -> bool {
        false
    }

    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "search_in_code".into(),
            description: format!(
                "Search the project's text files for a regular expression, skipping what .gitignore \
                 ignores. Answers with matching lines as 'file:line: text' (at most {MAX_SEARCH_MATCHES})."
            ),
            parameters: schema_of::<SearchInCodeArgs>(),
        }
    }

    fn check(&self, ctx: &ToolContext, arguments: &Value) -> Result<(), ToolFailure> {
        Self::prepare(ctx, arguments).map(|_| ())
    }

    fn touched_paths(&self, _arguments: &Value) -> Vec<String> {
        Vec::new()
    }

    #[tracing::instrument(name = "search_in_code", skip_all)]
    async fn run(&self, ctx: &ToolContext, arguments: Value) -> Result<Value, ToolFailure> {
        let prepared = Self::prepare(ctx, &arguments)?;
        let max_bytes = ctx.max_output_bytes;
        let cancel = ctx.cancel.clone();
        tokio::task::spawn_blocking(move || search(&prepared, max_bytes, &cancel))
            .await
            .map_err(|e| join_failure("search_in_code", e))?
    }
}

fn search(p: &Prepared, max_bytes: usize, cancel: &CancellationToken) -> Result<Value, ToolFailure> {
    let mut matches: Vec<String> = Vec::new();
    let mut bytes = 0usize;
    let mut cut = false;
    let mut cancelled = false;
    let walked = walk(&p.root, &p.start, None, &mut |entry| {
        if cancel.is_cancelled() {
            cancelled = true;
            return ControlFlow::Break(());
        }
        if entry.kind != Kind::File {
            return ControlFlow::Continue(());
        }
        let rel = display_relative(Path::new(""), &entry.rel);
        // The glob filters after the walk (not as a walker override), so it can never un-ignore a
        // file that .gitignore hides.
        if let Some(g) = &p.glob
            && !g.matched(Path::new(&rel), false).is_whitelist()
        {
            return ControlFlow::Continue(());
        }
        let Some(content) = entry.open_file().ok().and_then(read_text) else {
            return ControlFlow::Continue(());
        };
        for (i, line) in content.split(|&b| b == b'\n').enumerate() {
            if !p.regex.is_match(line) {
                continue;
            }
            if matches.len() == MAX_SEARCH_MATCHES || bytes >= max_bytes {
                cut = true;
                return ControlFlow::Break(());
            }
            let text = String::from_utf8_lossy(line.strip_suffix(b"\r").unwrap_or(line));
            let text = text.trim_end();
            let text = match text.char_indices().nth(MAX_LINE_CHARS) {
                Some((at, _)) => format!("{}…", &text[..at]),
                None => text.to_string(),
            };
            let m = format!("{rel}:{}: {text}", i + 1);
            bytes += m.len();
            matches.push(m);
        }
        ControlFlow::Continue(())
    });
    if let Err(e) = walked {
        let shown = display_relative(&p.root, &p.start);
        return Err(ToolFailure::Failed(if e.kind() == std::io::ErrorKind::NotFound {
            format!("no such file or directory: '{shown}'")
        } else {
            format!("cannot search '{shown}': {}", describe(&e))
        }));
    }
    if cancelled {
        return Err(ToolFailure::Failed("cancelled: the search was stopped".into()));
    }
    let mut result = json!({ "matches": matches });
    if cut {
        result["note"] =
            Value::String("more matches not shown; narrow the query, the path or the glob".to_string());
    }
    Ok(result)
}

/// The file's bytes, or `None` for what is not worth searching: unreadable, too large, or binary
/// (a NUL byte in its first 8 KiB, git's own heuristic).
fn read_text(file: std::fs::File) -> Option<Vec<u8>> {
    if file.metadata().ok()?.len() > MAX_FILE_BYTES {
        return None;
    }
    let mut content = Vec::new();
    file.take(MAX_FILE_BYTES).read_to_end(&mut content).ok()?;
    if content[..content.len().min(8192)].contains(&0) {
        return None;
    }
    Some(content)
}
