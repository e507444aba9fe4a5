//! Address policy, shared by every part that connects somewhere on a
//! producer's or an agent's behalf (git remotes, the egress proxy): which
//! addresses are this machine, a private network or a cloud metadata
//! service. Pure functions; no I/O.

use std::net::IpAddr;

/// Loopback, private, link-local (the cloud metadata service lives at
/// 169.254.169.254), CGNAT, unspecified, broadcast and the IPv6
/// equivalents, IPv4-mapped addresses included.
pub fn is_local_addr(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => {
            let [a, b, c, _] = ip.octets();
            ip.is_loopback()
                || ip.is_private()
                || ip.is_link_local()
                || ip.is_unspecified()
                || ip.is_broadcast()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && c == 0)
                || (a == 198 && (b == 18 || b == 19))
                || a >= 240
        }
        IpAddr::V6(ip) => {
            if let Some(v4) = ip.to_ipv4_mapped() {
                return is_local_addr(IpAddr::V4(v4));
            }
            let seg = ip.segments();
            let first = seg[0];
            // 6to4 (2002:aabb:ccdd::/48) carries an IPv4 address.
            if first == 0x2002 {
                let v4 = std::net::Ipv4Addr::new(
                    (seg[1] >> 8) as u8,
                    seg[1] as u8,
                    (seg[2] >> 8) as u8,
                    seg[2] as u8,
                );
                return is_local_addr(IpAddr::V4(v4));
            }
            ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_multicast()
                || (first & 0xfe00) == 0xfc00
                // Link-local fe80::/10 and the old site-local fec0::/10.
                || (first & 0xff80) == 0xfe80
                // IPv4-compatible (::a.b.c.d) and NAT64 forms of an IPv4 address.
                || (seg[..6].iter().all(|s| *s == 0))
                || (first == 0x64 && seg[1] == 0xff9b)
                // Teredo tunnels (2001:0::/32) reach whatever they wrap.
                || (first == 0x2001 && seg[1] == 0)
        }
    }
}

/// `localhost`, a name under `.localhost`, or a literal local address.
pub fn is_local_host(host: &str) -> bool {
    let bare = host.trim_matches(|c| c == '[' || c == ']');
    let name = bare.trim_end_matches('.');
    if name.eq_ignore_ascii_case("localhost") || name.to_ascii_lowercase().ends_with(".localhost") {
        return true;
    }
    bare.parse::<IpAddr>().is_ok_and(is_local_addr)
}
