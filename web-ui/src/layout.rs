//! The sequence diagram as a scene to draw and a timeline to play: positions in SVG units (from
//! the engine's [`SequenceDiagram::layout`], with notes widened so rules stay readable), text
//! fitted to its box, how long each step animates, where the packet dot is at any moment, and
//! the whole diagram as a standalone SVG file for export. Plain Rust, tested natively; the Yew
//! component only draws what this computes.

use std::fmt::Write as _;

use switchyard_engine::flow::{LayoutOptions, MessageKind, NoteKind, ParticipantKind, RowItem, SequenceDiagram, Step};

/// Average advance of the monospace font the diagram uses, per pixel of font size.
const CHAR_EM: f64 = 0.61;
pub const NOTE_FONT: f64 = 11.0;
pub const LABEL_FONT: f64 = 11.0;
/// Notes get at least this wide (when the diagram is), so a rule fits on one line.
const NOTE_MIN_WIDTH: f64 = 520.0;
/// How long a message and a note animate at speed 1, in milliseconds.
pub const MESSAGE_MS: f64 = 1_100.0;
pub const NOTE_MS: f64 = 650.0;

fn options() -> LayoutOptions {
    LayoutOptions {
        column_width: 220.0,
        header_height: 58.0,
        message_height: 42.0,
        note_line_height: 15.0,
        note_padding: 7.0,
        gap: 8.0,
        margin: 16.0,
    }
}

/// One lifeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Lifeline {
    pub id: String,
    pub x: f64,
    pub kind: ParticipantKind,
    /// The name (`nginx-7d4b9c-fghij`, `node-3`).
    pub name: String,
    /// The address part of the label, when there is one.
    pub address: Option<String>,
    /// The netfilter hooks the flow passed on this lifeline, in order (`prerouting`, ...).
    pub hooks: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Message {
        index: usize,
        x1: f64,
        x2: f64,
        /// The arrow's height (a message to itself loops down to `y + LOOP_DROP`).
        y: f64,
        kind: MessageKind,
        /// Fitted to the space; `full` has everything.
        label: String,
        full: String,
        label_x: f64,
    },
    Note {
        index: usize,
        x: f64,
        y: f64,
        width: f64,
        height: f64,
        kind: NoteKind,
        lines: Vec<String>,
        full: Vec<String>,
    },
}

/// A step of the animation: one message or one note.
#[derive(Debug, Clone, PartialEq)]
pub struct SceneStep {
    pub item: Item,
    pub duration_ms: f64,
}

/// How far a message to itself loops down.
pub const LOOP_DROP: f64 = 16.0;
const LOOP_OUT: f64 = 36.0;

#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    pub width: f64,
    pub height: f64,
    pub title: String,
    pub header_y: f64,
    pub header_height: f64,
    pub lifelines: Vec<Lifeline>,
    pub lifeline_top: f64,
    pub lifeline_bottom: f64,
    pub steps: Vec<SceneStep>,
}

/// Cuts `text` to what fits in `width` pixels at `font` size, ending in `…` when cut.
pub fn fit(text: &str, width: f64, font: f64) -> String {
    let max = ((width / (font * CHAR_EM)).floor() as usize).max(4);
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut out: String = text.chars().take(max - 1).collect();
    out.push('…');
    out
}

/// Splits a participant's label for its two header lines: `name 10.0.0.1:80 ...` → (`name`,
/// `10.0.0.1:80 ...`) at the first address; `host (what)` → (`host`, `(what)`).
fn split_label(label: &str) -> (String, Option<String>) {
    let mut at = None;
    let mut pos = 0;
    for word in label.split(' ') {
        if pos > 0 && word.starts_with(|c: char| c.is_ascii_digit() || c == '[') {
            at = Some(pos);
            break;
        }
        pos += word.len() + 1;
    }
    let at = at.or_else(|| label.find(" (").map(|i| i + 1));
    match at {
        Some(i) => (label[..i].trim().to_string(), Some(label[i..].trim().to_string())),
        None => (label.to_string(), None),
    }
}

/// Most lines a note shows; the step inspector has the rest.
const MAX_NOTE_LINES: usize = 9;

/// Breaks `text` into lines that fit `width` pixels, at spaces where it can and inside a long word
/// (a rule without spaces) where it must. Continuation lines are indented by two spaces.
pub fn wrap(text: &str, width: f64, font: f64) -> Vec<String> {
    let max = ((width / (font * CHAR_EM)).floor() as usize).max(8);
    let mut out: Vec<String> = Vec::new();
    let mut line = String::new();
    for word in text.split(' ') {
        let mut word: Vec<char> = word.chars().collect();
        loop {
            let used = line.chars().count();
            let sep = usize::from(used > 0);
            if used + sep + word.len() <= max {
                if sep == 1 {
                    line.push(' ');
                }
                line.extend(word.iter());
                break;
            }
            if used > 2 && word.len() <= max - 2 {
                out.push(std::mem::take(&mut line));
                line.push_str("  ");
                continue;
            }
            // A word longer than a line: cut it where the line ends.
            let room = max.saturating_sub(used + sep).max(1);
            if sep == 1 {
                line.push(' ');
            }
            line.extend(word.iter().take(room));
            word.drain(..room.min(word.len()));
            out.push(std::mem::take(&mut line));
            line.push_str("  ");
            if word.is_empty() {
                break;
            }
        }
    }
    if !line.trim().is_empty() || out.is_empty() {
        out.push(line);
    }
    out
}

impl Scene {
    pub fn new(d: &SequenceDiagram) -> Scene {
        let opts = options();
        let base = d.layout(&opts);
        let width = base.width.max(opts.margin * 2.0 + 420.0);
        let inner = width - 2.0 * opts.margin;
        let lifelines: Vec<Lifeline> = base
            .columns
            .iter()
            .filter_map(|c| {
                let p = d.participant(&c.participant)?;
                let (name, address) = split_label(&p.label);
                let mut hooks: Vec<String> = Vec::new();
                for n in d.notes.iter().filter(|n| n.over.len() == 1 && n.over[0] == p.id) {
                    if let Some(at) = &n.at {
                        let hook = at.split_whitespace().next().unwrap_or(at).to_string();
                        if !hooks.contains(&hook) {
                            hooks.push(hook);
                        }
                    }
                }
                Some(Lifeline { id: p.id.clone(), x: c.x, kind: p.kind, name, address, hooks })
            })
            .collect();
        let steps_src = d.steps();
        let mut steps = Vec::with_capacity(base.rows.len());
        // Our own vertical flow: notes wrap instead of being cut, so rows get their own heights.
        let mut y = opts.margin + opts.header_height;
        for (row, step) in base.rows.iter().zip(steps_src) {
            let (item, height) = match (&row.item, step) {
                (RowItem::Message { index, x1, x2 }, Step::Message(_, m)) => {
                    let full = match &m.packet {
                        Some(p) if !m.text.contains(p.as_str()) && !m.text.is_empty() => format!("{} ({p})", m.text),
                        _ if m.text.trim().is_empty() => m.packet.clone().unwrap_or_else(|| "packet".into()),
                        _ => m.text.clone(),
                    };
                    let span = if x1 == x2 { opts.column_width } else { (x2 - x1).abs() };
                    let room = span.max(opts.column_width * 1.6).min(inner);
                    let mid = if x1 == x2 { x1 + LOOP_OUT + 4.0 } else { (x1 + x2) / 2.0 };
                    // Keep the label inside the diagram even next to its edges.
                    let label = fit(&full, room, LABEL_FONT);
                    let half = label.chars().count() as f64 * LABEL_FONT * CHAR_EM / 2.0;
                    let label_x = if x1 == x2 {
                        (mid + half).min(width - opts.margin - half)
                    } else {
                        mid.clamp(opts.margin + half, width - opts.margin - half)
                    };
                    let h = if x1 == x2 { opts.message_height * 1.5 } else { opts.message_height };
                    let item = Item::Message {
                        index: *index,
                        x1: *x1,
                        x2: *x2,
                        y: y + opts.message_height * 0.62,
                        kind: m.kind,
                        label,
                        full,
                        label_x,
                    };
                    (item, h)
                }
                (RowItem::Note { index, x, width: w, .. }, Step::Note(_, n)) => {
                    let centre = x + w / 2.0;
                    let nw = w.max(NOTE_MIN_WIDTH.min(inner));
                    let nx = (centre - nw / 2.0).clamp(opts.margin, width - opts.margin - nw);
                    let full = n.lines();
                    let text_width = nw - 2.0 * opts.note_padding;
                    let mut lines: Vec<String> = full.iter().flat_map(|l| wrap(l, text_width, NOTE_FONT)).collect();
                    if lines.len() > MAX_NOTE_LINES {
                        lines.truncate(MAX_NOTE_LINES);
                        if let Some(last) = lines.last_mut() {
                            *last = fit(&format!("{last} …"), text_width, NOTE_FONT);
                        }
                    }
                    let h = opts.note_line_height * lines.len() as f64 + opts.note_padding * 2.0;
                    let item = Item::Note { index: *index, x: nx, y, width: nw, height: h, kind: n.kind, lines, full };
                    (item, h)
                }
                // The engine's layout has one row per step, in step order.
                _ => continue,
            };
            y += height + opts.gap;
            let duration_ms = match item {
                Item::Message { .. } => MESSAGE_MS,
                Item::Note { .. } => NOTE_MS,
            };
            steps.push(SceneStep { item, duration_ms });
        }
        let last_bottom = y - opts.gap;
        Scene {
            width,
            height: last_bottom + opts.margin * 2.0,
            title: d.title.clone(),
            header_y: opts.margin,
            header_height: opts.header_height - 12.0,
            lifelines,
            lifeline_top: opts.margin + opts.header_height - 12.0,
            lifeline_bottom: last_bottom + opts.margin,
            steps,
        }
    }

    /// Where the packet is `t` (0..1) through step `step`: `None` for a note.
    pub fn dot(&self, step: usize, t: f64) -> Option<(f64, f64)> {
        let Item::Message { x1, x2, y, .. } = &self.steps.get(step)?.item else { return None };
        let t = ease(t.clamp(0.0, 1.0));
        if x1 == x2 {
            // Out, down, back: three legs of a loop to itself.
            let (out, down) = (x1 + LOOP_OUT, y + LOOP_DROP);
            return Some(if t < 1.0 / 3.0 {
                (x1 + (out - x1) * t * 3.0, *y)
            } else if t < 2.0 / 3.0 {
                (out, y + (down - y) * (t - 1.0 / 3.0) * 3.0)
            } else {
                (out + (x1 - out) * (t - 2.0 / 3.0) * 3.0, down)
            });
        }
        Some((x1 + (x2 - x1) * t, *y))
    }

    /// The whole diagram as an SVG document (every step shown), for download. Every piece of
    /// cluster text is escaped: names are data, never markup.
    pub fn to_svg(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" class="seq" viewBox="0 0 {w:.0} {h:.0}" width="{w:.0}" height="{h:.0}" font-family="ui-monospace, SFMono-Regular, Menlo, Consolas, monospace">"#,
            w = self.width,
            h = self.height
        );
        let _ = write!(s, "<title>{}</title><style>{}</style>", xml(&self.title), SVG_STYLE);
        let _ = write!(s, r#"<rect class="bg" width="{:.0}" height="{:.0}"/>"#, self.width, self.height);
        for l in &self.lifelines {
            self.lifeline_svg(&mut s, l);
        }
        for step in &self.steps {
            match &step.item {
                Item::Message { x1, x2, y, kind, label, label_x, .. } => {
                    let class = message_class(*kind);
                    if x1 == x2 {
                        let _ = write!(
                            s,
                            r#"<path class="msg {class}" d="{}" fill="none" marker-end="url(#arrow)"/>"#,
                            loop_path(*x1, *y)
                        );
                    } else {
                        let _ = write!(
                            s,
                            r#"<line class="msg {class}" x1="{x1:.1}" y1="{y:.1}" x2="{x2:.1}" y2="{y:.1}" marker-end="url(#arrow)"/>"#
                        );
                    }
                    let _ = write!(
                        s,
                        r#"<text class="msg-label" x="{label_x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                        y - 7.0,
                        xml(label)
                    );
                }
                Item::Note { x, y, width, height, kind, lines, .. } => {
                    let _ = write!(
                        s,
                        r#"<rect class="note {}" x="{x:.1}" y="{y:.1}" width="{width:.1}" height="{height:.1}" rx="4"/>"#,
                        note_class(*kind)
                    );
                    for (i, line) in lines.iter().enumerate() {
                        let _ = write!(
                            s,
                            r#"<text class="note-text" x="{:.1}" y="{:.1}">{}</text>"#,
                            x + 7.0,
                            y + 7.0 + 11.5 + i as f64 * 15.0,
                            xml(line)
                        );
                    }
                }
            }
        }
        let _ = write!(
            s,
            r#"<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0,0L10,5L0,10z" class="arrowhead"/></marker></defs></svg>"#
        );
        s
    }

    fn lifeline_svg(&self, s: &mut String, l: &Lifeline) {
        let (bw, bh) = (196.0, self.header_height);
        let _ = write!(
            s,
            r#"<line class="lifeline" x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}"/><rect class="head {}" x="{:.1}" y="{:.1}" width="{bw}" height="{bh}" rx="6"/><text class="head-name" x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            self.lifeline_top,
            self.lifeline_bottom,
            participant_class(l.kind),
            l.x - bw / 2.0,
            self.header_y,
            self.header_y + 18.0,
            xml(&fit(&l.name, bw - 10.0, 12.0)),
            x = l.x,
        );
        let sub = l.address.clone().unwrap_or_default();
        let _ = write!(
            s,
            r#"<text class="head-sub" x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            l.x,
            self.header_y + 34.0,
            xml(&fit(&sub, bw - 10.0, 10.5))
        );
    }
}

/// The SVG path of a message to itself.
pub fn loop_path(x: f64, y: f64) -> String {
    format!("M{x:.1},{y:.1} H{:.1} V{:.1} H{:.1}", x + LOOP_OUT, y + LOOP_DROP, x + 2.0)
}

/// Ease in and out, so the dot leaves and arrives gently.
fn ease(t: f64) -> f64 {
    t * t * (3.0 - 2.0 * t)
}

pub fn message_class(k: MessageKind) -> &'static str {
    match k {
        MessageKind::Request => "msg-request",
        MessageKind::Reply => "msg-reply",
        MessageKind::Dns => "msg-dns",
        MessageKind::Refused => "msg-refused",
        MessageKind::Dropped => "msg-dropped",
        MessageKind::Local => "msg-local",
    }
}

pub fn note_class(k: NoteKind) -> &'static str {
    match k {
        NoteKind::Info => "note-info",
        NoteKind::Hook => "note-hook",
        NoteKind::Dnat => "note-dnat",
        NoteKind::Mark => "note-mark",
        NoteKind::Snat => "note-snat",
        NoteKind::UnNat => "note-unnat",
        NoteKind::Balance => "note-balance",
        NoteKind::Reject => "note-reject",
        NoteKind::Drop => "note-drop",
        NoteKind::Accept => "note-accept",
        NoteKind::Dns => "note-dns",
    }
}

/// A short word for the kind of note, shown in the step inspector.
pub fn note_word(k: NoteKind) -> &'static str {
    match k {
        NoteKind::Info => "info",
        NoteKind::Hook => "rule",
        NoteKind::Dnat => "DNAT",
        NoteKind::Mark => "mark",
        NoteKind::Snat => "SNAT",
        NoteKind::UnNat => "un-NAT",
        NoteKind::Balance => "load balancing",
        NoteKind::Reject => "reject",
        NoteKind::Drop => "drop",
        NoteKind::Accept => "accept",
        NoteKind::Dns => "DNS",
    }
}

pub fn participant_class(k: ParticipantKind) -> &'static str {
    match k {
        ParticipantKind::Client => "p-client",
        ParticipantKind::Pod => "p-pod",
        ParticipantKind::Node => "p-node",
        ParticipantKind::LoadBalancer => "p-lb",
        ParticipantKind::Dns => "p-dns",
        ParticipantKind::External => "p-external",
    }
}

/// Escapes text for SVG/XML content and attributes.
pub fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// The diagram's colours, inside the SVG so an exported file looks the same. The page's theme
/// overrides the custom properties; a downloaded file uses the fallbacks (light).
pub const SVG_STYLE: &str = "\
.bg{fill:var(--dg-bg,#ffffff)}\
.lifeline{stroke:var(--dg-line,#c3c9d4);stroke-width:1.5;stroke-dasharray:4 4}\
.head{fill:var(--dg-head,#f3f5f9);stroke:var(--dg-head-stroke,#9aa4b5);stroke-width:1.2}\
.head.p-pod{fill:var(--dg-pod,#e8f5ec)}.head.p-node{fill:var(--dg-node,#e9effc)}\
.head.p-lb{fill:var(--dg-lb,#f6ecfb)}.head.p-dns{fill:var(--dg-dns,#fff6e0)}\
.head.p-external,.head.p-client{fill:var(--dg-client,#f1f1f1)}\
.head-name{font-size:12px;font-weight:600;fill:var(--dg-text,#1d2433)}\
.head-sub,.head-hooks{font-size:10.5px;fill:var(--dg-muted,#5b6578)}\
.msg{stroke:var(--dg-request,#2463eb);stroke-width:2}\
.msg-reply{stroke:var(--dg-reply,#0f8a5f);stroke-dasharray:6 4}\
.msg-dns{stroke:var(--dg-dnsline,#b7791f)}\
.msg-refused,.msg-dropped{stroke:var(--dg-bad,#d03b3b)}\
.msg-local{stroke:var(--dg-local,#7b51d3)}\
.arrowhead{fill:var(--dg-muted,#5b6578)}\
.msg-label{font-size:11px;fill:var(--dg-text,#1d2433);paint-order:stroke;stroke:var(--dg-bg,#ffffff);stroke-width:4px;stroke-linejoin:round}\
.note{fill:var(--dg-note,#f7f7f2);stroke:var(--dg-note-stroke,#c9c6b5);stroke-width:1}\
.note-dnat{fill:var(--dg-dnat,#e3edff);stroke:#6d94e8}.note-snat{fill:var(--dg-snat,#fff0d9);stroke:#e0a24a}\
.note-unnat{fill:var(--dg-unnat,#e2f6ee);stroke:#4fb08a}.note-mark{fill:var(--dg-mark,#f6efe0);stroke:#c8ab6b}\
.note-balance{fill:var(--dg-balance,#efe9fb);stroke:#9b82d6}\
.note-reject,.note-drop{fill:var(--dg-badbg,#fde8e8);stroke:#e07a7a}\
.note-dns{fill:var(--dg-dnsbg,#fff6e0);stroke:#d9b25a}\
.note-text{font-size:11px;fill:var(--dg-text,#1d2433);white-space:pre}\
.dot{fill:var(--dg-dot,#ff6a3d);stroke:var(--dg-bg,#ffffff);stroke-width:2}\
";

/// Where the animation of one diagram is: a step index and how far through it.
#[derive(Debug, Clone, PartialEq)]
pub struct Player {
    /// The step being animated; `== len` once everything is shown.
    pub step: usize,
    /// 0..1 through `step`.
    pub t: f64,
    durations: Vec<f64>,
}

/// How a step is drawn right now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Vis {
    Done,
    /// Being animated, this far through.
    Active(f64),
    Hidden,
}

impl Player {
    pub fn new(scene: &Scene) -> Player {
        Player { step: 0, t: 0.0, durations: scene.steps.iter().map(|s| s.duration_ms).collect() }
    }

    pub fn len(&self) -> usize {
        self.durations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.durations.is_empty()
    }

    pub fn finished(&self) -> bool {
        self.step >= self.len()
    }

    /// Advances by `dt_ms` of wall time at `speed`; returns whether anything moved. A long frame
    /// (a background tab) may cross several steps at once.
    pub fn tick(&mut self, dt_ms: f64, speed: f64) -> bool {
        if self.finished() || dt_ms <= 0.0 {
            return false;
        }
        let mut left = dt_ms * speed;
        while let Some(d) = self.durations.get(self.step) {
            let need = (1.0 - self.t) * d;
            if left < need {
                self.t += left / d;
                return true;
            }
            left -= need;
            self.step += 1;
            self.t = 0.0;
        }
        true
    }

    /// Shows the current step whole and stops before the next.
    pub fn step_forward(&mut self) {
        if !self.finished() {
            self.step += 1;
            self.t = 0.0;
        }
    }

    /// Goes back one step (the current one hides again).
    pub fn step_back(&mut self) {
        self.step = self.step.saturating_sub(1);
        self.t = 0.0;
    }

    pub fn replay(&mut self) {
        self.step = 0;
        self.t = 0.0;
    }

    /// Everything shown.
    pub fn finish(&mut self) {
        self.step = self.len();
        self.t = 0.0;
    }

    pub fn vis(&self, i: usize) -> Vis {
        match i.cmp(&self.step) {
            std::cmp::Ordering::Less => Vis::Done,
            std::cmp::Ordering::Equal => Vis::Active(self.t),
            std::cmp::Ordering::Greater => Vis::Hidden,
        }
    }

    /// How many steps are fully shown.
    pub fn shown(&self) -> usize {
        self.step.min(self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_engine::demo;
    use switchyard_engine::demo::scenario::explain;
    use switchyard_engine::model::Protocol;
    use switchyard_engine::policy::Backend;

    fn diagram(node: &str, from: &str, to: &str) -> SequenceDiagram {
        let c = demo::cluster();
        let f = explain(&c, node, from.parse().expect("ip"), to, Protocol::Tcp, Backend::Nftables, 1).expect("traces");
        f.diagram.expect("diagram")
    }

    fn all_kinds() -> Vec<(&'static str, SequenceDiagram)> {
        vec![
            ("clusterip", diagram("node-1", "10.244.1.50", "10.96.0.10:80")),
            ("nodeport", diagram("node-3", "198.51.100.23", "192.168.1.13:30080")),
            ("loadbalancer", diagram("node-1", "198.51.100.23", "34.101.12.7:80")),
            ("externalname", diagram("node-1", "10.244.1.50", "my-db.default.svc.cluster.local:5432")),
            ("hairpin", diagram("node-3", "10.244.3.20", "10.96.0.20:80")),
            ("rejected", diagram("node-1", "10.244.1.50", "10.96.0.40:80")),
        ]
    }

    /// Every message runs between lifelines, every note and label stays inside the picture, and
    /// rows go down the page in step order without overlapping.
    #[test]
    fn every_kind_of_flow_lays_out_inside_the_picture() {
        for (name, d) in all_kinds() {
            let s = Scene::new(&d);
            assert_eq!(s.steps.len(), d.messages.len() + d.notes.len(), "{name}");
            let xs: Vec<f64> = s.lifelines.iter().map(|l| l.x).collect();
            let mut last_y = 0.0;
            for step in &s.steps {
                match &step.item {
                    Item::Message { x1, x2, y, label_x, label, .. } => {
                        assert!(xs.contains(x1) && xs.contains(x2), "{name}: arrow off a lifeline");
                        assert!(*y > last_y, "{name}: rows go down");
                        last_y = *y;
                        let half = label.chars().count() as f64 * LABEL_FONT * CHAR_EM / 2.0;
                        assert!(label_x - half >= 0.0 && label_x + half <= s.width + 0.5, "{name}: label {label}");
                    }
                    Item::Note { x, y, width, lines, .. } => {
                        assert!(*x >= 0.0 && x + width <= s.width + 0.01, "{name}: note outside");
                        assert!(*y > last_y - 30.0, "{name}");
                        last_y = *y;
                        for l in lines {
                            assert!(l.chars().count() as f64 * NOTE_FONT * CHAR_EM <= width - 14.0 + 0.01, "{l}");
                        }
                    }
                }
            }
            assert!(s.lifeline_bottom <= s.height, "{name}");
        }
    }

    /// The NodePort picture names what happened where: DNAT to the endpoint, the masquerade to the
    /// node's address, and the un-NAT of the reply, with the rule's comment.
    #[test]
    fn nodeport_shows_each_translation_where_it_happens() {
        let d = diagram("node-3", "198.51.100.23", "192.168.1.13:30080");
        let s = Scene::new(&d);
        let notes: Vec<(NoteKind, String)> = s
            .steps
            .iter()
            .filter_map(|st| match &st.item {
                Item::Note { kind, full, .. } => Some((*kind, full.join("\n"))),
                _ => None,
            })
            .collect();
        assert!(notes.iter().any(|(_, t)| t.contains("dnat to 10.244.")), "{notes:?}");
        assert!(notes.iter().any(|(k, t)| *k == NoteKind::Snat && t.contains("masquerade")), "{notes:?}");
        assert!(notes.iter().any(|(k, _)| *k == NoteKind::UnNat), "{notes:?}");
        assert!(notes.iter().any(|(_, t)| t.contains("comment: default/nginx-svc:http nodePort")), "{notes:?}");
        let node = s.lifelines.iter().find(|l| l.id == "node").expect("entry node");
        assert_eq!(node.name, "node-3");
        assert_eq!(node.address.as_deref(), Some("192.168.1.13"));
        assert!(node.hooks.iter().any(|h| h == "prerouting"), "{:?}", node.hooks);
        let replies = s.steps.iter().filter(|st| matches!(st.item, Item::Message { kind: MessageKind::Reply, .. }));
        assert!(replies.count() >= 2, "the reply path is drawn");
    }

    /// The dot starts at the sender, ends at the receiver and never goes back.
    #[test]
    fn the_dot_moves_along_each_arrow() {
        let s = Scene::new(&diagram("node-1", "198.51.100.23", "34.101.12.7:80"));
        for (i, step) in s.steps.iter().enumerate() {
            let Item::Message { x1, x2, .. } = step.item else {
                assert_eq!(s.dot(i, 0.5), None);
                continue;
            };
            if x1 == x2 {
                continue;
            }
            let xs: Vec<f64> = (0..=10).map(|k| s.dot(i, k as f64 / 10.0).expect("dot").0).collect();
            assert!((xs[0] - x1).abs() < 1e-9 && (xs[10] - x2).abs() < 1e-9);
            assert!(xs.windows(2).all(|w| (w[1] - w[0]) * (x2 - x1) >= 0.0), "monotone");
        }
    }

    #[test]
    fn the_player_steps_plays_and_replays() {
        let s = Scene::new(&diagram("node-1", "10.244.1.50", "10.96.0.10:80"));
        let mut p = Player::new(&s);
        assert!(p.len() > 3);
        assert_eq!(p.vis(0), Vis::Active(0.0));
        assert_eq!(p.vis(1), Vis::Hidden);
        p.step_forward();
        p.step_forward();
        assert_eq!((p.step, p.vis(0), p.vis(2)), (2, Vis::Done, Vis::Active(0.0)));
        p.step_back();
        assert_eq!(p.step, 1);
        // Half of the current step's time moves half-way through it.
        let d = s.steps[1].duration_ms;
        assert!(p.tick(d / 2.0, 1.0));
        assert!((p.t - 0.5).abs() < 1e-9);
        // Double speed covers the rest in a quarter of the time.
        p.tick(d / 4.0, 2.0);
        assert_eq!((p.step, p.t), (2, 0.0));
        let total: f64 = s.steps.iter().map(|x| x.duration_ms).sum();
        p.tick(total, 1.0);
        assert!(p.finished());
        assert!(!p.tick(100.0, 1.0), "a finished player stays");
        assert_eq!(p.vis(p.len() - 1), Vis::Done);
        p.replay();
        assert_eq!((p.step, p.shown()), (0, 0));
    }

    /// Names with markup stay text in the exported file.
    #[test]
    fn svg_export_escapes_cluster_text() {
        let mut d = diagram("node-1", "10.244.1.50", "10.96.0.10:80");
        d.participants[0].label = "<img src=x onerror=alert(1)> 10.0.0.1".into();
        d.title = "a & b".into();
        let svg = Scene::new(&d).to_svg();
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(!svg.contains("<img"));
        assert!(svg.contains("&lt;img src=x onerror"));
        assert!(svg.contains("<title>a &amp; b</title>"));
        assert_eq!(svg.matches("<svg").count(), 1);
        assert!(svg.ends_with("</svg>"));
    }

    /// Wrapped lines fit, keep every character, and nothing is lost from a note.
    #[test]
    fn notes_wrap_instead_of_losing_the_translation() {
        let text = "conntrack reverses the DNAT: source back to 192.168.1.13:30080, and the masquerade: destination back to 198.51.100.23";
        let lines = wrap(text, 200.0, 11.0);
        let max = (200.0 / (11.0 * CHAR_EM)).floor() as usize;
        assert!(lines.len() > 1 && lines.iter().all(|l| l.chars().count() <= max), "{lines:?}");
        let joined: String = lines.iter().map(|l| l.trim()).collect::<Vec<_>>().join(" ");
        assert_eq!(joined, text);
        let long = "x".repeat(100);
        let cut = wrap(&long, 100.0, 11.0);
        assert_eq!(cut.iter().map(|l| l.trim().len()).sum::<usize>(), 100);
        let s = Scene::new(&diagram("node-3", "198.51.100.23", "192.168.1.13:30080"));
        let unnat = s.steps.iter().find_map(|st| match &st.item {
            Item::Note { kind: NoteKind::UnNat, lines, .. } => Some(lines.join(" ")),
            _ => None,
        });
        assert!(unnat.is_some_and(|t| t.contains("destination back to 198.51.100.23")));
    }

    #[test]
    fn labels_split_at_the_address() {
        assert_eq!(split_label("node-3 192.168.1.13"), ("node-3".into(), Some("192.168.1.13".into())));
        assert_eq!(split_label("pod 10.244.1.50 on node-1"), ("pod".into(), Some("10.244.1.50 on node-1".into())));
        assert_eq!(
            split_label("db.example.com (outside the cluster)"),
            ("db.example.com".into(), Some("(outside the cluster)".into()))
        );
        assert_eq!(split_label("cluster DNS"), ("cluster DNS".into(), None));
    }

    #[test]
    fn fit_cuts_with_an_ellipsis() {
        assert_eq!(fit("short", 200.0, 11.0), "short");
        let cut = fit(&"x".repeat(100), 67.1, 11.0);
        assert_eq!(cut.chars().count(), 10);
        assert!(cut.ends_with('…'));
    }
}
