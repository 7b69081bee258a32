//! `kiln` command line: parses arguments and calls the library.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use kiln::check::report::CheckOptions;
use kiln::engine::chat::Message;
use kiln::engine::native::NativeForward;
use kiln::engine::sampling::SamplingParams;
use kiln::engine::speculative::{DraftMethod, Speculation};
use kiln::engine::{artifact_engine, Engine, EngineOptions, Event, Prompt, Request};
use kiln::model::gguf::GgufFile;
use kiln::model::{default_model_path, Model};
use kiln::onnx::decoder::TensorReport;
use kiln::onnx::export::{export_recipe, source_sensitivity, ExportOptions, ExportOutcome, Progress};
use kiln::onnx::manifest::{self, Manifest};
use kiln::onnx::recipe::CheckThresholds;
use kiln::quant::sensitivity::SensitivityOptions;
use kiln::runtime::{KvCache, Provider, SessionOptions};

/// Positions per sequence `kiln generate` allows (capped by the artifact's `max_context`).
const DEFAULT_CONTEXT: usize = 4096;

#[derive(Parser)]
#[command(name = "kiln", version, about = "Quantize, export, check and serve causal language models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a model's or an artifact's architecture, tensors, sizes and tokenizer.
    Inspect {
        /// A GGUF file, a Hugging Face directory or an artifact directory (default: the
        /// model `make setup` fetched).
        model: Option<PathBuf>,
        /// Also write the model's tokenizer as a Hugging Face tokenizer.json here.
        #[arg(long, value_name = "PATH")]
        write_tokenizer: Option<PathBuf>,
        /// Print the quantization error of per-tensor, per-channel and blocked layouts at
        /// 8 and 4 bits, per tensor class, for the model's real weights.
        #[arg(long)]
        compare_granularity: bool,
        /// Measure (or read from the cache) what quantizing each matrix alone costs the
        /// model, per candidate scheme, on the default calibration text.
        #[arg(long)]
        sensitivity: bool,
        /// With --sensitivity: also measure a second scheme per matrix and score how well
        /// the prediction ranks them.
        #[arg(long, requires = "sensitivity")]
        validate: bool,
    },
    /// Export checkpoints to quantized ONNX artifacts, one per recipe (export/*.toml).
    Export {
        /// Recipe files.
        #[arg(required = true)]
        recipes: Vec<PathBuf>,
        /// Rebuild artifacts that are up to date.
        #[arg(long)]
        force: bool,
        /// Output directory (only with a single recipe).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Automatic mixed precision within this many bits per weight (replaces the
        /// recipe's `bits_per_weight`).
        #[arg(long)]
        bits_per_weight: Option<f64>,
    },
    /// Perplexity of a GGUF file or Hugging Face directory through the native reference
    /// forward (f32), over the same windows `kiln check` scores: for comparing with files
    /// other tools quantized.
    Perplexity {
        /// GGUF files or Hugging Face directories.
        #[arg(required = true)]
        models: Vec<PathBuf>,
        /// Texts (default: Hamlet and Alice's Adventures in Wonderland).
        #[arg(long)]
        text: Vec<PathBuf>,
        /// Tokens scored per text.
        #[arg(long, default_value_t = 4096)]
        tokens: usize,
        /// Window length.
        #[arg(long, default_value_t = 512)]
        window: usize,
    },
    /// Prove artifacts: tract reference vs ONNX Runtime parity, quality against the FP32
    /// artifact, weight integrity. Exits non-zero when any check fails.
    Check {
        /// Artifact directories.
        #[arg(required = true)]
        artifacts: Vec<PathBuf>,
        /// Execution provider ONNX Runtime runs on (an unavailable one is an error).
        #[arg(long, value_enum, default_value_t = Ep::Cpu)]
        ep: Ep,
        /// FP32 artifact to compare quality with (default: found beside each artifact).
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// Held-out text for quality; repeat for several (default: Hamlet and Alice's
        /// Adventures in Wonderland from the fetched corpus).
        #[arg(long)]
        text: Vec<PathBuf>,
        /// Tokens scored for quality.
        #[arg(long, default_value_t = 4096)]
        tokens: usize,
        /// Quality window length.
        #[arg(long, default_value_t = 512)]
        window: usize,
        /// Greedy decode steps after each parity prefill.
        #[arg(long, default_value_t = 32)]
        decode_steps: usize,
        /// MatMulNBits accuracy level of the quality runs (default: the serving setting, 4,
        /// int8 activations; 1: f32, the weights' loss alone).
        #[arg(long)]
        accuracy_level: Option<u8>,
        /// Fail when perplexity rises by more than this fraction (overrides the recipe).
        #[arg(long)]
        max_ppl_increase: Option<f64>,
        /// Fail when mean KL(fp32 ‖ artifact) exceeds this (overrides the recipe).
        #[arg(long)]
        max_mean_kl: Option<f64>,
        /// Fail when top-1 agreement with FP32 falls below this (overrides the recipe).
        #[arg(long)]
        min_top1: Option<f64>,
        /// TensorRT: allow fp16 kernels.
        #[arg(long)]
        trt_fp16: bool,
        /// When the execution provider is not available, print `SKIPPED: <reason>` and
        /// exit 0 instead of failing (for `make test-gpu` on machines without a GPU).
        #[arg(long)]
        skip_unavailable: bool,
        /// Print one JSON report per artifact instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Print the token ids of a text.
    Tokenize {
        /// A GGUF file or a Hugging Face directory.
        model: PathBuf,
        /// The text.
        text: String,
        /// Print one JSON array of ids and nothing else.
        #[arg(long)]
        json: bool,
    },
    /// Generate from a prompt, streaming the text to the terminal: from an artifact through
    /// ONNX Runtime, or from a GGUF file / Hugging Face directory through the native
    /// reference forward pass.
    Generate {
        /// An artifact directory, a GGUF file or a Hugging Face directory (default: the model
        /// `make setup` fetched).
        model: Option<PathBuf>,
        /// The prompt text.
        #[arg(long)]
        prompt: String,
        /// Send the prompt as a user message through the model's chat template.
        #[arg(long)]
        chat: bool,
        /// A system message (with --chat).
        #[arg(long, requires = "chat")]
        system: Option<String>,
        /// Maximum number of new tokens.
        #[arg(short = 'n', long, default_value_t = 128)]
        max_tokens: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Stop before this string (repeatable).
        #[arg(long)]
        stop: Vec<String>,
        /// Keep generating after EOS.
        #[arg(long)]
        ignore_eos: bool,
        #[command(flatten)]
        session: SessionArgs,
        /// Speculative decoding: draft with a draft model (--draft) or by prompt lookup.
        #[arg(long, value_enum)]
        speculative: Option<Drafter>,
        /// Draft artifact (with --speculative model).
        #[arg(long)]
        draft: Option<PathBuf>,
        /// Tokens drafted per step (1-16); 0 adapts to the acceptance rate.
        #[arg(long, default_value_t = 0)]
        draft_tokens: usize,
        /// Print one JSON object (token_ids, text, finish_reason, timings) instead.
        #[arg(long)]
        json: bool,
    },
    /// Measure artifacts: size, memory, time to first token, prefill and decode speed at short
    /// and long context, and aggregate throughput of concurrent streams.
    Bench {
        /// Artifact directories.
        #[arg(required_unless_present = "grpc", conflicts_with = "grpc")]
        artifacts: Vec<PathBuf>,
        /// Measure a running `kiln serve` at this address instead, as a gRPC client: TTFT and
        /// per-stream and aggregate decode speed of concurrent streams.
        #[arg(long, value_name = "ADDR")]
        grpc: Option<String>,
        /// With --grpc: measure the same server's OpenAI-compatible HTTP API at this base URL
        /// too (e.g. http://127.0.0.1:8080), alternating with gRPC.
        #[arg(long, value_name = "URL", requires = "grpc")]
        http: Option<String>,
        /// Measure constrained decoding of the one artifact given: a decode step constrained
        /// by a JSON schema against the same step unconstrained.
        #[arg(long, conflicts_with = "speculative")]
        constrained: bool,
        /// Measure the paged KV cache of the one artifact given: TTFT after a shared 1500-token
        /// prefix with and without the prefix cache, and, at the KV memory of 8 contiguous
        /// slots of 2048 positions, concurrent sequences and tokens/s of a 64-512-token
        /// workload, contiguous against paged.
        #[arg(long, conflicts_with_all = ["speculative", "constrained"])]
        paged: bool,
        /// Measure speculative decoding of the one artifact given (the target): each drafter
        /// (every --draft, and prompt lookup) at each --k, against plain decoding, on open-ended
        /// and on grounded prompts (quote, summarize, answer from or edit a given text).
        #[arg(long)]
        speculative: bool,
        /// Draft artifacts for --speculative (repeatable).
        #[arg(long, requires = "speculative")]
        draft: Vec<PathBuf>,
        /// Draft lengths for --speculative.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16", requires = "speculative")]
        k: Vec<usize>,
        /// Where --speculative writes its plot (SVG) of the open-ended prompts; the grounded
        /// prompts' plot goes beside it, named with `-grounded` added.
        #[arg(long, default_value = "speculative.svg", requires = "speculative")]
        plot: PathBuf,
        #[command(flatten)]
        measure: MeasureArgs,
        /// Print one JSON object per artifact instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Serve an artifact over gRPC (`proto/kiln/v1/kiln.proto`), with health, reflection and
    /// Prometheus metrics. SIGTERM/SIGINT drain: new requests are refused, open streams get
    /// `--grace` seconds to finish, then the process exits 0.
    Serve {
        /// Artifact directory.
        artifact: PathBuf,
        /// Draft artifact for speculative decoding (same tokenizer; e.g. an INT4 or
        /// layer-truncated export of the same model). Prompt lookup needs none.
        #[arg(long)]
        draft: Option<PathBuf>,
        /// gRPC listen address (port 0: any free port; the bound address is printed).
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: std::net::SocketAddr,
        /// Serve Prometheus metrics on http://ADDR/metrics.
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Serve the OpenAI-compatible HTTP API (/v1/models, /v1/completions,
        /// /v1/chat/completions) on ADDR, on the same engine.
        #[arg(long, value_name = "ADDR")]
        http_addr: Option<std::net::SocketAddr>,
        /// Most sequences generated at once (on the CPU the KV memory is the real limit).
        #[arg(long, default_value_t = 8)]
        max_sequences: usize,
        /// Positions per sequence (capped by the artifact's context).
        #[arg(long, default_value_t = 2048)]
        context: usize,
        /// Bytes of the paged KV cache shared by all sequences (CPU), e.g. 512MiB. Default:
        /// what --max-sequences full contexts take, at most a quarter of the free RAM.
        #[arg(long, value_name = "SIZE", value_parser = kiln::serve::parse_bytes)]
        kv_memory: Option<u64>,
        /// Compute every prompt in full instead of reusing cached prefixes' KV blocks.
        #[arg(long)]
        no_prefix_cache: bool,
        /// Requests that may wait for a slot before new ones get RESOURCE_EXHAUSTED.
        #[arg(long, default_value_t = 64)]
        queue: usize,
        /// Largest max_tokens a request may ask for.
        #[arg(long, default_value_t = 2048)]
        max_tokens: u32,
        /// max_tokens of a request that sets none.
        #[arg(long, default_value_t = 256)]
        default_max_tokens: u32,
        /// Largest request message in bytes (larger gRPC messages get OUT_OF_RANGE, larger
        /// HTTP bodies 413).
        #[arg(long, default_value_t = 4 << 20)]
        max_message_bytes: usize,
        /// Seconds open streams may run after SIGTERM/SIGINT.
        #[arg(long, default_value_t = 30.0)]
        grace: f64,
        #[command(flatten)]
        session: SessionArgs,
    },
}

/// How `kiln bench` measures each artifact (its default mode, and the figures the other modes
/// share).
#[derive(clap::Args)]
struct MeasureArgs {
    /// Tokens generated per measurement.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// The long context at which decode speed is measured again.
    #[arg(long, default_value_t = 1024)]
    long_context: usize,
    /// Concurrent stream counts for the aggregate throughput rows.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    streams: Vec<usize>,
    /// Threads ONNX Runtime uses (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Accuracy level of 4/8-bit products: 4 (default) computes with int8 activations
    /// (kiln's quantized MatMul on AVX-512 VNNI CPUs, else MatMulNBits), 0/1 in f32.
    #[arg(long)]
    accuracy_level: Option<u8>,
    /// KV cache element type (default: f16 for integer-quantized weights, else f32).
    #[arg(long, value_enum)]
    kv_cache: Option<KvCacheArg>,
    /// Contiguous KV cache (slot-sized regions) instead of the paged one.
    #[arg(long)]
    contiguous_kv: bool,
    /// Rounds of every measurement, interleaved; the table shows each figure's median.
    #[arg(long, default_value_t = 3, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    repeat: usize,
}

impl MeasureArgs {
    fn options(self) -> kiln::bench::BenchOptions {
        kiln::bench::BenchOptions {
            tokens: self.tokens,
            long_context: self.long_context,
            streams: self.streams,
            threads: self.threads,
            accuracy_level: self.accuracy_level,
            kv_cache: self.kv_cache.map(Into::into),
            contiguous_kv: self.contiguous_kv,
            repeat: self.repeat,
        }
    }
}

/// Internal: `kiln bench` runs each artifact in a process of its own through this.
#[derive(Parser)]
#[command(name = "kiln bench-one", hide = true)]
struct BenchOne {
    artifact: PathBuf,
    /// The parent's `BenchOptions`, as JSON.
    options: String,
}

/// ONNX Runtime session flags of `kiln generate` and `kiln serve`.
#[derive(clap::Args)]
struct SessionArgs {
    /// Execution provider (`generate`: artifacts only).
    #[arg(long, value_enum, default_value_t = Ep::Cpu)]
    ep: Ep,
    /// Threads ONNX Runtime uses (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Accuracy level of 4/8-bit products: 4 (ONNX Runtime's default) computes with int8
    /// activations (kiln's quantized MatMul on AVX-512 VNNI CPUs, else MatMulNBits), 1 in f32
    /// through MatMulNBits (slower; see the README on speculative exactness).
    #[arg(long)]
    accuracy_level: Option<u8>,
    /// KV cache element type: f16 (CPU only) halves its memory and the bytes a decode step
    /// reads. Default: f16 on the CPU for integer-quantized weights at the default accuracy
    /// level, else f32.
    #[arg(long, value_enum)]
    kv_cache: Option<KvCacheArg>,
    /// Keep the KV cache contiguous on the CPU (slot-sized regions: no paging, no prefix
    /// cache, no admission by memory), as before paging.
    #[arg(long)]
    contiguous_kv: bool,
}

impl SessionArgs {
    fn options(&self) -> SessionOptions {
        SessionOptions {
            provider: self.ep.into(),
            intra_threads: self.threads,
            matmul_accuracy_level: self.accuracy_level,
            kv_cache: self.kv_cache.map(Into::into),
            contiguous_kv: self.contiguous_kv,
            ..Default::default()
        }
    }
}

/// Sampling flags of `kiln generate`.
#[derive(clap::Args)]
struct SamplingArgs {
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Drop tokens below this fraction of the most likely one.
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Penalize tokens already in prompt or output (1: off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Subtract from tokens already generated.
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    /// Subtract per earlier occurrence in the output.
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Random seed (same seed, same tokens).
    #[arg(long)]
    seed: Option<u64>,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            logprobs: false,
            top_logprobs: 0,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Drafter {
    /// A draft model artifact (--draft).
    Model,
    /// N-gram lookup in the prompt and the generated text.
    PromptLookup,
}

#[derive(Clone, Copy, ValueEnum)]
enum Ep {
    /// ONNX Runtime's CPU execution provider.
    Cpu,
    /// CUDA (onnxruntime-gpu).
    Cuda,
    /// TensorRT (onnxruntime-gpu + TensorRT 10).
    Tensorrt,
}

/// `--kv-cache` values.
#[derive(Clone, Copy, clap::ValueEnum)]
enum KvCacheArg {
    F32,
    F16,
}

impl From<KvCacheArg> for KvCache {
    fn from(k: KvCacheArg) -> KvCache {
        match k {
            KvCacheArg::F32 => KvCache::F32,
            KvCacheArg::F16 => KvCache::F16,
        }
    }
}

impl From<Ep> for Provider {
    fn from(e: Ep) -> Provider {
        match e {
            Ep::Cpu => Provider::Cpu,
            Ep::Cuda => Provider::Cuda,
            Ep::Tensorrt => Provider::TensorRt,
        }
    }
}

fn main() -> Result<()> {
    if std::env::args().nth(1).as_deref() == Some(BENCH_ONE) {
        let a = BenchOne::parse_from(std::env::args().skip(1));
        let opts: kiln::bench::BenchOptions = serde_json::from_str(&a.options).context("bench-one options")?;
        let row = kiln::bench::bench_artifact(&a.artifact, &opts).map_err(anyhow::Error::msg)?;
        println!("{}", serde_json::to_string(&row)?);
        return Ok(());
    }
    match Cli::parse().command {
        Command::Inspect { model, write_tokenizer, compare_granularity, sensitivity, validate } => {
            let path = model.unwrap_or_else(default_model_path);
            if sensitivity {
                let opts = SensitivityOptions { validate, ..SensitivityOptions::default() };
                let mut bar = Bar { name: path.display().to_string(), bar: None, phase: None };
                let table = source_sensitivity(&path, &opts, &mut bar)?;
                bar.finish();
                print!("{}", kiln::quant::sensitivity::render(&table));
                Ok(())
            } else if path.join(manifest::MANIFEST_FILE).is_file() {
                inspect_artifact(&path)
            } else if compare_granularity {
                compare_granularity_study(&load(&path)?)
            } else {
                inspect(path, write_tokenizer)
            }
        }
        Command::Export { recipes, force, output, bits_per_weight } => {
            export(&recipes, ExportOptions { force, output, bits_per_weight })
        }
        Command::Perplexity { models, text, tokens, window } => {
            let texts = if text.is_empty() { kiln::check::report::default_texts() } else { text };
            for path in models {
                let model = load(&path)?;
                let mut row = Vec::new();
                for t in &texts {
                    let ppl = kiln::check::quality::reference_perplexity(&model, t, tokens, window)?;
                    row.push(format!(
                        "{} {ppl:.4}",
                        t.file_name().map_or(t.display().to_string(), |n| n.to_string_lossy().into())
                    ));
                }
                println!("{}: perplexity {}", path.display(), row.join(", "));
            }
            Ok(())
        }
        Command::Check {
            artifacts,
            ep,
            baseline,
            text,
            tokens,
            window,
            decode_steps,
            accuracy_level,
            max_ppl_increase,
            max_mean_kl,
            min_top1,
            trt_fp16,
            skip_unavailable,
            json,
        } => {
            let provider: Provider = ep.into();
            if let (true, Err(reason)) = (skip_unavailable, provider.availability()) {
                println!("SKIPPED: {} execution provider: {reason}", provider.name());
                return Ok(());
            }
            let opts = CheckOptions {
                provider,
                baseline,
                texts: text,
                tokens,
                window,
                decode_steps,
                accuracy_level,
                thresholds: CheckThresholds { max_ppl_increase, max_mean_kl, min_top1 },
                trt_fp16,
            };
            check(&artifacts, &opts, json)
        }
        Command::Tokenize { model, text, json } => tokenize(model, &text, json),
        Command::Serve {
            artifact,
            draft,
            addr,
            metrics_addr,
            http_addr,
            max_sequences,
            context,
            kv_memory,
            no_prefix_cache,
            queue,
            max_tokens,
            default_max_tokens,
            max_message_bytes,
            grace,
            session,
        } => {
            if max_sequences == 0 {
                bail!("--max-sequences must be at least 1");
            }
            if default_max_tokens == 0 || default_max_tokens > max_tokens {
                bail!("--default-max-tokens must be between 1 and --max-tokens ({max_tokens})");
            }
            if !(grace.is_finite() && grace >= 0.0) {
                bail!("--grace must be a number of seconds >= 0");
            }
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .init();
            kiln::serve::run(kiln::serve::ServeOptions {
                artifact,
                draft,
                addr,
                metrics_addr,
                http_addr,
                session: session.options(),
                max_sequences,
                kv_memory,
                prefix_cache: !no_prefix_cache,
                context,
                queue_capacity: queue,
                max_tokens,
                default_max_tokens,
                max_message_bytes,
                grace: std::time::Duration::from_secs_f64(grace),
            })
        }
        Command::Generate {
            model,
            prompt,
            chat,
            system,
            max_tokens,
            sampling,
            stop,
            ignore_eos,
            session,
            speculative,
            draft,
            draft_tokens,
            json,
        } => {
            let method = match (speculative, &draft) {
                (Some(Drafter::Model), None) => bail!("--speculative model needs --draft <artifact>"),
                (None | Some(Drafter::PromptLookup), Some(_)) => bail!("--draft needs --speculative model"),
                (Some(Drafter::Model), Some(_)) => Some(DraftMethod::Model),
                (Some(Drafter::PromptLookup), None) => Some(DraftMethod::PromptLookup),
                (None, None) => None,
            };
            let prompt = if chat {
                let mut messages: Vec<Message> =
                    system.into_iter().map(|content| Message { role: "system".into(), content }).collect();
                messages.push(Message { role: "user".into(), content: prompt });
                Prompt::Chat(messages)
            } else {
                Prompt::Text(prompt)
            };
            let request = Request {
                prompt,
                sampling: sampling.params(),
                max_new_tokens: max_tokens,
                stop_strings: stop,
                ignore_eos,
                speculative: method.map(|method| Speculation { method, draft_tokens }),
                ..Default::default()
            };
            let path = model.unwrap_or_else(default_model_path);
            generate(&path, draft.as_deref(), request, session.options(), json)
        }
        Command::Bench { grpc: Some(addr), http, measure: MeasureArgs { tokens, streams, .. }, json, .. } => {
            let (ttfts, rows) = kiln::serve::bench::bench_client(&addr, http.as_deref(), tokens, &streams)
                .map_err(anyhow::Error::msg)?;
            if json {
                println!("{}", serde_json::json!({ "ttft": ttfts, "streams": rows }));
            } else {
                print!("{}", kiln::serve::bench::render(&ttfts, &rows));
            }
            Ok(())
        }
        Command::Bench {
            grpc: None,
            paged: true,
            artifacts,
            measure: MeasureArgs { threads, repeat, .. },
            json,
            ..
        } => {
            let [artifact] = artifacts.as_slice() else { bail!("--paged takes one artifact") };
            let report = kiln::bench::paged::bench_paged(artifact, threads, repeat).map_err(anyhow::Error::msg)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", kiln::bench::paged::render(&report));
            }
            Ok(())
        }
        Command::Bench {
            grpc: None,
            constrained: true,
            artifacts,
            measure: MeasureArgs { tokens, threads, repeat, .. },
            json,
            ..
        } => {
            let [artifact] = artifacts.as_slice() else { bail!("--constrained takes one artifact") };
            let report = kiln::bench::constrained::bench_constrained(artifact, tokens, threads, repeat)
                .map_err(anyhow::Error::msg)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", kiln::bench::constrained::render(&report));
            }
            Ok(())
        }
        Command::Bench {
            grpc: None,
            speculative: true,
            artifacts,
            draft,
            k,
            plot,
            measure: MeasureArgs { tokens, threads, .. },
            json,
            ..
        } => {
            let [target] = artifacts.as_slice() else { bail!("--speculative takes one target artifact") };
            if k.iter().any(|&k| k == 0 || k > kiln::engine::speculative::MAX_DRAFT_TOKENS) {
                bail!("--k values must be between 1 and {}", kiln::engine::speculative::MAX_DRAFT_TOKENS);
            }
            let opts = kiln::bench::speculative::SpecBenchOptions { drafts: draft, ks: k, tokens, threads };
            let report = kiln::bench::speculative::bench_speculative(target, &opts).map_err(anyhow::Error::msg)?;
            let mut plots = Vec::new();
            for w in &report.workloads {
                let path = kiln::bench::speculative::plot_path(&plot, w.workload);
                std::fs::write(&path, kiln::bench::speculative::plot_svg(&report.target, w))
                    .with_context(|| format!("writing {}", path.display()))?;
                plots.push(path.display().to_string());
            }
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", kiln::bench::speculative::render(&report));
                println!("\nplots: {}", plots.join(", "));
            }
            Ok(())
        }
        Command::Bench { grpc: None, speculative: false, artifacts, measure, json, .. } => {
            bench(&artifacts, &measure.options(), json)
        }
    }
}

fn check(artifacts: &[PathBuf], opts: &CheckOptions, json: bool) -> Result<()> {
    let mut failed = Vec::new();
    for dir in artifacts {
        let spinner = indicatif::ProgressBar::new_spinner();
        spinner.enable_steady_tick(std::time::Duration::from_millis(200));
        let report =
            kiln::check::report::check(dir, opts, &mut |msg| spinner.set_message(format!("{}: {msg}", dir.display())));
        spinner.finish_and_clear();
        let report = report.with_context(|| format!("checking {}", dir.display()))?;
        if json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            println!("{}", kiln::check::report::render(&report));
        }
        if !report.pass() {
            failed.push(format!("{}: {}", dir.display(), report.failures.join("; ")));
        }
    }
    if !failed.is_empty() {
        bail!("check failed:\n  {}", failed.join("\n  "));
    }
    Ok(())
}

fn export(recipes: &[PathBuf], opts: ExportOptions) -> Result<()> {
    if opts.output.is_some() && recipes.len() > 1 {
        bail!("--output takes a single recipe ({} given)", recipes.len());
    }
    for recipe in recipes {
        let mut bar = Bar { name: recipe.display().to_string(), bar: None, phase: None };
        match export_recipe(recipe, &opts, &mut bar)? {
            ExportOutcome::UpToDate { dir } => println!("{}: up to date ({})", recipe.display(), dir.display()),
            ExportOutcome::Built { dir, manifest, seconds } => {
                bar.finish();
                println!(
                    "{}: wrote {} in {seconds:.1} s: model.onnx {:.1} kB, model.onnx.data {:.1} MB",
                    recipe.display(),
                    dir.display(),
                    manifest.sizes.onnx_bytes as f64 / 1e3,
                    manifest.sizes.data_bytes as f64 / 1e6
                );
            }
        }
    }
    Ok(())
}

/// Progress of an export: a bar with an ETA per phase on a terminal; on any other stderr
/// (a log, CI), a plain line at most every 10 seconds and at the end of each phase.
struct Bar {
    /// What is exported (the recipe), named in plain lines.
    name: String,
    bar: Option<indicatif::ProgressBar>,
    phase: Option<Phase>,
}

/// The phase being shown as plain lines.
struct Phase {
    what: String,
    total: usize,
    done: usize,
    started: Instant,
    printed: Instant,
}

impl Progress for Bar {
    fn start(&mut self, what: &str, total: usize) {
        self.finish();
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total as u64);
            let template = format!("{what} {{elapsed:>4}} [{{bar:30}}] {{pos}}/{{len}} ETA {{eta}} {{msg}}");
            if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
                bar.set_style(style.progress_chars("=> "));
            }
            self.bar = Some(bar);
        } else {
            let now = Instant::now();
            self.phase = Some(Phase { what: what.into(), total, done: 0, started: now, printed: now });
        }
    }

    fn tensor(&mut self, r: &TensorReport) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("{} {}", r.name, r.label));
        }
        self.step();
    }

    fn layer(&mut self) {
        self.step();
    }
}

impl Bar {
    fn step(&mut self) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
        if let Some(p) = &mut self.phase {
            p.done += 1;
            if p.done == p.total || p.printed.elapsed().as_secs() >= 10 {
                p.printed = Instant::now();
                let elapsed = p.started.elapsed().as_secs_f64();
                let eta = elapsed / p.done as f64 * (p.total - p.done.min(p.total)) as f64;
                eprintln!("{}: {}: {}/{} in {elapsed:.0} s, ETA {eta:.0} s", self.name, p.what, p.done, p.total);
            }
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        self.phase = None;
    }
}

fn inspect_artifact(dir: &Path) -> Result<()> {
    let m = Manifest::read(dir)?;
    let c = &m.config;
    println!("artifact     {} ({}), kiln {}", dir.display(), m.name, m.kiln_version);
    if !m.recipe.description.is_empty() {
        println!("recipe       {}", m.recipe.description);
    }
    println!("source       {} ({}, sha256 {})", m.source.path.display(), m.source.kind, &m.source.sha256[..16]);
    println!(
        "architecture {} layers, hidden {}, heads {} / kv {} × {}, vocab {}, context {}",
        c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size, m.max_context
    );
    println!("files        model.onnx {} B, model.onnx.data {} B", m.sizes.onnx_bytes, m.sizes.data_bytes);
    let dtypes: Vec<String> = m.sizes.by_dtype.iter().map(|(d, n)| format!("{d} {:.2} MB", *n as f64 / 1e6)).collect();
    println!("bytes        {}", dtypes.join(", "));
    let graph = kiln::onnx::manifest::read_graph(dir)?;
    let mut ops: BTreeMap<String, usize> = BTreeMap::new();
    for n in &graph.node {
        *ops.entry(n.op_type.clone()).or_default() += 1;
    }
    let ops: Vec<String> = ops.iter().map(|(o, n)| format!("{o} {n}")).collect();
    println!("ops          {}", ops.join(", "));
    println!("inputs       {}", summarize_io(&m.io.inputs));
    println!("outputs      {}", summarize_io(&m.io.outputs));
    println!(
        "tokenizer    bos {:?}, eos {:?}, vocab sha256 {}",
        m.tokenizer.bos_id,
        m.tokenizer.eos_ids,
        &m.tokenizer.vocab_sha256[..16]
    );
    if let Some(plan) = &m.mixed_precision {
        println!();
        print!("{}", kiln::quant::mixed::render(plan));
    }
    println!();
    println!("{:<44} {:>14} {:>16} {:>12} {:>12}", "tensor", "shape", "scheme", "rel. error", "max abs");
    for t in &m.tensors {
        // Matrices stored side by side (q/k/v, gate/up) name their initializer and columns.
        let packed = t
            .packed
            .as_ref()
            .map_or(String::new(), |p| format!("  in {}[{}..{}]", p.tensor, p.columns[0], p.columns[1]));
        println!(
            "{:<44} {:>14} {:>16} {:>12.3e} {:>12.3e}{packed}",
            t.name,
            format!("{}×{}", t.shape[0], t.shape[1]),
            t.label,
            t.error.rel_frobenius,
            t.error.max_abs
        );
    }
    Ok(())
}

fn compare_granularity_study(model: &Model) -> Result<()> {
    let rows = kiln::quant::study::granularity_study(&model.weights);
    let classes: Vec<&str> =
        kiln::quant::study::CLASSES.iter().copied().filter(|c| rows.iter().any(|r| r.class == *c)).collect();
    println!("relative Frobenius error ‖W − Ŵ‖/‖W‖ by tensor class (symmetric, round to nearest)");
    print!("{:<16}", "scheme");
    for c in &classes {
        print!(" {c:>12}");
    }
    println!();
    let mut schemes: Vec<&str> = rows.iter().map(|r| r.scheme.as_str()).collect();
    schemes.dedup();
    for s in schemes {
        print!("{s:<16}");
        for c in &classes {
            let v = rows.iter().find(|r| r.scheme == s && r.class == *c).map_or(f64::NAN, |r| r.rel_frobenius);
            print!(" {v:>12.4e}");
        }
        println!();
    }
    Ok(())
}

fn summarize_io(names: &[String]) -> String {
    if names.len() <= 6 {
        return names.join(", ");
    }
    format!("{}, … {} more …, {}", names[..4].join(", "), names.len() - 5, names[names.len() - 1])
}

fn load(path: &Path) -> Result<Model> {
    if !path.exists() {
        bail!("{}: no such file or directory (run `make setup` to fetch the default model)", path.display());
    }
    Ok(Model::load(path)?)
}

fn inspect(path: PathBuf, write_tokenizer: Option<PathBuf>) -> Result<()> {
    let t0 = Instant::now();
    let model = load(&path)?;
    let load_s = t0.elapsed().as_secs_f64();
    let c = &model.config;
    println!("model        {}", path.display());
    println!("source       {:?}, loaded and dequantized to f32 in {load_s:.2} s", model.source);
    println!(
        "architecture {} ({})",
        serde_json::to_string(&c.architecture)?.trim_matches('"'),
        c.architecture.hf_class()
    );
    println!(
        "shape        {} layers, hidden {}, ffn {}, heads {} / kv {} × {}, vocab {}",
        c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size
    );
    println!(
        "             rope θ {}, rms eps {:e}, context {}, tied embeddings {}, qkv bias {}, sliding window {}",
        c.rope_theta,
        c.rms_norm_eps,
        c.max_position_embeddings,
        c.tie_word_embeddings,
        c.attention_bias,
        c.sliding_window.map_or("none".to_string(), |w| w.to_string())
    );
    println!("parameters   {} ({:.1} MB as f32)", c.parameter_count(), c.parameter_count() as f64 * 4.0 / 1e6);
    if path.is_file() {
        let file = GgufFile::open(&path)?;
        let mut by_type: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
        for t in &file.tensors {
            let e = by_type.entry(t.ty.name()).or_default();
            e.0 += 1;
            e.1 += t.size;
        }
        println!(
            "gguf         version {}, {} tensors, {} metadata keys",
            file.version,
            file.tensors.len(),
            file.metadata.len()
        );
        for (ty, (n, bytes)) in by_type {
            println!("  {ty:<6} {n:>4} tensors {:>10.2} MB", bytes as f64 / 1e6);
        }
    } else {
        println!("tensors      {} matrices", model.weights.matrices().len());
    }
    println!("tokenizer    {}", model.tokenizer.summary());
    if let Some(out) = write_tokenizer {
        let json = model.tokenizer.to_json()?;
        std::fs::write(&out, json).with_context(|| format!("writing {}", out.display()))?;
        println!("wrote        {}", out.display());
    }
    Ok(())
}

fn tokenize(path: PathBuf, text: &str, json: bool) -> Result<()> {
    let model = load(&path)?;
    let ids = model.tokenizer.encode(text)?;
    if json {
        println!("{}", serde_json::to_string(&ids)?);
    } else {
        let tok = model.tokenizer.inner();
        for id in ids {
            println!("{id:>6} {:?}", tok.id_to_token(id).unwrap_or_default());
        }
    }
    Ok(())
}

/// Hidden first argument that runs one artifact's bench (see [`bench`]).
const BENCH_ONE: &str = "bench-one";

/// Benches each artifact in a child process, so each peak RSS is its own.
fn bench(artifacts: &[PathBuf], opts: &kiln::bench::BenchOptions, json: bool) -> Result<()> {
    let exe = std::env::current_exe().context("finding the kiln executable")?;
    let options = serde_json::to_string(opts)?;
    let mut rows = Vec::new();
    for dir in artifacts {
        eprintln!("benching {} ...", dir.display());
        let out = std::process::Command::new(&exe)
            .arg(BENCH_ONE)
            .arg(dir)
            .arg(&options)
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("running the bench process")?;
        if !out.status.success() {
            bail!("bench of {} failed", dir.display());
        }
        let row: kiln::bench::BenchRow =
            serde_json::from_slice(&out.stdout).with_context(|| format!("bench output for {}", dir.display()))?;
        if json {
            println!("{}", serde_json::to_string(&row)?);
        }
        rows.push(row);
    }
    if !json {
        print!("{}", kiln::bench::render(&rows));
    }
    Ok(())
}

/// Starts an engine with one slot over an artifact (ONNX Runtime) or a model (reference).
fn single_engine(
    path: &Path,
    draft: Option<&Path>,
    opts: SessionOptions,
    context: usize,
) -> Result<(Engine, &'static str)> {
    let provider = opts.provider;
    if path.join(manifest::MANIFEST_FILE).is_file() {
        Ok((artifact_engine(path, draft, &opts, 1, context, EngineOptions::default())?, "onnxruntime"))
    } else {
        if draft.is_some() {
            bail!("--draft needs an artifact directory as the target; {} is a model", path.display());
        }
        if provider != Provider::Cpu {
            bail!("--ep {} needs an artifact directory; {} is a model", provider.name(), path.display());
        }
        if let Some(cache) = opts.kv_cache {
            bail!("--kv-cache {} needs an artifact directory; {} is a model", cache.name(), path.display());
        }
        let model = load(path)?;
        let tokenizer = model.tokenizer.clone();
        let context = context.min(model.config.max_position_embeddings);
        let open = move || Ok(NativeForward::new(model, 1, context));
        Ok((Engine::start(open, tokenizer, EngineOptions::default())?, "reference"))
    }
}

fn generate(path: &Path, draft: Option<&Path>, request: Request, session: SessionOptions, json: bool) -> Result<()> {
    let (engine, backend) = single_engine(path, draft, session, DEFAULT_CONTEXT)?;
    let generation = engine.submit(request)?;
    let mut stdout = std::io::stdout();
    let (mut ids, mut text) = (Vec::new(), String::new());
    let mut summary = None;
    for event in generation.events {
        match event {
            Event::Token(c) => ids.push(c.id),
            Event::Text(t) => {
                if !json {
                    print!("{t}");
                    let _ = stdout.flush();
                }
                text.push_str(&t);
            }
            Event::Finished(s) => summary = Some(s),
            Event::Failed(e) => return Err(e.into()),
        }
    }
    let s = summary.context("the engine stopped before the request finished")?;
    let ttft = s.time_to_first_token.as_secs_f64();
    let total = s.total_time.as_secs_f64();
    let decode_tps = if ids.len() > 1 { (ids.len() - 1) as f64 / (total - ttft) } else { 0.0 };
    if json {
        let out = serde_json::json!({
            "token_ids": ids,
            "text": text,
            "finish_reason": s.finish_reason.label(),
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.generated_tokens,
            "backend": backend,
            "timings": {
                "cached_prompt_tokens": s.cached_prompt_tokens,
                "ttft_s": ttft,
                "prefill_tokens_per_s": s.prompt_tokens as f64 / ttft,
                "decode_tokens_per_s": decode_tps,
                "total_s": total,
            },
            "speculative": s.speculative.map(|x| serde_json::json!({
                "steps": x.steps,
                "drafted_tokens": x.drafted,
                "accepted_tokens": x.accepted,
                "acceptance_rate": x.acceptance_rate(),
                "tokens_per_step": x.tokens_per_step(),
                "draft_s": x.draft_time.as_secs_f64(),
                "verify_s": x.verify_time.as_secs_f64(),
            })),
        });
        println!("{out}");
    } else {
        println!();
        let _ = stdout.flush();
        eprintln!(
            "[{backend}: {} prompt + {} new tokens, finish {}; TTFT {:.0} ms ({:.0} prompt tokens/s), decode {:.1} tokens/s]",
            s.prompt_tokens,
            s.generated_tokens,
            s.finish_reason.label(),
            ttft * 1e3,
            s.prompt_tokens as f64 / ttft,
            decode_tps
        );
        if let Some(x) = s.speculative {
            eprintln!(
                "[speculative: {} steps, {} of {} drafted tokens accepted ({:.0}%), {:.2} tokens per step; \
                 draft {:.0} ms, verify {:.0} ms]",
                x.steps,
                x.accepted,
                x.drafted,
                x.acceptance_rate() * 100.0,
                x.tokens_per_step(),
                x.draft_time.as_secs_f64() * 1e3,
                x.verify_time.as_secs_f64() * 1e3
            );
        }
    }
    Ok(())
}
