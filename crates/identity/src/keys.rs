//! Signing keys: RSA-2048 generated with aws-lc, stored in identity's database,
//! published as a JWKS. Nothing here touches HTTP.

use base64::Engine;
use jsonwebtoken::EncodingKey;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub(crate) enum KeyError {
    #[error("key generation failed")]
    Generate,
    #[error("stored key is malformed")]
    Malformed,
}

/// A private signing key with its public half.
#[derive(Clone)]
pub(crate) struct SigningKey {
    pub(crate) kid: String,
    pub(crate) encoding: EncodingKey,
    pub(crate) n: String,
    pub(crate) e: String,
    /// Signing starts at this time; before it the key is only published.
    pub(crate) activate_at: i64,
}

/// The key that signs now: the most recently activated one whose time has come.
pub(crate) fn signing_key(keys: &[SigningKey], now: i64) -> Option<&SigningKey> {
    keys.iter().filter(|k| k.activate_at <= now).max_by_key(|k| k.activate_at)
}

/// Freshly generated key material to store: PKCS#8 DER plus the JWK components.
pub(crate) struct NewKey {
    pub(crate) kid: String,
    pub(crate) pkcs8: Vec<u8>,
    pub(crate) n: String,
    pub(crate) e: String,
}

pub(crate) fn generate() -> Result<NewKey, KeyError> {
    use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
    use aws_lc_rs::signature::KeyPair as _;
    let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).map_err(|_| KeyError::Generate)?;
    let pkcs8: Pkcs8V1Der<'static> = pair.as_der().map_err(|_| KeyError::Generate)?;
    let public = pair.public_key().as_ref().to_vec();
    let (n, e) = rsa_public_components(&public).ok_or(KeyError::Generate)?;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let n = b64.encode(n);
    let e = b64.encode(e);
    let kid = common::rand::sha256_hex(n.as_bytes())[..16].to_string();
    Ok(NewKey { kid, pkcs8: pkcs8.as_ref().to_vec(), n, e })
}

pub(crate) fn load(kid: String, pkcs8: &[u8], n: String, e: String, activate_at: i64) -> Result<SigningKey, KeyError> {
    let pkcs1 = pkcs8_inner_key(pkcs8).ok_or(KeyError::Malformed)?;
    Ok(SigningKey { kid, encoding: EncodingKey::from_rsa_der(pkcs1), n, e, activate_at })
}

#[derive(Serialize)]
pub(crate) struct Jwk<'a> {
    kty: &'static str,
    #[serde(rename = "use")]
    use_: &'static str,
    alg: &'static str,
    kid: &'a str,
    n: &'a str,
    e: &'a str,
}

#[derive(Serialize)]
pub(crate) struct Jwks<'a> {
    keys: Vec<Jwk<'a>>,
}

pub(crate) fn jwks(keys: &[SigningKey]) -> Jwks<'_> {
    Jwks {
        keys: keys
            .iter()
            .map(|k| Jwk { kty: "RSA", use_: "sig", alg: "RS256", kid: &k.kid, n: &k.n, e: &k.e })
            .collect(),
    }
}

/// Reads one DER element: (tag, contents, rest).
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n_bytes = (first & 0x7f) as usize;
        if n_bytes == 0 || n_bytes > 4 || rest.len() < n_bytes {
            return None;
        }
        let len = rest[..n_bytes].iter().fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n_bytes..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

fn strip_leading_zeros(int: &[u8]) -> &[u8] {
    let start = int.iter().position(|b| *b != 0).unwrap_or(int.len().saturating_sub(1));
    &int[start..]
}

/// `RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }` → (n, e).
fn rsa_public_components(der: &[u8]) -> Option<(&[u8], &[u8])> {
    let (0x30, seq, _) = der_element(der)? else { return None };
    let (0x02, n, rest) = der_element(seq)? else { return None };
    let (0x02, e, _) = der_element(rest)? else { return None };
    Some((strip_leading_zeros(n), strip_leading_zeros(e)))
}

/// `PrivateKeyInfo ::= SEQUENCE { version, algorithm, privateKey OCTET STRING }` → the PKCS#1 key.
fn pkcs8_inner_key(der: &[u8]) -> Option<&[u8]> {
    let (0x30, seq, _) = der_element(der)? else { return None };
    let (0x02, _, rest) = der_element(seq)? else { return None };
    let (0x30, _, rest) = der_element(rest)? else { return None };
    let (0x04, key, _) = der_element(rest)? else { return None };
    Some(key)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_sign_tokens_that_verify_with_the_published_components() {
        let new = generate().unwrap();
        let key = load(new.kid.clone(), &new.pkcs8, new.n.clone(), new.e.clone(), 0).unwrap();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(key.kid.clone());
        let claims = serde_json::json!({"sub": "x", "exp": common::now_unix() + 60});
        let token = jsonwebtoken::encode(&header, &claims, &key.encoding).unwrap();
        let decoding = jsonwebtoken::DecodingKey::from_rsa_components(&key.n, &key.e).unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        validation.validate_aud = false;
        let data = jsonwebtoken::decode::<serde_json::Value>(&token, &decoding, &validation).unwrap();
        assert_eq!(data.claims["sub"], "x");
        assert_eq!(key.e, "AQAB");
    }

    #[test]
    fn the_newest_activated_key_signs_and_future_keys_wait() {
        let new = generate().unwrap();
        let key = |kid: &str, activate_at| load(kid.into(), &new.pkcs8, new.n.clone(), new.e.clone(), activate_at).unwrap();
        let keys = [key("old", 0), key("current", 100), key("future", 200)];
        assert_eq!(signing_key(&keys, 150).unwrap().kid, "current");
        assert_eq!(signing_key(&keys, 200).unwrap().kid, "future");
        assert_eq!(signing_key(&keys, 50).unwrap().kid, "old");
    }

    #[test]
    fn malformed_der_is_refused_not_panicked_on() {
        assert!(pkcs8_inner_key(&[0x30, 0x82, 0xff]).is_none());
        assert!(rsa_public_components(&[]).is_none());
        assert!(load("k".into(), b"garbage", "n".into(), "e".into(), 0).is_err());
    }
}
