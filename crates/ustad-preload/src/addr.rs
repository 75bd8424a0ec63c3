//! Addresses as the kernel spells them (the bytes of a `struct sockaddr_*`), and the rule that
//! decides whether a program binding one address must get the socket ustad holds on another.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// `AF_UNIX`.
pub(crate) const AF_UNIX: u16 = 1;
/// `AF_INET`.
pub(crate) const AF_INET: u16 = 2;
/// `AF_INET6`.
pub(crate) const AF_INET6: u16 = 10;
/// The size of `sun_path`.
pub(crate) const UNIX_PATH_MAX: usize = 108;
/// The size of `struct sockaddr_storage`: no address is longer.
pub(crate) const SOCKADDR_MAX: usize = 128;

/// A Unix socket's path or abstract name, stored inline (the library allocates nothing when it
/// looks at a `bind`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct UnixName {
    bytes: [u8; UNIX_PATH_MAX],
    len: usize,
}

impl UnixName {
    fn new(name: &[u8]) -> Option<UnixName> {
        let mut bytes = [0; UNIX_PATH_MAX];
        bytes.get_mut(..name.len())?.copy_from_slice(name);
        Some(UnixName {
            bytes,
            len: name.len(),
        })
    }

    /// The name, without a terminating NUL (an abstract name may contain NULs of its own).
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// The path as a NUL-terminated string, for `statx`: `None` for a path with a NUL in it.
    pub(crate) fn to_c_path(self) -> Option<[u8; UNIX_PATH_MAX + 1]> {
        let mut path = [0; UNIX_PATH_MAX + 1];
        if self.as_bytes().contains(&0) {
            return None;
        }
        path[..self.len].copy_from_slice(self.as_bytes());
        Some(path)
    }
}

impl std::fmt::Debug for UnixName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

/// An address a program binds, or that ustad's socket has.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Addr {
    /// TCP (or any IP protocol: the socket's type is checked separately).
    Ip(SocketAddr),
    /// A Unix socket file's path.
    UnixPath(UnixName),
    /// An abstract Unix socket's name (after its leading NUL).
    UnixAbstract(UnixName),
}

impl Addr {
    /// Reads a `struct sockaddr` of `bytes.len()` bytes. `None` for families ustad never
    /// holds, malformed addresses, and an unnamed Unix address (`bind` of an empty path
    /// asks for an automatic abstract name).
    pub(crate) fn parse(bytes: &[u8]) -> Option<Addr> {
        let family = u16::from_ne_bytes([*bytes.first()?, *bytes.get(1)?]);
        let u32_at = |at: usize| -> Option<u32> {
            Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
        };
        match family {
            AF_INET => {
                let port = u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?);
                let ip: [u8; 4] = bytes.get(4..8)?.try_into().ok()?;
                Some(Addr::Ip(SocketAddr::V4(SocketAddrV4::new(ip.into(), port))))
            }
            AF_INET6 => {
                // The kernel takes the 24 bytes of RFC 2133's sockaddr_in6, without scope id.
                let port = u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?);
                let flowinfo = u32::from_be(u32_at(4)?);
                let ip: [u8; 16] = bytes.get(8..24)?.try_into().ok()?;
                let scope = u32_at(24).unwrap_or(0);
                Some(Addr::Ip(SocketAddr::V6(SocketAddrV6::new(
                    ip.into(),
                    port,
                    flowinfo,
                    scope,
                ))))
            }
            AF_UNIX => {
                let path = bytes.get(2..)?;
                match path {
                    [] => None,
                    [0, name @ ..] => UnixName::new(name).map(Addr::UnixAbstract),
                    _ => {
                        let end = path.iter().position(|b| *b == 0).unwrap_or(path.len());
                        UnixName::new(&path[..end]).map(Addr::UnixPath)
                    }
                }
            }
            _ => None,
        }
    }
}

/// A Unix socket file, by identity (so that `./app.sock`, `/srv/app/app.sock` and a path
/// through a symlinked directory are one file): the device and inode `statx` reports.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct FileId {
    pub(crate) dev_major: u32,
    pub(crate) dev_minor: u32,
    pub(crate) ino: u64,
}

/// What a socket is bound to, in the terms two bindings are compared in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Target {
    /// An IP address and port.
    Ip(SocketAddr),
    /// A Unix socket file.
    UnixFile(FileId),
    /// An abstract Unix socket.
    UnixAbstract(UnixName),
}

/// How well a program's `requested` address names ustad's socket bound to `held`: `None`
/// when it does not, else a rank, higher for closer matches (when several of a pool's sockets
/// match, the program gets the closest).
///
/// For IP addresses the ports must be equal (port 0, "any free port", never matches), and then:
/// - the same address (an IPv4-mapped IPv6 address counts as its IPv4 address): rank 3;
/// - either is a wildcard (`0.0.0.0`, `::`): a program that binds every interface gets the
///   address ustad holds, and one that binds a single interface while ustad holds all of
///   them gets ustad's socket too (its own would collide with it);
/// - both are a `localhost` (`127.0.0.1` and `::1`), which programs resolve to either family.
///
/// Those rank 2 when the families are the same, 1 otherwise.
pub(crate) fn rank(held: &Target, requested: &Target) -> Option<u8> {
    match (held, requested) {
        (Target::Ip(held), Target::Ip(requested)) => rank_ip(*held, *requested),
        (Target::UnixFile(held), Target::UnixFile(requested)) => (held == requested).then_some(3),
        (Target::UnixAbstract(held), Target::UnixAbstract(requested)) => {
            (held == requested).then_some(3)
        }
        _ => None,
    }
}

fn rank_ip(held: SocketAddr, requested: SocketAddr) -> Option<u8> {
    if requested.port() == 0 || requested.port() != held.port() {
        return None;
    }
    let (h, r) = (held.ip().to_canonical(), requested.ip().to_canonical());
    if h == r {
        return Some(3);
    }
    let localhost = |ip: IpAddr| ip == Ipv4Addr::LOCALHOST || ip == Ipv6Addr::LOCALHOST;
    let related = h.is_unspecified() || r.is_unspecified() || (localhost(h) && localhost(r));
    if !related {
        return None;
    }
    Some(if held.is_ipv4() == requested.is_ipv4() {
        2
    } else {
        1
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> Target {
        Target::Ip(text.parse().unwrap())
    }

    fn sockaddr_in(ip: [u8; 4], port: u16) -> Vec<u8> {
        let mut bytes = AF_INET.to_ne_bytes().to_vec();
        bytes.extend(port.to_be_bytes());
        bytes.extend(ip);
        bytes.extend([0; 8]);
        bytes
    }

    #[test]
    fn sockaddrs_are_read_as_the_kernel_writes_them() {
        assert_eq!(
            Addr::parse(&sockaddr_in([127, 0, 0, 1], 3000)),
            Some(Addr::Ip("127.0.0.1:3000".parse().unwrap()))
        );
        let mut v6 = AF_INET6.to_ne_bytes().to_vec();
        v6.extend(8080u16.to_be_bytes());
        v6.extend([0; 4]);
        v6.extend(Ipv6Addr::LOCALHOST.octets());
        assert_eq!(
            Addr::parse(&v6),
            Some(Addr::Ip("[::1]:8080".parse().unwrap())),
            "24 bytes, without scope id"
        );
        v6.extend(0u32.to_ne_bytes());
        assert_eq!(
            Addr::parse(&v6),
            Some(Addr::Ip("[::1]:8080".parse().unwrap()))
        );
        assert_eq!(Addr::parse(&v6[..20]), None, "truncated");

        let mut unix = AF_UNIX.to_ne_bytes().to_vec();
        unix.extend(b"/run/app.sock\0\0\0");
        match Addr::parse(&unix) {
            Some(Addr::UnixPath(name)) => assert_eq!(name.as_bytes(), b"/run/app.sock"),
            other => panic!("{other:?}"),
        }
        let mut abstract_name = AF_UNIX.to_ne_bytes().to_vec();
        abstract_name.extend(b"\0app\0x");
        match Addr::parse(&abstract_name) {
            Some(Addr::UnixAbstract(name)) => assert_eq!(name.as_bytes(), b"app\0x"),
            other => panic!("{other:?}"),
        }
        assert_eq!(Addr::parse(&AF_UNIX.to_ne_bytes()), None, "autobind");
        let mut too_long = AF_UNIX.to_ne_bytes().to_vec();
        too_long.extend([b'a'; UNIX_PATH_MAX + 1]);
        assert_eq!(Addr::parse(&too_long), None);
        assert_eq!(Addr::parse(&[1]), None);
        assert_eq!(Addr::parse(&17u16.to_ne_bytes()), None, "AF_PACKET");
    }

    #[test]
    fn the_same_address_and_port_match_best() {
        assert_eq!(rank(&ip("127.0.0.1:3000"), &ip("127.0.0.1:3000")), Some(3));
        assert_eq!(rank(&ip("[::1]:3000"), &ip("[::1]:3000")), Some(3));
        assert_eq!(rank(&ip("127.0.0.1:3000"), &ip("127.0.0.1:3001")), None);
        assert_eq!(rank(&ip("10.0.0.1:3000"), &ip("10.0.0.2:3000")), None);
    }

    #[test]
    fn port_zero_is_never_ustads() {
        assert_eq!(rank(&ip("0.0.0.0:0"), &ip("0.0.0.0:0")), None);
        assert_eq!(rank(&ip("127.0.0.1:3000"), &ip("127.0.0.1:0")), None);
    }

    #[test]
    fn wildcards_match_every_address_on_the_port_either_way() {
        // Node's listen(3000) binds [::]:3000; ustad holds 127.0.0.1:3000.
        assert_eq!(rank(&ip("127.0.0.1:3000"), &ip("[::]:3000")), Some(1));
        assert_eq!(rank(&ip("127.0.0.1:3000"), &ip("0.0.0.0:3000")), Some(2));
        // ustad holds every interface; the program asks for one.
        assert_eq!(rank(&ip("0.0.0.0:3000"), &ip("127.0.0.1:3000")), Some(2));
        assert_eq!(rank(&ip("[::]:3000"), &ip("127.0.0.1:3000")), Some(1));
        assert_eq!(rank(&ip("[::]:3000"), &ip("[::]:3000")), Some(3));
        assert_eq!(rank(&ip("0.0.0.0:3000"), &ip("[::]:3000")), Some(1));
    }

    #[test]
    fn localhost_is_either_family() {
        assert_eq!(rank(&ip("127.0.0.1:3000"), &ip("[::1]:3000")), Some(1));
        assert_eq!(rank(&ip("[::1]:3000"), &ip("127.0.0.1:3000")), Some(1));
        // Another loopback address is a deliberate choice, not `localhost`.
        assert_eq!(rank(&ip("127.0.0.1:3000"), &ip("127.0.0.2:3000")), None);
    }

    #[test]
    fn ipv4_mapped_addresses_are_their_ipv4_address() {
        assert_eq!(
            rank(&ip("127.0.0.1:3000"), &ip("[::ffff:127.0.0.1]:3000")),
            Some(3)
        );
        assert_eq!(
            rank(&ip("[::ffff:10.1.2.3]:3000"), &ip("10.1.2.3:3000")),
            Some(3)
        );
        assert_eq!(
            rank(&ip("10.1.2.3:3000"), &ip("[::ffff:10.1.2.4]:3000")),
            None
        );
    }

    #[test]
    fn unix_sockets_match_by_file_or_abstract_name_only() {
        let file = |ino| {
            Target::UnixFile(FileId {
                dev_major: 0,
                dev_minor: 25,
                ino,
            })
        };
        assert_eq!(rank(&file(7), &file(7)), Some(3));
        assert_eq!(rank(&file(7), &file(8)), None);
        let name = |text: &[u8]| Target::UnixAbstract(UnixName::new(text).unwrap());
        assert_eq!(rank(&name(b"app"), &name(b"app")), Some(3));
        assert_eq!(rank(&name(b"app"), &name(b"app\0")), None);
        assert_eq!(rank(&name(b"app"), &ip("127.0.0.1:3000")), None);
        assert_eq!(rank(&file(7), &name(b"app")), None);
    }

    #[test]
    fn c_paths_are_terminated_and_never_contain_a_nul() {
        let name = UnixName::new(b"/run/a.sock").unwrap();
        let path = name.to_c_path().unwrap();
        assert_eq!(&path[..12], b"/run/a.sock\0");
        assert!(UnixName::new(b"a\0b").unwrap().to_c_path().is_none());
        let longest = UnixName::new(&[b'x'; UNIX_PATH_MAX]).unwrap();
        assert_eq!(longest.to_c_path().unwrap()[UNIX_PATH_MAX], 0);
    }
}
