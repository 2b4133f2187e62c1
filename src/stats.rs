//! Small allocation-free helpers used on the hot path: a log-linear latency histogram
//! and top-k selection of per-feature contributions.

/// Sub-buckets per power of two: about 1.1 % relative resolution.
const SUB_BITS: u32 = 6;
const SUB: usize = 1 << SUB_BITS;
/// Powers of two covered (1 ns … ~18 min).
const OCTAVES: usize = 41;

/// A fixed-size log-linear histogram of nanosecond durations (HDR-style).
/// Recording is O(1) and never allocates; quantiles are exact to within a bucket.
#[derive(Clone)]
pub struct LatencyHistogram {
    counts: Box<[u64]>,
    total: u64,
    max_ns: u64,
    sum_ns: u128,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("count", &self.total)
            .field("p50_ns", &self.quantile_ns(0.5))
            .field("p99_ns", &self.quantile_ns(0.99))
            .finish()
    }
}

impl LatencyHistogram {
    pub fn new() -> Self {
        LatencyHistogram {
            counts: vec![0; OCTAVES * SUB].into_boxed_slice(),
            total: 0,
            max_ns: 0,
            sum_ns: 0,
        }
    }

    fn bucket(ns: u64) -> usize {
        if ns < SUB as u64 {
            return ns as usize;
        }
        let msb = 63 - ns.leading_zeros(); // >= SUB_BITS
        let shift = msb - SUB_BITS;
        let octave = (shift + 1) as usize;
        let sub = ((ns >> shift) as usize) & (SUB - 1);
        (octave * SUB + sub).min(OCTAVES * SUB - 1)
    }

    /// The lower edge of a bucket, in ns.
    fn bucket_floor(index: usize) -> u64 {
        if index < SUB {
            return index as u64;
        }
        let octave = index / SUB;
        let sub = (index % SUB) as u64;
        let shift = (octave - 1) as u32;
        (SUB as u64 + sub) << shift
    }

    /// Records one duration in nanoseconds.
    #[inline]
    pub fn record(&mut self, ns: u64) {
        self.counts[Self::bucket(ns)] += 1;
        self.total += 1;
        self.max_ns = self.max_ns.max(ns);
        self.sum_ns += ns as u128;
    }

    /// Adds another histogram's counts into this one.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.total += other.total;
        self.max_ns = self.max_ns.max(other.max_ns);
        self.sum_ns += other.sum_ns;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max_ns(&self) -> u64 {
        self.max_ns
    }

    pub fn mean_ns(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum_ns as f64 / self.total as f64
        }
    }

    /// The q-quantile (0..=1) in ns: the midpoint of the bucket holding it; 0 if empty.
    pub fn quantile_ns(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let lo = Self::bucket_floor(i) as f64;
                let hi = if i + 1 < self.counts.len() {
                    Self::bucket_floor(i + 1) as f64
                } else {
                    lo
                };
                return ((lo + hi) / 2.0).min(self.max_ns as f64);
            }
        }
        self.max_ns as f64
    }
}

/// Writes into `out` the indices of the `out.len()` largest values of `values`,
/// largest first (ties: lower index first). `out.len()` must not exceed `values.len()`.
/// Rows of up to 64 values (alerts name contributions of one frame; most models are that
/// narrow): see [`top_k_keyed`]. Longer rows: insertion into a short sorted list. O(d·k)
/// either way, no allocation. (Insertion alone branched on every value's rank, which is
/// random in real data: about 180 ns for the top 3 of 38.)
pub fn top_k_indices(values: &[f32], out: &mut [usize]) {
    let k = out.len().min(values.len());
    if values.len() <= TOP_K_STACK {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            unsafe { top_k_keyed_avx2(values, &mut out[..k]) };
            return;
        }
        top_k_keyed(values, &mut out[..k]);
        return;
    }
    let mut filled = 0;
    for (i, &v) in values.iter().enumerate() {
        // NaN sorts as the largest so that a broken feature is named, not hidden.
        let larger = |j: usize| {
            let w = values[j];
            (v > w) || (v.is_nan() && !w.is_nan())
        };
        if filled < k {
            let mut pos = filled;
            while pos > 0 && larger(out[pos - 1]) {
                out[pos] = out[pos - 1];
                pos -= 1;
            }
            out[pos] = i;
            filled += 1;
        } else if k > 0 && larger(out[k - 1]) {
            let mut pos = k - 1;
            while pos > 0 && larger(out[pos - 1]) {
                out[pos] = out[pos - 1];
                pos -= 1;
            }
            out[pos] = i;
        }
    }
}

/// Rows up to this long take [`top_k_indices`]'s vectorised path.
const TOP_K_STACK: usize = 64;

/// The top `out.len()` of at most [`TOP_K_STACK`] values. Each value becomes one 64-bit key
/// in a stack buffer: its order key above, its index reversed below, so the largest key is
/// the largest value and, among equal values, the lowest index. Each entry of `out` is
/// then one branch-free maximum over the keys, which names its own position (a separate
/// search for it cost as much again).
#[inline(always)]
fn top_k_keyed(values: &[f32], out: &mut [usize]) {
    let mut keys = [i64::MIN; TOP_K_STACK];
    let keys = &mut keys[..values.len()];
    for (j, (key, &v)) in keys.iter_mut().zip(values).enumerate() {
        *key = (i64::from(order_key(v)) << 32) | i64::from(u32::MAX - j as u32);
    }
    for o in out.iter_mut() {
        let top = keys.iter().copied().max().unwrap_or(i64::MIN);
        let j = (u32::MAX - top as u32) as usize;
        *o = j;
        keys[j] = i64::MIN;
    }
}

/// [`top_k_keyed`] with AVX2's 64-bit compares, four keys per step.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn top_k_keyed_avx2(values: &[f32], out: &mut [usize]) {
    top_k_keyed(values, out);
}

/// An integer in the order of `v`, with every NaN above +∞ (NaN ranks first) and −0 equal to
/// +0; never `i32::MIN`, so its 64-bit key in [`top_k_keyed`] stays above `i64::MIN`, which
/// marks a taken entry.
#[inline(always)]
fn order_key(v: f32) -> i32 {
    let b = (v + 0.0).to_bits() as i32;
    let key = b ^ ((((b >> 31) as u32) >> 1) as i32);
    if v.is_nan() { i32::MAX } else { key }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_within_bucket_resolution() {
        let mut h = LatencyHistogram::new();
        for ns in 1..=10_000u64 {
            h.record(ns * 100);
        }
        let p50 = h.quantile_ns(0.5);
        let p99 = h.quantile_ns(0.99);
        assert!((p50 / 500_000.0 - 1.0).abs() < 0.02, "p50 {p50}");
        assert!((p99 / 990_000.0 - 1.0).abs() < 0.02, "p99 {p99}");
        assert_eq!(h.count(), 10_000);
        assert_eq!(h.max_ns(), 1_000_000);
    }

    #[test]
    fn small_values_are_exact_and_merge_adds() {
        let mut a = LatencyHistogram::new();
        a.record(3);
        let mut b = LatencyHistogram::new();
        b.record(3);
        b.record(40);
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert_eq!(a.quantile_ns(0.5), 3.5f64.min(40.0));
        assert_eq!(LatencyHistogram::new().quantile_ns(0.5), 0.0);
        // Enormous values clamp to the last bucket rather than panicking.
        a.record(u64::MAX);
        assert_eq!(a.count(), 4);
    }

    #[test]
    fn bucket_floors_are_monotonic() {
        for i in 1..OCTAVES * SUB {
            assert!(LatencyHistogram::bucket_floor(i) > LatencyHistogram::bucket_floor(i - 1));
            assert_eq!(
                LatencyHistogram::bucket(LatencyHistogram::bucket_floor(i)),
                i
            );
        }
    }

    #[test]
    fn top_k_picks_largest_in_order() {
        let v = [0.5, 3.0, -1.0, 2.0, 3.0, f32::NAN];
        let mut out = [0usize; 3];
        top_k_indices(&v, &mut out);
        assert_eq!(out, [5, 1, 4]);
        let mut two = [0usize; 2];
        top_k_indices(&v[..4], &mut two);
        assert_eq!(two, [1, 3]);
    }

    #[test]
    fn top_k_matches_a_stable_sort_with_ties_nan_and_infinities() {
        let mut rng = crate::rng::Rng::new(5);
        for trial in 0..2000 {
            // Both paths: rows up to 64 values and longer ones.
            let d = 1 + rng.below(90);
            // Few distinct values, so ties are common; NaN, ±∞ and −0 too.
            let v: Vec<f32> = (0..d)
                .map(|_| match rng.below(12) {
                    0 => f32::NAN,
                    1 => f32::INFINITY,
                    2 => f32::NEG_INFINITY,
                    3 => -0.0,
                    r => (r % 4) as f32 - 1.0,
                })
                .collect();
            // NaN first, then larger (−0 equal to +0), ties by index (sort_by is stable).
            let rank = |x: f32| if x.is_nan() { 0.0 } else { x + 0.0 };
            let mut want: Vec<usize> = (0..d).collect();
            want.sort_by(|&a, &b| {
                (v[b].is_nan(), rank(v[b]))
                    .partial_cmp(&(v[a].is_nan(), rank(v[a])))
                    .unwrap()
            });
            let k = 1 + rng.below(d.min(20));
            let mut got = vec![0usize; k];
            top_k_indices(&v, &mut got);
            assert_eq!(got, want[..k], "trial {trial}: {v:?}");
        }
    }
}
