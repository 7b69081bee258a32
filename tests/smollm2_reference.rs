//! The default model against independent references (`tests/data/smollm2-135m.reference.json`):
//! llama.cpp's token ids, and Hugging Face transformers' fp32 logits and greedy outputs.
//!
//! Needs the model that `make setup` fetches (`make test` runs setup first).

mod common;

use kiln::engine::text::Detokenizer;
use kiln::model::reference::{argmax, logsumexp, Logits, Reference};
use serde::Deserialize;

/// Logits agree with transformers' fp32 to this absolute tolerance: both are f32 with
/// different summation orders over 30 layers (observed differences are ~1e-4).
const LOGIT_TOLERANCE: f32 = 1e-3;

#[derive(Deserialize)]
struct ReferenceFile {
    texts: Vec<TextCase>,
    prompts: Vec<PromptCase>,
}

#[derive(Deserialize)]
struct TextCase {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct PromptCase {
    prompt: String,
    ids: Vec<u32>,
    argmax_per_position: Vec<u32>,
    last_top20: Vec<(u32, f32)>,
    last_logsumexp: f32,
    greedy_48: Vec<u32>,
}

fn reference() -> ReferenceFile {
    let text = include_str!("data/smollm2-135m.reference.json");
    serde_json::from_str(text).expect("reference JSON parses")
}

#[test]
fn token_ids_match_llama_cpp() {
    let model = common::smollm2();
    for case in reference().texts {
        let ids = model.tokenizer.encode(&case.text).expect("encodes");
        assert_eq!(ids, case.ids, "token ids of {:?}", case.text);
        let back = model.tokenizer.decode(&ids).expect("decodes");
        // Special tokens are left out of decoded text; everything else round-trips.
        if !case.text.contains("<|") {
            assert_eq!(back, case.text, "decode(encode(text)) for {:?}", case.text);
        }
    }
}

#[test]
fn prompt_logits_match_transformers() {
    let model = common::smollm2();
    let reference = Reference::new(model);
    for case in reference_prompts() {
        assert_eq!(model.tokenizer.encode(&case.prompt).expect("encodes"), case.ids, "ids of {:?}", case.prompt);
        let mut cache = reference.new_cache(case.ids.len());
        let logits = reference.forward(&case.ids, &mut cache, Logits::All).expect("forward");
        let argmaxes: Vec<u32> = logits.rows().into_iter().map(argmax).collect();
        assert_eq!(argmaxes, case.argmax_per_position, "argmax per position of {:?}", case.prompt);
        let last = logits.row(logits.nrows() - 1);
        for &(id, want) in &case.last_top20 {
            let got = last[id as usize];
            assert!(
                (got - want).abs() <= LOGIT_TOLERANCE,
                "{:?}: logit of token {id} is {got}, transformers gives {want}",
                case.prompt
            );
        }
        let lse = logsumexp(last);
        assert!(
            (lse - case.last_logsumexp).abs() <= LOGIT_TOLERANCE,
            "{:?}: logsumexp {lse}, transformers gives {}",
            case.prompt,
            case.last_logsumexp
        );
    }
}

#[test]
fn greedy_continuations_match_transformers() {
    let model = common::smollm2();
    let reference = Reference::new(model);
    for case in reference_prompts() {
        let mut streamed = String::new();
        let mut stream = Detokenizer::default();
        let out = reference
            .greedy(&case.ids, 48, &model.tokenizer.eos_ids, |id| {
                streamed.push_str(&stream.push(&model.tokenizer, id).expect("detokenizes"));
            })
            .expect("generates");
        streamed.push_str(&stream.finish(&model.tokenizer).expect("detokenizes"));
        assert_eq!(out, case.greedy_48, "greedy continuation of {:?}", case.prompt);
        assert_eq!(streamed, model.tokenizer.decode(&out).expect("decodes"), "streamed text of {:?}", case.prompt);
    }
}

#[test]
fn cached_decoding_matches_one_long_prefill() {
    // Logits at position t must not depend on whether earlier positions came from the
    // cache or from the same window: prefill 3 tokens, then feed the rest one by one
    // and in a chunk of 2, against a single prefill of the whole sequence.
    let model = common::smollm2();
    let reference = Reference::new(model);
    let ids = &reference_prompts()[2].ids;
    let mut cache = reference.new_cache(ids.len());
    let full = reference.forward(ids, &mut cache, Logits::All).expect("forward");
    let mut cache = reference.new_cache(ids.len());
    let mut rows = vec![reference.forward(&ids[..3], &mut cache, Logits::All).expect("prefill")];
    rows.push(reference.forward(&ids[3..5], &mut cache, Logits::All).expect("chunk"));
    for &id in &ids[5..] {
        rows.push(reference.forward(&[id], &mut cache, Logits::All).expect("decode"));
    }
    let stepped = ndarray::concatenate(ndarray::Axis(0), &rows.iter().map(|r| r.view()).collect::<Vec<_>>())
        .expect("same widths");
    let max_diff = (&full - &stepped).iter().fold(0f32, |m, d| m.max(d.abs()));
    // Same operations in another grouping: f32 rounding only.
    assert!(max_diff < 1e-3, "cached decoding differs from one prefill by {max_diff}");
    assert_eq!(cache.len(), ids.len());
}

#[test]
fn forward_rejects_bad_inputs() {
    let model = common::smollm2();
    let reference = Reference::new(model);
    let mut cache = reference.new_cache(4);
    let err = reference.forward(&[49152], &mut cache, Logits::Last).unwrap_err();
    assert_eq!(err.to_string(), "token id 49152 is outside the vocabulary of 49152");
    let err = reference.forward(&[1, 2, 3, 4, 5], &mut cache, Logits::Last).unwrap_err();
    assert_eq!(err.to_string(), "5 positions do not fit in a KV cache of 4");
    assert!(cache.is_empty(), "a rejected window leaves the cache as it was");
}

#[test]
fn tokenizer_json_round_trips() {
    let model = common::smollm2();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, model.tokenizer.to_json().expect("serializes")).expect("writes");
    let reloaded = tokenizers::Tokenizer::from_file(&path).expect("tokenizers loads what kiln wrote");
    for case in reference().texts {
        let ids = reloaded.encode(case.text.as_str(), false).expect("encodes").get_ids().to_vec();
        assert_eq!(ids, case.ids, "reloaded tokenizer ids of {:?}", case.text);
    }
}

fn reference_prompts() -> Vec<PromptCase> {
    reference().prompts
}
