//! Recorded inputs from wherever a shell puts them: a pipe (`--input /dev/stdin`), a FIFO
//! or a process substitution (no extension to go by), and NPY files with gaps.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use super::util::{darkwatch, quick_config, run, synthetic_csv, write_npy_f32};
use super::{edited_csv, replay_with, trained};

/// Runs `cmd` with `bytes` written to its standard input (from a thread, so that a child
/// that writes much before it reads cannot block the test).
fn run_with_stdin(cmd: &mut Command, bytes: Vec<u8>) -> (i32, String, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // A child that fails before reading closes the pipe: the write error is its business.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&bytes);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `cmd`, which reads the FIFO `fifo`, while a thread writes `bytes` into it.
fn run_with_fifo(cmd: &mut Command, fifo: &Path, bytes: Vec<u8>) -> (i32, String, String) {
    let status = Command::new("mkfifo").arg(fifo).status().unwrap();
    assert!(status.success(), "mkfifo {}", fifo.display());
    let path = fifo.to_owned();
    // Opening a FIFO to write blocks until a reader opens it.
    let writer = std::thread::spawn(move || {
        if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(&path) {
            let _ = f.write_all(&bytes);
        }
    });
    let got = run(cmd);
    // A child that never opened the FIFO leaves the writer waiting for a reader: be one.
    if !writer.is_finished() {
        use std::os::unix::fs::OpenOptionsExt;
        let _reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fifo);
        writer.join().unwrap();
    }
    got
}

/// A CSV through a pipe or a FIFO was refused (`unsupported file type ""`) or read by the
/// strict reader (a FIFO named `.csv` is no regular file); now it is read once, by its
/// content when its name has no extension, and its gaps are filled as a file's are.
#[test]
fn replay_reads_a_csv_from_a_pipe_or_a_fifo_and_fills_its_gaps() {
    let (dir, model, test, lab) = trained();
    let gappy = dir.path().join("gappy.csv");
    edited_csv(&test, &gappy, |i, cells| match i {
        1 => cells[3] = String::new(),
        10 | 11 => cells[2] = "NaN".into(),
        _ => {}
    });
    let bytes = std::fs::read(&gappy).unwrap();
    let (code, out, err) = replay_with(&model, &gappy, &lab, &[] as &[&str]);
    assert_eq!(code, 0, "{out}\n{err}");
    let warning = "3 empty, NaN or Inf cells in 2 of 8 columns (m01: 2, m02: 1)";
    assert!(err.contains(warning), "{err}");
    let auroc = |out: &str| {
        out.lines()
            .find(|l| l.starts_with("point-wise AUROC"))
            .map(str::to_owned)
    };
    let from_file = auroc(&out);
    assert!(from_file.is_some(), "{out}");
    let replay = |input: &Path| {
        let mut cmd = darkwatch();
        cmd.args(["replay", "--model"])
            .arg(&model)
            .arg("--input")
            .arg(input)
            .arg("--labels")
            .arg(&lab);
        cmd
    };
    let mut cases = vec![(
        "/dev/stdin",
        run_with_stdin(&mut replay(Path::new("/dev/stdin")), bytes.clone()),
    )];
    for name in ["feed", "feed.csv"] {
        let fifo = dir.path().join(name);
        cases.push((
            name,
            run_with_fifo(&mut replay(&fifo), &fifo, bytes.clone()),
        ));
    }
    for (name, (code, out, err)) in cases {
        assert_eq!(code, 0, "{name}: {out}\n{err}");
        assert!(err.contains(warning), "{name}: {err}");
        assert!(out.contains("1000 frames scored"), "{name}: {out}");
        assert_eq!(auroc(&out), from_file, "{name}: {out}");
    }
    // `-` is no name for standard input (as for --config): the error says which is.
    let (code, _, err) = run_with_stdin(&mut replay(Path::new("-")), bytes);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("-: cannot read: no such file (for standard input, give /dev/stdin)"),
        "{err}"
    );
}

/// `train` from a pipe hashed the file a second time for its provenance, which a pipe
/// cannot give: the hash is now of the bytes it trained on, the file's own.
#[test]
fn train_reads_a_pipe_once_and_records_its_hash() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("train.csv");
    synthetic_csv(&input, 400, 3, &[]);
    let bytes = std::fs::read(&input).unwrap();
    let out_dir = dir.path().join("m");
    let (code, out, err) = run_with_stdin(
        darkwatch()
            .args(["train", "--input", "/dev/stdin", "--out"])
            .arg(&out_dir)
            .arg("--config")
            .arg(quick_config(dir.path())),
        bytes,
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("400 rows × 3 features"), "{err}");
    let sha = darkwatch::ingest::file_sha256(&input).unwrap();
    let meta = std::fs::read_to_string(out_dir.join("model.json")).unwrap();
    assert!(meta.contains(&sha), "no data sha256 {sha} in {meta}");
}

/// An NPY with a NaN was refused outright while a CSV's gaps were filled: now its NaN and
/// ±Inf are gaps, filled, counted and refused past half as a CSV's are.
#[test]
fn replay_and_train_fill_an_npys_nan_and_inf_as_gaps() {
    let (dir, model, test, lab) = trained();
    // The test CSV's values (without the timestamp column) as an NPY, with gaps.
    let text = std::fs::read_to_string(&test).unwrap();
    let mut values: Vec<f32> = text
        .lines()
        .skip(1)
        .flat_map(|l| l.split(',').skip(1).map(|v| v.parse::<f32>().unwrap()))
        .collect();
    assert_eq!(values.len(), 8000);
    for (i, v) in [
        (8, f32::NAN),
        (16, f32::NAN),
        (8 * 500 + 2, f32::INFINITY),
        (8 * 600 + 7, f32::NEG_INFINITY),
    ] {
        values[i] = v;
    }
    let npy = dir.path().join("gappy.npy");
    write_npy_f32(&npy, 1000, 8, &values);
    let (code, out, err) = replay_with(&model, &npy, &lab, &[] as &[&str]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains(
            "gappy.npy: 4 empty, NaN or Inf cells in 3 of 8 columns (m00: 2, m02: 1, m07: 1)"
        ),
        "{err}"
    );
    assert!(out.contains("1000 frames scored"), "{out}");
    // By its content through a pipe too.
    let (code, out, err) = run_with_stdin(
        darkwatch()
            .args(["replay", "--model"])
            .arg(&model)
            .args(["--input", "/dev/stdin"]),
        std::fs::read(&npy).unwrap(),
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("/dev/stdin: 4 empty, NaN or Inf cells"),
        "{err}"
    );
    // train fills them too (a gap before a column's first value takes the column's mean).
    let (code, out, err) = run(darkwatch()
        .args(["train", "--input"])
        .arg(&npy)
        .arg("--out")
        .arg(dir.path().join("npy-model"))
        .arg("--config")
        .arg(quick_config(dir.path())));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("4 empty, NaN or Inf cells in 3 of 8 columns"),
        "{err}"
    );
    // Mostly gaps: refused, as a CSV.
    let holes: Vec<f32> = values
        .iter()
        .enumerate()
        .map(|(i, &v)| if i % 8 < 5 { f32::NAN } else { v })
        .collect();
    let npy = dir.path().join("holes.npy");
    write_npy_f32(&npy, 1000, 8, &holes);
    let (code, _, err) = replay_with(&model, &npy, &lab, &[] as &[&str]);
    assert_eq!(code, 1, "{err}");
    // 5000 filled by hand, and the -Inf above.
    assert!(
        err.contains("5001 of 8000 cells (63 %) are empty, NaN or Inf"),
        "{err}"
    );
    // Labels stay strict: a NaN label is no gap.
    let bad_labels = dir.path().join("labels.npy");
    let mut l = vec![0.0f32; 1000];
    l[3] = f32::NAN;
    write_npy_f32(&bad_labels, 1000, 1, &l);
    let (code, _, err) = replay_with(&model, &test, &bad_labels, &[] as &[&str]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("labels.npy") && err.contains("NaN/Inf"),
        "{err}"
    );
}

/// A stored (uncompressed) zip of `members`, as `np.savez` writes an `.npz`.
fn stored_zip(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in members {
        let offset = out.len() as u32;
        let sizes = [(data.len() as u32).to_le_bytes(); 2].concat();
        out.extend_from_slice(&[0x50, 0x4b, 0x03, 0x04, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&sizes);
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        central.extend_from_slice(&[0x50, 0x4b, 0x01, 0x02, 20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        central.extend_from_slice(&[0; 4]);
        central.extend_from_slice(&sizes);
        central.extend_from_slice(&(name.len() as u16).to_le_bytes());
        central.extend_from_slice(&[0; 12]);
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let (cd_offset, cd_len) = (out.len() as u32, central.len() as u32);
    out.extend_from_slice(&central);
    out.extend_from_slice(&[0x50, 0x4b, 0x05, 0x06, 0, 0, 0, 0]);
    out.extend_from_slice(&[(members.len() as u16).to_le_bytes(); 2].concat());
    out.extend_from_slice(&cd_len.to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out
}

/// What a researcher's pandas and NumPy files met: a CSV with pandas' index and default
/// column names was refused, a `label` column was trained on without a word, `.npz` was
/// an unsupported type, a labels file with pandas' header `0` was one label too many
/// without a why, and `--out` onto a file said only "File exists".
#[test]
fn train_and_replay_take_files_written_by_pandas_and_numpy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src.csv");
    synthetic_csv(&src, 400, 3, &[]);
    // `pd.DataFrame(X).to_csv("pd.csv")`: an unnamed index column, columns 0, 1, 2.
    let pandas = d.join("pd.csv");
    edited_csv(&src, &pandas, |i, cells| match i {
        0 => *cells = vec!["".into(), "0".into(), "1".into(), "2".into()],
        _ => cells[0] = (i - 1).to_string(),
    });
    // The same with a label column.
    let labelled = d.join("labelled.csv");
    edited_csv(&pandas, &labelled, |i, cells| {
        cells.push(if i == 0 { "Label".into() } else { "0".into() })
    });
    let train = |input: &Path, out: &str| {
        run(darkwatch()
            .args(["train", "--input"])
            .arg(input)
            .arg("--out")
            .arg(d.join(out))
            .arg("--config")
            .arg(quick_config(d)))
    };
    let (code, out, err) = train(&pandas, "m");
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("400 rows × 3 features"), "{err}");
    assert!(
        err.contains(
            "pd.csv: column 1 has no name and holds the row numbers 0, 1, 2, …: a pandas index"
        ),
        "{err}"
    );
    assert!(!err.contains("looks like labels"), "{err}");
    let (code, out, err) = train(&labelled, "m-label");
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("labelled.csv: column \"Label\" looks like labels, not a measurement, and is read as a feature")
            && err.contains("--labels"),
        "{err}"
    );
    assert!(err.contains("400 rows × 4 features"), "{err}");
    // replay skips a column the model lacks, and says which.
    let hosted = d.join("hosted.csv");
    edited_csv(&pandas, &hosted, |i, cells| {
        cells.push(if i == 0 {
            "host".into()
        } else {
            "node01".into()
        })
    });
    let (code, out, err) = run(darkwatch()
        .args(["replay", "--model"])
        .arg(d.join("m"))
        .arg("--input")
        .arg(&hosted));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("hosted.csv: 1 column is not among the model's features, skipped: \"host\""),
        "{err}"
    );
    // The same rows as an .npz (X float64, y int64), for --input and --labels.
    let text = std::fs::read_to_string(&src).unwrap();
    let x: Vec<u8> = text
        .lines()
        .skip(1)
        .flat_map(|l| l.split(',').skip(1).map(|v| v.parse::<f64>().unwrap()))
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let y: Vec<u8> = (0..400i64)
        .map(|i| i64::from(i % 50 == 0))
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let npy = |name: &str, descr: &str, shape: &str, data: &[u8]| {
        let p = d.join(name);
        super::util::write_npy(&p, descr, shape, data);
        std::fs::read(p).unwrap()
    };
    let npz = d.join("odds.npz");
    std::fs::write(
        &npz,
        stored_zip(&[
            ("X.npy", npy("X.npy", "<f8", "(400, 3)", &x)),
            ("y.npy", npy("y.npy", "<i8", "(400,)", &y)),
        ]),
    )
    .unwrap();
    let (code, out, err) = train(&npz, "m-npz");
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("odds.npz (400 rows × 3 features)"), "{err}");
    // An .npz is what ODDS / ADBench tables come as: read in order, it is said so, with
    // --table named (a researcher's trial got inflated numbers without a word).
    assert!(
        err.contains("odds.npz: an .npz is read as a stream, its rows in order")
            && err.contains("For a table, train with --table."),
        "{err}"
    );
    let (code, out, err) = replay_with(&d.join("m-npz"), &npz, &npz, &[] as &[&str]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("AUROC"), "{out}");
    assert!(err.contains("an .npz is scored as a stream"), "{err}");
    let (code, out, err) = replay_with(&d.join("m-npz"), &npz, &npz, &["--table"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(!err.contains("an .npz is scored as a stream"), "{err}");
    // `pd.Series(y).to_csv("y.csv", index=False)`: the header `0`, then 400 labels.
    let ycsv = d.join("y.csv");
    let labels: String = (0..400)
        .map(|i| format!("{}\n", u8::from(i % 50 == 0)))
        .collect();
    std::fs::write(&ycsv, format!("0\n{labels}")).unwrap();
    let (code, _, err) = replay_with(&d.join("m-npz"), &npz, &ycsv, &[] as &[&str]);
    assert_ne!(code, 0);
    assert!(
        err.contains("y.csv: 401 labels, but the data has 400 rows; the first line, \"0\", looks like a header"),
        "{err}"
    );
    // --out onto a file.
    std::fs::write(d.join("afile"), b"x").unwrap();
    let (code, _, err) = train(&pandas, "afile");
    assert_ne!(code, 0);
    assert!(
        err.contains("afile: --out is a file, not a folder"),
        "{err}"
    );
}
