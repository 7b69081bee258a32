//! An artifact directory opened for checking: manifest, graph, and external data.

use std::path::{Path, PathBuf};

use prost::Message;
use tract_onnx::pb;

use super::CheckError;
use crate::onnx::manifest::{self, Manifest};

/// An artifact's files, read.
pub struct ArtifactFiles {
    /// The directory.
    pub dir: PathBuf,
    /// `kiln.json`.
    pub manifest: Manifest,
    /// `model.onnx`, external data not loaded.
    pub model: pb::ModelProto,
    data_path: PathBuf,
    data: memmap2::Mmap,
}

impl ArtifactFiles {
    /// Reads the manifest and graph and maps the external data; checks that every external
    /// initializer lies inside the data file and that the graph's IO is the manifest's.
    pub fn open(dir: &Path) -> Result<Self, CheckError> {
        let manifest = Manifest::read(dir)
            .map_err(|e| CheckError::Artifact { path: dir.join(manifest::MANIFEST_FILE), reason: e.to_string() })?;
        let path = dir.join(manifest::MODEL_FILE);
        let bytes = std::fs::read(&path).map_err(|source| CheckError::Io { path: path.clone(), source })?;
        let model = pb::ModelProto::decode(bytes.as_slice()).map_err(|e| CheckError::Artifact {
            path: path.clone(),
            reason: format!("not an ONNX model (truncated?): {e}"),
        })?;
        let graph = model
            .graph
            .as_ref()
            .ok_or_else(|| CheckError::Artifact { path: path.clone(), reason: "no graph".into() })?;
        let inputs: Vec<&str> = graph.input.iter().map(|v| v.name.as_str()).collect();
        let outputs: Vec<&str> = graph.output.iter().map(|v| v.name.as_str()).collect();
        if inputs != manifest.io.inputs || outputs != manifest.io.outputs {
            return Err(CheckError::Artifact {
                path: dir.join(manifest::MANIFEST_FILE),
                reason: format!(
                    "the manifest does not match the graph: kiln.json lists {} inputs and {} outputs, model.onnx has {} and {}",
                    manifest.io.inputs.len(),
                    manifest.io.outputs.len(),
                    inputs.len(),
                    outputs.len()
                ),
            });
        }
        let data_path = dir.join(manifest::DATA_FILE);
        let file =
            std::fs::File::open(&data_path).map_err(|source| CheckError::Io { path: data_path.clone(), source })?;
        // SAFETY: read-only map of a file kiln does not modify while checking.
        let data = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|source| CheckError::Io { path: data_path.clone(), source })?;
        let files = ArtifactFiles { dir: dir.to_path_buf(), manifest, model, data_path, data };
        for t in &files.graph().initializer {
            if !t.external_data.is_empty() {
                files.external(t)?;
            }
        }
        Ok(files)
    }

    /// The graph.
    pub fn graph(&self) -> &pb::GraphProto {
        // `open` refused a model without a graph.
        self.model.graph.as_ref().expect("checked in open")
    }

    /// The raw bytes of an initializer, inline or external.
    pub fn bytes(&self, t: &pb::TensorProto) -> Result<Vec<u8>, CheckError> {
        if t.external_data.is_empty() {
            Ok(t.raw_data.clone())
        } else {
            self.external(t).map(<[u8]>::to_vec)
        }
    }

    /// The initializer called `name`.
    pub fn initializer(&self, name: &str) -> Option<&pb::TensorProto> {
        self.graph().initializer.iter().find(|t| t.name == name)
    }

    fn external(&self, t: &pb::TensorProto) -> Result<&[u8], CheckError> {
        let field = |k: &str| t.external_data.iter().find(|e| e.key == k).map(|e| e.value.as_str());
        let bad = |reason: String| CheckError::Artifact {
            path: self.data_path.clone(),
            reason: format!("initializer {}: {reason}", t.name),
        };
        let offset: usize = field("offset").unwrap_or("0").parse().map_err(|_| bad("bad offset".into()))?;
        let length: usize =
            field("length").ok_or_else(|| bad("no length".into()))?.parse().map_err(|_| bad("bad length".into()))?;
        let end = offset.checked_add(length).filter(|&e| e <= self.data.len()).ok_or_else(|| {
            bad(format!(
                "bytes [{offset}, {}) lie beyond the {} B data file (truncated?)",
                offset.saturating_add(length),
                self.data.len()
            ))
        })?;
        Ok(&self.data[offset..end])
    }
}
