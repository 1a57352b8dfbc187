//! Support for the decoders' fuzz targets (property tests run on the stable toolchain): a
//! counting global allocator that measures the peak bytes one decode call allocates, the case
//! count (`KEEL_FUZZ_CASES`), and byte mutations that start from a valid encoding.
//!
//! A fuzz test binary installs the allocator with
//! `#[global_allocator] static ALLOC: keel_core::fuzz::CountingAlloc = keel_core::fuzz::CountingAlloc;`
//! and wraps each decode in [`peak_bytes`]. Only the calling thread is counted (tests run in
//! parallel threads), and only allocations made through Rust's allocator: memory a C library
//! takes with its own `malloc` (zstd's decoder) is bounded by that library's parameters, not
//! measured here.
//!
//! Each target asserts that one decode allocates at most k × input + a constant (k between 4
//! and 64 by target; the constant is serde's cautious sequence pre-allocation, 1 MiB, plus a
//! zstd block buffer where there is one), so no decoder allocates from an announced length.
//! [`mutate`] flips bits, truncates, repeats and splices sections and writes hostile 32-bit
//! lengths. Targets run [`CASES_DEFAULT`] cases unless `KEEL_FUZZ_CASES` says otherwise.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

/// Cases a fuzz target runs when `KEEL_FUZZ_CASES` is unset: CI's bounded run.
pub const CASES_DEFAULT: u32 = 256;

/// The case count of each fuzz target: `KEEL_FUZZ_CASES=N` for a long run by hand, else
/// `default` (what keeps the whole fuzz set under a minute in a debug build).
pub fn cases(default: u32) -> u32 {
    match std::env::var("KEEL_FUZZ_CASES") {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("KEEL_FUZZ_CASES={v:?} is not a number of cases")),
        Err(_) => default,
    }
}

/// The system allocator, counting what the current thread holds while [`peak_bytes`] runs.
pub struct CountingAlloc;

/// Set once any allocation went through [`CountingAlloc`]: a measurement in a binary that did
/// not install it would read 0 and prove nothing, so [`peak_bytes`] refuses to run there.
static INSTALLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    // Const-initialised cells without destructors: reading them never allocates, so the
    // allocator can use them.
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static LIVE_BYTES: Cell<isize> = const { Cell::new(0) };
    static PEAK_BYTES: Cell<isize> = const { Cell::new(0) };
}

fn note(delta_bytes: isize) {
    // try_with: a thread being torn down has no cells left; it is never measuring.
    let _ = ARMED.try_with(|armed| {
        if armed.get() {
            let live = LIVE_BYTES.get() + delta_bytes;
            LIVE_BYTES.set(live);
            if live > PEAK_BYTES.get() {
                PEAK_BYTES.set(live);
            }
        }
    });
}

fn signed(bytes: usize) -> isize {
    isize::try_from(bytes).unwrap_or(isize::MAX)
}

// SAFETY: every call is forwarded to `System` unchanged; the counting touches only
// thread-local cells that never allocate.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        INSTALLED.store(true, Ordering::Relaxed);
        let p = System.alloc(layout);
        if !p.is_null() {
            note(signed(layout.size()));
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        INSTALLED.store(true, Ordering::Relaxed);
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            note(signed(layout.size()));
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        note(-signed(layout.size()));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            note(signed(new_size) - signed(layout.size()));
        }
        p
    }
}

/// Runs `f` and returns its result with the most bytes this thread held at once during it,
/// beyond what it held before (memory freed during `f` that was allocated before counts
/// negative, so the figure is never more than the truth).
pub fn peak_bytes<T>(f: impl FnOnce() -> T) -> (T, usize) {
    assert!(
        INSTALLED.load(Ordering::Relaxed),
        "keel_core::fuzz::CountingAlloc is not this binary's #[global_allocator]"
    );
    assert!(!ARMED.get(), "peak_bytes does not nest");
    /// Disarms when `f` returns or panics: a property test's shrinker runs the next case on
    /// the same thread after a panic.
    struct Disarm;
    impl Drop for Disarm {
        fn drop(&mut self) {
            ARMED.set(false);
        }
    }
    LIVE_BYTES.set(0);
    PEAK_BYTES.set(0);
    ARMED.set(true);
    let disarm = Disarm;
    let out = f();
    drop(disarm);
    (out, usize::try_from(PEAK_BYTES.get()).unwrap_or(0))
}

/// Lengths a hostile length field is set to: the extremes, the sign bit, and off by one.
const HOSTILE_U32: [u32; 6] = [
    u32::MAX,
    u32::MAX - 1,
    0x8000_0000,
    0x7fff_ffff,
    0x0100_0000,
    0,
];

/// Applies `ops` to a copy of `seed`: each op is (kind, argument), deterministic, so a
/// property test's shrinker can minimise the list. Kinds, by `kind % 8`: flip one bit, set one
/// byte, truncate, delete a range, duplicate a range in place (a repeated section), splice a
/// range elsewhere, write a hostile 32-bit length big-endian, the same little-endian. The
/// result is bounded: at most twice the input plus 64 bytes per op.
pub fn mutate(seed: &[u8], ops: &[(u8, u64)]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for &(kind, arg) in ops {
        let bound_bytes = b.len() * 2 + 64;
        if b.is_empty() {
            b.push(arg as u8);
            continue;
        }
        let n = b.len() as u64;
        let at = (arg % n) as usize;
        // A second, independent position and a short length from the high bits.
        let to = ((arg >> 32) % n) as usize;
        let span = (((arg >> 24) & 0xff) as usize + 1).min(b.len() - at);
        match kind % 8 {
            0 => b[at] ^= 1 << ((arg >> 40) % 8),
            1 => b[at] = (arg >> 40) as u8,
            2 => b.truncate(at),
            3 => {
                b.drain(at..at + span);
            }
            4 => {
                let section: Vec<u8> = b[at..at + span].to_vec();
                let times = 1 + ((arg >> 48) % 4) as usize;
                for _ in 0..times {
                    b.splice(at..at, section.iter().copied());
                }
            }
            5 => {
                let section: Vec<u8> = b[at..at + span].to_vec();
                b.splice(to..to, section);
            }
            6 | 7 => {
                let v = HOSTILE_U32[((arg >> 40) % HOSTILE_U32.len() as u64) as usize];
                let v = if (arg >> 56) & 1 == 1 {
                    v.wrapping_add(b.len() as u32)
                } else {
                    v
                };
                let bytes = if kind % 8 == 6 {
                    v.to_be_bytes()
                } else {
                    v.to_le_bytes()
                };
                for (i, x) in bytes.iter().enumerate() {
                    if let Some(slot) = b.get_mut(at + i) {
                        *slot = *x;
                    }
                }
            }
            _ => unreachable!("kind % 8"),
        }
        b.truncate(bound_bytes);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_are_deterministic_and_bounded() {
        let seed: Vec<u8> = (0..100).collect();
        for kind in 0..8u8 {
            for arg in [0u64, 1, 99, u64::MAX, 0x0123_4567_89ab_cdef] {
                let a = mutate(&seed, &[(kind, arg), (kind.wrapping_add(3), arg >> 3)]);
                assert_eq!(
                    a,
                    mutate(&seed, &[(kind, arg), (kind.wrapping_add(3), arg >> 3)])
                );
                assert!(
                    a.len() <= 2 * (2 * 100 + 64) + 64,
                    "kind {kind}: {}",
                    a.len()
                );
            }
        }
        assert_eq!(mutate(&[], &[(0, 7)]), vec![7]);
        assert_ne!(
            mutate(&seed, &[(0, 5)]),
            seed,
            "a bit flip changes the bytes"
        );
        assert_eq!(mutate(&seed, &[(2, 10)]).len(), 10, "truncation");
        assert_eq!(
            &mutate(&seed, &[(6, 4)])[4..8],
            &u32::MAX.to_be_bytes(),
            "a hostile length"
        );
    }

    #[test]
    fn cases_default_without_the_variable() {
        if std::env::var_os("KEEL_FUZZ_CASES").is_none() {
            assert_eq!(cases(17), 17);
        }
    }
}
