//! The model's own tokenizer as a Hugging Face `tokenizers::Tokenizer`, built from GGUF
//! metadata (`tokenizer.ggml.*`) or read from a directory's `tokenizer.json`.
//!
//! GGUF vocabularies come in two kinds:
//! - `gpt2`: byte-level BPE with explicit merges. The pre-tokenizer is named by
//!   `tokenizer.ggml.pre` and must split text exactly as llama.cpp does (for `smollm`,
//!   every digit on its own, then the GPT-2 pattern).
//! - `llama`: a SentencePiece vocabulary with scores and byte-fallback tokens. It becomes a
//!   BPE whose merges are ranked by the score of the merged piece, the same construction
//!   Hugging Face uses to convert SentencePiece models.
//!
//! Control tokens (type 3) and user-defined tokens (type 4) become added tokens, so text
//! such as `<|im_start|>` is recognised as one token.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use serde_json::{json, Value as Json};
use tokenizers::Tokenizer;

use super::gguf::{GgufFile, Value};
use super::LoadError;

/// Token type codes of `tokenizer.ggml.token_type`.
const TYPE_NORMAL: i64 = 1;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// Llama 3's pattern (`llama-bpe`): numbers in groups of up to three.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pattern: every digit alone.
const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Errors while encoding or decoding text.
#[derive(Debug, thiserror::Error)]
#[error("tokenizer: {reason}")]
pub struct TokenizerError {
    /// What went wrong.
    pub reason: String,
}

/// A tokenizer together with the ids and template that generation needs.
#[derive(Debug, Clone)]
pub struct ModelTokenizer {
    inner: Tokenizer,
    /// Beginning-of-sequence token, if the vocabulary has one.
    pub bos_id: Option<u32>,
    /// Tokens that end generation.
    pub eos_ids: Vec<u32>,
    /// Whether prompts start with `bos_id` (the tokenizer's post-processor adds it).
    pub add_bos: bool,
    /// The model's chat template (Jinja), if it ships one.
    pub chat_template: Option<String>,
    /// Tokens, added ones included (`Tokenizer::get_vocab_size` builds the whole vocabulary
    /// map on every call: 10-30 ms, once per request before this was kept).
    vocab_size: usize,
}

impl ModelTokenizer {
    /// Wraps a Hugging Face tokenizer.
    pub fn new(inner: Tokenizer, bos_id: Option<u32>, eos_ids: Vec<u32>, chat_template: Option<String>) -> Self {
        let add_bos = match bos_id {
            Some(bos) => inner.encode("a", true).map(|e| e.get_ids().first() == Some(&bos)).unwrap_or(false),
            None => false,
        };
        let vocab_size = inner.get_vocab_size(true);
        ModelTokenizer { inner, bos_id, eos_ids, add_bos, chat_template, vocab_size }
    }

    /// The underlying Hugging Face tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Token ids of `text` as written: special tokens in the text are recognised, no BOS
    /// is added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode_with(text, false)
    }

    /// Token ids of a prompt: as [`encode`](Self::encode), with BOS first when the model
    /// expects it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode_with(text, true)
    }

    fn encode_with(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode(text, add_special).map_err(|e| TokenizerError { reason: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, true).map_err(|e| TokenizerError { reason: e.to_string() })
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The tokenizer in Hugging Face `tokenizer.json` form.
    pub fn to_json(&self) -> Result<String, TokenizerError> {
        self.inner.to_string(true).map_err(|e| TokenizerError { reason: e.to_string() })
    }

    /// sha256 over the vocabulary (`id\tpiece\n` in id order, added tokens included): two
    /// tokenizers with the same hash map every id to the same piece.
    pub fn vocab_sha256(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut vocab: Vec<(u32, String)> = self.inner.get_vocab(true).into_iter().map(|(p, i)| (i, p)).collect();
        vocab.sort();
        let mut h = Sha256::new();
        for (id, piece) in vocab {
            h.update(format!("{id}\t{piece}\n").as_bytes());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A one-line description: model type, vocabulary size, special ids.
    pub fn summary(&self) -> String {
        let model = match serde_json::to_value(self.inner.get_model()) {
            Ok(v) => v.get("type").and_then(Json::as_str).unwrap_or("?").to_string(),
            Err(_) => "?".into(),
        };
        let name = |id: Option<u32>| {
            id.and_then(|i| self.inner.id_to_token(i)).map(|t| format!("{t:?}")).unwrap_or_else(|| "-".into())
        };
        let eos: Vec<String> = self.eos_ids.iter().map(|&i| format!("{} {}", i, name(Some(i)))).collect();
        format!(
            "{model}, {} tokens, bos {} {}, eos [{}], add_bos {}, chat template {}",
            self.vocab_size(),
            self.bos_id.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
            name(self.bos_id),
            eos.join(", "),
            self.add_bos,
            if self.chat_template.is_some() { "yes" } else { "no" }
        )
    }
}

/// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
pub fn from_gguf(file: &GgufFile) -> Result<ModelTokenizer, LoadError> {
    let path = file.path();
    let err = |reason: String| LoadError::Tokenizer { path: path.to_path_buf(), reason };
    let model = file
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .ok_or_else(|| err("tokenizer.ggml.model is missing: the file carries no tokenizer".into()))?;
    let tokens: Vec<&str> =
        string_array(file, "tokenizer.ggml.tokens")?.ok_or_else(|| err("tokenizer.ggml.tokens is missing".into()))?;
    let types: Vec<i64> = match file.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
        Some(a) => a.iter().map(|v| v.as_i64().unwrap_or(TYPE_NORMAL)).collect(),
        None => vec![TYPE_NORMAL; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(err(format!("tokenizer.ggml.token_type has {} entries for {} tokens", types.len(), tokens.len())));
    }
    let id = |key: &str| -> Result<Option<u32>, LoadError> {
        match file.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(i) if (i as usize) < tokens.len() => Ok(Some(i as u32)),
                _ => Err(err(format!("{key} = {v} is not a token id below {}", tokens.len()))),
            },
        }
    };
    let bos = id("tokenizer.ggml.bos_token_id")?;
    let eos = id("tokenizer.ggml.eos_token_id")?;
    let eot = id("tokenizer.ggml.eot_token_id")?;
    let unk = id("tokenizer.ggml.unknown_token_id")?;
    let flag = |key: &str| file.get(key).and_then(Value::as_bool);
    let add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(model == "llama");

    let spec = match model {
        "gpt2" => {
            let pre = file.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
            let merges = string_array(file, "tokenizer.ggml.merges")?
                .ok_or_else(|| err("tokenizer.ggml.merges is missing (needed for a gpt2 vocabulary)".into()))?;
            byte_level_bpe(&tokens, &merges, pre).map_err(err)?
        }
        "llama" => {
            let scores: Vec<f32> = match file.get("tokenizer.ggml.scores").and_then(Value::as_array) {
                Some(a) => a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect(),
                None => return Err(err("tokenizer.ggml.scores is missing (needed for a llama vocabulary)".into())),
            };
            if scores.len() != tokens.len() {
                return Err(err(format!("{} scores for {} tokens", scores.len(), tokens.len())));
            }
            let add_space_prefix = flag("tokenizer.ggml.add_space_prefix").unwrap_or(true);
            sentencepiece_bpe(&tokens, &scores, &types, unk, add_space_prefix)
        }
        other => return Err(err(format!("tokenizer.ggml.model {other:?} is not supported (gpt2, llama are)"))),
    };
    let added: Vec<Json> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &t))| t == TYPE_CONTROL || t == TYPE_USER_DEFINED)
        .map(|(i, (content, &t))| {
            json!({"id": i, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": t == TYPE_CONTROL})
        })
        .collect();
    let post = match (add_bos, bos) {
        (true, Some(bos)) => {
            let content = tokens[bos as usize];
            json!({"type": "TemplateProcessing",
                   "single": [{"SpecialToken": {"id": content, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                   "pair": [{"SpecialToken": {"id": content, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                            {"SpecialToken": {"id": content, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                   "special_tokens": {content: {"id": content, "ids": [bos], "tokens": [content]}}})
        }
        _ => Json::Null,
    };
    let doc = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": spec.normalizer,
        "pre_tokenizer": spec.pre_tokenizer,
        "post_processor": post,
        "decoder": spec.decoder,
        "model": spec.model,
    });
    let inner = Tokenizer::from_str(&doc.to_string()).map_err(|e| err(e.to_string()))?;
    let mut eos_ids: Vec<u32> = eos.into_iter().chain(eot).collect();
    eos_ids.dedup();
    let chat_template = file.get("tokenizer.chat_template").and_then(Value::as_str).map(str::to_string);
    Ok(ModelTokenizer::new(inner, bos, eos_ids, chat_template))
}

/// Reads a directory's `tokenizer.json` (and the special ids the caller found).
pub fn from_file(
    path: &Path,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    chat_template: Option<String>,
) -> Result<ModelTokenizer, LoadError> {
    if !path.is_file() {
        return Err(LoadError::Tokenizer { path: path.to_path_buf(), reason: "file not found".into() });
    }
    let inner = Tokenizer::from_file(path)
        .map_err(|e| LoadError::Tokenizer { path: path.to_path_buf(), reason: e.to_string() })?;
    Ok(ModelTokenizer::new(inner, bos_id, eos_ids, chat_template))
}

fn string_array<'a>(file: &'a GgufFile, key: &str) -> Result<Option<Vec<&'a str>>, LoadError> {
    let Some(v) = file.get(key) else {
        return Ok(None);
    };
    let bad = || LoadError::Tokenizer {
        path: file.path().to_path_buf(),
        reason: format!("{key} is not an array of strings"),
    };
    let arr = v.as_array().ok_or_else(bad)?;
    arr.iter().map(|v| v.as_str().ok_or_else(bad)).collect::<Result<Vec<_>, _>>().map(Some)
}

/// The parts of a `tokenizer.json` that differ between vocabulary kinds.
struct Spec {
    normalizer: Json,
    pre_tokenizer: Json,
    decoder: Json,
    model: Json,
}

fn vocab_map(tokens: &[&str]) -> serde_json::Map<String, Json> {
    let mut vocab = serde_json::Map::new();
    for (i, t) in tokens.iter().enumerate() {
        // Keep the first id of a duplicated piece.
        vocab.entry(t.to_string()).or_insert(json!(i));
    }
    vocab
}

fn byte_level_bpe(tokens: &[&str], merges: &[&str], pre: &str) -> Result<Spec, String> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    // Names as llama.cpp spells `tokenizer.ggml.pre`; each maps to the split llama.cpp applies.
    let (pre_tokenizer, ignore_merges) = match pre {
        "default" | "gpt-2" | "gpt2" => (byte_level(true), false),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            false,
        ),
        "llama-bpe" | "llama3" => {
            (json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_PATTERN), byte_level(false)]}), true)
        }
        "qwen2" | "deepseek-r1-qwen" => {
            (json!({"type": "Sequence", "pretokenizers": [split(QWEN2_PATTERN), byte_level(false)]}), false)
        }
        other => {
            return Err(format!(
                "tokenizer.ggml.pre {other:?} is not supported (gpt-2, smollm, llama-bpe, qwen2 and their aliases are)"
            ))
        }
    };
    let mut pairs = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        let (a, b) = m
            .split_once(' ')
            .ok_or_else(|| format!("tokenizer.ggml.merges[{i}] = {m:?} is not two pieces separated by a space"))?;
        pairs.push(json!([a, b]));
    }
    Ok(Spec {
        normalizer: Json::Null,
        pre_tokenizer,
        decoder: json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
        model: json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": ignore_merges, "vocab": vocab_map(tokens), "merges": pairs}),
    })
}

/// Merges of a SentencePiece vocabulary: every split of a normal piece into two pieces
/// that are both in the vocabulary, ranked by the merged piece's score (highest first).
pub fn sentencepiece_merges(tokens: &[&str], scores: &[f32], types: &[i64]) -> Vec<(u32, u32)> {
    let index: HashMap<&str, u32> = tokens.iter().enumerate().rev().map(|(i, t)| (*t, i as u32)).collect();
    let mut merges: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types[id] != TYPE_NORMAL {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (index.get(&piece[..at]), index.get(&piece[at..])) {
                merges.push((scores[id], id as u32, l, r));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)).then(a.3.cmp(&b.3)));
    merges.into_iter().map(|(_, _, l, r)| (l, r)).collect()
}

fn sentencepiece_bpe(tokens: &[&str], scores: &[f32], types: &[i64], unk: Option<u32>, add_space_prefix: bool) -> Spec {
    let merges: Vec<Json> = sentencepiece_merges(tokens, scores, types)
        .into_iter()
        .map(|(l, r)| json!([tokens[l as usize], tokens[r as usize]]))
        .collect();
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let normalizer = if add_space_prefix {
        json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, replace]})
    } else {
        replace
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Spec {
        normalizer,
        pre_tokenizer: Json::Null,
        decoder: json!({"type": "Sequence", "decoders": decoders}),
        model: json!({"type": "BPE", "dropout": null, "unk_token": unk.map(|u| tokens[u as usize]),
                      "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
                      "byte_fallback": true, "ignore_merges": false, "vocab": vocab_map(tokens), "merges": merges}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SentencePiece-style vocabulary: merges follow the merged piece's score, unknown
    /// characters fall back to byte tokens, and a space prefix is added and removed.
    #[test]
    fn sentencepiece_vocabulary() {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2, 3, 3];
        let mut scores = vec![0.0, 0.0, 0.0];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        let pieces = [
            ("▁hello", -1.0),
            ("▁he", -2.0),
            ("llo", -3.0),
            ("ll", -4.0),
            ("▁h", -5.0),
            ("he", -6.0),
            ("▁", -7.0),
            ("h", -8.0),
            ("e", -9.0),
            ("l", -10.0),
            ("o", -11.0),
        ];
        for (p, s) in pieces {
            tokens.push(p.into());
            types.push(TYPE_NORMAL);
            scores.push(s);
        }
        let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let id = |p: &str| refs.iter().position(|t| *t == p).expect("piece") as u32;
        let merges = sentencepiece_merges(&refs, &scores, &types);
        // Highest-scoring merged piece first; all splits of a piece share its rank group.
        assert_eq!(merges[0], (id("▁he"), id("llo")));
        assert!(merges.contains(&(id("▁"), id("h"))));

        let spec = sentencepiece_bpe(&refs, &scores, &types, Some(0), true);
        let doc = json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": spec.normalizer, "pre_tokenizer": spec.pre_tokenizer, "post_processor": null,
            "decoder": spec.decoder, "model": spec.model});
        let tok = ModelTokenizer::new(Tokenizer::from_str(&doc.to_string()).expect("builds"), Some(1), vec![2], None);
        let ids = tok.encode("hello z").expect("encodes");
        assert_eq!(ids, [id("▁hello"), id("▁"), id("<0x7A>")]);
        assert_eq!(tok.decode(&ids).expect("decodes"), "hello z");
    }

    #[test]
    fn unknown_pre_tokenizer_is_named() {
        let err = byte_level_bpe(&["a"], &[], "mystery").err().expect("refused");
        assert!(err.contains("tokenizer.ggml.pre \"mystery\" is not supported"), "{err}");
    }
}
