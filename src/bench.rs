//! `darkwatch bench`: an operator-facing summary of what scoring costs on this machine.
//!
//! Measures, in one run: the machine's fp32 matmul throughput (the roofline the model is
//! compared with), batch-1 latency per frame (p50/p99) and batch throughput for every
//! score head, through the same [`Scorer`] the pipeline uses.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use ndarray::Array2;

use crate::model::Model;
use crate::mss::{MssConfig, ReferenceBank};
use crate::pipeline::Scorer;
use crate::rng::Rng;
use crate::score::{Head, HeadKind};
use crate::stats::LatencyHistogram;

/// How long and how big.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Frames timed one by one for the batch-1 latency.
    pub latency_frames: usize,
    /// Frames scored in batches for throughput.
    pub throughput_frames: usize,
    pub batch: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            latency_frames: 20_000,
            throughput_frames: 2_000_000,
            batch: 256,
        }
    }
}

/// One head's numbers.
#[derive(Debug, Clone)]
pub struct HeadBench {
    /// Head name, with "+mss" when mean-shift scoring was on.
    pub label: String,
    /// Arithmetic per frame: the forward pass, plus the k-NN distances when MSS is on.
    pub flops_per_frame: usize,
    pub batch1: LatencyHistogram,
    pub batch_frames_per_s: f64,
}

/// The whole summary.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub model_id: String,
    pub widths: Vec<usize>,
    pub flops_per_frame: usize,
    pub matmul_gflops: f64,
    pub batch: usize,
    pub heads: Vec<HeadBench>,
}

/// Single-thread fp32 matmul throughput (GFLOP/s), best of a few 256³ products.
pub fn matmul_gflops() -> f64 {
    let n = 256;
    let mut rng = Rng::new(1);
    let a = Array2::from_shape_fn((n, n), |_| rng.uniform(-1.0, 1.0));
    let b = Array2::from_shape_fn((n, n), |_| rng.uniform(-1.0, 1.0));
    let mut c = Array2::<f32>::zeros((n, n));
    let mut best = f64::INFINITY;
    for _ in 0..20 {
        let t = Instant::now();
        ndarray::linalg::general_mat_mul(1.0, &a, &b, 0.0, &mut c);
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&c);
    2.0 * (n * n * n) as f64 / best / 1e9
}

/// Synthetic standardised frames for timing (the values do not change the cost).
fn frames(n: usize, d: usize) -> Array2<f32> {
    let mut rng = Rng::new(7);
    Array2::from_shape_fn((n, d), |_| rng.uniform(-2.0, 2.0))
}

/// Runs the benchmark on `model` for every head it supports.
pub fn run(model: Arc<Model>, opts: &BenchOptions) -> BenchReport {
    let d = model.n_features();
    let data = frames(4096, d);
    let mut heads = Vec::new();
    let plain = Arc::new(model.with_mss(MssConfig {
        rounds: 0,
        ..model.meta.mss
    }));
    // MSS with the reference setting: m = 1, k = 10, the model's bank (or, for a
    // model without one, 2048 synthetic frames).
    let mss_cfg = MssConfig {
        rounds: 1,
        neighbours: 10,
        bank_frames: 2048,
    };
    let synthetic_bank = model.bank.is_none();
    let mss = match &model.bank {
        Some(_) => model.with_mss(mss_cfg),
        None => {
            let mut m = (*model).clone();
            m.bank = Some(ReferenceBank::build(frames(2048, d).view(), &mss_cfg, 0));
            m.with_mss(mss_cfg)
        }
    };
    let mss = Arc::new(mss);
    let variants = [
        (HeadKind::Mse, &plain),
        (HeadKind::MaxAbs, &plain),
        (HeadKind::Wnll, &plain),
        (HeadKind::Wnll, &mss),
    ];
    for (kind, model) in variants {
        let head = Head {
            kind,
            ..model.meta.head
        };
        let label = match model.active_bank() {
            Some(b) => format!(
                "{}+mss(m={},k={},{} {}frames)",
                kind.name(),
                b.rounds(),
                b.neighbours(),
                b.frames(),
                if synthetic_bank { "synthetic " } else { "" }
            ),
            None => kind.name().to_string(),
        };
        let Ok(mut one) = Scorer::new(model.clone(), head, 1, 3) else {
            continue;
        };
        let mut batch1 = LatencyHistogram::new();
        let mut sink = 0.0f32;
        for i in 0..opts.latency_frames + 1000 {
            let row = data.row(i % data.nrows());
            let t = Instant::now();
            one.input_mut()
                .copy_from_slice(row.as_slice().expect("contiguous"));
            sink += one.score(1)[0];
            let ns = t.elapsed().as_nanos() as u64;
            if i >= 1000 {
                batch1.record(ns);
            }
        }
        let Ok(mut many) = Scorer::new(model.clone(), head, opts.batch, 3) else {
            continue;
        };
        let b = opts.batch;
        let rows = data.nrows() / b * b;
        let slice = data.as_slice().expect("contiguous");
        let mut done = 0usize;
        let t = Instant::now();
        while done < opts.throughput_frames {
            let start = (done % rows) * d;
            many.input_mut()[..b * d].copy_from_slice(&slice[start..start + b * d]);
            sink += many.score(b)[0];
            done += b;
        }
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(sink);
        let knn_flops = model
            .active_bank()
            .map_or(0, |b| 3 * b.rounds() * b.frames() * d);
        heads.push(HeadBench {
            flops_per_frame: 2 * model.ae.macs_per_frame() + knn_flops,
            label,
            batch1,
            batch_frames_per_s: done as f64 / secs,
        });
    }
    BenchReport {
        model_id: model.meta.id.clone(),
        widths: model.ae.widths(),
        flops_per_frame: 2 * model.ae.macs_per_frame(),
        matmul_gflops: matmul_gflops(),
        batch: opts.batch,
        heads,
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "model {} widths {:?}: {} FLOP/frame",
            self.model_id, self.widths, self.flops_per_frame
        )?;
        writeln!(
            f,
            "machine fp32 matmul (one thread, 256x256x256): {:.1} GFLOP/s",
            self.matmul_gflops
        )?;
        writeln!(
            f,
            "{:<34} {:>12} {:>12} {:>16} {:>14}",
            "head",
            "batch-1 p50",
            "batch-1 p99",
            format!("batch-{} fr/s", self.batch),
            "% of matmul"
        )?;
        for h in &self.heads {
            let gflops = h.batch_frames_per_s * h.flops_per_frame as f64 / 1e9;
            writeln!(
                f,
                "{:<34} {:>9.2} µs {:>9.2} µs {:>16.0} {:>13.1}%",
                h.label,
                h.batch1.quantile_ns(0.5) / 1e3,
                h.batch1.quantile_ns(0.99) / 1e3,
                h.batch_frames_per_s,
                100.0 * gflops / self.matmul_gflops
            )?;
        }
        writeln!(
            f,
            "batch-1 times include copying the frame in, scaling, the forward pass, the head and contributions;"
        )?;
        writeln!(
            f,
            "% of matmul counts the forward pass and, with MSS, 3·frames·d FLOP of distances per round"
        )
    }
}
