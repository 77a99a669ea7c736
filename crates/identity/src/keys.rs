//! Signing keys: one key set per algorithm (RS256 with RSA-2048, ES256 with P-256,
//! EdDSA with Ed25519), generated with aws-lc, stored in identity's database and
//! published together as one JWKS. Every published JWK names its `alg`, and a key
//! signs only for its own algorithm. Nothing here touches HTTP.

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey};

#[derive(Debug, thiserror::Error)]
pub(crate) enum KeyError {
    #[error("key generation failed")]
    Generate,
    #[error("stored key is malformed")]
    Malformed,
    #[error("unsupported signing algorithm `{0}`; use RS256, ES256 or EdDSA")]
    Unsupported(String),
}

/// The algorithms identity signs with; RS256 is the default for every client.
pub(crate) const SIGNING_ALGS: [Algorithm; 3] = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

/// The JOSE name of one of the algorithms above.
pub(crate) fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::ES256 => "ES256",
        Algorithm::EdDSA => "EdDSA",
        _ => "RS256",
    }
}

/// Parses a client's or a stored key's algorithm; anything outside `SIGNING_ALGS` is refused.
pub(crate) fn parse_alg(name: &str) -> Result<Algorithm, KeyError> {
    match name {
        "RS256" => Ok(Algorithm::RS256),
        "ES256" => Ok(Algorithm::ES256),
        "EdDSA" => Ok(Algorithm::EdDSA),
        other => Err(KeyError::Unsupported(other.chars().take(32).collect())),
    }
}

/// A private signing key with its public half.
#[derive(Clone)]
pub(crate) struct SigningKey {
    pub(crate) kid: String,
    pub(crate) alg: Algorithm,
    pub(crate) encoding: EncodingKey,
    /// The public JWK members (`kty`, and `n`/`e` or `crv`/`x`/`y`).
    pub(crate) public: serde_json::Map<String, serde_json::Value>,
    /// Signing starts at this time; before it the key is only published.
    pub(crate) activate_at: i64,
}

impl SigningKey {
    /// The key to check our own tokens with.
    pub(crate) fn decoding(&self) -> Result<jsonwebtoken::DecodingKey, KeyError> {
        let text = |name: &str| self.public.get(name).and_then(|v| v.as_str()).ok_or(KeyError::Malformed);
        match self.alg {
            Algorithm::ES256 => jsonwebtoken::DecodingKey::from_ec_components(text("x")?, text("y")?),
            Algorithm::EdDSA => jsonwebtoken::DecodingKey::from_ed_components(text("x")?),
            _ => jsonwebtoken::DecodingKey::from_rsa_components(text("n")?, text("e")?),
        }
        .map_err(|_| KeyError::Malformed)
    }
}

/// The key of algorithm `alg` that signs now: the most recently activated one whose
/// time has come.
pub(crate) fn signing_key(keys: &[SigningKey], alg: Algorithm, now: i64) -> Option<&SigningKey> {
    keys.iter().filter(|k| k.alg == alg && k.activate_at <= now).max_by_key(|k| k.activate_at)
}

/// Freshly generated key material to store: PKCS#8 DER plus the public JWK members.
pub(crate) struct NewKey {
    pub(crate) kid: String,
    pub(crate) alg: Algorithm,
    pub(crate) pkcs8: Vec<u8>,
    pub(crate) public: serde_json::Map<String, serde_json::Value>,
}

impl NewKey {
    /// RSA keys keep their modulus and exponent in the original columns.
    pub(crate) fn rsa_components(&self) -> (&str, &str) {
        let text = |name: &str| self.public.get(name).and_then(|v| v.as_str()).unwrap_or("");
        (text("n"), text("e"))
    }
}

pub(crate) fn generate(alg: Algorithm) -> Result<NewKey, KeyError> {
    use aws_lc_rs::signature::KeyPair as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut public = serde_json::Map::new();
    let pkcs8 = match alg {
        Algorithm::RS256 => {
            use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
            let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).map_err(|_| KeyError::Generate)?;
            let pkcs8: Pkcs8V1Der<'static> = pair.as_der().map_err(|_| KeyError::Generate)?;
            let der = pair.public_key().as_ref().to_vec();
            let (n, e) = rsa_public_components(&der).ok_or(KeyError::Generate)?;
            public.insert("kty".into(), "RSA".into());
            public.insert("n".into(), b64.encode(n).into());
            public.insert("e".into(), b64.encode(e).into());
            pkcs8.as_ref().to_vec()
        }
        Algorithm::ES256 => {
            let rng = aws_lc_rs::rand::SystemRandom::new();
            let signing = &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
            let doc = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(signing, &rng).map_err(|_| KeyError::Generate)?;
            let pair = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(signing, doc.as_ref()).map_err(|_| KeyError::Generate)?;
            // Uncompressed SEC1 point: 0x04 || x (32) || y (32).
            let point = pair.public_key().as_ref();
            if point.len() != 65 || point[0] != 4 {
                return Err(KeyError::Generate);
            }
            public.insert("kty".into(), "EC".into());
            public.insert("crv".into(), "P-256".into());
            public.insert("x".into(), b64.encode(&point[1..33]).into());
            public.insert("y".into(), b64.encode(&point[33..]).into());
            doc.as_ref().to_vec()
        }
        Algorithm::EdDSA => {
            let rng = aws_lc_rs::rand::SystemRandom::new();
            let doc = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| KeyError::Generate)?;
            let pair = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|_| KeyError::Generate)?;
            public.insert("kty".into(), "OKP".into());
            public.insert("crv".into(), "Ed25519".into());
            public.insert("x".into(), b64.encode(pair.public_key().as_ref()).into());
            doc.as_ref().to_vec()
        }
        other => return Err(KeyError::Unsupported(format!("{other:?}"))),
    };
    let thumb = serde_json::Value::Object(public.clone()).to_string();
    let kid = format!("{}-{}", alg_name(alg).to_ascii_lowercase(), &common::rand::sha256_hex(thumb.as_bytes())[..16]);
    Ok(NewKey { kid, alg, pkcs8, public })
}

/// Rebuilds a stored key. RSA keys written before other algorithms existed have only
/// `n`/`e`; the others carry their public JWK members as JSON.
pub(crate) fn load(kid: String, alg: &str, pkcs8: &[u8], n: String, e: String, public_jwk: Option<&str>, activate_at: i64) -> Result<SigningKey, KeyError> {
    let alg = parse_alg(alg)?;
    let (encoding, public) = match alg {
        Algorithm::RS256 => {
            let pkcs1 = pkcs8_inner_key(pkcs8).ok_or(KeyError::Malformed)?;
            let mut public = serde_json::Map::new();
            public.insert("kty".into(), "RSA".into());
            public.insert("n".into(), n.into());
            public.insert("e".into(), e.into());
            (EncodingKey::from_rsa_der(pkcs1), public)
        }
        _ => {
            let public: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(public_jwk.ok_or(KeyError::Malformed)?).map_err(|_| KeyError::Malformed)?;
            let encoding = if alg == Algorithm::ES256 { EncodingKey::from_ec_der(pkcs8) } else { EncodingKey::from_ed_der(pkcs8) };
            (encoding, public)
        }
    };
    let key = SigningKey { kid, alg, encoding, public, activate_at };
    key.decoding()?;
    Ok(key)
}

/// The JWKS document: every published key with `use`, `alg` and `kid`.
pub(crate) fn jwks(keys: &[SigningKey]) -> serde_json::Value {
    let keys: Vec<serde_json::Value> = keys
        .iter()
        .map(|k| {
            let mut jwk = k.public.clone();
            jwk.insert("use".into(), "sig".into());
            jwk.insert("alg".into(), alg_name(k.alg).into());
            jwk.insert("kid".into(), k.kid.clone().into());
            serde_json::Value::Object(jwk)
        })
        .collect();
    serde_json::json!({ "keys": keys })
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

    fn stored(new: &NewKey, activate_at: i64) -> SigningKey {
        let (n, e) = new.rsa_components();
        let public = serde_json::Value::Object(new.public.clone()).to_string();
        load(new.kid.clone(), alg_name(new.alg), &new.pkcs8, n.into(), e.into(), Some(&public), activate_at).unwrap()
    }

    #[test]
    fn every_algorithm_signs_tokens_that_verify_with_the_published_jwk() {
        for alg in SIGNING_ALGS {
            let key = stored(&generate(alg).unwrap(), 0);
            let mut header = jsonwebtoken::Header::new(alg);
            header.kid = Some(key.kid.clone());
            let claims = serde_json::json!({"sub": "x", "exp": common::now_unix() + 60});
            let token = jsonwebtoken::encode(&header, &claims, &key.encoding).unwrap();
            // Verify the way a relying party does: from the JWKS document alone.
            let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(jwks(std::slice::from_ref(&key))).unwrap();
            let decoding = jsonwebtoken::DecodingKey::from_jwk(&set.keys[0]).unwrap();
            let mut validation = jsonwebtoken::Validation::new(alg);
            validation.validate_aud = false;
            let data = jsonwebtoken::decode::<serde_json::Value>(&token, &decoding, &validation).unwrap();
            assert_eq!(data.claims["sub"], "x", "{alg:?}");
            // A token of one algorithm never verifies under another's key.
            for other in SIGNING_ALGS.into_iter().filter(|o| *o != alg) {
                let other_key = stored(&generate(other).unwrap(), 0);
                let mut validation = jsonwebtoken::Validation::new(other);
                validation.validate_aud = false;
                assert!(jsonwebtoken::decode::<serde_json::Value>(&token, &other_key.decoding().unwrap(), &validation).is_err());
            }
        }
    }

    #[test]
    fn rsa_keys_publish_the_usual_exponent_and_kids_name_their_algorithm() {
        let rsa = generate(Algorithm::RS256).unwrap();
        assert_eq!(rsa.rsa_components().1, "AQAB");
        assert!(rsa.kid.starts_with("rs256-"));
        assert!(generate(Algorithm::ES256).unwrap().kid.starts_with("es256-"));
        assert!(generate(Algorithm::EdDSA).unwrap().kid.starts_with("eddsa-"));
        assert!(matches!(parse_alg("HS256"), Err(KeyError::Unsupported(_))));
        assert!(matches!(parse_alg("none"), Err(KeyError::Unsupported(_))));
    }

    #[test]
    fn the_newest_activated_key_of_an_algorithm_signs_and_future_keys_wait() {
        let new = generate(Algorithm::EdDSA).unwrap();
        let key = |kid: &str, activate_at| SigningKey { kid: kid.into(), ..stored(&new, activate_at) };
        let ec = stored(&generate(Algorithm::ES256).unwrap(), 300);
        let keys = [key("old", 0), key("current", 100), key("future", 200), ec];
        assert_eq!(signing_key(&keys, Algorithm::EdDSA, 150).unwrap().kid, "current");
        assert_eq!(signing_key(&keys, Algorithm::EdDSA, 400).unwrap().kid, "future");
        assert_eq!(signing_key(&keys, Algorithm::EdDSA, 50).unwrap().kid, "old");
        assert!(signing_key(&keys, Algorithm::ES256, 250).is_none());
        assert!(signing_key(&keys, Algorithm::RS256, 1000).is_none());
    }

    #[test]
    fn malformed_der_is_refused_not_panicked_on() {
        assert!(pkcs8_inner_key(&[0x30, 0x82, 0xff]).is_none());
        assert!(rsa_public_components(&[]).is_none());
        assert!(load("k".into(), "RS256", b"garbage", "n".into(), "e".into(), None, 0).is_err());
        assert!(load("k".into(), "ES256", b"garbage", String::new(), String::new(), Some("{}"), 0).is_err());
        assert!(load("k".into(), "EdDSA", b"garbage", String::new(), String::new(), None, 0).is_err());
        assert!(load("k".into(), "HS256", b"garbage", String::new(), String::new(), None, 0).is_err());
    }
}
