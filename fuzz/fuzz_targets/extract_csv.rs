//! Fuzz target: the Csv extractor must end in text or a `ParseError`, never a panic in
//! our code (a library's panic is contained by the parse workers, but is worth a report).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = parser::extract(parser::Format::Csv, data);
});
