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
    /// Sequences that run at once (KV cache slots).
    pub max_sequences: usize,
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
    let engine_options = EngineOptions { queue_capacity: opts.queue_capacity };
    let load = tokio::task::spawn_blocking(move || {
        let open = move || ServingDecoder::open(&dir, &session, slots, context);
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
