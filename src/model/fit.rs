//! Fitting a complete [`Model`] from a training table: scaler, autoencoder, training, the
//! MSS reference bank, calibration of the training scores and provenance.
//! `darkwatch train` calls [`fit`].

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ndarray::{ArrayView2, Axis};

use super::io::{
    Architecture, Calibration, MAX_CALIBRATION_SCORES, Provenance, QuantilePoint, WeightsRef,
};
use super::{
    Activation, Autoencoder, Model, ModelMeta, OutputKind, Scaler, ScalerKind, default_hidden_sizes,
};
use crate::config::DarkwatchConfig;
use crate::ingest::Table;
use crate::mss::{MssConfig, ReferenceBank};
use crate::pipeline::Scorer;
use crate::score::VARIANCE_EPSILON;
use crate::train::{EpochReport, TrainError, TrainReport, train_member};

/// Most weights a model's network may hold (512 MiB of f32; an ensemble's merged network,
/// whose blocks between members are computed too, counts whole). Training holds several
/// copies (gradients, Adam's two moments, the best epoch's weights), so more would ask the
/// allocator for many gigabytes, and a failed allocation aborts the process.
pub const MAX_MERGED_WEIGHTS: usize = 1 << 27;

/// Quantiles of training scores stored with every model.
pub const CALIBRATION_QUANTILES: [f64; 8] = [0.5, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999, 1.0];

/// Trains a model on `table` with `cfg`; `data_sha256` is recorded as provenance.
/// `on_epoch` sees each epoch (the CLI drives a progress bar with it).
///
/// # Errors
/// Training failed (too few rows, divergence, invalid settings).
pub fn fit(
    table: &Table,
    data_sha256: &str,
    cfg: &DarkwatchConfig,
    on_epoch: &mut dyn FnMut(&EpochReport),
) -> Result<(Model, TrainReport), TrainError> {
    let started = Instant::now();
    let file_rows = table.values.nrows();
    let window = match cfg.model.window_frames {
        0 => crate::window::auto_window(table.values.view()),
        w => w,
    };
    // A windowed model trains on the windows of the rows, each a frame with its past.
    let windowed;
    let table = if window > 1 {
        let key = "model.window_frames";
        if file_rows <= window {
            return Err(TrainError::InvalidConfig {
                key,
                reason: format!(
                    "{file_rows} rows in {}: too few for windows of {window} frames",
                    table.path.display()
                ),
            });
        }
        let names = crate::window::lag_names(&table.features, window);
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = names.iter().find(|n| !seen.insert(n.as_str())) {
            return Err(TrainError::InvalidConfig {
                key,
                reason: format!(
                    "the lagged name \"{dup}\" is also a column of {}; rename that column",
                    table.path.display()
                ),
            });
        }
        windowed = Table {
            path: table.path.clone(),
            features: names,
            timestamps: None,
            values: crate::window::windows(table.values.view(), window),
        };
        &windowed
    } else {
        table
    };
    let d = table.values.ncols();
    let scaler = Scaler::fit(cfg.model.scaler, table.values.view());
    let x = scaler.transform(table.values.view());
    let hidden = if cfg.model.hidden_sizes.is_empty() {
        default_hidden_sizes(d)
    } else {
        cfg.model.hidden_sizes.clone()
    };
    let members = match cfg.model.members {
        0 => crate::config::default_members(d),
        k => k,
    };
    check_size(d, &hidden, members, cfg)?;
    // Held-out rows decide early stopping and calibrate the threshold; without them the
    // "held-out" scores would be training rows, whose scores are optimistic.
    if cfg.train.validation_fraction <= 0.0 {
        return Err(TrainError::InvalidConfig {
            key: "train.validation_fraction",
            reason: format!(
                "{} holds out no rows, but a model needs held-out rows: they decide early \
                 stopping and calibrate the threshold (in-sample scores would set it too low); \
                 use a share in (0, 0.5], 0.1 by default",
                cfg.train.validation_fraction
            ),
        });
    }
    // Each member trains alone (its own initial weights and epoch order, the same held-out
    // rows), then they are merged into one network; the report and provenance are the
    // first member's.
    let mut nets = Vec::with_capacity(members);
    let mut report = None;
    let mut still_falling = Vec::new();
    for k in 0..members as u64 {
        let seed = crate::rng::member_seed(cfg.train.seed, k, 0);
        let mut net = Autoencoder::new(d, &hidden, cfg.model.kind, seed);
        // Member 0 trains exactly as `train` does; the reports name the member.
        let mut tell = |e: &EpochReport| {
            on_epoch(&EpochReport {
                member: k as usize + 1,
                members,
                ..e.clone()
            })
        };
        let r = train_member(&mut net, x.view(), &cfg.train, k, &mut tell)?;
        if r.still_falling(cfg.train.epochs_max) {
            still_falling.push(k as usize + 1);
        }
        report.get_or_insert(r);
        nets.push(net);
    }
    let mut report = report.expect("at least one member");
    report.members_still_falling = still_falling;
    let ae = Autoencoder::merge(nets);
    let bank =
        (cfg.mss.bank_frames > 0).then(|| ReferenceBank::build(x.view(), &cfg.mss, cfg.train.seed));

    let provenance = Provenance {
        darkwatch_version: env!("CARGO_PKG_VERSION").into(),
        created_unix_secs: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        data_file: table.path.display().to_string(),
        data_sha256: data_sha256.into(),
        rows: file_rows,
        train: cfg.train.clone(),
        rows_train: report.rows_train,
        rows_validation: report.rows_val,
        epochs_run: report.epochs_run,
        best_epoch: report.best_epoch,
        stopped_early: report.stopped_early,
        train_losses: report.train_losses.clone(),
        validation_losses: report.val_losses.clone(),
        train_seconds: started.elapsed().as_secs_f64(),
    };
    // Calibrate on rows the weights never saw: in-sample scores are optimistic, and a
    // threshold fitted to them fires too often. A positive validation_fraction always
    // holds out a row (train_member refuses too few rows for that).
    let held_out = report.validation_rows.clone();
    let mut meta = new_meta(&ae, table.features.clone(), scaler, cfg, provenance);
    meta.window_frames = window;
    meta.log_variance_baseline = log_variance_baseline(
        &ae,
        x.select(Axis(0), &held_out).view(),
        &ln_spread(x.view(), meta.scaler.kind),
    );
    let mut model = Model::new(ae, meta, bank);
    let (calibration, scores) = calibrate(&model, table.values.select(Axis(0), &held_out).view());
    model.meta.calibration = calibration;
    let keep = scores.len().saturating_sub(MAX_CALIBRATION_SCORES);
    model.calibration_scores = scores[keep..].to_vec();
    model.seal();
    Ok((model, report))
}

/// Refuses, before anything is allocated, a network of more than [`MAX_MERGED_WEIGHTS`]
/// weights: `members` networks of `d` inputs and `hidden` widths merged into one, whose
/// blocks between members are computed too, so its weights grow with the square of the
/// member count. The error names the key to change: `model.members` when one network
/// would fit, else `model.hidden_sizes` (or the input width, when the default widths for
/// `d` inputs are too large).
fn check_size(
    d: usize,
    hidden: &[usize],
    members: usize,
    cfg: &DarkwatchConfig,
) -> Result<(), TrainError> {
    let widths = |k: usize| {
        let k = k as u128;
        let mut w = vec![d as u128];
        w.extend(hidden.iter().map(|&h| h as u128 * k));
        w.push(cfg.model.kind.output_width(d) as u128 * k);
        w
    };
    let weights = |w: &[u128]| -> u128 { w.windows(2).map(|w| w[0] * w[1]).sum() };
    let merged = widths(members);
    let n = weights(&merged);
    if n <= MAX_MERGED_WEIGHTS as u128 {
        return Ok(());
    }
    let single = weights(&widths(1));
    if members > 1 && single <= MAX_MERGED_WEIGHTS as u128 {
        return Err(TrainError::InvalidConfig {
            key: "model.members",
            reason: format!(
                "{members} members of hidden widths {hidden:?} merge into a network of widths \
                 {merged:?}, {n} weights (the blocks between members are computed too); at \
                 most {MAX_MERGED_WEIGHTS}: use fewer members or narrower hidden_sizes"
            ),
        });
    }
    let whose = if cfg.model.hidden_sizes.is_empty() {
        format!("the default hidden widths {hidden:?} for {d} inputs (after any lag window) give")
    } else {
        format!("hidden widths {hidden:?} for {d} inputs give")
    };
    let members_note = if members > 1 {
        format!(" each of the {members} members, more merged")
    } else {
        String::new()
    };
    Err(TrainError::InvalidConfig {
        key: "model.hidden_sizes",
        reason: format!(
            "{whose} a network of {single} weights{members_note}; at most {MAX_MERGED_WEIGHTS} \
             (512 MiB of float32, before training's copies): set narrower hidden_sizes"
        ),
    })
}

/// Metadata for a freshly built model (id, weights reference and calibration are filled
/// in by [`Model::new`] and [`calibrate`]).
fn new_meta(
    ae: &Autoencoder,
    features: Vec<String>,
    scaler: Scaler,
    cfg: &DarkwatchConfig,
    provenance: Provenance,
) -> ModelMeta {
    ModelMeta {
        format: super::io::FORMAT.into(),
        format_version: super::io::FORMAT_VERSION,
        id: String::new(),
        version: 0,
        features,
        window_frames: 1,
        smooth_frames: cfg.score.smooth_frames,
        table: false,
        scaler,
        architecture: Architecture {
            kind: "dense_autoencoder".into(),
            output: ae.output,
            layer_widths: ae.widths(),
            activation: Activation::Relu,
            members: ae.members,
        },
        head: cfg.score.head(),
        log_variance_baseline: Vec::new(),
        mss: cfg.mss,
        calibration: Calibration {
            rows: 0,
            score_quantiles: Vec::new(),
        },
        provenance,
        weights: WeightsRef {
            file: String::new(),
            sha256: String::new(),
        },
    }
}

/// Per-feature median and maximum of ln(s + ε) over held-out `rows` (scaled), then
/// `ln_spread` (see [`ln_spread`]), stored as `[median_0..m, max_0..m, ln_spread_0..d]` with
/// `m` = members · d (member by member, as the network gives its variances): the baseline
/// and ceiling of the wnll `excess` term, and the floor of the `bounded` one.
/// Empty for plain models.
pub fn log_variance_baseline(
    ae: &Autoencoder,
    rows: ArrayView2<f32>,
    ln_spread: &[f32],
) -> Vec<f32> {
    if ae.output != OutputKind::Probabilistic || rows.nrows() == 0 {
        return Vec::new();
    }
    let (d, m) = (ae.n_features, ae.recon_width());
    let mut per: Vec<Vec<f32>> = vec![Vec::with_capacity(rows.nrows()); m];
    let mut ws = ae.workspace(256);
    for chunk in rows.axis_chunks_iter(Axis(0), 256) {
        let recon = ae.forward(chunk, &mut ws);
        let Some(var) = recon.var else {
            return Vec::new();
        };
        for s in var.rows() {
            for (p, &v) in per.iter_mut().zip(s) {
                p.push((v + VARIANCE_EPSILON).ln());
            }
        }
    }
    let mut out = vec![0.0; 2 * m + d];
    for (j, v) in per.iter_mut().enumerate() {
        v.sort_by(f32::total_cmp);
        out[j] = v[v.len() / 2];
        out[m + j] = v[v.len() - 1];
    }
    for j in 0..d {
        out[2 * m + j] = ln_spread.get(j).copied().unwrap_or(0.0);
    }
    out
}

/// ln of each feature's spread over all scaled training `rows`: 0 (a spread of 1) under
/// z-scoring, which makes every feature's variance 1 by construction (a near-constant
/// column, whose std is under z-scoring's 1e-5, counts as 1 too, not as the tiny variance
/// the 1e-5 leaves it); under min-max scaling the variance of the scaled column, and 0 for
/// a constant column or no rows.
pub fn ln_spread(rows: ArrayView2<f32>, kind: ScalerKind) -> Vec<f32> {
    if kind == ScalerKind::ZScore {
        return vec![0.0; rows.ncols()];
    }
    rows.columns()
        .into_iter()
        .map(|col| {
            let (_, var) = super::scaler::mean_var(col);
            if var > 0.0 && var.is_finite() {
                var.ln() as f32
            } else {
                0.0
            }
        })
        .collect()
}

/// Scores `rows` (raw, unscaled) with the model's own head through the pipeline's
/// [`Scorer`] (so calibration and streaming share one scoring path); returns the
/// quantiles and the scores in row order.
pub fn calibrate(model: &Model, rows: ArrayView2<f32>) -> (Calibration, Vec<f32>) {
    let shared = Arc::new(model.clone());
    let Ok(mut scorer) = Scorer::new(shared, model.meta.head, 1024, 1) else {
        let empty = Calibration {
            rows: 0,
            score_quantiles: Vec::new(),
        };
        return (empty, Vec::new());
    };
    let in_order = scorer.score_all(rows);
    let mut scores = in_order.clone();
    scores.sort_by(f32::total_cmp);
    let score_quantiles = CALIBRATION_QUANTILES
        .iter()
        .map(|&q| QuantilePoint {
            q,
            score: quantile_sorted(&scores, q),
        })
        .collect();
    let calibration = Calibration {
        rows: scores.len(),
        score_quantiles,
    };
    (calibration, in_order)
}

/// The q-quantile of sorted values (nearest rank, upper).
pub fn quantile_sorted(sorted: &[f32], q: f64) -> f32 {
    if sorted.is_empty() {
        return f32::NAN;
    }
    let idx =
        ((q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

/// An untrained model of the default shape for `d` features (identity scaling, no MSS),
/// for benchmarks and tests where the weights do not matter.
pub fn synthetic(d: usize, seed: u64) -> Model {
    let cfg = DarkwatchConfig {
        mss: MssConfig {
            rounds: 0,
            ..MssConfig::default()
        },
        ..DarkwatchConfig::default()
    };
    let ae = Autoencoder::new(d, &default_hidden_sizes(d), cfg.model.kind, seed);
    let scaler = Scaler::from_parts(ScalerKind::ZScore, vec![0.0; d], vec![1.0; d]);
    let provenance = Provenance {
        darkwatch_version: env!("CARGO_PKG_VERSION").into(),
        created_unix_secs: 0,
        data_file: "(synthetic)".into(),
        data_sha256: String::new(),
        rows: 0,
        train: cfg.train.clone(),
        rows_train: 0,
        rows_validation: 0,
        epochs_run: 0,
        best_epoch: 0,
        stopped_early: false,
        train_losses: Vec::new(),
        validation_losses: Vec::new(),
        train_seconds: 0.0,
    };
    let features = (0..d).map(|i| format!("f{i}")).collect();
    let meta = new_meta(&ae, features, scaler, &cfg, provenance);
    Model::new(ae, meta, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    fn table(rows: usize, d: usize) -> Table {
        Table {
            path: "t.npy".into(),
            features: (0..d).map(|i| format!("f{i}")).collect(),
            timestamps: None,
            values: Array2::from_shape_fn((rows, d), |(i, j)| ((i * 7 + j * 3) % 11) as f32),
        }
    }

    fn invalid_key(r: Result<(Model, TrainReport), TrainError>) -> (&'static str, String) {
        match r {
            Err(TrainError::InvalidConfig { key, reason }) => (key, reason),
            Err(e) => panic!("another error: {e}"),
            Ok(_) => panic!("trained"),
        }
    }

    /// A single network too large to allocate is refused (it aborted the process with
    /// `memory allocation of 40000000000 bytes failed`), naming the key that is too large.
    #[test]
    fn an_oversized_network_is_refused_before_allocating_naming_the_key() {
        let t = table(40, 4);
        let mut cfg = DarkwatchConfig::default();
        cfg.model.members = 1;
        cfg.model.hidden_sizes = vec![100_000, 100_000];
        let (key, reason) = invalid_key(fit(&t, "", &cfg, &mut |_| {}));
        assert_eq!(key, "model.hidden_sizes", "{reason}");
        assert!(reason.contains("narrower hidden_sizes"), "{reason}");
        // One network fits, sixteen merged do not: the member count is at fault.
        cfg.model.members = 16;
        cfg.model.hidden_sizes = vec![4096, 4096];
        let (key, reason) = invalid_key(fit(&t, "", &cfg, &mut |_| {}));
        assert_eq!(key, "model.members", "{reason}");
        // Too large even alone, with members: still the widths.
        cfg.model.hidden_sizes = vec![100_000, 100_000];
        assert_eq!(
            invalid_key(fit(&t, "", &cfg, &mut |_| {})).0,
            "model.hidden_sizes"
        );
    }

    /// Without held-out rows the calibration scores would be training rows, reported as
    /// held out.
    #[test]
    fn no_validation_rows_is_refused() {
        let t = table(40, 4);
        let mut cfg = DarkwatchConfig::default();
        cfg.model.members = 1;
        cfg.train.epochs_max = 1;
        cfg.train.validation_fraction = 0.0;
        let (key, reason) = invalid_key(fit(&t, "", &cfg, &mut |_| {}));
        assert_eq!(key, "train.validation_fraction", "{reason}");
        cfg.train.validation_fraction = 0.1;
        let (model, report) = fit(&t, "", &cfg, &mut |_| {}).unwrap();
        assert_eq!(model.meta.calibration.rows, report.rows_val);
        assert!(report.rows_val > 0 && report.rows_val < 40);
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<f32> = (1..=10).map(|i| i as f32).collect();
        assert_eq!(quantile_sorted(&v, 0.5), 5.0);
        assert_eq!(quantile_sorted(&v, 0.95), 10.0);
        assert_eq!(quantile_sorted(&v, 0.0), 1.0);
        assert!(quantile_sorted(&[], 0.5).is_nan());
    }
}
