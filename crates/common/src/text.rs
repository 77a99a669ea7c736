//! Words in English text: the stop words left out of queries and out of the words an
//! answer is matched on, and the light stemming both sides of a match share.
//! Pure functions, no IO.

/// English stop words left out of queries: NLTK's English list without its negated
/// contractions (close to the English list LlamaIndex's BM25 retriever drops). Questions in plain
/// words are mostly these ("how do I …", "what can you …"), and kept, they matched the
/// many headings phrased as questions ("How do I …?" in a FAQ) above the pages that
/// answer.
pub const STOP_WORDS: [&str; 134] = [
    "i", "me", "my", "myself", "we", "our", "ours", "ourselves", "you", "your", "yours", "yourself", "yourselves", "he", "him", "his", "himself",
    "she", "her", "hers", "herself", "it", "its", "itself", "they", "them", "their", "theirs", "themselves", "what", "which", "who", "whom", "this",
    "that", "these", "those", "am", "is", "are", "was", "were", "be", "been", "being", "have", "has", "had", "having", "do", "does", "did", "doing",
    "a", "an", "the", "and", "but", "if", "or", "because", "as", "until", "while", "of", "at", "by", "for", "with", "about", "against", "between",
    "into", "through", "during", "before", "after", "above", "below", "to", "from", "up", "down", "in", "out", "on", "off", "over", "under", "again",
    "further", "then", "once", "here", "there", "when", "where", "why", "how", "all", "any", "both", "each", "few", "more", "most", "other", "some",
    "such", "no", "nor", "not", "only", "own", "same", "so", "than", "too", "very", "s", "t", "can", "will", "just", "don", "should", "now", "d",
    "ll", "m", "o", "re", "ve", "y",
];

/// Whether `word` (any case) is one of [`STOP_WORDS`].
pub fn is_stop_word(word: &str) -> bool {
    if word.len() > 12 {
        return false;
    }
    let lower = word.to_lowercase();
    STOP_WORDS.contains(&lower.as_str())
}

/// The words of `text`: runs of letters, digits and `_`, lowercased.
pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !(c.is_alphanumeric() || c == '_')).filter(|w| !w.is_empty()).map(str::to_lowercase)
}

/// A light English stem, so "limits", "limited" and "limiting" meet "limit" (plural
/// and verb endings only; names and identifiers with digits or `_` are kept whole).
pub fn stem(word: &str) -> String {
    let w = word.to_lowercase();
    if w.chars().count() <= 3 || w.contains(|c: char| c.is_ascii_digit() || c == '_') {
        return w;
    }
    let mut base = w.clone();
    for (suffix, keep) in [("ies", "y"), ("sses", "ss"), ("ing", ""), ("ed", ""), ("es", ""), ("s", "")] {
        if let Some(rest) = w.strip_suffix(suffix) {
            let ok = match suffix {
                "s" => !(rest.ends_with('s') || rest.ends_with('u') || rest.ends_with('i')),
                "es" => rest.ends_with("sh") || rest.ends_with("ch") || rest.ends_with('x') || rest.ends_with("ss"),
                "ing" | "ed" => rest.chars().count() >= 3 && rest.chars().any(|c| "aeiouy".contains(c)),
                _ => true,
            };
            if ok {
                base = format!("{rest}{keep}");
                break;
            }
        }
    }
    // "stopped" → "stop", "change"/"changed" → "chang".
    let bytes = base.as_bytes();
    let doubled = bytes.len() > 4 && bytes[bytes.len() - 1] == bytes[bytes.len() - 2] && !matches!(bytes[bytes.len() - 1], b'l' | b's' | b'z' | b'e' | b'o');
    if doubled || (base.len() > 4 && base.ends_with('e')) {
        base.pop();
    }
    base
}

/// The content words of `text`, stemmed: no stop words, no one-letter words.
pub fn content_terms(text: &str) -> Vec<String> {
    words(text).filter(|w| !is_stop_word(w) && (w.chars().count() > 1 || w.chars().all(|c| c.is_ascii_digit()))).map(|w| stem(&w)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems_meet_across_endings_and_identifiers_stay_whole() {
        for (a, b) in [("limits", "limit"), ("limited", "limit"), ("limiting", "limit"), ("queries", "query"), ("boxes", "box"), ("classes", "class"), ("changed", "change"), ("changing", "changes"), ("stopped", "stop")] {
            assert_eq!(stem(a), stem(b), "{a} / {b}");
        }
        assert_eq!(stem("bisect_left"), "bisect_left");
        assert_eq!(stem("status"), "status");
        assert_eq!(stem("is"), "is");
    }

    #[test]
    fn content_terms_drop_question_words() {
        assert_eq!(content_terms("How do I change the port of the server?"), ["change", "port", "server"].map(stem));
        assert!(is_stop_word("The"));
        assert!(!is_stop_word("port"));
    }
}
