//! Detection metrics over a scored, labelled series: point-wise AUROC, AUPRC and best F1,
//! plus the point-adjusted F1 that much of the literature reports.
//!
//! Fed by `replay` / `train` with one score per row (higher = more anomalous) and the
//! 0/1 labels from [`crate::ingest::read_labels`]; feeds the operator's report. The
//! point-wise numbers are the honest ones and are printed first; the point-adjusted F1
//! is printed beside them, labelled as inflated, only so results can be compared with
//! papers that use it.
//!
//! All metrics sort once, O(n log n), and sweep the distinct score values from the top;
//! "flagged at threshold t" means `score >= t`.
//!
//! # NaN scores
//! A score should never be NaN. If one is, it ranks as `+inf` (tied with `+inf`): the
//! most anomalous value. A model that emits NaN on normal rows therefore pays for it in
//! false alarms instead of having those rows quietly dropped or ranked as normal. `-0.0`
//! and `0.0` are the same score.

use std::cmp::Ordering;
use std::fmt;

use serde::Serialize;

/// Why a metric could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    #[error("scores and labels differ in length: {scores} scores, {labels} labels")]
    LengthMismatch { scores: usize, labels: usize },
    #[error("label {value} at index {index} is not 0 or 1")]
    BadLabel { index: usize, value: u8 },
}

/// The best F1 over all thresholds and where it is reached.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BestF1 {
    pub f1: f64,
    pub precision: f64,
    pub recall: f64,
    /// Flag `score >= threshold`. When several thresholds tie on F1, the highest
    /// (fewest alarms) is reported. `+inf` when the best cut is at NaN/`+inf` scores.
    pub threshold: f32,
}

/// All metrics for one scored series. `None` means undefined: one class is absent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Number of scored rows.
    pub n: usize,
    /// Rows labelled 1.
    pub n_anomalous: usize,
    /// Point-wise area under the ROC curve.
    pub auroc: Option<f64>,
    /// Point-wise average precision (sklearn's `average_precision_score`).
    pub auprc: Option<f64>,
    /// Point-wise best F1.
    pub best_f1: Option<BestF1>,
    /// Point-adjusted best F1 (Xu et al.): inflated, for comparison with papers only.
    pub pa_best_f1: Option<BestF1>,
}

/// Every metric at once, sorting the scores only once for the point-wise ones.
///
/// # Errors
/// [`EvalError::LengthMismatch`] when the slices differ in length;
/// [`EvalError::BadLabel`] for a label other than 0 or 1.
pub fn evaluate(scores: &[f32], labels: &[u8]) -> Result<Report, EvalError> {
    let ranked = Ranked::new(scores, labels)?;
    Ok(Report {
        n: scores.len(),
        n_anomalous: ranked.pos as usize,
        auroc: ranked.auroc(),
        auprc: ranked.auprc(),
        best_f1: ranked.best_f1(),
        pa_best_f1: point_adjusted_best_f1(scores, labels)?,
    })
}

/// Point-wise area under the ROC curve: the Mann–Whitney U statistic divided by
/// (positives × negatives), i.e. the probability that a random anomalous row scores
/// above a random normal row, ties counting one half (the average-rank convention).
///
/// ```
/// let auroc = darkwatch::eval::auroc(&[0.1, 0.4, 0.35, 0.8], &[0, 0, 1, 1]).unwrap();
/// assert_eq!(auroc, Some(0.75));
/// ```
///
/// # Errors
/// As [`evaluate`]. `Ok(None)` when either class is absent.
pub fn auroc(scores: &[f32], labels: &[u8]) -> Result<Option<f64>, EvalError> {
    Ok(Ranked::new(scores, labels)?.auroc())
}

/// Point-wise average precision, as scikit-learn's `average_precision_score`:
/// Σₙ (Rₙ − Rₙ₋₁) Pₙ over the distinct score values from the highest down, with R₀ = 0
/// (a step function, no trapezoidal interpolation).
///
/// # Errors
/// As [`evaluate`]. `Ok(None)` when either class is absent.
pub fn auprc(scores: &[f32], labels: &[u8]) -> Result<Option<f64>, EvalError> {
    Ok(Ranked::new(scores, labels)?.auprc())
}

/// Point-wise best F1 over every distinct score value as threshold (`score >= t`).
///
/// # Errors
/// As [`evaluate`]. `Ok(None)` when either class is absent.
pub fn best_f1(scores: &[f32], labels: &[u8]) -> Result<Option<BestF1>, EvalError> {
    Ok(Ranked::new(scores, labels)?.best_f1())
}

/// Point-adjusted best F1 (Xu et al., WWW 2018, "Donut"): at each threshold, every
/// labelled segment (a maximal run of 1s in `labels`) that has at least one flagged row
/// counts as entirely detected; then F1 is computed over rows. This is NOT a point-wise
/// metric and it is known to be inflated (a random score can reach a high value on data
/// with long segments, Kim et al., AAAI 2022). It exists only to be printed beside the
/// point-wise numbers, for comparison with papers that report it.
///
/// Computed in O(n log n): a segment is detected at `t` iff its maximum score is `>= t`,
/// so each segment becomes one item weighted by its length and each normal row one false
/// alarm; one sorted sweep then gives every threshold's counts.
///
/// # Errors
/// As [`evaluate`]. `Ok(None)` when either class is absent.
pub fn point_adjusted_best_f1(scores: &[f32], labels: &[u8]) -> Result<Option<BestF1>, EvalError> {
    check(scores, labels)?;
    // (key, true positives gained, false positives gained) when the threshold passes key.
    let mut items: Vec<(f32, u64, u64)> = Vec::new();
    let mut i = 0;
    while i < labels.len() {
        if labels[i] == 0 {
            items.push((rank_key(scores[i]), 0, 1));
            i += 1;
            continue;
        }
        let start = i;
        let mut top = f32::NEG_INFINITY;
        while i < labels.len() && labels[i] == 1 {
            top = top.max(rank_key(scores[i]));
            i += 1;
        }
        items.push((top, (i - start) as u64, 0));
    }
    Ok(sweep_best_f1(&group_sorted(items)))
}

/// Point-wise precision, recall and F1 of given flags (a streaming threshold's alarms),
/// not of a threshold chosen with the labels as [`BestF1`] is. `None` where undefined:
/// precision with nothing flagged, recall with no anomalous row, F1 with neither.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FlaggedF1 {
    /// Rows flagged.
    pub flagged: usize,
    /// Of them, labelled anomalous.
    pub true_positives: usize,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    pub f1: Option<f64>,
}

/// [`FlaggedF1`] of `flags` (one per row, true = flagged) against 0/1 `labels`.
///
/// # Errors
/// As [`evaluate`].
pub fn flagged_f1(flags: &[bool], labels: &[u8]) -> Result<FlaggedF1, EvalError> {
    if flags.len() != labels.len() {
        return Err(EvalError::LengthMismatch {
            scores: flags.len(),
            labels: labels.len(),
        });
    }
    if let Some(index) = labels.iter().position(|&l| l > 1) {
        return Err(EvalError::BadLabel {
            index,
            value: labels[index],
        });
    }
    let flagged = flags.iter().filter(|&&a| a).count();
    let positives = labels.iter().filter(|&&l| l == 1).count();
    let tp = flags
        .iter()
        .zip(labels)
        .filter(|&(&a, &l)| a && l == 1)
        .count();
    let ratio = |a: usize, b: usize| (b > 0).then(|| a as f64 / b as f64);
    Ok(FlaggedF1 {
        flagged,
        true_positives: tp,
        precision: ratio(tp, flagged),
        recall: ratio(tp, positives),
        f1: ratio(2 * tp, flagged + positives),
    })
}

impl fmt::Display for FlaggedF1 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let num = |x: Option<f64>| x.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.4}"));
        write!(
            f,
            "{} (precision {}, recall {}; {} rows flagged, {} of them anomalous)",
            num(self.f1),
            num(self.precision),
            num(self.recall),
            self.flagged,
            self.true_positives
        )
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Shown {
            report: self,
            point_adjusted: true,
            alarms: None,
        }
        .fmt(f)
    }
}

/// A [`Report`] as text, with or without its point-adjusted F1.
struct Shown<'a> {
    report: &'a Report,
    point_adjusted: bool,
    /// The flags of the threshold in use, named, printed under the best F1.
    alarms: Option<(&'a str, &'a FlaggedF1)>,
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.report;
        let ratio = if r.n == 0 {
            0.0
        } else {
            100.0 * r.n_anomalous as f64 / r.n as f64
        };
        writeln!(
            f,
            "rows: {} ({} anomalous, {:.2}%)",
            r.n, r.n_anomalous, ratio
        )?;
        let num = |x: Option<f64>| x.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.4}"));
        writeln!(f, "point-wise AUROC: {}", num(r.auroc))?;
        writeln!(f, "point-wise AUPRC (average precision): {}", num(r.auprc))?;
        write!(
            f,
            "point-wise best F1 (threshold chosen with the labels): {}",
            ShowF1(r.best_f1)
        )?;
        if let Some((name, a)) = self.alarms {
            write!(f, "\npoint-wise F1 of {name}: {a}")?;
        }
        if self.point_adjusted {
            write!(
                f,
                "\npoint-adjusted F1 (not point-wise, inflated; for comparison only): {}",
                ShowF1(r.pa_best_f1)
            )?;
        }
        if r.auroc.is_none() {
            write!(f, "\n(n/a: the labels hold only one class)")?;
        }
        Ok(())
    }
}

impl Report {
    /// The report without its point-adjusted F1, for rows that have no order (a table),
    /// where runs of outlier rows are not segments.
    pub fn pointwise(&self) -> impl fmt::Display + '_ {
        Shown {
            report: self,
            point_adjusted: false,
            alarms: None,
        }
    }

    /// The report with the point-wise F1 of the alarms actually raised (`name` says whose)
    /// under its best F1; without the point-adjusted F1 when `point_adjusted` is false.
    pub fn with_alarms<'a>(
        &'a self,
        name: &'a str,
        alarms: &'a FlaggedF1,
        point_adjusted: bool,
    ) -> impl fmt::Display + 'a {
        Shown {
            report: self,
            point_adjusted,
            alarms: Some((name, alarms)),
        }
    }
}

struct ShowF1(Option<BestF1>);

impl fmt::Display for ShowF1 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => write!(f, "n/a"),
            Some(b) => write!(
                f,
                "{:.4} (precision {:.4}, recall {:.4}, at score >= {})",
                b.f1, b.precision, b.recall, b.threshold
            ),
        }
    }
}

/// The value a score is ranked by: NaN becomes `+inf` and `-0.0` becomes `0.0`, so that
/// `total_cmp` orders keys exactly as `<` would order finite scores.
fn rank_key(score: f32) -> f32 {
    if score.is_nan() {
        f32::INFINITY
    } else if score == 0.0 {
        0.0
    } else {
        score
    }
}

fn check(scores: &[f32], labels: &[u8]) -> Result<(), EvalError> {
    if scores.len() != labels.len() {
        return Err(EvalError::LengthMismatch {
            scores: scores.len(),
            labels: labels.len(),
        });
    }
    match labels.iter().position(|&l| l > 1) {
        Some(index) => Err(EvalError::BadLabel {
            index,
            value: labels[index],
        }),
        None => Ok(()),
    }
}

/// Rows grouped by distinct score, highest first: (key, positives, negatives).
fn group_sorted(mut items: Vec<(f32, u64, u64)>) -> Vec<(f32, u64, u64)> {
    items.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
    let mut groups: Vec<(f32, u64, u64)> = Vec::new();
    for (key, p, n) in items {
        match groups.last_mut() {
            Some(g) if g.0.total_cmp(&key) == Ordering::Equal => {
                g.1 += p;
                g.2 += n;
            }
            _ => groups.push((key, p, n)),
        }
    }
    groups
}

/// The best F1 over cumulative counts of `groups` (highest key first).
fn sweep_best_f1(groups: &[(f32, u64, u64)]) -> Option<BestF1> {
    let pos: u64 = groups.iter().map(|g| g.1).sum();
    let neg: u64 = groups.iter().map(|g| g.2).sum();
    if pos == 0 || neg == 0 {
        return None;
    }
    let (mut tp, mut fp) = (0u64, 0u64);
    let mut best: Option<BestF1> = None;
    for &(key, p, n) in groups {
        tp += p;
        fp += n;
        let f1 = 2.0 * tp as f64 / (2 * tp + fp + (pos - tp)) as f64;
        if best.is_none_or(|b| f1 > b.f1) {
            best = Some(BestF1 {
                f1,
                precision: tp as f64 / (tp + fp) as f64,
                recall: tp as f64 / pos as f64,
                threshold: key,
            });
        }
    }
    best
}

/// Scores grouped by distinct value, highest first, with the class totals.
struct Ranked {
    groups: Vec<(f32, u64, u64)>,
    pos: u64,
    neg: u64,
}

impl Ranked {
    fn new(scores: &[f32], labels: &[u8]) -> Result<Self, EvalError> {
        check(scores, labels)?;
        let items = scores
            .iter()
            .zip(labels)
            .map(|(&s, &l)| (rank_key(s), u64::from(l), u64::from(l == 0)))
            .collect();
        let groups = group_sorted(items);
        let pos = groups.iter().map(|g| g.1).sum();
        let neg = groups.iter().map(|g| g.2).sum();
        Ok(Ranked { groups, pos, neg })
    }

    fn both_classes(&self) -> bool {
        self.pos > 0 && self.neg > 0
    }

    fn auroc(&self) -> Option<f64> {
        if !self.both_classes() {
            return None;
        }
        // U = Σ over negatives of (positives above + half the positives tied with it).
        let mut pos_above = 0.0f64;
        let mut u = 0.0f64;
        for &(_, p, n) in &self.groups {
            u += n as f64 * (pos_above + 0.5 * p as f64);
            pos_above += p as f64;
        }
        Some(u / (self.pos as f64 * self.neg as f64))
    }

    fn auprc(&self) -> Option<f64> {
        if !self.both_classes() {
            return None;
        }
        let (mut tp, mut fp) = (0u64, 0u64);
        let mut ap = 0.0f64;
        for &(_, p, n) in &self.groups {
            tp += p;
            fp += n;
            if p > 0 {
                // ΔR = p / pos; P at this threshold = tp / (tp + fp).
                ap += (p as f64 / self.pos as f64) * (tp as f64 / (tp + fp) as f64);
            }
        }
        Some(ap)
    }

    fn best_f1(&self) -> Option<BestF1> {
        sweep_best_f1(&self.groups)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn sklearn_documented_example() {
        // sklearn docs: roc_auc_score -> 0.75, average_precision_score -> 0.8333...
        let s = [0.1, 0.4, 0.35, 0.8];
        let l = [0, 0, 1, 1];
        assert!(close(auroc(&s, &l).unwrap().unwrap(), 0.75));
        assert!(close(auprc(&s, &l).unwrap().unwrap(), 5.0 / 6.0));
        // Thresholds 0.8, 0.4, 0.35, 0.1 give F1 2/3, 1/2, 4/5, 2/3.
        let b = best_f1(&s, &l).unwrap().unwrap();
        assert!(close(b.f1, 0.8) && close(b.precision, 2.0 / 3.0) && close(b.recall, 1.0));
        assert_eq!(b.threshold, 0.35);
    }

    #[test]
    fn ties_use_average_ranks() {
        // Positives {2, 3}, negatives {1, 2}: pairs 1 + 0.5 + 1 + 1 = 3.5 of 4.
        let s = [1.0, 2.0, 2.0, 3.0];
        let l = [0, 1, 0, 1];
        assert!(close(auroc(&s, &l).unwrap().unwrap(), 0.875));
        // Groups 3:(1,0) 2:(1,1) 1:(0,1): AP = 0.5·1 + 0.5·(2/3).
        assert!(close(auprc(&s, &l).unwrap().unwrap(), 5.0 / 6.0));
        // A constant score: AUROC 0.5, AP = prevalence (sklearn agrees).
        let c = [0.5; 4];
        assert!(close(auroc(&c, &l).unwrap().unwrap(), 0.5));
        assert!(close(auprc(&c, &l).unwrap().unwrap(), 0.5));
        let b = best_f1(&c, &l).unwrap().unwrap();
        assert!(close(b.f1, 2.0 / 3.0) && b.threshold == 0.5);
        // -0.0 and 0.0 are one score.
        assert!(close(auroc(&[-0.0, 0.0], &[0, 1]).unwrap().unwrap(), 0.5));
    }

    #[test]
    fn perfect_and_inverted_scores() {
        let l = [0, 0, 0, 1, 1];
        let s = [0.1, 0.2, 0.3, 0.8, 0.9];
        assert_eq!(auroc(&s, &l).unwrap(), Some(1.0));
        assert_eq!(auprc(&s, &l).unwrap(), Some(1.0));
        assert_eq!(best_f1(&s, &l).unwrap().unwrap().threshold, 0.8);
        let inv: Vec<f32> = s.iter().map(|x| -x).collect();
        assert_eq!(auroc(&inv, &l).unwrap(), Some(0.0));
    }

    #[test]
    fn one_class_or_empty_is_none() {
        for l in [[0u8, 0, 0], [1, 1, 1]] {
            let r = evaluate(&[0.1, 0.2, 0.3], &l).unwrap();
            assert_eq!(
                (r.auroc, r.auprc, r.best_f1, r.pa_best_f1),
                (None, None, None, None)
            );
            assert!(r.to_string().contains("n/a"));
        }
        let r = evaluate(&[], &[]).unwrap();
        assert_eq!((r.n, r.n_anomalous, r.auroc), (0, 0, None));
        assert!(r.to_string().starts_with("rows: 0 (0 anomalous, 0.00%)"));
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert_eq!(
            evaluate(&[0.1, 0.2], &[0]).unwrap_err(),
            EvalError::LengthMismatch {
                scores: 2,
                labels: 1
            }
        );
        assert_eq!(
            auroc(&[0.1, 0.2], &[0, 2]).unwrap_err().to_string(),
            "label 2 at index 1 is not 0 or 1"
        );
        assert!(point_adjusted_best_f1(&[0.1], &[]).is_err());
    }

    #[test]
    fn nan_ranks_as_most_anomalous() {
        // A NaN on a normal row is a false alarm above every real score.
        let l = [0, 1, 0];
        assert_eq!(auroc(&[f32::NAN, 0.5, 0.1], &l).unwrap(), Some(0.5));
        // NaN ties with +inf.
        assert_eq!(
            auroc(&[f32::NAN, f32::INFINITY], &[0, 1]).unwrap(),
            Some(0.5)
        );
        // A NaN on an anomalous row is still only as good as +inf.
        let b = best_f1(&[0.1, f32::NAN, 0.2], &l).unwrap().unwrap();
        assert_eq!((b.f1, b.threshold), (1.0, f32::INFINITY));
    }

    #[test]
    fn point_adjusted_hand_example_and_inflation() {
        // Segments: rows 1..=3 (max 0.9) and rows 6..=7 (max 0.15); 5 normal rows.
        let l = [0, 1, 1, 1, 0, 0, 1, 1, 0, 0];
        let s = [0.1, 0.2, 0.9, 0.1, 0.3, 0.2, 0.1, 0.15, 0.05, 0.25];
        // Point-wise: best at t = 0.1 with tp 5, fp 4: F1 = 10/14.
        let pw = best_f1(&s, &l).unwrap().unwrap();
        assert!(close(pw.f1, 10.0 / 14.0) && close(pw.precision, 5.0 / 9.0) && pw.threshold == 0.1);
        // Adjusted: at t = 0.15 both segments are detected (tp 5) with fp 3: F1 = 10/13.
        let pa = point_adjusted_best_f1(&s, &l).unwrap().unwrap();
        assert!(
            close(pa.f1, 10.0 / 13.0) && close(pa.precision, 5.0 / 8.0) && close(pa.recall, 1.0)
        );
        assert_eq!(pa.threshold, 0.15);
        assert!(pa.f1 >= pw.f1);
        // One hit inside a long segment is enough: a near-useless score looks good adjusted.
        let mut l2 = vec![0u8; 100];
        l2[10..60].fill(1);
        let mut s2 = vec![0.0f32; 100];
        s2[30] = 1.0;
        let pa2 = point_adjusted_best_f1(&s2, &l2).unwrap().unwrap();
        let pw2 = best_f1(&s2, &l2).unwrap().unwrap();
        assert_eq!(pa2.f1, 1.0);
        assert!(pw2.f1 < 0.7);
    }

    #[test]
    fn report_prints_point_wise_first_and_labels_adjusted_f1() {
        let r = evaluate(&[0.1, 0.4, 0.35, 0.8], &[0, 0, 1, 1]).unwrap();
        assert_eq!((r.n, r.n_anomalous), (4, 2));
        let text = r.to_string();
        let auroc_at = text.find("point-wise AUROC: 0.7500").unwrap();
        let pa_at = text
            .find("point-adjusted F1 (not point-wise, inflated; for comparison only)")
            .unwrap();
        assert!(auroc_at < pa_at, "{text}");
        assert!(
            text.contains("point-wise best F1 (threshold chosen with the labels): 0.8000 (precision 0.6667, recall 1.0000, at score >= 0.35)"),
            "{text}"
        );
        assert!(
            text.contains("point-wise AUPRC (average precision): 0.8333"),
            "{text}"
        );
        assert!(
            serde_json::to_string(&r)
                .unwrap()
                .contains("\"pa_best_f1\"")
        );
    }

    /// Flags counted by hand: 5 rows, 2 anomalous; flagged rows 1, 2, 4 hold one of them.
    #[test]
    fn flagged_f1_counts_the_flags_given() {
        let r = flagged_f1(&[false, true, true, false, true], &[0, 1, 0, 1, 0]).unwrap();
        assert_eq!((r.flagged, r.true_positives), (3, 1));
        assert_eq!(r.precision, Some(1.0 / 3.0));
        assert_eq!(r.recall, Some(0.5));
        // 2·tp / (flagged + anomalous) = 2 / 5, the harmonic mean of 1/3 and 1/2.
        assert!((r.f1.unwrap() - 0.4).abs() < 1e-12);
        assert_eq!(
            r.to_string(),
            "0.4000 (precision 0.3333, recall 0.5000; 3 rows flagged, 1 of them anomalous)"
        );
        // Nothing flagged: no precision; recall and F1 0.
        let r = flagged_f1(&[false; 3], &[0, 1, 0]).unwrap();
        assert_eq!((r.precision, r.recall, r.f1), (None, Some(0.0), Some(0.0)));
        assert!(flagged_f1(&[true], &[0, 1]).is_err());
    }

    /// Brute-force definitions, O(n²), to check the sweeps on random data with ties.
    mod brute {
        pub fn auroc(s: &[f32], l: &[u8]) -> f64 {
            let (mut u, mut pairs) = (0.0, 0.0);
            for i in (0..s.len()).filter(|&i| l[i] == 1) {
                for j in (0..s.len()).filter(|&j| l[j] == 0) {
                    pairs += 1.0;
                    u += if s[i] > s[j] {
                        1.0
                    } else if s[i] == s[j] {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
            u / pairs
        }

        fn thresholds(s: &[f32]) -> Vec<f32> {
            let mut t = s.to_vec();
            t.sort_by(|a, b| b.total_cmp(a));
            t.dedup();
            t
        }

        fn f1(pred: &[bool], l: &[u8]) -> f64 {
            let tp = pred.iter().zip(l).filter(|&(&p, &y)| p && y == 1).count() as f64;
            let fp = pred.iter().zip(l).filter(|&(&p, &y)| p && y == 0).count() as f64;
            let fneg = pred.iter().zip(l).filter(|&(&p, &y)| !p && y == 1).count() as f64;
            2.0 * tp / (2.0 * tp + fp + fneg)
        }

        pub fn ap(s: &[f32], l: &[u8]) -> f64 {
            let pos = l.iter().filter(|&&y| y == 1).count() as f64;
            let (mut prev_r, mut ap) = (0.0, 0.0);
            for t in thresholds(s) {
                let tp = (0..s.len()).filter(|&i| s[i] >= t && l[i] == 1).count() as f64;
                let flagged = (0..s.len()).filter(|&i| s[i] >= t).count() as f64;
                let r = tp / pos;
                ap += (r - prev_r) * tp / flagged;
                prev_r = r;
            }
            ap
        }

        pub fn best_f1(s: &[f32], l: &[u8]) -> f64 {
            thresholds(s)
                .iter()
                .map(|&t| f1(&s.iter().map(|&x| x >= t).collect::<Vec<_>>(), l))
                .fold(0.0, f64::max)
        }

        pub fn pa_f1(s: &[f32], l: &[u8]) -> f64 {
            let mut best = 0.0f64;
            for t in thresholds(s) {
                let mut pred: Vec<bool> = s.iter().map(|&x| x >= t).collect();
                let mut i = 0;
                while i < l.len() {
                    if l[i] == 1 {
                        let start = i;
                        while i < l.len() && l[i] == 1 {
                            i += 1;
                        }
                        if pred[start..i].iter().any(|&p| p) {
                            pred[start..i].fill(true);
                        }
                    } else {
                        i += 1;
                    }
                }
                best = best.max(f1(&pred, l));
            }
            best
        }
    }

    #[test]
    fn sweeps_match_brute_force_definitions() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..200 {
            let n = 2 + (next() % 60) as usize;
            // Few distinct values so that ties are common; runs so that segments exist.
            let s: Vec<f32> = (0..n).map(|_| (next() % 12) as f32 / 4.0).collect();
            let mut l = vec![0u8; n];
            let mut i = 0;
            while i < n {
                if next() % 4 == 0 {
                    let len = 1 + (next() % 6) as usize;
                    l[i..(i + len).min(n)].fill(1);
                    i += len;
                }
                i += 1;
            }
            let r = evaluate(&s, &l).unwrap();
            if !l.contains(&1) || !l.contains(&0) {
                assert!(r.auroc.is_none() && r.pa_best_f1.is_none());
                continue;
            }
            assert!(
                close(r.auroc.unwrap(), brute::auroc(&s, &l)),
                "round {round}"
            );
            assert!(close(r.auprc.unwrap(), brute::ap(&s, &l)), "round {round}");
            let (pw, pa) = (r.best_f1.unwrap(), r.pa_best_f1.unwrap());
            assert!(close(pw.f1, brute::best_f1(&s, &l)), "round {round}");
            assert!(close(pa.f1, brute::pa_f1(&s, &l)), "round {round}");
            assert!(pa.f1 >= pw.f1 - 1e-12, "round {round}");
            // The reported threshold reproduces the reported F1.
            let tp = (0..n)
                .filter(|&i| s[i] >= pw.threshold && l[i] == 1)
                .count() as f64;
            let flagged = (0..n).filter(|&i| s[i] >= pw.threshold).count() as f64;
            assert!(close(pw.precision, tp / flagged), "round {round}");
        }
    }
}
