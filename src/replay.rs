//! Replay: a recorded file through the one pipeline, then an honest evaluation.
//!
//! Loads a model and a table, aligns the table's columns to the model's features, runs
//! [`crate::pipeline::run`] with a [`FileSource`] (ring policy `Block`: nothing is lost),
//! writes one CSV row per frame, and evaluates the scores against labels if given.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ndarray::Array2;

use crate::config::DarkwatchConfig;
use crate::eval::{self, Report};
use crate::ingest::{self, IngestError, Table, TableOptions};
use crate::model::{Model, ModelError};
use crate::mss::MssConfig;
use crate::pipeline::{self, FileSource, PipelineError, PipelineReport, ScoredFrame, Sink};
use crate::ring::FullPolicy;
use crate::score::{Head, HeadKind};

/// What to replay.
#[derive(Debug, Clone)]
pub struct ReplayRequest {
    pub model_dir: PathBuf,
    pub input: PathBuf,
    pub labels: Option<PathBuf>,
    pub out_csv: Option<PathBuf>,
    /// Frames per second; `None` = as fast as the scorer goes.
    pub rate: Option<f64>,
    /// Score with this head instead of the model's own (α, β from the config).
    pub head: Option<HeadKind>,
    /// Score with these mean-shift settings instead of the model's own (`rounds = 0`: off).
    pub mss: Option<MssConfig>,
}

/// Everything a replay measured.
#[derive(Debug)]
pub struct ReplayOutcome {
    pub model: Arc<Model>,
    pub head: Head,
    pub pipeline: PipelineReport,
    /// One score per input row, in order.
    pub scores: Vec<f32>,
    pub labels: Option<Vec<u8>>,
    pub eval: Option<Report>,
    /// The model's calibrated 99.9 % training-score quantile and how many frames exceed it.
    pub static_threshold: Option<(f32, usize)>,
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
}

/// Puts the table's columns in the model's feature order.
///
/// Same names in the same order: used as is. Same set of names in another order:
/// reordered. Generic names (`f0`, `f1`, … from NPY) on either side: matched by position
/// when the counts agree. Anything else is an error naming the first difference.
pub fn align_features(
    model: &Model,
    table: Table,
) -> Result<(Array2<f32>, Option<Vec<f64>>), ReplayError> {
    let want = &model.meta.features;
    let have = &table.features;
    let err = |reason: String| ReplayError::Features {
        input: table.path.clone(),
        reason,
    };
    if have.len() != want.len() {
        return Err(err(format!(
            "{} features in the input, but the model was trained on {} ({})",
            have.len(),
            want.len(),
            model.meta.provenance.data_file
        )));
    }
    let generic = |names: &[String]| names.iter().enumerate().all(|(i, n)| *n == format!("f{i}"));
    if have == want || generic(have) || generic(want) {
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

/// Runs a replay end to end.
///
/// # Errors
/// Unusable model or input, mismatched features or labels, a pipeline failure, or an
/// output file that cannot be written.
pub fn replay(req: &ReplayRequest, cfg: &DarkwatchConfig) -> Result<ReplayOutcome, ReplayError> {
    let mut model = Model::load(&req.model_dir)?;
    if let Some(mss) = req.mss {
        if !mss.is_off() && model.bank.is_none() {
            return Err(ReplayError::Features {
                input: req.model_dir.clone(),
                reason: "this model has no mean-shift reference bank; retrain with [mss] bank_frames > 0".into(),
            });
        }
        model = model.with_mss(mss);
    }
    let model = Arc::new(model);
    let opts = TableOptions {
        timestamp_column: Some(cfg.input.timestamp_column.clone()).filter(|s| !s.is_empty()),
    };
    let table = ingest::read_table(&req.input, &opts)?;
    let rows = table.values.nrows();
    let labels = match &req.labels {
        Some(path) => Some(ingest::read_labels(path, Some(rows))?),
        None => None,
    };
    let (values, timestamps) = align_features(&model, table)?;
    let head = match req.head {
        Some(kind) => Head {
            kind,
            alpha: cfg.score.wnll_alpha,
            beta: cfg.score.wnll_beta,
        },
        None => model.meta.head,
    };
    let static_ok = req.head.is_none() && req.mss.is_none();
    let frames = Frames {
        values,
        timestamps,
        labels,
    };
    let out = req.out_csv.as_deref();
    replay_frames(model, head, frames, out, req.rate, cfg, static_ok).map_err(|e| match e {
        ReplayError::Labels { reason, .. } => ReplayError::Labels {
            path: req.labels.clone().unwrap_or_default(),
            reason,
        },
        e => e,
    })
}

/// Frames to replay, already aligned to the model's features.
#[derive(Debug, Clone)]
pub struct Frames {
    pub values: Array2<f32>,
    pub timestamps: Option<Vec<f64>>,
    pub labels: Option<Vec<u8>>,
}

/// Replays in-memory frames through the pipeline (what [`replay`] does after loading
/// files; the evaluation harness calls it directly).
///
/// # Errors
/// A pipeline failure, an output file that cannot be written, or labels that do not fit.
pub fn replay_frames(
    model: Arc<Model>,
    head: Head,
    frames: Frames,
    out_csv: Option<&Path>,
    rate: Option<f64>,
    cfg: &DarkwatchConfig,
    report_static_threshold: bool,
) -> Result<ReplayOutcome, ReplayError> {
    let Frames {
        values,
        timestamps,
        labels,
    } = frames;
    let rows = values.nrows();
    let sink = ReplaySink::new(rows, &model.meta.features, out_csv)?;
    let source = FileSource::new(values, timestamps, rate);
    let (report, sink) = pipeline::run(
        model.clone(),
        head,
        cfg.score.top_contributions,
        &cfg.pipeline,
        FullPolicy::Block,
        source,
        sink,
    )?;
    if let Some(e) = sink.error {
        return Err(ReplayError::Output {
            path: out_csv.map(Path::to_path_buf).unwrap_or_default(),
            source: e,
        });
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
    let static_threshold = if report_static_threshold {
        model
            .meta
            .calibration
            .quantile(0.999)
            .map(|t| (t, scores.iter().filter(|&&s| s > t).count()))
    } else {
        None
    };
    Ok(ReplayOutcome {
        model,
        head,
        pipeline: report,
        scores,
        labels,
        eval,
        static_threshold,
    })
}

/// Collects scores by frame position and streams the per-frame CSV.
struct ReplaySink {
    scores: Vec<f32>,
    csv: Option<BufWriter<File>>,
    features: Arc<Vec<String>>,
    error: Option<std::io::Error>,
}

impl ReplaySink {
    fn new(rows: usize, features: &[String], out: Option<&Path>) -> Result<Self, ReplayError> {
        let csv = match out {
            Some(path) => {
                let file = File::create(path).map_err(|source| ReplayError::Output {
                    path: path.to_path_buf(),
                    source,
                })?;
                Some(BufWriter::with_capacity(1 << 16, file))
            }
            None => None,
        };
        Ok(ReplaySink {
            scores: vec![f32::NAN; rows],
            csv,
            features: Arc::new(features.to_vec()),
            error: None,
        })
    }

    fn header(&mut self, top: usize) {
        if let Some(w) = self.csv.as_mut() {
            let mut r = write!(w, "frame,timestamp,score");
            for k in 1..=top {
                r = r.and_then(|()| write!(w, ",top{k}_feature,top{k}_contribution"));
            }
            if let Err(e) = r.and_then(|()| writeln!(w)) {
                self.error.get_or_insert(e);
            }
        }
    }
}

impl Sink for ReplaySink {
    fn accept(&mut self, f: &ScoredFrame) {
        if let Some(slot) = self.scores.get_mut(f.meta.seq as usize) {
            *slot = f.score;
        }
        if f.meta.seq == 0 {
            self.header(f.n_top as usize);
        }
        if self.error.is_some() {
            return;
        }
        let Some(w) = self.csv.as_mut() else { return };
        let mut r = write!(w, "{},", f.meta.seq);
        if f.meta.timestamp.is_finite() {
            r = r.and_then(|()| write!(w, "{}", f.meta.timestamp));
        }
        r = r.and_then(|()| write!(w, ",{}", f.score));
        for c in f.top() {
            let name = self
                .features
                .get(c.feature as usize)
                .map_or("?", String::as_str);
            r = r.and_then(|()| write!(w, ",{name},{}", c.value));
        }
        if let Err(e) = r.and_then(|()| writeln!(w)) {
            self.error = Some(e);
        }
    }

    fn finish(&mut self) -> Result<(), std::io::Error> {
        if let Some(w) = self.csv.as_mut()
            && let Err(e) = w.flush()
        {
            self.error.get_or_insert(e);
        }
        Ok(())
    }
}

impl std::fmt::Display for ReplayOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = &self.pipeline;
        writeln!(
            f,
            "model {} ({} head, {}), {} frames scored in {} batches, {:.2} s",
            self.model.meta.id,
            self.head.kind.name(),
            match self.model.active_bank() {
                Some(b) => format!("MSS m={} k={}", b.rounds(), b.neighbours()),
                None => "no MSS".into(),
            },
            p.frames_scored,
            p.batches,
            p.elapsed.as_secs_f64()
        )?;
        if p.frames_dropped + p.frames_invalid > 0 {
            writeln!(
                f,
                "dropped {} frames, skipped {} invalid frames",
                p.frames_dropped, p.frames_invalid
            )?;
        }
        match &self.eval {
            Some(r) => writeln!(f, "{r}")?,
            None => writeln!(f, "no labels given: no detection metrics")?,
        }
        if let Some((t, above)) = self.static_threshold {
            writeln!(
                f,
                "static threshold (training q0.999 = {t:.4}): {above} frames above ({:.2} %)",
                100.0 * above as f64 / self.scores.len().max(1) as f64
            )?;
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
    fn pipeline_paced(&self) -> bool {
        // Batches near one frame each mean the scorer kept up: latency is not queueing.
        self.pipeline.frames_scored as f64 / (self.pipeline.batches.max(1) as f64) < 1.5
    }
}
