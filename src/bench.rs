//! `darkwatch bench`: an operator-facing summary of what scoring costs on this machine.
//!
//! Measures, in one run: the machine's fp32 matmul throughput (the roofline the model is
//! compared with), batch-1 latency per frame (p50/p99) and batch throughput for every
//! score head, through the same [`Scorer`] the pipeline uses.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use ndarray::Array2;

use crate::config::MAX_TOP_CONTRIBUTIONS;
use crate::model::Model;
use crate::model::onnx::OnnxSession;
use crate::mss::{MssConfig, ReferenceBank};
use crate::pipeline::{Contribution, Scorer};
use crate::rng::Rng;
use crate::score::{Head, HeadKind};
use crate::stats::LatencyHistogram;

/// Refuses an SAE folder as `bench --model`, saying what to use instead (it used to fail
/// with `…/model.json: No such file or directory`).
///
/// # Errors
/// The message, naming `sae-bench`, `sae-score` and `run`.
pub fn check_model_dir(dir: &std::path::Path) -> Result<(), String> {
    match crate::sae::detector::autoencoder_only(dir, "bench") {
        Some(why) => Err(why),
        None => Ok(()),
    }
}

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
    /// Head name, with "+mss" when mean-shift scoring was on and the backend when it is
    /// not native.
    pub label: String,
    /// Arithmetic per frame: the forward pass, plus the k-NN distances when MSS is on.
    pub flops_per_frame: usize,
    pub batch1: LatencyHistogram,
    /// ONNX heads: ONNX Runtime's own run on the same frames, timed in the same loop as
    /// `batch1` (alternating with it), so both see the same machine.
    pub run_alone: Option<LatencyHistogram>,
    /// ONNX heads: the exact medians (ns) of `batch1` and of `run_alone`, from the raw
    /// samples (the histograms' buckets are 64 ns wide at 4–8 µs, 1.5 % of a run).
    pub exact_medians: Option<(f64, f64)>,
    pub batch_frames_per_s: f64,
}

/// The exact median of `ns` (reorders it); 0 when empty.
fn median_ns(ns: &mut [u64]) -> f64 {
    if ns.is_empty() {
        return 0.0;
    }
    let mid = ns.len() / 2;
    let (_, &mut hi, _) = ns.select_nth_unstable(mid);
    if ns.len() % 2 == 1 {
        return hi as f64;
    }
    let lo = ns[..mid].iter().copied().max().unwrap_or(hi);
    (lo as f64 + hi as f64) / 2.0
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

/// Runs the benchmark on `model` for every head it supports, on the native kernels and,
/// when the model has an ONNX graph attached, on ONNX Runtime too (same frames, same run).
pub fn run(model: Arc<Model>, opts: &BenchOptions) -> BenchReport {
    let d = model.n_features();
    let data = frames(4096, d);
    let mut heads = Vec::new();
    let no_mss = model.with_mss(MssConfig {
        rounds: 0,
        ..model.meta.mss
    });
    let onnx = no_mss.onnx.is_some().then(|| Arc::new(no_mss.clone()));
    let gpu = no_mss.cuda.is_some().then(|| Arc::new(no_mss.clone()));
    let plain = Arc::new(Model {
        onnx: None,
        cuda: None,
        ..no_mss
    });
    let model = Arc::new(Model {
        onnx: None,
        cuda: None,
        ..(*model).clone()
    });
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
    let mut variants = vec![
        (HeadKind::Mse, &plain),
        (HeadKind::MaxAbs, &plain),
        (HeadKind::Wnll, &plain),
        (HeadKind::Wnll, &mss),
    ];
    if let Some(onnx) = &onnx {
        variants.extend([HeadKind::Mse, HeadKind::MaxAbs, HeadKind::Wnll].map(|k| (k, onnx)));
    }
    if let Some(gpu) = &gpu {
        variants.extend([HeadKind::Mse, HeadKind::MaxAbs, HeadKind::Wnll].map(|k| (k, gpu)));
    }
    for (kind, model) in variants {
        let head = Head {
            kind,
            ..model.meta.head
        };
        // ONNX Runtime is an order of magnitude slower per frame: fewer frames, same method.
        let throughput_frames = if model.onnx.is_some() {
            opts.throughput_frames / 8
        } else {
            opts.throughput_frames
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
            None if model.onnx.is_some() || model.cuda.is_some() => {
                format!("{} [{}]", kind.name(), model.backend_label())
            }
            None => kind.name().to_string(),
        };
        let Ok(mut one) = Scorer::new(model.clone(), head, 1, 3) else {
            continue;
        };
        let mut batch1 = LatencyHistogram::new();
        // ONNX: the run alone, on a session of its own, fed the same frame scaled.
        let mut alone = model
            .onnx
            .clone()
            .and_then(|graph| OnnxSession::new(graph, 1).ok())
            .map(|session| {
                let scaled = model.meta.scaler.transform(data.view());
                (session, scaled, LatencyHistogram::new())
            });
        // The ONNX rows' raw samples, for exact medians.
        let mut samples: Option<(Vec<u64>, Vec<u64>)> = alone.as_ref().map(|_| {
            (
                Vec::with_capacity(opts.latency_frames),
                Vec::with_capacity(opts.latency_frames),
            )
        });
        let mut sink = 0.0f32;
        let mut top = [Contribution::default(); MAX_TOP_CONTRIBUTIONS];
        for i in 0..opts.latency_frames + 1000 {
            let r = i % data.nrows();
            // What the pipeline does per frame: copy in, score, smooth over the stream's
            // last frames, pick the top contributions.
            let mut scorer = |one: &mut Scorer, sink: &mut f32| {
                let t = Instant::now();
                one.input_mut()
                    .copy_from_slice(data.row(r).as_slice().expect("contiguous"));
                *sink += one.score(1)[0];
                one.smooth(0, 0, f64::NAN);
                *sink += f32::from(one.top_contributions(0, &mut top));
                t.elapsed().as_nanos() as u64
            };
            let run = |alone: &mut Option<(OnnxSession, Array2<f32>, LatencyHistogram)>| {
                alone.as_mut().map_or(0, |(session, scaled, _)| {
                    session
                        .time_run(scaled.slice(ndarray::s![r..=r, ..]))
                        .unwrap_or(0)
                })
            };
            // Alternate which goes first, so neither always runs on a warmer cache.
            let (ns, run_ns) = if i % 2 == 0 {
                let ns = scorer(&mut one, &mut sink);
                (ns, run(&mut alone))
            } else {
                let run_ns = run(&mut alone);
                (scorer(&mut one, &mut sink), run_ns)
            };
            if i >= 1000 {
                batch1.record(ns);
                if let Some((_, _, hist)) = alone.as_mut() {
                    hist.record(run_ns);
                }
                if let Some((whole, run)) = samples.as_mut() {
                    whole.push(ns);
                    run.push(run_ns);
                }
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
        while done < throughput_frames {
            let start = (done % rows) * d;
            many.input_mut()[..b * d].copy_from_slice(&slice[start..start + b * d]);
            sink += many.score(b)[0];
            for i in 0..b {
                many.smooth(i, 0, f64::NAN);
            }
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
            run_alone: alone.map(|(_, _, hist)| hist),
            exact_medians: samples
                .map(|(mut whole, mut run)| (median_ns(&mut whole), median_ns(&mut run))),
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
        for h in &self.heads {
            let (Some(run), Some((whole, alone))) = (&h.run_alone, h.exact_medians) else {
                continue;
            };
            writeln!(
                f,
                "{:<34} {:>9.2} µs {:>9.2} µs   (timed alternately with it)",
                format!("  ONNX Runtime run alone, {}", h.label),
                run.quantile_ns(0.5) / 1e3,
                run.quantile_ns(0.99) / 1e3,
            )?;
            writeln!(
                f,
                "darkwatch overhead around Session::run, {}: {:.1}% of the call (exact medians: {:.3} µs whole, {:.3} µs run alone)",
                h.label,
                100.0 * (whole - alone) / alone,
                whole / 1e3,
                alone / 1e3
            )?;
        }
        writeln!(
            f,
            "batch-1 times include copying the frame in, scaling, the forward pass, the head and picking the top 3 contributions;"
        )?;
        writeln!(
            f,
            "% of matmul counts the forward pass and, with MSS, 3·frames·d FLOP of distances per round"
        )
    }
}

/// What online retraining costs, and whether it slows scoring.
#[derive(Debug, Clone)]
pub struct RetrainBench {
    pub rows: usize,
    pub epochs: usize,
    /// Wall time and CPU time of one retrain (refit and gate) on its own thread.
    pub wall_secs: f64,
    pub cpu_secs: f64,
    /// Batch-1 scoring latency with nothing else running, then while retrains run back to
    /// back on the (low-priority) trainer thread.
    pub idle: LatencyHistogram,
    pub busy: LatencyHistogram,
    pub retrains_during: usize,
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Times one retrain of `model` on `rows` frames drawn from `data` (raw), then the
/// model's batch-1 scoring latency without and with retrains running beside it.
pub fn retrain(
    model: &Arc<Model>,
    data: ndarray::ArrayView2<f32>,
    rows: usize,
    frames: usize,
) -> RetrainBench {
    use crate::retrain::{RetrainConfig, gate, refit};
    let cfg = RetrainConfig {
        min_frames: 100,
        ..RetrainConfig::default()
    };
    let take: Vec<usize> = (0..rows).map(|i| i % data.nrows()).collect();
    let train_rows = Arc::new(data.select(ndarray::Axis(0), &take));
    let clean = Arc::new(vec![true; rows]);
    let threshold = crate::threshold::ThresholdConfig::default();
    let once = {
        let (m, r, c, cfg, th) = (
            model.clone(),
            train_rows.clone(),
            clean.clone(),
            cfg.clone(),
            threshold.clone(),
        );
        move || {
            let (w0, c0) = (Instant::now(), thread_cpu_secs());
            if let Ok(cand) = refit(&m, r.view(), &c, &cfg, 1) {
                std::hint::black_box(gate(&m, &cand, &cfg, &th));
            }
            (w0.elapsed().as_secs_f64(), thread_cpu_secs() - c0)
        }
    };
    let (wall_secs, cpu_secs) = std::thread::spawn(once.clone())
        .join()
        .unwrap_or((f64::NAN, f64::NAN));

    let head = model.meta.head;
    let scaled_free = frames_for_latency(model.n_features());
    let measure = |hist: &mut LatencyHistogram| {
        let Ok(mut one) = Scorer::new(model.clone(), head, 1, 3) else {
            return;
        };
        let mut sink = 0.0f32;
        for i in 0..frames + 1000 {
            let row = scaled_free.row(i % scaled_free.nrows());
            let t = Instant::now();
            one.input_mut()
                .copy_from_slice(row.as_slice().expect("contiguous"));
            sink += one.score(1)[0];
            if i >= 1000 {
                hist.record(t.elapsed().as_nanos() as u64);
            }
        }
        std::hint::black_box(sink);
    };
    let mut idle = LatencyHistogram::new();
    measure(&mut idle);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trainer = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("darkwatch-trainer".into())
            .spawn(move || {
                crate::retrain::lower_priority();
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    once();
                    n += 1;
                }
                n
            })
            .expect("spawn the bench trainer")
    };
    let mut busy = LatencyHistogram::new();
    measure(&mut busy);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let retrains_during = trainer.join().unwrap_or(0);
    RetrainBench {
        rows,
        epochs: cfg.epochs,
        wall_secs,
        cpu_secs,
        idle,
        busy,
        retrains_during,
    }
}

fn frames_for_latency(d: usize) -> Array2<f32> {
    frames(4096, d)
}

impl fmt::Display for RetrainBench {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "one retrain ({} frames, {} epochs, refit + gate): {:.2} s wall, {:.2} s CPU",
            self.rows, self.epochs, self.wall_secs, self.cpu_secs
        )?;
        let (i50, i99) = (
            self.idle.quantile_ns(0.5) / 1e3,
            self.idle.quantile_ns(0.99) / 1e3,
        );
        let (b50, b99) = (
            self.busy.quantile_ns(0.5) / 1e3,
            self.busy.quantile_ns(0.99) / 1e3,
        );
        writeln!(
            f,
            "batch-1 scoring, no retrain:        p50 {i50:.2} µs, p99 {i99:.2} µs"
        )?;
        writeln!(
            f,
            "batch-1 scoring, retrains running:  p50 {b50:.2} µs, p99 {b99:.2} µs ({} retrains meanwhile; p99 {:+.1} %)",
            self.retrains_during,
            100.0 * (b99 - i99) / i99
        )
    }
}

#[cfg(test)]
mod tests {
    use super::median_ns;

    #[test]
    fn median_is_exact_for_odd_and_even_counts() {
        assert_eq!(median_ns(&mut []), 0.0);
        assert_eq!(median_ns(&mut [7]), 7.0);
        assert_eq!(median_ns(&mut [9, 1, 5]), 5.0);
        assert_eq!(median_ns(&mut [4400, 4300, 4700, 4460]), 4430.0);
    }
}
