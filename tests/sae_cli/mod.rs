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
