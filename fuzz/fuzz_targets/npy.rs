//! NumPy `.npy` bytes, as 2-D tables and as 1-D-allowed label vectors.
#![no_main]

use std::path::Path;

use darkwatch::ingest::Table;
use darkwatch::ingest::npy::{parse_npy, parse_npy_allow_1d};
use libfuzzer_sys::fuzz_target;

fn check(t: &Table) {
    assert!(t.rows() > 0, "table without rows");
    assert!(t.n_features() > 0, "table without features");
    assert_eq!(t.features.len(), t.values.ncols());
    assert!(t.timestamps.is_none());
    assert!(t.values.iter().all(|v| v.is_finite()), "non-finite value");
}

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.npy");
    let two_d = parse_npy(path, data);
    match &two_d {
        Ok(t) => check(t),
        Err(e) => {
            let _ = e.to_string();
        }
    }
    match parse_npy_allow_1d(path, data) {
        Ok(t) => {
            check(&t);
            if let Ok(t2) = &two_d {
                assert_eq!(t.values, t2.values, "1-D mode changed a 2-D result");
            }
        }
        Err(e) => {
            assert!(two_d.is_err(), "1-D mode rejected a valid 2-D array: {e}");
        }
    }
});
