//! Process logs: `logs/<process>/SystemOut.log`, one line per `tracing` event:
//!
//! ```text
//! [2026-11-24T10:36:08.123Z] 00000003 server I WSVR0001I: Server server1 open for work (...)
//! ```
//!
//! `[timestamp] thread component level ID: text`. The text of an event carrying `msg_id` is the
//! catalog template filled from the event's fields (so call sites never format message text),
//! which keeps every ID's wording in one place and the fields structured for the binary
//! repository that will sit beside this writer as a second layer.
//!
//! Invariant: a line is written with one `write_all` under the writer's lock, so concurrent
//! threads never interleave inside a line. Newlines inside fields are escaped, and a line is
//! cut at `LINE_BYTES_MAX` (16 KiB). Keel's own events log down to `KEEL_LOG` (default INFO);
//! dependencies log at WARN and above only, so a chatty library cannot drown the operator's
//! log. No fsync: the log is diagnostics, not state. SystemOut.log rotates past
//! `SYSTEM_OUT_BYTES_MAX` (16 MiB) into `SystemOut_<yy.mm.dd_hh.mm.ss>.log`, keeping the
//! `SYSTEM_OUT_KEPT_MAX` (5) newest.
//!
//! A failed write never stops the log and never takes its caller down: the part of a line that
//! landed is cut off again, the first lines that fail are held in memory (bounded) and written,
//! late, with a `WSVR0108W` line saying how many failed, at the first write that works again
//! (a full disk freed); stderr hears of it once per failure, through a write that cannot panic
//! (stderr is a file on the same full disk for a server). `eprintln!` panics when stderr cannot
//! be written: inside the logging layer that killed the thread that logged (the data store's
//! writer, on a full disk) and poisoned this lock, which stopped SystemOut.log for good. A
//! poisoned lock is now taken over (it still guards a whole line). At most `HELD_LINES_MAX`
//! lines (`HELD_BYTES_MAX` bytes) are held. Nothing in this layer or the repository writer may
//! panic on a failed write.
//!
//! Call [`flush`] at process exit so the repository gets what is still queued (the stop's own
//! records).
//!
//! The same events also go, as structured records, to the process's binary log repository
//! (`repo`: `logs/<process>/repository/`), through a bounded queue to a writer thread.

pub mod repo;

/// `eprintln!` that cannot panic: a process's stderr is `native_stderr.log` on the profile's
/// disk, and `eprintln!` panics when that disk is full (a failing start then ended in a panic
/// instead of its exit code).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use keel_core::catalog;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

/// Environment variable that lowers the level of Keel's own events (`debug`, `trace`).
pub const LEVEL_ENV: &str = "KEEL_LOG";

/// Bounds one rendered line, so a runaway field cannot fill the disk one event at a time.
const LINE_BYTES_MAX: usize = 16 * 1024;
/// Lines that failed to be written and are held for when writing works again: the start of
/// an outage is what an operator needs (what went wrong first), so the first ones are kept.
const HELD_LINES_MAX: usize = 256;
const HELD_BYTES_MAX: usize = 256 * 1024;

/// Writes a note to stderr without ever panicking (`eprintln!` panics when stderr fails, and a
/// server's stderr is a file that fills up with the disk).
pub fn stderr_note(text: &str) {
    let mut err = io::stderr().lock();
    let _ = err.write_all(text.as_bytes());
    let _ = err.write_all(b"\n");
}

#[derive(Clone)]
struct Sink {
    file: Arc<Mutex<LogFile>>,
    echo_stdout: bool,
}

/// SystemOut.log rotation: past `SYSTEM_OUT_BYTES_MAX` the file is renamed
/// `SystemOut_<yy.mm.dd_hh.mm.ss>.log` (WebSphere's names) and a new one begun; at most
/// `SYSTEM_OUT_KEPT_MAX` rotated files are kept (the oldest removed). The repository keeps the
/// longer, structured history.
pub const SYSTEM_OUT_BYTES_MAX: u64 = 16 * 1024 * 1024;
pub const SYSTEM_OUT_KEPT_MAX: usize = 5;

struct LogFile {
    file: File,
    path: PathBuf,
    bytes: u64,
    bytes_max: u64,
    /// Set while writes fail.
    failing: Option<Failing>,
}

/// An outage of the log file: since when, why, and the lines it holds or lost.
struct Failing {
    since: std::time::SystemTime,
    error: String,
    /// The first lines that failed, whole, in order.
    held: Vec<u8>,
    held_lines: u64,
    /// Lines that failed in all (held ones included).
    failed_lines: u64,
}

impl LogFile {
    fn open(path: &Path, bytes_max: u64) -> io::Result<LogFile> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let bytes = file.metadata()?.len();
        Ok(LogFile {
            file,
            path: path.to_path_buf(),
            bytes,
            bytes_max,
            failing: None,
        })
    }

    /// Writes one line; while writes fail, holds it (or counts it lost) and returns the error.
    /// The first write that works again first writes the held lines and a `WSVR0108W` line.
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        let r = match self.failing.take() {
            None => self.append(line),
            Some(f) => self.catch_up(f, line),
        };
        if let Err(e) = &r {
            let f = self.failing.get_or_insert_with(|| {
                stderr_note(&format!(
                    "keel: cannot write {} ({e}); the first lines are held and written when it works again",
                    self.path.display()
                ));
                Failing {
                    since: std::time::SystemTime::now(),
                    error: e.to_string(),
                    held: Vec::new(),
                    held_lines: 0,
                    failed_lines: 0,
                }
            });
            f.failed_lines += 1;
            if f.held_lines < HELD_LINES_MAX as u64 && f.held.len() + line.len() <= HELD_BYTES_MAX {
                f.held.extend_from_slice(line);
                f.held_lines += 1;
            }
        }
        r
    }

    /// After an outage: the held lines, the note of what failed, then `line`. An error puts
    /// the outage back as it was (the caller adds `line` to it).
    fn catch_up(&mut self, f: Failing, line: &[u8]) -> io::Result<()> {
        let kept = if f.held_lines == 0 {
            String::new()
        } else {
            format!("; {} of them are written just above, late", f.held_lines)
        };
        let mut note = render_line(
            std::time::SystemTime::now(),
            0,
            "keel_logs",
            &Level::WARN,
            &[
                ("lost", f.failed_lines.to_string()),
                ("path", self.path.display().to_string()),
                (
                    "since",
                    humantime::format_rfc3339_seconds(f.since).to_string(),
                ),
                ("error", f.error.clone()),
                ("kept", kept),
            ],
            Some(catalog::WSVR0108W.id),
            None,
        );
        note.push('\n');
        let mut all = Vec::with_capacity(f.held.len() + note.len() + line.len());
        all.extend_from_slice(&f.held);
        all.extend_from_slice(note.as_bytes());
        all.extend_from_slice(line);
        let r = self.append(&all);
        if r.is_err() {
            self.failing = Some(f);
        }
        r
    }

    /// Appends `bytes` (whole lines); a write that fails part-way is cut back off, so the file
    /// never holds half a line that the next line would run into.
    fn append(&mut self, line: &[u8]) -> io::Result<()> {
        if self.bytes > 0 && self.bytes + line.len() as u64 > self.bytes_max {
            // A failed rotation keeps writing to the current file (never lose the line).
            if let Err(e) = self.rotate() {
                stderr_note(&format!(
                    "keel: cannot rotate {} ({e}); it keeps growing",
                    self.path.display()
                ));
                self.bytes_max = u64::MAX;
            }
        }
        if let Err(e) = self.file.write_all(line) {
            // Only this process writes the file, so `bytes` is where the line began.
            let _ = self.file.set_len(self.bytes);
            return Err(e);
        }
        self.bytes += line.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let stem = self
            .path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("SystemOut")
            .to_string();
        let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        // 2026-11-25T10:36:08Z → 26.11.25_10.36.08
        let d = stamp.get(2..19).unwrap_or("00-00-00T00:00:00");
        let stamp = d.replace('-', ".").replace('T', "_").replace(':', ".");
        let mut target = dir.join(format!("{stem}_{stamp}.log"));
        let mut n = 1;
        while target.exists() && n < 100 {
            target = dir.join(format!("{stem}_{stamp}_{n}.log"));
            n += 1;
        }
        std::fs::rename(&self.path, &target)?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.bytes = 0;
        let prefix = format!("{stem}_");
        let mut old: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".log"))
            })
            .collect();
        // Oldest first by modification time (names sort by time too, within a century).
        old.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        while old.len() > SYSTEM_OUT_KEPT_MAX {
            let _ = std::fs::remove_file(old.remove(0));
        }
        Ok(())
    }
}

/// The `tracing` layer writing SystemOut.log lines (and records to the repository, when it has
/// one).
pub struct SystemOutLayer {
    sink: Sink,
    keel_level: Level,
    repo: Option<(repo::RepoWriter, String)>,
}

impl SystemOutLayer {
    /// Opens (appending, creating the directory) `path`.
    pub fn open(path: &Path, echo_stdout: bool) -> io::Result<SystemOutLayer> {
        Self::open_with_limit(path, echo_stdout, SYSTEM_OUT_BYTES_MAX)
    }

    /// `open` with another rotation size (tests).
    pub fn open_with_limit(
        path: &Path,
        echo_stdout: bool,
        bytes_max: u64,
    ) -> io::Result<SystemOutLayer> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = LogFile::open(path, bytes_max)?;
        Ok(SystemOutLayer {
            sink: Sink {
                file: Arc::new(Mutex::new(file)),
                echo_stdout,
            },
            keel_level: level_from_env(),
            repo: None,
        })
    }

    /// Also writes every event as a record of `process` to the repository behind `writer`.
    pub fn with_repository(mut self, writer: repo::RepoWriter, process: &str) -> SystemOutLayer {
        self.repo = Some((writer, process.to_string()));
        self
    }

    fn enabled_for(&self, target: &str, level: &Level) -> bool {
        // Keel's own events down to KEEL_LOG (default INFO); dependencies only warn and worse,
        // so a chatty library cannot drown the operator's log.
        if target.starts_with("keel") {
            *level <= self.keel_level
        } else {
            *level <= Level::WARN
        }
    }
}

fn level_from_env() -> Level {
    match std::env::var(LEVEL_ENV)
        .unwrap_or_default()
        .to_ascii_lowercase()
        .as_str()
    {
        "trace" => Level::TRACE,
        "debug" => Level::DEBUG,
        "warn" => Level::WARN,
        "error" => Level::ERROR,
        _ => Level::INFO,
    }
}

#[derive(Default)]
struct Fields {
    msg_id: Option<String>,
    message: Option<String>,
    rest: Vec<(&'static str, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, format!("{value:?}"));
    }
}

impl Fields {
    fn put(&mut self, field: &Field, value: String) {
        match field.name() {
            "msg_id" => self.msg_id = Some(value),
            "message" => self.message = Some(value),
            name => self.rest.push((name, value)),
        }
    }
}

thread_local! {
    static THREAD_NO: u32 = {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        NEXT.fetch_add(1, Ordering::Relaxed)
    };
}

/// Renders one event as a log line (without the trailing newline). Public for the viewer
/// and for tests; the layer is its only writer.
pub fn render_line(
    time: std::time::SystemTime,
    thread: u32,
    target: &str,
    level: &Level,
    fields_in: &[(&str, String)],
    msg_id: Option<&str>,
    message: Option<&str>,
) -> String {
    let level_letter = match *level {
        Level::ERROR => 'E',
        Level::WARN => 'W',
        Level::INFO => 'I',
        Level::DEBUG => 'D',
        Level::TRACE => 'T',
    };
    let component = component_of(target);
    let mut line = String::with_capacity(160);
    let _ = write!(
        line,
        "[{}] {thread:08x} {component} {level_letter} ",
        humantime::format_rfc3339_millis(time)
    );
    match msg_id.and_then(catalog::lookup) {
        Some(m) => {
            let _ = write!(line, "{}: {}", m.id, catalog::render(m.text, fields_in));
        }
        None => {
            if let Some(id) = msg_id {
                // An ID missing from the catalog is a bug; say so in the line rather than drop it.
                let _ = write!(line, "{id} (not in catalog): ");
            }
            line.push_str(message.unwrap_or(""));
            for (k, v) in fields_in {
                let _ = write!(line, " {k}={v}");
            }
        }
    }
    if line.len() > LINE_BYTES_MAX {
        let mut cut = LINE_BYTES_MAX;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push_str(" ...(truncated)");
    }
    // One event is one line: a newline inside a field would forge a second entry.
    line.replace('\n', "\\n")
}

impl<S: Subscriber> Layer<S> for SystemOutLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        if !self.enabled_for(meta.target(), meta.level()) {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        let thread = THREAD_NO.with(|n| *n);
        let now = std::time::SystemTime::now();
        if let Some((w, process)) = &self.repo {
            w.push(record_of(now, thread, process, meta, &fields));
        }
        let mut line = render_line(
            now,
            thread,
            meta.target(),
            meta.level(),
            &fields.rest,
            fields.msg_id.as_deref(),
            fields.message.as_deref(),
        );
        line.push('\n');
        // A poisoned lock still guards a whole `LogFile` (a line is appended or cut back off):
        // logging goes on rather than stopping for good. A failed write is held and reported
        // by `write_line` itself, once per outage.
        let mut f = self.sink.file.lock().unwrap_or_else(|p| p.into_inner());
        let _ = f.write_line(line.as_bytes());
        drop(f);
        if self.sink.echo_stdout {
            let _ = io::stdout().write_all(line.as_bytes());
        }
    }
}

/// The repository record of one event.
fn record_of(
    now: std::time::SystemTime,
    thread: u32,
    process: &str,
    meta: &tracing::Metadata<'_>,
    fields: &Fields,
) -> repo::Record {
    let level = match *meta.level() {
        Level::ERROR => 1,
        Level::WARN => 2,
        Level::INFO => 3,
        Level::DEBUG => 4,
        Level::TRACE => 5,
    };
    let (id, text) = match fields.msg_id.as_deref().and_then(catalog::lookup) {
        Some(m) => (
            Some(m.id.to_string()),
            catalog::render(m.text, &fields.rest),
        ),
        None => (
            fields.msg_id.clone(),
            fields.message.clone().unwrap_or_default(),
        ),
    };
    repo::Record {
        time_ms: now
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        level,
        process: process.to_string(),
        thread,
        logger: component_of(meta.target()),
        id,
        text,
        // Cut before copying: the caller's thread pays for what it copies.
        fields: fields
            .rest
            .iter()
            .map(|(k, v)| (k.to_string(), cut(v, repo::RECORD_BYTES_MAX).to_string()))
            .collect(),
    }
}

/// `s`, cut to at most `max` bytes on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut at = max;
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    &s[..at]
}

/// `keel_server::runtime` → `server.runtime`: the component column of a line.
pub fn component_of(target: &str) -> String {
    target
        .strip_prefix("keel_")
        .unwrap_or(target)
        .replace("::", ".")
}

static REPOSITORY: std::sync::OnceLock<repo::RepoWriter> = std::sync::OnceLock::new();

/// The log repository writer of this process, once `init_process` started it.
pub fn repository() -> Option<&'static repo::RepoWriter> {
    REPOSITORY.get()
}

/// Writes what the repository writer holds (bounded wait): call before the process exits.
pub fn flush() {
    if let Some(w) = REPOSITORY.get() {
        w.flush();
    }
}

/// Keeps the process's log installed; dropping it changes nothing (lines are unbuffered) but
/// holding it documents where logging was set up.
pub struct LogGuard {
    pub path: PathBuf,
}

/// Where the binary log repository of `process` lives.
pub fn repository_dir(layout: &keel_core::Layout, process: &str) -> PathBuf {
    layout.logs(process).join("repository")
}

/// Installs the global subscriber of a Keel process (server or node agent): SystemOut.log
/// under `logs/<process>/`, optionally echoed to stdout (foreground runs such as quickstart).
pub fn init_process(
    layout: &keel_core::Layout,
    process: &str,
    echo_stdout: bool,
) -> io::Result<LogGuard> {
    let path = layout.system_out(process);
    let mut layer = SystemOutLayer::open(&path, echo_stdout)?;
    // The repository is diagnostics: a process whose repository cannot start runs without it.
    match repo::RepoWriter::start(repo::RepoConfig::new(repository_dir(layout, process))) {
        Ok(writer) => {
            let _ = REPOSITORY.set(writer.clone());
            layer = layer.with_repository(writer, process);
        }
        Err(e) => stderr_note(&format!(
            "keel: the log repository of {process} under {} cannot be written ({e}); running without it (SystemOut.log has every record)",
            repository_dir(layout, process).display()
        )),
    }
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::set_global_default(subscriber)
        .map_err(|e| io::Error::other(format!("logging already initialised: {e}")))?;
    Ok(LogGuard { path })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn catalog_events_render_their_template() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        let line = render_line(
            t,
            26,
            "keel_server::runtime",
            &Level::INFO,
            &[("server", "server1".into())],
            Some("WSVR0024I"),
            None,
        );
        assert_eq!(line, "[2023-11-14T22:13:20.123Z] 0000001a server.runtime I WSVR0024I: Server server1 stopped.");
    }

    #[test]
    fn plain_events_keep_message_and_fields_on_one_line() {
        let t = std::time::UNIX_EPOCH;
        let line = render_line(
            t,
            1,
            "keel_node",
            &Level::WARN,
            &[("k", "a\nb".into())],
            None,
            Some("hello"),
        );
        assert_eq!(
            line,
            "[1970-01-01T00:00:00.000Z] 00000001 node W hello k=a\\nb"
        );
    }

    #[test]
    fn system_out_rotates_and_keeps_the_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/s1/SystemOut.log");
        let layer = SystemOutLayer::open_with_limit(&path, false, 2_000).unwrap();
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..400 {
                tracing::info!(target: "keel_server", "line {i} {}", "x".repeat(40));
            }
        });
        let mut rotated: Vec<String> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("SystemOut_"))
            .collect();
        rotated.sort();
        assert_eq!(rotated.len(), SYSTEM_OUT_KEPT_MAX, "{rotated:?}");
        assert!(std::fs::metadata(&path).unwrap().len() <= 2_000);
        // The newest lines are in the current file, whole.
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.lines().last().unwrap().contains("line 399"));
        assert!(text.lines().all(|l| l.starts_with('[')));
    }

    #[test]
    fn layer_writes_lines_with_ids_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/s1/SystemOut.log");
        let layer = SystemOutLayer::open(&path, false).unwrap();
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            keel_core::emit!(keel_core::catalog::WSVR0024I, server = "s1");
            tracing::debug!(target: "keel_server", "not at default level");
            tracing::info!(target: "hyper", "dependency chatter is filtered");
            tracing::warn!(target: "hyper", "dependency warning is kept");
        });
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].ends_with("I WSVR0024I: Server s1 stopped."),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].contains("hyper W dependency warning is kept"),
            "{}",
            lines[1]
        );
    }
}
