//! The serving graph (`serving.onnx`) in ONNX Runtime, with the KV cache in buffers sized
//! once, `slots × context` positions per layer, that each run binds as both the
//! `past_key_values.*` inputs and the `present.*` outputs of GroupQueryAttention: a decode
//! step writes its one new position in place and nothing is copied or reallocated.
//!
//! On CUDA and TensorRT the buffers are contiguous: slot `s` is row `s` of every buffer
//! (`[slots, kv_heads, context, head_dim]`, slot-major), so one slot, or slots `0..n`, is a
//! region that ONNX Runtime's GroupQueryAttention reads and writes directly. On the CPU they
//! are paged: a pool of blocks (`[kv_heads, blocks, block_size, head_dim]`) that kiln's
//! attention kernel reads through each slot's block table (input `block_table`,
//! `[rows, blocks per slot]` i32). A paged decoder starts with every slot owning blocks for
//! its whole context; the engine, which owns the pool's bookkeeping
//! ([`crate::engine::kv`]), gives slots other tables with [`Forward::bind_blocks`]. The
//! buffers hold f32, or f16 on the CPU ([`KvCache`]).

use std::ffi::CStr;
use std::path::Path;
use std::ptr::NonNull;

use half::f16;
use ndarray::{Array2, Ix3};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{OutputSelector, RunOptions, Session};
use ort::value::{DynValue, PrimitiveTensorElementType, Tensor, Value};
use ort::AsPointer;

use super::{open_session, read_manifest, Forward, KvCache, KvPool, Provider, RuntimeError, SessionOptions};
use crate::onnx::decoder::GraphForm;
use crate::onnx::manifest::{self, Manifest};

/// An artifact's serving graph with its KV buffers.
pub struct ServingDecoder {
    session: Session,
    manifest: Manifest,
    slots: usize,
    context: usize,
    kv: KvBuffers,
    /// The block tables of a paged cache.
    paged: Option<Paged>,
    memory: MemoryInfo<'static>,
    allocator: Allocator,
}

/// A paged cache's shape and block tables.
struct Paged {
    /// Positions per block.
    block: usize,
    /// Blocks in the pool.
    blocks: usize,
    /// Entries per slot's table: blocks for `context` positions.
    width: usize,
    /// `[slots, width]`.
    tables: Vec<i32>,
}

/// Positions per block of a paged cache.
pub const BLOCK_SIZE: usize = crate::engine::kv::BLOCK_SIZE;

impl ServingDecoder {
    /// Opens `dir/serving.onnx` with KV buffers for `slots` sequences of up to `context`
    /// positions each (at most the artifact's `max_context`): paged on the CPU, each slot
    /// owning the blocks of its whole context; contiguous elsewhere.
    pub fn open(dir: &Path, opts: &SessionOptions, slots: usize, context: usize) -> Result<Self, RuntimeError> {
        Self::open_with(dir, opts, slots, context, None)
    }

    /// As [`open`](Self::open), on the CPU with a pool of `blocks` blocks of [`BLOCK_SIZE`]
    /// positions shared by the slots (their tables set by [`Forward::bind_blocks`]).
    pub fn open_pool(
        dir: &Path,
        opts: &SessionOptions,
        slots: usize,
        context: usize,
        blocks: usize,
    ) -> Result<Self, RuntimeError> {
        Self::open_with(dir, opts, slots, context, Some(blocks))
    }

    fn open_with(
        dir: &Path,
        opts: &SessionOptions,
        slots: usize,
        context: usize,
        blocks: Option<usize>,
    ) -> Result<Self, RuntimeError> {
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
        let cache = opts.kv_cache.unwrap_or_else(|| KvCache::default_for(&manifest, opts));
        if cache == KvCache::F16 && opts.provider != Provider::Cpu {
            return Err(bad(format!("an f16 KV cache runs on the CPU only, not {}", opts.provider.name())));
        }
        let cpu = opts.provider == Provider::Cpu && !opts.contiguous_kv;
        if blocks.is_some() && !cpu {
            return Err(bad(format!(
                "a paged KV cache runs on the CPU only (not {}) and not with a contiguous KV layout",
                opts.provider.name()
            )));
        }
        let width = context.div_ceil(BLOCK_SIZE);
        let paged = cpu.then(|| {
            let blocks = blocks.unwrap_or(slots * width);
            // Slot s owns blocks s · width .. until the engine binds others.
            let tables = (0..slots * width).map(|i| if blocks == slots * width { i as i32 } else { 0 }).collect();
            Paged { block: BLOCK_SIZE, blocks, width, tables }
        });
        if paged.as_ref().is_some_and(|p| p.blocks == 0) {
            return Err(bad("a KV pool of 0 blocks".into()));
        }
        let opts = SessionOptions { kv_cache: Some(cache), ..opts.clone() };
        let session = open_session(&dir.join(manifest::SERVING_FILE), GraphForm::Serving, &opts, paged.is_some())?;
        let positions = paged.as_ref().map_or(slots * context, |p| p.blocks * p.block);
        let len = positions * c.num_kv_heads * c.head_dim;
        let kv = match cache {
            KvCache::F32 => KvBuffers::F32((0..2 * c.num_layers).map(|_| vec![0.0; len]).collect()),
            KvCache::F16 => KvBuffers::F16((0..2 * c.num_layers).map(|_| vec![f16::ZERO; len]).collect()),
        };
        let run =
            |e: ort::Error| RuntimeError::Session { path: dir.join(manifest::SERVING_FILE), reason: e.to_string() };
        let memory =
            MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default).map_err(run)?;
        Ok(ServingDecoder { session, manifest, slots, context, kv, paged, memory, allocator: Allocator::default() })
    }

    /// Bytes of one paged KV block (keys and values of every layer) of the artifact of
    /// `manifest` opened with `opts`.
    pub fn block_bytes(manifest: &Manifest, opts: &SessionOptions) -> usize {
        let cache = opts.kv_cache.unwrap_or_else(|| KvCache::default_for(manifest, opts));
        pool_block_bytes(manifest, cache)
    }

    /// The artifact's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Bytes of the KV buffers.
    pub fn kv_bytes(&self) -> usize {
        match &self.kv {
            KvBuffers::F32(b) => b.iter().map(|b| size_of_val(b.as_slice())).sum(),
            KvBuffers::F16(b) => b.iter().map(|b| size_of_val(b.as_slice())).sum(),
        }
    }

    /// The KV cache's element type.
    pub fn kv_cache(&self) -> KvCache {
        match self.kv {
            KvBuffers::F32(_) => KvCache::F32,
            KvBuffers::F16(_) => KvCache::F16,
        }
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
        let (kvh, d) = (c.num_kv_heads as i64, c.head_dim as i64);
        let (shape, region) = match &self.paged {
            Some(p) => {
                let table = p.tables[first * p.width..(first + rows) * p.width].to_vec();
                let table = Tensor::from_array(([rows, p.width], table)).map_err(err)?.into_dyn();
                feeds.push(("block_table".into(), table));
                ([kvh, p.blocks as i64, p.block as i64, d], 0..p.blocks * p.block * (kvh * d) as usize)
            }
            None => {
                ([rows as i64, kvh, self.context as i64, d], first * self.per_slot()..(first + rows) * self.per_slot())
            }
        };
        let mut outputs = OutputSelector::default();
        // SAFETY: the buffers are never resized, and the views are dropped before this
        // function returns, while `self.kv` is still borrowed.
        let views = unsafe {
            match &mut self.kv {
                KvBuffers::F32(b) => views(b, region, shape, &self.memory, &self.allocator)?,
                KvBuffers::F16(b) => views(b, region, shape, &self.memory, &self.allocator)?,
            }
        };
        for (i, [past, present]) in views.into_iter().enumerate() {
            let (layer, kind) = (i / 2, if i % 2 == 0 { "key" } else { "value" });
            feeds.push((format!("past_key_values.{layer}.{kind}"), past));
            outputs = outputs.preallocate(format!("present.{layer}.{kind}"), present);
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

/// Bytes of one block of [`BLOCK_SIZE`] positions: keys and values of every layer, of `cache`.
fn pool_block_bytes(manifest: &Manifest, cache: KvCache) -> usize {
    let c = &manifest.config;
    2 * c.num_layers * c.num_kv_heads * BLOCK_SIZE * c.head_dim * cache.element_bytes()
}

/// The KV buffers: per layer keys then values, each `[slots, kv_heads, context, head_dim]`.
enum KvBuffers {
    F32(Vec<Vec<f32>>),
    F16(Vec<Vec<f16>>),
}

/// Two ONNX Runtime tensors (past and present) over `region` of each buffer, in order.
///
/// # Safety
/// The buffers must stay alive and unmoved for as long as the returned values are used.
unsafe fn views<T: PrimitiveTensorElementType>(
    buffers: &mut [Vec<T>],
    region: std::ops::Range<usize>,
    shape: [i64; 4],
    memory: &MemoryInfo<'_>,
    allocator: &Allocator,
) -> Result<Vec<[DynValue; 2]>, RuntimeError> {
    let mut out = Vec::with_capacity(buffers.len());
    for buffer in buffers {
        let data = &mut buffer[region.clone()];
        // SAFETY: the caller keeps `data` alive and unmoved while the views are used.
        unsafe {
            out.push([in_place(memory, allocator, data, shape)?, in_place(memory, allocator, data, shape)?]);
        }
    }
    Ok(out)
}

/// Copies the first `len` values of each KV head of slot `from` to slot `to`, in every
/// buffer (`heads` heads of equal size per slot of `per_slot` values).
fn move_positions<T: Copy>(buffers: &mut [Vec<T>], from: usize, to: usize, len: usize, per_slot: usize, heads: usize) {
    let per_head = per_slot / heads;
    for buffer in buffers {
        for head in 0..heads {
            let (src, dst) = (from * per_slot + head * per_head, to * per_slot + head * per_head);
            buffer.copy_within(src..src + len, dst);
        }
    }
}

/// An ONNX Runtime tensor over `data` itself (no copy), with `shape`.
///
/// # Safety
/// `data` must stay alive and unmoved for as long as the returned value is used.
unsafe fn in_place<T: PrimitiveTensorElementType>(
    memory: &MemoryInfo<'_>,
    allocator: &Allocator,
    data: &mut [T],
    shape: [i64; 4],
) -> Result<DynValue, RuntimeError> {
    let api = ort::api();
    let mut value: *mut ort::sys::OrtValue = std::ptr::null_mut();
    // SAFETY: `data` is valid for `data.len()` values of `T`, the shape has 4 entries and
    // describes exactly `data.len()` elements (checked by ONNX Runtime).
    let status = unsafe {
        (api.CreateTensorWithDataAsOrtValue)(
            memory.ptr(),
            data.as_mut_ptr().cast(),
            std::mem::size_of_val(data),
            shape.as_ptr(),
            shape.len(),
            T::into_tensor_element_type().into(),
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

    fn kv_pool(&self) -> Option<KvPool> {
        let block_bytes = pool_block_bytes(&self.manifest, self.kv_cache());
        self.paged.as_ref().map(|p| KvPool { blocks: p.blocks, block_size: p.block, block_bytes })
    }

    fn bind_blocks(&mut self, slot: usize, blocks: &[u32]) -> Result<(), RuntimeError> {
        let p =
            self.paged.as_mut().ok_or_else(|| RuntimeError::Run("bind_blocks: the KV cache is not paged".into()))?;
        if slot >= self.slots || blocks.len() > p.width || blocks.iter().any(|&b| b as usize >= p.blocks) {
            return Err(RuntimeError::Run(format!(
                "bind_blocks: slot {slot} of {}, {} blocks (at most {}) of a pool of {}",
                self.slots,
                blocks.len(),
                p.width,
                p.blocks
            )));
        }
        let row = &mut p.tables[slot * p.width..][..p.width];
        row[..blocks.len()].iter_mut().zip(blocks).for_each(|(t, &b)| *t = b as i32);
        Ok(())
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
        if let Some(p) = &mut self.paged {
            // The tables trade places: nothing is copied, and no block is held twice.
            for j in 0..p.width {
                p.tables.swap(from * p.width + j, to * p.width + j);
            }
            return Ok(());
        }
        let (per_slot, heads) = (self.per_slot(), self.manifest.config.num_kv_heads);
        let values = len * self.manifest.config.head_dim;
        match &mut self.kv {
            KvBuffers::F32(b) => move_positions(b, from, to, values, per_slot, heads),
            KvBuffers::F16(b) => move_positions(b, from, to, values, per_slot, heads),
        }
        Ok(())
    }
}
