//! Stand-in for the CUDA backend in builds without the `cuda` feature: the types exist so
//! that callers need no `cfg`, but none can be made. `[score] backend = "cuda"` is refused
//! by config validation (and by [`CudaModel::load`]) with a rebuild hint.

use std::sync::Arc;

use ndarray::ArrayView2;

use super::Autoencoder;
use super::nn::Recon;
use crate::config::CudaConfig;

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error(
        "this darkwatch was built without CUDA support; rebuild with \
         `cargo build --release --features cuda`"
    )]
    NotBuilt,
}

/// Uninhabited: no CUDA model exists in this build.
#[derive(Debug)]
pub enum CudaModel {}

impl CudaModel {
    /// # Errors
    /// Always: the feature is off.
    pub fn load(_ae: &Autoencoder, _cfg: &CudaConfig) -> Result<CudaModel, CudaError> {
        Err(CudaError::NotBuilt)
    }

    pub fn device_name(&self) -> &str {
        match *self {}
    }

    pub fn describe(&self) -> String {
        match *self {}
    }
}

/// Uninhabited: no CUDA session exists in this build.
#[derive(Debug)]
pub enum CudaSession {}

impl CudaSession {
    /// # Errors
    /// Never returns: no [`CudaModel`] can exist.
    pub fn new(model: Arc<CudaModel>, _max_batch: usize) -> Result<Self, CudaError> {
        match *model {}
    }

    /// # Errors
    /// Never returns.
    pub fn time_runs(
        &mut self,
        _x: ArrayView2<f32>,
        _runs: usize,
        _record: impl FnMut(u64),
    ) -> Result<(), CudaError> {
        match *self {}
    }

    /// # Errors
    /// Never returns.
    pub fn forward<R>(
        &mut self,
        _x: ArrayView2<f32>,
        _f: impl FnOnce(&Recon<'_>) -> R,
    ) -> Result<R, CudaError> {
        match *self {}
    }

    /// # Errors
    /// Never returns.
    pub fn set_head(
        &mut self,
        _head: &crate::score::Head,
        _baseline: &[f32],
    ) -> Result<(), CudaError> {
        match *self {}
    }

    /// # Errors
    /// Never returns.
    pub fn score(
        &mut self,
        _x: ArrayView2<f32>,
        _target: Option<ArrayView2<f32>>,
    ) -> Result<(&[f32], &[f32]), CudaError> {
        match *self {}
    }

    pub fn graphs_off(&self) -> Option<&str> {
        match *self {}
    }

    pub fn disable_graphs(&mut self) {
        match *self {}
    }
}

/// Batches of up to this many rows replay a CUDA graph (in a `cuda` build).
pub const GRAPH_MAX_ROWS: usize = 64;

/// Whether CUDA device `index` is usable: always an error in this build.
///
/// # Errors
/// Always: the feature is off.
pub fn probe(_index: usize) -> Result<String, CudaError> {
    Err(CudaError::NotBuilt)
}

/// No kernels are compiled in this build.
///
/// # Errors
/// Always: the feature is off.
pub fn compile_kernels(_arch: Option<&str>) -> Result<(), CudaError> {
    Err(CudaError::NotBuilt)
}

/// Input buffers (forwards in flight) of a device SAE (in a `cuda` build).
pub const SAE_SLOTS: usize = 2;

/// Largest `k` the device TopK kernel takes (in a `cuda` build).
pub const SAE_MAX_K: usize = 256;

/// Uninhabited: no SAE is uploaded in this build.
#[derive(Debug)]
pub enum CudaSae {}

impl CudaSae {
    /// # Errors
    /// Always: the feature is off.
    pub fn load(
        _sae: &crate::sae::Sae,
        _max_batch: usize,
        _cfg: &CudaConfig,
    ) -> Result<CudaSae, CudaError> {
        Err(CudaError::NotBuilt)
    }

    /// # Errors
    /// Always: the feature is off.
    pub fn load_detector(
        _sae: &crate::sae::Sae,
        _head: &crate::sae::dark::DarkHead,
        _kind: crate::sae::detector::SaeScoreKind,
        _top: usize,
        _max_batch: usize,
        _cfg: &CudaConfig,
    ) -> Result<CudaSae, CudaError> {
        Err(CudaError::NotBuilt)
    }

    /// # Errors
    /// Always: the feature is off.
    pub fn check(_sae: &crate::sae::Sae, _max_batch: usize) -> Result<usize, CudaError> {
        Err(CudaError::NotBuilt)
    }

    /// # Errors
    /// Always: the feature is off.
    pub fn preflight(
        _sae: &crate::sae::Sae,
        _max_batch: usize,
        _cfg: &CudaConfig,
    ) -> Result<String, CudaError> {
        Err(CudaError::NotBuilt)
    }

    pub fn top_contributions(&self) -> (&[u32], &[f32], usize) {
        match *self {}
    }

    pub fn input_mut_unchecked(&mut self) -> &mut [f32] {
        match *self {}
    }

    pub fn input(&self) -> &[f32] {
        match *self {}
    }

    pub fn capacity(&self) -> usize {
        match *self {}
    }

    pub fn device_name(&self) -> &str {
        match *self {}
    }

    /// # Errors
    /// Never returns.
    pub fn forward(&mut self, _x: ArrayView2<f32>) -> Result<&[f32], CudaError> {
        match *self {}
    }

    /// # Errors
    /// Never returns.
    pub fn input_mut(&mut self) -> Result<&mut [f32], CudaError> {
        match *self {}
    }

    /// # Errors
    /// Never returns.
    pub fn submit(&mut self, _n: usize) -> Result<(), CudaError> {
        match *self {}
    }

    /// # Errors
    /// Never returns.
    pub fn wait(&mut self) -> Result<&[f32], CudaError> {
        match *self {}
    }

    /// # Errors
    /// Never returns.
    pub fn forward_input(&mut self, _n: usize) -> Result<&[f32], CudaError> {
        match *self {}
    }

    /// # Errors
    /// Never returns.
    pub fn latents(&mut self, _n: usize) -> Result<(Vec<u32>, Vec<f32>), CudaError> {
        match *self {}
    }

    /// # Errors
    /// Never returns.
    pub fn time_encoder_gemm(&mut self, _n: usize, _runs: usize) -> Result<f64, CudaError> {
        match *self {}
    }
}
