//! Previews of pending file approvals: the unified diff a `write_file` or `delete_file` call would
//! make to the file as it is now, so a human decides on the change rather than on raw arguments.

use std::path::Path;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Orchestrator;
use crate::approval::{ApprovalStatus, RequestType};
use crate::error::{Error, Result};
use crate::tools::ToolFailure;
use crate::tools::sandbox::{display_relative, project_root, resolve_for_write};

/// Files larger than this are not read for a preview (the diff would not be read by anyone either).
pub const MAX_PREVIEW_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// How long computing one diff may take; past it the diff is coarser (whole blocks replaced).
const DIFF_DEADLINE: Duration = Duration::from_millis(500);

/// What the call would do to the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FileChange {
    /// `write_file` on a path that does not exist yet.
    Create,
    /// `write_file` over an existing file.
    Modify,
    /// `delete_file`.
    Delete,
}

/// The change a pending `write_file` or `delete_file` approval would make, against the file now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ApprovalPreview {
    /// The approval's call id.
    pub call_id: String,
    /// `write_file` or `delete_file`.
    pub tool_name: String,
    /// The file, relative to the project root (as the tool would report it).
    pub path: String,
    /// Create, modify or delete.
    pub change: FileChange,
    /// A unified diff (`--- a/<path>`, `+++ b/<path>`, three lines of context); empty when the
    /// write would leave the file as it is. A new file is diffed against `/dev/null`, a deleted one
    /// against it too.
    pub diff: String,
}

impl Orchestrator {
    /// The diff a pending `write_file` or `delete_file` approval would apply to the file as it is
    /// now. The path is resolved with the same confinement as the file tools, so a path that now
    /// leads outside the project (a symlink created since) is refused with `INVALID_TOOL`.
    ///
    /// Errors: `SESSION_NOT_FOUND`; `APPROVAL_NOT_FOUND` for an unknown call id;
    /// `APPROVAL_ALREADY_DECIDED` when it is no longer pending; `INVALID_REQUEST` for another tool
    /// or a session without `project_path`; `INVALID_TOOL` for a path outside the project;
    /// `TOOL_EXECUTION_FAILED` when the file cannot be read (a directory, a file to delete that is
    /// gone, over [`MAX_PREVIEW_FILE_BYTES`]).
    #[tracing::instrument(skip(self))]
    pub async fn approval_preview(&self, session_id: &str, call_id: &str) -> Result<ApprovalPreview> {
        let session = self.inner.storage.get_session(session_id).await?;
        let approval = self.inner.storage.get_approval(session_id, call_id).await?;
        if approval.status != ApprovalStatus::Pending {
            return Err(Error::ApprovalAlreadyDecided(format!(
                "approval '{call_id}' is already {}: there is nothing left to preview",
                approval.status.as_str()
            )));
        }
        let deleting = match (approval.request_type, approval.tool_name.as_str()) {
            (RequestType::Tool, "write_file") => false,
            (RequestType::Tool, "delete_file") => true,
            _ => {
                return Err(Error::InvalidRequest(format!(
                    "approval '{call_id}' is a {} call: previews exist for write_file and delete_file only",
                    approval.tool_name
                )));
            }
        };
        let root = session
            .metadata
            .get("project_path")
            .and_then(Value::as_str)
            .map(std::path::PathBuf::from)
            .ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "session '{session_id}' has no metadata.project_path: its client runs the tools, so \
                     the runtime cannot see the file to preview"
                ))
            })?;
        let text = |key: &str| {
            approval
                .arguments
                .get(key)
                .and_then(Value::as_str)
                .map(String::from)
        };
        let path = text("path")
            .ok_or_else(|| Error::InvalidTool(format!("{}: `path` must be a string", approval.tool_name)))?;
        let content = if deleting {
            None
        } else {
            Some(
                text("content")
                    .ok_or_else(|| Error::InvalidTool("write_file: `content` must be a string".into()))?,
            )
        };
        let call_id = call_id.to_string();
        let tool_name = approval.tool_name.clone();
        // File-system work blocks: off the executor, like the file tools themselves.
        tokio::task::spawn_blocking(move || {
            let (shown, before) = read_current(&root, &path)?;
            let (change, diff) = match (content, before) {
                (None, None) => {
                    return Err(ToolFailure::Failed(format!("no such file: '{shown}'")).into());
                }
                (None, Some(old)) => (FileChange::Delete, unified(&shown, Some(&old), None)),
                (Some(new), None) => (FileChange::Create, unified(&shown, None, Some(&new))),
                (Some(new), Some(old)) => (FileChange::Modify, unified(&shown, Some(&old), Some(&new))),
            };
            Ok(ApprovalPreview {
                call_id,
                tool_name,
                path: shown,
                change,
                diff,
            })
        })
        .await
        .map_err(|e| Error::Internal(format!("the preview task failed: {e}")))?
    }
}

/// The path as the tools show it, and the file's text now (`None`: it does not exist).
fn read_current(root: &Path, path: &str) -> Result<(String, Option<String>)> {
    let root = project_root(root)?;
    let real = resolve_for_write(&root, path)?;
    let shown = display_relative(&root, &real);
    let failed = |e: std::io::Error| ToolFailure::Failed(format!("cannot read '{shown}': {e}"));
    let meta = match std::fs::metadata(&real) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((shown, None)),
        Err(e) => return Err(failed(e).into()),
    };
    if meta.is_dir() {
        return Err(ToolFailure::Failed(format!("'{shown}' is a directory, not a file")).into());
    }
    if meta.len() > MAX_PREVIEW_FILE_BYTES {
        return Err(ToolFailure::Failed(format!(
            "'{shown}' is {} bytes, over the preview limit of {MAX_PREVIEW_FILE_BYTES}: read it with read_file",
            meta.len()
        ))
        .into());
    }
    let bytes = std::fs::read(&real).map_err(failed)?;
    Ok((shown, Some(String::from_utf8_lossy(&bytes).into_owned())))
}

/// A unified diff with git's headers; a missing side is `/dev/null`.
fn unified(shown: &str, old: Option<&str>, new: Option<&str>) -> String {
    let (a, b) = (
        old.map_or_else(|| "/dev/null".to_string(), |_| format!("a/{shown}")),
        new.map_or_else(|| "/dev/null".to_string(), |_| format!("b/{shown}")),
    );
    let (old, new) = (old.unwrap_or(""), new.unwrap_or(""));
    if old == new {
        return String::new();
    }
    similar::TextDiff::configure()
        .timeout(DIFF_DEADLINE)
        .diff_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(&a, &b)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_modification_is_a_unified_diff_with_git_headers() {
        assert_eq!(
            unified("src/a.txt", Some("one\ntwo\nthree\n"), Some("one\n2\nthree\n")),
            "--- a/src/a.txt\n+++ b/src/a.txt\n@@ -1,3 +1,3 @@\n one\n-two\n+2\n three\n"
        );
    }

    #[test]
    fn new_and_deleted_files_are_diffed_against_dev_null() {
        assert_eq!(
            unified("n.txt", None, Some("hello\n")),
            "--- /dev/null\n+++ b/n.txt\n@@ -0,0 +1 @@\n+hello\n"
        );
        assert_eq!(
            unified("d.txt", Some("bye\n"), None),
            "--- a/d.txt\n+++ /dev/null\n@@ -1 +0,0 @@\n-bye\n"
        );
    }

    #[test]
    fn an_unchanged_file_has_an_empty_diff() {
        assert_eq!(unified("same.txt", Some("x\n"), Some("x\n")), "");
    }
}
