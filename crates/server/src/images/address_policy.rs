//! The SSRF guard's policy: which addresses an image URL may not reach (loopback, private,
//! link-local and every other non-public range), as a pure function tested on a table.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Says why an address must not be connected to (its class, for the error message), or `None`
/// for an address that may be.
pub(super) type Classifier = fn(IpAddr) -> Option<&'static str>;

/// Why `ip` must not be fetched from, as the class named in the error, or `None` for a
/// public address. Pure, so it is tested on a table rather than by connecting anywhere.
pub(super) fn blocked_address_class(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(ip) => blocked_v4_class(ip),
        IpAddr::V6(ip) => blocked_v6_class(ip),
    }
}

fn blocked_v4_class(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    if ip.is_loopback() {
        Some("loopback") // 127/8
    } else if ip.is_private() {
        Some("private") // 10/8, 172.16/12, 192.168/16
    } else if ip.is_link_local() {
        Some("link-local") // 169.254/16, including the cloud metadata address
    } else if a == 0 {
        Some("unspecified") // 0/8 "this network"; connecting to 0.0.0.0 reaches localhost
    } else if a == 100 && b & 0xc0 == 64 {
        Some("shared (CGNAT)") // 100.64/10
    } else if (a, b, c) == (192, 0, 0) {
        Some("IETF protocol assignment") // 192.0.0/24: NAT64 discovery, DS-Lite, ...
    } else if a == 198 && b & 0xfe == 18 {
        Some("benchmarking") // 198.18/15, lab networks
    } else if matches!((a, b, c), (192, 0, 2) | (198, 51, 100) | (203, 0, 113)) {
        Some("documentation") // TEST-NET-1, -2 and -3: never routed, so only ever local
    } else if ip.is_multicast() {
        Some("multicast") // 224/4
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else if a >= 240 {
        Some("reserved") // 240/4
    } else {
        None
    }
}

fn blocked_v6_class(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_loopback() {
        return Some("loopback");
    }
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    // Forms that carry an IPv4 address and reach it: IPv4-mapped ::ffff:a.b.c.d, the
    // deprecated IPv4-compatible ::a.b.c.d, NAT64's 64:ff9b::a.b.c.d, and 6to4's
    // 2002:aabb:ccdd::/48, which a 6to4 router delivers to a.b.c.d over IPv4. Each is as
    // allowed as the address it carries.
    let segments = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return blocked_v4_class(v4);
    }
    if segments[..6] == [0; 6] || segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return blocked_v4_class(Ipv4Addr::from_bits(ip.to_bits() as u32));
    }
    if segments[0] == 0x2002 {
        return blocked_v4_class(Ipv4Addr::from_bits((ip.to_bits() >> 80) as u32));
    }
    // Teredo (2001::/32) carries two IPv4 addresses (its server's, and the client's in
    // obfuscated bits) and is reached through whichever relay routes it: refused outright.
    if segments[..2] == [0x2001, 0] {
        return Some("Teredo");
    }
    if segments[..4] == [0x100, 0, 0, 0] {
        return Some("discard-only"); // 100::/64
    }
    if segments[..2] == [0x2001, 0xdb8] {
        return Some("documentation"); // 2001:db8::/32
    }
    if segments[..3] == [0x2001, 2, 0] {
        return Some("benchmarking"); // 2001:2::/48
    }
    match segments[0] {
        s if s & 0xfe00 == 0xfc00 => Some("private"), // fc00::/7 unique local
        s if s & 0xffc0 == 0xfe80 => Some("link-local"), // fe80::/10
        s if s & 0xffc0 == 0xfec0 => Some("private"), // fec0::/10, deprecated site-local
        s if s & 0xff00 == 0xff00 => Some("multicast"), // ff00::/8
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_classifier_table() {
        let blocked = [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("10.0.0.1", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local"),
            ("169.254.0.1", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("100.64.0.1", "shared (CGNAT)"),
            ("100.127.255.254", "shared (CGNAT)"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.250", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("240.0.0.1", "reserved"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("::ffff:169.254.169.254", "link-local"),
            ("::ffff:0.0.0.0", "unspecified"),
            ("::127.0.0.1", "loopback"),
            ("::10.0.0.1", "private"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("fc00::1", "private"),
            ("fd00::1", "private"),
            ("fec0::1", "private"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("ff02::1", "multicast"),
            ("192.0.0.1", "IETF protocol assignment"),
            ("192.0.0.255", "IETF protocol assignment"),
            ("198.18.0.1", "benchmarking"),
            ("198.19.255.255", "benchmarking"),
            ("192.0.2.1", "documentation"),
            ("198.51.100.7", "documentation"),
            ("203.0.113.255", "documentation"),
            ("::ffff:198.18.0.1", "benchmarking"),
            ("64:ff9b::c000:201", "documentation"),
            ("2002:7f00:1::", "loopback"),
            ("2002:a00:1::1", "private"),
            ("2002:a9fe:a9fe:1:2:3:4:5", "link-local"),
            ("2002:c000:0001::", "IETF protocol assignment"),
            ("2002::", "unspecified"),
            ("2001::1", "Teredo"),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
            ("2001:0:ffff:ffff:ffff:ffff:ffff:ffff", "Teredo"),
            ("100::1", "discard-only"),
            ("100::ffff:ffff:ffff:ffff", "discard-only"),
            ("2001:db8::1", "documentation"),
            ("2001:db8:ffff:ffff::1", "documentation"),
            ("2001:2::1", "benchmarking"),
        ];
        for (ip, class) in blocked {
            let parsed: IpAddr = ip.parse().unwrap();
            assert_eq!(blocked_address_class(parsed), Some(class), "{ip}");
        }
        let allowed = [
            "8.8.8.8",
            "1.1.1.1",
            "172.15.255.255",
            "172.32.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "169.253.255.255",
            "223.255.255.255",
            "2606:4700::1111",
            "2001:4860:4860::8888",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "fe00::1",
            "192.0.1.255",
            "192.0.3.0",
            "198.17.255.255",
            "198.20.0.0",
            "198.51.99.255",
            "198.51.101.0",
            "203.0.112.255",
            "203.0.114.0",
            // 6to4 of 8.8.8.8: a public host behind a public IPv4 address.
            "2002:808:808::1",
            "2001:1::1",
            "2001:3::1",
            "100:0:0:1::1",
            "2001:db9::1",
            "2001:db7:ffff::1",
        ];
        for ip in allowed {
            let parsed: IpAddr = ip.parse().unwrap();
            assert_eq!(blocked_address_class(parsed), None, "{ip}");
        }
    }
}
