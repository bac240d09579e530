//! Names from the kernel (paths, process names) are bytes, not UTF-8. Every
//! sink (Prometheus labels, the journal, JSON lines, OTLP) needs text, so
//! invalid sequences are written as `\xNN`, one per byte. Unlike U+FFFD
//! replacement, two different files never end up with the same name (a path
//! holding a literal `\xNN` aside), and [`to_bytes`] gives the file back for
//! opening it by path.

use std::{borrow::Cow, ffi::OsStr, os::unix::ffi::OsStrExt as _};

/// `bytes` as text: valid UTF-8 unchanged, each invalid byte as `\xNN`.
pub fn from_bytes(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        text.push_str(chunk.valid());
        for byte in chunk.invalid() {
            text.push_str(&format!("\\x{byte:02x}"));
        }
    }
    text
}

/// The bytes [`from_bytes`] wrote `text` from, when it holds `\xNN` escapes
/// (`None` when there is none, so a caller tries the text as it is first).
pub fn to_bytes(text: &str) -> Option<Vec<u8>> {
    if !text.contains("\\x") {
        return None;
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escaped = bytes.get(index..index + 4).and_then(|four| {
            (four[0] == b'\\' && four[1] == b'x')
                .then(|| std::str::from_utf8(&four[2..]).ok())
                .flatten()
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        });
        match escaped {
            Some(byte) => {
                out.push(byte);
                index += 4;
            }
            None => {
                out.push(bytes[index]);
                index += 1;
            }
        }
    }
    Some(out)
}

/// [`from_bytes`] for an OS string (a path from `readlink`).
pub fn from_os(text: &OsStr) -> Cow<'_, str> {
    match text.to_str() {
        Some(valid) => Cow::Borrowed(valid),
        None => Cow::Owned(from_bytes(text.as_bytes())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_bytes_are_escaped_and_come_back() {
        let raw = b"/tmp/a\xff\"b\n\\c\xc3";
        let text = from_bytes(raw);
        assert_eq!(text, "/tmp/a\\xff\"b\n\\c\\xc3");
        assert_eq!(to_bytes(&text).unwrap(), raw);
        assert_eq!(from_bytes("/usr/bin/é".as_bytes()), "/usr/bin/é");
        assert_eq!(to_bytes("/usr/bin/x"), None);
    }
}
