//! `sae-score`, `sae-head` and `sae-bench --input` hold their activation rows once: a
//! float32 `.npy` is read into its rows without a copy of the whole file beside them (the
//! trial's 154 MB input peaked at 315 MB). A counting global allocator measures the peak of
//! live heap bytes while the rows are read. (Its own test binary, because the allocator is
//! process-wide.)

mod util;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Peak;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Peak {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size >= layout.size() {
            grew(new_size - layout.size());
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Peak = Peak;

/// A version-1 `.npy` of `rows × d` float32 values `f(r, c)`.
fn write_npy(path: &std::path::Path, rows: usize, d: usize, f: impl Fn(usize, usize) -> f32) {
    let values: Vec<f32> = (0..rows * d).map(|i| f(i / d, i % d)).collect();
    util::write_npy_f32(path, rows, d, &values);
}

#[test]
fn a_float32_npy_is_read_without_a_second_copy_of_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("acts.npy");
    let (rows, d) = (40_000, 64);
    let value = |r: usize, c: usize| ((r * 31 + c * 7) % 1000) as f32 / 100.0 - 5.0;
    write_npy(&path, rows, d, value);
    let data = rows * d * 4;
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let x = darkwatch::sae::eval::read_activations(&path, None).unwrap();
    let peak = PEAK.load(Ordering::Relaxed) - before;
    assert_eq!(x.dim(), (rows, d));
    for (r, c) in [(0, 0), (1, 5), (rows - 1, d - 1), (12_345, 17)] {
        assert_eq!(x[[r, c]], value(r, c));
    }
    // The rows themselves, plus a block buffer of a megabyte at most: well under the
    // 2 × data that the file's bytes and their conversion took together.
    assert!(
        (peak as f64) < 1.25 * data as f64,
        "reading {data} bytes of rows peaked at {peak} bytes of heap ({:.2} ×)",
        peak as f64 / data as f64
    );
}
