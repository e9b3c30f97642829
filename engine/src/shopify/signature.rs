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
