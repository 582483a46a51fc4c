//! A trace as a sequence diagram: the classic pictures people draw for ClusterIP, NodePort,
//! LoadBalancer and hairpin traffic, built from what the tracer found rather than drawn by hand.
//!
//! Lifelines, left to right: the client (a pod, an outside client, or the node itself), cluster DNS
//! when the flow started from a name, the cloud load balancer when the destination was an LB IP,
//! the node the packet enters, the node that hosts the endpoint when it is another one, the
//! endpoint pod, and the outside host an ExternalName points at. Messages are the packet as it
//! travels, the reply included; notes say what each netfilter hook did where it did it (DNAT,
//! masquerade, the un-NAT of the reply), with the rule and its comment.
//!
//! The model is plain data (serde, camelCase) with a [`SequenceDiagram::layout`] in plain
//! coordinates, so the dashboard only draws it; [`SequenceDiagram::to_mermaid`] writes it as Mermaid.
//!
//! A [`Trace`]'s hops are read by their `at` field: `dns`, `node`/`arrival` (the packet is sent),
//! `pod network`, `pod`, `reply`, `reply conntrack`, `client`, `input` and `routing` are places on
//! the path; anything else is a step of the node's kernel program (`prerouting nat`, ...), whose
//! `action` says what it did (`dnat to ...`, `mark for masquerade`, `masquerade ...`, `reject`).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::cluster::Cluster;
use crate::dns::Answer;
use crate::model::{IpFamily, ObjectKey, ServiceType};
use crate::trace::{Hop, SocketAddr, Trace, Verdict};

/// Participant ids: fixed, short and safe to write into Mermaid as identifiers.
pub mod ids {
    pub const CLIENT: &str = "client";
    pub const DNS: &str = "dns";
    pub const LOAD_BALANCER: &str = "lb";
    /// The node the packet enters (the trace's node).
    pub const NODE: &str = "node";
    /// The node that hosts the endpoint, when it is not the entry node.
    pub const HOST: &str = "host";
    pub const POD: &str = "pod";
    /// Outside the cluster: an ExternalName's target, or where an unproxied packet is routed.
    pub const REMOTE: &str = "remote";
}

/// What a lifeline stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ParticipantKind {
    /// A client outside the cluster, or one the diagram cannot place.
    Client,
    Pod,
    Node,
    LoadBalancer,
    Dns,
    /// A host outside the cluster the packet is sent to.
    External,
}

/// One lifeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Participant {
    /// One of [`ids`].
    pub id: String,
    pub kind: ParticipantKind,
    /// For humans: `nginx-7d4b9c-fghij 10.244.2.15:8080`, `node-3 192.168.1.13`.
    pub label: String,
}

/// How a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MessageKind {
    /// The packet on its way to the endpoint.
    Request,
    /// The answer on its way back.
    Reply,
    /// A DNS query or answer.
    Dns,
    /// The node answers for the service: ICMP port unreachable or a TCP reset.
    Refused,
    /// The packet arrives and is dropped there; nothing comes back.
    Dropped,
    /// Delivered to a process on the node itself.
    Local,
}

/// An arrow between two lifelines (or from one to itself).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    pub from: String,
    pub to: String,
    pub kind: MessageKind,
    /// The label: usually the packet as it is on this stretch.
    pub text: String,
    /// The packet (`src → dst proto`), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packet: Option<String>,
    /// The index in [`Trace::hops`] this message was drawn from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hop: Option<usize>,
}

/// What a note says, so the dashboard can colour translations apart from plain rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum NoteKind {
    /// Context: where a packet starts, what a pod sees.
    Info,
    /// A rule of the node's program that did not translate anything (a jump, a match).
    Hook,
    /// The destination was translated to an endpoint.
    Dnat,
    /// The packet was marked to be masqueraded later.
    Mark,
    /// The source was rewritten (masquerade / SNAT).
    Snat,
    /// Conntrack undid the translations on the reply.
    UnNat,
    /// Which endpoints load balancing could have picked.
    Balance,
    Reject,
    Drop,
    Accept,
    Dns,
}

/// A note over one or two lifelines, shown after the first `after` messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Note {
    /// How many messages precede this note.
    pub after: usize,
    /// Participant ids (one, or two for a note that spans).
    pub over: Vec<String>,
    pub kind: NoteKind,
    /// What happened, in words.
    pub text: String,
    /// The hook and table (`prerouting nat`), for a step of the kernel program.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chain: Option<String>,
    /// The rule (or map element) that matched, as the program writes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The rule's comment: which Service and field made it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// The packet after this step, when it changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packet: Option<String>,
    /// The indexes in [`Trace::hops`] this note summarises.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hops: Vec<usize>,
}

impl Note {
    fn new(after: usize, over: &[&str], kind: NoteKind, text: impl Into<String>) -> Self {
        Note {
            after,
            over: over.iter().map(|s| s.to_string()).collect(),
            kind,
            text: text.into(),
            at: None,
            chain: None,
            rule: None,
            comment: None,
            packet: None,
            hops: Vec::new(),
        }
    }

    /// The note as lines of plain text (not escaped), as both Mermaid and the layout show it.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        match (&self.at, &self.chain) {
            (Some(at), Some(chain)) if !chain.contains(" → ") => out.push(format!("{at} [{chain}]: {}", self.text)),
            (Some(at), _) => out.push(format!("{at}: {}", self.text)),
            _ => out.push(self.text.clone()),
        }
        if let Some(path) = self.chain.as_deref().filter(|c| c.contains(" → ")) {
            out.push(format!("chains: {path}"));
        }
        if let Some(r) = &self.rule {
            out.push(format!("rule: {r}"));
        }
        if let Some(c) = &self.comment {
            out.push(format!("comment: {c}"));
        }
        if let Some(p) = &self.packet {
            out.push(format!("packet: {p}"));
        }
        out
    }
}

/// What kind of address the packet was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DestinationKind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
    HealthCheckNodePort,
    /// A name that cluster DNS answers with a CNAME: no proxying at all.
    ExternalName,
    Other,
}

impl DestinationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DestinationKind::ClusterIp => "ClusterIP",
            DestinationKind::NodePort => "NodePort",
            DestinationKind::LoadBalancer => "LoadBalancer",
            DestinationKind::ExternalIp => "externalIP",
            DestinationKind::HealthCheckNodePort => "healthCheckNodePort",
            DestinationKind::ExternalName => "ExternalName",
            DestinationKind::Other => "address",
        }
    }
}

/// Who sent the packet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum ClientKind {
    Pod {
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        node: Option<String>,
    },
    Node {
        name: String,
    },
    External,
}

/// What the caller knows beyond the trace; everything is optional and inferred from the trace
/// when missing (the hops' comments name the Service field a rule came from).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DiagramContext {
    pub destination: Option<DestinationKind>,
    /// The Service the destination belongs to.
    pub service: Option<ObjectKey>,
    pub client: Option<ClientKind>,
    /// Node addresses, for labels.
    pub node_ips: BTreeMap<String, IpAddr>,
    /// One note per rule that matched, instead of one note per hook summing up what it did.
    pub every_rule: bool,
}

impl DiagramContext {
    /// Looks the trace's source and destination up in the cluster input.
    pub fn from_cluster(cluster: &Cluster, trace: &Trace) -> Self {
        let family = IpFamily::of(&trace.packet.src);
        let node_ips: BTreeMap<String, IpAddr> = cluster
            .nodes
            .values()
            .filter_map(|n| n.primary_ip(family).or_else(|| n.ips().first().copied()).map(|ip| (n.name.clone(), ip)))
            .collect();

        let src = trace.packet.src;
        let client = if let Some(n) = cluster.nodes.values().find(|n| n.ips().contains(&src)) {
            ClientKind::Node { name: n.name.clone() }
        } else if let Some(e) = cluster.endpoint_slices.values().flat_map(|s| &s.endpoints).find(|e| e.address == src) {
            ClientKind::Pod { name: e.target.clone(), node: e.node_name.clone() }
        } else if let Some(n) = cluster.nodes.values().find(|n| n.pod_cidrs.iter().any(|c| c.contains(&src))) {
            ClientKind::Pod { name: None, node: Some(n.name.clone()) }
        } else {
            ClientKind::External
        };

        let (dst, port) = (trace.packet.dst, trace.packet.dst_port);
        let mut destination = DestinationKind::Other;
        let mut service = None;
        if let Some(r) = &trace.dns
            && matches!(r.answer, Answer::Cname { .. })
        {
            destination = DestinationKind::ExternalName;
            service = Some(r.service.clone());
        } else {
            let dst_is_node = cluster.nodes.values().any(|n| n.ips().contains(&dst));
            for s in cluster.services.values().filter(|s| s.is_proxied()) {
                let kind = if s.load_balancer_ips().any(|ip| ip == dst) {
                    Some(DestinationKind::LoadBalancer)
                } else if s.external_ips.contains(&dst) {
                    Some(DestinationKind::ExternalIp)
                } else if s.cluster_ips.contains(&dst) {
                    Some(DestinationKind::ClusterIp)
                } else if dst_is_node
                    && s.service_type != ServiceType::ClusterIP
                    && s.ports.iter().any(|p| p.node_port == Some(port))
                {
                    Some(DestinationKind::NodePort)
                } else if dst_is_node && s.health_check_node_port == Some(port) {
                    Some(DestinationKind::HealthCheckNodePort)
                } else {
                    None
                };
                if let Some(k) = kind {
                    destination = k;
                    service = Some(s.key.clone());
                    break;
                }
            }
        }
        DiagramContext { destination: Some(destination), service, client: Some(client), node_ips, every_rule: false }
    }
}

/// A cluster indexed so that [`ClusterIndex::context`] finds by lookups what
/// [`DiagramContext::from_cluster`] finds by scanning every service and endpoint: the agent
/// explains every connection of a busy node against one cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterIndex {
    /// Node → its address shown in diagrams, for IPv4 and IPv6 sources.
    node_ips: [BTreeMap<String, IpAddr>; 2],
    node_by_ip: HashMap<IpAddr, String>,
    /// Endpoint address → (pod, node), the first endpoint with that address.
    endpoints: HashMap<IpAddr, (Option<String>, Option<String>)>,
    pod_cidrs: Vec<(ipnet::IpNet, String)>,
    /// Address → (service order, kind, service), the first proxied service using it.
    by_ip: HashMap<IpAddr, (usize, DestinationKind, ObjectKey)>,
    node_ports: HashMap<u16, (usize, ObjectKey)>,
    health_ports: HashMap<u16, (usize, ObjectKey)>,
}

impl ClusterIndex {
    pub fn new(cluster: &Cluster) -> Self {
        let mut ix = ClusterIndex::default();
        for (f, family) in [IpFamily::V4, IpFamily::V6].into_iter().enumerate() {
            ix.node_ips[f] = cluster
                .nodes
                .values()
                .filter_map(|n| {
                    n.primary_ip(family).or_else(|| n.ips().first().copied()).map(|ip| (n.name.clone(), ip))
                })
                .collect();
        }
        for n in cluster.nodes.values() {
            for ip in n.ips() {
                ix.node_by_ip.entry(ip).or_insert_with(|| n.name.clone());
            }
            ix.pod_cidrs.extend(n.pod_cidrs.iter().map(|c| (*c, n.name.clone())));
        }
        for e in cluster.endpoint_slices.values().flat_map(|s| &s.endpoints) {
            ix.endpoints.entry(e.address).or_insert_with(|| (e.target.clone(), e.node_name.clone()));
        }
        // In the order `from_cluster` tries them: services in order, and within one service a
        // load-balancer IP before an external IP, a cluster IP, a NodePort, a health check port.
        for (i, s) in cluster.services.values().filter(|s| s.is_proxied()).enumerate() {
            let by_ip = s
                .load_balancer_ips()
                .map(|ip| (ip, DestinationKind::LoadBalancer))
                .chain(s.external_ips.iter().map(|ip| (*ip, DestinationKind::ExternalIp)))
                .chain(s.cluster_ips.iter().map(|ip| (*ip, DestinationKind::ClusterIp)));
            for (ip, kind) in by_ip {
                ix.by_ip.entry(ip).or_insert_with(|| (i, kind, s.key.clone()));
            }
            if s.service_type != ServiceType::ClusterIP {
                for np in s.ports.iter().filter_map(|p| p.node_port) {
                    ix.node_ports.entry(np).or_insert_with(|| (i, s.key.clone()));
                }
            }
            if let Some(h) = s.health_check_node_port {
                ix.health_ports.entry(h).or_insert_with(|| (i, s.key.clone()));
            }
        }
        ix
    }

    /// What [`DiagramContext::from_cluster`] says of `trace`, for the cluster indexed.
    pub fn context(&self, trace: &Trace) -> DiagramContext {
        let family = IpFamily::of(&trace.packet.src);
        let node_ips = self.node_ips[usize::from(family == IpFamily::V6)].clone();
        let src = trace.packet.src;
        let client = if let Some(n) = self.node_by_ip.get(&src) {
            ClientKind::Node { name: n.clone() }
        } else if let Some((pod, node)) = self.endpoints.get(&src) {
            ClientKind::Pod { name: pod.clone(), node: node.clone() }
        } else if let Some((_, n)) = self.pod_cidrs.iter().find(|(c, _)| c.contains(&src)) {
            ClientKind::Pod { name: None, node: Some(n.clone()) }
        } else {
            ClientKind::External
        };
        let (dst, port) = (trace.packet.dst, trace.packet.dst_port);
        let (destination, service) = if let Some(r) = &trace.dns
            && matches!(r.answer, Answer::Cname { .. })
        {
            (DestinationKind::ExternalName, Some(r.service.clone()))
        } else {
            let dst_is_node = self.node_by_ip.contains_key(&dst);
            let mut best: Option<(usize, DestinationKind, &ObjectKey)> =
                self.by_ip.get(&dst).map(|(i, k, s)| (*i, *k, s));
            let by_port = [
                (self.node_ports.get(&port), DestinationKind::NodePort),
                (self.health_ports.get(&port), DestinationKind::HealthCheckNodePort),
            ];
            for (hit, kind) in by_port {
                if let Some((i, s)) = hit
                    && dst_is_node
                    && best.is_none_or(|(b, ..)| *i < b)
                {
                    best = Some((*i, kind, s));
                }
            }
            match best {
                Some((_, kind, s)) => (kind, Some(s.clone())),
                None => (DestinationKind::Other, None),
            }
        };
        DiagramContext { destination: Some(destination), service, client: Some(client), node_ips, every_rule: false }
    }
}

/// A trace drawn as a sequence diagram.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SequenceDiagram {
    pub title: String,
    /// The node the packet entered.
    pub node: String,
    pub backend: String,
    pub verdict: Verdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<DestinationKind>,
    /// The id of the participant that sent the packet (the node itself for its own traffic).
    pub client: String,
    pub participants: Vec<Participant>,
    pub messages: Vec<Message>,
    /// Notes, in order; each is shown after its `after` messages.
    pub notes: Vec<Note>,
}

/// A message or a note, in the order a diagram shows them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Step<'a> {
    Message(usize, &'a Message),
    Note(usize, &'a Note),
}

impl SequenceDiagram {
    /// Messages and notes interleaved, in drawing order.
    pub fn steps(&self) -> Vec<Step<'_>> {
        let mut out = Vec::with_capacity(self.messages.len() + self.notes.len());
        let mut notes = self.notes.iter().enumerate().peekable();
        for (m, msg) in self.messages.iter().enumerate() {
            while let Some((i, n)) = notes.next_if(|(_, n)| n.after <= m) {
                out.push(Step::Note(i, n));
            }
            out.push(Step::Message(m, msg));
        }
        out.extend(notes.map(|(i, n)| Step::Note(i, n)));
        out
    }

    pub fn participant(&self, id: &str) -> Option<&Participant> {
        self.participants.iter().find(|p| p.id == id)
    }

    /// The diagram as a Mermaid `sequenceDiagram`. Text from the cluster is escaped, so names
    /// cannot break out of a label into Mermaid syntax.
    pub fn to_mermaid(&self) -> String {
        let mut out = String::from("sequenceDiagram\n");
        let _ = writeln!(out, "    %% {}", escape(&self.title));
        out.push_str("    autonumber\n");
        for p in &self.participants {
            let keyword = if p.kind == ParticipantKind::Client { "actor" } else { "participant" };
            let _ = writeln!(out, "    {keyword} {} as {}", p.id, escape(&p.label));
        }
        for step in self.steps() {
            match step {
                Step::Message(_, m) => {
                    let arrow = match m.kind {
                        MessageKind::Dns if m.from == ids::DNS => "-->>",
                        MessageKind::Request | MessageKind::Dns | MessageKind::Local => "->>",
                        MessageKind::Reply => "-->>",
                        MessageKind::Refused => "--x",
                        MessageKind::Dropped => "-x",
                    };
                    let text = if m.text.trim().is_empty() { "packet".to_string() } else { escape(&m.text) };
                    let _ = writeln!(out, "    {}{arrow}{}: {text}", m.from, m.to);
                }
                Step::Note(_, n) => {
                    let text: Vec<String> = n.lines().iter().map(|l| escape(l)).collect();
                    let _ = writeln!(out, "    Note over {}: {}", n.over.join(","), text.join("<br/>"));
                }
            }
        }
        out
    }

    /// Positions for drawing the diagram (SVG units), so the dashboard stays a thin view.
    pub fn layout(&self, opts: &LayoutOptions) -> Layout {
        let columns: Vec<Column> = self
            .participants
            .iter()
            .enumerate()
            .map(|(i, p)| Column { participant: p.id.clone(), x: opts.margin + opts.column_width * (i as f64 + 0.5) })
            .collect();
        let x_of = |id: &str| columns.iter().find(|c| c.participant == id).map(|c| c.x).unwrap_or(opts.margin);
        let mut y = opts.margin + opts.header_height;
        let mut rows = Vec::new();
        for step in self.steps() {
            let (height, item) = match step {
                Step::Message(i, m) => {
                    let (x1, x2) = (x_of(&m.from), x_of(&m.to));
                    let h = if m.from == m.to { opts.message_height * 1.5 } else { opts.message_height };
                    (h, RowItem::Message { index: i, x1, x2 })
                }
                Step::Note(i, n) => {
                    let xs: Vec<f64> = n.over.iter().map(|id| x_of(id)).collect();
                    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (opts.margin, opts.margin) };
                    let width = (hi - lo) + opts.column_width * 0.9;
                    let lines = n.lines().len();
                    let h = opts.note_line_height * lines as f64 + opts.note_padding * 2.0;
                    (h, RowItem::Note { index: i, x: (lo + hi) / 2.0 - width / 2.0, width, lines })
                }
            };
            rows.push(Row { y, height, item });
            y += height + opts.gap;
        }
        Layout {
            width: opts.margin * 2.0 + opts.column_width * self.participants.len() as f64,
            height: y + opts.header_height + opts.margin,
            columns,
            rows,
        }
    }
}

/// Sizes for [`SequenceDiagram::layout`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayoutOptions {
    pub column_width: f64,
    pub header_height: f64,
    pub message_height: f64,
    pub note_line_height: f64,
    pub note_padding: f64,
    pub gap: f64,
    pub margin: f64,
}

impl Default for LayoutOptions {
    fn default() -> Self {
        LayoutOptions {
            column_width: 200.0,
            header_height: 40.0,
            message_height: 36.0,
            note_line_height: 16.0,
            note_padding: 6.0,
            gap: 6.0,
            margin: 10.0,
        }
    }
}

/// Where everything goes: lifelines at `columns[i].x`, one row per step from top to bottom.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Layout {
    pub width: f64,
    pub height: f64,
    pub columns: Vec<Column>,
    pub rows: Vec<Row>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Column {
    pub participant: String,
    pub x: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    /// The top of the row.
    pub y: f64,
    pub height: f64,
    pub item: RowItem,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum RowItem {
    /// `messages[index]` from `x1` to `x2` (equal for a message to itself).
    Message { index: usize, x1: f64, x2: f64 },
    /// `notes[index]`, a box from `x` of `width` holding `lines` lines.
    Note { index: usize, x: f64, width: f64, lines: usize },
}

/// The trace as Mermaid text, with what the trace alone tells.
pub fn mermaid(trace: &Trace) -> String {
    diagram(trace, &DiagramContext::default()).to_mermaid()
}

/// Writes text from the cluster (names, rules, comments) so Mermaid shows it as text: `#` and `;`
/// end a statement, `%%` starts a comment, markup and line breaks are not passed through.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(ch) = chars.next() {
        match ch {
            '#' => out.push_str("#35;"),
            ';' => out.push_str("#59;"),
            '<' => out.push_str("#60;"),
            '>' => out.push_str("#62;"),
            '&' => out.push_str("#38;"),
            '"' => out.push_str("#34;"),
            // `%%` starts a comment or a directive (`%%{init}%%`) anywhere in the text.
            '%' if out.ends_with('%') || chars.peek() == Some(&'%') => out.push_str("#37;"),
            '{' => out.push_str("#123;"),
            '}' => out.push_str("#125;"),
            '\\' => out.push_str("#92;"),
            '`' => out.push_str("#96;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// Hops that are places on the path rather than steps of the kernel program.
const PLACES: [&str; 10] =
    ["dns", "node", "arrival", "pod network", "pod", "reply", "reply conntrack", "client", "input", "routing"];

fn is_program_hop(h: &Hop) -> bool {
    !PLACES.contains(&h.at.as_str())
}

/// The verdict part of an action: a map lookup is written `@map: key → verdict`.
fn verdict_part(action: &str) -> &str {
    action.rsplit_once("→ ").map(|(_, v)| v).unwrap_or(action).trim()
}

/// What a step of the kernel program did, from its action text. Jumps and gotos only move
/// between chains; what happens in the chain they lead to is its own step.
fn classify(h: &Hop) -> NoteKind {
    let a = verdict_part(&h.action).to_ascii_lowercase();
    if a.starts_with("jump") || a.starts_with("goto") {
        NoteKind::Hook
    } else if a.contains("un-dnat") || a.contains("reverses") {
        NoteKind::UnNat
    } else if a.contains("dnat") {
        NoteKind::Dnat
    } else if a.contains("mark for masquerade") || a.starts_with("mark") || a.contains("set mark") {
        NoteKind::Mark
    } else if a.contains("masquerade") || a.contains("snat") {
        NoteKind::Snat
    } else if a.contains("reject") {
        NoteKind::Reject
    } else if a.contains("drop") {
        NoteKind::Drop
    } else if a.contains("accept") {
        NoteKind::Accept
    } else {
        NoteKind::Hook
    }
}

/// How much a note kind matters when one note sums up a hook.
fn weight(k: NoteKind) -> u8 {
    match k {
        NoteKind::Reject | NoteKind::Drop => 6,
        NoteKind::Dnat => 5,
        NoteKind::Snat => 4,
        NoteKind::Accept => 3,
        NoteKind::Mark => 2,
        _ => 0,
    }
}

/// One note for the steps `members` of the kernel program (all in one hook): what they did, the
/// chains they went through, the decisive rule, and the comment naming the Service field that
/// captured the packet. `None` when the steps only moved between chains, unless `keep_plain`.
fn rule_note(hops: &[Hop], members: &[usize], keep_plain: bool) -> Option<Note> {
    let steps: Vec<(usize, &Hop, NoteKind)> = members.iter().map(|&i| (i, &hops[i], classify(&hops[i]))).collect();
    let (_, main, kind) = *steps.iter().max_by_key(|(i, _, k)| (weight(*k), std::cmp::Reverse(*i)))?;
    if weight(kind) == 0 && !keep_plain {
        return None;
    }
    if let [(_, h, k)] = steps.as_slice() {
        let mut n = Note::new(0, &[], *k, h.action.clone());
        n.at = Some(h.at.clone());
        n.chain = h.chain.clone();
        n.rule = h.rule.clone();
        n.comment = h.comment.clone();
        n.packet = h.packet.clone();
        n.hops = members.to_vec();
        return Some(n);
    }
    let mut actions: Vec<&str> = Vec::new();
    for (_, h, k) in &steps {
        let a = verdict_part(&h.action);
        if weight(*k) > 0 && !actions.contains(&a) {
            actions.push(a);
        }
    }
    let mut chains: Vec<&str> = Vec::new();
    for (_, h, _) in &steps {
        if let Some(c) = h.chain.as_deref()
            && chains.last() != Some(&c)
        {
            chains.push(c);
        }
    }
    // The first comment that names a Service (`namespace/name...`) says which field captured the
    // packet; otherwise the decisive rule's own comment.
    let comment = steps
        .iter()
        .filter_map(|(_, h, _)| h.comment.as_deref())
        .find(|c| c.contains('/'))
        .or(main.comment.as_deref())
        .map(str::to_string);
    let mut n = Note::new(0, &[], kind, actions.join(", then "));
    n.at = main.at.split_whitespace().next().map(str::to_string);
    n.chain = (!chains.is_empty()).then(|| chains.join(" → "));
    n.rule = main.rule.clone();
    n.comment = comment;
    n.packet = steps.iter().rev().find_map(|(_, h, _)| h.packet.clone());
    n.hops = members.to_vec();
    Some(n)
}

/// The destination from the rules' comments, which name the Service field they come from.
fn infer_destination(trace: &Trace) -> Option<DestinationKind> {
    if let Some(r) = &trace.dns
        && matches!(r.answer, Answer::Cname { .. })
    {
        return Some(DestinationKind::ExternalName);
    }
    let text: String = trace
        .hops
        .iter()
        .filter(|h| is_program_hop(h))
        .flat_map(|h| [h.comment.as_deref(), h.rule.as_deref(), Some(h.action.as_str())])
        .flatten()
        .collect::<Vec<_>>()
        .join("\n")
        .to_ascii_lowercase();
    let any = |words: &[&str]| words.iter().any(|w| text.contains(w));
    if any(&["loadbalancer", "load balancer", "load-balancer"]) {
        Some(DestinationKind::LoadBalancer)
    } else if any(&["healthchecknodeport", "health-check", "health check"]) {
        Some(DestinationKind::HealthCheckNodePort)
    } else if any(&["nodeport", "node port"]) {
        Some(DestinationKind::NodePort)
    } else if any(&["externalips", "externalip", "external ip"]) {
        Some(DestinationKind::ExternalIp)
    } else if any(&["clusterip", "cluster ip", "cluster-ip"]) {
        Some(DestinationKind::ClusterIp)
    } else {
        None
    }
}

fn packet_text(src: IpAddr, src_port: u16, dst: IpAddr, dst_port: u16, proto: &str) -> String {
    format!("{} → {} {proto}", SocketAddr { ip: src, port: src_port }, SocketAddr { ip: dst, port: dst_port })
}

/// What a real connection showed of its way: the endpoint that answered (the reply tuple's
/// source) and whether the reply was addressed to someone other than the client (masquerade).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    pub endpoint: SocketAddr,
    pub masquerade: bool,
}

/// A traced connection as a flow event: the destination and Service looked up in `cluster`, the
/// trace's outcomes and diagram, and what was `observed` with whether the tracer predicted it
/// (`agrees`). The caller sets `id`, `state`, `origin` and `name`; `src` and `dst` are the
/// trace's packet.
pub fn explain(cluster: &Cluster, trace: Trace, observed: Option<Observed>) -> crate::protocol::FlowEvent {
    let ctx = DiagramContext::from_cluster(cluster, &trace);
    explain_in(&ctx, trace, observed, true)
}

/// [`explain`] with the context already found (see [`ClusterIndex::context`]); the diagram only
/// when `draw` (it is most of the cost).
pub fn explain_in(
    ctx: &DiagramContext,
    trace: Trace,
    observed: Option<Observed>,
    draw: bool,
) -> crate::protocol::FlowEvent {
    use crate::protocol::{FlowEvent, FlowOrigin, FlowState};
    let diagram = draw.then(|| diagram(&trace, ctx));
    let p = trace.packet;
    // The node's own traffic masqueraded to the address it already had looks unmasqueraded.
    let from_node = matches!(&ctx.client, Some(ClientKind::Node { name }) if *name == trace.node);
    let agrees = observed.map(|ob| {
        trace
            .outcomes
            .iter()
            .any(|o| o.endpoint == ob.endpoint && (o.masquerade == ob.masquerade || (o.masquerade && from_node)))
    });
    FlowEvent {
        id: 0,
        origin: FlowOrigin::Conntrack,
        state: FlowState::New,
        node: trace.node.clone(),
        protocol: p.protocol,
        src: SocketAddr { ip: p.src, port: p.src_port },
        dst: SocketAddr { ip: p.dst, port: p.dst_port },
        name: None,
        destination: ctx.destination.unwrap_or(DestinationKind::Other),
        service: ctx.service.clone(),
        verdict: trace.verdict,
        endpoint: observed.map(|o| o.endpoint),
        masquerade: observed.map(|o| o.masquerade),
        agrees,
        outcomes: trace.outcomes,
        diagram,
    }
}

/// The endpoint the trace's one sampled path reached, if it reached one.
pub fn sampled_endpoint(trace: &Trace) -> Option<SocketAddr> {
    let hop = trace.hops.iter().find(|h| h.at == "pod")?;
    packet_dst(hop.packet.as_deref()?)
}

fn packet_dst(text: &str) -> Option<SocketAddr> {
    let (_, rest) = text.split_once('→')?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Accumulates the diagram.
struct Builder {
    messages: Vec<Message>,
    notes: Vec<Note>,
}

impl Builder {
    fn msg(
        &mut self,
        from: &str,
        to: &str,
        kind: MessageKind,
        text: impl Into<String>,
        packet: Option<String>,
        hop: Option<usize>,
    ) {
        self.messages.push(Message { from: from.into(), to: to.into(), kind, text: text.into(), packet, hop });
    }
    fn note(&mut self, over: &[&str], kind: NoteKind, text: impl Into<String>) -> &mut Note {
        self.notes.push(Note::new(self.messages.len(), over, kind, text));
        let last = self.notes.len() - 1;
        &mut self.notes[last]
    }
}

/// Draws `trace`. `ctx` fills in what the trace cannot say (pass `DiagramContext::default()` to
/// infer everything from the trace).
pub fn diagram(trace: &Trace, ctx: &DiagramContext) -> SequenceDiagram {
    use ids::*;
    let hops = &trace.hops;
    let proto = trace.packet.protocol.as_str();
    let destination = ctx.destination.filter(|d| *d != DestinationKind::Other).or_else(|| infer_destination(trace));

    // The endpoint of the drawn path, and where it lives.
    let pod_hop = hops.iter().position(|h| h.at == "pod");
    let endpoint = sampled_endpoint(trace);
    let outcome = endpoint.and_then(|ep| trace.outcomes.iter().find(|o| o.endpoint == ep));
    let ep_node = pod_hop.and_then(|i| hops[i].node.clone()).or_else(|| outcome.and_then(|o| o.node.clone()));
    let pod_name = outcome.and_then(|o| o.pod.clone()).or_else(|| {
        let action = &hops[pod_hop?].action;
        let name = action.strip_prefix("delivered to ")?.split(';').next()?.trim();
        (!name.is_empty() && name.parse::<IpAddr>().is_err()).then(|| name.to_string())
    });
    let cross = ep_node.as_deref().is_some_and(|n| n != trace.node);
    let from_node = hops.iter().find(|h| h.at != "dns").is_some_and(|h| h.at == "node")
        || matches!(&ctx.client, Some(ClientKind::Node { name }) if *name == trace.node);
    let hairpin = !from_node && endpoint.is_some_and(|ep| ep.ip == trace.packet.src);
    let cname = trace.dns.as_ref().and_then(|r| match &r.answer {
        Answer::Cname { target } => Some(target.clone()),
        _ => None,
    });
    let via_lb = destination == Some(DestinationKind::LoadBalancer) && !from_node;

    let client_id = if from_node { NODE } else { CLIENT };
    let pod_id = if hairpin { CLIENT } else { POD };
    let ep_node_id = if cross { HOST } else { NODE };
    let original = packet_text(trace.packet.src, trace.packet.src_port, trace.packet.dst, trace.packet.dst_port, proto);

    let mut b = Builder { messages: Vec::new(), notes: Vec::new() };
    let mut inbound: Option<usize> = None;
    let mut reply_packet: Option<String> = None;
    let mut balance_shown = false;
    let mut dns_shown = false;
    // The endpoints load balancing could pick (an endpoint may appear twice in the outcomes,
    // masqueraded on one branch and not on another).
    let mut choices: Vec<(SocketAddr, f64)> = Vec::new();
    for o in &trace.outcomes {
        match choices.iter_mut().find(|(ep, _)| *ep == o.endpoint) {
            Some((_, p)) => *p += o.probability,
            None => choices.push((o.endpoint, o.probability)),
        }
    }
    let balance = |b: &mut Builder, shown: &mut bool| {
        if *shown || choices.len() < 2 {
            return;
        }
        *shown = true;
        let options: Vec<String> = choices.iter().map(|(ep, p)| format!("{ep} {:.0}%", p * 100.0)).collect();
        let mut text = format!("load balancing over {}: {}", choices.len(), options.join(", "));
        if let Some(ep) = endpoint {
            let _ = write!(text, " (drawn: {ep})");
        }
        b.note(&[NODE], NoteKind::Balance, text);
    };

    // Consecutive steps of the kernel program in one hook become one note (or one each).
    let mut group: Vec<usize> = Vec::new();
    let flush = |b: &mut Builder, group: &mut Vec<usize>, shown: &mut bool| {
        let members = std::mem::take(group);
        let Some(&first) = members.first() else {
            return;
        };
        let over = if cross && hops[first].node.as_deref() == ep_node.as_deref() { HOST } else { NODE };
        let notes = if ctx.every_rule {
            members.iter().map(|&i| rule_note(hops, &[i], true)).collect()
        } else {
            vec![rule_note(hops, &members, false)]
        };
        for note in notes.into_iter().flatten() {
            let dnat = note.kind == NoteKind::Dnat || note.text.contains("dnat to");
            b.notes.push(Note { after: b.messages.len(), over: vec![over.to_string()], ..note });
            if dnat {
                balance(b, shown);
            }
        }
    };
    for (i, h) in hops.iter().enumerate() {
        if !is_program_hop(h) {
            flush(&mut b, &mut group, &mut balance_shown);
        }
        match h.at.as_str() {
            "dns" => {
                if dns_shown {
                    continue;
                }
                dns_shown = true;
                match &trace.dns {
                    Some(r) => {
                        let q = if trace.packet.src.is_ipv6() { "AAAA" } else { "A" };
                        b.msg(client_id, DNS, MessageKind::Dns, format!("{q}? {}", r.fqdn), None, Some(i));
                        let answer = match &r.answer {
                            Answer::ClusterIp { addresses } => format!("{q} {}", join(addresses)),
                            Answer::Headless { addresses } => {
                                format!("{q} {} (headless: the pods themselves)", join(addresses))
                            }
                            Answer::Cname { target } => format!("CNAME {target}"),
                        };
                        b.msg(DNS, client_id, MessageKind::Dns, answer, None, Some(i));
                        if let Answer::Cname { .. } = r.answer {
                            b.note(
                                &[DNS],
                                NoteKind::Dns,
                                format!("ExternalName {}: DNS only, no cluster IP, no proxy", r.service),
                            );
                        }
                    }
                    None => b.note(&[client_id], NoteKind::Dns, h.action.clone()).hops = vec![i],
                }
            }
            "node" | "arrival" => {
                let packet = h.packet.clone().unwrap_or_else(|| original.clone());
                if from_node {
                    let n = b.note(
                        &[NODE],
                        NoteKind::Info,
                        format!("{} (its own traffic starts at the output hook)", h.action),
                    );
                    n.packet = Some(packet);
                    n.hops = vec![i];
                } else if via_lb {
                    b.msg(CLIENT, LOAD_BALANCER, MessageKind::Request, packet.clone(), Some(packet.clone()), Some(i));
                    b.note(
                        &[LOAD_BALANCER],
                        NoteKind::Info,
                        format!("picks {}, the destination stays {} (ipMode VIP)", trace.node, trace.packet.dst),
                    );
                    inbound = Some(b.messages.len());
                    b.msg(LOAD_BALANCER, NODE, MessageKind::Request, packet.clone(), Some(packet), Some(i));
                } else {
                    inbound = Some(b.messages.len());
                    b.msg(CLIENT, NODE, MessageKind::Request, packet.clone(), Some(packet), Some(i));
                }
            }
            "pod network" => {
                balance(&mut b, &mut balance_shown);
                let packet = h.packet.clone();
                let text = packet.clone().unwrap_or_else(|| h.action.clone());
                b.msg(NODE, HOST, MessageKind::Request, text, packet, Some(i));
                b.note(&[NODE, HOST], NoteKind::Info, format!("pod network: {}", h.action)).hops = vec![i];
            }
            "pod" => {
                balance(&mut b, &mut balance_shown);
                let packet = h.packet.clone();
                let text = packet.clone().unwrap_or_else(|| h.action.clone());
                b.msg(ep_node_id, pod_id, MessageKind::Request, text, packet, Some(i));
                b.note(&[pod_id], NoteKind::Info, h.action.clone()).hops = vec![i];
            }
            "reply" => {
                let packet = h.packet.clone();
                let text = packet.clone().unwrap_or_else(|| h.action.clone());
                if cross {
                    b.msg(pod_id, HOST, MessageKind::Reply, text.clone(), packet.clone(), Some(i));
                    b.msg(HOST, NODE, MessageKind::Reply, text, packet, Some(i));
                } else {
                    b.msg(pod_id, NODE, MessageKind::Reply, text, packet, Some(i));
                }
            }
            "reply conntrack" => {
                let n = b.note(&[NODE], NoteKind::UnNat, h.action.clone());
                n.packet = h.packet.clone();
                n.hops = vec![i];
                reply_packet = h.packet.clone();
            }
            "client" => {
                let what = h.action.clone();
                match (trace.verdict, &cname) {
                    (_, Some(target)) => {
                        let to = format!("{target}:{}", trace.packet.dst_port);
                        b.msg(client_id, REMOTE, MessageKind::Request, to, None, Some(i));
                        b.note(&[client_id, REMOTE], NoteKind::Info, what).hops = vec![i];
                        b.msg(REMOTE, client_id, MessageKind::Reply, format!("reply from {target}"), None, Some(i));
                    }
                    (Verdict::Forward, None) if from_node => {
                        b.note(&[NODE], NoteKind::Info, format!("{what} (a process on {})", trace.node)).hops = vec![i];
                    }
                    (Verdict::Forward, None) => {
                        let packet = reply_packet.clone();
                        let text = packet.clone().unwrap_or_else(|| what.clone());
                        if via_lb {
                            b.msg(NODE, LOAD_BALANCER, MessageKind::Reply, text.clone(), packet.clone(), Some(i));
                            b.msg(LOAD_BALANCER, CLIENT, MessageKind::Reply, text, packet, Some(i));
                        } else {
                            b.msg(NODE, client_id, MessageKind::Reply, text, packet, Some(i));
                        }
                    }
                    (Verdict::Reject, None) if !from_node => {
                        b.msg(NODE, CLIENT, MessageKind::Refused, what, None, Some(i));
                    }
                    (Verdict::Drop, None) => {
                        if let Some(m) = inbound {
                            b.messages[m].kind = MessageKind::Dropped;
                        }
                        b.note(&[client_id], NoteKind::Drop, what).hops = vec![i];
                    }
                    (verdict, None) => {
                        let kind = if verdict == Verdict::Reject { NoteKind::Reject } else { NoteKind::Info };
                        b.note(&[client_id], kind, what).hops = vec![i];
                    }
                }
            }
            "input" => {
                b.msg(NODE, NODE, MessageKind::Local, h.action.clone(), None, Some(i));
                if !from_node && trace.verdict == Verdict::Accept {
                    let back = packet_text(
                        trace.packet.dst,
                        trace.packet.dst_port,
                        trace.packet.src,
                        trace.packet.src_port,
                        proto,
                    );
                    b.msg(NODE, CLIENT, MessageKind::Reply, back.clone(), Some(back), None);
                }
            }
            "routing" => {
                if h.action.contains("delivered to") || from_node {
                    b.msg(NODE, NODE, MessageKind::Local, h.action.clone(), None, Some(i));
                } else {
                    let packet = h.packet.clone().unwrap_or_else(|| original.clone());
                    b.msg(NODE, REMOTE, MessageKind::Request, packet.clone(), Some(packet), Some(i));
                    b.note(&[NODE], NoteKind::Info, h.action.clone()).hops = vec![i];
                }
            }
            _ => {
                let hook = |h: &Hop| (h.at.split_whitespace().next().unwrap_or("").to_string(), h.node.clone());
                if group.last().is_some_and(|&j| hook(&hops[j]) != hook(h)) {
                    flush(&mut b, &mut group, &mut balance_shown);
                }
                group.push(i);
                continue;
            }
        }
    }
    flush(&mut b, &mut group, &mut balance_shown);

    // Lifelines, in the textbook order, for those the steps use.
    let used = |id: &str| {
        b.messages.iter().any(|m| m.from == id || m.to == id) || b.notes.iter().any(|n| n.over.iter().any(|o| o == id))
    };
    let node_label = |name: &str| match ctx.node_ips.get(name) {
        Some(ip) => format!("{name} {ip}"),
        None => name.to_string(),
    };
    let src = trace.packet.src;
    let ep_text = endpoint.map(|e| e.to_string()).unwrap_or_default();
    let (client_kind, client_label) = if hairpin {
        let name = pod_name.clone().unwrap_or_else(|| "pod".into());
        (ParticipantKind::Pod, format!("{name} {ep_text} (client and endpoint)"))
    } else {
        match &ctx.client {
            Some(ClientKind::Pod { name: Some(n), .. }) => (ParticipantKind::Pod, format!("{n} {src}")),
            Some(ClientKind::Pod { name: None, node: Some(node) }) => {
                (ParticipantKind::Pod, format!("pod {src} on {node}"))
            }
            Some(ClientKind::Pod { .. }) => (ParticipantKind::Pod, format!("pod {src}")),
            Some(ClientKind::Node { name }) => (ParticipantKind::Node, node_label(name)),
            Some(ClientKind::External) | None => (ParticipantKind::Client, format!("client {src}")),
        }
    };
    let remote_label = match &cname {
        Some(t) => format!("{t} (outside the cluster)"),
        None => trace.packet.dst.to_string(),
    };
    let candidates: [(&str, ParticipantKind, String); 7] = [
        (CLIENT, client_kind, client_label.clone()),
        (DNS, ParticipantKind::Dns, "cluster DNS".into()),
        (LOAD_BALANCER, ParticipantKind::LoadBalancer, format!("load balancer {}", trace.packet.dst)),
        (NODE, ParticipantKind::Node, node_label(&trace.node)),
        (HOST, ParticipantKind::Node, ep_node.as_deref().map(node_label).unwrap_or_default()),
        (POD, ParticipantKind::Pod, format!("{} {ep_text}", pod_name.as_deref().unwrap_or("pod"))),
        (REMOTE, ParticipantKind::External, remote_label),
    ];
    let participants: Vec<Participant> = candidates
        .into_iter()
        .filter(|(id, ..)| used(id))
        .map(|(id, kind, label)| Participant { id: id.to_string(), kind, label })
        .collect();

    let to = match (&trace.dns, &cname) {
        (Some(r), Some(_)) => format!("{}:{}", r.name, trace.packet.dst_port),
        _ => SocketAddr { ip: trace.packet.dst, port: trace.packet.dst_port }.to_string(),
    };
    let what = destination.map(|d| format!("{} ", d.as_str())).unwrap_or_default();
    let service = ctx.service.as_ref().map(|s| format!(" ({s})")).unwrap_or_default();
    let sender = if from_node { node_label(&trace.node) } else { client_label };
    let title =
        format!("{sender} → {what}{to}{service} via {} ({}): {}", trace.node, trace.backend, trace.verdict.as_str());
    SequenceDiagram {
        title,
        node: trace.node.clone(),
        backend: trace.backend.clone(),
        verdict: trace.verdict,
        destination,
        client: client_id.to_string(),
        participants,
        messages: b.messages,
        notes: b.notes,
    }
}

fn join(ips: &[IpAddr]) -> String {
    ips.iter().map(|ip| ip.to_string()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly; `unwrap` is the point
mod tests {
    use super::*;
    use crate::dns::Resolution;
    use crate::model::Protocol;
    use crate::trace::{Outcome, Packet};

    /// The index finds what the scan finds: every sample packet of the demo on every node, and
    /// packets to every kind of frontend of a synthetic cluster.
    #[test]
    fn cluster_index_agrees_with_from_cluster() {
        let check = |c: &Cluster, traces: Vec<Trace>| {
            let ix = ClusterIndex::new(c);
            assert!(!traces.is_empty());
            for t in traces {
                assert_eq!(ix.context(&t), DiagramContext::from_cluster(c, &t), "{:?}", t.packet);
            }
        };
        let demo = crate::demo::cluster();
        let mut traces = Vec::new();
        for (_, _, from, to, protocol) in crate::demo::sample_packets() {
            for node in demo.nodes.keys() {
                let req = crate::TraceRequest {
                    node: node.clone(),
                    backend: crate::policy::Backend::Nftables,
                    program: None,
                    from,
                    to: to.parse().unwrap(),
                    protocol,
                    seed: 3,
                };
                traces.extend(crate::trace(&demo, &req).ok());
            }
        }
        check(&demo, traces);
        let synthetic = crate::synthetic::cluster(40, 3);
        let mut traces = Vec::new();
        let sources: Vec<IpAddr> =
            ["10.1.0.7", "192.168.0.1", "198.51.100.9"].iter().map(|a| a.parse().unwrap()).collect();
        for s in synthetic.services.values() {
            let mut dsts: Vec<(IpAddr, u16)> = s.cluster_ips.iter().map(|ip| (*ip, s.ports[0].port)).collect();
            dsts.extend(s.load_balancer_ips().map(|ip| (ip, s.ports[0].port)));
            dsts.extend(s.ports.iter().filter_map(|p| p.node_port).map(|np| ("192.168.0.2".parse().unwrap(), np)));
            dsts.extend(s.health_check_node_port.map(|h| ("192.168.0.3".parse().unwrap(), h)));
            for (dst, dst_port) in dsts {
                for src in &sources {
                    let packet = Packet { src: *src, src_port: 40_000, dst, dst_port, protocol: Protocol::Tcp };
                    traces.push(Trace {
                        verdict: Verdict::NoMatch,
                        outcomes: vec![],
                        hops: vec![],
                        packet,
                        node: "node-a".into(),
                        backend: "nftables".into(),
                        dns: None,
                    });
                }
            }
        }
        check(&synthetic, traces);
    }

    /// Every endpoint the tracer predicts for nginx-svc can be drawn as the observed path, and
    /// `explain` agrees exactly with the outcomes: the right endpoint with the wrong masquerade
    /// disagrees, except for the node's own traffic, whose masquerade to its own address hides.
    #[test]
    fn explain_draws_the_observed_endpoint_and_checks_it() {
        let c = crate::demo::cluster();
        let program = crate::render(&c, "node-1", crate::policy::Backend::Nftables).unwrap();
        let tracer = crate::Tracer::new(&c, "node-1", crate::policy::Backend::Nftables, &program).unwrap();
        let pod: IpAddr = crate::demo::CLIENT_POD_NODE_1;
        let packet = |src: IpAddr| Packet {
            src,
            src_port: 41_000,
            dst: "10.96.0.10".parse().unwrap(),
            dst_port: 80,
            protocol: Protocol::Tcp,
        };
        let outcomes = tracer.trace(packet(pod), 1).outcomes;
        assert!(outcomes.len() > 1, "{outcomes:?}");
        for o in &outcomes {
            let t = tracer.trace_towards(packet(pod), Some(o.endpoint), 1, 64);
            assert_eq!(sampled_endpoint(&t), Some(o.endpoint));
            let seen = Observed { endpoint: o.endpoint, masquerade: o.masquerade };
            let f = explain(&c, t.clone(), Some(seen));
            assert_eq!((f.endpoint, f.masquerade, f.agrees), (Some(o.endpoint), Some(o.masquerade), Some(true)));
            assert_eq!(
                (f.src.port, f.dst.port, f.service.as_ref().map(|s| s.name.as_str())),
                (41_000, 80, Some("nginx-svc"))
            );
            let flipped = Observed { masquerade: !o.masquerade, ..seen };
            assert_eq!(explain(&c, t, Some(flipped)).agrees, Some(false));
        }
        let node_ip = c.nodes["node-1"].ips()[0];
        let t = tracer.trace(packet(node_ip), 1);
        let o = t.outcomes.iter().find(|o| o.masquerade).expect("the node's own traffic is masqueraded");
        let seen = Observed { endpoint: o.endpoint, masquerade: false };
        assert_eq!(explain(&c, t, Some(seen)).agrees, Some(true));
    }

    fn hop(at: &str, action: &str, node: Option<&str>, packet: Option<&str>) -> Hop {
        Hop { node: node.map(str::to_string), packet: packet.map(str::to_string), ..Hop::new(at, action) }
    }

    fn rule(at: &str, action: &str, node: &str, rule: &str, comment: &str, packet: Option<&str>) -> Hop {
        Hop {
            chain: Some("services".into()),
            rule: Some(rule.into()),
            comment: Some(comment.into()),
            ..hop(at, action, Some(node), packet)
        }
    }

    /// A step as the nftables tracer records it: hook and table, chain, rule, optional comment.
    fn step(at: &str, chain: &str, action: &str, rule: &str, comment: Option<&str>, packet: Option<&str>) -> Hop {
        Hop {
            chain: Some(chain.into()),
            rule: Some(rule.into()),
            comment: comment.map(str::to_string),
            ..hop(at, action, Some("node-3"), packet)
        }
    }

    fn outcome(ep: &str, p: f64, masquerade: bool, node: &str, pod: &str) -> Outcome {
        Outcome {
            endpoint: ep.parse().unwrap(),
            probability: p,
            masquerade,
            node: Some(node.into()),
            pod: Some(pod.into()),
        }
    }

    fn trace(verdict: Verdict, node: &str, src: &str, dst: &str, hops: Vec<Hop>, outcomes: Vec<Outcome>) -> Trace {
        let dst: SocketAddr = dst.parse().unwrap();
        Trace {
            verdict,
            outcomes,
            hops,
            packet: Packet {
                src: src.parse().unwrap(),
                src_port: 40000,
                dst: dst.ip,
                dst_port: dst.port,
                protocol: Protocol::Tcp,
            },
            node: node.into(),
            backend: "nftables".into(),
            dns: None,
        }
    }

    fn ids(d: &SequenceDiagram) -> Vec<&str> {
        d.participants.iter().map(|p| p.id.as_str()).collect()
    }

    fn arrows(d: &SequenceDiagram) -> Vec<String> {
        d.messages.iter().map(|m| format!("{}>{}", m.from, m.to)).collect()
    }

    fn kinds(d: &SequenceDiagram) -> Vec<NoteKind> {
        d.notes.iter().map(|n| n.kind).collect()
    }

    /// A pod on node-1 to nginx-svc's cluster IP, load-balanced to the pod on the same node.
    fn cluster_ip_same_node() -> Trace {
        trace(
            Verdict::Forward,
            "node-1",
            "10.244.1.50",
            "10.96.0.10:80",
            vec![
                hop("arrival", "arrives at node-1", Some("node-1"), Some("10.244.1.50:40000 → 10.96.0.10:80 tcp")),
                rule(
                    "prerouting nat",
                    "dnat to 10.244.1.10:8080",
                    "node-1",
                    "ip daddr . meta l4proto . th dport vmap @service-ips",
                    "default/nginx-svc:http clusterIP",
                    Some("10.244.1.50:40000 → 10.244.1.10:8080 tcp"),
                ),
                hop(
                    "pod",
                    "delivered to nginx-7d4b9c-abcde; it sees source 10.244.1.50",
                    Some("node-1"),
                    Some("10.244.1.50:40000 → 10.244.1.10:8080 tcp"),
                ),
                hop(
                    "reply",
                    "nginx-7d4b9c-abcde replies",
                    Some("node-1"),
                    Some("10.244.1.10:8080 → 10.244.1.50:40000 tcp"),
                ),
                hop(
                    "reply conntrack",
                    "conntrack reverses the DNAT: source back to 10.96.0.10:80",
                    Some("node-1"),
                    Some("10.96.0.10:80 → 10.244.1.50:40000 tcp"),
                ),
                hop("client", "10.244.1.50 receives the reply", None, None),
            ],
            vec![
                outcome("10.244.1.10:8080", 0.5, false, "node-1", "nginx-7d4b9c-abcde"),
                outcome("10.244.2.15:8080", 0.5, false, "node-2", "nginx-7d4b9c-fghij"),
            ],
        )
    }

    /// From outside to node-3's NodePort; node-3 has no nginx pod, so the packet crosses to node-2.
    fn node_port_cross_node() -> Trace {
        trace(
            Verdict::Forward,
            "node-3",
            "198.51.100.23",
            "192.168.1.13:30080",
            vec![
                hop(
                    "arrival",
                    "arrives at node-3",
                    Some("node-3"),
                    Some("198.51.100.23:40000 → 192.168.1.13:30080 tcp"),
                ),
                step(
                    "prerouting filter",
                    "filter-prerouting",
                    "jump firewall-check",
                    "ct state new jump firewall-check",
                    None,
                    None,
                ),
                step("prerouting nat", "nat-prerouting", "jump services", "jump services", None, None),
                step(
                    "prerouting switchyard",
                    "services",
                    "@service-nodeports: tcp . 30080 → goto nodeport",
                    "ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
                    Some("default/nginx-svc:http nodePort"),
                    None,
                ),
                step(
                    "prerouting switchyard",
                    "nodeport",
                    "jump mark-for-masquerade",
                    "jump mark-for-masquerade comment \"externalTrafficPolicy=Cluster\"",
                    Some("externalTrafficPolicy=Cluster"),
                    None,
                ),
                step(
                    "prerouting switchyard",
                    "mark-for-masquerade",
                    "mark for masquerade",
                    "meta mark set meta mark | 0x00004000",
                    None,
                    None,
                ),
                step(
                    "prerouting switchyard",
                    "nodeport",
                    "@lb-nodeports: tcp . 30080 → goto lb-nodeport-2",
                    "meta l4proto . th dport vmap @lb-nodeports",
                    Some("default/nginx-svc:http nodePort"),
                    None,
                ),
                step(
                    "prerouting switchyard",
                    "lb-nodeport-2",
                    "@endpoints-nodeports: tcp . 30080 . 1 → dnat to 10.244.2.15:8080",
                    "meta l4proto tcp dnat ip to meta l4proto . th dport . numgen random mod 2 map @endpoints-nodeports",
                    Some("default/nginx-svc:http nginx-7d4b9c-fghij"),
                    Some("198.51.100.23:40000 → 10.244.2.15:8080 tcp"),
                ),
                step(
                    "forward filter",
                    "filter-forward",
                    "jump service-endpoints-check",
                    "ct state new jump service-endpoints-check",
                    None,
                    None,
                ),
                step("postrouting nat", "nat-postrouting", "jump masquerading", "jump masquerading", None, None),
                step(
                    "postrouting switchyard",
                    "masquerading",
                    "masquerade: source becomes this node's address",
                    "masquerade fully-random",
                    None,
                    Some("192.168.1.13:40000 → 10.244.2.15:8080 tcp"),
                ),
                hop(
                    "pod network",
                    "routed from node-3 to node-2",
                    Some("node-3"),
                    Some("192.168.1.13:40000 → 10.244.2.15:8080 tcp"),
                ),
                hop(
                    "pod",
                    "delivered to nginx-7d4b9c-fghij; it sees source 192.168.1.13",
                    Some("node-2"),
                    Some("192.168.1.13:40000 → 10.244.2.15:8080 tcp"),
                ),
                hop(
                    "reply",
                    "nginx-7d4b9c-fghij replies",
                    Some("node-2"),
                    Some("10.244.2.15:8080 → 192.168.1.13:40000 tcp"),
                ),
                hop(
                    "reply conntrack",
                    "conntrack reverses the DNAT: source back to 192.168.1.13:30080, and the masquerade: destination back to 198.51.100.23",
                    Some("node-3"),
                    Some("192.168.1.13:30080 → 198.51.100.23:40000 tcp"),
                ),
                hop("client", "198.51.100.23 receives the reply", None, None),
            ],
            vec![
                outcome("10.244.1.10:8080", 0.5, true, "node-1", "nginx-7d4b9c-abcde"),
                outcome("10.244.2.15:8080", 0.5, true, "node-2", "nginx-7d4b9c-fghij"),
            ],
        )
    }

    /// ClusterIP to an endpoint on the same node: client, node, pod; the reply retraces the path.
    #[test]
    fn cluster_ip_same_node_draws_client_node_pod() {
        let d = diagram(&cluster_ip_same_node(), &DiagramContext::default());
        assert_eq!(ids(&d), ["client", "node", "pod"]);
        assert_eq!(arrows(&d), ["client>node", "node>pod", "pod>node", "node>client"]);
        let k: Vec<MessageKind> = d.messages.iter().map(|m| m.kind).collect();
        assert_eq!(k, [MessageKind::Request, MessageKind::Request, MessageKind::Reply, MessageKind::Reply]);
        assert_eq!(kinds(&d), [NoteKind::Dnat, NoteKind::Balance, NoteKind::Info, NoteKind::UnNat]);
        assert_eq!(d.destination, Some(DestinationKind::ClusterIp));
        assert_eq!(d.participant("pod").unwrap().label, "nginx-7d4b9c-abcde 10.244.1.10:8080");
        // The DNAT note sits after the packet reaches the node and before it leaves for the pod.
        assert_eq!(d.notes[0].after, 1);
        assert_eq!(d.notes[0].comment.as_deref(), Some("default/nginx-svc:http clusterIP"));
        assert!(d.notes[1].text.contains("10.244.1.10:8080 50%, 10.244.2.15:8080 50%"));
        assert_eq!(d.messages[3].text, "10.96.0.10:80 → 10.244.1.50:40000 tcp", "the client sees the service reply");
    }

    /// NodePort to a node without an endpoint: the packet crosses the pod network and back.
    #[test]
    fn node_port_cross_node_draws_both_nodes() {
        let d = diagram(&node_port_cross_node(), &DiagramContext::default());
        assert_eq!(ids(&d), ["client", "node", "host", "pod"]);
        assert_eq!(arrows(&d), ["client>node", "node>host", "host>pod", "pod>host", "host>node", "node>client"]);
        // One note per hook that did something: prerouting (DNAT and the masquerade mark) and
        // postrouting (masquerade); the forward hook only jumped through and is left out.
        assert_eq!(
            kinds(&d),
            [NoteKind::Dnat, NoteKind::Balance, NoteKind::Snat, NoteKind::Info, NoteKind::Info, NoteKind::UnNat]
        );
        assert_eq!(d.notes[0].text, "mark for masquerade, then dnat to 10.244.2.15:8080");
        assert_eq!(
            d.notes[0].chain.as_deref(),
            Some(
                "filter-prerouting → nat-prerouting → services → nodeport → mark-for-masquerade → nodeport → lb-nodeport-2"
            )
        );
        assert_eq!(d.notes[0].comment.as_deref(), Some("default/nginx-svc:http nodePort"));
        assert_eq!(d.notes[0].hops, [1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(d.notes[2].hops, [9, 10]);

        // Every rule on its own when asked.
        let every = DiagramContext { every_rule: true, ..Default::default() };
        let d = diagram(&node_port_cross_node(), &every);
        let rules = d.notes.iter().filter(|n| n.at.is_some()).count();
        assert_eq!(rules, 10);
        assert_eq!(d.destination, Some(DestinationKind::NodePort));
        assert_eq!(d.participant("client").unwrap().kind, ParticipantKind::Client);
        assert_eq!(d.participant("host").unwrap().label, "node-2");
        assert_eq!(d.messages[1].text, "192.168.1.13:40000 → 10.244.2.15:8080 tcp", "masqueraded on the wire");
    }

    /// The full Mermaid text of the NodePort picture.
    #[test]
    fn node_port_mermaid_text() {
        let t = node_port_cross_node();
        let mut ctx = DiagramContext::default();
        ctx.node_ips.insert("node-2".into(), "192.168.1.12".parse().unwrap());
        ctx.node_ips.insert("node-3".into(), "192.168.1.13".parse().unwrap());
        let expected = "sequenceDiagram
    %% client 198.51.100.23 → NodePort 192.168.1.13:30080 via node-3 (nftables): forward
    autonumber
    actor client as client 198.51.100.23
    participant node as node-3 192.168.1.13
    participant host as node-2 192.168.1.12
    participant pod as nginx-7d4b9c-fghij 10.244.2.15:8080
    client->>node: 198.51.100.23:40000 → 192.168.1.13:30080 tcp
    Note over node: prerouting: mark for masquerade, then dnat to 10.244.2.15:8080<br/>chains: filter-prerouting → nat-prerouting → services → nodeport → mark-for-masquerade → nodeport → lb-nodeport-2<br/>rule: meta l4proto tcp dnat ip to meta l4proto . th dport . numgen random mod 2 map @endpoints-nodeports<br/>comment: default/nginx-svc:http nodePort<br/>packet: 198.51.100.23:40000 → 10.244.2.15:8080 tcp
    Note over node: load balancing over 2: 10.244.1.10:8080 50%, 10.244.2.15:8080 50% (drawn: 10.244.2.15:8080)
    Note over node: postrouting: masquerade: source becomes this node's address<br/>chains: nat-postrouting → masquerading<br/>rule: masquerade fully-random<br/>packet: 192.168.1.13:40000 → 10.244.2.15:8080 tcp
    node->>host: 192.168.1.13:40000 → 10.244.2.15:8080 tcp
    Note over node,host: pod network: routed from node-3 to node-2
    host->>pod: 192.168.1.13:40000 → 10.244.2.15:8080 tcp
    Note over pod: delivered to nginx-7d4b9c-fghij#59; it sees source 192.168.1.13
    pod-->>host: 10.244.2.15:8080 → 192.168.1.13:40000 tcp
    host-->>node: 10.244.2.15:8080 → 192.168.1.13:40000 tcp
    Note over node: conntrack reverses the DNAT: source back to 192.168.1.13:30080, and the masquerade: destination back to 198.51.100.23<br/>packet: 192.168.1.13:30080 → 198.51.100.23:40000 tcp
    node-->>client: 192.168.1.13:30080 → 198.51.100.23:40000 tcp
";
        let got = diagram(&t, &ctx).to_mermaid();
        assert_eq!(got, expected);
        assert_eq!(mermaid(&t).lines().count(), expected.lines().count());
    }

    /// A LoadBalancer destination adds the cloud load balancer on the way in and out.
    #[test]
    fn load_balancer_adds_the_lb_lifeline() {
        let mut t = cluster_ip_same_node();
        t.packet.src = "198.51.100.23".parse().unwrap();
        t.packet.dst = "34.101.12.7".parse().unwrap();
        t.hops[0].packet = Some("198.51.100.23:40000 → 34.101.12.7:80 tcp".into());
        t.hops[1].comment = Some("default/nginx-svc:http loadBalancer ingress".into());
        let d = diagram(&t, &DiagramContext::default());
        assert_eq!(d.destination, Some(DestinationKind::LoadBalancer));
        assert_eq!(ids(&d), ["client", "lb", "node", "pod"]);
        assert_eq!(arrows(&d), ["client>lb", "lb>node", "node>pod", "pod>node", "node>lb", "lb>client"]);
        assert_eq!(d.participant("lb").unwrap().label, "load balancer 34.101.12.7");

        // The context wins over the comments.
        let ctx = DiagramContext { destination: Some(DestinationKind::ClusterIp), ..Default::default() };
        assert_eq!(ids(&diagram(&t, &ctx)), ["client", "node", "pod"]);
    }

    /// Hairpin: the client is the endpoint, so one lifeline sends and receives.
    #[test]
    fn hairpin_uses_one_lifeline_for_client_and_pod() {
        let t = trace(
            Verdict::Forward,
            "node-3",
            "10.244.3.20",
            "10.96.0.20:80",
            vec![
                hop("arrival", "arrives at node-3", Some("node-3"), Some("10.244.3.20:40000 → 10.96.0.20:80 tcp")),
                rule(
                    "prerouting nat",
                    "dnat to 10.244.3.20:5678",
                    "node-3",
                    "vmap",
                    "default/echo:http clusterIP",
                    None,
                ),
                rule("postrouting nat", "mark for masquerade", "node-3", "ct status dnat ...", "hairpin", None),
                rule("postrouting nat", "masquerade to 192.168.1.13", "node-3", "masquerade", "masquerade", None),
                hop(
                    "pod",
                    "delivered to echo-5f6d8-xk2lp; it sees source 192.168.1.13",
                    Some("node-3"),
                    Some("192.168.1.13:40000 → 10.244.3.20:5678 tcp"),
                ),
                hop(
                    "reply",
                    "echo-5f6d8-xk2lp replies",
                    Some("node-3"),
                    Some("10.244.3.20:5678 → 192.168.1.13:40000 tcp"),
                ),
                hop(
                    "reply conntrack",
                    "conntrack reverses the DNAT",
                    Some("node-3"),
                    Some("10.96.0.20:80 → 10.244.3.20:40000 tcp"),
                ),
                hop("client", "10.244.3.20 receives the reply", None, None),
            ],
            vec![outcome("10.244.3.20:5678", 1.0, true, "node-3", "echo-5f6d8-xk2lp")],
        );
        let d = diagram(&t, &DiagramContext::default());
        assert_eq!(ids(&d), ["client", "node"]);
        assert_eq!(arrows(&d), ["client>node", "node>client", "client>node", "node>client"]);
        let client = d.participant("client").unwrap();
        assert_eq!(client.kind, ParticipantKind::Pod);
        assert_eq!(client.label, "echo-5f6d8-xk2lp 10.244.3.20:5678 (client and endpoint)");
        assert!(kinds(&d).contains(&NoteKind::Snat));
        assert!(!kinds(&d).contains(&NoteKind::Balance), "one endpoint: nothing to choose");
    }

    /// No endpoints: the node answers for the service and the client is refused.
    #[test]
    fn reject_is_a_refusal_from_the_node() {
        let t = trace(
            Verdict::Reject,
            "node-1",
            "10.244.1.50",
            "10.96.0.40:80",
            vec![
                hop("arrival", "arrives at node-1", Some("node-1"), Some("10.244.1.50:40000 → 10.96.0.40:80 tcp")),
                rule(
                    "input filter",
                    "reject",
                    "node-1",
                    "goto reject-chain",
                    "default/legacy-api:http clusterIP: no endpoints",
                    None,
                ),
                hop("client", "connection refused (ICMP port unreachable or TCP reset)", None, None),
            ],
            vec![],
        );
        let d = diagram(&t, &DiagramContext::default());
        assert_eq!(ids(&d), ["client", "node"]);
        assert_eq!(arrows(&d), ["client>node", "node>client"]);
        assert_eq!(d.messages[1].kind, MessageKind::Refused);
        assert_eq!(kinds(&d), [NoteKind::Reject]);
        assert!(d.to_mermaid().contains("node--xclient: connection refused"));
    }

    /// A drop ends the request at the node with a cross, and nothing comes back.
    #[test]
    fn drop_ends_at_the_node() {
        let t = trace(
            Verdict::Drop,
            "node-2",
            "198.51.100.23",
            "34.101.12.9:443",
            vec![
                hop("arrival", "arrives at node-2", Some("node-2"), None),
                rule(
                    "prerouting filter",
                    "drop",
                    "node-2",
                    "... @firewall-allowed drop",
                    "loadBalancerSourceRanges",
                    None,
                ),
                hop("client", "no answer: the packet was dropped", None, None),
            ],
            vec![],
        );
        let ctx = DiagramContext { destination: Some(DestinationKind::LoadBalancer), ..Default::default() };
        let d = diagram(&t, &ctx);
        assert_eq!(ids(&d), ["client", "lb", "node"]);
        assert_eq!(arrows(&d), ["client>lb", "lb>node"]);
        assert_eq!(d.messages[1].kind, MessageKind::Dropped);
        assert_eq!(kinds(&d), [NoteKind::Info, NoteKind::Drop, NoteKind::Drop]);
        assert_eq!(d.notes[2].over, ["client"]);
        assert!(d.to_mermaid().contains("lb-xnode: "));
    }

    /// ExternalName: DNS answers with a CNAME and the client goes straight out; no node, no NAT.
    #[test]
    fn external_name_is_dns_then_straight_out() {
        let mut t = trace(
            Verdict::NoMatch,
            "node-1",
            "10.244.1.50",
            "0.0.0.0:5432",
            vec![
                hop("dns", "my-db.default.svc.cluster.local is a CNAME to db.example.com", None, None),
                hop("client", "connects to db.example.com:5432 directly; the proxy is not involved", None, None),
            ],
            vec![],
        );
        t.dns = Some(Resolution {
            name: "my-db.default.svc.cluster.local".into(),
            fqdn: "my-db.default.svc.cluster.local".into(),
            service: ObjectKey::new("default", "my-db"),
            answer: Answer::Cname { target: "db.example.com".into() },
        });
        let d = diagram(&t, &DiagramContext::default());
        assert_eq!(d.destination, Some(DestinationKind::ExternalName));
        assert_eq!(ids(&d), ["client", "dns", "remote"]);
        assert_eq!(arrows(&d), ["client>dns", "dns>client", "client>remote", "remote>client"]);
        assert_eq!(d.messages[1].text, "CNAME db.example.com");
        assert_eq!(d.messages[2].text, "db.example.com:5432");
        assert_eq!(d.participant("remote").unwrap().label, "db.example.com (outside the cluster)");
        assert!(d.title.contains("ExternalName my-db.default.svc.cluster.local:5432"));
    }

    /// A flow that starts from a Service name draws the lookup first.
    #[test]
    fn name_lookup_comes_first() {
        let mut t = cluster_ip_same_node();
        t.hops.insert(0, hop("dns", "nginx-svc.default.svc.cluster.local → 10.96.0.10", None, None));
        t.dns = Some(Resolution {
            name: "nginx-svc".into(),
            fqdn: "nginx-svc.default.svc.cluster.local".into(),
            service: ObjectKey::new("default", "nginx-svc"),
            answer: Answer::ClusterIp { addresses: vec!["10.96.0.10".parse().unwrap()] },
        });
        let d = diagram(&t, &DiagramContext::default());
        assert_eq!(ids(&d), ["client", "dns", "node", "pod"]);
        assert_eq!(&arrows(&d)[..3], ["client>dns", "dns>client", "client>node"]);
        assert_eq!(d.messages[0].text, "A? nginx-svc.default.svc.cluster.local");
        assert_eq!(d.messages[1].text, "A 10.96.0.10");
        assert_eq!(d.notes[0].after, 3, "hook notes follow the packet, not the lookup");
    }

    /// The node's own traffic: the node is the sender, and the reply ends there.
    #[test]
    fn node_itself_is_the_client() {
        let mut t = node_port_cross_node();
        t.node = "node-3".into();
        t.packet.src = "192.168.1.13".parse().unwrap();
        t.hops[0] =
            hop("node", "sent by node-3 itself", Some("node-3"), Some("192.168.1.13:40000 → 10.96.0.10:80 tcp"));
        for h in &mut t.hops[1..8] {
            h.at = h.at.replace("prerouting", "output");
        }
        t.hops[3].comment = Some("default/nginx-svc:http clusterIP".into());
        let d = diagram(&t, &DiagramContext::default());
        assert_eq!(d.client, "node");
        assert_eq!(ids(&d), ["node", "host", "pod"]);
        assert_eq!(arrows(&d), ["node>host", "host>pod", "pod>host", "host>node"]);
        assert_eq!(d.notes[0].kind, NoteKind::Info);
        assert_eq!(d.notes.last().unwrap().over, ["node"]);
    }

    /// An accepted packet (a health check) is delivered to the node and answered by it.
    #[test]
    fn accept_is_delivered_to_the_node() {
        let t = trace(
            Verdict::Accept,
            "node-2",
            "35.191.10.1",
            "192.168.1.12:32080",
            vec![
                hop("arrival", "arrives at node-2", Some("node-2"), None),
                rule(
                    "input filter",
                    "accept",
                    "node-2",
                    "th dport @health-check-ports accept",
                    "healthCheckNodePort",
                    None,
                ),
                hop("input", "delivered to a process on node-2", Some("node-2"), None),
            ],
            vec![],
        );
        let d = diagram(&t, &DiagramContext::default());
        assert_eq!(d.destination, Some(DestinationKind::HealthCheckNodePort));
        assert_eq!(arrows(&d), ["client>node", "node>node", "node>client"]);
        assert_eq!(d.messages[1].kind, MessageKind::Local);
    }

    /// Cluster data cannot inject Mermaid syntax: `;` and `#` end statements, `<...>` is markup.
    #[test]
    fn mermaid_escapes_cluster_data() {
        let mut t = cluster_ip_same_node();
        let evil = "evil;pod#1<script>alert(1)</script>\nparticipant x%%{init}";
        t.outcomes[0].pod = Some(evil.into());
        t.hops[1].comment = Some(format!("default/{evil}"));
        t.node = "node-1;\nclient->>x: hi".into();
        let text = mermaid(&t);
        let d = diagram(&t, &DiagramContext::default());
        let expected_lines = 3 + d.participants.len() + d.messages.len() + d.notes.len();
        assert_eq!(text.lines().count(), expected_lines);
        for line in text.lines() {
            let mut rest = line.to_string();
            // Remove our own entity codes, then nothing that ends a statement may be left.
            while let Some(start) = rest.find('#') {
                let end = rest[start..].find(';').map(|e| start + e).unwrap();
                assert!(rest[start + 1..end].chars().all(|c| c.is_ascii_digit()), "{line}");
                rest.replace_range(start..=end, "");
            }
            assert!(!rest.contains(';'), "{line}");
            assert!(!rest.contains('<') || rest.contains("<br/>"), "{line}");
            assert!(!rest.replace("<br/>", "").contains('<'), "{line}");
            assert!(!rest.contains("%%") || line.trim_start().starts_with("%%"), "{line}");
        }
        assert!(text.contains("participant pod as evil#59;pod#35;1#60;script#62;"));
    }

    /// The diagram round-trips through JSON in camelCase, as the dashboard receives it.
    #[test]
    fn serde_camel_case() {
        let d = diagram(&node_port_cross_node(), &DiagramContext::default());
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["verdict"], "forward");
        assert_eq!(json["destination"], "nodePort");
        assert_eq!(json["participants"][2]["kind"], "node");
        assert_eq!(json["notes"][0]["kind"], "dnat");
        assert!(json["notes"][0].get("after").is_some());
        let back: SequenceDiagram = serde_json::from_value(json).unwrap();
        assert_eq!(back, d);
    }

    /// The layout has one column per participant and rows top to bottom, one per step.
    #[test]
    fn layout_rows_follow_the_steps() {
        let d = diagram(&node_port_cross_node(), &DiagramContext::default());
        let l = d.layout(&LayoutOptions::default());
        assert_eq!(l.columns.len(), d.participants.len());
        assert_eq!(l.rows.len(), d.messages.len() + d.notes.len());
        assert!(l.rows.windows(2).all(|w| w[1].y >= w[0].y + w[0].height));
        assert!(l.height > l.rows.last().unwrap().y);
        let RowItem::Message { x1, x2, .. } = l.rows[0].item else { panic!("first row is the packet") };
        assert!(x1 < x2, "the client is left of the node");
        let steps = d.steps();
        assert!(matches!(steps[0], Step::Message(0, _)));
        assert!(matches!(steps[1], Step::Note(0, _)));
    }

    /// The context from the demo cluster places the client and names the destination.
    #[test]
    fn context_from_the_demo_cluster() {
        let c = crate::demo::cluster();
        let at = |src: &str, dst: &str| {
            let t = trace(Verdict::Forward, "node-3", src, dst, vec![], vec![]);
            DiagramContext::from_cluster(&c, &t)
        };
        let lb = at("198.51.100.23", "34.101.12.7:80");
        assert_eq!(lb.destination, Some(DestinationKind::LoadBalancer));
        assert_eq!(lb.service, Some(ObjectKey::new("default", "nginx-svc")));
        assert_eq!(lb.client, Some(ClientKind::External));
        assert_eq!(lb.node_ips.get("node-3"), Some(&"192.168.1.13".parse().unwrap()));
        let np = at("198.51.100.23", "192.168.1.13:30080");
        assert_eq!(np.destination, Some(DestinationKind::NodePort));
        let hc = at("35.191.10.1", "192.168.1.12:32080");
        assert_eq!(hc.destination, Some(DestinationKind::HealthCheckNodePort));
        assert_eq!(hc.service, Some(ObjectKey::new("default", "ingress")));
        let hairpin = at("10.244.3.20", "10.96.0.20:80");
        assert_eq!(hairpin.destination, Some(DestinationKind::ClusterIp));
        assert_eq!(
            hairpin.client,
            Some(ClientKind::Pod { name: Some("echo-5f6d8-xk2lp".into()), node: Some("node-3".into()) })
        );
        let pod = at("10.244.1.50", "10.96.0.10:80");
        assert_eq!(pod.client, Some(ClientKind::Pod { name: None, node: Some("node-1".into()) }));
        assert_eq!(at("192.168.1.12", "10.96.0.10:80").client, Some(ClientKind::Node { name: "node-2".into() }));

        // With the context, the labels name pods and node addresses.
        let t = node_port_cross_node();
        let d = diagram(&t, &DiagramContext::from_cluster(&c, &t));
        assert_eq!(d.participant("node").unwrap().label, "node-3 192.168.1.13");
        assert!(d.title.contains("(default/nginx-svc)"), "{}", d.title);
    }
    /// Jumps and map lookups that only lead to another chain are not translations.
    #[test]
    fn classify_reads_the_verdict_not_the_chain_name() {
        let k = |action: &str| classify(&Hop::new("prerouting nat", action));
        assert_eq!(k("jump mark-for-masquerade"), NoteKind::Hook);
        assert_eq!(k("jump to SWITCHYARD-SEP-B7YXFMA2Y34ZA (probability 0.5000)"), NoteKind::Hook);
        assert_eq!(k("@no-endpoint-services: 10.96.0.40 . tcp . 80 → goto reject-chain"), NoteKind::Hook);
        assert_eq!(k("@no-endpoint-services: 10.96.0.54 . udp . 53 → drop"), NoteKind::Drop);
        assert_eq!(k("@endpoints-ips: 10.96.0.10 . tcp . 80 . 0 → dnat to 10.244.1.10:8080"), NoteKind::Dnat);
        assert_eq!(k("mark for masquerade"), NoteKind::Mark);
        assert_eq!(k("set mark bits 0x4000"), NoteKind::Mark);
        assert_eq!(k("masquerade: source becomes this node's address"), NoteKind::Snat);
        assert_eq!(k("reject (icmp-port-unreachable)"), NoteKind::Reject);
        assert_eq!(k("accept"), NoteKind::Accept);
    }

    /// The demo's textbook flows, traced for real on both backends, draw the textbook pictures.
    #[test]
    fn demo_flows_draw_the_textbook_pictures() {
        use crate::policy::Backend;
        let c = crate::demo::cluster();
        for backend in [Backend::Nftables, Backend::Iptables] {
            let draw = |title_start: &str| {
                let (title, node, from, to, protocol) =
                    crate::demo::sample_packets().into_iter().find(|s| s.0.starts_with(title_start)).unwrap();
                let req = crate::TraceRequest {
                    node: node.into(),
                    backend,
                    program: None,
                    from,
                    to: to.parse().unwrap(),
                    protocol,
                    seed: 7,
                };
                let t = crate::trace(&c, &req).unwrap_or_else(|e| panic!("{title} ({backend:?}): {e}"));
                let d = diagram(&t, &DiagramContext::from_cluster(&c, &t));
                let text = d.to_mermaid();
                assert!(text.starts_with("sequenceDiagram\n"), "{text}");
                d
            };
            let np = draw("NodePort from outside");
            assert_eq!(ids(&np), ["client", "node", "host", "pod"], "{backend:?}");
            assert_eq!(np.messages.first().map(|m| m.from.as_str()), Some("client"));
            assert_eq!(np.messages.last().map(|m| m.to.as_str()), Some("client"));
            assert!(kinds(&np).contains(&NoteKind::Dnat) && kinds(&np).contains(&NoteKind::Snat), "{backend:?}");

            let lb = draw("LoadBalancer");
            assert_eq!(ids(&lb)[..3], ["client", "lb", "node"], "{backend:?}");

            let hairpin = draw("Hairpin");
            assert_eq!(ids(&hairpin), ["client", "node"], "{backend:?}");
            assert_eq!(hairpin.participants[0].kind, ParticipantKind::Pod);

            let external = draw("ExternalName");
            assert_eq!(ids(&external), ["client", "dns", "remote"], "{backend:?}");

            let reject = draw("No endpoints");
            assert_eq!(reject.messages.last().map(|m| m.kind), Some(MessageKind::Refused), "{backend:?}");

            let drop = draw("loadBalancerSourceRanges: anyone");
            assert_eq!(drop.messages.last().map(|m| m.kind), Some(MessageKind::Dropped), "{backend:?}");

            let node = draw("From the node itself");
            assert_eq!(node.client, "node");
        }
    }
}
