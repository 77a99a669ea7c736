//! The extractive answer: the best passages of the best hits, quoted, each with a
//! numbered citation. Used when no language model is configured, and labelled as such.
//! Pure functions, no IO.

use common::wire::{Citation, SearchHit};

const NOTHING_FOUND: &str = "I could not find anything about this in the documents you can access.";

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() > 2)
        .map(str::to_lowercase)
        .collect()
}

/// The sentence window of `text` that shares the most words with the question.
pub(crate) fn best_passage(text: &str, question: &str, max_chars: usize) -> String {
    let wanted = words(question);
    let sentences: Vec<&str> = text.split_inclusive(['.', '?', '!', '\n']).map(str::trim).filter(|s| !s.is_empty()).collect();
    if sentences.is_empty() {
        return String::new();
    }
    let score = |s: &str| words(s).iter().filter(|w| wanted.contains(w)).count();
    let best = (0..sentences.len()).max_by_key(|&i| (score(sentences[i]), usize::MAX - i)).unwrap_or(0);
    let mut passage = sentences[best].to_string();
    // Grow forward while it fits, so the passage reads as a whole thought.
    for next in sentences.iter().skip(best + 1) {
        if passage.len() + next.len() + 1 > max_chars {
            break;
        }
        passage.push(' ');
        passage.push_str(next);
    }
    if passage.len() > max_chars {
        let cut = (0..=max_chars).rev().find(|i| passage.is_char_boundary(*i)).unwrap_or(0);
        passage.truncate(cut);
        passage.push('…');
    }
    passage
}

/// Builds the answer text and its citations from ranked hits.
pub(crate) fn extractive(question: &str, hits: &[SearchHit], max_citations: usize) -> (String, Vec<Citation>) {
    if hits.is_empty() {
        return (NOTHING_FOUND.to_string(), vec![]);
    }
    let mut answer = String::from("From your documents (extractive answer — no language model is configured):\n");
    let mut citations = Vec::new();
    for hit in hits.iter().take(max_citations) {
        let n = citations.len() + 1;
        let passage = best_passage(&hit.text, question, 400);
        answer.push_str(&format!("\n[{n}] {passage}\n"));
        citations.push(Citation {
            n,
            document_id: hit.document_id.clone(),
            chunk_id: hit.chunk_id.clone(),
            text: hit.text.clone(),
            page: hit.page,
            section: hit.section.clone(),
        });
    }
    (answer, citations)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn hit(id: &str, text: &str) -> SearchHit {
        SearchHit { document_id: "d".into(), chunk_id: id.into(), collection_id: "c".into(), score: 1.0, text: text.into(), classification: "internal".into(), page: Some(3), section: None, snippet: None, title: None }
    }

    #[test]
    fn quotes_the_sentence_that_answers_and_cites_it() {
        let hits = [hit("c1", "Lunch is at noon. The launch code is tangerine-42. Parking is free.")];
        let (answer, citations) = extractive("what is the launch code", &hits, 3);
        assert!(answer.contains("[1] The launch code is tangerine-42."), "{answer}");
        assert_eq!(citations.len(), 1);
        assert_eq!(citations[0].chunk_id, "c1");
        assert_eq!(citations[0].page, Some(3));
    }

    #[test]
    fn says_so_when_nothing_is_found() {
        let (answer, citations) = extractive("anything", &[], 3);
        assert_eq!(answer, NOTHING_FOUND);
        assert!(citations.is_empty());
    }

    #[test]
    fn citations_are_capped_and_numbered_in_order() {
        let hits: Vec<_> = (0..6).map(|i| hit(&format!("c{i}"), "Some text.")).collect();
        let (_, citations) = extractive("text", &hits, 4);
        assert_eq!(citations.iter().map(|c| c.n).collect::<Vec<_>>(), [1, 2, 3, 4]);
    }
}
