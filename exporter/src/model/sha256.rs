//! The digest that names an executable's content.

use std::fmt;

use serde::Serialize;

/// A sha256 digest in lowercase hex. "No hash" is `Option::<Sha256>::None`
/// everywhere in the model; sinks choose how to write it (the metrics'
/// `sha256="unavailable"`, the journal's empty column).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Sha256(String);

impl Sha256 {
    /// From the 32 bytes of a finished digest.
    pub fn from_digest(digest: &[u8]) -> Self {
        use fmt::Write as _;
        let mut hex = String::with_capacity(digest.len() * 2);
        for byte in digest {
            // Writing to a String cannot fail.
            let _ = write!(hex, "{byte:02x}");
        }
        Self(hex)
    }

    /// From text written by a sink (the journal's column, a configuration
    /// list): any case, surrounding whitespace ignored; `None` when empty.
    pub fn from_hex(text: &str) -> Option<Self> {
        let text = text.trim();
        (!text.is_empty()).then(|| Self(text.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_lowercase_hex_and_empty_text_is_no_hash() {
        assert_eq!(Sha256::from_digest(&[0xab, 0x01]).as_str(), "ab01");
        assert_eq!(Sha256::from_hex(" AB01 ").unwrap().as_str(), "ab01");
        assert_eq!(Sha256::from_hex(""), None);
    }
}
