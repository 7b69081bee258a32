//! GroupQueryAttention on the CPU as kiln's own kernel.
//!
//! ONNX Runtime's CPU GroupQueryAttention works one query head at a time, a one-row GEMM
//! against the transposed keys each: at 1024 cached positions it was 7.3 ms of a 14 ms
//! SmolLM2 decode step (ONNX Runtime's profiler). This kernel does the
//! same arithmetic for the subset of GroupQueryAttention the serving graph uses (q/k/v
//! packed, rotary applied inside, past and present sharing one buffer, optional sliding
//! window) and reads each key and value once per group of query heads that share it.
//!
//! CPU sessions of `serving.onnx` run it: [`move_nodes`] moves the graph's attention nodes
//! into kiln's domain at load; the artifact keeps the standard contrib op, which the CUDA and
//! TensorRT providers run.

use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput};
use ort::value::TensorElementType;
use tract_onnx::pb;

const OP: &str = "GroupQueryAttention";

/// Moves `graph`'s GroupQueryAttention nodes into `domain`; returns how many.
pub fn move_nodes(graph: &mut pb::GraphProto, domain: &str) -> usize {
    let mut moved = 0;
    for node in graph.node.iter_mut().filter(|n| n.op_type == OP && n.domain == "com.microsoft") {
        node.domain = domain.into();
        moved += 1;
    }
    moved
}

/// The operator: inputs and attributes as GroupQueryAttention's.
pub struct CachedAttention;

impl Operator for CachedAttention {
    type Kernel<'attr> = AttentionKernel;

    fn name(&self) -> &str {
        OP
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        let f = TensorElementType::Float32;
        let i = TensorElementType::Int32;
        [
            OperatorInput::required(f),
            OperatorInput::optional(f),
            OperatorInput::optional(f),
            OperatorInput::required(f),
            OperatorInput::required(f),
            OperatorInput::required(i),
            OperatorInput::required(i),
            OperatorInput::required(f),
            OperatorInput::required(f),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        let f = TensorElementType::Float32;
        [OperatorOutput::required(f), OperatorOutput::required(f), OperatorOutput::required(f)]
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
    /// The CPU runs the AVX2 + FMA kernels.
    simd: bool,
    /// Scratch kept between calls: rotated queries, and the chunks' softmax partials.
    q: Vec<f32>,
    partials: Vec<f32>,
}

/// Queries per parallel task in a prefill.
const QUERY_BLOCK: usize = 16;

impl Kernel for AttentionKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
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
        let past = |i: usize| -> ort::Result<(Vec<i64>, *const f32, usize)> {
            let v = input(i)?;
            let (shape, data) = v.try_extract_tensor::<f32>()?;
            Ok((shape.to_vec(), data.as_ptr(), data.len()))
        };
        let (cache_shape, key_ptr, cache_len) = past(3)?;
        let (value_shape, value_ptr, _) = past(4)?;

        let (h, kvh) = (self.heads, self.kv_heads);
        if qshape.len() != 3 || cache_shape.len() != 4 || rot_shape.len() != 2 {
            return Err(fail(format!("shapes query {qshape:?}, past {cache_shape:?}, cos {rot_shape:?}")));
        }
        let (b, s, width) = (qshape[0] as usize, qshape[1] as usize, qshape[2] as usize);
        let (context, d) = (cache_shape[2] as usize, cache_shape[3] as usize);
        let positions = rot_shape[0] as usize;
        let packed = (h + 2 * kvh) * d;
        let widths_fit = match separate {
            None => width == packed,
            Some((k, v)) => width == h * d && k.len() == b * s * kvh * d && v.len() == k.len(),
        };
        if !widths_fit
            || cache_shape[0] as usize != b
            || cache_shape[1] as usize != kvh
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
        }

        let mut present_key = ctx.output(1, cache_shape.clone())?.ok_or_else(|| fail("output 1".into()))?;
        let (_, keys) = present_key.try_extract_tensor_mut::<f32>()?;
        let mut present_value = ctx.output(2, cache_shape)?.ok_or_else(|| fail("output 2".into()))?;
        let (_, values) = present_value.try_extract_tensor_mut::<f32>()?;
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
                    let at = ((row * kvh + g) * context + pos) * d;
                    rotate(&k[g * d..][..d], c, sn, &mut keys[at..][..d]);
                    values[at..][..d].copy_from_slice(&v[g * d..][..d]);
                }
            }
        }

        let mut out =
            ctx.output(0, vec![b as i64, s as i64, (h * d) as i64])?.ok_or_else(|| fail("output 0".into()))?;
        let (_, out) = out.try_extract_tensor_mut::<f32>()?;
        let mut partials = std::mem::take(&mut self.partials);
        let attention = Attention {
            shape: Shape { heads: h, kv_heads: kvh, head_dim: d, context, seq: s },
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

/// Floats of scratch an attention node keeps between calls.
const KEPT_SCRATCH: usize = 1 << 16;

/// Keys per parallel task.
const KEY_CHUNK: usize = 256;

/// Whether the CPU runs the AVX2 + FMA kernels.
fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// One call's attention, after the rotary embedding and the cache writes.
struct Attention<'a> {
    shape: Shape,
    /// Cached positions before each row's new tokens.
    past: &'a [usize],
    window: Option<usize>,
    scale: f32,
    /// Use the AVX2 + FMA kernels (only where [`simd_available`]).
    simd: bool,
}

impl Attention<'_> {
    /// Attends the rotated queries `q` (`[rows, seq, heads, head_dim]`) to the cache into
    /// `out` (`[rows, seq, heads · head_dim]`). Tasks — (row, KV group, block of queries,
    /// chunk of keys) — run through `par` (count, task); each leaves, per query and head,
    /// its chunk's softmax partials (max, sum, unnormalized output) in `partials`, merged
    /// afterwards.
    fn run<E>(
        &self,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
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
    context: usize,
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
    fn run(&self, q: &[f32], keys: &[f32], values: &[f32], partial: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.attention.simd {
            // SAFETY: `simd` is set only where the CPU has AVX2 and FMA.
            return unsafe { self.run_avx2(q, keys, values, partial) };
        }
        self.dispatch::<false>(q, keys, values, partial)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn run_avx2(&self, q: &[f32], keys: &[f32], values: &[f32], partial: &mut [f32]) {
        self.dispatch::<true>(q, keys, values, partial)
    }

    /// The common head sizes with their size known to the compiler; `AVX2`: only from
    /// [`Self::run_avx2`].
    #[inline(always)]
    fn dispatch<const AVX2: bool>(&self, q: &[f32], keys: &[f32], values: &[f32], partial: &mut [f32]) {
        match self.attention.shape.head_dim {
            64 => self.attend::<64, AVX2>(q, keys, values, partial),
            128 => self.attend::<128, AVX2>(q, keys, values, partial),
            _ => self.attend::<0, AVX2>(q, keys, values, partial),
        }
    }

    /// `D`: the head size, or 0 for the shape's.
    #[inline(always)]
    fn attend<const D: usize, const AVX2: bool>(&self, q: &[f32], keys: &[f32], values: &[f32], partial: &mut [f32]) {
        let Attention { shape, past, window, scale, .. } = *self.attention;
        let Shape { heads, kv_heads, head_dim, context, seq } = shape;
        let d = if D > 0 { D } else { head_dim };
        let group = heads / kv_heads;
        let cache = (self.row * kv_heads + self.group) * context * d;
        let (keys, values) = (&keys[cache..][..context * d], &values[cache..][..context * d]);
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
                lanes::scores::<AVX2>(qv, &keys[first * d..end * d], scores);
                let max = scores.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * scale;
                scores.iter_mut().for_each(|v| *v = exp(*v * scale - max));
                let (head, acc) = p.split_at_mut(2);
                lanes::weighted_sum::<AVX2>(scores, &values[first * d..end * d], acc);
                head.copy_from_slice(&[max, sum(scores)]);
            }
        }
    }
}

/// Scores and weighted sums over the rows of a head's keys or values: with AVX2 and FMA,
/// or portable. `AVX2` is true only on a CPU with both.
mod lanes {
    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::*;

    /// `out[k] = q · keys[k]` for each row `k` of `keys` (rows of `q.len()`).
    #[inline(always)]
    pub fn scores<const AVX2: bool>(q: &[f32], keys: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if AVX2 && q.len().is_multiple_of(8) {
            // SAFETY: AVX2 and FMA are there (the callers' promise).
            return unsafe { scores_avx2(q, keys, out) };
        }
        for (o, key) in out.iter_mut().zip(keys.chunks_exact(q.len())) {
            *o = q.iter().zip(key).map(|(x, y)| x * y).sum();
        }
    }

    /// `acc = Σ_k w[k] · values[k]` over the rows of `values` (rows of `acc.len()`).
    #[inline(always)]
    pub fn weighted_sum<const AVX2: bool>(w: &[f32], values: &[f32], acc: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if AVX2 && acc.len().is_multiple_of(8) {
            // SAFETY: AVX2 and FMA are there (the callers' promise).
            return unsafe { weighted_sum_avx2(w, values, acc) };
        }
        acc.fill(0.0);
        for (&wk, value) in w.iter().zip(values.chunks_exact(acc.len())) {
            acc.iter_mut().zip(value).for_each(|(y, &v)| *y += wk * v);
        }
    }

    /// The eight values of `x` from `i` (bounds-checked).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn load8(x: &[f32], i: usize) -> __m256 {
        let v = &x[i..i + 8];
        // SAFETY: `v` holds eight values.
        unsafe { _mm256_loadu_ps(v.as_ptr()) }
    }

    /// Four keys at a time, their four sums reduced together. `q.len()` is a multiple of 8.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn scores_avx2(q: &[f32], keys: &[f32], out: &mut [f32]) {
        let d = q.len();
        let n = out.len().min(keys.len() / d);
        let mut k = 0;
        while k + 4 <= n {
            let rows = &keys[k * d..(k + 4) * d];
            let mut acc = [_mm256_setzero_ps(); 4];
            for i in (0..d).step_by(8) {
                let qi = load8(q, i);
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(qi, load8(rows, r * d + i), *a);
                }
            }
            // [a0+a1 pairs, a2+a3 pairs] → one sum per key in each 128-bit half, then halves added.
            let h01 = _mm256_hadd_ps(acc[0], acc[1]);
            let h23 = _mm256_hadd_ps(acc[2], acc[3]);
            let h = _mm256_hadd_ps(h01, h23);
            let sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
            // SAFETY: `k + 4 <= n <= out.len()`.
            unsafe { _mm_storeu_ps(out.as_mut_ptr().add(k), sums) };
            k += 4;
        }
        for (o, key) in out[k..n].iter_mut().zip(keys[k * d..].chunks_exact(d)) {
            let mut a = _mm256_setzero_ps();
            for i in (0..d).step_by(8) {
                a = _mm256_fmadd_ps(load8(q, i), load8(key, i), a);
            }
            let h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            *o = _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps::<1>(h, h)));
        }
    }

    /// 32 columns at a time held in registers over all rows. `acc.len()` is a multiple of 8.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn weighted_sum_avx2(w: &[f32], values: &[f32], acc: &mut [f32]) {
        let d = acc.len();
        let n = w.len().min(values.len() / d);
        let mut col = 0;
        while col < d {
            let width = (d - col).min(32) / 8;
            let mut a = [_mm256_setzero_ps(); 4];
            for (k, &wk) in w[..n].iter().enumerate() {
                let wv = _mm256_set1_ps(wk);
                for (j, aj) in a[..width].iter_mut().enumerate() {
                    *aj = _mm256_fmadd_ps(wv, load8(values, k * d + col + 8 * j), *aj);
                }
            }
            for (j, aj) in a[..width].iter().enumerate() {
                // SAFETY: `col + 8 * j + 8 <= d = acc.len()`.
                unsafe { _mm256_storeu_ps(acc.as_mut_ptr().add(col + 8 * j), *aj) };
            }
            col += 8 * width;
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
            + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r / 5040.0))))));
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
        let Shape { heads, kv_heads, head_dim: d, context, seq } = a.shape;
        let mut out = vec![0f32; a.past.len() * seq * heads * d];
        for (row, &past) in a.past.iter().enumerate() {
            for t in 0..seq {
                let pos = past + t;
                let first = a.window.map_or(0, |w| (pos + 1).saturating_sub(w));
                for h in 0..heads {
                    let cache = (row * kv_heads + h / (heads / kv_heads)) * context * d;
                    let qv = &q[((row * seq + t) * heads + h) * d..][..d];
                    let scores: Vec<f64> = (first..=pos)
                        .map(|k| {
                            let key = &keys[cache + k * d..][..d];
                            qv.iter().zip(key).map(|(x, y)| f64::from(x * y)).sum::<f64>() * f64::from(a.scale)
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    let y = &mut out[((row * seq + t) * heads + h) * d..][..d];
                    for (w, k) in weights.iter().zip(first..=pos) {
                        for (y, v) in y.iter_mut().zip(&values[cache + k * d..][..d]) {
                            *y += (w / total * f64::from(*v)) as f32;
                        }
                    }
                }
            }
        }
        out
    }

    /// Several key chunks and query blocks, rows at different positions, a sliding window,
    /// head sizes with and without a compiled-in size: both kernels against `naive`.
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
            let shape = Shape { heads, kv_heads, head_dim: d, context, seq };
            let rows = pasts.len();
            let q = noise(rows * seq * heads * d, 1);
            let keys = noise(rows * kv_heads * context * d, 2);
            let values = noise(keys.len(), 3);
            for simd in [false, simd_available()] {
                let a = Attention { shape, past: &pasts, window, scale: 0.3, simd };
                let want = naive(&a, &q, &keys, &values);
                let mut out = vec![f32::NAN; want.len()];
                let sequential = |n: usize, task: &(dyn Fn(usize) + Sync + Send)| -> Result<(), ()> {
                    (0..n).for_each(task);
                    Ok(())
                };
                a.run(&q, &keys, &values, &mut Vec::new(), &mut out, sequential).expect("runs");
                let worst = out.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                assert!(worst < 2e-5, "head_dim {d}, seq {seq}, pasts {pasts:?}, simd {simd}: off by {worst}");
            }
        }
    }
}
