//! Text as it streams out: token ids to UTF-8 deltas, and stop strings held back until they
//! can no longer match.

use crate::model::tokenizer::TokenizerError;
use crate::model::ModelTokenizer;

/// Incremental detokenizer. Each token's text is the difference between decoding a short
/// window of recent tokens with and without it, so decoders that treat a sequence's first
/// token specially (SentencePiece's leading space) see the same context both times; a
/// delta that would end inside a UTF-8 character (byte-fallback tokens, byte-level BPE
/// pieces of an emoji) waits for the tokens that complete it. [`finish`](Self::finish)
/// returns whatever is left, so the deltas always concatenate to the full decode.
#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Start of the window decoded as context.
    prefix: usize,
    /// End of what has been emitted.
    read: usize,
    emitted: String,
}

impl Detokenizer {
    /// Adds `id`; returns the text that can be shown now (often empty).
    pub fn push(&mut self, tokenizer: &ModelTokenizer, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let before = tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let after = tokenizer.decode(&self.ids[self.prefix..])?;
        if after.len() <= before.len() || after.ends_with('\u{FFFD}') || !after.starts_with(&before) {
            return Ok(String::new());
        }
        let delta = after[before.len()..].to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        self.emitted.push_str(&delta);
        Ok(delta)
    }

    /// The rest of the text: the full decode minus what was emitted (a trailing incomplete
    /// character comes out as U+FFFD, as the full decode shows it).
    pub fn finish(&mut self, tokenizer: &ModelTokenizer) -> Result<String, TokenizerError> {
        let full = tokenizer.decode(&self.ids)?;
        let rest = match full.strip_prefix(self.emitted.as_str()) {
            Some(rest) => rest.to_string(),
            // A decoder whose output for a window differs from the full decode: emit from
            // the first differing character (never seen with the supported tokenizers).
            None => {
                let common = full.char_indices().zip(self.emitted.chars()).find(|((_, a), b)| a != b);
                let at = common.map_or(self.emitted.len().min(full.len()), |((i, _), _)| i);
                full.get(at..).unwrap_or_default().to_string()
            }
        };
        self.emitted.push_str(&rest);
        self.read = self.ids.len();
        self.prefix = self.read;
        Ok(rest)
    }
}

/// Holds back text that could be the start of a stop string.
#[derive(Debug, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    held: String,
}

/// What [`StopStrings::push`] lets through.
#[derive(Debug, PartialEq, Eq)]
pub enum Filtered {
    /// Text to show; generation goes on.
    Text(String),
    /// Text to show before the stop string `stop`; generation ends there.
    Stopped {
        /// Text before the stop string.
        text: String,
        /// Which stop string matched.
        stop: String,
    },
}

impl StopStrings {
    /// A filter for `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        StopStrings { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), held: String::new() }
    }

    /// Adds `delta`; returns what can be shown: everything except a tail that is a proper
    /// prefix of some stop string, or everything before the earliest stop string found.
    pub fn push(&mut self, delta: &str) -> Filtered {
        self.held.push_str(delta);
        let found = self.stops.iter().filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s))).min();
        if let Some((at, stop)) = found {
            let text = self.held[..at].to_string();
            let stop = stop.clone();
            self.held.clear();
            return Filtered::Stopped { text, stop };
        }
        let keep = self.longest_partial_match();
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        Filtered::Text(text)
    }

    /// Text still held back (shown when generation ends for another reason).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of the held text that some stop string starts with.
    fn longest_partial_match(&self) -> usize {
        let h = &self.held;
        h.char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.len() > h.len() - i && s.starts_with(&h[i..])))
            .map_or(0, |i| h.len() - i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, Option<String>) {
        let mut f = StopStrings::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let mut out = String::new();
        for d in deltas {
            match f.push(d) {
                Filtered::Text(t) => out.push_str(&t),
                Filtered::Stopped { text, stop } => {
                    out.push_str(&text);
                    return (out, Some(stop));
                }
            }
        }
        out.push_str(&f.flush());
        (out, None)
    }

    #[test]
    fn a_stop_string_split_across_deltas_never_leaks() {
        let mut f = StopStrings::new(&["###".to_string()]);
        assert_eq!(f.push("Hello #"), Filtered::Text("Hello ".into()));
        assert_eq!(f.push("#"), Filtered::Text(String::new()));
        assert_eq!(f.push("# world"), Filtered::Stopped { text: String::new(), stop: "###".into() });
        assert_eq!(run(&["###"], &["a#", "#b"]), ("a##b".into(), None), "a partial match that fails is released");
        assert_eq!(run(&["END"], &["the E", "N", "D of"]), ("the ".into(), Some("END".into())));
    }

    #[test]
    fn the_earliest_of_several_stop_strings_wins() {
        assert_eq!(run(&["cd", "b"], &["abcd"]), ("a".into(), Some("b".into())));
        assert_eq!(run(&["ab", "b"], &["xab"]), ("x".into(), Some("ab".into())));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), None));
    }

    #[test]
    fn held_text_is_cut_at_character_boundaries() {
        assert_eq!(run(&["éx"], &["caf", "é", "!"]), ("café!".into(), None));
        assert_eq!(run(&["😀!"], &["hi 😀", "!"]), ("hi ".into(), Some("😀!".into())));
    }
}
