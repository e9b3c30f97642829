//! Shopify webhook signatures: base64 of HMAC-SHA256 over the raw body, checked in
//! constant time against the current secret and, during a rotation, the previous one.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The secrets a delivery may be signed with.
#[derive(Clone)]
pub struct Secrets {
    pub current: String,
    /// Shopify may still sign with the old secret for up to an hour after a rotation.
    pub previous: Option<String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets(<redacted>)")
    }
}

/// Reads a secrets file: one shop per line, `<shop-domain> <secret> [<previous secret>]`
/// (blank lines and `#` comments skipped). It must be private to the engine's user.
pub fn read_secrets_file(path: &std::path::Path) -> anyhow::Result<std::collections::HashMap<String, Secrets>> {
    crate::api::auth::check_private(path)?;
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let mut shops = std::collections::HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("{} line {}", path.display(), i + 1);
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (shop, current, previous) = match fields[..] {
            [shop, current] => (shop, current, None),
            [shop, current, previous] => (shop, current, Some(previous.to_string())),
            _ => anyhow::bail!("{}: give <shop-domain> <secret> [<previous secret>]", at()),
        };
        let shop = crate::shopify::reconcile::checked_shop(shop).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        let secrets = Secrets { current: current.to_string(), previous };
        anyhow::ensure!(shops.insert(shop.clone(), secrets).is_none(), "{}: {shop} is given twice", at());
    }
    Ok(shops)
}

/// The `X-Shopify-Hmac-Sha256` value for `body` under `secret`.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(body);
    STANDARD.encode(mac.finalize().into_bytes())
}

/// Whether `header` signs `body` under one of the secrets. Anything that is not base64
/// of 32 bytes is simply wrong: never an error, never a panic.
pub fn verify(secrets: &Secrets, body: &[u8], header: &str) -> bool {
    let Ok(given) = STANDARD.decode(header.trim()) else { return false };
    std::iter::once(&secrets.current).chain(secrets.previous.as_ref()).any(|secret| {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
        mac.update(body);
        // `verify_slice` compares in constant time (and refuses other lengths).
        mac.verify_slice(&given).is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets() -> Secrets {
        Secrets { current: "new-secret".into(), previous: Some("old-secret".into()) }
    }

    #[test]
    fn accepts_current_and_previous_secret_only() {
        let body = br#"{"id":820982911946154508,"total_price":"398.00"}"#;
        assert!(verify(&secrets(), body, &sign("new-secret", body)));
        assert!(verify(&secrets(), body, &sign("old-secret", body)));
        assert!(!verify(&secrets(), body, &sign("another-secret", body)));
        let no_rotation = Secrets { current: "new-secret".into(), previous: None };
        assert!(!verify(&no_rotation, body, &sign("old-secret", body)));
    }

    /// Vectors hard-coded in Shopify's own library test suites (the expected header is
    /// a literal there, not computed by the test), so our HMAC and base64 match theirs.
    const PUBLISHED: [(&str, &[u8], &str, &str); 4] = [
        // Shopify/shopify-api-php, tests/Webhooks/RegistryTest.php (secret: tests/BaseTestCase.php).
        (
            "7008c5f4da4718b9b45d26d3fcbbb157",
            br#"{"foo":"bar"}"#,
            "+R9TwYM4mbLTk3hEAOBkpA7zW2lc9vNFmVKs2u2jtyY=",
            "shopify-api-php",
        ),
        // Shopify/shopify-app-js, packages/apps/shopify-api/lib/webhooks/__tests__/validate.test.ts.
        ("test_secret_key", br#"{"foo": "bar"}"#, "B23tXN681gZ0qIWNRrgtzBE9XSDo5yaUu6wfmhu3a7g=", "shopify-app-js"),
        // Shopify/shopify_app, test/shopify_app/controller_concerns/webhook_verification_test.rb:
        // the same form body under the new and the old secret of a rotation.
        ("secret", b"foo=anything", "yCGX/RrK4fcuNtr3ztk5tQGsOBjcAzHpGLdMUrbV8yI=", "shopify_app"),
        ("old_secret", b"foo=anything", "XqRcjrSv57VACn6apEO9znyu/wkN1VC7QxdSPwK3Hzs=", "shopify_app (old secret)"),
    ];

    #[test]
    fn published_shopify_vectors_verify_and_a_flipped_bit_does_not() {
        for (secret, body, header, origin) in PUBLISHED {
            let only = Secrets { current: secret.into(), previous: None };
            assert_eq!(sign(secret, body), header, "{origin}");
            assert!(verify(&only, body, header), "{origin}");
            for i in 0..body.len() {
                for bit in 0..8 {
                    let mut b = body.to_vec();
                    b[i] ^= 1 << bit;
                    assert!(!verify(&only, &b, header), "{origin}: body bit {i}.{bit}");
                }
            }
            let raw = STANDARD.decode(header).unwrap();
            for i in 0..raw.len() * 8 {
                let mut r = raw.clone();
                r[i / 8] ^= 1 << (i % 8);
                assert!(!verify(&only, body, &STANDARD.encode(r)), "{origin}: header bit {i}");
            }
        }
        // shopify_app's rotation: the old secret's signature passes only while it is the previous one.
        let rotating = Secrets { current: "secret".into(), previous: Some("old_secret".into()) };
        assert!(verify(&rotating, b"foo=anything", PUBLISHED[3].2));
        assert!(verify(&rotating, b"foo=anything", PUBLISHED[2].2));
    }

    #[test]
    fn a_single_flipped_bit_is_refused() {
        let body = br#"{"id":1,"updated_at":"2026-11-21T10:00:00-05:00"}"#.to_vec();
        let good = sign("new-secret", &body);
        for i in 0..body.len() {
            for bit in 0..8 {
                let mut b = body.clone();
                b[i] ^= 1 << bit;
                assert!(!verify(&secrets(), &b, &good), "body bit {i}.{bit}");
            }
        }
        let mut raw = STANDARD.decode(&good).unwrap();
        raw[7] ^= 0x10;
        assert!(!verify(&secrets(), &body, &STANDARD.encode(raw)));
    }

    #[test]
    fn malformed_headers_of_any_length_are_refused() {
        let body = b"{}";
        for header in ["", "=", "not base64!", "AAAA", &"A".repeat(10_000), &sign("new-secret", body)[..20]] {
            assert!(!verify(&secrets(), body, header), "{header:?}");
        }
    }
}
