//! What the agent scores with: a darkwatch autoencoder ([`Model`]) or an SAE with its
//! dark-matter head ([`SaeDetector`]). `[agent] model_dir` decides: a folder with an SAE
//! checkpoint (`cfg.json` and SAELens or sparsify weights) is an SAE detector, anything
//! else a model directory written by `darkwatch train`.

use std::path::Path;
use std::sync::Arc;

use crate::config::DarkwatchConfig;
use crate::model::{Model, ModelError};
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
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Sae(#[from] DetectorError),
}

impl Detector {
    /// Loads `dir` as configured: an autoencoder with `[score] backend` and a retraining
    /// checkpoint to resume from ([`Model::load_configured`]), or an SAE scored as `[sae]`
    /// says.
    ///
    /// # Errors
    /// The folder cannot be loaded; the message names the file.
    pub fn load_configured(dir: &Path, cfg: &DarkwatchConfig) -> Result<Detector, LoadError> {
        if SaeDetector::is_sae_dir(dir) {
            return Ok(Detector::Sae(Arc::new(SaeDetector::load_on(
                dir,
                cfg.sae.score,
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
    /// model directory's own model, the state folder only checked
    /// ([`crate::retrain::check_state_dir`]). What `validate --agent` loads.
    ///
    /// # Errors
    /// As [`Self::load_configured`].
    pub fn load_checked(dir: &Path, cfg: &DarkwatchConfig) -> Result<Detector, LoadError> {
        if SaeDetector::is_sae_dir(dir) {
            return Self::load_configured(dir, cfg);
        }
        let model = Model::load(dir)?.with_configured_backend(dir, cfg)?;
        crate::retrain::check_state_dir(&cfg.retrain)?;
        Ok(Detector::Autoencoder(Arc::new(model)))
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
