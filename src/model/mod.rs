//! The dense autoencoder: its layers, output kind, feature scaler and model directory.
//!
//! Fed by [`crate::train`] (which fits the weights) and by [`io`] (which loads them);
//! feeds [`crate::score`], which turns a reconstruction into a score and contributions.
//! The forward and backward kernels live in [`nn`].

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_off.rs"]
pub mod cuda;
pub mod fit;
pub mod io;
pub mod nn;
#[cfg(feature = "onnx")]
pub mod onnx;
#[cfg(not(feature = "onnx"))]
#[path = "onnx_off.rs"]
pub mod onnx;
pub mod scaler;

use ndarray::{Array1, Array2};
use serde::{Deserialize, Serialize};

pub use io::{Model, ModelError, ModelMeta};
pub use nn::{Recon, Workspace};
pub use scaler::{Scaler, ScalerKind};

/// Element-wise activation after a dense layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Relu,
    Identity,
}

/// What the decoder's last layer produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    /// d outputs: the reconstruction x̂, trained with MSE.
    Plain,
    /// 2·d outputs: the mean μ (first d) and raw variance (last d, through softplus),
    /// trained with Gaussian NLL (α = β = 1). This is the PAE of Tan et al.
    Probabilistic,
}

impl OutputKind {
    /// Width of the last layer for `d` features.
    pub fn output_width(self, d: usize) -> usize {
        match self {
            OutputKind::Plain => d,
            OutputKind::Probabilistic => 2 * d,
        }
    }
}

/// One fully connected layer: `y = act(W x + b)` with `W` stored `[out, in]`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Dense {
    pub w: Array2<f32>,
    pub b: Array1<f32>,
    pub act: Activation,
}

impl Dense {
    pub fn inputs(&self) -> usize {
        self.w.ncols()
    }
    pub fn outputs(&self) -> usize {
        self.w.nrows()
    }
}

/// A dense autoencoder. Its input and (mean) output live in the scaled feature space.
///
/// With `members` = K > 1 it is an ensemble of K autoencoders of the same shape, merged into
/// one network: every hidden layer holds the K members' units side by side (member k's
/// block is the k-th K-th of the layer), each weight connects units of one member only (the
/// first layer reads the shared input), and the last layer gives the K reconstructions,
/// member by member: the K means (`K·d`), then, for a probabilistic model, the K raw
/// variances (`K·d`). The forward kernels see one dense network; the score heads average
/// the members' per-feature terms ([`crate::score::Head::score_batch`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Autoencoder {
    pub n_features: usize,
    pub output: OutputKind,
    pub layers: Vec<Dense>,
    /// Ensemble members merged into this network (1: a single autoencoder).
    pub members: usize,
}

impl Autoencoder {
    /// Layer widths, input first and output (d or 2d) last.
    pub fn widths(&self) -> Vec<usize> {
        let mut w = vec![self.n_features];
        w.extend(self.layers.iter().map(Dense::outputs));
        w
    }

    /// Hidden widths (everything between input and output), all members together.
    pub fn hidden_sizes(&self) -> Vec<usize> {
        let w = self.widths();
        w[1..w.len() - 1].to_vec()
    }

    /// Columns of each reconstruction part (the means, and the variances): `members · d`.
    pub fn recon_width(&self) -> usize {
        self.members * self.n_features
    }

    /// The member that output `o` of layer `l` belongs to (see [`Autoencoder`]).
    pub fn member_of_output(&self, l: usize, o: usize) -> usize {
        if l + 1 == self.layers.len() {
            (o % self.recon_width()) / self.n_features
        } else {
            o / (self.layers[l].outputs() / self.members)
        }
    }

    /// The member that input `i` of layer `l` belongs to; `None` for the shared input of
    /// the first layer.
    pub fn member_of_input(&self, l: usize, i: usize) -> Option<usize> {
        (l > 0).then(|| i / (self.layers[l].inputs() / self.members))
    }

    /// Multiply-accumulates per frame in one forward pass.
    pub fn macs_per_frame(&self) -> usize {
        self.layers.iter().map(|l| l.inputs() * l.outputs()).sum()
    }

    /// Number of trainable parameters (in an ensemble, the members' together: the weights
    /// held at 0 between members do not count).
    pub fn parameter_count(&self) -> usize {
        self.layers
            .iter()
            .enumerate()
            .map(|(i, l)| l.w.len() / if i == 0 { 1 } else { self.members } + l.b.len())
            .sum()
    }
}

/// Default hidden widths for `d` input features, following the MSS-PAE code
/// (papers.md §1.1): d<20: [d/2]; 20≤d<100: [d/2, d/4, d/2]; 100≤d<200: [d/2, d/4, d/8, d/4, d/2];
/// d≥200: the same with a d/16 latent. Widths never fall below 1.
pub fn default_hidden_sizes(d: usize) -> Vec<usize> {
    let h = |div: usize| ((d as f64 / div as f64).round() as usize).max(1);
    match d {
        0..20 => vec![h(2)],
        20..100 => vec![h(2), h(4), h(2)],
        100..200 => vec![h(2), h(4), h(8), h(4), h(2)],
        _ => vec![h(2), h(4), h(8), h(16), h(8), h(4), h(2)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_sizes_follow_mss_pae_rule() {
        assert_eq!(default_hidden_sizes(6), vec![3]);
        assert_eq!(default_hidden_sizes(38), vec![19, 10, 19]);
        assert_eq!(default_hidden_sizes(166), vec![83, 42, 21, 42, 83]);
        assert_eq!(default_hidden_sizes(256).len(), 7);
        assert_eq!(default_hidden_sizes(1), vec![1]);
    }
}
