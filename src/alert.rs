//! Alert state per stream: k-of-n hysteresis over thresholded scores, episode bookkeeping
//! (peak, per-feature blame) and the Alertmanager-shaped [`AlertEvent`].
//!
//! The scorer's sink feeds one [`Observation`] per scored frame of a stream (score, the
//! threshold in force, the top contributions) into that stream's [`AlertState`]; the state
//! returns an [`AlertEvent`] only on a transition (`firing`, `resolved`), which the alert
//! sinks (MQTT, Alertmanager) forward unchanged. Pure logic: no I/O, no clock, and nothing
//! is allocated per frame; only building an event allocates.
//!
//! Times: `startsAt`/`endsAt` are the event times of frames, formatted by [`rfc3339_utc`]
//! (always to the millisecond; a firing alert's `endsAt` is [`ENDS_AT_UNSET`]).
//! A frame without an event time (NaN timestamp) uses its frame index as epoch seconds, so
//! a replay without timestamps gets `1970-01-01T00:00:05.000Z` for frame 5: still ordered
//! and still valid RFC 3339, and obviously not wall-clock time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::MAX_TOP_CONTRIBUTIONS;
use crate::pipeline::{Contribution, ScoredFrame};

/// Largest `fire_n`: the window is one `u64` of bits.
pub const MAX_WINDOW_FRAMES: u32 = 64;

/// Largest `top_features` an event may name.
pub const MAX_EVENT_FEATURES: usize = 64;

/// `endsAt` of a firing (or re-sent) alert: Go's zero time, which Alertmanager itself puts
/// in the webhook payloads of firing alerts, in the one format of every time in an event
/// (milliseconds always, see [`rfc3339_utc`]). Alertmanager's `POST /api/v2/alerts` takes
/// it as "not set" (its resolve timeout applies); [`AlertEvent::postable`] leaves it out.
/// Compare with this constant, or parse the time and test for year 1, rather than with
/// another spelling of the zero time.
pub const ENDS_AT_UNSET: &str = "0001-01-01T00:00:00.000Z";

/// When a stream's alert fires and resolves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertConfig {
    /// Fire when at least `fire_k` of the last `fire_n` frames score above the threshold.
    pub fire_k: u32,
    /// Length of the firing window in frames (at most 64).
    pub fire_n: u32,
    /// Resolve after this many consecutive frames at or below the threshold.
    pub resolve_after_frames: u32,
    /// After resolving, a new firing of the same stream is suppressed for this many frames.
    pub suppress_frames: u32,
    /// The `alertname` label.
    pub alertname: String,
    /// The `severity` label.
    pub severity: String,
    /// How many features (largest blame over the episode) an event names. The blame sums
    /// each frame's top `[score] top_contributions`, so an event can name more only when
    /// different frames blame different features.
    pub top_features: usize,
    /// The agent re-publishes each firing alert this often (seconds, by the monotonic
    /// clock), as Alertmanager clients re-send active alerts; 0 never does.
    pub resend_secs: f64,
    /// The agent counts a stream that scored no frame for this long (seconds, monotonic
    /// clock) as silent: it logs it once and resolves its firing alert. 0 never does.
    /// Absent: 300 s, or ten `[assemble] window_secs` if longer (assembled input).
    pub silence_secs: Option<f64>,
    /// Labels added to every alert, as Prometheus's `external_labels` are (`cluster`,
    /// `instance`, `team`…), for Alertmanager's routing and grouping. `{node}` in a value
    /// is this agent's node name (`[mqtt] node_name` or the hostname). They cannot replace
    /// the built-in labels (`alertname`, `severity`, `model_id`, `stream`); they are part
    /// of each alert's `fingerprint`.
    pub labels: BTreeMap<String, String>,
    /// Annotations added to every alert (`runbook_url`, `dashboard`…), beside the built-in
    /// `summary` and `description`, which they cannot replace. In a value, `{node}`,
    /// `{stream}` and `{model_id}` are filled in: percent-encoded in a value that starts
    /// with `http://` or `https://` (a link), as they are elsewhere. Annotations are not
    /// part of the `fingerprint`.
    pub annotations: BTreeMap<String, String>,
    /// Each alert's `generatorURL`, the link Alertmanager's UI and notifications show
    /// ("Source"): an `http://` or `https://` URL, typically a Grafana dashboard. `{node}`,
    /// `{stream}` and `{model_id}` are filled in percent-encoded. Empty: none is sent.
    pub generator_url: String,
}

/// The annotations every alert may carry from darkwatch itself; `[alert] annotations` may
/// not name them.
pub const BUILT_IN_ANNOTATIONS: [&str; 3] = ["description", "ended_by", "summary"];

/// Placeholders of `[alert] annotations` and `generator_url` values.
const EVENT_PLACEHOLDERS: [&str; 3] = ["{node}", "{stream}", "{model_id}"];

/// The first `{…}` in `value` that is not one of `placeholders`, if any: a typo such as
/// `{hostname}` would otherwise be sent as it is.
fn unknown_placeholder<'a>(value: &'a str, placeholders: &[&str]) -> Option<&'a str> {
    let mut rest = value;
    let mut offset = 0;
    while let Some(open) = rest.find('{') {
        let at = offset + open;
        if let Some(p) = placeholders.iter().find(|p| value[at..].starts_with(**p)) {
            offset = at + p.len();
        } else {
            let len = value[at..].find('}')?;
            return Some(&value[at..=at + len]);
        }
        rest = &value[offset..];
    }
    None
}

/// `template` with each placeholder of `values` replaced by its value, in one pass (a value
/// that holds a placeholder's text stays as it is).
fn fill_placeholders(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        rest = &rest[open..];
        match values.iter().find(|(p, _)| rest.starts_with(p)) {
            Some((p, v)) => {
                out.push_str(v);
                rest = &rest[p.len()..];
            }
            None => {
                out.push('{');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// `url` after its `http://` or `https://` (any case), or `None`.
fn strip_http_scheme(url: &str) -> Option<&str> {
    let (scheme, rest) = url.split_once("://")?;
    (scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")).then_some(rest)
}

/// The byte offset of the first `%` in `url` that two hex digits do not follow.
fn bad_percent_escape(url: &str) -> Option<usize> {
    let b = url.as_bytes();
    (0..b.len()).find(|&i| {
        b[i] == b'%'
            && !(i + 2 < b.len() && b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit())
    })
}

/// `s` with the [`EVENT_PLACEHOLDERS`] taken out, to look for stray braces.
fn strip_placeholders(s: &str) -> String {
    EVENT_PLACEHOLDERS
        .iter()
        .fold(s.to_string(), |acc, p| acc.replace(p, ""))
}

/// `s` with every byte but RFC 3986's unreserved characters percent-encoded, for a value
/// put into a URL.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The labels every alert carries; `[alert] labels` may not name them.
pub const BUILT_IN_LABELS: [&str; 4] = ["alertname", "model_id", "severity", "stream"];

/// Whether `name` is a valid Prometheus label name that a user may set: ASCII letters,
/// digits and `_`, not starting with a digit, and not `__`-prefixed (reserved).
fn valid_label_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.starts_with("__")
}

impl Default for AlertConfig {
    fn default() -> Self {
        AlertConfig {
            fire_k: 3,
            fire_n: 5,
            resolve_after_frames: 5,
            suppress_frames: 0,
            alertname: "DarkwatchAnomaly".into(),
            severity: "warning".into(),
            top_features: 3,
            resend_secs: 60.0,
            silence_secs: None,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            generator_url: String::new(),
        }
    }
}

impl AlertConfig {
    /// Semantic checks the types cannot express. Returns the key and the reason.
    ///
    /// # Errors
    /// `fire_k` outside `1..=fire_n`, `fire_n` above 64, `resolve_after_frames` of 0,
    /// an empty `alertname`, `top_features` above 64, or a negative or non-finite
    /// `resend_secs` or `silence_secs`, or a label name in `labels` that is not a valid
    /// Prometheus label name, is reserved (`__…`) or is built in, or an empty label value
    /// (Alertmanager drops empty labels, so it would not be there).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.fire_n == 0 || self.fire_n > MAX_WINDOW_FRAMES {
            return Err((
                "fire_n",
                format!(
                    "must be between 1 and {MAX_WINDOW_FRAMES}, got {}",
                    self.fire_n
                ),
            ));
        }
        if self.fire_k == 0 || self.fire_k > self.fire_n {
            return Err((
                "fire_k",
                format!(
                    "must be between 1 and fire_n ({}), got {}",
                    self.fire_n, self.fire_k
                ),
            ));
        }
        if self.resolve_after_frames == 0 {
            return Err(("resolve_after_frames", "must be at least 1".into()));
        }
        if self.alertname.is_empty() {
            return Err(("alertname", "must not be empty".into()));
        }
        if self.top_features > MAX_EVENT_FEATURES {
            return Err((
                "top_features",
                format!(
                    "must be at most {MAX_EVENT_FEATURES}, got {}",
                    self.top_features
                ),
            ));
        }
        if !(self.resend_secs.is_finite() && self.resend_secs >= 0.0) {
            return Err((
                "resend_secs",
                format!(
                    "must be a non-negative number of seconds (0: never), got {}",
                    self.resend_secs
                ),
            ));
        }
        if let Some(secs) = self.silence_secs
            && !(secs.is_finite() && secs >= 0.0)
        {
            return Err((
                "silence_secs",
                format!("must be a non-negative number of seconds (0: never), got {secs}"),
            ));
        }
        for (name, value) in &self.labels {
            if !valid_label_name(name) {
                return Err((
                    "labels",
                    format!(
                        "{name:?} is not a label name Alertmanager accepts: letters, digits and _, not starting with a digit or __"
                    ),
                ));
            }
            if BUILT_IN_LABELS.contains(&name.as_str()) {
                return Err((
                    "labels",
                    format!(
                        "{name:?} is built in (alertname, severity, model_id and stream are set by darkwatch; alertname and severity have their own keys)"
                    ),
                ));
            }
            if value.is_empty() {
                return Err((
                    "labels",
                    format!("{name:?} has an empty value: Alertmanager would drop the label"),
                ));
            }
            if let Some(bad) = unknown_placeholder(value, &["{node}"]) {
                return Err((
                    "labels",
                    format!(
                        "{name:?} = {value:?} has `{bad}`, which is not a placeholder and would be sent as it is; only {{node}} is filled in (a label is part of the alert's identity, so {{stream}} is a label already)"
                    ),
                ));
            }
        }
        for (name, value) in &self.annotations {
            if !valid_label_name(name) {
                return Err((
                    "annotations",
                    format!(
                        "{name:?} is not an annotation name darkwatch takes: letters, digits and _, not starting with a digit (names starting with __ are kept for Prometheus's internal use)"
                    ),
                ));
            }
            if BUILT_IN_ANNOTATIONS.contains(&name.as_str()) {
                return Err((
                    "annotations",
                    format!(
                        "{name:?} is built in (darkwatch writes summary, description and ended_by)"
                    ),
                ));
            }
            if value.is_empty() {
                return Err(("annotations", format!("{name:?} has an empty value")));
            }
            if let Some(bad) = unknown_placeholder(value, &EVENT_PLACEHOLDERS) {
                return Err((
                    "annotations",
                    format!(
                        "{name:?} = {value:?} has `{bad}`, which is not a placeholder and would be sent as it is; {{node}}, {{stream}} and {{model_id}} are filled in"
                    ),
                ));
            }
        }
        let url = &self.generator_url;
        if !url.is_empty() {
            let rest = strip_http_scheme(url);
            if rest.is_none_or(|r| r.is_empty() || r.starts_with(['/', '?', '#'])) {
                return Err((
                    "generator_url",
                    format!("{url:?} is not an http:// or https:// URL with a host"),
                ));
            }
            if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err((
                    "generator_url",
                    format!("{url:?} has a space or a control character; percent-encode it"),
                ));
            }
            if let Some(at) = bad_percent_escape(url) {
                return Err((
                    "generator_url",
                    format!(
                        "{url:?} has a % at byte {at} that is not followed by two hex digits (write %25 for a % sign): Alertmanager would refuse the URL"
                    ),
                ));
            }
            if strip_placeholders(url).contains(['{', '}'])
                && unknown_placeholder(url, &EVENT_PLACEHOLDERS).is_none()
            {
                return Err((
                    "generator_url",
                    format!(
                        "{url:?} has a {{ or }} that is not part of a placeholder ({{node}}, {{stream}}, {{model_id}}); percent-encode it (%7B, %7D)"
                    ),
                ));
            }
            if let Some(bad) = unknown_placeholder(url, &EVENT_PLACEHOLDERS) {
                return Err((
                    "generator_url",
                    format!(
                        "{url:?} has `{bad}`, which is not a placeholder and would be sent as it is; {{node}}, {{stream}} and {{model_id}} are filled in"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `labels` with `{node}` in each value replaced by `node`.
    pub fn labels_for_node(&self, node: &str) -> BTreeMap<String, String> {
        self.labels
            .iter()
            .map(|(k, v)| (k.clone(), v.replace("{node}", node)))
            .collect()
    }

    /// This configuration on node `node`: `{node}` filled in the `labels`, the
    /// `annotations` and (percent-encoded) the `generator_url`. `{stream}` and `{model_id}`
    /// are left for each event.
    pub fn for_node(&self, node: &str) -> AlertConfig {
        AlertConfig {
            labels: self.labels_for_node(node),
            annotations: self
                .annotations
                .iter()
                .map(|(k, v)| {
                    let node = if strip_http_scheme(v).is_some() {
                        percent_encode(node)
                    } else {
                        node.to_string()
                    };
                    (k.clone(), v.replace("{node}", &node))
                })
                .collect(),
            generator_url: self.generator_url.replace("{node}", &percent_encode(node)),
            ..self.clone()
        }
    }
}

/// One scored frame of one stream, as the alert state sees it.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    /// Position of the frame in its stream.
    pub seq: u64,
    /// Event time in epoch seconds; NaN when unknown (the frame index stands in).
    pub timestamp: f64,
    pub score: f32,
    /// The threshold in force for this frame. A NaN score or threshold counts as "not above".
    pub threshold: f64,
    /// The frame's top contributions (feature index into the names given to
    /// [`AlertState::new`]); at most [`MAX_TOP_CONTRIBUTIONS`] are used.
    pub top: &'a [Contribution],
}

impl<'a> Observation<'a> {
    /// The observation of a scored frame under `threshold`.
    pub fn from_scored(frame: &'a ScoredFrame, threshold: f64) -> Self {
        Observation {
            seq: frame.meta.seq,
            timestamp: frame.meta.timestamp,
            score: frame.score,
            threshold,
            top: frame.top(),
        }
    }
}

/// `firing` or `resolved`, as Alertmanager spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertStatus {
    Firing,
    Resolved,
}

/// One feature's blame over an episode: the sum of its contributions over the
/// above-threshold frames in which it was among the frame's top contributions.
///
/// A sum, not a per-frame value: it grows with the episode's length, so it is not on the
/// scale of `score` or `peak_score` (an episode of 20 frames peaking at 180 can blame a
/// feature with 362), and it compares features within one event, not events with each
/// other. A feature counts only in the frames where it was among the top
/// `[score] top_contributions`, so with many features the ranking approximates the sums
/// over all of them. The event's description says over how many frames it was summed;
/// divided by that count, a blame is a lower bound of the feature's mean per frame.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FeatureBlame {
    pub feature: String,
    /// Sum of the feature's contributions over the episode's above-threshold frames (in
    /// those where it was among the frame's top `[score] top_contributions`).
    pub contribution: f64,
}

/// A transition of a stream's alert, shaped like an Alertmanager alert (`labels`,
/// `annotations`, `startsAt`, `endsAt`, `status`, `fingerprint`) plus darkwatch's own
/// fields in snake_case. [`AlertEvent::postable`] gives just the Alertmanager API fields.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertEvent {
    pub status: AlertStatus,
    /// `alertname`, `stream`, `model_id`, `severity`; frozen for the whole episode so the
    /// resolved event matches the firing one.
    pub labels: BTreeMap<String, String>,
    /// `summary` and `description` (which names the top features with their blame, the
    /// sum over the episode's N above-threshold frames, and says N), then `[alert]
    /// annotations`.
    pub annotations: BTreeMap<String, String>,
    /// Event time of the episode's first above-threshold frame (RFC 3339, UTC).
    #[serde(rename = "startsAt")]
    pub starts_at: String,
    /// Event time of the episode's last above-threshold frame once resolved;
    /// [`ENDS_AT_UNSET`] (Go's zero time) while firing and in re-sends.
    #[serde(rename = "endsAt")]
    pub ends_at: String,
    /// `[alert] generator_url` filled in for this stream; empty (and left out) when unset.
    #[serde(rename = "generatorURL", skip_serializing_if = "String::is_empty")]
    pub generator_url: String,
    /// 16 hex digits of FNV-1a 64 over the sorted labels (see [`fingerprint`]).
    pub fingerprint: String,
    /// Score of frame `seq`, the frame that caused this event (of a resolved event, the
    /// quiet frame that resolved it; of a re-send, the latest frame).
    pub score: f32,
    /// Threshold in force at frame `seq`, beside `score`. An adaptive threshold (SPOT,
    /// DSPOT) moves during an episode, so of a resolved event this is not the threshold the
    /// peak crossed: that is `peak_threshold`.
    pub threshold: f64,
    /// Highest score of the episode so far, and its frame.
    pub peak_score: f32,
    pub peak_seq: u64,
    /// Threshold in force at the peak frame (`peak_seq`): the one `peak_score` crossed.
    /// The `summary` annotation pairs these two.
    pub peak_threshold: f64,
    /// First above-threshold frame of the episode.
    pub start_seq: u64,
    /// Last above-threshold frame of the episode; `null` while firing.
    pub end_seq: Option<u64>,
    /// The frame that caused this transition (the firing frame, or the last quiet frame).
    pub seq: u64,
    pub stream: String,
    pub model_id: String,
    pub model_version: String,
    /// Largest blame first; each a sum over the episode's above-threshold frames (see
    /// [`FeatureBlame`]).
    pub top_features: Vec<FeatureBlame>,
}

/// The fields of an [`AlertEvent`] that Alertmanager's `POST /api/v2/alerts` takes.
#[derive(Debug, Clone, Serialize)]
pub struct PostableAlert<'a> {
    pub labels: &'a BTreeMap<String, String>,
    pub annotations: &'a BTreeMap<String, String>,
    #[serde(rename = "startsAt")]
    pub starts_at: &'a str,
    /// Omitted while firing, so Alertmanager applies its resolve timeout.
    #[serde(rename = "endsAt", skip_serializing_if = "Option::is_none")]
    pub ends_at: Option<&'a str>,
    #[serde(rename = "generatorURL", skip_serializing_if = "str::is_empty")]
    pub generator_url: &'a str,
}

impl AlertEvent {
    /// The Alertmanager API view of this event (one element of the POSTed array).
    pub fn postable(&self) -> PostableAlert<'_> {
        PostableAlert {
            labels: &self.labels,
            annotations: &self.annotations,
            starts_at: &self.starts_at,
            ends_at: (self.status == AlertStatus::Resolved).then_some(self.ends_at.as_str()),
            generator_url: &self.generator_url,
        }
    }
}

/// One of the last `fire_n` frames, kept so that a firing can account for the
/// above-threshold frames that led up to it.
#[derive(Debug, Clone, Copy)]
struct Slot {
    seq: u64,
    time: f64,
    score: f32,
    threshold: f64,
    n_top: u8,
    top: [Contribution; MAX_TOP_CONTRIBUTIONS],
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            seq: 0,
            time: 0.0,
            score: 0.0,
            threshold: f64::NAN,
            n_top: 0,
            top: [Contribution::default(); MAX_TOP_CONTRIBUTIONS],
        }
    }
}

/// The open episode of a firing alert.
#[derive(Debug, Clone)]
struct Episode {
    labels: BTreeMap<String, String>,
    fingerprint: String,
    model_id: String,
    model_version: String,
    start_seq: u64,
    start_time: f64,
    peak_score: f32,
    peak_seq: u64,
    /// The threshold the peak crossed (in force at `peak_seq`).
    peak_threshold: f64,
    last_above_seq: u64,
    last_above_time: f64,
    /// Above-threshold frames so far: those the blame sums over.
    above_frames: u64,
    /// Consecutive frames at or below the threshold since the last above one.
    quiet_frames: u32,
    /// The latest frame seen, for [`AlertState::active`].
    last_seq: u64,
    last_score: f32,
    last_threshold: f64,
}

impl Episode {
    fn take_above(&mut self, seq: u64, time: f64, score: f32, threshold: f64) {
        if score > self.peak_score || self.peak_score.is_nan() {
            self.peak_score = score;
            self.peak_seq = seq;
            self.peak_threshold = threshold;
        }
        self.last_above_seq = seq;
        self.last_above_time = time;
        self.above_frames += 1;
        self.quiet_frames = 0;
    }
}

#[derive(Debug, Clone)]
enum Phase {
    Idle,
    Firing(Box<Episode>),
    /// Just resolved: frames still to pass before the stream may fire again.
    Suppressed {
        frames_left: u32,
    },
}

/// The alert of one stream: a k-of-n bit window, the open episode and its feature blame.
/// Memory is fixed at construction (`fire_n` slots, one `f64` per feature).
#[derive(Debug, Clone)]
pub struct AlertState {
    stream: String,
    alertname: String,
    severity: String,
    /// `[alert] labels`, as given (`{node}` is filled in by whoever builds the config).
    extra_labels: BTreeMap<String, String>,
    /// `[alert] annotations` and `generator_url`, as given (`{node}` filled in likewise);
    /// `{stream}` and `{model_id}` are filled in per event.
    extra_annotations: BTreeMap<String, String>,
    generator_url: String,
    model_id: String,
    model_version: String,
    feature_names: Arc<[String]>,
    fire_k: u32,
    fire_n: u32,
    resolve_after_frames: u32,
    suppress_frames: u32,
    top_features: usize,
    /// Bit 0 is the latest frame; a set bit is a frame above the threshold.
    window: u64,
    mask: u64,
    /// Ring of the last `fire_n` frames, indexed by `frames_seen % fire_n`.
    recent: Box<[Slot]>,
    frames_seen: u64,
    /// Per-feature blame of the open episode.
    blame: Box<[f64]>,
    phase: Phase,
}

impl AlertState {
    /// Takes `cfg`'s `annotations` and `generator_url` (with `{node}` filled in) for the
    /// events from now on: they are not part of an alert's identity, so a reload that
    /// changes only them keeps a firing episode, and its next event carries them.
    pub fn set_links(&mut self, cfg: &AlertConfig) {
        self.extra_annotations = cfg.annotations.clone();
        self.generator_url = cfg.generator_url.clone();
    }

    /// The state of `stream`, scored by model `model_id`/`model_version` whose input
    /// features are `feature_names` (the indices in [`Observation::top`] point into it).
    ///
    /// Call [`AlertConfig::validate`] first: out-of-range values are clamped here
    /// (`fire_n` to 1..=64, `fire_k` to 1..=`fire_n`, `resolve_after_frames` to at least 1).
    pub fn new(
        cfg: &AlertConfig,
        stream: &str,
        model_id: &str,
        model_version: &str,
        feature_names: Arc<[String]>,
    ) -> Self {
        let fire_n = cfg.fire_n.clamp(1, MAX_WINDOW_FRAMES);
        let mask = if fire_n == 64 {
            u64::MAX
        } else {
            (1u64 << fire_n) - 1
        };
        AlertState {
            stream: stream.into(),
            alertname: cfg.alertname.clone(),
            severity: cfg.severity.clone(),
            extra_labels: cfg.labels.clone(),
            extra_annotations: cfg.annotations.clone(),
            generator_url: cfg.generator_url.clone(),
            model_id: model_id.into(),
            model_version: model_version.into(),
            blame: vec![0.0; feature_names.len()].into_boxed_slice(),
            feature_names,
            fire_k: cfg.fire_k.clamp(1, fire_n),
            fire_n,
            resolve_after_frames: cfg.resolve_after_frames.max(1),
            suppress_frames: cfg.suppress_frames,
            top_features: cfg.top_features.min(MAX_EVENT_FEATURES),
            window: 0,
            mask,
            recent: vec![Slot::default(); fire_n as usize].into_boxed_slice(),
            frames_seen: 0,
            phase: Phase::Idle,
        }
    }

    /// Switches the model whose id and version label the next episode. An open episode
    /// keeps its labels, so its resolved event still matches its firing event.
    pub fn set_model(&mut self, model_id: &str, model_version: &str) {
        model_id.clone_into(&mut self.model_id);
        model_version.clone_into(&mut self.model_version);
    }

    /// Whether the stream's alert is firing now.
    pub fn is_firing(&self) -> bool {
        matches!(self.phase, Phase::Firing(_))
    }

    /// Feeds one frame; returns an event when the alert fires or resolves.
    ///
    /// Frames count as they are observed: a gap in `seq` (dropped frames) does not
    /// shift the window. A new firing starts from an empty window after a resolve.
    pub fn observe(&mut self, obs: &Observation<'_>) -> Option<AlertEvent> {
        let above = f64::from(obs.score) > obs.threshold;
        let time = event_time(obs.seq, obs.timestamp);
        let n_top = obs.top.len().min(MAX_TOP_CONTRIBUTIONS);
        let slot = &mut self.recent[(self.frames_seen % u64::from(self.fire_n)) as usize];
        slot.seq = obs.seq;
        slot.time = time;
        slot.score = obs.score;
        slot.threshold = obs.threshold;
        slot.n_top = n_top as u8;
        slot.top[..n_top].copy_from_slice(&obs.top[..n_top]);
        self.frames_seen += 1;
        self.window = ((self.window << 1) | u64::from(above)) & self.mask;

        match &mut self.phase {
            Phase::Suppressed { frames_left } => {
                *frames_left = frames_left.saturating_sub(1);
                if *frames_left == 0 {
                    self.phase = Phase::Idle;
                }
                None
            }
            Phase::Idle => {
                if self.window.count_ones() < self.fire_k {
                    return None;
                }
                let mut ep = self.open_episode()?;
                ep.last_seq = obs.seq;
                ep.last_score = obs.score;
                ep.last_threshold = obs.threshold;
                let event = self.event(&ep, AlertStatus::Firing, obs.seq, obs.score, obs.threshold);
                self.phase = Phase::Firing(Box::new(ep));
                Some(event)
            }
            Phase::Firing(ep) => {
                ep.last_seq = obs.seq;
                ep.last_score = obs.score;
                ep.last_threshold = obs.threshold;
                if above {
                    ep.take_above(obs.seq, time, obs.score, obs.threshold);
                    add_blame(&mut self.blame, &obs.top[..n_top]);
                    return None;
                }
                ep.quiet_frames += 1;
                if ep.quiet_frames < self.resolve_after_frames {
                    return None;
                }
                self.close_episode(obs.seq, obs.score, obs.threshold)
            }
        }
    }

    /// The firing event of the open episode as it stands now (latest peak and blame), for
    /// a sink that re-sends active alerts (the agent does, every `[alert] resend_secs`);
    /// `None` when not firing.
    pub fn active(&self) -> Option<AlertEvent> {
        match &self.phase {
            Phase::Firing(ep) => Some(self.event(
                ep,
                AlertStatus::Firing,
                ep.last_seq,
                ep.last_score,
                ep.last_threshold,
            )),
            _ => None,
        }
    }

    /// Whether an alert is firing, or has just resolved and is suppressed: frames in this
    /// state must not be learned as normal (online retraining asks).
    pub fn in_alert(&self) -> bool {
        !matches!(self.phase, Phase::Idle)
    }

    /// Resolves an open episode, ending it at its last above-threshold frame; `None` when
    /// not firing. Replay calls it at the end of a finite input. The live agent calls it
    /// too, when it stops or a reload replaces the alert state, and adds an `ended_by`
    /// annotation to the event: the scores did not fall, so the anomaly may still be going
    /// on. It resolves rather than leaving the alert to time out because a stopped agent
    /// no longer re-sends it: an MQTT subscriber needs the closing event to close what the
    /// firing one opened (Alertmanager would only time it out), and nothing else would end
    /// it.
    pub fn finish(&mut self) -> Option<AlertEvent> {
        let (seq, score, threshold) = match &self.phase {
            Phase::Firing(ep) => (ep.last_seq, ep.last_score, ep.last_threshold),
            _ => return None,
        };
        self.close_episode(seq, score, threshold)
    }

    /// Opens an episode from the above-threshold frames in the window, oldest first;
    /// `None` only if the window holds no such frame.
    fn open_episode(&mut self) -> Option<Episode> {
        let mut labels = self.extra_labels.clone();
        labels.insert("alertname".to_string(), self.alertname.clone());
        labels.insert("model_id".to_string(), self.model_id.clone());
        labels.insert("severity".to_string(), self.severity.clone());
        labels.insert("stream".to_string(), self.stream.clone());
        let fingerprint = fingerprint(labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let mut ep: Option<Episode> = None;
        let held = self.frames_seen.min(u64::from(self.fire_n));
        for age in (0..held).rev() {
            if self.window & (1u64 << age) == 0 {
                continue;
            }
            let idx = ((self.frames_seen - 1 - age) % u64::from(self.fire_n)) as usize;
            let slot = self.recent[idx];
            add_blame(&mut self.blame, &slot.top[..usize::from(slot.n_top)]);
            let ep = ep.get_or_insert_with(|| Episode {
                labels: labels.clone(),
                fingerprint: fingerprint.clone(),
                model_id: self.model_id.clone(),
                model_version: self.model_version.clone(),
                start_seq: slot.seq,
                start_time: slot.time,
                peak_score: slot.score,
                peak_seq: slot.seq,
                peak_threshold: slot.threshold,
                last_above_seq: slot.seq,
                last_above_time: slot.time,
                above_frames: 0,
                quiet_frames: 0,
                last_seq: slot.seq,
                last_score: slot.score,
                last_threshold: f64::NAN,
            });
            ep.take_above(slot.seq, slot.time, slot.score, slot.threshold);
        }
        let mut ep = ep?;
        // Frames since the last above one count towards resolving.
        ep.quiet_frames = self.window.trailing_zeros().min(self.fire_n);
        Some(ep)
    }

    /// Ends the open episode (if any) with a resolved event; the window starts empty.
    fn close_episode(&mut self, seq: u64, score: f32, threshold: f64) -> Option<AlertEvent> {
        if !self.is_firing() {
            return None;
        }
        let next = if self.suppress_frames > 0 {
            Phase::Suppressed {
                frames_left: self.suppress_frames,
            }
        } else {
            Phase::Idle
        };
        let Phase::Firing(ep) = std::mem::replace(&mut self.phase, next) else {
            return None;
        };
        let event = self.event(&ep, AlertStatus::Resolved, seq, score, threshold);
        self.blame.fill(0.0);
        self.window = 0;
        Some(event)
    }

    fn event(
        &self,
        ep: &Episode,
        status: AlertStatus,
        seq: u64,
        score: f32,
        threshold: f64,
    ) -> AlertEvent {
        let top_features = self.top_blame();
        let (ends_at, end_seq) = match status {
            AlertStatus::Firing => (ENDS_AT_UNSET.to_string(), None),
            AlertStatus::Resolved => (rfc3339_utc(ep.last_above_time), Some(ep.last_above_seq)),
        };
        let mut annotations = BTreeMap::new();
        annotations.insert(
            "summary".to_string(),
            summary(&self.stream, ep.peak_score, ep.peak_threshold),
        );
        let mut description = match end_seq {
            Some(end) if end == ep.start_seq => format!("Frame {end}"),
            Some(end) => format!("Frames {}–{end}", ep.start_seq),
            None => format!("Since frame {}", ep.start_seq),
        };
        let _ = write!(description, ", peak at frame {}; top features", ep.peak_seq);
        if !top_features.is_empty() {
            let _ = write!(
                description,
                " (contributions summed over its {} above-threshold frame{})",
                ep.above_frames,
                if ep.above_frames == 1 { "" } else { "s" }
            );
        }
        description.push(':');
        if top_features.is_empty() {
            description.push_str(" none reported.");
        }
        for (i, f) in top_features.iter().enumerate() {
            let sep = if i == 0 { " " } else { ", " };
            let _ = write!(
                description,
                "{sep}{} ({})",
                f.feature,
                fmt_num(f.contribution)
            );
        }
        if !top_features.is_empty() {
            description.push('.');
        }
        annotations.insert("description".to_string(), description);
        let fill = |v: &str, encode: fn(&str) -> String| {
            fill_placeholders(
                v,
                &[
                    ("{stream}", &encode(&self.stream)),
                    ("{model_id}", &encode(&ep.model_id)),
                ],
            )
        };
        for (name, value) in &self.extra_annotations {
            let encode = if strip_http_scheme(value).is_some() {
                percent_encode
            } else {
                str::to_string
            };
            annotations
                .entry(name.clone())
                .or_insert_with(|| fill(value, encode));
        }
        let generator_url = if self.generator_url.is_empty() {
            String::new()
        } else {
            fill(&self.generator_url, percent_encode)
        };
        AlertEvent {
            status,
            labels: ep.labels.clone(),
            annotations,
            starts_at: rfc3339_utc(ep.start_time),
            ends_at,
            generator_url,
            fingerprint: ep.fingerprint.clone(),
            score,
            threshold,
            peak_score: ep.peak_score,
            peak_seq: ep.peak_seq,
            peak_threshold: ep.peak_threshold,
            start_seq: ep.start_seq,
            end_seq,
            seq,
            stream: self.stream.clone(),
            model_id: ep.model_id.clone(),
            model_version: ep.model_version.clone(),
            top_features,
        }
    }

    /// The features with the largest blame, largest first (ties: lower index first).
    fn top_blame(&self) -> Vec<FeatureBlame> {
        let mut idx: Vec<usize> = (0..self.blame.len())
            .filter(|&i| self.blame[i] != 0.0 && !self.blame[i].is_nan())
            .collect();
        idx.sort_by(|&a, &b| self.blame[b].total_cmp(&self.blame[a]).then(a.cmp(&b)));
        idx.truncate(self.top_features);
        idx.into_iter()
            .map(|i| FeatureBlame {
                feature: self.feature_names[i].clone(),
                contribution: self.blame[i],
            })
            .collect()
    }
}

/// Adds a frame's top contributions to the episode's blame; indices outside the feature
/// list are ignored.
fn add_blame(blame: &mut [f64], top: &[Contribution]) {
    for c in top {
        if let Some(b) = blame.get_mut(c.feature as usize)
            && c.value.is_finite()
        {
            *b += f64::from(c.value);
        }
    }
}

/// The event time of a frame: its timestamp, or its frame index when it has none.
fn event_time(seq: u64, timestamp: f64) -> f64 {
    if timestamp.is_finite() {
        timestamp
    } else {
        seq as f64
    }
}

/// The `summary` annotation: the episode's peak score with the threshold in force at the
/// peak frame (the one it crossed), never with another frame's: an adaptive threshold
/// moves during an episode. It used to pair the peak with the threshold of the frame that
/// caused the event, so a resolved event could read "peak score 242.574 above threshold
/// 344.883".
fn summary(stream: &str, peak: f32, threshold: f64) -> String {
    let peak_text = fmt_num(f64::from(peak));
    let ratio = f64::from(peak) / threshold;
    if threshold > 0.0 && ratio.is_finite() {
        let times = if ratio < 100.0 {
            format!("{ratio:.2}")
        } else {
            fmt_num(ratio)
        };
        format!(
            "Anomaly on stream {stream}: peak score {peak_text}, {times} × the threshold {} in force at that frame",
            fmt_num(threshold)
        )
    } else {
        // A ratio to a threshold of 0 or below says nothing.
        format!(
            "Anomaly on stream {stream}: peak score {peak_text}, above the threshold {} in force at that frame",
            fmt_num(threshold)
        )
    }
}

/// Short human form of a score for annotations.
fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{v:.3e}")
    } else {
        format!("{v:.3}")
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a64_extend(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME))
}

/// FNV-1a 64 of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    fnv1a64_extend(FNV_OFFSET, bytes)
}

/// A stable fingerprint of a label set: 16 lowercase hex digits of FNV-1a 64 over the
/// labels sorted by name, each as `name 0xff value 0xff` (the byte 0xff never occurs in
/// UTF-8, so no two label sets share an input). Independent of the order given;
/// deterministic across runs and platforms.
pub fn fingerprint<'a, I>(labels: I) -> String
where
    I: IntoIterator<Item = (&'a str, &'a str)>,
{
    let mut sorted: Vec<(&str, &str)> = labels.into_iter().collect();
    sorted.sort_unstable();
    let mut h = FNV_OFFSET;
    for (name, value) in sorted {
        h = fnv1a64_extend(h, name.as_bytes());
        h = fnv1a64_extend(h, &[0xff]);
        h = fnv1a64_extend(h, value.as_bytes());
        h = fnv1a64_extend(h, &[0xff]);
    }
    format!("{h:016x}")
}

/// Epoch seconds as an RFC 3339 UTC timestamp, `YYYY-MM-DDTHH:MM:SS.mmmZ`: always with
/// milliseconds (rounded to the nearest), so every time in an event has one format and
/// length whether the input's times had a fraction (raw frames) or not (ExaMon windows).
/// Clamped to years 0000–9999; NaN formats as the epoch.
pub fn rfc3339_utc(epoch_secs: f64) -> String {
    // 0000-01-01T00:00:00Z and 9999-12-31T23:59:59.999Z.
    const MIN_MS: i64 = -62_167_219_200_000;
    const MAX_MS: i64 = 253_402_300_799_999;
    let ms = if epoch_secs.is_nan() {
        0
    } else {
        // `as` saturates on overflow; the clamp then keeps four-digit years.
        ((epoch_secs * 1000.0).round() as i64).clamp(MIN_MS, MAX_MS)
    };
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01
/// (H. Hinnant's `civil_from_days`: eras of 400 years, years starting in March).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..=146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of March-based year
    let mp = (5 * doy + 2) / 153; // month, March = 0
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(feature: u32, value: f32) -> Contribution {
        Contribution { feature, value }
    }

    fn names(n: usize) -> Arc<[String]> {
        (0..n).map(|i| format!("f{i}")).collect()
    }

    fn state(cfg: &AlertConfig) -> AlertState {
        AlertState::new(cfg, "node7", "abc123", "1", names(4))
    }

    /// Feeds `pattern` (1 = above threshold 1.0, score 2.0; 0 = score 0.5) from frame
    /// `first_seq`, timestamps 1000 + seq; returns (seq, event) for every event.
    fn feed(st: &mut AlertState, first_seq: u64, pattern: &[u8]) -> Vec<(u64, AlertEvent)> {
        let top = [c(2, 1.5), c(0, 0.5)];
        let mut out = Vec::new();
        for (i, &p) in pattern.iter().enumerate() {
            let seq = first_seq + i as u64;
            let obs = Observation {
                seq,
                timestamp: 1000.0 + seq as f64,
                score: if p == 1 { 2.0 } else { 0.5 },
                threshold: 1.0,
                top: if p == 1 { &top } else { &top[1..] },
            };
            if let Some(e) = st.observe(&obs) {
                out.push((seq, e));
            }
        }
        out
    }

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        assert_eq!(AlertConfig::default().validate(), Ok(()));
        let bad = |f: fn(&mut AlertConfig)| {
            let mut c = AlertConfig::default();
            f(&mut c);
            c.validate().unwrap_err().0
        };
        assert_eq!(bad(|c| c.fire_k = 6), "fire_k");
        assert_eq!(bad(|c| c.fire_k = 0), "fire_k");
        assert_eq!(bad(|c| c.fire_n = 65), "fire_n");
        assert_eq!(bad(|c| c.resolve_after_frames = 0), "resolve_after_frames");
        assert_eq!(bad(|c| c.alertname.clear()), "alertname");
        assert_eq!(bad(|c| c.resend_secs = -1.0), "resend_secs");
        assert_eq!(bad(|c| c.resend_secs = f64::NAN), "resend_secs");
        assert_eq!(bad(|c| c.silence_secs = Some(-5.0)), "silence_secs");
        assert_eq!(
            bad(|c| c.silence_secs = Some(f64::INFINITY)),
            "silence_secs"
        );
        let c: Result<AlertConfig, _> = toml::from_str("fire_kk = 3");
        assert!(c.is_err(), "unknown keys are rejected");
        let c: AlertConfig = toml::from_str("fire_k = 2").unwrap();
        assert_eq!((c.fire_k, c.fire_n), (2, 5));
    }

    /// `[alert] labels` are validated as Prometheus label names, may not replace a built-in
    /// label, and label every event (its fingerprint included); `{node}` is filled in.
    #[test]
    fn static_labels_are_checked_and_carried() {
        let with = |name: &str, value: &str| {
            let mut c = AlertConfig::default();
            c.labels.insert(name.into(), value.into());
            c
        };
        assert_eq!(with("cluster", "leonardo").validate(), Ok(()));
        assert_eq!(with("_x9", "{node}.example").validate(), Ok(()));
        for (name, value) in [
            ("9lives", "x"),
            ("has-dash", "x"),
            ("", "x"),
            ("__meta", "x"),
            ("stream", "x"),
            ("severity", "x"),
            ("cluster", ""),
            ("instance", "{hostname}"),
        ] {
            let err = with(name, value).validate().unwrap_err();
            assert_eq!(err.0, "labels", "{name:?} = {value:?}");
        }
        let cfg: AlertConfig =
            toml::from_str("[labels]\ncluster = \"leonardo\"\ninstance = \"{node}:9464\"").unwrap();
        let mut node_cfg = cfg.clone();
        node_cfg.labels = cfg.labels_for_node("r7n3");
        assert_eq!(node_cfg.labels["instance"], "r7n3:9464");
        let plain = feed(&mut state(&AlertConfig::default()), 0, &[1, 1, 1]);
        let labelled = feed(&mut state(&node_cfg), 0, &[1, 1, 1]);
        let (e, p) = (&labelled[0].1, &plain[0].1);
        assert_eq!(e.labels["cluster"], "leonardo");
        assert_eq!(e.labels["instance"], "r7n3:9464");
        assert_eq!(e.labels["stream"], "node7");
        assert_eq!(e.labels.len(), p.labels.len() + 2);
        assert_ne!(e.fingerprint, p.fingerprint);
        assert_eq!(
            e.fingerprint,
            fingerprint(e.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        );
    }

    /// `[alert] annotations` and `generator_url` are validated, reach every event (firing
    /// and resolved) with `{node}`, `{stream}` and `{model_id}` filled in (percent-encoded
    /// in the URL), never replace the built-in annotations, and leave the fingerprint alone.
    #[test]
    fn annotations_and_generator_url_are_checked_and_carried() {
        let ann = |name: &str, value: &str| {
            let mut c = AlertConfig::default();
            c.annotations.insert(name.into(), value.into());
            c.validate()
        };
        assert_eq!(
            ann("runbook_url", "https://wiki/{stream}?m={model_id}&n={node}"),
            Ok(())
        );
        for (name, value) in [
            ("summary", "x"),
            ("ended_by", "x"),
            ("run-book", "x"),
            ("__x", "x"),
            ("runbook_url", ""),
            ("runbook_url", "https://wiki/{host}"),
            ("runbook_url", "{stream}{streams}"),
        ] {
            assert_eq!(
                ann(name, value).unwrap_err().0,
                "annotations",
                "{name:?} = {value:?}"
            );
        }
        let url = |u: &str| {
            let c = AlertConfig {
                generator_url: u.into(),
                ..AlertConfig::default()
            };
            c.validate()
        };
        assert_eq!(
            url("http://grafana:3000/d/dw?var-node={node}&var-stream={stream}"),
            Ok(())
        );
        for u in [
            "grafana:3000/d",
            "ftp://x",
            "https://",
            "http:///path",
            "http://g/d?x=a b",
            "http://g/{node}/{instance}",
            "http://g/d?x={stream",
            "http://g/d?x=}",
            "http://g/d/100%-cpu",
            "http://g/d/%4",
            "http://?x",
        ] {
            assert_eq!(url(u).unwrap_err().0, "generator_url", "{u:?}");
        }
        assert_eq!(url("HTTPS://g/d/100%25-cpu?m={model_id}"), Ok(()));

        let mut cfg = AlertConfig::default();
        cfg.annotations.insert(
            "runbook_url".into(),
            "https://wiki/dw#{stream}@{node}".into(),
        );
        cfg.annotations.insert("model".into(), "{model_id}".into());
        cfg.annotations
            .insert("where".into(), "{stream} on {node}".into());
        cfg.generator_url = "http://g/d?var-node={node}&var-stream={stream}&m={model_id}".into();
        let cfg = cfg.for_node("r7 n3");
        let mut st = AlertState::new(&cfg, "rack 4/node{stream}", "abc123", "1", names(4));
        let ev = feed(&mut st, 0, &[1, 1, 1, 0, 0, 0, 0, 0]);
        assert_eq!(ev.len(), 2, "fired and resolved");
        let plain = feed(&mut state(&AlertConfig::default()), 0, &[1, 1, 1]);
        for (_, e) in &ev {
            assert_eq!(
                e.annotations["runbook_url"], "https://wiki/dw#rack%204%2Fnode%7Bstream%7D@r7%20n3",
                "a link's placeholders are percent-encoded, once"
            );
            assert_eq!(
                e.annotations["where"], "rack 4/node{stream} on r7 n3",
                "other annotations are filled in as they are, once"
            );
            assert_eq!(e.annotations["model"], "abc123");
            assert!(e.annotations["summary"].contains("rack 4/node{stream}"));
            assert_eq!(
                e.generator_url,
                "http://g/d?var-node=r7%20n3&var-stream=rack%204%2Fnode%7Bstream%7D&m=abc123"
            );
            let json = serde_json::to_value(e.postable()).unwrap();
            assert_eq!(json["generatorURL"], e.generator_url.as_str());
            assert_eq!(json["annotations"]["model"], "abc123");
        }
        let mut same_stream = state(&AlertConfig::default());
        same_stream.stream = "rack 4/node{stream}".into();
        let bare = feed(&mut same_stream, 0, &[1, 1, 1]);
        assert_eq!(
            ev[0].1.fingerprint, bare[0].1.fingerprint,
            "annotations are not identity"
        );
        let json = serde_json::to_value(&plain[0].1).unwrap();
        assert!(
            json.get("generatorURL").is_none(),
            "left out when unset: {json}"
        );
        assert!(
            serde_json::to_value(plain[0].1.postable())
                .unwrap()
                .get("generatorURL")
                .is_none()
        );

        // A reload that changes only the links keeps the episode; its next event has them.
        let mut st = state(&AlertConfig::default());
        assert_eq!(feed(&mut st, 0, &[1, 1, 1]).len(), 1);
        st.set_links(&cfg);
        let resolved = feed(&mut st, 3, &[0, 0, 0, 0, 0]);
        assert_eq!(resolved.len(), 1);
        assert_eq!(resolved[0].1.annotations["model"], "abc123");
        assert!(resolved[0].1.generator_url.contains("var-stream=node7"));
    }

    #[test]
    fn k_of_n_fires_on_the_kth_above_frame_in_the_window() {
        let mut st = state(&AlertConfig::default());
        let ev = feed(&mut st, 0, &[1, 0, 1, 1, 1, 1]);
        assert_eq!(ev.len(), 1);
        let (seq, e) = &ev[0];
        assert_eq!(*seq, 3, "the third above frame of 1,0,1,1 fires");
        assert_eq!(e.status, AlertStatus::Firing);
        assert_eq!(
            e.start_seq, 0,
            "the episode starts at its first above frame"
        );
        assert_eq!(e.starts_at, "1970-01-01T00:16:40.000Z"); // timestamp 1000
        assert_eq!(e.ends_at, ENDS_AT_UNSET);
        assert_eq!(e.end_seq, None);
        assert!(st.is_firing());
    }

    #[test]
    fn window_slides_so_spread_out_spikes_never_fire() {
        let mut st = state(&AlertConfig::default());
        // Every third frame: at most 2 above frames in any 5.
        let ev = feed(&mut st, 0, &[1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0]);
        assert!(ev.is_empty());
        // Two above frames, then the first leaves the window before the third arrives.
        let mut st = state(&AlertConfig::default());
        assert!(feed(&mut st, 0, &[1, 1, 0, 0, 0, 1]).is_empty());
    }

    #[test]
    fn a_single_spike_never_fires_with_k3() {
        let mut st = state(&AlertConfig::default());
        let mut pattern = vec![0u8; 50];
        pattern[20] = 1;
        assert!(feed(&mut st, 0, &pattern).is_empty());
        assert!(!st.is_firing());
    }

    #[test]
    fn resolves_after_the_quiet_frames_with_ends_at_of_last_above_frame() {
        let mut st = state(&AlertConfig::default()); // resolve_after_frames = 5
        let ev = feed(&mut st, 10, &[1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].0, 12);
        // Last above frame is 14; quiet frames 15..=19; resolved at the 5th.
        let (seq, e) = &ev[1];
        assert_eq!(*seq, 19);
        assert_eq!(e.status, AlertStatus::Resolved);
        assert_eq!(e.seq, 19);
        assert_eq!((e.start_seq, e.end_seq), (10, Some(14)));
        assert_eq!(e.starts_at, rfc3339_utc(1010.0));
        assert_eq!(e.ends_at, rfc3339_utc(1014.0));
        assert_eq!(e.ends_at, "1970-01-01T00:16:54.000Z");
        assert_eq!(e.fingerprint, ev[0].1.fingerprint);
        assert_eq!(e.labels, ev[0].1.labels);
        assert!(!st.is_firing());
    }

    #[test]
    fn suppression_blocks_a_refire_then_allows_it() {
        let cfg = AlertConfig {
            resolve_after_frames: 2,
            suppress_frames: 4,
            ..AlertConfig::default()
        };
        let mut st = state(&cfg);
        // Fires at 2, resolves at 4. Frames 5..=8 are suppressed although 5,6,7 are above.
        let ev = feed(&mut st, 0, &[1, 1, 1, 0, 0, 1, 1, 1, 1, 1]);
        let seqs: Vec<(u64, AlertStatus)> = ev.iter().map(|(s, e)| (*s, e.status)).collect();
        assert_eq!(
            seqs,
            vec![
                (2, AlertStatus::Firing),
                (4, AlertStatus::Resolved),
                (9, AlertStatus::Firing)
            ]
        );
        // The re-fire's episode starts at the first above frame still in the window.
        assert_eq!(ev[2].1.start_seq, 5);

        // Without suppression the same input re-fires at 7.
        let mut st = state(&AlertConfig {
            suppress_frames: 0,
            ..cfg
        });
        let ev = feed(&mut st, 0, &[1, 1, 1, 0, 0, 1, 1, 1]);
        assert_eq!(ev.last().map(|(s, _)| *s), Some(7));
    }

    #[test]
    fn episode_tracks_peak_and_blame_over_all_above_frames() {
        let mut st = state(&AlertConfig {
            resolve_after_frames: 1,
            top_features: 2,
            ..AlertConfig::default()
        });
        let top_a = [c(1, 3.0)];
        // Feature 99 is not a known feature: ignored.
        let top_b = [c(3, 2.0), c(1, 0.25), c(99, 100.0)];
        let frames: [(f32, &[Contribution]); 6] = [
            (5.0, &top_a),
            (9.0, &top_b),
            (0.1, &top_a), // below: no blame
            (6.0, &top_b), // fires here
            (7.0, &top_b),
            (0.0, &top_a), // resolves
        ];
        let mut events = Vec::new();
        for (i, (score, top)) in frames.iter().enumerate() {
            let obs = Observation {
                seq: i as u64,
                timestamp: f64::NAN,
                score: *score,
                threshold: 1.0,
                top,
            };
            events.extend(st.observe(&obs));
        }
        assert_eq!(events.len(), 2);
        let fired = &events[0];
        assert_eq!((fired.seq, fired.peak_score, fired.peak_seq), (3, 9.0, 1));
        // Frames 0, 1, 3: f1 = 3 + 0.25 + 0.25, f3 = 2 + 2.
        assert_eq!(
            fired.top_features,
            vec![
                FeatureBlame {
                    feature: "f3".into(),
                    contribution: 4.0
                },
                FeatureBlame {
                    feature: "f1".into(),
                    contribution: 3.5
                },
            ]
        );
        assert!(
            fired.annotations["description"].starts_with(
                "Since frame 0, peak at frame 1; top features (contributions summed over its 3 above-threshold frames): f3 (4.000), f1 (3.500)."
            ),
            "{}",
            fired.annotations["description"]
        );
        let resolved = &events[1];
        assert_eq!(resolved.end_seq, Some(4));
        // Prose, not Rust's range syntax (it read "Frames 0..=4").
        assert!(
            resolved.annotations["description"].starts_with("Frames 0–4, peak at frame "),
            "{}",
            resolved.annotations["description"]
        );
        assert_eq!(resolved.top_features[0].contribution, 6.0);
        assert_eq!(resolved.top_features[1].contribution, 3.75);
        assert!(
            resolved.annotations["description"]
                .contains("summed over its 4 above-threshold frames): f3 (6.000), f1 (3.750)"),
            "{}",
            resolved.annotations["description"]
        );
        // NaN timestamps: the frame index stands in as epoch seconds.
        assert_eq!(resolved.starts_at, "1970-01-01T00:00:00.000Z");
        assert_eq!(resolved.ends_at, "1970-01-01T00:00:04.000Z");
        // Blame starts afresh for the next episode.
        let ev = feed(&mut st, 6, &[0, 0, 0, 0, 0, 0, 1, 1, 1]);
        assert_eq!(ev[0].1.top_features[0].contribution, 4.5); // f2 = 3 x 1.5
    }

    #[test]
    fn nan_scores_and_thresholds_count_as_quiet() {
        let mut st = state(&AlertConfig::default());
        for seq in 0..10 {
            let obs = Observation {
                seq,
                timestamp: f64::NAN,
                score: if seq % 2 == 0 { f32::NAN } else { 5.0 },
                threshold: if seq % 2 == 0 { 1.0 } else { f64::NAN },
                top: &[],
            };
            assert!(st.observe(&obs).is_none());
        }
    }

    #[test]
    fn active_and_finish_report_the_open_episode() {
        let mut st = state(&AlertConfig::default());
        assert!(st.active().is_none());
        assert!(st.finish().is_none());
        feed(&mut st, 0, &[1, 1, 1, 1, 0]);
        let a = st.active().unwrap();
        assert_eq!((a.status, a.seq, a.start_seq), (AlertStatus::Firing, 4, 0));
        let f = st.finish().unwrap();
        assert_eq!((f.status, f.end_seq), (AlertStatus::Resolved, Some(3)));
        assert!(!st.is_firing());
        // A one-frame episode is one frame, not a range.
        let mut st = state(&AlertConfig {
            fire_k: 1,
            fire_n: 1,
            resolve_after_frames: 1,
            ..AlertConfig::default()
        });
        let ev = feed(&mut st, 7, &[1, 0]);
        let d = &ev[1].1.annotations["description"];
        assert!(d.starts_with("Frame 7, peak at frame 7;"), "{d}");
    }

    #[test]
    fn labels_are_frozen_for_the_episode() {
        let mut st = state(&AlertConfig::default());
        let fired = feed(&mut st, 0, &[1, 1, 1]);
        st.set_model("def456", "2");
        let resolved = feed(&mut st, 3, &[0, 0, 0, 0, 0]);
        assert_eq!(resolved[0].1.fingerprint, fired[0].1.fingerprint);
        assert_eq!(resolved[0].1.model_id, "abc123");
        let refired = feed(&mut st, 8, &[1, 1, 1]);
        assert_eq!(refired[0].1.labels["model_id"], "def456");
        assert_ne!(refired[0].1.fingerprint, fired[0].1.fingerprint);
    }

    #[test]
    fn fnv1a64_matches_reference_vectors() {
        // From the FNV reference test suite.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn fingerprint_is_stable_and_label_order_independent() {
        let a = fingerprint([
            ("alertname", "X"),
            ("stream", "s1"),
            ("severity", "warning"),
        ]);
        let b = fingerprint([
            ("stream", "s1"),
            ("severity", "warning"),
            ("alertname", "X"),
        ]);
        assert_eq!(a, b);
        assert_eq!(a.len(), 16);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        // Pinned: must not change between runs, builds or versions.
        let bytes = b"alertname\xffX\xffseverity\xffwarning\xffstream\xffs1\xff";
        assert_eq!(a, format!("{:016x}", fnv1a64(bytes)));
        assert_eq!(
            fingerprint([("a", "b")]),
            format!("{:016x}", fnv1a64(b"a\xffb\xff"))
        );
        // Moving bytes between name and value changes it.
        assert_ne!(fingerprint([("ab", "c")]), fingerprint([("a", "bc")]));
        assert_ne!(a, fingerprint([("alertname", "X"), ("stream", "s2")]));
    }

    /// Every time in an event has one format, to the millisecond: an ExaMon window's end
    /// (whole seconds) used to read `…15:07:59Z` and a raw frame's `…15:23:34.545Z`, and a
    /// firing alert's `endsAt` Go's zero time without milliseconds.
    #[test]
    fn every_time_in_an_event_is_to_the_millisecond() {
        let shape = |t: &str| {
            t.len() == 24
                && t.ends_with('Z')
                && t.as_bytes()[19] == b'.'
                && t[20..23].bytes().all(|b| b.is_ascii_digit())
        };
        for timestamp in [1_795_000_000.0, 1_795_000_000.545, f64::NAN] {
            let mut st = state(&AlertConfig {
                resolve_after_frames: 1,
                ..AlertConfig::default()
            });
            let mut events = Vec::new();
            for (seq, score) in [2.0f32, 2.0, 2.0, 0.5].into_iter().enumerate() {
                let obs = Observation {
                    seq: seq as u64,
                    timestamp: timestamp + seq as f64,
                    score,
                    threshold: 1.0,
                    top: &[],
                };
                events.extend(st.observe(&obs));
            }
            assert_eq!(events.len(), 2);
            for e in &events {
                let v = serde_json::to_value(e).unwrap();
                for key in ["startsAt", "endsAt"] {
                    let t = v[key].as_str().unwrap();
                    assert!(shape(t), "{key} {t:?} of {timestamp}");
                }
            }
            assert_eq!(events[0].ends_at, ENDS_AT_UNSET);
        }
        assert_eq!(ENDS_AT_UNSET, "0001-01-01T00:00:00.000Z");
    }

    /// The trial: with a threshold that moved during the episode (SPOT adapts), the
    /// resolved event's summary paired the peak with the resolving frame's threshold and
    /// read "peak score 242.574 above threshold 344.883". The peak now goes with the
    /// threshold it crossed, in the summary and in `peak_threshold`; `threshold` stays the
    /// one beside `score`, at frame `seq`.
    #[test]
    fn the_peak_is_reported_with_the_threshold_it_crossed() {
        let mut st = state(&AlertConfig {
            resolve_after_frames: 2,
            ..AlertConfig::default()
        });
        // (score, threshold): the peak, 242.574, crosses 186.6 at frame 1; the threshold
        // then climbs to 344.883 by the resolving frame.
        let frames: [(f32, f64); 7] = [
            (200.0, 180.0),
            (242.574, 186.6),
            (230.0, 190.0),
            (250.0, 260.0),
            (300.0, 290.0),
            (100.0, 320.0),
            (120.0, 344.883),
        ];
        let mut events = Vec::new();
        for (seq, (score, threshold)) in frames.into_iter().enumerate() {
            let obs = Observation {
                seq: seq as u64,
                timestamp: 1000.0 + seq as f64,
                score,
                threshold,
                top: &[],
            };
            events.extend(st.observe(&obs));
        }
        assert_eq!(events.len(), 2, "{events:?}");
        let (fired, resolved) = (&events[0], &events[1]);
        // Fired at frame 2; its peak (frame 1) is from the window, before the firing frame.
        assert_eq!((fired.seq, fired.peak_seq), (2, 1));
        assert_eq!((fired.threshold, fired.peak_threshold), (190.0, 186.6));
        assert_eq!(resolved.status, AlertStatus::Resolved);
        // Frame 4 (300 above 290) became the peak.
        assert_eq!((resolved.peak_score, resolved.peak_seq), (300.0, 4));
        assert_eq!(resolved.peak_threshold, 290.0);
        assert_eq!((resolved.seq, resolved.threshold), (6, 344.883));
        assert_eq!(
            resolved.annotations["summary"],
            "Anomaly on stream node7: peak score 300.000, 1.03 × the threshold 290.000 in force at that frame"
        );
        assert_eq!(
            fired.annotations["summary"],
            "Anomaly on stream node7: peak score 242.574, 1.30 × the threshold 186.600 in force at that frame"
        );
        let json = serde_json::to_value(resolved).unwrap();
        assert_eq!(json["peak_threshold"], 290.0);
        assert_eq!(json["threshold"], 344.883);
        // A threshold of 0 or below gives no ratio.
        assert_eq!(
            summary("s", 2.0, 0.0),
            "Anomaly on stream s: peak score 2.000, above the threshold 0.000 in force at that frame"
        );
        assert!(summary("s", 2e6, 0.5).contains("4.000e6 × the threshold 0.500"));
    }

    #[test]
    fn rfc3339_by_hand() {
        assert_eq!(rfc3339_utc(1_700_000_000.0), "2023-11-14T22:13:20.000Z");
        assert_eq!(rfc3339_utc(1_700_000_000.25), "2023-11-14T22:13:20.250Z");
        assert_eq!(rfc3339_utc(1_700_000_000.000_4), "2023-11-14T22:13:20.000Z");
        assert_eq!(rfc3339_utc(1_700_000_000.999_6), "2023-11-14T22:13:21.000Z");
        assert_eq!(rfc3339_utc(0.0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc(f64::NAN), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc(-1.0), "1969-12-31T23:59:59.000Z");
        assert_eq!(rfc3339_utc(-0.5), "1969-12-31T23:59:59.500Z");
        assert_eq!(rfc3339_utc(1_700_000_000.007), "2023-11-14T22:13:20.007Z");
        // 2000-02-29 (a leap day of a century leap year): 11016 days.
        assert_eq!(rfc3339_utc(951_782_400.0), "2000-02-29T00:00:00.000Z");
        // 2100 is not a leap year: 2100-02-28 + 1 day = 2100-03-01.
        assert_eq!(rfc3339_utc(4_107_542_400.0), "2100-03-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc(1e300), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_utc(-1e300), "0000-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc(f64::INFINITY), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn event_json_has_the_alertmanager_keys() {
        let mut st = state(&AlertConfig::default());
        let ev = feed(&mut st, 0, &[1, 1, 1, 0, 0, 0, 0, 0]);
        let fired = serde_json::to_value(&ev[0].1).unwrap();
        for key in [
            "status",
            "labels",
            "annotations",
            "startsAt",
            "endsAt",
            "fingerprint",
        ] {
            assert!(fired.get(key).is_some(), "missing {key}: {fired}");
        }
        for key in [
            "score",
            "threshold",
            "peak_score",
            "start_seq",
            "end_seq",
            "model_id",
            "model_version",
            "top_features",
        ] {
            assert!(fired.get(key).is_some(), "missing {key}: {fired}");
        }
        assert_eq!(fired["status"], "firing");
        assert_eq!(fired["labels"]["alertname"], "DarkwatchAnomaly");
        assert_eq!(fired["labels"]["stream"], "node7");
        assert_eq!(fired["labels"]["model_id"], "abc123");
        assert_eq!(fired["labels"]["severity"], "warning");
        assert!(fired["annotations"]["summary"].is_string());
        assert!(
            fired["annotations"]["description"]
                .as_str()
                .unwrap()
                .contains("f2")
        );
        assert_eq!(fired["top_features"][0]["feature"], "f2");
        assert_eq!(fired["top_features"][0]["contribution"], 4.5);
        assert!(fired.get("starts_at").is_none());

        let resolved = serde_json::to_value(&ev[1].1).unwrap();
        assert_eq!(resolved["status"], "resolved");
        assert_eq!(resolved["endsAt"], "1970-01-01T00:16:42.000Z");

        // The Alertmanager API view: only its own fields; endsAt only once resolved.
        let p = serde_json::to_value(ev[0].1.postable()).unwrap();
        let mut keys: Vec<&str> = p.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["annotations", "labels", "startsAt"]);
        let p = serde_json::to_value(ev[1].1.postable()).unwrap();
        assert_eq!(p["endsAt"], "1970-01-01T00:16:42.000Z");
    }

    #[test]
    fn window_of_64_frames_works() {
        let mut st = state(&AlertConfig {
            fire_k: 64,
            fire_n: 64,
            ..AlertConfig::default()
        });
        let ev = feed(&mut st, 0, &[1u8; 64]);
        assert_eq!(ev.len(), 1);
        assert_eq!((ev[0].0, ev[0].1.start_seq), (63, 0));
    }
}
