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
    /// Number of windows.
    pub windows: usize,
    /// Tokens per window.
    pub window: usize,
    /// Directory of `*.txt` files (default: the fetched Shakespeare plays).
    pub corpus: Option<PathBuf>,
    /// File names left out (the held-out evaluation text).
    pub exclude: Vec<String>,
}

impl Default for CalibrationOptions {
    fn default() -> Self {
        CalibrationOptions { windows: 32, window: 512, corpus: None, exclude: vec!["hamlet_gut.txt".into()] }
    }
}

/// `opts.windows` windows of `opts.window` tokens, evenly spaced over the corpus files (in
/// name order, excluded files left out), tokenized with `tokenizer`. Deterministic.
pub fn calibration_windows(
    tokenizer: &ModelTokenizer,
    corpus: &Path,
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
    let need = opts.windows * opts.window;
    if opts.windows == 0 || opts.window < 2 || ids.len() < need {
        return Err(format!(
            "{} tokens in {}; {} windows of {} need {need}",
            ids.len(),
            corpus.display(),
            opts.windows,
            opts.window
        ));
    }
    let stride = ids.len() / opts.windows;
    Ok((0..opts.windows).map(|k| ids[k * stride..k * stride + opts.window].to_vec()).collect())
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
fn site_of(projection: &str) -> Site {
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
    // The lm_head, on the final norm of the quantized model's last hidden states.
    let scheme = scheme_for("lm_head.weight");
    if scheme.precision.bits().is_some() {
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
