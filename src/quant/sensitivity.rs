//! Sensitivity: what quantizing one weight matrix alone costs the FP32 model, for every
//! candidate scheme, with its bytes. Mixed precision ([`super::mixed`]) chooses from it.
//!
//! The cost of a (tensor, scheme) is the mean KL(fp32 ‖ perturbed) per predicted token over
//! measurement windows of the calibration text: to second order, the expected increase of
//! the model's loss. A forward pass for each of the 16 candidates of ~210 matrices would
//! take hours on a laptop CPU, so each matrix is measured once, at [`REFERENCE`], and its
//! other candidates are predicted from the output error `tr(ΔW H ΔWᵀ)` (H the Hessian of
//! the matrix's calibration inputs, what GPTQ minimizes), scaled by that matrix's own
//! measured KL per unit of output error. [`SensitivityOptions::validate`] also measures
//! [`VALIDATION`] for every matrix and scores how well the prediction ranks the matrices.
//!
//! GPTQ candidates run with the default [`GptqOptions`] whatever a recipe sets, so that one
//! table serves every recipe of a source.
//!
//! The embedding, a lookup table with no inputs to weigh, is measured at each of its
//! candidates (8-bit only: ONNX Gather cannot read 4-bit tensors).

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::calibrate::{observe_layer, site_of};
use super::gptq::{gptq, GptqOptions, Hessian};
use super::{quantize, Layout, Precision, Scheme};
use crate::model::reference::{logsumexp, rms_norm, Reference, Site};
use crate::model::{ModelConfig, Weights};

/// Bump when the measurement changes, so cached tables are not reused.
pub const TABLE_VERSION: u32 = 2;

/// The candidate every matrix is measured at: the usual 4-bit layout, round to nearest.
pub const REFERENCE: &str = "int4-b32-zp";

/// The candidate [`SensitivityOptions::validate`] measures too, to score the prediction:
/// another block size, symmetric, and GPTQ.
pub const VALIDATION: &str = "int4-b128-sym-gptq";

/// A scheme and whether GPTQ chooses its codes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// Storage scheme.
    pub scheme: Scheme,
    /// GPTQ (true) or round to nearest.
    pub gptq: bool,
}

impl Candidate {
    /// The scheme's label, with `-gptq` for GPTQ (`int4-b64-sym-gptq`).
    pub fn label(&self) -> String {
        let base = self.scheme.label();
        if self.gptq {
            format!("{base}-gptq")
        } else {
            base
        }
    }
}

/// The candidates of a projection or the lm_head: INT8 per channel; INT4
/// symmetric and UINT4 with zero points in blocks of 32, 64 and 128; NF4 in blocks of 64
/// (QLoRA's); each by round to nearest and by GPTQ.
pub fn candidates() -> Vec<Candidate> {
    let int = |precision, layout, block_size, symmetric| Scheme {
        precision,
        layout,
        block_size,
        symmetric,
        clip_search: false,
    };
    let mut schemes = vec![int(Precision::Int8, Layout::PerChannel, 32, true)];
    for block in [32, 64, 128] {
        for symmetric in [false, true] {
            schemes.push(int(Precision::Int4, Layout::Blocked, block, symmetric));
        }
    }
    schemes.push(int(Precision::Nf4, Layout::Blocked, 64, true));
    [false, true].into_iter().flat_map(|gptq| schemes.iter().map(move |&scheme| Candidate { scheme, gptq })).collect()
}

/// The candidates of the embedding (a Gather: 8-bit only), by round to nearest.
pub fn embedding_candidates() -> Vec<Candidate> {
    candidates().into_iter().filter(|c| !c.gptq && c.scheme.precision == Precision::Int8).collect()
}

/// What one candidate costs one matrix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    /// The candidate.
    pub candidate: Candidate,
    /// Its label.
    pub label: String,
    /// Bytes stored.
    pub bytes: u64,
    /// Output error `tr(ΔW H ΔWᵀ)` (0 for the embedding, which is measured instead).
    pub proxy: f64,
    /// KL per token: measured where `measured`, predicted otherwise.
    pub kl: f64,
    /// Whether `kl` was measured by a forward pass.
    pub measured: bool,
}

/// One matrix's row of the table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorSensitivity {
    /// Hugging Face name (`lm_head.weight` also when tied to the embedding).
    pub name: String,
    /// `[rows, cols]` as quantized.
    pub shape: [usize; 2],
    /// One entry per candidate.
    pub costs: Vec<Cost>,
}

impl TensorSensitivity {
    /// The cost of the candidate labelled `label`.
    pub fn cost(&self, label: &str) -> Option<&Cost> {
        self.costs.iter().find(|c| c.label == label)
    }
}

/// How well the predicted KL ranks the matrices at [`VALIDATION`] against measured KL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    /// The candidate measured.
    pub label: String,
    /// Matrices compared.
    pub tensors: usize,
    /// Spearman rank correlation of predicted and measured KL.
    pub spearman: f64,
    /// Median of predicted / measured.
    pub median_ratio: f64,
}

/// The measured table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SensitivityTable {
    /// [`TABLE_VERSION`] of the writer.
    pub version: u32,
    /// Tokens the KL is measured over.
    pub tokens: usize,
    /// The FP32 model's mean loss (nats per token) over them.
    pub baseline_loss: f64,
    /// One row per matrix: embedding, each layer's seven projections, lm_head.
    pub tensors: Vec<TensorSensitivity>,
    /// The prediction's score, when asked for.
    pub validation: Option<Validation>,
}

impl SensitivityTable {
    /// The row of matrix `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorSensitivity> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// How the table is measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SensitivityOptions {
    /// Calibration windows the KL is measured over (evenly chosen among them); the
    /// Hessians use every window.
    pub windows: usize,
    /// Tokens of each measured window (its start).
    pub tokens: usize,
    /// Also measure [`VALIDATION`] for every matrix (about twice the time).
    pub validate: bool,
}

impl Default for SensitivityOptions {
    fn default() -> Self {
        SensitivityOptions { windows: 2, tokens: 256, validate: false }
    }
}

/// FP32 reference state over the measurement windows: each layer's input and the final
/// log-probabilities, so that a perturbed matrix in layer `l` reruns layers `l..` only.
struct Baseline {
    /// `inputs[w][l]`: window `w`'s hidden states entering layer `l` (`l = layers`: the
    /// final hidden states).
    inputs: Vec<Vec<Array2<f32>>>,
    /// Per window, `[tokens, vocab]` log-probabilities.
    log_probs: Vec<Array2<f32>>,
    /// Per window, the next token ids.
    targets: Vec<Vec<u32>>,
}

impl Baseline {
    fn new(config: &ModelConfig, weights: &Weights, windows: &[&[u32]]) -> Result<Self, String> {
        let r = Reference::from_parts(config, weights);
        let per: Vec<(Vec<Array2<f32>>, Array2<f32>)> = windows
            .par_iter()
            .map(|ids| {
                let mut x = r.embed(ids).map_err(|e| e.to_string())?;
                let mut cache = r.new_cache(ids.len());
                let mut inputs = Vec::with_capacity(config.num_layers + 1);
                for i in 0..config.num_layers {
                    inputs.push(x.clone());
                    r.layer(i, &mut x, &mut cache);
                }
                let lp = log_softmax(r.head(x.view()));
                inputs.push(x);
                Ok((inputs, lp))
            })
            .collect::<Result<_, String>>()?;
        let targets = windows.iter().map(|w| w[1..].to_vec()).collect();
        let (inputs, log_probs) = per.into_iter().unzip();
        Ok(Baseline { inputs, log_probs, targets })
    }

    /// Mean loss of the baseline over the predicted positions.
    fn loss(&self) -> f64 {
        let (mut sum, mut n) = (0f64, 0usize);
        for (lp, t) in self.log_probs.iter().zip(&self.targets) {
            for (row, &id) in t.iter().enumerate() {
                sum -= lp[[row, id as usize]] as f64;
                n += 1;
            }
        }
        sum / n.max(1) as f64
    }

    /// Mean KL(baseline ‖ model) per predicted position, running `weights` from layer
    /// `from` (`from = layers`: the head only) to the logits.
    fn kl(&self, config: &ModelConfig, weights: &Weights, from: usize) -> f64 {
        let r = Reference::from_parts(config, weights);
        let per: Vec<(f64, usize)> = (0..self.inputs.len())
            .into_par_iter()
            .map(|w| {
                let mut x = self.inputs[w][from].clone();
                let mut cache = r.new_cache(x.nrows());
                for i in from..config.num_layers {
                    r.layer(i, &mut x, &mut cache);
                }
                kl_sum(&self.log_probs[w], r.head(x.view()))
            })
            .collect();
        mean(&per)
    }

    /// [`kl`](Self::kl) of a model whose embedding changed: every layer reruns from `windows`' ids.
    fn kl_embedded(&self, config: &ModelConfig, weights: &Weights, windows: &[&[u32]]) -> Result<f64, String> {
        let r = Reference::from_parts(config, weights);
        let per: Vec<(f64, usize)> = windows
            .par_iter()
            .enumerate()
            .map(|(w, ids)| {
                let mut x = r.embed(ids).map_err(|e| e.to_string())?;
                let mut cache = r.new_cache(ids.len());
                for i in 0..config.num_layers {
                    r.layer(i, &mut x, &mut cache);
                }
                Ok(kl_sum(&self.log_probs[w], r.head(x.view())))
            })
            .collect::<Result<_, String>>()?;
        Ok(mean(&per))
    }
}

/// Σ sums / Σ counts.
fn mean(per: &[(f64, usize)]) -> f64 {
    let (sum, n) = per.iter().fold((0.0, 0), |(s, n), &(a, b)| (s + a, n + b));
    sum / n.max(1) as f64
}

/// Rows of `logits` minus their logsumexp.
fn log_softmax(mut logits: Array2<f32>) -> Array2<f32> {
    for mut row in logits.rows_mut() {
        let lse = logsumexp(row.view());
        row.mapv_inplace(|v| v - lse);
    }
    logits
}

/// Σ over rows of KL(p ‖ q), p given as log-probabilities, q as logits; with the row count.
fn kl_sum(log_p: &Array2<f32>, logits_q: Array2<f32>) -> (f64, usize) {
    // The last position predicts past the window: not scored, as in the loss.
    let rows = log_p.nrows().saturating_sub(1);
    let q = log_softmax(logits_q);
    let mut sum = 0f64;
    for r in 0..rows {
        let (lp, lq) = (log_p.row(r), q.row(r));
        sum += lp.iter().zip(lq.iter()).map(|(&a, &b)| (a.exp() * (a - b)) as f64).sum::<f64>();
    }
    (sum, rows)
}

/// `tr(ΔW H ΔWᵀ)` for `ΔW = w − ŵ` `[out, in]`, `h` `[in, in]`.
fn output_error(w: ArrayView2<f32>, approx: &Array2<f32>, h: &Array2<f32>) -> f64 {
    let delta = &w - approx;
    let dh = delta.dot(h);
    dh.iter().zip(delta.iter()).map(|(&a, &b)| (a * b) as f64).sum()
}

/// One matrix quantized by `c` and brought back to f32.
fn reconstruct(
    w: ArrayView2<f32>,
    c: &Candidate,
    h: Option<&Array2<f64>>,
    opts: &GptqOptions,
) -> Result<Array2<f32>, String> {
    let q = match (c.gptq, h) {
        (true, Some(h)) => gptq(w, h, &c.scheme, opts)?,
        _ => quantize(w, &c.scheme).ok_or("an integer scheme")?,
    };
    Ok(q.dequantize())
}

/// The costs of `w` under every candidate from its inputs' Hessian `h`; the candidates
/// labelled in `measure` are measured by `kl_of` (given the reconstruction), the others
/// predicted from the [`REFERENCE`] candidate's measured KL per unit of output error.
fn costs_of(
    w: ArrayView2<f32>,
    h: &Array2<f64>,
    gptq_opts: &GptqOptions,
    measure: &[&str],
    kl_of: &mut dyn FnMut(&Array2<f32>) -> Result<f64, String>,
) -> Result<Vec<Cost>, String> {
    let h32 = h.mapv(|v| v as f32);
    let (rows, cols) = w.dim();
    let mut costs = Vec::new();
    for c in candidates() {
        let approx = reconstruct(w, &c, Some(h), gptq_opts)?;
        let label = c.label();
        let proxy = output_error(w, &approx, &h32);
        let measured = measure.contains(&label.as_str());
        let kl = if measured { kl_of(&approx)? } else { f64::NAN };
        costs.push(Cost { candidate: c, bytes: c.scheme.stored_bytes(rows, cols), label, proxy, kl, measured });
    }
    let reference = costs.iter().find(|c| c.label == REFERENCE).ok_or("the reference candidate")?;
    let per_unit = if reference.proxy > 0.0 { reference.kl.max(0.0) / reference.proxy } else { 0.0 };
    for c in costs.iter_mut().filter(|c| !c.measured) {
        c.kl = c.proxy * per_unit;
    }
    Ok(costs)
}

/// Measures the table for the FP32 model (`config`, `weights`) on calibration `windows`.
/// `on_tensor(done, total)` is called as matrices finish.
pub fn measure(
    config: &ModelConfig,
    weights: &Weights,
    windows: &[Vec<u32>],
    opts: &SensitivityOptions,
    on_tensor: &mut dyn FnMut(usize, usize),
) -> Result<SensitivityTable, String> {
    let gptq_opts = &GptqOptions::default();
    if windows.is_empty() || opts.windows == 0 {
        return Err("sensitivity needs at least one calibration window".into());
    }
    let chosen = measured_windows(windows, opts);
    let base = Baseline::new(config, weights, &chosen)?;
    let total = 2 + 7 * config.num_layers;
    let mut done = 0;
    let mut measure_labels = vec![REFERENCE];
    if opts.validate {
        measure_labels.push(VALIDATION);
    }
    let mut tensors = Vec::with_capacity(total);
    let mut work = weights.clone();
    // The tied lm_head stays itself while the embedding (and the other way round) changes.
    work.lm_head = Some(weights.lm_head().clone());

    // The embedding: measured at each candidate.
    let mut costs = Vec::new();
    for c in embedding_candidates() {
        let approx = reconstruct(weights.embed_tokens.view(), &c, None, gptq_opts)?;
        let original = std::mem::replace(&mut work.embed_tokens, approx);
        let kl = base.kl_embedded(config, &work, &chosen)?;
        work.embed_tokens = original;
        let (rows, cols) = weights.embed_tokens.dim();
        let label = c.label();
        costs.push(Cost {
            candidate: c,
            bytes: c.scheme.stored_bytes(rows, cols),
            label,
            proxy: 0.0,
            kl,
            measured: true,
        });
    }
    let (rows, cols) = weights.embed_tokens.dim();
    tensors.push(TensorSensitivity { name: "model.embed_tokens.weight".into(), shape: [rows, cols], costs });
    done += 1;
    on_tensor(done, total);

    // The layers, on the FP32 hidden states of every calibration window.
    let r = Reference::from_parts(config, weights);
    let mut hidden: Vec<Array2<f32>> =
        windows.iter().map(|w| r.embed(w).map_err(|e| e.to_string())).collect::<Result<_, _>>()?;
    for i in 0..config.num_layers {
        let mut hessians: std::collections::HashMap<Site, Hessian> = std::collections::HashMap::new();
        let add = |local: &mut std::collections::HashMap<Site, Hessian>, site: Site, v: ArrayView2<f32>| {
            local.entry(site).or_insert_with(|| Hessian::new(v.ncols())).add(v);
        };
        observe_layer(&r, i, &mut hidden, true, &add, &mut |local| {
            for (site, h) in local {
                match hessians.get_mut(&site) {
                    Some(acc) => acc.merge(&h),
                    None => {
                        hessians.insert(site, h);
                    }
                }
            }
        });
        for (name, lin) in weights.layers[i].linears() {
            let full = format!("model.layers.{i}.{name}.weight");
            let h = hessians.get(&site_of(name)).ok_or_else(|| format!("layer {i}: no inputs seen for {name}"))?;
            let mut kl_of = |approx: &Array2<f32>| -> Result<f64, String> {
                let slot = work.layers[i]
                    .linears_mut()
                    .into_iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, l)| l)
                    .ok_or("projection")?;
                let original = std::mem::replace(&mut slot.weight, approx.clone());
                let kl = base.kl(config, &work, i);
                if let Some((_, l)) = work.layers[i].linears_mut().into_iter().find(|(n, _)| *n == name) {
                    l.weight = original;
                }
                Ok(kl)
            };
            let costs = costs_of(lin.weight.view(), h.matrix(), gptq_opts, &measure_labels, &mut kl_of)
                .map_err(|e| format!("{full}: {e}"))?;
            let (rows, cols) = lin.weight.dim();
            tensors.push(TensorSensitivity { name: full, shape: [rows, cols], costs });
            done += 1;
            on_tensor(done, total);
        }
    }

    // The lm_head, on the final norm of the FP32 hidden states.
    let mut h = Hessian::new(config.hidden_size);
    for x in &hidden {
        h.add(rms_norm(x.view(), &weights.norm, config.rms_norm_eps).view());
    }
    let head = weights.lm_head();
    let layers = config.num_layers;
    let mut kl_of = |approx: &Array2<f32>| -> Result<f64, String> {
        let original = work.lm_head.replace(approx.clone());
        let kl = base.kl(config, &work, layers);
        work.lm_head = original;
        Ok(kl)
    };
    let costs = costs_of(head.view(), h.matrix(), gptq_opts, &measure_labels, &mut kl_of)
        .map_err(|e| format!("lm_head.weight: {e}"))?;
    let (rows, cols) = head.dim();
    tensors.push(TensorSensitivity { name: "lm_head.weight".into(), shape: [rows, cols], costs });
    on_tensor(total, total);

    let validation = opts.validate.then(|| validation(&tensors)).flatten();
    Ok(SensitivityTable {
        version: TABLE_VERSION,
        tokens: base.targets.iter().map(|t| t.len()).sum(),
        baseline_loss: base.loss(),
        tensors,
        validation,
    })
}

/// The windows of `windows` the KL is measured over: `opts.windows` evenly chosen.
fn measured_windows<'w>(windows: &'w [Vec<u32>], opts: &SensitivityOptions) -> Vec<&'w [u32]> {
    let m = opts.windows.min(windows.len()).max(1);
    (0..m).map(|k| &windows[k * windows.len() / m]).map(|w| &w[..w.len().min(opts.tokens.max(2))]).collect()
}

/// Mean KL(fp32 ‖ candidate) per token of a whole model over the same windows as
/// [`measure`]'s: what a mixed-precision plan predicted, measured.
pub fn model_kl(
    config: &ModelConfig,
    fp32: &Weights,
    candidate: &Weights,
    windows: &[Vec<u32>],
    opts: &SensitivityOptions,
) -> Result<f64, String> {
    let chosen = measured_windows(windows, opts);
    let base = Baseline::new(config, fp32, &chosen)?;
    base.kl_embedded(config, candidate, &chosen)
}

/// Scores the prediction at [`VALIDATION`] against what was measured there.
fn validation(tensors: &[TensorSensitivity]) -> Option<Validation> {
    let mut pairs = Vec::new();
    for t in tensors {
        let (Some(v), Some(r)) = (t.cost(VALIDATION), t.cost(REFERENCE)) else { continue };
        if !(v.measured && r.measured && r.proxy > 0.0) {
            continue;
        }
        pairs.push((v.proxy * r.kl.max(0.0) / r.proxy, v.kl));
    }
    if pairs.len() < 3 {
        return None;
    }
    let predicted: Vec<f64> = pairs.iter().map(|p| p.0).collect();
    let measured: Vec<f64> = pairs.iter().map(|p| p.1).collect();
    let mut ratios: Vec<f64> = pairs.iter().filter(|p| p.1 > 0.0).map(|p| p.0 / p.1).collect();
    ratios.sort_by(f64::total_cmp);
    Some(Validation {
        label: VALIDATION.into(),
        tensors: pairs.len(),
        spearman: spearman(&predicted, &measured),
        median_ratio: ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN),
    })
}

/// Spearman rank correlation (ties get their mean rank).
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    let (ra, rb) = (ranks(a), ranks(b));
    let n = ra.len() as f64;
    let mean = (n - 1.0) / 2.0;
    let (mut cov, mut va, mut vb) = (0.0, 0.0, 0.0);
    for (x, y) in ra.iter().zip(&rb) {
        cov += (x - mean) * (y - mean);
        va += (x - mean) * (x - mean);
        vb += (y - mean) * (y - mean);
    }
    cov / (va * vb).sqrt()
}

fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
    let mut out = vec![0.0; v.len()];
    let mut k = 0;
    while k < idx.len() {
        let mut e = k;
        while e + 1 < idx.len() && v[idx[e + 1]] == v[idx[k]] {
            e += 1;
        }
        for &i in &idx[k..=e] {
            out[i] = (k + e) as f64 / 2.0;
        }
        k = e + 1;
    }
    out
}

/// A short text table: per matrix, measured KL at the reference and the predicted KL and
/// bytes of every candidate.
pub fn render(table: &SensitivityTable) -> String {
    let labels: Vec<String> = candidates().iter().map(Candidate::label).collect();
    let mut out = format!(
        "sensitivity: mean KL(fp32 ‖ one matrix quantized) per token, ×1e-4, over {} tokens (fp32 loss {:.4}); \
         measured at {REFERENCE} (*), predicted from output error elsewhere\n",
        table.tokens, table.baseline_loss
    );
    out += &format!("{:<38}", "tensor");
    for l in &labels {
        out += &format!(" {:>10}", l.replace("int", "i").replace("-gptq", "g"));
    }
    out += "\n";
    for t in &table.tensors {
        out += &format!("{:<38}", t.name);
        for l in &labels {
            match t.cost(l) {
                Some(c) => out += &format!(" {:>9.2}{}", c.kl * 1e4, if c.measured { "*" } else { " " }),
                None => out += &format!(" {:>10}", "-"),
            }
        }
        out += "\n";
    }
    if let Some(v) = &table.validation {
        out += &format!(
            "validation at {}: {} matrices, Spearman {:.3} between predicted and measured KL, median predicted/measured {:.2}\n",
            v.label, v.tensors, v.spearman, v.median_ratio
        );
    }
    out
}

/// The table for these weights and windows from the cache directory
/// (`<cache>/sensitivity/<key>.json`, keyed by `source_sha256`, the windows' token ids and
/// the settings), or measured and cached.
pub fn cached(
    source_sha256: &str,
    config: &ModelConfig,
    weights: &Weights,
    windows: &[Vec<u32>],
    opts: &SensitivityOptions,
    on_tensor: &mut dyn FnMut(usize, usize),
) -> Result<SensitivityTable, String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(format!("{TABLE_VERSION}\0{source_sha256}\0{}\0", config.num_layers));
    h.update(serde_json::to_string(opts).map_err(|e| e.to_string())?);
    for w in windows {
        h.update([0]);
        w.iter().for_each(|t| h.update(t.to_le_bytes()));
    }
    let key: String = h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect();
    let dir = crate::model::cache_dir().join("sensitivity");
    let path = dir.join(format!("{key}.json"));
    if let Some(table) = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<SensitivityTable>(&b).ok())
        .filter(|t| t.version == TABLE_VERSION)
    {
        return Ok(table);
    }
    let table = measure(config, weights, windows, opts, on_tensor)?;
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(&dir)?;
        std::io::Write::write_all(&mut tmp, &serde_json::to_vec(&table)?)?;
        tmp.persist(&path).map_err(|e| e.error)?;
        Ok(())
    };
    write().map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_ranks_with_ties() {
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &[10.0, 20.0, 35.0, 400.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &[4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        assert_eq!(ranks(&[5.0, 1.0, 5.0, 0.0]), [2.5, 1.0, 2.5, 0.0]);
    }

    #[test]
    fn the_candidates_are_the_issue_list_and_the_reference_is_among_them() {
        let labels: Vec<String> = candidates().iter().map(Candidate::label).collect();
        assert_eq!(labels.len(), 16);
        for l in [REFERENCE, VALIDATION, "int8-pc-sym", "int4-b128-zp", "int4-b64-sym-gptq", "nf4-b64", "nf4-b64-gptq"]
        {
            assert!(labels.iter().any(|x| x == l), "{l} in {labels:?}");
        }
        assert!(embedding_candidates().iter().all(|c| c.scheme.precision == Precision::Int8 && !c.gptq));
    }

    #[test]
    fn output_error_is_the_quadratic_form() {
        let w = Array2::from_shape_vec((2, 2), vec![1.0f32, 2.0, 3.0, 4.0]).expect("w");
        let approx = Array2::from_shape_vec((2, 2), vec![1.0f32, 1.0, 3.0, 5.0]).expect("approx");
        let h = Array2::from_shape_vec((2, 2), vec![2.0f32, 1.0, 1.0, 3.0]).expect("h");
        // Rows of ΔW: [0, 1] → 3; [0, −1] → 3.
        assert!((output_error(w.view(), &approx, &h) - 6.0).abs() < 1e-9);
    }
}
