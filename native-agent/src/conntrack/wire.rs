//! The ctnetlink wire format, parsed by hand: netlink headers, the nfnetlink `nfgenmsg`, and
//! the connection's attributes (`CTA_TUPLE_ORIG`/`CTA_TUPLE_REPLY` → `CTA_TUPLE_IP` and
//! `CTA_TUPLE_PROTO`, `CTA_ID`, `CTA_STATUS`). Pure and safe: bytes in, [`Message`]s out.
//!
//! Layout (`include/uapi/linux/netlink.h`, `netfilter/nfnetlink.h`, `nfnetlink_conntrack.h`):
//! netlink headers and attribute headers are in host byte order, attribute payloads in network
//! byte order; every message and attribute is padded to 4 bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// `NFNL_SUBSYS_CTNETLINK`: the high byte of a conntrack message's type.
const SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;

const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
/// Set on `IPCTNL_MSG_CT_NEW` for a connection's first event (the others are updates).
const NLM_F_CREATE: u16 = 0x400;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

/// `NLA_F_NESTED` and `NLA_F_NET_BYTEORDER` ride in the type's top bits.
const NLA_TYPE_MASK: u16 = 0x3fff;

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;

/// `NFNLGRP_CONNTRACK_NEW` and `NFNLGRP_CONNTRACK_DESTROY`, as bits of a `bind` group mask
/// (group `n` is bit `n - 1`).
pub const GROUPS_NEW_AND_DESTROY: u32 = (1 << (NFNLGRP_CONNTRACK_NEW - 1)) | (1 << (NFNLGRP_CONNTRACK_DESTROY - 1));
const NFNLGRP_CONNTRACK_NEW: u32 = 1;
const NFNLGRP_CONNTRACK_DESTROY: u32 = 3;

/// Bytes that are not the ctnetlink this parser reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("netlink message at byte {at}: length {len} does not fit the {left} bytes left")]
    BadLength { at: usize, len: usize, left: usize },
    #[error("conntrack message at byte {at}: {what}")]
    Malformed { at: usize, what: &'static str },
}

/// One end-to-end direction of a connection, as conntrack keys it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// The IP protocol number (6 TCP, 17 UDP, 132 SCTP, 1 ICMP, ...).
    pub proto: u8,
    /// 0 for protocols without ports.
    pub src_port: u16,
    pub dst_port: u16,
}

/// A connection as ctnetlink describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Conn {
    /// `CTA_ID`: the kernel's id of this entry, stable for its life.
    pub id: u32,
    /// The direction the first packet travelled, as sent.
    pub orig: Tuple,
    /// The direction replies travel, after NAT: its source is the real endpoint, its
    /// destination whom the endpoint answers.
    pub reply: Tuple,
    /// `CTA_STATUS`: the `IPS_*` bits.
    pub status: u32,
    /// `CTA_ZONE` (0 when absent).
    pub zone: u16,
}

/// What a conntrack message says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A new connection (`NFNLGRP_CONNTRACK_NEW`).
    New,
    /// A connection changed state (only seen when subscribed to updates).
    Update,
    /// The entry is gone (`NFNLGRP_CONNTRACK_DESTROY`).
    Destroy,
    /// One entry of a table dump.
    Dumped,
}

/// One netlink message, as far as the observer cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Conn(Event, Conn),
    /// The end of a dump.
    Done,
    /// `NLMSG_ERROR` with this errno (0 is an acknowledgement).
    Error(i32),
    /// Anything else (expectations, other subsystems, no-ops): skipped.
    Other,
}

/// Splits one datagram into its messages. A malformed message ends the datagram (its length
/// cannot be trusted to find the next one) and is returned as the last item.
pub fn parse(buf: &[u8]) -> Vec<Result<Message, WireError>> {
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() - at >= NLMSG_HDRLEN {
        let len = u32_ne(&buf[at..]) as usize;
        let left = buf.len() - at;
        if len < NLMSG_HDRLEN || len > left {
            out.push(Err(WireError::BadLength { at, len, left }));
            break;
        }
        let kind = u16_ne(&buf[at + 4..]);
        let flags = u16_ne(&buf[at + 6..]);
        out.push(message(kind, flags, &buf[at + NLMSG_HDRLEN..at + len], at));
        at += align(len).min(left);
    }
    out
}

fn message(kind: u16, flags: u16, body: &[u8], at: usize) -> Result<Message, WireError> {
    match kind {
        NLMSG_DONE => return Ok(Message::Done),
        NLMSG_ERROR => {
            let raw: [u8; 4] = body
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .ok_or(WireError::Malformed { at, what: "short error" })?;
            // The kernel sends a negative errno.
            return Ok(Message::Error(-i32::from_ne_bytes(raw)));
        }
        NLMSG_NOOP | NLMSG_OVERRUN => return Ok(Message::Other),
        _ => {}
    }
    if kind >> 8 != SUBSYS_CTNETLINK {
        return Ok(Message::Other);
    }
    let event = match kind & 0xff {
        IPCTNL_MSG_CT_NEW if flags & NLM_F_CREATE != 0 => Event::New,
        // Dump replies are `CT_NEW` without `NLM_F_CREATE`, like updates; the caller knows which
        // socket it read (see [`Event::Dumped`]).
        IPCTNL_MSG_CT_NEW => Event::Update,
        IPCTNL_MSG_CT_DELETE => Event::Destroy,
        _ => return Ok(Message::Other),
    };
    let attrs = body.get(NFGENMSG_LEN..).ok_or(WireError::Malformed { at, what: "no nfgenmsg" })?;
    conn(attrs, at).map(|c| Message::Conn(event, c))
}

fn conn(attrs: &[u8], at: usize) -> Result<Conn, WireError> {
    let (mut orig, mut reply, mut id, mut status, mut zone) = (None, None, None, 0, 0);
    for (kind, value) in Attrs::new(attrs, at) {
        match kind? {
            CTA_TUPLE_ORIG => orig = Some(tuple(value, at)?),
            CTA_TUPLE_REPLY => reply = Some(tuple(value, at)?),
            CTA_ID => id = Some(be32(value, at, "CTA_ID")?),
            CTA_STATUS => status = be32(value, at, "CTA_STATUS")?,
            CTA_ZONE => zone = be16(value, at, "CTA_ZONE")?,
            _ => {}
        }
    }
    Ok(Conn {
        id: id.ok_or(WireError::Malformed { at, what: "no CTA_ID" })?,
        orig: orig.ok_or(WireError::Malformed { at, what: "no CTA_TUPLE_ORIG" })?,
        reply: reply.ok_or(WireError::Malformed { at, what: "no CTA_TUPLE_REPLY" })?,
        status,
        zone,
    })
}

fn tuple(attrs: &[u8], at: usize) -> Result<Tuple, WireError> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, 0, 0);
    for (kind, value) in Attrs::new(attrs, at) {
        match kind? {
            CTA_TUPLE_IP => {
                for (k, v) in Attrs::new(value, at) {
                    match k? {
                        CTA_IP_V4_SRC => src = Some(v4(v, at)?),
                        CTA_IP_V4_DST => dst = Some(v4(v, at)?),
                        CTA_IP_V6_SRC => src = Some(v6(v, at)?),
                        CTA_IP_V6_DST => dst = Some(v6(v, at)?),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (k, v) in Attrs::new(value, at) {
                    match k? {
                        CTA_PROTO_NUM => proto = v.first().copied(),
                        CTA_PROTO_SRC_PORT => sport = be16(v, at, "CTA_PROTO_SRC_PORT")?,
                        CTA_PROTO_DST_PORT => dport = be16(v, at, "CTA_PROTO_DST_PORT")?,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(Tuple {
        src: src.ok_or(WireError::Malformed { at, what: "tuple without a source address" })?,
        dst: dst.ok_or(WireError::Malformed { at, what: "tuple without a destination address" })?,
        proto: proto.ok_or(WireError::Malformed { at, what: "tuple without CTA_PROTO_NUM" })?,
        src_port: sport,
        dst_port: dport,
    })
}

/// The `IPCTNL_MSG_CT_GET` dump request for every entry of the table (`AF_UNSPEC`: both families).
pub fn dump_request(seq: u32) -> Vec<u8> {
    let len = (NLMSG_HDRLEN + NFGENMSG_LEN) as u32;
    let mut b = Vec::with_capacity(len as usize);
    b.extend_from_slice(&len.to_ne_bytes());
    b.extend_from_slice(&((SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET).to_ne_bytes());
    b.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family, version (NFNETLINK_V0), res_id.
    b.extend_from_slice(&[0, 0, 0, 0]);
    b
}

/// The attributes of one nesting level: `(type, payload)`; a length that overruns ends it.
struct Attrs<'a> {
    buf: &'a [u8],
    pos: usize,
    at: usize,
    failed: bool,
}

impl<'a> Attrs<'a> {
    fn new(buf: &'a [u8], at: usize) -> Self {
        Attrs { buf, pos: 0, at, failed: false }
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = (Result<u16, WireError>, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.buf.len() - self.pos < 4 {
            return None;
        }
        let rest = &self.buf[self.pos..];
        let len = u16_ne(rest) as usize;
        if len < 4 || len > rest.len() {
            self.failed = true;
            return Some((Err(WireError::Malformed { at: self.at, what: "attribute length out of bounds" }), &[]));
        }
        let kind = u16_ne(&rest[2..]) & NLA_TYPE_MASK;
        self.pos += align(len).min(rest.len());
        Some((Ok(kind), &rest[4..len]))
    }
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// Callers have checked that two bytes are there.
fn u16_ne(b: &[u8]) -> u16 {
    u16::from_ne_bytes([b[0], b[1]])
}

/// Callers have checked that four bytes are there.
fn u32_ne(b: &[u8]) -> u32 {
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

fn be16(v: &[u8], at: usize, what: &'static str) -> Result<u16, WireError> {
    v.try_into().map(u16::from_be_bytes).map_err(|_| WireError::Malformed { at, what })
}

fn be32(v: &[u8], at: usize, what: &'static str) -> Result<u32, WireError> {
    v.try_into().map(u32::from_be_bytes).map_err(|_| WireError::Malformed { at, what })
}

fn v4(v: &[u8], at: usize) -> Result<IpAddr, WireError> {
    let o: [u8; 4] = v.try_into().map_err(|_| WireError::Malformed { at, what: "IPv4 address of the wrong size" })?;
    Ok(IpAddr::V4(Ipv4Addr::from(o)))
}

fn v6(v: &[u8], at: usize) -> Result<IpAddr, WireError> {
    let o: [u8; 16] = v.try_into().map_err(|_| WireError::Malformed { at, what: "IPv6 address of the wrong size" })?;
    Ok(IpAddr::V6(Ipv6Addr::from(o)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from a real kernel by `capture.rs`: a TCP connection to 10.96.0.1:80 DNATed to
    /// 10.0.0.1:8080 and SNATed to 10.0.0.2, one over IPv6 loopback, and an IGMP entry.
    const NEW: &[u8] = include_bytes!("fixtures/new.bin");
    /// The table dump that followed (three entries, then `NLMSG_DONE`).
    const DUMP: &[u8] = include_bytes!("fixtures/dump.bin");
    /// The destroy event of the NATed connection after `conntrack -D`.
    const DESTROY: &[u8] = include_bytes!("fixtures/destroy.bin");

    fn conns(buf: &[u8]) -> Vec<(Event, Conn)> {
        parse(buf)
            .into_iter()
            .filter_map(|m| match m.expect("parses") {
                Message::Conn(e, c) => Some((e, c)),
                _ => None,
            })
            .collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    /// The NATed connection: the reply tuple names the real endpoint and the SNAT address.
    #[test]
    fn new_events_carry_both_tuples() {
        let c = conns(NEW);
        assert_eq!(c.len(), 3);
        assert!(c.iter().all(|(e, _)| *e == Event::New));
        let (_, nat) = c[0];
        assert_eq!(nat.id, 3_815_345_644);
        assert_eq!(
            nat.orig,
            Tuple { src: ip("10.0.0.1"), dst: ip("10.96.0.1"), proto: 6, src_port: 50724, dst_port: 80 }
        );
        assert_eq!(
            nat.reply,
            Tuple { src: ip("10.0.0.1"), dst: ip("10.0.0.2"), proto: 6, src_port: 8080, dst_port: 50724 }
        );
        // IPS_SRC_NAT (bit 4) and IPS_DST_NAT (bit 5).
        assert_eq!(nat.status & 0x30, 0x30);
        assert_eq!((c[1].1.orig.src, c[1].1.orig.dst_port), (ip("::1"), 8081));
        assert_eq!((c[2].1.orig.proto, c[2].1.orig.src_port), (2, 0), "IGMP has no ports");
    }

    #[test]
    fn dump_replies_then_done_and_destroy_keeps_the_id() {
        let m = parse(DUMP);
        assert_eq!(m.last(), Some(&Ok(Message::Done)));
        let ids: Vec<u32> = conns(DUMP).iter().map(|(_, c)| c.id).collect();
        assert_eq!(ids, vec![998_569_027, 3_815_345_644, 1_344_577_963]);
        let d = conns(DESTROY);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].0, Event::Destroy);
        assert_eq!((d[0].1.id, d[0].1.orig), (conns(NEW)[0].1.id, conns(NEW)[0].1.orig));
    }

    /// Cut anywhere, a datagram yields the whole messages before the cut and at most one error.
    #[test]
    fn truncated_datagrams_never_panic() {
        let whole = conns(NEW).len();
        for cut in 0..NEW.len() {
            let m = parse(&NEW[..cut]);
            let errors = m.iter().filter(|r| r.is_err()).count();
            assert!(errors <= 1, "cut at {cut}: {m:?}");
            assert!(m.len() <= whole);
        }
    }

    #[test]
    fn bad_attribute_lengths_are_errors() {
        let mut b = NEW[..196].to_vec();
        // The first attribute (CTA_TUPLE_ORIG) claims more than the message holds.
        b[20] = 0xff;
        assert!(matches!(parse(&b).as_slice(), [Err(WireError::Malformed { at: 0, .. })]));
        let mut b = NEW[..196].to_vec();
        b[0] = 0xff;
        assert!(matches!(parse(&b).as_slice(), [Err(WireError::BadLength { len: 255, .. })]));
    }

    #[test]
    fn dump_request_is_a_ct_get_dump() {
        let r = dump_request(7);
        assert_eq!(r.len(), 20);
        assert_eq!(u32_ne(&r), 20);
        assert_eq!(u16_ne(&r[4..]), 0x0101, "IPCTNL_MSG_CT_GET of NFNL_SUBSYS_CTNETLINK");
        assert_eq!(u16_ne(&r[6..]), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(u32_ne(&r[8..]), 7);
        assert_eq!(&r[16..], &[0, 0, 0, 0], "AF_UNSPEC, NFNETLINK_V0");
    }
}
