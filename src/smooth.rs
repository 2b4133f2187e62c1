//! Score smoothing: a frame's score and contributions as the mean over its stream's last
//! `n` frames.
//!
//! A fault in server telemetry lasts minutes, while one frame's reconstruction error is
//! noisy: averaging the last few frames lowers the noise of normal frames more than it
//! lowers a fault that persists, so the ranking sharpens. The default `n` is the alert
//! rule's window (`[alert] fire_n`, 5): an alert already needs most of those frames above
//! the threshold, so the score it judges covers the same span. A one-frame spike still
//! raises the mean by a fifth of its excess at once. The trailing mean looks only
//! backwards, so a live stream and its replay score alike.
//!
//! Thresholds calibrate on the stored per-frame training scores
//! ([`crate::model::Model::threshold_scores`]): a mean over frames exceeds such a threshold
//! only when one of its frames does, so frames that all stay below it never alarm. (One
//! frame far above it can hold the mean above it for up to `n` frames, enough to fire an
//! alert that frame-by-frame scoring would not.) [`trailing_means`] is the offline
//! definition that the streaming [`Smoother`] matches.
//!
//! A stream's history starts over after a silence: when the gap to a frame's timestamp is
//! more than `n` times the stream's previous interval (assembled frames: `n` windows) and
//! at least [`MIN_SILENCE_SECS`], and whenever the scorer switches models, so no mean mixes
//! stale scores or another model's. It also starts over, timestamps and all, when its slot
//! goes to another stream (a newer [`crate::ring::FrameMeta::generation`]): the agent gives
//! a forgotten stream's slot to the next new stream, whose clock may run behind the old
//! one's, so no gap would show; its first scores must not be averaged with the old
//! stream's last ones.

/// Most frames a score may be averaged over.
pub const MAX_SMOOTH_FRAMES: usize = 1024;

/// The shortest gap that counts as a silence. Raw frames carry their arrival times, and
/// a burst arrives microseconds apart with jitter of many times that (thread wake-ups, a
/// wrong frame refused in between): judged by the interval alone, such jitter cleared a
/// stream's history in the middle of a burst, and whether a spike fired an alert
/// depended on when its frames arrived. No telemetry stream is silent for under a second.
pub const MIN_SILENCE_SECS: f64 = 1.0;

/// The mean of `values` (oldest first), summed in f64 so that the streaming and the
/// offline paths agree bit for bit.
fn mean(values: impl Iterator<Item = f32>) -> f32 {
    let (mut sum, mut n) = (0.0f64, 0usize);
    for v in values {
        sum += f64::from(v);
        n += 1;
    }
    if n == 0 {
        f32::NAN
    } else {
        (sum / n as f64) as f32
    }
}

/// Each score replaced by the mean of itself and the `n − 1` before it (fewer at the
/// start), as [`Smoother`] computes them on a stream. `n ≤ 1` returns the scores as they
/// are.
pub fn trailing_means(scores: &[f32], n: usize) -> Vec<f32> {
    let n = n.max(1);
    (0..scores.len())
        .map(|i| mean(scores[(i + 1).saturating_sub(n)..=i].iter().copied()))
        .collect()
}

/// One stream's last `n` scores and contribution rows, as a ring.
#[derive(Debug, Clone)]
struct History {
    scores: Box<[f32]>,
    /// `n × d`, row `k` belongs to `scores[k]`.
    contrib: Box<[f32]>,
    /// Per feature, the sum of the rows in use, in f64 so that a huge value passing
    /// through does not swallow the small ones beside it (recomputed each time the ring
    /// wraps, so rounding cannot build up across turns).
    sum: Box<[f64]>,
    /// The slot the next frame goes into.
    next: usize,
    /// Slots in use (at most `n`).
    filled: usize,
    /// The newest frame's timestamp and the interval before it (NaN: unknown).
    last_t: f64,
    last_dt: f64,
    /// The generation of the stream in this slot whose frames these are.
    generation: u32,
}

impl History {
    fn new(n: usize, d: usize) -> Self {
        History {
            scores: vec![0.0; n].into(),
            contrib: vec![0.0; n * d].into(),
            sum: vec![0.0; d].into(),
            next: 0,
            filled: 0,
            last_t: f64::NAN,
            last_dt: f64::NAN,
            generation: 0,
        }
    }

    /// Another stream took the slot: nothing of the old one's is kept, not even its clock.
    fn restart(&mut self, generation: u32) {
        self.clear();
        self.last_t = f64::NAN;
        self.last_dt = f64::NAN;
        self.generation = generation;
    }

    fn clear(&mut self) {
        self.next = 0;
        self.filled = 0;
        self.sum.fill(0.0);
    }

    /// Notes a frame at time `t`; true when the silence before it makes the history stale
    /// (a gap of more than `n` times the interval before it, and at least
    /// [`MIN_SILENCE_SECS`]). Every interval, stale or
    /// not, becomes the next one's yardstick, so one short interval (arrival jitter, a
    /// backlog delivered at once) clears the history at most once, never for good.
    fn stale(&mut self, t: f64, n: usize) -> bool {
        if !t.is_finite() {
            return false;
        }
        let dt = t - self.last_t;
        self.last_t = t;
        // The first frame (NaN), a repeated or earlier time: no interval to judge by.
        if dt.is_nan() || dt <= 0.0 {
            return false;
        }
        let stale = self.last_dt > 0.0 && dt > n as f64 * self.last_dt && dt >= MIN_SILENCE_SECS;
        self.last_dt = dt;
        stale
    }
}

/// Per-stream trailing means of scores and per-feature contributions.
///
/// Streams are the pipeline's dense stream indices; a stream's history is allocated when
/// its first frame arrives, never per frame.
#[derive(Debug, Clone)]
pub struct Smoother {
    frames: usize,
    d: usize,
    streams: Vec<Option<History>>,
}

impl Smoother {
    /// Means over `frames` frames (1: scores pass unchanged) of `d` contributions each.
    pub fn new(frames: usize, d: usize) -> Self {
        Smoother {
            frames: frames.clamp(1, MAX_SMOOTH_FRAMES),
            d,
            streams: Vec::new(),
        }
    }

    /// Frames each mean covers.
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Forgets every stream's history (the scorer switched models).
    pub fn reset(&mut self) {
        for h in self.streams.iter_mut().flatten() {
            h.clear();
        }
    }

    /// Adds a frame (at time `t`, epoch seconds or NaN) to `stream`'s history, then
    /// replaces `score` and `contrib` (the frame's `d` contributions) with their means
    /// over the stream's last `frames` frames, this one included. A frame whose score is
    /// not finite (a failed backend run) is left as it is and kept out of the history.
    /// `generation` is the frame's [`crate::ring::FrameMeta::generation`]: a frame of
    /// another generation than the history's starts it afresh (its slot went to another
    /// stream). Frames come in order, so a slot's generations only rise.
    pub fn apply(
        &mut self,
        stream: u32,
        generation: u32,
        t: f64,
        score: &mut f32,
        contrib: &mut [f32],
    ) {
        if self.frames == 1 || !score.is_finite() {
            return;
        }
        let (n, d) = (self.frames, self.d);
        debug_assert_eq!(contrib.len(), d);
        let s = stream as usize;
        if s >= self.streams.len() {
            self.streams.resize(s + 1, None);
        }
        let h = self.streams[s].get_or_insert_with(|| History::new(n, d));
        if h.generation != generation {
            h.restart(generation);
        }
        if h.stale(t, n) {
            h.clear();
        }
        let slot = h.next;
        let row = slot * d..(slot + 1) * d;
        if h.filled == n {
            for (sum, &old) in h.sum.iter_mut().zip(&h.contrib[row.clone()]) {
                *sum -= f64::from(old);
            }
        }
        h.scores[slot] = *score;
        h.contrib[row].copy_from_slice(contrib);
        h.next = (slot + 1) % n;
        h.filled = (h.filled + 1).min(n);
        if h.next == 0 {
            // Full turn: sum the rows afresh.
            h.sum.fill(0.0);
            for row in h.contrib.chunks_exact(d) {
                for (sum, &v) in h.sum.iter_mut().zip(row) {
                    *sum += f64::from(v);
                }
            }
        } else {
            for (sum, &v) in h.sum.iter_mut().zip(contrib.iter()) {
                *sum += f64::from(v);
            }
        }
        // Oldest first: the slots after the newest, wrapping round.
        let oldest = (h.next + n - h.filled) % n;
        *score = mean((0..h.filled).map(|k| h.scores[(oldest + k) % n]));
        let inv = 1.0 / h.filled as f64;
        for (c, &sum) in contrib.iter_mut().zip(h.sum.iter()) {
            *c = (sum * inv) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_means_by_hand() {
        let s = [1.0, 2.0, 3.0, 10.0, 0.0];
        assert_eq!(trailing_means(&s, 1), s.to_vec());
        assert_eq!(trailing_means(&s, 3), vec![1.0, 1.5, 2.0, 5.0, 13.0 / 3.0]);
        assert_eq!(trailing_means(&s, 0), s.to_vec());
        assert!(trailing_means(&[], 5).is_empty());
    }

    #[test]
    fn the_stream_smoother_matches_the_calibration_means_and_keeps_streams_apart() {
        let a: Vec<f32> = (0..40).map(|i| ((i * 37) % 11) as f32 * 0.7).collect();
        let b: Vec<f32> = (0..40).map(|i| 100.0 + i as f32).collect();
        let mut sm = Smoother::new(5, 2);
        let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
        for (&x, &y) in a.iter().zip(&b) {
            // Stream 3 first, so stream indices need not arrive in order.
            let (mut s, mut c) = (y, [y, 0.0]);
            sm.apply(3, 0, f64::NAN, &mut s, &mut c);
            assert!(
                (c[0] - s).abs() <= 1e-4 * s.abs(),
                "contributions sum to the score"
            );
            got_b.push(s);
            let (mut s, mut c) = (x, [0.25 * x, 0.75 * x]);
            sm.apply(0, 0, f64::NAN, &mut s, &mut c);
            assert!((c[0] + c[1] - s).abs() <= 1e-5 * (1.0 + s.abs()));
            got_a.push(s);
        }
        assert_eq!(got_a, trailing_means(&a, 5));
        assert_eq!(got_b, trailing_means(&b, 5));
        sm.reset();
        let (mut s, mut c) = (7.0, [7.0, 0.0]);
        sm.apply(0, 0, f64::NAN, &mut s, &mut c);
        assert_eq!((s, c), (7.0, [7.0, 0.0]), "a reset forgets the history");
    }

    /// The agent gives a forgotten stream's slot to the next new stream. One whose clock
    /// ran behind the old stream's showed no gap, so its first means averaged in the old
    /// stream's last scores. A new generation starts the slot's history afresh.
    #[test]
    fn a_slot_given_to_another_stream_starts_afresh_whatever_its_clock() {
        let mut sm = Smoother::new(5, 1);
        let mut at = |generation: u32, t: f64, v: f32| {
            let (mut s, mut c) = (v, [v]);
            sm.apply(7, generation, t, &mut s, &mut c);
            (s, c[0])
        };
        for k in 0..5 {
            assert_eq!(at(0, 1000.0 + f64::from(k), 10.0), (10.0, 10.0));
        }
        // The new stream's clock runs an hour behind the old one's.
        assert_eq!(at(1, -2600.0, 0.0), (0.0, 0.0), "none of the old scores");
        assert_eq!(at(1, -2599.0, 2.0), (1.0, 1.0));
        // Its clock is its own: the second interval is judged against the first.
        assert_eq!(at(1, -2598.0, 4.0), (2.0, 2.0));
        // Streams without timestamps too.
        assert_eq!(at(2, f64::NAN, 6.0), (6.0, 6.0));
    }

    #[test]
    fn one_frame_and_failed_frames_pass_unchanged() {
        let mut off = Smoother::new(1, 1);
        let (mut s, mut c) = (3.0, [3.0]);
        off.apply(0, 0, f64::NAN, &mut s, &mut c);
        off.apply(0, 0, f64::NAN, &mut s, &mut c);
        assert_eq!((s, c), (3.0, [3.0]));
        let mut sm = Smoother::new(4, 1);
        let (mut s, mut c) = (2.0, [2.0]);
        sm.apply(0, 0, f64::NAN, &mut s, &mut c);
        let (mut nan, mut c_nan) = (f32::NAN, [f32::NAN]);
        sm.apply(0, 0, f64::NAN, &mut nan, &mut c_nan);
        assert!(nan.is_nan());
        let (mut s, mut c) = (4.0, [4.0]);
        sm.apply(0, 0, f64::NAN, &mut s, &mut c);
        assert_eq!((s, c), (3.0, [3.0]), "the NaN frame is not in the history");
    }

    #[test]
    fn running_contribution_sums_stay_the_exact_means_over_many_turns() {
        let (n, d) = (7, 3);
        let mut sm = Smoother::new(n, d);
        let rows: Vec<[f32; 3]> = (0..500)
            .map(|i| {
                let x = ((i * 7919) % 1000) as f32;
                [
                    x * 1e3,
                    1.0 / (1.0 + x),
                    if i % 97 == 0 { 1e7 } else { 0.5 },
                ]
            })
            .collect();
        for (i, r) in rows.iter().enumerate() {
            let (mut s, mut c) = (r.iter().sum::<f32>(), *r);
            sm.apply(0, 0, f64::NAN, &mut s, &mut c);
            let lo = (i + 1).saturating_sub(n);
            for j in 0..d {
                let want =
                    rows[lo..=i].iter().map(|r| f64::from(r[j])).sum::<f64>() / (i + 1 - lo) as f64;
                let err = (f64::from(c[j]) - want).abs();
                // f32 output rounding only, also for the small features right after a 1e7
                // leaves the window (f32 running sums gave 0.94 for a true 0.7 there).
                assert!(
                    err <= 1e-6 * want.abs().max(1e-3),
                    "frame {i}, feature {j}: {} vs {want}",
                    c[j]
                );
            }
        }
    }

    #[test]
    fn a_silence_longer_than_the_span_starts_the_history_afresh() {
        let mut sm = Smoother::new(3, 1);
        let mut at = |t: f64, v: f32| {
            let (mut s, mut c) = (v, [v]);
            sm.apply(0, 0, t, &mut s, &mut c);
            s
        };
        // Frames a minute apart: means as usual.
        assert_eq!(at(0.0, 9.0), 9.0);
        assert_eq!(at(60.0, 3.0), 6.0);
        // Three minutes later (3 intervals, not more): still the same history.
        assert_eq!(at(240.0, 0.0), 4.0);
        // An hour of silence: the stale frames no longer count.
        assert_eq!(at(3840.0, 1.0), 1.0);
        assert_eq!(at(3900.0, 3.0), 2.0);
        // One short interval (a backlog delivered at once) clears the history once at
        // most: the minute after it is a silence against 6 s, the next minute is not.
        assert_eq!(at(3906.0, 6.0), 10.0 / 3.0);
        assert_eq!(at(3966.0, 9.0), 9.0);
        assert_eq!(at(4026.0, 0.0), 4.5);
        assert_eq!(at(4086.0, 3.0), 4.0);
        // Arrival times of a burst (raw frames): jitter far above n intervals, but under a
        // second, is no silence.
        let mut burst = Smoother::new(2, 1);
        for (t, v, want) in [
            (0.0, 4.0, 4.0),
            (1e-5, 2.0, 3.0),
            (3e-4, 6.0, 4.0),
            (0.5, 0.0, 3.0),
        ] {
            let (mut s, mut c) = (v, [v]);
            burst.apply(0, 0, t, &mut s, &mut c);
            assert_eq!(s, want, "at {t}");
        }
        // A pause of a second or more, long against the interval, still is.
        let (mut s, mut c) = (8.0, [8.0]);
        burst.apply(0, 0, 30.0, &mut s, &mut c);
        assert_eq!(s, 8.0);
        // Frames without timestamps never start over.
        let mut raw = Smoother::new(2, 1);
        for (v, want) in [(4.0, 4.0), (2.0, 3.0), (0.0, 1.0)] {
            let (mut s, mut c) = (v, [v]);
            raw.apply(0, 0, f64::NAN, &mut s, &mut c);
            assert_eq!(s, want);
        }
    }
}
