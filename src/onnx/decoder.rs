//! The Llama-family decoder as a portable ONNX graph (opset 21, standard ops only).
//!
//! One graph serves prefill (seq > 1, past 0), decode (seq 1) and chunks with a past, and
//! batches padded on either side: the caller passes `attention_mask` over past + new
//! positions and `position_ids` for the new ones.
//!
//! IO (Optimum / onnxruntime-genai names): `input_ids` [batch, seq] i64, `attention_mask`
//! [batch, past+seq] i64, `position_ids` [batch, seq] i64, `past_key_values.{i}.key|value`
//! [batch, kv_heads, past, head_dim] f32; outputs `logits` [batch, seq, vocab] f32 and
//! `present.{i}.key|value` [batch, kv_heads, past+seq, head_dim].
//!
//! Forms are chosen for tract and for ONNX Runtime's fusions (DESIGN.md): the causal mask
//! comes from Range + LessOrEqual + Where (no Trilu); reshapes copy dims with 0 instead of
//! inferring with -1; RMSNorm is Pow → ReduceMean → Add → Sqrt → Div → Mul (fused by ORT
//! into SimplifiedLayerNormalization); weights are integer initializers → DequantizeLinear
//! → MatMul (fused into MatMulNBits); quantized embeddings gather integer rows and their
//! scales before converting; the lm_head has its own initializer.
//!
//! The serving form ([`GraphForm::Serving`], ONNX Runtime only) computes the same function
//! with the `com.microsoft::GroupQueryAttention` contrib op: its KV inputs are buffers sized
//! for the whole context (`[batch, kv_heads, max_sequence_length, head_dim]`) that the
//! caller binds as both `past_key_values.*` and `present.*`, so a decode step writes one
//! position in place instead of copying the cache; `seqlens_k` [batch] i32 holds each row's
//! total length − 1 and `total_sequence_length` (i32 scalar) the longest total;
//! `logits_to_keep` ([1] i64) says how many last positions get logits. Both forms
//! share every initializer, so the artifact stores the weights once.
//!
//! Grouped-query attention runs in 5-D, `[batch, kv_heads, group, seq, head_dim]`, so each
//! key/value head is read by its `group` query heads by broadcasting, with no copy.

use std::collections::HashMap;

use ndarray::Array2;

use super::builder::{Attr, DType, Dim, GraphBuilder, TensorData};
use super::ExportError;
use crate::model::{ModelConfig, Weights};
use crate::quant::{self, Layout, Precision, QuantError, Quantized, Scheme};

/// What was stored for one weight matrix.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct TensorReport {
    /// Hugging Face name (`lm_head.weight` also when tied).
    pub name: String,
    /// Shape in the checkpoint, `[out, in]` or `[vocab, hidden]`.
    pub shape: [usize; 2],
    /// Scheme used.
    pub scheme: Scheme,
    /// Short label of the scheme.
    pub label: String,
    /// Bytes of its initializers (codes, scales, zero points).
    pub bytes: u64,
    /// Distance from the f32 weights.
    pub error: QuantError,
}

/// Chooses the scheme of each matrix by Hugging Face name.
pub type SchemeFor<'a> = dyn Fn(&str) -> Scheme + 'a;

/// Inputs of [`build`].
pub struct DecoderSource<'a> {
    /// Architecture (its `num_layers` may be below the checkpoint's for a truncated draft).
    pub config: &'a ModelConfig,
    /// f32 weights (at least `config.num_layers` layers).
    pub weights: &'a Weights,
    /// Positions covered by the rotary tables (the longest context the graph accepts).
    pub max_context: usize,
    /// Matrices already quantized by a calibration method (GPTQ), by Hugging Face name;
    /// the others are quantized here by round-to-nearest.
    pub prequantized: &'a HashMap<String, Quantized>,
    /// Which graph to build.
    pub form: GraphForm,
}

/// The two graphs of an artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphForm {
    /// Standard ops only: ONNX Runtime, tract and TensorRT read it; the KV cache grows by Concat.
    Portable,
    /// ONNX Runtime's GroupQueryAttention over KV buffers shared between past and present.
    Serving,
}

/// Builds the decoder graph; `on_tensor` is called after each weight matrix is stored.
pub fn build(
    src: &DecoderSource<'_>,
    scheme_for: &SchemeFor<'_>,
    on_tensor: &mut dyn FnMut(&TensorReport),
) -> Result<(GraphBuilder, Vec<TensorReport>), ExportError> {
    let mut d = Decoder {
        g: GraphBuilder::default(),
        c: src.config,
        reports: Vec::new(),
        on_tensor,
        prequantized: src.prequantized,
    };
    d.graph(src, scheme_for)?;
    Ok((d.g, d.reports))
}

/// Names of the graph inputs, in order, for `layers` layers.
pub fn input_names(form: GraphForm, layers: usize) -> Vec<String> {
    let mut names: Vec<String> = match form {
        GraphForm::Portable => vec!["input_ids".into(), "attention_mask".into(), "position_ids".into()],
        GraphForm::Serving => {
            let names = ["input_ids", "position_ids", "seqlens_k", "total_sequence_length", "logits_to_keep"];
            names.iter().map(|n| n.to_string()).collect()
        }
    };
    for i in 0..layers {
        names.push(format!("past_key_values.{i}.key"));
        names.push(format!("past_key_values.{i}.value"));
    }
    names
}

/// Names of the graph outputs, in order, for `layers` layers.
pub fn output_names(layers: usize) -> Vec<String> {
    let mut names = vec!["logits".to_string()];
    for i in 0..layers {
        names.push(format!("present.{i}.key"));
        names.push(format!("present.{i}.value"));
    }
    names
}

struct Decoder<'a, 'c> {
    g: GraphBuilder,
    c: &'c ModelConfig,
    reports: Vec<TensorReport>,
    on_tensor: &'a mut dyn FnMut(&TensorReport),
    prequantized: &'c HashMap<String, Quantized>,
}

/// Values every layer reads.
struct Shared {
    cos_q: String,
    sin_q: String,
    cos_k: String,
    sin_k: String,
    /// The portable graph's additive mask, or the serving graph's `(seqlens_k, total)`.
    attention: Masking,
}

enum Masking {
    Bias(String),
    Lengths { seqlens: String, total: String },
}

fn sym(s: &str) -> Dim {
    Dim::Symbol(s.into())
}

impl Decoder<'_, '_> {
    fn graph(&mut self, src: &DecoderSource<'_>, scheme_for: &SchemeFor<'_>) -> Result<(), ExportError> {
        let c = self.c;
        let (kvh, hd) = (c.num_kv_heads as i64, c.head_dim as i64);
        let g = &mut self.g;
        let ids = g.input("input_ids", DType::I64, &[sym("batch_size"), sym("sequence_length")]);
        let (mask, kv_len, total_len) = match src.form {
            GraphForm::Portable => (
                Some(g.input("attention_mask", DType::I64, &[sym("batch_size"), sym("total_sequence_length")])),
                "past_sequence_length",
                "total_sequence_length",
            ),
            GraphForm::Serving => (None, "max_sequence_length", "max_sequence_length"),
        };
        let pos = g.input("position_ids", DType::I64, &[sym("batch_size"), sym("sequence_length")]);
        if src.form == GraphForm::Serving {
            g.input("seqlens_k", DType::I32, &[sym("batch_size")]);
            g.input("total_sequence_length", DType::I32, &[]);
            g.input("logits_to_keep", DType::I64, &[Dim::Fixed(1)]);
        }
        let kv_dims = [sym("batch_size"), Dim::Fixed(kvh), sym(kv_len), Dim::Fixed(hd)];
        for i in 0..c.num_layers {
            g.input(&format!("past_key_values.{i}.key"), DType::F32, &kv_dims);
            g.input(&format!("past_key_values.{i}.value"), DType::F32, &kv_dims);
        }

        let shared = self.shared(&ids, mask.as_deref(), &pos, src.max_context);
        let mut x = self.embedding(&src.weights.embed_tokens, &ids, scheme_for("model.embed_tokens.weight"))?;
        for i in 0..c.num_layers {
            x = self.layer(i, &x, &shared, src.weights, scheme_for)?;
        }
        if src.form == GraphForm::Serving {
            // Only the last `logits_to_keep` positions reach the lm_head: a prefill needs one.
            let g = &mut self.g;
            let start = g.op("Neg", "/logits_to_keep/Neg", &["logits_to_keep"], &[]);
            let (end, axis) = (g.ints(&[i64::MAX]), g.ints(&[1]));
            x = g.op("Slice", "/logits_to_keep/Slice", &[&x, &start, &end, &axis], &[]);
        }
        let h = self.rms_norm("/model/norm", &x, &src.weights.norm.to_vec(), "model.norm.weight");
        let head = self.weight("lm_head.weight", src.weights.lm_head(), scheme_for("lm_head.weight"))?;
        self.g.op_to("MatMul", "/lm_head/MatMul", &[&h, &head], &[], "logits");

        let g = &mut self.g;
        let logits_len = match src.form {
            GraphForm::Portable => "sequence_length",
            GraphForm::Serving => "logits_sequence_length",
        };
        g.output("logits", DType::F32, &[sym("batch_size"), sym(logits_len), Dim::Fixed(c.vocab_size as i64)]);
        let present = [sym("batch_size"), Dim::Fixed(kvh), sym(total_len), Dim::Fixed(hd)];
        for i in 0..c.num_layers {
            g.output(&format!("present.{i}.key"), DType::F32, &present);
            g.output(&format!("present.{i}.value"), DType::F32, &present);
        }
        Ok(())
    }

    /// Rotary tables gathered at `position_ids`, and the additive attention mask
    /// `[batch, 1, 1, seq, past+seq]` (0 where a key is visible, the lowest f32 elsewhere);
    /// without `mask` (the serving graph) the rotary tables broadcast over `[batch, seq,
    /// heads, head_dim]` and GroupQueryAttention masks by lengths.
    fn shared(&mut self, ids: &str, mask: Option<&str>, pos: &str, max_context: usize) -> Shared {
        let c = self.c;
        let (cos, sin) = rotary_tables(c, max_context);
        let g = &mut self.g;
        let cos_t = g.initializer("rotary.cos", TensorData::f32(&[max_context, c.head_dim], &cos));
        let sin_t = g.initializer("rotary.sin", TensorData::f32(&[max_context, c.head_dim], &sin));
        let cos = g.op("Gather", "/rotary/cos/Gather", &[&cos_t, pos], &[]);
        let sin = g.op("Gather", "/rotary/sin/Gather", &[&sin_t, pos], &[]);
        let ax1 = g.ints(&[1]);
        let ax12 = g.ints(&[1, 2]);
        let Some(mask) = mask else {
            let ax2 = g.ints(&[2]);
            let cos = g.op("Unsqueeze", "/rotary/cos/Unsqueeze", &[&cos, &ax2], &[]);
            let sin = g.op("Unsqueeze", "/rotary/sin/Unsqueeze", &[&sin, &ax2], &[]);
            let attention = Masking::Lengths { seqlens: "seqlens_k".into(), total: "total_sequence_length".into() };
            return Shared { cos_q: cos.clone(), sin_q: sin.clone(), cos_k: cos, sin_k: sin, attention };
        };
        let cos_k = g.op("Unsqueeze", "/rotary/cos_k/Unsqueeze", &[&cos, &ax1], &[]);
        let sin_k = g.op("Unsqueeze", "/rotary/sin_k/Unsqueeze", &[&sin, &ax1], &[]);
        let cos_q = g.op("Unsqueeze", "/rotary/cos_q/Unsqueeze", &[&cos, &ax12], &[]);
        let sin_q = g.op("Unsqueeze", "/rotary/sin_q/Unsqueeze", &[&sin, &ax12], &[]);

        // Sizes from shapes: seq from input_ids, past from the first past key, total from the mask.
        let one = g.scalar_i64(1);
        let zero = g.scalar_i64(0);
        let two = g.scalar_i64(2);
        let ids_shape = g.op("Shape", "/mask/ids/Shape", &[ids], &[]);
        let seq = g.op("Gather", "/mask/seq/Gather", &[&ids_shape, &one], &[("axis", Attr::Int(0))]);
        let past_shape = g.op("Shape", "/mask/past/Shape", &["past_key_values.0.key"], &[]);
        let past = g.op("Gather", "/mask/past/Gather", &[&past_shape, &two], &[("axis", Attr::Int(0))]);
        let mask_shape = g.op("Shape", "/mask/total/Shape", &[mask], &[]);
        let total = g.op("Gather", "/mask/total/Gather", &[&mask_shape, &one], &[("axis", Attr::Int(0))]);
        let end = g.op("Add", "/mask/end/Add", &[&past, &seq], &[]);
        let q_pos = g.op("Range", "/mask/q_pos/Range", &[&past, &end, &one], &[]);
        let k_pos = g.op("Range", "/mask/k_pos/Range", &[&zero, &total, &one], &[]);
        let ax0 = g.ints(&[0]);
        let q_col = g.op("Unsqueeze", "/mask/q_col/Unsqueeze", &[&q_pos, &ax1], &[]);
        let k_row = g.op("Unsqueeze", "/mask/k_row/Unsqueeze", &[&k_pos, &ax0], &[]);
        let mut visible = g.op("LessOrEqual", "/mask/causal/LessOrEqual", &[&k_row, &q_col], &[]);
        if let Some(window) = c.sliding_window {
            let w = g.scalar_i64(window as i64);
            let oldest = g.op("Sub", "/mask/window/Sub", &[&q_col, &w], &[]);
            let recent = g.op("Greater", "/mask/window/Greater", &[&k_row, &oldest], &[]);
            visible = g.op("And", "/mask/window/And", &[&visible, &recent], &[]);
        }
        let padded = g.op("Cast", "/mask/pad/Cast", &[mask], &[("to", Attr::Int(DType::Bool.onnx() as i64))]);
        let pad4 = g.op("Unsqueeze", "/mask/pad/Unsqueeze", &[&padded, &ax12], &[]);
        let allowed = g.op("And", "/mask/allowed/And", &[&visible, &pad4], &[]);
        let zero_f = g.scalar(0.0);
        let low = g.scalar(f32::MIN);
        let bias = g.op("Where", "/mask/bias/Where", &[&allowed, &zero_f, &low], &[]);
        let mask = g.op("Unsqueeze", "/mask/bias/Unsqueeze", &[&bias, &ax1], &[]);
        Shared { cos_q, sin_q, cos_k, sin_k, attention: Masking::Bias(mask) }
    }

    fn layer(
        &mut self,
        i: usize,
        x: &str,
        s: &Shared,
        weights: &Weights,
        scheme_for: &SchemeFor<'_>,
    ) -> Result<String, ExportError> {
        let w = &weights.layers[i];
        let p = format!("/model/layers.{i}");
        let hf = format!("model.layers.{i}");

        let h = self.rms_norm(
            &format!("{p}/input_layernorm"),
            x,
            &w.input_layernorm.to_vec(),
            &format!("{hf}.input_layernorm.weight"),
        );
        let q =
            self.linear(&format!("{p}/attn/q_proj"), &h, &format!("{hf}.self_attn.q_proj"), &w.q_proj, scheme_for)?;
        let k =
            self.linear(&format!("{p}/attn/k_proj"), &h, &format!("{hf}.self_attn.k_proj"), &w.k_proj, scheme_for)?;
        let v =
            self.linear(&format!("{p}/attn/v_proj"), &h, &format!("{hf}.self_attn.v_proj"), &w.v_proj, scheme_for)?;

        let ctx = match &s.attention {
            Masking::Bias(mask) => self.attention(i, &p, [&q, &k, &v], s, mask),
            Masking::Lengths { seqlens, total } => self.group_query_attention(i, &p, [&q, &k, &v], s, seqlens, total),
        };
        let o =
            self.linear(&format!("{p}/attn/o_proj"), &ctx, &format!("{hf}.self_attn.o_proj"), &w.o_proj, scheme_for)?;
        let x = self.g.op("Add", &format!("{p}/attn/residual/Add"), &[x, &o], &[]);

        let h = self.rms_norm(
            &format!("{p}/post_attention_layernorm"),
            &x,
            &w.post_attention_layernorm.to_vec(),
            &format!("{hf}.post_attention_layernorm.weight"),
        );
        let gate =
            self.linear(&format!("{p}/mlp/gate_proj"), &h, &format!("{hf}.mlp.gate_proj"), &w.gate_proj, scheme_for)?;
        let up = self.linear(&format!("{p}/mlp/up_proj"), &h, &format!("{hf}.mlp.up_proj"), &w.up_proj, scheme_for)?;
        let g = &mut self.g;
        let sig = g.op("Sigmoid", &format!("{p}/mlp/act/Sigmoid"), &[&gate], &[]);
        let act = g.op("Mul", &format!("{p}/mlp/act/Mul"), &[&gate, &sig], &[]);
        let m = g.op("Mul", &format!("{p}/mlp/Mul"), &[&act, &up], &[]);
        let down =
            self.linear(&format!("{p}/mlp/down_proj"), &m, &format!("{hf}.mlp.down_proj"), &w.down_proj, scheme_for)?;
        Ok(self.g.op("Add", &format!("{p}/mlp/residual/Add"), &[&x, &down], &[]))
    }

    /// Portable attention: heads split to `[batch, kv_heads, group, seq, head_dim]`, the
    /// cache grown by Concat into `present.*`, scores masked by the additive `mask`.
    fn attention(&mut self, i: usize, p: &str, [q, k, v]: [&str; 3], s: &Shared, mask: &str) -> String {
        let c = self.c;
        let (kvh, group, hd) = (c.num_kv_heads as i64, (c.num_heads / c.num_kv_heads) as i64, c.head_dim as i64);
        let g = &mut self.g;
        let q_shape = g.ints(&[0, 0, kvh, group, hd]);
        let kv_shape = g.ints(&[0, 0, kvh, hd]);
        let q = g.op("Reshape", &format!("{p}/attn/q/Reshape"), &[q, &q_shape], &[]);
        let q =
            g.op("Transpose", &format!("{p}/attn/q/Transpose"), &[&q], &[("perm", Attr::Ints(vec![0, 2, 3, 1, 4]))]);
        let k = g.op("Reshape", &format!("{p}/attn/k/Reshape"), &[k, &kv_shape], &[]);
        let k = g.op("Transpose", &format!("{p}/attn/k/Transpose"), &[&k], &[("perm", Attr::Ints(vec![0, 2, 1, 3]))]);
        let v = g.op("Reshape", &format!("{p}/attn/v/Reshape"), &[v, &kv_shape], &[]);
        let v = g.op("Transpose", &format!("{p}/attn/v/Transpose"), &[&v], &[("perm", Attr::Ints(vec![0, 2, 1, 3]))]);
        let q = self.rotary(&format!("{p}/attn/q_rotary"), &q, &s.cos_q, &s.sin_q);
        let k = self.rotary(&format!("{p}/attn/k_rotary"), &k, &s.cos_k, &s.sin_k);

        let g = &mut self.g;
        let present_k = format!("present.{i}.key");
        let present_v = format!("present.{i}.value");
        let past_k = format!("past_key_values.{i}.key");
        let past_v = format!("past_key_values.{i}.value");
        g.op_to("Concat", &format!("{p}/attn/k/Concat"), &[&past_k, &k], &[("axis", Attr::Int(2))], &present_k);
        g.op_to("Concat", &format!("{p}/attn/v/Concat"), &[&past_v, &v], &[("axis", Attr::Int(2))], &present_v);
        let ax2 = g.ints(&[2]);
        let k5 = g.op("Unsqueeze", &format!("{p}/attn/k/Unsqueeze"), &[&present_k, &ax2], &[]);
        let v5 = g.op("Unsqueeze", &format!("{p}/attn/v/Unsqueeze"), &[&present_v, &ax2], &[]);
        let kt =
            g.op("Transpose", &format!("{p}/attn/kt/Transpose"), &[&k5], &[("perm", Attr::Ints(vec![0, 1, 2, 4, 3]))]);
        let scores = g.op("MatMul", &format!("{p}/attn/scores/MatMul"), &[&q, &kt], &[]);
        let scale = g.scalar(1.0 / (c.head_dim as f32).sqrt());
        let scores = g.op("Mul", &format!("{p}/attn/scores/Mul"), &[&scores, &scale], &[]);
        let scores = g.op("Add", &format!("{p}/attn/scores/Add"), &[&scores, mask], &[]);
        let probs = g.op("Softmax", &format!("{p}/attn/Softmax"), &[&scores], &[("axis", Attr::Int(-1))]);
        let ctx = g.op("MatMul", &format!("{p}/attn/context/MatMul"), &[&probs, &v5], &[]);
        let ctx = g.op(
            "Transpose",
            &format!("{p}/attn/context/Transpose"),
            &[&ctx],
            &[("perm", Attr::Ints(vec![0, 3, 1, 2, 4]))],
        );
        let flat = g.ints(&[0, 0, (c.num_heads * c.head_dim) as i64]);
        let ctx = g.op("Reshape", &format!("{p}/attn/context/Reshape"), &[&ctx, &flat], &[]);
        ctx
    }

    /// Serving attention: rotary on `[batch, seq, heads, head_dim]`, then
    /// GroupQueryAttention reading and writing the shared KV buffers in place.
    fn group_query_attention(
        &mut self,
        i: usize,
        p: &str,
        [q, k, v]: [&str; 3],
        s: &Shared,
        seqlens: &str,
        total: &str,
    ) -> String {
        let c = self.c;
        let (heads, kvh, hd) = (c.num_heads as i64, c.num_kv_heads as i64, c.head_dim as i64);
        let g = &mut self.g;
        let q_shape = g.ints(&[0, 0, heads, hd]);
        let kv_shape = g.ints(&[0, 0, kvh, hd]);
        let q_flat = g.ints(&[0, 0, heads * hd]);
        let kv_flat = g.ints(&[0, 0, kvh * hd]);
        let q = g.op("Reshape", &format!("{p}/attn/q/Reshape"), &[q, &q_shape], &[]);
        let k = g.op("Reshape", &format!("{p}/attn/k/Reshape"), &[k, &kv_shape], &[]);
        let q = self.rotary(&format!("{p}/attn/q_rotary"), &q, &s.cos_q, &s.sin_q);
        let k = self.rotary(&format!("{p}/attn/k_rotary"), &k, &s.cos_k, &s.sin_k);
        let g = &mut self.g;
        let q = g.op("Reshape", &format!("{p}/attn/q/Flatten"), &[&q, &q_flat], &[]);
        let k = g.op("Reshape", &format!("{p}/attn/k/Flatten"), &[&k, &kv_flat], &[]);
        let mut attrs = vec![("num_heads", Attr::Int(heads)), ("kv_num_heads", Attr::Int(kvh))];
        if let Some(window) = c.sliding_window {
            // GroupQueryAttention's window counts the keys before the current one.
            attrs.push(("local_window_size", Attr::Int(window as i64 - 1)));
        }
        let ctx = format!("{p}/attn/GroupQueryAttention/output_0");
        let (past_k, past_v) = (format!("past_key_values.{i}.key"), format!("past_key_values.{i}.value"));
        let (present_k, present_v) = (format!("present.{i}.key"), format!("present.{i}.value"));
        g.op_in(
            "com.microsoft",
            "GroupQueryAttention",
            &format!("{p}/attn/GroupQueryAttention"),
            &[&q, &k, v, &past_k, &past_v, seqlens, total],
            &attrs,
            &[&ctx, &present_k, &present_v],
        );
        ctx
    }

    /// Rotate-half rotary embedding over the last axis: `x·cos + rotate_half(x)·sin`.
    fn rotary(&mut self, p: &str, x: &str, cos: &str, sin: &str) -> String {
        let half = (self.c.head_dim / 2) as i64;
        let g = &mut self.g;
        let (s0, s1, e1, e2, last) =
            (g.ints(&[0]), g.ints(&[half]), g.ints(&[half]), g.ints(&[2 * half]), g.ints(&[-1]));
        let x1 = g.op("Slice", &format!("{p}/x1/Slice"), &[x, &s0, &e1, &last], &[]);
        let x2 = g.op("Slice", &format!("{p}/x2/Slice"), &[x, &s1, &e2, &last], &[]);
        let neg = g.op("Neg", &format!("{p}/Neg"), &[&x2], &[]);
        let rot = g.op("Concat", &format!("{p}/Concat"), &[&neg, &x1], &[("axis", Attr::Int(-1))]);
        let a = g.op("Mul", &format!("{p}/cos/Mul"), &[x, cos], &[]);
        let b = g.op("Mul", &format!("{p}/sin/Mul"), &[&rot, sin], &[]);
        g.op("Add", &format!("{p}/Add"), &[&a, &b], &[])
    }

    fn rms_norm(&mut self, p: &str, x: &str, weight: &[f32], name: &str) -> String {
        let eps = self.c.rms_norm_eps as f32;
        let g = &mut self.g;
        let w = g.initializer(name, TensorData::f32(&[weight.len()], weight));
        let two = g.scalar(2.0);
        let axes = g.ints(&[-1]);
        let eps = g.scalar(eps);
        let sq = g.op("Pow", &format!("{p}/Pow"), &[x, &two], &[]);
        let mean = g.op("ReduceMean", &format!("{p}/ReduceMean"), &[&sq, &axes], &[("keepdims", Attr::Int(1))]);
        let var = g.op("Add", &format!("{p}/Add"), &[&mean, &eps], &[]);
        let rms = g.op("Sqrt", &format!("{p}/Sqrt"), &[&var], &[]);
        let normed = g.op("Div", &format!("{p}/Div"), &[x, &rms], &[]);
        g.op("Mul", &format!("{p}/Mul"), &[&normed, &w], &[])
    }

    /// `x · Wᵀ (+ b)` with W stored per its scheme.
    fn linear(
        &mut self,
        p: &str,
        x: &str,
        hf: &str,
        l: &crate::model::Linear,
        scheme_for: &SchemeFor<'_>,
    ) -> Result<String, ExportError> {
        let name = format!("{hf}.weight");
        let w = self.weight(&name, &l.weight, scheme_for(&name))?;
        let y = self.g.op("MatMul", &format!("{p}/MatMul"), &[x, &w], &[]);
        Ok(match &l.bias {
            None => y,
            Some(b) => {
                let b = self.g.initializer(&format!("{hf}.bias"), TensorData::f32(&[b.len()], &b.to_vec()));
                self.g.op("Add", &format!("{p}/Add"), &[&y, &b], &[])
            }
        })
    }

    /// A weight `[out, in]` as the right operand of MatMul, `[in, out]` in f32 (stored as
    /// f32, f16 + Cast, or integer codes + DequantizeLinear).
    fn weight(&mut self, name: &str, w: &Array2<f32>, scheme: Scheme) -> Result<String, ExportError> {
        scheme.validate().map_err(|reason| ExportError::Scheme { tensor: name.into(), reason })?;
        let (out, inp) = w.dim();
        let wt = w.t();
        let (value, bytes, error) = match scheme.precision {
            Precision::Fp32 => {
                let data: Vec<f32> = wt.iter().copied().collect();
                let v = self.g.initializer(name, TensorData::f32(&[inp, out], &data));
                (v, (data.len() * 4) as u64, QuantError { rel_frobenius: 0.0, max_abs: 0.0 })
            }
            Precision::Fp16 => {
                let data: Vec<f32> = wt.iter().copied().collect();
                let t = TensorData::f16(&[inp, out], &data);
                let back = Array2::from_shape_vec((inp, out), half_round(&data))
                    .map_err(|e| ExportError::Internal(e.to_string()))?;
                let error = QuantError::between(wt, back.view());
                let bytes = t.bytes.len() as u64;
                let s = self.g.initializer(name, t);
                let v = self.g.op(
                    "Cast",
                    &format!("/weights/{name}/Cast"),
                    &[&s],
                    &[("to", Attr::Int(DType::F32.onnx() as i64))],
                );
                (v, bytes, error)
            }
            Precision::Int8 | Precision::Int4 => {
                let q = match self.prequantized.get(name) {
                    Some(q) => q.clone(),
                    None => quant::quantize(w.view(), &scheme)
                        .ok_or_else(|| ExportError::Internal("integer scheme".into()))?,
                };
                let error = QuantError::between(w.view(), q.dequantize().view());
                let (v, bytes) = self.dequantize_linear(name, &q)?;
                (v, bytes, error)
            }
        };
        self.report(TensorReport { name: name.into(), shape: [out, inp], scheme, label: scheme.label(), bytes, error });
        Ok(value)
    }

    /// Integer codes of `W` `[out, in]` stored transposed as `[in, out]` with their scales,
    /// then DequantizeLinear: per tensor (scalar scale), per channel (axis 1, one scale per
    /// output), or blocked along the input dimension (axis 0, `block_size`).
    fn dequantize_linear(&mut self, name: &str, q: &Quantized) -> Result<(String, u64), ExportError> {
        let (out, inp) = q.codes.dim();
        let codes: Vec<u8> = q.codes.t().iter().copied().collect();
        let (scales, scale_dims, attrs): (Vec<f32>, Vec<usize>, Vec<(&str, Attr)>) = match q.layout {
            Layout::PerTensor => (vec![q.scales[[0, 0]]], vec![], vec![]),
            Layout::PerChannel => (q.scales.column(0).to_vec(), vec![out], vec![("axis", Attr::Int(1))]),
            Layout::Blocked => (
                q.scales.t().iter().copied().collect(),
                vec![q.scales.ncols(), out],
                vec![("axis", Attr::Int(0)), ("block_size", Attr::Int(q.group as i64))],
            ),
        };
        let zps: Option<Vec<u8>> = q.zero_points.as_ref().map(|z| match q.layout {
            Layout::Blocked => z.t().iter().copied().collect(),
            _ => z.iter().copied().collect(),
        });
        let (code_type, pack4) = match (q.bits, q.signed) {
            (8, true) => (DType::I8, false),
            (8, false) => (DType::U8, false),
            (4, true) => (DType::I4, true),
            (4, false) => (DType::U4, true),
            (bits, _) => return Err(ExportError::Internal(format!("{bits}-bit codes"))),
        };
        let pack = |dims: &[usize], v: Vec<u8>| {
            if pack4 {
                TensorData::bytes4(code_type, dims, &v)
            } else {
                TensorData::bytes8(code_type, dims, v)
            }
        };
        let mut bytes = 0;
        let codes_t = pack(&[inp, out], codes);
        bytes += codes_t.bytes.len() as u64;
        let c = self.g.initializer(name, codes_t);
        let scale_t = TensorData::f32(&scale_dims, &scales);
        bytes += scale_t.bytes.len() as u64;
        let s = self.g.initializer(&format!("{name}.scale"), scale_t);
        let mut inputs = vec![c, s];
        if let Some(z) = zps {
            let zt = pack(&scale_dims, z);
            bytes += zt.bytes.len() as u64;
            inputs.push(self.g.initializer(&format!("{name}.zero_point"), zt));
        }
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        Ok((self.g.op("DequantizeLinear", &format!("/weights/{name}/DequantizeLinear"), &refs, &attrs), bytes))
    }

    /// Token embedding: Gather rows (of f32, f16, or integer codes with their scales).
    fn embedding(&mut self, table: &Array2<f32>, ids: &str, scheme: Scheme) -> Result<String, ExportError> {
        let name = "model.embed_tokens.weight";
        scheme.validate().map_err(|reason| ExportError::Scheme { tensor: name.into(), reason })?;
        let (vocab, hidden) = table.dim();
        let data: Vec<f32> = table.iter().copied().collect();
        let to_f32 = ("to", Attr::Int(DType::F32.onnx() as i64));
        let p = "/model/embed_tokens";
        let (x, bytes, error) = match scheme.precision {
            Precision::Fp32 => {
                let t = self.g.initializer(name, TensorData::f32(&[vocab, hidden], &data));
                (
                    self.g.op("Gather", &format!("{p}/Gather"), &[&t, ids], &[]),
                    data.len() as u64 * 4,
                    QuantError { rel_frobenius: 0.0, max_abs: 0.0 },
                )
            }
            Precision::Fp16 => {
                let back = Array2::from_shape_vec((vocab, hidden), half_round(&data))
                    .map_err(|e| ExportError::Internal(e.to_string()))?;
                let error = QuantError::between(table.view(), back.view());
                let t = self.g.initializer(name, TensorData::f16(&[vocab, hidden], &data));
                let rows = self.g.op("Gather", &format!("{p}/Gather"), &[&t, ids], &[]);
                (self.g.op("Cast", &format!("{p}/Cast"), &[&rows], &[to_f32]), data.len() as u64 * 2, error)
            }
            Precision::Int4 => {
                return Err(ExportError::Scheme {
                    tensor: name.into(),
                    reason: "4-bit embeddings are not supported (ONNX Gather cannot read 4-bit tensors); \
                             override it with precision = \"int8\""
                        .into(),
                })
            }
            Precision::Int8 => {
                let q = quant::quantize(table.view(), &scheme)
                    .ok_or_else(|| ExportError::Internal("integer scheme".into()))?;
                if q.layout == Layout::Blocked && hidden % q.group != 0 {
                    return Err(ExportError::Scheme {
                        tensor: name.into(),
                        reason: format!("block_size {} does not divide the hidden size {hidden}", q.group),
                    });
                }
                let error = QuantError::between(table.view(), q.dequantize().view());
                let (x, bytes) = self.gather_quantized(p, name, &q, ids)?;
                (x, bytes, error)
            }
        };
        self.report(TensorReport {
            name: name.into(),
            shape: [vocab, hidden],
            scheme,
            label: scheme.label(),
            bytes,
            error,
        });
        Ok(x)
    }

    /// Gathers integer rows and their scales (and zero points), then Cast → Sub → Mul.
    fn gather_quantized(
        &mut self,
        p: &str,
        name: &str,
        q: &Quantized,
        ids: &str,
    ) -> Result<(String, u64), ExportError> {
        let (vocab, hidden) = q.codes.dim();
        let code_type = if q.signed { DType::I8 } else { DType::U8 };
        let to_f32 = ("to", Attr::Int(DType::F32.onnx() as i64));
        let g = &mut self.g;
        let codes_t = TensorData::bytes8(code_type, &[vocab, hidden], q.codes.iter().copied().collect());
        let scale_dims: Vec<usize> = if q.layout == Layout::PerTensor { vec![] } else { vec![vocab, q.scales.ncols()] };
        let scale_t = TensorData::f32(&scale_dims, &q.scales.iter().copied().collect::<Vec<_>>());
        let mut bytes = (codes_t.bytes.len() + scale_t.bytes.len()) as u64;
        let codes = g.initializer(name, codes_t);
        let scales = g.initializer(&format!("{name}.scale"), scale_t);
        let rows = g.op("Gather", &format!("{p}/codes/Gather"), &[&codes, ids], &[]);
        let mut x = g.op("Cast", &format!("{p}/codes/Cast"), &[&rows], std::slice::from_ref(&to_f32));
        // Per-tensor scales are scalars; per-row scales gather to [b, s, groups].
        let per_row = |g: &mut GraphBuilder, what: &str, t: &str| -> String {
            if q.layout == Layout::PerTensor {
                t.to_string()
            } else {
                g.op("Gather", &format!("{p}/{what}/Gather"), &[t, ids], &[])
            }
        };
        let blocked = q.layout == Layout::Blocked && q.scales.ncols() > 1;
        let (groups, block) = (q.scales.ncols() as i64, q.group as i64);
        if blocked {
            let split = g.ints(&[0, 0, groups, block]);
            x = g.op("Reshape", &format!("{p}/blocks/Reshape"), &[&x, &split], &[]);
        }
        let expand = |g: &mut GraphBuilder, what: &str, v: String| -> String {
            if blocked {
                let last = g.ints(&[-1]);
                g.op("Unsqueeze", &format!("{p}/{what}/Unsqueeze"), &[&v, &last], &[])
            } else {
                v
            }
        };
        if let Some(z) = &q.zero_points {
            let zt = TensorData::bytes8(DType::U8, &scale_dims, z.iter().copied().collect());
            bytes += zt.bytes.len() as u64;
            let zp = g.initializer(&format!("{name}.zero_point"), zt);
            let zp = per_row(g, "zero_point", &zp);
            let zp = g.op("Cast", &format!("{p}/zero_point/Cast"), &[&zp], &[to_f32]);
            let zp = expand(g, "zero_point", zp);
            x = g.op("Sub", &format!("{p}/Sub"), &[&x, &zp], &[]);
        }
        let s = per_row(g, "scale", &scales);
        let s = expand(g, "scale", s);
        x = g.op("Mul", &format!("{p}/Mul"), &[&x, &s], &[]);
        if blocked {
            let flat = g.ints(&[0, 0, hidden as i64]);
            x = g.op("Reshape", &format!("{p}/Reshape"), &[&x, &flat], &[]);
        }
        Ok((x, bytes))
    }

    fn report(&mut self, r: TensorReport) {
        (self.on_tensor)(&r);
        self.reports.push(r);
    }
}

/// f32 values after a round trip through f16.
fn half_round(values: &[f32]) -> Vec<f32> {
    values.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect()
}

/// cos and sin tables `[max_context, head_dim]` for rotate-half rotary embeddings,
/// computed as the reference forward computes them (f32 angle = position · inverse
/// frequency, each half of the row repeating the frequencies).
pub fn rotary_tables(c: &ModelConfig, max_context: usize) -> (Vec<f32>, Vec<f32>) {
    let d = c.head_dim;
    let inv_freq = c.rope_inv_freq();
    let mut cos = Vec::with_capacity(max_context * d);
    let mut sin = Vec::with_capacity(max_context * d);
    for pos in 0..max_context {
        for _ in 0..2 {
            for &f in &inv_freq {
                let angle = f64::from(pos as f32 * f);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
    }
    (cos, sin)
}
