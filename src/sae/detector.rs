//! An SAE and its dark-matter head as a live detector: what the agent scores raw
//! activation frames with (`[agent] format = "raw"`, `model_dir` an SAE folder).
//!
//! A detector folder is an SAE checkpoint (SAELens or sparsify) with darkwatch's head in
//! `dark/`: `dark_head.json`, `dark_head.safetensors`, and `calibration.safetensors`, the
//! scores of normal tokens the streaming thresholds start from. `darkwatch sae-train` writes
//! all of it; `darkwatch sae-head` adds the head and the calibration to a published SAE.
//!
//! Per token the detector scores one of the head's outputs ([`SaeScoreKind`], `[sae]
//! score`). Its per-dimension contributions, which alerts name as `d<j>`, are the squared
//! error e_j² (for `error_norm` and `deviation`) or the squared unexplained error
//! (e_j − ê_j)² (for `nonlinear`): the residual-stream dimensions the SAE misses most.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ndarray::{Array2, s};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::dark::{DARK_META_FILE, DARK_WEIGHTS_FILE, DarkError, DarkHead, DarkScore};
use super::eval::DARK_DIR;
use super::{CONFIG_FILE, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, Sae, SaeError, SaeWorkspace};
use crate::config::{Backend, CudaConfig, CudaFallback, MAX_TOP_CONTRIBUTIONS, PipelineConfig};
use crate::model::cuda::{CudaError, CudaSae};
use crate::pipeline::{BatchScorer, Contribution, fill_top};
use crate::threshold::MIN_CALIBRATION_SCORES;

/// The file, in the head's folder, that holds the calibration scores.
pub const CALIBRATION_FILE: &str = "calibration.safetensors";

/// Which of the head's outputs is a token's alert score.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SaeScoreKind {
    /// ‖e‖², the SAE's squared error (best token-level AUROC on the bundled fixture).
    #[default]
    ErrorNorm,
    /// ‖e − (Aᵀx + b)‖², the error the head cannot predict linearly.
    Nonlinear,
    /// (‖e‖² − predicted)/σ, the error norm's deviation from its prediction.
    Deviation,
}

impl SaeScoreKind {
    pub const ALL: [SaeScoreKind; 3] = [
        SaeScoreKind::ErrorNorm,
        SaeScoreKind::Nonlinear,
        SaeScoreKind::Deviation,
    ];

    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            SaeScoreKind::ErrorNorm => "error_norm",
            SaeScoreKind::Nonlinear => "nonlinear",
            SaeScoreKind::Deviation => "deviation",
        }
    }

    /// The tensor of `calibration.safetensors` that holds this score.
    fn tensor(self) -> &'static str {
        match self {
            SaeScoreKind::ErrorNorm => "error_sq_norm",
            SaeScoreKind::Nonlinear => "nonlinear_sq_norm",
            SaeScoreKind::Deviation => "deviation",
        }
    }

    /// This score of one token.
    pub fn pick(self, s: &DarkScore) -> f32 {
        match self {
            SaeScoreKind::ErrorNorm => s.error_sq_norm,
            SaeScoreKind::Nonlinear => s.nonlinear_sq_norm,
            SaeScoreKind::Deviation => s.deviation,
        }
    }
}

/// `[sae]`: how an SAE folder is scored live.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SaeConfig {
    /// `error_norm`, `nonlinear` or `deviation` (see [`SaeScoreKind`]).
    pub score: SaeScoreKind,
    /// The dataset-level factor s of an SAE trained with `normalize_activations =
    /// "expected_average_only_in"` (SAELens keeps it outside the checkpoint, as its release
    /// registry's `norm_scaling_factor`): x·s goes in, x̂/s comes out. Unset: the factor
    /// `sae-head --norm-scaling-factor` recorded with the head, else none (a warning).
    pub norm_scaling_factor: Option<f32>,
    /// Whether a raw frame header's `id` is the in-prompt position of the message's first
    /// frame (0 at each prompt's first token; frame i is at id + i), rather than a counter.
    /// Only then are frames at positions below [`Self::skip_positions`] left unscored, and
    /// the ids are not taken as the frames' seqs (each stream counts its frames). Default
    /// false: every frame is scored, as before.
    pub id_is_position: bool,
    /// With `id_is_position`: frames at positions below this are not scored (BOS /
    /// attention-sink tokens). Unset: the `skip_positions` the head recorded (what its fit
    /// and calibration left out; 0 for a head written before darkwatch recorded it).
    pub skip_positions: Option<u64>,
}

impl From<SaeScoreKind> for SaeConfig {
    fn from(score: SaeScoreKind) -> SaeConfig {
        SaeConfig {
            score,
            ..SaeConfig::default()
        }
    }
}

impl SaeConfig {
    /// Checks the keys the types cannot: the key (within `[sae]`) and why.
    ///
    /// # Errors
    /// A `norm_scaling_factor` that is not finite and positive.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(s) = self.norm_scaling_factor
            && !(s.is_finite() && s > 0.0)
        {
            return Err((
                "norm_scaling_factor",
                format!("{s} must be finite and positive"),
            ));
        }
        match self.skip_positions {
            Some(n) if n > 0 && !self.id_is_position => Err((
                "skip_positions",
                format!(
                    "{n} needs id_is_position = true: only then does the agent know a frame's \
                     position in its prompt (the raw header's id, 0 at each prompt's first \
                     token); with ids that count on across prompts it cannot tell position 0 \
                     apart. Send in-prompt positions as ids and set id_is_position = true, or \
                     drop skip_positions"
                ),
            )),
            Some(n) if n >= crate::ingest::raw::MAX_FRAME_ID => Err((
                "skip_positions",
                format!(
                    "{n} is beyond the largest header id ({}): it would leave every frame \
                     unscored",
                    crate::ingest::raw::MAX_FRAME_ID - 1
                ),
            )),
            _ => Ok(()),
        }
    }

    /// The positions the agent leaves unscored for `head`: `None` unless `id_is_position`
    /// (positions unknown, every frame scored), else `skip_positions` or the head's
    /// recorded skip (0 for a head that records none).
    pub fn live_skip(&self, head: &DarkHead) -> Option<u64> {
        self.id_is_position.then(|| {
            self.skip_positions
                .unwrap_or_else(|| head.skip_positions().unwrap_or(0) as u64)
        })
    }
}

/// Which tokens' scores a calibration holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalibrationRows {
    /// Rows held out from the SAE and the head.
    HeldOut,
    /// Every row, each scored by an SAE and a head fitted without its fold.
    OutOfFold,
    /// The rows the head (and the SAE) were fitted on: too small errors, thresholds too low.
    Training,
}

impl CalibrationRows {
    pub fn name(self) -> &'static str {
        match self {
            CalibrationRows::HeldOut => "held-out",
            CalibrationRows::OutOfFold => "out-of-fold",
            CalibrationRows::Training => "training",
        }
    }

    fn parse(s: &str) -> Option<CalibrationRows> {
        [
            CalibrationRows::HeldOut,
            CalibrationRows::OutOfFold,
            CalibrationRows::Training,
        ]
        .into_iter()
        .find(|r| r.name() == s)
    }
}

/// Why a detector folder cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DetectorError {
    #[error(transparent)]
    Sae(#[from] SaeError),
    #[error(transparent)]
    Dark(#[from] DarkError),
    #[error(
        "{dir}: no dark-matter head (expected {DARK_META_FILE}); `darkwatch sae-head --sae {sae} \
         --input <normal activations>` fits one for this SAE (`darkwatch sae-train` trains an \
         SAE with its head)",
        sae = sae.display()
    )]
    NoHead { dir: PathBuf, sae: PathBuf },
    #[error(transparent)]
    OtherSae(Box<HeadForOtherSae>),
    #[error("{what}: {reason}")]
    Scaling { what: String, reason: String },
    #[error(
        "the dark-matter head in {dir} takes d = {head}, the SAE d_in = {sae}: it belongs to \
         another SAE; fit this one's with `darkwatch sae-head`"
    )]
    Width {
        dir: PathBuf,
        head: usize,
        sae: usize,
    },
    #[error("{path}: {reason}")]
    Calibration { path: PathBuf, reason: String },
    #[error("the SAE cannot score on the GPU: {0}")]
    Cuda(#[from] CudaError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A head whose recorded SAE weights are not those of the SAE beside it
/// ([`DetectorError::OtherSae`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "{head} was fitted on SAE weights {recorded_file} with sha256 {recorded}…, but this SAE's \
     {weights} has sha256 {found}…: the head and its calibration belong to another SAE, and \
     thresholds from them would be wrong; {remedy}",
    head = head.display(),
    weights = weights.display()
)]
pub struct HeadForOtherSae {
    /// The head's `dark_head.json`.
    pub head: PathBuf,
    /// The weights file name and (12 hex digits of) the sha256 the head records.
    pub recorded_file: String,
    pub recorded: String,
    /// The SAE's weights file and (12 hex digits of) its sha256.
    pub weights: PathBuf,
    pub found: String,
    /// What to do: `drop --dark (this SAE's head is at …)` when `--dark` named another
    /// folder and this SAE's own head folder holds a head fitted on its weights, else the
    /// `sae-head` command that fits one (and, for another SAE's head folder, `then drop
    /// --dark`).
    pub remedy: String,
}

/// A loaded SAE, its head, and the calibration of the chosen score.
#[derive(Debug)]
pub struct SaeDetector {
    /// The checkpoint.
    pub sae: Sae,
    /// The dark-matter head fitted for it.
    pub head: DarkHead,
    /// The head output each token is scored by.
    pub score: SaeScoreKind,
    id: String,
    features: Vec<String>,
    calibration: Vec<f32>,
    calibration_rows: Option<CalibrationRows>,
    /// Where its scorers run the SAE and the head: `Some` for the GPU (`[score] backend =
    /// "cuda"` and one was found), `None` for the native kernels.
    cuda: Option<CudaConfig>,
    /// Where it scores, as `inspect` says: `native`, `cuda/<device>` or
    /// `native (cuda unavailable: <why>)`.
    backend: String,
    /// The positions the agent leaves unscored ([`SaeConfig::live_skip`]): `None` when frame
    /// ids are not positions.
    live_skip: Option<u64>,
    /// The warning for a head fitted without early positions that the agent scores anyway
    /// ([`Self::skip_warning`]).
    skip_warning: Option<String>,
}

/// Scores of normal tokens, one vector per [`SaeScoreKind`], for threshold calibration.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    pub error_sq_norm: Vec<f32>,
    pub nonlinear_sq_norm: Vec<f32>,
    pub deviation: Vec<f32>,
    /// Which rows they come from.
    pub rows: CalibrationRows,
}

impl Calibration {
    /// The last `max` tokens' scores.
    pub fn from_scores(scores: &[DarkScore], rows: CalibrationRows, max: usize) -> Calibration {
        let tail = &scores[scores.len().saturating_sub(max)..];
        let take = |kind: SaeScoreKind| tail.iter().map(|s| kind.pick(s)).collect();
        Calibration {
            error_sq_norm: take(SaeScoreKind::ErrorNorm),
            nonlinear_sq_norm: take(SaeScoreKind::Nonlinear),
            deviation: take(SaeScoreKind::Deviation),
            rows,
        }
    }

    /// Tokens calibrated on.
    pub fn len(&self) -> usize {
        self.error_sq_norm.len()
    }

    pub fn is_empty(&self) -> bool {
        self.error_sq_norm.is_empty()
    }

    /// One line for `sae-train` and `sae-head`: how many scores of which rows, and a warning
    /// when thresholds cannot be trusted (or built) from them.
    pub fn describe(&self) -> String {
        let mut line = format!(
            "threshold calibration: scores of {} {} rows",
            self.len(),
            self.rows.name()
        );
        if self.len() < MIN_CALIBRATION_SCORES {
            line.push_str(&format!(
                "; WARNING: thresholds need at least {MIN_CALIBRATION_SCORES}, so `darkwatch run` \
                 will refuse this folder (offline `sae-score` works): rerun with more rows or a \
                 larger --holdout and --force (the folder exists now), or --holdout 0 to \
                 calibrate on every row"
            ));
        } else if self.rows == CalibrationRows::Training {
            line.push_str(
                "; WARNING: the head was fitted on these rows, so their errors are small and \
                 thresholds will be low (hold rows out)",
            );
        }
        line
    }

    fn get(&self, kind: SaeScoreKind) -> &[f32] {
        match kind {
            SaeScoreKind::ErrorNorm => &self.error_sq_norm,
            SaeScoreKind::Nonlinear => &self.nonlinear_sq_norm,
            SaeScoreKind::Deviation => &self.deviation,
        }
    }

    /// Writes `dir/calibration.safetensors`.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn save(&self, dir: &Path) -> Result<(), DetectorError> {
        let path = dir.join(CALIBRATION_FILE);
        let bad = |reason: String| DetectorError::Calibration {
            path: path.clone(),
            reason,
        };
        let bytes: Vec<(SaeScoreKind, Vec<u8>)> = SaeScoreKind::ALL
            .iter()
            .map(|&k| {
                (
                    k,
                    self.get(k).iter().flat_map(|v| v.to_le_bytes()).collect(),
                )
            })
            .collect();
        let mut views = Vec::new();
        for (k, b) in &bytes {
            let view = TensorView::new(Dtype::F32, vec![b.len() / 4], b)
                .map_err(|e| bad(e.to_string()))?;
            views.push((k.tensor(), view));
        }
        let meta =
            std::collections::HashMap::from([("rows".to_string(), self.rows.name().to_string())]);
        let st = safetensors::serialize(views, Some(meta)).map_err(|e| bad(e.to_string()))?;
        fs::write(&path, st).map_err(|source| DetectorError::Io {
            path: path.clone(),
            source,
        })
    }

    /// Reads one score's calibration from `dir/calibration.safetensors`, and which rows it
    /// came from (if the file says); `sae_dir` is the SAE's folder and `sha` its weights'
    /// sha256, for the command that makes a new one.
    fn load(
        dir: &Path,
        kind: SaeScoreKind,
        (sae_dir, sha): (&Path, Option<&str>),
    ) -> Result<(Vec<f32>, Option<CalibrationRows>), DetectorError> {
        let path = dir.join(CALIBRATION_FILE);
        let bad = |reason: String| DetectorError::Calibration {
            path: path.clone(),
            reason,
        };
        let bytes = fs::read(&path).map_err(|e| {
            bad(format!(
                "{e}: the streaming thresholds calibrate on these scores of normal tokens \
                 (`darkwatch sae-train` and `darkwatch sae-head` write them: `{}`)",
                sae_head_fix(sae_dir, sha, dir)
            ))
        })?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        let t = st
            .tensor(kind.tensor())
            .map_err(|_| bad(format!("tensor `{}` is missing", kind.tensor())))?;
        if t.dtype() != Dtype::F32 || t.shape().len() != 1 {
            return Err(bad(format!(
                "tensor `{}` is {:?} {:?}, expected 1-D F32",
                kind.tensor(),
                t.dtype(),
                t.shape()
            )));
        }
        let scores: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let finite = scores.iter().filter(|s| s.is_finite()).count();
        if finite < MIN_CALIBRATION_SCORES {
            return Err(bad(format!(
                "`{}` holds {finite} finite scores; thresholds need at least \
                 {MIN_CALIBRATION_SCORES}: refit with at least {MIN_CALIBRATION_SCORES} \
                 held-out rows (`{}`, with --holdout 0 every row counts)",
                kind.tensor(),
                sae_head_fix(sae_dir, sha, dir)
            )));
        }
        let (_, meta) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        let rows = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("rows"))
            .and_then(|r| CalibrationRows::parse(r));
        Ok((scores, rows))
    }
}

/// The command that fits a head for the SAE in `sae_dir` (the folder as the user named it,
/// with weights sha256 `sha`) into `dark`: `--out` when that is not where `run` looks,
/// `--force` when a head is there.
///
/// A `dark` inside another SAE's folder (`other/dark`, as `--dark` may name) is one that
/// `sae-head --out` refuses ([`other_sae_folder`], the test it makes), so the command
/// writes this SAE's own head folder instead.
pub fn sae_head_fix(sae_dir: &Path, sha: Option<&str>, dark: &Path) -> String {
    let mut cmd = format!(
        "darkwatch sae-head --sae {} --input <normal activations>",
        sae_dir.display()
    );
    let own = head_dirs(sae_dir).0;
    let dark = if other_sae_folder(sae_dir, sha, dark).is_some() {
        own.as_path()
    } else {
        dark
    };
    if dark != own {
        cmd.push_str(&format!(" --out {}", dark.display()));
    }
    if dark.join(DARK_META_FILE).exists() {
        cmd.push_str(" --force");
    }
    cmd
}

/// The head folder of the SAE named by `sae_dir`: `sae_dir/dark`, unless that holds no head
/// (no [`DARK_META_FILE`]: missing, empty or half-written) and the head of the same sparsify
/// SAE sits beside the other name for it — the hookpoint folder's (`run/layers.3/dark`) for
/// a run folder with that one hookpoint, or the run folder's (`run/dark`) for its only
/// hookpoint folder (`--sae layers.3` from inside the run folder included). `sae-head`
/// writes where the path it was given points (`--sae run` → `run/dark`), so either may hold
/// it; `sae_dir/dark` when neither does.
///
/// When both hold a head, `sae_dir/dark` is used — the folder the name given points to,
/// where `sae-head --force` with that name refits — and a warning names both: refusing
/// would stop `run` over a head that is most likely right, and silently picking one would
/// hide a stale head beside it.
pub fn head_dir(sae_dir: &Path) -> PathBuf {
    let (dir, also) = head_dirs(sae_dir);
    if let Some(also) = also {
        tracing::warn!(
            "both {} and {} hold a dark-matter head for the same sparsify SAE; using {} (the \
             folder --sae {} names): remove the other one, or score with --dark naming the one \
             to use",
            dir.display(),
            also.display(),
            dir.display(),
            sae_dir.display()
        );
    }
    dir
}

/// [`head_dir`] without the warning: the folder used, and the other name's head folder
/// when that holds a head too.
pub(crate) fn head_dirs(sae_dir: &Path) -> (PathBuf, Option<PathBuf>) {
    let has_head = |d: &Path| d.join(DARK_META_FILE).is_file();
    let own = sae_dir.join(DARK_DIR);
    let is_hookpoint =
        |d: &Path| d.join(CONFIG_FILE).is_file() && d.join(SPARSIFY_WEIGHTS).is_file();
    let only_hookpoint = |run: &Path| -> Option<PathBuf> {
        if run.join(CONFIG_FILE).is_file() {
            return None;
        }
        let mut layers = fs::read_dir(run)
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| is_hookpoint(p));
        let first = layers.next()?;
        layers.next().is_none().then_some(first)
    };
    // The same SAE's head folder under its other name, if that holds a head.
    let other = if let Some(layer) = only_hookpoint(sae_dir) {
        Some(layer.join(DARK_DIR))
    } else if is_hookpoint(sae_dir)
        && let Some(run) = sae_dir.parent().map(|p| {
            // `layers.3` (relative, from inside the run folder) has the parent "".
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        && only_hookpoint(run).is_some()
    {
        Some(run.join(DARK_DIR))
    } else {
        None
    };
    let other = other.filter(|d| has_head(d));
    match (has_head(&own), other) {
        (true, other) => (own, other),
        (false, Some(other)) => (other, None),
        (false, None) => (own, None),
    }
}

/// The folder of an SAE other than the one in `sae_dir` (weights sha256 `sha`) that the
/// head folder `dark` is, or is directly inside: one holding an SAE that loads with other
/// weights. `sae-head --out` refuses such a folder and `sae-score`'s remedies avoid it, by
/// this one test, so a suggested command is never one that is refused (a nested SAE folder,
/// a hookpoint folder by a symlink, a run folder and its hookpoint folder all decide by
/// their weights, not by their paths). `dark` = `name` (relative) is inside `.`.
pub(crate) fn other_sae_folder(sae_dir: &Path, sha: Option<&str>, dark: &Path) -> Option<PathBuf> {
    // The same folder by another spelling holds the same SAE: not loaded again.
    let same = |d: &Path| {
        matches!(
            (fs::canonicalize(d), fs::canonicalize(sae_dir)),
            (Ok(a), Ok(b)) if a == b
        )
    };
    let parent = dark.parent().map(|p| {
        if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        }
    });
    [Some(dark), parent]
        .into_iter()
        .flatten()
        .find(|d| {
            !d.as_os_str().is_empty()
                && SaeDetector::is_sae_dir(d)
                && !same(d)
                && Sae::load(d).is_ok_and(|other| other.info().weights_sha256.as_deref() != sha)
        })
        .map(Path::to_path_buf)
}

/// Why `command` (`replay`, `demo`, `bench`: autoencoder commands on metric tables) cannot
/// take the SAE folder `dir`, with what to use instead; `None` when `dir` is not one.
pub fn autoencoder_only(dir: &Path, command: &str) -> Option<String> {
    if !SaeDetector::is_sae_dir(dir) {
        return None;
    }
    let d = dir.display();
    Some(format!(
        "{d} is an SAE folder (cfg.json and SAE weights, not a darkwatch model.json): `darkwatch \
         {command}` runs the autoencoders `darkwatch train` writes, on metric tables. With an \
         SAE use `darkwatch sae-score --sae {d} --input <activations.npy> [--labels …]` for \
         offline scores (AUROC with labels), `darkwatch sae-bench --sae {d}` for its speed, or \
         `darkwatch run` with [agent] model_dir = \"{d}\" and format = \"raw\" to watch live activations \
         with thresholds and alerts"
    ))
}

/// The [`SaeRecord`](super::dark::SaeRecord) of `sae` as loaded from a folder (`None` for
/// one built in memory): what a head fitted on it records.
pub fn sae_record(sae: &Sae) -> Option<super::dark::SaeRecord> {
    let sha = sae.info().weights_sha256.clone()?;
    let file = match sae.info().format {
        super::SaeFormat::Sparsify => SPARSIFY_WEIGHTS,
        _ => SAELENS_WEIGHTS,
    };
    Some(super::dark::SaeRecord {
        weights_file: file.into(),
        weights_sha256: sha,
        norm_scaling_factor: match sae.normalization() {
            super::Normalization::ExpectedAverageOnlyIn { scaling_factor } => scaling_factor,
            _ => None,
        },
    })
}

/// The dark-matter head in `dark` for `sae`, read from `sae_dir` (the folder as named):
/// [`DetectorError::NoHead`] (which says how to fit one) when the folder holds none,
/// [`DetectorError::Width`] when it was fitted to activations of another width,
/// [`DetectorError::OtherSae`] when it records other SAE weights than `sae`'s. A head that
/// records none (written before darkwatch recorded them) loads, with a warning.
///
/// # Errors
/// As above, or a head that cannot be read.
pub fn load_head(dark: &Path, sae: &Sae, sae_dir: &Path) -> Result<DarkHead, DetectorError> {
    if !dark.join(DARK_META_FILE).is_file() {
        return Err(DetectorError::NoHead {
            dir: dark.to_path_buf(),
            sae: sae_dir.to_path_buf(),
        });
    }
    let head = DarkHead::load(dark)?;
    if head.d() != sae.d_in() {
        return Err(DetectorError::Width {
            dir: dark.to_path_buf(),
            head: head.d(),
            sae: sae.d_in(),
        });
    }
    let weights = || {
        let file = sae_record(sae).map_or(SAELENS_WEIGHTS.into(), |r| r.weights_file);
        sae.info()
            .dir
            .as_ref()
            .map_or_else(|| PathBuf::from(&file), |d| d.join(&file))
    };
    match (head.sae_record(), &sae.info().weights_sha256) {
        (Some(rec), Some(found)) if rec.weights_sha256 != *found => {
            return Err(DetectorError::OtherSae(Box::new(HeadForOtherSae {
                head: dark.join(DARK_META_FILE),
                recorded_file: rec.weights_file.clone(),
                recorded: rec.weights_sha256.chars().take(12).collect(),
                weights: weights(),
                found: found.chars().take(12).collect(),
                remedy: other_head_remedy(sae_dir, dark, found),
            })));
        }
        (None, Some(_)) => tracing::warn!(
            "{}: the head records no SAE weights (written before darkwatch recorded them), so \
             it cannot be checked against {}; if it was fitted on another SAE its calibration \
             is wrong. `{}` refits it and records them",
            dark.join(DARK_META_FILE).display(),
            weights().display(),
            sae_head_fix(sae_dir, sae.info().weights_sha256.as_deref(), dark)
        ),
        _ => {}
    }
    Ok(head)
}

/// What to do about the head in `dark` fitted on other SAE weights than `sha` (this SAE's,
/// named `sae_dir`): when `dark` is not this SAE's head folder and that holds a head fitted
/// on `sha`, only to drop `--dark` — a refit with `--force` would overwrite that good head —
/// else the `sae-head` command that fits one.
fn other_head_remedy(sae_dir: &Path, dark: &Path, sha: &str) -> String {
    let own = head_dirs(sae_dir).0;
    let fits = |d: &Path| {
        DarkHead::load(d).is_ok_and(|h| h.sae_record().is_some_and(|r| r.weights_sha256 == sha))
    };
    if own != dark && fits(&own) {
        return format!("drop --dark (this SAE's head is at {})", own.display());
    }
    let fix = format!(
        "fit this SAE's own with `{}`",
        sae_head_fix(sae_dir, Some(sha), dark)
    );
    if other_sae_folder(sae_dir, Some(sha), dark).is_some() {
        format!(
            "{fix}, then drop --dark (or give --dark {}): {} is another SAE's head",
            own.display(),
            dark.display()
        )
    } else {
        fix
    }
}

/// Sets the `expected_average_only_in` scaling factor of `sae`: `given` (with the option or
/// key that gave it, for messages) or else the one `head` recorded. Warns when an SAE that
/// needs one gets none.
///
/// # Errors
/// [`DetectorError::Scaling`]: a given factor for an SAE of another normalisation, one that
/// is not finite and positive, or one other than the head's calibration was computed with.
pub fn apply_norm_scaling(
    sae: &mut Sae,
    given: Option<(f32, &str)>,
    head: Option<(&DarkHead, &Path)>,
) -> Result<(), DetectorError> {
    // A factor that no SAE can use (0, negative, NaN, ∞) is refused first, with the one
    // message: the mismatch below would suggest a head refit with it, which refuses it too.
    if let Some((g, what)) = given
        && !(g.is_finite() && g > 0.0)
    {
        return Err(DetectorError::Scaling {
            what: what.into(),
            reason: format!(
                "{g} is not a scaling factor: it must be finite and positive (the SAE's inputs \
                 are multiplied by it)"
            ),
        });
    }
    // A factor for an SAE of another normalisation is wrong whatever the head recorded:
    // say so first, rather than suggest a head refit that would refuse it too.
    if let Some((g, what)) = given
        && !matches!(
            sae.normalization(),
            super::Normalization::ExpectedAverageOnlyIn { .. }
        )
    {
        return sae
            .set_norm_scaling_factor(g)
            .map_err(|e| DetectorError::Scaling {
                what: what.into(),
                reason: match e {
                    SaeError::Invalid(r) => r,
                    e => e.to_string(),
                },
            });
    }
    let recorded = head.and_then(|(h, dir)| {
        h.sae_record()
            .and_then(|r| r.norm_scaling_factor)
            .map(|s| (s, dir.join(DARK_META_FILE)))
    });
    let factor = match (given, &recorded) {
        (Some((g, what)), Some((r, file))) if g != *r => {
            return Err(DetectorError::Scaling {
                what: what.into(),
                reason: format!(
                    "{g}, but the head in {} was fitted and calibrated with the SAE scaled by \
                     {r}: drop the setting to use {r}, or refit the head with `sae-head \
                     --norm-scaling-factor {g} --force`",
                    file.display()
                ),
            });
        }
        // A head that records its SAE but no factor was calibrated on the SAE unscaled.
        (Some((g, what)), None)
            if let Some((h, dir)) = head
                && h.sae_record().is_some() =>
        {
            return Err(DetectorError::Scaling {
                what: what.into(),
                reason: format!(
                    "{g}, but the head in {} was fitted and calibrated with the SAE unscaled: \
                     drop the setting, or refit the head with `sae-head \
                     --norm-scaling-factor {g} --force`",
                    dir.join(DARK_META_FILE).display()
                ),
            });
        }
        (Some((g, what)), _) => Some((g, what.to_string())),
        (None, Some((r, file))) => Some((*r, format!("{} (norm_scaling_factor)", file.display()))),
        (None, None) => None,
    };
    match factor {
        Some((s, what)) => sae
            .set_norm_scaling_factor(s)
            .map_err(|e| DetectorError::Scaling {
                what,
                reason: match e {
                    SaeError::Invalid(r) => r,
                    e => e.to_string(),
                },
            }),
        None => {
            if let Some(why) = sae.unscaled_warning() {
                tracing::warn!("{why}");
            }
            Ok(())
        }
    }
}

impl SaeDetector {
    /// Whether `dir` is meant as an SAE folder rather than a darkwatch autoencoder: no
    /// `model.json`, and an SAE `cfg.json` or a head folder (a sparsify run folder keeps
    /// its checkpoint one level down). [`SaeDetector::load`] then says what is missing.
    pub fn is_sae_dir(dir: &Path) -> bool {
        !dir.join(crate::model::io::META_FILE).exists()
            && (dir.join(CONFIG_FILE).is_file()
                || dir.join(DARK_DIR).is_dir()
                || Self::has_layer_folder(dir))
    }

    /// Whether `dir` holds a sparsify hookpoint folder (`layers.5/` with `cfg.json` and
    /// `sae.safetensors`): a sparsify run folder.
    fn has_layer_folder(dir: &Path) -> bool {
        fs::read_dir(dir).is_ok_and(|entries| {
            entries.filter_map(Result::ok).any(|e| {
                let p = e.path();
                p.join(CONFIG_FILE).is_file() && p.join(SPARSIFY_WEIGHTS).is_file()
            })
        })
    }

    /// The SAE files of `dir` by name (a folder's with a trailing `/`): a checkpoint's
    /// `cfg.json` and weights (SAELens or sparsify), a sparsify run folder's hookpoint
    /// folders, and the dark-matter head folder. Empty for a folder with none of them, or
    /// none at all. What an autoencoder model must not be written beside.
    pub fn files_in(dir: &Path) -> Vec<String> {
        let mut found: Vec<String> = [CONFIG_FILE, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS]
            .into_iter()
            .filter(|name| dir.join(name).is_file())
            .map(String::from)
            .collect();
        if dir.join(DARK_DIR).is_dir() {
            found.push(format!("{DARK_DIR}/"));
        }
        if let Ok(entries) = fs::read_dir(dir) {
            let mut layers: Vec<String> = entries
                .filter_map(Result::ok)
                .filter(|e| e.path().join(CONFIG_FILE).is_file())
                .map(|e| format!("{}/", e.file_name().to_string_lossy()))
                .collect();
            layers.sort();
            found.extend(layers);
        }
        found
    }

    /// Loads the SAE in `dir`, its head and calibration from `dir/dark`, scored as `config`
    /// (`[sae]`, or just a [`SaeScoreKind`]) says.
    ///
    /// # Errors
    /// A bad checkpoint or head, a missing head or calibration (each naming the file and
    /// how to make it), a head of another width or fitted on other SAE weights, or a
    /// scaling factor that does not apply ([`apply_norm_scaling`]).
    pub fn load(dir: &Path, config: impl Into<SaeConfig>) -> Result<SaeDetector, DetectorError> {
        let config = config.into();
        let score = config.score;
        let mut sae = Sae::load(dir)?;
        let dark = head_dir(dir);
        let head = load_head(&dark, &sae, dir)?;
        apply_norm_scaling(
            &mut sae,
            config
                .norm_scaling_factor
                .map(|s| (s, "[sae] norm_scaling_factor")),
            Some((&head, &dark)),
        )?;
        let (calibration, calibration_rows) =
            Calibration::load(&dark, score, (dir, sae.info().weights_sha256.as_deref()))?;
        // The id covers everything that changes a score or a threshold. The checkpoint is
        // hashed where it was read (a sparsify run folder's layer folder), streamed; its
        // weights by the sha256 taken as they were loaded.
        let ckpt = sae.info().dir.clone().unwrap_or_else(|| dir.to_path_buf());
        let mut hash = Sha256::new();
        if let Some(sha) = &sae.info().weights_sha256 {
            hash.update(sha.as_bytes());
        }
        if let super::Normalization::ExpectedAverageOnlyIn {
            scaling_factor: Some(s),
        } = sae.normalization()
        {
            hash.update(s.to_le_bytes());
        }
        for path in [
            ckpt.join(CONFIG_FILE),
            dark.join(DARK_WEIGHTS_FILE),
            dark.join(DARK_META_FILE),
            dark.join(CALIBRATION_FILE),
        ] {
            match fs::File::open(&path) {
                Ok(mut f) => {
                    std::io::copy(&mut f, &mut hash)
                        .map_err(|source| DetectorError::Io { path, source })?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(DetectorError::Io { path, source }),
            }
        }
        hash.update(score.name().as_bytes());
        let id: String = hash.finalize()[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let features = (0..sae.d_in()).map(|j| format!("d{j}")).collect();
        let live_skip = config.live_skip(&head);
        // Said by whoever runs the detector, once the configuration is known to suit it
        // (`validate` and `run` refuse a wrong one in one line, this warning not before it).
        let skip_warning = match (live_skip, head.skip_positions()) {
            (None, Some(n @ 1..)) => Some(format!(
                "{}: the head was fitted and calibrated without the first {n} token(s) of each \
                 prompt (skip_positions), but frame ids are not positions ([sae] \
                 id_is_position = false), so the agent scores those tokens too, against \
                 thresholds calibrated without them (BOS rows may alert). Send each message's \
                 in-prompt position as its header id and set [sae] id_is_position = true",
                dark.join(DARK_META_FILE).display()
            )),
            _ => None,
        };
        Ok(SaeDetector {
            sae,
            head,
            score,
            id,
            features,
            calibration,
            calibration_rows,
            cuda: None,
            backend: "native".into(),
            live_skip,
            skip_warning,
        })
    }

    /// A detector from an SAE and its head in memory, without calibration scores (its id
    /// is `in-memory`), scoring on the GPU with `cuda` when given (no preflight, unlike
    /// [`Self::load_on`]: the scorer's upload finds what fails). For benches and tests that
    /// make an SAE rather than load one.
    ///
    /// # Errors
    /// The head's width is not the SAE's input width.
    pub fn from_parts(
        sae: Sae,
        head: DarkHead,
        score: SaeScoreKind,
        cuda: Option<CudaConfig>,
    ) -> Result<SaeDetector, DetectorError> {
        if head.d() != sae.d_in() {
            return Err(DetectorError::Width {
                dir: "(in memory)".into(),
                head: head.d(),
                sae: sae.d_in(),
            });
        }
        let features = (0..sae.d_in()).map(|j| format!("d{j}")).collect();
        let backend = if cuda.is_some() { "cuda" } else { "native" };
        Ok(SaeDetector {
            sae,
            head,
            score,
            id: "in-memory".into(),
            features,
            calibration: Vec::new(),
            calibration_rows: None,
            cuda,
            backend: backend.into(),
            live_skip: None,
            skip_warning: None,
        })
    }

    /// Loads `dir` (as [`Self::load`]) to score on `backend`: `cuda` runs the SAE and its
    /// head on the GPU ([`CudaSae::load_detector`]), where the SAE is one the device kernels
    /// cover with batches of `gpu_batch` tokens and [`CudaSae::preflight`] passes (driver,
    /// device, libraries, the kernels compile: what can fail is found here, before the
    /// agent reports ready, without allocating device memory beside a running scorer);
    /// otherwise, with `[cuda] fallback = "cpu"`, it warns and scores on the native kernels
    /// ([`Self::backend_label`] says why). The upload itself happens in each scorer
    /// ([`SaeScorer::for_pipeline`]), which falls back in turn if it fails. `onnx` applies
    /// to autoencoders only: a warning, then native.
    ///
    /// # Errors
    /// As [`Self::load`]; with `fallback = "error"`, why the GPU cannot be used.
    pub fn load_on(
        dir: &Path,
        config: impl Into<SaeConfig>,
        backend: Backend,
        cuda: &CudaConfig,
        gpu_batch: usize,
    ) -> Result<SaeDetector, DetectorError> {
        let mut det = SaeDetector::load(dir, config)?;
        match backend {
            Backend::Native => {}
            Backend::Onnx => tracing::warn!(
                "[score] backend = \"onnx\" applies to autoencoders; the SAE scores on the \
                 native kernels"
            ),
            Backend::Cuda => {
                let found = CudaSae::preflight(&det.sae, gpu_batch, cuda);
                match found {
                    Ok(name) => {
                        tracing::info!(device = cuda.device, %name, "the SAE and its head score on the GPU");
                        det.cuda = Some(cuda.clone());
                        det.backend = format!("cuda/{name}");
                    }
                    Err(e) if cuda.fallback == CudaFallback::Cpu && cfg!(feature = "cuda") => {
                        tracing::warn!(error = %e, "the SAE cannot score on the GPU; scoring with the native kernels ([cuda] fallback = \"cpu\")");
                        det.backend = format!("native (cuda unavailable: {e})");
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(det)
    }

    /// Whether its scorers run on the GPU (`[score] backend = "cuda"` and one was found).
    pub fn on_gpu(&self) -> bool {
        self.cuda.is_some()
    }

    /// [`Self::describe`], then where it scores when that is not the configured native:
    /// `… on cuda/<device>` or `… (cuda unavailable: <why>)`.
    pub fn backend_label(&self) -> String {
        if self.cuda.is_some() {
            format!("{} on {}", self.describe(), self.backend)
        } else if let Some(why) = self.backend.strip_prefix("native ") {
            format!("{} {why}", self.describe())
        } else {
            self.describe()
        }
    }

    /// Frames at in-prompt positions below this are not scored live (`[sae] id_is_position`
    /// and `skip_positions`); `None`: frame ids are not positions, every frame is scored.
    pub fn live_skip(&self) -> Option<u64> {
        self.live_skip
    }

    /// Why the agent will score tokens the head was calibrated without: the head skipped
    /// early positions (`skip_positions`) but `[sae] id_is_position` is off, so frames
    /// carry no position. `None` otherwise. `run` logs it and `validate` prints it as a
    /// note, once the configuration is known to suit the detector.
    pub fn skip_warning(&self) -> Option<&str> {
        self.skip_warning.as_deref()
    }

    /// Which tokens the calibration scores come from, if the file says.
    pub fn calibration_rows(&self) -> Option<CalibrationRows> {
        self.calibration_rows
    }

    /// Content hash of the SAE, head and score kind (12 hex digits).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// `d0`, `d1`, …: the names alerts give the activation's dimensions.
    pub fn features(&self) -> &[String] {
        &self.features
    }

    /// The chosen score of normal tokens, in order.
    pub fn calibration_scores(&self) -> &[f32] {
        &self.calibration
    }

    /// What `darkwatch inspect` prints for an SAE folder.
    pub fn summary(&self) -> String {
        let r2 = self.head.train_r2();
        let rows = self
            .calibration_rows
            .map_or("unknown", CalibrationRows::name);
        format!(
            "SAE detector {id}\n\
             {sae}\
             head         ridge λ {lambda:.3e}, σ {sigma:.4}, R² on its fit rows: vector {rv:.3}, norm {rn:.3}\n\
             score        {score} ([sae] score)\n\
             calibration  {n} scores of {rows} rows\n\
             positions    {positions}\n\
             backend      {backend}\n",
            id = self.id,
            sae = self.sae.summary(),
            lambda = self.head.lambda(),
            sigma = self.head.sigma(),
            rv = r2.vector,
            rn = r2.norm,
            score = self.score.name(),
            n = self.calibration.len(),
            positions = self.positions_text(),
            backend = self.backend,
        )
    }

    /// The `positions` line of [`Self::summary`]: what the head left out, and what the
    /// agent leaves unscored.
    fn positions_text(&self) -> String {
        let fitted = match (self.head.skip_positions(), self.head.positions_from()) {
            (None, _) => "head fitted on every position (it records no skip_positions: \
                          written before darkwatch recorded it)"
                .to_string(),
            (Some(0), Some(super::positions::PositionsFrom::Unknown)) => {
                "head fitted on every position (its rows had no positions)".to_string()
            }
            (Some(0), _) => "head fitted on every position".to_string(),
            (Some(n), _) => format!("head fitted without the first {n} of each prompt"),
        };
        let live = match self.live_skip {
            None => "every frame scored ([sae] id_is_position = false)".to_string(),
            Some(0) => "every frame scored".to_string(),
            Some(n) => format!("frames with header id + i below {n} not scored"),
        };
        format!("{fitted}; live: {live}")
    }

    /// What scores, for logs and `/metrics`: `sae/<activation>/<d_in>x<latents>/<score>`.
    pub fn describe(&self) -> String {
        let activation = match self.sae.activation() {
            super::SaeActivation::Relu => "relu".to_string(),
            super::SaeActivation::TopK { k } => format!("topk{k}"),
            super::SaeActivation::JumpRelu => "jumprelu".to_string(),
        };
        format!(
            "sae/{activation}/{}x{}/{}",
            self.sae.d_in(),
            self.sae.d_sae(),
            self.score.name()
        )
    }
}

/// The scorer thread's side of an [`SaeDetector`]: buffers for `max_batch` tokens, so a
/// batch scores without allocating, on the native kernels or, for a detector loaded for the
/// GPU, on the device (only each token's score and top contributions come back).
pub struct SaeScorer {
    detector: Arc<SaeDetector>,
    engine: Engine,
    scores: Vec<f32>,
    top_k: usize,
    last: usize,
    /// The last batch failed (its scores are NaN): no contributions to name.
    failed: bool,
    errors: u64,
    /// Why a detector loaded for the GPU scores natively here (its upload failed).
    gpu_fallback: Option<String>,
    /// Batches submitted and not yet collected, oldest first: their rows, and whether the
    /// submit succeeded ([`BatchScorer::submit`]).
    flight: std::collections::VecDeque<(usize, bool)>,
    /// Whether a GPU scorer keeps two batches in flight in the pipeline (the default).
    overlap: bool,
}

/// The native kernels' buffers.
struct NativeEngine {
    ws: SaeWorkspace,
    dark: super::dark::DarkWorkspace,
    input: Array2<f32>,
    contrib: Array2<f32>,
}

/// What runs a [`SaeScorer`]'s batches.
enum Engine {
    Native(Box<NativeEngine>),
    /// The input rows live in the device SAE's pinned buffer, which the GPU uploads from.
    Cuda(Box<CudaSae>),
}

impl SaeScorer {
    /// Buffers for batches of up to `max_batch` tokens, naming the `top_k` largest
    /// contributions per token. A detector loaded for the GPU ([`SaeDetector::load_on`])
    /// uploads the SAE and its head here; if that fails, `[cuda] fallback = "cpu"` logs it
    /// and scores on the native kernels.
    ///
    /// # Errors
    /// The upload failed and `[cuda] fallback = "error"`.
    pub fn new(
        detector: Arc<SaeDetector>,
        max_batch: usize,
        top_k: usize,
    ) -> Result<SaeScorer, DetectorError> {
        Self::build(detector, max_batch, max_batch, top_k)
    }

    /// As [`Self::new`], with the pipeline's micro-batch: on the GPU
    /// [`PipelineConfig::gpu_batch_frames`], on the native kernels (a fallback included)
    /// `batch_max_frames`.
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn for_pipeline(
        detector: Arc<SaeDetector>,
        pipeline: &PipelineConfig,
        top_k: usize,
    ) -> Result<SaeScorer, DetectorError> {
        Self::build(
            detector,
            pipeline.gpu_batch_frames(),
            pipeline.batch_max_frames,
            top_k,
        )
    }

    fn build(
        detector: Arc<SaeDetector>,
        gpu_batch: usize,
        native_batch: usize,
        top_k: usize,
    ) -> Result<SaeScorer, DetectorError> {
        let d = detector.sae.d_in();
        let top_k = top_k.min(MAX_TOP_CONTRIBUTIONS).min(d);
        let mut gpu_fallback = None;
        let engine = match &detector.cuda {
            None => None,
            Some(cfg) => match CudaSae::load_detector(
                &detector.sae,
                &detector.head,
                detector.score,
                top_k,
                gpu_batch.max(1),
                cfg,
            ) {
                Ok(gpu) => Some(Engine::Cuda(Box::new(gpu))),
                Err(e) if cfg.fallback == CudaFallback::Cpu => {
                    tracing::error!(error = %e, "cannot upload the SAE to the GPU; scoring with the native kernels ([cuda] fallback = \"cpu\")");
                    gpu_fallback = Some(e.to_string());
                    None
                }
                Err(e) => return Err(e.into()),
            },
        };
        let n = match &engine {
            Some(_) => gpu_batch.max(1),
            None => native_batch.max(1),
        };
        let engine = engine.unwrap_or_else(|| {
            Engine::Native(Box::new(NativeEngine {
                ws: detector.sae.workspace(n),
                dark: detector.head.workspace(n),
                input: Array2::zeros((n, d)),
                contrib: Array2::zeros((n, d)),
            }))
        });
        Ok(SaeScorer {
            engine,
            scores: vec![0.0; n],
            top_k,
            last: 0,
            failed: false,
            errors: 0,
            gpu_fallback,
            flight: std::collections::VecDeque::with_capacity(crate::model::cuda::SAE_SLOTS),
            overlap: true,
            detector,
        })
    }

    /// Scores each batch before the pipeline fills the next one, on the GPU too: the
    /// baseline that `benches/cuda.rs` measures the overlapped pipeline against.
    pub fn without_overlap(mut self) -> SaeScorer {
        self.overlap = false;
        self
    }

    /// Whether batches score on the GPU.
    pub fn on_gpu(&self) -> bool {
        matches!(self.engine, Engine::Cuda(_))
    }

    /// What scores, as [`SaeDetector::backend_label`] but true to this scorer: a detector
    /// loaded for the GPU whose upload failed here (`fallback = "cpu"`) ends
    /// `(cuda unavailable: <why>)`.
    pub fn backend_label(&self) -> String {
        match &self.gpu_fallback {
            Some(why) => format!("{} (cuda unavailable: {why})", self.detector.describe()),
            None => self.detector.backend_label(),
        }
    }

    /// Clamps the first `n` input rows to ±[`super::ACTIVATION_LIMIT`] (the buffer the
    /// next score or submit reads, on either engine).
    fn clamp_input(&mut self, n: usize) {
        let d = self.detector.sae.d_in();
        let input = match &mut self.engine {
            Engine::Native(native) => native
                .input
                .as_slice_mut()
                .expect("owned arrays are contiguous"),
            Engine::Cuda(gpu) => gpu.input_mut_unchecked(),
        };
        super::clamp_activations(&mut input[..n * d]);
    }

    fn try_score(&mut self, n: usize) -> Result<(), DetectorError> {
        let det = &*self.detector;
        let NativeEngine {
            ws,
            dark,
            input,
            contrib,
        } = match &mut self.engine {
            Engine::Cuda(gpu) => {
                let scored = gpu.forward_input(n)?;
                self.scores[..n].copy_from_slice(scored);
                return Ok(());
            }
            Engine::Native(native) => &mut **native,
        };
        let x = input.slice(s![..n, ..]);
        let out = det.sae.forward(x, ws)?;
        let e = out.error();
        let scored = det.head.score(x, e, dark)?;
        for (dst, s) in self.scores.iter_mut().zip(scored) {
            *dst = det.score.pick(s);
        }
        for (r, mut row) in contrib.rows_mut().into_iter().take(n).enumerate() {
            let er = e.row(r);
            match det.score {
                SaeScoreKind::Nonlinear => {
                    let predicted = dark.predicted_error(r);
                    for ((c, &ev), &pv) in row.iter_mut().zip(&er).zip(predicted) {
                        *c = (ev - pv) * (ev - pv);
                    }
                }
                SaeScoreKind::ErrorNorm | SaeScoreKind::Deviation => {
                    for (c, &ev) in row.iter_mut().zip(&er) {
                        *c = ev * ev;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Counts one failure in `errors` and logs it at the 1st, 2nd, 4th, 8th… (never a line per
/// batch while a GPU stays broken).
fn count_failure(errors: &mut u64, e: &dyn std::fmt::Display, what: &str) {
    *errors += 1;
    if errors.is_power_of_two() {
        tracing::error!(error = %e, failures = *errors, "{what}");
    }
}

impl BatchScorer for SaeScorer {
    fn max_batch(&self) -> usize {
        self.scores.len()
    }

    fn n_features(&self) -> usize {
        self.detector.sae.d_in()
    }

    fn input_mut(&mut self) -> &mut [f32] {
        match &mut self.engine {
            Engine::Native(native) => native
                .input
                .as_slice_mut()
                .expect("owned arrays are contiguous"),
            // The buffer the next submit sends. The batch that last used it has been
            // collected (at most one other is in flight), so this does not wait.
            Engine::Cuda(gpu) => {
                if let Err(e) = gpu.input_mut() {
                    // Only a failed CUDA event wait (the context is likely broken, so the
                    // next submit or wait fails too and its frames score NaN).
                    count_failure(
                        &mut self.errors,
                        &e,
                        "waiting for the SAE input buffer failed",
                    );
                }
                gpu.input_mut_unchecked()
            }
        }
    }

    fn input_row(&self, i: usize) -> &[f32] {
        let d = self.n_features();
        let all = match &self.engine {
            Engine::Native(native) => native
                .input
                .as_slice()
                .expect("owned arrays are contiguous"),
            Engine::Cuda(gpu) => gpu.input(),
        };
        &all[i * d..(i + 1) * d]
    }

    fn score_batch(&mut self, n: usize) {
        let n = n.min(self.max_batch());
        self.clamp_input(n);
        self.last = n;
        self.failed = false;
        if let Err(e) = self.try_score(n) {
            // Shapes are checked at load, so this is a bug or a failed GPU; the frames score
            // NaN (thresholds skip them) rather than stopping the agent.
            count_failure(&mut self.errors, &e, "SAE scoring failed");
            self.scores[..n].fill(f32::NAN);
            self.failed = true;
        }
    }

    fn batch_scores(&self) -> &[f32] {
        &self.scores[..self.last]
    }

    fn overlaps(&self) -> bool {
        self.overlap && self.on_gpu()
    }

    fn submit(&mut self, n: usize) {
        if !matches!(self.engine, Engine::Cuda(_)) {
            self.score_batch(n);
            return;
        }
        let n = n.min(self.scores.len());
        self.clamp_input(n);
        let Engine::Cuda(gpu) = &mut self.engine else {
            return;
        };
        let ok = match gpu.submit(n) {
            Ok(()) => true,
            Err(e) => {
                count_failure(&mut self.errors, &e, "SAE scoring failed");
                false
            }
        };
        self.flight.push_back((n, ok));
    }

    fn collect(&mut self) {
        let (Engine::Cuda(gpu), Some((n, ok))) = (&mut self.engine, self.flight.pop_front()) else {
            return;
        };
        self.last = n;
        self.failed = !ok;
        if ok {
            match gpu.wait() {
                Ok(scored) => self.scores[..n].copy_from_slice(scored),
                Err(e) => {
                    count_failure(&mut self.errors, &e, "SAE scoring failed");
                    self.failed = true;
                }
            }
        }
        if self.failed {
            self.scores[..n].fill(f32::NAN);
        }
    }

    fn top_contributions(&self, i: usize, out: &mut [Contribution; MAX_TOP_CONTRIBUTIONS]) -> u8 {
        if self.failed || i >= self.last {
            return 0;
        }
        match &self.engine {
            Engine::Native(native) => fill_top(
                native
                    .contrib
                    .row(i)
                    .as_slice()
                    .expect("rows of an owned array are contiguous"),
                self.top_k,
                out,
            ),
            Engine::Cuda(gpu) => {
                let (idx, val, top) = gpu.top_contributions();
                let row = i * top..(i + 1) * top;
                let (Some(idx), Some(val)) = (idx.get(row.clone()), val.get(row)) else {
                    return 0;
                };
                let n = self.top_k.min(top);
                for ((o, &f), &v) in out.iter_mut().zip(&idx[..n]).zip(&val[..n]) {
                    *o = Contribution {
                        feature: f,
                        value: v,
                    };
                }
                n as u8
            }
        }
    }

    fn any_thread(&self) -> bool {
        // A CUDA context is current on one thread.
        !self.on_gpu()
    }
}
