//! The agent: MQTT in, frames assembled per stream, the one pipeline, a threshold and
//! alert state per stream, Alertmanager-shaped alerts out over MQTT (spooled to disk
//! first, so none is lost while the broker is away).
//!
//! ```text
//! mqtt client thread ──Incoming──▶ source thread: decode ▶ assemble ▶ frame ring ▶ scorer ▶ sink thread:
//!        ▲                                                                         threshold + alerts per stream
//!        └──────────────────────────── Outgoing (alert JSON) ◀─────────────────────┘
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::alert::{AlertEvent, AlertState, Observation};
use crate::config::DarkwatchConfig;
use crate::ingest::assemble::{Assembler, AssemblerError};
use crate::ingest::examon::ExamonDecoder;
use crate::model::{Model, ModelError};
use crate::mqtt::{self, Incoming, MqttError, MqttStats, Outgoing};
use crate::pipeline::{self, Clock, PipelineError, PipelineReport, ScoredFrame, Sink, Source};
use crate::ring::{FrameMeta, FrameProducer};
use crate::spool::{Spool, SpoolError};
use crate::threshold::Threshold;

/// What the agent runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Model directory written by `darkwatch train`.
    pub model_dir: PathBuf,
    /// What the subscribed topics carry: `examon` (one metric per message), `telegraf`
    /// (Telegraf's MQTT output, JSON or Influx line protocol) or `raw` (one little-endian
    /// f32 frame of the model's width per message; the topic's last segment names the stream).
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
    /// Raw frames skip the assembler: each message is a frame. Streams are numbered in
    /// order of appearance (number and next sequence number kept per stream name).
    Raw {
        decoder: crate::ingest::raw::RawDecoder,
        frame: Vec<f32>,
        streams: std::collections::HashMap<String, (u32, u64)>,
    },
}

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Model(#[from] ModelError),
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

/// Counters of one agent run.
#[derive(Debug, Default)]
pub struct AgentCounters {
    pub messages: AtomicU64,
    pub decode_errors: AtomicU64,
    pub samples_rejected: AtomicU64,
    pub frames: AtomicU64,
    pub frames_incomplete: AtomicU64,
    pub alerts_firing: AtomicU64,
    pub alerts_resolved: AtomicU64,
}

/// What a finished run reports.
#[derive(Debug)]
pub struct AgentReport {
    pub pipeline: PipelineReport,
    pub counters: Arc<AgentCounters>,
    pub mqtt: Arc<MqttStats>,
    /// (stream, seq, score) of every scored frame, when recording was asked for.
    pub scores: Vec<(u32, u64, f32)>,
    /// Every alert event, in order.
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
    let model = Arc::new(Model::load(&cfg.agent.model_dir)?);
    let mut mqtt_cfg = cfg.mqtt.clone();
    if mqtt_cfg.broker == mqtt::BrokerMode::Embedded {
        mqtt_cfg.port = mqtt::start_embedded_broker(&mqtt_cfg.host, mqtt_cfg.port)?;
        tracing::info!(host = %mqtt_cfg.host, port = mqtt_cfg.port, "Embedded MQTT broker started.");
    }
    let port = mqtt_cfg.port;
    let spool = Spool::open(cfg.spool.clone())?;
    let (in_tx, in_rx) =
        std::sync::mpsc::sync_channel::<Incoming>(mqtt_cfg.incoming_capacity.max(1));
    let (out_tx, out_rx) = std::sync::mpsc::channel::<Outgoing>();
    let mqtt_stats = Arc::new(MqttStats::default());
    let client_stop = Arc::new(AtomicBool::new(false));
    let client = mqtt::spawn_client(
        mqtt_cfg.clone(),
        spool,
        in_tx,
        out_rx,
        mqtt_stats.clone(),
        client_stop.clone(),
    )?;

    let calibration: Vec<f64> = model
        .calibration_scores
        .iter()
        .map(|&s| f64::from(s))
        .collect();
    let template = cfg
        .threshold
        .build(&calibration)
        .map_err(|e| AgentError::Threshold(e.to_string()))?;
    let streams: Arc<Mutex<Vec<String>>> = Arc::default();
    let source = AgentSource {
        incoming: in_rx,
        decoder: match cfg.agent.format {
            InputFormat::Examon => Decoder::Examon(cfg.examon.build()),
            InputFormat::Telegraf => Decoder::Telegraf(cfg.telegraf.build()),
            InputFormat::Raw => Decoder::Raw {
                decoder: cfg.raw.build(model.n_features()),
                frame: Vec::with_capacity(model.n_features()),
                streams: Default::default(),
            },
        },
        assembler: cfg.assemble.build(model.meta.features.clone())?,
        streams: streams.clone(),
        counters: counters.clone(),
        stop: stop.clone(),
        newest: None,
        known_streams: 0,
        max_clock_jump: MAX_CLOCK_JUMP_SECS.max(10.0 * cfg.assemble.window_secs),
    };
    let sink = AgentSink {
        template,
        per_stream: Vec::new(),
        streams,
        alert_cfg: cfg.alert.clone(),
        mqtt: mqtt_cfg,
        model_id: model.meta.id.clone(),
        model_version: model.meta.provenance.created_unix_secs.to_string(),
        features: model.meta.features.clone().into(),
        out: out_tx,
        counters: counters.clone(),
        record,
        scores: Vec::new(),
        events: Vec::new(),
    };
    let metrics_stop = Arc::new(AtomicBool::new(false));
    if !cfg.metrics.listen.is_empty() {
        let exposed = crate::metrics::Exposed {
            counters: counters.clone(),
            mqtt: mqtt_stats.clone(),
            model_id: model.meta.id.clone(),
        };
        match crate::metrics::serve(&cfg.metrics.listen, exposed, metrics_stop.clone()) {
            Ok(addr) => tracing::info!(%addr, "Serving /metrics."),
            // A taken metrics port must not stop anomaly detection: log and go on.
            Err(e) => {
                tracing::warn!(listen = %cfg.metrics.listen, error = %e, "Cannot serve /metrics.")
            }
        }
    }
    let head = model.meta.head;
    let (report, sink) = pipeline::run(
        model,
        head,
        cfg.score.top_contributions,
        &cfg.pipeline,
        cfg.pipeline.full_policy,
        source,
        sink,
    )?;
    let AgentSink {
        scores,
        events,
        out,
        ..
    } = sink;
    drop(out);
    client_stop.store(true, Ordering::SeqCst);
    metrics_stop.store(true, Ordering::SeqCst);
    let _ = client.join();
    Ok(AgentReport {
        pipeline: report,
        counters,
        mqtt: mqtt_stats,
        scores,
        events,
        port,
    })
}

/// Decodes MQTT messages and assembles frames into the ring.
struct AgentSource {
    incoming: Receiver<Incoming>,
    decoder: Decoder,
    assembler: Assembler,
    streams: Arc<Mutex<Vec<String>>>,
    counters: Arc<AgentCounters>,
    stop: Arc<AtomicBool>,
    /// The newest sample time seen, and when (wall clock) it arrived: the event-time clock
    /// that closes the windows of a quiet stream. Event time, not wall time, so a replay
    /// of old data at any speed closes windows exactly as live data would.
    newest: Option<(f64, std::time::Instant)>,
    /// Streams whose names are already in `streams`.
    known_streams: usize,
    /// See [`AgentSource::take`].
    max_clock_jump: f64,
}

impl AgentSource {
    /// Event time now: the newest sample's time plus the wall time since it arrived.
    fn event_now(&self) -> f64 {
        self.newest
            .map_or(f64::NAN, |(t, at)| t + at.elapsed().as_secs_f64())
    }

    fn emit(&mut self, producer: &mut FrameProducer, clock: &Clock, now: Option<f64>) -> u64 {
        let mut pushed = 0;
        let streams = &self.streams;
        let counters = &self.counters;
        let known = &mut self.known_streams;
        let mut push = |f: crate::ingest::assemble::FrameOut<'_>| {
            // A new stream (rare): publish its name for the sink; no lock otherwise.
            let i = f.stream_index as usize;
            if i >= *known
                && let Ok(mut s) = streams.lock()
            {
                if s.len() <= i {
                    s.resize(i + 1, String::new());
                }
                s[i] = f.stream.to_string();
                *known = s.len();
            }
            if f.incomplete {
                counters.frames_incomplete.fetch_add(1, Ordering::Relaxed);
            }
            counters.frames.fetch_add(1, Ordering::Relaxed);
            let meta = FrameMeta {
                seq: f.seq,
                stream: f.stream_index,
                timestamp: f.window_end,
                enqueued_ns: clock.now_ns(),
            };
            producer.push(meta, f.values);
            pushed += 1;
        };
        match now {
            Some(t) => self.assembler.poll(t, &mut push),
            None => self.assembler.flush(&mut push),
        }
        pushed
    }
}

impl AgentSource {
    /// Decodes one message into the assembler, counting what is rejected. The event clock
    /// moves only with accepted samples, and never jumps more than [`MAX_CLOCK_JUMP_SECS`]
    /// (or ten windows) ahead: one sample with a wrong clock must not close every
    /// stream's windows.
    /// Returns the frames pushed to the ring directly (raw input only).
    fn take(&mut self, msg: &Incoming, producer: Option<(&mut FrameProducer, &Clock)>) -> u64 {
        self.counters.messages.fetch_add(1, Ordering::Relaxed);
        let AgentSource {
            decoder,
            assembler,
            counters,
            newest,
            max_clock_jump,
            streams,
            known_streams,
            ..
        } = self;
        let mut accept = |sample: &crate::ingest::assemble::Sample<'_>| {
            if assembler.push(sample).is_err() {
                counters.samples_rejected.fetch_add(1, Ordering::Relaxed);
                return;
            }
            match *newest {
                None => *newest = Some((sample.timestamp, std::time::Instant::now())),
                Some((t, _)) if sample.timestamp > t && sample.timestamp - t <= *max_clock_jump => {
                    *newest = Some((sample.timestamp, std::time::Instant::now()));
                }
                _ => {}
            }
        };
        match decoder {
            Decoder::Examon(d) => match d.decode(&msg.topic, &msg.payload) {
                Ok(sample) => accept(&sample),
                Err(_) => {
                    counters.decode_errors.fetch_add(1, Ordering::Relaxed);
                }
            },
            Decoder::Telegraf(d) => {
                let mut bad = 0u64;
                let whole = d.decode(&msg.payload, msg.received, &mut |r| match r {
                    Ok(sample) => accept(&sample),
                    Err(_) => bad += 1,
                });
                bad += u64::from(whole.is_err());
                counters.decode_errors.fetch_add(bad, Ordering::Relaxed);
            }
            Decoder::Raw {
                decoder,
                frame,
                streams: seen,
            } => {
                let name = match decoder.decode(&msg.topic, &msg.payload, frame) {
                    Ok(name) => name.unwrap_or("default"),
                    Err(_) => {
                        counters.decode_errors.fetch_add(1, Ordering::Relaxed);
                        return 0;
                    }
                };
                let next = seen.len() as u32;
                let entry = match seen.get_mut(name) {
                    Some(entry) => entry,
                    None => seen.entry(name.to_string()).or_insert((next, 0)),
                };
                let (index, seq) = *entry;
                entry.1 += 1;
                if index as usize >= *known_streams
                    && let Ok(mut names) = streams.lock()
                {
                    if names.len() <= index as usize {
                        names.resize(index as usize + 1, String::new());
                    }
                    names[index as usize] = name.to_string();
                    *known_streams = names.len();
                }
                counters.frames.fetch_add(1, Ordering::Relaxed);
                if let Some((producer, clock)) = producer {
                    let meta = FrameMeta {
                        seq,
                        stream: index,
                        timestamp: msg.received,
                        enqueued_ns: clock.now_ns(),
                    };
                    producer.push(meta, frame);
                    return 1;
                }
            }
        }
        0
    }
}

/// Largest step of the event clock from one sample (see [`AgentSource::take`]).
pub const MAX_CLOCK_JUMP_SECS: f64 = 3600.0;

impl Source for AgentSource {
    fn run(
        mut self: Box<Self>,
        producer: &mut FrameProducer,
        clock: &Clock,
        _stop: &AtomicBool,
    ) -> u64 {
        let mut offered = 0;
        // `stop` is checked on every turn: a busy feed never lets recv time out.
        while !self.stop.load(Ordering::SeqCst) {
            match self.incoming.recv_timeout(Duration::from_millis(50)) {
                Ok(msg) => {
                    offered += self.take(&msg, Some((&mut *producer, clock)));
                    offered += self.emit(producer, clock, Some(f64::NAN));
                }
                Err(RecvTimeoutError::Timeout) => {
                    let now = self.event_now();
                    offered += self.emit(producer, clock, Some(now));
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        // Shutdown: take what is already queued, then close every open window.
        while let Ok(msg) = self.incoming.try_recv() {
            offered += self.take(&msg, Some((&mut *producer, clock)));
        }
        offered + self.emit(producer, clock, None)
    }
}

/// Thresholds and alert state per stream; alerts leave as MQTT messages.
struct AgentSink {
    template: Threshold,
    per_stream: Vec<Option<(Threshold, AlertState)>>,
    streams: Arc<Mutex<Vec<String>>>,
    alert_cfg: crate::alert::AlertConfig,
    mqtt: mqtt::MqttConfig,
    model_id: String,
    model_version: String,
    features: Arc<[String]>,
    out: Sender<Outgoing>,
    counters: Arc<AgentCounters>,
    record: bool,
    scores: Vec<(u32, u64, f32)>,
    events: Vec<AlertEvent>,
}

impl AgentSink {
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
        let payload = serde_json::to_vec(&event).unwrap_or_default();
        let _ = self.out.send(Outgoing {
            topic: self.mqtt.alert_topic_for(stream),
            payload,
            retain: false,
        });
        self.events.push(event);
    }
}

impl Sink for AgentSink {
    fn accept(&mut self, f: &ScoredFrame) {
        let i = f.meta.stream as usize;
        if self.per_stream.len() <= i {
            self.per_stream.resize_with(i + 1, || None);
        }
        if self.per_stream[i].is_none() {
            let name = self
                .streams
                .lock()
                .ok()
                .and_then(|s| s.get(i).cloned())
                .unwrap_or_else(|| i.to_string());
            let state = AlertState::new(
                &self.alert_cfg,
                &name,
                &self.model_id,
                &self.model_version,
                self.features.clone(),
            );
            self.per_stream[i] = Some((self.template.clone(), state));
        }
        let Some((threshold, alerts)) = self.per_stream[i].as_mut() else {
            return;
        };
        let t = threshold.threshold();
        threshold.update(f64::from(f.score));
        let event = alerts.observe(&Observation::from_scored(f, t));
        if self.record {
            self.scores.push((f.meta.stream, f.meta.seq, f.score));
        }
        if let Some(event) = event {
            let name = event.stream.clone();
            self.publish(&name, event);
        }
    }

    fn finish(&mut self) -> Result<(), std::io::Error> {
        let mut ending = Vec::new();
        for (_, alerts) in self.per_stream.iter_mut().flatten() {
            if let Some(e) = alerts.finish() {
                ending.push(e);
            }
        }
        for e in ending {
            let name = e.stream.clone();
            self.publish(&name, e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(window_secs: f64) -> (AgentSource, std::sync::mpsc::SyncSender<Incoming>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(16);
        let mut cfg = DarkwatchConfig::default();
        cfg.assemble.window_secs = window_secs;
        let features: Vec<String> = vec!["a".into(), "b".into()];
        let src = AgentSource {
            incoming: rx,
            decoder: Decoder::Examon(cfg.examon.build()),
            assembler: cfg.assemble.build(features).unwrap(),
            streams: Arc::default(),
            counters: Arc::default(),
            stop: Arc::default(),
            newest: None,
            known_streams: 0,
            max_clock_jump: MAX_CLOCK_JUMP_SECS.max(10.0 * window_secs),
        };
        (src, tx)
    }

    impl AgentSource {
        fn take_one(&mut self, m: &Incoming) {
            self.take(m, None);
        }
    }

    fn msg(node: &str, metric: &str, value: f64, ts: f64) -> Incoming {
        Incoming {
            topic: format!("org/o/cluster/c/node/{node}/plugin/p/chnl/data/{metric}"),
            payload: format!("{value};{ts}").into_bytes(),
            received: ts,
        }
    }

    #[test]
    fn event_clock_ignores_rejected_and_far_future_samples() {
        let (mut src, _tx) = source(1.0);
        src.take_one(&msg("n1", "a", 1.0, 1000.0));
        assert_eq!(src.newest.map(|n| n.0), Some(1000.0));
        // An unknown metric is rejected and does not move the clock.
        src.take_one(&msg("other", "zzz", 1.0, 5000.0));
        assert_eq!(src.newest.map(|n| n.0), Some(1000.0));
        assert_eq!(src.counters.samples_rejected.load(Ordering::Relaxed), 1);
        // A known metric with a clock far ahead lands in its own stream but does not
        // drag every stream's clock with it.
        src.take_one(&msg("n2", "a", 1.0, 1e9));
        assert_eq!(src.newest.map(|n| n.0), Some(1000.0));
        // Ordinary progress moves it.
        src.take_one(&msg("n1", "b", 1.0, 1001.0));
        assert_eq!(src.newest.map(|n| n.0), Some(1001.0));
        // Garbage is counted, never a panic.
        src.take_one(&Incoming {
            topic: "nonsense".into(),
            payload: vec![0xff; 3],
            received: 0.0,
        });
        assert_eq!(src.counters.decode_errors.load(Ordering::Relaxed), 1);
        assert_eq!(src.counters.messages.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn telegraf_and_raw_inputs_reach_the_assembler_and_the_ring() {
        let (mut src, _tx) = source(1.0);
        src.decoder = Decoder::Telegraf(DarkwatchConfig::default().telegraf.build());
        // A JSON batch naming fields m.a and m.b: unknown to a model of "a", "b", so they are
        // decoded (no decode error) and then rejected by the assembler, counted apart.
        let json =
            br#"{"name":"m","tags":{"host":"n1"},"fields":{"a":1.5,"b":2},"timestamp":1000}"#;
        src.take_one(&Incoming {
            topic: "telegraf/n1".into(),
            payload: json.to_vec(),
            received: 1000.0,
        });
        assert_eq!(src.counters.decode_errors.load(Ordering::Relaxed), 0);
        assert_eq!(src.counters.samples_rejected.load(Ordering::Relaxed), 2);
        src.take_one(&Incoming {
            topic: "telegraf/n1".into(),
            payload: b"{not json".to_vec(),
            received: 1000.0,
        });
        assert!(src.counters.decode_errors.load(Ordering::Relaxed) >= 1);

        // Raw frames of the model's width become frames at once, one stream per topic.
        let cfg = DarkwatchConfig::default();
        src.decoder = Decoder::Raw {
            decoder: cfg.raw.build(2),
            frame: Vec::new(),
            streams: Default::default(),
        };
        let frame: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        for topic in ["act/layer3", "act/layer3", "act/layer7"] {
            src.take_one(&Incoming {
                topic: topic.into(),
                payload: frame.clone(),
                received: 5.0,
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
        });
        assert_eq!(src.counters.frames.load(Ordering::Relaxed), 3);
    }
}
