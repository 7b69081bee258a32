//! AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
//! Acceleration"): scale up the input channels that carry large activations before
//! quantizing, so their weights lose less to rounding, and fold the inverse scale into the
//! operation that produces the input, so the float model computes exactly the same function.
//!
//! Per group of linear layers sharing an input x: s = mean|x|^α per input channel (normalized
//! by √(max·min)), α searched on a grid to minimize ‖x·Wᵀ − (x/s)·Q(W·diag(s))ᵀ‖² over a
//! sample of calibration tokens. Folding targets: q/k/v ← input RMSNorm weight; gate/up ←
//! post-attention RMSNorm weight; down_proj ← rows of up_proj; o_proj ← rows of v_proj only
//! when every query head has its own value head (GQA shares value heads, so it is skipped);
//! lm_head ← the final RMSNorm weight.
//!
//! Then every projection and the lm_head is quantized with its clipping range per group
//! chosen by the output error on the sampled inputs, ‖(W − Ŵ)·xᵀ‖², not by the weight error
//! (AWQ's clipping search; the paper leaves q and k out, but on SmolLM2 clipping them too
//! measured better: Hamlet perplexity +17.7% over FP32 against +18.5% without).

use std::collections::HashMap;

use ndarray::{s, Array1, Array2, ArrayView2, Axis};

use super::calibrate::observe_layer;
use super::{quantize, quantize_for_inputs, Quantized, Scheme};
use crate::model::reference::{Reference, Site};
use crate::model::{LayerWeights, Linear, ModelConfig, Weights};

/// AWQ settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AwqOptions {
    /// Grid points for α in [0, 1).
    pub grid: usize,
    /// Calibration tokens (rows) used to score each α.
    pub samples: usize,
    /// After scaling, choose each group's clipping range by the output error on the sampled
    /// inputs.
    pub clip: bool,
    /// Score each α with the scaled inputs rounded to int8 per block of 32 as the serving
    /// kernels round them ([`super::round_activations`]), so the scales also spread the
    /// activations' outliers (SmoothQuant's aim) where that lowers the served output error.
    pub activations: bool,
}

impl Default for AwqOptions {
    fn default() -> Self {
        AwqOptions { grid: 20, samples: 512, clip: true, activations: false }
    }
}

/// The best per-channel scales for linears `ws` (each `[out, in]`, with its scheme) on inputs
/// `x` `[tokens, in]`; `mean_abs` is mean |x| per channel over all calibration tokens. With
/// `activations`, the scaled inputs are rounded as the serving kernels round them.
pub fn search_scales(
    x: ArrayView2<f32>,
    mean_abs: &Array1<f32>,
    ws: &[(&Array2<f32>, Scheme)],
    grid: usize,
    activations: bool,
) -> Array1<f32> {
    let reference: Vec<Array2<f32>> = ws.iter().map(|(w, _)| x.dot(&w.t())).collect();
    let mut best = (f64::INFINITY, Array1::ones(mean_abs.len()));
    for k in 0..grid.max(1) {
        let alpha = k as f32 / grid.max(1) as f32;
        let s = scales_for(mean_abs, alpha);
        let xs = activations.then(|| super::round_activations(&x / &s));
        let mut loss = 0f64;
        for ((w, scheme), y) in ws.iter().zip(&reference) {
            let scaled = *w * &s;
            let yq = match (&xs, quantize(scaled.view(), scheme)) {
                (Some(xs), Some(q)) => xs.dot(&q.dequantize().t()),
                (Some(xs), None) => xs.dot(&scaled.t()),
                (None, Some(q)) => x.dot(&(q.dequantize() / &s).t()),
                (None, None) => x.dot(&w.t()),
            };
            loss += (y - &yq).iter().map(|d| (*d as f64) * (*d as f64)).sum::<f64>();
        }
        if loss < best.0 {
            best = (loss, s);
        }
    }
    best.1
}

/// mean|x|^α, normalized so that max·min = 1, floored at 1e-4.
fn scales_for(mean_abs: &Array1<f32>, alpha: f32) -> Array1<f32> {
    let s = mean_abs.mapv(|v| v.max(1e-8).powf(alpha).max(1e-4));
    let (max, min) = s.iter().fold((f32::MIN, f32::MAX), |(a, b), &v| (a.max(v), b.min(v)));
    let norm = (max * min).sqrt();
    s.mapv(|v| v / norm)
}

/// Multiplies the input columns of `w` by `s` (W·diag(s)).
fn scale_columns(w: &mut Array2<f32>, s: &Array1<f32>) {
    *w *= s;
}

/// Divides the output rows of `w` (and its bias) by `s`.
fn unscale_rows(w: &mut Linear, s: &Array1<f32>) {
    for (mut row, &v) in w.weight.axis_iter_mut(Axis(0)).zip(s) {
        row /= v;
    }
    if let Some(b) = &mut w.bias {
        *b /= s;
    }
}

/// Folds scales `s` for `site` into layer `l`: the consumers' columns grow by s, the
/// producer shrinks by s, and the float function stays the same.
pub fn fold(l: &mut LayerWeights, site: Site, s: &Array1<f32>) {
    match site {
        Site::Attention => {
            l.input_layernorm /= s;
            for w in [&mut l.q_proj, &mut l.k_proj, &mut l.v_proj] {
                scale_columns(&mut w.weight, s);
            }
        }
        Site::Mlp => {
            l.post_attention_layernorm /= s;
            for w in [&mut l.gate_proj, &mut l.up_proj] {
                scale_columns(&mut w.weight, s);
            }
        }
        Site::Down => {
            unscale_rows(&mut l.up_proj, s);
            scale_columns(&mut l.down_proj.weight, s);
        }
        Site::Output => {
            unscale_rows(&mut l.v_proj, s);
            scale_columns(&mut l.o_proj.weight, s);
        }
    }
}

/// The projections that read `site`'s input, with their Hugging Face names within the layer.
fn site_linears(l: &LayerWeights, site: Site) -> Vec<(&'static str, &Linear)> {
    match site {
        Site::Attention => {
            vec![("self_attn.q_proj", &l.q_proj), ("self_attn.k_proj", &l.k_proj), ("self_attn.v_proj", &l.v_proj)]
        }
        Site::Output => vec![("self_attn.o_proj", &l.o_proj)],
        Site::Mlp => vec![("mlp.gate_proj", &l.gate_proj), ("mlp.up_proj", &l.up_proj)],
        Site::Down => vec![("mlp.down_proj", &l.down_proj)],
    }
}

/// Weights with AWQ's scales folded in, and the quantized matrices by Hugging Face name.
pub type AwqResult = (Weights, HashMap<String, Quantized>);

/// Runs AWQ over every layer: returns weights with scales folded in (the same float model)
/// and every projection and the lm_head quantized with the recipe's schemes, clipped by
/// output error when `opts.clip`. `on_layer(i, n)` reports progress.
///
/// Folding preserves the float function, so one float pass per layer both collects every
/// site's inputs (mean |x| over all tokens, and a sample of rows) and produces the next
/// layer's inputs. Windows run two at a time; their statistics are merged in window order.
pub fn awq_model(
    config: &ModelConfig,
    weights: &Weights,
    windows: &[Vec<u32>],
    scheme_for: &dyn Fn(&str) -> Scheme,
    opts: &AwqOptions,
    on_layer: &mut dyn FnMut(usize, usize),
) -> Result<AwqResult, String> {
    awq(config, weights, windows, scheme_for, opts, true, on_layer)
}

/// AWQ's scale search alone: the weights with the scales folded in (the same float model),
/// for another method to quantize (`method = "awq+gptq"` hands them to GPTQ).
pub fn awq_scaled(
    config: &ModelConfig,
    weights: &Weights,
    windows: &[Vec<u32>],
    scheme_for: &dyn Fn(&str) -> Scheme,
    opts: &AwqOptions,
    on_layer: &mut dyn FnMut(usize, usize),
) -> Result<Weights, String> {
    Ok(awq(config, weights, windows, scheme_for, opts, false, on_layer)?.0)
}

/// [`awq_model`], quantizing only when `store_quantized`.
fn awq(
    config: &ModelConfig,
    weights: &Weights,
    windows: &[Vec<u32>],
    scheme_for: &dyn Fn(&str) -> Scheme,
    opts: &AwqOptions,
    store_quantized: bool,
    on_layer: &mut dyn FnMut(usize, usize),
) -> Result<AwqResult, String> {
    let mut current = weights.clone();
    let mut quantized = HashMap::new();
    let quantize_clipped = |name: &str, w: &Array2<f32>, x: ArrayView2<f32>| {
        let scheme = scheme_for(name);
        if opts.clip {
            quantize_for_inputs(w.view(), &scheme, x)
        } else {
            quantize(w.view(), &scheme)
        }
    };
    let mut hidden: Vec<Array2<f32>> = {
        let r = Reference::from_parts(config, &current);
        windows.iter().map(|w| r.embed(w).map_err(|e| e.to_string())).collect::<Result<_, _>>()?
    };
    let mut sites = vec![Site::Attention, Site::Mlp, Site::Down];
    if config.num_heads == config.num_kv_heads {
        sites.push(Site::Output);
    }
    let per_window = opts.samples.div_ceil(windows.len().max(1));
    for i in 0..config.num_layers {
        let mut stats: HashMap<Site, SiteStats> = HashMap::new();
        {
            let r = Reference::from_parts(config, &current);
            let add = |local: &mut HashMap<Site, SiteStats>, site: Site, v: ArrayView2<f32>| {
                local.entry(site).or_insert_with(|| SiteStats::new(v.ncols())).add(v, per_window);
            };
            observe_layer(&r, i, &mut hidden, true, &add, &mut |local| {
                for (site, st) in local {
                    stats.entry(site).or_insert_with(|| SiteStats::new(st.sum.len())).merge(st, opts.samples);
                }
            });
        }
        let p = format!("model.layers.{i}");
        // Each site's sampled inputs as the scaled projections see them (x / s).
        let mut scaled = Vec::new();
        for &site in &sites {
            let st = stats.get(&site).ok_or_else(|| format!("layer {i}: no inputs seen at {site:?}"))?;
            let group: Vec<(&Array2<f32>, Scheme)> = site_linears(&current.layers[i], site)
                .into_iter()
                .map(|(n, w)| (&w.weight, scheme_for(&format!("{p}.{n}.weight"))))
                .collect();
            if group.iter().all(|(_, s)| s.precision.bits().is_none()) {
                continue;
            }
            let views: Vec<ArrayView2<f32>> = st.sample.iter().map(|a| a.view()).collect();
            let sample = ndarray::concatenate(Axis(0), &views).map_err(|e| e.to_string())?;
            let mean = st.sum.mapv(|v| (v / st.rows.max(1) as f64) as f32);
            let s = search_scales(sample.view(), &mean, &group, opts.grid, opts.activations);
            fold(&mut current.layers[i], site, &s);
            scaled.push((site, sample / &s));
        }
        // Quantized only now: a later site's fold rescales rows of an earlier site's matrix
        // (down_proj's scales divide up_proj's rows).
        for (site, x) in scaled.iter().filter(|_| store_quantized) {
            for (n, w) in site_linears(&current.layers[i], *site) {
                let name = format!("{p}.{n}.weight");
                if let Some(q) = quantize_clipped(&name, &w.weight, x.view()) {
                    quantized.insert(name, q);
                }
            }
        }
        on_layer(i + 1, config.num_layers);
    }
    // The lm_head reads the final norm's output: its scales fold into the norm weight (the
    // lm_head gets its own matrix, untied from the embedding) unless it stays tied.
    let scheme = scheme_for("lm_head.weight");
    if scheme.precision.bits().is_some() && !super::lm_head_stays_tied(config, scheme_for) {
        let mut st = SiteStats::new(config.hidden_size);
        for x in &hidden {
            st.add(crate::model::reference::rms_norm(x.view(), &current.norm, config.rms_norm_eps).view(), per_window);
        }
        let views: Vec<ArrayView2<f32>> = st.sample.iter().map(|a| a.view()).collect();
        let sample = ndarray::concatenate(Axis(0), &views).map_err(|e| e.to_string())?;
        let mean = st.sum.mapv(|v| (v / st.rows.max(1) as f64) as f32);
        let head = current.lm_head().clone();
        let s = search_scales(sample.view(), &mean, &[(&head, scheme)], opts.grid, opts.activations);
        current.norm /= &s;
        let head = head * &s;
        if let Some(q) =
            store_quantized.then(|| quantize_clipped("lm_head.weight", &head, (sample / &s).view())).flatten()
        {
            quantized.insert("lm_head.weight".to_string(), q);
        }
        current.lm_head = Some(head);
    }
    Ok((current, quantized))
}

/// Statistics of one site's inputs: Σ|x| per channel, rows seen, and sampled rows.
struct SiteStats {
    sum: Array1<f64>,
    rows: usize,
    sample: Vec<Array2<f32>>,
    kept: usize,
}

impl SiteStats {
    fn new(dim: usize) -> Self {
        SiteStats { sum: Array1::zeros(dim), rows: 0, sample: Vec::new(), kept: 0 }
    }

    fn add(&mut self, v: ArrayView2<f32>, take: usize) {
        self.sum += &v.mapv(|a| a.abs() as f64).sum_axis(Axis(0));
        self.rows += v.nrows();
        let take = take.min(v.nrows());
        self.sample.push(v.slice(s![..take, ..]).to_owned());
        self.kept += take;
    }

    fn merge(&mut self, other: SiteStats, limit: usize) {
        self.sum += &other.sum;
        self.rows += other.rows;
        for a in other.sample {
            if self.kept >= limit {
                break;
            }
            let take = a.nrows().min(limit - self.kept);
            self.kept += take;
            self.sample.push(a.slice(s![..take, ..]).to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{Layout, Precision, QuantError};
    use rand::{Rng, SeedableRng};

    fn random(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        Array2::from_shape_fn((rows, cols), |_| rng.random::<f32>() * 2.0 - 1.0)
    }

    #[test]
    fn scaling_salient_channels_lowers_output_error() {
        // Inputs where a few channels are 20× larger than the rest (the activation
        // outliers AWQ targets).
        let mut x = random(256, 64, 1);
        for c in [3, 17, 40] {
            x.column_mut(c).mapv_inplace(|v| v * 20.0);
        }
        let w = random(32, 64, 2);
        let scheme = Scheme {
            precision: Precision::Int4,
            layout: Layout::Blocked,
            block_size: 32,
            symmetric: false,
            clip_search: false,
        };
        let mean_abs = x.mapv(f32::abs).mean_axis(Axis(0)).expect("rows");
        let s = search_scales(x.view(), &mean_abs, &[(&w, scheme)], 20, false);
        let rtn = quantize(w.view(), &scheme).expect("q").dequantize();
        let awq = quantize((&w * &s).view(), &scheme).expect("q").dequantize() / &s;
        let (y, y_rtn, y_awq) = (x.dot(&w.t()), x.dot(&rtn.t()), x.dot(&awq.t()));
        let (e_rtn, e_awq) = (QuantError::between(y.view(), y_rtn.view()), QuantError::between(y.view(), y_awq.view()));
        assert!(e_awq.rel_frobenius < e_rtn.rel_frobenius, "AWQ {e_awq:?} vs RTN {e_rtn:?}");
        assert!(s[3] > s[0] && s[17] > s[1], "salient channels get larger scales: {s}");
    }

    #[test]
    fn scoring_with_rounded_activations_spreads_their_outliers() {
        // INT8 weights lose little to rounding; inputs with a channel 50× the rest in each
        // block of 32 lose much more when rounded to int8 per block.
        let mut x = random(256, 64, 3);
        for c in [5, 40] {
            x.column_mut(c).mapv_inplace(|v| v * 50.0);
        }
        let w = random(16, 64, 4);
        let scheme = Scheme {
            precision: Precision::Int8,
            layout: Layout::Blocked,
            block_size: 32,
            symmetric: true,
            clip_search: false,
        };
        let mean_abs = x.mapv(f32::abs).mean_axis(Axis(0)).expect("rows");
        let served = |activations: bool| {
            let s = search_scales(x.view(), &mean_abs, &[(&w, scheme)], 20, activations);
            let q = quantize((&w * &s).view(), &scheme).expect("q").dequantize();
            let y = crate::quant::round_activations(&x / &s).dot(&q.t());
            (QuantError::between(x.dot(&w.t()).view(), y.view()).rel_frobenius, s)
        };
        let ((weights_only, _), (with_activations, s)) = (served(false), served(true));
        assert!(with_activations < 0.7 * weights_only, "{with_activations} vs {weights_only}");
        assert!(s[5] > 4.0 * s[0] && s[40] > 4.0 * s[33], "outlier channels get larger scales: {s}");
    }
}
