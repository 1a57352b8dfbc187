//! Online backup (`SqliteStore::backup_to`) and what works on a store file without starting
//! it: info, verify, the backup manifest, restore.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension};

use super::reads::{body_ref_at, count_messages, info_of, logged_rows_after, walk_logged_bodies};
use super::schema::{
    check_identity, meta_set, meta_u64, open_conn, quick_check, read_meta, take_lock,
};
use super::writer::body_into_row;
use super::{sql_err, Ctx, SqliteStore};
use crate::bodylog::{self, BodyRef, Segments};
use crate::error::{io_err, Result, StoreError};
use crate::fsx;
use crate::{RestoreState, StoreInfo, SCHEMA_VERSION};

/// Pages copied per backup step: small enough to report progress, big enough to be quick.
const BACKUP_STEP_PAGES: i32 = 1_024;
/// A manifest is a few hundred bytes; anything much larger is not ours.
const MANIFEST_BYTES_MAX: u64 = 64 * 1024;

impl SqliteStore {
    /// Copies the live store to `target` while writers keep committing, and writes
    /// `<target>.manifest.json` beside it. The copy is one consistent snapshot: it is read in
    /// one read transaction (WAL lets commits go on meanwhile), in steps so `progress` can be
    /// reported. Refuses an existing target. Blocking.
    pub fn backup_to(
        &self,
        target: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<BackupManifest> {
        let ctx = &self.shared.ctx;
        let manifest_path = manifest_path(target);
        for p in [target, manifest_path.as_path()] {
            if p.exists() {
                return Err(StoreError::TargetExists {
                    path: p.to_path_buf(),
                });
            }
        }
        let dir = fsx::parent_of(target);
        std::fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.tmp-{}", fsx::random_hex(6)));
        let tmp_ctx = Ctx::new(&ctx.me, &ctx.uuid, &tmp);
        // Before the snapshot: no segment it points into is unlinked until the copy is done.
        let _pin = ctx.bodies.pin();
        let result = (|| -> Result<BackupManifest> {
            let (src, _) = open_conn(ctx, false)?;
            // Hold one read transaction across every step: the snapshot cannot move, so the
            // backup neither restarts when the writer commits nor mixes two states.
            src.execute_batch("BEGIN DEFERRED")
                .map_err(ctx.err("begin backup snapshot"))?;
            let meta = read_meta(&src, ctx)?;
            let messages = count_messages(&src, ctx)?;
            let mut dst = Connection::open(&tmp).map_err(tmp_ctx.err("create backup file"))?;
            {
                let backup = rusqlite::backup::Backup::new(&src, &mut dst)
                    .map_err(ctx.err("start backup"))?;
                // Bound: each step copies BACKUP_STEP_PAGES pages of a fixed snapshot, so the
                // loop ends after page_count / step + 1 rounds; the cap catches a broken promise.
                let mut rounds: u64 = 0;
                loop {
                    rounds += 1;
                    assert!(rounds < (1 << 40), "backup made no progress");
                    let step = backup
                        .step(BACKUP_STEP_PAGES)
                        .map_err(ctx.err("copy pages to the backup"))?;
                    let p = backup.progress();
                    let total = u64::try_from(p.pagecount).unwrap_or(0);
                    let left = u64::try_from(p.remaining).unwrap_or(0);
                    progress(total.saturating_sub(left), total);
                    match step {
                        rusqlite::backup::StepResult::Done => break,
                        rusqlite::backup::StepResult::More => {}
                        // Only the destination (ours alone) could be busy; wait briefly.
                        _ => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }
            src.execute_batch("COMMIT")
                .map_err(ctx.err("end backup snapshot"))?;
            // A backup is one self-contained file: the bodies come into their rows.
            inline_bodies(&mut dst, &tmp_ctx, &ctx.bodies, progress)?;
            // The copy must be a self-contained file: no WAL beside it.
            dst.execute_batch("PRAGMA journal_mode=DELETE")
                .map_err(tmp_ctx.err("finish backup file"))?;
            dst.close()
                .map_err(|(_, e)| tmp_ctx.err("close backup file")(e))?;
            fsx::fsync_file(&tmp)?;
            let (crc, bytes) = fsx::crc32c_file(&tmp)?;
            if target.exists() {
                return Err(StoreError::TargetExists {
                    path: target.to_path_buf(),
                });
            }
            std::fs::rename(&tmp, target).map_err(io_err("rename backup into", target))?;
            let manifest = BackupManifest {
                me: meta.me.clone(),
                uuid: meta.uuid.clone(),
                created_at: fsx::now_rfc3339(),
                bytes,
                crc32c: crc,
                schema_version: meta.schema_version,
                incarnation: meta.incarnation,
                messages,
            };
            write_manifest(&manifest_path, &manifest)?;
            fsx::fsync_dir(&dir)?;
            Ok(manifest)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
            let _ = std::fs::remove_file(fsx::with_suffix(&tmp, "-journal"));
        }
        let manifest = result?;
        tracing::info!(me = %ctx.me, target = %target.display(), messages = manifest.messages,
            bytes = manifest.bytes, "backed up data store");
        Ok(manifest)
    }
}

/// Moves every body-log body of a backup copy into its row, so the backup is one file.
fn inline_bodies(
    dst: &mut Connection,
    ctx: &Ctx,
    bodies: &Segments,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let logged: i64 = dst
        .query_row(
            "SELECT count(*) FROM messages WHERE body_seg IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .map_err(ctx.err("count bodies to copy"))?;
    let total = logged as u64;
    let tx = dst.transaction().map_err(ctx.err("begin copying bodies"))?;
    let mut done = 0u64;
    // Each step's rows are read before they are updated, and the next step starts after them.
    walk_logged_bodies(&tx, ctx, bodies, |rows, read| {
        for ((seq, _), body) in rows.iter().zip(&read) {
            body_into_row(&tx, ctx, *seq, body, "copy a body into the backup")?;
        }
        done += rows.len() as u64;
        progress(done, total);
        Ok(())
    })?;
    assert_eq!(done, total, "every logged body copied");
    tx.execute("DELETE FROM segments", [])
        .map_err(ctx.err("clear the backup's segment counts"))?;
    tx.commit().map_err(ctx.err("commit copied bodies"))
}

/// Full integrity check of a store file (`PRAGMA quick_check`): reads every page, so it takes
/// time proportional to the store's size. Safe while the engine runs (a WAL reader).
pub fn verify_file(path: &Path, me_name: &str, me_uuid: &str) -> Result<()> {
    let ctx = Ctx::new(me_name, me_uuid, path);
    if !path.exists() {
        return Err(StoreError::Missing {
            file: path.to_path_buf(),
        });
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(ctx.err("open"))?;
    quick_check(&conn, &ctx, "quick_check")?;
    let meta = check_identity(&conn, &ctx)?;
    if meta.schema_version >= 2 {
        // Every body in the body log is there and passes its checksum. The engine may be
        // running (another process, whose pins this one cannot hold): a body that fails to
        // read counts only if its row still points at it afterwards; otherwise the message
        // was consumed, or compacted, and its segment unlinked meanwhile.
        let still_there = |seq: i64, r: BodyRef| -> Result<bool> {
            let now: Option<Option<BodyRef>> = conn
                .query_row(
                    "SELECT body_seg, body_at, body_len, body_crc FROM messages WHERE seq = ?1",
                    [seq],
                    |row| body_ref_at(row, 0),
                )
                .optional()
                .map_err(ctx.err("read a body reference again"))?;
            Ok(now == Some(Some(r)))
        };
        let mut after = i64::MIN;
        loop {
            let rows = logged_rows_after(&conn, &ctx, after)?;
            let Some(&(last, _)) = rows.last() else {
                break;
            };
            let refs: Vec<BodyRef> = rows.iter().map(|(_, r)| *r).collect();
            if ctx.bodies.read(&refs).is_err() {
                for &(seq, r) in &rows {
                    if let Err(e) = ctx.bodies.read(&[r]) {
                        if still_there(seq, r)? {
                            return Err(ctx.body_err(e));
                        }
                    }
                }
            }
            after = last;
        }
    }
    Ok(())
}

/// Bytes a store takes on disk: its file, SQLite's WAL beside it, and its body log.
pub fn disk_bytes(path: &Path) -> std::io::Result<u64> {
    let mut total = std::fs::metadata(path)?.len();
    total += std::fs::metadata(fsx::with_suffix(path, "-wal")).map_or(0, |m| m.len());
    let dir = bodylog::dir_of(path);
    for seg in bodylog::list_segments(&dir)? {
        total += std::fs::metadata(bodylog::segment_path(&dir, seg)).map_or(0, |m| m.len());
    }
    Ok(total)
}

/// Reads what a store says about itself without starting it (the ME may be stopped). Opens
/// the file read-only and checks nothing but that it is a Keel store.
pub fn read_info(path: &Path) -> Result<StoreInfo> {
    let ctx = Ctx::new("(unknown)", "", path);
    if !path.is_file() {
        return Err(StoreError::Missing {
            file: path.to_path_buf(),
        });
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(ctx.err("open read-only"))?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(ctx.err("set busy timeout"))?;
    let me: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'me_name'", [], |r| {
            r.get(0)
        })
        .optional()
        .map_err(|e| match e.sqlite_error_code() {
            Some(ErrorCode::Unknown) | None => StoreError::Corrupt {
                me: ctx.me.clone(),
                file: ctx.file.clone(),
                detail: format!("not a Keel data store ({e})"),
            },
            _ => sql_err(&ctx.me, &ctx.file, "read meta", e),
        })?;
    let ctx = Ctx {
        me: me.unwrap_or_else(|| ctx.me.clone()),
        ..ctx
    };
    conn.execute_batch("BEGIN DEFERRED")
        .map_err(ctx.err("begin read"))?;
    let found = meta_u64(&conn, &ctx, "schema_version")?;
    if found > u64::from(SCHEMA_VERSION) {
        return Err(StoreError::SchemaTooNew {
            file: ctx.file.clone(),
            found: u32::try_from(found).unwrap_or(u32::MAX),
            supported: SCHEMA_VERSION,
        });
    }
    info_of(&conn, &ctx)
}

/// The manifest written beside a backup as `<backup>.manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackupManifest {
    pub me: String,
    pub uuid: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// Size of the backup file.
    pub bytes: u64,
    /// CRC-32C of the backup file.
    pub crc32c: u32,
    pub schema_version: u32,
    pub incarnation: u64,
    pub messages: u64,
}

/// What a restore put back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    pub from_created_at: String,
    pub messages: u64,
}

/// Where the manifest of the backup `backup` lives: `<backup>.manifest.json`.
pub fn manifest_path(backup: &Path) -> PathBuf {
    fsx::with_suffix(backup, ".manifest.json")
}

fn write_manifest(path: &Path, m: &BackupManifest) -> Result<()> {
    let json = serde_json::to_vec_pretty(m).expect("a manifest serializes");
    assert!((json.len() as u64) < MANIFEST_BYTES_MAX);
    let dir = fsx::parent_of(path);
    let tmp = dir.join(format!(".manifest.tmp-{}", fsx::random_hex(6)));
    let r = (|| {
        std::fs::write(&tmp, &json).map_err(io_err("write", &tmp))?;
        fsx::fsync_file(&tmp)?;
        std::fs::rename(&tmp, path).map_err(io_err("rename manifest into", path))
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

fn read_manifest(backup: &Path) -> Result<BackupManifest> {
    let path = manifest_path(backup);
    let damaged = |how: String| StoreError::BackupDamaged {
        file: backup.to_path_buf(),
        how,
    };
    let len = std::fs::metadata(&path)
        .map_err(|e| damaged(format!("cannot read its manifest {}: {e}", path.display())))?
        .len();
    if len > MANIFEST_BYTES_MAX {
        return Err(damaged(format!(
            "manifest {} is {len} bytes, too big",
            path.display()
        )));
    }
    let bytes = std::fs::read(&path)
        .map_err(|e| damaged(format!("cannot read its manifest {}: {e}", path.display())))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| damaged(format!("manifest {} is not valid: {e}", path.display())))
}

/// Replaces the (stopped) ME's store with a backup. Everything is verified BEFORE the current
/// store is touched: the manifest, the size and CRC-32C, that the copy opens, passes
/// `integrity_check` and is stamped with this ME. Then the store is replaced atomically and
/// marked `restored` (a normal start is refused until a FLUSH start).
pub fn restore_from(
    backup: &Path,
    store_path: &Path,
    me_name: &str,
    me_uuid: &str,
) -> Result<RestoreReport> {
    assert!(!me_name.is_empty() && !me_uuid.is_empty());
    let damaged = |how: String| StoreError::BackupDamaged {
        file: backup.to_path_buf(),
        how,
    };
    let dir = fsx::parent_of(store_path);
    std::fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
    // Held until the end: the ME cannot start on a half-replaced store, and a running ME
    // makes the restore fail here, before anything is touched.
    let _lock = take_lock(store_path, me_name)?;
    if !backup.is_file() {
        return Err(damaged("the file does not exist".into()));
    }
    let manifest = read_manifest(backup)?;
    if manifest.uuid != me_uuid || manifest.me != me_name {
        return Err(StoreError::ForeignBackup {
            file: backup.to_path_buf(),
            found_me: manifest.me,
            found_uuid: manifest.uuid,
            want_me: me_name.to_string(),
            want_uuid: me_uuid.to_string(),
        });
    }
    if manifest.schema_version > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            file: backup.to_path_buf(),
            found: manifest.schema_version,
            supported: SCHEMA_VERSION,
        });
    }
    let name = store_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Verify a private copy, not the backup itself: what is checked is exactly what is
    // renamed into place, and the backup file is never modified.
    let tmp = dir.join(format!(".{name}.restore-{}", fsx::random_hex(6)));
    let cleanup = |tmp: &Path| {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let _ = std::fs::remove_file(fsx::with_suffix(tmp, suffix));
        }
    };
    let verified = (|| -> Result<u64> {
        std::fs::copy(backup, &tmp).map_err(io_err("copy backup to", &tmp))?;
        let (crc, bytes) = fsx::crc32c_file(&tmp)?;
        if bytes != manifest.bytes {
            return Err(damaged(format!(
                "it is {bytes} bytes, its manifest says {} (truncated or replaced)",
                manifest.bytes
            )));
        }
        if crc != manifest.crc32c {
            return Err(damaged(format!(
                "its CRC-32C is {crc:08x}, its manifest says {:08x} (the file changed after the backup)",
                manifest.crc32c
            )));
        }
        let ctx = Ctx::new(me_name, me_uuid, &tmp);
        let as_damaged = |e: StoreError| match e {
            StoreError::Corrupt { detail, .. } => damaged(detail),
            StoreError::WrongOwner {
                found_me,
                found_uuid,
                want_me,
                want_uuid,
                ..
            } => StoreError::ForeignBackup {
                file: backup.to_path_buf(),
                found_me,
                found_uuid,
                want_me,
                want_uuid,
            },
            other => other,
        };
        let conn = Connection::open_with_flags(
            &tmp,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| as_damaged(sql_err(me_name, &tmp, "open", e)))?;
        quick_check(&conn, &ctx, "integrity_check").map_err(as_damaged)?;
        let meta = check_identity(&conn, &ctx).map_err(as_damaged)?;
        if meta.schema_version >= 2 {
            let logged: i64 = conn
                .query_row(
                    "SELECT count(*) FROM messages WHERE body_seg IS NOT NULL",
                    [],
                    |r| r.get(0),
                )
                .map_err(ctx.err("count bodies outside the file"))?;
            if logged > 0 {
                return Err(damaged(format!(
                    "{logged} of its messages have their body outside the file (a copy of a live \
                     store, not a backup made by `keel store backup`)"
                )));
            }
        }
        let messages = count_messages(&conn, &ctx).map_err(as_damaged)?;
        if messages != manifest.messages {
            return Err(damaged(format!(
                "it holds {messages} messages, its manifest says {}",
                manifest.messages
            )));
        }
        conn.execute_batch("PRAGMA journal_mode=DELETE; PRAGMA synchronous=FULL;")
            .map_err(ctx.err("prepare restored copy"))?;
        meta_set(
            &conn,
            &ctx,
            "restore_state",
            RestoreState::Restored.as_str(),
        )?;
        let back = read_meta(&conn, &ctx)?;
        assert_eq!(back.restore_state, RestoreState::Restored);
        conn.close()
            .map_err(|(_, e)| ctx.err("close restored copy")(e))?;
        fsx::fsync_file(&tmp)?;
        Ok(messages)
    })();
    let messages = match verified {
        Ok(m) => m,
        Err(e) => {
            cleanup(&tmp);
            return Err(e);
        }
    };
    // Point of no return. The old store's WAL and shared-memory files go first: left beside the
    // new file they would be replayed into it.
    for suffix in ["-wal", "-shm"] {
        let p = fsx::with_suffix(store_path, suffix);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                cleanup(&tmp);
                return Err(io_err("remove", &p)(e));
            }
        }
    }
    if let Err(e) = std::fs::rename(&tmp, store_path) {
        cleanup(&tmp);
        return Err(io_err("rename restored store into", store_path)(e));
    }
    fsx::fsync_dir(&dir)?;
    // The old store's body log: nothing in the restored file points into it. A crash before
    // this leaves it to the next open, which removes segments no row counts.
    let bodies = bodylog::dir_of(store_path);
    match std::fs::remove_dir_all(&bodies) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(me = me_name, dir = %bodies.display(), error = %e,
            "cannot remove the old store's body log; the next start removes it"),
    }
    tracing::info!(me = me_name, backup = %backup.display(), store = %store_path.display(),
        messages, from = %manifest.created_at, "restored data store; it is marked restored");
    Ok(RestoreReport {
        from_created_at: manifest.created_at,
        messages,
    })
}
