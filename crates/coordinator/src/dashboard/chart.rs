//! Small charts drawn on the server as SVG (no script, no outside
//! library: the CSP stays strict). The geometry is computed here in a
//! 100 × 40 box the templates draw with `preserveAspectRatio="none"`;
//! strokes keep their width with `vector-effect` in the stylesheet.

use serde::Serialize;

/// Width and height of the drawing box.
pub const W: f64 = 100.0;
pub const H: f64 = 40.0;

/// One bar of a bar chart.
#[derive(Debug, Clone, Serialize)]
pub struct Bar {
    pub x: f64,
    pub y: f64,
    pub width: f64,
    pub height: f64,
    /// CSS class: the outcome it shows (`ok`, `fail`, `flaky`, ...).
    pub class: &'static str,
    pub title: String,
    pub href: String,
    pub value: f64,
}

/// Bars over items in order (oldest first), heights scaled to the largest.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BarChart {
    pub bars: Vec<Bar>,
    pub max: f64,
}

/// One item of a bar chart: (value, class, title, link).
pub type BarItem = (f64, &'static str, String, String);

pub fn bars(items: Vec<BarItem>) -> BarChart {
    let max = items.iter().map(|i| i.0).fold(0.0, f64::max);
    let n = items.len().max(1) as f64;
    let slot = W / n;
    let bars = items
        .into_iter()
        .enumerate()
        .map(|(i, (value, class, title, href))| {
            let height = if max > 0.0 {
                (value / max * (H - 1.0)).max(0.5)
            } else {
                0.5
            };
            Bar {
                x: i as f64 * slot + slot * 0.1,
                y: H - height,
                width: (slot * 0.8).max(0.2),
                height,
                class,
                title,
                href,
                value,
            }
        })
        .collect();
    BarChart { bars, max }
}

/// One line of a line chart.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    pub name: String,
    /// SVG `points`: "x,y x,y ...".
    pub points: String,
    /// Its colour slot (`s0` … `s5`).
    pub class: String,
    /// The newest value.
    pub last: f64,
    pub max: f64,
}

/// Lines over time, all on one scale (so they compare).
#[derive(Debug, Clone, Default, Serialize)]
pub struct LineChart {
    pub series: Vec<Series>,
    pub max: f64,
    /// Seconds since the epoch at the left and right edges.
    pub from: i64,
    pub to: i64,
}

/// `series`: (name, [(seconds since the epoch, value)]) with points in time
/// order.
pub fn lines(series: Vec<(String, Vec<(i64, f64)>)>) -> LineChart {
    let from = series
        .iter()
        .filter_map(|s| s.1.first().map(|p| p.0))
        .min()
        .unwrap_or(0);
    let to = series
        .iter()
        .filter_map(|s| s.1.last().map(|p| p.0))
        .max()
        .unwrap_or(from);
    let max = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    let span = (to - from).max(1) as f64;
    let y = |v: f64| {
        if max > 0.0 {
            H - v / max * (H - 1.0)
        } else {
            H
        }
    };
    let series = series
        .into_iter()
        .enumerate()
        .map(|(i, (name, pts))| Series {
            // One sample is a level line across the chart, not an
            // invisible dot.
            points: if pts.len() == 1 {
                format!("0.00,{:.2} {W:.2},{:.2}", y(pts[0].1), y(pts[0].1))
            } else {
                pts.iter()
                    .map(|(t, v)| format!("{:.2},{:.2}", (t - from) as f64 / span * W, y(*v)))
                    .collect::<Vec<_>>()
                    .join(" ")
            },
            class: format!("s{}", i % 6),
            last: pts.last().map_or(0.0, |p| p.1),
            max: pts.iter().map(|p| p.1).fold(0.0, f64::max),
            name,
        })
        .collect();
    LineChart {
        series,
        max,
        from,
        to,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_to_the_largest_and_fill_the_width() {
        let c = bars(vec![
            (10.0, "ok", "a".into(), "/a".into()),
            (40.0, "fail", "b".into(), "/b".into()),
        ]);
        assert_eq!(c.max, 40.0);
        assert_eq!(c.bars[1].height, H - 1.0);
        assert_eq!(c.bars[0].height, (H - 1.0) / 4.0);
        assert_eq!(c.bars[1].x, 50.0 + 5.0);
    }

    #[test]
    fn lines_share_one_scale() {
        let c = lines(vec![
            ("a".into(), vec![(100, 0.0), (200, 5.0)]),
            ("b".into(), vec![(100, 10.0), (200, 10.0)]),
        ]);
        assert_eq!(c.max, 10.0);
        assert_eq!(c.series[0].points, "0.00,40.00 100.00,20.50");
        assert_eq!(c.series[1].last, 10.0);
        assert_eq!((c.from, c.to), (100, 200));
        let one = lines(vec![("a".into(), vec![(100, 2.0)])]);
        assert_eq!(one.series[0].points, "0.00,1.00 100.00,1.00");
    }
}
