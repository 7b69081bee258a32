//! The OpenAI-compatible HTTP API (`kiln serve --http-addr`): `GET /v1/models`,
//! `POST /v1/completions` and `POST /v1/chat/completions`, streamed as Server-Sent Events in
//! OpenAI's chunk format when `stream` is set.
//!
//! A body becomes a `kiln.v1.GenerateRequest` and starts through [`service::start`], the
//! gRPC service's own path: both doors validate alike, run on the same engine, count in the
//! same metrics (label `protocol="http"`) and drain together. Fields that would change the
//! result and that kiln does not do (`n` > 1, `best_of` > 1, `tools`, `suffix`, `logit_bias`,
//! …) are refused with a 400 naming them; bookkeeping fields (`user`, `metadata`, `store`,
//! …) are accepted and ignored; any other field is refused as unrecognized. Errors are
//! OpenAI's error object (`error.message`, `type`, `param`, `code`).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;

use super::metrics::Protocol;
use super::proto;
use super::service::{self, GenerateStream, Shared};
use crate::engine::Engine;
use crate::model::ModelTokenizer;

/// Most bytes of a body read before it is refused whole (the rest of a larger one is not
/// read; its connection closes).
const DRAIN_LIMIT: usize = 256 << 20;

/// What the HTTP handlers share.
pub struct HttpState {
    /// The gRPC service's state: engine, limits, metrics, drain flag.
    pub shared: Arc<Shared>,
    /// `created` of the model (Unix seconds: when the artifact was written).
    pub created: u64,
    /// Largest request body, in bytes (larger ones get 413).
    pub max_body_bytes: usize,
}

/// Serves the API on `listener` until the process ends.
pub async fn serve(listener: TcpListener, state: Arc<HttpState>) -> std::io::Result<()> {
    axum::serve(listener, router(state)).await
}

/// The API's routes.
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{model}", get(model))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(|| async {
            ApiError::not_found("no such path: the API serves /v1/models, /v1/completions and /v1/chat/completions")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", "method not allowed on this path")
        })
        .with_state(state)
}

/// An OpenAI error object with its HTTP status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<String>,
    code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, kind, message: message.into(), param: None, code: None }
    }

    /// A 400 naming `param`.
    fn bad(param: &str, reason: impl std::fmt::Display) -> Self {
        ApiError {
            param: Some(param.to_string()),
            code: Some("invalid_value"),
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", format!("{param}: {reason}"))
        }
    }

    fn not_found(message: impl Into<String>) -> Self {
        ApiError { code: Some("not_found"), ..ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", message) }
    }

    /// The error of a gRPC status from [`service::start`] or the stream: the code picks the
    /// HTTP status, the field the message starts with becomes `param` (in OpenAI's name).
    fn from_status(s: &tonic::Status, names: &FieldNames) -> Self {
        use tonic::Code;
        let (status, kind, code) = match s.code() {
            Code::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_value"),
            Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "queue_full"),
            Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", "unavailable"),
            Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "timeout", "deadline_exceeded"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal"),
        };
        let message = s.message();
        let param = (status == StatusCode::BAD_REQUEST)
            .then(|| message.split_once(": ").map(|(field, _)| names.openai(field)))
            .flatten();
        let message = match (&param, message.split_once(": ")) {
            (Some(p), Some((_, reason))) => format!("{p}: {reason}"),
            _ => message.to_string(),
        };
        ApiError { status, kind, message, param, code: Some(code) }
    }

    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// How the proto's field names read in this request's OpenAI form.
struct FieldNames {
    /// The input field (`prompt` or `messages`).
    input: &'static str,
    /// The name `max_tokens` was given under (`max_tokens` or `max_completion_tokens`).
    max_tokens: &'static str,
    /// The name of the top-logprobs count (`logprobs` for completions, `top_logprobs` for chat).
    top_logprobs: &'static str,
}

impl FieldNames {
    fn openai(&self, field: &str) -> String {
        match field {
            "text" | "token_ids" | "messages" => self.input.to_string(),
            "max_tokens" => self.max_tokens.to_string(),
            "top_logprobs" => self.top_logprobs.to_string(),
            f if f.starts_with("speculative.") => "speculative".to_string(),
            f if f.starts_with("response_format.") => "response_format".to_string(),
            f => f.strip_prefix("sampling.").unwrap_or(f).to_string(),
        }
    }
}

/// Which endpoint a body was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Completions,
    Chat,
}

/// Fields both endpoints read.
const COMMON_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "stream",
    "stream_options",
    "response_format",
    "n",
    "best_of",
    "logit_bias",
    // kiln's extras, named as in the proto.
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
    "speculative",
    "stop_token_ids",
];

/// Bookkeeping fields: accepted, no effect on the output.
const IGNORED_FIELDS: &[&str] = &["user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options"];

/// Fields that change results in ways kiln does not implement (a 400 naming them when set
/// to anything but their neutral value).
const UNSUPPORTED_FIELDS: &[&str] =
    &["tools", "tool_choice", "functions", "function_call", "suffix", "audio", "modalities", "prediction"];

/// One request body: its fields, read with the errors naming them.
struct Fields {
    fields: Map<String, Value>,
}

impl Fields {
    fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", format!("the body is not valid JSON: {e}"))
        })?;
        match v {
            Value::Object(fields) => Ok(Fields { fields }),
            _ => Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", "the body must be a JSON object")),
        }
    }

    /// The field, `None` when absent or null.
    fn get(&self, name: &str) -> Option<&Value> {
        self.fields.get(name).filter(|v| !v.is_null())
    }

    fn number(&self, name: &str) -> Result<Option<f64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| ApiError::bad(name, format!("{v} is not a number"))),
        }
    }

    fn f32(&self, name: &str) -> Result<Option<f32>, ApiError> {
        Ok(self.number(name)?.map(|x| x as f32))
    }

    fn integer(&self, name: &str) -> Result<Option<i64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| ApiError::bad(name, format!("{v} is not an integer"))),
        }
    }

    /// A count: an integer from 0 to `u32::MAX`.
    fn count(&self, name: &str) -> Result<Option<u32>, ApiError> {
        match self.integer(name)? {
            None => Ok(None),
            Some(n) => {
                u32::try_from(n).map(Some).map_err(|_| ApiError::bad(name, format!("{n} is not an integer >= 0")))
            }
        }
    }

    fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| ApiError::bad(name, format!("{v} is not a boolean"))),
        }
    }

    /// Refuses fields kiln does not read, and those that ask for what it does not do.
    fn check_fields(&self, own: &[&str]) -> Result<(), ApiError> {
        for (name, v) in &self.fields {
            let name = name.as_str();
            if UNSUPPORTED_FIELDS.contains(&name) {
                let neutral = v.is_null()
                    || v.as_array().is_some_and(|a| a.is_empty())
                    || v.as_str().is_some_and(|s| s.is_empty() || (name == "tool_choice" && s == "none"));
                if !neutral {
                    return Err(ApiError::bad(name, "is not supported by kiln"));
                }
            } else if !(COMMON_FIELDS.contains(&name) || own.contains(&name) || IGNORED_FIELDS.contains(&name)) {
                return Err(ApiError::bad(name, "unrecognized request argument"));
            }
        }
        for name in ["n", "best_of"] {
            if let Some(n) = self.integer(name)? {
                if n != 1 {
                    return Err(ApiError::bad(name, format!("{n}: kiln generates one choice per request (n = 1)")));
                }
            }
        }
        if self.get("logit_bias").and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
            return Err(ApiError::bad("logit_bias", "is not supported by kiln"));
        }
        Ok(())
    }
}

/// A request mapped onto the proto, with what the response needs to know.
struct Mapped {
    request: proto::GenerateRequest,
    names: FieldNames,
    stream: bool,
    include_usage: bool,
    /// Text put before the completion (`echo`).
    echo: Option<EchoOf>,
}

/// What `echo` repeats: the prompt as given.
enum EchoOf {
    Text(String),
    Tokens(Vec<u32>),
}

/// Maps a body of `endpoint` onto a `GenerateRequest`.
fn map_body(body: &Fields, endpoint: Endpoint, model_name: &str) -> Result<Mapped, ApiError> {
    let own: &[&str] = match endpoint {
        Endpoint::Completions => &["prompt", "echo"],
        Endpoint::Chat => &["messages", "max_completion_tokens", "top_logprobs"],
    };
    body.check_fields(own)?;
    match body.get("model") {
        // Absent or null: the one model served.
        None | Some(Value::Null) => {}
        Some(Value::String(m)) if m == model_name => {}
        Some(Value::String(m)) => {
            return Err(ApiError {
                param: Some("model".into()),
                code: Some("model_not_found"),
                ..ApiError::not_found(format!("model: {m:?} is not served here (this server serves {model_name:?})"))
            })
        }
        Some(v) => return Err(ApiError::bad("model", format!("{v} is not a string"))),
    }
    let mut r = proto::GenerateRequest::default();
    let mut echo = None;
    let mut names = FieldNames { input: "prompt", max_tokens: "max_tokens", top_logprobs: "logprobs" };
    match endpoint {
        Endpoint::Completions => {
            let (text, ids) = prompt(body.get("prompt"))?;
            if body.bool("echo")?.unwrap_or(false) {
                echo = Some(if ids.is_empty() { EchoOf::Text(text.clone()) } else { EchoOf::Tokens(ids.clone()) });
            }
            (r.text, r.token_ids) = (text, ids);
            // `logprobs: N` asks for the chosen token's logprob and the N most likely.
            if let Some(n) = body.count("logprobs")? {
                if echo.is_some() {
                    return Err(ApiError::bad("echo", "echo with logprobs (the prompt's logprobs) is not supported"));
                }
                (r.logprobs, r.top_logprobs) = (true, n);
            }
        }
        Endpoint::Chat => {
            names = FieldNames { input: "messages", max_tokens: "max_tokens", top_logprobs: "top_logprobs" };
            r.messages = messages(body.get("messages"))?;
            r.logprobs = body.bool("logprobs")?.unwrap_or(false);
            if let Some(n) = body.count("top_logprobs")? {
                if !r.logprobs && n > 0 {
                    return Err(ApiError::bad("top_logprobs", "needs logprobs: true"));
                }
                r.top_logprobs = n;
            }
            if body.get("max_completion_tokens").is_some() {
                names.max_tokens = "max_completion_tokens";
            }
        }
    }
    r.max_tokens = match (body.count("max_completion_tokens")?, body.count("max_tokens")?) {
        (Some(n), _) | (None, Some(n)) => Some(n),
        (None, None) => None,
    };
    r.stop = match body.get("stop") {
        None => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| {
                s.as_str().map(str::to_string).ok_or_else(|| ApiError::bad("stop", format!("{s} is not a string")))
            })
            .collect::<Result<_, _>>()?,
        Some(v) => return Err(ApiError::bad("stop", format!("{v} is neither a string nor a list of strings"))),
    };
    if let Some(ids) = body.get("stop_token_ids") {
        let bad = || ApiError::bad("stop_token_ids", "must be a list of token ids");
        r.stop_token_ids = ids
            .as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|v| v.as_u64().and_then(|i| u32::try_from(i).ok()).ok_or_else(bad))
            .collect::<Result<_, _>>()?;
    }
    r.ignore_eos = body.bool("ignore_eos")?.unwrap_or(false);
    r.sampling = Some(proto::SamplingParameters {
        // OpenAI samples at temperature 1 unless told otherwise (the proto defaults to greedy).
        temperature: Some(body.f32("temperature")?.unwrap_or(1.0)),
        top_k: body.count("top_k")?.unwrap_or(0),
        top_p: body.f32("top_p")?,
        min_p: body.f32("min_p")?,
        repetition_penalty: body.f32("repetition_penalty")?,
        presence_penalty: body.f32("presence_penalty")?,
        frequency_penalty: body.f32("frequency_penalty")?,
        // OpenAI's seed is any 64-bit integer: its bits seed the stream.
        seed: body.integer("seed")?.map(|s| s as u64),
    });
    r.speculative = match body.get("speculative") {
        None => None,
        Some(Value::Bool(on)) => Some(proto::SpeculativeParameters { enabled: *on, ..Default::default() }),
        Some(Value::Object(o)) => {
            let spec = Fields { fields: o.clone() };
            let named = |e: ApiError| ApiError { param: Some("speculative".into()), ..e };
            Some(proto::SpeculativeParameters {
                enabled: spec.bool("enabled").map_err(named)?.unwrap_or(true),
                draft_tokens: spec.count("draft_tokens").map_err(named)?.unwrap_or(0),
                drafter: match spec.get("drafter") {
                    None => String::new(),
                    Some(Value::String(d)) => d.clone(),
                    Some(v) => return Err(ApiError::bad("speculative", format!("drafter: {v} is not a string"))),
                },
            })
        }
        Some(v) => return Err(ApiError::bad("speculative", format!("{v} is neither a boolean nor an object"))),
    };
    r.response_format = response_format(body.get("response_format"))?;
    let stream = body.bool("stream")?.unwrap_or(false);
    let include_usage = match body.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(ApiError::bad("stream_options", format!("include_usage: {v} is not a boolean"))),
        },
        Some(v) => return Err(ApiError::bad("stream_options", format!("{v} is not an object"))),
    };
    if include_usage && !stream {
        return Err(ApiError::bad("stream_options", "is only allowed with stream: true"));
    }
    Ok(Mapped { request: r, names, stream, include_usage, echo })
}

/// A completion prompt: a string, a list of token ids, or a list holding one of either.
fn prompt(v: Option<&Value>) -> Result<(String, Vec<u32>), ApiError> {
    let ids = |a: &[Value]| {
        a.iter()
            .map(|v| v.as_u64().and_then(|i| u32::try_from(i).ok()))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| ApiError::bad("prompt", "a token-id prompt must hold integers >= 0 only"))
    };
    match v {
        None => Err(ApiError::bad("prompt", "is required")),
        Some(Value::String(s)) if s.is_empty() => Err(ApiError::bad("prompt", "is empty")),
        Some(Value::String(s)) => Ok((s.clone(), vec![])),
        Some(Value::Array(a)) if a.is_empty() => Err(ApiError::bad("prompt", "is empty")),
        Some(Value::Array(a)) if a.len() > 1 && !a[0].is_number() => {
            Err(ApiError::bad("prompt", "a batch of prompts is not supported: send one request per prompt"))
        }
        Some(Value::Array(a)) => match &a[0] {
            Value::String(_) => prompt(Some(&a[0])),
            Value::Array(inner) => Ok((String::new(), ids(inner)?)).and_then(|p| {
                if p.1.is_empty() {
                    Err(ApiError::bad("prompt", "is empty"))
                } else {
                    Ok(p)
                }
            }),
            _ => Ok((String::new(), ids(a)?)),
        },
        Some(v) => Err(ApiError::bad("prompt", format!("{v} is neither a string nor a list of token ids"))),
    }
}

/// Chat messages: `role` and `content` (a string, or a list of text parts).
fn messages(v: Option<&Value>) -> Result<Vec<proto::ChatMessage>, ApiError> {
    let list = match v {
        None => return Err(ApiError::bad("messages", "is required")),
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::bad("messages", "must hold at least one message"))
        }
        Some(Value::Array(a)) => a,
        Some(v) => return Err(ApiError::bad("messages", format!("{v} is not a list of messages"))),
    };
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let bad = |reason: String| ApiError::bad("messages", format!("message {i}: {reason}"));
            let m = m.as_object().ok_or_else(|| bad("is not an object".into()))?;
            if let Some(k) = m.keys().find(|k| !["role", "content", "name"].contains(&k.as_str())) {
                return Err(bad(format!("field {k:?} is not supported (role, content, name)")));
            }
            let role = m.get("role").and_then(Value::as_str).ok_or_else(|| bad("role must be a string".into()))?;
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => Ok(t),
                        _ => Err(bad("only text content parts are supported".into())),
                    })
                    .collect::<Result<String, _>>()?,
                Some(Value::Null) | None => String::new(),
                Some(v) => return Err(bad(format!("content {v} is neither a string nor a list of parts"))),
            };
            Ok(proto::ChatMessage { role: role.to_string(), content })
        })
        .collect()
}

/// `response_format`: `text` (none), `json_object`, or `json_schema` with its schema.
fn response_format(v: Option<&Value>) -> Result<Option<proto::ResponseFormat>, ApiError> {
    let Some(v) = v else { return Ok(None) };
    let bad = |reason: String| ApiError::bad("response_format", reason);
    let kind = v.get("type").and_then(Value::as_str).ok_or_else(|| bad("type must be a string".into()))?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(proto::ResponseFormat { json_object: true, json_schema: String::new() })),
        "json_schema" => {
            let schema = v
                .get("json_schema")
                .and_then(|s| s.get("schema"))
                .ok_or_else(|| bad("json_schema.schema is required".into()))?;
            Ok(Some(proto::ResponseFormat { json_object: false, json_schema: schema.to_string() }))
        }
        other => Err(bad(format!("type {other:?} is not one of text, json_object, json_schema"))),
    }
}

/// Reads a body of at most `limit` bytes (413 beyond it; a larger body is read on, up to
/// [`DRAIN_LIMIT`], so the client sees the answer rather than a reset connection).
async fn read_body(body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    let mut stream = body.into_data_stream();
    let (mut bytes, mut seen) = (Vec::new(), 0usize);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", format!("reading the body: {e}"))
        })?;
        seen += chunk.len();
        if seen <= limit {
            bytes.extend_from_slice(&chunk);
        } else if seen > DRAIN_LIMIT {
            break;
        }
    }
    if seen > limit {
        return Err(ApiError {
            code: Some("request_too_large"),
            ..ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("the body is larger than the server's limit of {limit} bytes (--max-message-bytes)"),
            )
        });
    }
    Ok(bytes)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

fn model_object(state: &HttpState) -> Value {
    json!({"id": state.shared.info.name, "object": "model", "created": state.created, "owned_by": "kiln"})
}

async fn models(State(state): State<Arc<HttpState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_object(&state)]}))
}

async fn model(
    State(state): State<Arc<HttpState>>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    if name != state.shared.info.name {
        return Err(ApiError {
            code: Some("model_not_found"),
            ..ApiError::not_found(format!("model {name:?} is not served here"))
        });
    }
    Ok(Json(model_object(&state)))
}

async fn completions(State(state): State<Arc<HttpState>>, body: Body) -> Response {
    respond(state, body, Endpoint::Completions).await.unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions(State(state): State<Arc<HttpState>>, body: Body) -> Response {
    respond(state, body, Endpoint::Chat).await.unwrap_or_else(IntoResponse::into_response)
}

/// Reads, maps and starts a request, then answers it whole or as an event stream.
async fn respond(state: Arc<HttpState>, body: Body, endpoint: Endpoint) -> Result<Response, ApiError> {
    let shared = &state.shared;
    let refused = |e: ApiError| {
        shared.metrics.rejected(Protocol::Http);
        tracing::info!(status = e.status.as_u16(), message = %e.message, "HTTP request refused");
        e
    };
    let bytes = read_body(body, state.max_body_bytes).await.map_err(refused)?;
    let mapped = Fields::parse(&bytes).and_then(|b| map_body(&b, endpoint, &shared.info.name)).map_err(refused)?;
    // `start` counts its own refusals.
    let stream = service::start(shared, mapped.request.clone(), None, Protocol::Http)
        .map_err(|s| ApiError::from_status(&s, &mapped.names))?;
    let engine = shared.ready().map_err(|s| ApiError::from_status(&s, &mapped.names))?.clone();
    let reply = Reply {
        endpoint,
        id: format!("{}-{}", if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" }, unique_id()),
        created: unix_now(),
        model: shared.info.name.clone(),
        logprobs: mapped.request.logprobs || mapped.request.top_logprobs > 0,
        include_usage: mapped.include_usage,
        echo: match &mapped.echo {
            None => String::new(),
            Some(EchoOf::Text(t)) => t.clone(),
            Some(EchoOf::Tokens(ids)) => engine.tokenizer().inner().decode(ids, false).unwrap_or_default(),
        },
    };
    if mapped.stream {
        Ok(stream_reply(reply, stream, engine, mapped.names).into_response())
    } else {
        whole_reply(reply, stream, &engine, &mapped.names).await.map(IntoResponse::into_response)
    }
}

/// A request id unique within the process.
fn unique_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{:x}{n:06x}", unix_now())
}

/// The fixed parts of a response.
struct Reply {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    logprobs: bool,
    include_usage: bool,
    /// The prompt's text, put first (`echo`).
    echo: String,
}

/// OpenAI's finish reason for a finished message.
fn finish_reason(f: &proto::Finished) -> &'static str {
    match proto::FinishReason::try_from(f.reason).unwrap_or(proto::FinishReason::Unspecified) {
        proto::FinishReason::Length | proto::FinishReason::ContextFull => "length",
        _ => "stop",
    }
}

fn usage(f: &proto::Finished) -> Value {
    let u = f.usage.unwrap_or_default();
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": { "cached_tokens": u.cached_prompt_tokens },
    })
}

/// A token's text as the tokenizer decodes it alone (special tokens spelled out).
fn piece(tokenizer: &ModelTokenizer, id: u32) -> String {
    tokenizer.inner().decode(&[id], false).unwrap_or_default()
}

/// Log-probabilities of `tokens` in the endpoint's form; `offset` is the text offset of the
/// first (completions' `text_offset`), advanced past them.
fn logprobs(endpoint: Endpoint, tokenizer: &ModelTokenizer, tokens: &[proto::Token], offset: &mut usize) -> Value {
    match endpoint {
        Endpoint::Chat => {
            let entry = |id: u32, logprob: f32| {
                let token = piece(tokenizer, id);
                json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()})
            };
            let content: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    let mut e = entry(t.id, t.logprob.unwrap_or(0.0));
                    e["top_logprobs"] = t.top_logprobs.iter().map(|x| entry(x.id, x.logprob)).collect();
                    e
                })
                .collect();
            json!({"content": content})
        }
        Endpoint::Completions => {
            let mut out = json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []});
            for t in tokens {
                let token = piece(tokenizer, t.id);
                let top: Map<String, Value> =
                    t.top_logprobs.iter().map(|x| (piece(tokenizer, x.id), json!(x.logprob))).collect();
                for (k, v) in [
                    ("tokens", json!(token)),
                    ("token_logprobs", json!(t.logprob.unwrap_or(0.0))),
                    ("top_logprobs", Value::Object(top)),
                    ("text_offset", json!(*offset)),
                ] {
                    if let Some(a) = out[k].as_array_mut() {
                        a.push(v);
                    }
                }
                *offset += token.len();
            }
            out
        }
    }
}

/// Appends the logprobs of `more` to `acc` (both in the endpoint's form).
fn extend_logprobs(acc: &mut Value, more: Value) {
    if let (Value::Object(a), Value::Object(m)) = (acc, more) {
        for (k, v) in m {
            if let (Some(Value::Array(dst)), Value::Array(src)) = (a.get_mut(&k), v) {
                dst.extend(src);
            }
        }
    }
}

/// Runs the stream to its end and answers with one JSON object.
async fn whole_reply(
    reply: Reply,
    mut stream: GenerateStream,
    engine: &Engine,
    names: &FieldNames,
) -> Result<Json<Value>, ApiError> {
    let tokenizer = engine.tokenizer();
    let mut text = reply.echo.clone();
    let mut offset = text.len();
    let mut lp = reply.logprobs.then(|| logprobs(reply.endpoint, tokenizer, &[], &mut offset));
    let finished = loop {
        let msg = match stream.next().await {
            Some(Ok(msg)) => msg,
            Some(Err(s)) => return Err(ApiError::from_status(&s, names)),
            None => {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the stream ended early"))
            }
        };
        text.push_str(&msg.text);
        if let Some(acc) = &mut lp {
            extend_logprobs(acc, logprobs(reply.endpoint, tokenizer, &msg.tokens, &mut offset));
        }
        if let Some(f) = msg.finished {
            break f;
        }
    };
    let choice = match reply.endpoint {
        Endpoint::Completions => json!({
            "index": 0, "text": text, "logprobs": lp, "finish_reason": finish_reason(&finished),
        }),
        Endpoint::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": lp,
            "finish_reason": finish_reason(&finished),
        }),
    };
    let object = if reply.endpoint == Endpoint::Chat { "chat.completion" } else { "text_completion" };
    Ok(Json(json!({
        "id": reply.id,
        "object": object,
        "created": reply.created,
        "model": reply.model,
        "choices": [choice],
        "usage": usage(&finished),
    })))
}

impl Reply {
    /// One chunk of the event stream, with `choices` as given.
    fn chunk(&self, choices: Value) -> SseEvent {
        let object = if self.endpoint == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" };
        let mut c =
            json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": choices});
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        SseEvent::default().data(c.to_string())
    }

    /// A chunk carrying `text` (and its tokens' logprobs), or the end with `finish`.
    fn delta(&self, text: &str, lp: Option<Value>, finish: Option<&str>) -> SseEvent {
        let choice = match self.endpoint {
            Endpoint::Completions => json!({"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}),
            Endpoint::Chat => {
                let delta = if finish.is_some() && text.is_empty() { json!({}) } else { json!({"content": text}) };
                json!({"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish})
            }
        };
        self.chunk(json!([choice]))
    }
}

/// Answers with Server-Sent Events: OpenAI's chunks as the engine produces them, the usage
/// chunk when asked for, then `data: [DONE]`. An error after the first chunk is sent as an
/// `{"error": …}` event. The client going away drops `stream`, which cancels the request.
fn stream_reply(
    reply: Reply,
    mut stream: GenerateStream,
    engine: Arc<Engine>,
    names: FieldNames,
) -> Sse<impl tokio_stream::Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(16);
    tokio::spawn(async move {
        let tokenizer = engine.tokenizer();
        let mut offset = reply.echo.len();
        let first = match reply.endpoint {
            Endpoint::Chat => {
                reply.chunk(json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]))
            }
            Endpoint::Completions => reply.delta(&reply.echo, None, None),
        };
        if (reply.endpoint == Endpoint::Chat || !reply.echo.is_empty()) && tx.send(first).await.is_err() {
            return;
        }
        loop {
            let next = tokio::select! {
                next = stream.next() => next,
                // The client went away: dropping the stream cancels the request.
                _ = tx.closed() => return,
            };
            let mut end = false;
            let events = match next {
                Some(Ok(msg)) => {
                    let lp = reply.logprobs.then(|| logprobs(reply.endpoint, tokenizer, &msg.tokens, &mut offset));
                    let mut events = Vec::new();
                    if !msg.text.is_empty() || lp.is_some() && !msg.tokens.is_empty() {
                        events.push(reply.delta(&msg.text, lp, None));
                    }
                    if let Some(f) = &msg.finished {
                        end = true;
                        events.push(reply.delta("", None, Some(finish_reason(f))));
                        if reply.include_usage {
                            let object = if reply.endpoint == Endpoint::Chat {
                                "chat.completion.chunk"
                            } else {
                                "text_completion"
                            };
                            let u = json!({"id": reply.id, "object": object, "created": reply.created, "model": reply.model, "choices": [], "usage": usage(f)});
                            events.push(SseEvent::default().data(u.to_string()));
                        }
                        events.push(SseEvent::default().data("[DONE]"));
                    }
                    events
                }
                Some(Err(s)) => vec![SseEvent::default().data(ApiError::from_status(&s, &names).body().to_string())],
                None => return,
            };
            for e in events {
                if tx.send(e).await.is_err() {
                    return;
                }
            }
            if end {
                return;
            }
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok)).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;
    use crate::serve::metrics::Metrics;
    use crate::serve::service::Limits;

    /// The API of a server whose model has not loaded yet.
    fn loading() -> Router {
        let info = proto::ModelInfoResponse { name: "int4".into(), ..Default::default() };
        let limits = Limits { max_tokens: 64, default_max_tokens: 16 };
        let shared = Arc::new(Shared::new(Arc::new(Metrics::default()), limits, info));
        router(Arc::new(HttpState { shared, created: 7, max_body_bytes: 1024 }))
    }

    async fn call(method: &str, path: &str, body: &str) -> (StatusCode, Value) {
        let request = Request::builder().method(method).uri(path).body(Body::from(body.to_string())).expect("request");
        let response = loading().oneshot(request).await.expect("infallible");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("body");
        (status, serde_json::from_slice(&bytes).expect("JSON"))
    }

    #[tokio::test]
    async fn while_loading_models_answer_and_generation_is_503() {
        let (status, v) = call("GET", "/v1/models", "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(v["data"][0], json!({"id": "int4", "object": "model", "created": 7, "owned_by": "kiln"}));
        let (status, v) =
            call("POST", "/v1/chat/completions", r#"{"messages": [{"role": "user", "content": "hi"}]}"#).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
        assert_eq!(v["error"]["type"], "service_unavailable");
    }

    #[tokio::test]
    async fn fields_are_checked_before_the_engine_is_asked() {
        for (body, param) in [
            (r#"{"prompt": "a", "max_tokens": "ten"}"#, "max_tokens"),
            (r#"{"prompt": "a", "max_tokens": 1.5}"#, "max_tokens"),
            (r#"{"prompt": "a", "seed": "x"}"#, "seed"),
            (r#"{"prompt": {"a": 1}}"#, "prompt"),
            (r#"{"prompt": ["a", "b"]}"#, "prompt"),
            (r#"{"prompt": "a", "echo": 1}"#, "echo"),
            (r#"{"prompt": "a", "echo": true, "logprobs": 1}"#, "echo"),
            (r#"{"prompt": "a", "messages": []}"#, "messages"),
            (r#"{"prompt": "a", "stream": "yes"}"#, "stream"),
            (r#"{"prompt": "a", "model": 3}"#, "model"),
            (r#"{"prompt": "a", "response_format": {"type": "json_schema"}}"#, "response_format"),
        ] {
            let (status, v) = call("POST", "/v1/completions", body).await;
            assert_eq!((status, v["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some(param)), "{body}: {v}");
        }
        let (status, v) =
            call("POST", "/v1/chat/completions", r#"{"messages": [{"role": "user"}], "functions": [{}]}"#).await;
        assert_eq!((status, v["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("functions")), "{v}");
        let (status, v) = call("POST", "/v1/completions", &format!(r#"{{"prompt": "{}"}}"#, "a".repeat(2000))).await;
        assert_eq!((status, v["error"]["code"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("request_too_large")));
        let (status, v) = call("POST", "/v1/completions", r#"{"prompt": "a", "model": "gpt-4"}"#).await;
        assert_eq!((status, v["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("model_not_found")));
    }
}
