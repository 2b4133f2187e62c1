//! Backend parity: the model tests every non-native backend runs against the native kernels
//! on the bundled models and stream. [`backend_parity_tests!`] generates them in a backend's
//! test file, so each backend that is built runs the same set, and one that is built but
//! not present here (no GPU) skips them with a note.

use std::sync::Arc;

use darkwatch::config::Backend;
use darkwatch::ingest::{self, TableOptions};
use darkwatch::model::Model;
use darkwatch::pipeline::Scorer;
use darkwatch::replay::ReplayOutcome;
use darkwatch::score::{Head, HeadKind};

use super::repo;

/// The bundled probabilistic autoencoder (wnll head).
pub const PAE: &str = "models/smd-machine-1-6";
/// The bundled plain autoencoder (mse head).
pub const MSE: &str = "models/smd-machine-1-6-mse";
/// Two PAEs of 38 features merged into one network (`tools/export_bundled_onnx.sh` says
/// how it was made; its native files load on every backend).
pub const ENSEMBLE: &str = "tests/data/onnx/ensemble";
/// The bundled SMD test stream, 23,689 frames of 38 features.
pub const STREAM: &str = "tests/data/smd/machine-1-6_test.npy";

/// Loads the model in a folder (relative to the repository) on one backend; `None`, after
/// printing why, when that backend is built but not usable here.
pub type Loader = Box<dyn Fn(&str) -> Option<Model>>;

/// How the parity tests reach one backend.
pub struct BackendUnderTest {
    pub backend: Backend,
    /// The model tests skip when this gives `None`.
    pub load: Loader,
    /// What the model's backend label starts with, e.g. `onnx/cpu` or `cuda/`.
    pub label: &'static str,
    /// Most relative difference per frame, relative to max(|a|, |b|, 1e-3).
    pub tolerance: f32,
    /// The batch sizes every head is compared at.
    pub batches: &'static [usize],
}

pub fn stream() -> ndarray::Array2<f32> {
    ingest::read_table(&repo(STREAM), &TableOptions::default())
        .expect("bundled stream reads")
        .values
}

pub fn load_native(dir: &str) -> Model {
    Model::load(&repo(dir)).expect("bundled model loads")
}

/// Every frame within `tolerance` relative (relative to max(|a|, |b|, 1e-3)); prints the
/// worst frame and how many are beyond.
pub fn assert_close(native: &[f32], other: &[f32], tolerance: f32, what: &str) {
    assert_eq!(native.len(), other.len(), "{what}: lengths");
    let (mut worst, mut beyond) = ((0.0f32, 0usize), 0usize);
    for (i, (&a, &b)) in native.iter().zip(other).enumerate() {
        assert!(
            a.is_finite() && b.is_finite(),
            "{what}: row {i}: {a} vs {b}"
        );
        let rel = (a - b).abs() / a.abs().max(b.abs()).max(1e-3);
        beyond += usize::from(rel > tolerance);
        if rel > worst.0 {
            worst = (rel, i);
        }
    }
    println!(
        "{what}: {} frames, max relative difference {:.2e} (row {}), {beyond} beyond {tolerance:e}",
        native.len(),
        worst.0,
        worst.1
    );
    assert!(
        beyond == 0,
        "{what}: {beyond} of {} frames differ by more than {tolerance:e} relative; the worst, \
         row {}, by {:.2e}: native {} vs {}",
        native.len(),
        worst.1,
        worst.0,
        native[worst.1],
        other[worst.1]
    );
}

/// Every head in `heads`, at each of the backend's batch sizes, against native.
pub fn heads_agree(b: &BackendUnderTest, dir: &str, heads: &[HeadKind]) {
    let Some(model) = (b.load)(dir) else {
        return;
    };
    let native = Arc::new(load_native(dir));
    let model = Arc::new(model);
    assert!(
        model.backend_label().starts_with(b.label),
        "{}",
        model.backend_label()
    );
    let x = stream();
    for &kind in heads {
        let head = Head {
            kind,
            ..native.meta.head
        };
        for &batch in b.batches {
            let want = Scorer::new(native.clone(), head, batch, 3)
                .unwrap()
                .score_all(x.view());
            let mut s = Scorer::new(model.clone(), head, batch, 3).unwrap();
            let got = s.score_all(x.view());
            assert_eq!(s.backend_errors(), 0, "{dir}: backend runs failed");
            let what = format!("{dir} {} batch {batch}", kind.name());
            assert_close(&want, &got, b.tolerance, &what);
        }
    }
}

/// Mean-shift scoring (1 round, 10 neighbours, a bank of 2048): the target is shifted on
/// the host, the reconstruction comes from the backend.
pub fn mean_shift_scoring_agrees(b: &BackendUnderTest) {
    let mss = darkwatch::mss::MssConfig {
        rounds: 1,
        neighbours: 10,
        bank_frames: 2048,
    };
    let Some(model) = (b.load)(PAE) else {
        return;
    };
    let model = Arc::new(model.with_mss(mss));
    let native = Arc::new(load_native(PAE).with_mss(mss));
    assert!(model.active_bank().is_some());
    let x = stream();
    let x = x.slice(ndarray::s![..4000, ..]);
    let head = native.meta.head;
    for &batch in b.batches {
        let want = Scorer::new(native.clone(), head, batch, 3)
            .unwrap()
            .score_all(x);
        let got = Scorer::new(model.clone(), head, batch, 3)
            .unwrap()
            .score_all(x);
        assert_close(&want, &got, b.tolerance, &format!("wnll+mss batch {batch}"));
    }
}

/// A replay of the bundled stream through both bundled models: the same scores, alert spans
/// and alert events as native.
pub fn replay_agrees(b: &BackendUnderTest) {
    for dir in [PAE, MSE] {
        // Whether the backend is usable here (the replay itself loads the model again).
        if (b.load)(dir).is_none() {
            return;
        }
        let native = super::replay_bundled(Backend::Native, dir);
        let other = super::replay_bundled(b.backend, dir);
        assert!(
            other.model.backend_label().starts_with(b.label),
            "{}",
            other.model.backend_label()
        );
        assert_eq!(other.pipeline.frames_scored, native.pipeline.frames_scored);
        assert_eq!(other.pipeline.frames_invalid, 0);
        assert_close(
            &native.scores,
            &other.scores,
            b.tolerance,
            &format!("{dir} replay"),
        );
        assert!(
            !native.events.is_empty(),
            "{dir}: the bundled stream raises alerts"
        );
        assert_eq!(native.alert_spans, other.alert_spans, "{dir}: alert spans");
        let key = |o: &ReplayOutcome| -> Vec<(String, String)> {
            o.events
                .iter()
                .map(|e| (format!("{:?}", e.status), e.starts_at.clone()))
                .collect()
        };
        assert_eq!(key(&native), key(&other), "{dir}: alert events");
    }
}

/// The model tests every backend runs against native, as `#[test]` functions calling the
/// helpers above with `$backend` (an expression giving a [`BackendUnderTest`]).
#[allow(unused_macros)]
macro_rules! backend_parity_tests {
    ($backend:expr) => {
        #[test]
        fn pae_scores_agree_with_native_for_every_head() {
            use darkwatch::score::HeadKind::{MaxAbs, Mse, Wnll};
            util::parity::heads_agree(&$backend, util::parity::PAE, &[Wnll, Mse, MaxAbs]);
        }

        #[test]
        fn plain_ae_scores_agree_with_native() {
            use darkwatch::score::HeadKind::{MaxAbs, Mse};
            util::parity::heads_agree(&$backend, util::parity::MSE, &[Mse, MaxAbs]);
        }

        /// An ensemble's outputs are its members' reconstructions side by side (2·38
        /// columns per output part here); the heads average the members' terms.
        #[test]
        fn ensemble_scores_agree_with_native_for_every_head() {
            use darkwatch::score::HeadKind::{MaxAbs, Mse, Wnll};
            let native = util::parity::load_native(util::parity::ENSEMBLE);
            assert_eq!(native.ae.members, 2);
            assert_eq!(native.ae.recon_width(), 76);
            util::parity::heads_agree(&$backend, util::parity::ENSEMBLE, &[Wnll, Mse, MaxAbs]);
        }

        #[test]
        fn mean_shift_scoring_agrees_with_native() {
            util::parity::mean_shift_scoring_agrees(&$backend);
        }

        #[test]
        fn replay_of_the_bundled_stream_gives_the_same_scores_and_alerts() {
            util::parity::replay_agrees(&$backend);
        }
    };
}
