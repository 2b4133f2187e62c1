//! Raw little-endian f32 frames: the first byte is the frame dimension (0..=31), the
//! second the topic shape, the rest the payload (bare, or behind a `DWF1` header).
#![no_main]

use darkwatch::ingest::raw::RawConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [dim, shape, payload @ ..] = data else {
        return;
    };
    let dim = usize::from(dim % 32);
    let topic = match shape % 4 {
        0 => "darkwatch/raw/n1",
        1 => "darkwatch/raw/",
        2 => "",
        _ => "n2/x/y",
    };
    let filters = ["darkwatch/raw/+".to_string(), "+/x/+".to_string()];
    let mut decoder = RawConfig {
        stream_from_topic: shape & 4 == 0,
    }
    .build_for(dim, &filters);
    // A dirty buffer: decode must clear it.
    let mut out = vec![f32::NAN; 3];
    match decoder.decode(topic, payload, &mut out) {
        Ok(frame) => {
            let header = darkwatch::ingest::raw::HEADER_BYTES;
            assert!(
                payload.len() == dim * 4
                    || (payload.len() == dim * 4 + header && payload.starts_with(b"DWF1"))
            );
            assert_eq!(out.len(), dim);
            assert!(out.iter().all(|v| v.is_finite()), "non-finite value");
            assert!(frame.time.is_none_or(|t| t.is_finite() && t > 0.0));
            if let Some(s) = frame.stream {
                assert!(!s.is_empty() || topic.is_empty());
            }
        }
        Err(e) => {
            assert!(out.is_empty(), "frame left behind after {e}");
            let _ = e.to_string();
        }
    }
});
