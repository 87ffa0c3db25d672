//! `git_diff` and `git_commit` through the git CLI, run in the project root with the same process
//! runner (timeout, process group, bounded output) as `execute_command`.
//!
//! Neither tool needs approval by default, so git is run so that the repository cannot make it run
//! other programs: hooks off (`core.hooksPath=/dev/null`), no fsmonitor, no external diff or textconv;
//! tools also refuse to write inside `.git` (see [`super::sandbox`]). Pathspecs are literal
//! (`--literal-pathspecs`) and follow `--`, so a path can be neither an option nor pathspec magic.
//! git runs in the agent's process sandbox like any command ([`super::isolation`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::process::Command;

use super::command::{Captured, run_captured};
use super::sandbox::{project_root, resolve_in};
use super::{Tool, ToolContext, ToolFailure, no_nul, parse_args, schema_of};
use crate::protocol::ToolSpec;

/// `git` with the options that keep the repository from running programs, in `root`.
fn git(root: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.current_dir(root)
        // The server's own environment must not point git at another repository.
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .env("GIT_TERMINAL_PROMPT", "0")
        .args([
            "--no-pager",
            "--literal-pathspecs",
            "-c",
            "core.hooksPath=/dev/null",
            "-c",
            "core.fsmonitor=false",
            "-c",
            "core.quotePath=false",
        ]);
    cmd
}

/// Runs a git command; a non-zero exit or a timeout is a failure carrying git's own message.
async fn run_git(ctx: &ToolContext, root: &Path, what: &str, cmd: Command) -> Result<Captured, ToolFailure> {
    let out = run_captured(
        cmd,
        &ctx.sandbox,
        root,
        ctx.command_timeout,
        ctx.max_output_bytes,
        &ctx.cancel,
    )
    .await?;
    if out.timed_out {
        return Err(ToolFailure::Failed(format!("{what} timed out")));
    }
    if out.exit_code != Some(0) {
        let detail = [out.stderr.trim(), out.stdout.trim()]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        return Err(ToolFailure::Failed(format!("{what} failed: {detail}")));
    }
    Ok(out)
}

/// The pathspec for `real` (inside `root`): relative to the root, `.` for the root itself.
fn pathspec(root: &Path, real: &Path) -> OsString {
    match real.strip_prefix(root) {
        Ok(rel) if !rel.as_os_str().is_empty() => rel.as_os_str().to_os_string(),
        _ => OsString::from("."),
    }
}

/// What tells the git tools apart: name, description, arguments and the commands they run. The
/// rest of [`Tool`] is the same for each (the `impl` below): `check` is `prepare` without running
/// anything, and no tool of git's changes a file of the working tree.
trait GitTool: Send + Sync {
    const NAME: &'static str;
    const DESCRIPTION: &'static str;
    /// Whether running it changes anything (see [`Tool::has_side_effects`]).
    const SIDE_EFFECTS: bool;
    /// Its arguments, whose schema the model sees.
    type Args: JsonSchema;
    /// The checked arguments: the project root and resolved paths.
    type Prepared: Send;

    /// Parses and checks the arguments; confines every path to the project root.
    fn prepare(ctx: &ToolContext, arguments: &Value) -> Result<Self::Prepared, ToolFailure>;

    /// Runs git.
    fn execute(
        ctx: &ToolContext,
        prepared: Self::Prepared,
    ) -> impl Future<Output = Result<Value, ToolFailure>> + Send;
}

#[async_trait]
impl<T: GitTool> Tool for T {
    fn has_side_effects(&self) -> bool {
        T::SIDE_EFFECTS
    }

    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: T::NAME.into(),
            description: T::DESCRIPTION.into(),
            parameters: schema_of::<T::Args>(),
        }
    }

    fn check(&self, ctx: &ToolContext, arguments: &Value) -> Result<(), ToolFailure> {
        T::prepare(ctx, arguments).map(|_| ())
    }

    fn touched_paths(&self, _arguments: &Value) -> Vec<String> {
        // A diff reads, a commit changes no file of the working tree.
        Vec::new()
    }

    async fn run(&self, ctx: &ToolContext, arguments: Value) -> Result<Value, ToolFailure> {
        let prepared = T::prepare(ctx, &arguments)?;
        T::execute(ctx, prepared).await
    }
}

/// Arguments of `git_diff`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct GitDiffArgs {
    /// Only this file or directory, relative to the project root; default everything.
    path: Option<String>,
    /// Show the staged changes (the index against HEAD) instead of the unstaged ones; default false.
    staged: Option<bool>,
}

/// `git_diff`: the working tree's (or the index's) changes.
pub(crate) struct GitDiff;

impl GitTool for GitDiff {
    const NAME: &'static str = "git_diff";
    const DESCRIPTION: &'static str = "Show the project's uncommitted changes as a unified diff (git diff), or the \
        staged ones with staged=true. Empty when nothing changed. Untracked files are not shown.";
    const SIDE_EFFECTS: bool = false;
    type Args = GitDiffArgs;
    /// The project root, the path to diff, staged.
    type Prepared = (PathBuf, Option<PathBuf>, bool);

    fn prepare(ctx: &ToolContext, arguments: &Value) -> Result<Self::Prepared, ToolFailure> {
        let args: GitDiffArgs = parse_args(Self::NAME, arguments)?;
        let root = project_root(&ctx.project_root)?;
        let path = match args.path.as_deref() {
            Some(p) => Some(resolve_in(&root, p)?),
            None => None,
        };
        Ok((root, path, args.staged.unwrap_or(false)))
    }

    #[tracing::instrument(name = "git_diff", skip_all)]
    async fn execute(ctx: &ToolContext, (root, path, staged): Self::Prepared) -> Result<Value, ToolFailure> {
        let mut cmd = git(&root);
        // `--relative`: when the project is a subdirectory of a repository, show only its changes.
        cmd.args([
            "diff",
            "--no-color",
            "--no-ext-diff",
            "--no-textconv",
            "--relative",
        ]);
        if staged {
            cmd.arg("--staged");
        }
        if let Some(p) = &path {
            cmd.arg("--").arg(pathspec(&root, p));
        }
        let out = run_git(ctx, &root, "git diff", cmd).await?;
        Ok(Value::String(out.stdout))
    }
}

/// Arguments of `git_commit`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct GitCommitArgs {
    /// The commit message.
    message: String,
    /// Files or directories to stage and commit, relative to the project root; default every change in
    /// the project (`git add -A`).
    paths: Option<Vec<String>>,
}

/// `git_commit`: stages and commits.
pub(crate) struct GitCommit;

impl GitTool for GitCommit {
    const NAME: &'static str = "git_commit";
    const DESCRIPTION: &'static str = "Stage the given paths (default: every change in the project) and commit \
        them. Answers with the new commit's id.";
    const SIDE_EFFECTS: bool = true;
    type Args = GitCommitArgs;
    /// The project root, the paths to stage, the message.
    type Prepared = (PathBuf, Vec<PathBuf>, String);

    fn prepare(ctx: &ToolContext, arguments: &Value) -> Result<Self::Prepared, ToolFailure> {
        let args: GitCommitArgs = parse_args(Self::NAME, arguments)?;
        if args.message.trim().is_empty() {
            return Err(ToolFailure::Invalid(
                "git_commit: `message` must not be empty".into(),
            ));
        }
        no_nul("message", &args.message)?;
        let root = project_root(&ctx.project_root)?;
        let paths = args
            .paths
            .unwrap_or_default()
            .iter()
            .map(|p| resolve_in(&root, p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((root, paths, args.message))
    }

    #[tracing::instrument(name = "git_commit", skip_all)]
    async fn execute(
        ctx: &ToolContext,
        (root, paths, message): Self::Prepared,
    ) -> Result<Value, ToolFailure> {
        let mut add = git(&root);
        add.args(["add", "-A", "--"]);
        if paths.is_empty() {
            add.arg(".");
        } else {
            add.args(paths.iter().map(|p| pathspec(&root, p)));
        }
        run_git(ctx, &root, "git add", add).await?;

        let mut commit = git(&root);
        // A machine without a configured identity still gets a commit, under the runtime's name.
        for (key, fallback) in [
            ("user.name", "agent-runtime"),
            ("user.email", "agent-runtime@localhost"),
        ] {
            let mut get = git(&root);
            get.args(["config", "--get", key]);
            if run_git(ctx, &root, "git config", get).await.is_err() {
                commit.arg("-c").arg(format!("{key}={fallback}"));
            }
        }
        commit.args(["commit", "--no-verify", "-m"]).arg(&message);
        run_git(ctx, &root, "git commit", commit).await?;

        let mut head = git(&root);
        head.args(["rev-parse", "HEAD"]);
        let out = run_git(ctx, &root, "git rev-parse", head).await?;
        Ok(json!({"commit": out.stdout.trim()}))
    }
}
