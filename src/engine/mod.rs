//! The generation engine: one scheduler thread owns the model ([`Forward`]) and runs every
//! sequence in one batch. Requests arrive on a channel and join between steps (continuous
//! batching); a finished or cancelled sequence leaves at once and its slot is reused.
//!
//! Slots stay packed: the running sequences always occupy slots `0..n`, so each decode step
//! is one `Forward::step` over them. When sequence `i` leaves, the last one moves into its
//! slot (one copy of its cache, once), never a per-step copy.
//!
//! Requests are validated and tokenized by the caller's thread in [`Engine::submit`], so bad
//! input fails before it queues; the queue holds at most `queue_capacity` requests that wait
//! for a slot, and one more is refused with [`EngineError::Overloaded`].
//!
//! Where the model's KV cache is paged ([`Forward::kv_pool`]), memory is the limit, not slots:
//! a sequence holds the blocks it has filled, a request waits until its prompt's blocks are
//! free, a prompt reuses the cached blocks of its longest cached prefix, and when the pool
//! runs dry mid-generation the newest sequence is preempted and recomputed later
//! ([`paging`]).

pub mod chat;
pub mod grammar;
pub mod kv;
pub mod native;
mod paging;
pub mod sampling;
pub mod speculative;
#[cfg(test)]
mod tests;
pub mod text;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ndarray::Array2;

use self::chat::{ChatTemplate, Message};
use self::grammar::{Constraint, Grammars, ResponseFormat};
use self::sampling::{Sampler, SamplingParams};
use self::speculative::{judge, prompt_lookup, DraftMethod, DraftModel, SpecState, SpecStats, Speculation, Verdict};
use self::text::{Detokenizer, Filtered, StopStrings};
use crate::model::reference::argmax;
use crate::model::tokenizer::from_file;
use crate::model::ModelTokenizer;
use crate::onnx::manifest::{self, Manifest};
use crate::runtime::{Forward, KvPool, RuntimeError};

/// Why a request was refused or failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// A request field is out of range.
    #[error("invalid request: {field}: {reason}")]
    InvalidRequest {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The prompt does not fit the context and the request did not ask for truncation.
    #[error("prompt of {tokens} tokens does not fit the context of {context} positions (ask for truncation to keep its end)")]
    PromptTooLong {
        /// Prompt tokens.
        tokens: usize,
        /// Positions per sequence.
        context: usize,
    },
    /// The queue is full.
    #[error("overloaded: {waiting} requests already wait for a slot (queue capacity {capacity})")]
    Overloaded {
        /// Requests waiting.
        waiting: usize,
        /// The queue's bound.
        capacity: usize,
    },
    /// The chat template failed to compile or render.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// Tokenizing or detokenizing failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The model failed.
    #[error("model: {0}")]
    Model(String),
    /// The request's prompt and `max_new_tokens` need more KV memory than the whole pool.
    #[error("prompt of {prompt} tokens plus up to {max_new_tokens} new ones needs {positions} KV positions ({blocks} blocks, {mib:.1} MiB), more than the whole KV pool of {pool_blocks} blocks ({pool_mib:.1} MiB, --kv-memory)")]
    KvMemory {
        /// Prompt tokens.
        prompt: usize,
        /// Tokens asked for.
        max_new_tokens: usize,
        /// Positions the request can fill (capped by the context).
        positions: usize,
        /// Blocks they take.
        blocks: usize,
        /// Their bytes, in MiB.
        mib: f64,
        /// Blocks in the pool.
        pool_blocks: usize,
        /// The pool's bytes, in MiB.
        pool_mib: f64,
    },
    /// A constrained sequence's grammar failed mid-generation.
    #[error("constrained output: {0}")]
    Constraint(String),
    /// The engine has stopped.
    #[error("the engine has shut down")]
    ShutDown,
}

impl EngineError {
    /// A stable label for metrics and tests.
    pub fn kind(&self) -> &'static str {
        match self {
            EngineError::InvalidRequest { .. } => "invalid_request",
            EngineError::PromptTooLong { .. } => "prompt_too_long",
            EngineError::KvMemory { .. } => "kv_memory",
            EngineError::Overloaded { .. } => "overloaded",
            EngineError::ChatTemplate(_) => "chat_template",
            EngineError::Tokenizer(_) => "tokenizer",
            EngineError::Model(_) => "model",
            EngineError::Constraint(_) => "constraint",
            EngineError::ShutDown => "shut_down",
        }
    }
}

impl From<RuntimeError> for EngineError {
    fn from(e: RuntimeError) -> Self {
        EngineError::Model(e.to_string())
    }
}

/// What to continue.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Plain text (BOS added when the model expects it).
    Text(String),
    /// Chat messages, rendered with the model's chat template.
    Chat(Vec<Message>),
    /// Token ids, used as given.
    Tokens(Vec<u32>),
}

/// One generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// What to continue.
    pub prompt: Prompt,
    /// How tokens are chosen.
    pub sampling: SamplingParams,
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Token ids that end generation (besides EOS); not part of the output.
    pub stop_token_ids: Vec<u32>,
    /// Strings that end generation; neither they nor anything after them is output.
    pub stop_strings: Vec<String>,
    /// Keep generating past EOS.
    pub ignore_eos: bool,
    /// A prompt longer than the context keeps its last tokens instead of failing.
    pub truncate_prompt: bool,
    /// Speculative decoding (none: plain decoding).
    pub speculative: Option<Speculation>,
    /// What the output must be (none: free text).
    pub response_format: Option<ResponseFormat>,
}

impl Default for Request {
    fn default() -> Self {
        Request {
            prompt: Prompt::Text(String::new()),
            sampling: SamplingParams::default(),
            max_new_tokens: 128,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            ignore_eos: false,
            truncate_prompt: false,
            speculative: None,
            response_format: None,
        }
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `max_new_tokens` reached.
    Length,
    /// The sequence filled its context.
    ContextFull,
    /// The model produced EOS, or a constrained output is complete.
    Eos,
    /// A stop token id.
    StopToken(u32),
    /// A stop string.
    StopString(String),
    /// The caller cancelled it.
    Cancelled,
}

impl FinishReason {
    /// Short label (`length`, `context_full`, `eos`, `stop_token`, `stop_string`, `cancelled`).
    pub fn label(&self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::ContextFull => "context_full",
            FinishReason::Eos => "eos",
            FinishReason::StopToken(_) => "stop_token",
            FinishReason::StopString(_) => "stop_string",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Counts and timings of a finished request.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Prompt tokens (after truncation).
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache (not computed).
    pub cached_prompt_tokens: usize,
    /// Tokens generated (stop tokens excluded).
    pub generated_tokens: usize,
    /// Submission to the start of its prefill (waiting for a slot).
    pub queue_time: Duration,
    /// Submission to first token, including time in the queue.
    pub time_to_first_token: Duration,
    /// Submission to the end.
    pub total_time: Duration,
    /// What speculative decoding did (speculative requests only).
    pub speculative: Option<SpecStats>,
}

/// What a request's stream carries, in order: per generated token a [`Event::Token`] and,
/// whenever text can be shown, a [`Event::Text`]; then one [`Event::Finished`] or
/// [`Event::Failed`].
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token.
    Token(sampling::Choice),
    /// Text to append (valid UTF-8, stop strings withheld).
    Text(String),
    /// The request ended normally.
    Finished(Summary),
    /// The request failed.
    Failed(EngineError),
}

/// Receives a request's events; returns `false` when nobody listens any more (the request
/// is then cancelled).
pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

/// Engine settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// Requests that may wait for a slot before new ones are refused.
    pub queue_capacity: usize,
    /// Reuse the KV blocks of cached prompt prefixes (paged caches only).
    pub prefix_cache: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions { queue_capacity: 64, prefix_cache: true }
    }
}

/// A running request seen from the caller: its events, and a way to cancel it.
pub struct Generation {
    /// The request's events.
    pub events: mpsc::Receiver<Event>,
    /// Cancels the request.
    pub cancel: CancelHandle,
}

impl Generation {
    /// Waits for the end and collects token ids, text and summary.
    pub fn collect(self) -> Result<Output, EngineError> {
        let mut out = Output::default();
        for event in self.events {
            match event {
                Event::Token(c) => out.token_ids.push(c.id),
                Event::Text(t) => out.text.push_str(&t),
                Event::Finished(s) => {
                    out.summary = Some(s);
                    return Ok(out);
                }
                Event::Failed(e) => return Err(e),
            }
        }
        Err(EngineError::ShutDown)
    }
}

/// A whole generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Output {
    /// Generated token ids.
    pub token_ids: Vec<u32>,
    /// Generated text.
    pub text: String,
    /// Counts and timings.
    pub summary: Option<Summary>,
}

/// Cancels one request; the engine frees its slot before its next step.
#[derive(Debug, Clone)]
pub struct CancelHandle(Arc<AtomicBool>);

impl CancelHandle {
    /// Asks the engine to stop the request.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The engine: a handle to its scheduler thread. Dropping it stops the thread after
/// failing the requests still running with [`EngineError::ShutDown`].
pub struct Engine {
    commands: Option<mpsc::Sender<Admitted>>,
    thread: Option<JoinHandle<()>>,
    waiting: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    options: EngineOptions,
    tokenizer: Arc<ModelTokenizer>,
    template: Option<ChatTemplate>,
    slots: usize,
    context: usize,
    kv: Option<KvPool>,
    blocks_in_use: Arc<AtomicUsize>,
    preemptions: Arc<AtomicUsize>,
    has_draft: bool,
    /// Built at the first constrained request.
    grammars: std::sync::OnceLock<Result<Grammars, EngineError>>,
}

/// Opens a draft model on the engine's thread.
pub type OpenDraft = Box<dyn FnOnce() -> Result<Box<dyn Forward>, RuntimeError> + Send>;

/// How busy the engine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Sequences in slots.
    pub running: usize,
    /// Requests waiting for a slot.
    pub waiting: usize,
    /// KV blocks sequences hold (paged caches; else 0).
    pub kv_blocks_in_use: usize,
    /// KV blocks in the pool (paged caches; else 0).
    pub kv_blocks: usize,
    /// Sequences preempted for KV memory so far.
    pub preemptions: usize,
}

/// A validated, tokenized request on its way to the scheduler.
struct Admitted {
    prompt: Vec<u32>,
    request: Request,
    sink: Sink,
    cancel: Arc<AtomicBool>,
    submitted: Instant,
    constraint: Option<Constraint>,
}

impl Engine {
    /// Starts the scheduler thread; `open` builds the model on that thread (so it never
    /// moves between threads) and its error is returned here.
    pub fn start<F, O>(open: O, tokenizer: ModelTokenizer, options: EngineOptions) -> Result<Engine, EngineError>
    where
        F: Forward + 'static,
        O: FnOnce() -> Result<F, RuntimeError> + Send + 'static,
    {
        Engine::start_with_draft(open, None, tokenizer, options)
    }

    /// As [`start`](Self::start), with a draft model for speculative requests (same slots
    /// as the target; its tokenizer must be the target's, which the caller checks).
    pub fn start_with_draft<F, O>(
        open: O,
        draft: Option<OpenDraft>,
        tokenizer: ModelTokenizer,
        options: EngineOptions,
    ) -> Result<Engine, EngineError>
    where
        F: Forward + 'static,
        O: FnOnce() -> Result<F, RuntimeError> + Send + 'static,
    {
        let has_draft = draft.is_some();
        let template = match &tokenizer.chat_template {
            Some(source) => {
                let text = |id: Option<u32>| id.and_then(|i| tokenizer.inner().id_to_token(i)).unwrap_or_default();
                Some(ChatTemplate::new(source, &text(tokenizer.bos_id), &text(tokenizer.eos_ids.first().copied()))?)
            }
            None => None,
        };
        let tokenizer = Arc::new(tokenizer);
        let (commands, inbox) = mpsc::channel::<Admitted>();
        let (ready_tx, ready) = mpsc::channel::<Result<(usize, usize, Option<KvPool>), EngineError>>();
        let waiting = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicUsize::new(0));
        let blocks_in_use = Arc::new(AtomicUsize::new(0));
        let preemptions = Arc::new(AtomicUsize::new(0));
        let (tok, w, r) = (tokenizer.clone(), waiting.clone(), running.clone());
        let (b, p) = (blocks_in_use.clone(), preemptions.clone());
        let thread = std::thread::Builder::new()
            .name("kiln-engine".into())
            .spawn(move || {
                let opened = open().and_then(|m| {
                    let draft = draft.map(|d| d()).transpose()?;
                    if let Some(d) = &draft {
                        if d.slots() != m.slots() {
                            return Err(RuntimeError::Run(format!(
                                "the draft model has {} slots, the target {}",
                                d.slots(),
                                m.slots()
                            )));
                        }
                    }
                    Ok((m, draft))
                });
                let (model, draft) = match opened {
                    Ok(m) => m,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok((model.slots(), model.max_context(), model.kv_pool())));
                let mut scheduler = Scheduler::new(model, tok, w, r);
                scheduler.draft = draft.map(DraftModel::new);
                scheduler.pool =
                    scheduler.model.kv_pool().map(|p| kv::BlockPool::new(p.blocks, p.block_size, options.prefix_cache));
                (scheduler.blocks_in_use, scheduler.preemptions) = (b, p);
                scheduler.run(inbox);
            })
            .map_err(|e| EngineError::Model(format!("starting the engine thread: {e}")))?;
        let (slots, context, kv) = ready.recv().map_err(|_| EngineError::ShutDown)??;
        Ok(Engine {
            commands: Some(commands),
            thread: Some(thread),
            waiting,
            running,
            options,
            tokenizer,
            template,
            slots,
            context,
            kv,
            blocks_in_use,
            preemptions,
            has_draft,
            grammars: std::sync::OnceLock::new(),
        })
    }

    /// Whether a draft model is loaded (for [`DraftMethod::Model`]).
    pub fn has_draft(&self) -> bool {
        self.has_draft
    }

    /// Sequences that run at once.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Positions per sequence (prompt plus output).
    pub fn context(&self) -> usize {
        self.context
    }

    /// The paged KV pool, where the model's cache is one.
    pub fn kv_pool(&self) -> Option<KvPool> {
        self.kv
    }

    /// Requests running now (slots in use) and waiting for a slot, and KV blocks in use.
    pub fn load(&self) -> Load {
        Load {
            running: self.running.load(Ordering::Acquire),
            waiting: self.waiting.load(Ordering::Acquire),
            kv_blocks_in_use: self.blocks_in_use.load(Ordering::Acquire),
            kv_blocks: self.kv.map_or(0, |k| k.blocks),
            preemptions: self.preemptions.load(Ordering::Acquire),
        }
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &ModelTokenizer {
        &self.tokenizer
    }

    /// The token ids `prompt` stands for.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        let tok = |e: crate::model::tokenizer::TokenizerError| EngineError::Tokenizer(e.to_string());
        match prompt {
            Prompt::Text(text) => self.tokenizer.encode_prompt(text).map_err(tok),
            Prompt::Chat(messages) => {
                let template = self.template.as_ref().ok_or_else(|| EngineError::InvalidRequest {
                    field: "messages",
                    reason: "the model has no chat template".into(),
                })?;
                self.tokenizer.encode(&template.render(messages)?).map_err(tok)
            }
            Prompt::Tokens(ids) => {
                let vocab = self.tokenizer.vocab_size();
                if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
                    return Err(EngineError::InvalidRequest {
                        field: "prompt",
                        reason: format!("token id {bad} is outside the vocabulary of {vocab}"),
                    });
                }
                Ok(ids.clone())
            }
        }
    }

    /// Submits `request`; its events go to the returned channel. Dropping the receiver
    /// cancels the request.
    pub fn submit(&self, request: Request) -> Result<Generation, EngineError> {
        let (tx, events) = mpsc::channel();
        let cancel = self.submit_with(request, Box::new(move |e| tx.send(e).is_ok()))?;
        Ok(Generation { events, cancel })
    }

    /// The grammar state `request`'s output starts in.
    fn constrain(&self, request: &Request, format: &ResponseFormat) -> Result<Constraint, EngineError> {
        let refuse = |field, with| EngineError::InvalidRequest {
            field,
            reason: format!("cannot be combined with {with} (constrained output ends at the grammar's end)"),
        };
        if request.speculative.is_some() {
            return Err(refuse("speculative", "response_format"));
        }
        if request.ignore_eos {
            return Err(refuse("ignore_eos", "response_format"));
        }
        let grammars = self.grammars.get_or_init(|| Grammars::new(&self.tokenizer));
        grammars.as_ref().map_err(Clone::clone)?.compile(format)
    }

    /// Submits `request` with its events going to `sink`.
    pub fn submit_with(&self, request: Request, sink: Sink) -> Result<CancelHandle, EngineError> {
        request.sampling.validate()?;
        if request.max_new_tokens == 0 {
            return Err(EngineError::InvalidRequest { field: "max_new_tokens", reason: "must be at least 1".into() });
        }
        if request.stop_strings.iter().any(|s| s.is_empty()) {
            return Err(EngineError::InvalidRequest { field: "stop_strings", reason: "empty stop string".into() });
        }
        if let Some(spec) = &request.speculative {
            if spec.draft_tokens > speculative::MAX_DRAFT_TOKENS {
                return Err(EngineError::InvalidRequest {
                    field: "speculative.draft_tokens",
                    reason: format!("{} is above {}", spec.draft_tokens, speculative::MAX_DRAFT_TOKENS),
                });
            }
            if spec.method == DraftMethod::Model && !self.has_draft {
                return Err(EngineError::InvalidRequest {
                    field: "speculative.drafter",
                    reason: "no draft model is loaded (prompt lookup needs none)".into(),
                });
            }
        }
        let constraint = match &request.response_format {
            Some(format) => Some(self.constrain(&request, format)?),
            None => None,
        };
        let vocab = self.tokenizer.vocab_size();
        if let Some(bad) = request.stop_token_ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(EngineError::InvalidRequest {
                field: "stop_token_ids",
                reason: format!("token id {bad} is outside the vocabulary of {vocab}"),
            });
        }
        let mut prompt = self.prompt_ids(&request.prompt)?;
        if prompt.is_empty() {
            return Err(EngineError::InvalidRequest { field: "prompt", reason: "empty prompt".into() });
        }
        if prompt.len() >= self.context {
            if !request.truncate_prompt {
                return Err(EngineError::PromptTooLong { tokens: prompt.len(), context: self.context });
            }
            // Keep the end, with room for the requested output (at least one token).
            let room = request.max_new_tokens.clamp(1, self.context - 1);
            prompt.drain(..prompt.len() - (self.context - room));
        }
        if let Some(kv) = self.kv {
            let positions = (prompt.len() + request.max_new_tokens).min(self.context);
            let blocks = positions.div_ceil(kv.block_size);
            if blocks > kv.blocks {
                let mib = |blocks: usize| (blocks * kv.block_bytes) as f64 / f64::from(1 << 20);
                return Err(EngineError::KvMemory {
                    prompt: prompt.len(),
                    max_new_tokens: request.max_new_tokens,
                    positions,
                    blocks,
                    mib: mib(blocks),
                    pool_blocks: kv.blocks,
                    pool_mib: mib(kv.blocks),
                });
            }
        }
        let capacity = self.options.queue_capacity;
        self.waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| (w < capacity).then_some(w + 1))
            .map_err(|waiting| EngineError::Overloaded { waiting, capacity })?;
        let cancel = Arc::new(AtomicBool::new(false));
        let admitted =
            Admitted { prompt, request, sink, cancel: cancel.clone(), submitted: Instant::now(), constraint };
        let sent = self.commands.as_ref().map(|c| c.send(admitted).is_ok()).unwrap_or(false);
        if !sent {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::ShutDown);
        }
        Ok(CancelHandle(cancel))
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        drop(self.commands.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One running sequence.
struct Sequence {
    /// Its request (sampling aside).
    request: Request,
    sink: Sink,
    cancel: Arc<AtomicBool>,
    sampler: Sampler,
    detok: Detokenizer,
    stops: StopStrings,
    prompt_tokens: usize,
    generated: usize,
    /// Positions in the cache.
    past: usize,
    /// The last sampled token, fed at the next step.
    next: u32,
    submitted: Instant,
    /// Time from submission to the start of its prefill.
    queued: Duration,
    first_token: Option<Duration>,
    done: bool,
    /// Speculation state (speculative requests only).
    spec: Option<SpecState>,
    /// Prompt and generated tokens: what drafters read, and what a preempted sequence
    /// recomputes (`history[..past]` is cached, `history[past]` is `next`).
    history: Vec<u32>,
    /// The grammar its output follows (constrained requests only).
    constraint: Option<Constraint>,
    /// Masked logits of a constrained sequence (reused between steps).
    masked: Vec<f32>,
    /// Its KV blocks (paged caches only; none while preempted).
    table: Option<kv::Table>,
    /// Prompt tokens that came from the prefix cache.
    cached_prompt: usize,
    /// Taken out to free its blocks: it comes back when there is room.
    preempted: bool,
}

impl Sequence {
    /// Chooses the next token from `logits`, masked by the grammar of a constrained sequence.
    fn choose(&mut self, logits: &[f32]) -> Result<sampling::Choice, EngineError> {
        let Some(constraint) = &mut self.constraint else {
            return Ok(self.sampler.choose(logits));
        };
        self.masked.clear();
        self.masked.extend_from_slice(logits);
        constraint.mask(&mut self.masked)?;
        Ok(self.sampler.choose(&self.masked))
    }

    /// Ends the sequence without more text.
    fn end(&mut self, reason: FinishReason) {
        let summary = Summary {
            finish_reason: reason,
            prompt_tokens: self.prompt_tokens,
            cached_prompt_tokens: self.cached_prompt,
            generated_tokens: self.generated,
            queue_time: self.queued,
            time_to_first_token: self.first_token.unwrap_or_default(),
            total_time: self.submitted.elapsed(),
            speculative: self.spec.as_ref().map(|s| s.stats),
        };
        (self.sink)(Event::Finished(summary));
        self.done = true;
    }
}

/// Ends a request cancelled before its first token (waiting, or during its prefill).
fn cancelled_before_start(a: Admitted, queue_time: Duration) {
    let mut sink = a.sink;
    sink(Event::Finished(Summary {
        finish_reason: FinishReason::Cancelled,
        prompt_tokens: a.prompt.len(),
        cached_prompt_tokens: 0,
        generated_tokens: 0,
        queue_time,
        time_to_first_token: Duration::ZERO,
        total_time: a.submitted.elapsed(),
        speculative: None,
    }));
}

/// The scheduler. Running sequences are packed in slots `0..n`, plain ones first (`0..p`,
/// decoded together by one `Forward::step`), speculative ones after them (each drafted and
/// verified by a pass of its own).
struct Scheduler<F: Forward> {
    model: F,
    draft: Option<DraftModel>,
    tokenizer: Arc<ModelTokenizer>,
    waiting_count: Arc<AtomicUsize>,
    running_count: Arc<AtomicUsize>,
    waiting: VecDeque<Admitted>,
    running: Vec<Sequence>,
    /// The paged KV cache's books (paged models only).
    pool: Option<kv::BlockPool>,
    /// Blocks in use and preemptions so far, for [`Engine::load`].
    blocks_in_use: Arc<AtomicUsize>,
    preemptions: Arc<AtomicUsize>,
    /// Preempted sequences, oldest first: they come back before new requests.
    preempted: VecDeque<Sequence>,
}

/// N-gram length prompt lookup starts from.
const LOOKUP_NGRAM: usize = 3;

/// Prompt tokens per prefill pass: a long prompt is prefilled in chunks with decode steps of
/// the running sequences between them, so it delays their next token by one chunk's time,
/// not by its whole prefill. Every prompt is chunked alike, alone or in a batch.
pub const PREFILL_CHUNK: usize = 256;

impl<F: Forward> Scheduler<F> {
    fn new(
        model: F,
        tokenizer: Arc<ModelTokenizer>,
        waiting_count: Arc<AtomicUsize>,
        running_count: Arc<AtomicUsize>,
    ) -> Self {
        Scheduler {
            model,
            draft: None,
            tokenizer,
            waiting_count,
            running_count,
            waiting: VecDeque::new(),
            running: Vec::new(),
            pool: None,
            blocks_in_use: Arc::new(AtomicUsize::new(0)),
            preemptions: Arc::new(AtomicUsize::new(0)),
            preempted: VecDeque::new(),
        }
    }

    fn run(mut self, inbox: mpsc::Receiver<Admitted>) {
        loop {
            // Block only when there is nothing to do.
            if self.running.is_empty() && self.waiting.is_empty() && self.preempted.is_empty() {
                match inbox.recv() {
                    Ok(a) => self.waiting.push_back(a),
                    Err(_) => return,
                }
            }
            loop {
                match inbox.try_recv() {
                    Ok(a) => self.waiting.push_back(a),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        self.shut_down();
                        return;
                    }
                }
            }
            self.admit();
            self.step();
            self.release();
            self.running_count.store(self.running.len(), Ordering::Release);
            if let Some(pool) = &self.pool {
                self.blocks_in_use.store(pool.in_use(), Ordering::Release);
            }
        }
    }

    /// Plain sequences (slots `0..p`).
    fn plain(&self) -> usize {
        self.running.iter().take_while(|s| s.spec.is_none()).count()
    }

    /// Moves the cache of the sequence in slot `from` (of `len` positions) to slot `to`.
    fn move_cache(&mut self, from: usize, to: usize, len: usize) -> Result<(), RuntimeError> {
        self.model.move_slot(from, to, len)?;
        if let Some(d) = &mut self.draft {
            d.move_slot(from, to)?;
        }
        Ok(())
    }

    /// Fails every running sequence (the model is in an unknown state).
    fn fail_all(&mut self, e: RuntimeError) {
        let e = EngineError::from(e);
        for mut seq in std::mem::take(&mut self.running) {
            (seq.sink)(Event::Failed(e.clone()));
            self.free_blocks(&mut seq, false);
        }
    }

    /// The running state of admitted request `a`, prefilled and waiting for its first token.
    fn sequence(&self, a: Admitted, queued: Duration) -> Sequence {
        Sequence {
            sampler: Sampler::new(a.request.sampling.clone(), self.model.vocab_size(), &a.prompt),
            stops: StopStrings::new(&a.request.stop_strings),
            spec: a.request.speculative.map(SpecState::new),
            history: a.prompt.clone(),
            constraint: a.constraint,
            masked: Vec::new(),
            table: None,
            cached_prompt: 0,
            preempted: false,
            request: a.request,
            sink: a.sink,
            cancel: a.cancel,
            detok: Detokenizer::default(),
            prompt_tokens: a.prompt.len(),
            generated: 0,
            past: a.prompt.len(),
            next: 0,
            submitted: a.submitted,
            queued,
            first_token: None,
            done: false,
        }
    }

    /// Admits a burst: waiting plain requests whose prompts have one length (one prefill
    /// chunk at most) are prefilled together, in one pass over consecutive free slots, when
    /// no speculative sequence runs. Each row is computed as it would be alone.
    fn admit_burst(&mut self) {
        let first = self.running.len();
        if self.plain() != first {
            return;
        }
        let Some(len) = self.waiting.front().map(|a| a.prompt.len()).filter(|&len| len <= PREFILL_CHUNK) else {
            return;
        };
        let free = self.model.slots() - first;
        let mut burst = self
            .waiting
            .iter()
            .take(free)
            .take_while(|a| {
                a.prompt.len() == len && a.request.speculative.is_none() && !a.cancel.load(Ordering::Relaxed)
            })
            .count();
        // A paged cache: blocks for each, and none with a cached prefix (those go alone).
        let tables = self.burst_tables(&mut burst, len);
        if burst < 2 {
            return;
        }
        let admitted: Vec<Admitted> = self.waiting.drain(..burst).collect();
        self.waiting_count.fetch_sub(burst, Ordering::AcqRel);
        if let Some(d) = &mut self.draft {
            (first..first + burst).for_each(|slot| d.release(slot));
        }
        let queued: Vec<Duration> = admitted.iter().map(|a| a.submitted.elapsed()).collect();
        let prompts: Vec<&[u32]> = admitted.iter().map(|a| a.prompt.as_slice()).collect();
        let bound: Result<(), RuntimeError> =
            tables.iter().enumerate().try_for_each(|(i, t)| self.model.bind_blocks(first + i, t.blocks()));
        let logits = match bound.and_then(|()| self.model.prefill_rows(first, &prompts)) {
            Ok(l) => l,
            Err(e) => {
                let e = EngineError::from(e);
                for a in admitted {
                    let mut sink = a.sink;
                    sink(Event::Failed(e.clone()));
                }
                if let Some(pool) = &mut self.pool {
                    tables.into_iter().for_each(|t| pool.release(t));
                }
                return;
            }
        };
        let mut tables = tables.into_iter();
        // Counted before their first tokens go out: a client that sees one sees it running.
        self.running_count.store(first + burst, Ordering::Release);
        for ((a, queued), row) in admitted.into_iter().zip(queued).zip(logits.rows()) {
            let mut seq = self.sequence(a, queued);
            seq.table = tables.next();
            self.commit(&mut seq);
            self.next_token(&mut seq, row.as_slice().expect("logits rows are contiguous"));
            self.running.push(seq);
        }
        self.running_count.store(self.running.len(), Ordering::Release);
        if self.running.iter().any(|s| s.done) {
            self.release();
        }
    }

    /// Prefills waiting requests into free slots (preempted sequences first).
    fn admit(&mut self) {
        self.resume();
        if !self.preempted.is_empty() {
            return;
        }
        self.admit_burst();
        while self.running.len() < self.model.slots() {
            let Some(a) = self.waiting.front() else { break };
            if a.cancel.load(Ordering::Relaxed) {
                let a = self.waiting.pop_front().expect("a front request");
                self.waiting_count.fetch_sub(1, Ordering::AcqRel);
                let waited = a.submitted.elapsed();
                cancelled_before_start(a, waited);
                continue;
            }
            // A paged cache: the prompt's blocks (its cached prefix reused), or it waits.
            let reserved = match &mut self.pool {
                Some(pool) => match pool.admit(&a.prompt[..a.prompt.len() - 1], a.prompt.len()) {
                    Some(r) => Some(r),
                    None => break,
                },
                None => None,
            };
            let a = self.waiting.pop_front().expect("a front request");
            self.waiting_count.fetch_sub(1, Ordering::AcqRel);
            let (mut table, cached) = reserved.map_or((None, 0), |(t, c)| (Some(t), c));
            let slot = match self.open_slot(a.request.speculative.is_some(), table.as_ref()) {
                Ok(slot) => slot,
                Err(e) => {
                    self.give_back(table);
                    return self.fail_all(e);
                }
            };
            let queued = a.submitted.elapsed();
            let prefilled = self.prefill(slot, &a.prompt, cached, &a.cancel);
            if !matches!(prefilled, Ok(Some(_))) {
                self.give_back(table.take());
                if let Err(e) = self.close_slot(slot) {
                    return self.fail_all(e);
                }
            }
            let logits = match prefilled {
                Ok(Some(l)) => l,
                Ok(None) => {
                    cancelled_before_start(a, queued);
                    continue;
                }
                Err(e) => {
                    let mut sink = a.sink;
                    sink(Event::Failed(e.into()));
                    continue;
                }
            };
            let mut seq = self.sequence(a, queued);
            (seq.table, seq.cached_prompt) = (table, cached);
            self.commit(&mut seq);
            let row = logits.row(0);
            let row = row.as_slice().expect("logits rows are contiguous");
            self.running_count.store(self.running.len() + 1, Ordering::Release);
            self.next_token(&mut seq, row);
            self.place(slot, seq);
        }
    }

    /// Frees slot `slot` for a new sequence (a plain one takes slot p, and the speculative
    /// sequence there moves to the end; a speculative one takes the end), with `table` as its
    /// blocks where the cache is paged; returns the slot.
    fn open_slot(&mut self, speculative: bool, table: Option<&kv::Table>) -> Result<usize, RuntimeError> {
        let slot = if speculative { self.running.len() } else { self.plain() };
        if slot < self.running.len() {
            let (end, len) = (self.running.len(), self.running[slot].past);
            self.move_cache(slot, end, len)?;
        }
        if let Some(d) = &mut self.draft {
            d.release(slot);
        }
        if let Some(t) = table {
            self.model.bind_blocks(slot, t.blocks())?;
        }
        Ok(slot)
    }

    /// Undoes [`Self::open_slot`] for a sequence that did not start.
    fn close_slot(&mut self, slot: usize) -> Result<(), RuntimeError> {
        if slot < self.running.len() {
            let (end, len) = (self.running.len(), self.running[slot].past);
            self.move_cache(end, slot, len)?;
        }
        Ok(())
    }

    /// Puts `seq` in the slot [`Self::open_slot`] gave it.
    fn place(&mut self, slot: usize, seq: Sequence) {
        if slot < self.running.len() {
            let moved = std::mem::replace(&mut self.running[slot], seq);
            self.running.push(moved);
        } else {
            self.running.push(seq);
        }
        self.running_count.store(self.running.len(), Ordering::Release);
        if self.running.iter().any(|s| s.done) {
            self.release();
        }
    }

    /// Prefills `prompt` from position `past` (the positions before are cached) into `slot`
    /// in chunks of [`PREFILL_CHUNK`] tokens, the running plain sequences decoding one step
    /// between chunks; returns the last position's logits, or `None` when the request was
    /// cancelled on the way.
    fn prefill(
        &mut self,
        slot: usize,
        prompt: &[u32],
        mut past: usize,
        cancel: &AtomicBool,
    ) -> Result<Option<Array2<f32>>, RuntimeError> {
        loop {
            let end = (past + PREFILL_CHUNK).min(prompt.len());
            let logits = self.model.extend(slot, past, &prompt[past..end], 1)?;
            if end == prompt.len() {
                return Ok(Some(logits));
            }
            past = end;
            if cancel.load(Ordering::Relaxed) {
                return Ok(None);
            }
            // Finished sequences keep their slots until `release`, which would move caches
            // under this prefill: with one among them, the step waits for the prefill.
            let p = self.plain();
            if self.running[..p].iter().all(|s| !s.done && !s.cancel.load(Ordering::Relaxed)) && self.room_for_step(p) {
                self.step_plain(p);
            }
        }
    }

    /// One decode step: the plain sequences together, then each speculative one.
    fn step(&mut self) {
        self.release();
        if self.make_room() {
            // The preempted leave their slots.
            self.release();
        }
        let p = self.plain();
        self.step_plain(p);
        let mut running = std::mem::take(&mut self.running);
        for (slot, seq) in running.iter_mut().enumerate().skip(p) {
            if seq.done || seq.cancel.load(Ordering::Relaxed) {
                continue;
            }
            if let Err(e) = self.speculate(slot, seq) {
                (seq.sink)(Event::Failed(e.into()));
                seq.done = true;
            }
        }
        self.running = running;
    }

    /// Decodes the plain sequences (slots `0..p`) one token, in one batched step.
    fn step_plain(&mut self, p: usize) {
        if p == 0 {
            return;
        }
        let rows: Vec<(u32, usize)> = self.running[..p].iter().map(|s| (s.next, s.past)).collect();
        match self.model.step(&rows) {
            Ok(logits) => {
                let mut running = std::mem::take(&mut self.running);
                for (seq, row) in running.iter_mut().zip(logits.rows()) {
                    seq.past += 1;
                    self.commit(seq);
                    self.next_token(seq, row.as_slice().expect("logits rows are contiguous"));
                }
                self.running = running;
            }
            Err(e) => {
                let e = EngineError::from(e);
                for seq in &mut self.running[..p] {
                    (seq.sink)(Event::Failed(e.clone()));
                    seq.done = true;
                }
            }
        }
    }

    /// Drafts for `seq` (in `slot`), verifies the drafts in one target pass and streams
    /// what stands.
    fn speculate(&mut self, slot: usize, seq: &mut Sequence) -> Result<(), RuntimeError> {
        let spec = seq.spec.as_mut().expect("speculative sequence");
        // Room for the drafts and the token after them, in the output and in the context.
        let room = (seq.request.max_new_tokens - seq.generated).min(self.model.max_context() - seq.past);
        let k = spec.k.min(room.saturating_sub(1));
        let k = self.draft_room(slot, seq, k)?;
        let spec = seq.spec.as_mut().expect("speculative sequence");
        let t = Instant::now();
        let drafts = match (spec.settings.method, &mut self.draft) {
            (_, _) if k == 0 => Vec::new(),
            (DraftMethod::PromptLookup, _) => prompt_lookup(&seq.history, k, LOOKUP_NGRAM),
            (DraftMethod::Model, Some(d)) => {
                let mut fork = seq.sampler.fork();
                d.draft(slot, &seq.history, k, &mut fork)?
            }
            (DraftMethod::Model, None) => Vec::new(),
        };
        spec.stats.draft_time += t.elapsed();
        let t = Instant::now();
        let mut input = Vec::with_capacity(drafts.len() + 1);
        input.push(seq.next);
        input.extend(drafts.iter().map(|d| d.token));
        let logits = self.model.extend(slot, seq.past, &input, input.len())?;
        let spec = seq.spec.as_mut().expect("speculative sequence");
        spec.stats.verify_time += t.elapsed();
        spec.stats.steps += 1;
        spec.stats.drafted += drafts.len();
        let mut accepted = 0;
        for (j, row) in logits.rows().into_iter().enumerate() {
            let row = row.as_slice().expect("logits rows are contiguous");
            let p = seq.sampler.probabilities(row);
            let (token, last) = match drafts.get(j) {
                Some(d) => match judge(&mut seq.sampler, &p, d, true) {
                    Verdict::Accept => (d.token, false),
                    Verdict::Replace(t) => (t, true),
                },
                // All drafts stood: a bonus token from the target.
                None => (seq.sampler.draw_from(&p).unwrap_or_else(|| argmax(row.into())), true),
            };
            if !last {
                accepted += 1;
                // Counted before the token is streamed: it may end the request (and its summary).
                seq.spec.as_mut().expect("speculative sequence").stats.accepted += 1;
            }
            seq.past += 1;
            self.commit(seq);
            let choice = seq.sampler.take(token, row);
            self.accept(seq, choice);
            if seq.done || last {
                break;
            }
        }
        seq.spec.as_mut().expect("speculative sequence").adapt(drafts.len(), accepted);
        Ok(())
    }

    /// Chooses `seq`'s next token from `logits` and streams it.
    fn next_token(&self, seq: &mut Sequence, logits: &[f32]) {
        match seq.choose(logits) {
            Ok(choice) => self.accept(seq, choice),
            Err(e) => self.fail(seq, e),
        }
    }

    /// Streams `choice` for `seq` and decides whether it ends.
    fn accept(&self, seq: &mut Sequence, choice: sampling::Choice) {
        let id = choice.id;
        if seq.first_token.is_none() {
            seq.first_token = Some(seq.submitted.elapsed());
        }
        let stop_token = if seq.request.stop_token_ids.contains(&id) {
            Some(FinishReason::StopToken(id))
        } else if !seq.request.ignore_eos && self.tokenizer.eos_ids.contains(&id) {
            Some(FinishReason::Eos)
        } else {
            None
        };
        if let Some(reason) = stop_token {
            return self.finish(seq, reason);
        }
        seq.generated += 1;
        seq.history.push(id);
        if let Some(Err(e)) = seq.constraint.as_mut().map(|c| c.consume(id)) {
            return self.fail(seq, e);
        }
        if !(seq.sink)(Event::Token(choice)) {
            seq.done = true;
            return;
        }
        let delta = match seq.detok.push(&self.tokenizer, id) {
            Ok(d) => d,
            Err(e) => return self.fail(seq, EngineError::Tokenizer(e.to_string())),
        };
        match seq.stops.push(&delta) {
            Filtered::Text(text) => {
                if !text.is_empty() && !(seq.sink)(Event::Text(text)) {
                    seq.done = true;
                    return;
                }
            }
            Filtered::Stopped { text, stop } => {
                if !text.is_empty() {
                    (seq.sink)(Event::Text(text));
                }
                seq.stops = StopStrings::default();
                return seq.end(FinishReason::StopString(stop));
            }
        }
        seq.next = id;
        if seq.constraint.as_ref().is_some_and(Constraint::is_complete) {
            // Nothing but EOS may follow: it is not generated.
            self.finish(seq, FinishReason::Eos);
        } else if seq.generated >= seq.request.max_new_tokens {
            self.finish(seq, FinishReason::Length);
        } else if seq.past >= self.model.max_context() {
            self.finish(seq, FinishReason::ContextFull);
        }
    }

    /// Ends `seq`, showing the text still held back first.
    fn finish(&self, seq: &mut Sequence, reason: FinishReason) {
        let rest = match seq.detok.finish(&self.tokenizer) {
            Ok(r) => r,
            Err(e) => return self.fail(seq, EngineError::Tokenizer(e.to_string())),
        };
        // The tail may still complete a stop string.
        let (text, reason) = match seq.stops.push(&rest) {
            Filtered::Text(t) => (t + &seq.stops.flush(), reason),
            Filtered::Stopped { text, stop } => (text, FinishReason::StopString(stop)),
        };
        if !text.is_empty() {
            (seq.sink)(Event::Text(text));
        }
        seq.end(reason);
    }

    fn fail(&self, seq: &mut Sequence, e: EngineError) {
        (seq.sink)(Event::Failed(e));
        seq.done = true;
    }

    /// Removes finished and cancelled sequences. A plain sequence's slot takes the last plain
    /// one, whose slot takes the last speculative one; a speculative sequence's slot takes
    /// the last one. One cache copy each, and the partition stays.
    fn release(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            let seq = &mut self.running[i];
            if !seq.done && seq.cancel.load(Ordering::Relaxed) {
                seq.end(FinishReason::Cancelled);
            }
            if !self.running[i].done {
                i += 1;
                continue;
            }
            let p = self.plain();
            let last = self.running.len() - 1;
            let mut moves = Vec::new();
            if i < p {
                if i != p - 1 {
                    moves.push((p - 1, i));
                }
                if p - 1 != last {
                    moves.push((last, p - 1));
                }
            } else if i != last {
                moves.push((last, i));
            }
            for (from, to) in moves {
                let len = self.running[from].past;
                if let Err(e) = self.move_cache(from, to, len) {
                    return self.fail_all(e);
                }
            }
            let mut gone = if i < p {
                self.running.swap(i, p - 1);
                self.running.swap_remove(p - 1)
            } else {
                self.running.swap_remove(i)
            };
            self.free_blocks(&mut gone, true);
            if gone.preempted {
                self.requeue(gone);
            }
        }
    }

    fn shut_down(&mut self) {
        for seq in &mut self.running {
            (seq.sink)(Event::Failed(EngineError::ShutDown));
        }
        for a in &mut self.waiting {
            (a.sink)(Event::Failed(EngineError::ShutDown));
        }
        for seq in &mut self.preempted {
            (seq.sink)(Event::Failed(EngineError::ShutDown));
        }
        self.running.clear();
        self.preempted.clear();
        self.waiting.clear();
        self.running_count.store(0, Ordering::Release);
    }
}

/// An engine over the serving graph of the artifact in `dir` (`slots` slots of up to
/// `context` positions, capped by the artifact), with the artifact in `draft`, if any, as its
/// draft model.
pub fn artifact_engine(
    dir: &Path,
    draft: Option<&Path>,
    session: &crate::runtime::SessionOptions,
    slots: usize,
    context: usize,
    options: EngineOptions,
) -> Result<Engine, EngineError> {
    let m = Manifest::read(dir).map_err(|e| EngineError::Model(e.to_string()))?;
    let tokenizer = artifact_tokenizer(dir, &m)?;
    let context = context.min(m.max_context);
    let draft = draft.map(|d| draft_opener(d, &m, session, slots, context)).transpose()?;
    let (dir, session) = (dir.to_path_buf(), session.clone());
    let open = move || crate::runtime::ServingDecoder::open(&dir, &session, slots, context);
    Engine::start_with_draft(open, draft, tokenizer, options)
}

/// Opens the artifact in `draft` as a draft model for `target` (same vocabulary, checked by
/// the vocabulary hashes of both manifests), with `slots` slots of `context` positions.
pub fn draft_opener(
    draft: &Path,
    target: &Manifest,
    session: &crate::runtime::SessionOptions,
    slots: usize,
    context: usize,
) -> Result<OpenDraft, EngineError> {
    let m = Manifest::read(draft).map_err(|e| EngineError::Model(e.to_string()))?;
    if m.tokenizer.vocab_sha256 != target.tokenizer.vocab_sha256 {
        return Err(EngineError::InvalidRequest {
            field: "draft",
            reason: format!(
                "{} has another vocabulary than {} (vocabulary sha256 {} vs {})",
                draft.display(),
                target.name,
                &m.tokenizer.vocab_sha256[..16.min(m.tokenizer.vocab_sha256.len())],
                &target.tokenizer.vocab_sha256[..16.min(target.tokenizer.vocab_sha256.len())]
            ),
        });
    }
    let (dir, session, context) = (draft.to_path_buf(), session.clone(), context.min(m.max_context));
    Ok(Box::new(move || {
        let d = crate::runtime::ServingDecoder::open(&dir, &session, slots, context)?;
        Ok(Box::new(d) as Box<dyn Forward>)
    }))
}

/// The tokenizer of the artifact in `dir`, with its special ids and chat template.
pub fn artifact_tokenizer(dir: &Path, manifest: &Manifest) -> Result<ModelTokenizer, EngineError> {
    let t = &manifest.tokenizer;
    from_file(&dir.join(manifest::TOKENIZER_FILE), t.bos_id, t.eos_ids.clone(), t.chat_template.clone())
        .map_err(|e| EngineError::Tokenizer(e.to_string()))
}
