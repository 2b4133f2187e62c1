//! Token positions within prompts: dropping each prompt's first tokens from what `sae-train`
//! and `sae-head` train, fit and calibrate on, and the check that warns when rows of an
//! extreme norm are left in.
//!
//! Fed by the commands' activation rows with their prompt ids or array shape; feeds them the
//! kept rows and the lines their summaries print.
//!
//! # Why
//!
//! In most language models the first token of a prompt (BOS, or whatever token comes first)
//! is an attention sink whose residual-stream norm is tens of times the others' ("massive
//! activations"). Such rows are few but dominate every squared quantity: the head's
//! least-squares fit of ‖e‖² spends itself on them (a high R² that comes from those rows
//! alone), and their scores are the largest calibration scores, so thresholds land on them
//! and nothing else alerts. Engels et al. drop early positions before fitting (papers.md
//! §3.1: the first 200 by default, the first 1 in the power-law script).
//!
//! # Positions
//!
//! With prompt ids, a row's position is the number of earlier rows with the same id (its
//! index within the prompt, the prompts grouped as `Prompts::group` groups them). Without
//! them, an input of shape `[batch, seq, d]` gives row r position r mod seq. A `[tokens, d]`
//! input without ids has no positions: skipping is refused there, and only the norm check
//! runs.
//!
//! # The extreme-norm rule
//!
//! A row is extreme when its norm is more than [`EXTREME_NORM_RATIO`] times the median norm
//! **and** the robust z of its log-norm, (ln‖x‖ − median)/(1.4826·MAD), is above
//! [`EXTREME_NORM_Z`]. The log makes the rule about ratios (a scale-free statement about
//! norms); the median and MAD are not moved by the outliers they look for (a 1 % share of
//! rows cannot move them, unlike a mean and standard deviation); 1.4826·MAD is the standard
//! deviation for normal data, so z > 6 is far outside any normal spread of norms. The ratio
//! floor keeps a tight norm distribution (MAD near 0, common in high dimension) from flagging
//! rows only slightly longer than the rest.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use ndarray::{Array2, ArrayView2, Axis};
use serde::{Deserialize, Serialize};

use super::eval::SaeEvalError;

/// The positions dropped by default when positions are known: position 0, the BOS /
/// attention-sink token.
pub const DEFAULT_SKIP_POSITIONS: usize = 1;
/// A row is extreme only when its norm is more than this many times the median norm.
pub const EXTREME_NORM_RATIO: f64 = 4.0;
/// … and the robust z of its log-norm is above this.
pub const EXTREME_NORM_Z: f64 = 6.0;
/// The flagged rows' positions are named in the warning up to this many distinct positions.
const POSITIONS_SHOWN: usize = 3;
/// The warning suggests `--skip-positions N` when every flagged row is below position N ≤
/// this; later positions are not "the start of the prompt".
const SKIP_HINT_MAX: usize = 8;

/// What gave the rows their positions, as a head's `dark_head.json` records it
/// (`positions_from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PositionsFrom {
    /// Prompt ids (`--prompt-ids`): a row's index among the rows of its id.
    PromptIds,
    /// A `[batch, seq, d]` input: row r is position r mod seq.
    Shape,
    /// `[tokens, d]` rows without prompt ids: no positions, nothing skipped.
    Unknown,
}

impl PositionsFrom {
    /// For messages: `prompt ids`, `the [batch, seq, d] shape`, `no positions`.
    pub fn text(self) -> &'static str {
        match self {
            PositionsFrom::PromptIds => "prompt ids",
            PositionsFrom::Shape => "the [batch, seq, d] shape",
            PositionsFrom::Unknown => "no positions",
        }
    }
}

/// Where each row sits: its prompt (index in order of first appearance) and its position
/// within that prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPositions {
    pub prompt: Vec<usize>,
    pub position: Vec<usize>,
    /// What gave them: prompt ids or the `[batch, seq, d]` shape.
    pub from: PositionsFrom,
}

impl TokenPositions {
    /// The rows' positions from their prompt ids, else from a `[.., seq, d]` shape of at
    /// least three dimensions; `None` for `[tokens, d]` rows without ids.
    pub fn find(rows: usize, ids: Option<&[i64]>, shape: &[usize]) -> Option<TokenPositions> {
        if let Some(ids) = ids {
            let mut seen: HashMap<i64, (usize, usize)> = HashMap::new();
            let (mut prompt, mut position) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
            for &id in ids {
                let next = seen.len();
                let slot = seen.entry(id).or_insert((next, 0));
                prompt.push(slot.0);
                position.push(slot.1);
                slot.1 += 1;
            }
            return Some(TokenPositions {
                prompt,
                position,
                from: PositionsFrom::PromptIds,
            });
        }
        match shape {
            [lead @ .., seq, _] if !lead.is_empty() && *seq > 0 => Some(TokenPositions {
                prompt: (0..rows).map(|r| r / seq).collect(),
                position: (0..rows).map(|r| r % seq).collect(),
                from: PositionsFrom::Shape,
            }),
            _ => None,
        }
    }

    fn select(&self, keep: &[usize]) -> TokenPositions {
        TokenPositions {
            prompt: keep.iter().map(|&r| self.prompt[r]).collect(),
            position: keep.iter().map(|&r| self.position[r]).collect(),
            from: self.from,
        }
    }
}

/// What [`select_rows`] kept, and what the command prints about it.
#[derive(Debug, Clone)]
pub struct RowSelection {
    /// The positions dropped from each prompt's start (0: none).
    pub skip: usize,
    /// Whether `skip` is the default (no `--skip-positions` given).
    pub defaulted: bool,
    /// The default would have dropped every row (no prompt is longer than it: prompts of
    /// one token), so `skip` fell back to 0.
    pub fell_back: bool,
    /// Rows dropped, and rows read.
    pub dropped: usize,
    pub rows: usize,
    /// Positions of the kept rows, when known.
    pub positions: Option<TokenPositions>,
    /// Extreme-norm rows among the kept ones.
    pub extreme: Option<ExtremeNorms>,
}

impl RowSelection {
    /// What a head fitted on the kept rows records (`skip_positions`, `positions_from` in
    /// `dark_head.json`): the skip applied, and what gave the positions.
    pub fn recorded(&self) -> (usize, PositionsFrom) {
        (
            self.skip,
            self.positions
                .as_ref()
                .map_or(PositionsFrom::Unknown, |p| p.from),
        )
    }

    /// The lines a command's summary prints: the rows dropped, and the extreme-norm warning.
    pub fn text(&self) -> String {
        let mut text = String::new();
        if let Some(p) = &self.positions {
            let prompts = p.prompt.iter().max().map_or(0, |m| m + 1);
            let why = if self.defaulted && self.skip > 0 {
                " (the default with positions known: BOS / attention-sink tokens; \
                 --skip-positions 0 keeps them)"
            } else {
                ""
            };
            let _ = if self.fell_back {
                writeln!(
                    text,
                    "positions: every token kept: the default --skip-positions \
                     {DEFAULT_SKIP_POSITIONS} would drop every row (no prompt is longer; \
                     positions from {}), so none are skipped",
                    p.from.text()
                )
            } else if self.skip == 0 {
                writeln!(
                    text,
                    "positions: every token kept (--skip-positions 0; positions from {})",
                    p.from.text()
                )
            } else {
                writeln!(
                    text,
                    "positions: dropped the first {} token(s) of each prompt, {} of {} rows, \
                     positions from {}{why}; {} rows remain in {prompts} prompts",
                    self.skip,
                    self.dropped,
                    self.rows,
                    p.from.text(),
                    self.rows - self.dropped
                )
            };
        }
        if let Some(x) = &self.extreme {
            let _ = writeln!(text, "warning: {}", x.message(self.positions.as_ref()));
        }
        text
    }
}

/// What [`select_rows`] returns: the kept rows, their prompt ids, and what was done.
pub type Selected = (Array2<f32>, Option<Vec<i64>>, RowSelection);

/// Drops the first `skip` tokens of every prompt from `x` and its prompt ids (`skip`
/// `None`: [`DEFAULT_SKIP_POSITIONS`] when positions are known, else 0), then checks the
/// kept rows for extreme norms ([`extreme_norms`]) and logs a warning if any are found.
///
/// When the default would drop every row (prompts of one token), it falls back to 0
/// ([`RowSelection::fell_back`]).
///
/// # Errors
/// `skip` ≥ 1 given for rows without positions (neither prompt ids nor a `[batch, seq, d]`
/// input), or a `skip` given that drops every row; each naming `input`.
pub fn select_rows(
    input: &Path,
    x: Array2<f32>,
    shape: &[usize],
    ids: Option<Vec<i64>>,
    skip: Option<usize>,
) -> Result<Selected, SaeEvalError> {
    let rows = x.nrows();
    let positions = TokenPositions::find(rows, ids.as_deref(), shape);
    let defaulted = skip.is_none();
    let mut skip = match (&positions, skip) {
        (Some(_), s) => s.unwrap_or(DEFAULT_SKIP_POSITIONS),
        (None, None | Some(0)) => 0,
        (None, Some(n)) => {
            return Err(SaeEvalError::Input {
                path: input.to_path_buf(),
                reason: format!(
                    "--skip-positions {n} needs each row's position in its prompt: give \
                     --prompt-ids (one id per row) or a [batch, seq, d] input; these \
                     [tokens, d] rows have neither"
                ),
            });
        }
    };
    let mut fell_back = false;
    let (x, ids, positions) = match positions {
        Some(p) if skip > 0 => {
            let keep: Vec<usize> = (0..rows).filter(|&r| p.position[r] >= skip).collect();
            if keep.is_empty() && defaulted {
                // Prompts of one token: the default drops nothing rather than everything.
                tracing::info!(
                    file = %input.display(),
                    "No prompt is longer than {skip} token(s): the default \
                     --skip-positions {skip} would drop every row, so none are skipped"
                );
                skip = 0;
                fell_back = true;
                (x, ids, Some(p))
            } else if keep.is_empty() {
                let longest = p.position.iter().max().map_or(0, |m| m + 1);
                return Err(SaeEvalError::Input {
                    path: input.to_path_buf(),
                    reason: format!(
                        "--skip-positions {skip} drops every row: the longest prompt has \
                         {longest} tokens (positions from {})",
                        p.from.text()
                    ),
                });
            } else {
                let ids = ids.map(|ids| keep.iter().map(|&r| ids[r]).collect());
                (x.select(Axis(0), &keep), ids, Some(p.select(&keep)))
            }
        }
        p => (x, ids, p),
    };
    let extreme = extreme_norms(x.view());
    let selection = RowSelection {
        skip,
        defaulted,
        fell_back,
        dropped: rows - x.nrows(),
        rows,
        positions,
        extreme,
    };
    if let Some(e) = &selection.extreme {
        tracing::warn!(
            file = %input.display(),
            rows = e.rows.len(),
            "{}",
            e.message(selection.positions.as_ref())
        );
    }
    Ok((x, ids, selection))
}

/// Which rows `sae-score` leaves out of its anomaly scores: those at positions below the
/// skip of the head (or `--skip-positions`), so that they are scored as the head was fitted
/// and calibrated.
#[derive(Debug, Clone)]
pub struct ScoreSkip {
    /// The positions left out of each prompt's start (0: none).
    pub skip: usize,
    /// Each row's position, kept only when `skip` ≥ 1.
    pub positions: Option<TokenPositions>,
    /// Rows left out.
    pub skipped: usize,
    /// The line the summary prints about it (empty when nothing is said).
    pub note: String,
}

impl ScoreSkip {
    /// Whether row `r` is scored (not below the skip).
    pub fn scored(&self, r: usize) -> bool {
        self.positions
            .as_ref()
            .is_none_or(|p| p.position[r] >= self.skip)
    }

    /// Row `r`'s position in its prompt, when rows are skipped.
    pub fn position(&self, r: usize) -> Option<usize> {
        self.positions.as_ref().map(|p| p.position[r])
    }
}

/// The rows `sae-score` scores: with positions known ([`TokenPositions::find`], the rules
/// of `sae-train`), those at positions from `given` (`--skip-positions`) on, else from the
/// skip the head recorded (`head`: `None` for a head written before it was recorded, which
/// skips nothing, as before), falling back to 0 with a note when that would leave out every
/// row (prompts of one token). Without positions nothing is skipped, with a note when the
/// head skipped positions (`head_file` names it). For a skip of 0 nothing is kept per row.
///
/// # Errors
/// `given` ≥ 1 without positions, or a `given` that leaves out every row; each naming `input`.
pub fn score_skip(
    input: &Path,
    rows: usize,
    ids: Option<&[i64]>,
    shape: &[usize],
    given: Option<usize>,
    head: Option<usize>,
    head_file: &Path,
) -> Result<ScoreSkip, SaeEvalError> {
    let none = |note: String| ScoreSkip {
        skip: 0,
        positions: None,
        skipped: 0,
        note,
    };
    let want = given.or(head).unwrap_or(0);
    if want == 0 {
        return Ok(none(String::new()));
    }
    let Some(p) = TokenPositions::find(rows, ids, shape) else {
        if given.is_some() {
            return Err(SaeEvalError::Input {
                path: input.to_path_buf(),
                reason: format!(
                    "--skip-positions {want} needs each row's position in its prompt: give \
                     --prompt-ids (one id per row) or a [batch, seq, d] input; these \
                     [tokens, d] rows have neither"
                ),
            });
        }
        return Ok(none(format!(
            "note: {} was fitted and calibrated without the first {want} token(s) of each \
             prompt (skip_positions), but these [tokens, d] rows have no positions, so \
             position-0 (BOS) rows cannot be told apart and are scored like the others; give \
             --prompt-ids (one id per row) or a [batch, seq, d] input to leave them out\n",
            head_file.display()
        )));
    };
    let skipped = p.position.iter().filter(|&&q| q < want).count();
    if skipped == rows && rows > 0 {
        let longest = p.position.iter().max().map_or(0, |m| m + 1);
        if given.is_some() {
            return Err(SaeEvalError::Input {
                path: input.to_path_buf(),
                reason: format!(
                    "--skip-positions {want} leaves out every row: the longest prompt has \
                     {longest} tokens (positions from {})",
                    p.from.text()
                ),
            });
        }
        return Ok(none(format!(
            "positions: every token scored: the head's skip_positions {want} would leave out \
             every row (no prompt is longer than {longest} token(s); positions from {})\n",
            p.from.text()
        )));
    }
    let why = if given.is_some() {
        "--skip-positions".to_string()
    } else {
        format!(
            "as the head was fitted: skip_positions in {}",
            head_file.display()
        )
    };
    let note = format!(
        "positions: the first {want} token(s) of each prompt left out of the scores ({why}; \
         positions from {}): {skipped} of {rows} rows, in no statistic (in --out: \
         skipped = 1, no scores); --skip-positions 0 scores them\n",
        p.from.text()
    );
    Ok(ScoreSkip {
        skip: want,
        positions: Some(p),
        skipped,
        note,
    })
}

/// Rows of an extreme norm (see the module's rule).
#[derive(Debug, Clone, PartialEq)]
pub struct ExtremeNorms {
    /// The flagged rows (indices into the rows checked).
    pub rows: Vec<usize>,
    /// Rows checked.
    pub of: usize,
    pub median_norm: f64,
    /// The largest flagged norm over the median.
    pub max_ratio: f64,
}

impl ExtremeNorms {
    /// The warning, naming the flagged rows' positions when `positions` (of the rows checked)
    /// are known, and the option that drops them.
    pub fn message(&self, positions: Option<&TokenPositions>) -> String {
        let mut m = format!(
            "{} of {} rows have an extreme norm (over {EXTREME_NORM_RATIO}× the median {:.4} \
             and a robust z of ln‖x‖ over {EXTREME_NORM_Z}; up to {:.0}×)",
            self.rows.len(),
            self.of,
            self.median_norm,
            self.max_ratio
        );
        let Some(p) = positions else {
            m.push_str(
                ": BOS / attention-sink tokens? They dominate the head's fit of ‖e‖² and the \
                 thresholds' calibration. Positions are unknown: give --prompt-ids (or a \
                 [batch, seq, d] input) so that --skip-positions can drop each prompt's first \
                 tokens, or remove these rows",
            );
            return m;
        };
        // Per position: flagged rows, and prompts that have a kept row there.
        let mut flagged: HashMap<usize, usize> = HashMap::new();
        for &r in &self.rows {
            *flagged.entry(p.position[r]).or_default() += 1;
        }
        let mut at: Vec<(usize, usize)> = flagged.into_iter().collect();
        at.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut present: HashMap<usize, std::collections::HashSet<usize>> = HashMap::new();
        for (&pos, &prompt) in p.position.iter().zip(&p.prompt) {
            if flagged_position(&at, pos) {
                present.entry(pos).or_default().insert(prompt);
            }
        }
        let parts: Vec<String> = at
            .iter()
            .take(POSITIONS_SHOWN)
            .map(|&(pos, n)| {
                format!(
                    "position {pos} in {n} of {} prompts",
                    present.get(&pos).map_or(0, |s| s.len())
                )
            })
            .collect();
        let more = if at.len() > POSITIONS_SHOWN {
            format!(" and {} other positions", at.len() - POSITIONS_SHOWN)
        } else {
            String::new()
        };
        let last = at.iter().map(|&(pos, _)| pos).max().unwrap_or(0);
        let _ = write!(m, ": {}{more}", parts.join(", "));
        if last < SKIP_HINT_MAX {
            let _ = write!(
                m,
                ". BOS / attention-sink tokens? They dominate the head's fit of ‖e‖² and the \
                 thresholds' calibration; --skip-positions {} drops them",
                last + 1
            );
        } else {
            m.push_str(
                ". They dominate the head's fit of ‖e‖² and the thresholds' calibration, and \
                 are not only at the start of prompts: check the data",
            );
        }
        m
    }
}

fn flagged_position(at: &[(usize, usize)], pos: usize) -> bool {
    at.iter().any(|&(p, _)| p == pos)
}

/// The rows of `x` whose norm is extreme by the module's rule, or `None` when there are none.
pub fn extreme_norms(x: ArrayView2<f32>) -> Option<ExtremeNorms> {
    let norms: Vec<f64> = x
        .rows()
        .into_iter()
        .map(|r| r.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt())
        .collect();
    let logs: Vec<f64> = norms.iter().map(|n| n.ln()).collect();
    let med_log = median(&logs)?;
    let mad = median(&logs.iter().map(|l| (l - med_log).abs()).collect::<Vec<_>>())?;
    let sigma = 1.4826 * mad;
    let median_norm = med_log.exp();
    let rows: Vec<usize> = (0..norms.len())
        .filter(|&r| {
            let ratio_ok = logs[r] - med_log > EXTREME_NORM_RATIO.ln();
            // MAD 0 (over half the norms equal): any larger norm is infinitely far out.
            let z = (logs[r] - med_log) / sigma;
            ratio_ok && (z > EXTREME_NORM_Z || sigma == 0.0)
        })
        .collect();
    if rows.is_empty() {
        return None;
    }
    let max_ratio = rows
        .iter()
        .map(|&r| norms[r] / median_norm)
        .fold(0.0, f64::max);
    Some(ExtremeNorms {
        of: norms.len(),
        rows,
        median_norm,
        max_ratio,
    })
}

/// The median (mean of the middle two for an even count); `None` when empty. NaN sorts last.
fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// `prompts` prompts of `seq` rows of width `d`, row norms about 1 (±10 %), position 0
    /// scaled by `bos`.
    fn prompts(prompts: usize, seq: usize, d: usize, bos: f32) -> Array2<f32> {
        let mut rng = Rng::new(7);
        let mut x = Array2::from_shape_fn((prompts * seq, d), |_| rng.uniform(-1.0, 1.0));
        for (r, mut row) in x.rows_mut().into_iter().enumerate() {
            let n = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            let scale = (1.0 + 0.1 * (r % 3) as f32) / n * if r % seq == 0 { bos } else { 1.0 };
            row.mapv_inplace(|v| v * scale);
        }
        x
    }

    fn ids(prompts: usize, seq: usize) -> Vec<i64> {
        (0..prompts * seq).map(|r| (r / seq) as i64 * 10).collect()
    }

    #[test]
    fn positions_come_from_ids_then_from_the_shape() {
        // Interleaved ids: each id counts its own rows.
        let p = TokenPositions::find(5, Some(&[4, 4, 9, 4, 9][..]), &[5, 2]).unwrap();
        assert_eq!(p.position, vec![0, 1, 0, 2, 1]);
        assert_eq!(p.prompt, vec![0, 0, 1, 0, 1]);
        let p = TokenPositions::find(6, None, &[2, 3, 8]).unwrap();
        assert_eq!(p.position, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(p.prompt, vec![0, 0, 0, 1, 1, 1]);
        assert!(TokenPositions::find(6, None, &[6, 8]).is_none());
    }

    #[test]
    fn skip_drops_exactly_the_first_rows_of_each_prompt_by_ids() {
        let x = Array2::from_shape_fn((12, 2), |(r, c)| (10 * r + c) as f32);
        // Three prompts of 5, 4 and 3 rows; the second interleaved with the third.
        let id = vec![1, 1, 1, 1, 1, 2, 3, 2, 3, 2, 3, 2];
        let (kept, kept_ids, sel) =
            select_rows(Path::new("a.npy"), x, &[12, 2], Some(id), Some(2)).unwrap();
        // Dropped: rows 0, 1 (prompt 1), 5, 7 (prompt 2), 6, 8 (prompt 3).
        let rows: Vec<f32> = kept.column(0).iter().map(|v| v / 10.0).collect();
        assert_eq!(rows, vec![2.0, 3.0, 4.0, 9.0, 10.0, 11.0]);
        assert_eq!(kept_ids.unwrap(), vec![1, 1, 1, 2, 3, 2]);
        assert_eq!((sel.skip, sel.dropped, sel.rows), (2, 6, 12));
        assert_eq!(sel.positions.unwrap().position, vec![2, 3, 4, 2, 2, 3]);
    }

    #[test]
    fn skip_drops_exactly_the_first_rows_of_each_sequence_by_shape() {
        let x = Array2::from_shape_fn((8, 2), |(r, _)| r as f32);
        let (kept, ids, sel) =
            select_rows(Path::new("a.npy"), x.clone(), &[2, 4, 2], None, Some(1)).unwrap();
        assert_eq!(kept.column(0).to_vec(), vec![1.0, 2.0, 3.0, 5.0, 6.0, 7.0]);
        assert!(ids.is_none());
        assert_eq!(sel.dropped, 2);
        // The default with a shape is the same.
        let (kept, _, sel) =
            select_rows(Path::new("a.npy"), x.clone(), &[2, 4, 2], None, None).unwrap();
        assert_eq!(kept.nrows(), 6);
        assert!(sel.defaulted && sel.skip == DEFAULT_SKIP_POSITIONS);
        // 0 keeps every row.
        let (kept, _, sel) = select_rows(Path::new("a.npy"), x, &[2, 4, 2], None, Some(0)).unwrap();
        assert_eq!((kept.nrows(), sel.skip, sel.dropped), (8, 0, 0));
    }

    #[test]
    fn default_skips_only_with_positions_and_refuses_a_skip_without_them() {
        let x = Array2::from_shape_fn((8, 2), |(r, _)| r as f32);
        let (kept, _, sel) =
            select_rows(Path::new("a.npy"), x.clone(), &[8, 2], None, None).unwrap();
        assert_eq!((kept.nrows(), sel.skip), (8, 0));
        assert!(sel.positions.is_none());
        let e = select_rows(Path::new("a.npy"), x.clone(), &[8, 2], None, Some(1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("a.npy") && e.contains("--prompt-ids"), "{e}");
        let e = select_rows(Path::new("a.npy"), x, &[2, 4, 2], None, Some(4))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("drops every row: the longest prompt has 4 tokens"),
            "{e}"
        );
    }

    /// Prompts of one token: the default skip would drop every row, so it falls back to 0
    /// and says so; the same skip given still refuses.
    #[test]
    fn the_default_skip_falls_back_to_none_when_every_prompt_is_one_token() {
        let x = Array2::from_shape_fn((4, 2), |(r, _)| r as f32);
        let id = vec![1, 2, 3, 4];
        let (kept, kept_ids, sel) = select_rows(
            Path::new("a.npy"),
            x.clone(),
            &[4, 2],
            Some(id.clone()),
            None,
        )
        .unwrap();
        assert_eq!(kept, x);
        assert_eq!(kept_ids.unwrap(), id);
        assert!(sel.defaulted && sel.fell_back, "{sel:?}");
        assert_eq!((sel.skip, sel.dropped, sel.rows), (0, 0, 4));
        let text = sel.text();
        assert!(
            text.contains("the default --skip-positions 1 would drop every row"),
            "{text}"
        );
        // A [batch, 1, d] input likewise.
        let (kept, _, sel) =
            select_rows(Path::new("a.npy"), x.clone(), &[4, 1, 2], None, None).unwrap();
        assert_eq!((kept.nrows(), sel.skip, sel.fell_back), (4, 0, true));
        // Given, it still refuses.
        let e = select_rows(Path::new("a.npy"), x, &[4, 2], Some(id), Some(1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--skip-positions 1 drops every row"), "{e}");
    }

    #[test]
    fn a_bos_like_row_is_flagged_with_its_position_and_the_option() {
        let x = prompts(60, 16, 32, 30.0);
        let e = extreme_norms(x.view()).expect("the ×30 rows are extreme");
        assert_eq!(e.rows, (0..60).map(|p| p * 16).collect::<Vec<_>>());
        let p = TokenPositions::find(x.nrows(), Some(&ids(60, 16)[..]), &[960, 32]).unwrap();
        let m = e.message(Some(&p));
        assert!(m.starts_with("60 of 960 rows have an extreme norm"), "{m}");
        assert!(m.contains("position 0 in 60 of 60 prompts"), "{m}");
        assert!(m.contains("--skip-positions 1 drops them"), "{m}");
        // Without positions, the message says how to get them.
        assert!(e.message(None).contains("give --prompt-ids"), "{m}");
        // Through select_rows: kept with --skip-positions 0, the warning is in the text;
        // dropped by default, it is not.
        let (_, _, sel) = select_rows(
            Path::new("a.npy"),
            x.clone(),
            &[960, 32],
            Some(ids(60, 16)),
            Some(0),
        )
        .unwrap();
        assert!(
            sel.text().contains("warning: 60 of 960 rows"),
            "{}",
            sel.text()
        );
        let (_, _, sel) =
            select_rows(Path::new("a.npy"), x, &[960, 32], Some(ids(60, 16)), None).unwrap();
        assert!(
            sel.extreme.is_none() && !sel.text().contains("warning"),
            "{}",
            sel.text()
        );
    }

    #[test]
    fn ordinary_rows_are_not_flagged() {
        // Norms within ±10 % (MAD small, so z alone would flag the largest): none over 4×.
        assert_eq!(extreme_norms(prompts(60, 16, 32, 1.0).view()), None);
        // 3× the median is below the ratio floor even when z is huge.
        assert_eq!(extreme_norms(prompts(60, 16, 32, 3.0).view()), None);
        // Equal norms (MAD 0) and a 4.5× row: flagged.
        let mut x = Array2::from_elem((50, 4), 1.0f32);
        x.row_mut(7).fill(4.5);
        assert_eq!(extreme_norms(x.view()).unwrap().rows, vec![7]);
    }

    #[test]
    fn widely_spread_norms_need_a_large_robust_z() {
        // Log-norms spread evenly over ±ln 4 (σ ≈ 0.6): a row 5× the median is about z = 1.6,
        // within the spread, and not flagged; nor is one 100× (z ≈ 4.5); one 1000× (z ≈ 6.7) is.
        let n = 201;
        let mut x = Array2::from_shape_fn((n, 1), |(r, _)| {
            (4f64.ln() * (2.0 * r as f64 / (n - 1) as f64 - 1.0)).exp() as f32
        });
        x[[0, 0]] = 5.0;
        assert_eq!(extreme_norms(x.view()), None);
        x[[0, 0]] = 100.0;
        assert_eq!(extreme_norms(x.view()), None);
        x[[0, 0]] = 1000.0;
        assert_eq!(extreme_norms(x.view()).unwrap().rows, vec![0]);
    }
}
