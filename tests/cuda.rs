//! The CUDA backend against the native one, on the bundled models and stream.
//!
//! Needs the `cuda` feature. Two kinds of test:
//!
//! * **No GPU** (this is what runs on a CPU-only machine): selecting CUDA with
//!   `fallback = "error"` fails and names the cause; with `fallback = "cpu"` it scores with
//!   the native kernels, bit for bit. On a machine with a usable GPU these two skip (they
//!   cannot see a missing GPU there) and say so.
//! * **GPU parity**: CUDA and native scores agree within 1e-4 relative. Without a usable
//!   GPU these skip with a printed note, unless `DARKWATCH_REQUIRE_GPU=1` is set (as
//!   `tools/gpu-check.sh` does): then a missing GPU fails them, so a GPU run cannot pass
//!   vacuously.
#![cfg(feature = "cuda")]

#[macro_use]
mod util;

use std::sync::Arc;

use darkwatch::config::{Backend, CudaConfig, CudaFallback, DarkwatchConfig};
use darkwatch::model::Model;
use darkwatch::model::cuda;
use darkwatch::pipeline::Scorer;
use darkwatch::score::{Head, HeadKind};
use util::parity::{self, BackendUnderTest, MSE, PAE, load_native, stream};
use util::repo;

fn require_gpu() -> bool {
    std::env::var("DARKWATCH_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// The GPU's name when device 0 is usable; `None` (after printing why) when it is not and
/// no GPU is required. Panics when `DARKWATCH_REQUIRE_GPU=1` and there is none.
fn gpu(test: &str) -> Option<String> {
    match cuda::probe(0) {
        Ok(name) => Some(name),
        Err(e) if require_gpu() => {
            panic!("{test}: DARKWATCH_REQUIRE_GPU=1 but no usable GPU: {e}")
        }
        Err(e) => {
            println!(
                "SKIPPED {test}: no usable GPU ({e}); set DARKWATCH_REQUIRE_GPU=1 to fail instead"
            );
            None
        }
    }
}

/// The cause when there is no usable GPU; `None` (after printing why) when there is one.
fn no_gpu(test: &str) -> Option<String> {
    match cuda::probe(0) {
        Ok(name) => {
            println!("SKIPPED {test}: a GPU is present ({name}); this test checks the no-GPU path");
            None
        }
        Err(e) => Some(e.to_string()),
    }
}

fn cuda_cfg(fallback: CudaFallback) -> CudaConfig {
    CudaConfig {
        fallback,
        ..CudaConfig::default()
    }
}

fn load_cuda(dir: &str, cfg: &CudaConfig) -> Model {
    load_native(dir).with_cuda(cfg).expect("CUDA model loads")
}

// ---------------------------------------------------------------- no GPU: the fallback path

#[test]
fn fallback_error_names_the_cause() {
    let Some(cause) = no_gpu("fallback_error_names_the_cause") else {
        return;
    };
    let e = load_native(PAE)
        .with_cuda(&cuda_cfg(CudaFallback::Error))
        .expect_err("no GPU: fallback = error refuses");
    let msg = e.to_string();
    println!("{msg}");
    assert!(msg.contains(&cause), "{msg} does not name {cause}");
    assert!(
        ["libcuda", "device", "cuBLAS", "NVRTC", "panicked"]
            .iter()
            .any(|w| msg.contains(w)),
        "{msg}"
    );
    // Through the configuration too (what replay and the agent use).
    let mut cfg = DarkwatchConfig::default();
    cfg.score.backend = Backend::Cuda;
    cfg.cuda.fallback = CudaFallback::Error;
    cfg.validate().expect("valid in a cuda build");
    let e = Model::load_configured(&repo(PAE), &cfg).expect_err("refused");
    assert!(e.to_string().contains(&cause), "{e}");
}

#[test]
fn fallback_cpu_scores_exactly_like_native() {
    let Some(cause) = no_gpu("fallback_cpu_scores_exactly_like_native") else {
        return;
    };
    let x = stream();
    for (dir, heads) in [
        (PAE, &[HeadKind::Wnll, HeadKind::Mse][..]),
        (MSE, &[HeadKind::Mse, HeadKind::MaxAbs][..]),
    ] {
        let native = Arc::new(load_native(dir));
        let fell_back = Arc::new(load_cuda(dir, &cuda_cfg(CudaFallback::Cpu)));
        assert!(fell_back.cuda.is_none());
        assert_eq!(
            fell_back.backend_label(),
            format!("native (cuda unavailable: {cause})")
        );
        for &kind in heads {
            let head = Head {
                kind,
                ..native.meta.head
            };
            let a = Scorer::new(native.clone(), head, 256, 3)
                .unwrap()
                .score_all(x.view());
            let b = Scorer::new(fell_back.clone(), head, 256, 3)
                .unwrap()
                .score_all(x.view());
            assert_eq!(a, b, "{dir} {}: fallback scores differ", kind.name());
        }
    }
}

#[test]
fn fallback_cpu_replay_reports_the_native_backend() {
    let Some(cause) = no_gpu("fallback_cpu_replay_reports_the_native_backend") else {
        return;
    };
    let native = util::replay_bundled(Backend::Native, PAE);
    let fell_back = util::replay_bundled(Backend::Cuda, PAE);
    assert!(
        fell_back.model.backend_label().contains(&cause),
        "{}",
        fell_back.model.backend_label()
    );
    assert_eq!(native.scores, fell_back.scores);
    assert_eq!(native.alert_spans, fell_back.alert_spans);
}

// ---------------------------------------------------------------- NVRTC (no GPU needed)

/// The kernels compile with NVRTC, to PTX and to CUBINs for the GPUs darkwatch targets.
/// Needs only libnvrtc.so.13 (a CUDA 13 toolkit or the `nvidia-cuda-nvrtc` wheel on
/// `LD_LIBRARY_PATH`), not a driver; skips without it unless `DARKWATCH_REQUIRE_GPU=1`.
#[test]
fn kernels_compile_with_nvrtc() {
    match cuda::compile_kernels(None) {
        Err(cuda::CudaError::Library { library }) if !require_gpu() => {
            println!("SKIPPED kernels_compile_with_nvrtc: {library} not found");
            return;
        }
        Err(e) => panic!("PTX: {e}"),
        Ok(_) => {}
    }
    for arch in ["sm_80", "sm_90"] {
        cuda::compile_kernels(Some(arch)).unwrap_or_else(|e| panic!("{arch}: {e}"));
    }
}

// ---------------------------------------------------------------- GPU parity

/// CUDA with `fallback = "error"`, where a GPU is usable (else the model tests skip, or fail
/// under `DARKWATCH_REQUIRE_GPU=1`). Scores agree within 1e-4 relative (fp32; the GPU runs
/// so far stayed under 7e-6), at batches 1 and 7 (CUDA graphs), 256 and 4096.
fn cuda_backend() -> BackendUnderTest {
    BackendUnderTest {
        backend: Backend::Cuda,
        load: Box::new(|dir| {
            gpu("the backend parity tests")?;
            let model = load_cuda(dir, &cuda_cfg(CudaFallback::Error));
            assert!(model.cuda.is_some());
            Some(model)
        }),
        label: "cuda/",
        tolerance: 1e-4,
        batches: &[1, 7, 256, 4096],
    }
}

// Every model test every backend runs against native (tests/util/parity.rs): the PAE, the
// plain AE and the 2-member ensemble on every head, mean-shift scoring, and a replay of
// the bundled stream (scores, alert spans, alert events). The ensemble and mean-shift
// tests, and the alert-event comparison, came after the last GPU run: not yet run on one.
backend_parity_tests!(cuda_backend());

/// The same contributions (not only scores) come out of the device's head, so the top
/// features must match.
///
/// Each row's contribution vector is compared as a vector: max_j |p_j − q_j| ≤ 1e-4 ·
/// max_j |p_j|. A term on its own can differ by more: a wnll term α·e²/v with e = x − μ̂ near
/// 0 moves by 2·δμ̂/e relative when the GPU and the CPU sum μ̂ in different orders (the first
/// GPU runs saw 2.4e-4 and 3.1e-4 on such small terms, relative to the term with a floor of
/// 1e-3). The top five features of every row must agree, up to ties within the tolerance.
#[test]
fn contributions_agree_with_native() {
    let Some(_) = gpu("contributions_agree_with_native") else {
        return;
    };
    let native = Arc::new(load_native(PAE));
    let gpu_model = Arc::new(load_cuda(PAE, &cuda_cfg(CudaFallback::Error)));
    let x = stream();
    let x = x.slice(ndarray::s![..4096, ..]);
    let head = native.meta.head;
    let mut a = Scorer::new(native, head, 4096, 3).unwrap();
    let mut b = Scorer::new(gpu_model, head, 4096, 3).unwrap();
    a.score_all(x);
    b.score_all(x);
    let (ca, cb) = (a.contributions(4096), b.contributions(4096));
    let (mut worst, mut at, mut top_mismatch) = (0.0f32, (0, 0), 0usize);
    let rank = |c: &ndarray::ArrayView1<f32>| {
        let mut o: Vec<usize> = (0..c.len()).collect();
        o.sort_by(|&i, &j| c[j].total_cmp(&c[i]));
        o
    };
    for (r, (p, q)) in ca.rows().into_iter().zip(cb.rows()).enumerate() {
        let scale = p.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
        for (j, (&u, &v)) in p.iter().zip(q.iter()).enumerate() {
            let rel = (u - v).abs() / scale;
            if rel > worst {
                (worst, at) = (rel, (r, j));
            }
        }
        // Native's top five must be the GPU's top five, unless a tie decides the order.
        let fifth = q[rank(&q)[4]];
        for &f in &rank(&p)[..5] {
            if q[f] < fifth - 1e-4 * scale {
                top_mismatch += 1;
            }
        }
    }
    let (r, j) = at;
    println!(
        "contributions: max |native - cuda| / (row's largest term) {worst:.2e}, at row {r} \
         feature {j} (native {} vs cuda {})",
        ca[[r, j]],
        cb[[r, j]]
    );
    assert!(worst <= 1e-4, "contributions differ by {worst:.2e}");
    assert_eq!(top_mismatch, 0, "rows whose top five features differ");
}

/// The bundled PAE, and its copy on the GPU.
fn pae_on_the_gpu() -> (Model, Arc<cuda::CudaModel>) {
    let gm = load_cuda(PAE, &cuda_cfg(CudaFallback::Error))
        .cuda
        .clone()
        .expect("on the GPU");
    (load_native(PAE), gm)
}

/// The device head against the host's for every wnll log-variance form (raw, excess,
/// bounded) on the PAE and the 2-member ensemble, at a graph batch and a launched one:
/// scores within 1e-4 relative, contributions within 2e-4 of the row's largest. (The
/// largest term of a row is often α·e²/v with a variance near its floor, where the GPU's and
/// the CPU's summation orders move v most: `excess` rows reached 8.0e-5 on the first H100
/// run, every other form stayed under 1e-5.) A row with a NaN scores NaN under every head
/// (max_abs included, whose maximum must not skip it).
#[test]
fn the_device_head_agrees_for_every_log_variance_form() {
    use darkwatch::score::LogVariance;
    let Some(_) = gpu("the_device_head_agrees_for_every_log_variance_form") else {
        return;
    };
    let mut x = stream().slice(ndarray::s![..1000, ..]).to_owned();
    x[[17, 5]] = f32::NAN;
    for dir in [PAE, parity::ENSEMBLE] {
        let native = Arc::new(load_native(dir));
        let gpu_model = Arc::new(load_cuda(dir, &cuda_cfg(CudaFallback::Error)));
        let forms = [LogVariance::Raw, LogVariance::Excess, LogVariance::Bounded];
        let heads = forms.iter().map(|&lv| (HeadKind::Wnll, lv)).chain([
            (HeadKind::Mse, LogVariance::Raw),
            (HeadKind::MaxAbs, LogVariance::Raw),
        ]);
        for (kind, log_variance) in heads {
            let head = Head {
                kind,
                log_variance,
                ..native.meta.head
            };
            for batch in [7, 1000] {
                let what = format!("{dir} {} {log_variance:?} batch {batch}", kind.name());
                let mut a = Scorer::new(native.clone(), head, batch, 3).unwrap();
                let mut b = Scorer::new(gpu_model.clone(), head, batch, 3).unwrap();
                let (mut want, mut got) = (Vec::new(), Vec::new());
                let mut worst = 0.0f32;
                for chunk in x.axis_chunks_iter(ndarray::Axis(0), batch) {
                    want.extend(a.score_all(chunk));
                    got.extend(b.score_all(chunk));
                    let n = chunk.nrows();
                    for (p, q) in a
                        .contributions(n)
                        .rows()
                        .into_iter()
                        .zip(b.contributions(n).rows())
                    {
                        if p.iter().any(|v| v.is_nan()) {
                            continue;
                        }
                        let scale = p.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
                        for (&u, &v) in p.iter().zip(q.iter()) {
                            worst = worst.max((u - v).abs() / scale);
                        }
                    }
                }
                assert!(
                    want[17].is_nan() && got[17].is_nan(),
                    "{what}: NaN row scored {} and {}",
                    want[17],
                    got[17]
                );
                want.remove(17);
                got.remove(17);
                parity::assert_close(&want, &got, 1e-4, &what);
                println!("{what}: contributions within {worst:.2e} of the row's largest");
                assert!(worst <= 2e-4, "{what}: contributions differ by {worst:.2e}");
            }
        }
    }
}

/// A session scores only with a head set, and only targets shaped like its input; setting
/// another head replaces the scoring graph a batch size captured (batches of 4 rows replay
/// one), so each head's scores match the native scorer's.
#[test]
fn device_scoring_refuses_a_missing_head_and_misshaped_targets() {
    use darkwatch::model::cuda::CudaSession;
    let Some(_) = gpu("device_scoring_refuses_a_missing_head_and_misshaped_targets") else {
        return;
    };
    let (native, gm) = pae_on_the_gpu();
    let raw = stream().slice(ndarray::s![..4, ..]).to_owned();
    let mut x = raw.clone();
    for row in x.rows_mut() {
        native.meta.scaler.apply_row(row);
    }
    let mut session = CudaSession::new(gm, 4).unwrap();
    let e = session.score(x.view(), None).expect_err("no head set");
    assert!(e.to_string().contains("no score head"), "{e}");
    let native = Arc::new(native);
    for kind in [HeadKind::Wnll, HeadKind::Mse, HeadKind::Wnll] {
        let head = Head {
            kind,
            ..native.meta.head
        };
        let baseline = darkwatch::score::prepare_member_baselines(
            &head,
            &native.meta.log_variance_baseline,
            native.n_features(),
            native.ae.members,
        );
        session.set_head(&head, &baseline).unwrap();
        let short = ndarray::Array2::<f32>::zeros((3, native.n_features()));
        let e = session
            .score(x.view(), Some(short.view()))
            .expect_err("3 targets for 4 rows");
        assert!(e.to_string().contains("targets are"), "{e}");
        let want = Scorer::new(native.clone(), head, 4, 3)
            .unwrap()
            .score_all(raw.view());
        for _ in 0..2 {
            let (scores, contrib) = session.score(x.view(), Some(x.view())).unwrap();
            assert_eq!(contrib.len(), 4 * native.n_features());
            parity::assert_close(
                &want,
                scores,
                1e-4,
                &format!("{} after set_head", kind.name()),
            );
        }
    }
    assert_eq!(session.graphs_off(), None, "graph capture failed");
}

/// Batches of up to `GRAPH_MAX_ROWS` replay a captured CUDA graph; larger ones launch call
/// by call. Both agree with the native forward, a replay gives the same bytes as the
/// capture, and the capture did not fail (else graphs would be silently off).
#[test]
fn small_batches_replay_a_cuda_graph() {
    use darkwatch::model::cuda::{CudaSession, GRAPH_MAX_ROWS};
    let Some(_) = gpu("small_batches_replay_a_cuda_graph") else {
        return;
    };
    let (native, gm) = pae_on_the_gpu();
    let mut x = stream().slice(ndarray::s![..512, ..]).to_owned();
    for row in x.rows_mut() {
        native.meta.scaler.apply_row(row);
    }
    let mut session = CudaSession::new(gm, 512).unwrap();
    let mut ws = native.ae.workspace(512);
    for n in [1, 2, 7, GRAPH_MAX_ROWS, GRAPH_MAX_ROWS + 1, 512, 1] {
        let xs = x.slice(ndarray::s![..n, ..]);
        let cpu = native.ae.forward(xs, &mut ws);
        let cpu: Vec<f32> = cpu
            .mean
            .iter()
            .chain(cpu.var.iter().flatten())
            .copied()
            .collect();
        let run = |s: &mut CudaSession| {
            s.forward(xs, |r| {
                r.mean
                    .iter()
                    .chain(r.var.iter().flatten())
                    .copied()
                    .collect::<Vec<f32>>()
            })
            .unwrap()
        };
        let first = run(&mut session);
        let again = run(&mut session);
        assert_eq!(
            first, again,
            "batch {n}: a replay differs from the first run"
        );
        // Compared as vectors (each row's means, then its variances): an output near 0
        // carries the rounding of its O(1) neighbours (the first GPU run: 8.539e-5 against
        // 8.551e-5, 1.2e-7 apart).
        let mut worst = 0.0f32;
        for (a, b) in cpu.chunks(x.ncols()).zip(first.chunks(x.ncols())) {
            let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
            for (u, v) in a.iter().zip(b) {
                worst = worst.max((u - v).abs() / scale);
            }
        }
        println!("forward, batch {n}: max |native - cuda| / (row's largest) {worst:.2e}");
        assert!(worst <= 1e-4, "batch {n}: outputs differ by {worst:.2e}");
    }
    assert_eq!(session.graphs_off(), None, "graph capture failed");
}

#[test]
fn a_missing_device_index_is_named() {
    let Some(_) = gpu("a_missing_device_index_is_named") else {
        return;
    };
    let cfg = CudaConfig {
        device: 999,
        fallback: CudaFallback::Error,
        tf32: false,
    };
    let e = load_native(PAE).with_cuda(&cfg).expect_err("device 999");
    assert!(e.to_string().contains("no such device"), "{e}");
}

// ---------------------------------------------------------------- SAE on the device

fn random_rows(n: usize, d: usize, seed: u64) -> ndarray::Array2<f32> {
    let mut rng = darkwatch::rng::Rng::new(seed);
    ndarray::Array2::from_shape_fn((n, d), |_| rng.uniform(-1.7, 1.7))
}

/// ‖e‖² per row from the device SAE against the CPU forward. A row whose k-th and (k+1)-th
/// pre-activations nearly tie can pick a different latent on each side (cuBLAS and the CPU
/// kernel sum in different orders), which changes its error by a whole decoder row: such
/// rows are counted (at most 1 %) and left out of the 1e-4 comparison.
#[test]
fn sae_forward_agrees_with_the_cpu() {
    use darkwatch::model::cuda::{CudaSae, SAE_TOPK_PARTS};
    use darkwatch::sae::Sae;
    let Some(_) = gpu("sae_forward_agrees_with_the_cpu") else {
        return;
    };
    // The second has a tail (1000 is no multiple of 4·4·32 latents), the third more k than
    // positive pre-activations (the row ends early), the fourth a width that is no multiple
    // of 4 (the scalar scan).
    for (d, d_sae, k, n) in [
        (64, 512, 8, 300),
        (32, 1000, 40, 100),
        (16, 300, 256, 50),
        (24, 999, 16, 60),
        (768, 32_768, 32, 512),
    ] {
        let sae = Sae::random(d, d_sae, k, 3).unwrap();
        let x = random_rows(n, d, 11);
        let mut ws = sae.workspace(n);
        let cpu = sae.forward(x.view(), &mut ws).unwrap();
        let mut dev = CudaSae::load(&sae, n, &cuda_cfg(CudaFallback::Error)).unwrap();
        let got = dev.forward(x.view()).unwrap().to_vec();
        let (idx, val) = dev.latents(n).unwrap();
        let (mut same_a, mut same_b, mut differ) = (Vec::new(), Vec::new(), 0usize);
        let mut active = Vec::new();
        for r in 0..n {
            cpu.active(r, &mut active);
            let mut a: Vec<u32> = active.iter().map(|&(i, _)| i as u32).collect();
            let mut b: Vec<u32> = idx[r * k..(r + 1) * k]
                .iter()
                .copied()
                .filter(|&i| i != u32::MAX)
                .collect();
            a.sort_unstable();
            b.sort_unstable();
            if a == b {
                same_a.push(cpu.error_sq_norm()[r]);
                same_b.push(got[r]);
            } else {
                differ += 1;
            }
        }
        println!("SAE {d}x{d_sae} k={k}: {differ} of {n} rows chose other latents");
        assert!(
            differ <= n / 100 + 1,
            "{differ} of {n} rows differ in their latents"
        );
        parity::assert_close(
            &same_a,
            &same_b,
            1e-4,
            &format!("SAE {d}x{d_sae} k={k} error"),
        );
        // Every split of a row over the TopK kernel's warps gives the same latents, in the
        // same order, and the same errors, bit for bit (segments shorter than k included).
        let chosen = dev.topk_parts(n);
        for parts in SAE_TOPK_PARTS {
            dev.set_topk_parts(Some(parts)).unwrap();
            let again = dev.forward(x.view()).unwrap().to_vec();
            let (idx_p, val_p) = dev.latents(n).unwrap();
            let what = format!("SAE {d}x{d_sae} k={k}, TopK in {parts} parts (chosen {chosen})");
            assert_eq!(idx_p, idx, "{what}: latents");
            assert_eq!(
                val_p.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                val.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{what}: values"
            );
            assert_eq!(
                again.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{what}: errors"
            );
        }
        assert!(dev.set_topk_parts(Some(3)).is_err(), "3 warps per row");
    }
}

/// Streaming: `SAE_SLOTS` batches in flight (one uploads while another computes), the host
/// filling the freed pinned buffer meanwhile. Every batch gives exactly what a blocking
/// forward of the same rows gives, in submission order, and one more submit is refused.
#[test]
fn sae_submit_and_wait_match_the_blocking_forward() {
    use darkwatch::model::cuda::{CudaSae, SAE_SLOTS};
    use darkwatch::sae::Sae;
    let Some(_) = gpu("sae_submit_and_wait_match_the_blocking_forward") else {
        return;
    };
    let (d, n) = (64, 200);
    let sae = Sae::random(d, 512, 8, 5).unwrap();
    let batches: Vec<_> = (0..7).map(|i| random_rows(n, d, 20 + i)).collect();
    let mut dev = CudaSae::load(&sae, n, &cuda_cfg(CudaFallback::Error)).unwrap();
    let want: Vec<Vec<f32>> = batches
        .iter()
        .map(|b| dev.forward(b.view()).unwrap().to_vec())
        .collect();
    let submit = |dev: &mut CudaSae, b: &ndarray::Array2<f32>| {
        dev.input_mut().unwrap()[..n * d].copy_from_slice(b.as_slice().unwrap());
        dev.submit(n).unwrap();
    };
    for b in &batches[..SAE_SLOTS] {
        submit(&mut dev, b);
    }
    assert!(
        dev.submit(n).is_err(),
        "a submit beyond SAE_SLOTS in flight"
    );
    assert!(
        dev.forward_input(n).is_err(),
        "a blocking forward while forwards are in flight"
    );
    for i in SAE_SLOTS..batches.len() {
        let got = dev.wait().unwrap().to_vec();
        assert_eq!(got, want[i - SAE_SLOTS], "batch {}", i - SAE_SLOTS);
        submit(&mut dev, &batches[i]);
    }
    for w in &want[batches.len() - SAE_SLOTS..] {
        assert_eq!(dev.wait().unwrap(), &w[..]);
    }
    assert!(dev.wait().unwrap().is_empty(), "nothing in flight");
    // Blocking again: the same errors.
    assert_eq!(dev.forward(batches[3].view()).unwrap(), &want[3][..]);
}

/// What the device SAE does not cover is refused before any CUDA call (so this runs
/// everywhere), with the reason.
#[test]
fn sae_on_the_device_refuses_what_it_does_not_cover() {
    use darkwatch::model::cuda::{CudaError, CudaSae};
    use darkwatch::sae::{Normalization, Sae, SaeActivation, SaeParts};
    // Every input normalisation is covered (a ReLU SAE: k is 0).
    let (d, d_sae) = (8, 32);
    for normalization in [Normalization::LayerNorm, Normalization::ConstantNormRescale] {
        let sae = Sae::from_parts(SaeParts {
            w_enc: ndarray::Array2::from_elem((d, d_sae), 0.1),
            b_enc: ndarray::Array1::zeros(d_sae),
            w_dec: ndarray::Array2::from_elem((d_sae, d), 0.1),
            b_dec: ndarray::Array1::zeros(d),
            threshold: None,
            activation: SaeActivation::Relu,
            apply_b_dec_to_input: false,
            normalization,
        })
        .unwrap();
        assert_eq!(CudaSae::check(&sae, 4).unwrap(), 0, "{normalization:?}");
    }
    // A TopK k beyond the kernel's.
    let wide = Sae::random(8, 512, 300, 1).unwrap();
    match CudaSae::load(&wide, 4, &CudaConfig::default()) {
        Err(CudaError::Unsupported(why)) => assert!(why.contains("TopK k = 300"), "{why}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
    // A batch the kernels cannot index in 32 bits.
    let topk = Sae::random(8, 32, 4, 1).unwrap();
    match CudaSae::load(&topk, 1 << 30, &CudaConfig::default()) {
        Err(CudaError::Unsupported(why)) => assert!(why.contains("2^32"), "{why}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

// ------------------------------------------------------- the SAE detector (SAE + dark head)

/// The bundled test activations: 320 prose tokens, then 320 out-of-distribution ones.
fn test_activations() -> ndarray::Array2<f32> {
    darkwatch::sae::eval::read_activations(&repo("tests/data/activations/test.npy"), None).unwrap()
}

/// Scores `x` in batches of `batch` rows; per row the score and its top contributions.
fn score_rows(
    scorer: &mut darkwatch::sae::detector::SaeScorer,
    x: &ndarray::Array2<f32>,
    batch: usize,
) -> Vec<(f32, Vec<darkwatch::pipeline::Contribution>)> {
    use darkwatch::pipeline::{BatchScorer, Contribution};
    let d = x.ncols();
    let mut rows = Vec::new();
    let mut top = [Contribution::default(); darkwatch::config::MAX_TOP_CONTRIBUTIONS];
    for chunk in x.axis_chunks_iter(ndarray::Axis(0), batch) {
        let n = chunk.nrows();
        scorer.input_mut()[..n * d].copy_from_slice(chunk.as_standard_layout().as_slice().unwrap());
        scorer.score_batch(n);
        for i in 0..n {
            let got = scorer.top_contributions(i, &mut top);
            rows.push((scorer.batch_scores()[i], top[..usize::from(got)].to_vec()));
        }
    }
    rows
}

/// The frames a pipeline scored: (seq, score, top features).
#[derive(Default)]
struct Frames(Vec<(u64, f32, Vec<u32>)>);

impl darkwatch::pipeline::Sink for Frames {
    // As the agent's sink: on the scorer thread.
    const ON_SCORER_THREAD: bool = true;
    fn accept(&mut self, f: &darkwatch::pipeline::ScoredFrame) {
        let top = f.top().iter().map(|c| c.feature).collect();
        self.0.push((f.meta.seq, f.score, top));
    }
}

/// The agent's path for an SAE detector on the GPU: the pipeline keeps two batches in
/// flight (`BatchScorer::overlaps`), filling and alerting on one while the device scores
/// the other. Every frame of a stream of 6,400 tokens, pushed unpaced through a ring of 512
/// so that batches queue, comes out once, in order, with the native scorer's score (within
/// 1e-4 relative; up to 1 % of rows, plus one, may keep other TopK latents, as in
/// `sae_forward_agrees_with_the_cpu`) and, where the scores agree, its top feature.
#[test]
fn the_pipeline_overlaps_sae_batches_on_the_device() {
    use darkwatch::pipeline::{self, BatchScorer, FileSource};
    use darkwatch::sae::detector::{SaeDetector, SaeScoreKind, SaeScorer};
    let Some(_) = gpu("the_pipeline_overlaps_sae_batches_on_the_device") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sae");
    util::sae::train_detector(&dir, 256, 16);
    let one = test_activations();
    let x = ndarray::concatenate(ndarray::Axis(0), &vec![one.view(); 10]).unwrap();
    let cfg = darkwatch::config::PipelineConfig {
        ring_capacity_frames: 512,
        ..Default::default()
    };
    let run = |backend| {
        let det = SaeDetector::load_on(
            &dir,
            SaeScoreKind::ErrorNorm,
            backend,
            &cuda_cfg(CudaFallback::Error),
            cfg.gpu_batch_frames(),
        )
        .unwrap();
        let scorer = SaeScorer::for_pipeline(Arc::new(det), &cfg, 3).unwrap();
        assert_eq!(scorer.overlaps(), backend == Backend::Cuda);
        let source = FileSource::new(x.clone(), None, None);
        let (report, frames) = pipeline::run_scorer(
            scorer,
            &cfg,
            darkwatch::ring::FullPolicy::Block,
            source,
            Frames::default(),
            None,
        )
        .unwrap();
        assert_eq!(report.frames_scored, x.nrows() as u64);
        frames.0
    };
    let (want, got) = (run(Backend::Native), run(Backend::Cuda));
    let seqs = |f: &[(u64, f32, Vec<u32>)]| f.iter().map(|r| r.0).collect::<Vec<_>>();
    assert_eq!(seqs(&got), (0..x.nrows() as u64).collect::<Vec<_>>());
    assert_eq!(seqs(&want), seqs(&got));
    let (mut apart, mut other_top) = (0, 0);
    for ((_, w, wt), (_, g, gt)) in want.iter().zip(&got) {
        if (w - g).abs() > 1e-4 * w.abs().max(1e-6) {
            apart += 1;
        } else if wt.first() != gt.first() {
            other_top += 1;
        }
    }
    println!(
        "pipeline, 6400 tokens: {apart} scores apart, {other_top} other top features (of rows that agree)"
    );
    assert!(apart <= x.nrows() / 100 + 1, "{apart} scores apart");
    assert!(
        other_top <= x.nrows() / 100 + 1,
        "{other_top} rows with another top feature"
    );
}

/// On the GPU, the SAE and its dark-matter head give every score kind within 1e-4 of the
/// native scorer (the deviation within 1e-4 of its terms ‖e‖²/σ, which it is the small
/// difference of), and the same top five contributions: each rank's value within 1e-4 of
/// the row's largest, and the same feature wherever the native values at that rank and its
/// neighbours (the sixth included) are not that close (a near-tie may swap). As in
/// `sae_forward_agrees_with_the_cpu`, up to 1 % of rows may keep other latents (a near-tie
/// at the k-th pre-activation, summed in another order), which moves their error by a
/// whole decoder row: those rows are counted, not compared.
#[test]
fn sae_detector_on_the_device_agrees_with_the_native_scorer() {
    use darkwatch::sae::detector::{SaeDetector, SaeScoreKind, SaeScorer};
    let Some(name) = gpu("sae_detector_on_the_device_agrees_with_the_native_scorer") else {
        return;
    };
    let x = test_activations();
    let tmp = tempfile::tempdir().unwrap();
    for (latents, k) in [(256, 16), (2048, 32)] {
        let dir = tmp.path().join(format!("sae-{latents}"));
        util::sae::train_detector(&dir, latents, k);
        let load = |kind, backend| {
            Arc::new(
                SaeDetector::load_on(&dir, kind, backend, &cuda_cfg(CudaFallback::Error), 4096)
                    .unwrap(),
            )
        };
        // ‖e‖² per row, the scale of the deviation's terms.
        let sq: Vec<f32> = {
            let mut s =
                SaeScorer::new(load(SaeScoreKind::ErrorNorm, Backend::Native), 64, 5).unwrap();
            score_rows(&mut s, &x, 64).iter().map(|r| r.0).collect()
        };
        for kind in SaeScoreKind::ALL {
            let native = load(kind, Backend::Native);
            let sigma = native.head.sigma();
            // Six, so that a near-tie just past the fifth rank is seen.
            let mut cpu = SaeScorer::new(native, 640, 6).unwrap();
            let want = score_rows(&mut cpu, &x, 640);
            let dev = load(kind, Backend::Cuda);
            assert!(
                dev.backend_label().ends_with(&format!("on cuda/{name}")),
                "{}",
                dev.backend_label()
            );
            assert!(
                dev.summary().contains(&format!("backend      cuda/{name}")),
                "{}",
                dev.summary()
            );
            // As the agent builds its scorer: the GPU's batch, the ring's 4096 frames.
            let agents = SaeScorer::for_pipeline(
                dev.clone(),
                &darkwatch::config::PipelineConfig::default(),
                5,
            )
            .unwrap();
            assert!(agents.on_gpu());
            assert_eq!(darkwatch::pipeline::BatchScorer::max_batch(&agents), 4096);
            drop(agents);
            // (buffers, batch): the last as the agent's default GPU scorer, with buffers for
            // the ring's 4096 frames, given batches of 640.
            for (cap, batch) in [(1, 1), (7, 7), (640, 640), (4096, 640)] {
                let mut gpu = SaeScorer::new(dev.clone(), cap, 5).unwrap();
                assert!(gpu.on_gpu());
                let got = score_rows(&mut gpu, &x, batch);
                let case = format!("{latents} latents, {}, batch {batch} of {cap}", kind.name());
                let (mut worst, mut other_latents) = (0.0f32, 0);
                for (r, ((g, gt), (w, wt))) in got.iter().zip(&want).enumerate() {
                    let scale = match kind {
                        SaeScoreKind::Deviation => sq[r] / sigma + 1e-6,
                        _ => w.abs().max(1e-6),
                    };
                    let rel = (g - w).abs() / scale;
                    if rel > 1e-4 {
                        println!("{case} row {r}: {g} against {w} (other latents?)");
                        other_latents += 1;
                        continue;
                    }
                    worst = worst.max(rel);
                    assert_eq!(gt.len(), 5, "{case} row {r}");
                    let top = wt[0].value.max(1e-12);
                    for (t, (gc, wc)) in gt.iter().zip(&wt[..5]).enumerate() {
                        assert!(
                            (gc.value - wc.value).abs() <= 1e-4 * top,
                            "{case} row {r} rank {t}: {gc:?} against {wc:?}"
                        );
                        let apart = |o: Option<&darkwatch::pipeline::Contribution>| {
                            o.is_none_or(|o| (o.value - wc.value).abs() > 1e-4 * top)
                        };
                        if apart(wt.get(t + 1)) && (t == 0 || apart(wt.get(t - 1))) {
                            assert_eq!(gc.feature, wc.feature, "{case} row {r} rank {t}");
                        }
                    }
                }
                println!(
                    "{case}: worst relative score difference {worst:.2e}; {other_latents} rows \
                     apart (other latents)"
                );
                assert!(
                    other_latents <= x.nrows() / 100 + 1,
                    "{case}: {other_latents} of {} rows apart",
                    x.nrows()
                );
            }
        }
    }
}

/// Without a GPU, an SAE detector configured for CUDA says why in its backend label and
/// scores exactly as the native one (`fallback = "cpu"`), or is refused naming the cause
/// (`fallback = "error"`).
#[test]
fn sae_detector_without_a_gpu_falls_back_or_is_refused() {
    use darkwatch::sae::detector::{DetectorError, SaeDetector, SaeScoreKind, SaeScorer};
    let Some(cause) = no_gpu("sae_detector_without_a_gpu_falls_back_or_is_refused") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    util::sae::train_detector(tmp.path(), 256, 16);
    let kind = SaeScoreKind::Nonlinear;
    let fell_back = SaeDetector::load_on(
        tmp.path(),
        kind,
        Backend::Cuda,
        &cuda_cfg(CudaFallback::Cpu),
        64,
    )
    .unwrap();
    assert!(
        fell_back
            .backend_label()
            .ends_with(&format!("(cuda unavailable: {cause})")),
        "{}",
        fell_back.backend_label()
    );
    // `darkwatch inspect` prints the summary.
    assert!(
        fell_back
            .summary()
            .contains(&format!("backend      native (cuda unavailable: {cause})")),
        "{}",
        fell_back.summary()
    );
    let native = SaeDetector::load_on(
        tmp.path(),
        kind,
        Backend::Native,
        &CudaConfig::default(),
        64,
    )
    .unwrap();
    assert_eq!(native.backend_label(), native.describe());
    let x = test_activations();
    let fell_back = Arc::new(fell_back);
    // As the agent builds its scorer: after a fallback, the CPU's batch, not the GPU's.
    let pipeline = darkwatch::config::PipelineConfig {
        batch_max_frames: 64,
        ring_capacity_frames: 4096,
        ..Default::default()
    };
    let agents = SaeScorer::for_pipeline(fell_back.clone(), &pipeline, 5).unwrap();
    assert_eq!(darkwatch::pipeline::BatchScorer::max_batch(&agents), 64);
    let mut a = SaeScorer::new(fell_back, 64, 5).unwrap();
    let mut b = SaeScorer::new(Arc::new(native), 64, 5).unwrap();
    assert!(!a.on_gpu());
    assert_eq!(score_rows(&mut a, &x, 64), score_rows(&mut b, &x, 64));
    // As the agent loads it: `[score] backend = "cuda"`, the default fallback.
    let mut cfg = DarkwatchConfig::default();
    cfg.score.backend = Backend::Cuda;
    cfg.sae.score = kind;
    let agent = darkwatch::detector::Detector::load_configured(tmp.path(), &cfg).unwrap();
    assert!(
        agent.backend_label().contains("(cuda unavailable: "),
        "{}",
        agent.backend_label()
    );
    match SaeDetector::load_on(
        tmp.path(),
        kind,
        Backend::Cuda,
        &cuda_cfg(CudaFallback::Error),
        64,
    ) {
        Err(e @ DetectorError::Cuda(_)) => {
            assert!(e.to_string().contains(&cause), "{e}");
            assert!(e.to_string().contains("cannot score on the GPU"), "{e}");
        }
        other => panic!("expected a CUDA error, got {other:?}"),
    }
}

/// A detector folder from one of the bundled SAE fixtures (tests/data/sae/NAME): its
/// checkpoint, a head fitted on its rows, and a calibration of them.
fn fixture_detector(name: &str, out: &std::path::Path) {
    use darkwatch::sae::dark::{DarkConfig, DarkHead};
    use darkwatch::sae::detector::{Calibration, CalibrationRows};
    use darkwatch::sae::eval::{DARK_DIR, score_tokens};
    let src = repo(&format!("tests/data/sae/{name}"));
    for f in ["cfg.json", "sae_weights.safetensors"] {
        std::fs::copy(src.join("checkpoint").join(f), out.join(f)).unwrap();
    }
    let sae = darkwatch::sae::Sae::load(out).unwrap();
    let x = darkwatch::ingest::npy::read_npy(&src.join("x.npy"))
        .unwrap()
        .values;
    // Ridge 1, as sae-train's tests use: on the fixture's 8 rows of 16 features the default
    // ridge fits the error almost exactly, and the `nonlinear` score becomes the tiny
    // difference of two near-equal sums, which rounding alone moves by 1e-3.
    let fit = DarkHead::fit_sae(&sae, x.view(), None, &DarkConfig { ridge: 1.0 }, 8).unwrap();
    let dark = out.join(DARK_DIR);
    fit.head.save(&dark).unwrap();
    let scored = score_tokens(&sae, &fit.head, x.view()).unwrap();
    let many: Vec<_> = (0..60).map(|i| scored[i % scored.len()]).collect();
    Calibration::from_scores(&many, CalibrationRows::Training, 1000)
        .save(&dark)
        .unwrap();
}

/// What the device kernels do not cover is named before any CUDA call, so this runs with or
/// without a GPU: a GPU batch the kernels cannot index in 32 bits (`fallback = "cpu"` then
/// scores natively; `fallback = "error"` refuses it at load).
#[test]
fn an_sae_the_device_does_not_cover_scores_natively() {
    use darkwatch::model::cuda::CudaError;
    use darkwatch::sae::detector::{DetectorError, SaeDetector, SaeScoreKind, SaeScorer};
    let tmp = tempfile::tempdir().unwrap();
    let topk = tmp.path();
    fixture_detector("saelens_topk_v6", topk);
    let d_in = darkwatch::sae::Sae::load(topk).unwrap().d_in();
    let too_big = u32::MAX as usize / d_in + 1;
    let det = SaeDetector::load_on(
        topk,
        SaeScoreKind::ErrorNorm,
        Backend::Cuda,
        &cuda_cfg(CudaFallback::Cpu),
        too_big,
    )
    .unwrap();
    let label = det.backend_label();
    assert!(
        label.contains("cuda unavailable: not supported on the GPU: batches of"),
        "{label}"
    );
    let scorer = SaeScorer::new(Arc::new(det), 8, 3).unwrap();
    assert!(!scorer.on_gpu());
    assert_eq!(scorer.backend_label(), label);

    match SaeDetector::load_on(
        topk,
        SaeScoreKind::ErrorNorm,
        Backend::Cuda,
        &cuda_cfg(CudaFallback::Error),
        too_big,
    ) {
        Err(DetectorError::Cuda(CudaError::Unsupported(why))) => {
            assert!(why.contains("2^32"), "{why}")
        }
        other => panic!("expected a refused batch, got {other:?}"),
    }
}

/// A random dense SAE (ReLU, or JumpReLU with thresholds in [0, 0.3)) of the given shape.
fn random_dense_sae(d: usize, d_sae: usize, jump: bool, seed: u64) -> darkwatch::sae::Sae {
    use darkwatch::sae::{Normalization, Sae, SaeActivation, SaeParts};
    let mut rng = darkwatch::rng::Rng::new(seed);
    let scale = 1.0 / (d as f32).sqrt();
    Sae::from_parts(SaeParts {
        w_enc: ndarray::Array2::from_shape_fn((d, d_sae), |_| rng.uniform(-scale, scale)),
        b_enc: ndarray::Array1::from_shape_fn(d_sae, |_| rng.uniform(-0.1, 0.05)),
        w_dec: ndarray::Array2::from_shape_fn((d_sae, d), |_| rng.uniform(-scale, scale)),
        b_dec: ndarray::Array1::from_shape_fn(d, |_| rng.uniform(-0.1, 0.1)),
        threshold: jump.then(|| ndarray::Array1::from_shape_fn(d_sae, |_| rng.uniform(0.0, 0.3))),
        activation: if jump {
            SaeActivation::JumpRelu
        } else {
            SaeActivation::Relu
        },
        apply_b_dec_to_input: true,
        normalization: Normalization::None,
    })
    .unwrap()
}

/// ReLU and JumpReLU SAEs on the device (the activation in place, the decoder as a GEMM),
/// and every input normalisation, give the CPU's ‖e‖² within 1e-4 relative: the bundled
/// SAELens fixtures (Gemma Scope's JumpReLU layout, bf16 weights, ReLU, `layer_norm`,
/// `constant_norm_rescale`, `expected_average_only_in` with and without a scaling factor),
/// random dense ones up to 768 × 4096, and a random layer-normalised TopK SAE. A
/// pre-activation within rounding of its threshold may switch its latent on one side only,
/// so up to 1 % of rows (plus one) may differ more; they are counted.
#[test]
fn dense_and_normalised_saes_agree_with_the_cpu() {
    use darkwatch::model::cuda::CudaSae;
    use darkwatch::sae::{Normalization, Sae, SaeActivation, SaeParts};
    let Some(_) = gpu("dense_and_normalised_saes_agree_with_the_cpu") else {
        return;
    };
    let mut cases: Vec<(String, Sae, ndarray::Array2<f32>)> = Vec::new();
    for name in [
        "saelens_jumprelu_gemmascope",
        "saelens_jumprelu_bf16",
        "saelens_relu_v6",
        "saelens_relu_expected_average_only_in",
        "saelens_relu_layer_norm",
        "saelens_relu_constant_norm_rescale_f16",
    ] {
        let dir = repo(&format!("tests/data/sae/{name}"));
        let sae = Sae::load(&dir.join("checkpoint")).unwrap();
        let x = darkwatch::ingest::npy::read_npy(&dir.join("x.npy"))
            .unwrap()
            .values;
        if name == "saelens_relu_expected_average_only_in" {
            let mut scaled = sae.clone();
            scaled.set_norm_scaling_factor(0.7).unwrap();
            cases.push((format!("{name}, scaling factor 0.7"), scaled, x.clone()));
        }
        cases.push((name.to_string(), sae, x));
    }
    // TopK on layer-normalised inputs (the kernel's two block sums per row), b_dec
    // subtracted from the normalised input.
    let (d, d_sae) = (96, 1024);
    let base = Sae::random(d, d_sae, 16, 13).unwrap();
    let mut rng = darkwatch::rng::Rng::new(17);
    let layer_norm = Sae::from_parts(SaeParts {
        w_enc: ndarray::Array2::from_shape_fn((d, d_sae), |(i, j)| base.w_enc_at(i, j)),
        b_enc: ndarray::Array1::from_vec(base.b_enc().to_vec()),
        w_dec: base.w_dec().to_owned(),
        b_dec: ndarray::Array1::from_shape_fn(d, |_| rng.uniform(-0.1, 0.1)),
        threshold: None,
        activation: SaeActivation::TopK { k: 16 },
        apply_b_dec_to_input: true,
        normalization: Normalization::LayerNorm,
    })
    .unwrap();
    let shifted = random_rows(300, d, 41).mapv(|v| 3.0 * v + 5.0);
    cases.push((
        "random 96x1024 TopK, layer_norm".into(),
        layer_norm,
        shifted,
    ));
    for (d, d_sae, jump, n) in [
        (96, 2000, false, 300),
        (96, 2000, true, 300),
        (768, 4096, true, 512),
    ] {
        let name = format!(
            "random {d}x{d_sae} {}",
            if jump { "JumpReLU" } else { "ReLU" }
        );
        cases.push((
            name,
            random_dense_sae(d, d_sae, jump, 9),
            random_rows(n, d, 31),
        ));
    }
    for (name, sae, x) in &cases {
        let n = x.nrows();
        let mut ws = sae.workspace(n);
        let cpu = sae
            .forward(x.view(), &mut ws)
            .unwrap()
            .error_sq_norm()
            .to_vec();
        let mut dev = match CudaSae::load(sae, n, &cuda_cfg(CudaFallback::Error)) {
            Ok(dev) => dev,
            Err(e) => panic!("{name}: {e}"),
        };
        let got = dev.forward(x.view()).unwrap().to_vec();
        let (mut worst, mut apart) = (0.0f32, 0);
        for (r, (g, w)) in got.iter().zip(&cpu).enumerate() {
            let rel = (g - w).abs() / w.abs().max(1e-6);
            if rel > 1e-4 {
                println!("{name} row {r}: {g} against {w}");
                apart += 1;
            } else {
                worst = worst.max(rel);
            }
        }
        println!("{name}: worst ‖e‖² difference {worst:.2e}; {apart} of {n} rows apart");
        assert!(apart <= n / 100 + 1, "{name}: {apart} of {n} rows apart");
        if !matches!(sae.activation(), SaeActivation::TopK { .. }) {
            assert!(
                dev.latents(1).is_err(),
                "{name}: a dense SAE keeps no latent list"
            );
        }
    }
}

/// The dark-matter head on dense SAEs on the device (Gemma Scope's JumpReLU layout, and
/// ReLU fixtures with `layer_norm` and `constant_norm_rescale` inputs): every score kind
/// within 1e-4 of the native scorer (the deviation against ‖e‖²/σ), and the largest
/// contribution's value within 1e-4.
#[test]
fn dense_detectors_on_the_device_agree_with_the_native_scorer() {
    for name in [
        "saelens_jumprelu_gemmascope",
        "saelens_relu_layer_norm",
        "saelens_relu_constant_norm_rescale_f16",
    ] {
        fixture_detector_agrees(name);
    }
}

fn fixture_detector_agrees(name: &str) {
    use darkwatch::sae::detector::{SaeDetector, SaeScoreKind, SaeScorer};
    let Some(_) = gpu("dense_detectors_on_the_device_agree_with_the_native_scorer") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    fixture_detector(name, tmp.path());
    let x = darkwatch::ingest::npy::read_npy(&repo(&format!("tests/data/sae/{name}/x.npy")))
        .unwrap()
        .values;
    let load = |kind, backend| {
        Arc::new(
            SaeDetector::load_on(
                tmp.path(),
                kind,
                backend,
                &cuda_cfg(CudaFallback::Error),
                64,
            )
            .unwrap(),
        )
    };
    let sq: Vec<f32> = {
        let mut s = SaeScorer::new(load(SaeScoreKind::ErrorNorm, Backend::Native), 64, 3).unwrap();
        score_rows(&mut s, &x, 64).iter().map(|r| r.0).collect()
    };
    for kind in SaeScoreKind::ALL {
        let native = load(kind, Backend::Native);
        let sigma = native.head.sigma();
        let want = score_rows(&mut SaeScorer::new(native, 64, 3).unwrap(), &x, 64);
        let mut gpu = SaeScorer::new(load(kind, Backend::Cuda), 64, 3).unwrap();
        assert!(gpu.on_gpu());
        let got = score_rows(&mut gpu, &x, 7);
        for (r, ((g, gt), (w, wt))) in got.iter().zip(&want).enumerate() {
            let scale = match kind {
                SaeScoreKind::Deviation => sq[r] / sigma + 1e-6,
                _ => w.abs().max(1e-6),
            };
            assert!(
                (g - w).abs() <= 1e-4 * scale,
                "{name} {} row {r}: {g} against {w}",
                kind.name()
            );
            let top = wt[0].value.max(1e-12);
            assert!(
                (gt[0].value - wt[0].value).abs() <= 1e-4 * top,
                "{name} {} row {r}: {:?} against {:?}",
                kind.name(),
                gt[0],
                wt[0]
            );
        }
    }
}
