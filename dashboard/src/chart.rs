//! Line charts as SVG text, drawn by hand: a polyline per series over a shared x span,
//! scaled to the highest value shown.

/// One line: its CSS class, its colour (a CSS value, such as `var(--line-vip)`, so the
/// theme sets it), and its (x, y) points in order of x.
pub struct Series {
    pub class: &'static str,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
}

/// A chart `w` × `h` (viewBox units; it stretches to its box), with `caption` at its top
/// left (`{peak}` in it becomes the highest value) unless it is empty.
pub fn svg(series: &[Series], w: f64, h: f64, caption: &str) -> String {
    let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let peak = ys.fold(0.0, f64::max);
    let scale = if peak > 0.0 { peak } else { 1.0 };
    let xs = || series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let x0 = xs().fold(f64::INFINITY, f64::min);
    let span = (xs().fold(f64::NEG_INFINITY, f64::max) - x0).max(1e-9);
    let mut out = format!(
        r##"<svg viewBox="0 0 {w} {vh}" preserveAspectRatio="none" width="100%" height="{vh}" aria-hidden="true">"##,
        vh = h + 2.0
    );
    out.push_str(&format!(r##"<line x1="0" y1="{h}" x2="{w}" y2="{h}" style="stroke: var(--strong-border)"/>"##));
    for s in series {
        let points: Vec<String> = s
            .points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", (x - x0) / span * w, h - y / scale * (h - 4.0)))
            .collect();
        out.push_str(&format!(
            r##"<polyline class="{}" fill="none" style="stroke: {}" stroke-width="1.5" points="{}"/>"##,
            s.class,
            s.color,
            points.join(" ")
        ));
    }
    if !caption.is_empty() {
        let text = caption.replace("{peak}", &short(peak));
        out.push_str(&format!(r##"<text x="2" y="10" font-size="9" style="fill: var(--muted)">{text}</text>"##));
    }
    out.push_str("</svg>");
    out
}

/// A figure in a few characters: 0.25, 12.5, 1234, 12.3k.
pub fn short(v: f64) -> String {
    match v.abs() {
        a if a >= 10_000.0 => format!("{:.1}k", v / 1000.0),
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 1.0 => format!("{v:.1}"),
        0.0 => "0".into(),
        _ => format!("{v:.2}"),
    }
}
