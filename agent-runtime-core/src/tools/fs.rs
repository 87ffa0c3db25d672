//! The file tools: `read_file`, `write_file`, `delete_file` and `list_files`, confined to the project
//! root by [`super::sandbox`]. Blocking file-system work runs on tokio's blocking pool.
//!
//! Reads, writes and deletes open the checked path relative to the root's descriptor with `openat2`
//! ([`super::beneath`]), so a directory swapped for a symlink after the check cannot redirect them.
//! `list_files` walks through descriptors the same way ([`super::walk`]), so it never lists a folder
//! outside the project either.

use std::io::{BufRead, BufReader, Read, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};

use super::beneath::{Beneath, describe};
use super::sandbox::{display_relative, project_root, resolve_for_write, resolve_in};
use super::walk::{Kind, walk};
use super::{Tool, ToolContext, ToolFailure, join_failure, parse_args, schema_of};
use crate::protocol::ToolSpec;

/// At most this many entries are listed by one `list_files` call.
pub const MAX_LIST_ENTRIES: usize = 1000;

/// Arguments of `read_file`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReadFileArgs {
    /// The file, relative to the project root.
    path: String,
    /// First line to return (1-based, inclusive); default 1.
    #[schemars(range(min = 1))]
    start_line: Option<u64>,
    /// Last line to return (1-based, inclusive); default the end of the file.
    #[schemars(range(min = 1))]
    end_line: Option<u64>,
}

/// `read_file`: the file's text, whole or a line range.
pub(crate) struct ReadFile;

impl ReadFile {
    fn prepare(
        ctx: &ToolContext,
        arguments: &Value,
    ) -> Result<(PathBuf, PathBuf, ReadFileArgs), ToolFailure> {
        let args: ReadFileArgs = parse_args("read_file", arguments)?;
        if args.start_line == Some(0) || args.end_line == Some(0) {
            return Err(ToolFailure::Invalid(
                "read_file: line numbers start at 1 (`start_line` and `end_line` must be at least 1)".into(),
            ));
        }
        if let (Some(s), Some(e)) = (args.start_line, args.end_line)
            && s > e
        {
            return Err(ToolFailure::Invalid(format!(
                "read_file: `start_line` ({s}) is after `end_line` ({e})"
            )));
        }
        let root = project_root(&ctx.project_root)?;
        let real = resolve_in(&root, &args.path)?;
        Ok((root, real, args))
    }
}

#[async_trait]
impl Tool for ReadFile {
    fn has_side_effects(&self) -> bool {
        false
    }

    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "read_file".into(),
            description: "Read a text file of the project, whole or a range of lines (1-based, inclusive). \
                          The answer starts with a header giving the lines shown and the file's line count."
                .into(),
            parameters: schema_of::<ReadFileArgs>(),
        }
    }

    fn check(&self, ctx: &ToolContext, arguments: &Value) -> Result<(), ToolFailure> {
        Self::prepare(ctx, arguments).map(|_| ())
    }

    fn touched_paths(&self, _arguments: &Value) -> Vec<String> {
        Vec::new()
    }

    #[tracing::instrument(name = "read_file", skip_all)]
    async fn run(&self, ctx: &ToolContext, arguments: Value) -> Result<Value, ToolFailure> {
        let (root, real, args) = Self::prepare(ctx, &arguments)?;
        let max = ctx.max_output_bytes;
        tokio::task::spawn_blocking(move || {
            let file = open_for_read(&root, &real, &args.path)?;
            read_lines(file, &args, max)
        })
        .await
        .map_err(|e| join_failure("read_file", e))?
    }
}

/// `real` (inside `root`) relative to it, as [`Beneath`] takes it.
fn relative<'a>(root: &Path, real: &'a Path) -> &'a Path {
    real.strip_prefix(root).unwrap_or(Path::new(""))
}

/// The regular file at `real` opened beneath `root`, or the failure that says why not (API.md §9.19).
fn open_for_read(root: &Path, real: &Path, shown: &str) -> Result<std::fs::File, ToolFailure> {
    let failed = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::NotFound => ToolFailure::Failed(format!("no such file: '{shown}'")),
        _ => ToolFailure::Failed(format!("cannot read '{shown}': {}", describe(&e))),
    };
    // Opened without blocking, so a FIFO or a device in the project cannot hang the tool; only a
    // regular file is read (O_NONBLOCK changes nothing for one).
    let file = Beneath::open(root)
        .and_then(|b| b.open_any(relative(root, real)))
        .map(std::fs::File::from)
        .map_err(failed)?;
    match file.metadata() {
        Ok(m) if m.is_dir() => Err(ToolFailure::Failed(format!(
            "'{shown}' is a directory, not a file"
        ))),
        Ok(m) if !m.is_file() => Err(ToolFailure::Failed(format!(
            "'{shown}' is not a regular file (a FIFO, socket or device): it is not read"
        ))),
        Ok(_) => Ok(file),
        Err(e) => Err(failed(e)),
    }
}

/// Scans the file once with bounded memory: counts its lines and keeps the requested ones up to `max`
/// bytes (a file of one huge line is cut, not loaded).
fn read_lines(file: impl Read, args: &ReadFileArgs, max: usize) -> Result<Value, ToolFailure> {
    let shown = args.path.as_str();
    let io_err = |e: std::io::Error| ToolFailure::Failed(format!("cannot read '{shown}': {e}"));
    let mut reader = BufReader::new(file);
    let start = args.start_line.unwrap_or(1);
    let end = args.end_line.unwrap_or(u64::MAX);
    let mut line: u64 = 1;
    let mut kept: Vec<u8> = Vec::new();
    let mut wanted: u64 = 0;
    let mut last_was_newline = true;
    let mut empty = true;
    loop {
        let chunk = reader.fill_buf().map_err(io_err)?;
        if chunk.is_empty() {
            break;
        }
        empty = false;
        let len = chunk.len();
        let mut i = 0;
        while i < len {
            let rest = &chunk[i..];
            let (seg_len, newline) = match rest.iter().position(|&b| b == b'\n') {
                Some(p) => (p + 1, true),
                None => (rest.len(), false),
            };
            if (start..=end).contains(&line) {
                let take = max.saturating_sub(kept.len()).min(seg_len);
                kept.extend_from_slice(&rest[..take]);
                wanted += seg_len as u64;
            }
            if newline {
                line += 1;
            }
            i += seg_len;
        }
        last_was_newline = chunk[len - 1] == b'\n';
        reader.consume(len);
    }
    let total = if empty {
        0
    } else if last_was_newline {
        line - 1
    } else {
        line
    };
    if total == 0 {
        return Ok(Value::String(format!("[{shown}: empty file]\n")));
    }
    if start > total {
        return Err(ToolFailure::Failed(format!(
            "`start_line` {start} is past the end of '{shown}' ({total} lines)"
        )));
    }
    let last = end.min(total);
    let mut text = format!("[{shown}: lines {start}-{last} of {total}]\n");
    text.push_str(&super::bounded_text(&kept, wanted));
    Ok(Value::String(text))
}

/// Arguments of `write_file`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct WriteFileArgs {
    /// The file, relative to the project root. Missing parent directories are created.
    path: String,
    /// The whole new content of the file.
    content: String,
}

/// `write_file`: creates or replaces a file.
pub(crate) struct WriteFile;

impl WriteFile {
    fn prepare(
        ctx: &ToolContext,
        arguments: &Value,
    ) -> Result<(PathBuf, PathBuf, WriteFileArgs), ToolFailure> {
        let args: WriteFileArgs = parse_args("write_file", arguments)?;
        let root = project_root(&ctx.project_root)?;
        let real = resolve_for_write(&root, &args.path)?;
        Ok((root, real, args))
    }
}

#[async_trait]
impl Tool for WriteFile {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "write_file".into(),
            description: "Create or replace a file of the project with the given content, creating missing \
                          parent directories. Answers with the number of bytes written."
                .into(),
            parameters: schema_of::<WriteFileArgs>(),
        }
    }

    fn check(&self, ctx: &ToolContext, arguments: &Value) -> Result<(), ToolFailure> {
        Self::prepare(ctx, arguments).map(|_| ())
    }

    fn touched_paths(&self, arguments: &Value) -> Vec<String> {
        path_argument(arguments)
    }

    #[tracing::instrument(name = "write_file", skip_all)]
    async fn run(&self, ctx: &ToolContext, arguments: Value) -> Result<Value, ToolFailure> {
        let (root, real, args) = Self::prepare(ctx, &arguments)?;
        let shown = display_relative(&root, &real);
        tokio::task::spawn_blocking(move || {
            let failed = |e: std::io::Error| match e.raw_os_error() {
                Some(libc::EISDIR) => ToolFailure::Failed(format!("'{shown}' is a directory, not a file")),
                _ => ToolFailure::Failed(format!("cannot write '{shown}': {}", describe(&e))),
            };
            let mut file = Beneath::open(&root)
                .and_then(|b| b.create(relative(&root, &real)))
                .map_err(failed)?;
            file.write_all(args.content.as_bytes()).map_err(failed)?;
            Ok(json!({"path": shown, "bytes_written": args.content.len()}))
        })
        .await
        .map_err(|e| join_failure("write_file", e))?
    }
}

/// Arguments of `delete_file`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeleteFileArgs {
    /// The file to delete, relative to the project root (files only, not directories).
    path: String,
}

/// `delete_file`: removes one file.
pub(crate) struct DeleteFile;

impl DeleteFile {
    fn prepare(ctx: &ToolContext, arguments: &Value) -> Result<(PathBuf, PathBuf), ToolFailure> {
        let args: DeleteFileArgs = parse_args("delete_file", arguments)?;
        let root = project_root(&ctx.project_root)?;
        let real = resolve_for_write(&root, &args.path)?;
        Ok((root, real))
    }
}

#[async_trait]
impl Tool for DeleteFile {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "delete_file".into(),
            description: "Delete one file of the project (not a directory).".into(),
            parameters: schema_of::<DeleteFileArgs>(),
        }
    }

    fn check(&self, ctx: &ToolContext, arguments: &Value) -> Result<(), ToolFailure> {
        Self::prepare(ctx, arguments).map(|_| ())
    }

    fn touched_paths(&self, arguments: &Value) -> Vec<String> {
        path_argument(arguments)
    }

    #[tracing::instrument(name = "delete_file", skip_all)]
    async fn run(&self, ctx: &ToolContext, arguments: Value) -> Result<Value, ToolFailure> {
        let (root, real) = Self::prepare(ctx, &arguments)?;
        let shown = display_relative(&root, &real);
        tokio::task::spawn_blocking(move || {
            let failed =
                |e: std::io::Error| ToolFailure::Failed(format!("cannot delete '{shown}': {}", describe(&e)));
            let rel = relative(&root, &real);
            let beneath = Beneath::open(&root).map_err(failed)?;
            match beneath.kind(rel).map_err(failed)? {
                None => return Err(ToolFailure::Failed(format!("no such file: '{shown}'"))),
                Some(rustix::fs::FileType::Directory) => {
                    return Err(ToolFailure::Failed(format!(
                        "'{shown}' is a directory, not a file"
                    )));
                }
                Some(_) => {}
            }
            beneath.remove_file(rel).map_err(failed)?;
            Ok(json!({"deleted": shown}))
        })
        .await
        .map_err(|e| join_failure("delete_file", e))?
    }
}

/// Arguments of `list_files`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListFilesArgs {
    /// The directory to list, relative to the project root; default `.` (the root).
    path: Option<String>,
    /// List the whole tree below the directory, not only its direct entries; default false.
    recursive: Option<bool>,
}

/// `list_files`: a directory's entries, honouring `.gitignore`.
pub(crate) struct ListFiles;

impl ListFiles {
    fn prepare(
        ctx: &ToolContext,
        arguments: &Value,
    ) -> Result<(PathBuf, PathBuf, ListFilesArgs), ToolFailure> {
        let args: ListFilesArgs = parse_args("list_files", arguments)?;
        let root = project_root(&ctx.project_root)?;
        let real = resolve_in(&root, args.path.as_deref().unwrap_or("."))?;
        Ok((root, real, args))
    }
}

#[async_trait]
impl Tool for ListFiles {
    fn has_side_effects(&self) -> bool {
        false
    }

    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "list_files".into(),
            description: format!(
                "List a directory of the project (default: the root), skipping what .gitignore ignores. \
                 Entries are relative to the project root, sorted; directories end with '/'. \
                 At most {MAX_LIST_ENTRIES} entries."
            ),
            parameters: schema_of::<ListFilesArgs>(),
        }
    }

    fn check(&self, ctx: &ToolContext, arguments: &Value) -> Result<(), ToolFailure> {
        Self::prepare(ctx, arguments).map(|_| ())
    }

    fn touched_paths(&self, _arguments: &Value) -> Vec<String> {
        Vec::new()
    }

    #[tracing::instrument(name = "list_files", skip_all)]
    async fn run(&self, ctx: &ToolContext, arguments: Value) -> Result<Value, ToolFailure> {
        let (root, real, args) = Self::prepare(ctx, &arguments)?;
        let recursive = args.recursive.unwrap_or(false);
        tokio::task::spawn_blocking(move || list(&root, &real, recursive))
            .await
            .map_err(|e| join_failure("list_files", e))?
    }
}

fn list(root: &Path, dir: &Path, recursive: bool) -> Result<Value, ToolFailure> {
    let shown = display_relative(root, dir);
    let mut entries = Vec::new();
    let mut truncated = false;
    let mut not_a_dir = false;
    // Entries that vanish or change during the walk are skipped: a listing is a best effort view.
    let walked = walk(root, dir, if recursive { None } else { Some(1) }, &mut |entry| {
        if entry.depth == 0 {
            not_a_dir = entry.kind != Kind::Dir;
            return ControlFlow::Continue(());
        }
        if entries.len() == MAX_LIST_ENTRIES {
            truncated = true;
            return ControlFlow::Break(());
        }
        let mut name = entry.rel.to_string_lossy().into_owned();
        if entry.kind == Kind::Dir {
            name.push('/');
        }
        entries.push(name);
        ControlFlow::Continue(())
    });
    match walked {
        Ok(()) if not_a_dir => {
            return Err(ToolFailure::Failed(format!(
                "'{shown}' is a file, not a directory"
            )));
        }
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ToolFailure::Failed(format!("no such directory: '{shown}'")));
        }
        Err(e) => {
            return Err(ToolFailure::Failed(format!(
                "cannot list '{shown}': {}",
                describe(&e)
            )));
        }
    }
    entries.sort();
    let mut result = json!({ "entries": entries });
    if truncated {
        result["note"] = Value::String(format!(
            "listing cut at {MAX_LIST_ENTRIES} entries; list a subdirectory or set recursive to false"
        ));
    }
    Ok(result)
}

/// The `path` argument, if the arguments hold one as a string.
fn path_argument(arguments: &Value) -> Vec<String> {
    arguments
        .get("path")
        .and_then(Value::as_str)
        .map(|p| vec![p.to_string()])
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &[u8], start: Option<u64>, end: Option<u64>, max: usize) -> Result<Value, ToolFailure> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.txt");
        std::fs::write(&p, text).unwrap();
        let args = ReadFileArgs {
            path: "f.txt".into(),
            start_line: start,
            end_line: end,
        };
        read_lines(std::fs::File::open(&p).unwrap(), &args, max)
    }

    #[test]
    fn read_lines_counts_and_slices() {
        assert_eq!(
            read(b"a\nb\nc\n", None, None, 100),
            Ok(json!("[f.txt: lines 1-3 of 3]\na\nb\nc\n"))
        );
        assert_eq!(
            read(b"a\nb\nc", Some(2), None, 100),
            Ok(json!("[f.txt: lines 2-3 of 3]\nb\nc"))
        );
        assert_eq!(
            read(b"a\nb\nc", Some(2), Some(2), 100),
            Ok(json!("[f.txt: lines 2-2 of 3]\nb\n"))
        );
        assert_eq!(
            read(b"a\nb\n", Some(1), Some(9), 100),
            Ok(json!("[f.txt: lines 1-2 of 2]\na\nb\n"))
        );
        assert_eq!(read(b"", None, None, 100), Ok(json!("[f.txt: empty file]\n")));
        assert_eq!(
            read(b"a\n", Some(3), None, 100),
            Err(ToolFailure::Failed(
                "`start_line` 3 is past the end of 'f.txt' (1 lines)".into()
            ))
        );
    }

    #[test]
    fn read_lines_cuts_at_the_cap_with_a_note() {
        assert_eq!(
            read(b"0123456789\nabc\n", None, None, 4),
            Ok(json!(
                "[f.txt: lines 1-2 of 2]\n0123\n[output cut: 11 more bytes not shown]"
            ))
        );
    }
}
