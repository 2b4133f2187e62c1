//! The evaluation harness: trains and replays every SMD machine and ODDS table it is
//! given, with one configuration, and prints one table of honest, point-wise metrics.
//!
//! Every entity goes through [`crate::model::fit`] and [`crate::replay::replay_frames`]
//! (the one pipeline). Labels are read only to score the result: nothing is chosen with
//! them. Each entity is also re-scored with mean-shift scoring toggled, so MSS has to
//! earn its place in the numbers.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ndarray::Axis;

use crate::config::DarkwatchConfig;
use crate::hitrate::{HitRates, detected_frames, rank_rows};
pub use crate::hitrate::{hit_rate_at, hit_rates};
use crate::ingest::{self, IngestError, Table};
use crate::model::Model;
use crate::mss::MssConfig;
use crate::replay::{EventReport, Frames, Outputs, ReplayError, replay_frames};
use crate::rng::Rng;
use crate::train::TrainError;

/// How an ODDS table is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OddsProtocol {
    /// Train on every row, score every row (the usual unsupervised protocol).
    FitAll,
    /// MSS-PAE's split: inliers and outliers each shuffled (seeded) and cut 75/25; train
    /// on the 75 % (MSS-PAE's train and validation halves, so three quarters of the
    /// outliers too), score the other 25 %.
    Split,
}

/// One thing to evaluate.
#[derive(Debug, Clone)]
pub enum Entity {
    /// An SMD machine: `<m>_train.npy`, `<m>_test.npy`, `<m>_test_label.txt` (or `.npy`), and optional
    /// interpretation labels (`interpretation_label/<m>.txt` or `<m>_interpretation_label.txt`).
    Smd {
        name: String,
        train: PathBuf,
        test: PathBuf,
        labels: PathBuf,
        interpretation: Option<PathBuf>,
    },
    /// An ODDS / ADBench `.npz` with `X` and `y`.
    Odds { name: String, path: PathBuf },
    /// A file found that cannot be evaluated (an SMD-style `_train.npy` without its test
    /// or label file): reported as a failed entity when its turn comes, so that the
    /// others still run.
    Incomplete {
        name: String,
        path: PathBuf,
        reason: String,
    },
}

impl Entity {
    /// The entity's row name in the table and the CSV: unique among one run's entities
    /// ([`discover`] names clashing ones by their folders).
    pub fn name(&self) -> &str {
        match self {
            Entity::Smd { name, .. }
            | Entity::Odds { name, .. }
            | Entity::Incomplete { name, .. } => name,
        }
    }

    fn name_mut(&mut self) -> &mut String {
        match self {
            Entity::Smd { name, .. }
            | Entity::Odds { name, .. }
            | Entity::Incomplete { name, .. } => name,
        }
    }

    /// The file that stands for the entity (its `_train.npy` or its `.npz`), as found.
    pub fn path(&self) -> &Path {
        match self {
            Entity::Smd { train: path, .. }
            | Entity::Odds { path, .. }
            | Entity::Incomplete { path, .. } => path,
        }
    }

    /// Every file the entity reads.
    pub fn files(&self) -> Vec<&Path> {
        match self {
            Entity::Smd {
                train,
                test,
                labels,
                interpretation,
                ..
            } => [
                Some(train),
                Some(test),
                Some(labels),
                interpretation.as_ref(),
            ]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
            .collect(),
            Entity::Odds { path, .. } | Entity::Incomplete { path, .. } => vec![path.as_path()],
        }
    }

    /// The family the entity is reported in, each with its own mean: `SMD` and `ODDS` for
    /// those benchmarks' files (an SMD `machine-<g>-<m>`; a `.npz` in a folder whose name
    /// holds "odds" or "adbench"), else `series` for a time series of one's own and
    /// `tables` for a table (rows without order). A name alone does not make a table
    /// ODDS: ADBench's `<n>_<name>.npz` is also how anyone might number their own tables
    /// (`2_bc.npz`), and they would then be averaged into the benchmark's mean.
    pub fn family(&self) -> &'static str {
        let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        match self {
            Entity::Smd { name, train, .. } => {
                // By the file: a clash may have put folders before the name.
                let stem = train
                    .file_name()
                    .and_then(|f| f.to_str())
                    .and_then(|f| f.strip_suffix("_train.npy"))
                    .unwrap_or(name);
                let smd = stem
                    .strip_prefix("machine-")
                    .and_then(|rest| rest.split_once('-'))
                    .is_some_and(|(g, m)| digits(g) && digits(m));
                if smd { "SMD" } else { "series" }
            }
            Entity::Odds { path, .. } => {
                let folder = path
                    .canonicalize()
                    .unwrap_or_else(|_| path.clone())
                    .parent()
                    .and_then(Path::file_name)
                    .map(|f| f.to_string_lossy().to_lowercase())
                    .unwrap_or_default();
                if folder.contains("odds") || folder.contains("adbench") {
                    "ODDS"
                } else {
                    "tables"
                }
            }
            Entity::Incomplete { .. } => "",
        }
    }
}

/// Why an entity could not be evaluated. The messages leave out the entity's name: the
/// caller reports each failure under it (`tiny: training failed: …`, not `tiny: tiny: …`).
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{path}: {reason}")]
    Discover { path: PathBuf, reason: String },
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// A series refused for its gaps, as `train` and `replay` refuse it.
    #[error(
        "{}: {reason}; fill or drop the gaps (or the column) in the file and run the harness again",
        .path.display()
    )]
    Gaps { path: PathBuf, reason: String },
    #[error("training failed: {source}")]
    Train { entity: String, source: TrainError },
    #[error("replay failed: {source}")]
    Replay { entity: String, source: ReplayError },
}

/// True when `out` names a file one of the `entities` reads (so writing it would destroy
/// an input). A file that does not exist yet is no input.
pub fn reads(entities: &[Entity], out: &Path) -> bool {
    entities
        .iter()
        .flat_map(Entity::files)
        .any(|f| same_file(f, out))
}

/// True when both paths name one existing file.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Checks `harness --out PATH` before any entity runs: not a folder (the CSV is renamed
/// over it at the end, which a folder refuses, after hours of work), not one of the
/// entities' files and not the configuration file. Returns why not.
pub fn check_out(entities: &[Entity], config: Option<&Path>, out: &Path) -> Result<(), String> {
    if out.is_dir() {
        return Err("is a folder; name the CSV file to write (e.g. results.csv)".into());
    }
    if reads(entities, out) || config.is_some_and(|c| same_file(c, out)) {
        return Err("is one of the harness's inputs; choose another file".into());
    }
    Ok(())
}

/// Turns paths into entities: an SMD `*_train.npy` (its test, label and interpretation
/// files are found beside it), a folder (every `*_train.npy` and `*.npz` in it), or a `.npz`.
///
/// Each machine or table is evaluated once, however often it is named: a path given
/// twice, or a folder and a file in it, would otherwise count twice in the family's mean.
/// Duplicates are found by canonical path (so `./a.npz` and `a.npz`, or a link to it, are
/// one), dropped, and reported with a warning.
///
/// Names are unique: two files that would share one (`dirA/uni_train.npy` and
/// `dirB/uni_train.npy`, both `uni`) are named by as many of their folders as it takes to
/// tell them apart (`dirA/uni`, `dirB/uni`; see [`unique_names`]); a name without a
/// clash stays plain, so SMD's and ODDS's names do not change.
///
/// # Errors
/// A path that is none of these, or an SMD machine whose test or label file is missing.
pub fn discover(paths: &[PathBuf]) -> Result<Vec<Entity>, HarnessError> {
    let mut seen: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut out = Vec::new();
    for entity in discover_all(paths)? {
        let first = entity.files()[0].to_path_buf();
        let key = first.canonicalize().unwrap_or_else(|_| first.clone());
        if let Some((_, earlier)) = seen.iter().find(|(k, _)| *k == key) {
            let also = if earlier == &first {
                String::new()
            } else {
                format!(" (also as {})", earlier.display())
            };
            tracing::warn!(
                "{} is named more than once{also}: evaluated once",
                first.display()
            );
            continue;
        }
        seen.push((key, first));
        out.push(entity);
    }
    unique_names(&mut out);
    Ok(out)
}

/// Renames entities that share a name (different files: duplicates are gone by now) by
/// the shortest tail of their canonical folder that sets each apart, `<folder>/<name>`:
/// two rows called `uni` could not be told apart in the table or the CSV, and a reader
/// could not say which one a number belongs to. Where even the whole folder does not
/// differ (`uni.npz` beside `uni_train.npy`) the file's name replaces the plain name.
fn unique_names(entities: &mut [Entity]) {
    let folders: Vec<Vec<String>> = entities.iter().map(|e| folder_parts(e.path())).collect();
    let plain: Vec<String> = entities.iter().map(|e| e.name().to_string()).collect();
    let clashing = |names: &[String], i: usize| {
        names
            .iter()
            .enumerate()
            .any(|(j, n)| j != i && *n == names[i])
    };
    let mut leaf = plain.clone();
    let mut depth = vec![0; entities.len()];
    for i in 0..entities.len() {
        if !clashing(&plain, i) {
            continue;
        }
        depth[i] = 1;
        // The same name in the same folder (`uni.npz` beside `uni_train.npy`): no folder
        // tells them apart, the file's name does.
        if (0..entities.len()).any(|j| j != i && plain[j] == plain[i] && folders[j] == folders[i]) {
            leaf[i] = entities[i]
                .path()
                .file_name()
                .map_or_else(|| plain[i].clone(), |f| f.to_string_lossy().into_owned());
        }
    }
    let compose = |depth: &[usize]| -> Vec<String> {
        (0..entities.len())
            .map(|i| {
                let f = &folders[i];
                let mut parts = f[f.len().saturating_sub(depth[i])..].to_vec();
                parts.push(leaf[i].clone());
                parts.join("/")
            })
            .collect()
    };
    let mut names = compose(&depth);
    loop {
        let mut grew = false;
        for i in 0..names.len() {
            if clashing(&names, i) && depth[i] < folders[i].len() {
                depth[i] += 1;
                grew = true;
            }
        }
        if !grew {
            break;
        }
        names = compose(&depth);
    }
    for (e, n) in entities.iter_mut().zip(names) {
        *e.name_mut() = n;
    }
}

/// The folders of `path`'s canonical parent, outermost first (absolute, so that `a.npz`
/// and `../b/a.npz` compare by where they are).
fn folder_parts(path: &Path) -> Vec<String> {
    let p = path
        .canonicalize()
        .unwrap_or_else(|_| std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()));
    p.parent()
        .map(|d| {
            d.components()
                .filter_map(|c| match c {
                    std::path::Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// [`discover`] without removing duplicates.
fn discover_all(paths: &[PathBuf]) -> Result<Vec<Entity>, HarnessError> {
    let mut out = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut inner: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| HarnessError::Discover {
                    path: path.clone(),
                    reason: e.to_string(),
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let name = p
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    name.ends_with("_train.npy") || name.ends_with(".npz")
                })
                .collect();
            inner.sort();
            if inner.is_empty() {
                // Folders are not searched below their own level: name the ones there.
                let mut subfolders: Vec<String> = std::fs::read_dir(path)
                    .into_iter()
                    .flatten()
                    .filter_map(Result::ok)
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.path().display().to_string())
                    .collect();
                subfolders.sort();
                let hint = match subfolders.len() {
                    0 => String::new(),
                    n => format!(
                        "; subfolders are not searched: name them ({}{})",
                        subfolders[..n.min(3)].join(" "),
                        if n > 3 { " …" } else { "" }
                    ),
                };
                return Err(HarnessError::Discover {
                    path: path.clone(),
                    reason: format!("holds no SMD <machine>_train.npy and no .npz file{hint}"),
                });
            }
            out.extend(discover_all(&inner)?);
            continue;
        }
        let file = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(machine) = file.strip_suffix("_train.npy") {
            let dir = path.parent().unwrap_or(Path::new("."));
            let test = dir.join(format!("{machine}_test.npy"));
            let labels = test_labels(dir, machine);
            // A missing partner fails this entity only (when its turn comes), not the run:
            // a folder of data often holds a training file of something else.
            let missing: Vec<String> = [(&test, ""), (&labels, " (or .npy)")]
                .into_iter()
                .filter(|(p, _)| !p.is_file())
                .map(|(p, or)| format!("{}{or}", p.display()))
                .collect();
            if !missing.is_empty() {
                out.push(Entity::Incomplete {
                    name: machine.to_string(),
                    path: path.clone(),
                    reason: format!(
                        "a <name>_train.npy is evaluated with its <name>_test.npy and <name>_test_label.txt (or .npy) beside it; missing: {}",
                        missing.join(", ")
                    ),
                });
                continue;
            }
            let interpretation = [
                dir.join("interpretation_label")
                    .join(format!("{machine}.txt")),
                dir.join(format!("{machine}_interpretation_label.txt")),
            ]
            .into_iter()
            .find(|p| p.is_file());
            out.push(Entity::Smd {
                name: machine.to_string(),
                train: path.clone(),
                test,
                labels,
                interpretation,
            });
        } else if file.ends_with(".npz") {
            out.push(Entity::Odds {
                name: file.trim_end_matches(".npz").to_string(),
                path: path.clone(),
            });
        } else {
            return Err(HarnessError::Discover {
                path: path.clone(),
                reason: "expected an SMD <machine>_train.npy, an ODDS .npz, or a folder of them"
                    .into(),
            });
        }
    }
    Ok(out)
}

/// A series' point labels: `<name>_test_label.txt`, else `<name>_test_label.npy` (the
/// formats `replay` reads). With both there, the `.txt` is read and a warning names the
/// `.npy` left unread: SMD ships `.txt`, so a `.npy` beside it is most likely a converted
/// copy. With neither, the `.txt` path (for the message that it is missing).
fn test_labels(dir: &Path, name: &str) -> PathBuf {
    let txt = dir.join(format!("{name}_test_label.txt"));
    let npy = dir.join(format!("{name}_test_label.npy"));
    match (txt.is_file(), npy.is_file()) {
        (false, true) => npy,
        (true, true) => {
            tracing::warn!(
                "{} and {} both hold labels: the .txt is read, the .npy is not",
                txt.display(),
                npy.display()
            );
            txt
        }
        _ => txt,
    }
}

/// One entity's numbers.
#[derive(Debug, Clone)]
pub struct EntityResult {
    /// Unique among the run's entities (see [`discover`]).
    pub name: String,
    /// The file that stands for the entity ([`Entity::path`]), as it was found.
    pub path: PathBuf,
    pub family: &'static str,
    pub protocol: &'static str,
    pub rows: usize,
    pub anomalous: usize,
    pub auroc: Option<f64>,
    pub auprc: Option<f64>,
    pub best_f1: Option<f64>,
    pub pa_f1: Option<f64>,
    /// AUPRC with MSS toggled relative to the configuration (off if it was on, else m=1 k=10).
    pub auprc_mss_toggled: Option<f64>,
    pub mss_on: bool,
    /// AUPRC with every frame scored alone, where the model smooths its scores.
    pub auprc_unsmoothed: Option<f64>,
    /// OmniAnomaly HitRate@100 % and @150 % of the culprit metrics, where labelled, over
    /// every frame inside an interpretation segment (the headline).
    pub hit_rate: Option<(f64, f64)>,
    /// The same over the detected frames only: labelled anomalous, inside a segment, and
    /// scored at or above the point-wise best-F1 threshold (InterFusion's choice of
    /// frames; a second protocol, not the headline). See [`crate::hitrate`].
    pub hit_rate_detected: Option<(f64, f64)>,
    /// Frames each HitRate averages over (all, detected), where there are interpretation
    /// labels; detected is `None` where there is no best-F1 threshold (one class).
    pub hit_rate_frames: Option<(usize, Option<usize>)>,
    /// (@100 %, @150 %) that a random ranking of the features scores on average over the
    /// frames of [`Self::hit_rate`]: the floor to read it against ([`crate::hitrate::chance_at`]).
    pub hit_rate_chance: Option<(f64, f64)>,
    /// The same over the frames of [`Self::hit_rate_detected`].
    pub hit_rate_detected_chance: Option<(f64, f64)>,
    /// Alert events against labelled segments (episode precision and recall, and the
    /// frames inside episodes), for time series.
    pub events: Option<EventReport>,
    pub train_seconds: f64,
    pub frames_per_second: f64,
    /// Networks in the model's ensemble ([`crate::model::Autoencoder::members`]).
    pub members: usize,
}

/// The MSS setting compared against the configured one.
pub fn toggled_mss(mss: MssConfig) -> MssConfig {
    if mss.is_off() {
        MssConfig {
            rounds: 1,
            neighbours: 10,
            ..mss
        }
    } else {
        MssConfig { rounds: 0, ..mss }
    }
}

/// Trains and evaluates one entity.
///
/// # Errors
/// Unreadable files, a training failure, or a replay failure.
pub fn run_entity(
    entity: &Entity,
    cfg: &DarkwatchConfig,
    protocol: OddsProtocol,
) -> Result<EntityResult, HarnessError> {
    let name = entity.name().to_string();
    let family = entity.family();
    // A table's rows have no order; a series' do.
    let table = matches!(entity, Entity::Odds { .. });
    // The test file whose gaps are still to fill, once the model knows the training mean.
    let test_gaps: &Path;
    let (train, mut test, labels, segments, proto) = match entity {
        Entity::Incomplete { path, reason, .. } => {
            return Err(HarnessError::Discover {
                path: path.clone(),
                reason: reason.clone(),
            });
        }
        Entity::Smd {
            train,
            test,
            labels,
            interpretation,
            ..
        } => {
            // Read as `train` and `replay` read them, gaps (NaN, ±Inf) included: the
            // training file's are filled here as `train` fills them, the test file's after
            // fitting, with the training mean, as `replay` fills them.
            let opts = Default::default();
            let mut train_table = crate::replay::read_input(train, &opts)?;
            let gaps = crate::replay::fill_gaps(
                train,
                &mut train_table.values,
                &train_table.features,
                None,
                true,
            )
            .map_err(|reason| HarnessError::Gaps {
                path: train.clone(),
                reason,
            })?;
            if !gaps.is_empty() {
                tracing::warn!("{gaps}");
            }
            let test_table = crate::replay::read_input(test, &opts)?;
            let labels = ingest::read_labels(labels, Some(test_table.values.nrows()))?;
            let segments = match interpretation {
                Some(p) => Some(ingest::read_interpretation_labels(p)?),
                None => None,
            };
            test_gaps = test;
            (
                train_table,
                test_table.values,
                labels,
                segments,
                "train/test files",
            )
        }
        Entity::Odds { path, .. } => {
            // `X` as `train --table` and `replay --table` read it, gaps included: the
            // training rows' gaps take their column's mean (a table's rows have no order,
            // so nothing is carried forward), the test rows' the model's training mean.
            let x = crate::replay::read_input(path, &Default::default())?;
            let y = ingest::npz::read_npz_labels(path, x.values.nrows())?;
            test_gaps = path;
            let fill = |mut train: Table| -> Result<Table, HarnessError> {
                let gaps =
                    crate::replay::fill_gaps(path, &mut train.values, &train.features, None, false)
                        .map_err(|reason| HarnessError::Gaps {
                            path: path.clone(),
                            reason,
                        })?;
                if !gaps.is_empty() {
                    tracing::warn!("{gaps}");
                }
                Ok(train)
            };
            match protocol {
                OddsProtocol::FitAll => {
                    let values = x.values.clone();
                    (fill(x)?, values, y, None, "fit on all")
                }
                OddsProtocol::Split => {
                    let (tr, te) = split_50_25_25(&y, cfg.train.seed);
                    let train = fill(Table {
                        values: x.values.select(Axis(0), &tr),
                        ..x.clone()
                    })?;
                    let labels = te.iter().map(|&i| y[i]).collect();
                    (
                        train,
                        x.values.select(Axis(0), &te),
                        labels,
                        None,
                        "75/25 split",
                    )
                }
            }
        }
    };
    // A table's rows have no order: averaging a row's score with the rows before it, or
    // feeding a row to the network beside the rows before it (a lag window, which a
    // one-column table would get by default), would mix unrelated points, reward files
    // that list their outliers together, and leave the first rows without a score.
    let mut entity_cfg;
    let fit_cfg = if table {
        entity_cfg = cfg.clone();
        entity_cfg.score.smooth_frames = 1;
        entity_cfg.model.window_frames = 1;
        &entity_cfg
    } else {
        cfg
    };
    let started = Instant::now();
    let (model, _) =
        crate::model::fit::fit(&train, "", fit_cfg, &mut |_| {}).map_err(|source| {
            HarnessError::Train {
                entity: name.clone(),
                source,
            }
        })?;
    let train_seconds = started.elapsed().as_secs_f64();
    crate::replay::fill_input_gaps(&model, test_gaps, &mut test, !table).map_err(|e| match e {
        ReplayError::Features { input, reason } => HarnessError::Gaps {
            path: input,
            reason,
        },
        source => HarnessError::Replay {
            entity: name.clone(),
            source,
        },
    })?;
    let frames = Frames::windowed(&model, test, None, Some(labels));
    let (labels, first_row) = (
        frames.labels.clone().unwrap_or_default(),
        frames.first_row(),
    );
    let model = Arc::new(model);
    let replay = |model: Arc<Model>| {
        let head = model.meta.head;
        let frames = frames.clone();
        replay_frames(model, head, frames, Outputs::default(), None, cfg).map_err(|source| {
            HarnessError::Replay {
                entity: name.clone(),
                source,
            }
        })
    };
    let main = replay(model.clone())?;
    let toggled = replay(Arc::new(model.with_mss(toggled_mss(model.meta.mss))))?;
    let unsmoothed = if model.meta.smooth_frames > 1 {
        replay(Arc::new(model.with_smoothing(1)))?
            .eval
            .and_then(|e| e.auprc)
    } else {
        None
    };
    let eval = main.eval.clone();
    // The frames found at the point-wise best-F1 threshold, for the second protocol.
    let detected = eval
        .as_ref()
        .and_then(|e| e.best_f1.as_ref())
        .map(|b| detected_frames(&main.scores, &labels, b.threshold));
    // Ranked from the rows, each batch's lag windows built as it goes (no windowed copy).
    let hits: Option<HitRates> = segments.as_deref().and_then(|s| {
        rank_rows(&model, model.meta.head, frames.values.view(), s)
            .ok()
            .map(|r| r.rates(detected.as_deref()))
    });
    Ok(EntityResult {
        name,
        path: entity.path().to_path_buf(),
        family,
        protocol: proto,
        // The scored rows: those after the first lag window's filling.
        rows: frames.values.nrows() - first_row,
        anomalous: labels.iter().filter(|&&l| l == 1).count(),
        auroc: eval.as_ref().and_then(|e| e.auroc),
        auprc: eval.as_ref().and_then(|e| e.auprc),
        best_f1: eval.as_ref().and_then(|e| e.best_f1.as_ref().map(|b| b.f1)),
        // Point adjustment credits a whole segment of consecutive rows; a table's rows
        // have no order, so a table gets none (its "segments" are runs of outlier rows).
        pa_f1: eval
            .as_ref()
            .filter(|_| !table)
            .and_then(|e| e.pa_best_f1.as_ref().map(|b| b.f1)),
        auprc_mss_toggled: toggled.eval.and_then(|e| e.auprc),
        mss_on: !model.meta.mss.is_off(),
        auprc_unsmoothed: unsmoothed,
        members: model.ae.members,
        hit_rate: hits.as_ref().and_then(|h| h.all),
        hit_rate_detected: hits.as_ref().and_then(|h| h.detected),
        // No best-F1 threshold (one class): no detected frames to count, not zero of them.
        hit_rate_frames: hits
            .as_ref()
            .map(|h| (h.frames, detected.is_some().then_some(h.detected_frames))),
        hit_rate_chance: hits.as_ref().and_then(|h| h.chance),
        hit_rate_detected_chance: hits.as_ref().and_then(|h| h.chance_detected),
        // Alert episodes (k of n consecutive frames) only mean something on a time series.
        events: main.event_report.as_ref().filter(|_| !table).cloned(),
        train_seconds,
        frames_per_second: main.pipeline.frames_per_second(),
    })
}

/// MSS-PAE's split: inliers and outliers each shuffled (seeded) and cut 50/25/25 into
/// train, validation and test; returns (train ∪ validation rows, test rows), each sorted:
/// a 75/25 cut per class, so three quarters of the outliers are trained on.
pub fn split_50_25_25(labels: &[u8], seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut rng = Rng::new(seed ^ 0x0053_504C_4954);
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for class in [0u8, 1] {
        let mut idx: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == class).collect();
        rng.shuffle(&mut idx);
        let cut = idx.len() * 3 / 4;
        train.extend_from_slice(&idx[..cut]);
        test.extend_from_slice(&idx[cut..]);
    }
    train.sort_unstable();
    test.sort_unstable();
    (train, test)
}

/// The rows of each table under [`OddsProtocol::Split`] with `seed` (`[train] seed`), as
/// CSV: `entity,row,part`, `part` being `train` or `test` and `row` counting the `.npz`'s
/// rows from 0, so that baselines can be run on the same split. A table that cannot be
/// read is left out (the harness reports it as failed).
pub fn split_rows_csv(entities: &[Entity], seed: u64) -> String {
    let mut s = String::from("entity,row,part\n");
    for e in entities {
        let Entity::Odds { name, path } = e else {
            continue;
        };
        let Ok((_, y)) = ingest::npz::read_npz_labelled(path) else {
            continue;
        };
        let (train, test) = split_50_25_25(&y, seed);
        let mut rows: Vec<(usize, &str)> = train
            .iter()
            .map(|&i| (i, "train"))
            .chain(test.iter().map(|&i| (i, "test")))
            .collect();
        rows.sort_unstable();
        for (i, part) in rows {
            let _ = writeln!(s, "{},{i},{part}", csv_field(name));
        }
    }
    s
}

/// Header of [`csv`]: one column per number of [`EntityResult`] that a reader compares.
const CSV_HEADER: &str = "entity,family,protocol,rows,anomalous,auroc,auprc,best_f1,pa_f1,\
auprc_mss_toggled,auprc_frames_alone,hit_rate_100,hit_rate_150,hit_rate_100_detected,\
hit_rate_150_detected,event_precision,event_recall,alerted_share,alerted_precision,mss_toggled_to,\
members,train_seconds,hit_rate_frames,hit_rate_frames_detected,seed,path,hit_rate_100_chance,\
hit_rate_150_chance,hit_rate_100_detected_chance,hit_rate_150_detected_chance";

/// Numbers per entity in [`numbers`].
const NUMBERS: usize = 14;

/// The numbers of one entity, in the order of [`table`]'s and [`CSV_HEADER`]'s columns.
fn numbers(r: &EntityResult) -> [Option<f64>; NUMBERS] {
    [
        r.auroc,
        r.auprc,
        r.best_f1,
        r.pa_f1,
        r.auprc_mss_toggled,
        r.auprc_unsmoothed,
        r.hit_rate.map(|h| h.0),
        r.hit_rate.map(|h| h.1),
        r.hit_rate_detected.map(|h| h.0),
        r.hit_rate_detected.map(|h| h.1),
        r.events.as_ref().and_then(|e| e.precision),
        r.events.as_ref().and_then(|e| e.recall),
        r.events.as_ref().and_then(|e| e.alerted_share),
        r.events.as_ref().and_then(|e| e.alerted_precision),
    ]
}

/// The results as CSV for spreadsheets and scripts: one row per entity and a `mean
/// <family>` row per family (its counts, members and training time empty), the same
/// numbers as [`table`] at full precision, an empty cell where the table prints "-". Then
/// the frames each HitRate averages over (all, detected), the seed (`[train] seed`, the
/// same on every row, so that a CSV says how to get its numbers again) and the entity's
/// file as it was found (empty on a mean row), and the HitRates a random ranking of the
/// features would score on the same frames, all and detected (on a mean row, their mean). Columns are only
/// ever added at the end: readers take them by name.
pub fn csv(results: &[EntityResult], cfg: &DarkwatchConfig) -> String {
    let alt = describe_mss(toggled_mss(cfg.mss));
    let seed = cfg.train.seed;
    let mut s = String::new();
    let _ = writeln!(s, "{CSV_HEADER}");
    let mut row = |name: &str,
                   family: &str,
                   protocol: &str,
                   counts: [String; 2],
                   v: [Option<f64>; NUMBERS],
                   tail: [String; 5],
                   chance: [Option<(f64, f64)>; 2]| {
        let mut line = [csv_field(name), family.into(), protocol.into()].join(",");
        for c in counts.iter().cloned().chain(
            v.iter()
                .map(|x| x.map_or_else(String::new, |x| x.to_string())),
        ) {
            line.push(',');
            line.push_str(&c);
        }
        let pair =
            |c: Option<(f64, f64)>| c.map_or_else(|| ",".to_owned(), |(a, b)| format!("{a},{b}"));
        let (all, det) = (pair(chance[0]), pair(chance[1]));
        let _ = writeln!(
            s,
            "{line},{},{},{seed},{},{all},{det}",
            csv_field(&alt),
            tail[..4].join(","),
            tail[4]
        );
    };
    let families = families(results);
    for family in families {
        let rows: Vec<&EntityResult> = results.iter().filter(|r| r.family == family).collect();
        for r in &rows {
            row(
                &r.name,
                family,
                &csv_field(r.protocol),
                [r.rows.to_string(), r.anomalous.to_string()],
                numbers(r),
                [
                    r.members.to_string(),
                    format!("{:.3}", r.train_seconds),
                    r.hit_rate_frames
                        .map_or_else(String::new, |f| f.0.to_string()),
                    r.hit_rate_frames
                        .and_then(|f| f.1)
                        .map_or_else(String::new, |d| d.to_string()),
                    csv_field(&r.path.to_string_lossy()),
                ],
                [r.hit_rate_chance, r.hit_rate_detected_chance],
            );
        }
        row(
            &format!("mean {family}"),
            family,
            "",
            Default::default(),
            means(&rows),
            Default::default(),
            [
                mean_chance(&rows, |r| r.hit_rate_chance),
                mean_chance(&rows, |r| r.hit_rate_detected_chance),
            ],
        );
    }
    s
}

/// Each of [`numbers`] averaged over `rows` (over those that have it).
fn means(rows: &[&EntityResult]) -> [Option<f64>; NUMBERS] {
    let mut out = [None; NUMBERS];
    for (k, m) in out.iter_mut().enumerate() {
        let v: Vec<f64> = rows.iter().filter_map(|r| numbers(r)[k]).collect();
        *m = (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    }
    out
}

/// A chance level (`get`: [`EntityResult::hit_rate_chance`] or its detected-frames twin)
/// averaged over `rows` (over those that have it).
fn mean_chance(
    rows: &[&EntityResult],
    get: impl Fn(&EntityResult) -> Option<(f64, f64)>,
) -> Option<(f64, f64)> {
    let v: Vec<(f64, f64)> = rows.iter().filter_map(|r| get(r)).collect();
    let n = v.len() as f64;
    (!v.is_empty()).then(|| {
        (
            v.iter().map(|c| c.0).sum::<f64>() / n,
            v.iter().map(|c| c.1).sum::<f64>() / n,
        )
    })
}

/// The families of `results` in order of first appearance, each once (a folder sorted by
/// name can hold ODDS, SMD, ODDS: each family still gets one block and one mean).
fn families(results: &[EntityResult]) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for r in results {
        if !out.contains(&r.family) {
            out.push(r.family);
        }
    }
    out
}

/// "off", or MSS's rounds and neighbours as the table's header names them.
fn describe_mss(mss: MssConfig) -> String {
    if mss.is_off() {
        "off".to_string()
    } else {
        format!("m={} k={}", mss.rounds, mss.neighbours)
    }
}

/// A CSV field, quoted when it holds a comma, a quote or a line break.
fn csv_field(v: &str) -> String {
    if v.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.to_string()
    }
}

/// [`numbers`] as the table's cells, each right-aligned under its header.
fn cells(v: [Option<f64>; NUMBERS]) -> String {
    const WIDTHS: [usize; NUMBERS] = [6, 6, 6, 7, 10, 9, 7, 7, 11, 11, 6, 6, 7, 6];
    let cells: Vec<String> = v
        .iter()
        .zip(WIDTHS)
        .map(|(&v, w)| format!("{:>w$}", cell(v)))
        .collect();
    cells.join(" ")
}

fn cell(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.3}"))
}

/// The results as one table (with a mean row per family). `config` says where `cfg` came
/// from ([`crate::config::source_name`]: the file or `(defaults)`, and the environment
/// variables that override it): with the seed it heads the
/// table, so that a pasted table says how to get its numbers again.
pub fn table(results: &[EntityResult], cfg: &DarkwatchConfig, config: &str) -> String {
    let mut s = String::new();
    let mss = describe_mss(cfg.mss);
    let alt = describe_mss(toggled_mss(cfg.mss));
    let _ = writeln!(s, "config {config}; seed {} ([train] seed)", cfg.train.seed);
    let _ = writeln!(
        s,
        "head {}, model {:?}, MSS {mss}; point-wise metrics, no point adjustment",
        cfg.score.head().describe(),
        cfg.model.kind
    );
    let _ = writeln!(
        s,
        "{:<16} {:<18} {:>7} {:>6} {:>6} {:>6} {:>7} {:>10} {:>9} {:>7} {:>7} {:>11} {:>11} {:>6} {:>6} {:>7} {:>6} {:>6}",
        "entity",
        "protocol",
        "rows",
        "AUROC",
        "AUPRC",
        "F1",
        "PA-F1*",
        format!("AUPRC/{alt}"),
        "AUPRC/1fr",
        "HR@100",
        "HR@150",
        "HR@100(det)",
        "HR@150(det)",
        "ev-P",
        "ev-R",
        "alerted",
        "al-P",
        "train"
    );
    let families = families(results);
    for &family in &families {
        let rows: Vec<&EntityResult> = results.iter().filter(|r| r.family == family).collect();
        for r in &rows {
            let _ = writeln!(
                s,
                "{:<16} {:<18} {:>7} {} {:>5.1}s",
                r.name,
                r.protocol,
                r.rows,
                cells(numbers(r)),
                r.train_seconds
            );
        }
        let _ = writeln!(
            s,
            "{:<16} {:<18} {:>7} {}",
            format!("mean {family}"),
            "",
            "",
            cells(means(&rows))
        );
    }
    let _ = writeln!(
        s,
        "AUPRC/{alt}: AUPRC with mean-shift scoring toggled against the configuration's (MSS {mss}; [mss] rounds and neighbours), so that MSS earns its place.\nAUPRC/1fr: every frame scored alone, where the model averages scores over frames ([score] smooth_frames; \"-\" where it does not, as for tables).\n* PA-F1 is point-adjusted (a segment counts as found if any point in it is flagged): inflated, for comparison with papers only; none for tables, whose rows have no order."
    );
    let _ = writeln!(
        s,
        "ev-P / ev-R: alert episodes ({} threshold, {}-of-{} firing) that overlap a labelled segment / segments an episode overlaps; they count episodes, so an alert that never ends scores ev-R 1.\nalerted / al-P: share of frames inside alert episodes / labelled-anomalous frames among them (the frame precision of the alerts).\nHR@100 / HR@150: OmniAnomaly's HitRate, the top floor(P·|culprits|) contributions (InterFusion's rounding), over every scored frame in an interpretation segment with culprits, whatever its point label (the headline).\nHR@100(det) / HR@150(det): a second protocol, not the headline: the same over the detected frames only, those labelled anomalous in a segment and scored at or above the point-wise best-F1 threshold (the F1 column's, chosen with the labels), as InterFusion's evaluation picks them; each frame is still ranked by its own contributions (InterFusion ranks each segment once).",
        cfg.threshold.kind.name(),
        cfg.alert.fire_k,
        cfg.alert.fire_n
    );
    // Without both classes among the scored rows a ranking cannot be judged: said, rather
    // than left as "-" cells.
    for r in results {
        let why = if r.anomalous == 0 {
            "no anomalous rows in the labels"
        } else if r.anomalous == r.rows {
            "every row is labelled anomalous"
        } else {
            continue;
        };
        let _ = writeln!(
            s,
            "{}: {why}: AUROC/AUPRC and F1 undefined (\"-\").",
            r.name
        );
    }
    // How many frames each HitRate averages over: the detected share can be small.
    let hit_frames: Vec<String> = results
        .iter()
        .filter_map(|r| {
            r.hit_rate_frames.map(|(all, det)| {
                let det = det.map_or_else(|| "-".to_owned(), |d| d.to_string());
                format!("{} {all} / {det}", r.name)
            })
        })
        .collect();
    if !hit_frames.is_empty() {
        let _ = writeln!(
            s,
            "HitRate frames (all / detected): {}.",
            hit_frames.join(", ")
        );
    }
    // What a random ranking scores on the same frames: a segment that blames half the
    // metrics gets a high HitRate@150 by chance alone.
    let mut chance: Vec<String> = Vec::new();
    for &family in &families {
        let rows: Vec<&EntityResult> = results.iter().filter(|r| r.family == family).collect();
        let det = |c: Option<(f64, f64)>| {
            c.map_or_else(String::new, |(a, b)| format!(" (det {a:.3} / {b:.3})"))
        };
        let named: Vec<String> = rows
            .iter()
            .filter_map(|r| {
                r.hit_rate_chance.map(|(a, b)| {
                    format!(
                        "{} {a:.3} / {b:.3}{}",
                        r.name,
                        det(r.hit_rate_detected_chance)
                    )
                })
            })
            .collect();
        let all = mean_chance(&rows, |r| r.hit_rate_chance);
        if let (false, Some((a, b))) = (named.is_empty(), all) {
            chance.extend(named);
            chance.push(format!(
                "mean {family} {a:.3} / {b:.3}{}",
                det(mean_chance(&rows, |r| r.hit_rate_detected_chance))
            ));
        }
    }
    if !chance.is_empty() {
        let _ = writeln!(
            s,
            "HitRate by chance (@100 / @150; a random order of the features on the same frames, the floor to read HR@100 / HR@150 against; det: on the detected frames, the floor of HR(det)): {}.",
            chance.join(", ")
        );
    }
    let ensembles: Vec<String> = results
        .iter()
        .filter(|r| r.members > 1)
        .map(|r| format!("{} ({})", r.name, r.members))
        .collect();
    if !ensembles.is_empty() {
        let _ = writeln!(
            s,
            "ensembles ([model] members; one network elsewhere): {}.",
            ensembles.join(", ")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_class_ratios_and_is_disjoint() {
        let labels: Vec<u8> = (0..400).map(|i| u8::from(i % 10 == 0)).collect();
        let (train, test) = split_50_25_25(&labels, 0);
        assert_eq!(train.len() + test.len(), 400);
        assert_eq!(train.iter().filter(|&&i| labels[i] == 1).count(), 30);
        assert_eq!(test.iter().filter(|&&i| labels[i] == 1).count(), 10);
        assert!(train.iter().all(|i| !test.contains(i)));
        assert_eq!(split_50_25_25(&labels, 0), (train, test));
    }

    #[test]
    fn discover_finds_smd_files_and_rejects_strangers() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "m-1_train.npy",
            "m-1_test.npy",
            "m-1_test_label.txt",
            "x.npz",
            "notes.txt",
        ] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        let found = discover(&[dir.path().to_path_buf()]).unwrap();
        let names: Vec<&str> = found.iter().map(Entity::name).collect();
        assert_eq!(names, vec!["m-1", "x"]);
        assert!(discover(&[dir.path().join("notes.txt")]).is_err());
        // A folder of folders: not searched below, said so, with the subfolders named.
        let outer = tempfile::tempdir().unwrap();
        std::fs::create_dir(outer.path().join("smd")).unwrap();
        let err = discover(&[outer.path().to_path_buf()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("holds no SMD <machine>_train.npy and no .npz file; subfolders are not searched: name them (")
                && err.contains("/smd)"),
            "{err}"
        );
    }

    /// A training file without its test partner fails alone, when its turn comes: the
    /// other entities of the folder still run (it used to stop the harness at discovery).
    #[test]
    fn an_incomplete_machine_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "m-1_train.npy",
            "m-1_test_label.txt",
            "x.npz",
            "y_train.npy",
        ] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        let found = discover(&[dir.path().to_path_buf()]).unwrap();
        let names: Vec<&str> = found.iter().map(Entity::name).collect();
        assert_eq!(names, vec!["m-1", "x", "y"]);
        assert!(matches!(found[0], Entity::Incomplete { .. }));
        assert!(matches!(found[1], Entity::Odds { .. }));
        let err = run_entity(&found[0], &DarkwatchConfig::default(), OddsProtocol::FitAll)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("m-1_train.npy")
                && err.contains("missing: ")
                && err.contains("m-1_test.npy"),
            "{err}"
        );
        assert!(!err.contains("m-1_test_label.txt"), "{err}");
        let err = run_entity(&found[2], &DarkwatchConfig::default(), OddsProtocol::FitAll)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("y_test.npy") && err.contains("y_test_label.txt"),
            "{err}"
        );
    }

    /// The benchmarks keep their names; one's own data is named by what it is.
    #[test]
    fn families_name_the_benchmarks_and_otherwise_what_the_data_is() {
        let smd = |name: &str| Entity::Smd {
            name: name.into(),
            train: PathBuf::new(),
            test: PathBuf::new(),
            labels: PathBuf::new(),
            interpretation: None,
        };
        assert_eq!(smd("machine-1-6").family(), "SMD");
        assert_eq!(smd("machine-12-10").family(), "SMD");
        assert_eq!(smd("co2").family(), "series");
        assert_eq!(smd("machine-1").family(), "series");
        // Named by its folder (a clash): still SMD.
        let named = Entity::Smd {
            name: "dirA/machine-1-6".into(),
            train: "dirA/machine-1-6_train.npy".into(),
            test: PathBuf::new(),
            labels: PathBuf::new(),
            interpretation: None,
        };
        assert_eq!(named.family(), "SMD");
        let odds = |path: &str| Entity::Odds {
            name: Path::new(path)
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .into_owned(),
            path: path.into(),
        };
        assert_eq!(odds("data/odds_adbench/cardio.npz").family(), "ODDS");
        assert_eq!(odds("/srv/ODDS/wine.npz").family(), "ODDS");
        // ADBench's numbering alone is no benchmark: anyone's own tables may be numbered.
        assert_eq!(odds("mine/6_cardio.npz").family(), "tables");
        assert_eq!(odds("h3/2_bc.npz").family(), "tables");
        assert_eq!(odds("mine/wine.npz").family(), "tables");
        assert_eq!(odds("mine/bc_1col.npz").family(), "tables");
        assert_eq!(odds("wine.npz").family(), "tables");
    }

    /// Labels without an anomaly leave nothing to rank: the table says so instead of only
    /// printing "-".
    #[test]
    fn the_table_says_why_metrics_are_undefined() {
        let mut none = result("calm", "tables", None);
        none.anomalous = 0;
        let mut all = result("loud", "tables", None);
        all.anomalous = all.rows;
        let t = table(
            &[none, all, result("fine", "tables", Some(0.7))],
            &DarkwatchConfig::default(),
            "(defaults)",
        );
        assert!(
            t.contains("calm: no anomalous rows in the labels: AUROC/AUPRC and F1 undefined"),
            "{t}"
        );
        assert!(t.contains("loud: every row is labelled anomalous"), "{t}");
        assert!(!t.contains("fine: "), "{t}");
    }

    /// A file named twice, or a folder and a file in it, is one entity: counted twice it
    /// would weigh double in the family's mean.
    #[test]
    fn discover_evaluates_each_file_once() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "a.npz",
            "b.npz",
            "m-1_train.npy",
            "m-1_test.npy",
            "m-1_test_label.txt",
        ] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        let a = dir.path().join("a.npz");
        let dotted = dir.path().join(".").join("a.npz");
        let names = |paths: &[PathBuf]| -> Vec<String> {
            discover(paths)
                .unwrap()
                .iter()
                .map(|e| e.name().to_string())
                .collect()
        };
        assert_eq!(
            names(&[a.clone(), dotted, dir.path().join("b.npz")]),
            ["a", "b"]
        );
        assert_eq!(
            names(&[
                dir.path().to_path_buf(),
                a.clone(),
                dir.path().join("m-1_train.npy")
            ]),
            ["a", "b", "m-1"]
        );
        // Same names in different folders are different tables, named by their folders.
        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join("a.npz"), b"").unwrap();
        let folder = |d: &Path| d.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(
            names(&[a, other.path().join("a.npz")]),
            [
                format!("{}/a", folder(dir.path())),
                format!("{}/a", folder(other.path()))
            ]
        );
    }

    /// Two series called `uni` in two folders were two rows called `uni`, in the table and
    /// the CSV, both in the family's mean: a clash is named by as much of the folder as
    /// tells the two apart, and a name without a clash stays plain.
    #[test]
    fn clashing_names_are_told_apart_by_their_folders() {
        let root = tempfile::tempdir().unwrap();
        for d in ["x/dirA", "y/dirA", "dirB"] {
            let d = root.path().join(d);
            std::fs::create_dir_all(&d).unwrap();
            for f in ["uni_train.npy", "uni_test.npy", "uni_test_label.txt"] {
                std::fs::write(d.join(f), b"").unwrap();
            }
        }
        std::fs::write(root.path().join("dirB/solo.npz"), b"").unwrap();
        // A table beside a series of the same name: the folder cannot tell them apart.
        std::fs::write(root.path().join("dirB/uni.npz"), b"").unwrap();
        let found = discover(&[root.path().join("dirB"), root.path().join("x/dirA")]).unwrap();
        let names: Vec<&str> = found.iter().map(Entity::name).collect();
        assert_eq!(
            names,
            ["solo", "dirB/uni.npz", "dirB/uni_train.npy", "dirA/uni"]
        );
        let found = discover(&[root.path().join("x/dirA"), root.path().join("y/dirA")]).unwrap();
        let names: Vec<&str> = found.iter().map(Entity::name).collect();
        assert_eq!(names, ["x/dirA/uni", "y/dirA/uni"]);
        let found = discover(&[root.path().join("x/dirA"), root.path().join("dirB")]).unwrap();
        let names: Vec<&str> = found.iter().map(Entity::name).collect();
        assert_eq!(
            names,
            ["dirA/uni", "solo", "dirB/uni.npz", "dirB/uni_train.npy"]
        );
        // The family follows the file, not the longer name.
        assert_eq!(found[0].family(), "series");
    }

    #[test]
    fn out_may_not_be_a_folder_or_an_input() {
        let dir = tempfile::tempdir().unwrap();
        let npz = dir.path().join("t.npz");
        std::fs::write(&npz, b"").unwrap();
        let cfg = dir.path().join("c.toml");
        std::fs::write(&cfg, b"").unwrap();
        let entities = discover(std::slice::from_ref(&npz)).unwrap();
        let err = check_out(&entities, None, dir.path()).unwrap_err();
        assert!(err.contains("is a folder"), "{err}");
        assert!(check_out(&entities, None, &npz).is_err());
        assert!(check_out(&entities, Some(&cfg), &cfg).is_err());
        assert!(check_out(&entities, Some(&cfg), &dir.path().join("r.csv")).is_ok());
    }

    #[test]
    fn errors_leave_the_entity_name_to_the_caller() {
        let e = HarnessError::Train {
            entity: "tiny".into(),
            source: TrainError::Diverged { epoch: 3 },
        };
        assert_eq!(
            e.to_string(),
            "training failed: training diverged at epoch 3: the loss is not finite"
        );
    }

    fn result(name: &str, family: &'static str, auroc: Option<f64>) -> EntityResult {
        EntityResult {
            name: name.into(),
            path: format!("d/{name}.npz").into(),
            family,
            protocol: "fit on all",
            rows: 10,
            anomalous: 2,
            auroc,
            auprc: Some(0.5),
            best_f1: None,
            pa_f1: None,
            auprc_mss_toggled: None,
            mss_on: false,
            auprc_unsmoothed: None,
            hit_rate: Some((0.25, 0.75)),
            hit_rate_detected: Some((0.5, 1.0)),
            hit_rate_frames: Some((8, Some(2))),
            hit_rate_chance: Some((0.125, 0.25)),
            hit_rate_detected_chance: Some((0.5, 0.625)),
            events: None,
            train_seconds: 1.5,
            frames_per_second: 1.0,
            members: 5,
        }
    }

    #[test]
    fn csv_has_a_field_per_header_column_and_a_mean_per_family() {
        let results = [
            result("a,b", "ODDS", Some(0.8)),
            result("m", "SMD", None),
            result("c", "ODDS", Some(0.6)),
        ];
        // Interleaved families (a folder sorted by name) still give one block each.
        let t = table(&results, &DarkwatchConfig::default(), "(defaults)");
        assert!(
            t.starts_with("config (defaults); seed 0 ([train] seed)\n"),
            "{t}"
        );
        // Every column is explained under the table, the MSS one too.
        assert!(
            t.contains("\nAUPRC/m=1 k=10: AUPRC with mean-shift scoring toggled"),
            "{t}"
        );
        assert_eq!(t.matches("\nmean ODDS").count(), 1, "{t}");
        assert_eq!(t.matches("\nc ").count(), 1, "{t}");
        let out = csv(&results, &DarkwatchConfig::default());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], CSV_HEADER);
        let width = CSV_HEADER.split(',').count();
        assert_eq!(lines.len(), 1 + 3 + 2, "{out}");
        // The quoted name holds one comma more than its fields.
        assert!(
            lines[1].starts_with("\"a,b\",ODDS,fit on all,10,2,0.8,0.5,,,"),
            "{out}"
        );
        // The quoted name and the quoted path each hold one comma more than their fields.
        assert_eq!(lines[1].split(',').count(), width + 2, "{out}");
        for l in &lines[2..] {
            assert_eq!(l.split(',').count(), width, "{l}");
        }
        let mean_odds: Vec<&str> = lines[3].split(',').collect();
        assert_eq!(
            &mean_odds[..6],
            ["mean ODDS", "ODDS", "", "", "", "0.7"],
            "{out}"
        );
        // A mean row has the seed but no counts, time or path.
        assert!(
            lines[3].ends_with(",m=1 k=10,,,,,0,,0.125,0.25,0.5,0.625"),
            "{out}"
        );
        assert!(
            lines[2].ends_with(",m=1 k=10,5,1.500,8,2,0,d/c.npz,0.125,0.25,0.5,0.625"),
            "{out}"
        );
        assert!(
            lines[1].ends_with(",0,\"d/a,b.npz\",0.125,0.25,0.5,0.625"),
            "{out}"
        );
        // An entity without AUROC leaves the cell (and its family's mean) empty.
        assert!(lines[4].starts_with("m,SMD,fit on all,10,2,,0.5,"), "{out}");
        assert!(lines[5].starts_with("mean SMD,SMD,,,,,0.5,"), "{out}");
        // The detected-frames HitRate follows the headline one, labelled as such.
        assert!(lines[5].contains(",0.25,0.75,0.5,1,"), "{out}");
        // Each value lands in the column its header names.
        let cell = |line: &str, column: &str| {
            let i = CSV_HEADER.split(',').position(|c| c == column).unwrap();
            line.split(',').nth(i).unwrap().to_owned()
        };
        for (column, want) in [
            ("hit_rate_100", "0.25"),
            ("hit_rate_150", "0.75"),
            ("hit_rate_100_detected", "0.5"),
            ("hit_rate_150_detected", "1"),
            ("hit_rate_frames", "8"),
            ("hit_rate_frames_detected", "2"),
            ("hit_rate_100_chance", "0.125"),
            ("hit_rate_150_chance", "0.25"),
            ("hit_rate_100_detected_chance", "0.5"),
            ("hit_rate_150_detected_chance", "0.625"),
        ] {
            assert_eq!(cell(lines[4], column), want, "{column}: {out}");
        }
        // No best-F1 threshold: no count of detected frames, an empty cell (not 0).
        let mut one_class = result("o", "SMD", None);
        one_class.hit_rate_detected = None;
        one_class.hit_rate_frames = Some((8, None));
        one_class.hit_rate_chance = None;
        one_class.hit_rate_detected_chance = None;
        let out1 = csv(&[one_class.clone()], &DarkwatchConfig::default());
        let line1 = out1.lines().nth(1).unwrap();
        assert_eq!(cell(line1, "hit_rate_frames"), "8", "{out1}");
        assert_eq!(cell(line1, "hit_rate_frames_detected"), "", "{out1}");
        assert_eq!(cell(line1, "hit_rate_100_detected"), "", "{out1}");
        assert_eq!(cell(line1, "hit_rate_150_chance"), "", "{out1}");
        assert_eq!(cell(line1, "hit_rate_150_detected_chance"), "", "{out1}");
        let t1 = table(&[one_class], &DarkwatchConfig::default(), "(defaults)");
        assert!(
            t1.contains("HitRate frames (all / detected): o 8 / -."),
            "{t1}"
        );
        assert!(t.contains("HR@150(det)"), "{t}");
        assert!(t.contains("a second protocol, not the headline"), "{t}");
        assert!(
            t.contains("HitRate frames (all / detected): a,b 8 / 2, m 8 / 2, c 8 / 2."),
            "{t}"
        );
        // The chance level per entity, and its mean per family.
        assert!(
            t.contains("the floor of HR(det)): a,b 0.125 / 0.250 (det 0.500 / 0.625), c 0.125 / 0.250 (det 0.500 / 0.625), mean ODDS 0.125 / 0.250 (det 0.500 / 0.625), m 0.125 / 0.250 (det 0.500 / 0.625), mean SMD 0.125 / 0.250 (det 0.500 / 0.625)."),
            "{t}"
        );
        assert!(!t1.contains("HitRate by chance"), "{t1}");
    }

    /// An ODDS-shaped `.npz` of `n` rows × `d` columns in `dir`, its rows where `outlier`
    /// holds shifted by 6 and labelled 1.
    fn table_npz(dir: &Path, n: usize, d: usize, outlier: impl Fn(usize) -> bool) -> PathBuf {
        table_npz_with(dir, "t", n, d, outlier, |_, _, v| v)
    }

    /// [`table_npz`] named `name`, each cell (row, column, value) passed through `cell`.
    fn table_npz_with(
        dir: &Path,
        name: &str,
        n: usize,
        d: usize,
        outlier: impl Fn(usize) -> bool,
        cell: impl Fn(usize, usize, f64) -> f64,
    ) -> PathBuf {
        use crate::ingest::npz::tests::{npy, stored_zip};
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..n {
            let outlier = outlier(i);
            for j in 0..d {
                let v = ((i * 7 + j * 13) % 17) as f64 / 17.0;
                x.push(cell(i, j, if outlier { v + 6.0 } else { v }));
            }
            y.push(i64::from(outlier));
        }
        let x: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let y: Vec<u8> = y.iter().flat_map(|v| v.to_le_bytes()).collect();
        let zip = stored_zip(&[
            ("X.npy", npy("<f8", &format!("({n}, {d})"), &x)),
            ("y.npy", npy("<i8", &format!("({n},)"), &y)),
        ]);
        let path = dir.join(format!("{name}.npz"));
        std::fs::write(&path, zip).unwrap();
        path
    }

    /// The harness read an `.npz` table strictly and stopped at a NaN that `train --table`
    /// fills. Now every gap takes its column's mean (a table's rows have no order, so
    /// nothing is carried), so fit on all, the numbers equal those of the table filled by
    /// hand; the split protocol fills its test rows with the training mean and runs too.
    #[test]
    fn table_gaps_take_the_column_mean_as_train_table_fills_them() {
        let (n, d) = (240, 3);
        let dir = tempfile::tempdir().unwrap();
        let outlier = |i: usize| i % 10 == 9;
        let gaps = [(5, 1), (6, 1), (100, 2), (119, 0)];
        let gappy = table_npz_with(dir.path(), "gappy", n, d, outlier, |i, j, v| {
            if gaps.contains(&(i, j)) { f64::NAN } else { v }
        });
        // By hand: each gap takes the mean of its column's values (as f32, as read).
        let value = |i: usize, j: usize| {
            let v = ((i * 7 + j * 13) % 17) as f64 / 17.0;
            f64::from((if outlier(i) { v + 6.0 } else { v }) as f32)
        };
        let mean = |j: usize| {
            let kept: Vec<f64> = (0..n)
                .filter(|&i| !gaps.contains(&(i, j)))
                .map(|i| value(i, j))
                .collect();
            kept.iter().sum::<f64>() / kept.len() as f64
        };
        let filled = table_npz_with(dir.path(), "filled", n, d, outlier, |i, j, v| {
            if gaps.contains(&(i, j)) {
                f64::from(mean(j) as f32)
            } else {
                v
            }
        });
        let mut cfg = DarkwatchConfig::default();
        cfg.train.epochs_max = 3;
        cfg.model.members = 1;
        let run = |path: &Path, protocol| {
            let entity = Entity::Odds {
                name: "t".into(),
                path: path.to_path_buf(),
            };
            run_entity(&entity, &cfg, protocol).unwrap()
        };
        let (a, b) = (
            run(&gappy, OddsProtocol::FitAll),
            run(&filled, OddsProtocol::FitAll),
        );
        assert!(a.auroc.is_some(), "{a:?}");
        assert_eq!((a.auroc, a.auprc, a.best_f1), (b.auroc, b.auprc, b.best_f1));
        let split = run(&gappy, OddsProtocol::Split);
        assert!(split.auroc.is_some_and(f64::is_finite), "{split:?}");
        // A column with no value at all is refused, saying what to do.
        let empty = table_npz_with(dir.path(), "empty", n, d, outlier, |_, j, v| {
            if j == 2 { f64::NAN } else { v }
        });
        let entity = Entity::Odds {
            name: "empty".into(),
            path: empty,
        };
        let err = run_entity(&entity, &cfg, OddsProtocol::FitAll)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("has no values") && err.contains("fill or drop the gaps"),
            "{err}"
        );
    }

    /// A table's rows have no order, so it gets no point-adjusted F1 (a run of outlier
    /// rows would pass for a segment).
    #[test]
    fn a_table_gets_no_point_adjusted_f1() {
        let n = 240;
        let dir = tempfile::tempdir().unwrap();
        let path = table_npz(dir.path(), n, 3, |i| i >= n - 24);
        let mut cfg = DarkwatchConfig::default();
        cfg.train.epochs_max = 3;
        cfg.model.members = 1;
        let entity = Entity::Odds {
            name: "t".into(),
            path,
        };
        let r = run_entity(&entity, &cfg, OddsProtocol::FitAll).unwrap();
        assert!(r.auroc.is_some() && r.best_f1.is_some(), "{r:?}");
        assert_eq!(r.pa_f1, None);
    }

    /// The split written beside `--out` is the one trained and scored: every row once,
    /// three quarters of each class in `train`.
    #[test]
    fn split_rows_are_the_split_the_harness_uses() {
        let n = 200;
        let dir = tempfile::tempdir().unwrap();
        let outlier = |i: usize| i.is_multiple_of(10);
        let path = table_npz(dir.path(), n, 2, outlier);
        let labels: Vec<u8> = (0..n).map(|i| u8::from(outlier(i))).collect();
        let entities = [Entity::Odds {
            name: "t".into(),
            path,
        }];
        let csv = split_rows_csv(&entities, 7);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "entity,row,part");
        assert_eq!(lines.len(), 1 + n);
        let (train, test) = split_50_25_25(&labels, 7);
        for (i, line) in lines[1..].iter().enumerate() {
            let part = if train.contains(&i) { "train" } else { "test" };
            assert_eq!(*line, format!("t,{i},{part}"));
        }
        assert_eq!(test.len(), 50);
        assert_eq!(test.iter().filter(|&&i| outlier(i)).count(), 5);
        assert_eq!(train.iter().filter(|&&i| outlier(i)).count(), 15);
    }

    /// A one-column table would get a lag window by default (a one-feature series does),
    /// and its first `w − 1` rows, outliers among them, would drop out of the metrics.
    #[test]
    fn a_one_column_table_scores_every_row() {
        let n = 300;
        let dir = tempfile::tempdir().unwrap();
        // Outliers among the first rows, which a window would only fill.
        let path = table_npz(dir.path(), n, 1, |i| i < 6 || i % 40 == 39);
        let mut cfg = DarkwatchConfig::default();
        cfg.train.epochs_max = 3;
        cfg.model.members = 1;
        assert_eq!(cfg.model.window_frames, 0, "the default picks a window");
        let entity = Entity::Odds {
            name: "t".into(),
            path,
        };
        let r = run_entity(&entity, &cfg, OddsProtocol::FitAll).unwrap();
        assert_eq!(r.rows, n, "{r:?}");
        assert_eq!(r.anomalous, 6 + n / 40, "{r:?}");
        assert!(r.auroc.is_some(), "{r:?}");
    }

    /// A series of `rows` × 3 as `<name>_train.npy` / `_test.npy` / `_test_label.txt` in
    /// `dir`, the test's rows 150..160 shifted by 5 and labelled 1; `gap` marks the cells
    /// (file, row, column) written as NaN, `fill` gives what to write there instead.
    fn series(
        dir: &Path,
        name: &str,
        rows: usize,
        cell: impl Fn(&str, usize, usize) -> Option<f32>,
    ) -> PathBuf {
        use crate::ingest::npz::tests::npy;
        for part in ["train", "test"] {
            let mut v: Vec<u8> = Vec::new();
            for i in 0..rows {
                for j in 0..3 {
                    let base = ((i * 7 + j * 13) % 17) as f32 / 17.0 + j as f32;
                    let base = if part == "test" && (150..160).contains(&i) {
                        base + 5.0
                    } else {
                        base
                    };
                    v.extend(cell(part, i, j).unwrap_or(base).to_le_bytes());
                }
            }
            let bytes = npy("<f4", &format!("({rows}, 3)"), &v);
            std::fs::write(dir.join(format!("{name}_{part}.npy")), bytes).unwrap();
        }
        let labels: String = (0..rows)
            .map(|i| {
                if (150..160).contains(&i) {
                    "1\n"
                } else {
                    "0\n"
                }
            })
            .collect();
        std::fs::write(dir.join(format!("{name}_test_label.txt")), labels).unwrap();
        dir.join(format!("{name}_train.npy"))
    }

    /// The harness read a series strictly and stopped at the first NaN that `train` and
    /// `replay` fill as a gap. Now it fills as they do (the column's last value; before
    /// the first one the column's mean in training), so its numbers equal those of the
    /// same files filled by hand.
    #[test]
    fn series_gaps_are_filled_as_train_and_replay_fill_them() {
        let dir = tempfile::tempdir().unwrap();
        let n = 240;
        let base = |i: usize, j: usize| ((i * 7 + j * 13) % 17) as f32 / 17.0 + j as f32;
        let gappy = series(dir.path(), "gappy", n, |part, i, j| match (part, i, j) {
            ("train", 0, 1) | ("train", 10, 2) | ("test", 40, 0) | ("test", 41, 0) => {
                Some(f32::NAN)
            }
            _ => None,
        });
        // By hand: training row 0's gap takes its column's mean, the others the value
        // before them.
        let mean1 = (1..n).map(|i| f64::from(base(i, 1))).sum::<f64>() / (n - 1) as f64;
        let filled = series(dir.path(), "filled", n, |part, i, j| match (part, i, j) {
            ("train", 0, 1) => Some(mean1 as f32),
            ("train", 10, 2) => Some(base(9, 2)),
            ("test", 40 | 41, 0) => Some(base(39, 0)),
            _ => None,
        });
        let mut cfg = DarkwatchConfig::default();
        cfg.train.epochs_max = 3;
        cfg.model.members = 1;
        let run = |train: &Path| {
            let found = discover(&[train.to_path_buf()]).unwrap();
            run_entity(&found[0], &cfg, OddsProtocol::FitAll).unwrap()
        };
        let (a, b) = (run(&gappy), run(&filled));
        assert!(a.auroc.is_some(), "{a:?}");
        assert_eq!((a.auroc, a.auprc, a.best_f1), (b.auroc, b.auprc, b.best_f1));
        // A column with no value is refused as `train` refuses it, saying what to do.
        let empty = series(dir.path(), "empty", n, |part, _, j| {
            (part == "train" && j == 2).then_some(f32::NAN)
        });
        let found = discover(&[empty]).unwrap();
        let err = run_entity(&found[0], &cfg, OddsProtocol::FitAll)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("empty_train.npy: column \"f2\" has no values")
                && err.contains("fill or drop the gaps"),
            "{err}"
        );
    }

    /// README: `harness` reads both label formats. A `.npy` is taken when there is no
    /// `.txt`; with both, the `.txt`.
    #[test]
    fn npy_test_labels_are_found_when_there_is_no_txt() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["sx_train.npy", "sx_test.npy", "sx_test_label.npy"] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        let labels = |found: &[Entity]| match &found[0] {
            Entity::Smd { labels, .. } => labels.file_name().unwrap().to_owned(),
            other => panic!("{other:?}"),
        };
        let found = discover(&[dir.path().to_path_buf()]).unwrap();
        assert_eq!(labels(&found), "sx_test_label.npy");
        std::fs::write(dir.path().join("sx_test_label.txt"), b"").unwrap();
        let found = discover(&[dir.path().to_path_buf()]).unwrap();
        assert_eq!(labels(&found), "sx_test_label.txt");
        // Neither: the message names both.
        std::fs::remove_file(dir.path().join("sx_test_label.txt")).unwrap();
        std::fs::remove_file(dir.path().join("sx_test_label.npy")).unwrap();
        let found = discover(&[dir.path().to_path_buf()]).unwrap();
        let err = run_entity(&found[0], &DarkwatchConfig::default(), OddsProtocol::FitAll)
            .unwrap_err()
            .to_string();
        assert!(err.contains("sx_test_label.txt (or .npy)"), "{err}");
    }

    #[test]
    fn toggling_mss_goes_both_ways() {
        let off = MssConfig {
            rounds: 0,
            ..MssConfig::default()
        };
        assert!(!toggled_mss(off).is_off());
        assert!(toggled_mss(toggled_mss(off)).is_off());
    }
}
