//! The dark-matter head: a linear predictor of an SAE's error from the activation.
//!
//! Engels et al., "Decomposing the Dark Matter of Sparse Autoencoders" (papers.md §3) find
//! that about half of the SAE error vector e = x − SAE(x), and over 90 % of its squared norm
//! ‖e‖², is linearly predictable from x. So the raw ‖e‖² of a token is mostly explained by x
//! itself; what is *not* explained is the anomaly signal. Fitted on normal traffic, the head
//! reports per token ([`DarkScore`]):
//!
//! - `error_sq_norm` = ‖e‖²;
//! - `predicted_sq_norm` = max(0, wᵀx + c) (the linear prediction of ‖e‖², clamped at 0);
//! - `nonlinear_sq_norm` = ‖e − (Aᵀx + b)‖² (the "nonlinear error" of the paper);
//! - `deviation` = (‖e‖² − predicted)/σ, with σ the residual std of the norm prediction on
//!   the fit data.
//!
//! Any of them can be the alert score.
//!
//! ‖e‖² ≥ 0, so a negative wᵀx + c predicts nothing: it happens when x lies outside what the
//! fit saw (an activation of a norm the fit rows lacked, say), and taken as it is it would add
//! |wᵀx + c|/σ to the token's deviation. The prediction is therefore clamped at 0 wherever it
//! is used (the projection onto ‖e‖² ≥ 0, never further from the true ‖e‖² than the raw
//! value); [`DarkHead::negative_predictions`] counts the rows where that happens, which
//! `sae-train` and `sae-head` report. The training R² and σ come from the unclamped fit.
//!
//! # Fit
//!
//! Ridge regression with an unpenalised bias, in closed form from sufficient statistics that
//! are accumulated online ([`DarkStats::accumulate`], mergeable across chunks and threads):
//! with x̃ = [x, 1], `Σ x̃x̃ᵀ`, `Σ x̃eᵀ`, `Σ x̃‖e‖²` and `Σ ‖e‖⁴`, all in f64. At fit time the
//! statistics are centred (μ = mean x, ē = mean e) and
//!
//! ```text
//! (Cxx + λI)·A = Cxe,   b = ē − Aᵀμ          Cxx = Σ(x−μ)(x−μ)ᵀ/n, Cxe = Σ(x−μ)(e−ē)ᵀ/n
//! (Cxx + λI)·w = Cxn,   c = mean‖e‖² − wᵀμ    Cxn = Σ(x−μ)(‖e‖²−mean)/n
//! λ = ridge · trace(Cxx)/d   (ridge is relative to the mean feature variance; 1 if that is 0)
//! ```
//!
//! solved with one Cholesky factorisation (f64, written here; d ≤ a few thousand) for the
//! d + 1 right-hand sides. Centring first is the same as the augmented system with an
//! unpenalised bias, and better conditioned. The fit-data residuals, σ and the training R²
//! follow from the same statistics, without a second pass.
//!
//! R² (the definitions the paper reports, on held-out data via [`DarkHead::r2`]):
//! vector R² = 1 − Σ‖e − ê‖² / Σ‖e − ē‖², norm R² = 1 − Σ(‖e‖² − n̂)² / Σ(‖e‖² − mean)².
//! (The paper's code averages per-dimension R² for the vector case; the pooled form here
//! weights dimensions by their variance.)
//!
//! # Files
//!
//! [`DarkHead::save`] writes `dark_head.json` (settings, c, σ, training R²) and
//! `dark_head.safetensors` (`A` `[d, d]`, `b` `[d]`, `w` `[d]`, f32), names that do not clash
//! with an SAE checkpoint, so the head can live in the SAE's folder.

use std::fs;
use std::path::{Path, PathBuf};

use ndarray::linalg::general_mat_mul;
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, s};

use super::kernel::{self, Kernel};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

/// File names written by [`DarkHead::save`].
pub const DARK_META_FILE: &str = "dark_head.json";
pub const DARK_WEIGHTS_FILE: &str = "dark_head.safetensors";
/// Value of the `format` field.
pub const DARK_FORMAT: &str = "darkwatch-dark-head";
pub const DARK_FORMAT_VERSION: u32 = 1;

/// Why the head cannot be fitted, used or loaded.
#[derive(Debug, thiserror::Error)]
pub enum DarkError {
    #[error("the dark-matter head needs at least one row to fit")]
    NoRows,
    #[error("{what} has {found} columns, expected {expected}")]
    Width {
        what: &'static str,
        expected: usize,
        found: usize,
    },
    #[error("x has {x_rows} rows but e has {e_rows}")]
    RowMismatch { x_rows: usize, e_rows: usize },
    #[error("{what}: row {row}, column {col} is not finite")]
    NonFinite {
        what: &'static str,
        row: usize,
        col: usize,
    },
    #[error(
        "the normal equations are not positive definite at pivot {pivot} (λ = {lambda:e}); \
         raise `ridge`"
    )]
    NotPositiveDefinite { pivot: usize, lambda: f64 },
    #[error("`ridge` = {0} must be finite and ≥ 0")]
    BadRidge(f64),
    #[error(
        "the fitted head's `{part}` element {index} is {value:e}, not a finite float32: the \
         activations' scale is out of range for the fit (an SAE input scaling such as \
         --norm-scaling-factor far from the activations' own scale does this; check it), or \
         raise `ridge`"
    )]
    NotFiniteFit {
        part: &'static str,
        index: usize,
        value: f64,
    },
    #[error(
        "{rows} rows are too few to fit a dark-matter head on d = {d}: it fits {coefficients} \
         coefficients (a weight per activation dimension and a bias) for each of the {d} error \
         dimensions and for ‖e‖², and with so few rows they match those rows in sample and \
         predict nothing for new tokens; give at least {min} rows (twice the coefficients)",
        coefficients = .d + 1
    )]
    TooFewRows { rows: usize, d: usize, min: usize },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error(transparent)]
    Sae(#[from] super::SaeError),
}

/// The fewest rows [`check_fit_rows`] lets a head of width `d` be fitted on: twice the
/// d + 1 coefficients (d weights and a bias) of each of its regressions. With d + 1 rows or
/// fewer a regression fits its rows exactly (training R² 1, residual σ 0) whatever they
/// hold; with n rows, pure noise still reaches a training R² of about (d + 1)/n, so below
/// twice the coefficients more than half of what the fit reports would be noise.
pub fn min_fit_rows(d: usize) -> usize {
    2 * (d + 1)
}

/// Refuses to fit a head of width `d` on fewer than [`min_fit_rows`] rows: `sae-train` and
/// `sae-head` check it before any work. ([`DarkHead::fit`] itself fits any number of rows.)
///
/// # Errors
/// [`DarkError::TooFewRows`], saying why.
pub fn check_fit_rows(rows: usize, d: usize) -> Result<(), DarkError> {
    let min = min_fit_rows(d);
    if rows < min {
        return Err(DarkError::TooFewRows { rows, d, min });
    }
    Ok(())
}

/// Settings of the fit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DarkConfig {
    /// Ridge strength relative to the mean feature variance: λ = ridge · trace(Cxx)/d.
    /// 0 is plain least squares (fails on collinear features).
    pub ridge: f64,
}

impl Default for DarkConfig {
    fn default() -> Self {
        DarkConfig { ridge: 1e-3 }
    }
}

/// Sufficient statistics of (x, e) pairs, accumulated online in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct DarkStats {
    d: usize,
    n: u64,
    /// `[d+1, d+1]`: Σ x̃x̃ᵀ (the last row/column hold Σx and n).
    sxx: Array2<f64>,
    /// `[d+1, d]`: Σ x̃eᵀ (the last row holds Σe).
    sxe: Array2<f64>,
    /// `[d+1]`: Σ x̃‖e‖² (the last entry holds Σ‖e‖²).
    sxn: Array1<f64>,
    /// Σ ‖e‖⁴.
    snn: f64,
}

impl DarkStats {
    /// Empty statistics for activations of width `d`.
    pub fn new(d: usize) -> DarkStats {
        DarkStats {
            d,
            n: 0,
            sxx: Array2::zeros((d + 1, d + 1)),
            sxe: Array2::zeros((d + 1, d)),
            sxn: Array1::zeros(d + 1),
            snn: 0.0,
        }
    }

    /// Rows accumulated so far.
    pub fn rows(&self) -> u64 {
        self.n
    }

    /// Activation width.
    pub fn d(&self) -> usize {
        self.d
    }

    /// Adds the rows of `x` (`[n, d]`) and their SAE errors `e` (`[n, d]`).
    ///
    /// # Errors
    /// Width or row-count mismatch, or a non-finite value (the statistics are left unchanged).
    pub fn accumulate(&mut self, x: ArrayView2<f32>, e: ArrayView2<f32>) -> Result<(), DarkError> {
        check_pair(self.d, x, e)?;
        for (what, m) in [("x", x), ("e", e)] {
            if let Some(((row, col), _)) = m.indexed_iter().find(|(_, v)| !v.is_finite()) {
                return Err(DarkError::NonFinite { what, row, col });
            }
        }
        let (n, d) = (x.nrows(), self.d);
        if n == 0 {
            return Ok(());
        }
        let mut xt = Array2::<f64>::ones((n, d + 1));
        xt.slice_mut(s![.., ..d]).assign(&x.mapv(f64::from));
        let e64 = e.mapv(f64::from);
        let norms: Array1<f64> = e64.rows().into_iter().map(|r| r.dot(&r)).collect();
        general_mat_mul(1.0, &xt.t(), &xt, 1.0, &mut self.sxx);
        general_mat_mul(1.0, &xt.t(), &e64, 1.0, &mut self.sxe);
        self.sxn += &xt.t().dot(&norms);
        self.snn += norms.iter().map(|v| v * v).sum::<f64>();
        self.n += n as u64;
        Ok(())
    }

    /// Adds another set of statistics of the same width (chunks fitted apart, then merged).
    ///
    /// # Errors
    /// [`DarkError::Width`] when the widths differ.
    pub fn merge(&mut self, other: &DarkStats) -> Result<(), DarkError> {
        if other.d != self.d {
            return Err(DarkError::Width {
                what: "the merged statistics",
                expected: self.d,
                found: other.d,
            });
        }
        self.n += other.n;
        self.sxx += &other.sxx;
        self.sxe += &other.sxe;
        self.sxn += &other.sxn;
        self.snn += other.snn;
        Ok(())
    }
}

fn check_pair(d: usize, x: ArrayView2<f32>, e: ArrayView2<f32>) -> Result<(), DarkError> {
    if x.ncols() != d {
        return Err(DarkError::Width {
            what: "x",
            expected: d,
            found: x.ncols(),
        });
    }
    if e.ncols() != d {
        return Err(DarkError::Width {
            what: "e",
            expected: d,
            found: e.ncols(),
        });
    }
    if x.nrows() != e.nrows() {
        return Err(DarkError::RowMismatch {
            x_rows: x.nrows(),
            e_rows: e.nrows(),
        });
    }
    Ok(())
}

/// Vector and norm R².
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct R2 {
    /// 1 − Σ‖e − ê‖² / Σ‖e − ē‖².
    pub vector: f64,
    /// 1 − Σ(‖e‖² − n̂)² / Σ(‖e‖² − mean ‖e‖²)².
    pub norm: f64,
}

impl R2 {
    /// A warning line for each held-out R² below 0 (the head predicts worse than the rows'
    /// mean), else nothing.
    pub fn below_zero_warning(&self) -> String {
        let mut text = String::new();
        for (what, v, target) in [
            ("vector", self.vector, "error vectors"),
            ("norm", self.norm, "‖e‖²"),
        ] {
            if v < 0.0 {
                text.push_str(&format!(
                    "warning: held-out {what} R² {v:.3} is below 0: the head predicts the \
                     held-out rows' {target} worse than their mean would; give more or more \
                     varied normal rows, or raise --ridge\n"
                ));
            }
        }
        text
    }
}

/// Per-token output of [`DarkHead::score`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DarkScore {
    /// ‖e‖².
    pub error_sq_norm: f32,
    /// max(0, wᵀx + c): ‖e‖² is never negative.
    pub predicted_sq_norm: f32,
    /// ‖e − (Aᵀx + b)‖².
    pub nonlinear_sq_norm: f32,
    /// (‖e‖² − predicted)/σ, with the clamped prediction.
    pub deviation: f32,
}

/// What [`DarkHead::fit`] returns.
#[derive(Debug, Clone)]
pub struct DarkFit {
    pub head: DarkHead,
    /// R² on the fit data (from the statistics).
    pub train: R2,
    /// R² on the held-out rows, when given.
    pub held_out: Option<R2>,
}

/// The fitted predictor.
#[derive(Debug, Clone, PartialEq)]
pub struct DarkHead {
    d: usize,
    /// `[d, d]`: ê (row) = x (row)·A + b.
    a: Array2<f32>,
    b: Array1<f32>,
    /// A packed for the SAE encoder kernel, and b padded to match (the kernel computes
    /// x·A + b without allocating, unlike a GEMM call that packs per call).
    a_packed: Vec<f32>,
    b_padded: Vec<f32>,
    /// `[d]`: predicted ‖e‖² = x·w + c.
    w: Array1<f32>,
    c: f32,
    /// Residual std of the norm prediction on the fit data (floored away from 0).
    sigma: f32,
    meta: DarkMeta,
}

/// The JSON side of a saved head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DarkMeta {
    format: String,
    format_version: u32,
    d_in: usize,
    config: DarkConfig,
    /// The absolute λ used.
    lambda: f64,
    fit_rows: u64,
    c_norm: f64,
    sigma_norm: f64,
    train_r2: R2,
    /// The SAE the head was fitted with (`sae-head`, `sae-train`): what its errors, and so the
    /// head and its calibration, belong to. Absent from heads written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sae: Option<SaeRecord>,
    /// The tokens left out of the start of every prompt in the fit and the calibration
    /// (`--skip-positions` as applied: 0 when none were). Absent from heads written before
    /// it was recorded, which count as 0 (every position fitted and scored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    skip_positions: Option<usize>,
    /// What gave the fit rows their positions: `prompt_ids`, `shape`, or `unknown` (none,
    /// so nothing could be skipped). Absent where `skip_positions` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    positions_from: Option<super::positions::PositionsFrom>,
}

/// What a head records of the SAE it was fitted with ([`DarkHead::record_sae`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaeRecord {
    /// The weights file's name (`sae_weights.safetensors`, `sae.safetensors`), for messages.
    pub weights_file: String,
    /// The lowercase hex sha256 of that file as loaded.
    pub weights_sha256: String,
    /// The `expected_average_only_in` scaling factor the SAE ran with, if one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_scaling_factor: Option<f32>,
}

impl DarkConfig {
    /// Checks the settings before any work (`sae-train` would otherwise train every epoch
    /// and only then refuse the ridge).
    ///
    /// # Errors
    /// [`DarkError::BadRidge`].
    pub fn validate(&self) -> Result<(), DarkError> {
        if !(self.ridge.is_finite() && self.ridge >= 0.0) {
            return Err(DarkError::BadRidge(self.ridge));
        }
        Ok(())
    }
}

/// Preallocated buffers for [`DarkHead::score`].
#[derive(Debug, Clone)]
pub struct DarkWorkspace {
    kernel: Kernel,
    d: usize,
    /// `[capacity, d]`: the input rows, contiguous.
    x: Vec<f32>,
    /// `[capacity, padded(d)]`: x·A + b.
    e_hat: Vec<f32>,
    scores: Vec<DarkScore>,
}

impl DarkWorkspace {
    /// Rows one call can score without allocating.
    pub fn capacity(&self) -> usize {
        self.scores.len()
    }

    /// The head's prediction ê of row `r`'s SAE error, from the last [`DarkHead::score`].
    pub fn predicted_error(&self, r: usize) -> &[f32] {
        let ld = kernel::padded(self.d);
        &self.e_hat[r * ld..r * ld + self.d]
    }
}

impl DarkHead {
    /// Fits the head from `stats` and, when `held_out` (x, e) rows are given, reports R² on
    /// them.
    ///
    /// # Errors
    /// [`DarkError::NoRows`], [`DarkError::BadRidge`], [`DarkError::NotPositiveDefinite`]
    /// (only possible with `ridge = 0`), or a held-out shape mismatch.
    pub fn fit(
        stats: &DarkStats,
        config: &DarkConfig,
        held_out: Option<(ArrayView2<f32>, ArrayView2<f32>)>,
    ) -> Result<DarkFit, DarkError> {
        config.validate()?;
        if stats.n == 0 {
            return Err(DarkError::NoRows);
        }
        let (d, n) = (stats.d, stats.n as f64);
        let mu: Array1<f64> = stats.sxx.slice(s![d, ..d]).mapv(|v| v / n);
        let e_bar: Array1<f64> = stats.sxe.slice(s![d, ..]).mapv(|v| v / n);
        let n_bar = stats.sxn[d] / n;
        // Centred second moments, per row.
        let mut cxx = stats.sxx.slice(s![..d, ..d]).mapv(|v| v / n);
        for i in 0..d {
            for j in 0..d {
                cxx[[i, j]] -= mu[i] * mu[j];
            }
        }
        let mut rhs = Array2::<f64>::zeros((d, d + 1));
        for i in 0..d {
            for j in 0..d {
                rhs[[i, j]] = stats.sxe[[i, j]] / n - mu[i] * e_bar[j];
            }
            rhs[[i, d]] = stats.sxn[i] / n - mu[i] * n_bar;
        }
        let cxe = rhs.slice(s![.., ..d]).to_owned();
        let cxn = rhs.column(d).to_owned();
        let trace: f64 = (0..d).map(|i| cxx[[i, i]]).sum();
        let scale = if d > 0 && trace > 0.0 {
            trace / d as f64
        } else {
            1.0
        };
        let lambda = config.ridge * scale;
        let mut m = cxx.clone();
        for i in 0..d {
            m[[i, i]] += lambda;
        }
        cholesky(&mut m).map_err(|pivot| DarkError::NotPositiveDefinite { pivot, lambda })?;
        cholesky_solve(&m, &mut rhs);
        let a = rhs.slice(s![.., ..d]).to_owned();
        let w = rhs.column(d).to_owned();
        let b = &e_bar - &a.t().dot(&mu);
        let c = n_bar - w.dot(&mu);

        // Fit-data residuals from the statistics: RSS/n = Var − 2βᵀC_xy + βᵀCxxβ.
        let var_n = (stats.snn / n - n_bar * n_bar).max(0.0);
        let rss_n = (var_n - 2.0 * w.dot(&cxn) + w.dot(&cxx.dot(&w))).max(0.0);
        let tss_e = (stats.sxn[d] / n - e_bar.dot(&e_bar)).max(0.0);
        let cxx_a = cxx.dot(&a);
        let rss_e = (tss_e - 2.0 * (&a * &cxe).sum() + (&a * &cxx_a).sum()).max(0.0);
        let train = R2 {
            vector: r2(rss_e, tss_e),
            norm: r2(rss_n, var_n),
        };
        // σ floored so that a perfect fit gives large, finite deviations, never ∞ or NaN.
        let floor = 1e-6 * (stats.snn / n).sqrt().max(f64::MIN_POSITIVE);
        let sigma = rss_n.sqrt().max(floor);
        // A head that does not fit float32 would be written and then refused by every load
        // ("element 0 is not finite"): refuse it here, before anything is written.
        let parts: [(&'static str, Vec<f64>); 5] = [
            ("A", a.iter().copied().collect()),
            ("b", b.to_vec()),
            ("w", w.to_vec()),
            ("c", vec![c]),
            ("sigma", vec![sigma]),
        ];
        for (part, values) in &parts {
            if let Some(index) = values.iter().position(|&v| !(v as f32).is_finite()) {
                return Err(DarkError::NotFiniteFit {
                    part,
                    index,
                    value: values[index],
                });
            }
        }
        let head = DarkHead::assemble(
            a.mapv(|v| v as f32),
            b.mapv(|v| v as f32),
            w.mapv(|v| v as f32),
            c as f32,
            sigma as f32,
            DarkMeta {
                format: DARK_FORMAT.into(),
                format_version: DARK_FORMAT_VERSION,
                d_in: d,
                config: *config,
                lambda,
                fit_rows: stats.n,
                c_norm: c,
                sigma_norm: sigma,
                train_r2: train,
                sae: None,
                skip_positions: None,
                positions_from: None,
            },
        );
        let held_out = match held_out {
            Some((x, e)) => Some(head.r2(x, e)?),
            None => None,
        };
        Ok(DarkFit {
            head,
            train,
            held_out,
        })
    }

    fn assemble(
        a: Array2<f32>,
        b: Array1<f32>,
        w: Array1<f32>,
        c: f32,
        sigma: f32,
        meta: DarkMeta,
    ) -> DarkHead {
        let d = b.len();
        let mut b_padded = vec![0.0; kernel::padded(d)];
        b_padded[..d].copy_from_slice(b.as_slice().expect("contiguous"));
        DarkHead {
            d,
            a_packed: kernel::pack(a.view()),
            b_padded,
            a,
            b,
            w,
            c,
            sigma,
            meta,
        }
    }

    /// Runs `sae` over the rows of `train` (in chunks of `batch`), fits the head on the
    /// (x, e) pairs, and reports R² on the `held_out` rows (also run through `sae`) when given.
    ///
    /// # Errors
    /// As [`DarkHead::fit`], plus [`DarkError::Sae`] when the rows do not have `sae.d_in()`
    /// columns and [`DarkError::NonFinite`] for a non-finite input or error.
    pub fn fit_sae(
        sae: &super::Sae,
        train: ArrayView2<f32>,
        held_out: Option<ArrayView2<f32>>,
        config: &DarkConfig,
        batch: usize,
    ) -> Result<DarkFit, DarkError> {
        let batch = batch.max(1);
        let mut ws = sae.workspace(batch);
        let mut stats = DarkStats::new(sae.d_in());
        for chunk in train.axis_chunks_iter(ndarray::Axis(0), batch) {
            let out = sae.forward(chunk, &mut ws)?;
            stats.accumulate(chunk, out.error())?;
        }
        let held = match held_out {
            Some(x) => {
                let mut e = Array2::<f32>::zeros(x.raw_dim());
                for (i, chunk) in x.axis_chunks_iter(ndarray::Axis(0), batch).enumerate() {
                    let out = sae.forward(chunk, &mut ws)?;
                    e.slice_mut(s![i * batch..i * batch + chunk.nrows(), ..])
                        .assign(&out.error());
                }
                Some((x, e))
            }
            None => None,
        };
        DarkHead::fit(
            &stats,
            config,
            held.as_ref().map(|(x, e)| (x.view(), e.view())),
        )
    }

    /// Activation width.
    pub fn d(&self) -> usize {
        self.d
    }

    /// σ of the norm prediction on the fit data.
    pub fn sigma(&self) -> f32 {
        self.sigma
    }

    /// The SAE the head was fitted with, when it was recorded (heads written before
    /// darkwatch recorded it have none).
    pub fn sae_record(&self) -> Option<&SaeRecord> {
        self.meta.sae.as_ref()
    }

    /// Records the SAE the head was fitted with (saved in `dark_head.json`): loading the head
    /// for any other weights is then refused ([`super::detector::load_head`]).
    pub fn record_sae(&mut self, record: SaeRecord) {
        self.meta.sae = Some(record);
    }

    /// Records the tokens left out of every prompt's start in the fit and the calibration,
    /// and what gave the positions (saved in `dark_head.json`): `sae-score` and the agent
    /// leave the same positions out of what they score.
    pub fn record_positions(&mut self, skip: usize, from: super::positions::PositionsFrom) {
        self.meta.skip_positions = Some(skip);
        self.meta.positions_from = Some(from);
    }

    /// The tokens left out of every prompt's start in the fit and the calibration; `None`
    /// for a head written before darkwatch recorded it (treat as 0: every position was
    /// fitted, as scored).
    pub fn skip_positions(&self) -> Option<usize> {
        self.meta.skip_positions
    }

    /// What gave the fit rows their positions, when recorded.
    pub fn positions_from(&self) -> Option<super::positions::PositionsFrom> {
        self.meta.positions_from
    }

    /// The absolute λ the fit used.
    pub fn lambda(&self) -> f64 {
        self.meta.lambda
    }

    /// R² on the fit data.
    pub fn train_r2(&self) -> R2 {
        self.meta.train_r2
    }

    /// `[d, d]`: ê = x·A + b (rows).
    pub fn a(&self) -> ArrayView2<'_, f32> {
        self.a.view()
    }

    /// The bias of the vector prediction.
    pub fn b(&self) -> &Array1<f32> {
        &self.b
    }

    /// The weights and bias of the ‖e‖² prediction.
    pub fn norm_weights(&self) -> (&Array1<f32>, f32) {
        (&self.w, self.c)
    }

    /// Buffers for scoring up to `max_batch` rows without allocating.
    pub fn workspace(&self, max_batch: usize) -> DarkWorkspace {
        DarkWorkspace {
            kernel: Kernel::detect(),
            d: self.d,
            x: vec![0.0; max_batch * self.d],
            e_hat: vec![0.0; max_batch * kernel::padded(self.d)],
            scores: vec![DarkScore::default(); max_batch],
        }
    }

    /// Scores each row of `x` with its SAE error `e` (both `[n, d]`). Allocation-free for at
    /// most `ws.capacity()` rows (otherwise the workspace grows once). NaN in a row gives NaN
    /// scores for that row.
    ///
    /// # Errors
    /// Width or row-count mismatch.
    pub fn score<'a>(
        &self,
        x: ArrayView2<f32>,
        e: ArrayView2<f32>,
        ws: &'a mut DarkWorkspace,
    ) -> Result<&'a [DarkScore], DarkError> {
        check_pair(self.d, x, e)?;
        let n = x.nrows();
        if n > ws.capacity() || ws.d != self.d {
            *ws = self.workspace(n.max(ws.capacity()));
        }
        let (d, ld) = (self.d, kernel::padded(self.d));
        for (dst, row) in ws.x.chunks_exact_mut(d).zip(x.rows()) {
            for (o, &v) in dst.iter_mut().zip(&row) {
                *o = v;
            }
        }
        kernel::encode(
            ws.kernel,
            &ws.x,
            n,
            d,
            &self.a_packed,
            &self.b_padded,
            &mut ws.e_hat,
        );
        for (r, score) in ws.scores[..n].iter_mut().enumerate() {
            let (xr, er) = (&ws.x[r * d..(r + 1) * d], e.row(r));
            let hr = &ws.e_hat[r * ld..r * ld + d];
            let mut sq = 0.0f32;
            let mut nonlinear = 0.0f32;
            for (&ev, &hv) in er.iter().zip(hr) {
                let rest = ev - hv;
                sq += ev * ev;
                nonlinear += rest * rest;
            }
            // Clamped at 0 (see the module doc); NaN stays NaN.
            let raw = xr.iter().zip(&self.w).map(|(x, w)| x * w).sum::<f32>() + self.c;
            let predicted = if raw < 0.0 { 0.0 } else { raw };
            *score = DarkScore {
                error_sq_norm: sq,
                predicted_sq_norm: predicted,
                nonlinear_sq_norm: nonlinear,
                deviation: (sq - predicted) / self.sigma,
            };
        }
        Ok(&ws.scores[..n])
    }

    /// How many rows of `x` (`[n, d]`) have a negative linear prediction wᵀx + c of ‖e‖²
    /// (which [`DarkHead::score`] clamps to 0), and the most negative one (`None` when
    /// none is negative).
    ///
    /// # Errors
    /// Width mismatch.
    pub fn negative_predictions(
        &self,
        x: ArrayView2<f32>,
    ) -> Result<(usize, Option<f32>), DarkError> {
        if x.ncols() != self.d {
            return Err(DarkError::Width {
                what: "x",
                expected: self.d,
                found: x.ncols(),
            });
        }
        let (mut count, mut min) = (0, None::<f32>);
        for row in x.rows() {
            let raw = row.iter().zip(&self.w).map(|(x, w)| x * w).sum::<f32>() + self.c;
            if raw < 0.0 {
                count += 1;
                min = Some(min.map_or(raw, |m| m.min(raw)));
            }
        }
        Ok((count, min))
    }

    /// The line `sae-train` and `sae-head` print when some of `x`'s rows have a negative
    /// prediction of ‖e‖² (`what` names the rows), else nothing.
    ///
    /// # Errors
    /// Width mismatch.
    pub fn negative_predictions_note(
        &self,
        x: ArrayView2<f32>,
        what: &str,
    ) -> Result<String, DarkError> {
        Ok(match self.negative_predictions(x)? {
            (0, _) | (_, None) => String::new(),
            (n, Some(min)) => format!(
                "note: the head's linear prediction of ‖e‖² is negative on {n} of {} {what} \
                 (down to {min:.4e}); ‖e‖² ≥ 0, so scores use 0 there. Many such rows mean \
                 the fit rows differ from these (rows of an extreme norm in one set only?)\n",
                x.nrows()
            ),
        })
    }

    /// Vector and norm R² of the head's predictions on (x, e) rows (f64 sums; the norm with
    /// the prediction clamped at 0, as scored).
    ///
    /// # Errors
    /// Width or row-count mismatch; [`DarkError::NoRows`] for no rows.
    pub fn r2(&self, x: ArrayView2<f32>, e: ArrayView2<f32>) -> Result<R2, DarkError> {
        check_pair(self.d, x, e)?;
        let n = x.nrows();
        if n == 0 {
            return Err(DarkError::NoRows);
        }
        let mut ws = self.workspace(n);
        let scores = self.score(x, e, &mut ws)?;
        let e_bar = e
            .mapv(f64::from)
            .mean_axis(ndarray::Axis(0))
            .expect("n > 0");
        let mut tss_e = 0.0;
        for row in e.rows() {
            add_sq_dev(&mut tss_e, row, e_bar.view());
        }
        Ok(r2_of_scores(scores, tss_e))
    }

    /// Writes `dark_head.json` and `dark_head.safetensors` into `dir` (created if needed).
    ///
    /// # Errors
    /// [`DarkError::Io`] naming the file.
    pub fn save(&self, dir: &Path) -> Result<(), DarkError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DarkError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io(dir))?;
        let bytes = |a: &[f32]| a.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        let a = bytes(
            self.a
                .as_standard_layout()
                .as_slice()
                .expect("standard layout"),
        );
        let b = bytes(self.b.as_slice().expect("contiguous"));
        let w = bytes(self.w.as_slice().expect("contiguous"));
        let d = self.d;
        let weights_path = dir.join(DARK_WEIGHTS_FILE);
        let tensor_err = |e: safetensors::SafeTensorError| DarkError::File {
            path: weights_path.clone(),
            reason: e.to_string(),
        };
        let views = vec![
            (
                "A",
                TensorView::new(Dtype::F32, vec![d, d], &a).map_err(tensor_err)?,
            ),
            (
                "b",
                TensorView::new(Dtype::F32, vec![d], &b).map_err(tensor_err)?,
            ),
            (
                "w",
                TensorView::new(Dtype::F32, vec![d], &w).map_err(tensor_err)?,
            ),
        ];
        let st = safetensors::serialize(views, None).map_err(|e| DarkError::File {
            path: weights_path.clone(),
            reason: e.to_string(),
        })?;
        fs::write(&weights_path, st).map_err(io(&weights_path))?;
        let meta_path = dir.join(DARK_META_FILE);
        let json = serde_json::to_vec_pretty(&self.meta).map_err(|e| DarkError::File {
            path: meta_path.clone(),
            reason: e.to_string(),
        })?;
        fs::write(&meta_path, json).map_err(io(&meta_path))
    }

    /// Reads a head written by [`DarkHead::save`].
    ///
    /// # Errors
    /// [`DarkError::Io`] or [`DarkError::File`] naming the file and what is wrong.
    pub fn load(dir: &Path) -> Result<DarkHead, DarkError> {
        let meta_path = dir.join(DARK_META_FILE);
        let bad = |path: &Path, reason: String| DarkError::File {
            path: path.to_path_buf(),
            reason,
        };
        let text = fs::read(&meta_path).map_err(|source| DarkError::Io {
            path: meta_path.clone(),
            source,
        })?;
        let meta: DarkMeta =
            serde_json::from_slice(&text).map_err(|e| bad(&meta_path, e.to_string()))?;
        if meta.format != DARK_FORMAT || meta.format_version != DARK_FORMAT_VERSION {
            return Err(bad(
                &meta_path,
                format!(
                    "format {} v{}, expected {DARK_FORMAT} v{DARK_FORMAT_VERSION}",
                    meta.format, meta.format_version
                ),
            ));
        }
        if !(meta.sigma_norm.is_finite() && meta.sigma_norm > 0.0 && meta.c_norm.is_finite()) {
            return Err(bad(&meta_path, "sigma_norm / c_norm out of range".into()));
        }
        let weights_path = dir.join(DARK_WEIGHTS_FILE);
        let bytes = fs::read(&weights_path).map_err(|source| DarkError::Io {
            path: weights_path.clone(),
            source,
        })?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(&weights_path, format!("not a valid safetensors file: {e}")))?;
        let d = meta.d_in;
        let read = |name: &str, shape: &[usize]| -> Result<Vec<f32>, DarkError> {
            let t = st
                .tensor(name)
                .map_err(|_| bad(&weights_path, format!("tensor `{name}` is missing")))?;
            if t.dtype() != Dtype::F32 || t.shape() != shape {
                return Err(bad(
                    &weights_path,
                    format!(
                        "tensor `{name}` is {:?} {:?}, expected F32 {shape:?}",
                        t.dtype(),
                        t.shape()
                    ),
                ));
            }
            let v: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if let Some(i) = v.iter().position(|v| !v.is_finite()) {
                return Err(bad(
                    &weights_path,
                    format!("tensor `{name}`: element {i} is not finite"),
                ));
            }
            Ok(v)
        };
        let a = Array2::from_shape_vec((d, d), read("A", &[d, d])?)
            .map_err(|e| bad(&weights_path, e.to_string()))?;
        let (b, w) = (read("b", &[d])?, read("w", &[d])?);
        let (c, sigma) = (meta.c_norm as f32, meta.sigma_norm as f32);
        Ok(DarkHead::assemble(
            a,
            Array1::from(b),
            Array1::from(w),
            c,
            sigma,
            meta,
        ))
    }
}

/// Adds Σ (eᵢ − ēᵢ)² of one error row `e` to `tss_e`, in column order: the spread of the
/// errors in [`DarkHead::r2`], which `sae-score` sums a block of rows at a time.
pub(crate) fn add_sq_dev(tss_e: &mut f64, e: ArrayView1<f32>, e_bar: ArrayView1<f64>) {
    for (&v, &m) in e.iter().zip(e_bar) {
        *tss_e += (f64::from(v) - m).powi(2);
    }
}

/// [`DarkHead::r2`] from the head's `scores` of the rows and the spread `tss_e` of their
/// errors around their mean ([`add_sq_dev`]): each sum runs over the rows in order, so a
/// caller that keeps only the scores (`sae-score`, which streams its rows) gets the same bits.
pub(crate) fn r2_of_scores(scores: &[DarkScore], tss_e: f64) -> R2 {
    let n = scores.len();
    let norm_bar = scores
        .iter()
        .map(|s| f64::from(s.error_sq_norm))
        .sum::<f64>()
        / n as f64;
    let (mut rss_e, mut rss_n, mut tss_n) = (0.0, 0.0, 0.0);
    for s in scores {
        rss_e += f64::from(s.nonlinear_sq_norm);
        rss_n += (f64::from(s.error_sq_norm) - f64::from(s.predicted_sq_norm)).powi(2);
        tss_n += (f64::from(s.error_sq_norm) - norm_bar).powi(2);
    }
    R2 {
        vector: r2(rss_e, tss_e),
        norm: r2(rss_n, tss_n),
    }
}

/// 1 − rss/tss. With no variance to explain: 1 when nothing is left over either, else 0
/// (never ±∞ or NaN).
fn r2(rss: f64, tss: f64) -> f64 {
    if tss > 0.0 {
        1.0 - rss / tss
    } else if rss > 0.0 {
        0.0
    } else {
        1.0
    }
}

/// In-place Cholesky factorisation M = LLᵀ of a symmetric positive-definite matrix; the lower
/// triangle of `m` becomes L (the upper triangle is left as it was).
///
/// # Errors
/// The index of the first pivot that is not positive (the matrix is not positive definite).
fn cholesky(m: &mut Array2<f64>) -> Result<(), usize> {
    let n = m.nrows();
    let data = m.as_slice_mut().expect("standard layout");
    for j in 0..n {
        let (done, rest) = data.split_at_mut(j * n);
        let row_j = &mut rest[..n];
        // L[j][k] for k < j, using rows 0..j (already factored).
        for k in 0..j {
            let row_k = &done[k * n..k * n + n];
            let dot: f64 = row_j[..k].iter().zip(&row_k[..k]).map(|(a, b)| a * b).sum();
            row_j[k] = (row_j[k] - dot) / row_k[k];
        }
        let diag = row_j[j] - row_j[..j].iter().map(|v| v * v).sum::<f64>();
        if !(diag > 0.0 && diag.is_finite()) {
            return Err(j);
        }
        row_j[j] = diag.sqrt();
    }
    Ok(())
}

/// Solves (LLᵀ)·X = B in place (`b` is `[n, m]` in standard layout, m right-hand sides), L
/// from [`cholesky`].
fn cholesky_solve(l: &Array2<f64>, b: &mut Array2<f64>) {
    let (n, m) = (l.nrows(), b.ncols());
    let bs = b.as_slice_mut().expect("standard layout");
    // Forward: L·Y = B, row i of Y from rows 0..i.
    for i in 0..n {
        let (top, rest) = bs.split_at_mut(i * m);
        let row_i = &mut rest[..m];
        for k in 0..i {
            let f = l[[i, k]];
            if f != 0.0 {
                for (y, &v) in row_i.iter_mut().zip(&top[k * m..(k + 1) * m]) {
                    *y -= f * v;
                }
            }
        }
        let inv = 1.0 / l[[i, i]];
        row_i.iter_mut().for_each(|v| *v *= inv);
    }
    // Back: Lᵀ·X = Y, row i of X from rows i+1..n.
    for i in (0..n).rev() {
        let (head, tail) = bs.split_at_mut((i + 1) * m);
        let row_i = &mut head[i * m..];
        for k in i + 1..n {
            let f = l[[k, i]];
            if f != 0.0 {
                let row_k = &tail[(k - i - 1) * m..(k - i) * m];
                for (y, &v) in row_i.iter_mut().zip(row_k) {
                    *y -= f * v;
                }
            }
        }
        let inv = 1.0 / l[[i, i]];
        row_i.iter_mut().for_each(|v| *v *= inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Rows at 1e-30 of their scale (what `sae-head --norm-scaling-factor 1e-30` made of
    /// them) with errors growing with them at their own scale: the norm weights
    /// w ≈ cov(x, ‖e‖²)/var(x) are beyond float32 (the trial's w was 6e45). The fit refuses them, naming the part, instead of giving a head whose saved
    /// tensors every load refuses ("tensor `w`: element 0 is not finite").
    #[test]
    fn a_fit_that_does_not_fit_float32_is_refused() {
        let (n, d) = (400, 4);
        let mut rng = Rng::new(3);
        let mut x = Array2::<f32>::zeros((n, d));
        let mut e = Array2::<f32>::zeros((n, d));
        for r in 0..n {
            for j in 0..d {
                let v = rng.next_f64() - 0.5;
                x[[r, j]] = (v * 1e-30) as f32;
                e[[r, j]] = (1e5 * (v + 0.5) + (rng.next_f64() - 0.5)) as f32;
            }
        }
        let mut stats = DarkStats::new(d);
        stats.accumulate(x.view(), e.view()).unwrap();
        let config = DarkConfig { ridge: 1.0 };
        match DarkHead::fit(&stats, &config, None) {
            Err(DarkError::NotFiniteFit { part, .. }) => assert!(["A", "w"].contains(&part)),
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("a head beyond float32 was fitted"),
        }
        // The same rows at their own scale fit.
        let mut stats = DarkStats::new(d);
        stats
            .accumulate(x.mapv(|v| v * 1e30).view(), e.view())
            .unwrap();
        DarkHead::fit(&stats, &config, None).unwrap();
    }

    /// Rows x with correlated features, and e = x·A₀ + b₀ + noise. The map (mixing, A₀,
    /// b₀) depends only on `seed`; the rows on `rows_seed`.
    fn linear_rows(
        n: usize,
        d: usize,
        noise: f32,
        seed: u64,
        rows_seed: u64,
    ) -> (Array2<f32>, Array2<f32>, Array2<f32>, Array1<f32>) {
        let mut rng = Rng::new(seed);
        let mix = Array2::from_shape_fn((d, d), |_| rng.uniform(-1.0, 1.0));
        let a0 = Array2::from_shape_fn((d, d), |_| rng.uniform(-0.5, 0.5));
        let b0 = Array1::from_shape_fn(d, |_| rng.uniform(-1.0, 1.0));
        let mut rng = Rng::new(rows_seed);
        let z = Array2::from_shape_fn((n, d), |_| rng.uniform(-1.0, 1.0));
        let x = z.dot(&mix) + 0.5;
        let e = x.dot(&a0) + &b0 + Array2::from_shape_fn((n, d), |_| rng.uniform(-noise, noise));
        (x, e, a0, b0)
    }

    fn linear_data(
        n: usize,
        d: usize,
        noise: f32,
        seed: u64,
    ) -> (Array2<f32>, Array2<f32>, Array2<f32>, Array1<f32>) {
        linear_rows(n, d, noise, seed, seed + 1000)
    }

    #[test]
    fn recovers_an_exact_linear_map() {
        let (x, e, a0, b0) = linear_data(600, 6, 1e-4, 1);
        let mut stats = DarkStats::new(6);
        stats.accumulate(x.view(), e.view()).unwrap();
        // Held-out rows: the same map, new rows.
        let (xh, eh, _, _) = linear_rows(100, 6, 1e-4, 1, 77);
        let fit = DarkHead::fit(
            &stats,
            &DarkConfig { ridge: 0.0 },
            Some((xh.view(), eh.view())),
        )
        .unwrap();
        let head = &fit.head;
        for ((i, j), &v) in a0.indexed_iter() {
            assert!((head.a[[i, j]] - v).abs() < 1e-3, "A[{i},{j}]");
        }
        for (j, &v) in b0.iter().enumerate() {
            assert!((head.b[j] - v).abs() < 1e-3, "b[{j}]");
        }
        assert!(fit.train.vector > 0.999_999, "{:?}", fit.train);
        let held = fit.held_out.unwrap();
        assert!(held.vector > 0.999_999, "{held:?}");
        // ‖e‖² is quadratic in x, so its linear R² is below 1 but the prediction is sane.
        assert!(
            fit.train.norm > 0.0 && fit.train.norm < 1.0,
            "{:?}",
            fit.train
        );
        // Predicted vectors match the truth row by row.
        let mut ws = head.workspace(4);
        let scores = head
            .score(x.slice(s![..4, ..]), e.slice(s![..4, ..]), &mut ws)
            .unwrap();
        for (r, s) in scores.iter().enumerate() {
            let true_sq: f32 = e.row(r).iter().map(|v| v * v).sum();
            assert!((s.error_sq_norm - true_sq).abs() < 1e-3 * true_sq.max(1.0));
            assert!(
                s.nonlinear_sq_norm < 1e-6,
                "row {r}: {}",
                s.nonlinear_sq_norm
            );
        }
    }

    #[test]
    fn norm_prediction_reaches_r2_one_when_the_norm_is_linear() {
        // e = [t, 0, …] with t = 2 + x·v: then ‖e‖² = t², not linear; use e with a constant
        // direction scaled by sqrt(linear): ‖e‖² = 1 + x·v exactly.
        let mut rng = Rng::new(4);
        let (n, d) = (400, 5);
        let x = Array2::from_shape_fn((n, d), |_| rng.uniform(-1.0, 1.0));
        let v = Array1::from(vec![0.3f32, -0.2, 0.1, 0.05, 0.0]);
        let mut e = Array2::<f32>::zeros((n, d));
        for r in 0..n {
            let target = 1.0 + x.row(r).dot(&v);
            e[[r, 0]] = target.sqrt();
        }
        let mut stats = DarkStats::new(d);
        stats.accumulate(x.view(), e.view()).unwrap();
        let fit = DarkHead::fit(
            &stats,
            &DarkConfig { ridge: 0.0 },
            Some((x.view(), e.view())),
        )
        .unwrap();
        assert!(fit.train.norm > 0.999_99, "{:?}", fit.train);
        assert!(fit.held_out.unwrap().norm > 0.999_99);
        let (w, c) = fit.head.norm_weights();
        assert!((c - 1.0).abs() < 1e-4, "c = {c}");
        for (a, b) in w.iter().zip(&v) {
            assert!((a - b).abs() < 1e-4);
        }
        // Deviation is standardised by σ: tiny residuals, σ tiny but finite.
        let mut ws = fit.head.workspace(n);
        let scores = fit.head.score(x.view(), e.view(), &mut ws).unwrap();
        assert!(scores.iter().all(|s| s.deviation.is_finite()));
    }

    /// ‖e‖² = 1 + x·v exactly on the fit rows (x in [−1, 1]); at x = −10·v/|v|² the linear
    /// prediction is 1 − 10 = −9. The score uses 0 there (and the deviation ‖e‖²/σ), the
    /// rows inside the fit range keep their prediction, and the count finds the one row.
    #[test]
    fn a_negative_norm_prediction_is_clamped_at_zero_and_counted() {
        let mut rng = Rng::new(4);
        let (n, d) = (400, 5);
        let x = Array2::from_shape_fn((n, d), |_| rng.uniform(-1.0, 1.0));
        let v = Array1::from(vec![0.3f32, -0.2, 0.1, 0.05, 0.0]);
        let mut e = Array2::<f32>::zeros((n, d));
        for r in 0..n {
            e[[r, 0]] = (1.0 + x.row(r).dot(&v)).sqrt();
        }
        let mut stats = DarkStats::new(d);
        stats.accumulate(x.view(), e.view()).unwrap();
        let head = DarkHead::fit(&stats, &DarkConfig { ridge: 0.0 }, None)
            .unwrap()
            .head;
        let vv = v.dot(&v);
        let far = v.mapv(|c| -10.0 * c / vv);
        let mut xt = Array2::<f32>::zeros((3, d));
        xt.row_mut(0).assign(&far);
        xt.row_mut(1).assign(&x.row(0));
        let mut et = Array2::<f32>::zeros((3, d));
        et[[0, 0]] = 2.0; // ‖e‖² = 4
        et[[1, 0]] = e[[0, 0]];
        let (w, c) = head.norm_weights();
        let raw = far.dot(w) + c;
        assert!((raw + 9.0).abs() < 1e-2, "raw prediction {raw}");
        let mut ws = head.workspace(3);
        let scores = head.score(xt.view(), et.view(), &mut ws).unwrap().to_vec();
        assert_eq!(scores[0].predicted_sq_norm, 0.0);
        assert!((scores[0].deviation - 4.0 / head.sigma()).abs() <= 1e-3 * scores[0].deviation);
        let inside = x.row(0).dot(w) + c;
        assert!((scores[1].predicted_sq_norm - inside).abs() < 1e-5);
        assert!(inside > 0.0);
        // Row 2 (x = 0) predicts c ≈ 1.
        assert!((scores[2].predicted_sq_norm - 1.0).abs() < 1e-3);
        let (count, min) = head.negative_predictions(xt.view()).unwrap();
        assert_eq!(count, 1);
        assert!((min.unwrap() - raw).abs() < 1e-6);
        assert_eq!(head.negative_predictions(x.view()).unwrap(), (0, None));
        let note = head
            .negative_predictions_note(xt.view(), "rows read")
            .unwrap();
        assert!(note.contains("negative on 1 of 3 rows read"), "{note}");
        assert_eq!(
            head.negative_predictions_note(x.view(), "rows").unwrap(),
            ""
        );
    }

    #[test]
    fn below_zero_r2_is_warned_about() {
        let w = R2 {
            vector: -0.152,
            norm: 0.4,
        }
        .below_zero_warning();
        assert!(
            w.contains("held-out vector R² -0.152 is below 0") && !w.contains("norm R²"),
            "{w}"
        );
        assert_eq!(
            R2 {
                vector: 0.0,
                norm: 0.9
            }
            .below_zero_warning(),
            ""
        );
    }

    #[test]
    fn two_chunks_equal_one() {
        let (x, e, _, _) = linear_data(300, 4, 0.1, 2);
        let mut one = DarkStats::new(4);
        one.accumulate(x.view(), e.view()).unwrap();
        let mut a = DarkStats::new(4);
        a.accumulate(x.slice(s![..123, ..]), e.slice(s![..123, ..]))
            .unwrap();
        let mut b = DarkStats::new(4);
        b.accumulate(x.slice(s![123.., ..]), e.slice(s![123.., ..]))
            .unwrap();
        let mut chained = a.clone();
        chained
            .accumulate(x.slice(s![123.., ..]), e.slice(s![123.., ..]))
            .unwrap();
        a.merge(&b).unwrap();
        let cfg = DarkConfig::default();
        let h1 = DarkHead::fit(&one, &cfg, None).unwrap().head;
        for stats in [&a, &chained] {
            assert_eq!(stats.rows(), 300);
            let h2 = DarkHead::fit(stats, &cfg, None).unwrap().head;
            for (p, q) in h1.a.iter().zip(&h2.a) {
                assert!((p - q).abs() < 1e-5);
            }
            assert!((h1.sigma - h2.sigma).abs() < 1e-5 * h1.sigma);
        }
    }

    #[test]
    fn ridge_shrinks_the_coefficients() {
        let (x, e, _, _) = linear_data(200, 5, 0.5, 3);
        let mut stats = DarkStats::new(5);
        stats.accumulate(x.view(), e.view()).unwrap();
        let norm = |ridge: f64| {
            let h = DarkHead::fit(&stats, &DarkConfig { ridge }, None)
                .unwrap()
                .head;
            h.a.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>()
        };
        let (n0, n1, n2) = (norm(0.0), norm(1.0), norm(100.0));
        assert!(n0 > n1 && n1 > n2, "{n0} {n1} {n2}");
        assert!(n2 < 0.05 * n0);
    }

    #[test]
    fn degenerate_inputs_error_or_regularise_without_nan() {
        let d = 6;
        // Fewer rows than features, one constant feature.
        let mut rng = Rng::new(5);
        let mut x = Array2::from_shape_fn((3, d), |_| rng.uniform(-1.0, 1.0));
        x.column_mut(2).fill(4.0);
        let e = Array2::from_shape_fn((3, d), |_| rng.uniform(-1.0, 1.0));
        let mut stats = DarkStats::new(d);
        stats.accumulate(x.view(), e.view()).unwrap();
        assert!(matches!(
            DarkHead::fit(&stats, &DarkConfig { ridge: 0.0 }, None),
            Err(DarkError::NotPositiveDefinite { .. })
        ));
        let fit = DarkHead::fit(&stats, &DarkConfig::default(), None).unwrap();
        let mut ws = fit.head.workspace(3);
        let scores = fit.head.score(x.view(), e.view(), &mut ws).unwrap();
        assert!(scores.iter().all(|s| s.deviation.is_finite()
            && s.nonlinear_sq_norm.is_finite()
            && s.predicted_sq_norm.is_finite()));
        assert!(fit.head.a.iter().all(|v| v.is_finite()));
        // All features constant: no variance at all, still finite.
        let xc = Array2::from_elem((4, d), 1.5f32);
        let mut sc = DarkStats::new(d);
        sc.accumulate(xc.view(), e.slice(s![..3, ..]).to_owned().view())
            .unwrap_err();
        sc.accumulate(xc.view(), Array2::from_elem((4, d), 0.5).view())
            .unwrap();
        let h = DarkHead::fit(&sc, &DarkConfig::default(), None)
            .unwrap()
            .head;
        assert!(h.a.iter().all(|v| v.is_finite()) && h.sigma.is_finite() && h.sigma > 0.0);
        // No rows, bad ridge, wrong width, NaN.
        assert!(matches!(
            DarkHead::fit(&DarkStats::new(d), &DarkConfig::default(), None),
            Err(DarkError::NoRows)
        ));
        assert!(matches!(
            DarkHead::fit(&stats, &DarkConfig { ridge: f64::NAN }, None),
            Err(DarkError::BadRidge(_))
        ));
        let mut bad = x.clone();
        bad[[1, 1]] = f32::NAN;
        assert!(matches!(
            stats.accumulate(bad.view(), e.view()),
            Err(DarkError::NonFinite {
                what: "x",
                row: 1,
                col: 1
            })
        ));
        assert_eq!(stats.rows(), 3);
        assert!(matches!(
            stats.accumulate(x.slice(s![.., ..5]), e.view()),
            Err(DarkError::Width { .. })
        ));
    }

    #[test]
    fn cholesky_matches_a_hand_computation() {
        // [[4, 2], [2, 3]] = L Lᵀ with L = [[2, 0], [1, √2]].
        let mut m = ndarray::arr2(&[[4.0, 2.0], [2.0, 3.0]]);
        cholesky(&mut m).unwrap();
        assert!((m[[0, 0]] - 2.0).abs() < 1e-12);
        assert!((m[[1, 0]] - 1.0).abs() < 1e-12);
        assert!((m[[1, 1]] - 2f64.sqrt()).abs() < 1e-12);
        // Solve [[4,2],[2,3]] x = [2, 5] → x = [-0.5, 2].
        let mut b = ndarray::arr2(&[[2.0], [5.0]]);
        cholesky_solve(&m, &mut b);
        assert!((b[[0, 0]] + 0.5).abs() < 1e-12 && (b[[1, 0]] - 2.0).abs() < 1e-12);
        let mut not_pd = ndarray::arr2(&[[1.0, 2.0], [2.0, 1.0]]);
        assert_eq!(cholesky(&mut not_pd), Err(1));
    }

    #[test]
    fn save_and_load_round_trip() {
        let (x, e, _, _) = linear_data(100, 3, 0.1, 6);
        let mut stats = DarkStats::new(3);
        stats.accumulate(x.view(), e.view()).unwrap();
        let head = DarkHead::fit(&stats, &DarkConfig::default(), None)
            .unwrap()
            .head;
        let dir = tempfile::tempdir().unwrap();
        head.save(dir.path()).unwrap();
        let back = DarkHead::load(dir.path()).unwrap();
        // Tensors are bit-exact; JSON floats round-trip to within an ulp or so.
        assert_eq!((&back.a, &back.b, &back.w), (&head.a, &head.b, &head.w));
        assert!((back.c - head.c).abs() <= 1e-6 * head.c.abs());
        assert!((back.sigma - head.sigma).abs() <= 1e-6 * head.sigma);
        assert!((back.lambda() - head.lambda()).abs() <= 1e-12 * head.lambda());
        assert_eq!(back.meta.fit_rows, 100);
        fs::write(dir.path().join(DARK_WEIGHTS_FILE), b"junk").unwrap();
        let err = DarkHead::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains(DARK_WEIGHTS_FILE), "{err}");
    }

    /// The skip a head was fitted with survives the file, and a head written before it was
    /// recorded (no `skip_positions` key) loads as not recorded, which counts as 0.
    #[test]
    fn skip_positions_round_trip_and_old_heads_load_without_it() {
        use super::super::positions::PositionsFrom;
        let (x, e, _, _) = linear_data(100, 3, 0.1, 6);
        let mut stats = DarkStats::new(3);
        stats.accumulate(x.view(), e.view()).unwrap();
        let mut head = DarkHead::fit(&stats, &DarkConfig::default(), None)
            .unwrap()
            .head;
        let dir = tempfile::tempdir().unwrap();
        head.save(dir.path()).unwrap();
        let json = fs::read_to_string(dir.path().join(DARK_META_FILE)).unwrap();
        assert!(!json.contains("skip_positions"), "{json}");
        let old = DarkHead::load(dir.path()).unwrap();
        assert_eq!((old.skip_positions(), old.positions_from()), (None, None));

        head.record_positions(2, PositionsFrom::PromptIds);
        head.save(dir.path()).unwrap();
        let json = fs::read_to_string(dir.path().join(DARK_META_FILE)).unwrap();
        assert!(
            json.contains("\"skip_positions\": 2")
                && json.contains("\"positions_from\": \"prompt_ids\""),
            "{json}"
        );
        let back = DarkHead::load(dir.path()).unwrap();
        assert_eq!(back.skip_positions(), Some(2));
        assert_eq!(back.positions_from(), Some(PositionsFrom::PromptIds));

        // 0 with unknown positions is recorded as such, not dropped.
        head.record_positions(0, PositionsFrom::Unknown);
        head.save(dir.path()).unwrap();
        let back = DarkHead::load(dir.path()).unwrap();
        assert_eq!(
            (back.skip_positions(), back.positions_from()),
            (Some(0), Some(PositionsFrom::Unknown))
        );

        // A value of the wrong type is refused, naming the file and the key.
        let bad = json.replace("\"skip_positions\": 2", "\"skip_positions\": -1");
        fs::write(dir.path().join(DARK_META_FILE), bad).unwrap();
        let err = DarkHead::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains(DARK_META_FILE) && err.contains("-1"), "{err}");
    }
}
