//! Fuzz target: config archives (`verify_backup`, and `restore_backup` of whatever verifies).
//! A real backup of a new profile is damaged: its compressed bytes mutated; its tar stream
//! mutated with every tar header checksum recomputed, then compressed again (valid zstd, so
//! tar, the manifest and the entry checks stand guard); or one configuration file mutated with
//! the manifest's size and CRC-32C rewritten to match (so the configuration parser and its
//! validation stand guard).
//!
//! Checked: no panic; verification allocates at most `ALLOC_PER_INPUT_BYTE` × the
//! decompressed bytes + `ALLOC_CONST_BYTES` (zstd's Rust-side buffers and serde's cautious
//! pre-allocation; zstd's own window is bounded by the decoder's window limit, see
//! `fuzz_regression_a_huge_zstd_window_is_refused`); and a restore writes nothing outside
//! the profile's `config/` and `backups/` (every other file under the test's root is
//! unchanged, none appears).
//!
//! `KEEL_FUZZ_CASES=N cargo nextest run -p keel-config -E 'test(fuzz)'` for a long run.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use keel_config::{create_backup, restore_backup, verify_backup, CreateOptions, Profile};
use keel_core::fuzz::{self, CountingAlloc};
use proptest::prelude::*;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const ALLOC_PER_INPUT_BYTE: usize = 64;
const ALLOC_CONST_BYTES: usize = 2 << 20;
const BLOCK_BYTES: usize = 512;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: fuzz::cases(fuzz::CASES_DEFAULT),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn new_profile(root: &Path) -> Profile {
    Profile::create(
        &root.join("p"),
        &CreateOptions {
            cell: "keelCell".into(),
            ..CreateOptions::default()
        },
    )
    .expect("create profile")
}

/// The tar stream of a real backup (decompressed), made once per test binary.
fn real_tar() -> &'static [u8] {
    static TAR: OnceLock<Vec<u8>> = OnceLock::new();
    TAR.get_or_init(|| {
        let tmp = tempfile::tempdir().expect("tempdir");
        let p = new_profile(tmp.path());
        let info = create_backup(&p, Some(&tmp.path().join("b.keelcfg"))).expect("backup");
        zstd::stream::decode_all(std::fs::File::open(&info.path).expect("open"))
            .expect("decompress")
    })
}

fn compress(tar: &[u8]) -> Vec<u8> {
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("encoder");
    enc.include_checksum(true).expect("checksum");
    std::io::Write::write_all(&mut enc, tar).expect("write");
    enc.finish().expect("finish")
}

/// Rewrites the checksum of every header reachable by walking the tar from its start (sizes
/// as the headers state them), so mutated headers get past tar's own check.
fn reseal_headers(tar: &mut [u8]) {
    let mut at = 0;
    while at + BLOCK_BYTES <= tar.len() {
        let h = &mut tar[at..at + BLOCK_BYTES];
        if h.iter().all(|b| *b == 0) {
            break; // the end marker
        }
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let size = std::str::from_utf8(&h[124..136])
            .ok()
            .and_then(|s| {
                u64::from_str_radix(s.trim_matches(|c: char| c == '\0' || c == ' '), 8).ok()
            })
            .unwrap_or(0);
        let Some(next) = usize::try_from(size)
            .ok()
            .and_then(|n| n.checked_add(BLOCK_BYTES - 1))
            .map(|n| n / BLOCK_BYTES * BLOCK_BYTES)
            .and_then(|n| n.checked_add(at + BLOCK_BYTES))
        else {
            break;
        };
        at = next;
    }
}

/// The entries (name, bytes) of a well-formed tar.
fn entries(tar: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut ar = tar::Archive::new(tar);
    ar.entries()
        .expect("entries")
        .map(|e| {
            let mut e = e.expect("entry");
            let name = e.path().expect("path").to_string_lossy().into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).expect("read");
            (name, data)
        })
        .collect()
}

fn build_tar(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(0o600);
        b.append_data(&mut h, name, &data[..]).expect("append");
    }
    b.into_inner().expect("tar")
}

/// Every file under `root` except the profile's `config/` and `backups/`, with its bytes.
fn outside_config(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("read_dir") {
            let path = e.expect("entry").path();
            let rel = path.strip_prefix(root).expect("under root").to_path_buf();
            if rel.starts_with("p/config") || rel.starts_with("p/backups") {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path).expect("metadata");
            if meta.is_dir() {
                stack.push(path.clone());
                out.insert(rel, Vec::new());
            } else {
                out.insert(rel, std::fs::read(&path).unwrap_or_default());
            }
        }
    }
    out
}

/// Verifies `archive` (allocation checked); if it verifies, restores it into a new profile
/// and checks nothing outside `config/` and `backups/` changed.
fn check_archive(archive: &[u8], tar_bytes: usize) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("hostile.keelcfg");
    std::fs::write(&path, archive).expect("write archive");
    let (verified, peak_bytes) = fuzz::peak_bytes(|| verify_backup(&path));
    let bound_bytes = ALLOC_PER_INPUT_BYTE * tar_bytes.max(archive.len()) + ALLOC_CONST_BYTES;
    assert!(
        peak_bytes <= bound_bytes,
        "verifying a {}-byte archive ({tar_bytes} bytes of tar) allocated {peak_bytes} bytes",
        archive.len()
    );
    if verified.is_err() {
        return;
    }
    let p = new_profile(tmp.path());
    let before = outside_config(tmp.path());
    let _ = restore_backup(&p, &path);
    assert_eq!(
        outside_config(tmp.path()),
        before,
        "a restore wrote outside config/ and backups/"
    );
}

fn ops() -> impl Strategy<Value = Vec<(u8, u64)>> {
    proptest::collection::vec(any::<(u8, u64)>(), 1..8)
}

#[test]
fn fuzz_seed_the_real_archive_verifies_and_restores() {
    let tar = real_tar();
    let names: Vec<String> = entries(tar).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names[0], "manifest.toml");
    assert!(names.iter().any(|n| n == "config/cell.toml"), "{names:?}");
    let mut resealed = tar.to_vec();
    reseal_headers(&mut resealed);
    let tmp = tempfile::tempdir().expect("tempdir");
    for (name, t) in [("a", tar), ("resealed", &resealed[..])] {
        let archive = compress(t);
        check_archive(&archive, t.len());
        let path = tmp.path().join(format!("{name}.keelcfg"));
        std::fs::write(&path, &archive).expect("write");
        verify_backup(&path).unwrap_or_else(|e| panic!("the {name} archive verifies: {e}"));
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_mutated_archives(ops in ops()) {
        let archive = fuzz::mutate(&compress(real_tar()), &ops);
        check_archive(&archive, real_tar().len());
    }

    /// The tar stream mutated (names, sizes, types, contents, the end marker), its header
    /// checksums recomputed, compressed again.
    #[test]
    fn fuzz_mutated_tars_behind_valid_zstd(ops in ops()) {
        let mut tar = fuzz::mutate(real_tar(), &ops);
        reseal_headers(&mut tar);
        check_archive(&compress(&tar), tar.len());
    }

    /// One configuration file mutated, the manifest's size and CRC for it rewritten: only the
    /// configuration parser and validation stand guard.
    #[test]
    fn fuzz_mutated_config_files_behind_a_valid_manifest(k in any::<usize>(), ops in ops()) {
        let mut es = entries(real_tar());
        let i = 1 + k % (es.len() - 1);
        let data = fuzz::mutate(&es[i].1, &ops);
        let name = es[i].0.clone();
        let mut manifest: toml::Table = toml::from_str(std::str::from_utf8(&es[0].1).expect("utf-8")).expect("manifest");
        for f in manifest["file"].as_array_mut().expect("files") {
            let f = f.as_table_mut().expect("file");
            if f["path"].as_str() == Some(name.as_str()) {
                f.insert("bytes".into(), toml::Value::Integer(data.len() as i64));
                f.insert("crc32c".into(), toml::Value::Integer(i64::from(crc32c::crc32c(&data))));
            }
        }
        es[0].1 = toml::to_string(&manifest).expect("manifest").into_bytes();
        es[i].1 = data;
        let tar = build_tar(&es);
        check_archive(&compress(&tar), tar.len());
    }
}
