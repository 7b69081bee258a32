//! Bad input gets an error that names the file and what is wrong, never a panic.

mod common;

use std::path::Path;

use common::*;
use kiln::model::gguf::GgufFile;
use kiln::model::{LoadError, Model};

const LLAMA: TinySpec = TinySpec { class: "LlamaForCausalLM", tied: false, bias: false, sliding_window: None };

fn load_err(path: &Path) -> LoadError {
    Model::load(path).expect_err("loading must fail")
}

fn assert_mentions(err: &LoadError, path: &Path, what: &str) {
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "error names the file: {msg}");
    assert!(msg.contains(what), "error says {what:?}: {msg}");
}

fn valid_gguf() -> Vec<u8> {
    tiny_gguf(LLAMA, &tiny_tensors(LLAMA, 9), &[]).to_bytes()
}

#[test]
fn wrong_magic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.gguf");
    let mut bytes = valid_gguf();
    bytes[..4].copy_from_slice(b"GGML");
    std::fs::write(&path, bytes).expect("write");
    let err = load_err(&path);
    assert_eq!(err.kind(), "format");
    assert_mentions(&err, &path, "not a GGUF file");
}

#[test]
fn truncated_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.gguf");
    let bytes = valid_gguf();
    // Cut in the tensor data: the infos promise more bytes than the file has.
    std::fs::write(&path, &bytes[..bytes.len() - 100]).expect("write");
    assert_mentions(&load_err(&path), &path, "runs past the end of the file");
    // Cut inside the header.
    std::fs::write(&path, &bytes[..200]).expect("write");
    assert_mentions(&load_err(&path), &path, "truncated");
    // Empty file.
    std::fs::write(&path, b"").expect("write");
    assert_mentions(&load_err(&path), &path, "truncated");
}

#[test]
fn unsupported_tensor_type() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.gguf");
    let mut w = tiny_gguf(LLAMA, &tiny_tensors(LLAMA, 9), &["blk.0.ffn_up.weight"]);
    // IQ2_XXS (type 16), 66 bytes per 256 values.
    w.tensor("blk.0.ffn_up.weight", &[256, 1], 16, vec![0; 66]);
    w.write(&path);
    let err = load_err(&path);
    assert_mentions(&err, &path, "blk.0.ffn_up.weight: unsupported tensor type IQ2_XXS");
}

#[test]
fn missing_tensor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.gguf");
    tiny_gguf(LLAMA, &tiny_tensors(LLAMA, 9), &["blk.1.ffn_down.weight"]).write(&path);
    let err = load_err(&path);
    assert_eq!(err.kind(), "missing_tensor");
    assert_mentions(&err, &path, "missing tensor blk.1.ffn_down.weight");

    let hf = dir.path().join("hf");
    let mut tensors = tiny_tensors(LLAMA, 9);
    tensors.remove("model.norm.weight");
    write_hf_dir(&hf, LLAMA, &tensors, Storage::SingleF32);
    assert_mentions(&load_err(&hf), &hf, "missing tensor model.norm.weight");
}

#[test]
fn shape_mismatch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hf = dir.path().join("hf");
    let mut tensors = tiny_tensors(LLAMA, 9);
    tensors.insert(
        "model.layers.1.mlp.up_proj.weight".into(),
        (vec![TINY_FFN, TINY_HIDDEN + 1], vec![0.0; TINY_FFN * (TINY_HIDDEN + 1)]),
    );
    write_hf_dir(&hf, LLAMA, &tensors, Storage::SingleF32);
    let err = load_err(&hf);
    assert_eq!(err.kind(), "shape_mismatch");
    assert_mentions(&err, &hf, "model.layers.1.mlp.up_proj.weight has shape [48, 33], expected [48, 32]");
}

#[test]
fn malformed_config_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hf = dir.path().join("hf");
    write_hf_dir(&hf, LLAMA, &tiny_tensors(LLAMA, 9), Storage::SingleF32);
    let config = hf.join("config.json");

    std::fs::write(&config, "{\"hidden_size\": 32,").expect("write");
    assert_mentions(&load_err(&hf), &config, "invalid JSON");

    let mut c = tiny_config(LLAMA);
    c["hidden_size"] = "wide".into();
    std::fs::write(&config, c.to_string()).expect("write");
    let err = load_err(&hf);
    assert_eq!(err.kind(), "config");
    assert_mentions(&err, &config, "hidden_size: \"wide\" is not an unsigned integer");

    let mut c = tiny_config(LLAMA);
    c["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    std::fs::write(&config, c.to_string()).expect("write");
    assert_mentions(&load_err(&hf), &config, "architectures: \"GPTNeoXForCausalLM\" is not supported");

    let mut c = tiny_config(LLAMA);
    c["num_key_value_heads"] = 3.into();
    std::fs::write(&config, c.to_string()).expect("write");
    assert_mentions(&load_err(&hf), &config, "num_key_value_heads: 3 does not divide num_attention_heads 2");

    let mut c = tiny_config(LLAMA);
    c["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0});
    std::fs::write(&config, c.to_string()).expect("write");
    assert_mentions(&load_err(&hf), &config, "rope_scaling");
}

#[test]
fn missing_tokenizer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hf = dir.path().join("hf");
    write_hf_dir(&hf, LLAMA, &tiny_tensors(LLAMA, 9), Storage::SingleF32);
    std::fs::remove_file(hf.join("tokenizer.json")).expect("rm");
    let err = load_err(&hf);
    assert_eq!(err.kind(), "tokenizer");
    assert_mentions(&err, &hf.join("tokenizer.json"), "file not found");

    // A GGUF without tokenizer metadata.
    let path = dir.path().join("model.gguf");
    let tensors = tiny_tensors(LLAMA, 9);
    let mut w = GgufWriter::default();
    w.meta("general.architecture", Meta::Str("llama".into()))
        .meta("llama.context_length", Meta::U32(64))
        .meta("llama.embedding_length", Meta::U32(TINY_HIDDEN as u32))
        .meta("llama.block_count", Meta::U32(TINY_LAYERS as u32))
        .meta("llama.feed_forward_length", Meta::U32(TINY_FFN as u32))
        .meta("llama.attention.head_count", Meta::U32(TINY_HEADS as u32))
        .meta("llama.attention.head_count_kv", Meta::U32(TINY_KV_HEADS as u32));
    for (name, (shape, data)) in &tensors {
        w.f32_tensor(&kiln::model::weights::gguf_name(name).expect("name"), shape, data);
    }
    w.write(&path);
    assert_mentions(&load_err(&path), &path, "tokenizer.ggml.model is missing");
}

#[test]
fn not_a_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = load_err(dir.path());
    assert_eq!(err.kind(), "unknown_source");
    let missing = dir.path().join("nope.gguf");
    assert_eq!(load_err(&missing).kind(), "io");
}

/// Headers whose counts and lengths would ask for huge allocations are refused before
/// anything is allocated.
#[test]
fn hostile_headers() {
    let path = Path::new("hostile.gguf");
    let header = |tensors: u64, kvs: u64| {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&tensors.to_le_bytes());
        b.extend_from_slice(&kvs.to_le_bytes());
        b
    };
    let err = GgufFile::from_bytes(path, header(1 << 60, 0)).expect_err("huge tensor count");
    assert!(err.to_string().contains("tensor count 1152921504606846976 cannot fit"), "{err}");

    let err = GgufFile::from_bytes(path, header(0, u64::MAX)).expect_err("huge metadata count");
    assert!(err.to_string().contains("metadata count"), "{err}");

    // One key whose string value claims 2^62 bytes.
    let mut b = header(0, 1);
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b'k');
    b.extend_from_slice(&8u32.to_le_bytes());
    b.extend_from_slice(&(1u64 << 62).to_le_bytes());
    let err = GgufFile::from_bytes(path, b).expect_err("huge string");
    assert!(err.to_string().contains("runs past the end of the file"), "{err}");

    // An array of u64::MAX u32 values.
    let mut b = header(0, 1);
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b'k');
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&4u32.to_le_bytes());
    b.extend_from_slice(&u64::MAX.to_le_bytes());
    let err = GgufFile::from_bytes(path, b).expect_err("huge array");
    assert!(err.to_string().contains("metadata k: array length"), "{err}");

    // Arrays nested past the limit.
    let mut b = header(0, 1);
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b'k');
    b.extend_from_slice(&9u32.to_le_bytes());
    for _ in 0..8 {
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
    }
    b.extend_from_slice(&[0; 64]);
    let err = GgufFile::from_bytes(path, b).expect_err("deep nesting");
    assert!(err.to_string().contains("nested deeper"), "{err}");

    // A tensor with dims whose product overflows, and one with 5 dims.
    for (n_dims, dim) in [(2u32, u64::MAX), (5, 1)] {
        let mut b = header(1, 0);
        b.extend_from_slice(&1u64.to_le_bytes());
        b.push(b't');
        b.extend_from_slice(&n_dims.to_le_bytes());
        for _ in 0..n_dims {
            b.extend_from_slice(&dim.to_le_bytes());
        }
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&[0; 64]);
        let err = GgufFile::from_bytes(path, b).expect_err("bad dims");
        assert!(err.to_string().contains("tensor t:"), "{err}");
    }

    // Version 1 is refused by name.
    let mut b = header(0, 0);
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    let err = GgufFile::from_bytes(path, b).expect_err("v1");
    assert!(err.to_string().contains("GGUF version 1 is not supported"), "{err}");
}
