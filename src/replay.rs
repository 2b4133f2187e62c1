//! Replay: a recorded file through the one pipeline, then an honest evaluation.
//!
//! Loads a model and a table, aligns the table's columns to the model's features, runs
//! [`crate::pipeline::run`] with a [`FileSource`] (ring policy `Block`: nothing is lost),
//! and, on the sink thread, does what the agent does with every frame: the streaming
//! threshold ([`crate::threshold`]) and the alert state ([`crate::alert`]). It writes one
//! CSV row per frame and one JSON line per alert event, evaluates scores (point-wise) and
//! alert events (against labelled segments) if labels are given, and can draw the plot.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ndarray::{ArcArray2, Array2};

use crate::alert::{AlertEvent, AlertState, AlertStatus, Observation};
use crate::config::DarkwatchConfig;
use crate::eval::{self, FlaggedF1, Report};
use crate::hitrate::{HitRates, detected_frames, rank_rows};
use crate::ingest::{self, IngestError, SegmentBounds, Table, TableOptions};
use crate::model::{Model, ModelError};
use crate::mss::MssConfig;
use crate::pipeline::{
    self, FileSource, PipelineError, PipelineReport, ScoredFrame, ScorerHooks, Sink, SwapGate,
};
use crate::plot::{self, PlotError, PlotSpec};
use crate::retrain;
use crate::ring::FullPolicy;
use crate::score::{Head, HeadKind};
use crate::threshold::{Threshold, ThresholdSnapshot};

/// What to replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayRequest {
    pub model_dir: PathBuf,
    pub input: PathBuf,
    pub labels: Option<PathBuf>,
    /// Interpretation labels (`start-end:dim,dim,...`, SMD's format): OmniAnomaly's
    /// HitRate@100 % and @150 % of the culprit metrics ([`crate::hitrate`]), and with
    /// `labels` the same over the frames detected at the best-F1 threshold.
    pub interpretation: Option<PathBuf>,
    /// One CSV row per frame: score, threshold, alarm, the frame's own score (`frame_score`) and top contributions.
    pub out_csv: Option<PathBuf>,
    /// One JSON line per alert event (Alertmanager-shaped).
    pub events: Option<PathBuf>,
    /// A PNG of score, threshold, alert spans and labelled segments.
    pub plot: Option<PathBuf>,
    /// Draw the plot on a symmetric log axis ([`crate::plot::PlotSpec::log_scale`]).
    pub plot_log: bool,
    /// Frames per second; `None` = as fast as the scorer goes.
    pub rate: Option<f64>,
    /// Score with this head instead of the model's own (α, β from the config).
    pub head: Option<HeadKind>,
    /// Score with these mean-shift settings instead of the model's own (`rounds = 0`: off).
    pub mss: Option<MssConfig>,
    /// Average each score over this many frames instead of the model's own span (1: off).
    pub smooth_frames: Option<usize>,
    /// The input is a table, whose rows have no order (ODDS-style data): every row is
    /// scored alone (smoothing 1, over `smooth_frames`), and nothing that assumes an order
    /// is reported: no point-adjusted F1, alert episodes or events (with `events` set,
    /// [`replay`] refuses). A model with a lag window is refused.
    pub table: bool,
}

/// Alert events against labelled anomaly segments.
///
/// Episode precision and recall count episodes and segments, not frames: one episode that
/// never ends overlaps every segment after its start, so it scores recall 1 and counts as
/// one true episode however many normal frames it covers. [`EventReport::alerted_share`]
/// and [`EventReport::alerted_precision`] count the frames inside episodes, which shows
/// such an alert.
#[derive(Debug, Clone, PartialEq)]
pub struct EventReport {
    pub episodes: usize,
    pub segments: usize,
    /// Share of alert episodes that overlap a labelled segment.
    pub precision: Option<f64>,
    /// Share of labelled segments that an alert episode overlaps.
    pub recall: Option<f64>,
    /// Mean frames from a detected segment's start to the first frame of the episode that
    /// caught it, its first above-threshold frame (0 when the episode began before the
    /// segment).
    pub mean_delay_frames: Option<f64>,
    /// As [`Self::mean_delay_frames`], to the frame at which that episode's alert fired
    /// (`[alert] fire_k` of `fire_n` frames above the threshold): when an operator hears
    /// of it. 0 when it fired before the segment began.
    pub mean_delay_to_firing: Option<f64>,
    /// Frames scored (labels given), and how many of them lie inside an alert episode
    /// (from its first to its last above-threshold frame, both included).
    pub frames: usize,
    pub alerted_frames: usize,
    /// `alerted_frames / frames`: the share of the stream spent alerting.
    pub alerted_share: Option<f64>,
    /// Labelled-anomalous frames among the frames inside episodes: a frame-level
    /// precision of the alerts (not of the threshold alone: frames inside an episode that
    /// are below the threshold count too).
    pub alerted_precision: Option<f64>,
}

/// Everything a replay measured.
#[derive(Debug)]
pub struct ReplayOutcome {
    pub model: Arc<Model>,
    pub head: Head,
    pub pipeline: PipelineReport,
    /// One score per input row, in order.
    pub scores: Vec<f32>,
    /// The model version that scored each row (all 0 without online retraining).
    pub model_versions: Vec<u32>,
    /// The threshold each frame was compared with (NaN without a threshold).
    pub thresholds: Vec<f64>,
    /// Whether the streaming threshold flagged each frame (the `alarm` column of `--out`).
    pub alarms: Vec<bool>,
    pub labels: Option<Vec<u8>>,
    pub eval: Option<Report>,
    /// Point-wise precision, recall and F1 of [`Self::alarms`] (labels and a threshold
    /// given): what the threshold actually used achieved, beside the best F1 that the
    /// labels chose.
    pub alarm_f1: Option<FlaggedF1>,
    /// Alert episodes as inclusive frame ranges.
    pub alert_spans: Vec<(usize, usize)>,
    pub events: Vec<AlertEvent>,
    pub event_report: Option<EventReport>,
    /// The threshold's state at the end (None when it could not be calibrated).
    pub threshold: Option<ThresholdSnapshot>,
    /// Why there is no threshold, when there is none.
    pub threshold_note: Option<String>,
    /// What online retraining did (`[retrain] enabled`).
    pub retrain: Option<retrain::RetrainSummary>,
    /// The checkpoint [`replay`] resumed from instead of the model folder's model, when
    /// `[retrain] state_dir` held one: (its version, its folder).
    pub resumed: Option<(u64, PathBuf)>,
    /// The input was a table ([`ReplayRequest::table`]): [`Self::eval`] has no meaningful
    /// point-adjusted F1, and [`Self::event_report`] is `None`.
    pub table: bool,
    /// The labels of the rows a lag window's first frames fill and that get no score, so
    /// no evaluation (a model with `window_frames` > 1 and labels given).
    pub unscored_labels: Option<UnscoredLabels>,
    /// HitRate of the culprit metrics ([`ReplayRequest::interpretation`]).
    pub hit_rates: Option<HitRates>,
}

/// The labels of the first `w − 1` rows, which only fill a model's lag window: they are
/// not scored, so they leave the evaluation (a trial found a labelled segment there
/// dropped without a word, and recall that looked better for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnscoredLabels {
    /// Rows not scored.
    pub rows: usize,
    /// Of them, labelled anomalous.
    pub anomalous: usize,
    /// Labelled segments that lie wholly in those rows (not evaluated at all).
    pub segments: usize,
    /// Whether a segment starts there and goes on into the scored rows (evaluated from
    /// the first scored row).
    pub cut: bool,
}

impl UnscoredLabels {
    /// What the first `rows` rows of `labels` hold.
    pub fn of(labels: &[u8], rows: usize) -> UnscoredLabels {
        let rows = rows.min(labels.len());
        let head = &labels[..rows];
        let starts = head
            .iter()
            .enumerate()
            .filter(|&(i, &l)| l != 0 && (i == 0 || head[i - 1] == 0))
            .count();
        let cut = rows > 0 && head[rows - 1] != 0 && labels.get(rows).is_some_and(|&l| l != 0);
        UnscoredLabels {
            rows,
            anomalous: head.iter().filter(|&&l| l != 0).count(),
            segments: starts - usize::from(cut),
            cut,
        }
    }
}

impl std::fmt::Display for UnscoredLabels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the first {} rows only fill the model's lag window: they get no score and are not evaluated",
            self.rows
        )?;
        match (self.anomalous, self.segments, self.cut) {
            (0, ..) => write!(f, " (none of them is labelled anomalous)"),
            (a, s, cut) => {
                write!(f, "; {a} of them labelled anomalous")?;
                if s > 0 {
                    write!(
                        f,
                        ", {s} labelled segment{} wholly among them (not counted in recall)",
                        if s == 1 { "" } else { "s" }
                    )?;
                }
                if cut {
                    write!(
                        f,
                        ", and a segment that goes on past them counts from row {}",
                        self.rows
                    )?;
                }
                Ok(())
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error("{input}: {reason}")]
    Features { input: PathBuf, reason: String },
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("{path}: {source}")]
    Output {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Labels { path: PathBuf, reason: String },
    #[error(transparent)]
    Plot(#[from] PlotError),
    /// `--model` is an SAE folder: what to use instead.
    #[error("{0}")]
    SaeFolder(String),
}

/// Refuses an SAE folder as `replay --model`, saying what to use instead (it used to fail
/// with `…/model.json: No such file or directory`).
///
/// # Errors
/// [`ReplayError::SaeFolder`].
pub fn check_model_dir(dir: &Path) -> Result<(), ReplayError> {
    match crate::sae::detector::autoencoder_only(dir, "replay") {
        Some(why) => Err(ReplayError::SaeFolder(why)),
        None => Ok(()),
    }
}

/// Puts the table's columns in the model's feature order (for a windowed model, the order
/// of the frame's own block; [`crate::window::windows`] then builds the windows).
///
/// Same names in the same order: used as is. The model's names among the input's columns
/// (in any order, extra columns allowed): selected and reordered, also when the model's
/// names are the generic `f0`, `f1`, … of an NPY and a CSV header names them (a header
/// `f9,f8,…,f0` is taken by name, not position). Otherwise generic names on either side
/// are matched by position when the counts agree. Anything else is an error naming the
/// first difference.
pub fn align_features(
    model: &Model,
    table: Table,
) -> Result<(Array2<f32>, Option<Vec<f64>>), ReplayError> {
    let want = model.meta.frame_features();
    let have = &table.features;
    let err = |reason: String| ReplayError::Features {
        input: table.path.clone(),
        reason,
    };
    let generic = |names: &[String]| names.iter().enumerate().all(|(i, n)| *n == format!("f{i}"));
    let by_name = want.iter().all(|w| have.contains(w));
    // Some of the model's generated names in a named header, but not all: the names cannot
    // be followed and position would contradict them (`f2,x,f0` scored `f2` as `f0`, with
    // only a warning: AUROC 0.74 instead of 0.99). Refused, naming what is missing.
    if generic(want) && !generic(have) && !by_name && want.iter().any(|w| have.contains(w)) {
        let missing: Vec<&String> = want.iter().filter(|w| !have.contains(w)).collect();
        return Err(err(format!(
            "the model's features are unnamed ({}, trained from {}) and the input's header names some of them but not {}: name every column {} after the model's feature it holds, or put the columns in the training file's order and give them other names",
            generated_names(want.len()),
            model.meta.provenance.data_file,
            ingest::name_list(&missing, NAMES_SHOWN),
            generated_names(want.len())
        )));
    }
    // A different width is fine when the model's names are all there, except between two
    // generic lists (an NPY of 11 columns for a model of 10: there are no names to go by).
    if have.len() != want.len() && (!by_name || (generic(want) && generic(have))) {
        // With names on both sides, say which of the model's the input lacks.
        let missing: Vec<&String> = want.iter().filter(|w| !have.contains(w)).collect();
        let named = if generic(want) || generic(have) || missing.is_empty() {
            String::new()
        } else {
            format!(
                "; not in the input: {}",
                ingest::name_list(&missing, NAMES_SHOWN)
            )
        };
        return Err(err(format!(
            "{} features in the input, but the model was trained on {} ({}){named}",
            have.len(),
            want.len(),
            model.meta.provenance.data_file
        )));
    }
    if have != want && by_name && generic(want) {
        // A header that names the model's generated names is taken at its word: by
        // position, `f9,…,f0` would be scored reversed with nothing but a warning.
        tracing::info!(
            "The model's features are unnamed ({}, trained from {}): the input's columns of those names are used by name.",
            generated_names(want.len()),
            model.meta.provenance.data_file
        );
    }
    if have == want || (!by_name && have.len() == want.len() && (generic(have) || generic(want))) {
        // Unnamed on one side only: the named columns are taken by position, which is right
        // only if they come in the training file's order. Said, since a wrong order scores
        // every frame as an anomaly without any other sign.
        let (unnamed, named) = (generic(want), generic(have));
        if unnamed != named {
            if unnamed {
                tracing::warn!(
                    "The model's features are unnamed ({}, trained from {}): the input's columns {} are used in that order.",
                    generated_names(want.len()),
                    model.meta.provenance.data_file,
                    ingest::name_list(have, NAMES_SHOWN)
                );
            } else {
                tracing::warn!(
                    "The input's columns are unnamed ({}): they are used as the model's features {} in that order.",
                    generated_names(have.len()),
                    ingest::name_list(want, NAMES_SHOWN)
                );
            }
        }
        return Ok((table.values, table.timestamps));
    }
    let mut order = Vec::with_capacity(want.len());
    for name in want {
        match have.iter().position(|h| h == name) {
            Some(i) => order.push(i),
            None => {
                return Err(err(format!(
                    "the model's feature \"{name}\" is not a column of the input"
                )));
            }
        }
    }
    let values = table.values.select(ndarray::Axis(1), &order);
    Ok((values, table.timestamps))
}

/// Column names a feature-matching message lists before it says how many more there are.
const NAMES_SHOWN: usize = 6;

/// The generic names of `n` unnamed features, as the warnings write them: `f0…f9`, or
/// `f0` alone for one (not `f0…f0`).
fn generated_names(n: usize) -> String {
    match n {
        0 | 1 => "f0".to_string(),
        n => format!("f0…f{}", n - 1),
    }
}

/// Most of the cells [`fill_gaps`] fills before it refuses: a file mostly of gaps would be
/// scored (or trained) on values it does not hold.
pub const MAX_GAP_SHARE: f64 = 0.5;

/// Reads a recorded input for `replay` and `demo`: as [`ingest::read_table`], but gaps are
/// NaN instead of an error, for [`fill_gaps`]: a CSV's empty, NaN, Inf, `null` and `NA`
/// cells ([`ingest::csv::read_csv_with_gaps`]) and an NPY's NaN and ±Inf
/// ([`ingest::npy::parse_npy_with_gaps`]). The file is read once, so a pipe, a FIFO or a
/// process substitution works as a file does; a name without `.csv` or `.npy` is read
/// by its content ([`ingest::read_data_file`]).
///
/// # Errors
/// As [`ingest::read_table`], but a gap is none.
pub fn read_input(path: &Path, opts: &TableOptions) -> Result<Table, IngestError> {
    ingest::read_data_file(path)?.table_with_gaps(opts)
}

/// [`read_input`] for `train`, with the SHA-256 of the bytes read (the model's data
/// provenance): a pipe cannot be read a second time to hash it.
///
/// # Errors
/// As [`read_input`].
pub fn read_input_hashed(path: &Path, opts: &TableOptions) -> Result<(Table, String), IngestError> {
    let file = ingest::read_data_file(path)?;
    let table = file.table_with_gaps(opts)?;
    Ok((table, file.sha256()))
}

/// The gaps [`fill_gaps`] filled. `Display` is the one-line warning replay and train print.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Gaps {
    /// The file the values came from.
    pub path: PathBuf,
    /// Rows of the file (all kept).
    pub rows: usize,
    /// Columns looked at.
    pub of_columns: usize,
    /// The columns that had gaps, in column order, with how many cells were filled.
    pub columns: Vec<(String, usize)>,
    /// What a gap before a column's first value took: "the training mean", say.
    pub leading: String,
    /// Gaps took the column's last value before them; false for a table, whose rows have
    /// no order: every gap then took `leading`.
    pub carried: bool,
}

impl Gaps {
    /// Cells filled, over all columns.
    pub fn cells(&self) -> usize {
        self.columns.iter().map(|(_, n)| n).sum()
    }

    /// True when there was nothing to fill.
    pub fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }
}

impl std::fmt::Display for Gaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: Vec<String> = self
            .columns
            .iter()
            .take(8)
            .map(|(name, n)| format!("{name}: {n}"))
            .collect();
        let more = match self.columns.len().saturating_sub(8) {
            0 => String::new(),
            k => format!(", … (+{k} columns)"),
        };
        let how = if self.carried {
            format!(
                "the column's last value before a gap ({} before its first value)",
                self.leading
            )
        } else {
            format!(
                "{} (a table's rows have no order to carry a value along)",
                self.leading
            )
        };
        write!(
            f,
            "{}: {} empty, NaN or Inf {} in {} of {} columns ({}{more}) filled with {how}; all {} rows kept",
            self.path.display(),
            self.cells(),
            if self.cells() == 1 { "cell" } else { "cells" },
            self.columns.len(),
            self.of_columns,
            shown.join(", "),
            self.rows
        )
    }
}

/// Fills the gaps (NaN) in `values` as the agent's assembler fills a metric missing from
/// a window: with the column's last value before it (carried forward). A gap before a
/// column's first value takes `lead[j]` (replay: the training mean, which the scaler maps
/// to 0), or without `lead` the mean of the column's values. Without `carry` (a table,
/// whose rows have no order) every gap takes that value. No row is dropped: labels and
/// timestamps align with rows by position.
///
/// # Errors
/// The reason, when a column holds no value at all or more than [`MAX_GAP_SHARE`] of all
/// cells are gaps.
pub fn fill_gaps(
    path: &Path,
    values: &mut Array2<f32>,
    names: &[String],
    lead: Option<&[f32]>,
    carry: bool,
) -> Result<Gaps, String> {
    let (rows, d) = values.dim();
    let mut gaps = Gaps {
        path: path.to_owned(),
        rows,
        of_columns: d,
        columns: Vec::new(),
        leading: match lead {
            Some(_) => "the training mean".into(),
            None => "the column's mean".into(),
        },
        carried: carry,
    };
    let name = |j: usize| names.get(j).map_or_else(|| format!("f{j}"), Clone::clone);
    let counts: Vec<usize> = values
        .columns()
        .into_iter()
        .map(|col| col.iter().filter(|v| v.is_nan()).count())
        .collect();
    let total: usize = counts.iter().sum();
    let cells = rows * d;
    if total as f64 > MAX_GAP_SHARE * cells as f64 {
        return Err(format!(
            "{total} of {cells} cells ({:.0} %) are empty, NaN or Inf: too few values to use (gaps are filled only while they are at most {:.0} % of the cells)",
            100.0 * total as f64 / cells as f64,
            100.0 * MAX_GAP_SHARE
        ));
    }
    if let Some(j) = counts.iter().position(|&n| rows > 0 && n == rows) {
        return Err(format!(
            "column \"{}\" has no values: all {rows} rows are empty, NaN or Inf",
            name(j)
        ));
    }
    for (j, mut col) in values.columns_mut().into_iter().enumerate() {
        if counts[j] == 0 {
            continue;
        }
        let fallback = match lead {
            Some(lead) => lead.get(j).copied().unwrap_or(0.0),
            None => {
                let (sum, n) = col
                    .iter()
                    .filter(|v| !v.is_nan())
                    .fold((0.0f64, 0usize), |(s, n), &v| (s + f64::from(v), n + 1));
                (sum / n.max(1) as f64) as f32
            }
        };
        let mut last = fallback;
        for v in &mut col {
            if v.is_nan() {
                *v = last;
            } else if carry {
                last = *v;
            }
        }
        gaps.columns.push((name(j), counts[j]));
    }
    Ok(gaps)
}

/// Fills a replay's aligned rows (in the model's frame-feature order) with [`fill_gaps`],
/// a gap before a column's first value taking the training mean (scaled 0), and warns once
/// when there were any. Shared by `replay` and `demo`. `carry` false: a table, every gap
/// takes the training mean.
///
/// # Errors
/// [`ReplayError::Features`] when the input is mostly gaps or a column has no value.
pub fn fill_input_gaps(
    model: &Model,
    input: &Path,
    values: &mut Array2<f32>,
    carry: bool,
) -> Result<Gaps, ReplayError> {
    let names = model.meta.frame_features();
    let offsets = &model.meta.scaler.offset;
    // The frame's own block is the last of a lag window's blocks.
    let lead = offsets.get(offsets.len().saturating_sub(names.len())..);
    let mut gaps =
        fill_gaps(input, values, names, lead, carry).map_err(|reason| ReplayError::Features {
            input: input.to_owned(),
            reason,
        })?;
    gaps.leading = match model.meta.scaler.kind {
        crate::model::ScalerKind::ZScore => "the training mean",
        crate::model::ScalerKind::MinMax => "the training minimum",
    }
    .into();
    if !gaps.is_empty() {
        tracing::warn!("{gaps}");
    }
    Ok(gaps)
}

/// Runs a replay end to end.
///
/// # Errors
/// Unusable model or input, mismatched features or labels, a pipeline failure, or an
/// output file that cannot be written.
pub fn replay(req: &ReplayRequest, cfg: &DarkwatchConfig) -> Result<ReplayOutcome, ReplayError> {
    check_model_dir(&req.model_dir)?;
    if let (true, Some(path)) = (req.table, &req.events) {
        return Err(ReplayError::Features {
            input: path.clone(),
            reason: "a table's rows have no order, so it has no alert events to write".into(),
        });
    }
    if let Some(path) = &req.plot {
        check_plot_path(path)?;
    }
    check_output_paths(req, cfg)?;
    let model = Model::load(&req.model_dir)?.with_configured_backend(&req.model_dir, cfg)?;
    // With online retraining and a state directory, continue from the newest checkpoint.
    let loaded = (model.meta.id.clone(), model.meta.version);
    let mut model = retrain::resume(model, &cfg.retrain)?;
    let resumed = ((model.meta.id.clone(), model.meta.version) != loaded)
        .then(|| (model.meta.version, cfg.retrain.state_dir.clone()));
    if let Some(mss) = req.mss {
        if !mss.is_off() && model.bank.is_none() {
            return Err(ReplayError::Features {
                input: req.model_dir.clone(),
                reason: "this model has no mean-shift reference bank; retrain with [mss] bank_frames > 0".into(),
            });
        }
        model = model.with_mss(mss);
    }
    // A model trained as a table scores its input as one, as `--table` would; the
    // settings `--table` refuses are refused for it too.
    let as_table = req.table || model.meta.table;
    if model.meta.table && !req.table {
        let refused = match (&req.events, req.smooth_frames) {
            (Some(_), _) => Some("--events"),
            (None, Some(_)) => Some("--smooth-frames"),
            (None, None) => None,
        };
        if let Some(option) = refused {
            return Err(ReplayError::Features {
                input: req.model_dir.clone(),
                reason: format!(
                    "the model was trained as a table (train --table), whose rows have no order, so {option} does not apply; train without --table to score frames in order"
                ),
            });
        }
        tracing::warn!(
            "The model was trained as a table (train --table): the input is scored as a table, as with --table (rows alone, no point-adjusted F1, alert episodes or events)."
        );
    }
    if let Some(frames) = req.smooth_frames {
        model = model.with_smoothing(frames);
    }
    if as_table {
        let w = model.meta.window_frames;
        if w > 1 {
            return Err(ReplayError::Features {
                input: req.model_dir.clone(),
                reason: format!(
                    "the model reads a lag window of {w} frames ([model] window_frames), which needs rows in order; a table's rows have none"
                ),
            });
        }
        // A row's mean with the rows before it would mix unrelated rows.
        model = model.with_smoothing(1);
    } else if model.meta.smooth_frames > 1
        && req
            .input
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("npz"))
    {
        // ODDS and ADBench tables come as .npz, and `harness` takes every .npz for one: a
        // replay that averages their rows' scores can report a ranking a table does not have.
        tracing::warn!(
            "{}: an .npz is scored as a stream, its rows in order, each score the mean of {} rows ([score] smooth_frames): if its rows have no order (an ODDS / ADBench table, which `harness` scores as one), pass --table, or train with --table; where a table stores its outliers together, that mean raises AUROC and AUPRC for no merit of the model",
            req.input.display(),
            model.meta.smooth_frames
        );
    }
    let model = Arc::new(model);
    let opts = TableOptions {
        timestamp_column: Some(cfg.input.timestamp_column.clone()).filter(|s| !s.is_empty()),
        // Columns the model does not use are skipped unread (a host name, say).
        features: Some(model.meta.frame_features().to_vec()),
    };
    let table = read_input(&req.input, &opts)?;
    let rows = table.values.nrows();
    let labels = match &req.labels {
        Some(path) => Some(ingest::read_labels(path, Some(rows))?),
        None => None,
    };
    // Read (and checked against the model and the input) before the replay runs.
    let segments = match &req.interpretation {
        Some(path) => Some(ingest::read_interpretation_labels_within(
            path,
            SegmentBounds {
                features: model.meta.frame_features().len(),
                rows,
            },
        )?),
        None => None,
    };
    let (mut values, timestamps) = align_features(&model, table)?;
    fill_input_gaps(&model, &req.input, &mut values, !as_table)?;
    let w = model.meta.window_frames;
    if w > rows {
        return Err(ReplayError::Features {
            input: req.input.clone(),
            reason: format!(
                "{rows} rows, fewer than the model's lag window of {w} frames ([model] window_frames)"
            ),
        });
    }
    // `--head` naming the model's own kind keeps the model's parameters (and so its
    // threshold); another kind takes its parameters from the config.
    let head = match req.head {
        Some(kind) if kind != model.meta.head.kind => Head {
            kind,
            ..cfg.score.head()
        },
        _ => model.meta.head,
    };
    let unscored_labels = labels
        .as_deref()
        .filter(|_| w > 1)
        .map(|l| UnscoredLabels::of(l, w - 1));
    // Each frame inside an interpretation segment ranked by its contributions now, while
    // the rows are at hand (the replay takes them), as the harness ranks them: rows before
    // the first scored one are not ranked. Which were detected is known after the replay.
    let ranking = segments
        .as_deref()
        .map(|s| rank_rows(&model, head, values.view(), s))
        .transpose()
        .map_err(PipelineError::from)?;
    let frames = Frames::windowed(&model, values, timestamps, labels);
    let first_frame = frames.first_row();
    let outputs = Outputs {
        csv: req.out_csv.as_deref(),
        events: req.events.as_deref(),
    };
    let mut outcome =
        replay_frames(model, head, frames, outputs, req.rate, cfg).map_err(|e| match e {
            ReplayError::Labels { reason, .. } => ReplayError::Labels {
                path: req.labels.clone().unwrap_or_default(),
                reason,
            },
            e => e,
        })?;
    outcome.resumed = resumed;
    outcome.unscored_labels = unscored_labels;
    if let Some(ranking) = &ranking {
        // The frames found at the point-wise best-F1 threshold, for the second protocol.
        let detected = outcome
            .eval
            .as_ref()
            .and_then(|e| e.best_f1.as_ref())
            .zip(outcome.labels.as_deref())
            .map(|(b, l)| detected_frames(&outcome.scores, l, b.threshold));
        outcome.hit_rates = Some(ranking.rates(detected.as_deref()));
    }
    if as_table {
        // Episodes of consecutive rows (and so their precision, recall and frames) mean
        // nothing where the rows have no order.
        outcome.table = true;
        outcome.event_report = None;
        outcome.alert_spans.clear();
        outcome.events.clear();
    }
    if let Some(path) = &req.plot {
        let label_spans = outcome
            .labels
            .as_deref()
            .map(plot::flag_spans)
            .unwrap_or_default();
        let title = format!(
            "{} - model {} ({})",
            req.input
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            outcome.model.meta.id,
            outcome.head.kind.name()
        );
        let spec = PlotSpec {
            thresholds: outcome
                .threshold
                .as_ref()
                .map(|_| outcome.thresholds.as_slice()),
            alert_spans: &outcome.alert_spans,
            label_spans: &label_spans,
            first_frame,
            log_scale: req.plot_log,
            ..PlotSpec::new(title, &outcome.scores)
        };
        plot::score_plot(path, &spec)?;
    }
    Ok(outcome)
}

/// Refuses a plot path that cannot be written, before any work is done.
fn check_plot_path(path: &Path) -> Result<(), ReplayError> {
    let bad = |reason: &str| ReplayError::Output {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, reason.to_string()),
    };
    let png = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !png {
        return Err(bad("the plot is a PNG: name the file *.png"));
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(bad("the folder for the plot does not exist"));
    }
    Ok(())
}

/// Refuses, before any work, an output file that is one of the inputs, another output, one
/// of the model's own files (`model.json`, weights, an ONNX graph) or inside the retraining
/// state folder: each would be truncated (replay `--out same.csv` of `--input same.csv`
/// destroyed the recording). Outputs that exist but are not regular files (`/dev/null`)
/// are left alone.
fn check_output_paths(req: &ReplayRequest, cfg: &DarkwatchConfig) -> Result<(), ReplayError> {
    use crate::outputs::Protected;
    let outputs = [
        ("--out", req.out_csv.as_deref()),
        ("--events", req.events.as_deref()),
        ("--plot", req.plot.as_deref()),
    ];
    let mut protected = vec![Protected::File("--input", &req.input)];
    if let Some(labels) = &req.labels {
        protected.push(Protected::File("--labels", labels));
    }
    if let Some(interpretation) = &req.interpretation {
        protected.push(Protected::File("--interpretation", interpretation));
    }
    protected.push(Protected::OwnFiles {
        what: "a file of the model folder",
        dir: &req.model_dir,
        is_own: |n| {
            n == crate::model::io::META_FILE || n.ends_with(".safetensors") || n.ends_with(".onnx")
        },
    });
    if cfg.retrain.enabled && !cfg.retrain.state_dir.as_os_str().is_empty() {
        protected.push(Protected::Folder {
            what: "a file in the retraining state folder ([retrain] state_dir)",
            dir: &cfg.retrain.state_dir,
        });
    }
    crate::outputs::check(&outputs, &protected).map_err(|c| ReplayError::Output {
        path: c.path,
        source: c.source,
    })
}

/// Frames to replay: rows aligned to the model's frame features, one timestamp per row,
/// and labels for the rows that are scored.
#[derive(Debug, Clone)]
pub struct Frames {
    /// Shared: a clone of `Frames` (the harness replays one entity three ways) shares the
    /// rows instead of copying them.
    pub values: ArcArray2<f32>,
    pub timestamps: Option<Vec<f64>>,
    pub labels: Option<Vec<u8>>,
    /// Rows per lag window (1: none). The source builds the windows as it goes; row `i`
    /// from `w − 1` on is scored with the `w − 1` rows before it as frame `i` (the first
    /// `w − 1` rows only fill the first window, as in the agent: a padded window would
    /// look unusual), so `labels` holds the labels of rows `w − 1` on.
    pub window_frames: usize,
}

impl Frames {
    /// Frames for `model` from aligned input rows, with the labels of the rows it scores.
    pub fn windowed(
        model: &Model,
        values: Array2<f32>,
        timestamps: Option<Vec<f64>>,
        labels: Option<Vec<u8>>,
    ) -> Frames {
        let w = model.meta.window_frames.max(1);
        let skip = (w - 1).min(values.nrows());
        Frames {
            values: values.into_shared(),
            timestamps,
            labels: labels.map(|l| l[skip..].to_vec()),
            window_frames: w,
        }
    }

    /// The first row that is scored (the CSV's first `frame`): `w − 1`, or 0 without a
    /// window.
    pub fn first_row(&self) -> usize {
        self.window_frames
            .saturating_sub(1)
            .min(self.values.nrows())
    }
}

/// Optional output files of a replay.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outputs<'a> {
    pub csv: Option<&'a Path>,
    pub events: Option<&'a Path>,
}

/// Replays in-memory frames through the pipeline, thresholds and alerts (what [`replay`]
/// does after loading files; the evaluation harness calls it directly).
///
/// # Errors
/// A pipeline failure, an output file that cannot be written, or labels that do not fit.
pub fn replay_frames(
    model: Arc<Model>,
    head: Head,
    frames: Frames,
    outputs: Outputs<'_>,
    rate: Option<f64>,
    cfg: &DarkwatchConfig,
) -> Result<ReplayOutcome, ReplayError> {
    let first_row = frames.first_row();
    let Frames {
        values,
        timestamps,
        labels,
        window_frames,
    } = frames;
    let rows = values.nrows() - first_row.min(values.nrows());
    // The threshold calibrates on the model's own training scores, which were computed
    // with the model's head and MSS settings. Scored any other way, those scores do not
    // describe normal frames, so the replay then reports scores without a threshold.
    let same_scoring = head.scores_like(&model.meta.head);
    let (threshold, threshold_note) = if model.calibration_scores.is_empty() {
        (
            None,
            Some(
                "no threshold: the model has no held-out scores for these scoring settings"
                    .to_string(),
            ),
        )
    } else if !same_scoring {
        (
            None,
            Some(format!(
                "no threshold: the stored held-out scores are {} scores, not {}",
                model.meta.head.describe(),
                head.describe()
            )),
        )
    } else {
        match cfg.threshold.build(&model.threshold_scores()) {
            Ok(t) => (Some(t), None),
            Err(e) => (None, Some(format!("no threshold: {e}"))),
        }
    };
    let features: Arc<[String]> = model.meta.features.clone().into();
    let model_version = model.meta.version.to_string();
    let alert_cfg = cfg.alert.for_node(&cfg.mqtt.node());
    let alerts = AlertState::new(
        &alert_cfg,
        "replay",
        &model.meta.id,
        &model_version,
        features.clone(),
    );
    let mut sink = ReplaySink::new(rows, features, outputs, threshold, alerts)?;
    sink.first_row = first_row;
    let mut source = FileSource::new(values, timestamps, rate).windowed(window_frames);
    // With retraining paused on, few frames are in flight when a retrain starts, and the
    // new model takes over a fixed number of frames after the one that asked for it
    // (past every frame the scorer can have scored by then), so a replay with retraining
    // gives the same scores however its threads are scheduled.
    let mut pipeline_cfg = cfg.pipeline.clone();
    let retraining = cfg.retrain.enabled && same_scoring && sink.threshold.is_some();
    let gated = retraining && cfg.retrain.replay_pause;
    if gated {
        // Small batches keep the swap lag (and so the time a new model waits) short.
        pipeline_cfg.batch_max_frames = pipeline_cfg.batch_max_frames.min(64);
        pipeline_cfg.ring_capacity_frames = pipeline_cfg.batch_max_frames;
    }
    let swap_lag =
        (pipeline_cfg.ring_capacity_frames + 2 * pipeline_cfg.batch_max_frames + 2) as u64;
    // Online retraining: the trainer thread, the scorer's hooks and the sink's side.
    let mut hooks = None;
    let mut trainer = None;
    if retraining {
        let shared = retrain::Shared::new(model.clone(), &cfg.retrain, cfg.train.seed);
        let (requests, handle) =
            retrain::Trainer::new(cfg, shared.clone())
                .spawn()
                .map_err(|source| PipelineError::Spawn {
                    name: "trainer",
                    source,
                })?;
        let (values_p, values_c) = pipeline::values_ring(&pipeline_cfg, model.n_features());
        hooks = Some(ScorerHooks {
            cell: shared.cell.clone(),
            values: values_p,
            gate: gated.then(|| SwapGate {
                at: shared.swap_at.clone(),
                busy: shared.busy.clone(),
            }),
        });
        if cfg.retrain.replay_pause {
            source = source.paused_by(shared.busy.clone());
        }
        sink.retrain = Some(retrain::SinkSide::new(
            &cfg.retrain,
            shared.clone(),
            values_c,
            requests,
            gated.then_some(swap_lag),
        ));
        sink.threshold_cfg = Some(cfg.threshold.clone());
        trainer = Some((shared, handle));
    }
    let (report, mut sink) = pipeline::run_hooked(
        model.clone(),
        head,
        cfg.score.top_contributions,
        &pipeline_cfg,
        FullPolicy::Block,
        source,
        sink,
        hooks,
    )?;
    // Closing the request channel ends the trainer once it is done with its last retrain.
    sink.retrain = None;
    let retrain = match trainer {
        Some((shared, handle)) => {
            handle
                .join()
                .map_err(|_| PipelineError::Panicked("trainer"))?;
            Some(shared.summary())
        }
        None => None,
    };
    if let Some((path, e)) = sink.error {
        return Err(ReplayError::Output { path, source: e });
    }
    let scores = sink.scores;
    let eval = match labels.as_ref().map(|l| eval::evaluate(&scores, l)) {
        Some(Ok(r)) => Some(r),
        Some(Err(e)) => {
            return Err(ReplayError::Labels {
                path: PathBuf::new(),
                reason: e.to_string(),
            });
        }
        None => None,
    };
    let row = |seq: u64| (seq as usize).saturating_sub(first_row);
    let resolved = || {
        sink.events
            .iter()
            .filter(|e| e.status == AlertStatus::Resolved)
    };
    let alert_spans: Vec<(usize, usize)> = resolved()
        .map(|e| (row(e.start_seq), row(e.end_seq.unwrap_or(e.seq))))
        .collect();
    // The frame each episode fired at: its firing event's (same first frame).
    let fired: Vec<usize> = resolved()
        .map(|r| {
            sink.events
                .iter()
                .find(|e| e.status == AlertStatus::Firing && e.start_seq == r.start_seq)
                .map_or(row(r.start_seq), |e| row(e.seq))
        })
        .collect();
    let event_report = labels
        .as_deref()
        .filter(|_| sink.threshold.is_some())
        .map(|l| event_report(&alert_spans, &fired, l));
    // The labels were checked by `evaluate` above.
    let alarm_f1 = labels
        .as_deref()
        .filter(|_| sink.threshold.is_some())
        .and_then(|l| eval::flagged_f1(&sink.alarms, l).ok());
    Ok(ReplayOutcome {
        model,
        head,
        pipeline: report,
        scores,
        model_versions: sink.model_versions,
        thresholds: sink.thresholds,
        alarms: sink.alarms,
        labels,
        eval,
        alarm_f1,
        alert_spans,
        events: sink.events,
        event_report,
        threshold: sink.threshold.as_ref().map(Threshold::snapshot),
        threshold_note,
        retrain,
        resumed: None,
        table: false,
        unscored_labels: None,
        hit_rates: None,
    })
}

/// Matches alert episodes (inclusive frame ranges) with the labelled segments of `labels`
/// (one 0/1 per frame), and counts the frames inside episodes. `fired` holds the frame at
/// which each episode's alert fired (as many as `episodes`; the episode's first frame
/// where it is missing).
pub fn event_report(episodes: &[(usize, usize)], fired: &[usize], labels: &[u8]) -> EventReport {
    let segments = &plot::flag_spans(labels)[..];
    let overlaps = |a: (usize, usize), b: (usize, usize)| a.0 <= b.1 && b.0 <= a.1;
    let true_episodes = episodes
        .iter()
        .filter(|&&e| segments.iter().any(|&s| overlaps(e, s)))
        .count();
    let (mut delays, mut to_firing) = (Vec::new(), Vec::new());
    for &s in segments {
        if let Some((i, first)) = episodes
            .iter()
            .enumerate()
            .filter(|&(_, &e)| overlaps(e, s))
            .min_by_key(|&(_, e)| e.0)
        {
            delays.push(first.0.saturating_sub(s.0) as f64);
            let fired = fired.get(i).copied().unwrap_or(first.0);
            to_firing.push(fired.saturating_sub(s.0) as f64);
        }
    }
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    // Frames inside an episode, each counted once (episodes do not overlap, but a frame
    // range past the labels is clipped rather than trusted).
    let mut inside = vec![false; labels.len()];
    for &(start, end) in episodes {
        if start < labels.len() {
            inside[start..=end.min(labels.len() - 1)].fill(true);
        }
    }
    let alerted_frames = inside.iter().filter(|&&i| i).count();
    let alerted_anomalous = inside
        .iter()
        .zip(labels)
        .filter(|&(&i, &l)| i && l != 0)
        .count();
    let ratio = |a: usize, b: usize| (b > 0).then(|| a as f64 / b as f64);
    EventReport {
        episodes: episodes.len(),
        segments: segments.len(),
        precision: ratio(true_episodes, episodes.len()),
        recall: ratio(delays.len(), segments.len()),
        mean_delay_frames: mean(&delays),
        mean_delay_to_firing: mean(&to_firing),
        frames: labels.len(),
        alerted_frames,
        alerted_share: ratio(alerted_frames, labels.len()),
        alerted_precision: ratio(alerted_anomalous, alerted_frames),
    }
}

/// The replay's sink: threshold, alert state, per-frame record, CSV and event files.
/// Per frame it only writes into preallocated vectors and buffered files; an alert
/// event (rare) allocates its JSON.
struct ReplaySink {
    scores: Vec<f32>,
    model_versions: Vec<u32>,
    thresholds: Vec<f64>,
    alarms: Vec<bool>,
    threshold: Option<Threshold>,
    alerts: AlertState,
    events: Vec<AlertEvent>,
    csv: Option<(PathBuf, BufWriter<File>)>,
    events_out: Option<(PathBuf, BufWriter<File>)>,
    features: Arc<[String]>,
    header_done: bool,
    error: Option<(PathBuf, std::io::Error)>,
    /// Online retraining's side of the sink, when it is on.
    retrain: Option<retrain::SinkSide>,
    /// How thresholds are rebuilt for a retrained model.
    threshold_cfg: Option<crate::threshold::ThresholdConfig>,
    /// Subtracted from a frame's seq to index the per-frame arrays (see [`Frames::first_row`]).
    first_row: usize,
}

fn create(path: &Path) -> Result<(PathBuf, BufWriter<File>), ReplayError> {
    let file = File::create(path).map_err(|source| ReplayError::Output {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((path.to_path_buf(), BufWriter::with_capacity(1 << 16, file)))
}

impl ReplaySink {
    fn new(
        rows: usize,
        features: Arc<[String]>,
        out: Outputs<'_>,
        threshold: Option<Threshold>,
        alerts: AlertState,
    ) -> Result<Self, ReplayError> {
        Ok(ReplaySink {
            scores: vec![f32::NAN; rows],
            model_versions: vec![0; rows],
            thresholds: vec![f64::NAN; rows],
            alarms: vec![false; rows],
            threshold,
            alerts,
            events: Vec::new(),
            csv: out.csv.map(create).transpose()?,
            events_out: out.events.map(create).transpose()?,
            features,
            header_done: false,
            error: None,
            retrain: None,
            threshold_cfg: None,
            first_row: 0,
        })
    }

    fn record_event(&mut self, event: AlertEvent) {
        if let Some((path, w)) = self.events_out.as_mut() {
            let line = serde_json::to_string(&event).unwrap_or_default();
            if let Err(e) = writeln!(w, "{line}") {
                self.error.get_or_insert((path.clone(), e));
            }
        }
        self.events.push(event);
    }

    fn write_row(&mut self, f: &ScoredFrame, threshold: f64, alarm: bool) {
        let Some((path, w)) = self.csv.as_mut() else {
            return;
        };
        let mut r = Ok(());
        if !self.header_done {
            self.header_done = true;
            r = write!(w, "frame,timestamp,score,threshold,alarm,frame_score");
            for k in 1..=f.n_top {
                r = r.and_then(|()| write!(w, ",top{k}_feature,top{k}_contribution"));
            }
            r = r.and_then(|()| writeln!(w));
        }
        r = r.and_then(|()| write!(w, "{},", f.meta.seq));
        if f.meta.timestamp.is_finite() {
            r = r.and_then(|()| write!(w, "{}", f.meta.timestamp));
        }
        r = r.and_then(|()| write!(w, ",{},", f.score));
        if threshold.is_finite() {
            r = r.and_then(|()| write!(w, "{threshold}"));
        }
        r = r.and_then(|()| write!(w, ",{},{}", u8::from(alarm), f.frame_score));
        for c in f.top() {
            let name = self
                .features
                .get(c.feature as usize)
                .map_or("?", String::as_str);
            r = r.and_then(|()| write!(w, ",{name},{}", c.value));
        }
        if let Err(e) = r.and_then(|()| writeln!(w)) {
            self.error = Some((path.clone(), e));
        }
    }
}

impl Sink for ReplaySink {
    fn accept(&mut self, f: &ScoredFrame) {
        // The first frame of a retrained model: its threshold comes from that model's own
        // held-out scores, so no frame is judged against another model's threshold.
        if let Some(model) = self.retrain.as_mut().and_then(|r| r.before(f)) {
            if let Some(t) = self
                .threshold_cfg
                .as_ref()
                .and_then(|c| c.build(&model.threshold_scores()).ok())
            {
                self.threshold = Some(t);
            }
            self.alerts
                .set_model(&model.meta.id, &model.meta.version.to_string());
        }
        let i = (f.meta.seq as usize).saturating_sub(self.first_row);
        if let Some(slot) = self.scores.get_mut(i) {
            *slot = f.score;
        }
        if let Some(slot) = self.model_versions.get_mut(i) {
            *slot = u32::try_from(f.model_version).unwrap_or(u32::MAX);
        }
        let (threshold, alarm) = match self.threshold.as_mut() {
            Some(t) => {
                let now = t.threshold();
                (now, t.update(f64::from(f.score)).is_alarm())
            }
            None => (f64::NAN, false),
        };
        if let Some(slot) = self.thresholds.get_mut(i) {
            *slot = threshold;
        }
        if let Some(slot) = self.alarms.get_mut(i) {
            *slot = alarm;
        }
        if self.threshold.is_some()
            && let Some(event) = self.alerts.observe(&Observation::from_scored(f, threshold))
        {
            self.record_event(event);
        }
        if self.error.is_none() {
            self.write_row(f, threshold, alarm);
        }
        if let Some(r) = self.retrain.as_mut() {
            r.after(f, alarm || self.alerts.in_alert());
        }
    }

    fn finish(&mut self) -> Result<(), std::io::Error> {
        if let Some(event) = self.alerts.finish() {
            self.record_event(event);
        }
        for (path, w) in [self.csv.as_mut(), self.events_out.as_mut()]
            .into_iter()
            .flatten()
        {
            if let Err(e) = w.flush() {
                self.error.get_or_insert((path.clone(), e));
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for ReplayOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = &self.pipeline;
        writeln!(
            f,
            "model {} ({} head, {}{}, {}, {}), {} frames scored in {} batches, {:.2} s",
            self.model.meta.id,
            self.head.kind.name(),
            self.model.backend_label(),
            match self.model.ae.members {
                1 => String::new(),
                k => format!(", ensemble of {k}"),
            },
            match self.model.active_bank() {
                Some(b) => format!("MSS m={} k={}", b.rounds(), b.neighbours()),
                None => "no MSS".into(),
            },
            match (self.table, self.model.meta.smooth_frames) {
                (true, _) if self.model.meta.table => {
                    "a table (the model was trained as one): rows scored alone, in no order"
                        .to_string()
                }
                (true, _) => "a table: rows scored alone, in no order".to_string(),
                (false, 1) => "frames scored alone".to_string(),
                (false, n) if self.threshold.is_some() => {
                    format!("scores averaged over {n} frames, threshold from per-frame scores")
                }
                (false, n) => format!("scores averaged over {n} frames"),
            },
            p.frames_scored,
            p.batches,
            p.elapsed.as_secs_f64()
        )?;
        if let Some((version, dir)) = &self.resumed {
            writeln!(
                f,
                "resumed: version {version} from the retraining state folder {} ([retrain] state_dir), not the model folder's model; point state_dir at an empty folder to start from the model folder",
                dir.display()
            )?;
        }
        if p.frames_dropped + p.frames_invalid > 0 {
            writeln!(
                f,
                "dropped {} frames, skipped {} invalid frames",
                p.frames_dropped, p.frames_invalid
            )?;
        }
        // What the threshold in use flagged, under the best F1 the labels picked.
        let alarms = self
            .alarm_f1
            .as_ref()
            .zip(self.threshold.as_ref())
            .map(|(a, t)| {
                (
                    format!(
                        "the streaming alarms ({} threshold, the `alarm` column of --out)",
                        t.kind.name()
                    ),
                    a,
                )
            });
        match (&self.eval, &alarms) {
            (Some(r), Some((name, a))) => writeln!(f, "{}", r.with_alarms(name, a, !self.table))?,
            (Some(r), None) if self.table => writeln!(f, "{}", r.pointwise())?,
            (Some(r), None) => writeln!(f, "{r}")?,
            (None, _) => writeln!(f, "no labels given: no detection metrics")?,
        }
        if let Some(u) = &self.unscored_labels {
            writeln!(f, "labels      {u}")?;
        }
        if let Some(h) = &self.hit_rates {
            self.fmt_hit_rates(f, h)?;
        }
        match (&self.threshold, &self.threshold_note) {
            (Some(t), _) => {
                let alarms = self
                    .scores
                    .iter()
                    .zip(&self.thresholds)
                    .filter(|(s, t)| f64::from(**s) > **t)
                    .count();
                let episodes = if self.table {
                    String::new()
                } else {
                    let n = self.alert_spans.len();
                    format!(", {n} alert episode{}", if n == 1 { "" } else { "s" })
                };
                writeln!(
                    f,
                    "threshold   {} (final {:.4}): {alarms} frames above ({:.2} %){episodes}",
                    t.kind.name(),
                    t.threshold,
                    100.0 * alarms as f64 / self.scores.len().max(1) as f64,
                )?;
            }
            (None, Some(note)) => writeln!(f, "threshold   {note}")?,
            (None, None) => {}
        }
        if let Some(r) = &self.retrain {
            write!(f, "{r}")?;
        }
        if let Some(e) = &self.event_report {
            let pct = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.1} %", 100.0 * v));
            writeln!(
                f,
                "events      precision {} ({} episode{}), recall {} ({} labelled segment{}), mean delay {}",
                pct(e.precision),
                e.episodes,
                if e.episodes == 1 { "" } else { "s" },
                pct(e.recall),
                e.segments,
                if e.segments == 1 { "" } else { "s" },
                match (e.mean_delay_frames, e.mean_delay_to_firing) {
                    (Some(d), Some(f)) => format!(
                        "{d:.1} frames to the first frame above the threshold, {f:.1} to the alert firing"
                    ),
                    _ => "-".into(),
                }
            )?;
            writeln!(
                f,
                "alerted     {} of the frames inside alert episodes ({} of {}), {} of them labelled anomalous (frame precision of the alerts)",
                pct(e.alerted_share),
                e.alerted_frames,
                e.frames,
                pct(e.alerted_precision),
            )?;
            // Episode precision and recall count episodes and segments: an alert that stays
            // on through most of the stream scores well on both.
            if e.alerted_share.is_some_and(|s| s > 0.5) {
                writeln!(
                    f,
                    "            note: alert episodes cover most of the frames, so the episode precision and recall above say little (an alert that stays on overlaps every segment)"
                )?;
            }
        }
        writeln!(
            f,
            "throughput  {:.0} frames/s (end to end, one scorer thread)",
            p.frames_per_second()
        )?;
        writeln!(
            f,
            "latency     ring entry to score: p50 {:.1} µs, p99 {:.1} µs{}",
            p.latency.quantile_ns(0.5) / 1e3,
            p.latency.quantile_ns(0.99) / 1e3,
            if self.pipeline_paced() {
                ""
            } else {
                " (unpaced replay: includes queueing behind the file)"
            }
        )?;
        writeln!(
            f,
            "compute     per frame within its batch: p50 {:.2} µs, p99 {:.2} µs, mean batch {:.1} frames",
            p.compute.quantile_ns(0.5) / 1e3,
            p.compute.quantile_ns(0.99) / 1e3,
            p.frames_scored as f64 / p.batches.max(1) as f64
        )
    }
}

impl ReplayOutcome {
    /// The `hit rate` lines: the headline HitRate, then the detected-frames protocol.
    fn fmt_hit_rates(&self, f: &mut std::fmt::Formatter<'_>, h: &HitRates) -> std::fmt::Result {
        let rates = |r: Option<(f64, f64)>, tag: &str| {
            r.map_or_else(
                || format!("HR@100{tag} -, HR@150{tag} -"),
                |(a, b)| format!("HR@100{tag} {a:.3}, HR@150{tag} {b:.3}"),
            )
        };
        writeln!(
            f,
            "hit rate    {} over {} frame{} in {} interpretation segment{} (OmniAnomaly's HitRate: culprit metrics among each frame's top floor(P·|culprits|) contributions)",
            rates(h.all, ""),
            h.frames,
            if h.frames == 1 { "" } else { "s" },
            h.segments,
            if h.segments == 1 { "" } else { "s" },
        )?;
        let best = self.eval.as_ref().and_then(|e| e.best_f1.as_ref());
        match (&self.labels, best) {
            (None, _) => writeln!(
                f,
                "            HR@100 (detected), HR@150 (detected): need --labels (the frames detected at the best-F1 threshold)"
            )?,
            (Some(_), None) => writeln!(
                f,
                "            HR@100 (detected), HR@150 (detected): no best-F1 threshold (the labels hold one class)"
            )?,
            (Some(_), Some(b)) => writeln!(
                f,
                "            {} over the {} of them labelled anomalous and scored at or above the best-F1 threshold {} (InterFusion's choice of frames, a second protocol; each frame still ranked alone)",
                rates(h.detected, " (detected)"),
                h.detected_frames,
                b.threshold
            )?,
        }
        if let Some((a, b)) = h.chance {
            let det = h.chance_detected.map_or_else(String::new, |(c, d)| {
                format!("; on the detected frames HR@100 {c:.3}, HR@150 {d:.3}")
            });
            writeln!(
                f,
                "            by chance HR@100 {a:.3}, HR@150 {b:.3}{det} (a random order of the features on the same frames: the floor to read the above against)"
            )?;
        }
        if h.unscored_frames > 0 {
            writeln!(
                f,
                "            {} frames of interpretation segments lie in the rows that only fill the model's lag window: not scored, not ranked",
                h.unscored_frames
            )?;
        }
        if self.model_versions.windows(2).any(|v| v[0] != v[1]) {
            writeln!(
                f,
                "            note: contributions are the model's the replay started with; online retraining scored later frames with newer models"
            )?;
        }
        Ok(())
    }

    fn pipeline_paced(&self) -> bool {
        // Batches near one frame each mean the scorer kept up: latency is not queueing.
        self.pipeline.frames_scored as f64 / (self.pipeline.batches.max(1) as f64) < 1.5
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 0/1 labels of `n` frames, 1 inside the inclusive `segments`.
    fn labels(n: usize, segments: &[(usize, usize)]) -> Vec<u8> {
        let mut l = vec![0u8; n];
        for &(a, b) in segments {
            l[a..=b].fill(1);
        }
        l
    }

    /// A model trained on an NPY (features f0, f1, f2) and a CSV whose header names them in
    /// another order: matched by name, not by position (a trial's `f9,…,f0` was scored
    /// reversed, AUROC 0.585 instead of 0.991). Extra columns are left out; two generic
    /// lists of different widths, and named columns that are not the generated names,
    /// keep the old rules.
    #[test]
    fn generated_feature_names_in_a_header_are_matched_by_name() {
        let (n, d) = (200, 3);
        let values = Array2::from_shape_fn((n, d), |(i, j)| {
            ((i * 7 + j * 13) % 17) as f32 + 100.0 * j as f32
        });
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let table = |features: Vec<String>, values: Array2<f32>| Table {
            path: "t.csv".into(),
            features,
            timestamps: None,
            values,
        };
        let mut cfg = DarkwatchConfig::default();
        cfg.train.epochs_max = 2;
        cfg.model.members = 1;
        cfg.model.window_frames = 1;
        let train = table(names(&["f0", "f1", "f2"]), values.clone());
        let (model, _) = crate::model::fit::fit(&train, "", &cfg, &mut |_| {}).unwrap();
        // Reversed header, reversed columns: back in the model's order.
        let reversed = values.select(ndarray::Axis(1), &[2, 1, 0]);
        let (got, _) = align_features(&model, table(names(&["f2", "f1", "f0"]), reversed)).unwrap();
        assert_eq!(got, values);
        // A permutation with an extra column.
        let extra = ndarray::concatenate(
            ndarray::Axis(1),
            &[
                values.select(ndarray::Axis(1), &[1]).view(),
                Array2::<f32>::zeros((n, 1)).view(),
                values.select(ndarray::Axis(1), &[2, 0]).view(),
            ],
        )
        .unwrap();
        let (got, _) =
            align_features(&model, table(names(&["f1", "x", "f2", "f0"]), extra)).unwrap();
        assert_eq!(got, values);
        // Other names: still by position (with the warning).
        let (got, _) =
            align_features(&model, table(names(&["a", "b", "c"]), values.clone())).unwrap();
        assert_eq!(got, values);
        // Some of the generated names, not all (a review: `f2,x,f0` scored `f2` as `f0`).
        for header in [["f2", "x", "f0"], ["f0", "x", "y"]] {
            let e = align_features(&model, table(names(&header), values.clone()))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("names some of them but not \"f1\"")
                    && e.contains("name every column f0…f2"),
                "{e}"
            );
        }
        // An NPY of four columns for a model of three: no names to choose by.
        let wide = Array2::<f32>::zeros((n, 4));
        let e = align_features(&model, table(names(&["f0", "f1", "f2", "f3"]), wide))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("4 features in the input, but the model was trained on 3"),
            "{e}"
        );
        assert_eq!(generated_names(1), "f0");
        assert_eq!(generated_names(10), "f0…f9");
    }

    /// Gaps are carried forward as the assembler carries a missing metric, counted per
    /// column; no row is dropped.
    #[test]
    fn fill_gaps_carries_the_last_value_forward_and_counts_per_column() {
        let nan = f32::NAN;
        let names = vec!["a".to_string(), "b".into(), "c".into()];
        let mut v = ndarray::array![
            [nan, 1.0, 7.0],
            [2.0, nan, 7.0],
            [nan, nan, 7.0],
            [4.0, 5.0, 7.0]
        ];
        let gaps = fill_gaps(
            Path::new("x.csv"),
            &mut v,
            &names,
            Some(&[10.0, 20.0, 30.0]),
            true,
        )
        .unwrap();
        assert_eq!(
            v,
            ndarray::array![
                [10.0, 1.0, 7.0],
                [2.0, 1.0, 7.0],
                [2.0, 1.0, 7.0],
                [4.0, 5.0, 7.0]
            ]
        );
        assert_eq!(gaps.columns, [("a".to_string(), 2), ("b".to_string(), 2)]);
        assert_eq!((gaps.cells(), gaps.rows, gaps.of_columns), (4, 4, 3));
        let text = gaps.to_string();
        assert!(
            text.starts_with("x.csv: 4 empty, NaN or Inf cells in 2 of 3 columns (a: 2, b: 2)")
                && text.contains("all 4 rows kept"),
            "{text}"
        );
        // Without a lead, a leading gap takes the mean of the column's values: (2 + 4) / 2.
        let mut v = ndarray::array![[nan], [2.0], [4.0]];
        fill_gaps(Path::new("x.csv"), &mut v, &names[..1], None, true).unwrap();
        assert_eq!(v, ndarray::array![[3.0], [2.0], [4.0]]);
        // A table's rows have no order: every gap takes the lead, none is carried.
        let mut v = ndarray::array![[1.0], [nan], [3.0], [nan]];
        let gaps = fill_gaps(Path::new("t.csv"), &mut v, &names[..1], Some(&[9.0]), false).unwrap();
        assert_eq!(v, ndarray::array![[1.0], [9.0], [3.0], [9.0]]);
        assert!(
            gaps.to_string()
                .contains("filled with the training mean (a table's rows have no order"),
            "{gaps}"
        );
        // Nothing to fill: nothing said.
        let mut v = ndarray::array![[1.0f32]];
        assert!(
            fill_gaps(Path::new("x.csv"), &mut v, &names[..1], None, true)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn fill_gaps_refuses_an_empty_column_or_a_file_mostly_of_gaps() {
        let nan = f32::NAN;
        let names = vec!["a".to_string(), "b".into()];
        let mut v = ndarray::array![[1.0, nan], [2.0, nan], [3.0, nan]];
        let err = fill_gaps(Path::new("x.csv"), &mut v, &names, None, true).unwrap_err();
        assert_eq!(
            err,
            "column \"b\" has no values: all 3 rows are empty, NaN or Inf"
        );
        let mut v = ndarray::array![[nan, nan], [2.0, nan], [nan, 4.0]];
        let err = fill_gaps(Path::new("x.csv"), &mut v, &names, None, true).unwrap_err();
        assert!(
            err.starts_with("4 of 6 cells (67 %) are empty, NaN or Inf"),
            "{err}"
        );
        // Half is still filled.
        let mut v = ndarray::array![[nan, 1.0], [2.0, nan], [nan, 4.0], [1.0, 1.0]];
        assert_eq!(
            fill_gaps(Path::new("x.csv"), &mut v, &names, None, true)
                .unwrap()
                .cells(),
            3
        );
    }

    #[test]
    fn event_matching_by_hand() {
        // Segments [10,20] and [50,60]; episodes [15,25] (true, delay 5, fired at 17: 7),
        // [30,31] (false), [45,52] (true, began before the segment: delay 0; fired at 52:
        // 2).
        let l = labels(100, &[(10, 20), (50, 60)]);
        let r = event_report(&[(15, 25), (30, 31), (45, 52)], &[17, 31, 52], &l);
        assert_eq!(r.episodes, 3);
        assert_eq!(r.segments, 2);
        assert_eq!(r.precision, Some(2.0 / 3.0));
        assert_eq!(r.recall, Some(1.0));
        assert_eq!(r.mean_delay_frames, Some(2.5));
        assert_eq!(r.mean_delay_to_firing, Some(4.5));
        // Inside episodes: 11 + 2 + 8 = 21 frames, of which 6 (15–20) + 3 (50–52) labelled.
        assert_eq!((r.frames, r.alerted_frames), (100, 21));
        assert_eq!(r.alerted_share, Some(0.21));
        assert_eq!(r.alerted_precision, Some(9.0 / 21.0));
        let none = event_report(&[], &[], &labels(5, &[(1, 2)]));
        assert_eq!((none.precision, none.recall), (None, Some(0.0)));
        assert_eq!(
            (none.alerted_share, none.alerted_precision),
            (Some(0.0), None)
        );
    }

    /// The trial: labels in the rows a lag window fills dropped out of the evaluation
    /// without a word.
    #[test]
    fn labels_in_the_unscored_window_rows_are_told() {
        let l = labels(100, &[(3, 5), (8, 12), (40, 41)]);
        let u = UnscoredLabels::of(&l, 9);
        assert_eq!(
            u,
            UnscoredLabels {
                rows: 9,
                anomalous: 4,
                segments: 1,
                cut: true
            }
        );
        let text = u.to_string();
        assert!(
            text.contains("first 9 rows")
                && text.contains("4 of them labelled anomalous")
                && text.contains("1 labelled segment wholly")
                && text.contains("counts from row 9"),
            "{text}"
        );
        let clean = UnscoredLabels::of(&l, 3);
        assert_eq!((clean.anomalous, clean.segments, clean.cut), (0, 0, false));
        assert!(clean.to_string().contains("none of them"), "{clean}");
        // A segment ending exactly at the last unscored row is wholly there.
        let edge = UnscoredLabels::of(&l, 13);
        assert_eq!((edge.segments, edge.cut), (2, false));
    }

    /// An alert that never ends (machine-3-4 under SPOT: one episode from frame 2742 to
    /// the end of the file) scores a high episode recall (here 2 of 3 segments, recall 1
    /// on machine-3-4) at precision 0.5; the frames inside episodes show what it is.
    #[test]
    fn a_never_ending_alert_shows_in_the_alerted_frames() {
        let n = 1000;
        let l = labels(n, &[(100, 110), (400, 420), (800, 805)]);
        let r = event_report(&[(30, 32), (300, n - 1)], &[32, 302], &l);
        assert_eq!((r.precision, r.recall), (Some(0.5), Some(2.0 / 3.0)));
        assert_eq!(r.alerted_frames, 3 + 700);
        assert!(r.alerted_share.unwrap() > 0.7, "{r:?}");
        assert!(r.alerted_precision.unwrap() < 0.04, "{r:?}");
        // An episode past the labels is clipped, not a panic.
        let r = event_report(&[(n - 2, n + 5)], &[n], &l);
        assert_eq!(r.alerted_frames, 2);
    }
}
