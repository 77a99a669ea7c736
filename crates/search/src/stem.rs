//! The index's English analyzer (`en_stem`) with its stems remembered: the same tokens
//! as Tantivy's own `en_stem` (simple tokenizer, words over 40 bytes dropped, lower
//! case, Snowball English), so an index written with either is read with the other.
//!
//! Why: every search stems the whole text of each hit it returns to find the passage
//! that matches (the snippet), and indexing stems every word of every chunk. The
//! Snowball stemmer was ~17 % of a search's CPU under `echod bench api` (B7, uncached);
//! a document's vocabulary repeats, so a word's stem is looked up instead of computed
//! again. The memory is bounded: the table is emptied when it reaches
//! [`MAX_REMEMBERED`] words.

use std::collections::HashMap;
use std::sync::{LazyLock, RwLock};

use tantivy::tokenizer::{Language, LowerCaser, RawTokenizer, RemoveLongFilter, SimpleTokenizer, Stemmer, TextAnalyzer, Token, TokenFilter, TokenStream, Tokenizer};

/// Words whose stems are remembered at most (~10 MB).
const MAX_REMEMBERED: usize = 100_000;

/// word (lower case) → its stem. Hashed with foldhash, seeded per process: several times
/// faster than SipHash on short words, and the keys (words of uploaded documents) cannot
/// be chosen to collide without knowing the seed.
static STEMS: LazyLock<RwLock<StemTable>> = LazyLock::new(Default::default);

type StemTable = HashMap<Box<str>, Box<str>, foldhash::fast::RandomState>;

/// The analyzer registered as `en_stem` on every index.
pub(crate) fn en_stem() -> TextAnalyzer {
    TextAnalyzer::builder(SimpleTokenizer::default()).filter(RemoveLongFilter::limit(40)).filter(LowerCaser).filter(RememberedStems).build()
}

/// Snowball English, remembered per word.
#[derive(Clone)]
struct RememberedStems;

impl TokenFilter for RememberedStems {
    type Tokenizer<T: Tokenizer> = RememberedStemsFilter<T>;

    fn transform<T: Tokenizer>(self, tokenizer: T) -> RememberedStemsFilter<T> {
        RememberedStemsFilter { inner: tokenizer, stemmer: TextAnalyzer::builder(RawTokenizer::default()).filter(Stemmer::new(Language::English)).build() }
    }
}

#[derive(Clone)]
struct RememberedStemsFilter<T> {
    inner: T,
    /// Stems a word not remembered yet (the word as one token).
    stemmer: TextAnalyzer,
}

impl<T: Tokenizer> Tokenizer for RememberedStemsFilter<T> {
    type TokenStream<'a> = RememberedStemsStream<'a, T::TokenStream<'a>>;

    fn token_stream<'a>(&'a mut self, text: &'a str) -> Self::TokenStream<'a> {
        RememberedStemsStream { tail: self.inner.token_stream(text), stemmer: &mut self.stemmer }
    }
}

struct RememberedStemsStream<'a, T> {
    tail: T,
    stemmer: &'a mut TextAnalyzer,
}

impl<T: TokenStream> TokenStream for RememberedStemsStream<'_, T> {
    fn advance(&mut self) -> bool {
        if !self.tail.advance() {
            return false;
        }
        let token = self.tail.token_mut();
        let known = STEMS.read().ok().and_then(|stems| {
            let stem = stems.get(token.text.as_str())?;
            token.text.clear();
            token.text.push_str(stem);
            Some(())
        });
        if known.is_none() {
            let mut stream = self.stemmer.token_stream(&token.text);
            let stem = if stream.advance() { stream.token().text.clone() } else { token.text.clone() };
            drop(stream);
            if let Ok(mut stems) = STEMS.write() {
                if stems.len() >= MAX_REMEMBERED {
                    stems.clear();
                }
                stems.insert(token.text.as_str().into(), stem.as_str().into());
            }
            token.text = stem;
        }
        true
    }

    fn token(&self) -> &Token {
        self.tail.token()
    }

    fn token_mut(&mut self) -> &mut Token {
        self.tail.token_mut()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn tokens(mut analyzer: TextAnalyzer, text: &str) -> Vec<(String, usize, usize, usize)> {
        let mut stream = analyzer.token_stream(text);
        let mut out = Vec::new();
        while stream.advance() {
            let t = stream.token();
            out.push((t.text.clone(), t.offset_from, t.offset_to, t.position));
        }
        out
    }

    #[test]
    fn the_same_tokens_as_tantivys_en_stem_first_time_and_remembered() {
        let text = "Running RUNNERS ran; the Pumps' pumping stations — naïve Élan café 42 x_y \
                    averyveryveryveryveryveryveryverylongword1234567 generously generalizations";
        let tantivy = tantivy::tokenizer::TokenizerManager::default().get("en_stem").unwrap();
        let expected = tokens(tantivy, text);
        assert!(expected.len() > 10);
        assert_eq!(tokens(en_stem(), text), expected, "first time (stems computed)");
        assert_eq!(tokens(en_stem(), text), expected, "second time (stems remembered)");
    }
}
