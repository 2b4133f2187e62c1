//! Telegraf Influx line protocol (`data_format = "influx"`), in every timestamp precision.
#![no_main]

use darkwatch::ingest::assemble::{DecodeError, Sample};
use darkwatch::ingest::telegraf::{BARE_VALUE, Precision, TelegrafConfig, TelegrafFormat};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the precision, so that the fuzzer reaches every unit.
    let Some((&pick, payload)) = data.split_first() else {
        return;
    };
    let line_precision = match pick % 4 {
        0 => Precision::Nanos,
        1 => Precision::Micros,
        2 => Precision::Millis,
        _ => Precision::Seconds,
    };
    let decoder = TelegrafConfig {
        format: TelegrafFormat::Influx,
        line_precision,
        ..TelegrafConfig::default()
    }
    .build();
    let receive_time = if pick & 4 == 0 { 1.7e9 } else { f64::NAN };
    let result = decoder.decode("telegraf/n1/m", payload, receive_time, &mut |r: Result<
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
    // Line protocol only fails as a whole for size or encoding, or as one bare value
    // (Telegraf's layout = "field", not read without [telegraf] field_layout_topic).
    if let Err(e) = result {
        assert!(
            matches!(e, DecodeError::NotUtf8 | DecodeError::TooLarge { .. })
                || e == DecodeError::BadPayload(BARE_VALUE),
            "{e}"
        );
    }
});
