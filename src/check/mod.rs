//! How an artifact is proven: the tract CPU reference, ONNX Runtime on the chosen
//! execution provider, parity between them, quality against the FP32 artifact, and the
//! report. Reads artifacts, never checkpoints.

pub mod artifact;
pub mod integrity;
pub mod lowering;
pub mod parity;
pub mod quality;
pub mod report;
pub mod tract;

use std::path::PathBuf;

/// Errors while checking. Each names the file or the failing step.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The artifact is incomplete or inconsistent.
    #[error("{path}: {reason}")]
    Artifact {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The graph cannot be lowered.
    #[error("graph: {0}")]
    Graph(String),
    /// tract refused the model.
    #[error("tract, {path}: {reason}")]
    Tract {
        /// The model file.
        path: PathBuf,
        /// tract's message.
        reason: String,
    },
    /// A run failed.
    #[error("run: {0}")]
    Run(String),
}

impl CheckError {
    /// A stable label for metrics and tests.
    pub fn kind(&self) -> &'static str {
        match self {
            CheckError::Io { .. } => "io",
            CheckError::Artifact { .. } => "artifact",
            CheckError::Graph(_) => "graph",
            CheckError::Tract { .. } => "tract",
            CheckError::Run(_) => "run",
        }
    }
}
