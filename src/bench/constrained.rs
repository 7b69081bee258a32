//! `kiln bench --constrained`: what JSON-schema constrained output costs per decode step. The
//! same greedy chat requests are decoded free and under a schema whose output cannot end
//! before the token budget (an array of at least 64 objects), alternating round by round;
//! each figure is the median over rounds of decode time per token after the first.

use std::path::Path;

use crate::engine::grammar::ResponseFormat;
use crate::engine::{artifact_engine, Engine, EngineOptions, Prompt, Request};
use crate::runtime::SessionOptions;

/// Questions the requests ask, as user messages through the chat template.
const QUESTIONS: [&str; 3] = [
    "List the people in our team as JSON.",
    "Give me the guests of the party, as JSON.",
    "Describe our customers in JSON.",
];

/// The measurement.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ConstrainedReport {
    /// The artifact's name.
    pub artifact: String,
    /// Tokens decoded per request.
    pub tokens: usize,
    /// Median decode time per token, free.
    pub plain_ms_per_token: f64,
    /// Median decode time per token, constrained.
    pub constrained_ms_per_token: f64,
    /// Constrained over free.
    pub ratio: f64,
}

fn schema() -> serde_json::Value {
    serde_json::json!({
        "type": "array",
        "minItems": 64,
        "items": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer"},
                "role": {"enum": ["admin", "user", "guest"]},
                "score": {"type": "number"},
                "active": {"type": "boolean"},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["name", "age", "role", "active"],
        },
    })
}

/// Seconds per decoded token (the first, i.e. the prefill, excluded) over the questions.
fn decode(e: &Engine, tokens: usize, format: Option<&ResponseFormat>) -> Result<f64, String> {
    let (mut seconds, mut generated) = (0.0, 0);
    for q in QUESTIONS {
        let r = Request {
            prompt: Prompt::Chat(vec![crate::engine::chat::Message { role: "user".into(), content: q.into() }]),
            max_new_tokens: tokens,
            ignore_eos: format.is_none(),
            response_format: format.cloned(),
            ..Default::default()
        };
        let out = e.submit(r).map_err(|e| e.to_string())?.collect().map_err(|e| e.to_string())?;
        let s = out.summary.ok_or("no summary")?;
        if out.token_ids.len() != tokens {
            return Err(format!("{q:?} ended after {} of {tokens} tokens", out.token_ids.len()));
        }
        seconds += (s.total_time - s.time_to_first_token).as_secs_f64();
        generated += out.token_ids.len() - 1;
    }
    Ok(seconds / generated as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Decodes `tokens` tokens per question free and constrained, `repeat` rounds of each.
pub fn bench_constrained(
    artifact: &Path,
    tokens: usize,
    threads: usize,
    repeat: usize,
) -> Result<ConstrainedReport, String> {
    if tokens < 2 {
        return Err("--tokens must be at least 2".into());
    }
    let session = SessionOptions { intra_threads: threads, ..Default::default() };
    let e = artifact_engine(artifact, None, &session, 1, 1024, EngineOptions::default()).map_err(|e| e.to_string())?;
    let format = ResponseFormat::JsonSchema(schema());
    // Warm-up of both paths (the first constrained request builds the vocabulary trie).
    decode(&e, tokens.min(8), None)?;
    decode(&e, tokens.min(8), Some(&format))?;
    let (mut plain, mut constrained) = (Vec::new(), Vec::new());
    for _ in 0..repeat.max(1) {
        plain.push(decode(&e, tokens, None)?);
        constrained.push(decode(&e, tokens, Some(&format))?);
    }
    let (p, c) = (median(plain), median(constrained));
    let name = artifact.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(ConstrainedReport {
        artifact: name,
        tokens,
        plain_ms_per_token: p * 1e3,
        constrained_ms_per_token: c * 1e3,
        ratio: c / p,
    })
}

/// The report as a Markdown table.
pub fn render(r: &ConstrainedReport) -> String {
    format!(
        "| artifact | tokens | free ms/token | constrained ms/token | ratio |\n|---|---|---|---|---|\n| {} | {} | {:.2} | {:.2} | {:.2}× |\n",
        r.artifact, r.tokens, r.plain_ms_per_token, r.constrained_ms_per_token, r.ratio
    )
}
