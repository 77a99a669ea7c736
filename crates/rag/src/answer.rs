//! The extractive answer (the default without a language model): the sentences across
//! the top hits that best answer the question, quoted exactly as the documents have
//! them, each followed by its source and a numbered citation; or "not in your
//! documents" when retrieval found nothing related. Pure functions, no IO.
//!
//! A sentence's score: the question's content words it holds, each weighted by how rare
//! it is among the retrieved sentences (so "port" in "What port does it listen on?"
//! counts more than a word every passage has), plus a little for what an answer looks
//! like (a number when the question asks for one, the asked term being defined), plus
//! the retriever's rank. The best sentence is quoted with its neighbours while they fit,
//! since the fact is often the sentence after the one that names the topic.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use common::text::content_terms;
use common::wire::{Citation, SearchHit};

pub(crate) const NOT_FOUND: &str = "I could not find this in the documents you can read, so I will not guess. Try other words, or check that the document that answers it is uploaded and shared with you.";

/// How far a quote grows around its best sentence.
const QUOTE_CHARS: usize = 360;
/// Quotes in one answer.
const MAX_QUOTES: usize = 3;
/// Later quotes must score at least this share of the best one.
const SECOND_QUOTE_SHARE: f32 = 0.6;

/// When the retrieved text is judged too weak to answer from.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Grounding {
    pub(crate) min_similarity: f32,
    pub(crate) min_coverage: f32,
}

/// An answer built without a model.
#[derive(Debug)]
pub(crate) struct Extracted {
    pub(crate) text: String,
    pub(crate) citations: Vec<Citation>,
    pub(crate) not_found: bool,
}

/// One sentence of one hit: where it is in the hit's text, and its content words.
struct Sentence {
    hit: usize,
    range: Range<usize>,
    terms: HashSet<String>,
}

/// Byte ranges of the sentences of `text`. A sentence ends at `.`, `?` or `!` followed
/// by white space and not by a lower-case letter, unless the word before is an
/// abbreviation or an initial ("e.g.", "Fig.", "J."); and at a line break after a line
/// that ends a thought (punctuation, a short line: a heading, list item or code) or
/// before a bullet. A dot inside a token ("postgresql.conf", "0.0.0.0", "24.3.1") never
/// ends one, so quotes keep the document's text as it is.
pub(crate) fn sentences(text: &str) -> Vec<Range<usize>> {
    const ABBREVIATIONS: [&str; 16] = ["e.g", "i.e", "etc", "vs", "cf", "fig", "no", "dr", "mr", "mrs", "ms", "st", "approx", "eq", "sec", "al"];
    let mut out = Vec::new();
    let mut start = 0;
    let bytes = text.as_bytes();
    let mut line_start = 0;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let mut end_here = None;
        if b == b'\n' {
            let line = text[line_start..i].trim();
            let next_line = text[i + 1..].trim_start_matches([' ', '\t']);
            let blank_next = next_line.starts_with('\n') || next_line.is_empty();
            // A short line is a heading, list item or code unless the next line goes on
            // in lower case (a wrapped sentence).
            let continues = next_line.starts_with(|c: char| c.is_lowercase());
            let ends_thought = line.ends_with(['.', '?', '!', ':', ';']) || (line.chars().count() < 60 && !continues);
            let bullet_next = next_line.starts_with(['•', '-', '*', '–', '·']) || next_line.split_once(['.', ')']).is_some_and(|(n, _)| !n.is_empty() && n.len() <= 3 && n.bytes().all(|d| d.is_ascii_digit()));
            if blank_next || ends_thought || bullet_next {
                end_here = Some(i);
            }
            line_start = i + 1;
        } else if matches!(b, b'.' | b'?' | b'!') {
            let after = &text[i + 1..];
            let followed_by_space = after.is_empty() || after.starts_with(|c: char| c.is_whitespace());
            if followed_by_space {
                let next = after.trim_start().chars().next();
                let word_before = text[start..i].rsplit(|c: char| c.is_whitespace() || c == '(').next().unwrap_or("").to_lowercase();
                let abbreviation = b == b'.' && (ABBREVIATIONS.contains(&word_before.trim_end_matches('.')) || (word_before.chars().count() == 1 && word_before.chars().all(char::is_alphabetic)));
                let lower_next = next.is_some_and(char::is_lowercase);
                if !abbreviation && !lower_next {
                    end_here = Some(i + 1);
                }
            }
        }
        if let Some(end) = end_here {
            push_trimmed(text, start..end, &mut out);
            start = end;
        }
        i += 1;
    }
    push_trimmed(text, start..text.len(), &mut out);
    out
}

fn push_trimmed(text: &str, range: Range<usize>, out: &mut Vec<Range<usize>>) {
    let slice = &text[range.clone()];
    let lead = slice.len() - slice.trim_start().len();
    let trimmed = slice.trim();
    if trimmed.chars().any(char::is_alphanumeric) {
        out.push(range.start + lead..range.start + lead + trimmed.len());
    }
}

/// The question asks for a number (a port, a size, a limit, a year, a version …).
fn wants_number(question: &str) -> bool {
    let q = question.to_lowercase();
    ["how many", "how much", "how long", "how large", "how big", "how often", "what port", "which port", "port", "default", "maximum", "minimum", "limit", "size", "version", "number", "year", "when", "timeout", "percent"]
        .iter()
        .any(|cue| q.contains(cue))
}

fn has_digit(text: &str) -> bool {
    text.bytes().any(|b| b.is_ascii_digit())
}

/// The sentence defines one of the question's terms ("X is …", "X sets …", "X: …").
fn defines(sentence: &str, wanted: &HashSet<String>) -> bool {
    let words: Vec<String> = common::text::words(sentence).take(8).collect();
    words.windows(2).any(|pair| {
        wanted.contains(&common::text::stem(&pair[0])) && matches!(pair[1].as_str(), "is" | "are" | "means" | "refers" | "sets" | "controls" | "specifies" | "determines" | "returns" | "defaults")
    }) || sentence.split_once(':').is_some_and(|(head, _)| head.len() < 40 && content_terms(head).iter().any(|t| wanted.contains(t)))
}

/// Whitespace runs (a line break inside a sentence) as one space; the words untouched.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Where a quote comes from, as a reader names it: section (or title) and page.
fn source_label(hit: &SearchHit) -> String {
    let mut label = hit.section.clone().filter(|s| !s.trim().is_empty()).or_else(|| hit.title.clone()).unwrap_or_default();
    if let (Some(title), Some(section)) = (&hit.title, &hit.section)
        && !section.contains(title.as_str())
        && !title.trim().is_empty()
    {
        label = format!("{title} › {section}");
    }
    if let Some(page) = hit.page {
        label = if label.is_empty() { format!("page {page}") } else { format!("{label}, page {page}") };
    }
    one_line(&label)
}

/// Whether retrieval found anything related to the question: the best hit's similarity
/// when vectors ranked it, else (or also) the share of the question's words the best
/// passage holds.
fn grounded(best_coverage: f32, hits: &[SearchHit], grounding: Grounding) -> bool {
    let similarity = hits.iter().filter_map(|h| h.similarity).fold(None, |best: Option<f32>, s| Some(best.map_or(s, |b| b.max(s))));
    match similarity {
        Some(similarity) => similarity >= grounding.min_similarity || best_coverage >= grounding.min_coverage.max(0.75),
        None => best_coverage >= grounding.min_coverage,
    }
}

/// Every sentence of `hits` an extractive answer chooses from, in order: (hit, range).
fn candidates(hits: &[SearchHit]) -> impl Iterator<Item = (usize, Range<usize>)> + '_ {
    hits.iter().enumerate().flat_map(|(hit, h)| sentences(&h.text).into_iter().map(move |range| (hit, range)))
}

/// Hits whose sentences are compared with the question in meaning: the first 8 (rag's
/// default `top_k`), and the first 200 characters of each sentence. On `echod bench
/// quality` (release build, 79 questions): the fact in the answer for 48 with these,
/// 49 with whole sentences (840 ms per ask instead of 590), 46 with 6 hits, 44 with 4,
/// 40 with no comparison at all.
pub(crate) const SEMANTIC_HITS: usize = 8;
const SEMANTIC_CHARS: usize = 200;

/// The sentences of the first [`SEMANTIC_HITS`] hits, in [`candidates`] order (which
/// they begin), as their meaning is compared with the question's (one line, at most
/// [`SEMANTIC_CHARS`] characters).
pub(crate) fn candidate_texts(hits: &[SearchHit]) -> Vec<String> {
    let first = &hits[..hits.len().min(SEMANTIC_HITS)];
    candidates(first).map(|(hit, range)| one_line(&first[hit].text[range]).chars().take(SEMANTIC_CHARS).collect()).collect()
}

/// How much a sentence's closeness in meaning to the question counts beside its words:
/// `SEMANTIC_WEIGHT × (cosine − SEMANTIC_FLOOR)`, floored at 0. Plain-worded questions
/// rarely share the answer's words ("walk through two lists side by side" is answered
/// by `zip()`), so without it the sentence that repeats the question's filler words wins
/// (weights 2 and 3 found the same facts; 0, i.e. words alone, 9 fewer of 79).
const SEMANTIC_WEIGHT: f32 = 2.0;
const SEMANTIC_FLOOR: f32 = 0.2;

/// Builds the answer and its citations from ranked `hits` (best first). `similarity`,
/// when embeddings are on: the cosine to the question of each sentence
/// [`candidate_texts`] gave, in its order (the first hits' sentences).
pub(crate) fn extractive(question: &str, hits: &[SearchHit], max_citations: usize, grounding: Grounding, similarity: Option<&[f32]>) -> Extracted {
    let not_found = || Extracted { text: NOT_FOUND.to_string(), citations: vec![], not_found: true };
    let wanted: HashSet<String> = content_terms(question).into_iter().collect();
    if hits.is_empty() || wanted.is_empty() {
        return not_found();
    }
    let all: Vec<Sentence> = candidates(hits)
        .map(|(hit, range)| {
            let terms = content_terms(&hits[hit].text[range.clone()]).into_iter().collect();
            Sentence { hit, range, terms }
        })
        .collect();
    // Exactly the first hits' sentences, or nothing.
    let compared = all.iter().take_while(|s| s.hit < SEMANTIC_HITS).count();
    let similarity = similarity.filter(|s| s.len() == compared);
    let similarity_of = |i: usize| similarity.and_then(|s| s.get(i).copied());
    // Rarity among the retrieved sentences; a question word found nowhere weighs most.
    let n = all.len().max(1) as f32;
    let mut df: HashMap<&str, usize> = HashMap::new();
    for sentence in &all {
        for term in wanted.iter().filter(|t| sentence.terms.contains(*t)) {
            *df.entry(term.as_str()).or_default() += 1;
        }
    }
    let weight = |term: &str| (1.0 + n / (1.0 + df.get(term).copied().unwrap_or(0) as f32)).ln();
    let total: f32 = wanted.iter().map(|t| weight(t)).sum::<f32>().max(f32::EPSILON);
    let coverage = |terms: &HashSet<String>| wanted.iter().filter(|t| terms.contains(*t)).map(|t| weight(t)).sum::<f32>() / total;
    // A passage's coverage: the hit's words as a whole (a heading may name the topic and
    // the next sentence hold the fact).
    let hit_terms: Vec<HashSet<String>> = hits.iter().map(|h| content_terms(&format!("{} {} {}", h.title.as_deref().unwrap_or(""), h.section.as_deref().unwrap_or(""), h.text)).into_iter().collect()).collect();
    let hit_coverage: Vec<f32> = hit_terms.iter().map(coverage).collect();
    // Whether the topic is there at all: the plain share of the question's words a
    // passage holds (rarity ranks sentences; it would make filler words such as "often"
    // that no passage has decide that nothing answers).
    let best_coverage = hit_terms.iter().map(|terms| wanted.iter().filter(|t| terms.contains(*t)).count() as f32 / wanted.len() as f32).fold(0.0, f32::max);
    if !grounded(best_coverage, hits, grounding) {
        return not_found();
    }
    let numeric = wants_number(question);
    let scored: Vec<(usize, f32)> = all
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let text = &hits[s.hit].text[s.range.clone()];
            let mut score = coverage(&s.terms) + 0.35 * hit_coverage[s.hit] + 0.25 / (1.0 + 0.5 * s.hit as f32);
            if let Some(similarity) = similarity_of(i) {
                score += SEMANTIC_WEIGHT * (similarity - SEMANTIC_FLOOR).max(0.0);
            }
            if numeric && has_digit(text) {
                score += 0.15;
            }
            if defines(text, &wanted) {
                score += 0.15;
            }
            if text.chars().count() < 25 {
                score *= 0.6;
            }
            (i, score)
        })
        .collect();
    let mut order: Vec<(usize, f32)> = scored.clone();
    order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let Some(&(_, best_score)) = order.first() else { return not_found() };
    // (sentence indexes quoted, score), at most one quote per hit.
    let mut quotes: Vec<(Range<usize>, usize)> = Vec::new();
    let mut used_hits: HashSet<usize> = HashSet::new();
    for &(i, score) in &order {
        if quotes.len() >= MAX_QUOTES.min(max_citations.max(1)) || (!quotes.is_empty() && score < SECOND_QUOTE_SHARE * best_score) {
            break;
        }
        let close = similarity_of(i).is_some_and(|s| s >= 0.5);
        if used_hits.contains(&all[i].hit) || coverage(&all[i].terms) == 0.0 && hit_coverage[all[i].hit] < 0.5 && !close {
            continue;
        }
        used_hits.insert(all[i].hit);
        quotes.push((window(&all, i, &hits[all[i].hit].text, hits[all[i].hit].section.as_deref()), all[i].hit));
    }
    if quotes.is_empty() {
        return not_found();
    }
    continue_across_pages(&mut quotes, &all, hits, MAX_QUOTES.min(max_citations.max(1)));
    let mut text = String::new();
    let mut citations = Vec::new();
    for (range, hit_index) in quotes {
        let hit = &hits[hit_index];
        let n = citations.len() + 1;
        let quoted = &hit.text[range.clone()];
        let mut line = format!("“{}”", one_line(quoted));
        let label = source_label(hit);
        if !label.is_empty() {
            line.push_str(&format!(" — {label}"));
        }
        line.push_str(&format!(" [{n}]"));
        if !text.is_empty() {
            text.push_str("\n\n");
        }
        text.push_str(&line);
        citations.push(Citation {
            n,
            document_id: hit.document_id.clone(),
            chunk_id: hit.chunk_id.clone(),
            text: hit.text.clone(),
            page: hit.page,
            section: hit.section.clone(),
            title: hit.title.clone(),
            quote: Some(quoted.to_string()),
        });
    }
    Extracted { text, citations, not_found: false }
}

/// A quote that ends its page's passage with a lead-in ("The following reconfigure the
/// timezone used by the Debian system.", "… as follows:") promises what the next page
/// holds: when a passage of that next page was retrieved too, its first sentences are
/// quoted right after it (as their own citation), in place of the last quote if the
/// answer is full.
fn continue_across_pages(quotes: &mut Vec<(Range<usize>, usize)>, all: &[Sentence], hits: &[SearchHit], limit: usize) {
    let mut i = 0;
    while i < quotes.len() {
        let (range, hit_index) = (quotes[i].0.clone(), quotes[i].1);
        let hit = &hits[hit_index];
        let quoted = &hit.text[range.clone()];
        let last = sentences(quoted).pop().map(|r| quoted[r].to_lowercase()).unwrap_or_default();
        let lead_in = last.ends_with(':') || last.contains("the following") || last.contains("as follows");
        let at_end = hit.text[range.end..].trim().is_empty();
        let next = hit.page.filter(|_| lead_in && at_end).and_then(|page| hits.iter().position(|h| h.document_id == hit.document_id && h.page == Some(page + 1)));
        // Quoted already before this one: left where it is.
        let quoted_at = next.and_then(|next| quotes.iter().position(|(_, q)| *q == next));
        if quoted_at.is_some_and(|at| at < i) {
            i += 1;
            continue;
        }
        // The next page's passage from its first sentence, moved right after the lead-in.
        if let Some(first) = next.and_then(|next| all.iter().position(|s| s.hit == next)) {
            let next = all[first].hit;
            if let Some(at) = quoted_at {
                quotes.remove(at);
            }
            quotes.insert(i + 1, (window(all, first, &hits[next].text, hits[next].section.as_deref()), next));
            quotes.truncate(limit.max(i + 2));
            i += 1;
        }
        i += 1;
    }
}

/// The byte range quoted around sentence `best`: the sentence before it when that is a
/// short lead-in ("For example:"), then following sentences of the same hit
/// while the quote stays within [`QUOTE_CHARS`]. A single sentence longer than that is
/// cut at a word boundary (marked with "…" by the caller's formatting).
fn window(all: &[Sentence], best: usize, text: &str, section: Option<&str>) -> Range<usize> {
    let hit = all[best].hit;
    let mut range = all[best].range.clone();
    if best > 0 && all[best - 1].hit == hit {
        let before = all[best - 1].range.clone();
        let previous = &text[before.clone()];
        // A lead-in ("For example:").
        let lead_in = previous.chars().count() < 80 && previous.ends_with(':');
        // The term the sentence describes, on a line of its own (a definition list, an
        // index of functions or options: "await gather()" above "Schedule and wait for
        // things concurrently."): quoting the description alone loses the answer. A
        // heading is not quoted, the source label names it.
        let own_line = text[before.end..range.start].contains('\n');
        let heading = section.and_then(|s| s.rsplit(" > ").next()).is_some_and(|last| last.trim() == previous.trim());
        let term = own_line && !heading && previous.chars().count() <= 60 && !previous.ends_with(['.', '?', '!', ':', ';', ',']);
        if lead_in || term {
            range.start = before.start;
        }
    }
    let mut next = best + 1;
    while next < all.len() && all[next].hit == hit && all[next].range.end - range.start <= QUOTE_CHARS {
        range.end = all[next].range.end;
        next += 1;
    }
    if range.end - range.start > QUOTE_CHARS * 2 {
        let mut cut = range.start + QUOTE_CHARS * 2;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let at_space = text[range.start..cut].rfind(char::is_whitespace).map_or(cut, |p| range.start + p);
        range.end = at_space.max(range.start + 1);
        while !text.is_char_boundary(range.end) {
            range.end += 1;
        }
    }
    range
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const OPEN: Grounding = Grounding { min_similarity: 0.25, min_coverage: 0.5 };

    fn hit(id: &str, text: &str) -> SearchHit {
        SearchHit {
            document_id: format!("doc-{id}"),
            chunk_id: id.into(),
            collection_id: "c".into(),
            score: 1.0,
            text: text.into(),
            classification: "internal".into(),
            page: Some(3),
            section: Some("Connections".into()),
            snippet: None,
            title: Some("Server manual".into()),
            similarity: None,
        }
    }

    fn quoted(text: &str, ranges: &[Range<usize>]) -> Vec<String> {
        ranges.iter().map(|r| text[r.clone()].to_string()).collect()
    }

    #[test]
    fn a_lead_in_at_the_end_of_a_page_is_continued_by_the_next_page() {
        // Debian Reference, pages 179-180: the command the lead-in announces opens the next page.
        let mut first = hit("p179", "9.5.5 System and hardware time\nThe following sets system and hardware time.\n# hwclock --utc --systohc\nThe following reconfigure the timezone used by the Debian system.");
        first.page = Some(179);
        let mut next = hit("p180", "# dpkg-reconfigure tzdata\nIf you wish to update system time via network, consider the NTP service.");
        next.page = Some(180);
        let mut other = hit("p40", "The timezone of a file's times is shown by ls.");
        other.page = Some(40);
        next.document_id = first.document_id.clone();
        other.document_id = first.document_id.clone();
        let answer = extractive("How do I change the time zone of a Debian system?", &[first.clone(), other.clone(), next.clone()], 3, OPEN, None);
        let cited: Vec<&str> = answer.citations.iter().map(|c| c.chunk_id.as_str()).collect();
        let at = cited.iter().position(|c| *c == "p179").unwrap();
        assert_eq!(cited.get(at + 1), Some(&"p180"), "{cited:?}\n{}", answer.text);
        assert!(answer.text.contains("dpkg-reconfigure tzdata"), "{}", answer.text);
        // Without a lead-in nothing is pulled in from the next page.
        let mut plain = first.clone();
        plain.text = "9.5.5 System and hardware time\nThe timezone of the Debian system is kept in /etc/timezone.".into();
        let answer = extractive("How do I change the time zone of a Debian system?", &[plain, next], 1, OPEN, None);
        assert_eq!(answer.citations.len(), 1);
        assert_eq!(answer.citations[0].chunk_id, "p179");
    }

    #[test]
    fn sentences_keep_dotted_tokens_and_abbreviations_whole() {
        let text = "Edit postgresql.conf and set listen_addresses to 0.0.0.0 (see Section 24.3.1). It takes effect e.g. after a restart. Done!";
        assert_eq!(
            quoted(text, &sentences(text)),
            ["Edit postgresql.conf and set listen_addresses to 0.0.0.0 (see Section 24.3.1).", "It takes effect e.g. after a restart.", "Done!"]
        );
    }

    #[test]
    fn headings_and_list_items_are_their_own_sentences_but_wrapped_lines_are_not() {
        let text = "Connection settings\nThe server listens on port 5432 unless the\nport setting says otherwise.\n- max_connections: 100\n- timeout: 30 s";
        assert_eq!(
            quoted(text, &sentences(text)),
            ["Connection settings", "The server listens on port 5432 unless the\nport setting says otherwise.", "- max_connections: 100", "- timeout: 30 s"]
        );
    }

    #[test]
    fn quotes_the_sentence_holding_the_fact_exactly_with_its_source() {
        let hits = [
            hit("c1", "Lunch is served at noon in the main hall. The server listens on TCP port 5432 by default; change it with the port setting in postgresql.conf. Parking is free."),
            hit("c2", "The server keeps its data in the data directory."),
        ];
        let answer = extractive("Which port does the server listen on by default?", &hits, 4, OPEN, None);
        assert!(!answer.not_found);
        assert!(answer.text.starts_with("“The server listens on TCP port 5432 by default; change it with the port setting in postgresql.conf."), "{}", answer.text);
        assert!(answer.text.contains("— Server manual › Connections, page 3 [1]"), "{}", answer.text);
        assert_eq!(answer.citations[0].chunk_id, "c1");
        assert!(answer.citations[0].quote.as_deref().unwrap().contains("port 5432"));
    }

    #[test]
    fn the_fact_after_a_naming_sentence_is_quoted_with_it() {
        let hits = [hit("c1", "How to count words\nUse a Counter. Counter is a dict subclass for counting hashable objects, for example words in a list.")];
        let answer = extractive("How do I count how often each word occurs?", &hits, 4, OPEN, None);
        assert!(answer.text.contains("Counter is a dict subclass"), "{}", answer.text);
    }

    #[test]
    fn a_description_is_quoted_with_the_term_on_the_line_above_it() {
        let text = "Connections\nall_tasks()\nReturn all tasks that are not yet finished.\nawait gather()\nSchedule several coroutines and wait for all their results concurrently.\nawait wait_for()\nRun with a timeout.";
        let hits = [hit("c1", text)];
        let answer = extractive("How do I schedule several coroutines and wait for their results?", &hits, 4, OPEN, None);
        assert!(answer.text.starts_with("“await gather() Schedule several"), "{}", answer.text);
        // The passage's own heading is not quoted: the source label names it.
        let hits = [hit("c1", "Connections\nThe server listens on TCP port 5432 by default.")];
        let answer = extractive("Which port does the server listen on?", &hits, 4, OPEN, None);
        assert!(answer.text.starts_with("“The server listens"), "{}", answer.text);
    }

    #[test]
    fn an_unrelated_question_is_not_answered_from_whatever_was_retrieved() {
        let mut hits = vec![hit("c1", "The server listens on TCP port 5432 by default."), hit("c2", "Backups are taken with pg_dump every night.")];
        let answer = extractive("Who won the 2018 World Cup?", &hits, 4, OPEN, None);
        assert!(answer.not_found, "{}", answer.text);
        assert_eq!(answer.text, NOT_FOUND);
        assert!(answer.citations.is_empty());
        // With embeddings, a low similarity says the same even when a word matches.
        for h in &mut hits {
            h.similarity = Some(0.08);
        }
        hits[0].text = "The world's servers listen on port 5432.".into();
        assert!(extractive("Who won the 2018 World Cup?", &hits, 4, OPEN, None).not_found);
        // And a related one is answered.
        hits[0].similarity = Some(0.61);
        assert!(!extractive("Which port do servers listen on?", &hits, 4, OPEN, None).not_found);
    }

    #[test]
    fn a_sentence_close_in_meaning_wins_over_one_that_repeats_the_question_s_words() {
        let hits = [
            hit("c1", "Make sure everything functions as expected when code runs. Errors happen."),
            hit("c2", "Exceptions are raised on errors. The finally clause holds cleanup code, executed whether an exception occurred or not."),
        ];
        let question = "How do I make sure cleanup code runs whether or not an error happened?";
        let texts = candidate_texts(&hits);
        assert_eq!(texts.len(), 4, "{texts:?}");
        // Without meanings, the words decide.
        let lexical = extractive(question, &hits, 1, OPEN, None);
        // The finally sentence is the closest in meaning.
        let similarity: Vec<f32> = texts.iter().map(|t| if t.contains("finally") { 0.72 } else { 0.3 }).collect();
        let semantic = extractive(question, &hits, 1, OPEN, Some(&similarity));
        assert!(semantic.text.contains("The finally clause holds cleanup code"), "{}", semantic.text);
        assert_eq!(semantic.citations[0].chunk_id, "c2");
        assert!(lexical.text != semantic.text || lexical.citations[0].chunk_id == "c2");
        // Similarities that do not match the sentences are not used.
        assert_eq!(extractive(question, &hits, 1, OPEN, Some(&similarity[..2])).text, lexical.text);
    }

    #[test]
    fn says_so_when_nothing_is_found() {
        let answer = extractive("anything at all", &[], 3, OPEN, None);
        assert!(answer.not_found);
        assert!(answer.citations.is_empty());
    }

    #[test]
    fn quotes_are_capped_numbered_in_order_and_one_per_passage() {
        let hits: Vec<_> = (0..6).map(|i| hit(&format!("c{i}"), &format!("The backup tool number {i} copies the data directory. Backup runs nightly."))).collect();
        let answer = extractive("How does the backup tool copy the data directory?", &hits, 2, OPEN, None);
        assert_eq!(answer.citations.iter().map(|c| c.n).collect::<Vec<_>>(), [1, 2]);
        assert_ne!(answer.citations[0].chunk_id, answer.citations[1].chunk_id);
        assert!(answer.text.contains("[1]") && answer.text.contains("[2]") && !answer.text.contains("[3]"));
    }

    #[test]
    fn a_long_sentence_is_cut_at_a_word_on_a_char_boundary() {
        let long = format!("The port setting {} ends here.", "é".repeat(900));
        let hits = [hit("c1", &long)];
        let answer = extractive("port setting", &hits, 4, OPEN, None);
        assert!(answer.citations[0].quote.as_ref().unwrap().len() <= QUOTE_CHARS * 2);
    }
}
