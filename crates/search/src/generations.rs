//! Index generations: the live index that every search reads and, while `echod
//! reindex` runs, the next one being built beside it. Each generation is a directory
//! `DATA_DIR/index/gen-N`; the file `CURRENT` names the live one and `NEXT` the one
//! being built, so a rebuild survives a restart and resumes. Finishing a rebuild
//! makes the next generation live in one atomic rename of `CURRENT`; searches running
//! at that moment finish on the old one, whose directory goes once nothing holds it.
//!
//! While a rebuild runs, ordinary indexing (new uploads, deletions) goes to both
//! generations, so nothing indexed meanwhile is missing when the new one takes over.
//! When the live generation holds another model's vectors than the configured one,
//! it gets new chunks without vectors (its searches are BM25 only until the rebuild).
//! Blocking calls: run them on `spawn_blocking`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use common::wire::{Chunk, RebuildStatus};

use crate::embed::ModelId;
use crate::index::{ChunkIndex, IndexError};

const CURRENT: &str = "CURRENT";
const NEXT: &str = "NEXT";

struct Next {
    name: String,
    index: Arc<ChunkIndex>,
}

pub(crate) struct Generations {
    root: PathBuf,
    writer_memory_mb: usize,
    live: RwLock<(String, Arc<ChunkIndex>)>,
    next: RwLock<Option<Next>>,
}

fn io(error: std::io::Error) -> IndexError {
    IndexError::Directory(error.to_string())
}

/// Writes `name` into `root/file` atomically (a crash leaves the old or the new).
fn point(root: &Path, file: &str, name: &str) -> Result<(), IndexError> {
    let temporary = root.join(format!("{file}.tmp"));
    std::fs::write(&temporary, name).map_err(io)?;
    std::fs::File::open(&temporary).and_then(|f| f.sync_all()).map_err(io)?;
    std::fs::rename(&temporary, root.join(file)).map_err(io)?;
    std::fs::File::open(root).and_then(|d| d.sync_all()).map_err(io)
}

fn pointed(root: &Path, file: &str) -> Option<String> {
    let name = std::fs::read_to_string(root.join(file)).ok()?.trim().to_string();
    (is_generation(&name) && root.join(&name).is_dir()).then_some(name)
}

fn is_generation(name: &str) -> bool {
    name.strip_prefix("gen-").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn generation_number(name: &str) -> u64 {
    name.strip_prefix("gen-").and_then(|n| n.parse().ok()).unwrap_or(0)
}

impl Generations {
    /// Opens the live generation (and the one being built, if a rebuild was under way)
    /// under `root`. An index of the older single-directory layout becomes `gen-1`.
    pub(crate) fn open(root: &Path, writer_memory_mb: usize) -> Result<Generations, IndexError> {
        std::fs::create_dir_all(root).map_err(io)?;
        if pointed(root, CURRENT).is_none() && root.join("meta.json").exists() {
            let first = root.join("gen-1");
            std::fs::create_dir_all(&first).map_err(io)?;
            for entry in std::fs::read_dir(root).map_err(io)? {
                let entry = entry.map_err(io)?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if !is_generation(&name) && name != CURRENT && name != NEXT {
                    std::fs::rename(entry.path(), first.join(&name)).map_err(io)?;
                }
            }
            tracing::info!("the search index moved to {}", first.display());
        }
        let live_name = match pointed(root, CURRENT) {
            Some(name) => name,
            None => {
                std::fs::create_dir_all(root.join("gen-1")).map_err(io)?;
                point(root, CURRENT, "gen-1")?;
                "gen-1".to_string()
            }
        };
        let live = Arc::new(ChunkIndex::open(&root.join(&live_name), writer_memory_mb)?);
        let next = match pointed(root, NEXT).filter(|name| *name != live_name) {
            Some(name) => {
                let index = Arc::new(ChunkIndex::open(&root.join(&name), writer_memory_mb)?);
                tracing::info!(generation = %name, chunks = index.n_chunks(), "an index rebuild was under way; it goes on");
                Some(Next { name, index })
            }
            None => {
                let _ = std::fs::remove_file(root.join(NEXT));
                None
            }
        };
        // Generations left behind by earlier swaps or abandoned rebuilds.
        let keep: Vec<&str> = std::iter::once(live_name.as_str()).chain(next.as_ref().map(|n| n.name.as_str())).collect();
        for entry in std::fs::read_dir(root).map_err(io)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_generation(&name) && !keep.contains(&name.as_str()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(Generations { root: root.to_path_buf(), writer_memory_mb, live: RwLock::new((live_name, live)), next: RwLock::new(next) })
    }

    /// The index searches read.
    pub(crate) fn live(&self) -> Arc<ChunkIndex> {
        self.live.read().map(|live| live.1.clone()).unwrap_or_else(|poisoned| poisoned.into_inner().1.clone())
    }

    fn next_index(&self) -> Option<Arc<ChunkIndex>> {
        self.next.read().ok().and_then(|next| next.as_ref().map(|n| n.index.clone()))
    }

    pub(crate) fn status(&self) -> RebuildStatus {
        let (live_name, live) = self.live.read().map(|l| l.clone()).unwrap_or_else(|p| p.into_inner().clone());
        let next = self.next.read().ok().and_then(|n| n.as_ref().map(|n| (n.name.clone(), n.index.n_chunks())));
        RebuildStatus {
            building: next.is_some(),
            live: live_name,
            live_chunks: live.n_chunks(),
            next_chunks: next.as_ref().map_or(0, |n| n.1),
            next: next.map(|n| n.0),
        }
    }

    /// Starts building a new generation, or goes on with the one under way.
    pub(crate) fn begin(&self) -> Result<RebuildStatus, IndexError> {
        {
            let mut next = self.next.write().map_err(|_| IndexError::Poisoned)?;
            if next.is_none() {
                let newest = std::fs::read_dir(&self.root).map_err(io)?.flatten().map(|e| generation_number(&e.file_name().to_string_lossy())).max().unwrap_or(0);
                let name = format!("gen-{}", newest + 1);
                let dir = self.root.join(&name);
                let _ = std::fs::remove_dir_all(&dir);
                let index = Arc::new(ChunkIndex::open(&dir, self.writer_memory_mb)?);
                point(&self.root, NEXT, &name)?;
                tracing::info!(generation = %name, "index rebuild started");
                *next = Some(Next { name, index });
            }
        }
        Ok(self.status())
    }

    /// Makes the generation being built the live one.
    pub(crate) fn finish(&self) -> Result<RebuildStatus, IndexError> {
        let mut next = self.next.write().map_err(|_| IndexError::Poisoned)?;
        let Some(built) = next.take() else { return Err(IndexError::NoRebuild) };
        point(&self.root, CURRENT, &built.name)?;
        let _ = std::fs::remove_file(self.root.join(NEXT));
        let old = {
            let mut live = self.live.write().map_err(|_| IndexError::Poisoned)?;
            std::mem::replace(&mut *live, (built.name.clone(), built.index))
        };
        drop(next);
        tracing::info!(generation = %built.name, "the rebuilt index is live");
        retire(self.root.join(&old.0), old.1);
        Ok(self.status())
    }

    /// Gives up the generation being built.
    pub(crate) fn abandon(&self) -> Result<RebuildStatus, IndexError> {
        let taken = self.next.write().map_err(|_| IndexError::Poisoned)?.take();
        let _ = std::fs::remove_file(self.root.join(NEXT));
        if let Some(next) = taken {
            tracing::info!(generation = %next.name, "index rebuild abandoned");
            retire(self.root.join(&next.name), next.index);
        }
        Ok(self.status())
    }

    /// A document's chunks replace its old ones in every generation (uploads and
    /// re-uploads). Vectors go only where they are of the generation's model.
    pub(crate) fn replace_document(&self, document_id: &str, chunks: &[Chunk], model: Option<&ModelId>) -> Result<(), IndexError> {
        let live = self.live();
        store(&live, document_id, chunks, model, false)?;
        if let Some(next) = self.next_index() {
            store(&next, document_id, chunks, model, true)?;
        }
        Ok(())
    }

    /// A document's chunks into the generation being built only (the rebuild itself).
    pub(crate) fn replace_in_next(&self, document_id: &str, chunks: &[Chunk], model: Option<&ModelId>) -> Result<(), IndexError> {
        let next = self.next_index().ok_or(IndexError::NoRebuild)?;
        store(&next, document_id, chunks, model, true)
    }

    pub(crate) fn delete_document(&self, document_id: &str) -> Result<(), IndexError> {
        self.live().delete_document(document_id)?;
        if let Some(next) = self.next_index() {
            next.delete_document(document_id)?;
        }
        Ok(())
    }
}

/// Stores chunks in one generation. Their vectors must be of `model`; a generation
/// that holds another model's refuses them (`strict`, the one being built) or gets
/// the chunks without them (the live one, until it is rebuilt).
fn store(index: &ChunkIndex, document_id: &str, chunks: &[Chunk], model: Option<&ModelId>, strict: bool) -> Result<(), IndexError> {
    if !chunks.iter().any(|c| c.embedding.is_some()) {
        return index.replace_document(document_id, chunks);
    }
    let Some(model) = model else { return Err(IndexError::NoModel) };
    match index.check_model(model) {
        Ok(()) => index.replace_document(document_id, chunks),
        Err(error) if strict => Err(error),
        Err(_) => {
            let plain: Vec<Chunk> = chunks.iter().map(|c| Chunk { embedding: None, ..c.clone() }).collect();
            index.replace_document(document_id, &plain)
        }
    }
}

/// Drops a generation once no search holds it any more, then removes its directory.
fn retire(dir: PathBuf, index: Arc<ChunkIndex>) {
    std::thread::spawn(move || {
        let mut index = index;
        for _ in 0..600 {
            match Arc::try_unwrap(index) {
                Ok(unique) => {
                    drop(unique);
                    let _ = std::fs::remove_dir_all(&dir);
                    return;
                }
                Err(shared) => {
                    index = shared;
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        tracing::warn!(dir = %dir.display(), "an old index generation is still in use; it is removed at the next start");
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::BTreeMap;

    use common::wire::SearchMode;

    use super::*;
    use crate::index::{Fusion, SearchRequest};

    fn chunk(doc: &str, text: &str, vector: Option<&[f32]>) -> Chunk {
        Chunk {
            chunk_id: format!("{doc}-0"),
            document_id: doc.into(),
            collection_id: "c1".into(),
            ordinal: 0,
            text: text.into(),
            page: None,
            section: None,
            char_start: 0,
            char_end: text.len() as u64,
            classification: "internal".into(),
            title: None,
            embedding: vector.map(common::wire::encode_vector),
        }
    }

    fn found(index: &ChunkIndex, query: &str) -> Vec<String> {
        let collections = vec!["c1".to_string()];
        let request = SearchRequest { query, vector: None, collections: &collections, restricted: &BTreeMap::new(), k: 10, mode: SearchMode::Bm25, fusion: Fusion::default(), per_page: 0 };
        index.search(&request).unwrap().into_iter().map(|h| h.document_id).collect()
    }

    #[test]
    fn a_rebuild_runs_beside_the_live_index_survives_a_restart_and_takes_over_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let old_model = ModelId { name: "old".into(), dimension: 2 };
        let new_model = ModelId { name: "new".into(), dimension: 3 };
        {
            let generations = Generations::open(dir.path(), 15).unwrap();
            generations.replace_document("d1", &[chunk("d1", "alpha reactor", Some(&[1.0, 0.0]))], Some(&old_model)).unwrap();
            generations.begin().unwrap();
            generations.replace_in_next("d1", &[chunk("d1", "alpha reactor rebuilt", Some(&[1.0, 0.0, 0.0]))], Some(&new_model)).unwrap();
            assert_eq!(found(&generations.live(), "rebuilt"), Vec::<String>::new(), "the live index is untouched by the rebuild");
            // An upload meanwhile reaches both; the live one keeps its model and gets text only.
            generations.replace_document("d2", &[chunk("d2", "beta turbine", Some(&[0.0, 1.0, 0.0]))], Some(&new_model)).unwrap();
            assert_eq!(found(&generations.live(), "turbine"), ["d2"]);
            assert_eq!(generations.live().n_vectors(), 1, "no vectors of another model in the live index");
        }
        // A restart in the middle: the rebuild is still there.
        let generations = Generations::open(dir.path(), 15).unwrap();
        let status = generations.status();
        assert!(status.building, "{status:?}");
        assert_eq!(status.next_chunks, 2);
        assert!(generations.replace_in_next("d3", &[chunk("d3", "gamma", Some(&[0.0, 0.0, 1.0]))], Some(&old_model)).is_err(), "the new generation refuses the old model");
        generations.delete_document("d2").unwrap();
        let status = generations.finish().unwrap();
        assert!(!status.building);
        assert_eq!(found(&generations.live(), "rebuilt"), ["d1"]);
        assert_eq!(found(&generations.live(), "turbine"), Vec::<String>::new(), "a deletion during the rebuild reached it");
        assert_eq!(generations.live().recorded_model(), Some(new_model.clone()));
        drop(generations);
        let reopened = Generations::open(dir.path(), 15).unwrap();
        assert_eq!(found(&reopened.live(), "rebuilt"), ["d1"], "the swap is durable");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().flatten().filter(|e| is_generation(&e.file_name().to_string_lossy())).count(), 1, "the old generation is gone");
        assert!(matches!(reopened.finish(), Err(IndexError::NoRebuild)));
    }

    #[test]
    fn an_index_of_the_single_directory_layout_becomes_the_first_generation() {
        let dir = tempfile::tempdir().unwrap();
        {
            let index = ChunkIndex::open(dir.path(), 15).unwrap();
            index.replace_document("d1", &[chunk("d1", "legacy words", None)]).unwrap();
        }
        let generations = Generations::open(dir.path(), 15).unwrap();
        assert_eq!(found(&generations.live(), "legacy"), ["d1"]);
        assert!(dir.path().join("gen-1/meta.json").exists());
        generations.begin().unwrap();
        generations.abandon().unwrap();
        assert!(!generations.status().building);
        assert_eq!(found(&generations.live(), "legacy"), ["d1"], "abandoning keeps the live index");
    }
}
