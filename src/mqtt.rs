//! The MQTT side of the agent: the client that brings data messages in and takes alerts
//! out, and the optional in-process broker (rumqttd) for a single-machine setup.
//!
//! The agent feeds it [`Outgoing`] alerts through a channel. It hands every received data
//! message to the agent's [`Inbox`] on its own thread, borrowed from rumqttc's read buffer;
//! a refused message is dropped and counted in [`MqttStats::incoming_dropped`]. The agent's
//! inbox decodes and assembles right there and pushes frames into the scorer's ring, so a
//! message wakes no other thread on its way in (a bounded `SyncSender` is an inbox too).
//! Alerts pass through the crash-safe [`Spool`] before they are published, so neither an
//! outage of the broker nor a crash of the process loses one (at-least-once: duplicates are
//! possible, loss is not, unless the spool overflows its `max_bytes`).
//!
//! # Threads and tasks
//!
//! [`spawn_client`] starts one OS thread with a current-thread tokio runtime and two tasks:
//!
//! - the *driver* polls rumqttc's `EventLoop` and is never cancelled mid-poll. It hands
//!   received publishes to the [`Inbox`] itself and forwards ConnAck, PubAck, the packet id of
//!   every outgoing publish and every connection error to the controller. After an error
//!   it sleeps (100 ms doubling to 5 s): rumqttc has no backoff of its own. A session the
//!   broker closes within 10 s of its ConnAck counts as a failed attempt, so two clients
//!   sharing a client id back off instead of taking the session from each other every
//!   100 ms.
//! - the *controller* owns the spool. It wakes on a driver event, on an alert sent to the
//!   outgoing channel, or on [`ClientStop::stop`], drains the outgoing channel into the
//!   spool, and publishes from the spool in order. It does not poll the channel for
//!   alerts. A 10 ms tick runs only while publishing is held up by something no event
//!   reports (the spool or rumqttc's request queue refused) and after `stop`; otherwise
//!   the controller sleeps. (An unconditional tick cost 100 wake-ups a second, and each
//!   re-armed timer woke the thread's own event loop once more.)
//!
//! # Spool-driven publishing
//!
//! Every spool record gets a sequence number. The controller keeps an in-memory mirror of
//! the records appended in this run (the spool cannot be read past its head) and a FIFO of
//! the records in flight on the current connection, at most `inflight_max` long.
//! rumqttc reports `Outgoing::Publish(pkid)` for requests in the order they were queued,
//! which is how a packet id is tied to a record. A PubAck marks its record; acknowledged
//! records at the front of the FIFO are acknowledged in the spool, in order (a PubAck that
//! overtakes an older one waits for it). On every (re)connect the FIFO is cleared and
//! publishing restarts at the spool's head, oldest first. rumqttc's own retransmission
//! is not used: with a clean session it discards its queue on reconnect, and only the
//! controller publishes while it knows the connection is up.
//!
//! Records left by an earlier run (the spool's backlog at start) are not in the mirror:
//! they are published one at a time from [`Spool::peek`], each acknowledged before the next,
//! and records of this run wait behind them. Once the backlog is gone, publishing is
//! pipelined. A large backlog therefore drains at one round trip per alert.
//!
//! # Record format in the spool
//!
//! `version: u8 = 1 | flags: u8 (bit 0 = retain) | topic_len: u16 LE | topic | payload`.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing as Sent,
    Packet, QoS, SubscribeFilter,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tracing::{debug, info, warn};

use crate::spool::{Spool, SpoolError};

/// Largest packet accepted from the broker. A larger one makes rumqttc drop the connection,
/// so this is generous: a retained oversize message would otherwise loop forever.
pub const MAX_INCOMING_PACKET_BYTES: usize = 16 << 20;

/// Largest packet sent, and the embedded broker's payload limit. Alerts whose topic and
/// payload do not fit are refused before they are spooled (see [`MqttStats::outgoing_rejected`]).
pub const MAX_OUTGOING_PACKET_BYTES: usize = 1 << 20;

/// The largest spool payload an outgoing message makes ([`encode_record`]: its header,
/// topic and payload, which [`check_outgoing`] keeps within [`MAX_OUTGOING_PACKET_BYTES`]
/// less the publish header).
pub const MAX_SPOOL_PAYLOAD_BYTES: u64 =
    (RECORD_HEADER_BYTES + MAX_OUTGOING_PACKET_BYTES - PUBLISH_OVERHEAD_BYTES) as u64;

/// The smallest `[spool] max_bytes` a configuration may set: 8 MiB less 32 bytes. A spool
/// record, framing included, may take `max_bytes /`
/// [`SEGMENTS_PER_SPOOL`](crate::spool::SEGMENTS_PER_SPOOL), and this much holds the
/// largest one an alert makes ([`MAX_SPOOL_PAYLOAD_BYTES`]), so the spool never refuses
/// an alert that fits an MQTT packet. (Alerts are a few KiB; no smaller bound holds for
/// all of them, as feature and stream names have no length limit.)
pub const MIN_SPOOL_MAX_BYTES: u64 = crate::spool::SEGMENTS_PER_SPOOL
    * (crate::spool::RECORD_HEADER_BYTES + MAX_SPOOL_PAYLOAD_BYTES);

/// Upper bound on `inflight_max`: rumqttc needs a few packet ids beyond it.
pub const MAX_INFLIGHT: u16 = u16::MAX - 16;

/// Default `[mqtt] embedded_log_bytes`: 2 MiB of topic and payload bytes per subscription
/// filter. The log stays full once that much has been published, so it is memory held for
/// good under any sustained input, and rumqttd keeps more than it counts. Measured with the
/// release binary (`agent::load::embedded_rss`: ExaMon at 38,000 messages/s, 1k frames/s
/// of the bundled 38-feature model), the agent's RSS levels off at about 23, 27, 32, 36,
/// 92 and 303 MB with logs of 1, 2, 3, 4, 16 and 64 MiB: about 4.5 MB per MiB. 2 MiB is the
/// largest that keeps the agent within its 30 MB target under that input. It holds 29,500
/// ExaMon messages (71 counted bytes each), 0.8 s of that input or 8 s at 3,800
/// messages/s, or 680 raw frames of 768 float32 values (0.3 s at 2,300 frames/s): a
/// subscriber that falls further behind loses the oldest, counted. A longer burst needs a
/// bigger log, at that memory cost: the 5,000 such frames of the `embedded_backlog` trial
/// need 16 MiB, and on a 2-core host at load average 6 to 10 that input lost 0.7 to 20 %
/// to skips with 2 MiB and none with 16 MiB.
pub const DEFAULT_EMBEDDED_LOG_BYTES: u64 = 2 << 20;
/// Smallest `[mqtt] embedded_log_bytes`.
pub const MIN_EMBEDDED_LOG_BYTES: u64 = 1 << 20;
/// Largest `[mqtt] embedded_log_bytes` (64 GiB): a bound on a typo, not a recommendation.
pub const MAX_EMBEDDED_LOG_BYTES: u64 = 64 << 30;
/// The most the embedded broker takes: [`MAX_INCOMING_PACKET_BYTES`], 16 MiB. rumqttd and
/// rumqttc both bound a packet's remaining length (its topic, packet id and payload), so
/// the agent's own client receives every message the broker took; a bigger limit would
/// let through messages that drop the agent's connection each time they are delivered.
pub const MAX_EMBEDDED_PAYLOAD_BYTES: usize = MAX_INCOMING_PACKET_BYTES;

/// The embedded broker's packet limit (topic, packet id and payload) for a log of
/// `log_bytes` per filter: half the log, at least [`MAX_OUTGOING_PACKET_BYTES`] (1 MiB,
/// the fixed limit before it grew with the log) and at most [`MAX_EMBEDDED_PAYLOAD_BYTES`].
/// Half, so that the log holds the largest message and as much again: a subscriber a
/// message behind loses nothing. The default 2 MiB log takes messages up to 1 MiB (340
/// frames of 768 float32 values); a 16 MiB log, 8 MiB (a 2,730-token prompt at d = 768,
/// 512 tokens at d = 4096); 32 MiB or more, 16 MiB.
pub fn embedded_max_payload(log_bytes: u64) -> usize {
    let half = usize::try_from(log_bytes / 2).unwrap_or(usize::MAX);
    half.clamp(MAX_OUTGOING_PACKET_BYTES, MAX_EMBEDDED_PAYLOAD_BYTES)
}

/// The running embedded broker's payload limit (0 before one starts), for its too-large
/// warning.
static EMBEDDED_MAX_PAYLOAD: AtomicU64 = AtomicU64::new(0);

/// Segments of the embedded broker's log: it drops one at a time, oldest first.
const EMBEDDED_LOG_SEGMENTS: u64 = 16;

/// Payload of the last will and of the status published on a clean stop.
/// The retained status of node `node`: `{"status":"online"|"offline","node":…}`.
pub fn status_payload(online: bool, node: &str) -> String {
    serde_json::json!({"status": if online { "online" } else { "offline" }, "node": node})
        .to_string()
}

/// How long [`spawn_client`]'s thread keeps flushing after `stop` is set.
pub const STOP_DEADLINE: Duration = Duration::from_secs(5);

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A connection that ends sooner than this after its ConnAck counts as a failed attempt:
/// the backoff keeps growing instead of starting again at [`BACKOFF_MIN`]. Longer than
/// [`BACKOFF_MAX`], because two clients that take one client id from each other each hold
/// the session until the other's backoff ends.
const STABLE_SESSION: Duration = Duration::from_secs(10);
/// How often the controller wakes to retry a stalled publish, or to check its drain after
/// `stop`.
const TICK: Duration = Duration::from_millis(10);
/// Alerts the spool could not take that wait, in memory, to be published without it (while
/// the broker is away or older alerts are ahead of them); past it the oldest is lost.
pub const MAX_UNSPOOLED: usize = 1024;

/// How often a repeated spool failure is logged: the first one at once, then at most one
/// `warn!` per period with the count since the last.
const SPOOL_WARN_PERIOD: Duration = Duration::from_secs(60);

/// Outgoing alerts moved into the spool per wake-up, so events are not starved.
const DRAIN_PER_TURN: usize = 1024;
/// Packet ids rumqttc may use beyond `inflight_max`: subscribe and the two status publishes.
const EXTRA_PKIDS: u16 = 8;
/// Fixed header, topic length and packet id of a publish, at most.
const PUBLISH_OVERHEAD_BYTES: usize = 16;
const RECORD_VERSION: u8 = 1;
const RECORD_HEADER_BYTES: usize = 4;
const BROKER_WAIT: Duration = Duration::from_secs(5);
const BROKER_POLL: Duration = Duration::from_millis(20);
/// How long a clean stop waits for the DISCONNECT to be written.
const DISCONNECT_WAIT: Duration = Duration::from_secs(1);

/// Where the broker comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BrokerMode {
    /// Start rumqttd inside the agent on `host:port` ([`start_embedded_broker`]).
    #[default]
    Embedded,
    /// Connect to a broker that runs elsewhere.
    External,
}

/// The MQTT client (and embedded broker) settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// "embedded": start an in-process rumqttd on host:port (port 0 = pick a free one);
    /// "external": connect to a broker.
    pub broker: BrokerMode,
    /// Broker host (embedded: the address to listen on).
    pub host: String,
    /// Broker port; 0 only with an embedded broker (a free port is picked).
    pub port: u16,
    /// MQTT client id; empty means `darkwatch-<node name>`.
    pub client_id: String,
    /// Username; empty means none.
    pub username: String,
    /// Password; only with a username.
    pub password: String,
    /// MQTT keep-alive in seconds (0 turns it off; at most 65535).
    pub keep_alive_secs: u64,
    /// Topic filters subscribed at QoS 1 on every connect; what arrives becomes [`Incoming`].
    /// `{node}` is this agent's node name ([`Self::node`]); any other `{…}` is refused.
    /// Default [`DEFAULT_SUBSCRIBE`]: this node's ExaMon metrics.
    /// From the environment: comma-separated (`DARKWATCH__MQTT__SUBSCRIBE=a/#,b/+/c`).
    #[serde(deserialize_with = "crate::config::strings")]
    pub subscribe: Vec<String>,
    /// Topic of a stream's alerts: `{node}` is this agent's node name, `{stream}` the stream.
    pub alert_topic: String,
    /// Retained status topic (`online` on connect, `offline` as last will and on stop).
    pub status_topic: String,
    /// Node name used in topics; empty means the machine's hostname.
    pub node_name: String,
    /// Most alert publishes waiting for a PubAck at once.
    pub inflight_max: u16,
    /// Received messages held while the agent's pipeline is not running (during a reload):
    /// the next turn takes them first; more are counted and dropped.
    pub incoming_capacity: usize,
    /// The embedded broker's in-memory log, in bytes of topic and payload per subscription
    /// filter: how far a subscriber (this agent) may fall behind the publishers before the
    /// broker skips the oldest messages it has not delivered (counted in
    /// [`broker_skipped`]). The log stays this full once this much has been published, so
    /// it is memory the process holds ([`DEFAULT_EMBEDDED_LOG_BYTES`]; at least
    /// [`MIN_EMBEDDED_LOG_BYTES`]). It also sets the largest message the broker takes,
    /// half of it within 1 to 16 MiB ([`embedded_max_payload`]). The log is 17 segments
    /// of a sixteenth of it ([`embedded_router`]), and rumqttd starts a new segment only once
    /// one is full, so each can exceed its size by a whole message: with large messages
    /// the log holds up to 17 × (log / 16 + the largest message), about 9.6 times this
    /// setting with messages of half of it. Ignored with an external broker.
    pub embedded_log_bytes: u64,
    /// Connect to the (external) broker over TLS (rustls), checking its certificate
    /// against `ca_file` and its name against `host`.
    pub tls: bool,
    /// PEM file of the CA certificate(s) that signed the broker's certificate; required
    /// with `tls` (a public CA: the system bundle, e.g. `/etc/ssl/certs/ca-certificates.crt`).
    pub ca_file: PathBuf,
    /// PEM client certificate (chain) for brokers that require one; empty: none.
    pub client_cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `client_cert_file`.
    pub client_key_file: PathBuf,
}

/// The default `subscribe` filter: this node's ExaMon metrics (one agent per node).
pub const DEFAULT_SUBSCRIBE: &str = "org/+/cluster/+/node/{node}/plugin/+/chnl/data/#";

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            broker: BrokerMode::Embedded,
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: String::new(),
            username: String::new(),
            password: String::new(),
            keep_alive_secs: 30,
            subscribe: vec![DEFAULT_SUBSCRIBE.into()],
            alert_topic: "darkwatch/{node}/alerts/{stream}".into(),
            status_topic: "darkwatch/{node}/status".into(),
            node_name: String::new(),
            inflight_max: 100,
            incoming_capacity: 65536,
            embedded_log_bytes: DEFAULT_EMBEDDED_LOG_BYTES,
            tls: false,
            ca_file: PathBuf::new(),
            client_cert_file: PathBuf::new(),
            client_key_file: PathBuf::new(),
        }
    }
}

impl MqttConfig {
    /// Semantic checks the types cannot express. Returns the key and the reason.
    ///
    /// # Errors
    /// An empty host, port 0 with an external broker, a keep-alive over 65535 s, a password
    /// without a username, an invalid subscribe filter (or one with a `{…}` other than
    /// `{node}`), an alert or status topic with a
    /// wildcard or a `{…}` it does not fill in, `inflight_max` outside
    /// `1..=MAX_INFLIGHT`, `incoming_capacity` 0, or `embedded_log_bytes` outside
    /// `MIN_EMBEDDED_LOG_BYTES..=MAX_EMBEDDED_LOG_BYTES`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.host.trim().is_empty() {
            return Err(("host", "must not be empty".into()));
        }
        if self.port == 0 && self.broker == BrokerMode::External {
            return Err(("port", "must not be 0 with an external broker".into()));
        }
        if self.keep_alive_secs > u64::from(u16::MAX) {
            return Err((
                "keep_alive_secs",
                format!("must be at most 65535, got {}", self.keep_alive_secs),
            ));
        }
        if self.username.is_empty() && !self.password.is_empty() {
            return Err(("password", "is set but `username` is empty".into()));
        }
        if self.subscribe.is_empty() {
            return Err((
                "subscribe",
                "needs at least one topic filter: the agent would receive nothing".into(),
            ));
        }
        for filter in &self.subscribe {
            // `{node}` stands for one topic level; a node name never holds a wildcard.
            let probe = filter.replace("{node}", "node");
            check_filter(&probe).map_err(|reason| ("subscribe", format!("`{filter}` {reason}")))?;
            if let Some(bad) = unknown_placeholder(&probe) {
                return Err((
                    "subscribe",
                    format!(
                        "`{filter}` has `{bad}`, which is not a placeholder here and would be subscribed as it is; subscribe fills in {{node}} only (this agent's [mqtt] node_name, or the hostname)"
                    ),
                ));
            }
        }
        for (key, topic, fills) in [
            (
                "alert_topic",
                &self.alert_topic,
                &["{node}", "{stream}"][..],
            ),
            ("status_topic", &self.status_topic, &["{node}"]),
        ] {
            let probe = fills.iter().fold(topic.clone(), |t, p| t.replace(p, "x"));
            if probe.is_empty() || !rumqttc::valid_topic(&probe) || probe.contains('\0') {
                return Err((
                    key,
                    format!("`{topic}` is not a valid topic (empty, or has `+`, `#` or NUL)"),
                ));
            }
            // Any other `{…}` would be published as it is.
            if let Some(bad) = unknown_placeholder(&probe) {
                return Err((
                    key,
                    format!(
                        "`{topic}` has `{bad}`, which is not a placeholder here and would be published as it is; {key} fills in {}",
                        fills.join(" and ")
                    ),
                ));
            }
        }
        if self.inflight_max == 0 || self.inflight_max > MAX_INFLIGHT {
            return Err((
                "inflight_max",
                format!("must be in 1..={MAX_INFLIGHT}, got {}", self.inflight_max),
            ));
        }
        if self.incoming_capacity == 0 {
            return Err(("incoming_capacity", "must be at least 1".into()));
        }
        if !(MIN_EMBEDDED_LOG_BYTES..=MAX_EMBEDDED_LOG_BYTES).contains(&self.embedded_log_bytes) {
            return Err((
                "embedded_log_bytes",
                format!(
                    "must be in {MIN_EMBEDDED_LOG_BYTES}..={MAX_EMBEDDED_LOG_BYTES} (1 MiB to 64 GiB), got {}",
                    self.embedded_log_bytes
                ),
            ));
        }
        let files = [
            ("ca_file", &self.ca_file),
            ("client_cert_file", &self.client_cert_file),
            ("client_key_file", &self.client_key_file),
        ];
        if !self.tls {
            if let Some((key, _)) = files.iter().find(|(_, f)| !f.as_os_str().is_empty()) {
                return Err((key, "is set but `tls` is false".into()));
            }
            return Ok(());
        }
        if self.broker == BrokerMode::Embedded {
            return Err((
                "tls",
                "needs broker = \"external\" (the embedded broker listens on plain TCP)".into(),
            ));
        }
        if self.ca_file.as_os_str().is_empty() {
            return Err((
                "ca_file",
                "is required with tls = true (PEM CA certificates; for a public CA the system bundle, e.g. /etc/ssl/certs/ca-certificates.crt)".into(),
            ));
        }
        if self.client_cert_file.as_os_str().is_empty()
            != self.client_key_file.as_os_str().is_empty()
        {
            return Err((
                "client_key_file",
                "client_cert_file and client_key_file go together".into(),
            ));
        }
        Ok(())
    }

    /// This agent's node name: `node_name`, or the machine's hostname
    /// (`/proc/sys/kernel/hostname`, then `$HOSTNAME`, then `localhost`). `+`, `#`, `/` and
    /// NUL become `_` so the name is one topic level.
    pub fn node(&self) -> String {
        let name = if self.node_name.trim().is_empty() {
            hostname()
        } else {
            self.node_name.trim().to_string()
        };
        topic_level(&name)
    }

    /// The MQTT client id: `client_id`, or `darkwatch-<node>`.
    pub fn client_id_for(&self) -> String {
        if self.client_id.is_empty() {
            format!("darkwatch-{}", self.node())
        } else {
            self.client_id.clone()
        }
    }

    /// The alert topic of `stream`. `+`, `#` and NUL in the stream become `_` (they are not
    /// allowed in a topic); `/` is kept and so adds topic levels.
    pub fn alert_topic_for(&self, stream: &str) -> String {
        let stream = topic_safe(stream);
        self.alert_topic
            .replace("{node}", &self.node())
            .replace("{stream}", &stream)
    }

    /// The status topic with `{node}` filled in.
    pub fn status_topic_for(&self) -> String {
        self.status_topic.replace("{node}", &self.node())
    }

    /// The `subscribe` filters with `{node}` filled in ([`Self::node`]): what the client
    /// subscribes and what names raw streams.
    pub fn subscribe_filters(&self) -> Vec<String> {
        let node = self.node();
        self.subscribe
            .iter()
            .map(|f| f.replace("{node}", &node))
            .collect()
    }
}

/// `stream` as a topic's levels: `+`, `#` and NUL (not allowed in a topic) become `_`;
/// `/` is kept and so adds levels. Shared by the alert and score topics.
fn topic_safe(stream: &str) -> String {
    stream
        .chars()
        .map(|c| {
            if matches!(c, '+' | '#' | '\0') {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// darkwatch's own output topics (alerts, status, scores), as patterns its input skips: a
/// subscription as wide as `#` would otherwise read the agent's own messages (and another
/// darkwatch's on a shared broker) as input, and refuse them by the hundred (an operator's
/// trial: 26 `bad_payload` in 8 s against 32 real messages). Each template level is a
/// literal, a placeholder matching one level (`{node}`, `{metric}`), or `{stream}`, which
/// matches one level or more ([`topic_safe`] keeps a stream's `/`). Templates with no
/// literal level would match every topic and are left out. Matching allocates nothing.
#[derive(Debug, Clone, Default)]
pub struct OwnTopics {
    templates: Vec<Vec<OwnLevel>>,
}

#[derive(Debug, Clone, PartialEq)]
enum OwnLevel {
    Literal(String),
    One,
    Many,
}

impl OwnTopics {
    /// The patterns of `templates` (those with at least one literal level).
    pub fn new<'a>(templates: impl IntoIterator<Item = &'a str>) -> OwnTopics {
        let templates = templates
            .into_iter()
            .map(|t| {
                t.split('/')
                    .map(|level| match level {
                        "{stream}" => OwnLevel::Many,
                        l if l.contains(['{', '}']) => OwnLevel::One,
                        l => OwnLevel::Literal(l.to_string()),
                    })
                    .collect::<Vec<_>>()
            })
            .filter(|levels| levels.iter().any(|l| matches!(l, OwnLevel::Literal(_))))
            .collect();
        OwnTopics { templates }
    }

    /// The agent's output topics under `cfg`: `alert_topic`, `status_topic` and `[scores]
    /// topic` (whether or not this agent publishes scores: another darkwatch may).
    pub fn of(cfg: &MqttConfig, scores: &ScoresConfig) -> OwnTopics {
        OwnTopics::new([
            cfg.alert_topic.as_str(),
            cfg.status_topic.as_str(),
            scores.topic.as_str(),
        ])
    }

    /// Whether `topic` is one of those outputs.
    pub fn matches(&self, topic: &str) -> bool {
        self.templates.iter().any(|t| levels_match(t, Some(topic)))
    }
}

/// Whether `topic`'s levels (`None`: no levels left) fit `levels`.
fn levels_match(levels: &[OwnLevel], topic: Option<&str>) -> bool {
    fn split(t: &str) -> (&str, Option<&str>) {
        match t.split_once('/') {
            Some((first, rest)) => (first, Some(rest)),
            None => (t, None),
        }
    }
    match (levels.split_first(), topic) {
        (None, rest) => rest.is_none(),
        (Some(_), None) => false,
        (Some((OwnLevel::Literal(l), more)), Some(t)) => {
            let (first, rest) = split(t);
            first == l && levels_match(more, rest)
        }
        (Some((OwnLevel::One, more)), Some(t)) => levels_match(more, split(t).1),
        (Some((OwnLevel::Many, more)), Some(t)) => {
            // One level or more: try every split after the first level.
            let mut rest = split(t).1;
            loop {
                if levels_match(more, rest) {
                    return true;
                }
                match rest {
                    Some(r) => rest = split(r).1,
                    None => return false,
                }
            }
        }
    }
}

/// The first `{` or `}` left in `text` once its placeholders are filled in: a `{…}`
/// within one topic level, or a lone brace with the rest of its level (`{node` of
/// `darkwatch/{node/alerts`). It would go to the broker as it is.
pub(crate) fn unknown_placeholder(text: &str) -> Option<&str> {
    let at = text.find(['{', '}'])?;
    let rest = &text[at..];
    if rest.starts_with('{')
        && let Some(end) = rest.find(['}', '/'])
        && rest[end..].starts_with('}')
    {
        return Some(&rest[..=end]);
    }
    Some(rest.split('/').next().unwrap_or(rest))
}

/// Whether two topic templates can give one topic, or one a topic under the other's: the
/// literal parts before their first `{stream}`/`{metric}` (`{node}` being one node for
/// both), one a prefix of the other (a stream may hold `/`). Conservative: a template
/// that starts with `{stream}` overlaps everything.
pub(crate) fn templates_overlap(one: &str, other: &str) -> bool {
    let head = |t: &str| -> String {
        let t = t.replace("{node}", "\0");
        let end = ["{stream}", "{metric}"]
            .iter()
            .filter_map(|p| t.find(p))
            .min()
            .unwrap_or(t.len());
        t[..end].to_string()
    };
    let (a, b) = (head(one), head(other));
    a.starts_with(&b) || b.starts_with(&a)
}

/// Prefix of a shared subscription: `$share/<group>/<filter>`.
pub const SHARE_PREFIX: &str = "$share/";

/// Splits a shared subscription `$share/<group>/<filter>` into group and filter; `None`
/// for an ordinary filter.
pub fn shared_subscription(filter: &str) -> Option<(&str, &str)> {
    filter.strip_prefix(SHARE_PREFIX)?.split_once('/')
}

/// Checks a subscribe filter: an MQTT topic filter, or a shared subscription whose group
/// is a non-empty name without wildcards and whose filter is valid.
pub(crate) fn check_filter(filter: &str) -> Result<(), String> {
    if filter.contains('\0') {
        return Err("contains NUL".into());
    }
    let inner = if filter.starts_with(SHARE_PREFIX) {
        match shared_subscription(filter) {
            Some((group, inner)) if !group.is_empty() && !group.contains(['+', '#']) => inner,
            _ => {
                return Err(
                    "is not a valid shared subscription (`$share/<group>/<filter>`, the group without `+` or `#`)"
                        .into(),
                );
            }
        }
    } else {
        filter
    };
    if !rumqttc::valid_filter(inner) {
        return Err("is not a valid topic filter".into());
    }
    Ok(())
}

fn hostname() -> String {
    let from_proc = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string());
    let from_env = || std::env::var("HOSTNAME").ok().map(|s| s.trim().to_string());
    from_proc
        .filter(|s| !s.is_empty())
        .or_else(|| from_env().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "localhost".into())
}

fn topic_level(name: &str) -> String {
    name.chars()
        .map(|c| {
            if matches!(c, '+' | '#' | '/' | '\0') {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// Why the broker or the client cannot start.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("embedded MQTT broker on {addr}: {reason}")]
    Broker { addr: String, reason: String },
    #[error("mqtt config: `{key}` {reason}")]
    Config { key: &'static str, reason: String },
    #[error("mqtt TLS: {file}: {reason}")]
    Tls { file: String, reason: String },
    #[error("cannot start the {what}: {source}")]
    Spawn {
        what: &'static str,
        source: io::Error,
    },
}

/// Starts rumqttd in-process on `host:port` (0 = a free port) on its own thread and returns
/// the bound port once it accepts TCP connections, with the default log
/// ([`DEFAULT_EMBEDDED_LOG_BYTES`]); see [`start_embedded_broker_with`].
///
/// # Errors
/// As [`start_embedded_broker_with`].
pub fn start_embedded_broker(host: &str, port: u16) -> Result<u16, MqttError> {
    start_embedded_broker_with(host, port, DEFAULT_EMBEDDED_LOG_BYTES)
}

/// Starts rumqttd in-process on `host:port` (0 = a free port) on its own thread and returns
/// the bound port once it accepts TCP connections. rumqttd has no shutdown: the broker
/// lives until the process exits.
///
/// rumqttd keeps the messages of each subscription filter in an in-memory log of
/// `log_bytes` (topic and payload bytes; [`embedded_router`]) and delivers from it at each
/// subscriber's pace. A subscriber that falls further behind than that loses the oldest
/// messages it has not had, although their publishers were acknowledged: the broker moves
/// its read cursor past them. [`BrokerSkipHook`] counts those ([`broker_skipped`]).
///
/// # Errors
/// [`MqttError::Broker`] (with the address) if `host` does not resolve, the port is taken,
/// the broker stops, or it does not accept a connection within 5 s; [`MqttError::Config`]
/// if `log_bytes` is outside `MIN_EMBEDDED_LOG_BYTES..=MAX_EMBEDDED_LOG_BYTES`;
/// [`MqttError::Spawn`] if the thread cannot start.
pub fn start_embedded_broker_with(host: &str, port: u16, log_bytes: u64) -> Result<u16, MqttError> {
    let router = embedded_router(log_bytes)?;
    let max_payload = embedded_max_payload(log_bytes);
    let shown = format!("{host}:{port}");
    let broker_err = |addr: &str, reason: String| MqttError::Broker {
        addr: addr.to_string(),
        reason,
    };
    let addr: SocketAddr = (host, port)
        .to_socket_addrs()
        .map_err(|e| broker_err(&shown, format!("cannot resolve the host: {e}")))?
        .next()
        .ok_or_else(|| broker_err(&shown, "the host resolves to no address".into()))?;
    // rumqttd only logs a failed bind, so find out here: bind, note the port, let it go.
    let addr = TcpListener::bind(addr)
        .and_then(|l| l.local_addr())
        .map_err(|e| broker_err(&shown, format!("cannot listen: {e}")))?;
    let shown = addr.to_string();

    let server = rumqttd::ServerSettings {
        name: "darkwatch-mqttd-v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 5000,
            max_payload_size: max_payload,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router,
        v4: Some([("1".to_string(), server)].into_iter().collect()),
        ..Default::default()
    };
    let (done_tx, done_rx) = mpsc::channel::<String>();
    std::thread::Builder::new()
        .name("darkwatch-mqttd".into())
        .spawn(move || {
            let reason = match rumqttd::Broker::new(config).start() {
                Ok(()) => "the broker stopped (could it bind?)".to_string(),
                Err(e) => e.to_string(),
            };
            let _ = done_tx.send(reason);
        })
        .map_err(|source| MqttError::Spawn {
            what: "embedded MQTT broker thread",
            source,
        })?;

    let start = Instant::now();
    loop {
        if let Ok(reason) = done_rx.try_recv() {
            return Err(broker_err(&shown, reason));
        }
        if TcpStream::connect_timeout(&addr, BROKER_POLL).is_ok() {
            EMBEDDED_MAX_PAYLOAD.store(max_payload as u64, Ordering::Relaxed);
            info!(addr = %addr, max_payload_bytes = max_payload, "Embedded MQTT broker is listening.");
            return Ok(addr.port());
        }
        if start.elapsed() >= BROKER_WAIT {
            return Err(broker_err(
                &shown,
                format!("not accepting connections after {BROKER_WAIT:?}"),
            ));
        }
        std::thread::sleep(BROKER_POLL);
    }
}

/// The embedded broker's router settings for a log of `log_bytes` per subscription filter.
///
/// rumqttd keeps `max_segment_count` segments of `max_segment_size` bytes (the active one
/// included) and drops the oldest segment when the active one fills and the count is
/// reached. With 16 segments of `log_bytes / 16` and one more as the active one, a
/// subscriber that is `log_bytes` behind has lost nothing yet.
///
/// # Errors
/// [`MqttError::Config`] (`embedded_log_bytes`) outside
/// `MIN_EMBEDDED_LOG_BYTES..=MAX_EMBEDDED_LOG_BYTES` (rumqttd panics on a segment under
/// 1 KiB).
pub fn embedded_router(log_bytes: u64) -> Result<rumqttd::RouterConfig, MqttError> {
    if !(MIN_EMBEDDED_LOG_BYTES..=MAX_EMBEDDED_LOG_BYTES).contains(&log_bytes) {
        return Err(MqttError::Config {
            key: "embedded_log_bytes",
            reason: format!(
                "must be in {MIN_EMBEDDED_LOG_BYTES}..={MAX_EMBEDDED_LOG_BYTES}, got {log_bytes}"
            ),
        });
    }
    let segment = usize::try_from(log_bytes.div_ceil(EMBEDDED_LOG_SEGMENTS)).map_err(|_| {
        MqttError::Config {
            key: "embedded_log_bytes",
            reason: format!("{log_bytes} does not fit this machine's address space"),
        }
    })?;
    Ok(rumqttd::RouterConfig {
        max_connections: 1000,
        max_outgoing_packet_count: 200,
        max_segment_size: segment,
        max_segment_count: EMBEDDED_LOG_SEGMENTS as usize + 1,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    })
}

/// Messages the embedded broker skipped since the process started ([`broker_skipped`]).
static BROKER_SKIPPED: AtomicU64 = AtomicU64::new(0);
/// Times it skipped (each one message or more).
static BROKER_SKIPS: AtomicU64 = AtomicU64::new(0);
/// The subscription filter of the latest skip.
static BROKER_SKIP_FILTER: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());
/// Whether a [`BrokerSkipHook`] was made (the binary installs one; the counts are 0
/// without).
static BROKER_SKIP_HOOKED: AtomicBool = AtomicBool::new(false);

/// What the embedded broker skipped for subscribers that fell behind, since the process
/// started (the broker lives as long as the process).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerSkips {
    /// Messages skipped: acknowledged to their publisher, never delivered to a subscriber.
    pub messages: u64,
    /// Times a subscriber's read cursor was moved past messages it had not had.
    pub times: u64,
    /// The subscription filter of the latest skip (empty before the first).
    pub last_filter: String,
    /// Whether skips are counted at all: a [`BrokerSkipHook`] is installed.
    pub counted: bool,
}

/// The embedded broker's skips so far ([`BrokerSkipHook`] counts them).
pub fn broker_skipped() -> BrokerSkips {
    BrokerSkips {
        messages: BROKER_SKIPPED.load(Ordering::Relaxed),
        times: BROKER_SKIPS.load(Ordering::Relaxed),
        last_filter: BROKER_SKIP_FILTER
            .lock()
            .map(|f| f.clone())
            .unwrap_or_default(),
        counted: BROKER_SKIP_HOOKED.load(Ordering::Relaxed),
    }
}

/// Where rumqttd logs that it moved a subscriber's read cursor past messages.
const RUMQTTD_ROUTING: &str = "rumqttd::router::routing";

/// Counts the messages the embedded broker skips. rumqttd (0.20) reports a skip only as
/// a WARN log line (`Read cursor start jumped from (segment, offset) to (segment, offset)
/// on <filter>`, its alerts carry no count), so this is a `tracing` layer that reads that
/// line's `request_cursor` and `start_cursor`: offsets count the filter's messages, so their
/// difference is what the subscriber lost. Install it beside the log output with its own
/// filter ([`broker_skip_hook`]), so it counts whatever the log shows.
#[derive(Debug, Default)]
pub struct BrokerSkipHook(());

/// A [`BrokerSkipHook`] that sees rumqttd's skip warnings whatever the other layers'
/// filters show: `registry().with(fmt_layer.with_filter(env)).with(broker_skip_hook())`.
pub fn broker_skip_hook<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer as _;
    BROKER_SKIP_HOOKED.store(true, Ordering::Relaxed);
    // Decided once per call site (it reads metadata only), not at every event.
    BrokerSkipHook(()).with_filter(
        tracing_subscriber::filter::DynFilterFn::new(|meta, _| is_broker_skip_warning(meta))
            .with_callsite_filter(|meta| interest(is_broker_skip_warning(meta)))
            .with_max_level_hint(tracing::level_filters::LevelFilter::WARN),
    )
}

/// Whether `meta` is rumqttd's warning that it skipped messages for a subscriber (its
/// routing WARN with a `request_cursor`): the one rumqttd line the binary's log shows by
/// default (the rest of rumqttd's log reports every probe connection and disconnect).
pub fn is_broker_skip_warning(meta: &tracing::Metadata<'_>) -> bool {
    meta.target() == RUMQTTD_ROUTING
        && *meta.level() == tracing::Level::WARN
        && meta.fields().field("request_cursor").is_some()
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for BrokerSkipHook {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if !is_broker_skip_warning(event.metadata()) {
            return;
        }
        let mut jump = CursorJump::default();
        event.record(&mut jump);
        if let Some(lost) = jump.lost() {
            BROKER_SKIPPED.fetch_add(lost, Ordering::Relaxed);
            BROKER_SKIPS.fetch_add(1, Ordering::Relaxed);
            if let (Some(filter), Ok(mut last)) = (jump.filter(), BROKER_SKIP_FILTER.lock()) {
                last.clear();
                last.push_str(filter);
            }
        }
    }
}

/// The fields of rumqttd's cursor-jump warning.
#[derive(Debug, Default)]
struct CursorJump {
    from: Option<(u64, u64)>,
    to: Option<(u64, u64)>,
    error: String,
}

impl CursorJump {
    /// Messages skipped: the jump's offsets apart (they count the filter's messages).
    fn lost(&self) -> Option<u64> {
        Some(self.to?.1.saturating_sub(self.from?.1))
    }

    /// The subscription filter, from `… on <filter>`.
    fn filter(&self) -> Option<&str> {
        self.error.rsplit_once(" on ").map(|(_, f)| f)
    }
}

/// `(a, b)` as rumqttd's cursors print.
fn parse_cursor(text: &str) -> Option<(u64, u64)> {
    let (a, b) = text
        .trim()
        .strip_prefix('(')?
        .strip_suffix(')')?
        .split_once(',')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

impl tracing::field::Visit for CursorJump {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "error" {
            self.error = value.to_string();
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        match field.name() {
            "request_cursor" => self.from = parse_cursor(&text),
            "start_cursor" => self.to = parse_cursor(&text),
            "error" if self.error.is_empty() => self.error = text.trim_matches('"').to_string(),
            _ => {}
        }
    }
}

/// What the embedded broker refuses that a sender would not see it refuse: rumqttd logs
/// these only in its own log, which the binary keeps off (it reports every probe
/// connection and disconnect as an ERROR), so a publisher refused for its client id, its
/// keep-alive or a message over the size limit failed silently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerRefusal {
    /// A client id with `/`, `+`, `#` or `$`, which rumqttd's router refuses.
    ClientId,
    /// A CONNECT with keep-alive 0, which rumqttd refuses.
    ZeroKeepAlive,
    /// A packet over the broker's size limit: rumqttd drops it and disconnects its sender.
    TooLarge,
}

impl BrokerRefusal {
    const ALL: [BrokerRefusal; 3] = [
        BrokerRefusal::ClientId,
        BrokerRefusal::ZeroKeepAlive,
        BrokerRefusal::TooLarge,
    ];

    /// The `reason` label of each kind, in [`BrokerRefusal::ALL`]'s order (that of
    /// [`broker_refused_counts`]).
    pub const REASONS: [&'static str; 3] = ["client_id", "keep_alive_0", "too_large"];

    /// The refusal a rumqttd ERROR line (its message and `error` field, as text) reports.
    pub fn of(text: &str) -> Option<BrokerRefusal> {
        if text.contains("Invalid client_id") {
            Some(BrokerRefusal::ClientId)
        } else if text.contains("ZeroKeepAlive") {
            Some(BrokerRefusal::ZeroKeepAlive)
        } else if text.contains("PayloadSizeLimitExceeded") || text.contains("PayloadTooLong") {
            Some(BrokerRefusal::TooLarge)
        } else {
            None
        }
    }

    /// What was refused and what to do, for the log.
    pub fn explain(self) -> String {
        match self {
            BrokerRefusal::ClientId => "the embedded MQTT broker refused a client whose id has /, +, # or $ in it (rumqttd allows none of them): the client cannot connect. Give it an id without them, or use an external broker ([mqtt] broker = \"external\")".into(),
            BrokerRefusal::ZeroKeepAlive => "the embedded MQTT broker refused a client that asked for keep-alive 0 (rumqttd requires one): the client cannot connect. Set a keep-alive (60 s is usual)".into(),
            BrokerRefusal::TooLarge => {
                let limit = match EMBEDDED_MAX_PAYLOAD.load(Ordering::Relaxed) {
                    0 => MAX_OUTGOING_PACKET_BYTES as u64,
                    n => n,
                };
                format!(
                    "the embedded MQTT broker dropped a message over its limit of {limit} bytes and disconnected its publisher (rumqttd acknowledges nothing of it). A QoS 1 publisher (paho, rumqttc) sends the same message again on every reconnect and is disconnected again, so nothing it publishes after it gets through until it is restarted without it. Send messages under {limit} bytes (fewer frames per message), raise [mqtt] embedded_log_bytes (the broker takes messages up to half of it, at most {MAX_EMBEDDED_PAYLOAD_BYTES} bytes), or use an external broker ([mqtt] broker = \"external\")"
                )
            }
        }
    }
}

/// How often each [`BrokerRefusal`] happened, in [`BrokerRefusal::ALL`]'s order.
static BROKER_REFUSED: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

/// How often the embedded broker refused each kind in this process, in
/// [`BrokerRefusal::REASONS`]' order (see [`broker_refusal_hook`]).
pub fn broker_refused_counts() -> &'static [AtomicU64; 3] {
    &BROKER_REFUSED
}

/// A `tracing` layer that reads rumqttd's ERROR lines whatever the log's filter and, for
/// the refusals a sender would not notice ([`BrokerRefusal`]), logs a darkwatch WARN at
/// the 1st, 2nd, 4th… of each kind, with the remedy. Install it beside the log output,
/// as [`broker_skip_hook`] is.
pub fn broker_refusal_hook<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer as _;
    fn rumqttd_error(meta: &tracing::Metadata<'_>) -> bool {
        meta.target().starts_with("rumqttd") && *meta.level() == tracing::Level::ERROR
    }
    // Decided once per call site (it reads metadata only), not at every event.
    BrokerRefusalHook(()).with_filter(
        tracing_subscriber::filter::DynFilterFn::new(|meta, _| rumqttd_error(meta))
            .with_callsite_filter(|meta| interest(rumqttd_error(meta)))
            .with_max_level_hint(tracing::level_filters::LevelFilter::ERROR),
    )
}

/// `always` or `never`: a call site's interest for a filter that reads its metadata only.
fn interest(wanted: bool) -> tracing::subscriber::Interest {
    if wanted {
        tracing::subscriber::Interest::always()
    } else {
        tracing::subscriber::Interest::never()
    }
}

/// See [`broker_refusal_hook`].
#[derive(Debug, Default)]
pub struct BrokerRefusalHook(());

/// Every field of an event, as text.
#[derive(Default)]
struct EventText(String);

impl tracing::field::Visit for EventText {
    fn record_debug(&mut self, _field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        let _ = write!(self.0, "{value:?} ");
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for BrokerRefusalHook {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut text = EventText::default();
        event.record(&mut text);
        let Some(kind) = BrokerRefusal::of(&text.0) else {
            return;
        };
        let i = BrokerRefusal::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(0);
        let count = BROKER_REFUSED[i].fetch_add(1, Ordering::Relaxed) + 1;
        if count.is_power_of_two() {
            tracing::warn!(target: "darkwatch::mqtt", refused = count, "{}", kind.explain());
        }
    }
}

/// A message received on a subscribed topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    pub topic: String,
    pub payload: Vec<u8>,
    /// When it was received, in seconds since the Unix epoch.
    pub received: f64,
    /// When it was received on the monotonic clock ([`monotonic_secs`]), for elapsed times.
    pub received_mono: f64,
}

/// A received message as the client hands it to an [`Inbox`]: borrowed, not copied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Received<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    /// When it was received, in seconds since the Unix epoch.
    pub received: f64,
    /// When it was received on the monotonic clock ([`monotonic_secs`]), for elapsed times.
    pub received_mono: f64,
}

impl Received<'_> {
    /// An owned copy, to keep past the call.
    pub fn to_incoming(&self) -> Incoming {
        Incoming {
            topic: self.topic.to_string(),
            payload: self.payload.to_vec(),
            received: self.received,
            received_mono: self.received_mono,
        }
    }
}

impl Incoming {
    /// The message as an [`Inbox`] takes it.
    pub fn as_received(&self) -> Received<'_> {
        Received {
            topic: &self.topic,
            payload: &self.payload,
            received: self.received,
            received_mono: self.received_mono,
        }
    }
}

/// Where [`spawn_client`] hands every received publish, on the client's own thread.
pub trait Inbox: Send + 'static {
    /// Takes one message; `false` when it was refused (the client counts it in
    /// [`MqttStats::incoming_dropped`]). Runs on the event loop: it must not block for
    /// long, or the client reads, acknowledges and publishes nothing meanwhile.
    fn deliver(&mut self, message: Received<'_>) -> bool;
}

/// A bounded channel as an inbox: a full (or closed) channel refuses the message.
impl Inbox for SyncSender<Incoming> {
    fn deliver(&mut self, message: Received<'_>) -> bool {
        match self.try_send(message.to_incoming()) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }
}

/// Where the agent sends the messages to publish; sending wakes the MQTT client.
pub type OutgoingSender = UnboundedSender<Outgoing>;
/// The MQTT client's end of [`OutgoingSender`].
pub type OutgoingReceiver = UnboundedReceiver<Outgoing>;

/// A channel for [`spawn_client`]'s outgoing messages.
pub fn outgoing_channel() -> (OutgoingSender, OutgoingReceiver) {
    unbounded_channel()
}

/// A message to publish (at QoS 1, through the spool).
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

/// `[scores]`: each stream's score published over MQTT beside its metrics, so that a
/// node's anomaly score can be graphed (KairosDB through ExaMon's bridge, Grafana) next to
/// what it scores. Opt-in; QoS 0, never spooled (see [`score_channel`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoresConfig {
    /// Publish scores (default `false`).
    pub publish: bool,
    /// At most one publish per stream per this many seconds of the stream's event time
    /// (its frames' times): the first frame at or past the interval is published, the ones
    /// between are not. 0 publishes every scored frame. Default 1: every frame of assembled
    /// telemetry (one frame per `[assemble] window_secs`, 1 s by default), at most 3
    /// messages a second for a raw activation stream that scores thousands of frames.
    pub interval_secs: f64,
    /// What is published per frame, any of `anomaly_score` (score / threshold, above 1 is
    /// anomalous, as vmanomaly's), `score` and `threshold`. Default all three.
    #[serde(deserialize_with = "crate::config::strings")]
    pub metrics: Vec<String>,
    /// Topic shape of an ExaMon stream: `legacy`
    /// (`org/<org>/cluster/<cluster>/node/<node>/plugin/<plugin>/chnl/data/model/<model id>[/<key>/<value>…]/<metric>`,
    /// the other `[examon] stream_key` pairs after the model, a key of the fixed part, as
    /// `plugin`, renamed `src_plugin`) or `compact`
    /// (`<org>/<cluster>/<plugin>/<node>/<metric>`, newer ExaMon; only with streams named
    /// by org, cluster and node keys, as it has no place for other pairs or the model).
    pub topic_layout: ScoreTopicLayout,
    /// Payload: `legacy` (`<value>;<epoch seconds, 3 decimals>`, as ExaMon's metrics) or
    /// `json` (`{"v": <value>, "ts": <epoch milliseconds>}`, newer ExaMon).
    pub payload: ScorePayload,
    /// ExaMon plugin level of the topic, as the thermADNet/GNN publishers use.
    pub plugin: String,
    /// Topic of a stream that is not an ExaMon stream (Telegraf, raw, or an ExaMon topic
    /// without org, cluster and node pairs): `{node}` is this agent's node name, `{stream}`
    /// the stream, `{metric}` the metric (required: the metrics must not share a topic).
    pub topic: String,
    /// Scores waiting for the MQTT client; while it is full (a slow or absent broker) a
    /// frame's score is dropped and counted (`darkwatch_scores_dropped_total`), never waited for.
    pub queue_capacity: usize,
}

/// See [`ScoresConfig::topic_layout`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreTopicLayout {
    #[default]
    Legacy,
    Compact,
}

/// See [`ScoresConfig::payload`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScorePayload {
    #[default]
    Legacy,
    Json,
}

/// The metrics `[scores] metrics` may name, in the order of [`ScoreTopics`].
pub const SCORE_METRICS: [&str; 3] = ["anomaly_score", "score", "threshold"];

impl Default for ScoresConfig {
    fn default() -> Self {
        ScoresConfig {
            publish: false,
            interval_secs: 1.0,
            metrics: SCORE_METRICS.iter().map(|m| m.to_string()).collect(),
            topic_layout: ScoreTopicLayout::Legacy,
            payload: ScorePayload::Legacy,
            plugin: "examon-ai_pub".into(),
            topic: "darkwatch/{node}/scores/{stream}/{metric}".into(),
            queue_capacity: 1024,
        }
    }
}

impl ScoresConfig {
    /// Semantic checks the types cannot express. Returns the key and the reason.
    ///
    /// # Errors
    /// `interval_secs` negative or not finite, `metrics` empty or naming another metric,
    /// a `plugin` that is not one topic level, a `topic` that is invalid, lacks `{metric}`
    /// or has another `{…}`, `queue_capacity` 0 or above 1,000,000.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(self.interval_secs.is_finite() && self.interval_secs >= 0.0) {
            return Err((
                "interval_secs",
                format!(
                    "must be 0 (every frame) or a positive number of seconds, got {}",
                    self.interval_secs
                ),
            ));
        }
        if self.metrics.is_empty() {
            return Err((
                "metrics",
                format!(
                    "names nothing to publish: list any of {} (or set publish = false)",
                    SCORE_METRICS.join(", ")
                ),
            ));
        }
        if let Some(bad) = self
            .metrics
            .iter()
            .find(|m| !SCORE_METRICS.contains(&m.as_str()))
        {
            return Err((
                "metrics",
                format!(
                    "{bad:?} is not a score metric: list any of {}",
                    SCORE_METRICS.join(", ")
                ),
            ));
        }
        if self.plugin.is_empty() || self.plugin.contains(['/', '+', '#', '\0', ' ', '%']) {
            return Err((
                "plugin",
                format!(
                    "{:?} is not one topic level as ExaMon writes it (not empty, no /, +, #, space or %); ExaMon's AI publishers use \"examon-ai_pub\"",
                    self.plugin
                ),
            ));
        }
        let fills = ["{node}", "{stream}", "{metric}"];
        if !self.topic.contains("{metric}") {
            return Err((
                "topic",
                format!(
                    "`{}` has no {{metric}}: anomaly_score, score and threshold would share one topic; e.g. darkwatch/{{node}}/scores/{{stream}}/{{metric}}",
                    self.topic
                ),
            ));
        }
        let probe = fills
            .iter()
            .fold(self.topic.clone(), |t, p| t.replace(p, "x"));
        if !rumqttc::valid_topic(&probe) || probe.contains('\0') {
            return Err((
                "topic",
                format!(
                    "`{}` is not a valid topic (has `+`, `#` or NUL)",
                    self.topic
                ),
            ));
        }
        if let Some(bad) = unknown_placeholder(&probe) {
            return Err((
                "topic",
                format!(
                    "`{}` has `{bad}`, which is not a placeholder here and would be published as it is; topic fills in {{node}}, {{stream}} and {{metric}}",
                    self.topic
                ),
            ));
        }
        if !(1..=1_000_000).contains(&self.queue_capacity) {
            return Err((
                "queue_capacity",
                format!("must be in 1..=1000000, got {}", self.queue_capacity),
            ));
        }
        Ok(())
    }

    /// Which of [`SCORE_METRICS`] are published.
    pub fn published(&self) -> [bool; 3] {
        std::array::from_fn(|i| self.metrics.iter().any(|m| m == SCORE_METRICS[i]))
    }

    /// The topics of a stream that is not an ExaMon stream: [`Self::topic`] filled in.
    /// `+`, `#` and NUL in the stream become `_`; `/` is kept and so adds levels.
    pub fn template_topics(&self, node: &str, stream: &str) -> ScoreTopics {
        let stream = topic_safe(stream);
        let on = self.published();
        ScoreTopics {
            topics: std::array::from_fn(|i| {
                on[i].then(|| {
                    self.topic
                        .replace("{node}", node)
                        .replace("{stream}", &stream)
                        .replace("{metric}", SCORE_METRICS[i])
                })
            }),
        }
    }

    /// The topics of an ExaMon stream of `org`, `cluster` and `node` whose other stream key
    /// pairs are `pairs`, scored by `model_id` (see [`Self::topic_layout`]). Values are
    /// URL-encoded as ExaMon's publishers do (`/`, `+`, `#`, `%`, space).
    pub fn examon_topics(
        &self,
        org: &str,
        cluster: &str,
        node: &str,
        pairs: &[(String, String)],
        model_id: &str,
    ) -> ScoreTopics {
        use crate::ingest::examon::url_encode;
        let on = self.published();
        let prefix = match self.topic_layout {
            ScoreTopicLayout::Legacy => {
                let mut p = format!(
                    "org/{}/cluster/{}/node/{}/plugin/{}/chnl/data/model/{}",
                    url_encode(org),
                    url_encode(cluster),
                    url_encode(node),
                    self.plugin,
                    url_encode(model_id)
                );
                for (k, v) in pairs {
                    p.push('/');
                    // A key of the fixed part would give mqtt2kairosdb two values for one
                    // tag: `plugin` (the input's) is published as `src_plugin`.
                    if EXAMON_FIXED_KEYS.contains(&k.as_str()) {
                        p.push_str("src_");
                    }
                    p.push_str(&url_encode(k));
                    p.push('/');
                    p.push_str(&url_encode(v));
                }
                p
            }
            ScoreTopicLayout::Compact => format!(
                "{}/{}/{}/{}",
                url_encode(org),
                url_encode(cluster),
                self.plugin,
                url_encode(node)
            ),
        };
        ScoreTopics {
            topics: std::array::from_fn(|i| {
                on[i].then(|| format!("{prefix}/{}", SCORE_METRICS[i]))
            }),
        }
    }
}

/// The keys of the fixed part of a legacy score topic; a stream key among them is
/// published after the model as `src_<key>` (`plugin/pmu` as `src_plugin/pmu`).
pub const EXAMON_FIXED_KEYS: [&str; 6] = ["org", "cluster", "node", "plugin", "chnl", "model"];

/// A stream's score topics, one per [`SCORE_METRICS`] (`None`: not published). Made when
/// the stream starts (and again when a retrained model changes the model level), shared
/// with every [`ScoreSample`] of the stream: sending one allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScoreTopics {
    pub topics: [Option<String>; 3],
}

/// One frame's score on its way to the MQTT client.
#[derive(Debug, Clone)]
pub struct ScoreSample {
    pub topics: Arc<ScoreTopics>,
    pub score: f32,
    pub threshold: f64,
    /// The frame's event time, epoch seconds.
    pub timestamp: f64,
}

impl ScoreSample {
    /// The published values, as [`SCORE_METRICS`]: score / threshold (NaN unless the
    /// threshold is positive and finite), the score, the threshold.
    pub fn values(&self) -> [f64; 3] {
        let score = f64::from(self.score);
        let ratio = if self.threshold.is_finite() && self.threshold > 0.0 {
            score / self.threshold
        } else {
            f64::NAN
        };
        [ratio, score, self.threshold]
    }

    /// Messages this sample makes: one per published metric with a finite value.
    pub fn messages(&self) -> u64 {
        let v = self.values();
        (0..3)
            .filter(|&i| self.topics.topics[i].is_some() && v[i].is_finite())
            .count() as u64
    }
}

/// The payload of `value` at `timestamp` (epoch seconds) in `format`.
pub fn score_payload(format: ScorePayload, value: f64, timestamp: f64) -> String {
    match format {
        ScorePayload::Legacy => format!("{value};{timestamp:.3}"),
        ScorePayload::Json => {
            let ms = (timestamp * 1000.0).round();
            format!("{{\"v\":{value},\"ts\":{ms:.0}}}")
        }
    }
}

/// The scorer's end of the score queue: [`ScoreSender::send`] never waits.
#[derive(Debug, Clone)]
pub struct ScoreSender {
    tx: SyncSender<ScoreSample>,
    wake: Arc<tokio::sync::Notify>,
    /// Shared with the receiver: set when a wake is on its way or the receiver is
    /// draining; a send wakes only when it finds it clear (see [`ScoreSender::send`]).
    awake: Arc<AtomicBool>,
    stats: Arc<MqttStats>,
}

/// The MQTT client's end of the score queue.
#[derive(Debug)]
pub struct ScoreReceiver {
    rx: mpsc::Receiver<ScoreSample>,
    wake: Arc<tokio::sync::Notify>,
    awake: Arc<AtomicBool>,
    payload: ScorePayload,
}

/// The bounded queue of `[scores]` from the scorer to the MQTT client (`queue_capacity`
/// samples, allocated here: a send allocates nothing). A full queue drops the sample and
/// counts its messages in [`MqttStats::scores_dropped`]; so does the client for what it
/// takes while it has no connection, or while [`SCORE_SLOTS`] score messages already wait
/// in rumqttc's request queue (a broker or network slower than the scores). Scores are
/// published at QoS 0 and never spooled: they are a graph, not alerts, and a score missed
/// is followed by the next one; alerts keep the spool and QoS 1, and their room in
/// rumqttc's queue is their own.
pub fn score_channel(cfg: &ScoresConfig, stats: Arc<MqttStats>) -> (ScoreSender, ScoreReceiver) {
    let (tx, rx) = mpsc::sync_channel(cfg.queue_capacity.max(1));
    let wake = Arc::new(tokio::sync::Notify::new());
    let awake = Arc::new(AtomicBool::new(false));
    (
        ScoreSender {
            tx,
            wake: wake.clone(),
            awake: awake.clone(),
            stats,
        },
        ScoreReceiver {
            rx,
            wake,
            awake,
            payload: cfg.payload,
        },
    )
}

impl ScoreSender {
    /// Queues `sample` for the MQTT client; a full (or closed) queue drops it, counted.
    /// Never blocks, and wakes the client only when no wake is on its way and it is not
    /// draining (the flag `awake` is clear): a burst costs one atomic swap per sample and
    /// one wake-up, not a lock per sample. No wake-up is lost: the receiver clears the
    /// flag with a swap before its last look at the queue, so either that look sees this
    /// sample or this swap sees the flag clear and wakes it (`Notify` keeps the permit
    /// if it is not waiting yet).
    pub fn send(&self, sample: ScoreSample) {
        match self.tx.try_send(sample) {
            Ok(()) => {
                if !self.awake.swap(true, Ordering::AcqRel) {
                    self.wake.notify_one();
                }
            }
            Err(TrySendError::Full(s) | TrySendError::Disconnected(s)) => {
                bump(&self.stats.scores_dropped, s.messages());
            }
        }
    }
}

/// Score messages that may wait in rumqttc's request queue at once (room added to it for
/// them, so an alert never finds it full of scores). Past it the samples wait in the score
/// queue, and once that is full they are dropped.
pub const SCORE_SLOTS: usize = 64;

impl ScoreReceiver {
    /// Hands queued scores to rumqttc at QoS 0 while `connected` and fewer than
    /// [`SCORE_SLOTS`] of its messages are queued there (`queued`, which the caller lowers
    /// as rumqttc writes them); without a connection they are dropped and counted.
    /// Returns whether samples are left in the queue.
    fn pump(
        &self,
        client: &AsyncClient,
        connected: bool,
        queued: &mut usize,
        stats: &MqttStats,
    ) -> bool {
        for _ in 0..DRAIN_PER_TURN {
            if connected && *queued >= SCORE_SLOTS {
                return true;
            }
            let sample = match self.rx.try_recv() {
                Ok(sample) => sample,
                Err(_) => {
                    // Empty: clear the flag, then look once more (see ScoreSender::send).
                    self.awake.swap(false, Ordering::AcqRel);
                    let Ok(sample) = self.rx.try_recv() else {
                        return false;
                    };
                    self.awake.store(true, Ordering::Release);
                    sample
                }
            };
            if !connected {
                bump(&stats.scores_dropped, sample.messages());
                continue;
            }
            let values = sample.values();
            for (i, topic) in sample.topics.topics.iter().enumerate() {
                let Some(topic) = topic else { continue };
                if !values[i].is_finite() {
                    continue;
                }
                // A topic MQTT cannot carry (a stream name of 64 KiB) would make rumqttc
                // drop the connection, alerts and all: dropped alone instead.
                if topic.len() > usize::from(u16::MAX) {
                    bump(&stats.scores_dropped, 1);
                    continue;
                }
                let payload = score_payload(self.payload, values[i], sample.timestamp);
                match client.try_publish(topic.as_str(), QoS::AtMostOnce, false, payload) {
                    Ok(()) => {
                        *queued += 1;
                        bump(&stats.scores_published, 1);
                    }
                    Err(_) => bump(&stats.scores_dropped, 1),
                }
            }
        }
        true
    }
}

/// Counters of the MQTT client, shared with the agent.
#[derive(Debug, Default)]
pub struct MqttStats {
    /// Publishes received on subscribed topics.
    pub received: AtomicU64,
    /// Received publishes the [`Inbox`] refused (held messages full, or the inbox gone).
    pub incoming_dropped: AtomicU64,
    /// Spooled alerts written to the broker, republishes included.
    pub published: AtomicU64,
    /// Spooled alerts acknowledged by the broker and removed from the spool.
    pub acked: AtomicU64,
    /// Alerts appended to the spool.
    pub spooled: AtomicU64,
    /// Alerts the spool could not take (an I/O error: a full disk, a read-only file
    /// system) and that were published without it: at most once, so one in flight when
    /// the connection drops, or the process stops, is lost.
    pub unspooled: AtomicU64,
    /// Connection errors (each one is followed by a reconnect attempt after a backoff).
    pub reconnects: AtomicU64,
    /// Connections that ended within 10 s of their ConnAck (counted in `reconnects` too):
    /// the backoff grows over them as over failed attempts. Another client with the same
    /// client id makes them.
    pub short_sessions: AtomicU64,
    /// Whether the client holds a connection (ConnAck seen, no error since).
    pub connected: AtomicBool,
    /// Alerts refused before the spool (invalid topic, too large), found unreadable in it,
    /// or that the spool could not take while more than [`MAX_UNSPOOLED`] others waited
    /// to be published without it; each one is lost, with a `warn!`.
    pub outgoing_rejected: AtomicU64,
    /// Unacknowledged alerts the spool lost: deleted to stay within its `max_bytes`, or
    /// found corrupt when it was opened (see [`crate::spool::SpoolStats::dropped_corrupt`]).
    pub spool_dropped: AtomicU64,
    /// Alerts in the spool not yet acknowledged by the broker, now (a gauge).
    pub spool_pending: AtomicU64,
    /// Bytes of the spool's segment files now, what `[spool] max_bytes` bounds (a gauge).
    pub spool_bytes: AtomicU64,
    /// `[scores]` messages handed to the client (QoS 0: written once, not acknowledged).
    pub scores_published: AtomicU64,
    /// `[scores]` messages dropped: the score queue was full, or the client had no
    /// connection or its share of rumqttc's queue was full (see [`score_channel`]).
    pub scores_dropped: AtomicU64,
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Tells a client started by [`spawn_client`] to stop; clones share one signal.
#[derive(Debug, Clone, Default)]
pub struct ClientStop {
    set: Arc<AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
}

impl ClientStop {
    /// Asks the client to flush and stop (see [`spawn_client`]), and wakes it.
    pub fn stop(&self) {
        self.set.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Whether [`ClientStop::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.set.load(Ordering::SeqCst)
    }

    /// Returns once [`ClientStop::stop`] was called (at once if it was).
    pub(crate) async fn wait(&self) {
        loop {
            let woken = self.wake.notified();
            if self.is_stopped() {
                return;
            }
            woken.await;
        }
    }
}

/// Runs the MQTT client on its own OS thread (`darkwatch-mqtt`) with a current-thread tokio
/// runtime until `stop` is set and the outgoing channel is drained, or [`STOP_DEADLINE`]
/// after `stop`. See the module docs for the publishing scheme.
///
/// - Connects with a clean session, keep-alive, optional credentials and a retained last
///   will [`status_payload`] (offline) on the status topic. On every ConnAck it subscribes all
///   filters at QoS 1 and publishes a retained `{"status":"online","node":…}`.
/// - Every received publish goes to `inbox`, on this thread; one it refuses is dropped
///   (counted).
/// - Every [`Outgoing`] is appended to `spool` first, then published at QoS 1 in spool
///   order, at most `inflight_max` unacknowledged; while disconnected alerts only spool.
/// - After a connection error it sleeps 100 ms, doubling to 5 s, and counts a reconnect.
///   The delay starts again at 100 ms only after a session that lasted 10 s: one the broker
///   closes sooner (as it does when another client connects with the same client id) counts
///   as a failed attempt, with a rate-limited `warn!` naming the client id.
/// - On `stop`: once the outgoing channel is empty, it exits when the spool is empty or the
///   client is disconnected (what is left stays spooled for the next run), or at the
///   deadline. When connected it then publishes the retained offline status and disconnects
///   cleanly. A closed outgoing channel does not stop the client; only `stop` does.
///
/// # Errors
/// [`MqttError::Config`] if `cfg` is invalid, [`MqttError::Spawn`] if the runtime or the
/// thread cannot start.
pub fn spawn_client(
    cfg: MqttConfig,
    spool: Spool,
    inbox: impl Inbox,
    outgoing: OutgoingReceiver,
    stats: Arc<MqttStats>,
    stop: ClientStop,
) -> Result<JoinHandle<()>, MqttError> {
    spawn_client_with_scores(cfg, spool, inbox, outgoing, None, stats, stop)
}

/// [`spawn_client`], also publishing the `[scores]` that come through `scores` (see
/// [`score_channel`]): after the alerts of each turn, at QoS 0, at most [`SCORE_SLOTS`]
/// messages queued in rumqttc at once, none while disconnected (dropped, counted).
///
/// # Errors
/// As [`spawn_client`].
pub fn spawn_client_with_scores(
    cfg: MqttConfig,
    spool: Spool,
    inbox: impl Inbox,
    outgoing: OutgoingReceiver,
    scores: Option<ScoreReceiver>,
    stats: Arc<MqttStats>,
    stop: ClientStop,
) -> Result<JoinHandle<()>, MqttError> {
    cfg.validate()
        .map_err(|(key, reason)| MqttError::Config { key, reason })?;
    let options = mqtt_options(&cfg, &cfg.status_topic_for())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| MqttError::Spawn {
            what: "MQTT client runtime",
            source,
        })?;
    let publisher = Publisher::new(spool, usize::from(cfg.inflight_max), stats.clone());
    std::thread::Builder::new()
        .name("darkwatch-mqtt".into())
        .spawn(move || {
            runtime.block_on(run_client(
                cfg, options, publisher, inbox, outgoing, scores, stats, stop,
            ));
        })
        .map_err(|source| MqttError::Spawn {
            what: "MQTT client thread",
            source,
        })
}

/// What the driver tells the controller.
#[derive(Debug)]
enum DriverEvent {
    Connected,
    Disconnected,
    /// rumqttc wrote a publish with this packet id (QoS 1 requests, in queue order).
    PublishSent(u16),
    PubAck(u16),
    DisconnectSent,
    /// rumqttc wrote a QoS 0 publish (packet id 0): a score.
    ScoreSent,
}

/// Reads a PEM file for TLS and checks that it holds what `marker` names.
fn read_pem(path: &std::path::Path, marker: &str, what: &str) -> Result<Vec<u8>, MqttError> {
    let err = |reason: String| MqttError::Tls {
        file: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read the {what}: {e}")))?;
    if !String::from_utf8_lossy(&bytes).contains(marker) {
        return Err(err(format!("not a PEM {what} (no `{marker}` block)")));
    }
    Ok(bytes)
}

/// rumqttc's TLS settings from `cfg` (files read and checked now, so a wrong path is an
/// error at start, not a reconnect loop).
fn tls_transport(cfg: &MqttConfig) -> Result<rumqttc::Transport, MqttError> {
    // rustls needs a process-wide crypto provider; `ring` is the one compiled in. An
    // error means one is installed already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = read_pem(
        &cfg.ca_file,
        "-----BEGIN CERTIFICATE-----",
        "CA certificate",
    )?;
    let client_auth = if cfg.client_cert_file.as_os_str().is_empty() {
        None
    } else {
        Some((
            read_pem(
                &cfg.client_cert_file,
                "-----BEGIN CERTIFICATE-----",
                "client certificate",
            )?,
            read_pem(&cfg.client_key_file, "PRIVATE KEY-----", "client key")?,
        ))
    };
    Ok(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Simple {
            ca,
            alpn: None,
            client_auth,
        },
    ))
}

fn mqtt_options(cfg: &MqttConfig, status_topic: &str) -> Result<MqttOptions, MqttError> {
    let mut options = broker_options(cfg, cfg.client_id_for())?;
    options
        .set_clean_session(true)
        .set_inflight(cfg.inflight_max.saturating_add(EXTRA_PKIDS))
        .set_last_will(LastWill::new(
            status_topic,
            status_payload(false, &cfg.node()),
            QoS::AtLeastOnce,
            true,
        ));
    Ok(options)
}

/// The connection to `[mqtt]`'s broker as client `client_id`: host and port, keep-alive,
/// packet size limits, credentials and TLS (files read and checked now). What the agent's
/// client and the Alertmanager bridge ([`crate::alertmanager`]) share; each sets its own
/// session, in-flight window and last will.
///
/// # Errors
/// [`MqttError::Tls`] when a TLS file cannot be read or is not PEM.
pub(crate) fn broker_options(
    cfg: &MqttConfig,
    client_id: String,
) -> Result<MqttOptions, MqttError> {
    let mut options = MqttOptions::new(client_id, cfg.host.clone(), cfg.port);
    options
        .set_keep_alive(Duration::from_secs(cfg.keep_alive_secs))
        .set_max_packet_size(MAX_INCOMING_PACKET_BYTES, MAX_OUTGOING_PACKET_BYTES);
    if !cfg.username.is_empty() {
        options.set_credentials(cfg.username.clone(), cfg.password.clone());
    }
    if cfg.tls {
        options.set_transport(tls_transport(cfg)?);
    }
    Ok(options)
}

pub(crate) fn epoch_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Seconds on the monotonic clock ([`Instant`]; origin: this function's first call), for
/// elapsed times: unlike [`epoch_secs`], an NTP step or a suspend of the host (Linux's
/// `CLOCK_MONOTONIC` stops while suspended) does not move it.
pub fn monotonic_secs() -> f64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_secs_f64()
}

/// How a connection attempt ended, as [`Reconnect::failed`] judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// It never got a ConnAck.
    Attempt,
    /// The session lasted [`STABLE_SESSION`] or longer.
    Stable,
    /// The session ended within [`STABLE_SESSION`] of its ConnAck. `log`: this is the 1st,
    /// 2nd, 4th, 8th… such session, the ones worth a `warn!`.
    Short { lasted: Duration, log: bool },
}

/// The driver's reconnect backoff: [`BACKOFF_MIN`] doubling to [`BACKOFF_MAX`] over
/// failed attempts, and back to the minimum only after a session that held (a ConnAck alone
/// does not reset it). Two agents with one client id make the broker close each one's
/// session as the other connects: every reconnect succeeds, and a backoff reset on ConnAck
/// had them take the session from each other every 100 ms, forever.
#[derive(Debug)]
pub(crate) struct Reconnect {
    delay: Duration,
    connected_at: Option<Instant>,
    /// Short sessions since the last stable one.
    short_in_a_row: u64,
    /// Short sessions in all.
    short_total: u64,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            delay: BACKOFF_MIN,
            connected_at: None,
            short_in_a_row: 0,
            short_total: 0,
        }
    }
}

impl Reconnect {
    /// A ConnAck arrived at `now`.
    pub(crate) fn connected(&mut self, now: Instant) {
        self.connected_at = Some(now);
    }

    /// Whether the last session ended early (so a new ConnAck is not news worth an `info!`).
    fn flapping(&self) -> bool {
        self.short_in_a_row > 0
    }

    /// The connection failed at `now`: how the attempt ended and how long to wait before
    /// the next one.
    pub(crate) fn failed(&mut self, now: Instant) -> (Ended, Duration) {
        let ended = match self.connected_at.take() {
            None => Ended::Attempt,
            Some(at) if now.saturating_duration_since(at) >= STABLE_SESSION => {
                self.delay = BACKOFF_MIN;
                self.short_in_a_row = 0;
                Ended::Stable
            }
            Some(at) => {
                self.short_in_a_row += 1;
                self.short_total += 1;
                Ended::Short {
                    lasted: now.saturating_duration_since(at),
                    log: self.short_total.is_power_of_two(),
                }
            }
        };
        let wait = self.delay;
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
        (ended, wait)
    }
}

/// Whether the broker (or something on the way) closed the connection, rather than the
/// client giving up on it.
pub(crate) fn closed_by_peer(error: &ConnectionError) -> bool {
    match error {
        ConnectionError::MqttState(rumqttc::StateError::ConnectionAborted) => true,
        ConnectionError::MqttState(rumqttc::StateError::Io(e)) | ConnectionError::Io(e) => {
            matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
            )
        }
        _ => false,
    }
}

/// Polls the event loop forever. Never cancelled mid-poll: rumqttc's `poll` is not
/// cancellation-safe while it writes.
async fn drive(
    mut eventloop: EventLoop,
    events: UnboundedSender<DriverEvent>,
    mut inbox: impl Inbox,
    stats: Arc<MqttStats>,
) {
    let mut reconnect = Reconnect::default();
    // Failed attempts since the last connection: logged at the 1st, 2nd, 4th, 8th…, so a
    // broker that stays away keeps showing in the log without filling it.
    let mut failures: u64 = 0;
    loop {
        // The event channel is unbounded so that an error is in it before the controller
        // can run again (a bounded send could wait): the controller must see a disconnect
        // before it queues more publishes. It holds at most one event per packet in flight
        // plus one per connection attempt, which the backoff spaces out.
        let event = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                let (host, port) = eventloop.mqtt_options.broker_address();
                let broker = format!("{host}:{port}");
                if reconnect.flapping() {
                    // The session before ended right away; the warning says why.
                    debug!(%broker, session_present = ack.session_present, "Connected to the MQTT broker again.");
                } else {
                    info!(
                        %broker,
                        session_present = ack.session_present,
                        "Connected to the MQTT broker."
                    );
                }
                reconnect.connected(Instant::now());
                failures = 0;
                stats.connected.store(true, Ordering::Relaxed);
                DriverEvent::Connected
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                bump(&stats.received, 1);
                let message = Received {
                    topic: &publish.topic,
                    payload: &publish.payload,
                    received: epoch_secs(),
                    received_mono: monotonic_secs(),
                };
                if !inbox.deliver(message) {
                    bump(&stats.incoming_dropped, 1);
                }
                continue;
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => DriverEvent::PubAck(ack.pkid),
            // QoS 1 publishes get packet ids from 1; only scores go at QoS 0.
            Ok(Event::Outgoing(Sent::Publish(0))) => DriverEvent::ScoreSent,
            Ok(Event::Outgoing(Sent::Publish(pkid))) => DriverEvent::PublishSent(pkid),
            Ok(Event::Outgoing(Sent::Disconnect)) => DriverEvent::DisconnectSent,
            Ok(_) => continue,
            Err(error) => {
                stats.connected.store(false, Ordering::Relaxed);
                bump(&stats.reconnects, 1);
                let (ended, retry_in) = reconnect.failed(Instant::now());
                match ended {
                    Ended::Short { lasted, log } => {
                        bump(&stats.short_sessions, 1);
                        let count = reconnect.short_total;
                        let client_id = eventloop.mqtt_options.client_id();
                        if !log {
                            debug!(%error, ?lasted, count, ?retry_in, "The broker closed the session right after connecting again.");
                        } else if closed_by_peer(&error) {
                            warn!(
                                %error,
                                ?lasted,
                                count,
                                ?retry_in,
                                "The broker closed the session right after connecting; another client may be using client id {client_id} ([mqtt] client_id). Retrying with a growing backoff; alerts are spooled meanwhile."
                            );
                        } else {
                            warn!(%error, ?lasted, count, ?retry_in, "MQTT connection failed right after connecting; retrying with a growing backoff, alerts are spooled meanwhile.");
                        }
                    }
                    Ended::Attempt | Ended::Stable => {
                        failures += 1;
                        let (host, port) = eventloop.mqtt_options.broker_address();
                        let broker = format!("{host}:{port}");
                        if failures.is_power_of_two() {
                            warn!(%broker, %error, failures, ?retry_in, "MQTT connection failed; retrying with a growing backoff (logged at the 1st, 2nd, 4th… failure in a row); alerts are spooled until it is back.");
                        } else {
                            debug!(%broker, %error, failures, ?retry_in, "MQTT connection still failing.");
                        }
                    }
                }
                if events.send(DriverEvent::Disconnected).is_err() {
                    return;
                }
                tokio::time::sleep(retry_in).await;
                continue;
            }
        };
        if events.send(event).is_err() {
            return;
        }
    }
}

/// The controller's view of the connection: the client handle and what to do on ConnAck.
struct Session {
    client: AsyncClient,
    filters: Vec<String>,
    status_topic: String,
    online: String,
    offline: String,
    connected: bool,
    disconnect_sent: bool,
    /// Score publishes queued in rumqttc and not yet written (see [`SCORE_SLOTS`]).
    scores_queued: usize,
}

impl Session {
    fn handle(&mut self, event: DriverEvent, publisher: &mut Publisher) {
        match event {
            DriverEvent::Connected => {
                self.connected = true;
                publisher.reset_connection(true);
                if !self.filters.is_empty() {
                    let filters = self
                        .filters
                        .iter()
                        .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                    if let Err(error) = self.client.try_subscribe_many(filters) {
                        warn!(%error, "Cannot queue the MQTT subscribe request.");
                    }
                }
                self.publish_status(publisher, self.online.clone());
            }
            DriverEvent::Disconnected => {
                self.connected = false;
                // rumqttc takes what is queued into its pending list, which a clean
                // session discards.
                self.scores_queued = 0;
                publisher.reset_connection(false);
            }
            DriverEvent::ScoreSent => self.scores_queued = self.scores_queued.saturating_sub(1),
            DriverEvent::PublishSent(pkid) => publisher.on_publish_sent(pkid),
            DriverEvent::PubAck(pkid) => publisher.on_puback(pkid),
            DriverEvent::DisconnectSent => self.disconnect_sent = true,
        }
    }

    /// Publishes a retained status at QoS 1; its PubAck is not tracked.
    fn publish_status(&self, publisher: &mut Publisher, payload: String) {
        match self
            .client
            .try_publish(&self.status_topic, QoS::AtLeastOnce, true, payload)
        {
            Ok(()) => publisher.note_untracked_publish(),
            Err(error) => warn!(%error, "Cannot queue the MQTT status publish."),
        }
    }
}

// The client's parts, each owned by this task: bundling them would only rename them.
#[allow(clippy::too_many_arguments)]
async fn run_client(
    cfg: MqttConfig,
    options: MqttOptions,
    mut publisher: Publisher,
    inbox: impl Inbox,
    mut outgoing: OutgoingReceiver,
    scores: Option<ScoreReceiver>,
    stats: Arc<MqttStats>,
    stop: ClientStop,
) {
    let node = cfg.node();
    let status_topic = cfg.status_topic_for();
    // Room for every request the controller can have queued: its own in-flight limit, the
    // subscribe, the status publishes and the disconnect. So `try_*` never finds it full.
    // Scores have room of their own (a sample's messages may pass SCORE_SLOTS by 2).
    let capacity = usize::from(cfg.inflight_max)
        + usize::from(EXTRA_PKIDS)
        + 8
        + if scores.is_some() { SCORE_SLOTS + 3 } else { 0 };
    let (client, mut eventloop) = AsyncClient::new(options, capacity);
    // Alerts are small and wanted now: no Nagle delay (it adds up to 40 ms with delayed ACKs).
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    let (events_tx, mut events) = unbounded_channel();
    let driver = tokio::spawn(drive(eventloop, events_tx, inbox, stats.clone()));
    let mut session = Session {
        client,
        filters: cfg.subscribe_filters(),
        status_topic,
        online: status_payload(true, &node),
        offline: status_payload(false, &node),
        connected: false,
        disconnect_sent: false,
        scores_queued: 0,
    };
    info!(
        node = %node,
        broker = %format!("{}:{}", cfg.host, cfg.port),
        backlog = publisher.len(),
        "MQTT client starting."
    );

    let mut outgoing_closed = false;
    let mut deadline: Option<Instant> = None;
    loop {
        // No tick while nothing is held up: the controller sleeps until an event, an alert
        // or `stop`.
        let tick = stop.is_stopped() || publisher.stalled();
        let alive = tokio::select! {
            biased;
            event = events.recv() => match event {
                Some(event) => { session.handle(event, &mut publisher); true }
                None => false,
            },
            message = outgoing.recv(), if !outgoing_closed => {
                match message {
                    Some(message) => publisher.append(message),
                    None => {
                        debug!("Outgoing alert channel closed.");
                        outgoing_closed = true;
                    }
                }
                true
            }
            () = stop.wake.notified(), if !tick => true,
            () = scores_queued(scores.as_ref()) => true,
            () = tokio::time::sleep(TICK), if tick => true,
        };
        if !alive {
            warn!("MQTT event loop task ended; stopping the MQTT client.");
            break;
        }
        // Every event already queued is handled before anything is published, so a
        // disconnect is always seen before more publishes are queued.
        drain_events(&mut events, &mut session, &mut publisher);

        let mut outgoing_empty = outgoing_closed;
        if !outgoing_closed {
            for _ in 0..DRAIN_PER_TURN {
                match outgoing.try_recv() {
                    Ok(message) => publisher.append(message),
                    Err(TryRecvError::Empty) => {
                        outgoing_empty = true;
                        break;
                    }
                    Err(TryRecvError::Disconnected) => {
                        debug!("Outgoing alert channel closed.");
                        outgoing_closed = true;
                        outgoing_empty = true;
                        break;
                    }
                }
            }
        }
        publisher.settle();
        let client = &session.client;
        publisher.pump(|m| {
            client
                .try_publish(&m.topic, QoS::AtLeastOnce, m.retain, m.payload.clone())
                .is_ok()
        });
        // Scores after the alerts, in their own share of rumqttc's queue.
        if let Some(scores) = &scores {
            let left = scores.pump(
                client,
                session.connected,
                &mut session.scores_queued,
                &stats,
            );
            // More than a turn's worth waits: come back at once. (A full share waits for
            // rumqttc to write, which its events report.)
            if left && !(session.connected && session.scores_queued >= SCORE_SLOTS) {
                scores.wake.notify_one();
            }
        }

        if stop.is_stopped() {
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + STOP_DEADLINE);
            let flushed = publisher.is_drained() || !session.connected;
            if (outgoing_empty && flushed) || Instant::now() >= deadline {
                break;
            }
        }
    }

    if session.connected {
        let offline = session.offline.clone();
        session.publish_status(&mut publisher, offline);
        match session.client.try_disconnect() {
            Ok(()) => {
                let until = tokio::time::Instant::now() + DISCONNECT_WAIT;
                while session.connected && !session.disconnect_sent {
                    match tokio::time::timeout_at(until, events.recv()).await {
                        Ok(Some(event)) => session.handle(event, &mut publisher),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
            Err(error) => warn!(%error, "Cannot queue the MQTT disconnect."),
        }
    }
    if !publisher.unspooled.is_empty() {
        let lost = publisher.unspooled.len() as u64;
        warn!(
            lost,
            "Alerts the spool could not take were still waiting for the broker at the stop; they are lost."
        );
        bump(&stats.outgoing_rejected, lost);
    }
    driver.abort();
    stats.connected.store(false, Ordering::Relaxed);
    info!(
        pending = publisher.len(),
        "MQTT client stopped; pending alerts stay in the spool."
    );
}

/// Returns when scores were queued (never without a score queue).
async fn scores_queued(scores: Option<&ScoreReceiver>) {
    match scores {
        Some(s) => s.wake.notified().await,
        None => std::future::pending().await,
    }
}

fn drain_events(
    events: &mut UnboundedReceiver<DriverEvent>,
    session: &mut Session,
    publisher: &mut Publisher,
) {
    while let Ok(event) = events.try_recv() {
        session.handle(event, publisher);
    }
}

/// Encodes a message as a spool record (see the module docs).
fn encode_record(message: &Outgoing) -> Vec<u8> {
    let topic = message.topic.as_bytes();
    let mut record = Vec::with_capacity(RECORD_HEADER_BYTES + topic.len() + message.payload.len());
    record.push(RECORD_VERSION);
    record.push(u8::from(message.retain));
    // `check_outgoing` keeps topics within u16.
    record.extend_from_slice(&(topic.len().min(usize::from(u16::MAX)) as u16).to_le_bytes());
    record.extend_from_slice(topic);
    record.extend_from_slice(&message.payload);
    record
}

/// Decodes a spool record; `None` if it is not one this version wrote.
fn decode_record(record: &[u8]) -> Option<Outgoing> {
    let (&[version, flags, l0, l1], rest) = record.split_first_chunk::<RECORD_HEADER_BYTES>()?;
    if version != RECORD_VERSION || flags > 1 {
        return None;
    }
    let topic_len = usize::from(u16::from_le_bytes([l0, l1]));
    if rest.len() < topic_len {
        return None;
    }
    let (topic, payload) = rest.split_at(topic_len);
    Some(Outgoing {
        topic: String::from_utf8(topic.to_vec()).ok()?,
        payload: payload.to_vec(),
        retain: flags == 1,
    })
}

/// Why a message cannot be published, if it cannot.
fn check_outgoing(message: &Outgoing) -> Result<(), String> {
    if message.topic.is_empty() {
        return Err("empty topic".into());
    }
    if !rumqttc::valid_topic(&message.topic) || message.topic.contains('\0') {
        return Err("topic has `+`, `#` or NUL".into());
    }
    if message.topic.len() > usize::from(u16::MAX) {
        return Err(format!("topic of {} bytes", message.topic.len()));
    }
    let size = message.topic.len() + message.payload.len() + PUBLISH_OVERHEAD_BYTES;
    if size > MAX_OUTGOING_PACKET_BYTES {
        return Err(format!(
            "packet of about {size} bytes exceeds {MAX_OUTGOING_PACKET_BYTES}"
        ));
    }
    Ok(())
}

/// A `warn!` at most every 10 s for a condition that repeats every tick.
#[derive(Debug, Default)]
pub(crate) struct RateLimit {
    last: Option<Instant>,
}

impl RateLimit {
    pub(crate) fn ready(&mut self) -> bool {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < Duration::from_secs(10))
        {
            return false;
        }
        self.last = Some(now);
        true
    }
}

/// Logs a repeated failure the first time and then at most once per `period`, with how
/// many happened since the last log.
#[derive(Debug)]
pub(crate) struct WarnEvery {
    period: Duration,
    last: Option<Instant>,
    /// Failures since the last log, that one included.
    count: u64,
}

impl WarnEvery {
    pub(crate) fn new(period: Duration) -> WarnEvery {
        WarnEvery {
            period,
            last: None,
            count: 0,
        }
    }

    /// Counts one failure at `now`; `Some(n)` when it is to be logged, `n` being the
    /// failures since the last log (this one included).
    pub(crate) fn hit(&mut self, now: Instant) -> Option<u64> {
        self.count += 1;
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < self.period)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

/// An alert the spool could not take, waiting to be published without it.
#[derive(Debug)]
struct Unspooled {
    /// Published once every spool record below this sequence number has been sent.
    after: u64,
    message: Outgoing,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    seq: u64,
    /// Known once rumqttc reports the publish as written.
    pkid: Option<u16>,
    acked: bool,
}

/// The spool-driven, in-order, at-least-once publisher. Pure logic around the spool: the
/// caller supplies the send function and reports rumqttc's events. See the module docs.
///
/// Sequence numbers: the spool's head record is `head_seq`, the next append gets
/// `end_seq`, records below `backlog_end` came from an earlier run (not mirrored).
#[derive(Debug)]
struct Publisher {
    spool: Spool,
    inflight_max: usize,
    stats: Arc<MqttStats>,
    head_seq: u64,
    end_seq: u64,
    backlog_end: u64,
    /// Records `max(head_seq, backlog_end)..end_seq`, oldest first.
    mirror: VecDeque<Outgoing>,
    /// Next record to publish on this connection.
    next_send: u64,
    connected: bool,
    /// Records published on this connection and not yet acknowledged in the spool, in
    /// sequence order (acknowledged by the broker ones wait here for older ones).
    inflight: VecDeque<InFlight>,
    /// Queued QoS 1 publishes whose packet id is not known yet: `Some(Some(seq))` for a
    /// record, `Some(None)` for an alert sent without the spool, `None` for a status publish.
    awaiting: VecDeque<Option<Option<u64>>>,
    /// Alerts the spool could not take, oldest first, at most [`MAX_UNSPOOLED`]; each is
    /// published once, in its place among the spooled ones.
    unspooled: VecDeque<Unspooled>,
    /// Alerts sent without the spool on this connection and not yet acknowledged by the
    /// broker, with their packet id once known. They count against `inflight_max` beside
    /// `inflight`, which bounds what is queued on rumqttc's request channel.
    unspooled_inflight: VecDeque<Option<u16>>,
    spool_warn: WarnEvery,
    append_warn: WarnEvery,
    lost_warn: WarnEvery,
}

impl Publisher {
    fn new(spool: Spool, inflight_max: usize, stats: Arc<MqttStats>) -> Publisher {
        let backlog = spool.len();
        // Alerts the spool lost while opening (corrupt records, or a `max_bytes` that
        // shrank) are lost as surely as those a full spool drops later.
        let opened = spool.stats();
        bump(
            &stats.spool_dropped,
            opened.dropped_corrupt + opened.dropped_oldest,
        );
        let publisher = Publisher {
            spool,
            inflight_max: inflight_max.max(1),
            stats,
            head_seq: 0,
            end_seq: backlog,
            backlog_end: backlog,
            mirror: VecDeque::new(),
            next_send: 0,
            connected: false,
            inflight: VecDeque::new(),
            awaiting: VecDeque::new(),
            unspooled: VecDeque::new(),
            unspooled_inflight: VecDeque::new(),
            spool_warn: WarnEvery::new(SPOOL_WARN_PERIOD),
            append_warn: WarnEvery::new(SPOOL_WARN_PERIOD),
            lost_warn: WarnEvery::new(SPOOL_WARN_PERIOD),
        };
        publisher.check_invariants();
        publisher
    }

    /// Records in the spool not yet acknowledged.
    fn len(&self) -> u64 {
        self.end_seq - self.head_seq
    }

    fn is_drained(&self) -> bool {
        self.head_seq == self.end_seq && self.unspooled.is_empty()
    }

    /// Whether the oldest unspooled alert is next in line: every spooled record before it
    /// has been sent on this connection.
    fn unspooled_due(&self) -> bool {
        self.unspooled
            .front()
            .is_some_and(|u| u.after <= self.next_send)
    }

    /// Whether publishing waits on something no driver event will report: a record this
    /// connection has not sent (rumqttc's request queue or the spool refused it, or it waits
    /// behind the in-flight limit), or an acknowledged record the spool has not taken yet.
    fn stalled(&self) -> bool {
        self.connected
            && (self.next_send < self.end_seq
                || self.inflight.front().is_some_and(|f| f.acked)
                || self.unspooled_due())
    }

    fn mirror_front_seq(&self) -> u64 {
        self.head_seq.max(self.backlog_end)
    }

    /// Publishes the spool's backlog gauges, and checks the bookkeeping in debug builds.
    /// Called after every change to the spool.
    fn check_invariants(&self) {
        self.stats
            .spool_pending
            .store(self.len(), Ordering::Relaxed);
        self.stats
            .spool_bytes
            .store(self.spool.bytes(), Ordering::Relaxed);
        debug_assert_eq!(self.spool.len(), self.len());
        debug_assert_eq!(
            self.mirror.len() as u64,
            self.end_seq - self.mirror_front_seq()
        );
        debug_assert!(self.next_send >= self.head_seq && self.next_send <= self.end_seq);
    }

    /// Appends a message to the spool (it is published from there).
    fn append(&mut self, message: Outgoing) {
        if let Err(reason) = check_outgoing(&message) {
            warn!(topic = %message.topic, reason, "Refusing an outgoing MQTT message.");
            bump(&self.stats.outgoing_rejected, 1);
            return;
        }
        let dropped_before = self.spool.stats().dropped_oldest;
        let appended = self.spool.append(&encode_record(&message));
        // The spool drops its oldest records to make room before it writes: they are gone
        // also when the write then fails, so the mirror forgets them either way.
        let dropped = self.spool.stats().dropped_oldest - dropped_before;
        if dropped > 0 {
            self.forget_oldest(dropped);
        }
        if let Err(error) = appended {
            self.publish_unspooled(message, &error);
            return;
        }
        self.mirror.push_back(message);
        self.end_seq += 1;
        bump(&self.stats.spooled, 1);
        self.check_invariants();
    }

    /// The spool could not take `message`: it is published without it, once, in its place
    /// after the spooled alerts before it (at most once: lost if the connection drops
    /// before the broker has it). Logged the first time and then once a minute with a count.
    fn publish_unspooled(&mut self, message: Outgoing, error: &SpoolError) {
        bump(&self.stats.unspooled, 1);
        if let Some(count) = self.append_warn.hit(Instant::now()) {
            warn!(
                topic = %message.topic,
                %error,
                count,
                "Cannot spool an alert; publishing it without the spool, at most once (lost if the connection drops before the broker has it). Counted in darkwatch_alerts_unspooled_total; logged at most once a minute, with the count since the last."
            );
        }
        if self.unspooled.len() >= MAX_UNSPOOLED
            && let Some(lost) = self.unspooled.pop_front()
        {
            if let Some(count) = self.lost_warn.hit(Instant::now()) {
                warn!(
                    topic = %lost.message.topic,
                    waiting = MAX_UNSPOOLED,
                    count,
                    "Too many alerts wait to be published without the spool; the oldest is lost (logged at most once a minute, with the count since the last)."
                );
            }
            bump(&self.stats.outgoing_rejected, 1);
        }
        self.unspooled.push_back(Unspooled {
            after: self.end_seq,
            message,
        });
    }

    /// The spool deleted its `n` oldest records to make room.
    fn forget_oldest(&mut self, n: u64) {
        warn!(
            dropped = n,
            "Alert spool full; its oldest alerts were dropped."
        );
        let old_front = self.mirror_front_seq();
        self.head_seq = (self.head_seq + n).min(self.end_seq);
        let pop = (self.mirror_front_seq() - old_front) as usize;
        self.mirror.drain(..pop.min(self.mirror.len()));
        self.next_send = self.next_send.max(self.head_seq);
        // In-flight records that were dropped stay in `inflight` until their PubAck (or the
        // next reconnect) and are then let go without a spool ack.
        bump(&self.stats.spool_dropped, n);
    }

    /// A new connection (`true`) or a lost one: nothing is in flight any more, and
    /// publishing restarts at the spool's head.
    fn reset_connection(&mut self, connected: bool) {
        self.connected = connected;
        self.inflight.clear();
        self.unspooled_inflight.clear();
        self.awaiting.clear();
        self.next_send = self.head_seq;
    }

    /// A QoS 1 publish outside the spool (the status) was queued.
    fn note_untracked_publish(&mut self) {
        self.awaiting.push_back(None);
    }

    fn on_publish_sent(&mut self, pkid: u16) {
        match self.awaiting.pop_front() {
            Some(Some(Some(seq))) => {
                if let Some(entry) = self.inflight.iter_mut().find(|f| f.seq == seq) {
                    entry.pkid = Some(pkid);
                }
                bump(&self.stats.published, 1);
            }
            Some(Some(None)) => {
                if let Some(slot) = self.unspooled_inflight.iter_mut().find(|p| p.is_none()) {
                    *slot = Some(pkid);
                }
            }
            Some(None) => {}
            None => debug!(pkid, "Publish written that this connection did not queue."),
        }
    }

    fn on_puback(&mut self, pkid: u16) {
        // A PubAck for an unknown id (status, or left over from the previous connection)
        // matches nothing.
        if let Some(i) = self
            .unspooled_inflight
            .iter()
            .position(|p| *p == Some(pkid))
        {
            self.unspooled_inflight.remove(i);
        } else if let Some(entry) = self
            .inflight
            .iter_mut()
            .find(|f| f.pkid == Some(pkid) && !f.acked)
        {
            entry.acked = true;
        }
        self.settle();
    }

    /// Acknowledges in the spool, in order, the records the broker has acknowledged.
    fn settle(&mut self) {
        while let Some(&front) = self.inflight.front() {
            if !front.acked {
                break;
            }
            if front.seq == self.head_seq {
                if let Err(error) = self.spool.ack() {
                    if let Some(count) = self.spool_warn.hit(Instant::now()) {
                        warn!(%error, count, "Cannot acknowledge an alert in the spool; retrying (logged at most once a minute, with the count since the last).");
                    }
                    return;
                }
                if front.seq >= self.backlog_end {
                    self.mirror.pop_front();
                }
                self.head_seq += 1;
                bump(&self.stats.acked, 1);
            }
            // A lower `seq` was dropped by the spool while in flight: nothing to ack.
            self.inflight.pop_front();
        }
        self.check_invariants();
    }

    /// Drops the spool's head record, unreadable; `false` if even that fails.
    fn skip_head(&mut self, reason: &str) -> bool {
        warn!(
            reason,
            "Dropping an unreadable record from the alert spool."
        );
        if let Err(error) = self.spool.ack() {
            if let Some(count) = self.spool_warn.hit(Instant::now()) {
                warn!(%error, count, "Cannot drop the unreadable spool record; retrying.");
            }
            return false;
        }
        self.head_seq += 1;
        self.next_send = self.next_send.max(self.head_seq);
        bump(&self.stats.outgoing_rejected, 1);
        self.check_invariants();
        true
    }

    /// Publishes, oldest first, what the connection and the in-flight limit allow.
    /// `send` queues one publish and says whether it could.
    fn pump(&mut self, mut send: impl FnMut(&Outgoing) -> bool) {
        loop {
            if !self.connected {
                break;
            }
            // Alerts sent without the spool count against the limit as spooled ones do.
            let at_limit = self.inflight.len() + self.unspooled_inflight.len() >= self.inflight_max;
            if self.unspooled_due() {
                let Some(front) = self.unspooled.front() else {
                    break;
                };
                if at_limit || !send(&front.message) {
                    break;
                }
                // Nothing to acknowledge in the spool; in flight until its PubAck.
                self.awaiting.push_back(Some(None));
                self.unspooled_inflight.push_back(None);
                self.unspooled.pop_front();
                continue;
            }
            if self.next_send >= self.end_seq || at_limit {
                break;
            }
            let seq = self.next_send;
            let sent = if seq < self.backlog_end {
                // From an earlier run: only the head is readable, one at a time.
                if !self.inflight.is_empty() {
                    break;
                }
                match self.spool.peek() {
                    Ok(Some(record)) => match decode_record(&record) {
                        Some(message) if check_outgoing(&message).is_ok() => send(&message),
                        _ => {
                            if self.skip_head("not a darkwatch MQTT record") {
                                continue;
                            }
                            break;
                        }
                    },
                    Ok(None) => {
                        warn!("Alert spool is empty where a backlog record was expected.");
                        break;
                    }
                    Err(SpoolError::Corrupt { reason, .. }) => {
                        if self.skip_head(&reason) {
                            continue;
                        }
                        break;
                    }
                    Err(error) => {
                        if let Some(count) = self.spool_warn.hit(Instant::now()) {
                            warn!(%error, count, "Cannot read the alert spool; retrying.");
                        }
                        break;
                    }
                }
            } else {
                let index = (seq - self.mirror_front_seq()) as usize;
                send(&self.mirror[index])
            };
            if !sent {
                break;
            }
            self.inflight.push_back(InFlight {
                seq,
                pkid: None,
                acked: false,
            });
            self.awaiting.push_back(Some(Some(seq)));
            self.next_send += 1;
        }
        self.check_invariants();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_output_topics_are_recognised_and_nothing_else() {
        let own = OwnTopics::new([
            "darkwatch/{node}/alerts/{stream}",
            "darkwatch/{node}/status",
            "darkwatch/{node}/scores/{stream}/{metric}",
            "{node}/{stream}",
        ]);
        for topic in [
            "darkwatch/n1/status",
            "darkwatch/n1/alerts/n1",
            "darkwatch/n1/alerts/gpu/layer6",
            "darkwatch/other/scores/n1/anomaly_score",
            "darkwatch/n1/scores/a/b/c/threshold",
        ] {
            assert!(own.matches(topic), "{topic}");
        }
        for topic in [
            "telegraf/n1/cpu",
            "darkwatch/n1/status/x",
            "darkwatch/n1",
            "darkwatch/n1/alerts",
            "darkwatch/n1/scores/n1",
            "darkwatch",
            "",
            "/darkwatch/n1/status",
        ] {
            assert!(!own.matches(topic), "{topic}");
        }
        // A template of placeholders alone would match every topic: left out.
        assert!(!OwnTopics::new(["{node}/{stream}"]).matches("a/b"));
    }

    use super::*;

    /// The refusals are told from rumqttd's ERROR lines as they read (0.20), and the
    /// rest of its errors (a probe connection that sent nothing, a client gone) are not.
    #[test]
    fn broker_refusals_are_told_from_rumqttd_errors() {
        for (text, kind) in [
            (
                "Invalid client_id: Invalid client_id host/replica-1 ",
                Some(BrokerRefusal::ClientId),
            ),
            (
                "ZeroKeepAlive Error while handling MQTT connect packet ",
                Some(BrokerRefusal::ZeroKeepAlive),
            ),
            (
                "Network(Protocol(PayloadSizeLimitExceeded(1075219))) disconnected ",
                Some(BrokerRefusal::TooLarge),
            ),
            (
                "Network(Io(Kind(UnexpectedEof))) Error while handling MQTT connect packet ",
                None,
            ),
            (
                "Timeout(Elapsed(())) Error while handling MQTT connect packet ",
                None,
            ),
        ] {
            assert_eq!(BrokerRefusal::of(text), kind, "{text}");
        }
        let too_large = BrokerRefusal::TooLarge.explain();
        assert!(
            too_large.contains("over its limit of ")
                && too_large.contains("QoS 1 publisher")
                && too_large.contains("again on every reconnect")
                && too_large.contains("embedded_log_bytes"),
            "{too_large}"
        );
    }

    /// The embedded broker takes messages up to half its log, from the old 1 MiB up to
    /// what the agent's own client receives.
    #[test]
    fn the_embedded_payload_limit_is_half_the_log_within_bounds() {
        let mib = 1usize << 20;
        assert_eq!(embedded_max_payload(MIN_EMBEDDED_LOG_BYTES), mib);
        assert_eq!(embedded_max_payload(DEFAULT_EMBEDDED_LOG_BYTES), mib);
        assert_eq!(embedded_max_payload(16 << 20), 8 * mib);
        assert_eq!(embedded_max_payload(32 << 20), 16 * mib);
        assert_eq!(embedded_max_payload(MAX_EMBEDDED_LOG_BYTES), 16 * mib);
        // What it lets through reaches the agent's client (both bound the same length).
        const { assert!(MAX_EMBEDDED_PAYLOAD_BYTES <= MAX_INCOMING_PACKET_BYTES) };
    }
    use crate::spool::SpoolConfig;
    use std::io::Write as _;
    use std::path::Path;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc::Receiver;

    const WAIT: Duration = Duration::from_secs(20);

    fn spool_at(dir: &Path, max_bytes: u64) -> Spool {
        Spool::open(SpoolConfig {
            dir: dir.to_path_buf(),
            max_bytes,
            fsync: false,
        })
        .unwrap()
    }

    fn alert(i: usize) -> Outgoing {
        Outgoing {
            topic: format!("darkwatch/n/alerts/s{}", i % 3),
            payload: format!("alert-{i}").into_bytes(),
            retain: i.is_multiple_of(2),
        }
    }

    // ---- pure logic ----

    #[test]
    fn record_roundtrip_and_garbage() {
        for i in 0..4 {
            let m = alert(i);
            assert_eq!(decode_record(&encode_record(&m)), Some(m));
        }
        let empty = Outgoing {
            topic: "t".into(),
            payload: vec![],
            retain: false,
        };
        assert_eq!(decode_record(&encode_record(&empty)), Some(empty));
        assert_eq!(decode_record(b""), None);
        assert_eq!(decode_record(&[2, 0, 1, 0, b't']), None); // unknown version
        assert_eq!(decode_record(&[1, 0, 9, 0, b't']), None); // topic cut short
        assert_eq!(decode_record(&[1, 7, 1, 0, b't']), None); // unknown flags
    }

    /// `{node}` in a subscribe filter is this agent's node, as in the alert topic: the
    /// default subscribes to its own node's ExaMon metrics. Any other `{…}`, and a
    /// `{node}` that is not a whole level, are refused, naming the filter.
    #[test]
    fn subscribe_fills_in_node_and_refuses_other_placeholders() {
        let c = MqttConfig {
            node_name: "sn01".into(),
            ..MqttConfig::default()
        };
        assert_eq!(
            c.subscribe_filters(),
            ["org/+/cluster/+/node/sn01/plugin/+/chnl/data/#"]
        );
        assert!(c.validate().is_ok());
        // Wildcards in a node name become `_`: one level, never a wider filter.
        let wild = MqttConfig {
            node_name: "a+b/c".into(),
            subscribe: vec!["telegraf/{node}/#".into(), "x/{node}-gpu/+".into()],
            ..MqttConfig::default()
        };
        assert!(wild.validate().is_ok());
        assert_eq!(
            wild.subscribe_filters(),
            ["telegraf/a_b_c/#", "x/a_b_c-gpu/+"]
        );
        // A filter without placeholders is kept as it is.
        let central = MqttConfig {
            subscribe: vec!["org/+/cluster/+/node/+/plugin/+/chnl/data/#".into()],
            ..MqttConfig::default()
        };
        assert_eq!(central.subscribe_filters(), central.subscribe);
        for (filter, says) in [
            ("org/+/node/{stream}/#", "`{stream}`"),
            ("org/+/node/{host}/#", "`{host}`"),
            ("org/+/node/{Node}/#", "`{Node}`"),
            ("org/+/node/{node/#", "`{node`"),
            ("org/+/node/node}/#", "`}`"),
            ("org/+/node/{node}x}/#", "`}`"),
        ] {
            let c = MqttConfig {
                subscribe: vec![filter.into()],
                ..MqttConfig::default()
            };
            let (key, why) = c.validate().unwrap_err();
            assert_eq!(key, "subscribe");
            assert!(
                why.contains(filter) && why.contains(says) && why.contains("{node}"),
                "{why}"
            );
        }
        let glued = MqttConfig {
            subscribe: vec!["org/{node}#".into()],
            ..MqttConfig::default()
        };
        assert_eq!(glued.validate().unwrap_err().0, "subscribe");
    }

    #[test]
    fn config_defaults_topics_and_validation() {
        let d = MqttConfig::default();
        assert_eq!(d.broker, BrokerMode::Embedded);
        assert_eq!((d.host.as_str(), d.port), ("127.0.0.1", 1883));
        assert_eq!(d.inflight_max, 100);
        assert_eq!(d.incoming_capacity, 65536);
        assert!(d.validate().is_ok());

        let c: MqttConfig =
            serde_json::from_str(r#"{"broker": "external", "node_name": "edge+1", "port": 1884}"#)
                .unwrap();
        assert_eq!(c.broker, BrokerMode::External);
        assert_eq!(c.node(), "edge_1");
        assert_eq!(c.client_id_for(), "darkwatch-edge_1");
        assert_eq!(
            c.alert_topic_for("cpu/core#0"),
            "darkwatch/edge_1/alerts/cpu/core_0"
        );
        assert_eq!(c.status_topic_for(), "darkwatch/edge_1/status");
        assert!(serde_json::from_str::<MqttConfig>(r#"{"prot": 1}"#).is_err());
        assert!(!MqttConfig::default().node().is_empty());

        let bad = |f: fn(&mut MqttConfig), key: &str| {
            let mut c = MqttConfig::default();
            f(&mut c);
            assert_eq!(c.validate().unwrap_err().0, key);
        };
        bad(|c| c.host.clear(), "host");
        bad(
            |c| {
                c.broker = BrokerMode::External;
                c.port = 0;
            },
            "port",
        );
        bad(|c| c.keep_alive_secs = 70_000, "keep_alive_secs");
        bad(|c| c.password = "x".into(), "password");
        bad(|c| c.subscribe = Vec::new(), "subscribe");
        bad(|c| c.subscribe = vec!["a/#/b".into()], "subscribe");
        bad(|c| c.subscribe = vec!["$share//a/#".into()], "subscribe");
        bad(|c| c.subscribe = vec!["$share/g+/a/#".into()], "subscribe");
        bad(|c| c.subscribe = vec!["$share/g".into()], "subscribe");
        bad(|c| c.subscribe = vec!["$share/g/a/#/b".into()], "subscribe");
        let shared = MqttConfig {
            subscribe: vec![
                "$share/darkwatch/org/+/cluster/+/node/+/plugin/+/chnl/data/#".into(),
                "$share/g2/act/#".into(),
            ],
            ..MqttConfig::default()
        };
        assert!(shared.validate().is_ok());
        assert_eq!(
            shared_subscription("$share/g2/act/#"),
            Some(("g2", "act/#"))
        );
        assert_eq!(shared_subscription("act/#"), None);
        bad(|c| c.alert_topic = "a/+/{stream}".into(), "alert_topic");
        bad(|c| c.alert_topic = "x/{bogus}".into(), "alert_topic");
        bad(|c| c.alert_topic = "x/{node/{stream}".into(), "alert_topic");
        bad(|c| c.status_topic = "x/{node}}".into(), "status_topic");
        bad(
            |c| c.status_topic = "s/{node}/{stream}".into(),
            "status_topic",
        );
        bad(|c| c.status_topic.clear(), "status_topic");
        bad(|c| c.inflight_max = 0, "inflight_max");
        bad(|c| c.incoming_capacity = 0, "incoming_capacity");
        bad(|c| c.ca_file = "ca.pem".into(), "ca_file");
        bad(|c| c.tls = true, "tls"); // embedded broker
        bad(
            |c| {
                c.broker = BrokerMode::External;
                c.tls = true;
            },
            "ca_file",
        );
        bad(
            |c| {
                c.broker = BrokerMode::External;
                c.tls = true;
                c.ca_file = "ca.pem".into();
                c.client_cert_file = "me.pem".into();
            },
            "client_key_file",
        );
        let embedded0 = MqttConfig {
            port: 0,
            ..MqttConfig::default()
        };
        assert!(embedded0.validate().is_ok());
    }

    /// A publisher driven by hand: `sent` collects what it published.
    struct Harness {
        p: Publisher,
        sent: Vec<Outgoing>,
        next_pkid: u16,
    }

    impl Harness {
        fn new(spool: Spool, inflight_max: usize) -> Harness {
            Harness {
                p: Publisher::new(spool, inflight_max, Arc::default()),
                sent: Vec::new(),
                next_pkid: 1,
            }
        }
        /// Pumps, and reports the packet ids rumqttc would assign, returned in order.
        fn pump(&mut self) -> Vec<u16> {
            let before = self.sent.len();
            let sent = &mut self.sent;
            self.p.pump(|m| {
                sent.push(m.clone());
                true
            });
            let mut pkids = Vec::new();
            for _ in before..self.sent.len() {
                let pkid = self.next_pkid;
                self.next_pkid += 1;
                self.p.on_publish_sent(pkid);
                pkids.push(pkid);
            }
            pkids
        }
        fn sent_payloads(&self) -> Vec<String> {
            self.sent
                .iter()
                .map(|m| String::from_utf8(m.payload.clone()).unwrap())
                .collect()
        }
    }

    fn names(range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|i| format!("alert-{i}")).collect()
    }

    #[test]
    fn pipelines_acks_in_order_and_republishes_after_reconnect() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::new(spool_at(dir.path(), 1 << 16), 3);
        for i in 0..5 {
            h.p.append(alert(i));
        }
        assert!(
            h.pump().is_empty(),
            "nothing is published while disconnected"
        );
        h.p.reset_connection(true);
        let pkids = h.pump();
        assert_eq!(pkids.len(), 3, "in-flight limit");
        // An ack that overtakes an older one waits for it.
        h.p.on_puback(pkids[1]);
        assert_eq!(h.p.spool.len(), 5);
        h.p.on_puback(pkids[0]);
        assert_eq!(h.p.spool.len(), 3);
        assert_eq!(h.pump().len(), 2);
        // Connection lost with alert-2..4 in flight: they come again, in order.
        h.p.reset_connection(false);
        h.p.append(alert(5));
        h.p.reset_connection(true);
        let pkids = h.pump();
        assert_eq!(pkids.len(), 3);
        let mut expected = names(0..5);
        expected.extend(names(2..5));
        assert_eq!(h.sent_payloads(), expected);
        for pkid in pkids {
            h.p.on_puback(pkid);
        }
        h.pump();
        h.p.on_puback(h.next_pkid - 1);
        assert!(h.p.is_drained());
        assert_eq!(h.p.spool.len(), 0);
        assert_eq!(h.p.stats.acked.load(Ordering::Relaxed), 6);
        // Unknown or repeated acks change nothing.
        h.p.on_puback(999);
        assert_eq!(h.p.spool.len(), 0);
    }

    /// The trial's full disk: the spool refuses appends, and the alerts are published
    /// without it, each in its place after the spooled ones before it; the failure is
    /// logged once, not per alert, and counted.
    #[test]
    fn alerts_the_spool_refuses_are_published_in_order_without_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::new(spool_at(dir.path(), 1 << 16), 1);
        h.p.append(alert(0));
        h.p.append(alert(1));
        h.p.spool.break_appends_for_test();
        for i in 2..6 {
            h.p.append(alert(i));
        }
        assert_eq!(h.p.stats.spooled.load(Ordering::Relaxed), 2);
        assert_eq!(h.p.stats.unspooled.load(Ordering::Relaxed), 4);
        assert_eq!(h.p.stats.outgoing_rejected.load(Ordering::Relaxed), 0);
        // One warn! so far (the first), three more counted for the next one.
        assert_eq!(h.p.append_warn.count, 3);
        assert!(h.pump().is_empty(), "nothing goes out while disconnected");
        assert!(!h.p.is_drained());
        h.p.reset_connection(true);
        // In-flight limit 1: alert-0 alone; the unspooled ones wait behind alert-1, and
        // each waits for the one before it to be acknowledged (they count against the
        // limit too).
        let pkids = h.pump();
        assert_eq!(h.sent_payloads(), names(0..1));
        h.p.on_puback(pkids[0]);
        for n in 2..=6 {
            let pkids = h.pump();
            assert_eq!(pkids.len(), 1, "in-flight limit");
            assert_eq!(h.sent_payloads(), names(0..n), "in order");
            assert!(h.pump().is_empty(), "nothing more until the PubAck");
            h.p.on_puback(pkids[0]);
        }
        assert!(h.pump().is_empty());
        assert!(h.p.is_drained());
        assert_eq!(h.p.stats.spool_pending.load(Ordering::Relaxed), 0);
        assert_eq!(h.p.stats.acked.load(Ordering::Relaxed), 2);
    }

    /// The spool drops its oldest records to make room before it writes; when the write
    /// then fails, the publisher forgets those records too (it once kept counting them, and
    /// a later PubAck acknowledged a record that was never sent).
    #[test]
    fn a_failed_append_that_dropped_old_records_keeps_the_mirror_in_step() {
        let dir = tempfile::tempdir().unwrap();
        let max_bytes = 2048;
        let mut h = Harness::new(spool_at(dir.path(), max_bytes), 4);
        h.p.append(alert(10));
        let before = h.p.spool.bytes();
        h.p.append(alert(11));
        let record = h.p.spool.bytes() - before;
        let mut i = 12;
        while h.p.spool.bytes() + record <= max_bytes {
            h.p.append(alert(i));
            i += 1;
        }
        assert_eq!(h.p.spool.stats().dropped_oldest, 0);
        let spooled = h.p.stats.spooled.load(Ordering::Relaxed);
        h.p.spool.fail_writes_for_test();
        h.p.append(alert(i));
        let dropped = h.p.spool.stats().dropped_oldest;
        assert!(dropped > 0, "the append dropped old records first");
        assert_eq!(h.p.stats.unspooled.load(Ordering::Relaxed), 1);
        assert_eq!(h.p.stats.spool_dropped.load(Ordering::Relaxed), dropped);
        assert_eq!(h.p.len(), h.p.spool.len(), "publisher and spool agree");
        assert_eq!(h.p.len(), spooled - dropped);
        assert_eq!(h.p.mirror.len() as u64, h.p.len());
        // What goes out is what the spool holds, then the unspooled alert; every PubAck
        // acknowledges a record that was sent.
        h.p.reset_connection(true);
        let mut sent = 0;
        loop {
            let pkids = h.pump();
            if pkids.is_empty() {
                break;
            }
            sent += pkids.len() as u64;
            for pkid in pkids {
                h.p.on_puback(pkid);
            }
        }
        assert_eq!(sent, spooled - dropped + 1);
        assert!(h.p.is_drained());
        assert_eq!(h.p.spool.len(), 0);
        assert_eq!(h.p.stats.acked.load(Ordering::Relaxed), spooled - dropped);
    }

    /// Alerts sent without the spool count against the in-flight limit (they once went
    /// out all at once, up to 1024 QoS 1 publishes on rumqttc's request channel): a PubAck
    /// or a new connection releases them.
    #[test]
    fn unspooled_alerts_respect_the_in_flight_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::new(spool_at(dir.path(), 1 << 16), 2);
        h.p.spool.fail_writes_for_test();
        for i in 0..7 {
            h.p.append(alert(i));
        }
        assert_eq!(h.p.stats.unspooled.load(Ordering::Relaxed), 7);
        h.p.reset_connection(true);
        let pkids = h.pump();
        assert_eq!(h.sent_payloads(), names(0..2));
        assert!(h.pump().is_empty(), "at the limit");
        // A PubAck for something else (the status) releases nothing.
        h.p.on_puback(999);
        assert!(h.pump().is_empty());
        h.p.on_puback(pkids[1]);
        assert_eq!(h.pump().len(), 1);
        assert_eq!(h.sent_payloads(), names(0..3));
        // A new connection: the unacknowledged ones are not sent again (at most once), and
        // no longer count.
        h.p.reset_connection(false);
        h.p.reset_connection(true);
        assert_eq!(h.pump().len(), 2);
        assert_eq!(h.sent_payloads(), names(0..5));
        assert!(h.pump().is_empty());
        assert!(!h.p.is_drained());
    }

    /// The first failure is logged, then at most one per period with the count since.
    #[test]
    fn warn_every_logs_the_first_then_once_a_period_with_the_count() {
        let mut w = WarnEvery::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(w.hit(t0), Some(1));
        for s in 1..60 {
            assert_eq!(w.hit(t0 + Duration::from_secs(s)), None);
        }
        assert_eq!(w.hit(t0 + Duration::from_secs(60)), Some(60));
        assert_eq!(w.hit(t0 + Duration::from_secs(61)), None);
        assert_eq!(w.hit(t0 + Duration::from_secs(200)), Some(2));
    }

    #[test]
    fn previous_run_backlog_goes_first_one_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut spool = spool_at(dir.path(), 1 << 16);
            for i in 0..3 {
                spool.append(&encode_record(&alert(i))).unwrap();
            }
            spool.append(b"not a record").unwrap();
        }
        let mut h = Harness::new(spool_at(dir.path(), 1 << 16), 10);
        h.p.append(alert(3));
        h.p.append(alert(4));
        h.p.reset_connection(true);
        for i in 0..3 {
            let pkids = h.pump();
            assert_eq!(pkids.len(), 1, "backlog record {i} alone in flight");
            h.p.on_puback(pkids[0]);
        }
        // The garbage record is skipped, then this run's records go pipelined.
        assert_eq!(h.pump().len(), 2);
        assert_eq!(h.sent_payloads(), names(0..5));
        assert_eq!(h.p.stats.outgoing_rejected.load(Ordering::Relaxed), 1);
    }

    /// The trial's case: two alerts spooled while the broker was down, four bytes of the
    /// first one's payload overwritten, a restart. The second is still published and the
    /// first counts as dropped (it fed `darkwatch_alerts_spool_dropped_total` nothing).
    #[test]
    fn a_corrupt_spooled_alert_is_counted_as_dropped_and_the_next_one_sent() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut h = Harness::new(spool_at(dir.path(), 1 << 16), 4);
            h.p.append(alert(0));
            h.p.append(alert(1));
        }
        let segment = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "spool"))
            .unwrap();
        let mut data = std::fs::read(&segment).unwrap();
        // Past the spool's 8-byte frame and this record's 4-byte header: the topic.
        data[crate::spool::RECORD_HEADER_BYTES as usize + 6..][..4].copy_from_slice(b"XXXX");
        std::fs::write(&segment, &data).unwrap();

        let mut h = Harness::new(spool_at(dir.path(), 1 << 16), 4);
        assert_eq!(h.p.stats.spool_dropped.load(Ordering::Relaxed), 1);
        h.p.reset_connection(true);
        let pkids = h.pump();
        assert_eq!(h.sent_payloads(), names(1..2));
        h.p.on_puback(pkids[0]);
        assert!(h.p.is_drained());
    }

    #[test]
    fn spool_overflow_while_in_flight_keeps_order_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        // Segments of 200 bytes: about 5 records each.
        let mut h = Harness::new(spool_at(dir.path(), 1600), 4);
        h.p.reset_connection(true);
        let mut pending = Vec::new();
        for i in 0..200 {
            h.p.append(alert(i));
            pending.extend(h.pump());
            // The broker acks only now and then.
            if i.is_multiple_of(7) {
                for pkid in pending.drain(..) {
                    h.p.on_puback(pkid);
                }
            }
        }
        for _ in 0..100 {
            for pkid in pending.drain(..) {
                h.p.on_puback(pkid);
            }
            pending.extend(h.pump());
        }
        assert!(h.p.is_drained());
        assert_eq!(h.p.spool.len(), 0);
        let sent: Vec<usize> = h
            .sent_payloads()
            .iter()
            .map(|s| s["alert-".len()..].parse().unwrap())
            .collect();
        assert!(sent.windows(2).all(|w| w[0] < w[1]), "{sent:?}");
        let stats = &h.p.stats;
        assert_eq!(
            stats.acked.load(Ordering::Relaxed) + stats.spool_dropped.load(Ordering::Relaxed),
            200
        );
    }

    /// The smallest spool a configuration may have takes the largest alert that fits an
    /// MQTT packet, and a spool one byte per segment smaller would refuse it: the bound is
    /// what the spool stores, no more.
    #[test]
    fn the_smallest_configurable_spool_holds_the_largest_alert() {
        let topic = "darkwatch/n/alerts/s";
        let largest = || Outgoing {
            topic: topic.into(),
            payload: vec![b'x'; MAX_OUTGOING_PACKET_BYTES - PUBLISH_OVERHEAD_BYTES - topic.len()],
            retain: false,
        };
        assert!(check_outgoing(&largest()).is_ok());
        assert_eq!(
            encode_record(&largest()).len() as u64,
            MAX_SPOOL_PAYLOAD_BYTES
        );
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::new(spool_at(dir.path(), MIN_SPOOL_MAX_BYTES), 4);
        h.p.append(largest());
        assert_eq!(h.p.spool.len(), 1);
        assert_eq!(h.p.stats.outgoing_rejected.load(Ordering::Relaxed), 0);
        let dir = tempfile::tempdir().unwrap();
        let smaller = MIN_SPOOL_MAX_BYTES - crate::spool::SEGMENTS_PER_SPOOL;
        let mut h = Harness::new(spool_at(dir.path(), smaller), 4);
        h.p.append(largest());
        assert_eq!(h.p.spool.len(), 0);
        // The spool refuses it; it goes out without the spool instead of being lost.
        assert_eq!(h.p.stats.unspooled.load(Ordering::Relaxed), 1);
        assert_eq!(h.p.stats.outgoing_rejected.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn invalid_outgoing_is_refused_before_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::new(spool_at(dir.path(), 1 << 16), 4);
        for topic in ["", "a/+/b", "a/#"] {
            h.p.append(Outgoing {
                topic: topic.into(),
                payload: b"x".to_vec(),
                retain: false,
            });
        }
        h.p.append(Outgoing {
            topic: "t".into(),
            payload: vec![0; MAX_OUTGOING_PACKET_BYTES],
            retain: false,
        });
        assert_eq!(h.p.spool.len(), 0);
        assert_eq!(h.p.stats.outgoing_rejected.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn a_session_closed_right_after_connack_grows_the_backoff_and_a_stable_one_resets_it() {
        let ms = Duration::from_millis;
        let mut r = Reconnect::default();
        let mut now = Instant::now();
        let (mut waits, mut logged) = (Vec::new(), Vec::new());
        for i in 1..=10u64 {
            r.connected(now);
            now += ms(100); // another client takes the session over
            let (ended, wait) = r.failed(now);
            let Ended::Short { lasted, log } = ended else {
                panic!("session {i}: {ended:?}");
            };
            assert_eq!(lasted, ms(100));
            waits.push(wait.as_millis());
            if log {
                logged.push(i);
            }
            now += wait;
        }
        assert_eq!(
            waits,
            [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000, 5000]
        );
        assert_eq!(logged, [1, 2, 4, 8]);
        assert!(r.flapping());
        // A session that holds starts the backoff again…
        r.connected(now);
        now += STABLE_SESSION;
        assert_eq!(r.failed(now), (Ended::Stable, BACKOFF_MIN));
        assert!(!r.flapping());
        // …and failed attempts grow it as before.
        assert_eq!(r.failed(now), (Ended::Attempt, ms(200)));
        assert_eq!(r.failed(now), (Ended::Attempt, ms(400)));
        r.connected(now);
        assert_eq!(r.failed(now + ms(1)).1, ms(800));
    }

    #[test]
    fn a_broker_closing_the_connection_is_told_from_other_errors() {
        let io = |kind| ConnectionError::Io(io::Error::from(kind));
        assert!(closed_by_peer(&ConnectionError::MqttState(
            rumqttc::StateError::ConnectionAborted
        )));
        assert!(closed_by_peer(&io(io::ErrorKind::ConnectionReset)));
        assert!(closed_by_peer(&io(io::ErrorKind::UnexpectedEof)));
        assert!(!closed_by_peer(&io(io::ErrorKind::ConnectionRefused)));
        assert!(!closed_by_peer(&ConnectionError::NetworkTimeout));
    }

    // ---- against a real in-process rumqttd ----

    static CLIENT_IDS: AtomicUsize = AtomicUsize::new(0);

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn client_cfg(port: u16) -> MqttConfig {
        MqttConfig {
            broker: BrokerMode::External,
            port,
            node_name: "n".into(),
            keep_alive_secs: 5,
            subscribe: vec!["org/+/cluster/+/node/+/plugin/+/chnl/data/#".into()],
            ..MqttConfig::default()
        }
    }

    /// A plain rumqttc client subscribed to `filter`, forwarding what it receives.
    struct Subscriber {
        client: rumqttc::Client,
        rx: Receiver<rumqttc::Publish>,
    }

    impl Subscriber {
        fn new(port: u16, filter: &str) -> Subscriber {
            let id = format!("test-{}", CLIENT_IDS.fetch_add(1, Ordering::Relaxed));
            let mut options = MqttOptions::new(id, "127.0.0.1", port);
            options.set_keep_alive(Duration::from_secs(5));
            let (client, mut connection) = rumqttc::Client::new(options, 64);
            client.subscribe(filter, QoS::AtLeastOnce).unwrap();
            let (tx, rx) = mpsc::channel();
            let (ready_tx, ready_rx) = mpsc::channel();
            std::thread::spawn(move || {
                for event in connection.iter() {
                    match event {
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            let _ = ready_tx.send(());
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            if tx.send(p).is_err() {
                                break;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            });
            ready_rx
                .recv_timeout(WAIT)
                .expect("test subscriber subscribed");
            Subscriber { client, rx }
        }

        fn recv(&self) -> rumqttc::Publish {
            self.rx
                .recv_timeout(WAIT)
                .expect("a message within the wait")
        }

        /// Receives until `n` distinct payloads arrived; returns all payloads in order.
        fn recv_distinct(&self, n: usize) -> Vec<String> {
            let mut all = Vec::new();
            let mut seen = std::collections::HashSet::new();
            while seen.len() < n {
                let p = self.recv();
                let s = String::from_utf8(p.payload.to_vec()).unwrap();
                seen.insert(s.clone());
                all.push(s);
            }
            all
        }
    }

    /// First occurrences, in order.
    fn dedup_first(all: &[String]) -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        all.iter().filter(|s| seen.insert(*s)).cloned().collect()
    }

    /// A TCP relay from `listen_port` to a broker, so the client's port is unreachable
    /// until the test decides, while test subscribers are already on the broker.
    struct Relay {
        conns: Arc<Mutex<Vec<TcpStream>>>,
        /// While set, bytes from the broker to the client are swallowed (PubAcks lost).
        mute: Arc<AtomicBool>,
    }

    impl Relay {
        fn start(listen_port: u16, broker_port: u16) -> Relay {
            let listener = TcpListener::bind(("127.0.0.1", listen_port)).unwrap();
            let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
            let mute: Arc<AtomicBool> = Arc::default();
            let (held, muted) = (conns.clone(), mute.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(near) = stream else { continue };
                    let Ok(far) = TcpStream::connect(("127.0.0.1", broker_port)) else {
                        continue;
                    };
                    let mut list = held.lock().unwrap();
                    list.push(near.try_clone().unwrap());
                    list.push(far.try_clone().unwrap());
                    let (n2, f2) = (near.try_clone().unwrap(), far.try_clone().unwrap());
                    std::thread::spawn(move || pipe(near, far, Arc::default()));
                    let muted = muted.clone();
                    std::thread::spawn(move || pipe(f2, n2, muted));
                }
            });
            Relay { conns, mute }
        }

        /// Cuts every relayed connection, as a network failure would, and unmutes.
        fn sever(&self) {
            for s in self.conns.lock().unwrap().drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            self.mute.store(false, Ordering::SeqCst);
        }
    }

    fn pipe(mut from: TcpStream, mut to: TcpStream, mute: Arc<AtomicBool>) {
        use std::io::Read as _;
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            if !mute.load(Ordering::SeqCst) && to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
        let _ = from.shutdown(std::net::Shutdown::Both);
    }

    struct Running {
        handle: JoinHandle<()>,
        incoming: Receiver<Incoming>,
        outgoing: OutgoingSender,
        stats: Arc<MqttStats>,
        stop: ClientStop,
    }

    fn run(cfg: &MqttConfig, dir: &Path) -> Running {
        let (in_tx, incoming) = mpsc::sync_channel(cfg.incoming_capacity);
        let (outgoing, out_rx) = outgoing_channel();
        let stats = Arc::new(MqttStats::default());
        let stop = ClientStop::default();
        let handle = spawn_client(
            cfg.clone(),
            spool_at(dir, 1 << 20),
            in_tx,
            out_rx,
            stats.clone(),
            stop.clone(),
        )
        .unwrap();
        Running {
            handle,
            incoming,
            outgoing,
            stats,
            stop,
        }
    }

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    impl Running {
        fn send(&self, cfg: &MqttConfig, stream: &str, payload: &str) {
            self.outgoing
                .send(Outgoing {
                    topic: cfg.alert_topic_for(stream),
                    payload: payload.as_bytes().to_vec(),
                    retain: false,
                })
                .unwrap();
        }

        fn stop_and_join(self) -> Arc<MqttStats> {
            self.stop.stop();
            let handle = self.handle;
            wait_until("the client thread to exit", || handle.is_finished());
            handle.join().unwrap();
            self.stats
        }
    }

    #[test]
    fn subscriber_gets_alert_and_late_subscriber_sees_status() {
        let port = start_embedded_broker("127.0.0.1", 0).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cfg = client_cfg(port);
        let alerts = Subscriber::new(port, "darkwatch/n/alerts/#");
        let running = run(&cfg, dir.path());
        running.send(&cfg, "machine-1", "boom");
        let p = alerts.recv();
        assert_eq!(p.topic, "darkwatch/n/alerts/machine-1");
        assert_eq!(p.qos, QoS::AtLeastOnce);
        assert_eq!(&p.payload[..], b"boom");

        let late = Subscriber::new(port, "darkwatch/n/status");
        let status = late.recv();
        assert!(status.retain);
        let v: serde_json::Value = serde_json::from_slice(&status.payload).unwrap();
        assert_eq!(v, serde_json::json!({"status": "online", "node": "n"}));

        let stats = running.stop_and_join();
        assert_eq!(stats.acked.load(Ordering::Relaxed), 1);
        assert!(!stats.connected.load(Ordering::Relaxed));
        // A clean stop leaves the retained status offline.
        let after = Subscriber::new(port, "darkwatch/n/status");
        assert_eq!(
            &after.recv().payload[..],
            status_payload(false, "n").as_bytes()
        );
        assert_eq!(spool_at(dir.path(), 1 << 20).len(), 0);
    }

    /// Two agents with one client id (the default `darkwatch-<node>` for the same node):
    /// rumqttd, as MQTT asks, closes the older session when the newer connects. With a
    /// backoff reset on every ConnAck the two took it from each other every 100 ms or so,
    /// forever; now each short session counts as a failed attempt and the delays grow.
    #[test]
    fn two_clients_with_one_client_id_back_off_instead_of_taking_turns_forever() {
        let port = start_embedded_broker("127.0.0.1", 0).unwrap();
        let cfg = client_cfg(port);
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let first = run(&cfg, d1.path());
        wait_until("the first client to connect", || {
            first.stats.connected.load(Ordering::Relaxed)
        });
        let second = run(&cfg, d2.path());
        let count = |c: fn(&MqttStats) -> &AtomicU64| {
            c(&first.stats).load(Ordering::Relaxed) + c(&second.stats).load(Ordering::Relaxed)
        };
        // The broker does take the session over by client id, and each take-over is seen
        // as a session closed right after its ConnAck.
        wait_until("sessions taken over", || count(|s| &s.short_sessions) >= 4);
        assert!(first.stats.short_sessions.load(Ordering::Relaxed) >= 1);
        assert!(second.stats.short_sessions.load(Ordering::Relaxed) >= 1);
        // From here each client waits at least 200 ms, then 400, 800, 1600… before it
        // reconnects (and takes the session back): a handful of reconnects in 3 s, where
        // the backoff reset on ConnAck made 29 between the two.
        let before = count(|s| &s.reconnects);
        std::thread::sleep(Duration::from_secs(3));
        let during = count(|s| &s.reconnects) - before;
        assert!(during <= 12, "{during} reconnects in 3 s");
        first.stop_and_join();
        second.stop_and_join();
    }

    #[test]
    fn incoming_message_reaches_the_channel() {
        let port = start_embedded_broker("127.0.0.1", 0).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cfg = client_cfg(port);
        let running = run(&cfg, dir.path());
        let publisher = Subscriber::new(port, "unused/topic");
        let topic = "org/o1/cluster/c1/node/n1/plugin/p1/chnl/data/cpu";
        // The client subscribes right after it connects; publish until it has.
        let start = Instant::now();
        let got = loop {
            assert!(start.elapsed() < WAIT, "no incoming message");
            publisher
                .client
                .publish(topic, QoS::AtLeastOnce, false, b"42.5".to_vec())
                .unwrap();
            if let Ok(m) = running.incoming.recv_timeout(Duration::from_millis(200)) {
                break m;
            }
        };
        assert_eq!(got.topic, topic);
        assert_eq!(got.payload, b"42.5");
        assert!(got.received > 1.6e9);
        let stats = running.stop_and_join();
        assert!(stats.received.load(Ordering::Relaxed) >= 1);
        assert_eq!(stats.incoming_dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn no_alert_lost_while_broker_unreachable() {
        let broker = start_embedded_broker("127.0.0.1", 0).unwrap();
        let alerts = Subscriber::new(broker, "darkwatch/n/alerts/#");
        let port = free_port(); // nothing listens here yet
        let dir = tempfile::tempdir().unwrap();
        let cfg = client_cfg(port);
        let running = run(&cfg, dir.path());
        let n = 20;
        for i in 0..n {
            running.send(&cfg, "s", &format!("alert-{i}"));
        }
        let stats = running.stats.clone();
        wait_until("all alerts spooled", || {
            stats.spooled.load(Ordering::Relaxed) == n as u64
        });
        wait_until("a failed connection", || {
            stats.reconnects.load(Ordering::Relaxed) >= 2
        });
        assert!(!stats.connected.load(Ordering::Relaxed));
        assert!(alerts.rx.try_recv().is_err());
        // The backlog gauges (darkwatch_alerts_spool_pending and _bytes) show what waits.
        wait_until("the backlog gauge", || {
            stats.spool_pending.load(Ordering::Relaxed) == n as u64
        });
        assert!(stats.spool_bytes.load(Ordering::Relaxed) >= n as u64 * (8 + 7));

        let _relay = Relay::start(port, broker); // the broker becomes reachable
        let all = alerts.recv_distinct(n);
        assert_eq!(dedup_first(&all), names(0..n), "received {all:?}");
        let stats = running.stop_and_join();
        assert_eq!(stats.acked.load(Ordering::Relaxed), n as u64);
        assert_eq!(stats.spool_pending.load(Ordering::Relaxed), 0);
        assert_eq!(spool_at(dir.path(), 1 << 20).len(), 0);
    }

    #[test]
    fn in_flight_alerts_are_republished_after_a_cut() {
        let broker = start_embedded_broker("127.0.0.1", 0).unwrap();
        let alerts = Subscriber::new(broker, "darkwatch/n/alerts/#");
        let port = free_port();
        let relay = Relay::start(port, broker);
        let dir = tempfile::tempdir().unwrap();
        let cfg = client_cfg(port);
        let running = run(&cfg, dir.path());
        for i in 0..30 {
            running.send(&cfg, "s", &format!("alert-{i}"));
        }
        let mut all = alerts.recv_distinct(30);
        // The broker gets alert-30..59 but its PubAcks never reach the client.
        relay.mute.store(true, Ordering::SeqCst);
        for i in 30..60 {
            running.send(&cfg, "s", &format!("alert-{i}"));
        }
        while dedup_first(&all).len() < 60 {
            all.push(String::from_utf8(alerts.recv().payload.to_vec()).unwrap());
        }
        let stats = running.stats.clone();
        assert!(stats.acked.load(Ordering::Relaxed) <= 30);
        relay.sever();
        for i in 60..80 {
            running.send(&cfg, "s", &format!("alert-{i}"));
        }
        wait_until("every alert acknowledged", || {
            stats.acked.load(Ordering::Relaxed) == 80
        });
        while let Ok(p) = alerts.rx.recv_timeout(Duration::from_millis(300)) {
            all.push(String::from_utf8(p.payload.to_vec()).unwrap());
        }
        assert_eq!(dedup_first(&all), names(0..80));
        // The unacknowledged ones went out again after the reconnect.
        assert!(all.len() >= 110, "{} received", all.len());
        assert!(stats.published.load(Ordering::Relaxed) >= 110);
        let stats = running.stop_and_join();
        assert!(stats.reconnects.load(Ordering::Relaxed) >= 1);
        assert_eq!(spool_at(dir.path(), 1 << 20).len(), 0);
    }

    #[test]
    fn previous_run_spool_is_published_first() {
        let port = start_embedded_broker("127.0.0.1", 0).unwrap();
        let alerts = Subscriber::new(port, "darkwatch/n/alerts/#");
        let dir = tempfile::tempdir().unwrap();
        let cfg = client_cfg(port);
        {
            let mut spool = spool_at(dir.path(), 1 << 20);
            for i in 0..3 {
                let m = Outgoing {
                    topic: cfg.alert_topic_for("old"),
                    payload: format!("alert-{i}").into_bytes(),
                    retain: false,
                };
                spool.append(&encode_record(&m)).unwrap();
            }
        }
        let running = run(&cfg, dir.path());
        for i in 3..6 {
            running.send(&cfg, "new", &format!("alert-{i}"));
        }
        let all = alerts.recv_distinct(6);
        assert_eq!(dedup_first(&all), names(0..6));
        running.stop_and_join();
        assert_eq!(spool_at(dir.path(), 1 << 20).len(), 0);
    }

    #[test]
    fn stop_exits_while_disconnected_and_keeps_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = client_cfg(free_port());
        let running = run(&cfg, dir.path());
        for i in 0..3 {
            running.send(&cfg, "s", &format!("alert-{i}"));
        }
        let stats = running.stats.clone();
        wait_until("alerts spooled", || {
            stats.spooled.load(Ordering::Relaxed) == 3
        });
        running.stop_and_join();
        assert_eq!(spool_at(dir.path(), 1 << 20).len(), 3);
    }

    #[test]
    fn tls_files_are_checked_at_start_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.txt");
        std::fs::write(&not_pem, "hello").unwrap();
        let start = |ca: &Path| {
            let cfg = MqttConfig {
                broker: BrokerMode::External,
                tls: true,
                ca_file: ca.to_path_buf(),
                ..MqttConfig::default()
            };
            let (in_tx, _in_rx) = mpsc::sync_channel(1);
            let (_out_tx, out_rx) = outgoing_channel();
            spawn_client(
                cfg,
                spool_at(dir.path(), 1 << 16),
                in_tx,
                out_rx,
                Arc::default(),
                ClientStop::default(),
            )
            .map(|_| ())
            .unwrap_err()
            .to_string()
        };
        let missing = dir.path().join("missing.pem");
        let err = start(&missing);
        assert!(
            err.contains("missing.pem") && err.contains("cannot read"),
            "{err}"
        );
        let err = start(&not_pem);
        assert!(err.contains("ca.txt") && err.contains("not a PEM"), "{err}");
    }

    #[test]
    fn embedded_broker_reports_a_taken_port() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let err = start_embedded_broker("127.0.0.1", port).unwrap_err();
        assert!(matches!(err, MqttError::Broker { .. }), "{err}");
        assert!(err.to_string().contains(&port.to_string()), "{err}");
        let cfg = MqttConfig {
            inflight_max: 0,
            ..MqttConfig::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let (in_tx, _in_rx) = mpsc::sync_channel(1);
        let (_out_tx, out_rx) = outgoing_channel();
        let err = spawn_client(
            cfg,
            spool_at(dir.path(), 1 << 16),
            in_tx,
            out_rx,
            Arc::default(),
            ClientStop::default(),
        )
        .unwrap_err();
        assert!(matches!(
            err,
            MqttError::Config {
                key: "inflight_max",
                ..
            }
        ));
    }

    // ---- the embedded broker's log: a subscriber that falls behind ----

    /// A subscriber that takes nothing until [`Gated::open`]: it subscribes, then stops
    /// polling, so it acknowledges nothing and rumqttd keeps what it has not delivered in
    /// its log, as for an agent busy scoring. Keep-alive 60 s: the broker must not drop it.
    struct Gated {
        gate: mpsc::Sender<()>,
        rx: Receiver<rumqttc::Publish>,
    }

    impl Gated {
        fn new(port: u16, filter: &str) -> Gated {
            let id = format!("gated-{}", CLIENT_IDS.fetch_add(1, Ordering::Relaxed));
            let mut options = MqttOptions::new(id, "127.0.0.1", port);
            options.set_keep_alive(Duration::from_secs(60));
            options.set_max_packet_size(1 << 20, 1 << 20);
            let (client, mut connection) = rumqttc::Client::new(options, 64);
            client.subscribe(filter, QoS::AtLeastOnce).unwrap();
            let (tx, rx) = mpsc::channel();
            let (ready_tx, ready_rx) = mpsc::channel();
            let (gate, gate_rx) = mpsc::channel::<()>();
            std::thread::spawn(move || {
                let _client = client;
                let mut iter = connection.iter();
                for event in iter.by_ref() {
                    if let Ok(Event::Incoming(Packet::SubAck(_))) = event {
                        let _ = ready_tx.send(());
                        break;
                    }
                }
                let _ = gate_rx.recv();
                for event in iter {
                    match event {
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            if tx.send(p).is_err() {
                                break;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            });
            ready_rx
                .recv_timeout(WAIT)
                .expect("gated subscriber subscribed");
            Gated { gate, rx }
        }

        /// Lets it read, and counts the distinct frame numbers it gets until `done` says
        /// the count is complete (asked whenever no message came for 200 ms), or 60 s
        /// pass: a delivery pause on a loaded machine does not cut the count short.
        fn open_and_count(self, done: impl Fn(usize) -> bool) -> usize {
            self.gate.send(()).unwrap();
            let mut seen = std::collections::HashSet::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                match self.rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(p) => {
                        seen.insert(u32::from_le_bytes(p.payload[..4].try_into().unwrap()));
                    }
                    Err(mpsc::RecvTimeoutError::Timeout)
                        if !done(seen.len()) && std::time::Instant::now() < deadline => {}
                    Err(_) => return seen.len(),
                }
            }
        }
    }

    /// Publishes `n` messages of `bytes` bytes (the frame number first) on `topic` at QoS 1
    /// and returns once the broker acknowledged every one.
    fn publish_acked(port: u16, topic: &str, n: u32, bytes: usize) {
        let id = format!("pub-{}", CLIENT_IDS.fetch_add(1, Ordering::Relaxed));
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut connection) = rumqttc::Client::new(options, 256);
        let (acked_tx, acked_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut acked = 0u32;
            for event in connection.iter() {
                match event {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acked += 1;
                        if acked == n {
                            let _ = acked_tx.send(());
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        for i in 0..n {
            let mut payload = vec![0u8; bytes];
            payload[..4].copy_from_slice(&i.to_le_bytes());
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .unwrap();
        }
        acked_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("every publish acknowledged");
        let _ = client.disconnect();
    }

    /// The trial: 5,000 raw frames of 768 float32 values (3 KiB), all acknowledged, while
    /// the subscriber takes none. rumqttd's log was 10 segments of 1 MiB, which skipped the
    /// oldest ~1,100 of them (the agent got 3,819 to 3,931); a log of 16 MiB, as the
    /// documentation advises for such bursts, holds them all.
    #[test]
    fn a_16_mib_embedded_log_keeps_a_backlog_larger_than_the_old_10_mib() {
        let port = start_embedded_broker_with("127.0.0.1", 0, 16 << 20).unwrap();
        let slow = Gated::new(port, "act/#");
        publish_acked(port, "act/m/l6", 5_000, 768 * 4);
        assert_eq!(slow.open_and_count(|got| got == 5_000), 5_000);
    }

    /// The default log holds what its documentation says: 680 frames of 768 float32
    /// values (600 here, a margin), so a subscriber that far behind loses none.
    #[test]
    fn the_default_embedded_log_keeps_its_stated_backlog() {
        let port = start_embedded_broker("127.0.0.1", 0).unwrap();
        let slow = Gated::new(port, "act/#");
        publish_acked(port, "act/m/l6", 600, 768 * 4);
        assert_eq!(slow.open_and_count(|got| got == 600), 600);
    }

    /// Installs [`broker_skip_hook`] as the process's subscriber (once; tests that capture
    /// the log install their own for their thread).
    fn hook_installed() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            use tracing_subscriber::layer::SubscriberExt as _;
            // Nothing else in the library's tests sets the global subscriber: a failure here
            // would leave the hook out while `counted` says it is in.
            tracing::subscriber::set_global_default(
                tracing_subscriber::registry().with(broker_skip_hook()),
            )
            .expect("no other global subscriber in the library's tests");
        });
    }

    /// A backlog beyond the log is lost, but not silently: every message the broker
    /// skipped is counted, so what the subscriber got and what was skipped add up to what
    /// was published.
    #[test]
    fn messages_skipped_beyond_the_embedded_log_are_counted() {
        hook_installed();
        let port = start_embedded_broker_with("127.0.0.1", 0, MIN_EMBEDDED_LOG_BYTES).unwrap();
        let slow = Gated::new(port, "skip/#");
        let before = broker_skipped();
        assert!(before.counted);
        publish_acked(port, "skip/m/l6", 2_000, 768 * 4);
        let got = slow.open_and_count(|got| {
            got as u64 + broker_skipped().messages - before.messages == 2_000
        });
        let after = broker_skipped();
        let skipped = after.messages - before.messages;
        assert!(got < 2_000, "a 1 MiB log cannot hold 6 MB: got {got}");
        assert_eq!(got as u64 + skipped, 2_000, "got {got}, skipped {skipped}");
        assert!(after.times > before.times);
        assert_eq!(after.last_filter, "skip/#");
    }

    #[test]
    fn embedded_log_bytes_is_checked() {
        assert!(embedded_router(MIN_EMBEDDED_LOG_BYTES - 1).is_err());
        assert!(embedded_router(MAX_EMBEDDED_LOG_BYTES + 1).is_err());
        let r = embedded_router(DEFAULT_EMBEDDED_LOG_BYTES).unwrap();
        // Sixteen full segments stay when the oldest goes: the whole log is kept.
        assert_eq!(
            (r.max_segment_count as u64 - 1) * r.max_segment_size as u64,
            DEFAULT_EMBEDDED_LOG_BYTES
        );
        let mut c = MqttConfig {
            embedded_log_bytes: 1000,
            ..MqttConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().0, "embedded_log_bytes");
        c.embedded_log_bytes = 256 << 20;
        assert!(c.validate().is_ok());
        let err = start_embedded_broker_with("127.0.0.1", 0, 0).unwrap_err();
        assert!(err.to_string().contains("embedded_log_bytes"), "{err}");
    }

    #[test]
    fn cursor_jump_fields_parse() {
        assert_eq!(parse_cursor("(3, 1200)"), Some((3, 1200)));
        assert_eq!(parse_cursor("(3,1200)"), Some((3, 1200)));
        assert_eq!(parse_cursor("3, 1200"), None);
        assert_eq!(parse_cursor("(x, 1)"), None);
        let jump = CursorJump {
            from: Some((0, 30)),
            to: Some((2, 530)),
            error: "Read cursor start jumped from (0, 30) to (2, 530) on a/+/b on c".into(),
        };
        assert_eq!(jump.lost(), Some(500));
        assert_eq!(jump.filter(), Some("c"));
        assert_eq!(CursorJump::default().lost(), None);
    }

    /// Resident memory of the embedded broker's full log, per message and per counted
    /// byte (ignored: it prints, and asserts nothing). Run with
    /// `cargo test --release --lib -- --ignored --nocapture embedded_log_memory`.
    #[test]
    #[ignore]
    fn embedded_log_memory() {
        fn rss() -> u64 {
            std::fs::read_to_string("/proc/self/status")
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        }
        for (what, topic, bytes, n) in [
            (
                "ExaMon-like",
                "org/o/cluster/c/node/n001/plugin/p/chnl/data/cpu.usage",
                24usize,
                400_000u32,
            ),
            ("3 KiB frames", "act/m/l6", 768 * 4, 12_000),
        ] {
            let log = 16u64 << 20;
            let port = start_embedded_broker_with("127.0.0.1", 0, log).unwrap();
            // A subscriber that keeps up (its messages are dropped as they come), so the
            // growth is the broker's log.
            let sub = Subscriber::new(port, "#");
            std::thread::spawn(move || while sub.rx.recv().is_ok() {});
            let before = rss();
            publish_acked(port, topic, n, bytes);
            std::thread::sleep(Duration::from_secs(1));
            let grown = rss().saturating_sub(before);
            let counted = (4 + topic.len() + bytes) as u64;
            let held = (log / counted).min(u64::from(n));
            println!(
                "{what}: {n} published, {counted} counted bytes each, log {log} bytes holds {held}: RSS +{} MiB, {} bytes per message held, {:.2}x the counted bytes",
                grown >> 20,
                grown / held,
                grown as f64 / (held * counted) as f64
            );
        }
    }

    /// How much of a burst the embedded broker's log rides out for a subscriber that takes
    /// nothing until the burst is over (ignored: it prints, and asserts nothing): for logs
    /// of 1, 2, 4 and 16 MiB, a burst of twice what the log holds, of ExaMon-sized messages
    /// and of 3 KiB frames. Run with
    /// `cargo test --release --lib -- --ignored --nocapture embedded_log_burst`.
    #[test]
    #[ignore]
    fn embedded_log_burst() {
        hook_installed();
        for log in [1u64 << 20, 2 << 20, 4 << 20, 16 << 20] {
            for (what, topic, bytes) in [
                (
                    "ExaMon-like",
                    "org/o/cluster/c/node/n001/plugin/p/chnl/data/cpu.usage",
                    24usize,
                ),
                ("3 KiB frames", "act/m/l6", 768 * 4),
            ] {
                let port = start_embedded_broker_with("127.0.0.1", 0, log).unwrap();
                let slow = Gated::new(port, "#");
                let counted = (4 + topic.len() + bytes) as u64;
                let fits = log / counted;
                let n = u32::try_from(2 * fits).unwrap();
                let before = broker_skipped().messages;
                publish_acked(port, topic, n, bytes);
                let got = slow.open_and_count(|got| {
                    got as u64 + broker_skipped().messages - before >= u64::from(n)
                });
                println!(
                    "log {} MiB, {what} ({counted} counted bytes): {fits} fit; a burst of {n}: {got} delivered, {} skipped",
                    log >> 20,
                    broker_skipped().messages - before
                );
            }
        }
    }

    fn sample(topics: &Arc<ScoreTopics>, score: f32, threshold: f64, ts: f64) -> ScoreSample {
        ScoreSample {
            topics: topics.clone(),
            score,
            threshold,
            timestamp: ts,
        }
    }

    /// The payloads, by hand: ExaMon's `<value>;<seconds>` and newer ExaMon's JSON with
    /// milliseconds; anomaly_score = score / threshold, left out (not a NaN) when the
    /// threshold is not positive.
    #[test]
    fn score_payloads_and_values_are_examons() {
        assert_eq!(
            score_payload(ScorePayload::Legacy, 1.25, 1_700_000_012.345_6),
            "1.25;1700000012.346"
        );
        assert_eq!(
            score_payload(ScorePayload::Json, 1.25, 1_700_000_012.345_6),
            "{\"v\":1.25,\"ts\":1700000012346}"
        );
        let cfg = ScoresConfig::default();
        let topics = Arc::new(cfg.template_topics("n", "s"));
        let s = sample(&topics, 3.0, 2.0, 0.0);
        assert_eq!(s.values(), [1.5, 3.0, 2.0]);
        assert_eq!(s.messages(), 3);
        let zero = sample(&topics, 3.0, 0.0, 0.0);
        assert!(zero.values()[0].is_nan());
        assert_eq!(zero.messages(), 2);
        assert_eq!(
            topics.topics[0].as_deref(),
            Some("darkwatch/n/scores/s/anomaly_score")
        );
        let only = ScoresConfig {
            metrics: vec!["anomaly_score".into()],
            ..ScoresConfig::default()
        };
        let t = only.examon_topics("o", "c/1", "n7", &[("gpu".into(), "0".into())], "m1");
        assert_eq!(
            t.topics,
            [
                Some("org/o/cluster/c%2F1/node/n7/plugin/examon-ai_pub/chnl/data/model/m1/gpu/0/anomaly_score".to_string()),
                None,
                None
            ]
        );
        // A stream key of the fixed part is renamed, not repeated (one value per tag).
        let keyed = only.examon_topics(
            "o",
            "c",
            "n7",
            &[
                ("plugin".into(), "pmu".into()),
                ("model".into(), "x".into()),
            ],
            "m1",
        );
        assert_eq!(
            keyed.topics[0].as_deref(),
            Some(
                "org/o/cluster/c/node/n7/plugin/examon-ai_pub/chnl/data/model/m1/src_plugin/pmu/src_model/x/anomaly_score"
            )
        );
        let compact = ScoresConfig {
            topic_layout: ScoreTopicLayout::Compact,
            ..ScoresConfig::default()
        };
        assert_eq!(
            compact.examon_topics("o", "c", "n7", &[], "m1").topics[1].as_deref(),
            Some("o/c/examon-ai_pub/n7/score")
        );
    }

    #[test]
    fn score_config_refusals_name_the_key() {
        assert_eq!(ScoresConfig::default().validate(), Ok(()));
        let bad = |f: &dyn Fn(&mut ScoresConfig)| {
            let mut c = ScoresConfig::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert_eq!(bad(&|c| c.interval_secs = -1.0).0, "interval_secs");
        assert_eq!(bad(&|c| c.interval_secs = f64::NAN).0, "interval_secs");
        assert_eq!(bad(&|c| c.metrics.clear()).0, "metrics");
        let (key, why) = bad(&|c| c.metrics = vec!["anomaly".into()]);
        assert!(key == "metrics" && why.contains("anomaly_score"), "{why}");
        for plugin in ["a/b", "a b", "a%2F", "a+", "#", ""] {
            assert_eq!(bad(&|c| c.plugin = plugin.into()).0, "plugin", "{plugin:?}");
        }
        let (key, why) = bad(&|c| c.topic = "scores/{stream}".into());
        assert!(key == "topic" && why.contains("{metric}"), "{why}");
        let (key, why) = bad(&|c| c.topic = "scores/{host}/{metric}".into());
        assert!(key == "topic" && why.contains("`{host}`"), "{why}");
        for open in ["darkwatch/{node/{metric}", "darkwatch/{node}}/{metric}"] {
            let (key, why) = bad(&|c| c.topic = open.into());
            assert!(key == "topic" && why.contains(open), "{open}: {why}");
        }
        assert_eq!(bad(&|c| c.topic = "scores/+/{metric}".into()).0, "topic");
        assert_eq!(bad(&|c| c.queue_capacity = 0).0, "queue_capacity");
    }

    /// A broker slower than the scores: a client whose event loop never runs writes
    /// nothing, so its share of the request queue ([`SCORE_SLOTS`]) fills and the rest
    /// wait in the score queue; a full queue drops at once (the sender never waits), and
    /// without a connection what waits is dropped. Every message is accounted for.
    #[test]
    fn scores_wait_in_their_share_then_drop_when_the_broker_is_slow_or_gone() {
        let stats = Arc::new(MqttStats::default());
        let cfg = ScoresConfig {
            queue_capacity: 40,
            ..ScoresConfig::default()
        };
        let (tx, rx) = score_channel(&cfg, stats.clone());
        let topics = Arc::new(cfg.template_topics("n", "s"));
        for i in 0..50 {
            tx.send(sample(&topics, 1.0, 2.0, f64::from(i)));
        }
        let published = || stats.scores_published.load(Ordering::Relaxed);
        let dropped = || stats.scores_dropped.load(Ordering::Relaxed);
        // 40 samples wait; 10 are dropped at once, 3 messages each.
        assert_eq!((published(), dropped()), (0, 30));
        let (client, _eventloop) = AsyncClient::new(
            MqttOptions::new("scores-test", "127.0.0.1", 1),
            SCORE_SLOTS + 3,
        );
        let mut queued = 0;
        assert!(rx.pump(&client, true, &mut queued, &stats), "samples wait");
        // 22 samples handed over (the share fills within the 22nd), 18 wait.
        assert_eq!((queued, published(), dropped()), (66, 66, 30));
        // Nothing written since: the next turn hands over and drops nothing.
        assert!(rx.pump(&client, true, &mut queued, &stats));
        assert_eq!((published(), dropped()), (66, 30));
        // The connection goes: the 18 waiting are dropped, counted.
        assert!(!rx.pump(&client, false, &mut queued, &stats));
        assert_eq!((published(), dropped()), (66, 30 + 54));
        assert_eq!(published() + dropped(), 3 * 50);
    }

    /// A burst of scores wakes the MQTT client once, not once per sample; a sample sent
    /// after it drained the queue wakes it again (no lost wake-up).
    #[test]
    fn score_templates_under_the_alert_topic_overlap() {
        let alert = MqttConfig::default().alert_topic;
        assert!(!templates_overlap(&ScoresConfig::default().topic, &alert));
        assert!(templates_overlap(
            "darkwatch/{node}/alerts/{stream}/{metric}",
            &alert
        ));
        assert!(templates_overlap(
            "darkwatch/{node}/alerts/x/{metric}",
            &alert
        ));
        assert!(templates_overlap("{stream}/{metric}", &alert));
        assert!(!templates_overlap(
            "scores/{node}/{stream}/{metric}",
            &alert
        ));
        assert!(!templates_overlap(
            "darkwatch/{node}/alertsx/{metric}",
            "darkwatch/{node}/alerts/{stream}"
        ));
    }

    #[test]
    fn a_burst_of_scores_wakes_the_client_once() {
        let cfg = ScoresConfig::default();
        let stats = Arc::new(MqttStats::default());
        let (tx, rx) = score_channel(&cfg, stats.clone());
        let topics = Arc::new(cfg.template_topics("n", "s"));
        let (client, _eventloop) =
            AsyncClient::new(MqttOptions::new("wake-test", "127.0.0.1", 1), 8);
        let woken = || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            rt.block_on(async {
                tokio::time::timeout(Duration::from_millis(20), rx.wake.notified())
                    .await
                    .is_ok()
            })
        };
        assert!(!rx.awake.load(Ordering::SeqCst));
        tx.send(sample(&topics, 1.0, 2.0, 0.0));
        assert!(
            rx.awake.load(Ordering::SeqCst),
            "the first send sets the flag"
        );
        // The flag is set: the rest of the burst notifies nobody (one permit, one wake).
        for i in 1..100 {
            tx.send(sample(&topics, 1.0, 2.0, f64::from(i)));
            assert!(rx.awake.load(Ordering::SeqCst));
        }
        assert!(woken(), "the burst's one wake");
        assert!(!woken(), "no second permit");
        let mut queued = 0;
        assert!(!rx.pump(&client, false, &mut queued, &stats), "drained");
        assert!(
            !rx.awake.load(Ordering::SeqCst),
            "cleared once the queue is empty"
        );
        tx.send(sample(&topics, 1.0, 2.0, 100.0));
        assert!(woken(), "a send after the drain wakes the client again");
    }
}
