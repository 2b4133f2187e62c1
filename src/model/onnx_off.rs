//! Stand-in for the ONNX Runtime backend in builds without the `onnx` feature: the types
//! exist so that callers need no `cfg`, but none can be made. `[score] backend = "onnx"`
//! is refused by config validation (and by [`OnnxModel::load`]) with a rebuild hint.

use std::path::Path;
use std::sync::Arc;

use ndarray::ArrayView2;

use super::OutputKind;
use super::nn::Recon;
use crate::config::OnnxConfig;

#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error(
        "{0}: this darkwatch was built without ONNX Runtime support; rebuild with \
         `cargo build --release --features onnx`"
    )]
    NotBuilt(String),
}

impl OnnxError {
    /// Never: this build reads no graph (see the `onnx` build's `OnnxError`).
    pub fn is_folders_fault(&self) -> bool {
        false
    }
}

/// Uninhabited: no ONNX model exists in this build.
#[derive(Debug)]
pub enum OnnxModel {}

impl OnnxModel {
    /// # Errors
    /// Always: the feature is off.
    pub fn load(
        path: &Path,
        _model_id: &str,
        _n_features: usize,
        _recon_width: usize,
        _output: OutputKind,
        _cfg: &OnnxConfig,
    ) -> Result<OnnxModel, OnnxError> {
        Err(OnnxError::NotBuilt(path.display().to_string()))
    }

    pub fn provider(&self) -> &'static str {
        match *self {}
    }

    pub fn describe(&self) -> String {
        match *self {}
    }
}

/// Uninhabited: no ONNX session exists in this build.
#[derive(Debug)]
pub enum OnnxSession {}

impl OnnxSession {
    /// # Errors
    /// Never returns: no [`OnnxModel`] can exist.
    pub fn new(model: Arc<OnnxModel>, _max_batch: usize) -> Result<Self, OnnxError> {
        match *model {}
    }

    /// # Errors
    /// Never returns.
    pub fn time_run(&mut self, _x: ArrayView2<f32>) -> Result<u64, OnnxError> {
        match *self {}
    }

    pub fn has_binding(&self, _n: usize) -> bool {
        match *self {}
    }

    /// # Errors
    /// Never returns.
    pub fn forward_bound<R>(
        &mut self,
        _n: usize,
        _write: impl FnOnce(&mut [f32]),
        _f: impl FnOnce(ArrayView2<'_, f32>, &Recon<'_>) -> R,
    ) -> Result<R, OnnxError> {
        match *self {}
    }

    /// # Errors
    /// Never returns.
    pub fn forward<R>(
        &mut self,
        _x: ArrayView2<f32>,
        _f: impl FnOnce(&Recon<'_>) -> R,
    ) -> Result<R, OnnxError> {
        match *self {}
    }
}

/// No ONNX Runtime is ever loaded in this build.
pub fn runtime_version() -> Option<String> {
    None
}
