//! Load test of the event stream (bounded, loopback; a measurement, not a pass/fail test):
//! an agent process publishes RATE events/s for SECS seconds to CLIENTS WebSocket clients
//! (plus a few that never read), and the table says what each client received and how the
//! agent's memory moved.
//!
//!     cargo run --release -p switchyard-agent --example stream_load -- [CLIENTS] [RATE] [SECS] [SLOW]
//!
//! Defaults: 100 clients, 5,000 events/s, 30 s, 2 clients that never read. The events are the
//! demo scenario's flows (without their diagrams, as a busy node sends them), syncs and watch
//! events, replayed in a loop. The agent side runs in a child process (this same binary with
//! `--agent`) so that its RSS, read from /proc/self/status, is the hub's and the server's alone.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use switchyard_agent::server::{self, ServerConfig, Status};
use switchyard_agent::stream::{Hub, HubConfig};
use switchyard_engine::demo::scenario::Scenario;
use switchyard_engine::protocol::Event;
use tokio_tungstenite::tungstenite::Message;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--agent") {
        let rate: u64 = args.get(1).context("rate")?.parse()?;
        let secs: u64 = args.get(2).context("secs")?.parse()?;
        return agent(rate, secs);
    }
    let num = |i: usize, default: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (clients, rate, secs, slow) = (num(0, 100), num(1, 5_000), num(2, 30), num(3, 2));
    clients_side(clients as usize, rate, secs, slow as usize)
}

// ---------------------------------------------------------------------------------------------
// The agent side: hub, server, publisher

struct Quiet;

impl Status for Quiet {
    fn metrics(&self) -> String {
        String::new()
    }
    fn healthz(&self) -> (bool, String) {
        (true, "{}".into())
    }
}

/// Resident memory of this process in kB.
fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

/// CPU time (user + system) of this process so far, from /proc/self/stat.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here (state is not a number).
    let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
    ticks as f64 / 100.0
}

/// Events as a busy node publishes them: the demo's, flows without diagrams.
fn sample_events() -> Vec<Event> {
    let mut s = Scenario::new(7);
    let mut clock = || 0.0;
    let mut out: Vec<Event> = s
        .advance(120_000, &mut clock)
        .into_iter()
        .map(|(_, e)| match e {
            Event::Flow(mut f) => {
                f.diagram = None;
                Event::Flow(f)
            }
            e => e,
        })
        // A reset carries the whole cluster: real, but not what a steady stream is made of.
        .filter(|e| !matches!(e, Event::Watch(switchyard_engine::protocol::WatchEvent::Reset { .. })))
        .collect();
    out.truncate(2_000);
    out
}

fn agent(rate: u64, secs: u64) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let source = Scenario::source();
        // STREAM_LOAD_OWNER=task runs the hub's owner as a runtime task, for comparison.
        let owner_thread = std::env::var("STREAM_LOAD_OWNER").map_or(true, |v| v != "task");
        let hub = Hub::start(source, Default::default(), HubConfig { owner_thread, ..HubConfig::default() });
        let router = server::router(hub.clone(), Arc::new(Quiet), "node-1", ServerConfig::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("LISTEN {}", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, router).await });
        let events = sample_events();
        let bytes: usize = events.iter().map(|e| serde_json::to_string(e).map(|s| s.len()).unwrap_or(0)).sum();
        println!("EVENT_BYTES {}", bytes / events.len().max(1));
        // Wait for the clients.
        let mut line = String::new();
        let stdin = tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line).map(|_| line));
        stdin.await??;
        println!("RSS start {}", rss_kb());
        let start = Instant::now();
        let total = rate * secs;
        let mut sent = 0u64;
        let mut middle = false;
        let mut samples = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        while sent < total {
            tick.tick().await;
            // As many as the rate says by now: steady however late a tick is.
            let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            while sent < due.min(total) {
                hub.publish(events[(sent as usize) % events.len()].clone());
                sent += 1;
            }
            if !middle && start.elapsed() >= Duration::from_secs(secs / 2) {
                middle = true;
                println!("RSS middle {}", rss_kb());
            }
            if start.elapsed() >= Duration::from_secs(5 * (samples.len() as u64 + 1)) {
                samples.push(rss_kb());
            }
        }
        let took = start.elapsed();
        let numbered = hub.stats().last_seq.load(Ordering::Relaxed);
        // Let the hub and the writers drain before the last reading.
        tokio::time::sleep(Duration::from_secs(2)).await;
        println!("RSS end {}", rss_kb());
        let series: Vec<String> = samples.iter().map(|kb| format!("{:.1}", *kb as f64 / 1024.0)).collect();
        println!("SERIES {}", series.join(" "));
        println!("RESYNCS {}", hub.stats().resyncs.load(Ordering::Relaxed));
        println!("CPU {:.1}", cpu_seconds());
        println!("CONNECTED {}", hub.stats().clients.load(Ordering::Relaxed));
        println!("DONE {} {:.3} {numbered}", hub.stats().last_seq.load(Ordering::Relaxed), took.as_secs_f64());
        // Stay up until the clients say they are done.
        let mut line = String::new();
        let _ = tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line)).await;
        Ok::<_, anyhow::Error>(())
    })
}

// ---------------------------------------------------------------------------------------------
// The clients

/// What one client saw.
#[derive(Default)]
struct Seen {
    events: AtomicU64,
    last: AtomicU64,
    gaps: AtomicU64,
    snapshots: AtomicU64,
}

/// `"seq":N` from a message, without parsing the rest: the clients must keep up on a shared
/// machine.
fn seq_of(text: &str) -> Option<u64> {
    let at = text.find("\"seq\":")? + 6;
    let digits: String = text[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

async fn client(addr: SocketAddr, seen: Arc<Seen>) -> Result<()> {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/api/v1/events?since=0")).await?;
    while let Some(m) = ws.next().await {
        let Message::Text(t) = m? else { continue };
        let Some(seq) = seq_of(&t) else { continue };
        if t.starts_with("{\"type\":\"snapshot\"") {
            seen.snapshots.fetch_add(1, Ordering::Relaxed);
        } else {
            seen.events.fetch_add(1, Ordering::Relaxed);
            let last = seen.last.load(Ordering::Relaxed);
            if seq != last + 1 {
                seen.gaps.fetch_add(1, Ordering::Relaxed);
            }
        }
        seen.last.store(seq, Ordering::Relaxed);
    }
    Ok(())
}

fn clients_side(clients: usize, rate: u64, secs: u64, slow: usize) -> Result<()> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(["--agent", &rate.to_string(), &secs.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut read = |prefix: &str| -> Result<String> {
        for l in lines.by_ref() {
            let l = l?;
            if let Some(rest) = l.strip_prefix(prefix) {
                return Ok(rest.trim().to_string());
            }
        }
        bail!("the agent ended before {prefix}")
    };
    let addr: SocketAddr = read("LISTEN ")?.parse()?;
    let event_bytes = read("EVENT_BYTES ")?;

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let seen: Vec<Arc<Seen>> = (0..clients).map(|_| Arc::new(Seen::default())).collect();
    let mut slow_sockets = Vec::new();
    runtime.block_on(async {
        for s in &seen {
            let s = s.clone();
            tokio::spawn(async move {
                if let Err(e) = client(addr, s).await {
                    eprintln!("client: {e}");
                }
            });
        }
        // Clients that connect and never read a byte.
        for _ in 0..slow {
            let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/api/v1/events?since=0")).await?;
            slow_sockets.push(ws);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok::<_, anyhow::Error>(())
    })?;
    writeln!(stdin, "GO")?;
    let rss_start = read("RSS start ")?;
    let rss_middle = read("RSS middle ")?;
    let rss_end = read("RSS end ")?;
    let series = read("SERIES ")?;
    let resyncs = read("RESYNCS ")?;
    let cpu = read("CPU ")?;
    let connected = read("CONNECTED ")?;
    let done = read("DONE ")?;
    let mut parts = done.split_whitespace();
    let last: u64 = parts.next().context("last")?.parse()?;
    let took: f64 = parts.next().context("took")?.parse()?;
    let numbered: u64 = parts.next().context("numbered")?.parse()?;
    // Every client gets up to 10 s to read what is still in flight.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && seen.iter().any(|s| s.last.load(Ordering::Relaxed) < last) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = writeln!(stdin, "STOP");
    let received: Vec<u64> = seen.iter().map(|s| s.events.load(Ordering::Relaxed)).collect();
    let missing = seen
        .iter()
        .filter(|s| {
            s.last.load(Ordering::Relaxed) < last
                || s.gaps.load(Ordering::Relaxed) > 0
                || s.snapshots.load(Ordering::Relaxed) > 0
        })
        .count();
    let gaps: u64 = seen.iter().map(|s| s.gaps.load(Ordering::Relaxed)).sum();
    drop(slow_sockets);
    drop(runtime);
    let _ = child.wait();

    let mb = |kb: &str| kb.parse::<f64>().map(|k| format!("{:.1} MB", k / 1024.0)).unwrap_or_default();
    println!("| figure | value |");
    println!("|---|---|");
    println!("| clients reading / never reading | {clients} / {slow} |");
    println!(
        "| events published (target {rate}/s for {secs} s) | {last} in {took:.1} s ({:.0}/s) |",
        last as f64 / took
    );
    println!(
        "| of which numbered and sent by the hub when publishing ended | {numbered} (the rest within the next 2 s) |"
    );
    println!("| mean event size (JSON) | {event_bytes} B |");
    println!(
        "| events received per reading client, min / max | {} / {} |",
        received.iter().min().unwrap_or(&0),
        received.iter().max().unwrap_or(&0)
    );
    println!("| reading clients that missed an event (gap, snapshot, or short) | {missing} |");
    println!("| sequence gaps seen, all clients | {gaps} |");
    println!("| queue overflows resynchronised (slow clients included) | {resyncs} |");
    println!("| clients still connected when publishing ended (+2 s) | {connected} |");
    println!("| agent RSS start / middle / end | {} / {} / {} |", mb(&rss_start), mb(&rss_middle), mb(&rss_end));
    println!("| agent RSS every 5 s while publishing (MB) | {series} |");
    println!("| agent CPU time (hub, serialisation, {clients} writers) | {cpu} s over {took:.0} s |");
    Ok(())
}
