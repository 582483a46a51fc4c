//! The observer's only contact with the kernel: two `NETLINK_NETFILTER` sockets, one subscribed
//! to conntrack's new and destroy events, one for table dumps (kept apart so a dump's replies
//! never interleave with events). [`Netlink`] is the seam tests replace with a fake.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use rustix::io::Errno;
use rustix::net::netlink::{self, SocketAddrNetlink};
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType, sockopt};

use super::wire::{self, Conn, Event, Message};

/// What one receive brought.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// Connection events, in the order the kernel sent them.
    Events(Vec<(Event, Conn)>),
    /// The kernel dropped events because the socket's buffer was full (`ENOBUFS`): what the
    /// observer holds may be wrong until it re-reads the table.
    Overflow,
    /// Nothing arrived within the receive timeout.
    Idle,
}

/// Conntrack events and dumps.
pub trait Netlink: Send {
    fn recv(&mut self) -> io::Result<Received>;
    /// Every entry of the table now.
    fn dump(&mut self) -> io::Result<Vec<Conn>>;
}

/// The real sockets, opened in the calling thread's network namespace.
pub struct Kernel {
    events: OwnedFd,
    dumper: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
    /// Messages the parser refused (logged once each, counted).
    pub malformed: u64,
}

/// Large enough for the biggest datagram ctnetlink sends (a dump batch is one page or two).
const BUF: usize = 64 * 1024;

impl Kernel {
    /// Subscribes to new and destroy events. `recv_buffer` sets the receive buffer (bytes;
    /// `SO_RCVBUFFORCE`, which root may raise past `rmem_max`); `timeout` bounds each receive so
    /// the caller can look at its stop flag.
    pub fn open(recv_buffer: Option<usize>, timeout: Duration) -> io::Result<Kernel> {
        let events = socket()?;
        if let Some(size) = recv_buffer {
            sockopt::set_socket_recv_buffer_size_force(&events, size)
                .or_else(|_| sockopt::set_socket_recv_buffer_size(&events, size))?;
        }
        rustix::net::bind(&events, &SocketAddrNetlink::new(0, wire::GROUPS_NEW_AND_DESTROY))?;
        sockopt::set_socket_timeout(&events, sockopt::Timeout::Recv, Some(timeout))?;
        let dumper = socket()?;
        rustix::net::bind(&dumper, &SocketAddrNetlink::new(0, 0))?;
        sockopt::set_socket_timeout(&dumper, sockopt::Timeout::Recv, Some(Duration::from_secs(5)))?;
        Ok(Kernel { events, dumper, seq: 0, buf: vec![0; BUF], malformed: 0 })
    }

    fn conns(&mut self, n: usize, as_dump: bool, out: &mut Vec<(Event, Conn)>) -> bool {
        let mut done = false;
        for m in wire::parse(&self.buf[..n]) {
            match m {
                Ok(Message::Conn(e, c)) => out.push((if as_dump { Event::Dumped } else { e }, c)),
                Ok(Message::Done) => done = true,
                Ok(Message::Error(_) | Message::Other) => {}
                Err(e) => {
                    if self.malformed == 0 {
                        eprintln!("switchyard: conntrack: {e}");
                    }
                    self.malformed += 1;
                }
            }
        }
        done
    }
}

impl Kernel {
    /// Empties the event queue after an overflow. The kernel reports `ENOBUFS` once per
    /// congestion and clears the congestion only when the queue is empty: events dropped before
    /// that would go unreported, and a dump taken before it could miss them. Once drained, the
    /// dump that follows covers everything dropped so far and any later drop is reported again.
    /// What is read here is dropped too (the dump has it).
    fn drain_events(&mut self) {
        drain(&self.events, &mut self.buf);
    }
}

/// Reads and drops whatever is queued on `fd`; bounded, so a flood cannot keep the caller here.
fn drain(fd: &OwnedFd, buf: &mut [u8]) {
    for _ in 0..65_536 {
        match rustix::net::recv(fd.as_fd(), &mut buf[..], RecvFlags::DONTWAIT) {
            Ok((0, _)) => break,
            Ok(_) | Err(Errno::NOBUFS) => {}
            Err(_) => break,
        }
    }
}

fn socket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket(AddressFamily::NETLINK, SocketType::RAW, Some(netlink::NETFILTER))?)
}

impl Netlink for Kernel {
    fn recv(&mut self) -> io::Result<Received> {
        match rustix::net::recv(self.events.as_fd(), &mut self.buf[..], RecvFlags::empty()) {
            Ok((n, _)) => {
                let mut out = Vec::new();
                self.conns(n, false, &mut out);
                Ok(Received::Events(out))
            }
            Err(Errno::NOBUFS) => {
                self.drain_events();
                Ok(Received::Overflow)
            }
            Err(Errno::AGAIN | Errno::INTR) => Ok(Received::Idle),
            Err(e) => Err(e.into()),
        }
    }

    fn dump(&mut self) -> io::Result<Vec<Conn>> {
        // What a dump that timed out left behind (its `NLMSG_DONE` would end this one early).
        drain(&self.dumper, &mut self.buf);
        self.seq = self.seq.wrapping_add(1);
        rustix::net::send(&self.dumper, &wire::dump_request(self.seq), SendFlags::empty())?;
        let mut out = Vec::new();
        loop {
            let (n, _) = rustix::net::recv(self.dumper.as_fd(), &mut self.buf[..], RecvFlags::empty())?;
            if n == 0 || self.conns(n, true, &mut out) {
                break;
            }
        }
        Ok(out.into_iter().map(|(_, c)| c).collect())
    }
}

/// Moves the calling thread into the network namespace `/run/netns/<name>` (the thread's
/// sockets are opened there and stay there).
pub fn enter_netns(name: &str) -> io::Result<()> {
    let file = std::fs::File::open(Path::new("/run/netns").join(name))?;
    rustix::thread::move_into_link_name_space(file.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))?;
    Ok(())
}
