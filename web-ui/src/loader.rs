//! Paste or upload `kubectl get svc,endpointslices,nodes -A -o yaml` and explore that cluster
//! offline. The engine's parser does the work; its problems name the file, the document, the
//! object and the field, and are shown as they are.

use std::rc::Rc;

use gloo::file::File;
use gloo::file::callbacks::FileReader;
use yew::prelude::*;

use switchyard_engine::cluster::Cluster;
use switchyard_engine::input::{self, Problem};

#[derive(Properties, PartialEq)]
pub struct LoaderProps {
    pub on_loaded: Callback<(String, Rc<Cluster>)>,
    pub on_close: Callback<()>,
}

pub enum Msg {
    Text(String),
    Files(Vec<File>),
    Read(String, String),
    Load,
}

pub struct Loader {
    text: String,
    file: String,
    problems: Vec<Problem>,
    summary: Option<String>,
    reading: Option<FileReader>,
}

/// Parses the text and builds a cluster; the problems, if any, to show.
pub fn load(file: &str, text: &str) -> Result<(Cluster, String), Vec<Problem>> {
    let parsed = input::parse(file, text)?;
    let cluster = Cluster::from_objects(parsed.objects);
    let skipped: Vec<String> = parsed.skipped_kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
    let mut summary = format!(
        "{} nodes, {} services, {} endpoint slices",
        cluster.nodes.len(),
        cluster.services.len(),
        cluster.endpoint_slices.len()
    );
    if !skipped.is_empty() {
        summary.push_str(&format!("; skipped {}", skipped.join(", ")));
    }
    Ok((cluster, summary))
}

impl Component for Loader {
    type Message = Msg;
    type Properties = LoaderProps;

    fn create(_ctx: &Context<Self>) -> Self {
        Loader { text: String::new(), file: "pasted.yaml".into(), problems: Vec::new(), summary: None, reading: None }
    }

    fn update(&mut self, ctx: &Context<Self>, msg: Msg) -> bool {
        match msg {
            Msg::Text(t) => {
                self.text = t;
                self.file = "pasted.yaml".into();
            }
            Msg::Files(files) => {
                if let Some(f) = files.into_iter().next() {
                    let name = f.name();
                    let link = ctx.link().clone();
                    self.reading = Some(gloo::file::callbacks::read_as_text(&f, move |r| {
                        link.send_message(Msg::Read(name, r.unwrap_or_default()))
                    }));
                }
                return false;
            }
            Msg::Read(name, text) => {
                self.reading = None;
                self.file = name;
                self.text = text;
                ctx.link().send_message(Msg::Load);
            }
            Msg::Load => match load(&self.file, &self.text) {
                Ok((cluster, summary)) => {
                    self.problems.clear();
                    if cluster.nodes.is_empty() {
                        self.summary = None;
                        self.problems = vec![Problem {
                            file: self.file.clone(),
                            document: 1,
                            object: None,
                            field: None,
                            message: "no Node objects: include nodes (kubectl get svc,endpointslices,nodes -A -o yaml)"
                                .into(),
                        }];
                    } else {
                        self.summary = Some(summary);
                        ctx.props().on_loaded.emit((self.file.clone(), Rc::new(cluster)));
                    }
                }
                Err(p) => {
                    self.summary = None;
                    self.problems = p;
                }
            },
        }
        true
    }

    fn view(&self, ctx: &Context<Self>) -> Html {
        let link = ctx.link();
        let oninput =
            link.callback(|e: InputEvent| Msg::Text(e.target_unchecked_into::<web_sys::HtmlTextAreaElement>().value()));
        let onchange = link.callback(|e: Event| {
            let input: web_sys::HtmlInputElement = e.target_unchecked_into();
            let files = input
                .files()
                .map(|list| (0..list.length()).filter_map(|i| list.get(i)).map(File::from).collect())
                .unwrap_or_default();
            Msg::Files(files)
        });
        html! {
            <section class="loader card" aria-label="Load a cluster" data-testid="loader">
                <div class="toolbar">
                    <h2>{"Explore your own cluster offline"}</h2>
                    <span class="grow"></span>
                    <button class="btn" onclick={ctx.props().on_close.reform(|_| ())} aria-label="Close">{"Close"}</button>
                </div>
                <p class="muted">{"Paste the output of "}<code>{"kubectl get svc,endpointslices,nodes -A -o yaml"}</code>{" (or upload the file). Nothing leaves this page."}</p>
                <textarea rows="10" placeholder="apiVersion: v1&#10;kind: List&#10;items: …" value={self.text.clone()} {oninput} data-testid="loader-text" />
                <div class="toolbar">
                    <input type="file" accept=".yaml,.yml,.json" {onchange} aria-label="Upload a YAML or JSON file" />
                    <span class="grow"></span>
                    <button class="btn primary" onclick={link.callback(|_| Msg::Load)} data-testid="loader-load">{"Explore"}</button>
                </div>
                if let Some(s) = &self.summary { <p class="ok">{ format!("Loaded {s}.") }</p> }
                if !self.problems.is_empty() {
                    <ul class="problems" role="alert" data-testid="loader-problems">
                        { for self.problems.iter().map(|p| html! { <li>{ p.to_string() }</li> }) }
                    </ul>
                }
            </section>
        }
    }
}
