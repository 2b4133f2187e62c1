//! Score heads: turn an input and its reconstruction into one anomaly score per frame
//! (higher = more anomalous) plus a per-feature contribution vector, so alerts can name
//! the metrics that drove them.
//!
//! Fed by the model's forward pass ([`crate::model::Recon`]) on the scorer thread;
//! feeds the pipeline's sinks. All work happens in caller-provided buffers.

use ndarray::{ArrayView2, ArrayViewMut2, Zip};
use serde::{Deserialize, Serialize};

use crate::model::{OutputKind, Recon};

/// Added to the predicted variance before dividing or taking its log (papers.md §1.2);
/// the same ε the training loss uses.
pub const VARIANCE_EPSILON: f32 = crate::model::nn::VARIANCE_EPS;

/// Which score a frame gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadKind {
    /// Σ_j (x_j − x̂_j)²; contribution j = (x_j − x̂_j)².
    Mse,
    /// max_j |x_j − x̂_j| (Borghesi et al.); contribution j = |x_j − x̂_j|.
    MaxAbs,
    /// α Σ_j (x_j − μ_j)²/(s_j+ε) + β Σ_j ln(s_j+ε) (Tan et al.); needs a probabilistic model.
    Wnll,
}

impl HeadKind {
    pub fn name(self) -> &'static str {
        match self {
            HeadKind::Mse => "mse",
            HeadKind::MaxAbs => "max_abs",
            HeadKind::Wnll => "wnll",
        }
    }
}

/// A score head with its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Head {
    pub kind: HeadKind,
    /// Weight of the variance-normalised error (wnll only).
    pub alpha: f32,
    /// Weight of the log-variance term (wnll only).
    pub beta: f32,
    /// How the wnll log-variance term counts (wnll only).
    #[serde(default)]
    pub log_variance: LogVariance,
    /// The `bounded` floor as a share of each feature's spread (wnll `bounded` only).
    /// Written to `model.json` only when it is not the default, so that a model whose head
    /// does not use it reads the same in darkwatch versions that predate it.
    #[serde(
        default = "default_variance_floor",
        skip_serializing_if = "is_default_variance_floor"
    )]
    pub variance_floor: f32,
}

/// The documented `[score] wnll_variance_floor`.
pub const DEFAULT_VARIANCE_FLOOR: f32 = 0.1;

fn default_variance_floor() -> f32 {
    DEFAULT_VARIANCE_FLOOR
}

fn is_default_variance_floor(floor: &f32) -> bool {
    *floor == DEFAULT_VARIANCE_FLOOR
}

/// The wnll log-variance term.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogVariance {
    /// β·max(0, ln v_j − b_j), with b_j the feature's median ln v on held-out training rows:
    /// only uncertainty above the usual counts; and v_j is capped at the largest variance
    /// the model predicted for feature j on those rows, so an anomaly cannot be explained
    /// away by an extrapolated variance. A frame never scores lower because the
    /// model is more sure of some feature than usual (the paper's form lets a confident
    /// feature cancel a large error elsewhere), and every contribution is ≥ 0, so alerts
    /// blame features by how far they are from normal.
    #[default]
    Excess,
    /// β·ln v_j, exactly as in Tan et al.
    Raw,
    /// v_j clamped to [lo_j, hi_j] and β·(ln v_j − ln lo_j): `excess` with a floor. lo_j is the
    /// larger of the feature's median predicted variance on held-out training rows and
    /// [`Head::variance_floor`] times its spread (the variance of the scaled feature over
    /// the training rows, 1 under z-scoring); hi_j is the largest variance predicted on the
    /// held-out rows. The model may say a feature is less predictable than usual, never
    /// that it knows it far better than the feature's own spread: a variance head
    /// that collapses on a sparse or near-constant feature (different from seed to seed)
    /// would otherwise turn a tiny deviation there into the largest score of the stream.
    Bounded,
}

/// Error when a head cannot run on a model.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HeadError {
    #[error(
        "score head \"wnll\" needs a probabilistic model (model.kind = \"probabilistic\"), but this model is plain"
    )]
    NeedsVariance,
    #[error(
        "wnll weights must be finite, not negative and not both zero (alpha = {alpha}, beta = {beta})"
    )]
    BadWeights { alpha: f32, beta: f32 },
    #[error(
        "the wnll variance floor ([score] wnll_variance_floor, or the model's head.variance_floor) must be a finite number above 0, not {0}"
    )]
    BadFloor(f32),
}

impl Head {
    /// The kind and the parameters that matter for it, e.g. `wnll (alpha 0.5, beta 2,
    /// bounded log-variance, floor 0.1 of the spread)`.
    pub fn describe(&self) -> String {
        let (a, b) = (self.alpha, self.beta);
        match (self.kind, self.log_variance) {
            (HeadKind::Wnll, LogVariance::Bounded) => format!(
                "wnll (alpha {a}, beta {b}, bounded log-variance, floor {} of the spread)",
                self.variance_floor
            ),
            (HeadKind::Wnll, LogVariance::Excess) => {
                format!("wnll (alpha {a}, beta {b}, excess log-variance)")
            }
            (HeadKind::Wnll, LogVariance::Raw) => {
                format!("wnll (alpha {a}, beta {b}, raw log-variance)")
            }
            (kind, _) => kind.name().to_string(),
        }
    }

    /// Whether `other` scores exactly as this head: the same kind and, for `wnll`, the same
    /// weights and log-variance term (and floor, for `bounded`). Parameters a kind ignores
    /// do not count.
    pub fn scores_like(&self, other: &Head) -> bool {
        if self.kind != other.kind {
            return false;
        }
        if self.kind != HeadKind::Wnll {
            return true;
        }
        self.alpha == other.alpha
            && self.beta == other.beta
            && self.log_variance == other.log_variance
            && (self.log_variance != LogVariance::Bounded
                || self.variance_floor == other.variance_floor)
    }

    /// Checks that this head can score a model with the given output kind.
    ///
    /// # Errors
    /// A `wnll` head on a plain model, non-finite weights or a floor that is not above 0.
    pub fn check(&self, output: OutputKind) -> Result<(), HeadError> {
        if self.kind == HeadKind::Wnll {
            if output != OutputKind::Probabilistic {
                return Err(HeadError::NeedsVariance);
            }
            if !(self.variance_floor.is_finite() && self.variance_floor > 0.0) {
                return Err(HeadError::BadFloor(self.variance_floor));
            }
            if !self.alpha.is_finite()
                || !self.beta.is_finite()
                || self.alpha < 0.0
                || self.beta < 0.0
                || (self.alpha == 0.0 && self.beta == 0.0)
            {
                return Err(HeadError::BadWeights {
                    alpha: self.alpha,
                    beta: self.beta,
                });
            }
        }
        Ok(())
    }

    /// Scores every row of `x` (scaled inputs, n × d) against `recon`, writing `scores[..n]`
    /// and the per-feature contributions into `contrib` (n × d). Allocation-free.
    /// The caller has run [`Head::check`]; a missing variance then falls back to unit variance.
    /// `baseline` is the model's [`prepare_member_baselines`] (wnll `excess` and `bounded`
    /// only). An ensemble's reconstructions (`members · d` columns, see
    /// [`crate::model::Autoencoder`]) score each feature as the mean of the members' terms.
    pub fn score_batch(
        &self,
        x: ArrayView2<f32>,
        recon: &Recon,
        baseline: &[f32],
        scores: &mut [f32],
        mut contrib: ArrayViewMut2<f32>,
    ) {
        let n = x.nrows();
        debug_assert!(scores.len() >= n && contrib.nrows() >= n);
        let mut contrib = contrib.slice_mut(ndarray::s![..n, ..]);
        let members = recon.mean.ncols() / x.ncols().max(1);
        if members > 1 {
            self.score_members(x, recon, baseline, members, contrib.view_mut());
            for (s, row) in scores.iter_mut().zip(contrib.rows()) {
                *s = if self.kind == HeadKind::MaxAbs {
                    row.iter().fold(
                        f32::NEG_INFINITY,
                        |a, &b| if b > a || b.is_nan() { b } else { a },
                    )
                } else {
                    row.sum()
                };
            }
            return;
        }
        match (self.kind, recon.var.as_ref()) {
            (HeadKind::Mse, _) => {
                Zip::from(&mut contrib)
                    .and(&x)
                    .and(&recon.mean)
                    .for_each(|c, &x, &m| {
                        let e = x - m;
                        *c = e * e;
                    });
                for (s, row) in scores.iter_mut().zip(contrib.rows()) {
                    *s = row.sum();
                }
            }
            (HeadKind::MaxAbs, _) => {
                Zip::from(&mut contrib)
                    .and(&x)
                    .and(&recon.mean)
                    .for_each(|c, &x, &m| *c = (x - m).abs());
                for (s, row) in scores.iter_mut().zip(contrib.rows()) {
                    *s =
                        row.iter().fold(
                            f32::NEG_INFINITY,
                            |a, &b| if b > a || b.is_nan() { b } else { a },
                        );
                }
            }
            (HeadKind::Wnll, Some(var)) => {
                let (alpha, beta) = (self.alpha, self.beta);
                let d = x.ncols();
                debug_assert!(
                    recon.mean.dim() == x.dim() && var.dim() == x.dim() && contrib.dim() == x.dim(),
                    "wnll shapes: x {:?}, mean {:?}, var {:?}, contributions {:?}",
                    x.dim(),
                    recon.mean.dim(),
                    var.dim(),
                    contrib.dim()
                );
                if self.log_variance == LogVariance::Bounded && baseline.len() == 4 * d {
                    let (lo, rest) = baseline.split_at(d);
                    let (hi, rest) = rest.split_at(d);
                    let (inv_hi, inv_lo) = rest.split_at(d);
                    let consts = BoundedConsts {
                        lo,
                        hi,
                        inv_hi,
                        inv_lo,
                        alpha,
                        beta,
                    };
                    score_rows(&consts, x, recon.mean, var.view(), contrib.view_mut());
                } else if self.log_variance == LogVariance::Excess && baseline.len() == 3 * d {
                    let (median, rest) = baseline.split_at(d);
                    let (ceiling, inv_cap) = rest.split_at(d);
                    let consts = ExcessConsts {
                        median,
                        ceiling,
                        inv_cap,
                        alpha,
                        beta,
                    };
                    score_rows(&consts, x, recon.mean, var.view(), contrib.view_mut());
                } else {
                    Zip::from(&mut contrib)
                        .and(&x)
                        .and(&recon.mean)
                        .and(var)
                        .for_each(|c, &x, &m, &s| {
                            let e = x - m;
                            let v = s + VARIANCE_EPSILON;
                            *c = alpha * e * e / v + beta * v.ln();
                        });
                }
                for (s, row) in scores.iter_mut().zip(contrib.rows()) {
                    *s = row.sum();
                }
            }
            (HeadKind::Wnll, None) => {
                let alpha = self.alpha;
                let log_eps = self.beta * (1.0 + VARIANCE_EPSILON).ln();
                Zip::from(&mut contrib)
                    .and(&x)
                    .and(&recon.mean)
                    .for_each(|c, &x, &m| {
                        let e = x - m;
                        *c = alpha * e * e / (1.0 + VARIANCE_EPSILON) + log_eps;
                    });
                for (s, row) in scores.iter_mut().zip(contrib.rows()) {
                    *s = row.sum();
                }
            }
        }
    }
}

impl Head {
    /// The contributions of an ensemble's reconstructions (`members` of them side by side
    /// in `recon`, see [`crate::model::Autoencoder`]): each feature's term is the mean of
    /// the members' terms, each member scored with its own constants (`baseline` holds
    /// `members` equal blocks, see [`prepare_member_baselines`]). Summed member by member in
    /// order, so a row's result does not depend on its batch.
    fn score_members(
        &self,
        x: ArrayView2<f32>,
        recon: &Recon,
        baseline: &[f32],
        members: usize,
        mut contrib: ArrayViewMut2<f32>,
    ) {
        let d = x.ncols();
        let inv = 1.0 / members as f32;
        let block = baseline.len() / members;
        let (alpha, beta) = (self.alpha, self.beta);
        let cols = |k: usize| ndarray::s![.., k * d..(k + 1) * d];
        // Member k's i-th constant vector, over the features in `r`.
        let part = |k: usize, i: usize, r: &std::ops::Range<usize>| {
            let at = k * block + i * d;
            &baseline[at + r.start..at + r.end]
        };
        match (self.kind, recon.var.as_ref()) {
            (HeadKind::Wnll, Some(var))
                if self.log_variance == LogVariance::Bounded && block == 4 * d =>
            {
                let make = |k: usize, r: std::ops::Range<usize>| BoundedConsts {
                    lo: part(k, 0, &r),
                    hi: part(k, 1, &r),
                    inv_hi: part(k, 2, &r),
                    inv_lo: part(k, 3, &r),
                    alpha,
                    beta,
                };
                score_rows_members(make, members, x, recon.mean, var.view(), contrib);
            }
            (HeadKind::Wnll, Some(var))
                if self.log_variance == LogVariance::Excess && block == 3 * d =>
            {
                let make = |k: usize, r: std::ops::Range<usize>| ExcessConsts {
                    median: part(k, 0, &r),
                    ceiling: part(k, 1, &r),
                    inv_cap: part(k, 2, &r),
                    alpha,
                    beta,
                };
                score_rows_members(make, members, x, recon.mean, var.view(), contrib);
            }
            (kind, var) => {
                for k in 0..members {
                    let mean = recon.mean.slice(cols(k));
                    let var = var.map(|v| v.slice(cols(k)));
                    let log_eps = beta * (1.0 + VARIANCE_EPSILON).ln();
                    let term = |x: f32, m: f32, s: Option<f32>| {
                        let e = x - m;
                        match (kind, s) {
                            (HeadKind::Mse, _) => e * e,
                            (HeadKind::MaxAbs, _) => e.abs(),
                            (HeadKind::Wnll, Some(s)) => {
                                let v = s + VARIANCE_EPSILON;
                                alpha * e * e / v + beta * v.ln()
                            }
                            (HeadKind::Wnll, None) => {
                                alpha * e * e / (1.0 + VARIANCE_EPSILON) + log_eps
                            }
                        }
                    };
                    let zip = Zip::from(&mut contrib).and(&x).and(&mean);
                    match (k, var) {
                        (0, Some(v)) => zip
                            .and(&v)
                            .for_each(|c, &x, &m, &s| *c = term(x, m, Some(s))),
                        (_, Some(v)) => zip
                            .and(&v)
                            .for_each(|c, &x, &m, &s| *c += term(x, m, Some(s))),
                        (0, None) => zip.for_each(|c, &x, &m| *c = term(x, m, None)),
                        (_, None) => zip.for_each(|c, &x, &m| *c += term(x, m, None)),
                    }
                }
                contrib.mapv_inplace(|c| c * inv);
            }
        }
    }
}

/// Every row's contributions as the mean of `members` members' terms: member k's
/// reconstruction is columns `k·d..(k+1)·d` of `mean` and `var`, and `make(k, range)` gives its
/// constants for the features in `range`. Features go in segments of up to [`MEMBER_SEGMENT`],
/// so the running sum needs no allocation and each member's terms take the vector path.
fn score_rows_members<C: RowTerms>(
    make: impl Fn(usize, std::ops::Range<usize>) -> C,
    members: usize,
    x: ArrayView2<f32>,
    mean: ArrayView2<f32>,
    var: ArrayView2<f32>,
    mut contrib: ArrayViewMut2<f32>,
) {
    let d = x.ncols();
    let inv = 1.0 / members as f32;
    let mut tmp = [0.0f32; MEMBER_SEGMENT];
    for (((xr, mr), vr), mut cr) in x
        .rows()
        .into_iter()
        .zip(mean.rows())
        .zip(var.rows())
        .zip(contrib.rows_mut())
    {
        let (Some(xs), Some(ms), Some(vs), Some(out)) = (
            xr.to_slice(),
            mr.to_slice(),
            vr.to_slice(),
            cr.as_slice_mut(),
        ) else {
            // Strided rows (no caller passes them): the same terms, element by element.
            for (j, c) in cr.iter_mut().enumerate() {
                let sum: f32 = (0..members)
                    .map(|k| make(k, j..j + 1).one(0, xr[j], mr[k * d + j], vr[k * d + j]))
                    .sum();
                *c = sum * inv;
            }
            continue;
        };
        for a in (0..d).step_by(MEMBER_SEGMENT) {
            let b = (a + MEMBER_SEGMENT).min(d);
            let out = &mut out[a..b];
            let t = &mut tmp[..b - a];
            for k in 0..members {
                let at = k * d;
                row_terms(
                    &make(k, a..b),
                    &xs[a..b],
                    &ms[at + a..at + b],
                    &vs[at + a..at + b],
                    t,
                );
                if k == 0 {
                    out.copy_from_slice(t);
                } else {
                    out.iter_mut().zip(t.iter()).for_each(|(o, &t)| *o += t);
                }
            }
            out.iter_mut().for_each(|c| *c *= inv);
        }
    }
}

/// Features per segment of [`score_rows_members`]'s running sum.
const MEMBER_SEGMENT: usize = 64;

/// [`prepare_baseline`] for each of `members` members, block after block: member k's stored
/// constants are its slice of the medians and of the maxima (`members · d` each), with the
/// features' shared spread (see [`crate::model::fit::log_variance_baseline`]).
pub fn prepare_member_baselines(head: &Head, stored: &[f32], d: usize, members: usize) -> Vec<f32> {
    if members <= 1 {
        return prepare_baseline(head, stored, d);
    }
    let m = members * d;
    let has_spread = stored.len() >= 2 * m + d;
    let has_pair = stored.len() >= 2 * m;
    let mut out = Vec::new();
    for k in 0..members {
        let mut own = Vec::with_capacity(3 * d);
        if has_pair {
            own.extend_from_slice(&stored[k * d..(k + 1) * d]);
            own.extend_from_slice(&stored[m + k * d..m + (k + 1) * d]);
            if has_spread {
                own.extend_from_slice(&stored[2 * m..2 * m + d]);
            }
        }
        out.extend(prepare_baseline(head, &own, d));
    }
    out
}

/// A `d`-feature model's wnll constants, laid out for [`Head::score_batch`], from its
/// [`crate::model::ModelMeta::log_variance_baseline`] (`[median, ceiling]` or
/// `[median, ceiling, ln spread]`, `d` each):
/// - `excess`: the median ln v, the ceiling ln v and e^−ceiling, `3·d` values; without a
///   stored baseline, none (the head then uses the raw form);
/// - `bounded`: lo = max(median, ln spread + ln floor), hi = max(ceiling, lo), e^−hi and
///   e^−lo, `4·d` values. A model stored without the spread counts it as 1 (z-scored
///   units); one without any baseline gets lo = ln floor and no ceiling;
/// - `raw`: none.
pub fn prepare_baseline(head: &Head, stored: &[f32], d: usize) -> Vec<f32> {
    let has = |k: usize| stored.len() >= k * d && d > 0;
    let ln_floor = head.variance_floor.ln();
    match head.log_variance {
        LogVariance::Raw => Vec::new(),
        LogVariance::Excess if has(2) => {
            let mut out = stored[..2 * d].to_vec();
            out.extend(stored[d..2 * d].iter().map(|&top| (-top).exp()));
            out
        }
        LogVariance::Excess => Vec::new(),
        LogVariance::Bounded => {
            let lo: Vec<f32> = (0..d)
                .map(|j| {
                    let spread = if has(3) { stored[2 * d + j] } else { 0.0 };
                    let median = if has(2) { stored[j] } else { f32::NEG_INFINITY };
                    median.max(spread + ln_floor)
                })
                .collect();
            let hi: Vec<f32> = (0..d)
                .map(|j| {
                    if has(2) {
                        stored[d + j].max(lo[j])
                    } else {
                        f32::INFINITY
                    }
                })
                .collect();
            let mut out = lo.clone();
            out.extend_from_slice(&hi);
            out.extend(hi.iter().map(|&h| (-h).exp()));
            out.extend(lo.iter().map(|&l| (-l).exp()));
            out
        }
    }
}

/// Features per step of [`RowTerms::row`]: one AVX2 vector of f32.
const LANES: usize = 8;

/// A wnll variant's per-feature constants: one feature's contribution, and a whole row's.
trait RowTerms {
    /// Feature `j`'s contribution.
    fn one(&self, j: usize, x: f32, m: f32, s: f32) -> f32;

    /// Features `at..at + LANES`: a branch-free loop over fixed-size arrays that the
    /// compiler turns into one vector step (the logarithm included, see [`ln`]).
    fn lanes(
        &self,
        at: usize,
        x: &[f32; LANES],
        m: &[f32; LANES],
        s: &[f32; LANES],
        out: &mut [f32; LANES],
    );

    /// One row's contributions, `LANES` features at a time. A row that is not a multiple of
    /// `LANES` ends with a step over its last `LANES` features, overlapping the one before:
    /// each term depends only on its own inputs, so recomputing it gives the same value,
    /// and no feature falls to a scalar tail (38 features: 5 vector steps, not 4 and 6
    /// scalar logarithms). Inlined into [`row_terms`].
    #[inline(always)]
    fn row(&self, x: &[f32], m: &[f32], s: &[f32], out: &mut [f32]) {
        let d = out.len();
        if d < LANES {
            for (j, o) in out.iter_mut().enumerate() {
                *o = self.one(j, x[j], m[j], s[j]);
            }
            return;
        }
        let mut next = 0;
        loop {
            let at = next.min(d - LANES);
            self.lanes(
                at,
                lane(x, at),
                lane(m, at),
                lane(s, at),
                (&mut out[at..at + LANES]).try_into().expect("LANES long"),
            );
            if at + LANES == d {
                return;
            }
            next += LANES;
        }
    }
}

/// Every row's contributions into `contrib`. Rows are contiguous in every caller; a strided
/// view takes the element-wise path (same formula, not vectorised).
fn score_rows<C: RowTerms>(
    consts: &C,
    x: ArrayView2<f32>,
    mean: ArrayView2<f32>,
    var: ArrayView2<f32>,
    mut contrib: ArrayViewMut2<f32>,
) {
    for (((xr, mr), vr), mut cr) in x
        .rows()
        .into_iter()
        .zip(mean.rows())
        .zip(var.rows())
        .zip(contrib.rows_mut())
    {
        match (
            xr.to_slice(),
            mr.to_slice(),
            vr.to_slice(),
            cr.as_slice_mut(),
        ) {
            (Some(xs), Some(ms), Some(vs), Some(cs)) => row_terms(consts, xs, ms, vs, cs),
            _ => {
                for (j, c) in cr.iter_mut().enumerate() {
                    *c = consts.one(j, xr[j], mr[j], vr[j]);
                }
            }
        }
    }
}

/// One row, eight lanes wide where the CPU has AVX2 (the same operations in the same
/// order, so the same results, as without).
#[inline]
fn row_terms<C: RowTerms>(consts: &C, x: &[f32], m: &[f32], s: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        unsafe { row_terms_avx2(consts, x, m, s, out) };
        return;
    }
    consts.row(x, m, s, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn row_terms_avx2<C: RowTerms>(
    consts: &C,
    x: &[f32],
    m: &[f32],
    s: &[f32],
    out: &mut [f32],
) {
    consts.row(x, m, s, out);
}

/// The `bounded` wnll head's per-feature constants (see [`LogVariance::Bounded`]).
struct BoundedConsts<'a> {
    lo: &'a [f32],
    hi: &'a [f32],
    inv_hi: &'a [f32],
    inv_lo: &'a [f32],
    alpha: f32,
    beta: f32,
}

impl RowTerms for BoundedConsts<'_> {
    /// Feature `j`'s contribution.
    #[inline(always)]
    fn one(&self, j: usize, x: f32, m: f32, s: f32) -> f32 {
        bounded_term(
            self.alpha,
            self.beta,
            x - m,
            s + VARIANCE_EPSILON,
            [self.lo[j], self.hi[j], self.inv_hi[j], self.inv_lo[j]],
        )
    }

    #[inline(always)]
    fn lanes(
        &self,
        at: usize,
        x: &[f32; LANES],
        m: &[f32; LANES],
        s: &[f32; LANES],
        out: &mut [f32; LANES],
    ) {
        let (lo, hi, inv_hi, inv_lo) = (
            lane(self.lo, at),
            lane(self.hi, at),
            lane(self.inv_hi, at),
            lane(self.inv_lo, at),
        );
        for j in 0..LANES {
            out[j] = bounded_term(
                self.alpha,
                self.beta,
                x[j] - m[j],
                s[j] + VARIANCE_EPSILON,
                [lo[j], hi[j], inv_hi[j], inv_lo[j]],
            );
        }
    }
}

/// α e²/v' + β (ln v' − lo) with v' = v clamped to [e^lo, e^hi], branch-free.
#[inline(always)]
fn bounded_term(alpha: f32, beta: f32, e: f32, v: f32, [lo, hi, inv_hi, inv_lo]: [f32; 4]) -> f32 {
    let ln_v = ln(v);
    let below = ln_v < lo;
    let above = ln_v > hi;
    let ln_c = if below {
        lo
    } else if above {
        hi
    } else {
        ln_v
    };
    let inv_v = if below {
        inv_lo
    } else if above {
        inv_hi
    } else {
        1.0 / v
    };
    alpha * e * e * inv_v + beta * (ln_c - lo)
}

/// The `excess` wnll head's per-feature constants (see [`LogVariance::Excess`]).
struct ExcessConsts<'a> {
    median: &'a [f32],
    ceiling: &'a [f32],
    inv_cap: &'a [f32],
    alpha: f32,
    beta: f32,
}

impl RowTerms for ExcessConsts<'_> {
    /// Feature `j`'s contribution.
    #[inline(always)]
    fn one(&self, j: usize, x: f32, m: f32, s: f32) -> f32 {
        excess_term(
            self.alpha,
            self.beta,
            x - m,
            s + VARIANCE_EPSILON,
            [self.median[j], self.ceiling[j], self.inv_cap[j]],
        )
    }

    #[inline(always)]
    fn lanes(
        &self,
        at: usize,
        x: &[f32; LANES],
        m: &[f32; LANES],
        s: &[f32; LANES],
        out: &mut [f32; LANES],
    ) {
        let (median, ceiling, inv_cap) = (
            lane(self.median, at),
            lane(self.ceiling, at),
            lane(self.inv_cap, at),
        );
        for j in 0..LANES {
            out[j] = excess_term(
                self.alpha,
                self.beta,
                x[j] - m[j],
                s[j] + VARIANCE_EPSILON,
                [median[j], ceiling[j], inv_cap[j]],
            );
        }
    }
}

/// α e²/v' + β max(0, ln v' − median) with v' = v capped at e^ceiling, branch-free: never
/// more uncertain than on any held-out normal row, so an autoencoder cannot explain an
/// anomaly away by extrapolating a huge variance for it.
#[inline(always)]
fn excess_term(alpha: f32, beta: f32, e: f32, v: f32, [median, ceiling, inv_cap]: [f32; 3]) -> f32 {
    let ln_v = ln(v);
    let capped = ln_v > ceiling;
    let ln_v = if capped { ceiling } else { ln_v };
    let inv_v = if capped { inv_cap } else { 1.0 / v };
    alpha * e * e * inv_v + beta * (ln_v - median).max(0.0)
}

/// `v[at..at + LANES]` as an array.
#[inline(always)]
fn lane(v: &[f32], at: usize) -> &[f32; LANES] {
    v[at..at + LANES].try_into().expect("LANES long")
}

/// ln x in f32 without a library call, so that a loop of it vectorises: x = 2^k·(1 + f)
/// with 1 + f in [√½, √2), then ln(1 + f) = 2·atanh(f/(2 + f)) by the minimax polynomial of
/// fdlibm's `logf` (within 1 ulp there), plus k·ln 2 in two parts. Subnormals are scaled
/// first; 0 gives −∞, +∞ gives +∞, negative numbers and NaN give NaN, as `f32::ln` does.
#[inline(always)]
pub fn ln(x: f32) -> f32 {
    // 0.66666663, 0.40000972, 0.28498787, 0.24279079; ln 2 = 0.69313812 + 9.0580006e-6.
    const LG1: f32 = f32::from_bits(0x3f2a_aaaa);
    const LG2: f32 = f32::from_bits(0x3ecc_ce13);
    const LG3: f32 = f32::from_bits(0x3e91_e9ee);
    const LG4: f32 = f32::from_bits(0x3e78_9e26);
    const LN2_HI: f32 = f32::from_bits(0x3f31_7180);
    const LN2_LO: f32 = f32::from_bits(0x3717_f7d1);
    let tiny = x < f32::MIN_POSITIVE;
    let xs = if tiny { x * 8_388_608.0 } else { x };
    let bits = xs.to_bits() as i32;
    // Moves the split point to √½: the mantissa then lands in [√½, √2).
    let shifted = bits.wrapping_add(0x3f80_0000 - 0x3f35_04f3);
    let k = (shifted >> 23) - 127 - if tiny { 23 } else { 0 };
    let m = f32::from_bits(((shifted & 0x007f_ffff) + 0x3f35_04f3) as u32);
    let f = m - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    let w = z * z;
    let r = z * (LG1 + w * LG3) + w * (LG2 + w * LG4);
    let hfsq = 0.5 * f * f;
    let dk = k as f32;
    let y = s * (hfsq + r) + dk * LN2_LO - hfsq + f + dk * LN2_HI;
    if x > 0.0 && x < f32::INFINITY {
        y
    } else if x == 0.0 {
        f32::NEG_INFINITY
    } else if x == f32::INFINITY {
        x
    } else {
        f32::NAN
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, array};

    fn run_with(
        head: Head,
        baseline: &[f32],
        x: &Array2<f32>,
        mean: &Array2<f32>,
        var: Option<&Array2<f32>>,
    ) -> (Vec<f32>, Array2<f32>) {
        let recon = Recon {
            mean: mean.view(),
            var: var.map(|v| v.view()),
        };
        let mut scores = vec![0.0; x.nrows()];
        let mut contrib = Array2::zeros(x.dim());
        let baseline = prepare_baseline(&head, baseline, x.ncols());
        head.score_batch(x.view(), &recon, &baseline, &mut scores, contrib.view_mut());
        (scores, contrib)
    }

    fn run(
        head: Head,
        x: &Array2<f32>,
        mean: &Array2<f32>,
        var: Option<&Array2<f32>>,
    ) -> (Vec<f32>, Array2<f32>) {
        run_with(head, &[], x, mean, var)
    }

    /// An ensemble's score is the members' mean per feature, each member with its own
    /// constants: every head and log-variance term, at a width that takes the vector path
    /// (with a tail) and one that does not, and past a segment of the running sum.
    #[test]
    fn an_ensembles_terms_are_the_mean_of_its_members_terms() {
        let mut rng = crate::rng::Rng::new(3);
        for d in [5, 21, 70] {
            let (k, n) = (3, 4);
            let m = k * d;
            let x = Array2::from_shape_simple_fn((n, d), || rng.uniform(-3.0, 3.0));
            let mean = Array2::from_shape_simple_fn((n, m), || rng.uniform(-3.0, 3.0));
            let var = Array2::from_shape_simple_fn((n, m), || rng.uniform(0.0, 2.0));
            // Stored like fit::log_variance_baseline: medians, maxima (k·d each), spread (d).
            let mut stored: Vec<f32> = (0..m).map(|_| rng.uniform(-3.0, 0.0)).collect();
            stored.extend((0..m).map(|_| rng.uniform(0.0, 1.0)));
            stored.extend((0..d).map(|_| rng.uniform(-1.0, 0.5)));
            for (kind, lv) in [
                (HeadKind::Wnll, LogVariance::Bounded),
                (HeadKind::Wnll, LogVariance::Excess),
                (HeadKind::Wnll, LogVariance::Raw),
                (HeadKind::Mse, LogVariance::Bounded),
                (HeadKind::MaxAbs, LogVariance::Bounded),
            ] {
                let head = Head {
                    kind,
                    alpha: 0.5,
                    beta: 2.0,
                    log_variance: lv,
                    variance_floor: 0.1,
                };
                let recon = Recon {
                    mean: mean.view(),
                    var: Some(var.view()),
                };
                let prepared = prepare_member_baselines(&head, &stored, d, k);
                let mut scores = vec![0.0; n];
                let mut contrib = Array2::zeros((n, d));
                head.score_batch(x.view(), &recon, &prepared, &mut scores, contrib.view_mut());
                // Strided rows take the element-wise path to the same terms.
                use ndarray::ShapeBuilder;
                let x_f = Array2::from_shape_fn((n, d).f(), |ij| x[ij]);
                let mut strided = Array2::zeros((n, d));
                let mut s2 = vec![0.0; n];
                head.score_batch(x_f.view(), &recon, &prepared, &mut s2, strided.view_mut());
                for (a, b) in strided.iter().zip(&contrib) {
                    assert!(
                        (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                        "strided {a} vs {b}"
                    );
                }

                let mut want = Array2::<f32>::zeros((n, d));
                for member in 0..k {
                    let cols = ndarray::s![.., member * d..(member + 1) * d];
                    let mut own = stored[member * d..(member + 1) * d].to_vec();
                    own.extend_from_slice(&stored[m + member * d..m + (member + 1) * d]);
                    own.extend_from_slice(&stored[2 * m..]);
                    let (_, c) = run_with(
                        head,
                        &own,
                        &x,
                        &mean.slice(cols).to_owned(),
                        Some(&var.slice(cols).to_owned()),
                    );
                    want += &c;
                }
                want /= k as f32;
                for ((got, want), (i, j)) in contrib
                    .iter()
                    .zip(&want)
                    .zip((0..n).flat_map(|i| (0..d).map(move |j| (i, j))))
                {
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "d {d} {kind:?} {lv:?} [{i}, {j}]: {got} vs {want}"
                    );
                }
                for (i, row) in want.rows().into_iter().enumerate() {
                    let want = if kind == HeadKind::MaxAbs {
                        row.fold(f32::NEG_INFINITY, |a, &b| a.max(b))
                    } else {
                        row.sum()
                    };
                    assert!((scores[i] - want).abs() <= 1e-4 * want.abs().max(1.0));
                }
            }
        }
    }

    #[test]
    fn mse_and_max_abs_by_hand() {
        let x = array![[1.0f32, 2.0, 3.0]];
        let m = array![[1.5f32, 2.0, 1.0]];
        let mse = Head {
            kind: HeadKind::Mse,
            alpha: 1.0,
            beta: 1.0,
            log_variance: LogVariance::Raw,
            variance_floor: 1.0,
        };
        let (s, c) = run(mse, &x, &m, None);
        assert_eq!(s, vec![0.25 + 0.0 + 4.0]);
        assert_eq!(c.row(0).to_vec(), vec![0.25, 0.0, 4.0]);
        let max = Head {
            kind: HeadKind::MaxAbs,
            ..mse
        };
        let (s, c) = run(max, &x, &m, None);
        assert_eq!(s, vec![2.0]);
        assert_eq!(c.row(0).to_vec(), vec![0.5, 0.0, 2.0]);
    }

    #[test]
    fn wnll_with_unit_weights_is_gaussian_nll_by_hand() {
        let x = array![[1.0f32, 0.0]];
        let m = array![[0.0f32, 0.0]];
        let v = array![[0.25f32, 2.0]];
        let head = Head {
            kind: HeadKind::Wnll,
            alpha: 1.0,
            beta: 1.0,
            log_variance: LogVariance::Raw,
            variance_floor: 1.0,
        };
        let (s, _) = run(head, &x, &m, Some(&v));
        let e = 1e-5f64;
        let want = 1.0 / (0.25 + e) + (0.25 + e).ln() + (2.0 + e).ln();
        assert!((s[0] as f64 - want).abs() < 1e-4, "{} vs {want}", s[0]);
        // α and β weight the two terms separately.
        let head = Head {
            kind: HeadKind::Wnll,
            alpha: 0.5,
            beta: 2.0,
            log_variance: LogVariance::Raw,
            variance_floor: 1.0,
        };
        let (s, c) = run(head, &x, &m, Some(&v));
        let want = 0.5 / (0.25 + e) + 2.0 * ((0.25 + e).ln() + (2.0 + e).ln());
        assert!((s[0] as f64 - want).abs() < 1e-4);
        assert!((c.row(0).sum() - s[0]).abs() < 1e-5);
    }

    #[test]
    fn excess_log_variance_counts_only_uncertainty_above_the_baseline() {
        // Feature 0: error 1, variance 0.25 (below its baseline ln 1 = 0: no log term).
        // Feature 1: no error, variance 2 (above its baseline ln 0.5: counts ln 2 − ln 0.5).
        let x = array![[1.0f32, 0.0]];
        let m = array![[0.0f32, 0.0]];
        let v = array![[0.25f32, 2.0]];
        let head = Head {
            kind: HeadKind::Wnll,
            alpha: 0.5,
            beta: 2.0,
            log_variance: LogVariance::Excess,
            variance_floor: 1.0,
        };
        let baseline = [0.0f32, 0.5f32.ln(), 10.0, 10.0];
        let (s, c) = run_with(head, &baseline, &x, &m, Some(&v));
        let e = 1e-5f32;
        assert!((c[[0, 0]] - 0.5 / (0.25 + e)).abs() < 1e-4, "{c}");
        assert!(
            (c[[0, 1]] - 2.0 * ((2.0 + e).ln() - 0.5f32.ln())).abs() < 1e-4,
            "{c}"
        );
        assert!(c.iter().all(|&v| v >= 0.0));
        assert!((s[0] - c.row(0).sum()).abs() < 1e-5);
        // A more confident prediction can no longer lower the score below the error term.
        let sure = array![[0.25f32, 1e-3]];
        let (s2, _) = run_with(head, &baseline, &x, &m, Some(&sure));
        assert!(s2[0] >= c[[0, 0]] - 1e-4);
        // The variance is capped at the held-out maximum (ln 0.5 for feature 1 here).
        let capped = [0.0f32, 0.5f32.ln(), 10.0, 0.5f32.ln()];
        let big = array![[0.25f32, 100.0]];
        let x2 = array![[1.0f32, 3.0]];
        let (_, c3) = run_with(head, &capped, &x2, &m, Some(&big));
        assert!((c3[[0, 1]] - 0.5 * 9.0 / 0.5).abs() < 1e-3, "{c3}");
        // Without a baseline (old models) the head falls back to the raw form.
        let (raw, _) = run_with(head, &[], &x, &m, Some(&v));
        let want = 0.5 / (0.25 + e) + 2.0 * ((0.25 + e).ln() + (2.0 + e).ln());
        assert!((raw[0] - want).abs() < 1e-3);
    }

    #[test]
    fn ln_matches_the_library_logarithm_within_an_ulp_and_its_special_values() {
        let mut worst = 0.0f64;
        let mut x = 1e-44f32;
        while x < 3e38 {
            let (got, want) = (ln(x) as f64, (x as f64).ln());
            // One ulp of the result (absolute near ln x = 0, where results are tiny).
            let ulp = (want.abs() * f64::from(f32::EPSILON)).max(1e-45);
            worst = worst.max((got - want).abs() / ulp);
            x = (x * 1.000_37).max(f32::from_bits(x.to_bits() + 1));
        }
        assert!(worst <= 1.0, "worst error {worst} ulp");
        for x in [1.0f32, 2.0, 0.5, std::f32::consts::E, 1e-6, 1e-6 + 1e-12] {
            let (got, want) = (ln(x) as f64, (x as f64).ln());
            assert!(
                (got - want).abs() <= 1e-7 * want.abs().max(1e-6),
                "{x}: {got} vs {want}"
            );
        }
        assert_eq!(ln(0.0), f32::NEG_INFINITY);
        assert_eq!(ln(f32::INFINITY), f32::INFINITY);
        assert!(ln(-1.0).is_nan() && ln(f32::NAN).is_nan() && ln(f32::NEG_INFINITY).is_nan());
    }

    #[test]
    fn bounded_clamps_the_variance_between_floor_and_ceiling() {
        // One row, three features. Stored: medians, ceilings, ln spreads.
        //   f0: median −4, spread 1 (ln 0): floor 0; ceiling 2.
        //   f1: median 0.5 above the spread ln 0.25: floor 0.5; ceiling 1.
        //   f2: ceiling −1 below the floor 0: the ceiling rises to the floor.
        let stored = [-4.0f32, 0.5, -3.0, 2.0, 1.0, -1.0, 0.0, 0.25f32.ln(), 0.0];
        let head = Head {
            kind: HeadKind::Wnll,
            alpha: 0.5,
            beta: 2.0,
            log_variance: LogVariance::Bounded,
            variance_floor: 1.0,
        };
        let x = array![[2.0f32, 1.0, 3.0]];
        let m = array![[0.0f32, 0.0, 0.0]];
        let eps = VARIANCE_EPSILON;
        // f0: a collapsed variance (e^−8) is raised to the floor 1: 0.5·4/1 + 0.
        // f1: e^0.8 lies inside [e^0.5, e^1]: 0.5·1/e^0.8 + 2·(0.8 − 0.5).
        // f2: a huge variance is capped at e^0: 0.5·9/1 + 0.
        let v = array![[(-8.0f32).exp() - eps, 0.8f32.exp() - eps, 1e6]];
        let (s, c) = run_with(head, &stored, &x, &m, Some(&v));
        let want = [2.0, 0.5 * (-0.8f32).exp() + 2.0 * 0.3, 4.5];
        for (j, w) in want.iter().enumerate() {
            assert!(
                (c[[0, j]] - w).abs() <= 1e-5 * w.max(1.0),
                "f{j}: {} vs {w}",
                c[[0, j]]
            );
        }
        assert!((s[0] - want.iter().sum::<f32>()).abs() < 1e-4);
        // The same frame under `excess` lets f0's collapsed variance blow it up.
        let excess = Head {
            log_variance: LogVariance::Excess,
            variance_floor: 1.0,
            ..head
        };
        let (s_excess, _) = run_with(excess, &stored, &x, &m, Some(&v));
        assert!(s_excess[0] > 100.0 * s[0], "{} vs {}", s_excess[0], s[0]);
        // A model stored before the spread counts it as 1; one without any baseline gets
        // the unit floor and no ceiling.
        assert_eq!(
            prepare_baseline(&head, &stored[..6], 3)[..3],
            [0.0, 0.5, 0.0]
        );
        let bare = prepare_baseline(&head, &[], 2);
        assert_eq!(bare[..4], [0.0, 0.0, f32::INFINITY, f32::INFINITY]);
        // The floor is a share of the spread: 0.1 puts f0's floor at ln 0.1.
        let tenth = Head {
            variance_floor: 0.1,
            ..head
        };
        let lo = prepare_baseline(&tenth, &stored, 3);
        assert!((lo[0] - 0.1f32.ln()).abs() < 1e-6 && lo[1] == 0.5, "{lo:?}");
        let raw = Head {
            log_variance: LogVariance::Raw,
            ..head
        };
        assert_eq!(prepare_baseline(&raw, &stored, 3), Vec::<f32>::new());
    }

    /// Scores contiguous rows (the vectorised path) and the same data through strided
    /// views (the element-wise path); asserts both give the same contributions and scores,
    /// NaN where NaN. Returns the contiguous result.
    fn rows_agree_with_the_element_wise_path(
        head: Head,
        stored: &[f32],
        x: &Array2<f32>,
        m: &Array2<f32>,
        v: &Array2<f32>,
    ) -> (Vec<f32>, Array2<f32>) {
        let (s, c) = run_with(head, stored, x, m, Some(v));
        let (xt, mt, vt) = (x.t().to_owned(), m.t().to_owned(), v.t().to_owned());
        let recon = Recon {
            mean: mt.t(),
            var: Some(vt.t()),
        };
        let prepared = prepare_baseline(&head, stored, x.ncols());
        let mut s2 = vec![0.0; x.nrows()];
        let mut c2 = Array2::zeros(x.dim());
        head.score_batch(xt.t(), &recon, &prepared, &mut s2, c2.view_mut());
        for (a, b) in c.iter().zip(c2.iter()).chain(s.iter().zip(&s2)) {
            assert!(a == b || (a.is_nan() && b.is_nan()), "{a} vs {b}");
        }
        (s, c)
    }

    #[test]
    fn bounded_rows_match_the_element_wise_form_and_keep_nan() {
        let mut rng = crate::rng::Rng::new(11);
        let (n, d) = (9, 38);
        let x = Array2::from_shape_fn((n, d), |_| rng.uniform(-2.0, 2.0));
        let m = Array2::from_shape_fn((n, d), |_| rng.uniform(-1.0, 1.0));
        let mut v = Array2::from_shape_fn((n, d), |_| rng.uniform(-4.0, 4.0).exp());
        v[[3, 5]] = f32::NAN;
        let stored: Vec<f32> = (0..3 * d)
            .map(|i| match i / d {
                0 => 0.1 * (i % d) as f32 - 2.0,
                1 => 2.0,
                _ => -0.5,
            })
            .collect();
        let head = Head {
            kind: HeadKind::Wnll,
            alpha: 1.0,
            beta: 0.7,
            log_variance: LogVariance::Bounded,
            variance_floor: 1.0,
        };
        let (s, c) = rows_agree_with_the_element_wise_path(head, &stored, &x, &m, &v);
        assert!(s[3].is_nan());
        assert!(c.iter().all(|&v| v.is_nan() || v >= 0.0));
    }

    /// Widths below, at and between multiples of the vector step: the last step overlaps the
    /// one before it, and narrow rows take the element-wise form.
    #[test]
    fn rows_of_every_width_match_the_element_wise_form() {
        let mut rng = crate::rng::Rng::new(5);
        for d in [1, 3, 7, 8, 9, 15, 16, 17, 38, 65] {
            let n = 3;
            let x = Array2::from_shape_fn((n, d), |_| rng.uniform(-2.0, 2.0));
            let m = Array2::from_shape_fn((n, d), |_| rng.uniform(-1.0, 1.0));
            let v = Array2::from_shape_fn((n, d), |_| rng.uniform(-6.0, 6.0).exp());
            let stored: Vec<f32> = (0..3 * d)
                .map(|i| match i / d {
                    0 => rng.uniform(-3.0, 0.0),
                    1 => rng.uniform(0.0, 3.0),
                    _ => rng.uniform(-1.0, 1.0),
                })
                .collect();
            for log_variance in [LogVariance::Bounded, LogVariance::Excess] {
                let head = Head {
                    kind: HeadKind::Wnll,
                    alpha: 0.5,
                    beta: 2.0,
                    log_variance,
                    variance_floor: 0.1,
                };
                let (s, c) = rows_agree_with_the_element_wise_path(head, &stored, &x, &m, &v);
                assert!(s.iter().all(|v| v.is_finite()), "d = {d}: {s:?}");
                // Every feature was written: none is left at the buffer's initial zero.
                assert!(c.iter().all(|&v| v != 0.0), "d = {d}: {c:?}");
            }
        }
    }

    #[test]
    fn excess_rows_match_the_element_wise_form_and_keep_nan() {
        let mut rng = crate::rng::Rng::new(7);
        let (n, d) = (9, 38);
        let x = Array2::from_shape_fn((n, d), |_| rng.uniform(-2.0, 2.0));
        let m = Array2::from_shape_fn((n, d), |_| rng.uniform(-1.0, 1.0));
        let mut v = Array2::from_shape_fn((n, d), |_| rng.uniform(-3.0, 3.0).exp());
        v[[3, 5]] = f32::NAN;
        v[[4, 6]] = 1e9;
        let baseline: Vec<f32> = (0..2 * d)
            .map(|i| if i < d { 0.1 * i as f32 - 2.0 } else { 2.0 })
            .collect();
        let head = Head {
            kind: HeadKind::Wnll,
            alpha: 1.0,
            beta: 0.7,
            log_variance: LogVariance::Excess,
            variance_floor: 1.0,
        };
        let (s, c) = rows_agree_with_the_element_wise_path(head, &baseline, &x, &m, &v);
        assert!(s[3].is_nan());
        // A huge variance is capped at e^ceiling: 1/v = e^-2 and the log term counts
        // ceiling − median.
        let e = x[[4, 6]] - m[[4, 6]];
        let capped = e * e * (-2.0f32).exp() + 0.7 * (2.0 - (0.1 * 6.0 - 2.0));
        assert!(
            (c[[4, 6]] - capped).abs() <= 1e-5 * capped,
            "{} vs {capped}",
            c[[4, 6]]
        );
        assert!(s.iter().enumerate().all(|(i, v)| i == 3 || v.is_finite()));
    }

    #[test]
    fn wnll_refuses_plain_model() {
        let head = Head {
            kind: HeadKind::Wnll,
            alpha: 0.5,
            beta: 2.0,
            log_variance: LogVariance::Excess,
            variance_floor: 1.0,
        };
        assert_eq!(head.check(OutputKind::Plain), Err(HeadError::NeedsVariance));
        assert!(head.check(OutputKind::Probabilistic).is_ok());
        let bad = Head {
            alpha: f32::NAN,
            ..head
        };
        assert!(bad.check(OutputKind::Probabilistic).is_err());
        let negative = Head { beta: -1.0, ..head };
        // Only the parameters a kind uses decide whether two heads score alike.
        let mse = Head {
            kind: HeadKind::Mse,
            ..head
        };
        let mse_bounded = Head {
            log_variance: LogVariance::Bounded,
            variance_floor: 0.5,
            alpha: 3.0,
            ..mse
        };
        assert!(mse.scores_like(&mse_bounded));
        assert!(!head.scores_like(&negative) && !head.scores_like(&mse));
        let bounded = Head {
            log_variance: LogVariance::Bounded,
            ..head
        };
        let other_floor = Head {
            variance_floor: 0.5,
            ..bounded
        };
        assert!(!bounded.scores_like(&other_floor));
        assert!(head.scores_like(&Head {
            variance_floor: 0.5,
            ..head
        }));
        assert_eq!(mse.describe(), "mse");
        assert!(bounded.describe().contains("bounded log-variance, floor"));
        let no_floor = Head {
            variance_floor: 0.0,
            ..head
        };
        assert_eq!(
            no_floor.check(OutputKind::Probabilistic),
            Err(HeadError::BadFloor(0.0))
        );
        assert!(negative.check(OutputKind::Probabilistic).is_err());
    }
}
