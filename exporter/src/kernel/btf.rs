//! The kernel's BTF, parsed for attaching (tp_btf and fexit programs name
//! their hook by its BTF type id).
//!
//! Parsed from a read-only mapping of the kernel's own copy where the kernel
//! allows one (Linux >= 6.16): the mapped pages are the kernel's, not this
//! process's, so the parse needs no private copy of the file (5 MiB here)
//! beside the parsed types, and the agent's peak memory (VmHWM, which it
//! keeps for life) is that much lower. Older kernels refuse the mapping and
//! the file is read as aya reads it.

use std::{fs::File, io};

use aya::{Btf, BtfError, Endianness};
use memmap2::{Mmap, MmapOptions};

/// Where the kernel exposes its BTF (CONFIG_DEBUG_INFO_BTF).
pub const PATH: &str = "/sys/kernel/btf/vmlinux";

/// Parses the running kernel's BTF.
pub fn parse() -> Result<Btf, BtfError> {
    match map(PATH) {
        Ok(mapping) => Btf::parse(&mapping, Endianness::default()),
        Err(error) => {
            tracing::debug!(path = PATH, %error, "kernel BTF not mappable; reading it");
            Btf::parse_file(PATH, Endianness::default())
        }
    }
}

/// A private read-only mapping of the whole file at `path` (the kernel
/// refuses shared or writable mappings of its BTF).
fn map(path: &str) -> io::Result<Mmap> {
    let file = File::open(path)?;
    if file.metadata()?.len() == 0 {
        return Err(io::Error::other("empty file"));
    }
    // SAFETY: the kernel's BTF never changes while the system runs, and a
    // private read-only mapping cannot be written through; a file that
    // shrank under the mapping would fault, which the kernel's BTF does not.
    unsafe { MmapOptions::new().map_copy_read_only(&file) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mapped bytes are the file's bytes: what is parsed does not depend
    /// on how it was reached.
    #[test]
    fn mapping_holds_the_files_bytes() {
        let mut file = tempfile::NamedTempFile::new().expect("temporary file");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        io::Write::write_all(&mut file, &data).expect("write temporary file");
        let path = file.path().to_str().expect("UTF-8 temporary path");
        let mapping = map(path).expect("map temporary file");
        assert_eq!(&mapping[..], data.as_slice());
    }

    /// Linux 6.16 and later map their BTF, and the mapping is the file;
    /// older kernels refuse, and `parse` reads the file instead.
    #[test]
    fn the_kernels_btf_mapped_is_the_kernels_btf_read() {
        let read = std::fs::read(PATH)
            .unwrap_or_else(|error| panic!("{PATH}: {error} (the agent needs the kernel's BTF)"));
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
        let mut numbers = release
            .trim()
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse::<u32>().unwrap_or(0));
        let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
        match map(PATH) {
            Ok(mapping) => assert!(
                mapping[..] == read[..],
                "{PATH}: {} bytes mapped differ from the {} bytes read",
                mapping.len(),
                read.len()
            ),
            Err(error) => assert!(
                version < (6, 16),
                "Linux {release} should map {PATH}, and refused: {error}"
            ),
        }
        assert!(parse().is_ok(), "{PATH} does not parse");
    }

    #[test]
    fn an_empty_file_is_not_mapped() {
        let file = tempfile::NamedTempFile::new().expect("temporary file");
        let path = file.path().to_str().expect("UTF-8 temporary path");
        assert!(map(path).is_err());
    }
}
