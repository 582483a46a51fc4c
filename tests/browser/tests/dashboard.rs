//! The dashboard end to end: `switchyard demo` serves the built dashboard (`dist/`) and its
//! stream; Debian's chromedriver drives a headless Chromium through it. The page loads live,
//! flows of every kind appear and animate, the packet composer shows the same outcomes as
//! `switchyard trace`, the stream reconnects after the agent restarts, and a screenshot of each
//! view is saved to `target/screenshots/`.
//!
//! Needs `dist/` (`trunk build --release`), the `switchyard` binary (`cargo build -p
//! switchyard-agent`), and `chromedriver` + `chromium` on PATH; `cargo xtask test` provides all three.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The newest `switchyard` binary the workspace built.
fn switchyard() -> Result<PathBuf> {
    let candidates = ["target/debug/switchyard", "target/release/switchyard"].map(|p| root().join(p));
    candidates
        .into_iter()
        .filter(|p| p.is_file())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .context("no switchyard binary: run `cargo build -p switchyard-agent` first")
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_demo(port: u16) -> Result<Proc> {
    let child = Command::new(switchyard()?)
        .args(["demo", "--listen", &format!("127.0.0.1:{port}"), "--ui-dir"])
        .arg(root().join("dist"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting switchyard demo")?;
    wait_for_port(port)?;
    Ok(Proc(child))
}

fn wait_for_port(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("nothing listens on port {port}")
}

async fn browser(driver_port: u16) -> Result<Client> {
    let caps = json!({
        "goog:chromeOptions": {
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1500,1150", "--hide-scrollbars", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync"]
        }
    });
    let caps = caps.as_object().cloned().unwrap_or_default();
    Ok(ClientBuilder::native().capabilities(caps).connect(&format!("http://127.0.0.1:{driver_port}")).await?)
}

async fn text(c: &Client, css: &str) -> Result<String> {
    Ok(c.find(Locator::Css(css)).await.with_context(|| format!("{css} not found"))?.text().await?)
}

async fn until<F, Fut>(what: &str, secs: u64, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if check().await.unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {secs} s waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn screenshot(c: &Client, name: &str) -> Result<()> {
    let dir = root().join("target/screenshots");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(format!("{name}.png")), c.screenshot().await?)?;
    Ok(())
}

async fn tab(c: &Client, view: &str) -> Result<()> {
    c.find(Locator::Css(&format!("[data-testid=tab-{view}]"))).await?.click().await?;
    tokio::time::sleep(Duration::from_millis(400)).await;
    Ok(())
}

/// What `switchyard trace --output json` says: (endpoint, probability) pairs, sorted.
fn cli_outcomes(args: &[&str]) -> Result<Vec<(String, String)>> {
    let out = Command::new(switchyard()?).args(["trace", "--demo", "--output", "json"]).args(args).output()?;
    if !out.status.success() {
        bail!("switchyard trace failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let mut o: Vec<(String, String)> = v["outcomes"]
        .as_array()
        .context("outcomes")?
        .iter()
        .map(|o| {
            let p = o["probability"].as_f64().unwrap_or(0.0) * 100.0;
            (o["endpoint"].as_str().unwrap_or_default().to_string(), format!("{p:.1}%"))
        })
        .collect();
    o.sort();
    Ok(o)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_end_to_end() -> Result<()> {
    // `cargo xtask test` sets SWITCHYARD_E2E=1 after building what this needs; a plain
    // `cargo test --workspace` on a machine without them skips instead of failing.
    let strict = std::env::var_os("SWITCHYARD_E2E").is_some();
    let missing = if !root().join("dist/index.html").is_file() {
        Some("dist/ (run `trunk build --release` at the workspace root)")
    } else if switchyard().is_err() {
        Some("the switchyard binary (cargo build -p switchyard-agent)")
    } else if Command::new("chromedriver").arg("--version").output().is_err() {
        Some("chromedriver (apt-get install chromium chromium-driver)")
    } else {
        None
    };
    if let Some(what) = missing {
        if strict {
            bail!("missing {what}");
        }
        eprintln!("skipped: missing {what}; `cargo xtask test` builds and installs everything");
        return Ok(());
    }
    let driver_port = free_port()?;
    let _driver = Proc(
        Command::new("chromedriver")
            .arg(format!("--port={driver_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromedriver (apt-get install chromium-driver)")?,
    );
    wait_for_port(driver_port)?;
    let port = free_port()?;
    let mut demo = start_demo(port)?;
    let client = browser(driver_port).await?;
    let c = &client;
    let url = format!("http://127.0.0.1:{port}/");

    // First meaningful paint: the app's header, measured by the page's own clock.
    c.goto(&url).await?;
    until("the app", 20, move || async move { Ok(c.find(Locator::Css("[data-testid=app]")).await.is_ok()) }).await?;
    let paint = c
        .execute(
            "const p = performance.getEntriesByType('paint').find(e => e.name === 'first-contentful-paint'); \
             const m = performance.getEntriesByName('switchyard-mounted')[0]; \
             return [p ? p.startTime : null, m ? m.startTime : null, performance.now()];",
            vec![],
        )
        .await?;
    println!(
        "first contentful paint: {} ms; the app mounted (wasm fetched, compiled, first render) at {} ms; page clock {} ms",
        paint[0], paint[1], paint[2]
    );
    let mounted = paint[1].as_f64().context("the page marks its mount")?;
    assert!(mounted < 1_000.0, "the app took {mounted} ms to mount");
    assert!(text(c, "[data-testid=mode]").await?.starts_with("live"), "the page streams from the agent");
    until("connected", 20, move || async move { Ok(text(c, "[data-testid=connection]").await? == "connected") })
        .await?;

    // The composer traces through the agent and agrees with the CLI. `switchyard trace --demo`
    // sees the demo's first state; the live scenario returns to it at the start of every
    // 60-second cycle (and is in it for its first 6 seconds), so trace until they match.
    tab(c, "composer").await?;
    let cli = cli_outcomes(&["--node", "node-3", "--from", "198.51.100.23", "--to", "192.168.1.13:30080"])?;
    let target = c.find(Locator::Css("[data-testid=composer-target]")).await?;
    let mut value = None;
    for o in target.find_all(Locator::Css("option")).await? {
        if o.text().await?.starts_with("default/nginx-svc:http on node-3") {
            value = o.attr("value").await?;
        }
    }
    target.select_by_value(&value.context("nginx's NodePort on node-3 is offered")?).await?;
    let mut shown = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(75);
    while shown != cli && Instant::now() < deadline {
        c.find(Locator::Css("[data-testid=composer-trace]")).await?.click().await?;
        tokio::time::sleep(Duration::from_millis(700)).await;
        shown.clear();
        for row in c.find_all(Locator::Css("[data-testid=composer-outcomes] tbody tr")).await? {
            let cells = row.find_all(Locator::Css("td")).await?;
            if cells.len() >= 4 {
                shown.push((cells[0].text().await?, cells[3].text().await?));
            }
        }
        shown.sort();
    }
    assert_eq!(shown, cli, "the composer and `switchyard trace` disagree");
    screenshot(c, "composer").await?;
    tab(c, "flows").await?;

    // Flows of every kind arrive; the list is newest first, so collect kinds as they pass.
    let mut kinds = std::collections::BTreeSet::new();
    let wanted = ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];
    let deadline = Instant::now() + Duration::from_secs(60);
    let all_seen = |kinds: &std::collections::BTreeSet<String>| {
        wanted.iter().all(|k| kinds.contains(*k)) && kinds.contains("hairpin")
    };
    while !all_seen(&kinds) && Instant::now() < deadline {
        for row in c.find_all(Locator::Css(".flow-row")).await? {
            if let Some(k) = row.attr("data-kind").await? {
                kinds.insert(k);
            }
        }
        // A pod that reaches itself through its Service is marked as such.
        if c.find(Locator::Css(".flow-row .k-hairpin")).await.is_ok() {
            kinds.insert("hairpin".to_string());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(all_seen(&kinds), "kinds seen: {kinds:?}");

    // Each kind animates: pick the newest flow of the kind and watch its steps advance.
    for kind in wanted {
        let rows = c.find_all(Locator::Css(&format!(".flow-row[data-kind={kind}]"))).await?;
        let Some(row) = rows.into_iter().next() else { continue };
        row.click().await?;
        let d = c.find(Locator::Css("[data-testid=diagram]")).await?;
        let first: usize = d.attr("data-step").await?.unwrap_or_default().parse().unwrap_or(0);
        until(&format!("{kind} to animate"), 15, move || async move {
            let d = c.find(Locator::Css("[data-testid=diagram]")).await?;
            Ok(d.attr("data-step").await?.unwrap_or_default().parse::<usize>().unwrap_or(0) > first)
        })
        .await?;
        screenshot(c, &format!("flows-{}", kind.to_lowercase())).await?;
        if kind == "NodePort" {
            // Stepped to the end: the whole picture, DNAT, masquerade and the reply's un-NAT.
            let steps: usize = c
                .find(Locator::Css("[data-testid=diagram]"))
                .await?
                .attr("data-steps")
                .await?
                .unwrap_or_default()
                .parse()
                .unwrap_or(0);
            for _ in 0..steps {
                c.find(Locator::Css("[data-testid=step-forward]")).await?.click().await?;
            }
            let svg = text(c, "svg.seq").await?;
            assert!(svg.contains("dnat to") && svg.contains("conntrack reverses"), "{svg}");
            c.execute("window.scrollTo(0, 0)", vec![]).await?;
            screenshot(c, "flows-nodeport-complete").await?;
        }
    }
    screenshot(c, "flows").await?;

    for view in ["cluster", "service", "events", "charts"] {
        tab(c, view).await?;
        screenshot(c, view).await?;
    }

    // The agent goes away: the banner says so; it comes back on the same port: the page resumes.
    tab(c, "flows").await?;
    drop(demo);
    until("the stream-down banner", 20, move || async move {
        Ok(c.find(Locator::Css("[data-testid=stream-down]")).await.is_ok())
    })
    .await?;
    screenshot(c, "stream-down").await?;
    demo = start_demo(port)?;
    until("reconnected", 40, move || async move { Ok(text(c, "[data-testid=connection]").await? == "connected") })
        .await?;
    assert!(c.find(Locator::Css("[data-testid=stream-down]")).await.is_err(), "the banner is gone");
    until("flows after the restart", 20, move || async move {
        Ok(!c.find_all(Locator::Css(".flow-row")).await?.is_empty())
    })
    .await?;

    // The wasm as the browser receives it: the agent gzips the dashboard in the background from
    // its start, so fetch it again until it comes compressed, then check the budget.
    let wasm = Arc::new(std::sync::Mutex::new((0.0, 0.0)));
    let seen = wasm.clone();
    until("the wasm served gzipped", 60, move || {
        let seen = seen.clone();
        async move {
            let sizes = c
                .execute_async(
                    "const done = arguments[arguments.length - 1]; \
                     const url = performance.getEntriesByType('resource').find(e => e.name.endsWith('.wasm')).name; \
                     performance.clearResourceTimings(); \
                     fetch(url, { cache: 'no-store' }).then(r => r.arrayBuffer()).then(() => { \
                       const e = performance.getEntriesByName(url).pop(); \
                       done([e.encodedBodySize, e.decodedBodySize]); });",
                    vec![],
                )
                .await?;
            let (encoded, decoded) = (sizes[0].as_f64().unwrap_or(0.0), sizes[1].as_f64().unwrap_or(0.0));
            *seen.lock().expect("not poisoned") = (encoded, decoded);
            Ok(encoded > 0.0 && encoded < decoded)
        }
    })
    .await?;
    let (encoded, decoded) = *wasm.lock().expect("not poisoned");
    println!("the wasm over the wire: {encoded} bytes gzipped ({decoded} bytes decoded)");
    assert!(encoded < 600_000.0, "the wasm travels as {encoded} bytes, over the 600 KB budget");
    drop(demo);
    client.close().await?;
    Ok(())
}
