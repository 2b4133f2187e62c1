//! Telegraf MQTT output: JSON metrics or Influx line protocol, several samples per message.
//!
//! Fed by the MQTT source (the payload of each message and its receive time); feeds the
//! [`super::assemble::Assembler`] one [`Sample`] per numeric field, named
//! `<measurement>.<field>`, with the stream taken from a tag (default `host`). With
//! `name_tags`, the values of those tags (when the metric has them) come between:
//! `name_tags = ["cpu"]` names `cpu,cpu=cpu0 usage_user=1` `cpu.cpu0.usage_user`. Each
//! sample comes with its [`Origin`], the metric's tags, so that the assembler can tell
//! two tag sets merged into one feature.
//!
//! JSON: one metric `{"name", "tags", "fields", "timestamp"}`, an array of them, or
//! `{"metrics": [...]}` (Telegraf's batch layout). Line protocol:
//! `measurement,tag=v field=1.5,n=3i,ok=t 1700000000000000000`, one metric per line,
//! with `\,` `\=` `\ ` escapes, quoted string fields, `i`/`u` integers, `t`/`f`
//! booleans, and `#` comment lines. Booleans become 0/1; string fields are reported as
//! [`DecodeError::StringField`] and skipped. A metric without a timestamp takes the
//! receive time. Line-protocol fields arrive in line order; JSON fields in serde_json's
//! map order (sorted by name unless its `preserve_order` feature is on).
//!
//! Telegraf's `layout = "field"` sends one bare value per message on its `topic` with the
//! field name appended as the last level. With [`TelegrafConfig::field_layout_topic`] set to
//! that `topic` template, such a message's topic gives the stream, the measurement, the
//! tags (for `name_tags`) and the field, and its receive time is its timestamp.
//!
//! Errors come at three levels, all through the caller's callback except the first:
//! the whole message (too large, not UTF-8, not JSON) is the `Err` of
//! [`TelegrafDecoder::decode`]; a bad metric or line is one `Err` item and none of its
//! fields; a bad field is one `Err` item and the other fields still arrive.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::assemble::{DecodeError, FNV_START, Origin, Sample, clip, fnv1a, parse_value};

/// [`DecodeError::BadPayload`] of a message that is one bare value while
/// [`TelegrafConfig::field_layout_topic`] is unset: what Telegraf's MQTT output publishes
/// with `layout = "field"` (and `homie-v4`), the measurement, host and field in the topic.
pub const BARE_VALUE: &str = "the payload is a bare value, as Telegraf's MQTT output sends with layout = \"field\" (read only with [telegraf] field_layout_topic set to its topic) or \"homie-v4\" (not read)";

/// [`DecodeError::BadPayload`] of a Homie message (a topic level starting with `$`, or a
/// bare value on one): Telegraf's `layout = "homie-v4"`, which is not read. Its properties
/// mix tags (string values, numeric ones indistinguishable from fields without the
/// retained `$datatype` messages) with fields, under normalised ids (`usage-user`).
pub const HOMIE_V4: &str = "the topic has a Homie attribute level ($name, $datatype, ...), as Telegraf's MQTT output sends with layout = \"homie-v4\", which darkwatch does not read";

/// [`DecodeError::BadTopic`] of a bare value whose topic does not fit
/// [`TelegrafConfig::field_layout_topic`].
pub const TOPIC_MISMATCH: &str = "a bare value's topic does not fit [telegraf] field_layout_topic (its fixed levels, or its number of levels: the template's, less tags Telegraf left out, and the field)";

/// [`DecodeError::BadTopic`] of a bare value whose topic fits
/// [`TelegrafConfig::field_layout_topic`] in more than one way (two optional tag levels,
/// one of them left out: which one cannot be told).
pub const TOPIC_AMBIGUOUS: &str = "a bare value's topic fits [telegraf] field_layout_topic in more than one way (a tag level is missing and which one cannot be told)";

/// Most levels [`TelegrafConfig::field_layout_topic`] may have (the field's not counted).
pub const MAX_TOPIC_LEVELS: usize = 16;

/// Whether `text` is one bare value (a number or a boolean), not a metric.
fn is_bare_value(text: &str) -> bool {
    let t = text.trim();
    !t.is_empty()
        && !t.contains([' ', '=', ','])
        && (t.parse::<f64>().is_ok() || matches!(t, "true" | "false"))
}

/// Whether `text` reads as JSON or line protocol rather than a field-layout value.
fn looks_like_metric(text: &str) -> bool {
    let t = text.trim_start();
    t.starts_with(['{', '[']) || t.contains('=')
}

/// Whether `text`, which [`looks_like_metric`], is a metric of `topic` as Telegraf's other
/// layouts send it: JSON with a `"fields"` key, or line protocol whose first measurement is
/// one of the topic's levels (a `topic` template with `{{ .PluginName }}` puts it there). A
/// string field's text with `=` (`key=value text`) is not.
fn is_metric_of(text: &str, topic: &str) -> bool {
    let t = text.trim_start();
    if t.starts_with(['{', '[']) {
        return t.contains("\"fields\"");
    }
    let Some(line) = t
        .split('\n')
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
    else {
        return false;
    };
    // The measurement ends at the first unescaped `,` or space.
    let bytes = line.as_bytes();
    let mut end = 0;
    while end < bytes.len() && !matches!(bytes[end], b',' | b' ') {
        end += if bytes[end] == b'\\' { 2 } else { 1 };
    }
    let measurement = &line[..end.min(line.len())];
    !measurement.is_empty()
        && line[measurement.len()..].contains(' ')
        && line[measurement.len()..].contains('=')
        && topic.split('/').any(|l| l == measurement)
}

/// Splits `topic` into `levels`, returning how many; more than the template can have is
/// [`TOPIC_MISMATCH`].
fn split_levels<'t>(
    topic: &'t str,
    levels: &mut [&'t str; MAX_TOPIC_LEVELS + 1],
) -> Result<usize, DecodeError> {
    let mut n = 0;
    for level in topic.split('/') {
        let Some(slot) = levels.get_mut(n) else {
            return Err(DecodeError::BadTopic(TOPIC_MISMATCH));
        };
        *slot = level;
        n += 1;
    }
    Ok(n)
}

/// `topic` less one leading '/': Telegraf keeps a rendered topic's leading '/' (a template
/// that starts with one, or whose first level is a tag the metric lacks) since
/// influxdata/telegraf#14582 (January 2024), earlier versions drop it, and the empty level
/// carries nothing; either is read.
fn without_leading_slash(topic: &str) -> &str {
    topic.strip_prefix('/').unwrap_or(topic)
}

/// Whether `topic` has a Homie attribute level (`$homie`, `$name`, `$datatype`, ...).
fn is_homie(topic: &str) -> bool {
    topic.split('/').any(|l| l.starts_with('$'))
}

/// A `layout = "field"` value: Telegraf writes numbers in decimal and booleans as
/// `true` / `false`; anything else is a string field's text.
fn field_value(text: &str) -> Result<f64, DecodeError> {
    match text.trim() {
        "true" => Ok(1.0),
        "false" => Ok(0.0),
        t if is_bare_value(t) => parse_value(t),
        _ => Err(DecodeError::StringField),
    }
}

/// Which encoding the messages use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TelegrafFormat {
    /// JSON when the payload starts with `{` or `[`, line protocol otherwise.
    #[default]
    Auto,
    /// Telegraf `data_format = "json"`.
    Json,
    /// Telegraf `data_format = "influx"`.
    Influx,
}

/// Unit of a numeric timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Told by its size, as ExaMon and CSV timestamps are ([`super::time::epoch_divisor`]):
    /// seconds below 1e11, milliseconds from 1e11, microseconds from 1e14, nanoseconds
    /// from 1e17.
    Auto,
    #[serde(rename = "s")]
    Seconds,
    #[serde(rename = "ms")]
    Millis,
    #[serde(rename = "us")]
    Micros,
    #[serde(rename = "ns")]
    Nanos,
}

impl Precision {
    /// Seconds in `t` units.
    pub fn to_seconds(self, t: f64) -> f64 {
        match self {
            Precision::Auto => t / super::time::epoch_divisor(t.abs()),
            Precision::Seconds => t,
            Precision::Millis => t * 1e-3,
            Precision::Micros => t * 1e-6,
            Precision::Nanos => t * 1e-9,
        }
    }
}

/// How Telegraf messages are read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelegrafConfig {
    /// `auto`, `json` or `influx`. Default `auto`.
    pub format: TelegrafFormat,
    /// Tag whose value is the stream id. Default `host`.
    pub stream_tag: String,
    /// Unit of line-protocol timestamps (`s`, `ms`, `us`, `ns`, or `auto`). Default `auto`:
    /// each one's unit told by its size, so Telegraf's default nanoseconds and its
    /// `precision = "1ms"` (or `1s`, `1us`) all read right. `ns` used to be the default,
    /// and a trial's millisecond lines were read as 1970 and lost without a word.
    pub line_precision: Precision,
    /// Unit of JSON timestamps (Telegraf's `json_timestamp_units`). Default `auto`: each
    /// one's unit told by its size, so Telegraf's `1s`, `1ms`, `1us` and `1ns` all read
    /// right. A unit named here wins.
    pub json_timestamp_units: Precision,
    /// Largest payload accepted, in bytes. Default 1 MiB.
    pub max_payload_bytes: usize,
    /// Tags whose values go into the metric name, in this order, between measurement and
    /// field: `["cpu"]` names the `cpu` input's per-core metrics `cpu.cpu0.usage_user`,
    /// `cpu.cpu1.usage_user`, `cpu.cpu-total.usage_user`. A tag a metric lacks (or has
    /// empty) adds nothing, so `mem.used` stays `mem.used`. Default empty: every tag set
    /// of a measurement gives the same names, merged into one feature per host.
    pub name_tags: Vec<String>,
    /// The `topic` of Telegraf's `[[outputs.mqtt]]` with `layout = "field"`, as written
    /// there (`telegraf/{{ .Hostname }}/{{ .PluginName }}/{{ .Tag "cpu" }}`): a bare-value
    /// message is then read from its topic, the field being the level Telegraf appends.
    /// `{{ .Hostname }}` is the `host` tag, `{{ .PluginName }}` the measurement,
    /// `{{ .Tag "k" }}` tag `k` (a level Telegraf leaves out where the metric lacks the
    /// tag), `+` any one level; other levels must match as written. The stream is the
    /// level of the `stream_tag` tag. Default empty: bare values are refused.
    pub field_layout_topic: String,
}

impl Default for TelegrafConfig {
    fn default() -> Self {
        TelegrafConfig {
            format: TelegrafFormat::Auto,
            stream_tag: "host".to_owned(),
            line_precision: Precision::Auto,
            json_timestamp_units: Precision::Auto,
            max_payload_bytes: 1 << 20,
            name_tags: Vec::new(),
            field_layout_topic: String::new(),
        }
    }
}

impl TelegrafConfig {
    /// The running decoder. A `field_layout_topic` that [`Self::validate`] refuses reads
    /// no bare value (configuration loading refuses it first).
    pub fn build(&self) -> TelegrafDecoder {
        TelegrafDecoder {
            cfg: self.clone(),
            field_topic: self.field_topic().ok().flatten(),
        }
    }

    /// The parsed `field_layout_topic`; `None` when it is empty.
    fn field_topic(&self) -> Result<Option<FieldTopic>, String> {
        if self.field_layout_topic.trim().is_empty() {
            return Ok(None);
        }
        FieldTopic::parse(&self.field_layout_topic, &self.stream_tag).map(Some)
    }

    /// Checks that the types cannot express. Returns the key and the reason.
    ///
    /// # Errors
    /// A `field_layout_topic` that is not a Telegraf topic template this decoder reads.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        self.field_topic()
            .map(|_| ())
            .map_err(|e| ("field_layout_topic", e))
    }

    /// With another `[agent] format` than `telegraf`: `field_layout_topic` would read
    /// nothing (the Telegraf decoder is not used), which is refused rather than ignored.
    ///
    /// # Errors
    /// `field_layout_topic`, naming the format, when it is set.
    pub fn check_format(
        &self,
        format: crate::agent::InputFormat,
    ) -> Result<(), (&'static str, String)> {
        if format == crate::agent::InputFormat::Telegraf
            || self.field_layout_topic.trim().is_empty()
        {
            return Ok(());
        }
        let name = match format {
            crate::agent::InputFormat::Examon => "examon",
            crate::agent::InputFormat::Raw => "raw",
            crate::agent::InputFormat::Telegraf => "telegraf",
        };
        Err((
            "field_layout_topic",
            format!(
                "is set, but [agent] format = {name:?} does not read Telegraf messages, so it \
                 would do nothing: set [agent] format = \"telegraf\", or remove \
                 field_layout_topic"
            ),
        ))
    }

    /// With `[agent] format = "telegraf"`: whether one of the `[mqtt] subscribe` filters can
    /// carry the topics `field_layout_topic` describes (none would leave every bare value
    /// unsubscribed).
    ///
    /// # Errors
    /// `field_layout_topic` and why, when no filter can match its topics.
    pub fn check_subscriptions(&self, filters: &[String]) -> Result<(), (&'static str, String)> {
        let Ok(Some(topic)) = self.field_topic() else {
            return Ok(());
        };
        if filters.iter().any(|f| topic.can_carry(f)) {
            return Ok(());
        }
        let (least, most) = topic.level_counts();
        let (least, most) = (
            least + usize::from(topic.leading_slash),
            most + usize::from(topic.leading_slash),
        );
        let levels = if least == most {
            format!("{most}")
        } else {
            format!("{least} to {most}")
        };
        Err((
            "field_layout_topic",
            format!(
                "{:?} makes topics of {levels} levels (the field last{}), and no [mqtt] \
                 subscribe filter ({filters:?}) matches such topics: subscribe to them, e.g. {:?}",
                self.field_layout_topic.trim(),
                if topic.leading_slash {
                    ", an empty one first: Telegraf keeps a leading '/'"
                } else {
                    ""
                },
                topic.filter()
            ),
        ))
    }
}

/// One level of a parsed `field_layout_topic`.
#[derive(Debug, Clone, PartialEq)]
enum Level {
    /// Matches itself only.
    Literal(String),
    /// `+`: any one level, not read.
    Any,
    /// `{{ .PluginName }}` or `{{ .Name }}`.
    Measurement,
    /// `{{ .Tag "key" }}` or `{{ .Hostname }}` (the `host` tag), optional: Telegraf leaves
    /// the level out where the metric lacks the tag (or, for `.Hostname`, has no host);
    /// the stream's level is never optional.
    Tag { key: String, optional: bool },
}

impl Level {
    fn fits(&self, level: &str) -> bool {
        match self {
            Level::Literal(l) => level == l,
            _ => !level.is_empty(),
        }
    }

    fn optional(&self) -> bool {
        matches!(self, Level::Tag { optional: true, .. })
    }
}

/// A parsed `field_layout_topic`: the levels before the field.
#[derive(Debug, Clone, PartialEq)]
struct FieldTopic {
    levels: Vec<Level>,
    measurement: usize,
    stream: usize,
    /// The template starts with '/': Telegraf (since influxdata/telegraf#14582) publishes
    /// its topics with an empty first level (`/telegraf/n1/cpu/usage_user`).
    leading_slash: bool,
}

impl FieldTopic {
    fn parse(template: &str, stream_tag: &str) -> Result<FieldTopic, String> {
        const KNOWN: &str = "field_layout_topic is Telegraf's [[outputs.mqtt]] topic as written there: \
            each level a fixed name, {{ .Hostname }}, {{ .PluginName }} (or {{ .Name }}), \
            {{ .Tag \"key\" }} or + (any level)";
        let template = template.trim();
        let mut levels = Vec::new();
        // Telegraf drops the empty levels of the rendered topic (a doubled or trailing
        // '/', a missing tag's level) and, since influxdata/telegraf#14582, keeps a leading '/'; an empty
        // level here is dropped likewise, and the leading '/' remembered.
        let leading_slash = template.starts_with('/');
        for level in template.split('/').filter(|l| !l.is_empty()) {
            let parsed = if level == "+" {
                Level::Any
            } else if level.contains(['{', '}']) {
                let inner = level
                    .strip_prefix("{{")
                    .and_then(|l| l.strip_suffix("}}"))
                    .filter(|i| !i.contains(['{', '}']))
                    .ok_or_else(|| {
                        format!(
                            "level {level:?} is not a placeholder darkwatch reads: a placeholder \
                             must be a whole level, in Telegraf's spelling ({KNOWN})"
                        )
                    })?;
                // Go's trim markers `{{-` and `-}}` change nothing in a level.
                let inner = inner.trim();
                let inner = inner.strip_prefix('-').unwrap_or(inner);
                let inner = inner.strip_suffix('-').unwrap_or(inner).trim();
                let tag = inner
                    .strip_prefix(".Tag")
                    .map(str::trim)
                    .and_then(|k| k.strip_prefix('"')?.strip_suffix('"'))
                    .filter(|k| !k.is_empty() && !k.contains(['"', '\\']));
                // Telegraf 1.35 rewrites `.Hostname` to `.Tag "host"` and `.PluginName` to
                // `.Name` and runs the template on the metric; both spellings are read.
                // `.Hostname` is left out like any tag (an empty level is dropped), e.g.
                // for a metric without a host under `omit_hostname`.
                match (inner, tag) {
                    (".Hostname", _) => Level::Tag {
                        key: "host".into(),
                        optional: true,
                    },
                    (".PluginName" | ".Name", _) => Level::Measurement,
                    (".TopicPrefix", _) => {
                        return Err(format!(
                            "{level:?} is the value of Telegraf's topic_prefix (before 1.35; \
                             1.35 removed it), which the template does not tell: write that \
                             value in its place, e.g. \"telegraf/{{{{ .Hostname }}}}/{{{{ .PluginName }}}}\" \
                             for topic_prefix = \"telegraf\" (no level where it is empty)"
                        ));
                    }
                    (_, Some(key)) => Level::Tag {
                        key: key.into(),
                        optional: true,
                    },
                    _ => {
                        return Err(format!("unknown placeholder {level:?}: {KNOWN}"));
                    }
                }
            } else if level.contains(['+', '#']) {
                return Err(format!(
                    "level {level:?}: + stands alone for any one level, and # is not read \
                     (the field is the last level, after the template's)"
                ));
            } else {
                Level::Literal(level.to_owned())
            };
            levels.push(parsed);
        }
        if levels.len() > MAX_TOPIC_LEVELS {
            return Err(format!(
                "{template:?} has {} levels; at most {MAX_TOPIC_LEVELS} are read",
                levels.len()
            ));
        }
        let find = |want: &dyn Fn(&Level) -> bool, what: &str| {
            let mut at = levels.iter().enumerate().filter(|(_, l)| want(l));
            match (at.next(), at.next()) {
                (Some((i, _)), None) => Ok(Some(i)),
                (None, _) => Ok(None),
                (Some(_), Some(_)) => Err(format!("{template:?} has {what} twice")),
            }
        };
        let measurement = find(
            &|l| *l == Level::Measurement,
            "the measurement ({{ .PluginName }} or {{ .Name }})",
        )?
        .ok_or_else(|| {
            format!(
                "{template:?} has no {{{{ .PluginName }}}} (or {{{{ .Name }}}}) level: metrics \
                     are named <measurement>.<field>, and the measurement is that level"
            )
        })?;
        for level in &levels {
            if let Level::Tag { key, .. } = level {
                let what = format!("tag {key:?} ({{{{ .Hostname }}}} is the host tag)");
                find(
                    &|l| matches!(l, Level::Tag { key: k, .. } if k == key),
                    &what,
                )?;
            }
        }
        let stream = find(
            &|l| matches!(l, Level::Tag { key, .. } if key == stream_tag),
            "the stream tag",
        )?
        .ok_or_else(|| {
            format!(
                "{template:?} has no level for the stream: it is the value of [telegraf] \
                 stream_tag = {stream_tag:?}, so the template needs {{{{ .Tag {stream_tag:?} }}}}{}, \
                 or stream_tag must name a tag the template has",
                if stream_tag == "host" {
                    " or {{ .Hostname }}"
                } else {
                    ""
                }
            )
        })?;
        if let Level::Tag { optional, .. } = &mut levels[stream] {
            *optional = false;
        }
        Ok(FieldTopic {
            levels,
            measurement,
            stream,
            leading_slash,
        })
    }

    /// Fewest and most levels of a topic (the field's included).
    fn level_counts(&self) -> (usize, usize) {
        let optional = self.levels.iter().filter(|l| l.optional()).count();
        (self.levels.len() - optional + 1, self.levels.len() + 1)
    }

    /// A subscription filter for the topics: the fixed leading levels, then `#`.
    fn filter(&self) -> String {
        let mut f = String::new();
        if self.leading_slash {
            f.push('/');
        }
        for level in &self.levels {
            match level {
                Level::Literal(l) => f.push_str(l),
                _ => break,
            }
            f.push('/');
        }
        f.push('#');
        f
    }

    /// Whether subscription filter `filter` (`{node}` counted as any level, a `$share/g/`
    /// prefix dropped) can match one of the topics. As Telegraf publishes
    /// them: with an empty first level where the template starts with '/', or where its
    /// first level is a tag the metric lacks; without one otherwise.
    fn can_carry(&self, filter: &str) -> bool {
        let filter = match filter.strip_prefix("$share/") {
            Some(rest) => rest.split_once('/').map_or("", |(_, f)| f),
            None => filter,
        };
        let levels: Vec<&str> = filter.split('/').collect();
        let plain = !self.leading_slash;
        let slashed = self.leading_slash || self.levels.first().is_some_and(Level::optional);
        (plain && self.carries(&levels))
            || (slashed
                && match levels.split_first() {
                    Some((&"#", _)) => true,
                    Some((&("" | "+"), rest)) => self.carries(rest),
                    _ => false,
                })
    }

    /// Whether filter levels `levels` can match one of the topics less a leading empty
    /// level.
    fn carries(&self, levels: &[&str]) -> bool {
        let (least, most) = self.level_counts();
        let (compared, fits) = match levels.iter().position(|l| *l == "#") {
            Some(at) => (at, at <= most),
            None => (levels.len(), (least..=most).contains(&levels.len())),
        };
        // Levels line up with the template's up to its first optional one (all of them
        // where every level is there).
        let aligned = if levels.len() == most && compared == most {
            most - 1
        } else {
            self.levels.iter().take_while(|l| !l.optional()).count()
        };
        fits && self
            .levels
            .iter()
            .zip(levels)
            .take(compared.min(aligned))
            .all(|(t, f)| match t {
                Level::Literal(l) => *f == "+" || f.starts_with('{') || f == l,
                _ => true,
            })
    }

    /// Whether `topic` is one of the template's field topics: its level count (the
    /// template's, less tag levels left out, and the field) and its fixed levels fit, in
    /// one way or more (a topic that fits in two is still a field topic, refused as
    /// [`TOPIC_AMBIGUOUS`]).
    fn fits(&self, topic: &str) -> bool {
        let mut levels = [""; MAX_TOPIC_LEVELS + 1];
        let Ok(n) = split_levels(without_leading_slash(topic), &mut levels) else {
            return false;
        };
        match levels[..n].split_last() {
            Some((field, before)) if !field.is_empty() && !is_homie(topic) => !matches!(
                self.assign(before, &mut [None; MAX_TOPIC_LEVELS]),
                Err(DecodeError::BadTopic(TOPIC_MISMATCH))
            ),
            _ => false,
        }
    }

    /// Matches the levels before the field, `topic`, to the template: the topic's level
    /// for each template level, `None` where an optional tag level is left out.
    fn assign<'t>(
        &self,
        topic: &[&'t str],
        got: &mut [Option<&'t str>; MAX_TOPIC_LEVELS],
    ) -> Result<(), DecodeError> {
        let (m, n) = (self.levels.len(), topic.len());
        if n > m {
            return Err(DecodeError::BadTopic(TOPIC_MISMATCH));
        }
        // ways[i][j]: how many ways (0, 1, or 2 for more) template levels i.. fit topic
        // levels j..; an optional level fits one level or none.
        let mut ways = [[0u8; MAX_TOPIC_LEVELS + 1]; MAX_TOPIC_LEVELS + 1];
        ways[m][n] = 1;
        for i in (0..m).rev() {
            let level = &self.levels[i];
            for j in (0..=n).rev() {
                let mut w = 0;
                if j < n && level.fits(topic[j]) {
                    w += ways[i + 1][j + 1];
                }
                if level.optional() {
                    w += ways[i + 1][j];
                }
                ways[i][j] = w.min(2);
            }
        }
        match ways[0][0] {
            0 => return Err(DecodeError::BadTopic(TOPIC_MISMATCH)),
            1 => {}
            _ => return Err(DecodeError::BadTopic(TOPIC_AMBIGUOUS)),
        }
        let mut j = 0;
        for (i, level) in self.levels.iter().enumerate() {
            got[i] = if j < n && level.fits(topic[j]) && ways[i + 1][j + 1] > 0 {
                j += 1;
                Some(topic[j - 1])
            } else {
                None
            };
        }
        Ok(())
    }
}

/// Decodes Telegraf messages into samples.
#[derive(Debug, Clone)]
pub struct TelegrafDecoder {
    cfg: TelegrafConfig,
    /// The parsed `field_layout_topic`, if set.
    field_topic: Option<FieldTopic>,
}

impl TelegrafDecoder {
    /// Decodes one message, received on `topic`, handing each sample, or each metric's /
    /// field's error, to `out`. `receive_time` (epoch seconds) stands in for a missing
    /// timestamp (and is a field-layout value's time); pass NaN to reject such metrics
    /// with `TimestampMissing`. Samples borrow from the payload, the topic and a name
    /// buffer; call [`Sample::into_owned`] to keep one.
    ///
    /// # Errors
    /// `TooLarge`, `NotUtf8`, or `BadPayload` when the message as a whole is unreadable
    /// (invalid JSON, JSON that is not a metric, an array or `{"metrics": [...]}`, one
    /// bare value without `field_layout_topic`: [`BARE_VALUE`], a Homie message:
    /// [`HOMIE_V4`]); `BadTopic` when a bare value's topic does not fit
    /// `field_layout_topic`.
    pub fn decode(
        &self,
        topic: &str,
        payload: &[u8],
        receive_time: f64,
        out: &mut impl FnMut(Result<Sample<'_>, DecodeError>),
    ) -> Result<(), DecodeError> {
        self.decode_with_origin(topic, payload, receive_time, &mut |r, _| out(r))
    }

    /// As [`Self::decode`], with each sample's [`Origin`]: a hash of its metric's tags (in
    /// any order) and the tags as written (`cpu=cpu0,host=n1`).
    ///
    /// # Errors
    /// As [`Self::decode`].
    pub fn decode_with_origin(
        &self,
        topic: &str,
        payload: &[u8],
        receive_time: f64,
        out: &mut impl FnMut(Result<Sample<'_>, DecodeError>, Origin<'_>),
    ) -> Result<(), DecodeError> {
        if payload.len() > self.cfg.max_payload_bytes {
            return Err(DecodeError::TooLarge {
                len: payload.len(),
                max: self.cfg.max_payload_bytes,
            });
        }
        let text = std::str::from_utf8(payload).map_err(|_| DecodeError::NotUtf8)?;
        let mut name = String::new();
        match &self.field_topic {
            // A field-layout value: a bare number or boolean; any text on a topic that fits
            // the template (a string field, `=` and all) unless it is a metric of that
            // topic (another layout's topic from the same template can fit it too); and
            // text that is neither JSON nor has the `=` of line protocol, whose topic is
            // then checked.
            Some(field_topic)
                if is_bare_value(text)
                    || !looks_like_metric(text)
                    || (field_topic.fits(topic) && !is_metric_of(text, topic)) =>
            {
                return self.decode_field(field_topic, topic, text, receive_time, &mut name, out);
            }
            None if is_bare_value(text) => {
                return Err(DecodeError::BadPayload(if is_homie(topic) {
                    HOMIE_V4
                } else {
                    BARE_VALUE
                }));
            }
            _ => {}
        }
        let json = match self.cfg.format {
            TelegrafFormat::Json => true,
            TelegrafFormat::Influx => false,
            TelegrafFormat::Auto => {
                matches!(text.trim_start().as_bytes().first(), Some(b'{' | b'['))
            }
        };
        if json {
            self.decode_json(text, receive_time, &mut name, out)
        } else {
            for line in text.split('\n') {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                if let Err(e) = self.decode_line(line, receive_time, &mut name, out) {
                    out(Err(e), Origin::default());
                }
            }
            Ok(())
        }
    }

    /// Convenience for tests and tools: every sample, owned, and every item error.
    pub fn decode_to_vec(
        &self,
        topic: &str,
        payload: &[u8],
        receive_time: f64,
    ) -> Result<Vec<Result<Sample<'static>, DecodeError>>, DecodeError> {
        let mut all = Vec::new();
        self.decode(topic, payload, receive_time, &mut |r: Result<
            Sample<'_>,
            DecodeError,
        >| {
            all.push(r.map(Sample::into_owned))
        })?;
        Ok(all)
    }

    /// One `layout = "field"` message: the value `text` of the field named by the topic's
    /// last level, the rest of the topic read by `field_topic`.
    fn decode_field(
        &self,
        field_topic: &FieldTopic,
        topic: &str,
        text: &str,
        receive_time: f64,
        name: &mut String,
        out: &mut impl FnMut(Result<Sample<'_>, DecodeError>, Origin<'_>),
    ) -> Result<(), DecodeError> {
        if is_homie(topic) {
            return Err(DecodeError::BadPayload(HOMIE_V4));
        }
        let mut levels = [""; MAX_TOPIC_LEVELS + 1];
        let n = split_levels(without_leading_slash(topic), &mut levels)?;
        let (field, before) = match levels[..n].split_last() {
            Some((field, before)) if !field.is_empty() => (*field, before),
            _ => return Err(DecodeError::BadTopic(TOPIC_MISMATCH)),
        };
        let mut got = [None; MAX_TOPIC_LEVELS];
        field_topic.assign(before, &mut got)?;
        let tag = |key: &str| {
            field_topic
                .levels
                .iter()
                .zip(got)
                .find_map(|(level, value)| match level {
                    Level::Tag { key: k, .. } if k == key => value,
                    _ => None,
                })
        };
        // The stream's and the measurement's levels are never optional.
        let (Some(stream), Some(measurement)) =
            (got[field_topic.stream], got[field_topic.measurement])
        else {
            return Err(DecodeError::BadTopic(TOPIC_MISMATCH));
        };
        let tags = || {
            field_topic
                .levels
                .iter()
                .zip(got)
                .filter_map(|(level, value)| match (level, value) {
                    (Level::Tag { key, .. }, Some(v)) => Some((key.as_str(), v)),
                    _ => None,
                })
        };
        // One buffer, sized once, holds the tags in the topic as `k=v,…` (the origin's
        // text, as for the other layouts) and then the metric's name.
        let tags_len: usize = tags().map(|(k, v)| k.len() + v.len() + 2).sum();
        let name_len = measurement.len()
            + 1
            + field.len()
            + self
                .cfg
                .name_tags
                .iter()
                .filter_map(|k| tag(k))
                .map(|v| v.len() + 1)
                .sum::<usize>();
        name.clear();
        name.reserve(tags_len + name_len);
        let mut hash = 0u64;
        for (k, v) in tags() {
            push_tag(name, &mut hash, k, v);
        }
        let tags_end = name.len();
        let hash = hash.max(1);
        let value = fallback_time(receive_time)
            .and_then(|timestamp| field_value(text).map(|value| (timestamp, value)));
        match value {
            Ok((timestamp, value)) => {
                name.push_str(measurement);
                push_name_tags(name, &self.cfg.name_tags, |k| tag(k).map(Cow::Borrowed));
                name.push('.');
                name.push_str(field);
                let (tags_text, metric) = name.split_at(tags_end);
                out(
                    Ok(Sample {
                        stream: Cow::Borrowed(stream),
                        metric: Cow::Borrowed(metric),
                        value,
                        timestamp,
                    }),
                    Origin {
                        hash,
                        text: tags_text,
                    },
                );
            }
            Err(e) => out(
                Err(e),
                Origin {
                    hash,
                    text: name.as_str(),
                },
            ),
        }
        Ok(())
    }

    fn decode_json(
        &self,
        text: &str,
        receive_time: f64,
        name: &mut String,
        out: &mut impl FnMut(Result<Sample<'_>, DecodeError>, Origin<'_>),
    ) -> Result<(), DecodeError> {
        let doc: Value =
            serde_json::from_str(text).map_err(|_| DecodeError::BadPayload("invalid JSON"))?;
        let metrics: &[Value] = match &doc {
            Value::Array(items) => items,
            Value::Object(obj) if !obj.contains_key("name") && obj.contains_key("metrics") => {
                match obj.get("metrics") {
                    Some(Value::Array(items)) => items,
                    _ => return Err(DecodeError::BadPayload("\"metrics\" is not an array")),
                }
            }
            Value::Object(_) => std::slice::from_ref(&doc),
            _ => {
                return Err(DecodeError::BadPayload(
                    "JSON is not a metric or an array of metrics",
                ));
            }
        };
        let mut tags_text = String::new();
        for metric in metrics {
            match metric.as_object() {
                Some(obj) => {
                    if let Err(e) = self.json_metric(obj, receive_time, name, &mut tags_text, out) {
                        out(Err(e), Origin::default());
                    }
                }
                None => out(
                    Err(DecodeError::BadPayload("metric is not a JSON object")),
                    Origin::default(),
                ),
            }
        }
        Ok(())
    }

    fn json_metric(
        &self,
        obj: &Map<String, Value>,
        receive_time: f64,
        name: &mut String,
        tags_text: &mut String,
        out: &mut impl FnMut(Result<Sample<'_>, DecodeError>, Origin<'_>),
    ) -> Result<(), DecodeError> {
        let Some(measurement) = obj.get("name").and_then(Value::as_str) else {
            return Err(DecodeError::BadPayload("metric has no \"name\" string"));
        };
        let tags = obj.get("tags").and_then(Value::as_object);
        let stream = tags
            .and_then(|t| t.get(&self.cfg.stream_tag))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| self.missing_stream())?;
        let timestamp = match obj.get("timestamp") {
            None | Some(Value::Null) => fallback_time(receive_time)?,
            Some(Value::Number(n)) => match n.as_f64() {
                Some(t) => scaled_time(t, self.cfg.json_timestamp_units, || n.to_string())?,
                None => return Err(DecodeError::TimestampInvalid(clip(&n.to_string()))),
            },
            // Telegraf's `json_timestamp_format` (a Go layout) writes a string: RFC 3339 and
            // ISO 8601 date-times are read, other layouts refused.
            Some(Value::String(text)) => match super::time::parse_datetime(text.trim()) {
                Some(t) if t >= 0.0 => t,
                _ => return Err(DecodeError::TimestampInvalid(clip(text))),
            },
            Some(other) => return Err(DecodeError::TimestampInvalid(clip(&other.to_string()))),
        };
        let Some(fields) = obj.get("fields").and_then(Value::as_object) else {
            return Err(DecodeError::BadPayload("metric has no \"fields\" object"));
        };
        // The tags as `k=v,…` (reused buffer) and their hash; string values only, as
        // Telegraf writes them.
        tags_text.clear();
        let mut hash = 0u64;
        for (k, v) in tags.into_iter().flatten() {
            if let Some(v) = v.as_str() {
                push_tag(tags_text, &mut hash, k, v);
            }
        }
        let origin = Origin {
            hash: hash.max(1),
            text: tags_text,
        };
        let prefix = name_prefix(Cow::Borrowed(measurement), &self.cfg.name_tags, |key| {
            tags.and_then(|t| t.get(key))
                .and_then(Value::as_str)
                .map(Cow::Borrowed)
        });
        for (field, v) in fields {
            let value = match v {
                Value::Number(n) => match n.as_f64() {
                    Some(x) if x.is_finite() => Ok(x),
                    _ => Err(DecodeError::NonFinite),
                },
                Value::Bool(b) => Ok(f64::from(u8::from(*b))),
                Value::String(_) => Err(DecodeError::StringField),
                other => Err(DecodeError::NonNumeric(clip(&other.to_string()))),
            };
            emit(out, name, &prefix, field, stream, value, timestamp, origin);
        }
        Ok(())
    }

    /// One line-protocol line; fields go to `out`, a line-level error is returned.
    fn decode_line<'l>(
        &self,
        line: &'l str,
        receive_time: f64,
        name: &mut String,
        out: &mut impl FnMut(Result<Sample<'_>, DecodeError>, Origin<'_>),
    ) -> Result<(), DecodeError> {
        let (series, rest) = split_section(line)?;
        let (fields, ts) = match rest {
            Some(rest) => split_section(rest)?,
            None => return Err(DecodeError::BadPayload("line has no fields")),
        };
        if fields.is_empty() {
            return Err(DecodeError::BadPayload("line has no fields"));
        }
        let mut parts = Splitter::new(series, b',');
        let measurement = unescape(parts.next().unwrap_or(""));
        if measurement.is_empty() {
            return Err(DecodeError::BadPayload("empty measurement"));
        }
        // The tags as written, for the log: after the measurement's unescaped comma.
        let tags_text = series.get(parts_offset(series, &parts)..).unwrap_or("");
        let mut stream: Option<Cow<'l, str>> = None;
        let mut hash = 0u64;
        for tag in parts {
            let Some((k, v)) = split_key_value(tag) else {
                return Err(DecodeError::BadPayload("tag without '='"));
            };
            hash = hash.wrapping_add(tag_hash(k, v));
            if stream.is_none() && unescape(k) == self.cfg.stream_tag.as_str() {
                stream = Some(unescape(v));
            }
        }
        let origin = Origin {
            hash: hash.max(1),
            text: tags_text,
        };
        let stream = stream
            .filter(|s| !s.is_empty())
            .ok_or_else(|| self.missing_stream())?;
        let timestamp = match ts.map(str::trim) {
            None | Some("") => fallback_time(receive_time)?,
            Some(t) => match t.parse::<i64>() {
                Ok(n) => scaled_time(n as f64, self.cfg.line_precision, || t.to_owned())?,
                Err(_) => return Err(DecodeError::TimestampInvalid(clip(t))),
            },
        };
        let prefix = name_prefix(measurement, &self.cfg.name_tags, |key| {
            line_tag(series, key)
        });
        for field in Splitter::new(fields, b',') {
            let Some((k, v)) = split_key_value(field) else {
                out(Err(DecodeError::BadPayload("field without '='")), origin);
                continue;
            };
            let key = unescape(k);
            if key.is_empty() {
                out(Err(DecodeError::BadPayload("empty field key")), origin);
                continue;
            }
            emit(
                out,
                name,
                &prefix,
                &key,
                &stream,
                line_value(v),
                timestamp,
                origin,
            );
        }
        Ok(())
    }

    fn missing_stream(&self) -> DecodeError {
        DecodeError::MissingStream {
            key: clip(&self.cfg.stream_tag),
        }
    }
}

/// Hash of one tag (key and value as written): the tag set's hash is the wrapping sum of
/// its tags', the same in any order.
fn tag_hash(k: &str, v: &str) -> u64 {
    fnv1a(fnv1a(FNV_START, k.as_bytes()) ^ 0x3d, v.as_bytes())
}

/// Adds tag `k=v` to a tag set's text (`k=v,…`, as written) and its hash ([`tag_hash`]'s
/// sum): the field layout's and JSON's tags, named and told apart as line protocol's are.
fn push_tag(text: &mut String, hash: &mut u64, k: &str, v: &str) {
    if !text.is_empty() {
        text.push(',');
    }
    text.push_str(k);
    text.push('=');
    text.push_str(v);
    *hash = hash.wrapping_add(tag_hash(k, v));
}

/// Byte offset in `series` where the tags (what `parts` has left) start.
fn parts_offset(series: &str, parts: &Splitter<'_>) -> usize {
    parts.rest.map_or(series.len(), |r| {
        r.as_ptr() as usize - series.as_ptr() as usize
    })
}

/// The (unescaped) value of tag `key` in a line's series section `measurement,k=v,…`.
fn line_tag<'l>(series: &'l str, key: &str) -> Option<Cow<'l, str>> {
    Splitter::new(series, b',').skip(1).find_map(|tag| {
        let (k, v) = split_key_value(tag)?;
        (unescape(k) == key).then(|| unescape(v))
    })
}

/// The metric name's prefix: the measurement, then the value of each `name_tags` tag that
/// `tag` finds (and is not empty), dot-separated. Every layout names its metrics so.
fn name_prefix<'a, 'b>(
    measurement: Cow<'a, str>,
    name_tags: &[String],
    tag: impl FnMut(&str) -> Option<Cow<'b, str>>,
) -> Cow<'a, str> {
    if name_tags.is_empty() {
        return measurement;
    }
    let mut p = measurement.into_owned();
    push_name_tags(&mut p, name_tags, tag);
    Cow::Owned(p)
}

/// Appends to a metric name's prefix `p` the value of each `name_tags` tag that `tag`
/// finds (and is not empty), each after a dot.
fn push_name_tags<'b>(
    p: &mut String,
    name_tags: &[String],
    mut tag: impl FnMut(&str) -> Option<Cow<'b, str>>,
) {
    for key in name_tags {
        if let Some(v) = tag(key)
            && !v.is_empty()
        {
            p.push('.');
            p.push_str(&v);
        }
    }
}

/// Hands one field's sample (named `<prefix>.<field>` in the reused `name`, the prefix
/// being the measurement and any `name_tags` values) or error to `out`.
#[allow(clippy::too_many_arguments)]
fn emit(
    out: &mut impl FnMut(Result<Sample<'_>, DecodeError>, Origin<'_>),
    name: &mut String,
    prefix: &str,
    field: &str,
    stream: &str,
    value: Result<f64, DecodeError>,
    timestamp: f64,
    origin: Origin<'_>,
) {
    match value {
        Ok(value) => {
            name.clear();
            name.push_str(prefix);
            name.push('.');
            name.push_str(field);
            out(
                Ok(Sample {
                    stream: Cow::Borrowed(stream),
                    metric: Cow::Borrowed(name.as_str()),
                    value,
                    timestamp,
                }),
                origin,
            );
        }
        Err(e) => out(Err(e), origin),
    }
}

fn fallback_time(receive_time: f64) -> Result<f64, DecodeError> {
    if receive_time.is_finite() && receive_time >= 0.0 {
        Ok(receive_time)
    } else {
        Err(DecodeError::TimestampMissing)
    }
}

fn scaled_time(t: f64, unit: Precision, text: impl FnOnce() -> String) -> Result<f64, DecodeError> {
    let secs = unit.to_seconds(t);
    if secs.is_finite() && secs >= 0.0 {
        Ok(secs)
    } else {
        Err(DecodeError::TimestampInvalid(clip(&text())))
    }
}

/// Value of one line-protocol field.
fn line_value(v: &str) -> Result<f64, DecodeError> {
    if v.starts_with('"') {
        return if v.len() >= 2 && v.ends_with('"') {
            Err(DecodeError::StringField)
        } else {
            Err(DecodeError::BadPayload("unterminated string field"))
        };
    }
    match v {
        "t" | "T" | "true" | "True" | "TRUE" => return Ok(1.0),
        "f" | "F" | "false" | "False" | "FALSE" => return Ok(0.0),
        _ => {}
    }
    if let Some(int) = v.strip_suffix('i') {
        return int
            .parse::<i64>()
            .map(|n| n as f64)
            .map_err(|_| DecodeError::NonNumeric(clip(v)));
    }
    if let Some(uint) = v.strip_suffix('u') {
        return uint
            .parse::<u64>()
            .map(|n| n as f64)
            .map_err(|_| DecodeError::NonNumeric(clip(v)));
    }
    parse_value(v)
}

/// Splits a line at its first unescaped space outside double quotes: the section
/// before, and the rest (if any). Fails on an unterminated quote.
fn split_section(s: &str) -> Result<(&str, Option<&str>), DecodeError> {
    let b = s.as_bytes();
    let mut in_quote = false;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'"' => in_quote = !in_quote,
            b' ' if !in_quote => return Ok((&s[..i], Some(&s[i + 1..]))),
            _ => {}
        }
        i += 1;
    }
    if in_quote {
        return Err(DecodeError::BadPayload("unterminated string field"));
    }
    Ok((s, None))
}

/// Splits on `sep` where it is neither escaped nor inside double quotes.
struct Splitter<'a> {
    rest: Option<&'a str>,
    sep: u8,
}

impl<'a> Splitter<'a> {
    fn new(s: &'a str, sep: u8) -> Self {
        Splitter { rest: Some(s), sep }
    }
}

impl<'a> Iterator for Splitter<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let s = self.rest?;
        let b = s.as_bytes();
        let mut in_quote = false;
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'\\' => i += 1,
                b'"' => in_quote = !in_quote,
                c if c == self.sep && !in_quote => {
                    self.rest = Some(&s[i + 1..]);
                    return Some(&s[..i]);
                }
                _ => {}
            }
            i += 1;
        }
        self.rest = None;
        Some(s)
    }
}

/// Key and value at the first unescaped `=`.
fn split_key_value(s: &str) -> Option<(&str, &str)> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'=' => return Some((&s[..i], &s[i + 1..])),
            _ => {}
        }
        i += 1;
    }
    None
}

/// Removes the backslash of `\,` `\=` `\ ` (and `\\`); any other backslash stays.
fn unescape(s: &str) -> Cow<'_, str> {
    if !s.contains('\\') {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && matches!(b.get(i + 1), Some(b',' | b'=' | b' ' | b'\\')) {
            // Both bytes are ASCII, so the slices fall on char boundaries.
            out.push_str(&s[start..i]);
            start = i + 1;
            i += 2;
            continue;
        }
        i += 1;
    }
    out.push_str(&s[start..]);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::assemble::mutate;
    use crate::rng::Rng;

    /// (stream, metric, value, timestamp) of one sample.
    type Row = (String, String, f64, f64);

    /// The topic of the tests' non-batch and batch messages (not read).
    const TOPIC: &str = "telegraf/n1/m";

    fn dec() -> TelegrafDecoder {
        TelegrafConfig::default().build()
    }

    /// (stream, metric, value, timestamp) of the samples, and the error reasons.
    fn run(d: &TelegrafDecoder, payload: &str, now: f64) -> (Vec<Row>, Vec<&'static str>) {
        let mut ok = Vec::new();
        let mut errs = Vec::new();
        d.decode(TOPIC, payload.as_bytes(), now, &mut |r: Result<
            Sample<'_>,
            DecodeError,
        >| match r {
            Ok(s) => ok.push((
                s.stream.into_owned(),
                s.metric.into_owned(),
                s.value,
                s.timestamp,
            )),
            Err(e) => errs.push(e.reason()),
        })
        .unwrap();
        (ok, errs)
    }

    /// Samples sorted by (stream, metric): JSON field order depends on serde_json's map.
    fn sorted(mut v: Vec<Row>) -> Vec<Row> {
        v.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        v
    }

    fn s(stream: &str, metric: &str, v: f64, t: f64) -> Row {
        (stream.into(), metric.into(), v, t)
    }

    #[test]
    fn json_single_metric() {
        let msg = r#"{"name": "cpu", "tags": {"host": "n1", "cpu": "cpu-total"},
            "fields": {"usage_idle": 97.5, "usage_user": 1, "up": true, "note": "x"},
            "timestamp": 1700000000}"#;
        let (ok, errs) = run(&dec(), msg, 5.0);
        let ok = sorted(ok);
        assert_eq!(
            ok,
            [
                s("n1", "cpu.up", 1.0, 1.7e9),
                s("n1", "cpu.usage_idle", 97.5, 1.7e9),
                s("n1", "cpu.usage_user", 1.0, 1.7e9),
            ]
        );
        assert_eq!(errs, ["string_field"]);
    }

    /// Telegraf's `layout = "field"` (and homie-v4) publishes one bare value per message;
    /// it used to be refused as "line has no fields", which named neither the layout nor
    /// the settings that work. Whatever `format`, the message names them now.
    #[test]
    fn a_bare_value_names_the_field_layout_and_is_refused() {
        for format in [
            TelegrafFormat::Auto,
            TelegrafFormat::Influx,
            TelegrafFormat::Json,
        ] {
            let d = TelegrafConfig {
                format,
                ..Default::default()
            }
            .build();
            for payload in ["43.251", " 7\n", "-1e3", "true"] {
                let mut items = 0;
                let e = d
                    .decode(TOPIC, payload.as_bytes(), 5.0, &mut |_: Result<
                        Sample<'_>,
                        DecodeError,
                    >| {
                        items += 1
                    })
                    .unwrap_err();
                assert_eq!(items, 0);
                assert_eq!(e, DecodeError::BadPayload(BARE_VALUE), "{payload:?}");
                assert_eq!(e.reason(), "bad_payload");
                let text = e.to_string();
                assert!(
                    text.contains("layout = \"field\"")
                        && text.contains("field_layout_topic")
                        && text.contains("homie-v4"),
                    "{text}"
                );
            }
            // A Homie attribute is named as homie-v4's.
            let e = d
                .decode("homie/n1/$homie", b"4.0", 5.0, &mut |_| {})
                .unwrap_err();
            assert_eq!(e, DecodeError::BadPayload(HOMIE_V4));
        }
        // A line or a JSON metric is not a bare value.
        assert!(!is_bare_value("m,host=a v=1"));
        assert!(!is_bare_value("m v=1"));
        assert!(!is_bare_value(r#"{"v": 1}"#));
        assert!(!is_bare_value("cpu"));
        assert!(!is_bare_value(""));
    }

    /// Telegraf's `topic` default, and the `cpu` tag as a level.
    const DEFAULT_TOPIC: &str = "telegraf/{{ .Hostname }}/{{ .PluginName }}";
    const CPU_TOPIC: &str = r#"telegraf/{{ .Hostname }}/{{ .PluginName }}/{{ .Tag "cpu" }}"#;

    fn field_dec(template: &str, name_tags: &[&str]) -> TelegrafDecoder {
        let cfg = TelegrafConfig {
            field_layout_topic: template.into(),
            name_tags: name_tags.iter().map(|t| (*t).to_owned()).collect(),
            ..Default::default()
        };
        assert_eq!(cfg.validate(), Ok(()));
        cfg.build()
    }

    /// A field-layout message's samples (with their origin text) and item errors.
    type Decoded = (Vec<(Row, String)>, Vec<&'static str>);

    /// (stream, metric, value, time, origin text) of each sample, item errors, or the
    /// message's error.
    fn field_run(d: &TelegrafDecoder, topic: &str, payload: &str) -> Result<Decoded, DecodeError> {
        let mut ok = Vec::new();
        let mut errs = Vec::new();
        d.decode_with_origin(topic, payload.as_bytes(), 50.0, &mut |r, o| match r {
            Ok(s) => ok.push((
                (
                    s.stream.into_owned(),
                    s.metric.into_owned(),
                    s.value,
                    s.timestamp,
                ),
                o.text.to_owned(),
            )),
            Err(e) => errs.push(e.reason()),
        })?;
        Ok((ok, errs))
    }

    /// Telegraf's `layout = "field"` (its `collectField`): the `topic` template's levels,
    /// then the field name; the payload the bare value, no timestamp. With
    /// `field_layout_topic` the topic names the stream and the metric, the receive time
    /// stamps it, booleans are 0/1 and string fields are refused as in the other layouts.
    #[test]
    fn field_layout_values_are_named_from_the_topic() {
        let d = field_dec(DEFAULT_TOPIC, &[]);
        let one = |topic: &str, payload: &str| field_run(&d, topic, payload).unwrap();
        assert_eq!(
            one("telegraf/n1/cpu/usage_user", "12.5"),
            (
                vec![(s("n1", "cpu.usage_user", 12.5, 50.0), "host=n1".into())],
                vec![]
            )
        );
        assert_eq!(
            one("telegraf/n2/mem/used", "1024\n").0[0].0,
            s("n2", "mem.used", 1024.0, 50.0)
        );
        assert_eq!(
            one("telegraf/n1/net/up", "true").0[0].0,
            s("n1", "net.up", 1.0, 50.0)
        );
        assert_eq!(
            one("telegraf/n1/net/up", "false").0[0].0,
            s("n1", "net.up", 0.0, 50.0)
        );
        assert_eq!(
            one("telegraf/n1/x/neg", "-1e3").0[0].0,
            s("n1", "x.neg", -1000.0, 50.0)
        );
        // String fields are refused as today's are; NaN as a non-finite value.
        assert_eq!(
            one("telegraf/n1/system/uptime_format", "1 day, 2:03"),
            (vec![], vec!["string_field"])
        );
        assert_eq!(
            one("telegraf/n1/proc/state", "running"),
            (vec![], vec!["string_field"])
        );
        assert_eq!(one("telegraf/n1/x/v", "NaN"), (vec![], vec!["non_finite"]));
        // Without a receive time there is no timestamp.
        let mut errs = Vec::new();
        d.decode("telegraf/n1/cpu/u", b"1", f64::NAN, &mut |r| {
            errs.push(r.unwrap_err().reason())
        })
        .unwrap();
        assert_eq!(errs, ["timestamp_missing"]);
        // Line protocol and JSON on the same subscription are still read as before.
        assert_eq!(
            one("telegraf/n1/cpu", "cpu,host=n3 u=1 10").0[0].0,
            s("n3", "cpu.u", 1.0, 10.0)
        );
        assert_eq!(
            one(
                "telegraf/n1/m",
                r#"{"name":"m","tags":{"host":"n4"},"fields":{"v":2},"timestamp":10}"#
            )
            .0[0]
                .0,
            s("n4", "m.v", 2.0, 10.0)
        );
    }

    /// A topic that does not fit the template (another prefix, too many or too few
    /// levels, an empty level) is refused as a whole, as `bad_topic`, naming the option.
    #[test]
    fn field_layout_topics_that_do_not_fit_are_refused() {
        let d = field_dec(DEFAULT_TOPIC, &[]);
        for topic in [
            "other/n1/cpu/usage_user",
            "telegraf/n1/cpu",
            "telegraf/n1/cpu/cpu0/usage_user",
            "telegraf/n1/cpu/",
            "telegraf//cpu/u",
            "telegraf/n1",
            "",
            "a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q/r/s/t",
        ] {
            let e = field_run(&d, topic, "1").unwrap_err();
            assert_eq!(e, DecodeError::BadTopic(TOPIC_MISMATCH), "{topic:?}");
            assert_eq!(e.reason(), "bad_topic");
            assert!(e.to_string().contains("field_layout_topic"), "{e}");
        }
        // A Homie attribute on a fitting topic is named as homie-v4's, never a field.
        assert_eq!(
            field_run(&d, "telegraf/n1/cpu/$name", "cpu").unwrap_err(),
            DecodeError::BadPayload(HOMIE_V4)
        );
    }

    /// Tag levels name the metric through `name_tags`, exactly as tags in the payload do,
    /// and make its origin; a level Telegraf left out (the metric lacks the tag) is told
    /// from the level count where that is unambiguous, and refused where it is not.
    #[test]
    fn field_layout_tag_levels_feed_name_tags_and_may_be_left_out() {
        let d = field_dec(CPU_TOPIC, &["cpu"]);
        let one = |topic: &str| field_run(&d, topic, "3").unwrap().0;
        assert_eq!(
            one("telegraf/n1/cpu/cpu0/usage_user"),
            [(
                s("n1", "cpu.cpu0.usage_user", 3.0, 50.0),
                "host=n1,cpu=cpu0".into()
            )]
        );
        assert_eq!(
            one("telegraf/n1/cpu/cpu-total/usage_user")[0].0.1,
            "cpu.cpu-total.usage_user"
        );
        // mem has no cpu tag: Telegraf leaves the level out.
        assert_eq!(
            one("telegraf/n1/mem/used"),
            [(s("n1", "mem.used", 3.0, 50.0), "host=n1".into())]
        );
        // The same names as line protocol gives with the same name_tags.
        let line = TelegrafConfig {
            name_tags: vec!["cpu".into()],
            ..Default::default()
        }
        .build();
        assert_eq!(
            run(&line, "cpu,host=n1,cpu=cpu0 usage_user=3", 50.0).0,
            [one("telegraf/n1/cpu/cpu0/usage_user")[0].0.clone()]
        );
        // Without name_tags the tag level is read and left out of the name.
        let plain = field_dec(CPU_TOPIC, &[]);
        assert_eq!(
            field_run(&plain, "telegraf/n1/cpu/cpu0/usage_user", "1")
                .unwrap()
                .0[0]
                .0
                .1,
            "cpu.usage_user"
        );
        // Another stream tag: the stream is that tag's level, and the host is a tag.
        let cfg = TelegrafConfig {
            field_layout_topic: r#"site/{{ .Tag "rack" }}/+/{{ .PluginName }}/{{ .Hostname }}"#
                .into(),
            stream_tag: "rack".into(),
            name_tags: vec!["host".into()],
            ..Default::default()
        };
        assert_eq!(cfg.validate(), Ok(()));
        assert_eq!(
            field_run(&cfg.build(), "site/r7/anything/disk/n9/free", "2")
                .unwrap()
                .0,
            [(s("r7", "disk.n9.free", 2.0, 50.0), "rack=r7,host=n9".into())]
        );
        // Two optional tag levels and one missing: which one cannot be told.
        let two = field_dec(
            r#"telegraf/{{ .Hostname }}/{{ .PluginName }}/{{ .Tag "cpu" }}/{{ .Tag "device" }}"#,
            &["cpu", "device"],
        );
        assert_eq!(
            field_run(&two, "telegraf/n1/x/a/v", "1").unwrap_err(),
            DecodeError::BadTopic(TOPIC_AMBIGUOUS)
        );
        assert_eq!(
            field_run(&two, "telegraf/n1/x/a/b/v", "1").unwrap().0[0]
                .0
                .1,
            "x.a.b.v"
        );
        assert_eq!(
            field_run(&two, "telegraf/n1/x/v", "1").unwrap().0[0].0.1,
            "x.v"
        );
        // A fixed level after an optional one anchors it.
        let anchored = field_dec(
            r#"telegraf/{{ .Hostname }}/{{ .PluginName }}/{{ .Tag "cpu" }}/data/{{ .Tag "device" }}"#,
            &["cpu", "device"],
        );
        assert_eq!(
            field_run(&anchored, "telegraf/n1/x/data/sda/v", "1")
                .unwrap()
                .0[0]
                .0
                .1,
            "x.sda.v"
        );
        assert_eq!(
            field_run(&anchored, "telegraf/n1/x/c1/data/v", "1")
                .unwrap()
                .0[0]
                .0
                .1,
            "x.c1.v"
        );
    }

    /// A field-layout message is told by its topic, not its payload: a string field whose
    /// text has `=` (or starts like JSON) on a topic that fits the template is a string
    /// field. It used to be read as line protocol and refused as `missing_stream`, with
    /// advice to set `stream_tag`.
    #[test]
    fn a_string_field_with_equals_on_a_field_topic_is_a_string_field() {
        let d = field_dec(DEFAULT_TOPIC, &[]);
        for text in ["key=value text", "a=1", r#"{"k": "v"}"#, "[x=1]", "sys x=1"] {
            assert_eq!(
                field_run(&d, "telegraf/h1/system/descr", text),
                Ok((vec![], vec!["string_field"])),
                "{text:?}"
            );
        }
        // A metric of the topic is still a metric: Telegraf's non-batch topic from a
        // template with a tag level fits the field template with the tag left out
        // (`cpu0` taken for the field), and its payload names the topic's measurement.
        let d = field_dec(CPU_TOPIC, &[]);
        let line = "cpu,cpu=cpu0,host=h1 usage_user=1.5 1700000000000000000";
        let json = r#"{"fields":{"usage_user":1.5},"name":"cpu","tags":{"cpu":"cpu0","host":"h1"},"timestamp":1700000000}"#;
        for payload in [line, json] {
            let (rows, errs) = field_run(&d, "telegraf/h1/cpu/cpu0", payload).unwrap();
            assert_eq!(errs, Vec::<&str>::new(), "{payload}");
            assert_eq!(
                rows.iter().map(|(r, _)| r.clone()).collect::<Vec<_>>(),
                [s("h1", "cpu.usage_user", 1.5, 1.7e9)],
                "{payload}"
            );
        }
        // A topic too short for the template is read by its payload, as before.
        let (rows, _) = field_run(&d, "telegraf/h1", "mem,host=h1 used=3 1700000000").unwrap();
        assert_eq!(rows[0].0, s("h1", "mem.used", 3.0, 1.7e9));
        // The topic decides even where the payload names another of its levels' words.
        assert_eq!(
            field_run(&d, "telegraf/h1/system/cpu0/descr", "key=value text"),
            Ok((vec![], vec!["string_field"]))
        );
        // Text that is no metric, on a topic that does not fit, is still `bad_topic`.
        assert_eq!(
            field_run(&d, "other/h1", "hello"),
            Err(DecodeError::BadTopic(TOPIC_MISMATCH))
        );
        assert!(!d.field_topic.as_ref().unwrap().fits("telegraf/$h/cpu/x"));
        assert!(is_metric_of(r"c\ pu,h=1 v=1", r"t/c\ pu"));
        assert!(!is_metric_of("key=value text", "t/key=value"));
    }

    /// Telegraf 1.35 spells `{{ .Hostname }}` `{{ .Tag "host" }}` and `{{ .PluginName }}`
    /// `{{ .Name }}`; both are read. A host level is left out like any tag (a metric
    /// without a host, `omit_hostname`) where it is not the stream.
    #[test]
    fn newer_template_spellings_and_a_missing_host_are_read() {
        let d = field_dec(r#"telegraf/{{ .Tag "host" }}/{{ .Name }}"#, &[]);
        assert_eq!(
            field_run(&d, "telegraf/n1/mem/used", "3"),
            Ok((
                vec![(s("n1", "mem.used", 3.0, 50.0), "host=n1".into())],
                vec![]
            ))
        );
        let d = TelegrafConfig {
            field_layout_topic: r#"t/{{ .Tag "cluster" }}/{{ .Hostname }}/{{.Name}}"#.into(),
            stream_tag: "cluster".into(),
            ..Default::default()
        }
        .build();
        assert_eq!(
            field_run(&d, "t/c1/mem/used", "3"),
            Ok((
                vec![(s("c1", "mem.used", 3.0, 50.0), "cluster=c1".into())],
                vec![]
            ))
        );
        assert_eq!(
            field_run(&d, "t/c1/h1/mem/used", "4"),
            Ok((
                vec![(s("c1", "mem.used", 4.0, 50.0), "cluster=c1,host=h1".into())],
                vec![]
            ))
        );
    }

    /// Telegraf's MQTT output drops the empty levels of its rendered topic and, since
    /// influxdata/telegraf#14582 (January 2024), keeps a leading '/' (plugins/outputs/mqtt/mqtt.go, `generateTopic`). A template
    /// with empty levels is read as Telegraf renders it, and a topic's leading '/' is read
    /// whether or not Telegraf kept it. Such templates used to be refused.
    #[test]
    fn empty_levels_and_a_leading_slash_are_read_as_telegraf_publishes_them() {
        let parse = |t: &str| FieldTopic::parse(t, "host").unwrap();
        // Doubled and trailing '/' are dropped: the same template as without them.
        assert_eq!(
            parse("telegraf//{{ .Hostname }}/{{ .PluginName }}/"),
            parse(DEFAULT_TOPIC)
        );
        let slash = parse("/telegraf/{{ .Hostname }}/{{ .PluginName }}");
        assert!(slash.leading_slash && !parse(DEFAULT_TOPIC).leading_slash);
        assert_eq!(slash.levels, parse(DEFAULT_TOPIC).levels);
        assert_eq!(slash.filter(), "/telegraf/#");

        let d = field_dec("/telegraf/{{ .Hostname }}/{{ .PluginName }}", &[]);
        let want = Ok((
            vec![(s("n1", "cpu.usage_user", 2.5, 50.0), "host=n1".into())],
            vec![],
        ));
        // Telegraf publishes the empty first level; versions before #14582 drop it.
        assert_eq!(field_run(&d, "/telegraf/n1/cpu/usage_user", "2.5"), want);
        assert_eq!(field_run(&d, "telegraf/n1/cpu/usage_user", "2.5"), want);
        // One empty level more is no topic Telegraf publishes.
        for topic in [
            "//telegraf/n1/cpu/usage_user",
            "/telegraf//n1/cpu/usage_user",
            "/telegraf/n1/cpu/",
            "/",
        ] {
            assert_eq!(
                field_run(&d, topic, "1"),
                Err(DecodeError::BadTopic(TOPIC_MISMATCH)),
                "{topic:?}"
            );
        }
        // A first level that is a tag the metric lacks renders as a leading '/' too.
        let site = field_dec(
            r#"{{ .Tag "site" }}/telegraf/{{ .Hostname }}/{{ .PluginName }}"#,
            &[],
        );
        assert_eq!(field_run(&site, "/telegraf/n1/cpu/usage_user", "2.5"), want);
        assert_eq!(
            field_run(&site, "s1/telegraf/n1/cpu/usage_user", "2.5"),
            Ok((
                vec![(
                    s("n1", "cpu.usage_user", 2.5, 50.0),
                    "site=s1,host=n1".into()
                )],
                vec![]
            ))
        );

        // Subscriptions: a filter must carry the topics as Telegraf now publishes them.
        let check = |template: &str, filters: &[&str]| {
            TelegrafConfig {
                field_layout_topic: template.into(),
                ..Default::default()
            }
            .check_subscriptions(&filters.iter().map(|f| (*f).to_owned()).collect::<Vec<_>>())
        };
        let slashed = "/telegraf/{{ .Hostname }}/{{ .PluginName }}";
        for ok in [
            &["/telegraf/#"][..],
            &["#"],
            &["/#"],
            &["+/#"],
            &["/telegraf/{node}/#"],
            &["+/telegraf/+/+/+"],
            &["$share/g//telegraf/+/cpu/+"],
        ] {
            assert_eq!(check(slashed, ok), Ok(()), "{ok:?}");
        }
        for bad in [&["telegraf/#"][..], &["/telegraf/+/+"], &["/other/#"]] {
            let (key, why) = check(slashed, bad).unwrap_err();
            assert_eq!(key, "field_layout_topic");
            assert!(
                why.contains("5 levels")
                    && why.contains("leading '/'")
                    && why.contains("\"/telegraf/#\""),
                "{why}"
            );
        }
        // Without a leading '/' in the template, none comes unless a first tag is missing.
        assert!(check(DEFAULT_TOPIC, &["/telegraf/#"]).is_err());
        let site = r#"{{ .Tag "site" }}/telegraf/{{ .Hostname }}/{{ .PluginName }}"#;
        assert_eq!(check(site, &["/telegraf/#"]), Ok(()));
        assert_eq!(check(site, &["s1/telegraf/#"]), Ok(()));
    }

    /// `field_layout_topic` with another input format did nothing, without a word; it is
    /// refused, naming the format.
    #[test]
    fn field_layout_topic_needs_the_telegraf_format() {
        use crate::agent::InputFormat;
        let cfg = TelegrafConfig {
            field_layout_topic: DEFAULT_TOPIC.into(),
            ..Default::default()
        };
        for (format, name) in [(InputFormat::Examon, "examon"), (InputFormat::Raw, "raw")] {
            let (key, why) = cfg.check_format(format).unwrap_err();
            assert_eq!(key, "field_layout_topic");
            assert!(
                why.contains(&format!("format = \"{name}\"")) && why.contains("\"telegraf\""),
                "{why}"
            );
        }
        assert_eq!(cfg.check_format(InputFormat::Telegraf), Ok(()));
        // Configuration loading runs the check (the default format is examon).
        let mut all = crate::config::DarkwatchConfig::default();
        assert_eq!(all.validate(), Ok(()));
        all.telegraf = cfg.clone();
        assert_eq!(all.validate().unwrap_err().0, "telegraf.field_layout_topic");
        assert_eq!(
            TelegrafConfig::default().check_format(InputFormat::Examon),
            Ok(())
        );
    }

    /// Templates that cannot be read are refused at configuration time, naming the fix.
    #[test]
    fn field_layout_topic_is_validated() {
        let err = |template: &str, stream_tag: &str| {
            let cfg = TelegrafConfig {
                field_layout_topic: template.into(),
                stream_tag: stream_tag.into(),
                ..Default::default()
            };
            let (key, why) = cfg.validate().unwrap_err();
            assert_eq!(key, "field_layout_topic");
            // An invalid template reads no bare value.
            assert!(cfg.build().field_topic.is_none());
            why
        };
        let has = |why: String, words: &[&str]| {
            for w in words {
                assert!(why.contains(w), "{w:?} not in {why}");
            }
        };
        has(
            err("telegraf/{{ .Hostname }}", "host"),
            &["no {{ .PluginName }}"],
        );
        has(
            err("telegraf/{{ .PluginName }}", "host"),
            &["no level for the stream", "{{ .Hostname }}"],
        );
        has(
            err(DEFAULT_TOPIC, "rack"),
            &["stream_tag = \"rack\"", "{{ .Tag \"rack\" }}"],
        );
        has(
            err("telegraf/{host}/{measurement}", "host"),
            &["not a placeholder", "{{ .Tag \"key\" }}"],
        );
        has(
            err(
                "telegraf/{{ .Hostname }}/{{ .PluginName }}/{{ .TopicPrefix }}",
                "host",
            ),
            &[
                ".TopicPrefix",
                "topic_prefix",
                "write that value in its place",
            ],
        );
        has(
            err(
                "telegraf/{{ .Tag cpu }}/{{ .Hostname }}/{{ .PluginName }}",
                "host",
            ),
            &["unknown placeholder"],
        );
        has(
            err("telegraf/node-{{ .Hostname }}/{{ .PluginName }}", "host"),
            &["whole level"],
        );
        has(
            err("telegraf/{{ .Hostname }}/{{ .PluginName }}/#", "host"),
            &["# is not read"],
        );
        has(
            err("telegraf/x+/{{ .Hostname }}/{{ .PluginName }}", "host"),
            &["+ stands alone"],
        );
        has(
            err(
                "t/{{ .Hostname }}/{{ .PluginName }}/{{ .PluginName }}",
                "host",
            ),
            &["twice"],
        );
        has(
            err(
                r#"t/{{ .Hostname }}/{{ .PluginName }}/{{ .Tag "host" }}"#,
                "host",
            ),
            &["twice"],
        );
        has(
            err(
                &format!(
                    "{}/{{{{ .Hostname }}}}/{{{{ .PluginName }}}}",
                    ["a"; 15].join("/")
                ),
                "host",
            ),
            &["at most 16"],
        );
        // Accepted: Go's spacing and trim markers, + levels; empty is off.
        for ok in [
            "telegraf/{{.Hostname}}/{{.PluginName}}",
            r#"{{- .Tag "host" -}}/{{ .PluginName }}/+"#,
            // Telegraf 1.35's spellings.
            r#"telegraf/{{ .Tag "host" }}/{{ .Name }}"#,
            "telegraf/{{.Hostname}}/{{.Name}}",
            // Empty levels, dropped as Telegraf drops them.
            "/telegraf/{{ .Hostname }}/{{ .PluginName }}",
            "telegraf//{{ .Hostname }}/{{ .PluginName }}/",
            "",
        ] {
            let cfg = TelegrafConfig {
                field_layout_topic: ok.into(),
                ..Default::default()
            };
            assert_eq!(cfg.validate(), Ok(()), "{ok}");
            assert_eq!(cfg.build().field_topic.is_some(), !ok.is_empty());
        }
        let cfg: TelegrafConfig = serde_json::from_str(
            r#"{"field_layout_topic": "t/{{ .Hostname }}/{{ .PluginName }}"}"#,
        )
        .unwrap();
        assert_eq!(
            cfg.field_layout_topic,
            "t/{{ .Hostname }}/{{ .PluginName }}"
        );
        assert_eq!(TelegrafConfig::default().field_layout_topic, "");
    }

    /// A subscription that cannot carry the template's topics is refused: every bare
    /// value would be missed.
    #[test]
    fn field_layout_topic_must_be_subscribed() {
        let cfg = TelegrafConfig {
            field_layout_topic: CPU_TOPIC.into(),
            ..Default::default()
        };
        let check = |filters: &[&str]| {
            cfg.check_subscriptions(&filters.iter().map(|f| (*f).to_owned()).collect::<Vec<_>>())
        };
        for ok in [
            &["telegraf/#"][..],
            &["#"],
            &["telegraf/{node}/#"],
            &["telegraf/+/+/+"],
            &["telegraf/+/+/+/+"],
            &["+/+/+/+/+"],
            &["$share/g/telegraf/+/cpu/+/+"],
            &["x/y", "telegraf/n1/#"],
        ] {
            assert_eq!(check(ok), Ok(()), "{ok:?}");
        }
        for bad in [
            &["telegraf/+/+"][..],
            &["telegraf/+/+/+/+/+"],
            &["other/#"],
            &["other/+/+/+/+"],
            &["org/+/cluster/+/node/{node}/plugin/+/chnl/data/#"],
        ] {
            let (key, why) = check(bad).unwrap_err();
            assert_eq!(key, "field_layout_topic");
            assert!(
                why.contains("4 to 5 levels") && why.contains("telegraf/#"),
                "{why}"
            );
        }
        // Unset: nothing to check.
        assert_eq!(TelegrafConfig::default().check_subscriptions(&[]), Ok(()));
    }

    #[test]
    fn json_batch_layouts_and_receive_time() {
        let one = r#"{"name": "mem", "tags": {"host": "a"}, "fields": {"used": 5}}"#;
        let two = r#"{"name": "mem", "tags": {"host": "b"}, "fields": {"used": 6, "ok": false}, "timestamp": 10}"#;
        let want = vec![
            s("a", "mem.used", 5.0, 99.0),
            s("b", "mem.ok", 0.0, 10.0),
            s("b", "mem.used", 6.0, 10.0),
        ];
        assert_eq!(
            sorted(run(&dec(), &format!("[{one}, {two}]"), 99.0).0),
            want
        );
        assert_eq!(
            sorted(run(&dec(), &format!("{{\"metrics\": [{one}, {two}]}}"), 99.0).0),
            want
        );
        // Milliseconds and another stream tag.
        let cfg = TelegrafConfig {
            json_timestamp_units: Precision::Millis,
            stream_tag: "cpu".into(),
            ..Default::default()
        };
        let msg = r#"{"name": "c", "tags": {"cpu": "0"}, "fields": {"x": 1}, "timestamp": 1500}"#;
        assert_eq!(run(&cfg.build(), msg, 0.0).0, [s("0", "c.x", 1.0, 1.5)]);
    }

    /// Telegraf's `json_timestamp_units` may be `1ms` (or `1us`, `1ns`): by default each
    /// timestamp's unit is told by its size, as ExaMon's are. Read as seconds, a
    /// millisecond stamp lay 54,000 years ahead and every sample was refused as `future`.
    #[test]
    fn json_timestamp_units_are_told_by_size_unless_configured() {
        let msg = |ts: &str| {
            format!(
                r#"{{"name": "m", "tags": {{"host": "h"}}, "fields": {{"v": 1}}, "timestamp": {ts}}}"#
            )
        };
        for ts in [
            "1700000000",
            "1700000000.5",
            "1700000000000",
            "1700000000000000",
            "1700000000000000000",
        ] {
            let (ok, errs) = run(&dec(), &msg(ts), 0.0);
            assert_eq!(errs, Vec::<&str>::new(), "{ts}");
            assert!((ok[0].3 - 1.7e9).abs() <= 0.5, "{ts}: {}", ok[0].3);
        }
        // A unit named in the configuration wins, and `auto` can be named too.
        for (units, ts, want) in [
            ("\"s\"", "1700000000000", 1.7e12),
            ("\"ms\"", "1700000000", 1.7e6),
            ("\"auto\"", "1700000000000", 1.7e9),
        ] {
            let cfg: TelegrafConfig =
                serde_json::from_str(&format!(r#"{{"json_timestamp_units": {units}}}"#)).unwrap();
            assert_eq!(run(&cfg.build(), &msg(ts), 0.0).0[0].3, want, "{units}");
        }
        assert_eq!(
            TelegrafConfig::default().json_timestamp_units,
            Precision::Auto
        );
        // `json_timestamp_format` writes strings: RFC 3339 (Go's RFC3339 and RFC3339Nano
        // layouts) and ISO 8601 are read; other layouts, and a time before 1970, are refused.
        for (ts, want) in [
            ("\"2023-11-14T22:13:20Z\"", 1_700_000_000.0),
            ("\"2023-11-14T23:13:20.5+01:00\"", 1_700_000_000.5),
            ("\"2023-11-14 22:13:20\"", 1_700_000_000.0),
        ] {
            let (ok, errs) = run(&dec(), &msg(ts), 0.0);
            assert_eq!(errs, Vec::<&str>::new(), "{ts}");
            assert_eq!(ok[0].3, want, "{ts}");
        }
        for ts in [
            "\"Nov 14 22:13:20\"",
            "\"1969-12-31T00:00:00Z\"",
            "\"\"",
            "true",
        ] {
            assert_eq!(run(&dec(), &msg(ts), 0.0).1, ["timestamp_invalid"], "{ts}");
        }
        // Line protocol tells each timestamp's unit by its size by default (an operator's
        // trial: Telegraf's `precision = "1ms"` lines were read as nanoseconds, so 1970);
        // a unit named in the configuration wins.
        for ts in ["1700000000", "1700000000000", "1700000000000000000"] {
            assert_eq!(
                run(&dec(), &format!("m,host=h v=1 {ts}"), 0.0).0,
                [s("h", "m.v", 1.0, 1.7e9)],
                "{ts}"
            );
        }
        let ns = TelegrafConfig {
            line_precision: Precision::Nanos,
            ..Default::default()
        };
        let ns = run(&ns.build(), "m,host=h v=1 1700000000000", 0.0).0[0].3;
        assert!((ns - 1700.0).abs() < 1e-6, "{ns}");
    }

    #[test]
    fn line_protocol_with_escapes_types_and_several_lines() {
        let msg = "# comment\n\
            cpu,host=n1,cpu=cpu-total usage_idle=97.5,n=3i,u=7u,ok=t,off=F,msg=\"a, b=c d\" 1700000000000000000\r\n\
            \n\
            my\\ meas\\,x,host=rack\\ 1\\,a\\=b f\\=k=2 1700000001000000000\n\
            disk,host=n2 free=1e3";
        let (ok, errs) = run(&dec(), msg, 42.0);
        assert_eq!(
            ok,
            [
                s("n1", "cpu.usage_idle", 97.5, 1.7e9),
                s("n1", "cpu.n", 3.0, 1.7e9),
                s("n1", "cpu.u", 7.0, 1.7e9),
                s("n1", "cpu.ok", 1.0, 1.7e9),
                s("n1", "cpu.off", 0.0, 1.7e9),
                s("rack 1,a=b", "my meas,x.f=k", 2.0, 1_700_000_001.0),
                s("n2", "disk.free", 1000.0, 42.0),
            ]
        );
        assert_eq!(errs, ["string_field"]);
        let cfg = TelegrafConfig {
            line_precision: Precision::Seconds,
            format: TelegrafFormat::Influx,
            ..Default::default()
        };
        assert_eq!(
            run(&cfg.build(), "m,host=h v=1 1700000000", 0.0).0,
            [s("h", "m.v", 1.0, 1.7e9)]
        );
    }

    /// `name_tags` puts the values of those tags, in the configured order, between the
    /// measurement and the field, in JSON and line protocol alike (escapes undone); a tag
    /// a metric lacks adds nothing, and without `name_tags` the names are as before.
    #[test]
    fn name_tags_name_per_core_and_per_device_metrics() {
        let cfg = TelegrafConfig {
            name_tags: vec!["cpu".into(), "device".into()],
            ..Default::default()
        };
        let d = cfg.build();
        let json = r#"[{"name": "cpu", "tags": {"host": "n1", "cpu": "cpu0"}, "fields": {"usage_user": 1}, "timestamp": 10},
            {"name": "cpu", "tags": {"host": "n1", "cpu": "cpu-total"}, "fields": {"usage_user": 2}, "timestamp": 10},
            {"name": "diskio", "tags": {"host": "n1", "device": "nvme0n1", "cpu": ""}, "fields": {"reads": 3}, "timestamp": 10},
            {"name": "mem", "tags": {"host": "n1"}, "fields": {"used": 4}, "timestamp": 10}]"#;
        assert_eq!(
            run(&d, json, 0.0),
            (
                vec![
                    s("n1", "cpu.cpu0.usage_user", 1.0, 10.0),
                    s("n1", "cpu.cpu-total.usage_user", 2.0, 10.0),
                    s("n1", "diskio.nvme0n1.reads", 3.0, 10.0),
                    s("n1", "mem.used", 4.0, 10.0),
                ],
                vec![]
            )
        );
        // Line protocol: tag order on the line does not matter, the configured one does;
        // escaped values are unescaped.
        let lines = "cpu,host=n1,cpu=cpu1 usage_user=1,usage_system=2 10\n\
            x,device=sd\\ a,host=n1,cpu=c\\,1 v=3 10\n\
            mem,host=n1 used=4 10";
        assert_eq!(
            run(&d, lines, 0.0).0,
            [
                s("n1", "cpu.cpu1.usage_user", 1.0, 10.0),
                s("n1", "cpu.cpu1.usage_system", 2.0, 10.0),
                s("n1", "x.c,1.sd a.v", 3.0, 10.0),
                s("n1", "mem.used", 4.0, 10.0),
            ]
        );
        // Default: today's names.
        assert_eq!(
            run(&dec(), "cpu,host=n1,cpu=cpu1 usage_user=1 10", 0.0).0,
            [s("n1", "cpu.usage_user", 1.0, 10.0)]
        );
        let cfg: TelegrafConfig = serde_json::from_str(r#"{"name_tags": ["cpu"]}"#).unwrap();
        assert_eq!(cfg.name_tags, ["cpu"]);
        assert!(TelegrafConfig::default().name_tags.is_empty());
    }

    /// Each sample's origin is its metric's tag set: the same hash in any tag order and
    /// in either format, another for another tag set; the text is the tags as written.
    #[test]
    fn origins_tell_tag_sets_apart_in_any_order() {
        let origins = |payload: &str| {
            let mut got = Vec::new();
            dec()
                .decode_with_origin(TOPIC, payload.as_bytes(), 1.0, &mut |r, o| {
                    assert!(r.is_ok());
                    got.push((o.hash, o.text.to_owned()));
                })
                .unwrap();
            got
        };
        let a = origins("cpu,cpu=cpu0,host=n1 u=1 10");
        let b = origins("cpu,host=n1,cpu=cpu0 u=1 10");
        let c = origins("cpu,cpu=cpu1,host=n1 u=1 10");
        let j = origins(r#"{"name":"cpu","tags":{"host":"n1","cpu":"cpu0"},"fields":{"u":1}}"#);
        assert_eq!(a[0], (a[0].0, "cpu=cpu0,host=n1".to_owned()));
        assert_eq!(b[0].1, "host=n1,cpu=cpu0");
        assert_eq!((a[0].0, j[0].0), (b[0].0, b[0].0));
        assert_eq!(j[0].1, "cpu=cpu0,host=n1");
        assert_ne!(a[0].0, c[0].0);
        assert_ne!(a[0].0, 0);
        // No tags but the stream's: still tracked (one tag set).
        assert_ne!(origins("mem,host=n1 used=1 10")[0].0, 0);
    }

    #[test]
    fn every_error_reason() {
        let d = dec();
        let whole = |p: &[u8]| d.decode(TOPIC, p, 0.0, &mut |_| {}).unwrap_err().reason();
        assert_eq!(whole(b"\xff"), "not_utf8");
        assert_eq!(whole(b"{\"name\": "), "bad_payload");
        assert_eq!(whole(b"{\"metrics\": 3}"), "bad_payload");
        assert_eq!(whole(b"[1"), "bad_payload");
        let small = TelegrafConfig {
            max_payload_bytes: 4,
            ..Default::default()
        }
        .build();
        assert_eq!(
            small
                .decode(TOPIC, b"m,host=h v=1", 0.0, &mut |_| {})
                .unwrap_err(),
            DecodeError::TooLarge { len: 12, max: 4 }
        );
        let items = |p: &str, now: f64| run(&d, p, now).1;
        assert_eq!(items("m,host=h v=1", f64::NAN), ["timestamp_missing"]);
        assert_eq!(
            items(
                r#"{"name":"m","tags":{"host":"h"},"fields":{"v":1}}"#,
                f64::NAN
            ),
            ["timestamp_missing"]
        );
        assert_eq!(items("m,host=h v=1 soon", 0.0), ["timestamp_invalid"]);
        assert_eq!(items("m,host=h v=1 -5", 0.0), ["timestamp_invalid"]);
        assert_eq!(
            items(
                r#"{"name":"m","tags":{"host":"h"},"fields":{"v":1},"timestamp":"x"}"#,
                0.0
            ),
            ["timestamp_invalid"]
        );
        assert_eq!(items("m,cpu=0 v=1", 0.0), ["missing_stream"]);
        assert_eq!(items("m,host= v=1", 0.0), ["missing_stream"]);
        assert_eq!(
            items(r#"{"name":"m","tags":{},"fields":{"v":1}}"#, 0.0),
            ["missing_stream"]
        );
        assert_eq!(
            items("m,host=h v=abc,w=1.5x,z=12i3", 0.0),
            ["non_numeric"; 3]
        );
        assert_eq!(
            items(
                r#"[{"name":"m","tags":{"host":"h"},"fields":{"v":null,"w":[1]}}]"#,
                0.0
            ),
            ["non_numeric"; 2]
        );
        assert_eq!(
            items("m,host=h v=NaN,w=inf,x=-Infinity", 0.0),
            ["non_finite"; 3]
        );
        assert_eq!(items("m,host=h s=\"x\"", 0.0), ["string_field"]);
        assert_eq!(items("m,host=h", 0.0), ["bad_payload"]);
        assert_eq!(items("m,host=h ", 0.0), ["bad_payload"]);
        assert_eq!(items(",host=h v=1", 0.0), ["bad_payload"]);
        assert_eq!(items("m,host v=1", 0.0), ["bad_payload"]);
        assert_eq!(items("m,host=h v=\"abc", 0.0), ["bad_payload"]);
        assert_eq!(items("m,host=h v", 0.0), ["bad_payload"]);
        assert_eq!(items("[3]", 0.0), ["bad_payload"]);
        assert_eq!(
            items(r#"{"tags":{"host":"h"},"fields":{"v":1}}"#, 0.0),
            ["bad_payload"]
        );
        assert_eq!(
            items(r#"{"name":"m","tags":{"host":"h"}}"#, 0.0),
            ["bad_payload"]
        );
        // A bad line does not stop the next one.
        let (ok, errs) = run(&d, "bad\nm,host=h v=1 1700000000000000000", 0.0);
        assert_eq!(
            (ok, errs),
            (vec![s("h", "m.v", 1.0, 1.7e9)], vec!["bad_payload"])
        );
    }

    #[test]
    fn config_serde() {
        let cfg: TelegrafConfig =
            serde_json::from_str(r#"{"format": "influx", "line_precision": "ms"}"#).unwrap();
        assert_eq!(cfg.format, TelegrafFormat::Influx);
        assert_eq!(cfg.line_precision, Precision::Millis);
        assert_eq!(cfg.stream_tag, "host");
        assert!(serde_json::from_str::<TelegrafConfig>(r#"{"hosttag": "x"}"#).is_err());
    }

    #[test]
    fn fuzzed_payloads_never_panic() {
        let mut rng = Rng::new(0x7E1E);
        let alphabet = b"m,host=h v=1.5i ut\"\\ \n#{}[]:\"namefieldstags0123456789e-.\xff\xc3\xa9";
        let valid: [&[u8]; 3] = [
            b"cpu,host=n1,cpu=c\\ 0 usage=97.5,n=3i,s=\"a b\",ok=t 1700000000000000000\nmem,host=n1 used=5u",
            br#"{"name": "cpu", "tags": {"host": "n1"}, "fields": {"a": 1.5, "b": true, "c": "x"}, "timestamp": 1700000000}"#,
            br#"{"metrics": [{"name": "m", "tags": {"host": "a"}, "fields": {"v": 1}}]}"#,
        ];
        let decoders = [
            dec(),
            TelegrafConfig {
                format: TelegrafFormat::Influx,
                ..Default::default()
            }
            .build(),
            TelegrafConfig {
                format: TelegrafFormat::Json,
                field_layout_topic: CPU_TOPIC.into(),
                ..Default::default()
            }
            .build(),
        ];
        let check = |d: &TelegrafDecoder, p: &[u8]| {
            let _ = d.decode(TOPIC, p, 1.0, &mut |r: Result<Sample<'_>, DecodeError>| {
                if let Ok(s) = r {
                    assert!(s.value.is_finite() && s.timestamp.is_finite());
                }
            });
        };
        for i in 0..20_000 {
            let payload: Vec<u8> = match rng.below(3) {
                0 => (0..rng.below(120))
                    .map(|_| alphabet[rng.below(alphabet.len())])
                    .collect(),
                1 => (0..rng.below(120)).map(|_| rng.next_u64() as u8).collect(),
                _ => {
                    let base = valid[rng.below(valid.len())];
                    mutate(&mut rng, base)
                }
            };
            check(&decoders[i % 3], &payload);
        }
        for p in valid {
            for n in 0..=p.len() {
                for d in &decoders {
                    check(d, &p[..n]);
                }
            }
        }
        // Deep nesting hits serde_json's recursion limit, not the stack.
        check(&decoders[0], "[".repeat(100_000).as_bytes());
        // Field layout: random topics (levels from a small set, so that some fit) and
        // bare values; every sample has a stream, a measurement and a field.
        let d = &decoders[2];
        let words = ["telegraf", "n1", "cpu", "cpu0", "", "$name", "+", "u", "é"];
        let values = ["1", "-2.5e3", "true", "x", "", "NaN", "1 2"];
        for _ in 0..20_000 {
            let topic = (0..rng.below(8))
                .map(|_| words[rng.below(words.len())])
                .collect::<Vec<_>>()
                .join("/");
            let value = values[rng.below(values.len())];
            let _ = d.decode(&topic, value.as_bytes(), 1.0, &mut |r| {
                if let Ok(s) = r {
                    assert!(s.value.is_finite() && !s.stream.is_empty());
                    assert!(s.metric.split('.').all(|p| !p.is_empty()), "{}", s.metric);
                }
            });
        }
    }
}
