//! Telegraf JSON messages (`data_format = "json"`), decoded with and without a receive
//! time.
#![no_main]

use darkwatch::ingest::assemble::{DecodeError, Sample};
use darkwatch::ingest::telegraf::{TelegrafConfig, TelegrafFormat};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let decoder = TelegrafConfig {
        format: TelegrafFormat::Json,
        ..TelegrafConfig::default()
    }
    .build();
    for receive_time in [1.7e9, f64::NAN] {
        let _ = decoder.decode("telegraf/n1/m", data, receive_time, &mut |r: Result<
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
                assert!(s.metric.contains('.'), "metric {:?} has no '.'", s.metric);
            }
            Err(e) => {
                let _ = e.to_string();
            }
        });
    }
});
