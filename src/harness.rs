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

use ndarray::{Array2, Axis};

use crate::config::DarkwatchConfig;
use crate::ingest::{self, IngestError, Segment, Table};
use crate::model::Model;
use crate::mss::MssConfig;
use crate::pipeline::Scorer;
use crate::replay::{Frames, Outputs, ReplayError, replay_frames};
use crate::rng::Rng;
use crate::train::TrainError;

/// How an ODDS table is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OddsProtocol {
    /// Train on every row, score every row (the usual unsupervised protocol).
    FitAll,
    /// MSS-PAE: inliers and outliers each split 50/25/25 (seeded); train on the first 75 %,
    /// score the last 25 %.
    Split,
}

/// One thing to evaluate.
#[derive(Debug, Clone)]
pub enum Entity {
    /// An SMD machine: `<m>_train.npy`, `<m>_test.npy`, `<m>_test_label.txt`, and optional
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
}

impl Entity {
    pub fn name(&self) -> &str {
        match self {
            Entity::Smd { name, .. } | Entity::Odds { name, .. } => name,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{path}: {reason}")]
    Discover { path: PathBuf, reason: String },
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error("{entity}: training failed: {source}")]
    Train { entity: String, source: TrainError },
    #[error("{entity}: {source}")]
    Replay { entity: String, source: ReplayError },
}

/// Turns paths into entities: an SMD `*_train.npy` (its test, label and interpretation
/// files are found beside it), a folder (every `*_train.npy` and `*.npz` in it), or a `.npz`.
///
/// # Errors
/// A path that is none of these, or an SMD machine whose test or label file is missing.
pub fn discover(paths: &[PathBuf]) -> Result<Vec<Entity>, HarnessError> {
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
                return Err(HarnessError::Discover {
                    path: path.clone(),
                    reason: "holds no SMD <machine>_train.npy and no .npz file".into(),
                });
            }
            out.extend(discover(&inner)?);
            continue;
        }
        let file = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(machine) = file.strip_suffix("_train.npy") {
            let dir = path.parent().unwrap_or(Path::new("."));
            let test = dir.join(format!("{machine}_test.npy"));
            let labels = dir.join(format!("{machine}_test_label.txt"));
            for needed in [&test, &labels] {
                if !needed.is_file() {
                    return Err(HarnessError::Discover {
                        path: path.clone(),
                        reason: format!("SMD machine needs {} beside it", needed.display()),
                    });
                }
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

/// One entity's numbers.
#[derive(Debug, Clone)]
pub struct EntityResult {
    pub name: String,
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
    /// OmniAnomaly HitRate@100 % and @150 % of the culprit metrics, where labelled.
    pub hit_rate: Option<(f64, f64)>,
    /// Alert events against labelled segments: (precision, recall).
    pub events: Option<(Option<f64>, Option<f64>)>,
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
    let (train, test, labels, segments, family, proto) = match entity {
        Entity::Smd {
            train,
            test,
            labels,
            interpretation,
            ..
        } => {
            let opts = Default::default();
            let train = ingest::read_table(train, &opts)?;
            let test = ingest::read_table(test, &opts)?;
            let labels = ingest::read_labels(labels, Some(test.values.nrows()))?;
            let segments = match interpretation {
                Some(p) => Some(ingest::read_interpretation_labels(p)?),
                None => None,
            };
            (
                train,
                test.values,
                labels,
                segments,
                "SMD",
                "train/test halves",
            )
        }
        Entity::Odds { path, .. } => {
            let (x, y) = ingest::npz::read_npz_labelled(path)?;
            match protocol {
                OddsProtocol::FitAll => {
                    let values = x.values.clone();
                    (x, values, y, None, "ODDS", "fit on all")
                }
                OddsProtocol::Split => {
                    let (tr, te) = split_50_25_25(&y, cfg.train.seed);
                    let train = Table {
                        values: x.values.select(Axis(0), &tr),
                        ..x.clone()
                    };
                    let labels = te.iter().map(|&i| y[i]).collect();
                    (
                        train,
                        x.values.select(Axis(0), &te),
                        labels,
                        None,
                        "ODDS",
                        "50/25/25 split",
                    )
                }
            }
        }
    };
    // A table's rows have no order: averaging a row's score with the rows before it would
    // mix unrelated points (and reward files that list their outliers together).
    let mut entity_cfg;
    let fit_cfg = if family == "ODDS" {
        entity_cfg = cfg.clone();
        entity_cfg.score.smooth_frames = 1;
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
    let frames = Frames::windowed(&model, test.clone(), None, Some(labels));
    let (labels, first_row) = (
        frames.labels.clone().unwrap_or_default(),
        frames.first_row(),
    );
    // The frames the model scores, for HitRate (the replay's source builds its own).
    let test = crate::window::windows(test.view(), model.meta.window_frames);
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
    let hit_rate = segments
        .as_ref()
        .and_then(|s| hit_rates(&model, &test, first_row, s));
    let eval = main.eval.clone();
    Ok(EntityResult {
        name,
        family,
        protocol: proto,
        rows: test.nrows(),
        anomalous: labels.iter().filter(|&&l| l == 1).count(),
        auroc: eval.as_ref().and_then(|e| e.auroc),
        auprc: eval.as_ref().and_then(|e| e.auprc),
        best_f1: eval.as_ref().and_then(|e| e.best_f1.as_ref().map(|b| b.f1)),
        pa_f1: eval
            .as_ref()
            .and_then(|e| e.pa_best_f1.as_ref().map(|b| b.f1)),
        auprc_mss_toggled: toggled.eval.and_then(|e| e.auprc),
        mss_on: !model.meta.mss.is_off(),
        auprc_unsmoothed: unsmoothed,
        members: model.ae.members,
        hit_rate,
        // Alert episodes (k of n consecutive frames) only mean something on a time series.
        events: main
            .event_report
            .as_ref()
            .filter(|_| family == "SMD")
            .map(|e| (e.precision, e.recall)),
        train_seconds,
        frames_per_second: main.pipeline.frames_per_second(),
    })
}

/// MSS-PAE split: inliers and outliers each shuffled (seeded) and cut 50/25/25; returns
/// (train ∪ valid rows, test rows), each sorted.
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

/// OmniAnomaly's HitRate@P%: for every labelled anomalous frame inside an interpretation
/// segment with culprit set G, the share of G among the frame's top ⌈P·|G|⌉ contributing
/// features; averaged over those frames. Contributions come from the pipeline's
/// [`Scorer`], smoothed over the whole series in order, so they are exactly the ones alerts
/// report; a windowed model's are summed over each feature's lags. `test` holds the frames
/// of the input rows from `first_row` on (segments count input rows). Returns (@100 %,
/// @150 %).
pub fn hit_rates(
    model: &Arc<Model>,
    test: &Array2<f32>,
    first_row: usize,
    segments: &[Segment],
) -> Option<(f64, f64)> {
    let mut scorer = Scorer::new(model.clone(), model.meta.head, 256, 1).ok()?;
    let d = model.n_features();
    let base = model.meta.frame_features().len();
    let (mut h100, mut h150, mut frames) = (0.0, 0.0, 0usize);
    let mut order: Vec<usize> = Vec::with_capacity(base);
    let mut per_feature = vec![0.0f32; base];
    // The segment (with culprits) each frame lies in, if any.
    let mut culprits: Vec<Option<&Segment>> = vec![None; test.nrows()];
    for seg in segments.iter().filter(|s| !s.dims.is_empty()) {
        let end = seg.end.saturating_sub(first_row).min(test.nrows());
        if seg.end < first_row {
            continue;
        }
        for slot in culprits
            .iter_mut()
            .take(end + 1)
            .skip(seg.start.saturating_sub(first_row))
        {
            *slot = Some(seg);
        }
    }
    let mut first = 0;
    for chunk in test.axis_chunks_iter(Axis(0), scorer.max_batch()) {
        let n = chunk.nrows();
        scorer.input_mut()[..n * d]
            .copy_from_slice(chunk.as_standard_layout().as_slice().expect("standard"));
        scorer.score(n);
        for i in 0..n {
            scorer.smooth(i, 0, f64::NAN);
        }
        let contrib = scorer.contributions(n);
        for (i, row) in contrib.rows().into_iter().enumerate() {
            let Some(seg) = culprits[first + i] else {
                continue;
            };
            per_feature.fill(0.0);
            for (j, &c) in row.iter().enumerate() {
                per_feature[j % base] += c;
            }
            order.clear();
            order.extend(0..base);
            order.sort_by(|&a, &b| per_feature[b].total_cmp(&per_feature[a]));
            let g = seg.dims.len();
            let hit = |p: f64| {
                let k = ((p * g as f64).ceil() as usize).min(base);
                order[..k].iter().filter(|j| seg.dims.contains(j)).count() as f64 / g as f64
            };
            h100 += hit(1.0);
            h150 += hit(1.5);
            frames += 1;
        }
        first += n;
    }
    (frames > 0).then(|| (h100 / frames as f64, h150 / frames as f64))
}

fn cell(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.3}"))
}

/// The results as one table (with a mean row per family).
pub fn table(results: &[EntityResult], cfg: &DarkwatchConfig) -> String {
    let mut s = String::new();
    let mss = if cfg.mss.is_off() {
        "off".to_string()
    } else {
        format!("m={} k={}", cfg.mss.rounds, cfg.mss.neighbours)
    };
    let alt = toggled_mss(cfg.mss);
    let alt = if alt.is_off() {
        "off".to_string()
    } else {
        format!("m={} k={}", alt.rounds, alt.neighbours)
    };
    let _ = writeln!(
        s,
        "head {}, model {:?}, MSS {mss}; point-wise metrics, no point adjustment",
        cfg.score.head().describe(),
        cfg.model.kind
    );
    let _ = writeln!(
        s,
        "{:<16} {:<18} {:>7} {:>6} {:>6} {:>6} {:>7} {:>10} {:>9} {:>7} {:>7} {:>6} {:>6} {:>6}",
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
        "ev-P",
        "ev-R",
        "train"
    );
    let mut families: Vec<&str> = results.iter().map(|r| r.family).collect();
    families.dedup();
    for family in families {
        let rows: Vec<&EntityResult> = results.iter().filter(|r| r.family == family).collect();
        for r in &rows {
            let _ = writeln!(
                s,
                "{:<16} {:<18} {:>7} {:>6} {:>6} {:>6} {:>7} {:>10} {:>9} {:>7} {:>7} {:>6} {:>6} {:>5.1}s",
                r.name,
                r.protocol,
                r.rows,
                cell(r.auroc),
                cell(r.auprc),
                cell(r.best_f1),
                cell(r.pa_f1),
                cell(r.auprc_mss_toggled),
                cell(r.auprc_unsmoothed),
                cell(r.hit_rate.map(|h| h.0)),
                cell(r.hit_rate.map(|h| h.1)),
                cell(r.events.and_then(|e| e.0)),
                cell(r.events.and_then(|e| e.1)),
                r.train_seconds
            );
        }
        let mean = |f: &dyn Fn(&EntityResult) -> Option<f64>| {
            let v: Vec<f64> = rows.iter().filter_map(|r| f(r)).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        let _ = writeln!(
            s,
            "{:<16} {:<18} {:>7} {:>6} {:>6} {:>6} {:>7} {:>10} {:>9} {:>7} {:>7} {:>6} {:>6}",
            format!("mean {family}"),
            "",
            "",
            cell(mean(&|r| r.auroc)),
            cell(mean(&|r| r.auprc)),
            cell(mean(&|r| r.best_f1)),
            cell(mean(&|r| r.pa_f1)),
            cell(mean(&|r| r.auprc_mss_toggled)),
            cell(mean(&|r| r.auprc_unsmoothed)),
            cell(mean(&|r| r.hit_rate.map(|h| h.0))),
            cell(mean(&|r| r.hit_rate.map(|h| h.1))),
            cell(mean(&|r| r.events.and_then(|e| e.0))),
            cell(mean(&|r| r.events.and_then(|e| e.1))),
        );
    }
    let _ = writeln!(
        s,
        "AUPRC/1fr: every frame scored alone, where the model averages scores over frames ([score] smooth_frames; \"-\" where it does not, as for tables).\n* PA-F1 is point-adjusted (a segment counts as found if any point in it is flagged): inflated, for comparison with papers only."
    );
    let _ = writeln!(
        s,
        "ev-P / ev-R: alert episodes ({} threshold, {}-of-{} firing) that overlap a labelled segment / segments an episode overlaps.",
        cfg.threshold.kind.name(),
        cfg.alert.fire_k,
        cfg.alert.fire_n
    );
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
        std::fs::remove_file(dir.path().join("m-1_test.npy")).unwrap();
        let err = discover(&[dir.path().join("m-1_train.npy")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("m-1_test.npy"), "{err}");
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
