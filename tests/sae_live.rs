//! Issue 7, item 5: live activation frames over MQTT scored by an SAE in the agent.
//!
//! A tiny TopK SAE is trained (`sae_train_command`, as `darkwatch sae-train`) on the real
//! all-MiniLM-L6-v2 activations in tests/data/activations. The agent then runs in-process
//! against an embedded rumqttd broker with `format = "raw"` and the SAE folder as its model;
//! every test token is published as one little-endian f32 frame, prose on one stream and
//! out-of-distribution text on another. Asserted: every frame is scored, each live score
//! equals what `sae-score` computes offline for that token, the alerts reach an MQTT
//! subscriber and name activation dimensions, and the OOD stream raises more alerts than
//! the prose stream. A prompt's activations sent as one message are every token scored, in
//! order, in batches. Configurations an SAE cannot run with are refused with clear errors.

mod util;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use darkwatch::agent::{self, AgentCounters, AgentError, InputFormat};
use darkwatch::alert::AlertStatus;
use darkwatch::config::DarkwatchConfig;
use darkwatch::detector::Detector;
use darkwatch::mqtt::{self, BrokerMode};
use darkwatch::sae::Sae;
use darkwatch::sae::dark::{DarkConfig, DarkHead};
use darkwatch::sae::detector::{Calibration, CalibrationRows, SaeDetector, SaeScoreKind};
use darkwatch::sae::eval::{
    DARK_DIR, SaeHeadArgs, read_activations, read_labels, sae_head_command, score_tokens,
};
use util::broker::{Collector, publish_all};
use util::repo;

fn train_sae(out: &std::path::Path) {
    let summary = util::sae::train_detector(out, 256, 16);
    assert_eq!(summary.calibration_rows, "held-out");
    assert_eq!(summary.calibration_count, summary.held_out_rows);
}

fn agent_config(dir: &std::path::Path, model: &std::path::Path, port: u16) -> DarkwatchConfig {
    let mut cfg = DarkwatchConfig::default();
    cfg.agent.model_dir = model.to_path_buf();
    cfg.agent.format = InputFormat::Raw;
    cfg.mqtt.broker = BrokerMode::External;
    cfg.mqtt.host = "127.0.0.1".into();
    cfg.mqtt.port = port;
    cfg.mqtt.node_name = "lm".into();
    cfg.mqtt.subscribe = vec!["act/#".into()];
    cfg.spool.dir = dir.join("spool");
    cfg.spool.fsync = false;
    cfg.metrics.listen = String::new();
    cfg
}

fn frame(row: ndarray::ArrayView1<f32>) -> Vec<u8> {
    row.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn agent_scores_live_activation_frames_with_an_sae_as_sae_score_does() {
    let dir = tempfile::tempdir().unwrap();
    let sae_dir = dir.path().join("sae");
    train_sae(&sae_dir);
    let a = repo("tests/data/activations");
    let x = read_activations(&a.join("test.npy"), None).unwrap();
    let labels = read_labels(&a.join("test_labels.npy"), None, x.nrows()).unwrap();
    let sae = Sae::load(&sae_dir).unwrap();
    let head = DarkHead::load(&sae_dir.join(DARK_DIR)).unwrap();
    let offline = score_tokens(&sae, &head, x.view()).unwrap();
    let prose: Vec<usize> = (0..x.nrows()).filter(|&i| labels[i] == 0).collect();
    let ood: Vec<usize> = (0..x.nrows()).filter(|&i| labels[i] == 1).collect();
    assert!(!prose.is_empty() && !ood.is_empty());

    let port = mqtt::start_embedded_broker("127.0.0.1", 0).unwrap();
    let cfg = agent_config(dir.path(), &sae_dir, port);
    let mut alerts = Collector::new(port, &["darkwatch/lm/alerts/#"], None);
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(AgentCounters::default());
    let running = {
        let (cfg, stop, counters) = (cfg.clone(), stop.clone(), counters.clone());
        std::thread::spawn(move || agent::run(&cfg, stop, counters, true))
    };
    // Probe frames on their own stream until the agent is subscribed (stream 0).
    let started = Instant::now();
    while counters.frames_scored.load(Ordering::Relaxed) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60) && !running.is_finished(),
            "the agent never scored a probe frame"
        );
        publish_all(port, &[("act/probe".into(), frame(x.row(prose[0])))]);
        std::thread::sleep(Duration::from_millis(100));
    }
    settle(&counters);
    // Prose is stream 1, OOD stream 2; in steps, so that no burst overflows a ring.
    for (topic, rows) in [("act/prose", &prose), ("act/ood", &ood)] {
        for chunk in rows.chunks(100) {
            let msgs: Vec<(String, Vec<u8>)> = chunk
                .iter()
                .map(|&i| (topic.to_string(), frame(x.row(i))))
                .collect();
            let want = counters.frames_scored.load(Ordering::Relaxed) + chunk.len() as u64;
            publish_all(port, &msgs);
            let waiting = Instant::now();
            while counters.frames_scored.load(Ordering::Relaxed) < want {
                assert!(
                    waiting.elapsed() < Duration::from_secs(60),
                    "frames not scored"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    let report = running.join().unwrap().unwrap();
    let probes = probes_scored(&report.scores);
    assert_eq!(report.pipeline.frames_scored, probes + x.nrows() as u64);
    assert_eq!(counters.frames_dropped.load(Ordering::Relaxed), 0);
    // `/metrics` says what scores.
    assert_eq!(counters.backend(), "sae/topk16/384x256/error_norm");

    // Every live score is the offline score of the same token.
    let mut seen = [0usize; 3];
    for &(stream, seq, score) in &report.scores {
        let rows = match stream {
            0 => continue,
            1 => &prose,
            2 => &ood,
            s => panic!("unexpected stream {s}"),
        };
        let want = offline[rows[seq as usize]].error_sq_norm;
        assert!(
            (score - want).abs() <= 1e-4 * want.abs().max(1.0),
            "stream {stream} seq {seq}: live {score}, offline {want}"
        );
        seen[stream as usize] += 1;
    }
    assert_eq!((seen[1], seen[2]), (prose.len(), ood.len()));

    // Alerts: more on the OOD stream, each naming activation dimensions, all over MQTT.
    let firing = |stream: &str| {
        report
            .events
            .iter()
            .filter(|e| {
                e.labels.get("stream").map(String::as_str) == Some(stream)
                    && e.status == AlertStatus::Firing
            })
            .count()
    };
    let (on_prose, on_ood) = (firing("prose"), firing("ood"));
    eprintln!(
        "{} tokens scored live; alerts fired: prose {on_prose}, OOD {on_ood}",
        seen[1] + seen[2]
    );
    assert!(
        on_ood > on_prose,
        "alerts fired: OOD stream {on_ood}, prose stream {on_prose}"
    );
    for e in &report.events {
        let described = e
            .annotations
            .get("description")
            .cloned()
            .unwrap_or_default();
        assert!(described.contains(" d"), "{described}");
    }
    let n = report.events.len();
    alerts.wait("every alert event over MQTT", |got| got.len() >= n);
}

#[test]
fn sae_head_makes_a_published_sae_watchable_and_bad_setups_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sae_dir = dir.path().join("sae");
    train_sae(&sae_dir);
    // A "published" SAE: the checkpoint alone.
    std::fs::remove_dir_all(sae_dir.join(DARK_DIR)).unwrap();
    let err = SaeDetector::load(&sae_dir, SaeScoreKind::ErrorNorm).unwrap_err();
    assert!(err.to_string().contains("darkwatch sae-head"), "{err}");

    let a = repo("tests/data/activations");
    let head = |holdout: f64, force: bool| {
        sae_head_command(&SaeHeadArgs {
            sae: sae_dir.clone(),
            input: a.join("train.npy"),
            tensor: None,
            prompt_ids: Some(a.join("train_prompt_ids.npy")),
            prompt_ids_tensor: None,
            norm_scaling_factor: None,
            holdout,
            skip_positions: None,
            dark: DarkConfig { ridge: 1.0 },
            out: None,
            force,
        })
    };
    // Without rows held out, the calibration is cross-fitted: every score comes from a head
    // that did not see the token.
    let text = head(0.0, false).unwrap();
    assert!(text.contains("out-of-fold rows"), "{text}");
    let det = SaeDetector::load(&sae_dir, SaeScoreKind::Nonlinear).unwrap();
    assert_eq!(det.calibration_rows(), Some(CalibrationRows::OutOfFold));
    // Unseen tokens score above what the head gives its own fit rows: the cross-fitted
    // calibration is not the in-sample one.
    let x = read_activations(&a.join("train.npy"), None).unwrap();
    let sae = Sae::load(&sae_dir).unwrap();
    let own = score_tokens(&sae, &det.head, x.view()).unwrap();
    let mean = |v: &mut dyn Iterator<Item = f32>| {
        let v: Vec<f32> = v.collect();
        v.iter().sum::<f32>() / v.len() as f32
    };
    let in_sample = mean(&mut own.iter().map(|s| s.nonlinear_sq_norm));
    let crossed = mean(&mut det.calibration_scores().iter().copied());
    assert!(
        crossed > in_sample,
        "cross-fitted {crossed} vs in-sample {in_sample}"
    );

    // A head in place is not replaced without --force.
    let err = head(0.25, false).unwrap_err().to_string();
    assert!(err.contains("--force"), "{err}");
    let text = head(0.25, true).unwrap();
    assert!(text.contains("held-out rows"), "{text}");
    for kind in SaeScoreKind::ALL {
        let det = SaeDetector::load(&sae_dir, kind).unwrap();
        assert!(det.calibration_scores().len() >= 50, "{kind:?}");
        assert!(det.calibration_scores().iter().all(|s| s.is_finite()));
        assert_eq!(det.features()[7], "d7");
        assert_eq!(det.calibration_rows(), Some(CalibrationRows::HeldOut));
    }
    // The id changes with the score that alerts.
    let ids: std::collections::HashSet<String> = SaeScoreKind::ALL
        .iter()
        .map(|&k| SaeDetector::load(&sae_dir, k).unwrap().id().to_string())
        .collect();
    assert_eq!(ids.len(), 3);

    let port = mqtt::start_embedded_broker("127.0.0.1", 0).unwrap();
    let refused = |cfg: DarkwatchConfig| -> String {
        let det = Detector::load_configured(&cfg.agent.model_dir, &cfg).unwrap();
        let checked = agent::validate(&cfg, &det).unwrap_err().to_string();
        let stop = Arc::new(AtomicBool::new(true));
        match agent::run(&cfg, stop, Arc::default(), false) {
            Err(e @ AgentError::Config { .. }) => assert_eq!(e.to_string(), checked),
            other => panic!("expected a configuration error, got {other:?}"),
        }
        checked
    };
    let mut cfg = agent_config(dir.path(), &sae_dir, port);
    cfg.agent.format = InputFormat::Examon;
    assert!(refused(cfg).contains("format must be \"raw\""));
    let mut cfg = agent_config(dir.path(), &sae_dir, port);
    cfg.retrain.enabled = true;
    assert!(refused(cfg).contains("online retraining"));
    let cfg = agent_config(dir.path(), &sae_dir, port);
    let det = Detector::load_configured(&sae_dir, &cfg).unwrap();
    agent::validate(&cfg, &det).unwrap();

    // Too few calibration scores are refused where they are read, naming the file.
    let few = Calibration::from_scores(
        &score_tokens(&sae, &det_head(&sae_dir), x.slice(ndarray::s![..20, ..])).unwrap(),
        CalibrationRows::HeldOut,
        usize::MAX,
    );
    assert!(few.describe().contains("WARNING"), "{}", few.describe());
    few.save(&sae_dir.join(DARK_DIR)).unwrap();
    let err = SaeDetector::load(&sae_dir, SaeScoreKind::ErrorNorm)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("calibration.safetensors") && err.contains("20 finite scores"),
        "{err}"
    );
}

fn det_head(sae_dir: &std::path::Path) -> DarkHead {
    DarkHead::load(&sae_dir.join(DARK_DIR)).unwrap()
}

/// A finite activation too large to square (3e38) used to score inf, which thresholds
/// skip, so the token never alarmed. It is now clamped to ±1e9: the token scores finite,
/// above every calibration score, and its dimension leads the contributions, live and
/// from a file alike.
#[test]
fn a_finite_activation_too_large_to_square_still_alarms_and_names_its_dimension() {
    use darkwatch::pipeline::{BatchScorer, Contribution};
    let dir = tempfile::tempdir().unwrap();
    let sae_dir = dir.path().join("sae");
    train_sae(&sae_dir);
    let x = read_activations(&repo("tests/data/activations/test.npy"), None).unwrap();
    let det = Arc::new(SaeDetector::load(&sae_dir, SaeScoreKind::ErrorNorm).unwrap());
    let ceiling = det
        .calibration_scores()
        .iter()
        .copied()
        .fold(f32::MIN, f32::max);
    let mut scorer = darkwatch::sae::detector::SaeScorer::new(det.clone(), 4, 3).unwrap();
    let d = scorer.n_features();
    let hot = 7;
    let mut rows = [x.row(0).to_vec(), x.row(0).to_vec(), x.row(0).to_vec()];
    rows[1][hot] = 3e38;
    rows[2][hot] = -f32::MAX;
    for (i, r) in rows.iter().enumerate() {
        scorer.input_mut()[i * d..(i + 1) * d].copy_from_slice(r);
    }
    scorer.score_batch(3);
    let scores = scorer.batch_scores().to_vec();
    assert!(scores.iter().all(|s| s.is_finite()), "{scores:?}");
    for i in [1, 2] {
        assert!(scores[i] > ceiling && scores[i] > scores[0], "{scores:?}");
        let mut top = [Contribution::default(); darkwatch::config::MAX_TOP_CONTRIBUTIONS];
        assert!(scorer.top_contributions(i, &mut top) > 0);
        assert_eq!(top[0].feature as usize, hot, "{top:?}");
        assert!(top[0].value.is_finite());
    }

    // From a file (`sae-score`): the value is read clamped, so it scores the same.
    let path = dir.path().join("huge.npy");
    util::write_npy_f32(&path, 2, d, &[rows[0].clone(), rows[1].clone()].concat());
    let read = read_activations(&path, None).unwrap();
    assert_eq!(read[[1, hot]], darkwatch::sae::ACTIVATION_LIMIT);
    let sae = Sae::load(&sae_dir).unwrap();
    let head = DarkHead::load(&sae_dir.join(DARK_DIR)).unwrap();
    let offline = score_tokens(&sae, &head, read.view()).unwrap();
    let want = offline[1].error_sq_norm;
    assert!(want.is_finite() && want > ceiling, "{want} vs {ceiling}");
    assert!(
        (scores[1] - want).abs() <= 1e-4 * want.abs(),
        "live {} offline {want}",
        scores[1]
    );
}

/// Publishes one QoS 1 message of any size up to 16 MiB and waits for its PubAck.
fn publish_one(port: u16, topic: &str, payload: Vec<u8>) {
    let mut options = rumqttc::MqttOptions::new("sae-live-prompt", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    options.set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut connection) = rumqttc::Client::new(options, 4);
    client
        .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
        .unwrap();
    for event in connection.iter() {
        match event {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => break,
            Ok(_) => {}
            Err(e) => panic!("publisher connection: {e}"),
        }
    }
    let _ = client.disconnect();
}

/// The trial: an ML engineer sends a prompt's `[seq, d]` activations as one message. A
/// raw message of n × d values behind a DWF1 header is n frames of its stream, in order:
/// every one is scored (as `sae-score` scores that token), frame i is seq id + i, and the
/// scorer takes them in batches, not one at a time.
#[test]
fn one_message_of_a_prompts_activations_is_every_token_scored_in_order_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    let sae_dir = dir.path().join("sae");
    train_sae(&sae_dir);
    let a = repo("tests/data/activations");
    let x = read_activations(&a.join("test.npy"), None).unwrap();
    let sae = Sae::load(&sae_dir).unwrap();
    let head = DarkHead::load(&sae_dir.join(DARK_DIR)).unwrap();
    let offline = score_tokens(&sae, &head, x.view()).unwrap();
    let n = x.nrows();

    let port = mqtt::start_embedded_broker("127.0.0.1", 0).unwrap();
    let cfg = agent_config(dir.path(), &sae_dir, port);
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(AgentCounters::default());
    let running = {
        let (cfg, stop, counters) = (cfg.clone(), stop.clone(), counters.clone());
        std::thread::spawn(move || agent::run(&cfg, stop, counters, true))
    };
    let started = Instant::now();
    while counters.frames_scored.load(Ordering::Relaxed) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60) && !running.is_finished(),
            "the agent never scored a probe frame"
        );
        publish_all(port, &[("act/probe".into(), frame(x.row(0)))]);
        std::thread::sleep(Duration::from_millis(100));
    }
    let (messages_before, scored_before) = settle(&counters);
    let batches_before = counters.batch_frames.count();

    // One message: the header (time, first id 1000), then all n rows.
    let mut payload = mqtt_raw_header(1_700_000_000.0, 1000);
    for row in x.rows() {
        payload.extend(frame(row));
    }
    assert_eq!(payload.len(), 20 + n * 384 * 4);
    publish_one(port, "act/prompt", payload);
    let waiting = Instant::now();
    while counters.frames_scored.load(Ordering::Relaxed) < scored_before + n as u64 {
        assert!(
            waiting.elapsed() < Duration::from_secs(60),
            "{} of {n} frames scored",
            counters.frames_scored.load(Ordering::Relaxed) - scored_before
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let batches = counters.batch_frames.count() - batches_before;
    stop.store(true, Ordering::SeqCst);
    let report = running.join().unwrap().unwrap();
    // Probes counted from the report, not from the counters when probing stopped: one
    // still on its way then (a message of one frame on stream 0) would be miscounted. The
    // messages since are the prompt and any such late probe.
    let probes = probes_scored(&report.scores);
    assert!(
        probes >= scored_before,
        "{probes} probes, {scored_before} scored before"
    );
    assert_eq!(
        counters.messages.load(Ordering::Relaxed) - messages_before,
        1 + (probes - scored_before)
    );
    assert_eq!(report.pipeline.frames_scored, probes + n as u64);
    assert_eq!(counters.frames_dropped.load(Ordering::Relaxed), 0);

    let prompt: Vec<(u64, f32)> = report
        .scores
        .iter()
        .filter(|&&(stream, _, _)| stream == 1)
        .map(|&(_, seq, score)| (seq, score))
        .collect();
    let seqs: Vec<u64> = prompt.iter().map(|&(seq, _)| seq).collect();
    assert_eq!(seqs, (1000..1000 + n as u64).collect::<Vec<_>>());
    for (i, &(_, score)) in prompt.iter().enumerate() {
        let want = offline[i].error_sq_norm;
        assert!(
            (score - want).abs() <= 1e-4 * want.abs().max(1.0),
            "token {i}: live {score}, offline {want}"
        );
    }
    // Pushed together, then scored together: batches of up to batch_max_frames (256).
    eprintln!("{n} frames of one message scored in {batches} batches");
    assert!(batches >= n.div_ceil(256) as u64, "{batches} batches");
    assert!(batches < n as u64 / 4, "{batches} batches for {n} frames");
}

/// `[sae] id_is_position = true`: a message's header id is the in-prompt position of its
/// first frame, so frames below the head's recorded skip (position 0 here: `sae-train` with
/// prompt ids leaves it out) are not scored, and counted; the ids are not taken as seqs
/// (each prompt restarts them), so seqs count the stream's frames, skipped ones included.
/// Frames without a header have no position and are scored. Without the setting (the
/// other tests) every frame is scored, as before.
#[test]
fn frames_below_the_heads_skip_are_not_scored_when_ids_are_positions() {
    let dir = tempfile::tempdir().unwrap();
    let sae_dir = dir.path().join("sae");
    train_sae(&sae_dir);
    let head = DarkHead::load(&sae_dir.join(DARK_DIR)).unwrap();
    assert_eq!(head.skip_positions(), Some(1));
    let a = repo("tests/data/activations");
    let x = read_activations(&a.join("test.npy"), None).unwrap();
    let sae = Sae::load(&sae_dir).unwrap();
    let offline = score_tokens(&sae, &head, x.view()).unwrap();

    let port = mqtt::start_embedded_broker("127.0.0.1", 0).unwrap();
    let mut cfg = agent_config(dir.path(), &sae_dir, port);
    cfg.sae.id_is_position = true;
    let det = Detector::load_configured(&sae_dir, &cfg).unwrap();
    match &det {
        Detector::Sae(s) => assert_eq!(s.live_skip(), Some(1)),
        _ => panic!("an SAE folder"),
    }
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(AgentCounters::default());
    let running = {
        let (cfg, stop, counters) = (cfg.clone(), stop.clone(), counters.clone());
        std::thread::spawn(move || agent::run(&cfg, stop, counters, true))
    };
    // Bare probe frames: no header, no position, scored.
    let started = Instant::now();
    while counters.frames_scored.load(Ordering::Relaxed) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60) && !running.is_finished(),
            "the agent never scored a probe frame"
        );
        publish_all(port, &[("act/probe".into(), frame(x.row(0)))]);
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, scored_before) = settle(&counters);
    // Two prompts of 5 and 4 tokens (ids 0), then the second one's next 3 (id 4): rows
    // 0..12 in order. Positions 0 (rows 0 and 5) are skipped.
    let message = |id: u64, rows: std::ops::Range<usize>| {
        let mut payload = mqtt_raw_header(1_700_000_000.0, id);
        for r in rows {
            payload.extend(frame(x.row(r)));
        }
        payload
    };
    for (id, rows) in [(0, 0..5), (0, 5..9), (4, 9..12)] {
        publish_one(port, "act/prompt", message(id, rows));
    }
    let waiting = Instant::now();
    while counters.frames_scored.load(Ordering::Relaxed) < scored_before + 10 {
        assert!(
            waiting.elapsed() < Duration::from_secs(60),
            "{} of 10 frames scored",
            counters.frames_scored.load(Ordering::Relaxed) - scored_before
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    settle(&counters);
    stop.store(true, Ordering::SeqCst);
    let report = running.join().unwrap().unwrap();
    assert_eq!(counters.frames_skipped.load(Ordering::Relaxed), 2);
    let prompt: Vec<(u64, f32)> = report
        .scores
        .iter()
        .filter(|&&(stream, _, _)| stream == 1)
        .map(|&(_, seq, score)| (seq, score))
        .collect();
    let seqs: Vec<u64> = prompt.iter().map(|&(seq, _)| seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 6, 7, 8, 9, 10, 11]);
    for &(seq, score) in &prompt {
        let want = offline[seq as usize].error_sq_norm;
        assert!(
            (score - want).abs() <= 1e-4 * want.abs().max(1.0),
            "row {seq}: live {score}, offline {want}"
        );
    }
    // The probes (no header) were all scored, none skipped.
    assert_eq!(
        report.pipeline.frames_scored,
        probes_scored(&report.scores) + 10
    );
}

/// Waits until the agent's message and scored-frame counts have stood still for half a
/// second (a probe published just before probing stopped may still be on its way), and
/// returns them.
fn settle(counters: &AgentCounters) -> (u64, u64) {
    let read = || {
        (
            counters.messages.load(Ordering::Relaxed),
            counters.frames_scored.load(Ordering::Relaxed),
        )
    };
    let started = Instant::now();
    let mut last = read();
    let mut since = Instant::now();
    while since.elapsed() < Duration::from_millis(500) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the counters never stood still: {last:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
        let now = read();
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    last
}

/// The probe frames scored (stream 0, the first subscribed), from the run's scores.
fn probes_scored(scores: &[(u32, u64, f32)]) -> u64 {
    scores.iter().filter(|&&(stream, _, _)| stream == 0).count() as u64
}

/// A DWF1 header: magic, time (f64 LE), id of the first frame (u64 LE).
fn mqtt_raw_header(time: f64, id: u64) -> Vec<u8> {
    let mut h = darkwatch::ingest::raw::HEADER_MAGIC.to_vec();
    h.extend_from_slice(&time.to_le_bytes());
    h.extend_from_slice(&id.to_le_bytes());
    h
}
