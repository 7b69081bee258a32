//! `kiln.json`: what an artifact is, where it came from, and how it was made.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::decoder::TensorReport;
use super::recipe::Recipe;
use super::ExportError;
use crate::model::ModelConfig;
use crate::quant::mixed::MixedPlan;

/// Artifact format version; bumped when readers must change.
pub const FORMAT_VERSION: u32 = 3;
/// File names inside an artifact directory.
pub const MODEL_FILE: &str = "model.onnx";
/// The ONNX Runtime serving graph (GroupQueryAttention, shared KV buffers).
pub const SERVING_FILE: &str = "serving.onnx";
/// External data of `model.onnx` and `serving.onnx`.
pub const DATA_FILE: &str = "model.onnx.data";
/// Hugging Face tokenizer.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// This manifest.
pub const MANIFEST_FILE: &str = "kiln.json";

/// The manifest of an artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// kiln version that wrote it.
    pub kiln_version: String,
    /// Recipe name (file stem).
    pub name: String,
    /// Hash of kiln version and executable, recipe and source: equal hashes mean an
    /// up-to-date artifact.
    pub build_hash: String,
    /// The checkpoint it was made from.
    pub source: SourceInfo,
    /// Architecture of the exported graph (`num_layers` after truncation).
    pub config: ModelConfig,
    /// Positions covered by the rotary tables.
    pub max_context: usize,
    /// The recipe as parsed.
    pub recipe: Recipe,
    /// Inputs and outputs of the portable graph (`model.onnx`).
    pub io: IoSpec,
    /// Inputs and outputs of the ONNX Runtime serving graph (`serving.onnx`).
    pub serving_io: IoSpec,
    /// Special tokens and template.
    pub tokenizer: TokenizerInfo,
    /// Per weight matrix: scheme, bytes and quantization error.
    pub tensors: Vec<TensorReport>,
    /// File sizes.
    pub sizes: Sizes,
    /// What automatic mixed precision chose (`bits_per_weight` recipes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mixed_precision: Option<MixedPlan>,
}

/// Where the weights came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// Path as given.
    pub path: PathBuf,
    /// sha256 of the file (of every file, in name order, for a directory).
    pub sha256: String,
    /// `gguf` or `hf-dir`.
    pub kind: String,
}

/// Graph IO.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IoSpec {
    /// Input names in order.
    pub inputs: Vec<String>,
    /// Output names in order.
    pub outputs: Vec<String>,
    /// Layout of `past_key_values.*` and `present.*`.
    pub kv_layout: String,
}

/// Tokenizer facts generation needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    /// BOS id.
    pub bos_id: Option<u32>,
    /// Ids that end generation.
    pub eos_ids: Vec<u32>,
    /// Prompts start with BOS.
    pub add_bos: bool,
    /// Jinja chat template.
    pub chat_template: Option<String>,
    /// sha256 over the vocabulary (piece and id, in id order): equal for compatible drafts.
    pub vocab_sha256: String,
}

/// Sizes in bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sizes {
    /// `model.onnx`.
    pub onnx_bytes: u64,
    /// `serving.onnx`.
    pub serving_bytes: u64,
    /// `model.onnx.data`.
    pub data_bytes: u64,
    /// Initializer bytes by ONNX element type.
    pub by_dtype: BTreeMap<String, u64>,
}

impl Manifest {
    /// Reads `dir/kiln.json`.
    pub fn read(dir: &Path) -> Result<Manifest, ExportError> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| ExportError::Io { path: path.clone(), source })?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| ExportError::Manifest { path: path.clone(), reason: e.to_string() })?;
        if m.format_version != FORMAT_VERSION {
            return Err(ExportError::Manifest {
                path,
                reason: format!("format_version {} (this kiln reads {FORMAT_VERSION})", m.format_version),
            });
        }
        Ok(m)
    }

    /// Whether any weight is stored as 4/8-bit integers.
    pub fn has_integer_weights(&self) -> bool {
        self.tensors.iter().any(|t| t.scheme.precision.bits().is_some())
    }
}

/// Reads the graph of an artifact (`model.onnx`, without its external data).
pub fn read_graph(dir: &Path) -> Result<tract_onnx::pb::GraphProto, ExportError> {
    use prost::Message;
    let path = dir.join(MODEL_FILE);
    let bytes = std::fs::read(&path).map_err(|source| ExportError::Io { path: path.clone(), source })?;
    let model = tract_onnx::pb::ModelProto::decode(bytes.as_slice())
        .map_err(|e| ExportError::Manifest { path: path.clone(), reason: format!("not an ONNX model: {e}") })?;
    model.graph.ok_or_else(|| ExportError::Manifest { path, reason: "no graph".into() })
}
