//! Sparse autoencoders (SAEs) on language-model activations, and the dark matter they leave.
//!
//! Owns the SAE forward pass ([`Sae::forward`] into a preallocated [`SaeWorkspace`]), the
//! checkpoint loaders ([`Sae::load`]: SAELens and EleutherAI sparsify folders), and the
//! dark-matter head ([`dark`]) that predicts the SAE's error from the activation. Fed by
//! activation rows `[tokens, d_in]` (the replay and MQTT activation sources); feeds token
//! scores (‖e‖², the nonlinear error, the deviation from the predicted ‖e‖²) to the scorer.
//!
//! # Forward pass
//!
//! With x one activation row (papers.md §8; SAELens `sae_lens/saes/*.py`, sparsify
//! `sparse_coder.py`):
//!
//! ```text
//! x_in = norm_in(x) − b_dec·[apply_b_dec_to_input]
//! pre  = x_in · W_enc + b_enc                      W_enc [d_in, d_sae]
//! ReLU     ("standard"): f = ReLU(pre)
//! TopK{k}:               f = ReLU on the k largest pre-activations, 0 elsewhere
//! JumpReLU:              f = pre where pre > threshold and pre > 0, else 0
//! x̂    = norm_out(f · W_dec + b_dec)                W_dec [d_sae, d_in]
//! e    = x − x̂
//! ```
//!
//! TopK takes the k largest pre-activations and then applies ReLU (SAELens, openai); sparsify
//! applies ReLU first. The non-zero latents are the same except for ties at 0, and only
//! non-zero latents are kept, so both formats run the same code. The selection is O(d_sae) per
//! row (a size-k heap, see `kernel::top_k`), and decoding touches only the active rows of
//! `W_dec` (k rows for TopK; for ReLU/JumpReLU, the rows whose latent is positive).
//!
//! `normalize_activations` (SAELens):
//!
//! - `none`: identity both ways.
//! - `constant_norm_rescale`: c = √d_in / ‖x‖ per row; `norm_in(x) = c·x`, `norm_out(y) = y / c`.
//! - `layer_norm`: μ = mean(x), σ = the **unbiased** (N − 1) std of x;
//!   `norm_in(x) = (x − μ)/(σ + 1e-5)`, `norm_out(y) = y·σ + μ` (no ε on the way out).
//! - `expected_average_only_in`: SAELens applies **nothing** at run time; a dataset-level factor
//!   s is folded into the weights by whoever has it. It is not stored in the checkpoint, so
//!   darkwatch runs the mode as identity unless s is given with
//!   [`Sae::set_norm_scaling_factor`] (then `norm_in(x) = s·x`, `norm_out(y) = y / s`).
//!
//! # Checkpoint formats ([`Sae::load`])
//!
//! - **SAELens**: a folder with `cfg.json` and `sae_weights.safetensors` holding `W_enc`
//!   `[d_in, d_sae]`, `b_enc` `[d_sae]`, `W_dec` `[d_sae, d_in]`, `b_dec` `[d_in]`, and for
//!   JumpReLU `threshold` `[d_sae]`. A config is v6 when `sae_lens_version` (top level, or in
//!   `metadata` / `meta`) is ≥ 6; then `architecture` ∈ {standard, topk, jumprelu} and `k`
//!   hold. Older configs use `activation_fn_str` / `activation_fn` and
//!   `activation_fn_kwargs.k`; an `activation_fn` of `topk` means TopK whatever the
//!   `architecture` says (SAELens ≤ 5.4 saved TopK SAEs as `standard`). A boolean
//!   `normalize_activations` maps true → `expected_average_only_in`, false → `none`.
//!   `apply_b_dec_to_input` defaults to true (Gemma Scope sets it false). A pre-6
//!   `finetuning_scaling_factor: true` multiplies the latents by the tensor of that name before
//!   decoding; it is folded into `W_dec` at load.
//! - **EleutherAI sparsify**: a folder with `cfg.json` and `sae.safetensors` holding
//!   `encoder.weight` `[num_latents, d_in]`, `encoder.bias`, `W_dec` `[num_latents, d_in]` and
//!   `b_dec`. `num_latents` is the config's value when non-zero, else `d_in·expansion_factor`.
//!   Following sparsify's own `encode` (not SAELens' conversion of it): b_dec is always
//!   subtracted from the input, the activation is ReLU then top-k, and `W_dec` is not
//!   transposed. A sparsify run folder holds one subfolder per hookpoint (`layers.3/`): either
//!   that subfolder or a parent with exactly one of them is accepted.
//!
//! Weights may be stored as F32, F16, BF16 or F64 (each tensor's stored dtype counts; the
//! config's `dtype` is informational); F16 and BF16 convert exactly to f32 at load, F64 (numpy's
//! default) is rounded to the nearest f32, and all arithmetic is f32. Anything malformed gives a [`SaeError`] naming the file, the key or tensor, and what
//! was expected versus found; nothing in a checkpoint can make the loader panic.
//!
//! Not supported (each a clear [`SaeError::Unsupported`]): gated and batchtopk architectures,
//! `rescale_acts_by_decoder_norm: true`, `hook_z` reshaping, sparsify `groupmax`, skip
//! connections, transcoders and `signed`.
//!
//! # Speed
//!
//! The encoder is the cost: 2·d_in·d_sae flops per token. See `kernel` for the packed-panel
//! SIMD product (one layout for batch 1 and for batches), and [`bench`](mod@bench) for the
//! measured numbers (`darkwatch sae-bench`).

pub mod bench;
pub mod dark;
pub mod detector;
pub mod eval;
mod kernel;
mod load;
pub mod pass;
pub mod positions;
pub mod train;

use std::path::PathBuf;

use ndarray::{Array1, Array2, ArrayView1, ArrayView2};

use crate::rng::Rng;
use kernel::Kernel;
pub use load::{CONFIG_FILE, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS};

/// Epsilon of SAELens' `layer_norm` input normalisation.
pub const LAYER_NORM_EPS: f32 = 1e-5;

/// The largest activation magnitude an SAE scores: larger finite values (a 3e38 from a
/// broken exporter, say) are clamped to ±1e9, so that their squared error stays finite and
/// the token alarms instead of scoring inf, which thresholds skip. Real activations,
/// "massive" ones included, are orders of magnitude below it.
pub const ACTIVATION_LIMIT: f32 = 1e9;

/// Clamps every value of `x` to ±[`ACTIVATION_LIMIT`] in place (NaN stays NaN).
pub fn clamp_activations(x: &mut [f32]) {
    for v in x {
        *v = v.clamp(-ACTIVATION_LIMIT, ACTIVATION_LIMIT);
    }
}

/// The encoder's nonlinearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaeActivation {
    /// `f = ReLU(pre)` (SAELens `standard`).
    Relu,
    /// Keep the `k` largest pre-activations, ReLU them, zero the rest.
    TopK { k: usize },
    /// `f = pre · 1[pre > threshold]` (and ReLU), with a per-latent threshold.
    JumpRelu,
}

/// SAELens' `normalize_activations`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Normalization {
    None,
    ConstantNormRescale,
    LayerNorm,
    /// A dataset-level factor s that SAELens folds into the weights; `None` runs as identity
    /// (what SAELens' `load_from_disk` does).
    ExpectedAverageOnlyIn {
        scaling_factor: Option<f32>,
    },
}

impl Normalization {
    /// The SAELens spelling.
    pub fn name(&self) -> &'static str {
        match self {
            Normalization::None => "none",
            Normalization::ConstantNormRescale => "constant_norm_rescale",
            Normalization::LayerNorm => "layer_norm",
            Normalization::ExpectedAverageOnlyIn { .. } => "expected_average_only_in",
        }
    }
}

/// Which library wrote a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaeFormat {
    SaeLens,
    Sparsify,
    /// Built in memory ([`Sae::from_parts`], [`Sae::random`]).
    InMemory,
}

/// Where an SAE came from (for logs and reports).
#[derive(Debug, Clone, PartialEq)]
pub struct SaeInfo {
    pub format: SaeFormat,
    /// The folder the weights were read from.
    pub dir: Option<PathBuf>,
    /// The hook / hookpoint the SAE reads (`blocks.12.hook_resid_post`, `layers.3`), if known.
    pub hook: Option<String>,
    /// The stored dtype of the weights (`F32`, `F16`, `BF16`, `F64`).
    pub stored_dtype: String,
    /// The lowercase hex sha256 of the weights file as loaded (`None` in memory): what a
    /// dark-matter head records of the SAE it was fitted on, and checks at load.
    pub weights_sha256: Option<String>,
}

/// Why an SAE cannot be loaded or built. Every message names the file and the key or tensor.
#[derive(Debug, thiserror::Error)]
pub enum SaeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{dir}: not an SAE checkpoint: expected cfg.json with sae_weights.safetensors (SAELens) \
         or sae.safetensors (sparsify), or one sparsify layer folder{found}"
    )]
    NotACheckpoint { dir: PathBuf, found: String },
    #[error(
        "{dir}: holds {} sparsify layers ({}); pass one of the layer folders",
        layers.len(),
        layers.join(", ")
    )]
    SeveralLayers { dir: PathBuf, layers: Vec<String> },
    #[error("{path}: not valid JSON: {reason}")]
    Json { path: PathBuf, reason: String },
    #[error("{path}: must be a JSON object ({{\"d_in\": …, …}}), found {found}")]
    NotAnObject { path: PathBuf, found: String },
    #[error("{path}: key `{key}`: {reason}")]
    Config {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Weights { path: PathBuf, reason: String },
    #[error("{path}: tensor `{tensor}` is missing (the file holds: {present})")]
    MissingTensor {
        path: PathBuf,
        tensor: String,
        present: String,
    },
    #[error("{path}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    Shape {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor `{tensor}` has dtype {found}, expected F32, F16, BF16 or F64")]
    Dtype {
        path: PathBuf,
        tensor: String,
        found: String,
    },
    #[error("{path}: tensor `{tensor}`: element {index} is not finite")]
    NonFinite {
        path: PathBuf,
        tensor: String,
        index: usize,
    },
    #[error("{path}: {what} is not supported")]
    Unsupported { path: PathBuf, what: String },
    #[error("invalid SAE: {0}")]
    Invalid(String),
    #[error("input rows have {found} features, the SAE takes d_in = {expected}")]
    InputWidth { expected: usize, found: usize },
}

/// The weights and settings of an SAE, as plain arrays (the input of [`Sae::from_parts`]).
#[derive(Debug, Clone)]
pub struct SaeParts {
    /// `[d_in, d_sae]`.
    pub w_enc: Array2<f32>,
    /// `[d_sae]`.
    pub b_enc: Array1<f32>,
    /// `[d_sae, d_in]`.
    pub w_dec: Array2<f32>,
    /// `[d_in]`.
    pub b_dec: Array1<f32>,
    /// `[d_sae]`, JumpReLU only.
    pub threshold: Option<Array1<f32>>,
    pub activation: SaeActivation,
    pub apply_b_dec_to_input: bool,
    pub normalization: Normalization,
}

/// A sparse autoencoder ready to run: `W_enc` packed for the SIMD encoder, everything in f32.
#[derive(Debug, Clone)]
pub struct Sae {
    d_in: usize,
    d_sae: usize,
    activation: SaeActivation,
    apply_b_dec_to_input: bool,
    normalization: Normalization,
    /// `W_enc` in column panels (see `kernel`), `padded(d_sae)` latents.
    w_enc: Vec<f32>,
    /// `padded(d_sae)` biases, 0 past `d_sae`.
    b_enc: Vec<f32>,
    /// `[d_sae, d_in]`, standard layout.
    w_dec: Array2<f32>,
    b_dec: Array1<f32>,
    threshold: Option<Array1<f32>>,
    info: SaeInfo,
}

impl Sae {
    /// Builds an SAE from arrays, checking shapes, finiteness and the activation's needs.
    ///
    /// # Errors
    /// [`SaeError::Invalid`] naming the first array or setting that does not fit.
    pub fn from_parts(parts: SaeParts) -> Result<Sae, SaeError> {
        let (d_in, d_sae) = parts.w_enc.dim();
        let bad = |s: String| Err(SaeError::Invalid(s));
        if d_in == 0 || d_sae == 0 {
            return bad(format!(
                "W_enc is [{d_in}, {d_sae}]; both sizes must be positive"
            ));
        }
        if parts.w_dec.dim() != (d_sae, d_in) {
            return bad(format!(
                "W_dec is {:?}, expected [{d_sae}, {d_in}]",
                parts.w_dec.shape()
            ));
        }
        if parts.b_enc.len() != d_sae {
            return bad(format!(
                "b_enc has {} values, expected {d_sae}",
                parts.b_enc.len()
            ));
        }
        if parts.b_dec.len() != d_in {
            return bad(format!(
                "b_dec has {} values, expected {d_in}",
                parts.b_dec.len()
            ));
        }
        match (&parts.activation, &parts.threshold) {
            (SaeActivation::JumpRelu, None) => return bad("JumpReLU needs a threshold".into()),
            (SaeActivation::JumpRelu, Some(t)) if t.len() != d_sae => {
                return bad(format!(
                    "threshold has {} values, expected {d_sae}",
                    t.len()
                ));
            }
            (SaeActivation::TopK { k }, _) if *k == 0 || *k > d_sae => {
                return bad(format!("TopK k = {k}, must be in 1..={d_sae}"));
            }
            _ => {}
        }
        if let Normalization::ExpectedAverageOnlyIn {
            scaling_factor: Some(s),
        } = parts.normalization
            && !(s.is_finite() && s > 0.0)
        {
            return bad(format!(
                "norm scaling factor {s} must be finite and positive"
            ));
        }
        let first_bad = [
            ("W_enc", parts.w_enc.iter().position(|v| !v.is_finite())),
            ("b_enc", parts.b_enc.iter().position(|v| !v.is_finite())),
            ("W_dec", parts.w_dec.iter().position(|v| !v.is_finite())),
            ("b_dec", parts.b_dec.iter().position(|v| !v.is_finite())),
        ];
        if let Some((name, Some(i))) = first_bad.into_iter().find(|(_, bad)| bad.is_some()) {
            return bad(format!("{name} element {i} is not finite"));
        }
        if let Some(t) = &parts.threshold
            && let Some(i) = t.iter().position(|v| v.is_nan())
        {
            return bad(format!("threshold element {i} is NaN"));
        }
        let ld = kernel::padded(d_sae);
        let mut b_enc = vec![0.0; ld];
        for (dst, &b) in b_enc.iter_mut().zip(&parts.b_enc) {
            *dst = b;
        }
        let threshold = match parts.activation {
            SaeActivation::JumpRelu => parts.threshold,
            _ => None,
        };
        Ok(Sae {
            d_in,
            d_sae,
            activation: parts.activation,
            apply_b_dec_to_input: parts.apply_b_dec_to_input,
            normalization: parts.normalization,
            w_enc: kernel::pack(parts.w_enc.view()),
            b_enc,
            w_dec: parts.w_dec.as_standard_layout().into_owned(),
            b_dec: parts.b_dec,
            threshold,
            info: SaeInfo {
                format: SaeFormat::InMemory,
                dir: None,
                hook: None,
                stored_dtype: "F32".into(),
                weights_sha256: None,
            },
        })
    }

    /// A TopK SAE with random weights (for benchmarks): `W_enc` uniform in ±1/√d_in, `W_dec`
    /// rows of unit norm, small biases. Deterministic in `seed`.
    ///
    /// # Errors
    /// As [`Sae::from_parts`] (sizes of 0, or `k` outside `1..=d_sae`).
    pub fn random(d_in: usize, d_sae: usize, k: usize, seed: u64) -> Result<Sae, SaeError> {
        let mut rng = Rng::new(seed);
        let bound = 1.0 / (d_in.max(1) as f32).sqrt();
        let w_enc = Array2::from_shape_fn((d_in, d_sae), |_| rng.uniform(-bound, bound));
        let mut w_dec = Array2::from_shape_fn((d_sae, d_in), |_| rng.uniform(-1.0, 1.0));
        for mut row in w_dec.rows_mut() {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            row.mapv_inplace(|v| v / norm);
        }
        Sae::from_parts(SaeParts {
            w_enc,
            b_enc: Array1::from_shape_fn(d_sae, |_| rng.uniform(-0.01, 0.01)),
            w_dec,
            b_dec: Array1::from_shape_fn(d_in, |_| rng.uniform(-0.1, 0.1)),
            threshold: None,
            activation: SaeActivation::TopK { k },
            apply_b_dec_to_input: true,
            normalization: Normalization::None,
        })
    }

    /// Input width.
    pub fn d_in(&self) -> usize {
        self.d_in
    }

    /// Number of latents.
    pub fn d_sae(&self) -> usize {
        self.d_sae
    }

    pub fn activation(&self) -> SaeActivation {
        self.activation
    }

    pub fn apply_b_dec_to_input(&self) -> bool {
        self.apply_b_dec_to_input
    }

    pub fn normalization(&self) -> Normalization {
        self.normalization
    }

    /// The normalisation as `inspect` shows it: the SAELens name, and for
    /// `expected_average_only_in` the scaling factor in use or that there is none.
    pub fn normalization_label(&self) -> String {
        match self.normalization {
            Normalization::ExpectedAverageOnlyIn {
                scaling_factor: Some(s),
            } => format!("expected_average_only_in, scaling factor {s}"),
            Normalization::ExpectedAverageOnlyIn {
                scaling_factor: None,
            } => "expected_average_only_in WITHOUT a scaling factor (runs unscaled; give \
                  --norm-scaling-factor or [sae] norm_scaling_factor)"
                .into(),
            n => n.name().into(),
        }
    }

    /// Why this SAE's errors are not those it was trained for: an `expected_average_only_in`
    /// SAE without its scaling factor (SAELens keeps the factor outside the checkpoint).
    /// `None` when nothing is missing.
    pub fn unscaled_warning(&self) -> Option<String> {
        if self.normalization
            != (Normalization::ExpectedAverageOnlyIn {
                scaling_factor: None,
            })
        {
            return None;
        }
        let cfg = self.info.dir.as_ref().map_or_else(
            || "the SAE".into(),
            |d| d.join(CONFIG_FILE).display().to_string(),
        );
        Some(format!(
            "{cfg}: normalize_activations = expected_average_only_in, and no scaling factor was \
             given: the SAE runs on unscaled activations (as SAELens' load_from_disk does), so \
             its errors are not those it was trained for. Give its `norm_scaling_factor` (SAELens' \
             pretrained_saes.yaml lists it: √d_in over the mean activation norm it was trained \
             on) with --norm-scaling-factor (sae-head, sae-score) or [sae] norm_scaling_factor (run)"
        ))
    }

    /// Two lines for `inspect`: where the weights came from, and the shape.
    pub fn summary(&self) -> String {
        let info = &self.info;
        format!(
            "sae          {format:?} from {dir}, hook {hook}, weights {dtype}\n\
             shape        d_in {d_in}, {d_sae} latents, {act:?}, b_dec applied to input: {bdec}, normalisation {norm}\n",
            format = info.format,
            dir = info
                .dir
                .as_ref()
                .map_or("memory".into(), |d| d.display().to_string()),
            hook = info.hook.as_deref().unwrap_or(
                "unknown (cfg.json has no hook_name: `sae-train --hook-name`, or add \
                 \"hook_name\" to cfg.json)"
            ),
            dtype = info.stored_dtype,
            d_in = self.d_in,
            d_sae = self.d_sae,
            act = self.activation,
            bdec = self.apply_b_dec_to_input,
            norm = self.normalization_label(),
        )
    }

    /// Where the SAE came from.
    pub fn info(&self) -> &SaeInfo {
        &self.info
    }

    /// `W_dec`, `[d_sae, d_in]`.
    pub fn w_dec(&self) -> ArrayView2<'_, f32> {
        self.w_dec.view()
    }

    /// `b_enc`, `[d_sae]`.
    pub fn b_enc(&self) -> &[f32] {
        &self.b_enc
    }

    /// `b_dec`, `[d_in]`.
    pub fn b_dec(&self) -> ArrayView1<'_, f32> {
        self.b_dec.view()
    }

    /// JumpReLU's per-latent threshold `[d_sae]` (`None` for ReLU and TopK).
    pub fn threshold(&self) -> Option<ArrayView1<'_, f32>> {
        self.threshold.as_ref().map(|t| t.view())
    }

    /// `W_enc[i, j]` (from the packed copy).
    ///
    /// # Panics
    /// If `i ≥ d_in` or `j ≥ d_sae`.
    pub fn w_enc_at(&self, i: usize, j: usize) -> f32 {
        assert!(
            i < self.d_in && j < self.d_sae,
            "W_enc[{i}, {j}] out of range"
        );
        kernel::packed_at(&self.w_enc, self.d_in, i, j)
    }

    /// Sets the `expected_average_only_in` factor s (x·s in, x̂/s out), which SAELens keeps
    /// outside the checkpoint (its release registry's `norm_scaling_factor`).
    ///
    /// # Errors
    /// [`SaeError::Invalid`] when the SAE was not trained with `expected_average_only_in`, or
    /// `s` is not finite and positive.
    pub fn set_norm_scaling_factor(&mut self, s: f32) -> Result<(), SaeError> {
        if !matches!(
            self.normalization,
            Normalization::ExpectedAverageOnlyIn { .. }
        ) {
            return Err(SaeError::Invalid(format!(
                "a norm scaling factor applies to normalize_activations = \
                 expected_average_only_in, this SAE uses {}: drop the setting (no head refit \
                 can use it)",
                self.normalization.name()
            )));
        }
        if !(s.is_finite() && s > 0.0) {
            return Err(SaeError::Invalid(format!(
                "norm scaling factor {s} must be finite and positive"
            )));
        }
        self.normalization = Normalization::ExpectedAverageOnlyIn {
            scaling_factor: Some(s),
        };
        Ok(())
    }

    /// Buffers for forward passes of up to `max_batch` rows, with the fastest encoder kernel
    /// this CPU supports.
    pub fn workspace(&self, max_batch: usize) -> SaeWorkspace {
        SaeWorkspace::new(self, max_batch, Kernel::detect())
    }

    /// Normalises `x` into the workspace's input rows and records how to undo it.
    fn prepare_inputs(&self, x: ArrayView2<f32>, ws: &mut SaeWorkspace) {
        let d = self.d_in;
        for (r, row) in x.rows().into_iter().enumerate() {
            let dst = &mut ws.x_in[r * d..(r + 1) * d];
            for (o, &v) in dst.iter_mut().zip(&row) {
                *o = v;
            }
            let (mul, add) = match self.normalization {
                Normalization::None
                | Normalization::ExpectedAverageOnlyIn {
                    scaling_factor: None,
                } => (1.0, 0.0),
                Normalization::ExpectedAverageOnlyIn {
                    scaling_factor: Some(s),
                } => {
                    dst.iter_mut().for_each(|v| *v *= s);
                    (1.0 / s, 0.0)
                }
                Normalization::ConstantNormRescale => {
                    let norm = dst
                        .iter()
                        .map(|&v| f64::from(v).powi(2))
                        .sum::<f64>()
                        .sqrt();
                    let c = ((d as f64).sqrt() / norm) as f32;
                    dst.iter_mut().for_each(|v| *v *= c);
                    (1.0 / c, 0.0)
                }
                Normalization::LayerNorm => {
                    let mean = dst.iter().map(|&v| f64::from(v)).sum::<f64>() / d as f64;
                    let ss = dst
                        .iter()
                        .map(|&v| (f64::from(v) - mean).powi(2))
                        .sum::<f64>();
                    // torch's Tensor.std: the unbiased estimate (NaN for one feature, as there).
                    let std = (ss / (d as f64 - 1.0)).sqrt();
                    let inv = 1.0 / (std + f64::from(LAYER_NORM_EPS));
                    dst.iter_mut()
                        .for_each(|v| *v = ((f64::from(*v) - mean) * inv) as f32);
                    (std as f32, mean as f32)
                }
            };
            ws.denorm[r] = (mul, add);
            if self.apply_b_dec_to_input {
                for (v, &b) in dst.iter_mut().zip(&self.b_dec) {
                    *v -= b;
                }
            }
        }
    }

    /// Encoder pre-activations only (`pre = x_in·W_enc + b_enc`), for timing the product.
    ///
    /// # Errors
    /// [`SaeError::InputWidth`] when `x` does not have `d_in` columns.
    pub fn pre_acts<'a>(
        &self,
        x: ArrayView2<f32>,
        ws: &'a mut SaeWorkspace,
    ) -> Result<ArrayView2<'a, f32>, SaeError> {
        self.check_width(x)?;
        let n = x.nrows();
        ws.prepare(self, n);
        self.prepare_inputs(x, ws);
        kernel::encode(
            ws.kernel,
            &ws.x_in,
            n,
            self.d_in,
            &self.w_enc,
            &self.b_enc,
            &mut ws.pre,
        );
        Ok(ws.pre_view(n, self.d_sae))
    }

    fn check_width(&self, x: ArrayView2<f32>) -> Result<(), SaeError> {
        if x.ncols() != self.d_in {
            return Err(SaeError::InputWidth {
                expected: self.d_in,
                found: x.ncols(),
            });
        }
        Ok(())
    }

    /// Encodes, decodes and takes the error of every row of `x` (`[n, d_in]`, any strides).
    /// Allocation-free when `n` is at most the workspace's capacity and the workspace was made
    /// for an SAE of this shape (otherwise it grows once).
    ///
    /// A NaN in a row makes that row's error (and its ‖e‖²) NaN, so a broken input shows in
    /// the score instead of vanishing.
    ///
    /// # Errors
    /// [`SaeError::InputWidth`] when `x` does not have `d_in` columns.
    pub fn forward<'a>(
        &'a self,
        x: ArrayView2<f32>,
        ws: &'a mut SaeWorkspace,
    ) -> Result<SaeOutput<'a>, SaeError> {
        self.pre_acts(x, ws)?;
        let n = x.nrows();
        let (d, ld, max_active) = (self.d_in, ws.ld, ws.max_active);
        for (r, x_row) in x.rows().into_iter().enumerate() {
            let pre = &ws.pre[r * ld..r * ld + self.d_sae];
            let recon = &mut ws.recon[r * d..(r + 1) * d];
            recon.copy_from_slice(self.b_dec.as_slice().expect("b_dec is contiguous"));
            let mut l0 = 0;
            match self.activation {
                SaeActivation::TopK { k } => {
                    let idx = &mut ws.active_idx[r * max_active..(r + 1) * max_active];
                    let val = &mut ws.active_val[r * max_active..(r + 1) * max_active];
                    let got = kernel::top_k(pre, k, idx, val);
                    // Keep only the winners that survive the ReLU, packed to the front.
                    for s in 0..got {
                        if val[s] > 0.0 {
                            idx[l0] = idx[s];
                            val[l0] = val[s];
                            axpy(val[l0], self.w_dec.row(idx[l0] as usize), recon);
                            l0 += 1;
                        }
                    }
                }
                SaeActivation::Relu => {
                    for (j, &p) in pre.iter().enumerate() {
                        if p > 0.0 {
                            axpy(p, self.w_dec.row(j), recon);
                            l0 += 1;
                        }
                    }
                }
                SaeActivation::JumpRelu => {
                    let thr = self.threshold.as_ref().expect("JumpReLU has a threshold");
                    for (j, (&p, &t)) in pre.iter().zip(thr).enumerate() {
                        if p > t && p > 0.0 {
                            axpy(p, self.w_dec.row(j), recon);
                            l0 += 1;
                        }
                    }
                }
            }
            ws.l0[r] = l0;
            let (mul, add) = ws.denorm[r];
            let err = &mut ws.error[r * d..(r + 1) * d];
            let mut sq = 0.0f64;
            for ((e, y), &xv) in err.iter_mut().zip(recon.iter_mut()).zip(&x_row) {
                *y = *y * mul + add;
                *e = xv - *y;
                sq += f64::from(*e) * f64::from(*e);
            }
            ws.err_sq[r] = sq as f32;
        }
        Ok(SaeOutput { sae: self, ws, n })
    }
}

/// `y += a·w`.
fn axpy(a: f32, w: ArrayView1<f32>, y: &mut [f32]) {
    match w.as_slice() {
        Some(w) => {
            for (y, &w) in y.iter_mut().zip(w) {
                *y += a * w;
            }
        }
        None => {
            for (y, &w) in y.iter_mut().zip(&w) {
                *y += a * w;
            }
        }
    }
}

/// Preallocated buffers for [`Sae::forward`]: up to [`SaeWorkspace::capacity`] rows per call
/// without allocating. It remembers only the SAE's shapes, never its weights.
#[derive(Debug, Clone)]
pub struct SaeWorkspace {
    kernel: Kernel,
    d_in: usize,
    ld: usize,
    max_active: usize,
    capacity: usize,
    /// `[capacity, d_in]`: normalised inputs, b_dec subtracted.
    x_in: Vec<f32>,
    /// `[capacity, ld]`: pre-activations (padding lanes past d_sae).
    pre: Vec<f32>,
    /// Per row, `(mul, add)` of `norm_out`.
    denorm: Vec<(f32, f32)>,
    /// `[capacity, max_active]`: TopK winners (index, value); the first `l0[r]` are active.
    active_idx: Vec<u32>,
    active_val: Vec<f32>,
    l0: Vec<usize>,
    recon: Vec<f32>,
    error: Vec<f32>,
    err_sq: Vec<f32>,
}

impl SaeWorkspace {
    fn new(sae: &Sae, capacity: usize, kernel: Kernel) -> SaeWorkspace {
        let ld = kernel::padded(sae.d_sae);
        // Only TopK keeps explicit lists; ReLU/JumpReLU latents are read back from `pre`.
        let max_active = match sae.activation {
            SaeActivation::TopK { k } => k,
            _ => 0,
        };
        let d = sae.d_in;
        SaeWorkspace {
            kernel,
            d_in: d,
            ld,
            max_active,
            capacity,
            x_in: vec![0.0; capacity * d],
            pre: vec![0.0; capacity * ld],
            denorm: vec![(1.0, 0.0); capacity],
            active_idx: vec![0; capacity * max_active],
            active_val: vec![0.0; capacity * max_active],
            l0: vec![0; capacity],
            recon: vec![0.0; capacity * d],
            error: vec![0.0; capacity * d],
            err_sq: vec![0.0; capacity],
        }
    }

    /// Rows a forward pass can take without allocating.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The encoder kernel in use: `"avx2+fma"` or `"portable"`.
    pub fn kernel_name(&self) -> &'static str {
        self.kernel.name()
    }

    fn prepare(&mut self, sae: &Sae, n: usize) {
        let fits = self.d_in == sae.d_in
            && self.ld == kernel::padded(sae.d_sae)
            && self.max_active
                == match sae.activation {
                    SaeActivation::TopK { k } => k,
                    _ => 0,
                };
        if !fits || n > self.capacity {
            *self = SaeWorkspace::new(sae, n.max(self.capacity), self.kernel);
        }
    }

    fn pre_view(&self, n: usize, d_sae: usize) -> ArrayView2<'_, f32> {
        use ndarray::ShapeBuilder;
        if n == 0 {
            return ArrayView2::from_shape((0, d_sae), &[]).expect("empty view");
        }
        ArrayView2::from_shape((n, d_sae).strides((self.ld, 1)), &self.pre[..])
            .expect("the workspace holds n rows of pre-activations")
    }
}

/// The result of [`Sae::forward`] for `n` rows, borrowed from the workspace.
#[derive(Debug, Clone, Copy)]
pub struct SaeOutput<'a> {
    sae: &'a Sae,
    ws: &'a SaeWorkspace,
    n: usize,
}

impl<'a> SaeOutput<'a> {
    /// Rows.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// `[n, d_sae]`: encoder pre-activations (before ReLU / TopK / JumpReLU).
    pub fn pre_acts(&self) -> ArrayView2<'a, f32> {
        self.ws.pre_view(self.n, self.sae.d_sae)
    }

    /// `[n, d_in]`: the reconstruction x̂.
    pub fn recon(&self) -> ArrayView2<'a, f32> {
        let d = self.sae.d_in;
        ArrayView2::from_shape((self.n, d), &self.ws.recon[..self.n * d]).expect("n rows")
    }

    /// `[n, d_in]`: the error e = x − x̂.
    pub fn error(&self) -> ArrayView2<'a, f32> {
        let d = self.sae.d_in;
        ArrayView2::from_shape((self.n, d), &self.ws.error[..self.n * d]).expect("n rows")
    }

    /// ‖e‖² per row.
    pub fn error_sq_norm(&self) -> &'a [f32] {
        &self.ws.err_sq[..self.n]
    }

    /// Number of non-zero latents of `row` (L0).
    ///
    /// # Panics
    /// If `row ≥ len()`.
    pub fn l0(&self, row: usize) -> usize {
        assert!(row < self.n, "row {row} of {}", self.n);
        self.ws.l0[row]
    }

    /// The non-zero latents of `row` as `(latent, value)` (in no particular order), pushed
    /// onto `out` after clearing it.
    ///
    /// # Panics
    /// If `row ≥ len()`.
    pub fn active(&self, row: usize, out: &mut Vec<(usize, f32)>) {
        assert!(row < self.n, "row {row} of {}", self.n);
        out.clear();
        let ws = self.ws;
        let pre = &ws.pre[row * ws.ld..row * ws.ld + self.sae.d_sae];
        match self.sae.activation {
            SaeActivation::TopK { .. } => {
                let at = row * ws.max_active;
                let l0 = ws.l0[row];
                out.extend(
                    ws.active_idx[at..at + l0]
                        .iter()
                        .zip(&ws.active_val[at..at + l0])
                        .map(|(&i, &v)| (i as usize, v)),
                );
            }
            SaeActivation::Relu => out.extend(
                pre.iter()
                    .enumerate()
                    .filter(|(_, p)| **p > 0.0)
                    .map(|(j, &p)| (j, p)),
            ),
            SaeActivation::JumpRelu => {
                let thr = self
                    .sae
                    .threshold
                    .as_ref()
                    .expect("JumpReLU has a threshold");
                out.extend(
                    pre.iter()
                        .zip(thr)
                        .enumerate()
                        .filter(|(_, (p, t))| **p > **t && **p > 0.0)
                        .map(|(j, (&p, _))| (j, p)),
                );
            }
        }
    }

    /// `[n, d_sae]` dense latents (allocates; for tests and inspection).
    pub fn latents_dense(&self) -> Array2<f32> {
        let mut out = Array2::zeros((self.n, self.sae.d_sae));
        let mut active = Vec::new();
        for r in 0..self.n {
            self.active(r, &mut active);
            for &(j, v) in &active {
                out[[r, j]] = v;
            }
        }
        out
    }
}
