//! The `events` ring buffer: each process announces itself (executable,
//! parent, user, cgroup) when it first touches the network, and its exit.

use std::os::fd::{AsRawFd, RawFd};

use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
};
use fleetsnitch_ebpf::{EVENT_EXIT, EVENT_IDENTITY, ExitEvent, IdentityEvent};

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
                && let Some(event) = ring::read::<IdentityEvent>(bytes)
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
