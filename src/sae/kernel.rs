//! The SAE encoder product and the TopK selection.
//!
//! The encoder is `pre = x_in · W_enc + b_enc`, a `[n, d_in] × [d_in, d_sae]` product. `W_enc`
//! is kept packed in column panels of [`NR`] = 16 latents: panel `p` holds
//! `W_enc[i, 16p + l]` at `(p·d_in + i)·16 + l`, so one panel is a contiguous `d_in × 16`
//! block. The same layout serves both paths:
//!
//! - batch 1 (matrix–vector): the panels are streamed front to back exactly once, four at a
//!   time so that eight independent FMA chains hide the FMA latency; the input row stays in L1;
//! - batch ≥ 2 (matrix–matrix): a register-blocked 6 × 16 micro-kernel (12 accumulators) runs
//!   over every group of six rows for one panel before moving to the next, so each panel is
//!   read from memory once per block of rows and then from L1/L2. Rows are blocked so that the
//!   block of inputs stays in L2 (≈ 512 KiB).
//!
//! On x86-64 with AVX2 and FMA (detected at run time) the kernels use 256-bit FMAs; elsewhere a
//! portable loop computes the same sums in the same order per lane (rounding may differ in the
//! last bit because of fused multiply–adds).

use ndarray::ArrayView2;

/// Latents per packed panel.
pub(super) const NR: usize = 16;
/// Rows per micro-kernel tile.
const MR: usize = 6;
/// Bytes of input rows kept hot in L2 per row block.
const ROW_BLOCK_BYTES: usize = 512 * 1024;
/// Bytes of packed weights kept hot in L2 per block of panels.
const PANEL_BLOCK_BYTES: usize = 256 * 1024;

/// `d_sae` rounded up to whole panels.
pub(super) fn padded(d_sae: usize) -> usize {
    d_sae.div_ceil(NR) * NR
}

/// Packs `w_enc` (`[d_in, d_sae]`, any strides) into panels; the lanes past `d_sae` are 0.
pub(super) fn pack(w_enc: ArrayView2<f32>) -> Vec<f32> {
    let (d_in, d_sae) = w_enc.dim();
    let panels = d_sae.div_ceil(NR);
    let mut out = vec![0.0f32; panels * d_in * NR];
    for (i, row) in w_enc.rows().into_iter().enumerate() {
        for (j, &w) in row.iter().enumerate() {
            out[((j / NR) * d_in + i) * NR + j % NR] = w;
        }
    }
    out
}

/// `W_enc[i, j]` read back from the packed panels.
pub(super) fn packed_at(packed: &[f32], d_in: usize, i: usize, j: usize) -> f32 {
    packed[((j / NR) * d_in + i) * NR + j % NR]
}

/// Which encoder kernel runs, chosen once per workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
}

impl Kernel {
    pub(super) fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return Kernel::Avx2Fma;
        }
        Kernel::Portable
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2Fma => "avx2+fma",
        }
    }
}

/// `pre[r·ld + j] = Σᵢ x[r·d_in + i]·W_enc[i, j] + bias[j]` for `r < n`, `j < ld`, where
/// `ld = padded(d_sae)` and `packed`, `bias` hold `ld` latents.
///
/// # Panics
/// If a slice is shorter than the shapes say (a bug in the caller, never user input).
pub(super) fn encode(
    kernel: Kernel,
    x: &[f32],
    n: usize,
    d_in: usize,
    packed: &[f32],
    bias: &[f32],
    pre: &mut [f32],
) {
    let ld = bias.len();
    assert!(ld.is_multiple_of(NR) && packed.len() == ld * d_in);
    assert!(x.len() >= n * d_in && pre.len() >= n * ld);
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the kernel is only chosen after detecting AVX2 and FMA; the lengths were
        // checked just above.
        Kernel::Avx2Fma => unsafe { avx::encode(x, n, d_in, packed, bias, pre) },
        Kernel::Portable => portable::encode(x, n, d_in, packed, bias, pre),
    }
}

/// Rows per L2 block (a multiple of the tile height).
fn row_block(d_in: usize) -> usize {
    ((ROW_BLOCK_BYTES / 4 / d_in.max(1)) / MR * MR).max(MR)
}

/// Panels per L2 block.
fn panel_block(d_in: usize) -> usize {
    (PANEL_BLOCK_BYTES / (4 * NR * d_in.max(1))).max(1)
}

mod portable {
    use super::{MR, NR, row_block};

    pub(super) fn encode(
        x: &[f32],
        n: usize,
        d_in: usize,
        packed: &[f32],
        bias: &[f32],
        pre: &mut [f32],
    ) {
        let ld = bias.len();
        let panel_len = d_in * NR;
        let block = row_block(d_in);
        for r0 in (0..n).step_by(block) {
            let r1 = (r0 + block).min(n);
            for (p, panel) in packed.chunks_exact(panel_len).enumerate() {
                let b = &bias[p * NR..(p + 1) * NR];
                let mut r = r0;
                while r < r1 {
                    let m = (r1 - r).min(MR);
                    let mut acc = [[0.0f32; NR]; MR];
                    for (i, w) in panel.chunks_exact(NR).enumerate() {
                        for (row, acc) in acc.iter_mut().enumerate().take(m) {
                            let a = x[(r + row) * d_in + i];
                            for l in 0..NR {
                                acc[l] += a * w[l];
                            }
                        }
                    }
                    for (row, acc) in acc.iter().enumerate().take(m) {
                        let out = &mut pre[(r + row) * ld + p * NR..][..NR];
                        for l in 0..NR {
                            out[l] = acc[l] + b[l];
                        }
                    }
                    r += m;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    use super::{MR, NR, panel_block};

    /// # Safety
    /// AVX2 and FMA are available; the slices hold the shapes (checked by the caller).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn encode(
        x: &[f32],
        n: usize,
        d_in: usize,
        packed: &[f32],
        bias: &[f32],
        pre: &mut [f32],
    ) {
        let ld = bias.len();
        let panels = ld / NR;
        let (x, w, b, out) = (x.as_ptr(), packed.as_ptr(), bias.as_ptr(), pre.as_mut_ptr());
        // SAFETY (all calls below): every panel index is < panels, every row < n, so every
        // pointer offset stays inside the slices whose lengths `super::encode` checked.
        unsafe {
            if n == 1 {
                gemv(x, d_in, w, b, out, panels);
                return;
            }
            let nb = panel_block(d_in);
            for p0 in (0..panels).step_by(nb) {
                let p1 = (p0 + nb).min(panels);
                let mut r = 0;
                while r + MR <= n {
                    for p in p0..p1 {
                        let (panel, bp) = (w.add(p * d_in * NR), b.add(p * NR));
                        tile::<MR>(
                            x.add(r * d_in),
                            d_in,
                            panel,
                            bp,
                            out.add(r * ld + p * NR),
                            ld,
                        );
                    }
                    r += MR;
                }
                for p in p0..p1 {
                    let (panel, bp) = (w.add(p * d_in * NR), b.add(p * NR));
                    let (xr, o) = (x.add(r * d_in), out.add(r * ld + p * NR));
                    match n - r {
                        0 => {}
                        1 => tile::<1>(xr, d_in, panel, bp, o, ld),
                        2 => tile::<2>(xr, d_in, panel, bp, o, ld),
                        3 => tile::<3>(xr, d_in, panel, bp, o, ld),
                        4 => tile::<4>(xr, d_in, panel, bp, o, ld),
                        _ => tile::<5>(xr, d_in, panel, bp, o, ld),
                    }
                }
            }
        }
    }

    /// `M` rows × one panel: `out[r·ld + l] = Σᵢ x[r·d_in + i]·panel[16i + l] + b[l]`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const M: usize>(
        x: *const f32,
        d_in: usize,
        panel: *const f32,
        b: *const f32,
        out: *mut f32,
        ld: usize,
    ) {
        // SAFETY: the caller guarantees M rows of d_in inputs, a d_in × 16 panel, 16 biases
        // and M output rows of at least 16 floats `ld` apart.
        unsafe {
            let mut lo = [_mm256_setzero_ps(); M];
            let mut hi = [_mm256_setzero_ps(); M];
            for i in 0..d_in {
                let w0 = _mm256_loadu_ps(panel.add(i * NR));
                let w1 = _mm256_loadu_ps(panel.add(i * NR + 8));
                for r in 0..M {
                    let a = _mm256_broadcast_ss(&*x.add(r * d_in + i));
                    lo[r] = _mm256_fmadd_ps(a, w0, lo[r]);
                    hi[r] = _mm256_fmadd_ps(a, w1, hi[r]);
                }
            }
            let (b0, b1) = (_mm256_loadu_ps(b), _mm256_loadu_ps(b.add(8)));
            for r in 0..M {
                _mm256_storeu_ps(out.add(r * ld), _mm256_add_ps(lo[r], b0));
                _mm256_storeu_ps(out.add(r * ld + 8), _mm256_add_ps(hi[r], b1));
            }
        }
    }

    /// One row against every panel, four panels at a time (eight FMA chains).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn gemv(
        x: *const f32,
        d_in: usize,
        w: *const f32,
        b: *const f32,
        out: *mut f32,
        panels: usize,
    ) {
        const P: usize = 4;
        let mut p = 0;
        // SAFETY: panels p..p + P exist; x has d_in floats; out and b have 16·panels floats.
        unsafe {
            while p + P <= panels {
                let mut lo = [_mm256_setzero_ps(); P];
                let mut hi = [_mm256_setzero_ps(); P];
                let base = w.add(p * d_in * NR);
                for i in 0..d_in {
                    let a = _mm256_broadcast_ss(&*x.add(i));
                    for q in 0..P {
                        let wq = base.add(q * d_in * NR + i * NR);
                        lo[q] = _mm256_fmadd_ps(a, _mm256_loadu_ps(wq), lo[q]);
                        hi[q] = _mm256_fmadd_ps(a, _mm256_loadu_ps(wq.add(8)), hi[q]);
                    }
                }
                for q in 0..P {
                    let o = (p + q) * NR;
                    _mm256_storeu_ps(out.add(o), _mm256_add_ps(lo[q], _mm256_loadu_ps(b.add(o))));
                    _mm256_storeu_ps(
                        out.add(o + 8),
                        _mm256_add_ps(hi[q], _mm256_loadu_ps(b.add(o + 8))),
                    );
                }
                p += P;
            }
            while p < panels {
                tile::<1>(
                    x,
                    d_in,
                    w.add(p * d_in * NR),
                    b.add(p * NR),
                    out.add(p * NR),
                    0,
                );
                p += 1;
            }
        }
    }
}

/// Selects the `k` largest of `values` (O(len) with a size-`k` min-heap: after the first `k`,
/// each value costs one comparison against the heap's minimum, and only the rare value that
/// beats it is sifted in). Writes the winners' indices and values into `idx`/`val` (in heap
/// order, not sorted) and returns how many were written, `min(k, len)`. NaN never wins a slot
/// over a number: it enters the heap as −∞.
pub(super) fn top_k(values: &[f32], k: usize, idx: &mut [u32], val: &mut [f32]) -> usize {
    let k = k.min(values.len()).min(idx.len()).min(val.len());
    if k == 0 {
        return 0;
    }
    let (idx, val) = (&mut idx[..k], &mut val[..k]);
    for (j, &v) in values[..k].iter().enumerate() {
        idx[j] = j as u32;
        val[j] = if v.is_nan() { f32::NEG_INFINITY } else { v };
    }
    for root in (0..k / 2).rev() {
        sift_down(idx, val, root);
    }
    let mut min = val[0];
    let mut offer = |j: usize, v: f32, min: &mut f32| {
        if v > *min {
            val[0] = v;
            idx[0] = j as u32;
            sift_down(idx, val, 0);
            *min = val[0];
        }
    };
    // Blocks of 16: a branch-free (vectorisable) block maximum first, so that the common
    // block with nothing above the heap's minimum costs a few vector instructions.
    let rest = &values[k..];
    let mut blocks = rest.chunks_exact(16);
    for (b, block) in blocks.by_ref().enumerate() {
        let mut m = [f32::NEG_INFINITY; 8];
        for l in 0..8 {
            let (a, c) = (block[l], block[l + 8]);
            m[l] = if a > c { a } else { c };
        }
        let top = m
            .iter()
            .fold(f32::NEG_INFINITY, |t, &v| if v > t { v } else { t });
        if top > min {
            for (o, &v) in block.iter().enumerate() {
                offer(k + 16 * b + o, v, &mut min);
            }
        }
    }
    let tail = k + rest.len() - blocks.remainder().len();
    for (o, &v) in blocks.remainder().iter().enumerate() {
        offer(tail + o, v, &mut min);
    }
    k
}

/// Restores the min-heap property below `i`.
fn sift_down(idx: &mut [u32], val: &mut [f32], mut i: usize) {
    let n = val.len();
    loop {
        let (l, r) = (2 * i + 1, 2 * i + 2);
        let mut smallest = i;
        if l < n && val[l] < val[smallest] {
            smallest = l;
        }
        if r < n && val[r] < val[smallest] {
            smallest = r;
        }
        if smallest == i {
            return;
        }
        val.swap(i, smallest);
        idx.swap(i, smallest);
        i = smallest;
    }
}

#[cfg(test)]
mod tests {
    use ndarray::Array2;

    use super::*;
    use crate::rng::Rng;

    /// The plain triple loop, in f64.
    fn reference(x: &Array2<f32>, w: &Array2<f32>, b: &[f32]) -> Array2<f64> {
        let (n, d_in) = x.dim();
        let d_sae = w.ncols();
        Array2::from_shape_fn((n, d_sae), |(r, j)| {
            (0..d_in)
                .map(|i| f64::from(x[[r, i]]) * f64::from(w[[i, j]]))
                .sum::<f64>()
                + f64::from(b[j])
        })
    }

    #[test]
    fn every_kernel_and_batch_matches_the_triple_loop() {
        let mut rng = Rng::new(3);
        // Odd sizes: d_sae not a multiple of 16 or of 4 panels, d_in not a multiple of 8.
        let (d_in, d_sae) = (37, 16 * 5 + 3);
        let w = Array2::from_shape_fn((d_in, d_sae), |_| rng.uniform(-1.0, 1.0));
        let ld = padded(d_sae);
        let mut bias = vec![0.0; ld];
        for b in &mut bias[..d_sae] {
            *b = rng.uniform(-1.0, 1.0);
        }
        let packed = pack(w.view());
        assert_eq!(packed_at(&packed, d_in, 5, 70), w[[5, 70]]);
        let mut kernels = vec![Kernel::Portable];
        if Kernel::detect() != Kernel::Portable {
            kernels.push(Kernel::detect());
        }
        for n in [1usize, 2, 5, 6, 7, 13] {
            let x = Array2::from_shape_fn((n, d_in), |_| rng.uniform(-1.0, 1.0));
            let want = reference(&x, &w, &bias);
            for &k in &kernels {
                let mut pre = vec![f32::NAN; n * ld];
                encode(k, x.as_slice().unwrap(), n, d_in, &packed, &bias, &mut pre);
                for r in 0..n {
                    for j in 0..d_sae {
                        let got = f64::from(pre[r * ld + j]);
                        assert!(
                            (got - want[[r, j]]).abs() < 1e-4,
                            "{} n={n} row {r} latent {j}: {got} vs {}",
                            k.name(),
                            want[[r, j]]
                        );
                    }
                    // Padding lanes: zero weights, zero bias.
                    assert!(pre[r * ld + d_sae..(r + 1) * ld].iter().all(|&v| v == 0.0));
                }
            }
        }
    }

    #[test]
    fn top_k_finds_the_largest_values() {
        let mut rng = Rng::new(11);
        for len in [32, 33, 47, 48, 49, 1000, 1007] {
            // Increasing values make every element a heap insertion; random ones few.
            let random: Vec<f32> = (0..len).map(|_| rng.uniform(-5.0, 5.0)).collect();
            let rising: Vec<f32> = (0..len).map(|i| i as f32).collect();
            for values in [random, rising] {
                let (mut idx, mut val) = ([0u32; 32], [0.0f32; 32]);
                assert_eq!(top_k(&values, 32, &mut idx, &mut val), 32);
                let mut sorted = values.clone();
                sorted.sort_by(|a, b| b.total_cmp(a));
                let mut got: Vec<f32> = val.to_vec();
                got.sort_by(|a, b| b.total_cmp(a));
                assert_eq!(got, sorted[..32].to_vec(), "len {len}");
                for (&i, &v) in idx.iter().zip(&val) {
                    assert_eq!(values[i as usize], v);
                }
            }
        }
    }

    #[test]
    fn top_k_handles_short_rows_and_nan() {
        let (mut idx, mut val) = ([0u32; 4], [0.0f32; 4]);
        assert_eq!(top_k(&[1.0, f32::NAN, 3.0], 4, &mut idx, &mut val), 3);
        let mut got: Vec<f32> = val[..3].to_vec();
        got.sort_by(|a, b| b.total_cmp(a));
        assert_eq!(got, vec![3.0, 1.0, f32::NEG_INFINITY]);
        assert_eq!(top_k(&[], 4, &mut idx, &mut val), 0);
        // NaN after the first k never displaces a number.
        assert_eq!(top_k(&[1.0, 2.0, f32::NAN], 2, &mut idx, &mut val), 2);
        let mut got: Vec<u32> = idx[..2].to_vec();
        got.sort();
        assert_eq!(got, vec![0, 1]);
    }
}
