//! SHA-256 in lower-case hex: how a string that must not be kept as it is
//! (a session id, an over-long key) or must fit a key name is named.

use sha2::{Digest, Sha256};

/// The SHA-256 of `data`, 64 lower-case hex digits.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_digest_of_nothing_is_the_known_one() {
        assert_eq!(
            crate::digest::sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
