//! The default recipes exported from SmolLM2 and run by ONNX Runtime: FP32 against the native
//! reference, quantized artifacts against the reference over their own dequantized weights,
//! ONNX Runtime's fusions (weights stay quantized), sizes, and the ONNX project's checker.

mod common;

use std::path::Path;

use kiln::model::reference::{argmax, Logits, Reference};
use kiln::onnx::manifest::Manifest;
use kiln::onnx::recipe::Recipe;
use kiln::runtime::{Forward, OrtDecoder, ServingDecoder, SessionOptions, StepInput};
use ndarray::{Array1, Array2, ArrayView1};

/// f32 through two implementations with different summation orders and fused kernels.
const RELATIVE_TOLERANCE: f32 = 1e-4;

fn reference_prompts() -> Vec<(Vec<u32>, Vec<u32>)> {
    let v: serde_json::Value =
        serde_json::from_str(include_str!("data/smollm2-135m.reference.json")).expect("reference JSON");
    v["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| {
            let ids = |k: &str| p[k].as_array().expect("ids").iter().map(|i| i.as_u64().expect("id") as u32).collect();
            (ids("ids"), ids("greedy_48"))
        })
        .collect()
}

/// `max |a − b| <= tol · max |b|`.
fn assert_close(a: ArrayView1<f32>, b: ArrayView1<f32>, tol: f32, what: &str) {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = a.iter().zip(b.iter()).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff <= tol * scale, "{what}: max |Δ| = {diff} > {tol} × {scale}");
}

/// Greedy decoding through ONNX Runtime: logits of the prompt's positions, then of each of
/// `steps` decode steps; returns (rows of logits, tokens chosen).
fn ort_greedy(dec: &mut OrtDecoder, prompt: &[u32], steps: usize, stop: &[u32]) -> (Vec<Array1<f32>>, Vec<u32>) {
    let mut past = dec.empty_past(1);
    let mut input: Vec<i64> = prompt.iter().map(|&i| i as i64).collect();
    let (mut rows, mut tokens, mut pos) = (Vec::new(), Vec::new(), 0i64);
    for _ in 0..=steps {
        let n = input.len();
        let out = dec
            .run(StepInput {
                input_ids: Array2::from_shape_vec((1, n), input.clone()).expect("ids"),
                attention_mask: Array2::ones((1, pos as usize + n)),
                position_ids: Array2::from_shape_fn((1, n), |(_, j)| pos + j as i64),
                past,
            })
            .expect("ORT runs");
        for j in 0..n {
            rows.push(out.logits.slice(ndarray::s![0, j, ..]).to_owned());
        }
        let next = argmax(out.logits.slice(ndarray::s![0, n - 1, ..]));
        tokens.push(next);
        past = out.present;
        pos += n as i64;
        input = vec![next as i64];
        if stop.contains(&next) {
            break;
        }
    }
    (rows, tokens)
}

/// The same through the reference forward.
fn reference_greedy(r: &Reference, prompt: &[u32], steps: usize) -> (Vec<Array1<f32>>, Vec<u32>) {
    let mut cache = r.new_cache(prompt.len() + steps + 1);
    let mut rows = Vec::new();
    let mut tokens = Vec::new();
    let mut input = prompt.to_vec();
    for _ in 0..=steps {
        let logits = r.forward(&input, &mut cache, Logits::All).expect("forward");
        rows.extend(logits.rows().into_iter().map(|r| r.to_owned()));
        let next = argmax(logits.row(logits.nrows() - 1));
        tokens.push(next);
        input = vec![next];
    }
    (rows, tokens)
}

#[test]
fn fp32_matches_the_reference_forward_and_transformers() {
    let model = common::smollm2();
    let reference = Reference::new(model);
    let mut dec = OrtDecoder::open(&common::artifact("fp32"), &SessionOptions::default()).expect("session");
    for (prompt, greedy_48) in reference_prompts() {
        // Prefill plus 16 decode steps with a KV cache, logit by logit.
        let (ort_rows, ort_tokens) = ort_greedy(&mut dec, &prompt, 16, &[]);
        let (ref_rows, ref_tokens) = reference_greedy(&reference, &prompt, 16);
        assert_eq!(ort_tokens, ref_tokens, "greedy tokens of {prompt:?}");
        for (i, (a, b)) in ort_rows.iter().zip(&ref_rows).enumerate() {
            assert_close(a.view(), b.view(), RELATIVE_TOLERANCE, &format!("prompt {prompt:?}, row {i}"));
        }
        // And therefore transformers' greedy continuation.
        let (_, tokens) = ort_greedy(&mut dec, &prompt, 47, &model.tokenizer.eos_ids);
        assert_eq!(tokens, greedy_48, "ORT greedy continuation of {prompt:?}");
    }
}

/// Greedy decoding through the serving graph in `slot`: the rows of logits as [`ort_greedy`].
fn serving_greedy(dec: &mut ServingDecoder, slot: usize, prompt: &[u32], steps: usize) -> (Vec<Array1<f32>>, Vec<u32>) {
    let logits = dec.extend(slot, 0, prompt, prompt.len()).expect("prefill");
    let mut rows: Vec<Array1<f32>> = logits.rows().into_iter().map(|r| r.to_owned()).collect();
    let mut tokens = vec![argmax(logits.row(prompt.len() - 1))];
    for past in prompt.len()..prompt.len() + steps {
        // Slot `slot` decodes alone when it is slot 0; otherwise every slot up to it runs.
        let last = tokens[tokens.len() - 1];
        let batch: Vec<(u32, usize)> = (0..=slot).map(|s| if s == slot { (last, past) } else { (0, 0) }).collect();
        let out = dec.step(&batch).expect("step");
        rows.push(out.row(slot).to_owned());
        tokens.push(argmax(out.row(slot)));
    }
    (rows, tokens)
}

#[test]
fn serving_graph_computes_what_the_portable_graph_does() {
    let dir = common::artifact("fp32");
    let mut portable = OrtDecoder::open(&dir, &SessionOptions::default()).expect("portable session");
    let mut serving = ServingDecoder::open(&dir, &SessionOptions::default(), 3, 256).expect("serving session");
    for (slot, (prompt, greedy_48)) in reference_prompts().into_iter().enumerate() {
        let slot = slot % 3;
        let (want_rows, want_tokens) = ort_greedy(&mut portable, &prompt, 16, &[]);
        let (rows, tokens) = serving_greedy(&mut serving, slot, &prompt, 16);
        assert_eq!(tokens, want_tokens, "greedy tokens of {prompt:?} in slot {slot}");
        for (i, (a, b)) in rows.iter().zip(&want_rows).enumerate() {
            assert_close(a.view(), b.view(), RELATIVE_TOLERANCE, &format!("prompt {prompt:?}, slot {slot}, row {i}"));
        }
        let (_, tokens) = serving_greedy(&mut serving, 0, &prompt, 47);
        let n = greedy_48.len();
        assert_eq!(tokens[..n], greedy_48, "serving greedy continuation of {prompt:?}");
    }
}

#[test]
fn quantized_artifacts_compute_their_dequantized_weights() {
    let model = common::smollm2();
    let (prompt, _) = &reference_prompts()[2];
    let tmp = tempfile::tempdir().expect("tempdir");
    for name in ["int8", "int4", "int4-g64-sym"] {
        let path = common::repo().join(format!("export/{name}.toml"));
        let mut recipe = Recipe::load(&path).expect("recipe");
        // AWQ rescales the weights (int8): its schemes are held here by round to nearest.
        let dir = if recipe.quant.method.rescales_weights() {
            let text = std::fs::read_to_string(&path).expect("recipe").replace("method = \"awq\"", "method = \"rtn\"");
            let rtn = common::write_recipe(tmp.path(), &format!("{name}-rtn"), &text);
            let dir = tmp.path().join(format!("{name}-rtn"));
            let out = common::kiln(&["export", &rtn.display().to_string(), "-o", &dir.display().to_string()]);
            assert!(out.status.success(), "kiln export {}: {}", rtn.display(), String::from_utf8_lossy(&out.stderr));
            recipe = Recipe::load(&rtn).expect("recipe");
            assert!(!recipe.quant.method.rescales_weights(), "{name}: round to nearest");
            dir
        } else {
            common::artifact(name)
        };
        let weights = common::reconstructed_weights(&model.weights, &recipe);
        let reference = Reference::from_parts(&model.config, &weights);
        // Exact math: fused MatMulNBits computes in f32 (accuracy level 1), not int8.
        let opts = SessionOptions { matmul_accuracy_level: Some(1), ..Default::default() };
        let mut dec = OrtDecoder::open(&dir, &opts).expect("session");
        let (ort_rows, ort_tokens) = ort_greedy(&mut dec, prompt, 4, &[]);
        let (ref_rows, ref_tokens) = reference_greedy(&reference, prompt, 4);
        assert_eq!(ort_tokens, ref_tokens, "{name}: greedy tokens");
        for (i, (a, b)) in ort_rows.iter().zip(&ref_rows).enumerate() {
            assert_close(a.view(), b.view(), RELATIVE_TOLERANCE, &format!("{name}: row {i}"));
        }
    }
}

/// Op types of ONNX Runtime's optimized graph, and which of their inputs are initializers.
fn optimized_graph(dir: &Path) -> tract_onnx::pb::GraphProto {
    use prost::Message;
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("optimized.onnx");
    let opts = SessionOptions { optimized_model_path: Some(path.clone()), ..Default::default() };
    OrtDecoder::open(dir, &opts).expect("session");
    let bytes = std::fs::read(&path).expect("ORT wrote its optimized model");
    tract_onnx::pb::ModelProto::decode(bytes.as_slice()).expect("ONNX").graph.expect("graph")
}

#[test]
fn onnx_runtime_keeps_weights_quantized() {
    for name in ["int8", "int4", "int4-g64-sym"] {
        let dir = common::artifact(name);
        let layers = Manifest::read(&dir).expect("manifest").config.num_layers;
        let g = optimized_graph(&dir);
        let initializers: std::collections::HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
        let count = |op: &str| g.node.iter().filter(|n| n.op_type == op).count();
        // Per layer q/k/v packed, o, gate/up packed, down; and the lm_head.
        assert_eq!(count("MatMulNBits"), 4 * layers + 1, "{name}: every projection and the lm_head fused");
        assert_eq!(count("DequantizeLinear"), 0, "{name}: no DequantizeLinear left running");
        for n in g.node.iter().filter(|n| n.op_type == "MatMul" || n.op_type == "Gemm") {
            assert!(
                n.input.iter().all(|i| !initializers.contains(i.as_str())),
                "{name}: {} multiplies by an unfused f32 weight",
                n.name
            );
        }
        // The embedding gathers integer rows: no Gather reads a float table.
        let float_tables: Vec<&str> = g
            .initializer
            .iter()
            .filter(|t| t.data_type == 1 && t.dims.len() == 2 && t.dims[0] > 40_000 && t.dims[1] > 1)
            .map(|t| t.name.as_str())
            .collect();
        assert!(float_tables.is_empty(), "{name}: float vocabulary tables in the optimized graph: {float_tables:?}");
    }
}

#[test]
fn int4_is_at_most_a_fifth_of_fp32() {
    let size = |name: &str| std::fs::metadata(common::artifact(name).join("model.onnx.data")).expect("data").len();
    let (fp32, int4, int4_64) = (size("fp32"), size("int4"), size("int4-g64-sym"));
    assert!(int4 * 5 <= fp32, "int4 {int4} B vs fp32 {fp32} B");
    assert!(int4_64 * 5 <= fp32, "int4-g64-sym {int4_64} B vs fp32 {fp32} B");
}

#[test]
fn onnx_checker_and_python_onnx_runtime_accept_every_artifact() {
    let dirs: Vec<String> =
        ["fp32", "int8", "int4", "int4-g64-sym"].iter().map(|n| common::artifact(n).display().to_string()).collect();
    let (prompt, greedy) = &reference_prompts()[0];
    let out = std::process::Command::new(common::python())
        .arg(common::repo().join("tests/python/check_artifact.py"))
        .arg(serde_json::to_string(prompt).expect("json"))
        .args(&dirs)
        .output()
        .expect("python runs");
    assert!(out.status.success(), "check_artifact.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON line per artifact"))
        .collect();
    assert_eq!(lines.len(), 4);
    // The FP32 artifact's first two greedy tokens in Python's ONNX Runtime.
    let fp32: Vec<u32> =
        lines[0]["argmax"].as_array().expect("argmax").iter().map(|v| v.as_u64().expect("id") as u32).collect();
    assert_eq!(fp32, greedy[..2]);
}

#[test]
fn inspect_shows_an_artifact() {
    let dir = common::artifact("int4");
    let out = common::kiln(&["inspect", dir.to_str().expect("utf-8")]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "DequantizeLinear 121",
        "int4-b32-zp",
        "int8-pc-sym",
        "model.layers.29.mlp.down_proj.weight",
        "in model.layers.29.self_attn.qkv_proj.weight[768..960]",
        "past_key_values.0.key",
    ] {
        assert!(text.contains(want), "inspect output lacks {want:?}:\n{text}");
    }
}

#[test]
fn python_tokenizers_loads_the_artifact_tokenizer() {
    let dir = common::artifact("fp32");
    let script = "import json, sys, tokenizers\n\
                  t = tokenizers.Tokenizer.from_file(sys.argv[1])\n\
                  print(json.dumps(t.encode(sys.argv[2], add_special_tokens=False).ids))";
    let text = "<|im_start|>user\nThe year 2026 had 365 days.<|im_end|>";
    let out = std::process::Command::new(common::python())
        .args(["-c", script, dir.join("tokenizer.json").to_str().expect("utf-8"), text])
        .output()
        .expect("python runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ids: Vec<u32> = serde_json::from_slice(&out.stdout).expect("ids");
    assert_eq!(ids, common::smollm2().tokenizer.encode(text).expect("encodes"));
}
