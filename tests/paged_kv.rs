//! The paged KV cache on the real model (CPU serving graph, kiln's attention kernel over
//! block tables): transformers' greedy continuations in a batch, prefix reuse across the
//! turns of a conversation, and preemption under a pool too small for the load.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln::engine::{artifact_tokenizer, Engine, EngineOptions, FinishReason, Prompt, Request};
use kiln::onnx::manifest::Manifest;
use kiln::runtime::{ServingDecoder, SessionOptions, BLOCK_SIZE};

fn reference_prompts() -> Vec<(Vec<u32>, Vec<u32>)> {
    let v: serde_json::Value =
        serde_json::from_str(include_str!("data/smollm2-135m.reference.json")).expect("reference JSON");
    let ids = |p: &serde_json::Value, k: &str| -> Vec<u32> {
        p[k].as_array().expect("ids").iter().map(|i| i.as_u64().expect("id") as u32).collect()
    };
    v["prompts"].as_array().expect("prompts").iter().map(|p| (ids(p, "ids"), ids(p, "greedy_48"))).collect()
}

/// An engine over `dir` with `slots` sequences of `context` positions sharing a pool of
/// `blocks` KV blocks.
fn engine(dir: &Path, slots: usize, context: usize, blocks: usize, prefix_cache: bool) -> Engine {
    let manifest = Manifest::read(dir).expect("manifest");
    let tokenizer = artifact_tokenizer(dir, &manifest).expect("tokenizer");
    let dir = dir.to_path_buf();
    let open = move || ServingDecoder::open_pool(&dir, &SessionOptions::default(), slots, context, blocks);
    Engine::start(open, tokenizer, EngineOptions { queue_capacity: 64, prefix_cache }).expect("engine")
}

fn greedy(prompt: &[u32], max_new_tokens: usize) -> Request {
    Request { prompt: Prompt::Tokens(prompt.to_vec()), max_new_tokens, ignore_eos: true, ..Default::default() }
}

/// Waits (up to a second) for the engine to hold no KV block.
fn blocks_return(e: &Engine) -> usize {
    let start = Instant::now();
    while e.load().kv_blocks_in_use > 0 && start.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(2));
    }
    e.load().kv_blocks_in_use
}

#[test]
fn reference_prompts_in_a_paged_batch_of_8_reproduce_transformers() {
    let e = engine(&common::artifact("fp32"), 8, 256, 8 * 256 / BLOCK_SIZE, true);
    let prompts: Vec<(Vec<u32>, Vec<u32>)> = reference_prompts().into_iter().cycle().take(8).collect();
    let running: Vec<_> = prompts
        .iter()
        .map(|(ids, _)| {
            let r = Request { prompt: Prompt::Tokens(ids.clone()), max_new_tokens: 48, ..Default::default() };
            e.submit(r).expect("submit")
        })
        .collect();
    for (i, (g, (_, want))) in running.into_iter().zip(&prompts).enumerate() {
        let out = g.collect().expect("output");
        let mut tokens = out.token_ids;
        if out.summary.expect("summary").finish_reason == FinishReason::Eos {
            tokens.push(e.tokenizer().eos_ids[0]);
        }
        assert_eq!(&tokens, want, "request {i}");
    }
    assert_eq!(blocks_return(&e), 0);
}

#[test]
fn a_conversation_reuses_its_earlier_turns_and_answers_as_uncached() {
    let dir = common::artifact("int4");
    let cached = engine(&dir, 2, 512, 64, true);
    let uncached = engine(&dir, 1, 512, 64, false);
    let tokenizer = cached.tokenizer();
    let mut prompt = tokenizer.encode_prompt("The little village by the sea had a lighthouse.").expect("encode");
    let mut want_cached = 0;
    for turn in 0..4 {
        let got = cached.submit(greedy(&prompt, 24)).expect("submit").collect().expect("output");
        let alone = uncached.submit(greedy(&prompt, 24)).expect("submit").collect().expect("output");
        assert_eq!(got.token_ids, alone.token_ids, "turn {turn}");
        let summary = got.summary.expect("summary");
        assert_eq!(summary.cached_prompt_tokens, want_cached, "turn {turn}: reused prompt tokens");
        assert_eq!(alone.summary.expect("summary").cached_prompt_tokens, 0);
        // The cache now holds the prompt and all but the last generated token, in whole
        // blocks; the next prompt reuses them, short of its own last token.
        prompt.extend(&got.token_ids);
        let held = (prompt.len() - 1) / BLOCK_SIZE * BLOCK_SIZE;
        prompt.extend(tokenizer.encode(&format!(" Then, on day {turn}, the keeper wrote:")).expect("encode"));
        want_cached = held.min((prompt.len() - 1) / BLOCK_SIZE * BLOCK_SIZE);
    }
    assert!(want_cached >= 96, "{want_cached} tokens of the last turn are cached");
    assert_eq!(blocks_return(&cached), 0);
}

/// Sixteen clients against a pool that holds about three of their sequences: requests wait
/// for blocks, the newest are preempted and recomputed, and each client gets the output
/// its request gets alone.
#[test]
fn a_tiny_pool_under_16_clients_preempts_and_loses_nothing() {
    let dir = common::artifact("int4");
    let tokenizer = {
        let m = Manifest::read(&dir).expect("manifest");
        artifact_tokenizer(&dir, &m).expect("tokenizer")
    };
    let texts = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "In 1905, Albert Einstein"];
    let requests: Vec<Request> = (0..16)
        .map(|i| {
            let text = format!("{} {}", texts[i % 4], ["", "and", "then", "so"][i / 4]);
            let mut r = greedy(&tokenizer.encode_prompt(&text).expect("encode"), 40);
            if i % 5 == 2 {
                (r.sampling.temperature, r.sampling.seed) = (0.9, Some(i as u64));
            }
            r
        })
        .collect();
    let want: Vec<Vec<u32>> = {
        let e = engine(&dir, 1, 128, 8, true);
        requests.iter().map(|r| e.submit(r.clone()).expect("submit").collect().expect("output").token_ids).collect()
    };
    // 12 blocks of 16 positions; a request fills up to 4.
    let e = Arc::new(engine(&dir, 8, 128, 12, true));
    let clients: Vec<_> = requests
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let e = e.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(5 * i as u64));
                e.submit(r).expect("submit").collect().expect("output").token_ids
            })
        })
        .collect();
    for (i, (c, want)) in clients.into_iter().zip(&want).enumerate() {
        assert_eq!(&c.join().expect("client"), want, "client {i}");
    }
    assert!(e.load().preemptions > 0, "the pool was small enough to preempt");
    assert_eq!(blocks_return(&e), 0);
}

#[test]
fn a_request_the_whole_pool_cannot_hold_is_refused_with_the_figures() {
    let e = engine(&common::artifact("int4"), 2, 512, 4, true);
    let err = e.submit(greedy(&[1; 20], 100)).err().expect("refused");
    assert_eq!(err.kind(), "kv_memory");
    let text = err.to_string();
    assert!(
        text.contains("prompt of 20 tokens plus up to 100") && text.contains("120 KV positions (8 blocks"),
        "{text}"
    );
    assert!(text.contains("KV pool of 4 blocks"), "{text}");
}
