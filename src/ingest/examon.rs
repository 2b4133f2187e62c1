//! ExaMon MQTT messages: one metric value per message, its tags in the topic.
//!
//! Fed by the MQTT source (topic and payload of each message on `org/#`); feeds the
//! [`super::assemble::Assembler`] one [`Sample`] per message.
//!
//! Topic: `org/<o>/cluster/<c>/node/<n>/plugin/<p>/chnl/data[/<k>/<v>…]/<metric>`, read
//! as key/value pairs then the metric as the last segment. The pairs must be complete
//! and include `chnl/data`; the stream id is the value of a configurable key (default
//! `node`), or the values of several keys joined by `/` in the order configured
//! (`["cluster", "node"]`: `c1/n7`, for clusters whose node names repeat). With `metric_levels = N` above 1, the metric name keeps up to `N - 1` levels
//! before the last, from those after `chnl/data` (never the stream's pair), joined by `/`
//! as in the topic: `…/chnl/data/core/3/cpu_load` is `core/3/cpu_load` with 3, so that
//! per-core (per-GPU, per-device) metrics are features of their own. Values and the metric may be URL-encoded (`%2F`, `%23`, `%2B`, `%20`, `%25`);
//! other `%` sequences are kept as they are.
//!
//! Payload: the legacy `"<value>;<epoch seconds>"` (split on the last `;`, since string
//! values may hold others), or the newer JSON `{"v": <number>, "ts": <number>}`. In both,
//! a timestamp of 1e11 or more is taken as milliseconds (1e11 s is the year 5138), from
//! 1e14 as microseconds and from 1e17 as nanoseconds, as in a CSV's timestamp column.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::assemble::{DecodeError, FNV_START, Origin, Sample, clip, fnv1a, parse_value};

/// How ExaMon messages are read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExamonConfig {
    /// Topic keys whose values, joined by `/` in this order, are the stream id. Default
    /// `["node"]`; `["cluster", "node"]` keeps same-named nodes of two clusters apart. A
    /// single string is one key; from the environment, comma-separated.
    #[serde(deserialize_with = "crate::config::strings")]
    pub stream_key: Vec<String>,
    /// Largest payload accepted, in bytes. Default 4096.
    pub max_payload_bytes: usize,
    /// Topic levels kept in the metric name, counting the last: 1 (default) is the last
    /// level only (`cpu_load`); 3 keeps the key/value pair before it too
    /// (`core/3/cpu_load`), 5 two pairs (`cpu/0/core/3/cpu_load`). Only levels after
    /// `chnl/data` count, and the stream key's pair is skipped, so a metric with fewer
    /// levels keeps a shorter name. Use an odd number, so that whole pairs are kept.
    /// 0 reads as 1.
    pub metric_levels: usize,
}

impl Default for ExamonConfig {
    fn default() -> Self {
        ExamonConfig {
            stream_key: vec!["node".to_owned()],
            max_payload_bytes: 4096,
            metric_levels: 1,
        }
    }
}

/// Most topic keys in `[examon] stream_key`.
pub const MAX_STREAM_KEYS: usize = 4;

impl ExamonConfig {
    /// Semantic checks the types cannot express. Returns the key and the reason.
    ///
    /// # Errors
    /// `stream_key` empty, with more than [`MAX_STREAM_KEYS`] keys, an empty or repeated
    /// key, a key with `/`, or `chnl` (it marks the data channel).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let keys = &self.stream_key;
        if keys.is_empty() || keys.len() > MAX_STREAM_KEYS {
            return Err((
                "stream_key",
                format!(
                    "needs 1 to {MAX_STREAM_KEYS} topic keys (\"node\", or [\"cluster\", \"node\"]), got {}",
                    keys.len()
                ),
            ));
        }
        for (i, key) in keys.iter().enumerate() {
            if key.is_empty() || key.contains('/') || key == "chnl" {
                return Err((
                    "stream_key",
                    format!(
                        "{key:?} is not a topic key that names a stream (a key is one level, not chnl)"
                    ),
                ));
            }
            if keys[..i].contains(key) {
                return Err(("stream_key", format!("names {key:?} twice")));
            }
            // Each key is a label of the stream's `anomaly_score`: two labels of one name
            // would break the scrape.
            if let Some(other) = keys[..i].iter().find(|k| label_name(k) == label_name(key)) {
                return Err((
                    "stream_key",
                    format!(
                        "{other:?} and {key:?} are both the label {:?} of anomaly_score on /metrics; rename one at the publisher, or leave one out",
                        label_name(key)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The running decoder.
    pub fn build(&self) -> ExamonDecoder {
        ExamonDecoder {
            cfg: self.clone(),
            score_plugin: None,
        }
    }
}

/// Decodes ExaMon messages into samples.
#[derive(Debug, Clone)]
pub struct ExamonDecoder {
    cfg: ExamonConfig,
    /// The `[scores] plugin` level: topics with it are scores (this agent's or another
    /// darkwatch's on a shared broker), never input (see [`Self::is_score_topic`]).
    score_plugin: Option<String>,
}

/// A topic tag: key and (URL-decoded) value.
pub type Tag<'t> = (Cow<'t, str>, Cow<'t, str>);

impl ExamonDecoder {
    /// This decoder, knowing `plugin` (`[scores] plugin`) as the plugin level of score
    /// topics, which [`Self::is_score_topic`] then recognises.
    #[must_use]
    pub fn with_score_plugin(mut self, plugin: &str) -> Self {
        self.score_plugin = (!plugin.is_empty()).then(|| plugin.to_owned());
        self
    }

    /// Whether `topic` is a score topic: its `plugin` pair (the first one) has the
    /// `[scores] plugin` value, in the legacy ExaMon layout. The agent's default
    /// subscription (`…/plugin/+/chnl/data/#`) matches its own scores; read as input they
    /// would be metrics no model knows. Allocates nothing.
    pub fn is_score_topic(&self, topic: &str) -> bool {
        let Some(plugin) = self.score_plugin.as_deref() else {
            return false;
        };
        let pairs = topic.rsplit_once('/').map_or("", |(p, _)| p);
        let mut segments = pairs.split('/');
        while let (Some(key), Some(value)) = (segments.next(), segments.next()) {
            if key == "plugin" {
                // `[scores] plugin` has no `%`, so is published as it is.
                return value == plugin;
            }
        }
        false
    }

    /// One sample from one message; the strings borrow from `topic` unless they had to
    /// be URL-decoded.
    ///
    /// # Errors
    /// `TooLarge`, `BadTopic` (odd segment count, empty key or metric, no `chnl` pair),
    /// `NotDataChannel`, `MissingStream`, `NotUtf8`, `BadPayload`, `NonNumeric`,
    /// `NonFinite`, `TimestampMissing`, `TimestampInvalid`.
    pub fn decode<'t>(&self, topic: &'t str, payload: &[u8]) -> Result<Sample<'t>, DecodeError> {
        self.decode_inner(topic, payload, None)
    }

    /// The [`Origin`] of a sample decoded from `topic`: the topic itself. Two topics that
    /// give one stream the same metric name are two series merged into one feature (the
    /// metric is only the last level by default: `core/0/cpu_load` and `core/1/cpu_load`).
    pub fn origin(topic: &str) -> Origin<'_> {
        Origin {
            // 0 means "not tracked"; no topic is given it.
            hash: fnv1a(FNV_START, topic.as_bytes()).max(1),
            text: topic,
        }
    }

    /// As [`Self::decode`], and also fills `tags` (cleared first) with every topic pair
    /// except the stream key, in topic order. Reuse `tags` to avoid allocating.
    ///
    /// # Errors
    /// As [`Self::decode`].
    pub fn decode_with_tags<'t>(
        &self,
        topic: &'t str,
        payload: &[u8],
        tags: &mut Vec<Tag<'t>>,
    ) -> Result<Sample<'t>, DecodeError> {
        tags.clear();
        self.decode_inner(topic, payload, Some(tags))
    }

    fn decode_inner<'t>(
        &self,
        topic: &'t str,
        payload: &[u8],
        mut tags: Option<&mut Vec<Tag<'t>>>,
    ) -> Result<Sample<'t>, DecodeError> {
        if payload.len() > self.cfg.max_payload_bytes {
            return Err(DecodeError::TooLarge {
                len: payload.len(),
                max: self.cfg.max_payload_bytes,
            });
        }
        let Some((pairs, metric)) = topic.rsplit_once('/') else {
            return Err(DecodeError::BadTopic(
                "no key/value pairs before the metric",
            ));
        };
        if metric.is_empty() {
            return Err(DecodeError::BadTopic("empty metric name"));
        }
        // The value of each stream key (the first pair with that key).
        let mut parts: [Option<&'t str>; MAX_STREAM_KEYS] = [None; MAX_STREAM_KEYS];
        let mut channel = None;
        // Byte offset in `topic` just past the `chnl/data` pair's value.
        let mut data_end = 0;
        let mut segments = pairs.split('/');
        while let Some(key) = segments.next() {
            let Some(value) = segments.next() else {
                return Err(DecodeError::BadTopic(
                    "a key has no value (odd number of segments)",
                ));
            };
            if key.is_empty() {
                return Err(DecodeError::BadTopic("empty key"));
            }
            if let Some(i) = self.stream_key_index(key) {
                // The first pair with the key counts, as before.
                if parts[i].is_none() {
                    parts[i] = Some(value);
                }
                continue;
            }
            if key == "chnl" && channel.is_none() {
                channel = Some(value);
                data_end = value.as_ptr() as usize - topic.as_ptr() as usize + value.len();
            }
            if let Some(tags) = tags.as_deref_mut() {
                tags.push((Cow::Borrowed(key), url_decode(value)));
            }
        }
        match channel {
            None => return Err(DecodeError::BadTopic("no chnl/data pair")),
            Some("data") => {}
            Some(other) => return Err(DecodeError::NotDataChannel(clip(other))),
        }
        let keys = self.cfg.stream_key.len().min(MAX_STREAM_KEYS);
        if let Some(i) = parts[..keys]
            .iter()
            .position(|p| p.is_none_or(str::is_empty))
        {
            return Err(DecodeError::MissingStream {
                key: clip(&self.cfg.stream_key[i]),
            });
        }
        let stream = match parts[..keys] {
            [Some(one)] => url_decode(one),
            _ => Cow::Owned(
                parts[..keys]
                    .iter()
                    .flatten()
                    .map(|p| url_decode(p))
                    .collect::<Vec<_>>()
                    .join("/"),
            ),
        };
        let (value, timestamp) = parse_payload(payload)?;
        let metric = if self.cfg.metric_levels > 1 {
            // `data_end` is at a '/' (or the end of `pairs`), and the metric follows.
            self.long_metric(&topic[(data_end + 1).min(topic.len())..])
        } else {
            url_decode(metric)
        };
        Ok(Sample {
            stream,
            metric,
            value,
            timestamp,
        })
    }
}

impl ExamonDecoder {
    /// Which of the stream keys `key` is, if any.
    fn stream_key_index(&self, key: &str) -> Option<usize> {
        self.cfg
            .stream_key
            .iter()
            .take(MAX_STREAM_KEYS)
            .position(|k| k == key)
    }

    /// The metric name from `tail`, the topic after `chnl/data/` (whole pairs, then the
    /// metric): its last `metric_levels` levels, skipping the stream key's pair. Borrows
    /// unless a level had to be URL-decoded or the stream's pair dropped.
    fn long_metric<'t>(&self, tail: &'t str) -> Cow<'t, str> {
        let levels = self.cfg.metric_levels;
        let mut has_stream = false;
        let mut segments = tail.split('/');
        while let (Some(key), Some(_)) = (segments.next(), segments.next()) {
            has_stream |= self.stream_key_index(key).is_some();
        }
        if !has_stream && !tail.contains('%') {
            let start = tail
                .rmatch_indices('/')
                .nth(levels - 1)
                .map_or(0, |(i, _)| i + 1);
            return Cow::Borrowed(&tail[start..]);
        }
        // Rare: build it.
        let mut kept: Vec<Cow<'t, str>> = Vec::new();
        let mut segments = tail.split('/').peekable();
        while let Some(seg) = segments.next() {
            if segments.peek().is_none() {
                kept.push(url_decode(seg));
                break;
            }
            let value = segments.next().unwrap_or("");
            if self.stream_key_index(seg).is_none() {
                kept.push(url_decode(seg));
                kept.push(url_decode(value));
            }
        }
        let from = kept.len().saturating_sub(levels);
        Cow::Owned(kept[from..].join("/"))
    }
}

/// Where two topics differ: the key of the first pair whose value differs, and whether it
/// comes after `chnl/data` (a level `metric_levels` can keep in the metric name). `None`
/// when they differ in their keys or length, or not at all.
pub fn where_topics_differ<'a>(one: &'a str, other: &'a str) -> Option<(&'a str, bool)> {
    let (mut a, mut b) = (one.split('/'), other.split('/'));
    let mut after_data = false;
    loop {
        match (a.next(), b.next()) {
            (None, None) => return None,
            (Some(ka), Some(kb)) if ka == kb => match (a.next(), b.next()) {
                (Some(va), Some(vb)) if va == vb => after_data |= ka == "chnl" && va == "data",
                // The metric itself (the last level) is the same feature: not here.
                (Some(_), Some(_)) => return Some((ka, after_data)),
                _ => return None,
            },
            _ => return None,
        }
    }
}

/// What to do when samples from topics `one` and `other` reach one feature of one stream
/// ([`super::assemble::Mixed`]): name the stream by the key they differ in before
/// `chnl/data` (two clusters with a node of one name), keep the level they differ in
/// after it in the metric name (per-core metrics), or publish one series only.
pub fn merge_remedy(one: &str, other: &str) -> String {
    match where_topics_differ(one, other) {
        Some((key, true)) => format!(
            "the topics differ in {key:?} after chnl/data: keep that level in the metric name with [examon] metric_levels (3 makes {key}/<value>/<metric>; train on those names), or publish one series only"
        ),
        Some(("plugin", false)) => "the topics differ in their plugin: two plugins publish this metric for one node; publish it from one of them only".into(),
        Some((key, false)) => format!(
            "the topics differ in {key:?} before chnl/data: they are two sources under one stream name (a node name used in two clusters, say). Name streams by both keys: [examon] stream_key = [\"{key}\", \"node\"] (streams <{key}>/<node>; alerts and per-stream metrics then carry that name)"
        ),
        None => "name the stream by the topic key that tells the sources apart ([examon] stream_key = [\"cluster\", \"node\"]), keep the levels after chnl/data that tell series apart with [examon] metric_levels (3 makes core/0/cpu_load), or publish one series only".into(),
    }
}

/// Value and timestamp (epoch seconds) of an ExaMon payload, legacy or JSON.
///
/// # Errors
/// `NotUtf8`, `BadPayload` (no `;`, bad JSON, no `v`), `NonNumeric`, `NonFinite`,
/// `TimestampMissing`, `TimestampInvalid`.
pub fn parse_payload(payload: &[u8]) -> Result<(f64, f64), DecodeError> {
    let text = std::str::from_utf8(payload).map_err(|_| DecodeError::NotUtf8)?;
    let text = text.trim();
    if text.starts_with('{') {
        return parse_json_payload(text);
    }
    let Some((value, ts)) = text.rsplit_once(';') else {
        return Err(DecodeError::BadPayload(
            "no ';' between value and timestamp",
        ));
    };
    let ts = ts.trim();
    if ts.is_empty() {
        return Err(DecodeError::TimestampMissing);
    }
    let timestamp = match ts.parse::<f64>() {
        Ok(t) => epoch_seconds(t, ts)?,
        Err(_) => return Err(DecodeError::TimestampInvalid(clip(ts))),
    };
    Ok((parse_value(value)?, timestamp))
}

fn parse_json_payload(text: &str) -> Result<(f64, f64), DecodeError> {
    let doc: Value =
        serde_json::from_str(text).map_err(|_| DecodeError::BadPayload("invalid JSON"))?;
    let Some(obj) = doc.as_object() else {
        return Err(DecodeError::BadPayload("JSON payload is not an object"));
    };
    let value = match obj.get("v") {
        None | Some(Value::Null) => {
            return Err(DecodeError::BadPayload("JSON payload has no \"v\""));
        }
        Some(Value::Number(n)) => n.as_f64().ok_or(DecodeError::NonFinite)?,
        Some(Value::String(s)) => parse_value(s)?,
        Some(other) => return Err(DecodeError::NonNumeric(clip(&other.to_string()))),
    };
    let timestamp = match obj.get("ts") {
        None | Some(Value::Null) => return Err(DecodeError::TimestampMissing),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(t) => epoch_seconds(t, &n.to_string())?,
            None => return Err(DecodeError::TimestampInvalid(clip(&n.to_string()))),
        },
        Some(Value::String(s)) => match s.trim().parse::<f64>() {
            Ok(t) => epoch_seconds(t, s)?,
            Err(_) => return Err(DecodeError::TimestampInvalid(clip(s))),
        },
        Some(other) => return Err(DecodeError::TimestampInvalid(clip(&other.to_string()))),
    };
    if !value.is_finite() {
        return Err(DecodeError::NonFinite);
    }
    Ok((value, timestamp))
}

/// Seconds from a finite non-negative epoch time, its unit by its size
/// ([`super::time::epoch_divisor`]).
fn epoch_seconds(t: f64, text: &str) -> Result<f64, DecodeError> {
    if !(t.is_finite() && t >= 0.0) {
        return Err(DecodeError::TimestampInvalid(clip(text)));
    }
    Ok(t / super::time::epoch_divisor(t))
}

/// Encodes what cannot stand in a topic level as ExaMon publishers do (`/` `%2F`, `#`
/// `%23`, `+` `%2B`, space `%20`, `%` `%25`): what [`url_decode`] reads back. Borrows when
/// there is nothing to encode.
pub fn url_encode(s: &str) -> Cow<'_, str> {
    if !s.contains(['/', '#', '+', ' ', '%', '\0']) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '/' => out.push_str("%2F"),
            '#' => out.push_str("%23"),
            '+' => out.push_str("%2B"),
            ' ' => out.push_str("%20"),
            '%' => out.push_str("%25"),
            // NUL is never valid in a topic.
            '\0' => out.push('_'),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// The Prometheus label name of the stream key `key` on `anomaly_score`: characters other
/// than letters, digits and `_` become `_`; a name that would clash with `stream` or
/// `model_id`, or start with a digit or `__`, gets `examon_` before it.
pub fn label_name(key: &str) -> String {
    let mut name: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.starts_with(|c: char| c.is_ascii_digit())
        || name.starts_with("__")
        || name == "stream"
        || name == "model_id"
    {
        name.insert_str(0, "examon_");
    }
    name
}

/// Who an ExaMon stream is, read from a topic of its (see [`ExamonDecoder::identity`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamIdentity {
    /// The values of the topic's `org`, `cluster` and `node` pairs, where it has them.
    pub org: Option<String>,
    pub cluster: Option<String>,
    pub node: Option<String>,
    /// The `[examon] stream_key` pairs, in the configured order (key, value).
    pub keys: Vec<(String, String)>,
}

impl ExamonDecoder {
    /// The identity of the stream `topic` belongs to: its org, cluster and node and the
    /// pairs of the stream keys, values URL-decoded (the first pair of a key counts, as in
    /// [`Self::decode`]). For a stream's first message, never per message.
    pub fn identity(&self, topic: &str) -> StreamIdentity {
        let mut id = StreamIdentity::default();
        let mut keys: Vec<Option<String>> = vec![None; self.cfg.stream_key.len()];
        let pairs = topic.rsplit_once('/').map_or("", |(p, _)| p);
        let mut segments = pairs.split('/');
        while let (Some(key), Some(value)) = (segments.next(), segments.next()) {
            let value = url_decode(value);
            let slot = match key {
                "org" => Some(&mut id.org),
                "cluster" => Some(&mut id.cluster),
                "node" => Some(&mut id.node),
                _ => None,
            };
            if let Some(slot) = slot
                && slot.is_none()
            {
                *slot = Some(value.to_string());
            }
            if let Some(i) = self.cfg.stream_key.iter().position(|k| k == key)
                && keys[i].is_none()
            {
                keys[i] = Some(value.into_owned());
            }
        }
        id.keys = self
            .cfg
            .stream_key
            .iter()
            .zip(keys)
            .filter_map(|(k, v)| v.map(|v| (k.clone(), v)))
            .collect();
        id
    }
}

/// Decodes the URL escapes ExaMon publishers use in topic values (`%2F %23 %2B %20
/// %25`, hex in either case); other `%` sequences stay as they are. Borrows when there
/// is nothing to decode.
pub fn url_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let decoded = match (bytes.get(i + 1), bytes.get(i + 2)) {
                (Some(b'2'), Some(b'F' | b'f')) => Some('/'),
                (Some(b'2'), Some(b'3')) => Some('#'),
                (Some(b'2'), Some(b'B' | b'b')) => Some('+'),
                (Some(b'2'), Some(b'0')) => Some(' '),
                (Some(b'2'), Some(b'5')) => Some('%'),
                _ => None,
            };
            if let Some(c) = decoded {
                // `%` and the two hex digits are ASCII, so these are char boundaries.
                out.push_str(&s[start..i]);
                out.push(c);
                i += 3;
                start = i;
                continue;
            }
        }
        i += 1;
    }
    out.push_str(&s[start..]);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_keys_that_are_one_label_name_are_refused() {
        for keys in [["gpu-id", "gpu_id"], ["stream", "examon_stream"]] {
            let c = ExamonConfig {
                stream_key: keys.iter().map(|k| k.to_string()).collect(),
                ..ExamonConfig::default()
            };
            let (key, why) = c.validate().unwrap_err();
            assert_eq!(key, "stream_key");
            assert!(why.contains(keys[0]) && why.contains(keys[1]), "{why}");
        }
        let fine = ExamonConfig {
            stream_key: vec!["cluster".into(), "node".into()],
            ..ExamonConfig::default()
        };
        assert_eq!(fine.validate(), Ok(()));
    }

    #[test]
    fn score_topics_are_recognised_by_their_plugin_level() {
        let d = ExamonConfig::default().build();
        let own = "org/o/cluster/c/node/n7/plugin/examon-ai_pub/chnl/data/model/m1/anomaly_score";
        assert!(
            !d.is_score_topic(own),
            "no plugin given: nothing is a score"
        );
        let d = d.with_score_plugin("examon-ai_pub");
        assert!(d.is_score_topic(own));
        assert!(!d.is_score_topic(
            "org/o/cluster/c/node/n7/plugin/pmu_pub/chnl/data/examon-ai_pub/x/load"
        ));
        assert!(!d.is_score_topic("org/o/node/n7/plugin/pmu_pub/chnl/data/load"));
        assert!(!d.is_score_topic("darkwatch/n7/scores/n7/anomaly_score"));
        assert!(!d.is_score_topic(""));
    }

    #[test]
    fn identity_reads_org_cluster_node_and_the_stream_keys_and_encoding_round_trips() {
        let d = ExamonConfig {
            stream_key: vec!["cluster".into(), "gpu".into()],
            ..ExamonConfig::default()
        }
        .build();
        let id = d.identity("org/o1/cluster/c%2F1/node/n7/plugin/nv/chnl/data/gpu/0/power");
        assert_eq!(id.org.as_deref(), Some("o1"));
        assert_eq!(id.cluster.as_deref(), Some("c/1"));
        assert_eq!(id.node.as_deref(), Some("n7"));
        assert_eq!(
            id.keys,
            [
                ("cluster".to_string(), "c/1".to_string()),
                ("gpu".into(), "0".into())
            ]
        );
        let bare = d.identity("cluster/c1/chnl/data/m");
        assert_eq!((bare.org, bare.node), (None, None));
        for v in ["plain", "a/b", "50% #1 +x"] {
            assert_eq!(url_decode(&url_encode(v)), v);
        }
        assert!(!url_encode("a/b+c").contains(['/', '+']));
    }
    use crate::ingest::assemble::mutate;
    use crate::rng::Rng;

    const TOPIC: &str =
        "org/cineca/cluster/marconi100/node/r205n10/plugin/ipmi_pub/chnl/data/total_power";

    fn dec() -> ExamonDecoder {
        ExamonConfig::default().build()
    }

    fn err(topic: &str, payload: &str) -> DecodeError {
        dec().decode(topic, payload.as_bytes()).unwrap_err()
    }

    #[test]
    fn decodes_the_marconi100_example() {
        let mut tags = Vec::new();
        let s = dec()
            .decode_with_tags(TOPIC, b"1523.0;1658832078.001", &mut tags)
            .unwrap();
        assert_eq!(s.stream, "r205n10");
        assert_eq!(s.metric, "total_power");
        assert_eq!(s.value, 1523.0);
        assert_eq!(s.timestamp, 1658832078.001);
        assert!(matches!(s.stream, Cow::Borrowed(_)));
        let tags: Vec<(&str, &str)> = tags.iter().map(|(k, v)| (k.as_ref(), v.as_ref())).collect();
        assert_eq!(
            tags,
            [
                ("org", "cineca"),
                ("cluster", "marconi100"),
                ("plugin", "ipmi_pub"),
                ("chnl", "data")
            ]
        );
    }

    #[test]
    fn plugin_pairs_after_chnl_and_other_stream_keys() {
        let topic = "org/o/cluster/c/node/n7/plugin/pmu_pub/chnl/data/core/23/aperf";
        let mut tags = Vec::new();
        let s = dec()
            .decode_with_tags(topic, b"10822010350093;1658832078.001", &mut tags)
            .unwrap();
        assert_eq!((s.stream.as_ref(), s.metric.as_ref()), ("n7", "aperf"));
        assert_eq!(s.value, 10822010350093.0);
        assert_eq!(
            tags.last().unwrap(),
            &(Cow::Borrowed("core"), Cow::Borrowed("23"))
        );
        let by_cluster = ExamonConfig {
            stream_key: vec!["cluster".into()],
            ..Default::default()
        }
        .build();
        assert_eq!(by_cluster.decode(topic, b"1;2").unwrap().stream, "c");
    }

    /// `metric_levels` keeps levels after `chnl/data` in the metric name (never the stream
    /// key's pair, never `chnl/data` itself); 1 is the last level only, as before.
    #[test]
    fn metric_levels_keep_the_levels_that_tell_cores_apart() {
        let levels = |n: usize, topic: &str| {
            ExamonConfig {
                metric_levels: n,
                ..Default::default()
            }
            .build()
            .decode(topic, b"1;2")
            .unwrap()
            .metric
            .into_owned()
        };
        let core = "org/o/node/n1/plugin/p/chnl/data/cpu/0/core/3/cpu_load";
        assert_eq!(levels(1, core), "cpu_load");
        assert_eq!(levels(0, core), "cpu_load");
        assert_eq!(levels(3, core), "core/3/cpu_load");
        assert_eq!(levels(5, core), "cpu/0/core/3/cpu_load");
        assert_eq!(levels(9, core), "cpu/0/core/3/cpu_load");
        // Fewer levels after chnl/data: the name as it is.
        assert_eq!(levels(3, TOPIC), "total_power");
        // The stream's pair is skipped, URL escapes decoded.
        assert_eq!(
            levels(3, "org/o/chnl/data/gpu/0/node/n1/power"),
            "gpu/0/power"
        );
        assert_eq!(
            levels(3, "org/o/node/n/chnl/data/dev/sd%2Fa/m%20x"),
            "dev/sd/a/m x"
        );
        // Borrowed from the topic when nothing was decoded or dropped.
        let d = ExamonConfig {
            metric_levels: 3,
            ..Default::default()
        }
        .build();
        assert!(matches!(
            d.decode(core, b"1;2").unwrap().metric,
            Cow::Borrowed(_)
        ));
        let cfg: ExamonConfig = serde_json::from_str(r#"{"metric_levels": 3}"#).unwrap();
        assert_eq!(cfg.metric_levels, 3);
        assert_eq!(ExamonConfig::default().metric_levels, 1);
        // Origins: the topic; another core, another origin.
        let o = ExamonDecoder::origin(core);
        assert_eq!(o.text, core);
        assert_ne!(
            o.hash,
            ExamonDecoder::origin(&core.replace("core/3", "core/4")).hash
        );
    }

    /// `stream_key = ["cluster", "node"]` names a stream by both values, in that order:
    /// same-named nodes of two clusters are two streams. A single string still reads as
    /// one key, and neither key's pair is a tag or part of a long metric name.
    #[test]
    fn several_stream_keys_keep_same_named_nodes_of_two_clusters_apart() {
        let cfg: ExamonConfig =
            serde_json::from_str(r#"{"stream_key": ["cluster", "node"], "metric_levels": 3}"#)
                .unwrap();
        assert_eq!(cfg.validate(), Ok(()));
        let d = cfg.build();
        let c1 = "org/o/cluster/c1/node/dupnode/plugin/p/chnl/data/core/0/load";
        let c2 = "org/o/cluster/c%2F2/node/dupnode/plugin/p/chnl/data/core/0/load";
        let mut tags = Vec::new();
        let s = d.decode_with_tags(c1, b"1;2", &mut tags).unwrap();
        assert_eq!(
            (s.stream.as_ref(), s.metric.as_ref()),
            ("c1/dupnode", "core/0/load")
        );
        assert!(
            tags.iter().all(|(k, _)| k != "cluster" && k != "node"),
            "{tags:?}"
        );
        assert_eq!(d.decode(c2, b"1;2").unwrap().stream, "c/2/dupnode");
        // A topic without one of the keys names the missing one.
        assert_eq!(
            d.decode("org/o/node/n/chnl/data/m", b"1;2").unwrap_err(),
            DecodeError::MissingStream {
                key: "cluster".into()
            }
        );
        // The single-string form is one key, as before.
        let one: ExamonConfig = serde_json::from_str(r#"{"stream_key": "cluster"}"#).unwrap();
        assert_eq!(one.stream_key, ["cluster"]);
        assert_eq!(one.build().decode(c1, b"1;2").unwrap().stream, "c1");
        assert_eq!(ExamonConfig::default().stream_key, ["node"]);
        assert!(matches!(
            dec().decode(TOPIC, b"1;2").unwrap().stream,
            Cow::Borrowed(_)
        ));
        for bad in [
            r#"{"stream_key": []}"#,
            r#"{"stream_key": ["node", "node"]}"#,
            r#"{"stream_key": ["chnl"]}"#,
            r#"{"stream_key": [""]}"#,
            r#"{"stream_key": ["a", "b", "c", "d", "e"]}"#,
        ] {
            let cfg: ExamonConfig = serde_json::from_str(bad).unwrap();
            assert_eq!(cfg.validate().unwrap_err().0, "stream_key", "{bad}");
        }
    }

    /// The merge warning's remedy follows where the two topics differ: a cluster (before
    /// chnl/data) needs the stream key, a core (after it) metric_levels.
    #[test]
    fn merge_remedy_names_the_setting_that_separates_the_topics() {
        let c1 = "org/o/cluster/c1/node/dupnode/plugin/p/chnl/data/load";
        let c2 = "org/o/cluster/c2/node/dupnode/plugin/p/chnl/data/load";
        assert_eq!(where_topics_differ(c1, c2), Some(("cluster", false)));
        let r = merge_remedy(c1, c2);
        assert!(r.contains(r#"stream_key = ["cluster", "node"]"#), "{r}");
        assert!(!r.contains("metric_levels"), "{r}");
        let core = |n: u32| format!("org/o/node/n/plugin/p/chnl/data/core/{n}/load");
        assert_eq!(
            where_topics_differ(&core(0), &core(1)),
            Some(("core", true))
        );
        assert!(merge_remedy(&core(0), &core(1)).contains("metric_levels"));
        let plugin = "org/o/cluster/c1/node/dupnode/plugin/q/chnl/data/load";
        assert!(merge_remedy(c1, plugin).contains("two plugins"));
        assert_eq!(where_topics_differ(c1, c1), None);
        assert_eq!(where_topics_differ(c1, &core(0)), None);
        assert!(merge_remedy(c1, &core(0)).contains("stream_key"));
    }

    #[test]
    fn payload_splits_on_the_last_semicolon_and_trims() {
        assert_eq!(parse_payload(b" 2.5;100.25\n").unwrap(), (2.5, 100.25));
        // A string value with ';' inside is non-numeric, not a timestamp error.
        assert_eq!(
            parse_payload(b"a;b;100").unwrap_err(),
            DecodeError::NonNumeric("a;b".into())
        );
        assert_eq!(parse_payload(b"-3e2;0").unwrap(), (-300.0, 0.0));
    }

    #[test]
    fn json_payload_and_millisecond_timestamps() {
        assert_eq!(
            parse_payload(br#"{"v": 42.5, "ts": 1658832078.5}"#).unwrap(),
            (42.5, 1658832078.5)
        );
        assert_eq!(
            parse_payload(br#"{"v": 1, "ts": 1658832078500}"#).unwrap(),
            (1.0, 1658832078.5)
        );
        assert_eq!(
            parse_payload(br#"{"v": "7", "ts": "12"}"#).unwrap(),
            (7.0, 12.0)
        );
        assert_eq!(parse_payload(b"1;1658832078500").unwrap().1, 1658832078.5);
    }

    #[test]
    fn url_escapes_in_values_are_decoded() {
        let topic = "org/o/chnl/data/node/rack%2F1%20n%23%2b%25/m%2Fx";
        let s = dec().decode(topic, b"1;2").unwrap();
        assert_eq!(s.stream, "rack/1 n#+%");
        assert_eq!(s.metric, "m/x");
        assert_eq!(url_decode("a%zz%2"), "a%zz%2");
        assert_eq!(url_decode("%"), "%");
        assert_eq!(url_decode("é%20é"), "é é");
    }

    #[test]
    fn every_error_reason() {
        let ok_topic = "org/o/node/n/chnl/data/m";
        let cases: Vec<(DecodeError, &str)> = vec![
            (err("m", "1;2"), "bad_topic"),
            (err("org/o/node/n/chnl/data/", "1;2"), "bad_topic"),
            (err("org/o/node/chnl/data/m", "1;2"), "bad_topic"),
            (err("/o/node/n/chnl/data/m", "1;2"), "bad_topic"),
            (err("org/o/node/n/m", "1;2"), "bad_topic"),
            (err("org/o/node/n/chnl/cmd/m", "1;2"), "not_data_channel"),
            (err("org/o/host/n/chnl/data/m", "1;2"), "missing_stream"),
            (err("org/o/node//chnl/data/m", "1;2"), "missing_stream"),
            (err(ok_topic, "12"), "bad_payload"),
            (err(ok_topic, "{\"v\": 1"), "bad_payload"),
            (err(ok_topic, "{\"ts\": 1}"), "bad_payload"),
            (err(ok_topic, "x;2"), "non_numeric"),
            (err(ok_topic, ";2"), "non_numeric"),
            (err(ok_topic, "{\"v\": true, \"ts\": 1}"), "non_numeric"),
            (err(ok_topic, "nan;2"), "non_finite"),
            (err(ok_topic, "inf;2"), "non_finite"),
            (err(ok_topic, "1;"), "timestamp_missing"),
            (err(ok_topic, "{\"v\": 1}"), "timestamp_missing"),
            (err(ok_topic, "1;yesterday"), "timestamp_invalid"),
            (err(ok_topic, "1;-5"), "timestamp_invalid"),
            (err(ok_topic, "1;inf"), "timestamp_invalid"),
            (
                err(ok_topic, "{\"v\": 1, \"ts\": [1]}"),
                "timestamp_invalid",
            ),
            (err(ok_topic, &"1".repeat(5000)), "too_large"),
        ];
        for (e, reason) in &cases {
            assert_eq!(e.reason(), *reason, "{e}");
            assert!(!e.to_string().contains('\n'));
        }
        let e = dec().decode(ok_topic, b"\xff;1").unwrap_err();
        assert_eq!(e.reason(), "not_utf8");
        assert_eq!(
            err(ok_topic, &"1".repeat(5000)),
            DecodeError::TooLarge {
                len: 5000,
                max: 4096
            }
        );
    }

    #[test]
    fn fuzzed_topics_and_payloads_never_panic() {
        let mut rng = Rng::new(0xE7A);
        let alphabet = b"/;%2Ff3B0.e-+{}\":,vtsnodechlda1 9\xff\xc3\xa9";
        let valid_payloads: [&[u8]; 2] = [
            b"1523.0;1658832078.001",
            br#"{"v": 1.5, "ts": 1658832078001}"#,
        ];
        let d = dec();
        for _ in 0..20_000 {
            let topic_bytes: Vec<u8> = match rng.below(3) {
                0 => (0..rng.below(80))
                    .map(|_| alphabet[rng.below(alphabet.len())])
                    .collect(),
                1 => (0..rng.below(80)).map(|_| rng.next_u64() as u8).collect(),
                _ => mutate(&mut rng, TOPIC.as_bytes()),
            };
            let topic = String::from_utf8_lossy(&topic_bytes);
            let payload: Vec<u8> = match rng.below(3) {
                0 => (0..rng.below(40))
                    .map(|_| alphabet[rng.below(alphabet.len())])
                    .collect(),
                1 => (0..rng.below(40)).map(|_| rng.next_u64() as u8).collect(),
                _ => {
                    let base = valid_payloads[rng.below(2)];
                    mutate(&mut rng, base)
                }
            };
            if let Ok(s) = d.decode(&topic, &payload) {
                assert!(s.value.is_finite() && s.timestamp.is_finite() && s.timestamp >= 0.0);
            }
        }
        // Every truncation of a valid message.
        for p in valid_payloads {
            for n in 0..=p.len() {
                let _ = d.decode(TOPIC, &p[..n]);
            }
        }
        for n in 0..=TOPIC.len() {
            let _ = d.decode(&TOPIC[..n], b"1;2");
        }
    }
}
