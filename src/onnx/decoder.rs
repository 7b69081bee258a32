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
//! → MatMul (fused into MatMulNBits); q/k/v and gate/up, when they share a scheme, are
//! stored side by side and multiplied at once, then Split; quantized embeddings gather
//! integer rows and their scales before converting. The lm_head has its own initializer,
//! except that a tied embedding under the lm_head's INT8 per-channel (or per-tensor)
//! symmetric scheme is stored once: the embedding gathers the lm_head's columns (axis 1)
//! and transposes them. ONNX Runtime then reads the lm_head's codes through two initializer
//! entries (`src/runtime/alias.rs`) so that it still fuses their DequantizeLinear.
//!
//! The serving form ([`GraphForm::Serving`], ONNX Runtime only) computes the same function
//! with the `com.microsoft::GroupQueryAttention` contrib op: its KV inputs are buffers sized
//! for the whole context (`[batch, kv_heads, max_sequence_length, head_dim]`) that the
//! caller binds as both `past_key_values.*` and `present.*`, so a decode step writes one
//! position in place instead of copying the cache; `seqlens_k` [batch] i32 holds each row's
//! total length − 1 and `total_sequence_length` (i32 scalar) the longest total;
//! `logits_to_keep` ([1] i64) says how many last positions get logits. It has no
//! `position_ids`: the new tokens of a row sit at positions `seqlens_k − seq + 1 ..=
//! seqlens_k`, where GroupQueryAttention rotates q and k itself (reading them packed); each
//! residual Add and the RMSNorm after it are one SkipSimplifiedLayerNormalization. For
//! SmolLM2-135M that leaves 309 kernels per step after ONNX Runtime's fusions, against 912
//! with the rotary written out in standard ops and unpacked projections, whose small
//! kernels cost more than their arithmetic. Both forms share
//! every initializer, so the artifact stores the weights once.
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
    /// Bytes of its initializers (codes, scales, zero points); 0 for a tied embedding that
    /// reads the lm_head's.
    pub bytes: u64,
    /// Distance from the f32 weights.
    pub error: QuantError,
    /// Where it is stored when it shares an initializer: with the other matrices that read
    /// the same input (q/k/v, gate/up), or a tied embedding in the lm_head's `[hidden,
    /// vocab]`; otherwise the initializer is `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packed: Option<PackedAt>,
}

/// A matrix stored side by side with others in one initializer `[in, Σ out]`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PackedAt {
    /// The initializer (its scales and zero points add `.scale` and `.zero_point`).
    pub tensor: String,
    /// The matrix's output columns in it, `[start, end)`.
    pub columns: [usize; 2],
}

/// One matrix as it will be stored, `[out, in]`.
enum Stored {
    /// f32 values (FP32, or FP16 after the round trip the file applies).
    Float(Array2<f32>),
    /// Integer codes and scales.
    Int(Quantized),
}

/// Projections of one input: one output each, or one packed output and its widths.
enum Projections {
    Separate(Vec<String>),
    Packed { output: String, widths: Vec<usize> },
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
        form: src.form,
    };
    d.graph(src, scheme_for)?;
    Ok((d.g, d.reports))
}

/// Names of the graph inputs, in order, for `layers` layers.
pub fn input_names(form: GraphForm, layers: usize) -> Vec<String> {
    let mut names: Vec<String> = match form {
        GraphForm::Portable => vec!["input_ids".into(), "attention_mask".into(), "position_ids".into()],
        GraphForm::Serving => {
            let names = ["input_ids", "seqlens_k", "total_sequence_length", "logits_to_keep"];
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
    form: GraphForm,
}

/// Values every layer reads.
enum Shared {
    /// Rotary tables gathered at `position_ids` (broadcasting over the 5-D query and 4-D
    /// key layouts) and the additive attention mask.
    Portable { cos_q: String, sin_q: String, cos_k: String, sin_k: String, mask: String },
    /// GroupQueryAttention's rotary caches `[max_context, head_dim / 2]`: it rotates q and k
    /// itself, at the positions it derives from `seqlens_k`, and masks by the lengths.
    Serving { cos_cache: String, sin_cache: String },
}

/// The residual stream where a norm reads it: one tensor, or `base + delta` with the Add
/// not emitted yet, so that the serving graph fuses it with the norm
/// (SkipSimplifiedLayerNormalization).
enum Stream {
    Whole(String),
    Sum { base: String, delta: String, add: String },
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
        let (portable, kv_len, total_len) = match src.form {
            GraphForm::Portable => (
                Some((
                    g.input("attention_mask", DType::I64, &[sym("batch_size"), sym("total_sequence_length")]),
                    g.input("position_ids", DType::I64, &[sym("batch_size"), sym("sequence_length")]),
                )),
                "past_sequence_length",
                "total_sequence_length",
            ),
            GraphForm::Serving => {
                g.input("seqlens_k", DType::I32, &[sym("batch_size")]);
                g.input("total_sequence_length", DType::I32, &[]);
                g.input("logits_to_keep", DType::I64, &[Dim::Fixed(1)]);
                (None, "max_sequence_length", "max_sequence_length")
            }
        };
        let kv_dims = [sym("batch_size"), Dim::Fixed(kvh), sym(kv_len), Dim::Fixed(hd)];
        for i in 0..c.num_layers {
            g.input(&format!("past_key_values.{i}.key"), DType::F32, &kv_dims);
            g.input(&format!("past_key_values.{i}.value"), DType::F32, &kv_dims);
        }

        let shared = match &portable {
            Some((mask, pos)) => self.portable_shared(&ids, mask, pos, src.max_context),
            None => self.serving_shared(src.max_context),
        };
        let (embed_scheme, head_scheme) = (scheme_for("model.embed_tokens.weight"), scheme_for("lm_head.weight"));
        let tied_once = src.weights.lm_head.is_none()
            && !self.prequantized.contains_key("lm_head.weight")
            && embed_scheme.stores_tied_once(&head_scheme);
        let (embedded, head) = if tied_once {
            let head = self.weight("lm_head.weight", src.weights.lm_head(), head_scheme)?;
            (self.embedding_from_head(&ids)?, Some(head))
        } else {
            (self.embedding(&src.weights.embed_tokens, &ids, embed_scheme)?, None)
        };
        let mut x = Stream::Whole(embedded);
        for i in 0..c.num_layers {
            x = self.layer(i, x, &shared, src.weights, scheme_for)?;
        }
        let mut x = self.sum(x);
        if src.form == GraphForm::Serving {
            // Only the last `logits_to_keep` positions reach the lm_head: a prefill needs one.
            let g = &mut self.g;
            let start = g.op("Neg", "/logits_to_keep/Neg", &["logits_to_keep"], &[]);
            let (end, axis) = (g.ints(&[i64::MAX]), g.ints(&[1]));
            x = g.op("Slice", "/logits_to_keep/Slice", &[&x, &start, &end, &axis], &[]);
        }
        let h = self.rms_norm("/model/norm", &x, &src.weights.norm.to_vec(), "model.norm.weight");
        let head = match head {
            Some(head) => head,
            None => self.weight("lm_head.weight", src.weights.lm_head(), head_scheme)?,
        };
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

    /// The rotary tables `[max_context, head_dim]` (each frequency twice, rotate-half order).
    fn rotary_tables(&mut self, max_context: usize) -> (String, String) {
        let (cos, sin) = rotary_tables(self.c, max_context);
        let dims = [max_context, self.c.head_dim];
        let cos = self.g.initializer("rotary.cos", TensorData::f32(&dims, &cos));
        let sin = self.g.initializer("rotary.sin", TensorData::f32(&dims, &sin));
        (cos, sin)
    }

    /// GroupQueryAttention's caches: the first half of each rotary table row (ONNX Runtime
    /// folds the Slice at load; the artifact stores the tables once, for both graphs).
    fn serving_shared(&mut self, max_context: usize) -> Shared {
        let (cos, sin) = self.rotary_tables(max_context);
        let g = &mut self.g;
        let (start, end, axis) = (g.ints(&[0]), g.ints(&[(self.c.head_dim / 2) as i64]), g.ints(&[1]));
        let cos_cache = g.op("Slice", "/rotary/cos_cache/Slice", &[&cos, &start, &end, &axis], &[]);
        let sin_cache = g.op("Slice", "/rotary/sin_cache/Slice", &[&sin, &start, &end, &axis], &[]);
        Shared::Serving { cos_cache, sin_cache }
    }

    /// Rotary tables gathered at `position_ids`, and the additive attention mask
    /// `[batch, 1, 1, seq, past+seq]` (0 where a key is visible, the lowest f32 elsewhere).
    fn portable_shared(&mut self, ids: &str, mask: &str, pos: &str, max_context: usize) -> Shared {
        let c = self.c;
        let (cos_t, sin_t) = self.rotary_tables(max_context);
        let g = &mut self.g;
        let cos = g.op("Gather", "/rotary/cos/Gather", &[&cos_t, pos], &[]);
        let sin = g.op("Gather", "/rotary/sin/Gather", &[&sin_t, pos], &[]);
        let ax1 = g.ints(&[1]);
        let ax12 = g.ints(&[1, 2]);
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
        Shared::Portable { cos_q, sin_q, cos_k, sin_k, mask }
    }

    /// Layer `i` over the residual stream `x`; returns the stream with the MLP's output as
    /// its pending delta.
    fn layer(
        &mut self,
        i: usize,
        x: Stream,
        s: &Shared,
        weights: &Weights,
        scheme_for: &SchemeFor<'_>,
    ) -> Result<Stream, ExportError> {
        let w = &weights.layers[i];
        let p = format!("/model/layers.{i}");
        let hf = format!("model.layers.{i}");

        let (x, h) = self.add_norm(
            &format!("{p}/input_layernorm"),
            x,
            &w.input_layernorm.to_vec(),
            &format!("{hf}.input_layernorm.weight"),
        );
        let qkv = self.projections(
            &format!("{p}/attn"),
            &h,
            &format!("{hf}.self_attn"),
            &[("q_proj", &w.q_proj), ("k_proj", &w.k_proj), ("v_proj", &w.v_proj)],
            "qkv_proj",
            scheme_for,
        )?;
        let ctx = self.attention(i, &p, qkv, s)?;
        let o =
            self.linear(&format!("{p}/attn/o_proj"), &ctx, &format!("{hf}.self_attn.o_proj"), &w.o_proj, scheme_for)?;
        let (x, h) = self.add_norm(
            &format!("{p}/post_attention_layernorm"),
            Stream::Sum { base: x, delta: o, add: format!("{p}/attn/residual/Add") },
            &w.post_attention_layernorm.to_vec(),
            &format!("{hf}.post_attention_layernorm.weight"),
        );
        let gate_up = self.projections(
            &format!("{p}/mlp"),
            &h,
            &format!("{hf}.mlp"),
            &[("gate_proj", &w.gate_proj), ("up_proj", &w.up_proj)],
            "gate_up_proj",
            scheme_for,
        )?;
        let [gate, up] = self.separate(&format!("{p}/mlp/gate_up_proj"), gate_up)?;
        let g = &mut self.g;
        let sig = g.op("Sigmoid", &format!("{p}/mlp/act/Sigmoid"), &[&gate], &[]);
        let act = g.op("Mul", &format!("{p}/mlp/act/Mul"), &[&gate, &sig], &[]);
        let m = g.op("Mul", &format!("{p}/mlp/Mul"), &[&act, &up], &[]);
        let down =
            self.linear(&format!("{p}/mlp/down_proj"), &m, &format!("{hf}.mlp.down_proj"), &w.down_proj, scheme_for)?;
        Ok(Stream::Sum { base: x, delta: down, add: format!("{p}/mlp/residual/Add") })
    }

    /// The stream as one tensor (the pending Add emitted).
    fn sum(&mut self, x: Stream) -> String {
        match x {
            Stream::Whole(x) => x,
            Stream::Sum { base, delta, add } => self.g.op("Add", &add, &[&base, &delta], &[]),
        }
    }

    /// RMSNorm `p` of the stream; returns `(stream, normed)`. In the serving graph a
    /// pending Add and the norm are one SkipSimplifiedLayerNormalization, which also
    /// outputs the sum.
    fn add_norm(&mut self, p: &str, x: Stream, weight: &[f32], name: &str) -> (String, String) {
        match x {
            Stream::Sum { base, delta, add } if self.form == GraphForm::Serving => {
                let eps = self.c.rms_norm_eps as f32;
                let g = &mut self.g;
                let w = g.initializer(name, TensorData::f32(&[weight.len()], weight));
                let (normed, sum) = (format!("{p}/output_0"), format!("{add}/output_0"));
                g.op_in(
                    "com.microsoft",
                    "SkipSimplifiedLayerNormalization",
                    p,
                    &[&delta, &base, &w],
                    &[("epsilon", Attr::Float(eps))],
                    &[&normed, "", "", &sum],
                );
                (sum, normed)
            }
            x => {
                let x = self.sum(x);
                let normed = self.rms_norm(p, &x, weight, name);
                (x, normed)
            }
        }
    }

    /// Attention of layer `i` over its q/k/v projections, by the graph's form.
    fn attention(&mut self, i: usize, p: &str, qkv: Projections, s: &Shared) -> Result<String, ExportError> {
        let split = format!("{p}/attn/qkv_proj");
        Ok(match (s, qkv) {
            (Shared::Portable { cos_q, sin_q, cos_k, sin_k, mask }, qkv) => {
                let [q, k, v] = self.separate(&split, qkv)?;
                self.portable_attention(i, p, [&q, &k, &v], [cos_q, sin_q, cos_k, sin_k], mask)
            }
            // GroupQueryAttention takes q, k and v packed in its query input.
            (Shared::Serving { cos_cache, sin_cache }, Projections::Packed { output, .. }) => {
                self.group_query_attention(i, p, [&output, "", ""], cos_cache, sin_cache)
            }
            (Shared::Serving { cos_cache, sin_cache }, qkv) => {
                let [q, k, v] = self.separate(&split, qkv)?;
                self.group_query_attention(i, p, [&q, &k, &v], cos_cache, sin_cache)
            }
        })
    }

    /// Portable attention: heads split to `[batch, kv_heads, group, seq, head_dim]`, the
    /// cache grown by Concat into `present.*`, scores masked by the additive `mask`.
    fn portable_attention(
        &mut self,
        i: usize,
        p: &str,
        [q, k, v]: [&str; 3],
        [cos_q, sin_q, cos_k, sin_k]: [&str; 4],
        mask: &str,
    ) -> String {
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
        let q = self.rotary(&format!("{p}/attn/q_rotary"), &q, cos_q, sin_q);
        let k = self.rotary(&format!("{p}/attn/k_rotary"), &k, cos_k, sin_k);

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

    /// Serving attention: GroupQueryAttention rotating q and k (rotate-half, from the
    /// caches) and reading and writing the shared KV buffers in place.
    fn group_query_attention(&mut self, i: usize, p: &str, [q, k, v]: [&str; 3], cos: &str, sin: &str) -> String {
        let c = self.c;
        let g = &mut self.g;
        let mut attrs = vec![
            ("num_heads", Attr::Int(c.num_heads as i64)),
            ("kv_num_heads", Attr::Int(c.num_kv_heads as i64)),
            ("do_rotary", Attr::Int(1)),
        ];
        if let Some(window) = c.sliding_window {
            // GroupQueryAttention's window is the keys a query sees, itself included, as in HF.
            attrs.push(("local_window_size", Attr::Int(window as i64)));
        }
        let ctx = format!("{p}/attn/GroupQueryAttention/output_0");
        let (past_k, past_v) = (format!("past_key_values.{i}.key"), format!("past_key_values.{i}.value"));
        let (present_k, present_v) = (format!("present.{i}.key"), format!("present.{i}.value"));
        g.op_in(
            "com.microsoft",
            "GroupQueryAttention",
            &format!("{p}/attn/GroupQueryAttention"),
            &[q, k, v, &past_k, &past_v, "seqlens_k", "total_sequence_length", cos, sin],
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

    /// `x · Wᵀ (+ b)` for matrices `parts` (`(suffix, linear)`, Hugging Face names
    /// `{hf}.{suffix}.weight`) that all read `x`. When they share a scheme that can be
    /// concatenated (not per-tensor) and all or none has a bias, their weights are stored
    /// side by side as `{hf}.{packed}.weight` and multiplied in one MatMul: fewer, larger
    /// kernels. Each matrix is quantized on its own either way, and reported by its own name.
    fn projections(
        &mut self,
        p: &str,
        x: &str,
        hf: &str,
        parts: &[(&str, &crate::model::Linear)],
        packed: &str,
        scheme_for: &SchemeFor<'_>,
    ) -> Result<Projections, ExportError> {
        let names: Vec<String> = parts.iter().map(|(s, _)| format!("{hf}.{s}.weight")).collect();
        let schemes: Vec<Scheme> = names.iter().map(|n| scheme_for(n)).collect();
        let same_scheme = schemes.windows(2).all(|w| w[0] == w[1]);
        let per_tensor = schemes[0].precision.bits().is_some() && schemes[0].layout == Layout::PerTensor;
        let biases: Vec<_> = parts.iter().filter_map(|(_, l)| l.bias.as_ref()).collect();
        if !same_scheme || per_tensor || !(biases.is_empty() || biases.len() == parts.len()) {
            let mut outputs = Vec::with_capacity(parts.len());
            for (suffix, l) in parts {
                outputs.push(self.linear(&format!("{p}/{suffix}"), x, &format!("{hf}.{suffix}"), l, scheme_for)?);
            }
            return Ok(Projections::Separate(outputs));
        }
        let name = format!("{hf}.{packed}.weight");
        let mut stored = Vec::with_capacity(parts.len());
        let mut widths = Vec::with_capacity(parts.len());
        for ((_, l), (part, &scheme)) in parts.iter().zip(names.iter().zip(&schemes)) {
            let (out, inp) = l.weight.dim();
            let start = widths.iter().sum::<usize>();
            let (s, bytes, error) = self.prepare(part, &l.weight, scheme)?;
            let packed = Some(PackedAt { tensor: name.clone(), columns: [start, start + out] });
            let label = scheme.label();
            self.report(TensorReport { name: part.clone(), shape: [out, inp], scheme, label, bytes, error, packed });
            stored.push(s);
            widths.push(out);
        }
        let w = self.store(&name, &concat(stored)?, schemes[0].precision)?;
        let y = self.g.op("MatMul", &format!("{p}/{packed}/MatMul"), &[x, &w], &[]);
        let output = if biases.is_empty() {
            y
        } else {
            let b: Vec<f32> = biases.iter().flat_map(|b| b.iter().copied()).collect();
            let b = self.g.initializer(&format!("{hf}.{packed}.bias"), TensorData::f32(&[b.len()], &b));
            self.g.op("Add", &format!("{p}/{packed}/Add"), &[&y, &b], &[])
        };
        Ok(Projections::Packed { output, widths })
    }

    /// The `N` projections one by one (a packed output Split by its widths).
    fn separate<const N: usize>(&mut self, p: &str, projections: Projections) -> Result<[String; N], ExportError> {
        let outputs = match projections {
            Projections::Separate(outputs) => outputs,
            Projections::Packed { output, widths } => {
                let g = &mut self.g;
                let sizes = g.ints(&widths.iter().map(|&w| w as i64).collect::<Vec<_>>());
                let outputs: Vec<String> = (0..widths.len()).map(|j| format!("{p}/Split/output_{j}")).collect();
                let refs: Vec<&str> = outputs.iter().map(String::as_str).collect();
                g.op_in("", "Split", &format!("{p}/Split"), &[&output, &sizes], &[("axis", Attr::Int(-1))], &refs);
                outputs
            }
        };
        let n = outputs.len();
        outputs.try_into().map_err(|_| ExportError::Internal(format!("{p}: {n} projections, {N} expected")))
    }

    /// A weight `[out, in]` as the right operand of MatMul, `[in, out]` in f32 (stored as
    /// f32, f16 + Cast, or integer codes + DequantizeLinear).
    fn weight(&mut self, name: &str, w: &Array2<f32>, scheme: Scheme) -> Result<String, ExportError> {
        let (stored, bytes, error) = self.prepare(name, w, scheme)?;
        let (out, inp) = w.dim();
        let label = scheme.label();
        self.report(TensorReport { name: name.into(), shape: [out, inp], scheme, label, bytes, error, packed: None });
        self.store(name, &stored, scheme.precision)
    }

    /// Matrix `name` `[out, in]` under `scheme`: what will be stored, its bytes, its error.
    fn prepare(&self, name: &str, w: &Array2<f32>, scheme: Scheme) -> Result<(Stored, u64, QuantError), ExportError> {
        scheme.validate().map_err(|reason| ExportError::Scheme { tensor: name.into(), reason })?;
        let n = w.len() as u64;
        Ok(match scheme.precision {
            Precision::Fp32 => (Stored::Float(w.clone()), n * 4, QuantError { rel_frobenius: 0.0, max_abs: 0.0 }),
            Precision::Fp16 => {
                let back = w.mapv(to_f16_and_back);
                let error = QuantError::between(w.view(), back.view());
                (Stored::Float(w.clone()), n * 2, error)
            }
            Precision::Int8 | Precision::Int4 | Precision::Nf4 => {
                let q = match self.prequantized.get(name) {
                    Some(q) => q.clone(),
                    None => quant::quantize(w.view(), &scheme)
                        .ok_or_else(|| ExportError::Internal("integer scheme".into()))?,
                };
                let error = QuantError::between(w.view(), q.dequantize().view());
                (Stored::Int(q), scheme.stored_bytes(w.nrows(), w.ncols()), error)
            }
        })
    }

    /// Writes `stored` as initializer `name` (and its scales); returns the f32 `[in, out]` value.
    fn store(&mut self, name: &str, stored: &Stored, precision: Precision) -> Result<String, ExportError> {
        Ok(match stored {
            Stored::Float(w) => {
                let (out, inp) = w.dim();
                let data: Vec<f32> = w.t().iter().copied().collect();
                if precision == Precision::Fp16 {
                    let s = self.g.initializer(name, TensorData::f16(&[inp, out], &data));
                    let to_f32 = ("to", Attr::Int(DType::F32.onnx() as i64));
                    self.g.op("Cast", &format!("/weights/{name}/Cast"), &[&s], &[to_f32])
                } else {
                    self.g.initializer(name, TensorData::f32(&[inp, out], &data))
                }
            }
            Stored::Int(q) => self.dequantize_linear(name, q)?,
        })
    }

    /// Integer codes of `W` `[out, in]` stored transposed as `[in, out]` with their scales,
    /// then DequantizeLinear: per tensor (scalar scale), per channel (axis 1, one scale per
    /// output), or blocked along the input dimension (axis 0, `block_size`).
    fn dequantize_linear(&mut self, name: &str, q: &Quantized) -> Result<String, ExportError> {
        if let Some(levels) = q.levels {
            return self.level_table(name, q, levels);
        }
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
        let c = self.g.initializer(name, pack(&[inp, out], codes));
        let s = self.g.initializer(&format!("{name}.scale"), TensorData::f32(&scale_dims, &scales));
        let mut inputs = vec![c, s];
        if let Some(z) = zps {
            inputs.push(self.g.initializer(&format!("{name}.zero_point"), pack(&scale_dims, z)));
        }
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        Ok(self.g.op("DequantizeLinear", &format!("/weights/{name}/DequantizeLinear"), &refs, &attrs))
    }

    /// NF4 codes of `W` `[out, in]` (blocked along `in`) stored transposed as UINT4 `[in, out]`
    /// with the level table `{name}.levels` `[16]` and the scales `{name}.scale`
    /// `[blocks, out]`, in standard ops: `Gather(levels, Cast(codes → int32))` times the
    /// scales gathered for each input by its block, `Range(0, in, 1) / block`.
    fn level_table(&mut self, name: &str, q: &Quantized, levels: &[f32; 16]) -> Result<String, ExportError> {
        let (out, inp) = q.codes.dim();
        if q.layout != Layout::Blocked || q.zero_points.is_some() {
            return Err(ExportError::Internal(format!("{name}: a level table needs blocked scales, no zero points")));
        }
        let codes: Vec<u8> = q.codes.t().iter().copied().collect();
        let g = &mut self.g;
        let c = g.initializer(name, TensorData::bytes4(DType::U4, &[inp, out], &codes));
        let l = g.initializer(&format!("{name}.levels"), TensorData::f32(&[16], levels));
        let scales: Vec<f32> = q.scales.t().iter().copied().collect();
        let s = g.initializer(&format!("{name}.scale"), TensorData::f32(&[q.scales.ncols(), out], &scales));
        let p = format!("/weights/{name}");
        let to_i32 = ("to", Attr::Int(DType::I32.onnx() as i64));
        let index = g.op("Cast", &format!("{p}/Cast"), &[&c], &[to_i32]);
        let values = g.op("Gather", &format!("{p}/levels/Gather"), &[&l, &index], &[]);
        let (zero, inputs, one, block) =
            (g.scalar_i64(0), g.scalar_i64(inp as i64), g.scalar_i64(1), g.scalar_i64(q.group as i64));
        let input = g.op("Range", &format!("{p}/Range"), &[&zero, &inputs, &one], &[]);
        let block_of_input = g.op("Div", &format!("{p}/Div"), &[&input, &block], &[]);
        let scale = g.op("Gather", &format!("{p}/scale/Gather"), &[&s, &block_of_input], &[]);
        Ok(g.op("Mul", &format!("{p}/Mul"), &[&values, &scale], &[]))
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
            Precision::Int4 | Precision::Nf4 => {
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
            packed: None,
        });
        Ok(x)
    }

    /// The token embedding of a tied model read from the lm_head's INT8 codes `[hidden,
    /// vocab]` (stored once, [`Scheme::stores_tied_once`]): the ids' columns, transposed to
    /// rows, converted and scaled by their columns' scales.
    fn embedding_from_head(&mut self, ids: &str) -> Result<String, ExportError> {
        let head = self.reports.last().filter(|r| r.name == "lm_head.weight").cloned();
        let head = head.ok_or_else(|| ExportError::Internal("the lm_head is stored before the embedding".into()))?;
        let (p, codes) = ("/model/embed_tokens", "lm_head.weight");
        let g = &mut self.g;
        let columns = g.op("Gather", &format!("{p}/codes/Gather"), &[codes, ids], &[("axis", Attr::Int(1))]);
        let rows =
            g.op("Transpose", &format!("{p}/codes/Transpose"), &[&columns], &[("perm", Attr::Ints(vec![1, 2, 0]))]);
        let to_f32 = ("to", Attr::Int(DType::F32.onnx() as i64));
        let x = g.op("Cast", &format!("{p}/codes/Cast"), &[&rows], &[to_f32]);
        let scale = if head.scheme.layout == Layout::PerTensor {
            "lm_head.weight.scale".to_string()
        } else {
            let per_token = g.op("Gather", &format!("{p}/scale/Gather"), &["lm_head.weight.scale", ids], &[]);
            let last = g.ints(&[-1]);
            g.op("Unsqueeze", &format!("{p}/scale/Unsqueeze"), &[&per_token, &last], &[])
        };
        let x = g.op("Mul", &format!("{p}/Mul"), &[&x, &scale], &[]);
        let [hidden, vocab] = [head.shape[1], head.shape[0]];
        self.report(TensorReport {
            name: "model.embed_tokens.weight".into(),
            shape: [vocab, hidden],
            bytes: 0,
            packed: Some(PackedAt { tensor: codes.into(), columns: [0, vocab] }),
            ..head
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

/// Matrices `[out, in]` of one scheme stacked along `out` (integer ones with their scales
/// and zero points; per-channel and blocked scales belong to rows, so they stack too).
fn concat(parts: Vec<Stored>) -> Result<Stored, ExportError> {
    let fail = |e: ndarray::ShapeError| ExportError::Internal(format!("packing weights: {e}"));
    let stack = |views: Vec<ndarray::ArrayView2<'_, _>>| ndarray::concatenate(ndarray::Axis(0), &views).map_err(fail);
    let mut floats = Vec::new();
    let mut ints = Vec::new();
    for p in parts {
        match p {
            Stored::Float(w) => floats.push(w),
            Stored::Int(q) => ints.push(q),
        }
    }
    if ints.is_empty() {
        return Ok(Stored::Float(stack(floats.iter().map(|w| w.view()).collect())?));
    }
    let Some(first) = ints.first().filter(|_| floats.is_empty()) else {
        return Err(ExportError::Internal("packing float and integer weights".into()));
    };
    let zero_points = match ints.iter().map(|q| q.zero_points.as_ref().map(|z| z.view())).collect::<Option<Vec<_>>>() {
        Some(z) => Some(ndarray::concatenate(ndarray::Axis(0), &z).map_err(fail)?),
        None => None,
    };
    Ok(Stored::Int(Quantized {
        bits: first.bits,
        signed: first.signed,
        codes: ndarray::concatenate(ndarray::Axis(0), &ints.iter().map(|q| q.codes.view()).collect::<Vec<_>>())
            .map_err(fail)?,
        scales: stack(ints.iter().map(|q| q.scales.view()).collect())?,
        zero_points,
        layout: first.layout,
        group: first.group,
        levels: first.levels,
    }))
}

/// f32 values after a round trip through f16.
fn half_round(values: &[f32]) -> Vec<f32> {
    values.iter().copied().map(to_f16_and_back).collect()
}

/// One f32 value after a round trip through f16.
fn to_f16_and_back(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
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
