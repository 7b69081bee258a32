//! In-memory lowering of DequantizeLinear into standard ops, for runtimes without 4-bit
//! types or blocked quantization (tract).
//!
//! Each lowered `DequantizeLinear(x, scale, zero_point, axis, block_size)` over a constant
//! becomes: codes unpacked to one byte each → `Cast` to f32 → `Sub` the zero point (cast to
//! f32) → `Mul` by the scale → for blocked layouts, `Reshape` back (and `Slice` away the
//! padding of a partial last block). Scales and zero points are given the shape that
//! broadcasts over their block, which is free (their bytes stay in place). Every step is
//! exact in f32: codes and zero points are small integers, so the only rounding is the
//! final product, as in DequantizeLinear itself. The file on disk is never changed.

use tract_onnx::pb;

use super::CheckError;

/// Which DequantizeLinear nodes to lower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lowering {
    /// Only those tract cannot read: 4-bit codes or `block_size` > 0.
    Needed,
    /// Every DequantizeLinear over a constant (to prove the lowering against tract's own
    /// DequantizeLinear on 8-bit artifacts).
    All,
}

const INT4: i32 = pb::tensor_proto::DataType::Int4 as i32;
const UINT4: i32 = pb::tensor_proto::DataType::Uint4 as i32;
const INT8: i32 = pb::tensor_proto::DataType::Int8 as i32;
const UINT8: i32 = pb::tensor_proto::DataType::Uint8 as i32;
const FLOAT: i32 = pb::tensor_proto::DataType::Float as i32;

/// Lowers DequantizeLinear nodes of `graph` per `which`, and widens any other 4-bit
/// initializer to 8 bits; `external` reads the bytes of an initializer stored outside the
/// graph. Returns how many DequantizeLinear nodes were lowered.
pub fn lower_dequantize(
    graph: &mut pb::GraphProto,
    which: Lowering,
    external: &dyn Fn(&pb::TensorProto) -> Result<Vec<u8>, CheckError>,
) -> Result<usize, CheckError> {
    let mut nodes = Vec::with_capacity(graph.node.len());
    let mut lowered = 0;
    for node in std::mem::take(&mut graph.node) {
        if node.op_type != "DequantizeLinear" {
            nodes.push(node);
            continue;
        }
        let find = |name: &str| graph.initializer.iter().position(|t| t.name == name);
        let (Some(xi), Some(si)) = (find(&node.input[0]), node.input.get(1).and_then(|s| find(s))) else {
            nodes.push(node);
            continue;
        };
        let block = int_attr(&node, "block_size").unwrap_or(0);
        let four_bit = matches!(graph.initializer[xi].data_type, INT4 | UINT4);
        if which == Lowering::Needed && block == 0 && !four_bit {
            nodes.push(node);
            continue;
        }
        let zi = node.input.get(2).filter(|z| !z.is_empty()).and_then(|z| find(z));
        let x = graph.initializer[xi].clone();
        let s = graph.initializer[si].clone();
        let z = zi.map(|i| graph.initializer[i].clone());
        let new = lower_one(&node, &x, &s, z.as_ref(), block, external)?;
        graph.initializer.extend(new.initializers);
        nodes.extend(new.nodes);
        lowered += 1;
    }
    graph.node = nodes;
    // Drop initializers nothing reads any more (the packed originals).
    let used: std::collections::HashSet<&str> =
        graph.node.iter().flat_map(|n| n.input.iter().map(String::as_str)).collect();
    let keep: Vec<bool> = graph.initializer.iter().map(|t| used.contains(t.name.as_str())).collect();
    let mut keep = keep.into_iter();
    graph.initializer.retain(|_| keep.next().unwrap_or(true));
    // 4-bit codes read by other ops (NF4's Cast → Gather from its level table) widen to a
    // byte each, same values.
    for t in graph.initializer.iter_mut().filter(|t| matches!(t.data_type, INT4 | UINT4)) {
        let (data_type, codes) = unpack(t, external)?;
        *t = tensor(std::mem::take(&mut t.name), data_type, std::mem::take(&mut t.dims), codes);
    }
    Ok(lowered)
}

struct Lowered {
    nodes: Vec<pb::NodeProto>,
    initializers: Vec<pb::TensorProto>,
}

fn int_attr(node: &pb::NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

/// One byte per code (sign-extended for INT4), as INT8/UINT8.
fn unpack(
    t: &pb::TensorProto,
    external: &dyn Fn(&pb::TensorProto) -> Result<Vec<u8>, CheckError>,
) -> Result<(i32, Vec<u8>), CheckError> {
    let bytes = if t.raw_data.is_empty() && !t.external_data.is_empty() { external(t)? } else { t.raw_data.clone() };
    let data_type = if t.data_type == INT4 {
        INT8
    } else if t.data_type == UINT4 {
        UINT8
    } else {
        t.data_type
    };
    Ok((data_type, unpack_codes(t, &bytes)?))
}

/// The codes of an INT8/UINT8/INT4/UINT4 initializer from its raw bytes, one byte each
/// (4-bit codes unpacked low nibble first, INT4 sign-extended).
pub(crate) fn unpack_codes(t: &pb::TensorProto, bytes: &[u8]) -> Result<Vec<u8>, CheckError> {
    let n = t.dims.iter().product::<i64>().max(0) as usize;
    let short = || CheckError::Graph(format!("initializer {}: {} bytes for {n} values", t.name, bytes.len()));
    match t.data_type {
        INT4 | UINT4 => {
            if bytes.len() < n.div_ceil(2) {
                return Err(short());
            }
            Ok((0..n)
                .map(|i| {
                    let nib = (bytes[i / 2] >> (4 * (i % 2))) & 0xF;
                    if t.data_type == INT4 {
                        ((nib << 4) as i8 >> 4) as u8
                    } else {
                        nib
                    }
                })
                .collect())
        }
        INT8 | UINT8 => {
            if bytes.len() < n {
                return Err(short());
            }
            Ok(bytes[..n].to_vec())
        }
        other => {
            Err(CheckError::Graph(format!("initializer {}: element type {other} is not an integer code type", t.name)))
        }
    }
}

fn tensor(name: String, data_type: i32, dims: Vec<i64>, raw_data: Vec<u8>) -> pb::TensorProto {
    pb::TensorProto { name, data_type, dims, raw_data, ..Default::default() }
}

fn node(op: &str, name: String, inputs: Vec<String>, output: String, attrs: Vec<pb::AttributeProto>) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.into(),
        name,
        input: inputs,
        output: vec![output],
        attribute: attrs,
        ..Default::default()
    }
}

fn int_attribute(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        i: v,
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        ..Default::default()
    }
}

fn lower_one(
    dq: &pb::NodeProto,
    x: &pb::TensorProto,
    s: &pb::TensorProto,
    z: Option<&pb::TensorProto>,
    block: i64,
    external: &dyn Fn(&pb::TensorProto) -> Result<Vec<u8>, CheckError>,
) -> Result<Lowered, CheckError> {
    let p = format!("{}/lowered", dq.name);
    let out = dq.output[0].clone();
    let rank = x.dims.len() as i64;
    let axis = int_attr(dq, "axis").unwrap_or(1);
    let axis = if axis < 0 { axis + rank } else { axis };
    let (code_type, mut codes) = unpack(x, external)?;
    let mut x_dims = x.dims.clone();
    let mut s_dims = s.dims.clone();
    let mut padded_rows = None;
    let per_tensor = s.dims.is_empty() || (s.dims.len() == 1 && s.dims[0] == 1 && block == 0);
    if block > 0 {
        // Blocked: view the codes as [.., groups, block, ..] along `axis` and the scales as
        // [.., groups, 1, ..]; pad a partial last block with zero codes.
        if rank != 2 || !(0..2).contains(&axis) {
            return Err(CheckError::Graph(format!(
                "{}: blocked DequantizeLinear over rank {rank}, axis {axis}",
                dq.name
            )));
        }
        let k = x.dims[axis as usize];
        let groups = (k + block - 1) / block;
        if s.dims.len() != 2 || s.dims[axis as usize] != groups {
            return Err(CheckError::Graph(format!(
                "{}: scale dims {:?} do not match {groups} blocks",
                dq.name, s.dims
            )));
        }
        if groups * block != k {
            padded_rows = Some(k);
            codes = pad_axis(&codes, &x.dims, axis as usize, groups * block);
        }
        let other = x.dims[1 - axis as usize];
        x_dims = if axis == 0 { vec![groups, block, other] } else { vec![other, groups, block] };
        s_dims = if axis == 0 { vec![groups, 1, other] } else { vec![other, groups, 1] };
    } else if !per_tensor && rank == 2 && axis == 0 {
        // Per-channel along rows: [rows] → [rows, 1] to broadcast over columns.
        s_dims = vec![s.dims[0], 1];
    }
    let mut initializers = vec![tensor(format!("{p}/codes"), code_type, x_dims.clone(), codes)];
    let mut scale = s.clone();
    scale.name = format!("{p}/scale");
    scale.dims = s_dims.clone();
    if scale.data_type != FLOAT {
        return Err(CheckError::Graph(format!(
            "{}: scale of element type {} (f32 expected)",
            dq.name, scale.data_type
        )));
    }
    if scale.raw_data.is_empty() && !scale.external_data.is_empty() {
        scale.raw_data = external(s)?;
        scale.external_data.clear();
        scale.data_location = None;
    }
    initializers.push(scale);
    let to_f32 = || vec![int_attribute("to", FLOAT as i64)];
    let mut nodes =
        vec![node("Cast", format!("{p}/Cast"), vec![format!("{p}/codes")], format!("{p}/Cast/output_0"), to_f32())];
    let mut value = format!("{p}/Cast/output_0");
    if let Some(z) = z {
        let (zt, zb) = unpack(z, external)?;
        initializers.push(tensor(format!("{p}/zero_point"), zt, s_dims.clone(), zb));
        nodes.push(node(
            "Cast",
            format!("{p}/zp/Cast"),
            vec![format!("{p}/zero_point")],
            format!("{p}/zp/Cast/output_0"),
            to_f32(),
        ));
        nodes.push(node(
            "Sub",
            format!("{p}/Sub"),
            vec![value, format!("{p}/zp/Cast/output_0")],
            format!("{p}/Sub/output_0"),
            vec![],
        ));
        value = format!("{p}/Sub/output_0");
    }
    let product = if block > 0 { format!("{p}/Mul/output_0") } else { out.clone() };
    nodes.push(node("Mul", format!("{p}/Mul"), vec![value, format!("{p}/scale")], product.clone(), vec![]));
    if block > 0 {
        let full: Vec<i64> =
            if axis == 0 { vec![x_dims[0] * x_dims[1], x_dims[2]] } else { vec![x_dims[0], x_dims[1] * x_dims[2]] };
        initializers.push(i64_tensor(format!("{p}/shape"), &full));
        let reshaped = if padded_rows.is_some() { format!("{p}/Reshape/output_0") } else { out.clone() };
        nodes.push(node(
            "Reshape",
            format!("{p}/Reshape"),
            vec![product, format!("{p}/shape")],
            reshaped.clone(),
            vec![],
        ));
        if let Some(k) = padded_rows {
            initializers.push(i64_tensor(format!("{p}/starts"), &[0]));
            initializers.push(i64_tensor(format!("{p}/ends"), &[k]));
            initializers.push(i64_tensor(format!("{p}/axes"), &[axis]));
            let inputs = vec![reshaped, format!("{p}/starts"), format!("{p}/ends"), format!("{p}/axes")];
            nodes.push(node("Slice", format!("{p}/Slice"), inputs, out, vec![]));
        }
    }
    Ok(Lowered { nodes, initializers })
}

fn i64_tensor(name: String, values: &[i64]) -> pb::TensorProto {
    tensor(
        name,
        pb::tensor_proto::DataType::Int64 as i32,
        vec![values.len() as i64],
        values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
}

/// Pads a 2-D byte matrix along `axis` to `to` entries with zeros.
fn pad_axis(codes: &[u8], dims: &[i64], axis: usize, to: i64) -> Vec<u8> {
    let (rows, cols) = (dims[0] as usize, dims[1] as usize);
    if axis == 0 {
        let mut out = codes.to_vec();
        out.resize(to as usize * cols, 0);
        out
    } else {
        let mut out = vec![0u8; rows * to as usize];
        for r in 0..rows {
            out[r * to as usize..r * to as usize + cols].copy_from_slice(&codes[r * cols..(r + 1) * cols]);
        }
        out
    }
}
