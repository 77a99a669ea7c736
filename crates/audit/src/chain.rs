//! The hash chain: each record's hash is SHA-256 over the previous hash and a
//! canonical encoding of the record (a JSON array of strings, so field order and
//! map ordering cannot change it). Verification walks the chain from the start and
//! names the first record that does not fit. Pure functions, no IO.

use sha2::Digest;

pub(crate) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Record {
    pub(crate) seq: i64,
    pub(crate) ts: i64,
    pub(crate) event_id: String,
    pub(crate) actor: String,
    pub(crate) action: String,
    pub(crate) resource: String,
    pub(crate) outcome: String,
    /// The context exactly as stored (JSON text).
    pub(crate) context: String,
    pub(crate) prev_hash: String,
    pub(crate) hash: String,
}

pub(crate) fn record_hash(prev_hash: &str, r: &Record) -> String {
    let canonical = serde_json::to_string(&[
        r.seq.to_string(),
        r.ts.to_string(),
        r.event_id.clone(),
        r.actor.clone(),
        r.action.clone(),
        r.resource.clone(),
        r.outcome.clone(),
        r.context.clone(),
    ])
    .unwrap_or_default();
    let mut hasher = sha2::Sha256::new();
    hasher.update(prev_hash.as_bytes());
    hasher.update(b"\n");
    hasher.update(canonical.as_bytes());
    hex::encode(hasher.finalize())
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Verification {
    pub ok: bool,
    pub n_records: i64,
    pub head_hash: String,
    /// Sequence number of the first record that breaks the chain.
    pub first_bad: Option<i64>,
    pub reason: Option<String>,
}

/// Checks records in storage order: contiguous sequence numbers from 1, each linked
/// to its predecessor, each hash matching its content.
pub(crate) fn verify(records: impl IntoIterator<Item = Record>) -> Verification {
    let mut prev = GENESIS.to_string();
    let mut n = 0;
    for (expected_seq, record) in (1i64..).zip(records) {
        let fail = |reason: String| Verification { ok: false, n_records: n, head_hash: prev.clone(), first_bad: Some(record.seq), reason: Some(reason) };
        if record.seq != expected_seq {
            return Verification {
                first_bad: Some(expected_seq),
                ..fail(format!("record {expected_seq} is missing or out of order (found {})", record.seq))
            };
        }
        if record.prev_hash != prev {
            return fail(format!("record {} does not link to its predecessor", record.seq));
        }
        if record_hash(&prev, &record) != record.hash {
            return fail(format!("record {} was modified", record.seq));
        }
        prev = record.hash.clone();
        n += 1;
    }
    Verification { ok: true, n_records: n, head_hash: prev, first_bad: None, reason: None }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<Record> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|seq| {
                let mut r = Record {
                    seq,
                    ts: 1000 + seq,
                    event_id: format!("e{seq}"),
                    actor: "ann".into(),
                    action: "document.uploaded".into(),
                    resource: format!("document:{seq}"),
                    outcome: "success".into(),
                    context: "{}".into(),
                    prev_hash: prev.clone(),
                    hash: String::new(),
                };
                r.hash = record_hash(&prev, &r);
                prev = r.hash.clone();
                r
            })
            .collect()
    }

    #[test]
    fn an_intact_chain_verifies() {
        let v = verify(chain(5));
        assert!(v.ok);
        assert_eq!(v.n_records, 5);
    }

    #[test]
    fn modification_deletion_insertion_and_reordering_are_named() {
        let mut modified = chain(5);
        modified[2].actor = "mallory".into();
        assert_eq!(verify(modified).first_bad, Some(3));

        let mut deleted = chain(5);
        deleted.remove(1);
        assert_eq!(verify(deleted).first_bad, Some(2));

        let mut reordered = chain(5);
        reordered.swap(1, 2);
        assert_eq!(verify(reordered).first_bad, Some(2));

        let mut inserted = chain(5);
        let mut forged = inserted[1].clone();
        forged.actor = "mallory".into();
        inserted.insert(2, forged);
        assert_eq!(verify(inserted).first_bad, Some(3));

        let mut rehashed = chain(5);
        rehashed[3].outcome = "denied".into();
        rehashed[3].hash = record_hash(&rehashed[3].prev_hash.clone(), &rehashed[3]);
        assert_eq!(verify(rehashed).first_bad, Some(5), "recomputing one hash breaks the next link");
    }
}
