//! Raw little-endian f32 frames: the first byte is the frame dimension (0..=31), the
//! second the topic shape, the rest the payload.
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
        _ => "n2",
    };
    let decoder = RawConfig {
        stream_from_topic: shape & 4 == 0,
    }
    .build(dim);
    // A dirty buffer: decode must clear it.
    let mut out = vec![f32::NAN; 3];
    match decoder.decode(topic, payload, &mut out) {
        Ok(stream) => {
            assert_eq!(payload.len(), dim * 4);
            assert_eq!(out.len(), dim);
            assert!(out.iter().all(|v| v.is_finite()), "non-finite value");
            if let Some(s) = stream {
                assert!(!s.is_empty());
                assert!(topic.ends_with(s));
            }
        }
        Err(e) => {
            assert!(out.is_empty(), "frame left behind after {e}");
            let _ = e.to_string();
        }
    }
});
