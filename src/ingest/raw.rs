//! Raw frames: one whole model frame per MQTT message, as `d` little-endian `f32`.
//!
//! Fed by the MQTT source (topic and payload); the frame goes straight to the frame
//! ring ([`crate::ring`]) without the assembler, since it already holds every feature in
//! the model's order. The stream id may be the topic's last segment (e.g.
//! `darkwatch/raw/<node>`).

use serde::{Deserialize, Serialize};

use super::assemble::DecodeError;

/// How raw frames are read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// Take the stream id from the topic's last segment. Default true.
    pub stream_from_topic: bool,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            stream_from_topic: true,
        }
    }
}

impl RawConfig {
    /// The running decoder for frames of `dim` values.
    pub fn build(&self, dim: usize) -> RawDecoder {
        RawDecoder {
            dim,
            stream_from_topic: self.stream_from_topic,
        }
    }
}

/// Decodes raw `f32` frames.
#[derive(Debug, Clone)]
pub struct RawDecoder {
    dim: usize,
    stream_from_topic: bool,
}

impl RawDecoder {
    /// Frame dimension `d`.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Payload length a frame must have: `d × 4` bytes.
    pub fn frame_bytes(&self) -> usize {
        self.dim.saturating_mul(4)
    }

    /// Decodes one frame into `out` (cleared first; reuse it and nothing is allocated)
    /// and returns the stream id: the topic's last segment when configured and non-empty.
    ///
    /// # Errors
    /// `WrongLength` (with the expected and actual byte counts) unless the payload is
    /// exactly `d × 4` bytes; `NonFinite` when a value is NaN or infinite (the frame is
    /// then not written).
    pub fn decode<'t>(
        &self,
        topic: &'t str,
        payload: &[u8],
        out: &mut Vec<f32>,
    ) -> Result<Option<&'t str>, DecodeError> {
        out.clear();
        let expected = self.frame_bytes();
        if payload.len() != expected {
            return Err(DecodeError::WrongLength {
                expected,
                got: payload.len(),
            });
        }
        out.extend(
            payload
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        if out.iter().any(|v| !v.is_finite()) {
            out.clear();
            return Err(DecodeError::NonFinite);
        }
        let stream = if self.stream_from_topic {
            topic.rsplit('/').next().filter(|s| !s.is_empty())
        } else {
            None
        };
        Ok(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::assemble::mutate;
    use crate::rng::Rng;

    fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn decodes_little_endian_frame_and_stream() {
        let d = RawConfig::default().build(3);
        let mut out = Vec::new();
        let stream = d
            .decode("darkwatch/raw/n1", &bytes(&[1.5, -2.0, 1e-3]), &mut out)
            .unwrap();
        assert_eq!(stream, Some("n1"));
        assert_eq!(out, [1.5, -2.0, 1e-3]);
        // Exact byte order: 1.0f32 is 00 00 80 3f.
        d.decode(
            "n",
            &[0, 0, 0x80, 0x3f, 0, 0, 0, 0, 0, 0, 0, 0xc0],
            &mut out,
        )
        .unwrap();
        assert_eq!(out, [1.0, 0.0, -2.0]);
        assert_eq!(d.decode("a/", &bytes(&[0.0; 3]), &mut out).unwrap(), None);
        let anon = RawConfig {
            stream_from_topic: false,
        }
        .build(1);
        assert_eq!(anon.decode("a/b", &bytes(&[0.0]), &mut out).unwrap(), None);
    }

    #[test]
    fn every_error_reason() {
        let d = RawConfig::default().build(2);
        let mut out = vec![9.0];
        let e = d.decode("t", &[0; 7], &mut out).unwrap_err();
        assert_eq!(
            e,
            DecodeError::WrongLength {
                expected: 8,
                got: 7
            }
        );
        assert_eq!(e.reason(), "wrong_length");
        assert_eq!(e.to_string(), "frame is 7 bytes; expected 8");
        assert!(out.is_empty());
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let e = d.decode("t", &bytes(&[1.0, bad]), &mut out).unwrap_err();
            assert_eq!(e.reason(), "non_finite");
            assert!(out.is_empty());
        }
    }

    #[test]
    fn fuzzed_payloads_never_panic() {
        let mut rng = Rng::new(0x4A3);
        let valid = bytes(&[1.0, 2.0, 3.0, 4.0]);
        let d = RawConfig::default().build(4);
        let mut out = Vec::new();
        for _ in 0..20_000 {
            let payload: Vec<u8> = if rng.below(2) == 0 {
                (0..rng.below(40)).map(|_| rng.next_u64() as u8).collect()
            } else {
                mutate(&mut rng, &valid)
            };
            let topic: String = (0..rng.below(10))
                .map(|_| ['/', 'a', 'é'][rng.below(3)])
                .collect();
            if d.decode(&topic, &payload, &mut out).is_ok() {
                assert_eq!(out.len(), 4);
                assert!(out.iter().all(|v| v.is_finite()));
            }
        }
        let huge = RawConfig::default().build(usize::MAX);
        assert_eq!(
            huge.decode("t", &[0; 4], &mut out).unwrap_err().reason(),
            "wrong_length"
        );
    }
}
