//! Prometheus `/metrics` for the agent: a minimal HTTP/1.1 responder on its own thread
//! that renders the agent's counters in the text exposition format when scraped. The
//! Alertmanager bridge serves its own counters through the same responder ([`serve_with`])
//! and the same helpers ([`histogram`], [`process_metrics`], [`BUILD_FEATURES`]).
//!
//! Names follow the Prometheus conventions (`darkwatch_<noun>_<verb>_total` counters,
//! gauges without a suffix) with bounded labels. Fed by the atomics the agent's threads
//! already keep; nothing is computed on the hot path.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::agent::AgentCounters;
use crate::ingest::assemble::{DecodeError, Reject};
use crate::mqtt::MqttStats;

/// Where `/metrics` is served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port` to listen on; empty turns the endpoint off.
    pub listen: String,
    /// Expose each stream's latest score and threshold (`darkwatch_stream_score`,
    /// `darkwatch_stream_threshold`, labelled by `stream`): one pair of series per stream
    /// scored, at most `[assemble] max_streams`. `false` leaves them out, for a node with
    /// so many streams that the series would cost Prometheus more than they tell. Default
    /// `true`. Like `listen`, a change takes effect at the next restart.
    pub per_stream: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:9464".into(),
            per_stream: true,
        }
    }
}

impl MetricsConfig {
    /// Checks that `listen` is empty or a socket address.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !self.listen.is_empty() && self.listen.parse::<SocketAddr>().is_err() {
            return Err((
                "listen",
                format!(
                    "\"{}\" is not an IP address and port (e.g. 127.0.0.1:9464, 0.0.0.0:9464 for every IPv4 interface, [::]:9464); host names such as localhost are not resolved",
                    self.listen
                ),
            ));
        }
        Ok(())
    }
}

/// One stream's series on `/metrics`: its latest score and the threshold that score was
/// judged against, as `f64` bits in atomics. The scorer thread (the agent's sink) stores
/// both at each of the stream's frames (two relaxed stores, no lock); the scrape reads
/// them. The two are separate stores, so a scrape that lands between them may pair a
/// frame's score with the previous frame's threshold.
#[derive(Debug)]
pub struct StreamGauge {
    name: String,
    /// Labels of `anomaly_score` beside `stream` and `model_id`, rendered once
    /// (`,key="value"…`): an ExaMon stream's stream keys.
    labels: String,
    score: AtomicU64,
    threshold: AtomicU64,
    /// Exposed: set once the stream has a score, cleared while it is silent (`[alert]
    /// silence_secs`), when its last score is no longer current.
    shown: AtomicBool,
}

impl StreamGauge {
    /// The latest frame's `score` and the `threshold` it was judged against.
    #[inline]
    pub fn set(&self, score: f64, threshold: f64) {
        self.score.store(score.to_bits(), Ordering::Relaxed);
        self.threshold.store(threshold.to_bits(), Ordering::Relaxed);
    }

    /// Exposes the stream's series (`true`, after a [`StreamGauge::set`]) or hides them.
    pub fn show(&self, shown: bool) {
        // Release: a scrape that sees it shown sees the score set before.
        self.shown.store(shown, Ordering::Release);
    }
}

/// The streams' [`StreamGauge`]s, for `/metrics`. The agent's sink registers a stream's
/// gauge at its first frame and holds the only strong reference in the stream's state: a
/// stream whose state goes (forgotten after `[assemble] forget_after_secs`, or every
/// stream at a reload that restarts them) takes its series with it, with no call here.
/// The lock is taken when a stream appears and at a scrape, never per frame.
#[derive(Debug, Default)]
pub struct StreamGauges {
    on: AtomicBool,
    live: Mutex<Vec<Weak<StreamGauge>>>,
}

impl StreamGauges {
    /// Turns registration on or off (`[metrics] per_stream`, with `/metrics` served).
    /// Off by default: then [`StreamGauges::register`] gives `None`.
    pub fn enable(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
    }

    /// A gauge for the new stream `name`, hidden until it is set and shown; `None` when
    /// per-stream series are off. Drops the registrations of streams gone since, so the
    /// list holds at most one more than the streams alive.
    /// `labels` go on its `anomaly_score` beside `stream` and `model_id` (names valid
    /// Prometheus label names).
    pub fn register(&self, name: &str, labels: Vec<(String, String)>) -> Option<Arc<StreamGauge>> {
        if !self.on.load(Ordering::Relaxed) {
            return None;
        }
        let mut rendered = String::new();
        for (k, v) in &labels {
            let _ = write!(rendered, ",{k}=\"{}\"", escape_label(v));
        }
        let gauge = Arc::new(StreamGauge {
            name: name.to_string(),
            labels: rendered,
            score: AtomicU64::new(f64::NAN.to_bits()),
            threshold: AtomicU64::new(f64::NAN.to_bits()),
            shown: AtomicBool::new(false),
        });
        if let Ok(mut live) = self.live.lock() {
            live.retain(|g| g.strong_count() > 0);
            live.push(Arc::downgrade(&gauge));
        }
        Some(gauge)
    }

    /// The shown streams' `(name, score, threshold, labels)`, by name. Two streams of one name
    /// (a forgotten stream that came back before the sink let go of its old state, for a
    /// tick at most) give one series, the newer stream's: a sample twice would fail the
    /// whole scrape.
    pub fn snapshot(&self) -> Vec<StreamSample> {
        let mut by_name = std::collections::BTreeMap::new();
        if let Ok(mut live) = self.live.lock() {
            live.retain(|g| g.strong_count() > 0);
            for g in live.iter().filter_map(Weak::upgrade) {
                if g.shown.load(Ordering::Acquire) {
                    let score = f64::from_bits(g.score.load(Ordering::Relaxed));
                    let threshold = f64::from_bits(g.threshold.load(Ordering::Relaxed));
                    by_name.insert(g.name.clone(), (score, threshold, g.labels.clone()));
                }
            }
        }
        by_name
            .into_iter()
            .map(|(n, (s, t, l))| (n, s, t, l))
            .collect()
    }
}

/// A shown stream as a scrape reads it: its name, score, threshold and the rendered
/// extra labels of its `anomaly_score`.
pub type StreamSample = (String, f64, f64, String);

/// A label value as the text exposition format needs it: backslash, double quote and
/// line feed escaped (`\\`, `\"`, `\n`).
pub(crate) fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A sample value in the text exposition format: `NaN`, `+Inf`, `-Inf` or the number.
fn sample_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        v.to_string()
    }
}

/// The per-stream gauges: each family (`# HELP`, `# TYPE`, its series) only when a stream
/// is shown. `anomaly_score` (score / threshold) is left out for a stream whose threshold
/// is not positive and finite.
fn stream_series(s: &mut String, streams: &[StreamSample], model_id: &str) {
    if streams.is_empty() {
        return;
    }
    let ratio = |st: &StreamSample| {
        (st.2.is_finite() && st.2 > 0.0)
            .then(|| st.1 / st.2)
            .filter(|r| !r.is_nan())
    };
    if streams.iter().any(|st| ratio(st).is_some()) {
        let _ = writeln!(
            s,
            "# HELP anomaly_score Per stream ([metrics] per_stream), its latest score over the threshold it was judged against, as vmanomaly's: above 1.0 is anomalous. Labelled by stream, an ExaMon stream's stream keys, and the model. Absent while the stream is silent, gone when it is forgotten.\n# TYPE anomaly_score gauge"
        );
        let model_id = escape_label(model_id);
        for st in streams {
            if let Some(r) = ratio(st) {
                let _ = writeln!(
                    s,
                    "anomaly_score{{stream=\"{}\"{},model_id=\"{model_id}\"}} {}",
                    escape_label(&st.0),
                    st.3,
                    sample_value(r)
                );
            }
        }
    }
    stream_family(
        s,
        "darkwatch_stream_score",
        "Per stream ([metrics] per_stream), its latest score: the smoothed score the alert rule compares with darkwatch_stream_threshold. Absent while the stream is silent ([alert] silence_secs), and gone when it is forgotten.",
        streams,
        |t| t.1,
    );
    stream_family(
        s,
        "darkwatch_stream_threshold",
        "Per stream ([metrics] per_stream), the threshold (SPOT, DSPOT or quantile) its latest score was judged against; above it the frame counts toward the alert's fire_k of fire_n.",
        streams,
        |t| t.2,
    );
}

/// One per-stream gauge family: `value` of each stream, labelled by its name.
fn stream_family(
    s: &mut String,
    name: &str,
    help: &str,
    streams: &[StreamSample],
    value: impl Fn(&StreamSample) -> f64,
) {
    let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge");
    for st in streams {
        let _ = writeln!(
            s,
            "{name}{{stream=\"{}\"}} {}",
            escape_label(&st.0),
            sample_value(value(st))
        );
    }
}

/// What `/metrics` reports.
#[derive(Clone)]
pub struct Exposed {
    pub counters: Arc<AgentCounters>,
    pub mqtt: Arc<MqttStats>,
    pub model_id: String,
}

/// The exposition text.
pub fn render(e: &Exposed) -> String {
    let c = &e.counters;
    let m = &e.mqtt;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut s = String::new();
    let counters: [(&str, &str, u64); 20] = [
        (
            "darkwatch_messages_received_total",
            "MQTT messages taken by the decoder.",
            load(&c.messages),
        ),
        (
            "darkwatch_frames_assembled_total",
            "Frames assembled from samples.",
            load(&c.frames),
        ),
        (
            "darkwatch_frames_incomplete_total",
            "Frames with a missing metric (skipped by the scorer).",
            load(&c.frames_incomplete),
        ),
        (
            "darkwatch_frames_scored_total",
            "Frames scored (they reached thresholds and alerts).",
            load(&c.frames_scored),
        ),
        (
            "darkwatch_frames_dropped_total",
            "Frames dropped because the ring to the scorer was full.",
            load(&c.frames_dropped),
        ),
        (
            "darkwatch_frames_stale_total",
            "Frames of a forgotten stream ([assemble] forget_after_secs) that reached the scorer after its slot went to a new stream: dropped, never scored against the new stream's state. Normal is 0; more means the scorer ran far behind its input.",
            load(&c.frames_stale),
        ),
        (
            "darkwatch_frames_skipped_total",
            "Raw frames not scored because their in-prompt position (the header id + i, with [sae] id_is_position = true) is below [sae] skip_positions: BOS / attention-sink tokens, left out as the SAE head's fit and calibration left them out. Always 0 otherwise.",
            load(&c.frames_skipped),
        ),
        (
            "darkwatch_own_messages_ignored_total",
            "Messages on darkwatch's own output topics that the subscription matched: [mqtt] alert_topic, status_topic and [scores] topic (any node), and ExaMon [scores] plugin topics (…/plugin/examon-ai_pub/…); this agent's or another darkwatch's, not input: not decoded and not counted as rejected.",
            load(&c.own_messages_ignored),
        ),
        (
            "darkwatch_mqtt_incoming_dropped_total",
            "Received messages dropped: more than [mqtt] incoming_capacity arrived while no pipeline ran (at start, during a reload), or after a decoder failure.",
            load(&m.incoming_dropped),
        ),
        (
            "darkwatch_mqtt_broker_skipped_total",
            "Messages the embedded MQTT broker acknowledged to their publisher and skipped for a subscriber (this agent, or another client of the broker) that fell more than [mqtt] embedded_log_bytes behind. Always 0 with an external broker.",
            crate::mqtt::broker_skipped().messages,
        ),
        (
            "darkwatch_mqtt_reconnects_total",
            "MQTT connection errors, each followed by a reconnect.",
            load(&m.reconnects),
        ),
        (
            "darkwatch_mqtt_short_sessions_total",
            "Of darkwatch_mqtt_reconnects_total, connections that ended within 10 s of the broker accepting them: usually another client with the same [mqtt] client_id taking the session over.",
            load(&m.short_sessions),
        ),
        (
            "darkwatch_alerts_resent_total",
            "Firing alerts published again ([alert] resend_secs) while they fire; not counted in darkwatch_alerts_total.",
            load(&c.alerts_resent),
        ),
        (
            "darkwatch_alerts_spooled_total",
            "Alert events written to the on-disk spool.",
            load(&m.spooled),
        ),
        (
            "darkwatch_alerts_unspooled_total",
            "Alert events the spool could not take (a full disk, a read-only file system) and that were published without it, at most once.",
            load(&m.unspooled),
        ),
        (
            "darkwatch_alerts_acked_total",
            "Alert events the broker acknowledged.",
            load(&m.acked),
        ),
        (
            "darkwatch_scores_published_total",
            "[scores] messages handed to the MQTT client (QoS 0: not acknowledged, never spooled).",
            load(&m.scores_published),
        ),
        (
            "darkwatch_scores_dropped_total",
            "[scores] messages dropped rather than waited for: the score queue ([scores] queue_capacity) was full, or the MQTT client had no connection or 64 score messages already queued (a broker or network slower than the scores). Scoring and alerts never wait for scores.",
            load(&m.scores_dropped),
        ),
        (
            "darkwatch_alerts_rejected_total",
            "Alert events lost before or in the spool: an invalid topic, too large for an MQTT packet (or for a spool record, max_bytes / 8, which a valid [spool] max_bytes makes room for), unreadable in the spool, or refused by the spool while 1024 others waited to be published without it.",
            load(&m.outgoing_rejected),
        ),
        (
            "darkwatch_alerts_spool_dropped_total",
            "Unacknowledged alert events lost from the spool: deleted, oldest first, from a full spool ([spool] max_bytes) to make room, or found corrupt when the spool was opened.",
            load(&m.spool_dropped),
        ),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(
            s,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    }
    // One series per reason, zeros included, so that rate() and sum() see every one.
    let by_reason: [(&str, &str, &[&str], &[std::sync::atomic::AtomicU64]); 3] = [
        (
            "darkwatch_messages_rejected_total",
            "Messages (or Telegraf metrics) that could not be decoded, by reason.",
            &DecodeError::REASONS,
            &c.decode_errors_by_reason,
        ),
        (
            "darkwatch_samples_rejected_total",
            "Decoded samples the assembler refused, by reason.",
            &Reject::REASONS,
            &c.samples_rejected_by_reason,
        ),
        (
            "darkwatch_mqtt_broker_refused_total",
            "Clients and messages the embedded MQTT broker refused, by reason: a client id with /, +, # or $ (client_id), a keep-alive of 0 (keep_alive_0), a message over its limit (half of [mqtt] embedded_log_bytes, 1 to 16 MiB), dropped with its publisher disconnected (too_large). Always 0 with an external broker.",
            &crate::mqtt::BrokerRefusal::REASONS,
            crate::mqtt::broker_refused_counts(),
        ),
    ];
    for (name, help, reasons, counts) in by_reason {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
        for (reason, count) in reasons.iter().zip(counts) {
            let _ = writeln!(s, "{name}{{reason=\"{reason}\"}} {}", load(count));
        }
    }
    let _ = writeln!(
        s,
        "# HELP darkwatch_alerts_total Alert events raised, by status (re-sends not included).\n# TYPE darkwatch_alerts_total counter\n\
         darkwatch_alerts_total{{status=\"firing\"}} {}\ndarkwatch_alerts_total{{status=\"resolved\"}} {}",
        load(&c.alerts_firing),
        load(&c.alerts_resolved)
    );
    // Exported without online retraining too, as zeros and the loaded model's version, so
    // dashboards and rules see a value rather than an empty series.
    {
        let retraining = c.retrain();
        let version = match &retraining {
            Some(r) => load(&r.version),
            None => load(&c.model_version),
        };
        let r = retraining.unwrap_or_default();
        let _ = writeln!(
            s,
            "# HELP darkwatch_retrains_total Online retrains, by result (rejected: the validation gate refused the candidate).\n\
             # TYPE darkwatch_retrains_total counter\n\
             darkwatch_retrains_total{{result=\"accepted\"}} {}\n\
             darkwatch_retrains_total{{result=\"rejected\"}} {}\n\
             darkwatch_retrains_total{{result=\"failed\"}} {}\n\
             # HELP darkwatch_retrain_adoptions_total Sustained changes adopted as the new normal.\n\
             # TYPE darkwatch_retrain_adoptions_total counter\n\
             darkwatch_retrain_adoptions_total {}\n\
             # HELP darkwatch_reservoir_admitted_total Frames admitted to the clean-frame reservoir.\n\
             # TYPE darkwatch_reservoir_admitted_total counter\n\
             darkwatch_reservoir_admitted_total {}\n\
             # HELP darkwatch_retrain_last_duration_seconds Duration of the last retrain.\n\
             # TYPE darkwatch_retrain_last_duration_seconds gauge\n\
             darkwatch_retrain_last_duration_seconds {}\n\
             # HELP darkwatch_model_version The model version being scored (0: as trained; each accepted retrain adds 1).\n\
             # TYPE darkwatch_model_version gauge\n\
             darkwatch_model_version {}",
            load(&r.accepted),
            load(&r.rejected),
            load(&r.failed),
            load(&r.adoptions),
            load(&r.admitted),
            load(&r.last_micros) as f64 / 1e6,
            version
        );
    }
    let _ = writeln!(
        s,
        "# HELP darkwatch_mqtt_connected 1 while the MQTT client holds a connection.\n# TYPE darkwatch_mqtt_connected gauge\n\
         darkwatch_mqtt_connected {}",
        u8::from(m.connected.load(Ordering::Relaxed))
    );
    let gauges: [(&str, &str, u64); 6] = [
        (
            "darkwatch_alerts_firing",
            "Streams whose alert fires now.",
            load(&c.firing_now),
        ),
        (
            "darkwatch_streams",
            "Streams scored, each with its threshold and alert state, since the start or the last reload that changed the model, thresholds or input.",
            load(&c.streams),
        ),
        (
            "darkwatch_streams_silent",
            "Of darkwatch_streams, those that scored no frame for [alert] silence_secs.",
            load(&c.streams_silent),
        ),
        (
            "darkwatch_streams_incomplete",
            "Streams that send samples but whose last 5 frames or more were all incomplete (a feature with no sample within [assemble] stale_secs): none of their frames is scored meanwhile. One that never scored a frame is in neither darkwatch_streams nor darkwatch_streams_silent.",
            load(&c.streams_incomplete),
        ),
        (
            "darkwatch_alerts_spool_pending",
            "Alert events in the on-disk spool that the broker has not acknowledged yet: the backlog an outage leaves.",
            load(&m.spool_pending),
        ),
        (
            "darkwatch_alerts_spool_bytes",
            "Bytes of the alert spool's files now; at [spool] max_bytes the oldest alerts are dropped to make room.",
            load(&m.spool_bytes),
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(
            s,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    }
    let _ = writeln!(
        s,
        "# HELP darkwatch_config_reloads_total Reloads (SIGHUP) by result; a failed one keeps the running configuration.\n\
         # TYPE darkwatch_config_reloads_total counter\n\
         darkwatch_config_reloads_total{{result=\"applied\"}} {}\ndarkwatch_config_reloads_total{{result=\"failed\"}} {}",
        load(&c.reloads),
        load(&c.reloads_failed)
    );
    let _ = writeln!(
        s,
        "# HELP darkwatch_streams_forgotten_total Streams forgotten after [assemble] forget_after_secs without a message; their slots went to new streams.\n\
         # TYPE darkwatch_streams_forgotten_total counter\n\
         darkwatch_streams_forgotten_total {}",
        load(&c.streams_forgotten)
    );
    let live = c.model_id();
    stream_series(
        &mut s,
        &c.stream_gauges.snapshot(),
        if live.is_empty() { &e.model_id } else { &live },
    );
    histogram(
        &mut s,
        "darkwatch_alert_latency_seconds",
        "MQTT receipt of a frame (raw input) or of its last metric (ExaMon, Telegraf) to its alert handed to the MQTT client.",
        &c.alert_latency,
    );
    histogram(
        &mut s,
        "darkwatch_scoring_latency_seconds",
        "A complete frame entering the ring to its score (queueing, batching and scoring).",
        &c.scoring_latency,
    );
    histogram(
        &mut s,
        "darkwatch_frame_age_seconds",
        "Age of a frame when it is scored: the scorer's wall clock less the frame's time, which is the DWF1 header time of a raw frame (its MQTT receipt without one) and the window end of an assembled frame. Counts waiting in the publisher, the broker, the socket and the ring; a sender's clock offset adds to it (a negative age is not counted).",
        &c.frame_age,
    );
    batch_histogram(
        &mut s,
        "darkwatch_scorer_batch_frames",
        "Frames per batch the scorer scored: 1 while it keeps up, up to [pipeline] batch_max_frames under a backlog.",
        &c.batch_frames,
    );
    // The agent's current model (a reload may have replaced the one it started with).
    let live = c.model_id();
    let model_id = if live.is_empty() { &e.model_id } else { &live };
    let _ = writeln!(
        s,
        "# HELP darkwatch_model_info The model being scored.\n# TYPE darkwatch_model_info gauge\n\
         darkwatch_model_info{{model_id=\"{}\"}} 1",
        model_id
    );
    let backend = c.backend();
    let _ = writeln!(
        s,
        "# HELP darkwatch_backend_info What scores: native, onnx/<execution provider actually obtained>, cuda/<device>, native (cuda unavailable: <cause>), or sae/<activation>/<d_in>x<latents>/<score> followed by on cuda/<device> or (cuda unavailable: <cause>) when CUDA was asked for.\n\
         # TYPE darkwatch_backend_info gauge\n\
         darkwatch_backend_info{{backend=\"{}\"}} 1",
        if backend.is_empty() {
            "native".to_owned()
        } else {
            // `native (cuda unavailable: <cause>)` carries free text: escape it as
            // Prometheus label values need.
            escape_label(&backend)
        }
    );
    let _ = writeln!(
        s,
        "# HELP darkwatch_build_info The darkwatch release running, and the cargo features it was built with.\n\
         # TYPE darkwatch_build_info gauge\n\
         darkwatch_build_info{{version=\"{}\",features=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        BUILD_FEATURES
    );
    process_metrics(&mut s);
    s
}

/// The optional cargo features compiled in, comma-separated (empty: the default build).
pub(crate) const BUILD_FEATURES: &str = {
    const ONNX: &str = if cfg!(feature = "onnx") { "onnx" } else { "" };
    const CUDA: &str = if cfg!(feature = "cuda") { "cuda" } else { "" };
    if ONNX.is_empty() {
        CUDA
    } else if CUDA.is_empty() {
        ONNX
    } else {
        "onnx,cuda"
    }
};

/// What `/proc/self/stat` says of the process: CPU time in clock ticks, its start in
/// clock ticks after boot, virtual memory in bytes, resident memory in pages.
#[derive(Debug, PartialEq)]
struct ProcStat {
    cpu_ticks: u64,
    start_ticks: u64,
    virtual_bytes: u64,
    resident_pages: u64,
}

/// Parses `/proc/<pid>/stat` (proc(5)): the fields after the command name, which is in
/// parentheses and may itself hold spaces and parentheses.
fn parse_stat(stat: &str) -> Option<ProcStat> {
    let (_, rest) = stat.rsplit_once(')')?;
    // rest starts at field 3 (state): field n is at n - 3.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(ProcStat {
        cpu_ticks: field(14)? + field(15)?,
        start_ticks: field(22)?,
        virtual_bytes: field(23)?,
        resident_pages: field(24)?,
    })
}

/// The boot time, epoch seconds, from `/proc/stat`'s `btime` line.
fn parse_btime(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())
}

/// The standard process metrics of Prometheus' client libraries, from `/proc/self`, so
/// that the unit's `MemoryMax=` and `CPUQuota=` can be watched (Linux only; a file that
/// cannot be read leaves its metrics out).
pub(crate) fn process_metrics(s: &mut String) {
    if !cfg!(target_os = "linux") {
        return;
    }
    // SAFETY: sysconf and getrlimit only read the process's settings.
    let (tick_hz, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let tick_hz = if tick_hz > 0 { tick_hz as f64 } else { 100.0 };
    let page = if page > 0 { page as u64 } else { 4096 };
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
        if value == f64::INFINITY {
            let _ = writeln!(s, "{name} +Inf");
        } else {
            let _ = writeln!(s, "{name} {value}");
        }
    };
    if let Some(stat) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|t| parse_stat(&t))
    {
        metric(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            stat.cpu_ticks as f64 / tick_hz,
        );
        metric(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            stat.virtual_bytes as f64,
        );
        metric(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            stat.resident_pages.saturating_mul(page) as f64,
        );
        if let Some(btime) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|t| parse_btime(&t))
        {
            metric(
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                btime as f64 + stat.start_ticks as f64 / tick_hz,
            );
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metric(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            fds.count() as f64,
        );
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the one struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        metric(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            if limit.rlim_cur == libc::RLIM_INFINITY {
                f64::INFINITY
            } else {
                limit.rlim_cur as f64
            },
        );
    }
}

/// One Prometheus histogram from lock-free buckets.
pub(crate) fn histogram(s: &mut String, name: &str, help: &str, h: &crate::agent::LatencyBuckets) {
    let sum = h.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
    write_histogram(
        s,
        name,
        help,
        &crate::agent::LATENCY_BUCKETS_SECS,
        &h.counts,
        sum,
    );
}

/// The scorer's batch sizes as a Prometheus histogram.
fn batch_histogram(s: &mut String, name: &str, help: &str, h: &crate::agent::BatchSizes) {
    let sum = h.frames.load(Ordering::Relaxed);
    write_histogram(s, name, help, &crate::agent::BATCH_BUCKETS, &h.counts, sum);
}

/// Writes a histogram whose `counts` hold one bucket per bound of `bounds`, then +Inf.
fn write_histogram(
    s: &mut String,
    name: &str,
    help: &str,
    bounds: &[impl std::fmt::Display],
    counts: &[AtomicU64],
    sum: impl std::fmt::Display,
) {
    let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut cumulative = 0;
    for (i, n) in counts.iter().enumerate() {
        cumulative += n.load(Ordering::Relaxed);
        let le = bounds
            .get(i)
            .map_or("+Inf".to_string(), ToString::to_string);
        let _ = writeln!(s, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
    }
    let _ = writeln!(s, "{name}_sum {sum}\n{name}_count {cumulative}");
}

/// Serves `/metrics` on `listener` (bound by the caller, so that it can refuse to start
/// when `[metrics] listen` is taken) until `stop` is set. Returns the bound address.
///
/// # Errors
/// The listener cannot be set up, or the thread cannot start.
pub fn serve(
    listener: TcpListener,
    exposed: Exposed,
    stop: Arc<AtomicBool>,
) -> std::io::Result<SocketAddr> {
    serve_with(
        listener,
        "darkwatch-metrics",
        move || render(&exposed),
        stop,
    )
}

/// Serves `/metrics` on `listener` from a thread named `thread`, answering each scrape with
/// what `render` returns, until `stop` is set. Returns the bound address.
///
/// # Errors
/// The listener cannot be set up, or the thread cannot start.
pub fn serve_with(
    listener: TcpListener,
    thread: &str,
    render: impl Fn() -> String + Send + 'static,
    stop: Arc<AtomicBool>,
) -> std::io::Result<SocketAddr> {
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name(thread.into())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                        let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
                        // The request line may arrive in pieces: read up to the end of
                        // the headers (or a full buffer, or the timeout).
                        let mut buf = [0u8; 1024];
                        let mut n = 0;
                        while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                            match conn.read(&mut buf[n..]) {
                                Ok(0) | Err(_) => break,
                                Ok(got) => n += got,
                            }
                        }
                        let request = String::from_utf8_lossy(&buf[..n]);
                        let head = request.starts_with("HEAD /metrics");
                        let response = if head || request.starts_with("GET /metrics") {
                            let body = render();
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                                body.len(),
                                if head { "" } else { &body }
                            )
                        } else {
                            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
                        };
                        let _ = conn.write_all(response.as_bytes());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        })?;
    Ok(addr)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Checks `text` against the text exposition format (0.0.4) as a scraper reads it:
    /// every sample is `name[{labels}] value` with a valid name and a number for value,
    /// after its family's one `# TYPE` (histogram samples: `_bucket`, `_sum`, `_count`),
    /// and no sample twice. Returns the samples, `name{labels}` to value.
    pub(crate) fn check_exposition(text: &str) -> std::collections::HashMap<String, f64> {
        let valid_name = |n: &str| {
            !n.is_empty()
                && !n.starts_with(|c: char| c.is_ascii_digit())
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        };
        let mut types: std::collections::HashMap<String, String> = Default::default();
        let mut samples: std::collections::HashMap<String, f64> = Default::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                let (kind, name, what) = (parts.next(), parts.next(), parts.next());
                let name = name.unwrap_or_else(|| panic!("bad comment: {line}"));
                assert!(valid_name(name), "{line}");
                match kind {
                    Some("HELP") => assert!(what.is_some_and(|h| !h.is_empty()), "{line}"),
                    Some("TYPE") => {
                        let t = what.unwrap_or_default();
                        assert!(["counter", "gauge", "histogram"].contains(&t), "{line}");
                        assert!(
                            types.insert(name.to_string(), t.to_string()).is_none(),
                            "second TYPE: {line}"
                        );
                    }
                    _ => panic!("bad comment: {line}"),
                }
                continue;
            }
            assert!(!line.is_empty(), "an empty line");
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse::<f64>()
                    .unwrap_or_else(|_| panic!("bad value: {line}")),
            };
            let name = match series.split_once('{') {
                Some((name, labels)) => {
                    assert!(labels.ends_with('}'), "{line}");
                    name
                }
                None => series,
            };
            assert!(valid_name(name), "{line}");
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|s| name.strip_suffix(s))
                .find(|f| types.get(*f).is_some_and(|t| t == "histogram"))
                .unwrap_or(name);
            let kind = types
                .get(family)
                .unwrap_or_else(|| panic!("no TYPE before {line}"));
            if kind == "counter" {
                assert!(name.ends_with("_total"), "{line}");
            }
            assert!(
                samples.insert(series.to_string(), value).is_none(),
                "twice: {line}"
            );
        }
        samples
    }

    /// Every metric, the process ones included, as a scraper parses them.
    #[test]
    fn the_exposition_parses_and_has_the_process_metrics() {
        let counters = Arc::new(AgentCounters::default());
        counters.alert_latency.record(0.002);
        counters.frame_age.record(0.3);
        counters.batch_frames.record(1);
        counters.batch_frames.record(200);
        let exposed = Exposed {
            counters,
            mqtt: Arc::default(),
            model_id: "abc123".into(),
        };
        let samples = check_exposition(&render(&exposed));
        assert_eq!(samples["darkwatch_alerts_firing"], 0.0);
        assert_eq!(samples["darkwatch_alert_latency_seconds_count"], 1.0);
        assert_eq!(
            samples["darkwatch_frame_age_seconds_bucket{le=\"0.25\"}"],
            0.0
        );
        assert_eq!(
            samples["darkwatch_frame_age_seconds_bucket{le=\"0.5\"}"],
            1.0
        );
        assert_eq!(
            samples["darkwatch_scorer_batch_frames_bucket{le=\"1\"}"],
            1.0
        );
        assert_eq!(
            samples["darkwatch_scorer_batch_frames_bucket{le=\"128\"}"],
            1.0
        );
        assert_eq!(
            samples["darkwatch_scorer_batch_frames_bucket{le=\"256\"}"],
            2.0
        );
        assert_eq!(samples["darkwatch_scorer_batch_frames_sum"], 201.0);
        assert_eq!(samples["darkwatch_scorer_batch_frames_count"], 2.0);
        if cfg!(target_os = "linux") {
            let get = |name: &str| {
                *samples
                    .get(name)
                    .unwrap_or_else(|| panic!("no {name} in {samples:?}"))
            };
            assert!(get("process_resident_memory_bytes") > 1e5);
            assert!(get("process_virtual_memory_bytes") >= get("process_resident_memory_bytes"));
            assert!(get("process_cpu_seconds_total") >= 0.0);
            assert!(get("process_open_fds") >= 3.0);
            assert!(get("process_max_fds") >= get("process_open_fds"));
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64();
            let started = get("process_start_time_seconds");
            assert!(started > 1e9 && started <= now + 1.0, "{started} vs {now}");
        }
    }

    /// vmanomaly's `anomaly_score`: score / threshold per shown stream, labelled by the
    /// stream, its ExaMon stream keys and the model; left out where the threshold is not
    /// positive, and gone with the stream's state. The score counters are exported.
    #[test]
    fn anomaly_score_is_score_over_threshold_with_the_streams_labels_and_goes_with_it() {
        let counters = Arc::new(AgentCounters::default());
        let mqtt = Arc::new(MqttStats::default());
        mqtt.scores_dropped.store(7, Ordering::Relaxed);
        mqtt.scores_published.store(9, Ordering::Relaxed);
        let exposed = Exposed {
            counters: counters.clone(),
            mqtt,
            model_id: "m1".into(),
        };
        let g = &counters.stream_gauges;
        g.enable(true);
        let labels = vec![
            ("cluster".to_string(), "c1".to_string()),
            ("node".into(), "n\"7".into()),
        ];
        let examon = g.register("c1/n\"7", labels).unwrap();
        let zero = g.register("zero", Vec::new()).unwrap();
        examon.set(3.0, 1.5);
        zero.set(1.0, 0.0);
        examon.show(true);
        zero.show(true);
        let text = render(&exposed);
        let samples = check_exposition(&text);
        assert_eq!(
            samples["anomaly_score{stream=\"c1/n\\\"7\",cluster=\"c1\",node=\"n\\\"7\",model_id=\"m1\"}"],
            2.0,
            "{text}"
        );
        assert!(text.contains("# TYPE anomaly_score gauge\n"), "{text}");
        assert!(!text.contains("anomaly_score{stream=\"zero\""), "{text}");
        assert_eq!(samples["darkwatch_scores_dropped_total"], 7.0);
        assert_eq!(samples["darkwatch_scores_published_total"], 9.0);
        // A retrained model relabels the series at the next scrape.
        counters.set_model_id_for_test("m2");
        assert!(render(&exposed).contains(",model_id=\"m2\"} 2\n"));
        drop(examon);
        let text = render(&exposed);
        assert!(!text.contains("anomaly_score{"), "{text}");
        assert!(!text.contains("# TYPE anomaly_score"), "{text}");
    }

    /// Each stream's score and threshold as a scraper reads them: label values escaped
    /// (backslash, double quote, line feed), NaN and infinities spelt as the format
    /// wants, a stream hidden until set and while hidden, gone with its state, one series
    /// for two streams of one name, and nothing at all when turned off.
    #[test]
    fn stream_gauges_render_escaped_labels_and_go_with_their_stream() {
        let counters = Arc::new(AgentCounters::default());
        let exposed = Exposed {
            counters: counters.clone(),
            mqtt: Arc::default(),
            model_id: "m".into(),
        };
        let g = &counters.stream_gauges;
        assert!(g.register("off", Vec::new()).is_none(), "off by default");
        assert!(!render(&exposed).contains("darkwatch_stream_"));
        g.enable(true);
        let plain = g.register("node1", Vec::new()).unwrap();
        let odd = g.register("a\"b\\c\nd", Vec::new()).unwrap();
        let inf = g.register("inf", Vec::new()).unwrap();
        let unset = g.register("unset", Vec::new()).unwrap();
        // Registered but not shown yet: no series, and no family with none.
        assert!(!render(&exposed).contains("darkwatch_stream_"));
        plain.set(0.25, 1.5);
        odd.set(f64::NAN, 2.0);
        inf.set(f64::INFINITY, f64::NEG_INFINITY);
        for s in [&plain, &odd, &inf] {
            s.show(true);
        }
        let text = render(&exposed);
        for line in [
            "\n# TYPE darkwatch_stream_score gauge\n",
            "\ndarkwatch_stream_score{stream=\"node1\"} 0.25\n",
            "\ndarkwatch_stream_threshold{stream=\"node1\"} 1.5\n",
            "\ndarkwatch_stream_score{stream=\"a\\\"b\\\\c\\nd\"} NaN\n",
            "\ndarkwatch_stream_threshold{stream=\"a\\\"b\\\\c\\nd\"} 2\n",
            "\ndarkwatch_stream_score{stream=\"inf\"} +Inf\n",
            "\ndarkwatch_stream_threshold{stream=\"inf\"} -Inf\n",
        ] {
            assert!(text.contains(line), "{line:?} in\n{text}");
        }
        assert!(!text.contains("unset"), "{text}");
        let samples = check_exposition(&text);
        assert_eq!(samples["darkwatch_stream_score{stream=\"node1\"}"], 0.25);
        assert!(samples["darkwatch_stream_score{stream=\"a\\\"b\\\\c\\nd\"}"].is_nan());
        // Each family's series together, under its one TYPE, sorted by stream.
        let scores: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("darkwatch_stream_score{"))
            .collect();
        assert_eq!(scores.len(), 3, "{text}");
        assert!(scores[0].contains("\"a\\\""), "{scores:?}");
        assert!(scores[2].contains("\"node1\""), "{scores:?}");
        // Hidden (a silent stream): its series go, and come back when shown.
        inf.show(false);
        assert!(!render(&exposed).contains("stream=\"inf\""));
        inf.show(true);
        assert!(render(&exposed).contains("stream=\"inf\""));
        // The stream's state goes (forgotten): so do its series.
        drop(odd);
        drop(inf);
        let text = render(&exposed);
        assert!(
            !text.contains("a\\\"b") && !text.contains("stream=\"inf\""),
            "{text}"
        );
        assert!(text.contains("stream=\"node1\""), "{text}");
        // A stream that came back under the same name before its old state went: one
        // series, the newer one's.
        let again = g.register("node1", Vec::new()).unwrap();
        again.set(7.0, 8.0);
        again.show(true);
        let samples = check_exposition(&render(&exposed));
        assert_eq!(samples["darkwatch_stream_score{stream=\"node1\"}"], 7.0);
        assert_eq!(samples["darkwatch_stream_threshold{stream=\"node1\"}"], 8.0);
        // Registrations of gone streams are dropped, not kept.
        drop((plain, unset));
        assert!(g.register("x", Vec::new()).is_some());
        assert_eq!(g.live.lock().unwrap().len(), 2);
        // Off: no new gauge.
        g.enable(false);
        assert!(g.register("later", Vec::new()).is_none());
    }

    /// The trial's `listen = "localhost:9464"` was told it "is not host:port".
    #[test]
    fn listen_takes_an_ip_address_and_says_so() {
        let listen = |l: &str| {
            MetricsConfig {
                listen: l.to_string(),
                ..MetricsConfig::default()
            }
            .validate()
        };
        for ok in ["", "127.0.0.1:9464", "0.0.0.0:9464", "[::]:9464"] {
            assert_eq!(listen(ok), Ok(()), "{ok}");
        }
        for bad in ["localhost:9464", "9464", "127.0.0.1"] {
            let (key, why) = listen(bad).unwrap_err();
            assert_eq!(key, "listen");
            assert!(why.contains("not an IP address and port"), "{why}");
        }
        assert!(
            listen("localhost:9464")
                .unwrap_err()
                .1
                .contains("not resolved")
        );
    }

    #[test]
    fn proc_stat_fields_are_read_past_a_command_name_with_parentheses() {
        // Field n holds n, except those read: utime 14, stime 15, starttime 22, vsize 23, rss 24.
        let mut fields: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
        fields[0] = "S".into();
        for (n, v) in [
            (14, "150"),
            (15, "50"),
            (22, "1000"),
            (23, "123456789"),
            (24, "2500"),
        ] {
            fields[n - 3] = v.into();
        }
        let stat = format!("4242 (dark) (watch ) {}\n", fields.join(" "));
        assert_eq!(
            parse_stat(&stat),
            Some(ProcStat {
                cpu_ticks: 200,
                start_ticks: 1000,
                virtual_bytes: 123_456_789,
                resident_pages: 2500,
            })
        );
        assert_eq!(parse_stat("4242 (short) S 1 2"), None);
        assert_eq!(
            parse_btime("cpu  1 2 3\nbtime 1700000000\nprocesses 9\n"),
            Some(1_700_000_000)
        );
    }

    #[test]
    fn scrape_returns_the_counters_in_exposition_format() {
        let counters = Arc::new(AgentCounters::default());
        counters.frames.fetch_add(7, Ordering::Relaxed);
        counters.alerts_firing.fetch_add(2, Ordering::Relaxed);
        counters.alerts_resent.fetch_add(5, Ordering::Relaxed);
        counters.firing_now.store(1, Ordering::Relaxed);
        counters.streams.store(3, Ordering::Relaxed);
        counters.streams_silent.store(2, Ordering::Relaxed);
        counters.streams_incomplete.store(4, Ordering::Relaxed);
        // A retrained checkpoint loaded as model_dir, without online retraining running.
        counters.model_version.store(3, Ordering::Relaxed);
        let exposed = Exposed {
            counters,
            mqtt: Arc::new(MqttStats {
                outgoing_rejected: 4.into(),
                spool_dropped: 2.into(),
                spool_pending: 6.into(),
                spool_bytes: 4096.into(),
                short_sessions: 1.into(),
                ..MqttStats::default()
            }),
            model_id: "abc123".into(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let addr = serve(
            TcpListener::bind("127.0.0.1:0").unwrap(),
            exposed,
            stop.clone(),
        )
        .unwrap();
        let get = |path: &str| {
            let mut conn = std::net::TcpStream::connect(addr).unwrap();
            write!(conn, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut out = String::new();
            conn.read_to_string(&mut out).unwrap();
            out
        };
        let body = get("/metrics");
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        assert!(
            body.contains("\ndarkwatch_frames_assembled_total 7\n"),
            "{body}"
        );
        assert!(
            body.contains("darkwatch_alerts_total{status=\"firing\"} 2"),
            "{body}"
        );
        for line in [
            "\ndarkwatch_model_version 3\n",
            "\ndarkwatch_retrains_total{result=\"accepted\"} 0\n",
            "\ndarkwatch_alerts_spool_pending 6\n",
            "\ndarkwatch_alerts_spool_bytes 4096\n",
            "\ndarkwatch_mqtt_short_sessions_total 1\n",
        ] {
            assert!(body.contains(line), "{line:?} in {body}");
        }
        assert!(
            body.contains("\ndarkwatch_alerts_resent_total 5\n"),
            "{body}"
        );
        assert!(
            body.contains("darkwatch_model_info{model_id=\"abc123\"} 1"),
            "{body}"
        );
        assert!(
            body.contains("darkwatch_backend_info{backend=\"native\"} 1"),
            "{body}"
        );
        assert!(
            body.contains(&format!(
                "darkwatch_build_info{{version=\"{}\",features=\"{BUILD_FEATURES}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{body}"
        );
        assert!(
            body.contains("# TYPE darkwatch_mqtt_connected gauge"),
            "{body}"
        );
        assert!(
            body.contains("darkwatch_alert_latency_seconds_bucket{le=\"0.001\"} 0\n"),
            "{body}"
        );
        assert!(
            body.contains("darkwatch_alert_latency_seconds_bucket{le=\"+Inf\"} 0\n"),
            "{body}"
        );
        // Lost alerts, by how they were lost.
        assert!(
            body.contains("\ndarkwatch_alerts_rejected_total 4\n")
                && body.contains("\ndarkwatch_alerts_spool_dropped_total 2\n"),
            "{body}"
        );
        // The state now, beside the counters since the start.
        for line in [
            "\ndarkwatch_alerts_firing 1\n",
            "\ndarkwatch_streams 3\n",
            "\ndarkwatch_streams_silent 2\n",
            "# TYPE darkwatch_streams_silent gauge\n",
            "\ndarkwatch_streams_incomplete 4\n",
            "# TYPE darkwatch_streams_incomplete gauge\n",
        ] {
            assert!(body.contains(line), "{line} in {body}");
        }
        let (_, text) = body.split_once("\r\n\r\n").unwrap();
        check_exposition(text);
        assert!(get("/other").starts_with("HTTP/1.1 404"));
        // HEAD: the headers of GET, no body.
        let mut conn = std::net::TcpStream::connect(addr).unwrap();
        write!(conn, "HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut head = String::new();
        conn.read_to_string(&mut head).unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "{head}");
        stop.store(true, Ordering::SeqCst);
        assert!(
            MetricsConfig {
                listen: "nope".into(),
                ..MetricsConfig::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            MetricsConfig {
                listen: String::new(),
                ..MetricsConfig::default()
            }
            .validate()
            .is_ok()
        );
    }
}
