//! `darkwatch sae-bench`: what SAE scoring costs on this machine's CPU.
//!
//! For each shape (d_in, d_sae) a TopK SAE with random weights runs the full forward pass
//! (normalise, encode, TopK, sparse decode, error, ‖e‖²) at batch 1 (per-token latency) and at
//! a larger batch (per-batch latency, tokens/s). The encoder product alone is timed at the
//! large batch and compared with a single-thread sgemm reference, a 256³ product
//! ([`crate::bench::matmul_gflops`]: a reference, not a bound); ndarray's `general_mat_mul` (matrixmultiply) on the same
//! product is timed next to it, so the choice of kernel stays checked.
//!
//! With `sae-bench --sae` ([`run_own`]) the user's own SAE takes the place of the random
//! shapes: the same columns for its shape, each frame scored through the SAE and, when it
//! has one, its dark-matter head, as the agent scores a frame.

use std::fmt;
use std::time::Instant;

use ndarray::{Array2, ArrayView2};

use serde_json::json;

use super::dark::DarkHead;
use super::{Sae, SaeActivation, SaeError};
use crate::bench::{BenchSink, FEW_SAMPLES, MachineInfo, hist_json, p99_flag as flag};
use crate::rng::Rng;
use crate::stats::LatencyHistogram;

/// The largest `--batch`: beyond it one batch of the largest default shape needs gigabytes
/// and a measurement of five calls takes minutes.
pub const MAX_BATCH: usize = 65_536;

/// What to measure.
#[derive(Debug, Clone)]
pub struct SaeBenchOptions {
    /// `(d_in, d_sae)` pairs.
    pub shapes: Vec<(usize, usize)>,
    /// TopK k.
    pub k: usize,
    /// The large batch.
    pub batch: usize,
    /// Seconds spent per measurement (at least `min_iters` calls are timed).
    pub secs_per_measurement: f64,
    pub min_iters: usize,
    /// Also time ndarray's `general_mat_mul` on the encoder product (needs an unpacked copy
    /// of W_enc).
    pub compare_ndarray: bool,
}

impl Default for SaeBenchOptions {
    fn default() -> Self {
        SaeBenchOptions {
            shapes: vec![(384, 16_384), (384, 32_768), (768, 16_384), (768, 32_768)],
            k: 32,
            batch: 256,
            secs_per_measurement: 2.0,
            min_iters: 5,
            compare_ndarray: true,
        }
    }
}

impl SaeBenchOptions {
    /// About how long [`run`] takes on a machine whose sgemm reference runs at `gflops`
    /// ([`crate::bench::matmul_gflops`]): each shape's measurements (batch 1, the batch, the
    /// encoder, and ndarray's product when compared) take `secs_per_measurement` or the
    /// warm-up and `min_iters` calls, whichever is longer (a call of the batch costs its
    /// encoder product, 2·batch·d_in·d_sae FLOP, and about as much again for the rest of the
    /// forward pass); plus the sgemm reference twice and setting up each shape (random
    /// weights, packing: about 2.5 s for the default shapes on a 2-vCPU machine).
    pub fn estimated_secs(&self, gflops: f64) -> f64 {
        let gflops = if gflops.is_finite() && gflops > 0.0 {
            gflops
        } else {
            10.0
        };
        let calls = (self.min_iters + 1) as f64;
        let measure = |call_secs: f64| self.secs_per_measurement.max(calls * call_secs);
        let shapes: f64 = self
            .shapes
            .iter()
            .map(|&(d_in, d_sae)| {
                let product = 2.0 * (d_in * d_sae) as f64 / (gflops * 1e9);
                let batch = self.batch.max(1) as f64;
                // Batch 1 streams W_enc from memory: take it as 4 times the product's time.
                let mut secs = measure(4.0 * product) + measure(2.0 * batch * product);
                secs += measure(batch * product);
                if self.compare_ndarray {
                    secs += measure(batch * product);
                }
                secs + 2.5
            })
            .sum();
        shapes + 2.0
    }

    /// About the bytes one shape needs at `batch`: the rows fed (4·batch), the workspace
    /// (inputs, pre-activations, reconstruction, error), the SAE's weights (twice: packed and
    /// plain) and, when compared, ndarray's output and its copy of `W_enc`.
    pub fn bytes_needed(&self, d_in: usize, d_sae: usize) -> u128 {
        self.bytes_needed_at(self.batch, d_in, d_sae)
    }

    /// [`Self::bytes_needed`] at another batch.
    fn bytes_needed_at(&self, batch: usize, d_in: usize, d_sae: usize) -> u128 {
        let (b, d_in, d_sae) = (batch.max(1) as u128, d_in as u128, d_sae as u128);
        let k = self.k as u128;
        let mut floats = 4 * b * d_in + b * (3 * d_in + d_sae + 2 * k) + 4 * d_in * d_sae;
        if self.compare_ndarray {
            floats += b * d_sae + d_in * d_sae;
        }
        4 * floats
    }

    /// Refuses a batch that would not fit: more than nine tenths of `available` bytes for a
    /// shape (the tenth left for the process itself and what else runs). `bytes_needed` is
    /// an upper bound: the weights are most of it at small batches, and a run's peak RSS
    /// stays under it.
    ///
    /// # Errors
    /// [`SaeError::Invalid`] naming the batch, the shape, what it needs and what there is;
    /// where even batch 1 would not fit, it says that the shape does not fit, which no
    /// smaller --batch mends.
    pub fn check_memory(&self, available: Option<u64>) -> Result<(), SaeError> {
        let Some(available) = available else {
            return Ok(());
        };
        let limit = u128::from(available) / 10 * 9;
        let gib = |b: u128| b as f64 / (1u64 << 30) as f64;
        for &(d_in, d_sae) in &self.shapes {
            let need = self.bytes_needed(d_in, d_sae);
            if need <= limit {
                continue;
            }
            let one = self.bytes_needed_at(1, d_in, d_sae);
            let remedy = if one > limit {
                format!(
                    "even --batch 1 needs about {:.1} GiB (mostly the weights), so this shape \
                     cannot be timed here",
                    gib(one)
                )
            } else {
                "give a smaller --batch".into()
            };
            return Err(SaeError::Invalid(format!(
                "--batch {} needs about {:.1} GiB for d_in {d_in} × d_sae {d_sae}, more than \
                 nine tenths of the {:.1} GiB available: {remedy}",
                self.batch,
                gib(need),
                gib(u128::from(available))
            )));
        }
        Ok(())
    }
}

/// `about …` text for a duration in seconds: `20 s`, `a minute`, `3 minutes`.
pub fn duration_text(secs: f64) -> String {
    let secs = secs.max(1.0).round();
    if secs < 45.0 {
        format!("{secs} s")
    } else if secs < 90.0 {
        "a minute".into()
    } else {
        format!("{} minutes", (secs / 60.0).round())
    }
}

/// One shape's numbers.
#[derive(Debug, Clone)]
pub struct SaeBenchRow {
    pub d_in: usize,
    pub d_sae: usize,
    /// TopK's k; `None` for a ReLU or JumpReLU SAE (`sae-bench --sae`).
    pub k: Option<usize>,
    /// Per-token latency of the full forward pass at batch 1 (with the head's score, for a
    /// user's SAE that has one).
    pub batch1: LatencyHistogram,
    /// Per-batch latency of the full forward pass at the large batch.
    pub batched: LatencyHistogram,
    /// Per-batch latency of the encoder product alone (pre-activations).
    pub encoder: LatencyHistogram,
    /// The same calls' on-CPU time (this thread's time on a core, from
    /// `/proc/thread-self/schedstat`): what the product costs when the machine is shared and
    /// the thread is preempted. `None` where the file is not available.
    pub encoder_cpu: Option<LatencyHistogram>,
    /// The smallest step of that clock seen, in ns ([`thread_cpu_step_ns`]): some kernels
    /// advance it only at the scheduler tick (4 ms at 250 Hz), so a call shorter than that
    /// measures 0 ns. `None` where it was not seen to move.
    pub encoder_cpu_step_ns: Option<u64>,
    /// Per-batch latency of ndarray's `general_mat_mul` on the same product, if measured.
    pub ndarray_gemm: Option<LatencyHistogram>,
}

impl SaeBenchRow {
    /// Encoder flops per token: 2·d_in·d_sae.
    pub fn flops_per_token(&self) -> f64 {
        2.0 * (self.d_in * self.d_sae) as f64
    }

    /// Tokens per second at batch 1, from the mean latency: the rate the timed calls
    /// sustained, slow ones included (from the median it flattered a loaded machine: 607
    /// against 409 tok/s in a trial).
    pub fn batch1_tokens_per_s(&self) -> f64 {
        1e9 / self.batch1.mean_ns()
    }

    /// Tokens per second at the large batch, from the mean batch latency.
    pub fn batched_tokens_per_s(&self, batch: usize) -> f64 {
        batch as f64 * 1e9 / self.batched.mean_ns()
    }

    /// GFLOP/s of the encoder product at the large batch (median).
    pub fn encoder_gflops(&self, batch: usize) -> f64 {
        batch as f64 * self.flops_per_token() / self.encoder.quantile_ns(0.5)
    }

    /// GFLOP/s of the encoder product at the large batch from its fastest call.
    pub fn encoder_best_gflops(&self, batch: usize) -> f64 {
        batch as f64 * self.flops_per_token() / self.encoder.quantile_ns(0.0).max(1.0)
    }

    /// GFLOP/s of the encoder product per on-CPU second (median), if measured and resolved:
    /// `None` when the median call's CPU time is zero or under [`CPU_STEPS_NEEDED`] steps of
    /// the clock (the quantisation error would then exceed 10 %; on a 4 ms clock, calls
    /// measured 0 ns and this divided by ~0 into 150994944 GFLOP/s).
    pub fn encoder_cpu_gflops(&self, batch: usize) -> Option<f64> {
        let ns = self.encoder_cpu.as_ref()?.quantile_ns(0.5);
        let step = self.encoder_cpu_step_ns? as f64;
        (ns > 0.0 && ns >= CPU_STEPS_NEEDED * step)
            .then(|| batch as f64 * self.flops_per_token() / ns)
    }

    /// Whether on-CPU time was measured but too coarse to give a figure
    /// ([`encoder_cpu_gflops`](Self::encoder_cpu_gflops) is `None` for that reason).
    pub fn encoder_cpu_unresolved(&self) -> bool {
        self.encoder_cpu.is_some() && self.encoder_cpu_gflops(1).is_none()
    }

    /// GFLOP/s of ndarray's product at the large batch (median), if measured.
    pub fn ndarray_gflops(&self, batch: usize) -> Option<f64> {
        self.ndarray_gemm
            .as_ref()
            .map(|h| batch as f64 * self.flops_per_token() / h.quantile_ns(0.5))
    }
}

/// The whole table.
#[derive(Debug, Clone)]
pub struct SaeBenchReport {
    /// Single-thread sgemm GFLOP/s of this machine on a 256³ product, best of 20 (a
    /// reference to compare with, not a bound: see the report's footnote).
    pub matmul_gflops: f64,
    pub kernel: &'static str,
    /// What it ran on (its kernel: the SAE encoder's).
    pub machine: MachineInfo,
    /// The fewest calls timed per measurement.
    pub min_iters: usize,
    pub batch: usize,
    pub rows: Vec<SaeBenchRow>,
    /// With `sae-bench --sae`: which SAE, and what was timed.
    pub own: Option<String>,
}

/// Runs the benchmark (single thread; takes about [`SaeBenchOptions::estimated_secs`]),
/// telling `sink` which shape it is timing.
///
/// # Errors
/// [`SaeError::Invalid`] for a shape of 0, `k` outside `1..=d_sae`, a batch above
/// [`MAX_BATCH`] or one that needs more than nine tenths of the memory available (checked before
/// anything is allocated).
pub fn run(opts: &SaeBenchOptions, sink: &mut dyn BenchSink) -> Result<SaeBenchReport, SaeError> {
    check_batch(opts)?;
    let matmul_gflops = crate::bench::matmul_gflops();
    let batch = opts.batch.max(1);
    let mut rows = Vec::new();
    let mut kernel = "portable";
    let started = Instant::now();
    for (i, &(d_in, d_sae)) in opts.shapes.iter().enumerate() {
        sink.status(&format!(
            "timing d_in {d_in} × d_sae {d_sae} ({} of {}, {:.0} s so far)…",
            i + 1,
            opts.shapes.len(),
            started.elapsed().as_secs_f64()
        ));
        let sae = Sae::random(d_in, d_sae, opts.k, 42 + i as u64)?;
        let pool = random_rows(4 * batch, d_in);
        let (row, k) = measure(&sae, None, pool.view(), opts)?;
        kernel = k;
        rows.push(row);
    }
    // Best of before and after: a shared machine can slow either one.
    let matmul_gflops = matmul_gflops.max(crate::bench::matmul_gflops());
    Ok(SaeBenchReport {
        matmul_gflops,
        kernel,
        machine: MachineInfo::detect(kernel),
        min_iters: opts.min_iters,
        batch,
        rows,
        own: None,
    })
}

/// The batch bounds of [`run`] and [`run_own`]: [`SaeBenchOptions::check_batch`].
fn check_batch(opts: &SaeBenchOptions) -> Result<(), SaeError> {
    opts.check_batch()
}

impl SaeBenchOptions {
    /// Whether the batch can run here: at most [`MAX_BATCH`], and within nine tenths of the memory
    /// available for every shape ([`Self::check_memory`]). [`run`] and [`run_own`] check it
    /// before allocating; a caller can check it before announcing the run.
    ///
    /// # Errors
    /// [`SaeError::Invalid`] saying which limit, and by how much.
    pub fn check_batch(&self) -> Result<(), SaeError> {
        if self.batch > MAX_BATCH {
            return Err(SaeError::Invalid(format!(
                "--batch {} is above the limit of {MAX_BATCH}",
                self.batch
            )));
        }
        self.check_memory(crate::bench::available_memory_bytes())
    }
}

/// A user's SAE to time (`sae-bench --sae`) instead of the random shapes.
#[derive(Debug, Clone, Copy)]
pub struct OwnSae<'a> {
    pub sae: &'a Sae,
    /// Where it was loaded from, for the report.
    pub name: &'a str,
    /// Its dark-matter head, scored with every frame as the agent scores it; `None` times
    /// the SAE alone.
    pub head: Option<&'a DarkHead>,
    /// Rows to feed it (real activations: 4 · batch of them spread evenly over the rows,
    /// reused in turn); `None`: random rows on the scale of residual streams (norm ≈ √d).
    /// A ReLU or JumpReLU SAE decodes every latent that fires, so its time depends on the
    /// rows.
    pub inputs: Option<ArrayView2<'a, f32>>,
}

/// [`run`] on one SAE of the user's (`sae-bench --sae`): per-frame latency at batch 1 and
/// per-batch latency at `opts.batch`, median and p99, with its head when given. `opts.shapes`
/// and `opts.k` are not used.
///
/// # Errors
/// [`SaeError::Invalid`] when the inputs or the head do not have the SAE's width, or no
/// input row is given.
pub fn run_own(
    own: &OwnSae,
    opts: &SaeBenchOptions,
    sink: &mut dyn BenchSink,
) -> Result<SaeBenchReport, SaeError> {
    let (sae, batch) = (own.sae, opts.batch.max(1));
    check_batch(&SaeBenchOptions {
        shapes: vec![(sae.d_in(), sae.d_sae())],
        ..opts.clone()
    })?;
    if let Some(head) = own.head
        && head.d() != sae.d_in()
    {
        return Err(SaeError::Invalid(format!(
            "the dark-matter head takes d = {}, the SAE d_in = {}",
            head.d(),
            sae.d_in()
        )));
    }
    let pool = match own.inputs {
        Some(x) if x.ncols() != sae.d_in() => {
            return Err(SaeError::Invalid(format!(
                "the input rows have {} features, the SAE d_in = {}",
                x.ncols(),
                sae.d_in()
            )));
        }
        Some(x) if x.nrows() == 0 => {
            return Err(SaeError::Invalid("the input holds no rows".into()));
        }
        // 4·batch rows spread evenly over the file (every row, in turn, when it is shorter).
        Some(x) => {
            let (n, want) = (x.nrows(), 4 * batch);
            let pick = |r: usize| if n >= want { r * n / want } else { r % n };
            Array2::from_shape_fn((want, x.ncols()), |(r, c)| x[[pick(r), c]])
        }
        None => random_rows(4 * batch, sae.d_in()),
    };
    let matmul_gflops = crate::bench::matmul_gflops();
    sink.status(&format!(
        "timing {} (d_in {} × d_sae {})…",
        own.name,
        sae.d_in(),
        sae.d_sae()
    ));
    let (row, kernel) = measure(sae, own.head, pool.view(), opts)?;
    let matmul_gflops = matmul_gflops.max(crate::bench::matmul_gflops());
    let per_frame = if own.head.is_some() {
        "the SAE and its dark-matter head, as the agent scores a frame"
    } else {
        "the SAE alone (no dark-matter head found)"
    };
    let inputs = if own.inputs.is_some() {
        "the given activations"
    } else {
        "random rows"
    };
    Ok(SaeBenchReport {
        matmul_gflops,
        kernel,
        machine: MachineInfo::detect(kernel),
        min_iters: opts.min_iters,
        batch,
        rows: vec![row],
        own: Some(format!(
            "{}: {:?}, normalisation {}; timed: {per_frame}, on {inputs}",
            own.name,
            sae.activation(),
            sae.normalization_label()
        )),
    })
}

/// `n` rows of width `d` on the scale of real residual streams (norm ≈ √d).
fn random_rows(n: usize, d: usize) -> Array2<f32> {
    let mut rng = Rng::new(7);
    Array2::from_shape_fn((n, d), |_| rng.uniform(-1.7, 1.7))
}

/// Times `sae` (and `head`, per batch, when given) on rows of `pool` (at least
/// `4·opts.batch`): one row of the table, and the kernel's name.
fn measure(
    sae: &Sae,
    head: Option<&DarkHead>,
    pool: ArrayView2<f32>,
    opts: &SaeBenchOptions,
) -> Result<(SaeBenchRow, &'static str), SaeError> {
    let batch = opts.batch.max(1);
    let (d_in, d_sae) = (sae.d_in(), sae.d_sae());
    let mut ws = sae.workspace(batch);
    let mut dws = head.map(|h| h.workspace(batch));
    let kernel = ws.kernel_name();
    let timed = |f: &mut dyn FnMut(usize)| {
        let mut hist = LatencyHistogram::new();
        f(0); // warm-up
        let start = Instant::now();
        let mut it = 0;
        while it < opts.min_iters || start.elapsed().as_secs_f64() < opts.secs_per_measurement {
            let t = Instant::now();
            f(it + 1);
            hist.record(t.elapsed().as_nanos() as u64);
            it += 1;
        }
        hist
    };
    // The whole per-frame work on rows `r..r + n`: the forward pass, and the head's scores.
    let mut frame = |r: usize, n: usize| {
        let x = pool.slice(ndarray::s![r..r + n, ..]);
        let out = sae.forward(x, &mut ws).expect("width checked");
        std::hint::black_box(out.error_sq_norm()[0]);
        if let (Some(head), Some(dws)) = (head, dws.as_mut()) {
            let s = head.score(x, out.error(), dws).expect("width checked");
            std::hint::black_box(s[0].deviation);
        }
    };
    let n_pool = pool.nrows();
    let batch1 = timed(&mut |it| frame(it % n_pool, 1));
    let blocks = n_pool / batch;
    let batched = timed(&mut |it| frame((it % blocks) * batch, batch));
    let mut cpu = thread_cpu_ns().map(|_| LatencyHistogram::new());
    let cpu_step = cpu.as_ref().and_then(|_| thread_cpu_step_ns());
    let encoder = timed(&mut |it| {
        let r = (it % blocks) * batch;
        let before = thread_cpu_ns();
        let pre = sae
            .pre_acts(pool.slice(ndarray::s![r..r + batch, ..]), &mut ws)
            .expect("width checked");
        std::hint::black_box(pre[[0, 0]]);
        if let (Some(h), Some(a), Some(b)) = (cpu.as_mut(), before, thread_cpu_ns())
            && it > 0
        {
            h.record(b.saturating_sub(a));
        }
    });
    let ndarray_gemm = opts.compare_ndarray.then(|| {
        let w = Array2::from_shape_fn((d_in, d_sae), |(i, j)| sae.w_enc_at(i, j));
        let mut out = Array2::<f32>::zeros((batch, d_sae));
        timed(&mut |it| {
            let r = (it % blocks) * batch;
            let x = pool.slice(ndarray::s![r..r + batch, ..]);
            ndarray::linalg::general_mat_mul(1.0, &x, &w, 0.0, &mut out);
            std::hint::black_box(out[[0, 0]]);
        })
    });
    let k = match sae.activation() {
        SaeActivation::TopK { k } => Some(k),
        SaeActivation::Relu | SaeActivation::JumpRelu => None,
    };
    Ok((
        SaeBenchRow {
            d_in,
            d_sae,
            k,
            batch1,
            batched,
            encoder,
            encoder_cpu: cpu,
            encoder_cpu_step_ns: cpu_step,
            ndarray_gemm,
        },
        kernel,
    ))
}

/// How many steps of the thread CPU clock a call must take for its CPU time to be shown:
/// 10, so that the clock's quantisation is at most a tenth of the figure.
pub const CPU_STEPS_NEEDED: f64 = 10.0;

/// The smallest step of [`thread_cpu_ns`] seen while spinning on it: 3 steps, each waited
/// for at most 50 ms of wall time. A kernel that updates the clock only at the scheduler
/// tick shows the tick (4 ms at 250 Hz); a fine one, about a microsecond. `None` when the
/// clock is not available or did not move.
fn thread_cpu_step_ns() -> Option<u64> {
    let mut step: Option<u64> = None;
    for _ in 0..3 {
        let start = thread_cpu_ns()?;
        let t0 = Instant::now();
        while t0.elapsed().as_millis() < 50 {
            let now = thread_cpu_ns()?;
            if now > start {
                step = Some(step.map_or(now - start, |s| s.min(now - start)));
                break;
            }
        }
    }
    step
}

/// This thread's time on a CPU so far, in ns (Linux: `/proc/thread-self/schedstat`).
fn thread_cpu_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

impl SaeBenchReport {
    /// The report for machines: the machine, and one record per row (README "SAE scoring
    /// speed").
    pub fn to_json(&self) -> serde_json::Value {
        let b = self.batch;
        let rows: Vec<_> = self
            .rows
            .iter()
            .map(|r| {
                json!({
                    "d_in": r.d_in,
                    "d_sae": r.d_sae,
                    "k": r.k,
                    "batch1": hist_json(&r.batch1),
                    "batch1_tokens_per_s": r.batch1_tokens_per_s(),
                    "batched": hist_json(&r.batched),
                    "batched_tokens_per_s": r.batched_tokens_per_s(b),
                    "encoder": hist_json(&r.encoder),
                    "encoder_gflops_p50": r.encoder_gflops(b),
                    "encoder_gflops_best": r.encoder_best_gflops(b),
                    "encoder_cpu_gflops": r.encoder_cpu_gflops(b),
                    "ndarray_gflops": r.ndarray_gflops(b),
                })
            })
            .collect();
        json!({
            "machine": self.machine,
            "sgemm_reference_gflops": self.matmul_gflops,
            "batch": b,
            "sae": self.own,
            "rows": rows,
        })
    }
}

impl fmt::Display for SaeBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.batch;
        writeln!(f, "{}", self.machine)?;
        match &self.own {
            Some(own) => writeln!(
                f,
                "SAE scoring on CPU (1 thread, kernel {}); sgemm reference {:.1} GFLOP/s\nSAE {own}",
                self.kernel, self.matmul_gflops
            )?,
            None => writeln!(
                f,
                "SAE scoring on CPU (1 thread, TopK, random weights, kernel {}); sgemm reference \
                 {:.1} GFLOP/s",
                self.kernel, self.matmul_gflops
            )?,
        }
        writeln!(
            f,
            "{:>5} {:>6} {:>3} | {:>9} {:>10} {:>6} {:>8} | {:>9} {:>10} {:>5} {:>8} | {:>7} {:>7} {:>7} {:>7} | {:>7}",
            "d_in",
            "d_sae",
            "k",
            "b1 p50µs",
            "b1 p99µs",
            "n",
            "b1 tok/s",
            format!("b{b} p50ms"),
            format!("b{b} p99ms"),
            "n",
            format!("b{b} tok/s"),
            "enc p50",
            "enc max",
            "enc cpu",
            "vs ref",
            "ndarray"
        )?;
        for r in &self.rows {
            let cpu = r.encoder_cpu_gflops(b);
            let best = r.encoder_best_gflops(b);
            writeln!(
                f,
                "{:>5} {:>6} {:>3} | {:>9.0} {:>9.0}{} {:>6} {:>8.0} | {:>9.1} {:>9.1}{} {:>5} {:>8.0} | \
                 {:>7.1} {:>7.1} {:>7} {:>6.0}% | {:>7}",
                r.d_in,
                r.d_sae,
                r.k.map_or_else(|| "-".into(), |k| k.to_string()),
                r.batch1.quantile_ns(0.5) / 1e3,
                r.batch1.quantile_ns(0.99) / 1e3,
                flag(&r.batch1),
                r.batch1.count(),
                r.batch1_tokens_per_s(),
                r.batched.quantile_ns(0.5) / 1e6,
                r.batched.quantile_ns(0.99) / 1e6,
                flag(&r.batched),
                r.batched.count(),
                r.batched_tokens_per_s(b),
                r.encoder_gflops(b),
                best,
                cpu.map_or_else(|| "-".into(), |g| format!("{g:.1}")),
                100.0 * best / self.matmul_gflops,
                r.ndarray_gflops(b)
                    .map_or_else(|| "-".into(), |g| format!("{g:.1}")),
            )?;
        }
        writeln!(
            f,
            "enc: encoder product GFLOP/s at batch {b} (p50 and fastest call, wall clock; cpu: \
             per on-CPU second, p50); vs ref: fastest call / the sgemm reference, a reference, \
             not a bound: it is matrixmultiply on a 256³ product (best of 20 short calls) while \
             the encoder is a larger product on its own packed kernel, so it can pass 100 %; \
             ndarray: general_mat_mul on the same product, p50."
        )?;
        writeln!(
            f,
            "n: calls timed (at least {} or --secs each, after one warm-up call); p50/p99: \
             midpoint of the histogram bucket (about 1.1 % wide) holding the quantile, clock \
             std::time::Instant; tok/s: tokens per call over the mean call time, the rate \
             the n calls sustained.",
            self.min_iters
        )?;
        if self
            .rows
            .iter()
            .any(|r| r.batch1.count() < FEW_SAMPLES || r.batched.count() < FEW_SAMPLES)
        {
            writeln!(
                f,
                "*: p99 from fewer than {FEW_SAMPLES} calls (its top 1 % is under 10 calls): \
                 give more --secs for a steady one."
            )?;
        }
        if let Some(r) = self.rows.iter().find(|r| r.encoder_cpu_unresolved()) {
            let step = r
                .encoder_cpu_step_ns
                .map_or("not seen to move".into(), |s| {
                    format!("advances in steps of {:.3} ms", s as f64 / 1e6)
                });
            writeln!(
                f,
                "enc cpu -: this thread's CPU clock (/proc/thread-self/schedstat) {step}, too \
                 coarse for calls of {:.3} ms (p50 wall time; a figure needs at least {} steps): \
                 use the wall-clock columns, or a larger --batch.",
                r.encoder.quantile_ns(0.5) / 1e6,
                CPU_STEPS_NEEDED
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(ns: &[u64]) -> LatencyHistogram {
        let mut h = LatencyHistogram::new();
        for &v in ns {
            h.record(v);
        }
        h
    }

    fn row(cpu_ns: &[u64], step: Option<u64>) -> SaeBenchRow {
        SaeBenchRow {
            d_in: 768,
            d_sae: 24576,
            k: Some(32),
            batch1: hist(&[100_000; 5]),
            batched: hist(&[5_000_000; 5]),
            encoder: hist(&[3_000_000; 5]),
            encoder_cpu: Some(hist(cpu_ns)),
            encoder_cpu_step_ns: step,
            ndarray_gemm: None,
        }
    }

    /// A trial on a loaded machine read 607 tok/s from the median call against the 409
    /// the calls sustained: tokens per second come from the mean call time.
    #[test]
    fn tokens_per_second_count_the_slow_calls() {
        let mut r = row(&[1_000; 5], None);
        // Nine calls of 100 µs and one of 1 ms: the median says 10,000 tok/s, the calls
        // sustained 1e9 / 190,000 ns.
        let mut calls = vec![100_000; 9];
        calls.push(1_000_000);
        r.batch1 = hist(&calls);
        let mut batches = vec![5_000_000; 9];
        batches.push(50_000_000);
        r.batched = hist(&batches);
        assert!((r.batch1_tokens_per_s() - 1e9 / 190_000.0).abs() < 1e-6);
        assert!((r.batched_tokens_per_s(64) - 64.0 * 1e9 / 9_500_000.0).abs() < 1e-6);
    }

    /// On a clock that moves in 4 ms ticks, calls of ~3 ms measure 0 ns (or a whole tick):
    /// the "enc cpu" column shows `-` with a footnote, not batch·flops / ~0 (it printed
    /// 150994944.0 GFLOP/s). On a fine clock the figure is shown.
    #[test]
    fn enc_cpu_is_suppressed_when_the_cpu_clock_is_too_coarse() {
        let coarse = row(&[0, 0, 0, 4_000_000, 0], Some(4_000_000));
        assert_eq!(coarse.encoder_cpu_gflops(64), None);
        assert!(coarse.encoder_cpu_unresolved());
        let fine = row(&[2_900_000; 5], Some(1_000));
        let g = fine.encoder_cpu_gflops(64).unwrap();
        let want = 64.0 * 2.0 * 768.0 * 24576.0 / 2_900_000.0;
        assert!((g / want - 1.0).abs() < 0.1, "{g} vs {want}");
        assert!(!fine.encoder_cpu_unresolved());
        // Three steps per call are too few either.
        assert_eq!(row(&[3_000; 5], Some(1_000)).encoder_cpu_gflops(64), None);
        let report = |r: SaeBenchRow| {
            SaeBenchReport {
                matmul_gflops: 50.0,
                kernel: "test",
                machine: MachineInfo::detect("test"),
                min_iters: 5,
                batch: 64,
                rows: vec![r],
                own: None,
            }
            .to_string()
        };
        let text = report(coarse);
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with("768"))
            .unwrap();
        let enc: Vec<&str> = line.split('|').nth(3).unwrap().split_whitespace().collect();
        assert_eq!(enc[2], "-", "{line}");
        assert!(
            text.contains("enc cpu -:")
                && text.contains("steps of 4.000 ms")
                // The calls' wall-clock p50 (3 ms, as its bucket's midpoint), not the CPU
                // clock's 0.
                && text.contains("calls of 2.998 ms"),
            "{text}"
        );
        let text = report(fine);
        assert!(!text.contains("enc cpu -:"), "{text}");
    }

    /// The "about …" that `sae-bench` prints follows `--secs` (it said "about a minute"
    /// whatever was asked), and the batch: five calls of a large batch outlast a short
    /// `--secs` (`--secs 0.1 --batch 2048` announced 14 s and took 1m48s).
    #[test]
    fn the_estimate_follows_the_seconds_and_the_batch() {
        let at = |secs: f64| {
            duration_text(
                SaeBenchOptions {
                    secs_per_measurement: secs,
                    ..Default::default()
                }
                .estimated_secs(100.0),
            )
        };
        assert_eq!(at(2.0), "44 s");
        assert_eq!(at(4.0), "a minute");
        assert_eq!(at(30.0), "8 minutes");
        // By hand, one shape 768 × 32768 at 100 GFLOP/s: the product of one token takes
        // 2·768·32768 / 1e11 = 0.503 ms, a batch of 2048 1.031 s; six calls each (warm-up and
        // five) of the batch (2 products), the encoder and ndarray (1 each): 24.74 s; batch 1
        // is 0.1 s (six calls of 4 products are 12 ms); setup 2.5 s and the reference 2 s.
        let big = SaeBenchOptions {
            shapes: vec![(768, 32_768)],
            secs_per_measurement: 0.1,
            batch: 2048,
            ..Default::default()
        };
        let product = 2.0 * 768.0 * 32_768.0 / 1e11;
        let want = 6.0 * 4.0 * 2048.0 * product + 0.1 + 2.5 + 2.0;
        let got = big.estimated_secs(100.0);
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        assert!(got > 29.0, "{got}");
    }

    /// A batch whose buffers would not fit in nine tenths of the memory available is refused before
    /// anything is allocated (`--batch 10000000` aborted allocating 61 GB).
    #[test]
    fn a_batch_too_big_for_memory_is_refused() {
        let opts = SaeBenchOptions {
            batch: 10_000_000,
            ..Default::default()
        };
        // 4 · (4·b·768 + b·(3·768 + 32768 + 64) + 4·768·32768 + b·32768 + 768·32768) bytes.
        let b = 10_000_000u128;
        let want = 4 * (4 * b * 768 + b * (3 * 768 + 32_768 + 64) + 5 * 768 * 32_768 + b * 32_768);
        assert_eq!(opts.bytes_needed(768, 32_768), want);
        let err = opts.check_memory(Some(16 << 30)).unwrap_err().to_string();
        assert!(err.contains("--batch 10000000 needs about"), "{err}");
        assert!(err.contains("give a smaller --batch"), "{err}");
        // Batch 1 of 768 × 32768 needs about 0.47 GiB, nearly all weights: it fits in 0.6 GiB
        // (nine tenths, 0.54 GiB, is the limit), and in 0.5 GiB nothing does.
        let one = SaeBenchOptions {
            batch: 1,
            ..Default::default()
        };
        let need = one.bytes_needed(768, 32_768);
        assert!(need > 480 << 20 && need < 500 << 20, "{need}");
        assert!(one.check_memory(Some(600 << 20)).is_ok());
        let err = one.check_memory(Some(500 << 20)).unwrap_err().to_string();
        assert!(err.contains("even --batch 1 needs about 0.5 GiB"), "{err}");
        assert!(err.contains("cannot be timed here"), "{err}");
        assert!(
            SaeBenchOptions::default()
                .check_memory(Some(16 << 30))
                .is_ok()
        );
        // Unknown memory: the --batch limit alone bounds it.
        assert!(opts.check_memory(None).is_ok());
        let over = SaeBenchOptions {
            batch: MAX_BATCH + 1,
            ..Default::default()
        };
        assert!(
            check_batch(&over)
                .unwrap_err()
                .to_string()
                .contains("limit of 65536")
        );
    }
}
