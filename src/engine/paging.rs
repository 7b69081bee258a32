//! The scheduler's side of a paged KV cache ([`super::kv`]): blocks for each sequence as it
//! grows, prefix reuse at admission, and preemption when the pool runs dry.
//!
//! Preemption takes the newest sequence out: its blocks go back to the pool (the full ones
//! stay cached), and it waits, with everything it has generated, at the head of the queue.
//! When there is room it comes back and recomputes its cached positions from its tokens
//! (reusing whatever of them is still cached); its next token was already chosen and
//! streamed, so nothing is lost or repeated.

use std::sync::atomic::Ordering;

#[cfg(test)]
mod tests;

use super::{kv, Event, Scheduler, Sequence};
use crate::runtime::{Forward, RuntimeError};

impl<F: Forward> Scheduler<F> {
    /// Registers the blocks `seq`'s cached tokens have filled, for reuse.
    pub(super) fn commit(&mut self, seq: &mut Sequence) {
        if let (Some(pool), Some(table)) = (&mut self.pool, &mut seq.table) {
            pool.commit(table, &seq.history[..seq.past.min(seq.history.len())]);
        }
    }

    /// Gives `seq`'s blocks back to the pool, registering its full blocks first if `commit`.
    pub(super) fn free_blocks(&mut self, seq: &mut Sequence, commit: bool) {
        release(&mut self.pool, seq, commit);
    }

    /// Gives back blocks reserved for a sequence that did not start.
    pub(super) fn give_back(&mut self, table: Option<kv::Table>) {
        if let (Some(pool), Some(table)) = (&mut self.pool, table) {
            pool.release(table);
        }
    }

    /// The blocks of a burst of `burst` waiting prompts of `len` tokens: as many as fit with
    /// no cached prefix (`burst` is cut to that). Empty without a paged cache.
    pub(super) fn burst_tables(&mut self, burst: &mut usize, len: usize) -> Vec<kv::Table> {
        let Some(pool) = &mut self.pool else { return Vec::new() };
        let mut tables = Vec::new();
        for a in self.waiting.iter().take(*burst) {
            match pool.admit(&a.prompt[..len - 1], len) {
                Some((t, 0)) => tables.push(t),
                Some((t, _)) => {
                    pool.release(t);
                    break;
                }
                None => break,
            }
        }
        *burst = tables.len();
        if *burst < 2 {
            tables.drain(..).for_each(|t| pool.release(t));
        }
        tables
    }

    /// Queues a preempted sequence to come back, oldest first.
    pub(super) fn requeue(&mut self, seq: Sequence) {
        let at = self.preempted.iter().position(|s| s.submitted > seq.submitted).unwrap_or(self.preempted.len());
        self.preempted.insert(at, seq);
    }

    /// Brings preempted sequences back while their blocks fit: each recomputes its cached
    /// positions (those still in the prefix cache are reused) and carries on.
    pub(super) fn resume(&mut self) {
        while self.running.len() < self.model.slots() {
            let Some(seq) = self.preempted.front() else { return };
            if seq.cancel.load(Ordering::Relaxed) {
                let mut seq = self.preempted.pop_front().expect("a front sequence");
                seq.end(super::FinishReason::Cancelled);
                continue;
            }
            let pool = self.pool.as_mut().expect("preemption needs a paged cache");
            let Some((table, cached)) = pool.admit(&seq.history[..seq.past], seq.past + 1) else { return };
            let mut seq = self.preempted.pop_front().expect("a front sequence");
            let slot = match self.open_slot(seq.spec.is_some(), Some(&table)) {
                Ok(slot) => slot,
                Err(e) => {
                    self.give_back(Some(table));
                    (seq.sink)(Event::Failed(super::EngineError::Model(e.to_string())));
                    return self.fail_all(e);
                }
            };
            let tokens = seq.history[..seq.past].to_vec();
            let recomputed = match cached < tokens.len() {
                true => self.prefill(slot, &tokens, cached, &seq.cancel.clone()).map(|l| l.is_some()),
                false => Ok(true),
            };
            seq.table = Some(table);
            match recomputed {
                Ok(true) => {
                    (seq.done, seq.preempted) = (false, false);
                    self.commit(&mut seq);
                    self.place(slot, seq);
                }
                Ok(false) | Err(_) => {
                    match recomputed {
                        Err(e) => {
                            (seq.sink)(Event::Failed(e.into()));
                        }
                        _ => seq.end(super::FinishReason::Cancelled),
                    }
                    self.free_blocks(&mut seq, false);
                    if let Err(e) = self.close_slot(slot) {
                        return self.fail_all(e);
                    }
                }
            }
        }
    }

    /// Grows the tables of plain sequences `0..p` by their next position, without
    /// preempting; false if one has no room (then none is stepped).
    pub(super) fn room_for_step(&mut self, p: usize) -> bool {
        let Some(pool) = &mut self.pool else { return true };
        for (slot, seq) in self.running[..p].iter_mut().enumerate() {
            let Some(table) = &mut seq.table else { continue };
            let before = table.blocks().len();
            if !pool.grow(table, seq.past + 1) {
                return false;
            }
            if table.blocks().len() != before && self.model.bind_blocks(slot, table.blocks()).is_err() {
                return false;
            }
        }
        true
    }

    /// Gives every running sequence a block for its next position, preempting the newest
    /// sequences while the pool has no room; returns whether any was preempted (they are
    /// marked done, and [`Scheduler::release`] takes them out of their slots).
    pub(super) fn make_room(&mut self) -> bool {
        if self.pool.is_none() {
            return false;
        }
        let mut preempted = false;
        // Oldest first: the ones that get room are the ones that keep running.
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        order.sort_by_key(|&i| self.running[i].submitted);
        for &i in &order {
            loop {
                let seq = &mut self.running[i];
                if seq.done {
                    break;
                }
                let pool = self.pool.as_mut().expect("a paged cache");
                let Some(table) = seq.table.as_mut() else { break };
                let before = table.blocks().len();
                if pool.grow(table, seq.past + 1) {
                    if table.blocks().len() != before {
                        if let Err(e) = self.model.bind_blocks(i, table.blocks()) {
                            let seq = &mut self.running[i];
                            (seq.sink)(Event::Failed(e.into()));
                            seq.done = true;
                        }
                    }
                    break;
                }
                // The newest running sequence (maybe this one) makes room.
                let victim = order.iter().rev().copied().find(|&j| !self.running[j].done).expect("this one runs");
                let seq = &mut self.running[victim];
                release(&mut self.pool, seq, true);
                (seq.done, seq.preempted) = (true, true);
                self.preemptions.fetch_add(1, Ordering::AcqRel);
                preempted = true;
            }
        }
        preempted
    }

    /// How many of `k` drafts `seq` (in `slot`) has room for in its blocks, growing them if
    /// the pool has room (never preempting for drafts).
    pub(super) fn draft_room(&mut self, slot: usize, seq: &mut Sequence, k: usize) -> Result<usize, RuntimeError> {
        let (Some(pool), Some(table)) = (&mut self.pool, &mut seq.table) else { return Ok(k) };
        let before = table.blocks().len();
        pool.grow(table, seq.past + 1 + k);
        if table.blocks().len() != before {
            self.model.bind_blocks(slot, table.blocks())?;
        }
        let room = table.blocks().len() * pool.block_size();
        Ok(k.min(room.saturating_sub(seq.past + 1)))
    }
}

/// Gives `seq`'s blocks back to `pool`, registering its full blocks first if `commit` (a free
/// function so callers can lend one of the scheduler's own sequences).
fn release(pool: &mut Option<kv::BlockPool>, seq: &mut Sequence, commit: bool) {
    let (Some(pool), Some(mut table)) = (pool.as_mut(), seq.table.take()) else { return };
    if commit {
        pool.commit(&mut table, &seq.history[..seq.past.min(seq.history.len())]);
    }
    pool.release(table);
}
