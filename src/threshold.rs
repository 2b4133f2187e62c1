//! Streaming decision thresholds on a scalar score stream (higher = more anomalous):
//! SPOT and DSPOT (Siffer et al., KDD 2017; papers.md §6) and a static empirical quantile.
//!
//! A [`ThresholdConfig`] is built once from a batch of calibration scores (warm-up or
//! training scores); the scorer thread then feeds one score per frame to
//! [`Threshold::update`], whose [`Verdict`] goes to the alert sinks. Alarms never enter the
//! state, non-finite scores are counted and skipped, and updates allocate nothing: the peak
//! buffer and the DSPOT window are rings preallocated at calibration.
//!
//! SPOT keeps an initial threshold t (an empirical quantile of the calibration scores), the
//! excesses over t ("peaks", bounded ring), and a generalized Pareto (GPD) fit of the peaks
//! by maximum likelihood through Grimshaw's one-dimensional reduction. The decision
//! threshold is the GPD extreme quantile z_q at risk q; it is recomputed whenever a peak
//! arrives.

use serde::{Deserialize, Serialize};

mod series;
mod sums;

/// Fewest finite calibration scores any kind accepts (DSPOT needs `dspot_depth` more).
pub const MIN_CALIBRATION_SCORES: usize = 50;

/// Largest accepted `decluster_frames`: a run that needs longer to end is not a run.
pub const MAX_DECLUSTER_FRAMES: usize = 10_000;

/// Largest accepted `max_peaks`: the peak buffer is allocated up front and every peak
/// refits over all of it.
pub const MAX_PEAKS_LIMIT: usize = 1_000_000;

/// Which threshold a stream gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThresholdKind {
    /// Streaming peaks-over-threshold with a GPD tail (stationary scores).
    #[default]
    Spot,
    /// SPOT on the score minus a moving mean of recent normal scores (drifting scores).
    Dspot,
    /// A fixed empirical quantile of the calibration scores.
    Quantile,
}

impl ThresholdKind {
    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            ThresholdKind::Spot => "spot",
            ThresholdKind::Dspot => "dspot",
            ThresholdKind::Quantile => "quantile",
        }
    }
}

/// How a stream's decision threshold is set and kept up to date.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThresholdConfig {
    /// `spot` (GPD tail of the scores), `dspot` (GPD tail of the score minus the mean of the
    /// last `dspot_depth` normal scores) or `quantile` (static empirical quantile).
    pub kind: ThresholdKind,
    /// SPOT/DSPOT risk q: the probability that a normal score exceeds the threshold (with
    /// `decluster_frames` > 0, that a normal run of scores does: the stream's peaks are
    /// counted as runs, N_t/n a rate of runs per score).
    /// Must lie in (0, 1 − `init_level`), so that the threshold lies above t. Keep it far
    /// below 1 − `init_level`: alarms never enter the peaks, so the top q/(1 − `init_level`)
    /// of the tail is censored and long runs pull the threshold down (see [`Spot`]).
    pub risk_q: f64,
    /// SPOT/DSPOT: the initial threshold t is this empirical quantile of the calibration
    /// scores (linear interpolation between order statistics, numpy's default); scores
    /// above t are peaks. In (0, 1).
    pub init_level: f64,
    /// SPOT/DSPOT: most peaks kept for the GPD fit; when full, a new peak overwrites the
    /// oldest. The GPD is refitted, in O(`max_peaks`), once the peaks added since the last
    /// fit reach 2 % of those held (so at every peak while fewer than 100 are held). At
    /// least `min_peaks`.
    pub max_peaks: usize,
    /// SPOT/DSPOT: while fewer peaks than this are held, the threshold is the empirical
    /// (1 − `risk_q`) quantile of the calibration scores (DSPOT: of the calibration
    /// residuals), fixed at calibration; from this many peaks on it is the GPD quantile.
    /// At least 1.
    pub min_peaks: usize,
    /// DSPOT: the drift estimate is the mean of the last this many normal (non-alarm)
    /// scores, in samples. Calibration then needs `dspot_depth` + 50 finite scores.
    pub dspot_depth: usize,
    /// SPOT/DSPOT, runs declustering of a stream's peaks: scores above t come in runs (a
    /// score is the mean of the last 5 frames, and a fault outlasts a frame), and a run ends
    /// after this many scores in a row at or below t. Only the run's largest score enters
    /// the peaks, when the run ends, and nothing of it if any of its scores was an alarm,
    /// so neither the climb into an incident nor its decay teaches the threshold. 0: every
    /// score above t is a peak at once (the SPOT paper, which assumes independent scores).
    /// Calibration scores (held-out rows in no order) are peaks one by one.
    pub decluster_frames: usize,
    /// `quantile` kind: the threshold is this empirical quantile of the calibration scores.
    /// In (0, 1).
    pub quantile: f64,
}

impl Default for ThresholdConfig {
    fn default() -> Self {
        ThresholdConfig {
            kind: ThresholdKind::Spot,
            risk_q: 1e-4,
            init_level: 0.98,
            max_peaks: 500,
            min_peaks: 50,
            dspot_depth: 50,
            decluster_frames: 5,
            quantile: 0.999,
        }
    }
}

fn open_unit(x: f64) -> bool {
    x > 0.0 && x < 1.0
}

impl ThresholdConfig {
    /// Semantic checks the types cannot express. Returns the key and the reason.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !open_unit(self.init_level) {
            return Err((
                "init_level",
                format!("must be in (0, 1), got {}", self.init_level),
            ));
        }
        if !open_unit(self.risk_q) {
            return Err(("risk_q", format!("must be in (0, 1), got {}", self.risk_q)));
        }
        if self.risk_q >= 1.0 - self.init_level {
            return Err((
                "risk_q",
                format!(
                    "must be below 1 - init_level = {} (more scores must exceed the initial \
                     threshold than the risk lets exceed the final one), got {}",
                    1.0 - self.init_level,
                    self.risk_q
                ),
            ));
        }
        if self.min_peaks == 0 {
            return Err(("min_peaks", "must be at least 1".into()));
        }
        if self.max_peaks > MAX_PEAKS_LIMIT {
            return Err((
                "max_peaks",
                format!("must be at most {MAX_PEAKS_LIMIT}, got {}", self.max_peaks),
            ));
        }
        if self.max_peaks < self.min_peaks {
            return Err((
                "max_peaks",
                format!(
                    "must be at least min_peaks ({}), got {}",
                    self.min_peaks, self.max_peaks
                ),
            ));
        }
        if self.dspot_depth == 0 {
            return Err(("dspot_depth", "must be at least 1".into()));
        }
        if self.decluster_frames > MAX_DECLUSTER_FRAMES {
            return Err((
                "decluster_frames",
                format!(
                    "must be at most {MAX_DECLUSTER_FRAMES}, got {}",
                    self.decluster_frames
                ),
            ));
        }
        if !open_unit(self.quantile) {
            return Err((
                "quantile",
                format!("must be in (0, 1), got {}", self.quantile),
            ));
        }
        Ok(())
    }

    /// Calibrates the configured threshold on `calibration_scores` (non-finite ones are skipped).
    ///
    /// # Errors
    /// An invalid configuration, fewer than [`MIN_CALIBRATION_SCORES`] finite scores (plus
    /// `dspot_depth` for DSPOT), or (SPOT/DSPOT) scores without spread.
    pub fn build(&self, calibration_scores: &[f64]) -> Result<Threshold, ThresholdError> {
        Ok(match self.kind {
            ThresholdKind::Spot => Threshold::Spot(Spot::calibrate(calibration_scores, self)?),
            ThresholdKind::Dspot => Threshold::Dspot(Dspot::calibrate(calibration_scores, self)?),
            ThresholdKind::Quantile => {
                Threshold::Quantile(Quantile::calibrate(calibration_scores, self)?)
            }
        })
    }
}

/// Why a threshold could not be calibrated.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ThresholdError {
    #[error("threshold config: key `{key}`: {reason}")]
    Config { key: &'static str, reason: String },
    #[error(
        "{kind} threshold calibration needs at least {needed} finite scores, got {finite} \
         (of {given} given)"
    )]
    TooFewScores {
        kind: &'static str,
        needed: usize,
        finite: usize,
        given: usize,
    },
    #[error(
        "{kind} threshold calibration {what} are all equal ({value}) across {count} values; \
         a tail cannot be fitted"
    )]
    ConstantScores {
        kind: &'static str,
        what: &'static str,
        value: f64,
        count: usize,
    },
}

/// What one score did to a threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// At or below the initial threshold t (static kind: at or below the threshold).
    Normal,
    /// Above t but not above the threshold: a peak (stored at once, or as part of its run
    /// when declustering; see [`ThresholdConfig::decluster_frames`]).
    Peak,
    /// Above the threshold. The state is untouched.
    Alarm,
    /// Not finite: skipped and counted, the state is untouched.
    Ignored,
}

impl Verdict {
    /// Whether the score was above the threshold.
    pub fn is_alarm(self) -> bool {
        self == Verdict::Alarm
    }
}

/// A generalized Pareto distribution of excesses: P(Y > y) = (1 + γy/σ)^(−1/γ),
/// or exp(−y/σ) for γ = 0.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Gpd {
    /// Shape γ (> 0 heavy tail, 0 exponential, < 0 bounded).
    pub gamma: f64,
    /// Scale σ > 0.
    pub sigma: f64,
}

/// Relative distance kept from the ends of Grimshaw's search intervals (and from 0).
const GRIMSHAW_EPSILON: f64 = 1e-8;
/// Successive grid points of the root search differ by at most this factor (in |x| or in
/// the distance to the interval end), so sign changes are bracketed finely but cheaply.
const GRID_RATIO: f64 = 3.0;
/// Cap on x·Ȳ in the positive interval; only absurdly heavy tails (γ ≫ 1) have roots beyond.
const RIGHT_SCALED_MAX: f64 = 1e12;
const BRENT_MAX_ITER: usize = 100;
/// Golden-section steps of a dip probe (the bracket shrinks to 0.618^40 ≈ 4e-9 of its width).
const DIP_PROBE_ITER: usize = 40;

impl Gpd {
    /// Maximum-likelihood GPD of `peaks` (all finite and > 0) by Grimshaw's trick.
    ///
    /// With x = γ/σ the likelihood equations reduce to w(x) = u(x)·v(x) − 1 = 0, where
    /// u(x) = 1 + mean ln(1 + xY) and v(x) = mean 1/(1 + xY). Roots are bracketed on a
    /// geometric grid over (−1/Y_max, 0) and (0, 2(Ȳ − Y_min)/Y_min²) and polished by
    /// Brent's method; each root gives γ = u − 1, σ = γ/x. The exponential candidate
    /// (γ = 0, σ = Ȳ) always competes, and the candidate with the highest log-likelihood
    /// wins. Roots with γ ≤ −1 are dropped: below −1 the likelihood is unbounded. So when
    /// the likelihood has no interior maximum (a few peaks from a short bounded tail, where
    /// it climbs towards γ = −1) the exponential candidate wins, which errs towards a
    /// higher threshold.
    ///
    /// Cost: w is wanted at about 55 grid points plus Brent's steps. Near x = 0 bounds from
    /// power sums of the peaks settle most grid points without a pass over them (see
    /// `scan_roots`), which leaves about 35 passes; each is vectorised (`sums.rs`). On the
    /// bundled recording's 500-peak sets that is about 44 µs a fit (Zen 4, AVX-512), against
    /// 190 µs with one `f64::ln_1p` call per peak and pass, for bit-identical results.
    ///
    /// `None` if `peaks` is empty or holds a value that is not finite and positive.
    pub fn fit(peaks: &[f64]) -> Option<Gpd> {
        Gpd::fit_scan(peaks, true)
    }

    /// [`Gpd::fit`], with (`screen`) or without the series bounds near x = 0; the result is
    /// the same either way.
    fn fit_scan(peaks: &[f64], screen: bool) -> Option<Gpd> {
        let (mut lo, mut hi, mut sum) = (f64::INFINITY, 0.0f64, 0.0);
        for &y in peaks {
            if !(y > 0.0 && y.is_finite()) {
                return None;
            }
            lo = lo.min(y);
            hi = hi.max(y);
            sum += y;
        }
        if peaks.is_empty() || !sum.is_finite() {
            return None;
        }
        let mean = sum / peaks.len() as f64;
        let exponential = Gpd {
            gamma: 0.0,
            sigma: mean,
        };
        let mut best = (exponential, exponential.log_likelihood(peaks));
        let series = screen.then(|| series::PowerSums::new(peaks, hi)).flatten();

        // Negative x (γ < 0): s = x·Y_max in (−1, 0). Dense near 0 (light tails) and near
        // −1 (short bounded tails, where Y_max approaches the end point).
        let half = grid_steps(0.5 / GRIMSHAW_EPSILON);
        let near_zero = geometric(GRIMSHAW_EPSILON, 0.5, half).map(|s| -s);
        let near_end = geometric(0.5, GRIMSHAW_EPSILON, half)
            .skip(1)
            .map(|d| d - 1.0);
        let xs = near_zero.chain(near_end).map(|s| s / hi);
        scan_roots(peaks, series.as_ref(), xs, &mut best);

        // Positive x (γ > 0): s = x·Ȳ up to Grimshaw's bound 2(Ȳ − Y_min)Ȳ/Y_min².
        // (The reference code's lower bound 2(Ȳ − Y_min)/(Ȳ·Y_min) is not used: it lies
        // far above the root for ordinary heavy-tailed samples; libspot also starts at ε.)
        let right_max = (2.0 * (mean - lo) * mean / (lo * lo)).min(RIGHT_SCALED_MAX);
        if right_max > GRIMSHAW_EPSILON {
            let steps = grid_steps(right_max / GRIMSHAW_EPSILON);
            let xs = geometric(GRIMSHAW_EPSILON, right_max, steps).map(|s| s / mean);
            scan_roots(peaks, series.as_ref(), xs, &mut best);
        }
        Some(best.0)
    }

    /// Log-likelihood of `peaks` under this GPD: −N ln σ − ΣY/σ for γ = 0, else
    /// −N ln σ − (1 + 1/γ) Σ ln(1 + γY/σ). −∞ when σ ≤ 0 or some 1 + γY/σ ≤ 0.
    pub fn log_likelihood(&self, peaks: &[f64]) -> f64 {
        let (gamma, sigma) = (self.gamma, self.sigma);
        if !(sigma > 0.0 && sigma.is_finite() && gamma.is_finite()) {
            return f64::NEG_INFINITY;
        }
        let n = peaks.len() as f64;
        if gamma == 0.0 {
            return -n * sigma.ln() - peaks.iter().sum::<f64>() / sigma;
        }
        let Some(acc) = sums::ln_1p_sum(peaks, gamma / sigma) else {
            return f64::NEG_INFINITY;
        };
        -n * sigma.ln() - (1.0 + 1.0 / gamma) * acc
    }

    /// The extreme quantile z_q: the score exceeded with probability `q`, given the initial
    /// threshold `t`, `n` observations of which `n_t` exceeded t:
    /// t + (σ/γ)((q·n/N_t)^(−γ) − 1), or t − σ ln(q·n/N_t) for γ = 0.
    pub fn extreme_quantile(&self, t: f64, q: f64, n: u64, n_t: u64) -> f64 {
        let r = q * n as f64 / n_t as f64;
        if self.gamma == 0.0 {
            t - self.sigma * r.ln()
        } else {
            // expm1 keeps (r^(−γ) − 1)/γ accurate when γ is tiny.
            t + self.sigma / self.gamma * (-self.gamma * r.ln()).exp_m1()
        }
    }
}

/// Points of a geometric sequence from `from` to `to` (both included) in `steps` steps.
fn geometric(from: f64, to: f64, steps: usize) -> impl Iterator<Item = f64> {
    let ratio = (to / from).powf(1.0 / steps as f64);
    (0..=steps).map(move |k| {
        if k == steps {
            to
        } else {
            from * ratio.powi(k as i32)
        }
    })
}

/// Steps for a geometric grid spanning the factor `span` with ratio at most [`GRID_RATIO`].
fn grid_steps(span: f64) -> usize {
    (span.ln() / GRID_RATIO.ln()).ceil().clamp(1.0, 64.0) as usize
}

/// w(x) = u(x)·v(x) − 1, computed as A + B + A·B with A = u − 1 and B = v − 1 so that it
/// keeps its relative precision near x = 0 (where it vanishes like x²). NaN if some
/// 1 + xY ≤ 0.
fn grimshaw_w(peaks: &[f64], x: f64) -> f64 {
    let Some((a, b)) = sums::grimshaw_sums(peaks, x) else {
        return f64::NAN;
    };
    let n = peaks.len() as f64;
    let (a, b) = (a / n, b / n);
    a + b + a * b
}

/// Walks the grid `xs`, polishes each sign change of w with Brent's method, and lets every
/// root compete with `best` (a GPD and its log-likelihood). Where |w| dips between two grid
/// points without changing sign, a pair of close roots may hide (a shallow bump of the
/// profile likelihood, seen on short bounded tails): a golden-section probe looks for it.
///
/// Near x = 0 the `series` bounds stand in for w wherever they settle the decision at hand
/// (see [`series`]): w itself is evaluated only where they do not, and at the ends of a
/// bracket, so the scan takes the same decisions and finds the same roots as evaluating w
/// at every grid point.
fn scan_roots(
    peaks: &[f64],
    series: Option<&series::PowerSums>,
    xs: impl Iterator<Item = f64>,
    best: &mut (Gpd, f64),
) {
    let w = |x: f64| grimshaw_w(peaks, x);
    let root = |a: f64, b: f64, wa: f64, wb: f64, best: &mut (Gpd, f64)| {
        if let Some(r) = brent(w, a, b, wa, wb) {
            consider_root(peaks, r, best);
        }
    };
    // The last two grid points where w is finite, oldest first.
    let mut prev: [Option<GridPoint>; 2] = [None, None];
    for x in xs {
        let mut p = match series.and_then(|s| s.w_bounds(x)) {
            Some((lo, hi)) if lo > 0.0 || hi < 0.0 => GridPoint {
                x,
                exact: None,
                lo,
                hi,
            },
            _ => GridPoint::exact(x, w(x)),
        };
        if !p.lo.is_finite() {
            prev = [None, None];
            continue;
        }
        if p.exact == Some(0.0) {
            consider_root(peaks, x, best);
        } else if let Some(p1) = &mut prev[1]
            && p1.nonzero()
        {
            if p1.negative() != p.negative() {
                root(p1.x, x, p1.value(w), p.value(w), best);
            } else if let [Some(p0), Some(p1)] = &mut prev
                && p0.nonzero()
                && p0.negative() == p.negative()
                && smallest_in_the_middle(p0, p1, &mut p, w)
                && let Some((xm, wm)) = probe_dip(w, p0.x, x, p.negative())
            {
                if wm == 0.0 {
                    consider_root(peaks, xm, best);
                } else {
                    root(p0.x, xm, p0.value(w), wm, best);
                    root(xm, x, wm, p.value(w), best);
                }
            }
        }
        prev = [prev[1], Some(p)];
    }
}

/// w at a grid point of [`scan_roots`]: the value [`grimshaw_w`] computes (`exact`, and then
/// `lo` = `hi` = it), or bounds on it that exclude 0.
#[derive(Debug, Clone, Copy)]
struct GridPoint {
    x: f64,
    exact: Option<f64>,
    lo: f64,
    hi: f64,
}

impl GridPoint {
    fn exact(x: f64, w: f64) -> GridPoint {
        GridPoint {
            x,
            exact: Some(w),
            lo: w,
            hi: w,
        }
    }

    fn nonzero(&self) -> bool {
        self.exact != Some(0.0)
    }

    fn negative(&self) -> bool {
        self.hi < 0.0
    }

    /// The bounds on |w|.
    fn abs_bounds(&self) -> (f64, f64) {
        let (a, b) = (self.lo.abs(), self.hi.abs());
        (a.min(b), a.max(b))
    }

    /// w itself, evaluated now if only bounds were known.
    fn value(&mut self, w: impl Fn(f64) -> f64) -> f64 {
        let v = *self.exact.get_or_insert_with(|| w(self.x));
        (self.lo, self.hi) = (v, v);
        v
    }
}

/// |w₁| < min(|w₀|, |w₂|), from the bounds where they settle it, else from w itself.
fn smallest_in_the_middle(
    p0: &mut GridPoint,
    p1: &mut GridPoint,
    p2: &mut GridPoint,
    w: impl Fn(f64) -> f64,
) -> bool {
    let ((lo0, hi0), (lo1, hi1), (lo2, hi2)) = (p0.abs_bounds(), p1.abs_bounds(), p2.abs_bounds());
    if hi1 < lo0 && hi1 < lo2 {
        return true;
    }
    if lo1 >= hi0 || lo1 >= hi2 {
        return false;
    }
    let (w0, w1, w2) = (p0.value(&w), p1.value(&w), p2.value(&w));
    w1.abs() < w0.abs().min(w2.abs())
}

/// Golden-section search on [a, b] for a point where `w` reaches zero or crosses it, given
/// that w is negative (`negative`) or positive at both ends. Returns that point and w there.
fn probe_dip(w: impl Fn(f64) -> f64, a: f64, b: f64, negative: bool) -> Option<(f64, f64)> {
    const INV_PHI: f64 = 0.618_033_988_749_895;
    // g > 0 where w has the other sign; maximise g.
    let g = |x: f64| {
        let wx = w(x);
        (x, wx, if negative { wx } else { -wx })
    };
    let (mut a, mut b) = (a, b);
    let mut c = g(b - INV_PHI * (b - a));
    let mut d = g(a + INV_PHI * (b - a));
    for _ in 0..DIP_PROBE_ITER {
        for (x, wx, gx) in [c, d] {
            if gx >= 0.0 {
                return Some((x, wx));
            }
        }
        if !(c.2.is_finite() && d.2.is_finite()) {
            return None;
        }
        if c.2 > d.2 {
            b = d.0;
            d = c;
            c = g(b - INV_PHI * (b - a));
        } else {
            a = c.0;
            c = d;
            d = g(a + INV_PHI * (b - a));
        }
    }
    None
}

fn consider_root(peaks: &[f64], x: f64, best: &mut (Gpd, f64)) {
    if x == 0.0 {
        return;
    }
    // Every 1 + xY > 0 here: w(x) was finite.
    let gamma = sums::ln_1p_sum(peaks, x).unwrap_or(f64::NAN) / peaks.len() as f64;
    let sigma = gamma / x;
    if !(gamma > -1.0 && gamma != 0.0 && sigma > 0.0 && sigma.is_finite()) {
        return;
    }
    let candidate = Gpd { gamma, sigma };
    let ll = candidate.log_likelihood(peaks);
    if ll > best.1 {
        *best = (candidate, ll);
    }
}

/// Brent–Dekker root of `f` in [a, b], where f(a) = fa and f(b) = fb have opposite signs.
fn brent(f: impl Fn(f64) -> f64, a: f64, b: f64, fa: f64, fb: f64) -> Option<f64> {
    let tol = 1e-12 * a.abs().max(b.abs());
    let (mut a, mut b, mut fa, mut fb) = (a, b, fa, fb);
    let (mut c, mut fc) = (b, fb);
    let (mut d, mut e) = (b - a, b - a);
    for _ in 0..BRENT_MAX_ITER {
        if (fb > 0.0) == (fc > 0.0) {
            c = a;
            fc = fa;
            d = b - a;
            e = d;
        }
        if fc.abs() < fb.abs() {
            (a, b, c) = (b, c, b);
            (fa, fb, fc) = (fb, fc, fb);
        }
        let tol1 = 2.0 * f64::EPSILON * b.abs() + 0.5 * tol;
        let xm = 0.5 * (c - b);
        if xm.abs() <= tol1 || fb == 0.0 {
            return Some(b);
        }
        if e.abs() >= tol1 && fa.abs() > fb.abs() {
            // Inverse quadratic interpolation, or secant when only two points are distinct.
            let s = fb / fa;
            let (mut p, mut q) = if a == c {
                (2.0 * xm * s, 1.0 - s)
            } else {
                let (qa, r) = (fa / fc, fb / fc);
                (
                    s * (2.0 * xm * qa * (qa - r) - (b - a) * (r - 1.0)),
                    (qa - 1.0) * (r - 1.0) * (s - 1.0),
                )
            };
            if p > 0.0 {
                q = -q;
            }
            p = p.abs();
            let min1 = 3.0 * xm * q - (tol1 * q).abs();
            let min2 = (e * q).abs();
            if 2.0 * p < min1.min(min2) {
                e = d;
                d = p / q;
            } else {
                d = xm;
                e = d;
            }
        } else {
            d = xm;
            e = d;
        }
        a = b;
        fa = fb;
        b += if d.abs() > tol1 { d } else { tol1.copysign(xm) };
        fb = f(b);
        if !fb.is_finite() {
            return None;
        }
    }
    Some(b)
}

/// Empirical `p`-quantile of sorted, non-empty `sorted`: linear interpolation between the
/// order statistics around position (len − 1)·p (Hyndman–Fan type 7, numpy's default).
fn quantile_sorted(sorted: &[f64], p: f64) -> f64 {
    let last = sorted.len() - 1;
    let h = last as f64 * p;
    let lo = (h.floor() as usize).min(last);
    let hi = (lo + 1).min(last);
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}

/// The finite values of `scores`, or an error naming how many there were.
fn finite_scores(
    scores: &[f64],
    kind: &'static str,
    needed: usize,
) -> Result<Vec<f64>, ThresholdError> {
    let finite: Vec<f64> = scores.iter().copied().filter(|x| x.is_finite()).collect();
    if finite.len() < needed {
        return Err(ThresholdError::TooFewScores {
            kind,
            needed,
            finite: finite.len(),
            given: scores.len(),
        });
    }
    Ok(finite)
}

fn sorted(values: &[f64]) -> Vec<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_unstable_by(f64::total_cmp);
    sorted
}

fn validated(cfg: &ThresholdConfig) -> Result<(), ThresholdError> {
    cfg.validate()
        .map_err(|(key, reason)| ThresholdError::Config { key, reason })
}

/// Bounded ring of peaks; order does not matter to the fit, only which ones are held.
#[derive(Debug, Clone)]
struct PeakRing {
    buf: Vec<f64>,
    cap: usize,
    next: usize,
}

impl PeakRing {
    fn new(cap: usize) -> Self {
        PeakRing {
            buf: Vec::with_capacity(cap),
            cap,
            next: 0,
        }
    }

    fn push(&mut self, y: f64) {
        if self.buf.len() < self.cap {
            self.buf.push(y);
        } else {
            self.buf[self.next] = y;
            self.next = (self.next + 1) % self.cap;
        }
    }
}

/// SPOT (papers.md §6.3): a GPD tail over a fixed initial threshold t, refitted at every peak.
///
/// n counts every non-alarm finite observation (calibration included) and N_t every peak
/// ever seen, so N_t/n keeps estimating P(X > t) after old peaks leave the bounded buffer;
/// the fit uses the held peaks. The threshold z_q is recomputed at each peak (with the n
/// of that moment), clamped at t, and stays put between peaks.
///
/// Alarms never enter the peaks, as in the paper, so the peaks are the tail censored at
/// z_q: the fit sees a shorter tail than the data has, the threshold drops, more is
/// censored. On stationary exponential scores (q = 1e-4, default buffer) the threshold
/// sank from 4.8 to 3.7 (truth 4.6) and the alarm rate reached ~5 q over 10⁶ samples;
/// with `max_peaks` = 500, ~20 q. Small q, a large buffer or periodic recalibration limit it.
#[derive(Debug, Clone)]
pub struct Spot {
    risk_q: f64,
    min_peaks: usize,
    t: f64,
    peaks: PeakRing,
    n: u64,
    n_t: u64,
    /// Empirical (1 − q) quantile of the calibration values, used below `min_peaks`.
    fallback: f64,
    gpd: Option<Gpd>,
    z: f64,
    alarms: u64,
    ignored: u64,
    /// Peaks added since the GPD was last fitted.
    stale_peaks: usize,
    /// `decluster_frames` (0: no declustering).
    decluster: usize,
    /// The run of scores above t going on, if any (see [`Run`]).
    run: Option<Run>,
}

/// A run of a stream's scores above t (runs declustering, [`ThresholdConfig::decluster_frames`]).
#[derive(Debug, Clone, Copy)]
struct Run {
    /// The largest excess over t of its non-alarm scores.
    max_excess: f64,
    /// Whether one of its scores was an alarm: then none of it becomes a peak.
    alarmed: bool,
    /// Scores in a row at or below t since its last score above t.
    quiet: usize,
    /// Scores since it began.
    len: usize,
}

/// A run ends after at most this many times `decluster_frames` scores (100 at the default
/// 5), even while it goes on: a level that sits above t without alarming (drift) then
/// still adds a peak every 100 scores, and N_t/n does not shrink under a run that never
/// ends, which would lower the threshold when it finally did (a review).
const RUN_CAP_FACTOR: usize = 20;

/// The GPD is refitted once the peaks added since the last fit reach this share of the
/// peaks held (at least one): a 2 % change of the sample moves γ and σ very little, and it
/// makes a peak cost O(1) on average instead of O(`max_peaks`). The threshold itself is
/// recomputed from the current fit at every peak, since n and N_t change every time.
const REFIT_SHARE: f64 = 0.02;

impl Spot {
    /// Calibrates on `scores` (non-finite ones are skipped): t, the initial peaks (the most
    /// recent `max_peaks` if there are more) and the first fit.
    ///
    /// # Errors
    /// An invalid configuration, fewer than [`MIN_CALIBRATION_SCORES`] finite scores, or
    /// all finite scores equal.
    pub fn calibrate(scores: &[f64], cfg: &ThresholdConfig) -> Result<Spot, ThresholdError> {
        validated(cfg)?;
        let finite = finite_scores(scores, "spot", MIN_CALIBRATION_SCORES)?;
        Spot::from_finite(&finite, cfg, "spot", "scores")
    }

    fn from_finite(
        values: &[f64],
        cfg: &ThresholdConfig,
        kind: &'static str,
        what: &'static str,
    ) -> Result<Spot, ThresholdError> {
        let sorted = sorted(values);
        let (first, last) = (sorted[0], sorted[sorted.len() - 1]);
        if first == last {
            return Err(ThresholdError::ConstantScores {
                kind,
                what,
                value: first,
                count: values.len(),
            });
        }
        let t = quantile_sorted(&sorted, cfg.init_level);
        let mut spot = Spot {
            risk_q: cfg.risk_q,
            min_peaks: cfg.min_peaks,
            t,
            peaks: PeakRing::new(cfg.max_peaks),
            n: values.len() as u64,
            n_t: 0,
            fallback: quantile_sorted(&sorted, 1.0 - cfg.risk_q),
            gpd: None,
            z: f64::NAN,
            alarms: 0,
            ignored: 0,
            stale_peaks: 0,
            decluster: cfg.decluster_frames,
            run: None,
        };
        for &x in values.iter().filter(|&&x| x > t) {
            spot.peaks.push(x - t);
            spot.n_t += 1;
        }
        spot.refit();
        tracing::debug!(
            kind,
            t,
            n = spot.n,
            peaks = spot.n_t,
            threshold = spot.z,
            "Threshold calibrated."
        );
        Ok(spot)
    }

    /// Refits the GPD when enough new peaks have arrived, and recomputes the threshold.
    fn peak_added(&mut self) {
        self.stale_peaks += 1;
        let due = ((self.peaks.buf.len() as f64 * REFIT_SHARE) as usize).max(1);
        match self.gpd {
            Some(gpd) if self.stale_peaks < due && self.peaks.buf.len() >= self.min_peaks => {
                self.z = gpd
                    .extreme_quantile(self.t, self.risk_q, self.n, self.n_t)
                    .max(self.t);
            }
            _ => self.refit(),
        }
    }

    fn refit(&mut self) {
        self.stale_peaks = 0;
        if self.peaks.buf.len() < self.min_peaks {
            self.gpd = None;
            self.z = self.fallback;
            return;
        }
        match Gpd::fit(&self.peaks.buf) {
            Some(gpd) => {
                self.gpd = Some(gpd);
                // Clamped at t: below it the GPD says nothing, and t < z keeps peaks possible.
                self.z = gpd
                    .extreme_quantile(self.t, self.risk_q, self.n, self.n_t)
                    .max(self.t);
            }
            // A fit only fails on an infinite excess (scores near f64::MAX): keep the last
            // threshold, or the fallback if there is none yet.
            None if self.gpd.is_none() => self.z = self.fallback,
            None => {}
        }
    }

    /// The current decision threshold: a score above it is an alarm.
    pub fn threshold(&self) -> f64 {
        self.z
    }

    /// The initial threshold t that defines peaks.
    pub fn initial_threshold(&self) -> f64 {
        self.t
    }

    /// The current tail fit; `None` while fewer than `min_peaks` peaks are held.
    pub fn gpd(&self) -> Option<Gpd> {
        self.gpd
    }

    /// Classifies `score` against the current threshold and, unless it is an alarm or not
    /// finite, counts it. Above t it is a peak: stored at once without declustering;
    /// with it, the run it belongs to is stored as one peak (its largest) when the run
    /// ends, unless the run held an alarm ([`ThresholdConfig::decluster_frames`]).
    /// O(1) for normal scores; a peak refits the GPD (O(`max_peaks`)) only when the peaks
    /// added since the last fit reach 2 % of those held. Never allocates.
    pub fn update(&mut self, score: f64) -> Verdict {
        if !score.is_finite() {
            self.ignored += 1;
            return Verdict::Ignored;
        }
        if score > self.z {
            self.alarms += 1;
            if self.decluster > 0 {
                let run = self.run.get_or_insert(Run {
                    max_excess: 0.0,
                    alarmed: true,
                    quiet: 0,
                    len: 0,
                });
                run.alarmed = true;
                run.quiet = 0;
                self.run_step();
            }
            return Verdict::Alarm;
        }
        self.n += 1;
        if score > self.t {
            let excess = score - self.t;
            if self.decluster == 0 {
                self.add_peak(excess);
                return Verdict::Peak;
            }
            let run = self.run.get_or_insert(Run {
                max_excess: excess,
                alarmed: false,
                quiet: 0,
                len: 0,
            });
            run.max_excess = run.max_excess.max(excess);
            run.quiet = 0;
            self.run_step();
            return Verdict::Peak;
        }
        if let Some(run) = &mut self.run {
            run.quiet += 1;
            if run.quiet >= self.decluster {
                self.end_run();
            } else {
                self.run_step();
            }
        }
        Verdict::Normal
    }

    /// Counts a score of the run going on, and ends the run at its length cap.
    fn run_step(&mut self) {
        if let Some(run) = &mut self.run {
            run.len += 1;
            if run.len >= RUN_CAP_FACTOR * self.decluster {
                self.end_run();
            }
        }
    }

    /// Ends the run going on: its largest excess becomes a peak unless it held an alarm.
    fn end_run(&mut self) {
        if let Some(run) = self.run.take()
            && !run.alarmed
            && run.max_excess > 0.0
        {
            self.add_peak(run.max_excess);
        }
    }

    fn add_peak(&mut self, excess: f64) {
        self.peaks.push(excess);
        self.n_t += 1;
        self.peak_added();
    }

    /// The state for reports.
    pub fn snapshot(&self) -> ThresholdSnapshot {
        ThresholdSnapshot {
            kind: ThresholdKind::Spot,
            t: self.t,
            gamma: self.gpd.map(|g| g.gamma),
            sigma: self.gpd.map(|g| g.sigma),
            n: self.n,
            n_peaks: self.n_t,
            peaks_held: self.peaks.buf.len(),
            threshold: self.z,
            drift_mean: None,
            alarms: self.alarms,
            ignored: self.ignored,
        }
    }
}

/// The last `depth` normal scores and their running mean.
#[derive(Debug, Clone)]
struct MeanWindow {
    buf: Vec<f64>,
    next: usize,
    sum: f64,
}

impl MeanWindow {
    /// A full window holding `values` (non-empty).
    fn new(values: &[f64]) -> Self {
        MeanWindow {
            buf: values.to_vec(),
            next: 0,
            sum: values.iter().sum(),
        }
    }

    fn mean(&self) -> f64 {
        self.sum / self.buf.len() as f64
    }

    fn push(&mut self, x: f64) {
        self.sum += x - self.buf[self.next];
        self.buf[self.next] = x;
        self.next += 1;
        if self.next == self.buf.len() {
            self.next = 0;
            // Re-sum once per lap so rounding in the running sum cannot accumulate.
            self.sum = self.buf.iter().sum();
        }
    }
}

/// DSPOT (papers.md §6.4): SPOT on X − M, where M is the mean of the last `dspot_depth`
/// normal scores; alarms do not enter the window. The reported threshold is z_q + M.
#[derive(Debug, Clone)]
pub struct Dspot {
    spot: Spot,
    window: MeanWindow,
}

impl Dspot {
    /// Calibrates on `scores` (non-finite ones are skipped): the first `dspot_depth` fill the
    /// window, every later one becomes a residual X_i − mean(X_{i−d..i}) for SPOT.
    ///
    /// # Errors
    /// An invalid configuration, fewer than `dspot_depth` + [`MIN_CALIBRATION_SCORES`]
    /// finite scores, or all residuals equal.
    pub fn calibrate(scores: &[f64], cfg: &ThresholdConfig) -> Result<Dspot, ThresholdError> {
        validated(cfg)?;
        let d = cfg.dspot_depth;
        let finite = finite_scores(scores, "dspot", d + MIN_CALIBRATION_SCORES)?;
        let mut window = MeanWindow::new(&finite[..d]);
        let residuals: Vec<f64> = finite[d..]
            .iter()
            .map(|&x| {
                let r = x - window.mean();
                window.push(x);
                r
            })
            .collect();
        let spot = Spot::from_finite(
            &residuals,
            cfg,
            "dspot",
            "residuals (score minus the mean of the previous dspot_depth scores)",
        )?;
        Ok(Dspot { spot, window })
    }

    /// The current decision threshold z_q + M.
    pub fn threshold(&self) -> f64 {
        self.spot.z + self.window.mean()
    }

    /// The drift estimate M: the mean of the last `dspot_depth` normal scores.
    pub fn drift_mean(&self) -> f64 {
        self.window.mean()
    }

    /// The SPOT that runs on the residuals.
    pub fn residual_spot(&self) -> &Spot {
        &self.spot
    }

    /// Like [`Spot::update`] on `score − M`; a finite non-alarm score then enters the window.
    pub fn update(&mut self, score: f64) -> Verdict {
        if !score.is_finite() {
            self.spot.ignored += 1;
            return Verdict::Ignored;
        }
        let verdict = self.spot.update(score - self.window.mean());
        if matches!(verdict, Verdict::Normal | Verdict::Peak) {
            self.window.push(score);
        }
        verdict
    }

    /// The state for reports (t, γ, σ are those of the residual SPOT).
    pub fn snapshot(&self) -> ThresholdSnapshot {
        ThresholdSnapshot {
            kind: ThresholdKind::Dspot,
            threshold: self.threshold(),
            drift_mean: Some(self.window.mean()),
            ..self.spot.snapshot()
        }
    }
}

/// A static threshold: an empirical quantile of the calibration scores; it never moves.
#[derive(Debug, Clone)]
pub struct Quantile {
    threshold: f64,
    n: u64,
    alarms: u64,
    ignored: u64,
}

impl Quantile {
    /// The `cfg.quantile` empirical quantile of the finite `scores`.
    ///
    /// # Errors
    /// An invalid configuration or fewer than [`MIN_CALIBRATION_SCORES`] finite scores.
    pub fn calibrate(scores: &[f64], cfg: &ThresholdConfig) -> Result<Quantile, ThresholdError> {
        validated(cfg)?;
        let finite = finite_scores(scores, "quantile", MIN_CALIBRATION_SCORES)?;
        Ok(Quantile {
            threshold: quantile_sorted(&sorted(&finite), cfg.quantile),
            n: finite.len() as u64,
            alarms: 0,
            ignored: 0,
        })
    }

    /// The fixed threshold.
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// Alarm above the threshold, else normal; non-finite scores are ignored. O(1).
    pub fn update(&mut self, score: f64) -> Verdict {
        if !score.is_finite() {
            self.ignored += 1;
            Verdict::Ignored
        } else if score > self.threshold {
            self.alarms += 1;
            Verdict::Alarm
        } else {
            self.n += 1;
            Verdict::Normal
        }
    }

    /// The state for reports (t = threshold, no GPD).
    pub fn snapshot(&self) -> ThresholdSnapshot {
        ThresholdSnapshot {
            kind: ThresholdKind::Quantile,
            t: self.threshold,
            gamma: None,
            sigma: None,
            n: self.n,
            n_peaks: 0,
            peaks_held: 0,
            threshold: self.threshold,
            drift_mean: None,
            alarms: self.alarms,
            ignored: self.ignored,
        }
    }
}

/// A calibrated threshold of any kind.
#[derive(Debug, Clone)]
pub enum Threshold {
    Spot(Spot),
    Dspot(Dspot),
    Quantile(Quantile),
}

impl Threshold {
    /// The current decision threshold: a score above it is an alarm. Read it before
    /// [`Threshold::update`] to know what that score is compared against.
    pub fn threshold(&self) -> f64 {
        match self {
            Threshold::Spot(s) => s.threshold(),
            Threshold::Dspot(s) => s.threshold(),
            Threshold::Quantile(s) => s.threshold(),
        }
    }

    /// Classifies one score and updates the state unless it is an alarm or not finite.
    pub fn update(&mut self, score: f64) -> Verdict {
        match self {
            Threshold::Spot(s) => s.update(score),
            Threshold::Dspot(s) => s.update(score),
            Threshold::Quantile(s) => s.update(score),
        }
    }

    /// Which kind this is.
    pub fn kind(&self) -> ThresholdKind {
        match self {
            Threshold::Spot(_) => ThresholdKind::Spot,
            Threshold::Dspot(_) => ThresholdKind::Dspot,
            Threshold::Quantile(_) => ThresholdKind::Quantile,
        }
    }

    /// The state for reports.
    pub fn snapshot(&self) -> ThresholdSnapshot {
        match self {
            Threshold::Spot(s) => s.snapshot(),
            Threshold::Dspot(s) => s.snapshot(),
            Threshold::Quantile(s) => s.snapshot(),
        }
    }
}

/// A threshold's state for reports.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ThresholdSnapshot {
    pub kind: ThresholdKind,
    /// Initial threshold t (DSPOT: on the residual score − M; quantile: the threshold).
    pub t: f64,
    /// GPD shape; `None` on the empirical fallback and for the quantile kind.
    pub gamma: Option<f64>,
    /// GPD scale; `None` like `gamma`.
    pub sigma: Option<f64>,
    /// Finite non-alarm observations, calibration included.
    pub n: u64,
    /// Peaks ever seen (N_t), calibration included.
    pub n_peaks: u64,
    /// Peaks held for the fit (at most `max_peaks`).
    pub peaks_held: usize,
    /// The decision threshold on the score.
    pub threshold: f64,
    /// DSPOT drift estimate M.
    pub drift_mean: Option<f64>,
    /// Alarms since calibration.
    pub alarms: u64,
    /// Non-finite scores skipped since calibration.
    pub ignored: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn exponential(rng: &mut Rng, n: usize, lambda: f64) -> Vec<f64> {
        (0..n)
            .map(|_| -(1.0 - rng.next_f64()).ln() / lambda)
            .collect()
    }

    /// GPD(γ, σ) by inverse CDF; γ = 0.25 is Lomax with shape 4.
    fn gpd_sample(rng: &mut Rng, n: usize, gamma: f64, sigma: f64) -> Vec<f64> {
        (0..n)
            .map(|_| sigma / gamma * ((1.0 - rng.next_f64()).powf(-gamma) - 1.0))
            .collect()
    }

    fn gaussian(rng: &mut Rng) -> f64 {
        let (u1, u2) = (1.0 - rng.next_f64(), rng.next_f64());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// The defaults with `min_peaks` = 10 and no declustering (every peak alone, the
    /// SPOT paper's independent scores), which the tests below were written around.
    fn cfg(kind: ThresholdKind) -> ThresholdConfig {
        ThresholdConfig {
            kind,
            min_peaks: 10,
            decluster_frames: 0,
            ..ThresholdConfig::default()
        }
    }

    /// Held-out scores like those of the operator's trial (an 8-metric model, 2,368
    /// held-out rows): most near 3, 47 of them in a heavy tail up to 84 (t ≈ 5 leaves 48
    /// peaks, under `min_peaks` = 50), so the threshold starts on the empirical fallback
    /// (71.4 here; 84.1 in the trial).
    fn heavy_tailed_calibration(rng: &mut Rng) -> Vec<f64> {
        let mut v: Vec<f64> = (0..2321).map(|_| 1.0 + 4.0 * rng.next_f64()).collect();
        // A Pareto tail (γ = 1): 5 + 0.85·(1/(1 − u) − 1) at u = (i + ½)/47, up to about 84.
        v.extend((0..47).map(|i| {
            let u = (f64::from(i) + 0.5) / 47.0;
            5.0 + 0.85 * (1.0 / (1.0 - u) - 1.0)
        }));
        v
    }

    /// Each score the mean of the last 5 frames' scores (the agent's `smooth_frames`).
    fn smoothed(frames: &[f64]) -> Vec<f64> {
        (0..frames.len())
            .map(|i| {
                let w = &frames[i.saturating_sub(4)..=i];
                w.iter().sum::<f64>() / w.len() as f64
            })
            .collect()
    }

    /// Alarms and the final threshold of SPOT (defaults, `decluster_frames` as given) on
    /// `frames`' smoothed scores.
    fn spot_on(frames: &[f64], decluster_frames: usize) -> (Vec<usize>, f64, f64) {
        let cfg = ThresholdConfig {
            decluster_frames,
            ..ThresholdConfig::default()
        };
        let mut spot = Spot::calibrate(&heavy_tailed_calibration(&mut Rng::new(3)), &cfg).unwrap();
        let start = spot.threshold();
        let alarms = smoothed(frames)
            .iter()
            .enumerate()
            .filter(|&(_, &x)| spot.update(x).is_alarm())
            .map(|(i, _)| i)
            .collect();
        (alarms, start, spot.threshold())
    }

    /// The operator's trial: a fault scoring just above every held-out score (90 against
    /// 84) never alarmed, because the mean of 5 frames climbs into it below the threshold:
    /// those scores were peaks, the 50th peak brought the first GPD fit, on the fault's
    /// own climb, and each fault frame then fed the tail (84 → 51,538). Declustered, the
    /// climb and the fault are one run with an alarm in it: nothing of it is learnt.
    #[test]
    fn the_climb_into_a_fault_does_not_teach_the_threshold() {
        let mut frames = vec![3.0; 25];
        frames.extend([90.0; 20]);
        frames.extend([3.0; 30]);
        let (alarms, start, end) = spot_on(&frames, 5);
        assert!(!alarms.is_empty() && alarms[0] < 30, "{alarms:?}");
        assert_eq!(end, start, "the threshold learnt the fault");
        // The paper's SPOT (every peak alone) on the same scores: the failure.
        let (alarms, start, end) = spot_on(&frames, 0);
        assert!(alarms.is_empty(), "{alarms:?}");
        assert!(end > 10.0 * start, "{start} -> {end}");
    }

    /// The operator's trial: a one-frame glitch, then a fault at row 300 that was never
    /// alarmed (the glitch's five smoothed scores were five peaks in a row that sent the
    /// threshold from 84 to 2,394). Declustered, the glitch is one peak.
    #[test]
    fn a_glitch_is_one_peak_and_leaves_the_next_fault_visible() {
        let mut frames = vec![3.0; 400];
        frames[50] = 150.0;
        frames[300..320].fill(120.0);
        let (alarms, start, end) = spot_on(&frames, 5);
        assert!(
            alarms.iter().any(|&i| (300..330).contains(&i)),
            "{alarms:?}"
        );
        assert!(end < 2.0 * start, "{start} -> {end}");
        let (alarms, ..) = spot_on(&frames, 0);
        assert!(
            !alarms.iter().any(|&i| (300..330).contains(&i)),
            "{alarms:?}"
        );
    }

    /// A level that sits above t without alarming (drift) is cut into runs of 100 scores
    /// (20 × `decluster_frames`): it adds a peak now and then instead of none until it
    /// ends (a review: N_t/n then shrank under a run that never ended).
    #[test]
    fn a_run_that_goes_on_adds_a_peak_every_hundred_scores() {
        let scores: Vec<f64> = (0..100).map(|i| ((i * 37) % 100) as f64).collect();
        let cfg = ThresholdConfig {
            decluster_frames: 5,
            min_peaks: 10,
            ..ThresholdConfig::default()
        };
        let mut spot = Spot::calibrate(&scores, &cfg).unwrap();
        let level = spot.initial_threshold() + 0.5;
        for _ in 0..1000 {
            assert_ne!(spot.update(level), Verdict::Alarm);
        }
        assert_eq!(spot.snapshot().peaks_held, 2 + 10);
    }

    /// Runs declustering by hand: a run is one peak, its largest, stored when
    /// `decluster_frames` scores in a row have been at or below t; a run with an alarm in
    /// it stores nothing.
    #[test]
    fn a_run_is_one_peak_its_largest_and_an_alarmed_run_none() {
        let scores: Vec<f64> = (0..100).map(|i| ((i * 37) % 100) as f64).collect();
        let cfg = ThresholdConfig {
            decluster_frames: 3,
            min_peaks: 10,
            ..ThresholdConfig::default()
        };
        let mut spot = Spot::calibrate(&scores, &cfg).unwrap();
        let t = spot.initial_threshold();
        let held = |s: &Spot| s.snapshot().peaks_held;
        assert_eq!(held(&spot), 2);
        for x in [t + 0.5, t + 1.5, 10.0, t + 1.0, 10.0, 10.0] {
            assert_ne!(spot.update(x), Verdict::Alarm);
        }
        assert_eq!(
            held(&spot),
            2,
            "the run has not ended: two quiet scores of three"
        );
        spot.update(10.0);
        assert_eq!(held(&spot), 3);
        assert!(spot.peaks.buf.contains(&1.5), "{:?}", spot.peaks.buf);
        let z = spot.threshold();
        for x in [t + 0.2, z + 5.0, t + 0.3, 1.0, 1.0, 1.0, 1.0] {
            spot.update(x);
        }
        assert_eq!(held(&spot), 3, "a run with an alarm in it");
        assert_eq!(spot.snapshot().alarms, 1);
        // An alarm alone opens a run too: the decay after it is not learnt.
        for x in [z + 5.0, t + 0.4, 1.0, 1.0, 1.0] {
            spot.update(x);
        }
        assert_eq!(held(&spot), 3);
    }

    fn assert_local_max(peaks: &[f64], fit: Gpd) {
        let ll = fit.log_likelihood(peaks);
        for (dg, ds) in [(1e-3, 1.0), (-1e-3, 1.0), (0.0, 1.001), (0.0, 0.999)] {
            let other = Gpd {
                gamma: fit.gamma + dg,
                sigma: fit.sigma * ds,
            };
            assert!(
                other.log_likelihood(peaks) <= ll,
                "{other:?} beats the fit {fit:?}"
            );
        }
    }

    #[test]
    fn exponential_peaks_fit_gamma_near_zero_and_sigma_one_over_lambda() {
        let peaks = exponential(&mut Rng::new(1), 5000, 2.0);
        let fit = Gpd::fit(&peaks).unwrap();
        eprintln!("exponential(2), 5000 peaks: {fit:?}");
        assert!(fit.gamma.abs() < 0.1, "{fit:?}");
        assert!((fit.sigma - 0.5).abs() < 0.05, "{fit:?}");
        assert_local_max(&peaks, fit);
    }

    #[test]
    fn lomax_peaks_fit_positive_gamma() {
        let peaks = gpd_sample(&mut Rng::new(2), 5000, 0.25, 1.0);
        let fit = Gpd::fit(&peaks).unwrap();
        eprintln!("GPD(0.25, 1), 5000 peaks: {fit:?}");
        assert!(fit.gamma > 0.1, "{fit:?}");
        assert!((fit.gamma - 0.25).abs() < 0.05, "{fit:?}");
        assert!((fit.sigma - 1.0).abs() < 0.1, "{fit:?}");
        assert_local_max(&peaks, fit);
        // The root x* = γ/σ lies far below the reference code's lower bound of the
        // positive interval, 2(Ȳ − Y_min)/(Ȳ·Y_min), which is why that bound is not used.
        let mean = peaks.iter().sum::<f64>() / peaks.len() as f64;
        let min = peaks.iter().copied().fold(f64::INFINITY, f64::min);
        assert!(fit.gamma / fit.sigma < 2.0 * (mean - min) / (mean * min));
    }

    #[test]
    fn bounded_tail_peaks_fit_negative_gamma() {
        let peaks = gpd_sample(&mut Rng::new(3), 5000, -0.3, 1.0);
        let fit = Gpd::fit(&peaks).unwrap();
        eprintln!("GPD(-0.3, 1), 5000 peaks: {fit:?}");
        assert!((fit.gamma + 0.3).abs() < 0.05, "{fit:?}");
        assert!((fit.sigma - 1.0).abs() < 0.1, "{fit:?}");
        assert_local_max(&peaks, fit);
    }

    /// Best interior local maximum of the profile log-likelihood
    /// p(x) = −N(ln(γ(x)/x) + 1 + γ(x)), γ(x) = mean ln(1 + xY), on a dense grid of x
    /// (the γ = 0 candidate included), as (log-likelihood, γ, σ).
    fn profile_grid_max(peaks: &[f64]) -> (f64, f64, f64) {
        let n = peaks.len() as f64;
        let hi = peaks.iter().copied().fold(0.0, f64::max);
        let mean = peaks.iter().sum::<f64>() / n;
        const K: usize = 20_000;
        let left = (0..K).map(|k| (-1.0 + (k as f64 + 0.5) / K as f64) / hi);
        let right = (0..K).map(|k| 1e-8 * 1e20f64.powf(k as f64 / K as f64) / mean);
        let profile: Vec<(f64, f64, f64)> = left
            .chain(right)
            .map(|x| {
                let g = peaks.iter().map(|&y| (x * y).ln_1p()).sum::<f64>() / n;
                let s = g / x;
                (-n * (s.ln() + 1.0 + g), g, s)
            })
            .collect();
        let mut best = (-n * (1.0 + mean.ln()), 0.0, mean);
        for w in profile.windows(3) {
            if w[1].0 > w[0].0 && w[1].0 >= w[2].0 && w[1].1 > -1.0 && w[1].0 > best.0 {
                best = w[1];
            }
        }
        best
    }

    #[test]
    fn fit_is_at_least_as_good_as_a_brute_force_profile_search() {
        let mut rng = Rng::new(11);
        for case in 0..24 {
            let n = [10, 20, 40, 100][case % 4];
            let peaks: Vec<f64> = match case / 4 % 3 {
                0 => exponential(&mut rng, n, 1.0),
                1 => gpd_sample(&mut rng, n, 0.5, 1.0),
                _ => gpd_sample(&mut rng, n, -0.7, 1.0),
            };
            let fit = Gpd::fit(&peaks).unwrap();
            let (grid_ll, g, s) = profile_grid_max(&peaks);
            assert!(
                fit.log_likelihood(&peaks) >= grid_ll - 1e-9 * grid_ll.abs().max(1.0),
                "case {case}: {fit:?} loses to the grid's ({g}, {s})"
            );
        }
    }

    /// Peak sets of many shapes and sizes: exponential, heavy and bounded GPD tails, tails
    /// near γ = −1 as SPOT sees them on the bundled recording, uniform, nearly exponential
    /// (where w vanishes like x³ at 0), ties, tiny and huge scales, and sliding windows of
    /// one stream as SPOT's ring holds them.
    fn peak_sets() -> Vec<Vec<f64>> {
        let mut rng = Rng::new(31);
        let mut sets = Vec::new();
        for (case, &n) in [16usize, 17, 50, 99, 100, 237, 500]
            .iter()
            .cycle()
            .take(56)
            .enumerate()
        {
            let mut peaks = match case % 8 {
                0 => exponential(&mut rng, n, 0.02),
                1 => gpd_sample(&mut rng, n, 0.5, 3.0),
                2 => gpd_sample(&mut rng, n, -0.9, 185.0),
                3 => gpd_sample(&mut rng, n, -0.3, 1.0),
                4 => (0..n).map(|_| 1e-6 + rng.next_f64()).collect(),
                5 => gpd_sample(&mut rng, n, 1e-3, 1.0),
                6 => (0..n).map(|i| 1.0 + (i % 3) as f64).collect(),
                _ => gpd_sample(&mut rng, n, 2.0, 1e-200),
            };
            if case % 5 == 4 {
                peaks.iter_mut().for_each(|y| *y *= 1e200);
            }
            sets.push(peaks);
        }
        let stream = gpd_sample(&mut rng, 1200, -0.85, 180.0);
        sets.extend(
            (0..700)
                .step_by(10)
                .map(|start| stream[start..start + 500].to_vec()),
        );
        sets
    }

    #[test]
    fn screened_fit_matches_the_full_scan_bit_for_bit() {
        for (i, peaks) in peak_sets().iter().enumerate() {
            let (screened, full) = (
                Gpd::fit(peaks).unwrap(),
                Gpd::fit_scan(peaks, false).unwrap(),
            );
            assert_eq!(
                (screened.gamma.to_bits(), screened.sigma.to_bits()),
                (full.gamma.to_bits(), full.sigma.to_bits()),
                "set {i} ({} peaks): {screened:?} vs {full:?}",
                peaks.len()
            );
        }
    }

    #[test]
    fn fit_matches_the_old_per_peak_loop() {
        // The old fit: every grid point evaluated, one f64::ln_1p per peak and pass.
        let old = |peaks: &[f64]| {
            sums::PLAIN.with(|p| p.set(true));
            let fit = Gpd::fit_scan(peaks, false).unwrap();
            sums::PLAIN.with(|p| p.set(false));
            fit
        };
        let exact = sums::tests::sums_are_exact();
        eprintln!("fit bit for bit like the old loop: {exact}");
        for (i, peaks) in peak_sets().iter().enumerate() {
            let (new, old) = (Gpd::fit(peaks).unwrap(), old(peaks));
            if exact {
                assert_eq!(
                    (new.gamma.to_bits(), new.sigma.to_bits()),
                    (old.gamma.to_bits(), old.sigma.to_bits()),
                    "set {i}: {new:?} vs {old:?}"
                );
            } else {
                let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs());
                assert!(
                    close(new.gamma, old.gamma) && close(new.sigma, old.sigma),
                    "set {i}: {new:?} vs {old:?}"
                );
            }
        }
    }

    #[test]
    fn series_bounds_hold_the_computed_w() {
        let (mut checked, mut settled) = (0usize, 0usize);
        let mut widest = 0.0f64;
        for peaks in peak_sets() {
            let hi = peaks.iter().copied().fold(0.0, f64::max);
            let series = series::PowerSums::new(&peaks, hi).unwrap();
            let ts = (0..=40).map(|k| 0.5 * 1e-9f64.powf(k as f64 / 40.0));
            for t in ts.chain([0.49, 0.3, 0.1]) {
                for x in [t / hi, -t / hi] {
                    let (lo, up) = series.w_bounds(x).unwrap();
                    let w = grimshaw_w(&peaks, x);
                    assert!(
                        lo <= w && w <= up,
                        "x {x:e}: {w:e} outside [{lo:e}, {up:e}]"
                    );
                    checked += 1;
                    settled += usize::from(lo > 0.0 || up < 0.0);
                    widest = widest.max((up - lo) / w.abs());
                }
            }
            assert_eq!(series.w_bounds(0.51 / hi), None);
        }
        eprintln!("{settled} of {checked} bounds exclude 0; widest relative to |w|: {widest:e}");
        assert!(settled * 10 >= checked * 9, "{settled} of {checked}");
    }

    #[test]
    fn log_likelihood_matches_hand_computation() {
        let y = [1.0, 2.0, 3.0];
        // γ = 0 at σ = Ȳ = 2: −3 ln 2 − 6/2 = −3(1 + ln 2).
        let exp = Gpd {
            gamma: 0.0,
            sigma: 2.0,
        };
        assert!((exp.log_likelihood(&y) - -5.079_441_541_679_836).abs() < 1e-12);
        assert!((exp.log_likelihood(&y) + 3.0 * (1.0 + 2f64.ln())).abs() < 1e-12);
        // γ = 0.5, σ = 1: −0 − 3(ln 1.5 + ln 2 + ln 2.5) = −3 ln 7.5.
        let heavy = Gpd {
            gamma: 0.5,
            sigma: 1.0,
        };
        assert!((heavy.log_likelihood(&y) - -6.044_709_061_626_794).abs() < 1e-12);
        // Outside the support (1 + γY/σ ≤ 0) or σ ≤ 0: −∞.
        let short = Gpd {
            gamma: -1.0,
            sigma: 2.0,
        };
        assert_eq!(short.log_likelihood(&y), f64::NEG_INFINITY);
        let zero = Gpd {
            gamma: 0.1,
            sigma: 0.0,
        };
        assert_eq!(zero.log_likelihood(&y), f64::NEG_INFINITY);
    }

    #[test]
    fn extreme_quantile_matches_hand_computation() {
        // q·n/N_t = 1e-3 · 1000 / 10 = 0.1.
        let exp = Gpd {
            gamma: 0.0,
            sigma: 2.0,
        };
        // 1 − 2 ln 0.1
        assert!((exp.extreme_quantile(1.0, 1e-3, 1000, 10) - 5.605_170_185_988_091).abs() < 1e-12);
        let heavy = Gpd {
            gamma: 0.5,
            sigma: 1.0,
        };
        // 1 + 2(0.1^−0.5 − 1)
        assert!(
            (heavy.extreme_quantile(1.0, 1e-3, 1000, 10) - 5.324_555_320_336_759).abs() < 1e-12
        );
        let almost_exp = Gpd {
            gamma: 1e-12,
            sigma: 2.0,
        };
        assert!(
            (almost_exp.extreme_quantile(1.0, 1e-3, 1000, 10) - 5.605_170_185_988_091).abs() < 1e-9
        );
    }

    #[test]
    fn spot_on_exponential_scores_matches_the_true_quantile_and_risk() {
        let mut rng = Rng::new(4);
        let q = 1e-3;
        let cfg = ThresholdConfig {
            risk_q: q,
            max_peaks: 500,
            ..cfg(ThresholdKind::Spot)
        };
        let mut spot = Spot::calibrate(&exponential(&mut rng, 20_000, 2.0), &cfg).unwrap();
        let truth = (1.0 / q).ln() / 2.0;
        let snap = spot.snapshot();
        eprintln!("SPOT on 20000 exponential(2), q = 1e-3: {snap:?}, true quantile {truth}");
        assert_eq!(snap.n_peaks, 400);
        assert!((spot.threshold() - truth).abs() / truth < 0.1);
        // 20000 more: about q·20000 = 20 alarms. (Alarms are censored from the peaks, which
        // pulls the threshold down over long runs; see `Spot`.)
        let alarms = exponential(&mut rng, 20_000, 2.0)
            .into_iter()
            .filter(|&x| spot.update(x).is_alarm())
            .count();
        eprintln!(
            "{alarms} alarms in 20000 (expected 20); now {:?}",
            spot.snapshot()
        );
        assert!((7..=60).contains(&alarms), "{alarms}");
    }

    #[test]
    fn spot_on_lomax_scores_fits_positive_gamma() {
        let scores = gpd_sample(&mut Rng::new(5), 20_000, 0.25, 1.0);
        let spot = Spot::calibrate(&scores, &cfg(ThresholdKind::Spot)).unwrap();
        eprintln!("SPOT on 20000 GPD(0.25, 1): {:?}", spot.snapshot());
        assert!(spot.gpd().unwrap().gamma > 0.1);
    }

    #[test]
    fn alarms_and_non_finite_scores_leave_the_state_unchanged() {
        let mut rng = Rng::new(6);
        let scores = exponential(&mut rng, 2000, 1.0);
        for kind in [
            ThresholdKind::Spot,
            ThresholdKind::Dspot,
            ThresholdKind::Quantile,
        ] {
            let mut th = cfg(kind).build(&scores).unwrap();
            let before = th.snapshot();
            assert_eq!(th.update(1e9), Verdict::Alarm);
            for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                assert_eq!(th.update(bad), Verdict::Ignored);
            }
            let after = th.snapshot();
            assert_eq!(th.threshold().to_bits(), before.threshold.to_bits());
            assert_eq!(
                after,
                ThresholdSnapshot {
                    alarms: before.alarms + 1,
                    ignored: before.ignored + 3,
                    ..before
                },
                "{kind:?}"
            );
        }
    }

    /// 0.001·i + N(0, 0.01²), with +5 at index 4000.
    fn ramp_with_spike(seed: u64) -> Vec<f64> {
        let mut rng = Rng::new(seed);
        let mut x: Vec<f64> = (0..5000)
            .map(|i| 0.001 * i as f64 + 0.01 * gaussian(&mut rng))
            .collect();
        x[4000] += 5.0;
        x
    }

    /// Calibrates on the first 2000 points of `x`, streams the rest, returns alarm indices.
    fn ramp_alarms(kind: ThresholdKind, x: &[f64]) -> (Vec<usize>, ThresholdSnapshot) {
        let mut th = cfg(kind).build(&x[..2000]).unwrap();
        let alarms = (2000..x.len())
            .filter(|&i| th.update(x[i]).is_alarm())
            .collect();
        (alarms, th.snapshot())
    }

    #[test]
    fn dspot_on_a_ramp_alarms_only_at_the_spike() {
        let x = ramp_with_spike(101);
        let (alarms, snap) = ramp_alarms(ThresholdKind::Dspot, &x);
        eprintln!("DSPOT on the ramp: {snap:?}");
        assert_eq!(alarms, vec![4000]);
        // The threshold followed the drift: M ≈ 0.001·(4999 − 24.5).
        assert!((snap.drift_mean.unwrap() - 4.9745).abs() < 0.01);
        // Over more draws the spike is always caught and false alarms stay rare (SPOT's
        // small-sample tail fit, not the drift, causes them: ~40 calibration peaks).
        let mut false_alarms = 0;
        for seed in 102..=110 {
            let (alarms, _) = ramp_alarms(ThresholdKind::Dspot, &ramp_with_spike(seed));
            assert!(alarms.contains(&4000), "seed {seed}");
            false_alarms += alarms.len() - 1;
        }
        eprintln!("DSPOT false alarms over 9 more ramps of 3000 streamed points: {false_alarms}");
        assert!(false_alarms <= 20, "{false_alarms}");
    }

    #[test]
    fn spot_on_a_ramp_alarms_on_the_drifted_tail() {
        let (alarms, _) = ramp_alarms(ThresholdKind::Spot, &ramp_with_spike(101));
        eprintln!(
            "SPOT on the ramp: {} alarms, first at {:?}",
            alarms.len(),
            alarms.first()
        );
        assert!(alarms.len() > 2900, "{}", alarms.len());
    }

    #[test]
    fn falls_back_to_the_empirical_quantile_below_min_peaks() {
        // 0, 1, …, 99 in a scrambled order: t = 0.98 quantile = 97.02, peaks 98 and 99.
        let scores: Vec<f64> = (0..100).map(|i| ((i * 37) % 100) as f64).collect();
        let mut spot = Spot::calibrate(&scores, &cfg(ThresholdKind::Spot)).unwrap();
        assert!((spot.initial_threshold() - 97.02).abs() < 1e-9);
        // Empirical 1 − 1e-4 quantile: 98 + 0.9901·(99 − 98).
        let fallback = 98.9901;
        assert!((spot.threshold() - fallback).abs() < 1e-9);
        assert_eq!(spot.gpd(), None);
        let mut rng = Rng::new(8);
        for held in 3..=10 {
            let v = 97.1 + 1.5 * rng.next_f64();
            assert_eq!(spot.update(v), Verdict::Peak);
            assert_eq!(spot.snapshot().peaks_held, held);
            if held < 10 {
                assert_eq!(spot.threshold(), spot.fallback);
            }
        }
        let fit = spot.gpd().expect("fitted at min_peaks");
        eprintln!("after 10 peaks: {:?}", spot.snapshot());
        assert!(spot.threshold() != fallback && spot.threshold() >= spot.initial_threshold());
        assert!(fit.sigma > 0.0);
    }

    #[test]
    fn peak_ring_overwrites_the_oldest() {
        let mut ring = PeakRing::new(3);
        for y in 1..=5 {
            ring.push(y as f64);
        }
        let mut held = ring.buf.clone();
        held.sort_by(f64::total_cmp);
        assert_eq!(held, vec![3.0, 4.0, 5.0]);
        assert_eq!(ring.buf.capacity(), 3);
    }

    #[test]
    fn peak_buffer_never_exceeds_max_peaks_nor_reallocates() {
        let mut rng = Rng::new(9);
        let cfg = ThresholdConfig {
            max_peaks: 20,
            ..cfg(ThresholdKind::Spot)
        };
        let mut spot = Spot::calibrate(&exponential(&mut rng, 5000, 1.0), &cfg).unwrap();
        assert_eq!(spot.snapshot().peaks_held, 20);
        let ptr = spot.peaks.buf.as_ptr();
        let mut peaks = 0;
        for x in exponential(&mut rng, 20_000, 1.0) {
            peaks += usize::from(spot.update(x) == Verdict::Peak);
            assert!(spot.snapshot().peaks_held <= 20);
        }
        assert!(peaks > 100);
        assert_eq!(spot.snapshot().n_peaks, 100 + peaks as u64);
        assert_eq!(spot.peaks.buf.as_ptr(), ptr);
        assert_eq!(spot.peaks.buf.capacity(), 20);
    }

    #[test]
    fn config_validation_names_the_key() {
        assert_eq!(ThresholdConfig::default().validate(), Ok(()));
        type Edit = fn(&mut ThresholdConfig);
        let cases: [(Edit, &str); 14] = [
            (
                |c| c.decluster_frames = MAX_DECLUSTER_FRAMES + 1,
                "decluster_frames",
            ),
            (|c| c.risk_q = 0.0, "risk_q"),
            (|c| c.risk_q = 1.0, "risk_q"),
            (|c| c.risk_q = f64::NAN, "risk_q"),
            (|c| c.risk_q = 0.05, "risk_q"),
            (|c| c.init_level = 0.0, "init_level"),
            (|c| c.init_level = 1.0, "init_level"),
            (|c| c.min_peaks = 0, "min_peaks"),
            (|c| c.max_peaks = 5, "max_peaks"),
            (|c| c.max_peaks = usize::MAX, "max_peaks"),
            (|c| c.dspot_depth = 0, "dspot_depth"),
            (|c| c.quantile = 0.0, "quantile"),
            (|c| c.quantile = 1.0, "quantile"),
            (|c| c.quantile = f64::INFINITY, "quantile"),
        ];
        for (edit, key) in cases {
            let mut c = ThresholdConfig::default();
            edit(&mut c);
            assert_eq!(c.validate().unwrap_err().0, key, "{c:?}");
            let err = c.build(&[1.0; 100]).unwrap_err();
            assert!(matches!(err, ThresholdError::Config { key: k, .. } if k == key));
        }
    }

    #[test]
    fn config_parses_from_toml_and_rejects_unknown_keys() {
        let c: ThresholdConfig = toml::from_str("kind = \"dspot\"\ndspot_depth = 20\n").unwrap();
        assert_eq!(c.kind, ThresholdKind::Dspot);
        assert_eq!(c.dspot_depth, 20);
        assert_eq!(c.risk_q, 1e-4);
        assert!(toml::from_str::<ThresholdConfig>("riskq = 0.1\n").is_err());
        assert!(toml::from_str::<ThresholdConfig>("kind = \"pot\"\n").is_err());
    }

    #[test]
    fn degenerate_calibration_errors_instead_of_panicking() {
        let spot = cfg(ThresholdKind::Spot);
        let dspot = cfg(ThresholdKind::Dspot);
        let err = spot.build(&[3.0; 100]).unwrap_err();
        assert!(matches!(
            err,
            ThresholdError::ConstantScores { count: 100, .. }
        ));
        assert!(err.to_string().contains("all equal (3)"), "{err}");
        assert!(matches!(
            dspot.build(&[3.0; 100]).unwrap_err(),
            ThresholdError::ConstantScores { count: 50, .. }
        ));
        // A static quantile of constant scores is just that constant.
        let q = cfg(ThresholdKind::Quantile).build(&[3.0; 100]).unwrap();
        assert_eq!(q.threshold(), 3.0);

        let err = spot.build(&[1.0, 2.0, 3.0]).unwrap_err();
        assert_eq!(
            err,
            ThresholdError::TooFewScores {
                kind: "spot",
                needed: 50,
                finite: 3,
                given: 3
            }
        );
        assert!(err.to_string().contains("got 3"), "{err}");
        assert!(spot.build(&[]).is_err());
        let mut mostly_nan = vec![f64::NAN; 60];
        mostly_nan.extend((0..40).map(f64::from));
        assert_eq!(
            spot.build(&mostly_nan).unwrap_err(),
            ThresholdError::TooFewScores {
                kind: "spot",
                needed: 50,
                finite: 40,
                given: 100
            }
        );
        let ramp: Vec<f64> = (0..80).map(|i| (i % 7) as f64).collect();
        assert!(matches!(
            dspot.build(&ramp).unwrap_err(),
            ThresholdError::TooFewScores {
                needed: 100,
                finite: 80,
                ..
            }
        ));

        // Barely any spread: one outlier among zeros still calibrates and updates.
        let mut one = vec![0.0; 99];
        one.push(1.0);
        let mut th = spot.build(&one).unwrap();
        assert!(th.threshold().is_finite());
        assert_eq!(th.update(0.0), Verdict::Normal);
        th.update(0.5);
        assert!(th.threshold().is_finite());
    }

    #[test]
    fn gpd_fit_handles_tiny_and_invalid_peak_sets() {
        assert_eq!(Gpd::fit(&[]), None);
        assert_eq!(Gpd::fit(&[1.0, 0.0]), None);
        assert_eq!(Gpd::fit(&[1.0, -2.0]), None);
        assert_eq!(Gpd::fit(&[1.0, f64::NAN]), None);
        assert_eq!(Gpd::fit(&[1.0, f64::INFINITY]), None);
        let one = Gpd::fit(&[2.0]).unwrap();
        assert_eq!(one.sigma, 2.0);
        for peaks in [&[2.0, 2.0, 2.0][..], &[1e-300, 1.0], &[1.0, 1e300]] {
            let fit = Gpd::fit(peaks).unwrap();
            assert!(
                fit.gamma.is_finite() && fit.sigma > 0.0,
                "{peaks:?}: {fit:?}"
            );
        }
    }

    #[test]
    fn snapshot_serializes_for_reports() {
        let scores = exponential(&mut Rng::new(10), 1000, 1.0);
        let th = cfg(ThresholdKind::Dspot).build(&scores).unwrap();
        let json = serde_json::to_string(&th.snapshot()).unwrap();
        assert!(json.contains("\"kind\":\"dspot\""), "{json}");
        assert!(json.contains("\"gamma\":"), "{json}");
        assert_eq!(th.kind(), ThresholdKind::Dspot);
    }
}
