//! Reading records out of ring buffers: the one place raw bytes from the
//! kernel become typed values.

use aya::Pod;

/// The record at the start of `bytes`, if `bytes` is long enough to hold one.
///
/// Ring buffer records carry no alignment guarantee for our types and may be
/// longer than the struct (the kernel rounds them up), never shorter unless
/// something is wrong: a short record is `None`, for the caller to count or log.
pub fn read<T: Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: `bytes` holds at least size_of::<T>() bytes, read unaligned, and
    // `T: Pod` is valid for any bit pattern.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// A record the kernel sends at its used length (`bpf_ringbuf_output` of a
/// prefix of `T`): at least `fixed` bytes, the rest of `T` read as zero.
/// The caller checks that the record holds what its own fields say it fills.
pub fn read_prefix<T: Pod>(bytes: &[u8], fixed: usize) -> Option<T> {
    if bytes.len() < fixed {
        return None;
    }
    let len = bytes.len().min(size_of::<T>());
    let mut value = std::mem::MaybeUninit::<T>::zeroed();
    // SAFETY: `len` bytes fit in both; the rest of `value` stays zero, and
    // `T: Pod` is valid for any bit pattern.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), value.as_mut_ptr().cast::<u8>(), len);
        Some(value.assume_init())
    }
}

/// The record kind, the first `u32` of every record the `events` and
/// `exec_events` rings carry.
pub fn kind(bytes: &[u8]) -> Option<u32> {
    read::<u32>(bytes)
}

#[cfg(test)]
mod tests {
    use fleetsnitch_ebpf::ExitEvent;

    use super::*;

    #[test]
    fn reads_unaligned_records_and_refuses_short_ones() {
        let event = ExitEvent {
            kind: 2,
            tgid: 42,
            start_time_ns: 7,
        };
        // SAFETY: ExitEvent is plain integers.
        let raw: [u8; 16] = unsafe { std::mem::transmute(event) };
        let mut unaligned = vec![0u8; 1];
        unaligned.extend_from_slice(&raw);
        let read_back: ExitEvent = read(&unaligned[1..]).unwrap();
        assert_eq!((read_back.tgid, read_back.start_time_ns), (42, 7));
        assert_eq!(kind(&unaligned[1..]), Some(2));
        assert!(read::<ExitEvent>(&unaligned[1..16]).is_none());
    }

    #[test]
    fn reads_a_prefix_and_zeroes_the_rest() {
        let bytes = [2u8, 0, 0, 0, 42, 0, 0, 0];
        let read_back: ExitEvent = read_prefix(&bytes, 8).unwrap();
        assert_eq!(
            (read_back.kind, read_back.tgid, read_back.start_time_ns),
            (2, 42, 0)
        );
        assert!(read_prefix::<ExitEvent>(&bytes[..7], 8).is_none());
        // Longer than the struct: the struct's bytes only.
        let mut long = vec![1u8; 24];
        long[..4].copy_from_slice(&2u32.to_ne_bytes());
        let read_back: ExitEvent = read_prefix(&long, 8).unwrap();
        assert_eq!(read_back.start_time_ns, u64::from_ne_bytes([1; 8]));
    }
}
