//! How a model is written: an ONNX graph builder over generated protobuf types, the
//! Llama-family decoder graph with QDQ weights, export recipes, and the artifact
//! directory (`model.onnx`, `model.onnx.data`, `tokenizer.json`, `kiln.json`).
//!
//! Nothing here runs a model: `check` and `runtime` read what this writes.

pub mod builder;
pub mod decoder;
pub mod export;
pub mod manifest;
pub mod recipe;

use std::path::PathBuf;

use crate::model::LoadError;

/// Errors while exporting. Each names the file, recipe field or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The recipe is malformed or asks for something that makes no sense.
    #[error("recipe {path}: {reason}")]
    Recipe {
        /// The recipe file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The source model could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A tensor's scheme cannot be applied to it.
    #[error("tensor {tensor}: {reason}")]
    Scheme {
        /// Hugging Face tensor name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A manifest cannot be read.
    #[error("{path}: invalid manifest: {reason}")]
    Manifest {
        /// The kiln.json file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A broken invariant inside kiln (a bug).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ExportError {
    /// A stable label for metrics and tests.
    pub fn kind(&self) -> &'static str {
        match self {
            ExportError::Io { .. } => "io",
            ExportError::Recipe { .. } => "recipe",
            ExportError::Load(e) => e.kind(),
            ExportError::Scheme { .. } => "scheme",
            ExportError::Manifest { .. } => "manifest",
            ExportError::Internal(_) => "internal",
        }
    }
}
