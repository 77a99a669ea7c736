//! A cache of whole search answers, as sent (serialized `SearchResults`), for the
//! questions people ask again (Elasticsearch's request cache, Solr's result cache).
//! An answer is found again only under exactly what made it: the index's version (every
//! commit makes a new one, so a changed index never serves an old answer), the caller's
//! effective permissions after authz (the collections and, where only some
//! classifications may be read, those — so a change of access is a new key, and two
//! people share an answer only when they may read exactly the same), and every query
//! parameter. The key is a SHA-256 of those. Bounded in entries and bytes, oldest out
//! first; `search.result_cache_entries: 0` turns it off.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use common::wire::SearchMode;

/// The most bytes of answers kept, whatever the number of entries.
const MAX_BYTES: usize = 64 << 20;

pub(crate) type Key = [u8; 32];

/// Everything an answer depends on.
pub(crate) struct KeyParts<'a> {
    pub(crate) index_version: u64,
    pub(crate) query: &'a str,
    pub(crate) k: usize,
    pub(crate) per_page: usize,
    pub(crate) mode: SearchMode,
    pub(crate) vectors_used: bool,
    pub(crate) full_text: bool,
    pub(crate) rerank: bool,
    pub(crate) collections: &'a [String],
    pub(crate) restricted: &'a BTreeMap<String, Vec<String>>,
}

impl KeyParts<'_> {
    pub(crate) fn key(&self) -> Key {
        let mut hasher = Sha256::new();
        let mut part = |bytes: &[u8]| {
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        };
        part(&self.index_version.to_le_bytes());
        part(self.query.as_bytes());
        part(&(self.k as u64).to_le_bytes());
        part(&(self.per_page as u64).to_le_bytes());
        part(format!("{:?}", self.mode).as_bytes());
        part(&[u8::from(self.vectors_used), u8::from(self.full_text), u8::from(self.rerank)]);
        // Sorted, so the order authz listed them in does not matter.
        let mut collections: Vec<&String> = self.collections.iter().collect();
        collections.sort();
        part(&(collections.len() as u64).to_le_bytes());
        for collection in collections {
            part(collection.as_bytes());
        }
        part(&(self.restricted.len() as u64).to_le_bytes());
        for (collection, classifications) in self.restricted {
            part(collection.as_bytes());
            let mut classifications: Vec<&String> = classifications.iter().collect();
            classifications.sort();
            part(&(classifications.len() as u64).to_le_bytes());
            for classification in classifications {
                part(classification.as_bytes());
            }
        }
        hasher.finalize().into()
    }
}

#[derive(Default)]
struct State {
    entries: HashMap<Key, Bytes>,
    order: VecDeque<Key>,
    bytes: usize,
}

pub(crate) struct ResultCache {
    capacity: usize,
    state: Mutex<State>,
}

impl ResultCache {
    pub(crate) fn new(capacity: usize) -> ResultCache {
        ResultCache { capacity, state: Mutex::new(State::default()) }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.capacity > 0
    }

    pub(crate) fn get(&self, key: &Key) -> Option<Bytes> {
        let found = self.state.lock().ok()?.entries.get(key).cloned();
        metrics::counter!("echo_search_result_cache_total", "outcome" => if found.is_some() { "hit" } else { "miss" }).increment(1);
        found
    }

    pub(crate) fn put(&self, key: Key, answer: Bytes) {
        if !self.enabled() || answer.len() > MAX_BYTES / 16 {
            return;
        }
        let Ok(mut state) = self.state.lock() else { return };
        if let Some(old) = state.entries.insert(key, answer.clone()) {
            state.bytes -= old.len();
        } else {
            state.order.push_back(key);
        }
        state.bytes += answer.len();
        while state.order.len() > self.capacity || state.bytes > MAX_BYTES {
            let Some(oldest) = state.order.pop_front() else { break };
            if let Some(gone) = state.entries.remove(&oldest) {
                state.bytes -= gone.len();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts<'a>(version: u64, query: &'a str, collections: &'a [String], restricted: &'a BTreeMap<String, Vec<String>>) -> KeyParts<'a> {
        KeyParts { index_version: version, query, k: 10, per_page: 1, mode: SearchMode::Hybrid, vectors_used: true, full_text: false, rerank: false, collections, restricted }
    }

    #[test]
    fn an_answer_is_found_only_under_everything_that_made_it() {
        let cache = ResultCache::new(8);
        let (ab, ba, a) = (vec!["a".to_string(), "b".to_string()], vec!["b".to_string(), "a".to_string()], vec!["a".to_string()]);
        let none = BTreeMap::new();
        let only_public: BTreeMap<String, Vec<String>> = [("b".to_string(), vec!["public".to_string()])].into();
        cache.put(parts(1, "backup", &ab, &none).key(), Bytes::from_static(b"answer"));
        assert_eq!(cache.get(&parts(1, "backup", &ba, &none).key()).as_deref(), Some(&b"answer"[..]), "the order of collections does not matter");
        assert!(cache.get(&parts(2, "backup", &ab, &none).key()).is_none(), "a new index version");
        assert!(cache.get(&parts(1, "backups", &ab, &none).key()).is_none(), "another query");
        assert!(cache.get(&parts(1, "backup", &a, &none).key()).is_none(), "fewer collections readable");
        assert!(cache.get(&parts(1, "backup", &ab, &only_public).key()).is_none(), "only some classifications readable");
        let mut bm25 = parts(1, "backup", &ab, &none);
        bm25.mode = SearchMode::Bm25;
        assert!(cache.get(&bm25.key()).is_none(), "another mode");
        let mut every_hit = parts(1, "backup", &ab, &none);
        every_hit.per_page = 0;
        assert!(cache.get(&every_hit.key()).is_none(), "another limit of hits per page");
    }

    #[test]
    fn the_oldest_answers_leave_first_and_off_means_off() {
        let cache = ResultCache::new(2);
        let none = BTreeMap::new();
        let c = vec!["c".to_string()];
        for (i, q) in ["one", "two", "three"].iter().enumerate() {
            cache.put(parts(1, q, &c, &none).key(), Bytes::from(vec![i as u8]));
        }
        assert!(cache.get(&parts(1, "one", &c, &none).key()).is_none());
        assert!(cache.get(&parts(1, "three", &c, &none).key()).is_some());
        let off = ResultCache::new(0);
        off.put(parts(1, "one", &c, &none).key(), Bytes::from_static(b"x"));
        assert!(off.get(&parts(1, "one", &c, &none).key()).is_none());
    }
}
