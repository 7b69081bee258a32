//! The engine over the real model: ONNX Runtime's serving graph reproduces transformers'
//! greedy continuations, batching changes nothing a request sees, and text streams as valid
//! UTF-8 through the model's own tokenizer and chat template.

mod common;

use std::path::Path;
use std::time::Duration;

use kiln::engine::chat::Message;
use kiln::engine::text::Detokenizer;
use kiln::engine::{
    artifact_engine, artifact_tokenizer, Engine, EngineOptions, FinishReason, Output, Prompt, Request, PREFILL_CHUNK,
};
use kiln::model::reference::{argmax, logsumexp};
use kiln::onnx::manifest::Manifest;
use kiln::runtime::{Forward, KvCache, Provider, ServingDecoder, SessionOptions};

fn reference_prompts() -> Vec<(String, Vec<u32>, Vec<u32>)> {
    let v: serde_json::Value =
        serde_json::from_str(include_str!("data/smollm2-135m.reference.json")).expect("reference JSON");
    let ids = |p: &serde_json::Value, k: &str| -> Vec<u32> {
        p[k].as_array().expect("ids").iter().map(|i| i.as_u64().expect("id") as u32).collect()
    };
    v["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| (p["prompt"].as_str().expect("prompt").to_string(), ids(p, "ids"), ids(p, "greedy_48")))
        .collect()
}

/// How far fp32 weights' logits may move with an f16 KV cache (f16 keeps 11 significant
/// bits of each key and value; measured 0.037 over the reference prompts × 32 steps).
const F16_CACHE_LOGITS: f32 = 0.1;

fn engine(dir: &Path, slots: usize, context: usize) -> Engine {
    artifact_engine(dir, None, &SessionOptions::default(), slots, context, EngineOptions::default()).expect("engine")
}

#[test]
fn greedy_generation_through_onnx_runtime_reproduces_transformers() {
    let e = engine(&common::artifact("fp32"), 1, 256);
    for (prompt, ids, greedy_48) in reference_prompts() {
        let request = Request { prompt: Prompt::Tokens(ids), max_new_tokens: 48, ..Default::default() };
        let out = e.submit(request).expect("submit").collect().expect("output");
        let summary = out.summary.expect("summary");
        let mut tokens = out.token_ids;
        if summary.finish_reason == FinishReason::Eos {
            tokens.push(e.tokenizer().eos_ids[0]);
        }
        assert_eq!(tokens, greedy_48, "greedy continuation of {prompt:?}");
        assert_eq!(out.text, e.tokenizer().decode(&tokens).expect("decode"), "streamed text of {prompt:?}");
    }
}

/// Six requests of different lengths and settings, each with the 5 most likely tokens'
/// log-probabilities at every step.
fn mixed_requests() -> Vec<Request> {
    let prompts = reference_prompts();
    let base = |i: usize, n: usize| Request {
        prompt: Prompt::Tokens(prompts[i % prompts.len()].1.clone()),
        max_new_tokens: n,
        ignore_eos: true,
        ..Default::default()
    };
    let mut r: Vec<Request> = vec![base(0, 24), base(1, 12), base(2, 30), base(3, 8), base(1, 20), base(0, 16)];
    r[1].sampling.temperature = 0.8;
    r[1].sampling.seed = Some(7);
    r[3].sampling.temperature = 1.0;
    r[3].sampling.top_p = 0.9;
    r[3].sampling.seed = Some(1234);
    r[4].sampling.temperature = 0.7;
    r[4].sampling.top_k = 20;
    r[4].sampling.repetition_penalty = 1.2;
    r[4].sampling.seed = Some(99);
    r[5].prompt = Prompt::Text("The three primary colors are".into());
    for req in &mut r {
        req.sampling.top_logprobs = 5;
    }
    r
}

/// Tokens and per-step top-5 log-probabilities of a generation.
fn run(e: &Engine, r: Request) -> (Vec<u32>, Vec<Vec<(u32, f32)>>) {
    let g = e.submit(r).expect("submit");
    let mut tokens = Vec::new();
    let mut top = Vec::new();
    for event in g.events {
        match event {
            kiln::engine::Event::Token(c) => {
                tokens.push(c.id);
                top.push(c.top);
            }
            kiln::engine::Event::Finished(_) => break,
            kiln::engine::Event::Failed(err) => panic!("{err}"),
            kiln::engine::Event::Text(_) => {}
        }
    }
    (tokens, top)
}

#[test]
fn batching_is_invisible_on_the_real_model() {
    let dir = common::artifact("int4");
    let alone: Vec<_> = {
        let e = engine(&dir, 1, 256);
        mixed_requests().into_iter().map(|r| run(&e, r)).collect()
    };
    // Four slots for six requests submitted at staggered times: they join a running batch,
    // wait for a slot, and move slots when others finish.
    let e = std::sync::Arc::new(engine(&dir, 4, 256));
    let handles: Vec<_> = mixed_requests()
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let e = e.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(40 * i as u64));
                run(&e, r)
            })
        })
        .collect();
    for (i, (h, (want_tokens, want_top))) in handles.into_iter().zip(&alone).enumerate() {
        let (tokens, top) = h.join().expect("request thread");
        assert_eq!(&tokens, want_tokens, "request {i}: tokens");
        for (step, (a, b)) in top.iter().zip(want_top).enumerate() {
            for ((ia, la), (ib, lb)) in a.iter().zip(b) {
                assert_eq!(ia, ib, "request {i}, step {step}: top tokens");
                assert!((la - lb).abs() <= 1e-4, "request {i}, step {step}: log-probability {la} vs {lb}");
            }
        }
    }
}

#[test]
fn a_chunked_prefill_gives_what_one_pass_gives() {
    // Past two chunks: the engine prefills in three passes, each after cached positions.
    let dir = common::artifact("fp32");
    let manifest = Manifest::read(&dir).expect("manifest");
    let tokenizer = artifact_tokenizer(&dir, &manifest).expect("tokenizer");
    let text = kiln::bench::BENCH_SENTENCE.repeat(2 * PREFILL_CHUNK / 8);
    let ids = tokenizer.encode(&text).expect("encode");
    assert!(ids.len() > 2 * PREFILL_CHUNK, "{} tokens", ids.len());
    let (steps, context) = (8, ids.len() + 16);
    let (tokens, top) = {
        let e = engine(&dir, 1, context);
        let mut r = Request { prompt: Prompt::Tokens(ids.clone()), max_new_tokens: steps, ..Default::default() };
        (r.ignore_eos, r.sampling.top_logprobs) = (true, 5);
        run(&e, r)
    };
    let mut dec = ServingDecoder::open(&dir, &SessionOptions::default(), 1, context).expect("decoder");
    let mut logits = dec.extend(0, 0, &ids, 1).expect("one-pass prefill");
    for step in 0..steps {
        let row = logits.row(0);
        let log_sum = logsumexp(row);
        assert_eq!(tokens[step], argmax(row), "step {step}: token");
        for &(id, lp) in &top[step] {
            let want = row[id as usize] - log_sum;
            assert!((lp - want).abs() <= 1e-4, "step {step}, token {id}: log-probability {lp} vs {want}");
        }
        logits = dec.step(&[(tokens[step], ids.len() + step)]).expect("step");
    }
}

#[test]
fn emoji_and_cjk_stream_as_valid_utf8() {
    let dir = common::artifact("fp32");
    let m = Manifest::read(&dir).expect("manifest");
    let tok = artifact_tokenizer(&dir, &m).expect("tokenizer");
    let text = "Tea 🍵 and 寿司 🍣 in 東京, naïve café — 👩‍👩‍👧 done.";
    let ids = tok.encode(text).expect("encode");
    let mut d = Detokenizer::default();
    let mut deltas = Vec::new();
    for &id in &ids {
        deltas.push(d.push(&tok, id).expect("push"));
    }
    deltas.push(d.finish(&tok).expect("finish"));
    assert!(deltas.iter().all(|t| !t.contains('\u{FFFD}')), "no replacement characters: {deltas:?}");
    assert!(deltas.iter().any(|t| t.is_empty()), "some byte-level pieces waited for the rest of their character");
    assert_eq!(deltas.concat(), text);
    assert_eq!(deltas.concat(), tok.decode(&ids).expect("decode"));
}

#[test]
fn chat_prompts_use_the_model_template() {
    let dir = common::artifact("fp32");
    let e = engine(&dir, 1, 256);
    let messages = vec![Message { role: "user".into(), content: "What is 2+2?".into() }];
    let ids = e.prompt_ids(&Prompt::Chat(messages)).expect("chat prompt");
    let want = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
                <|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(ids, e.tokenizer().encode(want).expect("encode"));
    let im_start = e.tokenizer().inner().token_to_id("<|im_start|>").expect("special token");
    assert_eq!(ids[0], im_start, "special tokens in the template are single tokens");
    let out: Output = e
        .submit(Request { prompt: Prompt::Tokens(ids), max_new_tokens: 16, ..Default::default() })
        .expect("submit")
        .collect()
        .expect("output");
    assert!(out.text.contains('4'), "the model answers: {:?}", out.text);
}

/// Op types of the graph ONNX Runtime optimized for a CPU serving session of `artifact`.
fn optimized_ops(artifact: &str, accuracy: Option<u8>) -> Vec<String> {
    use prost::Message as _;
    let out = tempfile::tempdir().expect("temp dir");
    let path = out.path().join("optimized.onnx");
    let opts = SessionOptions {
        optimized_model_path: Some(path.clone()),
        matmul_accuracy_level: accuracy,
        ..Default::default()
    };
    ServingDecoder::open(&common::artifact(artifact), &opts, 1, 16).expect("serving session");
    let bytes = std::fs::read(&path).expect("optimized graph");
    let model = tract_onnx::pb::ModelProto::decode(&bytes[..]).expect("ONNX");
    model.graph.expect("graph").node.into_iter().map(|n| n.op_type).collect()
}

#[test]
fn quantized_matmuls_run_kilns_kernel_where_the_cpu_has_vnni() {
    let count = |ops: &[String], op: &str| ops.iter().filter(|o| *o == op).count();
    let vnni = std::arch::is_x86_feature_detected!("avx512vnni")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512f");
    // SmolLM2: 30 layers × (qkv, o, gate_up, down) + the lm_head.
    for artifact in ["int4", "int8", "int4-g64-sym"] {
        let ops = optimized_ops(artifact, None);
        let (kiln, ort) = (count(&ops, "QuantizedMatMul"), count(&ops, "MatMulNBits"));
        if vnni {
            assert_eq!((kiln, ort), (121, 0), "{artifact}");
        } else {
            println!("SKIPPED kiln's kernel for {artifact}: this CPU lacks AVX-512 VNNI (MatMulNBits runs)");
            assert_eq!((kiln, ort), (0, 121), "{artifact}");
        }
    }
    // f32 arithmetic asked for: ONNX Runtime's MatMulNBits at accuracy level 1.
    let ops = optimized_ops("int4", Some(1));
    assert_eq!((count(&ops, "QuantizedMatMul"), count(&ops, "MatMulNBits")), (0, 121));
}

/// Greedy tokens and logits of `steps` steps after `prompt`, prefilled into slot 1 and moved
/// to slot 0 (the engine's compaction) before decoding.
fn greedy_after_move(dec: &mut ServingDecoder, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<ndarray::Array1<f32>>) {
    let mut logits = dec.extend(1, 0, prompt, 1).expect("prefill").row(0).to_owned();
    dec.move_slot(1, 0, prompt.len()).expect("move");
    let (mut tokens, mut rows) = (Vec::new(), Vec::new());
    for step in 0..steps {
        tokens.push(argmax(logits.view()));
        rows.push(logits);
        logits = dec.step(&[(tokens[step], prompt.len() + step)]).expect("step").row(0).to_owned();
    }
    (tokens, rows)
}

#[test]
fn the_kv_cache_is_f16_for_quantized_weights_and_costs_fp32_weights_nothing() {
    let open = |artifact: &str, opts: &SessionOptions| {
        ServingDecoder::open(&common::artifact(artifact), opts, 2, 96).expect("serving session")
    };
    let f16 = SessionOptions { kv_cache: Some(KvCache::F16), ..Default::default() };
    let exact = SessionOptions { matmul_accuracy_level: Some(1), ..Default::default() };
    assert_eq!(open("int4", &SessionOptions::default()).kv_cache(), KvCache::F16);
    assert_eq!(open("int4", &exact).kv_cache(), KvCache::F32, "f32 arithmetic asked for");
    let mut wide = open("fp32", &SessionOptions::default());
    let mut half = open("fp32", &f16);
    assert_eq!((wide.kv_cache(), half.kv_cache()), (KvCache::F32, KvCache::F16));
    assert_eq!(half.kv_bytes() * 2, wide.kv_bytes());
    // fp32 weights: the f16 cache's rounding moves no greedy token and barely the logits.
    let mut worst = 0f32;
    for (prompt, ids, greedy_48) in reference_prompts() {
        let (want_tokens, want_rows) = greedy_after_move(&mut wide, &ids, 32);
        let (tokens, rows) = greedy_after_move(&mut half, &ids, 32);
        let n = greedy_48.len().min(32);
        assert_eq!(want_tokens[..n], greedy_48[..n], "f32 cache, {prompt:?}");
        assert_eq!(tokens, want_tokens, "f16 cache, {prompt:?}");
        for (a, b) in rows.iter().zip(&want_rows) {
            worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(worst, f32::max);
        }
    }
    println!("fp32 weights, f16 vs f32 KV cache: logits differ by at most {worst}");
    assert!(worst <= F16_CACHE_LOGITS, "logits differ by {worst}");
    // Only kiln's CPU kernel reads an f16 cache.
    let cuda = SessionOptions { provider: Provider::Cuda, ..f16 };
    let err = ServingDecoder::open(&common::artifact("int4"), &cuda, 1, 16).err().expect("f16 cache on CUDA");
    assert!(err.to_string().contains("f16 KV cache runs on the CPU only"), "{err}");
}

#[test]
fn a_burst_of_same_length_prompts_is_prefilled_together_as_if_alone() {
    // The runtime: one pass over three slots gives each prompt its own logits.
    for artifact in ["int4", "fp32"] {
        let dir = common::artifact(artifact);
        let mut dec = ServingDecoder::open(&dir, &SessionOptions::default(), 3, 64).expect("serving session");
        let prompts: [&[u32]; 3] = [&[1, 2, 3, 4, 5, 6], &[100, 200, 300, 400, 500, 600], &[7, 7, 7, 7, 7, 7]];
        let together = dec.prefill_rows(0, &prompts).expect("one pass");
        let step_together = dec.step(&[(42, 6), (43, 6), (44, 6)]).expect("step");
        for (i, prompt) in prompts.iter().enumerate() {
            let alone = dec.extend(0, 0, prompt, 1).expect("alone");
            let step_alone = dec.step(&[(42 + i as u32, 6)]).expect("step").row(0).to_owned();
            let max = |a: ndarray::ArrayView1<f32>, b: ndarray::ArrayView1<f32>| {
                a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
            };
            let (d, s) = (max(together.row(i), alone.row(0)), max(step_together.row(i), step_alone.view()));
            assert!(d <= 1e-4 && s <= 1e-4, "{artifact} prompt {i}: logits differ by {d}, next step by {s}");
        }
        // Different lengths are refused, not padded.
        let err = dec.prefill_rows(0, &[&[1, 2], &[1, 2, 3]]).expect_err("ragged burst");
        assert!(err.to_string().contains("all the same"), "{err}");
    }

    // The engine: requests waiting together with one prompt length join in one prefill, and
    // each generates what it generates alone.
    let dir = common::artifact("int4");
    let requests = || {
        mixed_requests().into_iter().take(4).map(|mut r| {
            if let Prompt::Tokens(ids) = &mut r.prompt {
                ids.truncate(5);
            }
            r
        })
    };
    let alone: Vec<_> = {
        let e = engine(&dir, 1, 256);
        requests().map(|r| run(&e, r)).collect()
    };
    let e = engine(&dir, 4, 256);
    let running: Vec<_> = requests().map(|r| e.submit(r).expect("submit")).collect();
    for (i, (g, (want, _))) in running.into_iter().zip(&alone).enumerate() {
        assert_eq!(&g.collect().expect("output").token_ids, want, "request {i}");
    }
}
