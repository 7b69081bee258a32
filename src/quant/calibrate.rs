//! Calibration: token windows from a text corpus, and GPTQ over a whole model, layer by
//! layer, through the native reference forward.
//!
//! Each layer is calibrated on the outputs of the already-quantized layers before it (as
//! GPTQ does): the hidden states of every window are kept for the current layer only
//! (windows × window × hidden f32), run through the layer once with its float weights to
//! collect the Hessians of its four input sites, then again with its quantized weights to
//! produce the next layer's inputs. Memory stays bounded whatever the number of layers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::gptq::{gptq, GptqOptions, Hessian};
use super::{Quantized, Scheme};
use crate::model::reference::{rms_norm, Reference, Site};
use crate::model::{ModelConfig, ModelTokenizer, Weights};

/// Which text calibrates, and how much of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CalibrationOptions {
    /// Number of windows, shared evenly among the corpora.
    pub windows: usize,
    /// Tokens per window.
    pub window: usize,
    /// Directories of `*.txt` files, one source each (`corpus = "dir"` or a list; default:
    /// the fetched plays and the fetched prose, see [`default_corpora`]).
    #[serde(deserialize_with = "one_or_many")]
    pub corpus: Vec<PathBuf>,
    /// File names left out (the held-out evaluation texts).
    pub exclude: Vec<String>,
}

impl Default for CalibrationOptions {
    fn default() -> Self {
        CalibrationOptions {
            windows: 32,
            window: 512,
            corpus: Vec::new(),
            exclude: vec!["hamlet_gut.txt".into(), "alice29.txt".into()],
        }
    }
}

/// The corpora a recipe that names none calibrates on: the plays and the prose that
/// `make setup` fetches, so that quantization is tuned on more than one kind of English.
pub fn default_corpora() -> Vec<PathBuf> {
    vec![crate::model::corpus_dir(), crate::model::prose_dir()]
}

/// A path or a list of paths (`null`, as older manifests record the default, is none).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(p)) => vec![p],
        Some(OneOrMany::Many(v)) => v,
    })
}

/// `opts.windows` windows of `opts.window` tokens tokenized with `tokenizer`, shared evenly
/// among `corpora` (the first ones take the remainder), each source's windows evenly spaced
/// over its files (in name order, excluded files left out). Deterministic.
pub fn calibration_windows(
    tokenizer: &ModelTokenizer,
    corpora: &[PathBuf],
    opts: &CalibrationOptions,
) -> Result<Vec<Vec<u32>>, String> {
    if opts.windows == 0 || opts.window < 2 {
        return Err(format!(
            "windows = {}, window = {}: need at least 1 window of 2 tokens",
            opts.windows, opts.window
        ));
    }
    if corpora.is_empty() || corpora.len() > opts.windows {
        return Err(format!("{} corpora for {} windows: need 1 to {0} corpora", corpora.len(), opts.windows));
    }
    let mut out = Vec::with_capacity(opts.windows);
    for (k, corpus) in corpora.iter().enumerate() {
        let n = opts.windows / corpora.len() + usize::from(k < opts.windows % corpora.len());
        out.extend(source_windows(tokenizer, corpus, n, opts)?);
    }
    Ok(out)
}

/// `n` windows evenly spaced over the token ids of one corpus directory.
fn source_windows(
    tokenizer: &ModelTokenizer,
    corpus: &Path,
    n: usize,
    opts: &CalibrationOptions,
) -> Result<Vec<Vec<u32>>, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus)
        .map_err(|e| format!("{}: {e}", corpus.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_none_or(|n| !opts.exclude.iter().any(|x| x == n)))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("{}: no .txt files to calibrate with", corpus.display()));
    }
    let mut ids = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        ids.extend(tokenizer.encode(&text).map_err(|e| format!("{}: {e}", f.display()))?);
    }
    let need = n * opts.window;
    if ids.len() < need {
        return Err(format!(
            "{} tokens in {}; {n} windows of {} need {need}",
            ids.len(),
            corpus.display(),
            opts.window
        ));
    }
    let stride = ids.len() / n;
    Ok((0..n).map(|k| ids[k * stride..k * stride + opts.window].to_vec()).collect())
}

/// Adds one site's inputs to a window's statistics.
pub(crate) type AddObserved<'a, S> = dyn Fn(&mut HashMap<Site, S>, Site, ArrayView2<f32>) + Sync + 'a;

/// Runs layer `i` over every window, two windows at a time on separate threads, giving
/// each window's inputs at every site to `add` (into that window's own statistics), then
/// handing the windows' statistics to `merge` in window order, so results do not depend on
/// scheduling and at most two windows' statistics are alive at once. With `advance`, each
/// window becomes the layer's output; otherwise the windows stay as they were.
pub(crate) fn observe_layer<S: Send>(
    r: &Reference,
    i: usize,
    windows: &mut [Array2<f32>],
    advance: bool,
    add: &AddObserved<'_, S>,
    merge: &mut dyn FnMut(HashMap<Site, S>),
) {
    for pair in windows.chunks_mut(2) {
        let per_window: Vec<HashMap<Site, S>> = pair
            .par_iter_mut()
            .map(|x| {
                let mut copy = (!advance).then(|| x.clone());
                let x = copy.as_mut().unwrap_or(x);
                let mut cache = r.new_cache(x.nrows());
                let mut local = HashMap::new();
                r.layer_observed(i, x, &mut cache, &mut |site, v| add(&mut local, site, v));
                local
            })
            .collect();
        per_window.into_iter().for_each(&mut *merge);
    }
}

/// The site whose input a projection reads.
pub(crate) fn site_of(projection: &str) -> Site {
    match projection {
        "self_attn.o_proj" => Site::Output,
        "mlp.gate_proj" | "mlp.up_proj" => Site::Mlp,
        "mlp.down_proj" => Site::Down,
        _ => Site::Attention,
    }
}

/// Runs GPTQ over every layer's projections whose scheme (by Hugging Face name) is an
/// integer precision, then over the lm_head (on the final norm of the quantized model's
/// hidden states); `on_layer(i, n)` is called as layers finish. Returns the quantized
/// tensors by name (the embedding, a lookup table, is left to round-to-nearest).
pub fn gptq_model(
    config: &ModelConfig,
    weights: &Weights,
    windows: &[Vec<u32>],
    scheme_for: &dyn Fn(&str) -> Scheme,
    opts: &GptqOptions,
    on_layer: &mut dyn FnMut(usize, usize),
) -> Result<HashMap<String, Quantized>, String> {
    let mut current = weights.clone();
    let mut out = HashMap::new();
    let mut hidden: Vec<Array2<f32>> = {
        let r = Reference::from_parts(config, &current);
        windows.iter().map(|w| r.embed(w).map_err(|e| e.to_string())).collect::<Result<_, _>>()?
    };
    for i in 0..config.num_layers {
        // 1. Hessians of the four input sites, with this layer's float weights.
        let mut hessians: HashMap<Site, Hessian> = HashMap::new();
        let r = Reference::from_parts(config, &current);
        let add = |local: &mut HashMap<Site, Hessian>, site: Site, v: ArrayView2<f32>| {
            local.entry(site).or_insert_with(|| Hessian::new(v.ncols())).add(v);
        };
        observe_layer(&r, i, &mut hidden, false, &add, &mut |local| {
            for (site, h) in local {
                match hessians.get_mut(&site) {
                    Some(acc) => acc.merge(&h),
                    None => {
                        hessians.insert(site, h);
                    }
                }
            }
        });
        // 2. Quantize the projections and put their reconstructions in place.
        for (name, lin) in current.layers[i].linears_mut() {
            let site = &site_of(name);
            let full = format!("model.layers.{i}.{name}.weight");
            let scheme = scheme_for(&full);
            if scheme.precision.bits().is_none() {
                continue;
            }
            let h = hessians.get(site).ok_or_else(|| format!("layer {i}: no inputs seen at {site:?}"))?;
            let q = gptq(lin.weight.view(), h.matrix(), &scheme, opts).map_err(|e| format!("{full}: {e}"))?;
            lin.weight = q.dequantize();
            out.insert(full, q);
        }
        // 3. The next layer's inputs, through the quantized layer.
        let r = Reference::from_parts(config, &current);
        hidden.par_iter_mut().for_each(|x| {
            let mut cache = r.new_cache(x.nrows());
            r.layer(i, x, &mut cache);
        });
        on_layer(i + 1, config.num_layers);
    }
    // The lm_head, on the final norm of the quantized model's last hidden states (unless it
    // stays tied to the embedding, rounded to nearest).
    let scheme = scheme_for("lm_head.weight");
    if scheme.precision.bits().is_some() && !super::lm_head_stays_tied(config, scheme_for) {
        let mut h = Hessian::new(config.hidden_size);
        for x in &hidden {
            h.add(rms_norm(x.view(), &current.norm, config.rms_norm_eps).view());
        }
        let q =
            gptq(current.lm_head().view(), h.matrix(), &scheme, opts).map_err(|e| format!("lm_head.weight: {e}"))?;
        out.insert("lm_head.weight".to_string(), q);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::Tokenizer;

    /// A word-level tokenizer: `a` → 0, `b` → 1, `c` → 2.
    fn words() -> ModelTokenizer {
        let vocab = [("a".to_string(), 0), ("b".to_string(), 1), ("c".to_string(), 2), ("[UNK]".to_string(), 3)];
        let model = WordLevel::builder().vocab(vocab.into_iter().collect()).unk_token("[UNK]".into()).build();
        let mut t = Tokenizer::new(model.expect("word-level model"));
        t.with_pre_tokenizer(Some(Whitespace {}));
        ModelTokenizer::new(t, None, vec![], None)
    }

    #[test]
    fn windows_are_shared_among_corpora_and_held_out_files_stay_out() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (plays, prose) = (tmp.path().join("plays"), tmp.path().join("prose"));
        for (dir, files) in
            [(&plays, [("x.txt", "a "), ("held.txt", "c ")]), (&prose, [("y.txt", "b "), ("z.md", "c ")])]
        {
            std::fs::create_dir_all(dir).expect("mkdir");
            for (name, word) in files {
                std::fs::write(dir.join(name), word.repeat(100)).expect("write");
            }
        }
        let opts = CalibrationOptions { windows: 5, window: 10, corpus: vec![], exclude: vec!["held.txt".into()] };
        let w = calibration_windows(&words(), &[plays.clone(), prose.clone()], &opts).expect("windows");
        // Three windows of the first source, two of the second; excluded and non-.txt files unread.
        let sources: Vec<u32> = w.iter().map(|x| x[0]).collect();
        assert_eq!(sources, [0, 0, 0, 1, 1]);
        assert!(w.iter().all(|x| x.len() == 10 && x.iter().all(|&t| t == x[0])));

        let too_many = CalibrationOptions { windows: 11, ..opts.clone() };
        let e = calibration_windows(&words(), std::slice::from_ref(&prose), &too_many).expect_err("too short");
        assert!(e.contains("100 tokens") && e.contains("11 windows of 10 need 110"), "{e}");
        let e = calibration_windows(&words(), &[], &opts).expect_err("no corpus");
        assert!(e.contains("0 corpora"), "{e}");
    }

    #[test]
    fn a_recipe_names_one_corpus_or_several() {
        let one: CalibrationOptions = toml::from_str("corpus = \"texts\"").expect("one");
        assert_eq!(one.corpus, [PathBuf::from("texts")]);
        let two: CalibrationOptions = toml::from_str("corpus = [\"a\", \"b\"]").expect("two");
        assert_eq!(two.corpus, [PathBuf::from("a"), PathBuf::from("b")]);
        assert_eq!(CalibrationOptions::default().exclude, ["hamlet_gut.txt", "alice29.txt"]);
        // Manifests written before the list form recorded the default as null.
        let old: CalibrationOptions = serde_json::from_str(r#"{"corpus": null}"#).expect("null");
        assert!(old.corpus.is_empty());
    }
}
