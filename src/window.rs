//! Lag windows: a frame becomes the last `w` frames of its stream, oldest first, so that an
//! autoencoder sees a value in its context. Without one, a one-feature stream gives the
//! network a single number to reconstruct: it can flag a value outside the usual range but
//! not a usual value at the wrong time.
//!
//! A windowed model's features are the lagged names (`cpu[t-2]`, `cpu[t-1]`, then `cpu`
//! for the current frame), so the scaler, the network, the head and the contributions work
//! on them unchanged; only the places that turn rows or messages into frames build the
//! windows: [`crate::model::fit`], replay and the harness from recorded rows, the agent
//! per stream ([`StreamWindows`]). `[model] window_frames` picks `w`; its
//! default gives one-feature series the period of their autocorrelation ([`auto_window`]).

use ndarray::{Array2, ArrayView1, ArrayView2};

/// Most frames a window may span (`[model] window_frames`).
pub const MAX_WINDOW_FRAMES: usize = 256;

/// Window of a one-feature series whose autocorrelation shows no period in range.
pub const FALLBACK_WINDOW_FRAMES: usize = 32;

/// Bounds of the automatic window: short enough that the network stays about as cheap as
/// the 38-feature default (64 inputs → [32, 16, 32]), long enough to hold a shape.
pub const AUTO_WINDOW_RANGE: (usize, usize) = (8, 64);

/// Lags the period search looks at, and the training values it reads.
const PERIOD_MAX_LAG: usize = 400;
const PERIOD_MAX_VALUES: usize = 20_000;
/// Periods accepted from the search (TSB-UAD's `find_length` bounds).
const PERIOD_RANGE: (usize, usize) = (3, 300);
/// Lowest autocorrelation a peak needs to count as a period: white noise has local peaks
/// of about 3/√n, which would otherwise pick an arbitrary window.
const PERIOD_MIN_PEAK: f64 = 0.1;

/// The feature names of a window of `w` frames over `base`: lags `w − 1` down to 1 as
/// `name[t-k]`, then the base names for the current frame.
pub fn lag_names(base: &[String], w: usize) -> Vec<String> {
    let mut names = Vec::with_capacity(base.len() * w);
    for k in (1..w).rev() {
        names.extend(base.iter().map(|n| format!("{n}[t-{k}]")));
    }
    names.extend(base.iter().cloned());
    names
}

/// The `d` names of the current frame among a window's `d·w` names: the last block.
pub fn base_names(features: &[String], w: usize) -> &[String] {
    &features[features.len() - features.len() / w.max(1)..]
}

/// The windows of recorded rows, built by [`StreamWindows`] as the agent and replay build
/// them: row `t` of the result holds rows `t ..= t + w − 1` of `values` side by side,
/// oldest first. The first `w − 1` rows only fill the first window, so there are
/// `n − w + 1` windows (none when there are fewer rows than `w`).
pub fn windows(values: ArrayView2<f32>, w: usize) -> Array2<f32> {
    let (n, d) = values.dim();
    let w = w.max(1);
    let rows = values.as_standard_layout();
    let mut out = Array2::<f32>::zeros((n.saturating_sub(w - 1), d * w));
    let mut stream = StreamWindows::new(w, d, f64::INFINITY);
    let mut slots = out.rows_mut().into_iter();
    for row in rows.rows() {
        let row = row.to_slice().expect("standard layout rows are contiguous");
        // A slot is taken only once the first window is full.
        if let Some(window) = stream.push(0, row, 0.0)
            && let Some(mut slot) = slots.next()
        {
            slot.assign(&ArrayView1::from(window));
        }
    }
    out
}

/// What the period search ([`period_search`]) found in a series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PeriodSearch {
    /// The lag of the highest autocorrelation peak, within [`PERIOD_RANGE`].
    Period(usize),
    /// The highest peak (at `lag`, autocorrelation `peak`) lies past 300 lags: TSB-UAD's
    /// `find_length` takes no period then, even if a lower peak lies in range.
    TooLong { lag: usize, peak: f64 },
    /// No local maximum of the autocorrelation over the lags searched reaches 0.1.
    NoPeak { max_lag: usize },
    /// Too few values to search (fewer than 10).
    TooShort,
    /// Every value the same, or not finite.
    Flat,
}

/// The dominant period of `series`, as TSB-UAD's `find_length` finds it: the lag of the
/// highest local maximum of the autocorrelation over lags 3 to 400 of the first 20,000
/// values, if that lag is at most 300 and the peak reaches 0.1. `None` for a constant,
/// too short or aperiodic series ([`period_search`] says which).
pub fn period(series: &[f32]) -> Option<usize> {
    match period_search(series) {
        PeriodSearch::Period(p) => Some(p),
        _ => None,
    }
}

/// [`period`], with the reason when there is none.
pub fn period_search(series: &[f32]) -> PeriodSearch {
    let x = &series[..series.len().min(PERIOD_MAX_VALUES)];
    let n = x.len();
    let max_lag = PERIOD_MAX_LAG.min(n / 2);
    if max_lag < PERIOD_RANGE.0 + 2 {
        return PeriodSearch::TooShort;
    }
    let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
    let c: Vec<f64> = x.iter().map(|&v| f64::from(v) - mean).collect();
    let var: f64 = c.iter().map(|v| v * v).sum();
    if !(var > 0.0 && var.is_finite()) {
        return PeriodSearch::Flat;
    }
    let acf: Vec<f64> = (0..=max_lag)
        .map(|k| {
            c[..n - k]
                .iter()
                .zip(&c[k..])
                .map(|(a, b)| a * b)
                .sum::<f64>()
                / var
        })
        .collect();
    let best = (PERIOD_RANGE.0..max_lag)
        .filter(|&k| acf[k] > acf[k - 1] && acf[k] > acf[k + 1] && acf[k] >= PERIOD_MIN_PEAK)
        .max_by(|&a, &b| acf[a].total_cmp(&acf[b]));
    match best {
        None => PeriodSearch::NoPeak { max_lag },
        Some(lag) if lag > PERIOD_RANGE.1 => PeriodSearch::TooLong {
            lag,
            peak: acf[lag],
        },
        Some(lag) => PeriodSearch::Period(lag),
    }
}

/// The window `[model] window_frames = 0` gives a training table of `d` features: 1 (no
/// window) for two or more features, where every frame already holds several views of
/// the same moment; for one feature, its period ([`period`]) clamped to
/// [`AUTO_WINDOW_RANGE`], or [`FALLBACK_WINDOW_FRAMES`] when it shows none; and never
/// more than an eighth of the rows, so that a short series keeps rows to train on.
pub fn auto_window(values: ArrayView2<f32>) -> usize {
    auto_window_explained(values).0
}

/// [`auto_window`], and why that window, in words for `train` to print: the period found,
/// or why the fallback was taken ("fallback: the highest autocorrelation peak, lag 336, is
/// above 300"), and any bound applied.
pub fn auto_window_explained(values: ArrayView2<f32>) -> (usize, String) {
    if values.ncols() != 1 {
        return (1, "two or more features get no window".into());
    }
    let series: Vec<f32> = values.column(0).to_vec();
    let (lo, hi) = AUTO_WINDOW_RANGE;
    let (w, mut why) = match period_search(&series) {
        PeriodSearch::Period(p) if p < lo => (
            lo,
            format!("the training series' period, lag {p}, raised to the {lo}-frame minimum"),
        ),
        PeriodSearch::Period(p) if p > hi => (
            hi,
            format!("the training series' period, lag {p}, lowered to the {hi}-frame maximum"),
        ),
        PeriodSearch::Period(p) => (p, format!("the training series' period, lag {p}")),
        PeriodSearch::TooLong { lag, .. } => (
            FALLBACK_WINDOW_FRAMES,
            format!(
                "fallback: the highest autocorrelation peak, lag {lag}, is above {}",
                PERIOD_RANGE.1
            ),
        ),
        PeriodSearch::NoPeak { max_lag } => (
            FALLBACK_WINDOW_FRAMES,
            format!(
                "fallback: no autocorrelation peak over lags {}–{max_lag} reaches {PERIOD_MIN_PEAK}",
                PERIOD_RANGE.0
            ),
        ),
        PeriodSearch::TooShort => (
            FALLBACK_WINDOW_FRAMES,
            "fallback: too few rows to look for a period".into(),
        ),
        PeriodSearch::Flat => (
            FALLBACK_WINDOW_FRAMES,
            "fallback: the training series is constant, so it has no period".into(),
        ),
    };
    let rows = values.nrows();
    let capped = w.min(rows / 8).max(1);
    if capped != w {
        why.push_str(&format!(
            "; {w} cut to {capped}, an eighth of the {rows} training rows"
        ));
    }
    (capped, why)
}

/// The agent's windows: per stream, the last `w` frames, oldest first, kept in one buffer
/// that shifts by a frame on each new one. A stream's first `w − 1` frames only fill its
/// window (there is nothing to score them with: a padded window would look unusual and
/// could fire an alert at every restart); from the `w`-th on, every frame yields its
/// window. After a silence longer than the window's span (`span_secs`, by the frames'
/// timestamps) the history is stale and the stream fills its window again. A frame with a
/// non-finite value does not enter the history, but always yields a window ending in it,
/// even while the stream is filling (the earlier slots then hold no real history), so
/// that the scorer counts and skips every bad frame. Allocates only when a stream is
/// first seen.
#[derive(Debug, Default)]
pub struct StreamWindows {
    w: usize,
    d: usize,
    span_secs: f64,
    /// Per stream index: the window (`w·d` values), how many frames it holds, and the
    /// timestamp of the newest.
    streams: Vec<(Vec<f32>, usize, f64)>,
    scratch: Vec<f32>,
}

impl StreamWindows {
    /// Windows of `w` frames of `d` values (`w` ≤ 1: frames pass through unchanged) that
    /// start over after a gap of more than `span_secs` (infinite: never).
    pub fn new(w: usize, d: usize, span_secs: f64) -> Self {
        StreamWindows {
            w: w.max(1),
            d,
            span_secs,
            streams: Vec::new(),
            scratch: vec![0.0; w.max(1) * d],
        }
    }

    /// Drops stream `stream`'s history (it was forgotten; its index may go to another
    /// stream, which then fills its own window).
    pub fn forget(&mut self, stream: usize) {
        if let Some((_, held, newest)) = self.streams.get_mut(stream) {
            *held = 0;
            *newest = f64::NAN;
        }
    }

    /// Adds `frame` (of `d` values, at time `t`) to stream `stream`'s history and returns
    /// the window to score, or `None` while the stream is filling its window (a frame
    /// with a non-finite value always gets one, to be counted bad). A frame of the wrong
    /// length passes through unchanged (the ring refuses it).
    pub fn push<'a>(&'a mut self, stream: usize, frame: &'a [f32], t: f64) -> Option<&'a [f32]> {
        let (w, d) = (self.w, self.d);
        if w == 1 || frame.len() != d {
            return Some(frame);
        }
        if self.streams.len() <= stream {
            self.streams
                .resize_with(stream + 1, || (vec![0.0; w * d], 0, f64::NAN));
        }
        let (window, held, newest) = &mut self.streams[stream];
        if t - *newest > self.span_secs {
            *held = 0;
        }
        if !crate::pipeline::all_finite(frame) {
            self.scratch[..(w - 1) * d].copy_from_slice(&window[d..]);
            self.scratch[(w - 1) * d..].copy_from_slice(frame);
            return Some(&self.scratch);
        }
        window.copy_within(d.., 0);
        window[(w - 1) * d..].copy_from_slice(frame);
        *held = (*held + 1).min(w);
        *newest = t;
        (*held == w).then_some(&window[..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn lag_names_put_the_oldest_first_and_the_current_frame_last() {
        let base = vec!["a".to_string(), "b".to_string()];
        assert_eq!(
            lag_names(&base, 3),
            ["a[t-2]", "b[t-2]", "a[t-1]", "b[t-1]", "a", "b"]
        );
        assert_eq!(lag_names(&base, 1), base);
        assert_eq!(base_names(&lag_names(&base, 3), 3), &base[..]);
        assert_eq!(base_names(&base, 1), &base[..]);
    }

    #[test]
    fn windows_hold_the_previous_rows_from_the_first_full_window_on() {
        let x = array![[1.0f32, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]];
        assert_eq!(
            windows(x.view(), 3),
            array![
                [1.0, 10.0, 2.0, 20.0, 3.0, 30.0],
                [2.0, 20.0, 3.0, 30.0, 4.0, 40.0],
            ]
        );
        assert_eq!(windows(x.view(), 1), x);
        // Any strides: a transposed view gives the same windows as its copy.
        let t = x.t().to_owned();
        assert_eq!(windows(t.t(), 2), windows(x.view(), 2));
        // Fewer rows than the window: nothing to train on, but no panic.
        assert_eq!(windows(x.view(), 9).nrows(), 0);
    }

    #[test]
    fn stream_windows_fill_per_stream_then_slide_and_keep_bad_frames_out() {
        // Frames one second apart; a window spans 3 s.
        let mut sw = StreamWindows::new(3, 2, 3.0);
        assert_eq!(sw.push(0, &[1.0, 10.0], 1.0), None);
        assert_eq!(sw.push(1, &[7.0, 70.0], 1.0), None);
        // A NaN frame while filling gets a window ending in it (for the scorer to count as
        // bad) and does not count towards the stream's own.
        let bad = sw.push(0, &[f32::NAN, 15.0], 1.5).map(<[f32]>::to_vec);
        assert_eq!(bad.as_ref().map(Vec::len), Some(6));
        assert!(bad.is_some_and(|w| w[4].is_nan() && w[5] == 15.0));
        assert_eq!(sw.push(0, &[2.0, 20.0], 2.0), None);
        assert_eq!(
            sw.push(0, &[3.0, 30.0], 3.0),
            Some(&[1.0, 10.0, 2.0, 20.0, 3.0, 30.0][..])
        );
        // A NaN frame is windowed (for the scorer to count) but leaves the history alone.
        assert_eq!(
            sw.push(0, &[f32::NAN, 40.0], 4.0).map(|w| w[..4].to_vec()),
            Some(vec![2.0, 20.0, 3.0, 30.0])
        );
        assert_eq!(
            sw.push(0, &[5.0, 50.0], 5.0),
            Some(&[2.0, 20.0, 3.0, 30.0, 5.0, 50.0][..])
        );
        // Stream 1 still has one frame.
        assert_eq!(sw.push(1, &[8.0, 80.0], 2.0), None);
        assert_eq!(
            sw.push(1, &[9.0, 90.0], 3.0),
            Some(&[7.0, 70.0, 8.0, 80.0, 9.0, 90.0][..])
        );
        // After a silence longer than the window's span, stream 0 fills its window again.
        assert_eq!(sw.push(0, &[6.0, 60.0], 9.0), None);
        assert_eq!(sw.push(0, &[7.0, 70.0], 10.0), None);
        assert_eq!(
            sw.push(0, &[8.0, 80.0], 11.0),
            Some(&[6.0, 60.0, 7.0, 70.0, 8.0, 80.0][..])
        );
        // Without a window, and for a frame of the wrong length, frames pass through.
        let mut none = StreamWindows::new(1, 2, 3.0);
        assert_eq!(none.push(4, &[1.0, 2.0], 0.0), Some(&[1.0, 2.0][..]));
        assert_eq!(sw.push(0, &[1.0], 12.0), Some(&[1.0][..]));
        // Raw frames have no regular clock: an infinite span never starts over.
        let mut raw = StreamWindows::new(2, 1, f64::INFINITY);
        assert_eq!(raw.push(0, &[1.0], 0.0), None);
        assert_eq!(raw.push(0, &[2.0], 1e9), Some(&[1.0, 2.0][..]));
    }

    /// The reason `train` prints for its window: a weekly peak of a half-hourly series
    /// (lag 336) lies past 300, so the fallback is taken, and said so.
    #[test]
    fn auto_window_says_why_it_fell_back() {
        let wave = |period: f32, n: usize| -> Array2<f32> {
            Array2::from_shape_fn((n, 1), |(t, _)| {
                (t as f32 * std::f32::consts::TAU / period).sin()
            })
        };
        let weekly = wave(336.0, 5_000);
        assert!(matches!(
            period_search(weekly.column(0).as_slice().unwrap()),
            PeriodSearch::TooLong { lag: 336, .. }
        ));
        let (w, why) = auto_window_explained(weekly.view());
        assert_eq!(w, FALLBACK_WINDOW_FRAMES);
        assert_eq!(
            why,
            "fallback: the highest autocorrelation peak, lag 336, is above 300"
        );
        let (w, why) = auto_window_explained(wave(24.0, 5_000).view());
        assert_eq!(
            (w, why.as_str()),
            (24, "the training series' period, lag 24")
        );
        let (w, why) = auto_window_explained(wave(4.0, 5_000).view());
        assert_eq!(w, 8);
        assert!(
            why.contains("lag 4, raised to the 8-frame minimum"),
            "{why}"
        );
        let (w, why) = auto_window_explained(wave(100.0, 5_000).view());
        assert_eq!(w, 64);
        assert!(
            why.contains("lag 100, lowered to the 64-frame maximum"),
            "{why}"
        );
        // White noise has no peak of 0.1.
        let mut state = 7u64;
        let noise = Array2::from_shape_fn((4_000, 1), |_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32
        });
        let (w, why) = auto_window_explained(noise.view());
        assert_eq!(w, FALLBACK_WINDOW_FRAMES);
        assert_eq!(
            why,
            "fallback: no autocorrelation peak over lags 3–400 reaches 0.1"
        );
        let (w, why) = auto_window_explained(Array2::<f32>::zeros((1_000, 1)).view());
        assert_eq!(w, FALLBACK_WINDOW_FRAMES);
        assert!(why.contains("constant"), "{why}");
        // A short series: the window's cut to an eighth of the rows is said too.
        let (w, why) = auto_window_explained(wave(24.0, 120).view());
        assert_eq!(w, 15);
        assert!(
            why.ends_with("; 24 cut to 15, an eighth of the 120 training rows"),
            "{why}"
        );
        assert_eq!(
            auto_window_explained(Array2::<f32>::zeros((9, 2)).view()).0,
            1
        );
    }

    #[test]
    fn auto_window_only_windows_one_feature_series() {
        let sine: Vec<f32> = (0..5_000)
            .map(|t| (t as f32 * std::f32::consts::TAU / 24.0).sin())
            .collect();
        let one = Array2::from_shape_vec((5_000, 1), sine.clone()).expect("shape");
        assert_eq!(auto_window(one.view()), 24);
        let fast: Vec<f32> = (0..5_000)
            .map(|t| (t as f32 * std::f32::consts::TAU / 4.0).sin())
            .collect();
        let fast = Array2::from_shape_vec((5_000, 1), fast).expect("shape");
        assert_eq!(auto_window(fast.view()), AUTO_WINDOW_RANGE.0);
        let flat = Array2::<f32>::zeros((1_000, 1));
        assert_eq!(auto_window(flat.view()), FALLBACK_WINDOW_FRAMES);
        // A short series keeps most of its rows.
        let short = Array2::<f32>::zeros((80, 1));
        assert_eq!(auto_window(short.view()), 10);
        assert_eq!(auto_window(Array2::<f32>::zeros((3, 1)).view()), 1);
        let two = Array2::<f32>::zeros((100, 2));
        assert_eq!(auto_window(two.view()), 1);
    }
}
