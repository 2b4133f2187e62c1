//! `darkwatch alertmanager`, the real binary, between the in-process embedded broker
//! (rumqttd) and an Alertmanager: a small HTTP endpoint of the test's own that records
//! every POST and answers as scripted (plain, or https with the self-signed certificate
//! in `tests/data/tls`), and (in `real`) the real Alertmanager when it is installed.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::broker::{WAIT, free_port, publish_all, unique, wait_for};
use crate::util::process::{Logged, sample};
use crate::util::{darkwatch, repo, run};

mod real;

/// One request the fake Alertmanager got, and what it answered.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub head: String,
    pub body: String,
    pub status: u16,
}

impl Request {
    /// The POSTed array.
    pub fn alerts(&self) -> Vec<Value> {
        match serde_json::from_str(&self.body) {
            Ok(Value::Array(a)) => a,
            _ => panic!("not a JSON array: {}", self.body),
        }
    }
}

/// How the fake answers `GET …/api/v2/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StatusReply {
    /// As Alertmanager does: its status JSON (chunked, as Go sends a large body), version
    /// [`FAKE_VERSION`].
    Alertmanager,
    /// 404, as anything that is not Alertmanager at that path.
    NotFound,
}

pub(crate) const FAKE_VERSION: &str = "0.99.0-fake";

/// An HTTP endpoint that records requests. It answers 400 to a body containing `poison`,
/// else the next status of its script, else 200; `GET …/api/v2/status` as its
/// [`StatusReply`] says (recorded apart, in `gets`).
pub(crate) struct FakeAm {
    pub port: u16,
    requests: Arc<Mutex<Vec<Request>>>,
    gets: Arc<Mutex<Vec<String>>>,
}

impl FakeAm {
    pub fn start(script: &[u16]) -> FakeAm {
        FakeAm::on(TcpListener::bind("127.0.0.1:0").unwrap(), script)
    }

    pub fn on(listener: TcpListener, script: &[u16]) -> FakeAm {
        FakeAm::answering(listener, script, StatusReply::Alertmanager)
    }

    pub fn answering(listener: TcpListener, script: &[u16], reply: StatusReply) -> FakeAm {
        FakeAm::serving(listener, script, reply, None)
    }

    /// The fake over TLS: it presents `tests/data/tls/localhost.pem` (see [`tls_server`]).
    pub fn tls(script: &[u16]) -> FakeAm {
        FakeAm::serving(
            TcpListener::bind("127.0.0.1:0").unwrap(),
            script,
            StatusReply::Alertmanager,
            Some(tls_server()),
        )
    }

    fn serving(
        listener: TcpListener,
        script: &[u16],
        reply: StatusReply,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> FakeAm {
        let port = listener.local_addr().unwrap().port();
        let requests: Arc<Mutex<Vec<Request>>> = Arc::default();
        let gets: Arc<Mutex<Vec<String>>> = Arc::default();
        let (log, get_log) = (requests.clone(), gets.clone());
        let mut script: std::collections::VecDeque<u16> = script.iter().copied().collect();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                let mut answer = |conn: &mut dyn ReadWrite| {
                    answer_one(conn, reply, &mut script, &log, &get_log);
                };
                match &tls {
                    None => answer(&mut conn),
                    Some(config) => {
                        let Ok(server) = rustls::ServerConnection::new(config.clone()) else {
                            continue;
                        };
                        // A client that refuses the certificate ends the handshake: the
                        // read fails, and nothing is recorded.
                        let mut tls = rustls::StreamOwned::new(server, conn);
                        answer(&mut tls);
                        tls.conn.send_close_notify();
                        let _ = tls.flush();
                    }
                }
            }
        });
        FakeAm {
            port,
            requests,
            gets,
        }
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// The paths of the GETs it answered.
    pub fn gets(&self) -> Vec<String> {
        self.gets.lock().unwrap().clone()
    }

    /// The alerts of the POSTs answered 2xx, in order.
    pub fn accepted(&self) -> Vec<Value> {
        self.requests()
            .iter()
            .filter(|r| r.status < 300)
            .flat_map(Request::alerts)
            .collect()
    }

    /// The `stream` label of each alert accepted, in order.
    pub fn streams(&self) -> Vec<String> {
        self.accepted()
            .iter()
            .map(|a| a["labels"]["stream"].as_str().unwrap().to_string())
            .collect()
    }

    /// [`FakeAm::streams`] sorted, each once: what arrived, duplicates or not.
    pub fn streams_seen(&self) -> Vec<String> {
        let mut got = self.streams();
        got.sort();
        got.dedup();
        got
    }
}

/// A connection the fake answers on: TCP, or TLS over it.
trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Reads one request on `conn` and answers it as [`FakeAm`] says, recording it.
fn answer_one(
    conn: &mut dyn ReadWrite,
    reply: StatusReply,
    script: &mut std::collections::VecDeque<u16>,
    log: &Mutex<Vec<Request>>,
    get_log: &Mutex<Vec<String>>,
) {
    let Some((head, body)) = read_request(conn) else {
        return;
    };
    if head.starts_with("GET ") {
        let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
        match reply {
            StatusReply::Alertmanager if path.ends_with("/api/v2/status") => {
                let json = json!({
                    "cluster": {"name": "01FAKE", "peers": [], "status": "ready"},
                    "config": {"original": format!("route:\n  receiver: \"null\"\n# {}\n", "x".repeat(5000))},
                    "uptime": "2024-05-01T10:00:00.000Z",
                    "versionInfo": {"branch": "HEAD", "buildDate": "", "buildUser": "", "goVersion": "go1.22", "revision": "fake", "version": FAKE_VERSION}
                })
                .to_string();
                let (a, b) = json.split_at(json.len() / 2);
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                    a.len(),
                    b.len()
                );
            }
            _ => {
                let _ = write!(
                    conn,
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 19\r\nConnection: close\r\n\r\n404 page not found\n"
                );
            }
        }
        get_log.lock().unwrap().push(path);
        return;
    }
    let status = if body.contains("poison") {
        400
    } else {
        script.pop_front().unwrap_or(200)
    };
    let text = if status == 400 {
        "bad alert: invalid label set"
    } else {
        ""
    };
    let _ = write!(
        conn,
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    log.lock().unwrap().push(Request { head, body, status });
}

/// The test's TLS server configuration: `tests/data/tls/localhost.pem` and its key, a
/// self-signed certificate for `localhost` and `127.0.0.1` (see the README there).
fn tls_server() -> Arc<rustls::ServerConfig> {
    let read = |name: &str| std::fs::read(repo(&format!("tests/data/tls/{name}"))).unwrap();
    let certs = rustls_pemfile::certs(&mut &*read("localhost.pem"))
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut &*read("localhost.key"))
        .unwrap()
        .expect("a private key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    Arc::new(config)
}

/// Reads one HTTP request: its head and its body (by Content-Length).
fn read_request(conn: &mut dyn ReadWrite) -> Option<(String, String)> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if raw.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&raw[end + 4..end + 4 + len]).into_owned();
                return Some((head, body));
            }
        }
        let n = conn.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&buf[..n]);
    }
}

/// `darkwatch alertmanager` as a child process, its stderr collected.
pub(crate) struct Bridge(Logged);

impl Bridge {
    pub fn start(config: &Path) -> Bridge {
        Bridge(Logged::spawn(
            darkwatch().args(["alertmanager", "--config"]).arg(config),
        ))
    }

    pub fn stderr(&self) -> String {
        self.0.stderr()
    }

    /// Waits until stderr holds `text` `times` times (fails if the bridge exits first).
    pub fn wait_log(&mut self, text: &str, times: usize) {
        let start = Instant::now();
        while self.stderr().matches(text).count() < times {
            if let Some(status) = self.0.exited() {
                panic!(
                    "the bridge exited ({status}) before {text:?}:\n{}",
                    self.stderr()
                );
            }
            assert!(
                start.elapsed() < WAIT,
                "timed out waiting for {text:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit status and stderr (with its final line).
    pub fn stop(self) -> (ExitStatus, String) {
        self.0.stop("the bridge", "bridge stopped after", WAIT)
    }
}

/// What most tests start a bridge on: an embedded broker, and a bridge config for it in a
/// temp dir of its own ([`bridge_config`]: Alertmanager at `url`, `extra` lines of
/// `[alertmanager]`).
pub(crate) struct Setup {
    pub broker: u16,
    pub config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Setup {
    pub fn new(url: &str, extra: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let broker = embedded_broker();
        Setup {
            broker,
            config: bridge_config(dir.path(), broker, url, extra),
            _dir: dir,
        }
    }

    /// The bridge on this config, once it has subscribed.
    pub fn subscribed(&self) -> Bridge {
        let mut bridge = Bridge::start(&self.config);
        bridge.wait_log("Subscribed.", 1);
        bridge
    }
}

/// A bridge config in `dir`: broker on `broker_port`, Alertmanager at `url`, `extra` lines
/// of `[alertmanager]`. No `/metrics` unless `extra` sets `metrics_listen` (tests run in
/// parallel: the default port would be taken).
pub(crate) fn bridge_config(dir: &Path, broker_port: u16, url: &str, extra: &str) -> PathBuf {
    let path = dir.join("bridge.toml");
    let metrics = if extra.contains("metrics_listen") {
        ""
    } else {
        "metrics_listen = \"\"\n"
    };
    std::fs::write(
        &path,
        format!(
            "[mqtt]\nbroker = \"external\"\nport = {broker_port}\nnode_name = \"{}\"\nkeep_alive_secs = 5\n[alertmanager]\nurl = \"{url}\"\n{metrics}{extra}\n",
            unique("bridge")
        ),
    )
    .unwrap();
    path
}

/// The bridge's `/metrics` on `port`: the exposition text, or `None`.
pub(crate) fn scrape(port: u16) -> Option<String> {
    let response = crate::util::process::scrape(port)?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    Some(body.to_string())
}

/// A darkwatch alert event as the agent publishes it.
pub(crate) fn event(
    status: &str,
    stream: &str,
    starts_at: &str,
    ends_at: &str,
    score: f64,
) -> Vec<u8> {
    json!({
        "status": status,
        "labels": {"alertname": "DarkwatchAnomaly", "model_id": "m1", "severity": "warning", "stream": stream, "cluster": "test"},
        "annotations": {"summary": format!("anomaly on {stream}"), "description": "top features …"},
        "startsAt": starts_at,
        "endsAt": ends_at,
        "fingerprint": "0011223344556677",
        "score": score, "threshold": 2.5, "peak_score": score, "peak_seq": 3,
        "start_seq": 1, "end_seq": if status == "resolved" { json!(9) } else { Value::Null }, "seq": 3,
        "stream": stream, "model_id": "m1", "model_version": "v1",
        "top_features": [{"feature": "cpu_load", "contribution": 4.5}, {"feature": "mem", "contribution": 0.25}]
    })
    .to_string()
    .into_bytes()
}

pub(crate) const UNSET: &str = "0001-01-01T00:00:00Z";

/// The start of the test alerts' episodes.
const T0: &str = "2024-05-01T10:00:00Z";

/// A firing alert event for `stream` from `node`, on its topic.
fn firing(node: &str, stream: &str, score: f64) -> (String, Vec<u8>) {
    (
        topic(node, stream),
        event("firing", stream, T0, UNSET, score),
    )
}

fn topic(node: &str, stream: &str) -> String {
    format!("darkwatch/{node}/alerts/{stream}")
}

fn embedded_broker() -> u16 {
    darkwatch::mqtt::start_embedded_broker("127.0.0.1", 0).unwrap()
}

#[test]
fn bridge_posts_alertmanager_arrays_in_batches_and_retries_after_a_503() {
    let am = FakeAm::start(&[503]);
    let metrics = free_port();
    // Large flush interval: a batch goes out when it holds 4 alerts, and the last one
    // (2 alerts) when the interval has passed.
    let setup = Setup::new(
        &format!("http://127.0.0.1:{}", am.port),
        &format!("batch_max = 4\nflush_ms = 2000\nmetrics_listen = \"127.0.0.1:{metrics}\"\n"),
    );
    let port = setup.broker;
    let mut bridge = setup.subscribed();
    // The start-up check found Alertmanager (through a chunked answer, as Go sends it).
    bridge.wait_log("Alertmanager answers at [alertmanager] url.", 1);
    assert!(
        bridge.stderr().contains(&format!("version={FAKE_VERSION}")),
        "{}",
        bridge.stderr()
    );
    assert_eq!(am.gets(), ["/api/v2/status"]);
    let node = unique("n");
    let mut bad_label: Value =
        serde_json::from_slice(&event("firing", "s9", T0, UNSET, 1.0)).unwrap();
    bad_label["labels"]["rack-id"] = json!("r1");
    let mut messages = vec![
        // Not alert events: acknowledged, counted, never posted.
        (topic(&node, "junk"), b"not json".to_vec()),
        (
            format!("darkwatch/{node}/alerts/status"),
            br#"{"status":"online","node":"x"}"#.to_vec(),
        ),
        // An alert event with a label name Alertmanager refuses: dropped alike.
        (topic(&node, "badlabel"), bad_label.to_string().into_bytes()),
        firing(&node, "s0", 10.0),
        // A re-send of the same episode, then its resolution.
        firing(&node, "s0", 11.0),
        (
            topic(&node, "s0"),
            event("resolved", "s0", T0, "2024-05-01T10:05:00Z", 1.0),
        ),
    ];
    for i in 1..=7 {
        messages.push(firing(&node, &format!("s{i}"), i as f64));
    }
    publish_all(port, &messages);
    wait_for("10 alerts accepted", || am.accepted().len() >= 10);
    // /metrics: every message accounted for, once the last batch is acknowledged.
    wait_for("nothing in hand", || {
        scrape(metrics).and_then(|m| sample(&m, "darkwatch_bridge_messages_in_hand")) == Some(0.0)
    });
    let m = scrape(metrics).unwrap();
    for (name, want) in [
        ("darkwatch_bridge_messages_received_total", 13.0),
        ("darkwatch_bridge_alerts_forwarded_total", 10.0),
        ("darkwatch_bridge_messages_ignored_total", 3.0),
        ("darkwatch_bridge_alerts_refused_total", 0.0),
        ("darkwatch_bridge_posts_total{result=\"failed\"}", 1.0),
        ("darkwatch_bridge_posts_total{result=\"accepted\"}", 3.0),
        ("darkwatch_bridge_mqtt_connected", 1.0),
        ("darkwatch_bridge_post_duration_seconds_count", 4.0),
    ] {
        assert_eq!(sample(&m, name), Some(want), "{name}:\n{m}");
    }
    let last = sample(&m, "darkwatch_bridge_last_post_success_timestamp_seconds").unwrap();
    assert!(last > 1.7e9, "{last}");
    assert!(m.contains("darkwatch_build_info{version="), "{m}");
    assert!(m.contains("\nprocess_resident_memory_bytes "), "{m}");

    let requests = am.requests();
    for r in &requests {
        assert!(
            r.head.starts_with("POST /api/v2/alerts HTTP/1.1\r\n"),
            "{}",
            r.head
        );
        assert!(
            r.head.contains("Content-Type: application/json"),
            "{}",
            r.head
        );
        assert!(r.alerts().len() <= 4, "batch over batch_max: {}", r.body);
    }
    // The first POST got a 503; the same batch was posted again.
    assert_eq!(requests[0].status, 503);
    assert_eq!(requests[1].status, 200);
    assert_eq!(requests[1].body, requests[0].body);
    assert_eq!(requests[0].alerts().len(), 4, "{}", requests[0].body);

    let accepted = am.accepted();
    assert_eq!(accepted.len(), 10, "{accepted:?}");
    let order: Vec<(String, String)> = accepted
        .iter()
        .map(|a| {
            (
                a["labels"]["stream"].as_str().unwrap().to_string(),
                a["annotations"]["score"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut want = vec![
        ("s0".to_string(), "10.0".to_string()),
        ("s0".into(), "11.0".into()),
        ("s0".into(), "1.0".into()),
    ];
    want.extend((1..=7).map(|i| (format!("s{i}"), format!("{}.0", i))));
    assert_eq!(order, want);
    for a in &accepted {
        let keys: Vec<&str> = a.as_object().unwrap().keys().map(String::as_str).collect();
        assert!(!keys.contains(&"fingerprint"), "{a}");
        assert!(!keys.contains(&"status"), "{a}");
        assert_eq!(a["startsAt"], T0);
        assert_eq!(a["labels"]["alertname"], "DarkwatchAnomaly");
        assert_eq!(a["labels"]["cluster"], "test");
        assert_eq!(
            a["annotations"]["top_features"],
            "cpu_load (4.500), mem (0.250)"
        );
        assert_eq!(a["annotations"]["threshold"], "2.5");
        assert_eq!(
            a["annotations"]["darkwatch_fingerprint"],
            "0011223344556677"
        );
        for v in a["labels"].as_object().unwrap().values() {
            assert!(v.is_string(), "{a}");
        }
        for v in a["annotations"].as_object().unwrap().values() {
            assert!(v.is_string(), "{a}");
        }
    }
    // Firing: no endsAt (Alertmanager's resolve timeout applies); resolved: its end.
    assert!(accepted[0].get("endsAt").is_none(), "{}", accepted[0]);
    assert!(accepted[1].get("endsAt").is_none(), "{}", accepted[1]);
    assert_eq!(accepted[2]["endsAt"], "2024-05-01T10:05:00Z");

    let (status, err) = bridge.stop();
    assert!(status.success(), "{status}\n{err}");
    assert!(
        err.contains("13 messages received = 10 alerts forwarded (in 3 POSTs) + 0 refused by Alertmanager + 3 not darkwatch alert events + 0 unacknowledged in hand; 1 failed POSTs retried"),
        "{err}"
    );
    assert!(err.contains("POST to Alertmanager failed"), "{err}");
    // Alerts flowing show at INFO, once (the next summary is 10 minutes away).
    assert_eq!(
        err.matches("First alerts forwarded to Alertmanager")
            .count(),
        1,
        "{err}"
    );
    // The first dropped message at once, with its topic and what to check; the two held
    // back by the rate limit at stop, naming the first of them and the latest.
    let first = err
        .lines()
        .find(|l| l.contains("Dropped an MQTT message that is not a darkwatch alert event"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        first.contains(&format!("topic={}", topic(&node, "junk")))
            && first.contains("check [alertmanager] subscribe"),
        "{first}"
    );
    let held = err
        .lines()
        .find(|l| l.contains("Dropped MQTT messages that are not alerts Alertmanager would take"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(held.contains("count=2"), "{held}");
    assert!(
        held.contains(&format!("topic=darkwatch/{node}/alerts/status")),
        "{held}"
    );
    assert!(
        held.contains(&format!("last_topic={}", topic(&node, "badlabel"))),
        "{held}"
    );
    assert!(
        held.contains(r#"last_why=label name "rack-id" is invalid: it holds '-' at character 5"#),
        "{held}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn nothing_is_lost_while_alertmanager_is_unreachable_or_the_bridge_is_stopped() {
    // A port nothing listens on yet: Alertmanager is down.
    let am_port = free_port();
    let url = format!("http://127.0.0.1:{am_port}");
    let setup = Setup::new(&url, "flush_ms = 50\nretry_max_secs = 0.5\n");
    let (port, config) = (setup.broker, &setup.config);
    let node = unique("n");
    let ev = |s: &str| firing(&node, s, 5.0);

    // Stopped while its POST fails: the batch stays unacknowledged in the broker.
    let mut bridge = setup.subscribed();
    // Alertmanager down at the start: a warning, and the bridge goes on.
    bridge.wait_log("Alertmanager does not answer yet", 1);
    publish_all(port, &[ev("a1"), ev("a2")]);
    bridge.wait_log("POST to Alertmanager failed", 1);
    let (status, err) = bridge.stop();
    assert!(status.success(), "{status}\n{err}");
    // The trial's "2 received, 1 in hand": a2 could wait in the queue behind a1's batch,
    // counted nowhere. Both are in hand, whichever batch each was in.
    assert!(
        err.contains("2 messages received = 0 alerts forwarded (in 0 POSTs) + 0 refused by Alertmanager + 0 not darkwatch alert events + 2 unacknowledged in hand"),
        "{err}"
    );
    assert!(
        err.contains("Stopping with messages Alertmanager has not accepted"),
        "{err}"
    );
    assert!(err.contains("unacknowledged=2"), "{err}");

    // Published while no bridge runs: the broker keeps it in the bridge's session.
    publish_all(port, &[ev("b1")]);

    // The bridge again (same client id, so the same session), Alertmanager still down;
    // then Alertmanager comes up under the running bridge.
    let mut bridge = Bridge::start(config);
    bridge.wait_log("POST to Alertmanager failed", 1);
    let am = FakeAm::on(TcpListener::bind(("127.0.0.1", am_port)).unwrap(), &[]);
    wait_for("a1, a2 and b1 at Alertmanager", || {
        am.streams_seen() == ["a1", "a2", "b1"]
    });
    let (status, err) = bridge.stop();
    assert!(status.success(), "{status}\n{err}");
    assert!(err.contains("session_present=true"), "{err}");
    assert!(err.contains("Alertmanager accepts alerts again"), "{err}");
}

#[test]
fn an_alert_alertmanager_refuses_is_dropped_alone_and_logged() {
    let am = FakeAm::start(&[]);
    let setup = Setup::new(
        &format!("http://127.0.0.1:{}", am.port),
        "flush_ms = 1000\n",
    );
    let port = setup.broker;
    let bridge = setup.subscribed();
    let node = unique("n");
    publish_all(
        port,
        &[
            firing(&node, "ok1", 3.0),
            firing(&node, "poison", 3.0),
            firing(&node, "ok2", 3.0),
        ],
    );
    wait_for("ok1 and ok2 accepted", || am.accepted().len() >= 2);
    // Then a later alert still goes through: the queue is not blocked.
    publish_all(port, &[firing(&node, "ok3", 3.0)]);
    wait_for("ok3 accepted", || am.accepted().len() >= 3);
    assert_eq!(am.streams(), ["ok1", "ok2", "ok3"]);
    let requests = am.requests();
    // The batch of three was refused, then each alert posted alone.
    assert_eq!(requests[0].status, 400);
    assert_eq!(requests[0].alerts().len(), 3);
    let (status, err) = bridge.stop();
    assert!(status.success(), "{status}\n{err}");
    assert!(err.contains("1 refused by Alertmanager"), "{err}");
    assert!(err.contains("bad alert: invalid label set"), "{err}");
    assert!(err.contains("3 alerts forwarded"), "{err}");
}

/// The trial's hung Alertmanager: "retrying" was logged just before "stopping". A POST
/// that fails once the bridge stops is not retried, and the stop says what is left.
#[test]
fn a_stop_under_a_hung_alertmanager_says_what_is_left_and_claims_no_retry() {
    // Accepts connections and never answers.
    let hung = TcpListener::bind("127.0.0.1:0").unwrap();
    let am_port = hung.local_addr().unwrap().port();
    let (conn_tx, conn_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in hung.incoming().flatten() {
            let _ = conn_tx.send(());
            held.push(conn);
        }
    });
    let setup = Setup::new(
        &format!("http://127.0.0.1:{am_port}"),
        "flush_ms = 50\ntimeout_secs = 3\n",
    );
    let bridge = setup.subscribed();
    // The start-up check's GET, which times out in the background.
    conn_rx.recv_timeout(WAIT).unwrap();
    let node = unique("n");
    publish_all(setup.broker, &[firing(&node, "h1", 5.0)]);
    // The POST is in flight (and will hang): stop now.
    conn_rx.recv_timeout(WAIT).unwrap();
    let (status, err) = bridge.stop();
    assert!(status.success(), "{status}\n{err}");
    assert!(
        err.contains("POST to Alertmanager failed while stopping; not retried."),
        "{err}"
    );
    assert!(!err.contains("retrying"), "{err}");
    assert!(err.contains("unacknowledged=1"), "{err}");
    assert!(
        err.contains("1 messages received = 0 alerts forwarded (in 0 POSTs) + 0 refused by Alertmanager + 0 not darkwatch alert events + 1 unacknowledged in hand"),
        "{err}"
    );
}

/// A url without Alertmanager's route prefix: 404 on every POST. The start says so loudly,
/// naming the key and the prefix, and the bridge runs on (the alerts wait).
#[test]
fn a_url_that_is_not_alertmanager_is_reported_loudly_at_the_start() {
    let am = FakeAm::answering(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        &[],
        StatusReply::NotFound,
    );
    let setup = Setup::new(&format!("http://127.0.0.1:{}/wrong-prefix", am.port), "");
    let mut bridge = Bridge::start(&setup.config);
    bridge.wait_log("NOT ALERTMANAGER", 1);
    bridge.wait_log("Subscribed.", 1);
    assert_eq!(am.gets(), ["/wrong-prefix/api/v2/status"]);
    let (status, err) = bridge.stop();
    assert!(status.success(), "{status}\n{err}");
    let line = err
        .lines()
        .find(|l| l.contains("NOT ALERTMANAGER"))
        .unwrap();
    assert!(line.contains(" WARN "), "{line}");
    assert!(line.contains("[alertmanager] url"), "{line}");
    assert!(line.contains("--web.route-prefix"), "{line}");
    assert!(line.contains("HTTP 404"), "{line}");
    assert!(
        line.contains(&format!(
            "url=http://127.0.0.1:{}/wrong-prefix/api/v2/status",
            am.port
        )),
        "{line}"
    );
}

/// `tests/data/tls/<name>` as a TOML string value.
fn tls_file(name: &str) -> String {
    format!("\"{}\"", repo(&format!("tests/data/tls/{name}")).display())
}

/// https with `ca_file` holding Alertmanager's certificate: the start-up check and the
/// POSTs go over TLS (through rustls, the crate's own), and every alert arrives.
#[test]
fn bridge_posts_over_https_to_an_alertmanager_its_ca_file_trusts() {
    let am = FakeAm::tls(&[]);
    let setup = Setup::new(
        &format!("https://127.0.0.1:{}", am.port),
        &format!("ca_file = {}\nflush_ms = 50\n", tls_file("localhost.pem")),
    );
    let mut bridge = setup.subscribed();
    // The status GET went over TLS too (its answer chunked, as Go sends it).
    bridge.wait_log("Alertmanager answers at [alertmanager] url.", 1);
    assert_eq!(am.gets(), ["/api/v2/status"]);
    assert!(
        bridge
            .stderr()
            .contains(&format!("url=https://127.0.0.1:{}/api/v2/status", am.port)),
        "{}",
        bridge.stderr()
    );
    let node = unique("n");
    publish_all(
        setup.broker,
        &[
            firing(&node, "t1", 4.0),
            firing(&node, "t2", 5.0),
            (
                topic(&node, "t1"),
                event("resolved", "t1", T0, "2024-05-01T10:05:00Z", 1.0),
            ),
        ],
    );
    wait_for("3 alerts accepted over TLS", || am.accepted().len() >= 3);
    let mut streams = am.streams();
    streams.sort();
    assert_eq!(streams, ["t1", "t1", "t2"]);
    for r in am.requests() {
        assert!(
            r.head.starts_with("POST /api/v2/alerts HTTP/1.1\r\n"),
            "{}",
            r.head
        );
        assert!(
            r.head.contains(&format!("Host: 127.0.0.1:{}\r\n", am.port)),
            "{}",
            r.head
        );
    }
    let (status, err) = bridge.stop();
    assert!(status.success(), "{status}\n{err}");
    assert!(
        err.contains("3 messages received = 3 alerts forwarded"),
        "{err}"
    );
    assert!(!err.contains("POST to Alertmanager failed"), "{err}");
}

/// Alertmanager's certificate is not one `ca_file` trusts: nothing goes over that
/// connection, the WARN says which key to mend, and the alerts stay unacknowledged in
/// the broker; once `ca_file` is mended (same client id, so the same session), they arrive.
#[test]
fn an_untrusted_alertmanager_certificate_is_refused_loudly_and_nothing_is_lost() {
    let am = FakeAm::tls(&[]);
    let metrics = free_port();
    let untrusted = format!("ca_file = {}\n", tls_file("other.pem"));
    let setup = Setup::new(
        &format!("https://127.0.0.1:{}", am.port),
        &format!(
            "{untrusted}flush_ms = 50\nretry_max_secs = 0.5\nmetrics_listen = \"127.0.0.1:{metrics}\"\n"
        ),
    );
    let (port, config) = (setup.broker, &setup.config);
    let node = unique("n");
    let ev = |s: &str| firing(&node, s, 5.0);

    let mut bridge = setup.subscribed();
    // The start-up check fails the handshake as the POSTs will, and says it is a setting.
    bridge.wait_log("CERTIFICATE NOT TRUSTED", 1);
    publish_all(port, &[ev("u1"), ev("u2")]);
    bridge.wait_log("POST to Alertmanager failed", 1);
    wait_for("u1 and u2 in hand", || {
        scrape(metrics).and_then(|m| sample(&m, "darkwatch_bridge_messages_in_hand")) == Some(2.0)
    });
    let m = scrape(metrics).unwrap();
    assert_eq!(
        sample(&m, "darkwatch_bridge_alerts_forwarded_total"),
        Some(0.0),
        "{m}"
    );
    assert!(
        sample(&m, "darkwatch_bridge_posts_total{result=\"failed\"}").is_some_and(|n| n >= 1.0),
        "{m}"
    );
    // Refused in the handshake: no request reached the server.
    assert!(am.requests().is_empty(), "{:?}", am.requests());
    assert!(am.gets().is_empty(), "{:?}", am.gets());
    let (status, err) = bridge.stop();
    assert!(status.success(), "{status}\n{err}");
    for start in [
        "POST to Alertmanager failed; retrying",
        "CERTIFICATE NOT TRUSTED",
    ] {
        let line = err
            .lines()
            .find(|l| l.contains(start))
            .unwrap_or_else(|| panic!("no {start:?}:\n{err}"));
        assert!(line.contains(" WARN "), "{line}");
        assert!(
            line.contains("Alertmanager's certificate is not trusted")
                && line.contains("UnknownIssuer")
                && line.contains("[alertmanager] ca_file")
                && line.contains("other.pem"),
            "{line}"
        );
    }
    assert!(
        err.contains("2 messages received = 0 alerts forwarded (in 0 POSTs) + 0 refused by Alertmanager + 0 not darkwatch alert events + 2 unacknowledged in hand"),
        "{err}"
    );
    assert!(err.contains("unacknowledged=2"), "{err}");

    // ca_file mended, nothing else: the broker kept both for the bridge's session.
    let text = std::fs::read_to_string(config).unwrap();
    assert!(text.contains(&untrusted), "{text}");
    let trusted = format!("ca_file = {}\n", tls_file("localhost.pem"));
    std::fs::write(config, text.replace(&untrusted, &trusted)).unwrap();
    let mut bridge = Bridge::start(config);
    bridge.wait_log("Alertmanager answers at [alertmanager] url.", 1);
    wait_for("u1 and u2 at Alertmanager", || {
        am.streams_seen() == ["u1", "u2"]
    });
    let (status, err) = bridge.stop();
    assert!(status.success(), "{status}\n{err}");
    assert!(err.contains("session_present=true"), "{err}");
    assert!(err.contains("0 unacknowledged in hand"), "{err}");
}

#[test]
fn a_bad_alertmanager_url_or_port_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    for (lines, key) in [
        (
            "[alertmanager]\nurl = \"localhost:9093\"\n",
            "alertmanager.url",
        ),
        (
            "[alertmanager]\nurl = \"https://am:9093\"\n",
            "alertmanager.ca_file",
        ),
        (
            "[alertmanager]\nurl = \"https://am:9093\"\nca_file = \"/nonexistent/ca.pem\"\n",
            "alertmanager.ca_file",
        ),
        ("[mqtt]\nport = 0\n", "mqtt.port"),
        ("[alertmanager]\nbatch_max = 0\n", "alertmanager.batch_max"),
        (
            "[alertmanager]\nmetrics_listen = \"localhost:9465\"\n",
            "alertmanager.metrics_listen",
        ),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, lines).unwrap();
        let (code, _, err) = run(darkwatch().args(["alertmanager", "--config"]).arg(&path));
        assert_eq!(code, 78, "{lines}: {err}");
        assert!(err.contains(key), "{lines}: {err}");
    }
    // A subscribe placeholder other than {node} would be subscribed as it is and match no
    // alert topic: refused by the bridge and by `darkwatch validate`, naming it, as in
    // `[mqtt] subscribe`.
    let path = dir.path().join("placeholder.toml");
    std::fs::write(
        &path,
        "[alertmanager]\nsubscribe = [\"darkwatch/{host}/alerts/#\"]\n",
    )
    .unwrap();
    for args in [["alertmanager", "--config"], ["validate", "--config"]] {
        let (code, _, err) = run(darkwatch().args(args).arg(&path));
        assert_eq!(code, 78, "{args:?}: {err}");
        assert!(
            err.contains("alertmanager.subscribe")
                && err.contains("`{host}`")
                && err.contains("{node}"),
            "{args:?}: {err}"
        );
    }
    // metrics_listen taken by another process: the bridge stops at once (1: not the
    // file's fault, a restart may find it free), naming the key, rather than run with
    // Prometheus scraping the other process.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap();
    let config = bridge_config(
        dir.path(),
        free_port(),
        "http://127.0.0.1:9",
        &format!("metrics_listen = \"{listen}\"\n"),
    );
    let (code, _, err) = run(darkwatch().args(["alertmanager", "--config"]).arg(&config));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "[alertmanager] metrics_listen = \"{listen}\": cannot listen"
        )),
        "{err}"
    );
}
