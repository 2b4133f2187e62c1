//! OmniAnomaly's HitRate of the culprit metrics on interpretation labels (SMD's
//! `interpretation_label/*.txt`, or a file of one's own in that format), shared by
//! `darkwatch harness` and `darkwatch replay --interpretation`.
//!
//! Two protocols are measured. The headline ranks every frame inside an interpretation
//! segment by its own contributions. The second keeps only the frames a detector found:
//! labelled anomalous, inside a segment, and scored at or above the point-wise best-F1
//! threshold (the frames InterFusion's evaluation code scores; it then ranks each segment
//! once, which this does not: every kept frame is still ranked by its own contributions).

use std::sync::Arc;

use ndarray::{Array2, ArrayView1, ArrayView2};

use crate::ingest::Segment;
use crate::model::Model;
use crate::pipeline::{Scorer, ScorerError};
use crate::score::Head;
use crate::window::StreamWindows;

/// HitRate@100 % and @150 % under both protocols, with the frames each averages over.
#[derive(Debug, Clone, PartialEq)]
pub struct HitRates {
    /// (@100 %, @150 %) over every scored frame inside an interpretation segment with
    /// culprits (the headline); `None` when there is none.
    pub all: Option<(f64, f64)>,
    /// Frames [`Self::all`] averages over.
    pub frames: usize,
    /// (@100 %, @150 %) over the detected frames only ([`detected_frames`]); `None` when
    /// no frame was detected or nothing says which were (no labels, no best-F1 threshold).
    pub detected: Option<(f64, f64)>,
    /// Frames [`Self::detected`] averages over.
    pub detected_frames: usize,
    /// Frames of segments that lie in the rows which only fill a lag window: not scored,
    /// so not ranked (as they leave the point-wise metrics).
    pub unscored_frames: usize,
    /// Segments with culprits.
    pub segments: usize,
    /// (@100 %, @150 %) that a random ranking of the features scores on average over the
    /// frames of [`Self::all`] ([`chance_at`]): the floor a ranking should be read against.
    /// With 20 culprits of 38 metrics, @150 looks at 30 features and chance alone finds
    /// 79 % of them.
    pub chance: Option<(f64, f64)>,
    /// The same chance level over the frames of [`Self::detected`]: the floor of the
    /// second protocol (its frames are not the headline's, so neither is its floor).
    pub chance_detected: Option<(f64, f64)>,
}

/// Which scored frames count as detected for [`HitRates::detected`]: labelled anomalous
/// (`labels[i] == 1`) and scored at or above `threshold` (the best-F1 threshold, flagged
/// as [`crate::eval`] flags it: `score >= t`). `scores` and `labels` hold one entry per
/// scored frame, in order.
pub fn detected_frames(scores: &[f32], labels: &[u8], threshold: f32) -> Vec<bool> {
    scores
        .iter()
        .zip(labels)
        .map(|(&s, &l)| l == 1 && s >= threshold)
        .collect()
}

/// OmniAnomaly's HitRate@P% (the headline protocol only): see [`hit_rates_with`], with the
/// model's own head and no detected frames. Returns (@100 %, @150 %).
pub fn hit_rates(
    model: &Arc<Model>,
    test: &Array2<f32>,
    first_row: usize,
    segments: &[Segment],
) -> Option<(f64, f64)> {
    hit_rates_with(model, model.meta.head, test, first_row, segments, None)
        .ok()?
        .all
}

/// OmniAnomaly's HitRate@P%: for every frame inside an interpretation segment with culprit
/// set G, the share of G among the frame's top ⌊P·|G|⌋ contributing features (see
/// [`hit_rate_at`]); averaged over those frames. Contributions come from the pipeline's
/// [`Scorer`] with `head`, smoothed over the whole series in order, so they are exactly the
/// ones alerts report; a windowed model's are summed over each feature's lags. `test` holds
/// the frames of the input rows from `first_row` on (segments count input rows; rows before
/// `first_row` are not scored and counted in [`HitRates::unscored_frames`]).
///
/// `detected`, one entry per frame of `test` (see [`detected_frames`]), picks the frames of
/// the second protocol, [`HitRates::detected`]; it does not change [`HitRates::all`].
///
/// # Errors
/// The scorer cannot be built (as [`Scorer::new`]; the replay of the same model and head
/// would have failed first).
pub fn hit_rates_with(
    model: &Arc<Model>,
    head: Head,
    test: &Array2<f32>,
    first_row: usize,
    segments: &[Segment],
    detected: Option<&[bool]>,
) -> Result<HitRates, ScorerError> {
    let mut next = 0;
    let ranking = rank(
        model,
        head,
        test.nrows(),
        first_row,
        segments,
        |input, n| {
            let chunk = test.slice(ndarray::s![next..next + n, ..]);
            input.copy_from_slice(chunk.as_standard_layout().as_slice().expect("standard"));
            next += n;
        },
    )?;
    Ok(ranking.rates(detected))
}

/// Ranks the frames of [`hit_rates_with`] from the input `rows` themselves (aligned, gaps
/// filled, before any lag window): each batch's windows are built as the batch is filled,
/// as [`crate::window::windows`] and the replay's source build them, so the input is not
/// copied whole into windows (`w` times its size for a windowed model). The first
/// `window_frames − 1` rows only fill the first window, as in the replay.
/// [`Ranking::rates`] then averages, once the detected frames are known.
///
/// # Errors
/// The scorer cannot be built (as [`Scorer::new`]), which a replay of the same model and
/// head fails on too; the replay ranks before it runs, so this error comes first there.
pub fn rank_rows<'s>(
    model: &Arc<Model>,
    head: Head,
    rows: ArrayView2<f32>,
    segments: &'s [Segment],
) -> Result<Ranking<'s>, ScorerError> {
    let w = model.meta.window_frames.max(1);
    let first_row = (w - 1).min(rows.nrows());
    let rows = rows.as_standard_layout();
    let width = model.n_features();
    let mut stream = StreamWindows::new(w, rows.ncols(), f64::INFINITY);
    let mut pending = rows.rows().into_iter();
    rank(
        model,
        head,
        rows.nrows() - first_row,
        first_row,
        segments,
        |input, _| {
            for slot in input.chunks_exact_mut(width) {
                // A slot takes the next window the stream yields (zeros, as in
                // `windows`, should the rows run out first).
                slot.fill(0.0);
                for row in pending.by_ref() {
                    let row = row.to_slice().expect("standard layout rows are contiguous");
                    if let Some(window) = stream.push(0, row, 0.0) {
                        slot.copy_from_slice(window);
                        break;
                    }
                }
            }
        },
    )
}

/// Scores `frames` frames with `head` in batches of the scorer's size, `fill` writing each
/// batch (`n` frames, in order) into the scorer's input, and ranks those inside segments.
fn rank<'s>(
    model: &Arc<Model>,
    head: Head,
    frames: usize,
    first_row: usize,
    segments: &'s [Segment],
    mut fill: impl FnMut(&mut [f32], usize),
) -> Result<Ranking<'s>, ScorerError> {
    let mut scorer = Scorer::new(model.clone(), head, 256, 1)?;
    let d = model.n_features();
    let base = model.meta.frame_features().len();
    let mut ranking = Ranking::new(segments, first_row, frames, base);
    let mut first = 0;
    while first < frames {
        let n = scorer.max_batch().min(frames - first);
        fill(&mut scorer.input_mut()[..n * d], n);
        scorer.score(n);
        for i in 0..n {
            scorer.smooth(i, 0, f64::NAN);
        }
        for (i, row) in scorer.contributions(n).rows().into_iter().enumerate() {
            ranking.rank(first + i, row);
        }
        first += n;
    }
    Ok(ranking)
}

/// The frames inside interpretation segments with culprits, ranked one at a time in order
/// by their contributions; each one's hit rates are kept so that [`Self::rates`] can
/// average them over the frames of either protocol. Holds no model: the rule from
/// contributions to HitRates, apart from the scorer that computes them.
#[derive(Debug)]
pub struct Ranking<'s> {
    /// The segment (with culprits) each scored frame lies in, if any.
    culprits: Vec<Option<&'s Segment>>,
    /// (scored frame, @100 %, @150 %) of every frame ranked so far, in order.
    hits: Vec<(usize, f64, f64)>,
    /// [`chance_at`] @100 % and @150 % of each frame in `hits`, in the same order.
    chance: Vec<(f64, f64)>,
    /// Frames of segments among the rows before `first_row`.
    unscored: usize,
    /// Segments with culprits.
    segments: usize,
    /// Features of one frame: a windowed model's contributions are summed over the lags.
    base: usize,
    order: Vec<usize>,
    per_feature: Vec<f32>,
}

impl<'s> Ranking<'s> {
    /// For `frames` scored frames, the first of them input row `first_row` (segments count
    /// input rows), whose frames have `base` features each.
    fn new(segments: &'s [Segment], first_row: usize, frames: usize, base: usize) -> Self {
        let mut culprits: Vec<Option<&Segment>> = vec![None; frames];
        let mut unscored = vec![false; first_row];
        for seg in segments.iter().filter(|s| !s.dims.is_empty()) {
            if seg.start < first_row {
                unscored[seg.start..=seg.end.min(first_row - 1)].fill(true);
            }
            let end = seg.end.saturating_sub(first_row).min(frames);
            if seg.end < first_row {
                continue;
            }
            for slot in culprits
                .iter_mut()
                .take(end + 1)
                .skip(seg.start.saturating_sub(first_row))
            {
                *slot = Some(seg);
            }
        }
        Ranking {
            culprits,
            hits: Vec::new(),
            chance: Vec::new(),
            unscored: unscored.iter().filter(|&&u| u).count(),
            segments: segments.iter().filter(|s| !s.dims.is_empty()).count(),
            base,
            order: Vec::with_capacity(base),
            per_feature: vec![0.0; base],
        }
    }

    /// Ranks scored frame `frame` by its `contributions` (one per model feature, feature
    /// `j` adding to frame feature `j % base`), if it lies in a segment with culprits.
    fn rank(&mut self, frame: usize, contributions: ArrayView1<f32>) {
        let Some(seg) = self.culprits[frame] else {
            return;
        };
        let base = self.base;
        let per_feature = &mut self.per_feature;
        per_feature.fill(0.0);
        for (j, &c) in contributions.iter().enumerate() {
            per_feature[j % base] += c;
        }
        self.order.clear();
        self.order.extend(0..base);
        self.order
            .sort_by(|&a, &b| per_feature[b].total_cmp(&per_feature[a]));
        self.hits.push((
            frame,
            hit_rate_at(&self.order, &seg.dims, 100),
            hit_rate_at(&self.order, &seg.dims, 150),
        ));
        self.chance.push((
            chance_at(base, &seg.dims, 100),
            chance_at(base, &seg.dims, 150),
        ));
    }

    /// The frames ranked so far averaged: all of them, and those `detected` marks (one
    /// entry per scored frame; see [`detected_frames`]).
    pub fn rates(&self, detected: Option<&[bool]>) -> HitRates {
        let (mut h100, mut h150) = (0.0, 0.0);
        let (mut d100, mut d150, mut detected_n) = (0.0, 0.0, 0usize);
        let (mut c100, mut c150, mut cd100, mut cd150) = (0.0, 0.0, 0.0, 0.0);
        for (&(frame, a, b), &(ca, cb)) in self.hits.iter().zip(&self.chance) {
            h100 += a;
            h150 += b;
            c100 += ca;
            c150 += cb;
            if detected.is_some_and(|m| m.get(frame).copied().unwrap_or(false)) {
                d100 += a;
                d150 += b;
                cd100 += ca;
                cd150 += cb;
                detected_n += 1;
            }
        }
        let frames = self.hits.len();
        let mean = |a: f64, b: f64, n: usize| (n > 0).then(|| (a / n as f64, b / n as f64));
        HitRates {
            all: mean(h100, h150, frames),
            frames,
            detected: mean(d100, d150, detected_n),
            detected_frames: detected_n,
            unscored_frames: self.unscored,
            segments: self.segments,
            chance: mean(c100, c150, frames),
            chance_detected: mean(cd100, cd150, detected_n),
        }
    }
}

/// One frame's HitRate@`percent`%: the share of the culprit features `culprits` among the
/// first ⌊percent/100 · |culprits|⌋ features of `order` (largest contribution first), as
/// OmniAnomaly's evaluation computes it (InterFusion's `get_hit_rate`, `chance_num =
/// min(int(p / 100 * len(label)), len(pred))`; the paper's Hit@⌊P% × |GT|⌋). At 150 % and
/// an odd number of culprits that is one feature fewer than rounding up would give (one
/// culprit: its top feature only).
pub fn hit_rate_at(order: &[usize], culprits: &[usize], percent: usize) -> f64 {
    if culprits.is_empty() {
        return 0.0;
    }
    let k = (percent * culprits.len() / 100).min(order.len());
    order[..k].iter().filter(|j| culprits.contains(j)).count() as f64 / culprits.len() as f64
}

/// The HitRate@`percent`% that a uniformly random order of `features` features scores on
/// average for these `culprits`: each of the ⌊percent/100 · |culprits|⌋ features looked at
/// (at most `features`) is a culprit with probability |culprits| / `features`, so the
/// expected share of the culprits found is that count over `features`.
pub fn chance_at(features: usize, culprits: &[usize], percent: usize) -> f64 {
    if culprits.is_empty() || features == 0 {
        return 0.0;
    }
    (percent * culprits.len() / 100).min(features) as f64 / features as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// InterFusion's `get_hit_rate`: the top ⌊P/100 · |G|⌋ features, not ⌈…⌉.
    #[test]
    fn hit_rate_rounds_down_as_omnianomaly_does() {
        let order = [4, 2, 7, 1, 0, 3, 5, 6];
        // One culprit, ranked second: @100 and @150 both look at the top one only.
        assert_eq!(hit_rate_at(&order, &[2], 100), 0.0);
        assert_eq!(hit_rate_at(&order, &[2], 150), 0.0);
        assert_eq!(hit_rate_at(&order, &[4], 150), 1.0);
        // Three culprits: @150 looks at 4 features (4.5 rounded down), not 5.
        assert_eq!(hit_rate_at(&order, &[4, 1, 0], 100), 1.0 / 3.0);
        assert_eq!(hit_rate_at(&order, &[4, 1, 0], 150), 2.0 / 3.0);
        // Two culprits: 3 features either way.
        assert_eq!(hit_rate_at(&order, &[7, 1], 150), 0.5);
        assert_eq!(hit_rate_at(&order, &[7, 2], 150), 1.0);
        // Never past the features there are.
        assert_eq!(hit_rate_at(&[1, 0], &[0, 1], 150), 1.0);
        assert_eq!(hit_rate_at(&order, &[], 150), 0.0);
    }

    /// A lag window's first `w − 1` rows are not scored: a segment wholly among them is not
    /// ranked, one that goes on past them is ranked from the first scored row, and both
    /// are counted as unscored; marking every frame detected gives the headline again.
    /// Ranking the rows themselves ([`rank_rows`], as replay and the harness do) gives
    /// exactly what ranking their windowed copy gives (300 rows: two batches).
    #[test]
    fn rows_that_only_fill_a_lag_window_are_not_ranked() {
        use crate::config::DarkwatchConfig;
        use crate::ingest::Table;
        let (n, d, w) = (300, 4, 4);
        let values = Array2::from_shape_fn((n, d), |(i, j)| ((i * 7 + j * 13) % 17) as f32 / 17.0);
        let table = Table {
            path: "t.npy".into(),
            features: (0..d).map(|j| format!("f{j}")).collect(),
            timestamps: None,
            values: values.clone(),
        };
        let mut cfg = DarkwatchConfig::default();
        cfg.train.epochs_max = 3;
        cfg.model.members = 1;
        cfg.model.window_frames = w;
        let (model, _) = crate::model::fit::fit(&table, "", &cfg, &mut |_| {}).unwrap();
        assert_eq!(model.meta.window_frames, w);
        let model = Arc::new(model);
        let frames = crate::window::windows(values.view(), w);
        assert_eq!(frames.nrows(), n - (w - 1));
        let seg = |start, end, dims: &[usize]| Segment {
            start,
            end,
            dims: dims.to_vec(),
        };
        let segments = [seg(0, 1, &[0]), seg(2, 5, &[1, 2]), seg(100, 109, &[3])];
        let all = vec![true; frames.nrows()];
        let h = hit_rates_with(
            &model,
            model.meta.head,
            &frames,
            w - 1,
            &segments,
            Some(&all),
        )
        .unwrap();
        assert_eq!(
            (h.frames, h.unscored_frames, h.segments),
            (3 + 10, 2 + 1, 3)
        );
        assert_eq!((h.detected, h.detected_frames), (h.all, h.frames));
        assert_eq!(
            rank_rows(&model, model.meta.head, values.view(), &segments)
                .unwrap()
                .rates(Some(&all)),
            h,
            "ranked from the rows, windows built batch by batch"
        );
        assert_eq!(
            hit_rates(&model, &frames, w - 1, &segments),
            h.all,
            "the harness's entry point"
        );
        let none =
            hit_rates_with(&model, model.meta.head, &frames, w - 1, &segments, None).unwrap();
        assert_eq!(
            (none.all, none.detected, none.detected_frames),
            (h.all, None, 0)
        );
    }

    #[test]
    fn detected_frames_are_labelled_and_at_or_above_the_threshold() {
        let scores = [0.1, 0.5, 0.5, 0.9, 0.7];
        let labels = [1, 1, 0, 1, 0];
        assert_eq!(
            detected_frames(&scores, &labels, 0.5),
            [false, true, false, true, false]
        );
    }

    /// The detected-frames protocol end to end on a hand-sized series, every number below
    /// worked out by hand: best-F1 threshold → detected frames → each frame's hits → both
    /// averages. Four features, eight frames, no lag window.
    ///
    /// ```text
    /// frame      0    1    2    3     4    5    6    7
    /// score     0.1  0.9  0.6  0.15  0.2  0.6  0.8  0.3
    /// label      0    1    1    1     0    1    1    0
    /// segment    -    A    A    A     -    B    B    B     A: culprits {0, 2}, B: {1}
    /// ```
    ///
    /// Best F1 (5 anomalous frames; flagged = score ≥ t), over the distinct scores:
    /// t = 0.9: TP 1, FP 0 → F1 1/3; t = 0.8: TP 2 → 4/7; t = 0.6: TP 4 (1, 2, 5, 6), FP 0
    /// → P 1, R 0.8, F1 8/9; t = 0.3: TP 4, FP 1 → 0.8; t = 0.2: TP 4, FP 2 → 8/11;
    /// t = 0.15: TP 5, FP 2 → 5/6; t = 0.1: TP 5, FP 3 → 10/13. Best: 8/9 at t = 0.6.
    ///
    /// Detected (labelled 1, score ≥ 0.6): frames 1, 6, and 2 and 5, which tie with the
    /// threshold. Frame 3 is anomalous but below it, frame 7 is in a segment but labelled 0,
    /// frames 0 and 4 lie in no segment.
    ///
    /// Hits: segment A has |G| = 2, so @100 looks at the top 2 features and @150 at the
    /// top ⌊3⌋ = 3. Segment B has |G| = 1 (odd): @100 the top 1, @150 the top ⌊1.5⌋ = 1
    /// (rounding up would look at 2).
    ///
    /// ```text
    /// frame  contributions (f0..f3)  ranked        @100      @150
    ///   1    0.5  0.1  0.3  0.2      0 2 3 1       2/2 = 1   2/2 = 1
    ///   2    0.1  0.4  0.3  0.05     1 2 0 3       1/2       2/2 = 1
    ///   3    0.2  0.3  0.1  0.4      3 1 0 2       0/2 = 0   1/2
    ///   5    0.2  0.3  0.1  0.4      3 1 0 2       0         0 (⌈1.5⌉ would give 1)
    ///   6    0.1  0.5  0.2  0.3      1 3 2 0       1         1
    ///   7    0.4  0.1  0.3  0.2      0 2 3 1       0         0
    /// ```
    ///
    /// All six segment frames: @100 (1 + ½ + 0 + 0 + 1 + 0)/6 = 2.5/6, @150
    /// (1 + 1 + ½ + 0 + 1 + 0)/6 = 3.5/6. Detected frames 1, 2, 5, 6: @100
    /// (1 + ½ + 0 + 1)/4 = 2.5/4, @150 (1 + 1 + 0 + 1)/4 = 3/4. Were the tie not detected
    /// (`>`), only frames 1 and 6 would be, and both averages would be 1.
    #[test]
    fn detected_frames_hit_rate_by_hand() {
        let scores = [0.1, 0.9, 0.6, 0.15, 0.2, 0.6, 0.8, 0.3];
        let labels = [0, 1, 1, 1, 0, 1, 1, 0];
        // Frames 0 and 4 lie in no segment: whatever they contribute is not ranked.
        let contributions = ndarray::array![
            [9.0, 9.0, 9.0, 9.0],
            [0.5, 0.1, 0.3, 0.2],
            [0.1, 0.4, 0.3, 0.05],
            [0.2, 0.3, 0.1, 0.4],
            [9.0, 9.0, 9.0, 9.0],
            [0.2, 0.3, 0.1, 0.4],
            [0.1, 0.5, 0.2, 0.3],
            [0.4, 0.1, 0.3, 0.2],
        ];
        let segments = [
            Segment {
                start: 1,
                end: 3,
                dims: vec![0, 2],
            },
            Segment {
                start: 5,
                end: 7,
                dims: vec![1],
            },
        ];
        let best = crate::eval::best_f1(&scores, &labels).unwrap().unwrap();
        assert_eq!(best.threshold, 0.6);
        assert!((best.f1 - 8.0 / 9.0).abs() < 1e-12, "{best:?}");
        let detected = detected_frames(&scores, &labels, best.threshold);
        assert_eq!(
            detected,
            [false, true, true, false, false, true, true, false]
        );
        let mut ranking = Ranking::new(&segments, 0, scores.len(), 4);
        for (i, row) in contributions.rows().into_iter().enumerate() {
            ranking.rank(i, row);
        }
        assert_eq!(
            ranking.rates(Some(&detected)),
            HitRates {
                all: Some((2.5 / 6.0, 3.5 / 6.0)),
                frames: 6,
                detected: Some((2.5 / 4.0, 3.0 / 4.0)),
                detected_frames: 4,
                unscored_frames: 0,
                segments: 2,
                // Two culprits of 4: 2 and 3 features looked at; one: 1 either way.
                chance: Some((
                    (3.0 * 0.5 + 3.0 * 0.25) / 6.0,
                    (3.0 * 0.75 + 3.0 * 0.25) / 6.0
                )),
                // Detected: two frames of each segment.
                chance_detected: Some((
                    (2.0 * 0.5 + 2.0 * 0.25) / 4.0,
                    (2.0 * 0.75 + 2.0 * 0.25) / 4.0
                )),
            }
        );
    }

    /// The chance level is the mean HitRate over every order of the features: all 120
    /// orders of 5 features, for one to five culprits, at 100 % and 150 %.
    #[test]
    fn chance_is_the_mean_hit_rate_of_every_order() {
        fn orders(rest: Vec<usize>, prefix: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
            if rest.is_empty() {
                out.push(prefix.clone());
            }
            for (i, &x) in rest.iter().enumerate() {
                let mut r = rest.clone();
                r.remove(i);
                prefix.push(x);
                orders(r, prefix, out);
                prefix.pop();
            }
        }
        let mut all = Vec::new();
        orders((0..5).collect(), &mut Vec::new(), &mut all);
        assert_eq!(all.len(), 120);
        for culprits in [
            vec![3],
            vec![0, 4],
            vec![1, 2, 3],
            vec![0, 1, 2, 4],
            vec![0, 1, 2, 3, 4],
        ] {
            for percent in [100, 150] {
                let mean = all
                    .iter()
                    .map(|o| hit_rate_at(o, &culprits, percent))
                    .sum::<f64>()
                    / all.len() as f64;
                let chance = chance_at(5, &culprits, percent);
                assert!(
                    (mean - chance).abs() < 1e-12,
                    "{culprits:?} @{percent}: {mean} {chance}"
                );
            }
        }
        assert_eq!(chance_at(5, &[], 150), 0.0);
        assert_eq!(chance_at(0, &[0], 150), 0.0);
    }
}
