//! The SAE commands and label files as a new user meets them: the real binary, each test in
//! its own temp dir.

use std::path::Path;

/// Writes 0/1 `labels` as an `.npy` vector of int64, as `np.save("y.npy", y)` does.
fn write_npy_labels(path: &Path, labels: &[u8]) {
    let data: Vec<u8> = labels
        .iter()
        .flat_map(|&l| i64::from(l).to_le_bytes())
        .collect();
    crate::util::write_npy(path, "<i8", &format!("({},)", labels.len()), &data);
}

/// `replay --labels y.npy` used to fail with "line 1: not valid UTF-8": the same labels as an
/// .npy vector now evaluate exactly as the text file does.
#[test]
fn replay_takes_npy_labels_as_it_takes_text_ones() {
    let (dir, model, test, lab) = crate::trained();
    let text = std::fs::read_to_string(&lab).unwrap();
    let labels: Vec<u8> = text.lines().map(|l| l.trim().parse().unwrap()).collect();
    let npy = dir.path().join("labels.npy");
    write_npy_labels(&npy, &labels);
    let (code, from_text, err) = crate::replay_with(&model, &test, &lab, &[] as &[&str]);
    assert_eq!(code, 0, "{err}");
    let (code, from_npy, err) = crate::replay_with(&model, &test, &npy, &[] as &[&str]);
    assert_eq!(code, 0, "{err}");
    assert!(from_text.contains("AUROC"), "{from_text}");
    // The evaluation, not the timings.
    let metrics = |out: &str| -> Vec<String> {
        out.lines()
            .filter(|l| {
                ["rows:", "point-", "threshold", "events"]
                    .iter()
                    .any(|p| l.starts_with(p))
            })
            .map(String::from)
            .collect()
    };
    assert_eq!(metrics(&from_npy), metrics(&from_text));
    assert!(
        metrics(&from_text)
            .iter()
            .any(|l| l.starts_with("point-wise AUROC")),
        "{from_text}"
    );
    // A wrong count names both, as for text.
    write_npy_labels(&npy, &labels[1..]);
    let (code, _, err) = crate::replay_with(&model, &test, &npy, &[] as &[&str]);
    assert_eq!(code, 1);
    assert!(
        err.contains("999 labels, but the data has 1000 rows"),
        "{err}"
    );
}

/// `rows` deterministic rows of `d` features (two smooth factors plus noise), written as
/// an f32 `.npy` file.
fn write_activations(path: &Path, rows: usize, d: usize) {
    let mut noise = crate::util::noise(7);
    let mut values = Vec::with_capacity(rows * d);
    for i in 0..rows {
        let (a, b) = ((i as f64 * 0.37).sin(), (i as f64 * 0.11).cos());
        for j in 0..d {
            let v = a * (j as f64 * 0.7).cos() + b * (j as f64 * 0.3).sin() + 0.05 * noise();
            values.push(v as f32);
        }
    }
    crate::util::write_npy_f32(path, rows, d, &values);
}

/// After the last epoch line, the cross-fit folds (most of the time with 5 folds) used to
/// run without a word: each now prints one line, in the epochs' style.
#[test]
fn sae_train_prints_a_line_per_cross_fit_fold() {
    let dir = tempfile::tempdir().unwrap();
    let acts = dir.path().join("acts.npy");
    write_activations(&acts, 160, 8);
    let (code, out, err) = crate::util::run(
        crate::util::darkwatch()
            .args(["sae-train", "--latents", "16", "--k", "2", "--epochs", "2"])
            .args(["--dark-folds", "3", "--holdout", "0.25", "--input"])
            .arg(&acts)
            .arg("--out")
            .arg(dir.path().join("sae")),
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let lines: Vec<&str> = err.lines().collect();
    let last_epoch = lines.iter().rposition(|l| l.starts_with("epoch   2:"));
    let folds: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].starts_with("fold "))
        .collect();
    assert_eq!(folds.len(), 3, "{err}");
    assert!(last_epoch.is_some_and(|e| folds[0] > e), "{err}");
    // 120 training rows in 3 folds of 40.
    for (k, &i) in folds.iter().enumerate() {
        let want = format!("fold {}/3: SAE trained on 80 rows, NMSE ", k + 1);
        assert!(
            lines[i].starts_with(&want)
                && lines[i].ends_with("on the fold's 40 rows it did not see"),
            "{}",
            lines[i]
        );
    }
}

/// `train --out` into an SAE folder used to write model.json beside the checkpoint, and the
/// folder then loaded as the autoencoder (the SAE ignored by `run` and `inspect`). It is
/// refused before anything is written, as `sae-train` refuses a model folder; so is a
/// sparsify run folder, whose checkpoint is one level down.
#[test]
fn train_refuses_an_sae_folder_as_out() {
    let dir = tempfile::tempdir().unwrap();
    let sae = dir.path().join("sae");
    crate::util::sae::train_detector(&sae, 64, 8);
    let run_folder = dir.path().join("run");
    std::fs::create_dir_all(run_folder.join("layers.6")).unwrap();
    std::fs::write(run_folder.join("layers.6/cfg.json"), "{}").unwrap();
    let train = dir.path().join("train.csv");
    crate::util::synthetic_csv(&train, 300, 4, &[]);
    for (out, files) in [
        (&sae, "cfg.json, sae_weights.safetensors, dark/"),
        (&run_folder, "layers.6/"),
    ] {
        let (code, stdout, err) = crate::util::run(
            crate::util::darkwatch()
                .args(["train", "--input"])
                .arg(&train)
                .arg("--out")
                .arg(out),
        );
        assert_eq!(code, 1, "{stdout}{err}");
        assert!(
            err.contains(&format!("holds an SAE ({files})"))
                && err.contains("choose another --out folder"),
            "{err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
        for written in ["model.json", "model.safetensors"] {
            assert!(!out.join(written).exists(), "{}", out.display());
        }
    }
}

/// `sae-head --out` into an autoencoder's model folder used to write the head beside
/// model.json and exit 0, though nothing reads it there (the folder loads as the
/// autoencoder). It is refused before anything is written, as `sae-train` refuses such a
/// folder.
#[test]
fn sae_head_refuses_an_autoencoder_folder_as_out() {
    let dir = tempfile::tempdir().unwrap();
    let sae = dir.path().join("sae");
    crate::util::sae::train_detector(&sae, 64, 8);
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for file in ["model.json", "model.safetensors"] {
        std::fs::copy(
            crate::util::repo("models/smd-machine-1-6").join(file),
            model.join(file),
        )
        .unwrap();
    }
    let a = crate::util::repo("tests/data/activations");
    let (code, out, err) = crate::util::run(
        crate::util::darkwatch()
            .args(["sae-head", "--sae"])
            .arg(&sae)
            .arg("--input")
            .arg(a.join("train.npy"))
            .arg("--out")
            .arg(&model),
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("holds an autoencoder model (model.json)")
            && err.contains("choose another --out folder"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    let mut names: Vec<String> = std::fs::read_dir(&model)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["model.json", "model.safetensors"]);
}

/// Copies the files of `src` into `dst`, recursively.
fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let to = dst.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_tree(&p, &to);
        } else {
            std::fs::copy(&p, &to).unwrap();
        }
    }
}

/// Writes `[agent] model_dir = dir` (raw input) plus `extra` as `name` in `tmp`.
fn sae_config(tmp: &Path, name: &str, dir: &Path, extra: &str) -> std::path::PathBuf {
    let p = tmp.join(name);
    std::fs::write(
        &p,
        format!(
            "[agent]\nmodel_dir = \"{}\"\nformat = \"raw\"\n[spool]\ndir = \"{}\"\n{extra}",
            dir.display(),
            tmp.join("spool").display()
        ),
    )
    .unwrap();
    p
}

/// A sparsify run folder (one `layers.3/`, no `dark/`) used to give `…/model.json: No such
/// file or directory` from `validate` and `run`, while `inspect` said "no dark-matter head":
/// all now say the latter, with the `sae-head` command for that folder (exit 78).
#[test]
fn validate_and_run_say_a_sparsify_run_folder_has_no_head() {
    let tmp = tempfile::tempdir().unwrap();
    let run_folder = tmp.path().join("run");
    copy_tree(
        &crate::util::repo("tests/data/sae/sparsify_topk_f32/checkpoint"),
        &run_folder,
    );
    let cfg = sae_config(tmp.path(), "sae.toml", &run_folder, "");
    let want = format!(
        "no dark-matter head (expected dark_head.json); `darkwatch sae-head --sae {} --input <normal activations>` fits one",
        run_folder.display()
    );
    for args in [
        &["validate", "--config"][..],
        &["validate", "--agent", "--config"],
        &["run", "--config"],
    ] {
        let (code, out, err) =
            crate::util::run(crate::util::darkwatch_within(60).args(args).arg(&cfg));
        assert_eq!(code, 78, "{args:?}: {out}{err}");
        assert!(
            err.contains(&want) && !err.contains("model.json"),
            "{args:?}: {err}"
        );
    }
    let (code, out, err) =
        crate::util::run(crate::util::darkwatch().arg("inspect").arg(&run_folder));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("no dark-matter head"), "{out}");
}

/// `replay`, `demo` and `bench` with an SAE folder used to fail with `sae1/model.json: No
/// such file or directory`: they say what the folder is and what takes it.
#[test]
fn replay_demo_and_bench_send_an_sae_folder_to_the_sae_commands() {
    let sae = crate::util::repo("tests/data/sae/saelens_topk_v6/checkpoint");
    let x = crate::util::repo("tests/data/sae/saelens_topk_v6/x.npy");
    let mut replay = crate::util::darkwatch();
    replay
        .args(["replay", "--model"])
        .arg(&sae)
        .arg("--input")
        .arg(&x);
    let mut demo = crate::util::darkwatch_within(60);
    demo.args(["demo", "--model"])
        .arg(&sae)
        .arg("--input")
        .arg(&x);
    let mut bench = crate::util::darkwatch();
    bench.args(["bench", "--model"]).arg(&sae);
    for (name, cmd) in [
        ("replay", &mut replay),
        ("demo", &mut demo),
        ("bench", &mut bench),
    ] {
        let (code, out, err) = crate::util::run(cmd);
        assert_eq!(code, 1, "{name}: {out}{err}");
        for want in [
            format!("{} is an SAE folder", sae.display()),
            format!("`darkwatch {name}` runs the autoencoders"),
            format!("darkwatch sae-score --sae {}", sae.display()),
            // The command `sae_bench_times_a_given_sae_with_its_head_when_it_has_one` runs.
            format!("darkwatch sae-bench --sae {}", sae.display()),
            "format = \"raw\"".into(),
        ] {
            assert!(err.contains(&want), "{name}: missing {want:?} in {err}");
        }
        assert!(!err.contains("No such file"), "{name}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{name}: not one line: {err}");
    }
}

/// A head copied from one SAE's folder into another's used to be accepted by `inspect`,
/// `validate` and `sae-score`, which then thresholded with the first SAE's calibration.
#[test]
fn a_head_copied_beside_another_sae_is_refused_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let (sae1, sae2) = (tmp.path().join("sae1"), tmp.path().join("sae2"));
    crate::util::sae::train_detector(&sae1, 64, 8);
    crate::util::sae::train_detector(&sae2, 32, 4);
    std::fs::remove_dir_all(sae2.join("dark")).unwrap();
    copy_tree(&sae1.join("dark"), &sae2.join("dark"));
    let want = [
        format!("{}", sae2.join("dark/dark_head.json").display()),
        format!("{}", sae2.join("sae_weights.safetensors").display()),
        "belong to another SAE".into(),
        format!(
            "darkwatch sae-head --sae {} --input <normal activations> --force",
            sae2.display()
        ),
    ];
    let a = crate::util::repo("tests/data/activations");
    let cfg = sae_config(tmp.path(), "sae2.toml", &sae2, "");
    let mut inspect = crate::util::darkwatch();
    inspect.arg("inspect").arg(&sae2);
    let mut validate = crate::util::darkwatch();
    validate.args(["validate", "--config"]).arg(&cfg);
    let mut score = crate::util::darkwatch();
    score
        .args(["sae-score", "--sae"])
        .arg(&sae2)
        .arg("--input")
        .arg(a.join("test.npy"));
    for (name, cmd, rc) in [
        ("inspect", &mut inspect, 1),
        ("validate", &mut validate, 78),
        ("sae-score", &mut score, 1),
    ] {
        let (code, out, err) = crate::util::run(cmd);
        assert_eq!(code, rc, "{name}: {out}{err}");
        for w in &want {
            assert!(err.contains(w.as_str()), "{name}: missing {w:?} in {err}");
        }
    }
    // `sae-head` of sae1 writing into sae2's head folder is refused, with --force too.
    let (code, out, err) = crate::util::run(
        crate::util::darkwatch()
            .args(["sae-head", "--force", "--sae"])
            .arg(&sae1)
            .arg("--input")
            .arg(a.join("train.npy"))
            .arg("--out")
            .arg(sae2.join("dark")),
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(&format!(
            "which holds another SAE than --sae {}",
            sae1.display()
        )),
        "{err}"
    );
}

/// `sae-bench --batch 0` used to run batch 1 without a word; `--secs` must be a positive
/// number.
#[test]
fn sae_bench_refuses_batch_0_and_no_time() {
    for (flag, value, want) in [
        ("--batch", "0", "0: give at least 1"),
        // 10⁷ aborted allocating 61 GB; 2⁶⁴ − 1 overflowed the array shape.
        ("--batch", "10000000", "give at most 65536"),
        ("--batch", "18446744073709551615", "give at most 65536"),
        ("--secs", "0", "give seconds per measurement"),
        ("--secs", "nan", "give seconds per measurement"),
    ] {
        let (code, out, err) =
            crate::util::run(crate::util::darkwatch().args(["sae-bench", flag, value]));
        assert_eq!(code, 2, "{flag} {value}: {out}{err}");
        assert!(err.contains(want), "{flag} {value}: {err}");
    }
}

/// An `expected_average_only_in` SAE used to load and run unscaled with no word, and no
/// option could give it its factor: `inspect` shows the factor in use (from `[sae]
/// norm_scaling_factor`, or the environment) or that there is none, with a warning.
#[test]
fn inspect_shows_the_norm_scaling_factor_or_warns_without_one() {
    let tmp = tempfile::tempdir().unwrap();
    let sae = crate::util::repo("tests/data/sae/saelens_relu_expected_average_only_in/checkpoint");
    let (code, out, err) = crate::util::run(crate::util::darkwatch().arg("inspect").arg(&sae));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("normalisation expected_average_only_in WITHOUT a scaling factor"),
        "{out}"
    );
    assert!(
        err.contains("WARN")
            && err.contains("no scaling factor was given")
            && err.contains("[sae] norm_scaling_factor"),
        "{err}"
    );
    let cfg = tmp.path().join("s.toml");
    std::fs::write(&cfg, "[sae]\nnorm_scaling_factor = 0.5\n").unwrap();
    let (code, out, err) = crate::util::run(
        crate::util::darkwatch()
            .arg("inspect")
            .arg(&sae)
            .arg("--config")
            .arg(&cfg),
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("expected_average_only_in, scaling factor 0.5"),
        "{out}"
    );
    assert!(!err.contains("WARN"), "{err}");
    let (code, out, err) = crate::util::run(
        crate::util::darkwatch()
            .env("DARKWATCH__SAE__NORM_SCALING_FACTOR", "0.25")
            .arg("inspect")
            .arg(&sae),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("scaling factor 0.25"), "{out}");
    // Checked with the configuration, naming the key.
    let bad = sae_config(
        tmp.path(),
        "bad.toml",
        &sae,
        "[sae]\nnorm_scaling_factor = -1.0\n",
    );
    let (code, _, err) = crate::util::run(
        crate::util::darkwatch()
            .args(["validate", "--config"])
            .arg(&bad),
    );
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("sae.norm_scaling_factor") && err.contains("finite and positive"),
        "{err}"
    );
}

/// `sae-score --sae layers.3` run from inside the sparsify run folder used to miss the head
/// `sae-head --sae run` wrote to `run/dark` (the relative hookpoint folder's parent is "",
/// which was not looked in): it is found as `./dark`.
#[test]
fn a_relative_hookpoint_folder_finds_the_run_folders_head() {
    let tmp = tempfile::tempdir().unwrap();
    let run_folder = tmp.path().join("run");
    copy_tree(
        &crate::util::repo("tests/data/sae/sparsify_topk_f32/checkpoint/layers.3"),
        &run_folder.join("layers.3"),
    );
    let acts = tmp.path().join("acts.npy");
    write_activations(&acts, 240, 16);
    let (code, out, err) = crate::util::run(
        crate::util::darkwatch()
            .args(["sae-head", "--holdout", "0", "--sae"])
            .arg(&run_folder)
            .arg("--input")
            .arg(&acts),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(run_folder.join("dark/dark_head.json").is_file());
    let (code, out, err) = crate::util::run(
        crate::util::darkwatch()
            .current_dir(&run_folder)
            .args(["sae-score", "--sae", "layers.3", "--input"])
            .arg(&acts),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(!err.contains("no dark-matter head"), "{err}");
}

/// A sparsify head found both in the run folder and in its hookpoint folder is used from the
/// folder named, with a warning naming both (one is stale): nothing asserted the warning, so
/// it could go unnoticed. Each name uses its own head and warns about the other.
#[test]
fn heads_in_both_the_run_and_the_hookpoint_folder_are_warned_about() {
    let tmp = tempfile::tempdir().unwrap();
    let run_folder = tmp.path().join("run");
    let layer = run_folder.join("layers.3");
    copy_tree(
        &crate::util::repo("tests/data/sae/sparsify_topk_f32/checkpoint/layers.3"),
        &layer,
    );
    let acts = tmp.path().join("acts.npy");
    write_activations(&acts, 240, 16);
    let (code, out, err) = crate::util::run(
        crate::util::darkwatch()
            .args(["sae-head", "--holdout", "0", "--sae"])
            .arg(&layer)
            .arg("--input")
            .arg(&acts),
    );
    assert_eq!(code, 0, "{out}{err}");
    let score = |sae: &Path| {
        let (code, out, err) = crate::util::run(
            crate::util::darkwatch()
                .arg("sae-score")
                .arg("--sae")
                .arg(sae)
                .arg("--input")
                .arg(&acts),
        );
        assert_eq!(code, 0, "{out}{err}");
        (out, err)
    };
    // One head: no warning.
    let (_, err) = score(&run_folder);
    assert!(!err.contains("hold a dark-matter head"), "{err}");
    copy_tree(&layer.join("dark"), &run_folder.join("dark"));
    for (named, other) in [(&run_folder, &layer), (&layer, &run_folder)] {
        let (used, stale) = (named.join("dark"), other.join("dark"));
        let (out, err) = score(named);
        let warning = format!(
            "both {} and {} hold a dark-matter head for the same sparsify SAE; using {}",
            used.display(),
            stale.display(),
            used.display()
        );
        assert!(err.contains(&warning), "missing {warning:?} in {err}");
        assert!(err.contains("remove the other one"), "{err}");
        assert!(out.contains(&used.display().to_string()), "{out}");
    }
}

/// `sae-bench` had no `--sae`, though `replay`, `demo` and `bench` sent SAE folders to it:
/// it now times the given SAE (loaded as `sae-score` loads it), one row of its shape with the
/// median and p99 per frame, with its dark-matter head when it has one, on its own rows with
/// `--input`.
#[test]
fn sae_bench_times_a_given_sae_with_its_head_when_it_has_one() {
    let bench = |args: &[&std::ffi::OsStr]| {
        crate::util::run(
            crate::util::darkwatch()
                .args(["sae-bench", "--secs", "0.05", "--batch", "4"])
                .args(args),
        )
    };
    // The row of a d_in × latents SAE: its first three columns.
    let row = |out: &str, d_in: &str, latents: &str, k: &str| {
        out.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 10 && f[..4] == [d_in, latents, k, "|"]
        })
    };
    let fixture = crate::util::repo("tests/data/sae/saelens_topk_v6/checkpoint");
    let (code, out, err) = bench(&["--sae".as_ref(), fixture.as_os_str()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("SAE {}: TopK", fixture.display())),
        "{out}"
    );
    assert!(
        out.contains("the SAE alone (no dark-matter head found)"),
        "{out}"
    );
    assert!(out.contains("on random rows"), "{out}");
    assert!(
        out.contains("b1 p50µs") && out.contains("b1 p99µs"),
        "{out}"
    );
    assert!(row(&out, "16", "64", "8"), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.contains(" | ")).count(),
        2,
        "{out}"
    );

    let dir = tempfile::tempdir().unwrap();
    let acts = dir.path().join("acts.npy");
    write_activations(&acts, 160, 8);
    let sae = dir.path().join("sae");
    let (code, out, err) = crate::util::run(
        crate::util::darkwatch()
            .args(["sae-train", "--latents", "16", "--k", "2", "--epochs", "2"])
            .args(["--dark-folds", "0", "--holdout", "0.25", "--input"])
            .arg(&acts)
            .arg("--out")
            .arg(&sae),
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = bench(&[
        "--sae".as_ref(),
        sae.as_os_str(),
        "--input".as_ref(),
        acts.as_os_str(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("the SAE and its dark-matter head, as the agent scores a frame"),
        "{out}"
    );
    assert!(out.contains("on the given activations"), "{out}");
    assert!(row(&out, "8", "16", "2"), "{out}");

    // Rows of another width are refused, naming both; --input needs --sae.
    let wide = dir.path().join("wide.npy");
    write_activations(&wide, 10, 16);
    let (code, _, err) = bench(&[
        "--sae".as_ref(),
        sae.as_os_str(),
        "--input".as_ref(),
        wide.as_os_str(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("activations are [10, 16]") && err.contains("takes d_in = 8"),
        "{err}"
    );
    let (code, _, err) = bench(&["--input".as_ref(), acts.as_os_str()]);
    assert_eq!(code, 2, "{err}");
}

/// `sae-bench --input` of another width than the SAE's `d_in` said "invalid SAE", though
/// the SAE was fine: the message now names the input, its shape and the SAE's `d_in`.
#[test]
fn sae_bench_blames_the_input_for_a_width_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let acts = dir.path().join("w15.npy");
    write_activations(&acts, 40, 15);
    let fixture = crate::util::repo("tests/data/sae/saelens_topk_v6/checkpoint");
    let (code, out, err) = crate::util::run(
        crate::util::darkwatch()
            .args(["sae-bench", "--secs", "0.05", "--batch", "4", "--sae"])
            .arg(&fixture)
            .arg("--input")
            .arg(&acts),
    );
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains(&format!("--input {}", acts.display()))
            && err.contains("activations are [40, 15]")
            && err.contains("takes d_in = 16"),
        "{err}"
    );
    assert!(!err.to_lowercase().contains("invalid sae"), "{err}");
}

/// `prompts` prompts of `seq` tokens of width `d` (row norms 1 to 1.2), position 0 of each
/// scaled by `bos` (a BOS / attention-sink token), with one prompt id per row.
fn write_prompts(acts: &Path, ids: &Path, prompts: usize, seq: usize, d: usize, bos: f32) {
    let mut noise = crate::util::noise(11);
    let mut values = Vec::with_capacity(prompts * seq * d);
    for i in 0..prompts * seq {
        let (a, b) = ((i as f64 * 0.37).sin(), (i as f64 * 0.11).cos());
        let row: Vec<f64> = (0..d)
            .map(|j| a * (j as f64 * 0.7).cos() + b * (j as f64 * 0.3).sin() + 0.3 * noise())
            .collect();
        let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        let scale =
            (1.0 + 0.1 * (i % 3) as f64) / norm * if i % seq == 0 { f64::from(bos) } else { 1.0 };
        values.extend(row.iter().map(|v| (v * scale) as f32));
    }
    crate::util::write_npy_f32(acts, prompts * seq, d, &values);
    let data: Vec<u8> = (0..prompts * seq)
        .flat_map(|i| ((i / seq * 7) as i64).to_le_bytes())
        .collect();
    crate::util::write_npy(ids, "<i8", &format!("({},)", prompts * seq), &data);
}

/// The trial's finding: ×30 rows at position 0 of every prompt set the head's R² and the
/// thresholds. With prompt ids, `sae-train` and `sae-head` drop position 0 by default and say
/// so; with `--skip-positions 0` (or without ids) they warn, naming the positions and the
/// option; `--skip-positions 1` without positions is refused.
#[test]
fn bos_rows_are_dropped_by_default_and_warned_about_when_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (acts, ids, sae) = (
        dir.path().join("acts.npy"),
        dir.path().join("ids.npy"),
        dir.path().join("sae"),
    );
    write_prompts(&acts, &ids, 40, 16, 8, 30.0);
    let (code, out, err) = crate::util::run(
        crate::util::darkwatch()
            .args(["sae-train", "--latents", "16", "--k", "2", "--epochs", "2"])
            .args(["--dark-folds", "0", "--holdout", "0.25", "--input"])
            .arg(&acts)
            .arg("--prompt-ids")
            .arg(&ids)
            .arg("--out")
            .arg(&sae),
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("positions: dropped the first 1 token(s) of each prompt, 40 of 640 rows"),
        "{out}"
    );
    assert!(
        !out.contains("extreme norm") && !err.contains("extreme norm"),
        "{out}{err}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sae.join("train_report.json")).unwrap()).unwrap();
    assert_eq!(report["skip_positions"], 1);
    assert_eq!(report["skipped_rows"], 40);
    // 30 training prompts, 15 tokens each, after position 0 went.
    assert_eq!(report["train_rows"], 450);

    let head = |extra: &[&str], with_ids: bool| {
        let mut cmd = crate::util::darkwatch();
        cmd.args(["sae-head", "--force", "--ridge", "1", "--sae"])
            .arg(&sae)
            .arg("--input")
            .arg(&acts)
            .args(extra);
        if with_ids {
            cmd.arg("--prompt-ids").arg(&ids);
        }
        crate::util::run(&mut cmd)
    };
    let (code, out, err) = head(&["--skip-positions", "0"], true);
    assert_eq!(code, 0, "{out}\n{err}");
    for text in [&out, &err] {
        assert!(
            text.contains("40 of 640 rows have an extreme norm")
                && text.contains("position 0 in 40 of 40 prompts")
                && text.contains("--skip-positions 1 drops them"),
            "{text}"
        );
    }
    let (code, out, err) = head(&[], false);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("40 of 640 rows have an extreme norm") && err.contains("give --prompt-ids"),
        "{err}"
    );
    let (code, out, err) = head(&["--skip-positions", "1"], false);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains("--skip-positions 1 needs each row's position in its prompt"),
        "{err}"
    );
    let (code, out, err) = head(&[], true);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("dropped the first 1 token(s)"), "{out}");
    assert!(!err.contains("extreme norm"), "{err}");
}

/// `[sae] skip_positions` needs `id_is_position = true` (only then are frame ids positions),
/// and a negative one is no count: both refused by `validate`, naming the key.
#[test]
fn bad_skip_positions_settings_are_refused_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let sae = crate::util::repo("tests/data/sae/saelens_relu_expected_average_only_in/checkpoint");
    for (name, extra, want) in [
        (
            "no_positions.toml",
            "[sae]\nskip_positions = 1\n",
            "needs id_is_position = true",
        ),
        (
            "negative.toml",
            "[sae]\nid_is_position = true\nskip_positions = -1\n",
            "non-negative",
        ),
    ] {
        let cfg = sae_config(tmp.path(), name, &sae, extra);
        let (code, _, err) = crate::util::run(
            crate::util::darkwatch()
                .args(["validate", "--config"])
                .arg(&cfg),
        );
        assert_eq!(code, 78, "{name}: {err}");
        assert!(
            err.contains("sae.skip_positions") && err.contains(want),
            "{name}: {err}"
        );
    }
}
