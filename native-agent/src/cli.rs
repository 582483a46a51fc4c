//! The `switchyard` command line: `render`, `trace`, `ipvs list`, `agent` and `demo`, exactly as the project's CONTRACT.md
//! describes them.
//!
//! Parsing is clap's (bad values and unknown backends exit 2 with clap's message); running is
//! [`run`], which writes to the writers it is given so tests can capture both streams. Exit
//! status: 0 for any verdict, 2 for bad input ([`Error::exit_code`]).

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use switchyard_engine::cluster::Cluster;
use switchyard_engine::model::{IpFamily, Protocol};
use switchyard_engine::policy::Backend;
use switchyard_engine::trace::{SocketAddr, Trace, Verdict};
use switchyard_engine::{Destination, TraceRequest, dns};

use crate::load::{self, LoadError};

/// Routes Kubernetes Service traffic the way kube-proxy does, and shows every packet's way.
#[derive(Debug, Parser)]
#[command(name = "switchyard", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a node's complete kernel program (nftables script, iptables-restore input, ...).
    Render(RenderArgs),
    /// Show where a packet goes: verdict, every endpoint it can reach, and the path it takes.
    Trace(TraceArgs),
    /// IPVS views of a node's program.
    #[command(subcommand)]
    Ipvs(IpvsCommand),
    /// Keep this node's kernel in step with a manifests folder or an API server; serve the
    /// dashboard, its event stream, traces, /metrics and /healthz.
    Agent(AgentArgs),
    /// A small cluster of network namespaces on this machine, one agent per node (root only).
    #[command(subcommand)]
    Lab(LabCommand),
    /// Play the built-in demo cluster and its scenario (scaling, a pod dying, a node joining,
    /// traffic of every kind) in real time, and serve it like an agent: no cluster, no root.
    Demo(DemoArgs),
}

/// How the agent and the demo serve the dashboard and the API.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// A file holding a bearer token every request must carry (required when --listen is not
    /// a loopback address). Browsers open the dashboard once with ?token=TOKEN.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The dashboard's files, as Trunk builds them (default: dist/ here or in the workspace).
    #[arg(long, value_name = "DIR")]
    pub ui_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Where the dashboard, /api/v1/events, /api/v1/snapshot, /api/v1/trace, /metrics and
    /// /healthz are served.
    #[arg(long, default_value = "127.0.0.1:10260")]
    pub listen: std::net::SocketAddr,
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Seeds the scenario's traffic.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Build the lab, run its agents and pod servers until Ctrl-C, then remove it.
    Up(LabUpArgs),
    /// Remove lab namespaces left behind by runs that were killed (`--all`: every lab namespace).
    Down {
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Clone, Args)]
pub struct LabUpArgs {
    /// Node namespaces (1-9).
    #[arg(long, default_value_t = 2)]
    pub nodes: usize,
    /// Pod namespaces per node (1-9).
    #[arg(long, default_value_t = 2)]
    pub pods: usize,
    #[arg(long, value_enum, default_value_t = AgentBackendArg::Nftables)]
    pub backend: AgentBackendArg,
}

#[derive(Debug, Clone, Args)]
// Exactly one source; the other arguments stay out of the group (derived groups take every field).
#[group(skip)]
#[command(group(clap::ArgGroup::new("agent_source").required(true).args(["cluster", "kubeconfig", "in_cluster"])))]
pub struct AgentArgs {
    /// The node this agent programs.
    #[arg(long)]
    pub node: String,
    /// A folder of Kubernetes objects (read recursively: *.yaml, *.yml, *.json), watched for
    /// changes.
    #[arg(long, value_name = "DIR")]
    pub cluster: Option<PathBuf>,
    /// Watch the API server named by this kubeconfig file (its current context).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Watch the API server this pod runs under (its service account).
    #[arg(long)]
    pub in_cluster: bool,
    /// A KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1) for the API server source,
    /// as kube-proxy's --config; a manifests folder carries its own.
    #[arg(long, value_name = "FILE", conflicts_with = "cluster")]
    pub config: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = AgentBackendArg::Nftables)]
    pub backend: AgentBackendArg,
    /// Where the dashboard, /api/v1/events, /api/v1/snapshot, /api/v1/trace, /metrics and
    /// /healthz are served (anything but loopback needs --token-file).
    #[arg(long, default_value = "127.0.0.1:10260")]
    pub listen: std::net::SocketAddr,
    /// Do not publish real flows from conntrack (on by default with a kernel backend).
    #[arg(long)]
    pub no_flows: bool,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AgentBackendArg {
    Nftables,
    Iptables,
    Ipvs,
    /// Compute and track the program, write nothing.
    None,
}

#[derive(Debug, Subcommand)]
pub enum IpvsCommand {
    /// Print what `ipvsadm -Ln` would show once the node's IPVS program is loaded.
    List(IpvsListArgs),
}

#[derive(Debug, Clone, Args)]
pub struct IpvsListArgs {
    #[command(flatten)]
    pub source: Source,
    /// The node whose program to list.
    #[arg(long)]
    pub node: String,
    /// List this IPVS program (as `render --backend ipvs` prints it, or `ipvsadm -Sn` output)
    /// instead of rendering the node's. `-` reads standard input.
    #[arg(long, value_name = "FILE")]
    pub program: Option<PathBuf>,
}

/// Where the cluster's objects come from.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct Source {
    /// Kubernetes objects: a file, or a folder read recursively (*.yaml, *.yml, *.json).
    /// Repeatable.
    #[arg(long, value_name = "PATH", num_args = 1.., action = ArgAction::Append)]
    pub cluster: Vec<PathBuf>,
    /// Use the built-in demo cluster (nodes node-1, node-2, node-3) instead of --cluster.
    #[arg(long)]
    pub demo: bool,
}

#[derive(Debug, Clone, Args)]
pub struct RenderArgs {
    #[command(flatten)]
    pub source: Source,
    /// The node whose program to write.
    #[arg(long)]
    pub node: String,
    #[arg(long, value_enum)]
    pub backend: BackendArg,
}

#[derive(Debug, Clone, Args)]
pub struct TraceArgs {
    #[command(flatten)]
    pub source: Source,
    /// The node the packet enters.
    #[arg(long)]
    pub node: String,
    #[arg(long, value_enum, default_value_t = BackendArg::Nftables)]
    pub backend: BackendArg,
    /// Trace this program instead of rendering one: as `render` prints it, or as the kernel lists
    /// it (`nft list table ...`, `iptables-save`). `-` reads standard input.
    #[arg(long, value_name = "FILE")]
    pub program: Option<PathBuf>,
    /// The packet's source address.
    #[arg(long, value_name = "IP", value_parser = parse_ip)]
    pub from: IpAddr,
    /// The destination: `IP:PORT`, `[IPv6]:PORT`, a Service DNS name with a port
    /// (`nginx-svc.default:80`), or a node name with a port (`node-3:30080`).
    #[arg(long, value_name = "IP:PORT|NAME:PORT", value_parser = parse_destination)]
    pub to: Destination,
    #[arg(long, value_enum, default_value_t = ProtocolArg::Tcp)]
    pub protocol: ProtocolArg,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Seeds the one path sampled for the hops and the diagram.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    Nftables,
    Iptables,
    Ipvs,
}

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Nftables => Backend::Nftables,
            BackendArg::Iptables => Backend::Iptables,
            BackendArg::Ipvs => Backend::Ipvs,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProtocolArg {
    Tcp,
    Udp,
    Sctp,
}

impl From<ProtocolArg> for Protocol {
    fn from(p: ProtocolArg) -> Self {
        match p {
            ProtocolArg::Tcp => Protocol::Tcp,
            ProtocolArg::Udp => Protocol::Udp,
            ProtocolArg::Sctp => Protocol::Sctp,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
    Mermaid,
}

/// `10.0.0.1`, `fd00::1` or `[fd00::1]`; IPv4 with leading zeros is read as kube-proxy reads it.
pub fn parse_ip(s: &str) -> Result<IpAddr, String> {
    let t = s.trim();
    let bare = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(t);
    switchyard_engine::input::parse_ip_sloppy(bare).ok_or_else(|| format!("{s:?} is not an IP address"))
}

fn parse_destination(s: &str) -> Result<Destination, String> {
    s.parse()
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Engine(#[from] switchyard_engine::Error),
    /// The `--program` given could not be parsed.
    #[error("--program {}: {source}", path.display())]
    Program {
        path: PathBuf,
        #[source]
        source: switchyard_engine::Error,
    },
    #[error("cannot read --program {}: {source}", path.display())]
    ReadProgram {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A piece of the engine this build does not have yet.
    #[error("{0} is not available in this build yet")]
    Unavailable(&'static str),
    #[error("cannot write the output: {0}")]
    Output(#[source] io::Error),
    #[error(transparent)]
    Agent(#[from] crate::agent::AgentError),
    /// `--config` is unreadable.
    #[error(transparent)]
    Config(#[from] crate::kube::KubeError),
    #[error(transparent)]
    Lab(#[from] crate::lab::LabError),
    /// Serving beyond this machine without a token.
    #[error(
        "--listen {0} is not a loopback address: anyone who can reach it could read the cluster; give \
         --token-file FILE (a bearer token every request must carry) or listen on 127.0.0.1"
    )]
    NeedsToken(std::net::SocketAddr),
    #[error("cannot read --token-file {}: {source}", path.display())]
    TokenFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--token-file {}: the file holds no token", .0.display())]
    EmptyToken(PathBuf),
}

impl Error {
    /// 2 for bad input (the contract's exit status), 1 for anything else.
    pub fn exit_code(&self) -> u8 {
        use switchyard_engine::Error as E;
        match self {
            Error::Load(_) | Error::Program { .. } | Error::ReadProgram { .. } | Error::Config(_) => 2,
            Error::NeedsToken(_) | Error::TokenFile { .. } | Error::EmptyToken(_) => 2,
            Error::Engine(E::UnknownNode(_) | E::UnknownName(_) | E::NoAddress { .. } | E::FamilyMismatch { .. }) => 2,
            _ => 1,
        }
    }

    /// The lines to print on standard error: one per problem.
    pub fn lines(&self) -> Vec<String> {
        match self {
            Error::Load(e) => e.0.iter().map(|p| p.to_string()).collect(),
            other => vec![other.to_string()],
        }
    }

    /// A closed standard output (`switchyard render ... | head`) is not a failure.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, Error::Output(e) if e.kind() == io::ErrorKind::BrokenPipe)
    }
}

/// Runs one command. Warnings go to `err`; the answer goes to `out`.
pub fn run(cli: Cli, out: &mut dyn Write, err: &mut dyn Write) -> Result<(), Error> {
    match cli.command {
        Command::Render(a) => {
            let cluster = cluster(&a.source, err)?;
            let program = switchyard_engine::render(&cluster, &a.node, a.backend.into())?;
            write_all(out, &program)?;
            if !program.ends_with('\n') {
                write_all(out, "\n")?;
            }
            Ok(())
        }
        Command::Trace(a) => {
            let cluster = cluster(&a.source, err)?;
            let trace = trace(&cluster, &a)?;
            let text = match a.output {
                Output::Json => {
                    let mut s = serde_json::to_string_pretty(&trace).map_err(|e| Error::Output(io::Error::other(e)))?;
                    s.push('\n');
                    s
                }
                Output::Text => text(&trace, &a.to),
                Output::Mermaid => mermaid(&cluster, &trace),
            };
            write_all(out, &text)
        }
        Command::Ipvs(IpvsCommand::List(a)) => {
            let cluster = cluster(&a.source, err)?;
            let listing = match &a.program {
                None => switchyard_engine::ipvs_list(&cluster, &a.node)?,
                Some(path) => {
                    let text = read_program(path)?;
                    switchyard_engine::trace::ipvs::Program::parse(&text)
                        .map_err(|e| Error::Program { path: path.clone(), source: switchyard_engine::Error::Ipvs(e) })?
                        .list()
                }
            };
            write_all(out, &listing)
        }
        Command::Agent(a) => agent(a),
        Command::Demo(a) => demo(a),
        Command::Lab(LabCommand::Up(a)) => lab_up(a, out),
        Command::Lab(LabCommand::Down { all }) => {
            for name in crate::lab::sweep_with(all) {
                write_all(out, &format!("deleted netns {name}\n"))?;
            }
            Ok(())
        }
    }
}

/// `switchyard lab up`: builds the lab, says how to look at it, and waits for Ctrl-C.
fn lab_up(a: LabUpArgs, out: &mut dyn Write) -> Result<(), Error> {
    use crate::agent::{AgentError, BackendChoice};
    use crate::lab::{Lab, LabSpec};
    let backend = match a.backend {
        AgentBackendArg::Nftables => BackendChoice::Nftables,
        AgentBackendArg::Iptables => BackendChoice::Iptables,
        AgentBackendArg::None => BackendChoice::None,
        AgentBackendArg::Ipvs => return Err(Error::Unavailable("the agent's ipvs backend")),
    };
    if let Some(why) = crate::lab::skip_reason(backend) {
        return Err(Error::Lab(crate::lab::LabError::Command { command: "lab up".into(), message: why }));
    }
    // Signals are registered before any agent runtime exists, so this thread's runtime sees them.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(AgentError::Runtime)?;
    let signals = runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        Ok::<_, io::Error>((signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?))
    });
    let (mut term, mut int) = signals.map_err(AgentError::Runtime)?;
    let spec = LabSpec { tag: "up".into(), nodes: a.nodes, pods_per_node: a.pods, backend };
    let mut lab = Lab::build(&spec)?;
    let services = crate::lab::demo_services(&lab.pods);
    let yaml: String = services.iter().map(|s| s.yaml(&lab)).collect();
    lab.write("10-services.yaml", &yaml)?;
    lab.lb_forward(std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(203, 0, 113, 100), 80), 30080)?;
    lab.start_agents()?;
    let mut s = format!("manifests (edit them; the agents follow): {}\n", lab.manifests.display());
    for n in &lab.nodes {
        s.push_str(&format!("node {} netns {} ip {} pods {}\n", n.name, n.netns, n.ip, n.pod_cidr));
    }
    for p in &lab.pods {
        s.push_str(&format!(
            "pod  {} netns {} ip {} (answers \"<pod> <source>\" on tcp/udp {})\n",
            p.name,
            p.netns,
            p.ip,
            crate::lab::TARGET_PORT
        ));
    }
    s.push_str(&format!("client netns {} ip {}; load balancer netns {}\n", lab.client, crate::lab::CLIENT_IP, lab.lb));
    if let (Some(n), Some(p)) = (lab.nodes.first(), lab.pods.first()) {
        s.push_str(&format!("try: ip netns exec {} bash -c 'cat < /dev/tcp/{}/30080'\n", lab.client, n.ip));
        s.push_str(&format!("     ip netns exec {} bash -c 'cat < /dev/tcp/10.96.0.10/80'\n", p.netns));
        s.push_str(&format!("     ip netns exec {} bash -c 'cat < /dev/tcp/203.0.113.10/80'\n", lab.client));
        s.push_str(&format!(
            "     ip netns exec {} bash -c 'cat < /dev/tcp/203.0.113.100/80'   (LB → every node's NodePort)\n",
            lab.client
        ));
        s.push_str(&format!("     ip netns exec {} nft list ruleset\n", n.netns));
    }
    s.push_str("Ctrl-C removes the lab.\n");
    write_all(out, &s)?;
    out.flush().map_err(Error::Output)?;
    runtime.block_on(async {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    });
    drop(lab);
    Ok(())
}

/// Runs the agent until SIGTERM or SIGINT.
fn agent(a: AgentArgs) -> Result<(), Error> {
    use crate::agent::{self, AgentConfig, AgentError, BackendChoice};
    let backend = match a.backend {
        AgentBackendArg::Nftables => BackendChoice::Nftables,
        AgentBackendArg::Iptables => BackendChoice::Iptables,
        AgentBackendArg::None => BackendChoice::None,
        AgentBackendArg::Ipvs => BackendChoice::Ipvs,
    };
    let source = match (a.cluster, a.kubeconfig) {
        (Some(dir), _) => agent::AgentSource::Manifests(dir),
        (None, file) => {
            let config = a.config.as_deref().map(crate::kube::read_proxy_config).transpose()?.unwrap_or_default();
            let connect = file.map_or(crate::kube::Connect::InCluster, crate::kube::Connect::Kubeconfig);
            agent::AgentSource::Kube { connect, config }
        }
    };
    let opts = agent::ServeOptions { server: server_config(a.listen, &a.serve)?, ..agent::ServeOptions::default() };
    let cfg = AgentConfig {
        node: a.node,
        source,
        backend,
        netns: None,
        backoff: crate::sync::Backoff::default(),
        flows: !a.no_flows,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(a.listen).await.map_err(AgentError::Serve)?;
        eprintln!("switchyard: node {} ({}), serving http://{}/", cfg.node, backend.as_str(), a.listen);
        agent::run_with(cfg, opts, listener, agent::termination()).await
    })?;
    Ok(())
}

/// Runs the demo until SIGTERM or SIGINT.
fn demo(a: DemoArgs) -> Result<(), Error> {
    use crate::agent::{self, AgentError};
    let cfg =
        crate::demo::DemoConfig { seed: a.seed, server: server_config(a.listen, &a.serve)?, ..Default::default() };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(a.listen).await.map_err(AgentError::Serve)?;
        let addr = listener.local_addr().map_err(AgentError::Serve)?;
        eprintln!("switchyard: demo scenario, serving http://{addr}/");
        crate::demo::run(cfg, listener, agent::termination()).await
    })?;
    Ok(())
}

/// The server's settings; refuses to serve beyond loopback without a token.
pub fn server_config(listen: std::net::SocketAddr, a: &ServeArgs) -> Result<crate::server::ServerConfig, Error> {
    let token = match &a.token_file {
        None if !listen.ip().is_loopback() => return Err(Error::NeedsToken(listen)),
        None => None,
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|source| Error::TokenFile { path: path.clone(), source })?;
            let token = text.trim();
            if token.is_empty() {
                return Err(Error::EmptyToken(path.clone()));
            }
            Some(token.to_string())
        }
    };
    let ui_dir = a.ui_dir.clone().or_else(crate::server::default_ui_dir);
    Ok(crate::server::ServerConfig { token, ui_dir })
}

fn write_all(out: &mut dyn Write, s: &str) -> Result<(), Error> {
    out.write_all(s.as_bytes()).map_err(Error::Output)
}

/// Reads the cluster the arguments name, printing the loader's warnings.
fn cluster(source: &Source, err: &mut dyn Write) -> Result<Cluster, Error> {
    if source.demo {
        return demo_cluster();
    }
    let loaded = load::load(&source.cluster)?;
    for w in &loaded.warnings {
        // Warnings are advice; a closed stderr must not fail the command.
        let _ = writeln!(err, "warning: {w}");
    }
    Ok(loaded.cluster)
}

/// The engine's built-in demo cluster.
fn demo_cluster() -> Result<Cluster, Error> {
    Ok(switchyard_engine::demo::cluster())
}

/// The trace as a Mermaid sequence diagram, with pods and nodes named from the cluster.
fn mermaid(cluster: &Cluster, trace: &Trace) -> String {
    let ctx = switchyard_engine::flow::DiagramContext::from_cluster(cluster, trace);
    switchyard_engine::flow::diagram(trace, &ctx).to_mermaid()
}

/// Builds the engine's request from the arguments and traces it.
pub fn trace(cluster: &Cluster, a: &TraceArgs) -> Result<Trace, Error> {
    let program = match &a.program {
        None => None,
        Some(path) => Some(read_program(path)?),
    };
    let req = TraceRequest {
        node: a.node.clone(),
        backend: a.backend.into(),
        program,
        from: a.from,
        to: node_destination(cluster, &a.to, a.from),
        protocol: a.protocol.into(),
        seed: a.seed,
    };
    switchyard_engine::trace(cluster, &req).map_err(|e| match e {
        e @ (switchyard_engine::Error::Nftables(_)
        | switchyard_engine::Error::Iptables(_)
        | switchyard_engine::Error::Ipvs(_))
            if a.program.is_some() =>
        {
            Error::Program { path: a.program.clone().unwrap_or_default(), source: e }
        }
        e => Error::from(e),
    })
}

fn read_program(path: &Path) -> Result<String, Error> {
    let read = if path.as_os_str() == "-" {
        let mut s = String::new();
        io::stdin().read_to_string(&mut s).map(|_| s)
    } else {
        std::fs::read_to_string(path)
    };
    read.map_err(|source| Error::ReadProgram { path: path.to_path_buf(), source })
}

/// `--to node-3:30080`: a name that is no Service but is a node stands for the node's primary
/// address of the source's family, so NodePorts can be traced by node name.
fn node_destination(cluster: &Cluster, to: &Destination, from: IpAddr) -> Destination {
    if let Destination::Name { name, port } = to
        && dns::resolve(cluster, name).is_none()
        && let Some(ip) = cluster.nodes.get(name).and_then(|n| n.primary_ip(IpFamily::of(&from)))
    {
        return Destination::Addr(SocketAddr { ip, port: *port });
    }
    to.clone()
}

/// A readable summary: the packet, the verdict, every outcome, then the sampled path.
pub fn text(t: &Trace, asked: &Destination) -> String {
    let mut s = String::new();
    let p = &t.packet;
    let dst = SocketAddr { ip: p.dst, port: p.dst_port };
    let asked = match asked {
        Destination::Addr(a) => a.to_string(),
        Destination::Name { name, port } => format!("{name}:{port}"),
    };
    let _ = writeln!(s, "packet   {} {} → {asked}", p.protocol, p.src);
    if dst.to_string() != asked && !p.dst.is_unspecified() {
        let _ = writeln!(s, "         ({asked} is {dst})");
    }
    let _ = writeln!(s, "node     {} ({} program)", t.node, t.backend);
    let _ = writeln!(s, "verdict  {}", t.verdict.as_str());
    if t.verdict == Verdict::Forward || !t.outcomes.is_empty() {
        let _ = writeln!(s, "outcomes");
        for o in &t.outcomes {
            let masq = if o.masquerade { "masquerade: yes" } else { "masquerade: no" };
            let _ = write!(s, "  {:>7.2}%  {:<24} {masq:<15}", o.probability * 100.0, o.endpoint.to_string());
            if let Some(n) = &o.node {
                let _ = write!(s, "  node {n}");
            }
            if let Some(pod) = &o.pod {
                let _ = write!(s, "  pod {pod}");
            }
            s.push('\n');
        }
    }
    if !t.hops.is_empty() {
        let _ = writeln!(s, "path (one sampled branch)");
        let width = t.hops.len().to_string().len();
        for (i, h) in t.hops.iter().enumerate() {
            let on = h.node.as_deref().map(|n| format!(" [{n}]")).unwrap_or_default();
            let _ = writeln!(s, "  {:>width$}. {}{on}: {}", i + 1, h.at, h.action);
            let pad = " ".repeat(width + 4);
            for (label, value) in
                [("chain", &h.chain), ("rule", &h.rule), ("comment", &h.comment), ("packet", &h.packet)]
            {
                if let Some(v) = value {
                    let _ = writeln!(s, "{pad}{label:<8} {v}");
                }
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_engine::trace::{Hop, Outcome, Packet};

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("switchyard").chain(args.iter().copied()))
    }

    /// The contract's trace line parses, with its defaults.
    #[test]
    fn trace_arguments_and_defaults() {
        let cli = parse(&[
            "trace",
            "--cluster",
            "a",
            "--cluster",
            "b",
            "--node",
            "n",
            "--from",
            "10.0.0.1",
            "--to",
            "10.96.0.10:80",
        ])
        .expect("parses");
        let Command::Trace(t) = cli.command else { panic!("not trace") };
        assert_eq!(t.source.cluster, vec![PathBuf::from("a"), PathBuf::from("b")]);
        assert_eq!(t.backend, BackendArg::Nftables);
        assert_eq!(t.protocol, ProtocolArg::Tcp);
        assert_eq!(t.output, Output::Text);
        assert_eq!(t.to, Destination::Addr("10.96.0.10:80".parse().expect("addr")));
    }

    /// Bad arguments are clap errors, which exit 2.
    #[test]
    fn bad_arguments_exit_2() {
        for args in [
            &["trace", "--cluster", "a", "--node", "n", "--from", "10.0.0.300", "--to", "10.0.0.1:80"][..],
            &["trace", "--cluster", "a", "--node", "n", "--from", "10.0.0.1", "--to", "10.0.0.1:99999"],
            &["trace", "--cluster", "a", "--node", "n", "--from", "10.0.0.1", "--to", "fd00::1:80"],
            &["render", "--cluster", "a", "--node", "n", "--backend", "bpf"],
            &["render", "--cluster", "a", "--demo", "--node", "n", "--backend", "nftables"],
            &["render", "--node", "n", "--backend", "nftables"],
            &["trace", "--demo", "--node", "n", "--from", "10.0.0.1", "--to", "10.0.0.1:80", "--protocol", "icmp"],
        ] {
            let e = parse(args).expect_err(&format!("{args:?} should fail"));
            assert_eq!(e.exit_code(), 2, "{args:?}: {e}");
        }
    }

    /// The agent's line parses with its defaults: nftables, 127.0.0.1:10260.
    #[test]
    fn agent_arguments_and_defaults() {
        let cli = parse(&["agent", "--node", "n1", "--cluster", "dir"]).expect("parses");
        let Command::Agent(a) = cli.command else { panic!("not agent") };
        assert_eq!((a.node.as_str(), a.cluster.as_deref()), ("n1", Some(Path::new("dir"))));
        assert_eq!(a.backend, AgentBackendArg::Nftables);
        assert_eq!(a.listen, "127.0.0.1:10260".parse().expect("addr"));
        let cli = parse(&["agent", "--node", "n1", "--cluster", "dir", "--backend", "ipvs"]).expect("parses");
        let e = run(cli, &mut Vec::new(), &mut Vec::new()).expect_err("ipvs is not in the agent yet");
        assert_eq!(e.exit_code(), 1);
        assert!(parse(&["agent", "--node", "n1", "--cluster", "d", "--backend", "bpf"]).is_err());
    }

    /// Exactly one source: a folder, a kubeconfig or the pod's own account; `--config` goes with
    /// the API server sources only.
    #[test]
    fn agent_sources() {
        let cli = parse(&["agent", "--node", "n1", "--kubeconfig", "k", "--config", "c"]).expect("parses");
        let Command::Agent(a) = cli.command else { panic!("not agent") };
        assert_eq!((a.kubeconfig.as_deref(), a.config.as_deref()), (Some(Path::new("k")), Some(Path::new("c"))));
        let cli = parse(&["agent", "--node", "n1", "--in-cluster"]).expect("parses");
        let Command::Agent(a) = cli.command else { panic!("not agent") };
        assert!(a.in_cluster && a.cluster.is_none());
        for args in [
            &["agent", "--node", "n1"][..],
            &["agent", "--node", "n1", "--cluster", "d", "--kubeconfig", "k"],
            &["agent", "--node", "n1", "--in-cluster", "--kubeconfig", "k"],
            &["agent", "--node", "n1", "--cluster", "d", "--config", "c"],
        ] {
            let e = parse(args).expect_err(&format!("{args:?} should fail"));
            assert_eq!(e.exit_code(), 2, "{args:?}: {e}");
        }
        // An unreadable --config is bad input, before anything starts.
        let cli = parse(&["agent", "--node", "n1", "--in-cluster", "--config", "/nonexistent/kube-proxy.yaml"])
            .expect("parses");
        let e = run(cli, &mut Vec::new(), &mut Vec::new()).expect_err("no such file");
        assert_eq!(e.exit_code(), 2, "{e}");
        assert!(e.to_string().contains("/nonexistent/kube-proxy.yaml"), "{e}");
    }

    /// `--to` takes IPv6 in brackets and DNS names with ports.
    #[test]
    fn destinations() {
        assert_eq!(
            parse_destination("[fd00::1]:80"),
            Ok(Destination::Addr(SocketAddr { ip: "fd00::1".parse().expect("ip"), port: 80 }))
        );
        assert_eq!(
            parse_destination("nginx-svc.default:80"),
            Ok(Destination::Name { name: "nginx-svc.default".into(), port: 80 })
        );
        assert_eq!(parse_ip("[fd00::1]"), Ok("fd00::1".parse().expect("ip")));
        assert_eq!(parse_ip("010.001.002.003"), Ok("10.1.2.3".parse().expect("ip")));
    }

    /// Input problems and unknown nodes exit 2; what this build lacks exits 1.
    #[test]
    fn exit_codes() {
        let e = Error::Engine(switchyard_engine::Error::UnknownNode("x".into()));
        assert_eq!(e.exit_code(), 2);
        assert_eq!(Error::Load(LoadError(Vec::new())).exit_code(), 2);
        assert_eq!(Error::Unavailable("x").exit_code(), 1);
        assert!(Error::Output(io::Error::from(io::ErrorKind::BrokenPipe)).is_broken_pipe());
    }

    /// The text summary names the verdict, each outcome with its share and masquerade, and
    /// numbers the hops with their chain, rule and comment.
    #[test]
    fn text_summary() {
        let ep = |s: &str| s.parse::<SocketAddr>().expect("endpoint");
        let t = Trace {
            verdict: Verdict::Forward,
            outcomes: vec![
                Outcome {
                    endpoint: ep("10.180.0.1:80"),
                    probability: 0.5,
                    masquerade: true,
                    node: Some("n1".into()),
                    pod: None,
                },
                Outcome { endpoint: ep("10.180.2.1:80"), probability: 0.5, masquerade: false, node: None, pod: None },
            ],
            hops: vec![
                Hop::new("prerouting nat", "dnat to 10.180.0.1:80")
                    .chain("services")
                    .rule("ip daddr . meta l4proto . th dport vmap @service-ips")
                    .comment(Some("ns1/svc1 clusterIP".into())),
            ],
            packet: Packet {
                src: "10.180.0.2".parse().expect("ip"),
                src_port: 40000,
                dst: "172.30.0.41".parse().expect("ip"),
                dst_port: 80,
                protocol: Protocol::Tcp,
            },
            node: "n1".into(),
            backend: "nftables".into(),
            dns: None,
        };
        let s = text(&t, &Destination::Name { name: "svc1.ns1".into(), port: 80 });
        assert!(s.contains("verdict  forward"), "{s}");
        assert!(s.contains("50.00%  10.180.0.1:80") && s.contains("masquerade: yes"), "{s}");
        assert!(s.contains("(svc1.ns1:80 is 172.30.0.41:80)"), "{s}");
        assert!(s.contains("1. prerouting nat: dnat to 10.180.0.1:80"), "{s}");
        assert!(s.contains("chain    services") && s.contains("comment  ns1/svc1 clusterIP"), "{s}");
    }
}
