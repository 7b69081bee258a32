//! Architecture hyper-parameters of a Llama-family decoder, resolved from either source.

use serde::{Deserialize, Serialize};

/// The decoder families kiln knows. They share one graph; they differ in defaults
/// (Qwen2 has q/k/v biases, Mistral may use a sliding attention window).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// LlamaForCausalLM (also SmolLM2, TinyLlama).
    Llama,
    /// MistralForCausalLM.
    Mistral,
    /// Qwen2ForCausalLM.
    Qwen2,
}

impl Architecture {
    /// The Hugging Face class name.
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// Hyper-parameters of a decoder, with every default resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// The family.
    pub architecture: Architecture,
    /// Rows of the embedding table and of the logits.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's inner layer.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Rotary embedding base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// The lm_head reuses the embedding table.
    pub tie_word_embeddings: bool,
    /// q/k/v projections have biases.
    pub attention_bias: bool,
    /// Keys further back than this many positions are masked out (Mistral).
    pub sliding_window: Option<usize>,
}

impl ModelConfig {
    /// Checks the relations between the numbers; `Err` names the offending field.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err((field.into(), "must be greater than 0".into()));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err((
                "num_key_value_heads".into(),
                format!("{} does not divide num_attention_heads {}", self.num_kv_heads, self.num_heads),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(("head_dim".into(), format!("{} is odd; rotary embeddings need pairs", self.head_dim)));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(("rope_theta".into(), format!("{} is not a usable rotary base", self.rope_theta)));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(("rms_norm_eps".into(), format!("{} must be a positive number", self.rms_norm_eps)));
        }
        if self.sliding_window == Some(0) {
            return Err(("sliding_window".into(), "must be greater than 0".into()));
        }
        Ok(())
    }

    /// Rotary inverse frequencies, one per pair of head dimensions, computed as Hugging
    /// Face does (the exponent in f32). The angle of position `p` is `p as f32 · f`.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        (0..d / 2).map(|i| (1.0 / self.rope_theta.powf(f64::from((2 * i) as f32 / d as f32))) as f32).collect()
    }

    /// Parameters in the weights (the lm_head counted once when tied).
    pub fn parameter_count(&self) -> usize {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let layer = 2 * h + h * q + 2 * h * kv + q * h + bias + 3 * h * i;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * h };
        self.vocab_size * h + self.num_layers * layer + h + head
    }
}
