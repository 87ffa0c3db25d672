//! Instant liveness of lease owners: a process holds a token that vanishes when it dies, so any
//! other process can tell a dead owner's lease from a live one's without waiting for expiry.
//!
//! A lease owner is *registered* once it holds a [`Liveness`] token, and *dead* when it is
//! registered but its token is gone (dropped, or its process died). The lease of a dead owner may be
//! taken at once; the lease of a live or unregistered owner only once it expires. Each backend has
//! its own token: an in-process flag (memory, in-memory SQLite), an OS file lock beside the SQLite
//! database file (released by the kernel when the process dies, however it dies), and a
//! session-level advisory lock on a connection of its own (Postgres, released by the database
//! when the connection drops).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// Proof that a lease owner's process is alive, for as long as this value lives.
///
/// Dropping it declares the owner dead: its leases may then be taken over at once.
pub struct Liveness {
    _token: Box<dyn Send + Sync>,
}

impl Liveness {
    pub(crate) fn new(token: impl Send + Sync + 'static) -> Self {
        Liveness {
            _token: Box::new(token),
        }
    }
}

impl std::fmt::Debug for Liveness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Liveness")
    }
}

/// Owners registered in this process: for stores no other process can open.
#[derive(Debug, Default)]
pub(crate) struct OwnerRegistry {
    owners: Mutex<HashMap<String, Arc<AtomicBool>>>,
}

/// Clears its owner's flag when dropped.
struct AliveFlag(Arc<AtomicBool>);

impl Drop for AliveFlag {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl OwnerRegistry {
    /// Registers `owner` as alive until the returned token is dropped.
    pub fn hold(&self, owner: &str) -> Liveness {
        let flag = Arc::new(AtomicBool::new(true));
        if let Ok(mut owners) = self.owners.lock() {
            owners.insert(owner.to_string(), flag.clone());
        }
        Liveness::new(AliveFlag(flag))
    }

    /// Registered, and its token is gone.
    pub fn is_dead(&self, owner: &str) -> bool {
        self.owners
            .lock()
            .map(|o| o.get(owner).is_some_and(|f| !f.load(Ordering::SeqCst)))
            .unwrap_or(false)
    }
}

/// Lock files of the processes using one SQLite database file: `<database>-owners/<owner>.lock`,
/// each held with an exclusive `flock` by its live owner.
#[derive(Debug, Clone)]
pub(crate) struct LockFileRegistry {
    dir: PathBuf,
}

impl LockFileRegistry {
    /// The registry beside the database file `db`.
    pub fn beside(db: &Path) -> Self {
        let mut dir = db.as_os_str().to_owned();
        dir.push("-owners");
        LockFileRegistry { dir: dir.into() }
    }

    fn path(&self, owner: &str) -> PathBuf {
        // Owner names become file names: anything but [A-Za-z0-9_-] is written as `%XX`.
        let mut name = String::with_capacity(owner.len() + 5);
        for b in owner.bytes() {
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
                name.push(char::from(b));
            } else {
                name.push_str(&format!("%{b:02X}"));
            }
        }
        name.push_str(".lock");
        self.dir.join(name)
    }

    /// Takes `owner`'s lock file (blocking file-system calls: run it off the async executor).
    pub fn hold(&self, owner: &str) -> Result<Liveness> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            Error::Database(format!(
                "cannot {what} the owner lock file in {}: {e}",
                self.dir.display()
            ))
        };
        std::fs::create_dir_all(&self.dir).map_err(|e| fail("create the folder of", &e))?;
        let path = self.path(owner);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| fail("open", &e))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|e| fail("lock", &e))?;
        // The lock goes with the file; the file stays (a registered owner, now dead) until a sweep
        // finds it holds no lease.
        Ok(Liveness::new(file))
    }

    /// Registered (its lock file exists) and no process holds the file's lock (blocking).
    pub fn is_dead(&self, owner: &str) -> bool {
        let Ok(file) = File::options().write(true).open(self.path(owner)) else {
            return false; // never registered (or swept): expiry decides
        };
        // The lock is taken only to test it, and given back when `file` closes.
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok()
    }

    /// Removes the lock files of dead owners for which `keep` is false (blocking).
    pub fn sweep(&self, keep: impl Fn(&str) -> bool) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(owner) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".lock"))
                .map(decode_owner)
            else {
                continue;
            };
            if !keep(&owner) && self.is_dead(&owner) {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

fn decode_owner(name: &str) -> String {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = (bytes[i] == b'%')
            .then(|| name.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_in_process_owner_is_dead_only_after_its_token_is_dropped() {
        let registry = OwnerRegistry::default();
        assert!(!registry.is_dead("never-registered"));
        let token = registry.hold("a");
        assert!(!registry.is_dead("a"));
        drop(token);
        assert!(registry.is_dead("a"));
    }

    #[test]
    fn a_lock_file_owner_is_alive_while_held_and_dead_once_its_holder_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let registry = LockFileRegistry::beside(&dir.path().join("a.db"));
        assert!(!registry.is_dead("runtime_1"));
        let token = registry.hold("runtime_1").unwrap();
        assert!(!registry.is_dead("runtime_1"));
        // A second handle (another process's view) sees it held too.
        let other = LockFileRegistry::beside(&dir.path().join("a.db"));
        assert!(!other.is_dead("runtime_1"));
        drop(token);
        assert!(registry.is_dead("runtime_1"));
        assert!(other.is_dead("runtime_1"));
    }

    #[test]
    fn an_abandoned_lock_file_reads_dead_and_is_swept_unless_kept() {
        let dir = tempfile::tempdir().unwrap();
        let registry = LockFileRegistry::beside(&dir.path().join("a.db"));
        std::fs::create_dir_all(&registry.dir).unwrap();
        // What a killed process leaves: the file, without anyone's lock on it.
        std::fs::write(registry.path("dead one/x"), b"").unwrap();
        std::fs::write(registry.path("dead-two"), b"").unwrap();
        assert!(registry.is_dead("dead one/x"));
        registry.sweep(|owner| owner == "dead one/x");
        assert!(registry.is_dead("dead one/x"));
        assert!(!registry.path("dead-two").exists());
    }
}
