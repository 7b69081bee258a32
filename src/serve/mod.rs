//! `kiln serve`: the gRPC streaming-generation service (`proto/kiln/v1/kiln.proto`) over one
//! artifact, with the standard health service, server reflection, Prometheus metrics, an
//! optional OpenAI-compatible HTTP API on the same engine ([`http`]) and a graceful drain on
//! SIGTERM/SIGINT.
//!
//! The ports are bound before the model loads: until it has, health answers NOT_SERVING and
//! generation UNAVAILABLE (HTTP 503).

pub mod bench;
pub mod http;
pub mod metrics;
pub mod service;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use self::metrics::Metrics;
use self::service::{Limits, Service, Shared};
use crate::engine::{artifact_tokenizer, draft_opener, Engine, EngineOptions, OpenDraft};
use crate::onnx::manifest::Manifest;
use crate::runtime::{ServingDecoder, SessionOptions};

/// The generated protobuf messages, service and client of `kiln.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod proto {
    tonic::include_proto!("kiln.v1");

    /// The encoded file descriptor set of `kiln.v1` (for server reflection).
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kiln_descriptor");
}

/// How `kiln serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The artifact directory.
    pub artifact: PathBuf,
    /// A draft artifact for speculative decoding (same tokenizer).
    pub draft: Option<PathBuf>,
    /// gRPC address (port 0 picks a free port; the bound address is printed).
    pub addr: SocketAddr,
    /// Prometheus `/metrics` address, if any.
    pub metrics_addr: Option<SocketAddr>,
    /// OpenAI-compatible HTTP API address, if any.
    pub http_addr: Option<SocketAddr>,
    /// ONNX Runtime session settings.
    pub session: SessionOptions,
    /// Most sequences that run at once.
    pub max_sequences: usize,
    /// Bytes of the paged KV pool (CPU); `None`: [`default_kv_memory`].
    pub kv_memory: Option<u64>,
    /// Reuse cached prompt prefixes' KV blocks.
    pub prefix_cache: bool,
    /// Positions per sequence (capped by the artifact's context).
    pub context: usize,
    /// Requests that may wait for a slot.
    pub queue_capacity: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens: u32,
    /// `max_tokens` of a request that sets none.
    pub default_max_tokens: u32,
    /// Largest request message, in bytes.
    pub max_message_bytes: usize,
    /// How long in-flight streams may run after SIGTERM/SIGINT.
    pub grace: Duration,
}

/// The fraction of the RAM free at start that the KV pool takes by default.
pub const DEFAULT_KV_FRACTION: f64 = 0.25;

/// The default KV pool: what `max_sequences` sequences of `context` positions fill, at most
/// [`DEFAULT_KV_FRACTION`] of the memory available at start (`/proc/meminfo`).
pub fn default_kv_memory(max_sequences: usize, context: usize, block_bytes: usize) -> u64 {
    let full = (max_sequences * context.div_ceil(crate::runtime::BLOCK_SIZE) * block_bytes) as u64;
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemAvailable:"))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
    });
    match available {
        Some(bytes) => full.min((bytes as f64 * DEFAULT_KV_FRACTION) as u64),
        None => full,
    }
}

/// Blocks of the paged KV pool `opts` ask for (`None` off the CPU, where the cache is
/// contiguous).
fn kv_blocks(opts: &ServeOptions, context: usize) -> Result<Option<usize>> {
    let manifest = Manifest::read(&opts.artifact)?;
    if opts.session.provider != crate::runtime::Provider::Cpu || opts.session.contiguous_kv {
        if opts.kv_memory.is_some() {
            anyhow::bail!(
                "--kv-memory: the paged KV cache runs on the CPU only (not {}) and not with --contiguous-kv",
                opts.session.provider.name()
            );
        }
        return Ok(None);
    }
    let block = ServingDecoder::block_bytes(&manifest, &opts.session);
    let bytes = opts.kv_memory.unwrap_or_else(|| default_kv_memory(opts.max_sequences, context, block));
    let blocks = (bytes / block as u64) as usize;
    if blocks == 0 {
        anyhow::bail!(
            "--kv-memory {bytes} bytes holds no KV block ({block} bytes: {} positions of every layer)",
            crate::runtime::BLOCK_SIZE
        );
    }
    Ok(Some(blocks))
}

/// Parses a byte size: a number with an optional unit (`B`, `KiB`, `MiB`, `GiB`, `KB`, `MB`,
/// `GB`), e.g. `512MiB`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024f64.powi(2),
        "GiB" => 1024f64.powi(3),
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        other => return Err(format!("{text:?}: unknown unit {other:?} (B, KiB, MiB, GiB, KB, MB, GB)")),
    };
    let n: f64 = number.parse().map_err(|_| format!("{text:?} is not a size such as 512MiB"))?;
    Ok((n * scale) as u64)
}

/// Runs the server until SIGTERM or SIGINT and the drain that follows.
pub fn run(opts: ServeOptions) -> Result<()> {
    let manifest = Manifest::read(&opts.artifact).with_context(|| format!("reading {}", opts.artifact.display()))?;
    let tokenizer = artifact_tokenizer(&opts.artifact, &manifest)?;
    let context = opts.context.min(manifest.max_context);
    let info = proto::ModelInfoResponse {
        name: manifest.name.clone(),
        architecture: manifest.config.architecture.hf_class().into(),
        scheme: format!("{} ({:?})", manifest.recipe.base().label(), manifest.recipe.quant.method).to_lowercase(),
        context_length: context as u32,
        vocab_size: tokenizer.vocab_size() as u32,
        execution_provider: opts.session.provider.name().into(),
        accuracy_level: u32::from(opts.session.matmul_accuracy_level.unwrap_or(4)),
        max_sequences: opts.max_sequences as u32,
        queue_capacity: opts.queue_capacity as u32,
        max_tokens_limit: opts.max_tokens,
        default_max_tokens: opts.default_max_tokens,
        eos_token_ids: tokenizer.eos_ids.clone(),
        speculative_available: true,
        draft_model: opts.draft.as_ref().map(|d| d.display().to_string()).unwrap_or_default(),
        ..Default::default()
    };
    let limits = Limits { max_tokens: opts.max_tokens, default_max_tokens: opts.default_max_tokens };
    let shared = Arc::new(Shared::new(Arc::new(Metrics::default()), limits, info));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("kiln-grpc")
        .build()
        .context("starting the async runtime")?;
    let draft = match &opts.draft {
        Some(d) => Some(draft_opener(d, &manifest, &opts.session, opts.max_sequences, context)?),
        None => None,
    };
    runtime.block_on(serve(opts, context, tokenizer, draft, shared))
}

async fn serve(
    opts: ServeOptions,
    context: usize,
    tokenizer: crate::model::ModelTokenizer,
    draft: Option<OpenDraft>,
    shared: Arc<Shared>,
) -> Result<()> {
    let listener = TcpListener::bind(opts.addr).await.with_context(|| format!("binding --addr {}", opts.addr))?;
    let addr = listener.local_addr()?;
    if let Some(m) = opts.metrics_addr {
        let l = TcpListener::bind(m).await.with_context(|| format!("binding --metrics-addr {m}"))?;
        println!("kiln serve: metrics on http://{}/metrics", l.local_addr()?);
        tokio::spawn(metrics::serve(l, shared.metrics.clone(), shared.engine.clone()));
    }
    if let Some(h) = opts.http_addr {
        let l = TcpListener::bind(h).await.with_context(|| format!("binding --http-addr {h}"))?;
        println!("kiln serve: http on http://{}", l.local_addr()?);
        let state = Arc::new(http::HttpState {
            shared: shared.clone(),
            created: artifact_created(&opts.artifact),
            max_body_bytes: opts.max_message_bytes,
        });
        tokio::spawn(async move {
            if let Err(e) = http::serve(l, state).await {
                tracing::error!(error = %e, "the HTTP API stopped");
            }
        });
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_not_serving::<proto::generator_server::GeneratorServer<Service>>().await;
    health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let generator = proto::generator_server::GeneratorServer::new(Service(shared.clone()))
        .max_decoding_message_size(opts.max_message_bytes);
    println!("kiln serve: listening on {addr}");

    // Load the model while the port already answers (health NOT_SERVING, UNAVAILABLE).
    let (dir, session, slots) = (opts.artifact.clone(), opts.session.clone(), opts.max_sequences);
    let blocks = kv_blocks(&opts, context)?;
    let engine_options = EngineOptions { queue_capacity: opts.queue_capacity, prefix_cache: opts.prefix_cache };
    let load = tokio::task::spawn_blocking(move || {
        let open = move || match blocks {
            Some(blocks) => ServingDecoder::open_pool(&dir, &session, slots, context, blocks),
            None => ServingDecoder::open(&dir, &session, slots, context),
        };
        Engine::start_with_draft(open, draft, tokenizer, engine_options)
    });
    let (loaded_shared, loaded_health) = (shared.clone(), health.clone());
    let loaded = async move {
        let engine = load.await.context("loading the model")??;
        // The lock is set once, here.
        let _ = loaded_shared.engine.set(Arc::new(engine));
        loaded_health.set_serving::<proto::generator_server::GeneratorServer<Service>>().await;
        loaded_health.set_service_status("", tonic_health::ServingStatus::Serving).await;
        tracing::info!(%addr, "model loaded, serving");
        println!("kiln serve: serving");
        Ok::<_, anyhow::Error>(())
    };

    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let (drain_shared, drain_health, grace) = (shared.clone(), health.clone(), opts.grace);
    let shutdown = async move {
        wait_for_signal().await;
        tracing::info!(grace_s = grace.as_secs_f64(), "signal received, draining");
        drain_shared.draining.store(true, Ordering::Release);
        drain_health.set_not_serving::<proto::generator_server::GeneratorServer<Service>>().await;
        drain_health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        let _ = drain_tx.send(());
        let drained = tokio::time::timeout(grace, async {
            while drain_shared.open_streams.load(Ordering::Acquire) > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                open = drain_shared.open_streams.load(Ordering::Acquire),
                "grace period over, cancelling the streams still open"
            );
        }
    };
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(generator)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown);
    let server = async move {
        tokio::select! {
            r = server => r.context("serving gRPC"),
            // Connections whose streams outlive the grace period are dropped with the runtime.
            _ = async { let _ = drain_rx.await; tokio::time::sleep(grace + Duration::from_secs(1)).await } => Ok(()),
        }
    };
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => return r,
        r = loaded => r?,
    }
    server.await?;
    tracing::info!("drained, exiting");
    Ok(())
}

/// When the artifact was written (its manifest's mtime, Unix seconds; 0 if unknown).
fn artifact_created(artifact: &std::path::Path) -> u64 {
    std::fs::metadata(artifact.join(crate::onnx::manifest::MANIFEST_FILE))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// Resolves on SIGTERM or SIGINT.
async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT drains");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
