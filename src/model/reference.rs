//! Native reference forward pass of a Llama-family decoder: f32 on ndarray, with a KV cache.
//!
//! It exists to be an independent check of the ONNX export and to produce activations for
//! calibration, so it follows the Hugging Face modelling code step by step (RMSNorm,
//! rotate-half rotary embeddings, grouped-query attention with a causal mask, SwiGLU MLP)
//! and leaves speed to matrix products: a window of tokens goes through each layer as
//! whole `[seq, hidden]` matrices.
//!
//! References: Touvron et al. 2023 (LLaMA), Su et al. 2021 (RoFormer, rotary embeddings),
//! Ainslie et al. 2023 (grouped-query attention), Shazeer 2020 (GLU variants).

use rayon::prelude::*;

use ndarray::{s, Array1, Array2, Array3, ArrayView1, ArrayView2, ArrayViewMut2, Axis};

use super::{LayerWeights, Linear, Model, ModelConfig, Weights};

/// Errors of a forward pass: inputs the model cannot take.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ForwardError {
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab_size}")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab_size: usize,
    },
    /// The window does not fit in the cache.
    #[error("{needed} positions do not fit in a KV cache of {capacity}")]
    CacheFull {
        /// Positions the cache would need.
        needed: usize,
        /// Positions the cache holds.
        capacity: usize,
    },
    /// An empty window.
    #[error("no tokens to run")]
    Empty,
}

/// The inputs of a layer's groups of linear layers, as calibration sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Site {
    /// After the input RMSNorm: the input of q, k and v.
    Attention,
    /// The attention context: the input of o_proj.
    Output,
    /// After the post-attention RMSNorm: the input of gate and up.
    Mlp,
    /// silu(gate) ⊙ up: the input of down_proj.
    Down,
}

/// Which logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// One row per input position.
    All,
    /// Only the last position (what generation needs).
    Last,
}

/// Keys and values of the positions seen so far, `[kv_heads, capacity, head_dim]` per
/// layer, allocated once.
#[derive(Debug, Clone)]
pub struct KvCache {
    keys: Vec<Array3<f32>>,
    values: Vec<Array3<f32>>,
    len: usize,
}

impl KvCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.keys.first().map_or(0, |k| k.shape()[1])
    }

    /// Forgets every position from `len` on (for rolling back rejected tokens).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

/// The reference model: borrowed weights plus rotary tables.
pub struct Reference<'m> {
    config: &'m ModelConfig,
    weights: &'m Weights,
    inv_freq: Vec<f32>,
}

impl<'m> Reference<'m> {
    /// A reference forward over `model`'s weights.
    pub fn new(model: &'m Model) -> Self {
        Self::from_parts(&model.config, &model.weights)
    }

    /// A reference forward over explicit config and weights.
    pub fn from_parts(config: &'m ModelConfig, weights: &'m Weights) -> Self {
        Reference { config, weights, inv_freq: config.rope_inv_freq() }
    }

    /// An empty cache for up to `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        let c = self.config;
        let shape = (c.num_kv_heads, capacity, c.head_dim);
        KvCache {
            keys: (0..c.num_layers).map(|_| Array3::zeros(shape)).collect(),
            values: (0..c.num_layers).map(|_| Array3::zeros(shape)).collect(),
            len: 0,
        }
    }

    /// Runs `ids` as the next positions after those in `cache`, appends their keys and
    /// values, and returns logits `[rows, vocab]` (`rows` per `which`).
    pub fn forward(&self, ids: &[u32], cache: &mut KvCache, which: Logits) -> Result<Array2<f32>, ForwardError> {
        let mut x = self.embed(ids)?;
        let needed = cache.len + ids.len();
        if needed > cache.capacity() {
            return Err(ForwardError::CacheFull { needed, capacity: cache.capacity() });
        }
        for i in 0..self.config.num_layers {
            self.layer(i, &mut x, cache);
        }
        cache.len = needed;
        let rows = match which {
            Logits::All => x.view(),
            Logits::Last => x.slice(s![ids.len() - 1.., ..]),
        };
        Ok(self.head(rows))
    }

    /// Embedding rows of `ids`, `[seq, hidden]`.
    pub fn embed(&self, ids: &[u32]) -> Result<Array2<f32>, ForwardError> {
        if ids.is_empty() {
            return Err(ForwardError::Empty);
        }
        let table = &self.weights.embed_tokens;
        let vocab_size = table.nrows();
        let mut x = Array2::zeros((ids.len(), self.config.hidden_size));
        for (row, &id) in x.rows_mut().into_iter().zip(ids) {
            if id as usize >= vocab_size {
                return Err(ForwardError::TokenOutOfRange { id, vocab_size });
            }
            let mut row = row;
            row.assign(&table.row(id as usize));
        }
        Ok(x)
    }

    /// Decoder layer `i` over the hidden states `x` `[seq, hidden]` at positions
    /// `cache.len()..`, in place; writes the layer's keys and values into `cache` (the
    /// caller advances `cache.len()` once all layers ran).
    pub fn layer(&self, i: usize, x: &mut Array2<f32>, cache: &mut KvCache) {
        self.layer_observed(i, x, cache, &mut |_, _| {});
    }

    /// [`layer`](Self::layer), showing `observe` the input of each group of linear layers
    /// (what calibration collects statistics from).
    pub fn layer_observed(
        &self,
        i: usize,
        x: &mut Array2<f32>,
        cache: &mut KvCache,
        observe: &mut dyn FnMut(Site, ArrayView2<f32>),
    ) {
        let w = &self.weights.layers[i];
        let h = rms_norm(x.view(), &w.input_layernorm, self.config.rms_norm_eps);
        observe(Site::Attention, h.view());
        let attn = self.attention(i, w, h.view(), cache, observe);
        *x += &attn;
        let h = rms_norm(x.view(), &w.post_attention_layernorm, self.config.rms_norm_eps);
        observe(Site::Mlp, h.view());
        *x += &mlp(w, h.view(), observe);
    }

    /// Final norm and lm_head over hidden states `[rows, hidden]`.
    pub fn head(&self, x: ArrayView2<f32>) -> Array2<f32> {
        let h = rms_norm(x, &self.weights.norm, self.config.rms_norm_eps);
        matmul_t(h.view(), self.weights.lm_head())
    }

    fn attention(
        &self,
        layer: usize,
        w: &LayerWeights,
        h: ArrayView2<f32>,
        cache: &mut KvCache,
        observe: &mut dyn FnMut(Site, ArrayView2<f32>),
    ) -> Array2<f32> {
        let c = self.config;
        let (seq, d) = (h.nrows(), c.head_dim);
        let start = cache.len;
        let total = start + seq;
        let mut q = linear(h, &w.q_proj);
        let mut k = linear(h, &w.k_proj);
        let v = linear(h, &w.v_proj);
        for head in 0..c.num_heads {
            self.rotate(q.slice_mut(s![.., head * d..(head + 1) * d]), start);
        }
        for head in 0..c.num_kv_heads {
            self.rotate(k.slice_mut(s![.., head * d..(head + 1) * d]), start);
            let cols = s![.., head * d..(head + 1) * d];
            cache.keys[layer].slice_mut(s![head, start..total, ..]).assign(&k.slice(cols));
            cache.values[layer].slice_mut(s![head, start..total, ..]).assign(&v.slice(cols));
        }
        let scale = 1.0 / (d as f32).sqrt();
        let group = c.num_heads / c.num_kv_heads;
        let mut out = Array2::<f32>::zeros((seq, c.num_heads * d));
        for head in 0..c.num_heads {
            let kv = head / group;
            let keys = cache.keys[layer].slice(s![kv, ..total, ..]);
            let values = cache.values[layer].slice(s![kv, ..total, ..]);
            let qh = q.slice(s![.., head * d..(head + 1) * d]);
            let mut scores = qh.dot(&keys.t());
            scores *= scale;
            for (r, mut row) in scores.axis_iter_mut(Axis(0)).enumerate() {
                let pos = start + r;
                // Causal: keys after the query position are hidden; with a sliding window,
                // so are keys `window` or more positions back.
                let first = c.sliding_window.map_or(0, |win| (pos + 1).saturating_sub(win));
                row.slice_mut(s![pos + 1..]).fill(f32::NEG_INFINITY);
                row.slice_mut(s![..first]).fill(f32::NEG_INFINITY);
                softmax_in_place(row.as_slice_mut().expect("rows of a fresh array are contiguous"));
            }
            out.slice_mut(s![.., head * d..(head + 1) * d]).assign(&scores.dot(&values));
        }
        observe(Site::Output, out.view());
        linear(out.view(), &w.o_proj)
    }

    /// Rotate-half rotary embedding of one head's rows `[seq, head_dim]`, positions from `start`.
    fn rotate(&self, mut x: ArrayViewMut2<f32>, start: usize) {
        let half = self.inv_freq.len();
        for (r, mut row) in x.axis_iter_mut(Axis(0)).enumerate() {
            let pos = (start + r) as f32;
            for (i, &f) in self.inv_freq.iter().enumerate() {
                let angle = f64::from(pos * f);
                let (sin, cos) = (angle.sin() as f32, angle.cos() as f32);
                let (a, b) = (row[i], row[i + half]);
                row[i] = a * cos - b * sin;
                row[i + half] = b * cos + a * sin;
            }
        }
    }
}

/// Below this many rows a product runs as matrix-vector products: a matrix-matrix product
/// repacks the whole weight on every call, which dominates single-token decoding.
const GEMV_ROWS: usize = 8;
/// Output values per parallel task of a matrix-vector product.
const GEMV_CHUNK: usize = 256;

/// `x · Wᵀ + b`.
fn linear(x: ArrayView2<f32>, l: &Linear) -> Array2<f32> {
    let mut y = matmul_t(x, &l.weight);
    if let Some(b) = &l.bias {
        y += b;
    }
    y
}

/// `x · Wᵀ` for `x` `[rows, in]` and `W` `[out, in]`.
fn matmul_t(x: ArrayView2<f32>, w: &Array2<f32>) -> Array2<f32> {
    if x.nrows() >= GEMV_ROWS {
        return x.dot(&w.t());
    }
    // Decoding is bound by reading the weights: split the output rows across threads.
    let (rows, out_dim) = (x.nrows(), w.nrows());
    let mut y = vec![0f32; rows * out_dim];
    y.par_chunks_mut(GEMV_CHUNK).enumerate().for_each(|(c, chunk)| {
        for (j, v) in chunk.iter_mut().enumerate() {
            let flat = c * GEMV_CHUNK + j;
            *v = w.row(flat % out_dim).dot(&x.row(flat / out_dim));
        }
    });
    Array2::from_shape_vec((rows, out_dim), y).expect("rows × out values")
}

/// SwiGLU MLP: `down(silu(gate(x)) ⊙ up(x))`.
fn mlp(w: &LayerWeights, h: ArrayView2<f32>, observe: &mut dyn FnMut(Site, ArrayView2<f32>)) -> Array2<f32> {
    let mut gate = linear(h, &w.gate_proj);
    let up = linear(h, &w.up_proj);
    gate.zip_mut_with(&up, |g, &u| *g = *g / (1.0 + (-*g).exp()) * u);
    observe(Site::Down, gate.view());
    linear(gate.view(), &w.down_proj)
}

/// RMSNorm over the last axis: `x / sqrt(mean(x²) + eps) · weight`.
pub fn rms_norm(x: ArrayView2<f32>, weight: &Array1<f32>, eps: f64) -> Array2<f32> {
    let mut out = x.to_owned();
    for mut row in out.rows_mut() {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
        let inv = 1.0 / (mean_sq + eps as f32).sqrt();
        row.zip_mut_with(weight, |v, &g| *v = g * (*v * inv));
    }
    out
}

/// Numerically stable softmax; entries at −∞ become 0.
fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in row.iter_mut() {
        *v /= sum;
    }
}

/// log Σ exp(row), computed stably.
pub fn logsumexp(row: ArrayView1<f32>) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln()
}

/// Index of the largest value (the first one on ties).
pub fn argmax(row: ArrayView1<f32>) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

impl Reference<'_> {
    /// Greedy decoding: up to `max_new` tokens after `prompt`, stopping after a token in
    /// `stop` (which is kept). `on_token` sees each token as it is chosen.
    pub fn greedy(
        &self,
        prompt: &[u32],
        max_new: usize,
        stop: &[u32],
        mut on_token: impl FnMut(u32),
    ) -> Result<Vec<u32>, ForwardError> {
        let mut cache = self.new_cache(prompt.len() + max_new);
        let mut out = Vec::with_capacity(max_new);
        let mut input = prompt.to_vec();
        while out.len() < max_new {
            let logits = self.forward(&input, &mut cache, Logits::Last)?;
            let next = argmax(logits.row(0));
            out.push(next);
            on_token(next);
            if stop.contains(&next) {
                break;
            }
            input = vec![next];
        }
        Ok(out)
    }
}
