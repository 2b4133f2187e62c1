//! `darkwatch bench`: an operator-facing summary of what scoring costs on this machine.
//!
//! Measures, in one run: the machine's fp32 matmul throughput (the reference the model is
//! compared with), batch-1 latency per frame (p50/p99) and batch throughput for every
//! score head, through the same [`Scorer`] the pipeline uses. Each row goes to a
//! [`BenchSink`] as soon as it is measured, so a long run shows its rows as they come and an
//! interrupted one keeps them; [`BenchReport::to_json`] is the same report for machines.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use ndarray::Array2;
use serde_json::json;

use crate::config::MAX_TOP_CONTRIBUTIONS;
use crate::model::Model;
use crate::model::onnx::OnnxSession;
use crate::mss::{MssConfig, ReferenceBank};
use crate::pipeline::{Contribution, Scorer};
use crate::rng::Rng;
use crate::score::{Head, HeadKind};
use crate::stats::LatencyHistogram;

/// Frames scored before any is timed, per row: caches, branch predictors and the CPU's
/// clock settle.
pub const WARMUP_FRAMES: usize = 1_000;

/// Synthetic rows the timing cycles through (they stay in cache).
pub const DATA_ROWS: usize = 4_096;

/// Batch throughput scores this many times `--frames` frames per native head (ONNX heads an
/// eighth of that), up to [`MAX_THROUGHPUT_FRAMES`]: the default 20,000 gives 2,000,000, and
/// a short run stays short.
pub const THROUGHPUT_FRAMES_PER_FRAME: usize = 100;

/// The most frames a head's batch throughput scores, whatever `--frames` says: at the MSS
/// row's 70,000 frames/s on a loaded 2-core machine that is about 5 minutes, where
/// `--frames 100000000` times 100 would be days.
pub const MAX_THROUGHPUT_FRAMES: usize = 20_000_000;

/// A p99 from fewer samples than this is flagged: its top 1 % is under 10 frames.
pub const FEW_SAMPLES: u64 = 1_000;

/// The fewest frames a timed retrain takes: what [`crate::retrain::refit`] needs with the
/// bench's `min_frames`.
pub const RETRAIN_MIN_FRAMES: usize = 100;

/// Busy windows in [`retrain`]: idle windows come before, between and after them (idle,
/// busy, idle, busy, idle), so drift and noise show as a spread between the idle windows.
pub const RETRAIN_ROUNDS: usize = 2;

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

/// What the numbers were measured on: printed above both benches' tables and written in
/// their JSON.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MachineInfo {
    /// `model name` from `/proc/cpuinfo`; "unknown" where there is none.
    pub cpu: String,
    /// Logical CPUs this process may run on.
    pub cpus: usize,
    /// Threads the timed scoring runs on (the benches are single-threaded).
    pub threads: usize,
    /// The forward kernel picked at run time: "avx2+fma" or "portable".
    pub kernel: &'static str,
    pub version: &'static str,
    /// Cargo features compiled in ("onnx", "cuda").
    pub features: Vec<&'static str>,
}

impl MachineInfo {
    /// This machine, with `kernel` as the workspace that does the timed work reports it.
    pub fn detect(kernel: &'static str) -> MachineInfo {
        let mut features = Vec::new();
        if cfg!(feature = "onnx") {
            features.push("onnx");
        }
        if cfg!(feature = "cuda") {
            features.push("cuda");
        }
        MachineInfo {
            cpu: std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|text| cpu_model(&text))
                .unwrap_or_else(|| "unknown".into()),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            threads: 1,
            kernel,
            version: env!("CARGO_PKG_VERSION"),
            features,
        }
    }
}

/// The first `model name` of a `/proc/cpuinfo` text.
fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "model name" && !value.trim().is_empty()).then(|| value.trim().to_string())
    })
}

impl fmt::Display for MachineInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let features = if self.features.is_empty() {
            "none".to_string()
        } else {
            self.features.join(", ")
        };
        write!(
            f,
            "machine: {} ({} CPUs); kernel {}; darkwatch {} (features: {features}); timed on {} thread",
            self.cpu, self.cpus, self.kernel, self.version, self.threads
        )
    }
}

/// The per-call overhead of the clock the benches use: the p50 of an empty interval timed
/// as the benches time a frame (`Instant::now()`, then `elapsed()`), in ns.
pub fn clock_overhead_ns() -> f64 {
    let mut hist = LatencyHistogram::new();
    for _ in 0..10_000 {
        let t = Instant::now();
        hist.record(std::hint::black_box(t.elapsed().as_nanos() as u64));
    }
    hist.quantile_ns(0.5)
}

/// Memory this process could still take, in bytes (`MemAvailable` of `/proc/meminfo`);
/// `None` where that is not known.
pub fn available_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Where a bench's output goes while it runs.
pub trait BenchSink {
    /// Finished lines of the report (one or more, no trailing newline), as soon as known.
    fn line(&mut self, text: &str);
    /// What is being timed now, for a person waiting (stderr).
    fn status(&mut self, text: &str);
}

/// A sink that drops everything (the report is read at the end).
pub struct Quiet;

impl BenchSink for Quiet {
    fn line(&mut self, _: &str) {}
    fn status(&mut self, _: &str) {}
}

/// How long and how big.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Frames timed one by one for the batch-1 latency.
    pub latency_frames: usize,
    /// Frames scored in batches for throughput (native heads; ONNX heads an eighth).
    pub throughput_frames: usize,
    pub batch: usize,
    /// Rows to score instead of the synthetic ones (`bench --input`), already in the model's
    /// input width; `None`: [`DATA_ROWS`] synthetic rows.
    pub data: Option<BenchData>,
}

/// Real rows for the bench (`bench --input FILE`), cycled like the synthetic ones.
#[derive(Debug, Clone)]
pub struct BenchData {
    /// Where they came from, for the report.
    pub source: String,
    /// One row per frame, the model's input width, every value finite.
    pub rows: Array2<f32>,
}

impl BenchOptions {
    /// `bench --frames N`: N frames one by one, [`THROUGHPUT_FRAMES_PER_FRAME`]·N in batches
    /// (at most [`MAX_THROUGHPUT_FRAMES`]).
    pub fn for_frames(frames: usize) -> BenchOptions {
        BenchOptions {
            latency_frames: frames,
            throughput_frames: frames
                .saturating_mul(THROUGHPUT_FRAMES_PER_FRAME)
                .min(MAX_THROUGHPUT_FRAMES),
            batch: 256,
            data: None,
        }
    }
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions::for_frames(20_000)
    }
}

/// One head's numbers.
#[derive(Debug, Clone)]
pub struct HeadBench {
    /// Head name, with "+mss" when mean-shift scoring was on and the backend when it is
    /// not native.
    pub label: String,
    /// The head alone ("mse", "max_abs", "wnll").
    pub head: &'static str,
    /// "native", or the backend with its provider or device ("onnx/cpu").
    pub backend: String,
    pub mss: bool,
    /// Arithmetic per frame: the forward pass, plus the k-NN distances when MSS is on.
    pub flops_per_frame: usize,
    pub batch1: LatencyHistogram,
    /// ONNX heads: ONNX Runtime's own run on the same frames, timed in the same loop as
    /// `batch1` (alternating with it), so both see the same machine.
    pub run_alone: Option<LatencyHistogram>,
    /// ONNX heads: the exact medians (ns) of `batch1` and of `run_alone`, from the raw
    /// samples (the histograms' buckets are 64 ns wide at 4–8 µs, 1.5 % of a run).
    pub exact_medians: Option<(f64, f64)>,
    /// Frames scored in batches for `batch_frames_per_s`.
    pub batch_frames: usize,
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
    pub machine: MachineInfo,
    /// [`clock_overhead_ns`] on this run.
    pub clock_overhead_ns: f64,
    pub model_id: String,
    pub widths: Vec<usize>,
    pub flops_per_frame: usize,
    pub matmul_gflops: f64,
    pub batch: usize,
    pub latency_frames: usize,
    /// Width of the head column: the longest label.
    pub label_width: usize,
    pub heads: Vec<HeadBench>,
    /// Rows that could not be timed, with why (the bundled `mse` model has no variance
    /// head, so no `wnll` row): printed and in the JSON, where they used to vanish.
    pub skipped: Vec<(String, String)>,
    /// `bench --input`'s file; `None`: synthetic rows.
    pub data_source: Option<String>,
    /// Rows the timing cycles through.
    pub data_rows: usize,
    /// The load average (1, 5, 15 minutes) when the run started and when it ended, where
    /// the system has one: the numbers mean little on a loaded machine.
    pub load_start: Option<[f64; 3]>,
    pub load_end: Option<[f64; 3]>,
    /// When the run started (Unix seconds).
    pub started_unix_s: f64,
}

/// The load average (1, 5, 15 minutes) from `/proc/loadavg`; `None` elsewhere.
pub fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(str::parse::<f64>);
    Some([it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?])
}

/// Single-thread fp32 matmul throughput (GFLOP/s), best of 20 256³ products.
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
fn synthetic_frames(n: usize, d: usize) -> Array2<f32> {
    let mut rng = Rng::new(7);
    Array2::from_shape_fn((n, d), |_| rng.uniform(-2.0, 2.0))
}

/// Runs the benchmark on `model` for every head it supports, on the native kernels and,
/// when the model has an ONNX graph attached, on ONNX Runtime too (same frames, same run).
/// The header, then each row as soon as it is measured, then the notes go to `sink`.
pub fn run(model: Arc<Model>, opts: &BenchOptions, sink: &mut dyn BenchSink) -> BenchReport {
    let load_start = load_average();
    let started_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |t| t.as_secs_f64());
    let d = model.n_features();
    let data = match &opts.data {
        // At least a batch of rows, for the batch throughput: fewer are cycled up to one.
        Some(given) => {
            let n = given.rows.nrows().max(1);
            let rows = n.max(opts.batch);
            Array2::from_shape_fn((rows, d), |(i, j)| given.rows[[i % n, j]])
        }
        None => synthetic_frames(DATA_ROWS, d),
    };
    assert_eq!(data.ncols(), d, "bench data of the model's width");
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
            m.bank = Some(ReferenceBank::build(
                synthetic_frames(2048, d).view(),
                &mss_cfg,
                0,
            ));
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
    let labels: Vec<String> = variants
        .iter()
        .map(|&(kind, model)| match model.active_bank() {
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
        })
        .collect();
    let mut report = BenchReport {
        machine: MachineInfo::detect(model.ae.workspace(1).kernel_name()),
        clock_overhead_ns: clock_overhead_ns(),
        model_id: model.meta.id.clone(),
        widths: model.ae.widths(),
        flops_per_frame: 2 * model.ae.macs_per_frame(),
        matmul_gflops: matmul_gflops(),
        batch: opts.batch,
        latency_frames: opts.latency_frames,
        label_width: labels.iter().map(|l| l.chars().count()).max().unwrap_or(0),
        heads: Vec::new(),
        skipped: Vec::new(),
        data_source: opts.data.as_ref().map(|g| g.source.clone()),
        data_rows: opts.data.as_ref().map_or(data.nrows(), |g| g.rows.nrows()),
        load_start,
        load_end: None,
        started_unix_s,
    };
    sink.line(&report.header());
    let n_variants = variants.len();
    for (index, ((kind, model), label)) in variants.into_iter().zip(labels).enumerate() {
        sink.status(&format!(
            "timing {label} ({} of {n_variants}): {} frames one by one…",
            index + 1,
            opts.latency_frames
        ));
        let head = Head {
            kind,
            ..model.meta.head
        };
        // ONNX Runtime is an order of magnitude slower per frame: fewer frames, same method.
        let throughput_frames = if model.onnx.is_some() {
            opts.throughput_frames / 8
        } else {
            opts.throughput_frames
        }
        .max(opts.batch);
        let (mut one, mut many) = match Scorer::new(model.clone(), head, 1, 3)
            .and_then(|one| Ok((one, Scorer::new(model.clone(), head, opts.batch, 3)?)))
        {
            Ok(pair) => pair,
            Err(why) => {
                sink.line(&report.skipped_line(&label, &why.to_string()));
                report.skipped.push((label, why.to_string()));
                continue;
            }
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
        let mut sink_value = 0.0f32;
        let mut top = [Contribution::default(); MAX_TOP_CONTRIBUTIONS];
        for i in 0..opts.latency_frames + WARMUP_FRAMES {
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
                let ns = scorer(&mut one, &mut sink_value);
                (ns, run(&mut alone))
            } else {
                let run_ns = run(&mut alone);
                (scorer(&mut one, &mut sink_value), run_ns)
            };
            if i >= WARMUP_FRAMES {
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
        // Whole batches: the count goes up to the next multiple of the batch.
        let throughput_frames = throughput_frames.div_ceil(opts.batch) * opts.batch;
        // Batch-1 time per frame bounds the batched time per frame from above.
        let guess = throughput_frames as f64 * batch1.mean_ns() / 1e9;
        if guess > 2.0 {
            sink.status(&format!(
                "timing {label}: {throughput_frames} frames at batch {} (at most about {})…",
                opts.batch,
                crate::sae::bench::duration_text(guess)
            ));
        }
        let b = opts.batch;
        let rows = data.nrows() / b * b;
        let slice = data.as_slice().expect("contiguous");
        let mut done = 0usize;
        let t = Instant::now();
        while done < throughput_frames {
            let start = (done % rows) * d;
            many.input_mut()[..b * d].copy_from_slice(&slice[start..start + b * d]);
            sink_value += many.score(b)[0];
            for i in 0..b {
                many.smooth(i, 0, f64::NAN);
            }
            done += b;
        }
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(sink_value);
        let knn_flops = model
            .active_bank()
            .map_or(0, |b| 3 * b.rounds() * b.frames() * d);
        let row = HeadBench {
            flops_per_frame: 2 * model.ae.macs_per_frame() + knn_flops,
            label,
            head: kind.name(),
            backend: if model.onnx.is_some() || model.cuda.is_some() {
                model.backend_label()
            } else {
                "native".into()
            },
            mss: model.active_bank().is_some(),
            batch1,
            run_alone: alone.map(|(_, _, hist)| hist),
            exact_medians: samples
                .map(|(mut whole, mut run)| (median_ns(&mut whole), median_ns(&mut run))),
            batch_frames: done,
            batch_frames_per_s: done as f64 / secs,
        };
        sink.line(&report.row_line(&row));
        report.heads.push(row);
    }
    report.load_end = load_average();
    sink.line(&report.footer());
    report
}

/// A p99 with its sample count flagged when small: `"  1.23 µs*"`.
pub(crate) fn p99_flag(hist: &LatencyHistogram) -> &'static str {
    if hist.count() < FEW_SAMPLES { "*" } else { " " }
}

/// Quantiles of a histogram for JSON.
pub(crate) fn hist_json(hist: &LatencyHistogram) -> serde_json::Value {
    json!({
        "samples": hist.count(),
        "p50_ns": hist.quantile_ns(0.5),
        "p99_ns": hist.quantile_ns(0.99),
        "max_ns": hist.max_ns(),
        "mean_ns": hist.mean_ns(),
    })
}

impl BenchReport {
    /// The model, the machine and the column names.
    pub fn header(&self) -> String {
        let w = self.label_width.max(4);
        format!(
            "model {} widths {:?}: {} FLOP/frame\n{}\nmachine fp32 matmul (one thread, \
             256x256x256, best of 20): {:.1} GFLOP/s{}\n{:<w$} {:>12} {:>13} {:>12} {:>7} {:>16} \
             {:>12}",
            self.model_id,
            self.widths,
            self.flops_per_frame,
            self.machine,
            self.matmul_gflops,
            match self.load_start {
                Some([one, five, _]) =>
                    format!("\nload average at start: {one:.2} (1 min), {five:.2} (5 min)"),
                None => String::new(),
            },
            "head",
            "batch-1 p50",
            "batch-1 p99",
            "batch-1 max",
            "n",
            format!("batch-{} fr/s", self.batch),
            "% of matmul"
        )
    }

    /// One head's row.
    pub fn row_line(&self, h: &HeadBench) -> String {
        let w = self.label_width.max(4);
        let gflops = h.batch_frames_per_s * h.flops_per_frame as f64 / 1e9;
        format!(
            "{:<w$} {:>9.2} µs {:>9.2} µs{} {:>9.1} µs {:>7} {:>16.0} {:>11.1}%",
            h.label,
            h.batch1.quantile_ns(0.5) / 1e3,
            h.batch1.quantile_ns(0.99) / 1e3,
            p99_flag(&h.batch1),
            h.batch1.max_ns() as f64 / 1e3,
            h.batch1.count(),
            h.batch_frames_per_s,
            100.0 * gflops / self.matmul_gflops
        )
    }

    /// A row that could not be timed, and why.
    pub fn skipped_line(&self, label: &str, why: &str) -> String {
        let w = self.label_width.max(4);
        format!("{label:<w$} skipped: {why}")
    }

    /// The ONNX comparisons and what the columns include.
    pub fn footer(&self) -> String {
        use std::fmt::Write as _;
        let w = self.label_width.max(4);
        let mut f = String::new();
        for h in &self.heads {
            let (Some(run), Some((whole, alone))) = (&h.run_alone, h.exact_medians) else {
                continue;
            };
            let _ = writeln!(
                f,
                "{:<w$} {:>9.2} µs {:>9.2} µs{} {:>7}   (timed alternately with it)",
                format!("  ONNX Runtime run alone, {}", h.label),
                run.quantile_ns(0.5) / 1e3,
                run.quantile_ns(0.99) / 1e3,
                p99_flag(run),
                run.count(),
            );
            let _ = writeln!(
                f,
                "darkwatch overhead around Session::run, {}: {:.1}% of the call (exact medians: {:.3} µs whole, {:.3} µs run alone)",
                h.label,
                100.0 * (whole - alone) / alone,
                whole / 1e3,
                alone / 1e3
            );
        }
        let native = self
            .heads
            .iter()
            .find(|h| h.backend == "native")
            .map_or(0, |h| h.batch_frames);
        let _ = writeln!(
            f,
            "n: frames timed one by one per row, after {WARMUP_FRAMES} warm-up frames; batch-{b} \
             fr/s: {native} frames per native row (ONNX rows an eighth), one clock read around \
             all of them.",
            b = self.batch
        );
        let data = match &self.data_source {
            Some(source) => format!(
                "{} rows of {source}, cycled ({} KiB: {})",
                self.data_rows,
                self.data_rows * self.widths[0] * 4 / 1024,
                if self.data_rows * self.widths[0] * 4 <= 1 << 20 {
                    "they stay in cache"
                } else {
                    "more than a MiB, so partly from memory"
                }
            ),
            None => format!(
                "{DATA_ROWS} synthetic rows, uniform in [-2, 2), cycled (they stay in cache; \
                 --input FILE scores your own rows)"
            ),
        };
        let _ = writeln!(
            f,
            "data: {data}. clock: std::time::Instant around each frame; an empty interval \
             reads {:.0} ns (p50), not subtracted. p50/p99: midpoint of the histogram bucket \
             (about 1.1 % wide) holding the quantile; max: the slowest frame.",
            self.clock_overhead_ns
        );
        if let (Some([s1, ..]), Some([e1, ..])) = (self.load_start, self.load_end) {
            let _ = writeln!(
                f,
                "load average (1 min): {s1:.2} at the start, {e1:.2} at the end, on {} CPUs: \
                 above about 1, other work shared the machine and the slow tail and the batch \
                 rate show it first.",
                self.machine.cpus
            );
        }
        let _ = writeln!(
            f,
            "batch-1 includes copying the frame in, scaling, the forward pass, the head, \
             smoothing over the stream's last frames and picking the top 3 contributions; \
             batch-{b} the same per frame without the contributions.",
            b = self.batch
        );
        if self.heads.iter().any(|h| h.batch1.count() < FEW_SAMPLES) {
            let _ = writeln!(
                f,
                "*: p99 from fewer than {FEW_SAMPLES} samples (its top 1 % is under 10 frames): \
                 give more --frames for a steady one."
            );
        }
        let _ = write!(
            f,
            "% of matmul counts the forward pass and, with MSS, 3·frames·d FLOP of distances per round"
        );
        f
    }

    /// The report for machines: the machine, and one record per timed row (batch 1 and the
    /// batch for each head, and ONNX Runtime's run alone). Fields: README "Latency and
    /// throughput".
    pub fn to_json(&self) -> serde_json::Value {
        let mut rows = Vec::new();
        for h in &self.heads {
            let mut one = hist_json(&h.batch1);
            let mean = h.batch1.mean_ns();
            one["frames_per_s"] = json!(if mean > 0.0 { 1e9 / mean } else { 0.0 });
            for (key, value) in [
                ("name", json!(h.label)),
                ("head", json!(h.head)),
                ("backend", json!(h.backend)),
                ("mss", json!(h.mss)),
                ("batch", json!(1)),
            ] {
                one[key] = value;
            }
            rows.push(one);
            rows.push(json!({
                "name": h.label,
                "head": h.head,
                "backend": h.backend,
                "mss": h.mss,
                "batch": self.batch,
                "samples": h.batch_frames,
                "p50_ns": null,
                "p99_ns": null,
                "max_ns": null,
                "mean_ns": 1e9 / h.batch_frames_per_s,
                "frames_per_s": h.batch_frames_per_s,
            }));
            if let Some(run) = &h.run_alone {
                let mut alone = hist_json(run);
                let mean = run.mean_ns();
                alone["frames_per_s"] = json!(if mean > 0.0 { 1e9 / mean } else { 0.0 });
                alone["name"] = json!(format!("ONNX Runtime run alone, {}", h.label));
                alone["head"] = json!(h.head);
                alone["backend"] = json!(h.backend);
                alone["mss"] = json!(false);
                alone["batch"] = json!(1);
                rows.push(alone);
            }
        }
        json!({
            "machine": self.machine,
            "clock_overhead_ns": self.clock_overhead_ns,
            "matmul_gflops": self.matmul_gflops,
            "warmup_frames": WARMUP_FRAMES,
            "data_rows": self.data_rows,
            "data": self.data_source.as_deref().unwrap_or("synthetic"),
            "load_average": {
                "start": self.load_start,
                "end": self.load_end,
            },
            "started_unix_s": self.started_unix_s,
            "skipped": self
                .skipped
                .iter()
                .map(|(name, why)| json!({"name": name, "reason": why}))
                .collect::<Vec<_>>(),
            "model": {
                "id": self.model_id,
                "widths": self.widths,
                "flops_per_frame": self.flops_per_frame,
            },
            "rows": rows,
        })
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.header())?;
        for h in &self.heads {
            writeln!(f, "{}", self.row_line(h))?;
        }
        writeln!(f, "{}", self.footer())
    }
}

/// Why [`retrain`] measured nothing.
#[derive(Debug, thiserror::Error)]
pub enum RetrainBenchError {
    #[error("the timed retrain: {0}")]
    Retrain(#[from] crate::retrain::RetrainError),
    #[error("the model's own head cannot score: {0}")]
    Scorer(#[from] crate::pipeline::ScorerError),
}

/// One busy window of [`retrain`]'s comparison.
#[derive(Debug, Clone)]
pub struct BusyWindow {
    /// Frames that started and ended while a retrain was in flight.
    pub busy: LatencyHistogram,
    /// Retrains that completed in the window.
    pub retrains: usize,
    pub secs: f64,
}

/// What online retraining costs, and whether it slows scoring.
#[derive(Debug, Clone)]
pub struct RetrainBench {
    pub rows: usize,
    pub epochs: usize,
    /// Wall time and CPU time of one retrain (refit and gate) on its own thread.
    pub wall_secs: f64,
    pub cpu_secs: f64,
    /// The head scored (the model's own).
    pub head: &'static str,
    /// Batch-1 scoring latency with nothing else running, window by window
    /// ([`RETRAIN_ROUNDS`] + 1 of them, each at least `frames` frames and one retrain's wall
    /// time long), and while retrains run back to back on the (low-priority) trainer thread.
    pub idle_windows: Vec<LatencyHistogram>,
    pub busy_windows: Vec<BusyWindow>,
    /// All idle and all busy windows together.
    pub idle: LatencyHistogram,
    pub busy: LatencyHistogram,
    pub retrains_during: usize,
    /// Why a busy window ended before a retrain completed, if one did.
    pub cut_short: Option<String>,
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

/// Times one retrain of `model` on `rows` frames drawn from `data` (raw), then the model's
/// batch-1 scoring latency in [`RETRAIN_ROUNDS`] rounds of `frames` frames idle, then
/// frames scored while retrains run back to back beside it: each busy window lasts until at
/// least `frames` frames were timed during a retrain and at least one retrain completed.
///
/// # Errors
/// The refit's own error (too few frames: fewer than [`RETRAIN_MIN_FRAMES`]; training
/// failed), from the first, timed retrain; a head the model cannot score with.
pub fn retrain(
    model: &Arc<Model>,
    data: ndarray::ArrayView2<f32>,
    rows: usize,
    frames: usize,
) -> Result<RetrainBench, RetrainBenchError> {
    use crate::retrain::{RetrainConfig, gate, refit};
    let cfg = RetrainConfig {
        min_frames: RETRAIN_MIN_FRAMES,
        ..RetrainConfig::default()
    };
    let take: Vec<usize> = (0..rows).map(|i| i % data.nrows().max(1)).collect();
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
            let cand = refit(&m, r.view(), &c, &cfg, 1, None)?;
            std::hint::black_box(gate(&m, &cand, &cfg, &th));
            Ok::<_, crate::retrain::RetrainError>((
                w0.elapsed().as_secs_f64(),
                thread_cpu_secs() - c0,
            ))
        }
    };
    let (wall_secs, cpu_secs) = match std::thread::spawn(once.clone()).join() {
        Ok(timed) => timed?,
        Err(panic) => std::panic::resume_unwind(panic),
    };

    let head = model.meta.head;
    let data = synthetic_frames(DATA_ROWS, model.n_features());
    let mut one = Scorer::new(model.clone(), head, 1, 3)?;
    let mut next = 0usize;
    let mut sink = 0.0f32;
    // One frame as the retrain comparison times it: copy in and score.
    let mut score = |one: &mut Scorer| {
        let row = data.row(next % data.nrows());
        next += 1;
        let t = Instant::now();
        one.input_mut()
            .copy_from_slice(row.as_slice().expect("contiguous"));
        sink += one.score(1)[0];
        t.elapsed().as_nanos() as u64
    };
    for _ in 0..WARMUP_FRAMES {
        score(&mut one);
    }
    // A busy window that outlasts this gives up (a starved low-priority trainer).
    let give_up_secs = 30.0 + 10.0 * wall_secs;
    let mut idle_windows = Vec::with_capacity(RETRAIN_ROUNDS + 1);
    let mut busy_windows = Vec::with_capacity(RETRAIN_ROUNDS);
    let mut cut_short = None;
    for round in 0..=RETRAIN_ROUNDS {
        // Idle as long as a busy window at least lasts: `frames` frames and one retrain.
        let mut idle = LatencyHistogram::new();
        let t0 = Instant::now();
        while idle.count() < frames as u64 || t0.elapsed().as_secs_f64() < wall_secs {
            idle.record(score(&mut one));
        }
        idle_windows.push(idle);
        if round == RETRAIN_ROUNDS {
            break;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let in_flight = Arc::new(AtomicBool::new(false));
        let completed = Arc::new(AtomicUsize::new(0));
        let trainer = {
            let (stop, in_flight, completed, once) = (
                stop.clone(),
                in_flight.clone(),
                completed.clone(),
                once.clone(),
            );
            std::thread::Builder::new()
                .name("darkwatch-trainer".into())
                .spawn(move || {
                    crate::retrain::lower_priority();
                    while !stop.load(Ordering::Relaxed) {
                        in_flight.store(true, Ordering::Release);
                        let done = once();
                        in_flight.store(false, Ordering::Release);
                        if let Err(e) = done {
                            return Some(e.to_string());
                        }
                        completed.fetch_add(1, Ordering::AcqRel);
                    }
                    None
                })
                .expect("spawn the bench trainer")
        };
        let mut busy = LatencyHistogram::new();
        let t0 = Instant::now();
        loop {
            if busy.count() >= frames as u64 && completed.load(Ordering::Acquire) >= 1 {
                break;
            }
            if trainer.is_finished() {
                // Its error is taken below, once the thread is joined.
                cut_short = Some("a retrain failed on the trainer thread".to_string());
                break;
            }
            if t0.elapsed().as_secs_f64() > give_up_secs {
                cut_short = Some(format!(
                    "no retrain completed in {give_up_secs:.0} s (the low-priority trainer got \
                     too little CPU)"
                ));
                break;
            }
            // Only frames that start and end while a retrain is in flight count as busy.
            let before = in_flight.load(Ordering::Acquire);
            let ns = score(&mut one);
            if before && in_flight.load(Ordering::Acquire) {
                busy.record(ns);
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        match trainer.join() {
            Ok(Some(e)) => cut_short = Some(format!("a retrain failed on the trainer thread: {e}")),
            Ok(None) => {}
            Err(_) => cut_short = Some("the trainer thread panicked".to_string()),
        }
        busy_windows.push(BusyWindow {
            busy,
            retrains: completed.load(Ordering::Acquire),
            secs,
        });
        // Once a window gave up, the next would too, each after `give_up_secs`.
        if cut_short.is_some() {
            break;
        }
    }
    std::hint::black_box(sink);
    let mut idle = LatencyHistogram::new();
    let mut busy = LatencyHistogram::new();
    idle_windows.iter().for_each(|h| idle.merge(h));
    busy_windows.iter().for_each(|w| busy.merge(&w.busy));
    Ok(RetrainBench {
        rows,
        epochs: cfg.epochs,
        wall_secs,
        cpu_secs,
        head: head.kind.name(),
        idle,
        busy,
        retrains_during: busy_windows.iter().map(|w| w.retrains).sum(),
        idle_windows,
        busy_windows,
        cut_short,
    })
}

impl RetrainBench {
    /// The comparison for machines (README "Online retraining cost").
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "rows": self.rows,
            "epochs": self.epochs,
            "wall_s": self.wall_secs,
            "cpu_s": self.cpu_secs,
            "head": self.head,
            "retrains_during": self.retrains_during,
            "idle": hist_json(&self.idle),
            "busy": hist_json(&self.busy),
            "idle_windows": self.idle_windows.iter().map(hist_json).collect::<Vec<_>>(),
            "busy_windows": self.busy_windows.iter().map(|w| json!({
                "busy": hist_json(&w.busy),
                "retrains": w.retrains,
                "secs": w.secs,
            })).collect::<Vec<_>>(),
            "cut_short": self.cut_short,
        })
    }
}

impl fmt::Display for RetrainBench {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "one retrain ({} frames, {} epochs, refit + gate): {:.3} s wall, {:.3} s CPU",
            self.rows, self.epochs, self.wall_secs, self.cpu_secs
        )?;
        writeln!(
            f,
            "batch-1 scoring, head {} (native; copying the frame in, scaling, the forward pass \
             and the head; no smoothing or contributions), windows idle, busy, idle, …:",
            self.head,
        )?;
        let us = |h: &LatencyHistogram, q: f64| h.quantile_ns(q) / 1e3;
        writeln!(
            f,
            "  no retrain:        p50 {:.2} µs, p99 {:.2} µs{} (n = {}, {} windows)",
            us(&self.idle, 0.5),
            us(&self.idle, 0.99),
            p99_flag(&self.idle).trim(),
            self.idle.count(),
            self.idle_windows.len()
        )?;
        if self.retrains_during == 0 || self.busy.count() == 0 {
            return writeln!(
                f,
                "  retrains running:  no comparison: no retrain completed while scoring was \
                 timed ({})",
                self.cut_short
                    .as_deref()
                    .unwrap_or("no frame was scored during one")
            );
        }
        let (i99, b99) = (us(&self.idle, 0.99), us(&self.busy, 0.99));
        let busy_secs: f64 = self.busy_windows.iter().map(|w| w.secs).sum();
        writeln!(
            f,
            "  retrains running:  p50 {:.2} µs, p99 {:.2} µs{} (n = {}, frames scored while a \
             retrain was in flight; {} retrains completed in {:.2} s; p99 {:+.1} %)",
            us(&self.busy, 0.5),
            b99,
            p99_flag(&self.busy).trim(),
            self.busy.count(),
            self.retrains_during,
            busy_secs,
            100.0 * (b99 - i99) / i99
        )?;
        let p99s = |hists: Vec<&LatencyHistogram>| {
            hists
                .iter()
                .map(|h| format!("{:.2}", us(h, 0.99)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        write!(
            f,
            "  p99 per window (µs): idle {}; busy {} (the spread between idle windows is this \
             machine's noise)",
            p99s(self.idle_windows.iter().collect()),
            p99s(self.busy_windows.iter().map(|w| &w.busy).collect())
        )?;
        if let Some(why) = &self.cut_short {
            write!(f, "\n  a busy window ended early: {why}")?;
        }
        writeln!(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The throughput frames follow `--frames` a hundredfold, and stop growing where a row
    /// would take hours.
    #[test]
    fn throughput_frames_follow_frames_up_to_a_cap() {
        assert_eq!(BenchOptions::for_frames(100).throughput_frames, 10_000);
        assert_eq!(BenchOptions::default().throughput_frames, 2_000_000);
        assert_eq!(
            BenchOptions::for_frames(100_000_000).throughput_frames,
            MAX_THROUGHPUT_FRAMES
        );
    }

    #[test]
    fn cpu_model_is_the_first_model_name() {
        let text = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n\n\
                    processor\t: 1\nmodel name\t: other\n";
        assert_eq!(cpu_model(text).as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(cpu_model("processor\t: 0\nmodel name\t:\n"), None);
    }

    /// The head column fits its longest label (`wnll+mss(m=1,k=10,2048 synthetic frames)`,
    /// 40 characters, overflowed a 34-wide column), and a p99 from 100 frames is flagged.
    #[test]
    fn rows_fit_the_longest_label_and_flag_small_samples() {
        let mut batch1 = LatencyHistogram::new();
        (0..100).for_each(|i| batch1.record(1_000 + i));
        let label = "wnll+mss(m=1,k=10,2048 synthetic frames)".to_string();
        let head = |label: &str| HeadBench {
            label: label.into(),
            head: "wnll",
            backend: "native".into(),
            mss: true,
            flops_per_frame: 1000,
            batch1: batch1.clone(),
            run_alone: None,
            exact_medians: None,
            batch_frames: 10_240,
            batch_frames_per_s: 1e5,
        };
        let report = BenchReport {
            machine: MachineInfo::detect("portable"),
            clock_overhead_ns: 30.0,
            model_id: "m".into(),
            widths: vec![4, 2, 4],
            flops_per_frame: 1000,
            matmul_gflops: 10.0,
            batch: 256,
            latency_frames: 100,
            label_width: label.chars().count(),
            heads: vec![head("mse"), head(&label)],
            skipped: Vec::new(),
            data_source: None,
            data_rows: DATA_ROWS,
            load_start: Some([0.5, 0.4, 0.3]),
            load_end: Some([0.6, 0.4, 0.3]),
            started_unix_s: 0.0,
        };
        let text = report.to_string();
        let lines: Vec<&str> = text.lines().collect();
        let at = |prefix: &str| lines.iter().find(|l| l.starts_with(prefix)).unwrap();
        // The p50 column starts at the same place on every row, after the longest label.
        let col = |l: &str| l.find(" µs").unwrap();
        assert_eq!(col(at("mse ")), col(at(&label)), "{text}");
        assert!(at(&label).starts_with(&format!("{label} ")), "{text}");
        assert!(
            at("mse ").contains("1.10 µs*       1.1 µs     100"),
            "{text}"
        );
        assert!(
            text.contains("load average (1 min): 0.50 at the start, 0.60 at the end"),
            "{text}"
        );
        assert!(
            text.contains("*: p99 from fewer than 1000 samples"),
            "{text}"
        );
        assert!(text.contains("machine: "), "{text}");
    }

    #[test]
    fn median_is_exact_for_odd_and_even_counts() {
        assert_eq!(median_ns(&mut []), 0.0);
        assert_eq!(median_ns(&mut [7]), 7.0);
        assert_eq!(median_ns(&mut [9, 1, 5]), 5.0);
        assert_eq!(median_ns(&mut [4400, 4300, 4700, 4460]), 4430.0);
    }
}
