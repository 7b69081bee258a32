//! Export recipes: `export/NAME.toml` says which checkpoint to read, how to quantize each
//! tensor, and where the artifact goes.
//!
//! ```toml
//! description = "INT4 block 32 with zero points; embeddings INT8"
//! source = "default"          # the model `make setup` fetched, or a path (GGUF or HF dir)
//! # output = "export/out/int4" (default: export/out/<recipe file stem>)
//! # layers = 8                (keep only the first N layers: a cheap draft model)
//! # max_context = 8192        (default: the model's max_position_embeddings, at most 8192)
//!
//! [quant]
//! method = "rtn"
//! precision = "int4"          # fp32 | fp16 | int8 | int4 | nf4 (blocked, symmetric)
//! layout = "blocked"          # per-tensor | per-channel | blocked
//! block_size = 32
//! symmetric = false           # false: unsigned codes with zero points
//! clip_search = false
//!
//! # method = "gptq" also reads [quant.gptq] (damp = 0.01, block = 128, act_order = false),
//! # method = "awq" reads [quant.awq] (grid = 20, samples = 512, clip = true, activations =
//! # false: score the scales with the inputs rounded to int8 as served), method =
//! # "awq+gptq" both (AWQ's scales folded, then GPTQ; AWQ's clip unused); all read
//! # [quant.calibration] (windows = 32, window = 512, corpus = a directory or a list of
//! # them, the windows shared evenly (default: the fetched plays and prose),
//! # exclude = ["hamlet_gut.txt", "alice29.txt"], the evaluation texts).
//!
//! [[quant.override]]          # later overrides win; fields left out keep the base values
//! match = "model.embed_tokens.weight"   # glob over Hugging Face names (* and ?)
//! precision = "int8"
//! layout = "per-channel"
//! symmetric = true
//!
//! # bits_per_weight = 6.0     (automatic mixed precision: a scheme per matrix from the
//! #   sensitivity table, the least predicted loss within the budget; overrides pin theirs;
//! #   [quant.sensitivity] windows = 2 of tokens = 256 measured, validate = false)
//!
//! [check]                     # thresholds for `kiln check`
//! max_ppl_increase = 0.03
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ExportError;
use crate::quant::awq::AwqOptions;
use crate::quant::calibrate::CalibrationOptions;
use crate::quant::gptq::GptqOptions;
use crate::quant::sensitivity::SensitivityOptions;
use crate::quant::{Layout, Method, Precision, Scheme};

/// The longest context a default export covers (rotary tables are sized to it).
pub const DEFAULT_MAX_CONTEXT: usize = 8192;

/// A parsed recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// One line for listings.
    #[serde(default)]
    pub description: String,
    /// `"default"` or a path to a GGUF file or Hugging Face directory.
    pub source: String,
    /// Output directory (default `export/out/<name>`).
    #[serde(default)]
    pub output: Option<PathBuf>,
    /// Keep only the first N layers.
    #[serde(default)]
    pub layers: Option<usize>,
    /// Positions the graph supports (default: the model's, at most 8192).
    #[serde(default)]
    pub max_context: Option<usize>,
    /// How weights are quantized.
    pub quant: QuantRecipe,
    /// Thresholds for `kiln check`.
    #[serde(default)]
    pub check: CheckThresholds,
}

/// The `[quant]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantRecipe {
    /// Algorithm.
    #[serde(default)]
    pub method: Method,
    /// Base precision.
    pub precision: Precision,
    /// Base layout (integer precisions).
    #[serde(default = "default_layout")]
    pub layout: Layout,
    /// Block size for `layout = "blocked"`.
    #[serde(default = "default_block")]
    pub block_size: usize,
    /// Symmetric codes (true) or zero points (false).
    #[serde(default = "default_true")]
    pub symmetric: bool,
    /// Per-group clipping search.
    #[serde(default)]
    pub clip_search: bool,
    /// Per-tensor overrides, applied in order.
    #[serde(default, rename = "override")]
    pub overrides: Vec<Override>,
    /// GPTQ settings (`method = "gptq"` or `"awq+gptq"`).
    #[serde(default)]
    pub gptq: GptqOptions,
    /// AWQ settings (`method = "awq"` or `"awq+gptq"`).
    #[serde(default)]
    pub awq: AwqOptions,
    /// Calibration text (every method but `"rtn"`, and mixed precision).
    #[serde(default)]
    pub calibration: CalibrationOptions,
    /// Automatic mixed precision: each matrix's scheme is chosen from the sensitivity table
    /// to minimize the predicted loss within this many bits per weight; matrices an
    /// override matches keep the override's scheme.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits_per_weight: Option<f64>,
    /// How the sensitivity table is measured (`bits_per_weight` only).
    #[serde(default)]
    pub sensitivity: SensitivityOptions,
}

/// One `[[quant.override]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    /// Glob over Hugging Face tensor names (`*` any run, `?` one character).
    #[serde(rename = "match")]
    pub pattern: String,
    /// Replacement precision.
    #[serde(default)]
    pub precision: Option<Precision>,
    /// Replacement layout.
    #[serde(default)]
    pub layout: Option<Layout>,
    /// Replacement block size.
    #[serde(default)]
    pub block_size: Option<usize>,
    /// Replacement symmetry.
    #[serde(default)]
    pub symmetric: Option<bool>,
    /// Replacement clipping search.
    #[serde(default)]
    pub clip_search: Option<bool>,
}

/// The `[check]` table: what `kiln check` requires of the artifact's quality.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckThresholds {
    /// Largest relative perplexity increase over the FP32 baseline (0.03 = 3%).
    #[serde(default)]
    pub max_ppl_increase: Option<f64>,
    /// Largest mean KL(fp32 ‖ quantized) per token.
    #[serde(default)]
    pub max_mean_kl: Option<f64>,
    /// Smallest top-1 agreement with the baseline (0..1).
    #[serde(default)]
    pub min_top1: Option<f64>,
}

fn default_layout() -> Layout {
    Layout::PerChannel
}
fn default_block() -> usize {
    32
}
fn default_true() -> bool {
    true
}

impl Recipe {
    /// Reads and validates a recipe file.
    pub fn load(path: &Path) -> Result<Recipe, ExportError> {
        let text = std::fs::read_to_string(path).map_err(|source| ExportError::Io { path: path.into(), source })?;
        Self::parse(path, &text)
    }

    /// Parses and validates recipe text; `path` is for messages.
    pub fn parse(path: &Path, text: &str) -> Result<Recipe, ExportError> {
        let recipe: Recipe =
            toml::from_str(text).map_err(|e| ExportError::Recipe { path: path.into(), reason: e.to_string() })?;
        recipe.validate().map_err(|reason| ExportError::Recipe { path: path.into(), reason })?;
        Ok(recipe)
    }

    /// Checks the fields together; `Err` names the field.
    pub(super) fn validate(&self) -> Result<(), String> {
        if self.layers == Some(0) {
            return Err("layers = 0: keep at least one layer".into());
        }
        if self.max_context == Some(0) {
            return Err("max_context = 0".into());
        }
        if self.quant.method.uses_gptq() {
            let (g, c) = (&self.quant.gptq, &self.quant.calibration);
            if !(g.damp > 0.0 && g.damp < 1.0) {
                return Err(format!("[quant.gptq] damp = {} must lie in (0, 1)", g.damp));
            }
            if g.block == 0 || c.windows == 0 || c.window < 2 {
                return Err("[quant.gptq] block and [quant.calibration] windows/window must be positive".into());
            }
        }
        if self.quant.method.rescales_weights() {
            let (a, c) = (&self.quant.awq, &self.quant.calibration);
            if a.grid == 0 || a.samples == 0 || c.windows == 0 || c.window < 2 {
                return Err("[quant.awq] grid/samples and [quant.calibration] windows/window must be positive".into());
            }
        }
        if let Some(b) = self.quant.bits_per_weight {
            if !(b.is_finite() && (1.0..=32.0).contains(&b)) {
                return Err(format!("[quant] bits_per_weight = {b} must lie in [1, 32]"));
            }
            let c = &self.quant.calibration;
            if self.quant.sensitivity.windows == 0 || c.windows == 0 || c.window < 2 {
                return Err(
                    "[quant.sensitivity] windows and [quant.calibration] windows/window must be positive".into()
                );
            }
        }
        self.base().validate().map_err(|e| format!("[quant]: {e}"))?;
        for (i, o) in self.quant.overrides.iter().enumerate() {
            if o.pattern.is_empty() {
                return Err(format!("[[quant.override]] #{}: match is empty", i + 1));
            }
            o.apply(self.base())
                .validate()
                .map_err(|e| format!("[[quant.override]] #{} ({}): {e}", i + 1, o.pattern))?;
        }
        Ok(())
    }

    /// The base scheme of `[quant]`.
    pub fn base(&self) -> Scheme {
        let q = &self.quant;
        Scheme {
            precision: q.precision,
            layout: q.layout,
            block_size: q.block_size,
            symmetric: q.symmetric,
            clip_search: q.clip_search,
        }
    }

    /// The scheme an override gives `name`, if any matches (what mixed precision keeps).
    pub fn pinned(&self, name: &str) -> Option<Scheme> {
        self.quant.overrides.iter().any(|o| glob_match(&o.pattern, name)).then(|| self.scheme_for(name))
    }

    /// The scheme of tensor `name`: the base, then every matching override in order.
    pub fn scheme_for(&self, name: &str) -> Scheme {
        self.quant.overrides.iter().filter(|o| glob_match(&o.pattern, name)).fold(self.base(), |s, o| o.apply(s))
    }
}

impl Override {
    fn apply(&self, s: Scheme) -> Scheme {
        Scheme {
            precision: self.precision.unwrap_or(s.precision),
            layout: self.layout.unwrap_or(s.layout),
            block_size: self.block_size.unwrap_or(s.block_size),
            symmetric: self.symmetric.unwrap_or(s.symmetric),
            clip_search: self.clip_search.unwrap_or(s.clip_search),
        }
    }
}

/// Matches `name` against a glob with `*` (any run of characters) and `?` (one).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Iterative matching with backtracking to the last star.
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("model.layers.*.mlp.*", "model.layers.3.mlp.up_proj.weight"));
        assert!(glob_match("model.layers.?.self_attn.*", "model.layers.0.self_attn.q_proj.weight"));
        assert!(!glob_match("model.layers.?.self_attn.*", "model.layers.10.self_attn.q_proj.weight"));
        assert!(glob_match("*", "lm_head.weight"));
        assert!(!glob_match("lm_head", "lm_head.weight"));
    }

    #[test]
    fn overrides_apply_in_order() {
        let r = Recipe::parse(
            Path::new("r.toml"),
            r#"
            source = "default"
            [quant]
            precision = "int4"
            layout = "blocked"
            symmetric = false
            [[quant.override]]
            match = "model.layers.0.*"
            precision = "int8"
            layout = "per-channel"
            [[quant.override]]
            match = "*.q_proj.weight"
            symmetric = true
            "#,
        )
        .expect("parses");
        assert_eq!(r.scheme_for("model.layers.1.mlp.up_proj.weight").label(), "int4-b32-zp");
        assert_eq!(r.scheme_for("model.layers.0.mlp.up_proj.weight").label(), "int8-pc-zp");
        assert_eq!(r.scheme_for("model.layers.0.self_attn.q_proj.weight").label(), "int8-pc-sym");
        assert_eq!(r.scheme_for("model.layers.5.self_attn.q_proj.weight").label(), "int4-b32-sym");
    }

    #[test]
    fn typos_and_nonsense_are_named() {
        let err = Recipe::parse(Path::new("bad.toml"), "source = \"default\"\n[quant]\nprecission = \"int8\"\n")
            .expect_err("typo");
        let msg = err.to_string();
        assert!(msg.contains("bad.toml") && msg.contains("precission"), "{msg}");
        let err = Recipe::parse(
            Path::new("bad.toml"),
            "source = \"default\"\n[quant]\nprecision = \"int4\"\nlayout = \"blocked\"\nblock_size = 33\n",
        )
        .expect_err("block size");
        assert!(err.to_string().contains("block_size = 33"), "{err}");
        let err = Recipe::parse(Path::new("bad.toml"), "source = \"default\"\n[quant]\nprecision = \"int3\"\n")
            .expect_err("int3");
        assert!(err.to_string().contains("int3"), "{err}");
    }
}
