//! Training: Adam on shuffled mini-batches, a held-out validation split and early stopping.
//!
//! Fed scaled frames (by the trainer thread or the `train` command) and an initialised
//! [`Autoencoder`]; fits its weights in place with [`Autoencoder::loss_and_grad`] and returns a
//! [`TrainReport`], which the model directory stores as training provenance. There are no labels
//! here: early stopping watches the validation loss only.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use ndarray::{Array2, ArrayView2, Axis, Zip, s};
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use crate::model::nn::{Gradients, TrainWorkspace};
use crate::model::{Autoencoder, Dense};
use crate::rng::Rng;

/// Adam's first-moment decay.
const BETA1: f64 = 0.9;
/// Adam's second-moment decay.
const BETA2: f64 = 0.999;
/// Adam's denominator guard.
const ADAM_EPS: f32 = 1e-8;

/// How to train an autoencoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Most passes over the training rows (at least 1). Early stopping
    /// (`patience_epochs`) ends sooner only once the validation loss stops improving; on
    /// long, smooth series it often runs all of them, and `train` then notes that the
    /// validation loss was still falling ([`TrainReport::still_falling_note`]).
    pub epochs_max: usize,
    /// Rows per Adam step (at least 1); an epoch's last batch may be smaller.
    pub batch_size: usize,
    /// Adam's step size (positive).
    pub learning_rate: f64,
    /// Share of the rows held out, by a seeded draw before training, to measure the validation
    /// loss, in [0, 0.5]. The held-out rows also calibrate the threshold, so `[train]` (the
    /// `train` and `harness` commands) takes (0, 0.5] only ([`crate::config`] refuses 0, and
    /// so does [`crate::model::fit::fit`]). 0 is for callers that hold out rows of their own
    /// (online retraining does): every row trains, every epoch runs and the last weights are
    /// kept.
    pub validation_fraction: f64,
    /// Stop after this many epochs in a row without a validation-loss improvement of at least
    /// `min_improvement` (at least 1; set it to `epochs_max` or more to never stop early).
    pub patience_epochs: usize,
    /// Relative drop of the validation loss, against the last loss that counted, that resets the
    /// patience: 1e-4 means 0.01 % (≥ 0).
    pub min_improvement: f64,
    /// Seed of the validation split and of each epoch's shuffle.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs_max: 200,
            batch_size: 256,
            learning_rate: 1e-3,
            validation_fraction: 0.1,
            patience_epochs: 10,
            min_improvement: 1e-4,
            seed: 0,
        }
    }
}

impl TrainConfig {
    /// Checks every value.
    ///
    /// # Errors
    /// The first offending key and why it is wrong.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.epochs_max == 0 {
            return Err(("epochs_max", "must be at least 1".into()));
        }
        if self.batch_size == 0 {
            return Err(("batch_size", "must be at least 1".into()));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err((
                "learning_rate",
                format!("must be a positive number, not {}", self.learning_rate),
            ));
        }
        if !(0.0..=0.5).contains(&self.validation_fraction) {
            return Err((
                "validation_fraction",
                format!("must lie in [0, 0.5], not {}", self.validation_fraction),
            ));
        }
        if self.patience_epochs == 0 {
            return Err((
                "patience_epochs",
                "must be at least 1 (set it to epochs_max or more to never stop early)".into(),
            ));
        }
        if !(self.min_improvement.is_finite() && self.min_improvement >= 0.0) {
            return Err((
                "min_improvement",
                format!("must be a finite number ≥ 0, not {}", self.min_improvement),
            ));
        }
        Ok(())
    }
}

/// What one finished epoch reports to the caller's callback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    /// 1-based.
    pub epoch: usize,
    /// The configured upper bound (the run may stop earlier).
    pub epochs_max: usize,
    /// Mean training loss over the epoch's batches (weighted by batch size).
    pub train_loss: f64,
    /// Loss on the held-out rows after the epoch; `None` without validation.
    pub val_loss: Option<f64>,
    /// Which ensemble member trains (1-based), and of how many (see
    /// [`crate::model::Autoencoder`]); 1 of 1 for a single network.
    pub member: usize,
    pub members: usize,
}

/// Epoch lines for a log that is no terminal (a pipe, a CI log, journald), where the
/// `train` command's progress bar draws nothing: the first epoch, then at most one line per
/// `every`, then (from [`Self::finish`]) the last epoch if its line was not due. A run of
/// minutes thus shows that it moves, and a fast one prints two lines, not hundreds.
#[derive(Debug, Clone)]
pub struct EpochLog {
    every: std::time::Duration,
    last_printed: Option<std::time::Duration>,
    /// The newest epoch's line while it is unprinted, with its member.
    pending: Option<(usize, String)>,
}

impl EpochLog {
    /// A log that prints at most one epoch line per `every` (after the first).
    pub fn new(every: std::time::Duration) -> Self {
        EpochLog {
            every,
            last_printed: None,
            pending: None,
        }
    }

    /// The lines due after epoch `e`, finished `elapsed` after training began: its own
    /// line when one is due, and first, when `e` is the first epoch of another ensemble
    /// member, the previous member's last epoch if it was held back (so each member's end
    /// is logged: members train one after another, often within one interval).
    pub fn epoch(&mut self, e: &EpochReport, elapsed: std::time::Duration) -> Vec<String> {
        let member = if e.members > 1 {
            format!(" (member {} of {})", e.member, e.members)
        } else {
            String::new()
        };
        let val = e
            .val_loss
            .map_or_else(String::new, |v| format!(", validation loss {v:.4}"));
        let line = format!(
            "epoch {}/{}{member}: train loss {:.4}{val}, {:.1} s",
            e.epoch,
            e.epochs_max,
            e.train_loss,
            elapsed.as_secs_f64()
        );
        let mut lines = Vec::new();
        let new_member = self.pending.as_ref().is_some_and(|(m, _)| *m != e.member);
        if new_member && let Some((_, previous)) = self.pending.take() {
            lines.push(previous);
        }
        let due = new_member
            || self
                .last_printed
                .is_none_or(|t| elapsed.saturating_sub(t) >= self.every);
        if due {
            self.last_printed = Some(elapsed);
            self.pending = None;
            lines.push(line);
        } else {
            self.pending = Some((e.member, line));
        }
        lines
    }

    /// The last epoch's line, when [`Self::epoch`] held it back.
    pub fn finish(&mut self) -> Option<String> {
        self.pending.take().map(|(_, line)| line)
    }
}

/// How a training run went; stored in the model's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// Epochs completed.
    pub epochs_run: usize,
    /// 1-based epoch whose weights the model holds: the lowest validation loss, or the last
    /// epoch without validation.
    pub best_epoch: usize,
    /// Validation loss of `best_epoch`; `None` without validation.
    pub best_val_loss: Option<f64>,
    /// One per epoch run.
    pub train_losses: Vec<f64>,
    /// One per epoch run; empty without validation.
    pub val_losses: Vec<f64>,
    /// Whether patience ran out before `epochs_max`.
    pub stopped_early: bool,
    /// Rows trained on.
    pub rows_train: usize,
    /// Rows held out for validation.
    pub rows_val: usize,
    /// Indices (into the training matrix, ascending) of the held-out rows, for
    /// calibration on rows the weights never saw.
    #[serde(skip)]
    pub validation_rows: Vec<usize>,
    /// Ensemble members (1-based) whose validation loss was still falling when `epochs_max`
    /// ended their training (see [`TrainReport::still_falling`]); filled by
    /// [`crate::model::fit::fit`]; empty when every member stopped in time.
    #[serde(skip)]
    pub members_still_falling: Vec<usize>,
}

impl TrainReport {
    /// True when training ran out of epochs while the validation loss was still at its
    /// lowest: more epochs would likely have fitted better.
    pub fn still_falling(&self, epochs_max: usize) -> bool {
        self.best_val_loss.is_some()
            && !self.stopped_early
            && self.epochs_run == epochs_max
            && self.best_epoch == self.epochs_run
    }

    /// One line for `train` to print when [`TrainReport::members_still_falling`] is not
    /// empty: which of the model's `members` networks ran out of epochs while improving.
    pub fn still_falling_note(&self, members: usize, epochs_max: usize) -> Option<String> {
        let falling = &self.members_still_falling;
        let advice = "a larger [train] epochs_max may fit better";
        match falling.len() {
            0 => None,
            _ if members <= 1 => Some(format!(
                "validation loss was still falling at epoch {epochs_max}; {advice}"
            )),
            n => {
                let which: Vec<String> = falling.iter().map(usize::to_string).collect();
                Some(format!(
                    "validation loss of {n} of {members} ensemble members ({}) was still falling at epoch {epochs_max}; {advice}",
                    which.join(", ")
                ))
            }
        }
    }
}

/// Why training could not run or finish. On any error the model keeps the weights it came with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TrainError {
    #[error(
        "too few rows to train: got {rows}, need at least {needed} \
         (validation_fraction {validation_fraction} must leave a validation row and a training row)"
    )]
    TooFewRows {
        rows: usize,
        needed: usize,
        validation_fraction: f64,
    },
    #[error("training data has {got} features, the model takes {expected}")]
    FeatureMismatch { expected: usize, got: usize },
    #[error("training data holds a non-finite value at row {row}, column {col}")]
    NonFiniteInput { row: usize, col: usize },
    #[error("training diverged at epoch {epoch}: the loss is not finite")]
    Diverged { epoch: usize },
    #[error("invalid train config key `{key}`: {reason}")]
    InvalidConfig { key: &'static str, reason: String },
    /// [`train_until`]'s stop flag was raised (an agent stopping or reloading): the model
    /// is unchanged.
    #[error("stopped before it finished (the agent is stopping or reloading)")]
    Stopped,
}

/// Files of a model folder that `darkwatch train` writes or that describe the model it
/// holds: `model.json`, the weights, the temporary file of an interrupted save and the
/// ONNX graph exported from the model (`model.onnx`, or `[onnx] file` when it names a file
/// in the folder). A graph left beside a new model would be run by `--backend onnx` with
/// the new model's scaler and calibration.
pub fn model_folder_files(dir: &Path, onnx_file: &str) -> Vec<PathBuf> {
    let mut names = vec![
        crate::model::io::META_FILE.to_string(),
        crate::model::io::WEIGHTS_FILE.to_string(),
        "model.tmp".to_string(),
        "model.onnx".to_string(),
    ];
    let bare = Path::new(onnx_file);
    if bare.components().count() == 1
        && bare.extension().is_some_and(|e| e == "onnx")
        && !names.iter().any(|n| n == onnx_file)
    {
        names.push(onnx_file.to_string());
    }
    names
        .iter()
        .map(|n| dir.join(n))
        .filter(|p| p.symlink_metadata().is_ok())
        .collect()
}

/// Why `darkwatch train` will not write into its `--out` folder.
#[derive(Debug, thiserror::Error)]
pub enum OutFolderError {
    #[error(
        "{}: holds a model already ({}); train does not overwrite one: choose another --out folder, or give --force to replace it (its ONNX graph is removed too: export the new model's with tools/export_onnx.py)",
        .dir.display(),
        .files.join(", ")
    )]
    HoldsModel { dir: PathBuf, files: Vec<String> },
    #[error("{}: cannot remove the old model's file: {source}", .path.display())]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Checks `train --out dir` before training: a folder holding a model (any of
/// [`model_folder_files`]) is refused unless `force`. Returns the files found, for
/// [`clear_model_folder`] once training has succeeded.
///
/// # Errors
/// [`OutFolderError::HoldsModel`] when the folder holds a model and `force` is false.
pub fn check_model_folder(
    dir: &Path,
    onnx_file: &str,
    force: bool,
) -> Result<Vec<PathBuf>, OutFolderError> {
    let found = model_folder_files(dir, onnx_file);
    if !found.is_empty() && !force {
        return Err(OutFolderError::HoldsModel {
            dir: dir.to_path_buf(),
            files: found
                .iter()
                .filter_map(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .collect(),
        });
    }
    Ok(found)
}

/// Removes the old model's files that the new one does not overwrite (its ONNX graph, a
/// temporary file), before the new model is saved; `model.json` and the weights are
/// replaced by the save itself, each atomically.
///
/// # Errors
/// A file that cannot be removed.
pub fn clear_model_folder(found: &[PathBuf]) -> Result<Vec<PathBuf>, OutFolderError> {
    let kept = [crate::model::io::META_FILE, crate::model::io::WEIGHTS_FILE];
    let mut removed = Vec::new();
    for path in found {
        if path
            .file_name()
            .is_some_and(|n| kept.iter().any(|k| n == *k))
        {
            continue;
        }
        match std::fs::remove_file(path) {
            Ok(()) => removed.push(path.clone()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(OutFolderError::Remove {
                    path: path.clone(),
                    source,
                });
            }
        }
    }
    Ok(removed)
}

/// Trains `model` in place on `x` (`[rows, n_features]`, already scaled).
///
/// A seeded `validation_fraction` of the rows is held out first. Each epoch shuffles the
/// training rows (seeded), takes one Adam step per mini-batch, then measures the validation
/// loss; training stops once `patience_epochs` epochs pass without a relative improvement of
/// `min_improvement`, and the weights of the lowest validation loss are restored. Without
/// validation every epoch runs and the last weights stay. `on_epoch` hears about each epoch.
/// The same seed, data, config and starting model give bit-identical weights.
///
/// # Errors
/// An invalid config, a feature-count mismatch, non-finite input, too few rows for the split,
/// or a loss that stops being finite ([`TrainError::Diverged`]). The model is then unchanged.
pub fn train(
    model: &mut Autoencoder,
    x: ArrayView2<f32>,
    cfg: &TrainConfig,
    on_epoch: &mut dyn FnMut(&EpochReport),
) -> Result<TrainReport, TrainError> {
    train_member(model, x, cfg, 0, on_epoch)
}

/// [`train`] that gives up, leaving the model unchanged, once `stop` is raised: it looks
/// before every mini-batch, so an online retrain on a starved low-priority thread ends
/// within one batch of an agent's stop instead of holding the stop for the whole retrain.
///
/// # Errors
/// As [`train`], and [`TrainError::Stopped`].
pub fn train_until(
    model: &mut Autoencoder,
    x: ArrayView2<f32>,
    cfg: &TrainConfig,
    stop: &AtomicBool,
    on_epoch: &mut dyn FnMut(&EpochReport),
) -> Result<TrainReport, TrainError> {
    train_inner(model, x, cfg, 0, Some(stop), on_epoch)
}

/// [`train`] for member `member` of an ensemble: the same validation split (drawn from
/// `cfg.seed`), but from member 1 on, epochs shuffled by a generator of its own (seeded
/// [`crate::rng::member_seed`]`(cfg.seed, member, 1)`), so members differ in the order they
/// see the rows and in when they stop, not only in their initial weights. Member 0 trains
/// exactly as [`train`] does.
///
/// # Errors
/// As [`train`].
pub fn train_member(
    model: &mut Autoencoder,
    x: ArrayView2<f32>,
    cfg: &TrainConfig,
    member: u64,
    on_epoch: &mut dyn FnMut(&EpochReport),
) -> Result<TrainReport, TrainError> {
    train_inner(model, x, cfg, member, None, on_epoch)
}

fn train_inner(
    model: &mut Autoencoder,
    x: ArrayView2<f32>,
    cfg: &TrainConfig,
    member: u64,
    stop: Option<&AtomicBool>,
    on_epoch: &mut dyn FnMut(&EpochReport),
) -> Result<TrainReport, TrainError> {
    cfg.validate()
        .map_err(|(key, reason)| TrainError::InvalidConfig { key, reason })?;
    if x.ncols() != model.n_features {
        return Err(TrainError::FeatureMismatch {
            expected: model.n_features,
            got: x.ncols(),
        });
    }
    if let Some(((row, col), _)) = x.indexed_iter().find(|(_, v)| !v.is_finite()) {
        return Err(TrainError::NonFiniteInput { row, col });
    }
    let needed = rows_needed(cfg.validation_fraction);
    if x.nrows() < needed {
        return Err(TrainError::TooFewRows {
            rows: x.nrows(),
            needed,
            validation_fraction: cfg.validation_fraction,
        });
    }

    let mut rng = Rng::new(cfg.seed);
    let (train_idx, val_idx) = split(x.nrows(), cfg.validation_fraction, &mut rng);
    let x_train = x.select(Axis(0), &train_idx);
    let x_val = x.select(Axis(0), &val_idx);
    let (n_train, n_val) = (train_idx.len(), val_idx.len());
    debug!(rows_train = n_train, rows_val = n_val, "Training starts.");

    if member > 0 {
        rng = Rng::new(crate::rng::member_seed(cfg.seed, member, 1));
    }
    let initial = model.layers.clone();
    let result = fit(
        model,
        x_train.view(),
        x_val.view(),
        cfg,
        &mut rng,
        stop,
        on_epoch,
    );
    match result {
        Ok(mut report) => {
            report.validation_rows = val_idx;
            Ok(report)
        }
        Err(e) => {
            model.layers = initial;
            Err(e)
        }
    }
}

/// The epoch loop of [`train`], on rows already split.
fn fit(
    model: &mut Autoencoder,
    x_train: ArrayView2<f32>,
    x_val: ArrayView2<f32>,
    cfg: &TrainConfig,
    rng: &mut Rng,
    stop: Option<&AtomicBool>,
    on_epoch: &mut dyn FnMut(&EpochReport),
) -> Result<TrainReport, TrainError> {
    let (n_train, n_val, d) = (x_train.nrows(), x_val.nrows(), model.n_features);
    let batch = cfg.batch_size.min(n_train);
    let mut order: Vec<usize> = (0..n_train).collect();
    let mut xb = Array2::<f32>::zeros((batch, d));
    let mut tws: TrainWorkspace = model.train_workspace(batch);
    let mut grads = Gradients::zeros(model);
    let mut adam = Adam::new(model, cfg.learning_rate);
    let mut val_ws = model.workspace(256.min(n_val.max(1)));

    let mut report = TrainReport {
        epochs_run: 0,
        best_epoch: 0,
        best_val_loss: None,
        train_losses: Vec::new(),
        val_losses: Vec::new(),
        stopped_early: false,
        rows_train: n_train,
        rows_val: n_val,
        validation_rows: Vec::new(),
        members_still_falling: Vec::new(),
    };
    let mut best: Option<(f64, Vec<Dense>)> = None;
    // Validation loss at the last improvement that counted, and epochs since.
    let mut reference = f64::INFINITY;
    let mut stale = 0;

    for epoch in 1..=cfg.epochs_max {
        rng.shuffle(&mut order);
        let mut total = 0.0;
        for chunk in order.chunks(batch) {
            if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
                return Err(TrainError::Stopped);
            }
            let mut xb = xb.slice_mut(s![..chunk.len(), ..]);
            for (mut row, &i) in xb.rows_mut().into_iter().zip(chunk) {
                row.assign(&x_train.row(i));
            }
            let loss = model.loss_and_grad(xb.view(), &mut tws, &mut grads);
            if !loss.is_finite() {
                return Err(TrainError::Diverged { epoch });
            }
            total += loss * chunk.len() as f64;
            adam.step(model, &grads);
        }
        let train_loss = total / n_train as f64;
        let val_loss = (n_val > 0).then(|| model.loss(x_val, &mut val_ws));
        if val_loss.is_some_and(|v| !v.is_finite()) {
            return Err(TrainError::Diverged { epoch });
        }
        report.epochs_run = epoch;
        report.train_losses.push(train_loss);
        debug!(epoch, train_loss, val_loss, "Epoch finished.");
        on_epoch(&EpochReport {
            epoch,
            epochs_max: cfg.epochs_max,
            train_loss,
            val_loss,
            member: 1,
            members: 1,
        });

        let Some(val) = val_loss else {
            report.best_epoch = epoch;
            continue;
        };
        report.val_losses.push(val);
        if best.as_ref().is_none_or(|(b, _)| val < *b) {
            best = Some((val, model.layers.clone()));
            report.best_epoch = epoch;
            report.best_val_loss = Some(val);
        }
        // The loss may be negative (NLL), so "relative" is against its magnitude.
        if reference.is_infinite()
            || (val < reference && reference - val >= cfg.min_improvement * reference.abs())
        {
            reference = val;
            stale = 0;
        } else {
            stale += 1;
            if stale >= cfg.patience_epochs && epoch < cfg.epochs_max {
                report.stopped_early = true;
                break;
            }
        }
    }
    if let Some((_, layers)) = best {
        model.layers = layers;
    }
    info!(
        epochs_run = report.epochs_run,
        best_epoch = report.best_epoch,
        best_val_loss = report.best_val_loss,
        stopped_early = report.stopped_early,
        "Training finished."
    );
    Ok(report)
}

/// Fewest rows for which the split leaves at least one validation row (when the fraction is
/// positive) and one training row.
fn rows_needed(fraction: f64) -> usize {
    if fraction <= 0.0 {
        return 1;
    }
    // Start at ⌈1/fraction⌉ and correct for rounding either way.
    let mut n = ((1.0 / fraction).ceil() as usize).max(2);
    while n_val(n, fraction) == 0 {
        n += 1;
    }
    while n > 2 && n_val(n - 1, fraction) > 0 {
        n -= 1;
    }
    n
}

/// Validation rows out of `n`.
fn n_val(n: usize, fraction: f64) -> usize {
    (n as f64 * fraction).floor() as usize
}

/// Seeded split of `0..n` into (training, validation) row indices, each in ascending order.
fn split(n: usize, fraction: f64, rng: &mut Rng) -> (Vec<usize>, Vec<usize>) {
    let mut idx: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut idx);
    let mut val = idx.split_off(n - n_val(n, fraction));
    idx.sort_unstable();
    val.sort_unstable();
    (idx, val)
}

/// Adam with bias correction, as PyTorch's `torch.optim.Adam` (no weight decay, no amsgrad).
struct Adam {
    lr: f64,
    t: i32,
    m: Gradients,
    v: Gradients,
}

impl Adam {
    fn new(model: &Autoencoder, lr: f64) -> Adam {
        Adam {
            lr,
            t: 0,
            m: Gradients::zeros(model),
            v: Gradients::zeros(model),
        }
    }

    fn step(&mut self, model: &mut Autoencoder, g: &Gradients) {
        self.t += 1;
        let bc1 = 1.0 - BETA1.powi(self.t);
        let bc2 = 1.0 - BETA2.powi(self.t);
        let step = (self.lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let (b1, b2) = (BETA1 as f32, BETA2 as f32);
        let update = |p: &mut f32, &g: &f32, m: &mut f32, v: &mut f32| {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *p -= step * *m / (v.sqrt() / bc2_sqrt + ADAM_EPS);
        };
        for (l, layer) in model.layers.iter_mut().enumerate() {
            Zip::from(&mut layer.w)
                .and(&g.w[l])
                .and(&mut self.m.w[l])
                .and(&mut self.v.w[l])
                .for_each(update);
            Zip::from(&mut layer.b)
                .and(&g.b[l])
                .and(&mut self.m.b[l])
                .and(&mut self.v.b[l])
                .for_each(update);
        }
    }
}

#[cfg(test)]
mod tests {
    use ndarray::Array2;

    use super::*;
    use crate::model::OutputKind;

    /// Rank-2 structure in `d` dimensions plus a little noise.
    fn low_rank(rows: usize, d: usize, seed: u64) -> Array2<f32> {
        let mut rng = Rng::new(seed);
        let basis = Array2::from_shape_simple_fn((2, d), || rng.uniform(-1.0, 1.0));
        let mut x = Array2::zeros((rows, d));
        for mut row in x.rows_mut() {
            let (a, b) = (rng.uniform(-2.0, 2.0), rng.uniform(-2.0, 2.0));
            for (j, v) in row.iter_mut().enumerate() {
                *v = a * basis[[0, j]] + b * basis[[1, j]] + 0.05 * rng.uniform(-1.0, 1.0);
            }
        }
        x
    }

    /// Without a terminal the progress bar is not drawn: a line per epoch, at most one per
    /// interval after the first, and the last one at the end.
    #[test]
    fn epoch_log_prints_the_first_then_at_most_one_per_interval_then_the_last() {
        use std::time::Duration;
        let e = |epoch: usize| EpochReport {
            epoch,
            epochs_max: 50,
            train_loss: 0.5,
            val_loss: Some(0.25),
            member: 1,
            members: 1,
        };
        let mut log = EpochLog::new(Duration::from_secs(5));
        let secs = |s: f64| Duration::from_secs_f64(s);
        assert_eq!(
            log.epoch(&e(1), secs(1.5)),
            ["epoch 1/50: train loss 0.5000, validation loss 0.2500, 1.5 s"]
        );
        assert!(log.epoch(&e(2), secs(3.0)).is_empty());
        assert!(log.epoch(&e(3), secs(6.4)).is_empty());
        let lines = log.epoch(&e(4), secs(6.5));
        assert!(
            lines.len() == 1 && lines[0].starts_with("epoch 4/50"),
            "{lines:?}"
        );
        assert_eq!(log.finish(), None, "the last line was printed already");
        assert!(log.epoch(&e(5), secs(8.0)).is_empty());
        assert!(log.finish().unwrap().starts_with("epoch 5/50"));
        assert_eq!(log.finish(), None);
        let mut log = EpochLog::new(Duration::from_secs(5));
        let member = |m: usize, epoch: usize| EpochReport {
            val_loss: None,
            member: m,
            members: 3,
            ..e(epoch)
        };
        assert_eq!(
            log.epoch(&member(2, 7), secs(81.0)),
            ["epoch 7/50 (member 2 of 3): train loss 0.5000, 81.0 s"]
        );
        // An operator's trial: members train one after another within an interval, so the
        // lines jumped from member 1 to member 5. A member's last epoch is logged when the
        // next member starts, and the new member's first epoch with it.
        assert!(log.epoch(&member(2, 8), secs(82.0)).is_empty());
        assert_eq!(
            log.epoch(&member(3, 1), secs(83.0)),
            [
                "epoch 8/50 (member 2 of 3): train loss 0.5000, 82.0 s",
                "epoch 1/50 (member 3 of 3): train loss 0.5000, 83.0 s"
            ]
        );
        assert!(log.epoch(&member(3, 2), secs(84.0)).is_empty());
        assert!(
            log.finish()
                .unwrap()
                .starts_with("epoch 2/50 (member 3 of 3)")
        );
    }

    fn quick(epochs: usize) -> TrainConfig {
        TrainConfig {
            epochs_max: epochs,
            batch_size: 32,
            learning_rate: 1e-2,
            ..TrainConfig::default()
        }
    }

    fn run(
        model: &mut Autoencoder,
        x: &Array2<f32>,
        cfg: &TrainConfig,
    ) -> Result<TrainReport, TrainError> {
        train(model, x.view(), cfg, &mut |_| {})
    }

    #[test]
    fn loss_falls_on_low_rank_data() {
        let x = low_rank(400, 8, 1);
        for output in [OutputKind::Plain, OutputKind::Probabilistic] {
            let mut model = Autoencoder::new(8, &[6, 4, 6], output, 2);
            let before = model.loss(x.view(), &mut model.workspace(64));
            let mut seen = Vec::new();
            let report = train(&mut model, x.view(), &quick(40), &mut |e| {
                seen.push(e.clone())
            })
            .expect("trains");
            let after = model.loss(x.view(), &mut model.workspace(64));
            assert_eq!(seen.len(), report.epochs_run);
            assert_eq!(seen[0].epoch, 1);
            assert_eq!((report.rows_train, report.rows_val), (360, 40));
            let first = report.train_losses[0];
            let last = *report.train_losses.last().expect("epochs ran");
            match output {
                // MSE summed over 8 features: from several units to near the noise floor.
                OutputKind::Plain => {
                    assert!(after < 0.2 * before, "{output:?}: {before} -> {after}");
                    assert!(last < 0.3 * first, "{output:?}: {first} -> {last}");
                }
                // NLL goes negative once the variances shrink towards the noise.
                OutputKind::Probabilistic => {
                    assert!(after < before - 5.0, "{output:?}: {before} -> {after}");
                    assert!(last < first - 5.0, "{output:?}: {first} -> {last}");
                }
            }
        }
    }

    #[test]
    fn same_seed_gives_bit_identical_weights() {
        let x = low_rank(300, 6, 3);
        let cfg = TrainConfig {
            seed: 9,
            ..quick(5)
        };
        let init = Autoencoder::new(6, &[3], OutputKind::Probabilistic, 4);
        let (mut a, mut b, mut c) = (init.clone(), init.clone(), init.clone());
        let ra = run(&mut a, &x, &cfg).expect("trains");
        let rb = run(&mut b, &x, &cfg).expect("trains");
        assert_eq!(a, b);
        assert_eq!(ra, rb);
        assert_ne!(a, init);
        run(&mut c, &x, &TrainConfig { seed: 10, ..cfg }).expect("trains");
        assert_ne!(a, c);
    }

    /// A stop raised during training (here after epoch 2 of 5) ends it at the next
    /// mini-batch with the model as it was; never raised, training is `train`'s.
    #[test]
    fn train_until_gives_up_when_stopped_and_leaves_the_model_unchanged() {
        let x = low_rank(300, 6, 3);
        let init = Autoencoder::new(6, &[3], OutputKind::Probabilistic, 4);
        let stop = AtomicBool::new(false);
        let mut stopped = init.clone();
        let mut epochs = 0;
        let err = train_until(&mut stopped, x.view(), &quick(5), &stop, &mut |e| {
            epochs = e.epoch;
            if e.epoch == 2 {
                stop.store(true, Ordering::Relaxed);
            }
        })
        .unwrap_err();
        assert!(matches!(err, TrainError::Stopped), "{err}");
        assert_eq!(epochs, 2);
        assert_eq!(stopped, init);
        let (mut a, mut b) = (init.clone(), init.clone());
        let go_on = AtomicBool::new(false);
        let ra = train_until(&mut a, x.view(), &quick(5), &go_on, &mut |_| {}).unwrap();
        let rb = run(&mut b, &x, &quick(5)).unwrap();
        assert_eq!((a, ra), (b, rb));
    }

    #[test]
    fn early_stopping_fires_on_a_plateau_and_restores_the_best_weights() {
        // Pure noise through a 1-wide bottleneck: nothing to learn past the mean, so the
        // validation loss flattens out quickly.
        let mut rng = Rng::new(5);
        let x = Array2::from_shape_simple_fn((400, 4), || rng.uniform(-1.0, 1.0));
        let cfg = TrainConfig {
            patience_epochs: 3,
            min_improvement: 1e-2,
            ..quick(500)
        };
        let mut model = Autoencoder::new(4, &[1], OutputKind::Plain, 6);
        let report = run(&mut model, &x, &cfg).expect("trains");
        assert!(report.stopped_early);
        assert!(report.epochs_run < 500);
        assert_eq!(report.val_losses.len(), report.epochs_run);
        let min = report
            .val_losses
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        assert_eq!(report.best_val_loss, Some(min));
        assert_eq!(report.val_losses[report.best_epoch - 1], min);

        // The model holds the best epoch's weights: its loss on the same held-out rows matches.
        let (_, val_idx) = split(400, cfg.validation_fraction, &mut Rng::new(cfg.seed));
        let x_val = x.select(Axis(0), &val_idx);
        let n_val = x_val.nrows();
        assert_eq!(
            model.loss(x_val.view(), &mut model.workspace(256.min(n_val))),
            min
        );
    }

    #[test]
    fn without_validation_every_epoch_runs() {
        let x = low_rank(50, 4, 7);
        let cfg = TrainConfig {
            validation_fraction: 0.0,
            ..quick(7)
        };
        let mut model = Autoencoder::new(4, &[2], OutputKind::Plain, 1);
        let report = run(&mut model, &x, &cfg).expect("trains");
        assert_eq!(
            (report.epochs_run, report.best_epoch, report.rows_val),
            (7, 7, 0)
        );
        assert!(
            report.val_losses.is_empty() && report.best_val_loss.is_none() && !report.stopped_early
        );
    }

    #[test]
    fn invalid_config_is_rejected_with_its_key() {
        let cases: [(TrainConfig, &str); 8] = [
            (
                TrainConfig {
                    epochs_max: 0,
                    ..Default::default()
                },
                "epochs_max",
            ),
            (
                TrainConfig {
                    batch_size: 0,
                    ..Default::default()
                },
                "batch_size",
            ),
            (
                TrainConfig {
                    learning_rate: 0.0,
                    ..Default::default()
                },
                "learning_rate",
            ),
            (
                TrainConfig {
                    learning_rate: f64::NAN,
                    ..Default::default()
                },
                "learning_rate",
            ),
            (
                TrainConfig {
                    validation_fraction: 0.6,
                    ..Default::default()
                },
                "validation_fraction",
            ),
            (
                TrainConfig {
                    validation_fraction: -0.1,
                    ..Default::default()
                },
                "validation_fraction",
            ),
            (
                TrainConfig {
                    patience_epochs: 0,
                    ..Default::default()
                },
                "patience_epochs",
            ),
            (
                TrainConfig {
                    min_improvement: -1.0,
                    ..Default::default()
                },
                "min_improvement",
            ),
        ];
        let x = low_rank(50, 4, 1);
        for (cfg, key) in cases {
            assert_eq!(cfg.validate().map_err(|e| e.0), Err(key));
            let mut model = Autoencoder::new(4, &[2], OutputKind::Plain, 1);
            match run(&mut model, &x, &cfg) {
                Err(TrainError::InvalidConfig { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{key}: {other:?}"),
            }
        }
        assert_eq!(TrainConfig::default().validate(), Ok(()));
    }

    #[test]
    fn config_reads_partial_toml_style_json_and_rejects_unknown_keys() {
        let cfg: TrainConfig = serde_json::from_str(r#"{"epochs_max": 5}"#).expect("parses");
        assert_eq!(
            cfg,
            TrainConfig {
                epochs_max: 5,
                ..Default::default()
            }
        );
        assert!(serde_json::from_str::<TrainConfig>(r#"{"epochs": 5}"#).is_err());
    }

    #[test]
    fn too_few_rows_is_an_error() {
        let mut model = Autoencoder::new(4, &[2], OutputKind::Plain, 1);
        let before = model.clone();
        let x = low_rank(3, 4, 1);
        let err = run(&mut model, &x, &TrainConfig::default()).unwrap_err();
        assert!(
            matches!(
                err,
                TrainError::TooFewRows {
                    rows: 3,
                    needed: 10,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("got 3, need at least 10"));
        let none = Array2::zeros((0, 4));
        let cfg = TrainConfig {
            validation_fraction: 0.0,
            ..Default::default()
        };
        assert!(matches!(
            run(&mut model, &none, &cfg),
            Err(TrainError::TooFewRows {
                rows: 0,
                needed: 1,
                ..
            })
        ));
        assert_eq!(model, before);
        // Just enough rows works, with one validation row.
        let report = run(&mut model, &low_rank(10, 4, 1), &quick(2)).expect("trains");
        assert_eq!((report.rows_train, report.rows_val), (9, 1));
    }

    #[test]
    fn bad_inputs_are_errors() {
        let mut model = Autoencoder::new(4, &[2], OutputKind::Plain, 1);
        let x = low_rank(20, 5, 1);
        assert_eq!(
            run(&mut model, &x, &quick(1)),
            Err(TrainError::FeatureMismatch {
                expected: 4,
                got: 5
            })
        );
        let mut x = low_rank(20, 4, 1);
        x[[7, 2]] = f32::NAN;
        assert_eq!(
            run(&mut model, &x, &quick(1)),
            Err(TrainError::NonFiniteInput { row: 7, col: 2 })
        );
    }

    #[test]
    fn divergence_is_reported_and_leaves_the_model_unchanged() {
        let x = low_rank(100, 4, 2);
        let mut model = Autoencoder::new(4, &[2], OutputKind::Probabilistic, 3);
        let before = model.clone();
        let cfg = TrainConfig {
            learning_rate: 1e30,
            ..quick(20)
        };
        let err = run(&mut model, &x, &cfg).unwrap_err();
        assert!(matches!(err, TrainError::Diverged { .. }), "{err:?}");
        assert!(err.to_string().starts_with("training diverged at epoch "));
        assert_eq!(model, before);
    }

    #[test]
    fn rows_needed_matches_the_split() {
        for fraction in [0.0, 0.01, 0.1, 0.25, 0.3, 0.5] {
            let n = rows_needed(fraction);
            let mut rng = Rng::new(0);
            let (t, v) = split(n, fraction, &mut rng);
            assert!(
                !t.is_empty() && (fraction == 0.0 || !v.is_empty()),
                "{fraction}: {n}"
            );
            if n > 2 {
                assert!(
                    fraction > 0.0 && n_val(n - 1, fraction) == 0,
                    "{fraction}: {n} is not the minimum"
                );
            }
        }
    }

    /// A model folder is not overwritten without --force; with it, the old model's ONNX
    /// graph goes (a graph left beside a new model.json would run the old network with the
    /// new scaler), and files train does not own stay.
    #[test]
    fn a_model_folder_is_replaced_only_when_forced_and_loses_its_stale_graph() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(
            check_model_folder(d, "model.onnx", false)
                .unwrap()
                .is_empty()
        );
        for f in [
            "model.json",
            "model.safetensors",
            "model.onnx",
            "other.onnx",
            "notes.txt",
        ] {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        let err = check_model_folder(d, "model.onnx", false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("holds a model already (model.json, model.safetensors, model.onnx)")
                && err.contains("--force"),
            "{err}"
        );
        // A graph named by `[onnx] file` in the folder is the model's too; a path elsewhere
        // is not.
        let found = check_model_folder(d, "other.onnx", true).unwrap();
        assert_eq!(found.len(), 4, "{found:?}");
        assert_eq!(model_folder_files(d, "../other.onnx").len(), 3);
        let removed = clear_model_folder(&found).unwrap();
        assert_eq!(removed, vec![d.join("model.onnx"), d.join("other.onnx")]);
        // model.json and the weights are replaced by the save, each atomically.
        assert!(d.join("model.json").exists() && d.join("model.safetensors").exists());
        assert!(d.join("notes.txt").exists());
        // Only the graph left: still a model's folder.
        std::fs::write(d.join("model.onnx"), b"x").unwrap();
        std::fs::remove_file(d.join("model.json")).unwrap();
        std::fs::remove_file(d.join("model.safetensors")).unwrap();
        assert!(check_model_folder(d, "model.onnx", false).is_err());
    }
}
