//! Score heads: turn an input and its reconstruction into one anomaly score per frame
//! (higher = more anomalous) plus a per-feature contribution vector, so alerts can name
//! the metrics that drove them.
//!
//! Fed by the model's forward pass ([`crate::model::Recon`]) on the scorer thread;
//! feeds the pipeline's sinks. All work happens in caller-provided buffers.

use ndarray::{ArrayView2, ArrayViewMut2, Zip};
use serde::{Deserialize, Serialize};

use crate::model::{OutputKind, Recon};

/// Added to the predicted variance before dividing or taking its log (papers.md §1.2);
/// the same ε the training loss uses.
pub const VARIANCE_EPSILON: f32 = crate::model::nn::VARIANCE_EPS;

/// Which score a frame gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadKind {
    /// Σ_j (x_j − x̂_j)²; contribution j = (x_j − x̂_j)².
    Mse,
    /// max_j |x_j − x̂_j| (Borghesi et al.); contribution j = |x_j − x̂_j|.
    MaxAbs,
    /// α Σ_j (x_j − μ_j)²/(s_j+ε) + β Σ_j ln(s_j+ε) (Tan et al.); needs a probabilistic model.
    Wnll,
}

impl HeadKind {
    pub fn name(self) -> &'static str {
        match self {
            HeadKind::Mse => "mse",
            HeadKind::MaxAbs => "max_abs",
            HeadKind::Wnll => "wnll",
        }
    }
}

/// A score head with its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Head {
    pub kind: HeadKind,
    /// Weight of the variance-normalised error (wnll only).
    pub alpha: f32,
    /// Weight of the log-variance term (wnll only).
    pub beta: f32,
}

/// Error when a head cannot run on a model.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HeadError {
    #[error(
        "score head \"wnll\" needs a probabilistic model (model.kind = \"probabilistic\"), but this model is plain"
    )]
    NeedsVariance,
    #[error("wnll weights must be finite and not both zero (alpha = {alpha}, beta = {beta})")]
    BadWeights { alpha: f32, beta: f32 },
}

impl Head {
    /// Checks that this head can score a model with the given output kind.
    ///
    /// # Errors
    /// A `wnll` head on a plain model, or non-finite weights.
    pub fn check(&self, output: OutputKind) -> Result<(), HeadError> {
        if self.kind == HeadKind::Wnll {
            if output != OutputKind::Probabilistic {
                return Err(HeadError::NeedsVariance);
            }
            if !self.alpha.is_finite()
                || !self.beta.is_finite()
                || (self.alpha == 0.0 && self.beta == 0.0)
            {
                return Err(HeadError::BadWeights {
                    alpha: self.alpha,
                    beta: self.beta,
                });
            }
        }
        Ok(())
    }

    /// Scores every row of `x` (scaled inputs, n × d) against `recon`, writing `scores[..n]`
    /// and the per-feature contributions into `contrib` (n × d). Allocation-free.
    /// The caller has run [`Head::check`]; a missing variance then falls back to unit variance.
    pub fn score_batch(
        &self,
        x: ArrayView2<f32>,
        recon: &Recon,
        scores: &mut [f32],
        mut contrib: ArrayViewMut2<f32>,
    ) {
        let n = x.nrows();
        debug_assert!(scores.len() >= n && contrib.nrows() >= n);
        let mut contrib = contrib.slice_mut(ndarray::s![..n, ..]);
        match (self.kind, recon.var.as_ref()) {
            (HeadKind::Mse, _) => {
                Zip::from(&mut contrib)
                    .and(&x)
                    .and(&recon.mean)
                    .for_each(|c, &x, &m| {
                        let e = x - m;
                        *c = e * e;
                    });
                for (s, row) in scores.iter_mut().zip(contrib.rows()) {
                    *s = row.sum();
                }
            }
            (HeadKind::MaxAbs, _) => {
                Zip::from(&mut contrib)
                    .and(&x)
                    .and(&recon.mean)
                    .for_each(|c, &x, &m| *c = (x - m).abs());
                for (s, row) in scores.iter_mut().zip(contrib.rows()) {
                    *s =
                        row.iter().fold(
                            f32::NEG_INFINITY,
                            |a, &b| if b > a || b.is_nan() { b } else { a },
                        );
                }
            }
            (HeadKind::Wnll, Some(var)) => {
                let (alpha, beta) = (self.alpha, self.beta);
                Zip::from(&mut contrib)
                    .and(&x)
                    .and(&recon.mean)
                    .and(var)
                    .for_each(|c, &x, &m, &s| {
                        let e = x - m;
                        let v = s + VARIANCE_EPSILON;
                        *c = alpha * e * e / v + beta * v.ln();
                    });
                for (s, row) in scores.iter_mut().zip(contrib.rows()) {
                    *s = row.sum();
                }
            }
            (HeadKind::Wnll, None) => {
                let alpha = self.alpha;
                let log_eps = self.beta * (1.0 + VARIANCE_EPSILON).ln();
                Zip::from(&mut contrib)
                    .and(&x)
                    .and(&recon.mean)
                    .for_each(|c, &x, &m| {
                        let e = x - m;
                        *c = alpha * e * e / (1.0 + VARIANCE_EPSILON) + log_eps;
                    });
                for (s, row) in scores.iter_mut().zip(contrib.rows()) {
                    *s = row.sum();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, array};

    fn run(
        head: Head,
        x: &Array2<f32>,
        mean: &Array2<f32>,
        var: Option<&Array2<f32>>,
    ) -> (Vec<f32>, Array2<f32>) {
        let recon = Recon {
            mean: mean.view(),
            var: var.map(|v| v.view()),
        };
        let mut scores = vec![0.0; x.nrows()];
        let mut contrib = Array2::zeros(x.dim());
        head.score_batch(x.view(), &recon, &mut scores, contrib.view_mut());
        (scores, contrib)
    }

    #[test]
    fn mse_and_max_abs_by_hand() {
        let x = array![[1.0f32, 2.0, 3.0]];
        let m = array![[1.5f32, 2.0, 1.0]];
        let mse = Head {
            kind: HeadKind::Mse,
            alpha: 1.0,
            beta: 1.0,
        };
        let (s, c) = run(mse, &x, &m, None);
        assert_eq!(s, vec![0.25 + 0.0 + 4.0]);
        assert_eq!(c.row(0).to_vec(), vec![0.25, 0.0, 4.0]);
        let max = Head {
            kind: HeadKind::MaxAbs,
            ..mse
        };
        let (s, c) = run(max, &x, &m, None);
        assert_eq!(s, vec![2.0]);
        assert_eq!(c.row(0).to_vec(), vec![0.5, 0.0, 2.0]);
    }

    #[test]
    fn wnll_with_unit_weights_is_gaussian_nll_by_hand() {
        let x = array![[1.0f32, 0.0]];
        let m = array![[0.0f32, 0.0]];
        let v = array![[0.25f32, 2.0]];
        let head = Head {
            kind: HeadKind::Wnll,
            alpha: 1.0,
            beta: 1.0,
        };
        let (s, _) = run(head, &x, &m, Some(&v));
        let e = 1e-5f64;
        let want = 1.0 / (0.25 + e) + (0.25 + e).ln() + (2.0 + e).ln();
        assert!((s[0] as f64 - want).abs() < 1e-4, "{} vs {want}", s[0]);
        // α and β weight the two terms separately.
        let head = Head {
            kind: HeadKind::Wnll,
            alpha: 0.5,
            beta: 2.0,
        };
        let (s, c) = run(head, &x, &m, Some(&v));
        let want = 0.5 / (0.25 + e) + 2.0 * ((0.25 + e).ln() + (2.0 + e).ln());
        assert!((s[0] as f64 - want).abs() < 1e-4);
        assert!((c.row(0).sum() - s[0]).abs() < 1e-5);
    }

    #[test]
    fn wnll_refuses_plain_model() {
        let head = Head {
            kind: HeadKind::Wnll,
            alpha: 0.5,
            beta: 2.0,
        };
        assert_eq!(head.check(OutputKind::Plain), Err(HeadError::NeedsVariance));
        assert!(head.check(OutputKind::Probabilistic).is_ok());
        let bad = Head {
            alpha: f32::NAN,
            ..head
        };
        assert!(bad.check(OutputKind::Probabilistic).is_err());
    }
}
