//! `darkwatch record`: subscribes with the agent's own configuration and writes the frames
//! the agent would assemble, one CSV row per window, for `darkwatch train --input`.
//!
//! The messages go through the agent's decoders (`[agent] format`, `[examon]`,
//! `[telegraf]`) and its [`Assembler`] (`[assemble]`), so a row has the names, window,
//! aggregation and lateness the agent scores with. There is no model yet, so the metric
//! names are discovered first: for `discover_secs` from the first decoded sample every
//! message is held, the (stream, metric) names are collected, and the assembler is built
//! with the sorted names of the one stream recorded; the held messages then go through it
//! as they came, so discovery loses nothing. A metric first seen later is not in the file:
//! its samples are counted and named in the summary. Incomplete windows (a metric without
//! a sample, which the agent never scores) are left out and counted.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::agent::InputFormat;
use crate::config::DarkwatchConfig;
use crate::ingest::assemble::{Assembler, AssemblerConfig, DecodeError, Origin, Receipt, Reject};
use crate::ingest::examon::ExamonDecoder;
use crate::ingest::telegraf::TelegrafDecoder;
use crate::mqtt::{self, BrokerMode, Incoming, Received};

/// Discovery lasts this many `[assemble] window_secs` unless told otherwise.
pub const DEFAULT_DISCOVER_WINDOWS: f64 = 3.0;
/// Messages held during discovery at most; discovery ends early when they are reached.
const MAX_HELD: usize = 1_000_000;
/// Names kept for the summary (metrics after discovery, other streams); more are counted.
const NAMES_KEPT: usize = 32;

/// What `darkwatch record` was asked for.
#[derive(Debug, Clone)]
pub struct RecordOptions {
    /// The CSV to write.
    pub out: PathBuf,
    /// Replace `out` if it exists.
    pub force: bool,
    /// The features, fixed (`--metrics`, `--metrics-from`); `None`: discovered.
    pub metrics: Option<Vec<String>>,
    /// The stream to record; `None`: the only one seen in discovery.
    pub stream: Option<String>,
    /// Discovery's length from the first decoded sample; `None`: [`DEFAULT_DISCOVER_WINDOWS`]
    /// windows.
    pub discover_secs: Option<f64>,
    /// Stop after this many rows.
    pub frames: Option<u64>,
    /// Stop after this many seconds.
    pub secs: Option<f64>,
    /// Seconds between progress lines on stderr.
    pub progress_secs: f64,
}

/// Why a recording could not start or go on.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A setting record cannot work with (the binary exits 78).
    #[error("key `{key}`: {reason}")]
    Config { key: String, reason: String },
    /// What was received or asked for does not make one training file.
    #[error("{0}")]
    Refused(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Mqtt(#[from] mqtt::MqttError),
}

/// Counts of a recording.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecordSummary {
    /// Rows written.
    pub rows: u64,
    /// Windows left out because a metric had no sample in them.
    pub incomplete: u64,
    /// Messages received (score messages included).
    pub messages: u64,
    /// darkwatch's own messages ignored: on its alert, status or score topics
    /// ([`crate::mqtt::OwnTopics`]) or an ExaMon `[scores] plugin` topic.
    pub score_messages: u64,
    /// Messages (or Telegraf metrics) not decoded, by [`DecodeError::REASONS`].
    pub decode_errors: [u64; DecodeError::REASONS.len()],
    /// The same during discovery, for a recording that never left it (the held messages
    /// are decoded again, and counted above, once it ends).
    pub discovery_errors: [u64; DecodeError::REASONS.len()],
    /// Samples of the recorded stream the assembler refused, by [`Reject::REASONS`].
    pub rejected: [u64; Reject::REASONS.len()],
    /// The stream recorded (empty before discovery ends).
    pub stream: String,
    /// The file's features, in column order.
    pub features: Vec<String>,
    /// Metrics of the recorded stream first seen after discovery, with their samples
    /// (at most [`NAMES_KEPT`] named).
    pub new_metrics: BTreeMap<String, u64>,
    /// Samples of other streams, by stream (at most [`NAMES_KEPT`] named).
    pub other_streams: BTreeMap<String, u64>,
    /// Samples whose names did not fit in `new_metrics` / `other_streams`.
    pub unnamed: u64,
    /// What ended it: `frames`, `secs` or `signal`.
    pub ended_by: &'static str,
}

fn refusals(s: &RecordSummary) -> String {
    let mut parts: Vec<String> = Vec::new();
    let decode = if s.stream.is_empty() {
        &s.discovery_errors
    } else {
        &s.decode_errors
    };
    for (n, why) in decode.iter().zip(DecodeError::REASONS) {
        if *n > 0 {
            parts.push(format!("{n} {why}"));
        }
    }
    for (n, why) in s.rejected.iter().zip(Reject::REASONS) {
        if *n > 0 {
            parts.push(format!("{n} {why}"));
        }
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

fn named(map: &BTreeMap<String, u64>) -> String {
    map.iter()
        .map(|(k, n)| format!("{k:?} ({n} samples)"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl std::fmt::Display for RecordSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} rows written (stream {:?}, {} features), {} incomplete windows left out, {} messages; refused: {}",
            self.rows,
            self.stream,
            self.features.len(),
            self.incomplete,
            self.messages,
            refusals(self)
        )?;
        if self.score_messages > 0 {
            write!(
                f,
                "; {} darkwatch messages (alerts, status, scores) ignored",
                self.score_messages
            )?;
        }
        if !self.new_metrics.is_empty() {
            write!(
                f,
                "; metrics of the stream not in the file (first seen after discovery, or not in --metrics): {} (to have them, record again with a longer --discover-secs or name them in --metrics)",
                named(&self.new_metrics)
            )?;
        }
        if !self.other_streams.is_empty() {
            write!(
                f,
                "; other streams, not recorded: {}",
                named(&self.other_streams)
            )?;
        }
        if self.unnamed > 0 {
            write!(f, "; {} more samples of names not listed", self.unnamed)?;
        }
        Ok(())
    }
}

/// The decoder of `[agent] format`.
enum Dec {
    Examon(ExamonDecoder),
    Telegraf(TelegrafDecoder),
}

impl Dec {
    fn new(cfg: &DarkwatchConfig) -> Result<Dec, RecordError> {
        match cfg.agent.format {
            InputFormat::Examon => Ok(Dec::Examon(
                cfg.examon.build().with_score_plugin(&cfg.scores.plugin),
            )),
            InputFormat::Telegraf => Ok(Dec::Telegraf(cfg.telegraf.build())),
            InputFormat::Raw => Err(RecordError::Config {
                key: "agent.format".into(),
                reason: "is \"raw\": raw frames are not assembled from metrics, so there is nothing to record here; save the frames where they are made (the sender), or record with format = \"examon\" or \"telegraf\"".into(),
            }),
        }
    }

    /// Whether `msg` is an ExaMon score message (not input).
    fn is_score(&self, msg: &Received<'_>) -> bool {
        matches!(self, Dec::Examon(d) if d.is_score_topic(msg.topic))
    }

    /// Decodes `msg`, each sample or refusal to `out`.
    fn decode(
        &self,
        msg: &Received<'_>,
        out: &mut impl FnMut(Result<crate::ingest::assemble::Sample<'_>, DecodeError>, Origin<'_>),
    ) {
        match self {
            Dec::Examon(d) => match d.decode(msg.topic, msg.payload) {
                Ok(s) => out(Ok(s), ExamonDecoder::origin(msg.topic)),
                Err(e) => out(Err(e), Origin::default()),
            },
            Dec::Telegraf(d) => {
                if let Err(e) = d.decode_with_origin(msg.topic, msg.payload, msg.received, out) {
                    out(Err(e), Origin::default());
                }
            }
        }
    }
}

/// The CSV file, one whole line per write, cut back to its last whole line if a write fails.
struct RowWriter {
    file: File,
    /// The file written: `--out`, or beside it a temporary one that replaces it at the end
    /// (`--force` over an existing file, which a failed recording must leave as it was).
    path: PathBuf,
    /// `--out`, when `path` is the temporary file.
    replaces: Option<PathBuf>,
    len: u64,
    line: String,
}

impl RowWriter {
    fn create(path: &Path, force: bool) -> Result<RowWriter, RecordError> {
        let io = |source| RecordError::Io {
            path: path.display().to_string(),
            source,
        };
        if !force && path.exists() {
            return Err(RecordError::Refused(format!(
                "{}: exists; record does not overwrite it: name another file, or give --force to replace it",
                path.display()
            )));
        }
        // An existing file is replaced only once the recording has its rows: until then they
        // go to a hidden file beside it (same folder, so the rename is atomic).
        let (written, replaces) = if force && path.exists() {
            let name = path
                .file_name()
                .map_or_else(|| "recording".into(), |n| n.to_string_lossy().into_owned());
            let temp = path.with_file_name(format!(".{name}.record-{}", std::process::id()));
            (temp, Some(path.to_owned()))
        } else {
            (path.to_owned(), None)
        };
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&written)
            .map_err(|source| RecordError::Io {
                path: written.display().to_string(),
                source,
            })?;
        let _ = io;
        Ok(RowWriter {
            file,
            path: written,
            replaces,
            len: 0,
            line: String::new(),
        })
    }

    /// Writes `self.line` (a whole line) at once.
    fn write_line(&mut self) -> Result<(), RecordError> {
        match self.file.write_all(self.line.as_bytes()) {
            Ok(()) => {
                self.len += self.line.len() as u64;
                Ok(())
            }
            Err(source) => {
                // No half line stays in the file.
                let _ = self.file.set_len(self.len);
                Err(RecordError::Io {
                    path: self.path.display().to_string(),
                    source,
                })
            }
        }
    }
}

/// A CSV field: quoted when it holds a comma, a quote or surrounding spaces.
fn csv_field(name: &str) -> String {
    if name.contains([',', '"', ';', '\t']) || name.trim() != name {
        format!("\"{}\"", name.replace('"', "\"\""))
    } else {
        name.to_string()
    }
}

enum Phase {
    Discover {
        /// When (monotonic seconds) discovery ends; set by the first decoded sample.
        until: Option<f64>,
        held: Vec<Incoming>,
        /// Metric names by stream.
        names: BTreeMap<String, BTreeSet<String>>,
    },
    Record {
        asm: Box<Assembler>,
    },
}

/// The recording, apart from MQTT: messages in, rows out.
pub struct Recorder {
    dec: Dec,
    /// darkwatch's own output topics: not input, as for the agent.
    own_topics: crate::mqtt::OwnTopics,
    assemble: AssemblerConfig,
    timestamp_column: String,
    opts: RecordOptions,
    discover_secs: f64,
    phase: Phase,
    writer: RowWriter,
    summary: RecordSummary,
    /// A merged series was warned about.
    mixed_told: bool,
}

impl Recorder {
    /// A recorder for `cfg` writing `opts.out` (refused if it exists, without `force`).
    ///
    /// # Errors
    /// [`RecordError::Config`] for raw input or an `[assemble]` the assembler refuses,
    /// [`RecordError::Refused`] for an existing file, [`RecordError::Io`].
    pub fn new(cfg: &DarkwatchConfig, opts: RecordOptions) -> Result<Recorder, RecordError> {
        let dec = Dec::new(cfg)?;
        // The assembler's own checks, before waiting for data.
        cfg.assemble
            .build(vec!["x".into()])
            .map_err(|e| RecordError::Config {
                key: e
                    .key()
                    .map_or("assemble".into(), |k| format!("assemble.{k}")),
                reason: e.to_string(),
            })?;
        if let Some(m) = &opts.metrics {
            check_names(m, &timestamp_column(cfg))?;
        }
        let discover_secs = opts
            .discover_secs
            .unwrap_or(DEFAULT_DISCOVER_WINDOWS * cfg.assemble.window_secs);
        let writer = RowWriter::create(&opts.out, opts.force)?;
        Ok(Recorder {
            dec,
            own_topics: crate::mqtt::OwnTopics::of(&cfg.mqtt, &cfg.scores),
            assemble: cfg.assemble.clone(),
            timestamp_column: timestamp_column(cfg),
            discover_secs,
            phase: Phase::Discover {
                until: None,
                held: Vec::new(),
                names: BTreeMap::new(),
            },
            writer,
            summary: RecordSummary {
                ended_by: "",
                ..RecordSummary::default()
            },
            mixed_told: false,
            opts,
        })
    }

    /// The counts so far.
    pub fn summary(&self) -> &RecordSummary {
        &self.summary
    }

    /// Whether `--frames` rows are written.
    pub fn done(&self) -> bool {
        self.opts.frames.is_some_and(|n| self.summary.rows >= n)
    }

    /// Whether discovery has ended.
    pub fn recording(&self) -> bool {
        matches!(self.phase, Phase::Record { .. })
    }

    /// Takes one message.
    ///
    /// # Errors
    /// As [`Self::tick`].
    pub fn take(&mut self, msg: Incoming) -> Result<(), RecordError> {
        self.summary.messages += 1;
        if self.own_topics.matches(&msg.topic) || self.dec.is_score(&msg.as_received()) {
            self.summary.score_messages += 1;
            return Ok(());
        }
        match &mut self.phase {
            Phase::Discover { until, held, names } => {
                let mut seen = false;
                let errors = &mut self.summary.discovery_errors;
                self.dec.decode(&msg.as_received(), &mut |r, _| match r {
                    Ok(s) => {
                        seen = true;
                        names
                            .entry(s.stream.into_owned())
                            .or_default()
                            .insert(s.metric.into_owned());
                    }
                    // Held messages are decoded again (and their refusals counted) once
                    // discovery ends; until then these say why nothing decodes.
                    Err(e) => errors[e.reason_index()] += 1,
                });
                if seen && until.is_none() {
                    *until = Some(msg.received_mono + self.discover_secs);
                }
                let now = msg.received_mono;
                held.push(msg);
                if held.len() >= MAX_HELD {
                    tracing::warn!(
                        messages = MAX_HELD,
                        "Discovery ends early: it holds as many messages as it may."
                    );
                    return self.end_discovery(now);
                }
                self.tick(now)
            }
            Phase::Record { .. } => {
                self.assemble_msg(&msg.as_received());
                self.emit(Some(msg.received_mono))
            }
        }
    }

    /// Ends discovery when its time is up, and writes the windows the stream's clock
    /// closed at `now` (monotonic seconds).
    ///
    /// # Errors
    /// [`RecordError::Refused`] when discovery saw several streams and none was chosen,
    /// or not the one chosen, or a name CSV cannot carry; [`RecordError::Io`].
    pub fn tick(&mut self, now: f64) -> Result<(), RecordError> {
        match &self.phase {
            Phase::Discover { until: Some(u), .. } if now >= *u => self.end_discovery(now),
            Phase::Discover { .. } => Ok(()),
            Phase::Record { .. } => self.emit(Some(now)),
        }
    }

    /// Stops: ends discovery if a sample came, closes and writes every open window (as
    /// the agent does when it stops) unless `--frames` rows are written, and syncs.
    ///
    /// # Errors
    /// As [`Self::tick`].
    pub fn finish(&mut self, ended_by: &'static str) -> Result<RecordSummary, RecordError> {
        self.summary.ended_by = ended_by;
        if matches!(self.phase, Phase::Discover { until: Some(_), .. }) {
            self.end_discovery(mqtt::monotonic_secs())?;
        }
        if !self.done() {
            self.emit(None)?;
        }
        let _ = self.writer.file.sync_data();
        Ok(self.summary.clone())
    }

    fn end_discovery(&mut self, now: f64) -> Result<(), RecordError> {
        let Phase::Discover { held, names, .. } = std::mem::replace(
            &mut self.phase,
            Phase::Discover {
                until: None,
                held: Vec::new(),
                names: BTreeMap::new(),
            },
        ) else {
            return Ok(());
        };
        let list = || {
            names
                .iter()
                .map(|(s, m)| format!("{s:?} ({} metrics)", m.len()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let stream = match &self.opts.stream {
            Some(s) if names.contains_key(s) => s.clone(),
            Some(s) => {
                return Err(RecordError::Refused(format!(
                    "stream {s:?} sent nothing in discovery ({} s); streams seen: {}",
                    self.discover_secs,
                    list()
                )));
            }
            None if names.len() == 1 => names.keys().next().cloned().unwrap_or_default(),
            None => {
                return Err(RecordError::Refused(format!(
                    "{} streams sent metrics in discovery: {}; a training file holds one stream: choose it with --stream NAME (or narrow [mqtt] subscribe to one node)",
                    names.len(),
                    list()
                )));
            }
        };
        let features: Vec<String> = match &self.opts.metrics {
            Some(m) => m.clone(),
            None => names
                .get(&stream)
                .map(|m| m.iter().cloned().collect())
                .unwrap_or_default(),
        };
        check_names(&features, &self.timestamp_column)?;
        let asm = self
            .assemble
            .build(features.clone())
            .map_err(|e| RecordError::Config {
                key: e
                    .key()
                    .map_or("assemble".into(), |k| format!("assemble.{k}")),
                reason: e.to_string(),
            })?;
        let w = &mut self.writer;
        w.line.clear();
        w.line.push_str(&csv_field(&self.timestamp_column));
        for f in &features {
            w.line.push(',');
            w.line.push_str(&csv_field(f));
        }
        w.line.push('\n');
        w.write_line()?;
        eprintln!(
            "darkwatch record: discovery done: recording stream {stream:?}, {} features: {}",
            features.len(),
            features.join(",")
        );
        self.summary.stream = stream;
        self.summary.features = features;
        self.phase = Phase::Record { asm: Box::new(asm) };
        for msg in held {
            self.assemble_msg(&msg.as_received());
            self.emit(Some(msg.received_mono))?;
        }
        self.emit(Some(now))
    }

    /// Decodes `msg` into the assembler (recording).
    fn assemble_msg(&mut self, msg: &Received<'_>) {
        let Phase::Record { asm } = &mut self.phase else {
            return;
        };
        let summary = &mut self.summary;
        let mixed_told = &mut self.mixed_told;
        let receipt = Receipt {
            wall: msg.received,
            mono: msg.received_mono,
        };
        self.dec.decode(msg, &mut |r, origin| {
            let s = match r {
                Ok(s) => s,
                Err(e) => {
                    summary.decode_errors[e.reason_index()] += 1;
                    return;
                }
            };
            if s.stream != summary.stream.as_str() {
                bump_named(&mut summary.other_streams, &mut summary.unnamed, &s.stream);
                return;
            }
            match asm.push_from(&s, receipt, origin) {
                Ok(()) => {}
                Err(why) => {
                    summary.rejected[why.reason_index()] += 1;
                    if why == Reject::UnknownMetric {
                        bump_named(&mut summary.new_metrics, &mut summary.unnamed, &s.metric);
                    }
                }
            }
            if let Some(m) = asm.take_mixed()
                && !*mixed_told
            {
                *mixed_told = true;
                tracing::warn!(
                    metric = %m.metric,
                    stream = %m.stream,
                    first = %m.origins[0],
                    second = %m.origins[1],
                    "Two series feed one feature (their values are merged in its windows, as the agent merges them): name them apart ([telegraf] name_tags) or narrow [mqtt] subscribe, then record again."
                );
            }
        });
    }

    /// Writes the frames closed at `now` (monotonic seconds), or all with `None`.
    fn emit(&mut self, now: Option<f64>) -> Result<(), RecordError> {
        let Phase::Record { asm } = &mut self.phase else {
            return Ok(());
        };
        let mut frames: Vec<(f64, bool, Vec<f32>)> = Vec::new();
        let mut out = |f: crate::ingest::assemble::FrameOut<'_>| {
            frames.push((f.window_end, f.incomplete, f.values.to_vec()));
        };
        match now {
            Some(t) => asm.poll_streams(t, &mut out),
            None => asm.flush(&mut out),
        }
        for (end, incomplete, values) in frames {
            if self.done() {
                break;
            }
            if incomplete || values.iter().any(|v| !v.is_finite()) {
                self.summary.incomplete += 1;
                continue;
            }
            let w = &mut self.writer;
            w.line.clear();
            use std::fmt::Write as _;
            let _ = write!(w.line, "{end}");
            for v in &values {
                let _ = write!(w.line, ",{v}");
            }
            w.line.push('\n');
            w.write_line()?;
            self.summary.rows += 1;
        }
        Ok(())
    }

    /// A progress line.
    fn progress(&self, now: f64, connected: bool) -> String {
        let s = &self.summary;
        match &self.phase {
            Phase::Discover {
                until: None, held, ..
            } => format!(
                "waiting for metrics ({}; {} messages, none decoded yet)",
                if connected {
                    "connected"
                } else {
                    "not connected"
                },
                held.len()
            ),
            Phase::Discover {
                until: Some(u),
                names,
                held,
            } => format!(
                "discovering ({:.0} s left): {} streams, {} metrics so far, {} messages held",
                (u - now).max(0.0),
                names.len(),
                names.values().map(BTreeSet::len).sum::<usize>(),
                held.len()
            ),
            Phase::Record { .. } => format!(
                "{} rows written, stream {:?}, {} incomplete left out, {} messages; refused: {}{}{}",
                s.rows,
                s.stream,
                s.incomplete,
                s.messages,
                refusals(s),
                if s.new_metrics.is_empty() {
                    String::new()
                } else {
                    format!("; new metrics not recorded: {}", named(&s.new_metrics))
                },
                if s.other_streams.is_empty() {
                    String::new()
                } else {
                    format!("; other streams: {}", named(&s.other_streams))
                },
            ),
        }
    }
}

fn bump_named(map: &mut BTreeMap<String, u64>, unnamed: &mut u64, name: &str) {
    if let Some(n) = map.get_mut(name) {
        *n += 1;
    } else if map.len() < NAMES_KEPT {
        map.insert(name.to_string(), 1);
    } else {
        *unnamed += 1;
    }
}

/// The timestamp column's name: `[input] timestamp_column`, or `timestamp`.
fn timestamp_column(cfg: &DarkwatchConfig) -> String {
    if cfg.input.timestamp_column.trim().is_empty() {
        "timestamp".into()
    } else {
        cfg.input.timestamp_column.trim().to_string()
    }
}

/// Refuses features a training CSV cannot carry as they are.
fn check_names(features: &[String], ts: &str) -> Result<(), RecordError> {
    if features.is_empty() {
        return Err(RecordError::Refused("no metric to record".into()));
    }
    for f in features {
        if f.contains(['\n', '\r']) || f.trim().is_empty() {
            return Err(RecordError::Refused(format!(
                "metric {f:?} cannot be a CSV column name (empty, or a line break): leave it out with --metrics"
            )));
        }
        // train trims column names: the model would name a metric the agent never sees.
        if f.trim() != f {
            return Err(RecordError::Refused(format!(
                "metric {f:?} begins or ends with a space, which train's CSV reader trims: the model would expect {:?}, which the agent never receives; rename it at the sender, or leave it out with --metrics",
                f.trim()
            )));
        }
        let clash = f.eq_ignore_ascii_case(ts)
            || crate::ingest::csv::AUTO_TIMESTAMP_NAMES
                .iter()
                .any(|t| f.eq_ignore_ascii_case(t));
        if clash {
            return Err(RecordError::Refused(format!(
                "metric {f:?} would be read as the timestamp column by train: leave it out with --metrics"
            )));
        }
    }
    let mut seen = BTreeSet::new();
    for f in features {
        if !seen.insert(f.as_str()) {
            return Err(RecordError::Refused(format!("metric {f:?} is named twice")));
        }
    }
    Ok(())
}

/// What the MQTT thread tells the recorder.
enum Note {
    Message(Incoming),
    Connected,
    Failed(String),
    SubscribeRefused,
}

/// Records from `cfg`'s broker until `stop` is set, `--frames` rows are written or
/// `--secs` pass, with a progress line on stderr every `progress_secs` and the summary at
/// the end. Returns the summary.
///
/// # Errors
/// As [`Recorder::new`] and [`Recorder::tick`]; [`RecordError::Config`] for an embedded
/// broker on port 0; [`RecordError::Refused`] when the broker refuses the subscription or
/// nothing was written; [`RecordError::Mqtt`] for unreadable TLS files.
pub fn record(
    cfg: &DarkwatchConfig,
    opts: RecordOptions,
    stop: &Arc<AtomicBool>,
) -> Result<RecordSummary, RecordError> {
    let mcfg = &cfg.mqtt;
    if mcfg.broker == BrokerMode::Embedded && mcfg.port == 0 {
        return Err(RecordError::Config {
            key: "mqtt.port".into(),
            reason: "is 0 with broker = \"embedded\": the agent's broker listens on a port picked at its start, which record cannot know; record connects to a running broker: give its port (or broker = \"external\" with the broker the nodes publish to)".into(),
        });
    }
    let out = opts.out.clone();
    let (frames, secs, progress_secs) = (opts.frames, opts.secs, opts.progress_secs.max(0.1));
    let mut rec = Recorder::new(cfg, opts)?;
    let filters = mcfg.subscribe_filters();
    let mut options = mqtt::broker_options(
        mcfg,
        format!("{}-record-{}", mcfg.client_id_for(), std::process::id()),
    )?;
    options.set_clean_session(true);
    let (client, mut connection) = rumqttc::Client::new(options, 64);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Note>(4096);
    let quit = Arc::new(AtomicBool::new(false));
    {
        let quit = quit.clone();
        let client = client.clone();
        let filters = filters.clone();
        std::thread::Builder::new()
            .name("darkwatch-record-mqtt".into())
            .spawn(move || {
                let mut backoff = Duration::from_millis(100);
                for event in connection.iter() {
                    if quit.load(Ordering::SeqCst) {
                        break;
                    }
                    let note = match event {
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                            backoff = Duration::from_millis(100);
                            let subs = filters.iter().map(|f| {
                                rumqttc::SubscribeFilter::new(f.clone(), rumqttc::QoS::AtLeastOnce)
                            });
                            match client.try_subscribe_many(subs) {
                                Err(e) => {
                                    Note::Failed(format!("cannot queue the subscribe request: {e}"))
                                }
                                Ok(()) => continue,
                            }
                        }
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                            Note::Message(Incoming {
                                topic: p.topic,
                                payload: p.payload.to_vec(),
                                received: mqtt::epoch_secs(),
                                received_mono: mqtt::monotonic_secs(),
                            })
                        }
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(a)))
                            if a.return_codes
                                .iter()
                                .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) =>
                        {
                            Note::SubscribeRefused
                        }
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => Note::Connected,
                        Ok(_) => continue,
                        Err(e) => {
                            let note = Note::Failed(e.to_string());
                            if tx.send(note).is_err() {
                                break;
                            }
                            std::thread::sleep(backoff);
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                            continue;
                        }
                    };
                    if tx.send(note).is_err() {
                        break;
                    }
                }
            })
            .map_err(|source| {
                RecordError::Mqtt(mqtt::MqttError::Spawn {
                    what: "MQTT client thread",
                    source,
                })
            })?;
    }
    eprintln!(
        "darkwatch record: connecting to {}:{} ({}), subscribing to {}; writing {}",
        mcfg.host,
        mcfg.port,
        match mcfg.broker {
            BrokerMode::Embedded => "the running agent's embedded broker",
            BrokerMode::External => "external broker",
        },
        filters.join(","),
        out.display()
    );
    let started = mqtt::monotonic_secs();
    let mut next_progress = started + progress_secs;
    let mut connected = false;
    let mut failures: u64 = 0;
    let result = loop {
        if stop.load(Ordering::SeqCst) {
            break Ok("signal");
        }
        if rec.done() {
            break Ok("frames");
        }
        let now = mqtt::monotonic_secs();
        if secs.is_some_and(|s| now - started >= s) {
            break Ok("secs");
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Note::Message(m)) => {
                if let Err(e) = rec.take(m) {
                    break Err(e);
                }
            }
            Ok(Note::Connected) => {
                connected = true;
                eprintln!("darkwatch record: connected and subscribed");
            }
            Ok(Note::Failed(e)) => {
                connected = false;
                failures += 1;
                if failures.is_power_of_two() {
                    eprintln!(
                        "darkwatch record: broker {}:{}: {e} (failure {failures}; retrying)",
                        mcfg.host, mcfg.port
                    );
                }
            }
            Ok(Note::SubscribeRefused) => {
                break Err(RecordError::Refused(format!(
                    "the broker refused the subscription to {}: check [mqtt] subscribe and the broker's ACLs",
                    filters.join(",")
                )));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                break Err(RecordError::Refused("the MQTT client stopped".into()));
            }
        }
        let now = mqtt::monotonic_secs();
        if let Err(e) = rec.tick(now) {
            break Err(e);
        }
        if now >= next_progress {
            next_progress = now + progress_secs;
            eprintln!("darkwatch record: {}", rec.progress(now, connected));
        }
    };
    quit.store(true, Ordering::SeqCst);
    let _ = client.try_disconnect();
    // The file written (a temporary one under `--force`), and the file it replaces.
    let (written, replaces) = (rec.writer.path.clone(), rec.writer.replaces.clone());
    let had_header = rec.recording() || matches!(rec.phase, Phase::Discover { until: Some(_), .. });
    // A file without its header line (a failure in discovery, or a refusal there such as
    // several streams) is no recording: it does not stay.
    let fail = |rec: Recorder, e: RecordError| -> Result<RecordSummary, RecordError> {
        if !rec.recording() {
            drop(rec);
            let _ = std::fs::remove_file(&written);
        }
        Err(e)
    };
    let ended_by = match result {
        Ok(e) => e,
        Err(e) => return fail(rec, e),
    };
    let summary = match rec.finish(ended_by) {
        Ok(s) => s,
        Err(e) => return fail(rec, e),
    };
    if !had_header {
        drop(rec);
        let _ = std::fs::remove_file(&written);
        return Err(RecordError::Refused(format!(
            "no metric decoded from [mqtt] subscribe {} before the stop ({ended_by}; {} messages; refused: {}); {} removed",
            filters.join(","),
            summary.messages,
            refusals(&summary),
            out.display()
        )));
    }
    if let Some(out) = &replaces {
        drop(rec);
        std::fs::rename(&written, out).map_err(|source| RecordError::Io {
            path: format!("{} (renaming {} over it)", out.display(), written.display()),
            source,
        })?;
    }
    eprintln!(
        "darkwatch record: done ({ended_by}): {summary}; {}",
        out.display()
    );
    if frames.is_some_and(|n| summary.rows < n) || summary.rows == 0 {
        tracing::warn!(
            rows = summary.rows,
            "Fewer rows than asked for were written; the file keeps them."
        );
    }
    Ok(summary)
}
