//! Extraction: plain text, Markdown, HTML and PDF (and, through `office`, Office files,
//! CSV/TSV and JSON; through `opendoc`, ODT, ODS, EPUB and RTF) into
//! `TextBlock`s that keep pages and heading paths. Pure functions over bytes; no IO,
//! no async. Callers bound the input size and the time spent.

use std::collections::{HashMap, HashSet};

use common::formats::Format;
use common::wire::{ParsedDocument, TextBlock};

#[derive(Debug, thiserror::Error, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum ParseError {
    #[error("the file is empty")]
    Empty,
    #[error("unsupported file type `{0}`; supported: PDF, Word (.docx), PowerPoint (.pptx), Excel (.xlsx), OpenDocument text and spreadsheets (.odt, .ods), EPUB, RTF, CSV/TSV, JSON, HTML, Markdown, plain text, and PNG/JPEG/TIFF images (read by OCR)")]
    Unsupported(String),
    #[error("the file is not valid UTF-8 text")]
    NotUtf8,
    #[error("the file is encrypted (password-protected); remove the password and upload it again")]
    Encrypted,
    #[error("the file is corrupt or unreadable: {0}")]
    Corrupt(String),
    #[error("the file has no extractable text")]
    NoText,
    #[error("the file is larger than the limit of {0} bytes")]
    TooLarge(usize),
    /// The limit, in milliseconds.
    /// A PDF of `0` pages none of which has a text layer (a scan): OCR's turn.
    #[error("the PDF has no text layer (a scan of {0} pages), and OCR could not read it")]
    NoTextLayer(u32),
    #[error("{0}")]
    OcrUnavailable(String),
    #[error("extraction took longer than its limit of {} s", *.0 as f64 / 1000.0)]
    Timeout(u64),
}

pub fn extract(format: Format, bytes: &[u8]) -> Result<ParsedDocument, ParseError> {
    if bytes.is_empty() {
        return Err(ParseError::Empty);
    }
    let (blocks, n_pages, title) = match format {
        Format::Text => (plain_text(utf8(bytes)?), None, None),
        Format::Markdown => {
            let blocks = markdown(utf8(bytes)?);
            // The first heading names the document.
            let title = blocks.first().and_then(|b| b.section.as_ref()).map(|s| s.split(" > ").next().unwrap_or_default().to_string());
            (blocks, None, title)
        }
        Format::Html => {
            let (blocks, title) = html(utf8(bytes)?);
            (blocks, None, title)
        }
        Format::Pdf => {
            let blocks = pdf(bytes)?;
            let n_pages = blocks.iter().filter_map(|b| b.page).max();
            (blocks, n_pages, None)
        }
        Format::Docx | Format::Pptx | Format::Xlsx => {
            let (blocks, title) = crate::office::office(bytes)?;
            let n_pages = if format == Format::Pptx { blocks.iter().filter_map(|b| b.page).max() } else { None };
            (blocks, n_pages, title)
        }
        Format::Odt => {
            let (blocks, title) = crate::opendoc::odt(bytes)?;
            (blocks, None, title)
        }
        Format::Ods => {
            let (blocks, title) = crate::opendoc::ods(bytes)?;
            (blocks, None, title)
        }
        Format::Epub => {
            let (blocks, title) = crate::opendoc::epub(bytes)?;
            (blocks, None, title)
        }
        Format::Rtf => (crate::opendoc::rtf(bytes)?, None, None),
        Format::Csv => (crate::office::delimited(bytes, b',')?, None, None),
        Format::Tsv => (crate::office::delimited(bytes, b'\t')?, None, None),
        Format::Json => (crate::office::json(bytes)?, None, None),
        // Images are read by OCR, outside the workers (`ocr.rs`).
        Format::Image => return Err(ParseError::NoText),
    };
    let blocks: Vec<TextBlock> = blocks.into_iter().filter(|b| !b.text.trim().is_empty()).collect();
    if blocks.is_empty() {
        return Err(match (format, n_pages) {
            (Format::Pdf, Some(pages)) => ParseError::NoTextLayer(pages),
            _ => ParseError::NoText,
        });
    }
    Ok(ParsedDocument { format: format.as_str().to_string(), blocks, n_pages, title })
}

fn utf8(bytes: &[u8]) -> Result<&str, ParseError> {
    let text = std::str::from_utf8(bytes).map_err(|_| ParseError::NotUtf8)?;
    Ok(text.strip_prefix('\u{feff}').unwrap_or(text))
}

pub(crate) fn plain_text(text: &str) -> Vec<TextBlock> {
    vec![TextBlock { text: text.replace("\r\n", "\n"), page: None, section: None }]
}

/// Joins the heading stack into a path such as `Install > Linux`.
pub(crate) fn section_path(headings: &[(u8, String)]) -> Option<String> {
    if headings.is_empty() {
        None
    } else {
        Some(headings.iter().map(|(_, h)| h.as_str()).collect::<Vec<_>>().join(" > "))
    }
}

pub(crate) fn push_heading(headings: &mut Vec<(u8, String)>, level: u8, title: String) {
    while headings.last().is_some_and(|(l, _)| *l >= level) {
        headings.pop();
    }
    headings.push((level, title));
}

/// One block per section: the heading's own text starts it so searches for a
/// heading find its section.
fn markdown(text: &str) -> Vec<TextBlock> {
    use pulldown_cmark::{Event, HeadingLevel, Options, Parser, Tag, TagEnd};
    let mut blocks = Vec::new();
    let mut headings: Vec<(u8, String)> = Vec::new();
    let mut current = String::new();
    let mut heading_text: Option<(u8, String)> = None;
    let flush = |blocks: &mut Vec<TextBlock>, current: &mut String, headings: &[(u8, String)]| {
        if !current.trim().is_empty() {
            blocks.push(TextBlock { text: current.trim().to_string(), page: None, section: section_path(headings) });
        }
        current.clear();
    };
    let level_of = |level: HeadingLevel| match level {
        HeadingLevel::H1 => 1,
        HeadingLevel::H2 => 2,
        HeadingLevel::H3 => 3,
        HeadingLevel::H4 => 4,
        HeadingLevel::H5 => 5,
        HeadingLevel::H6 => 6,
    };
    for event in Parser::new_ext(text, Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH) {
        match event {
            Event::Start(Tag::Heading { level, .. }) => {
                flush(&mut blocks, &mut current, &headings);
                heading_text = Some((level_of(level), String::new()));
            }
            Event::End(TagEnd::Heading(_)) => {
                if let Some((level, title)) = heading_text.take() {
                    let title = title.trim().to_string();
                    push_heading(&mut headings, level, title.clone());
                    current.push_str(&title);
                    current.push_str("\n\n");
                }
            }
            Event::Text(t) | Event::Code(t) => match heading_text.as_mut() {
                Some((_, title)) => title.push_str(&t),
                None => current.push_str(&t),
            },
            Event::SoftBreak | Event::HardBreak => current.push('\n'),
            Event::End(TagEnd::Paragraph | TagEnd::Item | TagEnd::CodeBlock | TagEnd::BlockQuote(_) | TagEnd::TableRow | TagEnd::TableHead) => {
                current.push_str("\n\n");
            }
            Event::End(TagEnd::TableCell) => current.push_str(" | "),
            _ => {}
        }
    }
    flush(&mut blocks, &mut current, &headings);
    blocks
}

/// Page furniture that is not the page's content: navigation, headers and footers,
/// side bars (HTML5 elements, ARIA roles, and the class names documentation
/// generators such as Sphinx use).
fn is_furniture(element: &scraper::ElementRef<'_>) -> bool {
    let value = element.value();
    if matches!(value.name(), "nav" | "header" | "footer" | "aside" | "script" | "style" | "noscript" | "template") {
        return true;
    }
    if value.attr("role").is_some_and(|role| matches!(role, "navigation" | "banner" | "contentinfo" | "search")) {
        return true;
    }
    value.classes().any(|class| matches!(class, "related" | "sphinxsidebar" | "footer" | "breadcrumbs" | "navbar" | "headerlink"))
}

/// A `<pre>` block's text as lines: trailing white space and blank lines dropped,
/// indentation kept.
fn code_lines(text: &str) -> String {
    text.lines().map(str::trim_end).filter(|line| !line.is_empty()).collect::<Vec<_>>().join("\n")
}

/// A block's text as a reader sees it: prose with its white space collapsed (inline
/// elements join: `<code>os</code>.environ` is `os.environ`), and code — a `<pre>`,
/// also one inside a list item or a definition — on lines of its own with its
/// indentation. Joined into one line, an example reads as one long sentence and
/// quotes run together. Heading permalinks' pilcrows are no text.
fn block_text(block: scraper::ElementRef<'_>) -> String {
    use ego_tree::iter::Edge;
    let mut runs: Vec<(bool, String)> = Vec::new();
    // One pass (linear however deep the nesting): how many `<pre>` we are inside.
    let mut pre_depth = 0usize;
    for edge in block.traverse() {
        let (node, opening) = match edge {
            Edge::Open(node) => (node, true),
            Edge::Close(node) => (node, false),
        };
        if node.value().as_element().is_some_and(|e| e.name() == "pre") {
            pre_depth = if opening { pre_depth + 1 } else { pre_depth.saturating_sub(1) };
            continue;
        }
        let Some(text) = node.value().as_text().filter(|_| opening) else { continue };
        let code = pre_depth > 0;
        match runs.last_mut() {
            Some((kind, run)) if *kind == code => run.push_str(text),
            _ => runs.push((code, text.to_string())),
        }
    }
    let mut out: Vec<String> = Vec::new();
    for (code, run) in runs {
        let run = run.replace('¶', "");
        let run = if code { code_lines(&run) } else { run.split_whitespace().collect::<Vec<_>>().join(" ") };
        if !run.is_empty() {
            out.push(run);
        }
    }
    out.join("\n")
}

/// Block elements whose text becomes a paragraph (nested blocks count once, whole).
const HTML_BLOCKS: [&str; 16] = ["h1", "h2", "h3", "h4", "h5", "h6", "p", "li", "pre", "blockquote", "td", "th", "dt", "dd", "figcaption", "caption"];

/// One walk over the parsed page, in document order, with an explicit stack (nesting
/// depth costs nothing): furniture is skipped whole, and a block's text is taken whole
/// without descending into it, so each text node is read once.
pub(crate) fn html(text: &str) -> (Vec<TextBlock>, Option<String>) {
    use scraper::{ElementRef, Html};
    let document = Html::parse_document(text);
    let mut title = None;
    let mut blocks: Vec<TextBlock> = Vec::new();
    let mut headings: Vec<(u8, String)> = Vec::new();
    let mut current = String::new();
    let mut stack = vec![*document.root_element()];
    while let Some(node) = stack.pop() {
        let Some(element) = ElementRef::wrap(node) else { continue };
        let name = element.value().name();
        if name == "title" && title.is_none() {
            let text = element.text().collect::<String>();
            let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
            title = (!text.is_empty()).then(|| text.chars().take(300).collect());
            continue;
        }
        if is_furniture(&element) {
            continue;
        }
        if !HTML_BLOCKS.contains(&name) {
            let children: Vec<_> = node.children().collect();
            stack.extend(children.into_iter().rev());
            continue;
        }
        // Inline elements join as the browser shows them (`<code>os</code>.environ`
        // is `os.environ`); the pilcrows of heading permalinks are no text.
        let content = block_text(element);
        if content.is_empty() {
            continue;
        }
        if let Some(level) = name.strip_prefix('h').and_then(|l| l.parse::<u8>().ok()) {
            if !current.trim().is_empty() {
                blocks.push(TextBlock { text: current.trim().to_string(), page: None, section: section_path(&headings) });
            }
            current.clear();
            push_heading(&mut headings, level, content.clone());
        }
        current.push_str(&content);
        current.push_str("\n\n");
    }
    if !current.trim().is_empty() {
        blocks.push(TextBlock { text: current.trim().to_string(), page: None, section: section_path(&headings) });
    }
    if blocks.is_empty() {
        // No block elements: fall back to all visible body text.
        if let Ok(body) = scraper::Selector::parse("body") {
            let text: String = document.select(&body).flat_map(|b| b.text()).collect::<Vec<_>>().join(" ");
            let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
            blocks.push(TextBlock { text, page: None, section: None });
        }
    }
    (blocks, title)
}

/// The text one `PlainTextOutput` writes, shared with the page splitter around it.
#[derive(Clone, Default)]
struct SharedText(std::rc::Rc<std::cell::RefCell<String>>);

impl std::fmt::Write for SharedText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.borrow_mut().push_str(s);
        Ok(())
    }
}

impl pdf_extract::ConvertToFmt for SharedText {
    type Writer = SharedText;
    fn convert(self) -> SharedText {
        self
    }
}

/// pdf-extract's plain-text output over the whole document in one pass, noting where
/// each page starts (its per-page functions walk the page tree once per page: quadratic).
/// A page's glyphs are held until it ends, so that a two-column page whose content
/// stream runs across both columns line by line is written one column after the other
/// (`column_order`); any other page is written in the stream's own order.
struct PagedText {
    text: SharedText,
    inner: pdf_extract::PlainTextOutput<SharedText>,
    starts: Vec<(u32, usize)>,
    page: Vec<GlyphEvent>,
    /// The page's characters, each event's a range of it (one allocation per page).
    page_text: String,
}

/// What pdf-extract reports of a page, in stream order (`PlainTextOutput` reads only
/// word starts and characters).
enum GlyphEvent {
    Word,
    Char { trm: pdf_extract::Transform, width: f64, spacing: f64, font_size: f64, text: std::ops::Range<usize> },
}

impl pdf_extract::OutputDev for PagedText {
    fn begin_page(&mut self, page_num: u32, media_box: &pdf_extract::MediaBox, art_box: Option<(f64, f64, f64, f64)>) -> Result<(), pdf_extract::OutputError> {
        self.starts.push((page_num, self.text.0.borrow().len()));
        self.page.clear();
        self.page_text.clear();
        self.inner.begin_page(page_num, media_box, art_box)
    }
    fn end_page(&mut self) -> Result<(), pdf_extract::OutputError> {
        let events = std::mem::take(&mut self.page);
        let order = column_order(&events, &self.page_text);
        for index in order.unwrap_or_else(|| (0..events.len()).collect()) {
            match &events[index] {
                GlyphEvent::Word => self.inner.begin_word()?,
                GlyphEvent::Char { trm, width, spacing, font_size, text } => self.inner.output_character(trm, *width, *spacing, *font_size, &self.page_text[text.clone()])?,
            }
        }
        self.inner.end_page()
    }
    fn output_character(&mut self, trm: &pdf_extract::Transform, width: f64, spacing: f64, font_size: f64, char: &str) -> Result<(), pdf_extract::OutputError> {
        let start = self.page_text.len();
        self.page_text.push_str(char);
        self.page.push(GlyphEvent::Char { trm: *trm, width, spacing, font_size, text: start..self.page_text.len() });
        Ok(())
    }
    fn begin_word(&mut self) -> Result<(), pdf_extract::OutputError> {
        self.page.push(GlyphEvent::Word);
        Ok(())
    }
    fn end_word(&mut self) -> Result<(), pdf_extract::OutputError> {
        Ok(())
    }
    fn end_line(&mut self) -> Result<(), pdf_extract::OutputError> {
        Ok(())
    }
}

/// A glyph's place on the page: left and right edge, baseline (PDF space, y up).
#[derive(Clone, Copy)]
struct GlyphBox {
    x0: f64,
    x1: f64,
    y: f64,
}

fn glyph_box(trm: &pdf_extract::Transform, width: f64, font_size: f64) -> GlyphBox {
    // The font size in device space, as `PlainTextOutput` measures it.
    let (sx, sy) = (font_size * (trm.m11 + trm.m21), font_size * (trm.m12 + trm.m22));
    let size = (sx * sy).abs().sqrt();
    GlyphBox { x0: trm.m31, x1: trm.m31 + width * size, y: trm.m32 }
}

/// Fewest glyphs on a page worth looking for columns in.
const COLUMN_MIN_GLYPHS: usize = 200;
/// Width of the bins the page's text is measured in, and the narrowest gutter (points).
const COLUMN_BIN: f64 = 2.0;
const COLUMN_MIN_GUTTER: f64 = 8.0;
/// Lines allowed to cross a gutter: a title, a running header or footer across both.
const COLUMN_CROSSING_LINES: usize = 3;

/// The order to write a page's events in when the page is two columns of prose whose
/// stream interleaves them (each line of the left column followed by the line beside
/// it): lines across both columns above them first, then the left column, then the
/// right, then anything else across both. `None` — keep the stream's order — when no
/// gutter runs down the middle, when either side is not prose (a table's cells rarely
/// fill their column, so a table keeps its rows), or when the stream already gives
/// one column after the other. Linear in the page's glyphs.
fn column_order(events: &[GlyphEvent], page_text: &str) -> Option<Vec<usize>> {
    let boxes: Vec<Option<GlyphBox>> = events
        .iter()
        .map(|event| match event {
            GlyphEvent::Char { trm, width, font_size, text, .. } if !page_text[text.clone()].trim().is_empty() => Some(glyph_box(trm, *width, *font_size)),
            _ => None,
        })
        .collect();
    let glyphs: Vec<GlyphBox> = boxes.iter().flatten().copied().filter(|g| g.x0.is_finite() && g.x1.is_finite() && g.y.is_finite()).collect();
    if glyphs.len() < COLUMN_MIN_GLYPHS {
        return None;
    }
    let left_edge = glyphs.iter().map(|g| g.x0).fold(f64::INFINITY, f64::min);
    let right_edge = glyphs.iter().map(|g| g.x1.max(g.x0)).fold(f64::NEG_INFINITY, f64::max);
    let width = right_edge - left_edge;
    if !(width > 4.0 * COLUMN_MIN_GUTTER && width < 20_000.0) {
        return None;
    }
    // How many lines (baselines to the point) cover each bin across the text.
    let bins = (width / COLUMN_BIN).ceil() as usize + 1;
    let mut lines_over: Vec<HashSet<i64>> = vec![HashSet::new(); bins];
    for g in &glyphs {
        let (from, to) = (((g.x0 - left_edge) / COLUMN_BIN).floor().max(0.0) as usize, ((g.x1 - left_edge) / COLUMN_BIN).floor().max(0.0) as usize);
        for bin in lines_over.iter_mut().take(to.min(bins - 1) + 1).skip(from.min(bins - 1)) {
            if bin.len() <= COLUMN_CROSSING_LINES {
                bin.insert(g.y.round() as i64);
            }
        }
    }
    // The widest run of (nearly) empty bins in the middle 40 % of the text.
    let (first, last) = ((bins as f64 * 0.3) as usize, (bins as f64 * 0.7) as usize);
    let (mut best, mut run_start) = (None::<(usize, usize)>, None::<usize>);
    for (bin, over) in lines_over.iter().enumerate().take(last.min(bins - 1) + 1).skip(first) {
        if over.len() <= COLUMN_CROSSING_LINES {
            let start = *run_start.get_or_insert(bin);
            if best.is_none_or(|(a, b)| bin - start > b - a) {
                best = Some((start, bin));
            }
        } else {
            run_start = None;
        }
    }
    let (a, b) = best?;
    if ((b - a + 1) as f64) * COLUMN_BIN < COLUMN_MIN_GUTTER {
        return None;
    }
    // The gutter's middle: a glyph over it is across (the few lines allowed to reach
    // into the run — a column's longest lines, a title — must not shift the sides).
    let middle = left_edge + (a + b + 1) as f64 * COLUMN_BIN / 2.0;
    #[derive(Clone, Copy, PartialEq)]
    enum Side {
        Left,
        Right,
        Across,
    }
    let crosses = |g: &GlyphBox| g.x0 < middle && g.x1 > middle;
    // A line with a glyph across the gutter is across as a whole (a title, a footer).
    let across: HashSet<i64> = glyphs.iter().filter(|g| crosses(g)).map(|g| g.y.round() as i64).collect();
    let side_of = |g: &GlyphBox| {
        if across.contains(&(g.y.round() as i64)) {
            Side::Across
        } else if g.x1 <= middle {
            Side::Left
        } else {
            Side::Right
        }
    };
    // Prose on both sides: enough of the page, enough lines, most of them filling
    // their column (a paragraph's last line need not).
    let fills = |side: Side| -> bool {
        let mut lines: HashMap<i64, (f64, f64)> = HashMap::new();
        for g in glyphs.iter().filter(|g| side_of(g) == side) {
            let line = lines.entry(g.y.round() as i64).or_insert((f64::INFINITY, f64::NEG_INFINITY));
            *line = (line.0.min(g.x0), line.1.max(g.x1));
        }
        if lines.len() < 5 {
            return false;
        }
        let start = lines.values().map(|l| l.0).fold(f64::INFINITY, f64::min);
        let end = lines.values().map(|l| l.1).fold(f64::NEG_INFINITY, f64::max);
        let full = lines.values().filter(|l| l.1 >= end - 0.2 * (end - start)).count();
        full * 2 >= lines.len()
    };
    let count = |side: Side| glyphs.iter().filter(|g| side_of(g) == side).count();
    if count(Side::Left) * 4 < glyphs.len() || count(Side::Right) * 4 < glyphs.len() || !fills(Side::Left) || !fills(Side::Right) {
        return None;
    }
    // Already one column after the other: the stream's order is the reading order.
    let sides: Vec<Side> = glyphs.iter().map(side_of).filter(|s| *s != Side::Across).collect();
    let switches = sides.windows(2).filter(|w| w[0] != w[1]).count();
    if switches <= 2 {
        return None;
    }
    let columns_top = glyphs.iter().filter(|g| side_of(g) != Side::Across).map(|g| g.y).fold(f64::NEG_INFINITY, f64::max);
    // Each event's group; a word start goes with the character after it.
    let mut groups = vec![3u8; events.len()];
    let mut next = 3u8;
    for index in (0..events.len()).rev() {
        if let Some(g) = boxes[index] {
            next = match side_of(&g) {
                Side::Left => 1,
                Side::Right => 2,
                Side::Across if g.y > columns_top => 0,
                Side::Across => 3,
            };
        }
        groups[index] = next;
    }
    let mut order: Vec<usize> = (0..events.len()).collect();
    order.sort_by_key(|&index| groups[index]);
    Some(order)
}

fn pdf_error(error: impl std::fmt::Display) -> ParseError {
    let message = error.to_string();
    if message.to_ascii_lowercase().contains("encrypt") || message.to_ascii_lowercase().contains("password") {
        ParseError::Encrypted
    } else {
        ParseError::Corrupt(message.chars().take(200).collect())
    }
}

fn pdf(bytes: &[u8]) -> Result<Vec<TextBlock>, ParseError> {
    if !bytes.starts_with(b"%PDF-") {
        return Err(ParseError::Corrupt("missing the %PDF header".into()));
    }
    let mut document = pdf_extract::Document::load_mem(bytes).map_err(pdf_error)?;
    if document.is_encrypted() {
        // Readable without a password (an owner password only) or not at all.
        document.decrypt("").map_err(|_| ParseError::Encrypted)?;
    }
    let text = SharedText::default();
    let mut output = PagedText { text: text.clone(), inner: pdf_extract::PlainTextOutput::new(text.clone()), starts: Vec::new(), page: Vec::new(), page_text: String::new() };
    pdf_extract::output_doc(&document, &mut output).map_err(pdf_error)?;
    let PagedText { starts, inner, .. } = output;
    drop(inner);
    let text = text.0.take();
    let mut pages = Vec::with_capacity(starts.len());
    for (i, &(page, start)) in starts.iter().enumerate() {
        let end = starts.get(i + 1).map_or(text.len(), |&(_, next)| next);
        pages.push((page, text[start..end].to_string()));
    }
    Ok(sectioned(tidy_pages(pages), &outline(&document)))
}

/// One bookmark of a PDF's outline: the page it opens, its title, its heading path.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct OutlineEntry {
    pub(crate) page: u32,
    pub(crate) title: String,
    pub(crate) path: String,
}

/// Bookmarks read at most; levels of nesting kept in a heading path.
const MAX_OUTLINE_ENTRIES: usize = 20_000;
const MAX_OUTLINE_DEPTH: usize = 8;

/// A PDF's outline (bookmarks) in reading order, each with the page it opens — the
/// manual's own table of contents, which gives every page the heading path a reader
/// sees in the sidebar. Read defensively: an entry is visited once (a cycle of
/// `/Next` or `/First` links ends the walk there), nesting and count are bounded, and
/// an entry whose destination cannot be resolved is skipped. No outline: empty.
pub(crate) fn outline(document: &pdf_extract::Document) -> Vec<OutlineEntry> {
    use pdf_extract::Object;
    let pages: HashMap<pdf_extract::ObjectId, u32> = document.get_pages().into_iter().map(|(number, id)| (id, number)).collect();
    let deref = |object: &'_ Object| -> Option<Object> { document.dereference(object).ok().map(|(_, o)| o.clone()) };
    let Ok(catalog) = document.catalog() else { return vec![] };
    let Some(Object::Dictionary(root)) = catalog.get(b"Outlines").ok().and_then(deref) else { return vec![] };
    // Named destinations: the catalog's /Dests dictionary, or the /Names /Dests tree.
    let mut named: HashMap<Vec<u8>, Object> = HashMap::new();
    if let Some(Object::Dictionary(dests)) = catalog.get(b"Dests").ok().and_then(deref) {
        for (name, value) in dests.iter() {
            named.insert(name.clone(), value.clone());
        }
    }
    if let Some(Object::Dictionary(names)) = catalog.get(b"Names").ok().and_then(deref)
        && let Some(tree) = names.get(b"Dests").ok().and_then(deref)
    {
        let mut stack = vec![tree];
        let mut nodes = 0;
        while let Some(Object::Dictionary(node)) = stack.pop() {
            nodes += 1;
            if nodes > MAX_OUTLINE_ENTRIES || named.len() > MAX_OUTLINE_ENTRIES {
                break;
            }
            if let Some(Object::Array(pairs)) = node.get(b"Names").ok().and_then(deref) {
                for pair in pairs.chunks_exact(2) {
                    if let Object::String(name, _) = &pair[0] {
                        named.insert(name.clone(), pair[1].clone());
                    }
                }
            }
            if let Some(Object::Array(kids)) = node.get(b"Kids").ok().and_then(deref) {
                stack.extend(kids.iter().filter_map(deref));
            }
        }
    }
    // A destination as the page it opens: [page /XYZ …], a name, or a dictionary with /D.
    let page_of = |destination: &Object| -> Option<u32> {
        let mut current = deref(destination)?;
        for _ in 0..4 {
            current = match current {
                Object::Array(items) => return items.first().and_then(|first| first.as_reference().ok()).and_then(|id| pages.get(&id).copied()),
                Object::String(name, _) | Object::Name(name) => deref(named.get(&name)?)?,
                Object::Dictionary(dictionary) => deref(dictionary.get(b"D").ok()?)?,
                _ => return None,
            };
        }
        None
    };
    let mut entries = Vec::new();
    let mut visited: HashSet<pdf_extract::ObjectId> = HashSet::new();
    // (the next entry to read, the titles above it)
    let mut stack: Vec<(Object, Vec<String>)> = root.get(b"First").ok().map(|first| (first.clone(), Vec::new())).into_iter().collect();
    while let Some((link, parents)) = stack.pop() {
        if entries.len() >= MAX_OUTLINE_ENTRIES {
            break;
        }
        let Ok(id) = link.as_reference() else { continue };
        if !visited.insert(id) {
            continue;
        }
        let Ok(Object::Dictionary(item)) = document.get_object(id) else { continue };
        // Its next sibling after its children: pushed first, popped last.
        if let Ok(next) = item.get(b"Next") {
            stack.push((next.clone(), parents.clone()));
        }
        let title = item.get(b"Title").ok().and_then(deref).and_then(|t| match t {
            Object::String(bytes, _) => Some(text_string(&bytes)),
            _ => None,
        });
        let title = title.map(|t| t.split_whitespace().collect::<Vec<_>>().join(" ")).filter(|t| !t.is_empty());
        let destination = item.get(b"Dest").ok().cloned().or_else(|| match item.get(b"A").ok().and_then(deref) {
            Some(Object::Dictionary(action)) if action.get(b"S").ok().and_then(|s| s.as_name().ok()) == Some(b"GoTo") => action.get(b"D").ok().cloned(),
            _ => None,
        });
        let mut path = parents.clone();
        if let Some(title) = &title {
            path.push(title.clone());
        }
        if let (Some(title), Some(page)) = (title, destination.as_ref().and_then(&page_of)) {
            entries.push(OutlineEntry { page, title, path: path.join(" > ") });
        }
        if let Ok(first) = item.get(b"First")
            && path.len() < MAX_OUTLINE_DEPTH
        {
            stack.push((first.clone(), path));
        }
    }
    entries
}

/// A PDF text string: UTF-16 with its byte-order mark, UTF-8 with its mark, else
/// PDFDocEncoding (read as Latin-1, which it matches for letters).
fn text_string(bytes: &[u8]) -> String {
    let utf16 = |big: bool| -> String {
        let units: Vec<u16> = bytes[2..].chunks_exact(2).map(|b| if big { u16::from_be_bytes([b[0], b[1]]) } else { u16::from_le_bytes([b[0], b[1]]) }).collect();
        String::from_utf16_lossy(&units)
    };
    match bytes {
        [0xFE, 0xFF, ..] => utf16(true),
        [0xFF, 0xFE, ..] => utf16(false),
        [0xEF, 0xBB, 0xBF, rest @ ..] => String::from_utf8_lossy(rest).into_owned(),
        _ => bytes.iter().map(|&b| char::from(b)).collect(),
    }
}

/// Pages given the heading path of the outline entry they fall under. A page where an
/// entry begins is cut where its title stands on a line of its own (so the end of the
/// previous section keeps its own path); when the title is not found on the page, the
/// entry's section starts with the page. Pages before the first entry keep none.
pub(crate) fn sectioned(pages: Vec<TextBlock>, outline: &[OutlineEntry]) -> Vec<TextBlock> {
    if outline.is_empty() {
        return pages;
    }
    let mut starting: HashMap<u32, Vec<&OutlineEntry>> = HashMap::new();
    for entry in outline {
        starting.entry(entry.page).or_default().push(entry);
    }
    let normal = |text: &str| text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
    let mut current: Option<String> = None;
    let mut out = Vec::with_capacity(pages.len());
    for page in pages {
        let Some(entries) = page.page.and_then(|p| starting.get(&p)) else {
            out.push(TextBlock { section: current.clone(), ..page });
            continue;
        };
        // Line starts (byte offsets) and their normalised text.
        let mut lines: Vec<(usize, String)> = Vec::new();
        let mut offset = 0;
        for line in page.text.split_inclusive('\n') {
            lines.push((offset, normal(line)));
            offset += line.len();
        }
        let (mut cursor, mut line_cursor) = (0, 0);
        let push = |range: std::ops::Range<usize>, section: &Option<String>, out: &mut Vec<TextBlock>| {
            let text = page.text[range].trim();
            if !text.is_empty() {
                out.push(TextBlock { text: text.to_string(), page: page.page, section: section.clone() });
            }
        };
        for entry in entries {
            let title = normal(&entry.title);
            // The title on a line of its own, or a line it begins (a heading followed by
            // text on one line), with or without the heading's number before it — the
            // outline of most manuals says "The terminal configuration" where the page
            // says "9.5.6 The terminal configuration". Searched from where the last
            // entry was found.
            let found = lines[line_cursor..].iter().position(|(_, line)| {
                [line.as_str(), without_number(line)].into_iter().any(|line| line == title || (line.starts_with(&title) && title.len() >= 12))
            });
            if let Some(found) = found {
                let at = lines[line_cursor + found].0;
                push(cursor..at, &current, &mut out);
                cursor = at;
                line_cursor += found + 1;
            }
            current = Some(entry.path.clone());
        }
        let before = out.len();
        push(cursor..page.text.len(), &current, &mut out);
        if out.len() == before && out.last().is_none_or(|b| b.page != page.page) {
            // Every page keeps a block, even an empty one (the page count, OCR).
            out.push(TextBlock { text: String::new(), page: page.page, section: current.clone() });
        }
    }
    out
}

/// A heading line without the number it starts with ("9.5.6 ", "A.2. ", "3) "); the
/// line itself when it starts with no number.
fn without_number(line: &str) -> &str {
    let Some((first, rest)) = line.split_once(' ') else { return line };
    let number = first.trim_end_matches(['.', ')', ':']);
    let mut parts = number.split('.');
    let head = parts.next().unwrap_or_default();
    let head_ok = head.bytes().all(|b| b.is_ascii_digit()) || (head.len() == 1 && head.bytes().all(|b| b.is_ascii_alphabetic()) && number.len() > 1);
    let numbered = !number.is_empty() && head_ok && parts.all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) && number.bytes().any(|b| b.is_ascii_digit());
    if numbered { rest.trim_start() } else { line }
}

/// A line with its digits as `#` and its spaces collapsed: how a running header or
/// footer ("Page 12 of 80", "Admin Guide — 3") looks the same on every page.
fn furniture_key(line: &str) -> String {
    line.split_whitespace().collect::<Vec<_>>().join(" ").chars().map(|c| if c.is_ascii_digit() { '#' } else { c }).collect()
}

/// How many lines at the top and at the bottom of a page may be running furniture.
const EDGE_LINES: usize = 2;

/// PDF pages as readers see them: running headers and footers (the same line, numbers
/// aside, at the top or bottom of at least half the pages, and of three at least)
/// removed; words hyphenated across lines joined; ligatures (ﬁ, ﬂ, …) spelled out; text
/// that was UTF-8 read as Latin-1 ("CafÃ©") repaired. Linear in the text.
pub(crate) fn tidy_pages(pages: Vec<(u32, String)>) -> Vec<TextBlock> {
    let lines: Vec<(u32, Vec<&str>)> = pages.iter().map(|(page, text)| (*page, text.lines().map(str::trim).filter(|l| !l.is_empty()).collect())).collect();
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (_, page) in &lines {
        let mut keys: Vec<String> = page.iter().take(EDGE_LINES).chain(page.iter().rev().take(EDGE_LINES)).map(|l| furniture_key(l)).collect();
        keys.sort();
        keys.dedup();
        for key in keys {
            *seen.entry(key).or_default() += 1;
        }
    }
    let needed = (lines.len() / 2).max(3);
    let furniture = |line: &str| seen.get(&furniture_key(line)).is_some_and(|n| *n >= needed);
    lines
        .into_iter()
        .map(|(page, mut page_lines)| {
            // Only the edges of a page: a repeated line inside the text is content.
            for _ in 0..EDGE_LINES {
                if page_lines.first().is_some_and(|l| furniture(l)) {
                    page_lines.remove(0);
                }
                if page_lines.last().is_some_and(|l| furniture(l)) {
                    page_lines.pop();
                }
            }
            TextBlock { text: repair_text(&join_hyphenated(&page_lines)), page: Some(page), section: None }
        })
        .collect()
}

/// Lines joined with newlines, except a word broken by a hyphen at a line's end
/// ("configu-" + "ration") which is joined whole.
fn join_hyphenated(lines: &[&str]) -> String {
    let mut out = String::new();
    for line in lines {
        let broken = out.ends_with('-') && {
            let mut before = out.chars().rev().skip(1);
            before.next().is_some_and(char::is_alphabetic) && before.next().is_some_and(char::is_alphabetic)
        } && line.chars().next().is_some_and(char::is_lowercase);
        if broken {
            out.pop();
        } else if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(line);
    }
    out
}

/// Ligatures spelled out, soft hyphens dropped, and words that are UTF-8 read as
/// Latin-1 ("CafÃ©") decoded again.
fn repair_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\u{FB00}' => out.push_str("ff"),
            '\u{FB01}' => out.push_str("fi"),
            '\u{FB02}' => out.push_str("fl"),
            '\u{FB03}' => out.push_str("ffi"),
            '\u{FB04}' => out.push_str("ffl"),
            '\u{FB05}' | '\u{FB06}' => out.push_str("st"),
            '\u{00AD}' => {}
            c => out.push(c),
        }
    }
    if !out.contains(['Ã', 'Â', 'â', 'Å', 'Ä']) {
        return out;
    }
    out.split_inclusive(char::is_whitespace).map(|word| undo_latin1(word).unwrap_or_else(|| word.to_string())).collect()
}

/// The word re-read as UTF-8 from its Latin-1 bytes, when that is what happened to it:
/// every character fits a byte, the bytes are valid UTF-8, and something changed.
fn undo_latin1(word: &str) -> Option<String> {
    if word.is_ascii() {
        return None;
    }
    let bytes: Vec<u8> = word.chars().map(|c| u8::try_from(u32::from(c)).ok()).collect::<Option<_>>()?;
    let decoded = String::from_utf8(bytes).ok()?;
    (decoded != word).then_some(decoded)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn pdf_pages_lose_running_furniture_and_broken_words() {
        let pages: Vec<(u32, String)> = (1..=6)
            .map(|n| {
                let word = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"][n as usize - 1];
                (n, format!("Admin Guide\nChapter {n}\nThe configu-\nration file lives in /etc.\nState-of-the-\nArt and docu-\n mentation as {word}.\nPage {n} of 6\n"))
            })
            .collect();
        let blocks = tidy_pages(pages);
        assert_eq!(blocks.len(), 6);
        let first = &blocks[0].text;
        assert!(!first.contains("Admin Guide") && !first.contains("Page 1 of 6"), "{first}");
        assert!(first.contains("The configuration file lives in /etc."), "{first}");
        assert!(first.contains("State-of-the-\nArt"), "a capital after the hyphen is kept apart: {first}");
        assert!(first.contains("Art and documentation as alpha."), "{first}");
        // "Chapter N" is at the top of every page too: furniture by the same rule.
        assert!(!first.contains("Chapter 1"), "{first}");
        assert_eq!(blocks[3].page, Some(4));
        // Two pages are too few to call anything furniture.
        let two = tidy_pages(vec![(1, "Title\nBody one".into()), (2, "Title\nBody two".into())]);
        assert!(two[0].text.starts_with("Title"));
    }

    #[test]
    fn outline_sections_cut_pages_where_a_title_stands_and_carry_over() {
        let page = |n: u32, text: &str| TextBlock { text: text.into(), page: Some(n), section: None };
        let entry = |page: u32, title: &str, path: &str| OutlineEntry { page, title: title.into(), path: path.into() };
        let pages = vec![page(1, "Cover"), page(2, "Intro text\n1.2  Pumps\nPumps move water."), page(3, "More on pumps."), page(4, "No heading line here.")];
        let outline = [entry(2, "1.2 Pumps", "1 Basics > 1.2 Pumps"), entry(4, "2 Valves", "2 Valves")];
        let sections: Vec<(u32, Option<String>, String)> = sectioned(pages, &outline).into_iter().map(|b| (b.page.unwrap(), b.section, b.text)).collect();
        assert_eq!(
            sections,
            vec![
                (1, None, "Cover".into()),
                (2, None, "Intro text".into()),
                (2, Some("1 Basics > 1.2 Pumps".into()), "1.2  Pumps\nPumps move water.".into()),
                (3, Some("1 Basics > 1.2 Pumps".into()), "More on pumps.".into()),
                // The title is not on the page: its section starts with the page.
                (4, Some("2 Valves".into()), "No heading line here.".into()),
            ]
        );
    }

    #[test]
    fn outline_titles_are_found_after_the_number_the_page_gives_them() {
        // Debian Reference, page 180: the end of the previous section, then two entries
        // whose outline titles carry no number while the page's headings do.
        let page = |n: u32, text: &str| TextBlock { text: text.into(), page: Some(n), section: None };
        let entry = |page: u32, title: &str, path: &str| OutlineEntry { page, title: title.into(), path: path.into() };
        let pages = vec![
            page(179, "9.5.5 System and hardware time\nThe following reconfigure the timezone."),
            page(180, "# dpkg-reconfigure tzdata\nSee the following.\n9.5.6    The terminal configuration\nThere are several components.\n9.5.7    The sound infrastructure\nDevice drivers for sound cards."),
            page(181, "A.1. Appendix entry\nText."),
        ];
        let outline = [
            entry(179, "System and hardware time", "Tips > System and hardware time"),
            entry(180, "The terminal configuration", "Tips > The terminal configuration"),
            entry(180, "The sound infrastructure", "Tips > The sound infrastructure"),
            entry(181, "Appendix entry", "Appendix > Appendix entry"),
        ];
        let sections: Vec<(u32, Option<String>, String)> = sectioned(pages, &outline).into_iter().map(|b| (b.page.unwrap(), b.section, b.text)).collect();
        assert_eq!(
            sections,
            vec![
                (179, Some("Tips > System and hardware time".into()), "9.5.5 System and hardware time\nThe following reconfigure the timezone.".into()),
                (180, Some("Tips > System and hardware time".into()), "# dpkg-reconfigure tzdata\nSee the following.".into()),
                (180, Some("Tips > The terminal configuration".into()), "9.5.6    The terminal configuration\nThere are several components.".into()),
                (180, Some("Tips > The sound infrastructure".into()), "9.5.7    The sound infrastructure\nDevice drivers for sound cards.".into()),
                (181, Some("Appendix > Appendix entry".into()), "A.1. Appendix entry\nText.".into()),
            ]
        );
        assert_eq!(without_number("9.5.6 the terminal configuration"), "the terminal configuration");
        assert_eq!(without_number("a.1. appendix entry"), "appendix entry");
        assert_eq!(without_number("3) steps"), "steps");
        assert_eq!(without_number("a word"), "a word", "a one-letter word is not a number");
        assert_eq!(without_number("version 3.2 notes"), "version 3.2 notes");
        assert_eq!(without_number("1.2.3"), "1.2.3");
    }

    #[test]
    fn mojibake_and_ligatures_are_repaired() {
        assert_eq!(repair_text("Caf\u{00C3}\u{00A9} \u{FB01}le e\u{FB00}ort co\u{00AD}operate"), "Café file effort cooperate");
        assert_eq!(repair_text("Ã la carte"), "Ã la carte", "a real Ã that does not decode stays");
        assert_eq!(repair_text("naïve résumé"), "naïve résumé");
    }

    #[test]
    fn markdown_keeps_heading_paths() {
        let doc = extract(Format::Markdown, b"# Guide\n\nIntro text.\n\n## Install\n\nRun the installer.\n\n### Linux\n\nUse apt.\n\n## Usage\n\nAsk away.").unwrap();
        let sections: Vec<_> = doc.blocks.iter().map(|b| b.section.clone().unwrap_or_default()).collect();
        assert_eq!(sections, ["Guide", "Guide > Install", "Guide > Install > Linux", "Guide > Usage"]);
        assert!(doc.blocks[2].text.contains("Use apt."));
        assert!(doc.blocks[2].text.starts_with("Linux"));
    }

    #[test]
    fn html_drops_scripts_and_keeps_sections() {
        let html = b"<html><head><script>evil()</script><style>p{}</style></head><body><h1>Title</h1><p>First <b>para</b>.</p><ul><li><p>Item</p></li></ul><h2>Sub</h2><p>Second.</p></body></html>";
        let doc = extract(Format::Html, html).unwrap();
        let all: String = doc.blocks.iter().map(|b| b.text.clone()).collect();
        assert!(!all.contains("evil"));
        assert_eq!(all.matches("Item").count(), 1, "nested blocks are not repeated");
        assert_eq!(doc.blocks.last().unwrap().section.as_deref(), Some("Title > Sub"));
    }

    #[test]
    fn html_keeps_the_title_drops_page_furniture_and_joins_inline_text() {
        let html = "<html><head><title>  os — Miscellaneous\n interfaces </title></head><body>\
            <div class=\"related\" role=\"navigation\"><ul><li>previous | next | index</li></ul></div>\
            <nav><p>Site menu</p></nav>\
            <h1>os<a class=\"headerlink\" href=\"#\">¶</a></h1>\
            <p>Read <code><span>os</span>.environ</code> for the environment.</p>\
            <footer><p>© Copyright</p></footer></body></html>";
        let doc = extract(Format::Html, html.as_bytes()).unwrap();
        assert_eq!(doc.title.as_deref(), Some("os — Miscellaneous interfaces"));
        let all: String = doc.blocks.iter().map(|b| b.text.clone()).collect::<Vec<_>>().join("\n");
        assert!(all.contains("Read os.environ for the environment."), "{all}");
        assert!(!all.contains("Site menu") && !all.contains("previous") && !all.contains("Copyright") && !all.contains('¶'), "{all}");
        assert_eq!(doc.blocks[0].section.as_deref(), Some("os"));
    }

    #[test]
    fn html_code_keeps_its_lines() {
        let html = b"<html><body><p>For   example:</p><div class=\"highlight\"><pre><span>import</span> os\n\n\nfor name in os.listdir():  \n    print(name)\n</pre></div>\
            <dl><dt>gather()</dt><dd><p>Run   <code>aws</code>\nconcurrently. Example:</p><div><pre>await gather(\n    a(),\n    b())</pre></div><p>Returns a list.</p></dd></dl></body></html>";
        let doc = extract(Format::Html, html).unwrap();
        let all: String = doc.blocks.iter().map(|b| b.text.clone()).collect::<Vec<_>>().join("\n");
        assert!(all.contains("For example:"), "{all}");
        assert!(all.contains("import os\nfor name in os.listdir():\n    print(name)"), "{all:?}");
        assert!(all.contains("Run aws concurrently. Example:\nawait gather(\n    a(),\n    b())\nReturns a list."), "code inside a definition keeps its lines too: {all:?}");
    }

    #[test]
    fn bad_input_gets_clear_errors() {
        assert_eq!(extract(Format::Text, b"").unwrap_err(), ParseError::Empty);
        assert_eq!(extract(Format::Text, b"\xff\xfe\xfa").unwrap_err(), ParseError::NotUtf8);
        assert_eq!(extract(Format::Text, b"   \n  ").unwrap_err(), ParseError::NoText);
        assert!(matches!(extract(Format::Pdf, b"%PDF-1.4 garbage").unwrap_err(), ParseError::Corrupt(_)));
        assert!(matches!(extract(Format::Pdf, b"not a pdf").unwrap_err(), ParseError::Corrupt(_)));
    }
}
