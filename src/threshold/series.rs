//! Bounds on Grimshaw's w(x) near x = 0 from power sums of the peaks, so that the root scan
//! of [`super::Gpd::fit`] can skip most of its passes over the peaks without changing a
//! single decision.
//!
//! Where every |x·Y| ≤ 1/2, ln(1 + s) = Σₖ (−1)ᵏ⁺¹ sᵏ/k and s/(1 + s) = Σₖ (−1)ᵏ⁺¹ sᵏ, so
//! with pₖ = Σᵢ (Yᵢ/Y_max)ᵏ, computed once per fit, A = mean ln(1 + xY) and
//! B = −mean xY/(1 + xY) come from [`TERMS`] products instead of a logarithm and a
//! division per peak. The bound returned holds the value [`super::grimshaw_w`] computes in
//! floating point, not just the exact w: it covers the truncated tail, the rounding in
//! these sums, and the rounding of the per-peak loop (which near x = 0, where w vanishes
//! like x² while A and B are of order x, is what decides its last digits). The scan uses a
//! bound only when it settles a decision (the sign, or which of three |w| is smallest);
//! otherwise it evaluates w itself. So the fit follows the same path and returns the same
//! bits as without the bounds.

/// Series terms kept. Where |x|·Y_max ≤ 1/2 the tail is below 2⁻³³ of the peaks' count;
/// closer to 0 it vanishes geometrically.
pub(super) const TERMS: usize = 32;

/// Largest |x|·Y_max the series is used at.
pub(super) const RADIUS: f64 = 0.5;

/// The unit roundoff of f64.
const U: f64 = f64::EPSILON / 2.0;

/// pₖ = Σᵢ (Yᵢ/Y_max)ᵏ for k = 1..=[`TERMS`], and what the bounds need besides.
pub(super) struct PowerSums {
    /// Y_max.
    hi: f64,
    /// The number of peaks.
    n: f64,
    /// `p[k - 1]` = pₖ.
    p: [f64; TERMS],
}

/// Peaks per block: the power sums of a block's peaks are kept apart and added at the end.
const LANES: usize = 8;

#[inline(always)]
fn power_sums_body(peaks: &[f64], hi: f64) -> [f64; TERMS] {
    let mut acc = [[0.0f64; LANES]; TERMS];
    for chunk in peaks.chunks(LANES) {
        let mut r = [0.0f64; LANES];
        r[..chunk.len()]
            .iter_mut()
            .zip(chunk)
            .for_each(|(r, &y)| *r = y / hi);
        let mut power = r;
        for sums in &mut acc {
            for l in 0..LANES {
                sums[l] += power[l];
                power[l] *= r[l];
            }
        }
    }
    acc.map(|lanes| lanes.iter().sum())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn power_sums_avx2(peaks: &[f64], hi: f64) -> [f64; TERMS] {
    power_sums_body(peaks, hi)
}

impl PowerSums {
    /// The power sums of `peaks` (finite, > 0) whose largest value is `hi`. `None` when
    /// there are too few peaks for the bounds to pay off.
    pub(super) fn new(peaks: &[f64], hi: f64) -> Option<PowerSums> {
        if peaks.len() < 2 * LANES || !hi.is_normal() {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        let p = if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            unsafe { power_sums_avx2(peaks, hi) }
        } else {
            power_sums_body(peaks, hi)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let p = power_sums_body(peaks, hi);
        Some(PowerSums {
            hi,
            n: peaks.len() as f64,
            p,
        })
    }

    /// An interval [lo, hi] that holds `grimshaw_w(peaks, x)` (as computed, rounding and
    /// all), or `None` if |x|·Y_max > [`RADIUS`] or the sums are not finite.
    pub(super) fn w_bounds(&self, x: f64) -> Option<(f64, f64)> {
        let t = x * self.hi;
        if t.is_nan() || t.abs() > RADIUS {
            return None;
        }
        // A·n, −B·n and (A + B)·n, and M = Σₖ |t|ᵏ pₖ ≥ Σᵢ |xYᵢ|, which bounds every term.
        let (mut sum_a, mut sum_b, mut sum_ab, mut magnitude) = (0.0, 0.0, 0.0, 0.0);
        let mut power = 1.0f64;
        for (j, &p) in self.p.iter().enumerate() {
            let k = (j + 1) as f64;
            power *= t;
            let term = power * p;
            // (−1)ᵏ⁺¹ tᵏ = (−t)ᵏ·(−1): with t < 0 every term is negative.
            let signed = if j % 2 == 0 { term } else { -term };
            sum_a += signed / k;
            sum_b += signed;
            sum_ab -= signed * ((k - 1.0) / k);
            magnitude += term.abs();
        }
        let n = self.n;
        let a = sum_a / n;
        let b = -sum_b / n;
        let w = sum_ab / n + a * b;
        // ρ bounds every |xYᵢ| and |t| even after rounding.
        let rho = t.abs() * (1.0 + 8.0 * U);
        let tail = rho.powi(TERMS as i32 + 1) / (1.0 - rho);
        let mean_magnitude = magnitude / n + tail;
        // Rounding in A, B and A + B, here and in the per-peak loop (a sum of n terms, each
        // off by a few ulps, times 1/(1 − ρ)² ≤ 4 for the rounding of xY), plus the tail.
        let slack = (2.0 * n + 4.0 * TERMS as f64 + 32.0) * U * 4.0 * mean_magnitude + tail;
        let bound = 2.0
            * (slack * (1.0 + a.abs() + b.abs()) * 2.0
                + slack * slack
                + 8.0 * U * (a.abs() + b.abs() + (a * b).abs() + w.abs()))
            + 1e-300;
        (w.is_finite() && bound.is_finite()).then_some((w - bound, w + bound))
    }
}
