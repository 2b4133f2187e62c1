//! Criterion benches for the scoring hot path: batch-1 latency and batch throughput of
//! each head, through the pipeline's `Scorer` (scale, forward, head, contributions).

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use darkwatch::model::fit::synthetic;
use darkwatch::pipeline::Scorer;
use darkwatch::score::{Head, HeadKind};

fn heads(c: &mut Criterion) {
    let model = Arc::new(synthetic(38, 0));
    let d = model.n_features();
    let frames: Vec<f32> = (0..4096 * d)
        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
        .collect();
    for kind in [HeadKind::Mse, HeadKind::MaxAbs, HeadKind::Wnll] {
        let head = Head {
            kind,
            ..model.meta.head
        };
        let mut group = c.benchmark_group(format!("score/{}", kind.name()));
        for batch in [1usize, 256] {
            let mut scorer = Scorer::new(model.clone(), head, batch, 3).unwrap();
            let mut offset = 0;
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_function(BenchmarkId::new("batch", batch), |b| {
                b.iter(|| {
                    let n = batch * d;
                    if offset + n > frames.len() {
                        offset = 0;
                    }
                    scorer.input_mut()[..n].copy_from_slice(&frames[offset..offset + n]);
                    offset += n;
                    std::hint::black_box(scorer.score(batch)[0])
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, heads);
criterion_main!(benches);
