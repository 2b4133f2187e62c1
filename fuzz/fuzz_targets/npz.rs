//! NumPy `.npz` archives (our own zip reader). The reader takes a path, so each input is
//! written to a per-process scratch file first and removed after each input.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use darkwatch::ingest::npz::{read_npz_labelled, read_npz_member};
use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        // /dev/shm when there is one: the write per input then never touches a disk.
        let dir = PathBuf::from("/dev/shm");
        let dir = if dir.is_dir() {
            dir
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("darkwatch-fuzz-{}.npz", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    std::fs::write(path, data).expect("write scratch file");
    match read_npz_member(path, "X") {
        Ok(t) => {
            assert!(t.rows() > 0 && t.n_features() > 0);
            assert_eq!(t.features.len(), t.values.ncols());
            assert!(t.values.iter().all(|v| v.is_finite()), "non-finite value");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    match read_npz_labelled(path) {
        Ok((x, y)) => {
            assert_eq!(x.rows(), y.len());
            assert!(y.iter().all(|&l| l <= 1));
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    // Leave nothing behind in /dev/shm once the run ends (a crash keeps its input).
    let _ = std::fs::remove_file(path);
});
