//! Reading streamed HTTP bodies: lines (NDJSON, as Ollama streams) and server-sent
//! events (as OpenAI-compatible servers and Echo's own services stream), each line
//! bounded so a peer that never sends a newline cannot grow memory without end.

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

/// The longest line accepted.
pub const MAX_LINE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("the stream broke off: {0}")]
    Body(String),
    #[error("a streamed line was longer than {MAX_LINE} bytes")]
    LineTooLong,
}

/// One server-sent event: its `event:` name (`message` when unnamed) and `data:` lines
/// joined with `\n`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

/// The lines of `body` (without `\n` or `\r\n`), the last one even without a newline.
pub fn lines<S, E>(body: S) -> impl Stream<Item = Result<String, StreamError>> + Send
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
    E: std::fmt::Display,
{
    let state = (body, Vec::<u8>::new(), false);
    futures_util::stream::unfold(state, |(mut body, mut buffer, mut ended)| async move {
        loop {
            if let Some(newline) = buffer.iter().position(|b| *b == b'\n') {
                let mut line: Vec<u8> = buffer.drain(..=newline).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Some((Ok(String::from_utf8_lossy(&line).into_owned()), (body, buffer, ended)));
            }
            if ended {
                if buffer.is_empty() {
                    return None;
                }
                let line = String::from_utf8_lossy(&std::mem::take(&mut buffer)).into_owned();
                return Some((Ok(line), (body, buffer, ended)));
            }
            if buffer.len() > MAX_LINE {
                ended = true;
                buffer.clear();
                return Some((Err(StreamError::LineTooLong), (body, buffer, ended)));
            }
            match body.next().await {
                Some(Ok(bytes)) => buffer.extend_from_slice(&bytes),
                Some(Err(error)) => {
                    ended = true;
                    buffer.clear();
                    return Some((Err(StreamError::Body(error.to_string())), (body, buffer, ended)));
                }
                None => ended = true,
            }
        }
    })
}

/// The server-sent events of `body`. Comments (`:`) and `id:`/`retry:` are skipped.
pub fn events<S, E>(body: S) -> impl Stream<Item = Result<SseEvent, StreamError>> + Send
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
    E: std::fmt::Display,
{
    // Fused: the last event is yielded after the lines ended, and the next poll must not
    // poll them again.
    let state = (Box::pin(lines(body).fuse()), String::new(), Vec::<String>::new());
    futures_util::stream::unfold(state, |(mut lines, mut event, mut data)| async move {
        loop {
            match lines.next().await {
                Some(Ok(line)) if line.is_empty() => {
                    if !data.is_empty() {
                        let name = if event.is_empty() { "message".to_string() } else { std::mem::take(&mut event) };
                        let joined = std::mem::take(&mut data).join("\n");
                        return Some((Ok(SseEvent { event: name, data: joined }), (lines, event, data)));
                    }
                    event.clear();
                }
                Some(Ok(line)) => {
                    let (field, value) = line.split_once(':').map_or((line.as_str(), ""), |(f, v)| (f, v.strip_prefix(' ').unwrap_or(v)));
                    match field {
                        "event" => event = value.to_string(),
                        "data" => data.push(value.to_string()),
                        _ => {}
                    }
                }
                Some(Err(error)) => return Some((Err(error), (lines, event, data))),
                None => {
                    if data.is_empty() {
                        return None;
                    }
                    let name = if event.is_empty() { "message".to_string() } else { std::mem::take(&mut event) };
                    let joined = std::mem::take(&mut data).join("\n");
                    return Some((Ok(SseEvent { event: name, data: joined }), (lines, event, data)));
                }
            }
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn body(parts: &[&str]) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + Unpin + use<> {
        futures_util::stream::iter(parts.iter().map(|p| Ok(Bytes::from(p.to_string()))).collect::<Vec<_>>())
    }

    #[tokio::test]
    async fn events_split_across_chunks_are_put_back_together() {
        let stream = events(body(&["event: delta\nda", "ta: {\"text\":\"hi\"}\r\n\r\n: comment\n\ndata: a\ndata: b\n\n", "data: [DONE]"]));
        let got: Vec<SseEvent> = stream.map(Result::unwrap).collect().await;
        assert_eq!(
            got,
            [
                SseEvent { event: "delta".into(), data: "{\"text\":\"hi\"}".into() },
                SseEvent { event: "message".into(), data: "a\nb".into() },
                SseEvent { event: "message".into(), data: "[DONE]".into() },
            ]
        );
    }

    #[tokio::test]
    async fn a_line_without_end_is_refused_not_buffered() {
        let huge = "x".repeat(MAX_LINE + 10);
        let mut stream = Box::pin(lines(body(&[&huge, "more"])));
        assert!(matches!(stream.next().await, Some(Err(StreamError::LineTooLong))));
        assert!(stream.next().await.is_none());
    }
}
