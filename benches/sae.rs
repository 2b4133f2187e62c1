//! Criterion benches for SAE scoring: the full forward pass (encode, TopK, sparse decode,
//! error) at batch 1 and 256, the encoder product alone, and the dark-matter head, for a
//! d_in = 384, 16384-latent, k = 32 TopK SAE with random weights. `darkwatch sae-bench`
//! prints the full table (both widths, 16k and 32k latents, sgemm share).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use darkwatch::rng::Rng;
use darkwatch::sae::Sae;
use darkwatch::sae::dark::{DarkConfig, DarkHead, DarkStats};
use ndarray::{Array2, s};
use std::time::Duration;

fn sae(c: &mut Criterion) {
    let (d, d_sae, k) = (384, 16_384, 32);
    let sae = Sae::random(d, d_sae, k, 42).expect("valid shape");
    let mut rng = Rng::new(7);
    let pool = Array2::from_shape_fn((1024, d), |_| rng.uniform(-1.7, 1.7));
    let mut ws = sae.workspace(256);

    let mut group = c.benchmark_group(format!("sae/{d}x{d_sae}/k{k}"));
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for batch in [1usize, 256] {
        group.throughput(Throughput::Elements(batch as u64));
        let mut offset = 0;
        group.bench_function(BenchmarkId::new("forward", batch), |b| {
            b.iter(|| {
                offset = (offset + batch) % (pool.nrows() - batch + 1);
                let x = pool.slice(s![offset..offset + batch, ..]);
                let out = sae.forward(x, &mut ws).expect("width matches");
                std::hint::black_box(out.error_sq_norm()[0])
            })
        });
    }
    group.throughput(Throughput::Elements(256));
    group.bench_function(BenchmarkId::new("encoder", 256), |b| {
        b.iter(|| {
            let pre = sae
                .pre_acts(pool.slice(s![..256, ..]), &mut ws)
                .expect("width matches");
            std::hint::black_box(pre[[0, 0]])
        })
    });

    // The dark-matter head on this SAE's errors.
    let mut stats = DarkStats::new(d);
    let mut errors = Array2::zeros((pool.nrows(), d));
    for start in (0..pool.nrows()).step_by(256) {
        let x = pool.slice(s![start..start + 256, ..]);
        let out = sae.forward(x, &mut ws).expect("width matches");
        stats.accumulate(x, out.error()).expect("finite rows");
        errors
            .slice_mut(s![start..start + 256, ..])
            .assign(&out.error());
    }
    let head = DarkHead::fit(&stats, &DarkConfig::default(), None)
        .expect("ridge makes the fit well posed")
        .head;
    let mut dws = head.workspace(256);
    group.bench_function(BenchmarkId::new("dark_head", 256), |b| {
        b.iter(|| {
            let scores = head
                .score(
                    pool.slice(s![..256, ..]),
                    errors.slice(s![..256, ..]),
                    &mut dws,
                )
                .expect("shapes match");
            std::hint::black_box(scores[0].deviation)
        })
    });
    group.finish();
}

criterion_group!(benches, sae);
criterion_main!(benches);
