//! `kiln export`: recipe → artifact directory, written atomically.
//!
//! The artifact is built in a temporary directory beside the output and renamed into
//! place only when every file is complete and synced, so a failed export (bad tensor,
//! full disk, interrupted write) leaves the previous artifact, or nothing, behind.
//! An artifact whose manifest carries the same build hash (kiln version and executable,
//! recipe, source sha256) is up to date and skipped.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::decoder::{self, DecoderSource, GraphForm, TensorReport};
use super::manifest::{self, IoSpec, Manifest, Sizes, SourceInfo, TokenizerInfo};
use super::recipe::{Recipe, DEFAULT_MAX_CONTEXT};
use super::ExportError;
use crate::model::{default_model_path, Model, SourceKind};
use crate::quant::awq::{awq_model, awq_scaled};
use crate::quant::calibrate::{calibration_windows, default_corpora, gptq_model, CalibrationOptions};
use crate::quant::sensitivity::{SensitivityOptions, SensitivityTable};
use crate::quant::{mixed, sensitivity, Method};

/// How to run an export.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// Rebuild even when the artifact is up to date.
    pub force: bool,
    /// Write here instead of the recipe's output.
    pub output: Option<PathBuf>,
    /// Mixed precision within this many bits per weight (replaces the recipe's).
    pub bits_per_weight: Option<f64>,
}

/// What an export did.
#[derive(Debug)]
pub enum ExportOutcome {
    /// A new artifact was written.
    Built {
        /// Artifact directory.
        dir: PathBuf,
        /// Its manifest.
        manifest: Box<Manifest>,
        /// Wall time of the export.
        seconds: f64,
    },
    /// The artifact was already up to date.
    UpToDate {
        /// Artifact directory.
        dir: PathBuf,
    },
}

/// Progress events of an export, for a progress bar.
pub trait Progress {
    /// A phase of `total` steps begins: `what` is "GPTQ calibration" or "AWQ calibration"
    /// (one step per layer), or "weights" (one step per stored matrix).
    fn start(&mut self, what: &str, total: usize);
    /// One matrix was stored.
    fn tensor(&mut self, report: &TensorReport);
    /// One layer was calibrated.
    fn layer(&mut self) {}
}

/// Progress that shows nothing.
pub struct Quiet;

impl Progress for Quiet {
    fn start(&mut self, _: &str, _: usize) {}
    fn tensor(&mut self, _: &TensorReport) {}
}

/// Exports the recipe at `recipe_path`.
pub fn export_recipe(
    recipe_path: &Path,
    opts: &ExportOptions,
    progress: &mut dyn Progress,
) -> Result<ExportOutcome, ExportError> {
    let mut recipe = Recipe::load(recipe_path)?;
    if let Some(b) = opts.bits_per_weight {
        recipe.quant.bits_per_weight = Some(b);
        recipe.validate().map_err(|reason| ExportError::Recipe { path: recipe_path.into(), reason })?;
    }
    let name = recipe_path
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| ExportError::Recipe { path: recipe_path.into(), reason: "file name is not valid UTF-8".into() })?
        .to_string();
    let out = match (&opts.output, &recipe.output) {
        (Some(o), _) | (None, Some(o)) => o.clone(),
        (None, None) => recipe_path.parent().unwrap_or(Path::new(".")).join("out").join(&name),
    };
    let source = if recipe.source == "default" { default_model_path() } else { PathBuf::from(&recipe.source) };
    export(&recipe, &name, &source, &out, opts.force, progress)
}

/// Exports `recipe` (named `name`) from `source` into `out`.
pub fn export(
    recipe: &Recipe,
    name: &str,
    source: &Path,
    out: &Path,
    force: bool,
    progress: &mut dyn Progress,
) -> Result<ExportOutcome, ExportError> {
    let t0 = Instant::now();
    let source_sha = hash_source(source)?;
    let build_hash = build_hash(recipe, &source_sha)?;
    if !force && up_to_date(out, &build_hash) {
        return Ok(ExportOutcome::UpToDate { dir: out.to_path_buf() });
    }
    let model = Model::load(source)?;
    let mut config = model.config.clone();
    if let Some(n) = recipe.layers {
        if n > config.num_layers {
            return Err(ExportError::Recipe {
                path: PathBuf::from(name),
                reason: format!("layers = {n}, but the model has {}", config.num_layers),
            });
        }
        config.num_layers = n;
    }
    let max_context = recipe.max_context.unwrap_or(config.max_position_embeddings.min(DEFAULT_MAX_CONTEXT));
    let calibration = || -> Result<Vec<Vec<u32>>, ExportError> {
        let cal = &recipe.quant.calibration;
        let corpora = if cal.corpus.is_empty() { default_corpora() } else { cal.corpus.clone() };
        calibration_windows(&model.tokenizer, &corpora, cal)
            .map_err(|e| ExportError::Recipe { path: PathBuf::from(name), reason: format!("calibration: {e}") })
    };
    let calibrated =
        |method: &str, e: String| ExportError::Recipe { path: PathBuf::from(name), reason: format!("{method}: {e}") };
    let plan = match recipe.quant.bits_per_weight {
        None => None,
        Some(bpw) => {
            let windows = calibration()?;
            progress.start("sensitivity", 2 + 7 * config.num_layers);
            let sens = &recipe.quant.sensitivity;
            let table =
                sensitivity::cached(&source_sha, &config, &model.weights, &windows, sens, &mut |_, _| progress.layer())
                    .map_err(|e| calibrated("sensitivity", e))?;
            let plan = mixed::plan(&table, &config, bpw, recipe.quant.method.uses_gptq(), &|n| recipe.pinned(n))
                .map_err(|e| calibrated("mixed precision", e))?;
            Some((plan, windows))
        }
    };
    let scheme_of = |n: &str| plan.as_ref().and_then(|(p, _)| p.scheme_for(n)).unwrap_or_else(|| recipe.scheme_for(n));
    match recipe.quant.method {
        Method::Rtn => {}
        Method::Gptq => progress.start("GPTQ calibration", config.num_layers),
        Method::Awq => progress.start("AWQ calibration", config.num_layers),
        Method::AwqGptq => progress.start("AWQ scales, then GPTQ", 2 * config.num_layers),
    }
    let mut on_layer = |_: usize, _: usize| progress.layer();
    let (weights, prequantized) = match recipe.quant.method {
        Method::Rtn => (None, HashMap::new()),
        Method::Gptq => {
            let windows = calibration()?;
            let q = gptq_model(&config, &model.weights, &windows, &scheme_of, &recipe.quant.gptq, &mut on_layer)
                .map_err(|e| calibrated("GPTQ", e))?;
            (None, q)
        }
        Method::Awq => {
            let windows = calibration()?;
            let (w, q) = awq_model(&config, &model.weights, &windows, &scheme_of, &recipe.quant.awq, &mut on_layer)
                .map_err(|e| calibrated("AWQ", e))?;
            (Some(w), q)
        }
        Method::AwqGptq => {
            let windows = calibration()?;
            let w = awq_scaled(&config, &model.weights, &windows, &scheme_of, &recipe.quant.awq, &mut on_layer)
                .map_err(|e| calibrated("AWQ", e))?;
            let q = gptq_model(&config, &w, &windows, &scheme_of, &recipe.quant.gptq, &mut on_layer)
                .map_err(|e| calibrated("GPTQ", e))?;
            (Some(w), q)
        }
    };
    let weights = weights.as_ref().unwrap_or(&model.weights);
    let mixed_precision = match &plan {
        None => None,
        Some((plan, windows)) => {
            let mut plan = plan.clone();
            let chosen =
                mixed::reconstructed(&plan, weights, &prequantized).map_err(|e| calibrated("mixed precision", e))?;
            let kl = sensitivity::model_kl(&config, &model.weights, &chosen, windows, &recipe.quant.sensitivity)
                .map_err(|e| calibrated("mixed precision", e))?;
            plan.measured_kl = Some(kl);
            Some(plan)
        }
    };
    progress.start("weights", 2 + 7 * config.num_layers);
    let portable =
        DecoderSource { config: &config, weights, max_context, prequantized: &prequantized, form: GraphForm::Portable };
    let (graph, tensors) = decoder::build(&portable, &scheme_of, &mut |r| progress.tensor(r))?;

    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|source| ExportError::Io { path: parent.clone(), source })?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.tmp-"))
        .tempdir_in(&parent)
        .map_err(|source| ExportError::Io { path: parent.clone(), source })?;
    let (graph_path, data_path) = (tmp.path().join(manifest::MODEL_FILE), tmp.path().join(manifest::DATA_FILE));
    let (mut graph_out, mut data_out) = (SyncedFile::create(&graph_path)?, SyncedFile::create(&data_path)?);
    let written = graph
        .write(name, manifest::DATA_FILE, &mut graph_out.writer, &mut data_out.writer)
        .map_err(|source| ExportError::Io { path: tmp.path().to_path_buf(), source })?;
    graph_out.finish()?;
    data_out.finish()?;
    let by_dtype = graph.bytes_by_dtype();
    drop(graph);
    // The serving graph quantizes the same weights the same way: its initializers are the
    // portable graph's, found in the data file already written.
    let serving = DecoderSource { form: GraphForm::Serving, ..portable };
    let (serving, _) = decoder::build(&serving, &scheme_of, &mut |_| {})?;
    let serving_path = tmp.path().join(manifest::SERVING_FILE);
    let mut serving_out = SyncedFile::create(&serving_path)?;
    let serving_bytes = serving
        .write_graph(name, manifest::DATA_FILE, &written.placed, &mut serving_out.writer)
        .map_err(|source| ExportError::Io { path: serving_path.clone(), source })?;
    serving_out.finish()?;
    drop(serving);
    let tok_json = model.tokenizer.to_json().map_err(|e| ExportError::Internal(e.to_string()))?;
    write_file(&tmp.path().join(manifest::TOKENIZER_FILE), tok_json.as_bytes())?;
    let manifest = Manifest {
        format_version: manifest::FORMAT_VERSION,
        kiln_version: env!("CARGO_PKG_VERSION").into(),
        name: name.into(),
        build_hash,
        source: SourceInfo {
            path: source.to_path_buf(),
            sha256: source_sha,
            kind: match model.source {
                SourceKind::Gguf => "gguf".into(),
                SourceKind::HfDir => "hf-dir".into(),
            },
        },
        config: config.clone(),
        max_context,
        recipe: recipe.clone(),
        io: IoSpec {
            inputs: decoder::input_names(GraphForm::Portable, config.num_layers),
            outputs: decoder::output_names(config.num_layers),
            kv_layout: "[batch, kv_heads, past, head_dim]".into(),
        },
        serving_io: IoSpec {
            inputs: decoder::input_names(GraphForm::Serving, config.num_layers),
            outputs: decoder::output_names(config.num_layers),
            kv_layout: "[batch, kv_heads, max_sequence_length, head_dim], one buffer bound as past and present \
                        (CUDA, TensorRT); CPU sessions page it: past and present are a block pool \
                        [kv_heads, kv_blocks, 16, head_dim] and the input block_table [batch, blocks_per_row] \
                        int32 names each row's blocks"
                .into(),
        },
        tokenizer: TokenizerInfo {
            bos_id: model.tokenizer.bos_id,
            eos_ids: model.tokenizer.eos_ids.clone(),
            add_bos: model.tokenizer.add_bos,
            chat_template: model.tokenizer.chat_template.clone(),
            vocab_sha256: model.tokenizer.vocab_sha256(),
        },
        tensors,
        sizes: Sizes {
            onnx_bytes: written.graph_bytes,
            serving_bytes,
            data_bytes: written.data_bytes,
            by_dtype: by_dtype.into_iter().map(|(d, n)| (format!("{d:?}").to_lowercase(), n)).collect(),
        },
        mixed_precision,
    };
    let json = serde_json::to_string_pretty(&manifest).map_err(|e| ExportError::Internal(e.to_string()))?;
    write_file(&tmp.path().join(manifest::MANIFEST_FILE), json.as_bytes())?;
    replace_dir(tmp, out)?;
    Ok(ExportOutcome::Built {
        dir: out.to_path_buf(),
        manifest: Box::new(manifest),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The sensitivity table of the model at `source` on the default calibration text, from the
/// cache when measured before (what `kiln inspect --sensitivity` prints and a
/// `bits_per_weight` recipe with default settings chooses from).
pub fn source_sensitivity(
    source: &Path,
    opts: &SensitivityOptions,
    progress: &mut dyn Progress,
) -> Result<SensitivityTable, ExportError> {
    let source_sha = hash_source(source)?;
    let model = Model::load(source)?;
    let cal = CalibrationOptions::default();
    let reason = |e: String| ExportError::Recipe { path: source.to_path_buf(), reason: format!("sensitivity: {e}") };
    let windows = calibration_windows(&model.tokenizer, &default_corpora(), &cal).map_err(reason)?;
    progress.start("sensitivity", 2 + 7 * model.config.num_layers);
    sensitivity::cached(&source_sha, &model.config, &model.weights, &windows, opts, &mut |_, _| progress.layer())
        .map_err(reason)
}

fn up_to_date(out: &Path, build_hash: &str) -> bool {
    let files = [manifest::MODEL_FILE, manifest::SERVING_FILE, manifest::DATA_FILE, manifest::TOKENIZER_FILE];
    files.iter().all(|f| out.join(f).is_file()) && Manifest::read(out).is_ok_and(|m| m.build_hash == build_hash)
}

/// A file written through a buffer, flushed and synced to disk by [`finish`](Self::finish).
struct SyncedFile {
    path: PathBuf,
    writer: BufWriter<File>,
}

impl SyncedFile {
    fn create(path: &Path) -> Result<Self, ExportError> {
        let file = File::create(path).map_err(|source| ExportError::Io { path: path.to_path_buf(), source })?;
        Ok(SyncedFile { path: path.to_path_buf(), writer: BufWriter::with_capacity(1 << 20, file) })
    }

    fn finish(self) -> Result<(), ExportError> {
        let path = self.path;
        let file =
            self.writer.into_inner().map_err(|e| ExportError::Io { path: path.clone(), source: e.into_error() })?;
        file.sync_all().map_err(|source| ExportError::Io { path, source })
    }
}

/// Creates `path` with `bytes`, synced.
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    let mut f = SyncedFile::create(path)?;
    f.writer.write_all(bytes).map_err(|source| ExportError::Io { path: path.to_path_buf(), source })?;
    f.finish()
}

/// Moves the finished temporary directory to `out`, replacing what was there.
fn replace_dir(tmp: tempfile::TempDir, out: &Path) -> Result<(), ExportError> {
    let io = |source| ExportError::Io { path: out.to_path_buf(), source };
    let staged = tmp.keep();
    if out.exists() {
        let old = staged.with_file_name(format!(
            ".{}.old-{}",
            out.file_name().and_then(|s| s.to_str()).unwrap_or("artifact"),
            std::process::id()
        ));
        std::fs::rename(out, &old).map_err(io)?;
        if let Err(e) = std::fs::rename(&staged, out) {
            // Put the previous artifact back before reporting.
            let _ = std::fs::rename(&old, out);
            let _ = std::fs::remove_dir_all(&staged);
            return Err(io(e));
        }
        std::fs::remove_dir_all(&old).map_err(io)?;
    } else if let Err(e) = std::fs::rename(&staged, out) {
        let _ = std::fs::remove_dir_all(&staged);
        return Err(io(e));
    }
    Ok(())
}

/// sha256 of a file, or of every file of a directory (names and contents, in name order).
pub fn hash_source(path: &Path) -> Result<String, ExportError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| ExportError::Io { path: p, source }
    };
    let mut h = Sha256::new();
    let feed = |p: &Path, h: &mut Sha256| -> Result<(), ExportError> {
        let mut f = File::open(p).map_err(io(p))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(io(p))?;
            if n == 0 {
                return Ok(());
            }
            h.update(&buf[..n]);
        }
    };
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(io(path))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for f in files {
            h.update(f.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
            feed(&f, &mut h)?;
        }
    } else {
        feed(path, &mut h)?;
    }
    Ok(hex(&h.finalize()))
}

fn build_hash(recipe: &Recipe, source_sha: &str) -> Result<String, ExportError> {
    let recipe_json = serde_json::to_string(recipe).map_err(|e| ExportError::Internal(e.to_string()))?;
    let mut h = Sha256::new();
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update([0]);
    // The exporting program itself: a rebuilt kiln rebuilds its artifacts.
    if let Ok(exe) = std::env::current_exe() {
        h.update(hash_source(&exe)?.as_bytes());
    }
    h.update([0]);
    h.update(recipe_json.as_bytes());
    h.update([0]);
    h.update(source_sha.as_bytes());
    Ok(hex(&h.finalize()))
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
