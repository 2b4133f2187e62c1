//! `darkwatch alertmanager`: a bridge from darkwatch's MQTT alert events to Prometheus
//! Alertmanager, which has no MQTT input and takes `POST /api/v2/alerts` (a JSON array of
//! `{labels, annotations, startsAt, endsAt, generatorURL}`).
//!
//! # Delivery: at least once
//!
//! The bridge subscribes at QoS 1 with a persistent session (clean session off, a stable
//! client id), so alerts published while it is down wait in the broker, and it acknowledges
//! an MQTT message (manual PubAcks, in the order received, as MQTT 3.1.1 asks) only once
//! Alertmanager accepted the POST that carried it. A POST that fails to connect, times out
//! or gets a 5xx, or a 4xx that says the request went to the wrong place or was not let
//! in (404, 405, 401, 403, 408, 429…: a wrong `url` or route prefix, a proxy's
//! authentication) is retried with a capped exponential backoff; the messages behind it
//! wait, unacknowledged, until the configuration is mended. Only 400, 413 and 422 judge
//! the alerts themselves and will never succeed: a batch refused with one is split and
//! each alert posted alone, so only the alert Alertmanager refuses is dropped (logged with
//! the response body, counted). Duplicates are possible (a batch accepted just
//! before the connection to the broker broke is delivered again) and harmless: Alertmanager
//! merges alerts by their labels.
//!
//! A PubAck is tied to a connection: a packet id acknowledged on a later connection could
//! name a different message there. So each message carries the connection it came on, and
//! the [`Gate`] lets a PubAck through only on that same connection; the broker re-sends the
//! others on reconnect (it must: persistent session).
//!
//! Messages that are not alerts Alertmanager would take (the retained status topic,
//! garbage, an event with an invalid label name) are counted, logged rate-limited (the
//! first at once, with its topic; see `InvalidLog`) and acknowledged: they never block
//! the queue.
//!
//! # Counts
//!
//! Every message received ends forwarded, refused, ignored, or is still in hand
//! (unacknowledged), and is counted in one of those when its batch is settled, so the
//! counts add up ([`BridgeStats`]). The bridge serves them on `/metrics`
//! (`[alertmanager] metrics_listen`, with [`crate::metrics`]'s responder), in systemd's
//! STATUS and in the final line.
//!
//! # Threads and tasks
//!
//! One current-thread tokio runtime runs the MQTT driver (polls rumqttc's event loop), the
//! forwarder (batches, posts, acknowledges), the systemd watchdog pings, and once at the
//! start the check of Alertmanager's status (`GET <url>/api/v2/status`, only logged). The
//! `/metrics` responder has its own thread.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, Packet, Publish, QoS, SubscribeFilter};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tracing::{debug, error, info, warn};

use crate::agent::LatencyBuckets;
use crate::alert::{ENDS_AT_UNSET, rfc3339_utc};
use crate::config::DarkwatchConfig;
use crate::mqtt::{BrokerMode, ClientStop, MqttConfig, RateLimit, Reconnect};
use crate::systemd::Notifier;

/// First retry delay of a failed POST; doubles up to `retry_max_secs`.
const RETRY_MIN: Duration = Duration::from_millis(500);
/// Most bytes of an Alertmanager response kept (its body goes into the log).
const MAX_RESPONSE_BYTES: usize = 64 << 10;
/// Most bytes of Alertmanager's answer to `GET /api/v2/status` kept: it holds the whole
/// configuration file.
const MAX_STATUS_BYTES: usize = 8 << 20;
/// Most bytes of a response body shown in a log line.
const LOGGED_BODY_CHARS: usize = 500;

/// The `[alertmanager]` section: where `darkwatch alertmanager` posts, what it subscribes
/// to, and how it batches and retries. The broker connection is `[mqtt]`'s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertmanagerConfig {
    /// Alertmanager's base URL (`http://host:port`, with its `--web.route-prefix` path if it
    /// has one); the bridge posts to `<url>/api/v2/alerts`. `https://` needs `ca_file`.
    pub url: String,
    /// Topic filters of darkwatch alert events, subscribed at QoS 1. `{node}` is `[mqtt]
    /// node_name` (or the hostname): `darkwatch/{node}/alerts/#` for a bridge beside each
    /// agent, the default `darkwatch/+/alerts/#` for one bridge per cluster.
    #[serde(deserialize_with = "crate::config::strings")]
    pub subscribe: Vec<String>,
    /// MQTT client id, the key of the broker's persistent session; empty means
    /// `darkwatch-alertmanager-<node>`. Must differ from the agent's.
    pub client_id: String,
    /// Most alerts in one POST.
    pub batch_max: usize,
    /// A batch is posted this long after its first alert arrived, full or not (ms).
    pub flush_ms: u64,
    /// Limit of one POST: connecting, sending and reading the answer (seconds).
    pub timeout_secs: f64,
    /// Longest wait between retries of a failed POST (seconds); the first is 0.5 s.
    pub retry_max_secs: f64,
    /// PEM CA certificate(s) that signed Alertmanager's certificate; required with
    /// `https://` (for a public CA the system bundle, /etc/ssl/certs/ca-certificates.crt).
    pub ca_file: PathBuf,
    /// `host:port` (an IP address) where the bridge serves Prometheus `/metrics`; empty
    /// turns it off. Its own key, not `[metrics] listen`: the bridge often reads the
    /// agent's file and runs beside it, and two processes cannot listen on one port. The
    /// default is the agent's 9464 plus one.
    pub metrics_listen: String,
}

impl Default for AlertmanagerConfig {
    fn default() -> Self {
        AlertmanagerConfig {
            url: "http://127.0.0.1:9093".into(),
            subscribe: vec!["darkwatch/+/alerts/#".into()],
            client_id: String::new(),
            batch_max: 64,
            flush_ms: 200,
            timeout_secs: 10.0,
            retry_max_secs: 30.0,
            ca_file: PathBuf::new(),
            metrics_listen: "127.0.0.1:9465".into(),
        }
    }
}

impl AlertmanagerConfig {
    /// Semantic checks the types cannot express. Returns the key and the reason.
    ///
    /// # Errors
    /// A URL that [`Target::parse`] refuses, `https` without `ca_file` (or `ca_file` with
    /// `http`), no or an invalid subscribe filter (or one with a `{…}` other than
    /// `{node}`), `batch_max` outside 1..=10000,
    /// `flush_ms` above 60000, `timeout_secs` or `retry_max_secs` not in (0, 3600],
    /// `metrics_listen` neither empty nor an IP address and port.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let target = Target::parse(&self.url).map_err(|r| ("url", r))?;
        if target.https && self.ca_file.as_os_str().is_empty() {
            return Err((
                "ca_file",
                "is required with an https:// url (PEM CA certificates; for a public CA the system bundle, e.g. /etc/ssl/certs/ca-certificates.crt)".into(),
            ));
        }
        if !target.https && !self.ca_file.as_os_str().is_empty() {
            return Err(("ca_file", "is set but `url` is not https://".into()));
        }
        if self.subscribe.is_empty() {
            return Err((
                "subscribe",
                "needs at least one topic filter: the bridge would receive nothing".into(),
            ));
        }
        for filter in &self.subscribe {
            // `{node}` stands for one topic level, as in `[mqtt] subscribe`.
            let probe = filter.replace("{node}", "node");
            crate::mqtt::check_filter(&probe)
                .map_err(|reason| ("subscribe", format!("`{filter}` {reason}")))?;
            // Any other `{…}` would be subscribed as it is and match no alert topic.
            if let Some(bad) = crate::mqtt::unknown_placeholder(&probe) {
                return Err((
                    "subscribe",
                    format!(
                        "`{filter}` has `{bad}`, which is not a placeholder here and would be subscribed as it is (matching no alert topic); subscribe fills in {{node}} only ([mqtt] node_name, or the hostname): use + for any one level, e.g. darkwatch/+/alerts/#"
                    ),
                ));
            }
        }
        if !(1..=10_000).contains(&self.batch_max) {
            return Err((
                "batch_max",
                format!("must be in 1..=10000, got {}", self.batch_max),
            ));
        }
        if self.flush_ms > 60_000 {
            return Err((
                "flush_ms",
                format!("must be at most 60000, got {}", self.flush_ms),
            ));
        }
        for (key, v) in [
            ("timeout_secs", self.timeout_secs),
            ("retry_max_secs", self.retry_max_secs),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 3600.0) {
                return Err((key, format!("must be above 0 and at most 3600, got {v}")));
            }
        }
        if !self.metrics_listen.is_empty()
            && self.metrics_listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err((
                "metrics_listen",
                format!(
                    "\"{}\" is not an IP address and port (e.g. 127.0.0.1:9465, 0.0.0.0:9465 for every IPv4 interface, [::]:9465, or \"\" for no /metrics); host names such as localhost are not resolved",
                    self.metrics_listen
                ),
            ));
        }
        Ok(())
    }

    /// The MQTT client id: `client_id`, or `darkwatch-alertmanager-<node>`.
    pub fn client_id_for(&self, mqtt: &MqttConfig) -> String {
        if self.client_id.is_empty() {
            format!("darkwatch-alertmanager-{}", mqtt.node())
        } else {
            self.client_id.clone()
        }
    }

    /// The subscribe filters with `{node}` filled in.
    pub fn filters_for(&self, mqtt: &MqttConfig) -> Vec<String> {
        let node = mqtt.node();
        self.subscribe
            .iter()
            .map(|f| f.replace("{node}", &node))
            .collect()
    }
}

/// Where the alerts go: parsed from `[alertmanager] url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub https: bool,
    /// Host name or address, without brackets (for TLS's server name and the connect).
    pub host: String,
    pub port: u16,
    /// `Host:` header value.
    pub authority: String,
    /// Request path: `<prefix>/api/v2/alerts`.
    pub path: String,
}

impl Target {
    /// Parses `http[s]://host[:port][/prefix]`. A URL that already ends in
    /// `/api/v2/alerts` is taken as it is.
    ///
    /// # Errors
    /// Another scheme, no host, a bad port, credentials, a query or a fragment.
    pub fn parse(url: &str) -> Result<Target, String> {
        let url = url.trim();
        let (https, rest) = if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else {
            return Err(format!(
                "`{url}` is not an http:// or https:// URL (e.g. http://127.0.0.1:9093)"
            ));
        };
        if rest.contains(['?', '#']) {
            return Err(format!(
                "`{url}` has a query or fragment; give the base URL"
            ));
        }
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(format!(
                "`{url}` has credentials; the bridge sends none (put a proxy that adds them in front of Alertmanager)"
            ));
        }
        let default_port = if https { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("`{url}`: unclosed `[` in the host"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| format!("`{url}`: bad port `{p}`"))?,
                None if after.is_empty() => default_port,
                None => return Err(format!("`{url}`: junk after the host")),
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_string(),
                    p.parse::<u16>()
                        .map_err(|_| format!("`{url}`: bad port `{p}`"))?,
                ),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() || port == 0 {
            return Err(format!("`{url}` has no host or port 0"));
        }
        let prefix = prefix.trim_end_matches('/');
        let path = if prefix.ends_with("/api/v2/alerts") {
            prefix.to_string()
        } else {
            format!("{prefix}/api/v2/alerts")
        };
        Ok(Target {
            https,
            host,
            port,
            authority: authority.to_string(),
            path,
        })
    }
}

impl Target {
    /// `<prefix>/api/v2/status`: Alertmanager's status, beside the alerts.
    pub fn status_path(&self) -> String {
        let prefix = self
            .path
            .strip_suffix("/api/v2/alerts")
            .unwrap_or(&self.path);
        format!("{prefix}/api/v2/status")
    }
}

// ---------------------------------------------------------------------------------------
// Conversion of darkwatch events to Alertmanager's PostableAlert.

/// Why a message is not an alert Alertmanager would take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unfit {
    /// Not a darkwatch alert event at all (not JSON, not an object, no `labels`: the
    /// retained status topic, another publisher's messages): `[alertmanager] subscribe`
    /// reaches topics that are not alerts.
    NotAnEvent(String),
    /// An alert event, but one Alertmanager would refuse (an invalid label name, no valid
    /// `startsAt`…): the subscription is right; the event must be mended where it is made.
    Invalid(String),
}

impl std::fmt::Display for Unfit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unfit::NotAnEvent(why) | Unfit::Invalid(why) => f.write_str(why),
        }
    }
}

/// Why `name` is not a label (or annotation) name Alertmanager accepts
/// (`[a-zA-Z_][a-zA-Z0-9_]*`, its classic names, which every release takes), or `None`.
fn name_problem(name: &str) -> Option<String> {
    let mut chars = name.chars().enumerate();
    match chars.next() {
        None => return Some("it is empty".into()),
        Some((_, c)) if c.is_ascii_digit() => {
            return Some(format!("it starts with the digit `{c}`"));
        }
        _ => {}
    }
    name.chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '_'))
        .map(|(i, c)| format!("it holds {c:?} at character {}", i + 1))
}

/// A JSON scalar as label or annotation text; `None` for null, empty, arrays and objects.
fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A `{name: scalar}` object (`what`: "labels" or "annotations") as text values, or why not.
fn text_map(v: &Value, what: &str) -> Result<BTreeMap<String, String>, Unfit> {
    let Value::Object(map) = v else {
        return Err(Unfit::Invalid(format!("`{what}` is not an object")));
    };
    let one = what.trim_end_matches('s');
    let mut out = BTreeMap::new();
    for (k, v) in map {
        if let Some(problem) = name_problem(k) {
            return Err(Unfit::Invalid(format!(
                "{one} name {k:?} is invalid: {problem}; Alertmanager takes only letters, digits and `_`, not starting with a digit ([a-zA-Z_][a-zA-Z0-9_]*)"
            )));
        }
        if let Some(text) = as_text(v) {
            out.insert(k.clone(), text);
        }
    }
    Ok(out)
}

/// Milliseconds since the epoch of an RFC 3339 time (`YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`),
/// or `None` if it is not one.
pub fn rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        part.iter()
            .all(u8::is_ascii_digit)
            .then(|| part.iter().fold(0i64, |a, &d| a * 10 + i64::from(d - b'0')))
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut ms = 0i64;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        let digits = &b[start..i.min(start + 3)];
        ms = digits
            .iter()
            .fold(0i64, |a, &d| a * 10 + i64::from(d - b'0'))
            * 10i64.pow(3 - digits.len() as u32);
    }
    let offset_min = match b.get(i..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let hh = i64::from(h1.checked_sub(b'0')?) * 10 + i64::from(h2.checked_sub(b'0')?);
            let mm = i64::from(m1.checked_sub(b'0')?) * 10 + i64::from(m2.checked_sub(b'0')?);
            if hh > 23 || mm > 59 {
                return None;
            }
            if *sign == b'+' {
                hh * 60 + mm
            } else {
                -(hh * 60 + mm)
            }
        }
        _ => return None,
    };
    // H. Hinnant's days_from_civil.
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + h * 3600 + mi * 60 + sec) - offset_min * 60) * 1000 + ms)
}

/// Converts one MQTT payload, a darkwatch alert event, into one element of the array
/// Alertmanager's `POST /api/v2/alerts` takes: `labels` (all text), `annotations` (the
/// event's, plus `score`, `threshold`, `peak_score`, `peak_threshold`, `model_version`,
/// `top_features` and `darkwatch_fingerprint` unless it has them), `startsAt`, `endsAt`
/// (omitted for a firing event with Go's zero time, [`ENDS_AT_UNSET`]; for a resolved one
/// without a usable end, `now`), and `generatorURL` when the event has one. `fingerprint`
/// is not sent: Alertmanager derives its own from the labels.
///
/// # Errors
/// [`Unfit::NotAnEvent`]: not a JSON object, or no `labels`. [`Unfit::Invalid`]: no
/// `alertname`, a label or annotation name Alertmanager refuses, no valid `startsAt`, an
/// unknown `status`, or an `endsAt` that is not RFC 3339.
pub fn to_postable(payload: &[u8], now_epoch_secs: f64) -> Result<Value, Unfit> {
    let event: Value =
        serde_json::from_slice(payload).map_err(|_| Unfit::NotAnEvent("not JSON".to_string()))?;
    let Value::Object(event) = event else {
        return Err(Unfit::NotAnEvent("not a JSON object".into()));
    };
    let invalid = |why: String| Unfit::Invalid(why);
    let labels = text_map(
        event.get("labels").ok_or_else(|| {
            Unfit::NotAnEvent("a JSON object without `labels`: not an alert event".into())
        })?,
        "labels",
    )?;
    if !labels.contains_key("alertname") {
        return Err(invalid("`labels` has no `alertname`".into()));
    }
    let mut annotations = match event.get("annotations") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(v) => text_map(v, "annotations")?,
    };
    let resolved = match event.get("status").and_then(Value::as_str) {
        Some("resolved") => true,
        Some("firing") | None => false,
        Some(other) => {
            return Err(invalid(format!(
                "`status` is `{other}`, not firing or resolved"
            )));
        }
    };
    let starts_at = event
        .get("startsAt")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("no `startsAt`".into()))?;
    let start_ms = rfc3339_ms(starts_at)
        .filter(|_| starts_at != ENDS_AT_UNSET)
        .ok_or_else(|| invalid(format!("`startsAt` {starts_at:?} is not an RFC 3339 time")))?;
    let ends_at = match event.get("endsAt") {
        None | Some(Value::Null) => None,
        // Go's zero time, to the millisecond (earlier agents wrote it to the second).
        Some(Value::String(s)) if s.starts_with("0001-01-01T00:00:00") || s.is_empty() => None,
        Some(Value::String(s)) => {
            let ms = rfc3339_ms(s)
                .ok_or_else(|| invalid(format!("`endsAt` {s:?} is not an RFC 3339 time")))?;
            Some((s.clone(), ms))
        }
        Some(_) => return Err(invalid("`endsAt` is not a string".into())),
    };
    let now_ms = (now_epoch_secs * 1e3).round() as i64;
    let ends_at = match (resolved, ends_at) {
        // Alertmanager refuses an end before the start; a resolution must still end it.
        (_, Some((_, ms))) if ms < start_ms => Some(starts_at.to_string()),
        // A resolution stamped in the future (a sender's clock ahead: an operator's trial,
        // 2 minutes) would keep the alert active in Alertmanager until then: it ends now,
        // or at its start if that is later still.
        (true, Some(_)) if now_epoch_secs > 0.0 && (start_ms > now_ms) => {
            Some(starts_at.to_string())
        }
        (true, Some((_, ms))) if now_epoch_secs > 0.0 && ms > now_ms => {
            Some(rfc3339_utc(now_epoch_secs))
        }
        (_, Some((s, _))) => Some(s),
        (true, None) => Some(rfc3339_utc(now_epoch_secs)),
        (false, None) => None,
    };
    // darkwatch's own fields, as text annotations (never replacing the event's own).
    for key in [
        "score",
        "threshold",
        "peak_score",
        "peak_threshold",
        "model_version",
    ] {
        if let Some(text) = event.get(key).and_then(as_text) {
            annotations.entry(key.to_string()).or_insert(text);
        }
    }
    if !labels.contains_key("model_id")
        && let Some(text) = event.get("model_id").and_then(as_text)
    {
        annotations.entry("model_id".into()).or_insert(text);
    }
    if let Some(Value::Array(top)) = event.get("top_features") {
        let named: Vec<String> = top
            .iter()
            .filter_map(|f| {
                let name = f.get("feature").and_then(as_text)?;
                Some(match f.get("contribution").and_then(Value::as_f64) {
                    Some(c) => format!("{name} ({c:.3})"),
                    None => name,
                })
            })
            .collect();
        if !named.is_empty() {
            annotations
                .entry("top_features".into())
                .or_insert(named.join(", "));
        }
    }
    if let Some(fp) = event.get("fingerprint").and_then(as_text) {
        annotations
            .entry("darkwatch_fingerprint".into())
            .or_insert(fp);
    }
    let mut out = Map::new();
    out.insert(
        "labels".into(),
        serde_json::to_value(labels).unwrap_or_default(),
    );
    out.insert(
        "annotations".into(),
        serde_json::to_value(annotations).unwrap_or_default(),
    );
    out.insert("startsAt".into(), Value::String(starts_at.to_string()));
    if let Some(end) = ends_at {
        out.insert("endsAt".into(), Value::String(end));
    }
    if let Some(url) = event
        .get("generatorURL")
        .or_else(|| event.get("generator_url"))
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
    {
        out.insert("generatorURL".into(), Value::String(url.to_string()));
    }
    Ok(Value::Object(out))
}

// ---------------------------------------------------------------------------------------
// HTTP/1.1 POST.

/// What one POST got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// 2xx.
    Accepted,
    /// 400, 413 or 422: Alertmanager judged the alerts themselves; sending the same again
    /// cannot succeed.
    Refused { status: u16, body: String },
    /// No answer, a timeout, a 5xx, any other 4xx (the wrong place, not let in, too
    /// many requests) or anything else: worth a retry.
    Failed(String),
}

/// The status code and body of an HTTP/1.x response, or `None` if `raw` holds none. A
/// chunked body (Go's servers send one for a large answer, such as Alertmanager's status
/// with its whole configuration) is joined.
pub fn parse_response(raw: &[u8]) -> Option<(u16, String)> {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..head_end]).ok()?;
    let status_line = head.lines().next()?;
    let mut parts = status_line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status: u16 = parts.next()?.parse().ok()?;
    let body = &raw[head_end + 4..];
    let body = if is_chunked(head.as_bytes()) {
        dechunk(body).0
    } else {
        body.to_vec()
    };
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Whether a response head says `Transfer-Encoding: chunked`.
fn is_chunked(head: &[u8]) -> bool {
    std::str::from_utf8(head).is_ok_and(|head| {
        head.lines().any(|l| {
            l.split_once(':').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("transfer-encoding")
                    && v.to_ascii_lowercase().contains("chunked")
            })
        })
    })
}

/// A chunked body's chunks joined, and whether it is complete (the last, empty chunk and
/// the trailer section's closing empty line have arrived). A body cut short keeps the part
/// of the chunk it was cut in; a malformed size line ends the body there. Every length is
/// checked against what arrived, so no size line can overflow or loop.
fn dechunk(mut raw: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    while let Some(eol) = find_crlf(raw) {
        let Some(size) = chunk_size(&raw[..eol]) else {
            break;
        };
        let rest = &raw[eol + 2..];
        if size == 0 {
            // Trailer fields, each ending in CRLF, then an empty line.
            let mut trailers = rest;
            while let Some(at) = find_crlf(trailers) {
                if at == 0 {
                    return (out, true);
                }
                trailers = &trailers[at + 2..];
            }
            break;
        }
        if size > rest.len() {
            out.extend_from_slice(rest);
            break;
        }
        out.extend_from_slice(&rest[..size]);
        match rest[size..].strip_prefix(b"\r\n") {
            Some(next) => raw = next,
            None => break,
        }
    }
    (out, false)
}

fn find_crlf(raw: &[u8]) -> Option<usize> {
    raw.windows(2).position(|w| w == b"\r\n")
}

/// A chunk-size line's size: hex digits only (at most 16), before any `;extension`.
fn chunk_size(line: &[u8]) -> Option<usize> {
    let digits = line.split(|&b| b == b';').next()?.trim_ascii();
    if digits.is_empty() || digits.len() > 16 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    usize::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

/// Classifies a status and body.
fn answer(status: u16, body: String) -> Answer {
    match status {
        200..=299 => Answer::Accepted,
        // What Alertmanager answers for alerts it will not take (validation), and for a
        // batch too large (split, each alert goes alone).
        400 | 413 | 422 => Answer::Refused { status, body },
        // The request went to the wrong place or was not let in: every alert would be
        // refused alike, so none is dropped; they wait for the configuration to be mended.
        401 | 403 | 404 | 405 | 407 | 421 => Answer::Failed(format!(
            "HTTP {status}: {} (check [alertmanager] url, its path or route prefix, and any proxy's authentication)",
            shorten(&body)
        )),
        _ => Answer::Failed(format!("HTTP {status}: {}", shorten(&body))),
    }
}

fn shorten(body: &str) -> String {
    let body = body.trim();
    let mut s: String = body.chars().take(LOGGED_BODY_CHARS).collect();
    if s.len() < body.len() {
        s.push('…');
    }
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The Content-Length of a response head, when it has one.
fn content_length(head: &[u8]) -> Option<usize> {
    let head = std::str::from_utf8(head).ok()?;
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    })
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    request: &[u8],
    max: usize,
) -> std::io::Result<Vec<u8>> {
    stream.write_all(request).await?;
    stream.flush().await?;
    let mut raw = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(h) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let complete = match content_length(&raw[..h]) {
                Some(len) => raw.len() - (h + 4) >= len,
                None => is_chunked(&raw[..h]) && dechunk(&raw[h + 4..]).1,
            };
            if complete {
                break;
            }
        }
        if raw.len() >= max {
            break;
        }
    }
    Ok(raw)
}

/// Posts JSON bodies to Alertmanager: one connection per POST (`Connection: close`).
#[derive(Clone)]
pub struct Poster {
    target: Target,
    timeout: Duration,
    /// `[alertmanager] ca_file`, named when Alertmanager's certificate is not trusted.
    ca_file: PathBuf,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
}

impl Poster {
    /// A poster for `cfg`'s URL (its CA file read now, for https).
    ///
    /// # Errors
    /// The key and the reason: a bad URL, an unreadable or empty CA file.
    pub fn new(cfg: &AlertmanagerConfig) -> Result<Poster, (&'static str, String)> {
        let target = Target::parse(&cfg.url).map_err(|r| ("url", r))?;
        let tls = if target.https {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let pem = std::fs::read(&cfg.ca_file).map_err(|e| {
                (
                    "ca_file",
                    format!("{}: cannot read: {e}", cfg.ca_file.display()),
                )
            })?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pemfile::certs(&mut std::io::Cursor::new(&pem)) {
                let cert =
                    cert.map_err(|e| ("ca_file", format!("{}: {e}", cfg.ca_file.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| ("ca_file", format!("{}: {e}", cfg.ca_file.display())))?;
            }
            if roots.is_empty() {
                return Err((
                    "ca_file",
                    format!("{}: no PEM certificate in it", cfg.ca_file.display()),
                ));
            }
            let config = rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let name = rustls::pki_types::ServerName::try_from(target.host.clone())
                .map_err(|e| ("url", format!("`{}`: {e}", target.host)))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        Ok(Poster {
            target,
            timeout: Duration::from_secs_f64(cfg.timeout_secs),
            ca_file: cfg.ca_file.clone(),
            tls,
        })
    }

    /// The URL of Alertmanager's status, for logs.
    pub fn status_url(&self) -> String {
        format!(
            "{}://{}{}",
            if self.target.https { "https" } else { "http" },
            self.target.authority,
            self.target.status_path()
        )
    }

    /// The URL posted to, for logs.
    pub fn url(&self) -> String {
        format!(
            "{}://{}{}",
            if self.target.https { "https" } else { "http" },
            self.target.authority,
            self.target.path
        )
    }

    /// One request, within the timeout: the raw response, or why there is none.
    async fn send(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        max: usize,
    ) -> Result<Vec<u8>, String> {
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: darkwatch/{}\r\n{}Accept: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.target.authority,
            env!("CARGO_PKG_VERSION"),
            if body.is_empty() {
                ""
            } else {
                "Content-Type: application/json\r\n"
            },
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect((self.target.host.as_str(), self.target.port))
                .await?;
            let _ = tcp.set_nodelay(true);
            match &self.tls {
                Some((connector, name)) => {
                    let tls = connector
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(|e| self.handshake_error(e))?;
                    exchange(tls, &request, max).await
                }
                None => exchange(tcp, &request, max).await,
            }
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(raw)) if raw.is_empty() => Err("connection closed without an answer".into()),
            Ok(Ok(raw)) => Ok(raw),
        }
    }

    /// A failed TLS handshake, saying what to mend when Alertmanager's certificate is not
    /// trusted ([`refused_certificate`]).
    fn handshake_error(&self, e: std::io::Error) -> std::io::Error {
        refused_certificate(e, &self.ca_file, &self.target.host)
    }

    /// One POST of `body` (a JSON array), within the timeout.
    pub async fn post(&self, body: &[u8]) -> Answer {
        match self
            .send("POST", &self.target.path, body, MAX_RESPONSE_BYTES)
            .await
        {
            Err(why) => Answer::Failed(why),
            Ok(raw) => match parse_response(&raw) {
                Some((status, body)) => answer(status, body),
                None => Answer::Failed("not an HTTP response".into()),
            },
        }
    }

    /// `GET <url>/api/v2/status`: whether Alertmanager answers at `url`.
    pub async fn status(&self) -> Status {
        let got = match self
            .send("GET", &self.target.status_path(), b"", MAX_STATUS_BYTES)
            .await
        {
            Err(why) => Err(why),
            Ok(raw) => parse_response(&raw).ok_or_else(|| "not an HTTP response".to_string()),
        };
        judge_status(got)
    }
}

/// A failed TLS handshake to Alertmanager at `host` with `ca_file`: when rustls refused
/// the certificate, an error that begins with [`UNTRUSTED`] and says what to mend for
/// that refusal, as rustls's own words (`invalid peer certificate: UnknownIssuer`) do not
/// name the key and the log line would read like a network failure. Any other error is
/// returned as it is.
fn refused_certificate(e: std::io::Error, ca_file: &Path, host: &str) -> std::io::Error {
    let refusal = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(|r| match r {
            rustls::Error::InvalidCertificate(why) => Some(certificate_advice(why, ca_file, host)),
            _ => None,
        });
    match refusal {
        Some(advice) => std::io::Error::other(format!("{UNTRUSTED} ({e}): {advice}")),
        None => e,
    }
}

/// What to mend when rustls refuses Alertmanager's certificate for `why`.
fn certificate_advice(why: &rustls::CertificateError, ca_file: &Path, host: &str) -> String {
    use rustls::CertificateError as E;
    match why {
        E::UnknownIssuer | E::BadSignature => format!(
            "[alertmanager] ca_file ({}) must hold the CA certificate that signed it (and any intermediate certificate Alertmanager does not send)",
            ca_file.display()
        ),
        E::Expired | E::ExpiredContext { .. } => "Alertmanager's certificate has expired: renew it (or this machine's clock is wrong)".into(),
        E::NotValidYet | E::NotValidYetContext { .. } => "Alertmanager's certificate is not valid yet: check this machine's clock (a certificate just issued mends itself at its notBefore; the alerts are retried meanwhile)".into(),
        E::NotValidForName | E::NotValidForNameContext { .. } => format!(
            "the certificate does not name the host of [alertmanager] url ({host}): use a host it names (its subjectAltName)"
        ),
        _ => format!(
            "check Alertmanager's certificate and [alertmanager] ca_file ({})",
            ca_file.display()
        ),
    }
}

/// How a refused Alertmanager certificate's error begins ([`Poster::handshake_error`]);
/// [`judge_status`] tells it from a network failure by it.
const UNTRUSTED: &str = "TLS: Alertmanager's certificate is not trusted";

/// What `GET <url>/api/v2/status` at the start says of `[alertmanager] url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Alertmanager answered: its version and cluster status (`ready`, `settling`,
    /// `disabled`).
    Alertmanager { version: String, cluster: String },
    /// Something answered, but not Alertmanager's API at this path (404, a web page, a
    /// proxy's login): every alert would wait for the configuration to be mended.
    WrongPlace(String),
    /// No answer, or one that says "later" (5xx, 408, 429): alerts wait and are retried.
    Unreachable(String),
    /// Alertmanager's certificate is not trusted: the error says why and what to mend
    /// (`[alertmanager] ca_file`, the certificate, the host in the url, the clock), which
    /// waiting will not.
    Untrusted(String),
}

/// Judges the answer to `GET /api/v2/status` (status and body), or why there is none.
pub fn judge_status(got: Result<(u16, String), String>) -> Status {
    let (status, body) = match got {
        Err(why) if why.starts_with(UNTRUSTED) => return Status::Untrusted(why),
        Err(why) => return Status::Unreachable(why),
        Ok(answer) => answer,
    };
    match status {
        200 => {
            let json: Option<Value> = serde_json::from_str(&body).ok();
            let fields = json
                .as_ref()
                .and_then(|v| Some((v.get("versionInfo")?, v.get("cluster")?)));
            match fields {
                Some((info, cluster)) => Status::Alertmanager {
                    version: info
                        .get("version")
                        .and_then(as_text)
                        .unwrap_or_else(|| "unknown".into()),
                    cluster: cluster
                        .get("status")
                        .and_then(as_text)
                        .unwrap_or_else(|| "unknown".into()),
                },
                None => Status::WrongPlace(format!(
                    "HTTP 200, but not Alertmanager's status (no `versionInfo` and `cluster`): {}",
                    shorten(&body)
                )),
            }
        }
        408 | 429 | 500..=599 => Status::Unreachable(format!("HTTP {status}: {}", shorten(&body))),
        _ => Status::WrongPlace(format!("HTTP {status}: {}", shorten(&body))),
    }
}

/// Asks Alertmanager for its status once, at the start, and says what that means for the
/// alerts. Never fails the bridge: Alertmanager may well start after it at boot.
async fn check_alertmanager(poster: Poster) {
    let url = poster.status_url();
    match poster.status().await {
        Status::Alertmanager { version, cluster } => info!(
            %url,
            %version,
            %cluster,
            "Alertmanager answers at [alertmanager] url."
        ),
        Status::Unreachable(error) => warn!(
            %url,
            %error,
            "Alertmanager does not answer yet; alerts will wait unacknowledged in the broker and be retried until it does (it may start after the bridge)."
        ),
        Status::Untrusted(error) => warn!(
            %url,
            %error,
            "CERTIFICATE NOT TRUSTED: Alertmanager's certificate was refused, and every alert will wait unacknowledged in the broker, retried, until what `error` names is mended (only a certificate that is not valid yet mends itself, at its notBefore)."
        ),
        Status::WrongPlace(answer) => warn!(
            %url,
            %answer,
            "NOT ALERTMANAGER: something answers at [alertmanager] url, but not Alertmanager's API. Every alert will wait unacknowledged in the broker until this is mended: check the host and port of [alertmanager] url and its path, which must be Alertmanager's --web.route-prefix (e.g. http://host:9093/alertmanager when it runs under /alertmanager), and any proxy's authentication."
        ),
    }
}

// ---------------------------------------------------------------------------------------
// The bridge.

/// What the bridge counted: the final line, systemd's STATUS and `/metrics` read them.
///
/// Every MQTT message received ends in exactly one of `forwarded` (an alert Alertmanager
/// accepted), `rejected` (an alert it refused for good), `invalid` (not an alert it would
/// take), or is still in hand (received, not yet acknowledged: in the forwarder's queue
/// or in a batch being posted). So `received = forwarded + rejected + invalid + in_hand`
/// ([`Balance::adds_up`]). Counts are per delivery: a message the broker delivers again
/// (after a reconnect, or at the next start when this run left it unacknowledged) is
/// counted again, in `received` and in what became of it; Alertmanager merges such
/// duplicates by their labels.
#[derive(Debug, Default)]
pub struct BridgeStats {
    /// MQTT messages received (re-deliveries included).
    pub received: AtomicU64,
    /// Alerts Alertmanager accepted, their messages acknowledged.
    pub forwarded: AtomicU64,
    /// Alerts Alertmanager refused with a 400, 413 or 422 (acknowledged and dropped).
    pub rejected: AtomicU64,
    /// Messages that were not alerts Alertmanager would take (acknowledged and dropped).
    pub invalid: AtomicU64,
    /// Messages received and not yet acknowledged.
    pub in_hand: AtomicU64,
    /// POSTs accepted.
    pub posts: AtomicU64,
    /// POSTs refused for good (400, 413, 422).
    pub posts_refused: AtomicU64,
    /// POSTs that failed and were retried (connection errors, timeouts, 5xx, other 4xx).
    pub post_errors: AtomicU64,
    /// MQTT connection failures.
    pub reconnects: AtomicU64,
    pub connected: AtomicBool,
    /// When a POST was last accepted, milliseconds since the epoch (0: never).
    pub last_accepted_ms: AtomicU64,
    /// Duration of each POST, whatever its answer.
    pub post_latency: LatencyBuckets,
}

/// The messages of one batch, settled: acknowledged, each counted once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Settled {
    forwarded: u64,
    refused: u64,
    ignored: u64,
}

/// The counts that add up: `received = forwarded + refused + ignored + in_hand`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Balance {
    pub received: u64,
    pub forwarded: u64,
    pub refused: u64,
    pub ignored: u64,
    pub in_hand: u64,
}

impl Balance {
    /// Whether every message received is accounted for.
    pub fn adds_up(&self) -> bool {
        self.received == self.forwarded + self.refused + self.ignored + self.in_hand
    }
}

impl BridgeStats {
    /// One message received: in hand until settled.
    fn note_received(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
        self.in_hand.fetch_add(1, Ordering::Relaxed);
    }

    /// Messages acknowledged: out of hand, each counted as what became of it.
    fn settle(&self, s: Settled) {
        self.forwarded.fetch_add(s.forwarded, Ordering::Relaxed);
        self.rejected.fetch_add(s.refused, Ordering::Relaxed);
        self.invalid.fetch_add(s.ignored, Ordering::Relaxed);
        let n = s.forwarded + s.refused + s.ignored;
        let _ = self
            .in_hand
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                Some(h.saturating_sub(n))
            });
    }

    /// The counts now (exact once the bridge stopped; a moment's view while it runs).
    pub fn balance(&self) -> Balance {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Balance {
            received: l(&self.received),
            forwarded: l(&self.forwarded),
            refused: l(&self.rejected),
            ignored: l(&self.invalid),
            in_hand: l(&self.in_hand),
        }
    }

    /// A one-line summary.
    pub fn summary(&self) -> String {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let b = self.balance();
        format!(
            "{} messages received = {} alerts forwarded (in {} POSTs) + {} refused by Alertmanager + {} not darkwatch alert events + {} unacknowledged in hand; {} failed POSTs retried",
            b.received,
            b.forwarded,
            l(&self.posts),
            b.refused,
            b.ignored,
            b.in_hand,
            l(&self.post_errors)
        )
    }
}

/// The bridge's `/metrics` exposition: its counters, the build and the process.
pub fn render_metrics(stats: &BridgeStats) -> String {
    use std::fmt::Write as _;
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut s = String::new();
    let counters: [(&str, &str, u64); 5] = [
        (
            "darkwatch_bridge_messages_received_total",
            "MQTT messages the bridge received on [alertmanager] subscribe, re-deliveries included. Each ends forwarded, refused, ignored, or is in hand.",
            l(&stats.received),
        ),
        (
            "darkwatch_bridge_alerts_forwarded_total",
            "Alerts Alertmanager accepted (their MQTT messages acknowledged).",
            l(&stats.forwarded),
        ),
        (
            "darkwatch_bridge_alerts_refused_total",
            "Alerts Alertmanager refused with 400, 413 or 422: dropped, as no retry can succeed.",
            l(&stats.rejected),
        ),
        (
            "darkwatch_bridge_messages_ignored_total",
            "Messages that are not alerts Alertmanager would take (not darkwatch alert events, invalid label names): acknowledged and dropped.",
            l(&stats.invalid),
        ),
        (
            "darkwatch_bridge_mqtt_reconnects_total",
            "MQTT connection errors, each followed by a reconnect.",
            l(&stats.reconnects),
        ),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(
            s,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    }
    let _ = writeln!(
        s,
        "# HELP darkwatch_bridge_posts_total POSTs to Alertmanager by result: accepted, refused (400, 413, 422: its alerts dropped), failed (no answer, timeout, 5xx, any other 4xx: retried, unless the bridge is stopping).\n\
         # TYPE darkwatch_bridge_posts_total counter\n\
         darkwatch_bridge_posts_total{{result=\"accepted\"}} {}\n\
         darkwatch_bridge_posts_total{{result=\"refused\"}} {}\n\
         darkwatch_bridge_posts_total{{result=\"failed\"}} {}",
        l(&stats.posts),
        l(&stats.posts_refused),
        l(&stats.post_errors)
    );
    let gauges: [(&str, &str, f64); 3] = [
        (
            "darkwatch_bridge_messages_in_hand",
            "Messages received and not yet acknowledged: waiting to be posted, or in a batch Alertmanager has not accepted yet. They stay in the broker until acknowledged.",
            l(&stats.in_hand) as f64,
        ),
        (
            "darkwatch_bridge_mqtt_connected",
            "1 while the bridge holds a connection to the MQTT broker.",
            f64::from(u8::from(stats.connected.load(Ordering::Relaxed))),
        ),
        (
            "darkwatch_bridge_last_post_success_timestamp_seconds",
            "When Alertmanager last accepted a POST, seconds since the epoch; 0 before the first.",
            l(&stats.last_accepted_ms) as f64 / 1e3,
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(
            s,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    }
    crate::metrics::histogram(
        &mut s,
        "darkwatch_bridge_post_duration_seconds",
        "One POST to Alertmanager, from connecting to its answer (or the failure or timeout).",
        &stats.post_latency,
    );
    let _ = writeln!(
        s,
        "# HELP darkwatch_build_info The darkwatch release running, and the cargo features it was built with.\n\
         # TYPE darkwatch_build_info gauge\n\
         darkwatch_build_info{{version=\"{}\",features=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        crate::metrics::BUILD_FEATURES
    );
    crate::metrics::process_metrics(&mut s);
    s
}

/// Why the bridge cannot start.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// A configuration error: the dotted key and the reason.
    #[error("key `{key}`: {reason}")]
    Config { key: String, reason: String },
    /// `[alertmanager] metrics_listen` cannot be bound.
    #[error(
        "[alertmanager] metrics_listen = \"{listen}\": cannot listen: {source}; if another process holds it, Prometheus would scrape that one instead of this bridge: stop it, or set [alertmanager] metrics_listen to a free address (\"\" serves no /metrics)"
    )]
    Metrics {
        listen: String,
        source: std::io::Error,
    },
    #[error("cannot start the bridge: {0}")]
    Io(#[from] std::io::Error),
}

/// Which connection to the broker is current, so a PubAck goes out only on the connection
/// its message came on.
#[derive(Debug, Default)]
struct Gate {
    connection: u64,
    connected: bool,
}

/// A received message with the connection it came on.
struct Received {
    publish: Publish,
    connection: u64,
}

/// One message in a batch: its alert, or `None` for one that is only acknowledged.
struct Entry {
    received: Received,
    alert: Option<Value>,
}

/// Checks `cfg` for the bridge, beyond [`DarkwatchConfig::validate`].
///
/// # Errors
/// [`BridgeError::Config`]: `[mqtt] port = 0` (the bridge needs the broker's real port).
pub fn check(cfg: &DarkwatchConfig) -> Result<(), BridgeError> {
    if cfg.mqtt.port == 0 {
        return Err(BridgeError::Config {
            key: "mqtt.port".into(),
            reason: "is 0: the bridge connects to a broker and needs its port (an agent's embedded broker listens where `[mqtt] host` and `port` say; give it a fixed port)".into(),
        });
    }
    Ok(())
}

/// Runs the bridge until `stop`: connects to `[mqtt]`'s broker, forwards alert events to
/// `[alertmanager] url`. `ready` is called once the bridge is set up (the binary sends
/// READY=1 then); `watchdog`: send `WATCHDOG=1` and a STATUS line this often.
///
/// # Errors
/// [`BridgeError::Config`] for a configuration that cannot work (a bad URL or CA file, MQTT
/// TLS files), [`BridgeError::Io`] if the runtime cannot start.
pub fn run(
    cfg: &DarkwatchConfig,
    stop: ClientStop,
    notify: Notifier,
    watchdog: Option<Duration>,
    stats: Arc<BridgeStats>,
) -> Result<(), BridgeError> {
    check(cfg)?;
    let am = &cfg.alertmanager;
    let poster = Poster::new(am).map_err(|(k, r)| BridgeError::Config {
        key: format!("alertmanager.{k}"),
        reason: r,
    })?;
    let client_id = am.client_id_for(&cfg.mqtt);
    let mut options = crate::mqtt::broker_options(&cfg.mqtt, client_id.clone()).map_err(|e| {
        BridgeError::Config {
            key: "mqtt".into(),
            reason: e.to_string(),
        }
    })?;
    // Persistent session: QoS 1 messages published while the bridge is away wait for it.
    options.set_clean_session(false).set_manual_acks(true);
    let filters = am.filters_for(&cfg.mqtt);
    // Bound before READY=1: a taken port is an error now, not a silent scrape of another
    // process later.
    let metrics_listener = if am.metrics_listen.is_empty() {
        None
    } else {
        Some(
            std::net::TcpListener::bind(&am.metrics_listen).map_err(|source| {
                BridgeError::Metrics {
                    listen: am.metrics_listen.clone(),
                    source,
                }
            })?,
        )
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if cfg.mqtt.broker == BrokerMode::Embedded {
        debug!(
            "[mqtt] broker = \"embedded\": the bridge starts no broker; it connects to the agent's at host:port."
        );
    }
    info!(
        url = %poster.url(),
        broker = %format!("{}:{}", cfg.mqtt.host, cfg.mqtt.port),
        client_id = %client_id,
        subscribe = %filters.join(","),
        batch_max = am.batch_max,
        "Alertmanager bridge starting."
    );
    let metrics_stop = Arc::new(AtomicBool::new(false));
    if let Some(listener) = metrics_listener {
        let exposed = stats.clone();
        match crate::metrics::serve_with(
            listener,
            "darkwatch-bridge-metrics",
            move || render_metrics(&exposed),
            metrics_stop.clone(),
        ) {
            Ok(addr) => info!(%addr, "Serving /metrics."),
            // The address is bound: only its thread failed to start. Log and go on.
            Err(error) => {
                warn!(listen = %am.metrics_listen, %error, "Cannot serve /metrics.");
            }
        }
    }
    let (client, eventloop) = AsyncClient::new(options, am.batch_max + 16);
    let gate = Arc::new(Mutex::new(Gate::default()));
    let (tx, rx) = unbounded_channel();
    notify.send(&format!("READY=1\nSTATUS=forwarding to {}", poster.url()));
    runtime.block_on(async {
        // Beside the MQTT side, never in its way: the answer is only logged.
        let checker = tokio::spawn(check_alertmanager(poster.clone()));
        let driver = tokio::spawn(drive(
            eventloop,
            client.clone(),
            filters,
            gate.clone(),
            tx,
            stats.clone(),
        ));
        let pinger = tokio::spawn(ping(notify.clone(), watchdog, stats.clone()));
        let forwarder = Forwarder {
            poster,
            client: client.clone(),
            gate,
            stats: stats.clone(),
            batch_max: am.batch_max,
            flush: Duration::from_millis(am.flush_ms),
            retry_max: Duration::from_secs_f64(am.retry_max_secs),
            stop: stop.clone(),
            refused_log: RateLimit::default(),
            invalid_log: InvalidLog::default(),
            flow_log: FlowLog::default(),
        };
        forwarder.run(rx).await;
        notify.send("STOPPING=1");
        pinger.abort();
        checker.abort();
        // A clean disconnect: the broker keeps the session (and the unacknowledged
        // messages) for the next run.
        if stats.connected.load(Ordering::Relaxed) && client.try_disconnect().is_ok() {
            let until = tokio::time::Instant::now() + Duration::from_secs(1);
            while stats.connected.load(Ordering::Relaxed) && tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        driver.abort();
    });
    metrics_stop.store(true, Ordering::SeqCst);
    Ok(())
}

/// systemd pings from the runtime's own thread: a runtime that hangs stops them.
async fn ping(notify: Notifier, watchdog: Option<Duration>, stats: Arc<BridgeStats>) {
    if !notify.is_enabled() {
        return;
    }
    let every = watchdog.unwrap_or(Duration::from_secs(5));
    let mut last = String::new();
    loop {
        tokio::time::sleep(every).await;
        let now = format!(
            "{}; {}",
            if stats.connected.load(Ordering::Relaxed) {
                "connected to the broker"
            } else {
                "broker unreachable"
            },
            stats.summary()
        );
        let mut msg = String::new();
        if watchdog.is_some() {
            msg.push_str("WATCHDOG=1\n");
        }
        if now != last {
            msg.push_str("STATUS=");
            msg.push_str(&now);
            last = now;
        }
        if !msg.is_empty() {
            notify.send(msg.trim_end());
        }
    }
}

/// Polls the MQTT event loop; hands publishes to the forwarder with their connection.
async fn drive(
    mut eventloop: EventLoop,
    client: AsyncClient,
    filters: Vec<String>,
    gate: Arc<Mutex<Gate>>,
    tx: UnboundedSender<Received>,
    stats: Arc<BridgeStats>,
) {
    let mut reconnect = Reconnect::default();
    // Failed attempts since the last connection: logged at the 1st, 2nd, 4th, 8th…
    let mut failures: u64 = 0;
    let mut first = true;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                {
                    let mut g = gate
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    g.connection += 1;
                    g.connected = true;
                }
                stats.connected.store(true, Ordering::Relaxed);
                reconnect.connected(Instant::now());
                failures = 0;
                let (host, port) = eventloop.mqtt_options.broker_address();
                if !ack.session_present && !first {
                    warn!(
                        broker = %format!("{host}:{port}"),
                        "Connected to the MQTT broker, which kept no session for this client: alerts published while the bridge was disconnected are lost (broker persistence off, or the session expired)."
                    );
                } else {
                    info!(
                        broker = %format!("{host}:{port}"),
                        session_present = ack.session_present,
                        "Connected to the MQTT broker."
                    );
                }
                first = false;
                let filters = filters
                    .iter()
                    .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                if let Err(error) = client.try_subscribe_many(filters) {
                    warn!(%error, "Cannot queue the MQTT subscribe request.");
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                stats.note_received();
                let connection = gate
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .connection;
                // After the forwarder ended (stopping), a message is left unacknowledged
                // for the broker to re-send; keep polling, so the clean disconnect that
                // the stop queues still goes out and keeps the session.
                let _ = tx.send(Received {
                    publish,
                    connection,
                });
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                if refused {
                    error!(filters = %filters.join(","), "The broker refused a subscription; check [alertmanager] subscribe and the broker's ACLs.");
                } else {
                    info!(filters = %filters.join(","), "Subscribed.");
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                // Our own clean disconnect at stop: the session stays with the broker.
                stats.connected.store(false, Ordering::Relaxed);
                return;
            }
            Ok(_) => {}
            Err(error) => {
                {
                    // No PubAck queued for the old connection may reach the next one:
                    // `clean` drops the ones still in the request channel.
                    let mut g = gate
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    g.connected = false;
                    g.connection += 1;
                    eventloop.clean();
                }
                stats.connected.store(false, Ordering::Relaxed);
                stats.reconnects.fetch_add(1, Ordering::Relaxed);
                let (_, retry_in) = reconnect.failed(Instant::now());
                failures += 1;
                let (host, port) = eventloop.mqtt_options.broker_address();
                let broker = format!("{host}:{port}");
                if failures.is_power_of_two() {
                    warn!(%broker, %error, failures, ?retry_in, "MQTT connection failed; retrying with a growing backoff (logged at the 1st, 2nd, 4th… failure in a row). Alerts published meanwhile wait in the broker only if it holds this client id's session from an earlier connection.");
                } else {
                    debug!(%broker, %error, failures, ?retry_in, "MQTT connection still failing.");
                }
                tokio::time::sleep(retry_in).await;
            }
        }
    }
}

/// How often, at most, a line about messages that are not alerts is logged.
const INVALID_LOG_EVERY: Duration = Duration::from_secs(10);
/// How often, at most, a summary of the alerts forwarded is logged at INFO.
const FLOW_LOG_EVERY: Duration = Duration::from_secs(600);

/// A message that is not an alert Alertmanager would take, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Dropped {
    topic: String,
    why: Unfit,
}

/// A line to log about dropped messages: `count` of them since the last line, the first
/// (always named, with its topic) and the latest.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DroppedLine {
    count: u64,
    first: Dropped,
    last: Option<Dropped>,
}

/// Rate limit of the lines about messages that are not alerts: the first message is
/// logged at once with its topic; later ones at most every [`INVALID_LOG_EVERY`], each
/// line naming the first message held back since the previous line (and the latest),
/// so that no bad topic is hidden behind the count. What is held is logged when the
/// interval has passed, even if no other message comes, and at stop.
#[derive(Debug, Default)]
struct InvalidLog {
    last_line: Option<Instant>,
    count: u64,
    first: Option<Dropped>,
    last: Option<Dropped>,
}

impl InvalidLog {
    /// One more dropped message; the line to log now, if any.
    fn note(&mut self, now: Instant, topic: &str, why: &Unfit) -> Option<DroppedLine> {
        let d = Dropped {
            topic: topic.to_string(),
            why: why.clone(),
        };
        self.count += 1;
        if self.first.is_none() {
            self.first = Some(d);
        } else {
            self.last = Some(d);
        }
        let open = self
            .last_line
            .is_none_or(|t| now.duration_since(t) >= INVALID_LOG_EVERY);
        if open { self.take(now) } else { None }
    }

    /// When what is held back may be logged (`None`: nothing held).
    fn due(&self) -> Option<Instant> {
        let last = self.last_line?;
        (self.count > 0).then(|| last + INVALID_LOG_EVERY)
    }

    /// The line for what is held back, if any.
    fn take(&mut self, now: Instant) -> Option<DroppedLine> {
        let first = self.first.take()?;
        let line = DroppedLine {
            count: self.count,
            first,
            last: self.last.take(),
        };
        self.count = 0;
        self.last_line = Some(now);
        Some(line)
    }
}

impl DroppedLine {
    fn log(&self) {
        let (topic, why) = (&self.first.topic, self.first.why.to_string());
        let (last_topic, last_why) = self
            .last
            .as_ref()
            .map_or((String::new(), String::new()), |d| {
                (d.topic.clone(), d.why.to_string())
            });
        let count = self.count;
        match (&self.first.why, self.count) {
            (Unfit::NotAnEvent(_), 1) => warn!(
                %topic, %why,
                "Dropped an MQTT message that is not a darkwatch alert event (acknowledged, counted in darkwatch_bridge_messages_ignored_total); check [alertmanager] subscribe: it reaches a topic that carries no alerts."
            ),
            (Unfit::Invalid(_), 1) => warn!(
                %topic, %why,
                "Dropped a darkwatch alert event Alertmanager would refuse (acknowledged, counted in darkwatch_bridge_messages_ignored_total); mend it where it is made: the agent's [alert] labels, or the publisher of that topic."
            ),
            (Unfit::NotAnEvent(_), _) => warn!(
                count, %topic, %why, %last_topic, %last_why,
                "Dropped MQTT messages that are not alerts Alertmanager would take (count: since the last such line; topic and why: the first of them; last_topic: the latest). The first is not a darkwatch alert event: check [alertmanager] subscribe."
            ),
            (Unfit::Invalid(_), _) => warn!(
                count, %topic, %why, %last_topic, %last_why,
                "Dropped MQTT messages that are not alerts Alertmanager would take (count: since the last such line; topic and why: the first of them; last_topic: the latest). The first is an alert event Alertmanager would refuse: mend it where it is made."
            ),
        }
    }
}

/// What to say at INFO that alerts flow: the first forwarded batch, then at most one
/// summary every [`FLOW_LOG_EVERY`], only when alerts were forwarded since.
#[derive(Debug, Default)]
struct FlowLog {
    last_line: Option<Instant>,
    alerts: u64,
    posts: u64,
}

/// A line of [`FlowLog`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlowLine {
    First { alerts: u64 },
    Summary { alerts: u64, posts: u64 },
}

impl FlowLog {
    /// A batch forwarded (`alerts` accepted in `posts` POSTs); the line to log now, if any.
    fn forwarded(&mut self, now: Instant, alerts: u64, posts: u64) -> Option<FlowLine> {
        self.alerts += alerts;
        self.posts += posts;
        let line = match self.last_line {
            None => FlowLine::First {
                alerts: self.alerts,
            },
            Some(t) if now.duration_since(t) >= FLOW_LOG_EVERY => FlowLine::Summary {
                alerts: self.alerts,
                posts: self.posts,
            },
            Some(_) => return None,
        };
        self.last_line = Some(now);
        self.alerts = 0;
        self.posts = 0;
        Some(line)
    }
}

struct Forwarder {
    poster: Poster,
    client: AsyncClient,
    gate: Arc<Mutex<Gate>>,
    stats: Arc<BridgeStats>,
    batch_max: usize,
    flush: Duration,
    retry_max: Duration,
    stop: ClientStop,
    refused_log: RateLimit,
    invalid_log: InvalidLog,
    flow_log: FlowLog,
}

/// How delivering a batch ended.
#[derive(Debug, PartialEq, Eq)]
enum Delivery {
    /// Every alert was accepted or refused for good (`posts`: POSTs accepted): acknowledge
    /// the batch.
    Done {
        forwarded: u64,
        refused: u64,
        posts: u64,
    },
    /// Stopped before: leave the batch unacknowledged (the broker keeps it). `accepted`:
    /// its alerts Alertmanager took already (posted alone after the batch was refused);
    /// they come again at the next start.
    Stopped { accepted: u64 },
}

impl Forwarder {
    async fn run(mut self, mut rx: UnboundedReceiver<Received>) {
        let mut batch: Vec<Entry> = Vec::new();
        let mut left_accepted = 0;
        loop {
            let held_due = self.invalid_log.due();
            let first = tokio::select! {
                biased;
                () = self.stop.wait() => break,
                r = rx.recv() => match r { Some(r) => r, None => break },
                () = sleep_until_or_never(held_due), if held_due.is_some() => {
                    if let Some(line) = self.invalid_log.take(Instant::now()) {
                        line.log();
                    }
                    continue;
                }
            };
            let first = self.entry(first);
            if first.alert.is_none() {
                self.ack(std::slice::from_ref(&first));
                self.stats.settle(Settled {
                    ignored: 1,
                    ..Settled::default()
                });
                continue;
            }
            batch.push(first);
            let deadline = tokio::time::Instant::now() + self.flush;
            while batch.len() < self.batch_max && !self.stop.is_stopped() {
                tokio::select! {
                    biased;
                    () = self.stop.wait() => break,
                    r = rx.recv() => match r {
                        Some(r) => { let e = self.entry(r); batch.push(e); }
                        None => break,
                    },
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
            match self.deliver(&batch).await {
                Delivery::Done {
                    forwarded,
                    refused,
                    posts,
                } => {
                    self.ack(&batch);
                    let ignored = (batch.len() as u64).saturating_sub(forwarded + refused);
                    self.stats.settle(Settled {
                        forwarded,
                        refused,
                        ignored,
                    });
                    if forwarded > 0 {
                        self.log_flow(forwarded, posts);
                    }
                }
                Delivery::Stopped { accepted } => {
                    left_accepted = accepted;
                    break;
                }
            }
            batch.clear();
            if self.stop.is_stopped() {
                break;
            }
        }
        if let Some(line) = self.invalid_log.take(Instant::now()) {
            line.log();
        }
        // What is left: the batch Alertmanager has not accepted, and what was received
        // after it (in the queue). None of it was acknowledged.
        let in_hand = self.stats.in_hand.load(Ordering::Relaxed);
        if in_hand > 0 {
            warn!(
                unacknowledged = in_hand,
                in_batch = batch.len(),
                queued = in_hand.saturating_sub(batch.len() as u64),
                already_accepted = left_accepted,
                "Stopping with messages Alertmanager has not accepted. They are not acknowledged, so they stay in the broker's session and come again at the next start (already_accepted: taken by Alertmanager already; posting them again is harmless)."
            );
        }
    }

    fn log_flow(&mut self, forwarded: u64, posts: u64) {
        match self.flow_log.forwarded(Instant::now(), forwarded, posts) {
            Some(FlowLine::First { alerts }) => info!(
                alerts,
                url = %self.poster.url(),
                "First alerts forwarded to Alertmanager; from now on a summary at most every 10 minutes while alerts flow."
            ),
            Some(FlowLine::Summary { alerts, posts }) => {
                let b = self.stats.balance();
                info!(
                    alerts,
                    posts,
                    received = b.received,
                    forwarded = b.forwarded,
                    refused = b.refused,
                    ignored = b.ignored,
                    in_hand = b.in_hand,
                    "Alerts forwarded to Alertmanager (alerts, posts: since the last such line; the others: since the start)."
                );
            }
            None => {}
        }
    }

    /// A received message as a batch entry, its payload converted (or logged as dropped).
    fn entry(&mut self, received: Received) -> Entry {
        let alert = match to_postable(&received.publish.payload, crate::mqtt::epoch_secs()) {
            Ok(alert) => Some(alert),
            Err(why) => {
                let topic = &received.publish.topic;
                if let Some(line) = self.invalid_log.note(Instant::now(), topic, &why) {
                    line.log();
                }
                None
            }
        };
        Entry { received, alert }
    }

    /// Acknowledges `entries` in order, each only on the connection it came on.
    fn ack(&self, entries: &[Entry]) {
        let gate = self
            .gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut stale = 0;
        for e in entries {
            if !gate.connected || gate.connection != e.received.connection {
                stale += 1;
                continue;
            }
            if let Err(error) = self.client.try_ack(&e.received.publish) {
                warn!(%error, "Cannot queue an MQTT PubAck; the broker re-sends the message on the next connection.");
            }
        }
        if stale > 0 {
            debug!(
                stale,
                "Not acknowledged: received on an earlier connection; the broker re-sends them."
            );
        }
    }

    /// Posts the batch's alerts until Alertmanager accepted or refused them, or stop.
    async fn deliver(&mut self, batch: &[Entry]) -> Delivery {
        let alerts: Vec<&Value> = batch.iter().filter_map(|e| e.alert.as_ref()).collect();
        if alerts.is_empty() {
            return Delivery::Done {
                forwarded: 0,
                refused: 0,
                posts: 0,
            };
        }
        let n = alerts.len() as u64;
        match self.post_until_answered(&alerts).await {
            None => Delivery::Stopped { accepted: 0 },
            Some(Ok(())) => Delivery::Done {
                forwarded: n,
                refused: 0,
                posts: 1,
            },
            Some(Err(_)) if alerts.len() > 1 => {
                // One bad alert must not cost the others: each alone.
                debug!(
                    alerts = alerts.len(),
                    "Alertmanager refused the batch; posting its alerts one by one."
                );
                let (mut forwarded, mut refused) = (0, 0);
                for alert in alerts {
                    // A stop ends the split too, not only a failed POST: with a slow
                    // Alertmanager and a large batch the split could outlast systemd's
                    // stop timeout. What is left stays unacknowledged in the broker.
                    if self.stop.is_stopped() {
                        return Delivery::Stopped {
                            accepted: forwarded,
                        };
                    }
                    match self.post_until_answered(&[alert]).await {
                        None => {
                            return Delivery::Stopped {
                                accepted: forwarded,
                            };
                        }
                        Some(Ok(())) => forwarded += 1,
                        Some(Err((status, body))) => {
                            refused += 1;
                            self.refused(&[alert], status, &body);
                        }
                    }
                }
                Delivery::Done {
                    forwarded,
                    refused,
                    posts: forwarded,
                }
            }
            Some(Err((status, body))) => {
                self.refused(&alerts, status, &body);
                Delivery::Done {
                    forwarded: 0,
                    refused: n,
                    posts: 0,
                }
            }
        }
    }

    fn refused(&mut self, alerts: &[&Value], status: u16, body: &str) {
        let labels = alerts
            .first()
            .and_then(|a| a.get("labels"))
            .map(Value::to_string)
            .unwrap_or_default();
        if self.refused_log.ready() {
            error!(
                status,
                body = %shorten(body),
                labels = %labels,
                "Alertmanager refused an alert; dropped (a 4xx cannot succeed on a retry)."
            );
        } else {
            debug!(status, body = %shorten(body), labels = %labels, "Alertmanager refused an alert; dropped.");
        }
    }

    /// One batch: `Some(Ok)` accepted, `Some(Err((status, body)))` refused, `None` stopped
    /// while failing. Retries with a backoff from 0.5 s doubling to `retry_max`; a POST that
    /// fails once the bridge is stopping is not retried.
    async fn post_until_answered(
        &mut self,
        alerts: &[&Value],
    ) -> Option<Result<(), (u16, String)>> {
        let body = serde_json::to_vec(alerts).unwrap_or_else(|_| b"[]".to_vec());
        let mut delay = RETRY_MIN;
        let mut failures = 0u64;
        loop {
            let started = Instant::now();
            let answer = self.poster.post(&body).await;
            self.stats
                .post_latency
                .record(started.elapsed().as_secs_f64());
            match answer {
                Answer::Accepted => {
                    self.stats.posts.fetch_add(1, Ordering::Relaxed);
                    self.stats.last_accepted_ms.store(
                        (crate::mqtt::epoch_secs() * 1e3).max(0.0) as u64,
                        Ordering::Relaxed,
                    );
                    if failures > 0 {
                        info!(failures, "Alertmanager accepts alerts again.");
                    }
                    return Some(Ok(()));
                }
                Answer::Refused { status, body } => {
                    self.stats.posts_refused.fetch_add(1, Ordering::Relaxed);
                    return Some(Err((status, body)));
                }
                Answer::Failed(why) => {
                    self.stats.post_errors.fetch_add(1, Ordering::Relaxed);
                    failures += 1;
                    if self.stop.is_stopped() {
                        // Stopping: no retry; the caller says what is left unacknowledged.
                        warn!(url = %self.poster.url(), error = %why, alerts = alerts.len(), "POST to Alertmanager failed while stopping; not retried.");
                        return None;
                    }
                    if failures == 1 {
                        warn!(url = %self.poster.url(), error = %why, alerts = alerts.len(), "POST to Alertmanager failed; retrying with a growing backoff (the alerts stay unacknowledged in MQTT meanwhile).");
                    } else {
                        debug!(error = %why, failures, ?delay, "POST to Alertmanager still failing.");
                    }
                    tokio::select! {
                        biased;
                        () = self.stop.wait() => return None,
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(self.retry_max);
                }
            }
        }
    }
}

/// Sleeps until `at`, or forever for `None`.
async fn sleep_until_or_never(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(status: &str, ends_at: &str) -> Vec<u8> {
        serde_json::json!({
            "status": status,
            "labels": {"alertname": "DarkwatchAnomaly", "stream": "node7", "model_id": "m1", "severity": "warning"},
            "annotations": {"summary": "anomaly on node7", "description": "d"},
            "startsAt": "2024-05-01T10:00:00.250Z",
            "endsAt": ends_at,
            "fingerprint": "0123456789abcdef",
            "score": 12.5, "threshold": 3.0, "peak_score": 20.0, "peak_threshold": 2.5, "peak_seq": 4,
            "start_seq": 1, "end_seq": null, "seq": 5, "stream": "node7",
            "model_id": "m1", "model_version": "v3",
            "top_features": [{"feature": "cpu", "contribution": 9.25}, {"feature": "mem", "contribution": 1.0}]
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn a_firing_event_becomes_a_postable_alert_without_ends_at() {
        let a = to_postable(&event("firing", ENDS_AT_UNSET), 0.0).unwrap();
        let whole_seconds = to_postable(&event("firing", "0001-01-01T00:00:00Z"), 0.0).unwrap();
        assert_eq!(whole_seconds.get("endsAt"), None, "{whole_seconds}");
        let o = a.as_object().unwrap();
        let keys: Vec<&str> = o.keys().map(String::as_str).collect();
        assert_eq!(keys, ["annotations", "labels", "startsAt"]);
        assert_eq!(a["labels"]["alertname"], "DarkwatchAnomaly");
        assert_eq!(a["labels"]["stream"], "node7");
        assert_eq!(a["startsAt"], "2024-05-01T10:00:00.250Z");
        let ann = &a["annotations"];
        assert_eq!(ann["summary"], "anomaly on node7");
        assert_eq!(ann["score"], "12.5");
        assert_eq!(ann["threshold"], "3.0");
        assert_eq!(ann["peak_score"], "20.0");
        assert_eq!(ann["peak_threshold"], "2.5");
        assert_eq!(ann["model_version"], "v3");
        assert_eq!(ann["top_features"], "cpu (9.250), mem (1.000)");
        assert_eq!(ann["darkwatch_fingerprint"], "0123456789abcdef");
        // model_id is a label already: not repeated.
        assert!(ann.get("model_id").is_none());
        // Every value is text.
        for v in a["labels"]
            .as_object()
            .unwrap()
            .values()
            .chain(ann.as_object().unwrap().values())
        {
            assert!(v.is_string(), "{v}");
        }
    }

    #[test]
    fn a_resolved_event_keeps_its_end_and_one_without_gets_now() {
        let a = to_postable(&event("resolved", "2024-05-01T10:05:00Z"), 0.0).unwrap();
        assert_eq!(a["endsAt"], "2024-05-01T10:05:00Z");
        let now = 1_714_557_900.0; // 2024-05-01T10:05:00Z
        let b = to_postable(&event("resolved", ENDS_AT_UNSET), now).unwrap();
        assert_eq!(b["endsAt"], "2024-05-01T10:05:00.000Z");
        // An end before the start still ends it, at the start.
        let c = to_postable(&event("resolved", "2024-05-01T09:00:00Z"), 0.0).unwrap();
        assert_eq!(c["endsAt"], "2024-05-01T10:00:00.250Z");
        // An end in the bridge's future (the sender's clock ahead) ends it now.
        let d = to_postable(&event("resolved", "2024-05-01T10:07:00Z"), now).unwrap();
        assert_eq!(d["endsAt"], "2024-05-01T10:05:00.000Z");
        // Not before its start, though.
        let early = 1_714_557_000.0; // 2024-05-01T09:50:00Z, before the start
        let e = to_postable(&event("resolved", "2024-05-01T10:07:00Z"), early).unwrap();
        assert_eq!(e["endsAt"], "2024-05-01T10:00:00.250Z");
    }

    #[test]
    fn labels_become_text_and_empty_ones_are_dropped() {
        let p = br#"{"labels":{"alertname":"A","n":3,"b":true,"e":"","z":null},"startsAt":"2024-01-01T00:00:00+02:00","generatorURL":"http://x/g"}"#;
        let a = to_postable(p, 0.0).unwrap();
        assert_eq!(
            a["labels"],
            serde_json::json!({"alertname": "A", "n": "3", "b": "true"})
        );
        assert_eq!(a["generatorURL"], "http://x/g");
        assert!(a.get("endsAt").is_none());
    }

    #[test]
    fn what_is_not_an_alert_event_is_refused_with_a_reason() {
        for (payload, why, event) in [
            (&b"garbage"[..], "not JSON", false),
            (br#"{"status":"online","node":"n1"}"#, "labels", false),
            (br#"[1,2]"#, "object", false),
            (br#"{"labels":{"stream":"s"},"startsAt":"2024-01-01T00:00:00Z"}"#, "alertname", true),
            (br#"{"labels":{"alertname":"A"}}"#, "startsAt", true),
            (br#"{"labels":{"alertname":"A"},"startsAt":"yesterday"}"#, "RFC 3339", true),
            (br#"{"labels":{"alertname":"A","bad-name":"x"},"startsAt":"2024-01-01T00:00:00Z"}"#, "bad-name", true),
            (br#"{"labels":{"alertname":"A"},"startsAt":"2024-01-01T00:00:00Z","status":"pending"}"#, "pending", true),
        ] {
            let err = to_postable(payload, 0.0).unwrap_err();
            assert!(err.to_string().contains(why), "{err} (wanted {why})");
            assert_eq!(matches!(err, Unfit::Invalid(_)), event, "{err}");
        }
    }

    /// The trial's bad label was reported as "check `subscribe`": now the label and why.
    #[test]
    fn an_invalid_label_name_is_named_with_what_is_wrong_with_it() {
        let why = |labels: &str| {
            let p = format!(
                r#"{{"labels":{{"alertname":"A",{labels}}},"startsAt":"2024-01-01T00:00:00Z"}}"#
            );
            match to_postable(p.as_bytes(), 0.0) {
                Err(Unfit::Invalid(why)) => why,
                other => panic!("{labels}: {other:?}"),
            }
        };
        let w = why(r#""rack-id":"r1""#);
        assert!(w.starts_with(r#"label name "rack-id" is invalid"#), "{w}");
        assert!(w.contains("'-' at character 5"), "{w}");
        assert!(w.contains("[a-zA-Z_][a-zA-Z0-9_]*"), "{w}");
        assert!(why(r#""3d":"x""#).contains("starts with the digit `3`"));
        assert!(why(r#""":"x""#).contains("it is empty"));
        assert!(why(r#""nœud":"x""#).contains("'œ' at character 2"));
        let p = br#"{"labels":{"alertname":"A"},"annotations":{"run book":"x"},"startsAt":"2024-01-01T00:00:00Z"}"#;
        let w = to_postable(p, 0.0).unwrap_err().to_string();
        assert!(
            w.starts_with(r#"annotation name "run book" is invalid"#),
            "{w}"
        );
        for ok in ["_a", "a_1", "Z"] {
            assert_eq!(name_problem(ok), None, "{ok}");
        }
    }

    fn not_json() -> Unfit {
        Unfit::NotAnEvent("not JSON".into())
    }

    /// The first dropped message is always logged with its topic; later ones at most every
    /// 10 s, each line naming the first held back, and what is held is not lost.
    #[test]
    fn the_first_dropped_message_is_logged_with_its_topic_and_none_is_hidden() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut log = InvalidLog::default();
        let line = log
            .note(t0, "a/status", &not_json())
            .expect("the first, at once");
        assert_eq!((line.count, line.first.topic.as_str()), (1, "a/status"));
        assert_eq!(line.last, None);
        assert_eq!(log.due(), None);
        // Held back within 10 s, the first of them kept.
        assert_eq!(log.note(t0 + s(1), "b/x", &not_json()), None);
        assert_eq!(log.note(t0 + s(2), "c/x", &not_json()), None);
        assert_eq!(log.due(), Some(t0 + s(10)));
        let line = log
            .note(t0 + s(11), "d/x", &not_json())
            .expect("10 s passed");
        assert_eq!(line.count, 3);
        assert_eq!(line.first.topic, "b/x");
        assert_eq!(line.last.as_ref().map(|d| d.topic.as_str()), Some("d/x"));
        // One held back, then nothing more: taken when due (or at stop).
        assert_eq!(log.note(t0 + s(12), "e/x", &not_json()), None);
        let line = log.take(t0 + s(21)).expect("held");
        assert_eq!((line.count, line.first.topic.as_str()), (1, "e/x"));
        assert_eq!(log.take(t0 + s(22)), None);
        assert_eq!(log.due(), None);
    }

    #[test]
    fn alerts_flowing_are_logged_first_then_at_most_every_ten_minutes() {
        let t0 = Instant::now();
        let mut flow = FlowLog::default();
        assert_eq!(
            flow.forwarded(t0, 3, 1),
            Some(FlowLine::First { alerts: 3 })
        );
        assert_eq!(flow.forwarded(t0 + Duration::from_secs(1), 2, 1), None);
        assert_eq!(flow.forwarded(t0 + Duration::from_secs(599), 4, 2), None);
        assert_eq!(
            flow.forwarded(t0 + Duration::from_secs(600), 1, 1),
            Some(FlowLine::Summary {
                alerts: 7,
                posts: 4
            })
        );
        assert_eq!(flow.forwarded(t0 + Duration::from_secs(601), 1, 1), None);
    }

    #[test]
    fn rfc3339_times_parse_to_epoch_milliseconds() {
        assert_eq!(rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(rfc3339_ms("1970-01-01T00:00:01.5Z"), Some(1500));
        assert_eq!(rfc3339_ms("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(rfc3339_ms("2024-05-01T10:05:00Z"), Some(1_714_557_900_000));
        for t in [1.0e9, 1_714_557_900.123, -86_400.0] {
            assert_eq!(
                rfc3339_ms(&rfc3339_utc(t)),
                Some((t * 1000.0).round() as i64)
            );
        }
        for bad in [
            "",
            "2024-13-01T00:00:00Z",
            "2024-05-01T10:05:00",
            "2024-05-01 x",
            "2024-05-01T10:05:00.Z",
        ] {
            assert_eq!(rfc3339_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn urls_parse_to_the_api_path() {
        let t = Target::parse("http://127.0.0.1:9093").unwrap();
        assert_eq!(
            (t.https, t.host.as_str(), t.port, t.path.as_str()),
            (false, "127.0.0.1", 9093, "/api/v2/alerts")
        );
        let t = Target::parse("https://am.example:8443/alertmanager/").unwrap();
        assert_eq!(
            (t.https, t.port, t.path.as_str(), t.authority.as_str()),
            (true, 8443, "/alertmanager/api/v2/alerts", "am.example:8443")
        );
        let t = Target::parse("http://[::1]:9093/api/v2/alerts").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("::1", 9093, "/api/v2/alerts")
        );
        assert_eq!(Target::parse("http://am").unwrap().port, 80);
        for bad in [
            "127.0.0.1:9093",
            "ftp://x",
            "http://",
            "http://h:99999",
            "http://u:p@h:1",
            "http://h:1/?q",
            "http://h:0",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_checks_name_the_key() {
        let ok = AlertmanagerConfig::default();
        assert_eq!(ok.validate(), Ok(()));
        let bad = |f: &dyn Fn(&mut AlertmanagerConfig)| {
            let mut c = AlertmanagerConfig::default();
            f(&mut c);
            c.validate().unwrap_err().0
        };
        assert_eq!(bad(&|c| c.url = "localhost:9093".into()), "url");
        assert_eq!(bad(&|c| c.url = "https://am:9093".into()), "ca_file");
        assert_eq!(bad(&|c| c.ca_file = "/x.pem".into()), "ca_file");
        assert_eq!(bad(&|c| c.subscribe = vec!["a/#/b".into()]), "subscribe");
        assert_eq!(bad(&|c| c.subscribe.clear()), "subscribe");
        assert_eq!(bad(&|c| c.batch_max = 0), "batch_max");
        assert_eq!(bad(&|c| c.timeout_secs = 0.0), "timeout_secs");
        assert_eq!(bad(&|c| c.retry_max_secs = f64::NAN), "retry_max_secs");
        let node = AlertmanagerConfig {
            subscribe: vec!["darkwatch/{node}/alerts/#".into()],
            ..AlertmanagerConfig::default()
        };
        assert_eq!(node.validate(), Ok(()));
        // Any other placeholder, or a brace left open, is refused, naming the filter and
        // what subscribe fills in; `{node}` inside a level is filled in like a whole one.
        for filter in [
            "darkwatch/{stream}/alerts/#",
            "darkwatch/{Node}/alerts/#",
            "darkwatch/{node}/alerts/{cluster}",
            "darkwatch/{node/alerts/#",
            "darkwatch/node}/alerts/#",
            "darkwatch/{node}/alerts/{",
        ] {
            let c = AlertmanagerConfig {
                subscribe: vec![filter.into()],
                ..AlertmanagerConfig::default()
            };
            let (key, why) = c.validate().unwrap_err();
            assert_eq!(key, "subscribe");
            assert!(
                why.contains(filter) && why.contains("{node} only"),
                "{filter}: {why}"
            );
        }
        let inside = AlertmanagerConfig {
            subscribe: vec!["darkwatch/rack-{node}/alerts/#".into()],
            ..AlertmanagerConfig::default()
        };
        assert_eq!(inside.validate(), Ok(()));
        let mqtt = MqttConfig {
            node_name: "n7".into(),
            ..MqttConfig::default()
        };
        assert_eq!(node.filters_for(&mqtt), ["darkwatch/n7/alerts/#"]);
        assert_eq!(node.client_id_for(&mqtt), "darkwatch-alertmanager-n7");
        assert_eq!(inside.filters_for(&mqtt), ["darkwatch/rack-n7/alerts/#"]);
    }

    #[test]
    fn responses_are_classified() {
        let (s, b) =
            parse_response(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 5\r\n\r\noops!").unwrap();
        assert_eq!((s, b.as_str()), (400, "oops!"));
        assert_eq!(answer(200, String::new()), Answer::Accepted);
        assert!(matches!(
            answer(400, "x".into()),
            Answer::Refused { status: 400, .. }
        ));
        assert!(matches!(answer(429, String::new()), Answer::Failed(_)));
        assert!(matches!(answer(503, String::new()), Answer::Failed(_)));
        // The trial's wrong route prefix (404) dropped every alert; now they wait.
        for status in [401, 403, 404, 405] {
            match answer(status, "404 page not found".into()) {
                Answer::Failed(why) => assert!(why.contains("[alertmanager] url"), "{why}"),
                other => panic!("{status}: {other:?}"),
            }
        }
        for status in [413, 422] {
            assert!(matches!(
                answer(status, String::new()),
                Answer::Refused { .. }
            ));
        }
        assert_eq!(parse_response(b"garbage"), None);
        assert_eq!(
            content_length(b"HTTP/1.1 200 OK\r\ncontent-length: 12"),
            Some(12)
        );
    }

    #[test]
    fn a_refused_certificate_says_what_to_mend_for_its_refusal() {
        use rustls::CertificateError as E;
        use rustls::pki_types::{ServerName, UnixTime};
        let at = |s| UnixTime::since_unix_epoch(Duration::from_secs(s));
        let ca = Path::new("/etc/darkwatch/am-ca.pem");
        // As tokio-rustls hands it over: an io::Error wrapping rustls's.
        let refuse = |why: E| {
            let e = std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(why),
            );
            refused_certificate(e, ca, "am.example").to_string()
        };
        let cases: Vec<(E, &[&str], &[&str])> = vec![
            (
                E::UnknownIssuer,
                &["ca_file (/etc/darkwatch/am-ca.pem) must hold the CA"],
                &[],
            ),
            (
                E::BadSignature,
                &["ca_file (/etc/darkwatch/am-ca.pem) must hold the CA"],
                &[],
            ),
            (
                E::Expired,
                &["has expired: renew it", "clock"],
                &["ca_file"],
            ),
            (
                E::ExpiredContext {
                    time: at(2_000_000_000),
                    not_after: at(1_900_000_000),
                },
                &["has expired: renew it", "clock"],
                &["ca_file"],
            ),
            (
                E::NotValidYet,
                &["not valid yet: check this machine's clock"],
                &["ca_file", "renew"],
            ),
            (
                E::NotValidYetContext {
                    time: at(1_700_000_000),
                    not_before: at(1_800_000_000),
                },
                &["not valid yet: check this machine's clock"],
                &["ca_file", "renew"],
            ),
            (
                E::NotValidForName,
                &["does not name the host of [alertmanager] url (am.example): use a host it names"],
                &["ca_file", "clock"],
            ),
            (
                E::NotValidForNameContext {
                    expected: ServerName::try_from("am.example").unwrap().to_owned(),
                    presented: vec!["DnsName(\"localhost\")".into()],
                },
                &["does not name the host of [alertmanager] url (am.example): use a host it names"],
                &["ca_file", "clock"],
            ),
            (
                E::Revoked,
                &[
                    "check Alertmanager's certificate and [alertmanager] ca_file (/etc/darkwatch/am-ca.pem)",
                ],
                &["must hold", "renew", "clock", "does not name"],
            ),
            (
                E::BadEncoding,
                &["check Alertmanager's certificate and [alertmanager] ca_file"],
                &["must hold", "renew", "clock", "does not name"],
            ),
        ];
        for (why, has, lacks) in cases {
            let name = format!("{why:?}");
            let said = refuse(why);
            assert!(said.starts_with(UNTRUSTED), "{name}: {said}");
            for text in has {
                assert!(said.contains(text), "{name}: {said} lacks {text:?}");
            }
            for text in lacks {
                assert!(!said.contains(text), "{name}: {said} has {text:?}");
            }
            // Whatever the refusal, the start-up check calls it untrusted.
            assert_eq!(judge_status(Err(said.clone())), Status::Untrusted(said));
        }
        // Not a certificate refusal: the error as it was, not called untrusted.
        let other = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure),
        );
        let said = refused_certificate(other, ca, "am.example").to_string();
        assert!(!said.starts_with(UNTRUSTED), "{said}");
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(
            refused_certificate(reset, ca, "am.example").kind(),
            std::io::ErrorKind::ConnectionReset
        );
    }

    #[test]
    fn the_status_answer_is_judged() {
        let am = r#"{"cluster":{"peers":[],"status":"disabled"},"config":{"original":"route: {}"},"uptime":"2024-05-01T10:00:00Z","versionInfo":{"version":"0.26.0","revision":"x"}}"#;
        assert_eq!(
            judge_status(Ok((200, am.into()))),
            Status::Alertmanager {
                version: "0.26.0".into(),
                cluster: "disabled".into()
            }
        );
        for (status, body) in [
            (404, "404 page not found"),
            (200, "<html>Grafana</html>"),
            (200, r#"{"status":"success"}"#),
            (401, "Unauthorized"),
        ] {
            assert!(
                matches!(judge_status(Ok((status, body.into()))), Status::WrongPlace(w) if w.contains(&format!("HTTP {status}"))),
                "{status} {body}"
            );
        }
        for status in [503, 502, 429] {
            assert!(matches!(
                judge_status(Ok((status, String::new()))),
                Status::Unreachable(_)
            ));
        }
        assert_eq!(
            judge_status(Err("Connection refused".into())),
            Status::Unreachable("Connection refused".into())
        );
        let refused = format!("{UNTRUSTED} (invalid peer certificate: UnknownIssuer): …");
        assert_eq!(
            judge_status(Err(refused.clone())),
            Status::Untrusted(refused)
        );
        for (url, path) in [
            ("http://am:9093", "/api/v2/status"),
            (
                "http://am:9093/alertmanager/",
                "/alertmanager/api/v2/status",
            ),
            ("http://am:9093/am/api/v2/alerts", "/am/api/v2/status"),
        ] {
            assert_eq!(Target::parse(url).unwrap().status_path(), path, "{url}");
        }
    }

    #[test]
    fn a_chunked_answer_is_joined() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nb;x=1\r\n, the world\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(raw),
            Some((200, "hello, the world".to_string()))
        );
        // Cut short: what is complete, no panic.
        let cut = &raw[..raw.len() - 12];
        assert_eq!(parse_response(cut), Some((200, "hello, the ".to_string())));
        assert_eq!(dechunk(b"zz\r\n"), (b"".to_vec(), false));
        assert_eq!(dechunk(b"+5\r\nhello\r\n0\r\n\r\n"), (b"".to_vec(), false));
        assert_eq!(dechunk(b"ffff\r\nab"), (b"ab".to_vec(), false));
        assert_eq!(dechunk(b"ffffffffffffffff\r\nab"), (b"ab".to_vec(), false));
        // Sizes near usize::MAX - start, where the end of the chunk plus its CRLF used to
        // overflow (a panic in debug builds, an endless loop in release).
        for size in [usize::MAX - 3, usize::MAX - 4, usize::MAX - 5, usize::MAX] {
            let raw = format!("{size:x}\r\nab");
            assert_eq!(dechunk(raw.as_bytes()), (b"ab".to_vec(), false), "{size:x}");
        }
        assert_eq!(dechunk(b"10000000000000000\r\nab"), (b"".to_vec(), false));
        // Complete only once the last chunk and the trailers' empty line arrived; a last
        // chunk with an extension and a trailer field counts.
        assert_eq!(dechunk(b"2\r\nok\r\n0\r\n"), (b"ok".to_vec(), false));
        assert_eq!(
            dechunk(b"2\r\nok\r\n0;done\r\nX-Trace: 1\r\n\r\n"),
            (b"ok".to_vec(), true)
        );
        assert_eq!(dechunk(b"2\r\nokXY0\r\n\r\n"), (b"ok".to_vec(), false));
    }

    #[test]
    fn the_bridge_exposition_parses_and_names_its_counts() {
        let stats = BridgeStats::default();
        for _ in 0..5 {
            stats.note_received();
        }
        stats.settle(Settled {
            forwarded: 2,
            refused: 1,
            ignored: 1,
        });
        stats.posts.store(2, Ordering::Relaxed);
        stats.post_errors.store(3, Ordering::Relaxed);
        stats
            .last_accepted_ms
            .store(1_714_557_900_250, Ordering::Relaxed);
        stats.post_latency.record(0.003);
        let samples = crate::metrics::tests::check_exposition(&render_metrics(&stats));
        for (name, want) in [
            ("darkwatch_bridge_messages_received_total", 5.0),
            ("darkwatch_bridge_alerts_forwarded_total", 2.0),
            ("darkwatch_bridge_alerts_refused_total", 1.0),
            ("darkwatch_bridge_messages_ignored_total", 1.0),
            ("darkwatch_bridge_messages_in_hand", 1.0),
            ("darkwatch_bridge_mqtt_connected", 0.0),
            ("darkwatch_bridge_posts_total{result=\"accepted\"}", 2.0),
            ("darkwatch_bridge_posts_total{result=\"failed\"}", 3.0),
            ("darkwatch_bridge_posts_total{result=\"refused\"}", 0.0),
            (
                "darkwatch_bridge_last_post_success_timestamp_seconds",
                1_714_557_900.25,
            ),
            ("darkwatch_bridge_post_duration_seconds_count", 1.0),
            (
                "darkwatch_bridge_post_duration_seconds_bucket{le=\"0.0025\"}",
                0.0,
            ),
            (
                "darkwatch_bridge_post_duration_seconds_bucket{le=\"0.005\"}",
                1.0,
            ),
        ] {
            assert_eq!(samples.get(name), Some(&want), "{name}");
        }
        assert!(
            samples
                .keys()
                .any(|k| k.starts_with("darkwatch_build_info{version=")),
            "{samples:?}"
        );
        assert!(stats.balance().adds_up());
    }

    #[test]
    fn metrics_listen_is_an_address_or_empty() {
        let with = |l: &str| AlertmanagerConfig {
            metrics_listen: l.into(),
            ..AlertmanagerConfig::default()
        };
        assert_eq!(
            AlertmanagerConfig::default().metrics_listen,
            "127.0.0.1:9465"
        );
        for ok in ["", "0.0.0.0:9465", "[::1]:9999"] {
            assert_eq!(with(ok).validate(), Ok(()), "{ok}");
        }
        for bad in ["localhost:9465", "9465"] {
            let (key, why) = with(bad).validate().unwrap_err();
            assert_eq!(key, "metrics_listen");
            assert!(why.contains("not an IP address and port"), "{why}");
        }
    }

    // ---- Accounting: the forwarder's own code against an HTTP endpoint of the test's.

    /// An HTTP endpoint answering each POST with `rule(number of alerts, body)`.
    fn scripted_am(rule: fn(usize, &str) -> u16) -> u16 {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut raw = Vec::new();
                let mut buf = [0u8; 4096];
                let body = loop {
                    let Ok(n @ 1..) = conn.read(&mut buf) else {
                        break None;
                    };
                    raw.extend_from_slice(&buf[..n]);
                    if let Some(h) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                        let len = content_length(&raw[..h]).unwrap_or(0);
                        if raw.len() >= h + 4 + len {
                            break Some(String::from_utf8_lossy(&raw[h + 4..]).into_owned());
                        }
                    }
                };
                let Some(body) = body else { continue };
                let n = serde_json::from_str::<Vec<Value>>(&body).map_or(0, |a| a.len());
                let status = rule(n, &body);
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        port
    }

    /// A forwarder posting to `port`, its stop, stats and queue.
    fn forwarder(
        port: u16,
    ) -> (
        Forwarder,
        ClientStop,
        Arc<BridgeStats>,
        UnboundedSender<Received>,
        UnboundedReceiver<Received>,
        EventLoop,
    ) {
        let cfg = AlertmanagerConfig {
            url: format!("http://127.0.0.1:{port}"),
            flush_ms: 100,
            timeout_secs: 5.0,
            retry_max_secs: 0.5,
            ..AlertmanagerConfig::default()
        };
        let (client, eventloop) =
            AsyncClient::new(rumqttc::MqttOptions::new("t", "127.0.0.1", 1), 10);
        let stop = ClientStop::default();
        let stats = Arc::new(BridgeStats::default());
        let (tx, rx) = unbounded_channel();
        let f = Forwarder {
            poster: Poster::new(&cfg).unwrap(),
            client,
            gate: Arc::default(),
            stats: stats.clone(),
            batch_max: cfg.batch_max,
            flush: Duration::from_millis(cfg.flush_ms),
            retry_max: Duration::from_secs_f64(cfg.retry_max_secs),
            stop: stop.clone(),
            refused_log: RateLimit::default(),
            invalid_log: InvalidLog::default(),
            flow_log: FlowLog::default(),
        };
        (f, stop, stats, tx, rx, eventloop)
    }

    /// What the MQTT driver does with a message: count it, queue it.
    fn receive(stats: &BridgeStats, tx: &UnboundedSender<Received>, payload: Vec<u8>) {
        stats.note_received();
        let publish = Publish::new("darkwatch/n/alerts/s", QoS::AtLeastOnce, payload);
        tx.send(Received {
            publish,
            connection: 1,
        })
        .unwrap();
    }

    fn alert(stream: &str) -> Vec<u8> {
        serde_json::json!({
            "labels": {"alertname": "A", "stream": stream},
            "startsAt": "2024-05-01T10:00:00Z"
        })
        .to_string()
        .into_bytes()
    }

    async fn until(what: &str, cond: impl Fn() -> bool) {
        for _ in 0..2000 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("never: {what}");
    }

    /// The trial's "2 received, 1 in hand": the second message waited in the queue behind
    /// a failing batch and was counted nowhere. Both are in hand now.
    #[tokio::test]
    async fn what_waits_behind_a_failing_batch_is_counted_in_hand_at_stop() {
        let (f, stop, stats, tx, rx, _el) = forwarder(scripted_am(|_, _| 503));
        let run = tokio::spawn(f.run(rx));
        receive(&stats, &tx, alert("a1"));
        until("a failed POST", || {
            stats.post_errors.load(Ordering::Relaxed) > 0
        })
        .await;
        receive(&stats, &tx, alert("a2"));
        stop.stop();
        run.await.unwrap();
        let b = stats.balance();
        assert_eq!(
            b,
            Balance {
                received: 2,
                in_hand: 2,
                ..Balance::default()
            }
        );
        assert!(b.adds_up());
        assert!(
            stats
                .summary()
                .starts_with("2 messages received = 0 alerts forwarded")
        );
    }

    /// A batch refused, its alerts posted alone, and a stop while one of them fails: the
    /// one Alertmanager took is not counted forwarded, as the whole batch stays
    /// unacknowledged and comes again.
    #[tokio::test]
    async fn a_batch_stopped_half_way_through_its_split_stays_in_hand() {
        let (f, stop, stats, tx, rx, _el) =
            forwarder(scripted_am(|n, body| match (n, body.contains("\"b1\"")) {
                (1, true) => 200,
                (1, false) => 503,
                _ => 400,
            }));
        for s in ["b1", "b2", "b3"] {
            receive(&stats, &tx, alert(s));
        }
        let run = tokio::spawn(f.run(rx));
        until("the split's failing POST", || {
            stats.posts.load(Ordering::Relaxed) == 1
                && stats.post_errors.load(Ordering::Relaxed) > 0
        })
        .await;
        stop.stop();
        run.await.unwrap();
        let b = stats.balance();
        assert_eq!((b.received, b.in_hand, b.forwarded), (3, 3, 0), "{b:?}");
        assert!(b.adds_up());
        assert_eq!(stats.posts_refused.load(Ordering::Relaxed), 1);
    }

    /// Every message settled: forwarded, refused, ignored add up to what was received.
    #[tokio::test]
    async fn forwarded_refused_and_ignored_add_up_to_received() {
        let (f, stop, stats, tx, rx, _el) = forwarder(scripted_am(|n, body| {
            if n > 1 || body.contains("poison") {
                400
            } else {
                200
            }
        }));
        receive(&stats, &tx, b"not json".to_vec());
        receive(&stats, &tx, alert("c1"));
        receive(
            &stats,
            &tx,
            br#"{"labels":{"alertname":"A","bad-name":"x"},"startsAt":"2024-01-01T00:00:00Z"}"#
                .to_vec(),
        );
        receive(&stats, &tx, alert("poison"));
        receive(&stats, &tx, alert("c2"));
        let run = tokio::spawn(f.run(rx));
        until("all settled", || stats.in_hand.load(Ordering::Relaxed) == 0).await;
        stop.stop();
        run.await.unwrap();
        assert_eq!(
            stats.balance(),
            Balance {
                received: 5,
                forwarded: 2,
                refused: 1,
                ignored: 2,
                in_hand: 0
            }
        );
        assert!(
            stats.last_accepted_ms.load(Ordering::Relaxed) > 0 && stats.post_latency.count() == 4,
            "one refused batch, three alone"
        );
    }
}
