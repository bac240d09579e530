//! Turns one drained traffic entry into the flow record every sink reads:
//! the program (from the identity table and the hasher), the peer (from the
//! traffic key, DNS answers and GeoIP) and the workload (container, pod).

use fleetsnitch_ebpf::{DIR_RECEIVED, DIR_SENT, DnsEvent, TrafficKey, TrafficValue};

use super::{
    dns::{DnsCache, Transport},
    geoip::GeoIp,
    kubernetes::PodResolver,
    users::UserNames,
};
use crate::{
    identity::{containers::ContainerRef, processes::Process},
    kernel::flow::Endpoints,
    model::{Bytes, ExeKey, FlowRecord, Peer, Program, Sha256, Workload},
};

const IPPROTO_TCP: u8 = 6;

/// What the agent adds to what the kernel and the identity table know.
#[derive(Debug, Default)]
pub struct Enricher {
    pub geoip: Option<GeoIp>,
    pub domains: DnsCache,
    pub pods: Option<PodResolver>,
    pub users: UserNames,
}

/// The container of a process, if it runs in one (not a systemd unit).
fn container_of(process: Option<&Process>) -> Option<&ContainerRef> {
    process
        .and_then(|p| p.container.as_ref())
        .filter(|c| c.runtime.is_container())
}

impl Enricher {
    /// The record of one traffic entry of the executable `exe` (the file
    /// `file`, hashed as `sha256` if it was yet), sent and received by
    /// `process` (unknown if it exited before it was announced), whose
    /// parent's executable hashed as `parent_sha256`.
    #[expect(
        clippy::too_many_arguments,
        reason = "what the kernel, the identity table and the hasher each know of one flow"
    )]
    pub fn flow(
        &mut self,
        key: &TrafficKey,
        value: &TrafficValue,
        exe: String,
        file: Option<ExeKey>,
        sha256: Option<Sha256>,
        process: Option<&Process>,
        parent_sha256: Option<Sha256>,
    ) -> FlowRecord {
        let endpoints = Endpoints::of(key, value);
        let container = container_of(process);
        let geo = match (&self.geoip, endpoints.remote_address) {
            (Some(geoip), Some(ip)) => geoip.lookup_ref(ip),
            _ => Default::default(),
        };
        let domain = endpoints.remote_address.and_then(|ip| {
            self.domains
                .domain_for(key.tgid, container.map(|c| c.id.as_str()), ip)
        });
        let uid = process.map(|p| p.uid);
        FlowRecord {
            program: Program {
                exe,
                file,
                sha256,
                parent: process.and_then(|p| p.parent_path.clone()),
                parent_sha256,
                parent_name: process.and_then(|p| p.parent_comm.clone()),
                command_line: process.and_then(|p| p.command_line.clone()),
                parent_command_line: process.and_then(|p| p.parent_command_line.clone()),
                uid,
                user_name: uid.map(|uid| self.users.name(uid).to_owned()),
                comm: process.map(|p| p.comm.clone()),
            },
            peer: Peer {
                transport: endpoints.transport,
                local_address: endpoints.local_address,
                local_port: endpoints.local_port,
                remote_address: endpoints.remote_address,
                remote_port: endpoints.remote_port,
                domain,
                country: geo.country.map(str::to_owned),
                asn: geo.asn,
            },
            workload: self.workload_of(container),
            bytes: Bytes {
                sent: value.bytes[DIR_SENT],
                received: value.bytes[DIR_RECEIVED],
            },
        }
    }

    /// Who `process` runs as (its user's name) and where (its workload):
    /// the context of an executable's sighting.
    pub fn run_context(&mut self, process: &Process) -> (Option<String>, Workload) {
        let user_name = self.users.name(process.uid).to_owned();
        (
            Some(user_name),
            self.workload_of(container_of(Some(process))),
        )
    }

    /// The container's workload, its pod's names where the pods are known.
    fn workload_of(&self, container: Option<&ContainerRef>) -> Workload {
        let pod = match (&self.pods, container) {
            (Some(pods), Some(container)) => pods.lookup(&container.id),
            _ => None,
        };
        Workload {
            container_id: container.map(|c| c.id.clone()),
            container_name: pod.as_ref().map(|p| p.container.clone()),
            pod: pod.as_ref().map(|p| p.pod.clone()),
            namespace: pod.map(|p| p.namespace),
        }
    }

    /// Records the DNS answer `process` received, for its later flows.
    pub fn record_dns_answer(&mut self, event: &DnsEvent, process: Option<&Process>) {
        if event.tgid == 0 {
            // The query went out before the agent started: owner unknown.
            return;
        }
        let container = container_of(process).map(|c| c.id.as_str());
        let captured = usize::from(event.captured).min(event.payload.len());
        let transport = if event.protocol == IPPROTO_TCP {
            Transport::Tcp
        } else {
            Transport::Udp
        };
        // Failures are counted by the cache; the payload is data, never trusted.
        let _ = self.domains.record_payload(
            event.tgid,
            container,
            &event.payload[..captured],
            event.payload_len as usize,
            transport,
        );
    }

    /// After a drain: forgets the answers of processes that exited before
    /// it (once their grace ends) and drops expired answers.
    pub fn after_drain(&mut self, exited: &[(u32, u64)]) {
        for &(tgid, _) in exited {
            self.domains.forget_process(tgid);
        }
        self.domains.purge_expired();
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{
        enrichment::dns::{Answer, DnsCacheConfig},
        identity::containers::Runtime,
    };

    fn key(tgid: u32, address: Ipv4Addr, port: u16) -> (TrafficKey, TrafficValue) {
        let mut key = TrafficKey {
            tgid,
            family: 2,
            protocol: 6,
            local_port: 40_000,
            remote_port: port.to_be(),
            ..TrafficKey::default()
        };
        key.remote_addr[..4].copy_from_slice(&address.octets());
        let mut value = TrafficValue {
            sock_type: 1,
            ..TrafficValue::default()
        };
        value.bytes[DIR_SENT] = 100;
        value.bytes[DIR_RECEIVED] = 2_000;
        (key, value)
    }

    fn file(ino: u64) -> ExeKey {
        ExeKey {
            dev: 1,
            ino,
            generation: 0,
        }
    }

    fn process(tgid: u32, container: Option<&str>) -> Process {
        Process {
            tgid,
            start_time_ns: 1,
            exe: file(2),
            path: Some("/usr/bin/curl".into()),
            comm: "curl".into(),
            uid: 0,
            ppid: 1,
            parent_exe: file(3),
            parent_path: Some("/bin/sh".into()),
            parent_comm: Some("sh".into()),
            command_line: Some("curl -s https://api.example.org".into()),
            parent_command_line: Some("sh -c run".into()),
            container: container.map(|id| ContainerRef {
                runtime: Runtime::Containerd,
                id: id.to_owned(),
                pod_uid: None,
            }),
        }
    }

    fn answer(name: &str, address: Ipv4Addr) -> Answer {
        Answer {
            name: name.into(),
            canonical: name.into(),
            addr: address.into(),
            ttl: 300,
        }
    }

    /// A sighting's context is what its flows would carry: the user's name
    /// and the container.
    #[test]
    fn a_sightings_context_is_its_user_and_container() {
        let mut enricher = Enricher::default();
        let (user, workload) = enricher.run_context(&process(7, Some("c0ffee")));
        assert_eq!(user.as_deref(), Some("root"));
        assert_eq!(workload.container_id.as_deref(), Some("c0ffee"));
        // No pods known (outside Kubernetes): no pod names.
        assert_eq!((workload.pod, workload.namespace), (None, None));
        let (_, workload) = enricher.run_context(&process(8, None));
        assert_eq!(workload, Workload::default());
    }

    #[test]
    fn a_flow_carries_its_program_peer_workload_and_bytes() {
        let mut enricher = Enricher {
            domains: DnsCache::new(DnsCacheConfig::default()),
            ..Enricher::default()
        };
        let peer = Ipv4Addr::new(198, 18, 0, 2);
        enricher
            .domains
            .record(7, None, &[answer("api.example.org", peer)]);
        let (key, value) = key(7, peer, 443);
        let sha256 = Sha256::from_digest(&[0xab; 32]);
        let parent_sha256 = Sha256::from_digest(&[0xcd; 32]);
        let mut value = value;
        value.local_addr[..4].copy_from_slice(&[198, 18, 0, 1]);
        let record = enricher.flow(
            &key,
            &value,
            "/usr/bin/curl".into(),
            Some(file(2)),
            Some(sha256.clone()),
            Some(&process(7, None)),
            Some(parent_sha256.clone()),
        );
        assert_eq!(
            record,
            FlowRecord {
                program: Program {
                    exe: "/usr/bin/curl".into(),
                    file: Some(file(2)),
                    sha256: Some(sha256),
                    parent: Some("/bin/sh".into()),
                    parent_sha256: Some(parent_sha256),
                    parent_name: Some("sh".into()),
                    command_line: Some("curl -s https://api.example.org".into()),
                    parent_command_line: Some("sh -c run".into()),
                    uid: Some(0),
                    user_name: Some("root".into()),
                    comm: Some("curl".into()),
                },
                peer: Peer {
                    transport: "tcp",
                    local_address: Some(Ipv4Addr::new(198, 18, 0, 1).into()),
                    local_port: Some(40_000),
                    remote_address: Some(peer.into()),
                    remote_port: Some(443),
                    domain: Some("api.example.org".into()),
                    country: None,
                    asn: None,
                },
                workload: Workload::default(),
                bytes: Bytes {
                    sent: 100,
                    received: 2_000,
                },
            }
        );
    }

    #[test]
    fn a_domain_is_only_ever_the_one_its_own_process_or_container_resolved() {
        let mut enricher = Enricher::default();
        let shared = Ipv4Addr::new(198, 18, 0, 9);
        let container = "c".repeat(64);
        enricher
            .domains
            .record(1, None, &[answer("alpha.test", shared)]);
        enricher
            .domains
            .record(2, Some(&container), &[answer("beta.test", shared)]);
        let domain = |enricher: &mut Enricher, tgid, container: Option<&str>| {
            let (key, value) = key(tgid, shared, 443);
            let process = process(tgid, container);
            enricher
                .flow(&key, &value, "/x".into(), None, None, Some(&process), None)
                .peer
                .domain
        };
        assert_eq!(
            domain(&mut enricher, 1, None).as_deref(),
            Some("alpha.test")
        );
        assert_eq!(
            domain(&mut enricher, 3, Some(&container)).as_deref(),
            Some("beta.test"),
            "another process of the same container"
        );
        assert_eq!(domain(&mut enricher, 4, None), None, "nobody else's name");
    }

    #[test]
    fn an_unannounced_process_still_has_its_bytes_and_peer() {
        let mut enricher = Enricher::default();
        let (key, value) = key(9, Ipv4Addr::new(198, 18, 0, 2), 5001);
        let record = enricher.flow(&key, &value, "[unknown]".into(), None, None, None, None);
        assert_eq!(record.program.uid, None);
        assert_eq!(record.program.user_name, None);
        assert_eq!(record.workload, Workload::default());
        assert_eq!(record.peer.remote_port, Some(5001));
        assert_eq!(record.bytes.received, 2_000);
    }
}
