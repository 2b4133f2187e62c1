//! The frame assembler: an arbitrary configuration and an arbitrary sequence of samples
//! (built directly, or decoded from ExaMon payloads and Telegraf lines; with or without
//! receipt times, which may be anything: huge, negative, non-finite), polls by the
//! caller's clock and by the streams' own clocks, and a final flush. Checks the frame
//! invariants the ring and the scorer rely on.
#![no_main]

use std::borrow::Cow;
use std::collections::HashMap;

use darkwatch::ingest::assemble::{
    Aggregation, Assembler, AssemblerConfig, DecodeError, FrameOut, MAX_LATENESS_WINDOWS, Receipt,
    Sample,
};
use darkwatch::ingest::examon::ExamonConfig;
use darkwatch::ingest::telegraf::{Precision, TelegrafConfig, TelegrafFormat};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

const FEATURES: [&str; 3] = ["cpu.load", "mem.used", "m"];
const STREAMS: [&str; 4] = ["n1", "n2", "n3", ""];

#[derive(Debug, Arbitrary)]
struct Input {
    window: u8,
    /// The aggregation (mod 3); from 128 on, also `close_when_complete`.
    aggregation: u8,
    stale: Option<u8>,
    max_streams: u8,
    lateness: u8,
    ops: Vec<Op>,
}

#[derive(Debug, Arbitrary)]
enum Op {
    /// A sample built directly: stream and metric by index (metric 3 is unknown).
    Push {
        stream: u8,
        metric: u8,
        value: Value,
        /// Offset from the base time, in quarter seconds.
        offset: i16,
    },
    /// A sample with an arbitrary timestamp (huge, negative, non-finite).
    PushAt {
        stream: u8,
        metric: u8,
        value: f64,
        timestamp: f64,
    },
    /// A sample with its receipt on the wall and the monotonic clock
    /// (`Assembler::push_received`).
    PushReceived {
        stream: u8,
        metric: u8,
        value: Value,
        timestamp: Time,
        wall: Time,
        mono: Time,
    },
    /// An ExaMon payload for node `stream`, metric `m`.
    Examon { stream: u8, payload: String },
    /// An ExaMon payload with its receipt, as the agent feeds one.
    ExamonReceived {
        stream: u8,
        payload: String,
        wall: Time,
        mono: Time,
    },
    /// A Telegraf line-protocol message (seconds precision).
    Telegraf(String),
    /// Poll at base time + offset (quarter seconds), or with NaN.
    Poll(Option<i16>),
    /// Close quiet windows by the streams' own clocks at this monotonic time
    /// (`Assembler::poll_streams`), as the agent does between messages.
    PollStreams(Time),
}

/// A time near its clock's base (an offset in quarter seconds), or any value at all.
#[derive(Debug, Arbitrary)]
enum Time {
    Near(i16),
    Any(f64),
}

impl Time {
    fn on(&self, base: f64) -> f64 {
        match *self {
            Time::Near(offset) => base + f64::from(offset) / 4.0,
            Time::Any(t) => t,
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Value {
    Small(i8),
    Any(f64),
}

/// Base of sample timestamps and wall receipt times (epoch seconds).
const BASE: f64 = 1_700_000_000.0;
/// Base of monotonic receipt and poll times (seconds since the agent started, say).
const MONO: f64 = 1_000.0;

fn receipt(wall: &Time, mono: &Time) -> Receipt {
    Receipt {
        wall: wall.on(BASE),
        mono: mono.on(MONO),
    }
}

struct Checker {
    d: usize,
    names: HashMap<u32, String>,
    next_seq: HashMap<u32, u64>,
    last_end: HashMap<u32, f64>,
    frames: u64,
}

impl Checker {
    fn frame(&mut self, f: FrameOut<'_>) {
        assert_eq!(f.values.len(), self.d, "frame has the wrong dimension");
        let has_nan = f.values.iter().any(|v| v.is_nan());
        assert_eq!(
            f.incomplete, has_nan,
            "incomplete flag disagrees with NaN slots"
        );
        assert!(
            f.values.iter().all(|v| v.is_nan() || v.is_finite()),
            "infinite value in frame {:?}",
            f.values
        );
        let name = self
            .names
            .entry(f.stream_index)
            .or_insert_with(|| f.stream.to_owned());
        assert_eq!(name, f.stream, "stream index maps to two names");
        assert!(
            f.received_mono.is_none_or(f64::is_finite),
            "receipt time {:?} handed out",
            f.received_mono
        );
        let seq = self.next_seq.entry(f.stream_index).or_insert(0);
        assert_eq!(f.seq, *seq, "sequence gap in stream {}", f.stream);
        *seq += 1;
        if let Some(&prev) = self.last_end.get(&f.stream_index) {
            assert!(
                f.window_end >= prev,
                "window end went back: {prev} then {}",
                f.window_end
            );
        }
        self.last_end.insert(f.stream_index, f.window_end);
        self.frames += 1;
    }
}

fn sample<'a>(stream: u8, metric: u8, value: f64, timestamp: f64) -> Sample<'a> {
    let metric = match metric % 4 {
        3 => "unknown",
        m => FEATURES[usize::from(m)],
    };
    Sample {
        stream: Cow::Borrowed(STREAMS[usize::from(stream % 4)]),
        metric: Cow::Borrowed(metric),
        value,
        timestamp,
    }
}

fuzz_target!(|input: Input| {
    let cfg = AssemblerConfig {
        window_secs: [0.25, 1.0, 10.0, 1e-9][usize::from(input.window % 4)],
        aggregation: match input.aggregation % 3 {
            0 => Aggregation::Mean,
            1 => Aggregation::Max,
            _ => Aggregation::Last,
        },
        stale_secs: input.stale.map(|s| f64::from(s) / 4.0),
        max_streams: usize::from(input.max_streams % 4) + 1,
        lateness_windows: u32::from(input.lateness) % (MAX_LATENESS_WINDOWS + 1),
        close_when_complete: input.aggregation >= 128,
        // 0: streams are never forgotten, as before the setting existed.
        forget_after_secs: 0.0,
    };
    let features: Vec<String> = FEATURES.iter().map(|s| s.to_string()).collect();
    let mut asm = Assembler::new(cfg.clone(), features).expect("valid configuration");
    let examon = ExamonConfig::default().build();
    let telegraf = TelegrafConfig {
        format: TelegrafFormat::Influx,
        line_precision: Precision::Seconds,
        ..TelegrafConfig::default()
    }
    .build();
    let mut check = Checker {
        d: asm.dim(),
        names: HashMap::new(),
        next_seq: HashMap::new(),
        last_end: HashMap::new(),
        frames: 0,
    };
    let mut pushed = 0u64;
    for op in input.ops.iter().take(512) {
        match op {
            Op::Push {
                stream,
                metric,
                value,
                offset,
            } => {
                let value = match *value {
                    Value::Small(v) => f64::from(v),
                    Value::Any(v) => v,
                };
                let t = BASE + f64::from(*offset) / 4.0;
                let _ = asm.push(&sample(*stream, *metric, value, t));
                pushed += 1;
            }
            Op::PushAt {
                stream,
                metric,
                value,
                timestamp,
            } => {
                let _ = asm.push(&sample(*stream, *metric, *value, *timestamp));
                pushed += 1;
            }
            Op::PushReceived {
                stream,
                metric,
                value,
                timestamp,
                wall,
                mono,
            } => {
                let value = match *value {
                    Value::Small(v) => f64::from(v),
                    Value::Any(v) => v,
                };
                let s = sample(*stream, *metric, value, timestamp.on(BASE));
                let _ = asm.push_received(&s, receipt(wall, mono));
                pushed += 1;
            }
            Op::Examon { stream, payload }
            | Op::ExamonReceived {
                stream, payload, ..
            } => {
                let topic = format!(
                    "org/o/cluster/c/node/{}/plugin/p/chnl/data/m",
                    STREAMS[usize::from(stream % 4)]
                );
                if let Ok(s) = examon.decode(&topic, payload.as_bytes()) {
                    let _ = match op {
                        Op::ExamonReceived { wall, mono, .. } => {
                            asm.push_received(&s, receipt(wall, mono))
                        }
                        _ => asm.push(&s),
                    };
                    pushed += 1;
                }
            }
            Op::Telegraf(line) => {
                let _ = telegraf.decode("telegraf/n1", line.as_bytes(), BASE, &mut |r: Result<
                    Sample<'_>,
                    DecodeError,
                >| {
                    if let Ok(s) = r {
                        let _ = asm.push(&s);
                        pushed += 1;
                    }
                });
            }
            Op::Poll(at) => {
                let now = at.map_or(f64::NAN, |o| BASE + f64::from(o) / 4.0);
                asm.poll(now, &mut |f| check.frame(f));
            }
            Op::PollStreams(at) => asm.poll_streams(at.on(MONO), &mut |f| check.frame(f)),
        }
        assert!(asm.stream_count() <= cfg.max_streams, "too many streams");
    }
    asm.flush(&mut |f| check.frame(f));
    assert_eq!(asm.pending_frames(), 0, "frames left after flush");
    let c = *asm.counters();
    assert_eq!(c.samples_in, pushed, "samples_in miscounted");
    assert_eq!(
        c.frames_complete + c.frames_incomplete,
        check.frames,
        "frame counters disagree with the frames handed out"
    );
    assert!(
        c.unknown_metric + c.late_dropped + c.streams_rejected + c.non_finite + c.future <= pushed
    );
});
