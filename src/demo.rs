//! `darkwatch demo`: the whole agent on one machine with nothing installed. An embedded
//! broker, a publisher that replays a recorded stream as ExaMon messages, the agent
//! scoring it, and a subscriber that counts the alerts it receives; then a summary.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::agent::{self, AgentCounters, AgentError, AgentReport};
use crate::config::DarkwatchConfig;
use crate::eval::{self, Report};
use crate::ingest::{self, IngestError, TableOptions};
use crate::mqtt::{self, BrokerMode};
use crate::replay::{self, ReplayError};

/// What the demo replays.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub model_dir: PathBuf,
    pub input: PathBuf,
    pub labels: Option<PathBuf>,
    /// First row replayed.
    pub start: usize,
    /// Rows replayed.
    pub frames: usize,
}

/// What the demo saw.
#[derive(Debug)]
pub struct DemoReport {
    pub agent: AgentReport,
    pub messages_published: u64,
    pub alerts_received: u64,
    pub eval: Option<Report>,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Mqtt(#[from] mqtt::MqttError),
    #[error("{0}")]
    Other(String),
}

/// Refuses an SAE folder as `demo --model`, saying what to use instead (it used to fail
/// with `…/model.json: No such file or directory`).
///
/// # Errors
/// [`DemoError::Other`] with that message.
pub fn check_model_dir(dir: &std::path::Path) -> Result<(), DemoError> {
    match crate::sae::detector::autoencoder_only(dir, "demo") {
        Some(why) => Err(DemoError::Other(why)),
        None => Ok(()),
    }
}

/// Runs the demo.
///
/// # Errors
/// Unreadable inputs, a broker that does not start, or an agent failure.
pub fn run(opts: &DemoOptions, base: &DarkwatchConfig) -> Result<DemoReport, DemoError> {
    let started = Instant::now();
    check_model_dir(&opts.model_dir)?;
    // Refuse a missing model before anything starts (the agent would fail in its thread).
    let model = crate::model::Model::load(&opts.model_dir).map_err(AgentError::from)?;
    if opts.frames == 0 {
        return Err(DemoError::Other("--frames must be at least 1".into()));
    }
    // The columns become the model's features as replay takes them (by name, or by
    // position when one side is unnamed, with a warning), gaps filled as replay fills
    // them; each is then published under the model's name for it, which the agent's
    // assembler matches.
    let opts_table = TableOptions {
        timestamp_column: Some(base.input.timestamp_column.clone()).filter(|s| !s.is_empty()),
        features: Some(model.meta.frame_features().to_vec()),
    };
    let table = replay::read_input(&opts.input, &opts_table)?;
    let mismatch = |e: ReplayError| match e {
        ReplayError::Features { reason, .. } => DemoError::Other(format!(
            "{}: the model's features are not among the metrics the demo publishes from {}: {reason}; give it a model trained on that recording",
            opts.model_dir.display(),
            opts.input.display(),
        )),
        e => DemoError::Other(e.to_string()),
    };
    let (mut values, _) = replay::align_features(&model, table).map_err(mismatch)?;
    // As replay fills them: a table model's gaps take the training mean, a series' the
    // last value.
    replay::fill_input_gaps(&model, &opts.input, &mut values, !model.meta.table)
        .map_err(mismatch)?;
    let features = model.meta.frame_features().to_vec();
    let end = (opts.start + opts.frames).min(values.nrows());
    if opts.start >= end {
        return Err(DemoError::Other(format!(
            "{}: --start {} is past its {} rows",
            opts.input.display(),
            opts.start,
            values.nrows()
        )));
    }
    let labels = match &opts.labels {
        Some(p) => Some(ingest::read_labels(p, Some(values.nrows()))?[opts.start..end].to_vec()),
        None => None,
    };
    let port = mqtt::start_embedded_broker("127.0.0.1", 0)?;
    let spool_dir = std::env::temp_dir().join(format!("darkwatch-demo-{}", std::process::id()));
    let mut cfg = base.clone();
    cfg.agent.model_dir = opts.model_dir.clone();
    cfg.mqtt.broker = BrokerMode::External;
    cfg.mqtt.host = "127.0.0.1".into();
    cfg.mqtt.port = port;
    cfg.mqtt.node_name = "demo".into();
    // The demo's agent watches the replayed node, not its own (a central agent).
    cfg.mqtt.subscribe = vec!["org/+/cluster/+/node/+/plugin/+/chnl/data/#".into()];
    cfg.spool.dir = spool_dir.clone();
    cfg.spool.fsync = false;
    cfg.metrics.listen = String::new();
    // One row per minute, as SMD was recorded.
    cfg.assemble.window_secs = 60.0;

    // The subscriber: counts alerts as an operator's dashboard would receive them.
    let received = Arc::new(AtomicU64::new(0));
    let sub_stop = Arc::new(AtomicBool::new(false));
    let subscriber = {
        let (received, sub_stop) = (received.clone(), sub_stop.clone());
        let mut o = rumqttc::MqttOptions::new("darkwatch-demo-subscriber", "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(5));
        let (client, mut connection) = rumqttc::Client::new(o, 64);
        client
            .subscribe("darkwatch/+/alerts/#", rumqttc::QoS::AtLeastOnce)
            .map_err(|e| DemoError::Other(format!("subscriber: {e}")))?;
        std::thread::Builder::new()
            .name("darkwatch-demo-sub".into())
            .spawn(move || {
                while !sub_stop.load(Ordering::SeqCst) {
                    match connection.recv_timeout(Duration::from_millis(100)) {
                        Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(_)))) => {
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(_)) => std::thread::sleep(Duration::from_millis(100)),
                        _ => {}
                    }
                }
            })
            .map_err(|e| DemoError::Other(e.to_string()))?
    };

    // The agent.
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(AgentCounters::default());
    let agent = {
        let (cfg, stop, counters) = (cfg.clone(), stop.clone(), counters.clone());
        std::thread::Builder::new()
            .name("darkwatch-demo-agent".into())
            .spawn(move || agent::run(&cfg, stop, counters, true))
            .map_err(|e| DemoError::Other(e.to_string()))?
    };
    // Give the agent a moment to subscribe before the stream starts.
    std::thread::sleep(Duration::from_millis(500));

    // The publisher: every metric of every row as one ExaMon message.
    let mut o = rumqttc::MqttOptions::new("darkwatch-demo-publisher", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    o.set_inflight(200);
    let (client, mut connection) = rumqttc::Client::new(o, 1024);
    // Drive the connection until our DISCONNECT has gone out (the iterator would
    // otherwise keep reconnecting).
    let acked = Arc::new(AtomicU64::new(0));
    let pump = {
        let acked = acked.clone();
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                    _ => {}
                }
            }
        })
    };
    let t0 = 1_700_000_000.0;
    let mut published = 0u64;
    for (i, row) in values
        .rows()
        .into_iter()
        .enumerate()
        .take(end)
        .skip(opts.start)
    {
        let ts = t0 + 60.0 * i as f64 + 30.0;
        for (name, v) in features.iter().zip(row.iter()) {
            let topic =
                format!("org/demo/cluster/smd/node/machine-1-6/plugin/replay/chnl/data/{name}");
            client
                .publish(
                    topic,
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    format!("{v};{ts:.3}"),
                )
                .map_err(|e| DemoError::Other(format!("publisher: {e}")))?;
            published += 1;
        }
        // Back-pressure: the embedded broker keeps a bounded log per subscriber, so do not
        // run more than a few thousand messages ahead of the agent.
        let ahead = Instant::now();
        while published.saturating_sub(counters.messages.load(Ordering::Relaxed)) > 4_000
            && ahead.elapsed() < Duration::from_secs(10)
            && !agent.is_finished()
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    // Disconnect only once the broker has every message (QoS 1 acknowledgements).
    let waiting = Instant::now();
    while acked.load(Ordering::Relaxed) < published && waiting.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = client.disconnect();
    let _ = pump.join();

    // Wait until every published message reached the agent (or nothing moves for 5 s),
    // then stop it: it drains, closes the open windows and flushes its alerts.
    let mut last = (0, Instant::now());
    loop {
        let seen = counters.messages.load(Ordering::Relaxed);
        if seen >= published {
            break;
        }
        if seen != last.0 {
            last = (seen, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(5) {
            tracing::warn!(
                seen,
                published,
                "Demo: messages stopped arriving; stopping the agent."
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let report = agent
        .join()
        .map_err(|_| DemoError::Other("the agent thread panicked".into()))??;
    std::thread::sleep(Duration::from_millis(300));
    sub_stop.store(true, Ordering::SeqCst);
    let _ = subscriber.join();
    let _ = std::fs::remove_dir_all(&spool_dir);

    // The rows the agent scored, with their labels (a lag-windowed model does not score
    // a stream's first frames, and a frame the agent dropped has no score).
    let eval = labels.as_ref().and_then(|l| {
        let mut scored = vec![None; l.len()];
        for &(_, seq, s) in &report.scores {
            if let Some(slot) = scored.get_mut(seq as usize) {
                *slot = Some(s);
            }
        }
        let (scores, labels): (Vec<f32>, Vec<u8>) = scored
            .iter()
            .zip(l)
            .filter_map(|(s, &y)| s.map(|s| (s, y)))
            .unzip();
        eval::evaluate(&scores, &labels).ok()
    });
    Ok(DemoReport {
        agent: report,
        messages_published: published,
        alerts_received: received.load(Ordering::Relaxed),
        eval,
        seconds: started.elapsed().as_secs_f64(),
    })
}

impl std::fmt::Display for DemoReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let a = &self.agent;
        let c = &a.counters;
        let p = &a.pipeline;
        writeln!(
            f,
            "broker      embedded rumqttd on 127.0.0.1:{}; {} ExaMon messages published",
            a.port, self.messages_published
        )?;
        writeln!(
            f,
            "agent       {} messages, {} decode errors, {} frames assembled ({} incomplete), {} scored",
            c.messages.load(Ordering::Relaxed),
            c.decode_errors(),
            c.frames.load(Ordering::Relaxed),
            c.frames_incomplete.load(Ordering::Relaxed),
            p.frames_scored
        )?;
        writeln!(
            f,
            "alerts      {} firing, {} resolved published; {} received by the subscriber",
            c.alerts_firing.load(Ordering::Relaxed),
            c.alerts_resolved.load(Ordering::Relaxed),
            self.alerts_received
        )?;
        if let Some(r) = &self.eval {
            writeln!(f, "{r}")?;
        }
        writeln!(
            f,
            "latency     frame assembled to scored: p50 {:.1} µs, p99 {:.1} µs",
            p.latency.quantile_ns(0.5) / 1e3,
            p.latency.quantile_ns(0.99) / 1e3
        )?;
        writeln!(f, "took        {:.1} s", self.seconds)
    }
}
