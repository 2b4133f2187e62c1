//! Load measurement of the agent against Mosquitto: ignored by default, it reports and
//! asserts nothing about time. Run it on a release build:
//!
//! ```text
//! cargo test --release --test main -- --ignored --nocapture agent::load
//! ```
//!
//! `DARKWATCH_LOAD_CASES` (comma-separated) runs only some of the cases: `flood` (100k
//! messages/s), `flood-1k`, `alternate` (raw frames, every other one anomalous), `recorded`
//! (raw frames, recorded rows) and `examon-latency`; unset, all of them. `embedded-rss`
//! (its own test, [`embedded_rss`]) is the agent's RSS with its embedded broker.
//!
//! 1. ExaMon flood: 100k messages/s for 10 s (100 nodes × 38 metrics of the bundled model,
//!    QoS 0): frames/s, drops (broker, incoming channel, ring), agent RSS before and after,
//!    agent CPU.
//! 2. Raw frames at 1k frames/s for 10 s, every other frame anomalous (alerts fire and
//!    resolve on every frame): alert latency from the publisher's send to the alert's
//!    receipt by a subscriber (two broker hops included, so an upper bound on the agent's
//!    own receipt-to-publish latency), agent RSS and CPU.

use std::path::Path;
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use super::{config, external};
use crate::util::broker::{Agent, Collector, Mosquitto, free_port, unique};
use crate::util::repo;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// User plus system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // Fields 14 and 15 of the line are utime and stime: 12 and 13 after the comm.
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

/// CPU ticks of each thread of `pid`, by thread name (threads of one name added up).
fn thread_ticks(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let Some((head, after)) = stat.rsplit_once(')') else {
            continue;
        };
        let name = head.split_once('(').map_or("?", |(_, n)| n).to_string();
        let f: Vec<u64> = after
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        *out.entry(name).or_insert(0) +=
            f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    }
    out
}

fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn rows() -> ndarray::Array2<f32> {
    darkwatch::ingest::read_table(
        &repo("tests/data/smd/machine-1-6_test.npy"),
        &darkwatch::ingest::TableOptions::default(),
    )
    .unwrap()
    .values
}

/// A QoS 0 publisher (its own connection) and the number of requests it sent.
fn publisher(port: u16) -> (rumqttc::Client, std::thread::JoinHandle<()>) {
    let mut o = rumqttc::MqttOptions::new(unique("load-pub"), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut connection) = rumqttc::Client::new(o, 100_000);
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    connection.eventloop.set_network_options(network);
    let pump = std::thread::spawn(move || {
        for event in connection.iter() {
            if let Err(rumqttc::ConnectionError::RequestsDone) = event {
                break;
            }
            if event.is_err() {
                break;
            }
        }
    });
    (client, pump)
}

/// Writes an agent config in `work` (the broker `mosq`, node `node`, subscribed to
/// `filter`, with `agent` lines and `extra` sections) and starts the agent; returns once it
/// is online and has settled.
fn start_agent(
    mosq: &Mosquitto,
    model: &Path,
    work: &Path,
    node: &str,
    agent: &str,
    filter: &str,
    extra: &str,
) -> Agent {
    let metrics = free_port();
    std::fs::create_dir_all(work).unwrap();
    let cfg = config(
        work,
        "agent.toml",
        model,
        metrics,
        agent,
        &external(mosq.port, node, filter),
        extra,
    );
    let mut status = Collector::new(mosq.port, &[&format!("darkwatch/{node}/status")], None);
    let agent = Agent::start(&cfg, metrics, &[]);
    status.wait("online", |g| !g.is_empty());
    std::thread::sleep(Duration::from_secs(1));
    agent
}

/// ExaMon's topic filter for organisation `org`.
fn examon_filter(org: &str) -> String {
    format!("org/{org}/cluster/+/node/+/plugin/+/chnl/data/#")
}

/// Publishes at QoS 0, waiting while the client's request queue is full.
fn send(client: &rumqttc::Client, topic: &str, payload: impl Into<Vec<u8>>) {
    let payload = payload.into();
    while client
        .try_publish(topic, rumqttc::QoS::AtMostOnce, false, payload.clone())
        .is_err()
    {
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// The agent's own alert latency histogram (from `/metrics`): p50 and p99 bucket bounds.
fn agent_latency(agent: &Agent) -> String {
    let body = agent.scrape().unwrap_or_default();
    let buckets: Vec<(String, f64)> = body
        .lines()
        .filter_map(|l| l.strip_prefix("darkwatch_alert_latency_seconds_bucket{le=\""))
        .filter_map(|l| {
            let (le, n) = l.split_once("\"} ")?;
            Some((le.to_string(), n.trim().parse().ok()?))
        })
        .collect();
    let total = buckets.last().map_or(0.0, |b| b.1);
    if total == 0.0 {
        return "no observations".into();
    }
    let bound = |q: f64| {
        buckets
            .iter()
            .find(|(_, n)| *n >= q * total)
            .map_or("?".to_string(), |(le, _)| le.clone())
    };
    format!(
        "{total} alerts, p50 <= {} s, p99 <= {} s",
        bound(0.5),
        bound(0.99)
    )
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[test]
#[ignore = "a measurement: run on a release build with --ignored --nocapture"]
fn load() {
    let Some(mosq) = Mosquitto::shared("load") else {
        return;
    };
    let data = rows();
    let model = repo("models/smd-machine-1-6");
    let tck = clk_tck();
    let dir = tempfile::tempdir().unwrap();
    if wanted("flood") {
        flood(&mosq, &model, dir.path(), &data, tck, 100_000.0);
    }
    if wanted("flood-1k") {
        // 1k frames/s of ExaMon input: 38k messages/s.
        flood(&mosq, &model, dir.path(), &data, tck, 38_000.0);
    }
    if wanted("alternate") {
        latency(&mosq, &model, dir.path(), &data, tck, true);
    }
    if wanted("recorded") {
        latency(&mosq, &model, dir.path(), &data, tck, false);
    }
    if wanted("examon-latency") {
        examon_latency(&mosq, &model, dir.path(), &data, tck);
    }
}

/// Whether `DARKWATCH_LOAD_CASES` (unset: every case) names `case`.
fn wanted(case: &str) -> bool {
    std::env::var("DARKWATCH_LOAD_CASES")
        .map_or(true, |cases| cases.split(',').any(|c| c.trim() == case))
}

fn flood(
    mosq: &Mosquitto,
    model: &Path,
    dir: &Path,
    data: &ndarray::Array2<f32>,
    tck: f64,
    rate: f64,
) {
    let org = unique("org");
    let agent = start_agent(
        mosq,
        model,
        &dir.join(format!("flood{rate}")),
        &unique("load"),
        "",
        &examon_filter(&org),
        "",
    );
    let pid = agent.pid();
    let rss_before = rss_kib(pid);
    let cpu0 = cpu_ticks(pid);
    let (client, pump) = publisher(mosq.port);
    let (nodes, d) = (100usize, 38usize);
    let topics: Vec<Vec<String>> = (0..nodes)
        .map(|n| {
            (0..d)
                .map(|j| format!("org/{org}/cluster/c/node/n{n}/plugin/p/chnl/data/f{j}"))
                .collect()
        })
        .collect();
    let secs = 10.0;
    let total = (rate * secs) as u64;
    let start = Instant::now();
    let mut sent = 0u64;
    let mut tick = 0u64;
    while sent < total {
        let row = data.row(tick as usize % data.nrows());
        for (n, node_topics) in topics.iter().enumerate() {
            for (j, topic) in node_topics.iter().enumerate() {
                let payload = format!("{};{}", row[j] + n as f32 * 1e-4, 1_700_000_000 + tick);
                send(&client, topic, payload);
                sent += 1;
            }
        }
        tick += 1;
        // Pace to `rate`.
        let due = Duration::from_secs_f64(sent as f64 / rate);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let publish_secs = start.elapsed().as_secs_f64();
    // Wait until the agent has taken everything that arrives.
    let mut last = -1.0;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let got = agent
            .metric("darkwatch_messages_received_total")
            .unwrap_or(0.0)
            + agent
                .metric("darkwatch_mqtt_incoming_dropped_total")
                .unwrap_or(0.0);
        if got == last || got as u64 >= sent {
            break;
        }
        last = got;
    }
    let busy_secs = start.elapsed().as_secs_f64();
    let cpu = (cpu_ticks(pid) - cpu0) as f64 / tck;
    let rss_after = rss_kib(pid);
    let m = |name: &str| agent.metric(name).unwrap_or(f64::NAN);
    let received = m("darkwatch_messages_received_total");
    let incoming_dropped = m("darkwatch_mqtt_incoming_dropped_total");
    let frames = m("darkwatch_frames_assembled_total");
    let scored = m("darkwatch_frames_scored_total");
    let ring_dropped = m("darkwatch_frames_dropped_total");
    drop(client);
    let _ = pump;
    let (_, err) = agent.stop();
    println!(
        "== ExaMon flood: {nodes} nodes x {d} metrics, QoS 0, target {rate} msg/s for {secs} s"
    );
    println!(
        "published   {sent} messages in {publish_secs:.2} s ({:.0} msg/s)",
        sent as f64 / publish_secs
    );
    println!(
        "agent       {received} taken by the decoder, {incoming_dropped} refused while no pipeline ran, {} lost before the agent (broker or socket)",
        sent as f64 - received - incoming_dropped
    );
    println!(
        "frames      {frames} assembled, {scored} scored ({:.0} frames/s over the publish time), {ring_dropped} dropped at the ring",
        scored / publish_secs
    );
    println!(
        "RSS         {:.1} MB before, {:.1} MB after",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );
    print_cpu_and_final(cpu, busy_secs, &err);
}

fn latency(
    mosq: &Mosquitto,
    model: &Path,
    dir: &Path,
    data: &ndarray::Array2<f32>,
    tck: f64,
    alternate: bool,
) {
    let (prefix, node) = (unique("act"), unique("lat"));
    // The subscriber notes when each alert arrives.
    let (tx, rx) = channel::<(Instant, Vec<u8>)>();
    let mut o = rumqttc::MqttOptions::new(unique("lat-sub"), "127.0.0.1", mosq.port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (sub, mut connection) = rumqttc::Client::new(o, 1000);
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    connection.eventloop.set_network_options(network);
    sub.subscribe(
        format!("darkwatch/{node}/alerts/#"),
        rumqttc::QoS::AtLeastOnce,
    )
    .unwrap();
    let (ready_tx, ready_rx) = channel();
    std::thread::spawn(move || {
        for event in connection.iter() {
            match event {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    if tx.send((Instant::now(), p.payload.to_vec())).is_err() {
                        break;
                    }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    let _ = ready_tx.send(());
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    let mut agent = start_agent(
        mosq,
        model,
        &dir.join(format!("latency{alternate}")),
        &node,
        "format = \"raw\"",
        &format!("{prefix}/#"),
        "[alert]\nfire_k = 1\nfire_n = 1\nresolve_after_frames = 1\n",
    );
    let pid = agent.pid();
    let rss_idle = rss_kib(pid);
    let cpu0 = cpu_ticks(pid);
    let threads0 = thread_ticks(pid);
    let (client, _pump) = publisher(mosq.port);
    let rate = 1000.0;
    let n = 10_000usize;
    let topic = format!("{prefix}/s0");
    let mut sent_at = Vec::with_capacity(n);
    let start = Instant::now();
    for k in 0..n {
        let due = Duration::from_secs_f64(k as f64 / rate);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let row = data.row(k % data.nrows());
        let shift = if alternate && k % 2 == 1 { 5.0 } else { 0.0 };
        let bytes: Vec<u8> = row
            .iter()
            .flat_map(|&v| (v + shift).to_le_bytes())
            .collect();
        sent_at.push(Instant::now());
        send(&client, &topic, bytes);
    }
    let publish_secs = start.elapsed().as_secs_f64();
    let cpu = (cpu_ticks(pid) - cpu0) as f64 / tck;
    let by_thread: Vec<String> = thread_ticks(pid)
        .into_iter()
        .map(|(name, t)| {
            let t0 = threads0.get(&name).copied().unwrap_or(0);
            format!("{name} {:.2} s", t.saturating_sub(t0) as f64 / tck)
        })
        .collect();
    println!("threads     {}", by_thread.join(", "));
    let rss_busy = rss_kib(pid);
    agent.wait_metric("darkwatch_frames_scored_total", |v| v as usize >= n);
    std::thread::sleep(Duration::from_secs(1));
    let mut lat_us = Vec::new();
    while let Ok((at, payload)) = rx.try_recv() {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&payload) else {
            continue;
        };
        if let Some(seq) = v["seq"].as_u64().filter(|&s| (s as usize) < n) {
            lat_us.push(at.duration_since(sent_at[seq as usize]).as_secs_f64() * 1e6);
        }
    }
    lat_us.sort_by(f64::total_cmp);
    let raised = agent.alerts_raised();
    let inside = agent_latency(&agent);
    let (_, err) = agent.stop();
    println!(
        "== raw frames at {rate} frames/s for {n} frames, {}",
        if alternate {
            "every other one anomalous"
        } else {
            "recorded rows as they are"
        }
    );
    println!(
        "alerts      {raised} raised, {} received; publish to receipt (two broker hops): p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
        lat_us.len(),
        quantile(&lat_us, 0.5),
        quantile(&lat_us, 0.99),
        lat_us.last().copied().unwrap_or(f64::NAN)
    );
    println!("in agent    MQTT receipt to alert handed to the MQTT client: {inside}");
    println!(
        "RSS         {:.1} MB idle (one 38-feature model), {:.1} MB at {rate} frames/s",
        rss_idle as f64 / 1024.0,
        rss_busy as f64 / 1024.0
    );
    print_cpu_and_final(cpu, publish_secs, &err);
}

/// ExaMon input at 1k frames/s (38 messages a frame), every other frame anomalous, windows
/// closed as soon as complete: the agent's MQTT receipt of a frame's last metric to its
/// alert handed to the MQTT client.
fn examon_latency(
    mosq: &Mosquitto,
    model: &Path,
    dir: &Path,
    data: &ndarray::Array2<f32>,
    tck: f64,
) {
    let org = unique("org");
    let mut agent = start_agent(
        mosq,
        model,
        &dir.join("examon-latency"),
        &unique("exlat"),
        "",
        &examon_filter(&org),
        "[alert]\nfire_k = 1\nfire_n = 1\nresolve_after_frames = 1\n\
         [assemble]\nclose_when_complete = true\n",
    );
    let pid = agent.pid();
    let cpu0 = cpu_ticks(pid);
    let (client, _pump) = publisher(mosq.port);
    let names = darkwatch::model::Model::load(model).unwrap().meta.features;
    let topics: Vec<String> = names
        .iter()
        .map(|f| format!("org/{org}/cluster/c/node/n0/plugin/p/chnl/data/{f}"))
        .collect();
    let (rate, n) = (1000.0, 10_000usize);
    let start = Instant::now();
    for k in 0..n {
        let due = Duration::from_secs_f64(k as f64 / rate);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let row = data.row(k % data.nrows());
        let shift = if k % 2 == 1 { 5.0 } else { 0.0 };
        for (topic, &v) in topics.iter().zip(row.iter()) {
            let payload = format!("{};{}", v + shift, 1_700_000_000 + k);
            send(&client, topic, payload);
        }
    }
    let publish_secs = start.elapsed().as_secs_f64();
    let cpu = (cpu_ticks(pid) - cpu0) as f64 / tck;
    agent.wait_metric("darkwatch_frames_scored_total", |v| v as usize >= n - 1);
    std::thread::sleep(Duration::from_secs(1));
    let raised = agent.alerts_raised();
    let inside = agent_latency(&agent);
    let late = agent
        .metric_sum("darkwatch_samples_rejected_total")
        .unwrap_or(f64::NAN);
    let (_, err) = agent.stop();
    println!(
        "== ExaMon at {rate} frames/s (38 messages each) for {n} frames, every other one anomalous, close_when_complete"
    );
    println!("alerts      {raised} raised; {late} samples rejected");
    println!(
        "in agent    MQTT receipt of a frame's last metric to its alert handed to the MQTT client: {inside}"
    );
    print_cpu_and_final(cpu, publish_secs, &err);
}

/// The agent's CPU time over `secs` of load, and the summary line it logged on stopping.
fn print_cpu_and_final(cpu: f64, secs: f64, stderr: &str) {
    println!(
        "CPU         {cpu:.2} s over {secs:.1} s ({:.1} % of a core)",
        100.0 * cpu / secs
    );
    println!(
        "final       {}",
        stderr
            .lines()
            .find(|l| l.contains("stopped after"))
            .unwrap_or("")
    );
}

/// The new-user trial of the embedded broker, as a measurement (ignored; it asserts
/// nothing): an SAE of d_in 768 (32768 latents, trained here on noise;
/// `DARKWATCH_BACKLOG_LATENTS` sets another number) scores slower than
/// 5,000 raw frames of 3 KiB come at QoS 1 (2,300/s), while a second client subscribes to
/// them too. Prints what the publisher had acknowledged, what the second client and the
/// agent got, and what the embedded broker says it skipped. `DARKWATCH_BACKLOG_LOG_BYTES`
/// sets `[mqtt] embedded_log_bytes` (unset: the default); 10485760 is about the old fixed
/// log (10 segments of 1 MiB). `DARKWATCH_BACKLOG_FULL_POLICY` sets `[pipeline]
/// full_policy` (unset: `drop_newest`).
///
/// ```text
/// DARKWATCH_BACKLOG_LOG_BYTES=10485760 cargo test --release --test main -- --ignored --nocapture agent::load::embedded_backlog
/// ```
#[test]
#[ignore = "a measurement: run on a release build with --ignored --nocapture"]
fn embedded_backlog() {
    use crate::util::{darkwatch, run, write_npy_f32};
    let dir = tempfile::tempdir().unwrap();
    let (rows, d) = (3000, 768);
    let mut noise = crate::util::noise(7);
    let values: Vec<f32> = (0..rows * d).map(|_| noise() as f32).collect();
    let acts = dir.path().join("acts.npy");
    write_npy_f32(&acts, rows, d, &values);
    let sae = dir.path().join("sae");
    let latents = std::env::var("DARKWATCH_BACKLOG_LATENTS").unwrap_or_else(|_| "32768".into());
    let (code, _, err) = run(darkwatch()
        .args([
            "sae-train",
            "--latents",
            &latents,
            "--k",
            "32",
            "--epochs",
            "1",
        ])
        .args(["--dark-folds", "0", "--holdout", "0.2", "--input"])
        .arg(&acts)
        .arg("--out")
        .arg(&sae));
    assert_eq!(code, 0, "{err}");
    let broker = free_port();
    let metrics = free_port();
    let log = std::env::var("DARKWATCH_BACKLOG_LOG_BYTES")
        .map(|b| format!("embedded_log_bytes = {b}\n"))
        .unwrap_or_default();
    let cfg = config(
        dir.path(),
        "agent.toml",
        &sae,
        metrics,
        "format = \"raw\"",
        &format!("port = {broker}\nnode_name = \"burst\"\nsubscribe = [\"activations/#\"]\n{log}"),
        &std::env::var("DARKWATCH_BACKLOG_FULL_POLICY")
            .map(|p| format!("[pipeline]\nfull_policy = \"{p}\"\n"))
            .unwrap_or_default(),
    );
    let mut agent = Agent::start(&cfg, metrics, &[]);
    agent.wait_metric("darkwatch_mqtt_connected", |v| v == 1.0);
    let mut second = Collector::new(broker, &["activations/#"], None);

    let n = 5_000usize;
    let mut o = rumqttc::MqttOptions::new(unique("burst-pub"), "127.0.0.1", broker);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut connection) = rumqttc::Client::new(o, 1024);
    let (acked_tx, acked_rx) = channel();
    std::thread::spawn(move || {
        let mut acked = 0usize;
        for event in connection.iter() {
            match event {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                    acked += 1;
                    if acked == n {
                        break;
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let _ = acked_tx.send(acked);
    });
    let start = Instant::now();
    for i in 0..n {
        let due = Duration::from_secs_f64(i as f64 / 2300.0);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let frame: Vec<u8> = values[(i % rows) * d..(i % rows + 1) * d]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        client
            .publish(
                "activations/m/layer6",
                rumqttc::QoS::AtLeastOnce,
                false,
                frame,
            )
            .unwrap();
    }
    let acked = acked_rx.recv_timeout(Duration::from_secs(60)).unwrap_or(0);
    let sent_in = start.elapsed().as_secs_f64();
    // Until the agent and the second client take (and the agent scores) nothing more
    // for 3 s.
    let mut last = (-1.0, 0, 0.0);
    loop {
        std::thread::sleep(Duration::from_secs(3));
        let now = (
            agent
                .metric("darkwatch_messages_received_total")
                .unwrap_or(0.0),
            second.poll().len(),
            agent.metric("darkwatch_frames_scored_total").unwrap_or(0.0),
        );
        if now == last {
            break;
        }
        last = now;
    }
    let skipped = agent.metric("darkwatch_mqtt_broker_skipped_total");
    let scored = last.2;
    let (_, err) = agent.stop();
    println!(
        "== embedded broker backlog: {n} frames of {d} f32 at QoS 1 in {sent_in:.1} s ({:.0}/s), SAE of {latents} latents, [mqtt] embedded_log_bytes {}\n\
         publisher acknowledged {acked}; second subscriber got {}; agent took {} (scored {scored}); \
         darkwatch_mqtt_broker_skipped_total {skipped:?}\n{}",
        n as f64 / sent_in,
        std::env::var("DARKWATCH_BACKLOG_LOG_BYTES").unwrap_or_else(|_| "default".into()),
        last.1,
        last.0,
        err.lines()
            .filter(|l| l.contains("stopped after") || l.contains("skipped"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The agent's resident memory with its embedded broker under sustained ExaMon input
/// (ignored; it asserts nothing about memory or time). For each `[mqtt] embedded_log_bytes`
/// in `DARKWATCH_RSS_LOG_BYTES` (comma-separated, `default` for the built-in one; unset:
/// `1048576,2097152,3145728,4194304,16777216,67108864`, the README's table) an agent with
/// the bundled model and an embedded broker takes ExaMon messages (100 nodes × 38 metrics,
/// QoS 0) at `DARKWATCH_RSS_RATE` messages/s (unset: 38,000, 1k frames/s) until twice the
/// log (in the bytes rumqttd counts: topic, payload and 4 more a message) has passed
/// through it, and at least `DARKWATCH_RSS_SECS` (unset: 20) seconds. Prints its VmRSS
/// every 5 s, and what the broker skipped. `DARKWATCH_LOAD_CASES` without `embedded-rss`
/// skips it.
///
/// ```text
/// DARKWATCH_LOAD_CASES=embedded-rss cargo test --release --test main -- --ignored --nocapture agent::load::embedded_rss
/// ```
#[test]
#[ignore = "a measurement: run on a release build with --ignored --nocapture"]
fn embedded_rss() {
    if !wanted("embedded-rss") {
        return;
    }
    let data = rows();
    let model = repo("models/smd-machine-1-6");
    let dir = tempfile::tempdir().unwrap();
    let rate: f64 = std::env::var("DARKWATCH_RSS_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(38_000.0);
    let min_secs = Duration::from_secs(
        std::env::var("DARKWATCH_RSS_SECS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(20),
    );
    let sizes = std::env::var("DARKWATCH_RSS_LOG_BYTES")
        .unwrap_or_else(|_| "1048576,2097152,3145728,4194304,16777216,67108864".into());
    for (k, size) in sizes.split(',').map(str::trim).enumerate() {
        let log_bytes = match size {
            "default" => darkwatch::mqtt::DEFAULT_EMBEDDED_LOG_BYTES,
            b => b
                .parse()
                .expect("DARKWATCH_RSS_LOG_BYTES: bytes or `default`"),
        };
        let work = dir.path().join(format!("rss{k}"));
        std::fs::create_dir_all(&work).unwrap();
        let (broker, metrics) = (free_port(), free_port());
        let node = unique("rss");
        let cfg = config(
            &work,
            "agent.toml",
            &model,
            metrics,
            "",
            &format!(
                "broker = \"embedded\"\nport = {broker}\nnode_name = \"{node}\"\n\
                 subscribe = [\"org/+/cluster/+/node/+/plugin/+/chnl/data/#\"]\n\
                 embedded_log_bytes = {log_bytes}\n"
            ),
            "",
        );
        let mut agent = Agent::start(&cfg, metrics, &[]);
        agent.wait_metric("darkwatch_mqtt_connected", |v| v == 1.0);
        std::thread::sleep(Duration::from_secs(1));
        let pid = agent.pid();
        let rss_idle = rss_kib(pid);
        let (client, pump) = publisher(broker);
        let (nodes, d) = (100usize, 38usize);
        let topics: Vec<Vec<String>> = (0..nodes)
            .map(|n| {
                (0..d)
                    .map(|j| format!("org/o/cluster/c/node/n{n:03}/plugin/p/chnl/data/f{j}"))
                    .collect()
            })
            .collect();
        let start = Instant::now();
        let (mut sent, mut counted, mut tick) = (0u64, 0u64, 0u64);
        let mut samples: Vec<(f64, u64, u64)> = Vec::new(); // (s, counted bytes, RSS KiB)
        let mut next_sample = 0.0;
        let mut sample = |counted: u64, samples: &mut Vec<(f64, u64, u64)>| {
            let t = start.elapsed().as_secs_f64();
            if t >= next_sample {
                samples.push((t, counted, rss_kib(pid)));
                next_sample += 1.0;
            }
        };
        while counted < 2 * log_bytes || start.elapsed() < min_secs {
            let row = data.row(tick as usize % data.nrows());
            for (n, node_topics) in topics.iter().enumerate() {
                for (j, topic) in node_topics.iter().enumerate() {
                    let payload = format!("{};{}", row[j] + n as f32 * 1e-4, 1_700_000_000 + tick);
                    counted += (4 + topic.len() + payload.len()) as u64;
                    send(&client, topic, payload);
                    sent += 1;
                }
            }
            tick += 1;
            let due = Duration::from_secs_f64(sent as f64 / rate);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
            sample(counted, &mut samples);
        }
        let publish_secs = start.elapsed().as_secs_f64();
        // Until the agent takes nothing more for 1 s, sampling on.
        let mut last = -1.0;
        loop {
            std::thread::sleep(Duration::from_millis(1000));
            sample(counted, &mut samples);
            let got = agent
                .metric("darkwatch_messages_received_total")
                .unwrap_or(0.0);
            if got == last || got as u64 >= sent {
                break;
            }
            last = got;
        }
        std::thread::sleep(Duration::from_secs(2));
        let rss_end = rss_kib(pid);
        let m = |name: &str| agent.metric(name).unwrap_or(f64::NAN);
        let received = m("darkwatch_messages_received_total");
        let scored = m("darkwatch_frames_scored_total");
        let skipped = m("darkwatch_mqtt_broker_skipped_total");
        drop(client);
        let _ = pump;
        let (_, err) = agent.stop();
        let per_msg = counted as f64 / sent as f64;
        let held = log_bytes as f64 / per_msg;
        let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
        println!(
            "== embedded broker RSS: [mqtt] embedded_log_bytes {log_bytes} ({:.0} MiB), ExaMon {nodes} nodes x {d} metrics at QoS 0",
            mib(log_bytes)
        );
        println!(
            "published   {sent} messages ({:.1} MiB counted, {per_msg:.1} bytes each) in {publish_secs:.1} s ({:.0}/s); the log holds {held:.0} of them, {:.1} s at that rate",
            mib(counted),
            sent as f64 / publish_secs,
            held / (sent as f64 / publish_secs)
        );
        println!(
            "agent       {received} taken, {scored} frames scored, darkwatch_mqtt_broker_skipped_total {skipped}"
        );
        let series: Vec<String> = samples
            .iter()
            .filter(|(t, ..)| (*t as u64).is_multiple_of(5))
            .map(|(t, c, r)| format!("{t:.0}s/{:.0}MiB:{:.1}", mib(*c), *r as f64 / 1024.0))
            .collect();
        println!(
            "RSS (MB)    idle {:.1}; by time/log bytes passed: {}; end {:.1}",
            rss_idle as f64 / 1024.0,
            series.join(" "),
            rss_end as f64 / 1024.0
        );
        println!(
            "final       {}",
            err.lines()
                .find(|l| l.contains("stopped after"))
                .unwrap_or("")
        );
    }
}
