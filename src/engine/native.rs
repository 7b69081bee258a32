//! The engine over kiln's native reference forward pass (f32, ndarray): generation straight
//! from a GGUF file or Hugging Face directory, without an export.

use ndarray::{s, Array2};

use crate::model::reference::{KvCache, Logits, Reference};
use crate::model::Model;
use crate::runtime::{Forward, RuntimeError};

/// A loaded model with one KV cache per slot.
pub struct NativeForward {
    model: Model,
    caches: Vec<KvCache>,
    context: usize,
}

impl NativeForward {
    /// `slots` sequences of up to `context` positions each.
    pub fn new(model: Model, slots: usize, context: usize) -> Self {
        let caches = {
            let r = Reference::new(&model);
            (0..slots).map(|_| r.new_cache(context)).collect()
        };
        NativeForward { model, caches, context }
    }
}

fn run_error(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Run(e.to_string())
}

impl Forward for NativeForward {
    fn slots(&self) -> usize {
        self.caches.len()
    }

    fn max_context(&self) -> usize {
        self.context
    }

    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }

    fn extend(&mut self, slot: usize, past: usize, tokens: &[u32], last: usize) -> Result<Array2<f32>, RuntimeError> {
        let cache = self.caches.get_mut(slot).ok_or_else(|| run_error(format!("no slot {slot}")))?;
        cache.truncate(past);
        let which = if last == 1 { Logits::Last } else { Logits::All };
        let logits = Reference::new(&self.model).forward(tokens, cache, which).map_err(run_error)?;
        let n = logits.nrows();
        Ok(logits.slice(s![n - last.min(n).., ..]).to_owned())
    }

    fn step(&mut self, rows: &[(u32, usize)]) -> Result<Array2<f32>, RuntimeError> {
        let r = Reference::new(&self.model);
        let mut out = Array2::zeros((rows.len(), self.model.config.vocab_size));
        for (i, &(token, past)) in rows.iter().enumerate() {
            let cache = self.caches.get_mut(i).ok_or_else(|| run_error(format!("no slot {i}")))?;
            cache.truncate(past);
            let logits = r.forward(&[token], cache, Logits::Last).map_err(run_error)?;
            out.row_mut(i).assign(&logits.row(0));
        }
        Ok(out)
    }

    fn move_slot(&mut self, from: usize, to: usize, len: usize) -> Result<(), RuntimeError> {
        if from >= self.caches.len() || to >= self.caches.len() {
            return Err(run_error(format!("move_slot {from} → {to} of {}", self.caches.len())));
        }
        let mut moved = self.caches[from].clone();
        moved.truncate(len);
        self.caches[to] = moved;
        Ok(())
    }
}
