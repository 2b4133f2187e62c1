//! Telegraf's `layout = "field"` (one bare value per message, the host, measurement, tags
//! and field in the topic), read with `[telegraf] field_layout_topic`: the input is the
//! topic, a newline, then the payload.
#![no_main]

use darkwatch::ingest::assemble::{DecodeError, Sample};
use darkwatch::ingest::telegraf::TelegrafConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(at) = data.iter().position(|&b| b == b'\n') else {
        return;
    };
    let Ok(topic) = std::str::from_utf8(&data[..at]) else {
        return;
    };
    let payload = &data[at + 1..];
    let decoder = TelegrafConfig {
        field_layout_topic: r#"telegraf/{{ .Hostname }}/{{ .PluginName }}/{{ .Tag "cpu" }}/+"#
            .into(),
        name_tags: vec!["cpu".into()],
        ..TelegrafConfig::default()
    }
    .build();
    for receive_time in [1.7e9, f64::NAN] {
        let _ = decoder.decode(topic, payload, receive_time, &mut |r: Result<
            Sample<'_>,
            DecodeError,
        >| match r {
            Ok(s) => {
                assert!(s.value.is_finite(), "non-finite value {}", s.value);
                assert!(
                    s.timestamp.is_finite() && s.timestamp >= 0.0,
                    "bad timestamp {}",
                    s.timestamp
                );
                assert!(!s.stream.is_empty(), "empty stream");
                assert!(
                    s.metric.split('.').all(|p| !p.is_empty()),
                    "metric {:?} has an empty part",
                    s.metric
                );
            }
            Err(e) => {
                let _ = e.to_string();
            }
        });
    }
});
