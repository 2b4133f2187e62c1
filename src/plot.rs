//! The replay score plot (`darkwatch replay --plot out.png`): one PNG with the score over
//! frame index, the threshold, alert spans and labelled anomaly segments.
//!
//! `replay` feeds it the scores it collected, the threshold per frame, the alert spans of
//! its [`crate::alert`] episodes and the label file's segments; nothing reads it back. Text
//! is drawn with a bundled DejaVu Sans (`assets/fonts/`, registered with plotters'
//! `ab_glyph` backend), so neither the build nor the run needs system fonts.
//!
//! Scores can span −400…1e7 (wnll): the linear view clips the y-axis to a robust range
//! (see [`PlotSpec::log_scale`]) and draws clipped frames at the edge; the long series is
//! reduced to the minimum and maximum per pixel column, so single-frame spikes survive.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontStyle, register_font};

/// Default image size in pixels (width, height).
pub const DEFAULT_SIZE_PX: (u32, u32) = (1600, 500);

/// Smallest and largest accepted image side in pixels.
const MIN_SIDE_PX: u32 = 200;
const MAX_SIDE_PX: u32 = 16_384;

/// The bundled font, under the family name plotters uses by default.
static FONT_TTF: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
const FONT_FAMILY: &str = "sans-serif";

/// Pixels left of the plot area (y labels) and around it; used to size the downsampling.
const Y_LABEL_AREA_PX: u32 = 90;
const X_LABEL_AREA_PX: u32 = 45;
const MARGIN_PX: u32 = 12;

/// What to draw.
#[derive(Debug, Clone)]
pub struct PlotSpec<'a> {
    /// Caption; the y-scale note (clip range or log shift) is appended.
    pub title: String,
    /// One score per frame; NaN frames leave a gap, ±inf is drawn at the edge.
    pub scores: &'a [f32],
    /// Threshold per frame (same length as `scores`), drawn as a dashed red line.
    pub thresholds: Option<&'a [f64]>,
    /// Alert episodes as inclusive frame ranges: translucent red bands on top.
    pub alert_spans: &'a [(usize, usize)],
    /// Labelled anomaly segments as inclusive frame ranges: blue bands behind the score.
    pub label_spans: &'a [(usize, usize)],
    /// `false`: a linear y-axis clipped to the robust range
    /// `[p0.5 − (p99.9 − p0.5)/2, max(p99.9 + 2·|p99.9|, 1.5·p99 threshold)]` (narrowed to
    /// the data where nothing lies beyond), frames outside drawn at the edge.
    /// `true`: a symmetric log axis `sign(s)·log10(1 + |s|/c)`, linear within ±c, where
    /// `c` is the power of ten at or below the 1st percentile of the non-zero `|score|`;
    /// nothing is clipped and negative scores keep their sign.
    pub log_scale: bool,
    /// Image size in pixels (width, height); [`DEFAULT_SIZE_PX`] unless set.
    pub size_px: (u32, u32),
    /// The input row of `scores[0]`, added to the frame axis's labels (a lag-windowed model
    /// scores from row `w − 1`, as `replay`'s CSV numbers its frames).
    pub first_frame: usize,
}

impl<'a> PlotSpec<'a> {
    /// A linear plot of `scores` at the default size, without threshold or spans.
    pub fn new(title: impl Into<String>, scores: &'a [f32]) -> Self {
        PlotSpec {
            title: title.into(),
            scores,
            thresholds: None,
            alert_spans: &[],
            label_spans: &[],
            log_scale: false,
            size_px: DEFAULT_SIZE_PX,
            first_frame: 0,
        }
    }
}

/// A plot that could not be made; every variant names the output path.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{path}: nothing to plot: no finite score among {frames} frames")]
    NoScores { path: PathBuf, frames: usize },
    #[error("{path}: {thresholds} thresholds for {scores} scores; need one per frame")]
    ThresholdLength {
        path: PathBuf,
        thresholds: usize,
        scores: usize,
    },
    #[error(
        "{path}: image size {width}x{height} px; each side must be {MIN_SIDE_PX}..={MAX_SIDE_PX}"
    )]
    Size {
        path: PathBuf,
        width: u32,
        height: u32,
    },
    #[error("{path}: cannot draw the plot: {reason}")]
    Draw { path: PathBuf, reason: String },
    #[error("{path}: cannot write the plot: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Renders `spec` as a PNG at `path`. The image is drawn into a hidden temporary file
/// beside `path` and renamed into place, so a failed plot leaves no partial file.
///
/// # Errors
/// No finite score, a threshold slice of the wrong length, an image side outside
/// 200..=16384 px, or a drawing or file error.
pub fn score_plot(path: &Path, spec: &PlotSpec<'_>) -> Result<(), PlotError> {
    let view = View::new(path, spec)?;
    let file_name = path
        .file_name()
        .map_or_else(|| "plot".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{file_name}.{}.tmp.png", std::process::id()));
    let drawn = draw(&tmp, spec, &view).map_err(|reason| PlotError::Draw {
        path: path.to_path_buf(),
        reason,
    });
    let result = drawn.and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|source| PlotError::Write {
            path: path.to_path_buf(),
            source,
        })
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Inclusive runs of non-zero flags (e.g. a label column) as frame ranges.
pub fn flag_spans(flags: &[u8]) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut start = None;
    for (i, &f) in flags.iter().enumerate() {
        match (f != 0, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                spans.push((s, i - 1));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        spans.push((s, flags.len() - 1));
    }
    spans
}

/// Registers the bundled font once per process.
fn ensure_font() -> Result<(), String> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok =
        *REGISTERED.get_or_init(|| register_font(FONT_FAMILY, FontStyle::Normal, FONT_TTF).is_ok());
    if ok {
        Ok(())
    } else {
        Err("the bundled font assets/fonts/DejaVuSans.ttf cannot be parsed".into())
    }
}

/// The y-axis: how values map to plot coordinates and what range is shown.
#[derive(Debug, Clone, Copy)]
struct View {
    /// `Some(c)`: plot the symmetric log `sign(v)·log10(1 + |v|/c)`.
    symlog: Option<f64>,
    y_lo: f64,
    y_hi: f64,
    /// Frames whose score lies outside `y_lo..=y_hi` (drawn at the edge).
    clipped_frames: usize,
}

impl View {
    fn new(path: &Path, spec: &PlotSpec<'_>) -> Result<Self, PlotError> {
        let (width, height) = spec.size_px;
        let sides = MIN_SIDE_PX..=MAX_SIDE_PX;
        if !sides.contains(&width) || !sides.contains(&height) {
            return Err(PlotError::Size {
                path: path.to_path_buf(),
                width,
                height,
            });
        }
        if let Some(t) = spec.thresholds
            && t.len() != spec.scores.len()
        {
            return Err(PlotError::ThresholdLength {
                path: path.to_path_buf(),
                thresholds: t.len(),
                scores: spec.scores.len(),
            });
        }
        let mut finite: Vec<f64> = spec
            .scores
            .iter()
            .map(|&s| f64::from(s))
            .filter(|s| s.is_finite())
            .collect();
        if finite.is_empty() {
            return Err(PlotError::NoScores {
                path: path.to_path_buf(),
                frames: spec.scores.len(),
            });
        }
        finite.sort_unstable_by(f64::total_cmp);
        let data_min = finite[0];
        let data_max = finite[finite.len() - 1];
        let (thr_min, thr_max) = spec
            .thresholds
            .unwrap_or(&[])
            .iter()
            .filter(|t| t.is_finite())
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &t| {
                (lo.min(t), hi.max(t))
            });

        if spec.log_scale {
            let mut magnitudes: Vec<f64> = finite
                .iter()
                .map(|v| v.abs())
                .filter(|&a| a > 0.0)
                .collect();
            magnitudes.sort_unstable_by(f64::total_cmp);
            let c = if magnitudes.is_empty() {
                1.0
            } else {
                10f64
                    .powf(quantile(&magnitudes, 0.01).log10().floor())
                    .clamp(1e-12, 1e12)
            };
            let mut view = View {
                symlog: Some(c),
                y_lo: f64::NEG_INFINITY,
                y_hi: f64::INFINITY,
                clipped_frames: 0,
            };
            let lo = view.map(data_min.min(thr_min));
            let hi = view.map(data_max.max(thr_max));
            let pad = 0.03 * (hi - lo).max(0.1);
            view.y_lo = lo - pad;
            view.y_hi = hi + pad;
            return Ok(view);
        }

        let q_lo = quantile(&finite, 0.005);
        let q_hi = quantile(&finite, 0.999);
        let mut hi = q_hi + 2.0 * q_hi.abs();
        // A streaming threshold can spike for a few frames (a GPD refit on a heavy tail);
        // its 99th percentile, not its maximum, sets the scale. Spikes run off the top.
        let mut thresholds: Vec<f64> = spec
            .thresholds
            .unwrap_or(&[])
            .iter()
            .copied()
            .filter(|t| t.is_finite())
            .collect();
        thresholds.sort_unstable_by(f64::total_cmp);
        let thr_hi = if thresholds.is_empty() {
            f64::NEG_INFINITY
        } else {
            quantile(&thresholds, 0.99)
        };
        if thr_hi.is_finite() {
            hi = hi.max(thr_hi + 0.5 * thr_hi.abs());
        }
        let y_hi = data_max.min(hi).max(thr_hi);
        let y_lo = data_min.max(q_lo - 0.5 * (q_hi - q_lo)).min(thr_min);
        let clipped_frames = spec
            .scores
            .iter()
            .filter(|&&s| {
                let s = f64::from(s);
                !s.is_nan() && (s < y_lo || s > y_hi)
            })
            .count();
        let span = y_hi - y_lo;
        let pad = if span > 0.0 {
            0.04 * span
        } else {
            0.1 * y_hi.abs().max(1.0)
        };
        Ok(View {
            symlog: None,
            y_lo: y_lo - pad,
            y_hi: y_hi + pad,
            clipped_frames,
        })
    }

    /// A value in plot coordinates, clamped into the view; NaN stays NaN.
    fn map(&self, v: f64) -> f64 {
        let y = match self.symlog {
            Some(c) => v.signum() * (v.abs() / c).ln_1p() / std::f64::consts::LN_10,
            None => v,
        };
        if y.is_nan() {
            y
        } else {
            y.clamp(self.y_lo, self.y_hi)
        }
    }

    /// The score at plot coordinate `y` (inverse of [`View::map`] inside the view).
    fn unmap(&self, y: f64) -> f64 {
        match self.symlog {
            Some(c) => y.signum() * c * (y.abs() * std::f64::consts::LN_10).exp_m1(),
            None => y,
        }
    }

    /// Tick values of the symmetric log axis: 0 and ±c·10^k, thinned to at most ~12.
    fn symlog_ticks(&self, c: f64) -> Vec<f64> {
        let (lo, hi) = (self.unmap(self.y_lo), self.unmap(self.y_hi));
        let decades = |m: f64| {
            if m <= c {
                0
            } else {
                (m / c).log10().floor() as i32
            }
        };
        let (kneg, kpos) = (decades(-lo), decades(hi));
        let step = ((kneg + kpos + 2) / 12 + 1).max(1) as usize;
        let mut ticks = Vec::new();
        if lo <= 0.0 && hi >= 0.0 {
            ticks.push(0.0);
        }
        for k in (0..=kpos).step_by(step) {
            let v = c * 10f64.powi(k);
            if v <= hi {
                ticks.push(v);
            }
        }
        for k in (0..=kneg).step_by(step) {
            let v = -c * 10f64.powi(k);
            if v >= lo {
                ticks.push(v);
            }
        }
        // The outermost decade is only partly in view: 2× and 5× its start label it, where
        // most of a stream's scores may lie (a trial's sat between 100 and 600, unlabelled).
        for m in [2.0, 5.0] {
            if step == 1 && c * 10f64.powi(kpos) * m <= hi {
                ticks.push(c * 10f64.powi(kpos) * m);
            }
            if step == 1 && lo < 0.0 && -c * 10f64.powi(kneg) * m >= lo {
                ticks.push(-c * 10f64.powi(kneg) * m);
            }
        }
        ticks
    }

    /// What the caption says about the y-axis.
    fn note(&self) -> String {
        match self.symlog {
            Some(c) => format!("symmetric log scale, linear within ±{}", short(c)),
            None if self.clipped_frames > 0 => format!(
                "y clipped to [{}, {}]; {} frames beyond drawn at the edge",
                short(self.y_lo),
                short(self.y_hi),
                self.clipped_frames
            ),
            None => String::new(),
        }
    }
}

/// Lower-rank quantile of sorted values: `sorted[floor(q·(n−1))]`. Unlike interpolation,
/// a single outlier among fewer than 1000 frames does not leak into p99.9.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let i = (q * (sorted.len() - 1) as f64).floor() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A number for axis labels and the caption: at most 3 decimals, exponent form when
/// large or tiny, no trailing zeros.
fn short(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        return "0".into();
    }
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    if (1e-3..1e5).contains(&a) {
        trim(format!("{v:.3}"))
    } else {
        let s = format!("{v:.2e}");
        match s.split_once('e') {
            Some((m, e)) => format!("{}e{e}", trim(m.to_string())),
            None => s,
        }
    }
}

/// The series reduced to at most two points (min and max, in frame order) per bucket of
/// `n / cols` frames, split into line segments at buckets without a value (NaN).
fn downsample(values: &[f64], cols: usize, view: &View) -> Vec<Vec<(f64, f64)>> {
    let n = values.len();
    let cols = cols.clamp(1, n.max(1));
    let mut segments = Vec::new();
    let mut current: Vec<(f64, f64)> = Vec::new();
    for b in 0..cols {
        let (i0, i1) = (b * n / cols, (b + 1) * n / cols);
        let mut lo: Option<(usize, f64)> = None;
        let mut hi: Option<(usize, f64)> = None;
        for (i, &v) in values[i0..i1].iter().enumerate() {
            if v.is_nan() {
                continue;
            }
            if lo.is_none_or(|(_, l)| v < l) {
                lo = Some((i0 + i, v));
            }
            if hi.is_none_or(|(_, h)| v > h) {
                hi = Some((i0 + i, v));
            }
        }
        let (Some(lo), Some(hi)) = (lo, hi) else {
            if !current.is_empty() {
                segments.push(std::mem::take(&mut current));
            }
            continue;
        };
        let (first, second) = if lo.0 <= hi.0 { (lo, hi) } else { (hi, lo) };
        current.push((first.0 as f64, view.map(first.1)));
        if second.0 != first.0 {
            current.push((second.0 as f64, view.map(second.1)));
        }
    }
    if !current.is_empty() {
        segments.push(current);
    }
    segments
}

/// Spans clipped to `0..n`, widened to at least `min_width` frames so they stay visible,
/// as `[x0, x1)` in frame coordinates.
fn band_ranges(spans: &[(usize, usize)], n: usize, min_width: f64) -> Vec<(f64, f64)> {
    spans
        .iter()
        .filter(|&&(s, e)| s <= e && s < n)
        .map(|&(s, e)| {
            let (x0, x1) = (s as f64 - 0.5, e.min(n - 1) as f64 + 0.5);
            let grow = (min_width - (x1 - x0)).max(0.0) / 2.0;
            (x0 - grow, x1 + grow)
        })
        .collect()
}

/// The frame axis's label at plot coordinate `x` (0 = the first score): its input row.
fn frame_label(x: f64, first_frame: usize) -> String {
    format!("{}", x.round() as i64 + first_frame as i64)
}

fn draw(tmp: &Path, spec: &PlotSpec<'_>, view: &View) -> Result<(), String> {
    ensure_font()?;
    let e = |err: &dyn std::fmt::Display| err.to_string();
    let n = spec.scores.len();
    let (width, height) = spec.size_px;
    let cols = width.saturating_sub(Y_LABEL_AREA_PX + 2 * MARGIN_PX).max(1) as usize;
    // Bands are at least 3 px wide so that one-frame alerts stay visible.
    let min_band_frames = 3.0 * n as f64 / cols as f64;

    let root = BitMapBackend::new(tmp, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let note = view.note();
    let caption = if note.is_empty() {
        spec.title.clone()
    } else {
        format!("{} ({note})", spec.title)
    };
    let (x_lo, x_hi) = (-0.5, (n as f64 - 0.5).max(0.5));
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, (FONT_FAMILY, 20))
        .margin(MARGIN_PX)
        .x_label_area_size(X_LABEL_AREA_PX)
        .y_label_area_size(Y_LABEL_AREA_PX)
        .build_cartesian_2d(x_lo..x_hi, view.y_lo..view.y_hi)
        .map_err(|x| e(&x))?;
    let y_fmt = |y: &f64| short(*y);
    let x_fmt = |x: &f64| frame_label(*x, spec.first_frame);
    let grid = RGBColor(215, 215, 215);
    let mut mesh = chart.configure_mesh();
    mesh.x_desc("frame")
        .y_desc(if view.symlog.is_some() {
            "score (symmetric log)"
        } else {
            "score"
        })
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .label_style((FONT_FAMILY, 14))
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(grid);
    if view.symlog.is_some() {
        // Nice ticks of the transformed axis are not nice scores: ticks are drawn below.
        mesh.y_labels(0);
    }
    mesh.draw().map_err(|x| e(&x))?;
    if let Some(c) = view.symlog {
        let tick_style =
            TextStyle::from((FONT_FAMILY, 14)).pos(Pos::new(HPos::Right, VPos::Center));
        // Zero first, then larger magnitudes; a tick closer than 16 px to a kept one is
        // dropped (around zero the ±c ticks crowd it).
        let mut ticks = view.symlog_ticks(c);
        ticks.sort_by(|a, b| {
            (*a != 0.0)
                .cmp(&(*b != 0.0))
                .then(b.abs().total_cmp(&a.abs()))
        });
        let mut kept_py: Vec<i32> = Vec::new();
        for v in ticks {
            let y = view.map(v);
            let py = chart.backend_coord(&(x_lo, y)).1;
            if kept_py.iter().any(|k| (k - py).abs() < 16) {
                continue;
            }
            kept_py.push(py);
            chart
                .draw_series(std::iter::once(PathElement::new(
                    [(x_lo, y), (x_hi, y)],
                    grid,
                )))
                .map_err(|x| e(&x))?;
            let (px, py) = chart.backend_coord(&(x_lo, y));
            root.draw(&PathElement::new([(px - 5, py), (px, py)], BLACK))
                .map_err(|x| e(&x))?;
            root.draw(&Text::new(short(v), (px - 8, py), tick_style.clone()))
                .map_err(|x| e(&x))?;
        }
    }

    let (y_lo, y_hi) = (view.y_lo, view.y_hi);
    let label_color = RGBColor(60, 110, 210).mix(0.18);
    let labels = band_ranges(spec.label_spans, n, min_band_frames);
    if !labels.is_empty() {
        chart
            .draw_series(
                labels.iter().map(|&(x0, x1)| {
                    Rectangle::new([(x0, y_lo), (x1, y_hi)], label_color.filled())
                }),
            )
            .map_err(|x| e(&x))?
            .label("labelled anomaly")
            .legend(|(x, y)| {
                Rectangle::new(
                    [(x, y - 6), (x + 16, y + 6)],
                    RGBColor(60, 110, 210).mix(0.4).filled(),
                )
            });
    }

    let score_color = RGBColor(25, 60, 120);
    let scores: Vec<f64> = spec.scores.iter().map(|&s| f64::from(s)).collect();
    let segments = downsample(&scores, cols, view);
    for (i, seg) in segments.iter().enumerate() {
        let anno = chart
            .draw_series(LineSeries::new(
                seg.iter().copied(),
                score_color.stroke_width(1),
            ))
            .map_err(|x| e(&x))?;
        if i == 0 {
            anno.label("score").legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 16, y)], score_color.stroke_width(2))
            });
        }
    }

    if let Some(thresholds) = spec.thresholds {
        let segments = downsample(thresholds, cols, view);
        let style = RED.stroke_width(2);
        for (i, seg) in segments.iter().enumerate() {
            // Collapse flat runs so the dash pattern runs over long straight pieces.
            let mut pts: Vec<(f64, f64)> = Vec::with_capacity(seg.len());
            for (k, &p) in seg.iter().enumerate() {
                let flat_inside = k > 0
                    && k + 1 < seg.len()
                    && pts.last().is_some_and(|q: &(f64, f64)| q.1 == p.1)
                    && seg[k + 1].1 == p.1;
                if !flat_inside {
                    pts.push(p);
                }
            }
            if pts.len() == 1 {
                pts.push((pts[0].0 + 0.5, pts[0].1));
            }
            let anno = chart
                .draw_series(DashedLineSeries::new(pts, 10, 6, style))
                .map_err(|x| e(&x))?;
            if i == 0 {
                anno.label("threshold")
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], style));
            }
        }
    }

    let alerts = band_ranges(spec.alert_spans, n, min_band_frames);
    if !alerts.is_empty() {
        let band = RED.mix(0.15);
        let strip = RED.mix(0.7);
        let strip_lo = y_hi - 0.03 * (y_hi - y_lo);
        chart
            .draw_series(alerts.iter().flat_map(|&(x0, x1)| {
                [
                    Rectangle::new([(x0, y_lo), (x1, y_hi)], band.filled()),
                    Rectangle::new([(x0, strip_lo), (x1, y_hi)], strip.filled()),
                ]
            }))
            .map_err(|x| e(&x))?
            .label("alert")
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 6), (x + 16, y + 6)], RED.mix(0.5).filled())
            });
    }

    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT_FAMILY, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(160, 160, 160))
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_labels_count_input_rows_from_the_first_scored_one() {
        assert_eq!(frame_label(0.0, 0), "0");
        assert_eq!(frame_label(2000.2, 0), "2000");
        // A 48-frame window scores from row 47.
        assert_eq!(frame_label(0.0, 47), "47");
        assert_eq!(frame_label(1999.6, 47), "2047");
    }

    /// Width and height from a PNG's IHDR chunk, after checking the signature.
    fn png_size(bytes: &[u8]) -> (u32, u32) {
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        assert_eq!(&bytes[12..16], b"IHDR");
        let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        (be(&bytes[16..20]), be(&bytes[20..24]))
    }

    fn synthetic(n: usize) -> (Vec<f32>, Vec<f64>) {
        let mut scores: Vec<f32> = (0..n)
            .map(|i| ((i as f32) * 0.05).sin() * 2.0 + 5.0 + ((i * 7919) % 13) as f32 * 0.1)
            .collect();
        scores[n / 3] = 1e7; // a wnll-sized spike
        scores[n / 2] = -400.0;
        scores[n / 2 + 1] = f32::NAN;
        for s in &mut scores[(2 * n / 3)..(2 * n / 3 + 40)] {
            *s += 20.0;
        }
        let thresholds = (0..n)
            .map(|i| if i < n / 2 { 12.0 } else { 14.0 })
            .collect();
        (scores, thresholds)
    }

    #[test]
    fn renders_a_png_of_the_requested_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scores.png");
        let n = 20_000;
        let (scores, thresholds) = synthetic(n);
        let alerts = [(2 * n / 3 + 2, 2 * n / 3 + 45), (n / 3, n / 3)];
        let labels = [(2 * n / 3, 2 * n / 3 + 39)];
        let spec = PlotSpec {
            thresholds: Some(&thresholds),
            alert_spans: &alerts,
            label_spans: &labels,
            size_px: (1200, 400),
            ..PlotSpec::new("synthetic replay", &scores)
        };
        score_plot(&path, &spec).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(png_size(&bytes), (1200, 400));
        // Nothing else left behind (the temporary file was renamed).
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        let log_path = dir.path().join("scores-log.png");
        let spec = PlotSpec {
            log_scale: true,
            ..spec
        };
        score_plot(&log_path, &spec).unwrap();
        assert_eq!(png_size(&std::fs::read(&log_path).unwrap()), (1200, 400));

        // Few frames: wide bands, raw points.
        let (small, small_thr) = synthetic(600);
        let small_path = dir.path().join("small.png");
        let small_alerts = [(402, 445)];
        let small_labels = [(400, 439)];
        let small_spec = PlotSpec {
            thresholds: Some(&small_thr),
            alert_spans: &small_alerts,
            label_spans: &small_labels,
            ..PlotSpec::new("600 frames", &small)
        };
        score_plot(&small_path, &small_spec).unwrap();
        assert_eq!(
            png_size(&std::fs::read(&small_path).unwrap()),
            DEFAULT_SIZE_PX
        );

        if let Ok(keep) = std::env::var("DARKWATCH_KEEP_PLOT") {
            std::fs::copy(&small_path, format!("{keep}/small.png")).unwrap();
            std::fs::copy(&path, format!("{keep}/scores.png")).unwrap();
            std::fs::copy(&log_path, format!("{keep}/scores-log.png")).unwrap();
        }
    }

    #[test]
    fn default_size_and_tiny_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("one.png");
        score_plot(&path, &PlotSpec::new("one frame", &[3.0])).unwrap();
        assert_eq!(png_size(&std::fs::read(&path).unwrap()), DEFAULT_SIZE_PX);
        let flat = [1.0f32; 5];
        let spec = PlotSpec {
            alert_spans: &[(0, 100), (4, 2)], // past the end, reversed: clipped, ignored
            ..PlotSpec::new("flat", &flat)
        };
        score_plot(&path, &spec).unwrap();
    }

    #[test]
    fn empty_or_nan_scores_are_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.png");
        let err = score_plot(&path, &PlotSpec::new("empty", &[])).unwrap_err();
        assert!(matches!(err, PlotError::NoScores { frames: 0, .. }));
        assert!(err.to_string().contains("empty.png"), "{err}");
        let nan = [f32::NAN; 3];
        let err = score_plot(&path, &PlotSpec::new("nan", &nan)).unwrap_err();
        assert!(matches!(err, PlotError::NoScores { frames: 3, .. }));
        assert!(!path.exists());
    }

    #[test]
    fn bad_thresholds_size_and_directory_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.png");
        let scores = [1.0f32, 2.0];
        let spec = PlotSpec {
            thresholds: Some(&[1.0]),
            ..PlotSpec::new("t", &scores)
        };
        assert!(matches!(
            score_plot(&path, &spec),
            Err(PlotError::ThresholdLength {
                thresholds: 1,
                scores: 2,
                ..
            })
        ));
        let spec = PlotSpec {
            size_px: (10, 10),
            ..PlotSpec::new("t", &scores)
        };
        assert!(matches!(
            score_plot(&path, &spec),
            Err(PlotError::Size { .. })
        ));
        let missing = dir.path().join("no/such/dir/p.png");
        let err = score_plot(&missing, &PlotSpec::new("t", &scores)).unwrap_err();
        assert!(err.to_string().contains("no/such/dir/p.png"), "{err}");
    }

    #[test]
    fn downsampling_keeps_single_frame_spikes() {
        let mut values = vec![0.0f64; 100_000];
        values[54_321] = 50.0;
        values[77_777] = -50.0;
        let view = View {
            symlog: None,
            y_lo: -100.0,
            y_hi: 100.0,
            clipped_frames: 0,
        };
        let segs = downsample(&values, 1000, &view);
        assert_eq!(segs.len(), 1);
        let pts = &segs[0];
        assert!(pts.len() <= 2000);
        assert!(pts.contains(&(54_321.0, 50.0)));
        assert!(pts.contains(&(77_777.0, -50.0)));
        // NaN runs split the line.
        values[10..300].fill(f64::NAN);
        assert_eq!(downsample(&values, 1000, &view).len(), 2);
    }

    #[test]
    fn linear_view_clips_huge_spikes_and_keeps_the_threshold() {
        let (scores, thresholds) = synthetic(10_000);
        let spec = PlotSpec {
            thresholds: Some(&thresholds),
            ..PlotSpec::new("t", &scores)
        };
        let v = View::new(Path::new("x.png"), &spec).unwrap();
        assert!(v.y_hi < 1e3, "the 1e7 spike is clipped: {v:?}");
        assert!(
            v.y_hi >= 14.0 * 1.5,
            "the threshold and headroom stay visible: {v:?}"
        );
        assert!(v.clipped_frames >= 2, "{v:?}");
        assert_eq!(v.map(1e7), v.y_hi);
        assert!(v.note().contains("clipped"));
        // Data that fits is not clipped.
        let tame = [1.0f32, 2.0, 3.0];
        let v = View::new(Path::new("x.png"), &PlotSpec::new("t", &tame)).unwrap();
        assert_eq!(v.clipped_frames, 0);
        assert!(v.y_lo < 1.0 && v.y_hi > 3.0 && v.y_hi < 4.0, "{v:?}");
    }

    /// A view whose top decade is partly shown (0.1 to 600 with c = 0.1: decades end at
    /// 100) gets 200 and 500 as well; one that ends at a decade gets no extra ticks.
    #[test]
    fn symlog_ticks_label_the_partial_top_decade() {
        // The view's ends in plot coordinates (what View::map gives, unclamped).
        let t = |x: f64| x.signum() * (x.abs() / 0.1).ln_1p() / std::f64::consts::LN_10;
        let view = |lo: f64, hi: f64| View {
            symlog: Some(0.1),
            y_lo: t(lo),
            y_hi: t(hi),
            clipped_frames: 0,
        };
        let close = |ticks: &[f64], want: f64| {
            ticks
                .iter()
                .any(|t| (t - want).abs() < 1e-9 * want.abs().max(1.0))
        };
        let ticks = view(0.0, 600.0).symlog_ticks(0.1);
        for want in [0.0, 0.1, 1.0, 10.0, 100.0, 200.0, 500.0] {
            assert!(close(&ticks, want), "{want}: {ticks:?}");
        }
        assert!(!close(&ticks, 1000.0), "{ticks:?}");
        let ticks = view(0.0, 150.0).symlog_ticks(0.1);
        assert!(!close(&ticks, 200.0), "{ticks:?}");
        // The negative side likewise.
        let ticks = view(-600.0, 1.0).symlog_ticks(0.1);
        assert!(close(&ticks, -500.0) && close(&ticks, -200.0), "{ticks:?}");
    }

    #[test]
    fn flag_spans_are_inclusive_runs() {
        assert_eq!(
            flag_spans(&[0, 1, 1, 0, 1, 0, 0, 1]),
            vec![(1, 2), (4, 4), (7, 7)]
        );
        assert!(flag_spans(&[]).is_empty());
        assert_eq!(flag_spans(&[1, 1]), vec![(0, 1)]);
    }
}
