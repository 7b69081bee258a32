//! The scheduler over a fake paged model: each position's token is stored in the pool cell
//! its slot's block table names, and the logits hash the tokens read back through the
//! table. A block handed to two sequences, a table not bound, a reused block that holds
//! other tokens or a recompute that skips a position all change the output.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ndarray::Array2;

use super::super::tests::{engine, logits, request, requests, tokenizer, Call, VOCAB};
use super::super::*;
use crate::runtime::KvPool;

struct PagedFake {
    /// The token in each cell of each block (`None`: never written).
    cells: Vec<Option<u32>>,
    block: usize,
    tables: Vec<Vec<u32>>,
    context: usize,
    delay: Duration,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl PagedFake {
    fn new(slots: usize, blocks: usize, block: usize, delay: Duration) -> Self {
        PagedFake {
            cells: vec![None; blocks * block],
            block,
            tables: vec![Vec::new(); slots],
            context: 64,
            delay,
            calls: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn cell(&self, slot: usize, pos: usize) -> usize {
        let table = &self.tables[slot];
        let block = *table.get(pos / self.block).unwrap_or_else(|| panic!("slot {slot} has no block for {pos}"));
        block as usize * self.block + pos % self.block
    }

    /// Writes `token` at `slot`'s position `pos`; returns the logits after it.
    fn put(&mut self, slot: usize, pos: usize, token: u32) -> Vec<f32> {
        let at = self.cell(slot, pos);
        self.cells[at] = Some(token);
        let history: Vec<u32> = (0..=pos)
            .map(|p| self.cells[self.cell(slot, p)].unwrap_or_else(|| panic!("slot {slot} reads unwritten {p}")))
            .collect();
        logits(&history, 0)
    }
}

impl Forward for PagedFake {
    fn slots(&self) -> usize {
        self.tables.len()
    }

    fn max_context(&self) -> usize {
        self.context
    }

    fn vocab_size(&self) -> usize {
        VOCAB
    }

    fn extend(&mut self, slot: usize, past: usize, tokens: &[u32], last: usize) -> Result<Array2<f32>, RuntimeError> {
        self.calls.lock().expect("calls").push(Call::Extend { slot, past, len: tokens.len() });
        let mut rows = Vec::new();
        for (i, &t) in tokens.iter().enumerate() {
            let l = self.put(slot, past + i, t);
            if i + last >= tokens.len() {
                rows.extend(l);
            }
        }
        Ok(Array2::from_shape_vec((last, VOCAB), rows).expect("rows"))
    }

    fn step(&mut self, rows: &[(u32, usize)]) -> Result<Array2<f32>, RuntimeError> {
        std::thread::sleep(self.delay);
        self.calls.lock().expect("calls").push(Call::Step { rows: rows.len() });
        let out: Vec<f32> = rows.iter().enumerate().flat_map(|(slot, &(t, past))| self.put(slot, past, t)).collect();
        Ok(Array2::from_shape_vec((rows.len(), VOCAB), out).expect("rows"))
    }

    fn move_slot(&mut self, from: usize, to: usize, _len: usize) -> Result<(), RuntimeError> {
        self.tables.swap(from, to);
        Ok(())
    }

    fn kv_pool(&self) -> Option<KvPool> {
        Some(KvPool { blocks: self.cells.len() / self.block, block_size: self.block, block_bytes: 1 << 10 })
    }

    fn bind_blocks(&mut self, slot: usize, blocks: &[u32]) -> Result<(), RuntimeError> {
        self.tables[slot] = blocks.to_vec();
        Ok(())
    }
}

fn paged(fake: PagedFake, prefix_cache: bool) -> (Engine, Arc<Mutex<Vec<Call>>>) {
    let calls = fake.calls.clone();
    let options = EngineOptions { queue_capacity: 32, prefix_cache };
    (Engine::start(move || Ok(fake), tokenizer(), options).expect("engine"), calls)
}

/// Each request's output on the contiguous fake, alone.
fn alone(requests: &[Request]) -> Vec<Output> {
    requests
        .iter()
        .map(|r| {
            let (e, _) = engine(1, 1, Duration::ZERO);
            e.submit(r.clone()).expect("submit").collect().expect("output")
        })
        .collect()
}

/// Waits (up to a second) for the engine to hold no KV block.
fn blocks_return(e: &Engine) -> usize {
    let start = Instant::now();
    while e.load().kv_blocks_in_use > 0 && start.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(1));
    }
    e.load().kv_blocks_in_use
}

#[test]
fn paging_is_invisible() {
    let want = alone(&requests());
    let (e, _) = paged(PagedFake::new(3, 64, 4, Duration::from_millis(1)), true);
    let mut running = Vec::new();
    for r in requests() {
        running.push(e.submit(r).expect("submit"));
        std::thread::sleep(Duration::from_millis(3));
    }
    for (i, (g, want)) in running.into_iter().zip(&want).enumerate() {
        let got = g.collect().expect("output");
        assert_eq!((&got.token_ids, &got.text), (&want.token_ids, &want.text), "request {i}");
    }
    assert_eq!(blocks_return(&e), 0);
}

#[test]
fn a_conversation_reuses_the_blocks_of_its_earlier_turns() {
    let (e, _) = paged(PagedFake::new(2, 64, 4, Duration::ZERO), true);
    let mut prompt: Vec<u32> = vec![3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
    let mut cached_before = 0;
    for turn in 0..4 {
        let r = request(&prompt, |r| (r.max_new_tokens, r.ignore_eos) = (6, true));
        let got = e.submit(r.clone()).expect("submit").collect().expect("output");
        assert_eq!(got.token_ids, alone(&[r])[0].token_ids, "turn {turn}");
        let cached = got.summary.expect("summary").cached_prompt_tokens;
        // Turn n's cache holds its whole prompt and all but the last output token: every
        // full block of that, but never the next prompt's last token.
        assert_eq!(cached, cached_before, "turn {turn}");
        prompt.extend(&got.token_ids);
        cached_before = (prompt.len() - 1) / 4 * 4;
        prompt.extend([13 + turn as u32, 14]);
        cached_before = cached_before.min((prompt.len() - 1) / 4 * 4);
    }
    assert!(cached_before >= 24, "later turns reuse most of the conversation");
    assert_eq!(blocks_return(&e), 0);
}

#[test]
fn without_the_prefix_cache_every_prompt_is_computed() {
    let (e, calls) = paged(PagedFake::new(2, 64, 4, Duration::ZERO), false);
    let prompt: Vec<u32> = (3..20).collect();
    for _ in 0..2 {
        let got = e.submit(request(&prompt, |r| r.max_new_tokens = 3)).expect("submit").collect().expect("output");
        assert_eq!(got.summary.expect("summary").cached_prompt_tokens, 0);
    }
    let prefills = calls.lock().expect("calls").iter().filter(|c| matches!(c, Call::Extend { past: 0, .. })).count();
    assert_eq!(prefills, 2);
}

/// Sixteen requests, greedy and sampled, in a pool that holds about two of them at full
/// length: sequences are preempted and recomputed, and each output is its output alone.
#[test]
fn a_small_pool_preempts_and_loses_nothing() {
    let requests: Vec<Request> = (0..16u32)
        .map(|i| {
            let prompt: Vec<u32> = (0..3 + i % 10).map(|j| 3 + (i * 5 + j * 3) % 29).collect();
            request(&prompt, |r| {
                (r.max_new_tokens, r.ignore_eos) = (30, true);
                if i % 3 == 1 {
                    (r.sampling.temperature, r.sampling.seed) = (1.0, Some(u64::from(i)));
                }
            })
        })
        .collect();
    let want = alone(&requests);
    let (e, calls) = paged(PagedFake::new(8, 24, 4, Duration::ZERO), true);
    let running: Vec<Generation> = requests.iter().map(|r| e.submit(r.clone()).expect("submit")).collect();
    for (i, (g, want)) in running.into_iter().zip(&want).enumerate() {
        let got = g.collect().unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(got.token_ids, want.token_ids, "request {i}");
        assert_eq!(got.text, want.text, "request {i}");
    }
    // A recompute feeds generated tokens: it ends past the longest prompt (12 tokens).
    let recomputes = calls
        .lock()
        .expect("calls")
        .iter()
        .filter(|c| matches!(c, Call::Extend { past, len, .. } if past + len > 12))
        .count();
    assert!(recomputes > 0, "the pool was small enough to preempt");
    assert!(e.load().preemptions > 0);
    assert_eq!(blocks_return(&e), 0);
}

#[test]
fn a_request_larger_than_the_pool_is_refused_at_submit() {
    let (e, _) = paged(PagedFake::new(2, 8, 4, Duration::ZERO), true);
    let err = e.submit(request(&[3; 10], |r| r.max_new_tokens = 30)).err().expect("refused");
    assert_eq!(err.kind(), "kv_memory");
    let EngineError::KvMemory { positions, blocks, pool_blocks, .. } = err else { panic!("{err}") };
    assert_eq!((positions, blocks, pool_blocks), (40, 10, 8));
    assert!(err.to_string().contains("40 KV positions (10 blocks"), "{err}");
    // 32 positions fit.
    let ok = e.submit(request(&[3; 10], |r| (r.max_new_tokens, r.ignore_eos) = (22, true))).expect("fits");
    assert_eq!(ok.collect().expect("output").token_ids.len(), 22);
}
