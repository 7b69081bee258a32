//! Engine room benches: choosing a token from a SmolLM2-sized row of logits (49152) with
//! each sampling mode, and streaming detokenization with the model's tokenizer.
//!
//! `cargo bench --bench engine`; the detokenizer bench needs the model from `make setup`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kiln::engine::sampling::{Sampler, SamplingParams};
use kiln::engine::text::{Detokenizer, StopStrings};
use kiln::model::{default_model_path, Model};

const VOCAB: usize = 49152;

/// Logits shaped like a language model's: a few likely tokens over a long flat tail.
fn logits() -> Vec<f32> {
    (0..VOCAB).map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0 + if i % 997 == 0 { 8.0 } else { 0.0 }).collect()
}

fn sampling(c: &mut Criterion) {
    let l = logits();
    let prompt: Vec<u32> = (0..256).map(|i| i * 13).collect();
    let modes: [(&str, SamplingParams); 5] = [
        ("greedy", SamplingParams::default()),
        ("temperature", SamplingParams { temperature: 0.8, seed: Some(1), ..Default::default() }),
        ("top_k_40", SamplingParams { temperature: 0.8, top_k: 40, seed: Some(1), ..Default::default() }),
        ("top_p_0.9", SamplingParams { temperature: 0.8, top_p: 0.9, seed: Some(1), ..Default::default() }),
        (
            "penalties_min_p_logprobs",
            SamplingParams {
                temperature: 0.8,
                min_p: 0.05,
                repetition_penalty: 1.1,
                frequency_penalty: 0.2,
                top_logprobs: 5,
                seed: Some(1),
                ..Default::default()
            },
        ),
    ];
    let mut group = c.benchmark_group("sample");
    group.throughput(Throughput::Elements(1));
    for (name, params) in modes {
        let mut s = Sampler::new(params, VOCAB, &prompt);
        group.bench_function(name, |b| b.iter(|| s.choose(black_box(&l))));
    }
    group.finish();
}

fn detokenization(c: &mut Criterion) {
    let path = default_model_path();
    if !path.is_file() {
        eprintln!("SKIPPED detokenizer benches: {} is missing (run `make setup`)", path.display());
        return;
    }
    let model = Model::load(&path).expect("model loads");
    let tok = &model.tokenizer;
    let text = "The quick brown fox 🦊 jumps over the lazy dog; 東京の夜は静かだ. ".repeat(16);
    let ids = tok.encode(&text).expect("encode");
    let mut group = c.benchmark_group("detokenize");
    group.throughput(Throughput::Elements(ids.len() as u64));
    group.bench_function("stream", |b| {
        b.iter(|| {
            let mut d = Detokenizer::default();
            let mut n = 0;
            for &id in &ids {
                n += d.push(tok, id).expect("push").len();
            }
            black_box(n)
        })
    });
    group.bench_function("stream_with_stop_strings", |b| {
        b.iter(|| {
            let mut d = Detokenizer::default();
            let mut stops = StopStrings::new(&["<|im_end|>".to_string(), "\n\n###".to_string()]);
            for &id in &ids {
                black_box(stops.push(&d.push(tok, id).expect("push")));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, sampling, detokenization);
criterion_main!(benches);
