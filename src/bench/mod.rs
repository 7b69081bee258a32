//! `kiln bench`: what people compare precisions by. One artifact per process (so peak memory
//! is its own): weights size, peak resident memory, time to first token, prefill speed,
//! decode speed at short and at long context, and aggregate decode throughput of concurrent
//! streams through the engine.

pub mod constrained;
pub mod paged;
pub mod speculative;
pub mod workload;

use std::path::Path;
use std::time::{Duration, Instant};

use crate::engine::{artifact_tokenizer, Engine, EngineOptions, Prompt, Request};
use crate::model::reference::argmax;
use crate::onnx::manifest::{self, Manifest};
use crate::runtime::{Forward, KvCache, ServingDecoder, SessionOptions};

/// What to measure (`kiln bench` hands it to each artifact's process as JSON).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BenchOptions {
    /// Tokens generated per decode measurement and per stream.
    pub tokens: usize,
    /// Context length of the long-context decode measurement.
    pub long_context: usize,
    /// Concurrent stream counts.
    pub streams: Vec<usize>,
    /// ONNX Runtime intra-op threads (0: one per core).
    pub threads: usize,
    /// MatMulNBits accuracy level (None: ONNX Runtime's default, 4).
    pub accuracy_level: Option<u8>,
    /// KV cache element type (None: the artifact's default).
    pub kv_cache: Option<KvCache>,
    /// Contiguous KV cache instead of the CPU's paged one.
    pub contiguous_kv: bool,
    /// Rounds of every measurement; the row reports medians.
    pub repeat: usize,
}

/// Prompt length of the time-to-first-token measurement.
pub const TTFT_PROMPT: usize = 128;
/// Prompt length of the prefill throughput measurement.
pub const PREFILL_PROMPT: usize = 512;
/// Prompt length of the short-context decode measurement and of each stream.
pub const SHORT_PROMPT: usize = 16;

/// One artifact's figures.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BenchRow {
    /// Artifact name.
    pub name: String,
    /// Bytes of `model.onnx.data`.
    pub weight_bytes: u64,
    /// KV cache element type and layout ("f16 paged", "f32 contiguous").
    pub kv_cache: String,
    /// Peak resident memory of the process after the single-stream measurements.
    pub peak_rss_bytes: u64,
    /// Time to first token for a 128-token prompt, seconds.
    pub ttft_s: f64,
    /// Prefill tokens per second over a 512-token prompt.
    pub prefill_tokens_per_s: f64,
    /// Decode tokens per second after a 16-token prompt.
    pub decode_tokens_per_s: f64,
    /// Decode tokens per second after a `long_context`-token prompt.
    pub decode_long_tokens_per_s: f64,
    /// The long context used.
    pub long_context: usize,
    /// Median over rounds of long-context over short-context decode speed, each pair
    /// measured back to back.
    pub long_context_ratio: f64,
    /// Rounds measured; every figure is the median of its rounds.
    pub rounds: usize,
    /// (streams, aggregate generated tokens per second).
    pub streams: Vec<(usize, f64)>,
}

/// Errors as text: bench reports and moves on.
pub type BenchError = String;

/// Measures the artifact in `dir`.
pub fn bench_artifact(dir: &Path, opts: &BenchOptions) -> Result<BenchRow, BenchError> {
    let m = Manifest::read(dir).map_err(|e| e.to_string())?;
    let weight_bytes = std::fs::metadata(dir.join(manifest::DATA_FILE)).map_err(|e| e.to_string())?.len();
    let session = SessionOptions {
        intra_threads: opts.threads,
        matmul_accuracy_level: opts.accuracy_level,
        kv_cache: opts.kv_cache,
        contiguous_kv: opts.contiguous_kv,
        ..Default::default()
    };
    let tokens = prompt_tokens(dir, &m, opts.long_context.max(PREFILL_PROMPT))?;
    // Room for the longest prompt measured and the tokens generated after it.
    let longest = opts.long_context.max(PREFILL_PROMPT).max(SHORT_PROMPT);
    let context = longest + opts.tokens + 1;
    if context > m.max_context {
        return Err(format!("a {longest}-token prompt + {} tokens exceeds max_context {}", opts.tokens, m.max_context));
    }
    let mut dec = ServingDecoder::open(dir, &session, 1, context).map_err(|e| e.to_string())?;
    let kv_cache =
        format!("{} {}", dec.kv_cache().name(), if dec.kv_pool().is_some() { "paged" } else { "contiguous" });
    let err = |e: crate::runtime::RuntimeError| e.to_string();

    // Warm-up: the first runs allocate ONNX Runtime's buffers.
    dec.extend(0, 0, &tokens[..SHORT_PROMPT], 1).map_err(err)?;
    greedy_steps(&mut dec, SHORT_PROMPT, 4)?;

    // Rounds interleave the measurements, so a drift of the machine's speed moves every
    // figure of a round alike and the short/long ratio is taken within one round.
    let rounds = opts.repeat.max(1);
    let (mut ttft, mut prefill, mut short, mut long, mut ratio) = (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        let t = Instant::now();
        dec.extend(0, 0, &tokens[..TTFT_PROMPT], 1).map_err(err)?;
        ttft.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        dec.extend(0, 0, &tokens[..PREFILL_PROMPT], 1).map_err(err)?;
        prefill.push(PREFILL_PROMPT as f64 / t.elapsed().as_secs_f64());
        dec.extend(0, 0, &tokens[..SHORT_PROMPT], 1).map_err(err)?;
        let s = opts.tokens as f64 / greedy_steps(&mut dec, SHORT_PROMPT, opts.tokens)?.as_secs_f64();
        dec.extend(0, 0, &tokens[..opts.long_context], 1).map_err(err)?;
        let l = opts.tokens as f64 / greedy_steps(&mut dec, opts.long_context, opts.tokens)?.as_secs_f64();
        short.push(s);
        long.push(l);
        ratio.push(l / s);
    }
    let peak_rss_bytes = peak_rss();
    drop(dec);

    let max_streams = opts.streams.iter().copied().max().unwrap_or(1).max(1);
    let tokenizer = artifact_tokenizer(dir, &m).map_err(|e| e.to_string())?;
    let stream_context = SHORT_PROMPT + opts.tokens + 1;
    let d = dir.to_path_buf();
    let engine = Engine::start(
        move || ServingDecoder::open(&d, &session, max_streams, stream_context),
        tokenizer,
        EngineOptions { queue_capacity: max_streams, ..EngineOptions::default() },
    )
    .map_err(|e| e.to_string())?;
    let mut aggregate = vec![Vec::with_capacity(rounds); opts.streams.len()];
    for _ in 0..rounds {
        for (&n, figures) in opts.streams.iter().zip(&mut aggregate) {
            figures.push(streams_tokens_per_s(&engine, &tokens, n, opts.tokens)?);
        }
    }
    let streams = opts.streams.iter().zip(&mut aggregate).map(|(&n, f)| (n, median(f))).collect();
    Ok(BenchRow {
        name: m.name.clone(),
        weight_bytes,
        kv_cache,
        peak_rss_bytes,
        ttft_s: median(&mut ttft),
        prefill_tokens_per_s: median(&mut prefill),
        decode_tokens_per_s: median(&mut short),
        decode_long_tokens_per_s: median(&mut long),
        long_context: opts.long_context,
        long_context_ratio: median(&mut ratio),
        rounds,
        streams,
    })
}

/// Aggregate generated tokens per second of `n` concurrent greedy streams of `tokens` each.
fn streams_tokens_per_s(engine: &Engine, prompts: &[u32], n: usize, tokens: usize) -> Result<f64, BenchError> {
    let t = Instant::now();
    let running: Vec<_> = (0..n)
        .map(|i| {
            let r = Request {
                prompt: Prompt::Tokens(prompts[i..i + SHORT_PROMPT].to_vec()),
                max_new_tokens: tokens,
                ignore_eos: true,
                ..Default::default()
            };
            engine.submit(r).map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    let mut generated = 0;
    for g in running {
        generated += g.collect().map_err(|e| e.to_string())?.token_ids.len();
    }
    Ok(generated as f64 / t.elapsed().as_secs_f64())
}

/// The median of `values` (the mean of the middle two for an even count); 0 when empty.
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The sentence bench prompts repeat (a little over 8 tokens per repetition).
pub const BENCH_SENTENCE: &str =
    "The old lighthouse keeper climbed the spiral stairs each evening, counting the steps, \
                                  listening to the sea, and writing down the names of the ships that passed. ";

/// `n` token ids of a fixed English text, for prompts.
fn prompt_tokens(dir: &Path, m: &Manifest, n: usize) -> Result<Vec<u32>, BenchError> {
    let tok = artifact_tokenizer(dir, m).map_err(|e| e.to_string())?;
    let ids = tok.encode(&BENCH_SENTENCE.repeat(n / 8 + 1)).map_err(|e| e.to_string())?;
    if ids.len() < n + 16 {
        return Err(format!("the bench text gives {} tokens, {} needed", ids.len(), n + 16));
    }
    Ok(ids)
}

/// Runs `steps` greedy decode steps on slot 0 after `past` cached positions; returns the time.
fn greedy_steps(dec: &mut ServingDecoder, past: usize, steps: usize) -> Result<Duration, BenchError> {
    let mut token = 0u32;
    let t = Instant::now();
    for i in 0..steps {
        let logits = dec.step(&[(token, past + i)]).map_err(|e| e.to_string())?;
        token = argmax(logits.row(0));
    }
    Ok(t.elapsed())
}

/// Peak resident memory of this process (VmHWM), bytes; 0 where /proc is missing.
pub fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The comparison table.
pub fn render(rows: &[BenchRow]) -> String {
    let mut out = String::new();
    let streams: Vec<usize> = rows.first().map(|r| r.streams.iter().map(|s| s.0).collect()).unwrap_or_default();
    let long = rows.first().map_or(0, |r| r.long_context);
    out.push_str(&format!(
        "{:<22} {:>9} {:>14} {:>9} {:>9} {:>10} {:>9} {:>9} {:>6}",
        "artifact",
        "weights",
        "KV",
        "peak RSS",
        "TTFT",
        "prefill",
        "decode",
        format!("@{long}"),
        "ratio"
    ));
    for n in &streams {
        out.push_str(&format!(" {:>9}", format!("{n} str")));
    }
    out.push('\n');
    out.push_str(&format!(
        "{:<22} {:>9} {:>14} {:>9} {:>9} {:>10} {:>9} {:>9} {:>6}",
        "", "MB", "", "MB", "ms", "tok/s", "tok/s", "tok/s", ""
    ));
    for _ in &streams {
        out.push_str(&format!(" {:>9}", "tok/s"));
    }
    out.push('\n');
    for r in rows {
        out.push_str(&format!(
            "{:<22} {:>9.1} {:>14} {:>9.0} {:>9.1} {:>10.0} {:>9.1} {:>9.1} {:>6.2}",
            r.name,
            r.weight_bytes as f64 / 1e6,
            r.kv_cache,
            r.peak_rss_bytes as f64 / 1e6,
            r.ttft_s * 1e3,
            r.prefill_tokens_per_s,
            r.decode_tokens_per_s,
            r.decode_long_tokens_per_s,
            r.long_context_ratio
        ));
        for (_, tps) in &r.streams {
            out.push_str(&format!(" {tps:>9.1}"));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&mut [7.5]), 7.5);
        assert_eq!(median(&mut []), 0.0);
    }

    #[test]
    fn table_reports_the_measured_ratio_and_every_stream_count() {
        let row = BenchRow {
            name: "int4".into(),
            weight_bytes: 119_000_000,
            kv_cache: "f16".into(),
            peak_rss_bytes: 300_000_000,
            ttft_s: 0.2,
            prefill_tokens_per_s: 500.0,
            decode_tokens_per_s: 100.0,
            decode_long_tokens_per_s: 60.0,
            long_context: 1024,
            // Not 60 / 100: the median of per-round ratios is its own figure.
            long_context_ratio: 0.57,
            rounds: 3,
            streams: vec![(1, 90.0), (8, 270.0)],
        };
        let table = render(&[row]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].contains("@1024") && lines[0].contains("8 str"), "{table}");
        let cells: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(cells, ["int4", "119.0", "f16", "300", "200.0", "500", "100.0", "60.0", "0.57", "90.0", "270.0"]);
    }
}
