//! systemd integration of `darkwatch run`: `sd_notify` messages (READY, RELOADING,
//! STOPPING, STATUS, WATCHDOG) and the watchdog that pings only while the agent makes
//! progress.
//!
//! The binary reads `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID` and hands them
//! in here; the library does not read the environment. Fed by the agent's
//! [`AgentCounters`]; feeds systemd through a datagram socket.
//!
//! # Progress
//!
//! `WATCHDOG=1` means "the agent is alive", so it is sent only when, since the last ping:
//!
//! - the source thread turned its loop at least once (it wakes at least every 50 ms, input
//!   or not), and
//! - frames that were already waiting for the scorer at the last ping were scored (or none
//!   were waiting: an agent whose input is quiet is healthy).
//!
//! A scorer or sink thread that hangs or died leaves frames waiting and stops the pings;
//! systemd then kills and restarts the service after `WatchdogSec`.

use std::ffi::OsString;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::agent::AgentCounters;

/// Sends states to systemd (a datagram to `$NOTIFY_SOCKET`); does nothing without a socket.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    socket: Option<OsString>,
}

impl Notifier {
    /// A notifier for `socket` (the value of `$NOTIFY_SOCKET`: a path, or `@name` for an
    /// abstract socket); `None` or empty turns it off.
    pub fn new(socket: Option<OsString>) -> Notifier {
        Notifier {
            socket: socket.filter(|s| !s.is_empty()),
        }
    }

    /// Whether a socket is set (the process runs under systemd with `Type=notify`).
    pub fn is_enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Sends `state` (newline-separated `KEY=value` lines).
    ///
    /// # Errors
    /// The socket cannot be created or the datagram not sent.
    pub fn notify(&self, state: &str) -> std::io::Result<()> {
        let Some(path) = &self.socket else {
            return Ok(());
        };
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(abstract_name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            sock.send_to(state.as_bytes(), path)?;
        }
        Ok(())
    }

    /// [`Self::notify`], logging (not returning) a failure.
    pub fn send(&self, state: &str) {
        if let Err(e) = self.notify(state) {
            tracing::warn!(error = %e, "Could not notify systemd.");
        }
    }
}

/// The ping period systemd asks for: half of `$WATCHDOG_USEC` (`usec`), when that is a
/// positive number and `$WATCHDOG_PID` (`pid`) is unset or names this process (`own_pid`).
/// `None`: no watchdog.
pub fn watchdog_period(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid.map(str::trim).filter(|p| !p.is_empty())
        && pid.parse::<u32>().ok() != Some(own_pid)
    {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// A snapshot of the agent's progress counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Turns of the source thread's loop.
    pub source_turns: u64,
    /// Complete frames handed to the scorer.
    pub frames_queued: u64,
    /// Frames that came out of the scorer into the sink.
    pub frames_scored: u64,
}

impl Progress {
    /// The counters of a running agent, now.
    pub fn of(c: &AgentCounters) -> Progress {
        Progress {
            source_turns: c.source_turns.load(Ordering::Relaxed),
            frames_queued: c.frames_queued.load(Ordering::Relaxed),
            frames_scored: c.frames_scored.load(Ordering::Relaxed),
        }
    }
}

/// What the watchdog concluded at one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Progress since the last check (or nothing to do): ping.
    Alive,
    /// The source thread did not turn its loop since the last check.
    SourceStalled,
    /// Frames waited for the scorer at the last check and none was scored since.
    ScorerStalled { waiting: u64 },
}

/// Decides from successive [`Progress`] snapshots whether the agent is alive.
#[derive(Debug, Default)]
pub struct Liveness {
    last: Option<Progress>,
}

impl Liveness {
    /// Compares `now` with the previous snapshot. The first check has nothing to compare
    /// with and reports [`Health::Alive`].
    pub fn check(&mut self, now: Progress) -> Health {
        let Some(prev) = self.last.replace(now) else {
            return Health::Alive;
        };
        if now.source_turns == prev.source_turns {
            return Health::SourceStalled;
        }
        let waiting = prev.frames_queued.saturating_sub(prev.frames_scored);
        if waiting > 0 && now.frames_scored == prev.frames_scored {
            return Health::ScorerStalled { waiting };
        }
        Health::Alive
    }
}

/// A one-line `STATUS=` text for systemd from the agent's counters: the state now
/// (alerts firing, streams and silent ones, and `frames_per_sec`, the frames scored per
/// second since the last line, when known), then what was counted since the start.
pub fn status_line(c: &AgentCounters, frames_per_sec: Option<f64>) -> String {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let model = c.model_id();
    let firing = load(&c.firing_now);
    let streams = load(&c.streams);
    let rate = match frames_per_sec {
        Some(r) if r.is_finite() && r >= 10.0 => format!(", {r:.0} frames/s"),
        Some(r) if r.is_finite() && r >= 0.0 => format!(", {r:.1} frames/s"),
        _ => String::new(),
    };
    format!(
        "model {}: {firing} alert{} firing, {streams} stream{} ({} silent){rate}; since start: {} frames scored, {}, {} messages ({} rejected)",
        if model.is_empty() { "-" } else { &model },
        if firing == 1 { "" } else { "s" },
        if streams == 1 { "" } else { "s" },
        load(&c.streams_silent),
        load(&c.frames_scored),
        c.alert_events_text(),
        load(&c.messages),
        c.decode_errors() + c.samples_rejected(),
    )
}

/// Starts the `darkwatch-watchdog` thread: every `period` (the watchdog period, or
/// `status_every` without a watchdog) it checks [`Liveness`] and sends `STATUS=` and,
/// while alive and a watchdog `period` is set, `WATCHDOG=1`. It logs when the agent stalls
/// and when it recovers. Ends when `stop` is set. Returns `None` when `notifier` is off.
///
/// # Errors
/// The thread cannot start.
pub fn spawn_watchdog(
    notifier: Notifier,
    period: Option<Duration>,
    status_every: Duration,
    counters: Arc<AgentCounters>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<Option<JoinHandle<()>>> {
    if !notifier.is_enabled() {
        return Ok(None);
    }
    let tick = period.unwrap_or(status_every).max(Duration::from_millis(1));
    let handle = std::thread::Builder::new()
        .name("darkwatch-watchdog".into())
        .spawn(move || {
            let mut liveness = Liveness::default();
            let mut was_alive = true;
            let mut status = String::new();
            // Frames scored at the last line, and when: the rate over the interval.
            let mut last: Option<(u64, Instant)> = None;
            // Sleep in short steps so `stop` is seen quickly.
            let step = tick.min(Duration::from_millis(100));
            loop {
                let mut slept = Duration::ZERO;
                while slept < tick {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let nap = step.min(tick - slept);
                    std::thread::sleep(nap);
                    slept += nap;
                }
                let health = liveness.check(Progress::of(&counters));
                let alive = health == Health::Alive;
                if alive != was_alive {
                    if alive {
                        tracing::info!("Agent making progress again; watchdog pings resume.");
                    } else {
                        tracing::error!(?health, "Agent stalled; watchdog pings stop.");
                    }
                    was_alive = alive;
                }
                let scored = (
                    counters.frames_scored.load(Ordering::Relaxed),
                    Instant::now(),
                );
                let rate = last.map(|(n, t)| {
                    (scored.0.saturating_sub(n)) as f64
                        / scored.1.duration_since(t).as_secs_f64().max(1e-3)
                });
                last = Some(scored);
                let now = if alive {
                    status_line(&counters, rate)
                } else {
                    format!("stalled ({health:?}); {}", status_line(&counters, rate))
                };
                let mut msg = String::new();
                if alive && period.is_some() {
                    msg.push_str("WATCHDOG=1\n");
                }
                if now != status {
                    msg.push_str("STATUS=");
                    msg.push_str(&now);
                    status = now;
                }
                if !msg.is_empty() {
                    notifier.send(msg.trim_end());
                }
            }
        })?;
    Ok(Some(handle))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(source_turns: u64, frames_queued: u64, frames_scored: u64) -> Progress {
        Progress {
            source_turns,
            frames_queued,
            frames_scored,
        }
    }

    #[test]
    fn liveness_pings_while_idle_or_scoring_and_stops_when_stuck() {
        let mut l = Liveness::default();
        assert_eq!(l.check(p(1, 0, 0)), Health::Alive, "first check");
        // Idle: the source turns, nothing to score.
        assert_eq!(l.check(p(5, 0, 0)), Health::Alive);
        // Busy and keeping up.
        assert_eq!(l.check(p(9, 100, 40)), Health::Alive);
        assert_eq!(l.check(p(12, 200, 190)), Health::Alive);
        // 10 frames were waiting and none got scored: the scorer is stuck.
        assert_eq!(
            l.check(p(15, 200, 190)),
            Health::ScorerStalled { waiting: 10 }
        );
        // It recovers.
        assert_eq!(l.check(p(18, 200, 200)), Health::Alive);
        // Frames queued just now, after the last check, do not count against it yet.
        assert_eq!(l.check(p(20, 230, 200)), Health::Alive);
        assert_eq!(
            l.check(p(21, 230, 200)),
            Health::ScorerStalled { waiting: 30 }
        );
        // A source thread that no longer turns is stalled even with nothing waiting.
        let mut l = Liveness::default();
        l.check(p(3, 0, 0));
        assert_eq!(l.check(p(3, 0, 0)), Health::SourceStalled);
    }

    /// STATUS= used to read "N alerts firing / M resolved" from the counters since the
    /// start: an agent that had fired and resolved five alerts said "5 alerts firing"
    /// with none firing. It now gives the state now, and says "since start" for counts.
    #[test]
    fn status_line_gives_the_state_now_and_the_counts_since_start() {
        let c = AgentCounters::default();
        let set = |a: &std::sync::atomic::AtomicU64, v| a.store(v, Ordering::Relaxed);
        set(&c.alerts_firing, 5);
        set(&c.alerts_resolved, 5);
        set(&c.frames_scored, 1234);
        set(&c.messages, 47_000);
        set(&c.streams, 3);
        set(&c.streams_silent, 1);
        assert_eq!(
            status_line(&c, Some(12.34)),
            "model -: 0 alerts firing, 3 streams (1 silent), 12 frames/s; since start: 1234 frames scored, 10 alert events (5 firing, 5 resolved), 0 re-sends, 47000 messages (0 rejected)"
        );
        set(&c.firing_now, 1);
        set(&c.streams, 1);
        set(&c.streams_silent, 0);
        let line = status_line(&c, Some(0.5));
        assert!(
            line.starts_with("model -: 1 alert firing, 1 stream (0 silent), 0.5 frames/s; "),
            "{line}"
        );
        // The first line has no rate yet.
        assert!(status_line(&c, None).contains("(0 silent); since start: "));
        // The trial read "1 alerts fired" for one alert fired.
        set(&c.alerts_firing, 1);
        set(&c.alerts_resolved, 0);
        set(&c.alerts_resent, 1);
        assert!(
            status_line(&c, None)
                .contains("frames scored, 1 alert event (1 firing, 0 resolved), 1 re-send, "),
            "{}",
            status_line(&c, None)
        );
    }

    #[test]
    fn watchdog_period_is_half_the_interval_for_this_process() {
        let half = Some(Duration::from_secs(5));
        assert_eq!(watchdog_period(Some("10000000"), None, 42), half);
        assert_eq!(watchdog_period(Some("10000000"), Some("42"), 42), half);
        assert_eq!(watchdog_period(Some("10000000"), Some("43"), 42), None);
        assert_eq!(watchdog_period(Some("0"), None, 42), None);
        assert_eq!(watchdog_period(Some("soon"), None, 42), None);
        assert_eq!(watchdog_period(None, None, 42), None);
    }

    #[test]
    fn notifier_sends_datagrams_to_a_path_and_is_silent_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(Some(path.clone().into_os_string()));
        assert!(n.is_enabled());
        n.notify("READY=1\nSTATUS=x").unwrap();
        let mut buf = [0u8; 64];
        let got = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..got], b"READY=1\nSTATUS=x");
        let off = Notifier::new(None);
        assert!(!off.is_enabled());
        off.notify("READY=1").unwrap();
        assert!(!Notifier::new(Some(OsString::new())).is_enabled());
        // A socket that is gone is an error, not a panic.
        drop(server);
        std::fs::remove_file(&path).unwrap();
        assert!(n.notify("WATCHDOG=1").is_err());
    }
}
