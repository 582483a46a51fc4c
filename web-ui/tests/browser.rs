//! The dashboard's components in a real (headless) Chromium: they render the right content for a
//! given state, the diagram animates step by step, the charts draw pixels on a canvas, demo mode
//! runs the engine in the page and flows appear, and cluster names are text, never markup.
//!
//! Run with `cargo test -p switchyard-web --target wasm32-unknown-unknown --tests` (chromedriver on
//! PATH; `.cargo/config.toml` makes wasm-bindgen-test-runner the runner).
#![cfg(target_arch = "wasm32")]

use std::rc::Rc;
use std::time::Duration;

use gloo::timers::future::sleep;
use wasm_bindgen::JsCast;
use wasm_bindgen_test::*;
use web_sys::{Element, HtmlCanvasElement, HtmlElement};
use yew::{BaseComponent, Renderer};

use switchyard_engine::demo;
use switchyard_engine::demo::scenario::{Scenario, explain};
use switchyard_engine::model::{ObjectKey, Protocol};
use switchyard_engine::policy::Backend;
use switchyard_engine::protocol::{Snapshot, StreamState};
use switchyard_web::app::{App, AppProps, Boot};
use switchyard_web::charts::{Chart, ChartData, ChartProps};
use switchyard_web::composer::{Composer, ComposerProps};
use switchyard_web::diagram::{DiagramProps, FlowDiagram};
use switchyard_web::state::View;

wasm_bindgen_test_configure!(run_in_browser);

fn mount<C: BaseComponent>(props: C::Properties) -> Element {
    let document = gloo::utils::document();
    let root = document.create_element("div").expect("div");
    document.body().expect("body").append_child(&root).expect("append");
    Renderer::<C>::with_root_and_props(root.clone(), props).render();
    root
}

async fn settle() {
    sleep(Duration::from_millis(30)).await;
}

/// Waits until `check` holds, for up to `ms`.
async fn until(ms: u64, mut check: impl FnMut() -> bool) -> bool {
    for _ in 0..ms / 20 {
        if check() {
            return true;
        }
        sleep(Duration::from_millis(20)).await;
    }
    check()
}

fn all(root: &Element, selector: &str) -> Vec<Element> {
    let list = root.query_selector_all(selector).expect("selector");
    (0..list.length()).filter_map(|i| list.item(i)).filter_map(|n| n.dyn_into::<Element>().ok()).collect()
}

fn one(root: &Element, selector: &str) -> Element {
    root.query_selector(selector).expect("selector").unwrap_or_else(|| panic!("{selector} not found"))
}

fn text(e: &Element) -> String {
    e.text_content().unwrap_or_default()
}

fn click(root: &Element, selector: &str) {
    one(root, selector).dyn_into::<HtmlElement>().expect("an HTML element").click();
}

fn demo_snapshot() -> Snapshot {
    StreamState::new(Scenario::source(), demo::cluster()).snapshot()
}

fn app(snapshot: Snapshot, view: View) -> Element {
    mount::<App>(AppProps { boot: Boot::Snapshot(Rc::new(snapshot)), view: Some(view) })
}

fn nodeport_diagram() -> Rc<switchyard_engine::flow::SequenceDiagram> {
    let c = demo::cluster();
    let f = explain(
        &c,
        "node-3",
        "198.51.100.23".parse().expect("ip"),
        "192.168.1.13:30080",
        Protocol::Tcp,
        Backend::Nftables,
        1,
    )
    .expect("traces");
    Rc::new(f.diagram.expect("a diagram"))
}

#[wasm_bindgen_test]
async fn cluster_view_lists_nodes_services_by_type_and_endpoint_conditions() {
    let root = app(demo_snapshot(), View::Cluster);
    settle().await;
    let nodes = text(&one(&root, "[data-testid=nodes]"));
    for n in ["node-1", "node-2", "node-3", "192.168.1.13", "10.244.3.0/24"] {
        assert!(nodes.contains(n), "{n} missing from {nodes}");
    }
    let lb = text(&one(&root, "[data-testid=services-loadbalancer]"));
    assert!(lb.contains("default/nginx-svc") && lb.contains("LB 34.101.12.7"), "{lb}");
    let en = text(&one(&root, "[data-testid=services-externalname]"));
    assert!(en.contains("default/my-db") && en.contains("CNAME"), "{en}");
    let all_text = text(&root);
    assert!(all_text.contains("nginx-7d4b9c-fghij"));
    assert!(all_text.contains("ready") && all_text.contains("serving"));
}

/// A Service whose name is markup shows as those characters, and no element is created from it.
#[wasm_bindgen_test]
async fn a_service_named_with_markup_is_shown_as_text() {
    let evil = "<img src=x onerror=alert(1)>";
    let mut cluster = demo::cluster();
    let mut svc = cluster.services.values().next().expect("a service").clone();
    svc.key = ObjectKey::new("default", evil);
    cluster.services.insert(svc.key.clone(), svc);
    let snapshot = StreamState::new(Scenario::source(), cluster).snapshot();
    let root = app(snapshot, View::Cluster);
    settle().await;
    assert!(all(&root, "img").is_empty(), "markup from a name became an element");
    assert!(text(&root).contains(&format!("default/{evil}")));
    // The service view and its selector too.
    let root = mount::<App>(AppProps {
        boot: Boot::Snapshot(Rc::new(
            StreamState::new(Scenario::source(), {
                let mut c = demo::cluster();
                c.services.retain(|_, _| false);
                let mut s = demo::cluster().services.values().next().expect("svc").clone();
                s.key = ObjectKey::new("default", evil);
                c.services.insert(s.key.clone(), s);
                c
            })
            .snapshot(),
        )),
        view: Some(View::Service),
    });
    settle().await;
    assert!(all(&root, "img").is_empty());
    assert!(text(&one(&root, "[data-testid=service-name]")).contains(evil));
}

#[wasm_bindgen_test]
async fn service_view_traces_each_rule_to_the_service_field() {
    let root = app(demo_snapshot(), View::Service);
    settle().await;
    let name = text(&one(&root, "[data-testid=service-name]"));
    assert!(name.starts_with("default/"), "{name}");
    let rows = all(&root, "[data-testid=program] tbody tr");
    assert!(!rows.is_empty(), "no rules for {name}");
    for r in &rows {
        let field = text(&one(r, ".field"));
        assert!(!field.trim().is_empty(), "a rule without the field that made it: {}", text(r));
    }
}

/// Stepping shows one more message or note per click; playing moves the packet dot along.
#[wasm_bindgen_test]
async fn the_diagram_animates_step_by_step() {
    let d = nodeport_diagram();
    let steps = d.messages.len() + d.notes.len();
    let root = mount::<FlowDiagram>(DiagramProps {
        diagram: d.clone(),
        autoplay: false,
        speed: 1.0,
        command: None,
        on_finished: Default::default(),
        on_speed: Default::default(),
        name: "t".into(),
    });
    settle().await;
    let diagram = one(&root, "[data-testid=diagram]");
    let step = || diagram.get_attribute("data-step").unwrap_or_default();
    assert_eq!(step(), "0");
    assert_eq!(diagram.get_attribute("data-steps").as_deref(), Some(steps.to_string().as_str()));
    assert_eq!(all(&root, ".step").len(), 1, "only the first step is being drawn");
    click(&root, "[data-testid=step-forward]");
    settle().await;
    assert_eq!(step(), "1");
    click(&root, "[data-testid=step-forward]");
    settle().await;
    assert_eq!(step(), "2");
    assert_eq!(all(&root, ".step").len(), 3, "two shown, one being drawn");
    assert!(text(&one(&root, "[data-testid=inspector]")).contains("Step 3 of"));
    click(&root, "[data-testid=step-back]");
    settle().await;
    assert_eq!(step(), "1");

    // Play: the dot moves along the current arrow and steps advance on their own.
    click(&root, "[data-testid=play]");
    let mut xs = Vec::new();
    // Notes show no dot; within a few seconds at speed 1 a message is on its way.
    for _ in 0..100 {
        sleep(Duration::from_millis(50)).await;
        if let Some(dot) = root.query_selector("[data-testid=packet-dot]").expect("selector") {
            xs.push(dot.get_attribute("cx").unwrap_or_default());
        }
    }
    xs.dedup();
    assert!(xs.len() >= 3, "the dot did not move: {xs:?}");
    assert!(until(8_000, || step().parse::<usize>().unwrap_or(0) >= 3).await, "playing did not advance");
    // The translation notes of a NodePort flow are drawn where they happen.
    click(&root, "[data-testid=play]");
    for _ in 0..steps {
        click(&root, "[data-testid=step-forward]");
    }
    settle().await;
    assert_eq!(step(), steps.to_string());
    let svg = text(&one(&root, "svg.seq"));
    assert!(svg.contains("dnat to 10.244."), "{svg}");
    assert!(svg.contains("masquerade"), "{svg}");
    assert!(svg.contains("conntrack reverses"), "{svg}");
}

fn painted_pixels(canvas: &HtmlCanvasElement) -> usize {
    let ctx: web_sys::CanvasRenderingContext2d =
        canvas.get_context("2d").expect("2d").expect("a context").dyn_into().expect("2d context");
    let data = ctx.get_image_data(0.0, 0.0, canvas.width() as f64, canvas.height() as f64).expect("pixels").data();
    // Anything that is not the white background: bars, axes, labels.
    data.chunks(4).filter(|p| p[3] > 0 && (p[0] < 200 || p[1] < 200 || p[2] < 200)).count()
}

#[wasm_bindgen_test]
async fn charts_draw_on_a_canvas() {
    for data in [
        ChartData::Latency(vec![(0.0, 1.0, 3), (1.0, 2.0, 7), (2.0, 3.0, 1)]),
        ChartData::Rules(vec![(0.0, 100.0), (6.0, 110.0), (14.0, 108.0)]),
        ChartData::Spread(vec![("10.244.1.10:8080".into(), 0.4, 0.5), ("10.244.2.15:8080".into(), 0.6, 0.5)]),
    ] {
        let root = mount::<Chart>(ChartProps { data, title: "t".into(), dark: false, width: 400, height: 240 });
        settle().await;
        let canvas: HtmlCanvasElement = one(&root, "canvas").dyn_into().expect("canvas");
        let painted = painted_pixels(&canvas);
        assert!(painted > 500, "only {painted} pixels painted");
    }
}

/// Demo mode: the engine's scenario runs in the page, flows arrive, one is selected and drawn.
#[wasm_bindgen_test]
async fn demo_mode_runs_the_engine_and_flows_appear() {
    let root = mount::<App>(AppProps { boot: Boot::Demo, view: Some(View::Flows) });
    assert!(until(6_000, || all(&root, ".flow-row").len() >= 3).await, "no flows after 6 s");
    assert_eq!(text(&one(&root, "[data-testid=mode]")), "demo");
    assert!(until(2_000, || root.query_selector("[data-testid=diagram]").ok().flatten().is_some()).await);
    let title = text(&one(&root, "[data-testid=diagram-title]"));
    assert!(title.contains("via node-"), "{title}");
    // The charts view draws from the same stream.
    click(&root, "[data-testid=tab-charts]");
    settle().await;
    let canvases = all(&root, "canvas");
    assert!(canvases.len() >= 2);
    let c: HtmlCanvasElement = canvases[0].clone().dyn_into().expect("canvas");
    assert!(painted_pixels(&c) > 500);
    // Events: the initial sync is on the timeline.
    click(&root, "[data-testid=tab-events]");
    settle().await;
    assert!(!all(&root, "[data-testid=syncs] tbody tr").is_empty());
}

/// The composer traces in the page and lists every outcome with its probability.
#[wasm_bindgen_test]
async fn the_composer_traces_a_packet_with_all_outcomes() {
    let root = mount::<Composer>(ComposerProps { cluster: Rc::new(demo::cluster()), live: false });
    settle().await;
    click(&root, "[data-testid=composer-trace]");
    settle().await;
    assert_eq!(text(&one(&root, "[data-testid=composer-verdict]")), "forward");
    let outcomes = text(&one(&root, "[data-testid=composer-outcomes]"));
    assert!(outcomes.contains("%"), "{outcomes}");
    assert!(root.query_selector("[data-testid=diagram]").expect("selector").is_some());
    // nginx-svc's NodePort on node-3 from outside: two endpoints, half each, both masqueraded.
    let target: web_sys::HtmlSelectElement = one(&root, "[data-testid=composer-target]").dyn_into().expect("select");
    let options = all(&root, "[data-testid=composer-target] option");
    let pick = options
        .iter()
        .find(|o| text(o).starts_with("default/nginx-svc:http on node-3"))
        .and_then(|o| o.get_attribute("value"))
        .expect("nginx's NodePort on node-3 is offered");
    target.set_value(&pick);
    target.dispatch_event(&web_sys::Event::new("change").expect("event")).expect("dispatch");
    settle().await;
    click(&root, "[data-testid=composer-trace]");
    settle().await;
    let rows: Vec<String> = all(&root, "[data-testid=composer-outcomes] tbody tr").iter().map(text).collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|r| r.contains("50.0%") && r.contains("masqueraded")), "{rows:?}");
    assert!(text(&root).contains("switchyard trace --node node-3 --from 198.51.100.23 --to 192.168.1.13:30080"));
}

#[wasm_bindgen_test]
async fn keyboard_switches_views_and_the_theme_toggle_sets_the_attribute() {
    let root = app(demo_snapshot(), View::Flows);
    settle().await;
    let key = |k: &str| {
        let init = web_sys::KeyboardEventInit::new();
        init.set_key(k);
        init.set_bubbles(true);
        let e = web_sys::KeyboardEvent::new_with_keyboard_event_init_dict("keydown", &init).expect("event");
        gloo::utils::document().dispatch_event(&e).expect("dispatch");
    };
    key("1");
    settle().await;
    assert_eq!(one(&root, "[data-testid=app]").get_attribute("data-view").as_deref(), Some("cluster"));
    key("5");
    settle().await;
    assert_eq!(one(&root, "[data-testid=app]").get_attribute("data-view").as_deref(), Some("events"));
    let html = gloo::utils::document().document_element().expect("html");
    let before = html.get_attribute("data-theme");
    click(&root, "[data-testid=theme]");
    settle().await;
    assert_ne!(html.get_attribute("data-theme"), before);
}

/// Pasted YAML: a problem names the file, the document and the field; a good file becomes the
/// cluster the views show.
#[wasm_bindgen_test]
async fn pasted_yaml_is_explored_offline_and_its_problems_are_located() {
    let root = app(demo_snapshot(), View::Flows);
    settle().await;
    click(&root, "[data-testid=open-loader]");
    settle().await;
    let area: web_sys::HtmlTextAreaElement = one(&root, "[data-testid=loader-text]").dyn_into().expect("textarea");
    let paste = |text: &str| {
        area.set_value(text);
        area.dispatch_event(&web_sys::InputEvent::new("input").expect("event")).expect("dispatch");
    };
    paste(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  ports: [{port: notaport}]\n",
    );
    settle().await;
    click(&root, "[data-testid=loader-load]");
    settle().await;
    let problems = text(&one(&root, "[data-testid=loader-problems]"));
    assert!(problems.contains("pasted.yaml: document 1"), "{problems}");
    assert!(problems.contains("spec.ports[0].port"), "{problems}");

    let yaml = "apiVersion: v1\nkind: Node\nmetadata: {name: worker-a}\nstatus:\n  addresses: [{type: InternalIP, address: 172.16.0.5}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.0.0.80\n  ports: [{port: 80, targetPort: 8080}]\n";
    paste(yaml);
    settle().await;
    click(&root, "[data-testid=loader-load]");
    settle().await;
    assert!(text(&one(&root, "[data-testid=mode]")).contains("offline: pasted.yaml"));
    let nodes = text(&one(&root, "[data-testid=nodes]"));
    assert!(nodes.contains("worker-a") && nodes.contains("172.16.0.5"), "{nodes}");
    assert!(text(&root).contains("shop/web"));
    assert!(root.query_selector("[data-testid=loader]").expect("selector").is_none(), "the loader closes");
}
