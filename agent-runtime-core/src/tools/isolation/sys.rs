//! The only `unsafe` code of the crate: entering the sandbox in a forked child before `exec`, and
//! asking the kernel which Landlock ABI it offers, and tying an MCP server's life to the runtime's.
//!
//! Between `fork` and `exec` a child of a multi-threaded process may only make async-signal-safe
//! calls: no allocation, no locks. Everything is therefore prepared in the parent (the Landlock
//! ruleset's descriptor, the seccomp program) and the child makes exactly three system calls:
//! `prctl(PR_SET_NO_NEW_PRIVS)`, `landlock_restrict_self` and `prctl(PR_SET_SECCOMP)`. Errors are read
//! from `errno` with `io::Error::last_os_error`, which does not allocate; std sends them back to the
//! parent, whose `spawn` then fails.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use tokio::process::Command;

/// `LANDLOCK_CREATE_RULESET_VERSION`: ask `landlock_create_ruleset` for the ABI version.
const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;

/// The Landlock ABI the running kernel offers; 0 when it has none (not built, or not enabled at boot).
pub(super) fn landlock_abi() -> i32 {
    // SAFETY: with a null attribute pointer, size 0 and the VERSION flag the call reads and writes
    // no memory; it only returns the ABI number or an error.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    i32::try_from(v).unwrap_or(0).max(0)
}

/// Makes the child of `cmd` enter the sandbox right before `exec`: no new privileges, then the
/// Landlock ruleset `ruleset_fd` (when given), then the seccomp `filter`. The descriptor must stay
/// open until the command is spawned (the caller owns it); it is close-on-exec, so the command never
/// holds it.
pub(super) fn enter_before_exec(
    cmd: &mut Command,
    ruleset_fd: Option<RawFd>,
    filter: Arc<Vec<libc::sock_filter>>,
) {
    let child = move || -> io::Result<()> {
        // SAFETY: plain system calls on integers and on `filter`, which the closure keeps alive; no
        // allocation, no lock, nothing that is not async-signal-safe.
        unsafe {
            if libc::prctl(
                libc::PR_SET_NO_NEW_PRIVS,
                1 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            if let Some(fd) = ruleset_fd
                && libc::syscall(libc::SYS_landlock_restrict_self, fd, 0 as libc::c_uint) != 0
            {
                return Err(io::Error::last_os_error());
            }
            let program = libc::sock_fprog {
                len: u16::try_from(filter.len()).unwrap_or(u16::MAX),
                filter: filter.as_ptr().cast_mut(),
            };
            if libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                &program as *const libc::sock_fprog as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the closure only makes async-signal-safe system calls (see above).
    unsafe {
        cmd.pre_exec(child);
    }
}

/// Makes the child of `cmd` receive SIGKILL when the thread that started it ends (the runtime's
/// worker threads live as long as the runtime), so an MCP server dies with a SIGKILLed runtime.
pub(super) fn die_with_parent(cmd: &mut Command) {
    let child = || -> io::Result<()> {
        // SAFETY: one prctl on integers: async-signal-safe, no allocation, no lock.
        unsafe {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the closure only makes an async-signal-safe system call (see above).
    unsafe {
        cmd.pre_exec(child);
    }
}
