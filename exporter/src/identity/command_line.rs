//! Command lines, as picosnitch logged them: the arguments joined by spaces.
//!
//! Arguments are bytes, chosen by whoever started the process: invalid UTF-8
//! is escaped (`\xNN`, as every name from the kernel), and a line is capped
//! at a byte budget on a character boundary, never inside an escape or a
//! multi-byte character, with `…` marking the cut. They often hold secrets,
//! so they are read only when `journal.record_command_lines` asks for them.

use std::{fs::File, io::Read};

use crate::support::raw_text;

/// Marks a line cut at the budget (or by the kernel's copy).
const CUT: char = '…';

/// The NUL-separated `args` as one line of at most `max_bytes` bytes (plus
/// the cut mark); `truncated`: the arguments were already cut before.
pub fn from_args(args: &[u8], max_bytes: usize, truncated: bool) -> Option<String> {
    let parts: Vec<String> = args
        .split(|&b| b == 0)
        .filter(|arg| !arg.is_empty())
        .map(raw_text::from_bytes)
        .collect();
    if parts.is_empty() {
        return None;
    }
    let mut line = parts.join(" ");
    let mut cut = truncated;
    if line.len() > max_bytes {
        let mut end = max_bytes;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        // Never half an escape: `\xN` would read as another byte.
        if let Some(escape) = line[..end].rfind("\\x")
            && end - escape < 4
            && raw_text::to_bytes(&line[escape..(escape + 4).min(line.len())]).is_some()
        {
            end = escape;
        }
        line.truncate(end);
        cut = true;
    }
    if cut {
        line.push(CUT);
    }
    Some(line)
}

/// The command line of process `tgid`, from `/proc/<tgid>/cmdline` (`None`
/// once it exited, or for a kernel thread, which has none).
pub fn of_process(tgid: u32, max_bytes: usize) -> Option<String> {
    let file = File::open(format!("/proc/{tgid}/cmdline")).ok()?;
    // Reading two bytes past the budget tells whether anything besides the
    // last argument's terminating NUL was left out.
    let mut bytes = Vec::with_capacity(max_bytes.min(4096) + 2);
    file.take(max_bytes as u64 + 2)
        .read_to_end(&mut bytes)
        .ok()?;
    if bytes.len() < max_bytes + 2 && bytes.last() == Some(&0) {
        bytes.pop();
    }
    let truncated = bytes.len() > max_bytes;
    bytes.truncate(max_bytes);
    from_args(&bytes, max_bytes, truncated)
}

/// The task name (`comm`) of process `tgid`, from `/proc/<tgid>/comm`.
pub fn comm_of(tgid: u32) -> Option<String> {
    let mut bytes = Vec::new();
    File::open(format!("/proc/{tgid}/comm"))
        .ok()?
        .take(64)
        .read_to_end(&mut bytes)
        .ok()?;
    let name = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    (!name.is_empty()).then(|| raw_text::from_bytes(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_joined_and_invalid_bytes_escaped() {
        assert_eq!(
            from_args(b"curl\0-s\0https://example.org\0", 100, false).as_deref(),
            Some("curl -s https://example.org")
        );
        assert_eq!(
            from_args(b"tool\0\xff\xfe\0", 100, false).as_deref(),
            Some("tool \\xff\\xfe")
        );
        assert_eq!(from_args(b"\0\0", 100, false), None);
        assert_eq!(
            from_args(b"a\0b", 100, true).as_deref(),
            Some("a b…"),
            "cut by the kernel"
        );
    }

    #[test]
    fn a_long_line_is_cut_on_a_character_and_never_inside_an_escape() {
        // "é" is two bytes: a cut at 2 would split it.
        assert_eq!(from_args("aé".as_bytes(), 2, false).as_deref(), Some("a…"));
        // `\xff` is four characters of one escape: a cut at 6 keeps "ab " and
        // leaves the whole escape out.
        assert_eq!(from_args(b"ab\0\xffcd", 6, false).as_deref(), Some("ab …"));
        let line = from_args(&[b'x'; 5000], 1024, false).unwrap();
        assert_eq!(line.len(), 1024 + CUT.len_utf8());
    }

    #[test]
    fn this_process_has_a_command_line_and_a_name() {
        let pid = std::process::id();
        let expected: Vec<String> = std::env::args().filter(|a| !a.is_empty()).collect();
        let expected = expected.join(" ");
        let line = of_process(pid, expected.len().max(1)).unwrap();
        assert_eq!(line, expected);
        let short = of_process(pid, 4).unwrap();
        assert!(
            short.ends_with(CUT) && short.len() <= 4 + CUT.len_utf8(),
            "{short}"
        );
        assert!(comm_of(pid).is_some_and(|comm| !comm.is_empty() && comm.len() <= 15));
        assert_eq!(of_process(u32::MAX, 100), None);
    }
}
