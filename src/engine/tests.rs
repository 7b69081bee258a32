//! The scheduler over a fake model whose logits hash the whole cached history of a slot:
//! a slot mix-up, a stale cache or a lost move shows up as different tokens.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ndarray::Array2;

use super::*;

pub(super) const VOCAB: usize = 32;
const EOS: u32 = 1;

pub(super) struct Fake {
    history: Vec<Vec<u32>>,
    context: usize,
    delay: Duration,
    /// 0 for the target; a draft with another salt disagrees with it.
    salt: u64,
    /// Every extend and step, in order.
    calls: Arc<Mutex<Vec<Call>>>,
}

/// What the scheduler asked of the model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Call {
    Extend { slot: usize, past: usize, len: usize },
    Step { rows: usize },
}

impl Fake {
    pub(super) fn new(slots: usize, context: usize, delay: Duration, salt: u64) -> Self {
        Fake { history: vec![Vec::new(); slots], context, delay, salt, calls: Arc::new(Mutex::new(Vec::new())) }
    }

    fn log(&self, call: Call) {
        self.calls.lock().expect("calls").push(call);
    }
}

pub(super) fn logits(history: &[u32], salt: u64) -> Vec<f32> {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ salt;
    for &t in history {
        h = (h ^ t as u64).wrapping_mul(0x0100_0000_01b3);
    }
    (0..VOCAB as u64)
        .map(|j| {
            let x = (h ^ j.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0xff51_afd7_ed55_8ccd);
            (x >> 40) as f32 / (1u64 << 24) as f32 * 6.0
        })
        .collect()
}

impl Forward for Fake {
    fn slots(&self) -> usize {
        self.history.len()
    }

    fn max_context(&self) -> usize {
        self.context
    }

    fn vocab_size(&self) -> usize {
        VOCAB
    }

    fn extend(&mut self, slot: usize, past: usize, tokens: &[u32], last: usize) -> Result<Array2<f32>, RuntimeError> {
        self.log(Call::Extend { slot, past, len: tokens.len() });
        let h = &mut self.history[slot];
        h.truncate(past);
        let mut rows = Vec::new();
        for (i, &t) in tokens.iter().enumerate() {
            h.push(t);
            if i + last >= tokens.len() {
                rows.extend(logits(h, self.salt));
            }
        }
        Ok(Array2::from_shape_vec((last, VOCAB), rows).expect("rows"))
    }

    fn step(&mut self, rows: &[(u32, usize)]) -> Result<Array2<f32>, RuntimeError> {
        std::thread::sleep(self.delay);
        self.log(Call::Step { rows: rows.len() });
        let mut out = Vec::new();
        for (slot, &(token, past)) in rows.iter().enumerate() {
            let h = &mut self.history[slot];
            assert_eq!(h.len(), past, "slot {slot} holds {} positions, the engine says {past}", h.len());
            h.push(token);
            out.extend(logits(h, self.salt));
        }
        Ok(Array2::from_shape_vec((rows.len(), VOCAB), out).expect("rows"))
    }

    fn move_slot(&mut self, from: usize, to: usize, len: usize) -> Result<(), RuntimeError> {
        self.history[to] = self.history[from][..len].to_vec();
        Ok(())
    }
}

/// Word-level tokenizer: `<unk>`, `</s>`, `<s>`, then two-letter words; decoding joins
/// words with spaces.
pub(super) fn tokenizer() -> ModelTokenizer {
    let mut vocab = serde_json::Map::new();
    for (i, w) in ["<unk>", "</s>", "<s>"].iter().enumerate() {
        vocab.insert(w.to_string(), i.into());
    }
    for i in 3..VOCAB {
        // i and i + 26 share the first letter; the second differs by 13, so words are unique.
        let second = ((i / 26) * 13 + i * 7 % 13) % 26;
        let w = format!("{}{}", (b'a' + (i % 26) as u8) as char, (b'a' + second as u8) as char);
        vocab.insert(w, i.into());
    }
    let doc = serde_json::json!({
        "version": "1.0",
        "added_tokens": [
            {"id": 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "pre_tokenizer": {"type": "Whitespace"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    });
    let inner: tokenizers::Tokenizer = doc.to_string().parse().expect("tokenizer");
    assert_eq!(inner.get_vocab_size(true), VOCAB, "every id has its own word");
    ModelTokenizer::new(inner, Some(2), vec![EOS], None)
}

/// An engine over `fake` with room for `queue` waiting requests, and the fake's call log.
fn engine_over(fake: Fake, queue: usize) -> (Engine, Arc<Mutex<Vec<Call>>>) {
    let calls = fake.calls.clone();
    (
        Engine::start(
            move || Ok(fake),
            tokenizer(),
            EngineOptions { queue_capacity: queue, ..EngineOptions::default() },
        )
        .expect("engine"),
        calls,
    )
}

pub(super) fn engine(slots: usize, queue: usize, delay: Duration) -> (Engine, Arc<Mutex<Vec<Call>>>) {
    engine_over(Fake::new(slots, 64, delay, 0), queue)
}

/// Decode steps the fake has run.
fn steps(calls: &Mutex<Vec<Call>>) -> usize {
    calls.lock().expect("calls").iter().filter(|c| matches!(c, Call::Step { .. })).count()
}

pub(super) fn request(prompt: &[u32], f: impl FnOnce(&mut Request)) -> Request {
    let mut r = Request { prompt: Prompt::Tokens(prompt.to_vec()), max_new_tokens: 20, ..Default::default() };
    f(&mut r);
    r
}

pub(super) fn requests() -> Vec<Request> {
    vec![
        request(&[3, 4, 5], |_| {}),
        request(&[6], |r| (r.sampling.temperature, r.sampling.seed) = (1.0, Some(11))),
        request(&[7, 8, 9, 10, 11, 12, 13], |r| r.max_new_tokens = 5),
        request(&[14, 15], |r| {
            (r.sampling.temperature, r.sampling.top_p, r.sampling.seed) = (0.8, 0.9, Some(5));
            r.ignore_eos = true;
            r.max_new_tokens = 30;
        }),
        request(&[16, 3, 16], |r| (r.sampling.repetition_penalty, r.sampling.top_logprobs) = (1.3, 3)),
        request(&[20, 21, 22, 23], |r| {
            (r.sampling.temperature, r.sampling.top_k, r.sampling.min_p, r.sampling.seed) = (1.2, 8, 0.1, Some(99));
            r.ignore_eos = true;
        }),
    ]
}

#[test]
fn batching_is_invisible() {
    let alone: Vec<Output> = requests()
        .into_iter()
        .map(|r| {
            let (e, _) = engine(3, 8, Duration::ZERO);
            e.submit(r).expect("submit").collect().expect("output")
        })
        .collect();
    assert!(alone.iter().any(|o| o.token_ids.len() >= 20), "some requests run long");
    // Three slots for six staggered requests: some wait, slots are reused and moved.
    let (e, _) = engine(3, 8, Duration::from_millis(1));
    let mut running = Vec::new();
    for r in requests() {
        running.push(e.submit(r).expect("submit"));
        std::thread::sleep(Duration::from_millis(3));
    }
    for (i, (g, want)) in running.into_iter().zip(&alone).enumerate() {
        let got = g.collect().expect("output");
        assert_eq!(got.token_ids, want.token_ids, "request {i}");
        assert_eq!(got.text, want.text, "request {i}");
        let reason = |o: &Output| o.summary.as_ref().expect("summary").finish_reason.clone();
        assert_eq!(reason(&got), reason(want), "request {i}");
    }
}

#[test]
fn cancellation_frees_the_slot_within_one_step() {
    let (e, calls) = engine(1, 8, Duration::from_millis(5));
    let long = e.submit(request(&[3], |r| (r.max_new_tokens, r.ignore_eos) = (10_000, true))).expect("submit");
    let Event::Token(_) = long.events.recv().expect("first token") else { panic!("expected a token") };
    let waiting = e.submit(request(&[4], |r| r.max_new_tokens = 1)).expect("submit");
    long.cancel.cancel();
    let at_cancel = steps(&calls);
    let reason = loop {
        match long.events.recv().expect("event") {
            Event::Finished(s) => break s.finish_reason,
            Event::Token(_) | Event::Text(_) => {}
            Event::Failed(err) => panic!("{err}"),
        }
    };
    assert_eq!(reason, FinishReason::Cancelled);
    assert!(steps(&calls) <= at_cancel + 1, "at most the step already running");
    let out = waiting.collect().expect("the waiting request gets the slot");
    assert_eq!(out.token_ids.len(), 1);
}

#[test]
fn dropping_the_receiver_cancels() {
    let (e, calls) = engine(1, 8, Duration::from_millis(2));
    let g = e.submit(request(&[3], |r| (r.max_new_tokens, r.ignore_eos) = (10_000, true))).expect("submit");
    g.events.recv().expect("first event");
    drop(g);
    let out = e.submit(request(&[4], |r| r.max_new_tokens = 2)).expect("submit").collect().expect("output");
    assert_eq!(out.token_ids.len(), 2);
    assert!(steps(&calls) < 100, "the dropped request did not run to its limit");
}

#[test]
fn a_full_queue_refuses_with_overloaded() {
    let (e, _) = engine(1, 2, Duration::from_millis(20));
    let long = |_| request(&[3], |r| (r.max_new_tokens, r.ignore_eos) = (1_000, true));
    // The first request holds the slot once its first token is out; two more fill the queue.
    let first = e.submit(long(0)).expect("the slot is free");
    let Event::Token(_) = first.events.recv().expect("first token") else { panic!("expected a token") };
    let results: Vec<Result<Generation, EngineError>> = (1..4).map(|i| e.submit(long(i))).collect();
    assert!(results[0].is_ok() && results[1].is_ok(), "two requests fit the queue");
    match &results[2] {
        Err(err @ EngineError::Overloaded { capacity: 2, .. }) => assert_eq!(err.kind(), "overloaded"),
        Err(err) => panic!("expected overloaded, got {err}"),
        Ok(_) => panic!("a fourth request fit a queue of two behind one slot"),
    }
    first.cancel.cancel();
    for g in results.into_iter().flatten() {
        g.cancel.cancel();
    }
}

#[test]
fn prompt_longer_than_the_context_fails_unless_truncated() {
    let (e, _) = engine(1, 2, Duration::ZERO);
    let prompt: Vec<u32> = (0..80).map(|i| 3 + i % 20).collect();
    let err = e.submit(request(&prompt, |_| {})).err().expect("refused");
    assert_eq!(err, EngineError::PromptTooLong { tokens: 80, context: 64 });
    let out = e
        .submit(request(&prompt, |r| (r.truncate_prompt, r.max_new_tokens, r.ignore_eos) = (true, 4, true)))
        .expect("truncated")
        .collect()
        .expect("output");
    assert_eq!(out.summary.expect("summary").prompt_tokens, 60, "64 positions minus room for 4 tokens");
    let alone = e
        .submit(request(&prompt[20..], |r| (r.max_new_tokens, r.ignore_eos) = (4, true)))
        .expect("submit")
        .collect()
        .expect("output");
    assert_eq!(out.token_ids, alone.token_ids, "truncation keeps the end of the prompt");
}

#[test]
fn a_stop_string_across_tokens_ends_the_text_before_it() {
    let (e, _) = engine(1, 2, Duration::ZERO);
    let base = request(&[5, 6], |r| (r.max_new_tokens, r.ignore_eos) = (12, true));
    let full = e.submit(base.clone()).expect("submit").collect().expect("output");
    // Words are two letters joined by spaces: "xy zw ..."; stop on the last letter of the
    // fourth word, the space and the first letter of the fifth.
    let cut = full.text.char_indices().filter(|(_, c)| *c == ' ').nth(3).expect("five words").0;
    let stop = full.text[cut - 1..cut + 2].to_string();
    let first = full.text.find(&stop).expect("present");
    let stopped = Request { stop_strings: vec![stop.clone()], ..base };
    let g = e.submit(stopped).expect("submit");
    let mut text = String::new();
    let mut reason = None;
    for event in g.events {
        match event {
            Event::Text(t) => text.push_str(&t),
            Event::Finished(s) => reason = Some(s.finish_reason),
            _ => {}
        }
    }
    assert_eq!(text, full.text[..first], "text up to the stop string, nothing of it");
    assert_eq!(reason, Some(FinishReason::StopString(stop)));
}

#[test]
fn bad_requests_name_their_field() {
    let (e, _) = engine(1, 2, Duration::ZERO);
    let err = |r: Request| e.submit(r).err().expect("refused");
    assert!(matches!(
        err(request(&[3], |r| r.max_new_tokens = 0)),
        EngineError::InvalidRequest { field: "max_new_tokens", .. }
    ));
    assert!(matches!(
        err(request(&[3], |r| r.sampling.min_p = 2.0)),
        EngineError::InvalidRequest { field: "min_p", .. }
    ));
    assert!(matches!(err(request(&[999], |_| {})), EngineError::InvalidRequest { field: "prompt", .. }));
    assert!(matches!(err(request(&[], |_| {})), EngineError::InvalidRequest { field: "prompt", .. }));
    assert!(matches!(
        err(request(&[3], |r| r.stop_strings = vec![String::new()])),
        EngineError::InvalidRequest { field: "stop_strings", .. }
    ));
    assert!(matches!(
        err(request(&[3], |r| r.stop_token_ids = vec![VOCAB as u32])),
        EngineError::InvalidRequest { field: "stop_token_ids", .. }
    ));
    let chat = Request {
        prompt: Prompt::Chat(vec![Message { role: "user".into(), content: "hi".into() }]),
        ..Default::default()
    };
    assert!(matches!(err(chat), EngineError::InvalidRequest { field: "messages", .. }), "no chat template");
}

/// An engine whose draft model is a fake with `salt` (0: it agrees with the target).
fn engine_with_draft(slots: usize, salt: u64) -> Engine {
    let fake = move |salt| Fake::new(slots, 64, Duration::ZERO, salt);
    let draft: OpenDraft = Box::new(move || Ok(Box::new(fake(salt)) as Box<dyn Forward>));
    Engine::start_with_draft(
        move || Ok(fake(0)),
        Some(draft),
        tokenizer(),
        EngineOptions { queue_capacity: 16, ..EngineOptions::default() },
    )
    .expect("engine")
}

fn speculative(method: DraftMethod, draft_tokens: usize) -> Option<Speculation> {
    Some(Speculation { method, draft_tokens })
}

#[test]
fn speculative_greedy_output_equals_plain_decoding() {
    let plain = engine(1, 8, Duration::ZERO).0;
    // Prompts with repeats, so prompt lookup finds n-grams.
    let prompts: [&[u32]; 3] = [&[3, 4, 5, 3, 4, 5, 3, 4], &[7], &[9, 10, 9, 10, 9]];
    for (salt, what) in [(0, "a perfect draft"), (99, "a bad draft")] {
        let e = engine_with_draft(1, salt);
        for prompt in prompts {
            let base = request(prompt, |r| (r.max_new_tokens, r.ignore_eos) = (40, true));
            let want = plain.submit(base.clone()).expect("submit").collect().expect("plain");
            for method in [DraftMethod::Model, DraftMethod::PromptLookup] {
                for k in [0, 1, 4, 8] {
                    let mut r = base.clone();
                    r.speculative = speculative(method, k);
                    let got = e.submit(r).expect("submit").collect().expect("speculative");
                    assert_eq!(got.token_ids, want.token_ids, "{what}, {method:?}, K = {k}, prompt {prompt:?}");
                    assert_eq!(got.text, want.text);
                    let stats = got.summary.expect("summary").speculative.expect("stats");
                    assert_eq!(stats.steps + stats.accepted + 1, 40, "every token is a prefill, accepted or step token: {what}, {method:?}, K = {k}, {prompt:?}, {stats:?}");
                    if method == DraftMethod::Model && salt == 0 && k > 0 {
                        assert_eq!(stats.accepted, stats.drafted, "a perfect draft is always accepted");
                    }
                }
            }
        }
    }
}

#[test]
fn speculative_and_plain_sequences_share_the_batch() {
    // Staggered mixes of plain and speculative requests in three slots (slots are reused and
    // moved across the plain/speculative boundary) give what each gives alone.
    let mixed = || {
        let mut rs = requests();
        for (i, r) in rs.iter_mut().enumerate() {
            if i % 2 == 0 {
                let method = if i % 4 == 0 { DraftMethod::Model } else { DraftMethod::PromptLookup };
                r.speculative = speculative(method, i % 3 * 3);
            }
        }
        rs
    };
    let alone: Vec<Output> = mixed()
        .into_iter()
        .map(|r| engine_with_draft(3, 7).submit(r).expect("submit").collect().expect("output"))
        .collect();
    for _ in 0..3 {
        let e = engine_with_draft(3, 7);
        let running: Vec<Generation> = mixed().into_iter().map(|r| e.submit(r).expect("submit")).collect();
        for (i, (g, want)) in running.into_iter().zip(&alone).enumerate() {
            let got = g.collect().expect("output");
            assert_eq!(got.token_ids, want.token_ids, "request {i}");
            assert_eq!(got.text, want.text, "request {i}");
        }
    }
}

#[test]
fn a_speculative_request_needs_a_draft_model_when_it_names_one() {
    let (e, _) = engine(1, 2, Duration::ZERO);
    let r = request(&[3], |r| r.speculative = speculative(DraftMethod::Model, 4));
    let err = e.submit(r).err().expect("refused");
    assert!(matches!(err, EngineError::InvalidRequest { field: "speculative.drafter", .. }), "{err}");
    let r = request(&[3], |r| r.speculative = speculative(DraftMethod::PromptLookup, 17));
    let err = e.submit(r).err().expect("refused");
    assert!(matches!(err, EngineError::InvalidRequest { field: "speculative.draft_tokens", .. }), "{err}");
}

/// A prompt of `n` tokens (ids 3.. cycling through the vocabulary).
fn long_prompt(n: usize) -> Vec<u32> {
    (0..n).map(|i| 3 + (i * 7 % (VOCAB - 3)) as u32).collect()
}

/// An engine over a fake with `slots` slots of 4096 positions, and the fake's call log.
fn long_context_engine(slots: usize, delay: Duration) -> (Engine, Arc<Mutex<Vec<Call>>>) {
    engine_over(Fake::new(slots, 4096, delay, 0), 8)
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_between_decode_steps() {
    let prompt = long_prompt(3 * PREFILL_CHUNK + 10);
    let (e, calls) = long_context_engine(2, Duration::ZERO);
    let alone = e.submit(request(&prompt, |r| r.max_new_tokens = 4)).expect("submit").collect().expect("output");
    let chunks: Vec<Call> = calls.lock().expect("calls").clone();
    let want: Vec<Call> = (0..4)
        .map(|c| Call::Extend { slot: 0, past: c * PREFILL_CHUNK, len: if c < 3 { PREFILL_CHUNK } else { 10 } })
        .collect();
    assert_eq!(chunks[..4], want[..], "alone: four chunks back to back");

    let (e, calls) = long_context_engine(2, Duration::from_millis(1));
    let running = e.submit(request(&[5, 6], |r| (r.max_new_tokens, r.ignore_eos) = (2000, true))).expect("submit");
    let Event::Token(_) = running.events.recv().expect("first token") else { panic!("expected a token") };
    let long = e.submit(request(&prompt, |r| r.max_new_tokens = 4)).expect("submit").collect().expect("output");
    assert_eq!(long.token_ids, alone.token_ids, "chunks between steps give the same tokens");
    let log = calls.lock().expect("calls").clone();
    let first = log.iter().position(|c| matches!(c, Call::Extend { slot: 1, past: 0, .. })).expect("long prefill");
    let between: Vec<Call> = log[first..first + 7].to_vec();
    let step = Call::Step { rows: 1 };
    let chunk = |c: usize, len| Call::Extend { slot: 1, past: c * PREFILL_CHUNK, len };
    let want =
        [chunk(0, PREFILL_CHUNK), step, chunk(1, PREFILL_CHUNK), step, chunk(2, PREFILL_CHUNK), step, chunk(3, 10)];
    assert_eq!(between, want, "the running sequence decodes between the chunks");
    running.cancel.cancel();
}

#[test]
fn cancelling_during_a_chunked_prefill_frees_the_slot_and_keeps_the_others() {
    // A plain sequence holds slot 0 and a speculative one slot 1; a long plain request moves
    // the speculative one to slot 2 to prefill in slot 1 (the plain one decoding between its
    // chunks), is cancelled half way, and the speculative sequence's cache must come back.
    let plain = || request(&[8, 9], |r| (r.max_new_tokens, r.ignore_eos) = (40, true));
    let spec = || {
        request(&[5, 6, 7, 5, 6], |r| {
            (r.max_new_tokens, r.ignore_eos, r.speculative) = (40, true, speculative(DraftMethod::PromptLookup, 3))
        })
    };
    let (e, _) = long_context_engine(3, Duration::ZERO);
    let alone = [plain(), spec()].map(|r| e.submit(r).expect("submit").collect().expect("output"));

    let (e, calls) = long_context_engine(3, Duration::from_millis(5));
    let running = [plain(), spec()].map(|r| e.submit(r).expect("submit"));
    let first = running.each_ref().map(|g| match g.events.recv().expect("first token") {
        Event::Token(c) => c.id,
        other => panic!("expected a token, got {other:?}"),
    });
    let long = e.submit(request(&long_prompt(15 * PREFILL_CHUNK), |r| r.max_new_tokens = 4)).expect("submit");
    let chunks =
        || calls.lock().expect("calls").iter().filter(|c| matches!(c, Call::Extend { len: PREFILL_CHUNK, .. })).count();
    while chunks() == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    long.cancel.cancel();
    let ended = long.collect().expect("a cancelled prefill ends");
    assert_eq!(ended.token_ids, Vec::<u32>::new());
    assert_eq!(ended.summary.expect("summary").finish_reason, FinishReason::Cancelled);
    assert!(chunks() < 15, "the prefill stopped at the cancel ({} of 15 chunks ran)", chunks());
    for (i, (g, want)) in running.into_iter().zip(&alone).enumerate() {
        let rest = g.collect().expect("output").token_ids;
        assert_eq!([&[first[i]], &rest[..]].concat(), want.token_ids, "sequence {i}");
    }
    let out = e.submit(request(&[9], |r| r.max_new_tokens = 2)).expect("submit").collect().expect("output");
    assert_eq!(out.token_ids.len(), 2, "the slot is free again");
}
