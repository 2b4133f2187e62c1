//! Online retraining that adapts to drift without learning the anomalies.
//!
//! Four parts, each testable on its own:
//!
//! * [`Reservoir`]: a bounded, seeded sample of *clean* frames over a sliding horizon. The
//!   sink admits a frame only when it scored below the model's clean quantile and its stream
//!   had no alarm within `guard_frames` before or after it ([`Admission`]). Alert frames,
//!   the frames leading up to an alert and its tail never enter.
//! * [`refit`]: warm-start fine-tuning of the current model on a reservoir snapshot for a
//!   bounded number of epochs, with the scaler kept, the log-variance baseline, the MSS
//!   reference bank and the calibration scores rebuilt from the new rows.
//! * [`gate`]: the candidate is published only if, on a held-out part of the snapshot, it
//!   does not make normal frames score worse than the current model (mean training loss
//!   with the top 1 % trimmed, within `gate_tolerance`), and its recalibrated threshold is
//!   finite.
//! * [`CheckpointStore`]: every accepted model is written atomically (temporary directory,
//!   files fsynced, rename, fsync of the state directory), the newest `keep_checkpoints`
//!   are kept, and on start the newest one that loads and validates is resumed; a corrupt
//!   one is skipped with a warning.
//!
//! A long change of behaviour can be a new normal or a long incident, and no score can
//! tell which. darkwatch decides by duration: a stream whose frames stay above the clean
//! limit for `adopt_after_frames` frames in a row (most of a full window) is *adopted*:
//! its frames below the window's own clean quantile may then enter the reservoir, and a
//! retrain is requested. Anything shorter is never learned. `adopt_after_frames = 0`
//! never adopts.
//!
//! The [`Trainer`] runs all of this on its own low-priority thread and publishes accepted
//! models into the scorer's [`ModelCell`]; the scorer switches between batches and tags
//! every frame with the version that scored it, and the sink recalibrates its thresholds
//! when the first frame of a new version arrives, so no frame is judged by another model's
//! threshold.

use std::collections::VecDeque;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use ndarray::{Array2, ArrayView2, Axis};
use serde::{Deserialize, Serialize};

use crate::config::DarkwatchConfig;
use crate::model::fit::{calibrate, log_variance_baseline, quantile_sorted};
use crate::model::io::MAX_CALIBRATION_SCORES;
use crate::model::{Model, ModelError};
use crate::mss::ReferenceBank;
use crate::pipeline::{ScoredFrame, Scorer};
use crate::ring::{FrameConsumer, FrameMeta};
use crate::rng::Rng;
use crate::score::{Head, HeadKind, LogVariance};
use crate::train::{TrainConfig, TrainError, train, train_until};

/// The model the scorer uses, replaced between batches when a retrain is accepted.
pub type ModelCell = ArcSwap<Model>;

/// `[retrain]`: online retraining (off by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrainConfig {
    /// Turn online retraining on.
    pub enabled: bool,
    /// Frames the reservoir holds (the training set of a retrain).
    pub reservoir_frames: usize,
    /// The reservoir samples from the last this many admitted frames (older ones age out).
    pub horizon_frames: usize,
    /// A frame is a candidate when it scores below this quantile of the model's own
    /// held-out training scores.
    pub clean_quantile: f64,
    /// Frames of the same stream before and after a candidate that must be free of alarms
    /// and of elevated stretches (many frames above the clean limit among the last 64).
    pub guard_frames: u64,
    /// Retrain after this many scored frames (0: only on adoption).
    pub every_frames: u64,
    /// ... or after this many seconds, whichever comes first (0: no time trigger). A
    /// paused replay ignores it: a wall-clock trigger would make it irreproducible.
    pub every_secs: u64,
    /// A retrain needs at least this many frames in the reservoir. Its held-out share
    /// (`holdout_fraction`) calibrates the candidate's threshold, so with retraining on the
    /// configuration refuses fewer than [`min_frames_to_calibrate`] (248 by default).
    pub min_frames: usize,
    /// Epochs of warm-start fine-tuning per retrain (bounded work).
    pub epochs: usize,
    /// Adam step size of the fine-tuning.
    pub learning_rate: f64,
    /// Share of the reservoir snapshot held out for the gate and the calibration.
    pub holdout_fraction: f64,
    /// The candidate's mean held-out loss (top 1 % trimmed) may exceed the current model's
    /// by this share of its magnitude (at least 1).
    pub gate_tolerance: f64,
    /// Frames in a row a stream must stay above the clean limit (in most frames of a full
    /// window) before the change is adopted as the new normal (0: never adopt).
    pub adopt_after_frames: u64,
    /// Checkpoints of accepted models go here (empty: none are written).
    pub state_dir: PathBuf,
    /// Newest checkpoints kept.
    pub keep_checkpoints: usize,
    /// Replay only: pause the replayed stream while a retrain runs, train on the reservoir
    /// as the request saw it, and swap at a fixed lag after the requesting frame
    /// ([`crate::pipeline::SwapGate`]), so that a replay's scores depend neither on how
    /// fast this machine trains nor on thread timing.
    pub replay_pause: bool,
}

impl Default for RetrainConfig {
    fn default() -> Self {
        RetrainConfig {
            enabled: false,
            reservoir_frames: 20_000,
            horizon_frames: 200_000,
            clean_quantile: 0.9,
            guard_frames: 64,
            every_frames: 50_000,
            every_secs: 3_600,
            min_frames: 2_000,
            epochs: 5,
            learning_rate: 5e-4,
            holdout_fraction: 0.2,
            gate_tolerance: 0.02,
            adopt_after_frames: 2_000,
            state_dir: PathBuf::new(),
            keep_checkpoints: 5,
            replay_pause: true,
        }
    }
}

impl RetrainConfig {
    /// Semantic checks the types cannot express. Returns the key and the reason.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.reservoir_frames == 0 {
            return Err(("reservoir_frames", "must be at least 1".into()));
        }
        if self.horizon_frames < self.reservoir_frames {
            return Err((
                "horizon_frames",
                format!(
                    "must be at least reservoir_frames ({}), got {}",
                    self.reservoir_frames, self.horizon_frames
                ),
            ));
        }
        if !(self.clean_quantile > 0.0 && self.clean_quantile <= 1.0) {
            return Err((
                "clean_quantile",
                format!("must be in (0, 1], got {}", self.clean_quantile),
            ));
        }
        if self.min_frames < 100 {
            return Err((
                "min_frames",
                format!("must be at least 100, got {}", self.min_frames),
            ));
        }
        if self.min_frames > self.reservoir_frames {
            return Err((
                "min_frames",
                format!(
                    "must not exceed reservoir_frames ({}), got {}",
                    self.reservoir_frames, self.min_frames
                ),
            ));
        }
        if self.epochs == 0 {
            return Err(("epochs", "must be at least 1".into()));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(("learning_rate", "must be positive".into()));
        }
        if !(self.holdout_fraction >= 0.05 && self.holdout_fraction <= 0.5) {
            return Err((
                "holdout_fraction",
                format!("must be in [0.05, 0.5], got {}", self.holdout_fraction),
            ));
        }
        if !(self.gate_tolerance >= 0.0 && self.gate_tolerance.is_finite()) {
            return Err(("gate_tolerance", "must be >= 0".into()));
        }
        if self.keep_checkpoints == 0 {
            return Err(("keep_checkpoints", "must be at least 1".into()));
        }
        Ok(())
    }
}

/// A bounded sample of clean frames over a sliding horizon: two generations of
/// `capacity / 2` slots, each filled by reservoir sampling (Algorithm R) over
/// `horizon / 2` admitted frames; when the current generation has seen its share, it
/// becomes the previous one and a fresh generation starts. A snapshot draws from both,
/// so it always covers between half a horizon and a whole one.
#[derive(Debug, Clone)]
pub struct Reservoir {
    d: usize,
    half: usize,
    half_horizon: u64,
    generations: [Generation; 2],
    current: usize,
    rng: Rng,
    admitted: u64,
}

#[derive(Debug, Clone)]
struct Generation {
    rows: Vec<f32>,
    seqs: Vec<u64>,
    /// Whether each frame scored below the clean limit (only those are trained on).
    clean: Vec<bool>,
    /// How many of `clean` are set, kept as frames come and go: the sink asks for it after
    /// every frame, so it must not cost a scan of the reservoir.
    n_clean: usize,
    seen: u64,
}

impl Generation {
    fn new(half: usize, d: usize) -> Self {
        Generation {
            rows: Vec::with_capacity(half * d),
            seqs: Vec::with_capacity(half),
            clean: Vec::with_capacity(half),
            n_clean: 0,
            seen: 0,
        }
    }
}

impl Reservoir {
    pub fn new(d: usize, capacity: usize, horizon: usize, seed: u64) -> Self {
        let half = (capacity / 2).max(1);
        Reservoir {
            d,
            half,
            half_horizon: (horizon / 2).max(half) as u64,
            generations: [Generation::new(half, d), Generation::new(half, d)],
            current: 0,
            rng: Rng::new(seed),
            admitted: 0,
        }
    }

    /// Offers one admitted frame (raw values) with its sequence number; `clean` when it
    /// scored below the clean limit.
    pub fn offer(&mut self, seq: u64, values: &[f32], clean: bool) {
        if values.len() != self.d {
            return;
        }
        self.admitted += 1;
        if self.generations[self.current].seen >= self.half_horizon {
            self.current ^= 1;
            let g = &mut self.generations[self.current];
            g.rows.clear();
            g.seqs.clear();
            g.clean.clear();
            g.n_clean = 0;
            g.seen = 0;
        }
        let (half, d) = (self.half, self.d);
        let g = &mut self.generations[self.current];
        g.seen += 1;
        if g.seqs.len() < half {
            g.rows.extend_from_slice(values);
            g.seqs.push(seq);
            g.clean.push(clean);
            g.n_clean += usize::from(clean);
        } else {
            let j = (self.rng.next_u64() % g.seen) as usize;
            if j < half {
                g.rows[j * d..(j + 1) * d].copy_from_slice(values);
                g.seqs[j] = seq;
                g.n_clean = g.n_clean + usize::from(clean) - usize::from(g.clean[j]);
                g.clean[j] = clean;
            }
        }
    }

    /// Frames held now.
    pub fn len(&self) -> usize {
        self.generations.iter().map(|g| g.seqs.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Frames admitted since the start.
    pub fn admitted(&self) -> u64 {
        self.admitted
    }

    /// The sequence numbers of the frames held (for tests and `inspect`).
    pub fn seqs(&self) -> impl Iterator<Item = u64> + '_ {
        self.generations.iter().flat_map(|g| g.seqs.iter().copied())
    }

    /// Frames held that scored below the clean limit.
    pub fn clean_len(&self) -> usize {
        self.generations.iter().map(|g| g.n_clean).sum()
    }

    /// A copy of the frames held, previous generation first, with their clean flags.
    pub fn snapshot(&self) -> (Array2<f32>, Vec<bool>) {
        let order = [self.current ^ 1, self.current];
        let mut data = Vec::with_capacity(self.len() * self.d);
        let mut clean = Vec::with_capacity(self.len());
        for i in order {
            data.extend_from_slice(&self.generations[i].rows);
            clean.extend_from_slice(&self.generations[i].clean);
        }
        let rows = Array2::from_shape_vec((data.len() / self.d.max(1), self.d), data)
            .expect("rows are d values each");
        (rows, clean)
    }
}

/// Why a retrain produced no model.
#[derive(Debug, thiserror::Error)]
pub enum RetrainError {
    #[error("reservoir holds {have} frames, a retrain needs {need}")]
    TooFewFrames { have: usize, need: usize },
    #[error("training failed: {0}")]
    Train(#[from] TrainError),
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] ModelError),
    #[error("checkpoint {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A fine-tuned model and what the gate needs to judge it.
#[derive(Debug)]
pub struct Candidate {
    pub model: Model,
    /// Held-out rows (raw), not used for fine-tuning.
    pub holdout: Array2<f32>,
    pub rows_train: usize,
    pub seconds: f64,
}

/// Fine-tunes a copy of `current` on the clean ones of `rows` (raw frames) for
/// `cfg.epochs` epochs and rebuilds everything that depends on the weights. A held-out share
/// of *all* admitted rows (clean or not: every frame outside an alert) calibrates the new
/// threshold and judges the gate, because a sample cut at the clean quantile would hide the
/// normal tail that the threshold is fitted to. The scaler is kept: the network adapts in
/// the scaled space the threshold history was built in.
///
/// # Errors
/// Too few rows, or training failed (the current model is untouched either way).
pub fn refit(
    current: &Model,
    rows: ArrayView2<f32>,
    clean: &[bool],
    cfg: &RetrainConfig,
    seed: u64,
    stop: Option<&AtomicBool>,
) -> Result<Candidate, RetrainError> {
    let started = Instant::now();
    let n = rows.nrows();
    let n_clean = clean.iter().filter(|&&c| c).count();
    if n < cfg.min_frames || n_clean < cfg.min_frames / 2 {
        return Err(RetrainError::TooFewFrames {
            have: n_clean.min(n),
            need: cfg.min_frames,
        });
    }
    let mut rng = Rng::new(seed);
    let mut idx: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        idx.swap(i, j);
    }
    let n_hold = holdout_rows(n, cfg.holdout_fraction);
    let (hold_idx, rest) = idx.split_at(n_hold);
    let train_idx: Vec<usize> = rest
        .iter()
        .copied()
        .filter(|&i| clean.get(i) == Some(&true))
        .collect();
    let holdout = rows.select(Axis(0), hold_idx);
    let train_rows = rows.select(Axis(0), &train_idx);
    let scaler = &current.meta.scaler;
    let x = scaler.transform(train_rows.view());
    let mut ae = current.ae.clone();
    let tc = TrainConfig {
        epochs_max: cfg.epochs,
        learning_rate: cfg.learning_rate,
        validation_fraction: 0.0,
        patience_epochs: cfg.epochs,
        seed,
        ..current.meta.provenance.train.clone()
    };
    let report = match stop {
        Some(stop) => train_until(&mut ae, x.view(), &tc, stop, &mut |_| {})?,
        None => train(&mut ae, x.view(), &tc, &mut |_| {})?,
    };
    let mut meta = current.meta.clone();
    meta.version = current.meta.version + 1;
    meta.provenance.created_unix_secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    meta.provenance.data_file = format!("online reservoir ({n} frames)");
    meta.provenance.data_sha256 = String::new();
    meta.provenance.rows = n;
    meta.provenance.rows_train = report.rows_train;
    meta.provenance.rows_validation = n_hold;
    meta.provenance.epochs_run = report.epochs_run;
    meta.provenance.best_epoch = report.best_epoch;
    meta.provenance.stopped_early = report.stopped_early;
    meta.provenance.train_losses = report.train_losses.clone();
    meta.provenance.validation_losses = Vec::new();
    let scaled_hold = scaler.transform(holdout.view());
    // The `bounded` floor stays the first training's spread (a quiet reservoir must not let
    // a feature's variance collapse again); a model stored without one counts it as 1.
    let (d, m) = (ae.n_features, ae.recon_width());
    let spread = match current.meta.log_variance_baseline.get(2 * m..2 * m + d) {
        Some(s) => s.to_vec(),
        None => vec![0.0; d],
    };
    meta.log_variance_baseline = log_variance_baseline(&ae, scaled_hold.view(), &spread);
    let bank = current
        .bank
        .as_ref()
        .map(|_| ReferenceBank::build(x.view(), &current.meta.mss, seed));
    let mut model = Model::new(ae, meta, bank);
    // The threshold calibrates on held-out rows only: scores of rows the candidate was
    // just fitted to have a thinner tail, and a threshold fitted to them fires too often.
    // Calibrating on all rows was tried: after an adopted change the thresholds grew
    // tenfold within a few retrains.
    let (calibration, scores) = calibrate(&model, holdout.view());
    model.meta.calibration = calibration;
    let keep = scores.len().saturating_sub(MAX_CALIBRATION_SCORES);
    model.calibration_scores = scores[keep..].to_vec();
    model.meta.provenance.train_seconds = started.elapsed().as_secs_f64();
    model.seal();
    Ok(Candidate {
        model,
        holdout,
        rows_train: train_idx.len(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The gate's verdict on a candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateReport {
    pub accepted: bool,
    /// Mean held-out loss, top 1 % trimmed (NLL for a probabilistic model, squared error
    /// otherwise).
    #[serde(deserialize_with = "null_as_nan")]
    pub current_loss: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub candidate_loss: f64,
    /// The candidate's threshold calibrated on its own held-out scores (NaN: none). JSON
    /// writes NaN as `null`, and reads `null` back as NaN.
    #[serde(deserialize_with = "null_as_nan")]
    pub candidate_threshold: f64,
    pub reason: String,
}

/// Reads a number that serde_json wrote from a NaN or an infinity as `null`.
fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// The per-frame training loss of `model` on raw `rows`: Gaussian NLL (the raw wnll with
/// α = ½, β = ½) for a probabilistic model, squared error for a plain one. Both models are
/// judged by the loss they were trained with, which does not depend on their calibration.
fn losses(model: &Model, rows: ArrayView2<f32>) -> Vec<f32> {
    let head = match model.ae.output {
        crate::model::OutputKind::Probabilistic => Head {
            kind: HeadKind::Wnll,
            alpha: 0.5,
            beta: 0.5,
            log_variance: LogVariance::Raw,
            variance_floor: 1.0,
        },
        crate::model::OutputKind::Plain => Head {
            kind: HeadKind::Mse,
            ..model.meta.head
        },
    };
    let plain = Arc::new(Model {
        onnx: None,
        ..model.with_mss(crate::mss::MssConfig {
            rounds: 0,
            ..model.meta.mss
        })
    });
    match Scorer::new(plain, head, 512, 1) {
        Ok(mut s) => s.score_all(rows),
        Err(_) => vec![f32::NAN; rows.nrows()],
    }
}

/// The mean of the finite values below their 99th percentile: the typical loss, with the
/// few frames no model explains left out (NaN when there are none).
fn trimmed_mean(mut v: Vec<f32>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f32::total_cmp);
    let keep = ((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len());
    v[..keep].iter().map(|&x| f64::from(x)).sum::<f64>() / keep as f64
}

/// Judges `candidate` against `current` on the candidate's held-out rows.
pub fn gate(
    current: &Model,
    candidate: &Candidate,
    cfg: &RetrainConfig,
    threshold: &crate::threshold::ThresholdConfig,
) -> GateReport {
    let current_loss = trimmed_mean(losses(current, candidate.holdout.view()));
    let candidate_loss = trimmed_mean(losses(&candidate.model, candidate.holdout.view()));
    let calibrated = threshold.build(&candidate.model.threshold_scores());
    let candidate_threshold = calibrated.as_ref().map_or(f64::NAN, |t| t.threshold());
    // Losses can be negative (NLL): compare with a tolerance on their spread, not a ratio.
    let allowed = current_loss + cfg.gate_tolerance * current_loss.abs().max(1.0);
    let (accepted, reason) = if !candidate_loss.is_finite() {
        (false, "candidate loss is not finite".to_string())
    } else if !candidate_threshold.is_finite() {
        (
            false,
            uncalibrated_reason(
                calibrated.err().as_ref(),
                candidate.holdout.nrows(),
                cfg,
                threshold,
            ),
        )
    } else if current_loss.is_finite() && candidate_loss > allowed {
        (
            false,
            format!(
                "held-out mean loss {candidate_loss:.4} is worse than the current {current_loss:.4} (allowed {allowed:.4})"
            ),
        )
    } else {
        (
            true,
            format!("held-out mean loss {current_loss:.4} -> {candidate_loss:.4}"),
        )
    };
    GateReport {
        accepted,
        current_loss,
        candidate_loss,
        candidate_threshold,
        reason,
    }
}

/// Held-out rows of a retrain on `rows` frames: what calibrates the candidate's threshold.
pub fn holdout_rows(rows: usize, holdout_fraction: f64) -> usize {
    if rows < 2 {
        return 0;
    }
    ((rows as f64 * holdout_fraction).round() as usize).clamp(1, rows - 1)
}

/// Finite scores the `[threshold]` kind needs to calibrate (see [`ThresholdConfig::build`](crate::threshold::ThresholdConfig::build)).
pub fn calibration_scores_needed(threshold: &crate::threshold::ThresholdConfig) -> usize {
    match threshold.kind {
        crate::threshold::ThresholdKind::Dspot => {
            threshold.dspot_depth + crate::threshold::MIN_CALIBRATION_SCORES
        }
        _ => crate::threshold::MIN_CALIBRATION_SCORES,
    }
}

/// The smallest `[retrain] min_frames` whose held-out share ([`holdout_rows`]) gives the
/// threshold the scores it needs: a retrain on fewer frames can never calibrate one.
pub fn min_frames_to_calibrate(
    holdout_fraction: f64,
    threshold: &crate::threshold::ThresholdConfig,
) -> usize {
    let needed = calibration_scores_needed(threshold);
    let mut rows = (needed as f64 / holdout_fraction.max(1e-6)).floor() as usize;
    rows = rows.saturating_sub(2).max(2);
    while holdout_rows(rows, holdout_fraction) < needed {
        rows += 1;
    }
    rows
}

/// Why a candidate's threshold could not be calibrated, with its numbers and the remedy.
fn uncalibrated_reason(
    error: Option<&crate::threshold::ThresholdError>,
    held_out: usize,
    cfg: &RetrainConfig,
    threshold: &crate::threshold::ThresholdConfig,
) -> String {
    use crate::threshold::ThresholdError;
    let why = error.map_or_else(
        || "the threshold is not finite".to_string(),
        |e| e.to_string(),
    );
    let remedy = match error {
        Some(ThresholdError::TooFewScores { .. }) => format!(
            "; the candidate had {held_out} held-out rows ([retrain] holdout_fraction = {}): raise [retrain] min_frames to at least {} or holdout_fraction",
            cfg.holdout_fraction,
            min_frames_to_calibrate(cfg.holdout_fraction, threshold)
        ),
        Some(ThresholdError::ConstantScores { .. }) => format!(
            "; on its {held_out} held-out rows: the admitted frames do not vary; this mends itself once they do, or use [threshold] kind = \"quantile\""
        ),
        _ => format!("; on its {held_out} held-out rows"),
    };
    format!("candidate threshold could not be calibrated: {why}{remedy}")
}

/// One line of `history.jsonl` in the state directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub unix_secs: u64,
    /// The version the candidate would have (accepted: the version now published).
    pub version: u64,
    pub model_id: String,
    pub trigger: String,
    pub rows: usize,
    pub seconds: f64,
    pub gate: GateReport,
}

impl std::fmt::Display for HistoryEntry {
    /// One line: version, trigger, rows, seconds, the verdict and its reason.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "v{:<4} {:<18} {:>6} rows {:>6.2} s  {}  {}",
            self.version,
            self.trigger,
            self.rows,
            self.seconds,
            if self.gate.accepted {
                "accepted"
            } else {
                "REJECTED"
            },
            self.gate.reason
        )
    }
}

/// Where accepted models are checkpointed.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    dir: PathBuf,
    keep: usize,
}

/// Prefix of a checkpoint directory: `ckpt-00000042`.
const CKPT_PREFIX: &str = "ckpt-";

/// The directory name of version `version`'s checkpoint in a state directory.
pub fn checkpoint_name(version: u64) -> String {
    format!("{CKPT_PREFIX}{version:08}")
}
const TMP_PREFIX: &str = ".tmp-";
pub const HISTORY_FILE: &str = "history.jsonl";
/// The id of the model (from the model directory) that the checkpoints descend from.
pub const ORIGIN_FILE: &str = "origin";

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

impl CheckpointStore {
    pub fn new(dir: &Path, keep: usize) -> Self {
        CheckpointStore {
            dir: dir.to_path_buf(),
            keep: keep.max(1),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn io(&self, path: &Path) -> impl Fn(std::io::Error) -> RetrainError {
        let path = path.to_path_buf();
        move |source| RetrainError::Io {
            path: path.clone(),
            source,
        }
    }

    /// Writes `model` as `ckpt-<version>`: into a temporary directory (each file fsynced),
    /// which is fsynced, renamed, and the state directory fsynced. Then prunes old ones.
    ///
    /// # Errors
    /// The state directory cannot be written.
    pub fn write(&self, model: &Model) -> Result<PathBuf, RetrainError> {
        fs::create_dir_all(&self.dir).map_err(self.io(&self.dir))?;
        let name = checkpoint_name(model.meta.version);
        let tmp = self.dir.join(format!("{TMP_PREFIX}{name}"));
        let done = self.dir.join(&name);
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(self.io(&tmp))?;
        }
        model.save(&tmp)?;
        fsync_dir(&tmp).map_err(self.io(&tmp))?;
        if done.exists() {
            fs::remove_dir_all(&done).map_err(self.io(&done))?;
        }
        fs::rename(&tmp, &done).map_err(self.io(&done))?;
        fsync_dir(&self.dir).map_err(self.io(&self.dir))?;
        self.prune();
        Ok(done)
    }

    /// Checkpoint directories, newest version first.
    pub fn list(&self) -> Vec<(u64, PathBuf)> {
        let mut v: Vec<(u64, PathBuf)> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let version = name.strip_prefix(CKPT_PREFIX)?.parse().ok()?;
                Some((version, e.path()))
            })
            .collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.0));
        v
    }

    fn prune(&self) {
        for (_, path) in self.list().into_iter().skip(self.keep) {
            if let Err(e) = fs::remove_dir_all(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove an old checkpoint");
            }
        }
        // Leftovers of a write that was interrupted.
        for e in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }

    /// The newest checkpoint that loads and validates; broken ones are skipped with a
    /// warning (returned too, for reports).
    pub fn newest_valid(&self) -> (Option<(PathBuf, Model)>, Vec<String>) {
        let mut skipped = Vec::new();
        for (_, path) in self.list() {
            match Model::load(&path) {
                Ok(m) => return (Some((path, m)), skipped),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping a checkpoint that does not load");
                    skipped.push(e.to_string());
                }
            }
        }
        (None, skipped)
    }

    /// Makes the state directory if it is missing and checks that a file can be made in
    /// it, so that a state directory that can never hold a checkpoint (a file, a read-only
    /// or virtual file system) is refused at start rather than at the first retrain. The
    /// probe file is empty (a full disk still takes it: retraining then fails and says so,
    /// detection goes on) and is removed again.
    ///
    /// # Errors
    /// The directory cannot be made, is not a directory, or refuses a new file.
    pub fn ensure_usable(&self) -> Result<(), RetrainError> {
        fs::create_dir_all(&self.dir).map_err(self.io(&self.dir))?;
        let probe = self
            .dir
            .join(format!("{TMP_PREFIX}probe-{}", std::process::id()));
        let made = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&probe);
        let _ = fs::remove_file(&probe);
        made.map(drop).map_err(self.io(&self.dir))
    }

    /// The id of the model the checkpoints here descend from, if recorded.
    pub fn origin(&self) -> Option<String> {
        let text = fs::read_to_string(self.dir.join(ORIGIN_FILE)).ok()?;
        Some(text.trim().to_string()).filter(|s| !s.is_empty())
    }

    /// Records `id` as the model the checkpoints written from now on descend from (best
    /// effort, logged on failure).
    pub fn set_origin(&self, id: &str) {
        let path = self.dir.join(ORIGIN_FILE);
        let r = fs::create_dir_all(&self.dir).and_then(|()| fs::write(&path, format!("{id}\n")));
        if let Err(e) = r {
            tracing::warn!(path = %path.display(), error = %e, "cannot record the checkpoints' origin model");
        }
    }

    /// Moves every checkpoint and the history into `superseded-<label>-<unix secs>/` inside
    /// the state directory, so that a new chain starts empty and nothing is deleted.
    /// Returns that directory.
    ///
    /// # Errors
    /// The directory cannot be made or an entry cannot be moved.
    pub fn set_aside(&self, label: &str) -> Result<PathBuf, RetrainError> {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let safe: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(40)
            .collect();
        let aside = self.dir.join(format!("superseded-{safe}-{secs}"));
        fs::create_dir_all(&aside).map_err(self.io(&aside))?;
        let history = self.dir.join(HISTORY_FILE);
        let moves = self
            .list()
            .into_iter()
            .map(|(_, path)| path)
            .chain(history.exists().then_some(history));
        for path in moves {
            let to = aside.join(path.file_name().unwrap_or_default());
            fs::rename(&path, &to).map_err(self.io(&path))?;
        }
        fsync_dir(&self.dir).map_err(self.io(&self.dir))?;
        Ok(aside)
    }

    /// Appends one line to `history.jsonl` (best effort, logged on failure).
    pub fn record(&self, entry: &HistoryEntry) {
        let path = self.dir.join(HISTORY_FILE);
        let line = serde_json::to_string(entry).unwrap_or_default();
        let r = fs::create_dir_all(&self.dir).and_then(|()| {
            let mut f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            writeln!(f, "{line}")
        });
        if let Err(e) = r {
            tracing::warn!(path = %path.display(), error = %e, "cannot append to the retrain history");
        }
    }

    /// The recorded history, oldest first, without the lines that cannot be read (see
    /// [`CheckpointStore::read_history`]).
    pub fn history(&self) -> Vec<HistoryEntry> {
        self.read_history().entries
    }

    /// The recorded history, oldest first, and the lines that cannot be read as an entry
    /// (a line torn by a crash, or one a newer version wrote), each with its number and
    /// why. A missing file is an empty history.
    pub fn read_history(&self) -> History {
        let path = self.dir.join(HISTORY_FILE);
        let text = match fs::read(&path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return History {
                    entries: Vec::new(),
                    unreadable: vec![(0, format!("cannot read {}: {e}", path.display()))],
                };
            }
        };
        let mut history = History::default();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str(line) {
                Ok(entry) => history.entries.push(entry),
                Err(e) => history.unreadable.push((i + 1, e.to_string())),
            }
        }
        history
    }
}

/// `history.jsonl` as read by [`CheckpointStore::read_history`].
#[derive(Debug, Clone, Default)]
pub struct History {
    /// The entries that could be read, oldest first.
    pub entries: Vec<HistoryEntry>,
    /// The lines that could not: line number (1-based; 0 when the file itself cannot be
    /// read) and why.
    pub unreadable: Vec<(usize, String)>,
}

/// Counters of the trainer, shared with `/metrics` and reports.
#[derive(Debug, Default)]
pub struct RetrainCounters {
    pub requested: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    pub failed: AtomicU64,
    pub adoptions: AtomicU64,
    pub admitted: AtomicU64,
    /// The version being scored now.
    pub version: AtomicU64,
    /// Duration of the last retrain, in µs.
    pub last_micros: AtomicU64,
}

/// What the sink asks the trainer for.
#[derive(Debug, Clone)]
pub struct Request {
    pub trigger: String,
    /// Replay: the reservoir as the request saw it (rows, clean flags), so that what the
    /// trainer learns does not depend on how far the sink got meanwhile. `None`: the
    /// trainer reads the reservoir when it starts.
    pub snapshot: Option<(Array2<f32>, Vec<bool>)>,
}

/// Everything the trainer thread shares with the pipeline.
#[derive(Clone)]
pub struct Shared {
    pub cell: Arc<ModelCell>,
    pub reservoir: Arc<Mutex<Reservoir>>,
    pub counters: Arc<RetrainCounters>,
    /// Models published so far, newest last (bounded): the sink recalibrates from the
    /// version a frame carries.
    pub published: Arc<Mutex<VecDeque<Arc<Model>>>>,
    /// Set from a retrain request until the trainer is done with it (a replay pauses its
    /// source on it).
    pub busy: Arc<AtomicBool>,
    /// Replay: the frame seq at which the scorer takes the model of the pending retrain
    /// ([`crate::pipeline::SwapGate`]); `u64::MAX` when none is pending.
    pub swap_at: Arc<std::sync::atomic::AtomicU64>,
    /// Every retrain of this run, accepted or not, oldest first.
    pub history: Arc<Mutex<Vec<HistoryEntry>>>,
    /// Raised when the agent stops, or a reload replaces this trainer: a retrain in
    /// progress gives up within one mini-batch ([`crate::train::train_until`]) instead of
    /// holding the stop (a starved nice-19 retrain can take minutes).
    pub stopping: Arc<AtomicBool>,
}

impl Shared {
    pub fn new(model: Arc<Model>, cfg: &RetrainConfig, seed: u64) -> Self {
        let d = model.n_features();
        let counters = RetrainCounters::default();
        counters
            .version
            .store(model.meta.version, Ordering::Relaxed);
        Shared {
            reservoir: Arc::new(Mutex::new(Reservoir::new(
                d,
                cfg.reservoir_frames,
                cfg.horizon_frames,
                seed,
            ))),
            published: Arc::new(Mutex::new(VecDeque::from([model.clone()]))),
            cell: Arc::new(ArcSwap::new(model)),
            counters: Arc::new(counters),
            busy: Arc::new(AtomicBool::new(false)),
            swap_at: Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX)),
            history: Arc::new(Mutex::new(Vec::new())),
            stopping: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The published model of `version`, if it is still known.
    pub fn model_of(&self, version: u64) -> Option<Arc<Model>> {
        let p = self.published.lock().ok()?;
        p.iter().rev().find(|m| m.meta.version == version).cloned()
    }
}

/// The trainer: waits for requests, refits, gates, checkpoints and publishes.
pub struct Trainer {
    cfg: RetrainConfig,
    threshold: crate::threshold::ThresholdConfig,
    shared: Shared,
    store: Option<CheckpointStore>,
    seed: u64,
}

impl Trainer {
    pub fn new(full: &DarkwatchConfig, shared: Shared) -> Self {
        let cfg = full.retrain.clone();
        let store = (!cfg.state_dir.as_os_str().is_empty())
            .then(|| CheckpointStore::new(&cfg.state_dir, cfg.keep_checkpoints));
        Trainer {
            seed: full.train.seed,
            threshold: full.threshold.clone(),
            cfg,
            shared,
            store,
        }
    }

    /// Runs one retrain now; returns the history entry (accepted or not).
    ///
    /// # Errors
    /// Too few frames, training failed, or the checkpoint could not be written (the model
    /// is then not published either: what is scored is always what is on disk).
    pub fn retrain_once(&mut self, trigger: &str) -> Result<HistoryEntry, RetrainError> {
        self.retrain_on(trigger, None)
    }

    /// [`Self::retrain_once`] on `snapshot` (rows and clean flags) instead of the
    /// reservoir as it is now.
    ///
    /// # Errors
    /// As [`Self::retrain_once`].
    pub fn retrain_on(
        &mut self,
        trigger: &str,
        snapshot: Option<(Array2<f32>, Vec<bool>)>,
    ) -> Result<HistoryEntry, RetrainError> {
        let c = &self.shared.counters;
        c.requested.fetch_add(1, Ordering::Relaxed);
        let (rows, clean) = snapshot.unwrap_or_else(|| {
            self.shared
                .reservoir
                .lock()
                .map(|r| r.snapshot())
                .unwrap_or_else(|p| p.into_inner().snapshot())
        });
        let current = self.shared.cell.load_full();
        self.seed = self.seed.wrapping_add(1);
        let candidate = refit(
            &current,
            rows.view(),
            &clean,
            &self.cfg,
            self.seed,
            Some(&self.shared.stopping),
        )?;
        let verdict = gate(&current, &candidate, &self.cfg, &self.threshold);
        let entry = HistoryEntry {
            unix_secs: candidate.model.meta.provenance.created_unix_secs,
            version: candidate.model.meta.version,
            model_id: candidate.model.meta.id.clone(),
            trigger: trigger.to_string(),
            rows: rows.nrows(),
            seconds: candidate.seconds,
            gate: verdict.clone(),
        };
        c.last_micros
            .store((candidate.seconds * 1e6) as u64, Ordering::Relaxed);
        if verdict.accepted {
            if let Some(store) = &self.store {
                store.write(&candidate.model)?;
            }
            let model = Arc::new(candidate.model);
            if let Ok(mut p) = self.shared.published.lock() {
                p.push_back(model.clone());
                while p.len() > 8 {
                    p.pop_front();
                }
            }
            c.version.store(model.meta.version, Ordering::Relaxed);
            self.shared.cell.store(model);
            c.accepted.fetch_add(1, Ordering::Relaxed);
            tracing::info!(version = entry.version, model = %entry.model_id, rows = entry.rows,
                seconds = entry.seconds, trigger, "{}", verdict.reason);
        } else {
            c.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                version = entry.version,
                trigger,
                "retrain rejected: {}",
                verdict.reason
            );
        }
        if let Some(store) = &self.store {
            store.record(&entry);
        }
        if let Ok(mut h) = self.shared.history.lock() {
            h.push(entry.clone());
        }
        Ok(entry)
    }

    /// Serves requests until the channel closes. Errors are logged and counted.
    pub fn serve(mut self, requests: Receiver<Request>) {
        lower_priority();
        /// Clears `busy` however the retrain ends, a panic included, so that a replay
        /// waiting on it fails on the panicked trainer instead of hanging.
        struct NotBusy<'a>(&'a AtomicBool);
        impl Drop for NotBusy<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let busy = self.shared.busy.clone();
        while let Ok(mut req) = requests.recv() {
            // Coalesce a burst of requests into one retrain (the agent's); a replay sends one
            // at a time, each with its snapshot, so nothing is dropped there.
            while let Ok(next) = requests.try_recv() {
                req = next;
            }
            busy.store(true, Ordering::Release);
            let _clear = NotBusy(&busy);
            match self.retrain_on(&req.trigger, req.snapshot) {
                Ok(_) => {}
                Err(RetrainError::Train(TrainError::Stopped)) => {
                    tracing::info!(trigger = %req.trigger, "retrain abandoned: the agent is stopping or reloading");
                }
                Err(e) => {
                    self.shared.counters.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(trigger = %req.trigger, error = %e, "retrain failed");
                }
            }
        }
    }

    /// Starts the trainer thread; returns the request sender and the join handle.
    ///
    /// # Errors
    /// The thread cannot be spawned.
    pub fn spawn(self) -> std::io::Result<(Sender<Request>, std::thread::JoinHandle<()>)> {
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("darkwatch-trainer".into())
            .spawn(move || self.serve(rx))?;
        Ok((tx, handle))
    }
}

/// Makes the calling thread the last to get a CPU (nice 19), so that retraining never
/// competes with the scorer. Best effort.
pub fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority on the calling thread's id only changes its scheduling priority.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
    }
}

/// The sink's side: which scored frames may enter the reservoir, when to ask for a retrain,
/// and when a stream's change is adopted. One per pipeline; streams are tracked separately.
#[derive(Debug)]
pub struct Admission {
    guard: u64,
    clean_quantile: f64,
    adopt_after: u64,
    every_frames: u64,
    every_secs: u64,
    min_frames: usize,
    /// Per stream: the spans of seqs that must not be learned (alarms, alerts and elevated
    /// stretches, widened by the guard), merged, oldest first.
    blocked: Vec<VecDeque<(u64, u64)>>,
    /// Per stream: bit i set when the frame i frames ago scored above the clean limit.
    high_bits: Vec<u64>,
    /// More high frames than this among the last 64 is an elevated stretch: five standard
    /// deviations above what the clean quantile leaves for normal data.
    elevated_above: u32,
    /// Per stream: frames in a row above the clean limit (most of them), for adoption.
    high_run: Vec<(u64, u64)>,
    /// Per stream: adopted, with the clean limit of the new regime.
    adopted: Vec<Option<f32>>,
    /// Per stream: recent scores (for the adopted regime's clean limit).
    recent: Vec<VecDeque<f32>>,
    frames_since: u64,
    since: Instant,
    requested_at_len: usize,
}

/// What the sink should do after [`Admission::observe`].
#[derive(Debug, Clone, PartialEq)]
pub enum AdmissionEvent {
    Retrain(String),
    Adopted { stream: u32 },
}

impl Admission {
    pub fn new(cfg: &RetrainConfig) -> Self {
        Admission {
            guard: cfg.guard_frames,
            clean_quantile: cfg.clean_quantile,
            adopt_after: cfg.adopt_after_frames,
            every_frames: cfg.every_frames,
            every_secs: cfg.every_secs,
            min_frames: cfg.min_frames,
            blocked: Vec::new(),
            high_bits: Vec::new(),
            elevated_above: {
                let p = 1.0 - cfg.clean_quantile;
                (64.0 * p + 5.0 * (64.0 * p * (1.0 - p)).sqrt()).ceil() as u32
            },
            high_run: Vec::new(),
            adopted: Vec::new(),
            recent: Vec::new(),
            frames_since: 0,
            since: Instant::now(),
            requested_at_len: 0,
        }
    }

    /// The clean limit of `model`: its clean quantile of its own held-out scores, frame by
    /// frame (admission judges each frame's own score, [`ScoredFrame::frame_score`]).
    pub fn clean_limit(&self, model: &Model) -> f32 {
        let mut s: Vec<f32> = model
            .calibration_scores
            .iter()
            .copied()
            .filter(|x| x.is_finite())
            .collect();
        if s.is_empty() {
            return f32::NEG_INFINITY;
        }
        s.sort_by(f32::total_cmp);
        quantile_sorted(&s, self.clean_quantile)
    }

    fn grow(&mut self, stream: usize) {
        if self.blocked.len() <= stream {
            self.blocked.resize(stream + 1, VecDeque::new());
            self.high_bits.resize(stream + 1, 0);
            self.high_run.resize(stream + 1, (0, 0));
            self.adopted.resize(stream + 1, None);
            self.recent.resize(stream + 1, VecDeque::new());
        }
    }

    /// Stream `stream` was forgotten (its index may go to another stream): what was noted
    /// of it goes.
    pub fn forget(&mut self, stream: usize) {
        if stream < self.blocked.len() {
            self.blocked[stream].clear();
            self.high_bits[stream] = 0;
            self.high_run[stream] = (0, 0);
            self.adopted[stream] = None;
            self.recent[stream].clear();
        }
    }

    /// A new model is being scored: adoption ends (the new model has learned the regime
    /// or will be judged afresh).
    pub fn model_changed(&mut self) {
        self.adopted.iter_mut().for_each(|a| *a = None);
        self.high_run.iter_mut().for_each(|r| *r = (0, 0));
        self.recent.iter_mut().for_each(VecDeque::clear);
    }

    /// Notes one scored frame: `alarm` when it was above the threshold or inside a firing
    /// alert. Returns whether a frame scored `score` at `seq` may enter the reservoir once
    /// its guard has passed (the caller holds it until then), and an event if any.
    pub fn observe(
        &mut self,
        stream: u32,
        seq: u64,
        score: f32,
        clean_limit: f32,
        alarm: bool,
        reservoir_len: usize,
    ) -> (bool, Option<AdmissionEvent>) {
        let s = stream as usize;
        self.grow(s);
        // NaN counts as high: a frame that cannot be scored is not clean.
        let high = score.partial_cmp(&clean_limit) != Some(std::cmp::Ordering::Less);
        self.high_bits[s] = (self.high_bits[s] << 1) | u64::from(high);
        // A stretch where far more frames than usual score high is treated like an alarm
        // even when the threshold is not crossed: an incident that hovers just below it
        // must not be learned either.
        let elevated = self.high_bits[s].count_ones() > self.elevated_above;
        if alarm || elevated {
            // An elevated stretch is noticed up to 64 frames after it began.
            let back = if elevated {
                64 + self.guard
            } else {
                self.guard
            };
            let span = (seq.saturating_sub(back), seq + self.guard);
            let spans = &mut self.blocked[s];
            match spans.back_mut() {
                Some(last) if span.0 <= last.1 + 1 => last.1 = last.1.max(span.1),
                _ => spans.push_back(span),
            }
        }
        let mut event = None;
        if self.adopt_after > 0 {
            let recent = &mut self.recent[s];
            recent.push_back(score);
            while recent.len() as u64 > self.adopt_after {
                recent.pop_front();
            }
            // A run of mostly-high frames: it tolerates one low frame in five.
            let (run, lows) = &mut self.high_run[s];
            if high {
                *run += 1;
            } else if *run > 0 {
                *lows += 1;
                if *lows * 5 > *run {
                    (*run, *lows) = (0, 0);
                } else {
                    *run += 1;
                }
            }
            if self.adopted[s].is_none() && *run >= self.adopt_after {
                let mut v: Vec<f32> = recent.iter().copied().filter(|x| x.is_finite()).collect();
                v.sort_by(f32::total_cmp);
                self.adopted[s] = Some(quantile_sorted(&v, self.clean_quantile));
                event = Some(AdmissionEvent::Adopted { stream });
            }
        }
        let candidate = match self.adopted[s] {
            Some(limit) => score < limit,
            None => score < clean_limit,
        };
        self.frames_since += 1;
        if event.is_none() && reservoir_len >= self.min_frames {
            let due_frames = self.every_frames > 0 && self.frames_since >= self.every_frames;
            let due_time = self.every_secs > 0 && self.since.elapsed().as_secs() >= self.every_secs;
            if (due_frames || due_time) && reservoir_len != self.requested_at_len {
                event = Some(AdmissionEvent::Retrain(
                    if due_frames {
                        "schedule (frames)"
                    } else {
                        "schedule (time)"
                    }
                    .into(),
                ));
            }
        }
        if matches!(
            event,
            Some(AdmissionEvent::Retrain(_)) | Some(AdmissionEvent::Adopted { .. })
        ) {
            self.frames_since = 0;
            self.since = Instant::now();
            self.requested_at_len = reservoir_len;
        }
        (candidate, event)
    }

    /// Whether a frame at `seq` of `stream` may enter now that frames up to `now` of that
    /// stream have been seen: `None` until its guard and the elevation window (64 frames)
    /// have passed, then whether it lies outside every blocked span. Adopted streams skip
    /// the rule: their alarms are the regime being adopted. Call with increasing `seq` per
    /// stream (spans wholly before `seq` are forgotten).
    pub fn release(&mut self, stream: u32, seq: u64, now: u64) -> Option<bool> {
        if now < seq + self.guard + 64 {
            return None;
        }
        let s = stream as usize;
        let spans = self.blocked.get_mut(s)?;
        while spans.front().is_some_and(|&(_, hi)| hi < seq) {
            spans.pop_front();
        }
        if self.adopted.get(s).copied().flatten().is_some() {
            return Some(true);
        }
        Some(!spans.iter().any(|&(lo, hi)| lo <= seq && seq <= hi))
    }
}

/// A scored frame waiting for its guard: its meta, raw values and clean flag.
type Pending = (FrameMeta, Box<[f32]>, bool);

/// Most candidates one stream holds for their guard window.
const MAX_PENDING: usize = 1 << 16;

/// Online retraining beside the sink (on the scorer thread in the agent, on the sink thread
/// in a replay): pairs each scored frame with its raw values,
/// holds candidates until their guard has passed, feeds the reservoir, requests retrains,
/// and tells the sink when frames of a new model version begin.
pub struct SinkSide {
    pub shared: Shared,
    admission: Admission,
    values: FrameConsumer,
    requests: Sender<Request>,
    /// Per stream, frames waiting for their guard, oldest first, with their values and
    /// clean flag. One queue per stream: a stream that falls silent holds only its own
    /// candidates, not every other stream's.
    pending: Vec<VecDeque<Pending>>,
    pool: Vec<Box<[f32]>>,
    meta_buf: [FrameMeta; 1],
    buf: Vec<f32>,
    version: u64,
    clean_limit: f32,
    /// Latest seq seen per stream.
    latest: Vec<u64>,
    /// Replay: swap models this many frames after the frame that asks for a retrain (see
    /// [`crate::pipeline::SwapGate`]); `None` in the agent (swap when published).
    swap_lag: Option<u64>,
    /// Replay: until the sink reaches this seq (the swap point), further requests wait, so
    /// that one retrain is in flight at a time and the trainer never coalesces two.
    hold_until: u64,
    /// The last trigger that arrived while held (earlier ones there are merged into it),
    /// requested once the hold ends; its swap point counts from that frame.
    deferred: Option<String>,
}

impl SinkSide {
    pub fn new(
        cfg: &RetrainConfig,
        shared: Shared,
        values: FrameConsumer,
        requests: Sender<Request>,
        swap_lag: Option<u64>,
    ) -> Self {
        let mut admission = Admission::new(cfg);
        if swap_lag.is_some() {
            admission.every_secs = 0;
        }
        let current = shared.cell.load_full();
        // A lag window holds the w − 1 frames before it: keep every window that holds an
        // alarm frame out of the reservoir.
        // A smoothed score alarms up to n − 1 frames after the frame that raised it: the
        // guard reaches that much further.
        admission.guard = admission
            .guard
            .max(current.meta.window_frames.saturating_sub(1) as u64)
            + current.meta.smooth_frames.saturating_sub(1) as u64;
        let clean_limit = admission.clean_limit(&current);
        let d = current.n_features();
        SinkSide {
            version: current.meta.version,
            clean_limit,
            admission,
            values,
            requests,
            pending: Vec::new(),
            pool: Vec::new(),
            meta_buf: [FrameMeta::default()],
            buf: vec![0.0; d],
            latest: Vec::new(),
            swap_lag,
            hold_until: 0,
            deferred: None,
            shared,
        }
    }

    /// The model version this side expects its frames to be scored by.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Call first for each scored frame: when it is the first frame of a new model version,
    /// returns that model, so the caller recalibrates its thresholds before judging it.
    pub fn before(&mut self, f: &ScoredFrame) -> Option<Arc<Model>> {
        if f.model_version == self.version {
            return None;
        }
        let model = self.shared.model_of(f.model_version)?;
        self.version = f.model_version;
        self.clean_limit = self.admission.clean_limit(&model);
        self.admission.model_changed();
        Some(model)
    }

    /// Call after the threshold and alert decision for `f`: `alarm` when it was above the
    /// threshold or inside a firing alert.
    pub fn after(&mut self, f: &ScoredFrame, alarm: bool) {
        // The scorer pushed this frame's values just before its result.
        let got = self.values.pop_batch(&mut self.meta_buf, &mut self.buf);
        let paired = got == 1
            && self.meta_buf[0].seq == f.meta.seq
            && self.meta_buf[0].stream == f.meta.stream
            && self.meta_buf[0].generation == f.meta.generation;
        let stream = f.meta.stream as usize;
        if self.latest.len() <= stream {
            self.latest.resize(stream + 1, 0);
            self.pending.resize_with(stream + 1, VecDeque::new);
        }
        self.latest[stream] = f.meta.seq;
        let len = self.reservoir_len();
        let (candidate, event) = self.admission.observe(
            f.meta.stream,
            f.meta.seq,
            f.frame_score,
            self.clean_limit,
            alarm,
            len,
        );
        if paired && f.frame_score.is_finite() {
            let mut slot = self
                .pool
                .pop()
                .unwrap_or_else(|| vec![0.0; self.buf.len()].into_boxed_slice());
            slot.copy_from_slice(&self.buf);
            self.pending[stream].push_back((f.meta, slot, candidate));
        }
        self.release(stream);
        if f.meta.seq >= self.hold_until
            && let Some(trigger) = self.deferred.take()
        {
            self.request(&trigger, f.meta.seq);
        }
        let trigger = match event {
            Some(AdmissionEvent::Adopted { stream }) => {
                self.shared
                    .counters
                    .adoptions
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    stream,
                    "a sustained change is adopted as the new normal; retraining on it"
                );
                Some("adoption".to_string())
            }
            Some(AdmissionEvent::Retrain(trigger)) => Some(trigger),
            None => None,
        };
        match trigger {
            Some(t) if f.meta.seq < self.hold_until => self.deferred = Some(t),
            Some(t) => self.request(&t, f.meta.seq),
            None => {}
        }
    }

    /// Stream `stream` was forgotten (its index may go to another stream): its frames
    /// still waiting for their guard are dropped unlearned, and its admission state goes.
    pub fn forget(&mut self, stream: usize) {
        if let Some(queue) = self.pending.get_mut(stream) {
            self.pool
                .extend(queue.drain(..).map(|(_, values, _)| values));
            self.latest[stream] = 0;
        }
        self.admission.forget(stream);
    }

    fn reservoir_len(&self) -> usize {
        self.shared.reservoir.lock().map_or(0, |r| r.clean_len())
    }

    /// Moves `stream`'s candidates whose guard has passed into the reservoir (or drops
    /// them), oldest first. A stream holds at most [`MAX_PENDING`] of them, past which its
    /// oldest are dropped unlearned.
    fn release(&mut self, stream: usize) {
        let now = self.latest[stream];
        let queue = &mut self.pending[stream];
        while let Some((meta, _, _)) = queue.front() {
            let admit = match self.admission.release(meta.stream, meta.seq, now) {
                Some(admit) => admit,
                None if queue.len() > MAX_PENDING => false,
                None => break,
            };
            let (meta, values, clean) = queue.pop_front().expect("front exists");
            if admit && let Ok(mut r) = self.shared.reservoir.lock() {
                r.offer(meta.seq, &values, clean);
                self.shared
                    .counters
                    .admitted
                    .fetch_add(1, Ordering::Relaxed);
            }
            self.pool.push(values);
        }
    }

    /// Asks for a retrain on behalf of frame `seq`. In a replay, the trainer learns the
    /// reservoir as it is now, and the scorer switches to the outcome at `seq + swap_lag`
    /// exactly.
    fn request(&mut self, trigger: &str, seq: u64) {
        let mut snapshot = None;
        if let Some(lag) = self.swap_lag {
            snapshot = self.shared.reservoir.lock().ok().map(|r| r.snapshot());
            // busy before the swap point: a scorer that sees the point also sees busy.
            self.shared.busy.store(true, Ordering::Release);
            self.hold_until = seq.saturating_add(lag);
            self.shared
                .swap_at
                .store(self.hold_until, Ordering::Release);
        }
        let sent = self.requests.send(Request {
            trigger: trigger.to_string(),
            snapshot,
        });
        if sent.is_err() {
            self.shared.busy.store(false, Ordering::Release);
        }
    }
}

/// What a run's online retraining did.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrainSummary {
    pub accepted: u64,
    pub rejected: u64,
    pub failed: u64,
    pub adoptions: u64,
    /// Frames that entered the reservoir.
    pub admitted: u64,
    /// The version scoring at the end.
    pub final_version: u64,
    pub history: Vec<HistoryEntry>,
    /// Sequence numbers of the frames in the reservoir at the end.
    pub reservoir_seqs: Vec<u64>,
}

impl Shared {
    /// The summary of this run so far.
    pub fn summary(&self) -> RetrainSummary {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RetrainSummary {
            accepted: get(&c.accepted),
            rejected: get(&c.rejected),
            failed: get(&c.failed),
            adoptions: get(&c.adoptions),
            admitted: get(&c.admitted),
            final_version: get(&c.version),
            history: self.history.lock().map(|h| h.clone()).unwrap_or_default(),
            reservoir_seqs: self
                .reservoir
                .lock()
                .map(|r| r.seqs().collect())
                .unwrap_or_default(),
        }
    }
}

impl std::fmt::Display for RetrainSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "retrain     {} accepted, {} rejected, {} failed, {} adoptions; {} frames admitted; now version {}",
            self.accepted,
            self.rejected,
            self.failed,
            self.adoptions,
            self.admitted,
            self.final_version
        )?;
        for h in &self.history {
            writeln!(f, "  {h}")?;
        }
        Ok(())
    }
}

/// `darkwatch inspect STATE_DIR`: the checkpoints (newest first, whether each loads) and
/// the retrain history.
pub fn describe_state(dir: &Path) -> String {
    use std::fmt::Write as _;
    let store = CheckpointStore::new(dir, usize::MAX);
    let mut s = String::new();
    let _ = writeln!(s, "state      {}", dir.display());
    let list = store.list();
    if list.is_empty() {
        let _ = writeln!(s, "checkpoints none");
    }
    for (version, path) in &list {
        match Model::load(path) {
            Ok(m) => {
                let _ = writeln!(
                    s,
                    "checkpoint v{version:<5} {}  model {}  {} rows, {:.2} s",
                    path.display(),
                    m.meta.id,
                    m.meta.provenance.rows,
                    m.meta.provenance.train_seconds
                );
            }
            Err(e) => {
                let _ = writeln!(
                    s,
                    "checkpoint v{version:<5} {}  BROKEN: {e}",
                    path.display()
                );
            }
        }
    }
    let History {
        entries: history,
        unreadable,
    } = store.read_history();
    let accepted = history.iter().filter(|h| h.gate.accepted).count();
    let _ = write!(
        s,
        "history    {} retrains: {accepted} accepted, {} rejected",
        history.len(),
        history.len() - accepted
    );
    if unreadable.is_empty() {
        let _ = writeln!(s);
    } else {
        let _ = writeln!(s, "; {} unreadable lines", unreadable.len());
    }
    for h in &history {
        let _ = writeln!(s, "  unix {} {h}", h.unix_secs);
    }
    for (line, why) in &unreadable {
        let _ = writeln!(s, "  UNREADABLE line {line}: {why}");
    }
    s
}

/// [`describe_state`] as JSON (`inspect STATE_DIR --json`): the folder, the model the chain
/// descends from, every checkpoint (its version and folder, and its model id, rows and fit
/// time, or why it does not load) and the history's entries as written.
pub fn describe_state_json(dir: &Path) -> serde_json::Value {
    let store = CheckpointStore::new(dir, usize::MAX);
    let checkpoints: Vec<serde_json::Value> = store
        .list()
        .iter()
        .map(|(version, path)| match Model::load(path) {
            Ok(m) => serde_json::json!({
                "version": version,
                "path": path,
                "model_id": m.meta.id,
                "rows": m.meta.provenance.rows,
                "train_seconds": m.meta.provenance.train_seconds,
            }),
            Err(e) => serde_json::json!({
                "version": version,
                "path": path,
                "error": e.to_string(),
            }),
        })
        .collect();
    let history = store.read_history();
    let unreadable: Vec<serde_json::Value> = history
        .unreadable
        .iter()
        .map(|(line, why)| serde_json::json!({ "line": line, "error": why }))
        .collect();
    serde_json::json!({
        "kind": "retrain_state",
        "state_dir": dir,
        "origin": store.origin(),
        "checkpoints": checkpoints,
        "history": history.entries,
        "history_unreadable": unreadable,
    })
}

/// The model to start from: the newest valid checkpoint in `[retrain] state_dir` when
/// retraining is on and one exists for the same features, else `model`.
///
/// # Errors
/// The state directory cannot be made or written ([`CheckpointStore::ensure_usable`]):
/// retraining would run and lose every checkpoint.
pub fn resume(model: Model, cfg: &RetrainConfig) -> Result<Model, ModelError> {
    if !cfg.enabled || cfg.state_dir.as_os_str().is_empty() {
        return Ok(model);
    }
    let store = CheckpointStore::new(&cfg.state_dir, cfg.keep_checkpoints);
    store.ensure_usable().map_err(|e| ModelError::StateDir {
        path: cfg.state_dir.clone(),
        reason: match e {
            RetrainError::Io { source, .. } => source.to_string(),
            other => other.to_string(),
        },
    })?;
    let newest = store.newest_valid().0;
    let Some((path, m)) = newest else {
        // A fresh chain: its checkpoints will descend from this model.
        store.set_origin(&model.meta.id);
        return Ok(model);
    };
    // Checkpoints of another model directory's model (same features or not) never stand in
    // for the one configured. State directories written before the origin was recorded
    // only have the features to go by. Such a chain is set aside, not deleted, so that the
    // configured model's own checkpoints neither mix with it nor get pruned by it.
    let origin = store.origin();
    let foreign = match &origin {
        Some(o) => *o != model.meta.id,
        None => m.meta.features != model.meta.features,
    };
    if foreign {
        let of = origin.unwrap_or_else(|| m.meta.id.clone());
        match store.set_aside(&of) {
            Ok(aside) => {
                tracing::warn!(path = %path.display(), checkpoints_of = %of, configured = %model.meta.id, moved_to = %aside.display(),
                "the checkpoints in the state directory continue another model; set them aside and starting from the model directory")
            }
            Err(e) => tracing::warn!(path = %path.display(), checkpoints_of = %of, error = %e,
                "the checkpoints in the state directory continue another model and could not be set aside; starting from the model directory (give it its own [retrain] state_dir)"),
        }
        store.set_origin(&model.meta.id);
        return Ok(model);
    }
    if origin.is_none() {
        // An older state directory: from now on its chain is this model's.
        store.set_origin(&model.meta.id);
    }
    tracing::info!(path = %path.display(), version = m.meta.version, model = %m.meta.id,
        "resuming from the newest valid checkpoint");
    Ok(Model {
        onnx: model.onnx.clone(),
        ..m
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reasons reach history.jsonl, `inspect` and the log: one space between words (a
    /// lost line continuation once left runs of 14 spaces in them).
    #[test]
    fn uncalibrated_reasons_have_no_runs_of_spaces() {
        use crate::threshold::{ThresholdConfig, ThresholdError};
        let cfg = RetrainConfig::default();
        let threshold = ThresholdConfig::default();
        let too_few = ThresholdError::TooFewScores {
            kind: "spot",
            needed: 100,
            finite: 10,
            given: 10,
        };
        let constant = ThresholdError::ConstantScores {
            kind: "spot",
            what: "scores",
            value: 1.0,
            count: 10,
        };
        for error in [Some(&too_few), Some(&constant), None] {
            let reason = uncalibrated_reason(error, 10, &cfg, &threshold);
            assert!(!reason.contains("  "), "{reason:?}");
            assert!(reason.contains("held-out rows"), "{reason:?}");
        }
        let reason = uncalibrated_reason(Some(&too_few), 10, &cfg, &threshold);
        assert!(
            reason.contains("): raise [retrain] min_frames"),
            "{reason:?}"
        );
        let reason = uncalibrated_reason(Some(&constant), 10, &cfg, &threshold);
        assert!(
            reason.contains("this mends itself once they do"),
            "{reason:?}"
        );
    }

    #[test]
    fn reservoir_is_bounded_and_ages_out_old_frames() {
        let mut r = Reservoir::new(2, 100, 1000, 1);
        for i in 0..10_000u64 {
            r.offer(i, &[i as f32, 0.0], true);
        }
        assert_eq!(r.len(), 100);
        assert_eq!(r.admitted(), 10_000);
        // Everything held comes from the last horizon (1000 admitted frames).
        assert!(r.seqs().all(|s| s >= 9_000), "{:?}", r.seqs().min());
        let (snap, clean) = r.snapshot();
        assert_eq!(snap.dim(), (100, 2));
        assert_eq!(clean.len(), 100);
        // Wrong width is ignored.
        r.offer(1, &[1.0], true);
        assert_eq!(r.admitted(), 10_000);
    }

    #[test]
    fn reservoir_sample_spreads_over_the_horizon() {
        let mut r = Reservoir::new(1, 200, 2000, 7);
        for i in 0..2000u64 {
            r.offer(i, &[0.0], i % 2 == 0);
        }
        let early = r.seqs().filter(|&s| s < 1000).count();
        assert!(
            (60..=140).contains(&early),
            "{early} of 200 from the first half"
        );
        // The clean flags travel with their frames.
        let (_, clean) = r.snapshot();
        let seqs: Vec<u64> = r.seqs().collect();
        assert!(seqs.iter().zip(&clean).all(|(s, &c)| c == (s % 2 == 0)));
        assert_eq!(r.clean_len(), clean.iter().filter(|&&c| c).count());
    }

    fn cfg() -> RetrainConfig {
        RetrainConfig {
            guard_frames: 3,
            clean_quantile: 0.9,
            adopt_after_frames: 0,
            every_frames: 0,
            every_secs: 0,
            ..RetrainConfig::default()
        }
    }

    /// Fine-tuning an ensemble trains its members together but keeps them apart, and
    /// rebuilds the per-member variance baseline.
    #[test]
    fn an_ensemble_is_refitted_member_by_member() {
        let base = crate::model::fit::synthetic(6, 1);
        let ae = crate::model::Autoencoder::ensemble(6, &[3], base.ae.output, 3, 1);
        let mut current = Model::new(ae, base.meta.clone(), None);
        // Medians and maxima per member (3·6 each), then the 6 spreads, which a refit keeps.
        let spreads = [-0.5f32, -0.4, -0.3, -0.2, -0.1, 0.1];
        current.meta.log_variance_baseline = vec![0.0; 2 * 18];
        current.meta.log_variance_baseline.extend(spreads);
        let mut rng = Rng::new(9);
        let rows = Array2::from_shape_simple_fn((600, 6), || rng.uniform(-1.0, 1.0));
        let c = RetrainConfig {
            min_frames: 100,
            epochs: 3,
            ..cfg()
        };
        let cand = refit(&current, rows.view(), &[true; 600], &c, 4, None).unwrap();
        let ae = &cand.model.ae;
        assert_eq!(ae.members, 3);
        ae.check_shapes().unwrap();
        assert_ne!(ae.layers, current.ae.layers, "the weights moved");
        let baseline = &cand.model.meta.log_variance_baseline;
        assert_eq!(baseline.len(), 2 * 18 + 6);
        assert_eq!(baseline[36..], spreads);
        assert_eq!(cand.model.meta.architecture.members, 3);
    }

    /// The gate accepts a candidate that explains held-out rows better, rejects one whose
    /// held-out loss is beyond the current's plus `gate_tolerance` (naming both losses),
    /// and accepts that same one under a tolerance wide enough to cover it.
    #[test]
    fn the_gate_rejects_a_candidate_worse_than_its_tolerance() {
        let current = crate::model::fit::synthetic(6, 1);
        let mut rng = Rng::new(5);
        // A low-dimensional signal: every feature a mix of two sources, plus a little noise.
        let rows = Array2::from_shape_fn((800, 6), |(_, j)| j as f32 * 0.1)
            + &Array2::from_shape_simple_fn((800, 2), || rng.uniform(-1.0, 1.0)).dot(
                &Array2::from_shape_fn((2, 6), |(i, j)| ((i * 6 + j) as f32 * 0.7).sin()),
            )
            + &Array2::from_shape_simple_fn((800, 6), || rng.uniform(-0.05, 0.05));
        let c = RetrainConfig {
            min_frames: 100,
            epochs: 5,
            ..cfg()
        };
        let th = crate::threshold::ThresholdConfig::default();
        let better = refit(&current, rows.view(), &[true; 800], &c, 4, None).unwrap();
        let verdict = gate(&current, &better, &c, &th);
        assert!(verdict.accepted, "{}", verdict.reason);
        assert!(
            verdict.candidate_loss < verdict.current_loss,
            "{}",
            verdict.reason
        );

        // The fine-tuned model with its output layer's weights tripled: its threshold still
        // calibrates (the stored scores), so only its loss can fail it.
        let mut damaged = better.model.clone();
        let last = damaged.ae.layers.last_mut().unwrap();
        last.w.mapv_inplace(|w| 3.0 * w);
        let worse = Candidate {
            model: damaged,
            holdout: better.holdout.clone(),
            rows_train: 0,
            seconds: 0.0,
        };
        let verdict = gate(&better.model, &worse, &c, &th);
        assert!(!verdict.accepted, "{}", verdict.reason);
        assert!(
            verdict.reason.contains("is worse than the current"),
            "{}",
            verdict.reason
        );
        let allowed = verdict.current_loss + c.gate_tolerance * verdict.current_loss.abs().max(1.0);
        assert!(verdict.candidate_loss > allowed, "{verdict:?}");
        let wide = RetrainConfig {
            gate_tolerance: 1e6,
            ..c.clone()
        };
        assert!(gate(&better.model, &worse, &wide, &th).accepted);
    }

    #[test]
    fn admission_keeps_frames_around_alarms_out() {
        let mut a = Admission::new(&cfg());
        let mut released = Vec::new();
        for seq in 0..20u64 {
            let alarm = seq == 10;
            a.observe(0, seq, if alarm { 100.0 } else { 1.0 }, 5.0, alarm, 0);
        }
        for seq in 20..100u64 {
            a.observe(0, seq, 1.0, 5.0, false, 0);
            // As the sink does: decide each frame once its guard and the elevation window
            // (64 frames) have passed.
            if seq >= 67 {
                let frame = seq - 67;
                if a.release(0, frame, seq) == Some(true) {
                    released.push(frame);
                }
            }
        }
        // Frames within 3 of the alarm at 10 are refused, the others released.
        let expected: Vec<u64> = (0..=32).filter(|s| !(7..=13).contains(s)).collect();
        assert_eq!(released, expected);
        // Not yet decidable: its guard has not passed.
        assert_eq!(a.release(0, 90, 99), None);
        // Another stream is independent.
        a.observe(1, 0, 1.0, 5.0, false, 0);
        assert_eq!(a.release(1, 0, 67), Some(true));
        // High scores are not candidates.
        let (c, _) = a.observe(0, 20, 6.0, 5.0, false, 0);
        assert!(!c);
    }

    #[test]
    fn an_elevated_stretch_below_the_threshold_is_not_learned() {
        // Frames 200..300 score above the clean limit but never alarm.
        let mut a = Admission::new(&cfg());
        let mut released = Vec::new();
        for seq in 0..500u64 {
            let score = if (200..300).contains(&seq) { 6.0 } else { 1.0 };
            a.observe(0, seq, score, 5.0, false, 0);
            if seq >= 67 && a.release(0, seq - 67, seq) == Some(true) {
                released.push(seq - 67);
            }
        }
        // None of the stretch, nor the guard before it, nor anything up to the guard after.
        assert!(released.iter().all(|s| !(197..=303).contains(s)));
        assert!(released.contains(&150) && released.contains(&400));
    }

    #[test]
    fn a_sustained_change_is_adopted_and_a_short_one_is_not() {
        let mut c = cfg();
        c.adopt_after_frames = 100;
        let mut a = Admission::new(&c);
        let mut adopted_at = None;
        // 80 high frames: not adopted; then normal; then 150 high frames: adopted at 100.
        let scores: Vec<f32> = (0..80)
            .map(|_| 10.0)
            .chain((0..50).map(|_| 1.0))
            .chain((0..150).map(|_| 10.0))
            .collect();
        for (seq, &s) in scores.iter().enumerate() {
            let (_, ev) = a.observe(0, seq as u64, s, 5.0, s > 5.0, 0);
            if let Some(AdmissionEvent::Adopted { stream: 0 }) = ev {
                adopted_at.get_or_insert(seq);
            }
        }
        assert_eq!(adopted_at, Some(80 + 50 + 99));
        // Adopted: alarms no longer block the stream's frames.
        assert_eq!(a.release(0, 200, 279), Some(true));
        a.model_changed();
        assert_eq!(a.release(0, 201, 279), Some(false));
    }

    #[test]
    fn retrain_requests_follow_the_schedule_and_need_enough_frames() {
        let mut c = cfg();
        c.every_frames = 10;
        c.min_frames = 100;
        let mut a = Admission::new(&c);
        let mut asked = Vec::new();
        for seq in 0..40u64 {
            let len = if seq < 15 { 50 } else { 150 + seq as usize };
            if let (_, Some(AdmissionEvent::Retrain(_))) = a.observe(0, seq, 1.0, 5.0, false, len) {
                asked.push(seq);
            }
        }
        assert_eq!(asked, vec![15, 25, 35]);
    }
}
