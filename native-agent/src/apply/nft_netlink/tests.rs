//! Encoding checked against the bytes `nft` 1.0.6 sent for the same elements (captured with
//! `strace -e trace=sendmsg -xx nft -f` in a namespace holding [`PROGRAM`]); parsing and the
//! per-transaction choice checked with fakes.

use super::*;
use crate::apply::nftables::Recording;

/// The declarations of the capture, in the renderer's layout.
const PROGRAM: &str = "\
table ip switchyard
delete table ip switchyard
table ip switchyard {
\tmap service-ips {
\t\ttype ipv4_addr . inet_proto . inet_service : verdict
\t}
\tmap endpoints-ips {
\t\ttypeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . tcp dport
\t}
\tset health-check-ports {
\t\ttype inet_service
\t}
\tset cluster-ips {
\t\ttype ipv4_addr
\t}
\tmap no-endpoint-nodeports {
\t\ttype inet_proto . inet_service : verdict
\t}
\tset firewall-allowed {
\t\ttypeof ip daddr . meta l4proto . th dport . ip saddr
\t\tflags interval
\t}
\tchain lb-ip-3 {
\t\tmeta l4proto tcp dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 3 map @endpoints-ips
\t}
}
table ip6 switchyard {
\tset hairpin {
\t\ttype ipv6_addr . ipv6_addr
\t}
\tmap endpoints-ips {
\t\ttypeof ip6 daddr . meta l4proto . th dport . numgen random mod 1 : ip6 daddr . tcp dport
\t}
}
";

/// The transaction `nft -f` was given.
const TRANSACTION: &str = r#"# switchyard (incremental)
add element ip switchyard service-ips { 10.96.0.10 . tcp . 80 comment "a/b:p clusterIP" : goto lb-ip-3 }
add element ip switchyard endpoints-ips { 10.96.0.10 . tcp . 80 . 3 : 10.244.1.14 . 8080, 10.96.0.10 . udp . 53 . 0 comment "a/b:dns pod-1" : 10.244.1.15 . 53 }
add element ip switchyard health-check-ports { 30000 }
add element ip switchyard no-endpoint-nodeports { sctp . 30001 : drop }
delete element ip switchyard cluster-ips { 10.0.0.1, 10.96.0.10 }
add element ip6 switchyard hairpin { fd00::1 . fd00::1 comment "x" }
add element ip6 switchyard endpoints-ips { fd00:96::a . tcp . 443 . 1 : fd00:244::e . 8443 }
"#;

/// nft's `NFTA_SET_ELEM_LIST_ELEMENTS` attribute of each message, header included (x86-64).
const NFT_ELEMENTS: [&str; 7] = [
    "500003804c00018014000180100001000a60000a06000000005000001c0002801800028008000100fffffffc0c0002006c622d69702d3300160006000010612f623a7020636c75737465724950000000",
    "700003802c00018018000180140001000a60000a060000000050000003000000100002800c0001000af4010e1f9000004000028018000180140001000a60000a110000000035000000000000100002800c0001000af4010f0035000014000600000e612f623a646e7320706f642d3100",
    "14000380100001800c0001800600010075300000",
    "2800038024000180100001800c0001008400000075310000100002800c0002800800010000000000",
    "24000380100001800c000180080001000a000001100002800c000180080001000a60000a",
    "38000380340001802800018024000100fd000000000000000000000000000001fd0000000000000000000000000000010800060000027800",
    "48000380440001802400018020000100fd00009600000000000000000000000a0600000001bb0000010000001c00028018000100fd00024400000000000000000000000e20fb0000",
];

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

fn decls() -> Declarations {
    let mut d = Declarations::default();
    d.learn(PROGRAM);
    d
}

/// (type, flags, seq, nfgenmsg, body after the nfgenmsg) of one message.
type Message<'a> = (u16, u16, u32, [u8; 4], &'a [u8]);

/// Every message in `bytes`.
fn messages(bytes: &[u8]) -> Vec<Message<'_>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len = u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("4")) as usize;
        let ty = u16::from_ne_bytes(bytes[at + 4..at + 6].try_into().expect("2"));
        let flags = u16::from_ne_bytes(bytes[at + 6..at + 8].try_into().expect("2"));
        let seq = u32::from_ne_bytes(bytes[at + 8..at + 12].try_into().expect("4"));
        let nfgen: [u8; 4] = bytes[at + 16..at + 20].try_into().expect("4");
        out.push((ty, flags, seq, nfgen, &bytes[at + 20..at + len]));
        at += len;
    }
    out
}

/// (type, payload) of the attributes of one level.
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        out.push((u16::from_ne_bytes([b[2], b[3]]), &b[4..len]));
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    out
}

/// Every element's key, data and comment encode byte for byte as nft encodes them, and each
/// message names our table and the set.
#[test]
fn elements_encode_as_nft_does() {
    let batch = plan(TRANSACTION, &decls()).expect("element-only");
    let enc = encode(&batch, 0);
    let msgs = messages(&enc.bytes);
    assert_eq!(msgs.len(), 9, "begin, seven statements, end");
    let sets = [
        ("ip", "service-ips"),
        ("ip", "endpoints-ips"),
        ("ip", "health-check-ports"),
        ("ip", "no-endpoint-nodeports"),
        ("ip", "cluster-ips"),
        ("ip6", "hairpin"),
        ("ip6", "endpoints-ips"),
    ];
    for (i, ((ty, flags, seq, nfgen, body), expected)) in msgs[1..8].iter().zip(NFT_ELEMENTS).enumerate() {
        let delete = i == 4;
        assert_eq!(*ty, if delete { 0x0a0e } else { 0x0a0c }, "message {i}");
        // nft reads errors without acks; this applier asks for an ack of each message.
        let nft_flags = if delete { NLM_F_REQUEST } else { NLM_F_REQUEST | NLM_F_CREATE };
        assert_eq!(*flags, nft_flags | NLM_F_ACK, "message {i}");
        assert_eq!(*seq, i as u32 + 1);
        let (fam, set) = sets[i];
        assert_eq!(nfgen, &[if fam == "ip" { 2 } else { 10 }, 0, 0, 0]);
        let a = attrs(body);
        // nft also sends NFTA_SET_ELEM_LIST_SET_ID (its cache's id), which the kernel reads only
        // for a set created in the same batch.
        assert_eq!(a[0], (NFTA_SET_ELEM_LIST_TABLE, &b"switchyard\0"[..]));
        assert_eq!(a[1], (NFTA_SET_ELEM_LIST_SET, format!("{set}\0").as_bytes()));
        assert_eq!(a.len(), 3);
        let start = body.len() - a[2].1.len() - 4;
        assert_eq!(&body[start..], hex(expected).as_slice(), "elements of message {i} ({set})");
    }
}

/// The delete message is nft's whole, but for the ack flag; the batch markers are nft's.
#[test]
fn whole_messages_match_nft() {
    let enc = encode(&plan(TRANSACTION, &decls()).expect("plans"), 0);
    let mut expected = hex("58000000 0e0a 0500 05000000 00000000 02000000 0f000100 73776974 63687961 72640000 10000200 636c7573 7465722d 69707300".replace(' ', "").as_str());
    expected.extend(hex(NFT_ELEMENTS[4]));
    let start: usize = messages(&enc.bytes)[..5].iter().map(|m| m.4.len() + 20).sum();
    assert_eq!(&enc.bytes[start..start + expected.len()], expected.as_slice());
    assert_eq!(&enc.bytes[..20], hex("14000000100001000000000000000000 0000000a".replace(' ', "").as_str()));
    let end = &enc.bytes[enc.bytes.len() - 20..];
    assert_eq!(end, hex("14000000110001000800000000000000 0000000a".replace(' ', "").as_str()));
    assert_eq!((enc.begin_seq, enc.end_seq), (0, 8));
}

/// What only nft can do goes to nft: other statements, interval sets, unknown sets and
/// families, elements that do not fit the type.
#[test]
fn only_exact_element_updates_are_planned() {
    let d = decls();
    let refused: [&str; 18] = [
        "add chain ip switchyard lb-ip-4\n",
        "flush chain ip switchyard lb-ip-3\n",
        "add element ip switchyard firewall-allowed { 10.0.0.1 . tcp . 80 . 10.1.0.0/16 }\n",
        "add element ip switchyard nosuch { 10.0.0.1 }\n",
        "add element inet switchyard cluster-ips { 10.0.0.1 }\n",
        "add element ip filter cluster-ips { 10.0.0.1 }\n",
        "add element ip switchyard cluster-ips { 10.0.0.0/8 }\n",
        "add element ip switchyard cluster-ips { fd00::1 }\n",
        "add element ip switchyard service-ips { 10.0.0.1 . tcp . 80 }\n",
        "add element ip switchyard service-ips { 10.0.0.1 . tcp . 80 : goto }\n",
        "add element ip switchyard service-ips { 10.0.0.1 . tcp . 80 : queue }\n",
        "add element ip switchyard health-check-ports { http }\n",
        "add element ip switchyard health-check-ports { 70000 }\n",
        "add element ip switchyard cluster-ips { 10.0.0.1 timeout 1s }\n",
        &format!("add element ip switchyard cluster-ips {{ 10.0.0.1 comment \"{}\" }}\n", "c".repeat(255)),
        "delete element ip switchyard service-ips { 10.0.0.1 . tcp . 80 : drop }\n",
        "add element ip switchyard cluster-ips { 10.0.0.1 }\ndelete table ip switchyard\n",
        "# nothing\n",
    ];
    for t in refused {
        assert!(plan(t, &d).is_err(), "planned: {t}");
    }
    let ok = "delete element ip switchyard service-ips { 10.0.0.1 . tcp . 80 }\n\
              add element ip switchyard service-ips { 10.0.0.1 . tcp . 80 comment \"x, y : z\" : jump lb-ip-3 }\n";
    let b = plan(ok, &d).expect("plans");
    assert_eq!(b.elements(), 2);
    assert_eq!(b.updates[1].elements[0].comment.as_deref(), Some("x, y : z"));
    assert_eq!(b.updates[1].elements[0].data, Some(ElementData::Verdict { code: -3, chain: Some("lb-ip-3".into()) }));
}

/// The rendered program's declarations are all learnt; interval sets are refused; a deleted
/// table is forgotten.
#[test]
fn declarations_follow_the_applied_program() {
    use switchyard_engine::policy::Backend;
    let program =
        switchyard_engine::render(&switchyard_engine::demo::cluster(), "node-1", Backend::Nftables).expect("renders");
    let mut d = Declarations::default();
    d.learn(&program);
    assert_eq!(d.sets.len(), 22, "every declared set of the ip family");
    assert_eq!(d.get("ip", "firewall-allowed"), Some(&None));
    assert_eq!(d.get("ip", "service-cidrs"), Some(&None));
    assert_eq!(
        d.get("ip", "endpoints-ips"),
        Some(&Some(SetType {
            key: vec![Field::Ipv4, Field::Proto, Field::Service, Field::Host32],
            data: Some(DataType::Value(vec![Field::Ipv4, Field::Service])),
        }))
    );
    assert_eq!(
        d.get("ip", "affinity"),
        Some(&Some(SetType {
            key: vec![Field::Ipv4, Field::Ipv4, Field::Proto, Field::Service],
            data: Some(DataType::Value(vec![Field::Ipv4, Field::Service])),
        }))
    );
    d.learn("delete table ip switchyard\n");
    assert!(d.sets.is_empty());
}

/// Every transaction the incremental renderer writes for endpoint changes (an endpoint
/// replaced, the count 10 → 11 → 10 while another service keeps the chain for 11) is planned
/// for netlink, verdict elements that point a service at another chain included; a change
/// that adds or deletes a chain goes to nft.
#[test]
fn endpoint_changes_are_element_only() {
    use std::collections::BTreeSet;
    use switchyard_engine::policy::{self, Backend};
    use switchyard_engine::synthetic;
    let mut base = synthetic::cluster(50, 10);
    // Another service with 11 endpoints keeps the chain for 11 in the program.
    let eleven = synthetic::slice(3, 11, 0);
    base.endpoint_slices.insert(eleven.key.clone(), eleven);
    let mut d = Declarations::default();
    let plan0 = policy::plan(&base, "node-a", Backend::Nftables);
    d.learn(&switchyard_engine::render::nftables::render(&plan0));
    let changed = |eps: u32, generation: u32| {
        let mut c = base.clone();
        let s = synthetic::slice(7, eps, generation);
        c.endpoint_slices.insert(s.key.clone(), s);
        c
    };
    let key = BTreeSet::from([synthetic::service(7).key]);
    let mut old = plan0;
    let mut netlink = 0;
    for (eps, generation) in [(10, 1), (10, 0), (11, 0), (10, 0), (1, 0), (10, 0)] {
        let new = policy::plan(&changed(eps, generation), "node-a", Backend::Nftables);
        let txn = switchyard_engine::render::nftables::render_incremental_for(&old, &new, Some(&key));
        assert!(!txn.is_empty());
        // A new endpoint count may need a new load-balancing chain: that one goes to nft.
        let chains = txn.lines().any(|l| l.contains(" chain "));
        match plan(&txn, &d) {
            Ok(b) => {
                assert!(!chains);
                assert!(b.elements() > 0);
                netlink += 1;
            }
            Err(e) => assert!(chains, "{e}: {txn}"),
        }
        old = new;
    }
    assert_eq!(netlink, 4, "10 → 1 adds a chain, 1 → 10 deletes it: nft");
}

/// A statement too long for one attribute is split over messages, each under 64 KB.
#[test]
fn long_statements_are_split() {
    let keys: Vec<String> = (0..5000u32).map(|i| Ipv4Addr::from(0x0a00_0000 + i).to_string()).collect();
    let t = format!("add element ip switchyard cluster-ips {{ {} }}\n", keys.join(", "));
    let enc = encode(&plan(&t, &decls()).expect("plans"), 100);
    let msgs = messages(&enc.bytes);
    assert!(msgs.len() > 3);
    assert_eq!(enc.messages.len(), msgs.len() - 2);
    let mut n = 0;
    for (_, _, _, _, body) in &msgs[1..msgs.len() - 1] {
        let a = attrs(body);
        assert!(a[2].1.len() < 65_000);
        n += attrs(a[2].1).len();
    }
    assert_eq!(n, 5000);
}

fn hybrid(fail: Option<fn() -> NetlinkError>) -> (Hybrid<Recording>, std::sync::Arc<std::sync::Mutex<Vec<Batch>>>) {
    let rec = RecordingSender { fail, ..RecordingSender::default() };
    let sent = rec.sent.clone();
    let h = Hybrid::new(Recording::default(), Box::new(move || Ok(Box::new(rec.clone()) as Box<dyn BatchSender>)));
    (h, sent)
}

/// The program goes to nft; element updates then go to netlink; anything else to nft again.
#[test]
fn each_transaction_takes_its_path() {
    let (mut h, sent) = hybrid(None);
    let paths = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let p2 = paths.clone();
    h.on_apply = Some(Box::new(move |p| p2.lock().expect("lock").push(p)));
    let elements = "add element ip switchyard cluster-ips { 10.0.0.1 }\n";
    h.apply(elements).expect("applies");
    h.apply(PROGRAM).expect("applies");
    h.apply(elements).expect("applies");
    h.apply("add chain ip switchyard x\n").expect("applies");
    assert_eq!(h.nft.applied, [elements, PROGRAM, "add chain ip switchyard x\n"], "before the program: nft");
    assert_eq!(sent.lock().expect("lock").len(), 1);
    assert_eq!(*paths.lock().expect("lock"), [Path::Nft, Path::Nft, Path::Netlink, Path::Nft]);
}

/// A refused batch is the sync's error (nft would refuse it too); a broken socket sends the
/// transaction through nft instead.
#[test]
fn refusal_fails_and_socket_failure_falls_back() {
    let elements = "add element ip switchyard cluster-ips { 10.0.0.1 }\n";
    let (mut h, _) =
        hybrid(Some(|| NetlinkError::Rejected { what: "add element".into(), source: io::Error::from_raw_os_error(2) }));
    h.apply(PROGRAM).expect("applies");
    let e = h.apply(elements).expect_err("refused");
    assert!(e.to_string().contains("No such file or directory"), "{e}");
    assert_eq!(h.nft.applied.len(), 1);

    let (mut h, _) = hybrid(Some(|| NetlinkError::Io(io::Error::other("gone"))));
    h.apply(PROGRAM).expect("applies");
    h.apply(elements).expect("applies through nft");
    assert_eq!(h.nft.applied, [PROGRAM, elements]);
    assert_eq!(h.last, Some(Path::Nft));
}

/// Without a socket every transaction goes through nft.
#[test]
fn unavailable_netlink_is_nft_only() {
    let mut h = Hybrid::new(Recording::default(), Box::new(|| Err(io::Error::other("no netlink"))));
    h.apply(PROGRAM).expect("applies");
    h.apply("add element ip switchyard cluster-ips { 10.0.0.1 }\n").expect("applies");
    assert_eq!(h.nft.applied.len(), 2);
}
