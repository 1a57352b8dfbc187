//! The body log of the SQLite backend: message bodies larger than [`INLINE_BODY_BYTES_MAX`]
//! live in append-only segment files beside the database (`<store>-bodies/<seg>.seg`), and
//! their row keeps only a reference `(seg, at, len, crc32c)`.
//!
//! Why: a 1 KiB body stored in the b-tree is written three times and more (WAL frame of the
//! page that receives it, the same page again when the message is deleted, both again at
//! checkpoint; 3–4 KiB of WAL per message, measured). Appended to a segment it is written
//! once, and the rows left in SQLite are ~150 bytes, so far fewer pages change per commit.
//!
//! Invariants:
//! - A body's bytes are written and `fdatasync`ed before the SQLite transaction that inserts
//!   its row commits, so a committed row never points at bytes that are not durable. Bytes a
//!   rolled-back or crashed transaction appended are never referenced, and are never reused:
//!   the writer only appends, and after any I/O error it starts a new segment.
//! - The `segments` table counts each segment's bytes and live bytes in the same transactions
//!   as the rows; a segment file is unlinked only after the commit that made it dead, and only
//!   while no backup holds a pin (a backup snapshot may still point into it).
//! - Every body read is checked against its CRC-32C; a mismatch, a short file or a missing
//!   segment is corruption of the store, reported as such.
//! - A reopened store never appends to an old segment: it starts a new one, and removes files
//!   the `segments` table does not know (orphans of a crash or of a restore).
//!
//! Deliberately absent: compaction into another segment. A segment whose live bytes fall
//! low while the log as a whole holds more than twice its live bytes has its remaining bodies
//! moved back into their rows (see `Writer::compact` in `sqlite/writer.rs`), which bounds the
//! log at about twice its live bytes without a second writer or a second log to manage.
//!
//! A backup moves bodies back into its rows, so a backup is one self-contained file. The
//! PostgreSQL backend keeps bodies in its rows (TOAST already stores large values apart).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::fsx;

/// Bodies up to this size stay in their row: a reference (~30 bytes) plus a file read is not
/// worth it for them, and small control messages keep the store's old shape.
pub(crate) const INLINE_BODY_BYTES_MAX: usize = 256;
/// A segment stops taking bodies at the first group commit after it reaches this size.
pub(crate) const SEGMENT_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Segment files a reader keeps open (most reads hit the newest one or two).
const OPEN_FILES_MAX: usize = 16;
/// Adjacent bodies are read in one `pread` up to this many bytes.
const READ_RUN_BYTES_MAX: u64 = 1024 * 1024;

/// Where one body lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BodyRef {
    pub(crate) seg: u64,
    pub(crate) at: u64,
    pub(crate) len: u32,
    pub(crate) crc: u32,
}

/// Why a body could not be read.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// The log does not hold what the row says: missing file, short file, wrong checksum.
    Damaged(String),
    Io(PathBuf, io::Error),
}

/// `<store>-bodies`, beside the database file.
pub(crate) fn dir_of(store: &Path) -> PathBuf {
    fsx::with_suffix(store, "-bodies")
}

pub(crate) fn segment_path(dir: &Path, seg: u64) -> PathBuf {
    dir.join(format!("{seg:012}.seg"))
}

/// The segment number of a file name this module wrote, or None for anything else.
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 12 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The segment numbers of the files in `dir` (none if it does not exist).
pub(crate) fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e?;
        if let Some(seg) = e.file_name().to_str().and_then(parse_segment_name) {
            out.push(seg);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Read access to a store's segments, shared by its reader, writer and backups.
pub(crate) struct Segments {
    dir: PathBuf,
    open: Mutex<HashMap<u64, Arc<File>>>,
    /// Reads and backups in progress. While non-zero the writer unlinks no segment: a read
    /// snapshot taken before a commit may still point into a segment that commit made dead.
    pins: AtomicUsize,
}

/// Holds a pin on the segments until dropped.
pub(crate) struct Pin<'a>(&'a AtomicUsize);

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl std::fmt::Debug for Segments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segments").field("dir", &self.dir).finish()
    }
}

impl Segments {
    pub(crate) fn new(store: &Path) -> Segments {
        Segments {
            dir: dir_of(store),
            open: Mutex::new(HashMap::new()),
            pins: AtomicUsize::new(0),
        }
    }

    /// Pins the segments: take it before the read snapshot begins. SeqCst on both sides: the
    /// writer's check after its commit and this increment before the snapshot are ordered, so
    /// either the writer sees the pin or the snapshot sees the commit.
    pub(crate) fn pin(&self) -> Pin<'_> {
        self.pins.fetch_add(1, Ordering::SeqCst);
        Pin(&self.pins)
    }

    pub(crate) fn pinned(&self) -> bool {
        self.pins.load(Ordering::SeqCst) > 0
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn file(&self, seg: u64) -> Result<Arc<File>, BodyError> {
        let mut open = self.open.lock().expect("segment cache lock");
        if let Some(f) = open.get(&seg) {
            return Ok(f.clone());
        }
        let path = segment_path(&self.dir, seg);
        let f = match File::open(&path) {
            Ok(f) => Arc::new(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BodyError::Damaged(format!(
                    "body log segment {} is missing",
                    path.display()
                )))
            }
            Err(e) => return Err(BodyError::Io(path, e)),
        };
        if open.len() >= OPEN_FILES_MAX {
            // Bounded cache: the oldest segments are the least likely to be read again.
            let oldest = *open.keys().min().expect("cache is not empty");
            open.remove(&oldest);
        }
        open.insert(seg, f.clone());
        Ok(f)
    }

    /// Drops a cached handle (the segment was unlinked).
    pub(crate) fn forget(&self, seg: u64) {
        self.open.lock().expect("segment cache lock").remove(&seg);
    }

    /// Reads the bodies of `refs`, in order, checking each one's CRC-32C. Neighbours in one
    /// segment (the common case: a page of consecutive messages) are read with one `pread`.
    pub(crate) fn read(&self, refs: &[BodyRef]) -> Result<Vec<Vec<u8>>, BodyError> {
        let mut out = Vec::with_capacity(refs.len());
        let mut i = 0;
        while i < refs.len() {
            // The run [i, j): same segment, each body right after the previous one.
            let first = refs[i];
            let path = || segment_path(&self.dir, first.seg);
            // A reference comes from a row, which damage can reach too: its end may overflow
            // (a negative offset read back as u64) or lie past the segment. Checked before
            // anything is allocated for it, so a row announcing 4 GiB allocates nothing.
            let past_end = |end: Option<u64>| {
                BodyError::Damaged(format!(
                    "body log segment {} ends before byte {}",
                    path().display(),
                    end.map_or_else(|| "2^64".to_string(), |e| e.to_string())
                ))
            };
            let mut end = first
                .at
                .checked_add(u64::from(first.len))
                .ok_or_else(|| past_end(None))?;
            let mut j = i + 1;
            while j < refs.len()
                && refs[j].seg == first.seg
                && refs[j].at == end
                && end - first.at + u64::from(refs[j].len) <= READ_RUN_BYTES_MAX
                && end.checked_add(u64::from(refs[j].len)).is_some()
            {
                end += u64::from(refs[j].len);
                j += 1;
            }
            let file = self.file(first.seg)?;
            let segment_bytes = file.metadata().map_err(|e| BodyError::Io(path(), e))?.len();
            if end > segment_bytes {
                return Err(past_end(Some(end)));
            }
            let run_bytes = usize::try_from(end - first.at).expect("a run is within its file");
            let mut run = vec![0u8; run_bytes];
            match file.read_exact_at(&mut run, first.at) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(BodyError::Damaged(format!(
                        "body log segment {} ends before byte {end}",
                        path().display()
                    )))
                }
                Err(e) => return Err(BodyError::Io(path(), e)),
            }
            let mut offset = 0usize;
            for r in &refs[i..j] {
                let len = r.len as usize;
                let body = &run[offset..offset + len];
                offset += len;
                if crc32c::crc32c(body) != r.crc {
                    return Err(BodyError::Damaged(format!(
                        "a body in body log segment {} at byte {} fails its checksum",
                        path().display(),
                        r.at
                    )));
                }
                out.push(if j - i == 1 {
                    Vec::new()
                } else {
                    body.to_vec()
                });
            }
            if j - i == 1 {
                // A run of one: hand over the buffer instead of copying it.
                *out.last_mut().expect("just pushed") = run;
            }
            i = j;
        }
        assert_eq!(out.len(), refs.len());
        Ok(out)
    }
}

/// The writer's end: stages the bodies of one group commit and makes them durable in one
/// write and one `fdatasync` before the group's transaction commits.
pub(crate) struct Appender {
    dir: PathBuf,
    seg: u64,
    file: File,
    /// Bytes of the segment known written (durable after the last successful flush).
    len: u64,
    /// Bodies staged for the open group, to be written at `len`.
    buf: Vec<u8>,
    /// A write or sync failed: the segment's tail is in doubt, take no more bodies into it.
    broken: bool,
    /// Test hook: appends that would take the segment past this many bytes fail as a full
    /// disk would.
    pub(crate) limit_bytes: Option<u64>,
    /// [`SEGMENT_BYTES_MAX`], smaller in tests that need many segments.
    pub(crate) segment_bytes_max: u64,
}

impl Appender {
    /// Creates segment `seg` (a new, empty file) and makes its name durable.
    pub(crate) fn create(dir: &Path, seg: u64) -> io::Result<Appender> {
        assert!(seg > 0);
        std::fs::create_dir_all(dir)?;
        let path = segment_path(dir, seg);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
            // Leave no file behind: the next attempt creates the same number again (on a full
            // disk it would otherwise fail on the leftover for good).
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(Appender {
            dir: dir.to_path_buf(),
            seg,
            file,
            len: 0,
            buf: Vec::new(),
            broken: false,
            limit_bytes: None,
            segment_bytes_max: SEGMENT_BYTES_MAX,
        })
    }

    pub(crate) fn seg(&self) -> u64 {
        self.seg
    }

    /// Test hook: from now on the segment's writes fail as a failing disk's would (its file is
    /// reopened read-only, so `pwrite` returns EBADF).
    pub(crate) fn break_writes(&mut self) -> io::Result<()> {
        self.file = File::open(segment_path(&self.dir, self.seg))?;
        Ok(())
    }

    /// Bytes written to the segment (durable once the last flush returned).
    pub(crate) fn len_bytes(&self) -> u64 {
        self.len
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The next segment, with this one's settings; this one takes no more bodies.
    pub(crate) fn roll(&self) -> io::Result<Appender> {
        let mut next = Appender::create(&self.dir, self.seg + 1)?;
        next.limit_bytes = self.limit_bytes.map(|l| l.saturating_sub(self.len));
        next.segment_bytes_max = self.segment_bytes_max;
        Ok(next)
    }

    /// Whether the next group should go to a new segment.
    pub(crate) fn needs_roll(&self) -> bool {
        self.broken || self.len >= self.segment_bytes_max
    }

    /// Stages `body` at the end of the segment and says where it will be.
    pub(crate) fn stage(&mut self, body: &[u8]) -> BodyRef {
        assert!(!self.broken, "staging into a broken segment");
        let len = u32::try_from(body.len()).expect("a body is under 4 GiB (BATCH_BYTES_MAX)");
        let r = BodyRef {
            seg: self.seg,
            at: self.len + self.buf.len() as u64,
            len,
            crc: crc32c::crc32c(body),
        };
        self.buf.extend_from_slice(body);
        r
    }

    /// Bytes staged so far in this group: a mark to roll a failed batch back to.
    pub(crate) fn staged(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn unstage_to(&mut self, mark: usize) {
        assert!(mark <= self.buf.len());
        self.buf.truncate(mark);
    }

    /// Drops what the group staged (its transaction did not commit).
    pub(crate) fn discard(&mut self) {
        self.buf.clear();
    }

    /// Writes the staged bodies and syncs them. After an error the staged bytes are dropped.
    /// A write that failed for lack of space is cut off again (`set_len` to the known end:
    /// nothing points past it, and nothing before it was touched), so the space returns and
    /// the segment goes on taking bodies when the disk has room: a long full disk does not make
    /// a new segment per refused group. After any other failure, or when the cut fails, the
    /// segment takes no more: its tail is in doubt (a failed fsync may have dropped pages).
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let end = self.len + self.buf.len() as u64;
        if self.limit_bytes.is_some_and(|limit| end > limit) {
            // Nothing was written, so the segment stays usable.
            self.buf.clear();
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "simulated full disk (test hook)",
            ));
        }
        let written = self.file.write_all_at(&self.buf, self.len);
        self.buf.clear();
        if let Err(e) = written {
            if !(is_disk_full(&e) && self.file.set_len(self.len).is_ok()) {
                self.broken = true;
            }
            return Err(e);
        }
        if let Err(e) = self.file.sync_data() {
            self.broken = true;
            return Err(e);
        }
        self.len = end;
        Ok(())
    }
}

/// ENOSPC or EDQUOT: the file system (or the user's quota) has no room.
pub(crate) fn is_disk_full(e: &io::Error) -> bool {
    // 122 is EDQUOT on Linux; std has no stable kind for it.
    e.kind() == io::ErrorKind::StorageFull || e.raw_os_error() == Some(122)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip_and_others_are_ignored() {
        let dir = Path::new("/x");
        let p = segment_path(dir, 42);
        let name = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_segment_name(name), Some(42));
        for other in ["42.seg", "000000000042.seg.tmp", "abcdefghijkl.seg", "x"] {
            assert_eq!(parse_segment_name(other), None, "{other}");
        }
    }

    #[test]
    fn staged_bodies_read_back_in_runs_and_damage_is_caught() {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("s.sqlite");
        let dir = dir_of(&store);
        let mut a = Appender::create(&dir, 1).unwrap();
        let bodies: Vec<Vec<u8>> = (0..50u8).map(|i| vec![i; 300 + usize::from(i)]).collect();
        let refs: Vec<BodyRef> = bodies.iter().map(|b| a.stage(b)).collect();
        a.flush().unwrap();
        let segs = Segments::new(&store);
        // In order, out of order (runs of one), and one.
        assert_eq!(segs.read(&refs).unwrap(), bodies);
        let rev: Vec<BodyRef> = refs.iter().rev().copied().collect();
        let mut want = bodies.clone();
        want.reverse();
        assert_eq!(segs.read(&rev).unwrap(), want);
        assert_eq!(segs.read(&refs[7..8]).unwrap(), vec![bodies[7].clone()]);
        // A flipped byte, a reference past the end, a missing segment.
        let f = OpenOptions::new()
            .write(true)
            .open(segment_path(&dir, 1))
            .unwrap();
        f.write_all_at(&[0xff], refs[3].at + 5).unwrap();
        assert!(
            matches!(segs.read(&refs[3..4]), Err(BodyError::Damaged(m)) if m.contains("checksum"))
        );
        let past = BodyRef {
            at: 1 << 20,
            ..refs[0]
        };
        assert!(
            matches!(segs.read(&[past]), Err(BodyError::Damaged(m)) if m.contains("ends before"))
        );
        let gone = BodyRef { seg: 9, ..refs[0] };
        assert!(matches!(segs.read(&[gone]), Err(BodyError::Damaged(m)) if m.contains("missing")));
        assert_eq!(list_segments(&dir).unwrap(), vec![1]);
    }

    #[test]
    fn a_full_disk_drops_the_group_and_keeps_the_segment_usable() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("b");
        let mut a = Appender::create(&dir, 3).unwrap();
        let first = a.stage(&[1; 400]);
        a.flush().unwrap();
        a.limit_bytes = Some(600);
        a.stage(&[2; 400]);
        let e = a.flush().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull);
        assert!(!a.needs_roll());
        a.limit_bytes = None;
        let second = a.stage(&[3; 400]);
        assert_eq!(second.at, 400, "the dropped group's bytes are not skipped");
        a.flush().unwrap();
        let segs = Segments {
            dir: dir.clone(),
            open: Mutex::new(HashMap::new()),
            pins: AtomicUsize::new(0),
        };
        assert_eq!(
            segs.read(&[first, second]).unwrap(),
            vec![vec![1; 400], vec![3; 400]]
        );
    }

    /// Regression (fuzz): a row whose offset is negative (read back as u64) overflowed the
    /// run's end (a panic in debug builds), and one announcing a 4 GiB body allocated 4 GiB
    /// before the read found the segment short. Both are damage now, found before allocating.
    #[test]
    fn fuzz_regression_hostile_references_are_damage_without_allocating() {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("s.sqlite");
        let mut a = Appender::create(&dir_of(&store), 1).unwrap();
        let r = a.stage(&[5; 300]);
        a.flush().unwrap();
        let segs = Segments::new(&store);
        for hostile in [
            BodyRef {
                at: u64::MAX - 10,
                ..r
            },
            BodyRef {
                at: -300i64 as u64,
                ..r
            },
            BodyRef { len: u32::MAX, ..r },
        ] {
            let (result, peak_bytes) = keel_core::fuzz::peak_bytes(|| segs.read(&[r, hostile]));
            assert!(
                matches!(result, Err(BodyError::Damaged(_))),
                "{hostile:?}: {result:?}"
            );
            assert!(
                peak_bytes < 64 * 1024,
                "{hostile:?}: {peak_bytes} bytes allocated"
            );
        }
    }

    fn fuzz_config() -> proptest::prelude::ProptestConfig {
        proptest::prelude::ProptestConfig {
            cases: keel_core::fuzz::cases(keel_core::fuzz::CASES_DEFAULT),
            failure_persistence: None,
            ..Default::default()
        }
    }

    proptest::proptest! {
        #![proptest_config(fuzz_config())]

        /// Fuzz target: body-log reads of a real segment that is then damaged (bit flips,
        /// truncation, repeated or spliced sections, hostile words) through references that
        /// may be damaged too (offsets, lengths, checksums, segment numbers). A read returns
        /// bodies that match their checksums, or `Damaged`; never a panic, never an I/O error
        /// for damage, and it allocates at most (references + 2) × the segment's bytes plus a
        /// constant: what is present, never what a reference announces.
        #[test]
        fn fuzz_damaged_segments_read_as_damage(
            sizes in proptest::collection::vec(257usize..2000, 1..12),
            seg_ops in proptest::collection::vec(proptest::prelude::any::<(u8, u64)>(), 0..6),
            ref_ops in proptest::collection::vec((proptest::prelude::any::<usize>(), 0u8..5, proptest::prelude::any::<u64>()), 0..4),
            order in proptest::collection::vec(proptest::prelude::any::<usize>(), 1..12),
        ) {
            let tmp = tempfile::tempdir().unwrap();
            let store = tmp.path().join("s.sqlite");
            let dir = dir_of(&store);
            let mut a = Appender::create(&dir, 1).unwrap();
            let mut refs: Vec<BodyRef> = sizes
                .iter()
                .enumerate()
                .map(|(i, n)| a.stage(&vec![i as u8; *n]))
                .collect();
            a.flush().unwrap();
            let path = segment_path(&dir, 1);
            let damaged = keel_core::fuzz::mutate(&std::fs::read(&path).unwrap(), &seg_ops);
            std::fs::write(&path, &damaged).unwrap();
            for (i, field, v) in ref_ops {
                let n = refs.len();
                let r = &mut refs[i % n];
                match field {
                    0 => r.at = v,
                    1 => r.len = v as u32,
                    2 => r.crc = v as u32,
                    3 => r.seg = v % 3,
                    _ => r.at = r.at.wrapping_add(v % 64),
                }
            }
            // In order (runs), and in any order (runs of one, repeats).
            let shuffled: Vec<BodyRef> = order.iter().map(|k| refs[k % refs.len()]).collect();
            let segs = Segments::new(&store);
            for want in [&refs, &shuffled] {
                let (result, peak_bytes) = keel_core::fuzz::peak_bytes(|| segs.read(want));
                let bound_bytes = (want.len() + 2) * damaged.len() + 64 * 1024;
                proptest::prop_assert!(peak_bytes <= bound_bytes, "{peak_bytes} bytes allocated, bound {bound_bytes}");
                match result {
                    Ok(bodies) => {
                        proptest::prop_assert_eq!(bodies.len(), want.len());
                        for (b, r) in bodies.iter().zip(want.iter()) {
                            proptest::prop_assert_eq!(crc32c::crc32c(b), r.crc);
                        }
                    }
                    Err(BodyError::Damaged(_)) => {}
                    Err(BodyError::Io(p, e)) => proptest::prop_assert!(false, "damage read as an I/O error: {}: {e}", p.display()),
                }
            }
        }
    }
}
