//! The prompt sets `kiln bench --speculative` decodes.
//!
//! Open-ended prompts ask the model to continue freely: nothing in them predicts the output.
//! Grounded prompts hand the model a text and ask it to quote, summarize, answer from or edit
//! it, so much of the output repeats the prompt: the workloads prompt lookup is made for.
//! Their texts are passages of the Shakespeare corpus (`make setup` fetches it) and source
//! code shipped in this repository.

use std::path::Path;

use crate::engine::Prompt;

/// A set of prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Prose, code, a list and a chat turn to continue freely.
    OpenEnded,
    /// Chat turns that quote, summarize, answer from or edit a text given in the prompt.
    Grounded,
}

impl Workload {
    /// Both sets, open-ended first.
    pub const ALL: [Workload; 2] = [Workload::OpenEnded, Workload::Grounded];

    /// The set's name as reports print it.
    pub fn name(self) -> &'static str {
        match self {
            Workload::OpenEnded => "open-ended",
            Workload::Grounded => "grounded",
        }
    }

    /// Decoding runs past the end-of-sequence token for open-ended prompts (their output has
    /// no natural end); a grounded request ends with its answer.
    pub fn ignore_eos(self) -> bool {
        self == Workload::OpenEnded
    }

    /// The prompts; grounded ones read their passages from the play texts in `corpus`.
    pub fn prompts(self, corpus: &Path) -> Result<Vec<Prompt>, String> {
        match self {
            Workload::OpenEnded => Ok(OPEN_ENDED.iter().map(|p| Prompt::Text((*p).into())).collect()),
            Workload::Grounded => grounded(corpus),
        }
    }
}

const OPEN_ENDED: [&str; 4] = [
    "Once upon a time",
    "def fibonacci(n):\n",
    "The planets of the solar system are Mercury, Venus, Earth,",
    "<|im_start|>user\nExplain why the sky is blue.<|im_end|>\n<|im_start|>assistant\n",
];

/// A passage of a play: `lines` lines of `file` from the first line that starts with `first`.
struct Passage {
    file: &'static str,
    first: &'static str,
    lines: usize,
}

/// One grounded task: a passage of the corpus or a piece of this repository's code, what to
/// do with it, and how the answer starts (written into the assistant's turn, as a client
/// prefills a reply to hold a small model to the format).
struct Task {
    text: Source,
    instruction: &'static str,
    answer_starts: &'static str,
}

enum Source {
    Play(Passage),
    /// Code from this repository: the lines of `file`'s text from the first that starts
    /// with `first` up to the first after it that starts with `end` (exclusive).
    Code {
        name: &'static str,
        file: &'static str,
        first: &'static str,
        end: &'static str,
    },
}

const TASKS: [Task; 5] = [
    Task {
        text: Source::Code {
            name: "scripts/fetch.py",
            file: include_str!("../../scripts/fetch.py"),
            first: "def sha256(",
            end: "def fetch(",
        },
        instruction: "Add type hints to the Python code above and return the whole code.",
        answer_starts: "```python\ndef sha256(path",
    },
    Task {
        text: Source::Code {
            name: "src/bench/speculative.rs",
            file: include_str!("speculative.rs"),
            first: "/// Expected speedup of K drafts",
            end: "/// Runs the measurement",
        },
        instruction:
            "Rename the parameter `alpha` of the Rust function above to `acceptance` and return the whole function.",
        answer_starts: "```rust\n",
    },
    Task {
        text: Source::Play(Passage { file: "hamlet_gut.txt", first: "To be, or not to be", lines: 14 }),
        instruction: "Quote the lines of this passage that speak of sleep.",
        answer_starts: "",
    },
    Task {
        text: Source::Play(Passage { file: "macbeth_gut.txt", first: "She should have died hereafter", lines: 12 }),
        instruction: "Copy the passage above exactly, line by line.",
        answer_starts: "She should have died hereafter;\n",
    },
    Task {
        text: Source::Play(Passage { file: "julius_caesar_gut.txt", first: "Friends, Romans, countrymen", lines: 20 }),
        instruction: "Summarize Antony's speech above, quoting its most important lines.",
        answer_starts: "",
    },
];

/// The grounded prompts in the default model's chat format (ChatML, as the open-ended chat
/// turn): the text and the instruction as the user's turn, the assistant's turn opened with
/// the answer's start.
fn grounded(corpus: &Path) -> Result<Vec<Prompt>, String> {
    TASKS
        .iter()
        .map(|task| {
            let text = match &task.text {
                Source::Play(p) => {
                    let path = corpus.join(p.file);
                    let play = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                    excerpt(&play, p.first, |_, n| n >= p.lines)
                        .ok_or_else(|| format!("{}: no line starts with {:?}", path.display(), p.first))?
                }
                Source::Code { name, file, first, end } => excerpt(file, first, |line, _| line.starts_with(end))
                    .ok_or_else(|| format!("{name}: no line starts with {first:?}"))?,
            };
            Ok(Prompt::Text(format!(
                "<|im_start|>user\n{}\n\n{}<|im_end|>\n<|im_start|>assistant\n{}",
                text.trim_end(),
                task.instruction,
                task.answer_starts
            )))
        })
        .collect()
}

/// The lines of `text` from the first that starts with `first` until `done(line, taken)` holds
/// for a line (which is left out), or to the end.
fn excerpt(text: &str, first: &str, done: impl Fn(&str, usize) -> bool) -> Option<String> {
    let mut lines = text.lines().skip_while(|l| !l.starts_with(first)).peekable();
    lines.peek()?;
    let mut out = String::new();
    for (taken, line) in lines.enumerate() {
        if taken > 0 && done(line, taken) {
            break;
        }
        out.push_str(line);
        out.push('\n');
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_excerpt_runs_from_its_first_line_to_the_end_condition() {
        let text = "a\nb start\nc\nd\ne end\nf\n";
        assert_eq!(excerpt(text, "b", |_, n| n >= 2).as_deref(), Some("b start\nc\n"));
        assert_eq!(excerpt(text, "b", |l, _| l.starts_with('e')).as_deref(), Some("b start\nc\nd\n"));
        assert_eq!(excerpt(text, "e", |l, _| l.starts_with('e')).as_deref(), Some("e end\nf\n"));
        assert_eq!(excerpt(text, "z", |_, _| false), None);
    }

    #[test]
    fn grounded_prompts_carry_their_passages_from_the_fetched_corpus() {
        let corpus = crate::model::corpus_dir();
        let prompts = Workload::Grounded.prompts(&corpus).expect("make setup fetches the corpus");
        let texts: Vec<&str> = prompts
            .iter()
            .map(|p| match p {
                Prompt::Text(t) => t.strip_prefix("<|im_start|>user\n").expect("a user turn first"),
                other => panic!("not a text prompt: {other:?}"),
            })
            .collect();
        assert_eq!(texts.len(), TASKS.len());
        assert!(texts[0].starts_with("def sha256(path):") && !texts[0].contains("def fetch("));
        assert!(texts[0].ends_with("<|im_end|>\n<|im_start|>assistant\n```python\ndef sha256(path"));
        assert!(
            texts[1].starts_with("/// Expected speedup of K drafts") && texts[1].contains("pub fn predicted_speedup")
        );
        assert!(texts[2].starts_with("To be, or not to be,--that is the question:--\n"));
        assert!(texts[2].contains("That makes calamity of so long life;\n\nQuote the lines"));
        assert!(
            texts[3].starts_with("She should have died hereafter;") && texts[3].contains("Signifying nothing.\n\nCopy")
        );
        assert!(texts[4].starts_with("Friends, Romans, countrymen") && texts[4].ends_with("assistant\n"));
        let missing = Workload::Grounded.prompts(Path::new("/nonexistent")).expect_err("no corpus there");
        assert!(missing.contains("/nonexistent/hamlet_gut.txt"), "{missing}");
    }

    #[test]
    fn the_code_tasks_find_their_code() {
        for task in &TASKS {
            if let Source::Code { name, file, first, end } = &task.text {
                let code = excerpt(file, first, |l, _| l.starts_with(end)).unwrap_or_else(|| panic!("{name}"));
                assert!(code.lines().count() >= 4 && !code.contains(end), "{name}: {code}");
            }
        }
    }
}
