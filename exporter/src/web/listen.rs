//! The listening socket of `/metrics` and `/healthz`.
//!
//! `[::]` (the default) is one socket for both families: `IPV6_V6ONLY` is set
//! off on it explicitly, whatever `net.ipv6.bindv6only` says, so IPv4 clients
//! reach it as v4-mapped addresses and IPv6-only clusters can scrape it. On a
//! host without IPv6 sockets (booted with `ipv6.disable=1`, or under a policy
//! such as systemd's `RestrictAddressFamilies` without `AF_INET6`) creating it
//! fails with `EAFNOSUPPORT`; the agent then listens on `0.0.0.0` instead and
//! says so. Any other address is bound as given.

use std::{
    fmt, io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
};

use socket2::{Domain, Protocol, Socket, Type};

/// Pending connections the kernel queues (what std and tokio ask for).
const BACKLOG: i32 = 1024;

/// Which clients can reach the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Families {
    /// `[::]` with `IPV6_V6ONLY` off.
    Ipv4AndIpv6,
    /// `[::]` was asked for, but the host has no IPv6 sockets: `0.0.0.0`.
    Ipv4Only,
    /// The configured address, of one family.
    AsConfigured,
}

impl fmt::Display for Families {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ipv4AndIpv6 => "IPv4 and IPv6",
            Self::Ipv4Only => "IPv4 only (no IPv6 sockets on this host)",
            Self::AsConfigured => "the configured address only",
        })
    }
}

/// A bound, listening, non-blocking socket (for `tokio::net::TcpListener::from_std`).
#[derive(Debug)]
pub struct Listening {
    pub listener: TcpListener,
    /// Where it listens, as bound (the fallback address when IPv6 was unavailable).
    pub address: SocketAddr,
    pub families: Families,
}

/// Binding `address` failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address} (web.listen_address): {source}")]
pub struct ListenError {
    /// The address that failed (`0.0.0.0:port` when the IPv4 fallback failed).
    pub address: SocketAddr,
    pub source: io::Error,
}

/// Binds `address` as the module documentation says, logging the fallback.
pub fn bind(address: SocketAddr) -> Result<Listening, ListenError> {
    bind_with(address, open)
}

/// [`bind`] with the socket opener given (tests inject its errors).
fn bind_with(
    address: SocketAddr,
    open: impl Fn(SocketAddr) -> io::Result<TcpListener>,
) -> Result<Listening, ListenError> {
    // The address as bound: the port the kernel chose for port 0.
    let listening = |listener: TcpListener, address, families| Listening {
        address: listener.local_addr().unwrap_or(address),
        listener,
        families,
    };
    if address.ip() != Ipv6Addr::UNSPECIFIED {
        return open(address)
            .map(|l| listening(l, address, Families::AsConfigured))
            .map_err(|source| ListenError { address, source });
    }
    match open(address) {
        Ok(listener) => Ok(listening(listener, address, Families::Ipv4AndIpv6)),
        Err(error) if error.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            let fallback = SocketAddr::from((Ipv4Addr::UNSPECIFIED, address.port()));
            tracing::warn!(
                requested = %address,
                %fallback,
                %error,
                "this host has no IPv6 sockets (booted with ipv6.disable=1?): listening on IPv4 only"
            );
            open(fallback)
                .map(|l| listening(l, fallback, Families::Ipv4Only))
                .map_err(|source| ListenError {
                    address: fallback,
                    source,
                })
        }
        Err(source) => Err(ListenError { address, source }),
    }
}

/// A listening socket on `address`; an unspecified IPv6 address accepts IPv4 too.
fn open(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    if address.is_ipv6() && address.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    // As std and tokio do: a restarted agent rebinds while old connections
    // are in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::TcpStream,
        time::Duration,
    };

    use socket2::SockRef;

    use super::*;

    /// Connects to `port` on `ip` and checks the listener accepts it.
    fn reaches(listening: &Listening, ip: &str) -> bool {
        let target = SocketAddr::new(ip.parse().unwrap(), listening.address.port());
        let Ok(mut client) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
            return false;
        };
        client.write_all(b"x").unwrap();
        listening.listener.set_nonblocking(false).unwrap();
        let (mut server, _) = listening.listener.accept().unwrap();
        let mut byte = [0u8];
        server.read_exact(&mut byte).unwrap();
        listening.listener.set_nonblocking(true).unwrap();
        byte == *b"x"
    }

    fn unspecified_v6() -> SocketAddr {
        "[::]:0".parse().unwrap()
    }

    #[test]
    fn the_default_is_every_address_of_both_families() {
        let default = crate::web::WebConfig::default().listen_address().unwrap();
        assert_eq!(default, "[::]:9941".parse().unwrap());
    }

    /// With the sysctl default here (bindv6only=0) this holds even without
    /// the explicit option; tests/tests/listen_address.rs runs the agent where
    /// net.ipv6.bindv6only=1.
    #[test]
    fn unspecified_ipv6_accepts_both_families_with_v6only_off() {
        let listening = bind(unspecified_v6()).unwrap();
        assert_eq!(listening.families, Families::Ipv4AndIpv6);
        assert!(!SockRef::from(&listening.listener).only_v6().unwrap());
        assert!(reaches(&listening, "127.0.0.1"), "IPv4 client refused");
        assert!(reaches(&listening, "::1"), "IPv6 client refused");
    }

    #[test]
    fn without_ipv6_sockets_it_listens_on_ipv4() {
        let no_ipv6 = |address: SocketAddr| {
            if address.is_ipv6() {
                Err(io::Error::from_raw_os_error(libc::EAFNOSUPPORT))
            } else {
                open(address)
            }
        };
        let listening = bind_with(unspecified_v6(), no_ipv6).unwrap();
        assert_eq!(listening.families, Families::Ipv4Only);
        assert_eq!(listening.address.ip(), Ipv4Addr::UNSPECIFIED);
        assert_ne!(listening.address.port(), 0, "the address as bound");
        assert!(reaches(&listening, "127.0.0.1"));
    }

    #[test]
    fn other_errors_are_reported_not_worked_around() {
        let in_use = |_: SocketAddr| Err(io::Error::from_raw_os_error(libc::EADDRINUSE));
        let error = bind_with("[::]:9941".parse().unwrap(), in_use).unwrap_err();
        assert_eq!(error.address, "[::]:9941".parse().unwrap());
        assert_eq!(error.source.raw_os_error(), Some(libc::EADDRINUSE));
        assert!(
            error
                .to_string()
                .starts_with("cannot listen on [::]:9941 (web.listen_address): "),
            "{error}"
        );
    }

    #[test]
    fn a_failed_fallback_names_the_ipv4_address() {
        let nothing = |address: SocketAddr| {
            Err(io::Error::from_raw_os_error(if address.is_ipv6() {
                libc::EAFNOSUPPORT
            } else {
                libc::EADDRINUSE
            }))
        };
        let error = bind_with("[::]:9941".parse().unwrap(), nothing).unwrap_err();
        assert_eq!(error.address, "0.0.0.0:9941".parse().unwrap());
    }

    #[test]
    fn an_ipv4_address_is_bound_as_configured() {
        let listening = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(listening.families, Families::AsConfigured);
        assert!(reaches(&listening, "127.0.0.1"));
        assert!(!reaches(&listening, "::1"));
    }
}
