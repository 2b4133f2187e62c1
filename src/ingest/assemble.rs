//! Samples and frame assembly: the common currency of the message decoders, and the
//! per-stream windowing that turns single-metric samples into model frames.
//!
//! Fed by the decoders ([`super::examon`], [`super::telegraf`]), each of which turns one
//! MQTT message into [`Sample`]s or a [`DecodeError`] whose [`DecodeError::reason`] names
//! a counter. The [`Assembler`] buckets samples by stream and `floor(timestamp /
//! window_secs)`, aggregates each metric within a window, and emits one frame of `d`
//! values per stream and window, in the model's feature order, for the frame ring
//! ([`crate::ring`]). Raw frames ([`super::raw`]) skip this step.
//!
//! A window closes once a sample of the same stream lands `lateness_windows + 1`
//! windows later, or once the stream's own clock ([`Assembler::poll_streams`]: its newest
//! sample's time plus the monotonic time since that sample arrived) or the caller's clock
//! ([`Assembler::poll`]'s `now`) is that far past it; with `close_when_complete`, also as soon as every feature has a sample in it
//! (with the stream's older windows), so that its frame leaves with the last metric. Windows that received no sample at all produce no frame. Memory is bounded:
//! at most `max_streams` streams, each with `(lateness_windows + 1) × d` accumulators
//! sized when the stream first appears; after warm-up a sample for a known stream
//! allocates nothing.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::Clipped;

/// One metric value of one stream at one time, as decoded from a message.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    /// Stream id (for ExaMon and Telegraf, the node / host).
    pub stream: Cow<'a, str>,
    /// Metric name, matched against the model's feature names.
    pub metric: Cow<'a, str>,
    /// The value; decoders only produce finite values.
    pub value: f64,
    /// Event time in epoch seconds.
    pub timestamp: f64,
}

impl Sample<'_> {
    /// A copy that owns its strings (allocates only for borrowed ones).
    pub fn into_owned(self) -> Sample<'static> {
        Sample {
            stream: Cow::Owned(self.stream.into_owned()),
            metric: Cow::Owned(self.metric.into_owned()),
            value: self.value,
            timestamp: self.timestamp,
        }
    }
}

/// Where a decoded sample came from, beyond its stream and metric: its Telegraf tag set or
/// its ExaMon topic. Two samples of one stream and metric with different origins are two
/// series merged into one feature ([`Assembler::take_mixed`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Origin<'a> {
    /// A hash of the origin; 0: unknown, not tracked.
    pub hash: u64,
    /// The origin as the sender wrote it (tags `k=v,…` or the topic), for the log.
    pub text: &'a str,
}

/// 64-bit FNV-1a of `bytes`, continuing from `h` (start with [`FNV_START`]): the origin
/// hashes, cheap over a topic or a tag, and the same on every platform and run.
pub(crate) fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// FNV-1a's offset basis.
pub(crate) const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// Two series found merged into one feature of one stream ([`Assembler::take_mixed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mixed {
    /// The feature (metric) name.
    pub metric: String,
    /// The stream.
    pub stream: String,
    /// The origins of two of its series ([`Origin::text`]).
    pub origins: [String; 2],
}

/// Where merge detection stands for one feature.
#[derive(Debug, Clone, PartialEq, Eq)]
enum MixState {
    /// No second origin seen.
    Clean,
    /// In stream `stream`, origin `second` came after `first`; reported once both have a
    /// sample in one window (their latest windows and texts are kept), so that a tag
    /// that changes now and then (`nvidia_smi`'s `pstate`) is not taken for two series
    /// sent side by side.
    Pending {
        stream: usize,
        first: u64,
        second: u64,
        first_text: String,
        first_window: Option<i64>,
        second_text: String,
        second_window: i64,
    },
    /// Reported (once per feature for the assembler's life).
    Reported,
}

/// Why a message (or one sample of it) was not decoded. [`Self::reason`] is a stable
/// label for the `darkwatch_messages_rejected_total{reason}` counter; quoted input
/// is clipped so that messages stay short.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("message is {len} bytes, over the {max}-byte limit")]
    TooLarge { len: usize, max: usize },

    #[error("payload is not valid UTF-8")]
    NotUtf8,

    #[error("bad topic: {0}")]
    BadTopic(&'static str),

    #[error("topic channel is {:?}, not \"data\"", Clipped(.0))]
    NotDataChannel(String),

    #[error("no {:?} tag or topic key to take the stream id from", Clipped(.key))]
    MissingStream { key: String },

    #[error("bad payload: {0}")]
    BadPayload(&'static str),

    #[error("value {:?} is not a number", Clipped(.0))]
    NonNumeric(String),

    #[error("string field skipped (only numbers and booleans are scored)")]
    StringField,

    #[error("value is NaN or infinite")]
    NonFinite,

    #[error("timestamp is missing and no receive time was given")]
    TimestampMissing,

    #[error("timestamp {:?} is not a non-negative epoch time", Clipped(.0))]
    TimestampInvalid(String),

    #[error("frame is {got} bytes; expected {expected}")]
    WrongLength { expected: usize, got: usize },
}

impl DecodeError {
    /// Every [`DecodeError::reason`], in the order of [`DecodeError::reason_index`].
    pub const REASONS: [&'static str; 12] = [
        "too_large",
        "not_utf8",
        "bad_topic",
        "not_data_channel",
        "missing_stream",
        "bad_payload",
        "non_numeric",
        "string_field",
        "non_finite",
        "timestamp_missing",
        "timestamp_invalid",
        "wrong_length",
    ];

    /// The position of [`DecodeError::reason`] in [`DecodeError::REASONS`].
    pub fn reason_index(&self) -> usize {
        let reason = self.reason();
        Self::REASONS.iter().position(|&r| r == reason).unwrap_or(0)
    }

    /// Stable snake_case label of the variant, for counters.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::NotUtf8 => "not_utf8",
            DecodeError::BadTopic(_) => "bad_topic",
            DecodeError::NotDataChannel(_) => "not_data_channel",
            DecodeError::MissingStream { .. } => "missing_stream",
            DecodeError::BadPayload(_) => "bad_payload",
            DecodeError::NonNumeric(_) => "non_numeric",
            DecodeError::StringField => "string_field",
            DecodeError::NonFinite => "non_finite",
            DecodeError::TimestampMissing => "timestamp_missing",
            DecodeError::TimestampInvalid(_) => "timestamp_invalid",
            DecodeError::WrongLength { .. } => "wrong_length",
        }
    }
}

/// At most this many characters of bad input are kept in an error.
const CLIP_CHARS: usize = 40;

/// Owned copy of at most [`CLIP_CHARS`] characters of `s` (errors keep their context
/// without holding a whole payload).
pub(crate) fn clip(s: &str) -> String {
    match s.char_indices().nth(CLIP_CHARS) {
        None => s.to_owned(),
        Some((cut, _)) => s[..cut].to_owned(),
    }
}

/// A finite number from text: `NonNumeric` if it does not parse, `NonFinite` for
/// NaN/Inf (Rust's parser accepts `nan`, `inf`, `infinity`).
pub(crate) fn parse_value(s: &str) -> Result<f64, DecodeError> {
    let s = s.trim();
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(_) => Err(DecodeError::NonFinite),
        Err(_) => Err(DecodeError::NonNumeric(clip(s))),
    }
}

/// A copy of `base` with one to three random bytes changed, inserted or deleted, or
/// with its tail cut off (the decoders' robustness tests).
#[cfg(test)]
pub(crate) fn mutate(rng: &mut crate::rng::Rng, base: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(v.len() + 1);
        match rng.below(4) {
            0 if at < v.len() => v[at] = rng.next_u64() as u8,
            1 => v.insert(at, rng.next_u64() as u8),
            2 if at < v.len() => {
                v.remove(at);
            }
            _ => v.truncate(at),
        }
    }
    v
}

/// How the values of one metric within one window become the frame's value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// The sample with the latest timestamp (ties: the one that arrived last).
    Last,
    /// The arithmetic mean.
    #[default]
    Mean,
    /// The largest value.
    Max,
}

/// See [`Assembler::max_ahead_secs`].
pub const MAX_AHEAD_SECS: f64 = 300.0;

/// When a sample arrived, read on two clocks ([`Assembler::push_received`]). Its timestamp
/// is compared with the wall clock, to refuse one stamped far ahead ([`Reject::Future`]).
/// The stream's event clock advances by the monotonic one ([`Assembler::poll_streams`]),
/// which an NTP step or a suspend of the host does not move, and frames carry the monotonic
/// time for the alert latency.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Receipt {
    /// Epoch seconds; unknown when not positive and finite.
    pub wall: f64,
    /// Seconds on a monotonic clock whose origin is the caller's (the agent's:
    /// `mqtt::monotonic_secs`), the one `poll_streams` is given; unknown when not finite.
    pub mono: f64,
}

impl Receipt {
    /// Neither time known: what [`Assembler::push`] uses.
    pub const UNKNOWN: Receipt = Receipt {
        wall: 0.0,
        mono: f64::NAN,
    };

    /// The wall time if known, else 0.
    fn wall(self) -> f64 {
        if self.wall.is_finite() && self.wall > 0.0 {
            self.wall
        } else {
            0.0
        }
    }
}

/// The largest `lateness_windows` accepted (each window of lateness costs `d`
/// accumulators per stream).
pub const MAX_LATENESS_WINDOWS: u32 = 64;

/// How samples become frames.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AssemblerConfig {
    /// Window length in seconds; a sample lands in window `floor(timestamp / window_secs)`
    /// and the frame carries the window's end time. Default 1.0.
    pub window_secs: f64,
    /// How several samples of one metric in one window combine. Default `mean`.
    pub aggregation: Aggregation,
    /// A metric with no sample in a window repeats its last value if that value's window
    /// is at most this many seconds older. Default (absent): 3 × `window_secs`.
    pub stale_secs: Option<f64>,
    /// Most streams tracked; samples of further streams are rejected and counted.
    /// Default 1024.
    pub max_streams: usize,
    /// How many windows behind a stream's newest window a late sample may still land.
    /// Default 1; at most [`MAX_LATENESS_WINDOWS`].
    pub lateness_windows: u32,
    /// Close a window as soon as every feature has a sample in it, instead of waiting for
    /// a later window: the frame then leaves with its last metric (lowest alert latency),
    /// and further samples for that window count as late. The stream's older windows still
    /// open close with it (incomplete ones carry values forward or are marked incomplete),
    /// so frames stay in order. For sources that send each metric once per window.
    /// Default false.
    pub close_when_complete: bool,
    /// A stream that sent nothing for this long is forgotten: its state is dropped here,
    /// in the lag windows and downstream (smoothing, threshold, alert, retraining), and
    /// its slot is free at once for the next new stream (a new generation of the slot,
    /// [`crate::ring::FrameMeta::generation`]), so that streams with changing names (job
    /// or pod topics) never fill `max_streams` for good. A stream that comes back starts
    /// afresh. 0: never. Otherwise at least [`MIN_FORGET_AFTER_SECS`] after the stream's
    /// last window can have closed, `(lateness_windows + 1) × window_secs`. Default 3600
    /// (an hour, well after `[alert] silence_secs` resolved its alert). Raw input too.
    pub forget_after_secs: f64,
}

/// `[assemble] forget_after_secs` when absent: an hour.
pub const DEFAULT_FORGET_AFTER_SECS: f64 = 3600.0;

/// The least margin of `[assemble] forget_after_secs` (other than 0) past the close of a
/// stream's last window: its last frames leave within `lateness_windows + 1` windows of its
/// last sample, so they all leave before it is forgotten. The margin is no longer what
/// keeps streams apart (each frame carries its slot's generation, so no frame of a
/// forgotten stream meets the next stream's state, however far behind the scorer runs),
/// but it keeps their scores: a forgotten stream's frames that the scorer reaches only
/// after the agent let go of the stream are dropped and counted, which takes a scorer a
/// minute behind its source (a ring of 4096 frames full for that long).
pub const MIN_FORGET_AFTER_SECS: f64 = 60.0;

impl AssemblerConfig {
    /// The shortest `forget_after_secs` other than 0 (see [`MIN_FORGET_AFTER_SECS`]).
    pub fn min_forget_after_secs(&self) -> f64 {
        MIN_FORGET_AFTER_SECS + f64::from(self.lateness_windows + 1) * self.window_secs
    }
}

impl Default for AssemblerConfig {
    fn default() -> Self {
        AssemblerConfig {
            window_secs: 1.0,
            aggregation: Aggregation::Mean,
            stale_secs: None,
            max_streams: 1024,
            lateness_windows: 1,
            close_when_complete: false,
            forget_after_secs: DEFAULT_FORGET_AFTER_SECS,
        }
    }
}

impl AssemblerConfig {
    /// The running [`Assembler`] for a model with these feature names (in its order).
    ///
    /// # Errors
    /// As [`Assembler::new`].
    pub fn build(&self, feature_names: Vec<String>) -> Result<Assembler, AssemblerError> {
        Assembler::new(self.clone(), feature_names)
    }

    /// `stale_secs` with its default applied.
    pub fn effective_stale_secs(&self) -> f64 {
        self.stale_secs.unwrap_or(3.0 * self.window_secs)
    }
}

/// A configuration the assembler cannot run with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AssemblerError {
    #[error("window_secs must be a positive finite number of seconds, got {0}")]
    WindowSecs(f64),
    #[error("stale_secs must be a non-negative finite number of seconds, got {0}")]
    StaleSecs(f64),
    #[error("max_streams must be at least 1")]
    MaxStreams,
    #[error(
        "forget_after_secs must be 0 (never) or a finite number of seconds of at least {min}, got {got}: {MIN_FORGET_AFTER_SECS} s after a stream's last window can close ((lateness_windows + 1) × window_secs)"
    )]
    ForgetAfterSecs { got: f64, min: f64 },
    #[error("lateness_windows must be at most {MAX_LATENESS_WINDOWS}, got {0}")]
    LatenessWindows(u32),
    #[error("the model has no features")]
    NoFeatures,
    #[error("feature name {:?} appears twice", Clipped(.0))]
    DuplicateFeature(String),
}

impl AssemblerError {
    /// The `[assemble]` key at fault; `None` when the model's features are.
    pub fn key(&self) -> Option<&'static str> {
        match self {
            AssemblerError::WindowSecs(_) => Some("window_secs"),
            AssemblerError::StaleSecs(_) => Some("stale_secs"),
            AssemblerError::MaxStreams => Some("max_streams"),
            AssemblerError::ForgetAfterSecs { .. } => Some("forget_after_secs"),
            AssemblerError::LatenessWindows(_) => Some("lateness_windows"),
            AssemblerError::NoFeatures | AssemblerError::DuplicateFeature(_) => None,
        }
    }
}

/// Why [`Assembler::push`] did not take a sample (each is also counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// The metric is not one of the model's features.
    UnknownMetric,
    /// The sample's window is already closed.
    Late,
    /// The stream is new and `max_streams` streams are already tracked.
    TooManyStreams,
    /// Value or timestamp is NaN or infinite, or the value is beyond `f32`'s range
    /// (frames hold `f32`, where it would be infinite).
    NonFinite,
    /// The timestamp lies further ahead of the sample's receipt than
    /// [`Assembler::max_ahead_secs`]: a sender's broken clock. Accepted, it would close
    /// every open window of its stream and make the stream's real samples late.
    Future,
}

impl Reject {
    /// Every [`Reject::reason`], in the order of [`Reject::reason_index`].
    pub const REASONS: [&'static str; 5] = [
        "unknown_metric",
        "late",
        "too_many_streams",
        "non_finite",
        "future",
    ];

    /// The position of [`Reject::reason`] in [`Reject::REASONS`].
    pub fn reason_index(&self) -> usize {
        *self as usize
    }

    /// Stable snake_case label, for counters.
    pub fn reason(&self) -> &'static str {
        match self {
            Reject::UnknownMetric => "unknown_metric",
            Reject::Late => "late",
            Reject::TooManyStreams => "too_many_streams",
            Reject::NonFinite => "non_finite",
            Reject::Future => "future",
        }
    }
}

/// What the assembler has done so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AssemblerCounters {
    /// Every sample given to [`Assembler::push`].
    pub samples_in: u64,
    pub unknown_metric: u64,
    pub late_dropped: u64,
    pub streams_rejected: u64,
    pub non_finite: u64,
    pub future: u64,
    /// Frames emitted with every feature present or carried forward.
    pub frames_complete: u64,
    /// Frames emitted with NaN in at least one slot.
    pub frames_incomplete: u64,
    /// Feature values repeated from an earlier window (one per slot filled).
    pub carried_forward: u64,
}

/// One assembled frame, lent to [`Assembler::poll`]'s callback.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrameOut<'a> {
    /// Stream id.
    pub stream: &'a str,
    /// The stream's number in order of first appearance (for [`crate::ring::FrameMeta::stream`]):
    /// its slot, which a forgotten stream leaves to the next new one.
    pub stream_index: u32,
    /// How many streams held the slot before this one (for
    /// [`crate::ring::FrameMeta::generation`]).
    pub generation: u32,
    /// Position of the frame in its stream, 0-based (for [`crate::ring::FrameMeta::seq`]).
    pub seq: u64,
    /// End of the window, epoch seconds.
    pub window_end: f64,
    /// `d` values in feature order; NaN where a feature is missing.
    pub values: &'a [f32],
    /// True when some value is NaN (missing and not carried forward).
    pub incomplete: bool,
    /// Receipt of the window's latest sample on the monotonic clock ([`Receipt::mono`]);
    /// `None` when no sample of the window had one.
    pub received_mono: Option<f64>,
    /// Non-zero on the frame with which its stream became incomplete (the
    /// [`INCOMPLETE_STREAM_FRAMES`]th incomplete frame in a row): how many times the
    /// stream has become incomplete, this time included. 0 on every other frame.
    pub turned_incomplete: u32,
}

/// Incomplete frames in a row after which a stream counts as incomplete
/// ([`Assembler::incomplete_streams`]) until its next complete frame: it sends samples,
/// but never all of the model's features within `stale_secs`, so none of its frames is
/// scored. A stream's first window or two are often partial; five are not.
pub const INCOMPLETE_STREAM_FRAMES: u32 = 5;

/// A closed window waiting for [`Assembler::poll`].
#[derive(Debug)]
struct Pending {
    stream: usize,
    seq: u64,
    window: i64,
    incomplete: bool,
    received_mono: Option<f64>,
    turned_incomplete: u32,
    values: Vec<f32>,
}

/// Per-stream state, sized once when the stream first appears.
#[derive(Debug)]
struct StreamState {
    name: String,
    next_seq: u64,
    newest: Option<i64>,
    /// Every window below this is closed (emitted or empty).
    closed_before: i64,
    /// Window held by each of the `lateness + 1` slots; window `w` lives in slot
    /// `w mod (lateness + 1)`, and the open windows never span more than that.
    slot_window: Vec<Option<i64>>,
    /// Per slot, the features with a sample, and the latest monotonic receipt time of one
    /// (`None` when unknown).
    filled: Vec<u32>,
    received_mono: Vec<Option<f64>>,
    /// `slots × d` aggregation state.
    acc: Vec<f64>,
    acc_ts: Vec<f64>,
    count: Vec<u32>,
    /// Last emitted value of each feature and the window it came from.
    last_val: Vec<f64>,
    last_window: Vec<Option<i64>>,
    /// The stream's newest accepted sample time and when it arrived (monotonic seconds,
    /// [`Receipt::mono`]): this stream's event clock (see [`Assembler::poll_streams`]).
    clock: Option<(f64, f64)>,
    /// When its latest accepted sample arrived (monotonic seconds; NaN: unknown).
    last_mono: f64,
    /// Per feature, the [`Origin::hash`] of its first sample (0: none yet), to tell
    /// series merged into one feature.
    origin: Vec<u64>,
    /// Forgotten ([`Assembler::retire_quiet`]): no name maps here any more.
    retired: bool,
    /// How many streams held this slot before this one ([`FrameOut::generation`]).
    generation: u32,
    /// Incomplete frames in a row, up to the latest (0 after a complete one).
    incomplete_run: u32,
    /// Times the stream became incomplete ([`FrameOut::turned_incomplete`]).
    incomplete_turns: u32,
    /// Per [`Reject`] reason, whether one of this stream's samples was refused for it
    /// ([`Assembler::first_reject`]).
    rejected_reasons: u8,
}

impl StreamState {
    fn new(name: &str, slots: usize, d: usize) -> Self {
        StreamState {
            name: name.to_owned(),
            next_seq: 0,
            newest: None,
            closed_before: i64::MIN,
            slot_window: vec![None; slots],
            filled: vec![0; slots],
            received_mono: vec![None; slots],
            acc: vec![0.0; slots * d],
            acc_ts: vec![0.0; slots * d],
            count: vec![0; slots * d],
            last_val: vec![f64::NAN; d],
            last_window: vec![None; d],
            clock: None,
            last_mono: f64::NAN,
            origin: vec![0; d],
            retired: false,
            generation: 0,
            incomplete_run: 0,
            incomplete_turns: 0,
            rejected_reasons: 0,
        }
    }

    /// The state of a new stream `name` in this slot, keeping its buffers: the slot's next
    /// generation.
    fn reuse(&mut self, name: &str) {
        name.clone_into(&mut self.name);
        self.next_seq = 0;
        self.newest = None;
        self.closed_before = i64::MIN;
        self.slot_window.fill(None);
        self.filled.fill(0);
        self.received_mono.fill(None);
        self.acc.fill(0.0);
        self.acc_ts.fill(0.0);
        self.count.fill(0);
        self.last_val.fill(f64::NAN);
        self.last_window.fill(None);
        self.clock = None;
        self.last_mono = f64::NAN;
        self.origin.fill(0);
        self.retired = false;
        self.incomplete_run = 0;
        self.incomplete_turns = 0;
        self.rejected_reasons = 0;
        // A slot changes hands at most once per `forget_after_secs` (a minute or more):
        // u32 outlasts any agent.
        self.generation = self.generation.saturating_add(1);
    }
}

/// Turns samples into per-stream, per-window frames in the model's feature order.
#[derive(Debug)]
pub struct Assembler {
    window_secs: f64,
    aggregation: Aggregation,
    /// `stale_secs / window_secs`: how many windows back a value may be carried.
    stale_windows: f64,
    max_streams: usize,
    lateness: i64,
    close_when_complete: bool,
    feature_names: Vec<String>,
    features: HashMap<String, usize>,
    index: HashMap<String, usize>,
    streams: Vec<StreamState>,
    /// Slots of forgotten streams that a new stream may take ([`Self::retire_quiet`]).
    free: Vec<usize>,
    /// Streams ever given a slot (a new one, or a freed one again).
    allocated: u64,
    queue: VecDeque<Pending>,
    /// Value buffers of frames already handed out, reused for the next ones.
    pool: Vec<Vec<f32>>,
    /// Buffers ever allocated (tests check that it stops growing after warm-up).
    buffers_allocated: usize,
    counters: AssemblerCounters,
    /// Per feature, whether two series were seen merged into it ([`Self::take_mixed`]).
    mix: Vec<MixState>,
    /// A merge found and not yet taken.
    mixed: Option<Mixed>,
    /// Streams tracked now whose last [`INCOMPLETE_STREAM_FRAMES`] frames or more were all
    /// incomplete.
    incomplete_streams: usize,
}

impl Assembler {
    /// An assembler for a model whose frames hold `feature_names`, in that order.
    ///
    /// # Errors
    /// [`AssemblerError`] when `window_secs` is not positive and finite, `stale_secs` is
    /// negative or not finite, `max_streams` is 0, `lateness_windows` is over
    /// [`MAX_LATENESS_WINDOWS`], or the feature names are empty or repeat.
    pub fn new(cfg: AssemblerConfig, feature_names: Vec<String>) -> Result<Self, AssemblerError> {
        if !(cfg.window_secs.is_finite() && cfg.window_secs > 0.0) {
            return Err(AssemblerError::WindowSecs(cfg.window_secs));
        }
        let stale_secs = cfg.effective_stale_secs();
        if !(stale_secs.is_finite() && stale_secs >= 0.0) {
            return Err(AssemblerError::StaleSecs(stale_secs));
        }
        if cfg.max_streams == 0 {
            return Err(AssemblerError::MaxStreams);
        }
        if cfg.lateness_windows > MAX_LATENESS_WINDOWS {
            return Err(AssemblerError::LatenessWindows(cfg.lateness_windows));
        }
        let f = cfg.forget_after_secs;
        let min = cfg.min_forget_after_secs();
        if !(f == 0.0 || (f.is_finite() && f >= min)) {
            return Err(AssemblerError::ForgetAfterSecs { got: f, min });
        }
        if feature_names.is_empty() {
            return Err(AssemblerError::NoFeatures);
        }
        let d = feature_names.len();
        let mut features = HashMap::with_capacity(feature_names.len());
        for (j, name) in feature_names.iter().enumerate() {
            if features.insert(name.clone(), j).is_some() {
                return Err(AssemblerError::DuplicateFeature(name.clone()));
            }
        }
        Ok(Assembler {
            window_secs: cfg.window_secs,
            aggregation: cfg.aggregation,
            stale_windows: stale_secs / cfg.window_secs,
            max_streams: cfg.max_streams,
            lateness: i64::from(cfg.lateness_windows),
            close_when_complete: cfg.close_when_complete,
            feature_names,
            features,
            index: HashMap::new(),
            streams: Vec::new(),
            free: Vec::new(),
            allocated: 0,
            queue: VecDeque::new(),
            pool: Vec::new(),
            buffers_allocated: 0,
            counters: AssemblerCounters::default(),
            mix: vec![MixState::Clean; d],
            mixed: None,
            incomplete_streams: 0,
        })
    }

    /// Frame dimension `d`.
    pub fn dim(&self) -> usize {
        self.feature_names.len()
    }

    /// How far a sample's timestamp may lie ahead of its receipt (when that is known):
    /// [`MAX_AHEAD_SECS`], or ten windows if longer. Clocks disagree by seconds; a
    /// timestamp further ahead is a broken clock.
    pub fn max_ahead_secs(&self) -> f64 {
        MAX_AHEAD_SECS.max(10.0 * self.window_secs)
    }

    /// The model's feature names, in frame order.
    pub fn feature_names(&self) -> &[String] {
        &self.feature_names
    }

    /// Window length in seconds (`[assemble] window_secs`).
    pub fn window_secs(&self) -> f64 {
        self.window_secs
    }

    /// How many windows behind its stream's newest a sample may still land
    /// (`[assemble] lateness_windows`).
    pub fn lateness_windows(&self) -> i64 {
        self.lateness
    }

    /// Whether a window closes as soon as it is complete (`[assemble] close_when_complete`).
    pub fn closes_when_complete(&self) -> bool {
        self.close_when_complete
    }

    /// The start (epoch seconds) of stream `stream`'s oldest window still open: a sample
    /// stamped before it is [`Reject::Late`]. `None` for a stream not tracked, or one that
    /// has closed no window yet.
    pub fn open_since(&self, stream: &str) -> Option<f64> {
        let st = &self.streams[*self.index.get(stream)?];
        (st.closed_before != i64::MIN).then_some(st.closed_before as f64 * self.window_secs)
    }

    /// Streams tracked now (forgotten ones not included).
    pub fn stream_count(&self) -> usize {
        self.index.len()
    }

    /// Streams tracked now whose last [`INCOMPLETE_STREAM_FRAMES`] frames (or more) were
    /// all incomplete: they send samples, yet none of their frames is scored. A stream
    /// leaves the count at its next complete frame, or when it is forgotten.
    pub fn incomplete_streams(&self) -> usize {
        self.incomplete_streams
    }

    /// Notes that a sample of stream `stream` was refused for `why`: true the first time
    /// for this stream and reason (a bit per tracked stream, cleared when its slot goes to
    /// another), so that one node's refusals are logged even after other nodes' have
    /// taken the 1st, 2nd, 4th… of the reason. False for a stream not tracked.
    pub fn first_reject(&mut self, stream: &str, why: Reject) -> bool {
        let Some(&idx) = self.index.get(stream) else {
            return false;
        };
        let bit = 1u8 << why.reason_index();
        let st = &mut self.streams[idx];
        let first = st.rejected_reasons & bit == 0;
        st.rejected_reasons |= bit;
        first
    }

    /// The slot (frame `stream_index`) of stream `name`, if tracked.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// The generation of slot `idx` ([`FrameOut::generation`]): how many streams held it
    /// before the one that holds it now (or held it last); 0 for a slot never given out.
    pub fn generation(&self, idx: usize) -> u32 {
        self.streams.get(idx).map_or(0, |st| st.generation)
    }

    /// How many times a stream was given a slot: it changes when a sample started a new
    /// stream (or one forgotten before).
    pub fn allocated(&self) -> u64 {
        self.allocated
    }

    /// Forgets every stream whose latest sample arrived before `before` (monotonic
    /// seconds, as [`Receipt::mono`]): its name no longer maps to its slot, and its open
    /// windows, if any, are dropped unemitted (a stream quiet for that long has had them
    /// closed by [`Self::poll_streams`]), as are its closed frames not yet handed out.
    /// Appends each slot and its generation to `out`. The slot is free at once: the next
    /// new stream takes it as its next generation ([`FrameOut::generation`]), by which
    /// whatever holds state for the slot downstream tells the two streams apart. Streams
    /// whose samples had no monotonic time are kept.
    pub fn retire_quiet(&mut self, before: f64, out: &mut Vec<(u32, u32)>) {
        let first = out.len();
        for (idx, st) in self.streams.iter_mut().enumerate() {
            // An unknown arrival time (NaN) is never quiet.
            let quiet = st.last_mono < before;
            if st.retired || !quiet {
                continue;
            }
            st.retired = true;
            st.slot_window.fill(None);
            if st.incomplete_run >= INCOMPLETE_STREAM_FRAMES {
                self.incomplete_streams -= 1;
            }
            st.incomplete_run = 0;
            self.index.remove(&st.name);
            self.free.push(idx);
            out.push((idx as u32, st.generation));
        }
        if out.len() > first && !self.queue.is_empty() {
            // Handed out later, they would carry the next stream's name.
            let streams = &self.streams;
            let pool = &mut self.pool;
            self.queue.retain_mut(|p| {
                let keep = !streams[p.stream].retired;
                if !keep {
                    pool.push(std::mem::take(&mut p.values));
                }
                keep
            });
        }
    }

    /// Counters since creation.
    pub fn counters(&self) -> &AssemblerCounters {
        &self.counters
    }

    /// Closed frames not yet handed out by [`Self::poll`].
    pub fn pending_frames(&self) -> usize {
        self.queue.len()
    }

    fn window_of(&self, t: f64) -> i64 {
        // `as` saturates, so absurd timestamps land in the extreme windows, not UB.
        (t / self.window_secs).floor() as i64
    }

    /// Adds one sample to its stream's window. Frames that it closes wait for
    /// [`Self::poll`]; call `poll` after each message or batch, since closed frames
    /// queue until then.
    ///
    /// # Errors
    /// [`Reject`] when the sample is not used; each reason is also counted.
    pub fn push(&mut self, s: &Sample<'_>) -> Result<(), Reject> {
        self.push_received(s, Receipt::UNKNOWN)
    }

    /// [`Self::push`] for a sample that arrived at `receipt`. A timestamp more than
    /// [`Self::max_ahead_secs`] after its wall time is refused; the monotonic time starts
    /// the stream's event clock ([`Self::poll_streams`]), and the frame carries its latest
    /// sample's, from which the agent measures alert latency. Either time may be unknown
    /// (see [`Receipt`]), and no value of either can make it panic.
    ///
    /// # Errors
    /// As [`Self::push`].
    pub fn push_received(&mut self, s: &Sample<'_>, receipt: Receipt) -> Result<(), Reject> {
        self.push_from(s, receipt, Origin::default())
    }

    /// [`Self::push_received`] for a sample from `origin` (its tag set or topic). When
    /// one stream's feature gets samples from two origins, back and forth (cpu0 and cpu1
    /// both named `cpu.usage_user`), the first time for each feature, [`Self::take_mixed`]
    /// then names them. It costs a comparison of two hashes per sample; the origins' text
    /// is copied only when a second origin turns up.
    ///
    /// # Errors
    /// As [`Self::push`].
    pub fn push_from(
        &mut self,
        s: &Sample<'_>,
        receipt: Receipt,
        origin: Origin<'_>,
    ) -> Result<(), Reject> {
        let received = receipt.wall();
        self.counters.samples_in += 1;
        // Frames hold f32: a value beyond its range would be ±inf in this frame and in
        // every frame it is carried forward to. Accepted values keep means in range too.
        if !(s.value.abs() <= f64::from(f32::MAX) && s.timestamp.is_finite()) {
            self.counters.non_finite += 1;
            return Err(Reject::NonFinite);
        }
        let Some(&j) = self.features.get(s.metric.as_ref()) else {
            self.counters.unknown_metric += 1;
            return Err(Reject::UnknownMetric);
        };
        if received > 0.0 && s.timestamp > received + self.max_ahead_secs() {
            self.counters.future += 1;
            return Err(Reject::Future);
        }
        let idx = match self.index.get(s.stream.as_ref()) {
            Some(&i) => i,
            None => {
                let idx = if let Some(i) = self.free.pop() {
                    self.streams[i].reuse(&s.stream);
                    i
                } else if self.streams.len() < self.max_streams {
                    let slots = self.lateness as usize + 1;
                    self.streams
                        .push(StreamState::new(&s.stream, slots, self.dim()));
                    self.streams.len() - 1
                } else {
                    self.counters.streams_rejected += 1;
                    return Err(Reject::TooManyStreams);
                };
                self.index.insert(s.stream.as_ref().to_owned(), idx);
                self.allocated += 1;
                idx
            }
        };
        let w = self.window_of(s.timestamp);
        if w < self.streams[idx].closed_before {
            self.counters.late_dropped += 1;
            return Err(Reject::Late);
        }
        if receipt.mono.is_finite() {
            let st = &mut self.streams[idx];
            st.last_mono = if st.last_mono.is_nan() {
                receipt.mono
            } else {
                st.last_mono.max(receipt.mono)
            };
        }
        if receipt.mono.is_finite()
            && self.streams[idx]
                .clock
                .is_none_or(|(t, _)| s.timestamp >= t)
        {
            self.streams[idx].clock = Some((s.timestamp, receipt.mono));
        }
        if self.streams[idx].newest.is_none_or(|n| w > n) {
            self.streams[idx].newest = Some(w);
            self.close(idx, w.saturating_sub(self.lateness));
        }
        let d = self.dim();
        let slot = w.rem_euclid(self.lateness + 1) as usize;
        if let Some(held) = self.streams[idx].slot_window[slot]
            && held != w
        {
            // Cannot happen while open windows span at most `lateness + 1`; closing the
            // older one keeps the frame rather than mixing two windows.
            debug_assert!(false, "slot {slot} holds window {held}, wanted {w}");
            self.finalize(idx, slot);
        }
        if origin.hash != 0 {
            self.track_origin(idx, j, w, origin);
        }
        let st = &mut self.streams[idx];
        st.slot_window[slot] = Some(w);
        let k = slot * d + j;
        let first = st.count[k] == 0;
        st.count[k] = st.count[k].saturating_add(1);
        st.filled[slot] += u32::from(first);
        if receipt.mono.is_finite() {
            let latest = st.received_mono[slot].map_or(receipt.mono, |r| r.max(receipt.mono));
            st.received_mono[slot] = Some(latest);
        }
        let complete = st.filled[slot] as usize == d;
        match self.aggregation {
            Aggregation::Mean => {
                st.acc[k] = if first { s.value } else { st.acc[k] + s.value };
            }
            Aggregation::Max => {
                st.acc[k] = if first {
                    s.value
                } else {
                    st.acc[k].max(s.value)
                };
            }
            Aggregation::Last => {
                if first || s.timestamp >= st.acc_ts[k] {
                    st.acc[k] = s.value;
                    st.acc_ts[k] = s.timestamp;
                }
            }
        }
        if complete && self.close_when_complete {
            self.close(idx, w.saturating_add(1));
        }
        Ok(())
    }

    /// Merge detection for feature `j` of stream `idx`, for a sample in window `w` (see
    /// [`Self::push_from`]).
    fn track_origin(&mut self, idx: usize, j: usize, w: i64, origin: Origin<'_>) {
        let first = &mut self.streams[idx].origin[j];
        if *first == 0 {
            *first = origin.hash;
            return;
        }
        let first = *first;
        let h = origin.hash;
        match &mut self.mix[j] {
            MixState::Reported => return,
            MixState::Clean => {
                if h != first {
                    self.mix[j] = MixState::Pending {
                        stream: idx,
                        first,
                        second: h,
                        first_text: String::new(),
                        first_window: None,
                        second_text: origin.text.to_owned(),
                        second_window: w,
                    };
                }
                return;
            }
            MixState::Pending {
                stream,
                first: f,
                second,
                first_text,
                first_window,
                second_text,
                second_window,
            } => {
                // Only the one slot pending pays for this (a copy into a kept buffer).
                if *stream != idx || *f != first {
                    return;
                }
                if h == first {
                    origin.text.clone_into(first_text);
                    *first_window = Some(w);
                    if *second_window != w {
                        return;
                    }
                } else if h == *second {
                    *second_window = w;
                    if *first_window != Some(w) {
                        return;
                    }
                } else {
                    return;
                }
                let origins = [std::mem::take(first_text), std::mem::take(second_text)];
                self.mixed = Some(Mixed {
                    metric: self.feature_names[j].clone(),
                    stream: self.streams[idx].name.clone(),
                    origins,
                });
            }
        }
        self.mix[j] = MixState::Reported;
    }

    /// The latest merge of two series into one feature found by [`Self::push_from`], if
    /// not taken yet: each feature's first only.
    pub fn take_mixed(&mut self) -> Option<Mixed> {
        self.mixed.take()
    }

    /// Closes every window of stream `idx` below `before`, oldest first.
    fn close(&mut self, idx: usize, before: i64) {
        if before <= self.streams[idx].closed_before {
            return;
        }
        self.streams[idx].closed_before = before;
        // At most `lateness + 1` slots: repeatedly take the oldest closable one.
        loop {
            let oldest = self.streams[idx]
                .slot_window
                .iter()
                .enumerate()
                .filter_map(|(slot, w)| w.filter(|&w| w < before).map(|w| (w, slot)))
                .min();
            match oldest {
                Some((_, slot)) => self.finalize(idx, slot),
                None => break,
            }
        }
    }

    /// Turns one slot into a pending frame and clears it.
    fn finalize(&mut self, idx: usize, slot: usize) {
        let d = self.dim();
        let mut values = match self.pool.pop() {
            Some(v) => v,
            None => {
                self.buffers_allocated += 1;
                Vec::with_capacity(d)
            }
        };
        values.clear();
        let st = &mut self.streams[idx];
        let Some(w) = st.slot_window[slot].take() else {
            self.pool.push(values);
            return;
        };
        let mut incomplete = false;
        for j in 0..d {
            let k = slot * d + j;
            let n = st.count[k];
            let v = if n > 0 {
                let v = match self.aggregation {
                    Aggregation::Mean => st.acc[k] / f64::from(n),
                    Aggregation::Max | Aggregation::Last => st.acc[k],
                };
                st.last_val[j] = v;
                st.last_window[j] = Some(w);
                v
            } else {
                match st.last_window[j] {
                    Some(lw)
                        if ((i128::from(w) - i128::from(lw)) as f64)
                            <= self.stale_windows + 1e-9 =>
                    {
                        self.counters.carried_forward += 1;
                        st.last_val[j]
                    }
                    _ => {
                        incomplete = true;
                        f64::NAN
                    }
                }
            };
            values.push(v as f32);
            st.count[k] = 0;
        }
        let received_mono = st.received_mono[slot].take();
        st.filled[slot] = 0;
        let mut turned_incomplete = 0;
        if incomplete {
            self.counters.frames_incomplete += 1;
            st.incomplete_run = st.incomplete_run.saturating_add(1);
            if st.incomplete_run == INCOMPLETE_STREAM_FRAMES {
                st.incomplete_turns = st.incomplete_turns.saturating_add(1);
                turned_incomplete = st.incomplete_turns;
                self.incomplete_streams += 1;
            }
        } else {
            self.counters.frames_complete += 1;
            if st.incomplete_run >= INCOMPLETE_STREAM_FRAMES {
                self.incomplete_streams -= 1;
            }
            st.incomplete_run = 0;
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        self.queue.push_back(Pending {
            stream: idx,
            seq,
            window: w,
            incomplete,
            received_mono,
            turned_incomplete,
            values,
        });
    }

    /// Closes every window that `now` (epoch seconds; NaN to close by data only) puts
    /// more than `lateness_windows` windows in the past, then hands out every closed
    /// frame: per stream in window order.
    pub fn poll(&mut self, now: f64, out: &mut impl FnMut(FrameOut<'_>)) {
        if now.is_finite() {
            let before = self.window_of(now).saturating_sub(self.lateness);
            for idx in 0..self.streams.len() {
                self.close(idx, before);
            }
        }
        self.drain(out);
    }

    /// Closes, per stream, every window that the stream's own clock puts more than
    /// `lateness_windows` windows in the past, then hands out every closed frame. A
    /// stream's clock is its newest sample's time plus the time since that sample arrived,
    /// on the monotonic clock (`mono_now` and the [`Receipt::mono`] times of
    /// [`Self::push_received`]): a node whose clock runs ahead, or one far-future
    /// timestamp, closes only its own stream's windows, a replay of old data closes them
    /// as live data would, and a step of the host's wall clock (NTP, a suspend) closes
    /// none. Streams whose samples carry no monotonic receipt time close by data only, and
    /// so does every stream when `mono_now` is not finite.
    pub fn poll_streams(&mut self, mono_now: f64, out: &mut impl FnMut(FrameOut<'_>)) {
        if mono_now.is_finite() {
            for idx in 0..self.streams.len() {
                let Some((t, at)) = self.streams[idx].clock else {
                    continue;
                };
                // Never back: a clock read before the receipt (another origin) adds 0.
                let now = t + (mono_now - at).max(0.0);
                if now.is_finite() {
                    let before = self.window_of(now).saturating_sub(self.lateness);
                    self.close(idx, before);
                }
            }
        }
        self.drain(out);
    }

    /// Closes every open window of every stream and hands out all frames (shutdown, end
    /// of a replay). Every later sample of a known stream is then late.
    pub fn flush(&mut self, out: &mut impl FnMut(FrameOut<'_>)) {
        for idx in 0..self.streams.len() {
            self.close(idx, i64::MAX);
            // Window i64::MAX itself (a saturated timestamp) is below no bound.
            if let Some(slot) = self.streams[idx]
                .slot_window
                .iter()
                .position(|w| w.is_some())
            {
                self.finalize(idx, slot);
            }
        }
        self.drain(out);
    }

    fn drain(&mut self, out: &mut impl FnMut(FrameOut<'_>)) {
        while let Some(p) = self.queue.pop_front() {
            let st = &self.streams[p.stream];
            out(FrameOut {
                stream: &st.name,
                stream_index: p.stream as u32,
                generation: st.generation,
                seq: p.seq,
                window_end: (p.window as f64 + 1.0) * self.window_secs,
                values: &p.values,
                incomplete: p.incomplete,
                received_mono: p.received_mono,
                turned_incomplete: p.turned_incomplete,
            });
            self.pool.push(p.values);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn sample<'a>(stream: &'a str, metric: &'a str, value: f64, timestamp: f64) -> Sample<'a> {
        Sample {
            stream: Cow::Borrowed(stream),
            metric: Cow::Borrowed(metric),
            value,
            timestamp,
        }
    }

    #[test]
    fn close_when_complete_emits_with_the_last_metric_and_its_receipt_time() {
        let cfg = AssemblerConfig {
            close_when_complete: true,
            ..AssemblerConfig::default()
        };
        let mut a = cfg.build(names(&["a", "b"])).unwrap();
        let take = |a: &mut Assembler| {
            let mut got = Vec::new();
            a.poll(f64::NAN, &mut |f: FrameOut<'_>| {
                let received = f.received_mono.expect("every sample had a receipt");
                got.push((f.seq, f.values.to_vec(), received));
            });
            got
        };
        a.push_received(&sample("n", "a", 1.0, 10.2), receipt(100.0))
            .unwrap();
        assert!(take(&mut a).is_empty(), "half a window stays open");
        a.push_received(&sample("n", "b", 2.0, 10.7), receipt(101.5))
            .unwrap();
        let mut received = take(&mut a);
        assert_eq!(
            received,
            vec![(0, vec![1.0, 2.0], 101.5)],
            "the last metric closes it"
        );
        // A further sample for that window is late now.
        assert_eq!(a.push(&sample("n", "a", 9.0, 10.9)), Err(Reject::Late));
        // Its stream's windows are open from the next one on (what the agent's log says).
        assert_eq!(a.open_since("n"), Some(11.0));
        assert_eq!(a.open_since("other"), None);
        // An older window still open closes first, in order.
        a.push_received(&sample("n", "a", 3.0, 12.1), receipt(103.0))
            .unwrap();
        a.push_received(&sample("n", "a", 4.0, 13.1), receipt(104.0))
            .unwrap();
        a.push_received(&sample("n", "b", 5.0, 13.2), receipt(104.2))
            .unwrap();
        received.extend(take(&mut a));
        assert_eq!(received.len(), 3);
        assert_eq!(received[1].0, 1);
        assert_eq!(received[1].2, 103.0);
        assert_eq!(received[2], (2, vec![4.0, 5.0], 104.2));
        // An older window completed late closes alone: the newer one stays open.
        a.push_received(&sample("n", "a", 6.0, 20.1), receipt(110.0))
            .unwrap();
        a.push_received(&sample("n", "a", 7.0, 21.1), receipt(111.0))
            .unwrap();
        a.push_received(&sample("n", "b", 8.0, 20.9), receipt(112.0))
            .unwrap();
        let got = take(&mut a);
        assert_eq!(got, vec![(3, vec![6.0, 8.0], 112.0)]);
        a.push_received(&sample("n", "b", 9.0, 21.5), receipt(113.0))
            .unwrap();
        assert_eq!(take(&mut a), vec![(4, vec![7.0, 9.0], 113.0)]);
        // Off (the default), the window waits for a later one.
        let mut b = AssemblerConfig::default()
            .build(names(&["a", "b"]))
            .unwrap();
        b.push(&sample("n", "a", 1.0, 10.2)).unwrap();
        b.push(&sample("n", "b", 2.0, 10.7)).unwrap();
        assert!(collect(&mut b, f64::NAN).is_empty());
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    /// A forgotten stream's slot is free at once, and the new stream that takes it is the
    /// slot's next generation and inherits nothing: its frames count from 0 and no value of
    /// the old one is carried forward into them; a closed frame of the old stream not yet
    /// handed out goes with it (it would carry the new stream's name). Streams whose
    /// samples had no monotonic time are never forgotten. (The slot used to be held until
    /// the agent's sink gave it back, about a second later: a stream arriving meanwhile
    /// was refused.)
    #[test]
    fn a_retired_slot_is_free_at_once_as_a_new_generation_that_carries_nothing_over() {
        let cfg = AssemblerConfig {
            max_streams: 2,
            stale_secs: Some(1e9),
            ..AssemblerConfig::default()
        };
        let mut a = cfg.build(names(&["a", "b"])).unwrap();
        let at = |mono: f64| Receipt { wall: 0.0, mono };
        type Out = (u32, u32, u64, String, Vec<f32>);
        let mut frames: Vec<u64> = Vec::new();
        let take = |a: &mut Assembler, frames: &mut Vec<Out>| {
            a.flush(&mut |f: FrameOut<'_>| {
                frames.push((
                    f.stream_index,
                    f.generation,
                    f.seq,
                    f.stream.to_string(),
                    f.values.to_vec(),
                ))
            });
        };
        a.push_received(&sample("old", "a", 1.0, 10.0), at(10.0))
            .unwrap();
        a.push_received(&sample("old", "b", 2.0, 10.0), at(10.0))
            .unwrap();
        a.push(&sample("untimed", "a", 3.0, 10.0)).unwrap();
        assert_eq!(a.stream_count(), 2);
        a.push_received(&sample("old", "a", 4.0, 15.0), at(15.0))
            .unwrap();
        a.poll(f64::NAN, &mut |f: FrameOut<'_>| {
            assert_eq!((f.stream, f.stream_index, f.generation), ("old", 0, 0));
            frames.push(f.seq);
        });
        assert_eq!(frames, [0], "a slot's first stream is its generation 0");
        // A later window closes another of old's, not handed out yet when old is forgotten.
        a.push_received(&sample("old", "a", 6.0, 17.0), at(17.0))
            .unwrap();
        assert_eq!(a.pending_frames(), 1);
        let mut gone = Vec::new();
        a.retire_quiet(17.0, &mut gone);
        assert!(gone.is_empty(), "not before its last arrival");
        a.retire_quiet(1e12, &mut gone);
        assert_eq!(gone, [(0, 0)], "the untimed stream is kept");
        assert_eq!((a.stream_count(), a.index_of("old")), (1, None));
        assert_eq!(a.pending_frames(), 0, "old's closed frame went with it");
        // Free at once, though max_streams is reached.
        let allocated = a.allocated();
        a.push_received(&sample("new", "a", 5.0, 20.0), at(20.0))
            .unwrap();
        assert_eq!((a.index_of("new"), a.allocated()), (Some(0), allocated + 1));
        assert_eq!(
            a.push_received(&sample("newer", "a", 5.0, 20.0), at(20.0)),
            Err(Reject::TooManyStreams),
            "freed once, taken once"
        );
        let mut frames = Vec::new();
        take(&mut a, &mut frames);
        assert_eq!(frames.len(), 2, "{frames:?}");
        let (index, generation, seq, name, values) = &frames[0];
        assert_eq!((*index, *generation, *seq, name.as_str()), (0, 1, 0, "new"));
        assert_eq!(values[0], 5.0);
        assert!(
            values[1].is_nan(),
            "old's b is not carried into new: {values:?}"
        );
        assert_eq!((frames[1].0, frames[1].1), (1, 0), "untimed, as it was");
        // Forgotten again: the slot's next stream is its third generation.
        let mut gone = Vec::new();
        a.retire_quiet(1e12, &mut gone);
        assert_eq!(gone, [(0, 1)]);
    }

    #[derive(Debug, Clone, PartialEq)]
    struct Got {
        stream: String,
        idx: u32,
        seq: u64,
        end: f64,
        values: Vec<f32>,
        incomplete: bool,
    }

    fn collect(a: &mut Assembler, now: f64) -> Vec<Got> {
        let mut got = Vec::new();
        a.poll(now, &mut |f: FrameOut<'_>| {
            got.push(Got {
                stream: f.stream.to_owned(),
                idx: f.stream_index,
                seq: f.seq,
                end: f.window_end,
                values: f.values.to_vec(),
                incomplete: f.incomplete,
            })
        });
        got
    }

    fn asm(cfg: AssemblerConfig, features: &[&str]) -> Assembler {
        Assembler::new(cfg, names(features)).unwrap()
    }

    /// A receipt at `t` seconds on both clocks (no step between them).
    fn receipt(t: f64) -> Receipt {
        Receipt { wall: t, mono: t }
    }

    #[test]
    fn two_metrics_in_any_order_form_one_frame() {
        for order in [["a", "b"], ["b", "a"]] {
            let mut a = asm(AssemblerConfig::default(), &["a", "b"]);
            for m in order {
                let v = if m == "a" { 1.0 } else { 2.0 };
                a.push(&sample("n1", m, v, 10.2)).unwrap();
            }
            assert!(collect(&mut a, f64::NAN).is_empty(), "window still open");
            // A sample two windows later (lateness 1) closes window 10.
            a.push(&sample("n1", "a", 5.0, 12.0)).unwrap();
            let got = collect(&mut a, f64::NAN);
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].values, vec![1.0, 2.0]);
            assert_eq!(got[0].end, 11.0);
            assert!(!got[0].incomplete);
            assert_eq!(a.counters().frames_complete, 1);
        }
    }

    /// Two origins of one feature in one stream and one window are reported once per
    /// feature with both texts; one origin, two origins in two streams, or origins that
    /// alternate but never share a window, never.
    #[test]
    fn two_origins_of_one_feature_are_reported_once() {
        let o = |hash, text| Origin { hash, text };
        let mut a = asm(AssemblerConfig::default(), &["x", "y"]);
        let r = receipt(10.0);
        for t in 0..5 {
            a.push_from(
                &sample("n1", "x", 1.0, 10.0 + f64::from(t)),
                r,
                o(7, "cpu=cpu0"),
            )
            .unwrap();
            a.push_from(
                &sample("n2", "x", 1.0, 10.0 + f64::from(t)),
                r,
                o(8, "cpu=cpu1"),
            )
            .unwrap();
            // Untracked samples (0) never count.
            a.push_from(&sample("n1", "x", 1.0, 10.0 + f64::from(t)), r, o(0, ""))
                .unwrap();
        }
        assert_eq!(a.take_mixed(), None);
        // A tag that changes now and then (a GPU's pstate), never two in one window: no.
        for (t, h, text) in [
            (20.0, 1, "a"),
            (21.0, 2, "b"),
            (22.0, 1, "a"),
            (23.0, 2, "b"),
        ] {
            a.push_from(&sample("n1", "y", 1.0, t), r, o(h, text))
                .unwrap();
        }
        assert_eq!(a.take_mixed(), None);
        // Both in one window, in either order: two series side by side.
        a.push_from(&sample("n1", "y", 1.0, 24.0), r, o(2, "b"))
            .unwrap();
        assert_eq!(a.take_mixed(), None);
        a.push_from(&sample("n1", "y", 1.0, 24.5), r, o(1, "a"))
            .unwrap();
        assert_eq!(
            a.take_mixed(),
            Some(Mixed {
                metric: "y".into(),
                stream: "n1".into(),
                origins: ["a".into(), "b".into()],
            })
        );
        for _ in 0..4 {
            a.push_from(&sample("n1", "y", 1.0, 25.0), r, o(2, "b"))
                .unwrap();
            a.push_from(&sample("n1", "y", 1.0, 25.0), r, o(1, "a"))
                .unwrap();
        }
        assert_eq!(a.take_mixed(), None);
        // The other feature, by itself.
        a.push_from(&sample("n2", "x", 1.0, 26.0), r, o(9, "cpu=cpu2"))
            .unwrap();
        a.push_from(&sample("n2", "x", 1.0, 26.0), r, o(8, "cpu=cpu1"))
            .unwrap();
        assert_eq!(
            a.take_mixed().map(|m| m.origins),
            Some(["cpu=cpu1".into(), "cpu=cpu2".into()])
        );
        // Merged values are what an operator saw: the mean of both series.
        let mut a = asm(AssemblerConfig::default(), &["x"]);
        a.push_from(&sample("n", "x", 1.0, 1.0), r, o(1, "a"))
            .unwrap();
        a.push_from(&sample("n", "x", 3.0, 1.0), r, o(2, "b"))
            .unwrap();
        a.flush(&mut |f| assert_eq!(f.values, [2.0]));
    }

    #[test]
    fn mean_last_max_aggregate_by_hand() {
        // Values of "x" in window [0, 1): 3 at t=0.1, 9 at t=0.7, 6 at t=0.4 (arrives last).
        let cases = [
            (Aggregation::Mean, 6.0),
            (Aggregation::Last, 9.0),
            (Aggregation::Max, 9.0),
        ];
        for (aggregation, want) in cases {
            let cfg = AssemblerConfig {
                aggregation,
                ..Default::default()
            };
            let mut a = asm(cfg, &["x"]);
            a.push(&sample("n", "x", 3.0, 0.1)).unwrap();
            a.push(&sample("n", "x", 9.0, 0.7)).unwrap();
            a.push(&sample("n", "x", 6.0, 0.4)).unwrap();
            let got = collect(&mut a, 10.0);
            assert_eq!(got.len(), 1, "{aggregation:?}");
            assert_eq!(got[0].values, vec![want], "{aggregation:?}");
        }
        // Last with equal timestamps: the later arrival wins.
        let cfg = AssemblerConfig {
            aggregation: Aggregation::Last,
            ..Default::default()
        };
        let mut a = asm(cfg, &["x"]);
        a.push(&sample("n", "x", 1.0, 0.5)).unwrap();
        a.push(&sample("n", "x", 2.0, 0.5)).unwrap();
        assert_eq!(collect(&mut a, 10.0)[0].values, vec![2.0]);
    }

    #[test]
    fn reason_lists_hold_every_reason_at_its_index() {
        let decode = [
            DecodeError::TooLarge { len: 2, max: 1 },
            DecodeError::NotUtf8,
            DecodeError::BadTopic(""),
            DecodeError::NotDataChannel(String::new()),
            DecodeError::MissingStream { key: String::new() },
            DecodeError::BadPayload(""),
            DecodeError::NonNumeric(String::new()),
            DecodeError::StringField,
            DecodeError::NonFinite,
            DecodeError::TimestampMissing,
            DecodeError::TimestampInvalid(String::new()),
            DecodeError::WrongLength {
                expected: 4,
                got: 3,
            },
        ];
        assert_eq!(decode.len(), DecodeError::REASONS.len());
        for (i, e) in decode.iter().enumerate() {
            assert_eq!((e.reason_index(), e.reason()), (i, DecodeError::REASONS[i]));
        }
        let reject = [
            Reject::UnknownMetric,
            Reject::Late,
            Reject::TooManyStreams,
            Reject::NonFinite,
            Reject::Future,
        ];
        for (i, r) in reject.iter().enumerate() {
            assert_eq!((r.reason_index(), r.reason()), (i, Reject::REASONS[i]));
        }
    }

    #[test]
    fn carries_forward_within_stale_secs_then_nan_and_incomplete() {
        // window 1 s, stale 2 s: "b" seen in window 0 fills windows 1 and 2, not 3.
        let cfg = AssemblerConfig {
            stale_secs: Some(2.0),
            ..Default::default()
        };
        let mut a = asm(cfg, &["a", "b"]);
        a.push(&sample("n", "a", 1.0, 0.5)).unwrap();
        a.push(&sample("n", "b", 7.0, 0.5)).unwrap();
        for t in [1.5, 2.5, 3.5] {
            a.push(&sample("n", "a", t, t)).unwrap();
        }
        let got = collect(&mut a, 100.0);
        assert_eq!(got.len(), 4);
        assert_eq!(got[0].values, vec![1.0, 7.0]);
        assert_eq!(got[1].values, vec![1.5, 7.0]);
        assert_eq!(got[2].values, vec![2.5, 7.0]);
        assert!(!got[2].incomplete);
        assert_eq!(got[3].values[0], 3.5);
        assert!(got[3].values[1].is_nan());
        assert!(got[3].incomplete);
        let c = a.counters();
        assert_eq!(
            (c.frames_complete, c.frames_incomplete, c.carried_forward),
            (3, 1, 2)
        );
        assert_eq!(got.iter().map(|g| g.seq).collect::<Vec<_>>(), [0, 1, 2, 3]);
    }

    /// A stream that sends samples but never one of the features is counted as
    /// incomplete once INCOMPLETE_STREAM_FRAMES of its frames in a row were incomplete
    /// (the frame that makes it so says which time it is), and leaves the count at its
    /// next complete frame or when it is forgotten. The trial's broken1 (never disk_io)
    /// was neither a scored stream nor a silent one: invisible.
    #[test]
    fn a_stream_whose_frames_are_all_incomplete_is_counted_until_one_is_complete() {
        let mut a = asm(AssemblerConfig::default(), &["a", "b"]);
        let n = INCOMPLETE_STREAM_FRAMES as usize;
        // "ok" sends both, "broken" only a; at mono time = sample time.
        for w in 0..n + 2 {
            let t = w as f64 + 0.5;
            for (stream, metric) in [("ok", "a"), ("ok", "b"), ("broken", "a")] {
                a.push_received(&sample(stream, metric, 1.0, t), receipt(t))
                    .unwrap();
            }
        }
        let mut turned = Vec::new();
        let take = |a: &mut Assembler, now: f64, turned: &mut Vec<(String, u64, u32)>| {
            a.poll(now, &mut |f: FrameOut<'_>| {
                if f.turned_incomplete > 0 {
                    turned.push((f.stream.to_owned(), f.seq, f.turned_incomplete));
                }
            });
        };
        take(&mut a, (n + 1) as f64, &mut turned);
        assert_eq!(a.incomplete_streams(), 1);
        assert_eq!(turned, [("broken".to_owned(), (n - 1) as u64, 1)]);
        // More incomplete frames: counted once, not announced again.
        for w in n + 2..n + 6 {
            let t = w as f64 + 0.5;
            a.push_received(&sample("broken", "a", 1.0, t), receipt(t))
                .unwrap();
        }
        take(&mut a, (n + 5) as f64, &mut turned);
        assert_eq!((a.incomplete_streams(), turned.len()), (1, 1));
        // A complete frame: no longer incomplete. Incomplete again later: the 2nd time.
        let t = (n + 6) as f64 + 0.5;
        for m in ["a", "b"] {
            a.push_received(&sample("broken", m, 1.0, t), receipt(t))
                .unwrap();
        }
        take(&mut a, t + 2.0, &mut turned);
        assert_eq!(a.incomplete_streams(), 0);
        // b is carried forward for 3 windows (stale_secs), then missing again.
        for w in n + 7..n + 7 + 3 + n + 1 {
            let t = w as f64 + 0.5;
            a.push_received(&sample("broken", "a", 1.0, t), receipt(t))
                .unwrap();
        }
        take(&mut a, (n + 7 + 3 + n + 1) as f64, &mut turned);
        assert_eq!(a.incomplete_streams(), 1);
        assert_eq!(turned.last().map(|t| t.2), Some(2));
        // Forgotten: out of the count; its slot's next stream starts clean.
        let mut gone = Vec::new();
        a.retire_quiet(1e12, &mut gone);
        assert_eq!((gone.len(), a.incomplete_streams()), (2, 0));
    }

    /// A refusal is "first" once per tracked stream and reason; an untracked stream
    /// never is (its name may be anything a sender makes up).
    #[test]
    fn first_reject_is_once_per_stream_and_reason() {
        let mut a = asm(AssemblerConfig::default(), &["a"]);
        a.push(&sample("n3", "a", 1.0, 0.5)).unwrap();
        a.push(&sample("n4", "a", 1.0, 0.5)).unwrap();
        assert!(a.first_reject("n3", Reject::UnknownMetric));
        assert!(!a.first_reject("n3", Reject::UnknownMetric));
        assert!(a.first_reject("n3", Reject::Future));
        assert!(a.first_reject("n4", Reject::UnknownMetric));
        assert!(!a.first_reject("nobody", Reject::UnknownMetric));
    }

    #[test]
    fn never_seen_feature_is_nan_and_default_stale_is_three_windows() {
        let cfg = AssemblerConfig {
            window_secs: 10.0,
            ..Default::default()
        };
        assert_eq!(cfg.effective_stale_secs(), 30.0);
        let mut a = asm(cfg, &["a", "b"]);
        a.push(&sample("n", "a", 1.0, 5.0)).unwrap();
        let got = collect(&mut a, 1000.0);
        assert_eq!(got.len(), 1);
        assert!(got[0].incomplete && got[0].values[1].is_nan());
        assert_eq!(got[0].end, 10.0);
    }

    /// Each stream closes its windows by its own clock: its newest sample's time plus the
    /// (monotonic) time since that sample arrived. A node whose clock runs 3 s ahead used to
    /// move one shared clock, so every other node's samples came in "late".
    #[test]
    fn each_stream_closes_its_windows_by_its_own_clock() {
        let cfg = AssemblerConfig {
            window_secs: 1.0,
            lateness_windows: 1,
            ..Default::default()
        };
        let mut a = asm(cfg, &["x"]);
        let at = |stream: &'static str, t: f64| sample(stream, "x", 1.0, t);
        // Arrivals at 5000 and 5000.1; "fast" stamps 3 s ahead of "ok".
        a.push_received(&at("ok", 1000.2), receipt(5000.0)).unwrap();
        a.push_received(&at("fast", 1003.2), receipt(5000.1))
            .unwrap();
        let poll = |a: &mut Assembler, now: f64| {
            let mut out = Vec::new();
            a.poll_streams(now, &mut |f| out.push((f.stream.to_string(), f.window_end)));
            out
        };
        // Half a second later "ok" is still in window 1000, which stays open.
        let out = poll(&mut a, 5000.5);
        assert!(out.is_empty(), "{out:?}");
        a.push_received(&at("ok", 1000.6), receipt(5000.6)).unwrap();
        a.push_received(&at("ok", 1001.1), receipt(5001.1)).unwrap();
        assert_eq!(a.counters().late_dropped, 0);
        // Once each stream's own clock is two windows past, its windows close.
        assert_eq!(
            poll(&mut a, 5003.5),
            [
                ("ok".to_string(), 1001.0),
                ("ok".to_string(), 1002.0),
                ("fast".to_string(), 1004.0)
            ]
        );
    }

    /// A stream's clock advances by monotonic time since its newest sample arrived. It
    /// used to be wall time: a forward step of the host's clock (NTP, a resume from
    /// suspend) closed the open windows at once, and the samples still on their way came
    /// in late.
    #[test]
    fn a_wall_clock_step_does_not_close_windows() {
        let mut a = asm(AssemblerConfig::default(), &["x"]);
        let x = |v: f64, t: f64| sample("n", "x", v, t);
        // Wall and monotonic clocks with different origins, as on a host.
        a.push_received(
            &x(1.0, 1000.2),
            Receipt {
                wall: 5000.0,
                mono: 7.0,
            },
        )
        .unwrap();
        let mut out = Vec::new();
        // Half a second later the wall clock stepped an hour ahead; the monotonic one did not.
        a.poll_streams(7.5, &mut |f| out.push(f.window_end));
        assert!(out.is_empty(), "{out:?}");
        a.push_received(
            &x(2.0, 1000.7),
            Receipt {
                wall: 8600.7,
                mono: 7.7,
            },
        )
        .unwrap();
        // A sample stamped ahead of the stepped-back wall time is still refused, by the
        // wall clock alone.
        let ahead = 5000.0 + MAX_AHEAD_SECS + 1.0;
        assert_eq!(
            a.push_received(
                &x(3.0, ahead),
                Receipt {
                    wall: 5000.0,
                    mono: 7.8
                }
            ),
            Err(Reject::Future)
        );
        // Once the stream's own clock is two windows on, its windows close, in order. The
        // frame carries its last sample's monotonic receipt, from which the agent measures
        // alert latency: the wall one is an hour off.
        let mut received = Vec::new();
        a.poll_streams(9.1, &mut |f| {
            out.push(f.window_end);
            received.push(f.received_mono);
        });
        assert_eq!(out, [1001.0]);
        assert_eq!(received, [Some(7.7)]);
        assert_eq!(a.counters().late_dropped, 0);
    }

    /// A timestamp far ahead of its receipt is a broken clock: refused, so that it cannot
    /// close its stream's windows and make that stream's real samples late.
    #[test]
    fn a_timestamp_far_ahead_of_its_receipt_is_refused() {
        let mut a = asm(AssemblerConfig::default(), &["x"]);
        assert_eq!(a.max_ahead_secs(), MAX_AHEAD_SECS);
        let at = |t: f64| sample("n", "x", 1.0, t);
        assert_eq!(
            a.push_received(&at(5000.0 + MAX_AHEAD_SECS + 1.0), receipt(5000.0)),
            Err(Reject::Future)
        );
        assert_eq!(a.counters().future, 1);
        a.push_received(&at(5000.0 + MAX_AHEAD_SECS - 1.0), receipt(5000.0))
            .unwrap();
        // Old data, and samples without a receipt time, are never "future".
        a.push_received(&at(10.0), receipt(5000.0)).unwrap_err();
        assert_eq!(a.counters().future, 1);
        let mut b = asm(AssemblerConfig::default(), &["x"]);
        b.push(&at(1e12)).unwrap();
        // A real sample right after the refused one lands.
        let mut c = asm(AssemblerConfig::default(), &["x"]);
        c.push_received(&at(9e9), receipt(5000.0)).unwrap_err();
        c.push_received(&at(5000.0), receipt(5000.0)).unwrap();
        assert_eq!(c.counters().late_dropped, 0);
    }

    #[test]
    fn late_sample_within_lateness_lands_later_one_is_dropped() {
        let cfg = AssemblerConfig {
            lateness_windows: 1,
            ..Default::default()
        };
        let mut a = asm(cfg, &["x"]);
        a.push(&sample("n", "x", 1.0, 10.5)).unwrap();
        a.push(&sample("n", "x", 2.0, 11.5)).unwrap();
        // Window 10 is one behind the newest (11): still open.
        a.push(&sample("n", "x", 3.0, 10.9)).unwrap();
        a.push(&sample("n", "x", 4.0, 12.5)).unwrap(); // closes window 10
        assert_eq!(a.push(&sample("n", "x", 5.0, 10.1)), Err(Reject::Late));
        assert_eq!(a.counters().late_dropped, 1);
        let got = collect(&mut a, f64::NAN);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].values, vec![2.0]); // mean of 1 and 3
        assert_eq!(got[0].end, 11.0);
    }

    #[test]
    fn zero_lateness_closes_on_the_next_window() {
        let cfg = AssemblerConfig {
            lateness_windows: 0,
            ..Default::default()
        };
        let mut a = asm(cfg, &["x"]);
        a.push(&sample("n", "x", 1.0, 0.5)).unwrap();
        a.push(&sample("n", "x", 2.0, 1.5)).unwrap();
        assert_eq!(a.push(&sample("n", "x", 3.0, 0.6)), Err(Reject::Late));
        assert_eq!(collect(&mut a, f64::NAN).len(), 1);
    }

    #[test]
    fn now_closes_windows_of_a_quiet_stream() {
        let mut a = asm(AssemblerConfig::default(), &["x"]);
        a.push(&sample("n", "x", 1.0, 10.5)).unwrap();
        // Window 10 ends at 11; with lateness 1 it closes once now reaches 12.
        assert!(collect(&mut a, 11.9).is_empty());
        let got = collect(&mut a, 12.0);
        assert_eq!(got.len(), 1);
        assert_eq!(a.push(&sample("n", "x", 1.0, 10.7)), Err(Reject::Late));
        // Still within lateness of now: lands.
        a.push(&sample("n", "x", 1.0, 11.2)).unwrap();
    }

    #[test]
    fn flush_emits_open_windows() {
        let mut a = asm(AssemblerConfig::default(), &["x"]);
        a.push(&sample("n", "x", 1.0, 1.0)).unwrap();
        a.push(&sample("n", "x", 2.0, 2.0)).unwrap();
        let mut ends = Vec::new();
        a.flush(&mut |f: FrameOut<'_>| ends.push(f.window_end));
        assert_eq!(ends, [2.0, 3.0]);
    }

    #[test]
    fn unknown_metric_is_counted_and_creates_no_stream() {
        let mut a = asm(AssemblerConfig::default(), &["x"]);
        assert_eq!(
            a.push(&sample("n", "nope", 1.0, 1.0)),
            Err(Reject::UnknownMetric)
        );
        assert_eq!(a.counters().unknown_metric, 1);
        assert_eq!(a.stream_count(), 0);
        assert_eq!(
            a.push(&sample("n", "x", f64::NAN, 1.0)),
            Err(Reject::NonFinite)
        );
        assert_eq!(a.counters().non_finite, 1);
        assert_eq!(a.counters().samples_in, 2);
    }

    /// Found by `fuzz/fuzz_targets/assemble.rs`: a finite f64 beyond f32's range (an
    /// ExaMon payload `1e300;…` decodes to one) became `inf` in the frame.
    #[test]
    fn value_beyond_f32_range_is_rejected_not_made_infinite() {
        let mut a = asm(AssemblerConfig::default(), &["x"]);
        for v in [1e300, -1e39, f64::MAX] {
            assert_eq!(a.push(&sample("n", "x", v, 1.0)), Err(Reject::NonFinite));
        }
        assert_eq!(a.counters().non_finite, 3);
        let big = f64::from(f32::MAX);
        a.push(&sample("n", "x", big, 1.0)).unwrap();
        a.push(&sample("n", "x", big, 1.5)).unwrap();
        a.push(&sample("n", "x", -big, 3.0)).unwrap();
        let mut values = Vec::new();
        a.flush(&mut |f: FrameOut<'_>| values.extend_from_slice(f.values));
        assert_eq!(values, [f32::MAX, -f32::MAX]);
    }

    #[test]
    fn max_streams_is_enforced() {
        let cfg = AssemblerConfig {
            max_streams: 2,
            ..Default::default()
        };
        let mut a = asm(cfg, &["x"]);
        a.push(&sample("n1", "x", 1.0, 1.0)).unwrap();
        a.push(&sample("n2", "x", 1.0, 1.0)).unwrap();
        assert_eq!(
            a.push(&sample("n3", "x", 1.0, 1.0)),
            Err(Reject::TooManyStreams)
        );
        // Known streams still work.
        a.push(&sample("n1", "x", 2.0, 1.5)).unwrap();
        assert_eq!(a.counters().streams_rejected, 1);
        assert_eq!(a.stream_count(), 2);
    }

    #[test]
    fn interleaved_streams_give_per_stream_frames_in_window_order() {
        let mut a = asm(AssemblerConfig::default(), &["x"]);
        for w in 0..6 {
            let t = w as f64 + 0.5;
            a.push(&sample("n1", "x", w as f64, t)).unwrap();
            a.push(&sample("n2", "x", 100.0 + w as f64, t)).unwrap();
        }
        let got = collect(&mut a, 1000.0);
        assert_eq!(got.len(), 12);
        for (name, idx, base) in [("n1", 0, 0.0), ("n2", 1, 100.0)] {
            let mine: Vec<&Got> = got.iter().filter(|g| g.stream == name).collect();
            assert_eq!(mine.len(), 6);
            for (w, g) in mine.iter().enumerate() {
                assert_eq!(g.idx, idx);
                assert_eq!(g.seq, w as u64);
                assert_eq!(g.end, w as f64 + 1.0);
                assert_eq!(g.values, vec![(base + w as f64) as f32]);
            }
        }
    }

    #[test]
    fn buffers_stop_growing_after_warm_up() {
        let mut a = asm(AssemblerConfig::default(), &["a", "b", "c"]);
        let streams = ["n1", "n2", "n3"];
        let run = |a: &mut Assembler, from: usize, to: usize| {
            for w in from..to {
                for s in streams {
                    for m in ["a", "b", "c"] {
                        a.push(&sample(s, m, 1.0, w as f64 + 0.3)).unwrap();
                    }
                }
                a.poll(w as f64, &mut |_| {});
            }
        };
        run(&mut a, 0, 10);
        let warm = a.buffers_allocated;
        run(&mut a, 10, 1000);
        assert_eq!(a.buffers_allocated, warm);
        assert_eq!(a.counters().frames_complete, 3 * 998);
    }

    #[test]
    fn config_defaults_serde_and_validation() {
        let cfg: AssemblerConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg, AssemblerConfig::default());
        let cfg: AssemblerConfig =
            serde_json::from_str(r#"{"aggregation": "max", "stale_secs": 5.0}"#).unwrap();
        assert_eq!(cfg.aggregation, Aggregation::Max);
        assert!(serde_json::from_str::<AssemblerConfig>(r#"{"windo_secs": 1}"#).is_err());
        let bad = |cfg: AssemblerConfig, f: &[&str]| Assembler::new(cfg, names(f)).unwrap_err();
        let d = AssemblerConfig::default;
        assert!(matches!(
            bad(
                AssemblerConfig {
                    window_secs: 0.0,
                    ..d()
                },
                &["x"]
            ),
            AssemblerError::WindowSecs(_)
        ));
        assert!(matches!(
            bad(
                AssemblerConfig {
                    stale_secs: Some(f64::NAN),
                    ..d()
                },
                &["x"]
            ),
            AssemblerError::StaleSecs(_)
        ));
        assert_eq!(
            bad(
                AssemblerConfig {
                    max_streams: 0,
                    ..d()
                },
                &["x"]
            ),
            AssemblerError::MaxStreams
        );
        assert_eq!(
            bad(
                AssemblerConfig {
                    lateness_windows: 65,
                    ..d()
                },
                &["x"]
            ),
            AssemblerError::LatenessWindows(65)
        );
        assert_eq!(bad(d(), &[]), AssemblerError::NoFeatures);
        assert_eq!(
            bad(d(), &["x", "x"]),
            AssemblerError::DuplicateFeature("x".into())
        );
    }

    /// Times and values that have broken parsers and clocks elsewhere: zero, negative,
    /// huge, non-finite, and just past what an i64 of nanoseconds holds.
    const EXTREMES: [f64; 11] = [
        0.0,
        -1.0,
        -1e300,
        1e300,
        f64::MAX,
        f64::MIN,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        9.2e18,
        -9.3e18,
    ];

    #[test]
    fn random_samples_never_panic_and_frames_keep_window_order() {
        let mut rng = Rng::new(7);
        let extremes = EXTREMES;
        for lateness in [0u32, 1, 3] {
            let cfg = AssemblerConfig {
                lateness_windows: lateness,
                max_streams: 3,
                aggregation: [Aggregation::Last, Aggregation::Mean, Aggregation::Max]
                    [lateness as usize % 3],
                ..Default::default()
            };
            let mut a = asm(cfg, &["a", "b"]);
            let mut last_end: HashMap<String, f64> = HashMap::new();
            for i in 0..5000 {
                let t = if rng.below(20) == 0 {
                    extremes[rng.below(extremes.len())]
                } else {
                    i as f64 * 0.1 + rng.uniform(-3.0, 3.0) as f64
                };
                let stream = ["n0", "n1", "n2", "n3"][rng.below(4)];
                let metric = ["a", "b", "c"][rng.below(3)];
                let _ = a.push(&sample(stream, metric, rng.uniform(-5.0, 5.0) as f64, t));
                let now = if rng.below(10) == 0 { t } else { f64::NAN };
                a.poll(now, &mut |f: FrameOut<'_>| {
                    let prev = last_end.insert(f.stream.to_owned(), f.window_end);
                    if let Some(p) = prev {
                        assert!(f.window_end >= p, "{} after {p}", f.window_end);
                    }
                    assert_eq!(f.values.len(), 2);
                });
            }
            a.flush(&mut |_| {});
            let c = a.counters();
            assert_eq!(c.samples_in, 5000);
        }
    }

    /// Receipt times and stream polls of any value (huge, negative, non-finite, a clock
    /// that goes back), as the fuzz target feeds them: no panic, every frame in order with
    /// its stream's next sequence number, and no receipt time but a finite one handed out
    /// (an infinite wall receipt used to reach the frame, when frames carried the wall one).
    #[test]
    fn any_receipt_times_and_stream_polls_never_panic_and_frames_stay_in_order() {
        let mut rng = Rng::new(11);
        let extremes = EXTREMES;
        let pick = |rng: &mut Rng, near: f64| {
            if rng.below(8) == 0 {
                extremes[rng.below(extremes.len())]
            } else {
                near + rng.uniform(-3.0, 3.0) as f64
            }
        };
        for (lateness, close_when_complete) in [(0u32, false), (1, true), (3, false)] {
            let cfg = AssemblerConfig {
                lateness_windows: lateness,
                max_streams: 3,
                close_when_complete,
                ..Default::default()
            };
            let mut a = asm(cfg, &["a", "b"]);
            let mut last: HashMap<u32, (u64, f64)> = HashMap::new();
            let mut check = |f: FrameOut<'_>| {
                assert!(
                    f.received_mono.is_none_or(f64::is_finite),
                    "{:?}",
                    f.received_mono
                );
                let (seq, end) = last.get(&f.stream_index).copied().unwrap_or((0, f64::MIN));
                assert_eq!(f.seq, seq, "stream {}", f.stream);
                assert!(f.window_end >= end, "{} after {end}", f.window_end);
                last.insert(f.stream_index, (f.seq + 1, f.window_end));
            };
            for i in 0..5000 {
                let step = i as f64 * 0.1;
                let t = pick(&mut rng, 1000.0 + step);
                let receipt = Receipt {
                    wall: pick(&mut rng, 5000.0 + step),
                    mono: pick(&mut rng, step),
                };
                let stream = ["n0", "n1", "n2", "n3"][rng.below(4)];
                let metric = ["a", "b", "c"][rng.below(3)];
                let _ = a.push_received(&sample(stream, metric, 1.0, t), receipt);
                if rng.below(4) == 0 {
                    a.poll_streams(pick(&mut rng, step), &mut check);
                }
            }
            a.flush(&mut check);
            assert_eq!(a.counters().samples_in, 5000);
        }
    }
}
