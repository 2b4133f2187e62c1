//! (in progress: forward/backward kernels)
/// Preallocated forward buffers.
pub struct Workspace;
/// A reconstruction.
pub struct Recon;
