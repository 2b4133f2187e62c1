//! CUDA against native on the bundled 38-feature PAE (models/smd-machine-1-6): batch-1
//! latency (p50/p99, whole scorer: scale, forward, wnll head, contributions) and batch-65536
//! throughput; the scorer's earlier path, with the head on the host, as its baseline; plus
//! the device forward alone (upload, GEMMs, kernels, copy back), at batch 1 both as a CUDA
//! graph and call by call (the baseline), interleaved. Then the device SAE
//! (d = 768, 32768 latents, k = 32, batch 4096, random weights, fp32 and TF32): tokens/s
//! streamed (two batches in flight, the host writing each batch into a pinned buffer) beside
//! the cuBLAS encoder GEMM alone, against the targets (≥ 1 M tokens/s, ≥ 50 % of the
//! GEMM), with the unpipelined times and each stage timed alone. Last, the SAE with its
//! dark-matter head on the device (scores and top contributions back) against the SAE
//! forward alone and the head on the CPU. And a JumpReLU SAE of the same shape (the
//! activation in place, the decoder a second GEMM).
//!
//! `cargo bench --features cuda --bench cuda` (tools/gpu-check.sh runs it). Exits 2 with the
//! cause when no GPU is usable. With `DARKWATCH_BENCH_OUT=FILE` the table also goes there.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use darkwatch::config::{CudaConfig, CudaFallback};
use darkwatch::ingest::{self, TableOptions};
use darkwatch::model::Model;
use darkwatch::model::cuda::{self, CudaSession};
use darkwatch::pipeline::Scorer;
use darkwatch::sae::dark::{DarkConfig, DarkHead, DarkStats};
use darkwatch::stats::LatencyHistogram;
use ndarray::Array2;

const PAE: &str = "models/smd-machine-1-6";
const STREAM: &str = "tests/data/smd/machine-1-6_test.npy";
const BIG: usize = 65_536;

fn path(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Batch-1 latency through the whole scorer.
fn batch1(model: &Arc<Model>, x: &Array2<f32>, frames: usize) -> LatencyHistogram {
    let head = model.meta.head;
    let mut s = Scorer::new(model.clone(), head, 1, 3).expect("scorer");
    let mut h = LatencyHistogram::new();
    let mut sink = 0.0f32;
    for i in 0..frames + 500 {
        let row = x.row(i % x.nrows());
        let t = Instant::now();
        s.input_mut()
            .copy_from_slice(row.as_slice().expect("contiguous"));
        sink += s.score(1)[0];
        if i >= 500 {
            h.record(t.elapsed().as_nanos() as u64);
        }
    }
    std::hint::black_box(sink);
    assert_eq!(s.backend_errors(), 0, "backend failed");
    h
}

/// Frames per second through the whole scorer at batch `BIG`.
fn throughput(model: &Arc<Model>, x: &Array2<f32>, reps: usize) -> f64 {
    let head = model.meta.head;
    let mut s = Scorer::new(model.clone(), head, BIG, 3).expect("scorer");
    let d = x.ncols();
    let src = x.as_slice().expect("contiguous");
    s.input_mut()[..BIG * d].copy_from_slice(&src[..BIG * d]);
    s.score(BIG);
    let t = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(s.score(BIG)[0]);
    }
    assert_eq!(s.backend_errors(), 0, "backend failed");
    (reps * BIG) as f64 / t.elapsed().as_secs_f64()
}

/// The scorer as it was before its head ran on the device, the baseline of the "cuda
/// (scorer)" line: scale on the host, forward on the device, the reconstruction (mean and
/// variance) back, then the head and its contributions on the host. Batch-1 latency over
/// `frames` and frames/s at batch `BIG`.
fn host_head(model: &Arc<Model>, x: &Array2<f32>, frames: usize) -> (LatencyHistogram, f64) {
    let head = model.meta.head;
    let d = x.ncols();
    let baseline = darkwatch::score::prepare_member_baselines(
        &head,
        &model.meta.log_variance_baseline,
        d,
        model.ae.members,
    );
    let gm = model.cuda.clone().expect("on the GPU");
    let mut scores = vec![0.0f32; BIG];
    let mut contrib = Array2::<f32>::zeros((BIG, d));
    let mut scaled = Array2::<f32>::zeros((BIG, d));
    let src = x.as_slice().expect("contiguous");
    let mut run = |s: &mut CudaSession, n: usize, at: usize| {
        let dst = &mut scaled.as_slice_mut().expect("contiguous")[..n * d];
        model
            .meta
            .scaler
            .scale_rows_into(&src[at * d..(at + n) * d], dst);
        let xs = scaled.slice(ndarray::s![..n, ..]);
        s.forward(xs, |recon| {
            head.score_batch(xs, recon, &baseline, &mut scores[..n], contrib.view_mut())
        })
        .expect("device forward");
        scores[0]
    };
    let mut one = CudaSession::new(gm.clone(), 1).expect("session");
    let mut h = LatencyHistogram::new();
    let mut sink = 0.0f32;
    for i in 0..frames + 500 {
        let t = Instant::now();
        sink += run(&mut one, 1, i % x.nrows());
        if i >= 500 {
            h.record(t.elapsed().as_nanos() as u64);
        }
    }
    let mut big = CudaSession::new(gm, BIG).expect("session");
    sink += run(&mut big, BIG, 0);
    let t = Instant::now();
    for _ in 0..20 {
        sink += run(&mut big, BIG, 0);
    }
    let fps = (20 * BIG) as f64 / t.elapsed().as_secs_f64();
    std::hint::black_box(sink);
    (h, fps)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let mut out = String::new();
    let name = match cuda::probe(0) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("cuda bench: no usable GPU: {e}");
            std::process::exit(2);
        }
    };
    let native = Arc::new(Model::load(&path(PAE)).expect("bundled model"));
    let cfg = CudaConfig {
        fallback: CudaFallback::Error,
        ..CudaConfig::default()
    };
    let gpu = Arc::new(
        Model::load(&path(PAE))
            .and_then(|m| m.with_cuda(&cfg))
            .expect("CUDA model"),
    );
    let stream = ingest::read_table(&path(STREAM), &TableOptions::default())
        .expect("bundled stream")
        .values;
    // Tile the stream to BIG rows, scaled as the scorer would (for the device-only rows).
    let d = stream.ncols();
    let x = Array2::from_shape_fn((BIG, d), |(r, c)| stream[[r % stream.nrows(), c]]);
    let mut scaled = x.clone();
    for row in scaled.rows_mut() {
        native.meta.scaler.apply_row(row);
    }

    let _ = writeln!(out, "PAE {PAE} widths {:?}, GPU {name}", native.ae.widths());
    let _ = writeln!(
        out,
        "{:<40} {:>12} {:>12} {:>16}",
        "path", "b1 p50 us", "b1 p99 us", "b65536 frames/s"
    );
    for (label, model) in [("native (1 thread)", &native), ("cuda (scorer)", &gpu)] {
        let h = batch1(model, &x, 20_000);
        let fps = throughput(model, &x, if model.cuda.is_some() { 20 } else { 5 });
        table_row(&mut out, label, &h, fps);
    }
    let (h, fps) = host_head(&gpu, &x, 20_000);
    table_row(&mut out, "cuda forward + head on the host", &h, fps);
    // The device forward alone: upload, GEMMs, kernels, copy back (no head). Batch 1 as a
    // CUDA graph (the default) and call by call (the baseline), interleaved in blocks.
    let gm = gpu.cuda.clone().expect("on the GPU");
    let x1 = scaled.slice(ndarray::s![..1, ..]);
    let mut graph = CudaSession::new(gm.clone(), 1).expect("session");
    let mut calls = CudaSession::new(gm.clone(), 1).expect("session");
    calls.disable_graphs();
    let (mut hg, mut hc) = (LatencyHistogram::new(), LatencyHistogram::new());
    for s in [&mut graph, &mut calls] {
        s.time_runs(x1, 500, |_| ()).expect("warm-up");
    }
    for _ in 0..10 {
        graph
            .time_runs(x1, 2_000, |ns| hg.record(ns))
            .expect("device runs");
        calls
            .time_runs(x1, 2_000, |ns| hc.record(ns))
            .expect("device runs");
    }
    if let Some(why) = graph.graphs_off() {
        let _ = writeln!(out, "CUDA graphs are off: {why}");
    }
    let mut big = CudaSession::new(gm, BIG).expect("session");
    big.time_runs(scaled.view(), 3, |_| ()).expect("warm-up");
    let mut total = 0u64;
    big.time_runs(scaled.view(), 20, |ns| total += ns)
        .expect("device runs");
    let big_fps = (20 * BIG) as f64 / (total as f64 / 1e9);
    for (label, h) in [
        ("cuda forward only, b1 as a graph", &hg),
        ("cuda forward only, b1 call by call", &hc),
    ] {
        table_row(&mut out, label, h, big_fps);
    }
    sae(&mut out);
    print!("{out}");
    if let Ok(file) = std::env::var("DARKWATCH_BENCH_OUT")
        && let Err(e) = std::fs::write(&file, &out)
    {
        eprintln!("cannot write {file}: {e}");
    }
}

/// One line of the PAE table: batch-1 p50 and p99 (µs), then frames/s at batch `BIG`.
fn table_row(out: &mut String, label: &str, h: &LatencyHistogram, fps: f64) {
    let _ = writeln!(
        out,
        "{:<40} {:>12.1} {:>12.1} {:>16.3e}",
        label,
        h.quantile_ns(0.5) / 1e3,
        h.quantile_ns(0.99) / 1e3,
        fps
    );
}

/// The device SAE against its own encoder GEMM.
fn sae(out: &mut String) {
    use darkwatch::model::cuda::{CudaSae, SAE_SLOTS, SAE_TOPK_PARTS};
    let (d, d_sae, k, n) = (768usize, 32_768usize, 32usize, 4096usize);
    let sae = darkwatch::sae::Sae::random(d, d_sae, k, 42).expect("valid shape");
    let mut rng = darkwatch::rng::Rng::new(7);
    let x = Array2::from_shape_fn((n, d), |_| rng.uniform(-1.7, 1.7));
    let head = random_head(&x);
    for (cfg, label) in gemm_precisions() {
        let mut dev = match CudaSae::load(&sae, n, &cfg) {
            Ok(s) => s,
            Err(e) => {
                let _ = writeln!(out, "SAE {label}: cannot load: {e}");
                continue;
            }
        };
        for _ in 0..3 {
            dev.forward(x.view()).expect("SAE forward");
        }
        let runs = 20;
        // From the caller's array: it is first copied into the pinned input buffer.
        let t = Instant::now();
        for _ in 0..runs {
            std::hint::black_box(dev.forward(x.view()).expect("SAE forward")[0]);
        }
        let copied = t.elapsed().as_secs_f64() / runs as f64;
        // In place: the tokens are written into the pinned input buffer, as a consumer of
        // the ring writes them (the write is inside the timing).
        let src = x.as_slice().expect("contiguous");
        let t = Instant::now();
        let fill = |dev: &mut CudaSae| {
            dev.input_mut().expect("input buffer")[..n * d].copy_from_slice(src);
        };
        for _ in 0..runs {
            fill(&mut dev);
            std::hint::black_box(dev.forward_input(n).expect("SAE forward")[0]);
        }
        let serial = t.elapsed().as_secs_f64() / runs as f64;
        // Streaming: SAE_SLOTS batches in flight, so one uploads while another computes, and
        // the host writes the next into the freed pinned buffer meanwhile (submit / wait).
        let t = Instant::now();
        for _ in 0..SAE_SLOTS {
            fill(&mut dev);
            dev.submit(n).expect("SAE submit");
        }
        for _ in 0..runs {
            std::hint::black_box(dev.wait().expect("SAE forward")[0]);
            fill(&mut dev);
            dev.submit(n).expect("SAE submit");
        }
        for _ in 0..SAE_SLOTS {
            std::hint::black_box(dev.wait().expect("SAE forward")[0]);
        }
        let per = t.elapsed().as_secs_f64() / (runs + SAE_SLOTS) as f64;
        // The device's own pipeline: the same, without the host's writes (each pinned buffer
        // keeps the batch it holds), so the upload of one batch overlaps the other's compute.
        let t = Instant::now();
        for _ in 0..SAE_SLOTS {
            dev.submit(n).expect("SAE submit");
        }
        for _ in 0..runs {
            std::hint::black_box(dev.wait().expect("SAE forward")[0]);
            dev.submit(n).expect("SAE submit");
        }
        for _ in 0..SAE_SLOTS {
            std::hint::black_box(dev.wait().expect("SAE forward")[0]);
        }
        let pipelined = t.elapsed().as_secs_f64() / (runs + SAE_SLOTS) as f64;
        // The device forward alone: tokens already in the pinned input.
        let t = Instant::now();
        for _ in 0..runs {
            std::hint::black_box(dev.forward_input(n).expect("SAE forward")[0]);
        }
        let device = t.elapsed().as_secs_f64() / runs as f64;
        let gemm = dev.time_encoder_gemm(n, runs).expect("GEMM");
        let flops = 2.0 * (n * d * d_sae) as f64;
        let stages = dev.time_stages(n, runs).expect("stages");
        // The TopK stage with each split of a row over the kernel's warps, at this batch and
        // at small ones (a batch of few rows leaves most of the GPU idle with one warp each).
        let mut splits = String::new();
        for rows in [n, 256, 16, 1] {
            let _ = write!(
                splits,
                "\n    batch {rows} (chosen {}):",
                dev.topk_parts(rows)
            );
            for parts in SAE_TOPK_PARTS {
                dev.set_topk_parts(Some(parts)).expect("a valid split");
                let topk = dev.time_stages(rows, runs).expect("stages").topk;
                let _ = write!(splits, " {parts}: {:.1} us", topk * 1e6);
            }
            dev.set_topk_parts(None).expect("the default split");
        }
        let tokens = n as f64 / per;
        let share = gemm / per;
        let _ = writeln!(
            out,
            "SAE {d}x{d_sae} k={k} batch {n} ({label}): streaming {:.3e} tokens/s ({:.2} ms/batch: \
             two batches in flight, one uploading while the other computes, the host writing \
             the next into the freed pinned buffer); encoder GEMM alone {:.2} ms = {:.1} TFLOP/s; streaming at {:.0} % of the \
             GEMM's throughput [targets: >= 1e6 tokens/s {}, >= 50 % {}]\n  \
             also: {:.2} ms/batch writing then scoring (no overlap), {:.2} ms from a separate \
             array, {:.2} ms on the device from the filled pinned buffer\n  \
             the device's pipeline alone (two in flight, no host writes): {:.2} ms/batch = \
             {:.3e} tokens/s, {:.0} % of the GEMM's throughput\n  \
             stages, each timed alone: {}\n  \
             TopK stage by warps per row:{}",
            tokens,
            per * 1e3,
            gemm * 1e3,
            flops / gemm / 1e12,
            share * 100.0,
            if tokens >= 1e6 { "MET" } else { "MISSED" },
            if share >= 0.5 { "MET" } else { "MISSED" },
            serial * 1e3,
            copied * 1e3,
            device * 1e3,
            pipelined * 1e3,
            n as f64 / pipelined,
            gemm / pipelined * 100.0,
            stages.describe(),
            splits,
        );
        drop(dev);
        sae_detector(out, &sae, &head, &x, &cfg, label, device);
        sae_pipeline(out, &sae, &head, &x, &cfg, label);
    }
    jumprelu(out, &x);
}

/// A JumpReLU SAE of the same shape (random weights, thresholds in [0, 0.3)): the activation
/// in place, then the decoder as a second GEMM, against its encoder GEMM alone.
fn jumprelu(out: &mut String, x: &Array2<f32>) {
    use darkwatch::model::cuda::CudaSae;
    use darkwatch::sae::{Normalization, Sae, SaeActivation, SaeParts};
    let (n, d) = x.dim();
    let d_sae = 32_768usize;
    let mut rng = darkwatch::rng::Rng::new(5);
    let scale = 1.0 / (d as f32).sqrt();
    let sae = Sae::from_parts(SaeParts {
        w_enc: Array2::from_shape_fn((d, d_sae), |_| rng.uniform(-scale, scale)),
        b_enc: ndarray::Array1::from_shape_fn(d_sae, |_| rng.uniform(-0.1, 0.05)),
        w_dec: Array2::from_shape_fn((d_sae, d), |_| rng.uniform(-scale, scale)),
        b_dec: ndarray::Array1::zeros(d),
        threshold: Some(ndarray::Array1::from_shape_fn(d_sae, |_| {
            rng.uniform(0.0, 0.3)
        })),
        activation: SaeActivation::JumpRelu,
        apply_b_dec_to_input: true,
        normalization: Normalization::None,
    })
    .expect("valid shape");
    for (cfg, label) in gemm_precisions() {
        let mut dev = match CudaSae::load(&sae, n, &cfg) {
            Ok(s) => s,
            Err(e) => {
                let _ = writeln!(out, "JumpReLU SAE {label}: cannot load: {e}");
                continue;
            }
        };
        dev.input_mut().expect("input buffer")[..n * d]
            .copy_from_slice(x.as_slice().expect("contiguous"));
        for _ in 0..3 {
            dev.forward_input(n).expect("JumpReLU forward");
        }
        let runs = 20;
        let t = Instant::now();
        for _ in 0..runs {
            std::hint::black_box(dev.forward_input(n).expect("JumpReLU forward")[0]);
        }
        let per = t.elapsed().as_secs_f64() / runs as f64;
        let gemm = dev.time_encoder_gemm(n, runs).expect("GEMM");
        let stages = dev.time_stages(n, runs).expect("stages");
        let _ = writeln!(
            out,
            "JumpReLU SAE {d}x{d_sae} batch {n} ({label}): {:.2} ms/batch on the device = \
             {:.3e} tokens/s; encoder GEMM alone {:.2} ms (the decoder is a second GEMM of \
             the same size)\n  stages, each timed alone (\"TopK\" is the activation; \
             \"decode\" includes the decoder GEMM): {}",
            per * 1e3,
            n as f64 / per,
            gemm * 1e3,
            stages.describe(),
        );
    }
}

/// The SAE with its dark-matter head on the device (`CudaSae::load_detector`, top 5
/// contributions back) against the SAE forward alone (`device`, the baseline measured just
/// before) and against the head on the CPU, which it replaces.
fn sae_detector(
    out: &mut String,
    sae: &darkwatch::sae::Sae,
    head: &DarkHead,
    x: &Array2<f32>,
    cfg: &CudaConfig,
    label: &str,
    forward_alone: f64,
) {
    use darkwatch::model::cuda::CudaSae;
    use darkwatch::sae::detector::SaeScoreKind;
    let (n, d) = x.dim();
    let runs = 20;
    for kind in [SaeScoreKind::ErrorNorm, SaeScoreKind::Nonlinear] {
        let mut dev = match CudaSae::load_detector(sae, head, kind, 5, n, cfg) {
            Ok(s) => s,
            Err(e) => {
                let _ = writeln!(out, "SAE detector {label}: cannot load: {e}");
                return;
            }
        };
        dev.input_mut().expect("input buffer")[..n * d]
            .copy_from_slice(x.as_slice().expect("contiguous"));
        for _ in 0..3 {
            dev.forward_input(n).expect("SAE detector forward");
        }
        let t = Instant::now();
        for _ in 0..runs {
            std::hint::black_box(dev.forward_input(n).expect("SAE detector forward")[0]);
            std::hint::black_box(dev.top_contributions().0.first());
        }
        let per = t.elapsed().as_secs_f64() / runs as f64;
        let _ = writeln!(
            out,
            "SAE detector ({label}, score {}): {:.2} ms/batch on the device = {:.3e} tokens/s, \
             against {:.2} ms for the SAE forward alone (scores and top-5 contributions back, \
             no pipelining)",
            kind.name(),
            per * 1e3,
            n as f64 / per,
            forward_alone * 1e3,
        );
    }
    // What the device head replaces: the head on the CPU for the same rows (one thread).
    let e = x.mapv(|v| 0.1 * v);
    let mut ws = head.workspace(n);
    let t = Instant::now();
    let reps = 3;
    for _ in 0..reps {
        std::hint::black_box(head.score(x.view(), e.view(), &mut ws).expect("CPU head")[0]);
    }
    let cpu = t.elapsed().as_secs_f64() / reps as f64;
    let _ = writeln!(
        out,
        "  the head on the CPU (one thread) for the same {n} rows: {:.2} ms ({:.3e} tokens/s)",
        cpu * 1e3,
        n as f64 / cpu
    );
}

/// Counts the frames a pipeline scored, on the scorer thread as the agent's sink runs.
struct Count(u64);

impl darkwatch::pipeline::Sink for Count {
    const ON_SCORER_THREAD: bool = true;
    fn accept(&mut self, f: &darkwatch::pipeline::ScoredFrame) {
        self.0 += u64::from(f.score.is_finite());
    }
}

/// The agent's path for the SAE detector: a file source pushing tokens unpaced into the
/// ring (4096 frames), the scorer popping batches of up to 4096 into the pinned buffer, the
/// sink on the scorer thread. Two batches in flight (the default) against one batch at a
/// time, interleaved, three runs each; the median tokens/s of each.
fn sae_pipeline(
    out: &mut String,
    sae: &darkwatch::sae::Sae,
    head: &DarkHead,
    x: &Array2<f32>,
    cfg: &CudaConfig,
    label: &str,
) {
    use darkwatch::pipeline::{self, FileSource};
    use darkwatch::sae::detector::{SaeDetector, SaeScoreKind, SaeScorer};
    let det = match SaeDetector::from_parts(
        sae.clone(),
        head.clone(),
        SaeScoreKind::ErrorNorm,
        Some(cfg.clone()),
    ) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            let _ = writeln!(out, "SAE pipeline {label}: {e}");
            return;
        }
    };
    let pcfg = darkwatch::config::PipelineConfig::default();
    let tokens = Array2::from_shape_fn((16 * x.nrows(), x.ncols()), |(r, c)| x[[r % x.nrows(), c]]);
    let mut rates = [Vec::new(), Vec::new()];
    for _ in 0..3 {
        for (overlap, rate) in [true, false].into_iter().zip(rates.iter_mut()) {
            let scorer = SaeScorer::for_pipeline(det.clone(), &pcfg, 5).expect("GPU scorer");
            let scorer = if overlap {
                scorer
            } else {
                scorer.without_overlap()
            };
            let source = FileSource::new(tokens.clone(), None, None);
            let t = Instant::now();
            let (report, sink) = pipeline::run_scorer(
                scorer,
                &pcfg,
                darkwatch::ring::FullPolicy::Block,
                source,
                Count(0),
                None,
            )
            .expect("pipeline");
            let secs = t.elapsed().as_secs_f64();
            assert_eq!(sink.0, tokens.nrows() as u64, "frames lost or NaN");
            assert_eq!(report.frames_scored, tokens.nrows() as u64);
            rate.push(tokens.nrows() as f64 / secs);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (on, off) = (median(&mut rates[0]), median(&mut rates[1]));
    let _ = writeln!(
        out,
        "SAE detector through the pipeline ({label}, error_norm, {} tokens unpaced through \
         the ring): two batches in flight {:.3e} tokens/s, one at a time {:.3e} ({:.2}x; \
         median of 3 each)",
        tokens.nrows(),
        on,
        off,
        on / off
    );
}

/// The SAE benches' two GEMM modes: full fp32, then TF32 tensor cores.
fn gemm_precisions() -> [(CudaConfig, &'static str); 2] {
    [(false, "fp32"), (true, "tf32")].map(|(tf32, label)| {
        let cfg = CudaConfig {
            fallback: CudaFallback::Error,
            tf32,
            ..CudaConfig::default()
        };
        (cfg, label)
    })
}

/// A dark-matter head for timing: fitted on random (x, e) rows, its values do not matter.
fn random_head(x: &Array2<f32>) -> DarkHead {
    let mut rng = darkwatch::rng::Rng::new(11);
    let e = Array2::from_shape_fn(x.dim(), |_| rng.uniform(-0.2, 0.2));
    let mut stats = DarkStats::new(x.ncols());
    stats.accumulate(x.view(), e.view()).expect("same shapes");
    DarkHead::fit(&stats, &DarkConfig::default(), None)
        .expect("a ridge fit")
        .head
}
