//! Shared test helpers: the default model (loaded once per test binary), and writers for
//! small GGUF files and Hugging Face directories built in the tests.
#![allow(dead_code)]

use std::path::Path;
use std::sync::OnceLock;

use kiln::model::{default_model_path, Model};

/// SmolLM2-135M-Instruct from the cache `make setup` fills.
pub fn smollm2() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = default_model_path();
        assert!(path.is_file(), "{} is missing: run `make setup` (or `make test`) first", path.display());
        Model::load(&path).expect("SmolLM2 loads")
    })
}

/// A metadata value for [`GgufWriter`].
pub enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    F32s(Vec<f32>),
    I32s(Vec<i32>),
}

/// Writes GGUF v3 images: metadata and tensors given as raw bytes with a GGML type id.
#[derive(Default)]
pub struct GgufWriter {
    meta: Vec<(String, Meta)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl GgufWriter {
    pub fn meta(&mut self, key: &str, value: Meta) -> &mut Self {
        self.meta.push((key.to_string(), value));
        self
    }

    /// A tensor of GGML type `ty`; `dims` fastest first (GGML order).
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> &mut Self {
        self.tensors.push((name.to_string(), dims.to_vec(), ty, data));
        self
    }

    /// An F32 tensor with row-major `shape` (written with GGML's reversed dims).
    pub fn f32_tensor(&mut self, name: &str, shape: &[usize], data: &[f32]) -> &mut Self {
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, &dims, 0, bytes)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.meta.len() as u64).to_le_bytes());
        for (key, value) in &self.meta {
            put_str(&mut b, key);
            match value {
                Meta::U32(v) => {
                    b.extend_from_slice(&4u32.to_le_bytes());
                    b.extend_from_slice(&v.to_le_bytes());
                }
                Meta::F32(v) => {
                    b.extend_from_slice(&6u32.to_le_bytes());
                    b.extend_from_slice(&v.to_le_bytes());
                }
                Meta::Bool(v) => {
                    b.extend_from_slice(&7u32.to_le_bytes());
                    b.push(*v as u8);
                }
                Meta::Str(s) => {
                    b.extend_from_slice(&8u32.to_le_bytes());
                    put_str(&mut b, s);
                }
                Meta::Strs(items) => {
                    b.extend_from_slice(&9u32.to_le_bytes());
                    b.extend_from_slice(&8u32.to_le_bytes());
                    b.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    for s in items {
                        put_str(&mut b, s);
                    }
                }
                Meta::F32s(items) => {
                    b.extend_from_slice(&9u32.to_le_bytes());
                    b.extend_from_slice(&6u32.to_le_bytes());
                    b.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    items.iter().for_each(|v| b.extend_from_slice(&v.to_le_bytes()));
                }
                Meta::I32s(items) => {
                    b.extend_from_slice(&9u32.to_le_bytes());
                    b.extend_from_slice(&5u32.to_le_bytes());
                    b.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    items.iter().for_each(|v| b.extend_from_slice(&v.to_le_bytes()));
                }
            }
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (name, dims, ty, data) in &self.tensors {
            put_str(&mut b, name);
            b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| b.extend_from_slice(&d.to_le_bytes()));
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        pad32(&mut b);
        for (_, _, _, data) in &self.tensors {
            b.extend_from_slice(data);
            pad32(&mut b);
        }
        b
    }

    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.to_bytes()).expect("writes GGUF");
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

fn pad32(b: &mut Vec<u8>) {
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
}

/// What a tiny synthetic model looks like.
#[derive(Clone, Copy)]
pub struct TinySpec {
    /// Hugging Face class name.
    pub class: &'static str,
    /// lm_head tied to the embedding.
    pub tied: bool,
    /// q/k/v biases.
    pub bias: bool,
    /// Mistral sliding window.
    pub sliding_window: Option<usize>,
}

pub const TINY_HIDDEN: usize = 32;
pub const TINY_HEADS: usize = 2;
pub const TINY_KV_HEADS: usize = 1;
pub const TINY_HEAD_DIM: usize = 16;
pub const TINY_FFN: usize = 48;
pub const TINY_LAYERS: usize = 2;
pub const TINY_ROPE_THETA: f32 = 10_000.0;
pub const TINY_EPS: f32 = 1e-5;

/// Tensors by Hugging Face name: (row-major shape, values).
pub type Tensors = std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// GPT-2's byte → printable character map (bytes that print as themselves keep their
/// code point; the rest move to 256 + n).
pub fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("valid")
            } else {
                extra += 1;
                char::from_u32(255 + extra).expect("valid")
            }
        })
        .collect()
}

/// The tiny byte-level vocabulary: 256 byte tokens, four merges, one control token.
pub fn tiny_vocab() -> (Vec<String>, Vec<String>, Vec<i32>) {
    let mut tokens: Vec<String> = byte_chars().into_iter().map(String::from).collect();
    let merges = ["h e", "l l", "Ġ w", "o r"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    tokens.push("<|endoftext|>".into());
    let mut types = vec![1; tokens.len()];
    *types.last_mut().expect("non-empty") = 3;
    (tokens, merges.iter().map(|m| m.to_string()).collect(), types)
}

pub fn tiny_vocab_size() -> usize {
    tiny_vocab().0.len()
}

/// Random tensors for `spec`, every value exactly representable in bf16 so that F32 and
/// BF16 files hold the same numbers.
pub fn tiny_tensors(spec: TinySpec, seed: u64) -> Tensors {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut t = Tensors::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n = shape.iter().product();
        let data =
            (0..n).map(|_| half::bf16::from_f32(offset + scale * (rng.random::<f32>() * 2.0 - 1.0)).to_f32()).collect();
        t.insert(name, (shape, data));
    };
    let (h, v) = (TINY_HIDDEN, tiny_vocab_size());
    let (q, kv) = (TINY_HEADS * TINY_HEAD_DIM, TINY_KV_HEADS * TINY_HEAD_DIM);
    add("model.embed_tokens.weight".into(), vec![v, h], 1.0, 0.0);
    for i in 0..TINY_LAYERS {
        let p = format!("model.layers.{i}");
        add(format!("{p}.input_layernorm.weight"), vec![h], 0.2, 1.0);
        add(format!("{p}.self_attn.q_proj.weight"), vec![q, h], 0.3, 0.0);
        add(format!("{p}.self_attn.k_proj.weight"), vec![kv, h], 0.3, 0.0);
        add(format!("{p}.self_attn.v_proj.weight"), vec![kv, h], 0.3, 0.0);
        if spec.bias {
            add(format!("{p}.self_attn.q_proj.bias"), vec![q], 0.5, 0.0);
            add(format!("{p}.self_attn.k_proj.bias"), vec![kv], 0.5, 0.0);
            add(format!("{p}.self_attn.v_proj.bias"), vec![kv], 0.5, 0.0);
        }
        add(format!("{p}.self_attn.o_proj.weight"), vec![h, q], 0.2, 0.0);
        add(format!("{p}.post_attention_layernorm.weight"), vec![h], 0.2, 1.0);
        add(format!("{p}.mlp.gate_proj.weight"), vec![TINY_FFN, h], 0.2, 0.0);
        add(format!("{p}.mlp.up_proj.weight"), vec![TINY_FFN, h], 0.2, 0.0);
        add(format!("{p}.mlp.down_proj.weight"), vec![h, TINY_FFN], 0.2, 0.0);
    }
    add("model.norm.weight".into(), vec![h], 0.2, 1.0);
    if !spec.tied {
        add("lm_head.weight".into(), vec![v, h], 0.5, 0.0);
    }
    t
}

/// llama.cpp's converter permutation of Q/K rows (the inverse of what kiln undoes).
pub fn permute_rotary_rows(data: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let gguf = (h * head_dim + 2 * i + j) * cols;
                let hf = (h * head_dim + j * half + i) * cols;
                out[gguf..gguf + cols].copy_from_slice(&data[hf..hf + cols]);
            }
        }
    }
    out
}

/// A GGUF image of `tensors` as llama.cpp's converter writes it (Q/K rows permuted for
/// `llama`), with the tiny byte-level tokenizer. `skip` names GGUF tensors to leave out.
pub fn tiny_gguf(spec: TinySpec, tensors: &Tensors, skip: &[&str]) -> GgufWriter {
    let arch = if spec.class == "Qwen2ForCausalLM" { "qwen2" } else { "llama" };
    let (tokens, merges, types) = tiny_vocab();
    let mut w = GgufWriter::default();
    w.meta("general.architecture", Meta::Str(arch.into()))
        .meta(&format!("{arch}.context_length"), Meta::U32(64))
        .meta(&format!("{arch}.embedding_length"), Meta::U32(TINY_HIDDEN as u32))
        .meta(&format!("{arch}.block_count"), Meta::U32(TINY_LAYERS as u32))
        .meta(&format!("{arch}.feed_forward_length"), Meta::U32(TINY_FFN as u32))
        .meta(&format!("{arch}.attention.head_count"), Meta::U32(TINY_HEADS as u32))
        .meta(&format!("{arch}.attention.head_count_kv"), Meta::U32(TINY_KV_HEADS as u32))
        .meta(&format!("{arch}.rope.freq_base"), Meta::F32(TINY_ROPE_THETA))
        .meta(&format!("{arch}.attention.layer_norm_rms_epsilon"), Meta::F32(TINY_EPS))
        .meta("tokenizer.ggml.model", Meta::Str("gpt2".into()))
        .meta("tokenizer.ggml.pre", Meta::Str("gpt-2".into()))
        .meta("tokenizer.ggml.tokens", Meta::Strs(tokens.clone()))
        .meta("tokenizer.ggml.token_type", Meta::I32s(types))
        .meta("tokenizer.ggml.merges", Meta::Strs(merges))
        .meta("tokenizer.ggml.eos_token_id", Meta::U32(tokens.len() as u32 - 1));
    for (name, (shape, data)) in tensors {
        let gguf = kiln::model::weights::gguf_name(name).expect("every tiny tensor has a GGUF name");
        if skip.contains(&gguf.as_str()) {
            continue;
        }
        let heads = if name.ends_with("q_proj.weight") {
            Some(TINY_HEADS)
        } else if name.ends_with("k_proj.weight") {
            Some(TINY_KV_HEADS)
        } else {
            None
        };
        match heads {
            Some(heads) if arch == "llama" => {
                let permuted = permute_rotary_rows(data, heads, TINY_HEAD_DIM, shape[1]);
                w.f32_tensor(&gguf, shape, &permuted)
            }
            _ => w.f32_tensor(&gguf, shape, data),
        };
    }
    w
}

/// How a Hugging Face directory stores its tensors.
#[derive(Clone, Copy, PartialEq)]
pub enum Storage {
    /// One `model.safetensors`, F32.
    SingleF32,
    /// Two BF16 shards with `model.safetensors.index.json`.
    ShardedBf16,
}

/// `config.json` for `spec`.
pub fn tiny_config(spec: TinySpec) -> serde_json::Value {
    let mut c = serde_json::json!({
        "architectures": [spec.class],
        "vocab_size": tiny_vocab_size(),
        "hidden_size": TINY_HIDDEN,
        "intermediate_size": TINY_FFN,
        "num_hidden_layers": TINY_LAYERS,
        "num_attention_heads": TINY_HEADS,
        "num_key_value_heads": TINY_KV_HEADS,
        "rope_theta": TINY_ROPE_THETA,
        "rms_norm_eps": TINY_EPS,
        "max_position_embeddings": 64,
        "tie_word_embeddings": spec.tied,
        "eos_token_id": tiny_vocab_size() - 1,
    });
    if spec.class == "LlamaForCausalLM" {
        c["attention_bias"] = spec.bias.into();
    }
    if let Some(w) = spec.sliding_window {
        c["sliding_window"] = w.into();
    }
    c
}

/// Writes a Hugging Face directory: config.json, safetensors, and the tiny tokenizer.json
/// (as kiln writes it from the GGUF vocabulary).
pub fn write_hf_dir(dir: &Path, spec: TinySpec, tensors: &Tensors, storage: Storage) {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(dir.join("config.json"), tiny_config(spec).to_string()).expect("config");
    let encode = |data: &[f32]| -> Vec<u8> {
        match storage {
            Storage::SingleF32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Storage::ShardedBf16 => data.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        }
    };
    let dtype = if storage == Storage::SingleF32 { Dtype::F32 } else { Dtype::BF16 };
    type Encoded = (String, Vec<usize>, Vec<u8>);
    let bytes: Vec<Encoded> =
        tensors.iter().map(|(n, (shape, data))| (n.clone(), shape.clone(), encode(data))).collect();
    let shards: Vec<(String, Vec<&Encoded>)> = match storage {
        Storage::SingleF32 => vec![("model.safetensors".into(), bytes.iter().collect())],
        Storage::ShardedBf16 => {
            let (a, b): (Vec<_>, Vec<_>) =
                bytes.iter().partition(|(n, _, _)| n.contains("layers.0") || n.contains("embed"));
            vec![("model-00001-of-00002.safetensors".into(), a), ("model-00002-of-00002.safetensors".into(), b)]
        }
    };
    let mut weight_map = serde_json::Map::new();
    for (file, items) in &shards {
        let views: Vec<(String, TensorView)> = items
            .iter()
            .map(|(n, shape, b)| (n.clone(), TensorView::new(dtype, shape.clone(), b).expect("view")))
            .collect();
        for (n, _) in &views {
            weight_map.insert(n.clone(), file.clone().into());
        }
        safetensors::serialize_to_file(views, &None, &dir.join(file)).expect("safetensors");
    }
    if storage == Storage::ShardedBf16 {
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).expect("index");
    }
    let vocab_only = tiny_gguf(spec, &Tensors::new(), &[]).to_bytes();
    let file = kiln::model::gguf::GgufFile::from_bytes(Path::new("vocab.gguf"), vocab_only).expect("parses");
    let tokenizer = kiln::model::tokenizer::from_gguf(&file).expect("tiny tokenizer builds");
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_json().expect("json")).expect("tokenizer");
}

/// Logits of `ids` computed from the raw tensors with plain scalar loops in f64, no
/// cache, no kiln code: an independent check of the reference forward.
pub fn naive_logits(spec: TinySpec, t: &Tensors, ids: &[u32]) -> Vec<Vec<f64>> {
    let get = |n: &str| &t[n].1;
    let (hd, heads, kvh) = (TINY_HEAD_DIM, TINY_HEADS, TINY_KV_HEADS);
    let matvec = |w: &[f32], x: &[f64], rows: usize| -> Vec<f64> {
        let cols = x.len();
        (0..rows).map(|r| (0..cols).map(|c| w[r * cols + c] as f64 * x[c]).sum()).collect()
    };
    let norm = |x: &[f64], w: &[f32]| -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let inv = 1.0 / (ms + TINY_EPS as f64).sqrt();
        x.iter().zip(w).map(|(v, g)| v * inv * *g as f64).collect()
    };
    let rope = |v: &mut [f64], pos: usize| {
        let half = hd / 2;
        for i in 0..half {
            let freq = 1.0 / (TINY_ROPE_THETA as f64).powf(2.0 * i as f64 / hd as f64);
            let (s, c) = (pos as f64 * freq).sin_cos();
            let (a, b) = (v[i], v[i + half]);
            v[i] = a * c - b * s;
            v[i + half] = b * c + a * s;
        }
    };
    let h = TINY_HIDDEN;
    let mut x: Vec<Vec<f64>> = ids
        .iter()
        .map(|&id| get("model.embed_tokens.weight")[id as usize * h..][..h].iter().map(|&v| v as f64).collect())
        .collect();
    for l in 0..TINY_LAYERS {
        let p = format!("model.layers.{l}");
        let proj = |name: &str, inp: &[f64], rows: usize| {
            let mut y = matvec(get(&format!("{p}.{name}.weight")), inp, rows);
            if spec.bias && name != "self_attn.o_proj" && name.starts_with("self_attn") {
                y.iter_mut().zip(get(&format!("{p}.{name}.bias"))).for_each(|(y, b)| *y += *b as f64);
            }
            y
        };
        let (mut qs, mut ks, mut vs) = (vec![], vec![], vec![]);
        for (pos, xt) in x.iter().enumerate() {
            let hn = norm(xt, get(&format!("{p}.input_layernorm.weight")));
            let mut q = proj("self_attn.q_proj", &hn, heads * hd);
            let mut k = proj("self_attn.k_proj", &hn, kvh * hd);
            q.chunks_mut(hd).for_each(|c| rope(c, pos));
            k.chunks_mut(hd).for_each(|c| rope(c, pos));
            qs.push(q);
            ks.push(k);
            vs.push(proj("self_attn.v_proj", &hn, kvh * hd));
        }
        for t in 0..x.len() {
            let mut attn = vec![0f64; heads * hd];
            for head in 0..heads {
                let g = head / (heads / kvh);
                let visible: Vec<usize> = (0..=t).filter(|&s| spec.sliding_window.is_none_or(|w| t - s < w)).collect();
                let scores: Vec<f64> = visible
                    .iter()
                    .map(|&s| {
                        (0..hd).map(|d| qs[t][head * hd + d] * ks[s][g * hd + d]).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                for (e, &s) in exps.iter().zip(&visible) {
                    for d in 0..hd {
                        attn[head * hd + d] += e / sum * vs[s][g * hd + d];
                    }
                }
            }
            let o = proj("self_attn.o_proj", &attn, h);
            x[t].iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let hn = norm(&x[t], get(&format!("{p}.post_attention_layernorm.weight")));
            let gate = proj("mlp.gate_proj", &hn, TINY_FFN);
            let up = proj("mlp.up_proj", &hn, TINY_FFN);
            let act: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            let down = proj("mlp.down_proj", &act, h);
            x[t].iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
    }
    let head = if spec.tied { get("model.embed_tokens.weight") } else { get("lm_head.weight") };
    x.iter().map(|xt| matvec(head, &norm(xt, get("model.norm.weight")), tiny_vocab_size())).collect()
}

/// The repository root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the `kiln` binary built for these tests.
pub fn kiln(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).current_dir(repo()).output().expect("kiln runs")
}

/// The artifact of default recipe `export/NAME.toml`, exported once (by the `kiln` binary,
/// so every test binary shares `export/out/NAME` and skips it when up to date).
pub fn artifact(name: &str) -> std::path::PathBuf {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let recipe = format!("export/{name}.toml");
    let out = kiln(&["export", &recipe]);
    assert!(out.status.success(), "kiln export {recipe}: {}", String::from_utf8_lossy(&out.stderr));
    repo().join("export/out").join(name)
}

/// The Python of the venv `make setup` creates (`KILN_PYTHON` overrides).
pub fn python() -> std::path::PathBuf {
    match std::env::var_os("KILN_PYTHON") {
        Some(p) => p.into(),
        None => {
            let p = repo().join(".venv/bin/python");
            assert!(p.is_file(), "{} is missing: run `make setup` first", p.display());
            p
        }
    }
}

/// Writes a recipe file and returns its path.
pub fn write_recipe(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("recipe");
    path
}

/// The weights a recipe's artifact holds: each matrix through its scheme and back.
pub fn reconstructed_weights(
    weights: &kiln::model::Weights,
    recipe: &kiln::onnx::recipe::Recipe,
) -> kiln::model::Weights {
    use kiln::quant::{quantize, Precision};
    use ndarray::Array2;
    let round_trip = |name: &str, w: &Array2<f32>| -> Array2<f32> {
        let scheme = recipe.scheme_for(name);
        match (scheme.precision, quantize(w.view(), &scheme)) {
            (_, Some(q)) => q.dequantize(),
            (Precision::Fp16, None) => w.mapv(|v| half::f16::from_f32(v).to_f32()),
            _ => w.clone(),
        }
    };
    let mut out = weights.clone();
    out.embed_tokens = round_trip("model.embed_tokens.weight", &weights.embed_tokens);
    out.lm_head = Some(round_trip("lm_head.weight", weights.lm_head()));
    for (i, l) in out.layers.iter_mut().enumerate() {
        for (name, lin) in l.linears_mut() {
            lin.weight = round_trip(&format!("model.layers.{i}.{name}.weight"), &lin.weight);
        }
    }
    out
}
