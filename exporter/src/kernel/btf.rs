//! The kernel's BTF, parsed for attaching (tp_btf and fexit programs name
//! their hook by its BTF type id).
//!
//! Parsed from a read-only mapping of the kernel's own copy where the kernel
//! allows one (Linux >= 6.16): the mapped pages are the kernel's, not this
//! process's, so the parse needs no private copy of the file (5 MiB here)
//! beside the parsed types, and the agent's peak memory (VmHWM, which it
//! keeps for life) is that much lower. Older kernels refuse the mapping and
//! the file is read as aya reads it.

use std::{fs::File, io, os::fd::AsRawFd, ptr::NonNull};

use aya::{Btf, BtfError, Endianness};

/// Where the kernel exposes its BTF (CONFIG_DEBUG_INFO_BTF).
pub const PATH: &str = "/sys/kernel/btf/vmlinux";

/// Parses the running kernel's BTF.
pub fn parse() -> Result<Btf, BtfError> {
    match Mapping::of(PATH) {
        Ok(mapping) => Btf::parse(mapping.bytes(), Endianness::default()),
        Err(error) => {
            tracing::debug!(path = PATH, %error, "kernel BTF not mappable; reading it");
            Btf::parse_file(PATH, Endianness::default())
        }
    }
}

/// A private read-only mapping of a whole file, unmapped on drop.
struct Mapping {
    address: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn of(path: &str) -> io::Result<Self> {
        let file = File::open(path)?;
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| io::Error::other("file larger than the address space"))?;
        if len == 0 {
            return Err(io::Error::other("empty file"));
        }
        // SAFETY: a fresh mapping chosen by the kernel, aliasing nothing; the
        // descriptor may be closed once it exists. The kernel refuses
        // writable or shared mappings of its BTF.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let address = NonNull::new(address.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null address"))?;
        Ok(Self { address, len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `len` readable bytes are mapped at `address` until drop,
        // and nothing writes to them (read-only, private).
        unsafe { std::slice::from_raw_parts(self.address.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `of` mapped; no slice of it outlives `self`.
        unsafe {
            libc::munmap(self.address.as_ptr().cast(), self.len);
        }
    }
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
        let mapping = Mapping::of(path).expect("map temporary file");
        assert_eq!(mapping.bytes(), data.as_slice());
    }

    #[test]
    fn the_kernels_btf_mapped_is_the_kernels_btf_read() {
        let Ok(read) = std::fs::read(PATH) else {
            eprintln!("skipped: {PATH} cannot be read here");
            return;
        };
        match Mapping::of(PATH) {
            Ok(mapping) => assert!(
                mapping.bytes() == read.as_slice(),
                "{PATH}: {} bytes mapped differ from the {} bytes read",
                mapping.bytes().len(),
                read.len()
            ),
            Err(error) => eprintln!("skipped: this kernel does not map {PATH} ({error})"),
        }
    }

    #[test]
    fn an_empty_file_is_not_mapped() {
        let file = tempfile::NamedTempFile::new().expect("temporary file");
        let path = file.path().to_str().expect("UTF-8 temporary path");
        assert!(Mapping::of(path).is_err());
    }
}
