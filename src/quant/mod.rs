//! How weights are quantized: schemes, round-to-nearest with optional clipping search, and
//! error metrics. Pure math on ndarray; nothing here knows about ONNX.
//!
//! A scheme is named on three axes (STYLE.md): the algorithm ([`Method`]), the storage
//! format ([`Precision`], `symmetric` or with zero points), and the layout of the scales
//! ([`Layout`]: one per tensor, one per output channel, or one per block of `block_size`
//! input values).
//!
//! Matrices are quantized in the orientation they are given, `[rows, cols]`: for a linear
//! layer `[out, in]` (Hugging Face layout), so a row is an output channel and blocks run
//! along the input dimension; for an embedding `[vocab, hidden]`, a row is one token.

pub mod awq;
pub mod calibrate;
pub mod gptq;
pub mod mixed;
mod rtn;
pub mod sensitivity;
pub mod study;

use ndarray::{Array2, ArrayView2};
use serde::{Deserialize, Serialize};

pub use rtn::{quantize, quantize_for_inputs};

/// Inputs per block of the serving kernels' int8 activations.
pub const ACTIVATION_BLOCK: usize = 32;

/// `x` `[rows, inputs]` as the serving kernels see it at accuracy level 4 (kiln's quantized
/// MatMul and MatMulNBits): each row rounded to int8 per block of [`ACTIVATION_BLOCK`]
/// inputs, scale max|v| / 127, half to even.
pub fn round_activations(mut x: Array2<f32>) -> Array2<f32> {
    for mut block in x.axis_chunks_iter_mut(ndarray::Axis(1), ACTIVATION_BLOCK) {
        for mut row in block.rows_mut() {
            let max = row.fold(0f32, |m, v| m.max(v.abs()));
            if max == 0.0 || !max.is_finite() {
                continue;
            }
            let (step, inverse) = (max / 127.0, 127.0 / max);
            row.mapv_inplace(|v| (v * inverse).round_ties_even() * step);
        }
    }
    x
}

/// The algorithm that chooses the integer codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Round to nearest, each group on its own.
    #[default]
    Rtn,
    /// GPTQ: error feedback through the inverse Hessian of calibration inputs.
    Gptq,
    /// AWQ: activation-aware per-channel scales folded into the float model, then
    /// round-to-nearest.
    Awq,
    /// AWQ's scales folded first, then GPTQ's error feedback on the scaled weights (the
    /// combination the AWQ paper reports).
    #[serde(rename = "awq+gptq")]
    AwqGptq,
}

impl Method {
    /// Whether the stored weights are rescaled (AWQ), so that they are not the FP32
    /// artifact's weights quantized.
    pub fn rescales_weights(self) -> bool {
        matches!(self, Method::Awq | Method::AwqGptq)
    }

    /// Whether the method reads `[quant.gptq]`.
    pub fn uses_gptq(self) -> bool {
        matches!(self, Method::Gptq | Method::AwqGptq)
    }
}

/// Storage precision of a weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Unquantized f32.
    Fp32,
    /// f16 weights, computed in f32.
    Fp16,
    /// 8-bit integers (INT8 symmetric, UINT8 with zero points).
    Int8,
    /// 4-bit integers (INT4 symmetric, UINT4 with zero points).
    Int4,
    /// QLoRA's NormalFloat: 4-bit codes naming one of the 16 [`NF4_LEVELS`], times a
    /// per-block absmax scale (no zero points).
    Nf4,
}

/// The 16 NormalFloat-4 values (QLoRA, Dettmers et al. 2023, appendix E): quantiles of a
/// standard normal scaled to [-1, 1], with an exact zero. Code `c` stands for
/// `NF4_LEVELS[c] × scale`.
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

impl Precision {
    /// Bits per integer code, or `None` for float precisions.
    pub fn bits(self) -> Option<u32> {
        match self {
            Precision::Int8 => Some(8),
            Precision::Int4 | Precision::Nf4 => Some(4),
            Precision::Fp32 | Precision::Fp16 => None,
        }
    }
}

/// How scales are shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// One scale for the whole matrix.
    PerTensor,
    /// One scale per row (output channel of a linear layer, token of an embedding).
    PerChannel,
    /// One scale per `block_size` consecutive values of a row (along the input dimension).
    Blocked,
}

/// A complete storage scheme for one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scheme {
    /// Storage precision.
    pub precision: Precision,
    /// Scale sharing (integer precisions only).
    pub layout: Layout,
    /// Values per block for [`Layout::Blocked`].
    pub block_size: usize,
    /// Symmetric (signed codes, no zero point) or asymmetric (unsigned codes + zero points).
    pub symmetric: bool,
    /// Search, per group, the clipping range that minimizes squared error (slower, better).
    pub clip_search: bool,
}

impl Scheme {
    /// Unquantized f32.
    pub const FP32: Scheme = Scheme {
        precision: Precision::Fp32,
        layout: Layout::PerTensor,
        block_size: 0,
        symmetric: true,
        clip_search: false,
    };

    /// Checks that the fields make sense together; `Err` says which field is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.precision.bits().is_none() {
            return Ok(());
        }
        if self.precision == Precision::Nf4 && (self.layout != Layout::Blocked || !self.symmetric) {
            return Err("precision = \"nf4\" needs layout = \"blocked\" and symmetric = true (absmax \
                        scales per block, no zero points)"
                .into());
        }
        if self.layout == Layout::Blocked && !(self.block_size >= 2 && self.block_size.is_power_of_two()) {
            return Err(format!(
                "block_size = {} must be a power of two of at least 2 (e.g. 32, 64, 128)",
                self.block_size
            ));
        }
        Ok(())
    }

    /// Bytes a `[rows, cols]` matrix takes stored in this scheme: packed codes, f32 scales
    /// and packed zero points (what the exporter writes).
    pub fn stored_bytes(&self, rows: usize, cols: usize) -> u64 {
        let n = (rows * cols) as u64;
        let Some(bits) = self.precision.bits() else {
            return n * if self.precision == Precision::Fp16 { 2 } else { 4 };
        };
        let groups = match self.layout {
            Layout::PerTensor => 1,
            Layout::PerChannel => rows,
            Layout::Blocked => rows * cols.div_ceil(self.block_size.max(1)),
        } as u64;
        let zps = if self.symmetric { 0 } else { (groups * u64::from(bits)).div_ceil(8) };
        let levels = if self.precision == Precision::Nf4 { 16 * 4 } else { 0 };
        (n * u64::from(bits)).div_ceil(8) + groups * 4 + zps + levels
    }

    /// Whether a tied embedding under this scheme and its lm_head under `head` are stored
    /// once: the same INT8 symmetric scheme, per channel or per tensor, so the lm_head's codes
    /// `[hidden, vocab]` (rounded to nearest, neither AWQ-scaled nor GPTQ'd) are the
    /// embedding's rows read by column.
    pub fn stores_tied_once(&self, head: &Scheme) -> bool {
        self == head && self.precision == Precision::Int8 && self.symmetric && self.layout != Layout::Blocked
    }

    /// A short name such as `int4-b32-zp`, `int8-pc-sym`, `fp32`.
    pub fn label(&self) -> String {
        let p = match self.precision {
            Precision::Fp32 => return "fp32".into(),
            Precision::Fp16 => return "fp16".into(),
            Precision::Int8 => "int8",
            Precision::Int4 => "int4",
            Precision::Nf4 => {
                return format!("nf4-b{}{}", self.block_size, if self.clip_search { "-clip" } else { "" })
            }
        };
        let layout = match self.layout {
            Layout::PerTensor => "pt".to_string(),
            Layout::PerChannel => "pc".to_string(),
            Layout::Blocked => format!("b{}", self.block_size),
        };
        let zp = if self.symmetric { "sym" } else { "zp" };
        let clip = if self.clip_search { "-clip" } else { "" };
        format!("{p}-{layout}-{zp}{clip}")
    }
}

/// Whether calibration (AWQ, GPTQ) leaves the lm_head alone: a tied embedding stored once
/// with it ([`Scheme::stores_tied_once`]) needs its codes rounded to nearest from the table.
pub fn lm_head_stays_tied(config: &crate::model::ModelConfig, scheme_for: &dyn Fn(&str) -> Scheme) -> bool {
    config.tie_word_embeddings
        && scheme_for("model.embed_tokens.weight").stores_tied_once(&scheme_for("lm_head.weight"))
}

/// An integer-quantized matrix: codes, scales and zero points, in the orientation it was
/// quantized in (`[rows, cols]`, groups along `cols`).
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    /// Bits per code (8 or 4).
    pub bits: u32,
    /// Codes are signed (symmetric); otherwise unsigned with zero points.
    pub signed: bool,
    /// One code per value: the byte of an `i8` when signed, of a `u8` otherwise.
    pub codes: Array2<u8>,
    /// `[1, 1]` per tensor, `[rows, 1]` per channel, `[rows, ceil(cols / block)]` blocked.
    pub scales: Array2<f32>,
    /// Same shape as `scales`, when unsigned.
    pub zero_points: Option<Array2<u8>>,
    /// Scale sharing.
    pub layout: Layout,
    /// Values per group along a row (`cols` per channel, the block size when blocked).
    pub group: usize,
    /// The values codes stand for before scaling ([`NF4_LEVELS`]); `None`: codes are
    /// integers (minus their zero points).
    pub levels: Option<&'static [f32; 16]>,
}

impl Quantized {
    /// The integer value of code `(r, c)` minus its zero point.
    fn centered(&self, r: usize, c: usize) -> i32 {
        let code = self.codes[[r, c]];
        if self.signed {
            code as i8 as i32
        } else {
            let (sr, sc) = self.scale_index(r, c);
            let zp = self.zero_points.as_ref().map_or(0, |z| z[[sr, sc]] as i32);
            code as i32 - zp
        }
    }

    fn scale_index(&self, r: usize, c: usize) -> (usize, usize) {
        match self.layout {
            Layout::PerTensor => (0, 0),
            Layout::PerChannel => (r, 0),
            Layout::Blocked => (r, c / self.group),
        }
    }

    /// The f32 values the codes stand for (what DequantizeLinear computes).
    pub fn dequantize(&self) -> Array2<f32> {
        Array2::from_shape_fn(self.codes.dim(), |(r, c)| {
            let (sr, sc) = self.scale_index(r, c);
            let value = match self.levels {
                Some(levels) => levels[usize::from(self.codes[[r, c]] & 0x0F)],
                None => self.centered(r, c) as f32,
            };
            value * self.scales[[sr, sc]]
        })
    }
}

/// How far a quantized tensor is from the original.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QuantError {
    /// ‖W − Ŵ‖_F / ‖W‖_F.
    pub rel_frobenius: f64,
    /// max |W − Ŵ|.
    pub max_abs: f64,
}

impl QuantError {
    /// Error of `approx` against `original`.
    pub fn between(original: ArrayView2<f32>, approx: ArrayView2<f32>) -> QuantError {
        let (mut num, mut den, mut max_abs) = (0f64, 0f64, 0f64);
        for (&a, &b) in original.iter().zip(approx.iter()) {
            let d = (a - b) as f64;
            num += d * d;
            den += (a as f64) * (a as f64);
            max_abs = max_abs.max(d.abs());
        }
        let rel_frobenius = if den > 0.0 { (num / den).sqrt() } else { num.sqrt() };
        QuantError { rel_frobenius, max_abs }
    }
}
