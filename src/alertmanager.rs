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
//! Messages that are not darkwatch alert events (the retained status topic, garbage) are
//! counted, logged rate-limited and acknowledged: they never block the queue.
//!
//! # Threads and tasks
//!
//! One current-thread tokio runtime runs the MQTT driver (polls rumqttc's event loop), the
//! forwarder (batches, posts, acknowledges) and the systemd watchdog pings.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, Packet, Publish, QoS, SubscribeFilter};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tracing::{debug, error, info, warn};

use crate::alert::{ENDS_AT_UNSET, rfc3339_utc};
use crate::config::DarkwatchConfig;
use crate::mqtt::{BrokerMode, ClientStop, MqttConfig, RateLimit, Reconnect};
use crate::systemd::Notifier;

/// First retry delay of a failed POST; doubles up to `retry_max_secs`.
const RETRY_MIN: Duration = Duration::from_millis(500);
/// Most bytes of an Alertmanager response kept (its body goes into the log).
const MAX_RESPONSE_BYTES: usize = 64 << 10;
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
        }
    }
}

impl AlertmanagerConfig {
    /// Semantic checks the types cannot express. Returns the key and the reason.
    ///
    /// # Errors
    /// A URL that [`Target::parse`] refuses, `https` without `ca_file` (or `ca_file` with
    /// `http`), no or an invalid subscribe filter, `batch_max` outside 1..=10000,
    /// `flush_ms` above 60000, `timeout_secs` or `retry_max_secs` not in (0, 3600].
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
            crate::mqtt::check_filter(&filter.replace("{node}", "node"))
                .map_err(|reason| ("subscribe", format!("`{filter}` {reason}")))?;
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

// ---------------------------------------------------------------------------------------
// Conversion of darkwatch events to Alertmanager's PostableAlert.

/// Whether `name` is a label (or annotation) name Alertmanager 0.25 accepts.
fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
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

/// A `{name: scalar}` object as text values, or why not.
fn text_map(v: &Value, what: &str) -> Result<BTreeMap<String, String>, String> {
    let Value::Object(map) = v else {
        return Err(format!("`{what}` is not an object"));
    };
    let mut out = BTreeMap::new();
    for (k, v) in map {
        if !valid_name(k) {
            return Err(format!(
                "`{what}` has `{k}`, not a name Alertmanager accepts"
            ));
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
/// Why the payload is not a darkwatch alert event: not a JSON object, no `labels` object
/// with an `alertname`, a name Alertmanager refuses, no valid `startsAt`, an unknown
/// `status`, or a `endsAt` that is not RFC 3339.
pub fn to_postable(payload: &[u8], now_epoch_secs: f64) -> Result<Value, String> {
    let event: Value = serde_json::from_slice(payload).map_err(|_| "not JSON".to_string())?;
    let Value::Object(event) = event else {
        return Err("not a JSON object".into());
    };
    let labels = text_map(
        event
            .get("labels")
            .ok_or("no `labels`: not an alert event")?,
        "labels",
    )?;
    if !labels.contains_key("alertname") {
        return Err("`labels` has no `alertname`".into());
    }
    let mut annotations = match event.get("annotations") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(v) => text_map(v, "annotations")?,
    };
    let resolved = match event.get("status").and_then(Value::as_str) {
        Some("resolved") => true,
        Some("firing") | None => false,
        Some(other) => return Err(format!("`status` is `{other}`, not firing or resolved")),
    };
    let starts_at = event
        .get("startsAt")
        .and_then(Value::as_str)
        .ok_or("no `startsAt`")?;
    let start_ms = rfc3339_ms(starts_at)
        .filter(|_| starts_at != ENDS_AT_UNSET)
        .ok_or_else(|| format!("`startsAt` {starts_at:?} is not an RFC 3339 time"))?;
    let ends_at = match event.get("endsAt") {
        None | Some(Value::Null) => None,
        // Go's zero time, to the millisecond (earlier agents wrote it to the second).
        Some(Value::String(s)) if s.starts_with("0001-01-01T00:00:00") || s.is_empty() => None,
        Some(Value::String(s)) => {
            let ms =
                rfc3339_ms(s).ok_or_else(|| format!("`endsAt` {s:?} is not an RFC 3339 time"))?;
            Some((s.clone(), ms))
        }
        Some(_) => return Err("`endsAt` is not a string".into()),
    };
    let ends_at = match (resolved, ends_at) {
        // Alertmanager refuses an end before the start; a resolution must still end it.
        (_, Some((_, ms))) if ms < start_ms => Some(starts_at.to_string()),
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

/// The status code and body of an HTTP/1.x response, or `None` if `raw` holds none.
pub fn parse_response(raw: &[u8]) -> Option<(u16, String)> {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..head_end]).ok()?;
    let status_line = head.lines().next()?;
    let mut parts = status_line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status: u16 = parts.next()?.parse().ok()?;
    let body = String::from_utf8_lossy(&raw[head_end + 4..]).into_owned();
    Some((status, body))
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
        if let Some(h) = raw.windows(4).position(|w| w == b"\r\n\r\n")
            && let Some(len) = content_length(&raw[..h])
            && raw.len() >= h + 4 + len
        {
            break;
        }
        if raw.len() >= MAX_RESPONSE_BYTES {
            break;
        }
    }
    Ok(raw)
}

/// Posts JSON bodies to Alertmanager: one connection per POST (`Connection: close`).
pub struct Poster {
    target: Target,
    timeout: Duration,
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
            tls,
        })
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

    /// One POST of `body` (a JSON array), within the timeout.
    pub async fn post(&self, body: &[u8]) -> Answer {
        let mut request = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: darkwatch/{}\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.target.path,
            self.target.authority,
            env!("CARGO_PKG_VERSION"),
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
                    let tls = connector.connect(name.clone(), tcp).await?;
                    exchange(tls, &request).await
                }
                None => exchange(tcp, &request).await,
            }
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => Answer::Failed(format!("no answer within {:?}", self.timeout)),
            Ok(Err(e)) => Answer::Failed(e.to_string()),
            Ok(Ok(raw)) => match parse_response(&raw) {
                Some((status, body)) => answer(status, body),
                None if raw.is_empty() => {
                    Answer::Failed("connection closed without an answer".into())
                }
                None => Answer::Failed("not an HTTP response".into()),
            },
        }
    }
}

// ---------------------------------------------------------------------------------------
// The bridge.

/// What the bridge counted; the binary prints them at the end and in systemd's STATUS.
#[derive(Debug, Default)]
pub struct BridgeStats {
    /// MQTT messages received (re-deliveries included).
    pub received: AtomicU64,
    /// Alerts Alertmanager accepted.
    pub forwarded: AtomicU64,
    /// Alerts Alertmanager refused with a 4xx (dropped).
    pub rejected: AtomicU64,
    /// Messages that were not darkwatch alert events (acknowledged and dropped).
    pub invalid: AtomicU64,
    /// POSTs accepted.
    pub posts: AtomicU64,
    /// POSTs that failed and were retried (connection errors, timeouts, 5xx).
    pub post_errors: AtomicU64,
    /// MQTT connection failures.
    pub reconnects: AtomicU64,
    pub connected: AtomicBool,
}

impl BridgeStats {
    /// A one-line summary.
    pub fn summary(&self) -> String {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "{} messages received, {} alerts forwarded in {} POSTs, {} refused by Alertmanager, {} not darkwatch alert events, {} failed POSTs retried",
            l(&self.received),
            l(&self.forwarded),
            l(&self.posts),
            l(&self.rejected),
            l(&self.invalid),
            l(&self.post_errors)
        )
    }
}

/// Why the bridge cannot start.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// A configuration error: the dotted key and the reason.
    #[error("key `{key}`: {reason}")]
    Config { key: String, reason: String },
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
    let (client, eventloop) = AsyncClient::new(options, am.batch_max + 16);
    let gate = Arc::new(Mutex::new(Gate::default()));
    let (tx, rx) = unbounded_channel();
    notify.send(&format!("READY=1\nSTATUS=forwarding to {}", poster.url()));
    runtime.block_on(async {
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
            invalid_log: RateLimit::default(),
            invalid_since_log: 0,
        };
        forwarder.run(rx).await;
        notify.send("STOPPING=1");
        pinger.abort();
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
                stats.received.fetch_add(1, Ordering::Relaxed);
                let connection = gate
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .connection;
                if tx
                    .send(Received {
                        publish,
                        connection,
                    })
                    .is_err()
                {
                    return;
                }
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
    invalid_log: RateLimit,
    invalid_since_log: u64,
}

/// How delivering a batch ended.
enum Delivery {
    /// Every alert was accepted or refused for good: acknowledge the batch.
    Done,
    /// Stopped before: leave the batch unacknowledged (the broker keeps it).
    Stopped,
}

impl Forwarder {
    async fn run(mut self, mut rx: UnboundedReceiver<Received>) {
        let mut batch: Vec<Entry> = Vec::new();
        loop {
            let first = tokio::select! {
                biased;
                () = self.stop.wait() => break,
                r = rx.recv() => match r { Some(r) => r, None => break },
            };
            let first = self.entry(first);
            if first.alert.is_none() {
                self.ack(&[first]);
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
                Delivery::Done => self.ack(&batch),
                Delivery::Stopped => {
                    info!(
                        alerts = batch.len(),
                        "Stopping with a batch Alertmanager has not accepted: its messages stay unacknowledged in the broker's session, for the next run."
                    );
                    break;
                }
            }
            batch.clear();
            if self.stop.is_stopped() {
                break;
            }
        }
    }

    /// A received message as a batch entry, its payload converted (or counted as invalid).
    fn entry(&mut self, received: Received) -> Entry {
        let alert = match to_postable(&received.publish.payload, crate::mqtt::epoch_secs()) {
            Ok(alert) => Some(alert),
            Err(why) => {
                self.stats.invalid.fetch_add(1, Ordering::Relaxed);
                self.invalid_since_log += 1;
                if self.invalid_log.ready() {
                    warn!(
                        topic = %received.publish.topic,
                        why = %why,
                        count = self.invalid_since_log,
                        "Dropped MQTT messages that are not darkwatch alert events (count: since the last such line); check [alertmanager] subscribe."
                    );
                    self.invalid_since_log = 0;
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
            return Delivery::Done;
        }
        match self.post_until_answered(&alerts).await {
            None => Delivery::Stopped,
            Some(Ok(())) => Delivery::Done,
            Some(Err(_)) if alerts.len() > 1 => {
                // One bad alert must not cost the others: each alone.
                debug!(
                    alerts = alerts.len(),
                    "Alertmanager refused the batch; posting its alerts one by one."
                );
                for alert in alerts {
                    match self.post_until_answered(&[alert]).await {
                        None => return Delivery::Stopped,
                        Some(Ok(())) => {}
                        Some(Err((status, body))) => self.refused(&[alert], status, &body),
                    }
                }
                Delivery::Done
            }
            Some(Err((status, body))) => {
                self.refused(&alerts, status, &body);
                Delivery::Done
            }
        }
    }

    fn refused(&mut self, alerts: &[&Value], status: u16, body: &str) {
        self.stats
            .rejected
            .fetch_add(alerts.len() as u64, Ordering::Relaxed);
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
                total = self.stats.rejected.load(Ordering::Relaxed),
                "Alertmanager refused an alert; dropped (a 4xx cannot succeed on a retry)."
            );
        } else {
            debug!(status, body = %shorten(body), labels = %labels, "Alertmanager refused an alert; dropped.");
        }
    }

    /// One batch: `Some(Ok)` accepted, `Some(Err((status, body)))` refused, `None` stopped
    /// while failing. Retries with a backoff from 0.5 s doubling to `retry_max`.
    async fn post_until_answered(
        &mut self,
        alerts: &[&Value],
    ) -> Option<Result<(), (u16, String)>> {
        let body = serde_json::to_vec(alerts).unwrap_or_else(|_| b"[]".to_vec());
        let mut delay = RETRY_MIN;
        let mut failures = 0u64;
        loop {
            match self.poster.post(&body).await {
                Answer::Accepted => {
                    self.stats.posts.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .forwarded
                        .fetch_add(alerts.len() as u64, Ordering::Relaxed);
                    if failures > 0 {
                        info!(failures, "Alertmanager accepts alerts again.");
                    }
                    return Some(Ok(()));
                }
                Answer::Refused { status, body } => return Some(Err((status, body))),
                Answer::Failed(why) => {
                    self.stats.post_errors.fetch_add(1, Ordering::Relaxed);
                    failures += 1;
                    if failures == 1 {
                        warn!(url = %self.poster.url(), error = %why, alerts = alerts.len(), "POST to Alertmanager failed; retrying with a growing backoff (the alerts stay unacknowledged in MQTT meanwhile).");
                    } else {
                        debug!(error = %why, failures, ?delay, "POST to Alertmanager still failing.");
                    }
                    if self.stop.is_stopped() {
                        return None;
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
        for (payload, why) in [
            (&b"garbage"[..], "not JSON"),
            (br#"{"status":"online","node":"n1"}"#, "labels"),
            (br#"[1,2]"#, "object"),
            (br#"{"labels":{"stream":"s"},"startsAt":"2024-01-01T00:00:00Z"}"#, "alertname"),
            (br#"{"labels":{"alertname":"A"}}"#, "startsAt"),
            (br#"{"labels":{"alertname":"A"},"startsAt":"yesterday"}"#, "RFC 3339"),
            (br#"{"labels":{"alertname":"A","bad-name":"x"},"startsAt":"2024-01-01T00:00:00Z"}"#, "bad-name"),
            (br#"{"labels":{"alertname":"A"},"startsAt":"2024-01-01T00:00:00Z","status":"pending"}"#, "pending"),
        ] {
            let err = to_postable(payload, 0.0).unwrap_err();
            assert!(err.contains(why), "{err} (wanted {why})");
        }
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
        let mqtt = MqttConfig {
            node_name: "n7".into(),
            ..MqttConfig::default()
        };
        assert_eq!(node.filters_for(&mqtt), ["darkwatch/n7/alerts/#"]);
        assert_eq!(node.client_id_for(&mqtt), "darkwatch-alertmanager-n7");
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
}
