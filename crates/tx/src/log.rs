//! Recovery logs (DESIGN §6): a pair of append-only files of CRC-framed records that hold a set
//! of live records (id → bytes). The transaction service puts a record at a commit decision and
//! removes it when every resource has its outcome; on a start, what is live is what is in doubt.
//!
//! File layout (`<dir>/log1`, `<dir>/log2`), frames of
//!
//! ```text
//! u32 big-endian  payload length (bytes)   ≤ RECORD_BYTES_MAX + FRAME_OVERHEAD_MAX
//! u32 big-endian  CRC-32C of the payload
//! payload         postcard-encoded Entry
//! ```
//!
//! A file starts with `Header { epoch }`, then the live records of a *keypoint* (`Put`s) closed by
//! `KeypointEnd { records }`, then appended `Put`s and `Remove`s. A keypoint rewrites the live
//! records into the other file with the next epoch, forces it, and switches to it; the file with
//! the higher epoch and a complete keypoint is the log. A crash in the middle of a keypoint
//! leaves an incomplete file that loses to the other one.
//!
//! Reading back, a bad frame (a short read, a checksum or decoding failure) is:
//! - a *torn tail* when no valid frame follows it (a write cut short by a crash: whatever was
//!   not forced may be lost), and the file is truncated there;
//! - *corruption before the tail* when a valid frame follows within the largest frame's reach:
//!   the log is refused with [`LogError::Corrupt`] and nothing is discarded.
//!
//! Invariants (asserted): a forced write is durable before it is answered; after a write error
//! the log refuses everything (a failed fsync leaves the file's state unknown); a record is at
//! most RECORD_BYTES_MAX, the live set at most LIVE_RECORDS_MAX; a keypoint's file holds exactly
//! the live set. Writes of concurrent callers are batched into one `write` and one `fdatasync`
//! (group commit) by the log's writer thread.
//!
//! [`RecoveryLog`] is the async face: its writer thread takes every request waiting (up to
//! `BATCH_REQUESTS_MAX`, 1 024), appends each (a refused one fails alone), forces once for all
//! that asked, then answers. Bounds: a record at most 1 MiB, at most 2^20 live records, a
//! keypoint once the active file passes `KEYPOINT_BYTES` (16 MiB). [`RecoveryLog::close`]
//! finishes the queued writes and returns the live count (the server removes the files of a
//! clean stop with none: the next start is cold).
//!
//! Tests: a property test (`log/tests.rs`) cuts the active file anywhere after the last force
//! and appends junk (what reads back is the live set of some step at or after the last force);
//! unit tests cover the keypoint switch, a keypoint cut short, torn tails and located
//! corruption; `tests/crash.rs` is the SIGKILL test; `tests/fuzz.rs` the decoder's fuzz target.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// `KEELRLOG`.
pub const MAGIC: u64 = u64::from_be_bytes(*b"KEELRLOG");
pub const VERSION: u32 = 1;
/// Largest record (its data).
pub const RECORD_BYTES_MAX: usize = 1 << 20;
/// What a frame adds to a record's data at most (frame head, postcard enum tag and lengths).
const FRAME_OVERHEAD_MAX: usize = 64;
const HEAD_BYTES: usize = 8;
/// Most live records a log holds (a server's in-doubt transactions).
pub const LIVE_RECORDS_MAX: usize = 1 << 20;
/// The active file is keypointed once it grows past this.
pub const KEYPOINT_BYTES: u64 = 16 << 20;
/// Requests one group commit takes at most.
pub const BATCH_REQUESTS_MAX: usize = 1_024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Entry {
    Header {
        magic: u64,
        version: u32,
        epoch: u64,
    },
    Put {
        id: u64,
        data: Vec<u8>,
    },
    Remove {
        id: u64,
    },
    KeypointEnd {
        records: u64,
    },
}

/// A change to a log's live set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put { id: u64, data: Vec<u8> },
    Remove { id: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("recovery log {file}: {op} failed: {source}")]
    Io {
        file: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("recovery log {file} is damaged at byte {offset} ({detail}) and valid records follow: it is not read and nothing is discarded; restore the log directory from a backup, and do not delete it while transactions may be in doubt")]
    Corrupt {
        file: PathBuf,
        offset: u64,
        detail: String,
    },
    #[error(
        "recovery log {dir} has no usable file: {detail}; restore the log directory from a backup"
    )]
    Unusable { dir: PathBuf, detail: String },
    #[error("recovery log {dir}: record {id} does not decode ({detail}); recovery stops and the record stays: run the Keel version that wrote it, or restore the log directory from a backup")]
    BadRecord {
        dir: PathBuf,
        id: u64,
        detail: String,
    },
    #[error("a recovery log record of {bytes} bytes is over the limit of {max}")]
    TooLarge { bytes: usize, max: usize },
    #[error("recovery log {dir} holds {records} live records, its limit")]
    Full { dir: PathBuf, records: usize },
    #[error("recovery log {dir} failed earlier ({cause}) and takes no more writes; restart the server (its recovery reads the log back)")]
    Failed { dir: PathBuf, cause: String },
    #[error("recovery log {dir} is closed")]
    Closed { dir: PathBuf },
}

fn io<'a>(file: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> LogError + 'a {
    move |source| LogError::Io {
        file: file.to_path_buf(),
        op,
        source,
    }
}

fn encode(e: &Entry, out: &mut Vec<u8>) {
    let payload = postcard::to_stdvec(e).expect("entries encode");
    assert!(payload.len() <= RECORD_BYTES_MAX + FRAME_OVERHEAD_MAX);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_be_bytes());
    out.extend_from_slice(&payload);
}

/// The frame at `pos`: Ok((entry, next position)) or Err(why it is bad).
fn frame_at(bytes: &[u8], pos: usize) -> Result<(Entry, usize), String> {
    let rest = &bytes[pos..];
    if rest.len() < HEAD_BYTES {
        return Err(format!("{} bytes, short of a frame head", rest.len()));
    }
    let len = u32::from_be_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    if len > RECORD_BYTES_MAX + FRAME_OVERHEAD_MAX {
        return Err(format!("frame length {len} over the limit"));
    }
    if rest.len() < HEAD_BYTES + len {
        return Err(format!("frame of {len} bytes cut short"));
    }
    let crc = u32::from_be_bytes(rest[4..8].try_into().expect("4 bytes"));
    let payload = &rest[HEAD_BYTES..HEAD_BYTES + len];
    if crc32c::crc32c(payload) != crc {
        return Err("checksum mismatch".into());
    }
    let e: Entry = postcard::from_bytes(payload).map_err(|e| format!("undecodable ({e})"))?;
    Ok((e, pos + HEAD_BYTES + len))
}

/// Whether a valid record frame starts anywhere after `bad` within one frame's reach.
fn valid_frame_follows(bytes: &[u8], bad: usize) -> bool {
    let reach = (bad + HEAD_BYTES + RECORD_BYTES_MAX + FRAME_OVERHEAD_MAX).min(bytes.len());
    (bad + 1..reach).any(|p| {
        matches!(
            frame_at(bytes, p),
            Ok((
                Entry::Put { .. } | Entry::Remove { .. } | Entry::KeypointEnd { .. },
                _
            ))
        )
    })
}

/// One file read back.
#[derive(Debug)]
struct Scan {
    epoch: u64,
    live: BTreeMap<u64, Vec<u8>>,
    /// Where the last good frame ends (a torn tail after it is cut off).
    end: u64,
}

/// Reads one file. Ok(None): absent, empty, or not a complete keypoint (a keypoint cut short
/// by a crash, which the other file outranks).
fn scan(file: &Path) -> Result<Option<Scan>, LogError> {
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(file, "read")(e)),
    };
    let epoch = match frame_at(&bytes, 0) {
        Ok((
            Entry::Header {
                magic: MAGIC,
                version: VERSION,
                epoch,
            },
            _,
        )) => epoch,
        Ok((Entry::Header { version, .. }, _)) if version != VERSION => {
            return Err(LogError::Corrupt {
                file: file.to_path_buf(),
                offset: 0,
                detail: format!("format version {version}, this Keel reads {VERSION}"),
            })
        }
        _ => return Ok(None),
    };
    let mut pos = frame_at(&bytes, 0).expect("checked").1;
    let mut live = BTreeMap::new();
    let mut keypoint_done = false;
    let corrupt = |offset: usize, detail: String| LogError::Corrupt {
        file: file.to_path_buf(),
        offset: offset as u64,
        detail,
    };
    while pos < bytes.len() {
        let (e, next) = match frame_at(&bytes, pos) {
            Ok(f) => f,
            Err(why) => {
                if valid_frame_follows(&bytes, pos) {
                    return Err(corrupt(pos, why));
                }
                break; // a torn tail
            }
        };
        match e {
            Entry::Header { .. } => return Err(corrupt(pos, "a second header".into())),
            Entry::Put { id, data } => {
                live.insert(id, data);
            }
            Entry::Remove { id } if keypoint_done => {
                live.remove(&id);
            }
            Entry::Remove { .. } => return Err(corrupt(pos, "a removal inside a keypoint".into())),
            Entry::KeypointEnd { records } => {
                if keypoint_done || records != live.len() as u64 {
                    return Err(corrupt(
                        pos,
                        format!(
                            "a keypoint of {records} records closes {} records",
                            live.len()
                        ),
                    ));
                }
                keypoint_done = true;
            }
        }
        pos = next;
    }
    if !keypoint_done {
        return Ok(None);
    }
    Ok(Some(Scan {
        epoch,
        live,
        end: pos as u64,
    }))
}

/// The synchronous log: one writer, used by the writer thread (and directly by tests).
pub struct Writer {
    dir: PathBuf,
    files: [PathBuf; 2],
    active: usize,
    file: File,
    epoch: u64,
    live: BTreeMap<u64, Vec<u8>>,
    size: u64,
    /// Set by the first write error: everything after is refused.
    failed: Option<String>,
}

impl Writer {
    /// Opens (creating if absent) the log in `dir` and reads it back: the live records are
    /// what was in doubt when it was last written.
    pub fn open(dir: &Path) -> Result<Writer, LogError> {
        std::fs::create_dir_all(dir).map_err(io(dir, "create directory"))?;
        let files = [dir.join("log1"), dir.join("log2")];
        let scans = [scan(&files[0])?, scan(&files[1])?];
        let best = match (&scans[0], &scans[1]) {
            (Some(a), Some(b)) => Some(if a.epoch >= b.epoch { 0 } else { 1 }),
            (Some(_), None) => Some(0),
            (None, Some(_)) => Some(1),
            (None, None) => None,
        };
        let Some(active) = best else {
            // Nothing usable: a new log, unless a file holds bytes we could not use.
            for f in &files {
                if std::fs::metadata(f).map(|m| m.len() > 0).unwrap_or(false) {
                    return Err(LogError::Unusable {
                        dir: dir.to_path_buf(),
                        detail: format!(
                            "{} is not empty but holds no complete keypoint",
                            f.display()
                        ),
                    });
                }
            }
            let mut w = Writer {
                dir: dir.to_path_buf(),
                file: File::create(&files[0]).map_err(io(&files[0], "create"))?,
                files,
                active: 0,
                epoch: 0,
                live: BTreeMap::new(),
                size: 0,
                failed: None,
            };
            w.keypoint_into(0, 1)?;
            return Ok(w);
        };
        let [a, b] = scans;
        let scan = if active == 0 { a } else { b }.expect("chosen");
        let path = &files[active];
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io(path, "open"))?;
        // Cut a torn tail off, so appends follow the last good frame.
        file.set_len(scan.end)
            .map_err(io(path, "truncate torn tail"))?;
        file.sync_data().map_err(io(path, "fsync"))?;
        let mut file = file;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0)).map_err(io(path, "seek"))?;
        Ok(Writer {
            dir: dir.to_path_buf(),
            files,
            active,
            file,
            epoch: scan.epoch,
            live: scan.live,
            size: scan.end,
            failed: None,
        })
    }

    pub fn live(&self) -> &BTreeMap<u64, Vec<u8>> {
        &self.live
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    fn check(&self) -> Result<(), LogError> {
        match &self.failed {
            Some(cause) => Err(LogError::Failed {
                dir: self.dir.clone(),
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    fn fail<T>(&mut self, e: LogError) -> Result<T, LogError> {
        self.failed = Some(e.to_string());
        Err(e)
    }

    /// Appends `ops` in one write (not forced). Checked before anything is written: a batch
    /// over the bounds is refused whole.
    pub fn append(&mut self, ops: &[Op]) -> Result<(), LogError> {
        self.check()?;
        let mut adds = 0usize;
        for op in ops {
            if let Op::Put { id, data } = op {
                if data.len() > RECORD_BYTES_MAX {
                    return Err(LogError::TooLarge {
                        bytes: data.len(),
                        max: RECORD_BYTES_MAX,
                    });
                }
                adds += usize::from(!self.live.contains_key(id));
            }
        }
        if self.live.len() + adds > LIVE_RECORDS_MAX {
            return Err(LogError::Full {
                dir: self.dir.clone(),
                records: self.live.len(),
            });
        }
        let mut buf = Vec::new();
        for op in ops {
            match op {
                Op::Put { id, data } => encode(
                    &Entry::Put {
                        id: *id,
                        data: data.clone(),
                    },
                    &mut buf,
                ),
                Op::Remove { id } => encode(&Entry::Remove { id: *id }, &mut buf),
            }
        }
        // Before the write: the frames read back as the ops, in order (what recovery will see).
        let mut pos = 0;
        for op in ops {
            let (entry, next) = frame_at(&buf, pos).expect("a frame just encoded decodes");
            assert!(matches!(
                (&entry, op),
                (Entry::Put { id: a, .. }, Op::Put { id: b, .. }) | (Entry::Remove { id: a }, Op::Remove { id: b })
                    if a == b
            ));
            pos = next;
        }
        assert_eq!(pos, buf.len(), "the batch is exactly its frames");
        let path = self.files[self.active].clone();
        if let Err(e) = self.file.write_all(&buf) {
            return self.fail(io(&path, "write")(e));
        }
        self.size += buf.len() as u64;
        for op in ops {
            match op {
                Op::Put { id, data } => {
                    self.live.insert(*id, data.clone());
                }
                Op::Remove { id } => {
                    self.live.remove(id);
                }
            }
        }
        assert!(
            self.live.len() <= LIVE_RECORDS_MAX,
            "checked before the write"
        );
        Ok(())
    }

    /// Makes everything appended so far durable.
    pub fn force(&mut self) -> Result<(), LogError> {
        self.check()?;
        let path = self.files[self.active].clone();
        if let Err(e) = self.file.sync_data() {
            return self.fail(io(&path, "fdatasync")(e));
        }
        Ok(())
    }

    /// Keypoints if the active file grew past KEYPOINT_BYTES.
    pub fn keypoint_if_due(&mut self) -> Result<(), LogError> {
        if self.size > KEYPOINT_BYTES {
            self.keypoint()?;
        }
        Ok(())
    }

    /// Rewrites the live records into the other file with the next epoch, forces it, and
    /// appends there from now on.
    pub fn keypoint(&mut self) -> Result<(), LogError> {
        self.check()?;
        let other = 1 - self.active;
        let epoch = self.epoch + 1;
        self.keypoint_into(other, epoch)
    }

    fn keypoint_into(&mut self, index: usize, epoch: u64) -> Result<(), LogError> {
        let path = self.files[index].clone();
        let r = (|| {
            let mut file = File::create(&path).map_err(io(&path, "create"))?;
            let mut buf = Vec::new();
            encode(
                &Entry::Header {
                    magic: MAGIC,
                    version: VERSION,
                    epoch,
                },
                &mut buf,
            );
            for (id, data) in &self.live {
                encode(
                    &Entry::Put {
                        id: *id,
                        data: data.clone(),
                    },
                    &mut buf,
                );
            }
            encode(
                &Entry::KeypointEnd {
                    records: self.live.len() as u64,
                },
                &mut buf,
            );
            file.write_all(&buf).map_err(io(&path, "write keypoint"))?;
            file.sync_all().map_err(io(&path, "fsync keypoint"))?;
            // The new file's name must be durable too before it counts.
            if let Ok(d) = File::open(&self.dir) {
                d.sync_all().map_err(io(&self.dir, "fsync directory"))?;
            }
            Ok::<_, LogError>((file, buf.len() as u64))
        })();
        match r {
            Ok((file, size)) => {
                self.file = file;
                self.active = index;
                self.epoch = epoch;
                self.size = size;
                Ok(())
            }
            Err(e) => self.fail(e),
        }
    }
}

/// A request to the writer thread.
enum Request {
    Write(WriteRequest),
    /// Finish what came before, answer with the number of live records, and stop.
    Close(tokio::sync::oneshot::Sender<usize>),
}

struct WriteRequest {
    ops: Vec<Op>,
    force: bool,
    reply: tokio::sync::oneshot::Sender<Result<(), LogError>>,
}

/// A recovery log used from async code: one writer thread takes every request waiting at a
/// time, appends them with one write and forces them with one fdatasync (group commit).
pub struct RecoveryLog {
    dir: PathBuf,
    tx: std::sync::mpsc::SyncSender<Request>,
}

impl RecoveryLog {
    /// Opens the log in `dir`; returns it with the live records read back.
    pub fn open(dir: &Path) -> Result<(RecoveryLog, BTreeMap<u64, Vec<u8>>), LogError> {
        let writer = Writer::open(dir)?;
        let live = writer.live().clone();
        let (tx, rx) = std::sync::mpsc::sync_channel(BATCH_REQUESTS_MAX);
        std::thread::Builder::new()
            .name("keel-recovery-log".into())
            .spawn(move || writer_thread(writer, rx))
            .map_err(io(dir, "start the log writer thread"))?;
        Ok((
            RecoveryLog {
                dir: dir.to_path_buf(),
                tx,
            },
            live,
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Applies `ops`; with `force`, resolves only once they are durable.
    pub async fn write(&self, ops: Vec<Op>, force: bool) -> Result<(), LogError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let closed = || LogError::Closed {
            dir: self.dir.clone(),
        };
        // The channel is bounded: when it is full a caller waits, on a blocking thread.
        match self
            .tx
            .try_send(Request::Write(WriteRequest { ops, force, reply }))
        {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return Err(closed()),
            Err(std::sync::mpsc::TrySendError::Full(r)) => {
                let tx = self.tx.clone();
                tokio::task::spawn_blocking(move || tx.send(r))
                    .await
                    .map_err(|_| closed())?
                    .map_err(|_| closed())?;
            }
        }
        answer.await.map_err(|_| closed())?
    }

    /// Finishes every write asked before, stops the writer thread (its files are closed when
    /// this returns) and returns how many live records the log holds. Later writes fail with
    /// `LogError::Closed`. A server's clean shutdown uses the count to leave empty logs.
    pub async fn close(&self) -> Result<usize, LogError> {
        let closed = || LogError::Closed {
            dir: self.dir.clone(),
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || tx.send(Request::Close(reply)))
            .await
            .map_err(|_| closed())?
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())
    }
}

fn writer_thread(mut w: Writer, rx: std::sync::mpsc::Receiver<Request>) {
    loop {
        let Ok(first) = rx.recv() else { return };
        let mut batch = Vec::new();
        let mut close = None;
        match first {
            Request::Write(r) => batch.push(r),
            Request::Close(reply) => close = Some(reply),
        }
        while close.is_none() && batch.len() < BATCH_REQUESTS_MAX {
            match rx.try_recv() {
                Ok(Request::Write(r)) => batch.push(r),
                Ok(Request::Close(reply)) => close = Some(reply),
                Err(_) => break,
            }
        }
        // Each request's ops are appended on their own (a refused one fails alone); then one
        // force for all that asked, then the answers.
        let mut results = Vec::with_capacity(batch.len());
        let mut force = false;
        for WriteRequest { ops, force: f, .. } in &batch {
            let r = w.append(ops);
            force |= *f && r.is_ok();
            results.push(r);
        }
        let forced = if force { w.force() } else { Ok(()) };
        let forced = forced.map_err(|e| e.to_string());
        for (
            WriteRequest {
                force: f, reply, ..
            },
            r,
        ) in batch.into_iter().zip(results)
        {
            let r = match (r, &forced) {
                (Ok(()), Err(cause)) if f => Err(LogError::Failed {
                    dir: w.dir.clone(),
                    cause: cause.clone(),
                }),
                (r, _) => r,
            };
            let _ = reply.send(r);
        }
        if let Some(reply) = close {
            let _ = reply.send(w.live().len());
            return;
        }
        // A keypoint failure poisons the log: later writes say so.
        if let Err(e) = w.keypoint_if_due() {
            tracing::error!(dir = %w.dir.display(), error = %e, "recovery log keypoint failed");
        }
    }
}

#[cfg(test)]
mod tests;
