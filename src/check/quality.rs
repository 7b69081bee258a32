//! Quality against the FP32 artifact of the same source: perplexity on a held-out text,
//! mean KL(fp32 ‖ quantized) and top-1 agreement, over windows of the text.

use std::path::Path;

use ndarray::{s, Array2};
use serde::{Deserialize, Serialize};

use super::parity::kl_divergence;
use super::CheckError;
use crate::model::reference::{argmax, logsumexp, Logits, Reference};
use crate::model::Model;
use crate::onnx::manifest;
use crate::runtime::{OrtDecoder, StepInput};

/// Quality of a candidate against the baseline over the same tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    /// Tokens evaluated.
    pub tokens: usize,
    /// Baseline perplexity.
    pub baseline_ppl: f64,
    /// Candidate perplexity.
    pub ppl: f64,
    /// (ppl − baseline) / baseline.
    pub ppl_increase: f64,
    /// Mean KL(baseline ‖ candidate) per predicted position, nats.
    pub mean_kl: f64,
    /// Share of positions whose argmax agrees with the baseline's.
    pub top1: f64,
}

/// The first `tokens` token ids of the text file `path`, with the artifact's tokenizer.
pub fn text_tokens(artifact: &Path, path: &Path, tokens: usize) -> Result<Vec<u32>, CheckError> {
    let bytes = std::fs::read(path).map_err(|source| CheckError::Io { path: path.to_path_buf(), source })?;
    let text = String::from_utf8(bytes).map_err(|e| CheckError::Artifact {
        path: path.to_path_buf(),
        reason: format!("not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to()),
    })?;
    if text.trim().is_empty() {
        return Err(CheckError::Artifact { path: path.to_path_buf(), reason: "the text is empty".into() });
    }
    let tok_path = artifact.join(manifest::TOKENIZER_FILE);
    let tok = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| CheckError::Artifact { path: tok_path.clone(), reason: e.to_string() })?;
    let enc =
        tok.encode(text.as_str(), false).map_err(|e| CheckError::Artifact { path: tok_path, reason: e.to_string() })?;
    let ids: Vec<u32> = enc.get_ids().iter().take(tokens).copied().collect();
    if ids.len() < 2 {
        return Err(CheckError::Artifact {
            path: path.to_path_buf(),
            reason: format!("{} token(s): too short to score", ids.len()),
        });
    }
    Ok(ids)
}

/// Scores `ids` in windows of `window` tokens (each window starts without a past) through
/// both decoders. `on_window` is told how many windows are done.
pub fn compare(
    baseline: &mut OrtDecoder,
    candidate: &mut OrtDecoder,
    ids: &[u32],
    window: usize,
    on_window: &mut dyn FnMut(usize, usize),
) -> Result<Quality, CheckError> {
    let window = window.max(2);
    let windows: Vec<&[u32]> = ids.chunks(window).filter(|w| w.len() >= 2).collect();
    let (mut nll_base, mut nll, mut kl, mut agree, mut count) = (0f64, 0f64, 0f64, 0usize, 0usize);
    for (i, w) in windows.iter().enumerate() {
        let lb = logits(baseline, w)?;
        let lc = logits(candidate, w)?;
        for t in 0..w.len() - 1 {
            let (rb, rc) = (lb.row(t), lc.row(t));
            let target = w[t + 1] as usize;
            nll_base += (logsumexp(rb) - rb[target]) as f64;
            nll += (logsumexp(rc) - rc[target]) as f64;
            kl += kl_divergence(rb, rc);
            agree += usize::from(argmax(rb) == argmax(rc));
            count += 1;
        }
        on_window(i + 1, windows.len());
    }
    let n = count as f64;
    let (baseline_ppl, ppl) = ((nll_base / n).exp(), (nll / n).exp());
    Ok(Quality {
        tokens: count,
        baseline_ppl,
        ppl,
        ppl_increase: (ppl - baseline_ppl) / baseline_ppl,
        mean_kl: kl / n,
        top1: agree as f64 / n,
    })
}

/// Perplexity of `model` (GGUF or Hugging Face directory) on the first `tokens` tokens of
/// the text file `path`, through the native reference forward, in windows of `window` as
/// [`compare`] scores them: the protocol `kiln check` uses, for files other tools made.
pub fn reference_perplexity(model: &Model, path: &Path, tokens: usize, window: usize) -> Result<f64, CheckError> {
    let text = std::fs::read_to_string(path).map_err(|source| CheckError::Io { path: path.to_path_buf(), source })?;
    let ids = model
        .tokenizer
        .encode(&text)
        .map_err(|e| CheckError::Artifact { path: path.to_path_buf(), reason: e.to_string() })?;
    let ids = &ids[..ids.len().min(tokens)];
    let r = Reference::new(model);
    let per: Vec<(f64, usize)> = ids
        .chunks(window.max(2))
        .filter(|w| w.len() >= 2)
        .map(|w| {
            let mut cache = r.new_cache(w.len());
            let l = r.forward(w, &mut cache, Logits::All).map_err(|e| CheckError::Run(e.to_string()))?;
            let nll: f64 = (0..w.len() - 1).map(|t| (logsumexp(l.row(t)) - l[[t, w[t + 1] as usize]]) as f64).sum();
            Ok((nll, w.len() - 1))
        })
        .collect::<Result<_, CheckError>>()?;
    let (nll, n) = per.iter().fold((0.0, 0), |(a, b), &(x, y)| (a + x, b + y));
    if n == 0 {
        return Err(CheckError::Artifact { path: path.to_path_buf(), reason: "too short to score".into() });
    }
    Ok((nll / n as f64).exp())
}

/// Logits `[len, vocab]` of one window run as a single prefill.
fn logits(dec: &mut OrtDecoder, ids: &[u32]) -> Result<Array2<f32>, CheckError> {
    let n = ids.len();
    let out = dec
        .run(StepInput {
            input_ids: Array2::from_shape_fn((1, n), |(_, j)| ids[j] as i64),
            attention_mask: Array2::ones((1, n)),
            position_ids: Array2::from_shape_fn((1, n), |(_, j)| j as i64),
            past: dec.empty_past(1),
        })
        .map_err(|e| CheckError::Run(e.to_string()))?;
    Ok(out.logits.slice(s![0, .., ..]).to_owned())
}
