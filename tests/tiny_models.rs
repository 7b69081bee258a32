//! Small random models written by the tests: the Hugging Face directory loader and the GGUF
//! loader give the same weights and logits, and the reference forward agrees with an
//! independent scalar computation (GQA, q/k/v biases, tied and untied heads, sliding window).

mod common;

use common::*;
use kiln::model::reference::{Logits, Reference};
use kiln::model::{Architecture, Model};

const LLAMA: TinySpec = TinySpec { class: "LlamaForCausalLM", tied: false, bias: false, sliding_window: None };
const QWEN2: TinySpec = TinySpec { class: "Qwen2ForCausalLM", tied: true, bias: true, sliding_window: None };
const MISTRAL: TinySpec = TinySpec { class: "MistralForCausalLM", tied: false, bias: false, sliding_window: Some(3) };

/// f32 forward against an f64 scalar computation of the same math.
const NAIVE_TOLERANCE: f64 = 1e-4;

fn assert_matches_naive(model: &Model, spec: TinySpec, tensors: &Tensors, ids: &[u32]) {
    let reference = Reference::new(model);
    let mut cache = reference.new_cache(ids.len());
    let logits = reference.forward(ids, &mut cache, Logits::All).expect("forward");
    let naive = naive_logits(spec, tensors, ids);
    for (t, row) in naive.iter().enumerate() {
        for (v, want) in row.iter().enumerate() {
            let got = logits[[t, v]] as f64;
            assert!(
                (got - want).abs() <= NAIVE_TOLERANCE * want.abs().max(1.0),
                "{}: position {t} token {v}: kiln {got}, scalar {want}",
                spec.class
            );
        }
    }
}

#[test]
fn hf_bf16_shards_and_gguf_give_the_same_model() {
    let tensors = tiny_tensors(LLAMA, 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let hf_dir = dir.path().join("hf");
    write_hf_dir(&hf_dir, LLAMA, &tensors, Storage::ShardedBf16);
    let gguf = dir.path().join("tiny.gguf");
    tiny_gguf(LLAMA, &tensors, &[]).write(&gguf);

    let from_hf = Model::load(&hf_dir).expect("HF directory loads");
    let from_gguf = Model::load(&gguf).expect("GGUF loads");
    assert_eq!(from_hf.config, from_gguf.config);
    assert_eq!(from_hf.config.architecture, Architecture::Llama);
    // Same numbers in both layouts: the GGUF Q/K row permutation is undone exactly.
    assert_eq!(from_hf.weights, from_gguf.weights);

    let ids = from_hf.tokenizer.encode("hello world<|endoftext|>").expect("encodes");
    assert_eq!(ids, from_gguf.tokenizer.encode("hello world<|endoftext|>").expect("encodes"));
    let (tokens, _, _) = tiny_vocab();
    let pieces: Vec<&str> = ids.iter().map(|&i| tokens[i as usize].as_str()).collect();
    assert_eq!(pieces, ["he", "ll", "o", "Ġw", "or", "l", "d", "<|endoftext|>"]);

    let run = |m: &Model| {
        let r = Reference::new(m);
        let mut cache = r.new_cache(ids.len());
        r.forward(&ids, &mut cache, Logits::All).expect("forward")
    };
    assert_eq!(run(&from_hf), run(&from_gguf));
    assert_matches_naive(&from_hf, LLAMA, &tensors, &ids);
}

#[test]
fn qwen2_biases_and_tied_head() {
    let tensors = tiny_tensors(QWEN2, 2);
    let dir = tempfile::tempdir().expect("tempdir");
    write_hf_dir(dir.path(), QWEN2, &tensors, Storage::SingleF32);
    let model = Model::load(dir.path()).expect("loads");
    assert!(model.config.attention_bias && model.config.tie_word_embeddings);
    assert!(model.weights.lm_head.is_none());
    assert_matches_naive(&model, QWEN2, &tensors, &[5, 80, 256, 3, 259, 17]);

    // Qwen2 GGUF files keep the Hugging Face row order (no permutation to undo).
    let gguf = dir.path().join("qwen2.gguf");
    tiny_gguf(QWEN2, &tensors, &[]).write(&gguf);
    let from_gguf = Model::load(&gguf).expect("loads");
    assert_eq!(from_gguf.config.architecture, Architecture::Qwen2);
    assert_eq!(from_gguf.weights, model.weights);
}

#[test]
fn mistral_sliding_window_masks_old_keys() {
    let tensors = tiny_tensors(MISTRAL, 3);
    let dir = tempfile::tempdir().expect("tempdir");
    write_hf_dir(dir.path(), MISTRAL, &tensors, Storage::SingleF32);
    let model = Model::load(dir.path()).expect("loads");
    assert_eq!(model.config.sliding_window, Some(3));
    assert_matches_naive(&model, MISTRAL, &tensors, &[7, 100, 200, 45, 9, 33, 250]);
}

#[test]
fn decoding_with_the_cache_matches_prefill() {
    let tensors = tiny_tensors(LLAMA, 4);
    let dir = tempfile::tempdir().expect("tempdir");
    write_hf_dir(dir.path(), LLAMA, &tensors, Storage::SingleF32);
    let model = Model::load(dir.path()).expect("loads");
    let r = Reference::new(&model);
    let ids = [3u32, 141, 59, 26, 53, 58, 97, 93];
    let mut cache = r.new_cache(ids.len());
    let full = r.forward(&ids, &mut cache, Logits::All).expect("prefill");
    let mut cache = r.new_cache(ids.len());
    r.forward(&ids[..4], &mut cache, Logits::Last).expect("prefix");
    for (t, &id) in ids.iter().enumerate().skip(4) {
        let step = r.forward(&[id], &mut cache, Logits::Last).expect("step");
        let diff = (&step.row(0) - &full.row(t)).iter().fold(0f32, |m, d| m.max(d.abs()));
        assert!(diff < 1e-5, "position {t}: cached step differs by {diff}");
    }
    // Rolling back and re-running a position gives the same logits again.
    cache.truncate(6);
    let again = r.forward(&ids[6..], &mut cache, Logits::All).expect("re-run");
    let diff = (&again.row(1) - &full.row(7)).iter().fold(0f32, |m, d| m.max(d.abs()));
    assert!(diff < 1e-5, "after truncate: differs by {diff}");
}

/// AWQ's folding leaves the float model's function unchanged: scales folded at every site
/// (norm weights and up_proj rows shrink, consumer columns grow) give the same logits.
#[test]
fn awq_folding_preserves_the_float_model() {
    use kiln::model::reference::Site;
    use kiln::quant::awq::fold;
    use rand::{Rng, SeedableRng};
    let tensors = tiny_tensors(QWEN2, 21);
    let dir = tempfile::tempdir().expect("tempdir");
    write_hf_dir(dir.path(), QWEN2, &tensors, Storage::SingleF32);
    let model = Model::load(dir.path()).expect("loads");
    let mut folded = model.weights.clone();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut scales = |n: usize| ndarray::Array1::from_shape_fn(n, |_| 0.25 + 3.0 * rng.random::<f32>());
    for layer in folded.layers.iter_mut() {
        fold(layer, Site::Attention, &scales(TINY_HIDDEN));
        fold(layer, Site::Mlp, &scales(TINY_HIDDEN));
        fold(layer, Site::Down, &scales(TINY_FFN));
    }
    assert_ne!(folded, model.weights);
    let ids = [5u32, 80, 256, 3, 259, 17];
    let run = |w: &kiln::model::Weights| {
        let r = Reference::from_parts(&model.config, w);
        let mut cache = r.new_cache(ids.len());
        r.forward(&ids, &mut cache, Logits::All).expect("forward")
    };
    let (a, b) = (run(&model.weights), run(&folded));
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = (&a - &b).iter().fold(0f32, |m, d| m.max(d.abs()));
    assert!(diff <= 1e-5 * scale, "folding changed the logits by {diff} (scale {scale})");
}
