//! Mean-shift scoring (MSS, Tan et al.; papers.md §1.3): the autoencoder still sees x, but
//! its output is scored against a mean-shifted target x^MS that has been pulled toward
//! the normal data. An outlier the AE reconstructs too well (the "unexpected
//! reconstruction" that defeats plain AE scores) is moved toward the data, so its error
//! against the shifted target stays large; an inlier barely moves.
//!
//! The [`ReferenceBank`] holds R⁰ (a bounded set of standardised normal frames) and the
//! shifted copies R¹…R^{m−1}, built off the hot path. [`ReferenceBank::shift`] does the m
//! rounds for one frame with an exact k-NN: a SIMD-friendly squared-distance kernel over
//! contiguous rows and a partial selection of the k−1 nearest, allocation-free.
//! Fed by the training data (or a reservoir of clean frames); feeds the score heads.

use ndarray::{Array2, ArrayView2, Axis};
use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// Mean-shift settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MssConfig {
    /// Shift rounds m; 0 turns mean-shift scoring off (the default: on server telemetry
    /// it lowered AUPRC, see the README; the bank is still stored so replay can turn it on).
    pub rounds: usize,
    /// Neighbourhood size k (the frame itself and its k−1 nearest reference frames); 1 turns it off.
    pub neighbours: usize,
    /// Most reference frames kept (a seeded random subset of the training rows); 0 stores none.
    pub bank_frames: usize,
}

impl Default for MssConfig {
    fn default() -> Self {
        MssConfig {
            rounds: 0,
            neighbours: 10,
            bank_frames: 2048,
        }
    }
}

impl MssConfig {
    /// True when scoring is unchanged by the shift (m = 0 or k = 1).
    pub fn is_off(&self) -> bool {
        self.rounds == 0 || self.neighbours <= 1
    }

    /// Checks ranges; returns the key and the reason.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.rounds > 8 {
            return Err((
                "rounds",
                format!("{} rounds is more than the supported 8", self.rounds),
            ));
        }
        if self.neighbours == 0 {
            return Err((
                "neighbours",
                "must be at least 1 (1 turns the shift off)".into(),
            ));
        }
        if self.bank_frames > 0 && self.bank_frames < self.neighbours {
            return Err((
                "bank_frames",
                format!(
                    "{} reference frames cannot supply {} neighbours",
                    self.bank_frames, self.neighbours
                ),
            ));
        }
        Ok(())
    }
}

/// R⁰ and its shifted copies, each `[frames, d]` and contiguous, with cached row norms.
#[derive(Debug, Clone)]
pub struct ReferenceBank {
    rounds: usize,
    k: usize,
    /// levels[t] = R^t for t in 0..rounds (R^m itself is never needed), row-major.
    levels: Vec<Array2<f32>>,
    /// The same levels feature-major (`[d, frames]`): the distance kernel streams one
    /// feature of every reference frame at a time, so SIMD lanes run across frames and no
    /// horizontal sums are needed.
    columns: Vec<Array2<f32>>,
}

/// Reusable per-thread buffers for [`ReferenceBank::shift`].
#[derive(Debug, Clone)]
pub struct MssScratch {
    dist: Vec<f32>,
    best_d: Vec<f32>,
    best_i: Vec<usize>,
    /// (distance, frame) pairs for the selection of a large k.
    pairs: Vec<(f32, usize)>,
    acc: Vec<f32>,
}

impl ReferenceBank {
    /// Builds a bank from standardised rows: a seeded random subset of at most
    /// `cfg.bank_frames` rows becomes R⁰, then R¹…R^{m−1} are the Jacobi mean shifts
    /// (every point moves to the mean of its k nearest points, itself included).
    pub fn build(rows: ArrayView2<f32>, cfg: &MssConfig, seed: u64) -> Self {
        let n = rows.nrows();
        let take = cfg.bank_frames.min(n);
        let mut idx: Vec<usize> = (0..n).collect();
        if take < n {
            Rng::new(seed ^ 0x4D53_5342_414E_4B00).shuffle(&mut idx);
            idx.truncate(take);
            idx.sort_unstable();
        }
        let r0 = rows.select(Axis(0), &idx).as_standard_layout().into_owned();
        Self::from_r0(r0, cfg.rounds, cfg.neighbours)
    }

    /// Builds a bank whose R⁰ is exactly `r0` (as stored in a model directory).
    pub fn from_r0(r0: Array2<f32>, rounds: usize, k: usize) -> Self {
        let r0 = r0.as_standard_layout().into_owned();
        let k = k.clamp(1, r0.nrows().max(1));
        let mut bank = ReferenceBank {
            rounds,
            k,
            columns: vec![feature_major(&r0)],
            levels: vec![r0],
        };
        let mut scratch = bank.scratch();
        for t in 1..rounds {
            let prev = &bank.levels[t - 1];
            let mut next = Array2::zeros(prev.dim());
            for (i, mut out) in next.rows_mut().into_iter().enumerate() {
                let row = prev.row(i);
                let row = row.as_slice().expect("standard layout");
                // k nearest including the point itself = the point plus its k−1 nearest others.
                bank.mean_with_neighbours(t - 1, row, Some(i), &mut scratch);
                out.as_slice_mut()
                    .expect("owned")
                    .copy_from_slice(&scratch.acc);
            }
            bank.columns.push(feature_major(&next));
            bank.levels.push(next);
        }
        bank
    }

    /// The stored reference frames R⁰.
    pub fn r0(&self) -> &Array2<f32> {
        &self.levels[0]
    }

    pub fn rounds(&self) -> usize {
        self.rounds
    }

    pub fn neighbours(&self) -> usize {
        self.k
    }

    pub fn frames(&self) -> usize {
        self.levels[0].nrows()
    }

    /// Buffers for [`Self::shift`], sized for this bank.
    pub fn scratch(&self) -> MssScratch {
        let d = self.levels[0].ncols();
        MssScratch {
            dist: vec![0.0; self.frames()],
            best_d: vec![0.0; self.k],
            best_i: vec![0; self.k],
            pairs: if self.k > INSERTION_MAX_K {
                vec![(0.0, 0); self.frames()]
            } else {
                Vec::new()
            },
            acc: vec![0.0; d],
        }
    }

    /// Writes x^MS(m, k) of the standardised frame `x` into `out`. Allocation-free.
    /// With m = 0 or k = 1 it copies `x`.
    pub fn shift(&self, x: &[f32], out: &mut [f32], scratch: &mut MssScratch) {
        out.copy_from_slice(x);
        if self.rounds == 0 || self.k <= 1 || self.frames() == 0 {
            return;
        }
        for t in 0..self.rounds {
            self.mean_with_neighbours(t, out, None, scratch);
            out.copy_from_slice(&scratch.acc);
        }
    }

    /// scratch.acc = mean of `y` and its k−1 nearest rows of level `t` (excluding row
    /// `skip`, which is `y` itself when shifting the bank).
    fn mean_with_neighbours(&self, t: usize, y: &[f32], skip: Option<usize>, s: &mut MssScratch) {
        let level = &self.levels[t];
        let data = level.as_slice().expect("standard layout");
        let d = level.ncols();
        let columns = self.columns[t].as_slice().expect("standard layout");
        squared_distances(columns, self.frames(), y, &mut s.dist);
        if let Some(i) = skip {
            s.dist[i] = f32::INFINITY;
        }
        let want = (self.k - 1).min(self.frames() - usize::from(skip.is_some()));
        let found = smallest(
            &s.dist,
            &mut s.best_d[..want],
            &mut s.best_i[..want],
            &mut s.pairs,
        );
        s.acc.copy_from_slice(y);
        for &j in &s.best_i[..found] {
            for (a, &v) in s.acc.iter_mut().zip(&data[j * d..(j + 1) * d]) {
                *a += v;
            }
        }
        let inv = 1.0 / (found + 1) as f32;
        for a in s.acc.iter_mut() {
            *a *= inv;
        }
    }
}

/// A feature-major (`[d, frames]`) copy of row-major frames.
fn feature_major(a: &Array2<f32>) -> Array2<f32> {
    a.t().as_standard_layout().into_owned()
}

/// dist[i] = ‖y − frame_i‖² for every reference frame, from feature-major `columns`
/// (`y.len()` rows of `frames` values each). Exact differences, no norm expansion, so
/// near neighbours keep their precision.
fn squared_distances(columns: &[f32], frames: usize, y: &[f32], dist: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { squared_distances_avx2(columns, frames, y, dist) };
            return;
        }
    }
    squared_distances_body(columns, frames, y, dist);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn squared_distances_avx2(columns: &[f32], frames: usize, y: &[f32], dist: &mut [f32]) {
    squared_distances_body(columns, frames, y, dist);
}

/// The kernel body: for each feature, one pass over all frames, accumulating
/// (value − y_j)² into `dist`; the inner loop is a plain stride-1 loop that the compiler
/// vectorises at whatever width the target has.
#[inline(always)]
fn squared_distances_body(columns: &[f32], frames: usize, y: &[f32], dist: &mut [f32]) {
    let dist = &mut dist[..frames];
    dist.fill(0.0);
    for (col, &yj) in columns.chunks_exact(frames).zip(y) {
        for (acc, &v) in dist.iter_mut().zip(col) {
            let e = v - yj;
            *acc += e * e;
        }
    }
}

/// Up to this many neighbours, [`smallest`] inserts into a short sorted list; above it, it
/// selects in linear time (insertion costs O(n·k) when most values enter the list).
const INSERTION_MAX_K: usize = 64;

/// Partial selection: the `best.len()` smallest values of `dist` (indices into `idx`),
/// ascending, ties by the lower index; NaN and +inf are skipped. Returns how many were
/// found. Up to [`INSERTION_MAX_K`] by insertion into a short sorted list (O(n) for small
/// k); above it by `select_nth_unstable` over `pairs` (at least `dist.len()` long), then a
/// sort of the k chosen: O(n + k log k). Both give the same result.
fn smallest(
    dist: &[f32],
    best: &mut [f32],
    idx: &mut [usize],
    pairs: &mut [(f32, usize)],
) -> usize {
    let k = best.len();
    if k == 0 {
        return 0;
    }
    if k > INSERTION_MAX_K {
        let mut c = 0;
        for (i, &v) in dist.iter().enumerate() {
            if !v.is_nan() && v != f32::INFINITY {
                pairs[c] = (v, i);
                c += 1;
            }
        }
        let by = |a: &(f32, usize), b: &(f32, usize)| {
            a.0.partial_cmp(&b.0)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.1.cmp(&b.1))
        };
        let found = k.min(c);
        if found < c {
            pairs[..c].select_nth_unstable_by(found - 1, by);
        }
        pairs[..found].sort_unstable_by(by);
        for (j, &(v, i)) in pairs[..found].iter().enumerate() {
            best[j] = v;
            idx[j] = i;
        }
        return found;
    }
    let mut filled = 0;
    for (i, &v) in dist.iter().enumerate() {
        // Skips NaN and the +inf that marks an excluded row.
        if v.is_nan() || v == f32::INFINITY || (filled == k && v >= best[k - 1]) {
            continue;
        }
        // Insert v, shifting larger entries right; when full, the largest falls off.
        let mut p = filled.min(k - 1);
        while p > 0 && best[p - 1] > v {
            best[p] = best[p - 1];
            idx[p] = idx[p - 1];
            p -= 1;
        }
        best[p] = v;
        idx[p] = i;
        filled = (filled + 1).min(k);
    }
    filled
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    fn cfg(rounds: usize, neighbours: usize) -> MssConfig {
        MssConfig {
            rounds,
            neighbours,
            bank_frames: 100,
        }
    }

    /// Five 1-D reference points; everything checked by hand.
    fn five() -> Array2<f32> {
        array![[0.0f32], [1.0], [2.0], [4.0], [10.0]]
    }

    #[test]
    fn shift_of_a_sample_by_hand() {
        // m=1, k=3: y¹ = mean(y⁰, its 2 nearest in R⁰). For y = 3: nearest are 2 and 4 → 3.
        let bank = ReferenceBank::build(five().view(), &cfg(1, 3), 0);
        let mut s = bank.scratch();
        let mut out = [0.0f32];
        bank.shift(&[3.0], &mut out, &mut s);
        assert_eq!(out, [3.0]);
        // y = 9: nearest are 10 and 4 → (9+10+4)/3.
        bank.shift(&[9.0], &mut out, &mut s);
        assert!((out[0] - 23.0 / 3.0).abs() < 1e-6);
        // y = 100 (an outlier) is pulled a long way toward the data: (100+10+4)/3 = 38.
        bank.shift(&[100.0], &mut out, &mut s);
        assert!((out[0] - 38.0).abs() < 1e-5);
    }

    #[test]
    fn two_rounds_use_the_shifted_bank() {
        // R¹ (k=2, itself + 1 nearest other): 0→0.5, 1→0.5 (tie 0/2: first index wins, 0),
        // 2→1.5, 4→3, 10→7.
        let bank = ReferenceBank::build(five().view(), &cfg(2, 2), 0);
        let r1: Vec<f32> = bank.levels[1].iter().copied().collect();
        assert_eq!(r1, vec![0.5, 0.5, 1.5, 3.0, 7.0]);
        // y = 9, k=2: round 1 in R⁰: nearest 10 → 9.5; round 2 in R¹: nearest 7 → 8.25.
        let mut s = bank.scratch();
        let mut out = [0.0f32];
        bank.shift(&[9.0], &mut out, &mut s);
        assert!((out[0] - 8.25).abs() < 1e-6, "{}", out[0]);
    }

    #[test]
    fn m0_or_k1_leaves_the_frame_unchanged() {
        let x = [3.3f32];
        for c in [cfg(0, 5), cfg(3, 1)] {
            assert!(c.is_off());
            let bank = ReferenceBank::build(five().view(), &c, 0);
            let mut out = [0.0f32];
            bank.shift(&x, &mut out, &mut bank.scratch());
            assert_eq!(out, x);
        }
    }

    #[test]
    fn outliers_move_more_than_inliers() {
        let mut rng = Rng::new(5);
        let blob = Array2::from_shape_fn((500, 2), |_| rng.uniform(-1.0, 1.0));
        let bank = ReferenceBank::build(blob.view(), &cfg(1, 10), 0);
        let mut s = bank.scratch();
        let mut out = [0.0f32; 2];
        let moved = |x: [f32; 2], out: &mut [f32; 2], s: &mut MssScratch| {
            bank.shift(&x, out, s);
            ((x[0] - out[0]).powi(2) + (x[1] - out[1]).powi(2)).sqrt()
        };
        let inlier = moved([0.1, -0.2], &mut out, &mut s);
        let outlier = moved([6.0, 6.0], &mut out, &mut s);
        assert!(inlier < 0.1, "inlier moved {inlier}");
        assert!(outlier > 4.0, "outlier moved {outlier}");
    }

    #[test]
    fn distance_kernel_matches_naive_and_selection_is_exact() {
        let mut rng = Rng::new(9);
        let d = 38;
        let data = Array2::from_shape_fn((300, d), |_| rng.uniform(-3.0, 3.0));
        let y: Vec<f32> = (0..d).map(|_| rng.uniform(-3.0, 3.0)).collect();
        let mut dist = vec![0.0; 300];
        let cols = feature_major(&data);
        squared_distances(cols.as_slice().unwrap(), 300, &y, &mut dist);
        let naive: Vec<f32> = data
            .rows()
            .into_iter()
            .map(|r| r.iter().zip(&y).map(|(a, b)| (a - b) * (a - b)).sum())
            .collect();
        for (a, b) in dist.iter().zip(&naive) {
            assert!((a - b).abs() <= 1e-3 * b.max(1.0), "{a} vs {b}");
        }
        let mut best = [0.0f32; 7];
        let mut idx = [0usize; 7];
        assert_eq!(smallest(&naive, &mut best, &mut idx, &mut []), 7);
        let mut sorted: Vec<usize> = (0..300).collect();
        sorted.sort_by(|&a, &b| naive[a].total_cmp(&naive[b]));
        assert_eq!(idx.to_vec(), sorted[..7].to_vec());
    }

    /// Insertion (small k) and linear-time selection (large k) both pick what a full sort
    /// by (distance, index) picks, in that order, excluded (+inf) and NaN rows skipped.
    #[test]
    fn selection_by_insertion_and_by_select_nth_agree() {
        let mut rng = Rng::new(3);
        // Distances with many ties (rounded), one excluded row and one NaN.
        let mut dist: Vec<f32> = (0..500).map(|_| rng.uniform(0.0, 20.0).round()).collect();
        dist[17] = f32::INFINITY;
        dist[40] = f32::NAN;
        let mut order: Vec<usize> = (0..500).filter(|&i| i != 17 && i != 40).collect();
        order.sort_by(|&a, &b| dist[a].total_cmp(&dist[b]).then(a.cmp(&b)));
        let mut pairs = vec![(0.0, 0); 500];
        for k in [
            1,
            7,
            INSERTION_MAX_K,
            INSERTION_MAX_K + 1,
            300,
            498,
            499,
            500,
        ] {
            let mut best = vec![0.0f32; k];
            let mut idx = vec![0usize; k];
            let found = smallest(&dist, &mut best, &mut idx, &mut pairs);
            assert_eq!(found, k.min(498), "k {k}");
            assert_eq!(idx[..found], order[..found], "k {k}");
        }
    }

    #[test]
    fn bank_is_bounded_and_seeded() {
        let rows = Array2::from_shape_fn((5000, 3), |(i, j)| (i * 3 + j) as f32);
        let c = MssConfig {
            bank_frames: 64,
            ..MssConfig::default()
        };
        let a = ReferenceBank::build(rows.view(), &c, 1);
        let b = ReferenceBank::build(rows.view(), &c, 1);
        assert_eq!(a.frames(), 64);
        assert_eq!(a.r0(), b.r0());
        assert!(c.validate().is_ok());
        assert!(
            MssConfig {
                bank_frames: 5,
                ..c
            }
            .validate()
            .is_err()
        );
    }
}
