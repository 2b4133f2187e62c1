//! CSV tables, with the timestamp column auto-detected and named explicitly.
#![no_main]

use std::path::Path;

use darkwatch::ingest::TableOptions;
use darkwatch::ingest::csv::parse_csv;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.csv");
    for timestamp_column in [None, Some("timestamp".to_owned())] {
        let opts = TableOptions {
            timestamp_column,
            features: None,
        };
        match parse_csv(path, data, &opts) {
            Ok(t) => {
                assert!(t.rows() > 0, "table without rows");
                assert!(t.n_features() > 0, "table without features");
                assert_eq!(t.features.len(), t.values.ncols());
                assert!(t.values.iter().all(|v| v.is_finite()), "non-finite value");
                if let Some(ts) = &t.timestamps {
                    assert_eq!(ts.len(), t.rows());
                    assert!(ts.iter().all(|v| v.is_finite()), "non-finite timestamp");
                }
                if opts.timestamp_column.is_some() {
                    assert!(t.timestamps.is_some());
                }
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
});
