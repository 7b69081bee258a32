//! The `kiln.v1.Generator` service: requests checked and mapped onto the [`Engine`], its
//! events streamed back, its errors mapped to gRPC status codes. The HTTP API
//! ([`super::http`]) starts its requests through [`start`] too.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::metrics::{Metrics, Outcome, Protocol};
use super::proto;
use crate::engine::chat::Message;
use crate::engine::grammar::ResponseFormat;
use crate::engine::sampling::{Choice, SamplingParams};
use crate::engine::speculative::{DraftMethod, Speculation, MAX_DRAFT_TOKENS};
use crate::engine::{self, CancelHandle, Engine, EngineError, Event, FinishReason, Prompt, Summary};

/// Per-request limits of the server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens: u32,
    /// `max_tokens` of a request that sets none.
    pub default_max_tokens: u32,
}

/// State shared by the service, the metrics endpoint and the drain logic.
pub struct Shared {
    /// The engine, once loaded.
    pub engine: Arc<OnceLock<Arc<Engine>>>,
    /// Set on SIGTERM/SIGINT: new requests are refused.
    pub draining: AtomicBool,
    /// Counters and histograms.
    pub metrics: Arc<Metrics>,
    /// Per-request limits.
    pub limits: Limits,
    /// ModelInfo's fixed fields (the load fields are filled per call).
    pub info: proto::ModelInfoResponse,
    /// Generate streams still open.
    pub open_streams: AtomicUsize,
    next_id: AtomicU64,
}

impl Shared {
    /// State for a server whose engine is still loading.
    pub fn new(metrics: Arc<Metrics>, limits: Limits, info: proto::ModelInfoResponse) -> Self {
        Shared {
            engine: Arc::new(OnceLock::new()),
            draining: AtomicBool::new(false),
            metrics,
            limits,
            info,
            open_streams: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
        }
    }

    /// The engine, or UNAVAILABLE while loading or draining.
    pub fn ready(&self) -> Result<&Arc<Engine>, Status> {
        if self.draining.load(Ordering::Acquire) {
            return Err(Status::unavailable("the server is draining before it exits"));
        }
        self.engine.get().ok_or_else(|| Status::unavailable("the model is still loading"))
    }
}

/// The gRPC service.
pub struct Service(pub Arc<Shared>);

#[tonic::async_trait]
impl proto::generator_server::Generator for Service {
    type GenerateStream = GenerateStream;

    async fn generate(&self, request: Request<proto::GenerateRequest>) -> Result<Response<GenerateStream>, Status> {
        let deadline = grpc_timeout(request.metadata());
        start(&self.0, request.into_inner(), deadline, Protocol::Grpc).map(Response::new)
    }

    async fn tokenize(
        &self,
        request: Request<proto::TokenizeRequest>,
    ) -> Result<Response<proto::TokenizeResponse>, Status> {
        let engine = self.0.ready()?;
        let r = request.into_inner();
        let t = engine.tokenizer();
        let ids = if r.add_special_tokens { t.encode_prompt(&r.text) } else { t.encode(&r.text) }
            .map_err(|e| Status::invalid_argument(format!("text: {e}")))?;
        let pieces = ids.iter().map(|&i| t.inner().id_to_token(i).unwrap_or_default()).collect();
        Ok(Response::new(proto::TokenizeResponse { token_ids: ids, pieces }))
    }

    async fn detokenize(
        &self,
        request: Request<proto::DetokenizeRequest>,
    ) -> Result<Response<proto::DetokenizeResponse>, Status> {
        let engine = self.0.ready()?;
        let r = request.into_inner();
        let t = engine.tokenizer();
        let vocab = t.vocab_size();
        if let Some(bad) = r.token_ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(Status::invalid_argument(format!(
                "token_ids: token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let text =
            t.inner().decode(&r.token_ids, r.skip_special_tokens).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(proto::DetokenizeResponse { text }))
    }

    async fn model_info(
        &self,
        _request: Request<proto::ModelInfoRequest>,
    ) -> Result<Response<proto::ModelInfoResponse>, Status> {
        let mut info = self.0.info.clone();
        if let Some(engine) = self.0.engine.get() {
            let load = engine.load();
            info.active_sequences = load.running as u32;
            info.queued_requests = load.waiting as u32;
        }
        Ok(Response::new(info))
    }
}

/// Checks `request` and starts it on the engine: its responses as a stream, or the status it
/// is refused with (counted as rejected under `protocol`). Both transports start requests
/// here, so they validate alike and count alike.
pub fn start(
    shared: &Arc<Shared>,
    request: proto::GenerateRequest,
    deadline: Option<Duration>,
    protocol: Protocol,
) -> Result<GenerateStream, Status> {
    let started = (|| {
        let engine = shared.ready()?;
        let (mut r, input) = engine_request(request, shared.limits, engine.has_draft())?;
        // Echo needs the ids before submission: tokenize once and submit the ids.
        let echo = if r.echo {
            let ids = engine.prompt_ids(&r.request.prompt).map_err(|e| status(&e, input))?;
            r.request.prompt = Prompt::Tokens(ids.clone());
            ids
        } else {
            vec![]
        };
        let (tx, rx) = mpsc::unbounded_channel();
        // The engine checks sampling parameters, stop ids and the prompt; `status` names
        // the request's field.
        let cancel =
            engine.submit_with(r.request, Box::new(move |e| tx.send(e).is_ok())).map_err(|e| status(&e, input))?;
        Ok::<_, Status>((rx, cancel, echo))
    })();
    let (rx, cancel, echo) = started.inspect_err(|s| {
        shared.metrics.rejected(protocol);
        tracing::info!(code = ?s.code(), message = s.message(), protocol = protocol.label(), "request refused");
    })?;
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    shared.open_streams.fetch_add(1, Ordering::AcqRel);
    tracing::debug!(id, protocol = protocol.label(), "request started");
    Ok(GenerateStream {
        id,
        protocol,
        rx,
        cancel,
        deadline: deadline.map(|d| Box::pin(tokio::time::sleep(d))),
        shared: shared.clone(),
        echo,
        last_token: None,
        error: None,
        done: false,
    })
}

/// A request as the engine takes it, with the service-level options.
struct Mapped {
    request: engine::Request,
    echo: bool,
}

/// Checks what the engine cannot (one input, limits, the drafter) and maps `r` onto an
/// engine request; also returns the name of its input field.
fn engine_request(
    r: proto::GenerateRequest,
    limits: Limits,
    has_draft: bool,
) -> Result<(Mapped, &'static str), Status> {
    let bad = |field: &str, reason: String| Status::invalid_argument(format!("{field}: {reason}"));
    let given: Vec<&str> = [
        (!r.text.is_empty()).then_some("text"),
        (!r.token_ids.is_empty()).then_some("token_ids"),
        (!r.messages.is_empty()).then_some("messages"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let (prompt, input) = match given.as_slice() {
        ["text"] => (Prompt::Text(r.text), "text"),
        ["token_ids"] => (Prompt::Tokens(r.token_ids), "token_ids"),
        ["messages"] => {
            let messages = r.messages.into_iter().map(|m| Message { role: m.role, content: m.content }).collect();
            (Prompt::Chat(messages), "messages")
        }
        [] => return Err(bad("text", "the input is empty: give text, token_ids or messages".into())),
        more => {
            return Err(bad(
                more[1],
                format!("give exactly one of text, token_ids and messages, not {}", more.join(" and ")),
            ))
        }
    };
    let max_tokens = match r.max_tokens {
        None => limits.default_max_tokens,
        Some(0) => return Err(bad("max_tokens", "must be at least 1".into())),
        Some(n) if n > limits.max_tokens => {
            return Err(bad("max_tokens", format!("{n} is above the server's limit of {}", limits.max_tokens)))
        }
        Some(n) => n,
    };
    let s = r.sampling.unwrap_or_default();
    let defaults = SamplingParams::default();
    let sampling = SamplingParams {
        temperature: s.temperature.unwrap_or(defaults.temperature),
        top_k: s.top_k as usize,
        top_p: s.top_p.unwrap_or(defaults.top_p),
        min_p: s.min_p.unwrap_or(defaults.min_p),
        repetition_penalty: s.repetition_penalty.unwrap_or(defaults.repetition_penalty),
        presence_penalty: s.presence_penalty.unwrap_or(defaults.presence_penalty),
        frequency_penalty: s.frequency_penalty.unwrap_or(defaults.frequency_penalty),
        seed: s.seed,
        logprobs: r.logprobs,
        top_logprobs: r.top_logprobs as usize,
    };
    let speculative = match r.speculative {
        Some(spec) => {
            if spec.draft_tokens as usize > MAX_DRAFT_TOKENS {
                return Err(bad(
                    "speculative.draft_tokens",
                    format!("{} is above {MAX_DRAFT_TOKENS}", spec.draft_tokens),
                ));
            }
            let method = match spec.drafter.as_str() {
                "" if has_draft => DraftMethod::Model,
                "" | "prompt_lookup" => DraftMethod::PromptLookup,
                "model" if has_draft => DraftMethod::Model,
                "model" => return Err(bad("speculative.drafter", "the server was started without --draft".into())),
                other => {
                    return Err(bad(
                        "speculative.drafter",
                        format!("{other:?} is not a drafter (\"model\", \"prompt_lookup\")"),
                    ))
                }
            };
            spec.enabled.then_some(Speculation { method, draft_tokens: spec.draft_tokens as usize })
        }
        None => None,
    };
    let response_format = match r.response_format {
        Some(f) if !f.json_schema.is_empty() => {
            let schema = serde_json::from_str(&f.json_schema)
                .map_err(|e| bad("response_format.json_schema", format!("not JSON: {e}")))?;
            Some(ResponseFormat::JsonSchema(schema))
        }
        Some(f) if f.json_object => Some(ResponseFormat::JsonObject),
        _ => None,
    };
    let request = engine::Request {
        prompt,
        sampling,
        max_new_tokens: max_tokens as usize,
        stop_token_ids: r.stop_token_ids,
        stop_strings: r.stop,
        ignore_eos: r.ignore_eos,
        truncate_prompt: r.truncate_prompt,
        speculative,
        response_format,
    };
    Ok((Mapped { request, echo: r.echo }, input))
}

/// The gRPC status of an engine error; `input` names the request's input field.
fn status(e: &EngineError, input: &str) -> Status {
    match e {
        EngineError::InvalidRequest { field, reason } => {
            let field = match *field {
                "prompt" => input,
                "max_new_tokens" => "max_tokens",
                "stop_strings" => "stop",
                "temperature" | "top_p" | "min_p" | "repetition_penalty" | "presence_penalty" | "frequency_penalty" => {
                    return Status::invalid_argument(format!("sampling.{field}: {reason}"))
                }
                other => other,
            };
            Status::invalid_argument(format!("{field}: {reason}"))
        }
        EngineError::PromptTooLong { .. } => Status::invalid_argument(format!("{input}: {e}")),
        EngineError::KvMemory { .. } => Status::invalid_argument(format!("max_tokens: {e}")),
        EngineError::ChatTemplate(_) => Status::invalid_argument(format!("messages: {e}")),
        EngineError::Overloaded { .. } => Status::resource_exhausted(e.to_string()),
        EngineError::ShutDown => Status::unavailable(e.to_string()),
        EngineError::Tokenizer(_) | EngineError::Model(_) | EngineError::Constraint(_) => {
            Status::internal(e.to_string())
        }
    }
}

/// The deadline a client set with the `grpc-timeout` header (`<digits><H|M|S|m|u|n>`).
fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let v = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// One request's responses. Dropping it before the end (the client cancelled or went away)
/// cancels the request, which leaves the batch at the next step.
pub struct GenerateStream {
    id: u64,
    protocol: Protocol,
    rx: mpsc::UnboundedReceiver<Event>,
    cancel: CancelHandle,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    shared: Arc<Shared>,
    /// The prompt's ids, sent with the first message.
    echo: Vec<u32>,
    last_token: Option<Instant>,
    /// An error to report after the message that carries the tokens before it.
    error: Option<Status>,
    done: bool,
}

impl GenerateStream {
    fn end(&mut self, outcome: Outcome) {
        self.done = true;
        self.shared.metrics.outcome(self.protocol, outcome);
    }
}

impl Stream for GenerateStream {
    type Item = Result<proto::GenerateResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(e) = this.error.take() {
            return Poll::Ready(Some(Err(e)));
        }
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(d) = &mut this.deadline {
            if d.as_mut().poll(cx).is_ready() {
                this.cancel.cancel();
                this.end(Outcome::Cancelled);
                tracing::info!(id = this.id, "deadline exceeded");
                return Poll::Ready(Some(Err(Status::deadline_exceeded("the request's deadline passed"))));
            }
        }
        let mut event = match this.rx.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                this.end(Outcome::Error);
                return Poll::Ready(Some(Err(Status::unavailable("the engine shut down"))));
            }
            Poll::Ready(Some(e)) => Some(e),
        };
        let mut msg =
            proto::GenerateResponse { prompt_token_ids: std::mem::take(&mut this.echo), ..Default::default() };
        // Everything already produced goes into one message.
        while let Some(e) = event {
            match e {
                Event::Token(c) => {
                    let now = Instant::now();
                    if let Some(last) = this.last_token.replace(now) {
                        this.shared.metrics.inter_token(now - last);
                    }
                    msg.tokens.push(token(c));
                }
                Event::Text(t) => msg.text.push_str(&t),
                Event::Finished(s) => {
                    this.shared.metrics.finished(&s);
                    this.end(Outcome::Finished(&s.finish_reason));
                    tracing::info!(
                        id = this.id,
                        finish_reason = s.finish_reason.label(),
                        prompt_tokens = s.prompt_tokens,
                        generated_tokens = s.generated_tokens,
                        queue_ms = s.queue_time.as_secs_f64() * 1e3,
                        ttft_ms = s.time_to_first_token.as_secs_f64() * 1e3,
                        total_ms = s.total_time.as_secs_f64() * 1e3,
                        "request finished"
                    );
                    msg.finished = Some(finished(&s));
                    break;
                }
                Event::Failed(e) => {
                    this.end(Outcome::Error);
                    tracing::warn!(id = this.id, error = %e, "request failed");
                    let s = status(&e, "text");
                    if msg.tokens.is_empty() && msg.text.is_empty() {
                        return Poll::Ready(Some(Err(s)));
                    }
                    this.error = Some(s);
                    break;
                }
            }
            event = this.rx.try_recv().ok();
        }
        Poll::Ready(Some(Ok(msg)))
    }
}

impl Drop for GenerateStream {
    fn drop(&mut self) {
        if !self.done {
            self.shared.metrics.outcome(self.protocol, Outcome::Cancelled);
            self.cancel.cancel();
            tracing::info!(id = self.id, "request cancelled by the client");
        }
        self.shared.open_streams.fetch_sub(1, Ordering::AcqRel);
    }
}

fn token(c: Choice) -> proto::Token {
    proto::Token {
        id: c.id,
        logprob: c.logprob,
        top_logprobs: c.top.into_iter().map(|(id, logprob)| proto::TopLogprob { id, logprob }).collect(),
    }
}

fn finished(s: &Summary) -> proto::Finished {
    use proto::FinishReason as R;
    let (reason, stop) = match &s.finish_reason {
        FinishReason::Length => (R::Length, String::new()),
        FinishReason::Eos => (R::Eos, String::new()),
        FinishReason::StopToken(id) => (R::Stop, id.to_string()),
        FinishReason::StopString(text) => (R::Stop, text.clone()),
        FinishReason::ContextFull => (R::ContextFull, String::new()),
        FinishReason::Cancelled => (R::Cancelled, String::new()),
    };
    let (ttft, total) = (s.time_to_first_token.as_secs_f64(), s.total_time.as_secs_f64());
    let decode =
        if s.generated_tokens > 1 && total > ttft { (s.generated_tokens - 1) as f64 / (total - ttft) } else { 0.0 };
    proto::Finished {
        reason: reason as i32,
        stop,
        usage: Some(proto::Usage {
            prompt_tokens: s.prompt_tokens as u32,
            completion_tokens: s.generated_tokens as u32,
            cached_prompt_tokens: s.cached_prompt_tokens as u32,
        }),
        timings: Some(proto::Timings {
            queue_seconds: s.queue_time.as_secs_f64(),
            time_to_first_token_seconds: ttft,
            total_seconds: total,
            decode_tokens_per_second: decode,
        }),
        speculative: s.speculative.map(|x| proto::SpeculativeStats {
            steps: x.steps as u32,
            drafted_tokens: x.drafted as u32,
            accepted_tokens: x.accepted as u32,
            acceptance_rate: x.acceptance_rate(),
            tokens_per_step: x.tokens_per_step(),
            draft_seconds: x.draft_time.as_secs_f64(),
            verify_seconds: x.verify_time.as_secs_f64(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_tokens: 512, default_max_tokens: 64 };

    fn map(r: proto::GenerateRequest) -> Result<engine::Request, Status> {
        engine_request(r, LIMITS, false).map(|(m, _)| m.request)
    }

    fn text(t: &str) -> proto::GenerateRequest {
        proto::GenerateRequest { text: t.into(), ..Default::default() }
    }

    /// What the server answers: the mapping's refusal, else the engine's own check of the
    /// sampling parameters (as `Engine::submit_with` runs it) through `status`.
    fn refused(r: proto::GenerateRequest) -> (tonic::Code, String) {
        let s = match map(r) {
            Err(s) => s,
            Ok(request) => status(&request.sampling.validate().expect_err("refused"), "text"),
        };
        (s.code(), s.message().to_string())
    }

    #[test]
    fn unset_fields_take_the_defaults() {
        let r = map(text("hi")).expect("valid");
        assert_eq!(r.max_new_tokens, 64);
        assert_eq!(r.sampling, SamplingParams::default());
        assert_eq!(r.prompt, Prompt::Text("hi".into()));
    }

    #[test]
    fn bad_fields_are_named() {
        use tonic::Code::InvalidArgument;
        let (code, msg) = refused(proto::GenerateRequest::default());
        assert_eq!(code, InvalidArgument);
        assert!(msg.starts_with("text: the input is empty"), "{msg}");
        let (code, msg) = refused(proto::GenerateRequest { token_ids: vec![1], ..text("a") });
        assert_eq!((code, msg.starts_with("token_ids: give exactly one")), (InvalidArgument, true), "{msg}");
        let (_, msg) = refused(proto::GenerateRequest { max_tokens: Some(0), ..text("a") });
        assert!(msg.starts_with("max_tokens: must be at least 1"), "{msg}");
        let (_, msg) = refused(proto::GenerateRequest { max_tokens: Some(513), ..text("a") });
        assert!(msg.starts_with("max_tokens: 513 is above"), "{msg}");
        let sampling =
            |s: proto::SamplingParameters| refused(proto::GenerateRequest { sampling: Some(s), ..text("a") }).1;
        let msg = sampling(proto::SamplingParameters { temperature: Some(-1.0), ..Default::default() });
        assert!(msg.starts_with("sampling.temperature:"), "{msg}");
        let msg = sampling(proto::SamplingParameters { top_p: Some(1.5), ..Default::default() });
        assert!(msg.starts_with("sampling.top_p:"), "{msg}");
        let msg = sampling(proto::SamplingParameters { temperature: Some(f32::NAN), ..Default::default() });
        assert!(msg.starts_with("sampling.temperature:"), "{msg}");
        let (_, msg) = refused(proto::GenerateRequest { top_logprobs: 21, ..text("a") });
        assert!(msg.starts_with("top_logprobs:"), "{msg}");
        let spec = |enabled, draft_tokens, drafter: &str| proto::GenerateRequest {
            speculative: Some(proto::SpeculativeParameters { enabled, draft_tokens, drafter: drafter.into() }),
            ..text("a")
        };
        let (code, msg) = refused(spec(false, 17, ""));
        assert_eq!((code, msg.starts_with("speculative.draft_tokens:")), (InvalidArgument, true), "{msg}");
        let (code, msg) = refused(spec(true, 4, "model"));
        assert_eq!((code, msg.starts_with("speculative.drafter:")), (InvalidArgument, true), "{msg}");
        assert!(refused(spec(true, 4, "oracle")).1.starts_with("speculative.drafter:"));
        assert_eq!(map(spec(false, 4, "")).expect("valid").speculative, None, "speculation off is plain decoding");
        let lookup = Some(Speculation { method: DraftMethod::PromptLookup, draft_tokens: 4 });
        assert_eq!(map(spec(true, 4, "")).expect("valid").speculative, lookup, "no draft model: prompt lookup");
    }

    #[test]
    fn engine_errors_map_to_grpc_codes() {
        let overloaded = EngineError::Overloaded { waiting: 4, capacity: 4 };
        assert_eq!(status(&overloaded, "text").code(), tonic::Code::ResourceExhausted);
        let long = status(&EngineError::PromptTooLong { tokens: 9000, context: 2048 }, "token_ids");
        assert_eq!(long.code(), tonic::Code::InvalidArgument);
        assert!(long.message().starts_with("token_ids: prompt of 9000 tokens"), "{}", long.message());
        assert_eq!(status(&EngineError::ShutDown, "text").code(), tonic::Code::Unavailable);
        let stop = EngineError::InvalidRequest {
            field: "stop_token_ids",
            reason: "token id 100 is outside the vocabulary of 100".into(),
        };
        let msg = status(&stop, "text").message().to_string();
        assert!(msg.starts_with("stop_token_ids: token id 100"), "{msg}");
        assert_eq!(status(&EngineError::Model("x".into()), "text").code(), tonic::Code::Internal);
    }

    #[test]
    fn grpc_timeouts_parse_every_unit() {
        let parse = |v: &str| {
            let mut m = MetadataMap::new();
            m.insert("grpc-timeout", v.parse().expect("ascii"));
            grpc_timeout(&m)
        };
        assert_eq!(parse("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse("5x"), None);
        assert_eq!(parse(""), None);
    }
}
