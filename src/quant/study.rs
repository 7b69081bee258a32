//! The classic granularity study: how much error per-tensor, per-channel and blocked
//! scales leave at 8 and 4 bits, per class of tensor, on a model's real weights.

use super::{quantize, Layout, Precision, Scheme};
use crate::model::Weights;

/// Tensor classes the study groups by.
pub const CLASSES: [&str; 4] = ["attention", "mlp", "embedding", "lm_head"];

/// One cell of the study.
#[derive(Debug, Clone, PartialEq)]
pub struct GranularityRow {
    /// Scheme label (`int4-b32-sym`, …).
    pub scheme: String,
    /// Tensor class.
    pub class: &'static str,
    /// ‖W − Ŵ‖_F / ‖W‖_F over all tensors of the class together.
    pub rel_frobenius: f64,
}

/// The schemes compared: per tensor, per channel, blocks of 32/64/128; 8 and 4 bits; symmetric.
pub fn study_schemes() -> Vec<Scheme> {
    let mut out = Vec::new();
    for precision in [Precision::Int8, Precision::Int4] {
        for (layout, block_size) in [
            (Layout::PerTensor, 0),
            (Layout::PerChannel, 0),
            (Layout::Blocked, 32),
            (Layout::Blocked, 64),
            (Layout::Blocked, 128),
        ] {
            out.push(Scheme { precision, layout, block_size, symmetric: true, clip_search: false });
        }
    }
    out
}

fn class_of(name: &str) -> &'static str {
    if name.contains("self_attn") {
        "attention"
    } else if name.contains("mlp") {
        "mlp"
    } else if name.contains("embed_tokens") {
        "embedding"
    } else {
        "lm_head"
    }
}

/// Runs the study over every matrix of `weights` (an untied lm_head is its own class).
pub fn granularity_study(weights: &Weights) -> Vec<GranularityRow> {
    let matrices = weights.matrices();
    let mut rows = Vec::new();
    for scheme in study_schemes() {
        let mut sums = [(0f64, 0f64); CLASSES.len()];
        for (name, w) in &matrices {
            let Some(q) = quantize(w.view(), &scheme) else { continue };
            let back = q.dequantize();
            let k = CLASSES.iter().position(|c| *c == class_of(name)).unwrap_or(0);
            for (&a, &b) in w.iter().zip(back.iter()) {
                sums[k].0 += ((a - b) as f64).powi(2);
                sums[k].1 += (a as f64).powi(2);
            }
        }
        for (k, (num, den)) in sums.iter().enumerate() {
            if *den > 0.0 {
                rows.push(GranularityRow {
                    scheme: scheme.label(),
                    class: CLASSES[k],
                    rel_frobenius: (num / den).sqrt(),
                });
            }
        }
    }
    rows
}
