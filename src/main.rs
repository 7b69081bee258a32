//! `kiln` command line: parses arguments and calls the library.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use kiln::model::gguf::GgufFile;
use kiln::model::reference::Reference;
use kiln::model::tokenizer::TextStream;
use kiln::model::{default_model_path, Model};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Quantize, export, check and serve causal language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a model's architecture, tensors, sizes and tokenizer.
    Inspect {
        /// A GGUF file or a Hugging Face directory (default: the model `make setup` fetched).
        model: Option<PathBuf>,
        /// Also write the model's tokenizer as a Hugging Face tokenizer.json here.
        #[arg(long, value_name = "PATH")]
        write_tokenizer: Option<PathBuf>,
    },
    /// Print the token ids of a text.
    Tokenize {
        /// A GGUF file or a Hugging Face directory.
        model: PathBuf,
        /// The text.
        text: String,
        /// Print one JSON array of ids and nothing else.
        #[arg(long)]
        json: bool,
    },
    /// Generate a greedy continuation of a prompt, streaming it to the terminal.
    Generate {
        /// A GGUF file or a Hugging Face directory (default: the model `make setup` fetched).
        model: Option<PathBuf>,
        /// Which implementation runs the model.
        #[arg(long, value_enum, default_value_t = Backend::Reference)]
        backend: Backend,
        /// The prompt text.
        #[arg(long)]
        prompt: String,
        /// Maximum number of new tokens.
        #[arg(short = 'n', long, default_value_t = 32)]
        max_tokens: usize,
        /// Print one JSON object (token_ids, text, finish_reason, timings) instead.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    /// kiln's native f32 forward pass (ndarray).
    Reference,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Inspect {
            model,
            write_tokenizer,
        } => inspect(model.unwrap_or_else(default_model_path), write_tokenizer),
        Command::Tokenize { model, text, json } => tokenize(model, &text, json),
        Command::Generate {
            model,
            backend: Backend::Reference,
            prompt,
            max_tokens,
            json,
        } => generate(
            model.unwrap_or_else(default_model_path),
            &prompt,
            max_tokens,
            json,
        ),
    }
}

fn load(path: &Path) -> Result<Model> {
    if !path.exists() {
        bail!(
            "{}: no such file or directory (run `make setup` to fetch the default model)",
            path.display()
        );
    }
    Ok(Model::load(path)?)
}

fn inspect(path: PathBuf, write_tokenizer: Option<PathBuf>) -> Result<()> {
    let t0 = Instant::now();
    let model = load(&path)?;
    let load_s = t0.elapsed().as_secs_f64();
    let c = &model.config;
    println!("model        {}", path.display());
    println!(
        "source       {:?}, loaded and dequantized to f32 in {load_s:.2} s",
        model.source
    );
    println!(
        "architecture {} ({})",
        serde_json::to_string(&c.architecture)?.trim_matches('"'),
        c.architecture.hf_class()
    );
    println!(
        "shape        {} layers, hidden {}, ffn {}, heads {} / kv {} × {}, vocab {}",
        c.num_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.vocab_size
    );
    println!(
        "             rope θ {}, rms eps {:e}, context {}, tied embeddings {}, qkv bias {}, sliding window {}",
        c.rope_theta,
        c.rms_norm_eps,
        c.max_position_embeddings,
        c.tie_word_embeddings,
        c.attention_bias,
        c.sliding_window.map_or("none".to_string(), |w| w.to_string())
    );
    println!(
        "parameters   {} ({:.1} MB as f32)",
        c.parameter_count(),
        c.parameter_count() as f64 * 4.0 / 1e6
    );
    if path.is_file() {
        let file = GgufFile::open(&path)?;
        let mut by_type: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
        for t in &file.tensors {
            let e = by_type.entry(t.ty.name()).or_default();
            e.0 += 1;
            e.1 += t.size;
        }
        println!(
            "gguf         version {}, {} tensors, {} metadata keys",
            file.version,
            file.tensors.len(),
            file.metadata.len()
        );
        for (ty, (n, bytes)) in by_type {
            println!("  {ty:<6} {n:>4} tensors {:>10.2} MB", bytes as f64 / 1e6);
        }
    } else {
        println!("tensors      {} matrices", model.weights.matrices().len());
    }
    println!("tokenizer    {}", model.tokenizer.summary());
    if let Some(out) = write_tokenizer {
        let json = model.tokenizer.to_json()?;
        std::fs::write(&out, json).with_context(|| format!("writing {}", out.display()))?;
        println!("wrote        {}", out.display());
    }
    Ok(())
}

fn tokenize(path: PathBuf, text: &str, json: bool) -> Result<()> {
    let model = load(&path)?;
    let ids = model.tokenizer.encode(text)?;
    if json {
        println!("{}", serde_json::to_string(&ids)?);
    } else {
        let tok = model.tokenizer.inner();
        for id in ids {
            println!("{id:>6} {:?}", tok.id_to_token(id).unwrap_or_default());
        }
    }
    Ok(())
}

fn generate(path: PathBuf, prompt: &str, max_tokens: usize, json: bool) -> Result<()> {
    let model = load(&path)?;
    let tok = &model.tokenizer;
    let prompt_ids = tok.encode_prompt(prompt)?;
    let reference = Reference::new(&model);
    let mut stream = TextStream::default();
    let mut stdout = std::io::stdout();
    let t0 = Instant::now();
    let mut first_token_at = None;
    let mut stream_err = None;
    let ids = reference.greedy(&prompt_ids, max_tokens, &tok.eos_ids, |id| {
        first_token_at.get_or_insert_with(|| t0.elapsed());
        if json {
            return;
        }
        match stream.step(tok, id) {
            Ok(Some(delta)) => {
                print!("{delta}");
                let _ = stdout.flush();
            }
            Ok(None) => {}
            Err(e) => stream_err = Some(e),
        }
    })?;
    if let Some(e) = stream_err {
        return Err(e.into());
    }
    let total = t0.elapsed().as_secs_f64();
    let ttft = first_token_at.map_or(0.0, |d| d.as_secs_f64());
    let decode_tps = if ids.len() > 1 {
        (ids.len() - 1) as f64 / (total - ttft)
    } else {
        0.0
    };
    let finish = if ids.last().is_some_and(|id| tok.eos_ids.contains(id)) {
        "eos"
    } else {
        "length"
    };
    if json {
        let out = serde_json::json!({
            "token_ids": ids,
            "text": tok.decode(&ids)?,
            "finish_reason": finish,
            "prompt_tokens": prompt_ids.len(),
            "completion_tokens": ids.len(),
            "backend": "reference",
            "timings": {
                "ttft_s": ttft,
                "prefill_tokens_per_s": prompt_ids.len() as f64 / ttft,
                "decode_tokens_per_s": decode_tps,
                "total_s": total,
            }
        });
        println!("{out}");
    } else {
        println!();
        eprintln!(
            "[{} prompt + {} new tokens, finish {finish}; TTFT {:.0} ms ({:.0} prompt tokens/s), decode {:.1} tokens/s]",
            prompt_ids.len(),
            ids.len(),
            ttft * 1e3,
            prompt_ids.len() as f64 / ttft,
            decode_tps
        );
    }
    Ok(())
}
