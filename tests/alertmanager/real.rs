//! The bridge against the real Prometheus Alertmanager: `$ALERTMANAGER` (which must then
//! run), else `/usr/bin/prometheus-alertmanager` (Debian's package), else the test prints
//! that it was skipped. `.ci/run` fetches the package and sets `ALERTMANAGER`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Setup, UNSET, event, topic};
use crate::util::broker::{WAIT, free_port, publish_all, unique, wait_for};
use crate::util::process::Logged;

/// The Alertmanager binary, or `None` (skip) when there is none.
fn alertmanager_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ALERTMANAGER").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "ALERTMANAGER={} is not a file", p.display());
        return Some(p);
    }
    let debian = PathBuf::from("/usr/bin/prometheus-alertmanager");
    debian.is_file().then_some(debian)
}

/// A `GET` on Alertmanager; the status and body.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    // Go answers small bodies with a Content-Length; a chunked one would need decoding.
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    Some((status, body.to_string()))
}

/// Alertmanager, killed on drop, and its directory.
struct Running {
    process: Logged,
    _dir: tempfile::TempDir,
}

/// Starts Alertmanager on a free port with a null receiver and no clustering; returns once
/// it is ready.
fn start(bin: &PathBuf, port: u16) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("alertmanager.yml");
    std::fs::write(
        &conf,
        "route:\n  receiver: \"null\"\nreceivers:\n  - name: \"null\"\n",
    )
    .unwrap();
    let process = Logged::spawn(
        Command::new(bin)
            .arg(format!("--config.file={}", conf.display()))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            // No gossip port: this test's Alertmanager is alone.
            .arg("--cluster.listen-address="),
    );
    let mut running = Running { process, _dir: dir };
    let start = Instant::now();
    while get(port, "/-/ready").is_none_or(|(s, _)| s != 200) {
        if let Some(status) = running.process.exited() {
            panic!(
                "{} exited ({status}) before it was ready:\n{}",
                bin.display(),
                running.process.stderr()
            );
        }
        assert!(start.elapsed() < WAIT, "Alertmanager not ready on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    running
}

/// The alerts Alertmanager lists for `stream` (active ones: resolved alerts are not
/// listed).
fn alerts_of(port: u16, stream: &str) -> Vec<Value> {
    let (status, body) = get(
        port,
        &format!("/api/v2/alerts?filter=stream%3D%22{stream}%22"),
    )
    .expect("Alertmanager answers");
    assert_eq!(status, 200, "{body}");
    match serde_json::from_str(&body) {
        Ok(Value::Array(a)) => a,
        _ => panic!("not an array: {body}"),
    }
}

#[test]
fn real_alertmanager_shows_a_firing_alert_updates_it_and_ends_it_when_resolved() {
    let Some(bin) = alertmanager_bin() else {
        eprintln!(
            "note: real_alertmanager_shows_a_firing_alert_updates_it_and_ends_it_when_resolved skipped: no Alertmanager (set ALERTMANAGER to its binary, or install prometheus-alertmanager; .ci/run fetches it)"
        );
        return;
    };
    let am_port = free_port();
    let _am = start(&bin, am_port);
    let setup = Setup::new(&format!("http://127.0.0.1:{am_port}"), "flush_ms = 50\n");
    let broker = setup.broker;
    let mut bridge = setup.subscribed();
    // The start-up check: the real Alertmanager's status, its version and cluster.
    bridge.wait_log("Alertmanager answers at [alertmanager] url.", 1);
    let line = bridge
        .stderr()
        .lines()
        .find(|l| l.contains("Alertmanager answers"))
        .unwrap()
        .to_string();
    assert!(line.contains(" INFO "), "{line}");
    assert!(line.contains("cluster=disabled"), "{line}");
    let version = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("version="))
        .unwrap_or_else(|| panic!("{line}"));
    assert!(
        version.starts_with(|c: char| c.is_ascii_digit()) && version.contains('.'),
        "{line}"
    );

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let starts = darkwatch::alert::rfc3339_utc((now - 120.0).floor());
    let node = unique("n");
    let stream = unique("s");
    let t = topic(&node, &stream);

    // Firing: listed as active, with our labels and annotations; Alertmanager sets the end
    // itself (resolve_timeout) since the bridge sent none.
    publish_all(
        broker,
        &[(t.clone(), event("firing", &stream, &starts, UNSET, 7.5))],
    );
    wait_for("the alert in Alertmanager", || {
        alerts_of(am_port, &stream).len() == 1
    });
    let a = &alerts_of(am_port, &stream)[0];
    let labels = a["labels"].as_object().unwrap();
    let mut names: Vec<&str> = labels.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["alertname", "cluster", "model_id", "severity", "stream"],
        "{a}"
    );
    assert_eq!(a["labels"]["alertname"], "DarkwatchAnomaly");
    assert_eq!(a["labels"]["stream"], stream.as_str());
    assert_eq!(a["annotations"]["summary"], format!("anomaly on {stream}"));
    assert_eq!(a["annotations"]["score"], "7.5");
    assert_eq!(
        a["annotations"]["top_features"],
        "cpu_load (4.500), mem (0.250)"
    );
    assert_eq!(a["status"]["state"], "active", "{a}");
    let ms = |v: &Value| darkwatch::alertmanager::rfc3339_ms(v.as_str().unwrap()).unwrap();
    assert_eq!(
        ms(&a["startsAt"]),
        ms(&Value::String(starts.clone())),
        "{a}"
    );
    assert!(
        ms(&a["endsAt"]) as f64 > now * 1000.0,
        "end not in the future: {a}"
    );

    // A re-send with a new score: the same alert (same labels), annotations updated.
    publish_all(
        broker,
        &[(t.clone(), event("firing", &stream, &starts, UNSET, 9.25))],
    );
    wait_for("the updated score", || {
        let got = alerts_of(am_port, &stream);
        got.len() == 1 && got[0]["annotations"]["score"] == "9.25"
    });

    // Resolved, with an end in the past: Alertmanager ends the alert.
    let ends = darkwatch::alert::rfc3339_utc((now - 1.0).floor());
    publish_all(
        broker,
        &[(t, event("resolved", &stream, &starts, &ends, 0.5))],
    );
    wait_for("the alert to end", || {
        alerts_of(am_port, &stream).is_empty()
    });

    let (status, err) = bridge.stop();
    assert!(status.success(), "{status}\n{err}");
    assert!(
        err.contains("3 messages received = 3 alerts forwarded (in 3 POSTs) + 0 refused by Alertmanager + 0 not darkwatch alert events + 0 unacknowledged in hand"),
        "{err}"
    );
}
