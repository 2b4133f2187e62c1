//! `darkwatch record`: the real binary subscribed to an in-process rumqttd broker, fed
//! Telegraf JSON; its CSV checked against the window means of what was published, read
//! with train's reader and trained on; discovery, a metric and a stream after discovery,
//! and the refusals (an existing file, several streams, a bad configuration).

mod util;

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use util::broker::{WAIT, publish_all, wait_for};
use util::process::Logged;
use util::{darkwatch, darkwatch_within, quick_config, run};

/// An embedded broker of this test process, as the nodes' broker.
fn broker() -> u16 {
    darkwatch::mqtt::start_embedded_broker("127.0.0.1", 0).unwrap()
}

/// A Telegraf agent configuration on the external broker at `port`, 10 s windows.
fn config(dir: &Path, port: u16, extra: &str) -> PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "[agent]\nformat = \"telegraf\"\n[mqtt]\nbroker = \"external\"\nport = {port}\nnode_name = \"rec\"\nkeep_alive_secs = 5\nsubscribe = [\"telegraf/#\"]\n[assemble]\nwindow_secs = 10\n{extra}"
        ),
    )
    .unwrap();
    path
}

/// One Telegraf JSON metric of measurement `sys` from `host` at `t` (epoch seconds).
fn json(host: &str, t: f64, fields: &[(&str, f64)]) -> (String, Vec<u8>) {
    let fields: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
    (
        format!("telegraf/{host}/sys"),
        format!(
            "{{\"name\":\"sys\",\"tags\":{{\"host\":\"{host}\"}},\"fields\":{{{}}},\"timestamp\":{t}}}",
            fields.join(",")
        )
        .into_bytes(),
    )
}

/// Values of window `i` (two samples each of a and b, 1 s and 6 s into the window).
fn window(host: &str, t0: f64, i: usize, extra: &[(&str, f64)]) -> Vec<(String, Vec<u8>)> {
    (0..2)
        .map(|k| {
            let mut fields = vec![("a", (i * 10 + k) as f64), ("b", 0.5 * i as f64 - k as f64)];
            fields.extend_from_slice(extra);
            json(host, t0 + 10.0 * i as f64 + 1.0 + 5.0 * k as f64, &fields)
        })
        .collect()
}

/// The start of a 10 s window an hour ago (the assembler refuses only future samples).
fn t0() -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    ((now - 3600.0) / 10.0).floor() * 10.0
}

/// Waits until `p` exited; returns its status and stderr.
fn exit_of(mut p: Logged) -> (ExitStatus, String) {
    let start = Instant::now();
    loop {
        if let Some(s) = p.exited() {
            // The reader thread may not have taken the last line yet.
            std::thread::sleep(Duration::from_millis(200));
            return (s, p.stderr());
        }
        assert!(
            start.elapsed() < WAIT,
            "record did not stop:\n{}",
            p.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn started(cfg: &Path, out: &Path, extra: &[&str]) -> Logged {
    let p = Logged::spawn(
        darkwatch()
            .args(["record", "--config"])
            .arg(cfg)
            .arg("--out")
            .arg(out)
            .args(extra),
    );
    wait_for("record to subscribe", || {
        p.stderr().contains("connected and subscribed")
    });
    p
}

#[test]
fn records_the_window_means_the_agent_would_score_and_train_takes_them() {
    let dir = tempfile::tempdir().unwrap();
    let port = broker();
    let cfg = config(dir.path(), port, "");
    let out = dir.path().join("rec.csv");
    let t0 = t0();
    let p = started(
        &cfg,
        &out,
        &[
            "--discover-secs",
            "0.5",
            "--frames",
            "14",
            "--progress-secs",
            "1",
        ],
    );
    // Discovery: windows 0..=3 of host n1, fields a and b.
    let first: Vec<_> = (0..4).flat_map(|i| window("n1", t0, i, &[])).collect();
    publish_all(port, &first);
    wait_for("discovery to end", || p.stderr().contains("discovery done"));
    assert!(
        p.stderr()
            .contains("recording stream \"n1\", 2 features: sys.a,sys.b"),
        "{}",
        p.stderr()
    );
    // After discovery: a new field c in window 4, another host, then windows to 17.
    let mut then: Vec<_> = window("n1", t0, 4, &[("c", 7.0)]);
    then.push(json("n2", t0 + 41.0, &[("a", 1.0), ("b", 2.0)]));
    then.extend((5..18).flat_map(|i| window("n1", t0, i, &[])));
    publish_all(port, &then);
    let (status, err) = exit_of(p);
    assert!(status.success(), "{err}");
    assert!(err.contains("done (frames): 14 rows written"), "{err}");
    assert!(
        err.contains("not in --metrics): \"sys.c\" (2 samples)"),
        "the late metric is named and counted: {err}"
    );
    assert!(
        err.contains("other streams, not recorded: \"n2\" (2 samples)"),
        "{err}"
    );
    assert!(err.contains("2 unknown_metric"), "{err}");

    let text = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "timestamp,sys.a,sys.b");
    assert_eq!(lines.len(), 15, "{text}");
    for (i, line) in lines[1..].iter().enumerate() {
        let v: Vec<f64> = line.split(',').map(|x| x.parse().unwrap()).collect();
        // The window's end, and the means of its two samples.
        assert_eq!(v[0], t0 + 10.0 * (i + 1) as f64, "{line}");
        assert_eq!(v[1], (i * 10) as f64 + 0.5, "{line}");
        assert_eq!(v[2], 0.5 * i as f64 - 0.5, "{line}");
    }
    // Train's reader takes the file as it is: the timestamp column, the names as features.
    let table = darkwatch::ingest::csv::read_csv(&out, &darkwatch::ingest::TableOptions::default())
        .unwrap();
    assert_eq!(table.features, ["sys.a", "sys.b"]);
    assert_eq!(table.values.nrows(), 14);
    let model = dir.path().join("model");
    let (code, stdout, stderr) = run(darkwatch()
        .args(["train", "--input"])
        .arg(&out)
        .arg("--out")
        .arg(&model)
        .arg("--config")
        .arg(quick_config(dir.path())));
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let meta = std::fs::read_to_string(model.join("model.json")).unwrap();
    assert!(
        meta.contains("\"sys.a\"") && meta.contains("\"sys.b\""),
        "{meta}"
    );

    // The model's features fix the columns of the next recording; an existing file is
    // refused, and kept as it was.
    let (code, _, err) = run(darkwatch_within(30)
        .args(["record", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&out)
        .arg("--metrics-from")
        .arg(&model));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("exists") && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), text);
    let p = started(
        &cfg,
        &out,
        &[
            "--force",
            "--metrics",
            "sys.b",
            "--discover-secs",
            "0.3",
            "--frames",
            "2",
        ],
    );
    let t1 = t0 + 1000.0;
    let more: Vec<_> = (0..5).flat_map(|i| window("n1", t1, i, &[])).collect();
    publish_all(port, &more);
    let (status, err) = exit_of(p);
    assert!(status.success(), "{err}");
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        text,
        format!("timestamp,sys.b\n{},-0.5\n{},0\n", t1 + 10.0, t1 + 20.0),
        "{err}"
    );
}

#[test]
fn several_streams_are_refused_unless_one_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let port = broker();
    let cfg = config(dir.path(), port, "");
    let out = dir.path().join("rec.csv");
    let t0 = t0();
    let both = |t0: f64| -> Vec<(String, Vec<u8>)> {
        (0..4)
            .flat_map(|i| {
                let mut w = window("n1", t0, i, &[]);
                w.extend(window("n2", t0, i, &[("c", 1.0)]));
                w
            })
            .collect()
    };
    // `--force` over a file: a recording that fails leaves it as it was (a review found it
    // truncated at the start, then removed), and no temporary file behind.
    std::fs::write(&out, "an earlier recording\n").unwrap();
    let p = started(&cfg, &out, &["--force", "--discover-secs", "0.3"]);
    publish_all(port, &both(t0));
    let (status, err) = exit_of(p);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("2 streams sent metrics in discovery: \"n1\" (2 metrics), \"n2\" (3 metrics)")
            && err.contains("--stream NAME"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "an earlier recording\n"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        2,
        "cfg and out only"
    );
    let p = started(
        &cfg,
        &out,
        &[
            "--force",
            "--discover-secs",
            "0.3",
            "--stream",
            "n2",
            "--frames",
            "1",
        ],
    );
    publish_all(port, &both(t0 + 1000.0));
    let (status, err) = exit_of(p);
    assert!(status.success(), "{err}");
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.starts_with("timestamp,sys.a,sys.b,sys.c\n"), "{text}");
    assert!(err.contains("other streams, not recorded: \"n1\""), "{err}");
}

#[test]
fn an_interrupted_recording_keeps_its_rows_whole() {
    let dir = tempfile::tempdir().unwrap();
    let port = broker();
    let cfg = config(dir.path(), port, "");
    let out = dir.path().join("rec.csv");
    let t0 = t0();
    let p = started(
        &cfg,
        &out,
        &["--discover-secs", "0.3", "--progress-secs", "0.2"],
    );
    publish_all(
        port,
        &(0..6)
            .flat_map(|i| window("n1", t0, i, &[]))
            .collect::<Vec<_>>(),
    );
    // Windows 0..=3 close by the data (lateness 1), and are on disk before the stop.
    wait_for("4 rows", || p.stderr().contains("4 rows written"));
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 5);
    p.signal("INT");
    let (status, err) = exit_of(p);
    assert!(status.success(), "{err}");
    // The stop closes the open windows 4 and 5, as the agent's stop does.
    assert!(err.contains("done (signal): 6 rows written"), "{err}");
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.ends_with('\n'), "{text}");
    assert_eq!(text.lines().count(), 7, "{text}");
    assert!(text.lines().all(|l| l.split(',').count() == 3), "{text}");
}

#[test]
fn a_bad_configuration_exits_78_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rec.csv");
    for (extra, key) in [
        ("[assemble]\nwindow_secs = -1\n", "window_secs"),
        ("[mqtt]\nport = 0\n", "mqtt.port"),
        ("[agent]\nformat = \"raw\"\n", "agent.format"),
    ] {
        let cfg = dir.path().join("bad.toml");
        let text = if extra.starts_with("[assemble]") {
            format!("[mqtt]\nbroker = \"external\"\nport = 1\n{extra}")
        } else {
            extra.to_string()
        };
        std::fs::write(&cfg, text).unwrap();
        let (code, _, err) = run(darkwatch_within(30)
            .args(["record", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(&out));
        assert_eq!(code, 78, "{extra}: {err}");
        assert!(err.contains(key), "{extra}: {err}");
        assert!(!out.exists(), "{extra}: no file is left");
    }
}
