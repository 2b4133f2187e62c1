//! Proves the hot path allocates nothing per frame: a counting global allocator around
//! two replays of different length through the real pipeline. Setup costs the same in
//! both; any per-frame allocation would show up thousands of times over.
//! (Its own test binary, because the allocator is process-wide.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use darkwatch::config::PipelineConfig;
use darkwatch::model::Autoencoder;
use darkwatch::model::fit::synthetic;
use darkwatch::mss::{MssConfig, ReferenceBank};
use darkwatch::pipeline::{self, FileSource, ScoredFrame, Sink};
use darkwatch::ring::FullPolicy;
use ndarray::Array2;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
/// The counter is process-wide: the tests take turns so none counts another's work.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

struct CountSink {
    frames: u64,
    score_sum: f64,
}

impl Sink for CountSink {
    fn accept(&mut self, f: &ScoredFrame) {
        self.frames += 1;
        self.score_sum += f.score as f64;
    }
}

/// The synthetic model, optionally with mean-shift scoring on (m = 1, k = 10, 512 frames).
fn model(mss: bool) -> Arc<darkwatch::model::Model> {
    let mut m = synthetic(38, 1);
    if mss {
        let r0 = Array2::from_shape_fn((512, 38), |(i, j)| ((i * 13 + j * 5) % 23) as f32 / 23.0);
        m.bank = Some(ReferenceBank::from_r0(r0, 1, 10));
        m = m.with_mss(MssConfig {
            rounds: 1,
            neighbours: 10,
            bank_frames: 512,
        });
    }
    Arc::new(m)
}

fn allocations_for_replay(frames: usize, mss: bool) -> (u64, u64) {
    allocations_for(frames, model(mss))
}

/// An ensemble of three of the synthetic model's shape: each member's terms are summed
/// into the contributions in place, with no buffer per call.
fn ensemble() -> Arc<darkwatch::model::Model> {
    let base = synthetic(38, 1);
    let ae = Autoencoder::ensemble(38, &base.ae.hidden_sizes(), base.ae.output, 3, 1);
    Arc::new(darkwatch::model::Model::new(ae, base.meta.clone(), None))
}

fn allocations_for(frames: usize, model: Arc<darkwatch::model::Model>) -> (u64, u64) {
    let head = model.meta.head;
    let data = Array2::from_shape_fn((frames, 38), |(i, j)| ((i * 31 + j * 7) % 17) as f32 / 17.0);
    let source = FileSource::new(data, None, None);
    let cfg = PipelineConfig {
        ring_capacity_frames: 256,
        batch_max_frames: 32,
        ..PipelineConfig::default()
    };
    let sink = CountSink {
        frames: 0,
        score_sum: 0.0,
    };
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    let (report, sink) =
        pipeline::run(model, head, 3, &cfg, FullPolicy::Block, source, sink).unwrap();
    let after = ALLOCATIONS.load(Ordering::SeqCst);
    assert_eq!(report.frames_scored, frames as u64);
    assert_eq!(sink.frames, frames as u64);
    assert!(sink.score_sum.is_finite());
    (after - before, report.batches)
}

#[test]
fn replay_of_10k_frames_allocates_nothing_per_frame() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (small, _) = allocations_for_replay(1_000, false);
    let (large, batches) = allocations_for_replay(10_000, false);
    assert!(batches >= 10_000 / 32, "{batches} batches");
    // 9,000 more frames (and hundreds more batches): the count may differ by a handful
    // (thread start-up), never by anything proportional to frames or batches.
    assert!(
        large.abs_diff(small) < 50,
        "allocations grew with frames: {small} for 1k frames, {large} for 10k"
    );
}

#[test]
fn an_ensemble_allocates_nothing_per_frame() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    assert_eq!(ensemble().ae.members, 3);
    let (small, _) = allocations_for(1_000, ensemble());
    let (large, _) = allocations_for(10_000, ensemble());
    assert!(
        large.abs_diff(small) < 50,
        "allocations grew with frames in an ensemble: {small} for 1k frames, {large} for 10k"
    );
}

#[test]
fn mean_shift_scoring_allocates_nothing_per_frame() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (small, _) = allocations_for_replay(1_000, true);
    let (large, _) = allocations_for_replay(10_000, true);
    assert!(
        large.abs_diff(small) < 50,
        "allocations grew with frames under MSS: {small} for 1k frames, {large} for 10k"
    );
}

#[test]
fn replay_sink_allocates_nothing_per_frame() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    use darkwatch::config::DarkwatchConfig;
    use darkwatch::replay::{Frames, Outputs, replay_frames};
    let run = |frames: usize| {
        let model = model(false);
        let head = model.meta.head;
        let values =
            Array2::from_shape_fn((frames, 38), |(i, j)| ((i * 31 + j * 7) % 17) as f32 / 17.0);
        let frames = Frames {
            values: values.into(),
            timestamps: None,
            labels: None,
            window_frames: 1,
        };
        let cfg = DarkwatchConfig::default();
        let before = ALLOCATIONS.load(Ordering::SeqCst);
        let out = replay_frames(model, head, frames, Outputs::default(), None, &cfg).unwrap();
        let after = ALLOCATIONS.load(Ordering::SeqCst);
        assert_eq!(out.scores.len(), out.pipeline.frames_scored as usize);
        after - before
    };
    let (small, large) = (run(1_000), run(10_000));
    assert!(
        large.abs_diff(small) < 50,
        "allocations grew with frames through the replay sink: {small} for 1k, {large} for 10k"
    );
}

/// `[scores]`: the sink's send of a frame's score (queued, or dropped and counted when the
/// queue is full) allocates nothing: the topics are shared, the queue is allocated once.
/// (The sender alone: the agent's sink, which calls it per frame, is not public.)
#[test]
fn score_sends_allocate_nothing_per_frame() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    use darkwatch::mqtt::{MqttStats, ScoreSample, ScoresConfig, score_channel};
    let run = |frames: usize| {
        let cfg = ScoresConfig {
            queue_capacity: 4_096,
            ..ScoresConfig::default()
        };
        let stats = Arc::new(MqttStats::default());
        let (tx, rx) = score_channel(&cfg, stats.clone());
        let topics = Arc::new(cfg.template_topics("n", "s"));
        let before = ALLOCATIONS.load(Ordering::SeqCst);
        for i in 0..frames {
            tx.send(ScoreSample {
                topics: topics.clone(),
                score: 1.0,
                threshold: 2.0,
                timestamp: i as f64,
            });
        }
        let after = ALLOCATIONS.load(Ordering::SeqCst);
        // Past the queue's 4,096 the samples were dropped, counted.
        let dropped = stats.scores_dropped.load(Ordering::Relaxed);
        assert_eq!(dropped, 3 * frames.saturating_sub(4_096) as u64);
        drop(rx);
        after - before
    };
    let (small, large) = (run(1_000), run(10_000));
    assert!(
        large.abs_diff(small) < 50,
        "allocations grew with score sends: {small} for 1k, {large} for 10k"
    );
}
