//! Choosing the next token from one row of logits: penalties, then greedy or temperature
//! sampling restricted by top-k, top-p and min-p, with the request's own random stream (so a
//! seed gives the same tokens whatever else shares the batch).

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::EngineError;
use crate::model::reference::argmax;

/// How a request picks its tokens. The defaults are greedy decoding with no penalties.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy); above 0 divides the logits before sampling.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1: all).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one (0: none).
    pub min_p: f32,
    /// Divides positive logits and multiplies negative ones of every token seen in the
    /// prompt or the output (1: off).
    pub repetition_penalty: f32,
    /// Subtracted from the logit of every token already generated (0: off).
    pub presence_penalty: f32,
    /// Subtracted once per earlier occurrence in the output (0: off).
    pub frequency_penalty: f32,
    /// Seed of the request's random stream (none: drawn from the clock).
    pub seed: Option<u64>,
    /// Report each chosen token's log-probability.
    pub logprobs: bool,
    /// How many of the most likely tokens to report with their log-probabilities (at most
    /// 20; implies `logprobs`).
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logprobs: false,
            top_logprobs: 0,
        }
    }
}

/// Most `top_logprobs` a request may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

impl SamplingParams {
    /// Checks every field; the error names the first one out of range.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |field: &'static str, reason: String| Err(EngineError::InvalidRequest { field, reason });
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature", format!("{} is not a finite number >= 0", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("{} is not in (0, 1]", self.top_p));
        }
        if !(self.min_p >= 0.0 && self.min_p < 1.0) {
            return bad("min_p", format!("{} is not in [0, 1)", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad("repetition_penalty", format!("{} is not a finite number > 0", self.repetition_penalty));
        }
        if !self.presence_penalty.is_finite() {
            return bad("presence_penalty", format!("{} is not finite", self.presence_penalty));
        }
        if !self.frequency_penalty.is_finite() {
            return bad("frequency_penalty", format!("{} is not finite", self.frequency_penalty));
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return bad("top_logprobs", format!("{} is above {MAX_TOP_LOGPROBS}", self.top_logprobs));
        }
        Ok(())
    }
}

/// One chosen token with, when asked for, its log-probability under the model (before
/// penalties and temperature) and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// The token.
    pub id: u32,
    /// Its log-probability (with `logprobs` or `top_logprobs`).
    pub logprob: Option<f32>,
    /// The `top_logprobs` most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// A request's sampling state: its parameters, random stream and output counts.
#[derive(Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Tokens seen in prompt or output (repetition penalty).
    seen: Vec<bool>,
    /// Occurrences in the output (presence and frequency penalties).
    counts: Vec<u32>,
    weights: Vec<f32>,
    scratch: Vec<(f32, u32)>,
}

impl Sampler {
    /// A sampler for a request with `prompt` over a vocabulary of `vocab` tokens.
    pub fn new(params: SamplingParams, vocab: usize, prompt: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(|| {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            t.as_nanos() as u64
        });
        let mut seen = vec![false; vocab];
        for &t in prompt {
            if let Some(s) = seen.get_mut(t as usize) {
                *s = true;
            }
        }
        Sampler {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            seen,
            counts: vec![0; vocab],
            weights: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Chooses the next token from `logits` and records it as generated.
    pub fn choose(&mut self, logits: &[f32]) -> Choice {
        let id = self.pick(logits);
        self.take(id, logits)
    }

    fn penalized(&self) -> bool {
        let p = &self.params;
        p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0
    }

    /// The token the request's settings pick from `logits` (nothing recorded).
    fn pick(&mut self, logits: &[f32]) -> u32 {
        match (self.penalized(), self.params.temperature == 0.0) {
            (false, true) => argmax(logits.into()),
            (false, false) => self.sample(logits),
            (true, greedy) => {
                let mut l = logits.to_vec();
                self.apply_penalties(&mut l);
                if greedy {
                    argmax(l.as_slice().into())
                } else {
                    self.sample(&l)
                }
            }
        }
    }

    /// Records `id` as generated and reports it with its log-probability under `logits`.
    pub fn take(&mut self, id: u32, logits: &[f32]) -> Choice {
        self.record(id);
        let (logprob, top) = if self.params.logprobs || self.params.top_logprobs > 0 {
            let (lse, top) = log_softmax_top(logits, self.params.top_logprobs);
            (Some(logits[id as usize] - lse), top)
        } else {
            (None, Vec::new())
        };
        Choice { id, logprob, top }
    }

    fn apply_penalties(&self, l: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for (v, _) in l.iter_mut().zip(&self.seen).filter(|(_, &s)| s) {
                *v = if *v > 0.0 { *v / p.repetition_penalty } else { *v * p.repetition_penalty };
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (v, &c) in l.iter_mut().zip(&self.counts).filter(|(_, &c)| c > 0) {
                *v -= p.presence_penalty + p.frequency_penalty * c as f32;
            }
        }
    }

    /// Temperature, top-k, top-p and min-p, then one draw from what is left.
    fn sample(&mut self, l: &[f32]) -> u32 {
        self.weigh(l);
        let u = self.uniform();
        if !self.restrict() {
            return draw(&self.weights, u).unwrap_or_else(|| argmax(l.into()));
        }
        let c = &self.scratch;
        let total: f64 = c.iter().map(|x| x.0 as f64).sum();
        let target = u * total;
        let mut acc = 0f64;
        for &(x, id) in c.iter() {
            acc += x as f64;
            if target < acc {
                return id;
            }
        }
        c.last().map_or_else(|| argmax(l.into()), |x| x.1)
    }

    /// Fills `self.weights` with e^((l − max)/T): the most likely token weighs exactly 1.
    fn weigh(&mut self, l: &[f32]) {
        let inv_t = 1.0 / self.params.temperature;
        let max = l.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        self.weights.clear();
        self.weights.extend(l.iter().map(|&v| exp_nonpositive((v - max) * inv_t)));
    }

    /// A uniform draw from [0, 1) of the request's random stream.
    pub fn uniform(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Applies top-k, top-p and min-p to `self.weights`: without top-k and top-p the weights
    /// are cut in place and `false` is returned; otherwise the kept `(weight, id)` pairs are
    /// left in `self.scratch`, most likely first where it matters, and `true` is returned.
    fn restrict(&mut self) -> bool {
        let p = &self.params;
        let w = &mut self.weights;
        if p.top_k == 0 && p.top_p >= 1.0 {
            if p.min_p > 0.0 {
                for x in w.iter_mut() {
                    if *x < p.min_p {
                        *x = 0.0;
                    }
                }
            }
            return false;
        }
        // Candidates as (weight, id), most likely first where it matters.
        let c = &mut self.scratch;
        c.clear();
        c.extend(w.iter().enumerate().map(|(i, &x)| (x, i as u32)));
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, |a, b| desc(a.0, b.0, a.1, b.1));
            c.truncate(p.top_k);
        }
        if p.top_p < 1.0 {
            keep_top_p(c, p.top_p);
        }
        if p.min_p > 0.0 {
            // The most likely token (weight 1) survives top-k and top-p.
            c.retain(|x| x.0 >= p.min_p);
        }
        true
    }

    /// The distribution this request samples its next token from, given `logits`: penalties,
    /// temperature, top-k, top-p and min-p applied, normalized; one-hot when greedy. What
    /// speculative verification tests draft tokens against.
    pub fn probabilities(&mut self, logits: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; logits.len()];
        let l = if self.penalized() {
            let mut l = logits.to_vec();
            self.apply_penalties(&mut l);
            std::borrow::Cow::Owned(l)
        } else {
            std::borrow::Cow::Borrowed(logits)
        };
        if self.params.temperature == 0.0 {
            out[argmax(l.as_ref().into()) as usize] = 1.0;
            return out;
        }
        self.weigh(&l);
        if self.restrict() {
            for &(x, id) in &self.scratch {
                out[id as usize] = x;
            }
        } else {
            out.copy_from_slice(&self.weights);
        }
        let total: f64 = out.iter().map(|&x| x as f64).sum();
        let scale = (1.0 / total) as f32;
        out.iter_mut().for_each(|x| *x *= scale);
        out
    }

    /// One draw from `weights` (not necessarily normalized) with the request's random stream;
    /// `None` when every weight is 0.
    pub fn draw_from(&mut self, weights: &[f32]) -> Option<u32> {
        let u = self.uniform();
        draw(weights, u)
    }

    /// A copy of this state with an independent random stream (seeded from this one), for a
    /// drafter that samples ahead without touching the request's own draws.
    pub fn fork(&mut self) -> Sampler {
        let mut copy = self.clone();
        copy.rng = ChaCha8Rng::seed_from_u64(self.rng.next_u64());
        copy
    }

    /// Records `id` as generated (the penalties' counts) without reporting it.
    pub fn record(&mut self, id: u32) {
        if let Some(s) = self.seen.get_mut(id as usize) {
            *s = true;
        }
        if let Some(n) = self.counts.get_mut(id as usize) {
            *n += 1;
        }
    }
}

/// The index where `u` ∈ [0, 1) of the total weight falls: chunk sums first (vectorized),
/// then a scan inside one chunk. `None` when every weight is 0.
fn draw(w: &[f32], u: f64) -> Option<u32> {
    const CHUNK: usize = 512;
    let sums: Vec<f64> = w.chunks(CHUNK).map(|c| c.iter().sum::<f32>() as f64).collect();
    let total: f64 = sums.iter().sum();
    if total <= 0.0 {
        return None;
    }
    let mut target = u * total;
    let last = w.iter().rposition(|&x| x > 0.0)?;
    for (k, &s) in sums.iter().enumerate() {
        if target < s {
            for (i, &x) in w[k * CHUNK..].iter().take(CHUNK).enumerate() {
                target -= x as f64;
                if target < 0.0 {
                    return Some((k * CHUNK + i) as u32);
                }
            }
        }
        target -= s;
    }
    // Rounding left the target past the end: the last token with weight.
    Some(last as u32)
}

/// log Σ exp(logits), and the `n` most likely tokens with their log-probabilities.
fn log_softmax_top(logits: &[f32], n: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f32 = logits.iter().map(|&v| exp_nonpositive(v - max)).sum();
    let lse = max + sum.ln();
    let k = n.min(logits.len());
    if k == 0 {
        return (lse, Vec::new());
    }
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let order = |&a: &u32, &b: &u32| desc(logits[a as usize], logits[b as usize], a, b);
    idx.select_nth_unstable_by(k - 1, order);
    idx.truncate(k);
    idx.sort_by(order);
    (lse, idx.into_iter().map(|i| (i, logits[i as usize] - lse)).collect())
}

/// e^x for x ≤ 0 (relative error below 2e-7·(1 + |x|); flat below −87), in a form the compiler
/// vectorizes: x·log2(e) = k + f with integer k and f in [−½, ½], 2^f by its degree-6
/// Taylor polynomial, 2^k put into the exponent bits. Sampling evaluates it for every token of
/// every row, where the library `exp` alone would cost a quarter of a millisecond.
#[inline]
fn exp_nonpositive(x: f32) -> f32 {
    let t = x.max(-87.0) * std::f32::consts::LOG2_E;
    // Adding and removing 1.5·2^23 rounds to the nearest integer with plain SSE2 arithmetic
    // (`round` would be a library call that stops vectorization on baseline x86-64).
    const ROUND: f32 = 12_582_912.0;
    let k = (t + ROUND) - ROUND;
    let f = t - k;
    let p = 1.0
        + f * (std::f32::consts::LN_2
            + f * (0.240_226_5 + f * (0.055_504_11 + f * (0.009_618_129 + f * (0.001_333_355 + f * 0.000_154_035_3)))));
    p * f32::from_bits(((k as i32 + 127) << 23) as u32)
}

/// Keeps the smallest most-likely-first prefix of `c` whose weight reaches `top_p` of the total.
fn keep_top_p(c: &mut Vec<(f32, u32)>, top_p: f32) {
    let total: f64 = c.iter().map(|x| x.0 as f64).sum();
    let target = top_p as f64 * total;
    // Most of the mass usually sits in a few hundred tokens: sort those first, and the rest
    // only when they do not reach the target.
    let head = 256.min(c.len());
    if head < c.len() {
        c.select_nth_unstable_by(head - 1, |a, b| desc(a.0, b.0, a.1, b.1));
    }
    c[..head].sort_unstable_by(|a, b| desc(a.0, b.0, a.1, b.1));
    let mass: f64 = c[..head].iter().map(|x| x.0 as f64).sum();
    if mass < target {
        c.sort_unstable_by(|a, b| desc(a.0, b.0, a.1, b.1));
    }
    let mut acc = 0f64;
    let mut keep = c.len();
    for (i, x) in c.iter().enumerate() {
        acc += x.0 as f64;
        if acc >= target {
            keep = i + 1;
            break;
        }
    }
    c.truncate(keep);
}

/// Descending by value, then ascending by id: one total order, so ties break the same way
/// every time.
fn desc(a: f32, b: f32, ia: u32, ib: u32) -> std::cmp::Ordering {
    b.total_cmp(&a).then(ia.cmp(&ib))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams { seed: Some(7), ..Default::default() };
        f(&mut p);
        p
    }

    #[test]
    fn exp_is_accurate_where_sampling_uses_it() {
        for i in 0..=96_000 {
            let x = -(i as f32) * 0.0009;
            let (got, want) = (exp_nonpositive(x), (x as f64).exp());
            assert!(((got as f64 - want) / want).abs() < 2e-7 * (1.0 + x.abs() as f64), "e^{x}: {got} vs {want}");
        }
        assert_eq!(exp_nonpositive(-1000.0), exp_nonpositive(-87.0));
        assert!(exp_nonpositive(-87.0) < 2e-38);
    }

    #[test]
    fn greedy_takes_the_argmax_and_reports_logprobs() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let mut s = Sampler::new(params(|p| p.top_logprobs = 2), 4, &[]);
        let c = s.choose(&logits);
        assert_eq!(c.id, 1, "first of the tied maxima");
        let lse = logits.iter().map(|v| v.exp()).sum::<f32>().ln();
        assert!((c.logprob.expect("asked for") - (3.0 - lse)).abs() < 1e-6);
        assert_eq!(Sampler::new(params(|_| {}), 4, &[]).choose(&logits).logprob, None, "not asked for");
        assert_eq!(c.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 10.0).collect();
        let best = argmax(logits.as_slice().into());
        for p in [params(|p| (p.temperature, p.top_k) = (1.0, 1)), params(|p| (p.temperature, p.top_p) = (1.0, 1e-6))] {
            let mut s = Sampler::new(p, 1000, &[]);
            for _ in 0..20 {
                assert_eq!(s.choose(&logits).id, best);
            }
        }
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        // p = softmax([0, ln 3]) = [0.25, 0.75].
        let logits = [0.0f32, 3f32.ln()];
        let draw = |seed| {
            let mut s = Sampler::new(params(|p| (p.temperature, p.seed) = (1.0, Some(seed))), 2, &[]);
            (0..4000).map(|_| s.choose(&logits).id).collect::<Vec<_>>()
        };
        let a = draw(1);
        assert_eq!(a, draw(1), "same seed, same tokens");
        assert_ne!(a, draw(2));
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        assert!((ones - 0.75).abs() < 0.03, "frequency of the likelier token {ones}");
    }

    #[test]
    fn min_p_and_top_p_cut_the_tail() {
        // Weights 0.5, 0.3, 0.15, 0.05.
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let seen = |p: SamplingParams| {
            let mut s = Sampler::new(p, 4, &[]);
            let mut hit = [false; 4];
            for _ in 0..2000 {
                hit[s.choose(&logits).id as usize] = true;
            }
            hit
        };
        assert_eq!(seen(params(|p| p.temperature = 1.0)), [true; 4]);
        assert_eq!(seen(params(|p| (p.temperature, p.top_p) = (1.0, 0.75))), [true, true, false, false]);
        assert_eq!(seen(params(|p| (p.temperature, p.min_p) = (1.0, 0.35))), [true, true, false, false]);
        assert_eq!(seen(params(|p| (p.temperature, p.top_k) = (1.0, 3))), [true, true, true, false]);
    }

    #[test]
    fn penalties_steer_away_from_repeats() {
        let logits = [2.0f32, 1.9, -1.0];
        // Repetition: token 0 seen in the prompt: 2.0 / 2 = 1.0 < 1.9.
        let mut s = Sampler::new(params(|p| p.repetition_penalty = 2.0), 3, &[0]);
        assert_eq!(s.choose(&logits).id, 1);
        // Presence: after token 0 is generated once it loses 0.5.
        let mut s = Sampler::new(params(|p| p.presence_penalty = 0.5), 3, &[]);
        assert_eq!(s.choose(&logits).id, 0);
        assert_eq!(s.choose(&logits).id, 1);
        // Frequency, 0.06 per occurrence: 2.0 and 1.94 beat 1.9, then 1.88 loses to 1.9, then
        // 1.88 beats 1.84.
        let mut s = Sampler::new(params(|p| p.frequency_penalty = 0.06), 3, &[]);
        let ids: Vec<u32> = (0..4).map(|_| s.choose(&logits).id).collect();
        assert_eq!(ids, vec![0, 0, 1, 0]);
    }

    #[test]
    fn validation_names_the_field() {
        let err = params(|p| p.top_p = 0.0).validate().expect_err("invalid");
        assert!(matches!(err, EngineError::InvalidRequest { field: "top_p", .. }), "{err}");
        let err = params(|p| p.temperature = f32::NAN).validate().expect_err("invalid");
        assert!(matches!(err, EngineError::InvalidRequest { field: "temperature", .. }), "{err}");
        let err = params(|p| p.top_logprobs = 21).validate().expect_err("invalid");
        assert!(matches!(err, EngineError::InvalidRequest { field: "top_logprobs", .. }), "{err}");
        assert!(SamplingParams::default().validate().is_ok());
    }
}
