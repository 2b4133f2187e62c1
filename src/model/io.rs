//! The model directory: weights in safetensors, everything else in JSON.
//!
//! ```text
//! DIR/model.json         format, features, scaler, architecture, head, calibration, provenance
//! DIR/model.safetensors  layers.{i}.weight [out, in], layers.{i}.bias [out],
//!                        and mss.bank [frames, d] (the MSS reference frames R⁰), all f32
//! ```
//!
//! Written by `darkwatch train`, read by `replay`, `inspect` and the agent. Loading checks
//! everything (format version, shapes, dtypes, finiteness, the weights' checksum) and fails
//! with a message that names the file and the field.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ndarray::{Array1, Array2};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::cuda::{CudaError, CudaModel};
use super::onnx::{OnnxError, OnnxModel};
use super::{Activation, Autoencoder, Dense, OutputKind, Scaler};
use crate::config::{Backend, CudaConfig, CudaFallback, OnnxConfig};
use crate::mss::{MssConfig, ReferenceBank};
use crate::score::Head;
use crate::train::TrainConfig;

/// Value of the `format` field.
pub const FORMAT: &str = "darkwatch-model";
/// The newest format this build reads and the one it writes.
pub const FORMAT_VERSION: u32 = 1;
pub const META_FILE: &str = "model.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The tensor holding the MSS reference frames.
pub const BANK_TENSOR: &str = "mss.bank";
/// The tensor holding the training scores, in row order (SPOT/DSPOT calibrate on them).
pub const CALIBRATION_TENSOR: &str = "calibration.scores";
/// Most training scores stored (the last ones, in order).
pub const MAX_CALIBRATION_SCORES: usize = 50_000;
/// Most ensemble members a model may hold (`[model] members`).
pub const MAX_MEMBERS: usize = 16;

/// Everything about a model except its weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelMeta {
    pub format: String,
    pub format_version: u32,
    /// Short content hash of what scores (see [`Model::seal`]): changes whenever the model
    /// does.
    pub id: String,
    /// 0 for a trained model; each accepted online retrain adds 1.
    #[serde(default)]
    pub version: u64,
    /// Feature names in input order; with a lag window, `window_frames` blocks of the
    /// frame's names, oldest first (see [`crate::window`]).
    pub features: Vec<String>,
    /// Frames per lag window (1: none). Absent in models without one.
    #[serde(default = "one_frame", skip_serializing_if = "is_one_frame")]
    pub window_frames: usize,
    /// Frames each score is averaged over, per stream ([`crate::smooth`]; 1: none). Absent
    /// in models trained before smoothing, which score frame by frame.
    #[serde(default = "one_frame", skip_serializing_if = "is_one_frame")]
    pub smooth_frames: usize,
    /// Trained as a table (`train --table`): rows without order, scored alone, so `replay`
    /// leaves out what assumes an order. Absent (false) in other models and in models
    /// trained before the field, which load as before.
    #[serde(default, skip_serializing_if = "is_false")]
    pub table: bool,
    pub scaler: Scaler,
    pub architecture: Architecture,
    pub head: Head,
    /// Per-feature median, then maximum, of ln(predicted variance + ε) on held-out training
    /// rows: where the wnll `excess` term starts and where the variance is capped; then (in
    /// models since the `bounded` head) the log of each feature's spread over the scaled
    /// training rows, which the `bounded` floor scales. `2·d` or `3·d` values, or none
    /// (the wnll head then uses the paper's raw form).
    #[serde(default)]
    pub log_variance_baseline: Vec<f32>,
    /// Mean-shift scoring; when on, the weights file holds the reference frames.
    #[serde(default)]
    pub mss: MssConfig,
    pub calibration: Calibration,
    pub provenance: Provenance,
    pub weights: WeightsRef,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Architecture {
    /// Always `dense_autoencoder` in format 1.
    pub kind: String,
    pub output: OutputKind,
    /// Input width, hidden widths, output width (d or 2d per member), all members together.
    pub layer_widths: Vec<usize>,
    /// Hidden activation (the last layer is linear).
    pub activation: Activation,
    /// Autoencoders merged into the network, scored as the mean of their terms (see
    /// [`Autoencoder`]). Absent (1) in models of one.
    #[serde(default = "one_frame", skip_serializing_if = "is_one_frame")]
    pub members: usize,
}

/// Quantiles of the training data's own scores: a static threshold and a sanity scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    pub rows: usize,
    pub score_quantiles: Vec<QuantilePoint>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantilePoint {
    pub q: f64,
    pub score: f32,
}

impl Calibration {
    /// The stored score at quantile `q`, if that quantile was calibrated.
    pub fn quantile(&self, q: f64) -> Option<f32> {
        self.score_quantiles
            .iter()
            .find(|p| (p.q - q).abs() < 1e-12)
            .map(|p| p.score)
    }
}

fn one_frame() -> usize {
    1
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_one_frame(n: &usize) -> bool {
    *n == 1
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_false(b: &bool) -> bool {
    !*b
}

impl ModelMeta {
    /// The columns a recorded row or a live frame must have: the features, or with a lag
    /// window the current frame's block of them.
    pub fn frame_features(&self) -> &[String] {
        crate::window::base_names(&self.features, self.window_frames)
    }
}

/// How the model came to be: enough to reproduce it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    pub darkwatch_version: String,
    pub created_unix_secs: u64,
    pub data_file: String,
    pub data_sha256: String,
    pub rows: usize,
    pub train: TrainConfig,
    pub rows_train: usize,
    pub rows_validation: usize,
    pub epochs_run: usize,
    pub best_epoch: usize,
    pub stopped_early: bool,
    pub train_losses: Vec<f64>,
    pub validation_losses: Vec<f64>,
    pub train_seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightsRef {
    pub file: String,
    pub sha256: String,
}

/// A loaded, validated model.
#[derive(Debug, Clone)]
pub struct Model {
    pub meta: ModelMeta,
    pub ae: Autoencoder,
    /// The MSS reference bank (standardised frames and their shifted copies), if MSS is on.
    pub bank: Option<ReferenceBank>,
    /// The model's own scores of its training rows, in order (at most
    /// [`MAX_CALIBRATION_SCORES`]): what streaming thresholds calibrate on.
    pub calibration_scores: Vec<f32>,
    /// The ONNX graph that runs this autoencoder instead of the native kernels
    /// (`[score] backend = "onnx"`, see [`Model::with_backend`]).
    pub onnx: Option<Arc<OnnxModel>>,
    /// The weights on a GPU, when the CUDA backend runs this autoencoder
    /// (`[score] backend = "cuda"`, see [`Model::with_cuda`]).
    pub cuda: Option<Arc<CudaModel>>,
    /// Why the configured CUDA backend is not used (`[cuda] fallback = "cpu"` took over).
    pub cuda_unavailable: Option<String>,
}

/// For [`ModelError::NotAModel`]: the model folders directly inside `dir`, if any (`; its
/// subfolders smd-machine-1-6 and … are models`), so that `--model models` points on.
fn subfolder_hint(dir: &Path) -> String {
    let mut models: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join(META_FILE).is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    models.sort_unstable();
    match models.len() {
        0 => String::new(),
        1 => format!("; its subfolder {} is one", models[0]),
        n if n <= 4 => format!("; its subfolders {} are models", models.join(", ")),
        n => format!(
            "; {n} of its subfolders are models, {} among them",
            models[..3].join(", ")
        ),
    }
}

/// Why a model directory cannot be used. Each message names the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model folder itself is missing (said as such, not as its `model.json`).
    #[error("no model folder at {}: `darkwatch train --out {}` writes one", .path.display(), .path.display())]
    NoFolder { path: PathBuf },
    /// A folder without `model.json`: not a model (a model's parent folder, say).
    #[error(
        "{} holds no {META_FILE}: not a model folder (`darkwatch train --out DIR` writes one{})",
        .path.display(),
        subfolder_hint(.path)
    )]
    NotAModel { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid model metadata: {reason}")]
    Json { path: PathBuf, reason: String },
    #[error("{path}: field `{field}`: {reason}")]
    Field {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error("{path}: tensor `{tensor}`: {reason}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Weights { path: PathBuf, reason: String },
    #[error("[retrain] state_dir {path}: {reason}")]
    StateDir { path: PathBuf, reason: String },
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    #[error("[score] backend = \"cuda\": {0}")]
    Cuda(#[from] CudaError),
}

/// Lower-case hex SHA-256 of `bytes` (model weights, SAE weights).
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in digest {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// [`sha256_hex`] of a file, streamed (model and data provenance); the callers add the path
/// to their own error.
///
/// # Errors
/// The file cannot be opened or read.
pub(crate) fn file_sha256(path: &std::path::Path) -> std::io::Result<String> {
    let mut hash = Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut hash)?;
    let mut s = String::with_capacity(64);
    for b in hash.finalize() {
        let _ = write!(s, "{b:02x}");
    }
    Ok(s)
}

fn f32_bytes(values: impl Iterator<Item = f32>) -> Vec<u8> {
    values.flat_map(f32::to_le_bytes).collect()
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

impl Model {
    /// Assembles a model, filling in the architecture, the weights reference and the id.
    /// `bank` holds the MSS reference frames (stored even while MSS is off, so that a
    /// replay can turn it on without retraining).
    pub fn new(ae: Autoencoder, mut meta: ModelMeta, bank: Option<ReferenceBank>) -> Self {
        meta.architecture = Architecture {
            kind: "dense_autoencoder".into(),
            output: ae.output,
            layer_widths: ae.widths(),
            activation: Activation::Relu,
            members: ae.members,
        };
        let mut model = Model {
            meta,
            ae,
            bank,
            calibration_scores: Vec::new(),
            onnx: None,
            cuda: None,
            cuda_unavailable: None,
        };
        model.seal();
        model
    }

    /// Recomputes the weights checksum and the id after the tensors changed.
    ///
    /// The id hashes what decides a frame's score as trained: the weights (network, MSS
    /// bank, held-out scores) and, from `model.json`, the feature names, the lag window,
    /// the smoothing span, the scaler, the architecture (layer widths, activation, output
    /// kind, members), the head, the log-variance baseline and the MSS settings. Two models
    /// trained differently do not share an id, even when trained into the same weights (the
    /// same history under other metric names): the `model_id` label of their alerts tells
    /// them apart. The replay-time variants [`Model::with_smoothing`] and
    /// [`Model::with_mss`] do not reseal: they keep the trained model's id although they
    /// score differently. Models written before this keep the id they recorded (a hash of
    /// the weights alone), since loading reads it.
    pub fn seal(&mut self) {
        let sha = sha256_hex(&self.weights_bytes());
        let m = &self.meta;
        let scoring = serde_json::to_vec(&(
            &sha,
            &m.features,
            m.window_frames,
            m.smooth_frames,
            &m.scaler,
            &m.architecture,
            &m.head,
            &m.log_variance_baseline,
            &m.mss,
        ))
        .expect("model metadata serialises");
        self.meta.id = sha256_hex(&scoring)[..12].to_string();
        self.meta.weights = WeightsRef {
            file: WEIGHTS_FILE.into(),
            sha256: sha,
        };
    }

    fn weights_bytes(&self) -> Vec<u8> {
        serialize_weights(&self.ae, self.bank.as_ref(), &self.calibration_scores)
    }

    /// The same model scored with other mean-shift settings (the bank's R⁰ is reused;
    /// shifted copies are rebuilt). `rounds = 0` or `neighbours = 1` turn MSS off. The
    /// stored training scores describe the original settings only, so they are dropped
    /// when the settings change.
    pub fn with_mss(&self, mss: MssConfig) -> Model {
        let mut m = self.clone();
        if mss.is_off() != self.meta.mss.is_off()
            || (!mss.is_off()
                && (mss.rounds, mss.neighbours) != (self.meta.mss.rounds, self.meta.mss.neighbours))
        {
            m.calibration_scores.clear();
        }
        m.meta.mss = mss;
        m.bank = self
            .bank
            .as_ref()
            .map(|b| ReferenceBank::from_r0(b.r0().clone(), mss.rounds, mss.neighbours));
        m
    }

    /// The same model with its scores averaged over `frames` frames per stream. Its
    /// thresholds calibrate on the same stored scores ([`Model::threshold_scores`]), so they
    /// are kept.
    pub fn with_smoothing(&self, frames: usize) -> Model {
        let mut m = self.clone();
        m.meta.smooth_frames = frames.clamp(1, crate::smooth::MAX_SMOOTH_FRAMES);
        m
    }

    /// What thresholds calibrate on: the stored held-out scores, frame by frame, also
    /// when the stream's scores are smoothed. A mean over frames exceeds a threshold only
    /// when one of its frames does, so frames that all stay below it never alarm. (Means
    /// of the held-out scores would not describe a stream: those rows are a random tenth
    /// of the training rows, or of a retrain's reservoir, so their means vary far less
    /// than a stream's neighbouring frames do, and such thresholds fired on 41 % of the
    /// frames after an adopted level shift.)
    pub fn threshold_scores(&self) -> Vec<f64> {
        self.calibration_scores
            .iter()
            .map(|&s| f64::from(s))
            .collect()
    }

    /// The reference bank when mean-shift scoring is on.
    pub fn active_bank(&self) -> Option<&ReferenceBank> {
        self.bank.as_ref().filter(|_| !self.meta.mss.is_off())
    }

    /// Number of input features.
    pub fn n_features(&self) -> usize {
        self.meta.features.len()
    }

    /// Writes the model directory (created if missing), weights first, metadata last,
    /// each atomically, so a crash never leaves metadata that points at missing weights.
    ///
    /// # Errors
    /// Any I/O failure, with the path.
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        fs::create_dir_all(dir).map_err(|source| ModelError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        write_atomic(&dir.join(WEIGHTS_FILE), &self.weights_bytes())?;
        let json = serde_json::to_vec_pretty(&self.meta).map_err(|e| ModelError::Json {
            path: dir.join(META_FILE),
            reason: e.to_string(),
        })?;
        write_atomic(&dir.join(META_FILE), &json)
    }

    /// Loads and validates a model directory.
    ///
    /// # Errors
    /// Missing or unreadable files, malformed JSON, an unsupported format version, shapes
    /// that do not chain, wrong dtypes, non-finite values, or a weights checksum mismatch.
    pub fn load(dir: &Path) -> Result<Model, ModelError> {
        if fs::metadata(dir).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
            return Err(ModelError::NoFolder {
                path: dir.to_path_buf(),
            });
        }
        let meta_path = dir.join(META_FILE);
        let text = fs::read_to_string(&meta_path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound && dir.is_dir() {
                ModelError::NotAModel {
                    path: dir.to_path_buf(),
                }
            } else {
                ModelError::Io {
                    path: meta_path.clone(),
                    source,
                }
            }
        })?;
        let meta: ModelMeta = serde_json::from_str(&text).map_err(|e| ModelError::Json {
            path: meta_path.clone(),
            reason: e.to_string(),
        })?;
        let meta = ModelMeta {
            scaler: meta.scaler.finish_load(),
            ..meta
        };
        validate_meta(&meta, &meta_path)?;

        let weights_path = dir.join(&meta.weights.file);
        let bytes = fs::read(&weights_path).map_err(|source| ModelError::Io {
            path: weights_path.clone(),
            source,
        })?;
        let sha = sha256_hex(&bytes);
        if sha != meta.weights.sha256 {
            return Err(ModelError::Weights {
                path: weights_path,
                reason: format!(
                    "checksum mismatch (file changed or corrupt): model.json says {}, file is {}",
                    meta.weights.sha256, sha
                ),
            });
        }
        let (ae, bank, calibration_scores) = deserialize_weights(&bytes, &meta, &weights_path)?;
        Ok(Model {
            meta,
            ae,
            bank,
            calibration_scores,
            onnx: None,
            cuda: None,
            cuda_unavailable: None,
        })
    }

    /// Attaches the configured backend. `onnx` loads and validates `dir`/`[onnx] file`
    /// against this model's features and output kind; `native` detaches any ONNX graph or
    /// GPU copy; `cuda` uploads the weights with the default `[cuda]` settings (use
    /// [`Model::with_configured_backend`] or [`Model::with_cuda`] for others).
    ///
    /// # Errors
    /// The ONNX file or ONNX Runtime cannot be used (the message names the file, the
    /// mismatch or the library), or darkwatch was built without the `onnx` feature; for
    /// `cuda`, as [`Model::with_cuda`].
    pub fn with_backend(
        self,
        dir: &Path,
        backend: Backend,
        cfg: &OnnxConfig,
    ) -> Result<Model, ModelError> {
        self.with_backends(dir, backend, cfg, &CudaConfig::default())
    }

    /// [`Model::with_backend`] with the configuration's `[score] backend`, `[onnx]` and
    /// `[cuda]` sections.
    ///
    /// # Errors
    /// As [`Model::with_backend`] and [`Model::with_cuda`].
    pub fn with_configured_backend(
        self,
        dir: &Path,
        cfg: &crate::config::DarkwatchConfig,
    ) -> Result<Model, ModelError> {
        self.with_backends(dir, cfg.score.backend, &cfg.onnx, &cfg.cuda)
    }

    fn with_backends(
        mut self,
        dir: &Path,
        backend: Backend,
        onnx: &OnnxConfig,
        cuda: &CudaConfig,
    ) -> Result<Model, ModelError> {
        self.cuda = None;
        self.cuda_unavailable = None;
        self.onnx = match backend {
            Backend::Native => None,
            Backend::Onnx => Some(Arc::new(OnnxModel::load(
                &dir.join(&onnx.file),
                &self.meta.id,
                self.n_features(),
                self.ae.recon_width(),
                self.ae.output,
                onnx,
            )?)),
            Backend::Cuda => return self.with_cuda(cuda),
        };
        Ok(self)
    }

    /// Uploads the autoencoder to CUDA device `cfg.device` (detaching any ONNX graph).
    /// Where no usable GPU is found and `cfg.fallback = "cpu"`, logs a warning and keeps
    /// the native kernels ([`Model::backend_label`] then says why).
    ///
    /// # Errors
    /// With `fallback = "error"`: no CUDA driver, no such device, cuBLAS or NVRTC missing,
    /// or the upload failed (the message names which); or darkwatch was built without the
    /// `cuda` feature (whatever the fallback).
    pub fn with_cuda(mut self, cfg: &CudaConfig) -> Result<Model, ModelError> {
        self.onnx = None;
        self.cuda = None;
        self.cuda_unavailable = None;
        match CudaModel::load(&self.ae, cfg) {
            Ok(m) => {
                tracing::info!(device = cfg.device, name = %m.device_name(), "autoencoder uploaded to the GPU");
                self.cuda = Some(Arc::new(m));
            }
            Err(e) if cfg.fallback == CudaFallback::Cpu && cfg!(feature = "cuda") => {
                tracing::warn!(error = %e, "CUDA backend unavailable; scoring with the native kernels ([cuda] fallback = \"cpu\")");
                self.cuda_unavailable = Some(e.to_string());
            }
            Err(e) => return Err(e.into()),
        }
        Ok(self)
    }

    /// Loads `dir` as `cfg` asks: its backend (`[score]`, `[onnx]`), and, with online
    /// retraining and a state directory, the newest valid checkpoint instead.
    ///
    /// # Errors
    /// As [`Model::load`] and [`Model::with_backend`].
    pub fn load_configured(
        dir: &Path,
        cfg: &crate::config::DarkwatchConfig,
    ) -> Result<Model, ModelError> {
        let model = Model::load(dir)?.with_configured_backend(dir, cfg)?;
        crate::retrain::resume(model, &cfg.retrain)
    }

    /// `native`, `onnx/<provider>`, `cuda/<device name>`, or
    /// `native (cuda unavailable: <why>)`: what scores this model.
    pub fn backend_label(&self) -> String {
        match (&self.onnx, &self.cuda, &self.cuda_unavailable) {
            (Some(m), _, _) => format!("onnx/{}", m.provider()),
            (None, Some(c), _) => format!("cuda/{}", c.device_name()),
            (None, None, Some(why)) => format!("native (cuda unavailable: {why})"),
            (None, None, None) => "native".into(),
        }
    }
}

fn serialize_weights(
    ae: &Autoencoder,
    bank: Option<&ReferenceBank>,
    calibration: &[f32],
) -> Vec<u8> {
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    if !calibration.is_empty() {
        buffers.push((
            CALIBRATION_TENSOR.into(),
            vec![calibration.len()],
            f32_bytes(calibration.iter().copied()),
        ));
    }
    if let Some(bank) = bank {
        let r0 = bank.r0();
        buffers.push((
            BANK_TENSOR.into(),
            vec![r0.nrows(), r0.ncols()],
            f32_bytes(r0.iter().copied()),
        ));
    }
    for (i, layer) in ae.layers.iter().enumerate() {
        buffers.push((
            format!("layers.{i}.weight"),
            vec![layer.outputs(), layer.inputs()],
            f32_bytes(layer.w.iter().copied()),
        ));
        buffers.push((
            format!("layers.{i}.bias"),
            vec![layer.outputs()],
            f32_bytes(layer.b.iter().copied()),
        ));
    }
    let views: Vec<(String, TensorView)> = buffers
        .iter()
        .map(|(name, shape, data)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), data)
                .expect("shape and byte length agree by construction");
            (name.clone(), view)
        })
        .collect();
    let metadata = HashMap::from([("format".to_string(), FORMAT.to_string())]);
    safetensors::serialize(views, Some(metadata)).expect("f32 tensors always serialize")
}

fn validate_meta(meta: &ModelMeta, path: &Path) -> Result<(), ModelError> {
    let field = |field: &str, reason: String| ModelError::Field {
        path: path.to_path_buf(),
        field: field.to_string(),
        reason,
    };
    if meta.format != FORMAT {
        return Err(field(
            "format",
            format!("expected \"{FORMAT}\", found \"{}\"", meta.format),
        ));
    }
    if meta.format_version != FORMAT_VERSION {
        return Err(field(
            "format_version",
            format!(
                "this darkwatch reads version {FORMAT_VERSION}, the model is version {}",
                meta.format_version
            ),
        ));
    }
    let d = meta.features.len();
    if d == 0 {
        return Err(field(
            "features",
            "empty: a model needs at least one feature".into(),
        ));
    }
    let w = meta.window_frames;
    if w == 0 || w > crate::window::MAX_WINDOW_FRAMES || !d.is_multiple_of(w) {
        return Err(field(
            "window_frames",
            format!(
                "{w} does not divide the {d} features into windows of 1 to {} frames",
                crate::window::MAX_WINDOW_FRAMES
            ),
        ));
    }
    if !(1..=crate::smooth::MAX_SMOOTH_FRAMES).contains(&meta.smooth_frames) {
        return Err(field(
            "smooth_frames",
            format!(
                "{} is not between 1 and {} frames",
                meta.smooth_frames,
                crate::smooth::MAX_SMOOTH_FRAMES
            ),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = meta.features.iter().find(|f| !seen.insert(f.as_str())) {
        return Err(field(
            "features",
            format!("duplicate feature name \"{dup}\""),
        ));
    }
    for (name, v) in [
        ("scaler.offset", &meta.scaler.offset),
        ("scaler.scale", &meta.scaler.scale),
    ] {
        if v.len() != d {
            return Err(field(
                name,
                format!("has {} values for {d} features", v.len()),
            ));
        }
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(field(
                name,
                format!("entry {i} is {}, not a finite number", v[i]),
            ));
        }
    }
    if let Some(i) = meta.scaler.scale.iter().position(|&s| s <= 0.0) {
        return Err(field(
            "scaler.scale",
            format!("entry {i} is {}, not positive", meta.scaler.scale[i]),
        ));
    }
    let arch = &meta.architecture;
    if arch.kind != "dense_autoencoder" {
        return Err(field(
            "architecture.kind",
            format!("unknown kind \"{}\"", arch.kind),
        ));
    }
    let w = &arch.layer_widths;
    if w.len() < 2 || w.contains(&0) {
        return Err(field(
            "architecture.layer_widths",
            format!("{w:?} is not a valid layer list"),
        ));
    }
    if w[0] != d {
        return Err(field(
            "architecture.layer_widths",
            format!("input width {} does not match {d} features", w[0]),
        ));
    }
    let k = arch.members;
    if !(1..=MAX_MEMBERS).contains(&k) {
        return Err(field(
            "architecture.members",
            format!("must lie in 1..={MAX_MEMBERS}, not {k}"),
        ));
    }
    let one = arch.output.output_width(d);
    let out = one * k;
    let last = w[w.len() - 1];
    if last != out {
        let kind = match arch.output {
            super::OutputKind::Plain => "plain",
            super::OutputKind::Probabilistic => "probabilistic",
        };
        return Err(field(
            "architecture.layer_widths",
            format!(
                "output width {last} should be {out} for {} {kind} model of {d} features{}",
                if k == 1 {
                    "a".to_string()
                } else {
                    format!("{k} members of a")
                },
                if last.is_multiple_of(one) && (2..=MAX_MEMBERS).contains(&(last / one)) {
                    format!(
                        " ({last} is {} members' outputs: are architecture.members and output right?)",
                        last / one
                    )
                } else {
                    String::new()
                }
            ),
        ));
    }
    if let Some(h) = w[1..w.len() - 1].iter().find(|&&h| h % k != 0) {
        return Err(field(
            "architecture.layer_widths",
            format!("hidden width {h} does not split evenly among {k} members"),
        ));
    }
    meta.head
        .check(arch.output)
        .map_err(|e| field("head", e.to_string()))?;
    let baseline = &meta.log_variance_baseline;
    let per_member = 2 * k * d;
    if ![0, per_member, per_member + d].contains(&baseline.len()) {
        return Err(field(
            "log_variance_baseline",
            format!(
                "has {} values: expected none, {} or {} for {d} features{}",
                baseline.len(),
                per_member,
                per_member + d,
                if k == 1 {
                    String::new()
                } else {
                    format!(" and {k} members")
                }
            ),
        ));
    }
    if let Some(i) = baseline.iter().position(|x| !x.is_finite()) {
        return Err(field(
            "log_variance_baseline",
            format!("value {i} is {}, not a finite number", baseline[i]),
        ));
    }
    meta.mss
        .validate()
        .map_err(|(k, r)| field(&format!("mss.{k}"), r))?;
    Ok(())
}

fn deserialize_weights(
    bytes: &[u8],
    meta: &ModelMeta,
    path: &Path,
) -> Result<(Autoencoder, Option<ReferenceBank>, Vec<f32>), ModelError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| ModelError::Weights {
        path: path.to_path_buf(),
        reason: format!("not a valid safetensors file: {e}"),
    })?;
    let widths = &meta.architecture.layer_widths;
    let n_layers = widths.len() - 1;
    let with_bank = st.names().contains(&BANK_TENSOR);
    if !with_bank && !meta.mss.is_off() {
        return Err(ModelError::Tensor {
            path: path.to_path_buf(),
            tensor: BANK_TENSOR.into(),
            reason: "missing, but model.json turns mean-shift scoring on".into(),
        });
    }
    let with_calibration = st.names().contains(&CALIBRATION_TENSOR);
    let expected: usize = 2 * n_layers + usize::from(with_bank) + usize::from(with_calibration);
    if st.len() != expected {
        return Err(ModelError::Weights {
            path: path.to_path_buf(),
            reason: format!(
                "holds {} tensors, the architecture needs {expected}",
                st.len()
            ),
        });
    }
    let read = |name: &str, shape: &[usize]| -> Result<Vec<f32>, ModelError> {
        let err = |reason: String| ModelError::Tensor {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            reason,
        };
        let t = st.tensor(name).map_err(|_| err("missing".into()))?;
        if t.dtype() != Dtype::F32 {
            return Err(err(format!("dtype {:?}, expected F32", t.dtype())));
        }
        if t.shape() != shape {
            return Err(err(format!("shape {:?}, expected {shape:?}", t.shape())));
        }
        let v: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(err(format!("element {i} is not finite")));
        }
        Ok(v)
    };
    let mut layers = Vec::with_capacity(n_layers);
    for i in 0..n_layers {
        let (fan_in, fan_out) = (widths[i], widths[i + 1]);
        let w = read(&format!("layers.{i}.weight"), &[fan_out, fan_in])?;
        let b = read(&format!("layers.{i}.bias"), &[fan_out])?;
        layers.push(Dense {
            w: Array2::from_shape_vec((fan_out, fan_in), w).expect("length checked against shape"),
            b: Array1::from(b),
            act: if i + 1 == n_layers {
                Activation::Identity
            } else {
                meta.architecture.activation
            },
        });
    }
    let bank = if with_bank {
        let d = widths[0];
        let frames = st
            .tensor(BANK_TENSOR)
            .map(|t| t.shape().first().copied().unwrap_or(0))
            .unwrap_or(0);
        if frames < meta.mss.neighbours.max(1) {
            return Err(ModelError::Tensor {
                path: path.to_path_buf(),
                tensor: BANK_TENSOR.into(),
                reason: format!(
                    "MSS needs at least {} reference frames, found {frames}",
                    meta.mss.neighbours
                ),
            });
        }
        let r0 = read(BANK_TENSOR, &[frames, d])?;
        let r0 = Array2::from_shape_vec((frames, d), r0).expect("length checked against shape");
        Some(ReferenceBank::from_r0(
            r0,
            meta.mss.rounds,
            meta.mss.neighbours,
        ))
    } else {
        None
    };
    let ae = Autoencoder {
        n_features: widths[0],
        output: meta.architecture.output,
        layers,
        members: meta.architecture.members,
    };
    ae.check_shapes().map_err(|reason| ModelError::Weights {
        path: path.to_path_buf(),
        reason,
    })?;
    let calibration = if with_calibration {
        let n = st
            .tensor(CALIBRATION_TENSOR)
            .map(|t| t.shape().first().copied().unwrap_or(0))
            .unwrap_or(0);
        read(CALIBRATION_TENSOR, &[n])?
    } else {
        Vec::new()
    };
    Ok((ae, bank, calibration))
}

/// A human-readable summary of a model (what `darkwatch inspect` prints).
pub fn describe(model: &Model, dir: &Path) -> String {
    let m = &model.meta;
    let p = &m.provenance;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "model      {} (format {} v{})",
        dir.display(),
        m.format,
        m.format_version
    );
    let _ = writeln!(s, "id         {}", m.id);
    let _ = writeln!(
        s,
        "network    {:?} dense autoencoder{}, widths {:?}, {} parameters, {} MACs/frame",
        m.architecture.output,
        match m.architecture.members {
            1 => String::new(),
            k => format!(", ensemble of {k} (scores averaged)"),
        },
        m.architecture.layer_widths,
        model.ae.parameter_count(),
        model.ae.macs_per_frame()
    );
    match (&model.onnx, &model.cuda) {
        (Some(g), _) => {
            let _ = writeln!(s, "backend    {} ({})", model.backend_label(), g.describe());
        }
        (None, Some(c)) => {
            let _ = writeln!(s, "backend    {} ({})", model.backend_label(), c.describe());
        }
        (None, None) => {
            let _ = writeln!(s, "backend    {}", model.backend_label());
        }
    }
    let _ = writeln!(s, "head       {}", m.head.describe());
    let _ = writeln!(
        s,
        "scaler     {:?} over {} features",
        m.scaler.kind,
        m.features.len()
    );
    // Both lines always show, so a model that scores rows alone (a table's) says so.
    if m.window_frames > 1 {
        let _ = writeln!(
            s,
            "window     {} frames of {} features each (lags {} to 0), {} inputs (window_frames {})",
            m.window_frames,
            m.frame_features().len(),
            m.window_frames - 1,
            m.features.len(),
            m.window_frames
        );
    } else {
        let _ = writeln!(s, "window     none: each frame alone (window_frames 1)");
    }
    if m.smooth_frames > 1 {
        let _ = writeln!(
            s,
            "smoothing  each score the mean of its stream's last {} frames (smooth_frames {})",
            m.smooth_frames, m.smooth_frames
        );
    } else {
        let _ = writeln!(
            s,
            "smoothing  none: each score its frame's own (smooth_frames 1)"
        );
    }
    if m.table {
        let _ = writeln!(
            s,
            "table      trained as a table (train --table): rows have no order; replay scores its input as a table"
        );
    }
    let bank = model.bank.as_ref().map_or(0, |b| b.frames());
    if m.mss.is_off() {
        let _ = writeln!(s, "mss        off ({bank} reference frames stored)");
    } else {
        let _ = writeln!(
            s,
            "mss        m={} rounds, k={} neighbours, {bank} reference frames",
            m.mss.rounds, m.mss.neighbours
        );
    }
    let shown: Vec<&str> = m.features.iter().take(8).map(String::as_str).collect();
    let more = if m.features.len() > 8 {
        format!(" … (+{})", m.features.len() - 8)
    } else {
        String::new()
    };
    let _ = writeln!(s, "features   {}{more}", shown.join(", "));
    let qs: Vec<String> = m
        .calibration
        .score_quantiles
        .iter()
        .map(|p| format!("q{}={:.4}", p.q, p.score))
        .collect();
    let _ = writeln!(
        s,
        "calibrated {} rows: {}",
        m.calibration.rows,
        qs.join("  ")
    );
    let _ = writeln!(
        s,
        "data       {} ({} rows, sha256 {})",
        p.data_file, p.rows, p.data_sha256
    );
    let _ = writeln!(
        s,
        "training   seed {}, {}{} epochs run (best {}{}), {} train / {} validation rows{}",
        p.train.seed,
        match m.architecture.members {
            1 => String::new(),
            k => format!("{k} networks in {:.1} s; the first: ", p.train_seconds),
        },
        p.epochs_run,
        p.best_epoch,
        if p.stopped_early {
            ", stopped early"
        } else {
            ""
        },
        p.rows_train,
        p.rows_validation,
        match m.architecture.members {
            1 => format!(", {:.1} s", p.train_seconds),
            _ => String::new(),
        }
    );
    if let (Some(t), Some(v)) = (
        p.train_losses.last(),
        p.validation_losses.get(p.best_epoch.saturating_sub(1)),
    ) {
        let _ = writeln!(s, "loss       last train {t:.4}, best validation {v:.4}");
    }
    let _ = writeln!(s, "version    written by darkwatch {}", p.darkwatch_version);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bundled models were written before `table`: they load, as not tables, and a
    /// model that is not a table writes no `table` field, so its model.json is unchanged.
    #[test]
    fn a_model_from_before_the_table_field_loads_as_not_a_table() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smd-machine-1-6");
        let text = fs::read_to_string(dir.join(META_FILE)).unwrap();
        assert!(!text.contains("\"table\""));
        let model = Model::load(&dir).unwrap();
        assert!(!model.meta.table);
        let json = serde_json::to_string(&model.meta).unwrap();
        assert!(!json.contains("\"table\""), "{json}");
        let table = ModelMeta {
            table: true,
            ..model.meta
        };
        let json = serde_json::to_string(&table).unwrap();
        assert!(json.contains("\"table\":true"));
        assert!(serde_json::from_str::<ModelMeta>(&json).unwrap().table);
    }

    /// An operator's trial: two models trained from the same history under other metric
    /// names had the same weights and so the same id, and their alerts the same
    /// `model_id`. The id now covers what scores beside the weights; the stored id of a
    /// model written before still loads as it was recorded.
    #[test]
    fn the_id_tells_apart_models_that_score_differently_with_the_same_weights() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smd-machine-1-6");
        let bundled = Model::load(&dir).unwrap();
        assert_eq!(
            bundled.meta.id, "a360dfed2be4",
            "a stored id is read, not recomputed"
        );
        let sealed = |change: &dyn Fn(&mut Model)| {
            let mut m = bundled.clone();
            change(&mut m);
            m.seal();
            m.meta.id
        };
        let same = sealed(&|_| {});
        assert_eq!(same, sealed(&|_| {}), "the id is a function of the model");
        assert_eq!(same.len(), 12);
        let renamed = sealed(&|m| m.meta.features[0] = "cpu_load".into());
        let span = sealed(&|m| m.meta.smooth_frames = 1);
        let head = sealed(&|m| m.meta.head.alpha = 1.0);
        let version = sealed(&|m| m.meta.version = 7);
        let members = sealed(&|m| m.meta.architecture.members += 1);
        let kind = sealed(&|m| m.meta.architecture.kind.push('x'));
        for other in [&renamed, &span, &head, &members, &kind] {
            assert_ne!(&same, other);
        }
        // The version counts retrains beside the id; it does not change what scores.
        assert_eq!(same, version);
        // The weights checksum is still the weights' own.
        let mut m = bundled.clone();
        m.seal();
        assert_eq!(m.meta.weights.sha256, bundled.meta.weights.sha256);
    }
}
