//! ONNX Runtime sessions over kiln artifacts. The only room that names `ort::`.
//!
//! ONNX Runtime is loaded at run time (`ort`'s `load-dynamic`) from the library `make setup`
//! fetched, or from `KILN_ORT_LIB`. ONNX Runtime allows one environment per process, so
//! the environment is created once, on first use, and shared.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ndarray::{Array2, Array3, Array4, Ix3, Ix4};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::Tensor;
use prost::Message;
use tract_onnx::pb;

use crate::model::cache_dir;
use crate::onnx::decoder::GraphForm;
use crate::onnx::manifest::{self, Manifest};

mod alias;
mod attention;
mod cpu;
mod matmul;
mod serving;

pub use serving::{ServingDecoder, BLOCK_SIZE};

/// File name of the ONNX Runtime library in the cache.
pub const ORT_LIBRARY: &str = "libonnxruntime.so.1.31.1";

/// Errors from ONNX Runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The ONNX Runtime library could not be loaded.
    #[error("ONNX Runtime library {path}: {reason} (run `make setup`, or set KILN_ORT_LIB)")]
    Library {
        /// The library path tried.
        path: PathBuf,
        /// Why it failed.
        reason: String,
    },
    /// The artifact could not be read.
    #[error("{path}: {reason}")]
    Artifact {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Creating the session failed.
    #[error("session for {path}: {reason}")]
    Session {
        /// The model file.
        path: PathBuf,
        /// ONNX Runtime's message.
        reason: String,
    },
    /// Running the session failed.
    #[error("run: {0}")]
    Run(String),
}

impl RuntimeError {
    /// A stable label for metrics and tests.
    pub fn kind(&self) -> &'static str {
        match self {
            RuntimeError::Library { .. } => "library",
            RuntimeError::Artifact { .. } => "artifact",
            RuntimeError::Session { .. } => "session",
            RuntimeError::Run(_) => "run",
        }
    }
}

/// How much ONNX Runtime rewrites the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Optimization {
    /// No rewriting at all.
    Disable,
    /// Constant folding and redundant-node removal.
    Basic,
    /// Plus fusions (DequantizeLinear + MatMul → MatMulNBits, RMSNorm, …).
    Extended,
    /// Everything, including layout changes.
    #[default]
    All,
}

/// Element type of the serving graph's KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvCache {
    /// f32, what the artifact declares.
    F32,
    /// f16: half the memory, and half the bytes a decode step reads at long contexts (CPU
    /// only: kiln's attention kernel).
    F16,
}

impl KvCache {
    /// Lower-case name as the command line spells it.
    pub fn name(self) -> &'static str {
        match self {
            KvCache::F32 => "f32",
            KvCache::F16 => "f16",
        }
    }

    /// Bytes per cached value.
    pub fn element_bytes(self) -> usize {
        match self {
            KvCache::F32 => 4,
            KvCache::F16 => 2,
        }
    }

    /// The cache a serving session of artifact `m` gets unless asked otherwise: f16 on the
    /// CPU for integer-quantized weights at the default accuracy level (where the weights'
    /// rounding dwarfs the cache's), else f32.
    pub fn default_for(m: &Manifest, opts: &SessionOptions) -> KvCache {
        if opts.provider == Provider::Cpu && m.has_integer_weights() && opts.int8_activations() {
            KvCache::F16
        } else {
            KvCache::F32
        }
    }
}

/// Where ONNX Runtime runs the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Provider {
    /// The CPU execution provider (always available).
    #[default]
    Cpu,
    /// CUDA (needs onnxruntime-gpu's provider library, CUDA 13 and cuDNN 9).
    Cuda,
    /// TensorRT (needs onnxruntime-gpu's provider library and TensorRT 10).
    TensorRt,
}

impl Provider {
    /// Lower-case name as the command line spells it.
    pub fn name(self) -> &'static str {
        match self {
            Provider::Cpu => "cpu",
            Provider::Cuda => "cuda",
            Provider::TensorRt => "tensorrt",
        }
    }

    /// `Ok` when the libraries this provider needs can be found, else why not. Session
    /// creation has the final word (a provider that fails to register is an error).
    pub fn availability(self) -> Result<(), String> {
        let (provider_lib, runtime_libs): (&str, &[&str]) = match self {
            Provider::Cpu => return Ok(()),
            Provider::Cuda => {
                ("libonnxruntime_providers_cuda.so", &["libcuda.so.1", "libcudart.so.13", "libcudnn.so.9"])
            }
            Provider::TensorRt => {
                ("libonnxruntime_providers_tensorrt.so", &["libcuda.so.1", "libcudart.so.13", "libnvinfer.so.10"])
            }
        };
        let ort_lib = ort_library_path();
        let dir = ort_lib.parent().unwrap_or(Path::new("."));
        if !dir.join(provider_lib).is_file() {
            return Err(format!(
                "{provider_lib} is not beside {} (install onnxruntime-gpu==1.31.1 and point KILN_ORT_LIB at its \
                 libonnxruntime.so.1.31.1)",
                ort_lib.display()
            ));
        }
        for lib in runtime_libs {
            if !can_load(lib) {
                return Err(format!(
                    "{lib} cannot be loaded (no NVIDIA driver, CUDA 13, cuDNN 9 or TensorRT 10 on the library path)"
                ));
            }
        }
        Ok(())
    }
}

/// Whether the dynamic loader finds `lib`.
fn can_load(lib: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(lib) else { return false };
    // SAFETY: dlopen with a valid C string; the handle is closed at once.
    unsafe {
        let h = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if h.is_null() {
            return false;
        }
        libc::dlclose(h);
    }
    true
}

/// TensorRT settings, usually derived from the artifact with [`TensorRtOptions::for_artifact`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TensorRtOptions {
    /// Allow fp16 kernels.
    pub fp16: bool,
    /// Run QDQ (INT8/INT4) graphs with integer kernels; QDQ models need it.
    pub int8: bool,
    /// Where built engines are cached (an engine build takes minutes).
    pub engine_cache: Option<PathBuf>,
    /// Optimization profile for the dynamic inputs.
    pub profile: ProfileShapes,
}

/// Min/opt/max shapes of every dynamic input, in TensorRT's `name:AxBxC,...` form.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProfileShapes {
    /// Smallest shapes.
    pub min: String,
    /// Shapes the engine is tuned for.
    pub opt: String,
    /// Largest shapes.
    pub max: String,
}

/// The range of batch, new-token and past lengths an engine must accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShapeRange {
    /// Largest batch.
    pub max_batch: usize,
    /// Largest number of new tokens in one run (the longest prefill chunk).
    pub max_seq: usize,
    /// Largest past length.
    pub max_past: usize,
    /// Batch the engine is tuned for.
    pub opt_batch: usize,
    /// Past length the engine is tuned for (decode: one new token).
    pub opt_past: usize,
}

impl ProfileShapes {
    /// Profiles for every input of `m`'s graph over `r`: min is one sequence of one token
    /// with no past, opt a decode step (one token) at `opt_past`, max a full prefill chunk
    /// at `max_past`; the mask spans past + new tokens.
    pub fn for_manifest(m: &Manifest, r: &ShapeRange) -> ProfileShapes {
        let c = &m.config;
        let shapes = |batch: usize, seq: usize, past: usize| -> String {
            let mut parts = vec![
                format!("input_ids:{batch}x{seq}"),
                format!("attention_mask:{batch}x{}", past + seq),
                format!("position_ids:{batch}x{seq}"),
            ];
            for name in m.io.inputs.iter().filter(|n| n.starts_with("past_key_values.")) {
                parts.push(format!("{name}:{batch}x{}x{past}x{}", c.num_kv_heads, c.head_dim));
            }
            parts.join(",")
        };
        ProfileShapes {
            min: shapes(1, 1, 0),
            opt: shapes(r.opt_batch, 1, r.opt_past),
            max: shapes(r.max_batch, r.max_seq, r.max_past),
        }
    }
}

impl TensorRtOptions {
    /// Options for artifact `m`: INT8 kernels enabled when any weight is integer-quantized,
    /// profiles over `r`, engines cached in `cache`.
    pub fn for_artifact(m: &Manifest, r: &ShapeRange, fp16: bool, cache: Option<PathBuf>) -> TensorRtOptions {
        TensorRtOptions {
            fp16,
            int8: m.has_integer_weights(),
            engine_cache: cache,
            profile: ProfileShapes::for_manifest(m, r),
        }
    }
}

/// Session settings. `Default` is what serving uses on CPU.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    /// Execution provider.
    pub provider: Provider,
    /// TensorRT settings (with `Provider::TensorRt`).
    pub tensorrt: Option<TensorRtOptions>,
    /// Intra-op threads; 0 lets ONNX Runtime choose.
    pub intra_threads: usize,
    /// Graph optimization level.
    pub optimization: Optimization,
    /// `accuracy_level` of fused MatMulNBits: `None` keeps ONNX Runtime's default (4: int8
    /// activations, fast; on the CPU kiln's quantized MatMul where it runs); 0 or 1 computes
    /// in f32 through MatMulNBits (exact math, for parity checks).
    pub matmul_accuracy_level: Option<u8>,
    /// The serving graph's KV cache; `None`: [`KvCache::default_for`] the artifact.
    pub kv_cache: Option<KvCache>,
    /// Keep the serving graph's KV cache contiguous on the CPU too (slot-sized regions, no
    /// paging, no prefix cache): the layout CUDA and TensorRT use, for comparison.
    pub contiguous_kv: bool,
    /// Write ONNX Runtime's optimized graph here (to inspect what it fused).
    pub optimized_model_path: Option<PathBuf>,
}

impl SessionOptions {
    /// Whether 4/8-bit products may quantize their activations to int8 (accuracy level 4,
    /// the default), rather than compute in f32.
    pub fn int8_activations(&self) -> bool {
        self.matmul_accuracy_level.is_none_or(|level| level >= 4)
    }
}

/// Path of the ONNX Runtime library: `KILN_ORT_LIB`, else the cache.
pub fn ort_library_path() -> PathBuf {
    match std::env::var_os("KILN_ORT_LIB") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => cache_dir().join("ort").join(ORT_LIBRARY),
    }
}

/// The process's ONNX Runtime environment, created on first use.
pub fn environment() -> Result<ort::environment::Environment, RuntimeError> {
    static ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();
    let path = ort_library_path();
    let env = ENV.get_or_init(|| {
        if !path.is_file() {
            return Err("file not found".to_string());
        }
        ort::init_from(&path).map_err(|e| e.to_string())?.with_name("kiln").build().map_err(|e| e.to_string())
    });
    env.clone().map_err(|reason| RuntimeError::Library { path, reason })
}

/// Returns heap memory freed during session creation to the OS.
///
/// ONNX Runtime's load-time rewrites (DequantizeLinear + MatMul → MatMulNBits, then
/// prepacking) allocate temporary copies of the weights; glibc keeps the freed pages, so
/// without a trim the process stays about 0.3× the weight file larger than it needs to be
/// (measured on SmolLM2 INT4: 1.54× → 1.20× the size of `model.onnx.data`).
fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it has no
    // preconditions and touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Reads an artifact's manifest for the runtime.
fn read_manifest(dir: &Path) -> Result<Manifest, RuntimeError> {
    Manifest::read(dir)
        .map_err(|e| RuntimeError::Artifact { path: dir.join(manifest::MANIFEST_FILE), reason: e.to_string() })
}

/// A session for the graph at `path` (of `form`) with `opts`. A GPU provider that cannot
/// register is an error, never a silent fallback to the CPU. On the CPU, the serving graph's
/// attention runs kiln's kernel ([`attention`]), over a paged KV cache where `paged`.
fn open_session(path: &Path, form: GraphForm, opts: &SessionOptions, paged: bool) -> Result<Session, RuntimeError> {
    let env = environment()?;
    let fail = |reason: String| RuntimeError::Session { path: path.to_path_buf(), reason };
    let level = match opts.optimization {
        Optimization::Disable => GraphOptimizationLevel::Disable,
        Optimization::Basic => GraphOptimizationLevel::Level1,
        Optimization::Extended => GraphOptimizationLevel::Level2,
        Optimization::All => GraphOptimizationLevel::All,
    };
    let mut b = Session::builder(&env)
        .map_err(|e| fail(e.to_string()))?
        .with_optimization_level(level)
        .map_err(|e| fail(e.to_string()))?
        // Worker threads spin between the kernels of a run (waking a parked thread for each
        // of the ~300 kernels of a decode step costs ~10% of it) and park when the run ends:
        // an idle server uses no CPU.
        .with_intra_op_spinning(true)
        .map_err(|e| fail(e.to_string()))?
        .with_config_entry("session.force_spinning_stop", "1")
        .map_err(|e| fail(e.to_string()))?;
    if opts.intra_threads > 0 {
        b = b.with_intra_threads(opts.intra_threads).map_err(|e| fail(e.to_string()))?;
    }
    if let Some(level) = opts.matmul_accuracy_level {
        b = b
            .with_config_entry("session.qdq_matmulnbits_accuracy_level", level.to_string())
            .map_err(|e| fail(e.to_string()))?;
    }
    if opts.provider != Provider::Cpu {
        opts.provider
            .availability()
            .map_err(|reason| fail(format!("{} execution provider: {reason}", opts.provider.name())))?;
        let ep = match opts.provider {
            Provider::Cuda => ort::ep::CUDA::default().build().error_on_failure(),
            _ => {
                let t = opts.tensorrt.clone().unwrap_or_default();
                let mut ep = ort::ep::TensorRT::default()
                    .with_fp16(t.fp16)
                    .with_int8(t.int8)
                    .with_profile_min_shapes(&t.profile.min)
                    .with_profile_opt_shapes(&t.profile.opt)
                    .with_profile_max_shapes(&t.profile.max);
                if let Some(dir) = &t.engine_cache {
                    ep = ep.with_engine_cache(true).with_engine_cache_path(dir.display());
                }
                ep.build().error_on_failure()
            }
        };
        b = b.with_execution_providers([ep]).map_err(|e| fail(e.to_string()))?;
    }
    if let Some(p) = &opts.optimized_model_path {
        b = b.with_optimized_model_path(p).map_err(|e| fail(e.to_string()))?;
    }
    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let mut model = pb::ModelProto::decode(bytes.as_slice()).map_err(|e| fail(format!("not an ONNX model: {e}")))?;
    let aliased = alias::gathered(model.graph.as_mut().ok_or_else(|| fail("the model has no graph".into()))?);
    let cpu_serving = form == GraphForm::Serving && opts.provider == Provider::Cpu;
    if cpu_serving {
        // Accuracy levels below 4 ask for f32 arithmetic: MatMulNBits keeps the products then.
        let cache = opts.kv_cache.unwrap_or(KvCache::F32);
        cpu::rewrite(&mut model, opts.int8_activations(), cache, paged).map_err(fail)?;
        b = b.with_operators(cpu::domain().map_err(|e| fail(e.to_string()))?).map_err(|e| fail(e.to_string()))?;
    }
    let session = if cpu_serving || aliased > 0 {
        let dir = path.parent().unwrap_or(Path::new("."));
        b.with_config_entry("session.model_external_initializers_file_folder_path", dir.display().to_string())
            .map_err(|e| fail(e.to_string()))?
            .commit_from_memory(&model.encode_to_vec())
            .map_err(|e| fail(e.to_string()))?
    } else {
        b.commit_from_file(path).map_err(|e| fail(e.to_string()))?
    };
    release_freed_heap();
    Ok(session)
}

/// One model forward pass over sequence slots whose KV cache the implementation keeps: the
/// engine's only view of a model, so tests can drive the engine with the native reference
/// or a fake.
pub trait Forward {
    /// Sequence slots (rows of the KV cache).
    fn slots(&self) -> usize;
    /// Positions one slot holds.
    fn max_context(&self) -> usize;
    /// Logits per position.
    fn vocab_size(&self) -> usize;
    /// Feeds `tokens` to `slot`, whose first `past` positions are cached already; returns
    /// the logits of the last `last` tokens, `[last, vocab]`.
    fn extend(&mut self, slot: usize, past: usize, tokens: &[u32], last: usize) -> Result<Array2<f32>, RuntimeError>;
    /// Feeds each of `prompts` (one length) to slots `first..first + prompts.len()` from
    /// position 0; returns each one's last-token logits, `[prompts, vocab]`. Implementations
    /// that can run them as one batch do; the results are those of one `extend` each.
    fn prefill_rows(&mut self, first: usize, prompts: &[&[u32]]) -> Result<Array2<f32>, RuntimeError> {
        let mut out = Array2::zeros((prompts.len(), self.vocab_size()));
        for (i, prompt) in prompts.iter().enumerate() {
            out.row_mut(i).assign(&self.extend(first + i, 0, prompt, 1)?.row(0));
        }
        Ok(out)
    }
    /// One token for each of slots `0..rows.len()`: `rows[i] = (token, cached positions of
    /// slot i)`. Returns `[rows, vocab]`.
    fn step(&mut self, rows: &[(u32, usize)]) -> Result<Array2<f32>, RuntimeError>;
    /// Copies the first `len` cached positions of slot `from` to slot `to` (a paged cache
    /// swaps the two slots' block tables instead).
    fn move_slot(&mut self, from: usize, to: usize, len: usize) -> Result<(), RuntimeError>;
    /// The paged KV pool, where the cache is one: the engine then keeps the pool's books
    /// ([`crate::engine::kv`]) and gives each slot its blocks with [`Self::bind_blocks`].
    fn kv_pool(&self) -> Option<KvPool> {
        None
    }
    /// Makes `blocks` (pool block ids, in position order) `slot`'s block table.
    fn bind_blocks(&mut self, slot: usize, blocks: &[u32]) -> Result<(), RuntimeError> {
        let _ = blocks;
        Err(RuntimeError::Run(format!("bind_blocks: slot {slot}: the KV cache is not paged")))
    }
}

/// A paged KV cache's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvPool {
    /// Blocks in the pool.
    pub blocks: usize,
    /// Positions per block.
    pub block_size: usize,
    /// Bytes of one block: keys and values of every layer.
    pub block_bytes: usize,
}

/// Key/value tensors of every layer, `[batch, kv_heads, positions, head_dim]` each.
pub type KvTensors = Vec<(Array4<f32>, Array4<f32>)>;

/// One run of the decoder graph.
#[derive(Debug, Clone)]
pub struct StepInput {
    /// `[batch, seq]`.
    pub input_ids: Array2<i64>,
    /// `[batch, past + seq]`.
    pub attention_mask: Array2<i64>,
    /// `[batch, seq]`.
    pub position_ids: Array2<i64>,
    /// Past keys and values per layer.
    pub past: KvTensors,
}

/// What one run returns.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// `[batch, seq, vocab]`.
    pub logits: Array3<f32>,
    /// Keys and values of past + new positions per layer.
    pub present: KvTensors,
}

/// An artifact's decoder in an ONNX Runtime session.
pub struct OrtDecoder {
    session: Session,
    manifest: Manifest,
}

impl OrtDecoder {
    /// Opens `dir/model.onnx` with `opts`. A GPU provider that cannot register is an
    /// error, never a silent fallback to the CPU.
    pub fn open(dir: &Path, opts: &SessionOptions) -> Result<Self, RuntimeError> {
        let manifest = read_manifest(dir)?;
        let session = open_session(&dir.join(manifest::MODEL_FILE), GraphForm::Portable, opts, false)?;
        Ok(OrtDecoder { session, manifest })
    }

    /// The artifact's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Empty past tensors for `batch` sequences.
    pub fn empty_past(&self, batch: usize) -> KvTensors {
        let c = &self.manifest.config;
        let shape = (batch, c.num_kv_heads, 0, c.head_dim);
        (0..c.num_layers).map(|_| (Array4::zeros(shape), Array4::zeros(shape))).collect()
    }

    /// Runs the graph once.
    pub fn run(&mut self, input: StepInput) -> Result<StepOutput, RuntimeError> {
        let layers = self.manifest.config.num_layers;
        if input.past.len() != layers {
            return Err(RuntimeError::Run(format!("{} past layers given, the graph has {layers}", input.past.len())));
        }
        let run = |e: ort::Error| RuntimeError::Run(e.to_string());
        let mut feeds: Vec<(String, ort::value::DynValue)> = vec![
            ("input_ids".into(), Tensor::from_array(input.input_ids).map_err(run)?.into_dyn()),
            ("attention_mask".into(), Tensor::from_array(input.attention_mask).map_err(run)?.into_dyn()),
            ("position_ids".into(), Tensor::from_array(input.position_ids).map_err(run)?.into_dyn()),
        ];
        for (i, (k, v)) in input.past.into_iter().enumerate() {
            feeds.push((format!("past_key_values.{i}.key"), Tensor::from_array(k).map_err(run)?.into_dyn()));
            feeds.push((format!("past_key_values.{i}.value"), Tensor::from_array(v).map_err(run)?.into_dyn()));
        }
        let outputs = self.session.run(feeds).map_err(run)?;
        let logits = outputs["logits"]
            .try_extract_array::<f32>()
            .map_err(run)?
            .into_dimensionality::<Ix3>()
            .map_err(|e| RuntimeError::Run(format!("logits: {e}")))?
            .to_owned();
        let mut present = Vec::with_capacity(layers);
        for i in 0..layers {
            let get = |name: String| -> Result<Array4<f32>, RuntimeError> {
                Ok(outputs[name.as_str()]
                    .try_extract_array::<f32>()
                    .map_err(run)?
                    .into_dimensionality::<Ix4>()
                    .map_err(|e| RuntimeError::Run(format!("{name}: {e}")))?
                    .to_owned())
            };
            present.push((get(format!("present.{i}.key"))?, get(format!("present.{i}.value"))?));
        }
        Ok(StepOutput { logits, present })
    }
}
