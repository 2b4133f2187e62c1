//! Raw frames: whole model frames, one or more per MQTT message, as `d` little-endian
//! `f32` each, with an optional header that carries the frames' time and the sender's id
//! for the first.
//!
//! Fed by the MQTT source (topic and payload); the frames go straight to the frame
//! ring ([`crate::ring`]) without the assembler, since they already hold every feature in
//! the model's order.
//!
//! # Payload
//!
//! Either bare frames, `n × d × 4` bytes, or the frames behind a 20-byte header
//! ([`HEADER_BYTES`]):
//!
//! ```text
//! "DWF1" | time: f64 LE | id: u64 LE | n × d × f32 LE
//! ```
//!
//! - `n`: 1 to [`MAX_FRAMES_PER_MESSAGE`] frames, consecutive frames of the stream in
//!   order (a prompt's `[seq, d]` activations, row-major, are its `seq` tokens). A length
//!   that is not a whole number of frames is refused (`wrong_length`), and so is a
//!   message of more frames (`too_large`). With a smaller `[pipeline]
//!   ring_capacity_frames`, the frames that do not fit are dropped and counted
//!   (`drop_newest`) exactly as `n` messages of one frame would be.
//! - `time`: the frames' event time in epoch seconds (milliseconds, microseconds or
//!   nanoseconds are told by size, as for ExaMon); 0 or NaN for none (the time of receipt
//!   stands in). Every frame of the message has it. It becomes the alert's `startsAt` and
//!   `endsAt`.
//! - `id`: the sender's number for the first frame (a token index, a counter); frame `i`
//!   of the message is `id + i`. At most 2^53 so that it stays exact in JSON. It becomes
//!   the frame's `seq` in alerts while it rises within its stream (see the agent).
//!
//! Values of another float type do not always show in the length: float16 (or bfloat16)
//! values of an even number of frames, or float64 ones of any, have a length of whole
//! float32 frames and are read as such, each float64 value as two float32 values. Float64
//! values widened from float32, float16 or bfloat16 (a model's activations, say) have the
//! low 29 bits of their mantissa zero, so their low words read as 0, ±1.1e-19, ±2 or
//! ±3.7e19, always finite: such a message is scored, with no error, as twice its frames,
//! all garbage. (Values computed in float64 have arbitrary low words, and most of their
//! frames are refused as `non_finite`.) Float16 ones are scored as garbage likewise.
//! Convert at the sender: `x.astype("<f4")`, `x.float()`.
//!
//! In Python, one frame: `b"DWF1" + struct.pack("<dQ", time.time(), i) +
//! x.astype("<f4").tobytes()`; a prompt's activations `acts` of shape `[seq, d]`, its
//! first token numbered `i`: `b"DWF1" + struct.pack("<dQ", time.time(), i) +
//! np.ascontiguousarray(acts, "<f4").tobytes()`.
//!
//! # Stream names
//!
//! A frame's stream is named by its topic: the topic levels that the wildcards (`+`, `#`)
//! of the first `[mqtt] subscribe` filter matching it stand for, joined with `/` (its
//! short name: `activations/#` names `activations/modelA/layer6` `modelA/layer6`; `act/+`
//! names `act/node1` `node1`). When the wildcards stand for nothing (a filter without
//! any, or only empty levels) or no filter matches, the whole topic names it. So the
//! topics of one filter that differ in its wildcard levels are distinct streams.
//!
//! Different topics never share a stream, with several filters too (a topic no filter
//! matches apart, which the broker does not deliver). Where short names could meet, the
//! whole topic names the stream instead:
//!
//! - Two filters whose short names could be the same for different topics both name
//!   their streams by the whole topic: with `subscribe = ["gpu0/+", "gpu1/+"]`,
//!   `gpu0/layer6` and `gpu1/layer6` (both `layer6` by short names) are the streams
//!   `gpu0/layer6` and `gpu1/layer6`. Told by the filters alone: for some name of as many
//!   levels as both filters' names can have (a filter with only `+` has names of as many
//!   levels as its `+`; one with `#` that many or more), the two filters put its levels,
//!   or their own levels, in different places of the topic. Filters that overlap only on
//!   the same topics (`a/+/+` and `a/#`) keep their short names, as does a third filter
//!   whose names cannot meet theirs. Logged (warn) at startup, naming both filters.
//! - A topic whose short name is itself a topic some filter matches is named by its whole
//!   topic, since that topic could have the name: with `["x/+", "y"]`, `x/y` is the stream
//!   `x/y` (topic `y` is `y`) and `x/z` is `z`; with `["activations/#"]`,
//!   `activations/activations` is `activations/activations` (the parent topic
//!   `activations` is `activations`). Checked per frame only for a filter whose short
//!   names can have as many levels as some filter's topics (`act/+` beside
//!   `gpu/+/layer/+` cannot: its names have one level, their topics two and four). Logged
//!   (info) at startup where other filters make it so.
//!
//! A filter with no level of its own (`+/+`, `#`) names its streams by the whole topic,
//! its short name. The names depend only on the topic and the filters, so a topic keeps
//! its stream across restarts and whatever order messages come in (a changed subscription
//! may rename streams). With `stream_from_topic = false` every frame is one stream.

use serde::{Deserialize, Serialize};

use super::assemble::DecodeError;

/// First bytes of a frame with a header.
pub const HEADER_MAGIC: [u8; 4] = *b"DWF1";
/// Bytes of the header: magic, time (f64), id (u64).
pub const HEADER_BYTES: usize = 20;
/// Most frames one message may carry: 4096, the default `[pipeline] ring_capacity_frames`
/// and a long prompt's tokens, so that one message cannot hold more than the default ring.
pub const MAX_FRAMES_PER_MESSAGE: usize = 4096;
/// Header ids from this one on are not taken: 2^53, past the integers JSON readers (a
/// double) hold exactly, counting the seqs that follow an id.
pub const MAX_FRAME_ID: u64 = 1 << 53;

/// How raw frames are read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// Name the stream by the topic (see the module docs); false: every frame is one
    /// stream, `default`. Default true.
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
    /// The running decoder for frames of `dim` values, with no subscription known: the
    /// whole topic names the stream.
    pub fn build(&self, dim: usize) -> RawDecoder {
        self.build_for(dim, &[])
    }

    /// The running decoder for frames of `dim` values arriving on the subscription
    /// `filters` (`[mqtt] subscribe`; `$share/<group>/` is taken off), which name streams.
    ///
    /// Decides here, once, how each filter names its streams (see the module docs), and
    /// logs a filter whose names that decision lengthens.
    pub fn build_for(&self, dim: usize, filters: &[String]) -> RawDecoder {
        let filters = name_rules(filters);
        RawDecoder {
            dim,
            stream_from_topic: self.stream_from_topic,
            filters,
            name: String::new(),
        }
    }
}

/// One subscribe filter as the decoder names streams by it.
#[derive(Debug, Clone)]
struct Filter {
    /// The filter, `$share/<group>/` taken off, split into levels.
    levels: Vec<String>,
    /// Its topics are named by the whole topic: it has no wildcard, or no level of its
    /// own (`+/+`, `#`: the short name is the topic), or its short names could equal
    /// another filter's for a different topic.
    whole: bool,
    /// A short name could be a topic some filter matches: such a topic's stream is
    /// named by its whole topic, checked per frame.
    check: bool,
}

/// A level of the topic that a filter's short name of `n` levels stands for: a level of
/// the filter's own, or the name's level `i`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Slot<'a> {
    Own(&'a str),
    Name(usize),
}

/// The filter `levels` (with wildcards) has short names of `n` levels: exactly as many as
/// its `+` without `#`; with `#`, as many as its `+` (the parent level, `#` standing for
/// no level) or more, and at least one.
fn names_have(levels: &[String], n: usize) -> bool {
    let plus = levels.iter().filter(|l| *l == "+").count();
    if levels.last().is_some_and(|l| l == "#") {
        n >= plus.max(1)
    } else {
        n == plus
    }
}

/// The filter `levels` matches topics of `n` levels: its own count without `#`; with `#`,
/// the levels before it (the parent) or more, and at least one.
fn topics_have(levels: &[String], n: usize) -> bool {
    match levels.iter().position(|l| l == "#") {
        Some(before) => n >= before.max(1),
        None => n == levels.len(),
    }
}

/// The topic that the filter `levels` names by a short name of `n` levels (which
/// [`names_have`]), slot by slot.
fn topic_of(levels: &[String], n: usize) -> Vec<Slot<'_>> {
    let mut slots = Vec::new();
    let mut i = 0;
    for level in levels {
        match level.as_str() {
            "+" => {
                slots.push(Slot::Name(i));
                i += 1;
            }
            "#" => {
                slots.extend((i..n).map(Slot::Name));
                i = n;
            }
            own => slots.push(Slot::Own(own)),
        }
    }
    slots
}

/// How each of `filters` names streams (see the module docs), logging each one whose
/// names are lengthened.
fn name_rules(filters: &[String]) -> Vec<Filter> {
    let mut rules: Vec<Filter> = filters
        .iter()
        .map(|f| {
            let levels: Vec<String> = crate::mqtt::shared_subscription(f)
                .map_or(f.as_str(), |(_, inner)| inner)
                .split('/')
                .map(str::to_string)
                .collect();
            let wild = |l: &String| l == "+" || l == "#";
            let whole = !levels.iter().any(wild) || levels.iter().all(wild);
            Filter {
                levels,
                whole,
                check: false,
            }
        })
        .collect();
    // Names (and topics) of more levels than this behave as those of this many: past
    // every filter's own levels, a `#` only adds a level to both.
    let most = rules.iter().map(|r| r.levels.len()).max().unwrap_or(0) + 1;
    // Two filters whose short names of one length stand for different topics (a level of
    // one's own where the other has a wildcard or another level of its own, the name's
    // levels in other places) give different topics the same name for some name: both
    // name by the whole topic. (Filters that overlap only on the same topics, `a/+/+`
    // and `a/#`, keep their short names.)
    let mut clash: Vec<Option<usize>> = vec![None; rules.len()];
    for i in 0..rules.len() {
        for j in i + 1..rules.len() {
            let (a, b) = (&rules[i], &rules[j]);
            if a.whole || b.whole {
                continue;
            }
            let differ = (1..=most).any(|n| {
                names_have(&a.levels, n)
                    && names_have(&b.levels, n)
                    && topic_of(&a.levels, n) != topic_of(&b.levels, n)
            });
            if differ {
                clash[i].get_or_insert(j);
                clash[j].get_or_insert(i);
            }
        }
    }
    for (i, other) in clash.iter().enumerate() {
        if let Some(j) = *other {
            rules[i].whole = true;
            tracing::warn!(
                filter = %filters[i],
                other = %filters[j],
                "Raw streams: this [mqtt] subscribe filter names its streams by the whole topic, not by the levels its wildcards stand for, since those could be the same for a topic of the other filter (subscribe = [\"gpu0/+\", \"gpu1/+\"] would name gpu0/layer6 and gpu1/layer6 both layer6: they are streams gpu0/layer6 and gpu1/layer6)."
            );
        }
    }
    // A short name that is itself a topic some filter matches could be that topic's name
    // (the whole topic, or the short name of a topic named in full): where a filter's
    // short names can have as many levels as another's topics, each frame's short name
    // is checked against the filters.
    for i in 0..rules.len() {
        if rules[i].whole {
            continue;
        }
        let by: Vec<usize> = (0..rules.len())
            .filter(|&j| {
                (1..=most)
                    .any(|n| names_have(&rules[i].levels, n) && topics_have(&rules[j].levels, n))
            })
            .collect();
        rules[i].check = !by.is_empty();
        let others: Vec<&str> = by
            .iter()
            .filter(|&&j| j != i)
            .map(|&j| filters[j].as_str())
            .collect();
        // Only a `#` filter with a level of its own is its own such filter
        // (`activations/activations`, named in full for the parent topic `activations`):
        // too usual to say at every start.
        if !others.is_empty() {
            tracing::info!(
                filter = %filters[i],
                others = ?others,
                "Raw streams: a topic of this [mqtt] subscribe filter whose short name (the levels its wildcards stand for) is itself a topic the other filters match is named by its whole topic (with subscribe = [\"x/+\", \"y\"], x/y is stream x/y since topic y is stream y; x/z is z)."
            );
        }
    }
    rules
}

/// One decoded message's stream, time, id and number of frames (the values are in the
/// caller's buffer, frame after frame).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RawFrame<'a> {
    /// The stream's name; `None` with `stream_from_topic = false`.
    pub stream: Option<&'a str>,
    /// The header's time in epoch seconds, every frame's; `None` without a header or with
    /// time 0 or NaN.
    pub time: Option<f64>,
    /// The header's id of the first frame (frame `i` is `id + i`); `None` without a header.
    pub id: Option<u64>,
    /// Frames in the message: 1 to [`MAX_FRAMES_PER_MESSAGE`].
    pub frames: usize,
}

/// Decodes raw `f32` frames.
#[derive(Debug, Clone)]
pub struct RawDecoder {
    dim: usize,
    stream_from_topic: bool,
    /// The subscription filters and how they name streams.
    filters: Vec<Filter>,
    /// The latest stream name that is not a slice of its topic.
    name: String,
}

impl RawDecoder {
    /// Frame dimension `d`.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Payload length a bare frame must have: `d × 4` bytes.
    pub fn frame_bytes(&self) -> usize {
        self.dim.saturating_mul(4)
    }

    /// Decodes a message's frames into `out` (cleared first; reuse it and nothing is
    /// allocated once it has held the largest message) and returns their stream (see the
    /// module docs), time, first id and count.
    ///
    /// # Errors
    /// `WrongLength` (one frame's expected byte count and the actual count, behind the
    /// header for a payload that starts with its magic) unless the payload is a whole
    /// number of frames of `d` values, at least one; `TooLarge` for more than
    /// [`MAX_FRAMES_PER_MESSAGE`] frames; `NonFinite` when a value is NaN or infinite (no
    /// frame of the message is then written); `TimestampInvalid` for a header time that
    /// is negative or infinite.
    pub fn decode<'a>(
        &'a mut self,
        topic: &'a str,
        payload: &[u8],
        out: &mut Vec<f32>,
    ) -> Result<RawFrame<'a>, DecodeError> {
        out.clear();
        let bare = self.frame_bytes();
        let has_magic = payload.starts_with(&HEADER_MAGIC);
        // A payload that starts with the magic is read as headed even when its length is
        // bare frames': a headed frame of d − 5 values would otherwise have its header
        // scored as values. (A bare frame whose first value has the magic's bytes, the
        // f32 2.88e-9, is refused as such.)
        let (header, values) = match payload.split_at_checked(HEADER_BYTES) {
            Some((header, values)) if has_magic => (Some(header), values),
            _ if !has_magic => (None, payload),
            _ => {
                return Err(DecodeError::WrongLength {
                    expected: bare,
                    got: payload.len(),
                });
            }
        };
        // The lengths of the frames themselves, behind their header if they have one, so
        // that the count of values the log names is the sender's.
        let whole = bare > 0 && !values.is_empty() && values.len().is_multiple_of(bare);
        if !whole {
            return Err(DecodeError::WrongLength {
                expected: bare,
                got: values.len(),
            });
        }
        let frames = values.len() / bare;
        if frames > MAX_FRAMES_PER_MESSAGE {
            return Err(DecodeError::TooLarge {
                len: payload.len(),
                max: (payload.len() - values.len())
                    .saturating_add(MAX_FRAMES_PER_MESSAGE.saturating_mul(bare)),
            });
        }
        let (time, id) = match header {
            None => (None, None),
            Some(h) => {
                let time = f64::from_le_bytes(h[4..12].try_into().unwrap_or_default());
                let id = u64::from_le_bytes(h[12..20].try_into().unwrap_or_default());
                let time = if time.is_nan() || time == 0.0 {
                    None
                } else if time.is_finite() && time > 0.0 {
                    Some(time / super::time::epoch_divisor(time))
                } else {
                    return Err(DecodeError::TimestampInvalid(format!("header time {time}")));
                };
                (time, Some(id))
            }
        };
        out.extend(
            values
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        if out.iter().any(|v| !v.is_finite()) {
            out.clear();
            return Err(DecodeError::NonFinite);
        }
        let stream = if self.stream_from_topic {
            Some(self.stream_of(topic))
        } else {
            None
        };
        Ok(RawFrame {
            stream,
            time,
            id,
            frames,
        })
    }

    /// The stream `topic` names (see the module docs): the whole topic where its filter
    /// names by it, where the wildcards stand for nothing, or where the short name is a
    /// topic the filters match (looked for only when the filter's `check` says it can
    /// be); else the short name, a slice of the topic when the levels its filter's
    /// wildcards stand for are adjacent (`a/+/+`, `a/#`), else those levels joined in
    /// `self.name` (`+/x/+`).
    fn stream_of<'a>(&'a mut self, topic: &'a str) -> &'a str {
        let Some(rule) = self.filters.iter().find(|f| matches(&f.levels, topic)) else {
            return topic;
        };
        if rule.whole {
            return topic;
        }
        let filter = &rule.levels;
        // The first wildcard level's start, the last one's end, and whether a level of the
        // filter's own lies between two wildcards.
        let mut span: Option<(usize, usize)> = None;
        let mut literal_after_wildcard = false;
        let mut apart = false;
        let mut start = 0;
        for (level, f) in topic.split('/').zip(filter) {
            let end = if f == "#" {
                topic.len()
            } else {
                start + level.len()
            };
            if f == "+" || f == "#" {
                apart |= literal_after_wildcard;
                span = Some(span.map_or((start, end), |(s, _)| (s, end)));
            } else if span.is_some() {
                literal_after_wildcard = true;
            }
            if f == "#" {
                break;
            }
            start = end + 1;
        }
        let Some((first, last)) = span else {
            return topic;
        };
        let name = if apart {
            self.name.clear();
            let mut start = 0;
            let mut first = true;
            for (level, f) in topic.split('/').zip(filter) {
                if f == "+" || f == "#" {
                    if !first {
                        self.name.push('/');
                    }
                    first = false;
                    self.name
                        .push_str(if f == "#" { &topic[start..] } else { level });
                }
                if f == "#" {
                    break;
                }
                start += level.len() + 1;
            }
            &self.name
        } else {
            &topic[first..last]
        };
        // Wildcards standing for nothing, or a short name that is a topic the filters
        // match (whose own name may be that topic): the whole topic.
        if name.split('/').all(str::is_empty)
            || (rule.check && self.filters.iter().any(|f| matches(&f.levels, name)))
        {
            topic
        } else {
            name
        }
    }
}

/// Whether the topic filter `filter` (split into levels) matches `topic`, as MQTT matches
/// them (`#` also matches its parent level; wildcards do not match a first level that
/// starts with `$`).
fn matches(filter: &[String], topic: &str) -> bool {
    let mut levels = topic.split('/');
    for (i, f) in filter.iter().enumerate() {
        if f == "#" {
            return !(i == 0 && topic.starts_with('$'));
        }
        let Some(level) = levels.next() else {
            return false;
        };
        match f.as_str() {
            "+" if i == 0 && level.starts_with('$') => return false,
            "+" => {}
            exact if exact == level => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::assemble::mutate;
    use crate::rng::Rng;

    fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn headed(time: f64, id: u64, v: &[f32]) -> Vec<u8> {
        let mut p = HEADER_MAGIC.to_vec();
        p.extend_from_slice(&time.to_le_bytes());
        p.extend_from_slice(&id.to_le_bytes());
        p.extend(bytes(v));
        p
    }

    fn on(filters: &[&str]) -> RawDecoder {
        let filters: Vec<String> = filters.iter().map(|f| f.to_string()).collect();
        RawConfig::default().build_for(3, &filters)
    }

    fn stream(d: &mut RawDecoder, topic: &str) -> Option<String> {
        let mut out = Vec::new();
        d.decode(topic, &bytes(&[0.0; 3]), &mut out)
            .unwrap()
            .stream
            .map(str::to_string)
    }

    #[test]
    fn decodes_little_endian_frame_and_stream() {
        let mut d = on(&["darkwatch/raw/+"]);
        let mut out = Vec::new();
        let f = d
            .decode("darkwatch/raw/n1", &bytes(&[1.5, -2.0, 1e-3]), &mut out)
            .unwrap();
        assert_eq!(f.stream, Some("n1"));
        assert_eq!((f.time, f.id), (None, None));
        assert_eq!(out, [1.5, -2.0, 1e-3]);
        // Exact byte order: 1.0f32 is 00 00 80 3f.
        d.decode(
            "n",
            &[0, 0, 0x80, 0x3f, 0, 0, 0, 0, 0, 0, 0, 0xc0],
            &mut out,
        )
        .unwrap();
        assert_eq!(out, [1.0, 0.0, -2.0]);
        let mut anon = RawConfig {
            stream_from_topic: false,
        }
        .build(1);
        assert_eq!(
            anon.decode("a/b", &bytes(&[0.0]), &mut out).unwrap().stream,
            None
        );
    }

    /// The trial: `activations/#` made `activations/modelA/layer6` and
    /// `activations/modelB/layer6` one stream, `layer6` (the last level), with one
    /// threshold and alert state, and `activations/` the stream `default`.
    #[test]
    fn distinct_topics_are_distinct_streams() {
        let mut d = on(&["activations/#"]);
        assert_eq!(
            stream(&mut d, "activations/modelA/layer6").unwrap(),
            "modelA/layer6"
        );
        assert_eq!(
            stream(&mut d, "activations/modelB/layer6").unwrap(),
            "modelB/layer6"
        );
        assert_eq!(stream(&mut d, "activations/layer6").unwrap(), "layer6");
        // Nothing left for the wildcard: the whole topic.
        assert_eq!(stream(&mut d, "activations/").unwrap(), "activations/");
        assert_eq!(stream(&mut d, "activations").unwrap(), "activations");

        // One `+` at the end names the stream by the last level, as before.
        let mut d = on(&["act/+", "$share/g/gpu/+/layer/+", "fixed/topic"]);
        assert_eq!(stream(&mut d, "act/node1").unwrap(), "node1");
        assert_eq!(stream(&mut d, "act/").unwrap(), "act/");
        // Wildcards apart: their levels joined.
        assert_eq!(stream(&mut d, "gpu/0/layer/6").unwrap(), "0/6");
        assert_eq!(stream(&mut d, "gpu/1/layer/6").unwrap(), "1/6");
        assert_eq!(stream(&mut d, "gpu//layer/6").unwrap(), "/6");
        assert_eq!(stream(&mut d, "gpu//layer/").unwrap(), "gpu//layer/");
        // A filter without wildcards, or a topic no filter matches: the whole topic.
        assert_eq!(stream(&mut d, "fixed/topic").unwrap(), "fixed/topic");
        assert_eq!(stream(&mut d, "other/x/y").unwrap(), "other/x/y");
        // The first matching filter decides.
        let mut d = on(&["a/+/+", "a/#"]);
        assert_eq!(stream(&mut d, "a/b/c").unwrap(), "b/c");
        assert_eq!(stream(&mut d, "a/b/c/d").unwrap(), "b/c/d");
        // No subscription known (`build`): the whole topic.
        let mut d = RawConfig::default().build(3);
        assert_eq!(stream(&mut d, "act/node1").unwrap(), "act/node1");
    }

    /// Filters that could give different topics one name (the levels their wildcards
    /// stand for) name their streams by the whole topic, both of them.
    #[test]
    fn filters_that_could_share_names_name_by_the_whole_topic() {
        // Were both `layer6`: one stream, one threshold, one alert state.
        let mut d = on(&["gpu0/+", "gpu1/+"]);
        assert_eq!(stream(&mut d, "gpu0/layer6").unwrap(), "gpu0/layer6");
        assert_eq!(stream(&mut d, "gpu1/layer6").unwrap(), "gpu1/layer6");
        assert!(d.filters.iter().all(|f| f.whole));
        // Were both `x`; `b/#` names more levels too.
        let mut d = on(&["a/+", "$share/g/b/#"]);
        assert_eq!(stream(&mut d, "a/x").unwrap(), "a/x");
        assert_eq!(stream(&mut d, "b/x").unwrap(), "b/x");
        assert_eq!(stream(&mut d, "b/x/y").unwrap(), "b/x/y");
        // The name's levels in other places: `a/b/z` and `a/z/b` were both `z`.
        let mut d = on(&["a/b/+", "a/+/b"]);
        assert_eq!(stream(&mut d, "a/b/z").unwrap(), "a/b/z");
        assert_eq!(stream(&mut d, "a/z/b").unwrap(), "a/z/b");
        // A third filter that names two levels keeps its short names, but not for a
        // name that is a topic the others match.
        let mut d = on(&["gpu0/+", "gpu1/+", "cpu/+/+"]);
        assert!(!d.filters[2].whole);
        assert_eq!(stream(&mut d, "cpu/0/1").unwrap(), "0/1");
        assert_eq!(stream(&mut d, "cpu/gpu0/x").unwrap(), "cpu/gpu0/x");
        assert_eq!(stream(&mut d, "gpu0/x").unwrap(), "gpu0/x");
    }

    /// A short name that is itself a topic the subscription matches is not used: that
    /// topic's stream has the name (its whole topic, or its own short name's topic).
    #[test]
    fn a_short_name_that_is_a_subscribed_topic_is_not_used() {
        // `x/y` was `y`, the stream of topic `y`.
        let mut d = on(&["x/+", "y"]);
        assert_eq!(stream(&mut d, "x/y").unwrap(), "x/y");
        assert_eq!(stream(&mut d, "y").unwrap(), "y");
        assert_eq!(stream(&mut d, "x/z").unwrap(), "z");
        assert!(!d.filters[0].whole && d.filters[0].check);
        // `gpu/fixed/layer/topic` was `fixed/topic`, and `gpu/act/layer/` was `act/`, the
        // whole topics of `fixed/topic` and of `act/` (the `+` standing for nothing).
        let mut d = on(&["act/+", "$share/g/gpu/+/layer/+", "fixed/topic"]);
        assert_eq!(
            stream(&mut d, "gpu/fixed/layer/topic").unwrap(),
            "gpu/fixed/layer/topic"
        );
        assert_eq!(stream(&mut d, "fixed/topic").unwrap(), "fixed/topic");
        assert_eq!(stream(&mut d, "gpu/act/layer/").unwrap(), "gpu/act/layer/");
        assert_eq!(stream(&mut d, "act/").unwrap(), "act/");
        assert_eq!(stream(&mut d, "gpu/0/layer/6").unwrap(), "0/6");
        // One `#` filter: `activations/activations` was `activations`, the parent topic's
        // stream; `activations/activations/` was `activations/`.
        let mut d = on(&["activations/#"]);
        assert_eq!(stream(&mut d, "activations").unwrap(), "activations");
        assert_eq!(
            stream(&mut d, "activations/activations").unwrap(),
            "activations/activations"
        );
        assert_eq!(
            stream(&mut d, "activations/activations/activations").unwrap(),
            "activations/activations/activations"
        );
        assert_eq!(stream(&mut d, "activations/").unwrap(), "activations/");
        assert_eq!(
            stream(&mut d, "activations/activations/").unwrap(),
            "activations/activations/"
        );
        assert_eq!(
            stream(&mut d, "activations/modelA/layer6").unwrap(),
            "modelA/layer6"
        );
    }

    /// Filters whose names cannot meet keep the short names, and skip the per-frame check
    /// where no topic has as many levels as their names.
    #[test]
    fn filters_that_cannot_share_names_keep_short_names() {
        // Overlapping on the same topics only: the first decides, as before.
        let mut d = on(&["a/+/+", "a/#"]);
        assert!(d.filters.iter().all(|f| !f.whole));
        assert_eq!(stream(&mut d, "a/b/c").unwrap(), "b/c");
        assert_eq!(stream(&mut d, "a/b").unwrap(), "b");
        assert_eq!(stream(&mut d, "a/b/c/d").unwrap(), "b/c/d");
        // The same filter twice, once shared.
        let mut d = on(&["$share/g/act/+", "act/+"]);
        assert!(d.filters.iter().all(|f| !f.whole && !f.check));
        assert_eq!(stream(&mut d, "act/n1").unwrap(), "n1");
        // Names of one level and of two, topics of three and four.
        let mut d = on(&["darkwatch/raw/+", "darkwatch/sae/+/+"]);
        assert!(d.filters.iter().all(|f| !f.whole && !f.check));
        assert_eq!(stream(&mut d, "darkwatch/raw/n1").unwrap(), "n1");
        assert_eq!(stream(&mut d, "darkwatch/sae/m/l6").unwrap(), "m/l6");
        // The test above's mix: `act/+` names one level, which no topic has.
        let d = on(&["act/+", "$share/g/gpu/+/layer/+", "fixed/topic"]);
        assert!(!d.filters[0].whole && !d.filters[0].check);
        assert!(!d.filters[1].whole && d.filters[1].check);
        assert!(d.filters[2].whole);
        // No wildcard, or no level of its own (the short name is the topic).
        let d = on(&["a/b", "+/+", "#"]);
        assert!(d.filters.iter().all(|f| f.whole));
    }

    /// Every topic of up to a level more than the longest filter, over the filters' own
    /// levels and a few more, that some filter matches: no two share a stream, and the
    /// names do not depend on the order the topics come in.
    #[test]
    fn no_two_topics_share_a_stream() {
        let sets: &[&[&str]] = &[
            &["gpu0/+", "gpu1/+"],
            &["x/+", "y"],
            &["a/+", "b/#"],
            &["activations/#"],
            &["act/+", "$share/g/gpu/+/layer/+", "fixed/topic"],
            &["a/+/+", "a/#"],
            &["a/b/+", "a/+/b"],
            &["+/a", "a/+"],
            &["+/x/+", "x/#"],
            &["a/+/#", "+/a"],
            &["a/+", "#"],
            &["a/#", "a/+/b", "b"],
            &["$share/g/a/+", "a/+", "a"],
            &["+/+/x", "x/+", "x/x"],
            &["$s/+", "+/b"],
        ];
        for filters in sets {
            let mut alphabet: Vec<String> = vec!["".into(), "z".into(), "$s".into()];
            for f in filters.iter() {
                let inner = crate::mqtt::shared_subscription(f).map_or(*f, |(_, i)| i);
                for level in inner.split('/') {
                    if level != "+" && level != "#" && !alphabet.iter().any(|a| a == level) {
                        alphabet.push(level.to_string());
                    }
                }
            }
            let d = on(filters);
            let most = d.filters.iter().map(|f| f.levels.len()).max().unwrap() + 1;
            let mut topics: Vec<String> = Vec::new();
            let mut layer: Vec<String> = alphabet.clone();
            for _ in 0..most {
                topics.extend(layer.iter().cloned());
                layer = layer
                    .iter()
                    .flat_map(|t| alphabet.iter().map(move |l| format!("{t}/{l}")))
                    .collect();
            }
            topics.retain(|t| !t.is_empty() && d.filters.iter().any(|f| matches(&f.levels, t)));
            let mut forward = on(filters);
            let names: Vec<String> = topics
                .iter()
                .map(|t| stream(&mut forward, t).unwrap())
                .collect();
            let mut seen = std::collections::HashMap::new();
            for (t, n) in topics.iter().zip(&names) {
                if let Some(other) = seen.insert(n.clone(), t.clone()) {
                    panic!("{filters:?}: topics {other:?} and {t:?} are both stream {n:?}");
                }
            }
            let mut backward = on(filters);
            for (t, n) in topics.iter().zip(&names).rev() {
                assert_eq!(&stream(&mut backward, t).unwrap(), n, "{filters:?}: {t:?}");
            }
        }
    }

    #[test]
    fn filters_match_as_mqtt_does() {
        let f = |s: &str| s.split('/').map(str::to_string).collect::<Vec<_>>();
        assert!(matches(&f("a/#"), "a"));
        assert!(matches(&f("a/#"), "a/b/c"));
        assert!(matches(&f("#"), "a/b"));
        assert!(!matches(&f("#"), "$SYS/x"));
        assert!(!matches(&f("+/x"), "$SYS/x"));
        assert!(matches(&f("a/+"), "a/"));
        assert!(!matches(&f("a/+"), "a"));
        assert!(!matches(&f("a/+"), "a/b/c"));
        assert!(!matches(&f("a/b"), "a/c"));
        assert!(matches(&f("a/b"), "a/b"));
    }

    /// A header carries the frame's time (in seconds, or milliseconds… told by size) and
    /// the sender's id; a bare frame neither.
    #[test]
    fn a_header_carries_time_and_id() {
        let mut d = on(&["act/+"]);
        let mut out = Vec::new();
        let f = d
            .decode(
                "act/a",
                &headed(1_700_000_000.25, 42, &[1.0, 2.0, 3.0]),
                &mut out,
            )
            .unwrap();
        assert_eq!(
            (f.stream, f.time, f.id),
            (Some("a"), Some(1_700_000_000.25), Some(42))
        );
        assert_eq!(out, [1.0, 2.0, 3.0]);
        let f = d
            .decode(
                "act/a",
                &headed(1_700_000_000_500.0, 0, &[1.0; 3]),
                &mut out,
            )
            .unwrap();
        assert_eq!((f.time, f.id), (Some(1_700_000_000.5), Some(0)));
        for none in [0.0, f64::NAN] {
            let f = d
                .decode("act/a", &headed(none, 7, &[1.0; 3]), &mut out)
                .unwrap();
            assert_eq!((f.time, f.id), (None, Some(7)));
        }
        for bad in [-1.0, f64::INFINITY] {
            let e = d
                .decode("act/a", &headed(bad, 7, &[1.0; 3]), &mut out)
                .unwrap_err();
            assert_eq!(e.reason(), "timestamp_invalid");
            assert!(out.is_empty());
        }
        // A header with a frame of the wrong width: the frame's lengths, behind the header.
        let e = d
            .decode("act/a", &headed(1.0, 7, &[1.0; 4]), &mut out)
            .unwrap_err();
        assert_eq!(
            e,
            DecodeError::WrongLength {
                expected: 12,
                got: 16
            }
        );
        // A headed frame as long as a bare one: with d = 8 (32 bytes) a header (20) and 3
        // values (12) make 32 bytes too. Refused, not scored with its header as values.
        let mut d8 = RawConfig::default().build_for(8, &["act/+".to_string()]);
        let e = d8
            .decode("act/a", &headed(1.0, 7, &[1.0; 3]), &mut out)
            .unwrap_err();
        assert_eq!(
            e,
            DecodeError::WrongLength {
                expected: 32,
                got: 12
            }
        );
        assert!(out.is_empty());
    }

    /// A message of n × d values is n frames of the stream, in order; behind a header they
    /// share its time, and its id numbers the first. Lengths that are not a whole number
    /// of frames are refused with one frame's length, and so are more than
    /// MAX_FRAMES_PER_MESSAGE frames (too_large); MAX_FRAMES_PER_MESSAGE themselves pass.
    #[test]
    fn a_message_of_several_frames_is_decoded_in_order() {
        let mut d = on(&["act/+"]);
        let mut out = Vec::new();
        let rows: Vec<f32> = (0..12).map(|v| v as f32 * 0.5).collect();
        // Bare: four frames of three values.
        let f = d.decode("act/a", &bytes(&rows), &mut out).unwrap();
        assert_eq!(
            (f.stream, f.time, f.id, f.frames),
            (Some("a"), None, None, 4)
        );
        assert_eq!(out, rows);
        // Headed: the same, with the header's time and first id.
        let f = d
            .decode("act/a", &headed(1_700_000_000.5, 40, &rows), &mut out)
            .unwrap();
        assert_eq!(
            (f.time, f.id, f.frames),
            (Some(1_700_000_000.5), Some(40), 4)
        );
        assert_eq!(out, rows);
        // Headed with no time: still several frames, the receipt stands in.
        let f = d
            .decode("act/a", &headed(0.0, 7, &rows[..6]), &mut out)
            .unwrap();
        assert_eq!((f.time, f.id, f.frames), (None, Some(7), 2));
        assert_eq!(out, rows[..6]);
        // Not a whole number of frames, bare and headed, or no frame at all: one frame's
        // length, and the sender's.
        for (payload, got) in [
            (bytes(&rows[..7]), 28),
            (bytes(&rows[..2]), 8),
            (headed(1.0, 7, &rows[..10]), 40),
            (headed(1.0, 7, &[]), 0),
            (Vec::new(), 0),
            (HEADER_MAGIC.to_vec(), 4),
        ] {
            let e = d.decode("act/a", &payload, &mut out).unwrap_err();
            assert_eq!(
                e,
                DecodeError::WrongLength { expected: 12, got },
                "{payload:?}"
            );
            assert!(out.is_empty());
        }
        // A non-finite value in any frame refuses the whole message.
        let mut bad = rows.clone();
        bad[10] = f32::NAN;
        let e = d.decode("act/a", &bytes(&bad), &mut out).unwrap_err();
        assert_eq!(e.reason(), "non_finite");
        assert!(out.is_empty());
        // The bound: MAX_FRAMES_PER_MESSAGE frames pass, one more is too large.
        let mut d1 = RawConfig::default().build(1);
        let most = vec![1.0f32; MAX_FRAMES_PER_MESSAGE];
        let f = d1.decode("t", &bytes(&most), &mut out).unwrap();
        assert_eq!(
            (f.frames, out.len()),
            (MAX_FRAMES_PER_MESSAGE, MAX_FRAMES_PER_MESSAGE)
        );
        let over = vec![1.0f32; MAX_FRAMES_PER_MESSAGE + 1];
        let e = d1.decode("t", &bytes(&over), &mut out).unwrap_err();
        assert_eq!(
            e,
            DecodeError::TooLarge {
                len: 4 * (MAX_FRAMES_PER_MESSAGE + 1),
                max: 4 * MAX_FRAMES_PER_MESSAGE
            }
        );
        assert!(out.is_empty());
        let e = d1
            .decode("t", &headed(1.0, 0, &over), &mut out)
            .unwrap_err();
        assert_eq!(
            e,
            DecodeError::TooLarge {
                len: HEADER_BYTES + 4 * (MAX_FRAMES_PER_MESSAGE + 1),
                max: HEADER_BYTES + 4 * MAX_FRAMES_PER_MESSAGE
            }
        );
    }

    #[test]
    fn every_error_reason() {
        let mut d = RawConfig::default().build(2);
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
        let valid_headed = headed(1.7e9, 3, &[1.0, 2.0, 3.0, 4.0]);
        let filters: Vec<String> = ["a/+/é", "+/#", "$share/g/+/+"]
            .iter()
            .map(|f| f.to_string())
            .collect();
        let mut d = RawConfig::default().build_for(4, &filters);
        let mut out = Vec::new();
        for _ in 0..20_000 {
            let payload: Vec<u8> = match rng.below(3) {
                0 => (0..rng.below(40)).map(|_| rng.next_u64() as u8).collect(),
                1 => mutate(&mut rng, &valid),
                _ => mutate(&mut rng, &valid_headed),
            };
            let topic: String = (0..rng.below(10))
                .map(|_| ['/', 'a', 'é', '+', '$'][rng.below(5)])
                .collect();
            if let Ok(f) = d.decode(&topic, &payload, &mut out) {
                assert_eq!(out.len(), 4 * f.frames);
                assert!(f.frames >= 1);
                assert!(out.iter().all(|v| v.is_finite()));
                // Only an empty topic (which MQTT does not allow) names an empty stream.
                assert!(f.stream.is_some_and(|s| !s.is_empty() || topic.is_empty()));
            }
        }
        let mut huge = RawConfig::default().build(usize::MAX);
        assert_eq!(
            huge.decode("t", &[0; 4], &mut out).unwrap_err().reason(),
            "wrong_length"
        );
    }
}
