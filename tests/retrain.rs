//! Online retraining on real SMD telemetry: a new normal is learned, an incident is not,
//! and a crash in the middle of a checkpoint never leaves the agent without a model.

mod util;

use std::path::Path;
use std::sync::Arc;

use darkwatch::config::DarkwatchConfig;
use darkwatch::ingest::{self, TableOptions};
use darkwatch::model::Model;
use darkwatch::replay::{self, Frames, Outputs, ReplayOutcome};
use darkwatch::retrain::{CheckpointStore, RetrainConfig};
use darkwatch::rng::Rng;
use ndarray::{Array2, s};
use util::{darkwatch, darkwatch_within, repo, run};

const MODEL: &str = "models/smd-machine-1-6";
/// Metrics whose level moves (SMD machine-1-6 columns, min-max scaled to [0, 1]).
const SHIFTED: [usize; 3] = [1, 2, 3];
/// The shift: about 7 standard deviations of these metrics.
const SHIFT: f32 = 0.3;
const SHIFT_AT: usize = 6_000;
/// Injected anomalies: windows of 10 frames, every 500 frames from here.
const ANOMALIES_AT: usize = 18_000;

fn normal() -> Array2<f32> {
    ingest::read_table(
        &repo("tests/data/smd/machine-1-6_train.npy"),
        &TableOptions::default(),
    )
    .expect("bundled training data")
    .values
}

/// Ten 10-frame windows with three metrics pushed up by 1.2, from `ANOMALIES_AT` on. (With
/// 0.8, one run in four of the retraining replay missed one window: a retrained model's
/// threshold happened to sit above it.)
fn inject(x: &mut Array2<f32>) -> Vec<u8> {
    let mut labels = vec![0u8; x.nrows()];
    let mut rng = Rng::new(11);
    for k in 0..10 {
        let start = ANOMALIES_AT + 500 * k;
        for _ in 0..3 {
            let f = rng.below(x.ncols());
            x.slice_mut(s![start..start + 10, f])
                .map_inplace(|v| *v += 1.2);
        }
        labels[start..start + 10].fill(1);
    }
    labels
}

fn retrain_cfg() -> RetrainConfig {
    RetrainConfig {
        enabled: true,
        reservoir_frames: 10_000,
        horizon_frames: 40_000,
        every_frames: 2_000,
        every_secs: 0,
        min_frames: 2_000,
        adopt_after_frames: 1_000,
        ..RetrainConfig::default()
    }
}

fn replay_frames(x: Array2<f32>, labels: Vec<u8>, retrain: Option<RetrainConfig>) -> ReplayOutcome {
    let mut cfg = DarkwatchConfig::default();
    if let Some(r) = retrain {
        cfg.retrain = r;
    }
    let model = Arc::new(Model::load(&repo(MODEL)).unwrap());
    let head = model.meta.head;
    let frames = Frames {
        values: x.into(),
        timestamps: None,
        labels: Some(labels),
        window_frames: 1,
    };
    replay::replay_frames(model, head, frames, Outputs::default(), None, &cfg).expect("replay")
}

fn alarms(o: &ReplayOutcome) -> Vec<bool> {
    o.scores
        .iter()
        .zip(&o.thresholds)
        .map(|(&s, &t)| f64::from(s) > t)
        .collect()
}

/// Share of unlabelled frames in `lo..hi` above the threshold.
fn false_alert_rate(o: &ReplayOutcome, labels: &[u8], lo: usize, hi: usize) -> f64 {
    let a = alarms(o);
    let normal: Vec<usize> = (lo..hi).filter(|&i| labels[i] == 0).collect();
    normal.iter().filter(|&&i| a[i]).count() as f64 / normal.len() as f64
}

/// Share of injected windows with at least one frame above the threshold.
fn recall(o: &ReplayOutcome) -> f64 {
    let a = alarms(o);
    (0..10)
        .filter(|k| {
            let start = ANOMALIES_AT + 500 * k;
            a[start..start + 10].iter().any(|&x| x)
        })
        .count() as f64
        / 10.0
}

#[test]
fn a_level_shift_is_learned_and_later_anomalies_are_still_caught() {
    // Baseline: no shift, no retraining.
    let mut base = normal();
    let labels = inject(&mut base);
    let baseline = replay_frames(base, labels.clone(), None);
    // The same with three metrics shifted from SHIFT_AT on: a new normal.
    let mut shifted = normal();
    shifted
        .slice_mut(s![SHIFT_AT.., ..])
        .columns_mut()
        .into_iter()
        .enumerate()
        .filter(|(j, _)| SHIFTED.contains(j))
        .for_each(|(_, mut c)| c.map_inplace(|v| *v += SHIFT));
    inject(&mut shifted);
    let frozen = replay_frames(shifted.clone(), labels.clone(), None);
    let adapting = replay_frames(shifted, labels.clone(), Some(retrain_cfg()));

    // Adaptation: a bounded 4,000 frames after the shift (adopt_after_frames + a retrain).
    let after = SHIFT_AT + 4_000;
    let median = |o: &ReplayOutcome| {
        let mut v = o.scores[after..ANOMALIES_AT].to_vec();
        v.sort_by(f32::total_cmp);
        v[v.len() / 2]
    };
    let bundled = Model::load(&repo(MODEL)).unwrap();
    let quantile = |want: f64| {
        bundled
            .meta
            .calibration
            .score_quantiles
            .iter()
            .find(|q| q.q == want)
            .map(|q| q.score)
            .expect("calibration quantile")
    };
    let (q99, q999) = (quantile(0.99), quantile(0.999));
    let far_frozen = false_alert_rate(&frozen, &labels, after, ANOMALIES_AT);
    let far_adapting = false_alert_rate(&adapting, &labels, after, ANOMALIES_AT);
    let far_before = false_alert_rate(&adapting, &labels, 0, SHIFT_AT);
    let r = adapting.retrain.as_ref().expect("retraining ran");
    println!(
        "median score after the shift (frames {after}..{ANOMALIES_AT}): frozen {:.1}, retraining \
         {:.1} (calibration q0.99 {q99:.1}, q0.999 {q999:.1}); false-alert rate before the shift {:.3} %; after \
         it: frozen {:.2} %, retraining {:.3} %; recall: baseline {:.2}, frozen {:.2}, retraining \
         {:.2}\n{r}",
        median(&frozen),
        median(&adapting),
        100.0 * far_before,
        100.0 * far_frozen,
        100.0 * far_adapting,
        recall(&baseline),
        recall(&frozen),
        recall(&adapting)
    );
    // Without retraining the typical shifted frame stays above the model's own q0.999 (SPOT
    // may still raise its threshold over it, which blinds it to smaller anomalies); after
    // retraining the typical frame is back under the model's own q0.99.
    assert!(
        median(&frozen) > q999,
        "without retraining the shift looks anomalous ({} vs q0.999 {q999})",
        median(&frozen)
    );
    assert!(
        median(&adapting) < q99,
        "retraining learns the shift ({} vs q0.99 {q99}; frozen {})",
        median(&adapting),
        median(&frozen)
    );
    assert!(
        far_adapting < 0.01,
        "after adapting, false alerts stay under 1 % ({far_adapting})"
    );
    assert!(r.accepted >= 1 && r.adoptions >= 1, "{r}");
    assert!(
        recall(&adapting) >= recall(&baseline),
        "anomalies after the shift are caught as well as without it"
    );
    // Versions only go up, and the stream ends on the newest one or the one before (a
    // retrain may finish after the last frame).
    assert!(adapting.model_versions.windows(2).all(|w| w[0] <= w[1]));
    assert!(u64::from(*adapting.model_versions.last().unwrap()) + 1 >= r.final_version);
}

#[test]
fn a_long_incident_is_not_learned() {
    // A 600-frame incident (10 hours at SMD's one frame a minute): the same metrics as the
    // drift test, moved twice as far (the drift test's shift alone barely crosses the
    // thresholds of retrained models), shorter than adopt_after_frames, and again after
    // later retrains.
    let incident = |start: usize| start..start + 600;
    let (first, again) = (incident(8_000), incident(15_000));
    let mut x = normal();
    let mut labels = vec![0u8; x.nrows()];
    for span in [first.clone(), again.clone()] {
        for j in SHIFTED {
            x.slice_mut(s![span.clone(), j])
                .map_inplace(|v| *v += 2.0 * SHIFT);
        }
        labels[span].fill(1);
    }
    let o = replay_frames(x, labels.clone(), Some(retrain_cfg()));
    let r = o.retrain.as_ref().expect("retraining ran");
    println!("{r}");
    let guard = retrain_cfg().guard_frames as usize;
    for span in [&first, &again] {
        let near = (span.start - guard) as u64..(span.end + guard) as u64;
        let inside: Vec<(u64, f32, f64)> = r
            .reservoir_seqs
            .iter()
            .filter(|s| near.contains(s))
            .map(|&s| (s, o.scores[s as usize], o.thresholds[s as usize]))
            .collect();
        println!("incident frames in the reservoir: {inside:?}");
        assert!(
            !r.reservoir_seqs.iter().any(|s| near.contains(s)),
            "no frame of the incident {span:?} is in the reservoir"
        );
    }
    assert_eq!(r.adoptions, 0, "{r}");
    let median = |lo: usize, hi: usize| {
        let mut v = o.scores[lo..hi].to_vec();
        v.sort_by(f32::total_cmp);
        v[v.len() / 2]
    };
    let early = median(first.start, first.start + 100);
    let late = median(first.end - 100, first.end);
    assert!(
        late >= 0.8 * early,
        "late frames score as high as early ones ({late} vs {early})"
    );
    // Retrains happened between the two occurrences, and the second is still caught.
    let v_first = o.model_versions[first.start];
    let v_again = o.model_versions[again.start];
    assert!(
        v_again > v_first,
        "a retrain landed in between ({v_first} -> {v_again})"
    );
    let recurrence = median(again.start, again.start + 100);
    assert!(recurrence >= 0.8 * early, "{recurrence} vs {early}");
    let a = alarms(&o);
    let count = |span: &std::ops::Range<usize>| a[span.clone()].iter().filter(|&&x| x).count();
    let (n_first, n_again) = (count(&first), count(&again));
    println!(
        "frames above the threshold: first occurrence {n_first} (threshold {:.0}), recurrence \
         {n_again} (threshold {:.0}); median score {:.0} and {:.0}",
        o.thresholds[first.start],
        o.thresholds[again.start],
        median(first.start, first.end),
        median(again.start, again.end)
    );
    // The scores say whether the model learned the incident; how many frames cross the
    // threshold also depends on the retrained models' thresholds, which SPOT refits.
    assert!(n_again > 0, "the recurrence raises alarms");
    let episodes = o
        .alert_spans
        .iter()
        .filter(|&&(lo, hi)| lo < again.end && again.start <= hi)
        .count();
    assert!(episodes >= 1, "an alert episode covers the recurrence");
}

fn checkpoint_config(dir: &Path) -> std::path::PathBuf {
    let cfg = dir.join("retrain.toml");
    std::fs::write(
        &cfg,
        format!(
            "[retrain]\nenabled = true\nreservoir_frames = 4000\nhorizon_frames = 8000\n\
             every_frames = 500\nevery_secs = 0\nmin_frames = 400\nepochs = 1\n\
             adopt_after_frames = 0\nreplay_pause = true\nkeep_checkpoints = 3\nstate_dir = \"{}\"\n",
            dir.join("state").display()
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn a_kill_during_a_checkpoint_never_loses_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = checkpoint_config(dir.path());
    let state = dir.path().join("state");
    let replay = || {
        let mut c = darkwatch();
        c.args(["replay", "--model"])
            .arg(repo(MODEL))
            .arg("--input")
            .arg(repo("tests/data/smd/machine-1-6_train.npy"))
            .arg("--config")
            .arg(&cfg);
        c
    };
    // Kill the replay the moment a checkpoint is being written; repeat until one lands
    // mid-write (a temporary directory left behind).
    let mut caught = false;
    for _ in 0..40 {
        let mut child = replay()
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        loop {
            let writing = std::fs::read_dir(&state)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-"));
            if writing || started.elapsed().as_secs() > 60 {
                break;
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
        }
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let leftover = std::fs::read_dir(&state)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-"));
        if leftover {
            caught = true;
            break;
        }
    }
    assert!(
        caught,
        "no kill landed in the middle of a checkpoint write in 40 tries"
    );
    let store = CheckpointStore::new(&state, 3);
    let newest_complete = store.list().first().map(|(v, _)| *v);

    // Also corrupt the newest complete checkpoint, if any: it must be skipped.
    if let Some((_, path)) = store.list().first() {
        std::fs::write(path.join("model.safetensors"), b"torn").unwrap();
    }
    let (code, out, err) = run(replay().env("RUST_LOG", "warn"));
    assert_eq!(code, 0, "restart after the kill: {err}");
    assert!(out.contains("retrain"), "{out}");
    if newest_complete.is_some() {
        assert!(
            err.contains("skipping a checkpoint"),
            "the corrupt checkpoint is skipped: {err}"
        );
    }
    // Whatever it resumed from, every checkpoint left now loads.
    for (_, path) in store.list() {
        Model::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    assert!(!store.list().is_empty());
}

/// With `replay_pause` (the default), a replay with retraining is reproducible: each new
/// model takes over at the same frame, and every score, threshold and model version is
/// the same however the threads were scheduled (the second run shares the machine with two
/// busy threads).
#[test]
fn a_replay_with_retraining_is_reproducible() {
    let x = normal().slice(s![..9_000, ..]).to_owned();
    let labels = vec![0u8; x.nrows()];
    let runs: Vec<ReplayOutcome> = (0..2)
        .map(|i| {
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let burners: Vec<_> = (0..2 * usize::from(i == 1))
                .map(|_| {
                    let stop = stop.clone();
                    std::thread::spawn(move || {
                        let mut v = 0u64;
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            v = v.wrapping_mul(6364136223846793005).wrapping_add(1);
                        }
                        v
                    })
                })
                .collect();
            let o = replay_frames(x.clone(), labels.clone(), Some(retrain_cfg()));
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            for b in burners {
                b.join().unwrap();
            }
            o
        })
        .collect();
    let r = runs[0].retrain.as_ref().expect("retraining ran");
    assert!(r.accepted >= 2, "{r}");
    let bits = |o: &ReplayOutcome| o.scores.iter().map(|s| s.to_bits()).collect::<Vec<_>>();
    for o in &runs[1..] {
        assert_eq!(o.model_versions, runs[0].model_versions);
        assert!(bits(o) == bits(&runs[0]), "scores differ between runs");
        assert_eq!(o.thresholds, runs[0].thresholds);
    }
}

/// A state directory's checkpoints continue only the model they descend from: another
/// model directory's model with the same features starts from its own weights (a user who
/// points `--model` elsewhere gets that model, not an old checkpoint).
#[test]
fn checkpoints_of_another_model_are_not_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = RetrainConfig {
        state_dir: dir.path().join("state"),
        ..retrain_cfg()
    };
    let a = Model::load(&repo(MODEL)).unwrap();
    let b = Model::load(&repo("models/smd-machine-1-6-mse")).unwrap();
    assert_eq!(a.meta.features, b.meta.features);
    assert_ne!(a.meta.id, b.meta.id);

    // A fresh state directory: the configured model, recorded as the chain's origin.
    assert_eq!(
        darkwatch::retrain::resume(a.clone(), &cfg)
            .unwrap()
            .meta
            .version,
        a.meta.version
    );
    let store = CheckpointStore::new(&cfg.state_dir, 3);
    assert_eq!(store.origin().as_deref(), Some(a.meta.id.as_str()));

    // A later version of `a` in the store: `a` resumes from it, `b` does not.
    let mut next = a.clone();
    next.meta.version = a.meta.version + 1;
    store.write(&next).unwrap();
    assert_eq!(
        darkwatch::retrain::resume(a.clone(), &cfg)
            .unwrap()
            .meta
            .version,
        a.meta.version + 1
    );
    let got = darkwatch::retrain::resume(b.clone(), &cfg).unwrap();
    assert_eq!(
        (got.meta.id.as_str(), got.meta.version),
        (b.meta.id.as_str(), b.meta.version)
    );
    // `a`'s chain is set aside, not deleted: the directory now holds `b`'s chain, empty.
    assert!(store.list().is_empty(), "{:?}", store.list());
    assert_eq!(store.origin().as_deref(), Some(b.meta.id.as_str()));
    let aside: Vec<_> = std::fs::read_dir(&cfg.state_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("superseded-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    Model::load(&aside[0].join(format!("ckpt-{:08}", a.meta.version + 1))).unwrap();
    // `b`'s own checkpoints resume after that.
    let mut b_next = b.clone();
    b_next.meta.version = b.meta.version + 1;
    store.write(&b_next).unwrap();
    let got = darkwatch::retrain::resume(b.clone(), &cfg).unwrap();
    assert_eq!(got.meta.version, b.meta.version + 1);
}

/// A replay that continues a state directory's chain says so: scoring with a checkpoint
/// fine-tuned on earlier replays, silently, made a rerun look better than the model is.
#[test]
fn a_replay_that_resumes_a_checkpoint_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DarkwatchConfig {
        // No retrain of its own during the replay: the only checkpoint is the test's.
        retrain: RetrainConfig {
            state_dir: dir.path().join("state"),
            every_frames: u64::MAX,
            adopt_after_frames: u64::MAX,
            ..retrain_cfg()
        },
        ..DarkwatchConfig::default()
    };
    let req = replay::ReplayRequest {
        model_dir: repo(MODEL),
        input: repo("tests/data/smd/small.csv"),
        ..Default::default()
    };
    // A fresh state folder: the model folder's model scores, and nothing is said.
    let fresh = replay::replay(&req, &cfg).expect("replay");
    assert_eq!(fresh.resumed, None);
    assert!(!fresh.to_string().contains("resumed"), "{fresh}");

    let a = Model::load(&repo(MODEL)).unwrap();
    let mut next = a.clone();
    next.meta.version = a.meta.version + 1;
    CheckpointStore::new(&cfg.retrain.state_dir, 3)
        .write(&next)
        .unwrap();
    let again = replay::replay(&req, &cfg).expect("replay");
    assert_eq!(
        again.resumed,
        Some((a.meta.version + 1, cfg.retrain.state_dir.clone()))
    );
    let text = again.to_string();
    assert!(
        text.contains(&format!("resumed: version {}", a.meta.version + 1))
            && text.contains(&cfg.retrain.state_dir.display().to_string()),
        "{text}"
    );

    // `inspect` describes the state folder, as text and as JSON.
    let inspect = |json: bool| {
        let mut cmd = darkwatch();
        cmd.arg("inspect").arg(&cfg.retrain.state_dir);
        if json {
            cmd.arg("--json");
        }
        let (code, out, err) = run(&mut cmd);
        assert_eq!(code, 0, "{err}");
        out
    };
    let text = inspect(false);
    assert!(
        text.contains("checkpoint v1 ") && text.contains(&a.meta.id),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&inspect(true)).expect("JSON");
    assert_eq!(json["kind"], "retrain_state");
    assert_eq!(json["origin"], a.meta.id.as_str());
    assert_eq!(json["checkpoints"][0]["version"], a.meta.version + 1);
    assert_eq!(json["checkpoints"][0]["model_id"], a.meta.id.as_str());
    assert_eq!(json["history"].as_array().map(Vec::len), Some(0));
}

/// A state directory that can never hold a checkpoint is refused when the model loads, by
/// `replay` and by `run` before it tells systemd it is ready: it used to give WARN lines
/// and retrain with every checkpoint lost.
#[test]
fn an_unusable_state_directory_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let cfg = RetrainConfig {
        state_dir: file.clone(),
        ..retrain_cfg()
    };
    let a = Model::load(&repo(MODEL)).unwrap();
    let err = darkwatch::retrain::resume(a.clone(), &cfg)
        .expect_err("a file as the state directory")
        .to_string();
    assert!(
        err.contains("[retrain] state_dir") && err.contains(&file.display().to_string()),
        "{err}"
    );
    // Below a file: cannot be made either.
    let below = RetrainConfig {
        state_dir: file.join("state"),
        ..retrain_cfg()
    };
    assert!(darkwatch::retrain::resume(a.clone(), &below).is_err());
    // A missing directory is made, and no probe file is left in it.
    let fresh = RetrainConfig {
        state_dir: dir.path().join("new/state"),
        ..retrain_cfg()
    };
    darkwatch::retrain::resume(a.clone(), &fresh).unwrap();
    let names: Vec<String> = std::fs::read_dir(&fresh.state_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["origin"], "{names:?}");
    // With retraining off the state directory is not looked at.
    let off = RetrainConfig {
        enabled: false,
        ..cfg.clone()
    };
    darkwatch::retrain::resume(a, &off).unwrap();

    // The binary: `replay` exits 1 naming the key and the path; `run` checks the folder
    // before it starts, and exits 78 (a configuration error, which systemd does not
    // restart into).
    let toml = dir.path().join("bad-state.toml");
    std::fs::write(
        &toml,
        format!(
            "[agent]\nmodel_dir = \"{}\"\n[mqtt]\nport = 0\n[spool]\ndir = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n[retrain]\nenabled = true\nstate_dir = \"{}\"\n",
            repo(MODEL).display(),
            dir.path().join("spool").display(),
            file.display()
        ),
    )
    .unwrap();
    let (code, _, err) = run(darkwatch()
        .args(["replay", "--model"])
        .arg(repo(MODEL))
        .arg("--input")
        .arg(repo("tests/data/smd/small.csv"))
        .arg("--config")
        .arg(&toml));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("[retrain] state_dir"), "{err}");
    // Under `timeout`: an agent that starts anyway must fail the test, not hang it.
    let (code, _, err) = run(darkwatch_within(60).args(["run", "--config"]).arg(&toml));
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("key `retrain.state_dir`") && err.contains(&file.display().to_string()),
        "{err}"
    );
}
