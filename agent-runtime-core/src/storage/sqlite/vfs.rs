//! A VFS over the default one that writes each WAL frame with one `pwrite` instead of two: the
//! writer's connection opens its file through it.
//!
//! SQLite appends a WAL frame as two writes, its 24-byte header and then its page at the next
//! offset (`walWriteOneFrame`), so every page a commit writes is two system calls. This VFS,
//! registered once under [`NAME`] and wrapping the default VFS (`unix`), wraps only the WAL files
//! it opens; every other file (the database, its shared-memory index, temporary files) is opened
//! by the default VFS into the same memory and used as if this VFS were not there. On a WAL file
//! a 24-byte write past the WAL's own 32-byte header is held in memory, not written; a write that
//! starts right after it (the frame's page) goes out together with it in one call; anything else
//! first writes the held header at its own offset and then proceeds: any other write, a read, a
//! sync, a truncation, a size query, a lock change, a file control, a shared-memory call or the
//! close. The two operations that cannot report an error (the sector size and the device
//! characteristics) read nothing of the file and leave a held header held.
//!
//! Why this is as crash-safe as the two writes: SQLite reads a WAL back only up to its last
//! frame whose header checksum, salt and commit mark are valid, so a frame torn by a crash
//! (header without page, page without header, either half-written) is ignored either way, and
//! with it the transaction it belonged to, which had not been reported committed: a commit
//! returns only after its frames were written (and synced, where `synchronous` asks for it), and
//! a sync here writes a held header first. A header held in memory when the process dies is a
//! frame never written, the same as dying one call earlier. Nothing reads the WAL between the two
//! writes (a frame is not visible to readers until the commit's WAL-index update, after all its
//! frames are written), and every call on a file comes from its one connection, which SQLite
//! serializes.

#![allow(unsafe_code)]

use std::ffi::{CStr, c_int, c_void};
use std::sync::OnceLock;

use rusqlite::ffi;

/// The name the shim is registered under.
pub(super) const NAME: &CStr = c"agent-runtime-wal-frames";

/// Size of a WAL frame's header (SQLite's `WAL_FRAME_HDRSIZE`).
const FRAME_HEADER: usize = 24;
/// Size of the WAL file's own header (`WAL_HDRSIZE`): frames start after it.
const WAL_HEADER: i64 = 32;

/// A WAL file opened through the shim. SQLite allocates `szOsFile` bytes for it: this struct,
/// then the default VFS's file at [`REAL_OFFSET`].
#[repr(C)]
struct WalFile {
    /// What SQLite sees: `pMethods` is [`WAL_METHODS`].
    base: ffi::sqlite3_file,
    /// The default VFS's file, in the same allocation.
    real: *mut ffi::sqlite3_file,
    /// A frame header written but not yet passed on, and its offset.
    held: Option<([u8; FRAME_HEADER], i64)>,
    /// The buffer a header and its page are joined in (grown once to a frame's size).
    joined: Vec<u8>,
}

/// Where the default VFS's file starts in a shim file's allocation (16-byte aligned).
const REAL_OFFSET: usize = std::mem::size_of::<WalFile>().next_multiple_of(16);

/// Registers the shim (once per process); its name for `Connection::open_with_flags_and_vfs`.
pub(super) fn register() -> Result<&'static CStr, String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            // SAFETY: `sqlite3_vfs_find` initializes SQLite and returns the default VFS, which
            // lives as long as the process. The copy is leaked: registered VFSs must outlive
            // every connection using them.
            unsafe {
                let real = ffi::sqlite3_vfs_find(std::ptr::null());
                if real.is_null() {
                    return Err("SQLite has no default VFS".to_string());
                }
                let mut shim: ffi::sqlite3_vfs = *real;
                let size = REAL_OFFSET + usize::try_from((*real).szOsFile).unwrap_or(0);
                shim.szOsFile = c_int::try_from(size).map_err(|e| e.to_string())?;
                shim.zName = NAME.as_ptr();
                shim.pNext = std::ptr::null_mut();
                shim.pAppData = real.cast::<c_void>();
                // Every other method is the default VFS's own; the unix VFS's ignore the VFS
                // pointer they are given, but for `xOpen` (which gets the real one below).
                shim.xOpen = Some(open);
                let rc = ffi::sqlite3_vfs_register(Box::into_raw(Box::new(shim)), 0);
                if rc != ffi::SQLITE_OK {
                    return Err(format!("cannot register the WAL-frame VFS (code {rc})"));
                }
                Ok(())
            }
        })
        .clone()
        .map(|()| NAME)
}

/// `xOpen`: a WAL file is wrapped, anything else is the default VFS's file as is.
unsafe extern "C" fn open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    // SAFETY: `vfs` is the shim, whose `pAppData` is the default VFS; `file` points to
    // `szOsFile` bytes, room for a `WalFile` and the default VFS's file after it.
    unsafe {
        let real_vfs = (*vfs).pAppData.cast::<ffi::sqlite3_vfs>();
        let Some(real_open) = (*real_vfs).xOpen else {
            return ffi::SQLITE_CANTOPEN;
        };
        if flags & ffi::SQLITE_OPEN_WAL == 0 {
            return real_open(real_vfs, name, file, flags, out_flags);
        }
        let real = file.cast::<u8>().add(REAL_OFFSET).cast::<ffi::sqlite3_file>();
        (*real).pMethods = std::ptr::null();
        let rc = real_open(real_vfs, name, real, flags, out_flags);
        if rc != ffi::SQLITE_OK || (*real).pMethods.is_null() {
            // SQLite does not close a file whose `pMethods` is null.
            (*file).pMethods = std::ptr::null();
            return if rc == ffi::SQLITE_OK {
                ffi::SQLITE_CANTOPEN
            } else {
                rc
            };
        }
        file.cast::<WalFile>().write(WalFile {
            base: ffi::sqlite3_file {
                pMethods: &WAL_METHODS,
            },
            real,
            held: None,
            joined: Vec::new(),
        });
        ffi::SQLITE_OK
    }
}

/// The shim's state and the default VFS's methods of a wrapped WAL file.
///
/// # Safety
/// `file` must be a file opened by [`open`] with the WAL flag, not yet closed.
unsafe fn parts<'a>(file: *mut ffi::sqlite3_file) -> (&'a mut WalFile, &'a ffi::sqlite3_io_methods) {
    // SAFETY: per the contract, `file` is an initialized `WalFile` whose `real` file is open
    // (its `pMethods` set by the default VFS).
    unsafe {
        let shim = &mut *file.cast::<WalFile>();
        let methods = &*(*shim.real).pMethods;
        (shim, methods)
    }
}

/// Writes a held header, if any, at its offset.
fn flush(shim: &mut WalFile, methods: &ffi::sqlite3_io_methods) -> c_int {
    match (shim.held.take(), methods.xWrite) {
        (None, _) => ffi::SQLITE_OK,
        // SAFETY: `real` is open; the buffer lives across the call.
        (Some((header, offset)), Some(write)) => unsafe {
            write(shim.real, header.as_ptr().cast(), FRAME_HEADER as c_int, offset)
        },
        (Some(_), None) => ffi::SQLITE_IOERR_WRITE,
    }
}

/// Runs `then` on the default VFS's file after writing a held header; a failed write is the
/// result instead.
///
/// # Safety
/// As [`parts`].
unsafe fn flushed(
    file: *mut ffi::sqlite3_file,
    then: impl FnOnce(*mut ffi::sqlite3_file, &ffi::sqlite3_io_methods) -> Option<c_int>,
) -> c_int {
    // SAFETY: per the contract.
    let (shim, methods) = unsafe { parts(file) };
    let rc = flush(shim, methods);
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    then(shim.real, methods).unwrap_or(ffi::SQLITE_IOERR)
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite closes a file once; the `WalFile` is dropped in place after, and SQLite
    // frees its memory.
    unsafe {
        let (shim, methods) = parts(file);
        let flushed = flush(shim, methods);
        let rc = methods.xClose.map_or(ffi::SQLITE_OK, |close| close(shim.real));
        std::ptr::drop_in_place(file.cast::<WalFile>());
        (*file).pMethods = std::ptr::null();
        if flushed != ffi::SQLITE_OK { flushed } else { rc }
    }
}

unsafe extern "C" fn write(
    file: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: `file` is a wrapped WAL file; `buf` holds `amount` bytes (SQLite's contract).
    unsafe {
        let (shim, methods) = parts(file);
        let Some(real_write) = methods.xWrite else {
            return ffi::SQLITE_IOERR_WRITE;
        };
        let len = usize::try_from(amount).unwrap_or(0);
        match shim.held {
            Some((header, at)) if offset == at + FRAME_HEADER as i64 && len > 0 => {
                shim.held = None;
                shim.joined.clear();
                shim.joined.extend_from_slice(&header);
                shim.joined
                    .extend_from_slice(std::slice::from_raw_parts(buf.cast::<u8>(), len));
                #[cfg(test)]
                tests::JOINED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let total = c_int::try_from(shim.joined.len()).unwrap_or(c_int::MAX);
                return real_write(shim.real, shim.joined.as_ptr().cast(), total, at);
            }
            Some(_) => {
                let rc = flush(shim, methods);
                if rc != ffi::SQLITE_OK {
                    return rc;
                }
            }
            None => {}
        }
        if len == FRAME_HEADER && offset >= WAL_HEADER {
            let mut header = [0u8; FRAME_HEADER];
            header.copy_from_slice(std::slice::from_raw_parts(buf.cast::<u8>(), FRAME_HEADER));
            shim.held = Some((header, offset));
            return ffi::SQLITE_OK;
        }
        real_write(shim.real, buf, amount, offset)
    }
}

unsafe extern "C" fn read(
    file: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe { flushed(file, |real, m| m.xRead.map(|f| f(real, buf, amount, offset))) }
}

unsafe extern "C" fn truncate(file: *mut ffi::sqlite3_file, size: i64) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe { flushed(file, |real, m| m.xTruncate.map(|f| f(real, size))) }
}

unsafe extern "C" fn sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe { flushed(file, |real, m| m.xSync.map(|f| f(real, flags))) }
}

unsafe extern "C" fn file_size(file: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe { flushed(file, |real, m| m.xFileSize.map(|f| f(real, size))) }
}

unsafe extern "C" fn lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe { flushed(file, |real, m| m.xLock.map(|f| f(real, level))) }
}

unsafe extern "C" fn unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe { flushed(file, |real, m| m.xUnlock.map(|f| f(real, level))) }
}

unsafe extern "C" fn check_reserved_lock(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe { flushed(file, |real, m| m.xCheckReservedLock.map(|f| f(real, out))) }
}

unsafe extern "C" fn file_control(file: *mut ffi::sqlite3_file, op: c_int, arg: *mut c_void) -> c_int {
    // SAFETY: forwarded as SQLite called it; an unknown op is "not found", as SQLite expects.
    unsafe {
        let (shim, methods) = parts(file);
        let rc = flush(shim, methods);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        methods
            .xFileControl
            .map_or(ffi::SQLITE_NOTFOUND, |f| f(shim.real, op, arg))
    }
}

unsafe extern "C" fn sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: forwarded as SQLite called it; it reads nothing of the file.
    unsafe {
        let (shim, methods) = parts(file);
        methods.xSectorSize.map_or(4096, |f| f(shim.real))
    }
}

unsafe extern "C" fn device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: forwarded as SQLite called it; it reads nothing of the file.
    unsafe {
        let (shim, methods) = parts(file);
        methods.xDeviceCharacteristics.map_or(0, |f| f(shim.real))
    }
}

unsafe extern "C" fn shm_map(
    file: *mut ffi::sqlite3_file,
    page: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe {
        flushed(file, |real, m| {
            m.xShmMap.map(|f| f(real, page, size, extend, out))
        })
    }
}

unsafe extern "C" fn shm_lock(file: *mut ffi::sqlite3_file, offset: c_int, n: c_int, flags: c_int) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe { flushed(file, |real, m| m.xShmLock.map(|f| f(real, offset, n, flags))) }
}

unsafe extern "C" fn shm_barrier(file: *mut ffi::sqlite3_file) {
    // SAFETY: forwarded as SQLite called it. A barrier orders memory, not the file; a held
    // header (there is none between a commit's frame writes and its index update) is written by
    // the next call that can report an error.
    unsafe {
        let (shim, methods) = parts(file);
        if let Some(f) = methods.xShmBarrier {
            f(shim.real);
        }
    }
}

unsafe extern "C" fn shm_unmap(file: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe { flushed(file, |real, m| m.xShmUnmap.map(|f| f(real, delete))) }
}

unsafe extern "C" fn fetch(
    file: *mut ffi::sqlite3_file,
    offset: i64,
    amount: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: forwarded as SQLite called it; without the method, no mapping (as SQLite expects).
    unsafe {
        let (shim, methods) = parts(file);
        let rc = flush(shim, methods);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        match methods.xFetch {
            Some(f) => f(shim.real, offset, amount, out),
            None => {
                *out = std::ptr::null_mut();
                ffi::SQLITE_OK
            }
        }
    }
}

unsafe extern "C" fn unfetch(file: *mut ffi::sqlite3_file, offset: i64, page: *mut c_void) -> c_int {
    // SAFETY: forwarded as SQLite called it.
    unsafe {
        let (shim, methods) = parts(file);
        let rc = flush(shim, methods);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        methods
            .xUnfetch
            .map_or(ffi::SQLITE_OK, |f| f(shim.real, offset, page))
    }
}

/// The methods of a wrapped WAL file (version 3: shared memory and memory mapping included).
static WAL_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved_lock),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: Some(shm_map),
    xShmLock: Some(shm_lock),
    xShmBarrier: Some(shm_barrier),
    xShmUnmap: Some(shm_unmap),
    xFetch: Some(fetch),
    xUnfetch: Some(unfetch),
};

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use rusqlite::{Connection, OpenFlags, params};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Frames written as one call, by every test of the process.
    pub(super) static JOINED: AtomicUsize = AtomicUsize::new(0);

    fn open_through_shim(path: &std::path::Path) -> Connection {
        let conn =
            Connection::open_with_flags_and_vfs(path, OpenFlags::default(), register().unwrap()).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA wal_autocheckpoint = 0;
             CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)",
        )
        .unwrap();
        conn
    }

    fn rows_and_integrity(path: &std::path::Path) -> (i64, String) {
        let plain = Connection::open(path).unwrap();
        let rows = plain
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        let check = plain
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        (rows, check)
    }

    /// Commits written through the shim (each frame one write) are read back by a plain
    /// connection, while the writer is open (from the WAL) and after it closed.
    #[test]
    fn a_wal_written_through_the_shim_reads_back_whole_with_a_plain_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shim.db");
        let conn = open_through_shim(&path);
        let joined_before = JOINED.load(Ordering::Relaxed);
        let blob = "x".repeat(3000);
        for k in 0..300i64 {
            conn.execute("INSERT INTO t VALUES (?1, ?2)", params![k, blob])
                .unwrap();
        }
        // Every commit wrote at least one frame, each joined with its header.
        assert!(JOINED.load(Ordering::Relaxed) - joined_before >= 300);
        assert_eq!(rows_and_integrity(&path), (300, "ok".to_string()));
        conn.execute("DELETE FROM t WHERE k % 2 = 0", []).unwrap();
        drop(conn);
        assert_eq!(rows_and_integrity(&path), (150, "ok".to_string()));
    }

    /// What is on disk while the writer is open is what a crash leaves: a copy of the database
    /// and its WAL taken then opens with every committed row, and nothing else.
    #[test]
    fn a_copy_taken_mid_run_recovers_every_committed_frame() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("live.db");
        let conn = open_through_shim(&path);
        for k in 0..100i64 {
            conn.execute("INSERT INTO t VALUES (?1, 'committed')", [k])
                .unwrap();
        }
        // An open transaction's frames may be in the WAL too (a spilled cache), uncommitted.
        conn.execute_batch("BEGIN; INSERT INTO t VALUES (1000, 'open');")
            .unwrap();
        let copy = dir.path().join("copy.db");
        std::fs::copy(&path, &copy).unwrap();
        let mut wal = path.clone().into_os_string();
        wal.push("-wal");
        let mut copy_wal = copy.clone().into_os_string();
        copy_wal.push("-wal");
        std::fs::copy(&wal, &copy_wal).unwrap();
        assert_eq!(rows_and_integrity(&copy), (100, "ok".to_string()));
        conn.execute_batch("ROLLBACK").unwrap();
    }

    /// Files other than the WAL are the default VFS's own: a connection through the shim without
    /// WAL mode (a rollback journal) works as any other.
    #[test]
    fn files_other_than_the_wal_pass_through_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.db");
        let conn =
            Connection::open_with_flags_and_vfs(&path, OpenFlags::default(), register().unwrap()).unwrap();
        conn.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")
            .unwrap();
        for k in 0..50i64 {
            conn.execute("INSERT INTO t VALUES (?1, 'j')", [k]).unwrap();
        }
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "delete");
        drop(conn);
        assert_eq!(rows_and_integrity(&path), (50, "ok".to_string()));
    }
}
