//! The one scoring pipeline: a source pushes frames into the [`crate::ring`], a named
//! scorer thread drains bounded micro-batches, scales them, runs the model and the score
//! head, and hands [`ScoredFrame`]s through a second ring to a sink thread (or, for a
//! sink that asks for it, calls the sink itself: [`Sink::ON_SCORER_THREAD`]). With such a
//! sink the scorer is shared with the pushing thread, which scores what it pushed itself
//! whenever the scorer thread is idle (`SharedScorer`).
//!
//! `replay` runs exactly this with a [`FileSource`]; the agent runs it with live sources.
//! There is no second, batch-only scoring path: calibration at training time uses the
//! same [`Scorer`] that the scorer thread owns.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ndarray::{ArcArray2, Array2, ArrayView2, ArrayViewMut2};
use ringbuf::traits::{Consumer, Observer, Producer, Split};
use ringbuf::{HeapCons, HeapProd, HeapRb};

use crate::config::{MAX_TOP_CONTRIBUTIONS, PipelineConfig};
use crate::model::cuda::{CudaError, CudaSession};
use crate::model::onnx::{OnnxError, OnnxSession};
use crate::model::{Model, Workspace};
use crate::mss::{MssScratch, ReferenceBank};
use crate::ring::{
    Drainer, FrameConsumer, FrameMeta, FrameProducer, FullPolicy, Pushed, frame_ring,
};
use crate::score::{Head, HeadError};
use crate::smooth::Smoother;
use crate::stats::{LatencyHistogram, top_k_indices};

/// One feature's share of a frame's score.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Contribution {
    pub feature: u32,
    pub value: f32,
}

/// A scored frame as it leaves the scorer: fixed size, so the output ring never allocates.
#[derive(Debug, Clone, Copy)]
pub struct ScoredFrame {
    pub meta: FrameMeta,
    /// The anomaly score: with smoothing, the mean over the stream's last frames.
    pub score: f32,
    /// This frame's own score, before smoothing (online retraining admits frames by it).
    pub frame_score: f32,
    /// Largest contributions first; only the first `n_top` are set.
    pub top: [Contribution; MAX_TOP_CONTRIBUTIONS],
    pub n_top: u8,
    /// From ring entry to score, in ns.
    pub latency_ns: u64,
    /// The version of the model that scored it (online retraining increments it).
    pub model_version: u64,
}

impl Default for ScoredFrame {
    fn default() -> Self {
        ScoredFrame {
            meta: FrameMeta::default(),
            score: 0.0,
            frame_score: 0.0,
            top: [Contribution::default(); MAX_TOP_CONTRIBUTIONS],
            n_top: 0,
            latency_ns: 0,
            model_version: 0,
        }
    }
}

impl ScoredFrame {
    pub fn top(&self) -> &[Contribution] {
        &self.top[..self.n_top as usize]
    }
}

/// What the scorer thread runs on each micro-batch: the autoencoder [`Scorer`], or an SAE
/// with its dark-matter head ([`crate::sae::detector::SaeScorer`]).
pub trait BatchScorer: Send + 'static {
    fn max_batch(&self) -> usize;
    fn n_features(&self) -> usize;
    /// The raw input rows, `max_batch × d`, row-major: fill the first n rows, then
    /// [`Self::score_batch`] (or [`Self::submit`]).
    fn input_mut(&mut self) -> &mut [f32];
    /// Row `i` of the raw input of the last batch (scored, or collected).
    fn input_row(&self, i: usize) -> &[f32];
    /// Scores the first `n` input rows.
    fn score_batch(&mut self, n: usize);
    /// Averages row `i`'s score and contributions over its stream's recent frames (see
    /// [`Scorer::smooth`]); called once per row, in order, after [`Self::score_batch`] (or
    /// [`Self::collect`]).
    fn smooth(&mut self, _i: usize, _meta: &FrameMeta) {}
    /// The scores of the last batch.
    fn batch_scores(&self) -> &[f32];
    /// Fills the top contributions of row `i` of the last batch; returns how many.
    fn top_contributions(&self, i: usize, out: &mut [Contribution; MAX_TOP_CONTRIBUTIONS]) -> u8;
    /// Switches to the model a retrain published in `cell`, if it is new (between batches).
    fn follow(&mut self, _cell: &crate::retrain::ModelCell) {}
    /// Whether it may score on a thread other than the scorer's (a `SharedScorer`):
    /// not when it holds a per-thread resource (a CUDA context).
    fn any_thread(&self) -> bool {
        true
    }
    /// The version of the model that scored the last batch.
    fn model_version(&self) -> u64 {
        0
    }
    /// Whether batches overlap: [`Self::submit`] returns before its batch is scored, and
    /// [`Self::input_mut`] then gives another buffer, which the pipeline fills and submits
    /// while the first is scored (at most two batches in flight). A GPU scorer does this,
    /// so the host's work on one batch runs beside the device's on the other.
    fn overlaps(&self) -> bool {
        false
    }
    /// Starts scoring the first `n` input rows; [`Self::collect`] makes the oldest batch in
    /// flight the last batch. Without overlap it scores them at once.
    fn submit(&mut self, n: usize) {
        self.score_batch(n);
    }
    /// Waits for the oldest batch [`Self::submit`] started: its scores and contributions
    /// become the last batch's.
    fn collect(&mut self) {}
}

/// The `top_k` largest entries of `row`, largest first, into `out`; returns how many.
pub fn fill_top(row: &[f32], top_k: usize, out: &mut [Contribution; MAX_TOP_CONTRIBUTIONS]) -> u8 {
    let top_k = top_k.min(MAX_TOP_CONTRIBUTIONS).min(row.len());
    let mut idx = [0usize; MAX_TOP_CONTRIBUTIONS];
    top_k_indices(row, &mut idx[..top_k]);
    for (o, &j) in out.iter_mut().zip(&idx[..top_k]) {
        *o = Contribution {
            feature: j as u32,
            value: row[j],
        };
    }
    top_k as u8
}

/// `head`'s constants for `model` ([`crate::score::prepare_member_baselines`]).
fn head_constants(head: &Head, model: &Model) -> Vec<f32> {
    crate::score::prepare_member_baselines(
        head,
        &model.meta.log_variance_baseline,
        model.n_features(),
        model.ae.members,
    )
}

/// A device session for `gpu` with `head` (and its constants `baseline`) on the device.
fn device_session(
    gpu: &Arc<crate::model::cuda::CudaModel>,
    max_batch: usize,
    head: &Head,
    baseline: &[f32],
) -> Result<CudaSession, CudaError> {
    let mut session = CudaSession::new(gpu.clone(), max_batch)?;
    session.set_head(head, baseline)?;
    Ok(session)
}

/// The scoring step for one micro-batch: scale in place, forward pass, score head,
/// contributions. Owns every buffer it needs, sized once for `max_batch` rows.
pub struct Scorer {
    model: Arc<Model>,
    head: Head,
    /// The model's wnll constants ([`crate::score::prepare_member_baselines`]).
    baseline: Vec<f32>,
    ws: Workspace,
    input: Array2<f32>,
    scaled: Array2<f32>,
    /// The mean-shifted targets (only used when the model has an MSS bank).
    target: Array2<f32>,
    mss: Option<MssScratch>,
    scores: Vec<f32>,
    /// Rows of the last batch.
    last: usize,
    contrib: Array2<f32>,
    top_k: usize,
    /// The model's ONNX graph, when it runs on ONNX Runtime instead of the native kernels.
    onnx: Option<OnnxSession>,
    /// The model's GPU copy, when it runs on the CUDA backend.
    cuda: Option<CudaSession>,
    /// Batches ONNX Runtime or CUDA failed to run (their frames score NaN).
    backend_errors: u64,
    /// Each stream's recent scores and contributions ([`Scorer::smooth`]).
    smoother: Smoother,
}

/// Why a scorer cannot be made for a model.
#[derive(Debug, thiserror::Error)]
pub enum ScorerError {
    #[error(transparent)]
    Head(#[from] HeadError),
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error("the new model takes {model} features, the scorer {scorer}")]
    Features { model: usize, scorer: usize },
}

impl Scorer {
    /// # Errors
    /// The head cannot run on this model (e.g. `wnll` on a plain model), or ONNX Runtime
    /// cannot open a session for the model's ONNX graph.
    pub fn new(
        model: Arc<Model>,
        head: Head,
        max_batch: usize,
        top_k: usize,
    ) -> Result<Self, ScorerError> {
        head.check(model.ae.output)?;
        let d = model.n_features();
        let max_batch = max_batch.max(1);
        let onnx = match &model.onnx {
            Some(graph) => Some(OnnxSession::new(graph.clone(), max_batch)?),
            None => None,
        };
        let baseline = head_constants(&head, &model);
        let cuda = match &model.cuda {
            Some(gpu) => Some(device_session(gpu, max_batch, &head, &baseline)?),
            None => None,
        };
        Ok(Scorer {
            onnx,
            cuda,
            backend_errors: 0,
            ws: model.ae.workspace(max_batch),
            input: Array2::zeros((max_batch, d)),
            scaled: Array2::zeros((max_batch, d)),
            target: Array2::zeros((max_batch, d)),
            mss: model.active_bank().map(ReferenceBank::scratch),
            scores: vec![0.0; max_batch],
            last: 0,
            contrib: Array2::zeros((max_batch, d)),
            top_k: top_k.min(MAX_TOP_CONTRIBUTIONS).min(d),
            baseline,
            smoother: Smoother::new(model.meta.smooth_frames, d),
            model,
            head,
        })
    }

    pub fn max_batch(&self) -> usize {
        self.input.nrows()
    }

    /// The model this scorer runs.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Switches to `model` (a retrained version of the same network) between batches. The
    /// buffers are kept when the shapes match, else remade.
    ///
    /// # Errors
    /// The head cannot run on the new model, or its ONNX session cannot be opened; the
    /// scorer then keeps the old model.
    pub fn set_model(&mut self, model: Arc<Model>) -> Result<(), ScorerError> {
        if model.n_features() != self.n_features() {
            return Err(ScorerError::Features {
                model: model.n_features(),
                scorer: self.n_features(),
            });
        }
        self.head.check(model.ae.output)?;
        let onnx = match &model.onnx {
            Some(graph) => Some(OnnxSession::new(graph.clone(), self.max_batch())?),
            None => None,
        };
        let baseline = head_constants(&self.head, &model);
        // A model swapped in carries its own GPU copy (or none: then it scores natively).
        let cuda = match &model.cuda {
            Some(gpu) => Some(device_session(
                gpu,
                self.max_batch(),
                &self.head,
                &baseline,
            )?),
            None => None,
        };
        if model.ae.widths() != self.model.ae.widths() {
            self.ws = model.ae.workspace(self.max_batch());
        }
        self.mss = model.active_bank().map(ReferenceBank::scratch);
        // Means never mix two models' scores (after an adopted level shift the old one
        // scored the new normal high): every stream's history starts afresh.
        if model.meta.smooth_frames == self.smoother.frames() {
            self.smoother.reset();
        } else {
            self.smoother = Smoother::new(model.meta.smooth_frames, model.n_features());
        }
        self.onnx = onnx;
        self.cuda = cuda;
        self.baseline = baseline;
        self.model = model;
        Ok(())
    }

    /// Row `i` of the raw input of the last batch.
    pub fn input_row(&self, i: usize) -> &[f32] {
        let d = self.n_features();
        &self.input.as_slice().expect("owned arrays are contiguous")[i * d..(i + 1) * d]
    }

    pub fn n_features(&self) -> usize {
        self.input.ncols()
    }

    /// The raw input rows, `max_batch × d`, row-major: fill the first n rows, then [`Self::score`].
    pub fn input_mut(&mut self) -> &mut [f32] {
        self.input
            .as_slice_mut()
            .expect("owned arrays are contiguous")
    }

    /// Scores the first `n` rows of the input buffer; returns their scores.
    pub fn score(&mut self, n: usize) -> &[f32] {
        let n = n.min(self.max_batch());
        self.last = n;
        let d = self.n_features();
        let raw = &self.input.as_slice().expect("owned arrays are contiguous")[..n * d];
        // ONNX without MSS, at a batch size with a preallocated input (1 and the maximum):
        // scale straight into ONNX Runtime's bound input, which the head then reads as x
        // (one copy and one buffer fewer per frame).
        if self.model.active_bank().is_none()
            && let Some(session) = self.onnx.as_mut()
            && session.has_binding(n)
        {
            let scaler = &self.model.meta.scaler;
            let (head, baseline) = (&self.head, &self.baseline);
            let (scores, contrib) = (&mut self.scores[..n], self.contrib.view_mut());
            let ran = session.forward_bound(
                n,
                |input| scaler.scale_rows_into(raw, input),
                |x, recon| head.score_batch(x, recon, baseline, scores, contrib),
            );
            if let Err(e) = ran {
                self.onnx_failed(n, &e);
            }
            return &self.scores[..n];
        }
        self.model.meta.scaler.scale_rows_into(
            raw,
            &mut self
                .scaled
                .as_slice_mut()
                .expect("owned arrays are contiguous")[..n * d],
        );
        let x = self.scaled.slice(ndarray::s![..n, ..]);
        // MSS: the AE sees x; its output is scored against x moved toward the normal data.
        let (target, shifted) = match (self.model.active_bank(), self.mss.as_mut()) {
            (Some(bank), Some(scratch)) => {
                for (src, mut dst) in x.rows().into_iter().zip(self.target.rows_mut()) {
                    let src = src
                        .to_slice()
                        .expect("rows of an owned array are contiguous");
                    let dst = dst
                        .as_slice_mut()
                        .expect("rows of an owned array are contiguous");
                    bank.shift(src, dst, scratch);
                }
                (self.target.slice(ndarray::s![..n, ..]), true)
            }
            _ => (x, false),
        };
        let (head, baseline) = (&self.head, &self.baseline);
        let (scores, contrib) = (&mut self.scores[..n], self.contrib.view_mut());
        match (self.onnx.as_mut(), self.cuda.as_mut()) {
            (None, None) => {
                let recon = self.model.ae.forward(x, &mut self.ws);
                head.score_batch(target, &recon, baseline, scores, contrib);
            }
            (Some(session), _) => {
                let ran = session.forward(x, |recon| {
                    head.score_batch(target, recon, baseline, scores, contrib);
                });
                if let Err(e) = ran {
                    self.onnx_failed(n, &e);
                }
            }
            (None, Some(session)) => {
                // The head runs on the device too: scores and contributions come back.
                let ran = session.score(x, shifted.then_some(target)).map(|(s, c)| {
                    scores.copy_from_slice(s);
                    let mut contrib = contrib;
                    contrib.as_slice_mut().expect("owned arrays are contiguous")[..c.len()]
                        .copy_from_slice(c);
                });
                if let Err(e) = ran {
                    self.backend_errors += 1;
                    if self.backend_errors.is_power_of_two() {
                        tracing::error!(error = %e, failures = self.backend_errors, "CUDA run failed");
                    }
                    self.scores[..n].fill(f32::NAN);
                }
            }
        }
        &self.scores[..n]
    }

    /// A failed ONNX Runtime run scores its `n` frames NaN: the pipeline counts them invalid.
    fn onnx_failed(&mut self, n: usize, e: &crate::model::onnx::OnnxError) {
        self.backend_errors += 1;
        if self.backend_errors.is_power_of_two() {
            tracing::error!(error = %e, failures = self.backend_errors, "ONNX Runtime run failed");
        }
        self.scores[..n].fill(f32::NAN);
    }

    /// Turns row `i` of the last batch (score and contributions) into its mean over
    /// `stream`'s last `smooth_frames` frames, this one included (`t`: the frame's
    /// timestamp, NaN if none; a long silence starts the history afresh). Call it once per
    /// row, in stream order, before reading the row's score or contributions; with one
    /// frame (or never called) rows stay as scored. For streams whose slots change hands,
    /// see [`Self::smooth_frame`].
    pub fn smooth(&mut self, i: usize, stream: u32, t: f64) {
        self.smooth_frame(
            i,
            &FrameMeta {
                stream,
                timestamp: t,
                ..FrameMeta::default()
            },
        );
    }

    /// [`Self::smooth`] for row `i` of frame `meta`: a newer
    /// [`FrameMeta::generation`] of its stream's slot (another stream took the slot)
    /// starts the history afresh.
    pub fn smooth_frame(&mut self, i: usize, meta: &FrameMeta) {
        let row = self
            .contrib
            .row_mut(i)
            .into_slice()
            .expect("rows of an owned array are contiguous");
        self.smoother.apply(
            meta.stream,
            meta.generation,
            meta.timestamp,
            &mut self.scores[i],
            row,
        );
    }

    /// Batches the backend failed to score (always 0 for the native backend).
    pub fn backend_errors(&self) -> u64 {
        self.backend_errors
    }

    /// The per-feature contributions of the last scored batch (n × d).
    pub fn contributions(&self, n: usize) -> ArrayView2<'_, f32> {
        self.contrib.slice(ndarray::s![..n, ..])
    }

    /// Fills the top contributions of row `i` of the last batch; returns how many.
    pub fn top_contributions(
        &self,
        i: usize,
        out: &mut [Contribution; MAX_TOP_CONTRIBUTIONS],
    ) -> u8 {
        let row = self.contrib.row(i);
        fill_top(
            row.as_slice()
                .expect("rows of an owned array are contiguous"),
            self.top_k,
            out,
        )
    }

    /// Scores a whole matrix in chunks (training-time calibration uses this, so there is
    /// one scoring path). Returns one score per row.
    pub fn score_all(&mut self, x: ArrayView2<f32>) -> Vec<f32> {
        let d = self.n_features();
        let mut out = Vec::with_capacity(x.nrows());
        for chunk in x.axis_chunks_iter(ndarray::Axis(0), self.max_batch()) {
            let n = chunk.nrows();
            let mut dst = ArrayViewMut2::from_shape((n, d), &mut self.input_mut()[..n * d])
                .expect("buffer sized for max_batch");
            dst.assign(&chunk);
            out.extend_from_slice(self.score(n));
        }
        out
    }
}

impl BatchScorer for Scorer {
    fn max_batch(&self) -> usize {
        Scorer::max_batch(self)
    }

    fn n_features(&self) -> usize {
        Scorer::n_features(self)
    }

    fn input_mut(&mut self) -> &mut [f32] {
        Scorer::input_mut(self)
    }

    fn input_row(&self, i: usize) -> &[f32] {
        Scorer::input_row(self, i)
    }

    fn score_batch(&mut self, n: usize) {
        self.score(n);
    }

    fn smooth(&mut self, i: usize, meta: &FrameMeta) {
        self.smooth_frame(i, meta);
    }

    fn batch_scores(&self) -> &[f32] {
        &self.scores[..self.last]
    }

    fn top_contributions(&self, i: usize, out: &mut [Contribution; MAX_TOP_CONTRIBUTIONS]) -> u8 {
        Scorer::top_contributions(self, i, out)
    }

    fn follow(&mut self, cell: &crate::retrain::ModelCell) {
        // A retrain published a new model: switch between batches, never within one.
        let published = cell.load();
        if !Arc::ptr_eq(&published, self.model())
            && let Err(e) = self.set_model(Arc::clone(&published))
        {
            tracing::error!(error = %e, version = published.meta.version, "cannot switch to the retrained model; keeping the current one");
        }
    }

    fn any_thread(&self) -> bool {
        // A CUDA context is current on one thread.
        self.cuda.is_none()
    }

    fn model_version(&self) -> u64 {
        self.model.meta.version
    }
}

/// What feeds the pipeline. Runs on its own thread and pushes frames until it is done or
/// `stop` is set.
pub trait Source: Send + 'static {
    /// Runs to completion; returns the number of frames it offered. The scorer ends once
    /// `producer` is dropped and the ring is drained; a source may hand `producer` to
    /// another thread to push from (the agent's MQTT thread does), as long as it is
    /// dropped when the source ends.
    fn run(self: Box<Self>, producer: FrameProducer, clock: &Clock, stop: &AtomicBool) -> u64;
}

/// What consumes scored frames. Runs on the sink thread, or on the scorer thread when
/// [`Self::ON_SCORER_THREAD`].
pub trait Sink: Send + 'static {
    /// Whether [`Self::accept`] runs with the scorer, right after each frame is scored,
    /// instead of on a sink thread behind a second ring. On the scorer a frame wakes one
    /// thread fewer, and nothing waits in a second ring, but the sink's time adds to the
    /// scorer's: for sinks that are cheap per frame at the rates they see (the agent's, at
    /// a node's frame rate). Such a scorer is also shared with the thread that pushes the
    /// frames, which then scores them itself while the scorer thread is idle (see
    /// `SharedScorer`), so the sink may run on either thread (one at a time, in frame
    /// order). Replay's sink (thresholds and files, the limit of a replay's throughput)
    /// keeps its own thread, so that it runs beside the scorer.
    const ON_SCORER_THREAD: bool = false;
    /// Takes one scored frame. Must not block for long: the scorer waits on a full output
    /// ring (or, on the scorer thread, for the call itself).
    fn accept(&mut self, frame: &ScoredFrame);
    /// Whether the frame `meta` is still wanted, asked right after its batch is scored
    /// and before the frame is smoothed, handed to online retraining or to
    /// [`Self::accept`]: a refused frame goes nowhere and is not counted as scored. Only a
    /// sink on the scorer thread ([`Self::ON_SCORER_THREAD`]) is asked, in frame order,
    /// so it can refuse what it knows to be over (the agent: the frames of a stream it
    /// forgot, still queued when it let go of the stream). Wants everything by default.
    fn admit(&mut self, _meta: &FrameMeta) -> bool {
        true
    }
    /// Called once after the last frame.
    fn finish(&mut self) -> Result<(), std::io::Error> {
        Ok(())
    }
    /// Time passed: called about every [`TICK_EVERY`] (at least once a second, less often
    /// only while a batch runs longer) on the thread that calls [`Self::accept`], whether
    /// frames come or not, with a monotonic time read at most a batch ago, so a sink can
    /// act on time passing without reading a clock per frame (the agent re-sends firing
    /// alerts and notices streams that went silent). The same rules as `accept`: must not
    /// block for long. Does nothing by default.
    fn tick(&mut self, _now: Instant) {}
    /// A batch of `frames` frames was just scored; their [`Self::admit`] and
    /// [`Self::accept`] calls follow. Only a sink on the scorer thread
    /// ([`Self::ON_SCORER_THREAD`]) is told. Does nothing by default.
    fn batch(&mut self, _frames: usize) {}
}

/// How often [`Sink::tick`] runs.
pub const TICK_EVERY: Duration = Duration::from_secs(1);

/// When a sink's next [`Sink::tick`] is due, for both places that run sinks (the scorer
/// and the sink thread).
struct Ticks {
    next: Instant,
}

impl Ticks {
    fn new() -> Self {
        Ticks {
            next: Instant::now(),
        }
    }

    /// Ticks `sink` if one is due at `now`.
    fn at<K: Sink>(&mut self, now: Instant, sink: &mut K) {
        if now >= self.next {
            self.next = now + TICK_EVERY;
            sink.tick(now);
        }
    }
}

/// The pipeline's monotonic clock (ns since the pipeline started).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Clock {
            start: Instant::now(),
        }
    }
    #[inline]
    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
    /// The instant `ns` after the clock started (a [`Self::now_ns`] reading).
    #[inline]
    pub fn instant_at(&self, ns: u64) -> Instant {
        self.start + Duration::from_nanos(ns)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Replays the rows of a matrix as one stream, optionally paced to a frame rate.
pub struct FileSource {
    /// Shared, so a caller replaying the same rows several times (the harness) hands each
    /// replay the one copy it holds.
    values: ArcArray2<f32>,
    timestamps: Option<Vec<f64>>,
    /// Frames per second; `None` replays as fast as the scorer takes them.
    rate: Option<f64>,
    /// While set, the stream stands still (a replay waits for a retrain to finish).
    pause: Option<Arc<AtomicBool>>,
    /// Frames per lag window: each row is pushed with the `w − 1` rows before it, from
    /// row `w − 1` on (whose seq is its row number), built as it goes.
    window: usize,
}

impl FileSource {
    /// Rows already in standard layout are taken as they are (no copy); others are copied
    /// into it once, as the source hands out contiguous rows.
    pub fn new(
        values: impl Into<ArcArray2<f32>>,
        timestamps: Option<Vec<f64>>,
        rate: Option<f64>,
    ) -> Self {
        let mut values: ArcArray2<f32> = values.into();
        if !values.is_standard_layout() {
            values = values.as_standard_layout().into_owned().into_shared();
        }
        FileSource {
            values,
            timestamps,
            rate,
            pause: None,
            window: 1,
        }
    }

    /// Pushes lag windows of `w` rows instead of single rows (see [`crate::window`]).
    #[must_use]
    pub fn windowed(mut self, w: usize) -> Self {
        self.window = w.max(1);
        self
    }

    /// Holds the stream still while `flag` is set (at most [`MAX_PAUSE`] at a time).
    #[must_use]
    pub fn paused_by(mut self, flag: Arc<AtomicBool>) -> Self {
        self.pause = Some(flag);
        self
    }
}

impl Source for FileSource {
    fn run(self: Box<Self>, mut producer: FrameProducer, clock: &Clock, stop: &AtomicBool) -> u64 {
        let period_ns = self.rate.filter(|r| *r > 0.0).map(|r| 1e9 / r);
        let start = clock.now_ns();
        let mut offered = 0;
        let mut windows =
            crate::window::StreamWindows::new(self.window, self.values.ncols(), f64::INFINITY);
        for (i, row) in self.values.rows().into_iter().enumerate() {
            let row = row.to_slice().expect("standard layout rows are contiguous");
            let Some(values) = windows.push(0, row, 0.0) else {
                continue;
            };
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if let Some(flag) = &self.pause
                && flag.load(Ordering::Acquire)
            {
                let since = Instant::now();
                while flag.load(Ordering::Acquire) && since.elapsed() < MAX_PAUSE {
                    thread::sleep(Duration::from_micros(200));
                }
            }
            if let Some(p) = period_ns {
                let due = start + (i as f64 * p) as u64;
                loop {
                    let now = clock.now_ns();
                    if now >= due {
                        break;
                    }
                    let wait = due - now;
                    if wait > 200_000 {
                        thread::sleep(Duration::from_nanos(wait - 100_000));
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
            let meta = FrameMeta {
                seq: i as u64,
                timestamp: self.timestamps.as_ref().map_or(f64::NAN, |t| t[i]),
                enqueued_ns: clock.now_ns(),
                ..FrameMeta::default()
            };
            offered += 1;
            if producer.push(meta, values) == Pushed::Closed {
                break;
            }
        }
        offered
    }
}

/// Counters and timings of one pipeline run.
#[derive(Debug, Clone)]
pub struct PipelineReport {
    pub frames_offered: u64,
    pub frames_accepted: u64,
    pub frames_dropped: u64,
    /// Frames with NaN/Inf values: counted and skipped, never scored.
    pub frames_invalid: u64,
    pub frames_scored: u64,
    pub batches: u64,
    pub elapsed: Duration,
    /// Ring entry to score, per frame (includes queueing).
    pub latency: LatencyHistogram,
    /// Scoring compute per frame (batch time / batch size): what the model itself costs.
    /// Where batches overlap (a GPU SAE scorer), a batch's time runs from its submit to its
    /// collect, which includes filling and submitting the next batch.
    pub compute: LatencyHistogram,
}

impl PipelineReport {
    pub fn frames_per_second(&self) -> f64 {
        self.frames_scored as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Errors that stop a pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Scorer(#[from] ScorerError),
    #[error("{0} thread panicked")]
    Panicked(&'static str),
    #[error("sink failed: {0}")]
    Sink(std::io::Error),
    #[error("cannot start the {name} thread: {source}")]
    Spawn {
        name: &'static str,
        source: std::io::Error,
    },
}

/// Online retraining's hooks into the scorer thread: the cell it rereads between batches
/// (a retrain publishes there), and a ring that carries every scored frame's raw values to
/// the sink, which decides what may enter the reservoir.
pub struct ScorerHooks {
    pub cell: Arc<crate::retrain::ModelCell>,
    pub values: FrameProducer,
    /// Replay: switch models only at the swap point a retrain request set, so that which
    /// frames a new model scores does not depend on thread timing. `None` (the agent):
    /// switch as soon as a model is published.
    pub gate: Option<SwapGate>,
}

/// A replay's deterministic model switch: the sink sets [`Self::at`] (a frame seq a fixed
/// lag after the frame that requests a retrain) and raises `busy`; the scorer scores the
/// frames before that seq with the old model, waits at it until the trainer is done
/// (accepted or rejected), and takes whatever model is published then. Single-stream
/// (replay) seqs, all finite: the file readers reject NaN, and a frame the scorer drops
/// as non-finite would let it run past the point.
#[derive(Debug, Clone)]
pub struct SwapGate {
    pub at: Arc<AtomicU64>,
    pub busy: Arc<AtomicBool>,
}

impl SwapGate {
    /// No swap pending.
    pub const NONE: u64 = u64::MAX;

    /// Where in `metas` the swap point falls (the index of the first frame at or past it),
    /// and the point.
    fn split(&self, metas: &[FrameMeta]) -> Option<(usize, u64)> {
        let at = self.at.load(Ordering::Acquire);
        if at == Self::NONE {
            return None;
        }
        metas.iter().position(|m| m.seq >= at).map(|k| (k, at))
    }

    /// Waits (at most [`MAX_PAUSE`]) until the trainer is done, then clears the point `at`
    /// (unless a newer request has replaced it meanwhile).
    fn wait_and_clear(&self, at: u64) {
        let since = Instant::now();
        while self.busy.load(Ordering::Acquire) {
            if since.elapsed() >= MAX_PAUSE {
                tracing::warn!(
                    seq = at,
                    waited_secs = MAX_PAUSE.as_secs(),
                    "the retrain did not finish in time; the replay goes on with the current model and is no longer reproducible"
                );
                break;
            }
            thread::sleep(Duration::from_micros(200));
        }
        let _ = self
            .at
            .compare_exchange(at, Self::NONE, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// The ring of [`ScorerHooks::values`]: one slot more than the result ring, so that the
/// sink, which pops both in lockstep, never leaves the scorer waiting on it.
pub fn values_ring(cfg: &PipelineConfig, d: usize) -> (FrameProducer, FrameConsumer) {
    frame_ring(cfg.ring_capacity_frames.max(1) + 2, d, FullPolicy::Block)
}

/// Runs a source to its end through the scorer into the sink, on named threads.
/// `policy` is the ring's full policy (replay passes `Block`).
///
/// # Errors
/// The head does not fit the model, a thread panicked, or the sink failed to finish.
pub fn run<S: Source, K: Sink>(
    model: Arc<Model>,
    head: Head,
    top_k: usize,
    cfg: &PipelineConfig,
    policy: FullPolicy,
    source: S,
    sink: K,
) -> Result<(PipelineReport, K), PipelineError> {
    run_hooked(model, head, top_k, cfg, policy, source, sink, None)
}

/// [`run`] with online retraining's hooks.
///
/// # Errors
/// As [`run`].
#[allow(clippy::too_many_arguments)]
pub fn run_hooked<S: Source, K: Sink>(
    model: Arc<Model>,
    head: Head,
    top_k: usize,
    cfg: &PipelineConfig,
    policy: FullPolicy,
    source: S,
    sink: K,
    hooks: Option<ScorerHooks>,
) -> Result<(PipelineReport, K), PipelineError> {
    let batch = if model.cuda.is_some() {
        cfg.gpu_batch_frames()
    } else {
        cfg.batch_max_frames
    };
    let scorer = Scorer::new(model, head, batch, top_k)?;
    run_scorer(scorer, cfg, policy, source, sink, hooks)
}

/// [`run_hooked`] with any [`BatchScorer`] (the agent runs SAE detectors this way).
///
/// # Errors
/// As [`run`].
pub fn run_scorer<F: BatchScorer, S: Source, K: Sink>(
    scorer: F,
    cfg: &PipelineConfig,
    policy: FullPolicy,
    source: S,
    mut sink: K,
    hooks: Option<ScorerHooks>,
) -> Result<(PipelineReport, K), PipelineError> {
    let d = scorer.n_features();
    let (producer, consumer) = frame_ring(cfg.ring_capacity_frames, d, policy);
    let ring_stats = producer.stats();
    let clock = Clock::new();
    let stop = Arc::new(AtomicBool::new(false));
    let invalid = Arc::new(AtomicU64::new(0));
    let started = Instant::now();

    let spawn = |name: &'static str| thread::Builder::new().name(format!("darkwatch-{name}"));
    let spawn_err = |name: &'static str| move |source| PipelineError::Spawn { name, source };
    let inv = invalid.clone();
    let mut producer = producer;
    // The scorer thread hands back the sink it ran (finished) when the sink is on it.
    let (scorer_thread, sink_thread) = if K::ON_SCORER_THREAD {
        let state = ScoreState::new(scorer, consumer, OnScorer::new(sink), clock, inv, hooks);
        // Where frames may be scored on the pushing thread: no replay swap point to wait at
        // there, and a scorer that may run on any thread.
        let shared =
            state.hooks.as_ref().is_none_or(|h| h.gate.is_none()) && state.scorer.any_thread();
        let scorer_thread = if shared {
            let shared = Arc::new(SharedScorer::new(state));
            producer.set_drainer(shared.clone());
            spawn("scorer").spawn(move || {
                let (counts, OnScorer { mut sink, .. }) = shared_score_loop(&shared);
                (counts, Some(sink.finish().map(|()| sink)))
            })
        } else {
            spawn("scorer").spawn(move || {
                let (counts, OnScorer { mut sink, .. }) = score_loop(state);
                (counts, Some(sink.finish().map(|()| sink)))
            })
        }
        .map_err(spawn_err("scorer"))?;
        (scorer_thread, None)
    } else {
        let (out_p, out_c) = HeapRb::<ScoredFrame>::new(cfg.ring_capacity_frames.max(1)).split();
        let sink_thread = spawn("sink")
            .spawn(move || {
                drain_sink(out_c, &mut sink);
                sink.finish().map(|()| sink)
            })
            .map_err(spawn_err("sink"))?;
        let results = ToSinkThread {
            ring: out_p,
            sink: sink_thread.thread().clone(),
        };
        let scorer_thread = spawn("scorer")
            .spawn(move || {
                let state = ScoreState::new(scorer, consumer, results, clock, inv, hooks);
                (score_loop(state).0, None)
            })
            .map_err(spawn_err("scorer"))?;
        (scorer_thread, Some(sink_thread))
    };
    let source_stop = stop.clone();
    let source_thread = spawn("source")
        .spawn(move || Box::new(source).run(producer, &clock, &source_stop))
        .map_err(spawn_err("source"))?;

    let offered = source_thread
        .join()
        .map_err(|_| PipelineError::Panicked("source"))?;
    let ((scored, batches, latency, compute), finished) = scorer_thread
        .join()
        .map_err(|_| PipelineError::Panicked("scorer"))?;
    let finished = match (finished, sink_thread) {
        (Some(finished), _) => finished,
        (None, Some(t)) => t.join().map_err(|_| PipelineError::Panicked("sink"))?,
        (None, None) => unreachable!("the sink runs on the scorer thread or on its own"),
    };
    let sink = finished.map_err(PipelineError::Sink)?;
    let report = PipelineReport {
        frames_offered: offered,
        frames_accepted: ring_stats.pushed.load(Ordering::Relaxed),
        frames_dropped: ring_stats.dropped.load(Ordering::Relaxed),
        frames_invalid: invalid.load(Ordering::Relaxed),
        frames_scored: scored,
        batches,
        elapsed: started.elapsed(),
        latency,
        compute,
    };
    Ok((report, sink))
}

/// Longest a paused [`FileSource`] waits (a trainer that died must not hang a replay).
pub const MAX_PAUSE: Duration = Duration::from_secs(120);

/// Longest park; the producer unparks the scorer sooner when it pushes.
const IDLE_PARK: Duration = Duration::from_millis(5);

/// Longest park of a [`SharedScorer`]'s thread, which the pusher wakes only when it finds
/// the scorer busy, and the producer's drop at the end of the run.
const SHARED_IDLE_PARK: Duration = Duration::from_millis(100);

/// Most compute per frame (of the last batch scored) at which the pushing thread still
/// scores a [`SharedScorer`]'s ring itself. Scoring in place saves the scorer thread's
/// wake-up, a few microseconds, and is worth it while a frame costs about as much (the
/// autoencoder: about 1 to 30 µs). A dearer frame (an SAE: 0.1 to 10 ms) would hold the
/// pushing thread, the MQTT client's, for that long per frame: the input would wait in the
/// socket and the broker, one frame would be scored at a time and the ring would never
/// fill. Above this the scorer thread takes the frames, in batches of what came meanwhile.
pub const INLINE_MAX_FRAME_NS: u64 = 50_000;

/// Where the scorer puts each scored frame: the result ring to the sink thread, or the
/// sink itself (see [`Sink::ON_SCORER_THREAD`]).
trait Results {
    /// Whether the frame `meta` of the batch just scored is wanted ([`Sink::admit`]).
    fn admit(&mut self, _meta: &FrameMeta) -> bool {
        true
    }
    /// Hands over one frame; `false` once nothing takes them any more.
    fn put(&mut self, frame: &ScoredFrame) -> bool;
    /// A batch of `frames` frames was scored; they are put next ([`Sink::batch`]).
    fn batch_start(&mut self, _frames: usize) {}
    /// A batch (or the run) is done: frames put since the last call are complete.
    fn batch_done(&mut self) {}
    /// Whether [`Self::time`] does anything (else the scorer reads no clock for it).
    const TICKS: bool = false;
    /// Time passed: `now` is a monotonic time read just now or at the end of the last
    /// batch. A sink on the scorer gets its [`Sink::tick`] when one is due.
    fn time(&mut self, _now: Instant) {}
}

/// The result ring to the sink thread, and the thread to unpark after each batch.
struct ToSinkThread {
    ring: HeapProd<ScoredFrame>,
    sink: thread::Thread,
}

impl Results for ToSinkThread {
    fn put(&mut self, frame: &ScoredFrame) -> bool {
        let mut spins = 0u32;
        while self.ring.try_push(*frame).is_err() {
            if !self.ring.read_is_held() {
                return false;
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                thread::sleep(Duration::from_micros(20));
            }
        }
        true
    }

    fn batch_done(&mut self) {
        self.sink.unpark();
    }
}

/// The sink, called on the scorer thread (or, with a [`SharedScorer`], on the thread that
/// pushed the frame), and when its next [`Sink::tick`] is due.
struct OnScorer<K> {
    sink: K,
    ticks: Ticks,
}

impl<K> OnScorer<K> {
    fn new(sink: K) -> Self {
        OnScorer {
            sink,
            ticks: Ticks::new(),
        }
    }
}

impl<K: Sink> Results for OnScorer<K> {
    fn admit(&mut self, meta: &FrameMeta) -> bool {
        self.sink.admit(meta)
    }

    fn put(&mut self, frame: &ScoredFrame) -> bool {
        self.sink.accept(frame);
        true
    }

    fn batch_start(&mut self, frames: usize) {
        self.sink.batch(frames);
    }

    const TICKS: bool = true;

    fn time(&mut self, now: Instant) {
        self.ticks.at(now, &mut self.sink);
    }
}

/// The scorer's state between batches: its half of the ring, the model, where results go,
/// and what it has counted.
struct ScoreState<F, R> {
    scorer: F,
    consumer: FrameConsumer,
    out: R,
    clock: Clock,
    invalid: Arc<AtomicU64>,
    hooks: Option<ScorerHooks>,
    metas: Vec<FrameMeta>,
    /// The frames of the batch in flight, when batches overlap ([`BatchScorer::overlaps`]).
    flight_metas: Vec<FrameMeta>,
    latency: LatencyHistogram,
    compute: LatencyHistogram,
    scored: u64,
    batches: u64,
    /// Compute per frame of the last batch, in ns (0 before the first).
    frame_ns: u64,
    /// What a frame scored on the pushing thread would cost ([`InlineCost`]).
    inline: InlineCost,
    frame: ScoredFrame,
    /// `out` took no more frames: the run is over.
    closed: bool,
}

/// What a scorer counted: frames scored, batches, ring-entry-to-score latency, and compute
/// per frame.
type ScoreCounts = (u64, u64, LatencyHistogram, LatencyHistogram);

impl<F: BatchScorer, R: Results> ScoreState<F, R> {
    fn new(
        scorer: F,
        consumer: FrameConsumer,
        out: R,
        clock: Clock,
        invalid: Arc<AtomicU64>,
        hooks: Option<ScorerHooks>,
    ) -> Self {
        let max_batch = scorer.max_batch();
        let overlaps = scorer.overlaps();
        ScoreState {
            scorer,
            consumer,
            out,
            clock,
            invalid,
            hooks,
            metas: vec![FrameMeta::default(); max_batch],
            flight_metas: if overlaps {
                vec![FrameMeta::default(); max_batch]
            } else {
                Vec::new()
            },
            latency: LatencyHistogram::new(),
            compute: LatencyHistogram::new(),
            scored: 0,
            batches: 0,
            frame_ns: 0,
            inline: InlineCost::default(),
            frame: ScoredFrame::default(),
            closed: false,
        }
    }

    /// Scores what the ring holds, batch by batch, until it is empty (or `out` takes no
    /// more frames: then [`Self::closed`] is set).
    fn drain(&mut self) {
        if self.hooks.is_none() && self.scorer.overlaps() {
            self.drain_overlapped();
            return;
        }
        let ScoreState {
            scorer,
            consumer,
            out,
            clock,
            invalid,
            hooks,
            metas,
            latency,
            compute,
            scored,
            batches,
            frame_ns,
            inline,
            frame,
            closed,
            ..
        } = self;
        let d = scorer.n_features();
        while !*closed {
            let n = consumer.pop_batch(metas, scorer.input_mut());
            if n == 0 {
                return;
            }
            let t0 = clock.now_ns();
            // A stream may carry NaN/Inf: count and skip those frames, compacting the batch.
            let mut n = compact_finite(scorer.input_mut(), &mut metas[..n], d, invalid);
            if n == 0 {
                continue;
            }
            let mut t0 = t0;
            // A batch is scored in one piece, or, when a replay's swap point falls inside
            // it, in two: the frames before it with the old model, the rest with the new one.
            loop {
                let mut end = n;
                if let Some(h) = hooks.as_ref() {
                    match &h.gate {
                        None => scorer.follow(&h.cell),
                        Some(gate) => match gate.split(&metas[..n]) {
                            Some((0, at)) => {
                                gate.wait_and_clear(at);
                                scorer.follow(&h.cell);
                                t0 = clock.now_ns();
                            }
                            Some((k, _)) => end = k,
                            None => {}
                        },
                    }
                }
                let version = scorer.model_version();
                scorer.score_batch(end);
                let t1 = clock.now_ns();
                *frame_ns = (t1 - t0) / end as u64;
                *inline = inline.after_batch(end, *frame_ns);
                compute.record(*frame_ns);
                *batches += 1;
                let mut results = Published {
                    out: &mut *out,
                    clock: *clock,
                    hooks: &mut *hooks,
                    frame: &mut *frame,
                    latency: &mut *latency,
                    scored: &mut *scored,
                };
                if !results.publish(&mut *scorer, &metas[..end], t1, version) {
                    *closed = true;
                    return;
                }
                if end == n {
                    break;
                }
                scorer.input_mut().copy_within(end * d..n * d, 0);
                metas.copy_within(end..n, 0);
                n -= end;
                t0 = clock.now_ns();
            }
        }
    }

    /// [`Self::drain`] for a scorer whose batches overlap: each batch is popped, filled and
    /// submitted before the results of the one in flight are read, so filling one batch
    /// and alerting on the other run on the host while the device scores. A batch in
    /// flight is collected as soon as the ring has nothing more to submit, so a quiet
    /// stream's frame waits for no second batch. (Not with hooks: a retrain's model swap
    /// needs the batch scored where it stands.)
    fn drain_overlapped(&mut self) {
        let d = self.scorer.n_features();
        // The batch in flight: its rows and when it was submitted.
        let mut flight: Option<(usize, u64)> = None;
        while !self.closed {
            let popped = self
                .consumer
                .pop_batch(&mut self.metas, self.scorer.input_mut());
            let n = if popped == 0 {
                0
            } else {
                compact_finite(
                    self.scorer.input_mut(),
                    &mut self.metas[..popped],
                    d,
                    &self.invalid,
                )
            };
            let submitted = (n > 0).then(|| {
                let t0 = self.clock.now_ns();
                self.scorer.submit(n);
                (n, t0)
            });
            if let Some((m, t0)) = flight.take() {
                self.scorer.collect();
                let t1 = self.clock.now_ns();
                self.frame_ns = (t1 - t0) / m as u64;
                self.inline = self.inline.after_batch(m, self.frame_ns);
                self.compute.record(self.frame_ns);
                self.batches += 1;
                let version = self.scorer.model_version();
                let mut results = Published {
                    out: &mut self.out,
                    clock: self.clock,
                    hooks: &mut self.hooks,
                    frame: &mut self.frame,
                    latency: &mut self.latency,
                    scored: &mut self.scored,
                };
                if !results.publish(&mut self.scorer, &self.flight_metas[..m], t1, version) {
                    self.closed = true;
                    if submitted.is_some() {
                        // Nothing takes its results, but leave no batch in flight.
                        self.scorer.collect();
                    }
                    return;
                }
            }
            if submitted.is_some() {
                std::mem::swap(&mut self.metas, &mut self.flight_metas);
                flight = submitted;
            } else if popped == 0 {
                // The ring is empty and nothing is in flight.
                return;
            }
        }
    }

    /// The counts, once the run is over.
    fn counts(self) -> (ScoreCounts, R) {
        let counts = (self.scored, self.batches, self.latency, self.compute);
        (counts, self.out)
    }
}

/// Where a scored batch's results go, and what counts them.
struct Published<'a, R> {
    out: &'a mut R,
    clock: Clock,
    hooks: &'a mut Option<ScorerHooks>,
    frame: &'a mut ScoredFrame,
    latency: &'a mut LatencyHistogram,
    scored: &'a mut u64,
}

impl<R: Results> Published<'_, R> {
    /// Hands the last batch's results (one frame per entry of `metas`, scored at `t1` by
    /// model `version`) to `out`: smoothed, with their top contributions, each frame that
    /// `out` admits ([`Sink::admit`]). False when `out` takes no more.
    fn publish<F: BatchScorer>(
        &mut self,
        scorer: &mut F,
        metas: &[FrameMeta],
        t1: u64,
        version: u64,
    ) -> bool {
        let frame = &mut *self.frame;
        self.out.batch_start(metas.len());
        for (i, meta) in metas.iter().enumerate() {
            if !self.out.admit(meta) {
                continue;
            }
            frame.frame_score = scorer.batch_scores()[i];
            scorer.smooth(i, meta);
            frame.meta = *meta;
            frame.score = scorer.batch_scores()[i];
            frame.n_top = scorer.top_contributions(i, &mut frame.top);
            frame.latency_ns = t1.saturating_sub(meta.enqueued_ns);
            frame.model_version = version;
            self.latency.record(frame.latency_ns);
            if let Some(h) = self.hooks.as_mut() {
                // Before the result: the sink pops a frame's values right after its result.
                if h.values.push(*meta, scorer.input_row(i)) == Pushed::Closed {
                    *self.hooks = None;
                }
            }
            if !self.out.put(frame) {
                return false;
            }
            *self.scored += 1;
        }
        self.out.batch_done();
        if R::TICKS {
            // The batch's own clock reading: a steady flow of frames, which may never leave
            // the ring empty, still lets the sink's ticks come, at no clock read per frame.
            self.out.time(self.clock.instant_at(t1));
        }
        true
    }
}

/// The scorer thread's loop: drains the ring, parks while it is empty, and ends once the
/// producer is gone and the ring is empty (or nothing takes results any more).
fn score_loop<F: BatchScorer, R: Results>(mut state: ScoreState<F, R>) -> (ScoreCounts, R) {
    state.consumer.register_current_thread();
    loop {
        state.drain();
        if state.closed {
            return state.counts();
        }
        if state.consumer.is_finished() {
            break;
        }
        if R::TICKS {
            // Off the frames' path: the ring is empty and the scorer is about to park.
            state.out.time(Instant::now());
        }
        // No spin first: at a node's rates (about a frame a millisecond) every frame would
        // end in one, and a 10 µs spin per frame was 1 % of a core. The producer's unpark
        // wakes the parked scorer within microseconds.
        state.consumer.wait(IDLE_PARK);
    }
    state.out.batch_done();
    state.counts()
}

/// The compute per frame that a batch scored on the pushing thread would cost, as
/// [`SharedScorer`] decides by it: measured on the smallest batches seen, since the pushing
/// thread scores small batches (a message's frames) while the scorer thread's, with a
/// backlog, are large and cheaper a frame. Were every batch to count, a model at 100 µs a
/// batch of 1 but 20 µs a frame in batches would flip with each message: cheap after a
/// batch on the scorer thread, so the next message scored at 100 µs on the pushing thread,
/// then dear again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct InlineCost {
    /// Compute per frame of the last batch of at most [`Self::batch`] frames (0 before the
    /// first batch: cheap).
    frame_ns: u64,
    /// The fewest frames of a batch so far (0 before the first).
    batch: usize,
}

impl InlineCost {
    /// The estimate after a batch of `n` frames at `frame_ns` a frame: a batch no larger
    /// than the smallest so far replaces it; a larger one leaves it as it was.
    fn after_batch(self, n: usize, frame_ns: u64) -> Self {
        if n == 0 || (self.batch != 0 && n > self.batch) {
            return self;
        }
        InlineCost { frame_ns, batch: n }
    }

    /// Whether the pushing thread may score: a frame costs at most [`INLINE_MAX_FRAME_NS`].
    fn cheap(frame_ns: u64) -> bool {
        frame_ns <= INLINE_MAX_FRAME_NS
    }
}

/// A scorer whose sink runs on it, shared with the thread that pushes frames: that thread
/// scores what it pushed itself whenever the scorer is not busy ([`Drainer`]) and a frame
/// is cheap ([`INLINE_MAX_FRAME_NS`]), so a frame wakes no thread at all on its way to its
/// alert. The scorer thread scores when the pusher found it busy or frames dear, and ends
/// the run.
struct SharedScorer<F, K> {
    state: std::sync::Mutex<Option<ScoreState<F, OnScorer<K>>>>,
    /// [`ScoreState::inline`]'s cost per frame after the last drain, read without the lock.
    frame_ns: AtomicU64,
}

impl<F, K> SharedScorer<F, K> {
    fn new(state: ScoreState<F, OnScorer<K>>) -> Self {
        SharedScorer {
            state: std::sync::Mutex::new(Some(state)),
            frame_ns: AtomicU64::new(0),
        }
    }

    /// Whether the pushing thread may score: the smallest batches cost at most
    /// [`INLINE_MAX_FRAME_NS`] a frame (or none was scored yet); see [`InlineCost`].
    fn cheap(&self) -> bool {
        InlineCost::cheap(self.frame_ns.load(Ordering::Relaxed))
    }
}

impl<F: BatchScorer, K: Sink> Drainer for SharedScorer<F, K> {
    fn try_drain(&self) -> bool {
        if !self.cheap() {
            // Frames are dear: the scorer thread takes them, in batches, while this
            // thread goes on reading input.
            return false;
        }
        let Ok(mut state) = self.state.try_lock() else {
            // Busy (the scorer thread drains, and looks at the ring again before it parks)
            // or poisoned (a panic while scoring: the scorer thread reports it).
            return false;
        };
        match state.as_mut() {
            Some(state) if !state.closed => {
                state.drain();
                self.frame_ns
                    .store(state.inline.frame_ns, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }
}

/// The scorer thread's loop beside a [`SharedScorer`]: parks until the pusher leaves it
/// frames (it could not take the lock) or the producer is gone, then hands the state back.
/// A panic while another thread held the lock is re-raised here.
fn shared_score_loop<F: BatchScorer, K: Sink>(
    shared: &SharedScorer<F, K>,
) -> (ScoreCounts, OnScorer<K>) {
    let lock = || {
        shared
            .state
            .lock()
            .unwrap_or_else(|_| panic!("the scorer panicked on the pushing thread"))
    };
    let waiter = {
        let mut state = lock();
        let state = state.as_mut().expect("the shared scorer's state");
        state.consumer.register_current_thread();
        state.consumer.waiter()
    };
    loop {
        {
            let mut guard = lock();
            let state = guard.as_mut().expect("the shared scorer's state");
            state.drain();
            shared
                .frame_ns
                .store(state.inline.frame_ns, Ordering::Relaxed);
            if state.closed {
                return guard.take().expect("the shared scorer's state").counts();
            }
            if state.consumer.is_finished() {
                state.out.batch_done();
                return guard.take().expect("the shared scorer's state").counts();
            }
            // This thread wakes at least every SHARED_IDLE_PARK: the sink's ticks come
            // from here while the pushing thread scores the frames.
            state.out.time(Instant::now());
        }
        waiter.wait(SHARED_IDLE_PARK);
    }
}

/// Whether every value is finite (no NaN or ±Inf). Branch-free over the whole slice, so it
/// runs as vector instructions: a 768-value activation frame is checked in tens of
/// nanoseconds, where a short-circuiting scan took one branch per value.
pub fn all_finite(values: &[f32]) -> bool {
    const EXPONENT: u32 = 0x7f80_0000;
    values.iter().fold(0u32, |bad, v| {
        bad | u32::from(v.to_bits() & EXPONENT == EXPONENT)
    }) == 0
}

/// Moves rows holding only finite values to the front; returns how many there are.
fn compact_finite(
    values: &mut [f32],
    metas: &mut [FrameMeta],
    d: usize,
    invalid: &AtomicU64,
) -> usize {
    let mut keep = 0;
    for i in 0..metas.len() {
        let ok = all_finite(&values[i * d..(i + 1) * d]);
        if !ok {
            invalid.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if keep != i {
            values.copy_within(i * d..(i + 1) * d, keep * d);
            metas[keep] = metas[i];
        }
        keep += 1;
    }
    if keep < metas.len() {
        // Rate-limited: log the 1st, 2nd, 4th, 8th… bad frame, never one line per frame.
        let skipped = (metas.len() - keep) as u64;
        let total = invalid.load(Ordering::Relaxed);
        if (total + 1 - skipped..=total).any(u64::is_power_of_two) {
            tracing::warn!(
                skipped,
                total,
                "Frames with a NaN or infinite value skipped: they are not scored. (The agent never hands over its incomplete frames: it counts and logs those itself.)"
            );
        }
    }
    keep
}

/// The sink thread's loop: spins a little when the result ring is empty, then parks until
/// the scorer unparks it after a batch (or [`IDLE_PARK`] passes), so an idle agent costs
/// no CPU here.
fn drain_sink<K: Sink>(mut input: HeapCons<ScoredFrame>, sink: &mut K) {
    let mut spins = 0u32;
    let mut ticks = Ticks::new();
    // Frames taken since the clock was last read for a tick.
    let mut taken = 0u32;
    loop {
        match input.try_pop() {
            Some(frame) => {
                spins = 0;
                sink.accept(&frame);
                taken += 1;
                if taken == SINK_TICK_FRAMES {
                    taken = 0;
                    ticks.at(Instant::now(), sink);
                }
            }
            None => {
                if !input.write_is_held() && input.is_empty() {
                    return;
                }
                spins += 1;
                if spins < 64 {
                    std::hint::spin_loop();
                } else {
                    taken = 0;
                    ticks.at(Instant::now(), sink);
                    thread::park_timeout(IDLE_PARK);
                }
            }
        }
    }
}

/// A sink thread that never runs out of frames reads the clock for its tick once per
/// this many.
const SINK_TICK_FRAMES: u32 = 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fit::synthetic;
    use crate::mss::{MssConfig, ReferenceBank};
    use crate::rng::Rng;

    fn model_with_bank(rounds: usize, k: usize) -> Model {
        let mut m = synthetic(6, 3);
        let mut rng = Rng::new(1);
        let r0 = Array2::from_shape_fn((200, 6), |_| rng.uniform(-1.0, 1.0));
        m.bank = Some(ReferenceBank::from_r0(r0, rounds, k));
        m.with_mss(MssConfig {
            rounds,
            neighbours: k,
            bank_frames: 200,
        })
    }

    fn scores(model: Model, x: &Array2<f32>) -> Vec<f32> {
        let head = model.meta.head;
        Scorer::new(Arc::new(model), head, 16, 2)
            .unwrap()
            .score_all(x.view())
    }

    #[test]
    fn mss_with_m0_or_k1_scores_exactly_like_the_plain_head() {
        let mut rng = Rng::new(2);
        let x = Array2::from_shape_fn((40, 6), |_| rng.uniform(-3.0, 3.0));
        let plain = scores(synthetic(6, 3), &x);
        assert_eq!(scores(model_with_bank(0, 10), &x), plain);
        assert_eq!(scores(model_with_bank(2, 1), &x), plain);
        // And it does change the score when on.
        assert_ne!(scores(model_with_bank(1, 10), &x), plain);
    }

    #[test]
    fn scorer_scores_the_same_in_any_batch_size() {
        let mut rng = Rng::new(4);
        let x = Array2::from_shape_fn((37, 6), |_| rng.uniform(-2.0, 2.0));
        let model = Arc::new(model_with_bank(1, 5));
        let head = model.meta.head;
        let a = Scorer::new(model.clone(), head, 1, 2)
            .unwrap()
            .score_all(x.view());
        let b = Scorer::new(model, head, 16, 2).unwrap().score_all(x.view());
        assert_eq!(a, b);
    }

    #[test]
    fn all_finite_finds_any_nan_or_infinity_at_any_position() {
        assert!(all_finite(&[]));
        let ok: Vec<f32> = (0..37).map(|i| i as f32 - 18.5).collect();
        assert!(all_finite(&ok));
        assert!(all_finite(&[
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            -0.0,
            1e-45
        ]));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN] {
            for at in [0, 1, 17, 36] {
                let mut v = ok.clone();
                v[at] = bad;
                assert!(!all_finite(&v), "{bad} at {at}");
            }
        }
    }

    #[test]
    fn non_finite_frames_are_counted_and_skipped() {
        let invalid = AtomicU64::new(0);
        let mut values = vec![1.0, 2.0, f32::NAN, 4.0, 5.0, 6.0];
        let mut metas = [
            FrameMeta {
                seq: 0,
                ..Default::default()
            },
            FrameMeta {
                seq: 1,
                ..Default::default()
            },
            FrameMeta {
                seq: 2,
                ..Default::default()
            },
        ];
        let kept = compact_finite(&mut values, &mut metas, 2, &invalid);
        assert_eq!(kept, 2);
        assert_eq!(invalid.load(Ordering::Relaxed), 1);
        assert_eq!(&values[..4], &[1.0, 2.0, 5.0, 6.0]);
        assert_eq!((metas[0].seq, metas[1].seq), (0, 2));
    }

    /// Records the seqs it gets and the thread it gets them on.
    #[derive(Default)]
    struct Recorder<const ON_SCORER: bool> {
        seqs: Vec<u64>,
        threads: Vec<String>,
        finished: bool,
    }

    impl<const ON_SCORER: bool> Sink for Recorder<ON_SCORER> {
        const ON_SCORER_THREAD: bool = ON_SCORER;
        fn accept(&mut self, f: &ScoredFrame) {
            self.seqs.push(f.meta.seq);
            let name = thread::current().name().unwrap_or("?").to_string();
            if self.threads.last() != Some(&name) {
                self.threads.push(name);
            }
        }
        fn finish(&mut self) -> Result<(), std::io::Error> {
            self.finished = true;
            Ok(())
        }
    }

    fn run_recorder<const ON_SCORER: bool>(
        rate: Option<f64>,
    ) -> (PipelineReport, Recorder<ON_SCORER>) {
        let mut rng = Rng::new(5);
        let x = Array2::from_shape_fn((300, 6), |_| rng.uniform(-1.0, 1.0));
        let model = synthetic(6, 3);
        let head = model.meta.head;
        let cfg = PipelineConfig {
            ring_capacity_frames: 8,
            batch_max_frames: 4,
            ..PipelineConfig::default()
        };
        let source = FileSource::new(x, None, rate);
        run(
            Arc::new(model),
            head,
            2,
            &cfg,
            FullPolicy::Block,
            source,
            Recorder::<ON_SCORER>::default(),
        )
        .unwrap()
    }

    #[test]
    fn sink_runs_on_its_thread_or_on_the_scorer_and_sees_every_frame_in_order() {
        let (report, sink) = run_recorder::<false>(None);
        assert_eq!(report.frames_scored, 300);
        assert_eq!(sink.seqs, (0..300).collect::<Vec<_>>());
        assert_eq!(sink.threads, ["darkwatch-sink"]);
        assert!(sink.finished);

        // On the scorer: the source's thread scores what it pushed whenever the scorer is
        // idle (a SharedScorer), the scorer thread what the source left it meanwhile.
        // Paced at 5,000 frames/s, so that the scorer is idle between frames: unpaced, a
        // slow (debug, loaded) scorer can stay busy until the end, and the source then
        // never finds it idle (seen in CI).
        let (report, sink) = run_recorder::<true>(Some(5_000.0));
        assert_eq!(report.frames_scored, 300);
        assert_eq!(sink.seqs, (0..300).collect::<Vec<_>>());
        assert!(
            sink.threads
                .iter()
                .all(|t| t == "darkwatch-source" || t == "darkwatch-scorer"),
            "{:?}",
            sink.threads
        );
        assert!(sink.threads.iter().any(|t| t == "darkwatch-source"));
        assert!(sink.finished);
    }

    /// Pushes its frames, each with every feature at one value, then ends.
    struct Frames(Vec<(FrameMeta, f32)>);

    /// [`Frames`], then sets the flag: every frame is in the ring.
    struct FramesThen(Frames, Arc<AtomicBool>);

    impl Source for FramesThen {
        fn run(self: Box<Self>, producer: FrameProducer, clock: &Clock, stop: &AtomicBool) -> u64 {
            let n = Box::new(self.0).run(producer, clock, stop);
            self.1.store(true, Ordering::SeqCst);
            n
        }
    }

    impl Source for Frames {
        fn run(self: Box<Self>, mut producer: FrameProducer, clock: &Clock, _: &AtomicBool) -> u64 {
            let d = producer.dim();
            let n = self.0.len() as u64;
            for (mut meta, v) in self.0 {
                meta.enqueued_ns = clock.now_ns();
                assert_eq!(producer.push(meta, &vec![v; d]), Pushed::Accepted);
            }
            n
        }
    }

    /// A sink on the scorer that refuses the frames of generation 0 from seq 100 on (as
    /// the agent refuses a forgotten stream's frames still queued), keeping the rest.
    #[derive(Default)]
    struct Admitting {
        got: Vec<ScoredFrame>,
        refused: u64,
    }

    impl Sink for Admitting {
        const ON_SCORER_THREAD: bool = true;
        fn admit(&mut self, meta: &FrameMeta) -> bool {
            let admit = meta.generation > 0 || meta.seq < 100;
            self.refused += u64::from(!admit);
            admit
        }
        fn accept(&mut self, f: &ScoredFrame) {
            self.got.push(*f);
        }
    }

    /// A slot that goes to another stream (a newer generation) starts its smoothing afresh,
    /// however its timestamps lie: the new stream's clock here runs far behind the old
    /// one's, so no silence shows, and its first scores used to be means over the old
    /// stream's last ones. Frames the sink refuses are neither smoothed nor handed on nor
    /// counted as scored.
    #[test]
    fn a_new_generation_starts_smoothing_afresh_and_refused_frames_go_nowhere() {
        let model = synthetic(6, 3).with_smoothing(5);
        let head = model.meta.head;
        let meta = |generation: u32, seq: u64, timestamp: f64| FrameMeta {
            seq,
            generation,
            timestamp,
            ..FrameMeta::default()
        };
        let mut frames = Vec::new();
        for seq in 0..5 {
            frames.push((meta(0, seq, 1000.0 + seq as f64), 3.0));
        }
        for seq in 100..103 {
            frames.push((meta(0, seq, 1100.0 + seq as f64), 3.0));
        }
        for seq in 0..3 {
            frames.push((meta(1, seq, 10.0 + seq as f64), 0.1 * (seq + 1) as f32));
        }
        let cfg = PipelineConfig {
            ring_capacity_frames: 16,
            batch_max_frames: 4,
            ..PipelineConfig::default()
        };
        let (report, sink) = run(
            Arc::new(model),
            head,
            2,
            &cfg,
            FullPolicy::Block,
            Frames(frames),
            Admitting::default(),
        )
        .unwrap();
        assert_eq!(sink.refused, 3);
        assert_eq!(report.frames_scored, 8);
        let got: Vec<(u32, u64)> = sink
            .got
            .iter()
            .map(|f| (f.meta.generation, f.meta.seq))
            .collect();
        assert_eq!(
            got,
            [
                (0, 0),
                (0, 1),
                (0, 2),
                (0, 3),
                (0, 4),
                (1, 0),
                (1, 1),
                (1, 2)
            ]
        );
        let new = &sink.got[5..];
        assert!(new[0].frame_score < sink.got[4].frame_score);
        assert_eq!(
            new[0].score, new[0].frame_score,
            "none of the old stream's scores"
        );
        let mean = |fs: &[ScoredFrame]| {
            (fs.iter().map(|f| f64::from(f.frame_score)).sum::<f64>() / fs.len() as f64) as f32
        };
        assert_eq!(new[1].score, mean(&new[..2]));
        assert_eq!(new[2].score, mean(&new[..3]));
    }

    /// Counts its ticks (shared with the source, which waits for them): when they came and
    /// on which thread.
    struct Ticked<const ON_SCORER: bool> {
        ticks: Arc<AtomicU64>,
        at: Vec<Instant>,
        threads: Vec<String>,
        frames: u64,
    }

    impl<const ON_SCORER: bool> Sink for Ticked<ON_SCORER> {
        const ON_SCORER_THREAD: bool = ON_SCORER;
        fn accept(&mut self, _: &ScoredFrame) {
            self.frames += 1;
        }
        fn tick(&mut self, now: Instant) {
            self.at.push(now);
            let name = thread::current().name().unwrap_or("?").to_string();
            if !self.threads.contains(&name) {
                self.threads.push(name);
            }
            self.ticks.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Pushes `frames` frames, then nothing until the sink has ticked `want` times (a
    /// minute at most, so a missing tick fails the test instead of hanging it).
    struct UntilTicked {
        ticks: Arc<AtomicU64>,
        want: u64,
        frames: usize,
    }

    impl Source for UntilTicked {
        fn run(self: Box<Self>, mut producer: FrameProducer, clock: &Clock, _: &AtomicBool) -> u64 {
            for i in 0..self.frames {
                let meta = FrameMeta {
                    seq: i as u64,
                    enqueued_ns: clock.now_ns(),
                    ..Default::default()
                };
                producer.push(meta, &[0.5; 6]);
            }
            let waited = Instant::now();
            while self.ticks.load(Ordering::SeqCst) < self.want
                && waited.elapsed() < Duration::from_secs(60)
            {
                thread::sleep(Duration::from_millis(10));
            }
            self.frames as u64
        }
    }

    /// A scorer held to the scorer thread, as a CUDA one is (no `SharedScorer`).
    struct Pinned(Scorer);

    impl BatchScorer for Pinned {
        fn max_batch(&self) -> usize {
            self.0.max_batch()
        }
        fn n_features(&self) -> usize {
            BatchScorer::n_features(&self.0)
        }
        fn input_mut(&mut self) -> &mut [f32] {
            BatchScorer::input_mut(&mut self.0)
        }
        fn input_row(&self, i: usize) -> &[f32] {
            BatchScorer::input_row(&self.0, i)
        }
        fn score_batch(&mut self, n: usize) {
            BatchScorer::score_batch(&mut self.0, n);
        }
        fn batch_scores(&self) -> &[f32] {
            BatchScorer::batch_scores(&self.0)
        }
        fn top_contributions(
            &self,
            i: usize,
            out: &mut [Contribution; MAX_TOP_CONTRIBUTIONS],
        ) -> u8 {
            BatchScorer::top_contributions(&self.0, i, out)
        }
        fn any_thread(&self) -> bool {
            false
        }
    }

    /// A scorer whose frames are dear, as an SAE's are: each batch sleeps 200 µs a frame.
    /// The scorer thread's batches first wait for the gate (the source sets it once every
    /// frame is pushed), so that the backlog does not hang on the threads' relative speeds.
    struct Dear(Scorer, Arc<AtomicBool>);

    impl BatchScorer for Dear {
        fn max_batch(&self) -> usize {
            self.0.max_batch()
        }
        fn n_features(&self) -> usize {
            BatchScorer::n_features(&self.0)
        }
        fn input_mut(&mut self) -> &mut [f32] {
            BatchScorer::input_mut(&mut self.0)
        }
        fn input_row(&self, i: usize) -> &[f32] {
            BatchScorer::input_row(&self.0, i)
        }
        fn score_batch(&mut self, n: usize) {
            if thread::current().name() == Some("darkwatch-scorer") {
                while !self.1.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(1));
                }
            }
            thread::sleep(Duration::from_micros(200) * n as u32);
            BatchScorer::score_batch(&mut self.0, n);
        }
        fn batch_scores(&self) -> &[f32] {
            BatchScorer::batch_scores(&self.0)
        }
        fn top_contributions(
            &self,
            i: usize,
            out: &mut [Contribution; MAX_TOP_CONTRIBUTIONS],
        ) -> u8 {
            BatchScorer::top_contributions(&self.0, i, out)
        }
    }

    /// A sink on the scorer that notes each batch's size, the seqs and their threads.
    #[derive(Default)]
    struct Batches {
        sizes: Vec<usize>,
        seqs: Vec<u64>,
        threads: Vec<String>,
    }

    impl Sink for Batches {
        const ON_SCORER_THREAD: bool = true;
        fn batch(&mut self, frames: usize) {
            self.sizes.push(frames);
        }
        fn accept(&mut self, f: &ScoredFrame) {
            self.seqs.push(f.meta.seq);
            let name = thread::current().name().unwrap_or("?").to_string();
            if self.threads.last() != Some(&name) {
                self.threads.push(name);
            }
        }
    }

    /// Frames that cost more than [`INLINE_MAX_FRAME_NS`] are not scored on the pushing
    /// thread (which would score them one at a time while its input waits): after the
    /// first, which measures the cost, the scorer thread takes them, and a backlog pushed
    /// at once is scored in batches of up to `batch_max_frames`, every frame once, in
    /// order. (The trial's SAE agent scored a burst one frame a batch, at batch-1 speed.)
    /// The scorer thread's batches wait until every frame is pushed, so the backlog is
    /// there whatever the threads' relative speeds.
    #[test]
    fn a_backlog_of_dear_frames_is_scored_in_batches_on_the_scorer_thread() {
        let model = synthetic(6, 3);
        let head = model.meta.head;
        let pushed = Arc::new(AtomicBool::new(false));
        let scorer = Dear(
            Scorer::new(Arc::new(model), head, 32, 2).unwrap(),
            pushed.clone(),
        );
        let cfg = PipelineConfig {
            ring_capacity_frames: 512,
            batch_max_frames: 32,
            ..PipelineConfig::default()
        };
        let frames = (0..300)
            .map(|seq| {
                (
                    FrameMeta {
                        seq,
                        ..FrameMeta::default()
                    },
                    seq as f32 / 300.0,
                )
            })
            .collect();
        let (report, sink) = run_scorer(
            scorer,
            &cfg,
            FullPolicy::Block,
            FramesThen(Frames(frames), pushed),
            Batches::default(),
            None,
        )
        .unwrap();
        assert_eq!(report.frames_scored, 300);
        assert_eq!(sink.seqs, (0..300).collect::<Vec<_>>());
        assert_eq!(sink.sizes.iter().sum::<usize>(), 300);
        assert_eq!(sink.sizes.len() as u64, report.batches);
        assert!(
            sink.sizes.iter().all(|&n| (1..=32).contains(&n)),
            "{:?}",
            sink.sizes
        );
        // The first frame (its cost unknown, on either thread), the scorer thread's first
        // batch (popped before the gate: what was pushed by then), and the rest, at most
        // 298 frames, in full batches of 32: 10 batches. Scored alone, 300.
        assert!(
            report.batches <= 12,
            "{} batches: {:?}",
            report.batches,
            sink.sizes
        );
        // The pushing thread scored at most the first frame, before its cost was known.
        let on_source = sink
            .threads
            .iter()
            .filter(|t| *t == "darkwatch-source")
            .count();
        assert!(on_source <= 1, "{:?}", sink.threads);
        assert_eq!(
            sink.threads.last().map(String::as_str),
            Some("darkwatch-scorer")
        );
    }

    /// The pushing thread's decision follows the smallest batches: a model at 100 µs for a
    /// batch of 1 but 20 µs a frame in batches of 32 stays dear after the scorer thread's
    /// large batches (the last batch's cost a frame flipped it with every message), and a
    /// cheap one stays cheap.
    #[test]
    fn the_inline_cost_follows_the_smallest_batches_and_does_not_flip() {
        let first = InlineCost::default();
        assert!(InlineCost::cheap(first.frame_ns), "nothing measured yet");
        // A dear model: a message's frame alone, then the backlog's batches, in turns.
        let mut cost = first.after_batch(1, 100_000);
        for _ in 0..10 {
            cost = cost.after_batch(32, 20_000);
            assert!(!InlineCost::cheap(cost.frame_ns), "{cost:?}");
            cost = cost.after_batch(1, 100_000);
            assert!(!InlineCost::cheap(cost.frame_ns), "{cost:?}");
        }
        // A batch of 1 measured cheaper (the model got cheaper) still counts.
        cost = cost.after_batch(1, 10_000);
        assert!(InlineCost::cheap(cost.frame_ns), "{cost:?}");
        assert_eq!(
            cost,
            InlineCost {
                frame_ns: 10_000,
                batch: 1
            }
        );
        // Messages of 4 frames: batches of 4 count, larger ones do not, smaller ones do.
        let mut cost = first.after_batch(4, 80_000);
        cost = cost.after_batch(64, 15_000);
        assert_eq!(
            cost,
            InlineCost {
                frame_ns: 80_000,
                batch: 4
            }
        );
        cost = cost.after_batch(4, 70_000);
        assert_eq!(
            cost,
            InlineCost {
                frame_ns: 70_000,
                batch: 4
            }
        );
        cost = cost.after_batch(2, 90_000);
        assert_eq!(
            cost,
            InlineCost {
                frame_ns: 90_000,
                batch: 2
            }
        );
        assert_eq!(
            cost.after_batch(0, 1),
            cost,
            "an empty batch measures nothing"
        );
    }

    fn run_ticked<F: BatchScorer, const ON_SCORER: bool>(scorer: F) -> Ticked<ON_SCORER> {
        let ticks = Arc::new(AtomicU64::new(0));
        let source = UntilTicked {
            ticks: ticks.clone(),
            want: 3,
            frames: 5,
        };
        let sink = Ticked::<ON_SCORER> {
            ticks,
            at: Vec::new(),
            threads: Vec::new(),
            frames: 0,
        };
        let cfg = PipelineConfig::default();
        run_scorer(scorer, &cfg, FullPolicy::Block, source, sink, None)
            .unwrap()
            .1
    }

    /// The sink's ticks come without frames (the source pushes five, then waits for three
    /// ticks), a [`TICK_EVERY`] apart, on the threads that run the sink: on the scorer
    /// (shared with the pushing thread, or not), or on its own thread.
    #[test]
    fn the_sink_ticks_while_no_frames_come() {
        let scorer = || {
            let model = synthetic(6, 3);
            let head = model.meta.head;
            Scorer::new(Arc::new(model), head, 4, 2).unwrap()
        };
        let check = |at: &[Instant], frames: u64| {
            assert!(at.len() >= 3, "{} ticks", at.len());
            assert!(at.windows(2).all(|w| w[1] - w[0] >= TICK_EVERY), "{at:?}");
            assert_eq!(frames, 5);
        };
        let shared = run_ticked::<_, true>(scorer());
        check(&shared.at, shared.frames);
        // The idle ticks come from the scorer thread; the pushing thread may give the first.
        assert!(shared.threads.contains(&"darkwatch-scorer".to_string()));
        assert!(
            shared
                .threads
                .iter()
                .all(|t| t == "darkwatch-scorer" || t == "darkwatch-source"),
            "{:?}",
            shared.threads
        );
        let pinned = run_ticked::<_, true>(Pinned(scorer()));
        check(&pinned.at, pinned.frames);
        assert_eq!(pinned.threads, ["darkwatch-scorer"]);
        let own = run_ticked::<_, false>(scorer());
        check(&own.at, own.frames);
        assert_eq!(own.threads, ["darkwatch-sink"]);
    }

    /// A scorer whose batches overlap, as the GPU's do: two input buffers, each batch
    /// scored (each row's sum) only when collected, from the buffer it was submitted from.
    /// It panics if the pipeline writes a buffer still in flight, keeps more than two in
    /// flight, or scores a batch synchronously.
    struct Overlapping {
        bufs: [Vec<f32>; 2],
        cur: usize,
        d: usize,
        flight: std::collections::VecDeque<(usize, usize)>,
        scores: Vec<f32>,
        last: usize,
        most_in_flight: usize,
    }

    impl BatchScorer for Overlapping {
        fn max_batch(&self) -> usize {
            self.scores.len()
        }
        fn n_features(&self) -> usize {
            self.d
        }
        fn input_mut(&mut self) -> &mut [f32] {
            assert!(
                self.flight.iter().all(|&(b, _)| b != self.cur),
                "the pipeline writes a buffer in flight"
            );
            &mut self.bufs[self.cur]
        }
        fn input_row(&self, _: usize) -> &[f32] {
            unreachable!("no hooks")
        }
        fn score_batch(&mut self, _: usize) {
            panic!("an overlapping scorer was scored synchronously");
        }
        fn batch_scores(&self) -> &[f32] {
            &self.scores[..self.last]
        }
        fn top_contributions(&self, _: usize, _: &mut [Contribution; MAX_TOP_CONTRIBUTIONS]) -> u8 {
            0
        }
        fn overlaps(&self) -> bool {
            true
        }
        fn submit(&mut self, n: usize) {
            self.flight.push_back((self.cur, n));
            assert!(self.flight.len() <= 2, "more than two batches in flight");
            self.most_in_flight = self.most_in_flight.max(self.flight.len());
            self.cur ^= 1;
        }
        fn collect(&mut self) {
            let (b, n) = self.flight.pop_front().expect("a batch in flight");
            for (s, row) in self
                .scores
                .iter_mut()
                .zip(self.bufs[b].chunks(self.d).take(n))
            {
                *s = row.iter().sum();
            }
            self.last = n;
        }
    }

    /// (seq, score) of every frame put.
    #[derive(Default)]
    struct Collected(Vec<(u64, f32)>);

    impl Results for Collected {
        fn put(&mut self, frame: &ScoredFrame) -> bool {
            self.0.push((frame.meta.seq, frame.score));
            true
        }
    }

    #[test]
    fn overlapped_batches_score_every_frame_once_in_order_from_its_own_buffer() {
        let (d, max_batch) = (3, 8);
        let (mut producer, consumer) = frame_ring(64, d, FullPolicy::Block);
        let scorer = Overlapping {
            bufs: [vec![0.0; max_batch * d], vec![0.0; max_batch * d]],
            cur: 0,
            d,
            flight: Default::default(),
            scores: vec![0.0; max_batch],
            last: 0,
            most_in_flight: 0,
        };
        let clock = Clock::new();
        let invalid = Arc::new(AtomicU64::new(0));
        let mut state = ScoreState::new(
            scorer,
            consumer,
            Collected::default(),
            clock,
            invalid.clone(),
            None,
        );
        let row = |i: u64| [i as f32, 0.5, if i % 9 == 4 { f32::NAN } else { 1.0 }];
        let mut push = |from: u64, to: u64| {
            for i in from..to {
                let meta = FrameMeta {
                    seq: i,
                    ..Default::default()
                };
                assert_eq!(producer.push(meta, &row(i)), Pushed::Accepted);
            }
        };
        // 53 frames waiting: batches of 8 (less the NaN frames) with two in flight.
        push(0, 53);
        state.drain();
        assert_eq!(state.scorer.most_in_flight, 2);
        assert!(
            state.scorer.flight.is_empty(),
            "drain returned with a batch in flight"
        );
        // One frame: collected without waiting for a second batch.
        push(53, 54);
        state.drain();
        assert!(state.scorer.flight.is_empty());
        let want: Vec<(u64, f32)> = (0..54)
            .filter(|i| i % 9 != 4)
            .map(|i| (i, row(i).iter().sum()))
            .collect();
        assert_eq!(state.out.0, want);
        assert_eq!(invalid.load(Ordering::Relaxed), 6);
        assert_eq!(state.scored, want.len() as u64);
    }

    /// Rows pushed alternately as streams 0 and 1, each with its own sequence.
    struct TwoStreams(Array2<f32>);

    impl Source for TwoStreams {
        fn run(self: Box<Self>, mut producer: FrameProducer, clock: &Clock, _: &AtomicBool) -> u64 {
            for (i, row) in self.0.rows().into_iter().enumerate() {
                let meta = FrameMeta {
                    seq: (i / 2) as u64,
                    stream: (i % 2) as u32,
                    timestamp: f64::NAN,
                    enqueued_ns: clock.now_ns(),
                    ..FrameMeta::default()
                };
                let row = row.to_slice().expect("standard layout");
                if producer.push(meta, row) == Pushed::Closed {
                    break;
                }
            }
            self.0.nrows() as u64
        }
    }

    /// Per stream: (score, the frame's own score, contributions' sum).
    #[derive(Default)]
    struct ByStream(Vec<Vec<(f32, f32, f32)>>);

    impl Sink for ByStream {
        fn accept(&mut self, f: &ScoredFrame) {
            let s = f.meta.stream as usize;
            if self.0.len() <= s {
                self.0.resize(s + 1, Vec::new());
            }
            let top: f32 = f.top().iter().map(|c| c.value).sum();
            self.0[s].push((f.score, f.frame_score, top));
        }
    }

    #[test]
    fn streams_are_smoothed_apart_into_trailing_means_of_their_own_frames() {
        let mut rng = Rng::new(9);
        let x = Array2::from_shape_fn((202, 6), |_| rng.uniform(-2.0, 2.0));
        let model = synthetic(6, 3).with_smoothing(4);
        let head = model.meta.head;
        let cfg = PipelineConfig {
            ring_capacity_frames: 16,
            batch_max_frames: 8,
            ..PipelineConfig::default()
        };
        // Every contribution reported: their sum is then the (smoothed) score.
        let (report, sink) = run(
            Arc::new(model.clone()),
            head,
            6,
            &cfg,
            FullPolicy::Block,
            TwoStreams(x.clone()),
            ByStream::default(),
        )
        .unwrap();
        assert_eq!(report.frames_scored, 202);
        let alone = scores(model.with_smoothing(1), &x);
        for s in 0..2 {
            let got = &sink.0[s];
            let own: Vec<f32> = alone.iter().skip(s).step_by(2).copied().collect();
            assert_eq!(got.len(), 101);
            let frame: Vec<f32> = got.iter().map(|g| g.1).collect();
            assert_eq!(frame, own, "stream {s}: each frame's own score");
            let smoothed: Vec<f32> = got.iter().map(|g| g.0).collect();
            assert_eq!(
                smoothed,
                crate::smooth::trailing_means(&own, 4),
                "stream {s}"
            );
            assert_ne!(smoothed, own);
            for &(score, _, top) in got {
                assert!(
                    (top - score).abs() <= 1e-4 * (1.0 + score.abs()),
                    "{top} vs {score}"
                );
            }
        }
    }

    #[test]
    fn a_model_switch_starts_every_streams_history_afresh() {
        let model = Arc::new(synthetic(6, 3).with_smoothing(3));
        let head = model.meta.head;
        let mut scorer = Scorer::new(model.clone(), head, 4, 2).unwrap();
        let mut rng = Rng::new(3);
        let x = Array2::from_shape_fn((4, 6), |_| rng.uniform(-2.0, 2.0));
        let score_row = |scorer: &mut Scorer, i: usize| {
            scorer.input_mut()[..6].copy_from_slice(x.row(i).as_slice().unwrap());
            let own = scorer.score(1)[0];
            scorer.smooth(0, 0, f64::NAN);
            (own, scorer.scores[0])
        };
        let (a, _) = score_row(&mut scorer, 0);
        let (b, mean) = score_row(&mut scorer, 1);
        assert_eq!(mean, crate::smooth::trailing_means(&[a, b], 3)[1]);
        // A retrained model (here: the same weights, published anew) scores afresh.
        scorer.set_model(Arc::new((*model).clone())).unwrap();
        let (c, alone) = score_row(&mut scorer, 2);
        assert_eq!(alone, c);
        let (d, mean) = score_row(&mut scorer, 3);
        assert_eq!(mean, crate::smooth::trailing_means(&[c, d], 3)[1]);
    }
}
