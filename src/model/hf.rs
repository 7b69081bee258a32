//! A [`Model`] from a Hugging Face directory: `config.json`, `*.safetensors` (single or
//! sharded through `model.safetensors.index.json`; F32, F16 or BF16) and `tokenizer.json`
//! (with `tokenizer_config.json` for the chat template when present).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::{Map, Value as Json};

use super::weights::{Tensor, TensorSource, Weights};
use super::{tokenizer, Architecture, LoadError, Model, ModelConfig, SourceKind};

pub(crate) fn load(dir: &Path) -> Result<Model, LoadError> {
    let config_path = dir.join("config.json");
    let raw = read_json(&config_path)?;
    let config = config_from_json(&config_path, &raw)?;
    let src = SafetensorsDir::open(dir)?;
    let weights = Weights::read(&config, &src)?;
    let tok_path = dir.join("tokenizer.json");
    let mut eos_ids = token_ids(&config_path, &raw, "eos_token_id")?;
    let gen_path = dir.join("generation_config.json");
    if gen_path.is_file() {
        let gen_ids = token_ids(&gen_path, &read_json(&gen_path)?, "eos_token_id")?;
        if !gen_ids.is_empty() {
            eos_ids = gen_ids;
        }
    }
    let bos_id = token_ids(&config_path, &raw, "bos_token_id")?.first().copied();
    let tokenizer = tokenizer::from_file(&tok_path, bos_id, eos_ids, chat_template(dir)?)?;
    Ok(Model { path: dir.to_path_buf(), source: SourceKind::HfDir, config, weights, tokenizer })
}

fn read_json(path: &Path) -> Result<Json, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text)
        .map_err(|e| LoadError::Format { path: path.to_path_buf(), reason: format!("invalid JSON: {e}") })
}

/// Reads `key` as one token id or a list of them (absent or null: none).
fn token_ids(path: &Path, json: &Json, key: &str) -> Result<Vec<u32>, LoadError> {
    let bad = || LoadError::Config {
        path: path.to_path_buf(),
        field: key.into(),
        reason: "not a token id or a list of them".into(),
    };
    let as_id = |v: &Json| v.as_u64().and_then(|i| u32::try_from(i).ok()).ok_or_else(bad);
    match json.get(key) {
        None | Some(Json::Null) => Ok(vec![]),
        Some(Json::Array(a)) => a.iter().map(as_id).collect(),
        Some(v) => Ok(vec![as_id(v)?]),
    }
}

fn chat_template(dir: &Path) -> Result<Option<String>, LoadError> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let json = read_json(&path)?;
    Ok(match json.get("chat_template") {
        Some(Json::String(s)) => Some(s.clone()),
        // A list of named templates: take "default".
        Some(Json::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    })
}

/// Resolves `config.json` into a [`ModelConfig`]; errors name the field.
pub(crate) fn config_from_json(path: &Path, json: &Json) -> Result<ModelConfig, LoadError> {
    let bad = |field: &str, reason: String| LoadError::Config { path: path.to_path_buf(), field: field.into(), reason };
    let obj: &Map<String, Json> = json.as_object().ok_or_else(|| bad("(top level)", "not a JSON object".into()))?;
    let present = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let uint = |k: &str| -> Result<Option<usize>, LoadError> {
        match present(k) {
            None => Ok(None),
            Some(v) => {
                v.as_u64().map(|v| Some(v as usize)).ok_or_else(|| bad(k, format!("{v} is not an unsigned integer")))
            }
        }
    };
    let need = |k: &str| uint(k)?.ok_or_else(|| bad(k, "missing".into()));
    let float = |k: &str| -> Result<Option<f64>, LoadError> {
        match present(k) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| bad(k, format!("{v} is not a number"))),
        }
    };
    let flag = |k: &str| -> Result<Option<bool>, LoadError> {
        match present(k) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| bad(k, format!("{v} is not true or false"))),
        }
    };
    let class = present("architectures")
        .and_then(|a| a.as_array())
        .and_then(|a| a.first())
        .and_then(Json::as_str)
        .or_else(|| present("model_type").and_then(Json::as_str))
        .ok_or_else(|| bad("architectures", "missing (and no model_type)".into()))?;
    let architecture = match class {
        "LlamaForCausalLM" | "llama" => Architecture::Llama,
        "MistralForCausalLM" | "mistral" => Architecture::Mistral,
        "Qwen2ForCausalLM" | "qwen2" => Architecture::Qwen2,
        other => {
            return Err(bad(
                "architectures",
                format!("{other:?} is not supported (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM are)"),
            ))
        }
    };
    if let Some(scaling) = present("rope_scaling") {
        return Err(bad("rope_scaling", format!("{scaling} is not supported (only unscaled rotary embeddings)")));
    }
    let hidden_size = need("hidden_size")?;
    let num_heads = need("num_attention_heads")?;
    if num_heads == 0 {
        return Err(bad("num_attention_heads", "must be greater than 0".into()));
    }
    let sliding_window = match architecture {
        Architecture::Mistral => uint("sliding_window")?,
        Architecture::Qwen2 if flag("use_sliding_window")? == Some(true) => {
            return Err(bad("use_sliding_window", "Qwen2 sliding-window layers are not supported".into()))
        }
        _ => None,
    };
    let config = ModelConfig {
        architecture,
        vocab_size: need("vocab_size")?,
        hidden_size,
        intermediate_size: need("intermediate_size")?,
        num_layers: need("num_hidden_layers")?,
        num_heads,
        num_kv_heads: uint("num_key_value_heads")?.unwrap_or(num_heads),
        head_dim: uint("head_dim")?.unwrap_or(hidden_size / num_heads),
        rope_theta: float("rope_theta")?.unwrap_or(10_000.0),
        rms_norm_eps: float("rms_norm_eps")?.unwrap_or(1e-6),
        max_position_embeddings: uint("max_position_embeddings")?.unwrap_or(2048),
        tie_word_embeddings: flag("tie_word_embeddings")?.unwrap_or(false),
        attention_bias: match architecture {
            Architecture::Qwen2 => true,
            _ => flag("attention_bias")?.unwrap_or(false),
        },
        sliding_window,
    };
    config.validate().map_err(|(field, reason)| bad(&field, reason))?;
    Ok(config)
}

/// The safetensors files of a directory, memory-mapped, with a name → file index.
struct SafetensorsDir {
    dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    index: HashMap<String, usize>,
}

impl SafetensorsDir {
    fn open(dir: &Path) -> Result<Self, LoadError> {
        let index_path = dir.join("model.safetensors.index.json");
        let names: Vec<String> = if index_path.is_file() {
            let json = read_json(&index_path)?;
            let map = json.get("weight_map").and_then(Json::as_object).ok_or_else(|| LoadError::Config {
                path: index_path.clone(),
                field: "weight_map".into(),
                reason: "missing or not an object".into(),
            })?;
            let mut files = BTreeMap::new();
            for (tensor, file) in map {
                let file = file.as_str().filter(|f| !f.contains('/') && !f.contains('\\')).ok_or_else(|| {
                    LoadError::Config {
                        path: index_path.clone(),
                        field: format!("weight_map.{tensor}"),
                        reason: "not a file name in this directory".into(),
                    }
                })?;
                files.insert(file.to_string(), ());
            }
            files.into_keys().collect()
        } else {
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .map_err(|source| LoadError::Io { path: dir.to_path_buf(), source })?
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.ends_with(".safetensors"))
                .collect();
            names.sort();
            names
        };
        if names.is_empty() {
            return Err(LoadError::MissingTensor {
                path: dir.to_path_buf(),
                tensor: "(no *.safetensors file in the directory)".into(),
            });
        }
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for name in names {
            let path = dir.join(&name);
            let io = |source| LoadError::Io { path: path.clone(), source };
            let file = File::open(&path).map_err(io)?;
            // SAFETY: read-only map of a file we do not modify.
            let map = unsafe { Mmap::map(&file) }.map_err(io)?;
            let st = SafeTensors::deserialize(&map)
                .map_err(|e| LoadError::Format { path: path.clone(), reason: format!("invalid safetensors: {e}") })?;
            for tensor in st.names() {
                index.insert(tensor.to_string(), files.len());
            }
            files.push((path, map));
        }
        Ok(SafetensorsDir { dir: dir.to_path_buf(), files, index })
    }
}

impl TensorSource for SafetensorsDir {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn tensor(&self, name: &str) -> Result<Option<Tensor>, LoadError> {
        let Some(&i) = self.index.get(name) else {
            return Ok(None);
        };
        let (path, map) = &self.files[i];
        let fmt = |reason: String| LoadError::Format { path: path.clone(), reason: format!("tensor {name}: {reason}") };
        let st = SafeTensors::deserialize(map).map_err(|e| fmt(e.to_string()))?;
        let view = st.tensor(name).map_err(|e| fmt(e.to_string()))?;
        let bytes = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytes.as_chunks::<4>().0.iter().map(|b| f32::from_le_bytes(*b)).collect(),
            Dtype::F16 => bytes.as_chunks::<2>().0.iter().map(|b| f16::from_le_bytes(*b).to_f32()).collect(),
            Dtype::BF16 => bytes.as_chunks::<2>().0.iter().map(|b| bf16::from_le_bytes(*b).to_f32()).collect(),
            other => return Err(fmt(format!("dtype {other:?} is not supported (F32, F16, BF16 are)"))),
        };
        Ok(Some((view.shape().to_vec(), data)))
    }
}
