//! `darkwatch sae-bench`: what SAE scoring costs on this machine's CPU.
//!
//! For each shape (d_in, d_sae) a TopK SAE with random weights runs the full forward pass
//! (normalise, encode, TopK, sparse decode, error, ‖e‖²) at batch 1 (per-token latency) and at
//! a larger batch (per-batch latency, tokens/s). The encoder product alone is timed at the
//! large batch and compared with the machine's single-thread sgemm throughput
//! ([`crate::bench::matmul_gflops`]); ndarray's `general_mat_mul` (matrixmultiply) on the same
//! product is timed next to it, so the choice of kernel stays checked.
//!
//! With `sae-bench --sae` ([`run_own`]) the user's own SAE takes the place of the random
//! shapes: the same columns for its shape, each frame scored through the SAE and, when it
//! has one, its dark-matter head, as the agent scores a frame.

use std::fmt;
use std::time::Instant;

use ndarray::{Array2, ArrayView2};

use super::dark::DarkHead;
use super::{Sae, SaeActivation, SaeError};
use crate::rng::Rng;
use crate::stats::LatencyHistogram;

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
    /// About how long [`run`] takes: each shape's measurements (batch 1, the batch, the
    /// encoder, and ndarray's product when compared) at `secs_per_measurement` each, plus
    /// the sgemm reference twice, and setting up each shape (random weights, packing, the
    /// warm-up calls: about 2.5 s for the default shapes on a 2-vCPU machine).
    pub fn estimated_secs(&self) -> f64 {
        let per_shape = 3.0 + f64::from(u8::from(self.compare_ndarray));
        let shapes = self.shapes.len() as f64;
        shapes * (per_shape * self.secs_per_measurement + 2.5) + 2.0
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

    /// Tokens per second at batch 1, from the median latency.
    pub fn batch1_tokens_per_s(&self) -> f64 {
        1e9 / self.batch1.quantile_ns(0.5)
    }

    /// Tokens per second at the large batch, from the median batch latency.
    pub fn batched_tokens_per_s(&self, batch: usize) -> f64 {
        batch as f64 * 1e9 / self.batched.quantile_ns(0.5)
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
    /// Single-thread sgemm GFLOP/s of this machine (the roofline).
    pub matmul_gflops: f64,
    pub kernel: &'static str,
    pub batch: usize,
    pub rows: Vec<SaeBenchRow>,
    /// With `sae-bench --sae`: which SAE, and what was timed.
    pub own: Option<String>,
}

/// Runs the benchmark (single thread; takes about [`SaeBenchOptions::estimated_secs`]).
///
/// # Errors
/// [`SaeError::Invalid`] for a shape of 0 or `k` outside `1..=d_sae`.
pub fn run(opts: &SaeBenchOptions) -> Result<SaeBenchReport, SaeError> {
    let matmul_gflops = crate::bench::matmul_gflops();
    let batch = opts.batch.max(1);
    let mut rows = Vec::new();
    let mut kernel = "portable";
    for (i, &(d_in, d_sae)) in opts.shapes.iter().enumerate() {
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
        batch,
        rows,
        own: None,
    })
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
pub fn run_own(own: &OwnSae, opts: &SaeBenchOptions) -> Result<SaeBenchReport, SaeError> {
    let (sae, batch) = (own.sae, opts.batch.max(1));
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

impl fmt::Display for SaeBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.batch;
        match &self.own {
            Some(own) => writeln!(
                f,
                "SAE scoring on CPU (1 thread, kernel {}); sgemm roofline {:.1} GFLOP/s\nSAE {own}",
                self.kernel, self.matmul_gflops
            )?,
            None => writeln!(
                f,
                "SAE scoring on CPU (1 thread, TopK, random weights, kernel {}); sgemm roofline \
                 {:.1} GFLOP/s",
                self.kernel, self.matmul_gflops
            )?,
        }
        writeln!(
            f,
            "{:>5} {:>6} {:>3} | {:>9} {:>9} {:>8} | {:>9} {:>9} {:>8} | {:>7} {:>7} {:>7} {:>6} | {:>7}",
            "d_in",
            "d_sae",
            "k",
            "b1 p50µs",
            "b1 p99µs",
            "b1 tok/s",
            format!("b{b} p50ms"),
            format!("b{b} p99ms"),
            format!("b{b} tok/s"),
            "enc p50",
            "enc max",
            "enc cpu",
            "share",
            "ndarray"
        )?;
        for r in &self.rows {
            let cpu = r.encoder_cpu_gflops(b);
            let best = r.encoder_best_gflops(b);
            writeln!(
                f,
                "{:>5} {:>6} {:>3} | {:>9.0} {:>9.0} {:>8.0} | {:>9.1} {:>9.1} {:>8.0} | \
                 {:>7.1} {:>7.1} {:>7} {:>5.0}% | {:>7}",
                r.d_in,
                r.d_sae,
                r.k.map_or_else(|| "-".into(), |k| k.to_string()),
                r.batch1.quantile_ns(0.5) / 1e3,
                r.batch1.quantile_ns(0.99) / 1e3,
                r.batch1_tokens_per_s(),
                r.batched.quantile_ns(0.5) / 1e6,
                r.batched.quantile_ns(0.99) / 1e6,
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
             per on-CPU second, p50); share: fastest call / sgemm roofline (both best-of, so a \
             shared machine affects them alike); ndarray: general_mat_mul on the same product, p50."
        )?;
        if let Some(r) = self.rows.iter().find(|r| r.encoder_cpu_unresolved()) {
            let step = r
                .encoder_cpu_step_ns
                .map_or("not seen to move".into(), |s| {
                    format!("advances in steps of {:.3} ms", s as f64 / 1e6)
                });
            writeln!(
                f,
                "enc cpu -: this thread's CPU clock (/proc/thread-self/schedstat) {step}, too \
                 coarse for calls of {:.3} ms (p50 CPU time; a figure needs at least {} steps): \
                 use the wall-clock columns, or a larger --batch.",
                r.encoder_cpu
                    .as_ref()
                    .map_or(0.0, |h| h.quantile_ns(0.5) / 1e6),
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
                batch: 64,
                rows: vec![r],
                own: None,
            }
            .to_string()
        };
        let text = report(coarse);
        let line = text.lines().nth(2).unwrap();
        let enc: Vec<&str> = line.split('|').nth(3).unwrap().split_whitespace().collect();
        assert_eq!(enc[2], "-", "{line}");
        assert!(
            text.contains("enc cpu -:") && text.contains("steps of 4.000 ms"),
            "{text}"
        );
        let text = report(fine);
        assert!(!text.contains("enc cpu -:"), "{text}");
    }

    /// The "about …" that `sae-bench` prints follows `--secs` (it said "about a minute"
    /// whatever was asked).
    #[test]
    fn the_estimate_follows_the_seconds_per_measurement() {
        let at = |secs: f64| {
            duration_text(
                SaeBenchOptions {
                    secs_per_measurement: secs,
                    ..Default::default()
                }
                .estimated_secs(),
            )
        };
        assert_eq!(at(0.1), "14 s");
        assert_eq!(at(2.0), "44 s");
        assert_eq!(at(4.0), "a minute");
        assert_eq!(at(30.0), "8 minutes");
    }
}
