//! The agent: MQTT in, frames assembled per stream, the one pipeline, a threshold and
//! alert state per stream, Alertmanager-shaped alerts out over MQTT (spooled to disk
//! first, so none is lost while the broker is away).
//!
//! ```text
//! mqtt client thread: decode ▶ assemble ▶ frame ring ▶ scorer: score ▶ threshold + alerts per stream
//!        ▲              (the Feed)                                                        │
//!        └──────────────────────── Outgoing (alert JSON) ◀────────────────────────────────┘
//! ```
//!
//! A received message is decoded and assembled on the MQTT client's thread and its frame
//! pushed into the scorer's ring there (`Feed`); the scorer runs the thresholds and alert
//! state itself (`AgentSink` is a [`Sink::ON_SCORER_THREAD`] sink), and while the scorer
//! thread is idle the MQTT thread runs the scorer itself right after the push (the
//! pipeline's `SharedScorer`). So a frame wakes no other thread on its way from the socket
//! to its alert; the scorer thread scores only what arrives while it is busy. The
//! pipeline's source thread only keeps time (`FeedTurn`): it ends a turn on stop or
//! reload, beats the watchdog's heartbeat, and closes quiet streams' windows by the event
//! clock.
//!
//! # Reload
//!
//! [`Control::reload`] hands a running agent a new, already validated configuration and
//! model (the binary does this on SIGHUP). The MQTT client, the spool, the embedded broker
//! and `/metrics` stay up; the pipeline (source, scorer, sink) ends its turn, drains, and
//! starts again with the new model, thresholds and alert settings. Received messages are
//! held in the feed meanwhile (up to `[mqtt] incoming_capacity`), so none is lost. Open
//! windows and per-stream alert state carry over when the input format, the `[assemble]`
//! settings and the model's features are unchanged (and, for alert state, the model id
//! and the `[threshold]` and `[alert]` settings); otherwise open windows are dropped and
//! firing alerts are resolved before the new model takes over. Changes to `[mqtt]`, `[spool]`, `[metrics]` and `[scores]` need
//! a restart; a reload keeps the running ones and logs a warning.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::alert::{AlertEvent, AlertState, Observation};
use crate::config::DarkwatchConfig;
use crate::detector::{self, Detector};
use crate::ingest::assemble::{Assembler, AssemblerError, DecodeError, Receipt, Reject};
use crate::ingest::examon::ExamonDecoder;
use crate::model::{Model, ModelError};
use crate::mqtt::{self, Incoming, MqttError, MqttStats, Outgoing, Received};
use crate::pipeline::{self, Clock, PipelineError, PipelineReport, ScoredFrame, Sink, Source};
use crate::ring::{FrameMeta, FrameProducer, Pushed};
use crate::sae::detector::SaeScorer;
use crate::spool::{Spool, SpoolError};
use crate::threshold::{Threshold, ThresholdError};

/// What the agent runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Model directory written by `darkwatch train`, or an SAE folder with its head. One
    /// that is missing or holds no usable model is a configuration error when `run` or
    /// `validate` loads it (exit 78); a reload keeps the running model instead.
    pub model_dir: PathBuf,
    /// What the subscribed topics carry: `examon` (one metric per message), `telegraf`
    /// (Telegraf's MQTT output, JSON or Influx line protocol) or `raw` (little-endian f32
    /// frames of the model's width, one or more per message, optionally behind a header;
    /// the topic names the stream: see [`crate::ingest::raw`]).
    pub format: InputFormat,
}

/// The payload format of the agent's input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputFormat {
    #[default]
    Examon,
    Telegraf,
    Raw,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            model_dir: PathBuf::from("/var/lib/darkwatch/model"),
            format: InputFormat::Examon,
        }
    }
}

/// The decoder of the configured input format.
enum Decoder {
    Examon(ExamonDecoder),
    Telegraf(crate::ingest::telegraf::TelegrafDecoder),
    /// Raw frames skip the assembler: each message is a frame. Streams are named by their
    /// topic ([`crate::ingest::raw`]) and numbered in order of appearance (number and next
    /// sequence number kept per stream name), at most
    /// `max_streams` of them (`[assemble] max_streams`, as for assembled input): a frame of
    /// a further stream is refused and counted as a `too_many_streams` sample, so a
    /// publisher cycling topic names cannot grow the agent's memory without bound.
    Raw {
        decoder: crate::ingest::raw::RawDecoder,
        frame: Vec<f32>,
        /// The streams, their indexes and the indexes free again.
        streams: RawStreams,
        max_streams: usize,
        /// Header ids not taken as the frame's seq (not above the stream's last, or from
        /// [`crate::ingest::raw::MAX_FRAME_ID`] on).
        ids_unused: u64,
        /// Header times too far ahead of their receipt, replaced by it.
        times_ahead: u64,
        /// An SAE's `[sae] id_is_position`: header ids are in-prompt positions, not seqs,
        /// and frames at positions below this are not scored ([`SaeDetector::live_skip`]).
        ///
        /// [`SaeDetector::live_skip`]: crate::sae::detector::SaeDetector::live_skip
        live_skip: Option<u64>,
    },
}

/// The raw decoder's streams by name; the slots of forgotten streams, each with the
/// generation its next stream takes; and the next slot never used.
#[derive(Debug, Default)]
struct RawStreams {
    by_name: std::collections::HashMap<String, RawStream>,
    free: Vec<(u32, u32)>,
    next: u32,
}

/// One raw stream: its slot and the slot's generation ([`FrameMeta::generation`]), the
/// seq its next frame takes, how many header ids in a row were not taken, and when its
/// latest frame arrived (monotonic seconds).
#[derive(Debug, Clone, Copy)]
struct RawStream {
    index: u32,
    generation: u32,
    next_seq: u64,
    ids_not_taken: u32,
    last_mono: f64,
}

/// What the source tells the sink of the streams it forgot (`[assemble]
/// forget_after_secs`), locked by the source on its clock polls (at most once a second)
/// and by the sink on its tick, never per frame: the slot and generation of each. The
/// sink then drops their state, resolving a firing alert, and frames of those generations
/// that reach it later are dropped (see [`AgentSink::admit`]).
///
/// The slot itself is free at the source at once: each frame carries its slot's
/// generation, and frames travel in order, so the scorer and the sink start a slot's state
/// afresh at the first frame of its new stream, however far behind the input they run,
/// whether or not the sink heard of the old stream's end yet. (The slot used to go to a
/// new stream only once the sink had let go of it, a round trip of about a second in
/// which a new stream was refused when `max_streams` was full; and that hand-back was
/// not ordered against the ring of frames.)
#[derive(Debug, Default)]
struct Recycling {
    retired: Vec<(u32, u32)>,
}

/// A slot's stream as the source gave it out, for the sink and the log: its name and the
/// slot's generation.
#[derive(Debug, Clone, Default)]
struct SlotName {
    name: String,
    generation: u32,
    /// The topic of the stream's first message: an ExaMon stream's org, cluster, node and
    /// stream keys, read by the sink when the stream starts (`[scores]`, `anomaly_score`).
    topic: String,
}

/// The streams' names by slot (see [`SlotName`]): written by the source when a stream
/// takes a slot, read when the sink starts a stream's state; rare, never per frame.
type StreamNames = Arc<Mutex<Vec<SlotName>>>;

type SharedRecycling = Arc<Mutex<Recycling>>;

impl Decoder {
    fn format(&self) -> InputFormat {
        match self {
            Decoder::Examon(_) => InputFormat::Examon,
            Decoder::Telegraf(_) => InputFormat::Telegraf,
            Decoder::Raw { .. } => InputFormat::Raw,
        }
    }
}

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Detector(#[from] detector::LoadError),
    /// A setting the model cannot run with, `key` as `section.key`: the configuration or
    /// the model folder must change, so restarting cannot mend it (the binary exits 78).
    #[error("{reason}")]
    Config { key: String, reason: String },
    /// A folder the agent writes (`key`) cannot be used for a reason that may pass (a full
    /// disk, an I/O error); see [`check_dirs`].
    #[error("key `{key}`: {reason}")]
    Folder { key: String, reason: String },
    /// `[metrics] listen` cannot be bound (taken by another process, say).
    #[error(
        "[metrics] listen = \"{listen}\": cannot listen: {source}; if another process holds it, Prometheus would scrape that one instead of this agent: stop it, or set [metrics] listen to a free address (\"\" serves no /metrics)"
    )]
    Metrics {
        listen: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Mqtt(#[from] MqttError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("frame assembly: {0}")]
    Assembler(#[from] AssemblerError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("threshold: {0}")]
    Threshold(String),
}

fn sum(counts: &[AtomicU64]) -> u64 {
    counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
}

/// Counters of one agent run.
#[derive(Debug, Default)]
pub struct AgentCounters {
    pub messages: AtomicU64,
    /// Messages (or Telegraf metrics) not decoded, by [`DecodeError::REASONS`].
    pub decode_errors_by_reason: [AtomicU64; DecodeError::REASONS.len()],
    /// Samples the assembler refused, by [`Reject::REASONS`].
    pub samples_rejected_by_reason: [AtomicU64; Reject::REASONS.len()],
    pub frames: AtomicU64,
    pub frames_incomplete: AtomicU64,
    pub alerts_firing: AtomicU64,
    pub alerts_resolved: AtomicU64,
    /// Firing alerts published again (`[alert] resend_secs`), not counted in `alerts_firing`.
    pub alerts_resent: AtomicU64,
    /// Gauges, as the sink last set them (at a transition, a new or returning stream, and
    /// about once a second): streams whose alert fires now, streams with a threshold and
    /// alert state, and those of them silent (`[alert] silence_secs`).
    pub firing_now: AtomicU64,
    pub streams: AtomicU64,
    pub streams_silent: AtomicU64,
    /// Streams that send samples but whose last frames were all incomplete, so none is
    /// scored ([`crate::ingest::assemble::Assembler::incomplete_streams`]); set by the
    /// source after each turn.
    pub streams_incomplete: AtomicU64,
    /// Turns of the source thread's loop (at least one per 50 ms): its heartbeat.
    pub source_turns: AtomicU64,
    /// Complete (finite) frames handed to the scorer, ring drops excluded.
    pub frames_queued: AtomicU64,
    /// Frames that came out of the scorer into the sink.
    pub frames_scored: AtomicU64,
    /// Frames dropped because the ring to the scorer was full (`drop_newest`).
    pub frames_dropped: AtomicU64,
    /// MQTT receipt of a raw frame, or of an assembled frame's last metric, to its alert
    /// handed to the MQTT client.
    pub alert_latency: LatencyBuckets,
    /// A complete frame entering the ring to its score (queueing, batching, scoring).
    pub scoring_latency: LatencyBuckets,
    /// Scoring time (the wall clock, read once per batch) less the frame's time: a raw
    /// frame's header time, else its receipt; an assembled frame's window end.
    pub frame_age: LatencyBuckets,
    /// Frames per batch the scorer scored.
    pub batch_frames: BatchSizes,
    /// Reloads applied ([`Control::reload`]).
    pub reloads: AtomicU64,
    /// Reloads refused because the new configuration or model was invalid (the binary
    /// counts these: it validates before handing a reload over).
    pub reloads_failed: AtomicU64,
    /// Streams forgotten after `[assemble] forget_after_secs` without a message.
    pub streams_forgotten: AtomicU64,
    /// Frames of a forgotten stream that reached the scorer after the sink let go of the
    /// stream (the scorer ran about `forget_after_secs` behind its input): dropped, not
    /// scored against another stream's state. Logged, not exported.
    pub frames_stale: AtomicU64,
    /// Raw frames left unscored at an in-prompt position below `[sae] skip_positions`
    /// (`[sae] id_is_position`): BOS / attention-sink tokens.
    pub frames_skipped: AtomicU64,
    /// Messages on darkwatch's own output topics (alerts, status, scores: this agent's or
    /// another darkwatch's, see [`crate::mqtt::OwnTopics`]) and ExaMon messages on a
    /// `[scores] plugin` topic (`…/plugin/examon-ai_pub/…`) that the subscription matched;
    /// not decoded.
    pub own_messages_ignored: AtomicU64,
    /// Each stream's latest score and threshold (`[metrics] per_stream`), set by the sink.
    pub stream_gauges: crate::metrics::StreamGauges,
    model_id: Mutex<String>,
    /// The version of the model loaded (0 as trained; a checkpoint of online retraining
    /// loaded as `model_dir` carries its own): `darkwatch_model_version` without retraining.
    pub model_version: AtomicU64,
    backend: Mutex<String>,
    retrain: Mutex<Option<Arc<crate::retrain::RetrainCounters>>>,
}

impl AgentCounters {
    /// Counts a message (or a Telegraf metric) that could not be decoded; returns how many
    /// of its reason there were so far, this one included.
    fn decode_error(&self, e: &DecodeError) -> u64 {
        self.decode_errors_by_reason[e.reason_index()].fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Messages (or Telegraf metrics) not decoded, every reason.
    pub fn decode_errors(&self) -> u64 {
        sum(&self.decode_errors_by_reason)
    }

    /// Samples the assembler refused, every reason.
    pub fn samples_rejected(&self) -> u64 {
        sum(&self.samples_rejected_by_reason)
    }

    /// The alert events published since the start, in words, for the stop summary and
    /// systemd's `STATUS=`: `2 alert events (1 firing, 1 resolved), 3 re-sends`. An event is
    /// a transition (a firing, or a resolve, those of a stop, a reload or a silence
    /// included); re-sends of firing alerts are counted apart. The summary used to say
    /// "2 alerts" for one alert fired and resolved, and `STATUS=` "1 alerts fired".
    pub fn alert_events_text(&self) -> String {
        let firing = self.alerts_firing.load(Ordering::Relaxed);
        let resolved = self.alerts_resolved.load(Ordering::Relaxed);
        let resent = self.alerts_resent.load(Ordering::Relaxed);
        let events = firing + resolved;
        format!(
            "{events} alert event{} ({firing} firing, {resolved} resolved), {resent} re-send{}",
            if events == 1 { "" } else { "s" },
            if resent == 1 { "" } else { "s" },
        )
    }

    /// The id of the model being scored (empty before the agent has loaded one).
    pub fn model_id(&self) -> String {
        self.model_id.lock().map(|m| m.clone()).unwrap_or_default()
    }

    fn set_model_id(&self, id: &str) {
        if let Ok(mut m) = self.model_id.lock() {
            *m = id.to_string();
        }
    }

    /// [`Self::set_model_id`] for the tests of other modules.
    #[cfg(test)]
    pub(crate) fn set_model_id_for_test(&self, id: &str) {
        self.set_model_id(id);
    }

    /// What scores the model: `native` or `onnx/<provider>`.
    pub fn backend(&self) -> String {
        self.backend.lock().map(|m| m.clone()).unwrap_or_default()
    }

    fn set_backend(&self, label: &str) {
        if let Ok(mut m) = self.backend.lock() {
            *m = label.to_string();
        }
    }

    /// The online retraining counters, while retraining is on.
    pub fn retrain(&self) -> Option<Arc<crate::retrain::RetrainCounters>> {
        self.retrain.lock().ok().and_then(|r| r.clone())
    }

    fn set_retrain(&self, counters: Option<Arc<crate::retrain::RetrainCounters>>) {
        if let Ok(mut r) = self.retrain.lock() {
            *r = counters;
        }
    }
}

/// Upper bounds (seconds) of the buckets of [`LatencyBuckets`]; a last one is +Inf.
///
/// Fine below a millisecond, where raw frames and `close_when_complete` windows land, and
/// up to a minute: an assembled frame otherwise waits for a later window to close it
/// (about one to two `[assemble] window_secs`, 1 s by default), and the buckets must see
/// that, not put it all past the last bound (`histogram_quantile` then answers the last
/// finite bound, whatever the latency).
pub const LATENCY_BUCKETS_SECS: [f64; 19] = [
    5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// A latency histogram that threads update without locks (Prometheus-style buckets).
#[derive(Debug, Default)]
pub struct LatencyBuckets {
    /// Observations per bucket of [`LATENCY_BUCKETS_SECS`], then one for larger ones.
    pub counts: [AtomicU64; LATENCY_BUCKETS_SECS.len() + 1],
    pub sum_ns: AtomicU64,
}

impl LatencyBuckets {
    /// Adds one observation; negative or non-finite ones (clock steps) are ignored.
    pub fn record(&self, secs: f64) {
        if !(secs.is_finite() && secs >= 0.0) {
            return;
        }
        let i = LATENCY_BUCKETS_SECS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS_SECS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add((secs * 1e9) as u64, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The upper bound of the bucket holding quantile `q` (+Inf past the last bound;
    /// NaN without observations).
    pub fn quantile_upper(&self, q: f64) -> f64 {
        let n = self.count();
        if n == 0 {
            return f64::NAN;
        }
        let want = (q.clamp(0.0, 1.0) * n as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c.load(Ordering::Relaxed);
            if seen >= want {
                return LATENCY_BUCKETS_SECS
                    .get(i)
                    .copied()
                    .unwrap_or(f64::INFINITY);
            }
        }
        f64::INFINITY
    }
}

/// Upper bounds of the scorer's batch-size buckets (`darkwatch_scorer_batch_frames`):
/// powers of two up to the default `[pipeline] batch_max_frames` and past it.
pub const BATCH_BUCKETS: [u64; 12] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096];

/// A histogram of batch sizes that threads update without locks.
#[derive(Debug, Default)]
pub struct BatchSizes {
    /// Batches per bucket of [`BATCH_BUCKETS`], then one for larger ones.
    pub counts: [AtomicU64; BATCH_BUCKETS.len() + 1],
    /// Frames in all batches.
    pub frames: AtomicU64,
}

impl BatchSizes {
    /// Adds one batch of `n` frames.
    pub fn record(&self, n: u64) {
        let i = BATCH_BUCKETS
            .iter()
            .position(|&b| n <= b)
            .unwrap_or(BATCH_BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.frames.fetch_add(n, Ordering::Relaxed);
    }

    /// Batches so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// A validated configuration and its loaded model, for [`Control::reload`].
#[derive(Debug)]
pub struct Reload {
    pub cfg: DarkwatchConfig,
    pub model: Detector,
}

/// Steers a running agent from another thread: stop it, or reload it.
#[derive(Debug, Clone, Default)]
pub struct Control {
    stop: Arc<AtomicBool>,
    /// Set while a reload waits; the source ends its turn on it.
    reload: Arc<AtomicBool>,
    pending: Arc<Mutex<Option<Box<Reload>>>>,
}

impl Control {
    /// A control whose stop flag is `stop`.
    pub fn new(stop: Arc<AtomicBool>) -> Control {
        Control {
            stop,
            ..Control::default()
        }
    }

    /// Asks the agent to drain and stop.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was asked for.
    pub fn is_stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Hands the agent a new configuration and model (validated by the caller); it takes
    /// them over at its next turn (see the module docs). A reload still waiting is replaced.
    pub fn reload(&self, reload: Reload) {
        if let Ok(mut p) = self.pending.lock() {
            *p = Some(Box::new(reload));
        }
        self.reload.store(true, Ordering::SeqCst);
    }

    fn take_reload(&self) -> Option<Reload> {
        let taken = self.pending.lock().ok().and_then(|mut p| p.take());
        self.reload.store(false, Ordering::SeqCst);
        taken.map(|b| *b)
    }
}

/// What a finished run reports.
#[derive(Debug)]
pub struct AgentReport {
    pub pipeline: PipelineReport,
    pub counters: Arc<AgentCounters>,
    pub mqtt: Arc<MqttStats>,
    /// (stream, seq, score) of every scored frame, when recording was asked for.
    pub scores: Vec<(u32, u64, f32)>,
    /// Every alert event, in order, when recording was asked for (`counters` count them
    /// always).
    pub events: Vec<AlertEvent>,
    /// The broker port actually used (the embedded broker may pick one).
    pub port: u16,
}

/// Runs the agent until `stop` is set; returns what it did. `counters` can be watched
/// while it runs. With `record`, every frame's score is kept (the demo evaluates them).
///
/// # Errors
/// The model, spool or broker cannot be set up, or the pipeline fails.
pub fn run(
    cfg: &DarkwatchConfig,
    stop: Arc<AtomicBool>,
    counters: Arc<AgentCounters>,
    record: bool,
) -> Result<AgentReport, AgentError> {
    let model = Detector::load_configured(&cfg.agent.model_dir, cfg)?;
    if let Some(w) = model.warning() {
        tracing::warn!("{w}");
    }
    run_with(cfg, model, &Control::new(stop), counters, record)
}

/// Runs the agent with an already loaded `model` until `control` stops it, taking over
/// the reloads handed to `control` meanwhile (see the module docs).
///
/// # Errors
/// The spool or broker cannot be set up, the configuration does not suit the model (an
/// SAE needs raw input and no retraining), or the pipeline fails.
pub fn run_with(
    cfg: &DarkwatchConfig,
    model: impl Into<Detector>,
    control: &Control,
    counters: Arc<AgentCounters>,
    record: bool,
) -> Result<AgentReport, AgentError> {
    let mut model: Detector = model.into();
    check_suits(cfg, &model)?;
    // Bound before anything starts: an agent without its /metrics would run unwatched
    // while Prometheus scrapes whichever process holds the address.
    let metrics_listener = bind_metrics(&cfg.metrics.listen)?;
    // Fixed for the run, as `[metrics]` is: a reload does not turn them on or off.
    counters
        .stream_gauges
        .enable(cfg.metrics.per_stream && metrics_listener.is_some());
    let mut mqtt_cfg = cfg.mqtt.clone();
    if mqtt_cfg.broker == mqtt::BrokerMode::Embedded {
        mqtt_cfg.port = mqtt::start_embedded_broker_with(
            &mqtt_cfg.host,
            mqtt_cfg.port,
            mqtt_cfg.embedded_log_bytes,
        )?;
        tracing::info!(host = %mqtt_cfg.host, port = mqtt_cfg.port, "Embedded MQTT broker started.");
    }
    let port = mqtt_cfg.port;
    let spool = Spool::open(cfg.spool.clone())?;
    let feed = Feed::new(
        AgentSource::new(cfg, &model, &counters, &cfg.mqtt.subscribe_filters())?,
        mqtt_cfg.incoming_capacity,
    );
    let (out_tx, out_rx) = mqtt::outgoing_channel();
    let mqtt_stats = Arc::new(MqttStats::default());
    let client_stop = mqtt::ClientStop::default();
    let (score_tx, score_rx) = if cfg.scores.publish {
        let (tx, rx) = mqtt::score_channel(&cfg.scores, mqtt_stats.clone());
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let client = mqtt::spawn_client_with_scores(
        mqtt_cfg.clone(),
        spool,
        FeedInbox(feed.clone()),
        out_rx,
        score_rx,
        mqtt_stats.clone(),
        client_stop.clone(),
    )?;
    counters.set_model_id(model.id());
    counters
        .model_version
        .store(model.version(), Ordering::Relaxed);
    counters.set_backend(&model.backend_label());
    tracing::info!(model = %model.id(), version = model.version(), backend = %model.backend_label(), "model loaded");
    let mut retraining = Retraining::start(cfg, &model, &counters)?;

    let handback: Handback = Arc::default();
    let (streams, recycling) = {
        let feed = lock(&feed);
        (feed.source.streams.clone(), feed.source.recycling.clone())
    };
    let mut source = FeedTurn {
        feed,
        counters: counters.clone(),
        control: control.clone(),
        handback: handback.clone(),
        no_input: NoInput::new(&mqtt_cfg),
        skips: BrokerSkipWatch::new(&mqtt_cfg),
        drops: RingDropWatch::new(&counters, cfg.pipeline.ring_capacity_frames),
    };
    let mut sink = AgentSink::new(cfg, &model, streams, &mqtt_cfg, out_tx, &counters, record)?;
    sink.link = Some(mqtt_stats.clone());
    sink.recycling = recycling;
    sink.score_out = score_tx.map(|sender| ScoreOut {
        cfg: cfg.scores.clone(),
        node: mqtt_cfg.node(),
        sender,
    });
    let metrics_stop = Arc::new(AtomicBool::new(false));
    if let Some(listener) = metrics_listener {
        let exposed = crate::metrics::Exposed {
            counters: counters.clone(),
            mqtt: mqtt_stats.clone(),
            model_id: model.id().to_string(),
        };
        match crate::metrics::serve(listener, exposed, metrics_stop.clone()) {
            Ok(addr) => tracing::info!(%addr, "Serving /metrics."),
            // The address is bound: only its thread failed to start. Log and go on.
            Err(e) => {
                tracing::warn!(listen = %cfg.metrics.listen, error = %e, "Cannot serve /metrics.")
            }
        }
    }
    let started = cfg.clone();
    let mut cfg = cfg.clone();
    let mut total: Option<PipelineReport> = None;
    let ended: Result<AgentSink, AgentError> = loop {
        let turn = match &model {
            Detector::Autoencoder(ae) => {
                // With online retraining the turn starts from the newest published model.
                let (turn_model, hooks) = match retraining.as_ref() {
                    Some(r) => (r.shared.cell.load_full(), Some(r.hook(&cfg, &mut sink))),
                    None => (ae.clone(), None),
                };
                pipeline::run_hooked(
                    turn_model,
                    ae.meta.head,
                    cfg.score.top_contributions,
                    &cfg.pipeline,
                    cfg.pipeline.full_policy,
                    source,
                    sink,
                    hooks,
                )
            }
            Detector::Sae(sae) => {
                let scorer = match SaeScorer::for_pipeline(
                    sae.clone(),
                    &cfg.pipeline,
                    cfg.score.top_contributions,
                ) {
                    Ok(s) => s,
                    Err(e) => break Err(AgentError::Detector(e.into())),
                };
                // The upload may still have failed and fallen back to the CPU.
                counters.set_backend(&scorer.backend_label());
                pipeline::run_scorer(
                    scorer,
                    &cfg.pipeline,
                    cfg.pipeline.full_policy,
                    source,
                    sink,
                    None,
                )
            }
        };
        let (report, mut done) = match turn {
            Ok(t) => t,
            Err(e) => break Err(AgentError::Pipeline(e)),
        };
        total = Some(match total.take() {
            None => report,
            Some(t) => add_reports(t, &report),
        });
        // The source hands itself back when it ended its turn for a reload.
        let Some(back) = handback.lock().ok().and_then(|mut h| h.take()) else {
            done.end_alerts(ENDED_BY_STOP);
            break Ok(done);
        };
        source = *back;
        sink = done;
        if control.is_stopping() {
            // Stopped while reloading: one more (immediately ending) turn drains and
            // flushes the open windows.
            continue;
        }
        let Some(mut reload) = control.take_reload() else {
            continue;
        };
        // A reload that loaded a model of the running retraining (the newest checkpoint of
        // its state_dir) goes on with the model that retraining scores: loading it anew
        // would restart every threshold and resolve every firing alert for the same model.
        let continued = retraining
            .as_ref()
            .and_then(|r| r.continued_by(&cfg, &reload.cfg, &reload.model));
        let keep_trainer = continued.is_some() && Retraining::carries_over(&cfg, &reload.cfg);
        if let Some(newest) = &continued {
            // The sink moves to the newest model before the change is judged, as the
            // first frame of that model would have moved it (thresholds from its
            // calibration, firing alerts kept).
            sink.catch_up(newest);
            tracing::info!(
                model = %newest.meta.id,
                version = newest.meta.version,
                kept_retraining = keep_trainer,
                "Reload: the model loaded is the running retraining's; scoring goes on with its newest model."
            );
            reload.model = Detector::Autoencoder(newest.clone());
        }
        match apply_reload(reload, &started, &cfg, &model, source, sink, &counters) {
            Ok((c, m, so, si)) => (cfg, model, source, sink) = (c, m, so, si),
            Err(e) => break Err(e),
        }
        source.drops.ring_capacity_frames = cfg.pipeline.ring_capacity_frames;
        // The sink's side of retraining belongs to the turn that ended.
        sink.retrain = None;
        if keep_trainer {
            continue;
        }
        // Another model (or retraining config) starts its own retraining history.
        if let Some(r) = retraining.take() {
            r.stop();
        }
        match Retraining::start(&cfg, &model, &counters) {
            Ok(r) => retraining = r,
            Err(e) => break Err(e),
        }
    };
    let (scores, events, failed) = match ended {
        Ok(AgentSink {
            scores,
            events,
            out,
            retrain,
            ..
        }) => {
            drop(out);
            // Its request sender must go before the trainer is joined, or the trainer waits
            // for requests forever.
            drop(retrain);
            (scores, events, None)
        }
        Err(e) => (Vec::new(), Vec::new(), Some(e)),
    };
    if let Some(r) = retraining.take() {
        r.stop();
    }
    client_stop.stop();
    metrics_stop.store(true, Ordering::SeqCst);
    let _ = client.join();
    if let Some(e) = failed {
        return Err(e);
    }
    let pipeline = total.ok_or(AgentError::Threshold("no pipeline ran".into()))?;
    Ok(AgentReport {
        pipeline,
        counters,
        mqtt: mqtt_stats,
        scores,
        events,
        port,
    })
}

/// Binds `[metrics] listen`; `None` when it is empty (no `/metrics`).
fn bind_metrics(listen: &str) -> Result<Option<std::net::TcpListener>, AgentError> {
    if listen.is_empty() {
        return Ok(None);
    }
    std::net::TcpListener::bind(listen)
        .map(Some)
        .map_err(|source| AgentError::Metrics {
            listen: listen.to_string(),
            source,
        })
}

/// Checks, for `validate --agent`, what `run` takes for itself once it starts, releasing
/// both at once: `[metrics] listen` can be bound, and no other live process holds the
/// `[spool] dir` lock. A port in use and a held spool are what the running agent itself
/// holds, so they come back as notes, not errors (validate judges the configuration, and
/// is run before a restart while the agent still runs); `run` exits 1 for them and systemd
/// restarts it, see the README.
///
/// # Errors
/// [`AgentError::Metrics`] if the address cannot be bound for another reason than being in
/// use (not an address of this host, a privileged port), [`AgentError::Spool`] for an I/O
/// error probing the lock.
pub fn check_claims(cfg: &DarkwatchConfig) -> Result<Vec<String>, AgentError> {
    let mut notes = Vec::new();
    match bind_metrics(&cfg.metrics.listen) {
        Ok(listener) => drop(listener),
        Err(AgentError::Metrics { listen, source })
            if source.kind() == std::io::ErrorKind::AddrInUse =>
        {
            notes.push(format!(
                "[metrics] listen {listen} is in use (by the running agent? `run` cannot start while it is)"
            ));
        }
        Err(e) => return Err(e),
    }
    match crate::spool::probe_lock(&cfg.spool.dir) {
        Ok(()) => {}
        Err(SpoolError::Locked { dir }) => notes.push(format!(
            "another darkwatch process holds the spool in {} (the running agent? `run` cannot start while it does)",
            dir.display()
        )),
        Err(e) => return Err(e.into()),
    }
    Ok(notes)
}

/// Checks that `cfg` can run `model` before anything starts (the binary calls it before
/// READY=1, and on SIGHUP before handing a reload over, so that a refused reload leaves the
/// agent running): the thresholds calibrate on the model's scores, and an SAE gets raw
/// input and no online retraining.
///
/// # Errors
/// What does not fit: an [`AgentError::Config`] naming the setting and what to change.
pub fn validate(cfg: &DarkwatchConfig, model: &Detector) -> Result<(), AgentError> {
    check_suits(cfg, model)?;
    cfg.threshold
        .build(&model.threshold_scores())
        .map(drop)
        .map_err(|e| calibration_error(model, &e))
}

/// Checks that the folders the agent writes can be made and take files: `[spool] dir`, and
/// `[retrain] state_dir` while retraining is on. The binary runs it in `run` before it
/// loads the model and tells systemd it is ready, and in `validate --agent`; it leaves
/// nothing behind ([`crate::config::probe_writable_dir`]).
///
/// # Errors
/// [`AgentError::Config`] naming the key when a folder cannot be made or written for a
/// reason only the configuration or the host's setup mends (a path that cannot exist, no
/// permission, a read-only file system: restarting would not help); [`AgentError::Folder`]
/// for another I/O error (a full disk), which may pass.
pub fn check_dirs(cfg: &DarkwatchConfig) -> Result<(), AgentError> {
    let mut dirs = vec![("spool", "dir", "the alert spool", &cfg.spool.dir)];
    if cfg.retrain.enabled && !cfg.retrain.state_dir.as_os_str().is_empty() {
        dirs.push((
            "retrain",
            "state_dir",
            "online retraining's checkpoints",
            &cfg.retrain.state_dir,
        ));
    }
    for (section, name, holds, dir) in dirs {
        let Err(e) = crate::config::probe_writable_dir(dir) else {
            continue;
        };
        let key = format!("{section}.{name}");
        let reason = format!(
            "{}: cannot be made or take a file: {e}; it holds {holds}: point [{section}] {name} at a folder this process can write",
            dir.display()
        );
        use std::io::ErrorKind::*;
        let lasting = matches!(
            e.kind(),
            NotFound
                | PermissionDenied
                | ReadOnlyFilesystem
                | NotADirectory
                | IsADirectory
                | AlreadyExists
                | InvalidInput
                | InvalidFilename
        );
        return Err(if lasting {
            AgentError::Config { key, reason }
        } else {
            AgentError::Folder { key, reason }
        });
    }
    Ok(())
}

/// The configured threshold cannot calibrate on `model`'s held-out scores: the model or
/// `[threshold]` must change, so it is a configuration error, keyed and with what to do.
fn calibration_error(model: &Detector, e: &ThresholdError) -> AgentError {
    let more = match model {
        Detector::Autoencoder(_) => {
            "a model trained with more held-out rows (more rows, or a larger [train] \
             validation_fraction)"
        }
        Detector::Sae(_) => {
            "a head calibrated on more held-out rows (`darkwatch sae-head --force` with more \
             rows or a larger --holdout)"
        }
    };
    let (key, hint) = match e {
        ThresholdError::Config { key, .. } => (format!("threshold.{key}"), String::new()),
        ThresholdError::TooFewScores { kind: "dspot", .. } => (
            "threshold.dspot_depth".into(),
            format!(
                "; lower [threshold] dspot_depth, choose another [threshold] kind, or use {more}"
            ),
        ),
        ThresholdError::TooFewScores { .. } => ("threshold.kind".into(), format!("; use {more}")),
        ThresholdError::ConstantScores { .. } => (
            "threshold.kind".into(),
            "; retrain the model on rows from normal operation that vary, or use [threshold] \
             kind = \"quantile\""
                .into(),
        ),
    };
    AgentError::Config {
        key,
        reason: format!("model {}: {e}{hint}", model.id()),
    }
}

/// Refuses settings an SAE detector cannot run with: it scores raw activation frames, and
/// online retraining is for autoencoders.
fn check_suits(cfg: &DarkwatchConfig, model: &Detector) -> Result<(), AgentError> {
    if let Detector::Sae(_) = model {
        if cfg.agent.format != InputFormat::Raw {
            return Err(AgentError::Config {
                key: "agent.format".into(),
                reason: format!(
                    "{} is an SAE folder: it scores activation frames, so [agent] format must be \"raw\"",
                    cfg.agent.model_dir.display()
                ),
            });
        }
        if cfg.retrain.enabled {
            return Err(AgentError::Config {
                key: "retrain.enabled".into(),
                reason: format!(
                    "{} is an SAE folder: online retraining ([retrain] enabled) is for autoencoders; set it to false",
                    cfg.agent.model_dir.display()
                ),
            });
        }
    }
    Ok(())
}

/// Online retraining of a running agent: the trainer thread and what it shares.
struct Retraining {
    shared: crate::retrain::Shared,
    requests: Sender<crate::retrain::Request>,
    trainer: std::thread::JoinHandle<()>,
}

impl Retraining {
    /// Starts the trainer for `model` when `[retrain] enabled`.
    fn start(
        cfg: &DarkwatchConfig,
        model: &Detector,
        counters: &Arc<AgentCounters>,
    ) -> Result<Option<Retraining>, AgentError> {
        let Some(model) = model.autoencoder().filter(|_| cfg.retrain.enabled) else {
            counters.set_retrain(None);
            return Ok(None);
        };
        let shared = crate::retrain::Shared::new(model.clone(), &cfg.retrain, cfg.train.seed);
        let (requests, trainer) = crate::retrain::Trainer::new(cfg, shared.clone())
            .spawn()
            .map_err(|source| {
                AgentError::Pipeline(PipelineError::Spawn {
                    name: "trainer",
                    source,
                })
            })?;
        counters.set_retrain(Some(shared.counters.clone()));
        tracing::info!(state_dir = %cfg.retrain.state_dir.display(), "online retraining on");
        Ok(Some(Retraining {
            shared,
            requests,
            trainer,
        }))
    }

    /// The scorer's hooks for one pipeline turn, and the sink's matching side.
    fn hook(&self, cfg: &DarkwatchConfig, sink: &mut AgentSink) -> pipeline::ScorerHooks {
        let d = self.shared.cell.load().n_features();
        let (values, consumer) = pipeline::values_ring(&cfg.pipeline, d);
        let side = crate::retrain::SinkSide::new(
            &cfg.retrain,
            self.shared.clone(),
            consumer,
            self.requests.clone(),
            None,
        );
        // A kept trainer may have published since a reload caught the sink up: the sink
        // must be at the version this side expects, or frames of that version would not
        // count as a switch and keep the older model's thresholds.
        if let Some(m) = self.shared.model_of(side.version()) {
            sink.catch_up(&m);
        }
        sink.retrain = Some(side);
        sink.threshold_cfg = cfg.threshold.clone();
        pipeline::ScorerHooks {
            cell: self.shared.cell.clone(),
            values,
            gate: None,
        }
    }

    /// The model this retraining scores now (its newest published), when `loaded` (what a
    /// reload of `new` loaded) is one of the models it published and the reload leaves it
    /// where it stands: retraining on in both with the same non-empty `state_dir`, and the
    /// same `[score]`, `[onnx]` and `[cuda]`. Loading resumes the newest checkpoint of
    /// `state_dir`, which this retraining wrote: the model loaded is the one scored, or
    /// one it already replaced (a retrain accepted while the reload loaded), never a model
    /// to go back to. `None`: the reload's model starts over (another model, another
    /// `state_dir`, retraining turned off, or none written: an empty `state_dir` loads the
    /// model directory's model, as a restart would; or a newer model's checkpoint was
    /// deleted, a rollback).
    fn continued_by(
        &self,
        old: &DarkwatchConfig,
        new: &DarkwatchConfig,
        loaded: &Detector,
    ) -> Option<Arc<Model>> {
        let loaded = loaded.autoencoder()?;
        let keeps = new.retrain.enabled
            && !new.retrain.state_dir.as_os_str().is_empty()
            && new.retrain.state_dir == old.retrain.state_dir
            && new.score == old.score
            && new.onnx == old.onnx
            && new.cuda == old.cuda;
        if !keeps {
            return None;
        }
        self.shared
            .model_of(loaded.meta.version)
            .filter(|m| m.meta.id == loaded.meta.id)?;
        let newest = self.shared.cell.load_full();
        // An older model than the newest is one a retrain replaced while the reload
        // loaded, unless the newest's checkpoint is gone: an operator who deleted it to
        // roll back gets the model loaded, not the one deleted.
        let rolled_back = newest.meta.version != loaded.meta.version
            && !new
                .retrain
                .state_dir
                .join(crate::retrain::checkpoint_name(newest.meta.version))
                .is_dir();
        (!rolled_back).then_some(newest)
    }

    /// Whether this retraining can go on unchanged under `new`: it continues the model
    /// ([`Self::continued_by`]) and the settings its trainer reads (`[retrain]`, `[train]
    /// seed`, `[threshold]` for the gate) did not change. Its reservoir is then kept.
    fn carries_over(old: &DarkwatchConfig, new: &DarkwatchConfig) -> bool {
        new.retrain == old.retrain
            && new.train.seed == old.train.seed
            && new.threshold == old.threshold
    }

    /// Ends the trainer: a retrain in progress gives up within one mini-batch, and nothing
    /// it had not yet written is kept (checkpoints are written whole or not at all).
    fn stop(self) {
        self.shared.stopping.store(true, Ordering::Release);
        drop(self.requests);
        let _ = self.trainer.join();
    }
}

/// The `ended_by` annotation of an alert resolved because the agent stopped.
pub const ENDED_BY_STOP: &str =
    "the agent stopped: resolved without the scores falling, the anomaly may still be going on";
/// The end of the `ended_by` annotation of an alert resolved by a reload, after
/// "a reload changed <what>" ([`ReloadChange::ended_by`]).
pub const ENDED_BY_RELOAD_TAIL: &str =
    "resolved without the scores falling, the anomaly may still be going on";
/// The `ended_by` annotation of an alert resolved because its stream was forgotten (only
/// when `[alert] silence_secs` did not resolve it before: 0, or not shorter than
/// `[assemble] forget_after_secs`).
pub const ENDED_BY_FORGOTTEN: &str = "the stream sent nothing for [assemble] forget_after_secs and was forgotten: resolved without the scores falling, the anomaly may still be going on";
/// The `ended_by` annotation of an alert resolved because its stream went silent.
pub const ENDED_BY_SILENCE: &str = "the stream went silent (no frame scored for [alert] silence_secs): resolved without the scores falling, the anomaly may still be going on";

/// `[alert] silence_secs` when absent: five minutes.
pub const DEFAULT_SILENCE_SECS: f64 = 300.0;

/// How long a stream may score no frame before it counts as silent: `[alert]
/// silence_secs`, by default [`DEFAULT_SILENCE_SECS`] or ten assembler windows if longer
/// (assembled input sends a frame per window at most); 0 never.
pub fn silence_secs(cfg: &DarkwatchConfig) -> f64 {
    cfg.alert
        .silence_secs
        .unwrap_or_else(|| match cfg.agent.format {
            InputFormat::Raw => DEFAULT_SILENCE_SECS,
            _ => DEFAULT_SILENCE_SECS.max(10.0 * cfg.assemble.window_secs),
        })
}

/// What a reload changed of what the per-stream state rests on: open windows (the input),
/// thresholds (also the model and `[threshold]`) and alert episodes (also the `[alert]`
/// keys that make an alert's labels or its firing rules). `[alert] resend_secs` and
/// `silence_secs` are not among them: they apply to the running alerts at once.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadChange {
    /// The model's features, `[agent] format`, `[assemble]`, `[examon]`, `[telegraf]` or
    /// `[raw]`.
    pub input: bool,
    /// The model (another id).
    pub model: bool,
    /// `[threshold]`.
    pub thresholds: bool,
    /// The `[alert]` keys that changed an alert's labels (`labels`, `alertname`,
    /// `severity`: part of its fingerprint).
    pub labels: Vec<&'static str>,
    /// The `[alert]` keys that changed how an episode fires, resolves or is reported.
    pub rules: Vec<&'static str>,
    /// Keys that changed and take effect without dropping any state (`[alert]
    /// resend_secs`, …): in the reload's log line too, which named only the others (an
    /// operator's trial saw `changed=` with nothing after it).
    pub other: Vec<&'static str>,
}

impl ReloadChange {
    /// What changed from `old_cfg`/`old_model` to `cfg`/`model`.
    /// The model judged against the one the sink scores now rather than the one last
    /// loaded: online retraining moves the sink to a retrained model (its thresholds, id
    /// and version), so reloading the model on disk changes the model scored even when it
    /// is the one loaded before.
    fn against_scored(mut self, sink: &AgentSink, model: &Detector) -> Self {
        self.model = sink.model_id != model.id() || sink.model_version != model.version_label();
        self
    }

    pub fn between(
        old_cfg: &DarkwatchConfig,
        old_model: &Detector,
        cfg: &DarkwatchConfig,
        model: &Detector,
    ) -> Self {
        let input = model.features() != old_model.features()
            || cfg.agent.format != old_cfg.agent.format
            // forget_after_secs is bookkeeping: a kept source takes the new value.
            || crate::ingest::assemble::AssemblerConfig {
                forget_after_secs: old_cfg.assemble.forget_after_secs,
                ..cfg.assemble.clone()
            } != old_cfg.assemble
            || cfg.examon != old_cfg.examon
            || cfg.telegraf != old_cfg.telegraf
            || cfg.raw != old_cfg.raw;
        // Every key named, so that a new one must be placed here.
        let crate::alert::AlertConfig {
            fire_k,
            fire_n,
            resolve_after_frames,
            suppress_frames,
            alertname,
            severity,
            top_features,
            resend_secs,
            silence_secs,
            labels,
            // Not part of an alert's identity: a firing alert takes them in its next event.
            annotations,
            generator_url,
        } = &old_cfg.alert;
        let new = &cfg.alert;
        let changed = |keys: &[(&'static str, bool)]| -> Vec<&'static str> {
            keys.iter()
                .filter(|(_, same)| !same)
                .map(|(k, _)| *k)
                .collect()
        };
        ReloadChange {
            input,
            model: model.id() != old_model.id(),
            thresholds: cfg.threshold != old_cfg.threshold,
            labels: changed(&[
                ("alertname", *alertname == new.alertname),
                ("severity", *severity == new.severity),
                ("labels", *labels == new.labels),
            ]),
            rules: changed(&[
                ("fire_k", *fire_k == new.fire_k),
                ("fire_n", *fire_n == new.fire_n),
                (
                    "resolve_after_frames",
                    *resolve_after_frames == new.resolve_after_frames,
                ),
                ("suppress_frames", *suppress_frames == new.suppress_frames),
                ("top_features", *top_features == new.top_features),
            ]),
            other: changed(&[
                ("[alert] resend_secs", *resend_secs == new.resend_secs),
                ("[alert] silence_secs", *silence_secs == new.silence_secs),
                ("[alert] annotations", *annotations == new.annotations),
                ("[alert] generator_url", *generator_url == new.generator_url),
                (
                    "[assemble] forget_after_secs",
                    old_cfg.assemble.forget_after_secs == cfg.assemble.forget_after_secs,
                ),
            ]),
        }
    }

    /// The keys of [`Self::other`], comma-separated (empty when none changed).
    pub fn describe_other(&self) -> String {
        self.other.join(", ")
    }

    /// Whether open windows (and a windowed model's lag windows) carry over.
    pub fn keeps_windows(&self) -> bool {
        !self.input
    }

    /// Whether each stream's threshold carries over (an adaptive one keeps what it learned).
    pub fn keeps_thresholds(&self) -> bool {
        !self.input && !self.model && !self.thresholds
    }

    /// Whether each stream's alert state (a firing episode included) carries over.
    pub fn keeps_alerts(&self) -> bool {
        self.keeps_thresholds() && self.labels.is_empty() && self.rules.is_empty()
    }

    /// What changed, in words (empty when nothing did): `the alert's labels ([alert]
    /// labels)`, `the model and the thresholds ([threshold])`…
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.input {
            parts.push(
                "the input (the model's features, [agent] format, [assemble], [examon], [telegraf] or [raw])"
                    .to_string(),
            );
        }
        if self.model {
            parts.push("the model".to_string());
        }
        if self.thresholds {
            parts.push("the thresholds ([threshold])".to_string());
        }
        if !self.labels.is_empty() {
            parts.push(format!(
                "the alert's labels ([alert] {})",
                self.labels.join(", ")
            ));
        }
        if !self.rules.is_empty() {
            parts.push(format!(
                "the alert's firing rules ([alert] {})",
                self.rules.join(", ")
            ));
        }
        match parts.len() {
            0 => String::new(),
            1 => parts.remove(0),
            n => {
                let last = parts.remove(n - 1);
                format!("{} and {last}", parts.join(", "))
            }
        }
    }

    /// The `ended_by` annotation of an alert this reload resolves: what changed, and that
    /// the anomaly may go on.
    pub fn ended_by(&self) -> String {
        format!(
            "a reload changed {}: {ENDED_BY_RELOAD_TAIL}",
            self.describe()
        )
    }
}

/// Where a source that ends its turn for a reload puts itself.
type Handback = Arc<Mutex<Option<Box<FeedTurn>>>>;

/// The counters of two pipeline turns added up.
fn add_reports(mut a: PipelineReport, b: &PipelineReport) -> PipelineReport {
    a.frames_offered += b.frames_offered;
    a.frames_accepted += b.frames_accepted;
    a.frames_dropped += b.frames_dropped;
    a.frames_invalid += b.frames_invalid;
    a.frames_scored += b.frames_scored;
    a.batches += b.batches;
    a.elapsed += b.elapsed;
    a.latency.merge(&b.latency);
    a.compute.merge(&b.compute);
    a
}

/// Takes over a reload between two pipeline turns: returns the configuration, model,
/// source and sink of the next turn.
#[allow(clippy::type_complexity)]
fn apply_reload(
    reload: Reload,
    started: &DarkwatchConfig,
    old_cfg: &DarkwatchConfig,
    old_model: &Detector,
    source: FeedTurn,
    mut sink: AgentSink,
    counters: &Arc<AgentCounters>,
) -> Result<(DarkwatchConfig, Detector, FeedTurn, AgentSink), AgentError> {
    let Reload { cfg, model } = reload;
    check_suits(&cfg, &model)?;
    for (section, same) in [
        ("mqtt", cfg.mqtt == started.mqtt),
        ("spool", cfg.spool == started.spool),
        ("metrics", cfg.metrics == started.metrics),
        ("scores", cfg.scores == started.scores),
    ] {
        if !same {
            tracing::warn!(
                section,
                "Reload: this section changed; it takes effect at the next restart."
            );
        }
    }
    let change =
        ReloadChange::between(old_cfg, old_model, &cfg, &model).against_scored(&sink, &model);
    let keep_windows = change.keeps_windows();
    if !keep_windows {
        // Messages received meanwhile wait in the feed for the new decoder and assembler.
        let fresh = AgentSource::new(&cfg, &model, counters, &started.mqtt.subscribe_filters())?;
        lock(&source.feed).source = fresh;
    } else {
        let mut feed = lock(&source.feed);
        feed.source.forget_after_secs = cfg.assemble.forget_after_secs;
        // A kept source takes the reloaded SAE's (or [sae]'s) positions left unscored.
        if let Decoder::Raw { live_skip: s, .. } = &mut feed.source.decoder {
            *s = live_skip(&model);
        }
    }
    let (streams, recycling) = {
        let feed = lock(&source.feed);
        (feed.source.streams.clone(), feed.source.recycling.clone())
    };
    sink = sink.reload(&cfg, &model, streams, &change)?;
    // A new source (the input changed) forgets with the sink afresh.
    sink.recycling = recycling;
    counters.set_model_id(model.id());
    counters
        .model_version
        .store(model.version(), Ordering::Relaxed);
    counters.set_backend(&model.backend_label());
    counters.reloads.fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        model = %model.id(),
        model_dir = %cfg.agent.model_dir.display(),
        kept_open_windows = keep_windows,
        kept_thresholds = change.keeps_thresholds(),
        kept_alert_state = change.keeps_alerts(),
        changed = %change.describe(),
        also_changed = %change.describe_other(),
        "Reloaded the configuration and the model."
    );
    Ok((cfg, model, source, sink))
}

/// The positions an SAE detector leaves unscored live (`[sae] id_is_position`), `None`
/// for an autoencoder or ids that are not positions.
fn live_skip(model: &Detector) -> Option<u64> {
    match model {
        Detector::Sae(s) => s.live_skip(),
        Detector::Autoencoder(_) => None,
    }
}

/// A hash of a stream name (to recognise a forgotten stream without keeping its name).
fn name_hash(name: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    h.finish()
}

/// Decodes MQTT messages and assembles frames into the ring (on the MQTT thread, inside
/// the [`Feed`]).
struct AgentSource {
    decoder: Decoder,
    /// darkwatch's own output topics, skipped before decoding.
    own_topics: crate::mqtt::OwnTopics,
    assembler: Assembler,
    streams: StreamNames,
    counters: Arc<AgentCounters>,
    /// Streams whose names are already in `streams`.
    known_streams: usize,
    /// The assembled frame's features, in order (for the log line of an incomplete one).
    feature_names: Vec<String>,
    /// Lag windows per stream, for a windowed model (see [`crate::window::StreamWindows`]).
    windows: crate::window::StreamWindows,
    /// Forgetting streams with the sink (see [`Recycling`]).
    recycling: SharedRecycling,
    /// `[assemble] forget_after_secs` (0: never).
    forget_after_secs: f64,
    /// When (monotonic seconds) to look for streams to forget next.
    next_forget_check: f64,
    /// Hashes of the names of streams forgotten, to say so when one comes back (at most
    /// `max_streams`, then cleared).
    forgotten_names: std::collections::HashSet<u64>,
    max_streams: usize,
    /// The counters as this source started, by reason: a source's refusals are logged at
    /// its own 1st, 2nd, 4th… ([`LogCounts`]), so a reload that changes the input (a new
    /// model width, say) gets its first refusal logged at once, not at the next power of
    /// two of the process's total.
    log_from: LogCounts,
}

/// Counts at a source's start, which its log lines count from (the exported counters go
/// on over reloads).
#[derive(Debug)]
struct LogCounts {
    decode: [u64; DecodeError::REASONS.len()],
    rejected: [u64; Reject::REASONS.len()],
    incomplete: u64,
}

impl LogCounts {
    fn now(counters: &AgentCounters) -> LogCounts {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        LogCounts {
            decode: std::array::from_fn(|i| load(&counters.decode_errors_by_reason[i])),
            rejected: std::array::from_fn(|i| load(&counters.samples_rejected_by_reason[i])),
            incomplete: load(&counters.frames_incomplete),
        }
    }
}

impl AgentSource {
    /// A source for `model` in `cfg`'s input format, on the MQTT client's `subscribe`
    /// filters (the running client's: a reload does not change them), which name raw
    /// streams.
    fn new(
        cfg: &DarkwatchConfig,
        model: &Detector,
        counters: &Arc<AgentCounters>,
        subscribe: &[String],
    ) -> Result<AgentSource, AgentError> {
        Ok(AgentSource {
            own_topics: crate::mqtt::OwnTopics::of(&cfg.mqtt, &cfg.scores),
            decoder: match cfg.agent.format {
                InputFormat::Examon => {
                    Decoder::Examon(cfg.examon.build().with_score_plugin(&cfg.scores.plugin))
                }
                InputFormat::Telegraf => Decoder::Telegraf(cfg.telegraf.build()),
                InputFormat::Raw => Decoder::Raw {
                    decoder: cfg.raw.build_for(model.frame_features().len(), subscribe),
                    frame: Vec::with_capacity(model.frame_features().len()),
                    streams: RawStreams::default(),
                    max_streams: cfg.assemble.max_streams,
                    ids_unused: 0,
                    times_ahead: 0,
                    live_skip: live_skip(model),
                },
            },
            assembler: cfg.assemble.build(model.frame_features().to_vec())?,
            streams: Arc::default(),
            counters: counters.clone(),
            known_streams: 0,
            feature_names: model.frame_features().to_vec(),
            // Assembled frames come once per window: a silence longer than a lag window's
            // span leaves only stale history. Raw frames keep no such clock.
            windows: crate::window::StreamWindows::new(
                model.window_frames(),
                model.frame_features().len(),
                match cfg.agent.format {
                    InputFormat::Raw => f64::INFINITY,
                    _ => model.window_frames() as f64 * cfg.assemble.window_secs,
                },
            ),
            recycling: SharedRecycling::default(),
            forget_after_secs: cfg.assemble.forget_after_secs,
            next_forget_check: f64::NEG_INFINITY,
            forgotten_names: Default::default(),
            max_streams: cfg.assemble.max_streams,
            log_from: LogCounts::now(counters),
        })
    }

    /// Forgets the streams that sent nothing for `[assemble] forget_after_secs` at `now`
    /// (monotonic seconds), at most once a second: their slots are free for new streams at
    /// once, as the slots' next generations, and the sink is told (see [`Recycling`]). On
    /// the source thread, never per message.
    fn forget_quiet(&mut self, now: f64) {
        if self.forget_after_secs <= 0.0 || !now.is_finite() || now < self.next_forget_check {
            return;
        }
        self.next_forget_check = now + 1.0;
        let before = now - self.forget_after_secs;
        let mut gone = Vec::new();
        match &mut self.decoder {
            Decoder::Raw { streams, .. } => {
                let RawStreams { by_name, free, .. } = streams;
                by_name.retain(|_, st| {
                    let quiet = st.last_mono < before;
                    if quiet {
                        gone.push((st.index, st.generation));
                        // A slot changes hands at most once per forget_after_secs (a minute
                        // or more): u32 outlasts any agent.
                        free.push((st.index, st.generation.saturating_add(1)));
                    }
                    !quiet
                });
            }
            _ => self.assembler.retire_quiet(before, &mut gone),
        }
        if gone.is_empty() {
            return;
        }
        let names = self.streams.lock().map(|n| n.clone()).unwrap_or_default();
        if self.forgotten_names.len() + gone.len() > self.max_streams {
            self.forgotten_names.clear();
        }
        for &(i, _) in &gone {
            self.windows.forget(i as usize);
            let name = names.get(i as usize).map_or("", |n| n.name.as_str());
            self.forgotten_names.insert(name_hash(name));
            self.counters
                .streams_forgotten
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                stream = ?crate::ingest::clipped_name(name),
                forget_after_secs = self.forget_after_secs,
                "A stream sent nothing for [assemble] forget_after_secs and is forgotten: its threshold and alert state go, and its slot goes to the next new stream. If it comes back it starts afresh (threshold warm-up)."
            );
        }
        if let Ok(mut r) = self.recycling.lock() {
            r.retired.extend_from_slice(&gone);
        }
    }

    /// A stream was given slot `i` as its `generation` (new, or forgotten before):
    /// publishes its name for the sink, and says so once when it is a stream forgotten
    /// before.
    fn stream_started(
        streams: &Mutex<Vec<SlotName>>,
        forgotten: &mut std::collections::HashSet<u64>,
        i: usize,
        generation: u32,
        name: &str,
        topic: &str,
    ) {
        if let Ok(mut s) = streams.lock() {
            if s.len() <= i {
                s.resize(i + 1, SlotName::default());
            }
            name.clone_into(&mut s[i].name);
            s[i].generation = generation;
            topic.clone_into(&mut s[i].topic);
        }
        if !forgotten.is_empty() && forgotten.remove(&name_hash(name)) {
            tracing::info!(
                stream = ?crate::ingest::clipped_name(name),
                "A forgotten stream sends again: it starts afresh, its threshold warming up from the model's calibration."
            );
        }
    }

    /// Hands the assembler's closed frames to the ring: after closing the windows that the
    /// streams' clocks put in the past at `now` (monotonic seconds, as
    /// [`crate::mqtt::monotonic_secs`]; NaN closes by data only), or with `None` after
    /// closing every window (shutdown).
    fn emit(&mut self, producer: &mut FrameProducer, clock: &Clock, now: Option<f64>) -> u64 {
        let mut pushed = 0;
        let streams = &self.streams;
        let counters = &self.counters;
        let known = &mut self.known_streams;
        let windows = &mut self.windows;
        let names = &self.feature_names;
        let incomplete_from = self.log_from.incomplete;
        // Streams that became incomplete in this turn, logged together below (rare: no
        // allocation otherwise).
        let mut turned = TurnedIncomplete::default();
        let mut push = |f: crate::ingest::assemble::FrameOut<'_>| {
            // A new stream (rare): publish its name for the sink; no lock otherwise.
            let i = f.stream_index as usize;
            if i >= *known
                && let Ok(mut s) = streams.lock()
            {
                if s.len() <= i {
                    s.resize(i + 1, SlotName::default());
                }
                // The topic came with the stream's first sample (`stream_started`).
                f.stream.clone_into(&mut s[i].name);
                s[i].generation = f.generation;
                *known = s.len();
            }
            counters.frames.fetch_add(1, Ordering::Relaxed);
            if f.incomplete {
                // Counted and logged here, and never scored: it does not go to the scorer,
                // which would count and log it again as a frame with a NaN in it.
                let before = counters
                    .frames_incomplete
                    .fetch_add(1, Ordering::Relaxed)
                    .saturating_sub(incomplete_from);
                // A stream that turns incomplete is logged by name below (each stream at
                // its 1st, 2nd, 4th… turn); other incomplete frames at the 1st, 2nd, 4th…
                // of all streams.
                if f.turned_incomplete.is_power_of_two() {
                    turned.note(f.stream, f.values, names);
                } else {
                    incomplete_frame(before + 1, f.stream, f.values, names);
                }
                return;
            }
            let meta = FrameMeta {
                seq: f.seq,
                stream: f.stream_index,
                generation: f.generation,
                timestamp: f.window_end,
                enqueued_ns: clock.now_ns(),
                received_mono: f.received_mono,
            };
            // A windowed model scores a stream's frames once its first window is full.
            if let Some(values) = windows.push(i, f.values, f.window_end) {
                queued(counters, producer.push(meta, values), values);
                pushed += 1;
            }
        };
        match now {
            Some(mono) => self.assembler.poll_streams(mono, &mut push),
            None => self.assembler.flush(&mut push),
        }
        turned.log();
        self.counters.streams_incomplete.store(
            self.assembler.incomplete_streams() as u64,
            Ordering::Relaxed,
        );
        pushed
    }
}

impl AgentSource {
    /// Decodes one message into the assembler, counting what is rejected. Each stream
    /// keeps its own event clock in the assembler ([`Assembler::poll_streams`]), so a
    /// sender with a wrong clock closes only its own windows.
    /// Returns the frames pushed to the ring directly (raw input only).
    fn take(&mut self, msg: &Received<'_>, producer: Option<(&mut FrameProducer, &Clock)>) -> u64 {
        self.counters.messages.fetch_add(1, Ordering::Relaxed);
        // darkwatch's own alerts, status and scores (this agent's, on a wide subscription,
        // or another darkwatch's) are not input: counted apart, never refused or logged.
        if self.own_topics.matches(msg.topic) {
            self.counters
                .own_messages_ignored
                .fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        let format = self.decoder.format();
        let AgentSource {
            decoder,
            assembler,
            counters,
            streams,
            known_streams,
            windows,
            forgotten_names,
            log_from,
            ..
        } = self;
        let mut accept = |sample: &crate::ingest::assemble::Sample<'_>,
                          origin: crate::ingest::assemble::Origin<'_>| {
            let receipt = Receipt {
                wall: msg.received,
                mono: msg.received_mono,
            };
            let allocated = assembler.allocated();
            let pushed = assembler.push_from(sample, receipt, origin);
            if let Some(mixed) = assembler.take_mixed() {
                series_merged(format, &mixed);
            }
            if assembler.allocated() != allocated
                && let Some(i) = assembler.index_of(&sample.stream)
            {
                let generation = assembler.generation(i);
                AgentSource::stream_started(
                    streams,
                    forgotten_names,
                    i,
                    generation,
                    &sample.stream,
                    msg.topic,
                );
            }
            if let Err(why) = pushed {
                let i = why.reason_index();
                let before = counters.samples_rejected_by_reason[i]
                    .fetch_add(1, Ordering::Relaxed)
                    .saturating_sub(log_from.rejected[i]);
                if why == Reject::TooManyStreams {
                    stream_refused(before + 1, &sample.stream);
                    return;
                }
                // Logged at the 1st, 2nd, 4th… refusal of its reason, and at each tracked
                // stream's first: one node's refusals do not hide another's.
                let first = assembler.first_reject(&sample.stream, why);
                if !(first || (before + 1).is_power_of_two()) {
                    return;
                }
                match why {
                    Reject::TooManyStreams => {}
                    Reject::UnknownMetric => unknown_metric(
                        before + 1,
                        format,
                        &sample.stream,
                        &sample.metric,
                        assembler.feature_names(),
                    ),
                    Reject::Future => future_sample(
                        before + 1,
                        &sample.stream,
                        sample.timestamp,
                        msg.received,
                        assembler.max_ahead_secs(),
                    ),
                    Reject::Late => late_sample(before + 1, msg.topic, sample, assembler),
                    Reject::NonFinite => refused(
                        before + 1,
                        msg.topic,
                        Some(&sample.stream),
                        &Rejected::Sample(why),
                        &"a sample's value is beyond float32's range or its timestamp is not finite",
                        "Fix what the sender publishes.",
                    ),
                }
            }
        };
        // Every message the decoder refuses is counted, and logged at the 1st, 2nd, 4th…
        // of its reason.
        let undecodable = |e: &DecodeError| {
            let count = counters
                .decode_error(e)
                .saturating_sub(log_from.decode[e.reason_index()]);
            if count.is_power_of_two() {
                let todo = undecodable_todo(e, format);
                refused(count, msg.topic, None, &Rejected::Message(e), e, &todo);
            }
        };
        match decoder {
            // ExaMon score topics (…/plugin/examon-ai_pub/…, this agent's or another
            // darkwatch's) likewise.
            Decoder::Examon(d) if d.is_score_topic(msg.topic) => {
                counters
                    .own_messages_ignored
                    .fetch_add(1, Ordering::Relaxed);
            }
            Decoder::Examon(d) => match d.decode(msg.topic, msg.payload) {
                Ok(sample) => accept(&sample, ExamonDecoder::origin(msg.topic)),
                Err(e) => undecodable(&e),
            },
            Decoder::Telegraf(d) => {
                let whole =
                    d.decode_with_origin(msg.topic, msg.payload, msg.received, &mut |r, origin| {
                        match r {
                            Ok(sample) => accept(&sample, origin),
                            Err(e) => undecodable(&e),
                        }
                    });
                if let Err(e) = whole {
                    undecodable(&e);
                }
            }
            Decoder::Raw {
                decoder,
                frame,
                streams: seen,
                max_streams,
                ids_unused,
                times_ahead,
                live_skip,
            } => {
                let d = decoder.dim();
                let (name, time, id, n) = match decoder.decode(msg.topic, msg.payload, frame) {
                    Ok(f) => (
                        f.stream.filter(|s| !s.is_empty()).unwrap_or("default"),
                        f.time,
                        f.id,
                        f.frames,
                    ),
                    Err(e) => {
                        undecodable(&e);
                        return 0;
                    }
                };
                // A header time far ahead of the receipt is a broken clock: it would become
                // the alert's startsAt and endsAt, and Alertmanager keeps an alert active
                // until its endsAt. The frame is still scored (its time only stamps alerts,
                // unlike an assembled sample's, which picks its window), at its receipt.
                let limit = crate::ingest::assemble::MAX_AHEAD_SECS;
                let time = match time {
                    Some(t) if msg.received > 0.0 && t > msg.received + limit => {
                        *times_ahead += 1;
                        frame_time_ahead(*times_ahead, name, t, msg.received, limit);
                        None
                    }
                    time => time,
                };
                // A new stream takes the slot of a forgotten one (its next generation), else
                // the next unused.
                let fresh = match seen.free.last() {
                    Some(&slot) => Some(slot),
                    None => ((seen.next as usize) < *max_streams).then_some((seen.next, 0)),
                };
                let mut started = false;
                let entry = match seen.by_name.get_mut(name) {
                    Some(entry) => entry,
                    None => {
                        let Some((index, generation)) = fresh else {
                            let i = Reject::TooManyStreams.reason_index();
                            let before = counters.samples_rejected_by_reason[i]
                                .fetch_add(1, Ordering::Relaxed)
                                .saturating_sub(log_from.rejected[i]);
                            stream_refused(before + 1, name);
                            return 0;
                        };
                        if seen.free.pop().is_none() {
                            seen.next += 1;
                        }
                        started = true;
                        seen.by_name.entry(name.to_string()).or_insert(RawStream {
                            index,
                            generation,
                            next_seq: 0,
                            ids_not_taken: 0,
                            last_mono: f64::NAN,
                        })
                    }
                };
                entry.last_mono = msg.received_mono;
                let (index, generation) = (entry.index, entry.generation);
                // A header's id is the frame's seq while it rises within its stream, so an
                // alert names the sender's frames; otherwise the stream's count goes on. After
                // RESYNC_IDS ids in a row not taken, the sender restarted (or one corrupt id
                // jumped ahead): its ids are taken again from there. Frame i of a message
                // is id + i.
                // Ids that are in-prompt positions restart at each prompt: not seqs.
                let seq_id = if live_skip.is_some() { None } else { id };
                let mut seq_of = |i: usize| {
                    let next = entry.next_seq;
                    let seq = match seq_id.map(|id| id.saturating_add(i as u64)) {
                        Some(id)
                            if id < crate::ingest::raw::MAX_FRAME_ID
                                && (id >= next || entry.ids_not_taken + 1 >= RESYNC_IDS) =>
                        {
                            entry.ids_not_taken = 0;
                            id
                        }
                        Some(id) => {
                            *ids_unused += 1;
                            entry.ids_not_taken += 1;
                            frame_id_unused(*ids_unused, name, id, next);
                            next
                        }
                        None => next,
                    };
                    entry.next_seq = seq + 1;
                    seq
                };
                if started {
                    AgentSource::stream_started(
                        streams,
                        forgotten_names,
                        index as usize,
                        generation,
                        name,
                        msg.topic,
                    );
                    if let Ok(names) = streams.lock() {
                        *known_streams = names.len();
                    }
                }
                counters.frames.fetch_add(n as u64, Ordering::Relaxed);
                // The message's frames, in order, each pushed as a message of one frame
                // would be: a full ring drops (and counts) those that do not fit. The
                // scorer is woken (or runs here) once they are all in, so that it takes
                // them as one batch.
                let mut producer = producer;
                let mut pushed = 0;
                for (i, values) in frame.chunks_exact(d).take(n).enumerate() {
                    let seq = seq_of(i);
                    let Some((producer, clock)) = producer.as_mut() else {
                        continue;
                    };
                    // A frame below [sae] skip_positions in its prompt (BOS, an attention
                    // sink) is left out as the head's fit and calibration left it out.
                    if let (Some(skip), Some(id)) = (*live_skip, id)
                        && id.saturating_add(i as u64) < skip
                    {
                        counters.frames_skipped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let meta = FrameMeta {
                        seq,
                        stream: index,
                        generation,
                        timestamp: time.unwrap_or(msg.received),
                        enqueued_ns: clock.now_ns(),
                        received_mono: Some(msg.received_mono),
                    };
                    let Some(values) = windows.push(index as usize, values, msg.received) else {
                        continue;
                    };
                    queued(counters, producer.push_quiet(meta, values), values);
                    pushed += 1;
                }
                if let Some((producer, _)) = producer.as_ref() {
                    producer.wake();
                }
                return pushed;
            }
        }
        0
    }
}

/// Logs the streams that turned silent in one pass of [`AgentSink::watch_silence`] (name, seconds
/// quiet, whether a firing alert was resolved; only the first [`STREAMS_NAMED`] + 1 are
/// named): a line each, or one line for all when more than [`STREAMS_NAMED`] went at once.
fn log_silenced(silenced: &[(String, f64, bool)]) {
    const WHY: &str = "scored no frame for [alert] silence_secs: the node, its sender, the network or the broker stopped, or its frames are all incomplete (darkwatch_streams_incomplete); a firing alert is resolved with an ended_by annotation";
    if silenced.len() <= STREAMS_NAMED {
        for (stream, silent_secs, alert_resolved) in silenced {
            tracing::warn!(
                stream = %stream,
                silent_secs,
                alert_resolved,
                "a stream {WHY}"
            );
        }
        return;
    }
    let named: Vec<&str> = silenced[..STREAMS_NAMED]
        .iter()
        .map(|(s, ..)| s.as_str())
        .collect();
    tracing::warn!(
        streams = silenced.len(),
        first = %named.join(","),
        alerts_resolved = silenced.iter().filter(|s| s.2).count(),
        "{} streams at once {WHY}",
        silenced.len()
    );
}

/// Streams named in one line when many turn incomplete (or silent) at once.
const STREAMS_NAMED: usize = 5;

/// Streams that became incomplete ([`crate::ingest::assemble::INCOMPLETE_STREAM_FRAMES`]
/// incomplete frames in a row) in one turn of the source: each is logged with the features
/// it lacks, or, when more than [`STREAMS_NAMED`] turn at once (a sender's restart that
/// drops a metric everywhere), one line gives their number and the first few.
#[derive(Default)]
struct TurnedIncomplete {
    count: usize,
    /// The first [`STREAMS_NAMED`] + 1: stream and its missing features.
    first: Vec<(String, String, usize)>,
}

impl TurnedIncomplete {
    fn note(&mut self, stream: &str, values: &[f32], names: &[String]) {
        self.count += 1;
        if self.first.len() > STREAMS_NAMED {
            return;
        }
        let missing: Vec<&str> = values
            .iter()
            .zip(names)
            .filter(|(v, _)| v.is_nan())
            .map(|(_, n)| n.as_str())
            .collect();
        self.first.push((
            format!("{:?}", crate::ingest::clipped_name(stream)),
            missing
                .iter()
                .take(8)
                .copied()
                .collect::<Vec<_>>()
                .join(","),
            missing.len(),
        ));
    }

    fn log(self) {
        const WHY: &str = "frames in a row were incomplete, so none is scored: the stream cannot alert, and one that never scored is not counted as silent either. These features had no sample in their windows nor within [assemble] stale_secs before. The sender does not publish them, or under other names (check the node's plugins and the model's feature names). It counts in darkwatch_streams_incomplete until a frame is complete";
        let frames = crate::ingest::assemble::INCOMPLETE_STREAM_FRAMES;
        if self.count <= STREAMS_NAMED {
            for (stream, missing, features_missing) in &self.first {
                tracing::warn!(
                    stream = %stream,
                    missing = %missing,
                    features_missing,
                    "a stream sends samples but its last {frames} {WHY}"
                );
            }
        } else if let Some((_, missing, features_missing)) = self.first.first() {
            let named: Vec<&str> = self.first[..STREAMS_NAMED]
                .iter()
                .map(|(s, ..)| s.as_str())
                .collect();
            tracing::warn!(
                streams = self.count,
                first = %named.join(","),
                missing = %missing,
                features_missing,
                "{} streams send samples but their last {frames} {WHY} (missing: the first stream's)",
                self.count
            );
        }
    }
}

/// Logs the 1st, 2nd, 4th, 8th… incomplete frame: its stream and the features it lacks.
fn incomplete_frame(count: u64, stream: &str, values: &[f32], names: &[String]) {
    if !count.is_power_of_two() {
        return;
    }
    let missing: Vec<&str> = values
        .iter()
        .zip(names)
        .filter(|(v, _)| v.is_nan())
        .map(|(_, n)| n.as_str())
        .collect();
    tracing::warn!(
        stream = ?crate::ingest::clipped_name(stream),
        missing = %missing.iter().take(8).copied().collect::<Vec<_>>().join(","),
        features_missing = missing.len(),
        incomplete_frames = count,
        "a frame is incomplete: these features had no sample in its window nor within [assemble] stale_secs before it; it is counted (darkwatch_frames_incomplete_total) and not scored"
    );
}

/// Logs the 1st, 2nd, 4th, 8th… raw frame whose header id could not be its seq: not above
/// its stream's previous frame (the sender restarted or reordered), or too large for JSON.
/// Header ids in a row not above a stream's last after which its ids are taken again.
const RESYNC_IDS: u32 = 3;

fn frame_id_unused(count: u64, stream: &str, id: u64, next: u64) {
    if !count.is_power_of_two() {
        return;
    }
    tracing::warn!(
        stream = ?crate::ingest::clipped_name(stream),
        id,
        seq = next,
        ids_unused = count,
        "a raw frame's header id is not above its stream's previous one (or is 2^53 or more): it is scored, and its alerts give it the stream's next seq instead of the id; after 3 such ids in a row the stream takes its ids again (a restarted sender). Send ids that rise within each stream"
    );
}

/// What an input refusal counts in: a message (or a Telegraf metric) not decoded, or a
/// decoded sample the assembler refused.
enum Rejected<'a> {
    Message(&'a DecodeError),
    Sample(Reject),
}

impl Rejected<'_> {
    fn reason(&self) -> &'static str {
        match self {
            Rejected::Message(e) => e.reason(),
            Rejected::Sample(r) => r.reason(),
        }
    }

    fn counter(&self) -> &'static str {
        match self {
            Rejected::Message(_) => "darkwatch_messages_rejected_total",
            Rejected::Sample(_) => "darkwatch_samples_rejected_total",
        }
    }
}

/// Logs an input refused for one reason; its callers log the 1st, 2nd, 4th, 8th… of the
/// reason (`count`: the refusals of that reason since the source started, this one
/// included; a reload that changes the input starts a new source, see [`LogCounts`]), and
/// a sample's at each stream's first, never a line per message: the topic it came
/// on, its stream when known, why, the counter that counts it and what to do (`todo`).
fn refused(
    count: u64,
    topic: &str,
    stream: Option<&str>,
    what: &Rejected<'_>,
    why: &dyn std::fmt::Display,
    todo: &str,
) {
    let (reason, counter) = (what.reason(), what.counter());
    tracing::warn!(
        topic = ?crate::ingest::clipped_name(topic),
        stream = stream.map(|s| tracing::field::debug(crate::ingest::clipped_name(s))),
        reason,
        rejected = count,
        "{why}; it is counted ({counter}{{reason=\"{reason}\"}}) and skipped. {todo}"
    );
}

/// What to do about a message (or a Telegraf metric) that the `format` decoder refused.
fn undecodable_todo(e: &DecodeError, format: InputFormat) -> String {
    let (section, reads) = match format {
        InputFormat::Examon => ("examon", "ExaMon's `value;timestamp`"),
        InputFormat::Telegraf => ("telegraf", "Telegraf JSON or Influx line protocol"),
        InputFormat::Raw => (
            "raw",
            "little-endian float32 frames (behind a 20-byte DWF1 header or bare)",
        ),
    };
    let width = |bytes: usize| {
        if bytes.is_multiple_of(4) {
            format!("{} values", bytes / 4)
        } else {
            format!("{bytes} bytes, not a whole number of float32 values")
        }
    };
    match e {
        DecodeError::TooLarge { .. } if format == InputFormat::Raw => format!(
            "A raw message holds at most {} frames: split longer sequences into several messages (a DWF1 header's id numbers each message's first frame).",
            crate::ingest::raw::MAX_FRAMES_PER_MESSAGE
        ),
        DecodeError::TooLarge { len, .. } => format!(
            "If such messages are expected, raise [{section}] max_payload_bytes to {len} or more; otherwise narrow [mqtt] subscribe to the sender's metric topics."
        ),
        DecodeError::NotUtf8 => "This topic carries binary data: narrow [mqtt] subscribe to the sender's metric topics (raw float32 frames need [agent] format = \"raw\").".into(),
        DecodeError::BadTopic(_) if format == InputFormat::Telegraf => "Compare this topic with [telegraf] field_layout_topic and the topic of Telegraf's [[outputs.mqtt]] (the field is the last level), or narrow [mqtt] subscribe to the field-layout topics.".into(),
        DecodeError::BadTopic(_) | DecodeError::NotDataChannel(_) => "ExaMon metrics come on …/node/<node>/…/chnl/data/<metric> topics: narrow [mqtt] subscribe to those.".into(),
        DecodeError::MissingStream { .. } if format == InputFormat::Telegraf => {
            "Set [telegraf] stream_tag to the tag that names the host.".into()
        }
        DecodeError::MissingStream { .. } => {
            "Set [examon] stream_key to the topic key that names the node.".into()
        }
        DecodeError::BadPayload(why) if *why == crate::ingest::telegraf::BARE_VALUE => "For Telegraf's layout = \"field\", set [telegraf] field_layout_topic to the topic of its [[outputs.mqtt]] as written there (e.g. \"telegraf/{{ .Hostname }}/{{ .PluginName }}\"); or, in [[outputs.mqtt]], set layout = \"non-batch\" (or \"batch\") and data_format = \"influx\" (or \"json\"), which carry the measurement, the host tag and the fields in the payload.".into(),
        DecodeError::BadPayload(why) if *why == crate::ingest::telegraf::HOMIE_V4 => "In Telegraf's [[outputs.mqtt]], set layout = \"field\" (and [telegraf] field_layout_topic to its topic) or layout = \"non-batch\" with data_format = \"influx\": homie-v4 mixes tags with fields and renames fields, so it is not read.".into(),
        DecodeError::BadPayload(_) | DecodeError::NonNumeric(_) => format!(
            "[agent] format = \"{section}\" reads {reads}: check what the sender publishes on this topic, and [agent] format."
        ),
        DecodeError::StringField => "Only numbers and booleans are scored: drop string fields at the sender (Telegraf's fielddrop or fieldpass) to quiet this.".into(),
        DecodeError::NonFinite if format == InputFormat::Raw => "The sender publishes NaN or infinite values: fix the sender. (float64 values computed in float64 and read as float32 often look so: a float64 frame has the length of two float32 frames. Float64 values widened from float32 or float16 look finite and are scored as garbage, unrefused. Convert them at the sender: numpy x.astype(\"<f4\"), torch x.float().)".into(),
        DecodeError::NonFinite => "The sender publishes NaN or infinite values: fix the sender.".into(),
        DecodeError::TimestampInvalid(_) if format == InputFormat::Raw => "A DWF1 header's time must be epoch seconds (milliseconds, microseconds or nanoseconds are told by size), or 0 or NaN for none: check what the sender writes after DWF1.".into(),
        DecodeError::TimestampInvalid(_) if format == InputFormat::Telegraf => "Telegraf JSON timestamps must be epoch numbers (its default; milliseconds, microseconds or nanoseconds are told by size) or RFC 3339 strings: in [[outputs.mqtt]], leave json_timestamp_format unset or set it to \"2006-01-02T15:04:05Z07:00\" (line protocol: epoch numbers).".into(),
        DecodeError::TimestampMissing | DecodeError::TimestampInvalid(_) => "Timestamps must be epoch seconds (milliseconds, microseconds or nanoseconds are told by size) or RFC 3339: check the sender's time format.".into(),
        DecodeError::WrongLength { expected, got } => {
            // A whole number of half frames: most likely frames of the right width in
            // float16 or bfloat16 (a model's activations often are). (float64 frames have
            // the length of whole float32 frames: they are not refused here.)
            let values = expected / 4;
            let halves = *expected >= 2
                && expected.is_multiple_of(2)
                && *got > 0
                && got.is_multiple_of(expected / 2);
            let precision = if *got == expected / 2 && halves {
                format!(
                    ", exactly half the bytes of a frame: it probably sends {values} float16 (or bfloat16) values instead of float32. Convert them at the sender (numpy: x.astype(\"<f4\"); torch: x.float()). Otherwise"
                )
            } else if halves && *expected >= 64 {
                // (Only for frames of 16 values or more: for narrower ones nearly every
                // length is a whole number of half frames, and the hint would mislead.)
                format!(
                    ", an odd number of half frames: it probably sends frames of {values} float16 (or bfloat16) values instead of float32. Convert them at the sender (numpy: x.astype(\"<f4\"); torch: x.float()). Otherwise"
                )
            } else {
                ":".into()
            };
            format!(
                "The model takes frames of {} ({expected} bytes of little-endian float32), one or more a message; this sender's messages are {}{precision} send whole frames of the model's width, or point [agent] model_dir at a model of this width.",
                width(*expected),
                width(*got)
            )
        }
    }
}

/// Logs a sample that came after its window closed (the caller logs the 1st, 2nd, 4th…
/// of the reason and each stream's first): how late, and
/// the `[assemble]` settings that decide it.
fn late_sample(
    count: u64,
    topic: &str,
    sample: &crate::ingest::assemble::Sample<'_>,
    a: &Assembler,
) {
    let late_by = a
        .open_since(&sample.stream)
        .map_or(f64::NAN, |open| open - sample.timestamp);
    let complete = if a.closes_when_complete() {
        " (or as soon as every feature has a sample in it: close_when_complete = true)"
    } else {
        ""
    };
    refused(
        count,
        topic,
        Some(&sample.stream),
        &Rejected::Sample(Reject::Late),
        &format_args!(
            "a sample stamped {} came {late_by:.3} s before its stream's oldest open window: that window had closed",
            sample.timestamp
        ),
        &format!(
            "[assemble] window_secs = {} and lateness_windows = {}: a window closes once its stream has a sample {} windows later, or its clock passes that{complete}. If this sender delivers samples late or out of order, raise [assemble] lateness_windows (at most {}). Just after a broker outage or an agent restart, a sender's backlog arrives late too: nothing to mend then. Else check its clock.",
            a.window_secs(),
            a.lateness_windows(),
            a.lateness_windows() + 1,
            crate::ingest::assemble::MAX_LATENESS_WINDOWS
        ),
    );
}

/// Logs a sample whose metric the model does not know (when due, as [`late_sample`]), with how
/// `format` names metrics (it used to give Telegraf's naming whatever the input was).
fn unknown_metric(
    count: u64,
    format: InputFormat,
    stream: &str,
    metric: &str,
    features: &[String],
) {
    let expected: Vec<&str> = features.iter().take(3).map(String::as_str).collect();
    let naming = match format {
        InputFormat::Examon => {
            " An ExaMon sample's metric is its topic's last level (…/chnl/data/<metric>, URL-decoded): the model's feature names must match those."
        }
        InputFormat::Telegraf => {
            " Telegraf metrics are named <measurement>.<field> (cpu.usage_user): the model's feature names must match those."
        }
        // Raw frames have no metric names.
        InputFormat::Raw => "",
    };
    tracing::warn!(
        stream = ?crate::ingest::clipped_name(stream),
        metric = ?crate::ingest::clipped_name(metric),
        expected = %format!("{}{}", expected.join(","), if features.len() > 3 { ",…" } else { "" }),
        rejected = count,
        "a sample's metric is not one of the model's features; it is counted (darkwatch_samples_rejected_total{{reason=\"unknown_metric\"}}) and skipped.{naming}"
    );
}

/// Logs the 1st, 2nd, 4th, 8th… raw frame whose header time lies too far after its
/// receipt (the receipt stands in).
fn frame_time_ahead(count: u64, stream: &str, timestamp: f64, received: f64, limit: f64) {
    if count.is_power_of_two() {
        tracing::warn!(
            stream = ?crate::ingest::clipped_name(stream),
            timestamp,
            received,
            ahead_secs = timestamp - received,
            frames = count,
            "a raw frame's header time is more than {limit} s after the frame arrived: the sender's clock (or this host's) is wrong. The frame is scored with the time it arrived, which its alerts carry. Keep both clocks synchronised (NTP)"
        );
    }
}

/// Logs a sample stamped too far after its receipt (when due, as [`late_sample`]).
fn future_sample(count: u64, stream: &str, timestamp: f64, received: f64, limit: f64) {
    tracing::warn!(
        stream = ?crate::ingest::clipped_name(stream),
        timestamp,
        received,
        ahead_secs = timestamp - received,
        rejected = count,
        "a sample is stamped more than {limit} s after it arrived: the sender's clock (or this host's) is wrong; it is counted (darkwatch_samples_rejected_total{{reason=\"future\"}}) and skipped. Keep both clocks synchronised (NTP)"
    );
}

/// Logs two series (tag sets, topics) found merged into one feature of one stream, once per
/// feature ([`crate::ingest::assemble::Assembler::take_mixed`]), with the remedy.
fn series_merged(format: InputFormat, mixed: &crate::ingest::assemble::Mixed) {
    let clip = crate::ingest::clipped_name;
    let todo = match format {
        InputFormat::Telegraf => {
            "name the tag that tells them apart in [telegraf] name_tags (name_tags = [\"cpu\"] makes cpu.cpu0.usage_user, cpu.cpu-total.usage_user; train on those names), or send one series only (Telegraf's cpu input: percpu = false; or tagexclude / tagdrop)".to_string()
        }
        _ => crate::ingest::examon::merge_remedy(&mixed.origins[0], &mixed.origins[1]),
    };
    tracing::warn!(
        metric = ?clip(&mixed.metric),
        stream = ?clip(&mixed.stream),
        one = ?clip(&mixed.origins[0]),
        other = ?clip(&mixed.origins[1]),
        todo = todo.as_str(),
        "samples of two series (tag sets or topics) reach one feature of one stream and are merged into one value by [assemble] aggregation; its alerts cannot say which series moved"
    );
}

/// Logs a refused new stream (`[assemble] max_streams` reached) at the 1st, 2nd, 4th, 8th…
/// refusal, so an operator learns why a node is not scored without a line per sample.
fn stream_refused(refusals: u64, stream: &str) {
    if refusals.is_power_of_two() {
        tracing::warn!(
            stream = ?crate::ingest::clipped_name(stream),
            refusals,
            "a new stream was refused: [assemble] max_streams streams are already tracked (a stream is forgotten after [assemble] forget_after_secs without a message, 0: kept until restart); raise max_streams if this stream should be scored, or lower forget_after_secs if old streams hold the slots"
        );
    }
}

/// Counts a frame the scorer will score (or would have, had it not gone): what the
/// watchdog compares with the frames that reach the sink. Frames with a non-finite value
/// are skipped by the scorer, and dropped ones never reach it: neither counts.
fn queued(counters: &AgentCounters, pushed: Pushed, values: &[f32]) {
    if pushed == Pushed::Dropped {
        counters.frames_dropped.fetch_add(1, Ordering::Relaxed);
    } else if pipeline::all_finite(values) {
        counters.frames_queued.fetch_add(1, Ordering::Relaxed);
    }
}

/// How often the source thread turns while the MQTT thread feeds the ring: it checks for
/// a stop or a reload, beats the watchdog's heartbeat, and, once no message came for a
/// whole turn, closes quiet windows by the event clock.
const FEED_TURN: Duration = Duration::from_millis(50);

/// What the MQTT thread and the pipeline's source thread share (behind one mutex that
/// only the MQTT thread takes per message): the decoder and assembler, and while a
/// pipeline turn runs, the producer end of its frame ring.
struct Feed {
    source: AgentSource,
    /// The running turn's ring and clock; `None` between turns (a reload).
    ring: Option<(FrameProducer, Clock)>,
    /// Messages received while no turn runs, oldest first; the next turn takes them first.
    waiting: VecDeque<Incoming>,
    /// Most messages `waiting` holds (`[mqtt] incoming_capacity`); more are refused.
    capacity: usize,
    /// Frames offered to the running turn's ring.
    offered: u64,
    /// The MQTT client dropped its inbox (its thread ended): no more messages will come.
    closed: bool,
    /// Decoding a message panicked on the MQTT thread.
    failed: bool,
}

type SharedFeed = Arc<Mutex<Feed>>;

/// Locks the feed. A panic while it was held leaves nothing half-done that matters here
/// (a message is decoded or not), so a poisoned lock is taken as it is.
fn lock(feed: &SharedFeed) -> std::sync::MutexGuard<'_, Feed> {
    feed.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Feed {
    fn new(source: AgentSource, capacity: usize) -> SharedFeed {
        Arc::new(Mutex::new(Feed {
            source,
            ring: None,
            waiting: VecDeque::new(),
            capacity: capacity.max(1),
            offered: 0,
            closed: false,
            failed: false,
        }))
    }

    /// Takes one message: decoded and assembled into the ring while a turn runs, else held
    /// for the next turn. `false` when it is refused (held messages full).
    fn deliver(&mut self, msg: &Received<'_>) -> bool {
        let Feed {
            source,
            ring,
            waiting,
            capacity,
            offered,
            ..
        } = self;
        match ring {
            Some((producer, clock)) => {
                *offered += source.take(msg, Some((&mut *producer, &*clock)));
                *offered += source.emit(producer, clock, Some(f64::NAN));
                true
            }
            None if waiting.len() < *capacity => {
                waiting.push_back(msg.to_incoming());
                true
            }
            None => false,
        }
    }

    /// Starts a turn on `producer`: the messages held meanwhile go first, in order.
    fn start(&mut self, producer: FrameProducer, clock: Clock) {
        self.ring = Some((producer, clock));
        self.offered = 0;
        while let Some(msg) = self.waiting.pop_front() {
            self.deliver(&msg.as_received());
        }
    }

    /// Closes the windows of quiet streams by their event clocks (no message for a while),
    /// which run on the monotonic clock: a step of the wall clock closes nothing.
    fn poll_clock(&mut self) {
        let now = crate::mqtt::monotonic_secs();
        if let Some((producer, clock)) = self.ring.as_mut() {
            self.offered += self.source.emit(producer, clock, Some(now));
        }
        // After the windows closed: a stream quiet for so long has none open anyway.
        self.source.forget_quiet(now);
    }

    /// Ends the turn: with `flush` (shutdown), closes every open window first. Returns the
    /// frames offered in the turn and the ring's producer (dropping it ends the scorer).
    fn end(&mut self, flush: bool) -> (u64, Option<FrameProducer>) {
        let ring = self.ring.take();
        let Some((mut producer, clock)) = ring else {
            return (self.offered, None);
        };
        if flush {
            self.offered += self.source.emit(&mut producer, &clock, None);
        }
        (self.offered, Some(producer))
    }
}

/// The MQTT client's [`mqtt::Inbox`]: each message is decoded, assembled and pushed into
/// the scorer's ring on the MQTT thread, so a message wakes no thread but the scorer.
struct FeedInbox(SharedFeed);

impl mqtt::Inbox for FeedInbox {
    fn deliver(&mut self, msg: Received<'_>) -> bool {
        let mut feed = lock(&self.0);
        if feed.failed {
            return false;
        }
        // A decoder panic must stop the agent, not the MQTT client: the source thread
        // sees `failed` and ends the pipeline with an error.
        let feed = &mut *feed;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| feed.deliver(&msg))) {
            Ok(taken) => taken,
            Err(_) => {
                feed.failed = true;
                false
            }
        }
    }
}

impl Drop for FeedInbox {
    fn drop(&mut self) {
        lock(&self.0).closed = true;
    }
}

/// The agent's pipeline source. It hands the turn's ring to the [`Feed`], where the MQTT
/// thread pushes frames, and keeps the turn's time on the pipeline's source thread.
struct FeedTurn {
    feed: SharedFeed,
    counters: Arc<AgentCounters>,
    control: Control,
    /// Where the source puts itself when it ends its turn for a reload.
    handback: Handback,
    /// Warns once if nothing at all arrives after the start.
    no_input: NoInput,
    /// Warns when the embedded broker skips messages.
    skips: BrokerSkipWatch,
    /// Warns when frames are dropped at a full ring.
    drops: RingDropWatch,
}

/// Warns when the embedded broker skipped messages for a subscriber that fell behind
/// ([`mqtt::broker_skipped`]): at the 1st, 2nd, 4th, 8th… skip, with how many messages
/// were lost since the last warning and in all. rumqttd acknowledged them to their
/// publisher and delivered them to nobody.
struct BrokerSkipWatch {
    /// `None` with an external broker: nothing to watch.
    log_bytes: Option<u64>,
    /// Messages skipped when it last warned.
    warned_messages: u64,
    /// Warn again once this many skips have happened.
    next_warn: u64,
}

impl BrokerSkipWatch {
    fn new(mqtt: &mqtt::MqttConfig) -> BrokerSkipWatch {
        let skips = mqtt::broker_skipped();
        BrokerSkipWatch {
            log_bytes: (mqtt.broker == mqtt::BrokerMode::Embedded)
                .then_some(mqtt.embedded_log_bytes),
            warned_messages: skips.messages,
            next_warn: skips.times + 1,
        }
    }

    /// Warns when the skips reached the next power of two; true when it did.
    fn check(&mut self) -> bool {
        let Some(log_bytes) = self.log_bytes else {
            return false;
        };
        let skips = mqtt::broker_skipped();
        if skips.times < self.next_warn {
            return false;
        }
        tracing::warn!(
            skipped = skips.messages - self.warned_messages,
            skipped_in_all = skips.messages,
            filter = %skips.last_filter,
            embedded_log_bytes = log_bytes,
            "The embedded MQTT broker skipped messages that a subscriber had not taken yet: it fell more than [mqtt] embedded_log_bytes behind the publishers (this agent when it scores slower than they publish, or another client of the broker). Their publishers had them acknowledged; nobody received them. They are counted in darkwatch_mqtt_broker_skipped_total. Raise [mqtt] embedded_log_bytes to ride out longer bursts, or make the scoring keep up (a smaller model, [score] backend)"
        );
        self.warned_messages = skips.messages;
        self.next_warn = skips.times.saturating_mul(2).max(skips.times + 1);
        true
    }
}

/// Warns while frames are dropped at the full ring to the scorer
/// (`darkwatch_frames_dropped_total`): checked every turn of the source thread, it warns
/// at the 1st, 2nd, 4th, 8th… turn that saw drops, with the frames dropped since the last
/// warning and in all, so that a scorer slower than its input shows in the log while it
/// happens and a lasting overload does not fill the log.
struct RingDropWatch {
    /// `darkwatch_frames_dropped_total` at the last check.
    seen: u64,
    /// At the last warning.
    warned: u64,
    /// Turns that saw drops.
    turns: u64,
    ring_capacity_frames: usize,
}

impl RingDropWatch {
    fn new(counters: &AgentCounters, ring_capacity_frames: usize) -> RingDropWatch {
        let dropped = counters.frames_dropped.load(Ordering::Relaxed);
        RingDropWatch {
            seen: dropped,
            warned: dropped,
            turns: 0,
            ring_capacity_frames,
        }
    }

    /// Warns when this turn saw drops and their turns reached the next power of two; true
    /// when it did.
    fn check(&mut self, counters: &AgentCounters) -> bool {
        let dropped = counters.frames_dropped.load(Ordering::Relaxed);
        if dropped == self.seen {
            return false;
        }
        self.seen = dropped;
        self.turns += 1;
        if !self.turns.is_power_of_two() {
            return false;
        }
        tracing::warn!(
            dropped = dropped - self.warned,
            dropped_in_all = dropped,
            ring_capacity_frames = self.ring_capacity_frames,
            "Frames were dropped: the ring to the scorer was full ([pipeline] full_policy = \"drop_newest\"), the scorer slower than its input. They are counted in darkwatch_frames_dropped_total (logged at the 1st, 2nd, 4th… check that saw drops). Make the scoring keep up (a smaller model, [score] backend, a larger [pipeline] batch_max_frames), or raise [pipeline] ring_capacity_frames to ride out longer bursts"
        );
        self.warned = dropped;
        true
    }
}

/// How long after it started an agent that has received no message at all warns, once,
/// that its input may be wired wrong.
pub const NO_INPUT_WARN_AFTER: Duration = Duration::from_secs(60);

/// The warning of an agent that has received no message at all [`NO_INPUT_WARN_AFTER`]
/// after its start, with the broker and the subscribed topics: the senders publish
/// elsewhere, or on other topics (an agent started on the defaults listens on an embedded
/// broker that no ExaMon or Telegraf publisher knows about).
struct NoInput {
    since: std::time::Instant,
    after: Duration,
    broker: String,
    subscribe: String,
    /// Warned, or a message came: nothing more to say.
    done: bool,
}

impl NoInput {
    fn new(mqtt: &mqtt::MqttConfig) -> NoInput {
        let broker = match mqtt.broker {
            mqtt::BrokerMode::Embedded => format!("embedded on {}:{}", mqtt.host, mqtt.port),
            mqtt::BrokerMode::External => format!("{}:{}", mqtt.host, mqtt.port),
        };
        NoInput {
            since: std::time::Instant::now(),
            after: NO_INPUT_WARN_AFTER,
            broker,
            subscribe: mqtt.subscribe_filters().join(","),
            done: false,
        }
    }

    /// Warns once `after` has passed with `messages` (received so far) still 0; true when
    /// it did.
    fn check(&mut self, messages: u64) -> bool {
        if self.done || messages > 0 {
            self.done = true;
            return false;
        }
        if self.since.elapsed() < self.after {
            return false;
        }
        self.done = true;
        tracing::warn!(
            broker = %self.broker,
            subscribe = %self.subscribe,
            "No MQTT message has arrived in the {} s since the agent started: check that the senders publish to this broker and that [mqtt] subscribe matches their topics (and [mqtt] broker, host and port, if they use another broker); darkwatch_messages_received_total counts what arrives",
            self.after.as_secs()
        );
        true
    }
}

/// Takes the turn's ring out of the [`Feed`] when the source thread leaves its turn, also
/// by a panic: the producer must not outlive the turn in the shared feed, or the scorer
/// (and the trainer waiting on it) would never see the end of its ring.
struct TurnGuard(SharedFeed);

impl Drop for TurnGuard {
    fn drop(&mut self) {
        drop(lock(&self.0).ring.take());
    }
}

impl Source for FeedTurn {
    fn run(mut self: Box<Self>, producer: FrameProducer, clock: &Clock, _stop: &AtomicBool) -> u64 {
        let _guard = TurnGuard(self.feed.clone());
        lock(&self.feed).start(producer, *clock);
        while !self.control.is_stopping() {
            if self.control.reload.load(Ordering::SeqCst) {
                // A reload: keep the open windows; messages are held for the next turn.
                let (offered, producer) = lock(&self.feed).end(false);
                drop(producer);
                let handback = self.handback.clone();
                if let Ok(mut h) = handback.lock() {
                    *h = Some(self);
                }
                return offered;
            }
            self.counters.source_turns.fetch_add(1, Ordering::Relaxed);
            let messages = self.counters.messages.load(Ordering::Relaxed);
            self.no_input.check(messages);
            self.skips.check();
            self.drops.check(&self.counters);
            std::thread::sleep(FEED_TURN);
            let mut feed = lock(&self.feed);
            if feed.failed {
                let (_, producer) = feed.end(false);
                drop(feed);
                drop(producer);
                panic!("decoding a message panicked on the MQTT thread");
            }
            if feed.closed {
                break;
            }
            // Every turn, not only when no message came: each stream has its own clock, and
            // a node that went quiet while others keep sending must still have its last
            // windows closed.
            feed.poll_clock();
        }
        // Shutdown: close every open window. (Held messages were taken when the turn
        // started; since then every message went straight to the ring.)
        let (offered, producer) = lock(&self.feed).end(true);
        drop(producer);
        offered
    }
}

/// One stream's threshold and alert state, and what the sink's ticks keep of it.
struct StreamState {
    threshold: Threshold,
    alerts: AlertState,
    /// When its firing alert was last published, by the ticks' clock; `None` while it
    /// does not fire, and from a new firing to the next tick.
    sent: Option<Instant>,
    /// The stream's name, for the log.
    name: String,
    /// A frame came since the last tick.
    seen: bool,
    /// The tick after its latest frame.
    last_seen: Option<Instant>,
    /// No frame for `silence_secs`: logged once, until frames come back.
    silent: bool,
    /// Its series on `/metrics` (`[metrics] per_stream`); they go when this state goes.
    gauge: Option<Arc<crate::metrics::StreamGauge>>,
    /// Whether `gauge` is shown: from the first frame scored, hidden while silent.
    shown: bool,
    /// Who an ExaMon stream is (from its first topic); `None` for other input.
    examon: Option<crate::ingest::examon::StreamIdentity>,
    /// Its `[scores]` topics, when scores are published.
    score_topics: Option<Arc<mqtt::ScoreTopics>>,
    /// The event time from which its next score is published (`[scores] interval_secs`),
    /// and that of the last one published.
    score_next: f64,
    score_last: f64,
}

/// Thresholds and alert state per stream; alerts leave as MQTT messages.
struct AgentSink {
    template: Threshold,
    /// Per slot, the state of the stream that holds it, from its first frame on.
    per_stream: Vec<Option<StreamState>>,
    /// Per slot, the generation of the stream that holds it as far as the sink knows (the
    /// state in `per_stream` is of this one): frames of an older generation are of a
    /// stream forgotten since (see [`AgentSink::admit`]).
    generations: Vec<u32>,
    streams: StreamNames,
    alert_cfg: crate::alert::AlertConfig,
    mqtt: mqtt::MqttConfig,
    model_id: String,
    model_version: String,
    features: Arc<[String]>,
    out: mqtt::OutgoingSender,
    counters: Arc<AgentCounters>,
    record: bool,
    scores: Vec<(u32, u64, f32)>,
    events: Vec<AlertEvent>,
    /// Online retraining's side of the sink, when it is on.
    retrain: Option<crate::retrain::SinkSide>,
    /// How thresholds are rebuilt for a retrained model.
    threshold_cfg: crate::threshold::ThresholdConfig,
    /// A stream that scores no frame for this long is silent (see [`silence_secs`]).
    silence_secs: f64,
    /// The MQTT client's state: re-sends wait while it has no connection (they would only
    /// fill the spool). `None`: send always.
    link: Option<Arc<MqttStats>>,
    /// Streams the source forgot, for the sink to let go of (see [`Recycling`]).
    recycling: SharedRecycling,
    /// Epoch seconds when the batch being accepted was scored (read once per batch).
    batch_wall: f64,
    /// Reads an ExaMon stream's identity from its topic (ExaMon input only).
    examon: Option<crate::ingest::examon::ExamonDecoder>,
    /// Where `[scores]` go, when they are published (fixed for the run, as `[mqtt]`).
    score_out: Option<ScoreOut>,
}

/// The sink's side of `[scores]`.
struct ScoreOut {
    cfg: mqtt::ScoresConfig,
    node: String,
    sender: mqtt::ScoreSender,
}

impl ScoreOut {
    /// The topics of a stream: an ExaMon stream keyed by node (`node` among `[examon]
    /// stream_key`) whose topic has org and cluster pairs gets ExaMon's, its other stream
    /// keys after the model; any other stream the template's. A stream not keyed by node
    /// (`stream_key = "cluster"`) merges nodes, so it is no one node's score.
    fn topics(
        &self,
        name: &str,
        examon: Option<&crate::ingest::examon::StreamIdentity>,
        model_id: &str,
    ) -> Arc<mqtt::ScoreTopics> {
        let topics = match examon {
            Some(crate::ingest::examon::StreamIdentity {
                org: Some(org),
                cluster: Some(cluster),
                node: Some(node),
                keys,
            }) if keys.iter().any(|(k, _)| k == "node") => {
                let others: Vec<(String, String)> = keys
                    .iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "org" | "cluster" | "node"))
                    .cloned()
                    .collect();
                self.cfg
                    .examon_topics(org, cluster, node, &others, model_id)
            }
            _ => self.cfg.template_topics(&self.node, name),
        };
        Arc::new(topics)
    }
}

/// The labels of a stream's `anomaly_score`: an ExaMon stream's stream keys, each named
/// as a Prometheus label (characters other than letters, digits and `_` become `_`; a
/// key that would clash with `stream` or `model_id`, or start with `__`, gets `examon_`
/// before it).
fn gauge_labels(examon: Option<&crate::ingest::examon::StreamIdentity>) -> Vec<(String, String)> {
    let Some(id) = examon else {
        return Vec::new();
    };
    id.keys
        .iter()
        .map(|(k, v)| (crate::ingest::examon::label_name(k), v.clone()))
        .collect()
}

impl AgentSink {
    /// A sink for `model` with `cfg`'s thresholds and alert settings.
    fn new(
        cfg: &DarkwatchConfig,
        model: &Detector,
        streams: StreamNames,
        mqtt: &mqtt::MqttConfig,
        out: mqtt::OutgoingSender,
        counters: &Arc<AgentCounters>,
        record: bool,
    ) -> Result<AgentSink, AgentError> {
        let template = cfg
            .threshold
            .build(&model.threshold_scores())
            .map_err(|e| AgentError::Threshold(e.to_string()))?;
        Ok(AgentSink {
            template,
            per_stream: Vec::new(),
            generations: Vec::new(),
            streams,
            alert_cfg: cfg.alert.for_node(&mqtt.node()),
            mqtt: mqtt.clone(),
            model_id: model.id().to_string(),
            model_version: model.version_label(),
            features: model.features().into(),
            out,
            counters: counters.clone(),
            record,
            scores: Vec::new(),
            events: Vec::new(),
            retrain: None,
            threshold_cfg: cfg.threshold.clone(),
            silence_secs: silence_secs(cfg),
            link: None,
            recycling: SharedRecycling::default(),
            batch_wall: f64::NAN,
            examon: (cfg.agent.format == InputFormat::Examon).then(|| cfg.examon.build()),
            score_out: None,
        })
    }

    /// Lets go of the streams the source forgot (see [`Recycling`]), unless the first
    /// frame of the next stream in the slot came first and did: a firing alert is resolved
    /// (its `ended_by` says so; `[alert] silence_secs` has resolved it before unless it is
    /// 0 or not shorter than `[assemble] forget_after_secs`), and the stream's threshold,
    /// alert and retraining state go. Its frames that come later are dropped.
    fn forget_retired(&mut self) {
        let retired = match self.recycling.lock() {
            Ok(mut r) if !r.retired.is_empty() => std::mem::take(&mut r.retired),
            _ => return,
        };
        for (slot, generation) in retired {
            let i = self.slot(slot);
            if self.generations[i] > generation {
                continue;
            }
            self.generations[i] = generation.saturating_add(1);
            self.let_go(i);
        }
        self.set_gauges();
    }

    /// Slot `slot`'s index in `per_stream` and `generations`, which grow to hold it.
    fn slot(&mut self, slot: u32) -> usize {
        let i = slot as usize;
        if self.per_stream.len() <= i {
            self.per_stream.resize_with(i + 1, || None);
        }
        if self.generations.len() <= i {
            self.generations.resize(i + 1, 0);
        }
        i
    }

    /// Drops the state of the (forgotten) stream in slot `i`, resolving its firing alert.
    fn let_go(&mut self, i: usize) {
        let ended = self
            .per_stream
            .get_mut(i)
            .and_then(Option::take)
            .and_then(|mut st| st.alerts.finish());
        if let Some(mut e) = ended {
            e.annotations
                .insert("ended_by".into(), ENDED_BY_FORGOTTEN.into());
            let name = e.stream.clone();
            self.publish(&name, e);
        }
        if let Some(r) = self.retrain.as_mut() {
            r.forget(i);
        }
    }

    /// Counts a frame of a forgotten stream, which [`AgentSink::admit`] refuses (returns
    /// false for it), logging the 1st, 2nd, 4th, 8th… one.
    fn drop_stale(&self, meta: &FrameMeta) -> bool {
        let count = self.counters.frames_stale.fetch_add(1, Ordering::Relaxed) + 1;
        if count.is_power_of_two() {
            tracing::warn!(
                slot = meta.stream,
                generation = meta.generation,
                seq = meta.seq,
                frames_stale = count,
                "A frame of a forgotten stream reached the scorer after the stream's state was dropped: the scorer ran about [assemble] forget_after_secs behind its input. It is dropped, not scored against another stream's state; if this recurs, the scorer does not keep up with the input (a smaller model, [score] backend)."
            );
        }
        false
    }

    /// The first frame of a retrained model: every stream's threshold restarts from that
    /// model's own calibration, and its alerts carry the new id and version.
    fn switch_model(&mut self, model: &Model) {
        match self.threshold_cfg.build(&model.threshold_scores()) {
            Ok(t) => {
                for st in self.per_stream.iter_mut().flatten() {
                    st.threshold = t.clone();
                }
                self.template = t;
            }
            Err(e) => {
                tracing::warn!(version = model.meta.version, error = %e, "retrained model has no threshold; keeping the current one");
            }
        }
        self.model_id.clone_from(&model.meta.id);
        self.model_version = model.meta.version.to_string();
        for st in self.per_stream.iter_mut().flatten() {
            st.alerts.set_model(&self.model_id, &self.model_version);
            // An ExaMon score topic names the model.
            if let Some(out) = &self.score_out {
                st.score_topics = Some(out.topics(&st.name, st.examon.as_ref(), &self.model_id));
            }
        }
        self.counters.set_model_id(&model.meta.id);
    }

    /// Moves to `model` of the running retraining if the sink still scores an older one:
    /// what the first frame of `model` does ([`Self::switch_model`]).
    fn catch_up(&mut self, model: &Model) {
        if self.model_id != model.meta.id || self.model_version != model.meta.version.to_string() {
            self.switch_model(model);
        }
    }

    /// Takes over a reload that made `change`, to the new `cfg` and `model` (`streams`: the
    /// source's stream names, new when the input changed).
    ///
    /// - Nothing alert state rests on changed: it all carries over, firing alerts
    ///   included; `[alert] resend_secs` and `silence_secs` apply at once.
    /// - Only the alert's labels or firing rules changed: each firing alert is resolved,
    ///   its `ended_by` naming the keys (new labels make a new fingerprint, so the old
    ///   episode cannot go on), and each stream's alert starts afresh; its threshold and
    ///   silence bookkeeping carry over, so an adaptive threshold keeps what it learned.
    /// - The input, the model or `[threshold]` changed: firing alerts are resolved, saying
    ///   which, and every stream starts afresh (thresholds from the new calibration).
    ///
    /// Every such alert used to be resolved with "a reload changed the model, thresholds or
    /// input", also when only `[alert.labels]` had changed.
    fn reload(
        mut self,
        cfg: &DarkwatchConfig,
        model: &Detector,
        streams: StreamNames,
        change: &ReloadChange,
    ) -> Result<AgentSink, AgentError> {
        let alert_cfg = cfg.alert.for_node(&self.mqtt.node());
        if change.keeps_alerts() {
            for st in self.per_stream.iter_mut().flatten() {
                st.alerts.set_links(&alert_cfg);
            }
            self.alert_cfg = alert_cfg;
            self.silence_secs = silence_secs(cfg);
            self.streams = streams;
            return Ok(self);
        }
        if !change.keeps_thresholds() {
            let fresh = AgentSink::new(
                cfg,
                model,
                streams,
                &self.mqtt,
                self.out.clone(),
                &self.counters,
                self.record,
            )?;
            // The old model's alerts end here; the new one starts from a clean state.
            self.end_alerts(&change.ended_by());
            return Ok(AgentSink {
                scores: std::mem::take(&mut self.scores),
                events: std::mem::take(&mut self.events),
                link: self.link.take(),
                recycling: self.recycling.clone(),
                score_out: self.score_out.take(),
                ..fresh
            });
        }
        let ended_by = change.ended_by();
        let mut ending = Vec::new();
        for st in self.per_stream.iter_mut().flatten() {
            if let Some(mut e) = st.alerts.finish() {
                e.annotations.insert("ended_by".into(), ended_by.clone());
                ending.push(e);
            }
            st.alerts = AlertState::new(
                &alert_cfg,
                &st.name,
                &self.model_id,
                &self.model_version,
                self.features.clone(),
            );
            st.sent = None;
        }
        self.alert_cfg = alert_cfg;
        self.silence_secs = silence_secs(cfg);
        self.streams = streams;
        for e in ending {
            let name = e.stream.clone();
            self.publish(&name, e);
        }
        self.set_gauges();
        Ok(self)
    }

    /// Resolves every firing alert because the agent stops or changes model: each event
    /// says so in its `ended_by` annotation, since the anomaly may still be going on.
    fn end_alerts(&mut self, why: &str) {
        let mut ending = Vec::new();
        for st in self.per_stream.iter_mut().flatten() {
            if let Some(mut e) = st.alerts.finish() {
                e.annotations.insert("ended_by".into(), why.into());
                ending.push(e);
            }
        }
        self.per_stream.clear();
        for e in ending {
            let name = e.stream.clone();
            self.publish(&name, e);
        }
        self.set_gauges();
    }

    /// Sets the gauges of [`AgentCounters`] from the streams' state (a pass over the
    /// streams: at rare events and ticks, never per frame).
    fn set_gauges(&self) {
        let (mut streams, mut firing, mut silent) = (0, 0, 0);
        for st in self.per_stream.iter().flatten() {
            streams += 1;
            firing += u64::from(st.alerts.is_firing());
            silent += u64::from(st.silent);
        }
        let c = &self.counters;
        c.streams.store(streams, Ordering::Relaxed);
        c.firing_now.store(firing, Ordering::Relaxed);
        c.streams_silent.store(silent, Ordering::Relaxed);
    }

    /// Publishes a transition of a stream's alert (it fires or resolves).
    fn publish(&mut self, stream: &str, event: AlertEvent) {
        match event.status {
            crate::alert::AlertStatus::Firing => {
                self.counters.alerts_firing.fetch_add(1, Ordering::Relaxed)
            }
            crate::alert::AlertStatus::Resolved => self
                .counters
                .alerts_resolved
                .fetch_add(1, Ordering::Relaxed),
        };
        self.send(stream, &event);
        // Kept only when recording (the demo): a daemon must not grow with every alert.
        if self.record {
            self.events.push(event);
        }
    }

    fn send(&self, stream: &str, event: &AlertEvent) {
        let payload = serde_json::to_vec(event).unwrap_or_default();
        let _ = self.out.send(Outgoing {
            topic: self.mqtt.alert_topic_for(stream),
            payload,
            retain: false,
        });
    }

    /// Notes each stream's frames since the last tick, and a stream that has scored none
    /// for `silence_secs`: it is logged (once per silence) and, if its alert fires, the
    /// alert is resolved with an `ended_by` that says so: no frame could resolve it any
    /// more, and its re-sends would keep it firing. Frames that come back are scored as
    /// before.
    fn watch_silence(&mut self, now: Instant) {
        let limit = self.silence_secs;
        // Streams that turned silent in this pass: logged one by one, or in one line when
        // many go at once (a broker outage silences every stream in the same tick).
        let mut silenced: Vec<(String, f64, bool)> = Vec::new();
        for i in 0..self.per_stream.len() {
            let Some(st) = self.per_stream[i].as_mut() else {
                continue;
            };
            let seen = std::mem::take(&mut st.seen);
            let last = match st.last_seen {
                Some(last) if !seen => last,
                _ => {
                    st.last_seen = Some(now);
                    continue;
                }
            };
            let quiet = now.saturating_duration_since(last).as_secs_f64();
            if st.silent || limit <= 0.0 || quiet < limit {
                continue;
            }
            st.silent = true;
            // Its last score is not current any more: its series go until it scores again.
            if let Some(g) = &st.gauge {
                g.show(false);
            }
            st.shown = false;
            let ended = st.alerts.finish().map(|mut e| {
                e.annotations
                    .insert("ended_by".into(), ENDED_BY_SILENCE.into());
                e
            });
            if silenced.len() <= STREAMS_NAMED {
                silenced.push((
                    format!("{:?}", crate::ingest::clipped_name(&st.name)),
                    quiet.round(),
                    ended.is_some(),
                ));
            } else {
                silenced.push((String::new(), 0.0, ended.is_some()));
            }
            if let Some(event) = ended {
                let name = event.stream.clone();
                self.publish(&name, event);
            }
        }
        log_silenced(&silenced);
    }

    /// Publishes every firing alert again once `[alert] resend_secs` passed since it was
    /// last published, as it stands now ([`AlertState::active`]: same labels, fingerprint
    /// and `startsAt`, the latest score, peak and features), so that Alertmanager does not
    /// time out an anomaly that goes on. Counted apart (`alerts_resent`), not as a firing,
    /// and not recorded. While the MQTT client has no connection it waits, and catches up
    /// at the first tick after the reconnect.
    fn resend(&mut self, now: Instant) {
        let every = self.alert_cfg.resend_secs;
        if every <= 0.0 {
            return;
        }
        let connected = self
            .link
            .as_ref()
            .is_none_or(|l| l.connected.load(Ordering::Relaxed));
        for i in 0..self.per_stream.len() {
            let Some(st) = self.per_stream[i].as_mut() else {
                continue;
            };
            if !st.alerts.is_firing() {
                st.sent = None;
                continue;
            }
            let Some(sent) = st.sent else {
                // Fired since the last tick: its firing event went out then.
                st.sent = Some(now);
                continue;
            };
            if !connected || now.saturating_duration_since(sent).as_secs_f64() < every {
                continue;
            }
            let Some(event) = st.alerts.active() else {
                continue;
            };
            st.sent = Some(now);
            self.counters.alerts_resent.fetch_add(1, Ordering::Relaxed);
            self.send(&event.stream, &event);
        }
    }
}

impl Sink for AgentSink {
    // A node's frames come at most a few thousand a second, and an alert is wanted at once:
    // thresholds and alerts run on the scorer thread, so a frame wakes no sink thread.
    const ON_SCORER_THREAD: bool = true;

    /// Counts the batch's size and reads the clock its frames' ages are taken at: once per
    /// batch, not per frame.
    fn batch(&mut self, frames: usize) {
        self.counters.batch_frames.record(frames as u64);
        self.batch_wall = mqtt::epoch_secs();
    }

    /// Whether frame `meta` is of the stream that holds its slot now, starting that
    /// stream's state at its first frame. Frames come in order, so a newer generation of
    /// the slot than the sink knows is a new stream: the old one was forgotten (the sink
    /// lets go of it now if it had not yet heard so), and an older generation is a
    /// forgotten stream's frame, dropped and counted. Asked once per frame by the
    /// pipeline, before smoothing and retraining see it, and again by `accept`.
    fn admit(&mut self, meta: &FrameMeta) -> bool {
        let i = self.slot(meta.stream);
        let generation = meta.generation;
        if generation < self.generations[i] {
            return self.drop_stale(meta);
        }
        if generation > self.generations[i] {
            self.generations[i] = generation;
            self.let_go(i);
        }
        if self.per_stream[i].is_some() {
            return true;
        }
        // A stream's first frame (rare): its name, unless the source has given the slot to
        // a newer stream since. Then this stream was forgotten before the sink saw any of
        // its frames, and its name is gone with it.
        let (name, latest, topic) = self
            .streams
            .lock()
            .ok()
            .and_then(|s| {
                s.get(i)
                    .map(|n| (n.name.clone(), n.generation, n.topic.clone()))
            })
            .unwrap_or_else(|| (i.to_string(), generation, String::new()));
        if latest > generation {
            self.generations[i] = latest;
            return self.drop_stale(meta);
        }
        let alerts = AlertState::new(
            &self.alert_cfg,
            &name,
            &self.model_id,
            &self.model_version,
            self.features.clone(),
        );
        let examon = self.examon.as_ref().map(|d| d.identity(&topic));
        let gauge = self
            .counters
            .stream_gauges
            .register(&name, gauge_labels(examon.as_ref()));
        let score_topics = self
            .score_out
            .as_ref()
            .map(|out| out.topics(&name, examon.as_ref(), &self.model_id));
        self.per_stream[i] = Some(StreamState {
            threshold: self.template.clone(),
            alerts,
            sent: None,
            name,
            seen: true,
            last_seen: None,
            silent: false,
            gauge,
            shown: false,
            examon,
            score_topics,
            score_next: f64::NEG_INFINITY,
            score_last: f64::NEG_INFINITY,
        });
        // A new stream sets the gauges at once; the ticks set them too.
        self.set_gauges();
        true
    }

    fn accept(&mut self, f: &ScoredFrame) {
        if !self.admit(&f.meta) {
            return;
        }
        self.counters.frames_scored.fetch_add(1, Ordering::Relaxed);
        self.counters
            .scoring_latency
            .record(f.latency_ns as f64 * 1e-9);
        // A sender's clock ahead of this one gives a negative age, which is not recorded.
        self.counters
            .frame_age
            .record(self.batch_wall - f.meta.timestamp);
        if let Some(model) = self.retrain.as_mut().and_then(|r| r.before(f)) {
            self.switch_model(&model);
        }
        let i = f.meta.stream as usize;
        let Some(st) = self.per_stream[i].as_mut() else {
            return;
        };
        st.seen = true;
        // A transition or a stream back from silence (both rare) sets the gauges at once;
        // the ticks set them too.
        let mut changed = false;
        if st.silent {
            st.silent = false;
            changed = true;
            tracing::info!(
                stream = ?crate::ingest::clipped_name(&st.name),
                silent_secs = st.last_seen.map_or(0.0, |t| t.elapsed().as_secs_f64().round()),
                "a silent stream scores frames again"
            );
        }
        let t = st.threshold.threshold();
        // Two relaxed stores into the stream's own gauge: no lock, no allocation.
        if let Some(g) = &st.gauge {
            g.set(f64::from(f.score), t);
            if !st.shown {
                g.show(true);
                st.shown = true;
            }
        }
        // Its score out over MQTT, at most once per `[scores] interval_secs` of its event
        // time (a clock that went back starts the interval again): an Arc clone into a
        // bounded queue, no allocation, never a wait.
        if let (Some(out), Some(topics)) = (&self.score_out, &st.score_topics) {
            let ts = f.meta.timestamp;
            if ts >= st.score_next || ts < st.score_last {
                st.score_last = ts;
                st.score_next = ts + out.cfg.interval_secs;
                out.sender.send(mqtt::ScoreSample {
                    topics: topics.clone(),
                    score: f.score,
                    threshold: t,
                    timestamp: ts,
                });
            }
        }
        let alarm = st.threshold.update(f64::from(f.score)).is_alarm();
        let event = st.alerts.observe(&Observation::from_scored(f, t));
        let in_alert = st.alerts.in_alert();
        if event.is_some() {
            // A new episode's re-sends count from its firing; a resolved one has none.
            st.sent = None;
            changed = true;
        }
        if let Some(r) = self.retrain.as_mut() {
            r.after(f, alarm || in_alert);
        }
        if self.record {
            self.scores.push((f.meta.stream, f.meta.seq, f.score));
        }
        if let Some(event) = event {
            let name = event.stream.clone();
            self.publish(&name, event);
            if let Some(received) = f.meta.received_mono {
                let now = mqtt::monotonic_secs();
                self.counters.alert_latency.record(now - received);
            }
        }
        if changed {
            self.set_gauges();
        }
    }

    // Alerts are not ended in `finish`: the turn may end for a reload, which keeps them.
    // The agent calls `end_alerts` when it stops.

    fn tick(&mut self, now: Instant) {
        self.forget_retired();
        // Silence first: an alert it resolves is not re-sent.
        self.watch_silence(now);
        self.resend(now);
        self.set_gauges();
    }
}

/// The agent's per-frame sink on its own, **for tests only** (not part of the API, hidden
/// from the docs): `tests/hot_path_alloc.rs` runs its `accept` per frame under a counting
/// allocator. It is built as [`run_with`] builds the sink: thresholds from the model's
/// calibration, `[alert]` for this node, per-stream gauges when `[metrics] per_stream` is
/// on (without serving `/metrics`), and `[scores]` into a score queue when `publish` is
/// on; no MQTT client, no online retraining, nothing recorded. The agent itself does not
/// use it.
#[doc(hidden)]
pub struct SinkProbe {
    sink: AgentSink,
    /// The agent's counters, as `/metrics` would read them.
    pub counters: Arc<AgentCounters>,
    /// The score queue's counters (`scores_dropped`).
    pub mqtt: Arc<MqttStats>,
    /// The alerts the sink publishes, as the MQTT client would take them.
    pub alerts: mqtt::OutgoingReceiver,
    /// The MQTT client's end of the score queue (held, never drained).
    pub scores: Option<mqtt::ScoreReceiver>,
}

impl SinkProbe {
    /// A sink for `model` under `cfg`, its slots 0, 1… holding `streams` (name and the
    /// topic of its first message, which an ExaMon stream's identity is read from).
    ///
    /// # Errors
    /// A threshold the model's calibration cannot build.
    pub fn new(
        cfg: &DarkwatchConfig,
        model: &Detector,
        streams: &[(&str, &str)],
    ) -> Result<SinkProbe, AgentError> {
        let counters = Arc::<AgentCounters>::default();
        counters.stream_gauges.enable(cfg.metrics.per_stream);
        let names: Vec<SlotName> = streams
            .iter()
            .map(|(name, topic)| SlotName {
                name: (*name).to_string(),
                generation: 0,
                topic: (*topic).to_string(),
            })
            .collect();
        let (out, alerts) = mqtt::outgoing_channel();
        let mut sink = AgentSink::new(
            cfg,
            model,
            Arc::new(Mutex::new(names)),
            &cfg.mqtt,
            out,
            &counters,
            false,
        )?;
        let stats = Arc::new(MqttStats::default());
        let mut scores = None;
        if cfg.scores.publish {
            let (tx, rx) = mqtt::score_channel(&cfg.scores, stats.clone());
            sink.score_out = Some(ScoreOut {
                cfg: cfg.scores.clone(),
                node: cfg.mqtt.node(),
                sender: tx,
            });
            scores = Some(rx);
        }
        Ok(SinkProbe {
            sink,
            counters,
            mqtt: stats,
            alerts,
            scores,
        })
    }

    /// What the scorer thread calls once per micro-batch before its frames.
    pub fn batch(&mut self, frames: usize) {
        self.sink.batch(frames);
    }

    /// What the scorer thread calls per frame.
    pub fn accept(&mut self, f: &ScoredFrame) {
        self.sink.accept(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A raw decoder for frames of `width` values on `filter`, tracking at most
    /// `max_streams` streams.
    fn raw_decoder(
        cfg: &DarkwatchConfig,
        width: usize,
        filter: &str,
        max_streams: usize,
    ) -> Decoder {
        Decoder::Raw {
            decoder: cfg.raw.build_for(width, &[filter.to_string()]),
            frame: Vec::new(),
            streams: Default::default(),
            max_streams,
            ids_unused: 0,
            times_ahead: 0,
            live_skip: None,
        }
    }

    fn source(window_secs: f64) -> AgentSource {
        let mut cfg = DarkwatchConfig::default();
        cfg.assemble.window_secs = window_secs;
        source_with(&cfg)
    }

    fn source_with(cfg: &DarkwatchConfig) -> AgentSource {
        let features: Vec<String> = vec!["a".into(), "b".into()];
        AgentSource {
            own_topics: crate::mqtt::OwnTopics::default(),
            decoder: Decoder::Examon(cfg.examon.build()),
            assembler: cfg.assemble.build(features).unwrap(),
            streams: Arc::default(),
            counters: Arc::default(),
            known_streams: 0,
            feature_names: vec!["a".into(), "b".into()],
            windows: crate::window::StreamWindows::new(1, 2, f64::INFINITY),
            recycling: SharedRecycling::default(),
            forget_after_secs: cfg.assemble.forget_after_secs,
            next_forget_check: f64::NEG_INFINITY,
            forgotten_names: Default::default(),
            max_streams: cfg.assemble.max_streams,
            log_from: LogCounts::now(&AgentCounters::default()),
        }
    }

    impl AgentSource {
        fn take_one(&mut self, m: &Incoming) {
            self.take(&m.as_received(), None);
        }
    }

    fn msg(node: &str, metric: &str, value: f64, ts: f64) -> Incoming {
        Incoming {
            topic: format!("org/o/cluster/c/node/{node}/plugin/p/chnl/data/{metric}"),
            payload: format!("{value};{ts}").into_bytes(),
            received: ts,
            received_mono: ts,
        }
    }

    /// What `f` logs at WARN and above on this thread, as plain text.
    fn logged(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = buf.0.lock().unwrap().clone();
        String::from_utf8(text).unwrap()
    }

    fn lines_with<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
        log.lines().filter(|l| l.contains(needle)).collect()
    }

    /// A stream not keyed by node is no one node's: the template topic, not the ExaMon
    /// topic of the node its first message came from.
    #[test]
    fn score_topics_use_the_examon_layout_only_for_streams_keyed_by_node() {
        let cfg = crate::mqtt::ScoresConfig {
            metrics: vec!["anomaly_score".into()],
            ..Default::default()
        };
        let (sender, _rx) = mqtt::score_channel(&cfg, Arc::default());
        let out = ScoreOut {
            cfg,
            node: "agent1".into(),
            sender,
        };
        let topic = "org/o/cluster/c1/node/n7/plugin/pmu/chnl/data/load";
        let id_for = |keys: &[&str]| {
            let examon = crate::ingest::examon::ExamonConfig {
                stream_key: keys.iter().map(|k| k.to_string()).collect(),
                ..Default::default()
            };
            examon.build().identity(topic)
        };
        let by_cluster = out.topics("c1", Some(&id_for(&["cluster"])), "m1");
        assert_eq!(
            by_cluster.topics[0].as_deref(),
            Some("darkwatch/agent1/scores/c1/anomaly_score")
        );
        let by_node = out.topics("c1/n7", Some(&id_for(&["cluster", "node"])), "m1");
        assert_eq!(
            by_node.topics[0].as_deref(),
            Some("org/o/cluster/c1/node/n7/plugin/examon-ai_pub/chnl/data/model/m1/anomaly_score")
        );
    }
    /// Frames dropped at a full ring were only in the stop summary (the trial: 787 frames
    /// dropped, no line while it ran). Each check that sees new drops counts; the 1st,
    /// 2nd, 4th… such check warns with the drops since the last warning and in all.
    #[test]
    fn ring_drops_are_warned_while_they_happen_at_powers_of_two_of_the_checks() {
        let counters = AgentCounters::default();
        counters.frames_dropped.store(5, Ordering::Relaxed);
        let mut watch = RingDropWatch::new(&counters, 4096);
        let mut warned = Vec::new();
        let log = logged(|| {
            // No new drop: nothing to say (the 5 came before the watch).
            warned.push(watch.check(&counters));
            for dropped in [12, 12, 20, 33, 40, 41, 41, 50] {
                counters.frames_dropped.store(dropped, Ordering::Relaxed);
                warned.push(watch.check(&counters));
            }
        });
        // Checks that saw drops: 12 (1st), 20 (2nd), 33 (3rd), 40 (4th), 41, 50 (6th).
        assert_eq!(
            warned,
            [false, true, false, true, false, true, false, false, false]
        );
        let lines = lines_with(&log, "Frames were dropped");
        assert_eq!(lines.len(), 3, "{log}");
        assert!(lines[0].contains("dropped=7") && lines[0].contains("dropped_in_all=12"));
        assert!(lines[1].contains("dropped=8") && lines[1].contains("dropped_in_all=20"));
        assert!(lines[2].contains("dropped=20") && lines[2].contains("dropped_in_all=40"));
        assert!(
            lines[0].contains("WARN")
                && lines[0].contains("ring_capacity_frames=4096")
                && lines[0].contains("darkwatch_frames_dropped_total"),
            "{}",
            lines[0]
        );
    }

    /// Every refused message or sample is logged at the 1st, 2nd, 4th, 8th… refusal of its
    /// reason, with the topic, the reason, the counter and what to do. They used to be
    /// counted only: a raw sender with frames of the wrong width lost every frame, and an
    /// out-of-order sender most of its samples to `late`, without a line in the log.
    #[test]
    fn refused_input_is_logged_with_its_topic_counter_and_what_to_do() {
        let mut src = source(1.0);
        let log = logged(|| {
            // Window 1003 closes windows before 1002 ([assemble] lateness_windows = 1): an
            // out-of-order sample for 1000 is late, by 1.5 s.
            src.take_one(&msg("n1", "a", 1.0, 1000.0));
            src.take_one(&msg("n1", "a", 1.0, 1003.0));
            for _ in 0..3 {
                src.take_one(&msg("n1", "b", 1.0, 1000.5));
            }
            src.take_one(&Incoming {
                payload: b"warm;1000".to_vec(),
                ..msg("n1", "a", 0.0, 1003.0)
            });
        });
        let late = lines_with(&log, "reason=\"late\"");
        assert_eq!(late.len(), 2, "the 1st and 2nd of 3: {log}");
        for needle in [
            "WARN",
            // The whole topic: the metric is its last level.
            "topic=\"org/o/cluster/c/node/n1/plugin/p/chnl/data/b\"",
            "stream=\"n1\"",
            "came 1.500 s before",
            "darkwatch_samples_rejected_total{reason=\"late\"}",
            "window_secs = 1 and lateness_windows = 1",
            "raise [assemble] lateness_windows",
        ] {
            assert!(late[0].contains(needle), "{needle}: {}", late[0]);
        }
        let text = lines_with(&log, "reason=\"non_numeric\"");
        assert_eq!(text.len(), 1, "{log}");
        assert!(
            text[0].contains("\"warm\" is not a number")
                && text[0].contains("darkwatch_messages_rejected_total{reason=\"non_numeric\"}")
                && text[0].contains("[agent] format = \"examon\""),
            "{}",
            text[0]
        );

        // A raw sender whose frames are one value wider than the model's.
        src.decoder = raw_decoder(&DarkwatchConfig::default(), 2, "act/+", 4);
        let wide: Vec<u8> = [1.0f32, 2.0, 3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let log = logged(|| {
            for _ in 0..4 {
                src.take_one(&Incoming {
                    topic: "act/layer3".into(),
                    payload: wide.clone(),
                    received: 5.0,
                    received_mono: 5.0,
                });
            }
        });
        let wrong = lines_with(&log, "reason=\"wrong_length\"");
        assert_eq!(wrong.len(), 3, "the 1st, 2nd and 4th: {log}");
        assert!(
            wrong[2].contains("topic=\"act/layer3\"")
                && wrong[2].contains("rejected=4")
                && wrong[2].contains("frames of 2 values (8 bytes")
                && wrong[2].contains("this sender's messages are 3 values: send whole frames"),
            "{}",
            wrong[2]
        );
        assert_eq!(
            src.counters.decode_errors_by_reason[DecodeError::WrongLength {
                expected: 0,
                got: 0
            }
            .reason_index()]
            .load(Ordering::Relaxed),
            4
        );
    }

    /// The trial: with ExaMon input an unknown metric's warning said "Telegraf metrics are
    /// named <measurement>.<field>". Each format now gives its own naming.
    #[test]
    fn an_unknown_metric_is_logged_with_the_naming_of_its_input_format() {
        let mut src = source(1.0);
        let log = logged(|| src.take_one(&msg("n2", "bogus", 1.0, 1000.0)));
        let lines = lines_with(&log, "metric=\"bogus\"");
        assert_eq!(lines.len(), 1, "{log}");
        assert!(
            lines[0].contains("stream=\"n2\"")
                && lines[0].contains("reason=\"unknown_metric\"")
                && lines[0].contains("An ExaMon sample's metric is its topic's last level")
                && !lines[0].contains("Telegraf"),
            "{}",
            lines[0]
        );
        src.decoder = Decoder::Telegraf(DarkwatchConfig::default().telegraf.build());
        let json = br#"{"name":"m","tags":{"host":"n1"},"fields":{"zz":1.5},"timestamp":1000}"#;
        let log = logged(|| {
            src.take_one(&Incoming {
                topic: "telegraf/n1".into(),
                payload: json.to_vec(),
                received: 1000.0,
                received_mono: 1000.0,
            })
        });
        // The second unknown metric of this source: logged (1st, 2nd, 4th…).
        let lines = lines_with(&log, "metric=\"m.zz\"");
        assert_eq!(lines.len(), 1, "{log}");
        assert!(
            lines[0].contains("Telegraf metrics are named <measurement>.<field>")
                && !lines[0].contains("ExaMon"),
            "{}",
            lines[0]
        );
    }

    /// The trial: Telegraf's `cpu` input sends cpu-total and every core as `cpu.usage_user`
    /// of one host, and the assembler averaged them into one feature without a word (a +4
    /// on cpu1 alerted as `cpu.usage_user`). Two tag sets of one feature are now logged
    /// once, with both tag sets and the remedy; one tag set, however often, is not; nor
    /// are two ExaMon topics once their levels are kept in the names.
    #[test]
    fn two_tag_sets_or_topics_merged_into_one_feature_are_logged_once() {
        let mut src = source(1.0);
        src.decoder = Decoder::Telegraf(DarkwatchConfig::default().telegraf.build());
        src.assembler = DarkwatchConfig::default()
            .assemble
            .build(vec!["m.a".into(), "m.b".into()])
            .unwrap();
        let line = |cpu: &str, t: u64| Incoming {
            topic: "telegraf/n1".into(),
            payload: format!("m,cpu={cpu},host=n1 a=1,b=2 {t}").into_bytes(),
            received: t as f64,
            received_mono: t as f64,
        };
        let log = logged(|| {
            for t in 1000..1010 {
                src.take_one(&line("cpu-total", t));
            }
        });
        assert!(lines_with(&log, "two series").is_empty(), "{log}");
        let log = logged(|| {
            for t in 1010..1020 {
                src.take_one(&line("cpu-total", t));
                src.take_one(&line("cpu1", t));
            }
        });
        // Once per feature (m.a, m.b), naming both tag sets and the remedy.
        let lines = lines_with(&log, "two series");
        assert_eq!(lines.len(), 2, "{log}");
        for l in &lines {
            assert!(
                l.contains("cpu=cpu-total,host=n1")
                    && l.contains("cpu=cpu1,host=n1")
                    && l.contains("stream=\"n1\"")
                    && l.contains("name_tags = [\\\"cpu\\\"]")
                    && l.contains("percpu = false"),
                "{l}"
            );
        }
        assert!(lines[0].contains("metric=\"m.a\"") || lines[1].contains("metric=\"m.a\""));

        // ExaMon: two topics of one metric name; none once the core level is kept.
        let topic = |core: u32| format!("org/o/node/n1/plugin/p/chnl/data/core/{core}/a");
        let examon = |src: &mut AgentSource| {
            logged(|| {
                for t in 1000..1010 {
                    for core in 0..2 {
                        src.take_one(&Incoming {
                            topic: topic(core),
                            payload: format!("1;{t}").into_bytes(),
                            received: t as f64,
                            received_mono: t as f64,
                        });
                    }
                }
            })
        };
        let log = examon(&mut source(1.0));
        let lines = lines_with(&log, "two series");
        assert_eq!(lines.len(), 1, "{log}");
        assert!(
            lines[0].contains(&topic(0))
                && lines[0].contains(&topic(1))
                && lines[0].contains("metric_levels"),
            "{}",
            lines[0]
        );
        let mut cfg = DarkwatchConfig::default();
        cfg.examon.metric_levels = 3;
        let mut src = source_with(&cfg);
        src.assembler = cfg
            .assemble
            .build(vec!["core/0/a".into(), "core/1/a".into()])
            .unwrap();
        let log = examon(&mut src);
        assert!(lines_with(&log, "two series").is_empty(), "{log}");
        assert_eq!(src.assembler.counters().unknown_metric, 0);
    }

    /// The trial: frames of half or twice the model's bytes were logged as "this sender's
    /// are 32 values" (or 128) with no hint that they are float16 or float64 frames of the
    /// right width. Since a message may hold several frames, twice a frame is two frames:
    /// float64 is told where its values are refused as non-finite instead (values computed
    /// in float64; widened ones read as finite float32 and are not told at all).
    #[test]
    fn a_raw_frame_of_half_or_twice_the_bytes_is_told_as_float16_or_float64() {
        let raw = |payload: Vec<u8>| {
            let mut src = source(1.0);
            src.decoder = raw_decoder(&DarkwatchConfig::default(), 64, "act/+", 4);
            let log = logged(|| {
                src.take_one(&Incoming {
                    topic: "act/l6".into(),
                    payload,
                    received: 5.0,
                    received_mono: 5.0,
                })
            });
            lines_with(&log, "reason=\"wrong_length\"").concat()
        };
        let half = raw(vec![0; 128]);
        assert!(
            half.contains("frames of 64 values (256 bytes")
                && half.contains("this sender's messages are 32 values, exactly half the bytes")
                && half.contains("64 float16 (or bfloat16) values")
                && half.contains("astype"),
            "{half}"
        );
        // Three float16 frames: a frame and a half of float32.
        let odd = raw(vec![0; 384]);
        assert!(
            odd.contains("this sender's messages are 96 values, an odd number of half frames")
                && odd.contains("frames of 64 float16"),
            "{odd}"
        );
        // Twice a frame's bytes are two frames now (float64 is not told by length).
        assert_eq!(raw(vec![0; 512]), "");
        // Behind a header, the frames' own length counts.
        let mut headed = crate::ingest::raw::HEADER_MAGIC.to_vec();
        headed.extend_from_slice(&[0; 16]);
        headed.extend_from_slice(&[0; 128]);
        assert!(raw(headed).contains("exactly half the bytes"));
        let other = raw(vec![0; 12]);
        assert!(
            other.contains("this sender's messages are 3 values: send whole frames")
                && !other.contains("float16")
                && !other.contains("float64"),
            "{other}"
        );
    }

    /// A review: after a SIGHUP that changed the model's width, a sender of the old width
    /// was logged at the next power of two of the process's total refusals (the 1,024th,
    /// say), so the float16 or float64 hint could stay unsaid for a long time. A new source (what such
    /// a reload makes) logs its own 1st, 2nd, 4th… refusal; the exported counter goes on.
    #[test]
    fn a_reloaded_source_logs_its_first_refusal_whatever_came_before() {
        let wrong_length = DecodeError::WrongLength {
            expected: 0,
            got: 0,
        }
        .reason_index();
        let counters = Arc::new(AgentCounters::default());
        counters.decode_errors_by_reason[wrong_length].store(1000, Ordering::Relaxed);
        let wide = |src: &mut AgentSource| {
            src.decoder = raw_decoder(&DarkwatchConfig::default(), 64, "act/+", 4);
            logged(|| {
                src.take_one(&Incoming {
                    topic: "act/l6".into(),
                    payload: vec![0; 128],
                    received: 5.0,
                    received_mono: 5.0,
                })
            })
        };
        // A source that started before those 1,000 refusals: the 1,001st is not logged.
        let mut old = source(1.0);
        old.counters = counters.clone();
        let log = wide(&mut old);
        assert!(
            lines_with(&log, "reason=\"wrong_length\"").is_empty(),
            "{log}"
        );
        // One made after them, as a reload makes it: its first is, with the hint.
        let mut fresh = source(1.0);
        fresh.counters = counters.clone();
        fresh.log_from = LogCounts::now(&counters);
        let log = wide(&mut fresh);
        let lines = lines_with(&log, "reason=\"wrong_length\"");
        assert_eq!(lines.len(), 1, "{log}");
        assert!(
            lines[0].contains("64 float16 (or bfloat16) values") && lines[0].contains("rejected=1"),
            "{}",
            lines[0]
        );
        assert_eq!(
            counters.decode_errors_by_reason[wrong_length].load(Ordering::Relaxed),
            1002
        );
    }

    /// A raw frame's header time is its event time (so the alert's `startsAt`), and its
    /// id its `seq` while ids rise within the stream; otherwise the stream's count goes on,
    /// and the first unused id is logged.
    #[test]
    fn a_raw_header_gives_the_frame_its_time_and_seq() {
        use crate::ring::{FullPolicy, frame_ring};
        let mut src = source(1.0);
        src.decoder = raw_decoder(&DarkwatchConfig::default(), 2, "act/#", 4);
        let headed = |time: f64, id: u64| {
            let mut p = crate::ingest::raw::HEADER_MAGIC.to_vec();
            p.extend_from_slice(&time.to_le_bytes());
            p.extend_from_slice(&id.to_le_bytes());
            p.extend(raw_frame(1.0));
            p
        };
        let (mut producer, mut consumer) = frame_ring(16, 2, FullPolicy::DropNewest);
        let clock = Clock::new();
        let log = logged(|| {
            for (topic, payload) in [
                ("act/m/a", headed(1_700_000_000.5, 100)),
                ("act/m/a", headed(1_700_000_001.5, 105)),
                ("act/m/a", raw_frame(1.0)),
                ("act/m/a", headed(0.0, 3)),
                ("act/m/b", headed(0.0, 3)),
                ("act/m/a", headed(0.0, 1 << 60)),
                // More than 300 s ahead of its receipt: scored at the receipt.
                ("act/m/c", headed(1_700_000_009.0 + 300.5, 1)),
            ] {
                let m = Incoming {
                    topic: topic.into(),
                    payload,
                    received: 1_700_000_009.0,
                    received_mono: 9.0,
                };
                src.take(&m.as_received(), Some((&mut producer, &clock)));
            }
        });
        let mut metas = [FrameMeta::default(); 8];
        let mut values = [0.0f32; 16];
        assert_eq!(consumer.pop_batch(&mut metas, &mut values), 7);
        let got: Vec<(u32, u64, f64)> = metas[..7]
            .iter()
            .map(|m| (m.stream, m.seq, m.timestamp))
            .collect();
        assert_eq!(
            got,
            [
                (0, 100, 1_700_000_000.5),
                (0, 105, 1_700_000_001.5),
                (0, 106, 1_700_000_009.0),
                (0, 107, 1_700_000_009.0),
                (1, 3, 1_700_000_009.0),
                (0, 108, 1_700_000_009.0),
                (2, 1, 1_700_000_009.0),
            ]
        );
        assert_eq!(*src.streams.lock().unwrap(), ["m/a", "m/b", "m/c"]);
        assert_eq!(
            lines_with(&log, "header time is more than 300 s after").len(),
            1,
            "{log}"
        );
        let unused = lines_with(&log, "header id");
        assert_eq!(unused.len(), 2, "the 1st and 2nd: {log}");
        assert!(
            unused[0].contains("id=3") && unused[0].contains("seq=107"),
            "{log}"
        );
        // Three ids in a row not taken (3, 2^60, 5): the third is taken again, a restarted
        // sender's ids count. One corrupt id that jumps ahead costs three frames' ids.
        for id in [5, 6, 1_000_000, 7, 8, 9, 10] {
            let m = Incoming {
                topic: "act/m/a".into(),
                payload: headed(0.0, id),
                received: 9.0,
                received_mono: 9.0,
            };
            src.take(&m.as_received(), Some((&mut producer, &clock)));
        }
        let mut metas = [FrameMeta::default(); 8];
        assert_eq!(consumer.pop_batch(&mut metas, &mut values), 7);
        let seqs: Vec<u64> = metas[..7].iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [5, 6, 1_000_000, 1_000_001, 1_000_002, 9, 10]);
    }

    /// An incomplete frame is counted and logged once, by the agent, and not handed to the
    /// scorer: it used to go on, and the scorer logged it a second time as "Frames with a
    /// NaN or infinite value skipped", as if NaN data had arrived.
    #[test]
    fn an_incomplete_frame_is_logged_once_and_not_handed_to_the_scorer() {
        use crate::ring::{FullPolicy, frame_ring};
        let mut src = source(1.0);
        let (mut producer, mut consumer) = frame_ring(4, 2, FullPolicy::DropNewest);
        let clock = Clock::new();
        let log = logged(|| {
            // Window 1000 has only `a`, and `b` has no earlier value to carry forward.
            src.take_one(&msg("n1", "a", 1.0, 1000.2));
            src.take_one(&msg("n1", "a", 2.0, 1001.2));
            src.take_one(&msg("n1", "b", 2.0, 1001.3));
            src.take_one(&msg("n1", "a", 3.0, 1002.2));
            src.take_one(&msg("n1", "b", 3.0, 1002.3));
            assert_eq!(src.emit(&mut producer, &clock, None), 2);
        });
        let counters = &src.counters;
        assert_eq!(counters.frames.load(Ordering::Relaxed), 3);
        assert_eq!(counters.frames_incomplete.load(Ordering::Relaxed), 1);
        assert_eq!(counters.frames_queued.load(Ordering::Relaxed), 2);
        assert_eq!(lines_with(&log, "incomplete").len(), 1, "{log}");
        assert!(log.contains("missing=b"), "{log}");
        let mut metas = [FrameMeta::default(); 4];
        let mut values = [0.0f32; 8];
        assert_eq!(consumer.pop_batch(&mut metas, &mut values), 2);
        assert_eq!(values[..4], [2.0, 2.0, 3.0, 3.0]);
        assert_eq!((metas[0].seq, metas[1].seq), (1, 2));
    }

    /// The trial's broken1: a node that sends samples but never one of the model's
    /// metrics was in neither darkwatch_streams nor darkwatch_streams_silent, and its
    /// missing metric was never logged once another node's incomplete frames had taken
    /// the 1st, 2nd, 4th… Now it counts in darkwatch_streams_incomplete and each such
    /// stream is named with what it lacks.
    #[test]
    fn a_node_that_never_sends_a_metric_is_counted_and_named() {
        use crate::ring::{FullPolicy, frame_ring};
        let mut src = source(1.0);
        let (mut producer, _consumer) = frame_ring(64, 2, FullPolicy::DropNewest);
        let clock = Clock::new();
        let log = logged(|| {
            for w in 0..20 {
                let t = 1000.0 + f64::from(w) + 0.5;
                src.take_one(&msg("ok1", "a", 1.0, t));
                src.take_one(&msg("ok1", "b", 1.0, t));
                // n3 lacks b from the start, n4 from window 10 (after stale_secs).
                src.take_one(&msg("n3", "a", 1.0, t));
                src.take_one(&msg("n4", "a", 1.0, t));
                if w < 10 {
                    src.take_one(&msg("n4", "b", 1.0, t));
                }
                src.emit(&mut producer, &clock, Some(t));
            }
        });
        assert_eq!(src.counters.streams_incomplete.load(Ordering::Relaxed), 2);
        let named = lines_with(&log, "sends samples but its last 5 frames");
        assert_eq!(named.len(), 2, "{log}");
        assert!(
            named[0].contains("stream=\"n3\"") && named[0].contains("missing=b"),
            "{log}"
        );
        assert!(
            named[1].contains("stream=\"n4\"") && named[1].contains("missing=b"),
            "{log}"
        );
        assert!(named[0].contains("darkwatch_streams_incomplete"), "{log}");
        // A complete frame takes n3 out of the count.
        for t in [1020.5, 1021.5] {
            src.take_one(&msg("n3", "a", 1.0, t));
            src.take_one(&msg("n3", "b", 1.0, t));
        }
        src.emit(&mut producer, &clock, Some(1023.0));
        assert_eq!(src.counters.streams_incomplete.load(Ordering::Relaxed), 1);
    }

    /// Many streams turning incomplete (or silent) at once give one line with their number
    /// and the first few names, not a line each.
    #[test]
    fn many_streams_at_once_are_one_line() {
        use crate::ring::{FullPolicy, frame_ring};
        let mut src = source(1.0);
        let (mut producer, _consumer) = frame_ring(1024, 2, FullPolicy::DropNewest);
        let clock = Clock::new();
        let log = logged(|| {
            for w in 0..8 {
                let t = 1000.0 + f64::from(w) + 0.5;
                for n in 0..30 {
                    src.take_one(&msg(&format!("n{n:02}"), "a", 1.0, t));
                }
            }
            src.emit(&mut producer, &clock, Some(1010.0));
        });
        let lines = lines_with(&log, "samples but");
        assert_eq!(lines.len(), 1, "{log}");
        assert!(
            lines[0].contains("30 streams")
                && lines[0].contains("first=\"n00\",\"n01\",\"n02\",\"n03\",\"n04\" ")
                && lines[0].contains("missing=b"),
            "{log}"
        );
        assert_eq!(src.counters.streams_incomplete.load(Ordering::Relaxed), 30);

        let silent = |n: usize| -> Vec<(String, f64, bool)> {
            (0..n)
                .map(|i| (format!("\"s{i}\""), 300.0, i == 0))
                .collect()
        };
        let log = logged(|| log_silenced(&silent(300)));
        assert_eq!(log.lines().count(), 1, "{log}");
        assert!(
            log.contains("300 streams at once scored no frame")
                && log.contains("first=\"s0\",\"s1\",\"s2\",\"s3\",\"s4\" ")
                && log.contains("alerts_resolved=1"),
            "{log}"
        );
        let log = logged(|| log_silenced(&silent(2)));
        assert_eq!(
            lines_with(&log, "a stream scored no frame").len(),
            2,
            "{log}"
        );
    }

    /// One node's refused samples used to hide another's: the 1st, 2nd, 4th… counted per
    /// reason over all streams, so n4's unknown metric after n3's 20 went unlogged. Each
    /// tracked stream's first refusal of a reason is logged too.
    #[test]
    fn each_streams_first_refusal_of_a_reason_is_logged() {
        let mut src = source(1.0);
        let log = logged(|| {
            for i in 0..20 {
                let t = 1000.0 + f64::from(i) * 0.01;
                src.take_one(&msg("n3", "a", 1.0, t));
                src.take_one(&msg("n3", "x", 1.0, t));
            }
            src.take_one(&msg("n4", "a", 1.0, 1000.5));
            src.take_one(&msg("n4", "y", 1.0, 1000.5));
            src.take_one(&msg("n4", "y", 1.0, 1000.6));
        });
        let unknown = lines_with(&log, "not one of the model's features");
        // n3: the 1st, 2nd, 4th, 8th, 16th; n4: its first (the 21st) only.
        assert_eq!(unknown.len(), 6, "{log}");
        assert!(
            unknown[5].contains("stream=\"n4\"") && unknown[5].contains("metric=\"y\""),
            "{log}"
        );
    }

    /// With [examon] stream_key = ["cluster", "node"], same-named nodes of two clusters are
    /// two streams; with the default they are one, and the merge warning now says to name
    /// streams by the cluster too (it used to point at metric_levels, which cannot help).
    #[test]
    fn same_named_nodes_of_two_clusters_are_two_streams_by_cluster_and_node() {
        let take = |src: &mut AgentSource| {
            logged(|| {
                for i in 0..5 {
                    let t = 1000.0 + f64::from(i);
                    for cluster in ["c1", "c2"] {
                        for m in ["a", "b"] {
                            src.take_one(&Incoming {
                                topic: format!(
                                    "org/o/cluster/{cluster}/node/dupnode/plugin/p/chnl/data/{m}"
                                ),
                                payload: format!("1;{t}").into_bytes(),
                                received: t,
                                received_mono: t,
                            });
                        }
                    }
                }
            })
        };
        let mut merged = source(1.0);
        let log = take(&mut merged);
        assert_eq!(merged.assembler.stream_count(), 1);
        let warn = lines_with(&log, "two series");
        assert!(!warn.is_empty(), "{log}");
        assert!(
            warn[0].contains(r#"stream_key = [\"cluster\", \"node\"]"#)
                && !warn[0].contains("metric_levels"),
            "{log}"
        );
        let mut cfg = DarkwatchConfig::default();
        cfg.examon.stream_key = vec!["cluster".into(), "node".into()];
        let mut apart = source_with(&cfg);
        let log = take(&mut apart);
        assert_eq!(apart.assembler.stream_count(), 2);
        assert!(apart.assembler.index_of("c1/dupnode").is_some());
        assert!(apart.assembler.index_of("c2/dupnode").is_some());
        assert!(lines_with(&log, "two series").is_empty(), "{log}");
    }

    /// An agent that has received nothing at all a while after its start says where it
    /// listens, once; one that has received something never does.
    #[test]
    fn an_agent_that_receives_nothing_says_where_it_listens_once() {
        let mut cfg = DarkwatchConfig::default().mqtt;
        cfg.node_name = "n7".into();
        let mut quiet = NoInput::new(&cfg);
        assert_eq!(quiet.after, NO_INPUT_WARN_AFTER);
        quiet.after = Duration::ZERO;
        let log = logged(|| {
            assert!(quiet.check(0));
            assert!(!quiet.check(0));
        });
        assert_eq!(log.lines().count(), 1, "{log}");
        assert!(
            log.contains("No MQTT message has arrived")
                && log.contains("broker=embedded on 127.0.0.1:1883")
                && log.contains("subscribe=org/+/cluster/+/node/n7/plugin/+/chnl/data/#"),
            "{log}"
        );
        let mut fed = NoInput::new(&cfg);
        fed.after = Duration::ZERO;
        assert!(!fed.check(1));
        assert!(!fed.check(0));
    }

    #[test]
    fn alert_events_are_counted_in_words_with_plurals() {
        let c = AgentCounters::default();
        assert_eq!(
            c.alert_events_text(),
            "0 alert events (0 firing, 0 resolved), 0 re-sends"
        );
        c.alerts_firing.store(1, Ordering::Relaxed);
        assert_eq!(
            c.alert_events_text(),
            "1 alert event (1 firing, 0 resolved), 0 re-sends"
        );
        c.alerts_resolved.store(1, Ordering::Relaxed);
        c.alerts_resent.store(1, Ordering::Relaxed);
        assert_eq!(
            c.alert_events_text(),
            "2 alert events (1 firing, 1 resolved), 1 re-send"
        );
    }

    #[test]
    fn latency_buckets_count_and_bound_quantiles() {
        let b = LatencyBuckets::default();
        assert!(b.quantile_upper(0.5).is_nan());
        for _ in 0..98 {
            b.record(0.0003); // in the 0.5 ms bucket
        }
        b.record(0.004); // 5 ms bucket
        b.record(1.7); // an assembled frame that waited for the next 1 s window
        b.record(100.0); // past the last bound
        b.record(-1.0); // a clock step: ignored
        b.record(f64::NAN);
        assert_eq!(b.count(), 101);
        assert_eq!(b.quantile_upper(0.5), 5e-4);
        assert_eq!(b.quantile_upper(0.98), 5e-3);
        assert_eq!(b.quantile_upper(0.99), 2.5);
        assert_eq!(b.quantile_upper(1.0), f64::INFINITY);
    }

    #[test]
    fn a_sender_with_a_fast_clock_does_not_make_other_streams_late() {
        let mut src = source(1.0);
        src.take_one(&msg("n1", "a", 1.0, 1000.0));
        // An unknown metric is rejected.
        src.take_one(&msg("other", "zzz", 1.0, 5000.0));
        assert_eq!(src.counters.samples_rejected(), 1);
        // A node 3 s ahead lands in its own stream...
        src.take_one(&msg("n2", "a", 1.0, 1003.0));
        // ...and one stamped far after its receipt is refused as `future`.
        src.take_one(&Incoming {
            received: 1000.0,
            received_mono: 1000.0,
            ..msg("n3", "a", 1.0, 1e9)
        });
        assert_eq!(
            src.counters.samples_rejected_by_reason[Reject::Future.reason_index()]
                .load(Ordering::Relaxed),
            1
        );
        // ...and closing quiet windows now does not close n1's: its next samples land.
        let mut closed = Vec::new();
        src.assembler
            .poll_streams(1000.5, &mut |f| closed.push(f.stream.to_string()));
        assert!(!closed.contains(&"n1".to_string()), "{closed:?}");
        src.take_one(&msg("n1", "b", 1.0, 1000.5));
        src.take_one(&msg("n1", "a", 1.0, 1001.2));
        assert_eq!(src.counters.samples_rejected(), 2);
        // Garbage is counted, never a panic.
        src.take_one(&Incoming {
            topic: "nonsense".into(),
            payload: vec![0xff; 3],
            received: 0.0,
            received_mono: 0.0,
        });
        assert_eq!(src.counters.decode_errors(), 1);
        assert_eq!(src.counters.messages.load(Ordering::Relaxed), 7);
    }

    #[test]
    fn telegraf_and_raw_inputs_reach_the_assembler_and_the_ring() {
        let mut src = source(1.0);
        src.decoder = Decoder::Telegraf(DarkwatchConfig::default().telegraf.build());
        // A JSON batch naming fields m.a and m.b: unknown to a model of "a", "b", so they are
        // decoded (no decode error) and then rejected by the assembler, counted apart.
        let json =
            br#"{"name":"m","tags":{"host":"n1"},"fields":{"a":1.5,"b":2},"timestamp":1000}"#;
        src.take_one(&Incoming {
            topic: "telegraf/n1".into(),
            payload: json.to_vec(),
            received: 1000.0,
            received_mono: 1000.0,
        });
        assert_eq!(src.counters.decode_errors(), 0);
        assert_eq!(src.counters.samples_rejected(), 2);
        src.take_one(&Incoming {
            topic: "telegraf/n1".into(),
            payload: b"{not json".to_vec(),
            received: 1000.0,
            received_mono: 1000.0,
        });
        assert!(src.counters.decode_errors() >= 1);

        // Raw frames of the model's width become frames at once, one stream per topic.
        let cfg = DarkwatchConfig::default();
        src.decoder = raw_decoder(&cfg, 2, "act/+", 2);
        let frame: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        for topic in ["act/layer3", "act/layer3", "act/layer7"] {
            src.take_one(&Incoming {
                topic: topic.into(),
                payload: frame.clone(),
                received: 5.0,
                received_mono: 5.0,
            });
        }
        assert_eq!(src.counters.frames.load(Ordering::Relaxed), 3);
        assert_eq!(
            *src.streams.lock().unwrap(),
            vec!["layer3".to_string(), "layer7".to_string()]
        );
        src.take_one(&Incoming {
            topic: "act/layer3".into(),
            payload: vec![0; 5],
            received: 5.0,
            received_mono: 5.0,
        });
        assert_eq!(src.counters.frames.load(Ordering::Relaxed), 3);

        // A third stream is past max_streams (2 here): refused and counted, while the
        // streams already known go on.
        let rejected = src.counters.samples_rejected();
        for topic in ["act/layer9", "act/layer3"] {
            src.take_one(&Incoming {
                topic: topic.into(),
                payload: frame.clone(),
                received: 6.0,
                received_mono: 6.0,
            });
        }
        assert_eq!(src.counters.samples_rejected(), rejected + 1);
        assert_eq!(
            src.counters.samples_rejected_by_reason[Reject::TooManyStreams.reason_index()]
                .load(Ordering::Relaxed),
            1
        );
        assert_eq!(src.counters.frames.load(Ordering::Relaxed), 4);
        assert_eq!(src.streams.lock().unwrap().len(), 2);
    }

    fn raw_frame(a: f32) -> Vec<u8> {
        [a, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn inbox_decodes_on_the_mqtt_thread_into_the_ring_and_holds_messages_between_turns() {
        use crate::mqtt::Inbox;
        use crate::ring::{FullPolicy, frame_ring};
        let mut src = source(1.0);
        src.decoder = raw_decoder(&DarkwatchConfig::default(), 2, "act/+", 1024);
        let counters = src.counters.clone();
        let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let feed = Feed::new(src, 2);
        let mut inbox = FeedInbox(feed.clone());
        let mut deliver = |topic: &str, payload: Vec<u8>| {
            inbox.deliver(Received {
                topic,
                payload: &payload,
                received: 5.0,
                received_mono: 5.0,
            })
        };
        // No turn runs (before the first, or during a reload): messages are held, up to
        // the capacity, and the next one is refused (the client counts it).
        assert!(deliver("act/s0", raw_frame(1.0)));
        assert!(deliver("act/s0", vec![0; 5]));
        assert!(!deliver("act/s0", raw_frame(9.0)));
        assert_eq!(count(&counters.messages), 0);

        // A turn takes the held messages first, in order: the garbage one is counted.
        let (producer, mut consumer) = frame_ring(2, 2, FullPolicy::DropNewest);
        lock(&feed).start(producer, Clock::new());
        assert_eq!(count(&counters.messages), 2);
        assert_eq!(counters.decode_errors(), 1);
        assert_eq!(count(&counters.frames_queued), 1);
        // Then every message goes straight into the ring on the delivering thread: a frame
        // with NaN is a decode error, a full ring drops the newest and counts it.
        assert!(deliver("act/s0", raw_frame(f32::NAN)));
        assert!(deliver("act/s1", raw_frame(4.0)));
        assert!(deliver("act/s1", raw_frame(6.0)));
        assert!(deliver("act/s1", vec![1, 2, 3]));
        assert_eq!(count(&counters.messages), 6);
        assert_eq!(counters.decode_errors(), 3);
        assert_eq!(count(&counters.frames), 3);
        assert_eq!(count(&counters.frames_queued), 2);
        assert_eq!(count(&counters.frames_dropped), 1);
        let mut metas = [FrameMeta::default(); 4];
        let mut values = [0.0f32; 8];
        assert_eq!(consumer.pop_batch(&mut metas, &mut values), 2);
        assert_eq!((metas[0].stream, metas[0].seq), (0, 0));
        assert_eq!((metas[1].stream, metas[1].seq), (1, 0));
        assert_eq!(metas[1].received_mono, Some(5.0));
        assert_eq!(values[..4], [1.0, 2.0, 4.0, 2.0]);
        assert_eq!(*lock(&feed).source.streams.lock().unwrap(), ["s0", "s1"]);

        // The turn ends: the producer goes back (dropping it ends the scorer) and messages
        // are held again.
        let (offered, producer) = lock(&feed).end(true);
        assert_eq!(offered, 3);
        drop(producer.expect("the turn's producer"));
        assert!(consumer.is_finished());
        assert!(deliver("act/s0", raw_frame(5.0)));
        assert_eq!(count(&counters.messages), 6);
        assert_eq!(lock(&feed).waiting.len(), 1);

        // The client's thread ending closes the feed; the source thread then ends the turn.
        drop(inbox);
        assert!(lock(&feed).closed);
    }

    /// Alert latency is measured on the monotonic clock, from a frame's MQTT receipt to its
    /// alert. It used to be wall time, so a receipt read before a step of the host's clock
    /// (NTP, a resume from suspend) gave a latency off by the step: here the wall clock read
    /// 1970 at one stream's receipts (a huge latency) and a far future at the other's (a
    /// negative one, dropped).
    #[test]
    fn alert_latency_is_monotonic_whatever_the_wall_clock_read_at_receipt() {
        use crate::ring::{FullPolicy, frame_ring};
        let cfg = DarkwatchConfig::default();
        let mut model = crate::model::fit::synthetic(2, 1);
        model.calibration_scores = (0..1000).map(|i| i as f32 / 1000.0).collect();
        let (out, _alerts) = mqtt::outgoing_channel();
        let counters = Arc::<AgentCounters>::default();
        let mut src = source(1.0);
        src.decoder = raw_decoder(&cfg, 2, "act/+", 4);
        let mut sink = AgentSink::new(
            &cfg,
            &Detector::Autoencoder(Arc::new(model)),
            src.streams.clone(),
            &cfg.mqtt,
            out,
            &counters,
            false,
        )
        .unwrap();
        let (mut producer, mut consumer) = frame_ring(8, 2, FullPolicy::DropNewest);
        let clock = Clock::new();
        for (topic, wall) in [("act/past", 1.0), ("act/future", 1e12)] {
            for _ in 0..3 {
                let m = Incoming {
                    topic: topic.into(),
                    payload: raw_frame(1.0),
                    received: wall,
                    received_mono: mqtt::monotonic_secs(),
                };
                src.take(&m.as_received(), Some((&mut producer, &clock)));
            }
        }
        let mut metas = [FrameMeta::default(); 8];
        let mut values = [0.0f32; 16];
        let n = consumer.pop_batch(&mut metas, &mut values);
        assert_eq!(n, 6);
        for meta in &metas[..n] {
            sink.accept(&ScoredFrame {
                meta: *meta,
                score: 1e6,
                frame_score: 1e6,
                ..Default::default()
            });
        }
        // Three frames far over the threshold: each stream fires (3 of 5), once.
        assert_eq!(counters.alerts_firing.load(Ordering::Relaxed), 2);
        let latency = &counters.alert_latency;
        assert_eq!(latency.count(), 2);
        assert!(latency.quantile_upper(1.0) <= 1.0, "{:?}", latency.counts);
    }

    /// A sink for a model whose threshold lies below 1, streams named `s0`, `s1`…, and
    /// the receiving end of its alerts.
    fn test_sink(cfg: &DarkwatchConfig) -> (AgentSink, mqtt::OutgoingReceiver) {
        let (out, alerts) = mqtt::outgoing_channel();
        let sink = AgentSink::new(
            cfg,
            &test_model(),
            test_streams(),
            &cfg.mqtt,
            out,
            &Arc::default(),
            false,
        )
        .unwrap();
        (sink, alerts)
    }

    /// The model of [`test_sink`]: its threshold lies below 1.
    fn test_model() -> Detector {
        let mut model = crate::model::fit::synthetic(2, 1);
        model.calibration_scores = (0..1000).map(|i| i as f32 / 1000.0).collect();
        Detector::Autoencoder(Arc::new(model))
    }

    fn test_streams() -> StreamNames {
        let name = |n: &str| SlotName {
            name: n.to_string(),
            generation: 0,
            topic: String::new(),
        };
        Arc::new(Mutex::new(vec![name("s0"), name("s1")]))
    }

    /// Names compare with plain strings in assertions.
    impl PartialEq<&str> for SlotName {
        fn eq(&self, other: &&str) -> bool {
            self.name == *other
        }
    }

    impl PartialEq<String> for SlotName {
        fn eq(&self, other: &String) -> bool {
            self.name == *other
        }
    }

    /// The trial: a SIGHUP that changed only `[alert.labels]` resolved the firing alert
    /// with "a reload changed the model, thresholds or input", and reset every threshold.
    /// New labels make a new fingerprint, so the episode still ends, but `ended_by` says
    /// what changed and the thresholds carry over; a change of `resend_secs` only keeps
    /// the firing alert.
    #[test]
    fn a_reload_of_the_alert_labels_says_so_and_keeps_the_thresholds() {
        let cfg = DarkwatchConfig::default();
        let model = test_model();
        let (mut sink, mut alerts) = test_sink(&cfg);
        feed_sink(&mut sink, 0, 0, 3, 1e6);
        feed_sink(&mut sink, 1, 0, 3, 0.5);
        let fired = sent(&mut alerts);
        assert_eq!(fired.len(), 1);
        let threshold =
            |sink: &AgentSink, i: usize| sink.per_stream[i].as_ref().unwrap().threshold.threshold();
        // Stream 0's threshold set apart from what a fresh one would be (the calibration
        // scores' q0.999 under 1, against 40 here), so that keeping it can be told from
        // rebuilding it.
        sink.per_stream[0].as_mut().unwrap().threshold = crate::threshold::ThresholdConfig {
            kind: crate::threshold::ThresholdKind::Quantile,
            ..Default::default()
        }
        .build(&[40.0; 100])
        .unwrap();
        let before = threshold(&sink, 0);
        assert_ne!(before.to_bits(), sink.template.threshold().to_bits());

        // resend_secs only: the alert keeps firing, and re-sends at the new interval.
        let mut resend = cfg.clone();
        resend.alert.resend_secs = 5.0;
        let change = ReloadChange::between(&cfg, &model, &resend, &model);
        assert!(change.keeps_alerts(), "{change:?}");
        // Named in the reload's log line, though nothing is dropped for it.
        assert_eq!(change.describe(), "");
        assert_eq!(change.describe_other(), "[alert] resend_secs");
        sink = sink
            .reload(&resend, &model, test_streams(), &change)
            .unwrap();
        assert!(sent(&mut alerts).is_empty());
        assert!(sink.per_stream[0].as_ref().unwrap().alerts.is_firing());
        assert_eq!(sink.alert_cfg.resend_secs, 5.0);

        let mut labelled = resend.clone();
        labelled
            .alert
            .labels
            .insert("cluster".into(), "leonardo".into());
        let change = ReloadChange::between(&resend, &model, &labelled, &model);
        assert!(change.keeps_windows() && change.keeps_thresholds() && !change.keeps_alerts());
        sink = sink
            .reload(&labelled, &model, test_streams(), &change)
            .unwrap();
        let ended = sent(&mut alerts);
        assert_eq!(ended.len(), 1, "{ended:?}");
        assert_eq!(ended[0]["status"], "resolved");
        assert_eq!(ended[0]["fingerprint"], fired[0]["fingerprint"]);
        assert_eq!(
            ended[0]["annotations"]["ended_by"],
            "a reload changed the alert's labels ([alert] labels): resolved without the scores falling, the anomaly may still be going on"
        );
        assert_eq!(threshold(&sink, 0).to_bits(), before.to_bits());
        assert_eq!(sink.counters.streams.load(Ordering::Relaxed), 2);
        // The anomaly goes on: a new episode under the new labels.
        feed_sink(&mut sink, 0, 3, 3, 1e6);
        let refired = sent(&mut alerts);
        assert_eq!(refired.len(), 1, "{refired:?}");
        assert_eq!(refired[0]["labels"]["cluster"], "leonardo");
        assert_ne!(refired[0]["fingerprint"], fired[0]["fingerprint"]);

        // Another model and threshold: all starts afresh, and ended_by names both.
        let mut spot = labelled.clone();
        spot.threshold.risk_q /= 2.0;
        let other = {
            let Detector::Autoencoder(m) = test_model() else {
                unreachable!()
            };
            let mut m = (*m).clone();
            m.meta.id = "another".into();
            Detector::Autoencoder(Arc::new(m))
        };
        let change = ReloadChange::between(&labelled, &model, &spot, &other);
        assert!(!change.keeps_thresholds() && change.keeps_windows());
        sink = sink.reload(&spot, &other, test_streams(), &change).unwrap();
        let ended = sent(&mut alerts);
        assert_eq!(
            ended[0]["annotations"]["ended_by"],
            "a reload changed the model and the thresholds ([threshold]): resolved without the scores falling, the anomaly may still be going on"
        );
        assert!(sink.per_stream.is_empty());
        let mut rules = spot.clone();
        rules.alert.fire_k = 2;
        rules.alert.severity = "critical".into();
        assert_eq!(
            ReloadChange::between(&spot, &other, &rules, &other).describe(),
            "the alert's labels ([alert] severity) and the alert's firing rules ([alert] fire_k)"
        );
    }

    /// A review: after online retraining moved the sink to a retrained model, a reload of
    /// the same configuration and the model on disk compared that model with the one
    /// loaded before (the same), kept the retrained model's thresholds for the model on
    /// disk, and went on labelling alerts with the retrained id. It is compared with the
    /// model the sink scores.
    #[test]
    fn a_reload_after_retraining_compares_with_the_model_scored() {
        let cfg = DarkwatchConfig::default();
        let model = test_model();
        let (mut sink, _alerts) = test_sink(&cfg);
        let same = ReloadChange::between(&cfg, &model, &cfg, &model).against_scored(&sink, &model);
        assert!(same.keeps_thresholds() && same.keeps_alerts(), "{same:?}");

        let Detector::Autoencoder(on_disk) = &model else {
            unreachable!()
        };
        let mut retrained = (**on_disk).clone();
        retrained.meta.id = "retrained".into();
        retrained.meta.version = 1;
        sink.switch_model(&retrained);
        let change =
            ReloadChange::between(&cfg, &model, &cfg, &model).against_scored(&sink, &model);
        assert!(change.model && !change.keeps_thresholds(), "{change:?}");
        sink = sink.reload(&cfg, &model, test_streams(), &change).unwrap();
        assert_eq!(
            (sink.model_id.as_str(), sink.model_version.as_str()),
            (model.id(), "0")
        );

        // A reload of the very model the sink scores keeps the thresholds.
        sink.switch_model(&retrained);
        let resumed = Detector::Autoencoder(Arc::new(retrained));
        let change =
            ReloadChange::between(&cfg, &model, &cfg, &resumed).against_scored(&sink, &resumed);
        assert!(!change.model && change.keeps_thresholds(), "{change:?}");
    }

    /// Feeds `n` frames of `stream` from `seq`, each scoring `score`.
    fn feed_sink(sink: &mut AgentSink, stream: u32, seq: u64, n: u64, score: f32) {
        feed_generation(sink, stream, 0, seq, n, score);
    }

    /// [`feed_sink`] for the stream that holds slot `stream` as its `generation`, as the
    /// pipeline does: each frame is admitted, then accepted.
    fn feed_generation(
        sink: &mut AgentSink,
        stream: u32,
        generation: u32,
        seq: u64,
        n: u64,
        score: f32,
    ) {
        for seq in seq..seq + n {
            let meta = FrameMeta {
                seq,
                stream,
                generation,
                timestamp: 1_700_000_000.0 + seq as f64,
                ..FrameMeta::default()
            };
            if sink.admit(&meta) {
                sink.accept(&ScoredFrame {
                    meta,
                    score,
                    frame_score: score,
                    ..Default::default()
                });
            }
        }
    }

    /// The alert events sent so far, as JSON.
    fn sent(alerts: &mut mqtt::OutgoingReceiver) -> Vec<serde_json::Value> {
        std::iter::from_fn(|| alerts.try_recv().ok())
            .map(|o| serde_json::from_slice(&o.payload).unwrap())
            .collect()
    }

    /// A firing alert is published again every `[alert] resend_secs` (by the ticks' clock)
    /// while it fires, as Alertmanager expects of its clients, with the firing event's
    /// fingerprint and startsAt; re-sends are not firings. The agent used to publish only
    /// the transitions, so Alertmanager timed a long anomaly out (resolve_timeout).
    #[test]
    fn a_firing_alert_is_resent_every_resend_secs_until_it_resolves() {
        let cfg = DarkwatchConfig::default();
        assert_eq!(cfg.alert.resend_secs, 60.0);
        let (mut sink, mut alerts) = test_sink(&cfg);
        let counters = sink.counters.clone();
        let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        sink.tick(at(0));
        feed_sink(&mut sink, 0, 0, 3, 1e6);
        let fired = sent(&mut alerts);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0]["status"], "firing");
        // Stream s1 is quiet: it never fires, so nothing of it is re-sent.
        feed_sink(&mut sink, 1, 0, 3, 0.0);
        // The first tick after the firing starts its clock.
        sink.tick(at(1));
        sink.tick(at(60));
        assert!(sent(&mut alerts).is_empty(), "re-sent too soon");
        // Scored on: the re-send is the episode as it stands, same identity.
        feed_sink(&mut sink, 0, 3, 4, 2e6);
        sink.tick(at(61));
        let again = sent(&mut alerts);
        assert_eq!(again.len(), 1, "{again:?}");
        let e = &again[0];
        assert_eq!(e["status"], "firing");
        assert_eq!(e["fingerprint"], fired[0]["fingerprint"]);
        assert_eq!(e["startsAt"], fired[0]["startsAt"]);
        assert_eq!(e["labels"], fired[0]["labels"]);
        assert_eq!(e["seq"], 6, "the latest frame");
        assert_eq!(e["peak_score"], 2e6);
        assert_eq!(count(&counters.alerts_firing), 1, "a re-send is no firing");
        assert_eq!(count(&counters.alerts_resent), 1);
        // Every resend_secs from the last one.
        sink.tick(at(120));
        assert!(sent(&mut alerts).is_empty());
        sink.tick(at(121));
        assert_eq!(sent(&mut alerts).len(), 1);
        // Without a broker connection re-sends wait, and catch up once it is back.
        let link = Arc::new(MqttStats::default());
        sink.link = Some(link.clone());
        sink.tick(at(200));
        assert!(sent(&mut alerts).is_empty());
        link.connected.store(true, Ordering::Relaxed);
        sink.tick(at(201));
        assert_eq!(sent(&mut alerts).len(), 1);
        assert_eq!(count(&counters.alerts_resent), 3);
        // Resolved: no more re-sends.
        feed_sink(&mut sink, 0, 7, 5, 0.0);
        assert_eq!(sent(&mut alerts)[0]["status"], "resolved");
        sink.tick(at(400));
        sink.tick(at(1000));
        assert!(sent(&mut alerts).is_empty());
        assert_eq!(count(&counters.alerts_resent), 3);

        // resend_secs = 0: never.
        let mut cfg = DarkwatchConfig::default();
        cfg.alert.resend_secs = 0.0;
        let (mut sink, mut alerts) = test_sink(&cfg);
        feed_sink(&mut sink, 0, 0, 3, 1e6);
        for secs in [0, 1, 100, 250] {
            sink.tick(at(secs));
        }
        assert_eq!(sent(&mut alerts).len(), 1, "the firing only");
    }

    /// With `[assemble] max_streams` full, a new stream was refused until restart, however
    /// long the old ones had been gone ("they are kept until restart"). A stream that sends
    /// nothing for `forget_after_secs` is forgotten and its slot is free at once: the next
    /// new stream takes it as the slot's next generation, also before the sink has heard
    /// (it used to be refused for the second or so until the sink gave the slot back). The
    /// sink resolves the forgotten stream's firing alert (here `silence_secs` = 0 has not)
    /// and drops its state once, at the new stream's first frame or at its tick, whichever
    /// comes first; a frame of the old stream that comes after is dropped and counted.
    #[test]
    fn a_quiet_stream_is_forgotten_and_its_slot_taken_by_a_new_one_at_once() {
        let mut cfg = DarkwatchConfig::default();
        assert_eq!(cfg.assemble.forget_after_secs, 3600.0);
        cfg.assemble.max_streams = 1;
        cfg.assemble.forget_after_secs = 62.0;
        cfg.alert.silence_secs = Some(0.0);
        let mut src = source_with(&cfg);
        let (mut sink, mut alerts) = test_sink(&cfg);
        sink.streams = src.streams.clone();
        sink.recycling = src.recycling.clone();
        let counters = src.counters.clone();
        let refusals = || {
            counters.samples_rejected_by_reason[Reject::TooManyStreams.reason_index()]
                .load(Ordering::Relaxed)
        };
        let names = |src: &AgentSource| {
            let names = src.streams.lock().unwrap();
            names
                .iter()
                .map(|n| (n.name.clone(), n.generation))
                .collect::<Vec<_>>()
        };
        src.take_one(&msg("n1", "a", 1.0, 1000.0));
        src.take_one(&msg("n2", "a", 1.0, 1001.0));
        assert_eq!(refusals(), 1);
        assert_eq!(names(&src), [("n1".to_string(), 0)]);
        // n1's frames fire its alert.
        feed_sink(&mut sink, 0, 0, 3, 1e6);
        assert_eq!(sent(&mut alerts).len(), 1);
        let t0 = Instant::now();
        sink.tick(t0);

        // Quiet for less than forget_after_secs: kept.
        src.forget_quiet(1061.0);
        assert!(src.recycling.lock().unwrap().retired.is_empty());
        src.forget_quiet(1063.0);
        assert_eq!(src.recycling.lock().unwrap().retired, [(0, 0)]);
        assert_eq!(counters.streams_forgotten.load(Ordering::Relaxed), 1);
        assert_eq!(src.assembler.index_of("n1"), None);
        // The slot is free at once, though the sink has not heard yet.
        src.take_one(&msg("n2", "a", 1.0, 1063.5));
        assert_eq!(refusals(), 1);
        assert_eq!(src.assembler.index_of("n2"), Some(0));
        assert_eq!(names(&src), [("n2".to_string(), 1)]);

        // n2's first frame ends n1 in the sink: its alert resolves, saying why, and n2
        // starts a fresh state under its own name, not n1's firing one.
        feed_generation(&mut sink, 0, 1, 0, 1, 0.0);
        let ended = sent(&mut alerts);
        assert_eq!(ended.len(), 1, "{ended:?}");
        assert_eq!(ended[0]["status"], "resolved");
        assert_eq!(ended[0]["labels"]["stream"], "n1");
        assert_eq!(ended[0]["annotations"]["ended_by"], ENDED_BY_FORGOTTEN);
        let st = sink.per_stream[0].as_ref().unwrap();
        assert_eq!(st.name, "n2");
        assert!(!st.alerts.is_firing());
        // The sink hears of n1 at its tick: n1 is over already, n2 stays.
        sink.tick(t0 + Duration::from_secs(1));
        assert!(sent(&mut alerts).is_empty());
        assert!(src.recycling.lock().unwrap().retired.is_empty());
        assert_eq!(sink.per_stream[0].as_ref().unwrap().name, "n2");
        assert_eq!(sink.counters.streams.load(Ordering::Relaxed), 1);
        // A frame of n1 still queued: dropped, counted, n2 untouched.
        feed_generation(&mut sink, 0, 0, 3, 1, 1e6);
        assert_eq!(sink.counters.frames_stale.load(Ordering::Relaxed), 1);
        assert_eq!(sink.counters.frames_scored.load(Ordering::Relaxed), 4);
        assert!(sent(&mut alerts).is_empty());

        // n2 is forgotten in turn, and the sink hears first: its state goes at the tick.
        src.forget_quiet(1126.0);
        assert_eq!(src.recycling.lock().unwrap().retired, [(0, 1)]);
        sink.tick(t0 + Duration::from_secs(2));
        assert!(sink.per_stream.iter().all(Option::is_none));
        assert_eq!(sink.counters.streams.load(Ordering::Relaxed), 0);

        // 0: never forgotten.
        src.take_one(&msg("n3", "a", 1.0, 1130.0));
        src.forget_after_secs = 0.0;
        src.forget_quiet(1e9);
        assert!(src.recycling.lock().unwrap().retired.is_empty());
        assert_eq!(src.assembler.index_of("n3"), Some(0));
    }

    /// The trial: forgetting a stream dropped its state in the sink at the sink's tick,
    /// unordered against the frames still in the ring, so with the scorer running behind,
    /// a forgotten stream's queued frames started a fresh state that the next stream in
    /// its slot inherited (its alerts named after the old stream), or the new stream's
    /// frames were scored against the old stream's state. Each frame now carries its
    /// slot's generation, so however the sink's tick and the queued frames interleave, the
    /// old stream's frames meet only its own state or are dropped, and the new stream
    /// starts afresh under its own name. Raw input, through a real ring.
    #[test]
    fn a_slot_recycled_while_old_frames_are_queued_keeps_the_two_streams_apart() {
        use crate::ring::{FrameConsumer, FullPolicy, frame_ring};
        /// When the sink hears that `a` was forgotten, and what it scored of `a` before.
        #[derive(Debug, Clone, Copy)]
        enum Order {
            /// It scored a's first frame before a was forgotten, and hears last.
            ScoredThenHearsLast,
            /// It scored nothing of a, and hears before it reaches a's frames.
            HearsFirst,
            /// It scored nothing of a, and hears last: a's name is b's by then.
            HearsLast,
        }
        let mut cfg = DarkwatchConfig::default();
        cfg.assemble.forget_after_secs = 62.0;
        cfg.alert.silence_secs = Some(0.0);
        for order in [
            Order::ScoredThenHearsLast,
            Order::HearsFirst,
            Order::HearsLast,
        ] {
            let mut src = source_with(&cfg);
            src.decoder = raw_decoder(&DarkwatchConfig::default(), 2, "act/+", 1);
            let (mut sink, mut alerts) = test_sink(&cfg);
            sink.streams = src.streams.clone();
            sink.recycling = src.recycling.clone();
            let (mut producer, mut consumer) = frame_ring(16, 2, FullPolicy::DropNewest);
            let clock = Clock::new();
            let mut send = |src: &mut AgentSource, topic: &str, at: f64, score: f32| {
                let payload = raw_frame(score);
                let msg = Received {
                    topic,
                    payload: &payload,
                    received: at,
                    received_mono: at,
                };
                assert_eq!(src.take(&msg, Some((&mut producer, &clock))), 1, "{topic}");
            };
            // The scorer pops up to `n` frames and scores each by its first value.
            let pop_and_score = |consumer: &mut FrameConsumer, sink: &mut AgentSink, n: usize| {
                let mut metas = [FrameMeta::default(); 16];
                let mut values = [0.0f32; 32];
                let got = consumer.pop_batch(&mut metas[..n], &mut values);
                for (k, meta) in metas[..got].iter().enumerate() {
                    if sink.admit(meta) {
                        sink.accept(&ScoredFrame {
                            meta: *meta,
                            score: values[2 * k],
                            frame_score: values[2 * k],
                            ..Default::default()
                        });
                    }
                }
            };
            let t0 = Instant::now();
            // a sends three anomalous frames, then nothing.
            for at in [10.0, 11.0, 12.0] {
                send(&mut src, "act/a", at, 1e6);
            }
            if let Order::ScoredThenHearsLast = order {
                pop_and_score(&mut consumer, &mut sink, 1);
            }
            // A minute later a is forgotten; b takes the slot at once (max_streams 1).
            src.forget_quiet(80.0);
            send(&mut src, "act/b", 81.0, 0.0);
            send(&mut src, "act/b", 82.0, 0.0);
            if let Order::HearsFirst = order {
                sink.tick(t0);
            }
            pop_and_score(&mut consumer, &mut sink, 16);
            sink.tick(t0 + Duration::from_secs(1));

            let events = sent(&mut alerts);
            let st = sink.per_stream[0].as_ref().unwrap();
            assert_eq!(st.name, "b", "{order:?}");
            assert!(!st.alerts.is_firing(), "{order:?}");
            let stale = sink.counters.frames_stale.load(Ordering::Relaxed);
            match order {
                Order::ScoredThenHearsLast => {
                    // a's queued frames met a's own state and fired its alert; b's first
                    // frame ended it.
                    let got: Vec<(String, String)> = events
                        .iter()
                        .map(|e| {
                            let field = |v: &serde_json::Value| v.as_str().unwrap().to_string();
                            (field(&e["status"]), field(&e["labels"]["stream"]))
                        })
                        .collect();
                    let want = [("firing", "a"), ("resolved", "a")]
                        .map(|(s, n)| (s.to_string(), n.to_string()));
                    assert_eq!(got, want, "{events:?}");
                    assert_eq!(events[1]["annotations"]["ended_by"], ENDED_BY_FORGOTTEN);
                    assert_eq!(stale, 0);
                }
                // a's frames went nowhere: no state of a's for b to inherit, no alert
                // under either name.
                Order::HearsFirst | Order::HearsLast => {
                    assert!(events.is_empty(), "{order:?}: {events:?}");
                    assert_eq!(stale, 3, "{order:?}");
                }
            }
            assert_eq!(sink.counters.streams.load(Ordering::Relaxed), 1);
        }
    }

    /// Raw streams are forgotten the same way: a returning topic starts afresh, its seq
    /// from 0, in the slot a forgotten stream left, as the slot's next generation.
    #[test]
    fn a_quiet_raw_stream_is_forgotten_and_comes_back_afresh() {
        let mut cfg = DarkwatchConfig::default();
        cfg.assemble.forget_after_secs = 62.0;
        let mut src = source_with(&cfg);
        src.decoder = raw_decoder(&DarkwatchConfig::default(), 2, "act/+", 2);
        let (producer, mut consumer) =
            crate::ring::frame_ring(8, 2, crate::ring::FullPolicy::DropNewest);
        let mut producer = producer;
        let clock = Clock::new();
        let mut deliver = |src: &mut AgentSource, topic: &str, at: f64| {
            let payload = raw_frame(1.0);
            src.take(
                &Received {
                    topic,
                    payload: &payload,
                    received: at,
                    received_mono: at,
                },
                Some((&mut producer, &clock)),
            )
        };
        assert_eq!(deliver(&mut src, "act/a", 10.0), 1);
        assert_eq!(deliver(&mut src, "act/a", 11.0), 1);
        assert_eq!(deliver(&mut src, "act/b", 50.0), 1);
        assert_eq!(deliver(&mut src, "act/c", 50.0), 0, "max_streams 2");
        src.forget_quiet(80.0);
        assert_eq!(
            src.recycling.lock().unwrap().retired,
            [(0, 0)],
            "a, quiet since 11"
        );
        // The slot is free at once.
        assert_eq!(deliver(&mut src, "act/a", 81.0), 1);
        let mut metas = [FrameMeta::default(); 8];
        let mut values = [0.0f32; 16];
        let n = consumer.pop_batch(&mut metas, &mut values);
        let got: Vec<(u32, u32, u64)> = metas[..n]
            .iter()
            .map(|m| (m.stream, m.generation, m.seq))
            .collect();
        assert_eq!(got, [(0, 0, 0), (0, 0, 1), (1, 0, 0), (0, 1, 0)]);
        assert_eq!(*src.streams.lock().unwrap(), ["a", "b"]);
        assert_eq!(src.streams.lock().unwrap()[0].generation, 1);
        assert_eq!(src.counters.streams_forgotten.load(Ordering::Relaxed), 1);
    }

    /// Each stream's score and threshold reach the gauges `/metrics` reads, from the
    /// sink's frames: the threshold each score was judged against, as its alert events
    /// carry it. A silent stream's series go until it scores again; a forgotten stream's,
    /// and every stream's at a stop or a reload that restarts them, go with its state.
    #[test]
    fn stream_gauges_follow_the_frames_silence_and_forgetting() {
        let cfg = DarkwatchConfig::default();
        let (mut sink, _alerts) = test_sink(&cfg);
        // Off (the default of a bare counters): nothing registered.
        feed_sink(&mut sink, 0, 0, 1, 0.5);
        assert!(sink.counters.stream_gauges.snapshot().is_empty());
        assert!(sink.per_stream[0].as_ref().unwrap().gauge.is_none());

        let (mut sink, _alerts) = test_sink(&cfg);
        sink.counters.stream_gauges.enable(true);
        let snapshot = |sink: &AgentSink| sink.counters.stream_gauges.snapshot();
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        feed_sink(&mut sink, 0, 0, 3, 0.5);
        feed_sink(&mut sink, 1, 0, 3, 1e6);
        let got = snapshot(&sink);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!((got[0].0.as_str(), got[0].1), ("s0", 0.5));
        assert_eq!((got[1].0.as_str(), got[1].1), ("s1", 1e6));
        for (name, _, threshold, _) in &got {
            assert!(
                threshold.is_finite() && *threshold < 1.0,
                "{name}: {threshold}"
            );
        }
        sink.tick(at(0));
        // s0 goes on; s1 sends nothing more and goes silent: its series go.
        for secs in (10..=300).step_by(10) {
            feed_sink(&mut sink, 0, secs, 1, 0.25);
            sink.tick(at(secs));
        }
        let got = snapshot(&sink);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].0.as_str(), got[0].1), ("s0", 0.25));
        // Back: shown again, with its new score.
        feed_sink(&mut sink, 1, 3, 1, 0.75);
        assert_eq!(
            snapshot(&sink).iter().map(|g| g.1).collect::<Vec<_>>(),
            [0.25, 0.75]
        );
        // vmanomaly's anomaly_score follows the same series.
        let exposed = crate::metrics::Exposed {
            counters: sink.counters.clone(),
            mqtt: Arc::default(),
            model_id: "m".into(),
        };
        let text = crate::metrics::render(&exposed);
        assert!(
            text.contains("\nanomaly_score{stream=\"s0\",model_id="),
            "{text}"
        );
        // s0 is forgotten (the source retires slot 0, generation 0): gone at the tick.
        sink.recycling.lock().unwrap().retired.push((0, 0));
        sink.tick(at(400));
        let got = snapshot(&sink);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0, "s1");
        let text = crate::metrics::render(&exposed);
        assert!(!text.contains("anomaly_score{stream=\"s0\""), "{text}");
        assert!(
            text.contains("\nanomaly_score{stream=\"s1\",model_id="),
            "{text}"
        );
        // A stop (or a reload that restarts every stream) ends them all.
        sink.end_alerts(ENDED_BY_STOP);
        assert!(snapshot(&sink).is_empty());
    }

    /// The gauges' threshold is the one the alert events carry: the firing event's and a
    /// re-send's (the latest frame's score and threshold).
    #[test]
    fn stream_gauges_carry_the_threshold_of_the_alert_events() {
        let mut cfg = DarkwatchConfig::default();
        cfg.alert.resend_secs = 1.0;
        let (mut sink, mut alerts) = test_sink(&cfg);
        sink.counters.stream_gauges.enable(true);
        feed_sink(&mut sink, 0, 0, 3, 1e6);
        let fired = sent(&mut alerts);
        assert_eq!(fired.len(), 1, "{fired:?}");
        let gauge = |sink: &AgentSink| sink.counters.stream_gauges.snapshot()[0].clone();
        let (name, score, threshold, _) = gauge(&sink);
        assert_eq!(fired[0]["labels"]["stream"], name.as_str());
        assert_eq!(fired[0]["score"].as_f64(), Some(score));
        assert_eq!(fired[0]["threshold"].as_f64(), Some(threshold));
        feed_sink(&mut sink, 0, 3, 1, 2e6);
        let t0 = Instant::now();
        sink.tick(t0);
        sink.tick(t0 + Duration::from_secs(2));
        let resent = sent(&mut alerts);
        assert_eq!(resent.len(), 1, "{resent:?}");
        let (_, score, threshold, _) = gauge(&sink);
        assert_eq!(score, 2e6);
        assert_eq!(resent[0]["score"].as_f64(), Some(score));
        assert_eq!(resent[0]["threshold"].as_f64(), Some(threshold));
    }

    /// A stream that goes silent while its alert fires has the alert resolved, saying why,
    /// once `[alert] silence_secs` pass without a frame (by the ticks' clock); a silent
    /// stream that was not firing only counts as silent. Frames that come back are scored
    /// as before. The agent used to keep such an alert firing until a reload or a stop.
    #[test]
    fn a_stream_that_goes_silent_has_its_alert_resolved_once() {
        let cfg = DarkwatchConfig::default();
        assert_eq!(silence_secs(&cfg), 300.0);
        let (mut sink, mut alerts) = test_sink(&cfg);
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let silent = |sink: &AgentSink| -> Vec<bool> {
            sink.per_stream.iter().flatten().map(|s| s.silent).collect()
        };
        feed_sink(&mut sink, 0, 0, 3, 1e6);
        feed_sink(&mut sink, 1, 0, 3, 0.0);
        sink.tick(at(0));
        assert_eq!(sent(&mut alerts).len(), 1, "s0 fired");
        // s1 goes on; s0 sends nothing more (its alert is re-sent meanwhile).
        for secs in (10..300).step_by(10) {
            feed_sink(&mut sink, 1, secs, 1, 0.0);
            sink.tick(at(secs));
        }
        assert!(sent(&mut alerts).iter().all(|e| e["status"] == "firing"));
        assert_eq!(silent(&sink), [false, false]);
        sink.tick(at(300));
        let ended = sent(&mut alerts);
        assert_eq!(ended.len(), 1, "{ended:?}");
        assert_eq!(ended[0]["status"], "resolved");
        assert_eq!(ended[0]["annotations"]["ended_by"], ENDED_BY_SILENCE);
        assert_eq!(
            ended[0]["end_seq"], 2,
            "ends at its last above-threshold frame"
        );
        assert_eq!(silent(&sink), [true, false]);
        assert!(!sink.per_stream[0].as_ref().unwrap().alerts.is_firing());
        let gauges = |sink: &AgentSink| {
            let c = &sink.counters;
            [&c.streams, &c.firing_now, &c.streams_silent].map(|g| g.load(Ordering::Relaxed))
        };
        assert_eq!(gauges(&sink), [2, 0, 1], "streams, firing, silent");
        // Once per silence: nothing more, however long it lasts; no re-send either.
        for secs in [301, 600, 5000] {
            sink.tick(at(secs));
        }
        assert!(sent(&mut alerts).is_empty());
        assert_eq!(sink.counters.alerts_resolved.load(Ordering::Relaxed), 1);
        // s1 goes silent too: it was not firing, so it is only marked.
        assert_eq!(silent(&sink), [true, true]);
        // Frames come back: no longer silent, and a new anomaly fires a new episode.
        assert_eq!(gauges(&sink), [2, 0, 2]);
        feed_sink(&mut sink, 0, 3, 3, 1e6);
        assert_eq!(silent(&sink), [false, true]);
        assert_eq!(gauges(&sink), [2, 1, 1], "set at once, without a tick");
        let refired = sent(&mut alerts);
        assert_eq!(refired.len(), 1);
        assert_eq!(refired[0]["status"], "firing");
        assert_eq!(refired[0]["fingerprint"], ended[0]["fingerprint"]);
        assert_ne!(refired[0]["startsAt"], ended[0]["startsAt"]);
        // Its silence clock starts again from the tick after its latest frame.
        sink.tick(at(6000));
        sink.tick(at(6299));
        assert!(sent(&mut alerts).iter().all(|e| e["status"] == "firing"));
        sink.tick(at(6300));
        assert_eq!(
            sent(&mut alerts)[0]["annotations"]["ended_by"],
            ENDED_BY_SILENCE
        );

        // silence_secs = 0: never; absent, ten assembler windows when that is longer.
        let mut cfg = DarkwatchConfig::default();
        cfg.assemble.window_secs = 60.0;
        assert_eq!(silence_secs(&cfg), 600.0);
        cfg.agent.format = InputFormat::Raw;
        assert_eq!(silence_secs(&cfg), 300.0);
        cfg.alert.silence_secs = Some(0.0);
        let (mut sink, mut alerts) = test_sink(&cfg);
        feed_sink(&mut sink, 0, 0, 3, 1e6);
        for secs in [0, 1, 1000, 100_000] {
            sink.tick(at(secs));
        }
        assert!(sent(&mut alerts).iter().all(|e| e["status"] == "firing"));
        assert_eq!(silent(&sink), [false]);
    }

    #[test]
    fn a_turn_that_panics_leaves_no_producer_in_the_feed() {
        use crate::ring::{FullPolicy, frame_ring};
        let feed = Feed::new(source(1.0), 2);
        let (producer, consumer) = frame_ring(2, 2, FullPolicy::DropNewest);
        // As in `FeedTurn::run`: the guard first, then the turn starts; then something on
        // the source thread panics while the feed holds the producer.
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _guard = TurnGuard(feed.clone());
            lock(&feed).start(producer, Clock::new());
            assert!(lock(&feed).ring.is_some());
            panic!("a decoder bug");
        }));
        assert!(unwound.is_err());
        // The producer went with the turn, so the scorer sees its ring end.
        assert!(lock(&feed).ring.is_none());
        assert!(consumer.is_finished());
    }
}
