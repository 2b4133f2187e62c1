//! SAE checkpoints: every fixture in tests/data/sae (SAELens v6 and pre-6, sparsify; f32,
//! f16, bf16) loaded and run against its numpy reference, and malformed checkpoints rejected
//! with errors that name the file and the key or tensor. Also what scoring allocates, and
//! the memory that reading float16 activations takes.

mod util;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use darkwatch::ingest::npy::read_npy;
use darkwatch::sae::dark::{DarkConfig, DarkHead, DarkStats};
use darkwatch::sae::{Normalization, Sae, SaeActivation, SaeError, SaeFormat};
use ndarray::{Array2, ArrayView2, s};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::Value;

/// Counts this thread's allocations, and the bytes it holds and the most it held (tests run
/// on parallel threads, so the counts are per thread; the `const` thread-locals need no
/// allocation or destructor of their own).
struct Counting;

thread_local! {
    static ALLOCATIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    static LIVE_BYTES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    static PEAK_BYTES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Moves this thread's live bytes by `+add − sub` (a block freed on another thread than
/// the one that allocated it can take it below 0: held at 0).
fn live_bytes(add: usize, sub: usize) {
    let live = LIVE_BYTES.with(|c| {
        let v = c.get().saturating_sub(sub).saturating_add(add);
        c.set(v);
        v
    });
    PEAK_BYTES.with(|c| c.set(c.get().max(live)));
}

unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        live_bytes(layout.size(), 0);
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        live_bytes(0, layout.size());
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        live_bytes(size, layout.size());
        unsafe { std::alloc::System.realloc(ptr, layout, size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(|c| c.get())
}

/// Runs `f` and returns its result with the most bytes this thread held at once meanwhile,
/// beyond what it held before (the result's own included).
fn peak_bytes<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = LIVE_BYTES.with(|c| c.get());
    PEAK_BYTES.with(|c| c.set(before));
    let out = f();
    (out, PEAK_BYTES.with(|c| c.get()) - before)
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sae")
}

fn npy(path: &Path) -> Array2<f32> {
    read_npy(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .values
}

fn expected(case: &Path) -> Value {
    serde_json::from_slice(&fs::read(case.join("expected.json")).unwrap()).unwrap()
}

fn cases() -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("expected.json").is_file())
        .collect();
    cases.sort();
    cases
}

/// Largest |a − b|, panicking on a shape mismatch.
fn max_abs_diff(a: ArrayView2<f32>, b: ArrayView2<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn assert_close(what: &str, case: &Path, got: ArrayView2<f32>, want: ArrayView2<f32>, tol: f32) {
    let diff = max_abs_diff(got, want);
    // Shown with `--nocapture`: how close each case comes.
    eprintln!(
        "{}: {what} max |diff| {diff:.1e}",
        case.file_name().unwrap().to_string_lossy()
    );
    assert!(
        diff <= tol,
        "{}: {what} differs by {diff} (tolerance {tol})",
        case.display()
    );
}

#[test]
fn every_fixture_matches_its_numpy_reference() {
    let cases = cases();
    assert_eq!(cases.len(), 11, "fixture cases: {cases:?}");
    for case in &cases {
        let exp = expected(case);
        let dir = case.join(exp["checkpoint_dir"].as_str().unwrap());
        let sae = Sae::load(&dir).unwrap_or_else(|e| panic!("{}: {e}", case.display()));
        let name = case.file_name().unwrap().to_string_lossy().into_owned();

        // What the loader inferred.
        assert_eq!(sae.d_in(), exp["d_in"].as_u64().unwrap() as usize, "{name}");
        assert_eq!(
            sae.d_sae(),
            exp["d_sae"].as_u64().unwrap() as usize,
            "{name}"
        );
        let want_activation = match exp["architecture"].as_str().unwrap() {
            "standard" => SaeActivation::Relu,
            "jumprelu" => SaeActivation::JumpRelu,
            "topk" => SaeActivation::TopK {
                k: exp["k"].as_u64().unwrap() as usize,
            },
            other => panic!("{name}: architecture {other}"),
        };
        assert_eq!(sae.activation(), want_activation, "{name}");
        assert_eq!(
            sae.apply_b_dec_to_input(),
            exp["apply_b_dec_to_input"].as_bool().unwrap(),
            "{name}"
        );
        assert_eq!(
            sae.normalization().name(),
            exp["normalize_activations"].as_str().unwrap(),
            "{name}"
        );
        let dtype = match exp["weights_dtype"].as_str().unwrap() {
            "float32" => "F32",
            "float16" => "F16",
            "bfloat16" => "BF16",
            other => panic!("{name}: dtype {other}"),
        };
        assert_eq!(sae.info().stored_dtype, dtype, "{name}");
        let format = match exp["format"].as_str().unwrap() {
            "saelens" => SaeFormat::SaeLens,
            _ => SaeFormat::Sparsify,
        };
        assert_eq!(sae.info().format, format, "{name}");

        // The forward pass against the references.
        let x = npy(&case.join("x.npy"));
        // The fixtures allow 1e-4; an f32 implementation lands within 6e-6 (README there).
        let tol = (exp["tolerance_abs"].as_f64().unwrap() as f32).min(1e-5);
        let mut ws = sae.workspace(x.nrows());
        let out = sae.forward(x.view(), &mut ws).unwrap();
        assert_close(
            "pre_acts",
            case,
            out.pre_acts(),
            npy(&case.join("pre_acts.npy")).view(),
            tol,
        );
        assert_close(
            "latents",
            case,
            out.latents_dense().view(),
            npy(&case.join("latents.npy")).view(),
            tol,
        );
        assert_close(
            "recon",
            case,
            out.recon(),
            npy(&case.join("recon.npy")).view(),
            tol,
        );
        let error = npy(&case.join("error.npy"));
        assert_close("error", case, out.error(), error.view(), tol);
        for (r, want) in exp["active_per_row"].as_array().unwrap().iter().enumerate() {
            assert_eq!(out.l0(r), want.as_u64().unwrap() as usize, "{name} row {r}");
            let sq: f32 = error.row(r).iter().map(|v| v * v).sum();
            assert!(
                (out.error_sq_norm()[r] - sq).abs() <= 1e-4 * sq.max(1.0),
                "{name} row {r}"
            );
        }
    }
}

#[test]
fn rows_give_the_same_result_alone_or_in_a_batch() {
    let case = fixtures().join("saelens_topk_v6");
    let sae = Sae::load(&case.join("checkpoint")).unwrap();
    let x = npy(&case.join("x.npy"));
    let mut ws = sae.workspace(2);
    let batched = {
        let out = sae.forward(x.view(), &mut ws).unwrap(); // grows the workspace
        out.error().to_owned()
    };
    assert!(ws.capacity() >= x.nrows());
    for r in 0..x.nrows() {
        let out = sae.forward(x.slice(s![r..r + 1, ..]), &mut ws).unwrap();
        let diff = max_abs_diff(out.error(), batched.slice(s![r..r + 1, ..]));
        assert!(diff < 1e-5, "row {r}: {diff}");
    }
    // A column-strided input (a transposed copy) gives the same numbers.
    let xt = x.t().to_owned();
    let out = sae.forward(xt.t(), &mut ws).unwrap();
    assert!(max_abs_diff(out.error(), batched.view()) < 1e-6);
}

#[test]
fn pre6_standard_architecture_with_topk_activation_runs_topk() {
    let case = fixtures().join("saelens_topk_pre6_standard_arch");
    let sae = Sae::load(&case.join("checkpoint")).unwrap();
    assert_eq!(sae.activation(), SaeActivation::TopK { k: 8 });
    let x = npy(&case.join("x.npy"));
    let mut ws = sae.workspace(8);
    let out = sae.forward(x.view(), &mut ws).unwrap();
    // Running ReLU instead (what SAELens 6 does with this file) would activate ≈ 30.
    let relu = expected(&case)["relu_instead_of_topk_active_per_row"].clone();
    for r in 0..x.nrows() {
        assert_eq!(out.l0(r), 8);
        assert!(relu[r].as_u64().unwrap() > 8);
    }
}

#[test]
fn expected_average_only_in_runs_as_identity_unless_given_the_factor() {
    let case = fixtures().join("saelens_relu_expected_average_only_in");
    let exp = expected(&case);
    let mut sae = Sae::load(&case.join("checkpoint")).unwrap();
    assert_eq!(
        sae.normalization(),
        Normalization::ExpectedAverageOnlyIn {
            scaling_factor: None
        }
    );
    let s = exp["norm_scaling_factor"].as_f64().unwrap() as f32;
    sae.set_norm_scaling_factor(s).unwrap();
    let x = npy(&case.join("x.npy"));
    let mut ws = sae.workspace(8);
    let out = sae.forward(x.view(), &mut ws).unwrap();
    let tol = 1e-4;
    assert_close(
        "pre_acts_scaled",
        &case,
        out.pre_acts(),
        npy(&case.join("pre_acts_scaled.npy")).view(),
        tol,
    );
    assert_close(
        "latents_scaled",
        &case,
        out.latents_dense().view(),
        npy(&case.join("latents_scaled.npy")).view(),
        tol,
    );
    assert_close(
        "recon_scaled",
        &case,
        out.recon(),
        npy(&case.join("recon_scaled.npy")).view(),
        tol,
    );
    assert_close(
        "error_scaled",
        &case,
        out.error(),
        npy(&case.join("error_scaled.npy")).view(),
        tol,
    );
    assert!(sae.set_norm_scaling_factor(0.0).is_err());
    let mut other = Sae::load(&fixtures().join("saelens_relu_v6/checkpoint")).unwrap();
    assert!(other.set_norm_scaling_factor(0.5).is_err());
}

/// Copies a fixture's checkpoint folder into a temp dir.
fn copy_checkpoint(case: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join(case).join("checkpoint");
    copy_dir(&src, tmp.path());
    let dir = tmp.path().to_path_buf();
    (tmp, dir)
}

fn copy_dir(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for entry in fs::read_dir(src).unwrap() {
        let p = entry.unwrap().path();
        let to = dst.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &to);
        } else {
            fs::copy(&p, &to).unwrap();
        }
    }
}

fn edit_cfg(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("cfg.json");
    let mut cfg: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    edit(cfg.as_object_mut().unwrap());
    fs::write(&path, serde_json::to_vec(&cfg).unwrap()).unwrap();
}

type Owned = (Dtype, Vec<usize>, Vec<u8>);

/// Rewrites a safetensors file after `edit` changed its tensors.
fn edit_weights(path: &Path, edit: impl FnOnce(&mut HashMap<String, Owned>)) {
    let bytes = fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: HashMap<String, Owned> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec())))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, (d, shape, data))| (n.clone(), TensorView::new(*d, shape.clone(), data).unwrap()))
        .collect();
    fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn load_err(dir: &Path) -> (SaeError, String) {
    let err = Sae::load(dir).expect_err("the checkpoint is malformed");
    let msg = err.to_string();
    (err, msg)
}

#[test]
fn gemma_scope_guard_subtracting_b_dec_would_change_the_output() {
    let case = fixtures().join("saelens_jumprelu_gemmascope");
    let (_tmp, dir) = copy_checkpoint("saelens_jumprelu_gemmascope");
    edit_cfg(&dir, |cfg| {
        cfg.insert("apply_b_dec_to_input".into(), Value::Bool(true));
    });
    let wrong = Sae::load(&dir).unwrap();
    let x = npy(&case.join("x.npy"));
    let mut ws = wrong.workspace(8);
    let out = wrong.forward(x.view(), &mut ws).unwrap();
    let diff = max_abs_diff(out.recon(), npy(&case.join("recon.npy")).view());
    let guard = expected(&case)["guard_max_abs_diff_if_b_dec_wrongly_subtracted"]["recon"]
        .as_f64()
        .unwrap() as f32;
    assert!((diff - guard).abs() < 1e-3, "{diff} vs {guard}");
}

#[test]
fn sparsify_run_folder_with_one_layer_loads_and_several_are_listed() {
    let case = fixtures().join("sparsify_topk_f32");
    let parent = Sae::load(&case.join("checkpoint")).unwrap();
    assert_eq!(parent.info().hook.as_deref(), Some("layers.3"));
    assert_eq!(parent.activation(), SaeActivation::TopK { k: 8 });

    let (_tmp, dir) = copy_checkpoint("sparsify_topk_f32");
    copy_dir(&dir.join("layers.3"), &dir.join("layers.10"));
    let (err, msg) = load_err(&dir);
    assert!(matches!(err, SaeError::SeveralLayers { .. }), "{msg}");
    assert!(msg.contains("layers.10, layers.3"), "{msg}");
    // The layer folder itself still loads.
    assert!(Sae::load(&dir.join("layers.10")).is_ok());

    let empty = tempfile::tempdir().unwrap();
    let (err, msg) = load_err(empty.path());
    assert!(matches!(err, SaeError::NotACheckpoint { .. }), "{msg}");
    let (err, _) = load_err(&empty.path().join("nope"));
    assert!(matches!(err, SaeError::Io { .. }));
}

#[test]
fn missing_tensor_is_named_with_the_file() {
    let (_tmp, dir) = copy_checkpoint("saelens_relu_v6");
    edit_weights(&dir.join("sae_weights.safetensors"), |t| {
        t.remove("b_enc");
    });
    let (err, msg) = load_err(&dir);
    assert!(
        matches!(err, SaeError::MissingTensor { ref tensor, .. } if tensor == "b_enc"),
        "{msg}"
    );
    assert!(
        msg.contains("sae_weights.safetensors") && msg.contains("W_enc"),
        "{msg}"
    );

    // JumpReLU without its threshold.
    let (_tmp, dir) = copy_checkpoint("saelens_jumprelu_bf16");
    edit_weights(&dir.join("sae_weights.safetensors"), |t| {
        t.remove("threshold");
    });
    let (_, msg) = load_err(&dir);
    assert!(msg.contains("`threshold` is missing"), "{msg}");

    // sparsify without its encoder.
    let (_tmp, dir) = copy_checkpoint("sparsify_topk_bf16");
    edit_weights(&dir.join("layers.3/sae.safetensors"), |t| {
        t.remove("encoder.weight");
    });
    let (_, msg) = load_err(&dir);
    assert!(
        msg.contains("`encoder.weight` is missing") && msg.contains("layers.3"),
        "{msg}"
    );
}

#[test]
fn wrong_shape_says_expected_and_found() {
    let (_tmp, dir) = copy_checkpoint("saelens_topk_v6");
    edit_weights(&dir.join("sae_weights.safetensors"), |t| {
        // W_dec stored transposed: [16, 64] instead of [64, 16].
        t.get_mut("W_dec").unwrap().1 = vec![16, 64];
    });
    let (err, msg) = load_err(&dir);
    match err {
        SaeError::Shape {
            tensor,
            expected,
            found,
            ..
        } => {
            assert_eq!(tensor, "W_dec");
            assert_eq!(expected, vec![64, 16]);
            assert_eq!(found, vec![16, 64]);
        }
        other => panic!("{other}"),
    }
    assert!(
        msg.contains("[64, 16]") && msg.contains("[16, 64]"),
        "{msg}"
    );

    // The config's d_in disagrees with the tensors.
    let (_tmp, dir) = copy_checkpoint("saelens_relu_v6");
    edit_cfg(&dir, |cfg| {
        cfg.insert("d_in".into(), 17.into());
    });
    let (err, _) = load_err(&dir);
    assert!(matches!(err, SaeError::Shape { .. }));
}

#[test]
fn unknown_architecture_and_unsupported_options_are_refused() {
    for (arch, needle) in [
        ("gated", "gated"),
        ("batchtopk", "batchtopk"),
        ("mystery", "mystery"),
    ] {
        let (_tmp, dir) = copy_checkpoint("saelens_relu_v6");
        edit_cfg(&dir, |cfg| {
            cfg.insert("architecture".into(), arch.into());
        });
        let (err, msg) = load_err(&dir);
        assert!(matches!(err, SaeError::Unsupported { .. }), "{msg}");
        assert!(msg.contains(needle) && msg.contains("cfg.json"), "{msg}");
    }
    let (_tmp, dir) = copy_checkpoint("saelens_topk_v6");
    edit_cfg(&dir, |cfg| {
        cfg.insert("rescale_acts_by_decoder_norm".into(), true.into());
    });
    assert!(matches!(load_err(&dir).0, SaeError::Unsupported { .. }));
    let (_tmp, dir) = copy_checkpoint("sparsify_topk_f32");
    edit_cfg(&dir.join("layers.3"), |cfg| {
        cfg.insert("activation".into(), "groupmax".into());
    });
    let (_, msg) = load_err(&dir);
    assert!(msg.contains("groupmax"), "{msg}");
    let (_tmp, dir) = copy_checkpoint("saelens_relu_v6");
    edit_cfg(&dir, |cfg| {
        cfg.insert("normalize_activations".into(), "whiten".into());
    });
    let (err, msg) = load_err(&dir);
    assert!(
        matches!(err, SaeError::Config { ref key, .. } if key == "normalize_activations"),
        "{msg}"
    );
}

#[test]
fn topk_without_k_is_refused() {
    let (_tmp, dir) = copy_checkpoint("saelens_topk_v6");
    edit_cfg(&dir, |cfg| {
        cfg.remove("k");
    });
    let (err, msg) = load_err(&dir);
    assert!(
        matches!(err, SaeError::Config { ref key, .. } if key == "k"),
        "{msg}"
    );

    let (_tmp, dir) = copy_checkpoint("saelens_topk_pre6_topk_arch");
    edit_cfg(&dir, |cfg| {
        cfg.remove("activation_fn_kwargs");
    });
    let (_, msg) = load_err(&dir);
    assert!(msg.contains("`k`") && msg.contains("missing"), "{msg}");

    let (_tmp, dir) = copy_checkpoint("sparsify_topk_f32");
    edit_cfg(&dir.join("layers.3"), |cfg| {
        cfg.remove("k");
    });
    assert!(matches!(load_err(&dir).0, SaeError::Config { .. }));

    let (_tmp, dir) = copy_checkpoint("saelens_topk_v6");
    edit_cfg(&dir, |cfg| {
        cfg.insert("k".into(), 65.into());
    });
    let (_, msg) = load_err(&dir);
    assert!(msg.contains("outside 1..=64"), "{msg}");
}

#[test]
fn bad_files_give_errors_not_panics() {
    // Not JSON.
    let (_tmp, dir) = copy_checkpoint("saelens_relu_v6");
    fs::write(dir.join("cfg.json"), b"{ \"d_in\": 16,").unwrap();
    assert!(matches!(load_err(&dir).0, SaeError::Json { .. }));
    // Truncated weights.
    let (_tmp, dir) = copy_checkpoint("saelens_relu_v6");
    let path = dir.join("sae_weights.safetensors");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let (err, msg) = load_err(&dir);
    assert!(matches!(err, SaeError::Weights { .. }), "{msg}");
    assert!(msg.contains("sae_weights.safetensors"), "{msg}");
    // An unsupported dtype.
    let (_tmp, dir) = copy_checkpoint("saelens_relu_v6");
    edit_weights(&dir.join("sae_weights.safetensors"), |t| {
        let b = t.get_mut("b_enc").unwrap();
        b.0 = Dtype::I32;
    });
    let (err, msg) = load_err(&dir);
    assert!(matches!(err, SaeError::Dtype { .. }), "{msg}");
    assert!(msg.contains("b_enc") && msg.contains("I32"), "{msg}");
    // A NaN weight.
    let (_tmp, dir) = copy_checkpoint("saelens_relu_v6");
    edit_weights(&dir.join("sae_weights.safetensors"), |t| {
        t.get_mut("W_enc").unwrap().2[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let (err, msg) = load_err(&dir);
    assert!(matches!(err, SaeError::NonFinite { index: 0, .. }), "{msg}");
    // A wrong type in the config.
    let (_tmp, dir) = copy_checkpoint("saelens_relu_v6");
    edit_cfg(&dir, |cfg| {
        cfg.insert("d_sae".into(), "sixty-four".into());
    });
    let (err, msg) = load_err(&dir);
    assert!(
        matches!(err, SaeError::Config { ref key, .. } if key == "d_sae"),
        "{msg}"
    );
    // Input of the wrong width.
    let sae = Sae::load(&fixtures().join("saelens_relu_v6/checkpoint")).unwrap();
    let mut ws = sae.workspace(1);
    let err = sae
        .forward(Array2::zeros((1, 15)).view(), &mut ws)
        .unwrap_err();
    assert!(matches!(
        err,
        SaeError::InputWidth {
            expected: 16,
            found: 15
        }
    ));
}

#[test]
fn nan_input_shows_in_the_error() {
    let sae = Sae::load(&fixtures().join("saelens_topk_v6/checkpoint")).unwrap();
    let mut x = npy(&fixtures().join("saelens_topk_v6/x.npy"));
    x[[2, 3]] = f32::NAN;
    let mut ws = sae.workspace(8);
    let out = sae.forward(x.view(), &mut ws).unwrap();
    assert!(out.error_sq_norm()[2].is_nan());
    assert!(out.error_sq_norm()[1].is_finite());
}

#[test]
fn dark_head_fits_on_sae_errors_of_real_activations() {
    // A random TopK SAE on the MiniLM fixture: its error is far from linear in x, but the
    // pipeline (forward → accumulate → fit → score) must run end to end and give finite,
    // consistent numbers; the vector R² on the fit rows is at least that of predicting ē.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/activations");
    let train = npy(&dir.join("train.npy"));
    let test = npy(&dir.join("test.npy"));
    let sae = Sae::random(384, 1024, 16, 1).unwrap();
    let mut ws = sae.workspace(256);
    let mut stats = DarkStats::new(384);
    for chunk in train.axis_chunks_iter(ndarray::Axis(0), 256) {
        let out = sae.forward(chunk, &mut ws).unwrap();
        stats.accumulate(chunk, out.error()).unwrap();
    }
    assert_eq!(stats.rows(), 1200);
    let held = test.slice(s![..320, ..]);
    let mut held_err = Array2::zeros((320, 384));
    for (i, chunk) in held.axis_chunks_iter(ndarray::Axis(0), 256).enumerate() {
        let out = sae.forward(chunk, &mut ws).unwrap();
        held_err
            .slice_mut(s![i * 256..i * 256 + chunk.nrows(), ..])
            .assign(&out.error());
    }
    let cfg = DarkConfig { ridge: 1e-2 };
    let fit = DarkHead::fit(&stats, &cfg, Some((held, held_err.view()))).unwrap();
    // The one-call helper (other chunking) gives the same head and R².
    let helper = DarkHead::fit_sae(&sae, train.view(), Some(held), &cfg, 100).unwrap();
    let (a, b) = (fit.held_out.unwrap(), helper.held_out.unwrap());
    assert!((a.vector - b.vector).abs() < 1e-6 && (a.norm - b.norm).abs() < 1e-6);
    assert!(DarkHead::fit_sae(&sae, train.slice(s![.., ..10]), None, &cfg, 8).is_err());
    let held_r2 = fit.held_out.unwrap();
    assert!(
        fit.train.vector >= 0.0 && fit.train.vector <= 1.0,
        "{:?}",
        fit.train
    );
    assert!(
        held_r2.vector.is_finite() && held_r2.norm.is_finite(),
        "{held_r2:?}"
    );
    let mut dws = fit.head.workspace(320);
    let scores = fit.head.score(held, held_err.view(), &mut dws).unwrap();
    for (r, sc) in scores.iter().enumerate() {
        let sq: f32 = held_err.row(r).iter().map(|v| v * v).sum();
        assert!((sc.error_sq_norm - sq).abs() <= 1e-3 * sq);
        assert!(sc.deviation.is_finite() && sc.nonlinear_sq_norm >= 0.0);
    }
}

/// A float16 `.npy` activation dump (`[batch, seq, d]`, as language-model code writes it) is
/// read straight into float32: at most the file's bytes and the float32 matrix are held at
/// once. It used to go through a float64 copy, about 7× the file's size at the peak.
#[test]
fn float16_activations_are_read_without_a_wider_copy() {
    let (batch, seq, d) = (8, 128, 512);
    let n = batch * seq * d;
    let value = |i: usize| half::f16::from_f32((i % 4001) as f32 / 64.0 - 31.25);
    let data: Vec<u8> = (0..n).flat_map(|i| value(i).to_le_bytes()).collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("acts.npy");
    util::write_npy(&path, "<f2", &format!("({batch}, {seq}, {d})"), &data);
    let file = fs::metadata(&path).unwrap().len() as usize;

    let ((x, shape), peak) =
        peak_bytes(|| darkwatch::sae::eval::read_activations_shaped(&path, None).unwrap());
    assert_eq!(shape, [batch, seq, d]);
    assert_eq!(x.dim(), (batch * seq, d));
    for i in [0, 1, 4000, 4001, n / 2 + 7, n - 1] {
        assert_eq!(x[[i / d, i % d]], value(i).to_f32(), "value {i}");
    }
    // 1 MiB of file, 2 MiB of float32; names of the 512 features and the like besides.
    let out = 4 * n;
    assert!(
        peak <= file + out + 64 * 1024,
        "reading a {file}-byte float16 file into {out} bytes of float32 held {peak} bytes \
         ({:.1}× the file)",
        peak as f64 / file as f64
    );
}

#[test]
fn forward_and_dark_scoring_do_not_allocate() {
    for case in [
        "saelens_topk_v6",
        "saelens_relu_layer_norm",
        "saelens_jumprelu_bf16",
    ] {
        let sae = Sae::load(&fixtures().join(case).join("checkpoint")).unwrap();
        let x = npy(&fixtures().join(case).join("x.npy"));
        let mut ws = sae.workspace(8);
        let mut stats = DarkStats::new(16);
        let out = sae.forward(x.view(), &mut ws).unwrap();
        stats.accumulate(x.view(), out.error()).unwrap();
        let errors = out.error().to_owned();
        let head = DarkHead::fit(&stats, &DarkConfig::default(), None)
            .unwrap()
            .head;
        let mut dws = head.workspace(8);
        let (mut in_forward, mut in_score) = (0, 0);
        let mut total = 0.0f32;
        for r in 0..200 {
            let n = 1 + r % 8;
            let before = allocations();
            let out = sae.forward(x.slice(s![..n, ..]), &mut ws).unwrap();
            total += out.error_sq_norm()[0];
            in_forward += allocations() - before;
            let before = allocations();
            let scores = head
                .score(x.slice(s![..n, ..]), errors.slice(s![..n, ..]), &mut dws)
                .unwrap();
            total += scores[0].deviation;
            in_score += allocations() - before;
        }
        assert_eq!((in_forward, in_score), (0, 0), "{case}");
        assert!(total.is_finite());
    }
}

/// The agent's SAE scorer (SAE, head, score pick, per-dimension contributions, top-k) runs
/// a batch without allocating, and agrees with `score_tokens`.
#[test]
fn live_sae_scorer_does_not_allocate_and_matches_score_tokens() {
    use darkwatch::pipeline::{BatchScorer, Contribution};
    use darkwatch::sae::detector::{
        Calibration, CalibrationRows, SaeDetector, SaeScoreKind, SaeScorer,
    };
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("saelens_topk_v6");
    for f in ["cfg.json", "sae_weights.safetensors"] {
        fs::copy(src.join("checkpoint").join(f), dir.path().join(f)).unwrap();
    }
    let sae = Sae::load(dir.path()).unwrap();
    let x = npy(&src.join("x.npy"));
    let fit = DarkHead::fit_sae(&sae, x.view(), None, &DarkConfig::default(), 8).unwrap();
    let dark = dir.path().join(darkwatch::sae::eval::DARK_DIR);
    fit.head.save(&dark).unwrap();
    let offline = darkwatch::sae::eval::score_tokens(&sae, &fit.head, x.view()).unwrap();
    let many: Vec<_> = (0..60).map(|i| offline[i % offline.len()]).collect();
    Calibration::from_scores(&many, CalibrationRows::Training, 1000)
        .save(&dark)
        .unwrap();
    for kind in SaeScoreKind::ALL {
        let det = std::sync::Arc::new(SaeDetector::load(dir.path(), kind).unwrap());
        let mut scorer = SaeScorer::new(det, 8, 3).unwrap();
        let d = scorer.n_features();
        let n = x.nrows().min(8);
        let mut top = [Contribution::default(); darkwatch::config::MAX_TOP_CONTRIBUTIONS];
        let mut allocated = 0;
        for _ in 0..50 {
            scorer.input_mut()[..n * d].copy_from_slice(
                x.slice(s![..n, ..])
                    .as_standard_layout()
                    .as_slice()
                    .unwrap(),
            );
            let before = allocations();
            scorer.score_batch(n);
            let got = scorer.top_contributions(0, &mut top);
            allocated += allocations() - before;
            assert_eq!(got, 3);
        }
        assert_eq!(allocated, 0, "{kind:?}");
        for (i, &s) in scorer.batch_scores().iter().enumerate() {
            let want = kind.pick(&offline[i]);
            assert!(
                (s - want).abs() <= 1e-4 * want.abs().max(1.0),
                "{kind:?} row {i}: {s} vs {want}"
            );
        }
        // The top contribution is the row's largest squared error (or unexplained error).
        assert!(top[0].value >= top[1].value && top[1].value >= top[2].value);
        assert!(top[0].value > 0.0);
    }
}

#[test]
fn older_config_spellings_load_the_same_sae() {
    // Older 6.x builds wrote `meta` instead of `metadata`.
    let case = fixtures().join("saelens_jumprelu_gemmascope");
    let reference = Sae::load(&case.join("checkpoint")).unwrap();
    assert_eq!(
        reference.info().hook.as_deref(),
        Some("blocks.12.hook_resid_post")
    );
    let (_tmp, dir) = copy_checkpoint("saelens_jumprelu_gemmascope");
    edit_cfg(&dir, |cfg| {
        let meta = cfg.remove("metadata").unwrap();
        cfg.insert("meta".into(), meta);
    });
    let renamed = Sae::load(&dir).unwrap();
    assert_eq!(renamed.activation(), SaeActivation::JumpRelu);
    assert!(!renamed.apply_b_dec_to_input());
    assert_eq!(renamed.info().hook, reference.info().hook);

    // sparsify configs without `d_in` take it from b_dec.
    let (_tmp, dir) = copy_checkpoint("sparsify_topk_bf16");
    edit_cfg(&dir.join("layers.3"), |cfg| {
        cfg.remove("d_in");
    });
    let sae = Sae::load(&dir).unwrap();
    assert_eq!((sae.d_in(), sae.d_sae()), (16, 64));

    // A pre-6 boolean `normalize_activations`.
    let (_tmp, dir) = copy_checkpoint("saelens_topk_pre6_topk_arch");
    edit_cfg(&dir, |cfg| {
        cfg.insert("normalize_activations".into(), true.into());
    });
    assert_eq!(
        Sae::load(&dir).unwrap().normalization(),
        Normalization::ExpectedAverageOnlyIn {
            scaling_factor: None
        }
    );
}

#[test]
fn finetuning_scaling_factor_scales_the_latents_before_decoding() {
    let case = fixtures().join("saelens_relu_v6");
    let x = npy(&case.join("x.npy"));
    let (_tmp, dir) = copy_checkpoint("saelens_relu_v6");
    edit_cfg(&dir, |cfg| {
        cfg.insert("finetuning_scaling_factor".into(), true.into());
    });
    let (err, msg) = load_err(&dir);
    assert!(matches!(err, SaeError::MissingTensor { .. }), "{msg}");
    edit_weights(&dir.join("sae_weights.safetensors"), |t| {
        let twos: Vec<u8> = (0..64).flat_map(|_| 2.0f32.to_le_bytes()).collect();
        t.insert(
            "finetuning_scaling_factor".into(),
            (Dtype::F32, vec![64], twos),
        );
    });
    let sae = Sae::load(&dir).unwrap();
    let mut ws = sae.workspace(8);
    let out = sae.forward(x.view(), &mut ws).unwrap();
    // x̂ − b_dec doubles; the latents themselves are unchanged.
    let recon = npy(&case.join("recon.npy"));
    let b_dec = sae.b_dec().to_owned();
    let want = (&recon - &b_dec) * 2.0 + &b_dec;
    assert_close("recon", &case, out.recon(), want.view(), 1e-4);
    assert_close(
        "latents",
        &case,
        out.latents_dense().view(),
        npy(&case.join("latents.npy")).view(),
        1e-4,
    );
}

/// numpy saves float64 by default; such weights used to be refused ("has dtype F64, expected
/// F32, F16 or BF16"). They load, rounded to f32: the same SAE as the f32 file.
#[test]
fn f64_weights_load_as_their_f32_rounding() {
    let (_tmp, dir) = copy_checkpoint("saelens_relu_v6");
    let f32_sae = Sae::load(&dir).unwrap();
    edit_weights(&dir.join("sae_weights.safetensors"), |t| {
        for (dtype, _, data) in t.values_mut() {
            assert_eq!(*dtype, Dtype::F32);
            *data = data
                .chunks_exact(4)
                .flat_map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes())
                .collect();
            *dtype = Dtype::F64;
        }
    });
    let f64_sae = Sae::load(&dir).unwrap();
    assert_eq!(f64_sae.info().stored_dtype, "F64");
    assert_eq!(f64_sae.w_dec(), f32_sae.w_dec());
    assert_eq!(f64_sae.b_enc(), f32_sae.b_enc());
    let x = npy(&fixtures().join("saelens_relu_v6/x.npy"));
    let (mut w1, mut w2) = (f32_sae.workspace(8), f64_sae.workspace(8));
    assert_eq!(
        f32_sae.forward(x.view(), &mut w1).unwrap().error(),
        f64_sae.forward(x.view(), &mut w2).unwrap().error()
    );
    // Beyond f32's range a value is not finite, and is refused as such.
    edit_weights(&dir.join("sae_weights.safetensors"), |t| {
        t.get_mut("b_dec").unwrap().2[..8].copy_from_slice(&1e300f64.to_le_bytes());
    });
    let (err, msg) = load_err(&dir);
    assert!(matches!(err, SaeError::NonFinite { index: 0, .. }), "{msg}");
}

/// A sparsify cfg.json with neither `num_latents` nor `expansion_factor` used to be read as
/// sparsify's default factor 32 and fail on the shape of `encoder.weight`; the missing keys
/// are named.
#[test]
fn sparsify_config_without_a_latent_count_names_the_keys() {
    let (_tmp, dir) = copy_checkpoint("sparsify_topk_f32");
    edit_cfg(&dir.join("layers.3"), |cfg| {
        cfg.remove("num_latents");
        cfg.remove("expansion_factor");
    });
    let (err, msg) = load_err(&dir);
    assert!(
        matches!(err, SaeError::Config { ref key, .. } if key == "num_latents"),
        "{msg}"
    );
    assert!(
        msg.contains("layers.3/cfg.json")
            && msg.contains("`expansion_factor`")
            && msg.contains("encoder.weight [64, 16]"),
        "{msg}"
    );
    // Either key alone is enough.
    edit_cfg(&dir.join("layers.3"), |cfg| {
        cfg.insert("expansion_factor".into(), 4.into());
    });
    assert_eq!(Sae::load(&dir).unwrap().d_sae(), 64);
}

/// `cfg.json` holding `[]` (valid JSON, but no object) used to be called "not valid JSON".
#[test]
fn a_config_that_is_not_an_object_says_so() {
    let (_tmp, dir) = copy_checkpoint("saelens_relu_v6");
    for (text, found) in [("[]", "an array"), ("16", "a number"), ("null", "null")] {
        fs::write(dir.join("cfg.json"), text).unwrap();
        let (err, msg) = load_err(&dir);
        assert!(matches!(err, SaeError::NotAnObject { .. }), "{msg}");
        assert!(
            msg.contains("cfg.json: must be a JSON object")
                && msg.contains(&format!("found {found}"))
                && !msg.contains("not valid JSON"),
            "{msg}"
        );
    }
}

/// The weights' sha256 is taken as they load: what a dark-matter head records and checks.
#[test]
fn loading_records_the_weights_sha256() {
    use sha2::Digest;
    let case = fixtures().join("sparsify_topk_f32/checkpoint");
    let sae = Sae::load(&case).unwrap();
    let bytes = fs::read(case.join("layers.3/sae.safetensors")).unwrap();
    let want: String = sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(sae.info().weights_sha256.as_deref(), Some(want.as_str()));
    assert_eq!(Sae::random(4, 8, 2, 0).unwrap().info().weights_sha256, None);
}

/// A JumpReLU checkpoint saved from SAELens' training SAE holds `log_threshold`, not
/// `threshold`; it used to be refused as missing `threshold`. It loads with
/// threshold = exp(log_threshold), the SAE the inference save would have written.
#[test]
fn jumprelu_log_threshold_loads_as_its_exponential() {
    let case = fixtures().join("saelens_jumprelu_gemmascope");
    let reference = Sae::load(&case.join("checkpoint")).unwrap();
    let (_tmp, dir) = copy_checkpoint("saelens_jumprelu_gemmascope");
    edit_weights(&dir.join("sae_weights.safetensors"), |tensors| {
        let (dtype, shape, data) = tensors.remove("threshold").unwrap();
        assert_eq!(dtype, Dtype::F32);
        let logs: Vec<u8> = data
            .chunks_exact(4)
            .flat_map(|c| f32::from_le_bytes(c.try_into().unwrap()).ln().to_le_bytes())
            .collect();
        tensors.insert("log_threshold".into(), (dtype, shape, logs));
    });
    let sae = Sae::load(&dir).unwrap();
    let x = npy(&case.join("x.npy"));
    let (mut a, mut b) = (reference.workspace(8), sae.workspace(8));
    let want = reference
        .forward(x.view(), &mut a)
        .unwrap()
        .recon()
        .to_owned();
    let got = sae.forward(x.view(), &mut b).unwrap().recon().to_owned();
    let diff = max_abs_diff(got.view(), want.view());
    assert!(diff < 1e-4, "{diff}");
}

/// A JumpReLU checkpoint holding both `threshold` and `log_threshold` used to load with
/// `threshold`, silently, whatever the other held: it loads when they agree (exp of the log
/// within rounding) and is refused, naming both, when they do not.
#[test]
fn jumprelu_threshold_and_log_threshold_must_agree() {
    let (_tmp, dir) = copy_checkpoint("saelens_jumprelu_gemmascope");
    let weights = dir.join("sae_weights.safetensors");
    let with_logs = |scale: f32| {
        edit_weights(&weights, |tensors| {
            let (dtype, shape, data) = tensors.get("threshold").cloned().unwrap();
            assert_eq!(dtype, Dtype::F32);
            let logs: Vec<u8> = data
                .chunks_exact(4)
                .flat_map(|c| {
                    (f32::from_le_bytes(c.try_into().unwrap()) * scale)
                        .ln()
                        .to_le_bytes()
                })
                .collect();
            tensors.insert("log_threshold".into(), (dtype, shape, logs));
        });
    };
    with_logs(1.0);
    Sae::load(&dir).unwrap();
    with_logs(1.5);
    let e = Sae::load(&dir).unwrap_err().to_string();
    assert!(
        e.contains("holds both `threshold` and `log_threshold`, and they disagree")
            && e.contains("sae_weights.safetensors"),
        "{e}"
    );
}

/// The README's live SAE example config ("Watching live activations") sets the SAE live
/// settings it argues for: `risk_q = 0.01` and alerts that resolve after about one prompt of
/// quiet tokens. The block is read as the agent reads a config file.
#[test]
fn the_readme_live_sae_config_sets_its_thresholds_and_hysteresis() {
    let readme =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme
        .split("### Watching live activations")
        .nth(1)
        .expect("the section");
    let block = section
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a toml block");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("live.toml");
    fs::write(&path, block).unwrap();
    let cfg = darkwatch::config::load(Some(&path), Vec::<(String, String)>::new()).unwrap();
    assert_eq!(cfg.threshold.risk_q, 0.01);
    assert_eq!(cfg.alert.resolve_after_frames, 64);
    assert_eq!(cfg.sae.score.name(), "error_norm");
}
