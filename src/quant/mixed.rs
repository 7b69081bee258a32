//! Automatic mixed precision: a scheme per matrix that minimizes the predicted loss (the
//! sum of the [sensitivity](super::sensitivity) table's KL) under a size budget in bits per
//! weight, by an exact multiple-choice knapsack over the table.
//!
//! Matrices the artifact packs into one MatMul (a layer's q/k/v, its gate/up) are chosen
//! together, so packing, and its fewer larger kernels, survive; so are a tied embedding and
//! lm_head, whose table is stored once when they share an INT8 scheme and twice otherwise.
//! The budget counts what the artifact stores for the model's weights (codes, scales, zero
//! points, the f32 norms) over its parameters counted once, as llama.cpp reports bits per
//! weight.

use std::collections::HashMap;

use ndarray::Array2;
use serde::{Deserialize, Serialize};

use super::sensitivity::SensitivityTable;
use super::{quantize, Precision, Quantized, Scheme};
use crate::model::{ModelConfig, Weights};

/// Budget units of the knapsack: the capacity is split in this many steps (each option's
/// bytes rounded up to a step, so the choice never exceeds the budget).
const STEPS: usize = 16_384;

/// One matrix's choice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// Hugging Face name.
    pub name: String,
    /// The candidate's label (`int4-b64-zp-gptq`, …).
    pub label: String,
    /// Scheme stored.
    pub scheme: Scheme,
    /// Bytes stored.
    pub bytes: u64,
    /// Predicted KL per token of this matrix alone.
    pub predicted_kl: f64,
    /// Fixed by a recipe override rather than chosen.
    pub pinned: bool,
}

/// What the search chose, and what it expects and measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixedPlan {
    /// The budget asked for.
    pub target_bits_per_weight: f64,
    /// Bits per weight of the choice (weights and norms over parameters).
    pub bits_per_weight: f64,
    /// Σ of the choices' predicted KL per token.
    pub predicted_kl: f64,
    /// KL per token of the whole chosen model against FP32 over the sensitivity tokens
    /// (native reference forward, f32 arithmetic), measured after quantization.
    pub measured_kl: Option<f64>,
    /// Every matrix of the table, in table order.
    pub choices: Vec<Choice>,
}

impl MixedPlan {
    /// The scheme chosen for `name`, if the plan covers it.
    pub fn scheme_for(&self, name: &str) -> Option<Scheme> {
        self.choices.iter().find(|c| c.name == name).map(|c| c.scheme)
    }
}

/// Matrices chosen together: the ones the artifact packs side by side.
fn group_key(name: &str) -> String {
    for (parts, packed) in
        [(["q_proj", "k_proj", "v_proj"].as_slice(), "qkv_proj"), (&["gate_proj", "up_proj"], "gate_up_proj")]
    {
        for p in parts {
            if let Some(prefix) = name.strip_suffix(&format!("{p}.weight")) {
                return format!("{prefix}{packed}");
            }
        }
    }
    name.to_string()
}

/// One matrix's part of an option.
struct Member {
    label: String,
    bytes: u64,
    kl: f64,
    scheme: Scheme,
}

/// One option of a group: each member's part, and their sums.
struct Opt {
    members: Vec<Member>,
    bytes: u64,
    kl: f64,
    pinned: bool,
}

impl Opt {
    fn new(members: Vec<Member>, pinned: bool) -> Opt {
        let (bytes, kl) = (members.iter().map(|m| m.bytes).sum(), members.iter().map(|m| m.kl).sum());
        Opt { members, bytes, kl, pinned }
    }
}

/// Chooses a candidate per matrix of `table` for `bits_per_weight`. `gptq` says whether the
/// export runs GPTQ (its candidates) or round to nearest (the others; the embedding is
/// always round to nearest); `pinned(name)` gives a recipe override's scheme, which is kept.
/// `Err` when even the smallest choice exceeds the budget, naming both.
pub fn plan(
    table: &SensitivityTable,
    config: &ModelConfig,
    bits_per_weight: f64,
    gptq: bool,
    pinned: &dyn Fn(&str) -> Option<Scheme>,
) -> Result<MixedPlan, String> {
    let params = config.parameter_count() as f64;
    // The norms (per layer two, and the final one) and biases: f32.
    let kv = config.num_kv_heads * config.head_dim;
    let bias = if config.attention_bias { config.num_heads * config.head_dim + 2 * kv } else { 0 };
    let fixed = (((2 * config.num_layers + 1) * config.hidden_size + config.num_layers * bias) * 4) as u64;
    let budget = (bits_per_weight * params / 8.0).floor() as u64;
    // Groups in table order.
    let mut keys: Vec<String> = Vec::new();
    for t in &table.tensors {
        let k = group_key(&t.name);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let mut groups: Vec<(Vec<&str>, Vec<Opt>)> = Vec::new();
    for key in &keys {
        let members: Vec<_> = table.tensors.iter().filter(|t| &group_key(&t.name) == key).collect();
        let first = members[0];
        let mut opts = Vec::new();
        for c in &first.costs {
            let embedding = first.name.contains("embed_tokens");
            if !embedding && c.candidate.gptq != gptq {
                continue;
            }
            let mut m = Vec::new();
            for t in &members {
                let Some(x) = t.cost(&c.label) else { break };
                m.push(Member { label: c.label.clone(), bytes: x.bytes, kl: x.kl, scheme: x.candidate.scheme });
            }
            if m.len() == members.len() {
                opts.push(Opt::new(m, false));
            }
        }
        // An override pins the whole group to its scheme (the member's own if they differ).
        let pins: Vec<Option<Scheme>> = members.iter().map(|t| pinned(&t.name)).collect();
        if pins.iter().any(Option::is_some) {
            let mut m = Vec::new();
            for (t, pin) in members.iter().zip(&pins) {
                let scheme = pin.unwrap_or(pins.iter().flatten().next().copied().unwrap_or(Scheme::FP32));
                let kl = match scheme.precision {
                    Precision::Fp32 | Precision::Fp16 => 0.0,
                    _ => t
                        .costs
                        .iter()
                        .find(|c| {
                            c.candidate.scheme == scheme && (c.candidate.gptq == gptq || !t.name.contains("layers"))
                        })
                        .map(|c| c.kl)
                        .ok_or_else(|| {
                            format!(
                                "an override pins {} to {}, which the sensitivity table does not measure",
                                t.name,
                                scheme.label()
                            )
                        })?,
                };
                m.push(Member {
                    label: scheme.label(),
                    bytes: scheme.stored_bytes(t.shape[0], t.shape[1]),
                    kl,
                    scheme,
                });
            }
            opts = vec![Opt::new(m, true)];
        }
        if opts.is_empty() {
            return Err(format!("{key}: no candidate in the sensitivity table"));
        }
        groups.push((members.iter().map(|t| t.name.as_str()).collect(), opts));
    }
    if config.tie_word_embeddings {
        tie(&mut groups, table);
    }
    let smallest: u64 = fixed + groups.iter().map(|(_, o)| o.iter().map(|x| x.bytes).min().unwrap_or(0)).sum::<u64>();
    if smallest > budget {
        return Err(format!(
            "bits_per_weight = {bits_per_weight}: the smallest choice takes {:.3} bits per weight ({smallest} bytes for {} parameters)",
            smallest as f64 * 8.0 / params,
            config.parameter_count()
        ));
    }
    let capacity = budget - fixed;
    let unit = capacity.div_ceil(STEPS as u64).max(1);
    let steps = (capacity / unit) as usize;
    // best[c]: least KL using at most c units; choice[g][c]: the option group g took.
    let mut best = vec![0f64; steps + 1];
    let mut choice: Vec<Vec<u8>> = Vec::with_capacity(groups.len());
    for (_, opts) in &groups {
        let mut next = vec![f64::INFINITY; steps + 1];
        let mut took = vec![u8::MAX; steps + 1];
        for (k, o) in opts.iter().enumerate() {
            let w = o.bytes.div_ceil(unit) as usize;
            for c in w..=steps {
                let v = best[c - w] + o.kl;
                if v < next[c] {
                    next[c] = v;
                    took[c] = k as u8;
                }
            }
        }
        best = next;
        choice.push(took);
    }
    let mut c = steps;
    let mut picked = vec![0usize; groups.len()];
    for g in (0..groups.len()).rev() {
        let k = choice[g][c] as usize;
        picked[g] = k;
        c -= groups[g].1[k].bytes.div_ceil(unit) as usize;
    }
    let mut choices = Vec::new();
    for ((names, opts), &k) in groups.iter().zip(&picked) {
        let o = &opts[k];
        for (name, m) in names.iter().zip(&o.members) {
            choices.push(Choice {
                name: name.to_string(),
                label: m.label.clone(),
                scheme: m.scheme,
                bytes: m.bytes,
                predicted_kl: m.kl,
                pinned: o.pinned,
            });
        }
    }
    choices.sort_by_key(|c| table.tensors.iter().position(|t| t.name == c.name));
    let total = fixed + choices.iter().map(|c| c.bytes).sum::<u64>();
    Ok(MixedPlan {
        target_bits_per_weight: bits_per_weight,
        bits_per_weight: total as f64 * 8.0 / params,
        predicted_kl: choices.iter().map(|c| c.predicted_kl).sum(),
        measured_kl: None,
        choices,
    })
}

/// Makes a tied embedding and lm_head one group: every pair of their options, the pairs
/// that the artifact stores once ([`Scheme::stores_tied_once`]) counting the table once (as
/// the lm_head's bytes) with the lm_head rounded to nearest, as the export then leaves it.
fn tie(groups: &mut Vec<(Vec<&str>, Vec<Opt>)>, table: &SensitivityTable) {
    let at = |groups: &[(Vec<&str>, Vec<Opt>)], name: &str| groups.iter().position(|(n, _)| n == &[name]);
    let (Some(e), Some(h)) = (at(groups, "model.embed_tokens.weight"), at(groups, "lm_head.weight")) else { return };
    let (_, head) = groups.remove(h.max(e));
    let (_, embedding) = groups.remove(h.min(e));
    let (embedding, head) = if e < h { (embedding, head) } else { (head, embedding) };
    let rounded = |scheme: &Scheme| {
        let t = table.tensors.iter().find(|t| t.name == "lm_head.weight")?;
        t.costs.iter().find(|c| !c.candidate.gptq && c.candidate.scheme == *scheme)
    };
    let mut opts = Vec::new();
    for a in &embedding {
        for b in &head {
            let (ea, hb) = (&a.members[0], &b.members[0]);
            let e = Member { label: ea.label.clone(), bytes: ea.bytes, kl: ea.kl, scheme: ea.scheme };
            let mut h = Member { label: hb.label.clone(), bytes: hb.bytes, kl: hb.kl, scheme: hb.scheme };
            if ea.scheme.stores_tied_once(&hb.scheme) {
                h.bytes = e.bytes;
                if let Some(c) = rounded(&hb.scheme) {
                    (h.label, h.kl) = (c.label.clone(), c.kl);
                }
                opts.push(Opt::new(vec![Member { bytes: 0, ..e }, h], a.pinned || b.pinned));
            } else {
                opts.push(Opt::new(vec![e, h], a.pinned || b.pinned));
            }
        }
    }
    groups.insert(0, (vec!["model.embed_tokens.weight", "lm_head.weight"], opts));
}

/// `weights` with every matrix of `plan` replaced by what the artifact stores for it,
/// brought back to f32: the codes in `prequantized` (GPTQ) where there, round to nearest
/// otherwise. A tied lm_head becomes its own matrix.
pub fn reconstructed(
    plan: &MixedPlan,
    weights: &Weights,
    prequantized: &HashMap<String, Quantized>,
) -> Result<Weights, String> {
    let mut out = weights.clone();
    let stored = |name: &str, w: &Array2<f32>, scheme: &Scheme| -> Result<Array2<f32>, String> {
        if scheme.precision.bits().is_none() {
            return Ok(w.clone());
        }
        match prequantized.get(name) {
            Some(q) => Ok(q.dequantize()),
            None => quantize(w.view(), scheme).map(|q| q.dequantize()).ok_or_else(|| format!("{name}: integer scheme")),
        }
    };
    for c in &plan.choices {
        if c.name == "lm_head.weight" {
            out.lm_head = Some(stored(&c.name, weights.lm_head(), &c.scheme)?);
        } else if c.name == "model.embed_tokens.weight" {
            out.embed_tokens = stored(&c.name, &weights.embed_tokens, &c.scheme)?;
        }
    }
    for (i, layer) in out.layers.iter_mut().enumerate() {
        for (name, lin) in layer.linears_mut() {
            let full = format!("model.layers.{i}.{name}.weight");
            if let Some(scheme) = plan.scheme_for(&full) {
                lin.weight = stored(&full, &lin.weight, &scheme)?;
            }
        }
    }
    if plan.scheme_for("lm_head.weight").is_none() && out.lm_head.is_none() {
        out.lm_head = Some(weights.lm_head().clone());
    }
    Ok(out)
}

/// The per-layer map of a plan: one row per layer, one column per projection, then the
/// embedding and lm_head.
pub fn render(plan: &MixedPlan) -> String {
    let short = |c: &Choice| c.label.replace("int", "i").replace("-gptq", "g");
    let mut out = format!(
        "mixed precision: {:.3} bits per weight (budget {}), predicted KL {:.4}{}\n",
        plan.bits_per_weight,
        plan.target_bits_per_weight,
        plan.predicted_kl,
        plan.measured_kl.map(|k| format!(", measured KL {k:.4} (reference forward, f32)")).unwrap_or_default()
    );
    let cols = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    out += &format!("{:<6}", "layer");
    for c in cols {
        out += &format!(" {c:>13}");
    }
    out += "\n";
    let mut layer = 0;
    loop {
        let row: Vec<Option<&Choice>> = cols
            .iter()
            .map(|c| {
                plan.choices
                    .iter()
                    .find(|x| x.name.starts_with(&format!("model.layers.{layer}.")) && x.name.contains(c))
            })
            .collect();
        if row.iter().all(Option::is_none) {
            break;
        }
        out += &format!("{layer:<6}");
        for c in row {
            out += &format!(" {:>13}", c.map(short).unwrap_or_else(|| "-".into()));
        }
        out += "\n";
        layer += 1;
    }
    for c in plan.choices.iter().filter(|c| !c.name.starts_with("model.layers.")) {
        out += &format!("{}: {}{}\n", c.name, c.label, if c.pinned { " (override)" } else { "" });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::sensitivity::{candidates, Cost, TensorSensitivity, TABLE_VERSION};

    fn config(layers: usize) -> ModelConfig {
        ModelConfig {
            architecture: crate::model::Architecture::Llama,
            vocab_size: 64,
            hidden_size: 64,
            intermediate_size: 256,
            num_layers: layers,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 128,
            tie_word_embeddings: true,
            attention_bias: false,
            sliding_window: None,
        }
    }

    /// A table whose every matrix costs `kl(name, bits, block)`.
    fn table(config: &ModelConfig, kl: &dyn Fn(&str, u32, usize) -> f64) -> SensitivityTable {
        let (h, i, v) = (config.hidden_size, config.intermediate_size, config.vocab_size);
        let kv = config.num_kv_heads * config.head_dim;
        let mut names = vec![("model.embed_tokens.weight".to_string(), [v, h])];
        for l in 0..config.num_layers {
            for (n, shape) in [
                ("self_attn.q_proj", [h, h]),
                ("self_attn.k_proj", [kv, h]),
                ("self_attn.v_proj", [kv, h]),
                ("self_attn.o_proj", [h, h]),
                ("mlp.gate_proj", [i, h]),
                ("mlp.up_proj", [i, h]),
                ("mlp.down_proj", [h, i]),
            ] {
                names.push((format!("model.layers.{l}.{n}.weight"), shape));
            }
        }
        names.push(("lm_head.weight".into(), [v, h]));
        let tensors = names
            .into_iter()
            .map(|(name, shape)| {
                let embedding = name.contains("embed");
                let costs = candidates()
                    .into_iter()
                    .filter(|c| !embedding || (!c.gptq && c.scheme.precision == Precision::Int8))
                    .map(|c| Cost {
                        candidate: c,
                        label: c.label(),
                        bytes: c.scheme.stored_bytes(shape[0], shape[1]),
                        proxy: 1.0,
                        kl: kl(&name, c.scheme.precision.bits().unwrap_or(32), c.scheme.block_size)
                            * if c.gptq { 0.5 } else { 1.0 },
                        measured: false,
                    })
                    .collect();
                TensorSensitivity { name, shape, costs }
            })
            .collect();
        SensitivityTable { version: TABLE_VERSION, tokens: 1, baseline_loss: 1.0, tensors, validation: None }
    }

    fn flat(_: &str, bits: u32, block: usize) -> f64 {
        if bits == 8 {
            0.001
        } else {
            0.01 * (block as f64 / 32.0)
        }
    }

    #[test]
    fn a_larger_budget_never_predicts_worse_and_the_budget_holds() {
        let c = config(2);
        let t = table(&c, &flat);
        let mut last = f64::INFINITY;
        for bpw in [5.0, 5.5, 6.5, 8.0, 9.5] {
            let p = plan(&t, &c, bpw, true, &|_| None).expect("plan");
            assert!(p.bits_per_weight <= bpw, "{bpw}: {}", p.bits_per_weight);
            assert!(p.predicted_kl <= last + 1e-12, "{bpw}: {} after {last}", p.predicted_kl);
            let tied_once = p.choices.iter().any(|x| x.name.contains("embed") && x.bytes == 0);
            assert!(p.choices.iter().all(|x| x.label.ends_with("-gptq")
                || x.name.contains("embed")
                || tied_once && x.name == "lm_head.weight"));
            last = p.predicted_kl;
        }
        // Everything fits at 8-bit blocks with room to spare: nothing stays at 4 bits.
        let p = plan(&t, &c, 12.0, true, &|_| None).expect("plan");
        assert!(p.choices.iter().all(|x| x.scheme.precision == Precision::Int8), "{}", render(&p));
        let e = plan(&t, &c, 3.0, true, &|_| None).expect_err("too small");
        assert!(e.contains("bits_per_weight = 3") && e.contains("smallest choice"), "{e}");
    }

    #[test]
    fn the_budget_goes_to_the_sensitive_matrices_and_packed_ones_share_a_scheme() {
        let c = config(2);
        // Layer 1's down_proj costs 100× the rest at 4 bits.
        let kl = |name: &str, bits: u32, block: usize| {
            let f = flat(name, bits, block);
            if name == "model.layers.1.mlp.down_proj.weight" && bits == 4 {
                f * 100.0
            } else {
                f
            }
        };
        let t = table(&c, &kl);
        let p = plan(&t, &c, 6.0, false, &|_| None).expect("plan");
        let of = |n: &str| p.choices.iter().find(|x| x.name == n).expect(n).clone();
        assert_eq!(of("model.layers.1.mlp.down_proj.weight").scheme.precision, Precision::Int8, "{}", render(&p));
        assert_eq!(of("model.layers.0.mlp.down_proj.weight").scheme.precision, Precision::Int4, "{}", render(&p));
        for l in 0..2 {
            let q = of(&format!("model.layers.{l}.self_attn.q_proj.weight")).scheme;
            assert_eq!(q, of(&format!("model.layers.{l}.self_attn.k_proj.weight")).scheme);
            assert_eq!(q, of(&format!("model.layers.{l}.self_attn.v_proj.weight")).scheme);
            let g = of(&format!("model.layers.{l}.mlp.gate_proj.weight")).scheme;
            assert_eq!(g, of(&format!("model.layers.{l}.mlp.up_proj.weight")).scheme);
        }
        assert!(p.choices.iter().all(|x| !x.label.ends_with("-gptq")));
        // The predicted KL is the sum of the choices'.
        let sum: f64 = p.choices.iter().map(|x| x.predicted_kl).sum();
        assert!((sum - p.predicted_kl).abs() < 1e-12);
    }

    #[test]
    fn a_tied_table_under_one_int8_scheme_counts_once() {
        let mut c = config(1);
        let t = table(&c, &flat);
        let (v, h) = (c.vocab_size, c.hidden_size);
        let int8 = Scheme {
            precision: Precision::Int8,
            layout: super::super::Layout::PerChannel,
            block_size: 32,
            symmetric: true,
            clip_search: false,
        };
        let p = plan(&t, &c, 12.0, true, &|_| None).expect("plan");
        let of = |p: &MixedPlan, n: &str| p.choices.iter().find(|x| x.name == n).expect(n).clone();
        let (e, head) = (of(&p, "model.embed_tokens.weight"), of(&p, "lm_head.weight"));
        assert_eq!((e.scheme, head.scheme, e.bytes), (int8, int8, 0), "{}", render(&p));
        assert_eq!(head.bytes, int8.stored_bytes(v, h));
        // Stored once, the lm_head is the embedding's rounding, not GPTQ's.
        let rtn = t.tensors.last().and_then(|x| x.cost("int8-pc-sym")).expect("rtn");
        assert_eq!((head.label.as_str(), head.predicted_kl), ("int8-pc-sym", rtn.kl));
        assert_eq!(p.choices.iter().map(|x| x.name.as_str()).collect::<Vec<_>>().first(), Some(&e.name.as_str()));
        assert_eq!(p.choices.last().map(|x| x.name.as_str()), Some("lm_head.weight"), "table order");
        // Untied, the same budget pays for both tables.
        c.tie_word_embeddings = false;
        let untied = plan(&t, &c, 12.0, true, &|_| None).expect("plan");
        assert_eq!(of(&untied, "model.embed_tokens.weight").bytes, int8.stored_bytes(v, h));
        // The budget that fits the layers at INT8 with one table, but not with two.
        c.tie_word_embeddings = true;
        let once = (p.bits_per_weight * c.parameter_count() as f64 / 8.0).ceil();
        let bpw = (once + 16.0) * 8.0 / c.parameter_count() as f64;
        let p = plan(&t, &c, bpw, true, &|_| None).expect("plan");
        assert!(p.bits_per_weight <= bpw);
        assert!(p.choices.iter().all(|x| x.scheme.precision == Precision::Int8), "{}", render(&p));
    }

    #[test]
    fn an_override_pins_its_matrices() {
        let c = config(1);
        let t = table(&c, &flat);
        let fp32 = |n: &str| n.contains("o_proj").then_some(Scheme::FP32);
        let p = plan(&t, &c, 7.0, true, &fp32).expect("plan");
        let o = p.choices.iter().find(|x| x.name.contains("o_proj")).expect("o_proj");
        assert!(o.pinned && o.scheme == Scheme::FP32 && o.predicted_kl == 0.0, "{o:?}");
        assert_eq!(o.bytes, (c.hidden_size * c.hidden_size * 4) as u64);
        let int3 = |n: &str| {
            n.contains("o_proj").then_some(Scheme {
                precision: Precision::Int4,
                layout: super::super::Layout::PerTensor,
                block_size: 0,
                symmetric: true,
                clip_search: false,
            })
        };
        let e = plan(&t, &c, 7.0, true, &int3).expect_err("unmeasured");
        assert!(e.contains("o_proj") && e.contains("int4-pt-sym"), "{e}");
    }
}
