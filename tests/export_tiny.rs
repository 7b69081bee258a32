//! Exports of small written models: both graphs for every architecture variant run by ONNX
//! Runtime against the reference forward (q/k/v biases, tied heads, sliding window,
//! padded batches), determinism, and bad input that must leave no partial artifact.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use kiln::model::reference::{Logits, Reference};
use kiln::model::Model;
use kiln::onnx::builder::{DType, GraphBuilder, TensorData};
use kiln::onnx::export::{export_recipe, ExportOptions, ExportOutcome, Quiet};
use kiln::onnx::manifest::Manifest;
use kiln::runtime::{Forward, OrtDecoder, ServingDecoder, SessionOptions, StepInput};
use ndarray::{s, Array2};

const LLAMA: TinySpec = TinySpec { class: "LlamaForCausalLM", tied: false, bias: false, sliding_window: None };
const QWEN2: TinySpec = TinySpec { class: "Qwen2ForCausalLM", tied: true, bias: true, sliding_window: None };
const MISTRAL: TinySpec = TinySpec { class: "MistralForCausalLM", tied: false, bias: false, sliding_window: Some(3) };

/// f32 through ORT and the reference: summation order only.
const TOLERANCE: f32 = 1e-4;

fn model_dir(dir: &Path, spec: TinySpec, seed: u64) -> PathBuf {
    let m = dir.join("model");
    write_hf_dir(&m, spec, &tiny_tensors(spec, seed), Storage::SingleF32);
    m
}

fn recipe(dir: &Path, source: &Path, quant: &str) -> PathBuf {
    let text = format!("source = {:?}\noutput = {:?}\n[quant]\n{quant}\n", source, dir.join("out"));
    write_recipe(dir, "tiny", &text)
}

fn export(recipe: &Path) -> PathBuf {
    match export_recipe(recipe, &ExportOptions::default(), &mut Quiet).expect("exports") {
        ExportOutcome::Built { dir, .. } | ExportOutcome::UpToDate { dir } => dir,
    }
}

/// The FP32 artifact of `source` in `dir/fp32`: the baseline of weight integrity.
fn fp32_baseline(dir: &Path, source: &Path) -> PathBuf {
    let text = format!("source = {source:?}\noutput = {:?}\n[quant]\nprecision = \"fp32\"\n", dir.join("fp32"));
    export(&write_recipe(dir, "fp32", &text))
}

fn max_rel_diff(a: ndarray::ArrayView1<f32>, b: ndarray::ArrayView1<f32>) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b.iter()).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// The serving graph's logits for every position of `ids`: a prefill of all but the last
/// two, a one-token chunk after it, then a decode step (GroupQueryAttention's rotary
/// positions come from the lengths in all three).
fn serving_logits(dir: &Path, opts: &SessionOptions, ids: &[u32]) -> Array2<f32> {
    let n = ids.len();
    let mut dec = ServingDecoder::open(dir, opts, 1, 16).expect("serving session");
    let prefill = dec.extend(0, 0, &ids[..n - 2], n - 2).expect("prefill");
    let chunk = dec.extend(0, n - 2, &ids[n - 2..n - 1], 1).expect("chunk");
    let step = dec.step(&[(ids[n - 1], n - 1)]).expect("step");
    ndarray::concatenate(ndarray::Axis(0), &[prefill.view(), chunk.view(), step.view()]).expect("rows")
}

/// Prefill then two single-token steps through ORT, in the portable and the serving graph;
/// every row against the reference.
fn assert_ort_matches_reference(spec: TinySpec, seed: u64) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = model_dir(tmp.path(), spec, seed);
    let dir = export(&recipe(tmp.path(), &src, "precision = \"fp32\""));
    let model = Model::load(&src).expect("loads");
    let reference = Reference::new(&model);
    let ids = [5u32, 80, 256, 3, 259, 17, 44, 99];
    let mut cache = reference.new_cache(ids.len());
    let want = reference.forward(&ids, &mut cache, Logits::All).expect("forward");

    let mut dec = OrtDecoder::open(&dir, &SessionOptions::default()).expect("session");
    let mut past = dec.empty_past(1);
    let mut done = 0;
    for chunk in [&ids[..6], &ids[6..7], &ids[7..]] {
        let n = chunk.len();
        let out = dec
            .run(StepInput {
                input_ids: Array2::from_shape_fn((1, n), |(_, j)| chunk[j] as i64),
                attention_mask: Array2::ones((1, done + n)),
                position_ids: Array2::from_shape_fn((1, n), |(_, j)| (done + j) as i64),
                past,
            })
            .expect("runs");
        for j in 0..n {
            let d = max_rel_diff(out.logits.slice(s![0, j, ..]), want.row(done + j));
            assert!(d <= TOLERANCE, "{}: position {}: relative difference {d}", spec.class, done + j);
        }
        past = out.present;
        done += n;
    }
    let serving = serving_logits(&dir, &SessionOptions::default(), &ids);
    for j in 0..ids.len() {
        let d = max_rel_diff(serving.row(j), want.row(j));
        assert!(d <= TOLERANCE, "{} serving: position {j}: relative difference {d}", spec.class);
    }
}

#[test]
fn llama_gqa_untied() {
    assert_ort_matches_reference(LLAMA, 11);
}

#[test]
fn qwen2_biases_tied_head() {
    assert_ort_matches_reference(QWEN2, 12);
}

#[test]
fn mistral_sliding_window() {
    assert_ort_matches_reference(MISTRAL, 13);
}

/// Two sequences of different lengths in one batch, the short one padded on the left or
/// on the right: each row's logits equal those of the sequence run alone.
#[test]
fn padded_batches_match_single_sequences() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = model_dir(tmp.path(), LLAMA, 14);
    let dir = export(&recipe(tmp.path(), &src, "precision = \"fp32\""));
    let model = Model::load(&src).expect("loads");
    let reference = Reference::new(&model);
    let long = [7u32, 100, 200, 45, 9, 33];
    let short = [250u32, 3, 61];
    let alone = |ids: &[u32]| {
        let mut c = reference.new_cache(ids.len());
        reference.forward(ids, &mut c, Logits::All).expect("forward")
    };
    let (want_long, want_short) = (alone(&long), alone(&short));
    let mut dec = OrtDecoder::open(&dir, &SessionOptions::default()).expect("session");
    for left in [true, false] {
        let pad = long.len() - short.len();
        let mut ids = Array2::<i64>::zeros((2, long.len()));
        let mut mask = Array2::<i64>::zeros((2, long.len()));
        let mut pos = Array2::<i64>::zeros((2, long.len()));
        for j in 0..long.len() {
            ids[[0, j]] = long[j] as i64;
            mask[[0, j]] = 1;
            pos[[0, j]] = j as i64;
        }
        let offset = if left { pad } else { 0 };
        for j in 0..short.len() {
            ids[[1, offset + j]] = short[j] as i64;
            mask[[1, offset + j]] = 1;
            pos[[1, offset + j]] = j as i64;
        }
        let out = dec
            .run(StepInput { input_ids: ids, attention_mask: mask, position_ids: pos, past: dec.empty_past(2) })
            .expect("runs");
        for j in 0..long.len() {
            assert!(max_rel_diff(out.logits.slice(s![0, j, ..]), want_long.row(j)) <= TOLERANCE, "long row {j}");
        }
        for j in 0..short.len() {
            let d = max_rel_diff(out.logits.slice(s![1, offset + j, ..]), want_short.row(j));
            assert!(d <= TOLERANCE, "short row {j} (left padding: {left}): {d}");
        }
    }
}

#[test]
fn same_recipe_same_bytes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = model_dir(tmp.path(), QWEN2, 15);
    let quant = "precision = \"int4\"\nlayout = \"blocked\"\nblock_size = 16\nsymmetric = false\nclip_search = true\n\
                 [[quant.override]]\nmatch = \"model.embed_tokens.weight\"\nprecision = \"int8\"";
    let r = recipe(tmp.path(), &src, quant);
    let a = export(&r);
    let first: Vec<Vec<u8>> = ["model.onnx", "serving.onnx", "model.onnx.data", "kiln.json"]
        .iter()
        .map(|f| std::fs::read(a.join(f)).expect("read"))
        .collect();
    let opts = ExportOptions { force: true, output: Some(tmp.path().join("again")), ..Default::default() };
    let ExportOutcome::Built { dir: b, .. } = export_recipe(&r, &opts, &mut Quiet).expect("exports") else {
        panic!("forced export must build")
    };
    for (f, bytes) in ["model.onnx", "serving.onnx", "model.onnx.data", "kiln.json"].iter().zip(&first) {
        assert_eq!(&std::fs::read(b.join(f)).expect("read"), bytes, "{f} differs between two exports");
    }
    // Unchanged inputs: the second plain export is skipped.
    assert!(matches!(export_recipe(&r, &ExportOptions::default(), &mut Quiet), Ok(ExportOutcome::UpToDate { .. })));
}

fn leftovers(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .expect("read_dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains(".tmp-") || n.contains(".old-"))
        .collect()
}

#[test]
fn bad_recipes_and_sources_are_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = model_dir(tmp.path(), LLAMA, 16);
    let err = |quant: &str| {
        export_recipe(&recipe(tmp.path(), &src, quant), &ExportOptions::default(), &mut Quiet)
            .expect_err("export must fail")
            .to_string()
    };
    assert!(err("precission = \"int8\"").contains("unknown field `precission`"));
    assert!(err("precision = \"int4\"\nlayout = \"blocked\"\nblock_size = 24").contains("block_size = 24"));
    assert!(err("precision = \"int8\"\nlayout = \"diagonal\"").contains("diagonal"));
    let e = err("precision = \"int4\"");
    assert!(e.contains("model.embed_tokens.weight") && e.contains("4-bit embeddings"), "{e}");

    // An architecture kiln does not know.
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).expect("config")).expect("json");
    config["architectures"] = serde_json::json!(["FalconForCausalLM"]);
    std::fs::write(src.join("config.json"), config.to_string()).expect("write");
    let e = err("precision = \"fp32\"");
    assert!(e.contains("FalconForCausalLM") && e.contains("config.json"), "{e}");
    assert!(!tmp.path().join("out").exists(), "no artifact after failures");
    assert!(leftovers(tmp.path()).is_empty());
}

#[test]
fn unwritable_output_leaves_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = model_dir(tmp.path(), LLAMA, 17);
    // The output's parent is a file: the directory cannot be created.
    std::fs::write(tmp.path().join("blocker"), b"").expect("write");
    let text =
        format!("source = {src:?}\noutput = {:?}\n[quant]\nprecision = \"fp32\"\n", tmp.path().join("blocker/out"));
    let r = write_recipe(tmp.path(), "blocked", &text);
    let e = export_recipe(&r, &ExportOptions::default(), &mut Quiet).expect_err("fails").to_string();
    assert!(e.contains("blocker"), "{e}");
    assert!(leftovers(tmp.path()).is_empty());
}

/// The disk fills up while the weights are written (a file-size limit on the `kiln`
/// process, SIGXFSZ ignored, so writes fail with EFBIG): the export fails, and neither an
/// artifact nor a temporary directory is left; an existing artifact survives.
#[test]
fn full_disk_leaves_no_partial_artifact() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = model_dir(tmp.path(), LLAMA, 18);
    let r = recipe(tmp.path(), &src, "precision = \"fp32\"");
    let run = |limit_kb: u32| {
        std::process::Command::new("bash")
            .arg("-c")
            .arg(format!("trap '' XFSZ; ulimit -f {limit_kb}; exec \"$0\" export --force \"$1\""))
            .arg(env!("CARGO_BIN_EXE_kiln"))
            .arg(&r)
            .output()
            .expect("bash runs")
    };
    let out = run(16);
    assert!(!out.status.success(), "export must fail under a 16 kB file limit");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("File too large"), "{stderr}");
    assert!(!tmp.path().join("out").exists(), "no artifact");
    assert!(leftovers(tmp.path()).is_empty(), "no temporary directory: {:?}", leftovers(tmp.path()));

    // With an artifact in place, a failed rebuild keeps it whole.
    let out = run(1 << 20);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let before = std::fs::read(tmp.path().join("out/model.onnx.data")).expect("data");
    assert!(!run(16).status.success());
    assert_eq!(std::fs::read(tmp.path().join("out/model.onnx.data")).expect("data"), before);
    assert!(leftovers(tmp.path()).is_empty());
}

/// A writer that fails after `left` bytes, like a full disk.
struct FullDisk {
    left: usize,
}

impl std::io::Write for FullDisk {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() > self.left {
            return Err(std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left on device"));
        }
        self.left -= buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn graph_writer_reports_a_full_disk() {
    let mut g = GraphBuilder::default();
    g.initializer("w", TensorData::f32(&[64, 64], &vec![0.5; 64 * 64]));
    let err = g.write("g", "g.data", &mut Vec::new(), &mut FullDisk { left: 1000 }).expect_err("fails");
    assert_eq!(err.kind(), std::io::ErrorKind::StorageFull);
    let mut data = Vec::new();
    let written = g.write("g", "g.data", &mut FullDisk { left: 1 << 20 }, &mut data).expect("fits");
    assert_eq!(written.data_bytes, 64 * 64 * 4);
    assert_eq!(DType::F32.onnx(), 1);
}

/// Every storage scheme through ONNX Runtime (exact-math MatMulNBits) against the reference
/// over the weights the scheme reconstructs: per-tensor, per-channel and blocked layouts,
/// signed and zero-point codes, 8 and 4 bits, FP16, and blocks that do not divide the input
/// dimension (down_proj has 48 inputs: one block of 32 and a partial one of 16).
#[test]
fn every_scheme_computes_its_reconstructed_weights() {
    let schemes = [
        "precision = \"fp16\"",
        "precision = \"int8\"\nlayout = \"per-tensor\"\nsymmetric = false",
        "precision = \"int8\"\nlayout = \"blocked\"\nblock_size = 16",
        "precision = \"int4\"\nlayout = \"per-channel\"\nsymmetric = true",
        "precision = \"int4\"\nlayout = \"blocked\"\nblock_size = 32\nsymmetric = false\nclip_search = true",
        "precision = \"int4\"\nlayout = \"per-tensor\"\nsymmetric = true",
        "precision = \"nf4\"\nlayout = \"blocked\"\nblock_size = 16\nclip_search = true",
    ];
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = model_dir(tmp.path(), QWEN2, 19);
    let model = Model::load(&src).expect("loads");
    let ids = [5u32, 80, 256, 3, 259, 17];
    for quant in schemes {
        // 4-bit embeddings are refused: keep the table INT8 where the base is 4-bit.
        let quant = format!(
            "{quant}\n[[quant.override]]\nmatch = \"model.embed_tokens.weight\"\nprecision = \"int8\"\nlayout = \"blocked\"\nblock_size = 8"
        );
        let r = recipe(tmp.path(), &src, &quant);
        let opts = ExportOptions { force: true, ..Default::default() };
        let ExportOutcome::Built { dir, .. } = export_recipe(&r, &opts, &mut Quiet).expect("exports") else {
            panic!("forced export builds")
        };
        let recipe = kiln::onnx::recipe::Recipe::load(&r).expect("recipe");
        let weights = reconstructed_weights(&model.weights, &recipe);
        let reference = Reference::from_parts(&model.config, &weights);
        let mut cache = reference.new_cache(ids.len());
        let want = reference.forward(&ids, &mut cache, Logits::All).expect("forward");
        let opts = SessionOptions { matmul_accuracy_level: Some(1), ..Default::default() };
        let mut dec = OrtDecoder::open(&dir, &opts).expect("session");
        let out = dec
            .run(StepInput {
                input_ids: Array2::from_shape_fn((1, ids.len()), |(_, j)| ids[j] as i64),
                attention_mask: Array2::ones((1, ids.len())),
                position_ids: Array2::from_shape_fn((1, ids.len()), |(_, j)| j as i64),
                past: dec.empty_past(1),
            })
            .expect("runs");
        // Per-tensor scales keep q/k/v and gate/up unpacked; the others pack them.
        let serving = serving_logits(&dir, &opts, &ids);
        for j in 0..ids.len() {
            let d = max_rel_diff(out.logits.slice(s![0, j, ..]), want.row(j));
            assert!(d <= TOLERANCE, "{quant}: position {j}: relative difference {d}");
            let d = max_rel_diff(serving.row(j), want.row(j));
            assert!(d <= TOLERANCE, "{quant} serving: position {j}: relative difference {d}");
        }
    }
}

/// GPTQ and AWQ recipes end to end on a tiny model with a tiny corpus: the artifacts load in
/// ONNX Runtime, GPTQ's stored weights match the errors recorded in the manifest (checked
/// against the FP32 artifact), and the export is deterministic.
#[test]
fn calibrated_recipes_export_and_verify() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = model_dir(tmp.path(), LLAMA, 22);
    let corpus = tmp.path().join("corpus");
    std::fs::create_dir_all(&corpus).expect("mkdir");
    for (i, name) in ["a.txt", "b.txt", "held_out.txt"].iter().enumerate() {
        let text: String = (0..400).map(|k| format!("hello world {} or {} ", k * (i + 3), k % 7)).collect();
        std::fs::write(corpus.join(name), text).expect("corpus");
    }
    let common = format!(
        "precision = \"int4\"\nlayout = \"blocked\"\nblock_size = 16\nsymmetric = false\n\
         [quant.calibration]\nwindows = 4\nwindow = 24\ncorpus = {corpus:?}\nexclude = [\"held_out.txt\"]\n\
         [[quant.override]]\nmatch = \"model.embed_tokens.weight\"\nprecision = \"int8\""
    );
    let fp32 = fp32_baseline(tmp.path(), &src);
    let mut built = std::collections::HashMap::new();
    for (method, extra) in [
        ("gptq", "[quant.gptq]\nact_order = true\n"),
        ("awq", "[quant.awq]\ngrid = 5\nsamples = 32\n"),
        ("awq+gptq", "[quant.awq]\ngrid = 5\nsamples = 32\n[quant.gptq]\nact_order = true\n"),
    ] {
        let out = tmp.path().join(method);
        let text = format!("source = {src:?}\noutput = {out:?}\n[quant]\nmethod = \"{method}\"\n{common}\n{extra}");
        let r = write_recipe(tmp.path(), method, &text);
        let dir = export(&r);
        let again = export_recipe(
            &r,
            &ExportOptions { force: true, output: Some(tmp.path().join(format!("{method}2"))), ..Default::default() },
            &mut Quiet,
        )
        .expect("exports");
        let ExportOutcome::Built { dir: dir2, .. } = again else { panic!("forced") };
        assert_eq!(
            std::fs::read(dir.join("model.onnx.data")).expect("data"),
            std::fs::read(dir2.join("model.onnx.data")).expect("data"),
            "{method}: not deterministic"
        );
        let mut dec = OrtDecoder::open(&dir, &SessionOptions::default()).expect("session");
        let out = dec
            .run(StepInput {
                input_ids: Array2::from_shape_fn((1, 3), |(_, j)| [5i64, 80, 256][j]),
                attention_mask: Array2::ones((1, 3)),
                position_ids: Array2::from_shape_fn((1, 3), |(_, j)| j as i64),
                past: dec.empty_past(1),
            })
            .expect("runs");
        assert!(out.logits.iter().all(|v| v.is_finite()));
        if method == "gptq" {
            let cand = kiln::check::artifact::ArtifactFiles::open(&dir).expect("artifact");
            let base = kiln::check::artifact::ArtifactFiles::open(&fp32).expect("baseline");
            let integrity = kiln::check::integrity::compare(&cand, &base).expect("integrity");
            assert_eq!(integrity.tensors, 7 * TINY_LAYERS + 2);
            assert!(integrity.mismatches.is_empty(), "{:?}", integrity.mismatches);
        }
        built.insert(method, dir);
    }
    // awq+gptq folds AWQ's scales (its norms are AWQ's, not the FP32 model's), then quantizes
    // by GPTQ: its codes are neither AWQ's round-to-nearest nor GPTQ's on unscaled weights.
    let tensor = |method: &str, name: &str| {
        let dir = if method == "fp32" { &fp32 } else { &built[method] };
        let files = kiln::check::artifact::ArtifactFiles::open(dir).expect("artifact");
        let t = files.initializer(name).unwrap_or_else(|| panic!("{method}: no initializer {name}"));
        files.bytes(t).expect("bytes")
    };
    let norm = "model.layers.0.input_layernorm.weight";
    assert_eq!(tensor("awq+gptq", norm), tensor("awq", norm));
    assert_ne!(tensor("awq+gptq", norm), tensor("fp32", norm));
    let m = Manifest::read(&built["awq+gptq"]).expect("manifest");
    let packed = m.tensors.iter().find_map(|t| t.packed.as_ref()).expect("a packed projection").tensor.clone();
    let codes = tensor("awq+gptq", &packed);
    assert_ne!(codes, tensor("awq", &packed));
    assert_ne!(codes, tensor("gptq", &packed));
}

/// `bits_per_weight` end to end on a tiny model: the budget holds, a larger budget buys more
/// 8-bit matrices and a smaller measured KL, kiln.json's schemes are the plan's, the stored
/// weights verify against the FP32 artifact, and a budget below the smallest choice is
/// refused with the figures named.
#[test]
fn mixed_precision_keeps_the_budget() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = model_dir(tmp.path(), QWEN2, 5);
    let corpus = tmp.path().join("corpus");
    std::fs::create_dir_all(&corpus).expect("mkdir");
    let text: String = (0..600).map(|k| format!("hello world {} or {} ", k * 3, k % 11)).collect();
    std::fs::write(corpus.join("a.txt"), text).expect("corpus");
    let fp32 = fp32_baseline(tmp.path(), &src);
    let recipe = |bpw: f64| {
        let out = tmp.path().join(format!("mixed-{bpw}"));
        let text = format!(
            "source = {src:?}\noutput = {out:?}\n[quant]\nmethod = \"gptq\"\nprecision = \"int4\"\n\
             layout = \"blocked\"\nbits_per_weight = {bpw}\n\
             [quant.calibration]\nwindows = 4\nwindow = 24\ncorpus = {corpus:?}\n\
             [quant.sensitivity]\nwindows = 2\ntokens = 16\nvalidate = true\n"
        );
        write_recipe(tmp.path(), &format!("mixed-{bpw}"), &text)
    };
    let err = export_recipe(&recipe(1.0), &ExportOptions::default(), &mut Quiet).expect_err("too small");
    let msg = err.to_string();
    assert!(msg.contains("bits_per_weight = 1") && msg.contains("smallest choice takes"), "{msg}");
    let smallest: f64 = msg
        .split("smallest choice takes ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("the smallest size in the message");
    let mut plans = Vec::new();
    for bpw in [(smallest + 0.4).ceil(), 18.0] {
        let dir = export(&recipe(bpw));
        let m = Manifest::read(&dir).expect("manifest");
        let plan = m.mixed_precision.clone().expect("the plan is recorded");
        assert!(plan.bits_per_weight <= bpw && plan.target_bits_per_weight == bpw, "{plan:?}");
        assert_eq!(plan.choices.len(), 7 * TINY_LAYERS + 2);
        for c in &plan.choices {
            let t = m.tensors.iter().find(|t| t.name == c.name).unwrap_or_else(|| panic!("{} not stored", c.name));
            assert_eq!(t.scheme, c.scheme, "{}", c.name);
            assert_eq!(t.bytes, c.bytes, "{}", c.name);
        }
        let kl = plan.measured_kl.expect("measured");
        assert!(kl.is_finite() && kl > 0.0, "{kl}");
        let cand = kiln::check::artifact::ArtifactFiles::open(&dir).expect("artifact");
        let base = kiln::check::artifact::ArtifactFiles::open(&fp32).expect("baseline");
        let integrity = kiln::check::integrity::compare(&cand, &base).expect("integrity");
        assert!(integrity.mismatches.is_empty(), "{:?}", integrity.mismatches);
        plans.push(plan);
    }
    let int8 = |p: &kiln::quant::mixed::MixedPlan| {
        p.choices.iter().filter(|c| c.scheme.precision == kiln::quant::Precision::Int8).count()
    };
    assert!(int8(&plans[0]) < plans[0].choices.len(), "the small budget keeps some 4-bit matrices");
    assert_eq!(
        int8(&plans[1]),
        plans[1].choices.len(),
        "18 bits per weight fit INT8 everywhere (the tied table is stored twice)"
    );
    assert!(plans[1].measured_kl < plans[0].measured_kl, "{:?} vs {:?}", plans[1].measured_kl, plans[0].measured_kl);
    assert!(plans[1].predicted_kl < plans[0].predicted_kl);
}

/// NF4 end to end on a tiny model (blocks of 32; the FFN's 48 inputs end in a partial block):
/// every tensor's level table is the NF4 table bit for bit, the stored weights verify against
/// the FP32 artifact, tract (4-bit codes widened in memory) agrees with ONNX Runtime, and the
/// serving graph runs kiln's kernel where the CPU has AVX-512 VNNI, within its int8 grid.
#[test]
fn nf4_artifacts_verify_in_tract_and_run_kilns_kernel() {
    use kiln::check::lowering::Lowering;
    use kiln::check::tract::TractDecoder;
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = model_dir(tmp.path(), LLAMA, 23);
    let fp32 = fp32_baseline(tmp.path(), &src);
    let quant = "precision = \"nf4\"\nlayout = \"blocked\"\nblock_size = 32\n[[quant.override]]\nmatch = \"model.embed_tokens.weight\"\n\
                 precision = \"int8\"\nlayout = \"per-channel\"";
    let dir = export(&recipe(tmp.path(), &src, quant));
    let files = kiln::check::artifact::ArtifactFiles::open(&dir).expect("artifact");
    let m = Manifest::read(&dir).expect("manifest");
    let nf4: Vec<_> = m.tensors.iter().filter(|t| t.scheme.precision == kiln::quant::Precision::Nf4).collect();
    assert_eq!(nf4.len(), 7 * TINY_LAYERS + 1, "every matrix and the lm_head");
    assert!(nf4.iter().all(|t| t.label == "nf4-b32"));
    let table: Vec<u8> = kiln::quant::NF4_LEVELS.iter().flat_map(|l| l.to_le_bytes()).collect();
    let stored: std::collections::BTreeSet<&str> =
        nf4.iter().map(|t| t.packed.as_ref().map_or(t.name.as_str(), |p| p.tensor.as_str())).collect();
    for name in &stored {
        let t = files.initializer(&format!("{name}.levels")).unwrap_or_else(|| panic!("{name}: no level table"));
        assert_eq!(files.bytes(t).expect("bytes"), table, "{name}");
    }
    let base = kiln::check::artifact::ArtifactFiles::open(&fp32).expect("baseline");
    let integrity = kiln::check::integrity::compare(&files, &base).expect("integrity");
    assert_eq!(integrity.tensors, 7 * TINY_LAYERS + 2);
    assert!(integrity.mismatches.is_empty(), "{:?}", integrity.mismatches);

    let ids = [5u32, 80, 256, 3, 259, 17];
    let input = |past| StepInput {
        input_ids: Array2::from_shape_fn((1, ids.len()), |(_, j)| ids[j] as i64),
        attention_mask: Array2::ones((1, ids.len())),
        position_ids: Array2::from_shape_fn((1, ids.len()), |(_, j)| j as i64),
        past,
    };
    let exact = SessionOptions { matmul_accuracy_level: Some(1), ..Default::default() };
    let mut ort = OrtDecoder::open(&dir, &exact).expect("session");
    let want = ort.run(input(ort.empty_past(1))).expect("runs").logits;
    let tract = TractDecoder::open(&dir, Lowering::Needed).expect("tract reads NF4");
    let got = tract.run(input(ort.empty_past(1))).expect("tract runs").logits;
    for j in 0..ids.len() {
        let d = max_rel_diff(got.slice(s![0, j, ..]), want.slice(s![0, j, ..]));
        assert!(d <= TOLERANCE, "tract vs ONNX Runtime, position {j}: {d}");
    }

    let optimized = tmp.path().join("optimized.onnx");
    let fast = SessionOptions { optimized_model_path: Some(optimized.clone()), ..Default::default() };
    let serving = serving_logits(&dir, &fast, &ids);
    let ops = {
        use prost::Message as _;
        let model = tract_onnx::pb::ModelProto::decode(&std::fs::read(&optimized).expect("graph")[..]).expect("ONNX");
        model.graph.expect("graph").node.into_iter().filter(|n| n.op_type == "QuantizedMatMul").count()
    };
    let vnni = std::arch::is_x86_feature_detected!("avx512vnni")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512f");
    if !vnni {
        println!("SKIPPED kiln's NF4 kernel: this CPU lacks AVX-512 VNNI (ONNX Runtime runs the f32 graph)");
        assert_eq!(ops, 0);
        return;
    }
    // Per layer q/k/v packed, o, gate/up packed, down; and the lm_head.
    assert_eq!(ops, 4 * TINY_LAYERS + 1);
    for j in 0..ids.len() {
        let d = max_rel_diff(serving.row(j), want.slice(s![0, j, ..]));
        assert!(d <= 3e-2, "kiln's kernel, position {j}: {d}");
    }
}

/// A tied model whose embedding and lm_head share one INT8 per-channel scheme stores the
/// table once, as the lm_head's `[hidden, vocab]` codes that the embedding's Gather reads by
/// column: the reports say so, weight integrity checks it as the lm_head, and ONNX Runtime
/// (portable and serving graphs, where the lm_head's DequantizeLinear still fuses) and tract
/// compute the model of the rounded weights.
#[test]
fn a_tied_int8_table_is_stored_once() {
    use kiln::check::lowering::Lowering;
    use kiln::check::tract::TractDecoder;
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = model_dir(tmp.path(), QWEN2, 29);
    let fp32 = fp32_baseline(tmp.path(), &src);
    let r = recipe(tmp.path(), &src, "precision = \"int8\"\nlayout = \"per-channel\"\nsymmetric = true");
    let dir = export(&r);
    let m = Manifest::read(&dir).expect("manifest");
    let of = |n: &str| m.tensors.iter().find(|t| t.name == n).expect(n).clone();
    let (e, head) = (of("model.embed_tokens.weight"), of("lm_head.weight"));
    assert_eq!(e.bytes, 0);
    assert_eq!(
        e.packed.as_ref().map(|p| (p.tensor.as_str(), p.columns)),
        Some(("lm_head.weight", [0, tiny_vocab_size()]))
    );
    assert_eq!((e.label.as_str(), e.error.rel_frobenius), (head.label.as_str(), head.error.rel_frobenius));
    let files = kiln::check::artifact::ArtifactFiles::open(&dir).expect("artifact");
    assert!(files.initializer("model.embed_tokens.weight").is_none(), "no second table");
    let codes = files.initializer("lm_head.weight").expect("the lm_head's codes");
    assert_eq!(codes.dims, [TINY_HIDDEN as i64, tiny_vocab_size() as i64]);
    let base = kiln::check::artifact::ArtifactFiles::open(&fp32).expect("baseline");
    let integrity = kiln::check::integrity::compare(&files, &base).expect("integrity");
    assert_eq!(integrity.tensors, 7 * TINY_LAYERS + 1, "the table once");
    assert!(integrity.mismatches.is_empty(), "{:?}", integrity.mismatches);

    let model = Model::load(&src).expect("loads");
    let recipe = kiln::onnx::recipe::Recipe::load(&r).expect("recipe");
    let weights = reconstructed_weights(&model.weights, &recipe);
    let reference = Reference::from_parts(&model.config, &weights);
    let ids = [5u32, 80, 256, 3, 259, 17];
    let mut cache = reference.new_cache(ids.len());
    let want = reference.forward(&ids, &mut cache, Logits::All).expect("forward");
    let input = |past| StepInput {
        input_ids: Array2::from_shape_fn((1, ids.len()), |(_, j)| ids[j] as i64),
        attention_mask: Array2::ones((1, ids.len())),
        position_ids: Array2::from_shape_fn((1, ids.len()), |(_, j)| j as i64),
        past,
    };
    let optimized = tmp.path().join("portable.optimized.onnx");
    let exact = SessionOptions { matmul_accuracy_level: Some(1), ..Default::default() };
    let traced = SessionOptions { optimized_model_path: Some(optimized.clone()), ..Default::default() };
    let mut ort = OrtDecoder::open(&dir, &exact).expect("session");
    let got = ort.run(input(ort.empty_past(1))).expect("runs").logits;
    let mut int8 = OrtDecoder::open(&dir, &traced).expect("session");
    let int8 = int8.run(input(ort.empty_past(1))).expect("runs").logits;
    let tract = TractDecoder::open(&dir, Lowering::Needed).expect("tract");
    let tract = tract.run(input(ort.empty_past(1))).expect("tract runs").logits;
    let serving = serving_logits(&dir, &exact, &ids);
    let fused = serving_logits(&dir, &SessionOptions::default(), &ids);
    for j in 0..ids.len() {
        for (what, row, tolerance) in [
            ("ONNX Runtime", got.slice(s![0, j, ..]), TOLERANCE),
            ("tract", tract.slice(s![0, j, ..]), TOLERANCE),
            ("serving", serving.row(j), TOLERANCE),
            ("ONNX Runtime, default accuracy", int8.slice(s![0, j, ..]), 3e-2),
            // int8 activations where kiln's kernel runs.
            ("serving, default accuracy", fused.row(j), 3e-2),
        ] {
            let d = max_rel_diff(row, want.row(j));
            assert!(d <= tolerance, "{what}, position {j}: relative difference {d}");
        }
    }
    // ONNX Runtime fused the lm_head's DequantizeLinear: its Gather read a second entry.
    let graph = {
        use prost::Message as _;
        let model = tract_onnx::pb::ModelProto::decode(&std::fs::read(&optimized).expect("graph")[..]).expect("ONNX");
        model.graph.expect("graph")
    };
    let readers = |name: &str| -> Vec<String> {
        graph.node.iter().filter(|n| n.input.iter().any(|i| i == name)).map(|n| n.op_type.clone()).collect()
    };
    assert_eq!(readers("lm_head.weight.gathered"), ["Gather"]);
    assert_eq!(readers("lm_head.weight.scale.gathered"), ["Gather"]);
    let left: Vec<_> = graph.node.iter().filter(|n| n.op_type == "DequantizeLinear").map(|n| &n.input).collect();
    assert!(left.is_empty(), "{left:?}");
}
