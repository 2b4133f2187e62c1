//! Feature scaling fitted on training data and stored with the model.
//!
//! The autoencoder and the score heads work in the scaled space; the scaler is applied
//! once per frame on the scorer thread, in place, before the forward pass.

use ndarray::{ArrayView1, ArrayView2, ArrayViewMut1};
use serde::{Deserialize, Serialize};

/// How features are scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScalerKind {
    /// (x − mean) / (std + 1e-5), as in the MSS-PAE code. A constant training column
    /// gets scale 1 (like scikit-learn), so a later change shows as its raw size.
    ZScore,
    /// (x − min) / (max − min); a constant column gets range 1.
    MinMax,
}

/// A fitted scaler: `scaled = (x − offset) · inv_scale`, per feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scaler {
    pub kind: ScalerKind,
    pub offset: Vec<f32>,
    pub scale: Vec<f32>,
    #[serde(skip)]
    inv_scale: Vec<f32>,
}

/// Largest scaled magnitude: a finite value farther out (3e38 in a column whose training
/// spread is 0.1, say) would overflow to ±inf in f32 and turn the frame's score into NaN or
/// inf, which the pipeline would then drop or could not print. Clamped here, such a frame
/// scores far above any threshold and names the feature, as a smaller excursion does.
/// A billion: a column that was constant in training keeps its raw units (scale 1), and
/// byte or hertz readings move by millions, so the limit must sit well above them; squared
/// and divided by the smallest variance a head allows (1e-5), summed over a few thousand
/// inputs, it still stays far inside f32 (about 1e26 against 3e38).
pub const SCALED_LIMIT: f32 = 1e9;

/// Below this spread a training column is treated as constant.
const CONSTANT_SPREAD: f64 = 1e-12;
/// Added to the standard deviation, as the MSS-PAE code does.
const STD_EPSILON: f64 = 1e-5;

impl Scaler {
    /// Builds a scaler from stored parameters (offset and scale per feature).
    pub fn from_parts(kind: ScalerKind, offset: Vec<f32>, scale: Vec<f32>) -> Self {
        let inv_scale = scale.iter().map(|s| 1.0 / s).collect();
        Scaler {
            kind,
            offset,
            scale,
            inv_scale,
        }
    }

    /// Fits per-feature statistics on `x` (rows × features), in f64 for accuracy.
    pub fn fit(kind: ScalerKind, x: ArrayView2<f32>) -> Self {
        let d = x.ncols();
        let mut offset = Vec::with_capacity(d);
        let mut scale = Vec::with_capacity(d);
        for col in x.columns() {
            match kind {
                ScalerKind::ZScore => {
                    let (mean, var) = mean_var(col);
                    let std = var.sqrt();
                    offset.push(mean as f32);
                    scale.push(if std < CONSTANT_SPREAD {
                        1.0
                    } else {
                        (std + STD_EPSILON) as f32
                    });
                }
                ScalerKind::MinMax => {
                    let (lo, hi) = col
                        .iter()
                        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                            (lo.min(v as f64), hi.max(v as f64))
                        });
                    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
                    offset.push(lo as f32);
                    scale.push(if hi - lo < CONSTANT_SPREAD {
                        1.0
                    } else {
                        (hi - lo) as f32
                    });
                }
            }
        }
        Self::from_parts(kind, offset, scale)
    }

    /// Number of features.
    pub fn len(&self) -> usize {
        self.offset.len()
    }

    /// True when the scaler has no features.
    pub fn is_empty(&self) -> bool {
        self.offset.is_empty()
    }

    /// Scales one row in place, clamped to ±[`SCALED_LIMIT`] (NaN stays NaN). No allocation.
    #[inline]
    pub fn apply_row(&self, mut row: ArrayViewMut1<f32>) {
        for ((v, o), s) in row.iter_mut().zip(&self.offset).zip(&self.inv_scale) {
            *v = ((*v - o) * s).clamp(-SCALED_LIMIT, SCALED_LIMIT);
        }
    }

    /// Scales the rows of `src` (row-major, `len()` values each) into `dst`, which holds as
    /// many, clamped to ±[`SCALED_LIMIT`] (NaN stays NaN). The per-frame path: plain slices,
    /// one loop that vectorises. No allocation.
    #[inline]
    pub fn scale_rows_into(&self, src: &[f32], dst: &mut [f32]) {
        let d = self.offset.len();
        debug_assert_eq!(src.len(), dst.len());
        let (offset, inv) = (&self.offset[..d], &self.inv_scale[..d]);
        for (s, o) in src.chunks_exact(d).zip(dst.chunks_exact_mut(d)) {
            for j in 0..d {
                o[j] = ((s[j] - offset[j]) * inv[j]).clamp(-SCALED_LIMIT, SCALED_LIMIT);
            }
        }
    }

    /// Scales a whole matrix, returning a new one (training, not the hot path).
    pub fn transform(&self, x: ArrayView2<f32>) -> ndarray::Array2<f32> {
        let mut out = x.to_owned();
        for row in out.rows_mut() {
            self.apply_row(row);
        }
        out
    }

    /// Recomputes the cached reciprocal after deserialisation.
    pub fn finish_load(mut self) -> Self {
        self.inv_scale = self.scale.iter().map(|s| 1.0 / s).collect();
        self
    }
}

/// Mean and (population) variance of a column, in f64; (0, 0) for an empty one.
pub(crate) fn mean_var(col: ArrayView1<f32>) -> (f64, f64) {
    let n = col.len().max(1) as f64;
    let mean = col.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = col
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean, var)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn zscore_by_hand_and_constant_column_gets_unit_scale() {
        let x = array![[1.0f32, 5.0], [3.0, 5.0]];
        let s = Scaler::fit(ScalerKind::ZScore, x.view());
        assert_eq!(s.offset, vec![2.0, 5.0]);
        assert!((s.scale[0] - 1.00001).abs() < 1e-6);
        assert_eq!(s.scale[1], 1.0);
        let t = s.transform(array![[3.0f32, 6.0]].view());
        assert!((t[[0, 0]] - 1.0 / 1.00001).abs() < 1e-6);
        assert_eq!(t[[0, 1]], 1.0);
    }

    #[test]
    fn finite_values_beyond_f32_scaled_range_are_clamped_not_made_infinite() {
        let s = Scaler::fit(ScalerKind::ZScore, array![[0.0f32, 1.0], [0.2, 3.0]].view());
        let raw = [3e38f32, -3e38, f32::NAN, 2.0, 1e20, 2.5];
        let mut out = [0.0f32; 6];
        s.scale_rows_into(&raw, &mut out);
        assert_eq!(out[0], SCALED_LIMIT);
        assert_eq!(out[1], -SCALED_LIMIT);
        assert!(
            out[2].is_nan(),
            "NaN must stay NaN so the pipeline drops the frame"
        );
        assert!((out[3] - 0.0).abs() < 1e-6, "{}", out[3]);
        assert_eq!(out[4], SCALED_LIMIT);
        assert!((out[5] - 0.5 / 1.00001).abs() < 1e-6, "{}", out[5]);
        let t = s.transform(array![[3e38f32, -1e30]].view());
        assert_eq!(t.row(0).to_vec(), vec![SCALED_LIMIT, -SCALED_LIMIT]);
    }

    #[test]
    fn minmax_maps_training_range_to_unit_interval() {
        let x = array![[0.0f32], [2.0], [4.0]];
        let s = Scaler::fit(ScalerKind::MinMax, x.view());
        let t = s.transform(x.view());
        assert_eq!(t.column(0).to_vec(), vec![0.0, 0.5, 1.0]);
    }

    #[test]
    fn round_trip_through_serde_keeps_inverse() {
        let s = Scaler::fit(ScalerKind::ZScore, array![[1.0f32], [2.0]].view());
        let j = serde_json::to_string(&s).unwrap();
        let back: Scaler = serde_json::from_str::<Scaler>(&j).unwrap().finish_load();
        assert_eq!(back, s);
        assert_eq!(back.transform(array![[1.5f32]].view())[[0, 0]], 0.0);
    }
}
