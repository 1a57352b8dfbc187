//! Process plumbing of the node agent: spawning a server, pid files, liveness, signals.

use std::fs::OpenOptions;
use std::path::Path;
use std::process::Stdio;

use keel_core::{faults, Layout};
use nix::sys::signal::{kill as send_signal, Signal};
use nix::unistd::Pid;

/// Spawns `keel server run NAME` detached into its own process group, stdout/stderr appended
/// to the server's native logs. `KEEL_FAULTS` is set only when the caller passes it, and
/// removed otherwise, so the agent's own environment never leaks into a server.
/// Returns the child and the length native_stderr.log had before the launch, so a failure
/// reason is read only from what this launch wrote.
pub(crate) fn spawn(
    exe: &Path,
    profile: &Path,
    layout: &Layout,
    server: &str,
    recovery: bool,
    faults_spec: Option<&str>,
) -> Result<(tokio::process::Child, u64), String> {
    let dir = layout.logs(server);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let open = |p: std::path::PathBuf| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(|e| format!("cannot open {}: {e}", p.display()))
    };
    let stdout = open(dir.join("native_stdout.log"))?;
    let stderr = open(layout.native_stderr(server))?;
    let stderr_offset = stderr.metadata().map(|m| m.len()).unwrap_or(0);
    let mut cmd = tokio::process::Command::new(exe);
    // The canonical path, so `is_profile_process` can recognise the process by it later.
    let profile = std::fs::canonicalize(profile).unwrap_or_else(|_| profile.to_path_buf());
    cmd.arg("server")
        .arg("run")
        .arg(server)
        .arg("--profile")
        .arg(&profile);
    if recovery {
        cmd.arg("--recovery");
    }
    cmd.env_remove(faults::ENV);
    if let Some(spec) = faults_spec.filter(|s| !s.is_empty()) {
        cmd.env(faults::ENV, spec);
    }
    cmd.stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(false);
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot launch server {server} with {}: {e}", exe.display()))?;
    Ok((child, stderr_offset))
}

pub(crate) fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether `pid` is a running process. A zombie counts as dead: an orphaned process is reaped
/// by PID 1, and some inits reap late (seen: over a second), which would otherwise delay noticing
/// an exit.
pub fn alive(pid: u32) -> bool {
    let Ok(p) = i32::try_from(pid) else {
        return false;
    };
    if p <= 0 || send_signal(Pid::from_raw(p), None).is_err() {
        return false;
    }
    // /proc/<pid>/stat is "pid (comm) S ..."; comm may hold spaces or parens, so read the
    // state after the last ')'.
    match std::fs::read_to_string(format!("/proc/{p}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state != "Z" && state != "X"),
        Err(_) => true,
    }
}

/// SIGTERM (normal stop) or SIGKILL (force). Errors mean the process is already gone.
pub(crate) fn kill(pid: u32, force: bool) {
    if let Ok(p) = i32::try_from(pid) {
        if p > 0 {
            let _ = send_signal(
                Pid::from_raw(p),
                if force {
                    Signal::SIGKILL
                } else {
                    Signal::SIGTERM
                },
            );
        }
    }
}

/// The last non-empty line written to the server's native_stderr.log after byte `from`: a
/// server writes its fatal start error there as one sentence (bounded read of the last 8 KiB).
pub fn tail_reason(layout: &Layout, server: &str, from: u64) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(layout.native_stderr(server)).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(8192).max(from.min(len))))
        .ok()?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string)
}

/// Whether `pid` is a live `keel` process of the profile at `profile` (its command line names
/// the profile). Pid files outlive crashed processes and pids are reused, so nothing is ever
/// signalled on the strength of a pid file alone.
pub fn is_profile_process(pid: u32, profile: &Path) -> bool {
    if !alive(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let want = profile.as_os_str().as_encoded_bytes();
    let canon = std::fs::canonicalize(profile).ok();
    cmdline.split(|b| *b == 0).any(|a| {
        a == want
            || canon
                .as_ref()
                .is_some_and(|c| a == c.as_os_str().as_encoded_bytes())
    })
}
