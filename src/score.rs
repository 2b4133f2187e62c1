//! Score heads: turn an input and its reconstruction into one anomaly score per frame
//! (higher = more anomalous) plus a per-feature contribution vector, so alerts can name
//! the metrics that drove them.
//!
//! Fed by the model's forward pass ([`crate::model::Recon`]) on the scorer thread;
//! feeds the pipeline's sinks. All work happens in caller-provided buffers.

use ndarray::{ArrayView1, ArrayView2, ArrayViewMut2, Zip};
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
    /// How the wnll log-variance term counts (wnll only).
    #[serde(default)]
    pub log_variance: LogVariance,
}

/// The wnll log-variance term.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogVariance {
    /// β·max(0, ln v_j − b_j), with b_j the feature's median ln v on held-out training rows:
    /// only uncertainty above the usual counts; and v_j is capped at the largest variance
    /// the model predicted for feature j on those rows, so an anomaly cannot be explained
    /// away by an extrapolated variance. A frame never scores lower because the
    /// model is more sure of some feature than usual (the paper's form lets a confident
    /// feature cancel a large error elsewhere), and every contribution is ≥ 0, so alerts
    /// blame features by how far they are from normal.
    #[default]
    Excess,
    /// β·ln v_j, exactly as in Tan et al.
    Raw,
}

/// Error when a head cannot run on a model.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HeadError {
    #[error(
        "score head \"wnll\" needs a probabilistic model (model.kind = \"probabilistic\"), but this model is plain"
    )]
    NeedsVariance,
    #[error(
        "wnll weights must be finite, not negative and not both zero (alpha = {alpha}, beta = {beta})"
    )]
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
                || self.alpha < 0.0
                || self.beta < 0.0
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
        log_var_baseline: &[f32],
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
                let d = x.ncols();
                let (median, ceiling) = if log_var_baseline.len() == 2 * d {
                    log_var_baseline.split_at(d)
                } else {
                    (&[][..], &[][..])
                };
                let median = ArrayView1::from(median);
                let ceiling = ArrayView1::from(ceiling);
                match (
                    median.broadcast(x.raw_dim()),
                    ceiling.broadcast(x.raw_dim()),
                ) {
                    (Some(b), Some(top)) if self.log_variance == LogVariance::Excess => {
                        Zip::from(&mut contrib)
                            .and(&x)
                            .and(&recon.mean)
                            .and(var)
                            .and(&b)
                            .and(&top)
                            .for_each(|c, &x, &m, &s, &b, &top| {
                                let e = x - m;
                                // Never more uncertain than on any held-out normal row: an
                                // autoencoder must not explain an anomaly away by
                                // extrapolating a huge variance for it.
                                let v = s + VARIANCE_EPSILON;
                                let ln_v = v.ln();
                                // 1/v is exp(-ln v) without a second transcendental; a capped
                                // variance (rare) takes exp(-top).
                                let (ln_v, inv_v) = if ln_v > top {
                                    (top, (-top).exp())
                                } else {
                                    (ln_v, 1.0 / v)
                                };
                                *c = alpha * e * e * inv_v + beta * (ln_v - b).max(0.0);
                            })
                    }
                    _ => Zip::from(&mut contrib)
                        .and(&x)
                        .and(&recon.mean)
                        .and(var)
                        .for_each(|c, &x, &m, &s| {
                            let e = x - m;
                            let v = s + VARIANCE_EPSILON;
                            *c = alpha * e * e / v + beta * v.ln();
                        }),
                }
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

    fn run_with(
        head: Head,
        baseline: &[f32],
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
        head.score_batch(x.view(), &recon, baseline, &mut scores, contrib.view_mut());
        (scores, contrib)
    }

    fn run(
        head: Head,
        x: &Array2<f32>,
        mean: &Array2<f32>,
        var: Option<&Array2<f32>>,
    ) -> (Vec<f32>, Array2<f32>) {
        run_with(head, &[], x, mean, var)
    }

    #[test]
    fn mse_and_max_abs_by_hand() {
        let x = array![[1.0f32, 2.0, 3.0]];
        let m = array![[1.5f32, 2.0, 1.0]];
        let mse = Head {
            kind: HeadKind::Mse,
            alpha: 1.0,
            beta: 1.0,
            log_variance: LogVariance::Raw,
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
            log_variance: LogVariance::Raw,
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
            log_variance: LogVariance::Raw,
        };
        let (s, c) = run(head, &x, &m, Some(&v));
        let want = 0.5 / (0.25 + e) + 2.0 * ((0.25 + e).ln() + (2.0 + e).ln());
        assert!((s[0] as f64 - want).abs() < 1e-4);
        assert!((c.row(0).sum() - s[0]).abs() < 1e-5);
    }

    #[test]
    fn excess_log_variance_counts_only_uncertainty_above_the_baseline() {
        // Feature 0: error 1, variance 0.25 (below its baseline ln 1 = 0: no log term).
        // Feature 1: no error, variance 2 (above its baseline ln 0.5: counts ln 2 − ln 0.5).
        let x = array![[1.0f32, 0.0]];
        let m = array![[0.0f32, 0.0]];
        let v = array![[0.25f32, 2.0]];
        let head = Head {
            kind: HeadKind::Wnll,
            alpha: 0.5,
            beta: 2.0,
            log_variance: LogVariance::Excess,
        };
        let baseline = [0.0f32, 0.5f32.ln(), 10.0, 10.0];
        let (s, c) = run_with(head, &baseline, &x, &m, Some(&v));
        let e = 1e-5f32;
        assert!((c[[0, 0]] - 0.5 / (0.25 + e)).abs() < 1e-4, "{c}");
        assert!(
            (c[[0, 1]] - 2.0 * ((2.0 + e).ln() - 0.5f32.ln())).abs() < 1e-4,
            "{c}"
        );
        assert!(c.iter().all(|&v| v >= 0.0));
        assert!((s[0] - c.row(0).sum()).abs() < 1e-5);
        // A more confident prediction can no longer lower the score below the error term.
        let sure = array![[0.25f32, 1e-3]];
        let (s2, _) = run_with(head, &baseline, &x, &m, Some(&sure));
        assert!(s2[0] >= c[[0, 0]] - 1e-4);
        // The variance is capped at the held-out maximum (ln 0.5 for feature 1 here).
        let capped = [0.0f32, 0.5f32.ln(), 10.0, 0.5f32.ln()];
        let big = array![[0.25f32, 100.0]];
        let x2 = array![[1.0f32, 3.0]];
        let (_, c3) = run_with(head, &capped, &x2, &m, Some(&big));
        assert!((c3[[0, 1]] - 0.5 * 9.0 / 0.5).abs() < 1e-3, "{c3}");
        // Without a baseline (old models) the head falls back to the raw form.
        let (raw, _) = run_with(head, &[], &x, &m, Some(&v));
        let want = 0.5 / (0.25 + e) + 2.0 * ((0.25 + e).ln() + (2.0 + e).ln());
        assert!((raw[0] - want).abs() < 1e-3);
    }

    #[test]
    fn wnll_refuses_plain_model() {
        let head = Head {
            kind: HeadKind::Wnll,
            alpha: 0.5,
            beta: 2.0,
            log_variance: LogVariance::Excess,
        };
        assert_eq!(head.check(OutputKind::Plain), Err(HeadError::NeedsVariance));
        assert!(head.check(OutputKind::Probabilistic).is_ok());
        let bad = Head {
            alpha: f32::NAN,
            ..head
        };
        assert!(bad.check(OutputKind::Probabilistic).is_err());
        let negative = Head { beta: -1.0, ..head };
        assert!(negative.check(OutputKind::Probabilistic).is_err());
    }
}
