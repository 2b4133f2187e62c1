//! Native TopK SAE training (Gao et al. 2024, papers.md §5), for users without a published SAE.
//!
//! The model is the SAELens TopK layout with `apply_b_dec_to_input = true` (b_pre = b_dec):
//!
//! ```text
//! pre = (x − b_dec)·W_enc + b_enc          z = ReLU(TopK_k(pre))          x̂ = z·W_dec + b_dec
//! ```
//!
//! What the trainer does, and where each piece comes from:
//!
//! - **b_dec at the geometric median** of the training rows ([`geometric_median`], Weiszfeld
//!   iterations in f64 from the mean; openai `init_from_data_`).
//! - **Tied initialisation**: decoder rows are random Gaussian directions of unit norm and
//!   `W_enc = W_decᵀ` (so `W_enc`'s columns are unit norm too); `b_enc = 0`.
//! - **Loss** = normalised MSE + α·AuxK. The main term is Σ_batch‖x − x̂‖² / (B·V), with V
//!   the mean of ‖x − x̄‖² over the training rows (the paper's MSE scaled by the error of
//!   predicting the mean). AuxK (sparsify's form): among the latents *dead* at the start of
//!   the step, take the `k_aux` largest positive pre-activations of each row, decode them
//!   without bias (ê), and add α·min(n_dead/k_aux, 1)·Σ‖ê − e‖² / Σ‖e − ē‖² with e = x − x̂
//!   held fixed (x̂ detached). α = 1/32; `k_aux` defaults to d_in/2 (the paper's App. B.1
//!   heuristic, as sparsify). A latent is dead when it has not fired for
//!   `dead_tokens` training tokens (default: one epoch, since the paper's 10M tokens is more
//!   than small data sets hold).
//! - **Unit-norm decoder**: before each Adam step the gradient component parallel to each
//!   decoder row is removed (gᵢ ← gᵢ − (gᵢ·wᵢ)wᵢ); after the step every row is renormalised.
//! - **Adam** (β = 0.9, 0.999, ε = 6.25e-10 as openai), constant learning rate, mini-batches
//!   of shuffled rows.
//!
//! Everything is single-threaded and seeded ([`crate::rng::Rng`]): the same data, config and
//! seed give bit-identical weights. Top-k ties are broken towards the lower latent index.
//!
//! Reported ([`SaeTrainReport`]): per epoch the running normalised MSE of the epoch's batches,
//! the held-out normalised MSE (if held-out rows are given), the share of latents dead by the
//! `dead_tokens` rule, and the mean AuxK term; at the end, with the final weights through
//! [`Sae::forward`], the normalised MSE Σ‖x − x̂‖²/Σ‖x − x̄‖² on the training and held-out rows,
//! the share of latents that fire on no training row, and the mean L0.
//!
//! [`save_saelens`] writes a SAELens v6 folder (`cfg.json` + `sae_weights.safetensors`, f32)
//! that [`Sae::load`] (and SAELens) read back.

use std::fs;
use std::path::{Path, PathBuf};

use ndarray::linalg::general_mat_mul;
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis};
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use super::{CONFIG_FILE, Normalization, SAELENS_WEIGHTS, Sae, SaeActivation, SaeError, SaeParts};
use crate::rng::Rng;

/// Settings of [`train_topk`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SaeTrainConfig {
    /// Number of latents (d_sae).
    pub latents: usize,
    /// Active latents per token.
    pub k: usize,
    /// Passes over the training rows.
    pub epochs: usize,
    /// Rows per Adam step.
    pub batch_size: usize,
    /// Adam learning rate (constant).
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub adam_eps: f32,
    /// Weight α of the AuxK term (0 switches AuxK off).
    pub aux_alpha: f32,
    /// Latents decoded by AuxK per row; `None` = d_in/2 (at least 1, at most `latents`).
    pub k_aux: Option<usize>,
    /// A latent is dead after this many training tokens without firing; `None` = one epoch.
    pub dead_tokens: Option<u64>,
    /// Weiszfeld iterations for the geometric median (stops early when it moves < 1e-7·scale).
    pub median_iters: usize,
    pub seed: u64,
}

impl Default for SaeTrainConfig {
    fn default() -> Self {
        SaeTrainConfig {
            latents: 1536,
            k: 32,
            epochs: 30,
            batch_size: 64,
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 6.25e-10,
            aux_alpha: 1.0 / 32.0,
            k_aux: None,
            dead_tokens: None,
            median_iters: 200,
            seed: 0,
        }
    }
}

/// Why training cannot run.
#[derive(Debug, thiserror::Error)]
pub enum SaeTrainError {
    #[error("SAE training config: {0}")]
    Config(String),
    #[error("SAE training data: {0}")]
    Data(String),
    #[error(transparent)]
    Sae(#[from] SaeError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Save { path: PathBuf, reason: String },
}

/// Numbers after one epoch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EpochStats {
    /// 1-based.
    pub epoch: usize,
    /// Σ‖x − x̂‖² over the epoch's batches (weights changing as they go) / Σ‖x − x̄‖².
    pub train_nmse: f64,
    /// Normalised MSE on the held-out rows with the weights at the end of the epoch; `None`
    /// without held-out rows or where it is not defined (see [`defined_nmse`]).
    pub held_out_nmse: Option<f64>,
    /// Share of latents dead by the `dead_tokens` rule at the end of the epoch.
    pub dead_share: f64,
    /// Mean over the epoch's steps of the weighted AuxK term (0 when nothing is dead).
    pub aux_loss: f64,
}

/// What training measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SaeTrainReport {
    pub config: SaeTrainConfig,
    pub rows: usize,
    pub held_out_rows: usize,
    pub d_in: usize,
    /// The `k_aux` and `dead_tokens` actually used.
    pub k_aux: usize,
    pub dead_tokens: u64,
    pub steps: usize,
    pub epochs: Vec<EpochStats>,
    /// Final normalised MSE Σ‖x − x̂‖²/Σ‖x − x̄‖² on the training rows.
    pub train_nmse: f64,
    /// The same on the held-out rows (their own mean); `None` without held-out rows or where
    /// it is not defined ([`defined_nmse`]: one held-out row, or equal ones).
    pub held_out_nmse: Option<f64>,
    /// Share of latents that fire on no training row with the final weights.
    pub dead_share: f64,
    /// Share dead by the `dead_tokens` rule at the end of training.
    pub dead_share_tracked: f64,
    /// Mean number of active latents per training row.
    pub mean_l0: f64,
}

/// A share of dead latents (firing on no training row) above which `sae-train` warns: a
/// tenth of the dictionary wasted is more than AuxK should leave.
pub const DEAD_SHARE_WARN: f64 = 0.1;

impl SaeTrainReport {
    /// The epoch (1-based) with the lowest held-out normalised MSE, and that MSE; `None`
    /// without held-out numbers.
    pub fn best_held_out_epoch(&self) -> Option<(usize, f64)> {
        self.epochs
            .iter()
            .filter_map(|e| e.held_out_nmse.map(|v| (e.epoch, v)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
    }

    /// The lines `sae-train` prints after its summary: the best held-out epoch when it is not
    /// the last (the SAE written is the last), and a warning when more than
    /// [`DEAD_SHARE_WARN`] of the latents are dead.
    pub fn notes(&self) -> String {
        let mut text = String::new();
        if let (Some((best, v)), Some(last)) = (self.best_held_out_epoch(), self.epochs.last())
            && best != last.epoch
            && let Some(end) = last.held_out_nmse
        {
            text.push_str(&format!(
                "held-out normalised MSE was lowest at epoch {best} ({v:.4}); the SAE written \
                 is epoch {}'s ({end:.4}): --epochs {best} would stop there\n",
                last.epoch
            ));
        }
        if self.dead_share > DEAD_SHARE_WARN {
            text.push_str(&format!(
                "warning: {:.1} % of the {} latents are dead (fire on no training row): fewer \
                 --latents, more rows or more --epochs would use the dictionary better\n",
                100.0 * self.dead_share,
                self.config.latents
            ));
        }
        text
    }
}

/// A trained SAE: ready to run, its arrays (for [`save_saelens`]) and the report.
#[derive(Debug, Clone)]
pub struct TrainedSae {
    pub sae: Sae,
    pub parts: SaeParts,
    pub report: SaeTrainReport,
}

/// Normalised MSE, dead share and mean L0 of an SAE on some rows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SaeFit {
    /// Σ‖x − x̂‖² / Σ‖x − x̄‖² (1 for predicting the rows' mean; 0 when there is no variance and
    /// no error).
    pub nmse: f64,
    /// Share of latents active on none of the rows.
    pub dead_share: f64,
    pub mean_l0: f64,
}

/// Runs `sae` over `x` in batches and reports normalised MSE, dead share and mean L0.
///
/// # Errors
/// [`SaeError::InputWidth`] when `x` does not have `d_in` columns; [`SaeError::Invalid`] for
/// no rows.
pub fn evaluate_sae(sae: &Sae, x: ArrayView2<f32>) -> Result<SaeFit, SaeError> {
    if x.nrows() == 0 {
        return Err(SaeError::Invalid("no rows to evaluate".into()));
    }
    let mean = mean_rows(x);
    let tss: f64 = x.rows().into_iter().map(|r| sq_dist(r, mean.view())).sum();
    let mut ws = sae.workspace(256);
    let mut fired = vec![false; sae.d_sae()];
    let (mut rss, mut l0) = (0.0f64, 0usize);
    let mut active = Vec::new();
    for chunk in x.axis_chunks_iter(Axis(0), 256) {
        let out = sae.forward(chunk, &mut ws)?;
        for r in 0..out.len() {
            rss += f64::from(out.error_sq_norm()[r]);
            l0 += out.l0(r);
            out.active(r, &mut active);
            for &(j, _) in &active {
                fired[j] = true;
            }
        }
    }
    Ok(SaeFit {
        nmse: ratio(rss, tss),
        dead_share: fired.iter().filter(|f| !**f).count() as f64 / fired.len() as f64,
        mean_l0: l0 as f64 / x.nrows() as f64,
    })
}

/// Whether the normalised MSE is defined on rows `x`: it divides by their spread around
/// their mean, which takes at least 2 rows that differ.
fn has_spread(x: ArrayView2<f32>) -> bool {
    x.nrows() >= 2 && x.rows().into_iter().any(|r| r != x.row(0))
}

/// The normalised MSE of `sae` on `x` ([`evaluate_sae`]) where it is defined: at least 2 rows
/// that differ. `None` otherwise: on one row, or on equal rows, it would be `inf` (or 0).
///
/// # Errors
/// As [`evaluate_sae`].
pub fn defined_nmse(sae: &Sae, x: ArrayView2<f32>) -> Result<Option<f64>, SaeError> {
    if x.nrows() < 2 {
        return Ok(None);
    }
    let nmse = evaluate_sae(sae, x)?.nmse;
    Ok((has_spread(x) && nmse.is_finite()).then_some(nmse))
}

/// [`defined_nmse`] from the SAE's ‖e‖² of each row of `x`, as its forward pass gave them
/// (`SaeOutput::error_sq_norm`), summed in row order as [`evaluate_sae`] sums them: the same
/// value, for a caller that has run the SAE over the rows already.
///
/// # Panics
/// When `error_sq` does not hold one value per row of `x`.
pub fn defined_nmse_of_errors(x: ArrayView2<f32>, error_sq: &[f32]) -> Option<f64> {
    assert_eq!(x.nrows(), error_sq.len(), "one ‖e‖² per row");
    if x.nrows() < 2 {
        return None;
    }
    let mean = mean_rows(x);
    let tss: f64 = x.rows().into_iter().map(|r| sq_dist(r, mean.view())).sum();
    // A fold from +0.0, as `evaluate_sae` adds (a float `sum` starts from −0.0).
    let rss = error_sq.iter().fold(0.0f64, |a, &v| a + f64::from(v));
    nmse_where_defined(rss, tss, has_spread(x))
}

/// The normalised MSE rss / tss of rows whose spread around their mean is `tss`, where it is
/// defined: `spread` (at least 2 rows that differ) and finite. Shared with `sae-score`'s
/// streamed pass, which sums rss and tss a block of rows at a time in the same order.
pub(crate) fn nmse_where_defined(rss: f64, tss: f64, spread: bool) -> Option<f64> {
    let nmse = ratio(rss, tss);
    (spread && nmse.is_finite()).then_some(nmse)
}

fn ratio(rss: f64, tss: f64) -> f64 {
    if tss > 0.0 {
        rss / tss
    } else if rss > 0.0 {
        f64::INFINITY
    } else {
        0.0
    }
}

fn mean_rows(x: ArrayView2<f32>) -> Array1<f64> {
    let mut m = Array1::<f64>::zeros(x.ncols());
    for row in x.rows() {
        for (a, &v) in m.iter_mut().zip(&row) {
            *a += f64::from(v);
        }
    }
    m / x.nrows().max(1) as f64
}

/// ‖a − b‖², summed in f64 over the columns in order.
pub(crate) fn sq_dist(a: ArrayView1<f32>, b: ArrayView1<f64>) -> f64 {
    a.iter()
        .zip(&b)
        .map(|(&x, &y)| (f64::from(x) - y).powi(2))
        .sum()
}

/// The geometric median of the rows of `x` (the point minimising Σ‖xᵢ − m‖), by Weiszfeld's
/// iterations in f64 from the mean, at most `max_iters` of them, stopping when a step moves
/// less than 1e-7 of the data's RMS spread. A row that coincides with the iterate is skipped
/// in that step (the usual guard). An empty `x` gives zeros.
pub fn geometric_median(x: ArrayView2<f32>, max_iters: usize) -> Array1<f32> {
    let (n, d) = x.dim();
    if n == 0 {
        return Array1::zeros(d);
    }
    let mut m = mean_rows(x);
    let spread = (x
        .rows()
        .into_iter()
        .map(|r| sq_dist(r, m.view()))
        .sum::<f64>()
        / n as f64)
        .sqrt();
    let tol = 1e-7 * spread.max(f64::MIN_POSITIVE);
    let mut next = Array1::<f64>::zeros(d);
    for _ in 0..max_iters {
        next.fill(0.0);
        let mut wsum = 0.0;
        for row in x.rows() {
            let dist = sq_dist(row, m.view()).sqrt();
            if dist <= tol * 1e-3 {
                continue;
            }
            let w = 1.0 / dist;
            wsum += w;
            for (a, &v) in next.iter_mut().zip(&row) {
                *a += w * f64::from(v);
            }
        }
        if wsum == 0.0 {
            break;
        }
        next /= wsum;
        let moved = next
            .iter()
            .zip(&m)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        m.assign(&next);
        if moved < tol {
            break;
        }
    }
    m.mapv(|v| v as f32)
}

/// Adam moments of one parameter array (flat).
struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Adam {
    fn new(n: usize) -> Adam {
        Adam {
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    /// One step on `p` with gradient `g`; `c1`, `c2` are the bias corrections 1 − βᵗ.
    fn step(&mut self, p: &mut [f32], g: &[f32], cfg: &SaeTrainConfig, c1: f32, c2: f32) {
        let (b1, b2) = (cfg.beta1, cfg.beta2);
        let lr = cfg.lr / c1;
        let inv_c2 = 1.0 / c2;
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(&mut self.m).zip(&mut self.v) {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *p -= lr * *m / ((*v * inv_c2).sqrt() + cfg.adam_eps);
        }
    }
}

/// The parameters while training: encoder stored by latent (`[n, d]`, = W_encᵀ) so that a
/// latent's encoder and decoder rows are both contiguous.
struct Params {
    w_enc_t: Array2<f32>,
    b_enc: Array1<f32>,
    w_dec: Array2<f32>,
    b_dec: Array1<f32>,
}

/// Selects the `k` largest of `pre` among `candidates` (all latents when `None`), keeping
/// only positive values, into `out` as (latent, value). Ties go to the lower index.
fn top_k_positive(
    pre: &[f32],
    k: usize,
    candidates: Option<&[u32]>,
    scratch: &mut Vec<u32>,
    out: &mut Vec<(u32, f32)>,
) {
    scratch.clear();
    match candidates {
        Some(c) => scratch.extend(c.iter().copied().filter(|&j| pre[j as usize] > 0.0)),
        None => scratch.extend((0..pre.len() as u32).filter(|&j| pre[j as usize] > 0.0)),
    }
    let by_value = |a: &u32, b: &u32| pre[*b as usize].total_cmp(&pre[*a as usize]).then(a.cmp(b));
    if scratch.len() > k {
        scratch.select_nth_unstable_by(k - 1, by_value);
        scratch.truncate(k);
    }
    scratch.sort_unstable_by(by_value);
    out.clear();
    out.extend(scratch.iter().map(|&j| (j, pre[j as usize])));
}

impl SaeTrainConfig {
    /// Checks the settings for rows of width `d_in` (what [`train_topk`] checks first).
    ///
    /// # Errors
    /// [`SaeTrainError::Config`] naming the first bad setting.
    pub fn validate(&self, d_in: usize) -> Result<(), SaeTrainError> {
        check_config(self, d_in).map(|_| ())
    }
}

fn check_config(cfg: &SaeTrainConfig, d: usize) -> Result<(usize, SaeTrainConfig), SaeTrainError> {
    let bad = |s: String| Err(SaeTrainError::Config(s));
    if cfg.latents == 0 {
        return bad("latents must be positive".into());
    }
    if cfg.k == 0 || cfg.k > cfg.latents {
        return bad(format!(
            "k = {} must be in 1..={} (latents)",
            cfg.k, cfg.latents
        ));
    }
    if cfg.epochs == 0 {
        return bad(
            "epochs = 0 would leave the SAE untrained (its random initialisation); give at least 1"
                .into(),
        );
    }
    if cfg.batch_size == 0 {
        return bad("batch_size must be positive".into());
    }
    if !(cfg.lr.is_finite() && cfg.lr > 0.0) {
        return bad(format!("lr = {} must be finite and positive", cfg.lr));
    }
    for (name, b) in [("beta1", cfg.beta1), ("beta2", cfg.beta2)] {
        if !(0.0..1.0).contains(&b) {
            return bad(format!("{name} = {b} must be in [0, 1)"));
        }
    }
    if !(cfg.adam_eps.is_finite() && cfg.adam_eps >= 0.0) {
        return bad(format!(
            "adam_eps = {} must be finite and ≥ 0",
            cfg.adam_eps
        ));
    }
    if !(cfg.aux_alpha.is_finite() && cfg.aux_alpha >= 0.0) {
        return bad(format!(
            "aux_alpha = {} must be finite and ≥ 0",
            cfg.aux_alpha
        ));
    }
    let k_aux = cfg.k_aux.unwrap_or(d / 2).clamp(1, cfg.latents);
    if cfg.k_aux == Some(0) {
        return bad("k_aux must be positive".into());
    }
    if cfg.dead_tokens == Some(0) {
        return bad("dead_tokens must be positive".into());
    }
    Ok((k_aux, cfg.clone()))
}

fn check_rows(what: &str, x: ArrayView2<f32>, d: Option<usize>) -> Result<(), SaeTrainError> {
    if let Some(d) = d
        && x.ncols() != d
    {
        return Err(SaeTrainError::Data(format!(
            "{what} rows have {} features, the training rows {d}",
            x.ncols()
        )));
    }
    if let Some(((row, col), _)) = x.indexed_iter().find(|(_, v)| !v.is_finite()) {
        return Err(SaeTrainError::Data(format!(
            "{what}: row {row}, column {col} is not finite"
        )));
    }
    Ok(())
}

/// Trains a TopK SAE on the rows of `x` (`[n, d_in]`), reporting on `held_out` rows if given.
/// `on_epoch` is called after every epoch.
///
/// # Errors
/// [`SaeTrainError::Config`] for an invalid setting; [`SaeTrainError::Data`] for fewer than 2
/// rows, no columns, a width mismatch or a non-finite value.
pub fn train_topk(
    x: ArrayView2<f32>,
    held_out: Option<ArrayView2<f32>>,
    cfg: &SaeTrainConfig,
    on_epoch: &mut dyn FnMut(&EpochStats),
) -> Result<TrainedSae, SaeTrainError> {
    let (rows, d) = x.dim();
    if rows < 2 || d == 0 {
        return Err(SaeTrainError::Data(format!(
            "need at least 2 rows and 1 column, got [{rows}, {d}]"
        )));
    }
    check_rows("training data", x, None)?;
    if let Some(h) = held_out {
        check_rows("held-out data", h, Some(d))?;
    }
    let (k_aux, cfg) = check_config(cfg, d)?;
    let dead_tokens = cfg.dead_tokens.unwrap_or(rows as u64);
    let n = cfg.latents;
    let mut rng = Rng::new(cfg.seed);

    // Data statistics: V = mean ‖x − x̄‖² per row.
    let mean = mean_rows(x);
    let var_per_row = x
        .rows()
        .into_iter()
        .map(|r| sq_dist(r, mean.view()))
        .sum::<f64>()
        / rows as f64;
    let var_per_row = if var_per_row > 0.0 { var_per_row } else { 1.0 };

    let mut p = init_params(x, n, cfg.median_iters, &mut rng);
    let mut adam = [
        Adam::new(n * d),
        Adam::new(n),
        Adam::new(n * d),
        Adam::new(d),
    ];
    let mut g = Params {
        w_enc_t: Array2::zeros((n, d)),
        b_enc: Array1::zeros(n),
        w_dec: Array2::zeros((n, d)),
        b_dec: Array1::zeros(d),
    };

    let bs = cfg.batch_size.min(rows);
    let mut order: Vec<usize> = (0..rows).collect();
    let mut since_fired = vec![0u64; n];
    let mut xb = Array2::<f32>::zeros((bs, d));
    let mut pre = Array2::<f32>::zeros((bs, n));
    let mut err = Array2::<f32>::zeros((bs, d));
    let mut grad_out = vec![0.0f32; d];
    let mut grad_in = vec![0.0f32; d];
    let mut active: Vec<Vec<(u32, f32)>> = vec![Vec::new(); bs];
    let mut aux_active: Vec<(u32, f32)> = Vec::new();
    let mut scratch = Vec::new();
    let mut dead_list: Vec<u32> = Vec::new();
    let mut fired = vec![false; n];
    let (mut step, mut epochs) = (0usize, Vec::with_capacity(cfg.epochs));

    for epoch in 1..=cfg.epochs {
        rng.shuffle(&mut order);
        let (mut epoch_rss, mut aux_sum, mut epoch_steps) = (0.0f64, 0.0f64, 0usize);
        for batch in order.chunks(bs) {
            let b = batch.len();
            // Gather and centre: xb = x − b_dec.
            for (mut dst, &i) in xb.rows_mut().into_iter().zip(batch) {
                for ((o, &v), &c) in dst.iter_mut().zip(x.row(i)).zip(&p.b_dec) {
                    *o = v - c;
                }
            }
            let xc = xb.slice(ndarray::s![..b, ..]);
            let mut pre_b = pre.slice_mut(ndarray::s![..b, ..]);
            general_mat_mul(1.0, &xc, &p.w_enc_t.t(), 0.0, &mut pre_b);
            for mut row in pre_b.rows_mut() {
                row += &p.b_enc;
            }
            dead_list.clear();
            dead_list.extend((0..n as u32).filter(|&j| since_fired[j as usize] >= dead_tokens));
            fired.iter_mut().for_each(|f| *f = false);

            // Forward: top-k, reconstruction, error e = x − x̂ (kept in `err`).
            let mut rss = 0.0f64;
            for r in 0..b {
                let pre_r = pre.row(r);
                let pre_r = pre_r.as_slice().expect("pre rows are contiguous");
                top_k_positive(pre_r, cfg.k, None, &mut scratch, &mut active[r]);
                let mut e = err.row_mut(r);
                let xr = x.row(batch[r]);
                for ((o, &xv), &c) in e.iter_mut().zip(&xr).zip(&p.b_dec) {
                    *o = xv - c;
                }
                for &(j, v) in &active[r] {
                    fired[j as usize] = true;
                    for (o, &w) in e.iter_mut().zip(p.w_dec.row(j as usize)) {
                        *o -= v * w;
                    }
                }
                rss += e.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>();
            }
            epoch_rss += rss;

            // Gradients of L = Σ‖x̂ − x‖² / (B·V): dL/dx̂ = −2e/(B·V).
            g.w_enc_t.fill(0.0);
            g.b_enc.fill(0.0);
            g.w_dec.fill(0.0);
            g.b_dec.fill(0.0);
            let scale_main = (-2.0 / (b as f64 * var_per_row)) as f32;
            for (r, act) in active.iter().enumerate().take(b) {
                let e = err.row(r);
                for (o, &ev) in grad_out.iter_mut().zip(&e) {
                    *o = scale_main * ev;
                }
                g.b_dec
                    .iter_mut()
                    .zip(&grad_out)
                    .for_each(|(a, &v)| *a += v);
                backprop_latents(&p, &mut g, act, &grad_out, xb.row(r), &mut grad_in);
            }

            // AuxK on the latents dead at the start of the step.
            let mut aux_loss = 0.0f64;
            if cfg.aux_alpha > 0.0 && !dead_list.is_empty() {
                let e_mean = err.slice(ndarray::s![..b, ..]).mean_axis(Axis(0));
                let e_mean = e_mean.expect("b > 0");
                let tss_e: f64 = err
                    .rows()
                    .into_iter()
                    .take(b)
                    .map(|r| {
                        r.iter()
                            .zip(&e_mean)
                            .map(|(&v, &m)| f64::from(v - m).powi(2))
                            .sum::<f64>()
                    })
                    .sum();
                if tss_e > 0.0 {
                    let weight =
                        f64::from(cfg.aux_alpha) * (dead_list.len() as f64 / k_aux as f64).min(1.0);
                    let scale_aux = (2.0 * weight / tss_e) as f32;
                    let mut aux_rss = 0.0f64;
                    for r in 0..b {
                        let pre_r = pre.row(r);
                        let pre_r = pre_r.as_slice().expect("pre rows are contiguous");
                        top_k_positive(
                            pre_r,
                            k_aux,
                            Some(&dead_list),
                            &mut scratch,
                            &mut aux_active,
                        );
                        // ê − e, with ê decoded without bias.
                        for (o, &ev) in grad_out.iter_mut().zip(err.row(r)) {
                            *o = -ev;
                        }
                        for &(j, v) in &aux_active {
                            for (o, &w) in grad_out.iter_mut().zip(p.w_dec.row(j as usize)) {
                                *o += v * w;
                            }
                        }
                        aux_rss += grad_out
                            .iter()
                            .map(|&v| f64::from(v) * f64::from(v))
                            .sum::<f64>();
                        grad_out.iter_mut().for_each(|v| *v *= scale_aux);
                        backprop_latents(
                            &p,
                            &mut g,
                            &aux_active,
                            &grad_out,
                            xb.row(r),
                            &mut grad_in,
                        );
                    }
                    aux_loss = weight * aux_rss / tss_e;
                }
            }
            aux_sum += aux_loss;

            // Remove the gradient component parallel to each (unit) decoder row.
            for (mut gr, wr) in g.w_dec.rows_mut().into_iter().zip(p.w_dec.rows()) {
                let dot: f32 = gr.iter().zip(&wr).map(|(a, b)| a * b).sum();
                if dot != 0.0 {
                    gr.zip_mut_with(&wr, |a, &w| *a -= dot * w);
                }
            }

            // Adam, then unit-norm decoder rows.
            step += 1;
            let c1 = 1.0 - cfg.beta1.powi(step.min(i32::MAX as usize) as i32);
            let c2 = 1.0 - cfg.beta2.powi(step.min(i32::MAX as usize) as i32);
            let tensors = [
                (p.w_enc_t.as_slice_mut(), g.w_enc_t.as_slice()),
                (p.b_enc.as_slice_mut(), g.b_enc.as_slice()),
                (p.w_dec.as_slice_mut(), g.w_dec.as_slice()),
                (p.b_dec.as_slice_mut(), g.b_dec.as_slice()),
            ];
            for (opt, (param, grad)) in adam.iter_mut().zip(tensors) {
                let (param, grad) = (
                    param.expect("standard layout"),
                    grad.expect("standard layout"),
                );
                opt.step(param, grad, &cfg, c1, c2);
            }
            normalise_rows(&mut p.w_dec);

            for (s, &f) in since_fired.iter_mut().zip(&fired) {
                *s = if f { 0 } else { s.saturating_add(b as u64) };
            }
            epoch_steps += 1;
        }
        let held_out_nmse = held_out
            .filter(|&h| has_spread(h))
            .map(|h| nmse_params(&p, h, cfg.k))
            .filter(|v| v.is_finite());
        let stats = EpochStats {
            epoch,
            train_nmse: epoch_rss / (var_per_row * rows as f64),
            held_out_nmse,
            dead_share: since_fired.iter().filter(|&&s| s >= dead_tokens).count() as f64 / n as f64,
            aux_loss: aux_sum / epoch_steps.max(1) as f64,
        };
        on_epoch(&stats);
        epochs.push(stats);
    }

    let parts = SaeParts {
        w_enc: p.w_enc_t.t().as_standard_layout().into_owned(),
        b_enc: p.b_enc.clone(),
        w_dec: p.w_dec.clone(),
        b_dec: p.b_dec.clone(),
        threshold: None,
        activation: SaeActivation::TopK { k: cfg.k },
        apply_b_dec_to_input: true,
        normalization: Normalization::None,
    };
    let sae = Sae::from_parts(parts.clone())?;
    let fit = evaluate_sae(&sae, x)?;
    let held = match held_out {
        Some(h) => defined_nmse(&sae, h)?,
        None => None,
    };
    let report = SaeTrainReport {
        config: cfg.clone(),
        rows,
        held_out_rows: held_out.map_or(0, |h| h.nrows()),
        d_in: d,
        k_aux,
        dead_tokens,
        steps: step,
        epochs,
        train_nmse: fit.nmse,
        held_out_nmse: held,
        dead_share: fit.dead_share,
        dead_share_tracked: since_fired.iter().filter(|&&s| s >= dead_tokens).count() as f64
            / n as f64,
        mean_l0: fit.mean_l0,
    };
    Ok(TrainedSae { sae, parts, report })
}

/// The starting parameters for `latents` latents on rows `x`: b_dec at their geometric
/// median; tied unit-norm W_dec = W_encᵀ, in random directions drawn from `rng`; b_enc = 0.
fn init_params(x: ArrayView2<f32>, latents: usize, median_iters: usize, rng: &mut Rng) -> Params {
    let b_dec = geometric_median(x, median_iters);
    let mut w_dec = Array2::from_shape_simple_fn((latents, x.ncols()), || gaussian(rng));
    normalise_rows(&mut w_dec);
    Params {
        w_enc_t: w_dec.clone(),
        b_enc: Array1::zeros(latents),
        w_dec,
        b_dec,
    }
}

/// Backpropagates `grad_out` (dL/dx̂ of one row) through the decoder rows of the `active`
/// latents and the encoder: W_dec, b_enc, W_enc and, through x − b_dec, b_dec.
fn backprop_latents(
    p: &Params,
    g: &mut Params,
    active: &[(u32, f32)],
    grad_out: &[f32],
    xc: ArrayView1<f32>,
    grad_in: &mut [f32],
) {
    if active.is_empty() {
        return;
    }
    grad_in.iter_mut().for_each(|v| *v = 0.0);
    for &(j, v) in active {
        let j = j as usize;
        let w = p.w_dec.row(j);
        let mut dz = 0.0f32;
        for ((gw, &go), &wv) in g.w_dec.row_mut(j).iter_mut().zip(grad_out).zip(&w) {
            *gw += v * go;
            dz += go * wv;
        }
        g.b_enc[j] += dz;
        for (ge, &xv) in g.w_enc_t.row_mut(j).iter_mut().zip(&xc) {
            *ge += dz * xv;
        }
        for (gi, &we) in grad_in.iter_mut().zip(p.w_enc_t.row(j)) {
            *gi += dz * we;
        }
    }
    for (gb, &gi) in g.b_dec.iter_mut().zip(grad_in.iter()) {
        *gb -= gi;
    }
}

/// Normalised MSE of the in-training parameters on `x` (same forward as training).
fn nmse_params(p: &Params, x: ArrayView2<f32>, k: usize) -> f64 {
    if x.nrows() == 0 {
        return f64::NAN;
    }
    let mean = mean_rows(x);
    let tss: f64 = x.rows().into_iter().map(|r| sq_dist(r, mean.view())).sum();
    let n = p.b_enc.len();
    let mut rss = 0.0;
    let (mut scratch, mut active) = (Vec::new(), Vec::new());
    for chunk in x.axis_chunks_iter(Axis(0), 256) {
        let xc = &chunk - &p.b_dec;
        let mut pre = Array2::<f32>::zeros((chunk.nrows(), n));
        general_mat_mul(1.0, &xc, &p.w_enc_t.t(), 0.0, &mut pre);
        for (mut row, xr) in pre.rows_mut().into_iter().zip(xc.rows()) {
            row += &p.b_enc;
            top_k_positive(
                row.as_slice().expect("contiguous"),
                k,
                None,
                &mut scratch,
                &mut active,
            );
            let mut e = xr.to_owned();
            for &(j, v) in &active {
                e.scaled_add(-v, &p.w_dec.row(j as usize));
            }
            rss += e.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>();
        }
    }
    ratio(rss, tss)
}

/// Standard normal by Box–Muller (one value per call; deterministic in the stream).
fn gaussian(rng: &mut Rng) -> f32 {
    let u1 = rng.next_f64().max(f64::MIN_POSITIVE);
    let u2 = rng.next_f64();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

fn normalise_rows(w: &mut Array2<f32>) {
    for mut row in w.rows_mut() {
        let norm = row
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt();
        if norm > 0.0 {
            let inv = (1.0 / norm) as f32;
            row.mapv_inplace(|v| v * inv);
        }
    }
}

/// Where a saved SAE came from, for `cfg.json`'s `metadata`.
#[derive(Debug, Clone, Default)]
pub struct SaveMeta {
    /// `metadata.model_name` (e.g. `all-MiniLM-L6-v2`).
    pub model_name: Option<String>,
    /// `metadata.hook_name` (e.g. `blocks.3.hook_resid_post`).
    pub hook_name: Option<String>,
    /// `metadata.dataset_path`.
    pub dataset_path: Option<String>,
}

/// Writes `parts` as a SAELens v6 folder: `cfg.json` and `sae_weights.safetensors` (`W_enc`
/// `[d_in, d_sae]`, `b_enc`, `W_dec` `[d_sae, d_in]`, `b_dec`, plus `threshold` for JumpReLU;
/// all F32). `dir` is created if needed; existing files of those names are replaced.
///
/// # Errors
/// [`SaeTrainError::Save`] for parts that do not form a valid SAE or a normalisation SAELens
/// cannot store (`expected_average_only_in` with a factor); [`SaeTrainError::Io`] naming the
/// file that could not be written.
pub fn save_saelens(parts: &SaeParts, dir: &Path, meta: &SaveMeta) -> Result<(), SaeTrainError> {
    let cfg_path = dir.join(CONFIG_FILE);
    let weights_path = dir.join(SAELENS_WEIGHTS);
    // Validate through the same checks a load will make.
    Sae::from_parts(parts.clone()).map_err(|e| SaeTrainError::Save {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    if let Normalization::ExpectedAverageOnlyIn {
        scaling_factor: Some(_),
    } = parts.normalization
    {
        return Err(SaeTrainError::Save {
            path: cfg_path,
            reason: "SAELens keeps the expected_average_only_in factor outside the checkpoint; \
                     fold it into the weights before saving"
                .into(),
        });
    }
    let (d_in, d_sae) = parts.w_enc.dim();
    let mut cfg = serde_json::json!({
        "architecture": match parts.activation {
            SaeActivation::Relu => "standard",
            SaeActivation::TopK { .. } => "topk",
            SaeActivation::JumpRelu => "jumprelu",
        },
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": parts.apply_b_dec_to_input,
        "normalize_activations": parts.normalization.name(),
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.0.0",
            "trained_by": concat!("darkwatch ", env!("CARGO_PKG_VERSION")),
            "model_name": meta.model_name,
            "hook_name": meta.hook_name,
            "dataset_path": meta.dataset_path,
        },
    });
    if let SaeActivation::TopK { k } = parts.activation {
        cfg["k"] = k.into();
        cfg["rescale_acts_by_decoder_norm"] = false.into();
    }
    let bytes = |a: &[f32]| a.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let std2 = |a: &Array2<f32>| bytes(a.as_standard_layout().as_slice().expect("standard"));
    let std1 = |a: &Array1<f32>| bytes(&a.to_vec());
    let mut data: Vec<(&str, Vec<usize>, Vec<u8>)> = vec![
        ("W_enc", vec![d_in, d_sae], std2(&parts.w_enc)),
        ("b_enc", vec![d_sae], std1(&parts.b_enc)),
        ("W_dec", vec![d_sae, d_in], std2(&parts.w_dec)),
        ("b_dec", vec![d_in], std1(&parts.b_dec)),
    ];
    if let (SaeActivation::JumpRelu, Some(t)) = (parts.activation, &parts.threshold) {
        data.push(("threshold", vec![d_sae], std1(t)));
    }
    let save_err = |reason: String| SaeTrainError::Save {
        path: weights_path.clone(),
        reason,
    };
    let mut views = Vec::with_capacity(data.len());
    for (name, shape, buf) in &data {
        let view =
            TensorView::new(Dtype::F32, shape.clone(), buf).map_err(|e| save_err(e.to_string()))?;
        views.push((*name, view));
    }
    let st = safetensors::serialize(views, None).map_err(|e| save_err(e.to_string()))?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SaeTrainError::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io(dir))?;
    fs::write(&weights_path, st).map_err(io(&weights_path))?;
    let json = serde_json::to_vec_pretty(&cfg).map_err(|e| SaeTrainError::Save {
        path: cfg_path.clone(),
        reason: e.to_string(),
    })?;
    fs::write(&cfg_path, json).map_err(io(&cfg_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `rows` samples of `active` atoms (of `atoms` random unit directions in R^d) with
    /// coefficients uniform in [0.5, 1.5], plus a constant offset.
    fn synthetic(rows: usize, d: usize, atoms: usize, active: usize, seed: u64) -> Array2<f32> {
        let mut rng = Rng::new(seed);
        let mut dict = Array2::from_shape_simple_fn((atoms, d), || gaussian(&mut rng));
        normalise_rows(&mut dict);
        let offset = Array1::from_shape_simple_fn(d, || rng.uniform(-1.0, 1.0));
        let mut x = Array2::zeros((rows, d));
        for mut row in x.rows_mut() {
            row.assign(&offset);
            let mut picks: Vec<usize> = (0..atoms).collect();
            rng.shuffle(&mut picks);
            for &a in &picks[..active] {
                row.scaled_add(rng.uniform(0.5, 1.5), &dict.row(a));
            }
        }
        x
    }

    #[test]
    fn learns_a_sparse_dictionary() {
        // 64 atoms in d = 32, 3 active per sample. (At d = 16 the atoms are so coherent that a
        // linear encoder picks wrong atoms often and training plateaus near NMSE 0.15.)
        let all = synthetic(3500, 32, 64, 3, 1);
        let (train, test) = all.view().split_at(Axis(0), 3000);
        let cfg = SaeTrainConfig {
            latents: 64,
            k: 3,
            epochs: 40,
            batch_size: 32,
            lr: 3e-3,
            seed: 3,
            ..SaeTrainConfig::default()
        };
        let mut seen = 0;
        let t = train_topk(train, Some(test), &cfg, &mut |_| seen += 1).unwrap();
        let r = &t.report;
        eprintln!(
            "train NMSE {:.4}, held-out {:.4?}, dead {:.3}",
            r.train_nmse, r.held_out_nmse, r.dead_share
        );
        assert_eq!(seen, 40);
        assert_eq!(r.epochs.len(), 40);
        assert!(r.train_nmse < 0.1, "train NMSE {}", r.train_nmse);
        let held = r.held_out_nmse.unwrap();
        assert!(held < 0.1, "held-out NMSE {held}");
        assert!(r.dead_share <= 0.1, "dead share {}", r.dead_share);
        assert!(r.mean_l0 <= 3.0 + 1e-9);
        // Training improved on the first epoch.
        assert!(r.epochs[39].train_nmse < r.epochs[0].train_nmse);
    }

    #[test]
    fn same_seed_same_weights_and_other_seed_differs() {
        let x = synthetic(400, 8, 16, 2, 5);
        let cfg = SaeTrainConfig {
            latents: 32,
            k: 2,
            epochs: 3,
            batch_size: 32,
            seed: 9,
            ..SaeTrainConfig::default()
        };
        let a = train_topk(x.view(), None, &cfg, &mut |_| {}).unwrap();
        let b = train_topk(x.view(), None, &cfg, &mut |_| {}).unwrap();
        assert_eq!(a.parts.w_enc, b.parts.w_enc);
        assert_eq!(a.parts.w_dec, b.parts.w_dec);
        assert_eq!(a.parts.b_enc, b.parts.b_enc);
        assert_eq!(a.parts.b_dec, b.parts.b_dec);
        assert_eq!(a.report, b.report);
        let c = train_topk(
            x.view(),
            None,
            &SaeTrainConfig { seed: 10, ..cfg },
            &mut |_| {},
        )
        .unwrap();
        assert_ne!(a.parts.w_dec, c.parts.w_dec);
    }

    #[test]
    fn decoder_rows_stay_unit_norm_and_init_is_tied() {
        let x = synthetic(300, 8, 16, 2, 2);
        let cfg = SaeTrainConfig {
            latents: 24,
            k: 2,
            epochs: 4,
            ..SaeTrainConfig::default()
        };
        let init = init_params(
            x.view(),
            cfg.latents,
            cfg.median_iters,
            &mut Rng::new(cfg.seed),
        );
        assert_eq!(init.w_enc_t, init.w_dec);
        assert!(init.b_enc.iter().all(|&v| v == 0.0));
        let trained = train_topk(x.view(), None, &cfg, &mut |_| {}).unwrap();
        for (j, row) in trained.parts.w_dec.rows().into_iter().enumerate() {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "row {j} has norm {norm}");
        }
        assert_ne!(trained.parts.w_dec, init.w_dec);
    }

    #[test]
    fn aux_loss_is_zero_when_nothing_can_be_dead() {
        let x = synthetic(256, 8, 16, 2, 4);
        let cfg = SaeTrainConfig {
            latents: 32,
            k: 2,
            epochs: 3,
            batch_size: 32,
            dead_tokens: Some(u64::MAX),
            ..SaeTrainConfig::default()
        };
        let t = train_topk(x.view(), None, &cfg, &mut |_| {}).unwrap();
        assert!(t.report.epochs.iter().all(|e| e.aux_loss == 0.0));
        assert_eq!(t.report.dead_share_tracked, 0.0);
        // With a short dead window some latents are dead and AuxK works on them.
        let cfg = SaeTrainConfig {
            latents: 128,
            dead_tokens: Some(32),
            ..cfg
        };
        let t = train_topk(x.view(), None, &cfg, &mut |_| {}).unwrap();
        assert!(t.report.epochs.iter().any(|e| e.aux_loss > 0.0));
    }

    #[test]
    fn geometric_median_resists_an_outlier() {
        // In 1-D the geometric median is the median.
        let x = Array2::from_shape_vec((5, 1), vec![1.0, 2.0, 3.0, 4.0, 1000.0]).unwrap();
        let m = geometric_median(x.view(), 500);
        assert!((m[0] - 3.0).abs() < 0.05, "{m}");
        // Symmetric points: the centre.
        let x =
            Array2::from_shape_vec((4, 2), vec![1.0, 0.0, -1.0, 0.0, 0.0, 1.0, 0.0, -1.0]).unwrap();
        let m = geometric_median(x.view(), 50);
        assert!(m.iter().all(|v| v.abs() < 1e-6), "{m}");
    }

    #[test]
    fn nmse_of_the_mean_is_one() {
        let x = synthetic(200, 6, 8, 2, 8);
        let mean = mean_rows(x.view()).mapv(|v| v as f32);
        // An SAE whose latents never fire reconstructs b_dec = mean.
        let parts = SaeParts {
            w_enc: Array2::zeros((6, 4)),
            b_enc: Array1::from_elem(4, -1.0),
            w_dec: Array2::eye(6).slice_move(ndarray::s![..4, ..]),
            b_dec: mean,
            threshold: None,
            activation: SaeActivation::TopK { k: 2 },
            apply_b_dec_to_input: true,
            normalization: Normalization::None,
        };
        let fit = evaluate_sae(&Sae::from_parts(parts).unwrap(), x.view()).unwrap();
        assert!((fit.nmse - 1.0).abs() < 1e-5, "{}", fit.nmse);
        assert_eq!(fit.dead_share, 1.0);
        assert_eq!(fit.mean_l0, 0.0);
    }

    #[test]
    fn saved_folder_loads_back_through_the_saelens_loader() {
        let x = synthetic(300, 8, 16, 2, 6);
        let cfg = SaeTrainConfig {
            latents: 24,
            k: 3,
            epochs: 2,
            ..SaeTrainConfig::default()
        };
        let t = train_topk(x.view(), None, &cfg, &mut |_| {}).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let meta = SaveMeta {
            model_name: Some("synthetic".into()),
            ..SaveMeta::default()
        };
        save_saelens(&t.parts, dir.path(), &meta).unwrap();
        let loaded = Sae::load(dir.path()).unwrap();
        assert_eq!(loaded.activation(), SaeActivation::TopK { k: 3 });
        assert_eq!(loaded.info().format, super::super::SaeFormat::SaeLens);
        assert_eq!(loaded.w_dec(), t.sae.w_dec());
        let (mut wa, mut wb) = (t.sae.workspace(16), loaded.workspace(16));
        let a = t.sae.forward(x.view(), &mut wa).unwrap().recon().to_owned();
        let b = loaded
            .forward(x.view(), &mut wb)
            .unwrap()
            .recon()
            .to_owned();
        assert_eq!(a, b);
        // Bad parts are refused with the folder named, and nothing is half-written.
        let mut broken = t.parts.clone();
        broken.b_dec = Array1::zeros(3);
        let other = dir.path().join("broken");
        let err = save_saelens(&broken, &other, &meta).unwrap_err();
        assert!(err.to_string().contains("b_dec"), "{err}");
        assert!(!other.exists());
    }

    #[test]
    fn bad_config_and_data_are_errors() {
        let x = synthetic(50, 4, 8, 1, 1);
        let run = |cfg: SaeTrainConfig, x: ArrayView2<f32>| {
            train_topk(x, None, &cfg, &mut |_| {})
                .unwrap_err()
                .to_string()
        };
        let base = SaeTrainConfig {
            latents: 8,
            k: 2,
            epochs: 1,
            ..SaeTrainConfig::default()
        };
        assert!(
            run(
                SaeTrainConfig {
                    k: 9,
                    ..base.clone()
                },
                x.view()
            )
            .contains("k = 9")
        );
        assert!(
            run(
                SaeTrainConfig {
                    lr: -1.0,
                    ..base.clone()
                },
                x.view()
            )
            .contains("lr")
        );
        assert!(
            run(
                SaeTrainConfig {
                    batch_size: 0,
                    ..base.clone()
                },
                x.view()
            )
            .contains("batch_size")
        );
        // No epoch is refused by `validate` too, for callers that check before any data.
        let untrained = SaeTrainConfig {
            epochs: 0,
            ..base.clone()
        };
        let want = "SAE training config: epochs = 0 would leave the SAE untrained (its random \
                    initialisation); give at least 1";
        assert_eq!(run(untrained.clone(), x.view()), want);
        assert_eq!(untrained.validate(4).unwrap_err().to_string(), want);
        assert!(base.validate(4).is_ok());
        assert!(run(base.clone(), x.slice(ndarray::s![..1, ..])).contains("at least 2 rows"));
        let mut nan = x.clone();
        nan[[3, 2]] = f32::NAN;
        assert!(run(base.clone(), nan.view()).contains("row 3, column 2"));
        let held = Array2::<f32>::zeros((4, 5));
        let err = train_topk(x.view(), Some(held.view()), &base, &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("5 features"), "{err}");
    }

    /// The summary names the best held-out epoch only when it is not the last, and warns
    /// above 10 % dead latents.
    #[test]
    fn notes_name_the_best_epoch_and_warn_on_dead_latents() {
        let epoch = |epoch, held| EpochStats {
            epoch,
            train_nmse: 0.5,
            held_out_nmse: Some(held),
            dead_share: 0.0,
            aux_loss: 0.0,
        };
        let mut r = SaeTrainReport {
            config: SaeTrainConfig::default(),
            rows: 100,
            held_out_rows: 10,
            d_in: 8,
            k_aux: 4,
            dead_tokens: 100,
            steps: 10,
            epochs: vec![epoch(1, 0.5), epoch(2, 0.366), epoch(3, 0.381)],
            train_nmse: 0.3,
            held_out_nmse: Some(0.381),
            dead_share: 0.24,
            dead_share_tracked: 0.24,
            mean_l0: 4.0,
        };
        assert_eq!(r.best_held_out_epoch(), Some((2, 0.366)));
        let n = r.notes();
        assert!(
            n.contains("lowest at epoch 2 (0.3660); the SAE written is epoch 3's (0.3810)"),
            "{n}"
        );
        assert!(
            n.contains("warning: 24.0 % of the 1536 latents are dead"),
            "{n}"
        );
        r.epochs.pop();
        r.dead_share = 0.05;
        assert_eq!(r.notes(), "");
    }
}
