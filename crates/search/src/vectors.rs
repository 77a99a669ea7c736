//! The vectors of the indexed chunks, in memory, grouped by collection so that a
//! search scores only the chunks the caller may read (the filter is applied during
//! the search: a restricted caller never gets fewer than `k` because others' chunks
//! crowded them out). Exact scoring (dot products of unit vectors = cosine). The
//! vectors' home is the Tantivy index (a fast field), so this table is rebuilt from it
//! at start and kept in step by the index after each commit. No IO here.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;

/// One chunk's vector and what a search must know to filter it.
#[derive(Clone, Debug)]
pub(crate) struct VectorRow {
    pub(crate) chunk_id: Arc<str>,
    pub(crate) document_id: Arc<str>,
    pub(crate) collection: Arc<str>,
    pub(crate) classification: Arc<str>,
    pub(crate) vector: Box<[f32]>,
}

#[derive(Default)]
pub(crate) struct VectorTable {
    dimension: usize,
    rows: Vec<Option<VectorRow>>,
    free: Vec<usize>,
    by_document: HashMap<Arc<str>, Vec<usize>>,
    by_collection: HashMap<Arc<str>, HashSet<usize>>,
}

/// A scored slot; ordered by score so a heap keeps the best.
#[derive(Clone, Copy, Debug)]
struct Scored {
    score: f32,
    slot: usize,
}

impl PartialEq for Scored {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Scored {}
impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scored {
    // Reversed: the heap's top is the worst kept so far.
    fn cmp(&self, other: &Self) -> Ordering {
        other.score.total_cmp(&self.score).then_with(|| other.slot.cmp(&self.slot))
    }
}

/// Dot product in 16-wide lanes (the compiler vectorises this form).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (a_chunks, b_chunks) = (a.chunks_exact(16), b.chunks_exact(16));
    let (a_rest, b_rest) = (a_chunks.remainder(), b_chunks.remainder());
    for (x, y) in a_chunks.zip(b_chunks) {
        for i in 0..16 {
            lanes[i] += x[i] * y[i];
        }
    }
    let tail: f32 = a_rest.iter().zip(b_rest).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

impl VectorTable {
    pub(crate) fn len(&self) -> usize {
        self.rows.len() - self.free.len()
    }

    pub(crate) fn dimension(&self) -> usize {
        self.dimension
    }

    /// Adds a row; rows of another dimension than the table's are refused.
    pub(crate) fn insert(&mut self, row: VectorRow) -> bool {
        if self.dimension == 0 {
            self.dimension = row.vector.len();
        }
        if row.vector.len() != self.dimension || self.dimension == 0 {
            return false;
        }
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.rows.push(None);
                self.rows.len() - 1
            }
        };
        self.by_document.entry(row.document_id.clone()).or_default().push(slot);
        self.by_collection.entry(row.collection.clone()).or_default().insert(slot);
        self.rows[slot] = Some(row);
        true
    }

    pub(crate) fn remove_document(&mut self, document_id: &str) {
        let Some(slots) = self.by_document.remove(document_id) else { return };
        for slot in slots {
            if let Some(row) = self.rows.get_mut(slot).and_then(Option::take) {
                if let Some(set) = self.by_collection.get_mut(&row.collection) {
                    set.remove(&slot);
                    if set.is_empty() {
                        self.by_collection.remove(&row.collection);
                    }
                }
                self.free.push(slot);
            }
        }
    }

    /// How many vectors the caller may see: what an exact search would score.
    pub(crate) fn permitted(&self, collections: &[String]) -> usize {
        collections.iter().filter_map(|c| self.by_collection.get(c.as_str())).map(HashSet::len).sum()
    }

    /// The `n` rows most similar to `query` among `collections` (and in those of
    /// `restricted`, only the classifications listed), best first.
    pub(crate) fn nearest(&self, query: &[f32], collections: &[String], restricted: &BTreeMap<String, Vec<String>>, n: usize) -> Vec<(f32, &VectorRow)> {
        if query.len() != self.dimension || n == 0 {
            return vec![];
        }
        let mut heap: BinaryHeap<Scored> = BinaryHeap::with_capacity(n + 1);
        for collection in collections {
            let Some(slots) = self.by_collection.get(collection.as_str()) else { continue };
            let classes = restricted.get(collection);
            for &slot in slots {
                let Some(row) = self.rows[slot].as_ref() else { continue };
                if classes.is_some_and(|allowed| !allowed.iter().any(|c| c.as_str() == &*row.classification)) {
                    continue;
                }
                let candidate = Scored { score: dot(query, &row.vector), slot };
                if heap.len() < n {
                    heap.push(candidate);
                } else if heap.peek().is_some_and(|worst| candidate < *worst) {
                    heap.pop();
                    heap.push(candidate);
                }
            }
        }
        let mut best = heap.into_vec();
        best.sort();
        best.into_iter().filter_map(|s| self.rows[s.slot].as_ref().map(|row| (s.score, row))).collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn row(chunk: &str, document: &str, collection: &str, class: &str, vector: &[f32]) -> VectorRow {
        VectorRow { chunk_id: chunk.into(), document_id: document.into(), collection: collection.into(), classification: class.into(), vector: vector.into() }
    }

    #[test]
    fn dot_matches_the_plain_sum_for_any_length() {
        for len in [1usize, 15, 16, 17, 384, 385] {
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos()).collect();
            let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - plain).abs() < 1e-4, "{len}");
        }
    }

    #[test]
    fn nearest_ranks_within_the_permitted_set_only() {
        let mut table = VectorTable::default();
        table.insert(row("a1", "da", "c1", "internal", &[1.0, 0.0]));
        table.insert(row("a2", "da", "c1", "restricted", &[0.9, 0.1]));
        table.insert(row("b1", "db", "c2", "internal", &[0.99, 0.01]));
        table.insert(row("a3", "dc", "c1", "internal", &[0.0, 1.0]));
        let found: Vec<&str> = table.nearest(&[1.0, 0.0], &["c1".into()], &BTreeMap::new(), 10).iter().map(|(_, r)| &*r.chunk_id).collect();
        assert_eq!(found, ["a1", "a2", "a3"], "c2's closer vector is not seen");
        let restricted = BTreeMap::from([("c1".to_string(), vec!["internal".to_string()])]);
        let found: Vec<&str> = table.nearest(&[1.0, 0.0], &["c1".into()], &restricted, 10).iter().map(|(_, r)| &*r.chunk_id).collect();
        assert_eq!(found, ["a1", "a3"]);
        assert_eq!(table.nearest(&[1.0, 0.0], &["c1".into()], &BTreeMap::new(), 1).len(), 1);
        table.remove_document("da");
        assert_eq!(table.len(), 2);
        assert_eq!(table.permitted(&["c1".into(), "c2".into()]), 2);
        assert!(!table.insert(row("x", "dx", "c1", "internal", &[1.0, 0.0, 0.0])), "another dimension is refused");
    }
}
