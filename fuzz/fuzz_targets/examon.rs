//! ExaMon messages: the input is `topic NUL payload` (MQTT topics cannot hold U+0000);
//! without a NUL the whole input is the payload of a fixed, valid topic.
#![no_main]

use darkwatch::ingest::examon::{ExamonConfig, parse_payload, url_decode};
use libfuzzer_sys::fuzz_target;

const TOPIC: &str = "org/o/cluster/c/node/n1/plugin/p/chnl/data/m";

fuzz_target!(|data: &[u8]| {
    let (topic, payload) = match data.iter().position(|&b| b == 0) {
        Some(at) => match std::str::from_utf8(&data[..at]) {
            Ok(topic) => (topic, &data[at + 1..]),
            Err(_) => return,
        },
        None => (TOPIC, data),
    };
    let decoder = ExamonConfig::default().build();
    let plain = decoder.decode(topic, payload);
    let mut tags = Vec::new();
    let tagged = decoder.decode_with_tags(topic, payload, &mut tags);
    assert_eq!(plain, tagged, "decode and decode_with_tags disagree");
    match plain {
        Ok(s) => {
            assert!(s.value.is_finite(), "non-finite value {}", s.value);
            assert!(
                s.timestamp.is_finite() && s.timestamp >= 0.0,
                "bad timestamp {}",
                s.timestamp
            );
            assert!(!s.stream.is_empty(), "empty stream");
            assert!(!s.metric.is_empty(), "empty metric");
            assert!(tags.iter().all(|(k, _)| k != "node"), "stream key in tags");
            assert_eq!(parse_payload(payload), Ok((s.value, s.timestamp)));
        }
        Err(e) => {
            assert!(!e.reason().is_empty());
            // Error messages quote clipped input; formatting them must not panic.
            let _ = e.to_string();
        }
    }
    // URL decoding never grows the text.
    assert!(url_decode(topic).len() <= topic.len());
});
