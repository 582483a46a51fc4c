//! Captures the fixtures of the wire tests from a real kernel, once: run as root with
//! `SWITCHYARD_CAPTURE=1 cargo test -p switchyard-agent capture -- --ignored`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use rustix::net::netlink::{self, SocketAddrNetlink};
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType, sockopt};

use super::wire;

fn sh(cmd: &str) {
    let ok = Command::new("sh").args(["-c", cmd]).status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "{cmd}");
}

fn recv_all(fd: &impl AsFd) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let mut buf = vec![0u8; 65536];
        match rustix::net::recv(fd, &mut buf[..], RecvFlags::empty()) {
            Ok((n, _)) => out.push(buf[..n].to_vec()),
            Err(_) => return out,
        }
    }
}

#[test]
#[ignore = "writes fixtures; root only"]
fn capture() {
    if std::env::var_os("SWITCHYARD_CAPTURE").is_none() {
        return;
    }
    let ns = format!("sy-capture-{}", std::process::id());
    sh(&format!("ip netns add {ns}"));
    let r = std::panic::catch_unwind(|| {
        let x = |c: &str| sh(&format!("ip netns exec {ns} {c}"));
        x("ip link set lo up");
        x("ip link add d0 type bridge");
        x("ip addr add 10.0.0.1/24 dev d0");
        x("ip addr add 10.0.0.2/24 dev d0");
        x("ip link set d0 up");
        x("ip route add 10.96.0.0/16 dev d0");
        x("nft add table ip t");
        x("nft add table ip6 t6");
        // A conntrack expression makes the namespace track IPv6 at all.
        x("nft 'add chain ip6 t6 out { type filter hook output priority 0 ; }'");
        x("nft add rule ip6 t6 out ct state new counter");
        x("nft 'add chain ip t out { type nat hook output priority -100 ; }'");
        x("nft 'add chain ip t post { type nat hook postrouting priority 100 ; }'");
        x("nft add rule ip t out ip daddr 10.96.0.1 tcp dport 80 dnat to 10.0.0.1:8080");
        x("nft add rule ip t post ip daddr 10.0.0.1 tcp dport 8080 snat to 10.0.0.2");
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/conntrack/fixtures");
        let ns2 = ns.clone();
        std::thread::spawn(move || {
            super::socket::enter_netns(&ns2).expect("setns");
            let ev = rustix::net::socket(AddressFamily::NETLINK, SocketType::RAW, Some(netlink::NETFILTER)).expect("s");
            rustix::net::bind(&ev, &SocketAddrNetlink::new(0, wire::GROUPS_NEW_AND_DESTROY)).expect("bind");
            sockopt::set_socket_timeout(&ev, sockopt::Timeout::Recv, Some(Duration::from_millis(300))).expect("t");
            let l4 = TcpListener::bind("10.0.0.1:8080").expect("listen");
            let l6 = TcpListener::bind("[::1]:8081").expect("listen6");
            let mut c = TcpStream::connect("10.96.0.1:80").expect("connect");
            let (mut s, _) = l4.accept().expect("accept");
            s.write_all(b"x").expect("w");
            let mut b = [0u8; 1];
            c.read_exact(&mut b).expect("r");
            let _c6 = TcpStream::connect("[::1]:8081").expect("connect6");
            let _s6 = l6.accept().expect("accept6");
            let new = recv_all(&ev);
            // The dump before anything is deleted holds both.
            let d = rustix::net::socket(AddressFamily::NETLINK, SocketType::RAW, Some(netlink::NETFILTER)).expect("s");
            rustix::net::bind(&d, &SocketAddrNetlink::new(0, 0)).expect("bind");
            sockopt::set_socket_timeout(&d, sockopt::Timeout::Recv, Some(Duration::from_millis(300))).expect("t");
            rustix::net::send(&d, &wire::dump_request(7), SendFlags::empty()).expect("send");
            let dump = recv_all(&d);
            Command::new("conntrack").args(["-D", "-p", "tcp", "--orig-dst", "10.96.0.1"]).output().expect("conntrack");
            let destroy = recv_all(&ev);
            // Datagrams back to back still parse as a sequence of netlink messages.
            let write = |name: &str, parts: &[Vec<u8>]| {
                std::fs::write(dir.join(format!("{name}.bin")), parts.concat()).expect("write");
            };
            write("new", &new);
            write("dump", &dump);
            write("destroy", &destroy);
        })
        .join()
        .expect("capture thread");
    });
    sh(&format!("ip netns delete {ns}"));
    r.expect("captured");
}
