//! Passes over activation rows on several threads, for `sae-score` and `sae-head`.
//!
//! Owns how a long pass (the SAE forward over every row, the dark-matter head's statistics,
//! the Mahalanobis baseline) is cut up and spread over the machine's cores, and how it
//! reports progress. Fed by [`super::eval`]'s commands; feeds them their per-unit results,
//! in row order, and the binary a [`RowProgress`] per unit done.
//!
//! The rows are cut into units at fixed row offsets: 256-row batches (the SAE's batch), or
//! blocks of [`STATS_ROWS`] for statistics. Each thread takes a contiguous run of units, and
//! the results are put back in unit order. A unit's result depends only on its rows, never
//! on which thread ran it or how many threads there were, so every thread count gives
//! bit-identical output (tested in `eval`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use ndarray::{ArrayView2, s};

/// Rows per SAE forward call in an offline pass (the batch its workspace holds).
pub const BATCH: usize = 256;

/// Rows per block of dark-matter statistics: a block's statistics are accumulated batch by
/// batch on one thread, then the blocks are merged in row order. The block, not the thread
/// count, fixes the order of the f64 sums.
pub const STATS_ROWS: usize = 16 * BATCH;

/// The threads a pass uses by default: the machine's cores (1 when that is unknown).
pub fn available_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// How far a long pass over rows has got: `done` of `total` rows of `stage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowProgress {
    /// What the pass does, in words (`scoring tokens`).
    pub stage: &'static str,
    pub done: usize,
    pub total: usize,
}

fn no_progress(_: RowProgress) {}

/// How the passes of a command run: on how many threads, and whom they tell how far they
/// have got (called from the worker threads, after each unit).
#[derive(Clone, Copy)]
pub struct Passes<'a> {
    /// Threads per pass, at least 1 (0 counts as 1).
    pub threads: usize,
    pub progress: &'a (dyn Fn(RowProgress) + Sync),
}

impl Default for Passes<'_> {
    /// Every core, no progress.
    fn default() -> Self {
        Passes {
            threads: available_threads(),
            progress: &no_progress,
        }
    }
}

impl std::fmt::Debug for Passes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Passes")
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

impl Passes<'static> {
    /// `threads` threads, no progress.
    pub fn threads(threads: usize) -> Passes<'static> {
        Passes {
            threads,
            progress: &no_progress,
        }
    }
}

/// Runs `f` on each `unit`-row slice of `x` (the last may be shorter) and the index of its
/// first row in `x`, each thread with its own state from `init` (an SAE workspace, say), and
/// hands the results to `sink` in row order. Threads work on `wave_units` units per thread at a time, so that at most that many
/// results per thread are held before `sink` takes them. The first error, in row order, is
/// returned.
// Eight arguments, each a separate part of the pass; a struct for them would be used once.
#[allow(clippy::too_many_arguments)]
pub(crate) fn for_units<S, T, E>(
    x: ArrayView2<f32>,
    unit: usize,
    wave_units: usize,
    passes: &Passes,
    stage: &'static str,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, usize, ArrayView2<f32>) -> Result<T, E> + Sync,
    mut sink: impl FnMut(T) -> Result<(), E>,
) -> Result<(), E>
where
    S: Send,
    T: Send,
    E: Send,
{
    let n = x.nrows();
    let units = n.div_ceil(unit.max(1));
    let threads = passes.threads.clamp(1, units.max(1));
    let done = AtomicUsize::new(0);
    // One state per thread, kept across waves (a workspace is worth reusing).
    let states: Vec<Mutex<Option<S>>> = (0..threads).map(|_| Mutex::new(None)).collect();
    let run = |t: usize, range: std::ops::Range<usize>| -> Result<Vec<T>, E> {
        let mut slot = states[t].lock().unwrap_or_else(|p| p.into_inner());
        let state = slot.get_or_insert_with(&init);
        let mut out = Vec::with_capacity(range.len());
        for u in range {
            let rows = x.slice(s![u * unit..((u + 1) * unit).min(n), ..]);
            out.push(f(state, u * unit, rows)?);
            let now = done.fetch_add(rows.nrows(), Ordering::Relaxed) + rows.nrows();
            (passes.progress)(RowProgress {
                stage,
                done: now,
                total: n,
            });
        }
        Ok(out)
    };
    let per_wave = threads.saturating_mul(wave_units.max(1));
    let mut first = 0;
    while first < units {
        let end = units.min(first.saturating_add(per_wave));
        let count = end - first;
        let t = threads.min(count);
        // Thread i takes units [first + i·count/t, first + (i+1)·count/t).
        let bound = |i: usize| first + i * count / t;
        let results: Vec<Result<Vec<T>, E>> = if t == 1 {
            vec![run(0, first..end)]
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = (1..t)
                    .map(|i| {
                        let run = &run;
                        scope.spawn(move || run(i, bound(i)..bound(i + 1)))
                    })
                    .collect();
                let mut results = vec![run(0, bound(0)..bound(1))];
                results.extend(
                    handles
                        .into_iter()
                        .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))),
                );
                results
            })
        };
        for r in results {
            for v in r? {
                sink(v)?;
            }
        }
        first = end;
    }
    Ok(())
}

/// [`for_units`] over [`BATCH`]-row batches, the whole of `x` in one wave, the results
/// collected in row order.
pub(crate) fn map_batches<S, T, E>(
    x: ArrayView2<f32>,
    passes: &Passes,
    stage: &'static str,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, ArrayView2<f32>) -> Result<T, E> + Sync,
) -> Result<Vec<T>, E>
where
    S: Send,
    T: Send,
    E: Send,
{
    map_batches_at(x, passes, stage, init, |s, _, rows| f(s, rows))
}

/// [`map_batches`], `f` also given the index in `x` of its batch's first row.
pub(crate) fn map_batches_at<S, T, E>(
    x: ArrayView2<f32>,
    passes: &Passes,
    stage: &'static str,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, usize, ArrayView2<f32>) -> Result<T, E> + Sync,
) -> Result<Vec<T>, E>
where
    S: Send,
    T: Send,
    E: Send,
{
    let mut out = Vec::with_capacity(x.nrows().div_ceil(BATCH));
    for_units(x, BATCH, usize::MAX, passes, stage, init, f, |v| {
        out.push(v);
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    /// Every row lands once, in order, whatever the thread count and wave size, and the
    /// progress reaches the row count.
    #[test]
    fn units_come_back_in_row_order_on_any_thread_count() {
        let x = Array2::from_shape_fn((1000, 2), |(r, c)| (r * 2 + c) as f32);
        for threads in [1, 2, 3, 7, 64] {
            for wave in [1, 2, usize::MAX] {
                let last = AtomicUsize::new(0);
                let progress = |p: RowProgress| {
                    assert_eq!(p.total, 1000);
                    last.fetch_max(p.done, Ordering::Relaxed);
                };
                let passes = Passes {
                    threads,
                    progress: &progress,
                };
                let mut seen = Vec::new();
                for_units(
                    x.view(),
                    96,
                    wave,
                    &passes,
                    "test",
                    || (),
                    |_, first, rows| {
                        assert_eq!(rows[[0, 0]], (first * 2) as f32);
                        Ok::<_, ()>(rows.column(0).to_vec())
                    },
                    |v| {
                        seen.extend(v);
                        Ok(())
                    },
                )
                .unwrap();
                let want: Vec<f32> = (0..1000).map(|r| (r * 2) as f32).collect();
                assert_eq!(seen, want, "{threads} threads, wave {wave}");
                assert_eq!(last.load(Ordering::Relaxed), 1000);
            }
        }
    }

    #[test]
    fn the_first_error_in_row_order_is_returned() {
        let x = Array2::<f32>::zeros((1000, 1));
        let passes = Passes::threads(4);
        let e = for_units(
            x.view(),
            100,
            usize::MAX,
            &passes,
            "test",
            || 0usize,
            |count, _, _| {
                *count += 1;
                Ok::<_, usize>(())
            },
            |_| Ok(()),
        );
        assert_eq!(e, Ok(()));
        let mut u = 0;
        let e = for_units(
            x.view(),
            100,
            usize::MAX,
            &passes,
            "test",
            || (),
            |_, _, rows| {
                if rows.nrows() == 100 {
                    Err(rows.nrows())
                } else {
                    Ok(())
                }
            },
            |_| {
                u += 1;
                Ok(())
            },
        );
        assert_eq!(e, Err(100));
        assert_eq!(u, 0);
    }
}
