//! Path confinement: every path a tool touches is resolved against the project root and refused
//! (`INVALID_TOOL`) when its real location is outside it (API.md §6, §9.19).
//!
//! [`resolve`] walks the path one component at a time the way the kernel would: `..` pops the real
//! directory reached so far (so `link/..` means the parent of the link's *target*), and a symlink is
//! replaced by its target (followed even when the target does not exist, so a dangling link that
//! points outside cannot be written through). The result is the real path, with no symlink left in its
//! existing part; only then is it compared with the canonical root. Consequences:
//!
//! - relative paths are joined to the canonical root;
//! - absolute paths are accepted only when they resolve inside the root (`/etc/passwd` is refused;
//!   `<root>/src/main.rs` is the same as `src/main.rs`), since models often echo the project path;
//! - `..` is refused only when the *final* real path is outside (`../<root name>/x` is inside);
//! - a path that does not exist is not refused here: the tool reports it as a failure.
//!
//! The check and the use are separate system calls: a process that swaps a directory for a symlink in
//! between could redirect the use. The file tools therefore open the checked path relative to a
//! descriptor of the root with `openat2(RESOLVE_BENEATH)` ([`super::beneath`]), which the kernel
//! refuses if it would leave the root; `list_files` and `search_in_code` walk through descriptors the
//! same way ([`super::walk`]).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use super::{ToolFailure, no_nul};

/// How many symlinks one path may go through before it is refused (the kernel's `MAXSYMLINKS`).
const MAX_SYMLINK_HOPS: usize = 40;

/// The project root of a context that checks a call's arguments without looking at any file: a
/// call the client runs (in its own sandbox, on its own files) is checked here for the shape of
/// its arguments only. [`project_root`] takes it as it is, and [`resolve_in`] resolves paths under
/// it lexically (`..` pops, nothing is a symlink), so an async worker makes no system call for it.
/// The NUL byte keeps it from ever naming a real directory.
pub const SHAPE_ONLY_ROOT: &str = "/\0shape-only";

/// The canonical (real, absolute) project root; [`SHAPE_ONLY_ROOT`] as it is.
pub fn project_root(root: &Path) -> Result<PathBuf, ToolFailure> {
    if root == Path::new(SHAPE_ONLY_ROOT) {
        return Ok(root.to_path_buf());
    }
    root.canonicalize().map_err(|e| {
        ToolFailure::Failed(format!(
            "the project root '{}' cannot be used: {e}",
            root.display()
        ))
    })
}

/// The real path of `path` (relative to `root`, or absolute), refused with [`ToolFailure::Invalid`]
/// when empty, when it holds a NUL byte, or when it resolves outside `root`. The path need not exist.
pub fn resolve(root: &Path, path: &str) -> Result<PathBuf, ToolFailure> {
    let root = project_root(root)?;
    resolve_in(&root, path)
}

/// [`resolve`] with an already canonical root (or [`SHAPE_ONLY_ROOT`]: no file is looked at).
pub(crate) fn resolve_in(root: &Path, path: &str) -> Result<PathBuf, ToolFailure> {
    if path.is_empty() {
        return Err(ToolFailure::Invalid("`path` must not be empty".into()));
    }
    no_nul("path", path)?;
    let look = root != Path::new(SHAPE_ONLY_ROOT);

    enum Part {
        Parent,
        Name(OsString),
    }
    fn parts(p: &Path) -> impl Iterator<Item = Part> + '_ {
        p.components().filter_map(|c| match c {
            Component::ParentDir => Some(Part::Parent),
            Component::Normal(n) => Some(Part::Name(n.to_os_string())),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
    }

    let given = Path::new(path);
    let mut current = if given.is_absolute() {
        PathBuf::from("/")
    } else {
        root.to_path_buf()
    };
    let mut pending: VecDeque<Part> = parts(given).collect();
    let mut hops = 0;
    while let Some(part) = pending.pop_front() {
        match part {
            Part::Parent => {
                current.pop();
            }
            Part::Name(name) => {
                let next = current.join(&name);
                match look.then(|| std::fs::symlink_metadata(&next)) {
                    Some(Ok(meta)) if meta.file_type().is_symlink() => {
                        hops += 1;
                        if hops > MAX_SYMLINK_HOPS {
                            return Err(ToolFailure::Failed(format!(
                                "'{path}': too many levels of symbolic links"
                            )));
                        }
                        let target = std::fs::read_link(&next).map_err(|e| {
                            ToolFailure::Failed(format!("'{path}': cannot read symbolic link: {e}"))
                        })?;
                        if target.is_absolute() {
                            current = PathBuf::from("/");
                        }
                        for p in parts(&target).collect::<Vec<_>>().into_iter().rev() {
                            pending.push_front(p);
                        }
                    }
                    // Missing (or unreadable) components are kept as they are: they hold no symlink
                    // the kernel could follow, and the tool reports the failure when it uses the path.
                    _ => current = next,
                }
            }
        }
    }
    if current.starts_with(root) {
        Ok(current)
    } else {
        Err(ToolFailure::Invalid(format!(
            "path '{path}' resolves outside the project"
        )))
    }
}

/// [`resolve_in`] for a path the tool will write or delete: also refuses anything inside a `.git`
/// directory, whose config and hooks would let a file write run arbitrary commands through the git
/// tools (which need no approval by default).
pub(crate) fn resolve_for_write(root: &Path, path: &str) -> Result<PathBuf, ToolFailure> {
    let real = resolve_in(root, path)?;
    let rel = real.strip_prefix(root).unwrap_or(&real);
    if rel.components().any(|c| c.as_os_str() == ".git") {
        return Err(ToolFailure::Invalid(format!(
            "path '{path}' is inside a .git directory, which tools may not modify"
        )));
    }
    Ok(real)
}

/// `real` (a path inside `root`) relative to the root, as the model should write it: `.` for the root.
pub(crate) fn display_relative(root: &Path, real: &Path) -> String {
    match real.strip_prefix(root) {
        Ok(rel) if rel.as_os_str().is_empty() => ".".to_string(),
        Ok(rel) => rel.to_string_lossy().into_owned(),
        Err(_) => real.to_string_lossy().into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("proj/src")).unwrap();
        std::fs::write(root.join("proj/src/main.rs"), "fn main() {}\n").unwrap();
        (dir, root)
    }

    #[test]
    fn relative_paths_resolve_inside_the_root() {
        let (_d, base) = project();
        let root = base.join("proj");
        assert_eq!(resolve(&root, "src/main.rs"), Ok(root.join("src/main.rs")));
        assert_eq!(resolve(&root, "./src/../src/new.rs"), Ok(root.join("src/new.rs")));
        assert_eq!(resolve(&root, "."), Ok(root.clone()));
        assert_eq!(resolve(&root, "../proj/a"), Ok(root.join("a")));
    }

    #[test]
    fn absolute_paths_inside_the_root_are_accepted() {
        let (_d, base) = project();
        let root = base.join("proj");
        let abs = root.join("src/main.rs");
        assert_eq!(resolve(&root, abs.to_str().unwrap()), Ok(abs.clone()));
    }

    #[test]
    fn the_shape_only_root_checks_paths_lexically_without_any_file() {
        let root = project_root(Path::new(SHAPE_ONLY_ROOT)).unwrap();
        assert_eq!(root, PathBuf::from(SHAPE_ONLY_ROOT));
        assert_eq!(resolve_in(&root, "a/./b/../c.rs"), Ok(root.join("a/c.rs")));
        assert_eq!(
            resolve_in(&root, "../x"),
            Err(ToolFailure::Invalid(
                "path '../x' resolves outside the project".into()
            ))
        );
        assert_eq!(
            resolve_in(&root, ""),
            Err(ToolFailure::Invalid("`path` must not be empty".into()))
        );
        assert_eq!(
            resolve_for_write(&root, ".git/config"),
            Err(ToolFailure::Invalid(
                "path '.git/config' is inside a .git directory, which tools may not modify".into()
            ))
        );
    }

    #[test]
    fn escapes_are_invalid() {
        let (_d, base) = project();
        let root = base.join("proj");
        for p in ["../x", "a/../../x", "/etc/passwd", "src/../../proj2/x"] {
            assert_eq!(
                resolve(&root, p),
                Err(ToolFailure::Invalid(format!(
                    "path '{p}' resolves outside the project"
                ))),
                "{p}"
            );
        }
    }

    #[test]
    fn symlinks_are_followed_before_the_check() {
        let (_d, base) = project();
        let root = base.join("proj");
        std::fs::create_dir(base.join("outside")).unwrap();
        std::os::unix::fs::symlink(base.join("outside"), root.join("out")).unwrap();
        std::os::unix::fs::symlink(base.join("outside/new.txt"), root.join("dangling")).unwrap();
        std::os::unix::fs::symlink("src", root.join("inner")).unwrap();
        assert!(matches!(resolve(&root, "out/x"), Err(ToolFailure::Invalid(_))));
        assert!(matches!(resolve(&root, "dangling"), Err(ToolFailure::Invalid(_))));
        // `inner/..` is the parent of `src`, which is the root: inside.
        assert_eq!(resolve(&root, "inner/main.rs"), Ok(root.join("src/main.rs")));
        assert_eq!(resolve(&root, "inner/../x"), Ok(root.join("x")));
    }

    #[test]
    fn symlink_loops_fail() {
        let (_d, base) = project();
        let root = base.join("proj");
        std::os::unix::fs::symlink("b", root.join("a")).unwrap();
        std::os::unix::fs::symlink("a", root.join("b")).unwrap();
        assert!(matches!(resolve(&root, "a"), Err(ToolFailure::Failed(_))));
    }

    #[test]
    fn empty_and_nul_paths_are_invalid() {
        let (_d, base) = project();
        let root = base.join("proj");
        assert_eq!(
            resolve(&root, ""),
            Err(ToolFailure::Invalid("`path` must not be empty".into()))
        );
        assert_eq!(
            resolve(&root, "a\0b"),
            Err(ToolFailure::Invalid("`path` must not contain NUL bytes".into()))
        );
    }

    #[test]
    fn writes_into_git_metadata_are_invalid() {
        let (_d, base) = project();
        let root = base.join("proj");
        assert!(matches!(
            resolve_for_write(&root, ".git/config"),
            Err(ToolFailure::Invalid(_))
        ));
        assert!(matches!(
            resolve_for_write(&root, "sub/.git/hooks/pre-commit"),
            Err(ToolFailure::Invalid(_))
        ));
        assert_eq!(
            resolve_for_write(&root, ".gitignore"),
            Ok(root.join(".gitignore"))
        );
    }
}
