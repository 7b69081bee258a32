//! Speculative decoding: a drafter proposes K tokens, the target checks them in one pass over
//! the last accepted token plus the drafts, and the rejection rule keeps the output
//! distributed exactly as the target's (Leviathan et al. 2023; Chen et al. 2023):
//! accept draft x with probability min(1, p(x)/q(x)); on a rejection draw from
//! normalize(max(0, p − q)); after K acceptances draw a bonus token from p. p and q are the
//! request's own sampling distributions (penalties, temperature, top-k/p, min-p applied); a
//! deterministic drafter has q one-hot, and greedy requests have p one-hot, so greedy output
//! is the target's argmax sequence whatever the drafter proposes.

use std::time::Duration;

use super::sampling::Sampler;
use crate::runtime::{Forward, RuntimeError};

/// Most tokens drafted per step.
pub const MAX_DRAFT_TOKENS: usize = 16;
/// Draft length an adaptive request starts with.
const ADAPTIVE_START: usize = 4;

/// Which drafter a request uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DraftMethod {
    /// The engine's draft model (a smaller or lower-precision artifact with the same tokenizer).
    Model,
    /// N-gram lookup in the prompt and the generated text (no model).
    PromptLookup,
}

/// A request's speculative decoding settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Speculation {
    /// The drafter.
    pub method: DraftMethod,
    /// Tokens drafted per step, 1 to [`MAX_DRAFT_TOKENS`]; 0 adapts it to the acceptance rate.
    pub draft_tokens: usize,
}

/// What speculation did for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct SpecStats {
    /// Target verification passes.
    pub steps: usize,
    /// Tokens drafted.
    pub drafted: usize,
    /// Drafted tokens accepted.
    pub accepted: usize,
    /// Time spent drafting.
    pub draft_time: Duration,
    /// Time spent in target verification passes.
    pub verify_time: Duration,
}

impl SpecStats {
    /// Accepted drafts over drafted tokens.
    pub fn acceptance_rate(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }

    /// Tokens produced per verification pass (accepted drafts plus the target's own token).
    pub fn tokens_per_step(&self) -> f64 {
        if self.steps == 0 {
            0.0
        } else {
            (self.accepted + self.steps) as f64 / self.steps as f64
        }
    }
}

/// A sequence's speculation state.
#[derive(Debug, Clone)]
pub struct SpecState {
    /// The request's settings.
    pub settings: Speculation,
    /// Draft length of the next step.
    pub k: usize,
    /// Counts and times so far.
    pub stats: SpecStats,
}

impl SpecState {
    /// The state of a new request.
    pub fn new(settings: Speculation) -> Self {
        let k = if settings.draft_tokens == 0 { ADAPTIVE_START } else { settings.draft_tokens };
        SpecState { settings, k, stats: SpecStats::default() }
    }

    /// Adapts the draft length after a step that accepted `accepted` of `drafted` tokens:
    /// longer after a full acceptance, shorter after a poor one.
    pub fn adapt(&mut self, drafted: usize, accepted: usize) {
        if self.settings.draft_tokens != 0 || drafted == 0 {
            return;
        }
        if accepted == drafted {
            self.k = (self.k + 2).min(MAX_DRAFT_TOKENS);
        } else if accepted * 2 < drafted {
            self.k = (self.k / 2).max(1);
        }
    }
}

/// One drafted token with the distribution it was drawn from (`None`: deterministic).
#[derive(Debug, Clone, PartialEq)]
pub struct Draft {
    /// The token.
    pub token: u32,
    /// q, the drafter's distribution at this position (over the vocabulary).
    pub q: Option<Vec<f32>>,
}

/// Drafts by n-gram lookup: the longest suffix of the sequence (up to `max_ngram` tokens)
/// that occurred before, continued with the tokens that followed its latest occurrence.
pub fn prompt_lookup(tokens: &[u32], k: usize, max_ngram: usize) -> Vec<Draft> {
    for n in (1..=max_ngram.min(tokens.len().saturating_sub(1))).rev() {
        let suffix = &tokens[tokens.len() - n..];
        // Latest earlier occurrence whose continuation is non-empty.
        let found = (0..tokens.len() - n).rev().find(|&i| &tokens[i..i + n] == suffix);
        if let Some(i) = found {
            let start = i + n;
            let end = (start + k).min(tokens.len());
            return tokens[start..end].iter().map(|&token| Draft { token, q: None }).collect();
        }
    }
    Vec::new()
}

/// A draft model: a [`Forward`] with the same slots as the target, whose cache per slot holds
/// a prefix of the sequence; rolling back is forgetting how much of it is valid.
pub struct DraftModel {
    model: Box<dyn Forward>,
    /// The tokens each slot's cache holds.
    cached: Vec<Vec<u32>>,
}

impl DraftModel {
    /// Wraps `model`.
    pub fn new(model: Box<dyn Forward>) -> Self {
        let slots = model.slots();
        DraftModel { model, cached: vec![Vec::new(); slots] }
    }

    /// Positions per sequence.
    pub fn max_context(&self) -> usize {
        self.model.max_context()
    }

    /// Drafts up to `k` tokens after `tokens` (the whole sequence) in `slot`, each drawn by
    /// `sampler` (a fork of the request's) from the draft model's logits.
    pub fn draft(
        &mut self,
        slot: usize,
        tokens: &[u32],
        k: usize,
        sampler: &mut Sampler,
    ) -> Result<Vec<Draft>, RuntimeError> {
        let k = k.min(self.model.max_context().saturating_sub(tokens.len()));
        if k == 0 {
            return Ok(Vec::new());
        }
        let cached = &mut self.cached[slot];
        let common = cached.iter().zip(tokens).take_while(|(a, b)| a == b).count().min(tokens.len() - 1);
        cached.truncate(common);
        let mut logits = self.model.extend(slot, common, &tokens[common..], 1)?;
        cached.extend_from_slice(&tokens[common..]);
        let mut out = Vec::with_capacity(k);
        for i in 0..k {
            let row = logits.row(0);
            let q = sampler.probabilities(row.as_slice().expect("logits rows are contiguous"));
            let token = sampler.draw_from(&q).unwrap_or_default();
            sampler.record(token);
            out.push(Draft { token, q: Some(q) });
            if i + 1 < k {
                logits = self.model.extend(slot, cached.len(), &[token], 1)?;
                cached.push(token);
            }
        }
        Ok(out)
    }

    /// The sequence in slot `from` moved to slot `to`.
    pub fn move_slot(&mut self, from: usize, to: usize) -> Result<(), RuntimeError> {
        let len = self.cached[from].len();
        if len > 0 {
            self.model.move_slot(from, to, len)?;
        }
        self.cached[to] = std::mem::take(&mut self.cached[from]);
        Ok(())
    }

    /// Forgets slot `slot`.
    pub fn release(&mut self, slot: usize) {
        self.cached[slot].clear();
    }
}

/// The outcome of testing one draft token against the target's distribution `p`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The draft token stands.
    Accept,
    /// Rejected; this token (drawn from the residual) replaces it and ends the step.
    Replace(u32),
}

/// Tests `draft` against `p` with the request's random stream: accept with probability
/// min(1, p(x)/q(x)), else draw from normalize(max(0, p − q)). `residual: false` draws the
/// replacement from p instead (wrong: kept only to show that the tests catch it).
pub fn judge(sampler: &mut Sampler, p: &[f32], draft: &Draft, residual: bool) -> Verdict {
    let x = draft.token as usize;
    let qx = draft.q.as_ref().map_or(1.0, |q| q[x]);
    let px = p.get(x).copied().unwrap_or(0.0);
    if qx > 0.0 && (px >= qx || sampler.uniform() < f64::from(px / qx)) {
        return Verdict::Accept;
    }
    let rest: Vec<f32> = if residual {
        match &draft.q {
            Some(q) => p.iter().zip(q).map(|(&a, &b)| (a - b).max(0.0)).collect(),
            None => p.iter().enumerate().map(|(i, &a)| if i == x { 0.0 } else { a }).collect(),
        }
    } else {
        p.to_vec()
    };
    // All-zero residual only happens through rounding when p ≈ q: fall back to p.
    let token = sampler.draw_from(&rest).or_else(|| sampler.draw_from(p)).unwrap_or(draft.token);
    Verdict::Replace(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sampling::SamplingParams;

    #[test]
    fn prompt_lookup_continues_the_latest_longest_match() {
        let t = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3];
        // "2 3" last occurred at 5..7, followed by 7 8 5.
        assert_eq!(prompt_lookup(&t, 3, 3).iter().map(|d| d.token).collect::<Vec<_>>(), [7, 8, 5]);
        assert_eq!(prompt_lookup(&t, 8, 3).len(), 5, "up to the end of the sequence");
        assert!(prompt_lookup(&[4, 5, 6], 4, 3).is_empty(), "no repeat, no draft");
    }

    #[test]
    fn adaptive_length_grows_and_shrinks() {
        let mut s = SpecState::new(Speculation { method: DraftMethod::PromptLookup, draft_tokens: 0 });
        assert_eq!(s.k, 4);
        s.adapt(4, 4);
        assert_eq!(s.k, 6);
        s.adapt(6, 1);
        assert_eq!(s.k, 3);
        let mut fixed = SpecState::new(Speculation { method: DraftMethod::PromptLookup, draft_tokens: 5 });
        fixed.adapt(5, 0);
        assert_eq!(fixed.k, 5, "a fixed length stays");
    }

    /// A tiny target and a deliberately bad draft over 6 tokens; three tokens sampled with
    /// speculation must follow the target's joint distribution (chi-square over all 216
    /// outcomes). Without the residual step they do not.
    fn joint_counts(residual: bool, runs: usize) -> (Vec<f64>, Vec<f64>) {
        const V: usize = 6;
        let target = |ctx: &[u32]| -> Vec<f32> {
            let h = ctx.iter().fold(7u32, |h, &t| h.wrapping_mul(31).wrapping_add(t + 1));
            (0..V as u32).map(|j| ((h.wrapping_mul(j + 3) % 11) as f32) * 0.4).collect()
        };
        let draft = |ctx: &[u32]| -> Vec<f32> {
            // Prefers what the target dislikes.
            target(ctx).iter().map(|&l| -l).collect()
        };
        let params = SamplingParams { temperature: 1.0, seed: Some(0), ..Default::default() };
        let mut plain = vec![0f64; V * V * V];
        let mut spec = vec![0f64; V * V * V];
        let index = |t: &[u32]| (t[0] as usize * V + t[1] as usize) * V + t[2] as usize;
        for run in 0..runs {
            let p = SamplingParams { seed: Some(run as u64), ..params.clone() };
            // Plain sampling.
            let mut s = Sampler::new(p.clone(), V, &[0]);
            let mut ctx = vec![0u32];
            while ctx.len() < 4 {
                let id = s.choose(&target(&ctx)).id;
                ctx.push(id);
            }
            plain[index(&ctx[1..])] += 1.0;
            // Speculative: draft 2 from the bad draft, verify, repeat.
            let mut s = Sampler::new(p, V, &[0]);
            let mut ctx = vec![0u32];
            while ctx.len() < 4 {
                let mut fork = s.fork();
                let mut drafts = Vec::new();
                let mut look = ctx.clone();
                for _ in 0..2 {
                    let q = fork.probabilities(&draft(&look));
                    let token = fork.draw_from(&q).expect("q");
                    look.push(token);
                    drafts.push(Draft { token, q: Some(q) });
                }
                let mut done = false;
                for d in &drafts {
                    let pdist = s.probabilities(&target(&ctx));
                    match judge(&mut s, &pdist, d, residual) {
                        Verdict::Accept => ctx.push(d.token),
                        Verdict::Replace(t) => {
                            ctx.push(t);
                            done = true;
                        }
                    }
                    if done || ctx.len() == 4 {
                        break;
                    }
                }
                if !done && ctx.len() < 4 {
                    let pdist = s.probabilities(&target(&ctx));
                    ctx.push(s.draw_from(&pdist).expect("p"));
                }
            }
            spec[index(&ctx[1..4])] += 1.0;
        }
        (plain, spec)
    }

    /// Two-sample chi-square statistic over the cells either sample hit, and its degrees of
    /// freedom.
    fn chi_square(a: &[f64], b: &[f64]) -> (f64, usize) {
        let (na, nb): (f64, f64) = (a.iter().sum(), b.iter().sum());
        let (ka, kb) = ((nb / na).sqrt(), (na / nb).sqrt());
        let mut stat = 0.0;
        let mut cells = 0;
        for (&x, &y) in a.iter().zip(b) {
            if x + y > 0.0 {
                stat += (ka * x - kb * y).powi(2) / (x + y);
                cells += 1;
            }
        }
        (stat, cells - 1)
    }

    #[test]
    fn sampling_with_a_bad_draft_follows_the_target_distribution() {
        let (plain, spec) = joint_counts(true, 20_000);
        let (stat, dof) = chi_square(&plain, &spec);
        // The 0.1% critical value of chi-square is below dof + 3.1·sqrt(2·dof) + 10 for these dof.
        let critical = dof as f64 + 3.1 * (2.0 * dof as f64).sqrt() + 10.0;
        assert!(stat < critical, "chi-square {stat:.1} over {dof} degrees of freedom (critical {critical:.1})");
        let (plain, wrong) = joint_counts(false, 20_000);
        let (stat, dof) = chi_square(&plain, &wrong);
        assert!(stat > 3.0 * critical, "without the residual the test must fail: chi-square {stat:.1}, {dof} dof");
    }

    #[test]
    fn greedy_verdicts_follow_the_argmax() {
        let mut s = Sampler::new(SamplingParams::default(), 4, &[]);
        let p = s.probabilities(&[0.1, 2.0, 0.3, -1.0]);
        assert_eq!(p, [0.0, 1.0, 0.0, 0.0]);
        assert_eq!(judge(&mut s, &p, &Draft { token: 1, q: None }, true), Verdict::Accept);
        assert_eq!(judge(&mut s, &p, &Draft { token: 2, q: None }, true), Verdict::Replace(1));
        let q = Some(vec![0.0, 0.0, 1.0, 0.0]);
        assert_eq!(judge(&mut s, &p, &Draft { token: 2, q }, true), Verdict::Replace(1));
    }
}
