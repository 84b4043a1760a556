//! The DHCPNAK watch: mozim ignores NAKs while renewing or rebinding, so a raw socket with a
//! BPF filter for UDP to port 68 catches them.

use super::*;

/// A DHCPNAK seen on a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nak {
    /// Option 54: the server that refused.
    pub server: Option<Ipv4Addr>,
    /// Option 56: its reason, if it gave one.
    pub message: Option<String>,
}

pub(super) const DHCP_CLIENT_PORT: u16 = 68;
pub(super) const DHCP_MAGIC: [u8; 4] = [99, 130, 83, 99];
pub(super) const DHCPNAK: u8 = 6;

/// Decodes an IPv4 packet (from its IP header on, as a packet socket of type SOCK_DGRAM
/// gives it): a DHCPNAK sent to the client port for hardware address `mac`, else `None`.
pub fn parse_nak(packet: &[u8], mac: &[u8]) -> Option<Nak> {
    let first = *packet.first()?;
    let ihl = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || ihl < 20 || packet.len() < ihl + 8 || packet[9] != 17 {
        return None;
    }
    // More fragments, or a fragment offset: DHCP replies are never fragmented in practice.
    if u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0 {
        return None;
    }
    let udp = &packet[ihl..];
    if u16::from_be_bytes([udp[2], udp[3]]) != DHCP_CLIENT_PORT {
        return None;
    }
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    let bootp = udp.get(8..udp_len.min(udp.len()))?;
    // BOOTREPLY, Ethernet, 6-byte hardware addresses, our chaddr, then the magic cookie.
    if bootp.len() < 240
        || bootp[..3] != [2, 1, 6]
        || mac.len() != 6
        || bootp[28..34] != *mac
        || bootp[236..240] != DHCP_MAGIC
    {
        return None;
    }
    let mut nak = Nak {
        server: None,
        message: None,
    };
    let mut kind = None;
    let mut options = &bootp[240..];
    while let Some((&code, rest)) = options.split_first() {
        match code {
            0 => {
                options = rest;
                continue;
            }
            255 => break,
            _ => {}
        }
        let (&len, rest) = rest.split_first()?;
        let value = rest.get(..usize::from(len))?;
        match (code, value) {
            (53, [t]) => kind = Some(*t),
            (54, [a, b, c, d]) => nak.server = Some(Ipv4Addr::new(*a, *b, *c, *d)),
            (56, text) => nak.message = Some(String::from_utf8_lossy(text).into_owned()),
            _ => {}
        }
        options = &rest[usize::from(len)..];
    }
    (kind == Some(DHCPNAK)).then_some(nak)
}

/// The classic BPF program a [`NakWatch`] runs in the kernel: unfragmented UDP to port 68
/// passes, everything else on the link stays out of user space. Offsets start at the IP
/// header (SOCK_DGRAM).
pub(super) fn nak_filter() -> [libc::sock_filter; 9] {
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    [
        op(0x30, 0, 0, 9),                           // ldb [9]: the IP protocol
        op(0x15, 0, 6, 17),                          // jeq #17 (UDP), else drop
        op(0x28, 0, 0, 6),                           // ldh [6]: flags and fragment offset
        op(0x45, 4, 0, 0x1fff),                      // jset #0x1fff: a later fragment, drop
        op(0xb1, 0, 0, 0),                           // ldxb 4*([0]&0xf): the IP header's length
        op(0x48, 0, 0, 2),                           // ldh [x+2]: the UDP destination port
        op(0x15, 0, 1, u32::from(DHCP_CLIENT_PORT)), // jeq #68, else drop
        op(0x06, 0, 0, 0xffff),                      // ret: the packet
        op(0x06, 0, 0, 0),                           // ret: nothing
    ]
}

/// A packet socket on one link that sees every DHCP reply (UDP to port 68, broadcast or
/// unicast) beside mozim's own sockets: mozim 0.3.4 drops a DHCPNAK to its renewal or
/// rebinding request and would keep a refused address until expiry.
pub(super) struct NakWatch {
    pub(super) fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl NakWatch {
    pub(super) fn open(index: u32) -> std::io::Result<NakWatch> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let os_error = std::io::Error::last_os_error;
        // Protocol 0: nothing is queued before the bind below picks the link and IPv4.
        // SAFETY: socket(2) with constant arguments; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            return Err(os_error());
        }
        // SAFETY: `raw` is a descriptor socket(2) just returned, owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let filter = nak_filter();
        let prog = libc::sock_fprog {
            len: filter.len() as libc::c_ushort,
            filter: filter.as_ptr().cast_mut(),
        };
        // SAFETY: `prog` and the `filter` it points to outlive the call, which copies them;
        // the length passed is `prog`'s size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                (&raw const prog).cast(),
                std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(os_error());
        }
        // SAFETY: sockaddr_ll is plain old data, for which all-zero bytes are a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as libc::c_ushort;
        addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        addr.sll_ifindex = index as libc::c_int;
        // SAFETY: `addr` is a valid, initialised sockaddr_ll and its exact size is passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(os_error());
        }
        // SAFETY: the OwnedFd stays open and is not replaced for as long as the AsyncFd owns it.
        let fd = unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(std::io::Error::from)?;
        Ok(NakWatch { fd })
    }

    pub(super) fn open_logged(name: &str, index: u32) -> Option<NakWatch> {
        match NakWatch::open(index) {
            Ok(w) => Some(w),
            Err(e) => {
                log::warn!(
                    "{name}: cannot watch for DHCPNAK: {e}; a refused lease lasts until it expires"
                );
                None
            }
        }
    }

    /// The next DHCPNAK for `mac`; never returns if the socket fails.
    pub(super) async fn next(&self, mac: &[u8]) -> Nak {
        use std::os::fd::AsRawFd;
        let mut buf = [0u8; 2048];
        loop {
            let Ok(mut ready) = self.fd.readable().await else {
                return std::future::pending().await;
            };
            let got = ready.try_io(|fd| {
                nix::sys::socket::recv(
                    fd.as_raw_fd(),
                    &mut buf,
                    nix::sys::socket::MsgFlags::empty(),
                )
                .map_err(std::io::Error::from)
            });
            match got {
                Ok(Ok(n)) => {
                    if let Some(nak) = buf.get(..n).and_then(|p| parse_nak(p, mac)) {
                        return nak;
                    }
                }
                Ok(Err(e)) => {
                    log::warn!("DHCPNAK watch: {e}");
                    return std::future::pending().await;
                }
                Err(_would_block) => {}
            }
        }
    }
}
