//! `sae-head` and `sae-bench --input` hold their activation rows once: a float32 `.npy` or a
//! `.safetensors` tensor is read into its rows without a copy of the whole file beside them
//! (the trial's 154 MB input peaked at 315 MB). `sae-score` holds no rows at all: it streams
//! either file a block at a time. A counting global allocator measures the peak of live heap bytes while the rows are
//! read or scored. (Its own test binary, because the allocator is process-wide.)

mod util;

use std::alloc::{GlobalAlloc, Layout, System};

use safetensors::tensor::{Dtype, TensorView};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Peak;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// Held through each test: the heap counts are the process's, so a test measuring while
/// the other allocates would count both (CI saw 3.10 × for a read alone).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Peak {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size >= layout.size() {
            grew(new_size - layout.size());
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Peak = Peak;

/// A version-1 `.npy` of `rows × d` float32 values `f(r, c)`.
fn write_npy(path: &std::path::Path, rows: usize, d: usize, f: impl Fn(usize, usize) -> f32) {
    let values: Vec<f32> = (0..rows * d).map(|i| f(i / d, i % d)).collect();
    util::write_npy_f32(path, rows, d, &values);
}

#[test]
fn a_float32_npy_is_read_without_a_second_copy_of_the_file() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("acts.npy");
    let (rows, d) = (40_000, 64);
    let value = |r: usize, c: usize| ((r * 31 + c * 7) % 1000) as f32 / 100.0 - 5.0;
    write_npy(&path, rows, d, value);
    let data = rows * d * 4;
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let x = darkwatch::sae::eval::read_activations(&path, None).unwrap();
    let peak = PEAK.load(Ordering::Relaxed) - before;
    assert_eq!(x.dim(), (rows, d));
    for (r, c) in [(0, 0), (1, 5), (rows - 1, d - 1), (12_345, 17)] {
        assert_eq!(x[[r, c]], value(r, c));
    }
    // The rows themselves, plus a block buffer of a megabyte at most: well under the
    // 2 × data that the file's bytes and their conversion took together.
    assert!(
        (peak as f64) < 1.25 * data as f64,
        "reading {data} bytes of rows peaked at {peak} bytes of heap ({:.2} ×)",
        peak as f64 / data as f64
    );

    // The same from a .safetensors tensor beside another.
    let st = dir.path().join("acts.safetensors");
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = [
        (
            "acts",
            TensorView::new(Dtype::F32, vec![rows, d], &bytes).unwrap(),
        ),
        (
            "other",
            TensorView::new(Dtype::F32, vec![2], &[0u8; 8]).unwrap(),
        ),
    ];
    std::fs::write(&st, safetensors::serialize(views, None).unwrap()).unwrap();
    drop((x, bytes));
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let x = darkwatch::sae::eval::read_activations(&st, Some("acts")).unwrap();
    let peak = PEAK.load(Ordering::Relaxed) - before;
    assert_eq!(x.dim(), (rows, d));
    for (r, c) in [(0, 0), (1, 5), (rows - 1, d - 1), (12_345, 17)] {
        assert_eq!(x[[r, c]], value(r, c));
    }
    assert!(
        (peak as f64) < 1.25 * data as f64,
        "reading {data} bytes of rows from .safetensors peaked at {peak} bytes of heap ({:.2} ×)",
        peak as f64 / data as f64
    );
}

/// `sae-score` streams a C-order float32 `.npy`: with labels, prompt ids, a baseline and both
/// CSVs, its peak of live heap stays well under half the file (a block of rows, a few numbers
/// per row), where holding the rows would take the whole file and more.
#[test]
fn sae_score_streams_its_input_instead_of_holding_it() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    use darkwatch::sae::dark::DarkConfig;
    use darkwatch::sae::eval::{
        SaeScoreArgs, SaeTrainArgs, sae_score_command_in_blocks, sae_train_command,
    };
    use darkwatch::sae::pass::Passes;
    use darkwatch::sae::train::{SaeTrainConfig, SaveMeta};

    let dir = tempfile::tempdir().unwrap();
    let d = 128;
    let value = |r: usize, c: usize| {
        let (a, b) = (
            (r * 37 % 101) as f32 / 50.0 - 1.0,
            (r * 13 % 97) as f32 / 48.0 - 1.0,
        );
        a * (c as f32 * 0.7).cos() + b * (c as f32 * 0.3).sin() + ((r + c) % 7) as f32 * 0.01
    };
    let train = dir.path().join("train.npy");
    write_npy(&train, 512, d, value);
    let sae = dir.path().join("sae");
    let args = SaeTrainArgs {
        input: train.clone(),
        tensor: None,
        prompt_ids: None,
        prompt_ids_tensor: None,
        skip_positions: None,
        out: sae.clone(),
        holdout: 0.25,
        config: SaeTrainConfig {
            latents: 32,
            k: 4,
            epochs: 1,
            ..Default::default()
        },
        dark: DarkConfig { ridge: 1.0 },
        dark_folds: 0,
        meta: SaveMeta::default(),
        force: false,
    };
    sae_train_command(&args, &mut |_| {}).unwrap();

    let rows = 40_000;
    let input = dir.path().join("acts.npy");
    write_npy(&input, rows, d, |r, c| value(r + 7, c) * 1.1);
    let labels = dir.path().join("labels.txt");
    let text: String = (0..rows)
        .map(|r| format!("{}\n", u8::from(r % 5 == 0)))
        .collect();
    std::fs::write(&labels, text).unwrap();
    let ids = dir.path().join("ids.npy");
    let id_bytes: Vec<u8> = (0..rows as i64)
        .flat_map(|r| (r / 10).to_le_bytes())
        .collect();
    util::write_npy(&ids, "<i8", &format!("({rows},)"), &id_bytes);
    let file = std::fs::metadata(&input).unwrap().len() as usize;

    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let (summary, _) = sae_score_command_in_blocks(
        &SaeScoreArgs {
            sae,
            input,
            labels: Some(labels),
            prompt_ids: Some(ids),
            baseline: Some(train),
            baseline_shrinkage: 0.1,
            out: Some(dir.path().join("tokens.csv")),
            prompt_out: Some(dir.path().join("prompts.csv")),
            ..Default::default()
        },
        &Passes::threads(2),
        1024,
    )
    .unwrap();
    let peak = PEAK.load(Ordering::Relaxed) - before;
    assert_eq!(summary.rows, rows);
    assert!(summary.r2_label0.is_some() && summary.nmse_all.is_some());
    assert!(
        peak < file / 2,
        "scoring a {file}-byte file in blocks of 1024 rows peaked at {peak} bytes of heap \
         ({:.2} × the file)",
        peak as f64 / file as f64
    );

    // The same rows as a .safetensors tensor, with the prompt ids and labels as tensors of
    // the same file: the activations are streamed, and reading the ids and labels reads
    // only their own bytes.
    let st = dir.path().join("acts.safetensors");
    let acts: Vec<u8> = (0..rows * d)
        .flat_map(|i| (value(i / d + 7, i % d) * 1.1).to_le_bytes())
        .collect();
    let labels: Vec<u8> = (0..rows).map(|r| u8::from(r % 5 == 0)).collect();
    let views = [
        ("acts", Dtype::F32, vec![rows, d], acts.as_slice()),
        ("ids", Dtype::I64, vec![rows], id_bytes.as_slice()),
        ("labels", Dtype::U8, vec![rows], labels.as_slice()),
    ]
    .map(|(n, t, shape, b)| (n, TensorView::new(t, shape, b).unwrap()));
    std::fs::write(&st, safetensors::serialize(views, None).unwrap()).unwrap();
    drop((acts, labels));
    let file = std::fs::metadata(&st).unwrap().len() as usize;
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let (from_st, _) = sae_score_command_in_blocks(
        &SaeScoreArgs {
            sae: dir.path().join("sae"),
            input: st.clone(),
            tensor: Some("acts".into()),
            labels: Some(st.clone()),
            labels_tensor: Some("labels".into()),
            prompt_ids: Some(st.clone()),
            prompt_ids_tensor: Some("ids".into()),
            baseline: Some(dir.path().join("train.npy")),
            baseline_shrinkage: 0.1,
            out: Some(dir.path().join("tokens-st.csv")),
            prompt_out: Some(dir.path().join("prompts-st.csv")),
            ..Default::default()
        },
        &Passes::threads(2),
        1024,
    )
    .unwrap();
    let peak = PEAK.load(Ordering::Relaxed) - before;
    assert_eq!(from_st.rows, rows);
    assert_eq!(
        std::fs::read(dir.path().join("tokens.csv")).unwrap(),
        std::fs::read(dir.path().join("tokens-st.csv")).unwrap(),
        "the same rows score the same from .npy and .safetensors"
    );
    assert!(
        peak < file / 2,
        "scoring a {file}-byte .safetensors file in blocks of 1024 rows peaked at {peak} bytes \
         of heap ({:.2} × the file)",
        peak as f64 / file as f64
    );
}
