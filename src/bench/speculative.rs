//! `kiln bench --speculative`: for each workload ([`Workload`]: open-ended and grounded
//! prompts), drafter and draft length K, the measured acceptance rate, decode speed and
//! speedup over plain greedy decoding of the same target, beside the speedup the acceptance
//! rate predicts, and a plot of speedup against K.
//!
//! Prediction (Leviathan et al. 2023): a step drafts K tokens at cost c each (draft step time
//! over target step time) and verifies them in one target pass; with acceptance rate α it
//! yields (1 − α^(K+1)) / (1 − α) tokens on average, so the speedup is that over (K·c + 1).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::workload::Workload;
use crate::engine::speculative::{DraftMethod, Speculation};
use crate::engine::{artifact_engine, Engine, EngineOptions, Prompt, Request};
use crate::model::corpus_dir;
use crate::onnx::manifest::Manifest;
use crate::runtime::SessionOptions;

/// What to measure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecBenchOptions {
    /// Draft artifacts (prompt lookup is always measured too).
    pub drafts: Vec<PathBuf>,
    /// Draft lengths.
    pub ks: Vec<usize>,
    /// Tokens generated per prompt (at most: a grounded request ends with its answer).
    pub tokens: usize,
    /// ONNX Runtime intra-op threads (0: one per core).
    pub threads: usize,
}

/// One drafter at one K.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SpecRow {
    /// The drafter ("prompt lookup" or the draft artifact's name).
    pub drafter: String,
    /// Draft length.
    pub k: usize,
    /// Accepted over drafted tokens.
    pub acceptance: f64,
    /// Greedy decode tokens per second.
    pub tokens_per_s: f64,
    /// Over plain decoding of the target.
    pub speedup: f64,
    /// What the acceptance rate and the cost ratio predict.
    pub predicted: f64,
}

/// One workload's measurement.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WorkloadReport {
    /// The prompt set.
    pub workload: Workload,
    /// Plain greedy decode tokens per second of the target.
    pub plain_tokens_per_s: f64,
    /// Per drafter: its plain decode tokens per second and cost ratio c (0 for prompt lookup).
    pub drafters: Vec<(String, f64, f64)>,
    /// The rows.
    pub rows: Vec<SpecRow>,
}

/// The whole measurement.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SpecReport {
    /// The target artifact's name.
    pub target: String,
    /// Per workload, in [`Workload::ALL`]'s order.
    pub workloads: Vec<WorkloadReport>,
}

fn engine(target: &Path, draft: Option<&Path>, session: &SessionOptions, context: usize) -> Result<Engine, String> {
    artifact_engine(target, draft, session, 1, context, EngineOptions::default()).map_err(|e| e.to_string())
}

/// Decodes every prompt; returns generated tokens per second of decoding (first token, i.e.
/// the prefill, excluded) and accepted / drafted counts.
fn decode(
    e: &Engine,
    prompts: &[Prompt],
    ignore_eos: bool,
    tokens: usize,
    speculative: Option<Speculation>,
) -> Result<(f64, usize, usize), String> {
    let (mut generated, mut seconds, mut accepted, mut drafted) = (0, 0.0, 0, 0);
    for prompt in prompts {
        let r =
            Request { prompt: prompt.clone(), max_new_tokens: tokens, ignore_eos, speculative, ..Default::default() };
        let t = Instant::now();
        let out = e.submit(r).map_err(|e| e.to_string())?.collect().map_err(|e| e.to_string())?;
        let s = out.summary.ok_or("no summary")?;
        seconds += t.elapsed().as_secs_f64() - s.time_to_first_token.as_secs_f64();
        generated += out.token_ids.len().saturating_sub(1);
        if let Some(x) = s.speculative {
            (accepted, drafted) = (accepted + x.accepted, drafted + x.drafted);
        }
    }
    Ok((generated as f64 / seconds, accepted, drafted))
}

/// Expected speedup of K drafts at acceptance `alpha` and cost ratio `c`.
pub fn predicted_speedup(alpha: f64, k: usize, c: f64) -> f64 {
    let tokens = if alpha >= 1.0 { (k + 1) as f64 } else { (1.0 - alpha.powi(k as i32 + 1)) / (1.0 - alpha) };
    tokens / (k as f64 * c + 1.0)
}

/// Runs the measurement on `target`, every workload.
pub fn bench_speculative(target: &Path, opts: &SpecBenchOptions) -> Result<SpecReport, String> {
    let session = SessionOptions { intra_threads: opts.threads, ..Default::default() };
    // Grounded prompts carry their text: up to about 400 tokens before the answer.
    let context = 1024.min(Manifest::read(target).map_err(|e| e.to_string())?.max_context);
    let name = |p: &Path| Manifest::read(p).map(|m| m.name).unwrap_or_else(|_| p.display().to_string());
    let corpus = corpus_dir();
    let sets = Workload::ALL.iter().map(|&w| Ok((w, w.prompts(&corpus)?))).collect::<Result<Vec<_>, String>>()?;
    // Plain decode speed of the target and of each draft artifact, per workload.
    let plain_speeds = |e: &Engine| -> Result<Vec<f64>, String> {
        decode(e, &sets[0].1[..1], true, 8, None)?; // warm-up
        sets.iter().map(|(w, prompts)| Ok(decode(e, prompts, w.ignore_eos(), opts.tokens, None)?.0)).collect()
    };
    let plain = plain_speeds(&engine(target, None, &session, context)?)?;
    let mut drafters = vec![("prompt lookup".to_string(), None, vec![0.0; sets.len()])];
    for d in &opts.drafts {
        drafters.push((name(d), Some(d.as_path()), plain_speeds(&engine(d, None, &session, context)?)?));
    }
    let mut workloads: Vec<WorkloadReport> = sets
        .iter()
        .zip(&plain)
        .enumerate()
        .map(|(i, ((w, _), &plain_tps))| WorkloadReport {
            workload: *w,
            plain_tokens_per_s: plain_tps,
            drafters: drafters
                .iter()
                .map(|(d, _, tps)| (d.clone(), tps[i], if tps[i] > 0.0 { plain_tps / tps[i] } else { 0.0 }))
                .collect(),
            rows: Vec::new(),
        })
        .collect();
    for (j, (drafter, path, _)) in drafters.iter().enumerate() {
        let e = engine(target, *path, &session, context)?;
        let method = if path.is_some() { DraftMethod::Model } else { DraftMethod::PromptLookup };
        for (report, (w, prompts)) in workloads.iter_mut().zip(&sets) {
            let c = report.drafters[j].2;
            for &k in &opts.ks {
                eprintln!("speculative: {}, {drafter}, K = {k} ...", w.name());
                let spec = Some(Speculation { method, draft_tokens: k });
                let (tps, accepted, drafted) = decode(&e, prompts, w.ignore_eos(), opts.tokens, spec)?;
                let acceptance = if drafted > 0 { accepted as f64 / drafted as f64 } else { 0.0 };
                report.rows.push(SpecRow {
                    drafter: drafter.clone(),
                    k,
                    acceptance,
                    tokens_per_s: tps,
                    speedup: tps / report.plain_tokens_per_s,
                    predicted: predicted_speedup(acceptance, k, c),
                });
            }
        }
    }
    Ok(SpecReport { target: name(target), workloads })
}

/// The report as text tables, one section per workload.
pub fn render(r: &SpecReport) -> String {
    let mut out = format!("target {}\n", r.target);
    for w in &r.workloads {
        let _ = writeln!(
            out,
            "\n{} prompts: plain greedy decode {:.1} tokens/s\n",
            w.workload.name(),
            w.plain_tokens_per_s
        );
        out.push_str("| drafter | draft tok/s | cost ratio c |\n|---|---|---|\n");
        for (d, tps, c) in &w.drafters {
            let tps = if *tps > 0.0 { format!("{tps:.1}") } else { "-".into() };
            let _ = writeln!(out, "| {d} | {tps} | {c:.3} |");
        }
        out.push_str("\n| drafter | K | acceptance | tok/s | speedup | predicted |\n|---|---|---|---|---|---|\n");
        for row in &w.rows {
            let _ = writeln!(
                out,
                "| {} | {} | {:.3} | {:.1} | {:.2}× | {:.2}× |",
                row.drafter, row.k, row.acceptance, row.tokens_per_s, row.speedup, row.predicted
            );
        }
    }
    out
}

/// Where the plot of workload `w` goes: `base` for the open-ended prompts, `base` with the
/// workload's name added to its stem otherwise (`speculative.svg` → `speculative-grounded.svg`).
pub fn plot_path(base: &Path, w: Workload) -> PathBuf {
    if w == Workload::OpenEnded {
        return base.to_path_buf();
    }
    let stem = base.file_stem().map_or_else(|| "speculative".into(), |s| s.to_string_lossy().into_owned());
    let ext = base.extension().map_or_else(|| "svg".into(), |e| e.to_string_lossy().into_owned());
    base.with_file_name(format!("{stem}-{}.{ext}", w.name()))
}

/// An SVG line plot of one workload's measured speedup (solid) and predicted speedup
/// (dashed) against K per drafter, with the break-even line at 1.
pub fn plot_svg(target: &str, r: &WorkloadReport) -> String {
    const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];
    let (w, h, left, right, top, bottom) = (720.0, 440.0, 70.0, 190.0, 40.0, 60.0);
    let max_k = r.rows.iter().map(|x| x.k).max().unwrap_or(1).max(1) as f64;
    let max_y = r.rows.iter().map(|x| x.speedup.max(x.predicted)).fold(1.5f64, f64::max).ceil();
    // K on a log2 axis (1, 2, 4, 8, 16).
    let x = |k: usize| left + (k.max(1) as f64).log2() / max_k.log2().max(1.0) * (w - left - right);
    let y = |v: f64| h - bottom - v / max_y * (h - top - bottom);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">Speculative decoding on {target}, {} prompts: speedup over plain greedy decoding</text>\n",
        (w - right + left) / 2.0,
        r.workload.name()
    );
    let mut tick = 0.0;
    while tick <= max_y + 1e-9 {
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{yy}\" y2=\"{yy}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{tick:.1}×</text>",
            w - right,
            left - 6.0,
            y(tick) + 4.0,
            yy = y(tick)
        );
        tick += 0.5;
    }
    let mut k = 1;
    while k as f64 <= max_k {
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{k}</text>", x(k), h - bottom + 18.0);
        k *= 2;
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">draft tokens per step K</text>\n\
         <line x1=\"{left}\" x2=\"{}\" y1=\"{b}\" y2=\"{b}\" stroke=\"black\" stroke-width=\"1.5\" stroke-dasharray=\"2 3\"/>\n\
         <text x=\"{}\" y=\"{}\">break-even</text>",
        (w - right + left) / 2.0,
        h - 20.0,
        w - right,
        w - right + 6.0,
        y(1.0) + 4.0,
        b = y(1.0)
    );
    let mut drafters: Vec<&str> = Vec::new();
    for row in &r.rows {
        if !drafters.contains(&row.drafter.as_str()) {
            drafters.push(&row.drafter);
        }
    }
    for (i, d) in drafters.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let rows: Vec<&SpecRow> = r.rows.iter().filter(|x| x.drafter == *d).collect();
        let line = |f: &dyn Fn(&SpecRow) -> f64| {
            rows.iter().map(|row| format!("{:.1},{:.1}", x(row.k), y(f(row)))).collect::<Vec<_>>().join(" ")
        };
        let _ = writeln!(
            s,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>\n\
             <polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" stroke-dasharray=\"6 4\"/>",
            line(&|x| x.speedup),
            line(&|x| x.predicted)
        );
        for row in &rows {
            let _ =
                writeln!(s, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{color}\"/>", x(row.k), y(row.speedup));
        }
        let ly = top + 20.0 + i as f64 * 20.0;
        let _ = writeln!(
            s,
            "<line x1=\"{}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{d}</text>",
            w - right + 10.0,
            w - right + 34.0,
            w - right + 40.0,
            ly + 4.0
        );
    }
    let ly = top + 20.0 + drafters.len() as f64 * 20.0 + 10.0;
    let _ = writeln!(s, "<text x=\"{}\" y=\"{ly}\" fill=\"#555\">solid: measured</text>", w - right + 10.0);
    let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" fill=\"#555\">dashed: predicted</text>", w - right + 10.0, ly + 16.0);
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prediction_follows_the_expected_accepted_length() {
        // α = 0: one token per step, K drafts wasted.
        assert!((predicted_speedup(0.0, 4, 0.5) - 1.0 / 3.0).abs() < 1e-12);
        // α = 1, free drafts: K + 1 tokens per pass.
        assert!((predicted_speedup(1.0, 4, 0.0) - 5.0).abs() < 1e-12);
        // α = 0.8, K = 4: (1 − 0.8⁵) / 0.2 = 3.3616 tokens, cost 1 + 4 · 0.1.
        assert!((predicted_speedup(0.8, 4, 0.1) - 3.3616 / 1.4).abs() < 1e-9);
    }

    #[test]
    fn each_workload_has_its_own_plot_file() {
        let base = Path::new("docs/speculative-fp32.svg");
        assert_eq!(plot_path(base, Workload::OpenEnded), base);
        assert_eq!(plot_path(base, Workload::Grounded), Path::new("docs/speculative-fp32-grounded.svg"));
    }

    #[test]
    fn the_plot_has_a_line_per_drafter_and_the_break_even() {
        let row = |d: &str, k, s| SpecRow {
            drafter: d.into(),
            k,
            acceptance: 0.5,
            tokens_per_s: 10.0,
            speedup: s,
            predicted: s,
        };
        let r = WorkloadReport {
            workload: Workload::Grounded,
            plain_tokens_per_s: 10.0,
            drafters: vec![],
            rows: vec![row("a", 1, 1.2), row("a", 4, 1.5), row("b", 1, 0.9), row("b", 4, 0.7)],
        };
        let svg = plot_svg("fp32", &r);
        assert_eq!(svg.matches("<polyline").count(), 4, "measured and predicted per drafter");
        assert!(svg.contains("break-even") && svg.contains("grounded prompts") && svg.ends_with("</svg>\n"));
    }
}
