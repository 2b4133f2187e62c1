//! Shared helpers for the integration tests: the real binary, temp dirs, small data files.

#![allow(dead_code)]

pub mod broker;
#[macro_use]
pub mod parity;
pub mod process;
pub mod sae;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `darkwatch` binary built for this test run.
pub fn darkwatch() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_darkwatch"));
    clean_env(&mut cmd);
    cmd
}

/// darkwatch under `timeout SECS`, with the same environment as [`darkwatch`]: for a
/// command such as `run` that must exit on its own, so that one which starts anyway fails
/// its test (exit 124) instead of hanging it.
pub fn darkwatch_within(secs: u32) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.arg(secs.to_string())
        .arg(env!("CARGO_BIN_EXE_darkwatch"));
    clean_env(&mut cmd);
    cmd
}

/// No log filter and no `DARKWATCH__` override from the caller's environment.
fn clean_env(cmd: &mut Command) {
    cmd.env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("DARKWATCH__") {
            cmd.env_remove(k);
        }
    }
}

/// Runs a command and returns (exit code, stdout, stderr).
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("binary runs");
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// Replays the bundled SMD test stream (with its labels) through the model in `dir`
/// (relative to the repository) on `backend`, with default settings otherwise: what the
/// backend parity tests compare.
pub fn replay_bundled(
    backend: darkwatch::config::Backend,
    dir: &str,
) -> darkwatch::replay::ReplayOutcome {
    let mut cfg = darkwatch::config::DarkwatchConfig::default();
    cfg.score.backend = backend;
    let req = darkwatch::replay::ReplayRequest {
        model_dir: repo(dir),
        input: repo("tests/data/smd/machine-1-6_test.npy"),
        labels: Some(repo("tests/data/smd/machine-1-6_test_label.txt")),
        ..Default::default()
    };
    darkwatch::replay::replay(&req, &cfg).expect("replay runs")
}

/// Path of a file shipped with the repository.
pub fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A CSV of `rows` frames of `d` correlated features (a few latent factors plus noise),
/// deterministic, with a timestamp column. Rows listed in `anomalies` get a large shift
/// on their first feature.
pub fn synthetic_csv(path: &Path, rows: usize, d: usize, anomalies: &[usize]) {
    let mut s = String::from("timestamp");
    for j in 0..d {
        let _ = write!(s, ",m{j:02}");
    }
    s.push('\n');
    let mut noise = noise(12345);
    for i in 0..rows {
        let t = i as f64 * 0.05;
        let (a, b) = (t.sin(), (0.7 * t).cos());
        let _ = write!(s, "{}", 1_700_000_000 + 60 * i);
        for j in 0..d {
            let mut v = a * (j as f64 * 0.3).cos() + b * (j as f64 * 0.2).sin() + 0.05 * noise();
            if j == 0 && anomalies.contains(&i) {
                v += 4.0;
            }
            let _ = write!(s, ",{v:.5}");
        }
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

/// A label file with ones at `anomalies`.
pub fn labels(path: &Path, rows: usize, anomalies: &[usize]) {
    let s: String = (0..rows)
        .map(|i| if anomalies.contains(&i) { "1\n" } else { "0\n" })
        .collect();
    std::fs::write(path, s).unwrap();
}

/// Writes a small TOML config for quick training.
pub fn quick_config(dir: &Path) -> PathBuf {
    let p = dir.join("quick.toml");
    std::fs::write(&p, "[train]\nepochs_max = 15\nbatch_size = 64\n").unwrap();
    p
}

/// Deterministic uniform noise in [−0.5, 0.5) from a 64-bit LCG started at `state`.
pub fn noise(mut state: u64) -> impl FnMut() -> f64 {
    move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f64 / (1u64 << 31) as f64) - 0.5
    }
}

/// Writes `values` (`rows × cols`, row-major) as a little-endian f32 `.npy` file.
pub fn write_npy_f32(path: &Path, rows: usize, cols: usize, values: &[f32]) {
    assert_eq!(values.len(), rows * cols);
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy(path, "<f4", &format!("({rows}, {cols})"), &data);
}

/// Writes an `.npy` file (version 1.0) of dtype `descr` and `shape` (a Python tuple, as
/// `"(4,)"`) holding `data`, as `np.save` does.
pub fn write_npy(path: &Path, descr: &str, shape: &str, data: &[u8]) {
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n', padded to 64 bytes.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}
