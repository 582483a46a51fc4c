//! The packet composer: pick a source and a target, trace the packet, see every outcome with its
//! probability, the hops, and the animated diagram. Offline and in the demo the engine traces in
//! the page; live, the agent answers on `/api/v1/trace` (its own program, as the kernel has it).

use std::rc::Rc;

use yew::prelude::*;

use switchyard_engine::cluster::Cluster;
use switchyard_engine::flow::{self, SequenceDiagram};
use switchyard_engine::model::Protocol;
use switchyard_engine::policy::Backend;
use switchyard_engine::trace::Trace;

use crate::compose::{self, Choice};
use crate::diagram::FlowDiagram;

#[derive(Properties, PartialEq)]
pub struct ComposerProps {
    pub cluster: Rc<Cluster>,
    /// Ask the agent instead of tracing in the page.
    #[prop_or(false)]
    pub live: bool,
}

pub enum Msg {
    Source(usize),
    CustomFrom(String),
    Target(usize),
    Protocol(Protocol),
    Backend(Backend),
    Node(String),
    Trace,
    Traced(Result<Box<Trace>, String>),
}

pub struct Traced {
    trace: Trace,
    diagram: Rc<SequenceDiagram>,
    cli: String,
}

pub struct Composer {
    sources: Vec<Choice>,
    targets: Vec<Choice>,
    source: usize,
    custom_from: String,
    target: usize,
    protocol: Protocol,
    backend: Backend,
    /// Empty: the node [`compose::entry_node`] picks.
    node: String,
    busy: bool,
    result: Option<Result<Traced, String>>,
}

impl Composer {
    fn from(&self) -> String {
        if !self.custom_from.trim().is_empty() {
            return self.custom_from.trim().to_string();
        }
        self.sources.get(self.source).map(|s| s.value.clone()).unwrap_or_default()
    }

    fn node(&self, cluster: &Cluster) -> String {
        if !self.node.is_empty() {
            return self.node.clone();
        }
        match (self.sources.get(self.source), self.targets.get(self.target)) {
            (Some(s), Some(t)) => compose::entry_node(cluster, s, t).unwrap_or_default(),
            _ => cluster.nodes.keys().next().cloned().unwrap_or_default(),
        }
    }

    fn to(&self) -> String {
        self.targets.get(self.target).map(|t| t.value.clone()).unwrap_or_default()
    }
}

fn finish(cluster: &Cluster, trace: Trace, cli: String) -> Traced {
    let ctx = flow::DiagramContext::from_cluster(cluster, &trace);
    let diagram = Rc::new(flow::diagram(&trace, &ctx));
    Traced { trace, diagram, cli }
}

impl Component for Composer {
    type Message = Msg;
    type Properties = ComposerProps;

    fn create(ctx: &Context<Self>) -> Self {
        let c = &ctx.props().cluster;
        let sources = compose::sources(c);
        let targets = compose::targets(c);
        // Start on the textbook case: an outside client to the first NodePort, if any.
        let source = sources.iter().position(|s| s.group == "Outside").unwrap_or(0);
        let target = targets.iter().position(|t| t.group == "NodePort").unwrap_or(0);
        let protocol = targets.get(target).and_then(|t| t.protocol).unwrap_or(Protocol::Tcp);
        Composer {
            sources,
            targets,
            source,
            custom_from: String::new(),
            target,
            protocol,
            backend: Backend::Nftables,
            node: String::new(),
            busy: false,
            result: None,
        }
    }

    fn changed(&mut self, ctx: &Context<Self>, _old: &Self::Properties) -> bool {
        let c = &ctx.props().cluster;
        let (from, to) = (self.sources.get(self.source).cloned(), self.targets.get(self.target).cloned());
        self.sources = compose::sources(c);
        self.targets = compose::targets(c);
        // Keep the user's picks across cluster changes when they still exist.
        self.source = from.and_then(|f| self.sources.iter().position(|s| *s == f)).unwrap_or(0);
        self.target = to.and_then(|t| self.targets.iter().position(|x| *x == t)).unwrap_or(0);
        if !self.node.is_empty() && !c.nodes.contains_key(&self.node) {
            self.node.clear();
        }
        true
    }

    fn update(&mut self, ctx: &Context<Self>, msg: Msg) -> bool {
        match msg {
            Msg::Source(i) => {
                self.source = i;
                self.custom_from.clear();
                self.node.clear();
            }
            Msg::CustomFrom(s) => self.custom_from = s,
            Msg::Target(i) => {
                self.target = i;
                self.node.clear();
                if let Some(p) = self.targets.get(i).and_then(|t| t.protocol) {
                    self.protocol = p;
                }
            }
            Msg::Protocol(p) => self.protocol = p,
            Msg::Backend(b) => self.backend = b,
            Msg::Node(n) => self.node = n,
            Msg::Trace => {
                let cluster = ctx.props().cluster.clone();
                let (node, from, to) = (self.node(&cluster), self.from(), self.to());
                let cli = compose::cli_command(&node, &from, &to, self.protocol, self.backend);
                if ctx.props().live {
                    self.busy = true;
                    let url = compose::trace_url(&node, &from, &to, self.protocol, self.backend);
                    let link = ctx.link().clone();
                    wasm_bindgen_futures::spawn_local(async move {
                        let result = fetch_trace(&url).await;
                        link.send_message(Msg::Traced(result.map(Box::new)));
                    });
                } else {
                    let r = compose::request(&node, &from, &to, self.protocol, self.backend)
                        .and_then(|req| switchyard_engine::trace(&cluster, &req).map_err(|e| e.to_string()));
                    self.result = Some(r.map(|t| finish(&cluster, t, cli)));
                }
            }
            Msg::Traced(r) => {
                self.busy = false;
                let cluster = ctx.props().cluster.clone();
                let (node, from, to) = (self.node(&cluster), self.from(), self.to());
                let cli = compose::cli_command(&node, &from, &to, self.protocol, self.backend);
                self.result = Some(r.map(|t| finish(&cluster, *t, cli)));
            }
        }
        true
    }

    fn view(&self, ctx: &Context<Self>) -> Html {
        let link = ctx.link();
        let cluster = &ctx.props().cluster;
        let groups = |choices: &[Choice], selected: usize| -> Html {
            let mut names: Vec<&'static str> = Vec::new();
            for c in choices {
                if !names.contains(&c.group) {
                    names.push(c.group);
                }
            }
            names
                .into_iter()
                .map(|g| {
                    html! {
                        <optgroup label={g}>
                            { for choices.iter().enumerate().filter(|(_, c)| c.group == g).map(|(i, c)| html! {
                                <option value={i.to_string()} selected={i == selected}>{ c.label.clone() }</option>
                            }) }
                        </optgroup>
                    }
                })
                .collect::<Html>()
        };
        let on_source = link.callback(|e: Event| Msg::Source(select_value(&e).parse().unwrap_or(0)));
        let on_target = link.callback(|e: Event| Msg::Target(select_value(&e).parse().unwrap_or(0)));
        let on_protocol =
            link.callback(|e: Event| Msg::Protocol(Protocol::parse(&select_value(&e)).unwrap_or(Protocol::Tcp)));
        let on_backend = link.callback(|e: Event| {
            Msg::Backend(match select_value(&e).as_str() {
                "iptables" => Backend::Iptables,
                "ipvs" => Backend::Ipvs,
                _ => Backend::Nftables,
            })
        });
        let on_node = link.callback(|e: Event| Msg::Node(select_value(&e)));
        let on_custom = link
            .callback(|e: InputEvent| Msg::CustomFrom(e.target_unchecked_into::<web_sys::HtmlInputElement>().value()));
        let onsubmit = link.callback(|e: SubmitEvent| {
            e.prevent_default();
            Msg::Trace
        });
        let auto_node = self.node(cluster);
        html! {
            <section class="composer" data-testid="composer">
                <form class="composer-form card" {onsubmit}>
                    <label>{"Source"}
                        <select onchange={on_source} data-testid="composer-source">{ groups(&self.sources, self.source) }</select>
                    </label>
                    <label>{"…or any source IP"}
                        <input type="text" placeholder="e.g. 198.51.100.99" value={self.custom_from.clone()} oninput={on_custom} />
                    </label>
                    <label>{"Target"}
                        <select onchange={on_target} data-testid="composer-target">{ groups(&self.targets, self.target) }</select>
                    </label>
                    <label>{"Protocol"}
                        <select onchange={on_protocol}>
                            { for Protocol::ALL.iter().map(|p| html! { <option value={p.as_str()} selected={*p == self.protocol}>{ p.as_str().to_uppercase() }</option> }) }
                        </select>
                    </label>
                    <label>{"Enters at node"}
                        <select onchange={on_node}>
                            <option value="" selected={self.node.is_empty()}>{ format!("auto ({auto_node})") }</option>
                            { for cluster.nodes.keys().map(|n| html! { <option value={n.clone()} selected={*n == self.node}>{ n.clone() }</option> }) }
                        </select>
                    </label>
                    <label>{"Backend"}
                        <select onchange={on_backend}>
                            { for [Backend::Nftables, Backend::Iptables, Backend::Ipvs].iter().map(|b| html! {
                                <option value={b.as_str()} selected={*b == self.backend}>{ b.as_str() }</option>
                            }) }
                        </select>
                    </label>
                    <button class="btn primary" type="submit" data-testid="composer-trace" disabled={self.busy}>
                        { if self.busy { "Tracing…" } else { "Trace packet" } }
                    </button>
                </form>
                { self.result_view() }
            </section>
        }
    }
}

impl Composer {
    fn result_view(&self) -> Html {
        match &self.result {
            None => {
                html! { <p class="muted">{"Pick a source and a target, then trace: every outcome with its probability, the rules that matched, and the path as a diagram."}</p> }
            }
            Some(Err(e)) => html! { <p class="error" role="alert" data-testid="composer-error">{ e.clone() }</p> },
            Some(Ok(t)) => {
                let tr = &t.trace;
                html! {
                    <div class="composer-result" data-testid="composer-result">
                        <div class="card">
                            <p><span class={classes!("verdict", format!("verdict-{}", tr.verdict.as_str()))} data-testid="composer-verdict">{ tr.verdict.as_str() }</span>
                               {" "}<code class="cli">{ t.cli.clone() }</code></p>
                            <table class="table" data-testid="composer-outcomes">
                                <thead><tr><th>{"endpoint"}</th><th>{"pod"}</th><th>{"node"}</th><th>{"probability"}</th><th>{"source seen"}</th></tr></thead>
                                <tbody>
                                { for tr.outcomes.iter().map(|o| html! {
                                    <tr>
                                        <td><code>{ o.endpoint.to_string() }</code></td>
                                        <td>{ o.pod.clone().unwrap_or_default() }</td>
                                        <td>{ o.node.clone().unwrap_or_default() }</td>
                                        <td class="num">{ format!("{:.1}%", o.probability * 100.0) }</td>
                                        <td>{ if o.masquerade { "node IP (masqueraded)" } else { "client IP" } }</td>
                                    </tr>
                                }) }
                                if tr.outcomes.is_empty() {
                                    <tr><td colspan="5" class="muted">{"no endpoint: the packet does not reach a pod"}</td></tr>
                                }
                                </tbody>
                            </table>
                            <details>
                                <summary>{ format!("{} hops on the sampled path", tr.hops.len()) }</summary>
                                <ol class="hops">
                                { for tr.hops.iter().map(|h| html! {
                                    <li>
                                        <b>{ h.at.clone() }</b>{": "}{ h.action.clone() }
                                        if let Some(r) = &h.rule { <div><code>{ r.clone() }</code></div> }
                                        if let Some(c) = &h.comment { <div class="muted">{ format!("comment: {c}") }</div> }
                                    </li>
                                }) }
                                </ol>
                            </details>
                        </div>
                        <FlowDiagram diagram={t.diagram.clone()} name="trace" />
                    </div>
                }
            }
        }
    }
}

fn select_value(e: &Event) -> String {
    e.target_unchecked_into::<web_sys::HtmlSelectElement>().value()
}

async fn fetch_trace(url: &str) -> Result<Trace, String> {
    let resp = gloo::net::http::Request::get(url).send().await.map_err(|e| e.to_string())?;
    let text = resp.text().await.map_err(|e| e.to_string())?;
    if !resp.ok() {
        // The agent's errors are `{"error": "...", "parameter": "..."}`.
        let why = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or(text);
        return Err(format!("the agent answered {}: {why}", resp.status()));
    }
    serde_json::from_str(&text).map_err(|e| format!("unexpected trace from the agent: {e}"))
}
