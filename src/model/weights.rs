//! The f32 weights of a Llama-family decoder, under Hugging Face names and layouts, and the
//! one table that maps those names to llama.cpp's GGUF names.

use std::path::Path;

use ndarray::{Array1, Array2};

use super::{LoadError, ModelConfig};

/// A linear layer: `y = x · weightᵀ + bias`, weight `[out, in]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    /// `[out_features, in_features]`.
    pub weight: Array2<f32>,
    /// `[out_features]`, when the layer has one.
    pub bias: Option<Array1<f32>>,
}

/// The weights of one decoder layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerWeights {
    /// RMSNorm before attention.
    pub input_layernorm: Array1<f32>,
    /// Query projection `[heads·head_dim, hidden]`.
    pub q_proj: Linear,
    /// Key projection `[kv_heads·head_dim, hidden]`.
    pub k_proj: Linear,
    /// Value projection `[kv_heads·head_dim, hidden]`.
    pub v_proj: Linear,
    /// Attention output projection `[hidden, heads·head_dim]`.
    pub o_proj: Linear,
    /// RMSNorm before the MLP.
    pub post_attention_layernorm: Array1<f32>,
    /// SwiGLU gate `[intermediate, hidden]`.
    pub gate_proj: Linear,
    /// SwiGLU up projection `[intermediate, hidden]`.
    pub up_proj: Linear,
    /// MLP down projection `[hidden, intermediate]`.
    pub down_proj: Linear,
}

/// All weights of a decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    /// Token embedding table `[vocab, hidden]`.
    pub embed_tokens: Array2<f32>,
    /// Decoder layers, in order.
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm.
    pub norm: Array1<f32>,
    /// Output projection `[vocab, hidden]`; `None` when tied to `embed_tokens`.
    pub lm_head: Option<Array2<f32>>,
}

impl Weights {
    /// The output projection, tied or not.
    pub fn lm_head(&self) -> &Array2<f32> {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Every 2-D matrix with its Hugging Face name, in checkpoint order.
    pub fn matrices(&self) -> Vec<(String, &Array2<f32>)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), &self.embed_tokens)];
        for (i, l) in self.layers.iter().enumerate() {
            for (name, lin) in l.linears() {
                out.push((format!("model.layers.{i}.{name}.weight"), &lin.weight));
            }
        }
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), head));
        }
        out
    }
}

impl LayerWeights {
    /// The seven projections with their Hugging Face names, mutable (same order as
    /// [`linears`](Self::linears)).
    pub fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        [
            ("self_attn.q_proj", &mut self.q_proj),
            ("self_attn.k_proj", &mut self.k_proj),
            ("self_attn.v_proj", &mut self.v_proj),
            ("self_attn.o_proj", &mut self.o_proj),
            ("mlp.gate_proj", &mut self.gate_proj),
            ("mlp.up_proj", &mut self.up_proj),
            ("mlp.down_proj", &mut self.down_proj),
        ]
    }

    /// The seven projections with their Hugging Face names.
    pub fn linears(&self) -> [(&'static str, &Linear); 7] {
        [
            ("self_attn.q_proj", &self.q_proj),
            ("self_attn.k_proj", &self.k_proj),
            ("self_attn.v_proj", &self.v_proj),
            ("self_attn.o_proj", &self.o_proj),
            ("mlp.gate_proj", &self.gate_proj),
            ("mlp.up_proj", &self.up_proj),
            ("mlp.down_proj", &self.down_proj),
        ]
    }
}

/// Hugging Face name ↔ GGUF name for the tensors outside the layers.
pub const GLOBAL_NAMES: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// Hugging Face suffix ↔ GGUF suffix for the tensors of layer `i`
/// (`model.layers.{i}.` ↔ `blk.{i}.`).
pub const LAYER_NAMES: [(&str, &str); 12] = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.bias", "attn_v.bias"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
];

/// The GGUF name of a Hugging Face tensor name, via [`GLOBAL_NAMES`] and [`LAYER_NAMES`].
pub fn gguf_name(hf: &str) -> Option<String> {
    if let Some((_, g)) = GLOBAL_NAMES.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, g) = LAYER_NAMES.iter().find(|(h, _)| *h == suffix)?;
    Some(format!("blk.{layer}.{g}"))
}

/// A tensor read from a checkpoint: row-major shape and f32 values.
pub(crate) type Tensor = (Vec<usize>, Vec<f32>);

/// A checkpoint that yields f32 tensors by Hugging Face name.
pub(crate) trait TensorSource {
    /// The file or directory, for error messages.
    fn path(&self) -> &Path;
    /// The tensor, or `None` when the checkpoint does not have it.
    fn tensor(&self, hf_name: &str) -> Result<Option<Tensor>, LoadError>;
}

impl Weights {
    /// Reads every tensor `config` calls for from `src`, checking shapes.
    pub(crate) fn read(config: &ModelConfig, src: &dyn TensorSource) -> Result<Weights, LoadError> {
        let h = config.hidden_size;
        let q = config.num_heads * config.head_dim;
        let kv = config.num_kv_heads * config.head_dim;
        let inter = config.intermediate_size;
        let vec = |name: &str, n: usize| -> Result<Array1<f32>, LoadError> {
            let data = required(src, name, &[n])?;
            Ok(Array1::from_vec(data))
        };
        let mat = |name: &str, rows: usize, cols: usize| -> Result<Array2<f32>, LoadError> {
            let data = required(src, name, &[rows, cols])?;
            Array2::from_shape_vec((rows, cols), data).map_err(|e| LoadError::Format {
                path: src.path().to_path_buf(),
                reason: format!("tensor {name}: {e}"),
            })
        };
        let linear = |prefix: &str, out: usize, inp: usize, bias: bool| -> Result<Linear, LoadError> {
            Ok(Linear {
                weight: mat(&format!("{prefix}.weight"), out, inp)?,
                bias: if bias { Some(vec(&format!("{prefix}.bias"), out)?) } else { None },
            })
        };
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = format!("model.layers.{i}");
            let bias = config.attention_bias;
            layers.push(LayerWeights {
                input_layernorm: vec(&format!("{p}.input_layernorm.weight"), h)?,
                q_proj: linear(&format!("{p}.self_attn.q_proj"), q, h, bias)?,
                k_proj: linear(&format!("{p}.self_attn.k_proj"), kv, h, bias)?,
                v_proj: linear(&format!("{p}.self_attn.v_proj"), kv, h, bias)?,
                o_proj: linear(&format!("{p}.self_attn.o_proj"), h, q, false)?,
                post_attention_layernorm: vec(&format!("{p}.post_attention_layernorm.weight"), h)?,
                gate_proj: linear(&format!("{p}.mlp.gate_proj"), inter, h, false)?,
                up_proj: linear(&format!("{p}.mlp.up_proj"), inter, h, false)?,
                down_proj: linear(&format!("{p}.mlp.down_proj"), h, inter, false)?,
            });
        }
        let lm_head =
            if config.tie_word_embeddings { None } else { Some(mat("lm_head.weight", config.vocab_size, h)?) };
        Ok(Weights {
            embed_tokens: mat("model.embed_tokens.weight", config.vocab_size, h)?,
            layers,
            norm: vec("model.norm.weight", h)?,
            lm_head,
        })
    }
}

fn required(src: &dyn TensorSource, name: &str, shape: &[usize]) -> Result<Vec<f32>, LoadError> {
    let (actual, data) = src
        .tensor(name)?
        .ok_or_else(|| LoadError::MissingTensor { path: src.path().to_path_buf(), tensor: name.to_string() })?;
    if actual != shape {
        return Err(LoadError::ShapeMismatch {
            path: src.path().to_path_buf(),
            tensor: name.to_string(),
            expected: shape.to_vec(),
            actual,
        });
    }
    Ok(data)
}
