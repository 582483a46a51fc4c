//! The app: owns the [`Model`], runs the data source (live socket or in-page demo), the frame
//! loop that applies queued events once per animation frame, and the keyboard shortcuts; renders
//! the header, the tabs and the current view.

use std::cell::RefCell;
use std::rc::Rc;

use gloo::events::{EventListener, EventListenerOptions};
use gloo::render::{AnimationFrame, request_animation_frame};
use gloo::storage::{LocalStorage, Storage};
use gloo::timers::callback::Timeout;
use wasm_bindgen::JsCast;
use yew::prelude::*;

use switchyard_engine::cluster::Cluster;
use switchyard_engine::policy::Backend;
use switchyard_engine::protocol::{Mode, ServerMessage, Snapshot, SourceInfo};

use crate::composer::Composer;
use crate::diagram::{FlowDiagram, StepCmd};
use crate::loader::Loader;
use crate::program::{self, ProgramLine};
use crate::source::{Demo, Link, LinkEvent, now_ms};
use crate::state::{Action, Connection, DataSource, Model, Start, Theme, View, backoff_ms, choose_start};
use crate::views;

/// How the app starts.
#[derive(Clone, PartialEq)]
pub enum Boot {
    /// From the page's address: `?demo`, `?live`, or try live and fall back to the demo.
    Auto,
    Demo,
    Live,
    /// A fixed state and no source (tests, screenshots).
    Snapshot(Rc<Snapshot>),
    /// Starts from the snapshot; the embedding page pushes events into the queue and the app
    /// drains it every frame, exactly as it drains the WebSocket (the browser benchmark's feed).
    Feed(Rc<Snapshot>, Feed),
}

/// Events pushed from outside the app.
#[derive(Clone, Default)]
pub struct Feed(pub Rc<RefCell<Vec<switchyard_engine::protocol::Sequenced>>>);

impl PartialEq for Feed {
    fn eq(&self, other: &Self) -> bool {
        Rc::ptr_eq(&self.0, &other.0)
    }
}

#[derive(Properties, PartialEq)]
pub struct AppProps {
    #[prop_or(Boot::Auto)]
    pub boot: Boot,
    #[prop_or_default]
    pub view: Option<View>,
}

pub enum Msg {
    Act(Action),
    Frame,
    Link(LinkEvent),
    Reconnect,
    Key(String),
    Diagram(StepCmd),
    DiagramFinished,
    Loaded(String, Rc<Cluster>),
    StartDemo,
    ToggleLoader,
}

/// Time one frame may spend folding events, so the page keeps its frame rate under a flood.
const FRAME_BUDGET_MS: f64 = 8.0;
const THEME_KEY: &str = "switchyard.theme";
/// Under a flood of events the views re-render at most this often; the diagram animates on its
/// own at the display's rate, and nobody reads a list that changes 60 times a second.
const RENDER_EVERY_MS: f64 = 100.0;
/// Pause after a flow finished playing before the next one starts, when following.
const FOLLOW_PAUSE_MS: f64 = 1_200.0;

type ProgramCache = Option<((u64, String, Backend), Result<Rc<Vec<ProgramLine>>, String>)>;

pub struct App {
    model: Model,
    demo: Option<Demo>,
    feed: Option<Feed>,
    link: Option<Link>,
    fall_back: bool,
    got_snapshot: bool,
    attempt: u32,
    _retry: Option<Timeout>,
    frame: Option<AnimationFrame>,
    _keys: Option<EventListener>,
    cmd: Option<(u32, StepCmd)>,
    cmd_n: u32,
    cluster: Rc<Cluster>,
    cluster_version: u64,
    finished_at: Option<f64>,
    /// Events were applied since the last render.
    dirty: bool,
    last_render: f64,
    show_loader: bool,
    program_cache: RefCell<ProgramCache>,
}

impl App {
    fn start_demo(&mut self, notice: Option<String>) {
        self.feed = None;
        self.link = None;
        self._retry = None;
        let demo = Demo::new(1);
        self.model.reduce(Action::Start {
            source: Demo::source(),
            cluster: Box::new(demo.cluster()),
            data: DataSource::Demo,
        });
        self.model.reduce(Action::Notice(notice));
        self.demo = Some(demo);
    }

    fn connect(&mut self, ctx: &Context<Self>) {
        let report = ctx.link().callback(Msg::Link);
        match Link::connect(self.model.resume_seq(), report) {
            Ok(l) => self.link = Some(l),
            Err(e) => ctx.link().send_message(Msg::Link(LinkEvent::Closed(e))),
        }
    }

    fn schedule_frame(&mut self, ctx: &Context<Self>) {
        let link = ctx.link().clone();
        self.frame = Some(request_animation_frame(move |_| link.send_message(Msg::Frame)));
    }

    fn refresh_cluster(&mut self) {
        if self.cluster_version != self.model.cluster_version {
            self.cluster_version = self.model.cluster_version;
            self.cluster = Rc::new(self.model.cluster().cloned().unwrap_or_default());
        }
    }

    fn send_cmd(&mut self, c: StepCmd) {
        self.cmd_n += 1;
        self.cmd = Some((self.cmd_n, c));
    }

    fn program(&self) -> Option<Result<Rc<Vec<ProgramLine>>, String>> {
        let node = self.model.program_node.clone()?;
        let key = (self.model.cluster_version, node.clone(), self.model.program_backend);
        let mut cache = self.program_cache.borrow_mut();
        if let Some((k, v)) = cache.as_ref()
            && *k == key
        {
            return Some(v.clone());
        }
        let backend = self.model.program_backend;
        let v = switchyard_engine::render(&self.cluster, &node, backend)
            .map(|p| Rc::new(program::lines(&p, backend, None)))
            .map_err(|e| e.to_string());
        *cache = Some((key, v.clone()));
        Some(v)
    }

    fn dark(&self) -> bool {
        match self.model.theme {
            Theme::Dark => true,
            Theme::Light => false,
            Theme::System => web_sys::window()
                .and_then(|w| w.match_media("(prefers-color-scheme: dark)").ok().flatten())
                .map(|m| m.matches())
                .unwrap_or(false),
        }
    }
}

impl Component for App {
    type Message = Msg;
    type Properties = AppProps;

    fn create(ctx: &Context<Self>) -> Self {
        let boot = ctx.props().boot.clone();
        let start = match &boot {
            Boot::Auto => {
                let loc = gloo::utils::window().location();
                choose_start(&loc.protocol().unwrap_or_default(), &loc.search().unwrap_or_default())
            }
            Boot::Demo => Start::Demo,
            Boot::Live => Start::Live { fall_back_to_demo: false },
            Boot::Snapshot(_) | Boot::Feed(..) => Start::Demo,
        };
        let source = match start {
            Start::Live { .. } => DataSource::Live,
            Start::Demo => DataSource::Demo,
        };
        let mut app = App {
            model: Model::new(source),
            demo: None,
            feed: None,
            link: None,
            fall_back: matches!(start, Start::Live { fall_back_to_demo: true }),
            got_snapshot: false,
            attempt: 0,
            _retry: None,
            frame: None,
            _keys: None,
            cmd: None,
            cmd_n: 0,
            cluster: Rc::new(Cluster::default()),
            cluster_version: 0,
            finished_at: None,
            dirty: false,
            last_render: 0.0,
            show_loader: false,
            program_cache: RefCell::new(None),
        };
        if let Some(v) = ctx.props().view {
            app.model.view = v;
        }
        if let Ok(t) = LocalStorage::get::<String>(THEME_KEY) {
            app.model.theme = Theme::parse(&t);
        }
        crate::dom::apply_theme(app.model.theme);
        match (&boot, start) {
            (Boot::Snapshot(s), _) | (Boot::Feed(s, _), _) => {
                app.model.reduce(Action::Snapshot(Box::new((**s).clone())));
                app.model.source = DataSource::Demo;
                app.model.connection = Connection::Local;
                if let Boot::Feed(_, f) = &boot {
                    app.feed = Some(f.clone());
                }
            }
            (_, Start::Demo) => app.start_demo(None),
            (_, Start::Live { .. }) => app.connect(ctx),
        }
        app.refresh_cluster();
        let link = ctx.link().clone();
        let opts = EventListenerOptions::enable_prevent_default();
        app._keys = Some(EventListener::new_with_options(&gloo::utils::document(), "keydown", opts, move |e| {
            let Some(e) = e.dyn_ref::<web_sys::KeyboardEvent>() else { return };
            if crate::dom::typing(e) || e.ctrl_key() || e.meta_key() || e.alt_key() {
                return;
            }
            let key = e.key();
            if matches!(key.as_str(), " " | "ArrowLeft" | "ArrowRight") {
                e.prevent_default();
            }
            link.send_message(Msg::Key(key));
        }));
        app.schedule_frame(ctx);
        app
    }

    fn update(&mut self, ctx: &Context<Self>, msg: Msg) -> bool {
        match msg {
            Msg::Act(a) => {
                let theme = matches!(a, Action::ToggleTheme | Action::SetTheme(_));
                let changed = self.model.reduce(a);
                if theme {
                    let _ = LocalStorage::set(THEME_KEY, self.model.theme.as_str());
                    crate::dom::apply_theme(self.model.theme);
                }
                changed
            }
            Msg::Frame => {
                if let Some(d) = self.demo.as_mut() {
                    let events = d.poll();
                    self.model.enqueue(events);
                }
                if let Some(f) = &self.feed {
                    let events: Vec<_> = f.0.borrow_mut().drain(..).collect();
                    self.model.enqueue(events);
                }
                let start = now_ms();
                let mut applied = 0;
                loop {
                    let n = self.model.apply_pending(256);
                    applied += n;
                    if n == 0 || now_ms() - start > FRAME_BUDGET_MS {
                        break;
                    }
                }
                self.dirty |= applied > 0;
                let mut changed = self.dirty && now_ms() - self.last_render >= RENDER_EVERY_MS;
                if self.model.animation.follow
                    && self.finished_at.is_some_and(|t| now_ms() - t > FOLLOW_PAUSE_MS)
                    && self.model.reduce(Action::SelectLatest)
                {
                    self.finished_at = None;
                    changed = true;
                }
                self.refresh_cluster();
                self.schedule_frame(ctx);
                changed
            }
            Msg::Link(ev) => match ev {
                LinkEvent::Open => {
                    self.attempt = 0;
                    self.model.reduce(Action::Connection(Connection::Open))
                }
                LinkEvent::Message(m) => match *m {
                    ServerMessage::Snapshot(s) => {
                        self.got_snapshot = true;
                        self.model.reduce(Action::Snapshot(Box::new(s)));
                        self.model.source = DataSource::Live;
                        self.refresh_cluster();
                        true
                    }
                    ServerMessage::Event(e) => {
                        self.model.enqueue([e]);
                        false
                    }
                },
                LinkEvent::Garbled(e) => self
                    .model
                    .reduce(Action::Notice(Some(format!("The stream sent a message this page cannot read: {e}")))),
                LinkEvent::Closed(reason) => {
                    self.link = None;
                    if !self.got_snapshot && self.fall_back {
                        self.start_demo(Some("No Switchyard agent answered at this address: this is the built-in demo, running in your browser.".into()));
                        self.refresh_cluster();
                        return true;
                    }
                    let retry_ms = backoff_ms(self.attempt);
                    self.attempt += 1;
                    self.model.reduce(Action::Connection(Connection::Down { attempt: self.attempt, retry_ms, reason }));
                    let link = ctx.link().clone();
                    self._retry = Some(Timeout::new(retry_ms, move || link.send_message(Msg::Reconnect)));
                    true
                }
            },
            Msg::Reconnect => {
                self._retry = None;
                self.model.reduce(Action::Connection(Connection::Connecting { attempt: self.attempt }));
                self.connect(ctx);
                true
            }
            Msg::Key(key) => {
                if let Some(v) = View::from_key(&key) {
                    return self.model.reduce(Action::SetView(v));
                }
                match key.as_str() {
                    " " => self.send_cmd(StepCmd::TogglePlay),
                    "ArrowRight" => self.send_cmd(StepCmd::Forward),
                    "ArrowLeft" => self.send_cmd(StepCmd::Back),
                    "r" => self.send_cmd(StepCmd::Replay),
                    "t" => return Component::update(self, ctx, Msg::Act(Action::ToggleTheme)),
                    _ => return false,
                }
                // Stepping by hand means the user reads this flow: stop following.
                if self.model.animation.follow && key != "r" {
                    self.model.animation.follow = false;
                }
                self.finished_at = None;
                true
            }
            Msg::Diagram(c) => {
                self.send_cmd(c);
                true
            }
            Msg::DiagramFinished => {
                self.finished_at = Some(now_ms());
                false
            }
            Msg::Loaded(file, cluster) => {
                self.demo = None;
                self.feed = None;
                self.link = None;
                self._retry = None;
                let node = cluster.nodes.keys().next().cloned().unwrap_or_default();
                let source =
                    SourceInfo { mode: Mode::Demo, node, backend: "nftables".into(), version: "offline".into() };
                self.model.reduce(Action::Start {
                    source,
                    cluster: Box::new((*cluster).clone()),
                    data: DataSource::Offline { file },
                });
                self.model.reduce(Action::Notice(None));
                self.model.selected_flow = None;
                self.show_loader = false;
                self.model.view = View::Cluster;
                self.refresh_cluster();
                true
            }
            Msg::StartDemo => {
                self.start_demo(None);
                self.model.selected_flow = None;
                self.refresh_cluster();
                true
            }
            Msg::ToggleLoader => {
                self.show_loader = !self.show_loader;
                true
            }
        }
    }

    fn rendered(&mut self, _ctx: &Context<Self>, _first_render: bool) {
        self.last_render = now_ms();
        self.dirty = false;
    }

    fn view(&self, ctx: &Context<Self>) -> Html {
        let link = ctx.link();
        let m = &self.model;
        html! {
            <div class="app" data-testid="app" data-view={m.view.slug()}>
                { self.header(ctx) }
                { self.banner(ctx) }
                if self.show_loader {
                    <Loader on_loaded={link.callback(|(f, c)| Msg::Loaded(f, c))} on_close={link.callback(|_| Msg::ToggleLoader)} />
                }
                <nav class="tabs" aria-label="Views">
                    { for View::ALL.iter().enumerate().map(|(i, v)| {
                        let v = *v;
                        html! {
                            <button class={classes!("tab", (m.view == v).then_some("on"))} aria-current={(m.view == v).then_some("page")}
                                    data-testid={format!("tab-{}", v.slug())} title={format!("{} ({})", v.title(), i + 1)}
                                    onclick={link.callback(move |_| Msg::Act(Action::SetView(v)))}>
                                <kbd>{ i + 1 }</kbd>{ v.title() }
                            </button>
                        }
                    }) }
                </nav>
                <main class={classes!("view", format!("view-{}", m.view.slug()))} id="main">
                    { self.current_view(ctx) }
                </main>
            </div>
        }
    }
}

impl App {
    fn header(&self, ctx: &Context<Self>) -> Html {
        let link = ctx.link();
        let m = &self.model;
        let source = m.stream.as_ref().map(|s| format!("{} · {}", s.source.node, s.source.backend)).unwrap_or_default();
        let conn = match &m.connection {
            Connection::Local => None,
            Connection::Open => Some(("ok", "connected".to_string())),
            Connection::Connecting { .. } => Some(("warn", "connecting…".to_string())),
            Connection::Down { .. } => Some(("bad", "stream down".to_string())),
        };
        let theme_label = format!("Theme: {}", m.theme.as_str());
        html! {
            <header class="top">
                <div class="brand"><span class="logo" aria-hidden="true">{"⇄"}</span>{"Switchyard"}</div>
                <span class="pill mode" data-testid="mode">{ m.mode_label() }</span>
                <span class="muted">{ source }</span>
                if let Some((class, text)) = conn { <span class={classes!("pill", class)} data-testid="connection">{ text }</span> }
                <span class="grow"></span>
                <span class="muted small" title="events applied since the page opened">{ format!("seq {} · {} events", m.stream.as_ref().map(|s| s.seq).unwrap_or(0), m.counters.applied) }</span>
                if m.source != DataSource::Demo {
                    <button class="btn" onclick={link.callback(|_| Msg::StartDemo)}>{"Run the demo"}</button>
                }
                <button class="btn" onclick={link.callback(|_| Msg::ToggleLoader)} data-testid="open-loader">{"Load YAML"}</button>
                <button class="btn" onclick={link.callback(|_| Msg::Act(Action::ToggleTheme))} title="Switch theme (t)" data-testid="theme">{ theme_label }</button>
            </header>
        }
    }

    fn banner(&self, ctx: &Context<Self>) -> Html {
        let m = &self.model;
        let down = match &m.connection {
            Connection::Down { attempt, retry_ms, reason } => Some(format!(
                "The live stream is down ({reason}). Reconnecting in {:.1} s (attempt {attempt}); the view shows the state as of event {}.",
                *retry_ms as f64 / 1000.0,
                m.resume_seq().unwrap_or(0)
            )),
            Connection::Connecting { attempt } if *attempt > 0 => {
                Some(format!("Reconnecting to the live stream (attempt {attempt})…"))
            }
            _ => None,
        };
        html! {
            <>
            if let Some(text) = down { <div class="banner bad" role="alert" data-testid="stream-down">{ text }</div> }
            if let Some(n) = &m.notice {
                <div class="banner info" role="status" data-testid="notice">{ n.clone() }
                    <button class="btn small" onclick={ctx.link().callback(|_| Msg::Act(Action::Notice(None)))} aria-label="Dismiss">{"×"}</button>
                </div>
            }
            </>
        }
    }

    fn current_view(&self, ctx: &Context<Self>) -> Html {
        let link = ctx.link();
        let m = &self.model;
        match m.view {
            View::Cluster => views::cluster_view(
                m,
                link.batch_callback(|k| {
                    vec![Msg::Act(Action::SelectService(k)), Msg::Act(Action::SetView(View::Service))]
                }),
            ),
            View::Service => views::service_view(
                m,
                self.program(),
                views::ServiceCallbacks {
                    select: link.callback(|k| Msg::Act(Action::SelectService(k))),
                    node: link.callback(|n| Msg::Act(Action::ProgramNode(n))),
                    backend: link.callback(|b| Msg::Act(Action::ProgramBackend(b))),
                },
            ),
            View::Flows => {
                let rows = m.flow_rows();
                let cb = views::FlowCallbacks {
                    select: link.callback(|s| Msg::Act(Action::SelectFlow(s))),
                    filter: link.callback(|f| Msg::Act(Action::FilterFlows(f))),
                    follow: link.callback(|_| Msg::Act(Action::ToggleFollow)),
                };
                let diagram = m.selected_flow.as_ref().and_then(|r| r.flow.diagram.clone().map(|d| (r, Rc::new(d))));
                html! {
                    <div class="flows-view" data-testid="view-flows">
                        { views::flow_list(m, &rows, &cb) }
                        <section class="flow-detail" aria-label="Sequence diagram">
                            if let Some((row, d)) = diagram {
                                <div class="flow-head">
                                    <span class={classes!("kind", format!("k-{}", views::kind_label(row.flow.destination).to_lowercase()))}>{ views::kind_label(row.flow.destination) }</span>
                                    { views::hairpin_badge(&row.flow) }
                                    <span>{ views::flow_summary(&row.flow) }</span>
                                    <span class="muted small">{ format!("flow {} · {} via {}", row.flow.id, row.flow.protocol.as_str(), row.flow.node) }</span>
                                </div>
                                <FlowDiagram diagram={d} speed={m.animation.speed} command={self.cmd}
                                    name={format!("flow-{}", row.flow.id)}
                                    on_finished={link.callback(|_| Msg::DiagramFinished)}
                                    on_speed={link.callback(|s| Msg::Act(Action::SetSpeed(s)))} />
                            } else {
                                { views::empty("Pick a flow on the left to watch its packet walk through the rules.") }
                            }
                            <p class="muted small keys">{"Keys: space play/pause · ← → step · r replay · 1–6 views · t theme"}</p>
                        </section>
                    </div>
                }
            }
            View::Composer => html! { <Composer cluster={self.cluster.clone()} live={m.source == DataSource::Live} /> },
            View::Events => views::events_view(m),
            View::Charts => views::charts_view(m, self.dark(), link.callback(|k| Msg::Act(Action::SelectService(k)))),
        }
    }
}
