//! Configuration backup and restore (WebSphere's backupConfig / restoreConfig).
//!
//! An archive is one zstd-compressed tar (`*.keelcfg`). Its first entry is `manifest.toml`,
//! naming the cell, the config version and every file with its size and CRC-32C; then come the
//! files of the master repository under `config/`. The zstd frame carries its own checksum too,
//! so truncation and flipped bytes are caught before anything is restored.
//!
//! Restore verifies the whole archive in memory first, then swaps under the master lock: the
//! current files move aside to `backups/config-replaced-<timestamp>/` (nothing is deleted), the
//! archive's files are written, and the version becomes higher than anything the profile has
//! seen, so node copies notice they are behind and synchronize.
//!
//! An archive holds the repository only: the profile's secrets (admin credential, data source
//! passwords) are never in it.

use std::cell::Cell as StdCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use serde::{Deserialize, Serialize};

use crate::error::{io_err, ConfigError, Result, FIX_PERM};
use crate::files::{self, Tree};
use crate::fsx::{self, RepoLock, LOCK_FILE};
use crate::model::Config;
use crate::profile::Profile;

/// The manifest format this code writes and reads.
pub const FORMAT: &str = "keel-config-backup/1";
/// Bound on the total size of the files in an archive: a config is kilobytes, so anything near
/// this is not a config backup, and verification holds it all in memory.
pub const MAX_TOTAL_BYTES: u64 = 64 << 20;
/// Bound on the number of entries (manifest included).
pub const MAX_ENTRIES: usize = 10_000;
/// Bound on the decompressed stream: the files plus generous tar overhead per entry.
const MAX_STREAM_BYTES: u64 = MAX_TOTAL_BYTES + (MAX_ENTRIES as u64) * 4096;
/// Bound on the manifest itself.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Directory depth walked when archiving (the layout needs 4).
const MAX_DEPTH: usize = 8;
/// Largest zstd window (log2 bytes) a restore decompresses with: archives are written at
/// level 3 (a 2 MiB window at most). zstd's default limit is 2^27, so an archive declaring a
/// 128 MiB window made the decoder allocate that much before reading a byte of it.
const WINDOW_LOG_MAX: u32 = 23;

/// What `create_backup` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    pub path: PathBuf,
    pub cell: String,
    pub version: u64,
    /// Configuration files archived (the manifest not counted).
    pub files: usize,
    /// Size of the archive file.
    pub bytes: u64,
}

/// What `restore_backup` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreInfo {
    /// Version of the master before the restore (0 if its cell.toml was unreadable).
    pub from_version: u64,
    /// Version the master has now: above both the old version and the archive's.
    pub to_version: u64,
    /// Where the replaced configuration files were moved.
    pub set_aside: PathBuf,
}

/// A fully checked archive, held in memory.
#[derive(Debug, Clone)]
pub struct VerifiedBackup {
    pub cell: String,
    /// The config version when the backup was taken.
    pub version: u64,
    pub created_at: String,
    pub keel_version: String,
    /// Files relative to `config/`, in archive order.
    files: Vec<(PathBuf, Vec<u8>)>,
    /// The archived configuration, parsed and validated.
    pub config: Config,
}

impl VerifiedBackup {
    /// The archived files, relative to the repository directory (`nodes/node01/node.toml`).
    pub fn files(&self) -> &[(PathBuf, Vec<u8>)] {
        &self.files
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    manifest: ManifestHead,
    #[serde(default)]
    file: Vec<ManifestFile>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestHead {
    format: String,
    cell: String,
    config_version: u64,
    created_at: String,
    keel_version: String,
}

#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    path: String,
    bytes: u64,
    crc32c: u32,
}

// --- create ------------------------------------------------------------------------------------

/// Archives the master repository into one file (default: `<profile>/backups/
/// config-<cell>-v<version>-<yyyymmddThhmmssZ>.keelcfg`). Reads under the repository lock so
/// the archive is one consistent version; writes a temp file, fsyncs, and links it into place
/// without ever overwriting an existing file.
pub fn create_backup(profile: &Profile, to: Option<&Path>) -> Result<BackupInfo> {
    let master = profile.master();
    let (cfg, files) = {
        if !master.dir().join("cell.toml").is_file() {
            return Err(ConfigError::NotARepository {
                dir: master.dir().to_path_buf(),
            });
        }
        let _lock = RepoLock::shared(master.dir())?;
        // Loading validates: an archive that could never be restored is worth nothing.
        let (cfg, _) = master.load_unlocked()?;
        (cfg, collect_files(master.dir())?)
    };
    let created_at = fsx::now_rfc3339();
    let target = match to {
        Some(p) => p.to_path_buf(),
        None => profile.layout().backups().join(format!(
            "config-{}-v{}-{}.keelcfg",
            cfg.cell.name,
            cfg.version,
            fsx::now_compact()
        )),
    };
    if target.exists() {
        return Err(ConfigError::TargetExists { path: target });
    }
    let manifest = Manifest {
        manifest: ManifestHead {
            format: FORMAT.into(),
            cell: cfg.cell.name.clone(),
            config_version: cfg.version,
            created_at: created_at.clone(),
            keel_version: env!("CARGO_PKG_VERSION").into(),
        },
        file: files
            .iter()
            .map(|(p, b)| ManifestFile {
                path: p.clone(),
                bytes: b.len() as u64,
                crc32c: crc32c::crc32c(b),
            })
            .collect(),
    };
    let manifest_text = toml::to_string(&manifest).expect("manifest always serializes");

    let dir = fsx::parent_of(&target);
    fsx::ensure_dir(&dir)?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "backup".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", fsx::random_hex(6)));
    let written = write_archive(&tmp, &manifest_text, &files, &created_at)
        .and_then(|()| publish(&tmp, &target));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    let bytes = std::fs::metadata(&target)
        .map_err(io_err("inspect", &target, FIX_PERM))?
        .len();
    tracing::info!(archive = %target.display(), cell = %cfg.cell.name, version = cfg.version, files = files.len(), bytes, "configuration backed up");
    Ok(BackupInfo {
        path: target,
        cell: cfg.cell.name,
        version: cfg.version,
        files: files.len(),
        bytes,
    })
}

/// Every regular file under the repository, as (`config/<rel>` with `/`, bytes), sorted.
/// Dot files (the lock, temp files) are skipped.
fn collect_files(root: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut total = 0u64;
    let mut stack = vec![(root.to_path_buf(), String::from("config"), 0usize)];
    while let Some((dir, prefix, depth)) = stack.pop() {
        let rd = std::fs::read_dir(&dir).map_err(io_err("list directory", &dir, FIX_PERM))?;
        for entry in rd {
            let entry = entry.map_err(io_err("list directory", &dir, FIX_PERM))?;
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                tracing::warn!(path = %path.display(), "not archiving a file whose name is not UTF-8");
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let ft = entry
                .file_type()
                .map_err(io_err("inspect", &path, FIX_PERM))?;
            let rel = format!("{prefix}/{name}");
            if ft.is_dir() && depth < MAX_DEPTH {
                stack.push((path, rel, depth + 1));
            } else if ft.is_file() {
                let bytes = fsx::read_file(&path)?;
                total += bytes.len() as u64;
                out.push((rel, bytes));
                if out.len() >= MAX_ENTRIES || total > MAX_TOTAL_BYTES {
                    return Err(ConfigError::Invalid {
                        file: root.to_path_buf(),
                        key: "(directory)".into(),
                        problem: format!("holds more than {} files or {MAX_TOTAL_BYTES} bytes, more than a backup may hold", MAX_ENTRIES - 1),
                        fix: "remove what does not belong to the configuration, then run `keel config validate`".into(),
                    });
                }
            } else {
                tracing::warn!(path = %path.display(), "not archiving an entry that is not a regular file");
            }
        }
    }
    out.sort();
    Ok(out)
}

fn write_archive(
    tmp: &Path,
    manifest: &str,
    files: &[(String, Vec<u8>)],
    created_at: &str,
) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(io_err("create", tmp, FIX_PERM))?;
    let mtime = humantime::parse_rfc3339(created_at)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let io = |e| io_err("write", tmp, FIX_PERM)(e);
    let mut enc = zstd::stream::write::Encoder::new(file, 3).map_err(io)?;
    // The frame checksum catches corruption anywhere in the stream, tar headers included.
    enc.include_checksum(true).map_err(io)?;
    let mut tar = tar::Builder::new(enc);
    let mut append = |path: &str, data: &[u8]| -> std::io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(mtime);
        tar.append_data(&mut h, path, data)
    };
    append("manifest.toml", manifest.as_bytes()).map_err(io)?;
    for (path, data) in files {
        append(path, data).map_err(io)?;
    }
    let enc = tar.into_inner().map_err(io)?;
    let file = enc.finish().map_err(io)?;
    file.sync_all().map_err(io_err("fsync", tmp, FIX_PERM))
}

/// Moves the finished temp file to `target` without overwriting: a hard link fails if the
/// target appeared meanwhile, where a rename would silently replace it.
fn publish(tmp: &Path, target: &Path) -> Result<()> {
    match std::fs::hard_link(tmp, target) {
        Ok(()) => {
            std::fs::remove_file(tmp).map_err(io_err("remove temp file", tmp, FIX_PERM))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(ConfigError::TargetExists {
                path: target.to_path_buf(),
            })
        }
        Err(_) => {
            // File systems without hard links: check, then rename (a small race, documented).
            if target.exists() {
                return Err(ConfigError::TargetExists {
                    path: target.to_path_buf(),
                });
            }
            std::fs::rename(tmp, target).map_err(io_err(
                "rename temp file into",
                target,
                FIX_PERM,
            ))?;
        }
    }
    fsx::fsync_dir(&fsx::parent_of(target))
}

// --- verify ------------------------------------------------------------------------------------

/// A reader that refuses to yield more than `left` bytes, so a decompression bomb stops early.
struct Limited<R> {
    inner: R,
    left: u64,
    exceeded: Rc<StdCell<bool>>,
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? == 0 {
                return Ok(0);
            }
            self.exceeded.set(true);
            return Err(std::io::Error::other(
                "the decompressed archive exceeds the size limit",
            ));
        }
        let cap = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..cap])?;
        self.left -= n as u64;
        Ok(n)
    }
}

fn damaged(file: &Path, how: impl Into<String>) -> ConfigError {
    ConfigError::ArchiveDamaged {
        file: file.to_path_buf(),
        how: how.into(),
    }
}

fn refused(file: &Path, why: impl Into<String>) -> ConfigError {
    ConfigError::ArchiveRefused {
        file: file.to_path_buf(),
        why: why.into(),
    }
}

/// Turns a read error of the decode pipeline into the archive error it means.
fn stream_error(file: &Path, exceeded: &StdCell<bool>, e: &std::io::Error) -> ConfigError {
    if exceeded.get() {
        return refused(file, format!("it decompresses to more than {MAX_STREAM_BYTES} bytes, more than a config backup can hold"));
    }
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        return damaged(file, "truncated: zstd stream ended early");
    }
    damaged(file, format!("corrupt: {e}"))
}

/// A path inside the archive is safe if it is relative, has only normal components, and is
/// valid UTF-8. Anything else could write outside the repository.
fn safe_rel(path: &Path) -> Option<String> {
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_str()?),
            _ => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Reads and fully checks an archive: zstd and tar integrity, the manifest (first entry, known
/// format), every file present with the listed size and CRC-32C, nothing extra, sizes bounded,
/// and the configuration itself valid. Nothing on disk is touched.
pub fn verify_backup(file: &Path) -> Result<VerifiedBackup> {
    let f = File::open(file).map_err(io_err(
        "open config archive",
        file,
        "check the file name and its permissions",
    ))?;
    let exceeded = Rc::new(StdCell::new(false));
    let mut dec = zstd::stream::read::Decoder::new(f)
        .map_err(|e| damaged(file, format!("cannot start decompressing: {e}")))?;
    dec.window_log_max(WINDOW_LOG_MAX)
        .map_err(|e| damaged(file, format!("cannot start decompressing: {e}")))?;
    let limited = Limited {
        inner: dec,
        left: MAX_STREAM_BYTES,
        exceeded: exceeded.clone(),
    };
    let mut ar = tar::Archive::new(limited);

    let mut manifest: Option<(ManifestHead, BTreeMap<String, ManifestFile>)> = None;
    let mut contents: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut total = 0u64;
    {
        let entries = ar
            .entries()
            .map_err(|e| stream_error(file, &exceeded, &e))?;
        for (index, entry) in entries.enumerate() {
            if index >= MAX_ENTRIES {
                return Err(refused(
                    file,
                    format!("it has more than {MAX_ENTRIES} entries"),
                ));
            }
            let mut entry = entry.map_err(|e| stream_error(file, &exceeded, &e))?;
            let raw = entry
                .path()
                .map_err(|e| {
                    damaged(
                        file,
                        format!("entry {} has an unreadable name: {e}", index + 1),
                    )
                })?
                .into_owned();
            let Some(name) = safe_rel(&raw) else {
                return Err(refused(
                    file,
                    format!(
                        "entry {:?} has an unsafe path (absolute, `..` or not UTF-8)",
                        raw.display().to_string()
                    ),
                ));
            };
            let kind = entry.header().entry_type();
            if !kind.is_file() {
                return Err(refused(
                    file,
                    format!("entry {name} is not a regular file ({kind:?})"),
                ));
            }
            let size = entry
                .header()
                .size()
                .map_err(|e| damaged(file, format!("entry {name} has a corrupt header: {e}")))?;
            if size > MAX_TOTAL_BYTES - total {
                return Err(refused(
                    file,
                    format!("its files add up to more than {MAX_TOTAL_BYTES} bytes"),
                ));
            }
            let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0).min(1 << 20));
            (&mut entry)
                .take(size)
                .read_to_end(&mut data)
                .map_err(|e| stream_error(file, &exceeded, &e))?;
            if data.len() as u64 != size {
                return Err(damaged(
                    file,
                    format!(
                        "truncated: entry {name} ends after {} of {size} bytes",
                        data.len()
                    ),
                ));
            }
            total += size;

            let Some((_, listed)) = manifest.as_mut() else {
                if name != "manifest.toml" {
                    return Err(damaged(file, format!("the first entry is {name}, not manifest.toml; this is not a Keel config backup")));
                }
                manifest = Some(parse_manifest(file, &data)?);
                continue;
            };
            let Some(want) = listed.get(&name) else {
                return Err(damaged(
                    file,
                    format!("entry {name} is not listed in the manifest"),
                ));
            };
            if !seen.insert(name.clone()) {
                return Err(damaged(file, format!("entry {name} appears twice")));
            }
            if want.bytes != size {
                return Err(damaged(
                    file,
                    format!("{name} is {size} bytes, the manifest says {}", want.bytes),
                ));
            }
            let crc = crc32c::crc32c(&data);
            if want.crc32c != crc {
                return Err(damaged(
                    file,
                    format!(
                        "{name} fails its checksum (crc32c {crc:08x}, the manifest says {:08x})",
                        want.crc32c
                    ),
                ));
            }
            let rel = name
                .strip_prefix("config/")
                .expect("manifest paths start with config/");
            contents.push((PathBuf::from(rel), data));
        }
    }
    // Read what follows the tar end marker to the end of the zstd frame: this is where the
    // frame checksum is verified and where a cut-off tail shows up.
    let mut rest = ar.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink())
        .map_err(|e| stream_error(file, &exceeded, &e))?;

    let Some((head, listed)) = manifest else {
        return Err(damaged(
            file,
            "it holds no manifest.toml; it is empty or not a Keel config backup",
        ));
    };
    if let Some(missing) = listed.keys().find(|p| !seen.contains(*p)) {
        return Err(damaged(
            file,
            format!("{missing} is listed in the manifest but missing from the archive"),
        ));
    }
    let tree: Tree = contents.iter().cloned().collect();
    let config =
        files::parse_tree(&tree, Path::new("config")).map_err(|e| ConfigError::ArchiveInvalid {
            file: file.to_path_buf(),
            source: Box::new(e),
        })?;
    if config.cell.name != head.cell || config.version != head.config_version {
        return Err(damaged(
            file,
            format!(
                "the manifest says cell {} version {}, but its config/cell.toml says cell {} version {}",
                head.cell, head.config_version, config.cell.name, config.version
            ),
        ));
    }
    Ok(VerifiedBackup {
        cell: head.cell,
        version: head.config_version,
        created_at: head.created_at,
        keel_version: head.keel_version,
        files: contents,
        config,
    })
}

fn parse_manifest(
    file: &Path,
    data: &[u8],
) -> Result<(ManifestHead, BTreeMap<String, ManifestFile>)> {
    if data.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(refused(
            file,
            format!(
                "its manifest is {} bytes, the limit is {MAX_MANIFEST_BYTES}",
                data.len()
            ),
        ));
    }
    let text =
        std::str::from_utf8(data).map_err(|_| damaged(file, "manifest.toml is not UTF-8 text"))?;
    // Check the format before the rest, so a newer archive gets the precise refusal.
    let doc: toml::Table = toml::from_str(text).map_err(|e| {
        damaged(
            file,
            format!(
                "manifest.toml does not parse: {}",
                crate::files::one_line(e.message())
            ),
        )
    })?;
    let format = doc
        .get("manifest")
        .and_then(|m| m.get("format"))
        .and_then(|f| f.as_str())
        .unwrap_or("");
    if format != FORMAT {
        return Err(refused(file, format!("its format is {format:?}; this Keel reads {FORMAT:?} only — restore it with the Keel version that wrote it")));
    }
    let m: Manifest = toml::Value::Table(doc)
        .try_into()
        .map_err(|e: toml::de::Error| {
            damaged(
                file,
                format!(
                    "manifest.toml is not valid: {}",
                    crate::files::one_line(e.message())
                ),
            )
        })?;
    if m.file.len() >= MAX_ENTRIES {
        return Err(refused(
            file,
            format!("its manifest lists more than {} files", MAX_ENTRIES - 1),
        ));
    }
    let mut listed = BTreeMap::new();
    let mut total = 0u64;
    for f in m.file {
        let safe = safe_rel(Path::new(&f.path));
        let hidden = f.path.split('/').any(|c| c.starts_with('.'));
        if safe.as_deref() != Some(f.path.as_str()) || !f.path.starts_with("config/") || hidden {
            return Err(refused(file, format!("its manifest lists the unsafe path {:?} (files must be relative, under config/, without `..` or hidden names)", f.path)));
        }
        total = total.saturating_add(f.bytes);
        if listed.insert(f.path.clone(), f).is_some() {
            return Err(damaged(file, "its manifest lists a file twice"));
        }
    }
    if total > MAX_TOTAL_BYTES {
        return Err(refused(
            file,
            format!("its files add up to more than {MAX_TOTAL_BYTES} bytes"),
        ));
    }
    Ok((m.manifest, listed))
}

// --- restore -----------------------------------------------------------------------------------

/// The profile's cell name, read leniently: restore must work when the current configuration
/// is damaged. Falls back to the node copies.
fn profile_cell(profile: &Profile) -> Result<String> {
    let master = profile.layout().master_config();
    if let Some((cell, _)) = files::read_cell_lenient(&master) {
        return Ok(cell);
    }
    for copy in node_copies(profile) {
        if let Some((cell, _)) = files::read_cell_lenient(&copy) {
            return Ok(cell);
        }
    }
    Err(ConfigError::Invalid {
        file: master.join("cell.toml"),
        key: "cell.name".into(),
        problem: "cannot be read, so the cell of this profile is unknown and a restore cannot check the archive belongs to it".into(),
        fix: "repair the [cell] name in cell.toml (the cell name is in the archive's file name), then restore again".into(),
    })
}

fn node_copies(profile: &Profile) -> Vec<PathBuf> {
    let base = profile.root().join("node-config");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&base)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .take(1000)
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Restores an archive into the profile's master repository. Verifies everything before
/// touching anything and refuses an archive of another cell; then, under the master lock, moves
/// the current files to `backups/config-replaced-<timestamp>/`, writes the archive's files, and
/// sets the version to max(current, archive) + 1 so every node copy is behind and syncs.
pub fn restore_backup(profile: &Profile, file: &Path) -> Result<RestoreInfo> {
    let v = verify_backup(file)?;
    let profile_cell = profile_cell(profile)?;
    if v.cell != profile_cell {
        return Err(ConfigError::ForeignArchive {
            file: file.to_path_buf(),
            archive_cell: v.cell,
            profile_cell,
        });
    }
    let master = profile.master();
    let dir = master.dir().to_path_buf();
    let _lock = RepoLock::exclusive(&dir)?;

    let from_version = files::read_cell_lenient(&dir).map_or(0, |(_, ver)| ver);
    let highest_seen = node_copies(profile)
        .iter()
        .filter_map(|c| files::read_cell_lenient(c))
        .map(|(_, ver)| ver)
        .fold(from_version, u64::max);
    let to_version = highest_seen.max(v.version).checked_add(1).filter(|x| *x <= i64::MAX as u64).ok_or_else(|| ConfigError::Invalid {
        file: dir.join("cell.toml"),
        key: "repository.version".into(),
        problem: format!("= {highest_seen} is invalid: it cannot go higher"),
        fix: "set repository.version to a lower number in cell.toml and in every node copy, then restore again".into(),
    })?;

    let backups = profile.layout().backups();
    fsx::ensure_dir(&backups)?;
    let set_aside = make_set_aside_dir(&backups)?;

    let mut moved: Vec<std::ffi::OsString> = Vec::new();
    let swapped = swap_in(&dir, &set_aside, &v, to_version, &mut moved);
    if let Err(e) = swapped {
        let rolled_back = roll_back(&dir, &set_aside, &moved);
        tracing::error!(error = %e, rolled_back, set_aside = %set_aside.display(), "config restore failed");
        return Err(ConfigError::RestoreFailed {
            set_aside,
            rolled_back,
            source: Box::new(e),
        });
    }
    tracing::info!(archive = %file.display(), from_version, to_version, set_aside = %set_aside.display(), "configuration restored");
    Ok(RestoreInfo {
        from_version,
        to_version,
        set_aside,
    })
}

fn make_set_aside_dir(backups: &Path) -> Result<PathBuf> {
    let stamp = fsx::now_compact();
    // Two restores within one second get -2, -3, …; bounded because each try creates a dir.
    for n in 1..=100u32 {
        let p = if n == 1 {
            backups.join(format!("config-replaced-{stamp}"))
        } else {
            backups.join(format!("config-replaced-{stamp}-{n}"))
        };
        match std::fs::create_dir(&p) {
            Ok(()) => {
                fsx::fsync_dir(backups)?;
                return Ok(p);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err("create directory", &p, FIX_PERM)(e)),
        }
    }
    Err(ConfigError::Io {
        action: "create a set-aside directory in".into(),
        path: backups.to_path_buf(),
        source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        fix: "remove old config-replaced-* directories you no longer need".into(),
    })
}

fn swap_in(
    dir: &Path,
    set_aside: &Path,
    v: &VerifiedBackup,
    to_version: u64,
    moved: &mut Vec<std::ffi::OsString>,
) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(io_err("list directory", dir, FIX_PERM))?;
    let mut names = Vec::new();
    for e in rd {
        let e = e.map_err(io_err("list directory", dir, FIX_PERM))?;
        if e.file_name() != LOCK_FILE {
            names.push(e.file_name());
        }
    }
    for name in names {
        let (from, to) = (dir.join(&name), set_aside.join(&name));
        std::fs::rename(&from, &to).map_err(io_err("move aside", &from, FIX_PERM))?;
        moved.push(name);
    }
    fsx::fsync_dir(dir)?;
    fsx::fsync_dir(set_aside)?;
    for (rel, bytes) in &v.files {
        if rel == Path::new("cell.toml") {
            continue;
        }
        let path = dir.join(rel);
        fsx::ensure_dir(&fsx::parent_of(&path))?;
        fsx::write_atomic(&path, bytes)?;
    }
    let mut cfg = v.config.clone();
    cfg.version = to_version;
    // cell.toml last, as in every write: it carries the version nodes compare.
    fsx::write_atomic(
        &dir.join("cell.toml"),
        &files::render_cell(&cfg, &fsx::now_rfc3339()),
    )?;
    let (loaded, _) = crate::repo::Repository::at(dir.to_path_buf()).load_unlocked()?;
    if loaded != cfg {
        return Err(ConfigError::Invalid {
            file: dir.join("cell.toml"),
            key: "(restore)".into(),
            problem: "the restored files do not load back as the archived configuration".into(),
            fix: "report this as a Keel bug with the archive attached".into(),
        });
    }
    Ok(())
}

/// Best effort: empties `dir` (but the lock) and moves the set-aside entries back.
fn roll_back(dir: &Path, set_aside: &Path, moved: &[std::ffi::OsString]) -> bool {
    let mut ok = true;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_name() == LOCK_FILE {
                continue;
            }
            let p = e.path();
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            ok &= r.is_ok();
        }
    }
    for name in moved {
        ok &= std::fs::rename(set_aside.join(name), dir.join(name)).is_ok();
    }
    ok &= fsx::fsync_dir(dir).is_ok();
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::CreateOptions;

    fn profile(t: &tempfile::TempDir, name: &str, cell: &str) -> Profile {
        Profile::create(
            &t.path().join(name),
            &CreateOptions {
                cell: cell.into(),
                ..CreateOptions::default()
            },
        )
        .expect("create profile")
    }

    use crate::repo::tests::snapshot;

    fn without_version(mut c: Config) -> Config {
        c.version = 0;
        c
    }

    /// Writes a zstd tar with the given raw entry names (no path checks), for hostile archives.
    fn craft(path: &Path, entries: &[(&str, &[u8])]) {
        let f = File::create(path).expect("create");
        let mut enc = zstd::stream::write::Encoder::new(f, 1).expect("enc");
        enc.include_checksum(true).expect("checksum");
        let mut b = tar::Builder::new(enc);
        for (name, data) in entries {
            let mut h = tar::Header::new_old();
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_cksum();
            b.append(&h, *data).expect("append");
        }
        b.into_inner().expect("tar").finish().expect("zstd");
    }

    fn manifest_for(cell: &str, version: u64, files: &[(&str, &[u8])]) -> String {
        let m = Manifest {
            manifest: ManifestHead {
                format: FORMAT.into(),
                cell: cell.into(),
                config_version: version,
                created_at: "2025-01-01T00:00:00Z".into(),
                keel_version: "0.0.0".into(),
            },
            file: files
                .iter()
                .map(|(p, b)| ManifestFile {
                    path: (*p).into(),
                    bytes: b.len() as u64,
                    crc32c: crc32c::crc32c(b),
                })
                .collect(),
        };
        toml::to_string(&m).expect("manifest")
    }

    /// The real files of a profile's master, as archive entries.
    fn entries_of(p: &Profile) -> Vec<(String, Vec<u8>)> {
        collect_files(p.master().dir()).expect("collect")
    }

    #[test]
    fn backup_change_restore_gives_back_the_earlier_config() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = profile(&t, "p", "keelCell");
        let before = p.master().load().expect("load");
        let info = create_backup(&p, None).expect("backup");
        assert_eq!(
            (info.cell.as_str(), info.version, info.files),
            ("keelCell", 1, 4)
        );
        assert!(info.bytes > 0 && info.bytes == std::fs::metadata(&info.path).expect("meta").len());
        let name = info
            .path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert!(
            info.path.starts_with(p.layout().backups()),
            "{}",
            info.path.display()
        );
        assert!(
            name.starts_with("config-keelCell-v1-")
                && name.ends_with("Z.keelcfg")
                && name.len() == "config-keelCell-v1-20250101T000000Z.keelcfg".len(),
            "{name}"
        );

        let v = verify_backup(&info.path).expect("verify");
        assert_eq!((v.cell.as_str(), v.version), ("keelCell", 1));
        assert_eq!(v.config, before);
        assert_eq!(v.files().len(), 4);
        assert!(v.files().iter().any(|(p, _)| p == Path::new("cell.toml")));

        p.master()
            .update(|c| c.add_server("node01", "server2").map(|_| ()))
            .expect("update");
        p.master()
            .update(|c| {
                c.nodes[0].servers[0].monitor.auto_restart = false;
                c.buses.clear();
                Ok(())
            })
            .expect("update");
        assert_eq!(p.master().version().expect("version"), 3);

        let r = restore_backup(&p, &info.path).expect("restore");
        assert_eq!((r.from_version, r.to_version), (3, 4));
        let after = p.master().load().expect("load restored");
        assert_eq!(after.version, 4);
        assert_eq!(without_version(after), without_version(before));
        assert!(r.set_aside.is_dir() && r.set_aside.starts_with(p.layout().backups()));
        assert!(r
            .set_aside
            .file_name()
            .expect("name")
            .to_string_lossy()
            .starts_with("config-replaced-"));
        assert!(
            r.set_aside
                .join("nodes/node01/servers/server2.toml")
                .is_file(),
            "replaced files are kept"
        );
        assert!(
            p.master().dir().join(".lock").is_file(),
            "the lock file stays in place"
        );
        assert!(!p
            .master()
            .dir()
            .join("nodes/node01/servers/server2.toml")
            .exists());

        // The node copy is behind and catches up.
        let s = crate::repo::sync(&p.master(), &p.node_copy("node01")).expect("sync");
        assert_eq!(
            s,
            crate::SyncOutcome {
                from: Some(1),
                to: 4
            }
        );
    }

    #[test]
    fn backup_restore_round_trips_destinations_and_bus_keys() {
        use crate::model::{DestinationKind, Reliability};
        let t = tempfile::tempdir().expect("tempdir");
        let p = profile(&t, "p", "keelCell");
        let bus = p.master().load().expect("load").buses[0].name.clone();
        p.master()
            .update(|c| {
                c.add_destination(&bus, "q1", DestinationKind::Queue, None, None)?;
                c.add_destination(&bus, "q1.dead", DestinationKind::Queue, None, None)?;
                c.add_destination(
                    &bus,
                    "t1",
                    DestinationKind::Topic,
                    None,
                    Some(Reliability::Express),
                )?;
                let b = &mut c.buses[0];
                b.allow_anonymous = true;
                b.max_message_bytes = 65536;
                b.destinations[0].exception_destination = Some("q1.dead".into());
                b.destinations[0].default_priority = 9;
                Ok(())
            })
            .expect("update");
        let before = p.master().load().expect("load");
        assert_eq!(before.buses[0].destinations.len(), 3);
        let info = create_backup(&p, Some(&t.path().join("d.keelcfg"))).expect("backup");
        assert_eq!(verify_backup(&info.path).expect("verify").config, before);

        p.master()
            .update(|c| {
                let b = &mut c.buses[0];
                b.destinations.clear();
                b.allow_anonymous = false;
                b.max_message_bytes = crate::model::DEFAULT_MAX_MESSAGE_BYTES;
                Ok(())
            })
            .expect("update");
        assert!(p.master().load().expect("load").buses[0]
            .destinations
            .is_empty());

        restore_backup(&p, &info.path).expect("restore");
        let after = p.master().load().expect("load restored");
        assert_eq!(without_version(after), without_version(before.clone()));
        let d = before.find_destination(&bus, "q1").expect("q1");
        assert_eq!(d.exception_destination.as_deref(), Some("q1.dead"));
        let s = crate::repo::sync(&p.master(), &p.node_copy("node01")).expect("sync");
        assert_eq!(s.to, p.master().version().expect("version"));
        assert_eq!(
            without_version(p.node_copy("node01").load().expect("copy")),
            without_version(before)
        );
    }

    #[test]
    fn restore_version_is_above_the_archive_version() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = profile(&t, "p", "keelCell");
        for i in 0..4 {
            p.master()
                .update(|c| c.add_server("node01", &format!("x{i}")).map(|_| ()))
                .expect("update");
        }
        let info = create_backup(&p, Some(&t.path().join("v5.keelcfg"))).expect("backup");
        assert_eq!(info.version, 5);
        // Pretend the master went back (e.g. hand-restored files): the archive version wins.
        std::fs::write(p.master().dir().join("cell.toml"), "garbage").expect("write");
        let r = restore_backup(&p, &info.path).expect("restore a damaged master");
        assert_eq!((r.from_version, r.to_version), (0, 6));
        assert_eq!(p.master().version().expect("version"), 6);
    }

    #[test]
    fn backup_refuses_to_overwrite() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = profile(&t, "p", "keelCell");
        let to = t.path().join("out/b.keelcfg");
        create_backup(&p, Some(&to)).expect("backup");
        let bytes = std::fs::read(&to).expect("read");
        let e = create_backup(&p, Some(&to)).expect_err("exists");
        assert!(matches!(e, ConfigError::TargetExists { .. }), "{e}");
        assert_eq!(std::fs::read(&to).expect("read"), bytes);
        let names: Vec<_> = std::fs::read_dir(t.path().join("out"))
            .expect("ls")
            .map(|e| e.expect("e").file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temp file left: {names:?}");
    }

    fn assert_refused_and_unchanged(p: &Profile, archive: &Path, check: impl Fn(&ConfigError)) {
        let before = snapshot(p.root());
        let e = restore_backup(p, archive).expect_err("must be refused");
        check(&e);
        assert!(
            e.to_string().contains(&archive.display().to_string()),
            "{e}"
        );
        assert_eq!(snapshot(p.root()), before, "the profile changed");
    }

    #[test]
    fn truncated_archive_is_refused_and_nothing_changes() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = profile(&t, "p", "keelCell");
        let info = create_backup(&p, None).expect("backup");
        p.master()
            .update(|c| c.add_server("node01", "server2").map(|_| ()))
            .expect("update");
        let bytes = std::fs::read(&info.path).expect("read");
        let cut = t.path().join("cut.keelcfg");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
        assert_refused_and_unchanged(&p, &cut, |e| {
            assert!(matches!(e, ConfigError::ArchiveDamaged { .. }), "{e:?}");
            let m = e.to_string();
            assert!(
                m.contains("is damaged (truncated")
                    && m.contains("nothing was restored. Use another backup."),
                "{m}"
            );
        });
        // Cut just before the end too: only the frame's checksum/tail is missing.
        std::fs::write(&cut, &bytes[..bytes.len() - 3]).expect("write");
        assert_refused_and_unchanged(&p, &cut, |e| {
            assert!(matches!(e, ConfigError::ArchiveDamaged { .. }), "{e:?}")
        });
        std::fs::write(&cut, b"").expect("write");
        assert_refused_and_unchanged(&p, &cut, |e| {
            assert!(matches!(e, ConfigError::ArchiveDamaged { .. }), "{e:?}")
        });
    }

    #[test]
    fn a_flipped_byte_anywhere_is_refused() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = profile(&t, "p", "keelCell");
        let info = create_backup(&p, None).expect("backup");
        let bytes = std::fs::read(&info.path).expect("read");
        let bad = t.path().join("flip.keelcfg");
        // The middle, plus a spread of other positions (header, blocks, checksum).
        let mut positions = vec![bytes.len() / 2, bytes.len() - 1, 4];
        positions.extend((0..bytes.len()).step_by(bytes.len() / 16 + 1));
        for pos in positions {
            let mut b = bytes.clone();
            b[pos] ^= 0x5a;
            std::fs::write(&bad, &b).expect("write");
            assert!(
                verify_backup(&bad).is_err(),
                "flip at {pos} of {} went unnoticed",
                bytes.len()
            );
        }
        let mut b = bytes.clone();
        b[bytes.len() / 2] ^= 0xff;
        std::fs::write(&bad, &b).expect("write");
        assert_refused_and_unchanged(&p, &bad, |e| {
            assert!(
                matches!(
                    e,
                    ConfigError::ArchiveDamaged { .. } | ConfigError::ArchiveRefused { .. }
                ),
                "{e:?}"
            )
        });
    }

    #[test]
    fn foreign_cell_is_refused() {
        let t = tempfile::tempdir().expect("tempdir");
        let mine = profile(&t, "mine", "keelCell");
        let other = profile(&t, "other", "otherCell");
        let info = create_backup(&other, None).expect("backup");
        assert_refused_and_unchanged(&mine, &info.path, |e| {
            assert_eq!(
                e.to_string(),
                format!("archive {} belongs to cell otherCell, this profile is cell keelCell; restore it into a profile of cell otherCell", info.path.display())
            );
        });
    }

    #[test]
    fn hostile_or_inconsistent_archives_are_refused() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = profile(&t, "p", "keelCell");
        let real = entries_of(&p);
        let real: Vec<(&str, &[u8])> = real
            .iter()
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        let a = t.path().join("a.keelcfg");

        let check = |entries: &[(&str, &[u8])], want: &str| {
            craft(&a, entries);
            let e = verify_backup(&a).expect_err(want);
            assert!(e.to_string().contains(want), "want {want:?} in {e}");
            assert_refused_and_unchanged(&p, &a, |_| {});
        };

        // Sanity: a crafted copy of the real files verifies.
        let m = manifest_for("keelCell", 1, &real);
        let mut good = vec![("manifest.toml", m.as_bytes())];
        good.extend(real.iter().copied());
        craft(&a, &good);
        verify_backup(&a).expect("crafted good archive");

        check(&real, "not manifest.toml");

        let evil: &[u8] = b"owned";
        let mut files = real.clone();
        files.push(("config/../../evil", evil));
        let m = manifest_for("keelCell", 1, &files);
        let mut entries = vec![("manifest.toml", m.as_bytes())];
        entries.extend(files.iter().copied());
        check(&entries, "unsafe path");
        assert!(!t.path().join("evil").exists());

        let m = manifest_for("keelCell", 1, &real);
        let mut entries = vec![("manifest.toml", m.as_bytes())];
        entries.extend(real.iter().copied());
        entries.push(("/tmp/keel-evil", evil));
        check(&entries, "entry \"/tmp/keel-evil\" has an unsafe path");
        entries.pop();
        entries.push(("config/../x", evil));
        check(&entries, "has an unsafe path");
        entries.pop();
        entries.push(("config/extra.toml", evil));
        check(&entries, "config/extra.toml is not listed in the manifest");

        let mut entries = vec![("manifest.toml", m.as_bytes())];
        entries.extend(real.iter().copied().skip(1));
        check(
            &entries,
            "is listed in the manifest but missing from the archive",
        );

        let mut entries = vec![("manifest.toml", m.as_bytes())];
        let mut changed = real.clone();
        let at = changed
            .iter()
            .position(|(n, _)| *n == "config/cell.toml")
            .expect("cell.toml");
        let tampered = String::from_utf8(changed[at].1.to_vec())
            .expect("utf8")
            .replace("keelCell", "keelCelX");
        assert_ne!(tampered.as_bytes(), changed[at].1);
        changed[at].1 = tampered.as_bytes();
        entries.extend(changed.iter().copied());
        check(&entries, "fails its checksum");

        let m2 = m.replace(FORMAT, "keel-config-backup/9");
        let mut entries = vec![("manifest.toml", m2.as_bytes())];
        entries.extend(real.iter().copied());
        check(&entries, "its format is \"keel-config-backup/9\"");

        // A valid archive whose configuration breaks a rule.
        let mut files = real.clone();
        let server = files
            .iter()
            .position(|(n, _)| n.ends_with("server1.toml"))
            .expect("server file");
        let text = String::from_utf8(files[server].1.to_vec())
            .expect("utf8")
            .replace("bus_port = 7272", "bus_port = 7271");
        files[server].1 = text.as_bytes();
        let m = manifest_for("keelCell", 1, &files);
        let mut entries = vec![("manifest.toml", m.as_bytes())];
        entries.extend(files.iter().copied());
        check(&entries, "holds a configuration that does not validate");

        craft(&a, &[]);
        assert!(verify_backup(&a)
            .expect_err("empty")
            .to_string()
            .contains("no manifest.toml"));
    }

    /// Regression (fuzz): an archive declaring a 128 MiB zstd window (zstd's default limit)
    /// made the decoder allocate it; windows over 2^WINDOW_LOG_MAX are refused as damage.
    #[test]
    fn fuzz_regression_a_huge_zstd_window_is_refused() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = profile(&t, "p", "keelCell");
        let info = create_backup(&p, None).expect("backup");
        let tar_bytes =
            zstd::stream::decode_all(File::open(&info.path).expect("open")).expect("decompress");
        let with_window = |log: u32| {
            let path = t.path().join(format!("w{log}.keelcfg"));
            let mut enc =
                zstd::stream::write::Encoder::new(File::create(&path).expect("create"), 1)
                    .expect("enc");
            enc.include_checksum(true).expect("checksum");
            enc.window_log(log).expect("window");
            enc.long_distance_matching(true).expect("ldm");
            std::io::Write::write_all(&mut enc, &tar_bytes).expect("write");
            enc.finish().expect("finish");
            path
        };
        verify_backup(&with_window(WINDOW_LOG_MAX)).expect("a window at the limit is read");
        let err = verify_backup(&with_window(27)).expect_err("a 128 MiB window is refused");
        assert!(matches!(err, ConfigError::ArchiveDamaged { .. }), "{err:?}");
    }

    #[test]
    fn limited_reader_stops_a_bomb() {
        let exceeded = Rc::new(StdCell::new(false));
        let mut r = Limited {
            inner: std::io::repeat(0).take(100),
            left: 10,
            exceeded: exceeded.clone(),
        };
        let mut out = Vec::new();
        assert!(r.read_to_end(&mut out).is_err());
        assert!(exceeded.get());
        assert_eq!(out.len(), 10);
        let mut ok = Limited {
            inner: std::io::repeat(0).take(10),
            left: 10,
            exceeded: Rc::new(StdCell::new(false)),
        };
        assert_eq!(
            ok.read_to_end(&mut Vec::new()).expect("exactly the limit"),
            10
        );
    }

    #[test]
    fn backup_restore_and_sync_carry_datasources_and_apps() {
        use crate::model::{AppCfg, AppKind, DataSourceCfg, DataSourceKind, DestinationKind};
        let t = tempfile::tempdir().expect("tempdir");
        let p = profile(&t, "p", "keelCell");
        p.master()
            .update(|c| {
                c.add_destination("bus1", "in", DestinationKind::Queue, None, None)?;
                c.add_datasource(DataSourceCfg {
                    name: "pg1".into(),
                    kind: DataSourceKind::Postgres,
                    url: "postgresql://keel@127.0.0.1/db".into(),
                    pool_max: 8,
                })?;
                c.add_app(AppCfg {
                    name: "sc".into(),
                    server: "server1".into(),
                    bus: "bus1".into(),
                    on: "in".into(),
                    kind: AppKind::Script,
                    to: None,
                    datasource: None,
                    statement: None,
                    script: Some(crate::model::tests::TRICKY_SCRIPT.into()),
                    concurrency: 2,
                    timeout_s: 60,
                })?;
                Ok(())
            })
            .expect("update");
        let before = p.master().load().expect("load");
        let info = create_backup(&p, Some(&t.path().join("a.keelcfg"))).expect("backup");
        let v = verify_backup(&info.path).expect("verify");
        assert_eq!(v.config, before);
        for f in ["datasources/pg1.toml", "apps/sc.toml"] {
            assert!(
                v.files().iter().any(|(rel, _)| rel == Path::new(f)),
                "{f} archived"
            );
        }
        // Node sync copies the new directories.
        crate::repo::sync(&p.master(), &p.node_copy("node01")).expect("sync");
        let copy = p.node_copy("node01").load().expect("copy");
        assert_eq!(copy, before);
        assert!(p
            .layout()
            .node_config("node01")
            .join("apps/sc.toml")
            .is_file());

        p.master()
            .update(|c| {
                c.remove_app("sc")?;
                c.remove_datasource("pg1")?;
                Ok(())
            })
            .expect("remove");
        assert!(!p.master().dir().join("apps/sc.toml").exists());
        assert!(!p.master().dir().join("datasources/pg1.toml").exists());
        crate::repo::sync(&p.master(), &p.node_copy("node01")).expect("sync");
        let copy = p.node_copy("node01").load().expect("copy");
        assert!(copy.apps.is_empty() && copy.datasources.is_empty());

        restore_backup(&p, &info.path).expect("restore");
        let after = p.master().load().expect("load restored");
        assert_eq!(without_version(after), without_version(before));
    }
}
