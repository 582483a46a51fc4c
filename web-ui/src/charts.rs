//! Charts drawn with plotters on a canvas: the sync latency histogram, the rules programmed over
//! time, and how connections spread over a service's endpoints against the shares the tracer
//! expected. The data is computed by [`crate::state`]; this only draws it after each render.

use plotters::prelude::*;
use plotters_canvas::CanvasBackend;
use yew::prelude::*;

/// What one chart shows.
#[derive(Debug, Clone, PartialEq)]
pub enum ChartData {
    /// `(from ms, to ms, syncs)` bins.
    Latency(Vec<(f64, f64, u32)>),
    /// `(seconds, rules)` after each sync.
    Rules(Vec<(f64, f64)>),
    /// `(endpoint, observed share, expected share)`.
    Spread(Vec<(String, f64, f64)>),
}

#[derive(Properties, PartialEq)]
pub struct ChartProps {
    pub data: ChartData,
    pub title: AttrValue,
    #[prop_or(false)]
    pub dark: bool,
    #[prop_or(560)]
    pub width: u32,
    #[prop_or(300)]
    pub height: u32,
}

pub struct Chart {
    canvas: NodeRef,
}

impl Component for Chart {
    type Message = ();
    type Properties = ChartProps;

    fn create(_ctx: &Context<Self>) -> Self {
        Chart { canvas: NodeRef::default() }
    }

    fn view(&self, ctx: &Context<Self>) -> Html {
        let p = ctx.props();
        html! {
            <figure class="chart">
                <canvas ref={self.canvas.clone()} width={p.width.to_string()} height={p.height.to_string()}
                        role="img" aria-label={p.title.clone()} data-testid="chart-canvas"></canvas>
                <figcaption>{ p.title.clone() }</figcaption>
            </figure>
        }
    }

    fn rendered(&mut self, ctx: &Context<Self>, _first: bool) {
        if let Some(canvas) = self.canvas.cast::<web_sys::HtmlCanvasElement>()
            && let Some(backend) = CanvasBackend::with_canvas_object(canvas)
        {
            // A chart that cannot draw (a zero-sized canvas) leaves the canvas blank.
            let _ = draw(backend, ctx.props());
        }
    }
}

struct Palette {
    bg: RGBColor,
    fg: RGBColor,
    grid: RGBColor,
    a: RGBColor,
    b: RGBColor,
}

fn palette(dark: bool) -> Palette {
    if dark {
        Palette {
            bg: RGBColor(24, 28, 36),
            fg: RGBColor(220, 226, 236),
            grid: RGBColor(58, 64, 78),
            a: RGBColor(96, 150, 255),
            b: RGBColor(255, 150, 90),
        }
    } else {
        Palette {
            bg: RGBColor(255, 255, 255),
            fg: RGBColor(40, 46, 60),
            grid: RGBColor(226, 230, 238),
            a: RGBColor(36, 99, 235),
            b: RGBColor(234, 110, 40),
        }
    }
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw(backend: CanvasBackend, p: &ChartProps) -> DrawResult {
    let c = palette(p.dark);
    let root = backend.into_drawing_area();
    root.fill(&c.bg)?;
    let font = ("sans-serif", 13).into_font().color(&c.fg);
    let label = ("sans-serif", 11).into_font().color(&c.fg);
    match &p.data {
        ChartData::Latency(bins) => {
            let max_x = bins.last().map(|b| b.1).unwrap_or(1.0).max(0.001);
            let max_y = bins.iter().map(|b| b.2).max().unwrap_or(0).max(1) as f64 * 1.15;
            let mut chart = ChartBuilder::on(&root)
                .margin(12)
                .caption("sync duration (ms)", font)
                .x_label_area_size(28)
                .y_label_area_size(40)
                .build_cartesian_2d(0.0..max_x, 0.0..max_y)?;
            chart
                .configure_mesh()
                .light_line_style(c.grid)
                .bold_line_style(c.grid)
                .axis_style(c.fg)
                .label_style(label)
                .x_desc("ms")
                .y_desc("syncs")
                .draw()?;
            chart.draw_series(
                bins.iter().map(|(lo, hi, n)| Rectangle::new([(*lo, 0.0), (*hi, *n as f64)], c.a.mix(0.8).filled())),
            )?;
        }
        ChartData::Rules(points) => {
            let max_x = points.iter().map(|p| p.0).fold(1.0_f64, f64::max);
            let min_x = points.iter().map(|p| p.0).fold(max_x, f64::min).min(max_x - 0.001);
            let max_y = points.iter().map(|p| p.1).fold(1.0_f64, f64::max) * 1.15;
            let mut chart = ChartBuilder::on(&root)
                .margin(12)
                .caption("rules programmed", font)
                .x_label_area_size(28)
                .y_label_area_size(48)
                .build_cartesian_2d(min_x..max_x, 0.0..max_y)?;
            chart
                .configure_mesh()
                .light_line_style(c.grid)
                .bold_line_style(c.grid)
                .axis_style(c.fg)
                .label_style(label)
                .x_desc("seconds")
                .draw()?;
            chart.draw_series(LineSeries::new(points.iter().copied(), c.a.stroke_width(2)))?;
            chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, c.a.filled())))?;
        }
        ChartData::Spread(rows) => {
            let n = rows.len().max(1);
            let max_y = rows.iter().map(|r| r.1.max(r.2)).fold(0.1_f64, f64::max) * 1.2;
            let mut chart = ChartBuilder::on(&root)
                .margin(12)
                .caption("connections per endpoint: observed (blue) vs expected (orange)", font)
                .x_label_area_size(34)
                .y_label_area_size(44)
                .build_cartesian_2d(0.0..n as f64, 0.0..max_y)?;
            let names: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
            chart
                .configure_mesh()
                .light_line_style(c.grid)
                .bold_line_style(c.grid)
                .axis_style(c.fg)
                .label_style(label)
                .x_labels(n)
                .x_label_formatter(&|x| names.get(x.floor() as usize).cloned().unwrap_or_default())
                .y_label_formatter(&|y| format!("{:.0}%", y * 100.0))
                .disable_x_mesh()
                .draw()?;
            chart.draw_series(
                rows.iter()
                    .enumerate()
                    .map(|(i, r)| Rectangle::new([(i as f64 + 0.12, 0.0), (i as f64 + 0.48, r.1)], c.a.filled())),
            )?;
            chart.draw_series(
                rows.iter()
                    .enumerate()
                    .map(|(i, r)| Rectangle::new([(i as f64 + 0.52, 0.0), (i as f64 + 0.88, r.2)], c.b.filled())),
            )?;
        }
    }
    root.present()?;
    Ok(())
}
