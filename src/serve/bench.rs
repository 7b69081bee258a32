//! `kiln bench --grpc ADDR`: the figures of `kiln bench` measured through a running server,
//! as a client sees them (so the difference is the gRPC overhead): time to first token of a
//! 128-token prompt, and per-stream and aggregate decode speed of concurrent greedy streams.

use std::time::Instant;

use tonic::transport::Channel;

use super::proto::generator_client::GeneratorClient;
use super::proto::{GenerateRequest, TokenizeRequest};
use crate::bench::{BENCH_SENTENCE, SHORT_PROMPT, TTFT_PROMPT};

/// Figures of one stream count.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GrpcRow {
    /// Concurrent streams.
    pub streams: usize,
    /// Median time from sending a request to its first token, seconds.
    pub median_ttft_s: f64,
    /// Mean over streams of tokens after the first per second.
    pub stream_tokens_per_s: f64,
    /// All generated tokens over the wall time of the round.
    pub aggregate_tokens_per_s: f64,
}

/// What one request saw.
struct Timed {
    ttft: f64,
    total: f64,
    tokens: usize,
}

async fn timed(mut client: GeneratorClient<Channel>, ids: Vec<u32>, tokens: u32) -> Result<Timed, String> {
    let r = GenerateRequest { token_ids: ids, max_tokens: Some(tokens), ignore_eos: true, ..Default::default() };
    let t = Instant::now();
    let mut stream = client.generate(r).await.map_err(|e| e.to_string())?.into_inner();
    let (mut ttft, mut n) = (None, 0);
    while let Some(msg) = stream.message().await.map_err(|e| e.to_string())? {
        if !msg.tokens.is_empty() && ttft.is_none() {
            ttft = Some(t.elapsed().as_secs_f64());
        }
        n += msg.tokens.len();
    }
    Ok(Timed { ttft: ttft.unwrap_or_default(), total: t.elapsed().as_secs_f64(), tokens: n })
}

/// Measures the server at `addr`: TTFT of a 128-token prompt alone, then a round of
/// `tokens`-token greedy streams per entry of `streams`.
pub fn bench_grpc(addr: &str, tokens: usize, streams: &[usize]) -> Result<(f64, Vec<GrpcRow>), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        let mut client = GeneratorClient::new(channel);
        let max = streams.iter().copied().max().unwrap_or(1);
        let text = BENCH_SENTENCE.repeat((TTFT_PROMPT + max + SHORT_PROMPT) / 8);
        let ids = client
            .tokenize(TokenizeRequest { text, add_special_tokens: false })
            .await
            .map_err(|e| e.to_string())?
            .into_inner()
            .token_ids;
        if ids.len() < TTFT_PROMPT.max(max + SHORT_PROMPT) {
            return Err(format!("the bench text gives only {} tokens", ids.len()));
        }
        let n = tokens as u32;
        // Warm-up, then TTFT alone.
        timed(client.clone(), ids[..SHORT_PROMPT].to_vec(), 4).await?;
        let ttft = timed(client.clone(), ids[..TTFT_PROMPT].to_vec(), 1).await?.ttft;
        let mut rows = Vec::new();
        for &s in streams {
            let t = Instant::now();
            let tasks: Vec<_> =
                (0..s).map(|i| tokio::spawn(timed(client.clone(), ids[i..i + SHORT_PROMPT].to_vec(), n))).collect();
            let mut seen = Vec::new();
            for task in tasks {
                seen.push(task.await.map_err(|e| e.to_string())??);
            }
            let wall = t.elapsed().as_secs_f64();
            let mut ttfts: Vec<f64> = seen.iter().map(|r| r.ttft).collect();
            ttfts.sort_by(f64::total_cmp);
            let per_stream =
                seen.iter().map(|r| (r.tokens.saturating_sub(1)) as f64 / (r.total - r.ttft)).sum::<f64>() / s as f64;
            rows.push(GrpcRow {
                streams: s,
                median_ttft_s: ttfts[ttfts.len() / 2],
                stream_tokens_per_s: per_stream,
                aggregate_tokens_per_s: seen.iter().map(|r| r.tokens).sum::<usize>() as f64 / wall,
            });
        }
        Ok((ttft, rows))
    })
}

/// The rows as a Markdown table.
pub fn render(ttft: f64, rows: &[GrpcRow]) -> String {
    let mut out = format!("TTFT of a {TTFT_PROMPT}-token prompt over gRPC: {:.0} ms\n\n", ttft * 1e3);
    out.push_str("| streams | median TTFT ms | tok/s per stream | aggregate tok/s |\n|---|---|---|---|\n");
    for r in rows {
        out.push_str(&format!(
            "| {} | {:.0} | {:.1} | {:.1} |\n",
            r.streams,
            r.median_ttft_s * 1e3,
            r.stream_tokens_per_s,
            r.aggregate_tokens_per_s
        ));
    }
    out
}
