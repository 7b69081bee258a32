//! Quantized-weight MatMul on the CPU as kiln's own kernel (AVX-512 VNNI).
//!
//! ONNX Runtime fuses the serving graph's `DequantizeLinear → MatMul` pairs into MatMulNBits,
//! whose int8 path (accuracy level 4) costs about as much per row at 8 rows as at 1: with 8
//! concurrent streams a decode step took 3-4× a single stream's, the matrix products bound.
//! This kernel packs each weight once, at session start, 16 output columns by 4 inputs per
//! 64-byte vector (two such groups per vector for 4-bit weights, one in each nibble), so that
//! one `vpdpbusd` multiplies 64 weights by 4 broadcast activations; one weight load serves up
//! to 8 rows.
//!
//! The arithmetic is MatMulNBits' accuracy level 4 on every row alone: each row's activations
//! are quantized to int8 per block of 32 inputs (scale max|a| / 127), products are summed
//! exactly in int32 per block, then scaled in f32 block by block in input order. A row's result
//! therefore does not depend on the other rows of the call.
//!
//! CPU sessions of `serving.onnx` run it where the CPU has AVX-512 VNNI and the session keeps
//! ONNX Runtime's default accuracy level: [`fuse`] rewrites the pairs at load.

use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput};
use ort::value::{DynTensor, DynTensorValueType, TensorElementType};
use tract_onnx::pb;

const OP: &str = "QuantizedMatMul";

/// Inputs per activation block (one int8 scale each).
const BLOCK: usize = crate::quant::ACTIVATION_BLOCK;
/// Output columns per packed tile (one 512-bit vector of f32 or i32).
const TILE: usize = 16;
/// Rows sharing one pass over a tile's weights.
const ROWS: usize = 8;

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vnni");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Rewrites every `DequantizeLinear(W) → MatMul(A, ·)` of `graph` whose weight is a 2-D 4- or
/// 8-bit initializer, dequantized per tensor, per output column or in blocks along the inputs
/// (a multiple of 32), and every NF4 weight the exporter writes (see [`level_tables`]), into
/// one [`OP`] node in `domain`. Other pairs stay for ONNX Runtime.
pub fn fuse(graph: &mut pb::GraphProto, domain: &str) {
    let mut rewrites = dequantized(graph);
    rewrites.extend(level_tables(graph));
    let mut dead = Vec::new();
    for r in rewrites {
        let matmul = &mut graph.node[r.matmul];
        matmul.op_type = OP.into();
        matmul.domain = domain.into();
        matmul.input = [matmul.input[0].clone()].into_iter().chain(r.inputs).collect();
        matmul.attribute = r.attributes;
        dead.extend(r.replaced);
    }
    dead.sort_unstable();
    dead.dedup();
    for d in dead.into_iter().rev() {
        graph.node.remove(d);
    }
}

/// One MatMul to become [`OP`]: its new inputs after the activations and attributes, and the
/// nodes that computed its weight.
struct Rewrite {
    matmul: usize,
    replaced: Vec<usize>,
    inputs: Vec<String>,
    attributes: Vec<pb::AttributeProto>,
}

/// Uses of a value by nodes and as a graph output.
fn uses(graph: &pb::GraphProto, name: &str) -> usize {
    graph.node.iter().flat_map(|n| &n.input).filter(|i| *i == name).count()
        + graph.output.iter().filter(|o| o.name == name).count()
}

/// The MatMul that alone reads `value` as its weight.
fn weight_consumer(graph: &pb::GraphProto, value: &str) -> Option<usize> {
    let m = graph
        .node
        .iter()
        .position(|n| n.op_type == "MatMul" && n.domain.is_empty() && n.input.len() == 2 && n.input[1] == value)?;
    (uses(graph, value) == 1).then_some(m)
}

fn int_attr(node: &pb::NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

/// `DequantizeLinear → MatMul` pairs the kernel computes.
fn dequantized(graph: &pb::GraphProto) -> Vec<Rewrite> {
    let weights: std::collections::HashSet<&str> = graph
        .initializer
        .iter()
        .filter(|t| t.dims.len() == 2 && Storage::of(t.data_type).is_some())
        .map(|t| t.name.as_str())
        .collect();
    let mut rewrites = Vec::new();
    for (d, dq) in graph.node.iter().enumerate() {
        if dq.op_type != "DequantizeLinear" || !dq.domain.is_empty() || dq.output.len() != 1 {
            continue;
        }
        if !dq.input.first().is_some_and(|w| weights.contains(w.as_str())) {
            continue;
        }
        let (axis, block) = (int_attr(dq, "axis").unwrap_or(1), int_attr(dq, "block_size").unwrap_or(0));
        let scale_rank = graph.initializer.iter().find(|t| Some(&t.name) == dq.input.get(1)).map(|t| t.dims.len());
        let constant =
            |i: usize| dq.input.get(i).is_none_or(|x| x.is_empty() || graph.initializer.iter().any(|t| t.name == *x));
        let supported = constant(2)
            && match (scale_rank, axis) {
                (Some(0), _) | (Some(1), 1) => true,
                (Some(2), 0) => block > 0 && (block as usize).is_multiple_of(BLOCK),
                _ => false,
            };
        if let (true, Some(m)) = (supported, weight_consumer(graph, &dq.output[0])) {
            rewrites.push(Rewrite {
                matmul: m,
                replaced: vec![d],
                inputs: dq.input.clone(),
                attributes: dq
                    .attribute
                    .iter()
                    .filter(|a| a.name == "axis" || a.name == "block_size")
                    .cloned()
                    .collect(),
            });
        }
    }
    rewrites
}

/// NF4 weights as the exporter writes them, `MatMul(A, Mul(Gather(levels, Cast(codes)),
/// Gather(scale, Div(Range(0, inputs, 1), block))))` with constant UINT4 codes `[inputs,
/// outputs]`, 16 f32 levels and f32 scales `[blocks, outputs]`, blocks a multiple of 32. The
/// kernel gets the codes and scales as inputs, the levels and block as attributes.
fn level_tables(graph: &pb::GraphProto) -> Vec<Rewrite> {
    let init = |name: &str| graph.initializer.iter().find(|t| t.name == name);
    // The node computing `value`, of type `op`, read by nothing else.
    let made_by = |value: &str, op: &str| -> Option<(usize, &pb::NodeProto)> {
        let (i, n) = graph.node.iter().enumerate().find(|(_, n)| n.output.iter().any(|o| o == value))?;
        (n.op_type == op && n.domain.is_empty() && n.output.len() == 1 && uses(graph, value) == 1).then_some((i, n))
    };
    let scalar = |name: &str| init(name).filter(|t| t.dims.is_empty() && t.data_type == INT64).and_then(int64);
    let mut rewrites = Vec::new();
    for (m, matmul) in graph.node.iter().enumerate() {
        if matmul.op_type != "MatMul" || !matmul.domain.is_empty() || matmul.input.len() != 2 {
            continue;
        }
        let found = (|| {
            let (mul, mul_node) = made_by(&matmul.input[1], "Mul")?;
            let [values, scale] = &mul_node.input[..] else { return None };
            let (gl, gather_levels) = made_by(values, "Gather")?;
            let (gs, gather_scale) = made_by(scale, "Gather")?;
            let ([levels, index], [scales, block_of]) = (&gather_levels.input[..], &gather_scale.input[..]) else {
                return None;
            };
            let axis0 = |n: &pb::NodeProto| int_attr(n, "axis").unwrap_or(0) == 0;
            let (cast, cast_node) = made_by(index, "Cast")?;
            let codes = init(cast_node.input.first()?).filter(|t| t.data_type == UINT4 && t.dims.len() == 2)?;
            let to = int_attr(cast_node, "to")?;
            let (div, div_node) = made_by(block_of, "Div")?;
            let (range, range_node) = made_by(div_node.input.first()?, "Range")?;
            let block = scalar(div_node.input.get(1)?)?;
            let bounds: Vec<i64> = range_node.input.iter().map(|i| scalar(i)).collect::<Option<_>>()?;
            let (k, n) = (codes.dims[0], codes.dims[1]);
            let scales = init(scales).filter(|t| t.data_type == FLOAT)?;
            let levels = init(levels).filter(|t| t.data_type == FLOAT && t.dims == [16]).and_then(floats)?;
            let ok = axis0(gather_levels)
                && axis0(gather_scale)
                && (to == i64::from(INT32) || to == i64::from(INT64))
                && bounds == [0, k, 1]
                && block > 0
                && (block as usize).is_multiple_of(BLOCK)
                && k > 0
                && scales.dims == [(k + block - 1) / block, n];
            ok.then(|| Rewrite {
                matmul: m,
                replaced: vec![mul, gl, gs, cast, div, range],
                inputs: vec![codes.name.clone(), scales.name.clone()],
                attributes: vec![
                    pb::AttributeProto { name: "axis".into(), i: 0, r#type: 2, ..Default::default() },
                    pb::AttributeProto { name: "block_size".into(), i: block, r#type: 2, ..Default::default() },
                    pb::AttributeProto { name: "levels".into(), floats: levels, r#type: 6, ..Default::default() },
                ],
            })
        })();
        rewrites.extend(found);
    }
    rewrites
}

const FLOAT: i32 = pb::tensor_proto::DataType::Float as i32;
const INT32: i32 = pb::tensor_proto::DataType::Int32 as i32;
const INT64: i32 = pb::tensor_proto::DataType::Int64 as i32;
const UINT4: i32 = pb::tensor_proto::DataType::Uint4 as i32;

/// The value of a one-element int64 initializer.
fn int64(t: &pb::TensorProto) -> Option<i64> {
    match (&t.raw_data[..], &t.int64_data[..]) {
        (&[a, b, c, d, e, f, g, h], _) => Some(i64::from_le_bytes([a, b, c, d, e, f, g, h])),
        ([], &[v]) => Some(v),
        _ => None,
    }
}

/// The values of an inline f32 initializer.
fn floats(t: &pb::TensorProto) -> Option<Vec<f32>> {
    if !t.float_data.is_empty() {
        return Some(t.float_data.clone());
    }
    let (chunks, rest) = t.raw_data.as_chunks::<4>();
    (rest.is_empty() && !chunks.is_empty()).then(|| chunks.iter().map(|b| f32::from_le_bytes(*b)).collect())
}

/// The operator: `DequantizeLinear`'s inputs and attributes after the activations.
pub struct QuantizedMatMul;

impl Operator for QuantizedMatMul {
    type Kernel<'attr> = MatMulKernel;

    fn name(&self) -> &str {
        OP
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        let any = TensorElementType::Undefined;
        [
            OperatorInput::required(TensorElementType::Float32),
            OperatorInput::required(any),
            OperatorInput::required(TensorElementType::Float32),
            OperatorInput::optional(any),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'attr>(&self, info: &KernelContext<'attr>) -> ort::Result<MatMulKernel> {
        let bad = |what: String| ort::Error::new(format!("kiln QuantizedMatMul: {what}"));
        if !available() {
            return Err(bad("this CPU lacks AVX-512 VNNI".into()));
        }
        let weight = info.constant_input::<DynTensorValueType>(1)?;
        let scale = info.constant_input::<DynTensorValueType>(2)?;
        let (_, scale) = scale.try_extract_tensor::<f32>()?;
        let zero = info.constant_input::<DynTensorValueType>(3).ok();
        let storage = Storage::from_element(*weight.data_type())
            .ok_or_else(|| bad(format!("weight type {:?}", weight.data_type())))?;
        let &[k, n] = &weight.shape()[..] else {
            return Err(bad(format!("weight shape {:?}", weight.shape())));
        };
        let (k, n) = (k as usize, n as usize);
        let bytes = |t: &DynTensor, count: usize| {
            // SAFETY: an ONNX Runtime tensor of `count` elements of this 4/8-bit type holds
            // `storage.bytes(count)` bytes at its data pointer, alive while the tensor is.
            unsafe { std::slice::from_raw_parts(t.data_ptr().cast::<u8>(), storage.bytes(count)) }
        };
        let int = |name: &str| info.get::<i64>(name);
        let blocking = match (scale.len(), int("axis").unwrap_or(1)) {
            (1, _) => Blocking::Tensor,
            (len, 1) if len == n => Blocking::Column,
            (len, 0) => match int("block_size") {
                Some(b) if b > 0 && (b as usize).is_multiple_of(BLOCK) && len == k.div_ceil(b as usize) * n => {
                    Blocking::Inputs(b as usize)
                }
                other => return Err(bad(format!("block_size {other:?} for {len} scales"))),
            },
            (len, axis) => return Err(bad(format!("{len} scales along axis {axis}"))),
        };
        let zero = match &zero {
            Some(z) if Storage::from_element(*z.data_type()) != Some(storage) => {
                return Err(bad(format!("zero point type {:?}", z.data_type())));
            }
            Some(z) => Some(bytes(z, scale.len())),
            None => None,
        };
        let levels = match info.get::<Vec<f32>>("levels") {
            None => None,
            Some(l) if storage == Storage::U4 && zero.is_none() && matches!(blocking, Blocking::Inputs(_)) => {
                Some(<[f32; 16]>::try_from(l).map_err(|l| bad(format!("{} levels, 16 expected", l.len())))?)
            }
            Some(_) => return Err(bad("a level table needs UINT4 codes in blocks, no zero points".into())),
        };
        let data = bytes(&weight, k * n);
        let weights = Weights { storage, inputs: k, outputs: n, data, scale, zero, blocking, levels };
        Ok(MatMulKernel { packed: Packed::new(&weights).map_err(bad)?, rows: Quantized::default() })
    }
}

/// How a weight's scales and zero points apply.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Blocking {
    /// One for the whole matrix.
    Tensor,
    /// One per output column.
    Column,
    /// One per output column and block of this many inputs.
    Inputs(usize),
}

/// A weight's element type.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Storage {
    U4,
    I4,
    U8,
    I8,
}

impl Storage {
    fn of(onnx_type: i32) -> Option<Self> {
        match onnx_type {
            2 => Some(Self::U8),
            3 => Some(Self::I8),
            21 => Some(Self::U4),
            22 => Some(Self::I4),
            _ => None,
        }
    }

    fn from_element(t: TensorElementType) -> Option<Self> {
        match t {
            TensorElementType::Uint8 => Some(Self::U8),
            TensorElementType::Int8 => Some(Self::I8),
            TensorElementType::Uint4 => Some(Self::U4),
            TensorElementType::Int4 => Some(Self::I4),
            _ => None,
        }
    }

    fn bits(self) -> usize {
        match self {
            Self::U4 | Self::I4 => 4,
            Self::U8 | Self::I8 => 8,
        }
    }

    /// Bytes that hold `count` elements.
    fn bytes(self, count: usize) -> usize {
        count.div_ceil(8 / self.bits())
    }

    /// The code of the value 0 (a signed value's two's-complement bits XOR this = its code).
    fn offset(self) -> u8 {
        match self {
            Self::U4 | Self::U8 => 0,
            Self::I4 => 0x08,
            Self::I8 => 0x80,
        }
    }

    /// Element `i` of `data` (ONNX layout: 4-bit values two per byte, low nibble first),
    /// shifted to an unsigned code (signed types + 8 or + 128).
    fn code(self, data: &[u8], i: usize) -> u8 {
        let raw = if self.bits() == 8 { data[i] } else { (data[i / 2] >> (4 * (i % 2))) & 0x0F };
        raw ^ self.offset()
    }
}

/// A `DequantizeLinear` weight as ONNX lays it out: `[inputs, outputs]`.
struct Weights<'a> {
    storage: Storage,
    inputs: usize,
    outputs: usize,
    data: &'a [u8],
    scale: &'a [f32],
    /// Zero points, same layout as `scale` (absent: 0).
    zero: Option<&'a [u8]>,
    blocking: Blocking,
    /// The values codes stand for before scaling (NF4); `None`: the integers themselves.
    levels: Option<[f32; 16]>,
}

/// A weight packed for the kernel. Tile `t` holds outputs `16t..16t+16`; per activation block,
/// 4-bit weights take 4 vectors of 64 bytes (lane `j`, byte `i`: input `8v + i` of column `j`
/// in the low nibble, `8v + 4 + i` in the high one), 8-bit weights 8 vectors (input `4v + i`).
/// Codes are unsigned; scales and zero points are kept per tile and weight block, 16 each.
///
/// A weight with a level table keeps its 4-bit codes; the kernel maps each through `lut` (one
/// `vpshufb`) to the level on an int8 grid, `round(127 · level / max|level|) + 128`, with zero
/// point 128 and the scales times `max|level| / 127`: each level moves by at most
/// `max|level| / 254` of its block's scale (0.4% of an NF4 block's absmax).
struct Packed {
    bits: usize,
    inputs: usize,
    outputs: usize,
    /// Activation blocks (inputs padded with zeros to a multiple of 32).
    blocks: usize,
    /// Activation blocks per weight block.
    per_scale: usize,
    /// Weight blocks per tile.
    scale_blocks: usize,
    codes: Vec<u8>,
    scales: Vec<f32>,
    zeros: Vec<u8>,
    /// Code → unsigned 8-bit weight, for weights with a level table.
    lut: Option<[u8; 16]>,
}

impl Packed {
    fn new(w: &Weights) -> Result<Self, String> {
        let (k, n) = (w.inputs, w.outputs);
        let blocks = k.div_ceil(BLOCK);
        let (scale_blocks, per_scale) = match w.blocking {
            Blocking::Inputs(b) => (k.div_ceil(b), b / BLOCK),
            Blocking::Tensor | Blocking::Column => (1, blocks.max(1)),
        };
        let expected_scales = match w.blocking {
            Blocking::Tensor => 1,
            Blocking::Column => n,
            Blocking::Inputs(_) => scale_blocks * n,
        };
        let expected_bytes = w.storage.bytes(k * n);
        if k == 0 || n == 0 || w.scale.len() != expected_scales || w.data.len() != expected_bytes {
            return Err(format!("{k}×{n} weight with {} scales and {} bytes", w.scale.len(), w.data.len()));
        }
        let zero_bytes = w.storage.bytes(expected_scales);
        if w.zero.is_some_and(|z| z.len() != zero_bytes) {
            return Err(format!("{} zero point bytes for {expected_scales} scales", w.zero.map_or(0, <[u8]>::len)));
        }
        let (lut, factor) = match w.levels {
            Some(levels) => {
                let (lut, factor) = level_lut(&levels)?;
                (Some(lut), factor)
            }
            None => (None, 1.0),
        };
        let tiles = n.div_ceil(TILE);
        let bits = w.storage.bits();
        let tile_bytes = blocks * BLOCK * TILE * bits / 8;
        let mut codes = vec![0u8; tiles * tile_bytes];
        let mut scales = vec![0f32; tiles * scale_blocks * TILE];
        let mut zeros = vec![0u8; tiles * scale_blocks * TILE];
        let scale_index = |kk: usize, col: usize| match w.blocking {
            Blocking::Tensor => 0,
            Blocking::Column => col,
            Blocking::Inputs(b) => kk / b * n + col,
        };
        // Zero points are stored like the weights: codes of the same type.
        let zero_code = |i: usize| match w.zero {
            Some(z) => w.storage.code(z, i),
            None => w.storage.offset(),
        };
        for col in 0..n {
            let (t, j) = (col / TILE, col % TILE);
            for sb in 0..scale_blocks {
                let first = sb * per_scale * BLOCK;
                let at = (t * scale_blocks + sb) * TILE + j;
                scales[at] = w.scale[scale_index(first, col)] * factor;
                zeros[at] = if lut.is_some() { LUT_ZERO } else { zero_code(scale_index(first, col)) };
            }
        }
        // Input by input (the source's rows, in order); each row's codes land at one byte of
        // one vector per tile.
        let block_bytes = BLOCK * TILE * bits / 8;
        for kk in 0..k {
            let (block, within) = (kk / BLOCK, kk % BLOCK);
            let (offset, shift) = if bits == 8 {
                ((within / 4) * 64 + within % 4, 0)
            } else {
                ((within / 8) * 64 + within % 4, 4 * (within % 8 / 4))
            };
            let base = block * block_bytes + offset;
            let mut put =
                |col: usize, code: u8| codes[col / TILE * tile_bytes + base + col % TILE * 4] |= code << shift;
            if bits == 4 && n % 2 == 0 {
                // Two columns per source byte.
                let flip = w.storage.offset() | w.storage.offset() << 4;
                for (pair, &byte) in w.data[kk * n / 2..][..n / 2].iter().enumerate() {
                    let byte = byte ^ flip;
                    put(2 * pair, byte & 0x0F);
                    put(2 * pair + 1, byte >> 4);
                }
            } else {
                for col in 0..n {
                    put(col, w.storage.code(w.data, kk * n + col));
                }
            }
        }
        Ok(Packed { bits, inputs: k, outputs: n, blocks, per_scale, scale_blocks, codes, scales, zeros, lut })
    }

    fn tiles(&self) -> usize {
        self.outputs.div_ceil(TILE)
    }

    /// `out` (`[rows, outputs]`) = the quantized `rows` times the weight. Tasks (ranges of
    /// tiles, all rows each) run through `par` (count, task).
    fn run<E>(
        &self,
        rows: &Quantized,
        out: &mut [f32],
        par: impl FnOnce(usize, &(dyn Fn(usize) + Sync + Send)) -> Result<(), E>,
    ) -> Result<(), E> {
        let tiles = self.tiles();
        let per_task = tiles.div_ceil(TASKS).max(1);
        let tasks = tiles.div_ceil(per_task);
        let shared = &SharedOutput(out.as_mut_ptr());
        let count = rows.count;
        debug_assert_eq!(out.len(), count * self.outputs);
        par(tasks, &|task| {
            for t in task * per_task..((task + 1) * per_task).min(tiles) {
                for first in (0..count).step_by(ROWS) {
                    let n = ROWS.min(count - first);
                    // SAFETY: `available()` was checked when the kernel was created; task
                    // `task` alone writes columns of its tiles, inside `out`.
                    unsafe { self.tile(t, rows, first, n, shared.0) };
                }
            }
        })
    }

    /// Tile `t` for rows `first..first + n` (`n` ≤ 8), written into `out`.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VNNI; `out` points to `[rows, outputs]` floats and no other
    /// thread writes this tile's columns of these rows.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile(&self, t: usize, rows: &Quantized, first: usize, n: usize, out: *mut f32) {
        macro_rules! rows {
            ($($r:literal, $c:literal);*) => {
                match (n, self.bits, self.lut.is_some()) {
                    $(($r, 8, _) => unsafe { self.tile_rows::<$r, $c, 8, false>(t, rows, first, out) },)*
                    $(($r, _, false) => unsafe { self.tile_rows::<$r, $c, 4, false>(t, rows, first, out) },)*
                    $(($r, _, true) => unsafe { self.tile_rows::<$r, $c, 4, true>(t, rows, first, out) },)*
                    _ => unreachable!("1 to {ROWS} rows"),
                }
            };
        }
        rows!(1, 4; 2, 4; 3, 2; 4, 2; 5, 1; 6, 1; 7, 1; 8, 1)
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn tile(&self, _: usize, _: &Quantized, _: usize, _: usize, _: *mut f32) {
        unreachable!("the kernel is only created where `available()`")
    }

    /// # Safety
    /// As [`Packed::tile`], with `R` rows; `C` accumulator chains per row; 4-bit codes through
    /// `lut` when `LUT`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile_rows<const R: usize, const C: usize, const BITS: usize, const LUT: bool>(
        &self,
        t: usize,
        rows: &Quantized,
        first: usize,
        out: *mut f32,
    ) {
        use std::arch::x86_64::*;
        let vectors = BLOCK * BITS / 32;
        let tile_bytes = self.blocks * vectors * 64;
        let codes = &self.codes[t * tile_bytes..][..tile_bytes];
        let quads = self.blocks * BLOCK / 4;
        let row = |r: usize| &rows.quads[(first + r) * quads..][..quads];
        let low = _mm512_set1_epi8(0x0F);
        let lut = self.lut.unwrap_or_default();
        // SAFETY: `lut` holds 16 bytes.
        let table = _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(lut.as_ptr().cast()) });
        let mut acc = [_mm512_setzero_ps(); R];
        let (mut scale_block, mut left) = (0, self.per_scale);
        for b in 0..self.blocks {
            let block = &codes[b * vectors * 64..][..vectors * 64];
            // The weights stream from memory once per call: ask for a later block's lines
            // now (past this tile's end is the next tile's start, or harmlessly outside).
            let ahead = block.as_ptr().wrapping_add(PREFETCH * vectors * 64);
            for v in 0..vectors {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(v * 64).cast());
            }
            // The block's 8 weight vectors (inputs 4i..4i+4 of the tile's columns each).
            let mut ws = [_mm512_setzero_si512(); 8];
            for v in 0..vectors {
                // SAFETY: `block` holds `vectors` 64-byte vectors.
                let w = unsafe { _mm512_loadu_si512(block.as_ptr().add(v * 64).cast()) };
                if BITS == 8 {
                    ws[v] = w;
                } else {
                    ws[2 * v] = _mm512_and_si512(w, low);
                    ws[2 * v + 1] = _mm512_and_si512(_mm512_srli_epi16::<4>(w), low);
                    if LUT {
                        ws[2 * v] = _mm512_shuffle_epi8(table, ws[2 * v]);
                        ws[2 * v + 1] = _mm512_shuffle_epi8(table, ws[2 * v + 1]);
                    }
                }
            }
            // Independent accumulator chains per row (`vpdpbusd` has a latency of several
            // cycles); integer sums, so their order does not change the result.
            let mut dots = [[_mm512_setzero_si512(); R]; C];
            #[expect(clippy::needless_range_loop, reason = "`r` picks a row in every chain")]
            for r in 0..R {
                let quads: &[i32; 8] = row(r)[b * 8..][..8].try_into().unwrap_or(&[0; 8]);
                for (i, (w, q)) in ws.iter().zip(quads).enumerate() {
                    let dot = &mut dots[i % C][r];
                    // `vpdpbusd` with the activation quad broadcast from memory: as an
                    // intrinsic over `_mm512_set1_epi32`, LLVM hoists all R × 8 broadcasts of a
                    // block into registers and spills them.
                    // SAFETY: `q` is a valid `i32`; the instruction reads 4 bytes there, and
                    // the CPU has AVX-512 VNNI (the caller's contract).
                    unsafe {
                        std::arch::asm!(
                            "vpdpbusd {dot}, {w}, dword ptr [{q}]{{1to16}}",
                            dot = inout(zmm_reg) *dot,
                            w = in(zmm_reg) *w,
                            q = in(reg) q,
                            options(pure, readonly, nostack, preserves_flags)
                        );
                    }
                }
            }
            let mut dot = dots[0];
            for chain in &dots[1..] {
                for (d, c) in dot.iter_mut().zip(chain) {
                    *d = _mm512_add_epi32(*d, *c);
                }
            }
            let at = (t * self.scale_blocks + scale_block) * TILE;
            left -= 1;
            if left == 0 {
                (scale_block, left) = (scale_block + 1, self.per_scale);
            }
            // SAFETY: `scales` and `zeros` hold 16 values per tile and weight block.
            let scale = unsafe { _mm512_loadu_ps(self.scales[at..][..TILE].as_ptr()) };
            let zero = unsafe { _mm_loadu_si128(self.zeros[at..][..TILE].as_ptr().cast()) };
            let zero = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(zero));
            for (r, (acc, dot)) in acc.iter_mut().zip(dot).enumerate() {
                let i = (first + r) * self.blocks + b;
                let scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(rows.scales[i]));
                let centred = _mm512_fnmadd_ps(zero, _mm512_set1_ps(rows.sums[i]), scaled);
                *acc = _mm512_fmadd_ps(centred, scale, *acc);
            }
        }
        let columns = TILE.min(self.outputs - t * TILE);
        let mask: __mmask16 = if columns == TILE { !0 } else { (1 << columns) - 1 };
        for (r, acc) in acc.into_iter().enumerate() {
            // SAFETY: row `first + r` has `outputs` floats from `(first + r) * outputs`; the
            // mask keeps the store inside tile `t`'s columns.
            unsafe { _mm512_mask_storeu_ps(out.add((first + r) * self.outputs + t * TILE), mask, acc) };
        }
    }
}

/// The zero point of weights mapped through a level table.
const LUT_ZERO: u8 = 128;

/// A level table on the kernel's int8 grid: the 8-bit weight of each code (see [`Packed`]) and
/// the factor its scales take.
fn level_lut(levels: &[f32; 16]) -> Result<([u8; 16], f32), String> {
    let max = levels.iter().fold(0f32, |m, l| m.max(l.abs()));
    if !(max > 0.0 && max.is_finite()) {
        return Err(format!("level table {levels:?}"));
    }
    let lut = levels.map(|l| ((l * 127.0 / max).round_ties_even() as i32 + i32::from(LUT_ZERO)).clamp(1, 255) as u8);
    Ok((lut, max / 127.0))
}

/// How many blocks ahead of the one being multiplied the kernel prefetches weights.
const PREFETCH: usize = 4;

/// Tasks a call is split into (ranges of tiles).
const TASKS: usize = 32;

/// The output, shared by tasks that write disjoint columns of it.
struct SharedOutput(*mut f32);
// SAFETY: tasks write disjoint tiles (see `Packed::run`).
unsafe impl Sync for SharedOutput {}
// SAFETY: as above.
unsafe impl Send for SharedOutput {}

/// 1.5 · 2²³: a float in [2²³, 2²⁴) whose last mantissa bits hold a small added integer.
const ROUNDING: f32 = 12_582_912.0;

/// Activation rows quantized to int8 per block of 32 inputs.
#[derive(Default)]
struct Quantized {
    count: usize,
    /// Per row, the codes four by four (`[rows, blocks · 8]`), zero-padded.
    quads: Vec<i32>,
    /// Per row and block: the scale, and the scale times the sum of the codes.
    scales: Vec<f32>,
    sums: Vec<f32>,
}

impl Quantized {
    /// Quantizes `a` (`[count, inputs]`) for `packed`.
    fn fill(&mut self, a: &[f32], inputs: usize, blocks: usize) {
        let count = a.len() / inputs;
        self.count = count;
        self.quads.clear();
        self.quads.resize(count * blocks * 8, 0);
        self.scales.clear();
        self.scales.resize(count * blocks, 0.0);
        self.sums.clear();
        self.sums.resize(count * blocks, 0.0);
        let simd = available();
        for (r, row) in a.chunks_exact(inputs).enumerate() {
            for (b, block) in row.chunks(BLOCK).enumerate() {
                let Ok(quads) = <&mut [i32; 8]>::try_from(&mut self.quads[(r * blocks + b) * 8..][..8]) else {
                    continue;
                };
                let full: Option<&[f32; BLOCK]> = block.try_into().ok();
                let quantized = match full {
                    // SAFETY: `available()` (AVX-512 F/BW) was checked.
                    #[cfg(target_arch = "x86_64")]
                    Some(full) if simd => unsafe { quantize_avx512(full, quads) },
                    _ => quantize(block, quads),
                };
                if let Some((scale, sum)) = quantized {
                    self.scales[r * blocks + b] = scale;
                    self.sums[r * blocks + b] = scale * sum as f32;
                }
            }
        }
    }
}

/// Quantizes one block of activations (up to 32) into `quads` (four codes per `i32`, little
/// end first): codes round(v · 127 / max|v|), half to even. Returns the scale and the sum of
/// the codes; `None` (codes left zero) when the block is all zeros or not finite.
fn quantize(block: &[f32], quads: &mut [i32; 8]) -> Option<(f32, i32)> {
    let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    if max == 0.0 || !max.is_finite() {
        return None;
    }
    let inverse = 127.0 / max;
    let mut codes = [0u8; BLOCK];
    let mut sum = 0i32;
    for (c, v) in codes.iter_mut().zip(block) {
        // Round half to even: adding 1.5 · 2²³ leaves the rounded value in the low mantissa
        // bits (|v · inverse| ≤ 127).
        let code = ((v * inverse + ROUNDING).to_bits() as i32 - ROUNDING.to_bits() as i32).clamp(-127, 127);
        *c = code as i8 as u8;
        sum += code;
    }
    for (q, four) in quads.iter_mut().zip(codes.chunks_exact(4)) {
        *q = i32::from_le_bytes([four[0], four[1], four[2], four[3]]);
    }
    Some((max / 127.0, sum))
}

/// [`quantize`] for a whole block with AVX-512 (the same codes: `vcvtps2dq` rounds half to
/// even too).
///
/// # Safety
/// The CPU has AVX-512 F and BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_avx512(block: &[f32; BLOCK], quads: &mut [i32; 8]) -> Option<(f32, i32)> {
    use std::arch::x86_64::*;
    // SAFETY: `block` holds 32 floats, two vectors of 16.
    let (x0, x1) = unsafe { (_mm512_loadu_ps(block.as_ptr()), _mm512_loadu_ps(block.as_ptr().add(16))) };
    let max = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    if max == 0.0 || !max.is_finite() {
        return None;
    }
    let inverse = _mm512_set1_ps(127.0 / max);
    let q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, inverse));
    let q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, inverse));
    let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    // SAFETY: `quads` holds 32 bytes: 16 codes from each vector.
    unsafe {
        _mm_storeu_si128(quads.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128(quads.as_mut_ptr().add(4).cast(), _mm512_cvtepi32_epi8(q1));
    }
    Some((max / 127.0, sum))
}

/// One node's packed weight, and the activation scratch kept between calls.
pub struct MatMulKernel {
    packed: Packed,
    rows: Quantized,
}

impl Kernel for MatMulKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let fail = |what: String| ort::Error::new(format!("kiln QuantizedMatMul: {what}"));
        let a = ctx.input(0)?.ok_or_else(|| fail("input 0 missing".into()))?;
        let (shape, a) = a.try_extract_tensor::<f32>()?;
        let k = self.packed.inputs;
        if shape.last().is_none_or(|&last| last as usize != k) {
            return Err(fail(format!("activations {shape:?} for {k} inputs")));
        }
        let mut out_shape = shape.to_vec();
        if let Some(last) = out_shape.last_mut() {
            *last = self.packed.outputs as i64;
        }
        self.rows.fill(a, k, self.packed.blocks);
        let mut out = ctx.output(0, out_shape)?.ok_or_else(|| fail("output 0".into()))?;
        let (_, out) = out.try_extract_tensor_mut::<f32>()?;
        self.packed.run(&self.rows, out, |n, task| ctx.par_for(n, n, task))?;
        // A long prefill's scratch goes back.
        if self.rows.quads.len() > KEPT_SCRATCH {
            self.rows = Quantized::default();
        }
        Ok(())
    }
}

/// Activation codes (four per value) a node keeps between calls.
const KEPT_SCRATCH: usize = 1 << 14;

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator.
    fn noise(seed: u64) -> impl FnMut() -> f32 {
        let mut state = seed;
        move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// The written-out arithmetic: dequantized weights (ONNX's `DequantizeLinear`) times
    /// activations quantized per block of 32, summed per block then scaled.
    fn reference(w: &Weights, a: &[f32]) -> Vec<f32> {
        let (k, n) = (w.inputs, w.outputs);
        let zero_code = |i: usize| w.zero.map_or(w.storage.offset(), |z| w.storage.code(z, i));
        let index = |kk: usize, col: usize| match w.blocking {
            Blocking::Tensor => 0,
            Blocking::Column => col,
            Blocking::Inputs(b) => kk / b * n + col,
        };
        let mut rows = Quantized::default();
        let blocks = k.div_ceil(BLOCK);
        rows.fill(a, k, blocks);
        let code = |r: usize, kk: usize| (rows.quads[r * blocks * 8 + kk / 4] >> (8 * (kk % 4))) as i8;
        let mut out = vec![0f32; rows.count * n];
        for r in 0..rows.count {
            for col in 0..n {
                let mut total = 0f64;
                for b in 0..blocks {
                    let sa = f64::from(rows.scales[r * blocks + b]);
                    for kk in b * BLOCK..((b + 1) * BLOCK).min(k) {
                        let i = index(kk, col);
                        let raw = w.storage.code(w.data, kk * n + col);
                        let weight = match &w.levels {
                            Some(levels) => {
                                let (lut, factor) = level_lut(levels).expect("a valid table");
                                (f64::from(lut[usize::from(raw)]) - 128.0) * f64::from(w.scale[i] * factor)
                            }
                            None => (f64::from(raw) - f64::from(zero_code(i))) * f64::from(w.scale[i]),
                        };
                        total += f64::from(code(r, kk)) * sa * weight;
                    }
                }
                out[r * n + col] = total as f32;
            }
        }
        out
    }

    fn run_serial(packed: &Packed, a: &[f32]) -> Vec<f32> {
        let mut rows = Quantized::default();
        rows.fill(a, packed.inputs, packed.blocks);
        let mut out = vec![0f32; rows.count * packed.outputs];
        packed
            .run(&rows, &mut out, |n, task| -> Result<(), ()> {
                (0..n).for_each(task);
                Ok(())
            })
            .expect("serial tasks do not fail");
        out
    }

    #[test]
    fn every_storage_and_blocking_matches_the_written_out_arithmetic() {
        if !available() {
            println!("SKIPPED: this CPU lacks AVX-512 VNNI; the kernel is not used here");
            return;
        }
        let mut next = noise(7);
        // An odd column count (4-bit codes straddle bytes, a partial tile) and an even one.
        for (k, n) in [(200usize, 37usize), (96, 48)] {
            check_every_storage(k, n, &mut next);
        }
    }

    fn check_every_storage(k: usize, n: usize, next: &mut impl FnMut() -> f32) {
        let nf4 = Some(crate::quant::NF4_LEVELS);
        let cases = [
            (Storage::U4, Blocking::Inputs(64), true, None),
            (Storage::U4, Blocking::Inputs(32), true, None),
            (Storage::I4, Blocking::Inputs(64), false, None),
            (Storage::U4, Blocking::Inputs(64), false, nf4),
            (Storage::U4, Blocking::Inputs(32), false, nf4),
            (Storage::I8, Blocking::Column, false, None),
            (Storage::U8, Blocking::Column, true, None),
            (Storage::I8, Blocking::Tensor, false, None),
        ];
        for (storage, blocking, with_zero, levels) in cases {
            let bytes = storage.bytes(k * n);
            let data: Vec<u8> = (0..bytes).map(|_| (next() * 127.0 + 128.0) as u8).collect();
            let scales = match blocking {
                Blocking::Tensor => 1,
                Blocking::Column => n,
                Blocking::Inputs(b) => k.div_ceil(b) * n,
            };
            let scale: Vec<f32> = (0..scales).map(|_| 0.01 + next().abs() * 0.05).collect();
            let zero_bytes = storage.bytes(scales);
            let zero: Vec<u8> = (0..zero_bytes).map(|_| (next() * 127.0 + 128.0) as u8).collect();
            let w = Weights {
                storage,
                inputs: k,
                outputs: n,
                data: &data,
                scale: &scale,
                zero: with_zero.then_some(&zero[..]),
                blocking,
                levels,
            };
            let packed = Packed::new(&w).expect("a valid weight packs");
            let a: Vec<f32> = (0..11 * k).map(|_| next() * 3.0).collect();
            let got = run_serial(&packed, &a);
            let want = reference(&w, &a);
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!((g - e).abs() <= 1e-4 * e.abs().max(1.0), "{storage:?} {blocking:?} [{i}]: {g} vs {e}");
            }
            // Each row alone gives the same bits as in the batch of 11.
            for r in [0, 5, 10] {
                let alone = run_serial(&packed, &a[r * k..(r + 1) * k]);
                assert_eq!(alone, got[r * n..(r + 1) * n], "{storage:?} {blocking:?} row {r}");
            }
        }
    }

    #[test]
    fn both_activation_quantizers_give_the_same_codes() {
        if !available() {
            println!("SKIPPED: this CPU lacks AVX-512; only the portable quantizer runs here");
            return;
        }
        let mut next = noise(11);
        for trial in 0..200 {
            let mut block = [0f32; BLOCK];
            block.iter_mut().for_each(|v| *v = next() * 4.0);
            // Halves after scaling: max 127 makes every integer + 0.5 a tie.
            if trial % 2 == 0 {
                block[0] = 127.0;
                block[1] = 2.5;
                block[2] = -3.5;
            }
            let (mut a, mut b) = ([0i32; 8], [0i32; 8]);
            // SAFETY: `available()` was checked.
            let simd = unsafe { quantize_avx512(&block, &mut a) };
            assert_eq!(simd, quantize(&block, &mut b), "trial {trial}");
            assert_eq!(a, b, "trial {trial}");
        }
        let (mut a, mut b) = ([0i32; 8], [0i32; 8]);
        // SAFETY: as above.
        assert_eq!(unsafe { quantize_avx512(&[0.0; BLOCK], &mut a) }, None);
        assert_eq!(quantize(&[0.0; BLOCK], &mut b), None);
    }

    /// A `DequantizeLinear(name) → MatMul(x, ·) → name.out` pair; the DQ's attributes.
    fn pair(name: &str, axis: i64, block: i64) -> [pb::NodeProto; 2] {
        let attr = |n: &str, i: i64| pb::AttributeProto { name: n.into(), i, r#type: 2, ..Default::default() };
        [
            pb::NodeProto {
                op_type: "DequantizeLinear".into(),
                input: vec![name.into(), format!("{name}.scale")],
                output: vec![format!("{name}.dq")],
                attribute: vec![attr("axis", axis), attr("block_size", block)],
                ..Default::default()
            },
            pb::NodeProto {
                op_type: "MatMul".into(),
                input: vec!["x".into(), format!("{name}.dq")],
                output: vec![format!("{name}.out")],
                ..Default::default()
            },
        ]
    }

    #[test]
    fn fuse_rewrites_the_pairs_the_kernel_computes() {
        let tensor = |name: &str, data_type: i32, dims: Vec<i64>| pb::TensorProto {
            name: name.into(),
            data_type,
            dims,
            ..Default::default()
        };
        let mut graph = pb::GraphProto::default();
        // int4 in blocks of 32, int8 per column: rewritten. Blocks of 16, f32 weights, and a
        // dequantized weight that is also a graph output: left to ONNX Runtime.
        for (name, data_type, axis, block, scale_dims) in [
            ("a", 21, 0, 32, vec![2, 8]),
            ("b", 3, 1, 0, vec![8]),
            ("c", 21, 0, 16, vec![4, 8]),
            ("d", 1, 1, 0, vec![8]),
            ("e", 22, 0, 64, vec![1, 8]),
        ] {
            graph.initializer.push(tensor(name, data_type, vec![64, 8]));
            graph.initializer.push(tensor(&format!("{name}.scale"), 1, scale_dims));
            graph.node.extend(pair(name, axis, block));
        }
        graph.output.push(pb::ValueInfoProto { name: "e.dq".into(), ..Default::default() });
        fuse(&mut graph, "ai.kiln");
        let ops: Vec<(&str, &str)> = graph.node.iter().map(|n| (n.op_type.as_str(), n.output[0].as_str())).collect();
        assert_eq!(
            ops,
            [
                (OP, "a.out"),
                (OP, "b.out"),
                ("DequantizeLinear", "c.dq"),
                ("MatMul", "c.out"),
                ("DequantizeLinear", "d.dq"),
                ("MatMul", "d.out"),
                ("DequantizeLinear", "e.dq"),
                ("MatMul", "e.out"),
            ]
        );
        let a = &graph.node[0];
        assert_eq!(
            (a.domain.as_str(), &a.input[..]),
            ("ai.kiln", &["x".to_string(), "a".into(), "a.scale".into()][..])
        );
        let attrs: Vec<(&str, i64)> = a.attribute.iter().map(|t| (t.name.as_str(), t.i)).collect();
        assert_eq!(attrs, [("axis", 0), ("block_size", 32)]);
    }

    /// An NF4 weight `name` `[inputs, 8]` in blocks of `block`, as the exporter writes it.
    fn nf4_weight(graph: &mut pb::GraphProto, name: &str, inputs: i64, block: i64) {
        let scalar = |n: String, v: i64| pb::TensorProto {
            name: n,
            data_type: 7,
            raw_data: v.to_le_bytes().to_vec(),
            ..Default::default()
        };
        let levels: Vec<u8> = crate::quant::NF4_LEVELS.iter().flat_map(|l| l.to_le_bytes()).collect();
        graph.initializer.extend([
            pb::TensorProto { name: name.into(), data_type: 21, dims: vec![inputs, 8], ..Default::default() },
            pb::TensorProto {
                name: format!("{name}.levels"),
                data_type: 1,
                dims: vec![16],
                raw_data: levels,
                ..Default::default()
            },
            pb::TensorProto {
                name: format!("{name}.scale"),
                data_type: 1,
                dims: vec![inputs.div_euclid(block) + i64::from(inputs % block != 0), 8],
                ..Default::default()
            },
            scalar(format!("{name}.0"), 0),
            scalar(format!("{name}.k"), inputs),
            scalar(format!("{name}.1"), 1),
            scalar(format!("{name}.b"), block),
        ]);
        let node = |op: &str, inputs: &[String], output: &str, attribute: Vec<pb::AttributeProto>| pb::NodeProto {
            op_type: op.into(),
            input: inputs.to_vec(),
            output: vec![format!("{name}/{output}")],
            attribute,
            ..Default::default()
        };
        let to = pb::AttributeProto { name: "to".into(), i: 6, r#type: 2, ..Default::default() };
        let v = |s: &str| format!("{name}{s}");
        graph.node.extend([
            node("Cast", &[v("")], "cast", vec![to]),
            node("Gather", &[v(".levels"), v("/cast")], "values", vec![]),
            node("Range", &[v(".0"), v(".k"), v(".1")], "range", vec![]),
            node("Div", &[v("/range"), v(".b")], "block", vec![]),
            node("Gather", &[v(".scale"), v("/block")], "scales", vec![]),
            node("Mul", &[v("/values"), v("/scales")], "weight", vec![]),
            node("MatMul", &["x".into(), v("/weight")], "out", vec![]),
        ]);
    }

    #[test]
    fn fuse_rewrites_nf4_weights_in_blocks_of_32() {
        let mut graph = pb::GraphProto::default();
        nf4_weight(&mut graph, "f", 96, 64);
        nf4_weight(&mut graph, "g", 64, 16);
        fuse(&mut graph, "ai.kiln");
        let ops: Vec<&str> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, [OP, "Cast", "Gather", "Range", "Div", "Gather", "Mul", "MatMul"], "blocks of 16 stay");
        let f = &graph.node[0];
        assert_eq!(f.input, ["x", "f", "f.scale"]);
        assert_eq!(f.output, ["f/out"]);
        let block = f.attribute.iter().find(|a| a.name == "block_size").map(|a| a.i);
        let levels = f.attribute.iter().find(|a| a.name == "levels").map(|a| a.floats.clone());
        assert_eq!((block, levels), (Some(64), Some(crate::quant::NF4_LEVELS.to_vec())));
    }

    #[test]
    fn level_tables_move_each_level_by_at_most_half_a_grid_step() {
        let (lut, factor) = level_lut(&crate::quant::NF4_LEVELS).expect("NF4 maps");
        assert_eq!((lut[0], lut[7], lut[15]), (1, 128, 255), "-1, 0 and 1 land exactly");
        for (&l, &code) in crate::quant::NF4_LEVELS.iter().zip(&lut) {
            let mapped = (f32::from(code) - 128.0) * factor;
            assert!((mapped - l).abs() <= 1.0 / 254.0 + 1e-7, "{l} → {mapped}");
        }
        assert!(level_lut(&[0.0; 16]).is_err());
    }

    #[test]
    fn codes_follow_onnx_packing() {
        // Elements 0..4 of an int4 tensor: 1, -2, 7, -8 → nibbles 0x1, 0xE, 0x7, 0x8.
        let data = [0xE1, 0x87];
        let codes: Vec<u8> = (0..4).map(|i| Storage::I4.code(&data, i)).collect();
        assert_eq!(codes, [9, 6, 15, 0]);
        assert_eq!(Storage::I8.code(&[0x80, 0x7F], 0), 0);
        assert_eq!(Storage::I8.code(&[0x80, 0x7F], 1), 255);
        assert_eq!(Storage::U4.code(&[0xE1], 1), 14);
    }

    #[test]
    fn quantized_rows_round_per_block() {
        let mut rows = Quantized::default();
        let mut a = vec![0.0f32; 40];
        a[0] = 2.54;
        a[1] = -1.0;
        a[33] = 0.5;
        rows.fill(&a, 40, 2);
        assert_eq!(rows.count, 1);
        assert_eq!(rows.scales, [2.54 / 127.0, 0.5 / 127.0]);
        // 2.54 → 127, -1.0 → -50 (exactly -50.0); block 1: 0.5 → 127 at position 1.
        assert_eq!(rows.quads[0] & 0xFF, 127);
        assert_eq!((rows.quads[0] >> 8) as i8, -50);
        assert_eq!((rows.quads[8] >> 8) as i8, 127);
        assert!((rows.sums[0] - 0.02 * 77.0).abs() < 1e-6);
    }

    #[test]
    fn calibration_rounds_activations_as_the_kernel_does() {
        // 2 rows of 70 inputs: two full blocks and a partial one, with ties and a zero block.
        let mut next = noise(5);
        let mut a: Vec<f32> = (0..140).map(|_| next() * 3.0).collect();
        a[..3].copy_from_slice(&[127.0, 2.5, -3.5]);
        a[70 + 32..70 + 64].iter_mut().for_each(|v| *v = 0.0);
        let mut rows = Quantized::default();
        rows.fill(&a, 70, 3);
        let rounded = crate::quant::round_activations(ndarray::Array2::from_shape_vec((2, 70), a).expect("shape"));
        for (r, row) in rounded.rows().into_iter().enumerate() {
            for (i, &v) in row.iter().enumerate() {
                let (b, j) = (r * 3 + i / BLOCK, i % BLOCK);
                let code = (rows.quads[b * 8 + j / 4] >> (8 * (j % 4))) as i8;
                assert_eq!(v, f32::from(code) * rows.scales[b], "row {r}, input {i}");
            }
        }
    }
}
