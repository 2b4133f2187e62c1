//! What the agent scores with: a darkwatch autoencoder ([`Model`]) or an SAE with its
//! dark-matter head ([`SaeDetector`]). `[agent] model_dir` decides: a folder with an SAE
//! checkpoint (`cfg.json` and SAELens or sparsify weights) is an SAE detector, anything
//! else a model directory written by `darkwatch train`.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::DarkwatchConfig;
use crate::model::{Model, ModelError};
use crate::sae::SaeError;
use crate::sae::dark::DarkError;
use crate::sae::detector::{DetectorError, SaeDetector};

/// A loaded detector. Cloning shares the weights.
#[derive(Debug, Clone)]
pub enum Detector {
    /// A dense autoencoder written by `darkwatch train` (or a retrained version of one).
    Autoencoder(Arc<Model>),
    /// An SAE checkpoint with its dark-matter head and calibration.
    Sae(Arc<SaeDetector>),
}

/// Why a detector cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The folder itself is not there, or is a file: said as such, rather than as the first
    /// file looked for in it.
    #[error("{}: {reason}", dir.display())]
    Folder { dir: PathBuf, reason: &'static str },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Sae(#[from] DetectorError),
}

impl LoadError {
    /// Whether the folder is at fault: it is missing, or it holds no usable model (no or
    /// an invalid `model.json`, weights that are missing, corrupt or not the ones it names,
    /// an SAE checkpoint, head or calibration that is absent or broken, no ONNX graph for
    /// `[score] backend = "onnx"`). Restarting cannot mend that: the folder or `[agent]
    /// model_dir` must change, so `run` and `validate` call it a configuration error. Not
    /// so an I/O error other than a missing or unreadable file, ONNX Runtime or a GPU that
    /// is unavailable, or the retraining state folder: those may pass, or lie outside the
    /// model.
    pub fn is_bad_model(&self) -> bool {
        match self {
            LoadError::Folder { .. } => true,
            LoadError::Model(e) => match e {
                ModelError::Io { source, .. } => is_missing(source),
                ModelError::NoFolder { .. }
                | ModelError::NotAModel { .. }
                | ModelError::Json { .. }
                | ModelError::Field { .. }
                | ModelError::Tensor { .. }
                | ModelError::Weights { .. } => true,
                // A missing graph, or one exported from another model, is the folder's;
                // ONNX Runtime failing is not.
                ModelError::Onnx(e) => e.is_folders_fault(),
                ModelError::StateDir { .. } | ModelError::Cuda(_) => false,
            },
            LoadError::Sae(e) => match e {
                DetectorError::Sae(e) => sae_is_bad(e),
                DetectorError::Dark(e) => dark_is_bad(e),
                DetectorError::Io { source, .. } => is_missing(source),
                DetectorError::NoHead { .. }
                | DetectorError::Width { .. }
                | DetectorError::OtherSae(_)
                | DetectorError::Scaling { .. }
                | DetectorError::Calibration { .. } => true,
                DetectorError::Cuda(_) => false,
            },
        }
    }
}

/// A file or folder that is not there (or a file where a folder should be), or one the
/// agent may not read (root's 0600 files under the unit's `DynamicUser=`): restarting
/// changes neither.
fn is_missing(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::NotFound
            | ErrorKind::NotADirectory
            | ErrorKind::IsADirectory
            | ErrorKind::PermissionDenied
    )
}

/// See [`LoadError::is_bad_model`]: every SAE error but a failed read is about the files.
fn sae_is_bad(e: &SaeError) -> bool {
    match e {
        SaeError::Io { source, .. } => is_missing(source),
        _ => true,
    }
}

fn dark_is_bad(e: &DarkError) -> bool {
    match e {
        DarkError::Io { source, .. } => is_missing(source),
        DarkError::Sae(e) => sae_is_bad(e),
        _ => true,
    }
}

/// [`LoadError::Folder`] when `dir` is missing or not a folder; anything else is left to
/// the loaders, whose errors name the file.
fn check_folder(dir: &Path) -> Result<(), LoadError> {
    let reason = match std::fs::metadata(dir) {
        Err(e) if e.kind() == ErrorKind::NotFound => "no such folder",
        Ok(m) if !m.is_dir() => "not a folder",
        _ => return Ok(()),
    };
    Err(LoadError::Folder {
        dir: dir.to_path_buf(),
        reason,
    })
}

impl Detector {
    /// Loads `dir` as configured: an autoencoder with `[score] backend` and a retraining
    /// checkpoint to resume from ([`Model::load_configured`]), or an SAE scored as `[sae]`
    /// says.
    ///
    /// # Errors
    /// The folder cannot be loaded; the message names the file.
    pub fn load_configured(dir: &Path, cfg: &DarkwatchConfig) -> Result<Detector, LoadError> {
        check_folder(dir)?;
        if SaeDetector::is_sae_dir(dir) {
            return Ok(Detector::Sae(Arc::new(SaeDetector::load_on(
                dir,
                cfg.sae.clone(),
                cfg.score.backend,
                &cfg.cuda,
                cfg.pipeline.gpu_batch_frames(),
            )?)));
        }
        Ok(Detector::Autoencoder(Arc::new(Model::load_configured(
            dir, cfg,
        )?)))
    }

    /// As [`Self::load_configured`] without touching the retraining state folder: the
    /// model directory's own model. What `validate --agent` loads (it checks the state
    /// folder with [`crate::agent::check_dirs`]).
    ///
    /// # Errors
    /// As [`Self::load_configured`].
    pub fn load_checked(dir: &Path, cfg: &DarkwatchConfig) -> Result<Detector, LoadError> {
        check_folder(dir)?;
        if SaeDetector::is_sae_dir(dir) {
            return Self::load_configured(dir, cfg);
        }
        let model = Model::load(dir)?.with_configured_backend(dir, cfg)?;
        Ok(Detector::Autoencoder(Arc::new(model)))
    }

    /// `dir` as it is on disk, on the native kernels: no backend attached, no retraining
    /// checkpoint looked at, nothing written (an SAE as `[sae] score` says). What plain
    /// `validate` checks: the folder holds a model that loads.
    ///
    /// # Errors
    /// As [`Self::load_configured`], less the backend and the state folder.
    pub fn load_native(dir: &Path, cfg: &DarkwatchConfig) -> Result<Detector, LoadError> {
        check_folder(dir)?;
        if SaeDetector::is_sae_dir(dir) {
            return Ok(Detector::Sae(Arc::new(SaeDetector::load(
                dir,
                cfg.sae.clone(),
            )?)));
        }
        Ok(Detector::Autoencoder(Arc::new(Model::load(dir)?)))
    }

    /// A warning about how the configuration will score with this detector, for `run` to
    /// log and `validate` to print once the configuration is accepted
    /// ([`SaeDetector::skip_warning`]); `None` for an autoencoder.
    pub fn warning(&self) -> Option<&str> {
        match self {
            Detector::Autoencoder(_) => None,
            Detector::Sae(s) => s.skip_warning(),
        }
    }

    /// Content hash of what scores (12 hex digits).
    pub fn id(&self) -> &str {
        match self {
            Detector::Autoencoder(m) => &m.meta.id,
            Detector::Sae(s) => s.id(),
        }
    }

    /// 0 as trained (or for an SAE); each accepted online retrain adds 1.
    pub fn version(&self) -> u64 {
        match self {
            Detector::Autoencoder(m) => m.meta.version,
            Detector::Sae(_) => 0,
        }
    }

    /// The `model_version` alerts carry: [`Detector::version`] as text (0 as trained, as
    /// `inspect` and `darkwatch_model_version` show it).
    pub fn version_label(&self) -> String {
        self.version().to_string()
    }

    /// What alerts call the frame's values, in order.
    pub fn features(&self) -> &[String] {
        match self {
            Detector::Autoencoder(m) => &m.meta.features,
            Detector::Sae(s) => s.features(),
        }
    }

    /// What one live frame holds, in order: [`Self::features`], or for an autoencoder with a
    /// lag window the current frame's block of them (the agent builds the windows).
    pub fn frame_features(&self) -> &[String] {
        match self {
            Detector::Autoencoder(m) => m.meta.frame_features(),
            Detector::Sae(s) => s.features(),
        }
    }

    /// Frames per lag window (1: none; always 1 for an SAE).
    pub fn window_frames(&self) -> usize {
        match self {
            Detector::Autoencoder(m) => m.meta.window_frames,
            Detector::Sae(_) => 1,
        }
    }

    pub fn n_features(&self) -> usize {
        self.features().len()
    }

    /// Scores of normal frames that thresholds calibrate on ([`Model::threshold_scores`]).
    pub fn threshold_scores(&self) -> Vec<f64> {
        match self {
            Detector::Autoencoder(m) => m.threshold_scores(),
            Detector::Sae(s) => s
                .calibration_scores()
                .iter()
                .map(|&s| f64::from(s))
                .collect(),
        }
    }

    /// What scores: `native`, `onnx/<provider>`, `cuda/<device>` or `sae (...)`.
    pub fn backend_label(&self) -> String {
        match self {
            Detector::Autoencoder(m) => m.backend_label(),
            Detector::Sae(s) => s.backend_label(),
        }
    }

    /// The autoencoder, if this is one.
    pub fn autoencoder(&self) -> Option<&Arc<Model>> {
        match self {
            Detector::Autoencoder(m) => Some(m),
            Detector::Sae(_) => None,
        }
    }
}

impl From<Model> for Detector {
    fn from(model: Model) -> Detector {
        Detector::Autoencoder(Arc::new(model))
    }
}
