//! `kiln bench --paged`: what the paged KV cache buys on the CPU.
//!
//! - Prefix caching: time to first token of a request that shares a 1500-token prefix with
//!   an earlier one, with the prefix cache and without it.
//! - Memory: at the KV memory that 8 contiguous slots of 2048 positions take, a workload of
//!   requests of 64-512 total tokens all submitted at once, run by the contiguous layout (8
//!   slots) and by the paged pool of the same bytes (up to 64 sequences): the most sequences
//!   running at once, and aggregate generated tokens per second.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{prompt_tokens, BenchError};
use crate::engine::{artifact_tokenizer, Engine, EngineOptions, Prompt, Request};
use crate::onnx::manifest::Manifest;
use crate::runtime::{ServingDecoder, SessionOptions, BLOCK_SIZE};

/// Tokens the two requests of the prefix measurement share.
pub const SHARED_PREFIX: usize = 1500;
/// Slots and positions per slot of the contiguous layout whose memory the workload gets.
pub const CONTIGUOUS_SLOTS: usize = 8;
/// Positions per contiguous slot.
pub const CONTIGUOUS_CONTEXT: usize = 2048;
/// Most sequences the paged engine runs at once.
pub const PAGED_SEQUENCES: usize = 64;
/// Requests in the memory workload.
pub const WORKLOAD_REQUESTS: usize = 64;

/// The figures.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PagedReport {
    /// TTFT of the second request without the prefix cache, seconds (median of rounds).
    pub ttft_uncached_s: f64,
    /// TTFT of the second request with the prefix cache, seconds (median of rounds).
    pub ttft_cached_s: f64,
    /// Prompt tokens the cached request reused.
    pub cached_prompt_tokens: usize,
    /// KV memory of the workload, bytes.
    pub kv_bytes: usize,
    /// Most sequences running at once, contiguous and paged.
    pub peak_sequences: (usize, usize),
    /// Aggregate generated tokens per second, contiguous and paged.
    pub tokens_per_s: (f64, f64),
    /// Sequences the paged run preempted.
    pub preemptions: usize,
}

/// Measures the artifact in `dir` with `threads` intra-op threads, `rounds` rounds of the
/// prefix measurement.
pub fn bench_paged(dir: &Path, threads: usize, rounds: usize) -> Result<PagedReport, BenchError> {
    let m = Manifest::read(dir).map_err(|e| e.to_string())?;
    let session = SessionOptions { intra_threads: threads, ..Default::default() };
    let tokens = prompt_tokens(dir, &m, SHARED_PREFIX + 64)?;
    let start = |slots: usize, context: usize, blocks: Option<usize>, session: &SessionOptions, prefix_cache| {
        let (d, s) = (dir.to_path_buf(), session.clone());
        let tokenizer = artifact_tokenizer(dir, &m).map_err(|e| e.to_string())?;
        let open = move || match blocks {
            Some(b) => ServingDecoder::open_pool(&d, &s, slots, context, b),
            None => ServingDecoder::open(&d, &s, slots, context),
        };
        Engine::start(open, tokenizer, EngineOptions { queue_capacity: 256, prefix_cache }).map_err(|e| e.to_string())
    };

    // Prefix: the first request fills the cache, the second (another ending) reuses it.
    let context = SHARED_PREFIX + 64;
    let (mut uncached, mut cached, mut reused) = (Vec::new(), Vec::new(), 0);
    for prefix_cache in [false, true] {
        let e = start(1, context, None, &session, prefix_cache)?;
        for round in 0..rounds.max(1) {
            // Each round its own prefix (shifted by a token), so only the first request of
            // the round can have filled the cache.
            let prefix = &tokens[round..round + SHARED_PREFIX];
            for (i, ending) in [[11u32, 12, 13, 14], [21, 22, 23, 24]].iter().enumerate() {
                let mut prompt = prefix.to_vec();
                prompt.extend(ending);
                let r = Request { prompt: Prompt::Tokens(prompt), max_new_tokens: 1, ..Default::default() };
                let s = e.submit(r).map_err(|e| e.to_string())?.collect().map_err(|e| e.to_string())?;
                let s = s.summary.ok_or("no summary")?;
                if i == 1 {
                    let ttft = s.time_to_first_token.as_secs_f64();
                    if prefix_cache {
                        cached.push(ttft);
                        reused = s.cached_prompt_tokens;
                    } else {
                        uncached.push(ttft);
                    }
                }
            }
        }
    }

    // Memory: the same bytes as 8 × 2048 contiguous positions.
    let block_bytes = ServingDecoder::block_bytes(&m, &session);
    let blocks = CONTIGUOUS_SLOTS * CONTIGUOUS_CONTEXT / BLOCK_SIZE;
    let contiguous = SessionOptions { contiguous_kv: true, ..session.clone() };
    let e = start(CONTIGUOUS_SLOTS, CONTIGUOUS_CONTEXT, None, &contiguous, false)?;
    let (peak_c, tps_c) = workload(&e, &tokens)?;
    drop(e);
    let e = start(PAGED_SEQUENCES, CONTIGUOUS_CONTEXT, Some(blocks), &session, false)?;
    let (peak_p, tps_p) = workload(&e, &tokens)?;
    Ok(PagedReport {
        ttft_uncached_s: super::median(&mut uncached),
        ttft_cached_s: super::median(&mut cached),
        cached_prompt_tokens: reused,
        kv_bytes: blocks * block_bytes,
        peak_sequences: (peak_c, peak_p),
        tokens_per_s: (tps_c, tps_p),
        preemptions: e.load().preemptions,
    })
}

/// [`WORKLOAD_REQUESTS`] requests of 64-512 total tokens (prompts of 32-256 tokens, as many
/// generated), submitted at once; returns the most running at once and the aggregate
/// generated tokens per second.
fn workload(e: &Engine, tokens: &[u32]) -> Result<(usize, f64), BenchError> {
    let t = Instant::now();
    let mut generations = Vec::new();
    for i in 0..WORKLOAD_REQUESTS {
        // Lengths spread over the range by a fixed stride.
        let half = 32 + (i * 37) % 225;
        let at = (i * 13) % (tokens.len() - half);
        let r = Request {
            prompt: Prompt::Tokens(tokens[at..at + half].to_vec()),
            max_new_tokens: half,
            ignore_eos: true,
            ..Default::default()
        };
        generations.push(e.submit(r).map_err(|e| e.to_string())?);
    }
    let mut peak = 0;
    let mut generated = 0;
    for g in generations {
        loop {
            match g.events.recv_timeout(Duration::from_millis(5)) {
                Ok(crate::engine::Event::Finished(s)) => {
                    generated += s.generated_tokens;
                    break;
                }
                Ok(crate::engine::Event::Failed(err)) => return Err(err.to_string()),
                Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => peak = peak.max(e.load().running),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err("the engine stopped".into()),
            }
        }
    }
    Ok((peak, generated as f64 / t.elapsed().as_secs_f64()))
}

/// The report as a table.
pub fn render(r: &PagedReport) -> String {
    let mib = r.kv_bytes as f64 / f64::from(1 << 20);
    format!(
        "prefix cache: TTFT after a shared {SHARED_PREFIX}-token prefix: {:.1} ms uncached, {:.1} ms cached \
         ({} tokens reused): {:.1}x lower\n\
         KV memory {mib:.0} MiB ({CONTIGUOUS_SLOTS} contiguous slots of {CONTIGUOUS_CONTEXT}), \
         {WORKLOAD_REQUESTS} requests of 64-512 tokens:\n\
         \x20 contiguous: {} sequences at once, {:.1} tokens/s\n\
         \x20 paged:      {} sequences at once, {:.1} tokens/s ({} preemptions)\n\
         \x20 ratio:      {:.2}x sequences, {:.2}x tokens/s\n",
        r.ttft_uncached_s * 1e3,
        r.ttft_cached_s * 1e3,
        r.cached_prompt_tokens,
        r.ttft_uncached_s / r.ttft_cached_s,
        r.peak_sequences.0,
        r.tokens_per_s.0,
        r.peak_sequences.1,
        r.tokens_per_s.1,
        r.preemptions,
        r.peak_sequences.1 as f64 / r.peak_sequences.0.max(1) as f64,
        r.tokens_per_s.1 / r.tokens_per_s.0,
    )
}
