//! Model room benches: GGML dequantization throughput and the reference forward pass on the
//! default model (prefill of a 128-token window, one decode step after 128 tokens).
//!
//! `cargo bench --bench model`; the model comes from `make setup`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kiln::model::ggml::{dequantize, GgmlType};
use kiln::model::reference::{Logits, Reference};
use kiln::model::{default_model_path, Model};

fn dequantization(c: &mut Criterion) {
    let mut group = c.benchmark_group("dequantize");
    let values = 576 * 1536;
    for ty in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K] {
        let bytes = ty.bytes_for(values as u64).expect("whole blocks") as usize;
        // Arbitrary but fixed content; the f16 scales decode to finite numbers.
        let data: Vec<u8> = (0..bytes).map(|i| (i * 37 % 61) as u8).collect();
        let mut out = vec![0f32; values];
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(ty.name(), |b| b.iter(|| dequantize(ty, black_box(&data), &mut out)));
    }
    group.finish();
}

fn reference_forward(c: &mut Criterion) {
    let path = default_model_path();
    if !path.is_file() {
        eprintln!("SKIPPED reference forward benches: {} is missing (run `make setup`)", path.display());
        return;
    }
    let model = Model::load(&path).expect("model loads");
    let reference = Reference::new(&model);
    let ids: Vec<u32> = (0..128u32).map(|i| 100 + i * 7).collect();
    let mut group = c.benchmark_group("reference");
    group.sample_size(10);
    group.throughput(Throughput::Elements(ids.len() as u64));
    group.bench_function("prefill_128_tokens", |b| {
        b.iter(|| {
            let mut cache = reference.new_cache(ids.len());
            reference.forward(&ids, &mut cache, Logits::Last).expect("forward")
        })
    });
    let mut cache = reference.new_cache(ids.len() + 1);
    reference.forward(&ids, &mut cache, Logits::Last).expect("prefill");
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode_token_at_128", |b| {
        b.iter(|| {
            cache.truncate(ids.len());
            reference.forward(&[42], &mut cache, Logits::Last).expect("decode")
        })
    });
    group.finish();
}

criterion_group!(benches, dequantization, reference_forward);
criterion_main!(benches);
