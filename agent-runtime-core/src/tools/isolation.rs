//! The process sandbox: every process a tool starts (`execute_command`, the git tools) runs under
//! Landlock (which files) and seccomp (which system calls), per agent, entered before its first line.
//!
//! What a sandboxed command may do:
//!
//! - **read** the system's toolchain (`/usr`, `/lib*`, `/bin`, `/sbin`, `/etc`, `/opt`, `/proc`, `/sys`,
//!   `/dev`), the project, and the paths of `SANDBOX_READ_PATHS`; nothing else (not the home directory);
//! - **write** the project when its agent may write files ([`crate::agent::PathRule::Any`], the `coder`),
//!   its own scratch directory (its `TMPDIR`, removed when the command ends), `/dev/null`-like devices,
//!   and the paths of `SANDBOX_WRITE_PATHS`; an agent whose path rule limits writing (`debug`,
//!   `architect`, any read-only agent) gets a read-only project;
//! - **network**: only Unix sockets, unless its agent is listed in `SANDBOX_NETWORK_AGENTS`;
//! - never `ptrace` or read another process's memory, `io_uring`, `bpf`, `perf_event_open`,
//!   `userfaultfd`, or any Landlock call (it cannot widen its ruleset; `no_new_privs` and seccomp's
//!   rule that filters only ever add up mean it cannot be lifted either, also by a grandchild after
//!   its parent exited, since the restrictions are inherited through `fork` and `exec`); signals and
//!   abstract Unix sockets reach only processes of the same sandbox (Landlock ABI 6 scopes).
//!
//! The seccomp program is built here by hand (about 30 classic-BPF instructions) rather than with a
//! filter compiler crate: it must also refuse the x32 system-call numbers, which share the x86-64
//! architecture tag, and it is small enough to read in full ([`seccomp_program`]). The Landlock ruleset
//! is built with the `landlock` crate. Both are prepared in the parent; [`sys`] applies them in the
//! child. `SANDBOX=off` runs commands as before, with the server's full rights; a kernel without
//! Landlock refuses commands unless that was chosen explicitly.

mod sys;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use landlock::{ABI, Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, Scope};
use serde::{Deserialize, Serialize};
use tokio::process::Command;

use super::ToolFailure;

/// `SANDBOX`: whether tool processes run sandboxed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxMode {
    /// Landlock and seccomp around every process a tool starts (the default).
    Enforce,
    /// No sandbox: commands run with the server's own rights.
    Off,
}

impl SandboxMode {
    /// Parses `enforce` / `off`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "enforce" => Some(SandboxMode::Enforce),
            "off" => Some(SandboxMode::Off),
            _ => None,
        }
    }
}

/// The sandbox settings of the runtime (`SANDBOX`, `SANDBOX_READ_PATHS`, `SANDBOX_WRITE_PATHS`,
/// `SANDBOX_NETWORK_AGENTS`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSettings {
    /// `SANDBOX`: `enforce` (default) or `off`.
    pub mode: SandboxMode,
    /// `SANDBOX_READ_PATHS`: more paths commands may read (tool caches, e.g. `~/.cargo`).
    pub read_paths: Vec<PathBuf>,
    /// `SANDBOX_WRITE_PATHS`: more paths commands may write.
    pub write_paths: Vec<PathBuf>,
    /// `SANDBOX_NETWORK_AGENTS`: agents whose commands may open IP sockets; default none.
    pub network_agents: Vec<String>,
}

impl Default for SandboxSettings {
    fn default() -> Self {
        SandboxSettings {
            mode: SandboxMode::Enforce,
            read_paths: vec![],
            write_paths: vec![],
            network_agents: vec![],
        }
    }
}

impl SandboxSettings {
    /// The sandbox of `agent`'s commands: the project writable only when its path rule allows every
    /// path, the network only when it is listed.
    pub fn for_agent(&self, agent: &crate::agent::AgentDefinition) -> CommandSandbox {
        CommandSandbox {
            mode: self.mode,
            project_writable: agent.path_rule == crate::agent::PathRule::Any,
            network: self.network_agents.contains(&agent.agent_type),
            read_paths: self.read_paths.clone(),
            write_paths: self.write_paths.clone(),
        }
    }
}

/// The sandbox of one tool call's processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSandbox {
    /// Enforced or off.
    pub mode: SandboxMode,
    /// Whether the project may be written (else it is read-only).
    pub project_writable: bool,
    /// Whether IP sockets may be opened.
    pub network: bool,
    /// More readable paths.
    pub read_paths: Vec<PathBuf>,
    /// More writable paths.
    pub write_paths: Vec<PathBuf>,
}

impl Default for CommandSandbox {
    /// Enforced, project writable, no network, nothing extra.
    fn default() -> Self {
        CommandSandbox {
            mode: SandboxMode::Enforce,
            project_writable: true,
            network: false,
            read_paths: vec![],
            write_paths: vec![],
        }
    }
}

impl CommandSandbox {
    /// What the commands may do, as `GET /agents` shows it.
    pub fn rights(&self) -> CommandRights {
        let enforced = self.mode == SandboxMode::Enforce;
        CommandRights {
            sandbox: self.mode,
            project: if !enforced || self.project_writable {
                "read_write"
            } else {
                "read_only"
            }
            .into(),
            network: !enforced || self.network,
            extra_read_paths: self.read_paths.iter().map(|p| p.display().to_string()).collect(),
            extra_write_paths: self.write_paths.iter().map(|p| p.display().to_string()).collect(),
        }
    }
}

/// An agent's command rights (`GET /agents`, field `command_rights`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CommandRights {
    /// `enforce` or `off` (`off`: the server's own rights).
    pub sandbox: SandboxMode,
    /// `read_write` or `read_only`: what its commands may do to the project.
    pub project: String,
    /// Whether its commands may open IP sockets.
    pub network: bool,
    /// Paths beyond the system's toolchain its commands may read.
    pub extra_read_paths: Vec<String>,
    /// Paths beyond the project and their scratch directory its commands may write.
    pub extra_write_paths: Vec<String>,
}

/// What the running kernel gives the sandbox (`GET /health`, field `sandbox`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SandboxStatus {
    /// `enforce` or `off`.
    pub mode: SandboxMode,
    /// The Landlock ABI of the kernel; 0 when it has none (then commands are refused under `enforce`).
    pub landlock_abi: i32,
    /// Whether the seccomp filter is available for this architecture.
    pub seccomp: bool,
    /// How the file tools open paths: `openat2` (confined by the kernel) or `path_walk` (checked
    /// component by component, for kernels before 5.6).
    pub file_tools: String,
}

/// The sandbox as the kernel allows it under `mode`.
pub fn status(mode: SandboxMode) -> SandboxStatus {
    SandboxStatus {
        mode,
        landlock_abi: landlock_abi(),
        seccomp: AUDIT_ARCH.is_some(),
        file_tools: if super::beneath::openat2_available() {
            "openat2"
        } else {
            "path_walk"
        }
        .into(),
    }
}

/// The kernel's Landlock ABI, asked once.
fn landlock_abi() -> i32 {
    static ABI_VERSION: OnceLock<i32> = OnceLock::new();
    *ABI_VERSION.get_or_init(sys::landlock_abi)
}

/// The ABI whose access rights the ruleset asks for; a kernel with less gets what it offers (its ABI
/// is shown in `/health`).
const TARGET_ABI: ABI = ABI::V6;

/// System paths every sandboxed command may read and execute.
const SYSTEM_READ: &[&str] = &[
    "/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin", "/etc", "/opt", "/proc", "/sys", "/dev",
];

/// Devices every sandboxed command may write.
const DEVICES_WRITE: &[&str] = &["/dev/null", "/dev/zero", "/dev/full", "/dev/tty"];

/// Makes the child of `cmd` get SIGKILL when the runtime dies (`PR_SET_PDEATHSIG`).
pub(crate) fn die_with_parent(cmd: &mut Command) {
    sys::die_with_parent(cmd);
}

/// A command's sandbox, ready for `spawn`: the ruleset's descriptor, the seccomp program and the
/// scratch directory (removed when this is dropped, after the command ended).
#[derive(Debug)]
pub(crate) struct Confinement {
    ruleset: Option<OwnedFd>,
    filter: Arc<Vec<libc::sock_filter>>,
    scratch: Option<tempfile::TempDir>,
}

impl Confinement {
    /// Prepares the sandbox of a command run in `root` (canonical). `Ok(None)` when it is off.
    pub(crate) fn prepare(policy: &CommandSandbox, root: &Path) -> Result<Option<Self>, ToolFailure> {
        if policy.mode == SandboxMode::Off {
            return Ok(None);
        }
        let abi = landlock_abi();
        if abi == 0 {
            return Err(ToolFailure::Failed(
                "commands are refused: this kernel offers no Landlock (Linux 5.13 or later with \
                 Landlock enabled at boot, e.g. lsm=landlock,...), which SANDBOX=enforce needs; \
                 set SANDBOX=off to run commands with the server's full rights"
                    .into(),
            ));
        }
        let Some(arch) = AUDIT_ARCH else {
            return Err(ToolFailure::Failed(
                "commands are refused: the seccomp filter is not available for this architecture; \
                 set SANDBOX=off to run commands with the server's full rights"
                    .into(),
            ));
        };
        for p in &policy.read_paths {
            if !p.exists() {
                return Err(ToolFailure::Failed(format!(
                    "SANDBOX_READ_PATHS: '{}' does not exist; remove it from the setting or create it",
                    p.display()
                )));
            }
        }
        for p in &policy.write_paths {
            if !p.exists() {
                return Err(ToolFailure::Failed(format!(
                    "SANDBOX_WRITE_PATHS: '{}' does not exist; remove it from the setting or create it",
                    p.display()
                )));
            }
        }
        let scratch = tempfile::Builder::new()
            .prefix("agent-runtime-cmd-")
            .tempdir()
            .map_err(|e| {
                ToolFailure::Failed(format!("cannot create the command's scratch directory: {e}"))
            })?;
        let ruleset = ruleset(policy, root, scratch.path()).map_err(|e| {
            ToolFailure::Failed(format!("cannot prepare the command's Landlock ruleset: {e}"))
        })?;
        Ok(Some(Confinement {
            ruleset,
            filter: Arc::new(seccomp_program(arch, policy.network)),
            scratch: Some(scratch),
        }))
    }

    /// Makes `cmd` enter this sandbox before `exec`, with its scratch directory as `TMPDIR` and `HOME`
    /// (so tools neither look for nor fail on the real home directory, which they may not read).
    pub(crate) fn apply(&self, cmd: &mut Command) {
        if let Some(dir) = &self.scratch {
            for var in ["TMPDIR", "TMP", "TEMP", "HOME"] {
                cmd.env(var, dir.path());
            }
        }
        sys::enter_before_exec(
            cmd,
            self.ruleset.as_ref().map(AsRawFd::as_raw_fd),
            Arc::clone(&self.filter),
        );
    }
}

/// The Landlock ruleset of `policy`, as the descriptor `landlock_restrict_self` takes.
fn ruleset(policy: &CommandSandbox, root: &Path, scratch: &Path) -> Result<Option<OwnedFd>, String> {
    let all = AccessFs::from_all(TARGET_ABI);
    let read = AccessFs::from_read(TARGET_ABI);
    let mut rules: Vec<(PathBuf, landlock::BitFlags<AccessFs>)> =
        SYSTEM_READ.iter().map(|p| (PathBuf::from(p), read)).collect();
    rules.push((PathBuf::from("/dev"), read | AccessFs::IoctlDev));
    rules.extend(
        DEVICES_WRITE
            .iter()
            .map(|p| (PathBuf::from(p), read | AccessFs::WriteFile)),
    );
    rules.extend(policy.read_paths.iter().map(|p| (p.clone(), read)));
    rules.push((
        root.to_path_buf(),
        if policy.project_writable { all } else { read },
    ));
    rules.push((scratch.to_path_buf(), all));
    rules.extend(policy.write_paths.iter().map(|p| (p.clone(), all)));

    let scopes = if policy.network {
        landlock::BitFlags::from(Scope::Signal)
    } else {
        Scope::Signal | Scope::AbstractUnixSocket
    };
    let mut created = Ruleset::default()
        .handle_access(all)
        .and_then(|r| r.scope(scopes))
        .and_then(|r| r.create())
        .map_err(|e| e.to_string())?;
    for (path, access) in rules {
        // System paths a distribution does not have (e.g. `/lib32`) are skipped; the operator's were
        // checked to exist.
        let Ok(fd) = PathFd::new(&path) else { continue };
        // A file (e.g. `/dev/null`) takes only the rights that apply to files.
        let access = if path.is_dir() {
            access
        } else {
            access & AccessFs::from_file(TARGET_ABI)
        };
        created = created
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(created.into())
}

/// The `AUDIT_ARCH_*` tag of this build's architecture; `None` where no filter is built.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: Option<u32> = Some(0xC000_003E);
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: Option<u32> = Some(0xC000_00B7);
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const AUDIT_ARCH: Option<u32> = None;

/// System calls refused with `EPERM`: reading or steering other processes, io_uring (a second way to
/// make system calls, unseen by this filter), kernel-side programs, and Landlock itself.
const DENIED_SYSCALLS: &[libc::c_long] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_landlock_create_ruleset,
    libc::SYS_landlock_add_rule,
    libc::SYS_landlock_restrict_self,
];

/// Offsets in `struct seccomp_data`: the system call's number, its architecture, its first argument
/// (the low 32 bits on a little-endian machine, where `socket`'s `int domain` lives).
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
const DATA_ARG0_LOW: u32 = 16;

/// Bit 30 of the number marks the x32 ABI on x86-64 (same architecture tag, other numbers).
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// The seccomp program: the wrong architecture kills the process (a 32-bit `int 0x80` would see other
/// system-call numbers); x32 numbers and [`DENIED_SYSCALLS`] get `EPERM`; without `network`, `socket`
/// of any family but `AF_UNIX` gets `EACCES`; everything else is allowed.
fn seccomp_program(arch: u32, network: bool) -> Vec<libc::sock_filter> {
    fn stmt(code: u32, k: u32) -> libc::sock_filter {
        libc::sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        }
    }
    // A conditional jump whose true branch is patched once the targets' positions are known.
    enum Target {
        Eperm,
        Socket,
    }
    let ld = |off| stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, off);
    let ret = |k| stmt(libc::BPF_RET | libc::BPF_K, k);
    let jeq = |k| stmt(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, k);
    let jge = |k| stmt(libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K, k);

    let mut prog = vec![ld(DATA_ARCH)];
    // Right architecture: skip the kill.
    let mut check_arch = jeq(arch);
    check_arch.jt = 1;
    prog.push(check_arch);
    prog.push(ret(libc::SECCOMP_RET_KILL_PROCESS));
    prog.push(ld(DATA_NR));
    let mut jumps: Vec<(usize, Target)> = Vec::new();
    if cfg!(target_arch = "x86_64") {
        jumps.push((prog.len(), Target::Eperm));
        prog.push(jge(X32_SYSCALL_BIT));
    }
    for nr in DENIED_SYSCALLS {
        jumps.push((prog.len(), Target::Eperm));
        prog.push(jeq(*nr as u32));
    }
    if !network {
        jumps.push((prog.len(), Target::Socket));
        prog.push(jeq(libc::SYS_socket as u32));
    }
    prog.push(ret(libc::SECCOMP_RET_ALLOW));
    let socket_at = prog.len();
    prog.push(ld(DATA_ARG0_LOW));
    let mut unix = jeq(libc::AF_UNIX as u32);
    unix.jf = 1;
    prog.push(unix);
    prog.push(ret(libc::SECCOMP_RET_ALLOW));
    prog.push(ret(libc::SECCOMP_RET_ERRNO | libc::EACCES as u32));
    let eperm_at = prog.len();
    prog.push(ret(libc::SECCOMP_RET_ERRNO | libc::EPERM as u32));
    for (at, target) in jumps {
        let to = match target {
            Target::Eperm => eperm_at,
            Target::Socket => socket_at,
        };
        // The program is about 30 instructions: every offset fits in a byte.
        prog[at].jt = u8::try_from(to - at - 1).unwrap_or(u8::MAX);
    }
    prog
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seccomp_program_jumps_only_forward_inside_itself() {
        for network in [false, true] {
            let prog = seccomp_program(0xC000_003E, network);
            assert!(prog.len() < 64, "{}", prog.len());
            for (i, ins) in prog.iter().enumerate() {
                let is_jump = ins.code as u32 & 0x07 == libc::BPF_JMP;
                if is_jump {
                    assert!(i + 1 + (ins.jt as usize) < prog.len());
                    assert!(i + 1 + (ins.jf as usize) < prog.len());
                }
            }
            let last = prog.last().unwrap();
            assert_eq!(last.k, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32);
        }
    }

    #[test]
    fn agents_get_the_project_as_their_path_rule_allows() {
        let settings = SandboxSettings {
            network_agents: vec!["coder".into()],
            ..SandboxSettings::default()
        };
        let agents = crate::agent::AgentRegistry::defaults();
        let rights = |t: &str| settings.for_agent(agents.get(t).unwrap()).rights();
        assert_eq!(
            rights("coder"),
            CommandRights {
                sandbox: SandboxMode::Enforce,
                project: "read_write".into(),
                network: true,
                extra_read_paths: vec![],
                extra_write_paths: vec![],
            }
        );
        for t in ["debug", "architect", "orchestrator", "ask"] {
            assert_eq!(
                rights(t),
                CommandRights {
                    sandbox: SandboxMode::Enforce,
                    project: "read_only".into(),
                    network: false,
                    extra_read_paths: vec![],
                    extra_write_paths: vec![],
                },
                "{t}"
            );
        }
    }
}
