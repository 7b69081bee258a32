//! Prometheus metrics of the gRPC and HTTP services, in the text exposition format, served over
//! plain HTTP on `GET /metrics`. Request counters carry a `protocol` label (`grpc`, `http`).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::engine::{Engine, FinishReason, Load};

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Finish reasons, in the order of [`Metrics::finished`].
const REASONS: [&str; 6] = ["length", "eos", "stop", "context_full", "cancelled", "error"];

/// The door a request came in by: the `protocol` label of the request counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// The `kiln.v1.Generator` gRPC service.
    Grpc,
    /// The OpenAI-compatible HTTP API.
    Http,
}

impl Protocol {
    const ALL: [Protocol; 2] = [Protocol::Grpc, Protocol::Http];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::Http => "http",
        }
    }
}

/// A latency histogram with fixed buckets; lock-free.
#[derive(Default)]
struct Histogram {
    /// Non-cumulative counts per bucket, the last one for +Inf.
    counts: [AtomicU64; BUCKETS.len() + 1],
    /// Sum of observations in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS.iter().position(|&b| s <= b).unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut total = 0;
        for (i, c) in self.counts.iter().enumerate() {
            total += c.load(Ordering::Relaxed);
            let le = BUCKETS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {total}");
        }
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {total}");
    }
}

/// The service's counters and histograms; gauges are read from the engine when rendered.
#[derive(Default)]
pub struct Metrics {
    time_to_first_token: Histogram,
    inter_token: Histogram,
    queue: Histogram,
    duration: Histogram,
    prompt_tokens: AtomicU64,
    cached_prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    finished: [[AtomicU64; REASONS.len()]; Protocol::ALL.len()],
    rejected: [AtomicU64; Protocol::ALL.len()],
    spec_steps: AtomicU64,
    spec_drafted: AtomicU64,
    spec_accepted: AtomicU64,
}

/// How a request ended, for [`Metrics::finish`].
pub enum Outcome<'a> {
    /// The engine finished it.
    Finished(&'a FinishReason),
    /// The client cancelled, disconnected or passed its deadline.
    Cancelled,
    /// The model failed.
    Error,
}

impl Metrics {
    /// Records a token that reached the server `gap` after the previous one.
    pub fn inter_token(&self, gap: Duration) {
        self.inter_token.observe(gap);
    }

    /// Records a finished request's counts and timings.
    pub fn finished(&self, s: &crate::engine::Summary) {
        self.time_to_first_token.observe(s.time_to_first_token);
        self.queue.observe(s.queue_time);
        self.duration.observe(s.total_time);
        self.prompt_tokens.fetch_add(s.prompt_tokens as u64, Ordering::Relaxed);
        self.cached_prompt_tokens.fetch_add(s.cached_prompt_tokens as u64, Ordering::Relaxed);
        self.generated_tokens.fetch_add(s.generated_tokens as u64, Ordering::Relaxed);
        if let Some(x) = &s.speculative {
            self.spec_steps.fetch_add(x.steps as u64, Ordering::Relaxed);
            self.spec_drafted.fetch_add(x.drafted as u64, Ordering::Relaxed);
            self.spec_accepted.fetch_add(x.accepted as u64, Ordering::Relaxed);
        }
    }

    /// Counts a request of `protocol` by how it ended.
    pub fn outcome(&self, protocol: Protocol, outcome: Outcome) {
        let label = match outcome {
            Outcome::Finished(FinishReason::Length) => "length",
            Outcome::Finished(FinishReason::Eos) => "eos",
            Outcome::Finished(FinishReason::StopToken(_) | FinishReason::StopString(_)) => "stop",
            Outcome::Finished(FinishReason::ContextFull) => "context_full",
            Outcome::Finished(FinishReason::Cancelled) | Outcome::Cancelled => "cancelled",
            Outcome::Error => "error",
        };
        let i = REASONS.iter().position(|&r| r == label).expect("every label is listed");
        self.finished[protocol as usize][i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request of `protocol` refused before it ran (bad input, full queue,
    /// unavailable).
    pub fn rejected(&self, protocol: Protocol) {
        self.rejected[protocol as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The exposition text, with gauges from `load` and `slots`.
    pub fn render(&self, load: Load, slots: usize) -> String {
        let mut out = String::new();
        self.time_to_first_token.render(
            &mut out,
            "kiln_time_to_first_token_seconds",
            "Request arrival to first generated token (queue and prefill included).",
        );
        self.inter_token.render(&mut out, "kiln_inter_token_latency_seconds", "Time between consecutive tokens.");
        self.queue.render(&mut out, "kiln_queue_seconds", "Time a request waited for a sequence slot.");
        self.duration.render(&mut out, "kiln_request_duration_seconds", "Request arrival to its end.");
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter(
            &mut out,
            "kiln_prompt_tokens_total",
            "Prompt tokens prefilled.",
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "kiln_prefix_cache_queried_tokens_total",
            "Prompt tokens looked up in the prefix cache (of finished requests).",
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "kiln_prefix_cache_hit_tokens_total",
            "Prompt tokens whose KV blocks came from the prefix cache.",
            self.cached_prompt_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "kiln_generated_tokens_total",
            "Tokens generated.",
            self.generated_tokens.load(Ordering::Relaxed),
        );
        let name = "kiln_requests_rejected_total";
        let _ = writeln!(
            out,
            "# HELP {name} Requests refused before running (invalid, queue full, unavailable).\n# TYPE {name} counter"
        );
        for (p, c) in Protocol::ALL.iter().zip(&self.rejected) {
            let _ = writeln!(out, "{name}{{protocol=\"{}\"}} {}", p.label(), c.load(Ordering::Relaxed));
        }
        counter(
            &mut out,
            "kiln_speculative_steps_total",
            "Speculative verification passes.",
            self.spec_steps.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "kiln_speculative_drafted_tokens_total",
            "Tokens drafted for speculative requests.",
            self.spec_drafted.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "kiln_speculative_accepted_tokens_total",
            "Drafted tokens the target accepted (acceptance rate = accepted / drafted).",
            self.spec_accepted.load(Ordering::Relaxed),
        );
        let name = "kiln_requests_total";
        let _ = writeln!(out, "# HELP {name} Generation requests by how they ended.\n# TYPE {name} counter");
        for (p, counts) in Protocol::ALL.iter().zip(&self.finished) {
            for (reason, c) in REASONS.iter().zip(counts) {
                let (p, v) = (p.label(), c.load(Ordering::Relaxed));
                let _ = writeln!(out, "{name}{{protocol=\"{p}\",finish_reason=\"{reason}\"}} {v}");
            }
        }
        let gauge = |out: &mut String, name: &str, help: &str, v: usize| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(&mut out, "kiln_active_sequences", "Sequences generating now.", load.running);
        gauge(&mut out, "kiln_queued_requests", "Requests waiting for a slot.", load.waiting);
        gauge(&mut out, "kiln_kv_slots_in_use", "KV cache slots holding a sequence.", load.running);
        gauge(&mut out, "kiln_kv_slots", "KV cache slots allocated.", slots);
        gauge(&mut out, "kiln_kv_blocks_in_use", "Paged KV blocks sequences hold (CPU).", load.kv_blocks_in_use);
        gauge(&mut out, "kiln_kv_blocks", "Paged KV blocks in the pool (CPU).", load.kv_blocks);
        let name = "kiln_preemptions_total";
        let help = "Sequences preempted (KV blocks freed, recomputed later) when the pool ran dry.";
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", load.preemptions);
        out
    }
}

/// Serves `GET /metrics` on `listener` until the process ends; the engine is read once it is
/// loaded (before that, gauges are zero).
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    engine: Arc<std::sync::OnceLock<Arc<Engine>>>,
) -> std::io::Result<()> {
    loop {
        let (mut conn, peer) = listener.accept().await?;
        let (metrics, engine) = (metrics.clone(), engine.clone());
        tokio::spawn(async move {
            if let Err(e) = answer(&mut conn, &metrics, &engine).await {
                tracing::debug!(%peer, error = %e, "metrics connection");
            }
        });
    }
}

/// Answers one HTTP/1.x request and closes the connection.
async fn answer(
    conn: &mut tokio::net::TcpStream,
    metrics: &Metrics,
    engine: &std::sync::OnceLock<Arc<Engine>>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request head"))??;
        if n == 0 || head.len() > 16 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => {
            let (load, slots) = match engine.get() {
                Some(e) => (e.load(), e.slots()),
                None => (Load { running: 0, waiting: 0, kv_blocks_in_use: 0, kv_blocks: 0, preemptions: 0 }, 0),
            };
            ("200 OK", "text/plain; version=0.0.4; charset=utf-8", metrics.render(load, slots))
        }
        ("GET", _) => ("404 Not Found", "text/plain; charset=utf-8", "only /metrics is served\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain; charset=utf-8", "only GET is served\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(response.as_bytes()).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_sum_in_seconds() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.0025\"} 0\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"30\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_sum 60.006\nx_count 3\n"), "{out}");
    }

    #[test]
    fn requests_are_counted_by_finish_reason() {
        let m = Metrics::default();
        m.outcome(Protocol::Grpc, Outcome::Finished(&FinishReason::StopString("x".into())));
        m.outcome(Protocol::Grpc, Outcome::Finished(&FinishReason::StopToken(3)));
        m.outcome(Protocol::Http, Outcome::Finished(&FinishReason::StopToken(3)));
        m.outcome(Protocol::Http, Outcome::Cancelled);
        m.rejected(Protocol::Http);
        let out = m.render(Load { running: 2, waiting: 1, kv_blocks_in_use: 5, kv_blocks: 64, preemptions: 3 }, 4);
        assert!(out.contains("kiln_requests_total{protocol=\"grpc\",finish_reason=\"stop\"} 2\n"), "{out}");
        assert!(out.contains("kiln_requests_total{protocol=\"http\",finish_reason=\"stop\"} 1\n"), "{out}");
        assert!(out.contains("kiln_requests_total{protocol=\"http\",finish_reason=\"cancelled\"} 1\n"), "{out}");
        assert!(out.contains("kiln_requests_total{protocol=\"grpc\",finish_reason=\"cancelled\"} 0\n"), "{out}");
        assert!(out.contains("kiln_requests_rejected_total{protocol=\"http\"} 1\n"), "{out}");
        assert!(out.contains("kiln_requests_rejected_total{protocol=\"grpc\"} 0\n"), "{out}");
        assert!(out.contains("kiln_kv_slots_in_use 2\n") && out.contains("kiln_queued_requests 1\n"), "{out}");
        assert!(out.contains("kiln_kv_blocks_in_use 5\n") && out.contains("kiln_kv_blocks 64\n"), "{out}");
        assert!(out.contains("kiln_preemptions_total 3\n"), "{out}");
    }
}
