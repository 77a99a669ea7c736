//! The child side of isolated extraction: `echod parse-worker` reads requests from
//! standard input and writes results to standard output, one after another, until its
//! input closes. It limits itself before reading anything (address space, no core
//! files), and contains panics; what it cannot contain (an abort, running out of
//! memory, a runaway loop) ends the process, which the parent sees and reports, and
//! the parent's time limit kills it. No file is opened, nothing is logged.
//!
//! Frames: a request is `u32` LE header length, the header (JSON [`Request`]), `u64` LE
//! body length, the body (the file's bytes); a response is `u32` LE length and the JSON
//! [`Response`].

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use common::formats::Format;
use common::wire::ParsedDocument;

use crate::formats::{ParseError, extract};

/// The largest header a worker reads (it is a few dozen bytes).
const MAX_HEADER: u32 = 64 * 1024;

#[derive(Serialize, Deserialize)]
pub(crate) struct Request {
    pub(crate) format: String,
    pub(crate) max_output_chars: usize,
    pub(crate) max_input_bytes: u64,
}

#[derive(Serialize, Deserialize)]
pub(crate) enum Response {
    Parsed(ParsedDocument),
    Failed(ParseError),
}

/// Serves requests on standard input/output until the input closes; returns the exit
/// code. `memory_mb` bounds the process's address space.
pub fn serve_stdio(memory_mb: u64) -> i32 {
    if let Err(error) = limit_self(memory_mb) {
        eprintln!("parse-worker: cannot set its limits: {error}");
        return 3;
    }
    // A parser's panic message is no business of anyone's standard error.
    std::panic::set_hook(Box::new(|_| {}));
    let (stdin, stdout) = (std::io::stdin(), std::io::stdout());
    let (mut input, mut output) = (stdin.lock(), stdout.lock());
    loop {
        match serve_one(&mut input, &mut output) {
            Ok(true) => {}
            Ok(false) => return 0,
            Err(_) => return 4,
        }
    }
}

fn limit_self(memory_mb: u64) -> std::io::Result<()> {
    use rustix::process::{Resource, Rlimit, setrlimit};
    let bytes = memory_mb.saturating_mul(1024 * 1024);
    setrlimit(Resource::As, Rlimit { current: Some(bytes), maximum: Some(bytes) })?;
    setrlimit(Resource::Core, Rlimit { current: Some(0), maximum: Some(0) })?;
    Ok(())
}

/// One request answered; `false` when the input closed cleanly first.
fn serve_one(input: &mut impl Read, output: &mut impl Write) -> std::io::Result<bool> {
    let mut length = [0u8; 4];
    match input.read_exact(&mut length) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(error) => return Err(error),
    }
    let header_len = u32::from_le_bytes(length);
    if header_len > MAX_HEADER {
        return Err(std::io::Error::other("header too long"));
    }
    let mut header = vec![0u8; header_len as usize];
    input.read_exact(&mut header)?;
    let request: Request = serde_json::from_slice(&header).map_err(std::io::Error::other)?;
    let mut length = [0u8; 8];
    input.read_exact(&mut length)?;
    let body_len = u64::from_le_bytes(length);
    if body_len > request.max_input_bytes {
        return Err(std::io::Error::other("body longer than the limit"));
    }
    let mut body = vec![0u8; body_len as usize];
    input.read_exact(&mut body)?;
    let response = match Format::parse(&request.format) {
        None => Response::Failed(ParseError::Unsupported(request.format.clone())),
        Some(format) => match std::panic::catch_unwind(|| extract(format, &body)) {
            Ok(Ok(mut parsed)) => {
                crate::bound_output(&mut parsed, request.max_output_chars);
                Response::Parsed(parsed)
            }
            Ok(Err(error)) => Response::Failed(error),
            Err(_) => Response::Failed(ParseError::Corrupt("the parser crashed on this file".into())),
        },
    };
    drop(body);
    let bytes = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    let length = u32::try_from(bytes.len()).map_err(|_| std::io::Error::other("response too long"))?;
    output.write_all(&length.to_le_bytes())?;
    output.write_all(&bytes)?;
    output.flush()?;
    Ok(true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn frame(format: &str, body: &[u8]) -> Vec<u8> {
        let header = serde_json::to_vec(&Request { format: format.into(), max_output_chars: 1000, max_input_bytes: 1 << 20 }).unwrap();
        let mut bytes = (header.len() as u32).to_le_bytes().to_vec();
        bytes.extend(header);
        bytes.extend((body.len() as u64).to_le_bytes());
        bytes.extend(body);
        bytes
    }

    fn responses(mut output: &[u8]) -> Vec<Response> {
        let mut all = Vec::new();
        while output.len() >= 4 {
            let n = u32::from_le_bytes(output[..4].try_into().unwrap()) as usize;
            all.push(serde_json::from_slice(&output[4..4 + n]).unwrap());
            output = &output[4 + n..];
        }
        all
    }

    #[test]
    fn a_worker_answers_requests_in_turn_and_stops_at_the_end_of_its_input() {
        let mut input = frame("markdown", b"# Title\n\nBody text.");
        input.extend(frame("text", b""));
        input.extend(frame("spreadsheet-of-doom", b"x"));
        let mut output = Vec::new();
        let mut reader = input.as_slice();
        while serve_one(&mut reader, &mut output).unwrap() {}
        let all = responses(&output);
        assert_eq!(all.len(), 3);
        assert!(matches!(&all[0], Response::Parsed(doc) if doc.blocks[0].text.contains("Body text.")));
        assert!(matches!(&all[1], Response::Failed(ParseError::Empty)));
        assert!(matches!(&all[2], Response::Failed(ParseError::Unsupported(_))));
    }

    #[test]
    fn a_body_longer_than_the_limit_is_refused_before_it_is_read() {
        let header = serde_json::to_vec(&Request { format: "text".into(), max_output_chars: 10, max_input_bytes: 4 }).unwrap();
        let mut input = (header.len() as u32).to_le_bytes().to_vec();
        input.extend(header);
        input.extend(1_000_000_000u64.to_le_bytes());
        assert!(serve_one(&mut input.as_slice(), &mut Vec::new()).is_err());
    }
}
