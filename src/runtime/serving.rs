//! The serving graph (`serving.onnx`) in ONNX Runtime, with the KV cache in buffers sized
//! once, `slots × context` positions per layer, that each run binds as both the
//! `past_key_values.*` inputs and the `present.*` outputs of GroupQueryAttention: a decode
//! step writes its one new position in place and nothing is copied or reallocated.
//!
//! Slot `s` is row `s` of every buffer (`[slots, kv_heads, context, head_dim]`, slot-major),
//! so one slot, or slots `0..n`, is a contiguous region that ONNX Runtime can read and
//! write directly.

use std::ffi::CStr;
use std::path::Path;
use std::ptr::NonNull;

use ndarray::{Array2, Ix3};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{OutputSelector, RunOptions, Session};
use ort::value::{DynValue, Tensor, Value};
use ort::AsPointer;

use super::{open_session, read_manifest, Forward, RuntimeError, SessionOptions};
use crate::onnx::decoder::GraphForm;
use crate::onnx::manifest::{self, Manifest};

/// An artifact's serving graph with its KV buffers.
pub struct ServingDecoder {
    session: Session,
    manifest: Manifest,
    slots: usize,
    context: usize,
    /// Per layer, keys then values, each `[slots, kv_heads, context, head_dim]`.
    kv: Vec<[Vec<f32>; 2]>,
    memory: MemoryInfo<'static>,
    allocator: Allocator,
}

impl ServingDecoder {
    /// Opens `dir/serving.onnx` with KV buffers for `slots` sequences of up to `context`
    /// positions each (at most the artifact's `max_context`).
    pub fn open(dir: &Path, opts: &SessionOptions, slots: usize, context: usize) -> Result<Self, RuntimeError> {
        let manifest = read_manifest(dir)?;
        let bad = |reason: String| RuntimeError::Artifact { path: dir.to_path_buf(), reason };
        if slots == 0 || context == 0 {
            return Err(bad(format!("slots ({slots}) and context ({context}) must be at least 1")));
        }
        if context > manifest.max_context {
            return Err(bad(format!(
                "context {context} is longer than the artifact's max_context {}",
                manifest.max_context
            )));
        }
        let c = &manifest.config;
        if c.head_dim % 16 != 0 {
            return Err(bad(format!(
                "head_dim {}: ONNX Runtime's GroupQueryAttention (serving.onnx) needs a multiple of 16",
                c.head_dim
            )));
        }
        let session = open_session(&dir.join(manifest::SERVING_FILE), GraphForm::Serving, opts)?;
        let len = slots * c.num_kv_heads * context * c.head_dim;
        let kv = (0..c.num_layers).map(|_| [vec![0f32; len], vec![0f32; len]]).collect();
        let run =
            |e: ort::Error| RuntimeError::Session { path: dir.join(manifest::SERVING_FILE), reason: e.to_string() };
        let memory =
            MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default).map_err(run)?;
        Ok(ServingDecoder { session, manifest, slots, context, kv, memory, allocator: Allocator::default() })
    }

    /// The artifact's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Bytes of the KV buffers.
    pub fn kv_bytes(&self) -> usize {
        self.kv.iter().map(|[k, v]| (k.len() + v.len()) * 4).sum()
    }

    fn per_slot(&self) -> usize {
        let c = &self.manifest.config;
        c.num_kv_heads * self.context * c.head_dim
    }

    /// Runs slots `first..first + rows`, `seq` new tokens each (`ids` row-major),
    /// `seqlens[r]` = total length of row r − 1 (its new tokens take the last `seq`
    /// positions); returns the logits of each row's last `last` tokens, `[rows × last, vocab]`.
    fn run(
        &mut self,
        first: usize,
        rows: usize,
        seq: usize,
        ids: Vec<i64>,
        seqlens: Vec<i32>,
        last: usize,
    ) -> Result<Array2<f32>, RuntimeError> {
        let err = |e: ort::Error| RuntimeError::Run(e.to_string());
        let total = seqlens.iter().max().map_or(0, |m| m + 1);
        let mut feeds: Vec<(String, DynValue)> = vec![
            ("input_ids".into(), Tensor::from_array(([rows, seq], ids)).map_err(err)?.into_dyn()),
            ("seqlens_k".into(), Tensor::from_array(([rows], seqlens)).map_err(err)?.into_dyn()),
            ("total_sequence_length".into(), Tensor::from_array(ndarray::arr0(total)).map_err(err)?.into_dyn()),
            ("logits_to_keep".into(), Tensor::from_array(([1], vec![last as i64])).map_err(err)?.into_dyn()),
        ];
        let c = &self.manifest.config;
        let shape = [rows as i64, c.num_kv_heads as i64, self.context as i64, c.head_dim as i64];
        let region = first * self.per_slot()..(first + rows) * self.per_slot();
        let mut outputs = OutputSelector::default();
        for (i, [k, v]) in self.kv.iter_mut().enumerate() {
            for (buffer, kind) in [(k, "key"), (v, "value")] {
                let data = &mut buffer[region.clone()];
                // SAFETY: the buffers are never resized, and both values are dropped before
                // this function returns, while `self.kv` is still borrowed.
                let (past, present) = unsafe {
                    (
                        in_place(&self.memory, &self.allocator, data, shape)?,
                        in_place(&self.memory, &self.allocator, data, shape)?,
                    )
                };
                feeds.push((format!("past_key_values.{i}.{kind}"), past));
                outputs = outputs.preallocate(format!("present.{i}.{kind}"), present);
            }
        }
        let options = RunOptions::new().map_err(err)?.with_outputs(outputs);
        let out = self.session.run_with_options(feeds, &options).map_err(err)?;
        let logits = out["logits"]
            .try_extract_array::<f32>()
            .map_err(err)?
            .into_dimensionality::<Ix3>()
            .map_err(|e| RuntimeError::Run(format!("logits: {e}")))?;
        let vocab = logits.shape()[2];
        let rows_out = logits.to_shape((rows * last, vocab)).map_err(|e| RuntimeError::Run(format!("logits: {e}")))?;
        Ok(rows_out.to_owned())
    }
}

/// An ONNX Runtime tensor over `data` itself (no copy), with `shape`.
///
/// # Safety
/// `data` must stay alive and unmoved for as long as the returned value is used.
unsafe fn in_place(
    memory: &MemoryInfo<'_>,
    allocator: &Allocator,
    data: &mut [f32],
    shape: [i64; 4],
) -> Result<DynValue, RuntimeError> {
    let api = ort::api();
    let mut value: *mut ort::sys::OrtValue = std::ptr::null_mut();
    // SAFETY: `data` is valid for `data.len()` f32 values, the shape has 4 entries and
    // describes exactly `data.len()` elements (checked by ONNX Runtime).
    let status = unsafe {
        (api.CreateTensorWithDataAsOrtValue)(
            memory.ptr(),
            data.as_mut_ptr().cast(),
            std::mem::size_of_val(data),
            shape.as_ptr(),
            shape.len(),
            ort::sys::ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
            &mut value,
        )
    };
    if !status.0.is_null() {
        // SAFETY: a non-null status is a valid OrtStatus whose message lives until released.
        let message = unsafe {
            let m = CStr::from_ptr((api.GetErrorMessage)(status.0)).to_string_lossy().into_owned();
            (api.ReleaseStatus)(status.0);
            m
        };
        return Err(RuntimeError::Run(format!("KV buffer view: {message}")));
    }
    let value = NonNull::new(value).ok_or_else(|| RuntimeError::Run("KV buffer view: null value".into()))?;
    // SAFETY: `value` is a tensor just created on the CPU; the allocator is the CPU one.
    Ok(unsafe { Value::from_ptr(value, Some(allocator)) })
}

impl Forward for ServingDecoder {
    fn slots(&self) -> usize {
        self.slots
    }

    fn max_context(&self) -> usize {
        self.context
    }

    fn vocab_size(&self) -> usize {
        self.manifest.config.vocab_size
    }

    fn extend(&mut self, slot: usize, past: usize, tokens: &[u32], last: usize) -> Result<Array2<f32>, RuntimeError> {
        if slot >= self.slots || tokens.is_empty() || past + tokens.len() > self.context || last > tokens.len() {
            return Err(RuntimeError::Run(format!(
                "extend: slot {slot} of {}, {} tokens after {past} (context {}), last {last}",
                self.slots,
                tokens.len(),
                self.context
            )));
        }
        let ids = tokens.iter().map(|&t| t as i64).collect();
        let seqlens = vec![(past + tokens.len() - 1) as i32];
        self.run(slot, 1, tokens.len(), ids, seqlens, last)
    }

    fn prefill_rows(&mut self, first: usize, prompts: &[&[u32]]) -> Result<Array2<f32>, RuntimeError> {
        let len = prompts.first().map_or(0, |p| p.len());
        if len == 0
            || len > self.context
            || first + prompts.len() > self.slots
            || prompts.iter().any(|p| p.len() != len)
        {
            return Err(RuntimeError::Run(format!(
                "prefill_rows: {} prompts of {len} tokens (all the same, at most context {}) from slot {first} of {}",
                prompts.len(),
                self.context,
                self.slots
            )));
        }
        let ids = prompts.iter().flat_map(|p| p.iter().map(|&t| t as i64)).collect();
        self.run(first, prompts.len(), len, ids, vec![(len - 1) as i32; prompts.len()], 1)
    }

    fn step(&mut self, rows: &[(u32, usize)]) -> Result<Array2<f32>, RuntimeError> {
        if rows.is_empty() || rows.len() > self.slots || rows.iter().any(|&(_, past)| past >= self.context) {
            return Err(RuntimeError::Run(format!(
                "step: {} rows for {} slots, context {}",
                rows.len(),
                self.slots,
                self.context
            )));
        }
        let ids = rows.iter().map(|&(t, _)| t as i64).collect();
        let seqlens = rows.iter().map(|&(_, p)| p as i32).collect();
        self.run(0, rows.len(), 1, ids, seqlens, 1)
    }

    fn move_slot(&mut self, from: usize, to: usize, len: usize) -> Result<(), RuntimeError> {
        if from >= self.slots || to >= self.slots || len > self.context {
            return Err(RuntimeError::Run(format!("move_slot {from} → {to} ({len} positions) of {}", self.slots)));
        }
        if from == to {
            return Ok(());
        }
        let c = &self.manifest.config;
        let (per_slot, context, hd) = (self.per_slot(), self.context, c.head_dim);
        for buffer in self.kv.iter_mut().flat_map(|kv| kv.iter_mut()) {
            for head in 0..c.num_kv_heads {
                let src = from * per_slot + head * context * hd;
                let dst = to * per_slot + head * context * hd;
                buffer.copy_within(src..src + len * hd, dst);
            }
        }
        Ok(())
    }
}
