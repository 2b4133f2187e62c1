//! The agent (`darkwatch run`) against real brokers: systemd notifications and the
//! watchdog, SIGHUP reloads, and end-to-end runs against Mosquitto (ExaMon in, alerts out,
//! a 30 s broker outage, shared subscriptions, credentials).

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::util::broker::{
    Agent, Collector, Mosquitto, Relay, final_count, free_port, publish_all, unique, wait_for,
};
use crate::util::{darkwatch, repo, run};

mod load;

/// Writes an agent config into `dir`: `model`, a spool in `dir`, `/metrics` on
/// `metrics_port`, and the given lines of `[agent]` and `[mqtt]`, then `extra` sections.
pub(crate) fn config(
    dir: &Path,
    name: &str,
    model: &Path,
    metrics_port: u16,
    agent: &str,
    mqtt: &str,
    extra: &str,
) -> PathBuf {
    let path = dir.join(name);
    // The tests publish nodes other than the agent's own: subscribe to all of them (a
    // central agent) unless the test says otherwise.
    let all = if mqtt.contains("subscribe") {
        ""
    } else {
        "subscribe = [\"org/+/cluster/+/node/+/plugin/+/chnl/data/#\"]\n"
    };
    std::fs::write(
        &path,
        format!(
            "[agent]\nmodel_dir = \"{}\"\n{agent}\n[mqtt]\n{all}{mqtt}\n[spool]\ndir = \"{}\"\nfsync = false\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n{extra}\n",
            model.display(),
            dir.join("spool").display(),
        ),
    )
    .unwrap();
    path
}

/// `[mqtt]` lines for an external broker on `port`, node `node`, subscribed to `filter`.
fn external(port: u16, node: &str, filter: &str) -> String {
    format!(
        "broker = \"external\"\nport = {port}\nnode_name = \"{node}\"\nkeep_alive_secs = 5\nsubscribe = [\"{filter}\"]\n"
    )
}

/// A subscriber to the alerts of agent `node` on the broker at `port`.
fn alert_collector(port: u16, node: &str) -> Collector {
    Collector::new(port, &[&format!("darkwatch/{node}/alerts/#")], None)
}

/// What the tests that publish the trained model's test rows start from: a quick model
/// trained on synthetic data ([`crate::trained`]; `test_csv` holds its test rows), and
/// the agent on an embedded broker of its own as node `unique(node)`, with `agent` lines
/// of `[agent]`, `mqtt` lines added to `[mqtt]` and `extra` sections, started and
/// connected, with a subscriber to its alerts.
struct OnTrained {
    _dir: tempfile::TempDir,
    test_csv: PathBuf,
    broker: u16,
    node: String,
    agent: Agent,
    sub: Collector,
}

fn on_trained(node: &str, agent: &str, mqtt: &str, extra: &str) -> OnTrained {
    let (dir, model, test_csv, _) = crate::trained();
    let broker = free_port();
    let metrics = free_port();
    let node = unique(node);
    let mqtt = format!("port = {broker}\nnode_name = \"{node}\"\n{mqtt}");
    let cfg = config(
        dir.path(),
        "agent.toml",
        &model,
        metrics,
        agent,
        &mqtt,
        extra,
    );
    let agent = Agent::connected(&cfg, metrics, &[]);
    let sub = alert_collector(broker, &node);
    OnTrained {
        _dir: dir,
        test_csv,
        broker,
        node,
        agent,
        sub,
    }
}

/// The rows of a CSV written by `synthetic_csv`, without the timestamp column.
fn rows(csv: &Path) -> Vec<Vec<f64>> {
    std::fs::read_to_string(csv)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').skip(1).map(|v| v.parse().unwrap()).collect())
        .collect()
}

/// One ExaMon message per metric of each row; row `i` at time `t0 + i`.
fn examon(org: &str, node: &str, rows: &[Vec<f64>], t0: f64) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            out.push((
                format!("org/{org}/cluster/c/node/{node}/plugin/p/chnl/data/m{j:02}"),
                format!("{v};{}", t0 + i as f64).into_bytes(),
            ));
        }
    }
    out
}

/// Receives notify datagrams until one contains `want`; returns every message seen.
fn notified_until(sock: &UnixDatagram, want: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no {want:?} from darkwatch ({e}); got {seen:?}"));
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        let done = msg.contains(want);
        seen.push(msg);
        if done {
            return seen;
        }
    }
}

/// The frame count of a `STATUS=model <id>: …; since start: <n> frames scored, …` line.
fn scored_in(msg: &str) -> Option<u64> {
    let status = msg.split("STATUS=").nth(1)?;
    status
        .split(" frames scored")
        .next()?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

fn notify_socket(dir: &Path) -> (PathBuf, UnixDatagram) {
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    (path, sock)
}

#[test]
fn watchdog_pings_while_idle_and_while_scoring_and_status_counts_frames() {
    let dir = tempfile::tempdir().unwrap();
    let (notify, sock) = notify_socket(dir.path());
    let broker = free_port();
    let metrics = free_port();
    let model = repo("models/smd-machine-1-6");
    let cfg = config(
        dir.path(),
        "agent.toml",
        &model,
        metrics,
        "",
        &format!("port = {broker}\nnode_name = \"wd\"\n"),
        "",
    );
    let notify_str = notify.to_str().unwrap();
    // WatchdogSec=1s: a ping every 0.5 s.
    let mut agent = Agent::start(
        &cfg,
        metrics,
        &[("NOTIFY_SOCKET", notify_str), ("WATCHDOG_USEC", "1000000")],
    );
    notified_until(&sock, "READY=1");
    // Idle (no input at all) is healthy: the pings keep coming.
    for _ in 0..3 {
        notified_until(&sock, "WATCHDOG=1");
    }
    // Busy: 30 frames of the bundled model's 38 metrics through the embedded broker.
    agent.wait_metric("darkwatch_mqtt_connected", |v| v == 1.0);
    let msgs: Vec<(String, Vec<u8>)> = (0..30)
        .flat_map(|i| {
            (0..38).map(move |j| {
                (
                    format!("org/o/cluster/c/node/n1/plugin/p/chnl/data/f{j}"),
                    format!("0.5;{}", 1_700_000_000 + i).into_bytes(),
                )
            })
        })
        .collect();
    // The agent subscribes right after it connects; its online status follows that.
    let mut status = Collector::new(broker, &["darkwatch/wd/status"], None);
    status.wait("online status", |got| !got.is_empty());
    publish_all(broker, &msgs);
    agent.wait_metric("darkwatch_frames_assembled_total", |v| v >= 29.0);
    // STATUS reports the scored frames; the pings continue after the work.
    let mut scored = 0;
    while scored < 29 {
        let seen = notified_until(&sock, "frames scored");
        scored = seen.iter().filter_map(|m| scored_in(m)).max().unwrap_or(0);
    }
    for _ in 0..2 {
        notified_until(&sock, "WATCHDOG=1");
    }
    let (status, err) = agent.stop();
    notified_until(&sock, "STOPPING=1");
    assert!(status.success(), "{err}");
}

#[test]
fn sighup_reloads_config_and_model_and_survives_a_broken_one() {
    let (dir, trained_model, test_csv, _) = crate::trained();
    // Trained first: the stream's event-time clock must not run on while it trains.
    let sae = dir.path().join("sae");
    let (code, _, err) = run(darkwatch()
        .args(["sae-train", "--latents", "64", "--k", "8", "--epochs", "1"])
        .args(["--dark-folds", "0", "--holdout", "0.2", "--input"])
        .arg(repo("tests/data/activations/train.npy"))
        .arg("--out")
        .arg(&sae));
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run(darkwatch().arg("inspect").arg(&sae));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("SAE detector") && out.contains("d_in 384, 64 latents"),
        "{out}"
    );
    assert!(out.contains("scores of held-out rows"), "{out}");
    let (notify, sock) = notify_socket(dir.path());
    let broker = free_port();
    let metrics = free_port();
    let bundled = repo("models/smd-machine-1-6");
    let mqtt = format!("port = {broker}\nnode_name = \"hup\"\n");
    let cfg = config(dir.path(), "agent.toml", &bundled, metrics, "", &mqtt, "");
    let mut agent = Agent::start(
        &cfg,
        metrics,
        &[("NOTIFY_SOCKET", notify.to_str().unwrap())],
    );
    notified_until(&sock, "READY=1");
    let id = |dir: &Path| -> String {
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("model.json")).unwrap())
                .unwrap();
        meta["id"].as_str().unwrap().to_string()
    };
    let info = |id: &str| format!("darkwatch_model_info{{model_id=\"{id}\"}}");
    agent.wait_metric(&info(&id(&bundled)), |v| v == 1.0);

    // A new model (8 features instead of 38) and new alert settings.
    config(
        dir.path(),
        "agent.toml",
        &trained_model,
        metrics,
        "",
        &mqtt,
        "[alert]\nfire_k = 1\nfire_n = 1\n",
    );
    agent.signal("HUP");
    notified_until(&sock, "RELOADING=1");
    let ready = notified_until(&sock, "READY=1");
    assert!(ready.last().unwrap().contains("reloaded"), "{ready:?}");
    agent.wait_metric("darkwatch_config_reloads_total{result=\"applied\"}", |v| {
        v == 1.0
    });
    agent.wait_metric(&info(&id(&trained_model)), |v| v == 1.0);
    // The reloaded agent scores frames of the new model's features (m00..m07).
    agent.wait_metric("darkwatch_mqtt_connected", |v| v == 1.0);
    let mut status = Collector::new(broker, &["darkwatch/hup/status"], None);
    status.wait("online status", |got| !got.is_empty());
    let data = rows(&test_csv);
    publish_all(broker, &examon("o", "n1", &data[..40], 1_700_000_000.0));
    agent.wait_metric("darkwatch_frames_assembled_total", |v| v >= 39.0);
    assert_eq!(
        agent.metric_sum("darkwatch_samples_rejected_total"),
        Some(0.0)
    );

    // A broken config, then one naming a missing model: each is refused, the agent runs on.
    std::fs::write(&cfg, "[agent]\nmodel_dirr = 3\n").unwrap();
    agent.signal("HUP");
    agent.wait_metric("darkwatch_config_reloads_total{result=\"failed\"}", |v| {
        v == 1.0
    });
    config(
        dir.path(),
        "agent.toml",
        &dir.path().join("no-such-model"),
        metrics,
        "",
        &mqtt,
        "",
    );
    agent.signal("HUP");
    agent.wait_metric("darkwatch_config_reloads_total{result=\"failed\"}", |v| {
        v == 2.0
    });
    // An SAE folder with ExaMon input: it loads, but the agent cannot run it (SAEs score
    // raw activation frames), so the reload is refused before it is handed over.
    config(dir.path(), "agent.toml", &sae, metrics, "", &mqtt, "");
    agent.signal("HUP");
    agent.wait_metric("darkwatch_config_reloads_total{result=\"failed\"}", |v| {
        v == 3.0
    });
    assert!(agent.is_running(), "{}", agent.stderr());
    assert_eq!(agent.metric(&info(&id(&trained_model))), Some(1.0));
    assert_eq!(
        agent.metric("darkwatch_config_reloads_total{result=\"applied\"}"),
        Some(1.0)
    );
    // Still scoring with the reloaded model.
    publish_all(broker, &examon("o", "n1", &data[40..60], 1_700_000_040.0));
    agent.wait_metric("darkwatch_frames_assembled_total", |v| v >= 59.0);
    let (status, err) = agent.stop();
    assert!(status.success(), "{err}");
    assert!(
        err.contains("model_dirr"),
        "the refused key is logged: {err}"
    );
    // Each refusal names the file and the key, as `validate` does (a missing model was
    // logged as `error=/tmp/…/no-such-model: no such folder` alone).
    let refusal = |key: &str| {
        err.lines()
            .find(|l| l.contains("Reload failed") && l.contains(&format!("key `{key}`")))
            .unwrap_or_else(|| panic!("no refusal naming {key}: {err}"))
            .to_string()
    };
    assert!(
        refusal("agent.model_dir").contains("no-such-model: no such folder"),
        "{err}"
    );
    assert!(refusal("agent.format").contains("format must be"), "{err}");
    assert!(refusal("agent.format").contains("agent.toml"), "{err}");
    assert_eq!(err.matches("Reload failed").count(), 3, "{err}");
    // Logs to a pipe (journald, a file) carry no terminal colour codes.
    assert!(!err.contains('\u{1b}'), "colour codes in the log: {err:?}");
}

/// Alert payloads (JSON) of the agent's node `node` in `got`.
fn alerts(c: &mut Collector, node: &str) -> Vec<String> {
    c.payloads(&format!("darkwatch/{node}/alerts/"))
}

#[test]
fn agent_ingests_examon_from_mosquitto_and_publishes_alerts_to_it() {
    let Some(mosq) = Mosquitto::shared("agent_ingests_examon_from_mosquitto") else {
        return;
    };
    let (dir, model, test_csv, _) = crate::trained();
    let (org, node) = (unique("org"), unique("node"));
    let metrics = free_port();
    let cfg = config(
        dir.path(),
        "agent.toml",
        &model,
        metrics,
        "",
        &external(
            mosq.port,
            &node,
            &format!("org/{org}/cluster/+/node/+/plugin/+/chnl/data/#"),
        ),
        "",
    );
    let mut sub = Collector::new(
        mosq.port,
        &[
            &format!("darkwatch/{node}/alerts/#"),
            &format!("darkwatch/{node}/status"),
        ],
        None,
    );
    let mut agent = Agent::start(&cfg, metrics, &[]);
    sub.wait("the agent's online status", |got| {
        got.iter().any(|p| p.topic.ends_with("/status"))
    });
    // Rows 690..760: the injected anomaly (rows 700..720, +4 on m00) in the middle.
    let data = rows(&test_csv);
    publish_all(
        mosq.port,
        &examon(&org, "n1", &data[690..760], 1_700_000_000.0),
    );
    agent.wait_metric("darkwatch_frames_assembled_total", |v| v >= 69.0);
    agent.wait_metric("darkwatch_alerts_total{status=\"firing\"}", |v| v >= 1.0);
    let (status, err) = agent.stop();
    assert!(status.success(), "{err}");
    assert_eq!(final_count(&err, "messages"), 70 * 8, "{err}");
    assert_eq!(final_count(&err, "undecodable"), 0, "{err}");
    let raised = final_count(&err, "alert");
    assert!(raised >= 2, "a firing and its resolution: {err}");
    sub.wait("every alert", |got| {
        got.iter()
            .filter(|p| p.topic.starts_with(&format!("darkwatch/{node}/alerts/")))
            .count() as u64
            >= raised
    });
    let payloads = alerts(&mut sub, &node);
    let events: Vec<serde_json::Value> = payloads
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    let firing = events.iter().filter(|e| e["status"] == "firing").count();
    let resolved = events.iter().filter(|e| e["status"] == "resolved").count();
    assert_eq!(firing, resolved, "{payloads:?}");
    let first = &events[0];
    assert_eq!(first["labels"]["alertname"], "DarkwatchAnomaly");
    assert_eq!(first["labels"]["stream"], "n1", "{first}");
    // The anomaly is on m00: the alert names it among its top features.
    let top: Vec<&str> = first["top_features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["feature"].as_str().unwrap())
        .collect();
    assert!(top.contains(&"m00"), "{top:?}");
    // A clean stop leaves the retained status offline.
    let mut late = Collector::new(mosq.port, &[&format!("darkwatch/{node}/status")], None);
    late.wait("the retained status", |got| !got.is_empty());
    let offline: serde_json::Value = serde_json::from_slice(&late.got[0].payload).unwrap();
    assert_eq!(
        offline,
        serde_json::json!({"status": "offline", "node": node})
    );
}

#[test]
fn no_alert_lost_while_the_broker_is_unreachable_for_30s() {
    let Some(mosq) = Mosquitto::shared("no_alert_lost_while_the_broker_is_unreachable") else {
        return;
    };
    let (dir, model, test_csv, _) = crate::trained();
    let (org, node) = (unique("org"), unique("node"));
    // The agent reaches the broker only through the relay; publisher and subscriber do not.
    let relay = Relay::start(mosq.port);
    let metrics = free_port();
    // Windows of 1 s that close 64 windows late: the whole input arrives at once, before
    // the outage, and its frames (and alerts) come out one a second, during it.
    let cfg = config(
        dir.path(),
        "agent.toml",
        &model,
        metrics,
        "",
        &external(
            relay.port,
            &node,
            &format!("org/{org}/cluster/+/node/+/plugin/+/chnl/data/#"),
        ),
        "[assemble]\nwindow_secs = 1.0\nlateness_windows = 64\n\
         [alert]\nfire_k = 1\nfire_n = 1\nresolve_after_frames = 1\n",
    );
    let mut sub = alert_collector(mosq.port, &node);
    let mut status = Collector::new(mosq.port, &[&format!("darkwatch/{node}/status")], None);
    let mut agent = Agent::start(&cfg, metrics, &[]);
    status.wait("the agent's online status", |got| !got.is_empty());
    // 60 rows; rows 3 to 6 of every 12 get the +4 shift on m00: five anomalies, each
    // firing and resolving (the smoothed score is back to normal five rows after one ends).
    let mut data = rows(&test_csv)[100..160].to_vec();
    for (i, row) in data.iter_mut().enumerate() {
        if matches!(i % 12, 3..=6) {
            row[0] += 4.0;
        }
    }
    publish_all(mosq.port, &examon(&org, "n1", &data, 1_700_000_000.0));
    agent.wait_metric("darkwatch_messages_received_total", |v| v == 480.0);
    agent.wait_metric("darkwatch_frames_assembled_total", |v| v >= 3.0);
    relay.cut();
    agent.wait_metric("darkwatch_mqtt_connected", |v| v == 0.0);
    let raised_at_cut = agent.alerts_raised();
    std::thread::sleep(Duration::from_secs(30));
    let raised_in_outage = agent.alerts_raised() - raised_at_cut;
    let received_in_outage = alerts(&mut sub, &node).len() as u64;
    assert_eq!(
        agent.metric("darkwatch_mqtt_connected"),
        Some(0.0),
        "{}",
        agent.stderr()
    );
    assert!(
        raised_in_outage >= 2,
        "alerts raised during the outage: {raised_in_outage}"
    );
    assert!(received_in_outage <= raised_at_cut);
    relay.restore();
    agent.wait_metric("darkwatch_frames_assembled_total", |v| v == 60.0);
    let raised = agent.alerts_raised();
    agent.wait_metric("darkwatch_alerts_acked_total", |v| v as u64 >= raised);
    let (status_code, err) = agent.stop();
    assert!(status_code.success(), "{err}");
    let raised = final_count(&err, "alert");
    sub.wait("every alert raised", |got| {
        let distinct: std::collections::HashSet<&[u8]> =
            got.iter().map(|p| &p.payload[..]).collect();
        distinct.len() as u64 >= raised
    });
    std::thread::sleep(Duration::from_millis(500));
    let all = alerts(&mut sub, &node);
    let distinct: std::collections::HashSet<&String> = all.iter().collect();
    assert_eq!(
        distinct.len() as u64,
        raised,
        "raised {raised}, received {all:?}"
    );
    // QoS 1: only what was in flight at the cut may come twice (at most inflight_max = 100).
    let duplicates = all.len() - distinct.len();
    assert!(
        duplicates as u64 <= raised_at_cut.min(100),
        "{duplicates} duplicates"
    );
    // In order: first arrivals alternate firing, resolved, firing, … (one stream).
    let mut seen = std::collections::HashSet::new();
    let statuses: Vec<String> = all
        .iter()
        .filter(|p| seen.insert(*p))
        .map(|p| serde_json::from_str::<serde_json::Value>(p).unwrap()["status"].to_string())
        .collect();
    for (i, s) in statuses.iter().enumerate() {
        let want = if i % 2 == 0 {
            "\"firing\""
        } else {
            "\"resolved\""
        };
        assert_eq!(s, want, "event {i} out of order: {statuses:?}");
    }
}

#[test]
fn shared_subscription_splits_raw_frames_between_two_agents() {
    let Some(mosq) = Mosquitto::shared("shared_subscription_splits_raw_frames") else {
        return;
    };
    let (dir, model, test_csv, _) = crate::trained();
    let group = unique("g");
    let prefix = unique("act");
    let filter = format!("$share/{group}/{prefix}/#");
    let mut agents = Vec::new();
    for k in 0..2 {
        let metrics = free_port();
        let node = unique("share");
        let sub = dir.path().join(format!("a{k}"));
        std::fs::create_dir_all(&sub).unwrap();
        let cfg = config(
            &sub,
            "agent.toml",
            &model,
            metrics,
            "format = \"raw\"",
            &external(mosq.port, &node, &filter),
            "",
        );
        let mut status = Collector::new(mosq.port, &[&format!("darkwatch/{node}/status")], None);
        let agent = Agent::start(&cfg, metrics, &[]);
        status.wait("online status", |got| !got.is_empty());
        agents.push(agent);
    }
    // 200 raw frames (8 little-endian f32 each) over four streams.
    let data = rows(&test_csv);
    let n = 200;
    let msgs: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let bytes = data[i]
                .iter()
                .flat_map(|&v| (v as f32).to_le_bytes())
                .collect();
            (format!("{prefix}/s{}", i % 4), bytes)
        })
        .collect();
    publish_all(mosq.port, &msgs);
    let got = |a: &Agent| a.metric("darkwatch_frames_assembled_total").unwrap_or(0.0) as usize;
    wait_for("every frame at one of the agents", || {
        agents.iter().map(got).sum::<usize>() >= n
    });
    std::thread::sleep(Duration::from_millis(500));
    let counts: Vec<usize> = agents.iter().map(got).collect();
    assert_eq!(
        counts.iter().sum::<usize>(),
        n,
        "each frame once: {counts:?}"
    );
    assert!(
        counts.iter().all(|&c| c > 0),
        "both agents got a share: {counts:?}"
    );
    for a in agents {
        let (status, err) = a.stop();
        assert!(status.success(), "{err}");
        assert_eq!(final_count(&err, "undecodable"), 0, "{err}");
    }
}

#[test]
fn broker_credentials_are_used_and_wrong_ones_are_retried_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    let made = std::process::Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(&passwd)
        .args(["darkwatch", "s3cret"])
        .status();
    if !made.is_ok_and(|s| s.success()) {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("mosquitto_passwd is required under CI=true");
        }
        eprintln!("note: broker_credentials test skipped: no mosquitto_passwd");
        return;
    }
    let extra = format!(
        "allow_anonymous false\npassword_file {}\n",
        passwd.display()
    );
    let Some(mosq) = Mosquitto::own_in("broker_credentials", dir, &extra) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let model = repo("models/smd-machine-1-6");
    let node = unique("auth");
    let run = |name: &str, password: &str| {
        let metrics = free_port();
        let sub = work.path().join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let mqtt = format!(
            "{}username = \"darkwatch\"\npassword = \"{password}\"\n",
            external(mosq.port, &node, "nothing/#")
        );
        let cfg = config(&sub, "agent.toml", &model, metrics, "", &mqtt, "");
        Agent::start(&cfg, metrics, &[])
    };
    let mut status = Collector::new(
        mosq.port,
        &[&format!("darkwatch/{node}/status")],
        Some(("darkwatch", "s3cret")),
    );
    let mut good = run("good", "s3cret");
    status.wait("online status", |got| !got.is_empty());
    good.wait_metric("darkwatch_mqtt_connected", |v| v == 1.0);
    let (code, err) = good.stop();
    assert!(code.success(), "{err}");

    let mut bad = run("bad", "wrong");
    bad.wait_metric("darkwatch_mqtt_reconnects_total", |v| v >= 2.0);
    assert_eq!(bad.metric("darkwatch_mqtt_connected"), Some(0.0));
    assert!(bad.is_running());
    let (code, err) = bad.stop();
    assert!(code.success(), "{err}");
    assert!(
        err.to_lowercase().contains("refused") || err.contains("NotAuthorized"),
        "the refusal is logged: {err}"
    );
}

/// Runs `openssl` with `args` in `dir`; `false` when it is missing or fails.
fn openssl(dir: &Path, args: &str) -> bool {
    std::process::Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with the
/// `openssl` CLI in `dir` (P-256 keys, valid for two days); `false` without openssl.
fn make_certificates(dir: &Path) -> bool {
    let key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    [
        format!("req -x509 {key} -keyout ca.key -out ca.crt -days 2 -subj /CN=darkwatch-test-ca"),
        format!("req -x509 {key} -keyout other-ca.key -out other-ca.crt -days 2 -subj /CN=other-ca"),
        format!("req {key} -keyout server.key -out server.csr -subj /CN=localhost"),
        "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 2 -extfile server.ext".into(),
        format!("req {key} -keyout client.key -out client.csr -subj /CN=darkwatch"),
        "x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out client.crt -days 2 -extfile client.ext".into(),
    ]
    .iter()
    .all(|args| openssl(dir, args))
}

#[test]
fn tls_to_mosquitto_with_client_certificate_and_a_wrong_ca_is_refused() {
    let certs = tempfile::tempdir().unwrap();
    if !make_certificates(certs.path()) {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("the openssl CLI is required under CI=true");
        }
        eprintln!("note: tls test skipped: cannot make certificates with openssl");
        return;
    }
    let c = |f: &str| certs.path().join(f).display().to_string();
    // A plain listener for the test's own subscriber, and a TLS one that requires a client
    // certificate signed by the test CA.
    let tls_port = free_port();
    let extra = format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        c("ca.crt"),
        c("server.crt"),
        c("server.key")
    );
    let Some(mosq) = Mosquitto::own("tls_to_mosquitto", &extra) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let model = repo("models/smd-machine-1-6");
    let node = unique("tls");
    let run = |name: &str, ca: &str| {
        let metrics = free_port();
        let sub = work.path().join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let mqtt = format!(
            "{}tls = true\nca_file = \"{ca}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
            external(tls_port, &node, &format!("tls/{node}/#")),
            c("client.crt"),
            c("client.key")
        );
        let cfg = config(&sub, "agent.toml", &model, metrics, "", &mqtt, "");
        Agent::start(&cfg, metrics, &[])
    };
    let mut status = Collector::new(mosq.port, &[&format!("darkwatch/{node}/status")], None);
    let mut good = run("good", &c("ca.crt"));
    status.wait("online status over TLS", |got| {
        got.iter()
            .any(|p| p.payload.windows(6).any(|w| w == b"online"))
    });
    good.wait_metric("darkwatch_mqtt_connected", |v| v == 1.0);
    // Data over the TLS connection reaches the agent.
    publish_all(
        mosq.port,
        &[(format!("tls/{node}/x"), b"not examon".to_vec())],
    );
    good.wait_metric("darkwatch_messages_received_total", |v| v == 1.0);
    let (code, err) = good.stop();
    assert!(code.success(), "{err}");

    // A broker certificate from another CA is refused; the agent keeps retrying.
    let mut bad = run("bad", &c("other-ca.crt"));
    bad.wait_metric("darkwatch_mqtt_reconnects_total", |v| v >= 2.0);
    assert_eq!(bad.metric("darkwatch_mqtt_connected"), Some(0.0));
    let (code, err) = bad.stop();
    assert!(code.success(), "{err}");
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("Tls"),
        "the TLS failure is logged: {err}"
    );
}

/// The agent with online retraining: retrains while it scores a live stream, publishes
/// each accepted model as a checkpoint, shows it in `/metrics`, and resumes from the newest
/// checkpoint after a restart.
#[test]
fn agent_retrains_online_and_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let broker = free_port();
    let metrics = free_port();
    let bundled = repo("models/smd-machine-1-6");
    let mqtt = format!("port = {broker}\nnode_name = \"learn\"\nsubscribe = [\"act/#\"]\n");
    // The gate's tolerance is wide here: which frames a retrain's snapshot holds depends on
    // how far scoring got when it fired, and a 5-epoch fine-tune on 1500 of them once came
    // out 3.7 % worse on its held-out rows than the bundled model (tolerance 2 %) on a busy
    // machine, and the next retrain did not finish within the wait. This test is about the
    // retrain → checkpoint → resume path; the gate's judgement is tested in src/retrain.rs
    // (`the_gate_rejects_a_candidate_worse_than_its_tolerance`).
    let retrain = format!(
        "[retrain]\nenabled = true\nreservoir_frames = 2000\nhorizon_frames = 4000\n\
         every_frames = 1500\nevery_secs = 0\nmin_frames = 1000\nepochs = 5\n\
         gate_tolerance = 0.2\nadopt_after_frames = 0\nstate_dir = \"{}\"\n",
        state.display()
    );
    let cfg = config(
        dir.path(),
        "agent.toml",
        &bundled,
        metrics,
        "format = \"raw\"",
        &mqtt,
        &retrain,
    );
    let frames = smd_train_rows();
    let raw_on = |topic: &str, lo: usize, hi: usize| raw_rows(&frames, topic, lo, hi, 0.0);
    let raw = |lo: usize, hi: usize| raw_on("act/node1", lo, hi);

    let mut agent = Agent::connected(&cfg, metrics, &[]);
    agent.wait_metric("darkwatch_model_version", |v| v == 0.0);
    // A stream that sends 10 frames and falls silent first: its candidates never see
    // their guard pass. They once held every later stream's frames out of the reservoir
    // (one queue for all streams), so nothing was learnt and no retrain came.
    publish_all(broker, &raw_on("act/quiet", 0, 10));
    agent.wait_metric("darkwatch_frames_scored_total", |v| v >= 10.0);
    // In steps, so that a burst does not overflow the input ring (drops are counted, but
    // this test wants every frame scored).
    for step in 0..12 {
        publish_all(broker, &raw(500 * step, 500 * (step + 1)));
        let want = (10 + 500 * (step + 1)) as f64;
        agent.wait_metric("darkwatch_frames_scored_total", |v| v >= want);
    }
    let accepted = agent.wait_metric("darkwatch_retrains_total{result=\"accepted\"}", |v| {
        v >= 1.0
    });
    let version = agent.wait_metric("darkwatch_model_version", |v| v >= 1.0);
    assert!(agent.metric("darkwatch_reservoir_admitted_total").unwrap() > 1000.0);
    // Every scored frame's latency is in the scoring histogram.
    assert!(
        agent
            .metric("darkwatch_scoring_latency_seconds_count")
            .unwrap()
            >= 6000.0
    );
    assert!(
        agent
            .metric("darkwatch_scoring_latency_seconds_sum")
            .unwrap()
            > 0.0
    );
    let (status, err) = agent.stop();
    assert!(status.success(), "{err}");
    let store = darkwatch::retrain::CheckpointStore::new(&state, 5);
    let newest = store
        .list()
        .first()
        .map(|(v, _)| *v)
        .expect("a checkpoint was written");
    assert!(
        newest as f64 >= version,
        "checkpoint v{newest}, metric v{version}"
    );
    assert!(store.history().iter().filter(|h| h.gate.accepted).count() as f64 >= accepted);

    // Restarted, it scores with the newest checkpoint, not the model directory's model.
    let mut agent = Agent::start(&cfg, metrics, &[]);
    agent.wait_metric("darkwatch_model_version", |v| v == newest as f64);
    let (status, err) = agent.stop();
    assert!(status.success(), "{err}");
    assert!(
        err.contains("resuming from the newest valid checkpoint"),
        "{err}"
    );
}

/// A SIGHUP with online retraining and a `state_dir`, and nothing changed: the reload
/// loads the newest checkpoint, which the running retraining wrote, and scoring goes on
/// with that retraining's model, its thresholds and its firing alert. When the sink had
/// not yet scored a frame of the newest retrained model, the reload judged that model a
/// change ("a reload changed the model"): every threshold restarted and the firing alert
/// was resolved, although the model scored after the reload was the one the running
/// retraining had published before it.
#[test]
fn a_reload_with_online_retraining_keeps_the_scored_model_its_thresholds_and_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let broker = free_port();
    let metrics = free_port();
    let node = unique("rehup");
    let bundled = repo("models/smd-machine-1-6");
    let mqtt = format!("port = {broker}\nnode_name = \"{node}\"\nsubscribe = [\"act/#\"]\n");
    // One retrain, after the first 500 frames; the next would need 500 more. The gate
    // lets any candidate through: this test is about what a reload does after one.
    let extra = format!(
        "[retrain]\nenabled = true\nreservoir_frames = 400\nhorizon_frames = 800\n\
         every_frames = 500\nevery_secs = 0\nmin_frames = 100\nepochs = 2\n\
         gate_tolerance = 100\nholdout_fraction = 0.5\nadopt_after_frames = 0\nstate_dir = \"{}\"\n\
         [alert]\nfire_k = 3\nfire_n = 3\nresend_secs = 0\n",
        state.display()
    );
    let cfg = config(
        dir.path(),
        "agent.toml",
        &bundled,
        metrics,
        "format = \"raw\"",
        &mqtt,
        &extra,
    );
    let frames = smd_train_rows();
    // Rows `lo..hi` on act/node1, each value raised by `shift`.
    let raw = |lo: usize, hi: usize, shift: f32| raw_rows(&frames, "act/node1", lo, hi, shift);
    let scored = "darkwatch_frames_scored_total";
    let mut agent = Agent::connected(&cfg, metrics, &[]);
    let mut sub = alert_collector(broker, &node);
    // 490 normal frames and 10 anomalous ones: the anomaly fires, and the 500th frame
    // asks for the retrain. No frame follows, so the sink still judges by the model it
    // started with when the trainer publishes the retrained one (and checkpoints it).
    publish_all(broker, &raw(0, 300, 0.0));
    agent.wait_metric(scored, |v| v >= 300.0);
    publish_all(broker, &raw(300, 490, 0.0));
    agent.wait_metric(scored, |v| v >= 490.0);
    publish_all(broker, &raw(490, 500, 5.0));
    agent.wait_metric(scored, |v| v >= 500.0);
    agent.wait_metric("darkwatch_alerts_firing", |v| v == 1.0);
    let event =
        |p: &rumqttc::Publish| -> serde_json::Value { serde_json::from_slice(&p.payload).unwrap() };
    // Normal frames may have raised an episode before; this one fires at the anomaly.
    sub.wait("the anomaly's firing alert", |got| {
        got.iter()
            .any(|p| event(p)["status"] == "firing" && event(p)["seq"].as_u64() >= Some(490))
    });
    let fired = event(sub.got.last().unwrap());
    assert_eq!(fired["status"], "firing", "{fired}");
    assert_eq!(fired["model_version"], "0", "{fired}");
    agent.wait_metric("darkwatch_retrains_total{result=\"accepted\"}", |v| {
        v == 1.0
    });
    let version = agent.wait_metric("darkwatch_model_version", |v| v >= 1.0);
    assert!(state.join("ckpt-00000001").is_dir());
    let resolved = "darkwatch_alerts_total{status=\"resolved\"}";
    let resolved_before = agent.metric(resolved).unwrap();

    // The same configuration again.
    agent.signal("HUP");
    agent.wait_metric("darkwatch_config_reloads_total{result=\"applied\"}", |v| {
        v == 1.0
    });
    publish_all(broker, &raw(500, 510, 5.0));
    agent.wait_metric(scored, |v| v >= 510.0);
    assert_eq!(agent.metric("darkwatch_model_version"), Some(version));
    assert_eq!(agent.metric("darkwatch_alerts_firing"), Some(1.0));
    assert_eq!(
        agent.metric(resolved),
        Some(resolved_before),
        "{:?}",
        alerts(&mut sub, &node)
    );
    let (status, err) = agent.stop();
    assert!(status.success(), "{err}");
    let reloaded = err
        .lines()
        .find(|l| l.contains("Reloaded the configuration and the model."))
        .unwrap_or_else(|| panic!("no reload logged: {err}"));
    assert!(
        reloaded.contains("kept_thresholds=true") && reloaded.contains("kept_alert_state=true"),
        "{reloaded}"
    );
    // The trainer and its reservoir went on: a restarted one would say nothing here.
    let continued = err
        .lines()
        .find(|l| l.contains("Reload: the model loaded is the running retraining's"))
        .unwrap_or_else(|| panic!("the reload did not continue the retraining: {err}"));
    assert!(continued.contains("kept_retraining=true"), "{continued}");
    // Only the stop ended the episode, with the model version that fired it.
    sub.wait("the episode resolved by the stop", |got| {
        got.iter().any(|p| {
            event(p)["fingerprint"] == fired["fingerprint"] && event(p)["status"] == "resolved"
        })
    });
    let ended: Vec<serde_json::Value> = sub
        .got
        .iter()
        .map(event)
        .filter(|e| e["annotations"]["ended_by"].is_string())
        .collect();
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[0]["fingerprint"], fired["fingerprint"], "{ended:?}");
    assert_eq!(
        ended[0]["annotations"]["ended_by"],
        darkwatch::agent::ENDED_BY_STOP,
        "{ended:?}"
    );
    assert_eq!(ended[0]["model_version"], "0", "{ended:?}");
    assert!(
        err.contains("Reload: the model loaded is the running retraining's"),
        "{err}"
    );
}

/// A model with lag windows in the agent: each stream's first w − 1 frames only fill its
/// own window, then every frame is scored with the frames before it, so a stretch whose
/// values are all usual but come in the wrong order raises an alert.
/// Assembled (ExaMon) input for a windowed model: the first `w − 1` frames of a stream
/// only fill its window; a reload that keeps the model's features keeps the windows; one
/// that changes the window starts them over.
#[test]
fn agent_windows_assembled_frames_and_keeps_or_restarts_them_on_reload() {
    let dir = tempfile::tempdir().unwrap();
    let w24 = crate::windowed_model(dir.path(), 3000, 24);
    let other = dir.path().join("w12");
    std::fs::create_dir(&other).unwrap();
    let w12 = crate::windowed_model(&other, 3000, 12);
    let (notify, sock) = notify_socket(dir.path());
    let broker = free_port();
    let metrics = free_port();
    let mqtt = format!("port = {broker}\nnode_name = \"lagx\"\n");
    let cfg = config(dir.path(), "agent.toml", &w24, metrics, "", &mqtt, "");
    let test = dir.path().join("test.csv");
    crate::rhythm_csv(&test, 400, 0..0);
    let values = rows(&test);
    // One ExaMon sample of the metric `load` per second.
    let examon_load = |lo: usize, hi: usize| -> Vec<(String, Vec<u8>)> {
        (lo..hi)
            .map(|i| {
                (
                    "org/o/cluster/c/node/n1/plugin/p/chnl/data/load".to_string(),
                    format!("{};{}", values[i][0], 1_700_000_000 + i).into_bytes(),
                )
            })
            .collect()
    };
    let (assembled, scored) = (
        "darkwatch_frames_assembled_total",
        "darkwatch_frames_scored_total",
    );
    let mut agent = Agent::start(
        &cfg,
        metrics,
        &[("NOTIFY_SOCKET", notify.to_str().unwrap())],
    );
    notified_until(&sock, "READY=1");
    agent.wait_metric("darkwatch_mqtt_connected", |v| v == 1.0);
    // Waits until `want` more frames than `before` were assembled (the event-time clock
    // closes a quiet stream's last window a second or two after its last sample) and every
    // assembled frame but `filling` was scored; returns both counts.
    let settle = |agent: &mut Agent, before: f64, want: f64, filling: f64| -> (f64, f64) {
        agent.wait_metric(assembled, |v| v >= before + want);
        wait_for("every assembled frame scored or filling a window", || {
            let (a, s) = (agent.metric(assembled), agent.metric(scored));
            a.zip(s).is_some_and(|(a, s)| s >= a - filling)
        });
        std::thread::sleep(Duration::from_millis(300));
        (
            agent.metric(assembled).unwrap(),
            agent.metric(scored).unwrap(),
        )
    };

    // 100 samples, 100 frames: the first 23 only fill the window.
    publish_all(broker, &examon_load(0, 100));
    let (a1, s1) = settle(&mut agent, 0.0, 100.0, 23.0);
    assert_eq!((a1, s1), (100.0, 77.0), "assembled, scored");

    // A reload with the same features (only the alert settings change): the window is kept,
    // so every new frame is scored at once.
    config(
        dir.path(),
        "agent.toml",
        &w24,
        metrics,
        "",
        &mqtt,
        "[alert]\nfire_k = 1\nfire_n = 1\n",
    );
    agent.signal("HUP");
    agent.wait_metric("darkwatch_config_reloads_total{result=\"applied\"}", |v| {
        v == 1.0
    });
    publish_all(broker, &examon_load(100, 150));
    let (a2, s2) = settle(&mut agent, a1, 50.0, 23.0);
    assert_eq!(
        (a2, s2),
        (150.0, 127.0),
        "kept window: every new frame scored"
    );

    // A model with a 12-frame window has other features: the stream fills its window again.
    config(dir.path(), "agent.toml", &w12, metrics, "", &mqtt, "");
    agent.signal("HUP");
    agent.wait_metric("darkwatch_config_reloads_total{result=\"applied\"}", |v| {
        v == 2.0
    });
    publish_all(broker, &examon_load(150, 250));
    let (a3, s3) = settle(&mut agent, a2, 100.0, 23.0 + 11.0);
    assert_eq!(
        (a3, s3),
        (250.0, 216.0),
        "new window: its first 11 frames fill it"
    );
    assert_eq!(
        agent.metric_sum("darkwatch_samples_rejected_total"),
        Some(0.0)
    );
    // Rejected input is counted by reason.
    publish_all(
        broker,
        &[
            (
                "org/o/cluster/c/node/n1/plugin/p/chnl/data/load".to_string(),
                b"abc;1700000300".to_vec(),
            ),
            (
                "org/o/cluster/c/node/n1/plugin/p/chnl/data/other".to_string(),
                b"1.5;1700000300".to_vec(),
            ),
        ],
    );
    agent.wait_metric(
        "darkwatch_messages_rejected_total{reason=\"non_numeric\"}",
        |v| v == 1.0,
    );
    agent.wait_metric(
        "darkwatch_samples_rejected_total{reason=\"unknown_metric\"}",
        |v| v == 1.0,
    );
    assert_eq!(
        agent.metric_sum("darkwatch_messages_rejected_total"),
        Some(1.0)
    );
    assert_eq!(
        agent.metric_sum("darkwatch_samples_rejected_total"),
        Some(1.0)
    );
    let (status, err) = agent.stop();
    assert!(status.success(), "{err}");
}

#[test]
fn agent_scores_lag_windows_per_stream() {
    let dir = tempfile::tempdir().unwrap();
    let model = crate::windowed_model(dir.path(), 3000, 24);
    let broker = free_port();
    let metrics = free_port();
    let mqtt = format!("port = {broker}\nnode_name = \"lag\"\nsubscribe = [\"act/#\"]\n");
    let cfg = config(
        dir.path(),
        "agent.toml",
        &model,
        metrics,
        "format = \"raw\"",
        &mqtt,
        "",
    );
    let test = dir.path().join("test.csv");
    crate::rhythm_csv(&test, 1200, 600..660);
    let values = rows(&test);
    let raw = |topic: &str, lo: usize, hi: usize| -> Vec<(String, Vec<u8>)> {
        values[lo..hi]
            .iter()
            .map(|r| (topic.to_string(), (r[0] as f32).to_le_bytes().to_vec()))
            .collect()
    };
    let firing = "darkwatch_alerts_total{status=\"firing\"}";

    let mut agent = Agent::connected(&cfg, metrics, &[]);
    publish_all(broker, &raw("act/a", 0, 500));
    agent.wait_metric("darkwatch_frames_scored_total", |v| v >= 477.0);
    // A second stream fills its own window first: 30 frames, 7 scored.
    publish_all(broker, &raw("act/b", 0, 30));
    agent.wait_metric("darkwatch_frames_scored_total", |v| v >= 484.0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(agent.metric("darkwatch_frames_scored_total"), Some(484.0));
    assert_eq!(
        agent.metric(firing).unwrap_or(0.0),
        0.0,
        "no alert on the rhythm"
    );

    publish_all(broker, &raw("act/a", 500, 1200));
    agent.wait_metric("darkwatch_frames_scored_total", |v| v >= 1184.0);
    agent.wait_metric(firing, |v| v >= 1.0);
    let (status, err) = agent.stop();
    assert!(status.success(), "{err}");
}

/// One node whose clock runs 3 s ahead closes only its own windows: the event clock is per
/// stream. It used to be one clock for every stream, so the fast node's timestamps closed
/// the other nodes' windows and their samples all came in `late`.
#[test]
fn a_node_with_a_fast_clock_does_not_make_the_others_late() {
    let (dir, model, test_csv, _) = crate::trained();
    let broker = free_port();
    let metrics = free_port();
    let mqtt = format!("port = {broker}\nnode_name = \"skew\"\n");
    let cfg = config(
        dir.path(),
        "agent.toml",
        &model,
        metrics,
        "",
        &mqtt,
        "[assemble]\nwindow_secs = 1.0\nlateness_windows = 1\n",
    );
    let mut agent = Agent::connected(&cfg, metrics, &[]);
    let data = rows(&test_csv);
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    // Six rows a second apart from each node, in real time; "fast" stamps 3 s ahead.
    for i in 0..6 {
        let t = now();
        let mut msgs = examon("o", "ok", &data[i..i + 1], t);
        msgs.extend(examon("o", "fast", &data[i..i + 1], t + 3.0));
        publish_all(broker, &msgs);
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    // Both nodes' windows close (by their own clocks) and become frames.
    agent.wait_metric("darkwatch_frames_assembled_total", |v| v >= 10.0);
    let late = agent
        .metric("darkwatch_samples_rejected_total{reason=\"late\"}")
        .unwrap();
    let (status, err) = agent.stop();
    assert!(status.success(), "{err}");
    assert_eq!(late, 0.0, "{err}");
}

/// An alert still firing when the agent stops is resolved, and says why: the scores did
/// not fall, so an operator must not read the resolution as the incident's end.
/// It also carries `[alert] labels`, `annotations` and `generator_url`, the placeholders
/// filled in, in the firing and the resolved event alike.
#[test]
fn an_alert_ended_by_a_stop_says_so() {
    let labels = "[alert]\ngenerator_url = \"http://g/d?n={node}&s={stream}\"\n\
        [alert.labels]\ncluster = \"c1\"\ninstance = \"{node}:9464\"\n\
        [alert.annotations]\nrunbook_url = \"https://wiki/dw#{stream}@{node}/{model_id}\"\n";
    let OnTrained {
        _dir,
        test_csv,
        broker,
        node,
        mut agent,
        mut sub,
    } = on_trained("stop", "", "", labels);
    // Rows 690..716 end inside the injected anomaly (rows 700..720, +4 on m00).
    let data = rows(&test_csv);
    publish_all(broker, &examon("o", "n1", &data[690..716], 1_700_000_000.0));
    agent.wait_metric("darkwatch_alerts_total{status=\"firing\"}", |v| v >= 1.0);
    let (status, err) = agent.stop();
    assert!(status.success(), "{err}");
    sub.wait("the firing alert and its resolution", |got| got.len() >= 2);
    let events: Vec<serde_json::Value> = sub
        .got
        .iter()
        .map(|p| serde_json::from_slice(&p.payload).unwrap())
        .collect();
    let last = events.last().unwrap();
    assert_eq!(last["status"], "resolved", "{events:?}");
    assert_eq!(
        last["annotations"]["ended_by"],
        darkwatch::agent::ENDED_BY_STOP,
        "{last}"
    );
    assert!(
        events[0]["annotations"].get("ended_by").is_none(),
        "{}",
        events[0]
    );
    for e in [&events[0], last] {
        assert_eq!(e["labels"]["cluster"], "c1", "{e}");
        assert_eq!(e["labels"]["instance"], format!("{node}:9464"), "{e}");
        let model_id = e["model_id"].as_str().unwrap();
        assert_eq!(
            e["annotations"]["runbook_url"],
            format!("https://wiki/dw#n1@{node}/{model_id}"),
            "{e}"
        );
        assert_eq!(
            e["generatorURL"],
            format!("http://g/d?n={node}&s=n1"),
            "{e}"
        );
        assert_eq!(e["fingerprint"], events[0]["fingerprint"], "{e}");
    }
}

/// A firing alert is re-sent while it fires, and resolved, saying why, once its stream
/// has sent nothing for `[alert] silence_secs`: the agent's sink gets its ticks with no
/// frame coming (the re-send and the silence depend on no frame but the first ones).
#[test]
fn a_firing_alert_is_resent_then_resolved_when_its_stream_goes_silent() {
    let OnTrained {
        _dir,
        test_csv,
        broker,
        mut agent,
        mut sub,
        ..
    } = on_trained(
        "silent",
        "",
        "",
        "[alert]\nresend_secs = 1\nsilence_secs = 3\n",
    );
    // Rows 690..716 end inside the injected anomaly (rows 700..720, +4 on m00); then n1
    // sends nothing more.
    let data = rows(&test_csv);
    publish_all(broker, &examon("o", "n1", &data[690..716], 1_700_000_000.0));
    let events = |sub: &Collector| -> Vec<serde_json::Value> {
        sub.got
            .iter()
            .map(|p| serde_json::from_slice(&p.payload).unwrap())
            .collect()
    };
    sub.wait("the alert resolved by the silence", |got| {
        got.iter().any(|p| {
            let e: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
            e["status"] == "resolved"
        })
    });
    let events = events(&sub);
    let (first, last) = (&events[0], events.last().unwrap());
    assert_eq!(first["status"], "firing", "{events:?}");
    assert_eq!(last["status"], "resolved", "{events:?}");
    assert_eq!(
        last["annotations"]["ended_by"],
        darkwatch::agent::ENDED_BY_SILENCE,
        "{last}"
    );
    // Re-sends between them: the same episode, firing.
    let resent = &events[1..events.len() - 1];
    assert!(
        !resent.is_empty(),
        "no re-send before the silence: {events:?}"
    );
    for e in resent {
        assert_eq!(e["status"], "firing", "{e}");
        assert_eq!(e["fingerprint"], first["fingerprint"], "{e}");
        assert_eq!(e["startsAt"], first["startsAt"], "{e}");
    }
    assert!(agent.metric("darkwatch_alerts_resent_total").unwrap() >= resent.len() as f64);
    assert_eq!(
        agent.metric("darkwatch_alerts_total{status=\"firing\"}"),
        Some(1.0)
    );
    // The state now: one stream, silent, no alert firing.
    agent.wait_metric("darkwatch_streams_silent", |v| v == 1.0);
    assert_eq!(agent.metric("darkwatch_streams"), Some(1.0));
    assert_eq!(agent.metric("darkwatch_alerts_firing"), Some(0.0));
    assert!(agent.metric("process_resident_memory_bytes").unwrap() > 0.0);
    let (status, err) = agent.stop();
    assert!(status.success(), "{err}");
    assert!(err.contains("silence_secs"), "the silence is logged: {err}");
}

/// The trial's full disk: the spool cannot take an alert (here no file may grow past 64
/// bytes, `RLIMIT_FSIZE`, so every append fails as on a full disk), and the firing alert
/// and its re-sends still reach the broker, counted as unspooled, not rejected; the
/// failure is logged once, not once per alert. Before, each one was lost with a WARN.
#[test]
fn alerts_reach_the_broker_when_the_spool_cannot_be_written() {
    let (dir, model, test_csv, _) = crate::trained();
    let broker = free_port();
    let metrics = free_port();
    let node = unique("fulldisk");
    let mqtt = format!("port = {broker}\nnode_name = \"{node}\"\n");
    let cfg = config(
        dir.path(),
        "agent.toml",
        &model,
        metrics,
        "",
        &mqtt,
        "[alert]\nresend_secs = 1\n",
    );
    let started = std::time::Instant::now();
    let mut agent = Agent::start_with_file_size_limit(&cfg, metrics, 64);
    agent.wait_metric("darkwatch_mqtt_connected", |v| v == 1.0);
    let mut sub = alert_collector(broker, &node);
    let data = rows(&test_csv);
    publish_all(broker, &examon("o", "n1", &data[690..716], 1_700_000_000.0));
    sub.wait("the firing alert and two re-sends", |got| got.len() >= 3);
    let first: serde_json::Value = serde_json::from_slice(&sub.got[0].payload).unwrap();
    assert_eq!(first["status"], "firing", "{first}");
    assert!(agent.metric("darkwatch_alerts_unspooled_total").unwrap() >= 3.0);
    assert_eq!(agent.metric("darkwatch_alerts_spooled_total"), Some(0.0));
    assert_eq!(agent.metric("darkwatch_alerts_rejected_total"), Some(0.0));
    assert_eq!(agent.metric("darkwatch_alerts_spool_pending"), Some(0.0));
    let (status, err) = agent.stop();
    assert!(status.success(), "{err}");
    // Logged the first time, then at most once a minute.
    let most = 1 + started.elapsed().as_secs() as usize / 60;
    let warned = err.matches("Cannot spool an alert").count();
    assert!((1..=most).contains(&warned), "{warned} warnings: {err}");
    assert!(err.contains("File too large"), "the cause is named: {err}");
}

/// Each stream's score and threshold on `/metrics` (`[metrics] per_stream`, on by
/// default) through the real agent: the series carry the stream's name as the alerts
/// label it, a finite score, and the score and threshold that the alert events carry
/// for the latest frame (here the resolution by silence's); they go once the stream is
/// silent (`[alert] silence_secs`). Forgetting (60 s at the least) is tested on the sink.
#[test]
fn per_stream_score_and_threshold_are_on_metrics_until_the_stream_goes_silent() {
    let OnTrained {
        _dir,
        test_csv,
        broker,
        mut agent,
        mut sub,
        ..
    } = on_trained(
        "gauges",
        "",
        "",
        "[alert]\nresend_secs = 1\nsilence_secs = 3\n",
    );
    // No stream yet: no series, and no family.
    assert!(!agent.scrape().unwrap().contains("darkwatch_stream_"));
    // Rows 690..716 end inside the injected anomaly; then n1 sends nothing more.
    let data = rows(&test_csv);
    publish_all(broker, &examon("o", "n1", &data[690..716], 1_700_000_000.0));
    sub.wait("the firing alert", |got| !got.is_empty());
    let fired: serde_json::Value = serde_json::from_slice(&sub.got[0].payload).unwrap();
    assert_eq!(fired["status"], "firing", "{fired}");
    let stream = fired["labels"]["stream"].as_str().unwrap().to_string();
    let score_series = format!("darkwatch_stream_score{{stream=\"{stream}\"}}");
    let threshold_series = format!("darkwatch_stream_threshold{{stream=\"{stream}\"}}");
    let score = agent.wait_metric(&score_series, f64::is_finite);
    let threshold = agent.metric(&threshold_series).unwrap();
    assert!(threshold.is_finite(), "{threshold}");
    assert!(score > threshold, "firing: {score} over {threshold}");
    let body = agent.scrape().unwrap();
    assert_eq!(
        body.lines()
            .filter(|l| l.starts_with("darkwatch_stream_score{"))
            .count(),
        1,
        "one stream: {body}"
    );
    // Scraped until the silence resolves the alert: the last scrape with the series is
    // of the last frame (silence_secs after it), which the resolution carries.
    let mut last_seen = None;
    sub.wait("the alert resolved by the silence", |got| {
        if let Some(body) = agent.scrape() {
            let sample = |name: &str| crate::util::process::sample(&body, name);
            if let (Some(s), Some(t)) = (sample(&score_series), sample(&threshold_series)) {
                last_seen = Some((s, t));
            }
        }
        got.iter().any(|p| {
            let e: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
            e["status"] == "resolved"
        })
    });
    let resolved: serde_json::Value =
        serde_json::from_slice(&sub.got.last().unwrap().payload).unwrap();
    assert_eq!(
        resolved["annotations"]["ended_by"],
        darkwatch::agent::ENDED_BY_SILENCE,
        "{resolved}"
    );
    let (score, threshold) = last_seen.expect("the series before the silence");
    // The event's score is an f32 in its shortest form; the gauge, the same f32 as f64.
    assert_eq!(
        resolved["score"].as_f64().map(|v| v as f32),
        Some(score as f32),
        "{resolved}"
    );
    assert_eq!(
        resolved["threshold"].as_f64(),
        Some(threshold),
        "{resolved}"
    );
    // Silent: the series are gone, the stream is still counted.
    agent.wait_metric("darkwatch_streams_silent", |v| v == 1.0);
    let body = agent.scrape().unwrap();
    assert!(!body.contains("darkwatch_stream_score"), "{body}");
    assert!(!body.contains("darkwatch_stream_threshold"), "{body}");
    assert_eq!(agent.metric("darkwatch_streams"), Some(1.0));
    let (status, err) = agent.stop();
    assert!(status.success(), "{err}");
}

/// Plain `validate` refuses what `run` refuses for the model and the configuration alone.
/// It used to load the model and stop there, so an SAE folder with ExaMon input, or with
/// online retraining, passed `validate` and then `run` exited 78.
#[test]
fn plain_validate_refuses_what_run_refuses_for_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let sae = dir.path().join("sae");
    let (code, _, err) = run(darkwatch()
        .args(["sae-train", "--latents", "64", "--k", "8", "--epochs", "1"])
        .args(["--dark-folds", "0", "--holdout", "0.2", "--input"])
        .arg(repo("tests/data/activations/train.npy"))
        .arg("--out")
        .arg(&sae));
    assert_eq!(code, 0, "{err}");
    let port = free_port();
    let mqtt = format!("port = {port}\n");
    let bundled = repo("models/smd-machine-1-6");
    let cases: [(&Path, &str, &str, Option<&str>); 4] = [
        (&sae, "", "", Some("agent.format")),
        (
            &sae,
            "format = \"raw\"",
            "[retrain]\nenabled = true\n",
            Some("retrain.enabled"),
        ),
        (
            &bundled,
            "",
            "[threshold]\nkind = \"dspot\"\ndspot_depth = 100000\n",
            Some("threshold.dspot_depth"),
        ),
        (&sae, "format = \"raw\"", "", None),
    ];
    for (model, agent, extra, refused) in cases {
        let cfg = config(
            dir.path(),
            "v.toml",
            model,
            free_port(),
            agent,
            &mqtt,
            extra,
        );
        let (code, out, err) = run(darkwatch().args(["validate", "--config"]).arg(&cfg));
        let Some(key) = refused else {
            assert_eq!(code, 0, "{out}{err}");
            assert!(out.contains("loads, suits the configuration"), "{out}");
            continue;
        };
        assert_eq!(code, 78, "{key}: {out}{err}");
        assert!(
            err.contains(&format!("key `{key}`")) && err.contains("v.toml"),
            "{key}: {err}"
        );
        // `run` refuses it alike, before it starts anything.
        let (code, _, err) = run(crate::util::darkwatch_within(60)
            .args(["run", "--config"])
            .arg(&cfg));
        assert_eq!(code, 78, "{key}: {err}");
        assert!(err.contains(&format!("key `{key}`")), "{key}: {err}");
    }
}

/// One raw frame: `DWF1`, the time and the id, then the values as float32.
fn headed_frame(time: f64, id: u64, values: &[f64]) -> Vec<u8> {
    let mut p = b"DWF1".to_vec();
    p.extend_from_slice(&time.to_le_bytes());
    p.extend_from_slice(&id.to_le_bytes());
    p.extend(values.iter().flat_map(|v| (*v as f32).to_le_bytes()));
    p
}

/// Raw frames on `act/#`: each topic is its own stream, named by the levels `#` stands
/// for. They used to be named by the last level alone, so `act/mA/l6` and `act/mB/l6` were
/// one stream `l6` (one threshold, one alert state), and `act/` was `default`. A frame's
/// header gives the alert its time (`startsAt`) and the sender's id (`seq`, `start_seq`);
/// a header time a year ahead (a broken clock) gives way to the receipt time, logged: it
/// would have been the alert's `endsAt`, which Alertmanager keeps active until then.
#[test]
fn raw_streams_are_told_apart_by_topic_and_alerts_carry_the_frame_header() {
    let OnTrained {
        _dir,
        test_csv,
        broker,
        node,
        mut agent,
        mut sub,
    } = on_trained(
        "rawnames",
        "format = \"raw\"",
        "subscribe = [\"act/#\"]\n",
        "",
    );
    let data = rows(&test_csv);
    let t0 = 1_700_000_000.0;
    // Rows 600..760 hold the injected anomaly (rows 700..720, +4 on m00) on model A's
    // layer; model B's layer has normal rows, bare; and one frame on `act/`.
    let mut messages: Vec<(String, Vec<u8>)> = (600..760)
        .map(|i| {
            (
                "act/mA/l6".to_string(),
                headed_frame(t0 + i as f64, 5000 + i as u64, &data[i]),
            )
        })
        .collect();
    messages.extend((600..660).map(|i| {
        let bare: Vec<u8> = data[i]
            .iter()
            .flat_map(|v| (*v as f32).to_le_bytes())
            .collect();
        ("act/mB/l6".to_string(), bare)
    }));
    messages.push(("act/".to_string(), headed_frame(0.0, 1, &data[600])));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let ahead = headed_frame(now + 365.0 * 86_400.0, 1, &data[710]);
    messages.push(("act/mC/l6".to_string(), ahead));
    publish_all(broker, &messages);
    agent.wait_metric("darkwatch_frames_scored_total", |v| v >= 222.0);
    assert_eq!(agent.metric("darkwatch_streams"), Some(4.0));
    sub.wait("model A's alert", |got| !got.is_empty());
    let alert = &sub.got[0];
    assert_eq!(alert.topic, format!("darkwatch/{node}/alerts/mA/l6"));
    let e: serde_json::Value = serde_json::from_slice(&alert.payload).unwrap();
    assert_eq!(e["status"], "firing", "{e}");
    assert_eq!(e["labels"]["stream"], "mA/l6", "{e}");
    // The sender's ids and times, of rows inside the anomaly.
    let start = e["start_seq"].as_u64().unwrap();
    assert!((5700..5720).contains(&start), "{e}");
    let row = (start - 5000) as f64;
    assert_eq!(
        e["startsAt"],
        darkwatch::alert::rfc3339_utc(t0 + row),
        "{e}"
    );
    assert!(e["seq"].as_u64().unwrap() >= start, "{e}");
    let (status, err) = agent.stop();
    assert!(status.success(), "{err}");
    assert_eq!(final_count(&err, "undecodable"), 0, "{err}");
    assert!(
        err.contains("a raw frame's header time is more than 300 s after the frame arrived"),
        "{err}"
    );
    // None of model B's frames fired: its own threshold and alert state.
    assert!(
        sub.payloads(&format!("darkwatch/{node}/alerts/mB"))
            .is_empty()
    );
}

/// An MQTT client that subscribes and then reads nothing until [`Stalled::resume`], as an
/// agent busy scoring does: the broker keeps what it has not delivered in its log.
struct Stalled {
    gate: std::sync::mpsc::Sender<()>,
    got: std::sync::mpsc::Receiver<Vec<u8>>,
}

impl Stalled {
    fn new(port: u16, filter: &str) -> Stalled {
        let mut options = rumqttc::MqttOptions::new(unique("stalled"), "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(60));
        let (client, mut connection) = rumqttc::Client::new(options, 64);
        client.subscribe(filter, rumqttc::QoS::AtLeastOnce).unwrap();
        let (gate, gate_rx) = std::sync::mpsc::channel();
        let (got_tx, got) = std::sync::mpsc::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _client = client;
            let mut events = connection.iter();
            for e in events.by_ref() {
                if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) = e {
                    let _ = ready_tx.send(());
                    break;
                }
            }
            let _ = gate_rx.recv();
            for e in events {
                match e {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        if got_tx.send(p.payload.to_vec()).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the stalled client subscribed");
        Stalled { gate, got }
    }

    /// Lets it read; returns the distinct messages it got once `done` says the count is
    /// complete (asked whenever none came for 200 ms), or 60 s pass: a delivery pause on
    /// a loaded machine does not cut the count short.
    fn resume(self, done: impl Fn(usize) -> bool) -> usize {
        self.gate.send(()).unwrap();
        let mut seen = std::collections::HashSet::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            match self.got.recv_timeout(Duration::from_millis(200)) {
                Ok(p) => {
                    seen.insert(p);
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                    if !done(seen.len()) && std::time::Instant::now() < deadline => {}
                Err(_) => return seen.len(),
            }
        }
    }
}

/// A subscriber further behind than `[mqtt] embedded_log_bytes` loses the oldest messages
/// it had not had, although their publisher was acknowledged. The embedded broker used to
/// do that silently (its warning was filtered out, no counter moved); now every skipped
/// message is counted in `darkwatch_mqtt_broker_skipped_total` and the stop summary, and
/// logged. Here the subscriber that falls behind is a stalled client beside the agent: what
/// it and the agent got, plus what was skipped, is what was published.
#[test]
fn the_embedded_broker_counts_and_logs_what_it_skips() {
    let dir = tempfile::tempdir().unwrap();
    let model = repo("models/smd-machine-1-6");
    let broker = free_port();
    let metrics = free_port();
    let mqtt = format!(
        "port = {broker}\nnode_name = \"skip\"\nsubscribe = [\"act/#\"]\nembedded_log_bytes = 1048576\n"
    );
    let cfg = config(
        dir.path(),
        "agent.toml",
        &model,
        metrics,
        "format = \"raw\"",
        &mqtt,
        "",
    );
    let agent = Agent::connected(&cfg, metrics, &[("RUST_LOG", "")]);
    let stalled = Stalled::new(broker, "act/#");
    // 20,000 frames of 38 float32 (3.2 MB with topics): three times the log.
    let n = 20_000u32;
    let frames: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let mut v = vec![0u8; 38 * 4];
            v[..4].copy_from_slice(&(i as f32).to_le_bytes());
            ("act/n1".to_string(), v)
        })
        .collect();
    publish_all(broker, &frames);
    // Every message published twice (two subscribers) was taken by one of them or
    // skipped: wait until the counts add up (the agent may have fallen behind too).
    let counts = |agent: &Agent| {
        let get = |m: &str| agent.metric(m).unwrap_or(0.0);
        (
            get("darkwatch_messages_received_total"),
            get("darkwatch_mqtt_broker_skipped_total"),
        )
    };
    let stalled_got = stalled.resume(|got| {
        let (taken, skipped) = counts(&agent);
        got as f64 + taken + skipped == 2.0 * f64::from(n)
    }) as f64;
    assert!(stalled_got < f64::from(n), "a 1 MiB log held 3.2 MB");
    let (taken, skipped) = counts(&agent);
    assert!(skipped > 0.0);
    assert_eq!(
        skipped,
        2.0 * f64::from(n) - stalled_got - taken,
        "stalled client {stalled_got}, agent {taken}"
    );
    let (status, err) = agent.stop();
    assert!(status.success(), "{err}");
    assert!(
        err.contains("The embedded MQTT broker skipped messages")
            && err.contains("embedded_log_bytes=1048576")
            && err.contains("darkwatch_mqtt_broker_skipped_total"),
        "{err}"
    );
    // rumqttd's own warning is no longer filtered out.
    assert!(err.contains("Read cursor start jumped"), "{err}");
    let summary = err
        .lines()
        .find(|l| l.contains("stopped after"))
        .unwrap_or_default();
    assert!(
        summary.ends_with(&format!(
            "{skipped} messages skipped by the embedded broker"
        )),
        "the stop summary: {summary}"
    );
}

/// The bundled machine-1-6 training rows: the frames the retraining tests publish.
pub(crate) fn smd_train_rows() -> ndarray::Array2<f32> {
    darkwatch::ingest::read_table(
        &repo("tests/data/smd/machine-1-6_train.npy"),
        &darkwatch::ingest::TableOptions::default(),
    )
    .unwrap()
    .values
}

/// Rows `lo..hi` of `rows` as raw little-endian f32 frames on `topic`, each value raised by
/// `shift` (0: the values as they are, bit for bit).
pub(crate) fn raw_rows(
    rows: &ndarray::Array2<f32>,
    topic: &str,
    lo: usize,
    hi: usize,
    shift: f32,
) -> Vec<(String, Vec<u8>)> {
    (lo..hi)
        .map(|i| {
            let bytes = rows
                .row(i)
                .iter()
                .flat_map(|&v| if shift == 0.0 { v } else { v + shift }.to_le_bytes())
                .collect();
            (topic.to_string(), bytes)
        })
        .collect()
}

/// Whether an MQTT client with id `id` gets a successful ConnAck from the broker at `port`
/// within a few seconds.
fn connects(port: u16, id: &str, keep_alive_secs: u64) -> bool {
    let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(keep_alive_secs));
    let (client, mut connection) = rumqttc::Client::new(options, 8);
    let accepted = loop {
        match connection.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack)))) => {
                break ack.code == rumqttc::ConnectReturnCode::Success;
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => break false,
        }
    };
    let _ = client.disconnect();
    accepted
}

/// The embedded broker (rumqttd) refuses a client id with `/` in it. Unpatched, the same
/// id connecting again (as a client's automatic reconnect does) panicked the broker while
/// it held a lock, and from then on no client could connect, whatever its id
/// (vendor/rumqttd/DARKWATCH.md). Now the refusal costs only that client, and the agent
/// logs it, as it does a keep-alive of 0 (rumqttd logs neither where anyone looks).
#[test]
fn a_refused_client_id_does_not_break_the_embedded_broker() {
    let OnTrained {
        _dir,
        test_csv,
        broker,
        mut agent,
        ..
    } = on_trained("refused-id", "", "", "");
    for attempt in 1..=2 {
        assert!(
            !connects(broker, "host/replica-1", 5),
            "attempt {attempt}: rumqttd refuses `/` in a client id"
        );
    }
    assert!(
        !connects(broker, &unique("ka0"), 0),
        "rumqttd refuses keep-alive 0"
    );
    assert!(connects(broker, &unique("after"), 5), "{}", agent.stderr());
    let data = rows(&test_csv);
    let messages = examon("o", "n1", &data[..4], 1_700_000_000.0);
    publish_all(broker, &messages);
    agent.wait_metric("darkwatch_messages_received_total", |v| {
        v >= messages.len() as f64
    });
    let refused = |reason: &str| {
        agent
            .metric(&format!(
                "darkwatch_mqtt_broker_refused_total{{reason=\"{reason}\"}}"
            ))
            .unwrap_or(-1.0)
    };
    assert_eq!(refused("client_id"), 2.0, "{}", agent.stderr());
    assert_eq!(refused("keep_alive_0"), 1.0, "{}", agent.stderr());
    assert_eq!(refused("too_large"), 0.0, "{}", agent.stderr());
    let (status, err) = agent.stop();
    assert!(status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for refusal in ["whose id has /, +, # or $ in it", "asked for keep-alive 0"] {
        assert!(err.contains(refusal), "{refusal}: {err}");
    }
}

/// Telegraf's `layout = "field"`: one bare value per message, the host, measurement and
/// field in the topic, no timestamp. With `[telegraf] field_layout_topic` set to the
/// output's `topic`, the agent names each value `<measurement>.<field>` from its topic,
/// stamps it with its receipt, and the values of each window form frames that are scored;
/// a topic that does not fit is refused as `bad_topic`, and line protocol on the same
/// subscription is still read.
/// A model of 8 metrics named as Telegraf names measurement "sys"'s fields m00..m07, and a
/// 40-row test CSV (columns m00..m07).
fn telegraf_model(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let train = dir.join("train.csv");
    crate::util::synthetic_csv(&train, 1500, 8, &[]);
    let csv = std::fs::read_to_string(&train).unwrap();
    let (header, body) = csv.split_once('\n').unwrap();
    std::fs::write(
        &train,
        format!("{}\n{body}", header.replace(",m", ",sys.m")),
    )
    .unwrap();
    let test_csv = dir.join("test.csv");
    crate::util::synthetic_csv(&test_csv, 40, 8, &[]);
    let model = dir.join("model");
    let (code, out, err) = run(darkwatch()
        .args(["train", "--input"])
        .arg(&train)
        .arg("--out")
        .arg(&model)
        .arg("--config")
        .arg(crate::util::quick_config(dir)));
    assert_eq!(code, 0, "train failed: {out}\n{err}");
    (model, test_csv)
}

/// A subscription of `#` carries the agent's own status and scores back to it: skipped as
/// darkwatch's own, whatever the input format (an operator's trial saw them refused as
/// `bad_payload`, 26 in 8 s against 32 real messages, with Telegraf input).
#[test]
fn a_subscription_of_everything_skips_the_agents_own_messages() {
    let dir = tempfile::tempdir().unwrap();
    let (model, test_csv) = telegraf_model(dir.path());
    let broker = free_port();
    let metrics = free_port();
    let node = unique("tgall");
    let cfg = config(
        dir.path(),
        "agent.toml",
        &model,
        metrics,
        "format = \"telegraf\"",
        &format!("port = {broker}\nnode_name = \"{node}\"\nsubscribe = [\"#\"]\n"),
        "[assemble]\nwindow_secs = 0.2\nclose_when_complete = true\n[scores]\npublish = true\n",
    );
    let mut agent = Agent::connected(&cfg, metrics, &[]);
    for row in &rows(&test_csv)[..20] {
        let fields: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(j, v)| format!("\"m{j:02}\": {v}"))
            .collect();
        let json = format!(
            r#"{{"name": "sys", "tags": {{"host": "n1"}}, "fields": {{{}}}}}"#,
            fields.join(", ")
        );
        publish_all(
            broker,
            &[("telegraf/n1/sys".to_string(), json.into_bytes())],
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    agent.wait_metric("darkwatch_frames_scored_total", |v| v >= 10.0);
    let published = agent.wait_metric("darkwatch_scores_published_total", |v| v >= 3.0);
    // Its scores, and its status, come back through `#`.
    let ignored = agent.wait_metric("darkwatch_own_messages_ignored_total", |v| v >= 3.0);
    assert!(ignored >= 3.0 && published >= 3.0, "{ignored} {published}");
    assert_eq!(
        agent.metric_sum("darkwatch_messages_rejected_total"),
        Some(0.0),
        "{}",
        agent.scrape().unwrap_or_default()
    );
    assert_eq!(
        agent.metric_sum("darkwatch_samples_rejected_total"),
        Some(0.0)
    );
    let (status, err) = agent.stop();
    assert!(status.success(), "{err}");
}

#[test]
fn telegraf_field_layout_values_are_assembled_into_scored_frames() {
    let dir = tempfile::tempdir().unwrap();
    let (model, test_csv) = telegraf_model(dir.path());
    let broker = free_port();
    let metrics = free_port();
    let node = unique("tgfield");
    let cfg = config(
        dir.path(),
        "agent.toml",
        &model,
        metrics,
        "format = \"telegraf\"",
        &format!("port = {broker}\nnode_name = \"{node}\"\nsubscribe = [\"telegraf/#\"]\n"),
        "[telegraf]\nfield_layout_topic = \"telegraf/{{ .Hostname }}/{{ .PluginName }}\"\n\
         [assemble]\nwindow_secs = 0.2\nclose_when_complete = true\n",
    );
    // `validate` refuses a template it cannot read, and one no subscription carries.
    for (subscribe, telegraf, want) in [
        (
            "telegraf/#",
            "field_layout_topic = \"telegraf/{host}/{{ .PluginName }}\"",
            "not a placeholder",
        ),
        (
            "telegraf/+/+",
            "field_layout_topic = \"telegraf/{{ .Hostname }}/{{ .PluginName }}\"",
            "no [mqtt] subscribe filter",
        ),
    ] {
        let bad = config(
            dir.path(),
            "bad.toml",
            &model,
            metrics,
            "format = \"telegraf\"",
            &format!("subscribe = [\"{subscribe}\"]\n"),
            &format!("[telegraf]\n{telegraf}\n"),
        );
        let (code, _, err) = run(darkwatch().args(["validate", "--config"]).arg(&bad));
        assert_eq!(code, 78, "{err}");
        assert!(
            err.contains("telegraf.field_layout_topic") && err.contains(want),
            "{err}"
        );
    }
    let mut agent = Agent::connected(&cfg, metrics, &[]);
    // Each row's 8 values one window apart: the receipt is their time.
    let rows = rows(&test_csv);
    for row in &rows[..20] {
        let msgs: Vec<(String, Vec<u8>)> = row
            .iter()
            .enumerate()
            .map(|(j, v)| {
                (
                    format!("telegraf/n1/sys/m{j:02}"),
                    v.to_string().into_bytes(),
                )
            })
            .collect();
        publish_all(broker, &msgs);
        std::thread::sleep(Duration::from_millis(250));
    }
    agent.wait_metric("darkwatch_frames_scored_total", |v| v >= 10.0);
    agent.wait_metric("darkwatch_stream_score{stream=\"n1\"}", f64::is_finite);
    assert_eq!(
        agent.metric_sum("darkwatch_samples_rejected_total"),
        Some(0.0)
    );
    // A bare value whose topic has a level too many is refused, and counted.
    publish_all(
        broker,
        &[("telegraf/n1/sys/extra/m00".to_string(), b"1.5".to_vec())],
    );
    agent.wait_metric(
        "darkwatch_messages_rejected_total{reason=\"bad_topic\"}",
        |v| v == 1.0,
    );
    // Line protocol (layout = "non-batch") on the same subscription is read as before: a
    // metric the model lacks is decoded, then rejected as unknown.
    publish_all(
        broker,
        &[(
            "telegraf/n2/other".to_string(),
            b"other,host=n2 v=1".to_vec(),
        )],
    );
    agent.wait_metric(
        "darkwatch_samples_rejected_total{reason=\"unknown_metric\"}",
        |v| v == 1.0,
    );
    assert_eq!(
        agent.metric_sum("darkwatch_messages_rejected_total"),
        Some(1.0)
    );
    let (status, err) = agent.stop();
    assert!(status.success(), "{err}");
    assert!(
        err.contains("field_layout_topic"),
        "the bad_topic warning names the option: {err}"
    );
}

/// The model id the agent scores with, from `darkwatch_model_info`.
fn model_id(agent: &Agent) -> String {
    let body = agent.scrape().unwrap();
    let line = body
        .lines()
        .find(|l| l.starts_with("darkwatch_model_info{"))
        .unwrap_or_else(|| panic!("no model info: {body}"));
    line.split('"').nth(1).unwrap().to_string()
}

/// `(metric, ts, value)` of each score message whose topic starts with `prefix`, in the
/// legacy `<value>;<ts>` payload.
fn legacy_scores(got: &[rumqttc::Publish], prefix: &str) -> Vec<(String, String, f64)> {
    got.iter()
        .filter_map(|p| {
            let metric = p.topic.strip_prefix(prefix)?.to_string();
            let text = std::str::from_utf8(&p.payload).unwrap();
            let (value, ts) = text
                .split_once(';')
                .unwrap_or_else(|| panic!("not <value>;<ts>: {text}"));
            Some((metric, ts.to_string(), value.parse().unwrap()))
        })
        .collect()
}

/// `[scores]`: an ExaMon stream's score on ExaMon's `examon-ai_pub` topic, in ExaMon's
/// `<value>;<ts>` payload at the frame's event time, anomaly_score = score / threshold
/// (the threshold the alert judged with); a stream from a topic without org gets the
/// template topic; `anomaly_score` on /metrics carries the stream's keys and the model.
#[test]
fn scores_are_published_on_examon_topics_and_as_anomaly_score_on_metrics() {
    let OnTrained {
        _dir,
        test_csv,
        broker,
        node,
        mut agent,
        mut sub,
    } = on_trained(
        "scores",
        "",
        "subscribe = [\"org/+/cluster/+/node/+/plugin/+/chnl/data/#\", \"cluster/+/node/+/plugin/+/chnl/data/#\"]\n",
        "[scores]\npublish = true\ninterval_secs = 0\n",
    );
    let mut scores = Collector::new(
        broker,
        &[
            "org/+/cluster/+/node/+/plugin/examon-ai_pub/#",
            &format!("darkwatch/{node}/scores/#"),
        ],
        None,
    );
    let data = rows(&test_csv);
    let t0 = 1_700_000_000.0;
    // 40 rows of n1 (org o, cluster c); 20 of n2 from topics without the org pair.
    let mut messages = examon("o", "n1", &data[690..730], t0);
    messages.extend(
        examon("o", "n2", &data[0..20], t0)
            .into_iter()
            .map(|(topic, payload)| (topic.replacen("org/o/", "", 1), payload)),
    );
    publish_all(broker, &messages);
    let model = model_id(&agent);
    let n1 = format!("org/o/cluster/c/node/n1/plugin/examon-ai_pub/chnl/data/model/{model}/");
    let n2 = format!("darkwatch/{node}/scores/n2/");
    // Each frame's three values are three messages: wait until no frame is part-way in.
    let whole = |got: &[rumqttc::Publish], prefix: &str| {
        let mut per_ts: std::collections::BTreeMap<String, usize> = Default::default();
        for (_, ts, _) in legacy_scores(got, prefix) {
            *per_ts.entry(ts).or_default() += 1;
        }
        per_ts.values().all(|&n| n % 3 == 0)
    };
    scores.wait("scores of both streams, each frame's three values", |got| {
        legacy_scores(got, &n1).len() >= 3 * 30
            && legacy_scores(got, &n2).len() >= 3 * 10
            && whole(got, &n1)
            && whole(got, &n2)
    });
    for prefix in [&n1, &n2] {
        let got = legacy_scores(&scores.got, prefix);
        let mut by_ts: std::collections::BTreeMap<String, [Option<f64>; 3]> = Default::default();
        for (metric, ts, value) in &got {
            let i = ["anomaly_score", "score", "threshold"]
                .iter()
                .position(|m| m == metric)
                .unwrap_or_else(|| panic!("unexpected metric {metric}"));
            // Epoch seconds with 3 decimals, within the published rows' span.
            let (secs, frac) = ts.split_once('.').unwrap();
            assert_eq!(frac.len(), 3, "{ts}");
            let secs: f64 = secs.parse().unwrap();
            assert!((t0..=t0 + 42.0).contains(&secs), "{ts}");
            by_ts.entry(ts.clone()).or_default()[i] = Some(*value);
        }
        assert!(by_ts.len() >= 10, "{prefix}: {by_ts:?}");
        for (ts, [ratio, score, threshold]) in &by_ts {
            let (ratio, score, threshold) = (
                ratio.unwrap_or_else(|| panic!("{prefix} at {ts}: no anomaly_score")),
                score.unwrap_or_else(|| panic!("{prefix} at {ts}: no score")),
                threshold.unwrap_or_else(|| panic!("{prefix} at {ts}: no threshold")),
            );
            assert!(threshold > 0.0, "{ts}: {threshold}");
            let want = f64::from(score as f32) / threshold;
            assert!(
                (ratio - want).abs() <= 1e-9 * want.abs().max(1.0),
                "{prefix} at {ts}: anomaly_score {ratio} is not {score} / {threshold}"
            );
        }
    }
    // The anomaly (rows 690..716) goes above 1, as its alert fires.
    sub.wait("the firing alert", |got| !got.is_empty());
    let peak = legacy_scores(&scores.got, &n1)
        .into_iter()
        .filter(|(m, ..)| m == "anomaly_score")
        .map(|(.., v)| v)
        .fold(f64::NEG_INFINITY, f64::max);
    assert!(peak > 1.0, "{peak}");
    // vmanomaly's gauge: the stream key (node) as a label, and the model.
    let series = format!("anomaly_score{{stream=\"n1\",node=\"n1\",model_id=\"{model}\"}}");
    let gauge = agent
        .metric(&series)
        .unwrap_or_else(|| panic!("no {series} in {}", agent.scrape().unwrap_or_default()));
    assert!(gauge.is_finite() && gauge > 0.0, "{gauge}");
    let body = agent.scrape().unwrap();
    assert!(
        body.contains("anomaly_score{stream=\"n2\",node=\"n2\",model_id="),
        "{body}"
    );
    assert_eq!(agent.metric("darkwatch_scores_dropped_total"), Some(0.0));
    let published = agent.metric("darkwatch_scores_published_total").unwrap();
    assert!(published >= 3.0 * 40.0, "{published}");
    // The first subscribe filter matches n1's score topics: the agent receives its own
    // scores and skips them, counted apart, never read as samples of unknown metrics.
    let ignored = agent.wait_metric("darkwatch_own_messages_ignored_total", |v| v >= 3.0 * 30.0);
    assert!(ignored <= published, "{ignored} > {published}");
    assert_eq!(
        agent.metric("darkwatch_samples_rejected_total{reason=\"unknown_metric\"}"),
        Some(0.0),
        "{}",
        agent.scrape().unwrap_or_default()
    );
    let (status, err) = agent.stop();
    assert!(status.success(), "{err}");
}

/// `[scores]` in newer ExaMon's shape: the compact topic and the JSON `{"v","ts"}`
/// payload (ts in epoch milliseconds), only `anomaly_score`, at most one per 5 s of a
/// stream's event time.
#[test]
fn scores_in_the_compact_topic_and_json_payload_at_most_once_per_interval() {
    let OnTrained {
        _dir,
        test_csv,
        broker,
        mut agent,
        ..
    } = on_trained(
        "scores-json",
        "",
        "",
        "[scores]\npublish = true\ninterval_secs = 5\nmetrics = [\"anomaly_score\"]\ntopic_layout = \"compact\"\npayload = \"json\"\n",
    );
    let mut scores = Collector::new(broker, &["o/c/examon-ai_pub/#"], None);
    let data = rows(&test_csv);
    let t0 = 1_700_000_000.0;
    publish_all(broker, &examon("o", "n1", &data[0..40], t0));
    agent.wait_metric("darkwatch_frames_scored_total", |v| v >= 35.0);
    scores.wait("scores of 35 frames", |got| got.len() >= 6);
    let mut last = f64::NEG_INFINITY;
    for p in &scores.got {
        assert_eq!(p.topic, "o/c/examon-ai_pub/n1/anomaly_score");
        let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), 2, "{v}");
        assert!(obj["v"].as_f64().unwrap() > 0.0, "{v}");
        let ts = obj["ts"]
            .as_u64()
            .unwrap_or_else(|| panic!("ts in ms: {v}")) as f64;
        assert!((t0 * 1e3..=(t0 + 42.0) * 1e3).contains(&ts), "{v}");
        assert!(
            ts >= last + 5000.0,
            "{ts} after {last}: less than interval_secs"
        );
        last = ts;
    }
    assert!(
        scores.got.len() <= 9,
        "{} for 40 s of frames",
        scores.got.len()
    );
    let (status, err) = agent.stop();
    assert!(status.success(), "{err}");
}
