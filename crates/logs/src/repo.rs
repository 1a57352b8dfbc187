//! The binary log repository of a process (DESIGN §8): `logs/<process>/repository/`, beside
//! SystemOut.log and written from the same `tracing` events, for fast filtering, following and
//! export (`keel logs view`).
//!
//! Layout: segment files `seg-<first time ms, 13 digits>-<number, 6 digits>.klog`, each a
//! sequence of blocks. A block is a 40-byte header then a zstd-compressed payload:
//!
//! ```text
//! magic "KLB1" | payload_len u32 | raw_len u32 | count u32 | first_ms u64 | last_ms u64 |
//! level_mask u8 | 3 reserved | crc32c u32 (over header bytes 4..36 and the payload)
//! payload = zstd( (varint length, postcard Record) × count )
//! ```
//!
//! The header's time range and level mask let a reader skip blocks without decompressing them.
//! A block is written with one `write_all`; no fsync (diagnostics, not state). Reading back:
//! an incomplete block at the end of a segment is a torn tail (ignored; a follower waits for
//! it), a block whose CRC does not match is skipped with a warning and the reader resynchronises
//! on the next valid block header, so the rest stays readable.
//!
//! Writing is off the hot path: events are queued (bounded, `QUEUE_RECORDS_MAX`) to one writer
//! thread that batches them into blocks (at most `BLOCK_RECORDS_MAX` records or
//! `BLOCK_RAW_BYTES_MAX` bytes, or every `FLUSH_MS`); a full queue drops the record and counts
//! it, and the writer writes a record saying how many were dropped. Retention: segments end at
//! `segment_bytes_max`; the oldest segments go when the repository passes `total_bytes_max` or
//! their last write is older than `age_max_ms` (the segment being written is never removed);
//! defaults 16 MiB, 256 MiB and 7 days (`RepoConfig::new`). A busy writer applies retention at
//! each new segment, a quiet one every `RETAIN_IDLE_MS` (an hour). Each process start begins
//! a new segment. Blocks are cut on their real encoded size (records are encoded as they
//! arrive). Segments are ordered by their number, which only goes up in a directory: their
//! names start with a time, and clocks step back.
//!
//! A block that fails to write is cut off the segment again (`set_len`), its records count as
//! dropped, and writing pauses `WRITE_RETRY_MS` (1 s), so a full disk does not turn into a new
//! file per block. The failure is said on stderr once per outage, through a write that cannot
//! panic.
//!
//! Reading ([`read`]) keeps a [`Position`], which `keel logs view --follow` reuses: per segment,
//! the first block not fully read and how many of its records were handed out, so a read
//! stopped mid-block resumes at the next record. The `LogRepository` admin object
//! (`keel_admin::logrepo`) reports size, segments, oldest record and the writer's counters.
//!
//! Deliberately absent: fsync (diagnostics), and any index beyond the block headers (a filter
//! reads every block whose header does not rule it out; BENCHMARKS.md has the cost).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 4] = b"KLB1";
pub const HEADER_BYTES: usize = 40;
/// Records queued for the writer before new ones are dropped (and counted).
pub const QUEUE_RECORDS_MAX: usize = 65_536;
pub const BLOCK_RECORDS_MAX: usize = 8_192;
pub const BLOCK_RAW_BYTES_MAX: usize = 1024 * 1024;
/// A block is written at least this often while records arrive (what `--follow` waits).
pub const FLUSH_MS: u64 = 200;
/// Bounds of what a reader accepts (a header claiming more is damage).
const PAYLOAD_BYTES_MAX: u32 = 4 * 1024 * 1024;
const RAW_BYTES_MAX: u32 = 2 * BLOCK_RAW_BYTES_MAX as u32 + 64 * 1024;
/// How long writing pauses after a failed block write (a full disk).
const WRITE_RETRY_MS: u64 = 1_000;
/// How often a quiet writer applies retention (a busy one does at every new segment).
const RETAIN_IDLE_MS: u64 = 3_600_000;
/// One record's text and fields are cut beyond this.
pub const RECORD_BYTES_MAX: usize = 64 * 1024;
const ZSTD_LEVEL: i32 = 1;

/// Levels, most severe first (the order `tracing` uses).
pub const LEVELS: [&str; 5] = ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"];

/// One log record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub time_ms: u64,
    /// 1 = ERROR … 5 = TRACE.
    pub level: u8,
    pub process: String,
    pub thread: u32,
    /// The component (`server`, `engine`, `store.sqlite`, …).
    pub logger: String,
    /// The catalog message ID, if the event had one.
    pub id: Option<String>,
    /// The rendered text (the catalog template filled in), without the ID.
    pub text: String,
    pub fields: Vec<(String, String)>,
}

impl Record {
    pub fn level_name(&self) -> &'static str {
        LEVELS
            .get(usize::from(self.level.clamp(1, 5)) - 1)
            .copied()
            .unwrap_or("INFO")
    }

    fn bound(&mut self) {
        fn cut(s: &mut String, max: usize) {
            if s.len() > max {
                let mut at = max;
                while !s.is_char_boundary(at) {
                    at -= 1;
                }
                s.truncate(at);
            }
        }
        cut(&mut self.text, RECORD_BYTES_MAX);
        let mut left = RECORD_BYTES_MAX;
        self.fields.retain_mut(|(k, v)| {
            cut(v, left.saturating_sub(k.len()));
            let used = k.len() + v.len();
            if used > left {
                return false;
            }
            left -= used;
            true
        });
    }
}

/// Level number of a name (`error`, `WARN`, `warning`, …).
pub fn level_of(name: &str) -> Option<u8> {
    match name.to_ascii_uppercase().as_str() {
        "ERROR" | "E" | "SEVERE" => Some(1),
        "WARN" | "WARNING" | "W" => Some(2),
        "INFO" | "I" => Some(3),
        "DEBUG" | "D" | "FINE" => Some(4),
        "TRACE" | "T" | "FINEST" => Some(5),
        _ => None,
    }
}

/// Retention and placement of a repository.
#[derive(Debug, Clone)]
pub struct RepoConfig {
    pub dir: PathBuf,
    pub segment_bytes_max: u64,
    pub total_bytes_max: u64,
    pub age_max_ms: u64,
}

impl RepoConfig {
    /// Defaults: 16 MiB segments, 256 MiB in all, 7 days.
    pub fn new(dir: PathBuf) -> RepoConfig {
        RepoConfig {
            dir,
            segment_bytes_max: 16 * 1024 * 1024,
            total_bytes_max: 256 * 1024 * 1024,
            age_max_ms: 7 * 24 * 3_600_000,
        }
    }
}

/// Counters of a running repository writer (the admin object shows them).
#[derive(Debug, Default)]
pub struct RepoStats {
    pub written: AtomicU64,
    pub dropped: AtomicU64,
    pub blocks: AtomicU64,
    pub write_errors: AtomicU64,
}

/// The queue into a repository's writer thread.
#[derive(Clone)]
pub struct RepoWriter {
    tx: SyncSender<Msg>,
    pub stats: Arc<RepoStats>,
    pub dir: PathBuf,
}

enum Msg {
    Record(Box<Record>),
    /// Write what is buffered now and answer (tests, shutdown).
    Flush(std::sync::mpsc::Sender<()>),
}

impl RepoWriter {
    /// Starts the writer thread of the repository in `cfg.dir` (created if absent).
    pub fn start(cfg: RepoConfig) -> io::Result<RepoWriter> {
        std::fs::create_dir_all(&cfg.dir)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_RECORDS_MAX);
        let stats = Arc::new(RepoStats::default());
        let dir = cfg.dir.clone();
        let mut w = SegmentWriter::open(cfg, stats.clone())?;
        std::thread::Builder::new()
            .name("keel-log-repository".into())
            .spawn(move || w.run(rx))?;
        Ok(RepoWriter { tx, stats, dir })
    }

    /// Queues a record; never blocks: when the queue is full the record is dropped and counted.
    pub fn push(&self, record: Record) {
        match self.tx.try_send(Msg::Record(Box::new(record))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Queues a record, waiting while the queue is full (an import or a benchmark; the
    /// tracing layer uses `push`, which never waits).
    pub fn push_wait(&self, record: Record) {
        if self.tx.send(Msg::Record(Box::new(record))).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits until everything queued before is written (bounded: 5 s).
    pub fn flush(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let (tx, rx) = std::sync::mpsc::channel();
        let mut msg = Msg::Flush(tx);
        // Never blocks past the deadline, even with the queue full and the disk hung.
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
        let _ = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

struct SegmentWriter {
    cfg: RepoConfig,
    stats: Arc<RepoStats>,
    file: Option<(File, u64, PathBuf)>,
    next_number: u64,
    /// The block being built: records already encoded (varint length + postcard), so its
    /// size is the real one.
    buf: Vec<u8>,
    count: usize,
    first_ms: u64,
    last_ms: u64,
    mask: u8,
    /// The process name of the last record (for the dropped-records record).
    process: String,
    dropped_reported: u64,
    last_retain: Instant,
    /// After a failed write: blocks are dropped (and counted) until then.
    paused_until: Option<Instant>,
    /// The last write failed (an outage is reported once, when it starts).
    failing: bool,
}

fn segment_name(first_ms: u64, number: u64) -> String {
    format!("seg-{first_ms:013}-{number:06}.klog")
}

/// Segments of `dir`, oldest first (by name: time, then number).
pub fn segments(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("seg-") && n.ends_with(".klog"))
            })
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    // By number, which only goes up in a directory (names start with a time, and a clock can
    // step back).
    v.sort_by_key(|p| (segment_number(p).unwrap_or(0), p.clone()));
    Ok(v)
}

fn segment_number(p: &Path) -> Option<u64> {
    let n = p.file_name()?.to_str()?;
    n.strip_suffix(".klog")?.rsplit('-').next()?.parse().ok()
}

impl SegmentWriter {
    fn open(cfg: RepoConfig, stats: Arc<RepoStats>) -> io::Result<SegmentWriter> {
        // Every process start begins a new segment: a torn tail of the last run stays where it
        // is (readers skip it) and is never appended after.
        let next_number = segments(&cfg.dir)?
            .iter()
            .filter_map(|p| segment_number(p))
            .max()
            .map_or(1, |n| n + 1);
        Ok(SegmentWriter {
            cfg,
            stats,
            file: None,
            next_number,
            buf: Vec::with_capacity(BLOCK_RAW_BYTES_MAX + RECORD_BYTES_MAX * 3),
            count: 0,
            first_ms: u64::MAX,
            last_ms: 0,
            mask: 0,
            process: String::new(),
            dropped_reported: 0,
            last_retain: Instant::now(),
            paused_until: None,
            failing: false,
        })
    }

    fn run(&mut self, rx: Receiver<Msg>) {
        let mut oldest: Option<Instant> = None;
        loop {
            let wait = oldest.map_or(Duration::from_millis(RETAIN_IDLE_MS), |t| {
                Duration::from_millis(FLUSH_MS).saturating_sub(t.elapsed())
            });
            match rx.recv_timeout(wait) {
                Ok(Msg::Record(r)) => {
                    self.add(*r);
                    // Take what else is waiting without a syscall per record.
                    while !self.full() {
                        match rx.try_recv() {
                            Ok(Msg::Record(r)) => self.add(*r),
                            Ok(Msg::Flush(done)) => {
                                self.write_block();
                                let _ = done.send(());
                            }
                            Err(_) => break,
                        }
                    }
                    if self.full() {
                        self.write_block();
                    }
                    // What is still buffered is written within FLUSH_MS of its arrival.
                    oldest = (self.count > 0).then(|| oldest.unwrap_or_else(Instant::now));
                }
                Ok(Msg::Flush(done)) => {
                    self.write_block();
                    oldest = None;
                    let _ = done.send(());
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.write_block();
                    oldest = None;
                    // A quiet process still ages its old segments out.
                    if self.last_retain.elapsed() >= Duration::from_millis(RETAIN_IDLE_MS) {
                        self.retain();
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.write_block();
                    return;
                }
            }
        }
    }

    fn full(&self) -> bool {
        self.count >= BLOCK_RECORDS_MAX || self.buf.len() >= BLOCK_RAW_BYTES_MAX
    }

    /// Encodes `r` into the block being built.
    fn add(&mut self, mut r: Record) {
        r.bound();
        let Ok(bytes) = postcard::to_stdvec(&r) else {
            return;
        };
        let mut len = bytes.len() as u64;
        loop {
            let b = (len & 0x7f) as u8;
            len >>= 7;
            if len == 0 {
                self.buf.push(b);
                break;
            }
            self.buf.push(b | 0x80);
        }
        self.buf.extend_from_slice(&bytes);
        self.count += 1;
        self.first_ms = self.first_ms.min(r.time_ms);
        self.last_ms = self.last_ms.max(r.time_ms);
        self.mask |= 1 << (r.level.clamp(1, 5) - 1);
        if self.process != r.process {
            self.process = r.process;
        }
    }

    /// Compresses and writes the block being built.
    fn write_block(&mut self) {
        let dropped = self.stats.dropped.load(Ordering::Relaxed);
        if dropped > self.dropped_reported && self.count > 0 {
            let n = (dropped - self.dropped_reported).to_string();
            let r = Record {
                time_ms: self.last_ms,
                level: 2,
                process: self.process.clone(),
                thread: 0,
                logger: "logs".into(),
                id: Some(keel_core::catalog::WSVR0107W.id.into()),
                text: keel_core::catalog::render(
                    keel_core::catalog::WSVR0107W.text,
                    &[("dropped", n.clone())],
                ),
                fields: vec![("dropped".into(), n)],
            };
            self.add(r);
            self.dropped_reported = dropped;
        }
        if self.count == 0 {
            return;
        }
        let count = self.count;
        if self.paused_until.is_some_and(|t| Instant::now() < t) {
            self.stats
                .dropped
                .fetch_add(count as u64, Ordering::Relaxed);
            self.clear_block();
            return;
        }
        self.paused_until = None;
        let r = self.encode_and_write();
        self.clear_block();
        match r {
            Ok(()) => {
                self.stats
                    .written
                    .fetch_add(count as u64, Ordering::Relaxed);
                self.stats.blocks.fetch_add(1, Ordering::Relaxed);
                // The next outage is reported again.
                self.failing = false;
            }
            Err(e) => {
                // A failing disk must not take the process down (nor this thread: stderr is a
                // file on the same disk, and `eprintln!` panics when it cannot write), and is
                // said once per outage; SystemOut.log still has the records.
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                if !std::mem::replace(&mut self.failing, true) {
                    crate::stderr_note(&format!(
                        "keel: cannot write the log repository {} ({e}); records are lost until it works again",
                        self.cfg.dir.display()
                    ));
                }
                // Its records count as dropped (reported once writing works again), and
                // writing pauses a moment instead of failing on every block.
                self.stats
                    .dropped
                    .fetch_add(count as u64, Ordering::Relaxed);
                self.paused_until = Some(Instant::now() + Duration::from_millis(WRITE_RETRY_MS));
            }
        }
    }

    fn clear_block(&mut self) {
        self.buf.clear();
        self.count = 0;
        self.first_ms = u64::MAX;
        self.last_ms = 0;
        self.mask = 0;
    }

    fn encode_and_write(&mut self) -> io::Result<()> {
        // Bounded by construction: a block stops growing at BLOCK_RAW_BYTES_MAX and one record
        // adds at most about three times RECORD_BYTES_MAX, well inside what readers accept.
        assert!(
            self.buf.len() as u32 <= RAW_BYTES_MAX,
            "a block's raw size is bounded"
        );
        let payload = zstd::bulk::compress(&self.buf, ZSTD_LEVEL)?;
        assert!(
            payload.len() as u32 <= PAYLOAD_BYTES_MAX,
            "a block's payload is bounded"
        );
        let (first, last, mask) = (self.first_ms, self.last_ms, self.mask);
        let mut block = Vec::with_capacity(HEADER_BYTES + payload.len());
        block.extend_from_slice(MAGIC);
        block.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        block.extend_from_slice(&(self.buf.len() as u32).to_le_bytes());
        block.extend_from_slice(&(self.count as u32).to_le_bytes());
        block.extend_from_slice(&first.to_le_bytes());
        block.extend_from_slice(&last.to_le_bytes());
        block.push(mask);
        block.extend_from_slice(&[0, 0, 0]);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&block[4..36]), &payload);
        block.extend_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(block.len(), HEADER_BYTES);
        block.extend_from_slice(&payload);
        // Verify before it reaches the disk: what a reader would see.
        debug_assert!(
            matches!(parse_header(&block), Some(h) if h.payload_len as usize == payload.len())
        );

        let rotate = match &self.file {
            None => true,
            Some((_, size, _)) => *size >= self.cfg.segment_bytes_max,
        };
        if rotate {
            let name = segment_name(first, self.next_number);
            self.next_number += 1;
            let path = self.cfg.dir.join(name);
            let f = OpenOptions::new().create(true).append(true).open(&path)?;
            self.file = Some((f, 0, path));
            self.retain();
        }
        let (f, size, _) = self.file.as_mut().expect("a segment is open");
        if let Err(e) = f.write_all(&block) {
            // Cut off whatever part of the block landed, so the segment stays whole and is
            // written on once the disk has room again (not a new file per failed block).
            if f.set_len(*size).is_err() {
                self.file = None;
            }
            return Err(e);
        }
        *size += block.len() as u64;
        Ok(())
    }

    /// Removes the oldest segments past the size or age limit (never the one being written).
    fn retain(&mut self) {
        self.last_retain = Instant::now();
        let Ok(all) = segments(&self.cfg.dir) else {
            return;
        };
        let current = self.file.as_ref().map(|(_, _, p)| p.clone());
        let now = std::time::SystemTime::now();
        let mut sizes: Vec<(PathBuf, u64, bool)> = all
            .into_iter()
            .filter_map(|p| {
                let m = std::fs::metadata(&p).ok()?;
                let old = m
                    .modified()
                    .ok()
                    .and_then(|t| now.duration_since(t).ok())
                    .is_some_and(|age| age.as_millis() as u64 > self.cfg.age_max_ms);
                Some((p, m.len(), old))
            })
            .collect();
        let mut total: u64 = sizes.iter().map(|(_, s, _)| s).sum();
        for (p, size, old) in sizes.drain(..) {
            if Some(&p) == current.as_ref() {
                break;
            }
            if total > self.cfg.total_bytes_max || old {
                if std::fs::remove_file(&p).is_ok() {
                    total -= size;
                }
            } else {
                break;
            }
        }
    }
}

/// A parsed block header.
#[derive(Debug, Clone, Copy)]
struct Header {
    payload_len: u32,
    raw_len: u32,
    count: u32,
    first_ms: u64,
    last_ms: u64,
    mask: u8,
    crc: u32,
}

fn parse_header(b: &[u8]) -> Option<Header> {
    if b.len() < HEADER_BYTES || &b[..4] != MAGIC {
        return None;
    }
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    let h = Header {
        payload_len: u32_at(4),
        raw_len: u32_at(8),
        count: u32_at(12),
        first_ms: u64_at(16),
        last_ms: u64_at(24),
        mask: b[32],
        crc: u32_at(36),
    };
    (h.payload_len <= PAYLOAD_BYTES_MAX
        && h.raw_len <= RAW_BYTES_MAX
        && h.count as usize <= BLOCK_RECORDS_MAX + 1
        && h.first_ms <= h.last_ms)
        .then_some(h)
}

/// What to read.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
    /// The least severe level shown (`--min-level warn`: WARN and ERROR); 1 = ERROR … 5 = TRACE.
    pub min_level: Option<u8>,
    /// The most severe level shown (`--max-level info`: INFO, DEBUG, TRACE).
    pub max_level: Option<u8>,
    pub ids: Vec<String>,
    pub logger: Option<String>,
    pub thread: Option<u32>,
    pub contains: Option<String>,
}

impl Query {
    /// `min_level`/`max_level` as a mask of level bits a record may have.
    fn level_mask(&self) -> u8 {
        // min_level is the *least* severe accepted (e.g. WARN: ERROR and WARN); max_level the
        // most severe accepted.
        let least = self.min_level.unwrap_or(5).clamp(1, 5);
        let most = self.max_level.unwrap_or(1).clamp(1, 5);
        let mut m = 0;
        for l in most..=least {
            m |= 1 << (l - 1);
        }
        m
    }

    fn block_may_match(&self, h: &Header) -> bool {
        h.mask & self.level_mask() != 0
            && self.since_ms.is_none_or(|s| h.last_ms >= s)
            && self.until_ms.is_none_or(|u| h.first_ms <= u)
    }

    pub fn matches(&self, r: &Record) -> bool {
        self.level_mask() & (1 << (r.level.clamp(1, 5) - 1)) != 0
            && self.since_ms.is_none_or(|s| r.time_ms >= s)
            && self.until_ms.is_none_or(|u| r.time_ms <= u)
            && (self.ids.is_empty() || r.id.as_ref().is_some_and(|i| self.ids.contains(i)))
            && self.logger.as_ref().is_none_or(|l| {
                r.logger == *l
                    || r.logger
                        .strip_prefix(l.as_str())
                        .is_some_and(|rest| rest.starts_with('.'))
            })
            && self.thread.is_none_or(|t| r.thread == t)
            && self
                .contains
                .as_ref()
                .is_none_or(|c| r.text.contains(c.as_str()))
    }
}

/// Where a reader got to: per segment, the offset after the last whole block read.
#[derive(Debug, Default, Clone)]
pub struct Position {
    /// Per segment: the offset of the first block not fully read, and how many of its records
    /// were handed out already (a read stopped by its callback mid-block).
    done: HashMap<PathBuf, (u64, u32)>,
}

/// What a read skipped.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReadReport {
    /// Damaged blocks skipped (warned about once each).
    pub corrupt_blocks: u64,
    pub blocks_read: u64,
    pub blocks_skipped: u64,
}

/// Reads every record matching `q` from the repository in `dir` that was not read yet from
/// `pos` (which it advances), calling `f` for each in repository order; `f` returning false
/// stops the read. Damage is reported on stderr once per block and counted.
pub fn read(
    dir: &Path,
    q: &Query,
    pos: &mut Position,
    report: &mut ReadReport,
    f: &mut dyn FnMut(Record) -> bool,
) -> io::Result<()> {
    let segs = segments(dir)?;
    // Segments removed by retention are forgotten.
    pos.done.retain(|p, _| segs.contains(p));
    for seg in segs {
        let mut file = match File::open(&seg) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        let (mut at, mut skip) = pos.done.get(&seg).copied().unwrap_or((0, 0));
        if at >= len {
            continue;
        }
        file.seek(SeekFrom::Start(at))?;
        let mut data = Vec::with_capacity((len - at) as usize);
        file.take(len - at).read_to_end(&mut data)?;
        let mut i = 0usize;
        while i < data.len() {
            let rest = &data[i..];
            let h = match parse_header(rest) {
                Some(h) if rest.len() >= HEADER_BYTES + h.payload_len as usize => h,
                // A whole header but not its whole payload: a block still being written or a
                // torn tail, unless a valid header follows (a damaged length).
                Some(_) => match resync(&rest[4..]) {
                    Some(skip) => {
                        warn_damage(&seg, at + i as u64, report);
                        i += skip + 4;
                        continue;
                    }
                    None => break,
                },
                // Less than a header left: the tail (torn, or being written).
                None if rest.len() < HEADER_BYTES => break,
                // Not a header: damage; go on at the next valid one (none: a torn tail).
                None => match resync(rest) {
                    Some(skip) => {
                        warn_damage(&seg, at + i as u64, report);
                        i += skip;
                        continue;
                    }
                    None => break,
                },
            };
            let end = HEADER_BYTES + h.payload_len as usize;
            let payload = &rest[HEADER_BYTES..end];
            let crc = crc32c::crc32c_append(crc32c::crc32c(&rest[4..36]), payload);
            if crc != h.crc {
                warn_damage(&seg, at + i as u64, report);
                i += resync(&rest[4..]).map_or(rest.len(), |s| s + 4);
                continue;
            }
            i += end;
            if !q.block_may_match(&h) {
                report.blocks_skipped += 1;
                continue;
            }
            report.blocks_read += 1;
            let raw = match zstd::bulk::decompress(payload, h.raw_len as usize) {
                Ok(r) => r,
                Err(_) => {
                    warn_damage(&seg, at + (i - end) as u64, report);
                    continue;
                }
            };
            let mut j = 0usize;
            let first = std::mem::take(&mut skip);
            for k in 0..h.count {
                let Some((len, used)) = varint(&raw[j..]) else {
                    break;
                };
                j += used;
                let Some(bytes) = raw.get(j..j + len) else {
                    break;
                };
                j += len;
                if k < first {
                    continue; // handed out by the read that stopped here
                }
                if let Ok(r) = postcard::from_bytes::<Record>(bytes) {
                    if q.matches(&r) && !f(r) {
                        pos.done.insert(seg.clone(), (at + (i - end) as u64, k + 1));
                        return Ok(());
                    }
                }
            }
        }
        at += i as u64;
        pos.done.insert(seg.clone(), (at, 0));
    }
    Ok(())
}

fn varint(b: &[u8]) -> Option<(usize, usize)> {
    let mut v = 0usize;
    for (i, byte) in b.iter().enumerate().take(5) {
        v |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// Offset of the next plausible block header after damage (a magic whose header parses).
fn resync(b: &[u8]) -> Option<usize> {
    (1..b.len().saturating_sub(3))
        .find(|&i| &b[i..i + 4] == MAGIC && parse_header(&b[i..]).is_some())
}

fn warn_damage(seg: &Path, offset: u64, report: &mut ReadReport) {
    report.corrupt_blocks += 1;
    eprintln!(
        "keel: log repository segment {} is damaged at byte {offset}; that block is skipped, the rest is read",
        seg.display()
    );
}

/// Size, segments and the oldest record's time of a repository (the admin object and `keel
/// logs view --stats`).
pub fn summary(dir: &Path) -> io::Result<(u64, usize, Option<u64>)> {
    let segs = segments(dir)?;
    let mut size = 0;
    for s in &segs {
        size += std::fs::metadata(s).map(|m| m.len()).unwrap_or(0);
    }
    let oldest = segs.first().and_then(|s| {
        let mut b = [0u8; HEADER_BYTES];
        File::open(s).ok()?.read_exact(&mut b).ok()?;
        parse_header(&b).map(|h| h.first_ms)
    });
    Ok((size, segs.len(), oldest))
}

#[cfg(test)]
mod tests;
