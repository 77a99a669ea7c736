//! The vectors of the indexed chunks, in memory, grouped by collection so that a
//! search scores only the chunks the caller may read (the filter is applied during
//! the search: a restricted caller never gets fewer than `k` because others' chunks
//! crowded them out). Dot products of unit vectors = cosine.
//!
//! Exact scoring while the caller's permitted vectors are few enough to score in a
//! millisecond or two; beyond that an HNSW graph (`hnsw_rs`) built over every vector,
//! searched with the caller's permission as its filter (only permitted points enter
//! the result; the graph is walked through all). When the graph returns fewer than
//! asked, or the permitted share is too small for a filtered graph search to find
//! its neighbours, exact scoring answers instead: never fewer results than exact.
//! Removed vectors are tombstones in the graph until a rebuild (past a third).
//!
//! Writes never walk the graph. A new vector joins the *tail*, which every search
//! scores exactly beside the graph, so it is found as soon as its write returns; the
//! graph thread (`graph_work` → `GraphWork::run` → `apply`) adds the tail to the
//! graph — or builds the graph, or rebuilds it — with no lock held, then takes the
//! write lock only to publish which points are which rows. A row removed or replaced
//! while its point was being built is published as a tombstone.
//!
//! The vectors' home is the Tantivy index (a fast field), so this table is rebuilt
//! from it at start and kept in step by the index after each commit. No IO here.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use hnsw_rs::prelude::{Distance, Hnsw};

/// One chunk's vector and what a search must know to filter it.
#[derive(Clone, Debug)]
pub(crate) struct VectorRow {
    pub(crate) chunk_id: Arc<str>,
    pub(crate) document_id: Arc<str>,
    pub(crate) collection: Arc<str>,
    pub(crate) classification: Arc<str>,
    pub(crate) vector: Arc<[f32]>,
}

/// When the graph is built, and when it answers instead of exact scoring.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AnnSettings {
    /// Vectors in the table before a graph is built.
    pub(crate) min_vectors: usize,
    /// Permitted vectors for a search to use the graph (fewer: exact is fast enough).
    pub(crate) min_permitted: usize,
    /// Least share of all vectors the caller may read for the graph to be used.
    pub(crate) min_share: f32,
    /// Breadth of the graph search (`ef`), at least the number asked for.
    pub(crate) ef_search: usize,
}

impl Default for AnnSettings {
    fn default() -> Self {
        AnnSettings { min_vectors: 30_000, min_permitted: 20_000, min_share: 0.2, ef_search: 128 }
    }
}

/// Graph edges per node and breadth while building: the usual HNSW settings for
/// 384-d sentence embeddings.
const HNSW_CONNECTIONS: usize = 16;
const HNSW_EF_CONSTRUCTION: usize = 100;
const HNSW_LAYERS: usize = 16;

/// `1 - dot`: the distance of unit vectors, with this module's vectorised dot.
#[derive(Clone, Copy, Default)]
pub(crate) struct UnitDot;

impl Distance<f32> for UnitDot {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - dot(a, b)).max(0.0)
    }
}

type Graph = Hnsw<'static, f32, UnitDot>;

/// The graph and which table slot each of its points is (a point whose row went is
/// `None` until the graph is rebuilt).
struct Ann {
    graph: Arc<Graph>,
    point_slot: Vec<Option<usize>>,
    slot_point: HashMap<usize, usize>,
    dead: usize,
}

impl Ann {
    fn remove(&mut self, slot: usize) {
        if let Some(point) = self.slot_point.remove(&slot)
            && let Some(entry) = self.point_slot.get_mut(point)
        {
            *entry = None;
            self.dead += 1;
        }
    }
}

/// A row handed to the graph thread: its slot, the row's identity there (checked
/// again when the work is published), its vector.
pub(crate) struct GraphRow {
    slot: usize,
    chunk_id: Arc<str>,
    vector: Arc<[f32]>,
}

/// What the graph thread does next, taken under the table's read lock and done with
/// no lock held.
pub(crate) enum GraphWork {
    /// A new graph over these rows: the first one, or a rebuild past a third removed.
    Build(Vec<GraphRow>),
    /// These tail rows into the graph, as points `first_point..`.
    Insert { graph: Arc<Graph>, first_point: usize, rows: Vec<GraphRow> },
}

/// Done work, to publish under the write lock (`VectorTable::apply`).
pub(crate) struct GraphDone {
    graph: Arc<Graph>,
    first_point: usize,
    rows: Vec<GraphRow>,
    built: bool,
    pub(crate) seconds: f64,
}

impl GraphWork {
    pub(crate) fn run(self) -> GraphDone {
        let started = Instant::now();
        let (graph, first_point, rows, built) = match self {
            GraphWork::Build(rows) => (Arc::new(Hnsw::new(HNSW_CONNECTIONS, rows.len().max(1024), HNSW_LAYERS, HNSW_EF_CONSTRUCTION, UnitDot)), 0, rows, true),
            GraphWork::Insert { graph, first_point, rows } => (graph, first_point, rows, false),
        };
        let data: Vec<(&[f32], usize)> = rows.iter().enumerate().map(|(i, row)| (&row.vector[..], first_point + i)).collect();
        graph.parallel_insert_slice(&data);
        GraphDone { graph, first_point, rows, built, seconds: started.elapsed().as_secs_f64() }
    }
}

#[derive(Default)]
pub(crate) struct VectorTable {
    dimension: usize,
    rows: Vec<Option<VectorRow>>,
    free: Vec<usize>,
    by_document: HashMap<Arc<str>, Vec<usize>>,
    by_collection: HashMap<Arc<str>, HashSet<usize>>,
    ann_settings: AnnSettings,
    ann: Option<Ann>,
    /// Live slots not (yet) in the graph; every search scores them exactly. Empty
    /// while there is no graph (then everything is scored exactly).
    tail: HashSet<usize>,
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

/// The `n` best of what is offered.
struct TopN {
    n: usize,
    heap: BinaryHeap<Scored>,
}

impl TopN {
    fn new(n: usize) -> TopN {
        TopN { n, heap: BinaryHeap::with_capacity(n + 1) }
    }

    fn offer(&mut self, candidate: Scored) {
        if self.heap.len() < self.n {
            self.heap.push(candidate);
        } else if self.heap.peek().is_some_and(|worst| candidate < *worst) {
            self.heap.pop();
            self.heap.push(candidate);
        }
    }

    /// Best first.
    fn into_sorted(self) -> Vec<Scored> {
        let mut best = self.heap.into_vec();
        best.sort();
        best
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

    /// Adds a row; rows of another dimension than the table's are refused. With a
    /// graph, the row joins the tail until the graph thread takes it in.
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
        if self.ann.is_some() {
            self.tail.insert(slot);
        }
        self.rows[slot] = Some(row);
        true
    }

    #[cfg(test)]
    pub(crate) fn with_ann_settings(settings: AnnSettings) -> VectorTable {
        VectorTable { ann_settings: settings, ..VectorTable::default() }
    }

    /// Drops the graph when the table has shrunk to half the size that warrants one.
    /// Call after a batch of changes; building and growing the graph is the graph
    /// thread's (`graph_work`).
    pub(crate) fn maintain(&mut self) {
        if self.ann.is_some() && self.len() < self.ann_settings.min_vectors / 2 {
            self.ann = None;
            self.tail.clear();
        }
    }

    /// The graph thread's next job: build the graph once the table is large enough
    /// (again when a third of its points are gone), else take in up to `batch` rows of
    /// the tail. `None`: nothing to do.
    pub(crate) fn graph_work(&self, batch: usize) -> Option<GraphWork> {
        let (len, settings) = (self.len(), self.ann_settings);
        let row_of = |slot: usize| self.rows[slot].as_ref().map(|row| GraphRow { slot, chunk_id: row.chunk_id.clone(), vector: row.vector.clone() });
        match &self.ann {
            None if len >= settings.min_vectors => Some(GraphWork::Build((0..self.rows.len()).filter_map(row_of).collect())),
            Some(ann) if ann.dead * 3 > ann.point_slot.len() && len >= settings.min_vectors => Some(GraphWork::Build((0..self.rows.len()).filter_map(row_of).collect())),
            Some(ann) if !self.tail.is_empty() => {
                let rows = self.tail.iter().take(batch.max(1)).filter_map(|&slot| row_of(slot)).collect();
                Some(GraphWork::Insert { graph: ann.graph.clone(), first_point: ann.point_slot.len(), rows })
            }
            _ => None,
        }
    }

    /// Vectors the graph does not hold yet (those a search scores exactly beside it),
    /// counting all of them while a first graph is due.
    pub(crate) fn graph_pending(&self) -> usize {
        match &self.ann {
            None if self.len() >= self.ann_settings.min_vectors => self.len(),
            None => 0,
            Some(_) => self.tail.len(),
        }
    }

    /// Publishes done work: which points are which rows. A row removed or replaced
    /// since the work was taken becomes a tombstone; work on a graph that has been
    /// replaced meanwhile is dropped (its rows are still in the new graph's tail).
    pub(crate) fn apply(&mut self, done: GraphDone) {
        let rows = &self.rows;
        let holds = |row: &GraphRow| rows.get(row.slot).and_then(Option::as_ref).is_some_and(|r| Arc::ptr_eq(&r.chunk_id, &row.chunk_id));
        if done.built {
            if self.len() < self.ann_settings.min_vectors / 2 {
                return;
            }
            let mut ann = Ann { graph: done.graph, point_slot: Vec::with_capacity(done.rows.len()), slot_point: HashMap::with_capacity(done.rows.len()), dead: 0 };
            for (point, row) in done.rows.iter().enumerate() {
                if holds(row) {
                    ann.point_slot.push(Some(row.slot));
                    ann.slot_point.insert(row.slot, point);
                } else {
                    ann.point_slot.push(None);
                    ann.dead += 1;
                }
            }
            self.tail = (0..self.rows.len()).filter(|slot| self.rows[*slot].is_some() && !ann.slot_point.contains_key(slot)).collect();
            tracing::info!(vectors = ann.slot_point.len(), tail = self.tail.len(), seconds = done.seconds, "vector graph (HNSW) built");
            self.ann = Some(ann);
            return;
        }
        let Some(ann) = &mut self.ann else { return };
        if !Arc::ptr_eq(&ann.graph, &done.graph) || ann.point_slot.len() != done.first_point {
            return;
        }
        for (i, row) in done.rows.iter().enumerate() {
            if holds(row) && self.tail.remove(&row.slot) {
                ann.point_slot.push(Some(row.slot));
                ann.slot_point.insert(row.slot, done.first_point + i);
            } else {
                ann.point_slot.push(None);
                ann.dead += 1;
            }
        }
    }

    /// Runs the graph thread's work here until none is left.
    #[cfg(test)]
    pub(crate) fn settle(&mut self) {
        while let Some(work) = self.graph_work(usize::MAX) {
            let done = work.run();
            self.apply(done);
        }
    }

    /// Whether searches may use the graph (tests compare it with exact scoring).
    #[cfg(test)]
    pub(crate) fn has_graph(&self) -> bool {
        self.ann.is_some()
    }

    pub(crate) fn remove_document(&mut self, document_id: &str) {
        let Some(slots) = self.by_document.remove(document_id) else { return };
        for slot in slots {
            if let Some(row) = self.rows.get_mut(slot).and_then(Option::take) {
                if let Some(ann) = &mut self.ann {
                    ann.remove(slot);
                }
                self.tail.remove(&slot);
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
    /// `restricted`, only the classifications listed), best first: from the graph and
    /// its tail when the graph is built and the caller may read enough of it, else
    /// exactly.
    pub(crate) fn nearest(&self, query: &[f32], collections: &[String], restricted: &BTreeMap<String, Vec<String>>, n: usize) -> Vec<(f32, &VectorRow)> {
        if query.len() != self.dimension || n == 0 {
            return vec![];
        }
        let permitted = self.permitted(collections);
        let settings = self.ann_settings;
        if let Some(ann) = &self.ann
            && permitted >= settings.min_permitted
            && permitted as f32 >= settings.min_share * self.len() as f32
        {
            let mut found = self.nearest_in_graph(ann, query, collections, restricted, n);
            if !self.tail.is_empty() {
                let readable: HashSet<&str> = collections.iter().map(String::as_str).collect();
                let mut best = TopN::new(n);
                for &slot in &self.tail {
                    if let Some(row) = self.rows[slot].as_ref()
                        && permits(&readable, restricted, row)
                    {
                        best.offer(Scored { score: dot(query, &row.vector), slot });
                    }
                }
                found.extend(best.into_sorted().into_iter().filter_map(|s| self.rows[s.slot].as_ref().map(|row| (s.score, row))));
                found.sort_by(|a, b| b.0.total_cmp(&a.0));
                found.truncate(n);
            }
            if found.len() >= n.min(permitted) {
                metrics::counter!("echo_search_vector_searches_total", "method" => "graph").increment(1);
                return found;
            }
        }
        metrics::counter!("echo_search_vector_searches_total", "method" => "exact").increment(1);
        self.nearest_exact(query, collections, restricted, n)
    }

    /// The graph's nearest permitted points (not its tail).
    fn nearest_in_graph(&self, ann: &Ann, query: &[f32], collections: &[String], restricted: &BTreeMap<String, Vec<String>>, n: usize) -> Vec<(f32, &VectorRow)> {
        let readable: HashSet<&str> = collections.iter().map(String::as_str).collect();
        let row_of = |point: usize| ann.point_slot.get(point).copied().flatten().and_then(|slot| self.rows.get(slot)?.as_ref());
        let filter = |point: &usize| row_of(*point).is_some_and(|row| permits(&readable, restricted, row));
        // A caller who may read every collection in full needs no filter while every
        // point of the graph is a live row (the common case of a small organisation):
        // each visited point would otherwise be looked up. Points the graph thread is
        // adding are not published yet, so they need the filter too.
        let everything = ann.dead == 0
            && ann.graph.get_nb_point() == ann.point_slot.len()
            && restricted.is_empty()
            && self.by_collection.keys().all(|c| readable.contains(&**c));
        let filter: Option<&dyn hnsw_rs::prelude::FilterT> = if everything { None } else { Some(&filter) };
        let neighbours = ann.graph.search_filter(query, n, self.ann_settings.ef_search.max(n), filter);
        neighbours.into_iter().filter_map(|neighbour| row_of(neighbour.d_id).map(|row| (1.0 - neighbour.distance, row))).collect()
    }

    /// Every permitted row scored: the reference the graph is checked against.
    pub(crate) fn nearest_exact(&self, query: &[f32], collections: &[String], restricted: &BTreeMap<String, Vec<String>>, n: usize) -> Vec<(f32, &VectorRow)> {
        if query.len() != self.dimension || n == 0 {
            return vec![];
        }
        let mut best = TopN::new(n);
        for collection in collections {
            let Some(slots) = self.by_collection.get(collection.as_str()) else { continue };
            let classes = restricted.get(collection);
            for &slot in slots {
                let Some(row) = self.rows[slot].as_ref() else { continue };
                if classes.is_some_and(|allowed| !allowed.iter().any(|c| c.as_str() == &*row.classification)) {
                    continue;
                }
                best.offer(Scored { score: dot(query, &row.vector), slot });
            }
        }
        best.into_sorted().into_iter().filter_map(|s| self.rows[s.slot].as_ref().map(|row| (s.score, row))).collect()
    }
}

/// Whether a caller who may read `readable` (and in `restricted` collections only the
/// classifications listed) may see `row`.
fn permits(readable: &HashSet<&str>, restricted: &BTreeMap<String, Vec<String>>, row: &VectorRow) -> bool {
    readable.contains(&*row.collection) && restricted.get(&*row.collection).is_none_or(|allowed| allowed.iter().any(|c| c.as_str() == &*row.classification))
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

    /// xorshift64*: seeded test data.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn unit(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
        fn vector(&mut self, dimension: usize) -> Vec<f32> {
            let mut v: Vec<f32> = (0..dimension).map(|_| self.unit()).collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter_mut().for_each(|x| *x /= norm);
            v
        }
    }

    const CLASSES: [&str; 2] = ["internal", "restricted"];

    /// A table with a graph: 8 collections, documents of 4 vectors, some removed and
    /// some added after the graph was built (tombstones and late points both); the
    /// late points are taken into the graph when `settle_late`, else left in the tail.
    fn graph_table_with(seed: u64, settle_late: bool) -> (VectorTable, Rng) {
        let mut rng = Rng(seed | 1);
        let settings = AnnSettings { min_vectors: 200, min_permitted: 40, min_share: 0.05, ef_search: 64 };
        let mut table = VectorTable::with_ann_settings(settings);
        let add = |table: &mut VectorTable, rng: &mut Rng, doc: usize| {
            for i in 0..4 {
                let (collection, class) = (format!("c{}", rng.next() % 8), CLASSES[(rng.next() % 2) as usize]);
                table.insert(row(&format!("d{doc}-{i}"), &format!("d{doc}"), &collection, class, &rng.vector(24)));
            }
        };
        for doc in 0..150 {
            add(&mut table, &mut rng, doc);
        }
        table.maintain();
        assert!(!table.has_graph(), "writes never build the graph themselves");
        assert_eq!(table.graph_pending(), 600);
        table.settle();
        assert!(table.has_graph());
        for doc in (0..150).step_by(7) {
            table.remove_document(&format!("d{doc}"));
        }
        for doc in 150..180 {
            add(&mut table, &mut rng, doc);
        }
        table.maintain();
        assert_eq!(table.graph_pending(), 120, "the late points wait in the tail");
        if settle_late {
            table.settle();
            assert_eq!(table.graph_pending(), 0);
        }
        (table, rng)
    }

    fn graph_table(seed: u64) -> (VectorTable, Rng) {
        graph_table_with(seed, true)
    }

    fn permitted_subset(rng: &mut Rng) -> (Vec<String>, BTreeMap<String, Vec<String>>) {
        let collections: Vec<String> = (0..8).filter(|_| !rng.next().is_multiple_of(3)).map(|c| format!("c{c}")).collect();
        let restricted = collections.iter().filter(|_| rng.next().is_multiple_of(4)).map(|c| (c.clone(), vec!["internal".to_string()])).collect();
        (collections, restricted)
    }

    #[test]
    fn the_graph_finds_what_exact_scoring_finds_within_the_same_permission() {
        let (mut recall_sum, mut cases, mut short) = (0.0f64, 0usize, 0usize);
        for seed in 1..=8u64 {
            let (table, mut rng) = graph_table(seed * 7919);
            for _ in 0..25 {
                let (collections, restricted) = permitted_subset(&mut rng);
                let query = rng.vector(24);
                let exact: Vec<Arc<str>> = table.nearest_exact(&query, &collections, &restricted, 10).into_iter().map(|(_, r)| r.chunk_id.clone()).collect();
                // The graph alone (no fallback), so its own recall is what is measured.
                let found = table.nearest_in_graph(table.ann.as_ref().unwrap(), &query, &collections, &restricted, 10);
                if found.len() < exact.len() {
                    short += 1;
                }
                for (_, row) in &found {
                    assert!(collections.iter().any(|c| c.as_str() == &*row.collection), "{} is outside the permitted collections", row.chunk_id);
                    assert!(restricted.get(&*row.collection).is_none_or(|allowed| allowed.iter().any(|c| c.as_str() == &*row.classification)), "{} is of a class not permitted", row.chunk_id);
                }
                assert_eq!(table.nearest(&query, &collections, &restricted, 10).len(), exact.len(), "never fewer than exact scoring finds");
                let hits = found.iter().filter(|(_, r)| exact.contains(&r.chunk_id)).count();
                recall_sum += hits as f64 / exact.len().max(1) as f64;
                cases += 1;
            }
        }
        let recall = recall_sum / cases as f64;
        assert!(recall >= 0.9, "recall@10 of the graph against exact scoring: {recall:.3}");
        assert!(short * 10 <= cases, "the graph alone came back short in {short} of {cases} searches");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]
        #[test]
        fn no_search_ever_returns_a_vector_outside_the_permitted_set(seed in 1u64..u64::MAX, mask in 0u8..=255, restrict in 0u8..=255, n in 1usize..40) {
            let (table, mut rng) = graph_table_with(seed % 97 + 1, seed % 2 == 0);
            let collections: Vec<String> = (0..8).filter(|c| mask & (1 << c) != 0).map(|c| format!("c{c}")).collect();
            let restricted: BTreeMap<String, Vec<String>> = (0..8).filter(|c| restrict & (1 << c) != 0).map(|c| (format!("c{c}"), vec!["internal".to_string()])).collect();
            let query = rng.vector(24);
            let found = table.nearest(&query, &collections, &restricted, n);
            let exact = table.nearest_exact(&query, &collections, &restricted, n);
            proptest::prop_assert_eq!(found.len(), exact.len());
            for (_, row) in found {
                proptest::prop_assert!(collections.iter().any(|c| c.as_str() == &*row.collection));
                proptest::prop_assert!(restricted.get(&*row.collection).is_none_or(|allowed| allowed.iter().any(|c| c.as_str() == &*row.classification)));
            }
        }
    }

    #[test]
    fn a_vector_written_after_the_graph_is_found_at_once_and_then_from_the_graph() {
        let (mut table, mut rng) = graph_table(11);
        let everything: Vec<String> = (0..8).map(|c| format!("c{c}")).collect();
        let query = rng.vector(24);
        table.insert(row("late", "dlate", "c3", "internal", &query));
        assert_eq!(table.graph_pending(), 1);
        let first = table.nearest(&query, &everything, &BTreeMap::new(), 5);
        assert_eq!(&*first[0].1.chunk_id, "late", "scored from the tail the moment it is written");
        // The graph thread's work, taken now, finishes after the row was replaced: the
        // old point becomes a tombstone, the new row stays in the tail.
        let work = table.graph_work(usize::MAX).unwrap();
        table.remove_document("dlate");
        let moved = rng.vector(24);
        table.insert(row("late", "dlate", "c3", "internal", &moved));
        table.apply(work.run());
        assert_eq!(table.graph_pending(), 1, "the replaced row is still waiting");
        let found = table.nearest(&query, &everything, &BTreeMap::new(), 5);
        assert!(found.iter().all(|(score, row)| &*row.chunk_id != "late" || (*score - dot(&query, &moved)).abs() < 1e-5), "never the old vector's score for the new row");
        table.settle();
        assert_eq!(table.graph_pending(), 0);
        let found = table.nearest(&moved, &everything, &BTreeMap::new(), 5);
        assert_eq!(&*found[0].1.chunk_id, "late", "and found through the graph once it holds it");
        assert!(table.nearest_in_graph(table.ann.as_ref().unwrap(), &moved, &everything, &BTreeMap::new(), 5).iter().any(|(_, r)| &*r.chunk_id == "late"));
    }
}
