//! Line charts as server-rendered SVG (maud): the status page's pictures of the last 15 minutes,
//! with no script and no request of their own.

use maud::{Markup, html};

const WIDTH: f64 = 600.0;
const HEIGHT: f64 = 140.0;
/// Room on the left for the scale, below for the time axis.
const LEFT: f64 = 56.0;
const BOTTOM: f64 = 18.0;
const TOP: f64 = 8.0;

/// One line: its name, colour, and a value per slot (`None` where there is none, drawn as a gap).
pub(crate) struct Series<'a> {
    pub(crate) name: &'a str,
    pub(crate) colour: &'a str,
    pub(crate) values: Vec<Option<f64>>,
}

/// A chart of `series` over the window, oldest on the left; `unit` formats the scale's top value.
pub(crate) fn line_chart(
    id: &str,
    title: &str,
    series: &[Series<'_>],
    unit: impl Fn(f64) -> String,
) -> Markup {
    let top = series
        .iter()
        .flat_map(|s| s.values.iter().flatten())
        .fold(0.0_f64, |top, v| top.max(*v));
    let top = if top > 0.0 { nice_ceiling(top) } else { 1.0 };
    let slots = series.iter().map(|s| s.values.len()).max().unwrap_or(0);
    let x = |index: usize| {
        LEFT + (WIDTH - LEFT) * index as f64 / (slots.saturating_sub(1).max(1)) as f64
    };
    let y = |value: f64| TOP + (HEIGHT - TOP - BOTTOM) * (1.0 - value / top);
    let label = format!("{title}; scale 0 to {}", unit(top));
    html! {
        figure {
            figcaption { (title) }
            svg id=(id) class="chart" role="img" aria-label=(label)
                viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) width=(WIDTH) height=(HEIGHT)
                xmlns="http://www.w3.org/2000/svg" {
                line class="axis" x1=(LEFT) y1=(y(0.0)) x2=(WIDTH) y2=(y(0.0)) {}
                line class="grid" x1=(LEFT) y1=(y(top)) x2=(WIDTH) y2=(y(top)) {}
                text x=(LEFT - 4.0) y=(y(top) + 4.0) text-anchor="end" { (unit(top)) }
                text x=(LEFT - 4.0) y=(y(0.0) + 4.0) text-anchor="end" { "0" }
                text x=(LEFT) y=(HEIGHT - 4.0) { "15 min ago" }
                text x=(WIDTH) y=(HEIGHT - 4.0) text-anchor="end" { "now" }
                @for line in series {
                    @for run in runs(&line.values) {
                        @let points = run.iter().map(|(i, v)| format!("{:.1},{:.1}", x(*i), y(*v))).collect::<Vec<_>>().join(" ");
                        @if run.len() == 1 {
                            circle cx=(x(run[0].0)) cy=(y(run[0].1)) r="2" fill=(line.colour) {}
                        } @else {
                            polyline class="series" points=(points) fill="none" stroke=(line.colour) stroke-width="1.5" {}
                        }
                    }
                }
            }
            @if series.len() > 1 {
                p class="legend" {
                    @for line in series {
                        span style=(format!("color:{}", line.colour)) { "━ " } (line.name) " "
                    }
                }
            }
        }
    }
}

/// The unbroken runs of present values, with their slot index.
fn runs(values: &[Option<f64>]) -> Vec<Vec<(usize, f64)>> {
    let mut runs: Vec<Vec<(usize, f64)>> = vec![];
    let mut current = vec![];
    for (index, value) in values.iter().enumerate() {
        match value {
            Some(v) => current.push((index, *v)),
            None if !current.is_empty() => runs.push(std::mem::take(&mut current)),
            None => {}
        }
    }
    if !current.is_empty() {
        runs.push(current);
    }
    runs
}

/// The smallest 1, 2 or 5 times a power of ten at or above `value`, as the literal it is (so that
/// 5 × 10⁻² prints as 0.05, not 0.05000000000000001).
fn nice_ceiling(value: f64) -> f64 {
    let exponent = value.log10().floor() as i32;
    [1, 2, 5, 10]
        .iter()
        .filter_map(|step| format!("{step}e{exponent}").parse::<f64>().ok())
        .find(|candidate| *candidate >= value * (1.0 - 1e-9))
        .unwrap_or_else(|| 10f64.powi(exponent + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_split_the_line_and_the_scale_is_round() {
        assert_eq!(
            runs(&[Some(1.0), None, Some(2.0), Some(3.0)]),
            vec![vec![(0, 1.0)], vec![(2, 2.0), (3, 3.0)]]
        );
        assert_eq!(nice_ceiling(0.0031), 0.005);
        assert_eq!(nice_ceiling(120.0), 200.0);
        assert_eq!(nice_ceiling(1.0), 1.0);
        for (value, shown) in [
            (0.031, "0.05"),
            (0.0007, "0.001"),
            (0.17, "0.2"),
            (3.3, "5"),
        ] {
            assert_eq!(nice_ceiling(value).to_string(), shown);
        }
        let svg = line_chart(
            "c",
            "t",
            &[Series {
                name: "a",
                colour: "#000",
                values: vec![Some(1.0), Some(3.0)],
            }],
            |v| format!("{v}/s"),
        )
        .into_string();
        assert!(svg.contains("<polyline"), "{svg}");
        assert!(svg.contains(">5/s<"), "{svg}");
    }
}
