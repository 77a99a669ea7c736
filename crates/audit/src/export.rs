//! Exporting the audit log as JSON Lines and verifying an exported file offline.
//!
//! A file holds every record in chain order (`{"type":"record",…}`, the fields the
//! hash covers, as stored), the service's signed checkpoints (`"checkpoint"`) and a
//! head signed at export time (`"head"`: the count and the last hash, signed with the
//! same Ed25519 key), so that a file cut short is caught as surely as one edited.
//! Verification needs nothing but the file (and, to trust the key, the public key the
//! operator pins): the chain is walked from genesis, each checkpoint's signature is
//! checked and its hash compared with the record it names. Never mutates anything.

use std::io::{BufRead, Write};

use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::chain::{self, Record, Verification};

/// The longest line an exported file may hold (a record's context is bounded when
/// written; this keeps a hostile file from exhausting memory).
const MAX_LINE: usize = 1 << 20;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Line {
    Record {
        #[serde(flatten)]
        record: Record,
        #[serde(default)]
        org: Option<String>,
    },
    Checkpoint(Signed),
    Head(Signed),
}

/// A signed statement "the chain's record `seq` has hash `head_hash`".
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Signed {
    pub(crate) seq: i64,
    pub(crate) head_hash: String,
    /// Base64 Ed25519 signature over `"{seq}:{head_hash}"`.
    pub(crate) signature: String,
    /// Base64 Ed25519 public key.
    pub(crate) public_key: String,
    /// Unix seconds.
    pub(crate) created_at: i64,
}

impl Signed {
    pub(crate) fn sign(signer: &Ed25519KeyPair, seq: i64, head_hash: &str, created_at: i64) -> Signed {
        let b64 = base64::engine::general_purpose::STANDARD;
        let signature = signer.sign(format!("{seq}:{head_hash}").as_bytes());
        Signed { seq, head_hash: head_hash.to_string(), signature: b64.encode(signature.as_ref()), public_key: b64.encode(signer.public_key().as_ref()), created_at }
    }

    fn signature_holds(&self) -> bool {
        let b64 = base64::engine::general_purpose::STANDARD;
        let (Ok(key), Ok(signature)) = (b64.decode(&self.public_key), b64.decode(&self.signature)) else { return false };
        UnparsedPublicKey::new(&ED25519, key).verify(format!("{}:{}", self.seq, self.head_hash).as_bytes(), &signature).is_ok()
    }
}

/// What an exported file's check found.
#[derive(Debug, Serialize)]
pub struct FileVerification {
    #[serde(flatten)]
    pub chain: Verification,
    /// Signed checkpoints (and the head) checked.
    pub signatures_checked: usize,
    /// The key every signature was made with (base64), for the operator to compare.
    pub public_key: Option<String>,
    /// Whether the file carries a signed head (without one, a file cut short after its
    /// last checkpoint cannot be told from a whole one).
    pub signed_head: bool,
}

/// Writes `records` (chain order) and `checkpoints`, then a head signed by `signer`.
pub(crate) fn write(out: &mut dyn Write, records: &[(Record, Option<String>)], checkpoints: &[Signed], signer: &Ed25519KeyPair, now: i64) -> std::io::Result<()> {
    let mut line = |value: &Line| -> std::io::Result<()> {
        serde_json::to_writer(&mut *out, value)?;
        out.write_all(b"\n")
    };
    for (record, org) in records {
        line(&Line::Record { record: record.clone(), org: org.clone() })?;
    }
    for checkpoint in checkpoints {
        line(&Line::Checkpoint(checkpoint.clone()))?;
    }
    let (seq, head) = records.last().map_or((0, chain::GENESIS.to_string()), |(r, _)| (r.seq, r.hash.clone()));
    line(&Line::Head(Signed::sign(signer, seq, &head, now)))?;
    out.flush()
}

/// Verifies an exported file. `pinned_key` (base64), when given, is the only key a
/// signature may be made with.
pub fn verify_file(input: impl BufRead, pinned_key: Option<&str>) -> anyhow::Result<FileVerification> {
    let mut records = Vec::new();
    let mut signed: Vec<(bool, Signed)> = Vec::new();
    for (n, line) in input.lines().enumerate() {
        let line = line?;
        anyhow::ensure!(line.len() <= MAX_LINE, "line {} is longer than {MAX_LINE} bytes", n + 1);
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Line>(&line).map_err(|e| anyhow::anyhow!("line {} is not an audit export line: {e}", n + 1))? {
            Line::Record { record, .. } => records.push(record),
            Line::Checkpoint(checkpoint) => signed.push((false, checkpoint)),
            Line::Head(head) => signed.push((true, head)),
        }
    }
    let hashes: Vec<(i64, String)> = records.iter().map(|r| (r.seq, r.hash.clone())).collect();
    let mut verification = FileVerification { chain: chain::verify(records), signatures_checked: 0, public_key: None, signed_head: false };
    let chain_len = verification.chain.n_records;
    // The first problem wins: the chain's own, else the first signed statement that
    // does not hold, ordered by the record it names.
    signed.sort_by_key(|(_, s)| s.seq);
    for (is_head, statement) in &signed {
        let fail = |v: &mut FileVerification, first_bad: i64, reason: String| {
            if v.chain.ok || v.chain.first_bad.is_some_and(|bad| first_bad < bad) {
                v.chain.ok = false;
                v.chain.first_bad = Some(first_bad);
                v.chain.reason = Some(reason);
            }
        };
        let key = pinned_key.map(str::to_string).or_else(|| verification.public_key.clone()).unwrap_or_else(|| statement.public_key.clone());
        if statement.public_key != key {
            fail(&mut verification, statement.seq.max(1), format!("the signature over record {} is made with another key", statement.seq));
            continue;
        }
        verification.public_key = Some(key);
        if !statement.signature_holds() {
            fail(&mut verification, statement.seq.max(1), format!("the signature over record {} does not hold", statement.seq));
            continue;
        }
        verification.signatures_checked += 1;
        verification.signed_head |= *is_head;
        let held = hashes.get((statement.seq - 1).max(0) as usize).filter(|(seq, _)| *seq == statement.seq && statement.seq <= chain_len);
        match held {
            _ if statement.seq == 0 && chain_len == 0 => {}
            Some((_, hash)) if *hash == statement.head_hash => {}
            Some(_) => fail(&mut verification, statement.seq, format!("record {} is not the one its signed checkpoint names", statement.seq)),
            None if statement.seq > chain_len && verification.chain.ok => {
                fail(&mut verification, chain_len + 1, format!("records after {chain_len} are missing: a signature names record {}", statement.seq))
            }
            None => {}
        }
    }
    // A signed head names the last record: anything after it was added since.
    if let Some((_, head)) = signed.iter().filter(|(is_head, s)| *is_head && s.signature_holds()).max_by_key(|(_, s)| s.seq)
        && verification.chain.ok
        && chain_len > head.seq
    {
        verification.chain.ok = false;
        verification.chain.first_bad = Some(head.seq + 1);
        verification.chain.reason = Some(format!("record {} was added after the signed head", head.seq + 1));
    }
    Ok(verification)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::chain::{GENESIS, record_hash};

    fn chain(n: i64) -> Vec<Record> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|seq| {
                let mut r = Record {
                    seq,
                    ts: 1000 + seq,
                    event_id: format!("e{seq}"),
                    actor: format!("user{}", seq % 7),
                    action: "document.uploaded".into(),
                    resource: format!("document:{seq}"),
                    outcome: "success".into(),
                    context: format!("{{\"n\":{seq}}}"),
                    prev_hash: prev.clone(),
                    hash: String::new(),
                };
                r.hash = record_hash(&prev, &r);
                prev = r.hash.clone();
                r
            })
            .collect()
    }

    fn key() -> Ed25519KeyPair {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        Ed25519KeyPair::from_pkcs8(Ed25519KeyPair::generate_pkcs8(&rng).unwrap().as_ref()).unwrap()
    }

    /// The file for `records`, checkpoints every 10 records, a signed head.
    fn file(records: &[Record], signer: &Ed25519KeyPair) -> Vec<u8> {
        let checkpoints: Vec<Signed> = records.iter().filter(|r| r.seq % 10 == 0).map(|r| Signed::sign(signer, r.seq, &r.hash, 5)).collect();
        let mut out = Vec::new();
        write(&mut out, &records.iter().map(|r| (r.clone(), None)).collect::<Vec<_>>(), &checkpoints, signer, 9).unwrap();
        out
    }

    /// A small deterministic generator (the property test must be repeatable).
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    #[test]
    fn an_exported_file_verifies_and_names_its_key() {
        let signer = key();
        let records = chain(25);
        let verification = verify_file(&file(&records, &signer)[..], None).unwrap();
        assert!(verification.chain.ok, "{verification:?}");
        assert_eq!(verification.chain.n_records, 25);
        assert_eq!(verification.signatures_checked, 3, "two checkpoints and the head");
        assert!(verification.signed_head);
        let b64 = base64::engine::general_purpose::STANDARD;
        assert_eq!(verification.public_key.as_deref(), Some(b64.encode(signer.public_key().as_ref()).as_str()));
        // Pinned to another key, the same file is refused.
        let other = b64.encode(key().public_key().as_ref());
        assert!(!verify_file(&file(&records, &signer)[..], Some(&other)).unwrap().chain.ok);
        // Not an export at all.
        assert!(verify_file(&b"{\"type\":\"nonsense\"}\n"[..], None).is_err());
    }

    /// ≥ 10,000 random tamperings of an exported file — a field changed, a record
    /// deleted, inserted, moved, the file cut short, a record added at the end, a
    /// record changed and its hash recomputed — each detected, the first bad record named.
    #[test]
    fn every_random_tampering_is_detected_and_the_first_bad_record_named() {
        let signer = key();
        let n = 30;
        let original = chain(n);
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut kinds = [0usize; 7];
        for round in 0..10_500 {
            let mut records = original.clone();
            let kind = rng.below(7);
            kinds[kind] += 1;
            let expected: i64 = match kind {
                0 => {
                    // A field changed.
                    let i = rng.below(n as usize);
                    match rng.below(5) {
                        0 => records[i].actor.push('x'),
                        1 => records[i].action = "document.deleted".into(),
                        2 => records[i].outcome = "denied".into(),
                        3 => records[i].ts += 1 + rng.below(1000) as i64,
                        _ => records[i].context = "{}".into(),
                    }
                    i as i64 + 1
                }
                1 => {
                    // A record deleted.
                    let i = rng.below(n as usize);
                    records.remove(i);
                    i as i64 + 1
                }
                2 => {
                    // A copy of a record inserted somewhere.
                    let (from, at) = (rng.below(n as usize), rng.below(n as usize + 1));
                    let copy = records[from].clone();
                    records.insert(at, copy);
                    // A copy just before its original fits there; the original then does not.
                    if from == at { at as i64 + 2 } else { at as i64 + 1 }
                }
                3 => {
                    // Two records swapped.
                    let a = rng.below(n as usize - 1);
                    let b = a + 1 + rng.below(n as usize - a - 1);
                    records.swap(a, b);
                    a as i64 + 1
                }
                4 => {
                    // The file cut short.
                    let keep = rng.below(n as usize);
                    records.truncate(keep);
                    keep as i64 + 1
                }
                5 => {
                    // A record changed and its hash recomputed: the next link breaks,
                    // or the signed head does not match when it is the last.
                    let i = rng.below(n as usize);
                    records[i].outcome = "denied".into();
                    records[i].hash = record_hash(&records[i].prev_hash.clone(), &records[i]);
                    // (or a signed checkpoint names the changed record itself).
                    if i + 1 < n as usize && !(i + 1).is_multiple_of(10) { i as i64 + 2 } else { i as i64 + 1 }
                }
                _ => {
                    // A well-formed record appended after the signed head.
                    let last = records.last().unwrap().clone();
                    let mut added = Record { seq: last.seq + 1, ts: last.ts + 1, event_id: "forged".into(), prev_hash: last.hash.clone(), hash: String::new(), ..last };
                    added.hash = record_hash(&added.prev_hash.clone(), &added);
                    records.push(added);
                    n + 1
                }
            };
            // Tamper with the file as it was signed: the checkpoints and head of the original.
            let mut tampered = Vec::new();
            let checkpoints: Vec<Signed> = original.iter().filter(|r| r.seq % 10 == 0).map(|r| Signed::sign(&signer, r.seq, &r.hash, 5)).collect();
            let mut lines: Vec<Line> = records.into_iter().map(|record| Line::Record { record, org: None }).collect();
            lines.extend(checkpoints.into_iter().map(Line::Checkpoint));
            let last = original.last().unwrap();
            lines.push(Line::Head(Signed::sign(&signer, last.seq, &last.hash, 9)));
            for line in &lines {
                serde_json::to_writer(&mut tampered, line).unwrap();
                tampered.push(b'\n');
            }
            let verification = verify_file(&tampered[..], None).unwrap();
            assert!(!verification.chain.ok, "round {round}, kind {kind}: not detected");
            assert_eq!(verification.chain.first_bad, Some(expected), "round {round}, kind {kind}: {:?}", verification.chain.reason);
        }
        assert!(kinds.iter().all(|k| *k > 1000), "every kind of tampering was tried: {kinds:?}");
    }
}
