//! The animated sequence diagram: draws a [`Scene`] as SVG and plays it with a [`Player`], one
//! step at a time, with a packet dot travelling along each arrow. Only this component re-renders
//! per animation frame, and only while it plays; the frame loop is a requestAnimationFrame handle
//! kept in the component, so dropping the component stops it.

use std::rc::Rc;

use gloo::render::{AnimationFrame, request_animation_frame};
use yew::prelude::*;

use switchyard_engine::flow::{MessageKind, SequenceDiagram};

use crate::layout::{Item, Player, SVG_STYLE, Scene, Vis, loop_path, message_class, note_class, note_word};
use crate::state::SPEEDS;

/// Commands from outside (keyboard shortcuts), numbered so the same command twice still counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepCmd {
    Back,
    Forward,
    TogglePlay,
    Replay,
}

#[derive(Properties, PartialEq)]
pub struct DiagramProps {
    pub diagram: Rc<SequenceDiagram>,
    /// Start playing on mount (tests step by hand).
    #[prop_or(true)]
    pub autoplay: bool,
    #[prop_or(1.0)]
    pub speed: f64,
    #[prop_or_default]
    pub command: Option<(u32, StepCmd)>,
    /// Called once when the last step has been shown.
    #[prop_or_default]
    pub on_finished: Callback<()>,
    #[prop_or_default]
    pub on_speed: Callback<f64>,
    /// A name for exported files.
    #[prop_or_else(|| AttrValue::from("flow"))]
    pub name: AttrValue,
}

pub enum Msg {
    Frame(f64),
    Cmd(StepCmd),
    Speed(f64),
    ExportSvg,
    ExportMermaid,
    CopyMermaid,
}

pub struct FlowDiagram {
    scene: Rc<Scene>,
    player: Player,
    playing: bool,
    speed: f64,
    last_ts: Option<f64>,
    frame: Option<AnimationFrame>,
    reported_end: bool,
}

impl FlowDiagram {
    fn schedule(&mut self, ctx: &Context<Self>) {
        if self.playing && !self.player.finished() && self.frame.is_none() {
            let link = ctx.link().clone();
            self.frame = Some(request_animation_frame(move |ts| link.send_message(Msg::Frame(ts))));
        }
    }

    fn reset(&mut self, ctx: &Context<Self>) {
        self.scene = Rc::new(Scene::new(&ctx.props().diagram));
        self.player = Player::new(&self.scene);
        self.playing = ctx.props().autoplay;
        self.last_ts = None;
        self.frame = None;
        self.reported_end = false;
    }

    fn command(&mut self, cmd: StepCmd) {
        match cmd {
            StepCmd::Back => {
                self.playing = false;
                self.player.step_back();
            }
            StepCmd::Forward => {
                self.playing = false;
                self.player.step_forward();
            }
            StepCmd::TogglePlay => {
                if self.player.finished() && !self.playing {
                    self.player.replay();
                    self.reported_end = false;
                }
                self.playing = !self.playing;
            }
            StepCmd::Replay => {
                self.player.replay();
                self.reported_end = false;
                self.playing = true;
            }
        }
        self.last_ts = None;
        self.frame = None;
    }
}

impl Component for FlowDiagram {
    type Message = Msg;
    type Properties = DiagramProps;

    fn create(ctx: &Context<Self>) -> Self {
        let scene = Rc::new(Scene::new(&ctx.props().diagram));
        let player = Player::new(&scene);
        let mut me = FlowDiagram {
            scene,
            player,
            playing: ctx.props().autoplay,
            speed: ctx.props().speed,
            last_ts: None,
            frame: None,
            reported_end: false,
        };
        me.schedule(ctx);
        me
    }

    fn changed(&mut self, ctx: &Context<Self>, old: &Self::Properties) -> bool {
        let p = ctx.props();
        if p.diagram != old.diagram {
            self.reset(ctx);
        }
        self.speed = p.speed;
        if p.command != old.command
            && let Some((_, cmd)) = p.command
        {
            self.command(cmd);
        }
        self.schedule(ctx);
        true
    }

    fn update(&mut self, ctx: &Context<Self>, msg: Msg) -> bool {
        match msg {
            Msg::Frame(ts) => {
                self.frame = None;
                // The first frame only sets the clock; a hidden tab's long gap is cut short.
                let dt = self.last_ts.map(|l| (ts - l).clamp(0.0, 100.0)).unwrap_or(0.0);
                self.last_ts = Some(ts);
                if self.playing {
                    self.player.tick(dt, self.speed);
                }
                if self.player.finished() && !self.reported_end {
                    self.reported_end = true;
                    self.playing = false;
                    ctx.props().on_finished.emit(());
                }
            }
            Msg::Cmd(c) => self.command(c),
            Msg::Speed(s) => {
                self.speed = s;
                ctx.props().on_speed.emit(s);
            }
            Msg::ExportSvg => {
                let _ =
                    crate::dom::download(&format!("{}.svg", ctx.props().name), "image/svg+xml", &self.scene.to_svg());
                return false;
            }
            Msg::ExportMermaid => {
                let _ = crate::dom::download(
                    &format!("{}.mmd", ctx.props().name),
                    "text/plain",
                    &ctx.props().diagram.to_mermaid(),
                );
                return false;
            }
            Msg::CopyMermaid => {
                crate::dom::copy(&ctx.props().diagram.to_mermaid());
                return false;
            }
        }
        self.schedule(ctx);
        true
    }

    fn view(&self, ctx: &Context<Self>) -> Html {
        let link = ctx.link();
        let s = &self.scene;
        let len = self.player.len();
        let shown = self.player.shown();
        let play_label = if self.playing { "Pause" } else { "Play" };
        let speed_change = link.callback(|e: Event| {
            let v = e.target_unchecked_into::<web_sys::HtmlSelectElement>().value().parse().unwrap_or(1.0);
            Msg::Speed(v)
        });
        html! {
            <div class="diagram" data-testid="diagram" data-step={shown.to_string()} data-steps={len.to_string()}
                 data-playing={self.playing.to_string()}>
                <div class="diagram-bar" role="toolbar" aria-label="Diagram controls">
                    <button class="btn" title="Step back (←)" aria-label="Step back" data-testid="step-back"
                        onclick={link.callback(|_| Msg::Cmd(StepCmd::Back))}>{"◀ Step"}</button>
                    <button class="btn primary" title="Play or pause (space)" data-testid="play"
                        onclick={link.callback(|_| Msg::Cmd(StepCmd::TogglePlay))}>{play_label}</button>
                    <button class="btn" title="Step forward (→)" aria-label="Step forward" data-testid="step-forward"
                        onclick={link.callback(|_| Msg::Cmd(StepCmd::Forward))}>{"Step ▶"}</button>
                    <button class="btn" title="Replay (r)" data-testid="replay"
                        onclick={link.callback(|_| Msg::Cmd(StepCmd::Replay))}>{"Replay"}</button>
                    <label class="speed">{"Speed "}
                        <select onchange={speed_change} aria-label="Animation speed">
                            { for SPEEDS.iter().map(|v| html! {
                                <option value={v.to_string()} selected={(*v - self.speed).abs() < 1e-9}>{format!("{v}×")}</option>
                            }) }
                        </select>
                    </label>
                    <span class="step-count" data-testid="step-count">{format!("step {} of {len}", shown.min(len))}</span>
                    <span class="grow"></span>
                    <button class="btn" title="Download the diagram as SVG" onclick={link.callback(|_| Msg::ExportSvg)}>{"SVG ⤓"}</button>
                    <button class="btn" title="Download as Mermaid text" onclick={link.callback(|_| Msg::ExportMermaid)}>{"Mermaid ⤓"}</button>
                    <button class="btn" title="Copy the Mermaid text" onclick={link.callback(|_| Msg::CopyMermaid)}>{"Copy Mermaid"}</button>
                </div>
                <div class="diagram-title" data-testid="diagram-title">{ &s.title }</div>
                <div class="diagram-canvas">
                    <svg class="seq" viewBox={format!("0 0 {:.0} {:.0}", s.width, s.height)}
                         style={format!("max-width:{:.0}px", s.width)} role="img" aria-label={s.title.clone()}>
                        <style>{ SVG_STYLE }</style>
                        <defs>
                            <marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse">
                                <path d="M0,0L10,5L0,10z" class="arrowhead" />
                            </marker>
                        </defs>
                        <rect class="bg" width={s.width.to_string()} height={s.height.to_string()} />
                        { for s.lifelines.iter().map(|l| lifeline(s, l)) }
                        { for s.steps.iter().enumerate().map(|(i, st)| self.step_view(i, &st.item)) }
                        { self.dot() }
                    </svg>
                </div>
                { self.inspector() }
            </div>
        }
    }
}

fn lifeline(s: &Scene, l: &crate::layout::Lifeline) -> Html {
    let bw = 196.0;
    let hooks = if l.hooks.is_empty() { String::new() } else { format!("hooks: {}", l.hooks.join(" · ")) };
    html! {
        <g class="lifeline-group" data-participant={l.id.clone()}>
            <line class="lifeline" x1={l.x.to_string()} y1={s.lifeline_top.to_string()} x2={l.x.to_string()} y2={s.lifeline_bottom.to_string()} />
            <rect class={classes!("head", crate::layout::participant_class(l.kind))} x={(l.x - bw / 2.0).to_string()} y={s.header_y.to_string()}
                  width={bw.to_string()} height={s.header_height.to_string()} rx="6" />
            <text class="head-name" x={l.x.to_string()} y={(s.header_y + 17.0).to_string()} text-anchor="middle">
                { crate::layout::fit(&l.name, bw - 10.0, 12.0) }<title>{ &l.name }</title>
            </text>
            <text class="head-sub" x={l.x.to_string()} y={(s.header_y + 31.0).to_string()} text-anchor="middle">
                { l.address.clone().unwrap_or_default() }
            </text>
            if !hooks.is_empty() {
                <text class="head-hooks" x={l.x.to_string()} y={(s.header_y + 43.0).to_string()} text-anchor="middle">
                    { crate::layout::fit(&hooks, bw - 8.0, 10.5) }<title>{ hooks.clone() }</title>
                </text>
            }
        </g>
    }
}

impl FlowDiagram {
    fn step_view(&self, i: usize, item: &Item) -> Html {
        let vis = self.player.vis(i);
        if vis == Vis::Hidden {
            return html! {};
        }
        let t = match vis {
            Vis::Active(t) => t,
            _ => 1.0,
        };
        let active = matches!(vis, Vis::Active(_));
        match item {
            Item::Message { x1, x2, y, kind, label, full, label_x, .. } => {
                let class = classes!("msg", message_class(*kind), active.then_some("active"));
                let arrow = if x1 == x2 {
                    html! { <path class={class} d={loop_path(*x1, *y)} fill="none"
                    marker-end={(!active).then_some("url(#arrow)")} /> }
                } else {
                    let end = self.scene.dot(i, t).map(|p| p.0).unwrap_or(*x2);
                    html! { <line class={class} x1={x1.to_string()} y1={y.to_string()} x2={end.to_string()} y2={y.to_string()}
                    marker-end={(!active).then_some("url(#arrow)")} /> }
                };
                let end_mark = match kind {
                    MessageKind::Refused | MessageKind::Dropped if !active => html! {
                        <text class="msg-x" x={x2.to_string()} y={(y + 4.0).to_string()} text-anchor="middle">{"✕"}</text>
                    },
                    _ => html! {},
                };
                html! {
                    <g class="step step-message" data-step-index={i.to_string()}>
                        { arrow }{ end_mark }
                        <text class="msg-label" x={label_x.to_string()} y={(y - 7.0).to_string()} text-anchor="middle">
                            { label.clone() }<title>{ full.clone() }</title>
                        </text>
                    </g>
                }
            }
            Item::Note { x, y, width, height, kind, lines, full, .. } => {
                let style = active.then(|| format!("opacity:{:.2}", 0.25 + 0.75 * t));
                html! {
                    <g class={classes!("step", "step-note", active.then_some("active"))} style={style} data-step-index={i.to_string()}>
                        <rect class={classes!("note", note_class(*kind))} x={x.to_string()} y={y.to_string()}
                              width={width.to_string()} height={height.to_string()} rx="4" />
                        { for lines.iter().enumerate().map(|(k, l)| html! {
                            <text class="note-text" x={(x + 7.0).to_string()} y={(y + 18.5 + k as f64 * 15.0).to_string()}>{ l.clone() }</text>
                        }) }
                        <title>{ full.join("\n") }</title>
                    </g>
                }
            }
        }
    }

    fn dot(&self) -> Html {
        match self.scene.dot(self.player.step, self.player.t) {
            Some((x, y)) => {
                html! { <circle class="dot" data-testid="packet-dot" cx={x.to_string()} cy={y.to_string()} r="6" /> }
            }
            None => html! {},
        }
    }

    /// The current step in full, as text beside the picture (the SVG cuts long rules short).
    fn inspector(&self) -> Html {
        let len = self.player.len();
        if len == 0 {
            return html! { <div class="inspector muted">{"This trace has no steps."}</div> };
        }
        let i = self.player.step.min(len - 1);
        let body = match &self.scene.steps[i].item {
            Item::Message { kind, full, .. } => {
                let word = match kind {
                    MessageKind::Request => "packet",
                    MessageKind::Reply => "reply",
                    MessageKind::Dns => "DNS",
                    MessageKind::Refused => "refused",
                    MessageKind::Dropped => "dropped",
                    MessageKind::Local => "local delivery",
                };
                html! { <><span class={classes!("tag", message_class(*kind))}>{word}</span><code>{ full.clone() }</code></> }
            }
            Item::Note { kind, full, .. } => html! {
                <>
                    <span class={classes!("tag", note_class(*kind))}>{ note_word(*kind) }</span>
                    <ul class="inspector-lines">{ for full.iter().map(|l| html! { <li><code>{ l.clone() }</code></li> }) }</ul>
                </>
            },
        };
        html! {
            <div class="inspector" aria-live="polite" data-testid="inspector">
                <span class="muted">{ format!("Step {} of {len}: ", i + 1) }</span>{ body }
            </div>
        }
    }
}
