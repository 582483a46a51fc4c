//! The views, as functions of the [`Model`]: cluster, service, flows, events and charts (the
//! composer and the diagram are components with their own state). They only render; every
//! interaction is a callback the app turns into an [`Action`]. Cluster names are always passed as
//! text nodes, which Yew escapes: nothing from the cluster is ever parsed as markup.

use std::rc::Rc;

use yew::prelude::*;

use switchyard_engine::cluster::Cluster;
use switchyard_engine::flow::DestinationKind;
use switchyard_engine::model::{Endpoint, ObjectKey, Service, ServiceType, TargetPort};
use switchyard_engine::policy::Backend;
use switchyard_engine::protocol::{
    Event as StreamEvent, FlowEvent, NodeChange, Sequenced, SyncEvent, SyncKind, WatchEvent,
};

use crate::charts::{Chart, ChartData};
use crate::program::{self, ProgramLine};
use crate::state::{FlowRow, Model, histogram, shares};

pub fn empty(text: &str) -> Html {
    html! { <p class="muted empty">{ text.to_string() }</p> }
}

fn kind_word(t: ServiceType, s: &Service) -> &'static str {
    if s.headless {
        return "Headless";
    }
    match t {
        ServiceType::ClusterIP => "ClusterIP",
        ServiceType::NodePort => "NodePort",
        ServiceType::LoadBalancer => "LoadBalancer",
        ServiceType::ExternalName => "ExternalName",
    }
}

/// The services a sync was for, and how many more it did not name.
fn services_cell(x: &SyncEvent) -> String {
    let mut text = x.services.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(", ");
    if x.services_omitted > 0 {
        text.push_str(&format!(" and {} more", x.services_omitted));
    }
    text
}

fn ports_text(s: &Service) -> String {
    s.ports
        .iter()
        .map(|p| {
            let target = match &p.target_port {
                TargetPort::Number(n) => n.to_string(),
                TargetPort::Name(n) => n.clone(),
            };
            let np = p.node_port.map(|n| format!(" node {n}")).unwrap_or_default();
            format!("{}/{}→{target}{np}", p.port, p.protocol.as_str())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn conditions(e: &Endpoint) -> Html {
    html! {
        <span class="conds">
            <span class={classes!("badge", if e.ready { "ok" } else { "off" })}>{"ready"}</span>
            <span class={classes!("badge", if e.serving { "ok" } else { "off" })}>{"serving"}</span>
            if e.terminating { <span class="badge warn">{"terminating"}</span> }
        </span>
    }
}

fn endpoints_of<'a>(c: &'a Cluster, k: &ObjectKey) -> Vec<&'a Endpoint> {
    c.slices_by_service().get(k).map(|v| v.iter().flat_map(|s| &s.endpoints).collect()).unwrap_or_default()
}

/// Nodes, services by type, endpoints with their conditions and nodes.
pub fn cluster_view(m: &Model, on_service: Callback<ObjectKey>) -> Html {
    let Some(c) = m.cluster() else { return empty("Waiting for the cluster…") };
    let endpoints: usize = c.slices_by_service().values().flatten().map(|s| s.endpoints.len()).sum();
    let groups = ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName", "Headless"];
    html! {
        <div class="view-cluster" data-testid="view-cluster">
            <div class="stats">
                <div class="stat"><b>{ c.nodes.len() }</b><span>{"nodes"}</span></div>
                <div class="stat"><b>{ c.services.len() }</b><span>{"services"}</span></div>
                <div class="stat"><b>{ endpoints }</b><span>{"endpoints"}</span></div>
                <div class="stat"><b>{ m.stream.as_ref().map(|s| s.seq).unwrap_or(0) }</b><span>{"events"}</span></div>
            </div>
            <h2>{"Nodes"}</h2>
            <table class="table" data-testid="nodes">
                <thead><tr><th>{"node"}</th><th>{"addresses"}</th><th>{"pod CIDRs"}</th><th>{"zone"}</th></tr></thead>
                <tbody>
                { for c.nodes.values().map(|n| html! {
                    <tr>
                        <td><b>{ n.name.clone() }</b></td>
                        <td>{ for n.addresses.iter().map(|a| html! { <span class="chip">{ format!("{} {}", a.kind, a.address) }</span> }) }</td>
                        <td>{ n.pod_cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ") }</td>
                        <td>{ n.zone().unwrap_or("").to_string() }</td>
                    </tr>
                }) }
                </tbody>
            </table>
            { for groups.iter().map(|g| {
                let services: Vec<&Service> = c.services.values().filter(|s| kind_word(s.service_type, s) == *g).collect();
                if services.is_empty() { return html! {}; }
                html! {
                    <>
                    <h2>{ format!("{g} services") }<span class="count">{ services.len() }</span></h2>
                    <table class="table services" data-testid={format!("services-{}", g.to_lowercase())}>
                        <thead><tr><th>{"service"}</th><th>{"addresses"}</th><th>{"ports"}</th><th>{"endpoints"}</th></tr></thead>
                        <tbody>
                        { for services.iter().map(|s| {
                            let key = s.key.clone();
                            let cb = on_service.clone();
                            let eps = endpoints_of(c, &s.key);
                            let mut addrs: Vec<String> = s.cluster_ips.iter().map(|i| i.to_string()).collect();
                            addrs.extend(s.load_balancer_ips().map(|i| format!("LB {i}")));
                            addrs.extend(s.external_ips.iter().map(|i| format!("external {i}")));
                            if let Some(n) = &s.external_name { addrs.push(format!("CNAME {n}")); }
                            html! {
                                <tr>
                                    <td><button class="link" onclick={move |_| cb.emit(key.clone())}>{ s.key.to_string() }</button></td>
                                    <td>{ addrs.join(", ") }</td>
                                    <td>{ ports_text(s) }</td>
                                    <td>
                                        if eps.is_empty() { <span class="muted">{"none"}</span> }
                                        { for eps.iter().map(|e| html! {
                                            <div class="ep">
                                                <code>{ e.address.to_string() }</code>
                                                <span class="muted">{ format!(" {} {}", e.target.clone().unwrap_or_default(), e.node_name.clone().map(|n| format!("on {n}")).unwrap_or_default()) }</span>
                                                { conditions(e) }
                                            </div>
                                        }) }
                                    </td>
                                </tr>
                            }
                        }) }
                        </tbody>
                    </table>
                    </>
                }
            }) }
        </div>
    }
}

/// Callbacks of the service view.
#[derive(Clone, PartialEq)]
pub struct ServiceCallbacks {
    pub select: Callback<ObjectKey>,
    pub node: Callback<String>,
    pub backend: Callback<Backend>,
}

/// One service: ports, policies, endpoints, and its rules in the chosen node's program, each with
/// the Service field that made it.
pub fn service_view(m: &Model, program: Option<Result<Rc<Vec<ProgramLine>>, String>>, cb: ServiceCallbacks) -> Html {
    let Some(c) = m.cluster() else { return empty("Waiting for the cluster…") };
    let Some(s) = m.selected_service.as_ref().and_then(|k| c.services.get(k)) else {
        return empty("No service selected: pick one in the cluster view.");
    };
    let on_select = {
        let cb = cb.select.clone();
        let keys: Vec<ObjectKey> = c.services.keys().cloned().collect();
        Callback::from(move |e: Event| {
            let i: usize = e.target_unchecked_into::<web_sys::HtmlSelectElement>().value().parse().unwrap_or(0);
            if let Some(k) = keys.get(i) {
                cb.emit(k.clone());
            }
        })
    };
    let on_node = cb.node.reform(|e: Event| e.target_unchecked_into::<web_sys::HtmlSelectElement>().value());
    let on_backend =
        cb.backend.reform(|e: Event| match e.target_unchecked_into::<web_sys::HtmlSelectElement>().value().as_str() {
            "iptables" => Backend::Iptables,
            "ipvs" => Backend::Ipvs,
            _ => Backend::Nftables,
        });
    let policy =
        |label: &str, value: String| html! { <div class="kv"><span>{ label.to_string() }</span><b>{ value }</b></div> };
    let eps = endpoints_of(c, &s.key);
    let node = m.program_node.clone().unwrap_or_default();
    html! {
        <div class="view-service" data-testid="view-service">
            <div class="toolbar">
                <label>{"Service "}
                    <select onchange={on_select} data-testid="service-select">
                        { for c.services.keys().enumerate().map(|(i, k)| html! {
                            <option value={i.to_string()} selected={*k == s.key}>{ k.to_string() }</option>
                        }) }
                    </select>
                </label>
            </div>
            <h2 data-testid="service-name">{ s.key.to_string() }<span class="pill">{ kind_word(s.service_type, s) }</span></h2>
            <div class="grid2">
                <div class="card">
                    <h3>{"Addresses and policies"}</h3>
                    { policy("cluster IPs", if s.headless { "None (headless)".into() } else { s.cluster_ips.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ") }) }
                    if !s.external_ips.is_empty() { { policy("external IPs", s.external_ips.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ")) } }
                    if !s.load_balancer_ingress.is_empty() { { policy("load balancer", s.load_balancer_ingress.iter().map(|i| format!("{}{}", i.ip.map(|x| x.to_string()).or_else(|| i.hostname.clone()).unwrap_or_default(), if i.ip_mode_proxy { " (ipMode Proxy)" } else { "" })).collect::<Vec<_>>().join(", ")) } }
                    if let Some(n) = &s.external_name { { policy("externalName", format!("{n} (DNS CNAME only, never proxied)")) } }
                    { policy("externalTrafficPolicy", if s.external_traffic_policy_local { "Local".into() } else { "Cluster".into() }) }
                    { policy("internalTrafficPolicy", if s.internal_traffic_policy_local { "Local".into() } else { "Cluster".into() }) }
                    { policy("sessionAffinity", s.session_affinity_timeout.map(|t| format!("ClientIP ({t}s)")).unwrap_or_else(|| "None".into())) }
                    if !s.load_balancer_source_ranges.is_empty() { { policy("loadBalancerSourceRanges", s.load_balancer_source_ranges.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ")) } }
                    if let Some(h) = s.health_check_node_port { { policy("healthCheckNodePort", h.to_string()) } }
                    if let Some(t) = &s.traffic_distribution { { policy("trafficDistribution", t.clone()) } }
                </div>
                <div class="card">
                    <h3>{"Ports"}</h3>
                    <table class="table">
                        <thead><tr><th>{"name"}</th><th>{"protocol"}</th><th>{"port"}</th><th>{"targetPort"}</th><th>{"nodePort"}</th></tr></thead>
                        <tbody>{ for s.ports.iter().map(|p| html! {
                            <tr><td>{ p.name.clone() }</td><td>{ p.protocol.as_str() }</td><td>{ p.port }</td>
                                <td>{ match &p.target_port { TargetPort::Number(n) => n.to_string(), TargetPort::Name(n) => n.clone() } }</td>
                                <td>{ p.node_port.map(|n| n.to_string()).unwrap_or_default() }</td></tr>
                        }) }</tbody>
                    </table>
                </div>
            </div>
            <h3>{ format!("Endpoints ({})", eps.len()) }</h3>
            <table class="table" data-testid="service-endpoints">
                <thead><tr><th>{"address"}</th><th>{"pod"}</th><th>{"node"}</th><th>{"zone"}</th><th>{"conditions"}</th></tr></thead>
                <tbody>{ for eps.iter().map(|e| html! {
                    <tr><td><code>{ e.address.to_string() }</code></td><td>{ e.target.clone().unwrap_or_default() }</td>
                        <td>{ e.node_name.clone().unwrap_or_default() }</td><td>{ e.zone.clone().unwrap_or_default() }</td>
                        <td>{ conditions(e) }</td></tr>
                }) }</tbody>
            </table>
            <div class="toolbar">
                <h3>{"Its rules in the program of"}</h3>
                <select onchange={on_node} aria-label="Node">
                    { for c.nodes.keys().map(|n| html! { <option value={n.clone()} selected={*n == node}>{ n.clone() }</option> }) }
                </select>
                <select onchange={on_backend} aria-label="Backend">
                    { for [Backend::Nftables, Backend::Iptables, Backend::Ipvs].iter().map(|b| html! {
                        <option value={b.as_str()} selected={*b == m.program_backend}>{ b.as_str() }</option>
                    }) }
                </select>
            </div>
            { program_table(program, &s.key) }
        </div>
    }
}

fn program_table(program: Option<Result<Rc<Vec<ProgramLine>>, String>>, key: &ObjectKey) -> Html {
    match program {
        None => empty("No node to render for."),
        Some(Err(e)) => html! { <p class="error">{ e }</p> },
        Some(Ok(lines)) => {
            let mine: Vec<&ProgramLine> =
                lines.iter().filter(|l| l.comment.as_deref().is_some_and(|c| program::names(c, key))).collect();
            html! {
                <>
                <p class="muted">{ format!("{} of the program's {} lines come from this service; the right column is the rule's comment: the Service field that made it.", mine.len(), lines.len()) }</p>
                <table class="table program" data-testid="program">
                    <thead><tr><th>{"line"}</th><th>{"rule"}</th><th>{"made by"}</th></tr></thead>
                    <tbody>{ for mine.iter().map(|l| html! {
                        <tr><td class="num muted">{ l.number }</td><td><code>{ l.text.trim().to_string() }</code></td>
                            <td class="field">{ l.field.clone().or_else(|| l.comment.clone()).unwrap_or_default() }</td></tr>
                    }) }</tbody>
                </table>
                </>
            }
        }
    }
}

pub fn kind_label(k: DestinationKind) -> &'static str {
    k.as_str()
}

/// A pod that reached itself through its own Service: the reply must be masqueraded or the pod
/// would answer itself directly and the connection would break.
pub fn is_hairpin(f: &FlowEvent) -> bool {
    f.endpoint.is_some_and(|e| e.ip == f.src.ip)
}

pub fn hairpin_badge(f: &FlowEvent) -> Html {
    if is_hairpin(f) {
        html! { <span class="kind k-hairpin" title="the pod reached itself through its Service">{"hairpin"}</span> }
    } else {
        html! {}
    }
}

/// One line about a flow, for the list.
pub fn flow_summary(f: &FlowEvent) -> String {
    let to = match &f.name {
        Some(n) => format!("{n} ({})", f.dst),
        None => f.dst.to_string(),
    };
    let ep = f.endpoint.map(|e| format!(" ⇒ {e}")).unwrap_or_default();
    format!("{} → {to}{ep}", f.src.ip)
}

/// Callbacks of the flows view.
#[derive(Clone, PartialEq)]
pub struct FlowCallbacks {
    pub select: Callback<u64>,
    pub filter: Callback<Option<DestinationKind>>,
    pub follow: Callback<()>,
}

pub const FILTERS: [Option<DestinationKind>; 6] = [
    None,
    Some(DestinationKind::ClusterIp),
    Some(DestinationKind::NodePort),
    Some(DestinationKind::LoadBalancer),
    Some(DestinationKind::ExternalName),
    Some(DestinationKind::HealthCheckNodePort),
];

/// The recent-flows list beside the diagram.
pub fn flow_list(m: &Model, rows: &[FlowRow], cb: &FlowCallbacks) -> Html {
    let selected = m.selected_flow.as_ref().map(|r| r.seq);
    html! {
        <aside class="flow-list" aria-label="Recent flows">
            <div class="chips" role="group" aria-label="Filter by destination">
                { for FILTERS.iter().map(|f| {
                    let cbf = cb.filter.clone();
                    let f = *f;
                    html! {
                        <button class={classes!("chip", (m.flow_filter == f).then_some("on"))} aria-pressed={(m.flow_filter == f).to_string()}
                            onclick={move |_| cbf.emit(f)}>{ f.map(kind_label).unwrap_or("all") }</button>
                    }
                }) }
            </div>
            <label class="follow"><input type="checkbox" checked={m.animation.follow} onchange={cb.follow.reform(|_| ())} />{" follow the newest flow"}</label>
            <ul class="flows" data-testid="flow-list">
                { for rows.iter().map(|r| {
                    let seq = r.seq;
                    let cbs = cb.select.clone();
                    let f = &r.flow;
                    // Keyed by sequence number: a new flow on top moves the rows instead of
                    // rewriting every row's text.
                    html! {
                        <li key={seq.to_string()}>
                            <button class={classes!("flow-row", (Some(seq) == selected).then_some("selected"))} data-kind={kind_label(f.destination)}
                                    onclick={move |_| cbs.emit(seq)} aria-current={(Some(seq) == selected).then_some("true")}>
                                <span class={classes!("kind", format!("k-{}", kind_label(f.destination).to_lowercase()))}>{ kind_label(f.destination) }</span>
                                { hairpin_badge(f) }
                                <span class={classes!("verdict", format!("verdict-{}", f.verdict.as_str()))}>{ f.verdict.as_str() }</span>
                                if r.closed { <span class="muted small">{"closed"}</span> }
                                <span class="time muted">{ format!("{:.1}s", r.time_ms as f64 / 1000.0) }</span>
                                <div class="summary">{ flow_summary(f) }</div>
                                if let Some(s) = &f.service { <div class="muted small">{ s.to_string() }{ format!(" via {}", f.node) }</div> }
                            </button>
                        </li>
                    }
                }) }
                if rows.is_empty() { <li class="muted empty">{"No flows yet. In the demo they arrive every half second; offline, trace one in the packet composer."}</li> }
            </ul>
        </aside>
    }
}

fn describe(e: &Sequenced) -> (&'static str, String) {
    match &e.event {
        StreamEvent::Watch(WatchEvent::Applied { object }) => {
            let what = match object.reference() {
                Some(r) => describe_ref(&r),
                None => "proxy configuration".into(),
            };
            ("applied", what)
        }
        StreamEvent::Watch(WatchEvent::Deleted { object }) => ("deleted", describe_ref(object)),
        StreamEvent::Watch(WatchEvent::Reset { objects }) => ("re-list", format!("{} objects", objects.len())),
        StreamEvent::Node(n) => (
            "node",
            format!(
                "{} {}",
                n.name,
                match n.change {
                    NodeChange::Joined => "joined",
                    NodeChange::Updated => "updated",
                    NodeChange::Left => "left",
                }
            ),
        ),
        StreamEvent::Health(h) => (
            "health",
            format!(
                "{}{}",
                if h.healthy { "healthy" } else { "unhealthy" },
                if h.message.is_empty() { String::new() } else { format!(": {}", h.message) }
            ),
        ),
        StreamEvent::Sync(s) => ("sync", format!("{} rules", s.rules)),
        StreamEvent::Flow(f) => ("flow", flow_summary(f)),
    }
}

fn describe_ref(r: &switchyard_engine::cluster::ObjectRef) -> String {
    use switchyard_engine::cluster::ObjectRef::*;
    match r {
        Service(k) => format!("Service {k}"),
        EndpointSlice(k) => format!("EndpointSlice {k}"),
        Endpoints(k) => format!("Endpoints {k}"),
        Node(n) => format!("Node {n}"),
        ServiceCidr(n) => format!("ServiceCIDR {n}"),
    }
}

/// The watch and sync timeline.
pub fn events_view(m: &Model) -> Html {
    let Some(s) = &m.stream else { return empty("Waiting for the stream…") };
    html! {
        <div class="grid2 view-events" data-testid="view-events">
            <div>
                <h2>{"Watch timeline"}<span class="count">{ s.timeline.len() }</span></h2>
                <ol class="timeline" data-testid="timeline">
                { for s.timeline.iter().rev().take(200).map(|e| {
                    let (kind, text) = describe(e);
                    html! { <li key={e.seq.to_string()}><span class="time muted">{ format!("{:.1}s", e.time_ms as f64 / 1000.0) }</span>
                                <span class={classes!("tag", format!("t-{kind}"))}>{ kind }</span>{ text }</li> }
                }) }
                </ol>
            </div>
            <div>
                <h2>{"Syncs"}<span class="count">{ s.syncs.len() }</span></h2>
                <table class="table" data-testid="syncs">
                    <thead><tr><th>{"time"}</th><th>{"kind"}</th><th>{"result"}</th><th>{"ms"}</th><th>{"rules"}</th><th>{"changed"}</th><th>{"services"}</th></tr></thead>
                    <tbody>
                    { for s.syncs.iter().rev().take(200).filter_map(|e| match &e.event {
                        StreamEvent::Sync(x) => Some(html! {
                            <tr>
                                <td class="muted">{ format!("{:.1}s", e.time_ms as f64 / 1000.0) }</td>
                                <td>{ if x.kind == SyncKind::Full { "full" } else { "partial" } }</td>
                                <td>{ if x.ok { html! { <span class="badge ok">{"ok"}</span> } } else { html! { <span class="badge bad" title={x.error.clone().unwrap_or_default()}>{"failed"}</span> } } }</td>
                                <td class="num">{ format!("{:.2}", x.duration_ms) }</td>
                                <td class="num">{ x.rules }</td>
                                <td class="num">{ x.changed }</td>
                                <td>{ services_cell(x) }</td>
                            </tr>
                        }),
                        _ => None,
                    }) }
                    </tbody>
                </table>
            </div>
        </div>
    }
}

/// The data of the three charts.
pub fn chart_data(m: &Model) -> (ChartData, ChartData, Option<(ObjectKey, ChartData)>) {
    let syncs: Vec<(u64, f64, usize)> = m
        .stream
        .iter()
        .flat_map(|s| s.syncs.iter())
        .filter_map(|e| match &e.event {
            StreamEvent::Sync(x) if x.ok => Some((e.time_ms, x.duration_ms, x.rules)),
            _ => None,
        })
        .collect();
    let durations: Vec<f64> = syncs.iter().map(|s| s.1).collect();
    let latency = ChartData::Latency(histogram(&durations, 12));
    let rules = ChartData::Rules(syncs.iter().map(|s| (s.0 as f64 / 1000.0, s.2 as f64)).collect());
    let service = m
        .selected_service
        .clone()
        .filter(|k| m.spread.get(k).is_some_and(|s| s.endpoints.len() > 1))
        .or_else(|| m.spread.iter().max_by_key(|(_, s)| s.flows).map(|(k, _)| k.clone()));
    let spread = service.and_then(|k| {
        let sp = m.spread.get(&k)?;
        Some((k, ChartData::Spread(shares(sp).into_iter().map(|(ep, o, e)| (ep.to_string(), o, e)).collect())))
    });
    (latency, rules, spread)
}

pub fn charts_view(m: &Model, dark: bool, on_service: Callback<ObjectKey>) -> Html {
    let (latency, rules, spread) = chart_data(m);
    let services: Vec<ObjectKey> = m.spread.keys().cloned().collect();
    let current = spread.as_ref().map(|s| s.0.clone());
    let on_select = {
        let services = services.clone();
        on_service.reform(move |e: Event| {
            let i: usize = e.target_unchecked_into::<web_sys::HtmlSelectElement>().value().parse().unwrap_or(0);
            services.get(i).cloned().unwrap_or_else(|| ObjectKey::new("", ""))
        })
    };
    html! {
        <div class="view-charts" data-testid="view-charts">
            <div class="charts">
                <Chart data={latency} title="Sync latency histogram" {dark} />
                <Chart data={rules} title="Rules programmed over time" {dark} />
            </div>
            <div class="toolbar">
                <h3>{"Connection spread of"}</h3>
                <select onchange={on_select} aria-label="Service">
                    { for services.iter().enumerate().map(|(i, k)| html! {
                        <option value={i.to_string()} selected={Some(k) == current.as_ref()}>{ k.to_string() }</option>
                    }) }
                </select>
            </div>
            if let Some((k, data)) = spread {
                <Chart {data} title={format!("{k}: connections per endpoint against the tracer's expected shares")} {dark} width={1140} />
            } else {
                { empty("No connections to a service with endpoints yet.") }
            }
        </div>
    }
}
