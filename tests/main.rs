//! Integration tests: the real binary on real files, each in its own temp dir.

mod agent;
mod alertmanager;
mod deploy;
mod input;
mod sae_cli;
mod util;

use util::{darkwatch, darkwatch_within, labels, quick_config, repo, run, synthetic_csv};

fn anomalies() -> Vec<usize> {
    (700..720).chain(900..905).collect()
}

/// `darkwatch replay` of `test` with `labels` through `model`, plus `extra` arguments.
fn replay_with<S: AsRef<std::ffi::OsStr>>(
    model: &std::path::Path,
    test: &std::path::Path,
    labels: &std::path::Path,
    extra: &[S],
) -> (i32, String, String) {
    run(darkwatch()
        .args(["replay", "--model"])
        .arg(model)
        .arg("--input")
        .arg(test)
        .arg("--labels")
        .arg(labels)
        .args(extra))
}

/// Trains a quick model on synthetic data and returns (tempdir, model dir, test csv, labels).
fn trained() -> (
    tempfile::TempDir,
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.csv");
    synthetic_csv(&train, 1500, 8, &[]);
    let test = dir.path().join("test.csv");
    synthetic_csv(&test, 1000, 8, &anomalies());
    let lab = dir.path().join("labels.txt");
    labels(&lab, 1000, &anomalies());
    let model = dir.path().join("model");
    let (code, out, err) = run(darkwatch()
        .args(["train", "--input"])
        .arg(&train)
        .arg("--out")
        .arg(&model)
        .arg("--config")
        .arg(quick_config(dir.path())));
    assert_eq!(code, 0, "train failed: {out}\n{err}");
    (dir, model, test, lab)
}

#[test]
fn train_then_replay_detects_injected_anomalies_and_writes_scores() {
    let (dir, model, test, lab) = trained();
    let scores = dir.path().join("scores.csv");
    let (code, out, err) = replay_with(
        &model,
        &test,
        &lab,
        &[std::ffi::OsStr::new("--out"), scores.as_os_str()],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("AUROC"), "{out}");
    assert!(out.contains("point-adjusted"), "{out}");
    // The shifted rows are far from anything seen in training: near-perfect AUROC.
    let auroc = auroc_of(&out);
    assert!(auroc > 0.95, "AUROC {auroc}\n{out}");
    let csv = std::fs::read_to_string(&scores).unwrap();
    let mut lines = csv.lines();
    let header = lines.next().unwrap();
    assert!(
        header.starts_with("frame,timestamp,score,threshold,alarm,frame_score,top1_feature"),
        "{header}"
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 1000);
    // Frame 700 is an anomaly on m00: the top contributions name it.
    let f700: Vec<&str> = rows[700].split(',').collect();
    assert_eq!(f700[0], "700");
    assert_eq!(f700[1], (1_700_000_000 + 60 * 700).to_string());
    let named: Vec<&str> = [6, 8, 10].iter().map(|&i| f700[i]).collect();
    assert!(named.contains(&"m00"), "{}", rows[700]);
}

#[test]
fn a_finite_value_too_large_to_scale_still_alarms_and_names_its_feature() {
    // 3e38 is a valid f32, but scaled by a training spread of about 0.5 it overflows.
    let (dir, model, test, lab) = trained();
    let csv = std::fs::read_to_string(&test).unwrap();
    let huge = dir.path().join("huge.csv");
    let edited: Vec<String> = csv
        .lines()
        .enumerate()
        .map(|(i, line)| {
            let mut cells: Vec<&str> = line.split(',').collect();
            if (501..=506).contains(&i) {
                cells[4] = if i % 2 == 0 { "3e38" } else { "-1e30" };
            }
            cells.join(",")
        })
        .collect();
    std::fs::write(&huge, edited.join("\n") + "\n").unwrap();
    let (scores, events) = (dir.path().join("s.csv"), dir.path().join("e.jsonl"));
    let (code, out, err) = replay_with(
        &model,
        &huge,
        &lab,
        &[
            std::ffi::OsStr::new("--out"),
            scores.as_os_str(),
            std::ffi::OsStr::new("--events"),
            events.as_os_str(),
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let rows: Vec<Vec<String>> = std::fs::read_to_string(&scores)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(String::from).collect())
        .collect();
    for row in &rows[500..506] {
        let (score, threshold) = (
            row[2].parse::<f64>().unwrap(),
            row[3].parse::<f64>().unwrap(),
        );
        assert!(score.is_finite() && score > 100.0 * threshold, "{row:?}");
        assert_eq!(row[6], "m03", "{row:?}");
    }
    assert!(
        rows[502..506].iter().any(|r| r[4] == "1"),
        "no alarm: {:?}",
        &rows[500..506]
    );
    let events = std::fs::read_to_string(&events).unwrap();
    let fired = events
        .lines()
        .find(|l| l.contains("m03") && l.contains("firing"))
        .unwrap_or_else(|| panic!("no firing event names m03:\n{events}"));
    assert!(
        !fired.contains("\"score\":null") && !fired.contains("\"peak_score\":null"),
        "{fired}"
    );
    // The version `inspect` and /metrics show: 0 until an online retrain is adopted.
    assert!(fired.contains("\"model_version\":\"0\""), "{fired}");
}

#[test]
fn replay_refuses_outputs_that_would_overwrite_its_inputs_or_each_other() {
    let (dir, model, test, lab) = trained();
    let before = std::fs::read(&test).unwrap();
    let labels_before = std::fs::read(&lab).unwrap();
    let other = dir.path().join("other.csv");
    let cases: Vec<(&str, std::path::PathBuf, Vec<std::ffi::OsString>)> = vec![
        (
            "--input",
            test.clone(),
            vec!["--out".into(), test.clone().into()],
        ),
        (
            "--labels",
            lab.clone(),
            vec!["--events".into(), lab.clone().into()],
        ),
        (
            "model folder",
            model.join("model.json"),
            vec!["--out".into(), model.join("model.json").into()],
        ),
        (
            "--out output",
            other.clone(),
            vec![
                "--out".into(),
                other.clone().into(),
                "--events".into(),
                // The same file by another spelling.
                dir.path().join(".").join("other.csv").into(),
            ],
        ),
    ];
    for (what, victim, extra) in cases {
        let (code, out, err) = replay_with(&model, &test, &lab, &extra);
        assert_ne!(code, 0, "{what}: {out}");
        assert!(
            err.contains("would overwrite") && err.contains(what),
            "{what}: {err}"
        );
        assert!(!out.contains("AUROC"), "{what}: the replay ran: {out}");
        if victim != other {
            assert!(victim.exists(), "{what}: {} was removed", victim.display());
        }
    }
    assert_eq!(std::fs::read(&test).unwrap(), before);
    assert_eq!(std::fs::read(&lab).unwrap(), labels_before);
    assert!(!other.exists(), "nothing is written before the check");
    let (code, _, err) = run(darkwatch().args(["inspect"]).arg(&model));
    assert_eq!(code, 0, "the model must still load: {err}");
    // Other files beside the model, and devices such as /dev/null, are fine.
    let beside = model.join("scores.csv");
    let (code, out, err) = replay_with(
        &model,
        &test,
        &lab,
        &[
            std::ffi::OsStr::new("--out"),
            beside.as_os_str(),
            std::ffi::OsStr::new("--events"),
            std::ffi::OsStr::new("/dev/null"),
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(beside.exists());
    let (code, out, err) = replay_with(
        &model,
        &test,
        &lab,
        &["--out", "/dev/null", "--events", "/dev/null"],
    );
    assert_eq!(code, 0, "{out}\n{err}");
}

#[test]
fn training_on_too_few_rows_for_a_threshold_warns() {
    let dir = tempfile::tempdir().unwrap();
    let (small, big) = (dir.path().join("small.csv"), dir.path().join("big.csv"));
    synthetic_csv(&small, 300, 4, &[]);
    synthetic_csv(&big, 600, 4, &[]);
    let cfg = quick_config(dir.path());
    let train = |input: &std::path::Path, out: &str| {
        run(darkwatch()
            .args(["train", "--input"])
            .arg(input)
            .arg("--out")
            .arg(dir.path().join(out))
            .arg("--config")
            .arg(&cfg))
    };
    let (code, out, err) = train(&small, "small");
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("calibration: 30 held-out scores"), "{out}");
    assert!(
        err.contains("warning: no threshold can be calibrated on this model's 30 held-out scores")
            && err.contains("at least 50"),
        "{err}"
    );
    let (code, out, err) = train(&big, "big");
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("calibration: 60 held-out scores"), "{out}");
    // Where the threshold starts against the held-out scores: how often the model will
    // alert, which the loss does not say (a user read a quiet model as a broken one).
    let line = out
        .lines()
        .find(|l| l.starts_with("threshold: spot (risk_q 0.0001) starts at "))
        .unwrap_or_else(|| panic!("{out}"));
    let (above, largest) = (
        line.split(": ")
            .nth(2)
            .and_then(|r| r.split(" of 60 held-out scores above it").next()),
        line.split("(the largest ")
            .nth(1)
            .and_then(|r| r.split(')').next()),
    );
    assert!(
        above.is_some_and(|n| n.parse::<usize>().is_ok_and(|n| n <= 1)),
        "{line}"
    );
    assert!(largest.is_some_and(|l| l.parse::<f64>().is_ok()), "{line}");
    // 60 held-out scores give a peak or two, under min_peaks: the start is the empirical
    // fallback, and the line says so (an operator read it as a fitted tail).
    assert!(
        line.contains(
            "; that is the held-out scores' empirical 1 - risk_q quantile until the stream adds "
        ) && line.ends_with("(min_peaks 50), then the GPD tail's"),
        "{line}"
    );
    assert!(
        !err.contains("warning") && !err.contains("replaced"),
        "{err}"
    );
    // A folder that holds a model is not overwritten: its ONNX graph (exported from the
    // old model) would stay beside the new model.json, and `--backend onnx` would run the
    // old network with the new scaler.
    let small_dir = dir.path().join("small");
    std::fs::write(small_dir.join("model.onnx"), b"old graph").unwrap();
    let before = std::fs::read(small_dir.join("model.json")).unwrap();
    let (code, _, err) = train(&big, "small");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("holds a model already (model.json, model.safetensors, model.onnx)")
            && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read(small_dir.join("model.json")).unwrap(), before);
    // With --force it is replaced, and the old graph goes with it.
    let (code, out, err) = run(darkwatch()
        .args(["train", "--force", "--input"])
        .arg(&big)
        .arg("--out")
        .arg(&small_dir)
        .arg("--config")
        .arg(&cfg));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("calibration: 60 held-out scores"), "{out}");
    assert!(
        err.contains("removed") && err.contains("model.onnx"),
        "{err}"
    );
    assert!(!small_dir.join("model.onnx").exists());
    assert_ne!(std::fs::read(small_dir.join("model.json")).unwrap(), before);
}

#[test]
fn training_is_reproducible_from_the_seed() {
    let (dir, model, _, _) = trained();
    let again = dir.path().join("again");
    let (code, _, err) = run(darkwatch()
        .args(["train", "--input"])
        .arg(dir.path().join("train.csv"))
        .arg("--out")
        .arg(&again)
        .arg("--config")
        .arg(dir.path().join("quick.toml")));
    assert_eq!(code, 0, "{err}");
    let a = std::fs::read(model.join("model.safetensors")).unwrap();
    let b = std::fs::read(again.join("model.safetensors")).unwrap();
    assert_eq!(
        a, b,
        "same data, config and seed must give the same weights"
    );
}

#[test]
fn inspect_prints_metadata() {
    let (_dir, model, _, _) = trained();
    let (code, out, err) = run(darkwatch().arg("inspect").arg(&model));
    assert_eq!(code, 0, "{err}");
    for want in [
        "dense autoencoder",
        "wnll",
        "m00",
        "calibrated",
        "sha256",
        "seed 0",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    let (code, out, _) = run(darkwatch().arg("inspect").arg(&model).arg("--json"));
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["format_version"], 1);
}

/// Published SAE checkpoints (no dark-matter head yet) are described, with the command
/// that fits a head; a folder that is none of darkwatch's kinds says what was expected.
#[test]
fn inspect_describes_published_sae_checkpoints() {
    for (dir, format) in [
        ("tests/data/sae/saelens_topk_v6/checkpoint", "SaeLens"),
        // A sparsify run folder with one layer.
        ("tests/data/sae/sparsify_topk_f32/checkpoint", "Sparsify"),
    ] {
        let (code, out, err) = run(darkwatch().arg("inspect").arg(repo(dir)));
        assert_eq!(code, 0, "{dir}: {err}");
        for want in [
            "no dark-matter head",
            format,
            "d_in 16, 64 latents",
            "sae-head --sae",
        ] {
            assert!(out.contains(want), "{dir}: missing {want:?} in\n{out}");
        }
    }
    let (code, _, err) = run(darkwatch().arg("inspect").arg(repo("tests/data/sae")));
    assert_eq!(code, 1);
    assert!(err.contains("not a darkwatch model directory"), "{err}");
}

#[test]
fn corrupt_or_truncated_model_is_refused_with_file_named() {
    let (_dir, model, test, _) = trained();
    let weights = model.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x55;
    std::fs::write(&weights, &bytes).unwrap();
    let (code, _, err) = run(darkwatch()
        .args(["replay", "--model"])
        .arg(&model)
        .arg("--input")
        .arg(&test));
    assert_eq!(code, 1);
    assert!(
        err.contains("model.safetensors") && err.contains("checksum"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let meta = model.join("model.json");
    let text = std::fs::read_to_string(&meta).unwrap();
    std::fs::write(&meta, &text[..text.len() / 2]).unwrap();
    let (code, _, err) = run(darkwatch().arg("inspect").arg(&model));
    assert_eq!(code, 1);
    assert!(err.contains("model.json"), "{err}");
}

/// A copy of the bundled PAE's directory in `dir`, to edit.
fn bundled_copy(dir: &std::path::Path) -> std::path::PathBuf {
    let model = dir.join("model");
    std::fs::create_dir(&model).unwrap();
    for f in ["model.json", "model.safetensors"] {
        std::fs::copy(repo("models/smd-machine-1-6").join(f), model.join(f)).unwrap();
    }
    model
}

/// Edits `model`'s `model.json` with `edit`, then runs `darkwatch inspect` on it.
fn inspect_edited(
    model: &std::path::Path,
    edit: impl FnOnce(&mut serde_json::Value),
) -> (i32, String, String) {
    let path = model.join("model.json");
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut meta);
    std::fs::write(&path, serde_json::to_string(&meta).unwrap()).unwrap();
    run(darkwatch().arg("inspect").arg(model))
}

/// Below 20 inputs `train` builds an ensemble of five by default; `[model] members` sets
/// another count, and a model.json whose member count does not fit its widths is refused.
#[test]
fn small_inputs_train_an_ensemble_that_inspect_names_and_load_checks() {
    let (dir, model, test, _) = trained();
    let (code, out, err) = run(darkwatch().arg("inspect").arg(&model));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("ensemble of 5 (scores averaged), widths [8, 20, 80]"),
        "{out}"
    );
    let (code, out, err) = run(darkwatch()
        .args(["replay", "--model"])
        .arg(&model)
        .arg("--input")
        .arg(&test));
    assert_eq!(code, 0, "{out}\n{err}");

    // One network when asked for.
    let single = dir.path().join("single");
    let cfg = dir.path().join("single.toml");
    std::fs::write(
        &cfg,
        "[model]\nmembers = 1\n[train]\nepochs_max = 3\nbatch_size = 64\n",
    )
    .unwrap();
    let (code, out, err) = run(darkwatch()
        .args(["train", "--input"])
        .arg(dir.path().join("train.csv"))
        .arg("--out")
        .arg(&single)
        .arg("--config")
        .arg(&cfg));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(!out.contains("ensemble"), "{out}");
    let (_, out, _) = run(darkwatch().arg("inspect").arg(&single));
    assert!(
        out.contains("widths [8, 4, 16]") && !out.contains("ensemble"),
        "{out}"
    );

    // A member count the config may not hold.
    std::fs::write(&cfg, "[model]\nmembers = 17\n").unwrap();
    let (code, _, err) = run(darkwatch().args(["validate", "--config"]).arg(&cfg));
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("model.members") && err.contains("at most 16"),
        "{err}"
    );

    // Members whose merged network would not fit in memory: refused before allocating,
    // as a configuration error (78) naming the file and the key.
    std::fs::write(&cfg, "[model]\nmembers = 16\nhidden_sizes = [4096, 4096]\n").unwrap();
    let (code, _, err) = run(darkwatch()
        .args(["train", "--input"])
        .arg(dir.path().join("train.csv"))
        .arg("--out")
        .arg(dir.path().join("huge"))
        .arg("--config")
        .arg(&cfg));
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("single.toml: key `model.members`")
            && err.contains("use fewer members")
            && !err.contains("  "),
        "{err}"
    );
    // One network that large: the cap held only for ensembles, and this aborted the
    // process (`memory allocation of 40000000000 bytes failed`, SIGABRT).
    let (code, _, err) = run(darkwatch()
        .args(["train", "--input"])
        .arg(dir.path().join("train.csv"))
        .arg("--out")
        .arg(dir.path().join("huge"))
        .env("DARKWATCH__MODEL__MEMBERS", "1")
        .env("DARKWATCH__MODEL__HIDDEN_SIZES", "100000,100000"));
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("(with environment DARKWATCH__MODEL__HIDDEN_SIZES, DARKWATCH__MODEL__MEMBERS): key `model.hidden_sizes`")
            && err.contains("narrower hidden_sizes"),
        "{err}"
    );
    assert!(!dir.path().join("huge").join("model.json").exists());
    // No held-out rows: the "held-out" calibration scores would be training rows.
    let (code, _, err) = run(darkwatch()
        .args(["train", "--input"])
        .arg(dir.path().join("train.csv"))
        .arg("--out")
        .arg(dir.path().join("in-sample"))
        .env("DARKWATCH__TRAIN__VALIDATION_FRACTION", "0"));
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("key `train.validation_fraction`"), "{err}");

    // model.json saying 3 members of a network built for 5, or 0 members.
    let (code, out, err) = inspect_edited(&model, |meta| {
        meta["architecture"]["members"] = serde_json::json!(3);
    });
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("architecture.layer_widths") && err.contains("should be 48 for 3 members"),
        "{err}"
    );
    let (code, out, err) = inspect_edited(&model, |meta| {
        meta["architecture"]["members"] = serde_json::json!(1);
    });
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("should be 16 for a probabilistic model of 8 features (80 is 5 members'"),
        "{err}"
    );
    let (code, out, err) = inspect_edited(&model, |meta| {
        meta["architecture"]["members"] = serde_json::json!(0);
    });
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("architecture.members"), "{err}");
    // A baseline value past f32's range (read as infinite) would make every score NaN.
    let (code, out, err) = inspect_edited(&model, |meta| {
        meta["architecture"]["members"] = serde_json::json!(5);
        meta["log_variance_baseline"][2] = serde_json::json!(1e39);
    });
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("log_variance_baseline")
            && err.contains("value 2 is inf, not a finite number"),
        "{err}"
    );
}

#[test]
fn a_variance_baseline_of_the_wrong_length_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = bundled_copy(dir.path());
    let (code, out, err) = inspect_edited(&model, |meta| {
        meta["log_variance_baseline"]
            .as_array_mut()
            .expect("the bundled PAE stores a baseline")
            .push(serde_json::json!(0.0));
    });
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("log_variance_baseline") && err.contains("has 115 values"),
        "{err}"
    );
    // A scale that is not positive: the message names the entry and its value.
    let (code, out, err) = inspect_edited(&model, |meta| {
        meta["log_variance_baseline"].as_array_mut().unwrap().pop();
        meta["scaler"]["scale"][3] = serde_json::json!(-0.5);
    });
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("scaler.scale") && err.contains("entry 3 is -0.5, not positive"),
        "{err}"
    );
}

#[test]
fn model_for_other_feature_count_is_refused() {
    let (dir, model, _, _) = trained();
    let narrow = dir.path().join("narrow.csv");
    synthetic_csv(&narrow, 50, 7, &[]);
    let replay = |input: &std::path::Path| {
        run(darkwatch()
            .args(["replay", "--model"])
            .arg(&model)
            .arg("--input")
            .arg(input))
    };
    let (code, _, err) = replay(&narrow);
    assert_eq!(code, 1);
    assert!(
        err.contains("narrow.csv") && err.contains("7 features") && err.contains("8"),
        "{err}"
    );
    // Extra columns are fine when every model feature is there by name (live exports
    // often carry more metrics than a model uses).
    let wide = dir.path().join("wide.csv");
    synthetic_csv(&wide, 50, 9, &[]);
    let (code, out, err) = replay(&wide);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("50 frames scored"), "{out}");
}

#[test]
fn label_file_of_wrong_length_is_refused() {
    let (dir, model, test, _) = trained();
    let short = dir.path().join("short.txt");
    labels(&short, 999, &[]);
    let (code, _, err) = replay_with(&model, &test, &short, &[] as &[&str]);
    assert_eq!(code, 1);
    assert!(
        err.contains("short.txt") && err.contains("999") && err.contains("1000"),
        "{err}"
    );
}

#[test]
fn bad_input_files_give_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("text.csv", b"a,b\n1,2\n3,abc\n".to_vec(), "line 3"),
        // Gaps are filled, but not a column that holds no value at all.
        (
            "gaps.csv",
            b"a,b\n1,\n2,NaN\n".to_vec(),
            "column \"b\" has no values",
        ),
        ("short.csv", b"a,b\n1,2\n3\n".to_vec(), "line 3"),
        ("empty.csv", Vec::new(), "empty"),
        (
            "trunc.npy",
            {
                let mut v = std::fs::read(repo("tests/data/smd/machine-1-6_test.npy")).unwrap();
                v.truncate(5000);
                v
            },
            "truncated",
        ),
    ];
    for (name, bytes, want) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let (code, out, err) = run(darkwatch()
            .args(["train", "--input"])
            .arg(&path)
            .arg("--out")
            .arg(dir.path().join("m")));
        assert_eq!(code, 1, "{name}: {out}{err}");
        assert!(
            err.contains(name) && err.to_lowercase().contains(want),
            "{name}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{name}: not one line: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// `src` (a CSV) with some cells changed: `edit(line index, cells)`, line 0 the header.
fn edited_csv(
    src: &std::path::Path,
    dst: &std::path::Path,
    edit: impl Fn(usize, &mut Vec<String>),
) {
    let text = std::fs::read_to_string(src).unwrap();
    let lines: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, line)| {
            let mut cells: Vec<String> = line.split(',').map(String::from).collect();
            edit(i, &mut cells);
            cells.join(",")
        })
        .collect();
    std::fs::write(dst, lines.join("\n") + "\n").unwrap();
}

/// Telemetry exports have gaps: one empty or NaN cell refused the whole file. Gaps take the
/// column's last value, one warning counts them per column, and no row is dropped, so the
/// labels still align (the anomalies are still found where they are labelled).
#[test]
fn replay_fills_csv_gaps_with_the_last_value_and_keeps_every_row() {
    let (dir, model, test, lab) = trained();
    let gappy = dir.path().join("gappy.csv");
    // Columns: timestamp, m00 .. m07. Line 1 is row 0.
    edited_csv(&test, &gappy, |i, cells| match i {
        1 => cells[3] = String::new(),
        10 | 11 => cells[2] = "NaN".into(),
        500 => cells[3] = "inf".into(),
        600 => cells[8] = "null".into(),
        _ => {}
    });
    let scores = dir.path().join("s.csv");
    let (code, out, err) = replay_with(
        &model,
        &gappy,
        &lab,
        &[std::ffi::OsStr::new("--out"), scores.as_os_str()],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("5 empty, NaN or Inf cells in 3 of 8 columns (m01: 2, m02: 2, m07: 1)"),
        "{err}"
    );
    assert_eq!(err.matches("NaN or Inf cells").count(), 1, "{err}");
    assert!(out.contains("1000 frames scored"), "{out}");
    assert!(auroc_of(&out) > 0.95, "{out}");
    assert_eq!(
        std::fs::read_to_string(&scores).unwrap().lines().count(),
        1001
    );
    // A file mostly of gaps, or a column without any value, is refused.
    let holes = dir.path().join("holes.csv");
    edited_csv(&test, &holes, |i, cells| {
        if i > 0 && i % 4 != 1 {
            for c in &mut cells[1..7] {
                c.clear();
            }
        }
    });
    let (code, _, err) = replay_with(&model, &holes, &lab, &[] as &[&str]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("4500 of 8000 cells (56 %) are empty, NaN or Inf"),
        "{err}"
    );
    let empty = dir.path().join("empty_col.csv");
    edited_csv(&test, &empty, |i, cells| {
        if i > 0 {
            cells[5].clear();
        }
    });
    let (code, _, err) = replay_with(&model, &empty, &lab, &[] as &[&str]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("column \"m04\" has no values"), "{err}");
}

/// `train` fills gaps as replay does (dropping the rows would join their neighbours into
/// one lag window), says how many, and logs epoch lines when stderr is no terminal (a
/// pipe, as here): the progress bar draws nothing there.
#[test]
fn train_fills_gaps_and_logs_epochs_without_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let clean = dir.path().join("clean.csv");
    synthetic_csv(&clean, 600, 4, &[]);
    let input = dir.path().join("gappy.csv");
    edited_csv(&clean, &input, |i, cells| {
        if i % 50 == 3 {
            cells[2] = String::new();
        }
    });
    let (code, out, err) = run(darkwatch()
        .args(["train", "--input"])
        .arg(&input)
        .arg("--out")
        .arg(dir.path().join("m"))
        .arg("--config")
        .arg(quick_config(dir.path())));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("warning: ")
            && err.contains("12 empty, NaN or Inf cells in 1 of 4 columns (m01: 12)"),
        "{err}"
    );
    assert!(err.contains("all 600 rows kept"), "{err}");
    // The first epoch at once, then at most one line per 5 s, and the last: here a quick
    // run (of 4 features: an ensemble of 5), so about the first and the last.
    let epochs: Vec<&str> = err.lines().filter(|l| l.contains(": epoch ")).collect();
    assert!(
        epochs.first().is_some_and(|l| l
            .starts_with("darkwatch: epoch 1/15 (member 1 of 5): train loss ")
            && l.contains("validation loss")
            && l.ends_with(" s")),
        "{err}"
    );
    assert!(epochs.len() >= 2 && epochs.len() < 15, "{err}");
    assert!(epochs.last().unwrap().contains("(member 5 of 5)"), "{err}");
}

/// Plain ISO 8601 dates and date-times without a zone were refused as timestamps; rows out
/// of time order were taken silently, though smoothing and lag windows assume the order.
#[test]
fn replay_takes_iso_dates_and_warns_once_about_rows_out_of_time_order() {
    let (dir, model, test, lab) = trained();
    // One row a day from 2024-03-01 (1709251200), a few written as date-times.
    let dated = dir.path().join("dated.csv");
    edited_csv(&test, &dated, |i, cells| {
        if i > 0 {
            let day = 1_709_251_200 + 86_400 * (i as i64 - 1);
            let (y, m, d) = civil(day.div_euclid(86_400));
            cells[0] = match i % 3 {
                0 => format!("{y:04}-{m:02}-{d:02}"),
                1 => format!("{y:04}-{m:02}-{d:02} 00:00:00"),
                _ => format!("{y:04}-{m:02}-{d:02}T00:00:00Z"),
            };
        }
    });
    let scores = dir.path().join("s.csv");
    let (code, out, err) = replay_with(
        &model,
        &dated,
        &lab,
        &[std::ffi::OsStr::new("--out"), scores.as_os_str()],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(!err.contains("time order"), "{err}");
    let csv = std::fs::read_to_string(&scores).unwrap();
    let stamps: Vec<&str> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap())
        .collect();
    assert_eq!(stamps[0], "1709251200");
    assert_eq!(stamps[999], (1_709_251_200 + 86_400 * 999).to_string());
    // Two rows swapped (file lines 102 and 103) and one repeated (line 302): one warning.
    let unordered = dir.path().join("unordered.csv");
    let lines: Vec<String> = std::fs::read_to_string(&test)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    edited_csv(&test, &unordered, |i, cells| {
        if i == 101 || i == 102 {
            let other = if i == 101 { 102 } else { 101 };
            cells[0] = lines[other].split(',').next().unwrap().to_string();
        }
        if i == 301 {
            cells[0] = lines[300].split(',').next().unwrap().to_string();
        }
    });
    let (code, out, err) = replay_with(&model, &unordered, &lab, &[] as &[&str]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("timestamps are not in time order: 1 row goes back in time (the first at line 103), and 1 row repeats the time of the row before (the first at line 302)"),
        "{err}"
    );
    assert_eq!(err.matches("time order").count(), 1, "{err}");
    assert!(out.contains("1000 frames scored"), "{out}");
}

/// Year, month and day of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A CSV column auto-detected as the timestamps is no feature: an info line names it.
#[test]
fn train_says_which_column_it_took_as_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("t.csv");
    let mut csv = String::from("a,time,b\n");
    for i in 0..300 {
        let x = (i as f32 * 0.1).sin();
        csv.push_str(&format!("{x},{},{}\n", 1_700_000_000 + 60 * i, x * 2.0));
    }
    std::fs::write(&input, csv).unwrap();
    let (code, out, err) = run(darkwatch()
        .args(["train", "--input"])
        .arg(&input)
        .arg("--out")
        .arg(dir.path().join("m"))
        .env("RUST_LOG", "info")
        .env("DARKWATCH__TRAIN__EPOCHS_MAX", "2"));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("column \"time\" (column 2) taken as the timestamps, not as a feature"),
        "{err}"
    );
    assert!(err.contains("(300 rows × 2 features)"), "{err}");
}

/// A train that fails on its input takes away the model folder it made (and the parents it
/// made for it), and leaves alone an empty folder that was there before.
#[test]
fn a_failed_train_leaves_no_empty_model_folder_behind() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bad.csv");
    std::fs::write(&input, "a,host\n1,node01\n2,node02\n").unwrap();
    for (folder, made_before) in [("new", false), ("old", true), ("a/b/c", false)] {
        let out = dir.path().join(folder);
        if made_before {
            std::fs::create_dir(&out).unwrap();
        }
        let (code, _, err) = run(darkwatch()
            .args(["train", "--input"])
            .arg(&input)
            .arg("--out")
            .arg(&out));
        assert_ne!(code, 0, "{err}");
        assert!(err.contains("node01"), "{err}");
        assert_eq!(out.is_dir(), made_before, "{folder}: {err}");
    }
    // The parents it made went too.
    assert!(!dir.path().join("a").exists());
}

/// A model folder that is not there is said as such, not as a missing `model.json`.
#[test]
fn a_missing_model_folder_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nonexist");
    let input = dir.path().join("x.csv");
    std::fs::write(&input, "a\n1\n").unwrap();
    let (code, _, err) = run(darkwatch().arg("inspect").arg(&missing));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no model folder at") && err.contains("nonexist"),
        "{err}"
    );
    assert!(!err.contains("model.json"), "{err}");
    let (code, _, err) = run(darkwatch()
        .args(["replay", "--model"])
        .arg(&missing)
        .arg("--input")
        .arg(&input));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no model folder at"), "{err}");
    assert!(!err.contains("No such file"), "{err}");
}

/// `--config <(…)`: a pipe is no regular file, but it is readable.
#[test]
fn a_config_can_come_from_a_pipe() {
    use std::io::Write;
    let mut child = darkwatch()
        .args(["print-config", "--config", "/dev/stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"[train]\nepochs_max = 7\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("epochs_max = 7"), "{stdout}");
}

#[test]
fn validate_names_file_key_and_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[score]\nhead = \"wnll\"\ntop_contributions = 99\n").unwrap();
    let (code, _, err) = run(darkwatch().args(["validate", "--config"]).arg(&bad));
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("bad.toml") && err.contains("score.top_contributions"),
        "{err}"
    );

    std::fs::write(&bad, "[score]\nsmooth_frames = 0\n").unwrap();
    let (code, _, err) = run(darkwatch().args(["validate", "--config"]).arg(&bad));
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("score.smooth_frames") && err.contains("between 1 and 1024, got 0"),
        "{err}"
    );

    // The trial's subnode.toml had `{node}` taken literally; a placeholder subscribe does
    // not fill in is refused, naming it, as in alert_topic.
    std::fs::write(
        &bad,
        "[mqtt]\nsubscribe = [\"org/+/cluster/+/node/{host}/plugin/+/chnl/data/#\"]\n",
    )
    .unwrap();
    let (code, _, err) = run(darkwatch().args(["validate", "--config"]).arg(&bad));
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("mqtt.subscribe") && err.contains("`{host}`") && err.contains("{node}"),
        "{err}"
    );
    std::fs::write(&bad, "[examon]\nstream_key = [\"node\", \"node\"]\n").unwrap();
    let (code, _, err) = run(darkwatch().args(["validate", "--config"]).arg(&bad));
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("examon.stream_key"), "{err}");

    std::fs::write(&bad, "[pipline]\nx = 1\n").unwrap();
    let (code, _, err) = run(darkwatch().args(["validate", "--config"]).arg(&bad));
    assert_eq!(code, 78);
    assert!(err.contains("pipline"), "{err}");

    // The shipped file is valid; its model folder (/var/lib/darkwatch/model) is not here.
    let (code, out, err) = run(darkwatch()
        .args(["validate", "--config"])
        .arg(repo("config/darkwatch.toml"))
        .env(
            "DARKWATCH__AGENT__MODEL_DIR",
            repo("models/smd-machine-1-6"),
        ));
    assert_eq!(code, 0, "{out}{err}");
}

/// `[scores] topic_layout = "compact"` (`<org>/<cluster>/<plugin>/<node>/<metric>`) has a
/// level for org, cluster and node only: `validate` refuses it (78, naming the key and the
/// stream key) when `[examon] stream_key` names streams by another key, whose streams would
/// share topics, and takes it when the stream keys are among org, cluster and node.
#[test]
fn validate_refuses_compact_score_topics_for_a_stream_key_they_cannot_hold() {
    let dir = tempfile::tempdir().unwrap();
    let model = repo("models/smd-machine-1-6");
    let cfg = |stream_key: &str| {
        let p = dir.path().join("scores.toml");
        std::fs::write(
            &p,
            format!(
                "[agent]\nmodel_dir = \"{}\"\nformat = \"examon\"\n[examon]\nstream_key = {stream_key}\n[scores]\npublish = true\ntopic_layout = \"compact\"\n",
                model.display()
            ),
        )
        .unwrap();
        p
    };
    for (stream_key, other) in [
        (r#"["node", "plugin"]"#, "plugin"),
        (r#"["cluster", "node", "core"]"#, "core"),
        (r#""cpu""#, "cpu"),
    ] {
        let (code, out, err) = run(darkwatch()
            .args(["validate", "--config"])
            .arg(cfg(stream_key)));
        assert_eq!(code, 78, "{stream_key}: {out}{err}");
        assert!(
            err.contains("scores.toml: key `scores.topic_layout`: \"compact\" (<org>/<cluster>/<plugin>/<node>/<metric>) has no level for the stream key")
                && err.contains(&format!("stream key \"{other}\" of [examon] stream_key"))
                && err.contains("use \"legacy\""),
            "{stream_key}: {err}"
        );
    }
    for stream_key in [
        r#"["node"]"#,
        r#"["org", "cluster", "node"]"#,
        r#""cluster""#,
    ] {
        let (code, out, err) = run(darkwatch()
            .args(["validate", "--config"])
            .arg(cfg(stream_key)));
        assert_eq!(code, 0, "{stream_key}: {out}{err}");
        assert!(!err.contains("topic_layout"), "{stream_key}: {err}");
    }
}

/// `validate --agent` checks what `run` checks before it is ready: the model loads on its
/// backend, its thresholds calibrate and the state folder takes files; plain `validate`
/// reads the file and loads the model on the native kernels.
#[test]
fn validate_agent_loads_the_model_and_checks_the_state_folder() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    let model = repo("models/smd-machine-1-6");
    let good = cfg(
        "good.toml",
        &format!(
            "[agent]\nmodel_dir = \"{}\"\n[retrain]\nenabled = true\nstate_dir = \"{}\"\n",
            model.display(),
            dir.path().join("state").display()
        ),
    );
    let (code, out, err) = run(darkwatch()
        .args(["validate", "--agent", "--config"])
        .arg(&good));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("loads and its thresholds calibrate") && out.contains("can take checkpoints"),
        "{out}"
    );
    // Nothing written: a running agent's state folder is not touched by a check.
    assert!(!dir.path().join("state").exists());

    let missing = cfg(
        "missing.toml",
        &format!(
            "[agent]\nmodel_dir = \"{}\"\n",
            dir.path().join("nowhere").display()
        ),
    );
    for agent in [&[][..], &["--agent"]] {
        let (code, _, err) = run(darkwatch()
            .arg("validate")
            .args(agent)
            .arg("--config")
            .arg(&missing));
        assert_eq!(code, 78, "{agent:?}: {err}");
        assert!(err.contains("nowhere"), "{err}");
    }

    // A threshold the model's held-out scores cannot calibrate.
    let spot = cfg(
        "spot.toml",
        &format!(
            "[agent]\nmodel_dir = \"{}\"\n[threshold]\nkind = \"dspot\"\ndspot_depth = 100000\n",
            model.display()
        ),
    );
    let (code, out, err) = run(darkwatch()
        .args(["validate", "--agent", "--config"])
        .arg(&spot));
    assert_eq!(code, 78, "{out}");
    assert!(
        err.contains("key `threshold.dspot_depth`") && err.contains("scores"),
        "{err}"
    );

    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let state = cfg(
        "state.toml",
        &format!(
            "[agent]\nmodel_dir = \"{}\"\n[retrain]\nenabled = true\nstate_dir = \"{}\"\n",
            model.display(),
            file.display()
        ),
    );
    let (code, _, err) = run(darkwatch()
        .args(["validate", "--agent", "--config"])
        .arg(&state));
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("key `retrain.state_dir`"), "{err}");
    // Plain validate loads the model and leaves the state folder to `--agent`.
    let (code, out, err) = run(darkwatch().args(["validate", "--config"]).arg(&state));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("loads"), "{out}");
}

/// A `[spool] dir` or `[retrain] state_dir` that cannot be made or written is a
/// configuration error for `run` and `validate --agent`: exit 78 with the key. `validate
/// --agent` passed `/proc/nope`, and `run` then exited 1 ("cannot create the spool
/// directory"), so systemd restarted it every 5 s. A usable one passes, and the check
/// leaves nothing behind.
#[test]
fn an_unusable_spool_or_state_folder_exits_78_from_run_and_validate_agent() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let spool = dir.path().join("spool");
    let config = |name: &str, extra: &str| {
        let p = dir.path().join(name);
        std::fs::write(
            &p,
            format!(
                "[agent]\nmodel_dir = \"{}\"\n[mqtt]\nsubscribe = [\"org/+/cluster/+/node/+/plugin/+/chnl/data/#\"]\nport = 0\n[metrics]\nlisten = \"127.0.0.1:0\"\n{extra}",
                repo("models/smd-machine-1-6").display()
            ),
        )
        .unwrap();
        p
    };
    let cases = [
        ("[spool]\ndir = \"/proc/nope\"\n".to_string(), "spool.dir"),
        (
            format!("[spool]\ndir = \"{}\"\n", file.join("spool").display()),
            "spool.dir",
        ),
        (
            format!(
                "[spool]\ndir = \"{}\"\n[retrain]\nenabled = true\nstate_dir = \"/proc/nope\"\n",
                spool.display()
            ),
            "retrain.state_dir",
        ),
    ];
    for (i, (extra, key)) in cases.iter().enumerate() {
        let cfg = config(&format!("case{i}.toml"), extra);
        for args in [
            &["validate", "--agent", "--config"][..],
            &["run", "--config"],
        ] {
            // Under `timeout`: an agent that starts anyway must fail the test, not hang it.
            let (code, out, err) = run(darkwatch_within(60).args(args).arg(&cfg));
            let what = format!("{args:?} with {extra}");
            assert_eq!(code, 78, "{what}: {out}{err}");
            assert!(
                err.contains(&format!("key `{key}`")) && err.contains("cannot be made"),
                "{what}: {err}"
            );
            assert_eq!(err.trim().lines().count(), 1, "{what}: not one line: {err}");
        }
    }
    // Folders that are not there yet are made for the check, probed and removed again.
    let new = dir.path().join("new");
    let cfg = config(
        "good.toml",
        &format!(
            "[spool]\ndir = \"{}\"\n[retrain]\nenabled = true\nstate_dir = \"{}\"\n",
            new.join("deeper/spool").display(),
            new.join("state").display()
        ),
    );
    let (code, out, err) = run(darkwatch()
        .args(["validate", "--agent", "--config"])
        .arg(&cfg));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("can take the alert spool"), "{out}");
    assert!(!new.exists(), "the check left {} behind", new.display());
    // An existing folder keeps what it holds, and gets nothing more.
    std::fs::create_dir(&spool).unwrap();
    std::fs::write(spool.join("keep"), "x").unwrap();
    let cfg = config(
        "existing.toml",
        &format!("[spool]\ndir = \"{}\"\n", spool.display()),
    );
    let (code, out, err) = run(darkwatch()
        .args(["validate", "--agent", "--config"])
        .arg(&cfg));
    assert_eq!(code, 0, "{out}{err}");
    let names: Vec<_> = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["keep"]);
}

/// `validate --agent` checks what `run` takes once it starts: a `[metrics] listen` another
/// process holds and a `[spool] dir` another process has locked are each reported as a
/// note naming what is taken, and validate still exits 0: on a node where the agent runs it
/// holds both, and the README has validate run before a restart.
#[test]
fn validate_agent_reports_a_taken_metrics_port_and_a_locked_spool() {
    let dir = tempfile::tempdir().unwrap();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap();
    let spool = dir.path().join("spool");
    let config = |name: &str, listen: &str| {
        let p = dir.path().join(name);
        std::fs::write(
            &p,
            format!(
                "[agent]\nmodel_dir = \"{}\"\n[mqtt]\nport = 0\n[spool]\ndir = \"{}\"\n[metrics]\nlisten = \"{listen}\"\n",
                repo("models/smd-machine-1-6").display(),
                spool.display()
            ),
        )
        .unwrap();
        p
    };
    let validate = |cfg: &std::path::Path| {
        run(darkwatch_within(60)
            .args(["validate", "--agent", "--config"])
            .arg(cfg))
    };
    // A port in use and a held spool are what the running agent holds while validate runs
    // before a restart: notes, and validate still passes (it judges the configuration).
    let port_cfg = config("port.toml", &taken.to_string());
    let (code, out, err) = validate(&port_cfg);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "note: [metrics] listen {taken} is in use (by the running agent? `run` cannot start while it is)"
        )),
        "{out}"
    );
    assert!(!out.contains("is free"), "{out}");
    drop(held);
    let (code, out, err) = validate(&port_cfg);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("is free"), "{out}");
    assert!(!out.contains("note:"), "{out}");

    let free = config("free.toml", "127.0.0.1:0");
    let holder = darkwatch::spool::Spool::open(darkwatch::spool::SpoolConfig {
        dir: spool.clone(),
        ..Default::default()
    })
    .unwrap();
    let (code, out, err) = validate(&free);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("note: another darkwatch process holds the spool"),
        "{out}"
    );
    assert!(!out.contains("no other agent holds it"), "{out}");
    drop(holder);
    let (code, out, err) = validate(&free);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("no other agent holds it"), "{out}");
    assert!(!out.contains("note:"), "{out}");
    // The check released the lock: a spool opens there now.
    darkwatch::spool::Spool::open(darkwatch::spool::SpoolConfig {
        dir: spool,
        ..Default::default()
    })
    .unwrap();
}

/// `[retrain] min_frames` too small for the held-out rows to calibrate a threshold is a
/// configuration error naming the least that works (the trial's `min_frames = 100` made
/// every retrain fail); with a larger `holdout_fraction` 100 is enough.
#[test]
fn retrain_min_frames_too_small_to_calibrate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = |name: &str, retrain: &str| {
        let p = dir.path().join(name);
        std::fs::write(
            &p,
            format!(
                "[agent]\nmodel_dir = \"{}\"\n[mqtt]\nport = 0\n[retrain]\nenabled = true\nstate_dir = \"{}\"\n{retrain}",
                repo("models/smd-machine-1-6").display(),
                dir.path().join("state").display()
            ),
        )
        .unwrap();
        p
    };
    let (code, _, err) = run(darkwatch()
        .args(["validate", "--config"])
        .arg(config("small.toml", "min_frames = 100\n")));
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("retrain.min_frames") && err.contains("must be at least 248"),
        "{err}"
    );
    for (name, retrain) in [
        ("least.toml", "min_frames = 248\n"),
        ("half.toml", "min_frames = 100\nholdout_fraction = 0.5\n"),
    ] {
        let (code, out, err) = run(darkwatch()
            .args(["validate", "--config"])
            .arg(config(name, retrain)));
        assert_eq!(code, 0, "{retrain}: {out}{err}");
    }
}

/// `inspect STATE_DIR` reads rejected retrains whose threshold was not finite (JSON
/// `null`): the trial's history showed `0 retrains` for two. A line that cannot be read
/// at all is counted and shown, not skipped.
#[test]
fn inspect_reads_null_threshold_retrains_and_reports_unreadable_lines() {
    let dir = tempfile::tempdir().unwrap();
    let line = |t: u64| {
        format!(
            "{{\"unix_secs\":{t},\"version\":1,\"model_id\":\"345ec66d0583\",\"trigger\":\"schedule (frames)\",\"rows\":109,\"seconds\":0.0016,\"gate\":{{\"accepted\":false,\"current_loss\":-8.7,\"candidate_loss\":-8.2,\"candidate_threshold\":null,\"reason\":\"candidate threshold could not be calibrated\"}}}}\n"
        )
    };
    std::fs::write(
        dir.path().join("history.jsonl"),
        format!("{}{}{{\"unix_secs\": torn", line(1), line(2)),
    )
    .unwrap();
    let (code, out, err) = run(darkwatch().arg("inspect").arg(dir.path()));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("history    2 retrains: 0 accepted, 2 rejected; 1 unreadable lines"),
        "{out}"
    );
    assert_eq!(out.matches("REJECTED").count(), 2, "{out}");
    assert!(out.contains("UNREADABLE line 3"), "{out}");
    let (code, out, err) = run(darkwatch().arg("inspect").arg(dir.path()).arg("--json"));
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["history"].as_array().unwrap().len(), 2, "{out}");
    assert!(
        v["history"][0]["gate"]["candidate_threshold"].is_null(),
        "{out}"
    );
    assert_eq!(v["history_unreadable"][0]["line"], 3, "{out}");
}

/// A model folder that is missing, empty or holds a broken model is a configuration error
/// for `run` and for `validate` with or without `--agent`: exit 78, which the systemd unit
/// does not restart on (it used to exit 1, and systemd restarted the agent forever), with
/// one line naming the key and the folder or file.
#[test]
fn missing_or_broken_model_exits_78_from_run_and_validate() {
    let dir = tempfile::tempdir().unwrap();
    let folder = |name: &str| {
        let p = dir.path().join(name);
        std::fs::create_dir(&p).unwrap();
        p
    };
    let empty = folder("empty");
    let bad_json = folder("bad-json");
    std::fs::write(bad_json.join("model.json"), "{ not json").unwrap();
    // The bundled model's metadata with weights that are not the ones it names.
    let bad_weights = folder("bad-weights");
    std::fs::copy(
        repo("models/smd-machine-1-6/model.json"),
        bad_weights.join("model.json"),
    )
    .unwrap();
    std::fs::write(bad_weights.join("model.safetensors"), b"not weights").unwrap();
    let cases = [
        (dir.path().join("nowhere"), "nowhere: no such folder"),
        (
            empty.clone(),
            "empty holds no model.json: not a model folder",
        ),
        (bad_json.clone(), "not valid model metadata"),
        (bad_weights.clone(), "checksum mismatch"),
    ];
    for (i, (model_dir, says)) in cases.iter().enumerate() {
        let cfg = dir.path().join(format!("case{i}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[agent]\nmodel_dir = \"{}\"\n[mqtt]\nsubscribe = [\"org/+/cluster/+/node/+/plugin/+/chnl/data/#\"]\nport = 0\n[spool]\ndir = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
                model_dir.display(),
                dir.path().join("spool").display()
            ),
        )
        .unwrap();
        for args in [
            &["validate", "--config"][..],
            &["validate", "--agent", "--config"],
            &["run", "--config"],
        ] {
            // Under `timeout`: an agent that starts anyway must fail the test, not hang it.
            let (code, out, err) = run(darkwatch_within(60).args(args).arg(&cfg));
            let what = format!("{args:?} with {}", model_dir.display());
            assert_eq!(code, 78, "{what}: {out}{err}");
            assert!(
                err.contains("agent.model_dir") && err.contains(says),
                "{what}: {err}"
            );
            assert_eq!(err.trim().lines().count(), 1, "{what}: not one line: {err}");
        }
    }
}

/// Settings the model cannot run with are configuration errors as well: an SAE folder with
/// other than raw input or with online retraining, a threshold the model's held-out scores
/// cannot calibrate (too few of them for the configured kind). `run` and `validate --agent` exit 78 with the key and what to change
/// (they exited 1, and systemd restarted the agent into the same refusal forever).
#[test]
fn settings_the_model_cannot_run_with_exit_78_from_run_and_validate_agent() {
    let dir = tempfile::tempdir().unwrap();
    let sae = dir.path().join("sae");
    util::sae::train_detector(&sae, 64, 8);
    let retrain = format!(
        "[retrain]\nenabled = true\nstate_dir = \"{}\"\n",
        dir.path().join("state").display()
    );
    // An autoencoder trained on 300 rows holds fewer held-out scores than any threshold needs.
    let train = dir.path().join("train.csv");
    synthetic_csv(&train, 300, 4, &[]);
    let few = dir.path().join("few");
    let (code, out, err) = run(darkwatch()
        .args(["train", "--input"])
        .arg(&train)
        .arg("--out")
        .arg(&few)
        .arg("--config")
        .arg(quick_config(dir.path())));
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("no threshold can be calibrated"), "{err}");
    let model = repo("models/smd-machine-1-6");
    let dspot = "[threshold]\nkind = \"dspot\"\ndspot_depth = 100000\n";
    let cases = [
        (&sae, "examon", "", "agent.format", "format must be \"raw\""),
        (
            &sae,
            "raw",
            retrain.as_str(),
            "retrain.enabled",
            "set it to false",
        ),
        (
            &sae,
            "raw",
            dspot,
            "threshold.dspot_depth",
            "sae-head --force",
        ),
        (
            &model,
            "examon",
            dspot,
            "threshold.dspot_depth",
            "lower [threshold] dspot_depth",
        ),
        (
            &few,
            "examon",
            "",
            "threshold.kind",
            "use a model trained with more held-out rows",
        ),
    ];
    for (i, (model_dir, format, extra, key, says)) in cases.iter().enumerate() {
        let cfg = dir.path().join(format!("case{i}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[agent]\nmodel_dir = \"{}\"\nformat = \"{format}\"\n[mqtt]\nsubscribe = [\"org/+/cluster/+/node/+/plugin/+/chnl/data/#\"]\nport = 0\n[spool]\ndir = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n{extra}",
                model_dir.display(),
                dir.path().join("spool").display()
            ),
        )
        .unwrap();
        for args in [
            &["validate", "--agent", "--config"][..],
            &["run", "--config"],
        ] {
            // Under `timeout`: an agent that starts anyway must fail the test, not hang it.
            let (code, out, err) = run(darkwatch_within(60).args(args).arg(&cfg));
            let what = format!("{args:?} with {key}");
            assert_eq!(code, 78, "{what}: {out}{err}");
            assert!(
                err.contains(&format!("case{i}.toml: key `{key}`: ")) && err.contains(says),
                "{what}: {err}"
            );
            assert_eq!(err.trim().lines().count(), 1, "{what}: not one line: {err}");
        }
    }
    // Accepted, the SAE's head skipped position 0 while frame ids are not positions: said
    // once the configuration suits it, as a note, and still exit 0.
    let cfg = dir.path().join("ok.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nmodel_dir = \"{}\"\nformat = \"raw\"\n[mqtt]\nsubscribe = [\"act/+\"]\nport = 0\n[spool]\ndir = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
            sae.display(),
            dir.path().join("spool").display()
        ),
    )
    .unwrap();
    let (code, out, err) = run(darkwatch()
        .args(["validate", "--agent", "--config"])
        .arg(&cfg));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("note: ") && out.contains("set [sae] id_is_position = true"),
        "{out}{err}"
    );
}

/// A build without the `onnx` feature refuses the ONNX backend up front, with the rebuild
/// command, from the config (exit 78, from `run` too) and from the command line alike.
#[cfg(not(feature = "onnx"))]
#[test]
fn onnx_backend_without_the_feature_says_how_to_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("onnx.toml");
    std::fs::write(&cfg, "[score]\nbackend = \"onnx\"\n").unwrap();
    // A configuration error, so also from `run` (which systemd then does not restart).
    for args in [
        &["validate", "--config"][..],
        &["validate", "--agent", "--config"],
        &["run", "--config"],
    ] {
        let (code, _, err) = run(darkwatch_within(60).args(args).arg(&cfg));
        assert_eq!(code, 78, "{args:?}: {err}");
        assert!(
            err.contains("score.backend") && err.contains("--features onnx"),
            "{args:?}: {err}"
        );
    }

    let (code, _, err) = run(darkwatch()
        .args(["replay", "--backend", "onnx", "--model"])
        .arg(repo("models/smd-machine-1-6"))
        .arg("--input")
        .arg(repo("tests/data/smd/small.csv")));
    assert_ne!(code, 0);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("model.onnx") && err.contains("--features onnx"),
        "{err}"
    );
}

/// A build without the `cuda` feature refuses the CUDA backend up front, with the rebuild
/// command, from the config (exit 78, from `run` too) and from the command line alike; and retraining is refused
/// with the CUDA backend in any build.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_backend_without_the_feature_says_how_to_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cuda.toml");
    std::fs::write(&cfg, "[score]\nbackend = \"cuda\"\n").unwrap();
    // A configuration error, so also from `run` (which systemd then does not restart).
    for args in [
        &["validate", "--config"][..],
        &["validate", "--agent", "--config"],
        &["run", "--config"],
    ] {
        let (code, _, err) = run(darkwatch_within(60).args(args).arg(&cfg));
        assert_eq!(code, 78, "{args:?}: {err}");
        assert!(
            err.contains("score.backend") && err.contains("--features cuda"),
            "{args:?}: {err}"
        );
    }

    let (code, _, err) = run(darkwatch()
        .args(["replay", "--backend", "cuda", "--model"])
        .arg(repo("models/smd-machine-1-6"))
        .arg("--input")
        .arg(repo("tests/data/smd/small.csv")));
    assert_ne!(code, 0);
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("--features cuda"), "{err}");
}

/// `[cuda]` keys are checked like every other section, and retraining is refused with the
/// CUDA backend (it would fine-tune weights the GPU copy does not see).
#[test]
fn cuda_section_is_validated() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cuda.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nmodel_dir = \"{}\"\n[cuda]\ndevice = 1\nfallback = \"error\"\ntf32 = true\n",
            repo("models/smd-machine-1-6").display()
        ),
    )
    .unwrap();
    let (code, _, err) = run(darkwatch().args(["validate", "--config"]).arg(&cfg));
    assert_eq!(code, 0, "{err}");
    std::fs::write(&cfg, "[cuda]\nfallback = \"gpu\"\n").unwrap();
    let (code, _, err) = run(darkwatch().args(["validate", "--config"]).arg(&cfg));
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("fallback"), "{err}");
    let mut c = darkwatch::config::DarkwatchConfig::default();
    c.score.backend = darkwatch::config::Backend::Cuda;
    c.retrain.enabled = true;
    let e = c.validate().expect_err("retraining with cuda is refused");
    if cfg!(feature = "cuda") {
        assert!(e.0 == "retrain.enabled" && e.1.contains("CUDA"), "{e:?}");
    } else {
        assert!(
            e.0 == "score.backend" && e.1.contains("--features cuda"),
            "{e:?}"
        );
    }
}

#[test]
fn print_config_shows_environment_overrides() {
    let (code, out, err) = run(darkwatch()
        .arg("print-config")
        .env("DARKWATCH__TRAIN__EPOCHS_MAX", "42"));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("epochs_max = 42"), "{out}");
    let (code, _, err) = run(darkwatch()
        .arg("print-config")
        .env("DARKWATCH__TRAIN__EPOCHS_MAX", "lots"));
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("DARKWATCH__TRAIN__EPOCHS_MAX"), "{err}");
}

#[test]
fn bundled_model_replays_bundled_smd_slice_above_target() {
    let (code, out, err) = run(darkwatch()
        .args(["replay", "--model"])
        .arg(repo("models/smd-machine-1-6"))
        .arg("--input")
        .arg(repo("tests/data/smd/machine-1-6_test.npy"))
        .arg("--labels")
        .arg(repo("tests/data/smd/machine-1-6_test_label.txt")));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("23689 frames scored"), "{out}");
    assert!(out.contains("AUPRC"), "{out}");
}

/// `replay --interpretation` gives the harness's HitRate (its `hit_rates`, through the
/// library) for the same model and input, and beside it the detected-frames protocol.
#[test]
fn replay_interpretation_gives_the_harness_hit_rate() {
    use darkwatch::{harness, hitrate, ingest, model::Model, window};
    let model_dir = repo("models/smd-machine-1-6");
    let input = repo("tests/data/smd/machine-1-6_test.npy");
    let labels = repo("tests/data/smd/machine-1-6_test_label.txt");
    let interp = repo("tests/data/smd/machine-1-6_interpretation_label.txt");
    // The harness's computation: the frames the model scores, from its first scored row.
    let model = std::sync::Arc::new(Model::load(&model_dir).unwrap());
    let test = ingest::read_table(&input, &Default::default())
        .unwrap()
        .values;
    let w = model.meta.window_frames;
    let frames = window::windows(test.view(), w);
    let first_row = w.max(1) - 1;
    let segments = ingest::read_interpretation_labels(&interp).unwrap();
    let (h100, h150) = harness::hit_rates(&model, &frames, first_row, &segments).unwrap();

    let cfg = darkwatch::config::DarkwatchConfig::default();
    let req = darkwatch::replay::ReplayRequest {
        model_dir: model_dir.clone(),
        input: input.clone(),
        labels: Some(labels.clone()),
        interpretation: Some(interp.clone()),
        ..Default::default()
    };
    let outcome = darkwatch::replay::replay(&req, &cfg).expect("replay runs");
    let hits = outcome.hit_rates.clone().expect("hit rates");
    assert_eq!(hits.all, Some((h100, h150)));
    assert_eq!(
        (hits.frames, hits.segments, hits.unscored_frames),
        (3708, 30, 0)
    );
    // The chance level from the segments alone: each frame's ⌊P·|G|⌋ / 38, averaged.
    let (mut c100, mut c150, mut n) = (0.0, 0.0, 0usize);
    for seg in &segments {
        let g = seg.dims.len();
        let len = seg.end - seg.start + 1;
        c100 += len as f64 * (g.min(38)) as f64 / 38.0;
        c150 += len as f64 * ((3 * g / 2).min(38)) as f64 / 38.0;
        n += len;
    }
    assert_eq!(n, 3708);
    let (a, b) = hits.chance.expect("chance");
    assert!((a - c100 / n as f64).abs() < 1e-9 && (b - c150 / n as f64).abs() < 1e-9);
    assert!(
        outcome
            .to_string()
            .contains("by chance HR@100 0.508, HR@150 0.749; on the detected frames HR@100 ")
    );
    // The detected frames: labelled, at or above the replay's point-wise best-F1 threshold.
    let best = outcome.eval.as_ref().unwrap().best_f1.unwrap();
    let point_labels = outcome.labels.as_deref().unwrap();
    let detected = hitrate::detected_frames(&outcome.scores, point_labels, best.threshold);
    let found = detected.iter().filter(|&&d| d).count();
    assert_eq!(hits.detected_frames, found);
    // The chance level of the detected frames, from the same segments.
    let (mut d100, mut d150) = (0.0, 0.0);
    for seg in &segments {
        let g = seg.dims.len();
        for &found_it in &detected[seg.start..=seg.end] {
            if found_it {
                d100 += g.min(38) as f64 / 38.0;
                d150 += (3 * g / 2).min(38) as f64 / 38.0;
            }
        }
    }
    let (a, b) = hits.chance_detected.expect("detected chance");
    assert!((a - d100 / found as f64).abs() < 1e-9 && (b - d150 / found as f64).abs() < 1e-9);
    assert!(found > 0 && found < 3708, "{found}");
    let again = hitrate::hit_rates_with(
        &model,
        model.meta.head,
        &frames,
        first_row,
        &segments,
        Some(&detected),
    )
    .unwrap();
    assert_eq!(again, hits);

    // The command line prints both, the headline first.
    let scores_dir = tempfile::tempdir().unwrap();
    let scores_csv = scores_dir.path().join("scores.csv");
    let (code, out, err) = run(darkwatch()
        .args(["replay", "--model"])
        .arg(&model_dir)
        .arg("--input")
        .arg(&input)
        .arg("--labels")
        .arg(&labels)
        .arg("--interpretation")
        .arg(&interp)
        .arg("--out")
        .arg(&scores_csv));
    assert_eq!(code, 0, "{out}\n{err}");

    // An anchor that shares no code with the above: from the per-frame scores the replay
    // wrote and the label file itself, sweep every threshold for the best point-wise F1
    // and count the labelled frames at or above it (the true positives). Every labelled
    // frame of this slice lies in an interpretation segment (3708 of both), so that is the
    // count of detected frames: the README's 2991 (recall 0.8066 of 3708).
    let text = std::fs::read_to_string(&scores_csv).unwrap();
    let mut rows = text.lines();
    let score_col = rows
        .next()
        .unwrap()
        .split(',')
        .position(|c| c == "score")
        .unwrap();
    let file_scores: Vec<f32> = rows
        .map(|l| l.split(',').nth(score_col).unwrap().parse().unwrap())
        .collect();
    let file_labels: Vec<bool> = std::fs::read_to_string(&labels)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim() == "1")
        .collect();
    assert_eq!(file_scores.len(), file_labels.len());
    let positives = file_labels.iter().filter(|&&l| l).count();
    assert_eq!(positives, 3708);
    let mut order: Vec<usize> = (0..file_scores.len()).collect();
    order.sort_by(|&a, &b| file_scores[b].total_cmp(&file_scores[a]));
    // Flag the top k (k up to a change of score, so ties go together); keep the best F1,
    // the highest threshold on a tie.
    let (mut tp, mut best_f1, mut best_tp) = (0usize, -1.0f64, 0usize);
    for (k, &i) in order.iter().enumerate() {
        tp += usize::from(file_labels[i]);
        if order
            .get(k + 1)
            .is_some_and(|&j| file_scores[j] == file_scores[i])
        {
            continue;
        }
        let f1 = 2.0 * tp as f64 / ((k + 1) as f64 + positives as f64);
        if f1 > best_f1 {
            (best_f1, best_tp) = (f1, tp);
        }
    }
    assert_eq!(best_tp, 2991, "best F1 {best_f1}");
    assert_eq!(hits.detected_frames, best_tp);
    let want = format!(
        "hit rate    HR@100 {h100:.3}, HR@150 {h150:.3} over 3708 frames in 30 interpretation segments"
    );
    assert!(out.contains(&want), "{want:?} in\n{out}");
    let (d100, d150) = hits.detected.unwrap();
    let want = format!(
        "HR@100 (detected) {d100:.3}, HR@150 (detected) {d150:.3} over the {found} of them labelled anomalous and scored at or above the best-F1 threshold"
    );
    assert!(out.contains(&want), "{want:?} in\n{out}");

    // Without --labels the headline is still there; the detected frames need labels. Two
    // of the slice's labelled segments (0-based rows 647..=1044 and 1167..=1171).
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small_interpretation.txt");
    // The replay's report with `segments` as the interpretation file.
    let replay_small = |segments: &str| {
        std::fs::write(&small, segments).unwrap();
        let (code, out, err) = run(darkwatch()
            .args(["replay", "--model"])
            .arg(&model_dir)
            .arg("--input")
            .arg(repo("tests/data/smd/small.csv"))
            .arg("--interpretation")
            .arg(&small));
        assert_eq!(code, 0, "{out}\n{err}");
        out
    };
    let out = replay_small("647-1045:1,2,3\n1167-1172:4\n");
    assert!(
        out.contains("over 403 frames in 2 interpretation segments"),
        "{out}"
    );
    assert!(out.contains("need --labels"), "{out}");
    // One frame of one segment: singular words.
    let out = replay_small("647-648:1\n");
    assert!(
        out.contains("over 1 frame in 1 interpretation segment ("),
        "{out}"
    );
}

/// Interpretation labels that do not fit the model or the input are refused before the
/// replay runs, naming the line and what is wrong.
#[test]
fn replay_interpretation_errors_name_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let replay = |text: &str| {
        let path = dir.path().join("interp.txt");
        std::fs::write(&path, text).unwrap();
        run(darkwatch()
            .args(["replay", "--model"])
            .arg(repo("models/smd-machine-1-6"))
            .arg("--input")
            .arg(repo("tests/data/smd/small.csv"))
            .arg("--interpretation")
            .arg(&path))
    };
    for (text, want) in [
        (
            "246-252:1,2\n7-9:2,39\n",
            "interp.txt: line 2: dim 39 is out of range: the model has 38 features (dims are 1-based, 1 to 38)",
        ),
        (
            "246-252:1,2\n\n1990-2001:4\n",
            "interp.txt: line 3: segment 1990-2001 runs past the input's 2000 rows",
        ),
        (
            "246-252:1,2\n246-252 1,2\n",
            "interp.txt: line 2: expected \"start-end:dim,dim,...\", found \"246-252 1,2\"",
        ),
    ] {
        let (code, out, err) = replay(text);
        assert_ne!(code, 0, "{text:?}: {out}");
        assert!(err.contains(want), "{want:?} in\n{err}");
        assert!(!out.contains("frames scored"), "{out}");
    }
}

/// `--head` naming the model's own kind keeps its threshold; another kind drops it and says
/// why, naming both heads.
#[test]
fn replay_head_override_keeps_the_threshold_only_for_the_models_own_scores() {
    let replay = |model: &str, head: &str| {
        run(darkwatch()
            .args(["replay", "--model"])
            .arg(repo(model))
            .arg("--input")
            .arg(repo("tests/data/smd/machine-1-6_test.npy"))
            .args(["--head", head]))
    };
    let (code, out, err) = replay("models/smd-machine-1-6-mse", "mse");
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("threshold   spot"), "{out}\n{err}");
    assert!(
        !format!("{out}{err}").contains("no threshold"),
        "{out}\n{err}"
    );
    let (code, out, err) = replay("models/smd-machine-1-6", "mse");
    assert_eq!(code, 0, "{out}\n{err}");
    let all = format!("{out}{err}");
    assert!(
        all.contains("no threshold: the stored held-out scores are wnll (alpha 0.5, beta 2, bounded log-variance, floor 0.1 of the spread) scores, not mse"),
        "{all}"
    );
}

#[test]
fn replay_thresholds_alerts_and_plots_the_injected_anomalies() {
    let (dir, model, test, lab) = trained();
    let events = dir.path().join("events.jsonl");
    let plot = dir.path().join("score.png");
    let scores = dir.path().join("scores.csv");
    let args = [
        std::ffi::OsStr::new("--out"),
        scores.as_os_str(),
        std::ffi::OsStr::new("--events"),
        events.as_os_str(),
        std::ffi::OsStr::new("--plot"),
        plot.as_os_str(),
    ];
    let (code, out, err) = replay_with(&model, &test, &lab, &args);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("threshold   spot"), "{out}");
    assert!(out.contains("events      precision"), "{out}");
    // The frames inside alert episodes, beside the episode counts; two short alerts cover
    // few frames, so no note that they cover most of the stream.
    assert!(
        out.contains("alerted     ") && out.contains("frame precision of the alerts"),
        "{out}"
    );
    assert!(!out.contains("cover most of the frames"), "{out}");
    // Two injected segments (700..720, 900..905): each fires an alert; the long one names
    // m00 among its top features (wnll contributions of a short spike smear across the
    // features the autoencoder couples to m00, so the short one is not asserted on).
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&events)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let firing: Vec<&serde_json::Value> =
        lines.iter().filter(|e| e["status"] == "firing").collect();
    let resolved = lines.iter().filter(|e| e["status"] == "resolved").count();
    assert_eq!(
        firing.len(),
        resolved,
        "every firing alert resolves: {lines:?}"
    );
    for start in [700u64, 900] {
        let hit = firing
            .iter()
            .find(|e| (start..start + 20).contains(&e["start_seq"].as_u64().unwrap()))
            .unwrap_or_else(|| panic!("no alert for the segment at {start}: {lines:?}"));
        let names: Vec<&str> = hit["top_features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["feature"].as_str().unwrap())
            .collect();
        if start == 700 {
            assert!(names.contains(&"m00"), "{names:?}");
        }
        // The blame is a sum over the episode's frames, and the description says so.
        let description = hit["annotations"]["description"].as_str().unwrap();
        assert!(
            description.contains("contributions summed over its")
                && description.contains("above-threshold frame"),
            "{description}"
        );
        assert!(
            hit["startsAt"].as_str().unwrap().starts_with("2023-11-"),
            "{hit}"
        );
        assert_eq!(hit["labels"]["alertname"], "DarkwatchAnomaly");
    }
    // Frames flagged in the CSV agree with the threshold column.
    let csv = std::fs::read_to_string(&scores).unwrap();
    for row in csv.lines().skip(1) {
        let f: Vec<&str> = row.split(',').collect();
        let (score, threshold): (f64, f64) = (f[2].parse().unwrap(), f[3].parse().unwrap());
        assert_eq!(f[4] == "1", score > threshold, "{row}");
    }
    let png = std::fs::read(&plot).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // --plot-log draws the same scores on a log axis: another picture.
    let log_plot = dir.path().join("log.png");
    let args = [
        std::ffi::OsStr::new("--plot"),
        log_plot.as_os_str(),
        std::ffi::OsStr::new("--plot-log"),
    ];
    let (code, out, err) = replay_with(&model, &test, &lab, &args);
    assert_eq!(code, 0, "{out}\n{err}");
    let log_png = std::fs::read(&log_plot).unwrap();
    assert_eq!(&log_png[..8], b"\x89PNG\r\n\x1a\n");
    assert_ne!(log_png, png);
    // Without a plot there is nothing to draw on a log axis.
    let (code, _, err) = replay_with(&model, &test, &lab, &[std::ffi::OsStr::new("--plot-log")]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--plot"), "{err}");
}

#[test]
fn replay_compares_with_and_without_mss() {
    let (_dir, model, test, lab) = trained();
    let replay = |extra: &[&str]| {
        let (code, out, err) = replay_with(&model, &test, &lab, extra);
        assert_eq!(code, 0, "{out}\n{err}");
        out
    };
    assert!(replay(&[]).contains("no MSS"));
    let on = replay(&["--mss-rounds", "1", "--mss-neighbours", "5"]);
    assert!(on.contains("MSS m=1 k=5"), "{on}");
    // k = 1 is "off" by definition: the scores must equal the plain ones.
    let k1 = replay(&["--mss-rounds", "1", "--mss-neighbours", "1"]);
    let auprc = |s: &str| s.lines().find(|l| l.contains("AUPRC")).map(str::to_string);
    assert_eq!(auprc(&k1), auprc(&replay(&["--no-mss"])));
}

/// The bundled model averages each score over 5 frames: `--smooth-frames 1` scores frames
/// alone, the default's scores are exactly their trailing means, both keep a threshold,
/// and a span out of range (in the model or on the command line) is refused by name.
#[test]
fn replay_smooths_scores_over_the_models_span_and_compares_with_frames_alone() {
    let dir = tempfile::tempdir().unwrap();
    let replay = |extra: &[&str], out: &std::path::Path| {
        let (code, stdout, err) = run(darkwatch()
            .args(["replay", "--model"])
            .arg(repo("models/smd-machine-1-6"))
            .arg("--input")
            .arg(repo("tests/data/smd/machine-1-6_test.npy"))
            .arg("--out")
            .arg(out)
            .args(extra));
        assert_eq!(code, 0, "{stdout}\n{err}");
        assert!(stdout.contains("threshold   spot"), "{stdout}");
        let scores: Vec<f32> = std::fs::read_to_string(out)
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.split(',').nth(2).unwrap().parse().unwrap())
            .collect();
        (stdout, scores)
    };
    let (out5, smoothed) = replay(&[], &dir.path().join("five.csv"));
    assert!(
        out5.contains("scores averaged over 5 frames, threshold from per-frame scores"),
        "{out5}"
    );
    let (out1, alone) = replay(&["--smooth-frames", "1"], &dir.path().join("one.csv"));
    assert!(out1.contains("frames scored alone"), "{out1}");
    assert_eq!(smoothed.len(), 23689);
    assert_eq!(smoothed, darkwatch::smooth::trailing_means(&alone, 5));
    // The smoothed replay's CSV keeps each frame's own score beside the mean.
    let own: Vec<f32> = std::fs::read_to_string(dir.path().join("five.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(5).unwrap().parse().unwrap())
        .collect();
    assert_eq!(own, alone);

    let (code, _, err) = run(darkwatch()
        .args(["replay", "--model"])
        .arg(repo("models/smd-machine-1-6"))
        .arg("--input")
        .arg(repo("tests/data/smd/machine-1-6_test.npy"))
        .args(["--smooth-frames", "0"]));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("0 is not a number of frames between 1 and 1024"),
        "{err}"
    );
    // Out-of-range MSS settings are usage errors too (exit 2), named before any work.
    for (args, want) in [
        (["--mss-rounds", "9"], "9 is not in 0..=8"),
        (
            ["--mss-neighbours", "0"],
            "0 is not a number of neighbours of at least 1",
        ),
    ] {
        let (code, _, err) = run(darkwatch()
            .args(["replay", "--model"])
            .arg(repo("models/smd-machine-1-6"))
            .arg("--input")
            .arg(repo("tests/data/smd/machine-1-6_test.npy"))
            .args(args));
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }

    let model = bundled_copy(dir.path());
    let (code, out, err) = inspect_edited(&model, |meta| {
        meta["smooth_frames"] = serde_json::json!(0);
    });
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("smooth_frames") && err.contains("0 is not between 1 and 1024 frames"),
        "{err}"
    );
    // A model written before smoothing existed scores frames alone.
    let (code, out, err) = inspect_edited(&model, |meta| {
        meta.as_object_mut().unwrap().remove("smooth_frames");
    });
    assert_eq!(code, 0, "{err}");
    // inspect now always shows the span, 1 included.
    assert!(
        out.contains("smoothing  none: each score its frame's own (smooth_frames 1)"),
        "{out}"
    );
}

/// `replay --table`: a table's rows have no order, so every row is scored alone and
/// nothing that assumes an order (point-adjusted F1, alert episodes and events) is printed.
#[test]
fn replay_of_a_table_scores_rows_alone_and_prints_nothing_that_needs_an_order() {
    let (dir, model, test, lab) = trained();
    let replay = |extra: &[&str], name: &str| {
        let out = dir.path().join(name);
        let mut args: Vec<std::ffi::OsString> = extra.iter().map(Into::into).collect();
        args.extend(["--out".into(), out.clone().into_os_string()]);
        let (code, stdout, err) = replay_with(&model, &test, &lab, &args);
        assert_eq!(code, 0, "{extra:?}: {stdout}\n{err}");
        let scores: Vec<f32> = std::fs::read_to_string(out)
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.split(',').nth(2).unwrap().parse().unwrap())
            .collect();
        (stdout, scores)
    };
    let (ordered, smoothed) = replay(&[], "ordered.csv");
    for want in [
        "point-adjusted F1",
        "events      precision",
        "alert episodes",
    ] {
        assert!(ordered.contains(want), "{want}: {ordered}");
    }
    let (table, as_table) = replay(&["--table"], "table.csv");
    for gone in [
        "point-adjusted",
        "events      ",
        "alerted     ",
        "alert episodes",
    ] {
        assert!(!table.contains(gone), "{gone}: {table}");
    }
    for want in [
        "a table: rows scored alone",
        "point-wise AUPRC",
        "threshold   spot",
    ] {
        assert!(table.contains(want), "{want}: {table}");
    }
    // Rows scored alone: the scores of `--smooth-frames 1`, not the model's 5-frame means.
    let (_, alone) = replay(&["--smooth-frames", "1"], "alone.csv");
    assert_eq!(as_table, alone);
    assert_ne!(as_table, smoothed);
    // Smoothing and alert events contradict a table: usage errors, before any work.
    let events = dir.path().join("events.jsonl");
    for extra in [
        vec!["--smooth-frames".into(), "3".into()],
        vec!["--events".into(), events.clone().into_os_string()],
    ] {
        let mut args: Vec<std::ffi::OsString> = vec!["--table".into()];
        args.extend(extra);
        let (code, _, err) = replay_with(&model, &test, &lab, &args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("cannot be used with"), "{args:?}: {err}");
    }
    assert!(!events.exists());
}

/// Retraining data of the wrong width fails before the heads are timed, not after.
#[test]
fn bench_checks_the_retraining_data_before_timing() {
    let dir = tempfile::tempdir().unwrap();
    let narrow = dir.path().join("narrow.csv");
    synthetic_csv(&narrow, 200, 8, &[]);
    let (code, out, err) = run(darkwatch()
        .args([
            "bench",
            "--frames",
            "100",
            "--retrain-frames",
            "100",
            "--model",
        ])
        .arg(repo("models/smd-machine-1-6"))
        .arg("--retrain-data")
        .arg(&narrow));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--retrain-data has 8 columns, the model takes 38"),
        "{err}"
    );
    assert!(!err.contains("timing each head"), "{err}");
    assert!(out.is_empty(), "{out}");
    // Data without --retrain-frames would be ignored: a usage error instead.
    let (code, _, err) = run(darkwatch()
        .args(["bench", "--frames", "100", "--retrain-data"])
        .arg(&narrow));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--retrain-frames"), "{err}");
}

/// `bench --input` scores the file's rows (named in the report), a file of another width
/// is refused before anything is timed, and a row the model cannot run (the plain `mse`
/// model has no variance head for `wnll`) is printed as skipped, with why, where it used to
/// vanish from the table and the JSON.
#[test]
fn bench_scores_given_rows_and_names_the_rows_it_skips() {
    let dir = tempfile::tempdir().unwrap();
    let rows = dir.path().join("rows.csv");
    synthetic_csv(&rows, 300, 38, &[]);
    let (code, out, err) = run(darkwatch()
        .args(["bench", "--frames", "100", "--json", "-", "--model"])
        .arg(repo("models/smd-machine-1-6-mse"))
        .arg("--input")
        .arg(&rows));
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect(&out);
    assert_eq!(v["data"], rows.display().to_string(), "{v}");
    assert_eq!(v["data_rows"], 300, "{v}");
    let skipped = v["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 2, "{v}");
    assert_eq!(skipped[0]["name"], "wnll", "{v}");
    assert!(
        skipped[0]["reason"]
            .as_str()
            .unwrap()
            .contains("probabilistic"),
        "{v}"
    );
    let timed: Vec<&str> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(timed, ["mse", "mse", "max_abs", "max_abs"], "{v}");
    assert!(v["rows"][0]["max_ns"].as_u64().unwrap() > 0, "{v}");
    assert!(
        err.contains("wnll                           skipped: score head"),
        "{err}"
    );
    assert!(err.contains("data: 300 rows of"), "{err}");

    let narrow = dir.path().join("narrow.csv");
    synthetic_csv(&narrow, 300, 8, &[]);
    let (code, out, err) = run(darkwatch()
        .args(["bench", "--frames", "100", "--model"])
        .arg(repo("models/smd-machine-1-6"))
        .arg("--input")
        .arg(&narrow));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("has 8 columns, the model takes 38"), "{err}");
    assert!(!err.contains("timing"), "{err}");
    assert!(out.is_empty(), "{out}");
}

/// A folder that holds models but is not one (`--model models`) is said as such, naming
/// the models inside, not as `models/model.json: No such file or directory`.
#[test]
fn a_folder_of_models_is_not_a_model() {
    let (code, _, err) = run(darkwatch()
        .args(["bench", "--frames", "100", "--model"])
        .arg(repo("models")));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("holds no model.json: not a model folder")
            && err.contains("its subfolders smd-machine-1-6, smd-machine-1-6-mse are models"),
        "{err}"
    );
}

/// Too few frames for a p99 is a usage error, not a silent change of the request.
#[test]
fn bench_refuses_too_few_frames() {
    for huge in ["18446744073709551615", "99999999999999999999999"] {
        let (code, _, err) = run(darkwatch().args(["bench", "--frames", huge]));
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("would take hours"), "{err}");
    }
    let (code, _, err) = run(darkwatch().args(["bench", "--frames", "5"]));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("5 frames are too few for a p99: give at least 100"),
        "{err}"
    );
}

/// A retrain of fewer frames than a refit needs was timed as 0.00 s (the refit's error was
/// dropped): refused up front, with the minimum.
#[test]
fn bench_refuses_too_few_retrain_frames() {
    let (code, _, err) =
        run(darkwatch().args(["bench", "--frames", "100", "--retrain-frames", "5"]));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("5 frames are too few for a retrain: give at least 100"),
        "{err}"
    );
}

/// `bench --json -`: the machine, one record per timed row with its sample count, and a
/// retrain comparison only from a busy window in which a retrain completed (it printed
/// "0 retrains meanwhile; p99 +1.2 %"). The table goes to stderr, rows flagged where the
/// p99 rests on fewer than 1,000 frames. Nothing here depends on how fast the machine is.
#[test]
fn bench_json_names_the_machine_and_compares_only_with_a_retrain_done() {
    let (code, out, err) = run(darkwatch().args([
        "bench",
        "--frames",
        "100",
        "--retrain-frames",
        "100",
        "--json",
        "-",
    ]));
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect(&out);
    let machine = &v["machine"];
    assert!(machine["cpu"].is_string(), "{v}");
    assert!(
        ["avx2+fma", "portable"].contains(&machine["kernel"].as_str().unwrap()),
        "{v}"
    );
    assert_eq!(machine["threads"], 1, "{v}");
    let rows = v["rows"].as_array().unwrap();
    // Four native heads, each at batch 1 and at batch 256.
    assert_eq!(rows.len(), 8, "{v}");
    for r in rows {
        match r["batch"].as_u64().unwrap() {
            1 => assert_eq!(r["samples"], 100, "{r}"),
            // 100 · 100 frames, in 40 whole batches of 256.
            256 => assert_eq!(r["samples"], 10_240, "{r}"),
            b => panic!("batch {b}: {r}"),
        }
        assert!(r["frames_per_s"].as_f64().unwrap() > 0.0, "{r}");
    }
    let retrain = &v["retrain"];
    assert!(retrain["retrains_during"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(retrain["idle_windows"].as_array().unwrap().len(), 3, "{v}");
    assert!(retrain["busy"]["samples"].as_u64().unwrap() >= 100, "{v}");
    let row = err.lines().find(|l| l.starts_with("wnll ")).expect(&err);
    assert!(row.contains("µs*"), "{row}");
    assert!(err.contains("machine: "), "{err}");
    assert!(err.contains("retrains completed in"), "{err}");
}

#[test]
fn harness_prints_one_table_for_the_bundled_machine() {
    let (code, out, err) = run(darkwatch()
        .arg("harness")
        .arg(repo("tests/data/smd/machine-1-6_train.npy"))
        .env("DARKWATCH__TRAIN__EPOCHS_MAX", "3"));
    assert_eq!(code, 0, "{out}\n{err}");
    for want in [
        "machine-1-6",
        "AUPRC",
        "HR@150",
        "mean SMD",
        "point-adjusted",
        "alerted",
        "al-P",
        "frame precision of the alerts",
        // How to get the numbers again: the configuration's source and the seed.
        "config (defaults) (with environment DARKWATCH__TRAIN__EPOCHS_MAX); seed 0 ([train] seed)",
        // A random ranking's HitRates on the same frames, from the labels alone: whatever
        // the model, machine-1-6's segments give these (checked by hand from the file).
        "the floor to read HR@100 / HR@150 against; det: on the detected frames, the floor of HR(det)): machine-1-6 0.508 / 0.749 (det ",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    assert!(!out.contains("ensembles ("), "{out}");
    // An ensemble asked for from the environment is named under the table.
    let (code, out, err) = run(darkwatch()
        .arg("harness")
        .arg(repo("tests/data/smd/machine-1-6_train.npy"))
        .env("DARKWATCH__TRAIN__EPOCHS_MAX", "3")
        .env("DARKWATCH__MODEL__MEMBERS", "2"));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("ensembles ([model] members; one network elsewhere): machine-1-6 (2)."),
        "{out}"
    );
}

#[test]
fn a_harness_entity_that_fails_does_not_lose_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.npz");
    std::fs::write(&bad, b"not a zip archive").unwrap();
    let csv = dir.path().join("results.csv");
    let (code, out, err) = run(darkwatch()
        .arg("harness")
        .arg(&bad)
        .arg(repo("tests/data/smd/machine-1-6_train.npy"))
        .arg("--out")
        .arg(&csv)
        .env("DARKWATCH__TRAIN__EPOCHS_MAX", "3"));
    assert_eq!(code, 1, "{out}\n{err}");
    // The CSV holds the entity that ran, and its family's mean, as the table does.
    let written = std::fs::read_to_string(&csv).unwrap();
    assert!(!dir.path().join("results.csv.partial").exists());
    let lines: Vec<&str> = written.lines().collect();
    assert_eq!(lines.len(), 3, "{written}");
    assert!(lines[0].starts_with("entity,family,protocol,rows,anomalous,auroc,auprc,"));
    assert!(
        lines[1].starts_with("machine-1-6,SMD,train/test files,"),
        "{written}"
    );
    assert!(lines[2].starts_with("mean SMD,SMD,"), "{written}");
    let auroc: f64 = lines[1].split(',').nth(5).unwrap().parse().unwrap();
    assert!((0.0..=1.0).contains(&auroc), "{written}");
    assert!(
        out.contains("machine-1-6") && out.contains("AUPRC"),
        "{out}"
    );
    assert!(!out.contains("bad"), "{out}");
    assert!(err.contains("bad.npz") && err.contains("going on"), "{err}");
    assert!(
        err.contains("1 of 2 entities failed and are not in the table: bad"),
        "{err}"
    );
}

/// An ensemble whose members all run out of epochs while improving gets one note naming
/// them, not a log line per member.
#[test]
fn train_notes_once_which_members_were_still_improving() {
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.csv");
    synthetic_csv(&train, 300, 3, &[]);
    let (code, out, err) = run(darkwatch()
        .args(["train", "--input"])
        .arg(&train)
        .arg("--out")
        .arg(dir.path().join("m"))
        .env("DARKWATCH__TRAIN__EPOCHS_MAX", "1"));
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(err.matches("still falling").count(), 1, "{err}");
    assert!(
        err.contains(
            "note: validation loss of 5 of 5 ensemble members (1, 2, 3, 4, 5) was still falling at epoch 1"
        ),
        "{err}"
    );
    assert!(!err.contains("WARN"), "{err}");
}

/// `--out` naming one of the harness's inputs is refused before any training, and the
/// input is left as it was.
#[test]
fn harness_refuses_to_write_its_csv_over_an_input() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "machine-1-6_train.npy",
        "machine-1-6_test.npy",
        "machine-1-6_test_label.txt",
    ] {
        std::fs::copy(
            repo(&format!("tests/data/smd/{name}")),
            dir.path().join(name),
        )
        .unwrap();
    }
    let labels = dir.path().join("machine-1-6_test_label.txt");
    let before = std::fs::read(&labels).unwrap();
    let (code, out, err) = run(darkwatch()
        .arg("harness")
        .arg(dir.path())
        .arg("--out")
        .arg(&labels));
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("is one of the harness's inputs"), "{err}");
    assert!(!err.contains("[1/1]"), "trained before refusing: {err}");
    assert_eq!(std::fs::read(&labels).unwrap(), before);
    // Nor over the configuration it was given.
    let config = dir.path().join("c.toml");
    std::fs::write(&config, "[train]\nepochs_max = 3\n").unwrap();
    let (code, out, err) = run(darkwatch()
        .arg("harness")
        .arg(dir.path())
        .arg("--config")
        .arg(&config)
        .arg("--out")
        .arg(&config));
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("is one of the harness's inputs"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        "[train]\nepochs_max = 3\n"
    );
    // Nor onto a folder, which the final rename would refuse only after every entity ran.
    let (code, out, err) = run(darkwatch()
        .arg("harness")
        .arg(dir.path())
        .arg("--out")
        .arg(dir.path()));
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("is a folder"), "{err}");
    assert!(!err.contains("[1/1]"), "trained before refusing: {err}");
}

/// A model of other features would see every published metric rejected and score nothing.
#[test]
fn demo_refuses_a_model_of_other_features_before_starting() {
    let (_dir, model, _, _) = trained();
    let (code, out, err) = run(darkwatch()
        .current_dir(repo(""))
        .args(["demo", "--frames", "50", "--model"])
        .arg(&model));
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains("the model's features are not among the metrics the demo publishes")
            && err.contains("38 features in the input, but the model was trained on 8"),
        "{err}"
    );
    assert!(!out.contains("broker"), "{out}");
}

/// `demo` takes columns as `replay` does: the bundled model's features are unnamed (it was
/// trained from an .npy), so a CSV's named columns are its features by position, with a
/// warning (demo refused them: "the model's feature \"f0\" is not among the metrics"); its
/// gaps are filled as replay fills them.
#[test]
fn demo_matches_named_columns_to_an_unnamed_model_by_position_as_replay_does() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("named.csv");
    edited_csv(&repo("tests/data/smd/small.csv"), &input, |i, cells| {
        if i == 5 {
            cells[3] = String::new();
        }
    });
    let (code, out, err) = run(darkwatch()
        .current_dir(repo(""))
        .args(["demo", "--start", "0", "--frames", "60", "--input"])
        .arg(&input));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("The model's features are unnamed (f0…f37")
            && err.contains("the input's columns \"m01\", \"m02\""),
        "{err}"
    );
    assert!(
        err.contains("1 empty, NaN or Inf cell in 1 of 38 columns (f2: 1)"),
        "{err}"
    );
    assert!(out.contains("60 scored"), "{out}");
}

/// Outside a checkout the demo's default paths do not resolve: one line says what to do.
#[test]
fn demo_outside_the_repository_says_where_to_run_it() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(darkwatch().current_dir(dir.path()).arg("demo"));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("models/smd-machine-1-6") && err.contains("repository's root"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// The bundled labels go with the bundled input only: the demo of another input, with no
/// `--labels`, prints no metrics (it printed AUROC against machine-1-6's labels).
#[test]
fn demo_of_your_own_input_without_labels_prints_no_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("mine.npy");
    std::fs::copy(repo("tests/data/smd/machine-1-6_test.npy"), &input).unwrap();
    let (code, out, err) = run(darkwatch()
        .current_dir(repo(""))
        .args(["demo", "--start", "0", "--frames", "60", "--input"])
        .arg(&input));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("60 scored"), "{out}");
    assert!(!out.contains("AUROC"), "{out}");
}

#[test]
fn demo_streams_over_mqtt_and_alerts_reach_the_subscriber() {
    // Rows 18500.. of machine-1-6 hold the start of its longest anomaly.
    let (code, out, err) = run(darkwatch()
        .current_dir(repo(""))
        .args(["demo", "--start", "18500", "--frames", "600"]));
    assert_eq!(code, 0, "{out}\n{err}");
    let line = |prefix: &str| {
        out.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in\n{out}"))
            .to_string()
    };
    // Every message published reached the agent, every row became a scored frame.
    assert!(
        line("broker").contains("22800 ExaMon messages published"),
        "{out}"
    );
    assert!(line("agent").starts_with("agent       22800 messages, 0 decode errors, 600 frames assembled (0 incomplete), 600 scored"), "{out}");
    // Alerts went out over MQTT and the subscriber received each one.
    let alerts = line("alerts");
    let words: Vec<&str> = alerts.split_whitespace().collect();
    let (firing, resolved, received): (u64, u64, u64) = (
        words[1].parse().unwrap(),
        words[3].parse().unwrap(),
        words[6].parse().unwrap(),
    );
    assert!(firing >= 1, "{alerts}");
    assert_eq!(received, firing + resolved, "{alerts}");
    assert!(out.contains("point-wise AUROC"), "{out}");
}

/// A config for `darkwatch run`: the bundled model, an embedded broker on `port` (0: any),
/// a spool in `dir`.
fn agent_config(dir: &std::path::Path, port: u16) -> std::path::PathBuf {
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nmodel_dir = \"{}\"\n[mqtt]\nsubscribe = [\"org/+/cluster/+/node/+/plugin/+/chnl/data/#\"]\nport = {port}\n[spool]\ndir = \"{}\"\nfsync = false\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
            repo("models/smd-machine-1-6").display(),
            dir.join("spool").display()
        ),
    )
    .unwrap();
    cfg
}

/// The unit stops restarting on exit 78, and leaves the checks to `run` itself:
/// `RestartPreventExitStatus=` looks at the main process only, so an `ExecStartPre=`
/// that exits 78 would be restarted forever.
#[test]
fn systemd_unit_stops_on_78_and_checks_in_run_not_in_a_pre_step() {
    let unit = std::fs::read_to_string(repo("systemd/darkwatch.service")).unwrap();
    let settings: Vec<&str> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    assert!(settings.contains(&"RestartPreventExitStatus=78"), "{unit}");
    assert!(
        !settings.iter().any(|l| l.starts_with("ExecStartPre=")),
        "{unit}"
    );
}

/// Both units keep the hardening `systemd-analyze security` asks for (an operator's trial
/// rated the agent's unit 3.4 without the kernel, clock, namespace and realtime lines).
#[test]
fn systemd_units_keep_their_hardening() {
    for unit in [
        "systemd/darkwatch.service",
        "systemd/darkwatch-alertmanager.service",
    ] {
        let text = std::fs::read_to_string(repo(unit)).unwrap();
        let settings: Vec<&str> = text.lines().map(str::trim).collect();
        for want in [
            "DynamicUser=yes",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "ProtectKernelTunables=yes",
            "ProtectKernelModules=yes",
            "ProtectKernelLogs=yes",
            "ProtectControlGroups=yes",
            "ProtectClock=yes",
            "ProtectHostname=yes",
            "RestrictNamespaces=yes",
            "RestrictRealtime=yes",
            "RestrictSUIDSGID=yes",
            "UMask=0077",
            "CapabilityBoundingSet=",
        ] {
            assert!(settings.contains(&want), "{unit} lacks {want}");
        }
    }
}

#[test]
fn run_tells_systemd_it_is_ready_and_stops_cleanly_on_sigterm() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let systemd = UnixDatagram::bind(&notify).unwrap();
    systemd
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let cfg = agent_config(dir.path(), 0);
    let child = darkwatch()
        .args(["run", "--config"])
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &notify)
        // As the systemd unit sets it: the embedded broker's own log stays off.
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = systemd.recv(&mut buf).expect("READY=1 within 30 s");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // STATUS lines may come first.
    loop {
        let n = systemd.recv(&mut buf).expect("STOPPING=1 after SIGTERM");
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            break;
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("stopped after"), "{stderr}");
    assert!(!stderr.contains("rumqttd"), "{stderr}");
}

/// `run` without `--config` says that it runs on the built-in defaults and where it
/// listens: an embedded broker, which no ExaMon or Telegraf publisher knows about. It used
/// to start on them without a word.
#[test]
fn run_without_a_config_says_it_runs_on_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = run(darkwatch()
        .arg("run")
        .env("DARKWATCH__AGENT__MODEL_DIR", dir.path().join("nowhere"))
        .env("DARKWATCH__SPOOL__DIR", dir.path().join("spool")));
    assert_eq!(code, 78, "{out}{err}");
    assert!(
        err.contains("No --config: running on the built-in defaults")
            && err.contains("embedded MQTT broker on 127.0.0.1:1883"),
        "{err}"
    );
}

/// A `[metrics] listen` address that cannot be bound is fatal at start, as a taken
/// embedded-broker port is: exit 1, naming the key. The agent used to log one warning and
/// run on unmonitored, while Prometheus scraped whichever process held the port.
#[test]
fn a_metrics_address_in_use_stops_the_agent_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nmodel_dir = \"{}\"\n[mqtt]\nsubscribe = [\"org/+/cluster/+/node/+/plugin/+/chnl/data/#\"]\nport = 0\n[spool]\ndir = \"{}\"\n[metrics]\nlisten = \"{addr}\"\n",
            repo("models/smd-machine-1-6").display(),
            dir.path().join("spool").display()
        ),
    )
    .unwrap();
    // Under `timeout`: an agent that starts anyway must fail the test, not hang it.
    let (code, out, err) = run(darkwatch_within(60).args(["run", "--config"]).arg(&cfg));
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(&format!("[metrics] listen = \"{addr}\": cannot listen")),
        "{err}"
    );
    drop(held);
}

#[test]
fn run_stops_on_sigterm_even_while_messages_keep_arriving() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = agent_config(dir.path(), port);
    let child = darkwatch()
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the embedded broker, then keep publishing until the agent is gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "broker never came up");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let done = Arc::new(AtomicBool::new(false));
    let publisher = {
        let done = done.clone();
        std::thread::spawn(move || {
            let opts = rumqttc::MqttOptions::new("test-publisher", "127.0.0.1", port);
            let (client, mut connection) = rumqttc::Client::new(opts, 1024);
            let pump = std::thread::spawn(move || {
                for event in connection.iter() {
                    if event.is_err() {
                        break;
                    }
                }
            });
            let mut ts = 1_700_000_000.0;
            while !done.load(Ordering::SeqCst) {
                for j in 0..38 {
                    let topic = format!("org/t/cluster/c/node/n1/plugin/p/chnl/data/f{j}");
                    if client
                        .try_publish(topic, rumqttc::QoS::AtMostOnce, false, format!("0.5;{ts}"))
                        .is_err()
                    {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
                ts += 1.0;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            let _ = client.disconnect();
            let _ = pump.join();
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // The feed never pauses: the agent must still stop. A generous bound turns a hang
    // into a failure; it is a liveness check, not a timing claim.
    let mut child = child;
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > give_up {
            let _ = child.kill();
            done.store(true, Ordering::SeqCst);
            panic!("darkwatch run ignored SIGTERM while messages kept arriving");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    done.store(true, Ordering::SeqCst);
    let _ = publisher.join();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{err}");
    assert!(
        err.contains("stopped after") && err.contains("frames scored"),
        "{err}"
    );
}

/// A one-feature series: a sine of period 24 with a little noise. In the test series, rows
/// in `broken` run the sine backwards at half speed, so every value stays inside the usual
/// range and only its context is wrong.
fn rhythm_csv(path: &std::path::Path, rows: usize, broken: std::ops::Range<usize>) {
    let mut s = String::from("timestamp,load\n");
    let mut state = 99u64;
    for i in 0..rows {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let noise = ((state >> 33) as f64 / (1u64 << 31) as f64) - 0.5;
        let t = if broken.contains(&i) {
            (broken.start as f64) - (i - broken.start) as f64 * 0.5
        } else {
            i as f64
        };
        let v = (t * std::f64::consts::TAU / 24.0).sin() + 0.02 * noise;
        let _ =
            std::fmt::Write::write_fmt(&mut s, format_args!("{},{v:.5}\n", 1_700_000_000 + 60 * i));
    }
    std::fs::write(path, s).unwrap();
}

fn auroc_of(out: &str) -> f64 {
    out.lines()
        .find_map(|l| l.strip_prefix("point-wise AUROC:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no AUROC value in {out}"))
}

/// By default a one-feature series is scored in lag windows of its period: the model's
/// features are the lagged names, replay scores one row per input row, and a stretch whose
/// values are all usual but come in the wrong order is found, which a window-less model
/// of the same series cannot see (AUROC 0.99 against 0.47 when this test was written).
#[test]
fn a_one_feature_series_is_scored_in_lag_windows_of_its_period() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test, lab) = (
        dir.path().join("train.csv"),
        dir.path().join("test.csv"),
        dir.path().join("labels.txt"),
    );
    rhythm_csv(&train, 3000, 0..0);
    rhythm_csv(&test, 1200, 600..660);
    let broken: Vec<usize> = (600..660).collect();
    labels(&lab, 1200, &broken);
    let plain_cfg = dir.path().join("plain.toml");
    std::fs::write(
        &plain_cfg,
        "[train]\nepochs_max = 40\nbatch_size = 64\n[model]\nwindow_frames = 1\n",
    )
    .unwrap();
    let auto_cfg = dir.path().join("auto.toml");
    std::fs::write(&auto_cfg, "[train]\nepochs_max = 40\nbatch_size = 64\n").unwrap();

    let mut aurocs = Vec::new();
    for (name, cfg) in [("plain", &plain_cfg), ("windowed", &auto_cfg)] {
        let model = dir.path().join(name);
        let (code, out, err) = train_with(&train, &model, cfg);
        assert_eq!(code, 0, "train failed: {out}\n{err}");
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(model.join("model.json")).unwrap())
                .unwrap();
        let features: Vec<&str> = meta["features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        if name == "plain" {
            assert_eq!(features, ["load"]);
            assert!(meta.get("window_frames").is_none(), "{meta}");
        } else {
            // The period of the sine, found in the training series.
            assert_eq!(meta["window_frames"], 24, "{meta}");
            assert_eq!(features.len(), 24);
            assert_eq!(features[0], "load[t-23]");
            assert_eq!(features[23], "load");
            let (code, out, _) = run(darkwatch().arg("inspect").arg(&model));
            assert_eq!(code, 0);
            assert!(out.contains("window     24 frames of 1 features"), "{out}");
        }
        let scores = dir.path().join(format!("{name}.csv"));
        let (code, out, err) = replay_with(
            &model,
            &test,
            &lab,
            &[std::ffi::OsStr::new("--out"), scores.as_os_str()],
        );
        assert_eq!(code, 0, "replay failed: {out}\n{err}");
        // Without a window every row is scored; with one, the first 23 rows only fill
        // the first window, and frames keep their input row numbers.
        let csv = std::fs::read_to_string(&scores).unwrap();
        let first: usize = csv
            .lines()
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let skipped = if name == "plain" { 0 } else { 23 };
        assert_eq!(first, skipped);
        assert_eq!(csv.lines().count(), 1 + 1200 - skipped);
        aurocs.push(auroc_of(&out));
    }
    let (plain, windowed) = (aurocs[0], aurocs[1]);
    assert!(windowed > 0.9, "windowed AUROC {windowed}");
    assert!(windowed > plain + 0.2, "windowed {windowed}, plain {plain}");
}

/// A window length that does not divide the features is refused at load, naming the field.
#[test]
fn a_window_that_does_not_divide_the_features_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = windowed_model(dir.path(), 600, 4);
    let (code, out, err) = inspect_edited(&model, |meta| {
        meta["window_frames"] = serde_json::json!(3);
    });
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("window_frames") && err.contains("does not divide the 4 features"),
        "{err}"
    );

    // Training refuses a window longer than the data, and lagged names that clash.
    let short = dir.path().join("short.csv");
    rhythm_csv(&short, 40, 0..0);
    let cfg = dir.path().join("long.toml");
    std::fs::write(&cfg, "[model]\nwindow_frames = 50\n").unwrap();
    let (code, _, err) = train_with(&short, &dir.path().join("m2"), &cfg);
    assert_ne!(code, 0);
    assert!(
        err.contains("model.window_frames") && err.contains("40 rows"),
        "{err}"
    );
    let clash = dir.path().join("clash.csv");
    std::fs::write(&clash, "a,a[t-1]\n1,2\n3,4\n5,6\n7,8\n").unwrap();
    std::fs::write(&cfg, "[model]\nwindow_frames = 2\n").unwrap();
    let (code, _, err) = train_with(&clash, &dir.path().join("m3"), &cfg);
    assert_ne!(code, 0);
    assert!(err.contains("a[t-1]") && err.contains("rename"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Trains a model with lag windows of `w` frames on `rows` rows of the rhythm series.
fn windowed_model(dir: &std::path::Path, rows: usize, w: usize) -> std::path::PathBuf {
    let train = dir.join("rhythm.csv");
    rhythm_csv(&train, rows, 0..0);
    let model = dir.join("windowed");
    let cfg = dir.join("windowed.toml");
    std::fs::write(
        &cfg,
        format!("[train]\nepochs_max = 40\nbatch_size = 64\n[model]\nwindow_frames = {w}\n"),
    )
    .unwrap();
    let (code, out, err) = train_with(&train, &model, &cfg);
    assert_eq!(code, 0, "train failed: {out}\n{err}");
    model
}

/// `darkwatch train --input input --out out --config cfg`.
fn train_with(
    input: &std::path::Path,
    out: &std::path::Path,
    cfg: &std::path::Path,
) -> (i32, String, String) {
    run(darkwatch()
        .args(["train", "--input"])
        .arg(input)
        .arg("--out")
        .arg(out)
        .arg("--config")
        .arg(cfg))
}

/// A CSV exported with a text column the model does not use (a host name) replays: the
/// column is skipped unread, and the scores are those of the file without it.
#[test]
fn replay_skips_a_text_column_the_model_does_not_use() {
    let (dir, model, test, lab) = trained();
    let text = std::fs::read_to_string(&test).unwrap();
    let with_host: String = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let host = if i == 0 { "host" } else { "node-7.cluster" };
            format!("{host},{l}\n")
        })
        .collect();
    let hosted = dir.path().join("hosted.csv");
    std::fs::write(&hosted, with_host).unwrap();
    let scores = |input: &std::path::Path, name: &str| {
        let out = dir.path().join(name);
        let (code, stdout, err) = replay_with(
            &model,
            input,
            &lab,
            &[std::ffi::OsStr::new("--out"), out.as_os_str()],
        );
        assert_eq!(code, 0, "{stdout}\n{err}");
        std::fs::read_to_string(out).unwrap()
    };
    let plain = scores(&test, "plain.csv");
    assert_eq!(scores(&hosted, "hosted-scores.csv"), plain);
    assert!(plain.lines().count() > 1000, "{}", plain.lines().count());
}

/// `train` names the columns that never change in its rows, and warns when all of them do
/// not: such a model flags any change at all.
#[test]
fn train_names_constant_columns_and_warns_when_all_are_constant() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = quick_config(dir.path());
    let train = |csv: &str, name: &str| {
        let input = dir.path().join(format!("{name}.csv"));
        std::fs::write(&input, csv).unwrap();
        let (code, out, err) = run(darkwatch()
            .args(["train", "--input"])
            .arg(&input)
            .arg("--out")
            .arg(dir.path().join(name))
            .arg("--config")
            .arg(&cfg));
        assert_eq!(code, 0, "{out}\n{err}");
        err
    };
    let mut some = String::from("a,flat,b,zero\n");
    let mut all = String::from("a,b\n");
    for i in 0..600 {
        let x = (i as f32 * 0.1).sin();
        some.push_str(&format!("{x},3.5,{},0\n", x * 2.0 + 1.0));
        all.push_str("1,2\n");
    }
    let err = train(&some, "some");
    assert!(
        err.contains("2 of 4 columns are constant in the training data (flat, zero)"),
        "{err}"
    );
    assert!(!err.contains("every column"), "{err}");
    let err = train(&all, "all");
    assert!(
        err.contains("every column of the training data is constant"),
        "{err}"
    );
    // Varying data: neither.
    let varying = dir.path().join("v.csv");
    util::synthetic_csv(&varying, 600, 3, &[]);
    let (code, _, err) = run(darkwatch()
        .args(["train", "--input"])
        .arg(&varying)
        .arg("--out")
        .arg(dir.path().join("v"))
        .arg("--config")
        .arg(&cfg));
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("constant"), "{err}");
}

/// `train --table`: rows without order get neither smoothing nor a lag window, which a
/// one-column input would otherwise get by default, and the model records both as 1 and
/// that it is a table: `replay` of it scores a table without `--table` (a trial's replay
/// printed point-adjusted F1 and alert lines for such a model, with no word).
#[test]
fn train_table_records_no_smoothing_and_no_window() {
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("rows.csv");
    rhythm_csv(&train, 1200, 0..0);
    let cfg = dir.path().join("quick.toml");
    std::fs::write(&cfg, "[train]\nepochs_max = 2\n[model]\nmembers = 1\n").unwrap();
    let meta_of = |model: &std::path::Path| -> serde_json::Value {
        let (code, out, err) = run(darkwatch().arg("inspect").arg("--json").arg(model));
        assert_eq!(code, 0, "{out}\n{err}");
        serde_json::from_str(&out).unwrap()
    };
    // Without --table: the series' period as a window, and the default 5-frame smoothing.
    let series = dir.path().join("series");
    let (code, out, err) = train_with(&train, &series, &cfg);
    assert_eq!(code, 0, "{out}\n{err}");
    let meta = meta_of(&series);
    assert_eq!(meta["window_frames"], 24, "{meta}");
    assert_eq!(meta["smooth_frames"], 5, "{meta}");
    assert!(!out.contains("table:"), "{out}");
    assert!(
        out.contains("lag window: 24 frames (the training series' period, lag 24), of 1 feature"),
        "{out}"
    );

    let table = dir.path().join("table");
    let (code, out, err) = run(darkwatch()
        .args(["train", "--table", "--input"])
        .arg(&train)
        .arg("--out")
        .arg(&table)
        .arg("--config")
        .arg(&cfg));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("table: rows have no order")
            && out.contains("smooth_frames 1")
            && out.contains("window_frames 1"),
        "{out}"
    );
    assert!(!out.contains("lag window:"), "{out}");
    let meta = meta_of(&table);
    assert_eq!(meta["window_frames"], 1, "{meta}");
    assert_eq!(meta["smooth_frames"], 1, "{meta}");
    assert_eq!(meta["features"], serde_json::json!(["load"]), "{meta}");
    assert_eq!(meta["table"], true, "{meta}");
    assert_eq!(meta_of(&series)["table"], false);
    let (code, out, _) = run(darkwatch().arg("inspect").arg(&table));
    assert_eq!(code, 0);
    assert!(out.contains("window     none"), "{out}");
    assert!(out.contains("smoothing  none"), "{out}");
    assert!(out.contains("trained as a table"), "{out}");
    // Only a table model writes the field: other models' model.json stays as it was.
    let json = std::fs::read_to_string(series.join("model.json")).unwrap();
    assert!(!json.contains("\"table\""), "{json}");

    let lab = dir.path().join("labels.txt");
    labels(&lab, 1200, &(600..610).collect::<Vec<_>>());
    let (code, out, err) = replay_with(&table, &train, &lab, &[] as &[&str]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("The model was trained as a table (train --table)"),
        "{err}"
    );
    assert!(
        out.contains("a table (the model was trained as one)"),
        "{out}"
    );
    for gone in ["point-adjusted", "events      ", "alert episodes"] {
        assert!(!out.contains(gone), "{gone}: {out}");
    }
    // What `--table` refuses is refused for a table model too.
    let events = dir.path().join("events.jsonl");
    let (code, _, err) = replay_with(
        &table,
        &train,
        &lab,
        &[std::ffi::OsStr::new("--events"), events.as_os_str()],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("trained as a table") && err.contains("--events"),
        "{err}"
    );
    assert!(!events.exists());
}

/// The point-wise F1 of the streaming alarms that replay prints is the one of the `alarm`
/// column of `--out` against the labels (a trial computed it by hand; replay printed only
/// the best F1, whose threshold the labels choose).
#[test]
fn replay_prints_the_f1_of_the_alarms_in_its_out_file() {
    let (dir, model, test, lab) = trained();
    let scores = dir.path().join("s.csv");
    let (code, out, err) = replay_with(
        &model,
        &test,
        &lab,
        &[std::ffi::OsStr::new("--out"), scores.as_os_str()],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let labels: Vec<u8> = std::fs::read_to_string(&lab)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    let text = std::fs::read_to_string(&scores).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let (frame, alarm) = (
        header.iter().position(|&c| c == "frame").unwrap(),
        header.iter().position(|&c| c == "alarm").unwrap(),
    );
    let (mut flagged, mut tp) = (0usize, 0usize);
    for line in lines {
        let cells: Vec<&str> = line.split(',').collect();
        if cells[alarm] == "1" {
            flagged += 1;
            tp += usize::from(labels[cells[frame].parse::<usize>().unwrap()] == 1);
        }
    }
    let positives = labels.iter().filter(|&&l| l == 1).count();
    assert!(flagged > 0 && positives > 0, "{out}");
    let (p, r) = (tp as f64 / flagged as f64, tp as f64 / positives as f64);
    let f1 = 2.0 * tp as f64 / (flagged + positives) as f64;
    let want = format!(
        "point-wise F1 of the streaming alarms (spot threshold, the `alarm` column of --out): {f1:.4} (precision {p:.4}, recall {r:.4}; {flagged} rows flagged, {tp} of them anomalous)"
    );
    assert!(out.contains(&want), "{want}\n{out}");
    // Printed under the best F1, whose threshold the labels chose, and labelled so.
    let best = out
        .find("point-wise best F1 (threshold chosen with the labels): ")
        .unwrap();
    assert!(best < out.find(&want).unwrap(), "{out}");
}

/// Columns matched by position to unnamed features (a model trained from an NPY, or an
/// NPY input) are said to be, naming both sides: in the wrong order they score every
/// frame as an anomaly with no other sign. A missing column is named.
#[test]
fn replay_says_when_it_matches_columns_by_position_and_names_a_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("rows.csv");
    synthetic_csv(&csv, 400, 3, &[]);
    // The same rows as an NPY, whose columns are f0, f1, f2.
    let text = std::fs::read_to_string(&csv).unwrap();
    let values: Vec<f32> = text
        .lines()
        .skip(1)
        .flat_map(|l| l.split(',').skip(1).map(|v| v.parse::<f32>().unwrap()))
        .collect();
    let npy = dir.path().join("rows.npy");
    util::write_npy_f32(&npy, 400, 3, &values);
    let cfg = dir.path().join("quick.toml");
    std::fs::write(&cfg, "[train]\nepochs_max = 2\n[model]\nmembers = 1\n").unwrap();
    let (unnamed, named) = (dir.path().join("unnamed"), dir.path().join("named"));
    for (input, model) in [(&npy, &unnamed), (&csv, &named)] {
        let (code, out, err) = train_with(input, model, &cfg);
        assert_eq!(code, 0, "{out}\n{err}");
    }
    let replay = |model: &std::path::Path, input: &std::path::Path| {
        run(darkwatch()
            .args(["replay", "--model"])
            .arg(model)
            .arg("--input")
            .arg(input))
    };
    let (code, out, err) = replay(&unnamed, &csv);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("The model's features are unnamed (f0…f2, trained from ")
            && err.contains("the input's columns \"m00\", \"m01\", \"m02\" are used in that order"),
        "{err}"
    );
    let (code, out, err) = replay(&named, &npy);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains(
            "The input's columns are unnamed (f0…f2): they are used as the model's features \"m00\", \"m01\", \"m02\" in that order"
        ),
        "{err}"
    );
    // Names on both sides: matched by name, nothing to say.
    let (code, out, err) = replay(&named, &csv);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(!err.contains("unnamed"), "{err}");
    // A column missing: named.
    let short = dir.path().join("short.csv");
    let dropped: String = text
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            format!("{},{},{}\n", f[0], f[1], f[3])
        })
        .collect();
    std::fs::write(&short, dropped).unwrap();
    let (code, out, err) = replay(&named, &short);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains("2 features in the input, but the model was trained on 3")
            && err.contains("; not in the input: \"m01\""),
        "{err}"
    );
}

/// The researcher's trial: two folders each with a `uni` series gave two rows called
/// `uni`; a NaN that `train` and `replay` fill stopped the harness; `.npy` labels were not
/// found. Now the rows are `dirA/uni` and `dirB/uni` (with their files in `path`), and
/// the gappy series with `.npy` labels gets the AUROC that `train` + `replay` give.
#[test]
fn harness_names_clashes_by_folder_and_equals_train_and_replay_on_gaps() {
    let root = tempfile::tempdir().unwrap();
    let (rows, d) = (600, 3);
    let anomalies: Vec<usize> = (400..420).collect();
    for (folder, gaps) in [("dirA", false), ("dirB", true)] {
        let dir = root.path().join(folder);
        std::fs::create_dir(&dir).unwrap();
        for (part, seed) in [("train", 1), ("test", 2)] {
            let mut next = util::noise(seed);
            let mut v: Vec<f32> = (0..rows * d)
                .map(|k| {
                    let (i, j) = (k / d, k % d);
                    let shift = if part == "test" && anomalies.contains(&i) {
                        4.0
                    } else {
                        0.0
                    };
                    ((i as f64 / 20.0 + j as f64).sin() + 0.1 * next() + shift) as f32
                })
                .collect();
            if gaps {
                // A gap mid-column, one before a column's first value, one as Inf.
                for (i, j) in [(10, 2), (0, 1), (50, 0)] {
                    v[i * d + j] = if i == 50 { f32::INFINITY } else { f32::NAN };
                }
            }
            util::write_npy_f32(&dir.join(format!("uni_{part}.npy")), rows, d, &v);
        }
        if gaps {
            let y: Vec<u8> = (0..rows)
                .flat_map(|i| i64::from(anomalies.contains(&i)).to_le_bytes())
                .collect();
            util::write_npy(
                &dir.join("uni_test_label.npy"),
                "<i8",
                &format!("({rows},)"),
                &y,
            );
        } else {
            labels(&dir.join("uni_test_label.txt"), rows, &anomalies);
        }
    }
    let csv = root.path().join("h.csv");
    let (code, out, err) = run(darkwatch()
        .current_dir(root.path())
        .args(["harness", "dirA", "dirB", "--out"])
        .arg(&csv)
        .env("DARKWATCH__TRAIN__EPOCHS_MAX", "3"));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("\ndirA/uni ") && out.contains("\ndirB/uni "),
        "{out}"
    );
    assert!(
        err.contains("dirB/uni_train.npy: 3 empty, NaN or Inf cells"),
        "{err}"
    );
    let written = std::fs::read_to_string(&csv).unwrap();
    let lines: Vec<&str> = written.lines().collect();
    let header: Vec<&str> = lines[0].split(',').collect();
    let cell = |line: &str, column: &str| {
        let i = header.iter().position(|c| *c == column).unwrap();
        line.split(',').nth(i).unwrap().to_owned()
    };
    assert_eq!(
        header[header.len() - 6..],
        [
            "seed",
            "path",
            "hit_rate_100_chance",
            "hit_rate_150_chance",
            "hit_rate_100_detected_chance",
            "hit_rate_150_detected_chance"
        ],
        "{written}"
    );
    assert_eq!(cell(lines[1], "entity"), "dirA/uni", "{written}");
    assert_eq!(cell(lines[1], "path"), "dirA/uni_train.npy", "{written}");
    assert_eq!(cell(lines[2], "entity"), "dirB/uni", "{written}");
    assert_eq!(cell(lines[2], "seed"), "0", "{written}");
    let harness_auroc: f64 = cell(lines[2], "auroc").parse().unwrap();
    // The same files through train and replay.
    let model = root.path().join("model");
    let (code, out, err) = run(darkwatch()
        .current_dir(root.path())
        .args(["train", "--input", "dirB/uni_train.npy", "--out"])
        .arg(&model)
        .env("DARKWATCH__TRAIN__EPOCHS_MAX", "3"));
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = run(darkwatch()
        .current_dir(root.path())
        .args([
            "replay",
            "--input",
            "dirB/uni_test.npy",
            "--labels",
            "dirB/uni_test_label.npy",
            "--model",
        ])
        .arg(&model)
        .env("DARKWATCH__TRAIN__EPOCHS_MAX", "3"));
    assert_eq!(code, 0, "{out}\n{err}");
    let replay_auroc: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("point-wise AUROC: "))
        .unwrap_or_else(|| panic!("{out}"))
        .trim()
        .parse()
        .unwrap();
    assert!(
        (harness_auroc - replay_auroc).abs() < 5e-5,
        "harness {harness_auroc}, train + replay {replay_auroc}"
    );
}

/// A folder holding a training file without its test partner evaluates everything else
/// and names what is missing, instead of stopping before training anything.
#[test]
fn harness_goes_on_past_a_training_file_without_its_test_file() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "machine-1-6_train.npy",
        "machine-1-6_test.npy",
        "machine-1-6_test_label.txt",
    ] {
        std::fs::copy(
            repo(&format!("tests/data/smd/{name}")),
            dir.path().join(name),
        )
        .unwrap();
    }
    std::fs::copy(
        repo("tests/data/smd/machine-1-6_train.npy"),
        dir.path().join("raw_train.npy"),
    )
    .unwrap();
    let (code, out, err) = run(darkwatch()
        .arg("harness")
        .arg(dir.path())
        .env("DARKWATCH__TRAIN__EPOCHS_MAX", "2"));
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        out.contains("machine-1-6") && out.contains("mean SMD"),
        "{out}"
    );
    assert!(
        err.contains("raw: ") && err.contains("missing: ") && err.contains("raw_test.npy"),
        "{err}"
    );
    assert!(err.contains("going on"), "{err}");
    assert!(
        err.contains("1 of 2 entities failed and are not in the table: raw"),
        "{err}"
    );
}
