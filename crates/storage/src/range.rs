//! What part of a blob a download asks for (RFC 9110 §13–14): `If-None-Match` /
//! `If-Modified-Since` (304), `Range: bytes=…` with `If-Range` (206, or 416 when it
//! cannot be satisfied). One range at a time: a request for several gets the whole blob
//! (200), which the RFC allows.

use std::ops::Range;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, header};

/// What to send.
#[derive(Debug, PartialEq)]
pub(crate) enum Wanted {
    NotModified,
    Whole,
    Part(Range<u64>),
    Unsatisfiable,
}

/// The blob's validators.
pub(crate) struct Validators<'a> {
    /// Quoted, as sent in `ETag`.
    pub(crate) etag: &'a str,
    pub(crate) modified: SystemTime,
}

impl Validators<'_> {
    pub(crate) fn last_modified(&self) -> String {
        httpdate::fmt_http_date(self.modified)
    }
}

/// Unix seconds as a time.
pub(crate) fn unix_time(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
}

fn etag_listed(list: &str, etag: &str) -> bool {
    list.split(',').map(str::trim).any(|tag| tag == "*" || tag.trim_start_matches("W/") == etag)
}

pub(crate) fn wanted(headers: &HeaderMap, size: u64, validators: &Validators<'_>) -> Wanted {
    let text = |name| headers.get(name).and_then(|v: &axum::http::HeaderValue| v.to_str().ok());
    if let Some(list) = text(header::IF_NONE_MATCH) {
        if etag_listed(list, validators.etag) {
            return Wanted::NotModified;
        }
    } else if let Some(since) = text(header::IF_MODIFIED_SINCE).and_then(|d| httpdate::parse_http_date(d).ok())
        && validators.modified.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) <= since.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    {
        return Wanted::NotModified;
    }
    let Some(range) = text(header::RANGE) else { return Wanted::Whole };
    // A range for another version of the blob is ignored.
    if let Some(condition) = text(header::IF_RANGE) {
        let same = if condition.starts_with('"') || condition.starts_with("W/") {
            condition == validators.etag
        } else {
            httpdate::parse_http_date(condition).is_ok_and(|date| date >= validators.modified)
        };
        if !same {
            return Wanted::Whole;
        }
    }
    parse(range, size)
}

/// `bytes=a-b`, `bytes=a-`, `bytes=-n` against a blob of `size` bytes.
fn parse(range: &str, size: u64) -> Wanted {
    let Some(spec) = range.trim().strip_prefix("bytes=") else { return Wanted::Whole };
    if spec.contains(',') {
        return Wanted::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else { return Wanted::Whole };
    let (first, last) = (first.trim(), last.trim());
    let parsed = match (first.is_empty(), last.is_empty()) {
        // The last n bytes.
        (true, false) => match last.parse::<u64>() {
            Ok(0) => return Wanted::Unsatisfiable,
            Ok(n) => Some(size.saturating_sub(n)..size),
            Err(_) => None,
        },
        (false, true) => first.parse::<u64>().ok().map(|start| start..size),
        (false, false) => match (first.parse::<u64>(), last.parse::<u64>()) {
            (Ok(start), Ok(end)) if end >= start => Some(start..end.saturating_add(1).min(size)),
            _ => None,
        },
        (true, true) => None,
    };
    match parsed {
        // Malformed: ignored, as the RFC says.
        None => Wanted::Whole,
        Some(range) if range.start >= size => Wanted::Unsatisfiable,
        Some(range) => Wanted::Part(range),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ask(pairs: &[(header::HeaderName, &str)], size: u64) -> Wanted {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(name.clone(), HeaderValue::from_str(value).unwrap_or(HeaderValue::from_static("")));
        }
        wanted(&headers, size, &Validators { etag: "\"abc\"", modified: unix_time(1_700_000_000) })
    }

    #[test]
    fn ranges_are_read_as_the_rfc_says() {
        assert_eq!(ask(&[], 100), Wanted::Whole);
        assert_eq!(ask(&[(header::RANGE, "bytes=10-19")], 100), Wanted::Part(10..20));
        assert_eq!(ask(&[(header::RANGE, "bytes=90-")], 100), Wanted::Part(90..100));
        assert_eq!(ask(&[(header::RANGE, "bytes=-5")], 100), Wanted::Part(95..100));
        assert_eq!(ask(&[(header::RANGE, "bytes=-500")], 100), Wanted::Part(0..100));
        assert_eq!(ask(&[(header::RANGE, "bytes=50-5000")], 100), Wanted::Part(50..100), "clamped to the end");
        assert_eq!(ask(&[(header::RANGE, "bytes=100-")], 100), Wanted::Unsatisfiable);
        assert_eq!(ask(&[(header::RANGE, "bytes=-0")], 100), Wanted::Unsatisfiable);
        assert_eq!(ask(&[(header::RANGE, "bytes=0-")], 0), Wanted::Unsatisfiable);
        for ignored in ["bytes=5-2", "bytes=a-b", "items=0-5", "bytes=-", "bytes=0-1,5-6"] {
            assert_eq!(ask(&[(header::RANGE, ignored)], 100), Wanted::Whole, "{ignored}");
        }
    }

    #[test]
    fn validators_decide_before_ranges() {
        assert_eq!(ask(&[(header::IF_NONE_MATCH, "\"abc\"")], 100), Wanted::NotModified);
        assert_eq!(ask(&[(header::IF_NONE_MATCH, "\"x\", W/\"abc\"")], 100), Wanted::NotModified);
        assert_eq!(ask(&[(header::IF_NONE_MATCH, "\"other\""), (header::RANGE, "bytes=0-1")], 100), Wanted::Part(0..2));
        assert_eq!(ask(&[(header::IF_MODIFIED_SINCE, "Wed, 15 Nov 2023 00:00:00 GMT")], 100), Wanted::NotModified);
        assert_eq!(ask(&[(header::IF_MODIFIED_SINCE, "Mon, 13 Nov 2023 00:00:00 GMT")], 100), Wanted::Whole);
        assert_eq!(ask(&[(header::RANGE, "bytes=0-1"), (header::IF_RANGE, "\"abc\"")], 100), Wanted::Part(0..2));
        assert_eq!(ask(&[(header::RANGE, "bytes=0-1"), (header::IF_RANGE, "\"old\"")], 100), Wanted::Whole);
        assert_eq!(ask(&[(header::RANGE, "bytes=0-1"), (header::IF_RANGE, "Mon, 13 Nov 2023 00:00:00 GMT")], 100), Wanted::Whole);
    }
}
