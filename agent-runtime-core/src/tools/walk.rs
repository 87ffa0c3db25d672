//! The walk behind `list_files` and `search_in_code`: a folder of the project, depth first in name
//! order, skipping `.git` and what `.ignore`, `.gitignore`, `.git/info/exclude` and git's excludes hide.
//!
//! With `openat2` the walk never goes through a path: the starting folder is opened beneath the root's
//! descriptor (`RESOLVE_BENEATH`), every subfolder and file relative to its parent's descriptor with
//! `RESOLVE_NO_SYMLINKS`, and the ignore files beneath the root's descriptor. A folder swapped for a
//! symlink mid-walk is then refused by the kernel instead of followed, so nothing outside the project is
//! listed or read. The ignore files are matched with the `ignore` crate's `gitignore` matcher in the
//! order its walker uses (`.ignore` over `.gitignore` over `info/exclude` over git's global excludes,
//! the nearest folder first), so both walks agree. Ignore files in the folders above the project are
//! read by path, as the `ignore` crate does (nothing inside the project can change them); a `.git`
//! *file* (a worktree's link to its repository) is not followed for `info/exclude`. Kernels without
//! `openat2` (before 5.6) get the `ignore` crate's walk over the checked path.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, Read};
use std::ops::ControlFlow;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use ignore::Match;
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags};

use super::beneath::Beneath;

/// What a walked entry is; a symlink is never followed, so it is `Other` like a FIFO or a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Dir,
    File,
    Other,
}

/// One entry of a walk.
pub(crate) struct Entry<'a> {
    /// The entry's path relative to the project root (empty for the root).
    pub(crate) rel: PathBuf,
    pub(crate) kind: Kind,
    /// 0 for the folder (or file) the walk starts at.
    pub(crate) depth: usize,
    source: Source<'a>,
}

enum Source<'a> {
    /// The starting point, already open.
    Open(&'a OwnedFd),
    /// A name in an open folder.
    At(BorrowedFd<'a>, &'a OsStr),
    /// A path (the fallback walk).
    Path(&'a Path),
}

/// Opening a name of an open folder: it must be right there, not behind a symlink.
const CHILD: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

const READ: OFlags = OFlags::RDONLY
    .union(OFlags::NONBLOCK)
    .union(OFlags::NOCTTY)
    .union(OFlags::CLOEXEC);

impl Entry<'_> {
    /// Opens the entry for reading; fails (`EINVAL`) if it is no longer a regular file.
    pub(crate) fn open_file(&self) -> io::Result<File> {
        let fd = match self.source {
            Source::Open(fd) => fd.try_clone()?,
            Source::At(dir, name) => {
                rustix::fs::openat2(dir, name, READ | OFlags::NOFOLLOW, Mode::empty(), CHILD)?
            }
            Source::Path(path) => rustix::fs::open(path, READ | OFlags::NOFOLLOW, Mode::empty())?,
        };
        regular(File::from(fd))
    }
}

fn regular(file: File) -> io::Result<File> {
    if file.metadata()?.is_file() {
        Ok(file)
    } else {
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    }
}

fn kind_of(t: FileType) -> Kind {
    match t {
        FileType::Directory => Kind::Dir,
        FileType::RegularFile => Kind::File,
        _ => Kind::Other,
    }
}

/// Walks `start` (a real path inside the canonical `root`, as [`super::sandbox::resolve_in`] gives it)
/// down to `max_depth` (`None`: all the way), calling `visit` for the start (depth 0) and then for each
/// entry that is not ignored, until it answers `Break`. The start itself is never ignored, and when it
/// is not a folder it is the only entry. Errors opening the start are returned (`NotFound`; `EXDEV` or
/// `ELOOP` when it left the project); entries that vanish or change during the walk are skipped.
pub(crate) fn walk(
    root: &Path,
    start: &Path,
    max_depth: Option<usize>,
    visit: &mut dyn FnMut(&Entry<'_>) -> ControlFlow<()>,
) -> io::Result<()> {
    let beneath = Beneath::open(root)?;
    if !beneath.confined() {
        return walk_by_path(root, start, max_depth, visit);
    }
    let rel = start.strip_prefix(root).unwrap_or(Path::new("")).to_path_buf();
    let fd = beneath.open_any(&rel)?;
    let kind = kind_of(FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode));
    let top = Entry {
        rel: rel.clone(),
        kind,
        depth: 0,
        source: Source::Open(&fd),
    };
    if visit(&top).is_break() || kind != Kind::Dir || max_depth == Some(0) {
        return Ok(());
    }
    let walker = Walker {
        root,
        beneath: &beneath,
        global: Gitignore::global().0,
        max_depth,
    };
    // The ignore files of every folder above the start: outside the project by path, inside it
    // beneath the root's descriptor.
    let mut levels: Vec<Level> = root
        .ancestors()
        .skip(1)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .map(|dir| Level::read(dir, |name| read_by_path(&dir.join(name))))
        .collect();
    let mut above = PathBuf::new();
    for c in rel.components() {
        levels.push(walker.level(&above));
        above.push(c);
    }
    let _ = walker.dir(fd, &rel, 1, &mut levels, visit);
    Ok(())
}

struct Walker<'a> {
    root: &'a Path,
    beneath: &'a Beneath,
    global: Gitignore,
    max_depth: Option<usize>,
}

impl Walker<'_> {
    /// The ignore rules of the folder `rel`, read beneath the root's descriptor.
    fn level(&self, rel: &Path) -> Level {
        Level::read(&self.root.join(rel), |name| {
            let file = regular(File::from(self.beneath.open_any(&rel.join(name)).ok()?)).ok()?;
            read_all(file)
        })
    }

    /// Visits the entries of the open folder `fd` (at `rel`, its entries at `depth`), descending
    /// into the subfolders.
    fn dir(
        &self,
        fd: OwnedFd,
        rel: &Path,
        depth: usize,
        levels: &mut Vec<Level>,
        visit: &mut dyn FnMut(&Entry<'_>) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        let Ok(mut dir) = Dir::new(fd) else {
            return ControlFlow::Continue(());
        };
        let mut names = Vec::new();
        for entry in dir.by_ref() {
            let Ok(entry) = entry else {
                break;
            };
            let name = OsStr::from_bytes(entry.file_name().to_bytes()).to_os_string();
            if name != "." && name != ".." && name != ".git" {
                names.push((name, entry.file_type()));
            }
        }
        names.sort_by(|a, b| a.0.cmp(&b.0));
        let Ok(fd) = dir.fd() else {
            return ControlFlow::Continue(());
        };
        levels.push(self.level(rel));
        let flow = self.entries(fd, rel, depth, &names, levels, visit);
        levels.pop();
        flow
    }

    fn entries(
        &self,
        fd: BorrowedFd<'_>,
        rel: &Path,
        depth: usize,
        names: &[(std::ffi::OsString, FileType)],
        levels: &mut Vec<Level>,
        visit: &mut dyn FnMut(&Entry<'_>) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        for (name, file_type) in names {
            let file_type = match file_type {
                FileType::Unknown => {
                    match rustix::fs::statat(fd, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
                        Ok(st) => FileType::from_raw_mode(st.st_mode),
                        Err(_) => continue,
                    }
                }
                t => *t,
            };
            let kind = kind_of(file_type);
            let child = rel.join(name);
            if ignored(levels, &self.global, &self.root.join(&child), kind == Kind::Dir) {
                continue;
            }
            let entry = Entry {
                rel: child,
                kind,
                depth,
                source: Source::At(fd, name),
            };
            visit(&entry)?;
            if kind == Kind::Dir && self.max_depth.is_none_or(|max| depth < max) {
                let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                // A folder that became a symlink (or vanished) since it was listed is skipped.
                if let Ok(sub) = rustix::fs::openat2(fd, name.as_os_str(), flags, Mode::empty(), CHILD) {
                    self.dir(sub, &entry.rel, depth + 1, levels, visit)?;
                }
            }
        }
        ControlFlow::Continue(())
    }
}

/// The ignore rules one folder holds, each file a matcher of its own.
struct Level {
    ignore: Gitignore,
    gitignore: Gitignore,
    exclude: Gitignore,
}

impl Level {
    /// The rules of the folder `dir` (its absolute path, which patterns are relative to), reading its
    /// files with `read` (given a path relative to the folder).
    fn read(dir: &Path, read: impl Fn(&Path) -> Option<Vec<u8>>) -> Level {
        let matcher = |name: &str| {
            let mut builder = GitignoreBuilder::new(dir);
            if let Some(bytes) = read(Path::new(name)) {
                let from = dir.join(name);
                // As `GitignoreBuilder::add` reads a file: line by line, skipping lines that are
                // not UTF-8 and a leading byte order mark.
                for (i, line) in bytes.as_slice().lines().enumerate() {
                    let Ok(line) = line else {
                        continue;
                    };
                    let line = if i == 0 {
                        line.trim_start_matches('\u{feff}')
                    } else {
                        &line
                    };
                    let _ = builder.add_line(Some(from.clone()), line);
                }
            }
            builder.build().unwrap_or_else(|_| Gitignore::empty())
        };
        Level {
            ignore: matcher(".ignore"),
            gitignore: matcher(".gitignore"),
            exclude: matcher(".git/info/exclude"),
        }
    }
}

/// Whether `path` is ignored, with the precedence of the `ignore` crate's walker: for each kind of
/// file the nearest folder that says anything decides; `.ignore` wins over `.gitignore`, which wins
/// over `info/exclude`, which wins over git's global excludes.
fn ignored(levels: &[Level], global: &Gitignore, path: &Path, is_dir: bool) -> bool {
    let (mut ignore, mut gitignore, mut exclude) = (Match::None, Match::None, Match::None);
    for level in levels.iter().rev() {
        if ignore.is_none() {
            ignore = level.ignore.matched(path, is_dir);
        }
        if gitignore.is_none() {
            gitignore = level.gitignore.matched(path, is_dir);
        }
        if exclude.is_none() {
            exclude = level.exclude.matched(path, is_dir);
        }
    }
    ignore
        .or(gitignore)
        .or(exclude)
        .or(global.matched(path, is_dir))
        .is_ignore()
}

fn read_by_path(path: &Path) -> Option<Vec<u8>> {
    let fd = rustix::fs::open(path, READ, Mode::empty()).ok()?;
    read_all(regular(File::from(fd)).ok()?)
}

fn read_all(mut file: File) -> Option<Vec<u8>> {
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

/// The fallback for kernels without `openat2`: the `ignore` crate's walk over the checked path, which
/// a folder swapped for a symlink in the meantime can redirect.
fn walk_by_path(
    root: &Path,
    start: &Path,
    max_depth: Option<usize>,
    visit: &mut dyn FnMut(&Entry<'_>) -> ControlFlow<()>,
) -> io::Result<()> {
    let meta = std::fs::metadata(start)?;
    let root_kind = if meta.is_dir() {
        Kind::Dir
    } else if meta.is_file() {
        Kind::File
    } else {
        Kind::Other
    };
    for entry in by_path_walker(start).max_depth(max_depth).build().flatten() {
        let kind = if entry.depth() == 0 {
            root_kind
        } else {
            match entry.file_type() {
                Some(t) if t.is_dir() => Kind::Dir,
                Some(t) if t.is_file() => Kind::File,
                _ => Kind::Other,
            }
        };
        let e = Entry {
            rel: entry
                .path()
                .strip_prefix(root)
                .unwrap_or(Path::new(""))
                .to_path_buf(),
            kind,
            depth: entry.depth(),
            source: Source::Path(entry.path()),
        };
        if visit(&e).is_break() {
            break;
        }
    }
    Ok(())
}

/// The `ignore` crate's walker over `dir`: honours `.gitignore` (also outside a git repository),
/// `.ignore` and git's excludes, shows dotfiles, never enters `.git`, and does not follow symlinks.
fn by_path_walker(dir: &Path) -> ignore::WalkBuilder {
    let mut b = ignore::WalkBuilder::new(dir);
    b.hidden(false)
        .git_ignore(true)
        .git_exclude(true)
        .git_global(true)
        .require_git(false)
        .follow_links(false)
        .filter_entry(|e| e.file_name() != ".git")
        .sort_by_file_name(|a, b| a.cmp(b));
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A project whose ignore files exercise every rule of precedence the walk must keep.
    fn project() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap().join("proj");
        let files: &[(&str, &str)] = &[
            (".gitignore", "*.log\nbuild/\n/top-only.txt\n!keep.log\n"),
            (".ignore", "secret.txt\n"),
            (".git/info/exclude", "excluded.txt\n"),
            (".git/HEAD", "ref: refs/heads/main\n"),
            (".hidden", ""),
            ("a.log", ""),
            ("keep.log", ""),
            ("top-only.txt", ""),
            ("excluded.txt", ""),
            ("secret.txt", ""),
            ("build/out.txt", ""),
            ("src/.gitignore", "!debug.log\ngen/\n"),
            ("src/.ignore", "!secret.txt\n"),
            ("src/debug.log", ""),
            ("src/trace.log", ""),
            ("src/top-only.txt", ""),
            ("src/secret.txt", ""),
            ("src/gen/x.rs", ""),
            ("src/lib.rs", ""),
            ("src/nested/.gitignore", "*.rs\n"),
            ("src/nested/a.rs", ""),
            ("src/nested/b.txt", ""),
        ];
        for (rel, content) in files {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        std::os::unix::fs::symlink("../build", root.join("src/link")).unwrap();
        (dir, root)
    }

    fn collect(
        walker: impl FnOnce(&mut dyn FnMut(&Entry<'_>) -> ControlFlow<()>) -> io::Result<()>,
    ) -> Vec<(String, usize, Kind)> {
        let mut seen = Vec::new();
        walker(&mut |e| {
            seen.push((e.rel.to_string_lossy().into_owned(), e.depth, e.kind));
            ControlFlow::Continue(())
        })
        .unwrap();
        seen
    }

    #[test]
    fn the_descriptor_walk_ignores_exactly_what_the_ignore_crate_ignores() {
        let (_d, root) = project();
        assert!(
            Beneath::open(&root).unwrap().confined(),
            "this kernel has openat2"
        );
        for (start, depth) in [("", None), ("src", None), ("", Some(1)), ("src/nested", None)] {
            let start = root.join(start);
            let by_fd = collect(|v| walk(&root, &start, depth, v));
            let by_path = collect(|v| walk_by_path(&root, &start, depth, v));
            assert_eq!(by_fd, by_path, "from {start:?}, depth {depth:?}");
        }
        let d = Kind::Dir;
        let f = Kind::File;
        let expected: Vec<(String, usize, Kind)> = [
            ("", 0, d),
            (".gitignore", 1, f),
            (".hidden", 1, f),
            (".ignore", 1, f),
            ("keep.log", 1, f),
            ("src", 1, d),
            ("src/.gitignore", 2, f),
            ("src/.ignore", 2, f),
            ("src/debug.log", 2, f),
            ("src/lib.rs", 2, f),
            ("src/link", 2, Kind::Other),
            ("src/nested", 2, d),
            ("src/nested/.gitignore", 3, f),
            ("src/nested/b.txt", 3, f),
            ("src/secret.txt", 2, f),
            ("src/top-only.txt", 2, f),
        ]
        .into_iter()
        .map(|(p, depth, k)| (p.to_string(), depth, k))
        .collect();
        assert_eq!(collect(|v| walk(&root, &root, None, v)), expected);
    }

    #[test]
    fn a_file_is_walked_as_itself_and_read_through_its_descriptor() {
        let (_d, root) = project();
        let mut read = String::new();
        let seen = collect(|v| {
            walk(&root, &root.join("src/lib.rs"), None, &mut |e| {
                e.open_file().unwrap().read_to_string(&mut read).unwrap();
                v(e)
            })
        });
        assert_eq!(
            (seen, read),
            (vec![("src/lib.rs".to_string(), 0, Kind::File)], String::new())
        );
    }

    #[test]
    fn a_start_that_left_the_project_is_refused_by_the_kernel() {
        let (_d, root) = project();
        let outside = root.parent().unwrap().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("out")).unwrap();
        let err = walk(&root, &root.join("out"), None, &mut |_| ControlFlow::Continue(())).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EXDEV));
    }
}
