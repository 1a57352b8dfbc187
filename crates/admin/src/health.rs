//! The health ping's own path (DESIGN §10: no client load may starve it). A node agent used to
//! ping its servers over their admin port, where 256 long-polling clients (or thousands of
//! idle sockets) made the ping fail and the agent SIGKILL a healthy server. Now each process
//! also answers on a Unix socket in the profile's `run/` directory: mode 0600 in a 0700
//! directory, so only the profile's owner can connect, and nothing on the network can reach
//! it. Protocol: connect; the process writes one JSON line (its health) and closes.
//!
//! Unix socket paths are limited to 107 bytes; a profile whose path is longer gets no health
//! socket (`socket_path` says `None`) and its node agent pings over the admin port as before.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// The longest path `sockaddr_un` takes (108 bytes with the terminating NUL).
const SOCKET_PATH_BYTES_MAX: usize = 107;
/// Answers written at once; the only callers are the node agent and `keel` commands.
const ANSWERS_MAX: usize = 16;
/// An answer is a few hundred bytes; anything longer is not a Keel health answer.
const ANSWER_BYTES_MAX: u64 = 64 * 1024;
/// A caller that does not read its answer within this time is dropped.
const WRITE_TIMEOUT_MS: u64 = 2_000;

/// What a process answers: built fresh for every ping.
pub type Answer = Arc<dyn Fn() -> Value + Send + Sync>;

/// Where `process` of the profile whose run directory is `run_dir` answers, if the path fits.
pub fn socket_path(run_dir: &Path, process: &str) -> Option<PathBuf> {
    let path = run_dir.join(format!("{process}.health"));
    (path.as_os_str().len() <= SOCKET_PATH_BYTES_MAX).then_some(path)
}

/// Binds the health socket at `path` (replacing a stale one left by a crash; the caller holds
/// the process's pid file, so no live process owns it), readable and writable by the owner only.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Answers pings on `listener` until the task is dropped; removes the socket file then.
pub async fn serve(listener: UnixListener, path: PathBuf, answer: Answer) {
    struct Unlink(PathBuf);
    impl Drop for Unlink {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _unlink = Unlink(path);
    let slots = Arc::new(tokio::sync::Semaphore::new(ANSWERS_MAX));
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // dropped: the caller retries at its next ping
        };
        let mut line = serde_json::to_vec(&answer()).expect("a JSON value serializes");
        line.push(b'\n');
        tokio::spawn(async move {
            let write = async {
                sock.write_all(&line).await?;
                sock.shutdown().await
            };
            let _ = tokio::time::timeout(Duration::from_millis(WRITE_TIMEOUT_MS), write).await;
            drop(slot);
        });
    }
}

/// Asks the process answering at `path` for its health, within `timeout_ms`.
pub async fn ping(path: &Path, timeout_ms: u64) -> Result<Value, String> {
    let ask = async {
        let sock = UnixStream::connect(path)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
        let mut text = Vec::new();
        sock.take(ANSWER_BYTES_MAX)
            .read_to_end(&mut text)
            .await
            .map_err(|e| format!("reading from {} failed: {e}", path.display()))?;
        serde_json::from_slice::<Value>(&text).map_err(|e| {
            format!(
                "{} answered something that is not JSON: {e}",
                path.display()
            )
        })
    };
    match tokio::time::timeout(Duration::from_millis(timeout_ms), ask).await {
        Ok(Ok(v)) if v.get("ok") == Some(&Value::Bool(true)) => Ok(v),
        Ok(Ok(v)) => Err(format!("{} answered {v}", path.display())),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!(
            "{} did not answer within {timeout_ms} ms",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn answers_each_ping_fresh_and_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path(), "server1").unwrap();
        // A stale socket file from a crash is replaced.
        std::fs::write(&path, b"stale").unwrap();
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let n = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = n.clone();
        let answer: Answer = Arc::new(move || {
            let k = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            json!({"ok": true, "n": k})
        });
        let task = tokio::spawn(serve(listener, path.clone(), answer));
        assert_eq!(ping(&path, 2_000).await.unwrap()["n"], 0);
        assert_eq!(ping(&path, 2_000).await.unwrap()["n"], 1);
        task.abort();
        let _ = task.await;
        assert!(!path.exists(), "the socket file goes with the server");
        assert!(ping(&path, 500).await.is_err());
    }

    #[test]
    fn paths_too_long_for_a_unix_socket_get_none() {
        let long = PathBuf::from(format!("/{}", "d".repeat(120)));
        assert_eq!(socket_path(&long, "server1"), None);
        assert!(socket_path(Path::new("/tmp/p/run"), "server1").is_some());
    }
}
