//! What every chunk store shares when it ranks (the embedded index and PostgreSQL
//! alike, so both rank the same way): the weight reciprocal rank fusion gives a place
//! in each list, the pass that turns a fused ranking into hits (a text seen before
//! collapsed, at most so many hits a page), and snippets with the query's words marked.

use std::collections::{HashMap, HashSet};

use common::wire::SearchMode;

use crate::index::Fusion;

/// The cosine from which a vector hit counts as related to the query and weighs
/// `vector_weight` in fusion when that is raised above BM25's (below it, at most BM25's
/// weight). Every vector hit in the first ten for the 79 questions of `echod bench
/// quality` is at 0.3 or more (the best hit at 0.40 or more): the same ranking there as
/// without the floor.
pub(crate) const RELATED_SIMILARITY: f32 = 0.3;

impl Fusion {
    /// What the BM25 hit at `rank` (from 0) adds to its chunk: its own score alone,
    /// `bm25_weight / (rrf_k + rank + 1)` when fused with vectors.
    pub(crate) fn bm25_contribution(&self, fused: bool, rank: usize, score: f32) -> f32 {
        if fused { self.bm25_weight / (self.rrf_k + rank as f32 + 1.0) } else { score }
    }

    /// What the vector hit at `rank` adds. A query whose words occur in fewer chunks
    /// than BM25's list could hold is `specific` (an identifier, an error code, a name):
    /// there vectors weigh no more than BM25, so the chunk holding it is not pushed out
    /// by the nearest meanings; a question in plain words matches far more chunks and
    /// keeps `vector_weight`. A vector hit barely related to the query (a word the model
    /// does not know) weighs no more than a BM25 hit either.
    pub(crate) fn vector_contribution(&self, mode: SearchMode, specific: bool, rank: usize, similarity: f32) -> f32 {
        if mode == SearchMode::Vector {
            return 1.0 / (rank as f32 + 1.0);
        }
        let raised = if specific { self.vector_weight.min(self.bm25_weight) } else { self.vector_weight };
        let weight = if similarity >= RELATED_SIMILARITY { raised } else { raised.min(self.bm25_weight) };
        weight / (self.rrf_k + rank as f32 + 1.0)
    }
}

/// Decides, going down a fused ranking, which chunks become hits: the same text in
/// several places (a repeated paragraph, an included page) once, and at most
/// `per_page` hits from one page of a document (0: no limit).
pub(crate) struct Admission {
    seen_texts: HashSet<u64>,
    per_page: HashMap<(String, Option<u64>), usize>,
    limit: usize,
}

impl Admission {
    pub(crate) fn new(per_page: usize) -> Admission {
        Admission { seen_texts: HashSet::new(), per_page: HashMap::new(), limit: per_page }
    }

    pub(crate) fn admit(&mut self, text: &str, document_id: &str, page: Option<u64>) -> bool {
        if !self.seen_texts.insert(duplicate_key(text)) {
            return false;
        }
        if self.limit > 0 {
            let taken = self.per_page.entry((document_id.to_string(), page)).or_default();
            if *taken >= self.limit {
                return false;
            }
            *taken += 1;
        }
        true
    }
}

/// The text a chunk's duplicates share: its words, lower-cased.
pub(crate) fn duplicate_key(text: &str) -> u64 {
    use std::hash::Hasher;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    // Each word lower-cased into one reused buffer and hashed whole (ASCII, nearly every
    // word, byte by byte; the rest char by char).
    let mut lowered = String::new();
    for word in text.split_whitespace() {
        lowered.clear();
        if word.is_ascii() {
            lowered.push_str(word);
            lowered.make_ascii_lowercase();
        } else {
            lowered.extend(word.chars().flat_map(char::to_lowercase));
        }
        hasher.write(lowered.as_bytes());
        hasher.write_u8(0xff);
    }
    hasher.finish()
}

pub(crate) fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// `fragment` with the `highlighted` byte ranges in `<mark>`, everything escaped.
pub(crate) fn marked(fragment: &str, highlighted: &[std::ops::Range<usize>]) -> String {
    let mut html = String::new();
    let mut from = 0;
    let mut ranges: Vec<std::ops::Range<usize>> = highlighted.to_vec();
    ranges.sort_by_key(|r| r.start);
    for range in ranges {
        if range.start < from || range.end > fragment.len() || !fragment.is_char_boundary(range.start) || !fragment.is_char_boundary(range.end) {
            continue;
        }
        html.push_str(&escape_html(&fragment[from..range.start]));
        html.push_str("<mark>");
        html.push_str(&escape_html(&fragment[range.clone()]));
        html.push_str("</mark>");
        from = range.end;
    }
    html.push_str(&escape_html(&fragment[from..]));
    html
}

/// The snippet of `text` for a query whose analysed terms make `generator`: the best
/// passage of up to 240 characters with those terms marked, or the text's start.
pub(crate) fn snippet_of(generator: &tantivy::snippet::SnippetGenerator, text: &str) -> String {
    let snippet = generator.snippet(text);
    if snippet.is_empty() { escape_html(&text.chars().take(240).collect::<String>()) } else { marked(snippet.fragment(), snippet.highlighted()) }
}

/// `query` without its stop words (words are runs of letters, digits and `_`).
pub(crate) fn without_stop_words(query: &str) -> String {
    query
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|word| !word.is_empty() && !common::text::is_stop_word(word))
        .collect::<Vec<_>>()
        .join(" ")
}
