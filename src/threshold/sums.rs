//! The per-peak sums of the GPD fit, Σ ln(1 + x·Y) and Σ x·Y/(1 + x·Y), eight peaks at a
//! time where the CPU has AVX2 and FMA.
//!
//! Almost all of [`super::Gpd::fit`]'s time went to `f64::ln_1p`, a call into the C library
//! per peak and per evaluation. The logarithm here is fdlibm's `log1p` (the algorithm,
//! constants and evaluation order of glibc's `sysdeps/ieee754/dbl-64/s_log1p.c`), written
//! without branches so that the compiler vectorises it, with its multiply-adds fused where
//! GCC fuses them when glibc builds its FMA variant (`__log1p_fma`, which glibc picks on
//! such CPUs). So on x86-64 Linux with glibc it returns the same bits as `f64::ln_1p`
//! (checked over ten million arguments), and the sums are added up one peak after another in
//! the same order as before: the fit is bit for bit what it was, only faster. With another
//! C library the logarithm may differ from that library's in the last bit (fdlibm's error
//! is below one ulp). The few lanes the branch-free form does not cover (|f| < 2⁻²⁰ after
//! the reduction, arguments ≥ 2⁵³, infinities, NaN) take `f64::ln_1p`, and CPUs without
//! AVX2 and FMA keep the plain loop.

const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
const LP1: f64 = f64::from_bits(0x3fe5_5555_5555_5593);
const LP2: f64 = f64::from_bits(0x3fd9_9999_9997_fa04);
const LP3: f64 = f64::from_bits(0x3fd2_4924_9422_9359);
const LP4: f64 = f64::from_bits(0x3fcc_71c5_1d8e_78af);
const LP5: f64 = f64::from_bits(0x3fc7_4664_96cb_03de);
const LP6: f64 = f64::from_bits(0x3fc3_9a09_d078_c69f);
const LP7: f64 = f64::from_bits(0x3fc2_f112_df3e_5244);

/// Peaks per block: the logarithms of a block are computed side by side, then added in order.
const BLOCK: usize = 8;

/// The high 32 bits of `x`, as fdlibm reads them.
#[inline(always)]
fn high_word(x: f64) -> i32 {
    (x.to_bits() >> 32) as u32 as i32
}

/// `x` with its high 32 bits replaced by `hi`.
#[inline(always)]
fn with_high_word(x: f64, hi: i32) -> f64 {
    f64::from_bits((u64::from(hi as u32) << 32) | (x.to_bits() & 0xffff_ffff))
}

/// fdlibm's `log1p(x)` without branches, and whether this argument needs `f64::ln_1p`
/// instead (then the first value means nothing).
#[inline(always)]
fn ln_1p_lane(x: f64) -> (f64, bool) {
    let hx = high_word(x);
    let ax = hx & 0x7fff_ffff;
    // |x| < 2^-29: x − x²/2 (x itself below 2^-54).
    let tiny = ax < 0x3e20_0000;
    let tiny_value = if ax < 0x3c90_0000 {
        x
    } else {
        (-(x * x)).mul_add(0.5, x)
    };
    // −0.2929 < x < 0.41422: no reduction (k = 0, f = x).
    let direct = hx < 0x3fda_827a && (hx as u32).wrapping_add(0x402d_413c) > 0x402d_413c;
    // Otherwise u = 1 + x = 2^k·(1 + f) with 1 + f in [√2/2, √2), and c the rounding
    // error of 1 + x, relative to u.
    let u = 1.0 + x;
    let hu = high_word(u);
    let k_u = (hu >> 20) - 1023;
    let c_u = if k_u > 0 {
        1.0 - (u - x)
    } else {
        x - (u - 1.0)
    } / u;
    let mantissa = hu & 0x000f_ffff;
    let upper = mantissa >= 0x6a09e;
    let k_r = k_u + i32::from(upper);
    let u_r = with_high_word(u, mantissa | if upper { 0x3fe0_0000 } else { 0x3ff0_0000 });
    // fdlibm takes a shorter series when these bits are zero (|f| < 2^-20).
    let short = if upper {
        (0x0010_0000 - mantissa) >> 2
    } else {
        mantissa
    } == 0;
    let (f, k, c) = if direct {
        (x, 0, 0.0)
    } else {
        (u_r - 1.0, k_r, c_u)
    };
    let scalar = !tiny && (x <= -1.0 || x.is_nan() || hx >= 0x4340_0000 || (!direct && short));
    let hfsq = 0.5 * f * f;
    let s = f / (2.0 + f);
    let z = s * s;
    let z2 = z * z;
    let z4 = z2 * z2;
    let z6 = z4 * z2;
    let r2 = z.mul_add(LP3, LP2);
    let r3 = z.mul_add(LP5, LP4);
    let r4 = z.mul_add(LP7, LP6);
    let r = z6.mul_add(r4, z4.mul_add(r3, z.mul_add(LP1, z2 * r2)));
    let sr = s * (hfsq + r);
    let dk = f64::from(k);
    let value = if k == 0 {
        f - (hfsq - sr)
    } else {
        dk.mul_add(LN2_HI, -((hfsq - (sr + dk.mul_add(LN2_LO, c))) - f))
    };
    (if tiny { tiny_value } else { value }, scalar)
}

/// One block's values, aligned to a cache line: a vector store that straddles two lines
/// does not forward to the scalar loads that add the values up, which made the AVX-512
/// loop twice as slow in processes whose stack happened to lie that way.
#[derive(Clone, Copy)]
#[repr(align(64))]
struct Lanes([f64; BLOCK]);

/// Σ ln(1 + x·y) and Σ x·y/(1 + x·y) over one block of at most [`BLOCK`] peaks, added to
/// `a` and subtracted from `b` one peak after another. `false` if some 1 + x·y ≤ 0.
#[inline(always)]
fn block<const RATIO: bool>(peaks: &[f64], x: f64, a: &mut f64, b: &mut f64) -> bool {
    let mut s = Lanes([0.0; BLOCK]);
    for (s, &y) in s.0.iter_mut().zip(peaks) {
        *s = x * y;
    }
    let (mut ln, mut ratio) = (Lanes([0.0; BLOCK]), Lanes([0.0; BLOCK]));
    let (mut outside, mut scalar) = (false, false);
    for i in 0..BLOCK {
        outside |= s.0[i] <= -1.0;
        let (l, fallback) = ln_1p_lane(s.0[i]);
        ln.0[i] = l;
        scalar |= fallback;
        if RATIO {
            ratio.0[i] = s.0[i] / (1.0 + s.0[i]);
        }
    }
    if outside {
        return false;
    }
    if scalar {
        for (l, s) in ln.0.iter_mut().zip(&s.0) {
            *l = s.ln_1p();
        }
    }
    for i in 0..peaks.len() {
        *a += ln.0[i];
        if RATIO {
            *b -= ratio.0[i];
        }
    }
    true
}

#[inline(always)]
fn blocks<const RATIO: bool>(peaks: &[f64], x: f64) -> Option<(f64, f64)> {
    let (mut a, mut b) = (0.0, 0.0);
    for chunk in peaks.chunks(BLOCK) {
        if !block::<RATIO>(chunk, x, &mut a, &mut b) {
            return None;
        }
    }
    Some((a, b))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn blocks_avx2<const RATIO: bool>(peaks: &[f64], x: f64) -> Option<(f64, f64)> {
    blocks::<RATIO>(peaks, x)
}

/// The same with 512-bit vectors: one block is one vector, and the logarithms cost half as
/// much as with AVX2 (on Zen 4).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
fn blocks_avx512<const RATIO: bool>(peaks: &[f64], x: f64) -> Option<(f64, f64)> {
    blocks::<RATIO>(peaks, x)
}

/// The loop as it was: `f64::ln_1p` per peak.
fn plain<const RATIO: bool>(peaks: &[f64], x: f64) -> Option<(f64, f64)> {
    let (mut a, mut b) = (0.0, 0.0);
    for &y in peaks {
        let s = x * y;
        if s <= -1.0 {
            return None;
        }
        a += s.ln_1p();
        if RATIO {
            b -= s / (1.0 + s);
        }
    }
    Some((a, b))
}

#[cfg(test)]
thread_local! {
    /// Tests: the plain loop (the code before this module) on any CPU.
    pub(super) static PLAIN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[inline]
fn dispatch<const RATIO: bool>(peaks: &[f64], x: f64) -> Option<(f64, f64)> {
    #[cfg(test)]
    if PLAIN.with(std::cell::Cell::get) {
        return plain::<RATIO>(peaks, x);
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        if std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("avx512vl")
        {
            // SAFETY: the CPU has AVX-512 F, DQ and VL, AVX2 and FMA, checked just above.
            return unsafe { blocks_avx512::<RATIO>(peaks, x) };
        }
        // SAFETY: the CPU has AVX2 and FMA, checked just above.
        return unsafe { blocks_avx2::<RATIO>(peaks, x) };
    }
    plain::<RATIO>(peaks, x)
}

/// (Σ ln(1 + x·y), −Σ x·y/(1 + x·y)) over `peaks`, each sum taken in order; `None` if some
/// 1 + x·y ≤ 0.
pub(super) fn grimshaw_sums(peaks: &[f64], x: f64) -> Option<(f64, f64)> {
    dispatch::<true>(peaks, x)
}

/// Σ ln(1 + x·y) over `peaks`, in order; `None` if some 1 + x·y ≤ 0.
pub(super) fn ln_1p_sum(peaks: &[f64], x: f64) -> Option<f64> {
    dispatch::<false>(peaks, x).map(|(a, _)| a)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::rng::Rng;

    /// fdlibm's log1p as glibc writes it, branches and all, with glibc's FMA variant's
    /// fused multiply-adds.
    fn ln_1p_fdlibm(x: f64) -> f64 {
        let hx = high_word(x);
        let ax = hx & 0x7fff_ffff;
        let (mut k, mut f, mut c, mut hu) = (1i32, 0.0, 0.0, 0i32);
        if hx < 0x3fda_827a {
            if ax >= 0x3ff0_0000 {
                return x.ln_1p();
            }
            if ax < 0x3e20_0000 {
                return if ax < 0x3c90_0000 {
                    x
                } else {
                    (-(x * x)).mul_add(0.5, x)
                };
            }
            if (hx as u32).wrapping_add(0x402d_413c) > 0x402d_413c {
                (k, f, hu) = (0, x, 1);
            }
        } else if hx >= 0x7ff0_0000 {
            return x + x;
        }
        if k != 0 {
            let mut u;
            if hx < 0x4340_0000 {
                u = 1.0 + x;
                hu = high_word(u);
                k = (hu >> 20) - 1023;
                c = if k > 0 { 1.0 - (u - x) } else { x - (u - 1.0) } / u;
            } else {
                u = x;
                hu = hx;
                k = (hu >> 20) - 1023;
            }
            hu &= 0x000f_ffff;
            if hu < 0x6a09e {
                u = with_high_word(u, hu | 0x3ff0_0000);
            } else {
                k += 1;
                u = with_high_word(u, hu | 0x3fe0_0000);
                hu = (0x0010_0000 - hu) >> 2;
            }
            f = u - 1.0;
        }
        let hfsq = 0.5 * f * f;
        let dk = f64::from(k);
        if hu == 0 {
            if f == 0.0 {
                return if k == 0 {
                    0.0
                } else {
                    dk.mul_add(LN2_HI, dk.mul_add(LN2_LO, c))
                };
            }
            let r = hfsq * (-f).mul_add(f64::from_bits(0x3fe5_5555_5555_5555), 1.0);
            return if k == 0 {
                f - r
            } else {
                dk.mul_add(LN2_HI, -((r - dk.mul_add(LN2_LO, c)) - f))
            };
        }
        let s = f / (2.0 + f);
        let z = s * s;
        let (z2, r2) = (z * z, z.mul_add(LP3, LP2));
        let (z4, r3) = (z2 * z2, z.mul_add(LP5, LP4));
        let (z6, r4) = (z4 * z2, z.mul_add(LP7, LP6));
        let r = z6.mul_add(r4, z4.mul_add(r3, z.mul_add(LP1, z2 * r2)));
        let sr = s * (hfsq + r);
        if k == 0 {
            f - (hfsq - sr)
        } else {
            dk.mul_add(LN2_HI, -((hfsq - (sr + dk.mul_add(LN2_LO, c))) - f))
        }
    }

    /// Arguments over the whole domain: near 0, near −1, across the binade boundaries the
    /// reduction splits at, large ones, random bit patterns.
    fn arguments() -> Vec<f64> {
        let mut rng = Rng::new(21);
        let mut xs = vec![
            0.0,
            -0.0,
            1.0,
            -0.5,
            0.414_213_562_373_095,
            -0.292_893_218_813_452_4,
            1e-300,
            5e-324,
            -5e-324,
            f64::MIN_POSITIVE,
            2f64.powi(-29),
            2f64.powi(-54),
            2f64.powi(53),
            1e300,
            f64::MAX,
            f64::INFINITY,
            f64::NAN,
            -1.0,
            -2.0,
            3.0,
            7.0,
            -1.0 + f64::EPSILON / 2.0,
        ];
        for _ in 0..100_000 {
            let u = rng.next_f64();
            xs.push(10f64.powf(-30.0 + 40.0 * u)); // 1e-30 .. 1e10
            xs.push(-(10f64.powf(-30.0 * rng.next_f64()))); // −1 .. −1e-30
            xs.push(-1.0 + 10f64.powf(-16.0 * rng.next_f64())); // just above −1
            xs.push(3.0 * rng.next_f64() - 1.0);
            xs.push(f64::from_bits(rng.next_u64()));
            // Powers of two and their neighbours (the reduction's edge cases).
            let p = 2f64.powi((rng.next_f64() * 120.0) as i32 - 60);
            xs.extend([
                p,
                f64::from_bits(p.to_bits() + 1),
                f64::from_bits(p.to_bits() - 1),
            ]);
            xs.push(p - 1.0);
        }
        xs
    }

    #[test]
    fn ln_1p_lane_is_fdlibm_and_within_an_ulp_of_std() {
        let (mut checked, mut same_as_std) = (0usize, 0usize);
        for x in arguments() {
            let (lane, scalar) = ln_1p_lane(x);
            let reference = ln_1p_fdlibm(x);
            let std = x.ln_1p();
            if !scalar {
                assert_eq!(lane.to_bits(), reference.to_bits(), "log1p({x:e})");
            }
            if reference.is_nan() || std.is_nan() {
                assert!(reference.is_nan() && std.is_nan(), "log1p({x:e})");
                continue;
            }
            checked += 1;
            same_as_std += usize::from(reference.to_bits() == std.to_bits());
            if reference != std {
                let ulp = (reference.to_bits() as i64 - std.to_bits() as i64).unsigned_abs();
                assert!(ulp <= 1, "log1p({x:e}): {reference:e} vs std {std:e}");
            }
        }
        eprintln!("{same_as_std} of {checked} logarithms equal to f64::ln_1p's bits");
    }

    /// Whether the sums must match the plain loop bit for bit: the plain loop runs anyway
    /// (no AVX2 and FMA), or `f64::ln_1p` is fdlibm's with glibc's fused multiply-adds
    /// (glibc 2.35 and later on a CPU with FMA).
    pub(in crate::threshold) fn sums_are_exact() -> bool {
        !is_x86_fma() || std_is_fdlibm_fma()
    }

    fn std_is_fdlibm_fma() -> bool {
        is_x86_fma()
            && arguments()
                .into_iter()
                .all(|x| x.ln_1p().to_bits() == ln_1p_fdlibm(x).to_bits() || x.is_nan())
    }

    fn is_x86_fma() -> bool {
        #[cfg(target_arch = "x86_64")]
        return std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    #[test]
    fn sums_match_the_plain_loop() {
        let exact = sums_are_exact();
        eprintln!("sums bit for bit like the plain loop: {exact}");
        let mut rng = Rng::new(22);
        for n in [1usize, 7, 8, 9, 50, 101, 500] {
            let peaks: Vec<f64> = (0..n).map(|_| -(1.0 - rng.next_f64()).ln()).collect();
            let hi = peaks.iter().copied().fold(0.0, f64::max);
            let mut xs: Vec<f64> = (0..60)
                .map(|k| -(1.0 - 1e-9f64.powf(k as f64 / 60.0)) / hi)
                .collect();
            xs.extend((0..60).map(|k| 1e-10 * 3f64.powi(k)));
            xs.extend([0.0, -1.0 / hi, -2.0 / hi, 1e300, f64::NAN]);
            for x in xs {
                let bits = |v: Option<(f64, f64)>| v.map(|(a, b)| (a.to_bits(), b.to_bits()));
                let plain = plain::<true>(&peaks, x);
                let (sums, sum) = (grimshaw_sums(&peaks, x), ln_1p_sum(&peaks, x));
                let close = |a: f64, b: f64| {
                    a == b || (a - b).abs() <= 1e-14 * a.abs() || (a.is_nan() && b.is_nan())
                };
                match (plain, sums) {
                    (None, None) => assert!(sum.is_none()),
                    (Some(p), Some(s)) => {
                        assert!(close(p.0, s.0) && close(p.1, s.1), "n {n} x {x:e}");
                        assert_eq!(sum.map(f64::to_bits), Some(s.0.to_bits()));
                        if exact && !x.is_nan() {
                            assert_eq!(bits(plain), bits(sums), "n {n} x {x:e}");
                        }
                    }
                    _ => panic!("n {n} x {x:e}: {plain:?} vs {sums:?}"),
                }
            }
        }
    }
}
