//! Structure-aware chunking: blocks (pages, sections) are never merged; inside a block
//! paragraphs are packed up to a character budget, and paragraphs longer than the
//! budget are cut at sentence or word boundaries with overlap. Linear in the input:
//! every cut looks at most one budget's worth of text. Pure functions, no IO.

use common::wire::TextBlock;

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Draft {
    pub(crate) text: String,
    pub(crate) page: Option<u32>,
    pub(crate) section: Option<String>,
    /// Character (not byte) offsets into the extracted text, blocks joined by a blank line.
    pub(crate) char_start: u64,
    pub(crate) char_end: u64,
}

fn floor_boundary(text: &str, mut idx: usize) -> usize {
    idx = idx.min(text.len());
    while !text.is_char_boundary(idx) {
        idx -= 1;
    }
    idx
}

fn ceil_boundary(text: &str, mut idx: usize) -> usize {
    while idx < text.len() && !text.is_char_boundary(idx) {
        idx += 1;
    }
    idx
}

/// Cuts `text[start..end]` into pieces of at most `budget` bytes, overlapping by about `overlap`.
fn split_long(text: &str, start: usize, end: usize, budget: usize, overlap: usize, out: &mut Vec<(usize, usize)>) {
    let mut s = start;
    while s < end {
        if end - s <= budget {
            out.push((s, end));
            return;
        }
        let limit = floor_boundary(text, s + budget);
        let window = &text[s..limit];
        let half = budget / 2;
        let sentence = window
            .rmatch_indices(['.', '?', '!', '\n'])
            .map(|(i, m)| i + m.len())
            .find(|&i| i >= half && window[i..].starts_with(char::is_whitespace) || i == window.len());
        let word = || window.rfind(char::is_whitespace).filter(|&i| i >= half);
        let cut = match sentence.or_else(word) {
            Some(i) if i > 0 => s + i,
            _ => limit.max(ceil_boundary(text, s + 1)),
        };
        out.push((s, cut));
        let back = floor_boundary(text, cut.saturating_sub(overlap).max(s + 1));
        // Start the overlap at a word boundary so no chunk begins mid-word.
        let next = text[back..cut].find(char::is_whitespace).map(|i| back + i).unwrap_or(cut);
        s = ceil_boundary(text, next.max(s + 1));
        while s < end && text[s..].starts_with(char::is_whitespace) {
            s += text[s..].chars().next().map(char::len_utf8).unwrap_or(1);
        }
    }
}

/// Byte ranges of one block's chunks.
fn block_ranges(text: &str, budget: usize, overlap: usize) -> Vec<(usize, usize)> {
    let mut ranges = Vec::new();
    let mut group: Option<(usize, usize)> = None;
    let mut paragraph_start = 0;
    let mut boundaries: Vec<(usize, usize)> = text.match_indices("\n\n").map(|(i, m)| (i, i + m.len())).collect();
    boundaries.push((text.len(), text.len()));
    for (para_end, next_start) in boundaries {
        let (start, end) = (paragraph_start, para_end);
        paragraph_start = next_start;
        if text[start..end].trim().is_empty() {
            continue;
        }
        match group {
            Some((gs, _)) if end - gs <= budget => group = Some((gs, end)),
            _ => {
                if let Some(done) = group.take() {
                    ranges.push(done);
                }
                if end - start > budget {
                    split_long(text, start, end, budget, overlap, &mut ranges);
                } else {
                    group = Some((start, end));
                }
            }
        }
    }
    if let Some(done) = group {
        ranges.push(done);
    }
    ranges
}

pub(crate) fn chunk_blocks(blocks: &[TextBlock], budget: usize, overlap: usize) -> Vec<Draft> {
    let mut drafts = Vec::new();
    let mut block_char_offset: u64 = 0;
    for block in blocks {
        let text = block.text.as_str();
        // Offsets describe the chunk's text exactly, so trim each range first.
        let ranges: Vec<(usize, usize)> = block_ranges(text, budget.max(64), overlap.min(budget / 4))
            .into_iter()
            .map(|(start, end)| {
                let slice = &text[start..end];
                let leading = slice.len() - slice.trim_start().len();
                let trailing = slice.len() - slice.trim_end().len();
                (start + leading, (end - trailing).max(start + leading))
            })
            .collect();
        // One sweep turns the (sorted) byte positions into character positions.
        let mut positions: Vec<usize> = ranges.iter().flat_map(|(s, e)| [*s, *e]).collect();
        positions.sort_unstable();
        positions.dedup();
        let mut char_at = std::collections::HashMap::with_capacity(positions.len());
        let (mut byte, mut chars) = (0usize, 0u64);
        for position in positions {
            chars += text[byte..position].chars().count() as u64;
            byte = position;
            char_at.insert(position, chars);
        }
        for (start, end) in ranges {
            if start == end {
                continue;
            }
            drafts.push(Draft {
                text: text[start..end].to_string(),
                page: block.page,
                section: block.section.clone(),
                char_start: block_char_offset + char_at.get(&start).copied().unwrap_or(0),
                char_end: block_char_offset + char_at.get(&end).copied().unwrap_or(0),
            });
        }
        block_char_offset += text.chars().count() as u64 + 2;
    }
    drafts
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn block(text: &str, page: Option<u32>, section: Option<&str>) -> TextBlock {
        TextBlock { text: text.into(), page, section: section.map(str::to_string) }
    }

    #[test]
    fn small_blocks_stay_whole_and_keep_structure() {
        let drafts = chunk_blocks(&[block("Intro paragraph.\n\nSecond one.", Some(1), None), block("Page two.", Some(2), Some("A > B"))], 200, 20);
        assert_eq!(drafts.len(), 2);
        assert_eq!(drafts[0].text, "Intro paragraph.\n\nSecond one.");
        assert_eq!(drafts[1].page, Some(2));
        assert_eq!(drafts[1].section.as_deref(), Some("A > B"));
        assert_eq!(drafts[1].char_start, 31);
    }

    #[test]
    fn long_text_is_cut_within_budget_with_overlap_and_full_coverage() {
        let sentence = "The quick brown fox jumps over the lazy dog. ";
        let text = sentence.repeat(100);
        let drafts = chunk_blocks(&[block(&text, None, None)], 300, 50);
        assert!(drafts.len() > 10);
        for d in &drafts {
            assert!(d.text.len() <= 300, "{}", d.text.len());
            assert!(d.text.starts_with("The") || d.text.starts_with(char::is_alphabetic), "{:?}", &d.text[..20]);
        }
        for pair in drafts.windows(2) {
            assert!(pair[1].char_start < pair[0].char_end, "consecutive pieces overlap");
        }
        assert_eq!(drafts.last().unwrap().char_end as usize, text.trim_end().len());
    }

    #[test]
    fn offsets_count_characters_not_bytes() {
        let text = "ééé\n\nabc";
        let drafts = chunk_blocks(&[block(text, None, None), block("x", None, None)], 64, 0);
        assert_eq!(drafts[0].char_end, 8);
        assert_eq!(drafts[1].char_start, 10);
    }

    #[test]
    fn text_without_spaces_or_newlines_is_hard_cut() {
        let text = "é".repeat(5000);
        let drafts = chunk_blocks(&[block(&text, None, None)], 500, 50);
        assert!(drafts.iter().all(|d| d.text.len() <= 500));
        let covered: u64 = drafts.last().unwrap().char_end;
        assert_eq!(covered, 5000);
    }

    #[test]
    fn hard_wrapped_text_without_blank_lines_is_chunked_whole() {
        // The shape that makes naive splitters quadratic (B2 measures the speed).
        let line = "word ".repeat(14) + "\n";
        let text = line.repeat(1024 * 1024 / line.len());
        let drafts = chunk_blocks(&[block(&text, None, None)], 1200, 150);
        assert!(drafts.len() > 800);
        assert!(drafts.iter().all(|d| d.text.len() <= 1200));
        assert_eq!(drafts.last().unwrap().char_end as usize, text.trim_end().len());
    }
}
