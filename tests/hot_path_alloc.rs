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
/// (The sender alone; the agent's sink around it is the next test.)
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

/// The agent's per-frame sink (thresholds, alert state, the per-stream gauge, the
/// `[scores]` send) allocates nothing per frame once its streams have started: with
/// `[scores] publish` on, per-stream metrics on and alerts configured (labels,
/// annotations), one quiet stream and one whose alert fires at its start and keeps
/// firing, its contributions adding to the episode's blame. Each run warms up (each
/// stream's first frame, the firing) apart from the frames counted.
#[test]
fn the_agent_sink_allocates_nothing_per_frame() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    use darkwatch::agent::SinkProbe;
    use darkwatch::config::DarkwatchConfig;
    use darkwatch::detector::Detector;
    use darkwatch::pipeline::Contribution;
    use darkwatch::ring::FrameMeta;

    const WARM_UP: u64 = 200;
    let mut cfg = DarkwatchConfig::default();
    cfg.scores.publish = true;
    cfg.scores.interval_secs = 1.0;
    cfg.metrics.per_stream = true;
    cfg.alert
        .labels
        .insert("cluster".to_string(), "c1".to_string());
    cfg.alert.annotations.insert(
        "runbook_url".to_string(),
        "https://runbooks.example/{stream}".to_string(),
    );
    cfg.alert.generator_url = "https://grafana.example/d/x?var-stream={stream}".to_string();
    cfg.validate().unwrap();
    // The calibration scores 0 to 0.999: the threshold lies below 1.
    let mut model = synthetic(2, 1);
    model.calibration_scores = (0..1000).map(|i| i as f32 / 1000.0).collect();
    let model = Detector::Autoencoder(Arc::new(model));
    let frame = |stream: u32, seq: u64| {
        let mut f = ScoredFrame {
            meta: FrameMeta {
                seq,
                stream,
                // Frames half a second apart: every other one is published.
                timestamp: 1.7e9 + seq as f64 * 0.5,
                received_mono: Some(1.0),
                ..FrameMeta::default()
            },
            latency_ns: 1_000,
            ..ScoredFrame::default()
        };
        f.score = if stream == 0 {
            // Quiet: the calibration's own range, below the threshold; one frame in 70 or
            // so above SPOT's initial level adds a peak to its tail.
            ((seq * 37) % 995) as f32 / 1000.0
        } else {
            1e6
        };
        f.frame_score = f.score;
        f.n_top = 2;
        f.top[0] = Contribution {
            feature: (seq % 2) as u32,
            value: 2.0,
        };
        f.top[1] = Contribution {
            feature: 1 - (seq % 2) as u32,
            value: 1.0,
        };
        f
    };
    let run = |frames: u64| {
        let mut probe = SinkProbe::new(
            &cfg,
            &model,
            &[
                ("n1", "org/o/cluster/c/node/n1/plugin/p/chnl/data/cpu"),
                ("n2", "org/o/cluster/c/node/n2/plugin/p/chnl/data/cpu"),
            ],
        )
        .unwrap();
        let feed = |probe: &mut SinkProbe, from: u64, to: u64| {
            for seq in from..to {
                if seq % 32 == 0 {
                    probe.batch(64);
                }
                probe.accept(&frame(0, seq));
                probe.accept(&frame(1, seq));
            }
        };
        feed(&mut probe, 0, WARM_UP);
        let firing = probe.counters.alerts_firing.load(Ordering::Relaxed);
        let before = ALLOCATIONS.load(Ordering::SeqCst);
        feed(&mut probe, WARM_UP, WARM_UP + frames);
        let after = ALLOCATIONS.load(Ordering::SeqCst);
        let c = &probe.counters;
        assert_eq!(
            c.frames_scored.load(Ordering::Relaxed),
            2 * (WARM_UP + frames)
        );
        // Stream n2 fired once, in the warm-up, and is still firing; n1 never fired.
        assert_eq!(firing, 1);
        assert_eq!(c.alerts_firing.load(Ordering::Relaxed), 1);
        assert_eq!(c.alerts_resolved.load(Ordering::Relaxed), 0);
        let alert = probe.alerts.try_recv().unwrap();
        assert!(alert.topic.ends_with("/n2"), "{}", alert.topic);
        assert!(probe.alerts.try_recv().is_err());
        // Both streams' gauges are shown, with their ExaMon keys as labels.
        let shown = c.stream_gauges.snapshot();
        assert_eq!(shown.len(), 2, "{shown:?}");
        assert!(shown[0].3.contains("node=\"n1\""), "{shown:?}");
        // Every other frame's score went to the queue (3 metrics each); past the queue's
        // capacity they were dropped, counted.
        let sent = 2 * (WARM_UP + frames).div_ceil(2);
        let kept = cfg.scores.queue_capacity as u64;
        assert_eq!(
            probe.mqtt.scores_dropped.load(Ordering::Relaxed),
            3 * sent.saturating_sub(kept)
        );
        after - before
    };
    let (small, large) = (run(1_000), run(10_000));
    assert!(
        large.abs_diff(small) < 50,
        "allocations grew with frames through the agent sink: {small} for 1k frames per stream, {large} for 10k"
    );
}
