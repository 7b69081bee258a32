//! A [`Model`] from a GGUF file: configuration from `{arch}.*` metadata, weights
//! dequantized to f32 under Hugging Face names, tokenizer from `tokenizer.ggml.*`.
//!
//! llama.cpp's converter permutes the rows of the Q and K projections of `llama` models so
//! that its rotary embedding can rotate adjacent pairs. kiln uses the Hugging Face
//! rotate-half form everywhere, so the permutation is undone here (Qwen2 files are not
//! permuted). The reference logits test proves which form the weights are in.

use std::path::Path;

use super::gguf::{GgufFile, Value};
use super::weights::{gguf_name, Tensor, TensorSource, Weights};
use super::{tokenizer, Architecture, LoadError, Model, ModelConfig, SourceKind};

pub(crate) fn load(path: &Path) -> Result<Model, LoadError> {
    let file = GgufFile::open(path)?;
    let config = config_from_metadata(&file)?;
    let src = GgufSource { file: &file, config: &config, permuted: file_arch(&file)? == "llama" };
    let weights = Weights::read(&config, &src)?;
    let tokenizer = tokenizer::from_gguf(&file)?;
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(LoadError::Tokenizer {
            path: path.to_path_buf(),
            reason: format!("{} tokens but the embedding has {} rows", tokenizer.vocab_size(), config.vocab_size),
        });
    }
    Ok(Model { path: path.to_path_buf(), source: SourceKind::Gguf, config, weights, tokenizer })
}

fn file_arch(file: &GgufFile) -> Result<&str, LoadError> {
    file.get("general.architecture").and_then(Value::as_str).ok_or_else(|| LoadError::Config {
        path: file.path().to_path_buf(),
        field: "general.architecture".into(),
        reason: "missing or not a string".into(),
    })
}

/// Resolves the architecture hyper-parameters from `{arch}.*` metadata.
pub(crate) fn config_from_metadata(file: &GgufFile) -> Result<ModelConfig, LoadError> {
    let arch = file_arch(file)?;
    let architecture = match arch {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        other => {
            return Err(LoadError::Config {
                path: file.path().to_path_buf(),
                field: "general.architecture".into(),
                reason: format!("architecture {other:?} is not supported (llama, qwen2 are)"),
            })
        }
    };
    let key = |k: &str| format!("{arch}.{k}");
    let bad = |field: String, reason: &str| LoadError::Config {
        path: file.path().to_path_buf(),
        field,
        reason: reason.to_string(),
    };
    let uint = |k: &str| -> Result<Option<usize>, LoadError> {
        match file.get(&key(k)) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|v| Some(v as usize)).ok_or_else(|| bad(key(k), "not an unsigned integer")),
        }
    };
    let need = |k: &str| -> Result<usize, LoadError> { uint(k)?.ok_or_else(|| bad(key(k), "missing")) };
    let float = |k: &str| -> Result<Option<f64>, LoadError> {
        match file.get(&key(k)) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| bad(key(k), "not a number")),
        }
    };
    if let Some(v) = file.get(&key("rope.scaling.type")) {
        if v.as_str() != Some("none") {
            return Err(bad(key("rope.scaling.type"), &format!("rotary scaling {v} is not supported")));
        }
    }
    let hidden_size = need("embedding_length")?;
    let num_heads = need("attention.head_count")?;
    let num_kv_heads = uint("attention.head_count_kv")?.unwrap_or(num_heads);
    let head_dim = match uint("attention.key_length")? {
        Some(d) => d,
        None if num_heads > 0 => hidden_size / num_heads,
        None => 0,
    };
    let embed = file.tensor("token_embd.weight").ok_or_else(|| LoadError::MissingTensor {
        path: file.path().to_path_buf(),
        tensor: "token_embd.weight".into(),
    })?;
    let vocab_size = match uint("vocab_size")? {
        Some(v) => v,
        None => embed.shape()[0],
    };
    let config = ModelConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size: need("feed_forward_length")?,
        num_layers: need("block_count")?,
        num_heads,
        num_kv_heads,
        head_dim,
        rope_theta: float("rope.freq_base")?.unwrap_or(10_000.0),
        rms_norm_eps: float("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
        max_position_embeddings: need("context_length")?,
        tie_word_embeddings: file.tensor("output.weight").is_none(),
        attention_bias: file.tensor("blk.0.attn_q.bias").is_some(),
        sliding_window: None,
    };
    config.validate().map_err(|(field, reason)| bad(field, &reason))?;
    Ok(config)
}

struct GgufSource<'a> {
    file: &'a GgufFile,
    config: &'a ModelConfig,
    /// Q/K rows are in llama.cpp's interleaved rotary order.
    permuted: bool,
}

impl TensorSource for GgufSource<'_> {
    fn path(&self) -> &Path {
        self.file.path()
    }

    fn tensor(&self, hf_name: &str) -> Result<Option<Tensor>, LoadError> {
        let name = gguf_name(hf_name).ok_or_else(|| LoadError::MissingTensor {
            path: self.file.path().to_path_buf(),
            tensor: hf_name.to_string(),
        })?;
        let Some(info) = self.file.tensor(&name) else {
            return Err(LoadError::MissingTensor {
                path: self.file.path().to_path_buf(),
                tensor: format!("{name} (for {hf_name})"),
            });
        };
        if !info.ty.is_float_decodable() {
            return Err(LoadError::Format {
                path: self.file.path().to_path_buf(),
                reason: format!("tensor {name}: type {} is not a weight type kiln can decode", info.ty.name()),
            });
        }
        let shape = info.shape();
        let mut data = self.file.dequantize(&name)?;
        if self.permuted && shape.len() == 2 {
            let heads = if hf_name.ends_with("q_proj.weight") {
                Some(self.config.num_heads)
            } else if hf_name.ends_with("k_proj.weight") {
                Some(self.config.num_kv_heads)
            } else {
                None
            };
            if let Some(heads) = heads {
                if shape[0] != heads * self.config.head_dim {
                    return Err(LoadError::ShapeMismatch {
                        path: self.file.path().to_path_buf(),
                        tensor: name,
                        expected: vec![heads * self.config.head_dim, shape[1]],
                        actual: shape,
                    });
                }
                data = unpermute_rotary_rows(&data, heads, self.config.head_dim, shape[1]);
            }
        }
        Ok(Some((shape, data)))
    }
}

/// Undoes llama.cpp's row permutation of a Q or K projection `[heads·head_dim, cols]`.
///
/// llama.cpp stores, within each head, row `2i + j` (i < head_dim/2, j ∈ {0, 1}) from
/// Hugging Face row `j·head_dim/2 + i`: the two halves that rotate-half pairs up are
/// interleaved. This puts each row back.
pub fn unpermute_rotary_rows(data: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * head_dim + 2 * i + j) * cols;
                let dst = (h * head_dim + j * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    out
}
