//! The ONNX Runtime backend against the native one, on the bundled models and stream.
//!
//! Needs the `onnx` feature and ONNX Runtime >= 1.31 (`eval "$(tools/get-onnxruntime.sh)"`
//! sets `ORT_DYLIB_PATH`); `.ci/run` does both. Without the library these tests fail with
//! the loader's message: a build that asks for ONNX must be able to run it.
#![cfg(feature = "onnx")]

mod util;

use std::sync::Arc;

use darkwatch::config::{Backend, OnnxConfig, OnnxFallback, OnnxProvider};
use darkwatch::ingest::{self, TableOptions};
use darkwatch::model::onnx::OnnxSession;
use darkwatch::model::{Model, ModelError};
use darkwatch::pipeline::Scorer;
use darkwatch::replay;
use darkwatch::score::{Head, HeadKind};
use util::{darkwatch, repo, run};

const PAE: &str = "models/smd-machine-1-6";
const MSE: &str = "models/smd-machine-1-6-mse";
/// Two PAEs merged into one network (`tools/export_bundled_onnx.sh` says how it was made).
const ENSEMBLE: &str = "tests/data/onnx/ensemble";
const STREAM: &str = "tests/data/smd/machine-1-6_test.npy";

fn onnx_cfg(file: &str) -> OnnxConfig {
    OnnxConfig {
        file: file.into(),
        ..OnnxConfig::default()
    }
}

fn load(dir: &str, backend: Backend, cfg: &OnnxConfig) -> Result<Model, ModelError> {
    let dir = repo(dir);
    Model::load(&dir)?.with_backend(&dir, backend, cfg)
}

fn stream() -> ndarray::Array2<f32> {
    ingest::read_table(&repo(STREAM), &TableOptions::default())
        .expect("bundled stream reads")
        .values
}

/// Native and ONNX scores agree to 1e-5 relative on every frame.
///
/// Both backends compute in f32, in different summation orders. The bundled PAE's `bounded`
/// wnll head divides by a variance of at least a tenth of each feature's spread; the
/// `excess` head it replaced let the variance fall to ε = 1e-5, which multiplied an f32
/// rounding of the mean by up to 1e5 and put 1 frame in 23,689 at 1.2e-5.
fn assert_close(native: &[f32], onnx: &[f32], what: &str) {
    assert_eq!(native.len(), onnx.len(), "{what}: lengths");
    let mut worst = (0.0f32, 0usize);
    let mut beyond = 0usize;
    for (i, (&a, &b)) in native.iter().zip(onnx).enumerate() {
        assert!(
            a.is_finite() && b.is_finite(),
            "{what}: row {i}: {a} vs {b}"
        );
        let rel = (a - b).abs() / a.abs().max(b.abs()).max(1e-3);
        beyond += usize::from(rel > 1e-5);
        if rel > worst.0 {
            worst = (rel, i);
        }
    }
    println!(
        "{what}: {} frames, max relative difference {:.2e} (row {}), {beyond} beyond 1e-5",
        native.len(),
        worst.0,
        worst.1
    );
    assert!(
        beyond == 0,
        "{what}: {beyond} of {} frames differ by more than 1e-5 relative; the worst, row {}, \
         by {:.2e}: native {} vs onnx {}",
        native.len(),
        worst.1,
        worst.0,
        native[worst.1],
        onnx[worst.1]
    );
}

/// Every head the model supports, at batch 1 and at batch 256, ONNX against native.
fn heads_agree(dir: &str, file: &str, heads: &[HeadKind]) {
    let native = Arc::new(load(dir, Backend::Native, &onnx_cfg(file)).unwrap());
    let onnx = Arc::new(load(dir, Backend::Onnx, &onnx_cfg(file)).unwrap());
    assert_eq!(onnx.backend_label(), "onnx/cpu");
    let x = stream();
    for &kind in heads {
        let head = Head {
            kind,
            ..native.meta.head
        };
        for batch in [1, 256] {
            let a = Scorer::new(native.clone(), head, batch, 3)
                .unwrap()
                .score_all(x.view());
            let b = Scorer::new(onnx.clone(), head, batch, 3)
                .unwrap()
                .score_all(x.view());
            assert_close(
                &a,
                &b,
                &format!("{dir}/{file} {} batch {batch}", kind.name()),
            );
        }
    }
}

#[test]
fn pae_scores_agree_with_native_for_every_head() {
    heads_agree(
        PAE,
        "model.onnx",
        &[HeadKind::Wnll, HeadKind::Mse, HeadKind::MaxAbs],
    );
}

/// An ensemble's outputs are its members' reconstructions side by side (2·38 columns each
/// here): ONNX Runtime hands them to the heads as the native kernels do.
#[test]
fn ensemble_scores_agree_with_native_for_every_head() {
    let native = load(ENSEMBLE, Backend::Native, &onnx_cfg("model.onnx")).unwrap();
    assert_eq!(native.ae.members, 2);
    assert_eq!(native.ae.recon_width(), 76);
    heads_agree(
        ENSEMBLE,
        "model.onnx",
        &[HeadKind::Wnll, HeadKind::Mse, HeadKind::MaxAbs],
    );
}

/// The session's preallocated tensors: rows of another width are refused (they would
/// otherwise run past the tensor), and `forward_bound` hands `f` exactly what `write` wrote.
#[test]
fn sessions_refuse_rows_of_another_width_and_run_what_was_written() {
    let model = load(PAE, Backend::Onnx, &onnx_cfg("model.onnx")).unwrap();
    let mut session = OnnxSession::new(model.onnx.clone().unwrap(), 4).unwrap();
    assert!(session.has_binding(1) && session.has_binding(4) && !session.has_binding(2));
    for n in [1, 2, 4] {
        let wide = ndarray::Array2::<f32>::zeros((n, 39));
        let err = session
            .forward(wide.view(), |_| ())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("39 values") && err.contains("takes 38"),
            "{err}"
        );
        assert!(session.time_run(wide.view()).is_err());
    }
    assert!(session.forward_bound(2, |_| (), |_, _| ()).is_err());
    let (x, mean) = session
        .forward_bound(
            1,
            |input| input.fill(0.5),
            |x, recon| (x.to_owned(), recon.mean.to_owned()),
        )
        .unwrap();
    assert!(x.dim() == (1, 38) && x.iter().all(|&v| v == 0.5), "{x:?}");
    // The same rows through the unbound path give the same reconstruction.
    let again = session
        .forward(x.view(), |recon| recon.mean.to_owned())
        .unwrap();
    assert_eq!(mean, again);
}

#[test]
fn plain_ae_scores_agree_with_native() {
    heads_agree(MSE, "model.onnx", &[HeadKind::Mse, HeadKind::MaxAbs]);
}

#[test]
fn stacked_and_log_variance_outputs_agree_with_native() {
    for file in ["pae-stacked.onnx", "pae-log-variance.onnx"] {
        let rel = format!("../../tests/data/onnx/{file}");
        heads_agree(PAE, &rel, &[HeadKind::Wnll]);
    }
}

#[test]
fn mean_shift_scoring_agrees_with_native() {
    let mss = darkwatch::mss::MssConfig {
        rounds: 1,
        neighbours: 10,
        bank_frames: 2048,
    };
    let native = Arc::new(
        load(PAE, Backend::Native, &onnx_cfg("model.onnx"))
            .unwrap()
            .with_mss(mss),
    );
    let onnx = Arc::new(
        load(PAE, Backend::Onnx, &onnx_cfg("model.onnx"))
            .unwrap()
            .with_mss(mss),
    );
    assert!(onnx.active_bank().is_some() && onnx.onnx.is_some());
    let x = stream();
    let x = x.slice(ndarray::s![..4000, ..]);
    let head = native.meta.head;
    let a = Scorer::new(native, head, 64, 3).unwrap().score_all(x);
    let b = Scorer::new(onnx, head, 64, 3).unwrap().score_all(x);
    assert_close(&a, &b, "wnll+mss");
}

#[test]
fn replay_of_the_bundled_stream_gives_the_same_scores_and_alerts() {
    for dir in [PAE, MSE] {
        let native = util::replay_bundled(Backend::Native, dir);
        let onnx = util::replay_bundled(Backend::Onnx, dir);
        assert_eq!(onnx.model.backend_label(), "onnx/cpu");
        assert_eq!(onnx.pipeline.frames_scored, native.pipeline.frames_scored);
        assert_eq!(onnx.pipeline.frames_invalid, 0);
        assert_close(&native.scores, &onnx.scores, &format!("{dir} replay"));
        assert!(
            !native.events.is_empty(),
            "{dir}: the bundled stream raises alerts"
        );
        assert_eq!(native.alert_spans, onnx.alert_spans, "{dir}: alert spans");
        let key = |o: &replay::ReplayOutcome| -> Vec<(String, String)> {
            o.events
                .iter()
                .map(|e| (format!("{:?}", e.status), e.starts_at.clone()))
                .collect()
        };
        assert_eq!(key(&native), key(&onnx), "{dir}: alert events");
    }
}

fn load_error(dir: &str, file: &str) -> String {
    match load(dir, Backend::Onnx, &onnx_cfg(file)) {
        Ok(_) => panic!("{dir} with {file} loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn mismatched_graphs_are_refused_with_names_and_shapes() {
    // A plain (one-output) graph for a probabilistic model.
    let e = load_error(PAE, "../smd-machine-1-6-mse/model.onnx");
    assert!(e.contains("probabilistic") && e.contains("`recon`"), "{e}");
    // A probabilistic (two-output) graph for a plain model.
    let e = load_error(MSE, "../smd-machine-1-6/model.onnx");
    assert!(
        e.contains("plain") && e.contains("`mean`") && e.contains("`variance`"),
        "{e}"
    );
    // A fixed batch dimension.
    let e = load_error(PAE, "../../tests/data/onnx/pae-fixed-batch.onnx");
    assert!(
        e.contains("fixed batch dimension 1") && e.contains("`x`"),
        "{e}"
    );
    // Not an ONNX file at all.
    let e = load_error(PAE, "model.json");
    assert!(e.contains("model.json"), "{e}");
    // No such file.
    let e = load_error(PAE, "missing.onnx");
    assert!(
        e.contains("missing.onnx") && e.contains("cannot read"),
        "{e}"
    );
}

#[test]
fn a_model_with_other_features_is_refused() {
    // Train a small model on 5 features, then point it at the 38-feature graph.
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("train.csv");
    util::synthetic_csv(&csv, 600, 5, &[]);
    let out = dir.path().join("m");
    let (code, _, err) = run(darkwatch()
        .args(["train", "--input"])
        .arg(&csv)
        .arg("--out")
        .arg(&out)
        .env("DARKWATCH__TRAIN__EPOCHS_MAX", "2"));
    assert_eq!(code, 0, "{err}");
    let graph = repo(PAE).join("model.onnx");
    let e = Model::load(&out)
        .unwrap()
        .with_backend(&out, Backend::Onnx, &onnx_cfg(graph.to_str().unwrap()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("[-1, 38]") && e.contains("[batch, 5]"), "{e}");
}

#[test]
fn cuda_provider_follows_the_fallback_policy() {
    let strict = OnnxConfig {
        provider: OnnxProvider::Cuda,
        fallback: OnnxFallback::Error,
        ..onnx_cfg("model.onnx")
    };
    let lenient = OnnxConfig {
        fallback: OnnxFallback::Cpu,
        ..strict.clone()
    };
    match load(PAE, Backend::Onnx, &strict) {
        // A machine with the CUDA build of ONNX Runtime and a GPU.
        Ok(m) => assert_eq!(m.backend_label(), "onnx/cuda"),
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains("cuda") && e.contains("fallback"), "{e}");
            let m = load(PAE, Backend::Onnx, &lenient).expect("falls back to CPU");
            assert_eq!(m.backend_label(), "onnx/cpu");
        }
    }
}

#[test]
fn missing_runtime_library_is_a_clear_error_from_the_binary() {
    let (code, _, err) = run(darkwatch()
        .args(["replay", "--backend", "onnx", "--model"])
        .arg(repo(PAE))
        .arg("--input")
        .arg(repo("tests/data/smd/small.csv"))
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so.1.31.1"));
    assert_ne!(code, 0);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("/nonexistent/libonnxruntime.so.1.31.1") && err.contains(">= 1.31"),
        "{err}"
    );
}

#[test]
fn binary_replays_and_inspects_with_the_onnx_backend() {
    let (code, out, err) = run(darkwatch()
        .args(["replay", "--backend", "onnx", "--model"])
        .arg(repo(PAE))
        .arg("--input")
        .arg(repo(STREAM))
        .arg("--labels")
        .arg(repo("tests/data/smd/machine-1-6_test_label.txt")));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("onnx/cpu"), "replay names its backend:\n{out}");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[score]\nbackend = \"onnx\"\n").unwrap();
    let (code, out, err) = run(darkwatch()
        .arg("inspect")
        .arg(repo(PAE))
        .arg("--config")
        .arg(&cfg));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("onnx/cpu") && out.contains("model.onnx"),
        "{out}"
    );
}
