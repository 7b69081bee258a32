//! GroupQueryAttention on the CPU as kiln's own kernel.
//!
//! ONNX Runtime's CPU GroupQueryAttention works one query head at a time, a one-row GEMM
//! against the transposed keys each: at 1024 cached positions it was 7.3 ms of a 14 ms
//! SmolLM2 decode step (ONNX Runtime's profiler). This kernel does the
//! same arithmetic for the subset of GroupQueryAttention the serving graph uses (q/k/v
//! packed, rotary applied inside, past and present sharing one buffer, optional sliding
//! window). One task takes the query heads of a KV group over a chunk of keys, so a chunk
//! comes from memory once per group; each head then reads it from the core's caches.
//!
//! CPU sessions of `serving.onnx` run it: [`move_nodes`] moves the graph's attention nodes
//! into kiln's domain at load; the artifact keeps the standard contrib op, which the CUDA and
//! TensorRT providers run.
//!
//! The KV cache is f32, or f16 ([`KvCache::F16`]): half the memory. f16 keys and values are
//! widened as they are loaded; the arithmetic is the same f32 arithmetic either way.
//!
//! The cache is laid out one of two ways ([`Layout`]). Contiguous, as the contrib op:
//! `[rows, kv_heads, context, head_dim]`. Paged: the past and present tensors are a pool of
//! blocks `[kv_heads, blocks, block_size, head_dim]` shared by all rows, and an optional 10th
//! input, the block table `[rows, blocks_per_row]` (i32), says which block holds each row's
//! positions `j · block_size ..`. Both compute the same values in the same order.

use half::f16;
use half::slice::HalfFloatSliceExt;
use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput};
use ort::value::TensorElementType;
use tract_onnx::pb;

use super::KvCache;

const OP: &str = "GroupQueryAttention";
/// The operator's name where the KV cache is f16.
const F16_CACHE_OP: &str = "GroupQueryAttentionF16Cache";

/// Moves `graph`'s GroupQueryAttention nodes into `domain`; returns how many. With an f16
/// `cache` the nodes become the f16-cache operator and their past and present tensors,
/// which must be graph inputs and outputs used by nothing else, become f16.
pub fn move_nodes(graph: &mut pb::GraphProto, domain: &str, cache: KvCache) -> Result<usize, String> {
    let mut moved = 0;
    let mut retyped = Vec::new();
    for node in graph.node.iter_mut().filter(|n| n.op_type == OP && n.domain == "com.microsoft") {
        node.domain = domain.into();
        if cache == KvCache::F16 {
            node.op_type = F16_CACHE_OP.into();
            let (past, present) = (node.input.get(3..5), node.output.get(1..3));
            let names = past.zip(present).ok_or_else(|| format!("attention node {:?} has no KV cache", node.name))?;
            retyped.extend(names.0.iter().chain(names.1).cloned());
        }
        moved += 1;
    }
    for name in &retyped {
        let users = graph.node.iter().filter(|n| n.input.contains(name)).count();
        let info = graph.input.iter_mut().chain(graph.output.iter_mut()).find(|v| &v.name == name);
        let tensor = info.and_then(|v| v.r#type.as_mut()).and_then(|t| match &mut t.value {
            Some(pb::type_proto::Value::TensorType(t)) => Some(t),
            _ => None,
        });
        match tensor {
            Some(t) if users <= 1 => t.elem_type = pb::tensor_proto::DataType::Float16 as i32,
            _ => return Err(format!("KV cache tensor {name:?} is not a graph input or output of one attention node")),
        }
    }
    Ok(moved)
}

/// The input that makes the cache paged: `[rows, blocks per row]` i32.
pub const BLOCK_TABLE: &str = "block_table";

/// Makes the KV cache of `graph`'s attention nodes (already moved by [`move_nodes`]) paged:
/// a graph input [`BLOCK_TABLE`] becomes each node's 10th input, and the past and present
/// tensors become the pool's shape, `[kv_heads, kv_blocks, block_size, head_dim]`.
pub fn page(graph: &mut pb::GraphProto) {
    let mut cache = Vec::new();
    for node in graph.node.iter_mut().filter(|n| n.op_type == OP || n.op_type == F16_CACHE_OP) {
        cache.extend(
            node.input.get(3..5).into_iter().flatten().chain(node.output.get(1..3).into_iter().flatten()).cloned(),
        );
        node.input.resize(9, String::new());
        node.input.push(BLOCK_TABLE.into());
    }
    let dim = |name: &str| pb::tensor_shape_proto::Dimension {
        value: Some(pb::tensor_shape_proto::dimension::Value::DimParam(name.into())),
        ..Default::default()
    };
    for v in graph.input.iter_mut().chain(graph.output.iter_mut()).filter(|v| cache.contains(&v.name)) {
        if let Some(pb::type_proto::Value::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut()) {
            if let Some(shape) = t.shape.as_mut().filter(|s| s.dim.len() == 4) {
                shape.dim[0] = dim("pool_kv_heads");
                shape.dim[1] = dim("kv_blocks");
                shape.dim[2] = dim("block_size");
            }
        }
    }
    let shape = pb::TensorShapeProto { dim: vec![dim("batch_size"), dim("blocks_per_row")] };
    graph.input.push(pb::ValueInfoProto {
        name: BLOCK_TABLE.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: pb::tensor_proto::DataType::Int32 as i32,
                shape: Some(shape),
            })),
            ..Default::default()
        }),
        ..Default::default()
    });
}

/// The operator: inputs and attributes as GroupQueryAttention's, the KV cache (past inputs
/// 3 and 4, present outputs 1 and 2) of type `cache`.
pub struct CachedAttention {
    /// The KV cache's element type.
    pub cache: KvCache,
}

impl CachedAttention {
    fn cache_type(&self) -> TensorElementType {
        match self.cache {
            KvCache::F32 => TensorElementType::Float32,
            KvCache::F16 => TensorElementType::Float16,
        }
    }
}

impl Operator for CachedAttention {
    type Kernel<'attr> = AttentionKernel;

    fn name(&self) -> &str {
        match self.cache {
            KvCache::F32 => OP,
            KvCache::F16 => F16_CACHE_OP,
        }
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        let (f, i, c) = (TensorElementType::Float32, TensorElementType::Int32, self.cache_type());
        [
            OperatorInput::required(f),
            OperatorInput::optional(f),
            OperatorInput::optional(f),
            OperatorInput::required(c),
            OperatorInput::required(c),
            OperatorInput::required(i),
            OperatorInput::required(i),
            OperatorInput::required(f),
            OperatorInput::required(f),
            OperatorInput::optional(i),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        let (f, c) = (TensorElementType::Float32, self.cache_type());
        [OperatorOutput::required(f), OperatorOutput::required(c), OperatorOutput::required(c)]
    }

    fn create_kernel<'attr>(&self, info: &KernelContext<'attr>) -> ort::Result<AttentionKernel> {
        let int = |name: &str| info.get::<i64>(name);
        let bad = |what: String| ort::Error::new(format!("kiln GroupQueryAttention: {what}"));
        let heads = int("num_heads").filter(|&h| h > 0).ok_or_else(|| bad("num_heads missing".into()))? as usize;
        let kv_heads = int("kv_num_heads").filter(|&h| h > 0).ok_or_else(|| bad("kv_num_heads missing".into()))?;
        let kv_heads = kv_heads as usize;
        if !heads.is_multiple_of(kv_heads) {
            return Err(bad(format!("num_heads {heads} is not a multiple of kv_num_heads {kv_heads}")));
        }
        if int("do_rotary") != Some(1) || int("rotary_interleaved").unwrap_or(0) != 0 {
            return Err(bad("only do_rotary = 1 with rotary_interleaved = 0 is implemented".into()));
        }
        if info.get::<f32>("softcap").is_some_and(|c| c != 0.0) || int("smooth_softmax").unwrap_or(0) != 0 {
            return Err(bad("softcap and smooth_softmax are not implemented".into()));
        }
        let window = int("local_window_size").filter(|&w| w > 0).map(|w| w as usize);
        let scale = info.get::<f32>("scale").filter(|&s| s != 0.0);
        if scale.is_some_and(|s| s < 0.0) {
            return Err(bad("a negative scale is not implemented".into()));
        }
        Ok(AttentionKernel {
            heads,
            kv_heads,
            window,
            scale,
            cache: self.cache,
            simd: simd_available(),
            q: Vec::new(),
            partials: Vec::new(),
        })
    }
}

/// One attention node's settings.
pub struct AttentionKernel {
    heads: usize,
    kv_heads: usize,
    window: Option<usize>,
    /// None: 1/√head_dim.
    scale: Option<f32>,
    cache: KvCache,
    /// The CPU runs the AVX2 + FMA + F16C kernels.
    simd: bool,
    /// Scratch kept between calls: rotated queries, and the chunks' softmax partials.
    q: Vec<f32>,
    partials: Vec<f32>,
}

/// Queries per parallel task in a prefill.
const QUERY_BLOCK: usize = 16;

impl Kernel for AttentionKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        match self.cache {
            KvCache::F32 => self.attend::<f32>(ctx),
            KvCache::F16 => self.attend::<f16>(ctx),
        }
    }
}

impl AttentionKernel {
    /// One call with a KV cache of `T`.
    fn attend<T: CacheElement>(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let fail = |what: String| ort::Error::new(format!("kiln GroupQueryAttention: {what}"));
        let input = |i: usize| ctx.input(i)?.ok_or_else(|| fail(format!("input {i} missing")));
        let query = input(0)?;
        let (qshape, query) = query.try_extract_tensor::<f32>()?;
        // Keys and values come packed after the queries, or as inputs 1 and 2.
        let (key, value) = (ctx.input(1)?, ctx.input(2)?);
        let separate = match (&key, &value) {
            (Some(k), Some(v)) => Some((k.try_extract_tensor::<f32>()?.1, v.try_extract_tensor::<f32>()?.1)),
            _ => None,
        };
        let seqlens = input(5)?;
        let (_, seqlens) = seqlens.try_extract_tensor::<i32>()?;
        let cos = input(7)?;
        let (rot_shape, cos) = cos.try_extract_tensor::<f32>()?;
        let sin = input(8)?;
        let (_, sin) = sin.try_extract_tensor::<f32>()?;
        // The past buffers by address only: the present outputs are the same memory.
        let past = |i: usize| -> ort::Result<(Vec<i64>, *const T, usize)> {
            let v = input(i)?;
            let (shape, data) = v.try_extract_tensor::<T>()?;
            Ok((shape.to_vec(), data.as_ptr(), data.len()))
        };
        let (cache_shape, key_ptr, cache_len) = past(3)?;
        let (value_shape, value_ptr, _) = past(4)?;
        let table = ctx.input(9)?;
        let table = match &table {
            Some(t) => Some(t.try_extract_tensor::<i32>()?),
            None => None,
        };

        let (h, kvh) = (self.heads, self.kv_heads);
        if qshape.len() != 3 || cache_shape.len() != 4 || rot_shape.len() != 2 {
            return Err(fail(format!("shapes query {qshape:?}, past {cache_shape:?}, cos {rot_shape:?}")));
        }
        let (b, s, width) = (qshape[0] as usize, qshape[1] as usize, qshape[2] as usize);
        let d = cache_shape[3] as usize;
        let positions = rot_shape[0] as usize;
        let (layout, context, rows_fit) = match &table {
            None => (
                Layout::Contiguous { context: cache_shape[2] as usize },
                cache_shape[2] as usize,
                cache_shape[0] as usize == b,
            ),
            Some((tshape, tables)) => {
                let (block, width) = (cache_shape[2] as usize, tshape.get(1).copied().unwrap_or(0) as usize);
                let fits = tshape.len() == 2 && tshape[0] as usize == b && block > 0;
                (Layout::Paged { block, tables, width, blocks: cache_shape[1] as usize }, width * block, fits)
            }
        };
        let cache_heads = match layout {
            Layout::Contiguous { .. } => cache_shape[1],
            Layout::Paged { .. } => cache_shape[0],
        };
        let packed = (h + 2 * kvh) * d;
        let widths_fit = match separate {
            None => width == packed,
            Some((k, v)) => width == h * d && k.len() == b * s * kvh * d && v.len() == k.len(),
        };
        if !widths_fit
            || !rows_fit
            || cache_heads as usize != kvh
            || rot_shape[1] as usize * 2 != d
            || sin.len() != cos.len()
            || value_shape != cache_shape
            || seqlens.len() != b
        {
            return Err(fail(format!(
                "shapes query {qshape:?}, past {cache_shape:?}, cos {rot_shape:?}, seqlens {}",
                seqlens.len()
            )));
        }
        // Each row's new tokens take the positions ending at seqlens_k.
        let mut past = Vec::with_capacity(b);
        for (row, &len) in seqlens.iter().enumerate() {
            let total = usize::try_from(len).ok().map(|l| l + 1).filter(|&t| t >= s && t <= context.min(positions));
            let total = total.ok_or_else(|| fail(format!("seqlens_k[{row}] = {len} with {s} new tokens")))?;
            past.push(total - s);
            if let Layout::Paged { block, tables, width, blocks } = layout {
                let used = &tables[row * width..][..total.div_ceil(block)];
                if let Some(bad) = used.iter().find(|&&j| usize::try_from(j).map_or(true, |j| j >= blocks)) {
                    return Err(fail(format!("block_table[{row}] names block {bad} of a pool of {blocks}")));
                }
            }
        }

        let mut present_key = ctx.output(1, cache_shape.clone())?.ok_or_else(|| fail("output 1".into()))?;
        let (_, keys) = present_key.try_extract_tensor_mut::<T>()?;
        let mut present_value = ctx.output(2, cache_shape)?.ok_or_else(|| fail("output 2".into()))?;
        let (_, values) = present_value.try_extract_tensor_mut::<T>()?;
        // The serving runtime binds one buffer as past and present; anything else gets a copy.
        for (to, from) in [(&mut *keys, key_ptr), (&mut *values, value_ptr)] {
            if to.as_ptr() != from {
                // SAFETY: `from` is the past input, `cache_len` values that ONNX Runtime keeps
                // alive during the call, in other memory than `to` (same shape).
                to.copy_from_slice(unsafe { std::slice::from_raw_parts(from, cache_len) });
            }
        }

        // Rotary embedding: queries into `q` ([b, s, h, d]), keys and values into the cache.
        let half = d / 2;
        let mut q = std::mem::take(&mut self.q);
        q.resize(b * s * h * d, 0.0);
        let mut rotated = vec![0f32; d];
        for row in 0..b {
            for t in 0..s {
                let pos = past[row] + t;
                let (c, sn) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
                let token = &query[(row * s + t) * width..][..width];
                let (k, v) = match separate {
                    None => (&token[h * d..][..kvh * d], &token[(h + kvh) * d..][..kvh * d]),
                    Some((k, v)) => {
                        let at = (row * s + t) * kvh * d;
                        (&k[at..][..kvh * d], &v[at..][..kvh * d])
                    }
                };
                for head in 0..h {
                    rotate(&token[head * d..][..d], c, sn, &mut q[((row * s + t) * h + head) * d..][..d]);
                }
                for g in 0..kvh {
                    let at = layout.at(row, g, pos, kvh) * d;
                    rotate(&k[g * d..][..d], c, sn, &mut rotated);
                    T::narrow(&rotated, &mut keys[at..][..d]);
                    T::narrow(&v[g * d..][..d], &mut values[at..][..d]);
                }
            }
        }

        let mut out =
            ctx.output(0, vec![b as i64, s as i64, (h * d) as i64])?.ok_or_else(|| fail("output 0".into()))?;
        let (_, out) = out.try_extract_tensor_mut::<f32>()?;
        let mut partials = std::mem::take(&mut self.partials);
        let attention = Attention {
            shape: Shape { heads: h, kv_heads: kvh, head_dim: d, seq: s },
            layout,
            past: &past,
            window: self.window,
            scale: self.scale.unwrap_or(1.0 / (d as f32).sqrt()),
            simd: self.simd,
        };
        attention.run(&q, keys, values, &mut partials, out, |n, task| ctx.par_for(n, n, task))?;
        // Decode-sized scratch stays for the next call; a long prefill's goes back.
        if q.len() + partials.len() <= KEPT_SCRATCH {
            (self.q, self.partials) = (q, partials);
        }
        Ok(())
    }
}

/// An element type of the KV cache.
trait CacheElement: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug + Send + Sync + 'static {
    /// `src` in this type, into `dst` (same length).
    fn narrow(src: &[f32], dst: &mut [Self]);
    /// The value as f32.
    fn to_f32(self) -> f32;
    /// Eight values from `p` as f32.
    ///
    /// # Safety
    /// `p` points to eight values; the CPU has AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl CacheElement for f32 {
    fn narrow(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }

    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's promise.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl CacheElement for f16 {
    fn narrow(src: &[f32], dst: &mut [f16]) {
        dst.convert_from_f32_slice(src);
    }

    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::{_mm256_cvtph_ps, _mm_loadu_si128};
        // SAFETY: the caller's promise (eight f16 values are 16 bytes; unaligned load).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
}

/// Floats of scratch an attention node keeps between calls.
const KEPT_SCRATCH: usize = 1 << 16;

/// Keys per parallel task.
const KEY_CHUNK: usize = 256;

/// Whether the CPU runs the AVX2 + FMA (+ F16C) kernels.
fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Where the cache keeps each row's positions.
#[derive(Clone, Copy, Debug)]
enum Layout<'a> {
    /// `[rows, kv_heads, context, head_dim]`.
    Contiguous { context: usize },
    /// A pool `[kv_heads, blocks, block, head_dim]` (head-major: a head's consecutive
    /// blocks are one run of memory): row `r`'s position `p` is in block
    /// `tables[r · width + p / block]` (checked to be in the pool for the positions used).
    Paged { block: usize, tables: &'a [i32], width: usize, blocks: usize },
}

impl Layout<'_> {
    /// Index (in rows of `head_dim` values) of `row`'s position `pos` in KV group `g`.
    #[inline(always)]
    fn at(&self, row: usize, g: usize, pos: usize, kv_heads: usize) -> usize {
        match *self {
            Layout::Contiguous { context } => (row * kv_heads + g) * context + pos,
            Layout::Paged { block, tables, width, blocks } => {
                let _ = kv_heads;
                (g * blocks + tables[row * width + pos / block] as usize) * block + pos % block
            }
        }
    }

    /// `positions` of `row`, group `g`, as runs stored one after another (consecutive
    /// blocks are one run): calls `f` with each run's first position, its length and its
    /// index (as [`Self::at`]).
    #[inline(always)]
    fn runs(
        &self,
        row: usize,
        g: usize,
        kv_heads: usize,
        positions: std::ops::Range<usize>,
        mut f: impl FnMut(usize, usize, usize),
    ) {
        match *self {
            Layout::Contiguous { .. } => {
                f(positions.start, positions.len(), self.at(row, g, positions.start, kv_heads))
            }
            Layout::Paged { block, tables, width, .. } => {
                let table = &tables[row * width..][..width];
                let mut pos = positions.start;
                while pos < positions.end {
                    // Extend the run over blocks that follow each other in the pool.
                    let (first, mut j) = (pos, pos / block);
                    while (j + 1) * block < positions.end && table[j + 1] == table[j] + 1 {
                        j += 1;
                    }
                    pos = ((j + 1) * block).min(positions.end);
                    f(first, pos - first, self.at(row, g, first, kv_heads));
                }
            }
        }
    }
}

/// One call's attention, after the rotary embedding and the cache writes.
struct Attention<'a> {
    shape: Shape,
    layout: Layout<'a>,
    /// Cached positions before each row's new tokens.
    past: &'a [usize],
    window: Option<usize>,
    scale: f32,
    /// Use the AVX2 + FMA + F16C kernels (only where [`simd_available`]).
    simd: bool,
}

impl Attention<'_> {
    /// Attends the rotated queries `q` (`[rows, seq, heads, head_dim]`) to the cache into
    /// `out` (`[rows, seq, heads · head_dim]`). Tasks — (row, KV group, block of queries,
    /// chunk of keys) — run through `par` (count, task); each leaves, per query and head,
    /// its chunk's softmax partials (max, sum, unnormalized output) in `partials`, merged
    /// afterwards.
    fn run<T: CacheElement, E>(
        &self,
        q: &[f32],
        keys: &[T],
        values: &[T],
        partials: &mut Vec<f32>,
        out: &mut [f32],
        par: impl FnOnce(usize, &(dyn Fn(usize) + Sync + Send)) -> Result<(), E>,
    ) -> Result<(), E> {
        let Shape { heads, kv_heads, head_dim: d, seq, .. } = self.shape;
        let group = heads / kv_heads;
        let blocks = seq.div_ceil(QUERY_BLOCK);
        let longest = self.past.iter().max().map_or(0, |p| p + seq);
        let chunks = longest.div_ceil(KEY_CHUNK);
        let tasks = self.past.len() * kv_heads * blocks * chunks;
        let part = QUERY_BLOCK.min(seq) * group * (d + 2);
        partials.clear();
        partials.resize(tasks * part, 0.0);
        let at = |task: usize| {
            let (chunk, block) = (task % chunks, task / chunks % blocks);
            let (g, row) = (task / (chunks * blocks) % kv_heads, task / (chunks * blocks * kv_heads));
            (row, g, block * QUERY_BLOCK..((block + 1) * QUERY_BLOCK).min(seq), chunk)
        };
        let shared = &SharedPartials(partials.as_mut_ptr());
        par(tasks, &|task| {
            let (row, group, queries, chunk) = at(task);
            let keys_range = chunk * KEY_CHUNK..(chunk + 1) * KEY_CHUNK;
            let job = Job { attention: self, row, group, queries, keys: keys_range };
            // SAFETY: task `task` alone writes the `part` values at `task * part`, inside
            // `partials` (`tasks * part` values), which outlives `par`.
            let partial = unsafe { std::slice::from_raw_parts_mut(shared.0.add(task * part), part) };
            job.run(q, keys, values, partial);
        })?;

        for task in (0..tasks).step_by(chunks) {
            let (row, g, queries, _) = at(task);
            for t in queries.clone() {
                for j in 0..group {
                    let offset = ((t - queries.start) * group + j) * (d + 2);
                    let parts = || (0..chunks).map(|c| &partials[(task + c) * part + offset..][..d + 2]);
                    let max = parts().fold(f32::NEG_INFINITY, |m, p| m.max(p[0]));
                    let y = &mut out[((row * seq + t) * heads + g * group + j) * d..][..d];
                    y.fill(0.0);
                    let mut sum = 0.0;
                    for p in parts().filter(|p| p[1] > 0.0) {
                        let w = (p[0] - max).exp();
                        sum += w * p[1];
                        y.iter_mut().zip(&p[2..]).for_each(|(y, &v)| *y += w * v);
                    }
                    y.iter_mut().for_each(|v| *v /= sum);
                }
            }
        }
        Ok(())
    }
}

/// The partials, shared by tasks that write disjoint parts of them.
struct SharedPartials(*mut f32);
// SAFETY: tasks write disjoint regions (see `Attention::run`).
unsafe impl Sync for SharedPartials {}
// SAFETY: as above.
unsafe impl Send for SharedPartials {}

#[derive(Clone, Copy)]
struct Shape {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    seq: usize,
}

/// One task: the query heads of one KV group, a block of one row's new tokens, a chunk of
/// its keys.
struct Job<'a> {
    attention: &'a Attention<'a>,
    row: usize,
    group: usize,
    queries: std::ops::Range<usize>,
    keys: std::ops::Range<usize>,
}

impl Job<'_> {
    /// Writes the partials of each query and head: max score, sum of exponentials, and
    /// the unnormalized output (sum 0 where the chunk holds none of the query's keys).
    fn run<T: CacheElement>(&self, q: &[f32], keys: &[T], values: &[T], partial: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.attention.simd {
            // SAFETY: `simd` is set only where the CPU has AVX2, FMA and F16C.
            return unsafe { self.run_avx2(q, keys, values, partial) };
        }
        self.dispatch::<T, false>(q, keys, values, partial)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn run_avx2<T: CacheElement>(&self, q: &[f32], keys: &[T], values: &[T], partial: &mut [f32]) {
        self.dispatch::<T, true>(q, keys, values, partial)
    }

    /// The common head sizes with their size known to the compiler; `AVX2`: only from
    /// [`Self::run_avx2`].
    #[inline(always)]
    fn dispatch<T: CacheElement, const AVX2: bool>(&self, q: &[f32], keys: &[T], values: &[T], partial: &mut [f32]) {
        match self.attention.shape.head_dim {
            64 => self.attend::<T, 64, AVX2>(q, keys, values, partial),
            128 => self.attend::<T, 128, AVX2>(q, keys, values, partial),
            _ => self.attend::<T, 0, AVX2>(q, keys, values, partial),
        }
    }

    /// `D`: the head size, or 0 for the shape's.
    #[inline(always)]
    fn attend<T: CacheElement, const D: usize, const AVX2: bool>(
        &self,
        q: &[f32],
        keys: &[T],
        values: &[T],
        partial: &mut [f32],
    ) {
        let Attention { shape, layout, past, window, scale, .. } = *self.attention;
        let Shape { heads, kv_heads, head_dim, seq } = shape;
        let d = if D > 0 { D } else { head_dim };
        let group = heads / kv_heads;
        let (row, g) = (self.row, self.group);
        let mut scores = vec![0f32; self.keys.len()];
        for t in self.queries.clone() {
            let pos = past[self.row] + t;
            let first = window.map_or(0, |w| (pos + 1).saturating_sub(w)).max(self.keys.start);
            let end = (pos + 1).min(self.keys.end);
            let qs = &q[((self.row * seq + t) * heads + self.group * group) * d..][..group * d];
            for (j, qv) in qs.chunks_exact(d).enumerate() {
                let p = &mut partial[((t - self.queries.start) * group + j) * (d + 2)..][..d + 2];
                if first >= end {
                    p[..2].copy_from_slice(&[f32::NEG_INFINITY, 0.0]);
                    continue;
                }
                let scores = &mut scores[..end - first];
                layout.runs(row, g, kv_heads, first..end, |pos, n, at| {
                    lanes::scores::<T, AVX2>(qv, &keys[at * d..][..n * d], &mut scores[pos - first..][..n]);
                });
                let max = scores.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * scale;
                scores.iter_mut().for_each(|v| *v = exp(*v * scale - max));
                let (head, acc) = p.split_at_mut(2);
                acc.fill(0.0);
                layout.runs(row, g, kv_heads, first..end, |pos, n, at| {
                    lanes::weighted_sum::<T, AVX2>(&scores[pos - first..][..n], &values[at * d..][..n * d], acc);
                });
                head.copy_from_slice(&[max, sum(scores)]);
            }
        }
    }
}

/// Scores and weighted sums over the rows of a head's keys or values (f32 or f16): with
/// AVX2, FMA and F16C, or portable. `AVX2` is true only on a CPU with all three.
mod lanes {
    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::*;

    use super::CacheElement;

    /// `out[k] = q · keys[k]` for each row `k` of `keys` (rows of `q.len()`).
    #[inline(always)]
    pub fn scores<T: CacheElement, const AVX2: bool>(q: &[f32], keys: &[T], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if AVX2 && q.len().is_multiple_of(8) {
            // SAFETY: AVX2, FMA and F16C are there (the callers' promise).
            return unsafe { scores_avx2(q, keys, out) };
        }
        for (o, key) in out.iter_mut().zip(keys.chunks_exact(q.len())) {
            *o = q.iter().zip(key).map(|(x, y)| x * y.to_f32()).sum();
        }
    }

    /// `acc += Σ_k w[k] · values[k]` over the rows of `values` (rows of `acc.len()`).
    #[inline(always)]
    pub fn weighted_sum<T: CacheElement, const AVX2: bool>(w: &[f32], values: &[T], acc: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if AVX2 && acc.len().is_multiple_of(8) {
            // SAFETY: AVX2, FMA and F16C are there (the callers' promise).
            return unsafe { weighted_sum_avx2(w, values, acc) };
        }
        for (&wk, value) in w.iter().zip(values.chunks_exact(acc.len())) {
            acc.iter_mut().zip(value).for_each(|(y, &v)| *y += wk * v.to_f32());
        }
    }

    /// Eight values as f32.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn load8<T: CacheElement>(x: &[T; 8]) -> __m256 {
        // SAFETY: `x` holds eight values; the features are enabled here.
        unsafe { T::load8(x.as_ptr()) }
    }

    /// Four keys at a time, their four sums reduced together. `q.len()` is a multiple of 8.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn scores_avx2<T: CacheElement>(q: &[f32], keys: &[T], out: &mut [f32]) {
        let d = q.len();
        let n = out.len().min(keys.len() / d);
        let q8 = q.as_chunks::<8>().0;
        let mut fours = keys[..n * d].chunks_exact(4 * d);
        let mut outs = out[..n].chunks_exact_mut(4);
        for (rows, o) in (&mut fours).zip(&mut outs) {
            let (k0, rest) = rows.split_at(d);
            let (k1, rest) = rest.split_at(d);
            let (k2, k3) = rest.split_at(d);
            let mut acc = [_mm256_setzero_ps(); 4];
            let columns = q8.iter().zip(k0.as_chunks().0).zip(k1.as_chunks().0).zip(k2.as_chunks().0);
            for ((((qi, a), b), c), e) in columns.zip(k3.as_chunks().0) {
                let qi = load8(qi);
                acc[0] = _mm256_fmadd_ps(qi, load8(a), acc[0]);
                acc[1] = _mm256_fmadd_ps(qi, load8(b), acc[1]);
                acc[2] = _mm256_fmadd_ps(qi, load8(c), acc[2]);
                acc[3] = _mm256_fmadd_ps(qi, load8(e), acc[3]);
            }
            // [a0+a1 pairs, a2+a3 pairs] → one sum per key in each 128-bit half, then halves added.
            let h01 = _mm256_hadd_ps(acc[0], acc[1]);
            let h23 = _mm256_hadd_ps(acc[2], acc[3]);
            let h = _mm256_hadd_ps(h01, h23);
            let sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
            // SAFETY: `o` holds four values.
            unsafe { _mm_storeu_ps(o.as_mut_ptr(), sums) };
        }
        for (o, key) in outs.into_remainder().iter_mut().zip(fours.remainder().chunks_exact(d)) {
            let mut a = _mm256_setzero_ps();
            for (qi, ki) in q8.iter().zip(key.as_chunks().0) {
                a = _mm256_fmadd_ps(load8(qi), load8(ki), a);
            }
            // Summed in the order of the four-key reduction above, so a key's score does not
            // depend on where it falls in its run.
            let h = _mm256_hadd_ps(a, a);
            let h = _mm256_hadd_ps(h, h);
            *o = _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h)));
        }
    }

    /// 64 columns at a time held in registers over all rows (eight independent sums per
    /// row). `acc.len()` is a multiple of 8.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn weighted_sum_avx2<T: CacheElement>(w: &[f32], values: &[T], acc: &mut [f32]) {
        let d = acc.len();
        let mut col = 0;
        while col < d {
            let width = (d - col).min(64);
            let mut a = [_mm256_setzero_ps(); 8];
            for (aj, y) in a.iter_mut().zip(acc[col..col + width].as_chunks::<8>().0) {
                // SAFETY: `y` holds eight values.
                *aj = unsafe { _mm256_loadu_ps(y.as_ptr()) };
            }
            for (&wk, row) in w.iter().zip(values.chunks_exact(d)) {
                let wv = _mm256_set1_ps(wk);
                for (aj, v) in a.iter_mut().zip(row[col..col + width].as_chunks().0) {
                    *aj = _mm256_fmadd_ps(wv, load8(v), *aj);
                }
            }
            for (aj, y) in a.iter().zip(acc[col..col + width].as_chunks_mut::<8>().0) {
                // SAFETY: `y` holds eight values.
                unsafe { _mm256_storeu_ps(y.as_mut_ptr(), *aj) };
            }
            col += width;
        }
    }
}

/// `x` rotated by the angles whose cosines and sines are `cos` and `sin` (halves rotated
/// together), into `out`.
fn rotate(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (o1, o2) = out.split_at_mut(half);
    for i in 0..half {
        o1[i] = x1[i] * cos[i] - x2[i] * sin[i];
        o2[i] = x2[i] * cos[i] + x1[i] * sin[i];
    }
}

/// Sum in 8 lanes.
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..8 {
            lanes[i] += c[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// e^x for x ≤ 0 (softmax arguments), relative error below 3e-7; branch-free, so loops
/// over it vectorize.
#[inline(always)]
fn exp(x: f32) -> f32 {
    // e^x = 2^n · e^r with n = round(x / ln 2), |r| ≤ ln 2 / 2; e^r by its Taylor polynomial.
    // Adding 1.5 · 2^23 rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    // ln 2 in two parts (Cody and Waite), so r keeps its low bits.
    let r = (x - n * 0.693_359_4) + n * 2.121_944_4e-4;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let scale = (t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127)) << 23;
    p * f32::from_bits(scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_close_to_the_standard_library() {
        for i in 0..=8700 {
            let x = -(i as f32) / 100.0;
            let (got, want) = (exp(x), x.exp());
            assert!((got - want).abs() <= 3e-7 * want, "exp({x}) = {got}, want {want}");
        }
    }

    #[test]
    fn rotation_turns_the_two_halves_together() {
        let (cos, sin) = ([0.0, 1.0], [1.0, 0.0]);
        let mut out = [0.0; 4];
        rotate(&[1.0, 2.0, 3.0, 4.0], &cos, &sin, &mut out);
        // Pair (1, 3) turned by 90°, pair (2, 4) by 0°.
        assert_eq!(out, [-3.0, 2.0, 1.0, 4.0]);
    }

    /// A graph of one GroupQueryAttention node whose KV cache is graph inputs and outputs.
    fn attention_graph() -> pb::GraphProto {
        let float = |name: &str| pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: pb::tensor_proto::DataType::Float as i32,
                    shape: None,
                })),
                ..Default::default()
            }),
            ..Default::default()
        };
        let inputs = ["qkv", "", "", "past.key", "past.value", "seqlens", "total", "cos", "sin"];
        pb::GraphProto {
            node: vec![pb::NodeProto {
                op_type: OP.into(),
                domain: "com.microsoft".into(),
                input: inputs.iter().map(|i| i.to_string()).collect(),
                output: vec!["out".into(), "present.key".into(), "present.value".into()],
                ..Default::default()
            }],
            input: ["qkv", "past.key", "past.value"].map(float).into(),
            output: ["out", "present.key", "present.value"].map(float).into(),
            ..Default::default()
        }
    }

    /// Element types of the graph's inputs and outputs, by name.
    fn io_types(g: &pb::GraphProto) -> Vec<(String, i32)> {
        let elem = |v: &pb::ValueInfoProto| match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(pb::type_proto::Value::TensorType(t)) => t.elem_type,
            _ => 0,
        };
        g.input.iter().chain(&g.output).map(|v| (v.name.clone(), elem(v))).collect()
    }

    #[test]
    fn an_f16_cache_retypes_exactly_the_past_and_present_tensors() {
        let (f32_type, f16_type) =
            (pb::tensor_proto::DataType::Float as i32, pb::tensor_proto::DataType::Float16 as i32);
        let mut g = attention_graph();
        assert_eq!(move_nodes(&mut g, "ai.kiln", KvCache::F32), Ok(1));
        assert_eq!((g.node[0].op_type.as_str(), g.node[0].domain.as_str()), (OP, "ai.kiln"));
        assert!(io_types(&g).iter().all(|(_, t)| *t == f32_type));

        let mut g = attention_graph();
        assert_eq!(move_nodes(&mut g, "ai.kiln", KvCache::F16), Ok(1));
        assert_eq!((g.node[0].op_type.as_str(), g.node[0].domain.as_str()), (F16_CACHE_OP, "ai.kiln"));
        let f16_named: Vec<String> =
            io_types(&g).into_iter().filter(|(_, t)| *t == f16_type).map(|(name, _)| name).collect();
        assert_eq!(f16_named, ["past.key", "past.value", "present.key", "present.value"]);

        // A cache tensor something else reads cannot change type under it.
        let mut g = attention_graph();
        g.node.push(pb::NodeProto { op_type: "Shape".into(), input: vec!["past.key".into()], ..Default::default() });
        let err = move_nodes(&mut g, "ai.kiln", KvCache::F16).expect_err("shared cache input");
        assert!(err.contains("\"past.key\""), "{err}");
    }

    /// Values in [-1, 1) from a fixed sequence.
    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Softmax attention written out, one query head at a time.
    fn naive(a: &Attention, q: &[f32], keys: &[f32], values: &[f32]) -> Vec<f32> {
        let Shape { heads, kv_heads, head_dim: d, seq } = a.shape;
        let mut out = vec![0f32; a.past.len() * seq * heads * d];
        for (row, &past) in a.past.iter().enumerate() {
            for t in 0..seq {
                let pos = past + t;
                let first = a.window.map_or(0, |w| (pos + 1).saturating_sub(w));
                for h in 0..heads {
                    let g = h / (heads / kv_heads);
                    let at = |k: usize| a.layout.at(row, g, k, kv_heads) * d;
                    let qv = &q[((row * seq + t) * heads + h) * d..][..d];
                    let scores: Vec<f64> = (first..=pos)
                        .map(|k| {
                            let key = &keys[at(k)..][..d];
                            qv.iter().zip(key).map(|(x, y)| f64::from(x * y)).sum::<f64>() * f64::from(a.scale)
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    let y = &mut out[((row * seq + t) * heads + h) * d..][..d];
                    for (w, k) in weights.iter().zip(first..=pos) {
                        for (y, v) in y.iter_mut().zip(&values[at(k)..][..d]) {
                            *y += (w / total * f64::from(*v)) as f32;
                        }
                    }
                }
            }
        }
        out
    }

    /// Several key chunks and query blocks, rows at different positions, a sliding window,
    /// head sizes with and without a compiled-in size: both kernels against `naive`, and an
    /// f16 cache computing exactly what an f32 cache of the same values does.
    #[test]
    fn chunked_attention_matches_the_written_out_softmax() {
        let cases = [
            // (head_dim, seq, pasts, window)
            (64, 1, vec![700, 3], None),
            (64, 21, vec![290], None),
            (16, 1, vec![600, 0], Some(300)),
            (32, 18, vec![250, 40], Some(100)),
        ];
        for (d, seq, pasts, window) in cases {
            let (heads, kv_heads, context) = (6, 2, 800);
            let shape = Shape { heads, kv_heads, head_dim: d, seq };
            let rows = pasts.len();
            let q = noise(rows * seq * heads * d, 1);
            // Values an f16 cache holds exactly, so both caches must give the same result.
            let f16_keys: Vec<f16> = noise(rows * kv_heads * context * d, 2).into_iter().map(f16::from_f32).collect();
            let f16_values: Vec<f16> = noise(f16_keys.len(), 3).into_iter().map(f16::from_f32).collect();
            let keys: Vec<f32> = f16_keys.iter().map(|k| k.to_f32()).collect();
            let values: Vec<f32> = f16_values.iter().map(|v| v.to_f32()).collect();
            let sequential = |n: usize, task: &(dyn Fn(usize) + Sync + Send)| -> Result<(), ()> {
                (0..n).for_each(task);
                Ok(())
            };
            for simd in [false, simd_available()] {
                let layout = Layout::Contiguous { context };
                let a = Attention { shape, layout, past: &pasts, window, scale: 0.3, simd };
                let want = naive(&a, &q, &keys, &values);
                let mut out = vec![f32::NAN; want.len()];
                a.run(&q, &keys, &values, &mut Vec::new(), &mut out, sequential).expect("runs");
                let worst = out.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                assert!(worst < 2e-5, "head_dim {d}, seq {seq}, pasts {pasts:?}, simd {simd}: off by {worst}");
                let mut from_f16 = vec![f32::NAN; want.len()];
                a.run(&q, &f16_keys, &f16_values, &mut Vec::new(), &mut from_f16, sequential).expect("runs");
                assert_eq!(from_f16, out, "head_dim {d}, seq {seq}, pasts {pasts:?}, simd {simd}: f16 cache");
            }
        }
    }

    /// A paged cache — each row's positions scattered over a shuffled pool of blocks of 16 —
    /// gives exactly the contiguous cache's result, f32 and f16, both kernels.
    #[test]
    fn a_paged_cache_attends_exactly_as_the_contiguous_one() {
        let (heads, kv_heads, d, block, context) = (6, 2, 64, 16, 800);
        let width = context / block;
        for (seq, pasts, window) in [(1, vec![700, 3, 17], None), (21, vec![290, 0], Some(100))] {
            let rows = pasts.len();
            let shape = Shape { heads, kv_heads, head_dim: d, seq };
            let q = noise(rows * seq * heads * d, 4);
            let keys = noise(rows * kv_heads * context * d, 5);
            let values = noise(keys.len(), 6);
            // Row r's j-th block is pool block `tables[r · width + j]`: a fixed shuffle, and
            // runs of consecutive blocks (read as one).
            let blocks = rows * width;
            let shuffled = (0..blocks).map(|i| ((i * 37 + 11) % blocks) as i32);
            let groups = blocks / 5;
            let runs = (0..blocks).map(|i| ((i / 5 * 7 + 3) % groups * 5 + i % 5) as i32);
            for tables in [shuffled.collect::<Vec<i32>>(), runs.collect()] {
                let contiguous = Layout::Contiguous { context };
                let paged = Layout::Paged { block, tables: &tables, width, blocks };
                let (mut pool_keys, mut pool_values) = (vec![f32::NAN; keys.len()], vec![f32::NAN; values.len()]);
                for row in 0..rows {
                    for g in 0..kv_heads {
                        for pos in 0..context {
                            let (from, to) =
                                (contiguous.at(row, g, pos, kv_heads) * d, paged.at(row, g, pos, kv_heads) * d);
                            pool_keys[to..][..d].copy_from_slice(&keys[from..][..d]);
                            pool_values[to..][..d].copy_from_slice(&values[from..][..d]);
                        }
                    }
                }
                let sequential = |n: usize, task: &(dyn Fn(usize) + Sync + Send)| -> Result<(), ()> {
                    (0..n).for_each(task);
                    Ok(())
                };
                for simd in [false, simd_available()] {
                    let run = |layout, keys: &[f32], values: &[f32]| {
                        let a = Attention { shape, layout, past: &pasts, window, scale: 0.2, simd };
                        let mut out = vec![f32::NAN; rows * seq * heads * d];
                        a.run(&q, keys, values, &mut Vec::new(), &mut out, sequential).expect("runs");
                        out
                    };
                    let want = run(contiguous, &keys, &values);
                    assert!(want.iter().all(|v| v.is_finite()));
                    assert_eq!(run(paged, &pool_keys, &pool_values), want, "seq {seq}, pasts {pasts:?}, simd {simd}");
                }
            }
        }
    }
}
