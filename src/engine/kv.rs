//! The paged KV cache's bookkeeping: a pool of fixed-size blocks shared by every sequence,
//! one block table per sequence, and automatic prefix caching.
//!
//! A block is [`BlockPool::block_size`] positions of every layer's keys and values. A
//! sequence holds the blocks of its table (reference-counted); blocks come from the free list
//! as it grows and go back when it ends. With prefix caching, each block that a sequence has
//! filled with known tokens is keyed by those tokens chained with the previous block's key
//! (the whole prefix up to it); a later sequence whose prompt starts with the same tokens
//! takes those blocks into its own table instead of computing them again. A cached block
//! that no sequence holds stays cached until the pool needs room: then the least recently
//! used one is evicted. A block's contents never change while it is cached: positions are
//! written only past a sequence's cached prefix, and a full block is never written again.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// Positions per block unless set otherwise.
pub const BLOCK_SIZE: usize = 16;

/// One sequence's blocks: block `j` holds its positions `j · block_size ..`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Table {
    blocks: Vec<u32>,
    /// Leading blocks that are keyed (cached or registered by this sequence).
    keyed: usize,
    /// The key of block `keyed − 1` (0 before the first).
    last_key: u64,
}

impl Table {
    /// The pool's block ids, in position order.
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }
}

/// A cached block: its key's inputs, kept to rule out hash collisions.
#[derive(Debug)]
struct Cached {
    parent: u64,
    tokens: Vec<u32>,
}

/// The pool.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    /// Sequences holding each block.
    refs: Vec<u32>,
    /// Each block's key, where it is cached.
    key_of: Vec<Option<u64>>,
    /// Blocks that hold nothing worth keeping.
    free: Vec<u32>,
    /// Cached blocks by key.
    cached: HashMap<u64, (u32, Cached)>,
    /// Cached blocks no sequence holds, by last use (oldest first).
    idle: BTreeMap<u64, u32>,
    /// When each idle block was last used (its key in `idle`).
    last_use: Vec<u64>,
    clock: u64,
    prefix_cache: bool,
}

impl BlockPool {
    /// A pool of `blocks` blocks of `block_size` positions; `prefix_cache` turns on reuse.
    pub fn new(blocks: usize, block_size: usize, prefix_cache: bool) -> BlockPool {
        BlockPool {
            block_size,
            refs: vec![0; blocks],
            key_of: vec![None; blocks],
            free: (0..blocks as u32).rev().collect(),
            cached: HashMap::new(),
            idle: BTreeMap::new(),
            last_use: vec![0; blocks],
            clock: 0,
            prefix_cache,
        }
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks some sequence holds.
    pub fn in_use(&self) -> usize {
        self.blocks() - self.free.len() - self.idle.len()
    }

    /// Blocks a sequence of `positions` positions needs.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// The key of the block after `parent` holding `tokens`.
    fn key(parent: u64, tokens: &[u32]) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (parent, tokens).hash(&mut h);
        h.finish()
    }

    /// The cached blocks that hold the longest prefix of `tokens` in whole blocks.
    fn hits(&self, tokens: &[u32]) -> Vec<(u32, u64)> {
        let mut hits = Vec::new();
        if !self.prefix_cache {
            return hits;
        }
        let mut parent = 0;
        for chunk in tokens.chunks_exact(self.block_size) {
            let key = Self::key(parent, chunk);
            match self.cached.get(&key) {
                Some((block, c)) if c.parent == parent && c.tokens == chunk => hits.push((*block, key)),
                _ => break,
            }
            parent = key;
        }
        hits
    }

    /// A table for a sequence whose first positions will hold `tokens`, with room for
    /// `positions` positions: the cached blocks of the longest cached prefix of `tokens`
    /// (whole blocks), then fresh ones. Returns the table and how many positions it holds
    /// already, or `None` (and changes nothing) when the pool has no room.
    pub fn admit(&mut self, tokens: &[u32], positions: usize) -> Option<(Table, usize)> {
        let hits = self.hits(tokens);
        let fresh = self.blocks_for(positions).saturating_sub(hits.len());
        // Idle hits stop being idle, so they are not room for the fresh blocks.
        let idle_hits = hits.iter().filter(|(b, _)| self.refs[*b as usize] == 0).count();
        if fresh > self.free.len() + self.idle.len() - idle_hits {
            return None;
        }
        let mut table = Table::default();
        for &(block, key) in &hits {
            self.hold(block);
            table.blocks.push(block);
            table.last_key = key;
        }
        table.keyed = hits.len();
        for _ in 0..fresh {
            let block = self.take().expect("room checked above");
            table.blocks.push(block);
        }
        let cached = hits.len() * self.block_size;
        Some((table, cached))
    }

    /// Grows `table` to room for `positions` positions; false (and no change) when the pool
    /// has no room.
    pub fn grow(&mut self, table: &mut Table, positions: usize) -> bool {
        let more = self.blocks_for(positions).saturating_sub(table.blocks.len());
        if more > self.free.len() + self.idle.len() {
            return false;
        }
        for _ in 0..more {
            let block = self.take().expect("room checked above");
            table.blocks.push(block);
        }
        true
    }

    /// Registers the blocks of `table` that `tokens` (the sequence's cached positions, in
    /// order) fill completely, so later sequences can reuse them.
    pub fn commit(&mut self, table: &mut Table, tokens: &[u32]) {
        if !self.prefix_cache {
            return;
        }
        let full = (tokens.len() / self.block_size).min(table.blocks.len());
        while table.keyed < full {
            let chunk = &tokens[table.keyed * self.block_size..][..self.block_size];
            let (parent, block) = (table.last_key, table.blocks[table.keyed]);
            let key = Self::key(parent, chunk);
            // The same prefix computed twice keeps the first block; this one stays private.
            if self.key_of[block as usize].is_none() && !self.cached.contains_key(&key) {
                self.cached.insert(key, (block, Cached { parent, tokens: chunk.to_vec() }));
                self.key_of[block as usize] = Some(key);
            }
            table.last_key = key;
            table.keyed += 1;
        }
    }

    /// Gives back `table`'s blocks: cached ones stay cached (idle), the others are free.
    pub fn release(&mut self, table: Table) {
        // Last blocks first: a prefix's tail is evicted before its head.
        for &block in table.blocks.iter().rev() {
            let b = block as usize;
            self.refs[b] -= 1;
            if self.refs[b] > 0 {
                continue;
            }
            if self.key_of[b].is_some() {
                self.clock += 1;
                self.last_use[b] = self.clock;
                self.idle.insert(self.clock, block);
            } else {
                self.free.push(block);
            }
        }
    }

    /// Takes hold of `block` (cached, maybe idle).
    fn hold(&mut self, block: u32) {
        let b = block as usize;
        if self.refs[b] == 0 {
            self.idle.remove(&self.last_use[b]);
        }
        self.refs[b] += 1;
    }

    /// A block for new contents: a free one, else the least recently used idle one (evicted).
    fn take(&mut self) -> Option<u32> {
        let block = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, block) = self.idle.pop_first()?;
                if let Some(key) = self.key_of[block as usize].take() {
                    self.cached.remove(&key);
                }
                block
            }
        };
        self.refs[block as usize] = 1;
        Some(block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + salt).collect()
    }

    #[test]
    fn blocks_come_and_go_with_sequences() {
        let mut pool = BlockPool::new(4, 4, false);
        let (mut a, cached) = pool.admit(&tokens(5, 0), 5).expect("room");
        assert_eq!((a.blocks().len(), cached, pool.in_use()), (2, 0, 2));
        assert!(pool.grow(&mut a, 9));
        assert_eq!(pool.in_use(), 3);
        // Two blocks asked for, one left: nothing changes.
        assert!(pool.admit(&tokens(8, 1), 8).is_none());
        assert_eq!(pool.in_use(), 3);
        assert!(!pool.grow(&mut a, 17));
        assert_eq!(a.blocks().len(), 3);
        pool.release(a);
        assert_eq!(pool.in_use(), 0);
        assert!(pool.admit(&tokens(16, 1), 16).is_some());
    }

    #[test]
    fn a_shared_prefix_reuses_whole_blocks_only() {
        let mut pool = BlockPool::new(8, 4, true);
        let prompt = tokens(10, 0);
        let (mut a, cached) = pool.admit(&prompt, 11).expect("room");
        assert_eq!(cached, 0);
        pool.commit(&mut a, &prompt);
        // Same first 9 tokens: the two full blocks of the first 8 are reused.
        let mut other = prompt[..9].to_vec();
        other.push(99);
        let (b, cached) = pool.admit(&other, 10).expect("room");
        assert_eq!(cached, 8);
        assert_eq!(b.blocks()[..2], a.blocks()[..2]);
        assert_ne!(b.blocks()[2], a.blocks()[2]);
        assert_eq!(pool.in_use(), 4);
        // A different first token shares nothing: the key chains the whole prefix.
        let mut shifted = prompt.clone();
        shifted[0] = 1000;
        let (c, cached) = pool.admit(&shifted, 10).expect("room");
        assert_eq!(cached, 0);
        for t in [a, b, c] {
            pool.release(t);
        }
        assert_eq!(pool.in_use(), 0);
        // Cached after its sequences end.
        let (d, cached) = pool.admit(&prompt, 10).expect("room");
        assert_eq!(cached, 8);
        pool.release(d);
    }

    #[test]
    fn idle_cached_blocks_are_evicted_least_recently_used_first() {
        let mut pool = BlockPool::new(4, 2, true);
        let (first, second) = (tokens(4, 0), tokens(4, 50));
        for prompt in [&first, &second] {
            let (mut t, _) = pool.admit(prompt, 4).expect("room");
            pool.commit(&mut t, prompt);
            pool.release(t);
        }
        assert_eq!(pool.in_use(), 0);
        // Reusing `first` makes it the most recent: `second` goes when room is needed.
        let (t, cached) = pool.admit(&first, 4).expect("room");
        assert_eq!(cached, 4);
        pool.release(t);
        let (t, _) = pool.admit(&tokens(4, 90), 4).expect("evicts two");
        pool.release(t);
        assert_eq!(pool.admit(&second, 4).map(|(t, c)| (t.blocks().len(), c)), Some((2, 0)));
        assert_eq!(pool.hits(&first).len(), 2);
    }

    #[test]
    fn an_idle_hit_is_not_counted_as_room() {
        let mut pool = BlockPool::new(3, 2, true);
        let prompt = tokens(4, 0);
        let (mut t, _) = pool.admit(&prompt, 4).expect("room");
        pool.commit(&mut t, &prompt);
        pool.release(t);
        // Both idle blocks are hits, one block is free: 2 hits + 2 fresh do not fit in 3.
        assert!(pool.admit(&prompt, 8).is_none());
        assert_eq!(pool.in_use(), 0);
        let (t, cached) = pool.admit(&prompt, 6).expect("room");
        assert_eq!((cached, pool.in_use()), (4, 3));
        pool.release(t);
    }
}
