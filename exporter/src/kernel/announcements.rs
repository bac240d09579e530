//! The `events` ring buffer: each process announces itself (executable,
//! parent, user, cgroup) when it first touches the network, and its exit.

use std::os::fd::{AsRawFd, RawFd};

use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
};
use fleetsnitch_ebpf::{
    EVENT_EXIT, EVENT_IDENTITY, ExitEvent, IdentityEvent, NAME_LEN, PATH_DEPTH,
};

use super::{KernelError, ring, take_map};

/// One record of the ring.
pub enum Announcement<'a> {
    Identity(&'a IdentityEvent),
    Exit(&'a ExitEvent),
}

pub struct Announcements {
    events: RingBuf<MapData>,
}

impl Announcements {
    pub fn new(ebpf: &mut Ebpf) -> Result<Self, KernelError> {
        Ok(Self {
            events: RingBuf::try_from(take_map(ebpf, "events")?)
                .map_err(KernelError::map("events"))?,
        })
    }

    /// Hands every pending record to `handle`, in the order the kernel wrote them.
    pub fn drain(&mut self, mut handle: impl FnMut(Announcement<'_>)) {
        while let Some(item) = self.events.next() {
            let bytes: &[u8] = &item;
            let kind = ring::kind(bytes);
            if kind == Some(EVENT_IDENTITY)
                && let Some(event) = identity(bytes)
            {
                handle(Announcement::Identity(&event));
            } else if kind == Some(EVENT_EXIT)
                && let Some(event) = ring::read::<ExitEvent>(bytes)
            {
                handle(Announcement::Exit(&event));
            } else {
                tracing::warn!(?kind, len = bytes.len(), "unexpected ring buffer record");
            }
        }
    }

    /// The ring's descriptor, to wait for records with poll(2).
    pub fn as_raw_fd(&self) -> RawFd {
        self.events.as_raw_fd()
    }
}

/// An identity record: sent up to its last filled path slot, so it is valid
/// when it holds the fixed fields and every slot its `depth` counts.
fn identity(bytes: &[u8]) -> Option<IdentityEvent> {
    let fixed = std::mem::offset_of!(IdentityEvent, names);
    let event = ring::read_prefix::<IdentityEvent>(bytes, fixed)?;
    let slots = usize::try_from(event.depth).ok()?.min(PATH_DEPTH);
    (bytes.len() >= fixed + slots * NAME_LEN).then_some(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(depth: u32, slots_sent: usize) -> Vec<u8> {
        let fixed = std::mem::offset_of!(IdentityEvent, names);
        let mut bytes = vec![0u8; fixed + slots_sent * NAME_LEN];
        bytes[..4].copy_from_slice(&EVENT_IDENTITY.to_ne_bytes());
        let depth_at = std::mem::offset_of!(IdentityEvent, depth);
        bytes[depth_at..depth_at + 4].copy_from_slice(&depth.to_ne_bytes());
        for slot in 0..slots_sent {
            bytes[fixed + slot * NAME_LEN] = b'a' + slot as u8;
        }
        bytes
    }

    #[test]
    fn a_record_sent_up_to_its_depth_reads_with_its_names() {
        let event = identity(&record(3, 3)).unwrap();
        assert_eq!(event.depth, 3);
        assert_eq!(
            [event.names[0][0], event.names[1][0], event.names[2][0]],
            *b"abc"
        );
        assert!(event.names[3..].iter().all(|name| name[0] == 0));
    }

    #[test]
    fn a_record_shorter_than_its_depth_is_refused() {
        assert!(identity(&record(3, 2)).is_none());
        assert!(identity(&record(0, 0)[..8]).is_none());
        // A depth past the slots counts the slots only.
        assert!(identity(&record(u32::MAX, PATH_DEPTH)).is_some());
    }
}
