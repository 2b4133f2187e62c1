//! The ONNX Runtime backend against the native one, on the bundled models and stream.
//!
//! Needs the `onnx` feature and ONNX Runtime >= 1.31 (`eval "$(tools/get-onnxruntime.sh)"`
//! sets `ORT_DYLIB_PATH`); `.ci/run` does both. Without the library these tests fail with
//! the loader's message: a build that asks for ONNX must be able to run it.
#![cfg(feature = "onnx")]

#[macro_use]
mod util;

use darkwatch::config::{Backend, OnnxConfig, OnnxFallback, OnnxProvider};
use darkwatch::model::onnx::OnnxSession;
use darkwatch::model::{Model, ModelError};
use darkwatch::score::HeadKind;
use util::parity::{self, BackendUnderTest, MSE, PAE, STREAM};
use util::{darkwatch, darkwatch_within, repo, run};

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

/// ONNX Runtime on the CPU provider, graph `file` in each model folder. Native and ONNX
/// scores agree to 1e-5 relative on every frame: both compute in f32, in different
/// summation orders. (The bundled PAE's `bounded` wnll head divides by a variance of at
/// least a tenth of each feature's spread; the `excess` head it replaced let the variance
/// fall to ε = 1e-5, which multiplied an f32 rounding of the mean by up to 1e5 and put 1
/// frame in 23,689 at 1.2e-5.)
fn onnx_backend(file: &str) -> BackendUnderTest {
    let file = file.to_owned();
    BackendUnderTest {
        backend: Backend::Onnx,
        load: Box::new(move |dir| Some(load(dir, Backend::Onnx, &onnx_cfg(&file)).unwrap())),
        label: "onnx/cpu",
        tolerance: 1e-5,
        batches: &[1, 256],
    }
}

// Every model test every backend runs against native (tests/util/parity.rs): the PAE, the
// plain AE and the 2-member ensemble on every head at batches 1 and 256, mean-shift
// scoring, and a replay of the bundled stream (scores, alert spans, alert events).
backend_parity_tests!(onnx_backend("model.onnx"));

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
fn stacked_and_log_variance_outputs_agree_with_native() {
    for file in ["pae-stacked.onnx", "pae-log-variance.onnx"] {
        let rel = format!("../../tests/data/onnx/{file}");
        parity::heads_agree(&onnx_backend(&rel), PAE, &[HeadKind::Wnll]);
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
    // No such file: said before ONNX Runtime is looked for, with how to make one.
    let e = load_error(PAE, "missing.onnx");
    assert!(
        e.contains("missing.onnx: no such file") && e.contains("tools/export_onnx.py"),
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

/// A graph exported from another model (the folder's model retrained since, or a graph
/// copied in) has the right shapes but another network: it is refused, naming both ids and
/// how to re-export, instead of running the old network with the new scaler and threshold.
#[test]
fn a_graph_exported_from_another_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let (code, _, err) = run(darkwatch()
        .args(["train", "--input"])
        .arg(repo("tests/data/smd/small.csv"))
        .arg("--out")
        .arg(&out)
        .env("DARKWATCH__TRAIN__EPOCHS_MAX", "2"));
    assert_eq!(code, 0, "{err}");
    // Same 38 features and widths as the bundled PAE, so only the id tells them apart.
    std::fs::copy(repo(PAE).join("model.onnx"), out.join("model.onnx")).unwrap();
    let model = Model::load(&out).unwrap();
    let id = model.meta.id.clone();
    let e = model
        .with_backend(&out, Backend::Onnx, &onnx_cfg("model.onnx"))
        .unwrap_err();
    let text = e.to_string();
    let bundled = Model::load(&repo(PAE)).unwrap().meta.id;
    assert!(
        text.contains(&format!("exported from model {bundled}"))
            && text.contains(&format!("model.json holds model {id}"))
            && text.contains("tools/export_onnx.py"),
        "{text}"
    );
    // The folder is at fault: `run` and `validate` call it a configuration error.
    assert!(
        darkwatch::detector::LoadError::Model(e).is_bad_model(),
        "{text}"
    );
    let (code, _, err) = run(darkwatch()
        .args(["replay", "--backend", "onnx", "--model"])
        .arg(&out)
        .arg("--input")
        .arg(repo("tests/data/smd/small.csv")));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("re-export"), "{err}");
    // The bundled graphs name their own model.
    for dir in [PAE, MSE] {
        load(dir, Backend::Onnx, &onnx_cfg("model.onnx")).unwrap();
    }
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

/// A model folder without the ONNX graph `[score] backend = "onnx"` needs is a configuration
/// error: `run` and `validate --agent` exit 78 (they exited 1, and systemd restarted the
/// agent into it), whether ONNX Runtime loads or not. ONNX Runtime that does not load stays
/// a failure (exit 1): installing it mends that without touching the configuration.
#[test]
fn missing_graph_exits_78_and_a_missing_runtime_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("no-graph");
    std::fs::create_dir(&model).unwrap();
    for file in ["model.json", "model.safetensors"] {
        std::fs::copy(repo(PAE).join(file), model.join(file)).unwrap();
    }
    let config = |name: &str, model_dir: &std::path::Path| {
        let p = dir.path().join(name);
        std::fs::write(
            &p,
            format!(
                "[agent]\nmodel_dir = \"{}\"\n[score]\nbackend = \"onnx\"\n[mqtt]\nsubscribe = [\"org/+/cluster/+/node/+/plugin/+/chnl/data/#\"]\nport = 0\n[spool]\ndir = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
                model_dir.display(),
                dir.path().join("spool").display()
            ),
        )
        .unwrap();
        p
    };
    let no_graph = config("no-graph.toml", &model);
    let no_runtime = config("no-runtime.toml", &repo(PAE));
    let absent = "/nonexistent/libonnxruntime.so.1.31.1";
    let runtime = std::env::var("ORT_DYLIB_PATH").unwrap_or_default();
    for args in [
        &["validate", "--agent", "--config"][..],
        &["run", "--config"],
    ] {
        // Under `timeout`: an agent that starts anyway must fail the test, not hang it.
        let binary = |cfg: &std::path::Path, library: &str| {
            run(darkwatch_within(60)
                .args(args)
                .arg(cfg)
                .env("ORT_DYLIB_PATH", library))
        };
        for library in [runtime.as_str(), absent] {
            let (code, out, err) = binary(&no_graph, library);
            assert_eq!(code, 78, "{args:?} with {library:?}: {out}{err}");
            assert!(
                err.contains("key `agent.model_dir`")
                    && err.contains("no-graph/model.onnx: no such file")
                    && err.contains("tools/export_onnx.py"),
                "{err}"
            );
            assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
        }
        let (code, out, err) = binary(&no_runtime, absent);
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert!(err.contains(absent), "{err}");
    }
}
