//! k-way merge of sorted key sources with a binary heap.
//!
//! The heap holds one `(key, source index)` entry per live source, smallest key on top. Taking a
//! key replaces the top entry with the next key of the same source and sifts it down
//! ([`PeekMut`]), one `O(log k)` step per key and no allocation. A source is dropped as soon as it
//! runs dry, so the memory (a chunk) or the file (a run) it owns is given back while the merge
//! goes on.

use std::cmp::Reverse;
use std::collections::binary_heap::{BinaryHeap, PeekMut};

use crate::error::Result;

/// Something that yields keys in ascending order.
pub(crate) trait KeySource {
    /// The next key, `None` when exhausted.
    fn next_key(&mut self) -> Result<Option<i64>>;
}

/// A borrowed sorted slice (the chunks of a spill, merged into one run).
pub(crate) struct SliceSource<'a> {
    keys: &'a [i64],
    pos: usize,
}

impl<'a> SliceSource<'a> {
    pub(crate) fn new(keys: &'a [i64]) -> Self {
        SliceSource { keys, pos: 0 }
    }
}

impl KeySource for SliceSource<'_> {
    #[inline]
    fn next_key(&mut self) -> Result<Option<i64>> {
        let key = self.keys.get(self.pos).copied();
        self.pos += 1;
        Ok(key)
    }
}

/// Merges sorted sources into one ascending stream.
pub(crate) struct Merger<S> {
    heap: BinaryHeap<Reverse<(i64, usize)>>,
    /// `None` once a source is exhausted (and dropped).
    sources: Vec<Option<S>>,
}

impl<S: KeySource> Merger<S> {
    /// Reads the first key of every source. Empty sources are dropped at once.
    pub(crate) fn new(sources: Vec<S>) -> Result<Self> {
        let mut heap = BinaryHeap::with_capacity(sources.len());
        let mut live = Vec::with_capacity(sources.len());
        for (i, mut source) in sources.into_iter().enumerate() {
            match source.next_key()? {
                Some(key) => {
                    heap.push(Reverse((key, i)));
                    live.push(Some(source));
                }
                None => live.push(None),
            }
        }
        Ok(Merger {
            heap,
            sources: live,
        })
    }

    /// Number of sources not yet exhausted.
    #[cfg(test)]
    pub(crate) fn live_sources(&self) -> usize {
        self.heap.len()
    }

    /// The smallest key not yet taken, `None` when every source is exhausted. After an error
    /// the merger must not be used again.
    #[inline]
    pub(crate) fn next_key(&mut self) -> Result<Option<i64>> {
        let Some(mut top) = self.heap.peek_mut() else {
            return Ok(None);
        };
        let Reverse((key, i)) = *top;
        let source = self.sources[i]
            .as_mut()
            .expect("every source in the heap is live");
        match source.next_key()? {
            // Replacing the top sifts it down when `top` is dropped.
            Some(next) => top.0 .0 = next,
            None => {
                PeekMut::pop(top);
                self.sources[i] = None;
            }
        }
        Ok(Some(key))
    }

    /// Appends up to `max` keys to `out`; returns how many (fewer only at the end).
    pub(crate) fn fill(&mut self, out: &mut Vec<i64>, max: usize) -> Result<usize> {
        let start = out.len();
        while out.len() - start < max {
            match self.next_key()? {
                Some(key) => out.push(key),
                None => break,
            }
        }
        Ok(out.len() - start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merge(inputs: &[&[i64]]) -> Vec<i64> {
        let sources = inputs.iter().map(|s| SliceSource::new(s)).collect();
        let mut m = Merger::new(sources).unwrap();
        let mut out = Vec::new();
        m.fill(&mut out, usize::MAX).unwrap();
        assert_eq!(m.live_sources(), 0);
        out
    }

    #[test]
    fn merges_sorted_slices_with_duplicates_and_empties() {
        let out = merge(&[&[1, 4, 4, 9], &[], &[-3, 4, 10], &[i64::MIN, i64::MAX]]);
        assert_eq!(out, vec![i64::MIN, -3, 1, 4, 4, 4, 9, 10, i64::MAX]);
    }

    #[test]
    fn no_sources_yield_nothing() {
        assert!(merge(&[]).is_empty());
    }

    #[test]
    fn fill_stops_at_max_and_resumes() {
        let a = [1, 3, 5];
        let b = [2, 4, 6];
        let mut m = Merger::new(vec![SliceSource::new(&a), SliceSource::new(&b)]).unwrap();
        let mut out = Vec::new();
        assert_eq!(m.fill(&mut out, 4).unwrap(), 4);
        assert_eq!(out, [1, 2, 3, 4]);
        assert_eq!(m.fill(&mut out, 4).unwrap(), 2);
        assert_eq!(out, [1, 2, 3, 4, 5, 6]);
        assert_eq!(m.fill(&mut out, 4).unwrap(), 0);
    }
}
