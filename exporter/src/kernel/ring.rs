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
}
