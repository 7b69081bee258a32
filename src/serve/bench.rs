//! `kiln bench --grpc ADDR [--http URL]`: the figures of `kiln bench` measured through a
//! running server, as a client sees them (so the difference is the protocol's overhead): time
//! to first token of a 128-token prompt, and per-stream and aggregate decode speed of
//! concurrent greedy streams. With `--http` every measurement is also taken through the
//! OpenAI-compatible API (streamed `/v1/completions`, one connection per request as `curl`
//! makes), alternating with gRPC, so both doors are measured in the same minutes.

use std::time::Instant;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use tonic::transport::Channel;

use super::proto::generator_client::GeneratorClient;
use super::proto::{GenerateRequest, TokenizeRequest};
use crate::bench::{BENCH_SENTENCE, SHORT_PROMPT, TTFT_PROMPT};

/// Figures of one stream count through one protocol.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClientRow {
    /// `grpc` or `http`.
    pub protocol: &'static str,
    /// Concurrent streams.
    pub streams: usize,
    /// Median time from sending a request to its first token, seconds.
    pub median_ttft_s: f64,
    /// Mean over streams of tokens after the first per second.
    pub stream_tokens_per_s: f64,
    /// All generated tokens over the wall time of the round.
    pub aggregate_tokens_per_s: f64,
}

/// Time to first token of the 128-token prompt alone, per protocol.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Ttft {
    /// `grpc` or `http`.
    pub protocol: &'static str,
    /// Seconds.
    pub ttft_s: f64,
}

/// What one request saw.
struct Timed {
    ttft: f64,
    total: f64,
    tokens: usize,
}

/// Where requests go.
#[derive(Clone)]
enum Door {
    Grpc(GeneratorClient<Channel>),
    /// `host:port` of the HTTP API.
    Http(String),
}

impl Door {
    fn protocol(&self) -> &'static str {
        match self {
            Door::Grpc(_) => "grpc",
            Door::Http(_) => "http",
        }
    }

    /// A greedy request of `tokens` tokens (EOS ignored) after prompt `ids`, timed.
    async fn timed(self, ids: Vec<u32>, tokens: u32) -> Result<Timed, String> {
        match self {
            Door::Grpc(client) => timed_grpc(client, ids, tokens).await,
            Door::Http(host) => timed_http(&host, ids, tokens).await,
        }
    }
}

async fn timed_grpc(mut client: GeneratorClient<Channel>, ids: Vec<u32>, tokens: u32) -> Result<Timed, String> {
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

/// A streamed `/v1/completions` request: the first token is the first chunk with text, the
/// count is the final chunk's usage.
async fn timed_http(host: &str, ids: Vec<u32>, tokens: u32) -> Result<Timed, String> {
    let body = serde_json::json!({
        "prompt": ids, "max_tokens": tokens, "ignore_eos": true, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true},
    });
    let fail = |e: &dyn std::fmt::Display| format!("http://{host}: {e}");
    let t = Instant::now();
    let socket = tokio::net::TcpStream::connect(host).await.map_err(|e| fail(&e))?;
    socket.set_nodelay(true).map_err(|e| fail(&e))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(socket)).await.map_err(|e| fail(&e))?;
    tokio::spawn(connection);
    let request = hyper::Request::post("/v1/completions")
        .header("host", host)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| fail(&e))?;
    let response = sender.send_request(request).await.map_err(|e| fail(&e))?;
    if !response.status().is_success() {
        return Err(fail(&response.status()));
    }
    let mut body = response.into_body();
    let (mut pending, mut ttft, mut n) = (Vec::new(), None, 0);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| fail(&e))?;
        let Some(data) = frame.data_ref() else { continue };
        pending.extend_from_slice(data);
        // Whole events only: `data: {...}\n\n`.
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            let Some(json) = event.strip_prefix(b"data: ") else { continue };
            let Ok(chunk) = serde_json::from_slice::<serde_json::Value>(json) else { continue };
            let text = chunk["choices"][0]["text"].as_str().unwrap_or_default();
            if ttft.is_none() && !text.is_empty() {
                ttft = Some(t.elapsed().as_secs_f64());
            }
            if let Some(c) = chunk["usage"]["completion_tokens"].as_u64() {
                n = c as usize;
            }
        }
    }
    Ok(Timed { ttft: ttft.unwrap_or_default(), total: t.elapsed().as_secs_f64(), tokens: n })
}

/// Measures the server at gRPC `addr` (and its HTTP API at `http`, a base URL): TTFT of a
/// 128-token prompt alone, then a round of `tokens`-token greedy streams per entry of
/// `streams`, each protocol in turn.
pub fn bench_client(
    addr: &str,
    http: Option<&str>,
    tokens: usize,
    streams: &[usize],
) -> Result<(Vec<Ttft>, Vec<ClientRow>), String> {
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
        let mut doors = vec![Door::Grpc(client.clone())];
        if let Some(url) = http {
            let host = url.trim_start_matches("http://").trim_end_matches('/');
            doors.push(Door::Http(host.to_string()));
        }
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
        let mut ttfts = Vec::new();
        for door in &doors {
            // Warm-up, then TTFT alone.
            door.clone().timed(ids[..SHORT_PROMPT].to_vec(), 4).await?;
            let ttft = door.clone().timed(ids[..TTFT_PROMPT].to_vec(), 1).await?.ttft;
            ttfts.push(Ttft { protocol: door.protocol(), ttft_s: ttft });
        }
        let mut rows = Vec::new();
        for &s in streams {
            for door in &doors {
                rows.push(round(door, &ids, s, n).await?);
            }
        }
        Ok((ttfts, rows))
    })
}

/// `s` concurrent streams through `door`.
async fn round(door: &Door, ids: &[u32], s: usize, tokens: u32) -> Result<ClientRow, String> {
    let t = Instant::now();
    let tasks: Vec<_> =
        (0..s).map(|i| tokio::spawn(door.clone().timed(ids[i..i + SHORT_PROMPT].to_vec(), tokens))).collect();
    let mut seen = Vec::new();
    for task in tasks {
        seen.push(task.await.map_err(|e| e.to_string())??);
    }
    let wall = t.elapsed().as_secs_f64();
    let mut ttfts: Vec<f64> = seen.iter().map(|r| r.ttft).collect();
    ttfts.sort_by(f64::total_cmp);
    let per_stream =
        seen.iter().map(|r| (r.tokens.saturating_sub(1)) as f64 / (r.total - r.ttft)).sum::<f64>() / s as f64;
    Ok(ClientRow {
        protocol: door.protocol(),
        streams: s,
        median_ttft_s: ttfts[ttfts.len() / 2],
        stream_tokens_per_s: per_stream,
        aggregate_tokens_per_s: seen.iter().map(|r| r.tokens).sum::<usize>() as f64 / wall,
    })
}

/// The figures as Markdown: the TTFT lines, then the table.
pub fn render(ttfts: &[Ttft], rows: &[ClientRow]) -> String {
    let mut out = String::new();
    for t in ttfts {
        out.push_str(&format!("TTFT of a {TTFT_PROMPT}-token prompt over {}: {:.1} ms\n", t.protocol, t.ttft_s * 1e3));
    }
    out.push_str("\n| protocol | streams | median TTFT ms | tok/s per stream | aggregate tok/s |\n");
    out.push_str("|---|---|---|---|---|\n");
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.1} | {:.1} |\n",
            r.protocol,
            r.streams,
            r.median_ttft_s * 1e3,
            r.stream_tokens_per_s,
            r.aggregate_tokens_per_s
        ));
    }
    out
}
