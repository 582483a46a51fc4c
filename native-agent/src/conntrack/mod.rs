//! Real flows: conntrack's new and destroyed connections, read from netlink in the node's network
//! namespace, matched to the Service frontend they addressed, explained by the tracer against the
//! program the kernel holds, and published as [`FlowEvent`](switchyard_engine::protocol::FlowEvent)s.
//!
//! - [`wire`] parses ctnetlink messages (pure, tested on bytes captured from a real kernel);
//! - [`socket`] is the only code that touches the kernel ([`socket::Netlink`], faked in tests);
//! - [`flows`] is the state machine: events, dumps and programs in, flow events out;
//! - [`Observer`] runs them on a thread of its own (blocking netlink reads, tracing is CPU work)
//!   and hands each flow to a publish function.
//!
//! When the kernel drops events because the socket's buffer was full (`ENOBUFS`), the observer
//! re-reads the whole table (`IPCTNL_MSG_CT_GET` with `NLM_F_DUMP`) and reconciles, so a busy node
//! loses no connection that is still open, and learns of the ones that closed meanwhile.

pub mod flows;
pub mod socket;
pub mod wire;

#[cfg(test)]
mod capture;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use switchyard_engine::protocol::Event;

pub use flows::{Flows, FlowsConfig, Input, Output, Stats, View};
use socket::{Netlink, Received};

/// How long a receive waits before the loop looks at its stop flag and new programs.
const POLL: Duration = Duration::from_millis(100);

/// Why the observer could not start.
#[derive(Debug, thiserror::Error)]
pub enum ObserverError {
    #[error("cannot enter network namespace {netns}: {source}")]
    Netns {
        netns: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the conntrack netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("the conntrack observer's thread panicked")]
    Panicked,
}

/// Where the observer runs and how much it keeps.
#[derive(Debug, Clone)]
pub struct ObserverConfig {
    pub flows: FlowsConfig,
    /// Observe this network namespace (`/run/netns/<name>`) instead of the agent's own.
    pub netns: Option<String>,
    /// The event socket's receive buffer in bytes (the kernel's default when `None`).
    pub recv_buffer: Option<usize>,
}

/// Receives every flow event.
pub type Publish = Box<dyn Fn(Event) + Send>;
/// Receives what each batch added to the totals (for metrics).
pub type Count = Box<dyn Fn(&Stats) + Send>;

/// A running observer; stopped on drop.
pub struct Observer {
    views: mpsc::Sender<Arc<View>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Observer {
    /// Opens the sockets (in `cfg.netns`) and starts observing. Flows are matched once the first
    /// program arrives through [`Observer::update`]; the table is read then, so connections
    /// already open are reported too.
    pub fn spawn(cfg: ObserverConfig, publish: Publish, count: Count) -> Result<Observer, ObserverError> {
        let (views, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let (opened, open_result) = mpsc::sync_channel(1);
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("conntrack".into())
            .spawn(move || {
                let net = open(&cfg).and_then(|k| {
                    opened.send(Ok(())).map_err(|_| ObserverError::Panicked)?;
                    Ok(k)
                });
                let mut net = match net {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = opened.send(Err(e));
                        return;
                    }
                };
                let mut flows = Flows::new(cfg.flows);
                run(&mut net, &mut flows, &rx, &flag, &*publish, &*count);
            })
            .map_err(ObserverError::Socket)?;
        let started = open_result.recv().map_err(|_| ObserverError::Panicked)?;
        let observer = Observer { views, stop, thread: Some(thread) };
        started.map(|()| observer)
    }

    /// The kernel holds a new program: explain flows against it from now on.
    pub fn update(&self, view: Arc<View>) {
        let _ = self.views.send(view);
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn open(cfg: &ObserverConfig) -> Result<socket::Kernel, ObserverError> {
    if let Some(ns) = &cfg.netns {
        socket::enter_netns(ns).map_err(|source| ObserverError::Netns { netns: ns.clone(), source })?;
    }
    socket::Kernel::open(cfg.recv_buffer, POLL).map_err(ObserverError::Socket)
}

/// The observer's loop: reads events, dumps the table when asked, until `stop` is set.
pub fn run(
    net: &mut dyn Netlink,
    flows: &mut Flows,
    views: &mpsc::Receiver<Arc<View>>,
    stop: &AtomicBool,
    publish: &dyn Fn(Event),
    count: &dyn Fn(&Stats),
) {
    let origin = Instant::now();
    let mut reported = flows.stats;
    let mut said: Option<String> = None;
    while !stop.load(Ordering::Relaxed) {
        let mut inputs = Vec::new();
        inputs.extend(views.try_iter().map(Input::View));
        match net.recv() {
            Ok(Received::Events(events)) => inputs.extend(events.into_iter().map(|(e, c)| Input::Conntrack(e, c))),
            Ok(Received::Overflow) => inputs.push(Input::Overflow),
            Ok(Received::Idle) => inputs.push(Input::Tick),
            Err(e) => {
                eprintln!("switchyard: conntrack: {e}");
                std::thread::sleep(POLL);
            }
        }
        let mut queue: std::collections::VecDeque<Input> = inputs.into();
        while let Some(input) = queue.pop_front() {
            for out in flows.step(input, origin.elapsed()) {
                match out {
                    Output::Publish(e) => publish(Event::Flow(e)),
                    Output::Dump => match net.dump() {
                        Ok(table) => queue.push_back(Input::Table(table)),
                        Err(e) => {
                            eprintln!("switchyard: conntrack: cannot dump the table: {e}");
                            queue.push_back(Input::DumpFailed);
                        }
                    },
                }
            }
        }
        let now = flows.stats;
        // Said once per problem, not once per flow.
        if now.unexplained > reported.unexplained
            && let Some(e) = flows.trace_error()
            && said.as_deref() != Some(e)
        {
            eprintln!("switchyard: conntrack: flows cannot be explained: {e}");
            said = Some(e.to_string());
        }
        if now != reported {
            count(&delta(&now, &reported));
            reported = now;
        }
    }
}

fn delta(now: &Stats, before: &Stats) -> Stats {
    Stats {
        observed: now.observed - before.observed,
        matched: now.matched - before.matched,
        unexplained: now.unexplained - before.unexplained,
        overflows: now.overflows - before.overflows,
        resyncs: now.resyncs - before.resyncs,
        evicted: now.evicted - before.evicted,
        diagrams_dropped: now.diagrams_dropped - before.diagrams_dropped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use switchyard_engine::policy::{self, Backend};
    use switchyard_engine::protocol::FlowState;
    use wire::{Conn, Tuple};

    /// Plays a script of receives; the table dumps return `table`; sets `stop` when done.
    struct Fake {
        script: VecDeque<Received>,
        table: Vec<Conn>,
        dumps: usize,
        stop: Arc<AtomicBool>,
    }

    impl Netlink for Fake {
        fn recv(&mut self) -> std::io::Result<Received> {
            match self.script.pop_front() {
                Some(r) => Ok(r),
                None => {
                    self.stop.store(true, Ordering::Relaxed);
                    Ok(Received::Idle)
                }
            }
        }
        fn dump(&mut self) -> std::io::Result<Vec<Conn>> {
            self.dumps += 1;
            Ok(self.table.clone())
        }
    }

    /// A connection from a node-1 pod to nginx-svc's ClusterIP, answered by the pod at 10.244.2.20.
    fn conn(id: u32, cluster: &switchyard_engine::cluster::Cluster) -> Conn {
        let s = &cluster.services[&switchyard_engine::model::ObjectKey::new("default", "nginx-svc")];
        let t = |src: &str, sport, dst: std::net::IpAddr, dport| Tuple {
            src: src.parse().expect("ip"),
            dst,
            proto: 6,
            src_port: sport,
            dst_port: dport,
        };
        Conn {
            id,
            orig: t("10.244.1.200", 1000 + id as u16, s.cluster_ips[0], s.ports[0].port),
            reply: t("10.244.2.20", 8080, "10.244.1.200".parse().expect("ip"), 1000 + id as u16),
            status: 0,
            zone: 0,
        }
    }

    /// The loop reads the table when the first program arrives and again after an overflow;
    /// connections missed in the overflow are reported from the dump, ended ones as destroyed.
    #[test]
    fn the_loop_recovers_from_an_overflow_with_a_dump() {
        let cluster = switchyard_engine::demo::cluster();
        let plan = policy::plan(&cluster, "node-1", Backend::Nftables);
        let (a, b, c) = (conn(1, &cluster), conn(2, &cluster), conn(3, &cluster));
        let stop = Arc::new(AtomicBool::new(false));
        let mut net = Fake {
            script: VecDeque::from([Received::Idle, Received::Events(vec![(wire::Event::New, b)]), Received::Overflow]),
            table: vec![a],
            dumps: 0,
            stop: stop.clone(),
        };
        // The first dump (at the first program) finds `a`; by the overflow's dump, `b` has
        // ended and `c` is open: the fake's table is swapped when `b` has been seen.
        let (tx, rx) = mpsc::channel();
        tx.send(Arc::new(View { cluster: Arc::new(cluster), plan })).expect("send");
        let events = Mutex::new(Vec::new());
        let totals = Mutex::new(Stats::default());
        let publish = |e: Event| {
            if let Event::Flow(f) = e {
                events.lock().expect("lock").push((f.id, f.state));
            }
        };
        let count = |d: &Stats| {
            let mut t = totals.lock().expect("lock");
            t.overflows += d.overflows;
            t.resyncs += d.resyncs;
            t.matched += d.matched;
        };
        let mut flows = Flows::new(FlowsConfig { min_dump_interval: Duration::ZERO, ..FlowsConfig::new("node-1") });
        // Run in two legs so the table can change between the dumps.
        net.script.truncate(2);
        run(&mut net, &mut flows, &rx, &stop, &publish, &count);
        stop.store(false, Ordering::Relaxed);
        net.script = VecDeque::from([Received::Overflow]);
        net.table = vec![a, c];
        run(&mut net, &mut flows, &rx, &stop, &publish, &count);

        assert_eq!(net.dumps, 2);
        let got = events.lock().expect("lock").clone();
        assert_eq!(got, vec![(1, FlowState::New), (2, FlowState::New), (2, FlowState::Destroyed), (3, FlowState::New)]);
        let t = *totals.lock().expect("lock");
        assert_eq!((t.overflows, t.resyncs, t.matched), (1, 2, 3));
    }
}
