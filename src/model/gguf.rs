//! GGUF reader: header, metadata, tensor infos and memory-mapped tensor data.
//!
//! Format (GGUF v2/v3, little-endian): magic `GGUF`, version u32, tensor count u64,
//! metadata count u64, then metadata entries (key string, value type u32, value), then
//! tensor infos (name, n_dims u32, dims u64 × n_dims, type u32, offset u64), then padding
//! to `general.alignment` (default 32) and the tensor data. Dims are listed fastest first
//! (llama.cpp's `ne`), so a `[out, in]` matrix is stored with dims `[in, out]`.
//!
//! Every count and length read from the file is checked against the bytes that remain
//! before anything is allocated: a hostile header gets an error, never a huge allocation.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::ggml::{self, GgmlType};
use super::LoadError;

/// The largest number of dimensions a GGML tensor has.
const MAX_DIMS: u32 = 4;
/// Nesting limit for array values (real files nest at most once).
const MAX_ARRAY_DEPTH: usize = 4;
const DEFAULT_ALIGNMENT: u64 = 32;

/// One metadata value.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, when it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, when it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float (floats and integers).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }
}

impl fmt::Display for Value {
    /// Short form for listings: arrays print their length and first elements.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::String(s) if s.len() > 60 => {
                let cut: String = s.chars().take(57).collect();
                write!(f, "{cut:?}…")
            }
            Value::String(s) => write!(f, "{s:?}"),
            Value::Array(a) => {
                write!(f, "[{} × ", a.len())?;
                match a.first() {
                    Some(v) => write!(f, "{}]", v.type_name()),
                    None => write!(f, "?]"),
                }
            }
            Value::Bool(b) => write!(f, "{b}"),
            Value::F32(v) => write!(f, "{v}"),
            Value::F64(v) => write!(f, "{v}"),
            other => write!(f, "{}", other.as_i64().unwrap_or_default()),
        }
    }
}

/// Where a tensor is and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Name as written in the file (llama.cpp naming, e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions, fastest first (GGML order).
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Size of the data in bytes.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Dimensions in row-major order (slowest first), as ndarray and safetensors use.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// An open GGUF file.
pub struct GgufFile {
    path: PathBuf,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata, sorted by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
    bytes: Bytes,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and memory-maps `path`, parsing and checking the header and tensor infos.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let io = |source| LoadError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; a file truncated by another process while mapped
        // is outside what this reader can guard against (as for every mmap-based loader).
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, Bytes::Mapped(map))
    }

    /// Parses an in-memory GGUF image; `path` is used in error messages only.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self, LoadError> {
        Self::parse(path, Bytes::Owned(bytes))
    }

    fn parse(path: &Path, bytes: Bytes) -> Result<Self, LoadError> {
        let mut r = Reader { buf: &bytes, pos: 0, path };
        let magic = r.take(4)?;
        if magic != b"GGUF" {
            return Err(r.error(format!("not a GGUF file: magic bytes {magic:02x?}, expected \"GGUF\"")));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(r.error(format!("GGUF version {version} is not supported (2 and 3 are)")));
        }
        let tensor_count = r.count(8 + 4 + 4 + 8, "tensor count")?;
        let kv_count = r.count(8 + 4, "metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r.value(ty, 0).map_err(|e| e.context(&format!("metadata {key}")))?;
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => return Err(r.error(format!("general.alignment = {v} is not a power of two"))),
            },
        };
        let mut tensors = Vec::with_capacity(tensor_count);
        for _ in 0..tensor_count {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(r.error(format!("tensor {name}: {n_dims} dimensions (1 to {MAX_DIMS} allowed)")));
            }
            let dims = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
            let ty_id = r.u32()?;
            let ty =
                GgmlType::from_id(ty_id).map_err(|t| r.error(format!("tensor {name}: unsupported tensor type {t}")))?;
            let offset = r.u64()?;
            let elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| r.error(format!("tensor {name}: dims {dims:?} overflow")))?;
            let size =
                ty.bytes_for(elements).filter(|_| dims[0] % ty.block_layout().0 as u64 == 0).ok_or_else(|| {
                    r.error(format!(
                        "tensor {name}: first dimension {} is not a multiple of the {} block size {}",
                        dims[0],
                        ty.name(),
                        ty.block_layout().0
                    ))
                })?;
            if offset % alignment != 0 {
                return Err(r.error(format!("tensor {name}: offset {offset} is not aligned to {alignment}")));
            }
            tensors.push(TensorInfo { name, dims, ty, offset, size });
        }
        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
        let data_len = (bytes.len() as u64).saturating_sub(data_start);
        for t in &tensors {
            let end = t.offset.checked_add(t.size);
            if end.is_none_or(|end| end > data_len) {
                return Err(r.error(format!(
                    "tensor {}: data [{}, +{}) runs past the end of the file (data section is {} bytes): truncated file?",
                    t.name, t.offset, t.size, data_len
                )));
            }
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = tensors.iter().find(|t| !seen.insert(t.name.as_str())) {
            return Err(r.error(format!("tensor {} appears twice", dup.name)));
        }
        Ok(GgufFile { path: path.to_path_buf(), version, metadata, tensors, data_start: data_start as usize, bytes })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensor info for `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = self.data_start + info.offset as usize;
        &self.bytes[start..start + info.size as usize]
    }

    /// Dequantizes the tensor `name` to f32, row-major.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, LoadError> {
        let info = self
            .tensor(name)
            .ok_or_else(|| LoadError::MissingTensor { path: self.path.clone(), tensor: name.to_string() })?;
        let mut out = vec![0f32; info.elements() as usize];
        ggml::dequantize(info.ty, self.tensor_bytes(info), &mut out).map_err(|reason| LoadError::Format {
            path: self.path.clone(),
            reason: format!("tensor {name}: {reason}"),
        })?;
        Ok(out)
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn error(&self, reason: String) -> LoadError {
        LoadError::Format { path: self.path.to_path_buf(), reason }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], LoadError> {
        if n > self.remaining() {
            return Err(self.error(format!(
                "truncated: needed {n} bytes at offset {}, {} left",
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], LoadError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, LoadError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, LoadError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count of items of at least `min_item_bytes` each, checked against what remains.
    fn count(&mut self, min_item_bytes: usize, what: &str) -> Result<usize, LoadError> {
        let n = self.u64()?;
        if n > (self.remaining() / min_item_bytes) as u64 {
            return Err(self.error(format!(
                "{what} {n} cannot fit in the {} bytes that remain: corrupt or truncated header",
                self.remaining()
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String, LoadError> {
        let len = self.u64()?;
        if len > self.remaining() as u64 {
            return Err(
                self.error(format!("string of {len} bytes at offset {} runs past the end of the file", self.pos))
            );
        }
        let at = self.pos;
        let raw = self.take(len as usize)?;
        String::from_utf8(raw.to_vec()).map_err(|_| self.error(format!("string at offset {at} is not UTF-8")))
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, LoadError> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(u32::from_le_bytes(self.array()?)),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.error(format!("bool byte {b} is neither 0 nor 1"))),
            },
            8 => Value::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.error(format!("arrays nested deeper than {MAX_ARRAY_DEPTH}")));
                }
                let elem_ty = self.u32()?;
                // Every element takes at least one byte (strings at least 8), so the
                // count is bounded by the bytes that remain.
                let min = match elem_ty {
                    8 => 8,
                    9 => 12,
                    _ => 1,
                };
                let n = self.count(min, "array length")?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem_ty, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(u64::from_le_bytes(self.array()?)),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(self.error(format!("unknown value type {other}"))),
        })
    }
}
