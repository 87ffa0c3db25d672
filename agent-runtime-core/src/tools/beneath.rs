//! Opening files relative to a descriptor of the project root with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_MAGICLINKS)`, so the kernel itself keeps every open, write, delete and listing inside.
//!
//! [`super::sandbox::resolve_in`] checks a path and gives the file tools its real location, but a
//! process that swaps a directory for a symlink after the check could redirect the tool's `open`. Here
//! the open is done by the kernel relative to the root's descriptor and refused (`EXDEV`, `ELOOP`) if
//! resolving ever leaves the root, whatever changed in between. Parent directories are created one
//! component at a time, each opened the same way; listings start from [`Beneath::open_any`] and go on
//! from descriptor to descriptor ([`super::walk`]). Kernels before 5.6 have no `openat2`; there the
//! tools fall back to the checked path (the walk), and `/health` says which is in use.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags, ResolveFlags};

/// Whether the kernel has `openat2` (asked once).
pub(crate) fn openat2_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        !matches!(
            rustix::fs::openat2(
                CWD,
                "/",
                OFlags::PATH | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::empty()
            ),
            Err(rustix::io::Errno::NOSYS)
        )
    })
}

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_MAGICLINKS);

/// The project root, opened; paths given to its methods are relative to it (as
/// [`super::sandbox::resolve_in`] found them) and never leave it.
pub(crate) struct Beneath {
    root: PathBuf,
    fd: Option<OwnedFd>,
}

/// Why an `openat2` failed, as the model reads it: leaving the root is named, not just `EXDEV`.
pub(crate) fn describe(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EXDEV) | Some(libc::ELOOP) => {
            "the path left the project while it was being opened (a directory or symlink changed)".into()
        }
        _ => e.to_string(),
    }
}

impl Beneath {
    /// Opens the (canonical) project root; without `openat2` only remembers its path.
    pub(crate) fn open(root: &Path) -> io::Result<Beneath> {
        let fd = if openat2_available() {
            Some(rustix::fs::open(
                root,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )?)
        } else {
            None
        };
        Ok(Beneath {
            root: root.to_path_buf(),
            fd,
        })
    }

    /// Whether the root is held as a descriptor (the kernel has `openat2`).
    pub(crate) fn confined(&self) -> bool {
        self.fd.is_some()
    }

    fn at(&self, rel: &Path, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        match &self.fd {
            Some(fd) => Ok(rustix::fs::openat2(
                fd,
                rel,
                flags | OFlags::CLOEXEC,
                mode,
                RESOLVE,
            )?),
            None => Ok(rustix::fs::open(
                self.root.join(rel),
                flags | OFlags::CLOEXEC,
                mode,
            )?),
        }
    }

    /// Opens `rel` for reading without blocking on a FIFO or device (`O_NONBLOCK`), whatever it is:
    /// `read_file` and the walks of `list_files` and `search_in_code` start from it and ask `fstat`
    /// what they got.
    pub(crate) fn open_any(&self, rel: &Path) -> io::Result<OwnedFd> {
        self.at(
            rel,
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY,
            Mode::empty(),
        )
    }

    /// Creates the missing parents of `rel` and opens it for writing, created or truncated.
    pub(crate) fn create(&self, rel: &Path) -> io::Result<File> {
        let parent = rel.parent().unwrap_or(Path::new(""));
        let mut done = PathBuf::new();
        for c in parent.components() {
            let Component::Normal(name) = c else {
                return Err(io::Error::from_raw_os_error(libc::EXDEV));
            };
            let dir = self.at(&done, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())?;
            match rustix::fs::mkdirat(&dir, name, Mode::from_bits_truncate(0o777)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            done.push(name);
        }
        let fd = self.at(
            rel,
            OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOCTTY,
            Mode::from_bits_truncate(0o666),
        )?;
        Ok(File::from(fd))
    }

    /// What `rel` is, without following a final symlink; `None` when it does not exist.
    pub(crate) fn kind(&self, rel: &Path) -> io::Result<Option<FileType>> {
        let (dir, name) = self.parent_of(rel)?;
        match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the file `rel` (not a directory: `EISDIR`).
    pub(crate) fn remove_file(&self, rel: &Path) -> io::Result<()> {
        let (dir, name) = self.parent_of(rel)?;
        Ok(rustix::fs::unlinkat(&dir, name, AtFlags::empty())?)
    }

    fn parent_of<'a>(&self, rel: &'a Path) -> io::Result<(OwnedFd, &'a std::ffi::OsStr)> {
        let name = rel
            .file_name()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EISDIR))?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        Ok((
            self.at(parent, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())?,
            name,
        ))
    }
}
