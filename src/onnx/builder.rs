//! A small ONNX graph builder over the generated protobuf types (`tract_onnx::pb`).
//!
//! It names things consistently and infers nothing: every node gets the name the caller
//! gives (`/model/layers.3/attn/q_proj/MatMul`), its output is that name + `/output_0`
//! unless the caller names the output (graph outputs such as `logits`), and initializers
//! keep their checkpoint names. Large initializers go to an external data file, each
//! aligned to [`DATA_ALIGNMENT`] bytes, so models over 2 GB work.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::Write;

use half::f16;
use prost::Message;
use tract_onnx::pb;

/// Alignment of each tensor in the external data file.
pub const DATA_ALIGNMENT: u64 = 64;
/// Initializers smaller than this stay inside `model.onnx`.
const INLINE_LIMIT: usize = 1024;
/// The ONNX opset the graphs use (default domain).
pub const OPSET: i64 = 21;
/// IR version that goes with opset 21.
const IR_VERSION: i64 = 10;

/// Element types kiln writes.
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    I64,
    I32,
    I8,
    U8,
    I4,
    U4,
    Bool,
}

impl DType {
    /// The ONNX `TensorProto.DataType` code.
    pub fn onnx(self) -> i32 {
        use pb::tensor_proto::DataType as D;
        (match self {
            DType::F32 => D::Float,
            DType::F16 => D::Float16,
            DType::I64 => D::Int64,
            DType::I32 => D::Int32,
            DType::I8 => D::Int8,
            DType::U8 => D::Uint8,
            DType::I4 => D::Int4,
            DType::U4 => D::Uint4,
            DType::Bool => D::Bool,
        }) as i32
    }
}

/// One dimension of a graph input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    /// A known size.
    Fixed(i64),
    /// A named symbolic size (`batch_size`, `sequence_length`, …).
    Symbol(String),
}

/// A node attribute value.
#[allow(missing_docs)]
#[derive(Debug, Clone)]
pub enum Attr {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
}

/// Bytes of an initializer, already in ONNX layout (4-bit values packed two per byte,
/// low nibble first).
#[derive(Debug, Clone)]
pub struct TensorData {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub dims: Vec<i64>,
    /// Raw little-endian bytes.
    pub bytes: Vec<u8>,
}

impl TensorData {
    /// An f32 tensor.
    pub fn f32(dims: &[usize], values: &[f32]) -> Self {
        TensorData {
            dtype: DType::F32,
            dims: to_i64(dims),
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// An f16 tensor from f32 values (rounded to nearest).
    pub fn f16(dims: &[usize], values: &[f32]) -> Self {
        let bytes = values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect();
        TensorData { dtype: DType::F16, dims: to_i64(dims), bytes }
    }

    /// An i64 tensor.
    pub fn i64(dims: &[usize], values: &[i64]) -> Self {
        TensorData {
            dtype: DType::I64,
            dims: to_i64(dims),
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// 8-bit codes (`I8` or `U8`), one byte each.
    pub fn bytes8(dtype: DType, dims: &[usize], codes: Vec<u8>) -> Self {
        TensorData { dtype, dims: to_i64(dims), bytes: codes }
    }

    /// 4-bit codes (`I4` or `U4`) given one per byte; packed two per byte.
    pub fn bytes4(dtype: DType, dims: &[usize], codes: &[u8]) -> Self {
        let bytes = codes.chunks(2).map(|p| (p[0] & 0xF) | (p.get(1).copied().unwrap_or(0) & 0xF) << 4).collect();
        TensorData { dtype, dims: to_i64(dims), bytes }
    }

    /// Number of elements.
    pub fn elements(&self) -> usize {
        self.dims.iter().product::<i64>() as usize
    }
}

fn to_i64(dims: &[usize]) -> Vec<i64> {
    dims.iter().map(|&d| d as i64).collect()
}

/// Builds one ONNX graph.
#[derive(Default)]
pub struct GraphBuilder {
    nodes: Vec<pb::NodeProto>,
    inputs: Vec<pb::ValueInfoProto>,
    outputs: Vec<pb::ValueInfoProto>,
    initializers: Vec<(String, TensorData)>,
    names: HashSet<String>,
    constants: HashMap<String, String>,
    domains: BTreeSet<String>,
}

/// Sizes of what [`GraphBuilder::write`] wrote, and where each external initializer lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// Bytes of `model.onnx`.
    pub graph_bytes: u64,
    /// Bytes of the external data file.
    pub data_bytes: u64,
    /// Offset and length in the data file, by initializer name.
    pub placed: HashMap<String, (u64, u64)>,
}

impl GraphBuilder {
    /// Declares a graph input.
    pub fn input(&mut self, name: &str, dtype: DType, dims: &[Dim]) -> String {
        self.claim(name);
        self.inputs.push(value_info(name, dtype, dims));
        name.to_string()
    }

    /// Declares an existing value as a graph output.
    pub fn output(&mut self, name: &str, dtype: DType, dims: &[Dim]) {
        self.outputs.push(value_info(name, dtype, dims));
    }

    /// Adds an initializer under `name` and returns the name.
    pub fn initializer(&mut self, name: &str, data: TensorData) -> String {
        self.claim(name);
        self.initializers.push((name.to_string(), data));
        name.to_string()
    }

    /// A small constant tensor (shared between users of the same value).
    pub fn constant(&mut self, data: TensorData) -> String {
        let key = format!("{:?}/{:?}/{:?}", data.dtype, data.dims, data.bytes);
        if let Some(name) = self.constants.get(&key) {
            return name.clone();
        }
        let name = format!("/const/{}", self.constants.len());
        self.initializer(&name, data);
        self.constants.insert(key, name.clone());
        name
    }

    /// A 1-D i64 constant.
    pub fn ints(&mut self, values: &[i64]) -> String {
        self.constant(TensorData::i64(&[values.len()], values))
    }

    /// A scalar f32 constant.
    pub fn scalar(&mut self, value: f32) -> String {
        self.constant(TensorData::f32(&[], &[value]))
    }

    /// A scalar i64 constant.
    pub fn scalar_i64(&mut self, value: i64) -> String {
        self.constant(TensorData::i64(&[], &[value]))
    }

    /// Adds node `name` (`op_type`, default domain) and returns its output `name/output_0`.
    pub fn op(&mut self, op_type: &str, name: &str, inputs: &[&str], attrs: &[(&str, Attr)]) -> String {
        let out = format!("{name}/output_0");
        self.op_to(op_type, name, inputs, attrs, &out);
        out
    }

    /// Adds node `name` whose single output is called `output`.
    pub fn op_to(&mut self, op_type: &str, name: &str, inputs: &[&str], attrs: &[(&str, Attr)], output: &str) {
        self.op_in("", op_type, name, inputs, attrs, &[output]);
    }

    /// Adds node `name` of operator set `domain` (`""` for the default one) with the given
    /// outputs; an empty input or output name skips an optional one.
    pub fn op_in(
        &mut self,
        domain: &str,
        op_type: &str,
        name: &str,
        inputs: &[&str],
        attrs: &[(&str, Attr)],
        outputs: &[&str],
    ) {
        self.claim(name);
        for output in outputs.iter().filter(|o| !o.is_empty()) {
            self.claim(output);
        }
        if !domain.is_empty() {
            self.domains.insert(domain.to_string());
        }
        self.nodes.push(pb::NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            name: name.to_string(),
            op_type: op_type.to_string(),
            domain: domain.to_string(),
            attribute: attrs.iter().map(|(n, a)| attribute(n, a)).collect(),
            ..Default::default()
        });
    }

    /// Total bytes of initializers by element type.
    pub fn bytes_by_dtype(&self) -> Vec<(DType, u64)> {
        let mut out: Vec<(DType, u64)> = Vec::new();
        for (_, t) in &self.initializers {
            match out.iter_mut().find(|(d, _)| *d == t.dtype) {
                Some((_, n)) => *n += t.bytes.len() as u64,
                None => out.push((t.dtype, t.bytes.len() as u64)),
            }
        }
        out
    }

    /// Writes the model (graph to `graph`, large initializers to `data`, which the graph
    /// refers to as `data_location`).
    pub fn write(
        &self,
        graph_name: &str,
        data_location: &str,
        graph: &mut dyn Write,
        data: &mut dyn Write,
    ) -> std::io::Result<Written> {
        let mut offset = 0u64;
        let mut placed = HashMap::new();
        for (name, t) in &self.initializers {
            if t.bytes.len() >= INLINE_LIMIT {
                let pad = offset.next_multiple_of(DATA_ALIGNMENT) - offset;
                data.write_all(&vec![0u8; pad as usize])?;
                offset += pad;
                data.write_all(&t.bytes)?;
                placed.insert(name.clone(), (offset, t.bytes.len() as u64));
                offset += t.bytes.len() as u64;
            }
        }
        let graph_bytes = self.write_graph(graph_name, data_location, &placed, graph)?;
        Ok(Written { graph_bytes, data_bytes: offset, placed })
    }

    /// Writes only the graph, its large initializers referring to a data file that another
    /// graph with the same initializers already wrote (`placed`, from its [`Written`]), so
    /// two graphs share one copy of the weights. Returns the graph's size in bytes.
    pub fn write_graph(
        &self,
        graph_name: &str,
        data_location: &str,
        placed: &HashMap<String, (u64, u64)>,
        graph: &mut dyn Write,
    ) -> std::io::Result<u64> {
        let mut initializer = Vec::with_capacity(self.initializers.len());
        for (name, t) in &self.initializers {
            let mut proto = pb::TensorProto {
                name: name.clone(),
                dims: t.dims.clone(),
                data_type: t.dtype.onnx(),
                ..Default::default()
            };
            if t.bytes.len() < INLINE_LIMIT {
                proto.raw_data = t.bytes.clone();
            } else {
                let (offset, length) = match placed.get(name) {
                    Some(&(offset, length)) if length == t.bytes.len() as u64 => (offset, length),
                    _ => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("initializer {name} is not in {data_location} with {} bytes", t.bytes.len()),
                        ))
                    }
                };
                proto.data_location = Some(pb::tensor_proto::DataLocation::External as i32);
                proto.external_data = vec![
                    entry("location", data_location),
                    entry("offset", &offset.to_string()),
                    entry("length", &length.to_string()),
                ];
            }
            initializer.push(proto);
        }
        let mut opset_import = vec![pb::OperatorSetIdProto { domain: String::new(), version: OPSET }];
        opset_import.extend(self.domains.iter().map(|d| pb::OperatorSetIdProto { domain: d.clone(), version: 1 }));
        let model = pb::ModelProto {
            ir_version: IR_VERSION,
            opset_import,
            producer_name: "kiln".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(pb::GraphProto {
                name: graph_name.into(),
                node: self.nodes.clone(),
                initializer,
                input: self.inputs.clone(),
                output: self.outputs.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let bytes = model.encode_to_vec();
        graph.write_all(&bytes)?;
        Ok(bytes.len() as u64)
    }

    fn claim(&mut self, name: &str) {
        // Names come from kiln's own code, never from input files: a clash is a bug.
        assert!(self.names.insert(name.to_string()), "ONNX name {name} used twice");
    }
}

fn entry(key: &str, value: &str) -> pb::StringStringEntryProto {
    pb::StringStringEntryProto { key: key.into(), value: value.into() }
}

fn value_info(name: &str, dtype: DType, dims: &[Dim]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(n) => Value::DimValue(*n),
                Dim::Symbol(s) => Value::DimParam(s.clone()),
            }),
            ..Default::default()
        })
        .collect();
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: dtype.onnx(),
                shape: Some(pb::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn attribute(name: &str, a: &Attr) -> pb::AttributeProto {
    use pb::attribute_proto::AttributeType as T;
    let mut p = pb::AttributeProto { name: name.into(), ..Default::default() };
    match a {
        Attr::Int(i) => {
            p.i = *i;
            p.r#type = T::Int as i32;
        }
        Attr::Float(f) => {
            p.f = *f;
            p.r#type = T::Float as i32;
        }
        Attr::Ints(v) => {
            p.ints = v.clone();
            p.r#type = T::Ints as i32;
        }
    }
    p
}
