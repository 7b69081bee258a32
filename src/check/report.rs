//! `kiln check`: runs parity, quality and integrity on an artifact, applies the tolerances
//! and thresholds, and renders the report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::artifact::ArtifactFiles;
use super::lowering::Lowering;
use super::parity::{self, Parity, StepStats};
use super::quality::{self, Quality};
use super::tract::TractDecoder;
use super::{integrity, CheckError};
use crate::model::cache_dir;
use crate::onnx::manifest::Manifest;
use crate::onnx::recipe::CheckThresholds;
use crate::quant::Precision;
use crate::runtime::{OrtDecoder, Provider, ServingDecoder, SessionOptions, ShapeRange, TensorRtOptions};

/// How parity is judged for one kind of run. All tolerances live here, with their reasons.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Tolerance {
    /// Largest max |Δlogit| / max |logit| of any row.
    pub max_rel: f32,
    /// Smallest share of rows whose argmax agrees.
    pub min_top1: f64,
    /// Largest KL(tract ‖ ORT) of any row, nats.
    pub max_kl: f64,
}

/// The tolerance for ONNX Runtime on `provider` against tract.
///
/// - CPU, exact math (MatMulNBits accuracy level 1, f32 everywhere): both compute
///   (code − zero point) · scale in f32 and f32 products; only summation order differs
///   (measured ~1e-5 relative). Top-1 may flip only at exact ties.
/// - CPU, serving settings (accuracy level 4, and kiln's serving defaults): fused kernels
///   quantize activations to int8, about 5e-3 relative per product, compounding over layers;
///   argmax flips where the top two logits are close. Any other perturbation (an f16 KV
///   cache) re-draws which activations round up. Measured worst rows on the default
///   artifacts: max rel 0.056-0.084 (ORT level 4, 33 rows), 0.063-0.105 (serving defaults,
///   99 rows); KL at most 0.055, top-1 at least 0.89.
/// - CUDA: fp32 through cuBLAS, possibly TF32 products: 1e-2.
/// - TensorRT: fp16/int8 kernels: loose, like level 4.
pub fn tolerance(provider: Provider, exact: bool) -> Tolerance {
    match (provider, exact) {
        (Provider::Cpu, true) => Tolerance { max_rel: 1e-4, min_top1: 0.99, max_kl: 1e-4 },
        (Provider::Cpu, false) | (Provider::TensorRt, _) => Tolerance { max_rel: 0.15, min_top1: 0.8, max_kl: 0.1 },
        (Provider::Cuda, _) => Tolerance { max_rel: 1e-2, min_top1: 0.95, max_kl: 1e-2 },
    }
}

/// Settings of a check.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Execution provider ONNX Runtime runs on.
    pub provider: Provider,
    /// FP32 artifact to compare quality with (default: found beside the artifact).
    pub baseline: Option<PathBuf>,
    /// Held-out texts for quality (empty: [`default_texts`], which calibration never sees).
    pub texts: Vec<PathBuf>,
    /// Tokens scored for quality.
    pub tokens: usize,
    /// Window length for quality.
    pub window: usize,
    /// Greedy decode steps after the prefill in parity runs.
    pub decode_steps: usize,
    /// `accuracy_level` of the artifact's quantized MatMuls in the quality runs: `None` is
    /// the serving setting (4, int8 activations); 1 computes in f32 (weights' loss alone).
    pub accuracy_level: Option<u8>,
    /// Quality thresholds that override the recipe's `[check]` table.
    pub thresholds: CheckThresholds,
    /// TensorRT: allow fp16 kernels.
    pub trt_fp16: bool,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            provider: Provider::Cpu,
            baseline: None,
            texts: Vec::new(),
            tokens: 4096,
            window: 512,
            decode_steps: 32,
            accuracy_level: None,
            thresholds: CheckThresholds::default(),
            trt_fp16: false,
        }
    }
}

/// One parity run in the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParityRow {
    /// What ran (`ORT exact vs tract, batch 3 padded`).
    pub name: String,
    /// Decode steps after the prefill.
    pub decode_steps: usize,
    /// The worst step.
    pub worst: StepStats,
    /// The tolerance applied.
    pub tolerance: Tolerance,
    /// Within tolerance.
    pub pass: bool,
}

/// Quality in the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QualityRow {
    /// Text scored.
    pub text: PathBuf,
    /// Baseline artifact.
    pub baseline: PathBuf,
    /// Figures.
    pub quality: Quality,
    /// Thresholds applied.
    pub thresholds: CheckThresholds,
    /// MatMulNBits accuracy level the artifact ran at (`None`: the serving setting).
    pub accuracy_level: Option<u8>,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The artifact checked.
    pub artifact: PathBuf,
    /// Execution provider.
    pub provider: String,
    /// DequantizeLinear nodes lowered for tract.
    pub lowered_for_tract: usize,
    /// Parity runs.
    pub parity: Vec<ParityRow>,
    /// Quality on each text; for the FP32 artifact itself, against a second session of it
    /// (its perplexity, nothing lost).
    pub quality: Vec<QualityRow>,
    /// Weight integrity against the FP32 artifact.
    pub integrity: Option<integrity::Integrity>,
    /// Failed metrics, named.
    pub failures: Vec<String>,
    /// Seconds the check took.
    pub seconds: f64,
}

impl Report {
    /// Whether every check passed.
    pub fn pass(&self) -> bool {
        self.failures.is_empty()
    }
}

const PARITY_PROMPTS: [&str; 3] =
    ["The capital of France is", "Once upon a time, in a village by the sea, there lived", "def add(a, b):\n"];

/// Runs every check on the artifact at `dir`; `progress` hears what is running.
pub fn check(dir: &Path, opts: &CheckOptions, progress: &mut dyn FnMut(&str)) -> Result<Report, CheckError> {
    let t0 = Instant::now();
    let files = ArtifactFiles::open(dir)?;
    let m = &files.manifest;
    let quantized = m.has_integer_weights();
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
        .map_err(|e| CheckError::Artifact { path: dir.join("tokenizer.json"), reason: e.to_string() })?;
    let prompts: Vec<Vec<u32>> = PARITY_PROMPTS
        .iter()
        .map(|p| tok.encode(*p, false).map(|e| e.get_ids().to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| CheckError::Run(e.to_string()))?;

    // Inputs first, so that a bad text or a missing baseline fails before the long runs.
    let baseline_dir = match &opts.baseline {
        Some(b) => b.clone(),
        None => find_baseline(dir, m)?,
    };
    let texts = if opts.texts.is_empty() { default_texts() } else { opts.texts.clone() };
    let scored: Vec<(PathBuf, Vec<u32>)> = texts
        .into_iter()
        .map(|t| quality::text_tokens(dir, &t, opts.tokens).map(|ids| (t, ids)))
        .collect::<Result<_, _>>()?;
    let mut thresholds = m.recipe.check.clone();
    let o = &opts.thresholds;
    thresholds.max_ppl_increase = o.max_ppl_increase.or(thresholds.max_ppl_increase);
    thresholds.max_mean_kl = o.max_mean_kl.or(thresholds.max_mean_kl);
    thresholds.min_top1 = o.min_top1.or(thresholds.min_top1);
    progress("tract: lowering and optimizing");
    let mut tract = TractDecoder::open(dir, Lowering::Needed)?;
    let mut report = Report {
        artifact: dir.to_path_buf(),
        provider: opts.provider.name().into(),
        lowered_for_tract: tract.lowered,
        parity: Vec::new(),
        quality: Vec::new(),
        integrity: None,
        failures: Vec::new(),
        seconds: 0.0,
    };
    let session = |level: Option<u8>| -> Result<OrtDecoder, CheckError> {
        let mut s = SessionOptions { provider: opts.provider, matmul_accuracy_level: level, ..Default::default() };
        if opts.provider == Provider::TensorRt {
            let range = ShapeRange {
                max_batch: 4,
                max_seq: opts.window.max(64),
                max_past: m.max_context.min(4096),
                opt_batch: 1,
                opt_past: 256,
            };
            let cache = cache_dir().join("trt-engines").join(&m.build_hash[..16]);
            s.tensorrt = Some(TensorRtOptions::for_artifact(m, &range, opts.trt_fp16, Some(cache)));
        }
        OrtDecoder::open(dir, &s).map_err(|e| CheckError::Run(e.to_string()))
    };
    // Exact math on the CPU; on a GPU the provider's own kernels.
    let exact = opts.provider == Provider::Cpu;
    let mut ort = session(if exact { Some(1) } else { None })?;
    let runs: [(&str, Vec<Vec<u32>>); 2] =
        [("batch 1", vec![prompts[0].clone()]), ("batch 3, left-padded", prompts.clone())];
    let label = if exact { "ORT exact math" } else { opts.provider.name() };
    for (what, batch) in runs {
        progress(&format!("parity: {label} vs tract, {what}"));
        let p = parity::compare(m, &mut tract, &mut ort, &batch, opts.decode_steps)?;
        report.parity.push(row(
            format!("{label} vs tract, {what}"),
            &p,
            opts.decode_steps,
            tolerance(opts.provider, exact),
        ));
    }
    // The serving graph (GroupQueryAttention; not a TensorRT graph) against the portable one,
    // three sequences in three slots of one batch.
    let context = prompts.iter().map(Vec::len).max().unwrap_or(0) + opts.decode_steps + 1;
    if opts.provider != Provider::TensorRt {
        progress("parity: ORT serving graph vs portable graph, 3 slots");
        let level = if exact { Some(1) } else { None };
        let s = SessionOptions { provider: opts.provider, matmul_accuracy_level: level, ..Default::default() };
        let mut serving =
            ServingDecoder::open(dir, &s, prompts.len(), context).map_err(|e| CheckError::Run(e.to_string()))?;
        let p = parity::compare_serving(m, &mut ort, &mut serving, &prompts, opts.decode_steps)?;
        report.parity.push(row(
            format!("ORT serving graph vs portable, {} slots", prompts.len()),
            &p,
            opts.decode_steps,
            tolerance(opts.provider, exact),
        ));
    }
    if exact && quantized {
        progress("parity: ORT serving settings (accuracy level 4) vs tract, batch 1");
        let mut fast = session(None)?;
        let p = parity::compare(m, &mut tract, &mut fast, &[prompts[0].clone()], opts.decode_steps)?;
        report.parity.push(row(
            "ORT accuracy level 4 vs tract, batch 1".into(),
            &p,
            opts.decode_steps,
            tolerance(Provider::Cpu, false),
        ));
        // What `kiln serve` runs on this CPU by default: the serving graph with kiln's kernels
        // (int8 activations where the CPU has VNNI) and the default KV cache type.
        let mut serving = ServingDecoder::open(dir, &SessionOptions::default(), prompts.len(), context)
            .map_err(|e| CheckError::Run(e.to_string()))?;
        let name =
            format!("serving defaults ({} KV cache) vs tract, {} slots", serving.kv_cache().name(), prompts.len());
        progress(&format!("parity: {name}"));
        let p = parity::compare_serving(m, &mut tract, &mut serving, &prompts, opts.decode_steps)?;
        report.parity.push(row(name, &p, opts.decode_steps, tolerance(Provider::Cpu, false)));
    }
    drop(tract);
    for r in report.parity.iter().filter(|r| !r.pass) {
        report.failures.push(format!("parity ({}): {}", r.name, describe(&r.worst, &r.tolerance)));
    }

    let same = same_dir(&baseline_dir, dir);
    let mut candidate = session(opts.accuracy_level)?;
    let mut base = if same {
        session(None)?
    } else {
        let base_files = ArtifactFiles::open(&baseline_dir)?;
        if base_files.manifest.source.sha256 != m.source.sha256 {
            return Err(CheckError::Artifact {
                path: baseline_dir.clone(),
                reason: "the baseline was exported from another source (sha256 differs)".into(),
            });
        }
        // AWQ stores rescaled weights (and rescaled norms): they are not the FP32 artifact's.
        if quantized && !m.recipe.quant.method.rescales_weights() {
            progress("integrity: quantized tensors against the FP32 artifact");
            let integ = integrity::compare(&files, &base_files)?;
            for mm in &integ.mismatches {
                report.failures.push(format!(
                    "weight integrity: {} has relative error {:.4e}, kiln.json records {:.4e}",
                    mm.tensor, mm.actual, mm.recorded
                ));
            }
            report.integrity = Some(integ);
        }
        OrtDecoder::open(&baseline_dir, &SessionOptions::default()).map_err(|e| CheckError::Run(e.to_string()))?
    };
    for (text, ids) in scored {
        let label = file_name(&text);
        let mut on = |i: usize, n: usize| progress(&format!("quality on {label}: window {i}/{n}"));
        let q = quality::compare(&mut base, &mut candidate, &ids, opts.window, &mut on)?;
        if !same {
            if let Some(t) = thresholds.max_ppl_increase.filter(|&t| q.ppl_increase > t) {
                report.failures.push(format!("{label}: ppl_increase {:.4} > {t}", q.ppl_increase));
            }
            if let Some(t) = thresholds.max_mean_kl.filter(|&t| q.mean_kl > t) {
                report.failures.push(format!("{label}: mean_kl {:.4} > {t}", q.mean_kl));
            }
            if let Some(t) = thresholds.min_top1.filter(|&t| q.top1 < t) {
                report.failures.push(format!("{label}: top1 {:.4} < {t}", q.top1));
            }
        }
        report.quality.push(QualityRow {
            text,
            baseline: baseline_dir.clone(),
            quality: q,
            thresholds: thresholds.clone(),
            accuracy_level: opts.accuracy_level,
        });
    }
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

fn row(name: String, p: &Parity, decode_steps: usize, tolerance: Tolerance) -> ParityRow {
    let worst = p.worst();
    let pass =
        worst.max_rel <= tolerance.max_rel && worst.top1 >= tolerance.min_top1 && worst.max_kl <= tolerance.max_kl;
    ParityRow { name, decode_steps, worst, tolerance, pass }
}

fn describe(w: &StepStats, t: &Tolerance) -> String {
    let mut out = Vec::new();
    if w.max_rel > t.max_rel {
        out.push(format!("max_rel {:.3e} > {:e}", w.max_rel, t.max_rel));
    }
    if w.top1 < t.min_top1 {
        out.push(format!("top1 {:.3} < {}", w.top1, t.min_top1));
    }
    if w.max_kl > t.max_kl {
        out.push(format!("kl {:.3e} > {:e}", w.max_kl, t.max_kl));
    }
    out.join(", ")
}

/// Whether two paths name the same directory.
fn same_dir(a: &Path, b: &Path) -> bool {
    std::fs::canonicalize(a).ok() == std::fs::canonicalize(b).ok()
}

/// The last component of `path`, for labels.
fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The texts quality is scored on by default: Hamlet (in the calibration corpus's domain,
/// left out of it) and Alice's Adventures in Wonderland (prose, out of its domain).
pub fn default_texts() -> Vec<PathBuf> {
    vec![crate::model::corpus_dir().join("hamlet_gut.txt"), crate::model::prose_dir().join("alice29.txt")]
}

/// The FP32 artifact of the same source beside `dir` (same parent directory): `dir` itself
/// when it is FP32.
pub fn find_baseline(dir: &Path, m: &Manifest) -> Result<PathBuf, CheckError> {
    let is_fp32 = |m: &Manifest| m.recipe.quant.precision == Precision::Fp32 && m.recipe.quant.overrides.is_empty();
    if is_fp32(m) {
        return Ok(dir.to_path_buf());
    }
    let parent = dir.parent().unwrap_or(Path::new("."));
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(parent)
        .map_err(|source| CheckError::Io { path: parent.to_path_buf(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    candidates.sort();
    candidates
        .into_iter()
        .find(|p| {
            Manifest::read(p).is_ok_and(|b| is_fp32(&b) && b.source.sha256 == m.source.sha256 && b.config == m.config)
        })
        .ok_or_else(|| CheckError::Artifact {
            path: dir.to_path_buf(),
            reason: format!(
                "no FP32 artifact of the same source beside it in {}: export one (export/fp32.toml) or pass --baseline",
                parent.display()
            ),
        })
}

/// The report as a terminal table.
pub fn render(r: &Report) -> String {
    let mut s = format!("kiln check {} on {}\n\n", r.artifact.display(), r.provider);
    s += &format!(
        "{:<54} {:>11} {:>11} {:>8} {:>11}  {}\n",
        "parity (prefill + decode steps)", "max |Δ|", "max rel", "top-1", "max KL", "result"
    );
    for p in &r.parity {
        s += &format!(
            "{:<54} {:>11.3e} {:>11.3e} {:>8.3} {:>11.3e}  {} (rel ≤ {:e}, top-1 ≥ {}, KL ≤ {:e})\n",
            format!("{} + {}", p.name, p.decode_steps),
            p.worst.max_abs,
            p.worst.max_rel,
            p.worst.top1,
            p.worst.max_kl,
            if p.pass { "pass" } else { "FAIL" },
            p.tolerance.max_rel,
            p.tolerance.min_top1,
            p.tolerance.max_kl
        );
    }
    if r.lowered_for_tract > 0 {
        s += &format!("(tract ran {} DequantizeLinear nodes lowered to standard ops)\n", r.lowered_for_tract);
    }
    let label = |q: &QualityRow| file_name(&q.text);
    let baseline = r.quality.first().is_some_and(|q| same_dir(&q.baseline, &r.artifact));
    if baseline {
        let ppl: Vec<String> = r
            .quality
            .iter()
            .map(|q| format!("{:.3} on {} ({} tokens)", q.quality.ppl, label(q), q.quality.tokens))
            .collect();
        s += &format!("\nquality: this is the FP32 baseline; perplexity {}\n", ppl.join(", "));
    } else {
        for q in &r.quality {
            let t = &q.thresholds;
            let lim = |v: Option<f64>, op: &str| v.map_or(String::new(), |v| format!(" ({op} {v})"));
            s += &format!(
                "\nquality vs {} on {} ({} tokens{})\n  perplexity {:.3} vs {:.3}: {:+.2}%{}\n  mean KL(fp32 ‖ this) {:.4}{}\n  top-1 agreement {:.4}{}\n",
                q.baseline.display(),
                label(q),
                q.quality.tokens,
                q.accuracy_level.map_or(String::new(), |l| format!(", accuracy level {l}")),
                q.quality.ppl,
                q.quality.baseline_ppl,
                q.quality.ppl_increase * 100.0,
                // Rounded so that a limit of 0.035 reads 3.5, not 3.5000000000000004.
                t.max_ppl_increase.map_or(String::new(), |v| format!(" (limit +{}%)", (v * 1e8).round() / 1e6)),
                q.quality.mean_kl,
                lim(t.max_mean_kl, "≤"),
                q.quality.top1,
                lim(t.min_top1, "≥"),
            );
        }
    }
    if let Some(i) = &r.integrity {
        s += &format!(
            "weights: {} quantized tensors match their recorded error (largest {:.3e}){}\n",
            i.tensors - i.mismatches.len(),
            i.max_rel_error,
            if i.mismatches.is_empty() { String::new() } else { format!(", {} do NOT", i.mismatches.len()) }
        );
    }
    s += &format!("\n{} in {:.1} s\n", if r.pass() { "PASS" } else { "FAIL" }, r.seconds);
    for f in &r.failures {
        s += &format!("  failed: {f}\n");
    }
    s
}
