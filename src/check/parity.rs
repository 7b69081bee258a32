//! Parity: the same token ids through two runners (tract and ONNX Runtime), step by step,
//! with per-step logit differences, top-1 agreement and KL divergence.

use ndarray::{s, Array2, ArrayView1};
use serde::{Deserialize, Serialize};

use super::tract::TractDecoder;
use super::CheckError;
use crate::model::reference::argmax;
use crate::onnx::manifest::Manifest;
use crate::runtime::{Forward, KvTensors, OrtDecoder, StepInput, StepOutput};

/// Something that runs an artifact's decoder graph.
pub trait Runner {
    /// One run.
    fn step(&mut self, input: StepInput) -> Result<StepOutput, CheckError>;
}

impl Runner for TractDecoder {
    fn step(&mut self, input: StepInput) -> Result<StepOutput, CheckError> {
        self.run(input)
    }
}

impl Runner for OrtDecoder {
    fn step(&mut self, input: StepInput) -> Result<StepOutput, CheckError> {
        self.run(input).map_err(|e| CheckError::Run(e.to_string()))
    }
}

/// Differences at one step (the prefill is step 0), over every real (unpadded) position.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// 0 for the prefill, then one per decode step.
    pub step: usize,
    /// max |a − b| over the logits compared.
    pub max_abs: f32,
    /// max over rows of max |a − b| / max |b|.
    pub max_rel: f32,
    /// Share of rows whose argmax agrees (over every row of every step in a worst-of).
    pub top1: f64,
    /// Rows compared.
    pub rows: usize,
    /// Largest KL(softmax(a) ‖ softmax(b)) over rows, in nats.
    pub max_kl: f64,
}

/// Parity over a whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parity {
    /// Sequences in the batch.
    pub batch: usize,
    /// Per step.
    pub steps: Vec<StepStats>,
}

impl Parity {
    /// Over all steps: the largest differences, and top-1 agreement over all rows.
    pub fn worst(&self) -> StepStats {
        let rows: usize = self.steps.iter().map(|s| s.rows).sum();
        let agree: f64 = self.steps.iter().map(|s| s.top1 * s.rows as f64).sum();
        self.steps.iter().fold(
            StepStats { step: 0, max_abs: 0.0, max_rel: 0.0, top1: agree / rows.max(1) as f64, rows, max_kl: 0.0 },
            |w, s| StepStats {
                step: w.step.max(s.step),
                max_abs: w.max_abs.max(s.max_abs),
                max_rel: w.max_rel.max(s.max_rel),
                max_kl: w.max_kl.max(s.max_kl),
                ..w
            },
        )
    }
}

/// Runs `prompts` (left-padded into one batch) through `a` and `b`, then `decode_steps`
/// greedy steps in which both are fed the token `a` chooses, comparing every step.
pub fn compare(
    m: &Manifest,
    a: &mut dyn Runner,
    b: &mut dyn Runner,
    prompts: &[Vec<u32>],
    decode_steps: usize,
) -> Result<Parity, CheckError> {
    let batch = prompts.len();
    let len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if batch == 0 || len == 0 {
        return Err(CheckError::Run("parity needs at least one non-empty prompt".into()));
    }
    let pads: Vec<usize> = prompts.iter().map(|p| len - p.len()).collect();
    let mut ids = Array2::<i64>::zeros((batch, len));
    let mut mask = Array2::<i64>::zeros((batch, len));
    let mut pos = Array2::<i64>::zeros((batch, len));
    for (r, p) in prompts.iter().enumerate() {
        for (j, &t) in p.iter().enumerate() {
            ids[[r, pads[r] + j]] = t as i64;
            mask[[r, pads[r] + j]] = 1;
            pos[[r, pads[r] + j]] = j as i64;
        }
    }
    let (mut past_a, mut past_b) = (empty_past(m, batch), empty_past(m, batch));
    let mut next_pos: Vec<i64> = prompts.iter().map(|p| p.len() as i64).collect();
    let mut steps = Vec::with_capacity(decode_steps + 1);
    for step in 0..=decode_steps {
        let input =
            |past| StepInput { input_ids: ids.clone(), attention_mask: mask.clone(), position_ids: pos.clone(), past };
        let oa = a.step(input(past_a))?;
        let ob = b.step(input(past_b))?;
        let seq = ids.ncols();
        let mut stats = Accumulator::default();
        let mut next = Vec::with_capacity(batch);
        for (r, &pad) in pads.iter().enumerate() {
            let first = if step == 0 { pad } else { 0 };
            stats.add(oa.logits.slice(s![r, first.., ..]), ob.logits.slice(s![r, first.., ..]));
            next.push(argmax(oa.logits.slice(s![r, seq - 1, ..])));
        }
        steps.push(stats.finish(step));
        past_a = oa.present;
        past_b = ob.present;
        // Feed a's choice to both.
        let total = mask.ncols() + 1;
        let mut new_mask = Array2::<i64>::ones((batch, total));
        new_mask.slice_mut(s![.., ..total - 1]).assign(&mask);
        mask = new_mask;
        ids = Array2::from_shape_fn((batch, 1), |(r, _)| next[r] as i64);
        pos = Array2::from_shape_fn((batch, 1), |(r, _)| next_pos[r]);
        for p in next_pos.iter_mut() {
            *p += 1;
        }
    }
    Ok(Parity { batch, steps })
}

/// The serving graph against the portable one: each prompt alone through `portable`
/// (greedy, batch 1), and all of them at once through `serving`, one slot each, fed the
/// same tokens; compares every position of the prefill and every decode step.
pub fn compare_serving(
    m: &Manifest,
    portable: &mut dyn Runner,
    serving: &mut dyn Forward,
    prompts: &[Vec<u32>],
    decode_steps: usize,
) -> Result<Parity, CheckError> {
    let run = |e: crate::runtime::RuntimeError| CheckError::Run(e.to_string());
    if prompts.is_empty() || prompts.len() > serving.slots() || prompts.iter().any(Vec::is_empty) {
        return Err(CheckError::Run(format!("{} prompts for {} serving slots", prompts.len(), serving.slots())));
    }
    // Per prompt: logits of each step from the portable graph, and the tokens it chose.
    let mut want: Vec<Vec<Array2<f32>>> = Vec::new();
    let mut chosen: Vec<Vec<u32>> = Vec::new();
    for p in prompts {
        let mut past = empty_past(m, 1);
        let mut input: Vec<i64> = p.iter().map(|&t| t as i64).collect();
        let (mut steps, mut tokens, mut at) = (Vec::new(), Vec::new(), 0i64);
        for _ in 0..=decode_steps {
            let n = input.len();
            let out = portable.step(StepInput {
                input_ids: Array2::from_shape_vec((1, n), input.clone()).map_err(|e| CheckError::Run(e.to_string()))?,
                attention_mask: Array2::ones((1, at as usize + n)),
                position_ids: Array2::from_shape_fn((1, n), |(_, j)| at + j as i64),
                past,
            })?;
            let logits = out.logits.slice(s![0, .., ..]).to_owned();
            let next = argmax(logits.row(n - 1));
            steps.push(logits);
            tokens.push(next);
            past = out.present;
            at += n as i64;
            input = vec![next as i64];
        }
        want.push(steps);
        chosen.push(tokens);
    }
    let mut stats = vec![Accumulator::default(); decode_steps + 1];
    for (slot, p) in prompts.iter().enumerate() {
        let got = serving.extend(slot, 0, p, p.len()).map_err(run)?;
        stats[0].add(got.view(), want[slot][0].view());
    }
    for step in 1..=decode_steps {
        let rows: Vec<(u32, usize)> =
            prompts.iter().enumerate().map(|(slot, p)| (chosen[slot][step - 1], p.len() + step - 1)).collect();
        let got = serving.step(&rows).map_err(run)?;
        for (slot, w) in want.iter().enumerate() {
            stats[step].add(got.slice(s![slot..slot + 1, ..]), w[step].view());
        }
    }
    let steps = stats.into_iter().enumerate().map(|(step, a)| a.finish(step)).collect();
    Ok(Parity { batch: prompts.len(), steps })
}

/// Row statistics gathered over one step.
#[derive(Debug, Clone, Default)]
struct Accumulator {
    max_abs: f32,
    max_rel: f32,
    max_kl: f64,
    rows: usize,
    agree: usize,
}

impl Accumulator {
    /// Compares each row of `got` with the same row of `want`.
    fn add(&mut self, got: ndarray::ArrayView2<f32>, want: ndarray::ArrayView2<f32>) {
        for (x, y) in got.rows().into_iter().zip(want.rows()) {
            let (abs, rel, kl) = row_stats(x, y);
            self.max_abs = self.max_abs.max(abs);
            self.max_rel = self.max_rel.max(rel);
            self.max_kl = self.max_kl.max(kl);
            self.agree += usize::from(argmax(x) == argmax(y));
            self.rows += 1;
        }
    }

    fn finish(self, step: usize) -> StepStats {
        StepStats {
            step,
            max_abs: self.max_abs,
            max_rel: self.max_rel,
            top1: self.agree as f64 / self.rows.max(1) as f64,
            rows: self.rows,
            max_kl: self.max_kl,
        }
    }
}

/// Empty past keys and values for `batch` sequences.
fn empty_past(m: &Manifest, batch: usize) -> KvTensors {
    let c = &m.config;
    let shape = (batch, c.num_kv_heads, 0, c.head_dim);
    (0..c.num_layers).map(|_| (ndarray::Array4::zeros(shape), ndarray::Array4::zeros(shape))).collect()
}

/// (max |a − b|, that over max |b|, KL(softmax a ‖ softmax b)).
fn row_stats(a: ArrayView1<f32>, b: ArrayView1<f32>) -> (f32, f32, f64) {
    let abs = a.iter().zip(b.iter()).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    (abs, abs / scale, kl_divergence(a, b))
}

/// KL(softmax(p) ‖ softmax(q)) in nats, computed in f64.
pub fn kl_divergence(p: ArrayView1<f32>, q: ArrayView1<f32>) -> f64 {
    let lse = |v: ArrayView1<f32>| {
        let m = v.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        m + v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
    };
    let (lp, lq) = (lse(p), lse(q));
    p.iter()
        .zip(q.iter())
        .map(|(&x, &y)| {
            let lpx = x as f64 - lp;
            lpx.exp() * (lpx - (y as f64 - lq))
        })
        .sum::<f64>()
        .max(0.0)
}
