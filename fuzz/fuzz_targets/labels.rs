//! Label files: point labels (one 0/1 per line) and SMD interpretation labels.
#![no_main]

use std::path::Path;

use darkwatch::ingest::labels::{parse_interpretation_labels, parse_labels};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz_labels.txt");
    match parse_labels(path, data, None) {
        Ok(labels) => {
            assert!(!labels.is_empty());
            assert!(labels.iter().all(|&l| l <= 1), "label not 0/1");
            // The count check accepts the right count and rejects any other.
            assert!(parse_labels(path, data, Some(labels.len())).is_ok());
            assert!(parse_labels(path, data, Some(labels.len() + 1)).is_err());
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    match parse_interpretation_labels(path, data) {
        Ok(segments) => {
            for s in &segments {
                assert!(s.start <= s.end, "segment {s:?} ends before it starts");
                assert_eq!(s.len() - 1, s.end - s.start);
                assert!(!s.is_empty());
                assert!(s.contains(s.start) && s.contains(s.end));
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
