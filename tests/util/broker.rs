//! Brokers and plumbing for the agent tests: Mosquitto (the one `.ci/run` starts and names
//! in `MOSQUITTO_PORT`, or one started here), a TCP relay that can be cut, the agent as a
//! child process with its `/metrics`, and an MQTT subscriber that collects what it gets.
//!
//! Without Mosquitto the tests that need it print a note and pass; with `CI=true` they fail.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::process::{Logged, sample};

/// The longest any wait in these tests lasts before it fails: a hang becomes a failure.
/// A liveness bound, never a timing claim.
pub const WAIT: Duration = Duration::from_secs(90);

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A name unique to this test process and call, for client ids, topics and nodes.
pub fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Waits until `cond` holds; fails the test after [`WAIT`].
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Skips a test that needs Mosquitto (a note on stderr), or fails it under `CI=true`.
fn unavailable(test: &str, why: &str) -> Option<Mosquitto> {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: Mosquitto is required under CI=true: {why}");
    }
    eprintln!(
        "note: {test} skipped: {why} (install mosquitto or run .ci/run, which sets MOSQUITTO_PORT)"
    );
    None
}

/// The `mosquitto` executable: `$MOSQUITTO_BIN`, else the first on `$PATH`, `/usr/sbin`
/// or `/usr/local/sbin`.
pub fn mosquitto_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MOSQUITTO_BIN") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
}

/// A Mosquitto broker on loopback.
pub struct Mosquitto {
    pub port: u16,
    /// Set when this test started the broker (and so may stop it).
    child: Option<Child>,
    conf: Option<PathBuf>,
    _dir: Option<tempfile::TempDir>,
}

impl Mosquitto {
    /// The broker `.ci/run` started (`$MOSQUITTO_PORT`), or else one started for this test.
    pub fn shared(test: &str) -> Option<Mosquitto> {
        match std::env::var("MOSQUITTO_PORT") {
            Ok(p) => match p.parse() {
                Ok(port) => Some(Mosquitto {
                    port,
                    child: None,
                    conf: None,
                    _dir: None,
                }),
                Err(_) => unavailable(test, &format!("MOSQUITTO_PORT={p} is not a port")),
            },
            Err(_) => Mosquitto::own(test, ""),
        }
    }

    /// A broker of this test's own on a free port, with `extra` configuration lines (which
    /// may name files in `dir`, see [`Mosquitto::own_in`]).
    pub fn own(test: &str, extra: &str) -> Option<Mosquitto> {
        Mosquitto::own_in(test, tempfile::tempdir().unwrap(), extra)
    }

    /// [`Mosquitto::own`] with its configuration written into `dir`.
    pub fn own_in(test: &str, dir: tempfile::TempDir, extra: &str) -> Option<Mosquitto> {
        let Some(bin) = mosquitto_bin() else {
            return unavailable(test, "no mosquitto executable found");
        };
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        // `user root`: when the tests run as root, keep the rights to read this test's files
        // (Mosquitto would otherwise switch to the `mosquitto` user); ignored otherwise.
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\npersistence false\nset_tcp_nodelay true\nuser root\n{}\n",
                if extra.contains("allow_anonymous") {
                    extra.to_string()
                } else {
                    format!("allow_anonymous true\n{extra}")
                }
            ),
        )
        .unwrap();
        let mut m = Mosquitto {
            port,
            child: None,
            conf: Some(conf),
            _dir: Some(dir),
        };
        m.child = Some(spawn_mosquitto(&bin, m.conf.as_deref().unwrap(), port));
        Some(m)
    }

    /// Stops a broker this test started.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a stopped broker again on the same port.
    pub fn start_again(&mut self) {
        let bin = mosquitto_bin().unwrap();
        self.child = Some(spawn_mosquitto(
            &bin,
            self.conf.as_deref().unwrap(),
            self.port,
        ));
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_mosquitto(bin: &Path, conf: &Path, port: u16) -> Child {
    let mut child = Command::new(bin)
        .arg("-c")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("mosquitto exited ({status}): {err}");
        }
        assert!(start.elapsed() < WAIT, "mosquitto did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// A TCP relay from a port of its own to a broker; [`Relay::cut`] makes the broker
/// unreachable through it (open connections are severed, new ones closed at once) until
/// [`Relay::restore`].
pub struct Relay {
    pub port: u16,
    down: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    pub fn start(broker_port: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let down: Arc<AtomicBool> = Arc::default();
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (d, held) = (down.clone(), conns.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(near) = stream else { continue };
                if d.load(Ordering::SeqCst) {
                    let _ = near.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(far) = TcpStream::connect(("127.0.0.1", broker_port)) else {
                    continue;
                };
                let mut list = held.lock().unwrap();
                list.push(near.try_clone().unwrap());
                list.push(far.try_clone().unwrap());
                let (n2, f2) = (near.try_clone().unwrap(), far.try_clone().unwrap());
                std::thread::spawn(move || pipe(near, far));
                std::thread::spawn(move || pipe(f2, n2));
            }
        });
        Relay { port, down, conns }
    }

    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 8192];
    while let Ok(n @ 1..) = from.read(&mut buf) {
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

/// A plain MQTT client (QoS 1) that collects every publish on its filters.
pub struct Collector {
    pub client: rumqttc::Client,
    rx: Receiver<rumqttc::Publish>,
    pub got: Vec<rumqttc::Publish>,
}

impl Collector {
    /// Connects to `port` with optional credentials and subscribes `filters`; returns once
    /// the broker acknowledged the subscription.
    pub fn new(port: u16, filters: &[&str], credentials: Option<(&str, &str)>) -> Collector {
        let mut options = rumqttc::MqttOptions::new(unique("collector"), "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(5));
        options.set_inflight(500);
        if let Some((u, p)) = credentials {
            options.set_credentials(u, p);
        }
        let (client, mut connection) = rumqttc::Client::new(options, 4096);
        for f in filters {
            client.subscribe(*f, rumqttc::QoS::AtLeastOnce).unwrap();
        }
        let (tx, rx) = channel();
        let (ready_tx, ready_rx) = channel();
        let want = filters.len();
        std::thread::spawn(move || {
            let mut acks = 0;
            for event in connection.iter() {
                match event {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        acks += 1;
                        if acks == want {
                            let _ = ready_tx.send(());
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        if tx.send(p).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        if want > 0 {
            ready_rx.recv_timeout(WAIT).expect("collector subscribed");
        }
        Collector {
            client,
            rx,
            got: Vec::new(),
        }
    }

    /// Takes what arrived so far.
    pub fn poll(&mut self) -> &[rumqttc::Publish] {
        while let Ok(p) = self.rx.try_recv() {
            self.got.push(p);
        }
        &self.got
    }

    /// Waits until `cond` holds for what arrived.
    pub fn wait(&mut self, what: &str, mut cond: impl FnMut(&[rumqttc::Publish]) -> bool) {
        let start = Instant::now();
        loop {
            if let Ok(p) = self.rx.recv_timeout(Duration::from_millis(50)) {
                self.got.push(p);
            }
            if cond(self.poll()) {
                return;
            }
            assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        }
    }

    /// Payloads received on topics starting with `prefix`, as text.
    pub fn payloads(&mut self, prefix: &str) -> Vec<String> {
        self.poll()
            .iter()
            .filter(|p| p.topic.starts_with(prefix))
            .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
            .collect()
    }
}

/// Publishes `messages` (topic, payload) at QoS 1 to the broker on `port` and returns once
/// the broker acknowledged every one.
pub fn publish_all(port: u16, messages: &[(String, Vec<u8>)]) {
    let mut options = rumqttc::MqttOptions::new(unique("publisher"), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    options.set_inflight(100);
    let (client, mut connection) = rumqttc::Client::new(options, 256);
    let n = messages.len();
    let acks = std::thread::spawn(move || {
        let mut acked = 0;
        for event in connection.iter() {
            match event {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                    acked += 1;
                    if acked == n {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("publisher connection: {e}"),
            }
        }
    });
    for (topic, payload) in messages {
        client
            .publish(
                topic.as_str(),
                rumqttc::QoS::AtLeastOnce,
                false,
                payload.clone(),
            )
            .unwrap();
    }
    if n > 0 {
        acks.join().expect("every publish acknowledged");
    }
    let _ = client.disconnect();
}

/// `darkwatch run` as a child process, its stderr collected, its `/metrics` scraped.
pub struct Agent {
    process: Logged,
    pub metrics_port: u16,
}

impl Agent {
    /// Starts `darkwatch run --config config` with extra environment `env`.
    pub fn start(config: &Path, metrics_port: u16, env: &[(&str, &str)]) -> Agent {
        let mut cmd = super::darkwatch();
        cmd.args(["run", "--config"]).arg(config);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Agent {
            process: Logged::spawn(&mut cmd),
            metrics_port,
        }
    }

    /// [`Agent::start`] with writes past `bytes` of any file failing (`RLIMIT_FSIZE`, with
    /// `SIGXFSZ` ignored, so a write returns `EFBIG` as a full disk returns `ENOSPC`).
    pub fn start_with_file_size_limit(config: &Path, metrics_port: u16, bytes: u64) -> Agent {
        use std::os::unix::process::CommandExt;
        let mut cmd = super::darkwatch();
        cmd.args(["run", "--config"]).arg(config);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let limit = libc::rlimit {
                    rlim_cur: bytes as libc::rlim_t,
                    rlim_max: bytes as libc::rlim_t,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Agent {
            process: Logged::spawn(&mut cmd),
            metrics_port,
        }
    }

    /// [`Agent::start`], then waits until its MQTT client is connected.
    pub fn connected(config: &Path, metrics_port: u16, env: &[(&str, &str)]) -> Agent {
        let mut agent = Agent::start(config, metrics_port, env);
        agent.wait_metric("darkwatch_mqtt_connected", |v| v == 1.0);
        agent
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn stderr(&self) -> String {
        self.process.stderr()
    }

    pub fn is_running(&mut self) -> bool {
        self.process.exited().is_none()
    }

    pub fn signal(&self, sig: &str) {
        self.process.signal(sig);
    }

    /// The `/metrics` text, or `None` while it is not served.
    pub fn scrape(&self) -> Option<String> {
        super::process::scrape(self.metrics_port)
    }

    /// One sample's value from `/metrics` (`name` with its labels, as exposed).
    pub fn metric(&self, name: &str) -> Option<f64> {
        sample(&self.scrape()?, name)
    }

    /// The sum over every labelled series of the metric `name` (`name{…} v` lines).
    pub fn metric_sum(&self, name: &str) -> Option<f64> {
        let body = self.scrape()?;
        let prefix = format!("{name}{{");
        let values: Vec<f64> = body
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix)?.split_once("} "))
            .filter_map(|(_, v)| v.trim().parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    /// Waits until the sample `name` satisfies `cond`; returns its value.
    pub fn wait_metric(&mut self, name: &str, cond: impl Fn(f64) -> bool) -> f64 {
        let start = Instant::now();
        loop {
            if let Some(v) = self.metric(name).filter(|&v| cond(v)) {
                return v;
            }
            if !self.is_running() {
                panic!(
                    "darkwatch exited while waiting for {name}:\n{}",
                    self.stderr()
                );
            }
            assert!(
                start.elapsed() < WAIT,
                "timed out waiting for {name} (now {:?})\n{}",
                self.metric(name),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Alert events raised so far (firing plus resolved).
    pub fn alerts_raised(&self) -> u64 {
        let f = self
            .metric("darkwatch_alerts_total{status=\"firing\"}")
            .unwrap_or(0.0);
        let r = self
            .metric("darkwatch_alerts_total{status=\"resolved\"}")
            .unwrap_or(0.0);
        (f + r) as u64
    }

    /// SIGTERM, then waits for the exit; returns the status and stderr.
    pub fn stop(self) -> (ExitStatus, String) {
        // The reader thread may not have taken the last lines yet.
        self.process
            .stop("darkwatch", "stopped after", Duration::from_secs(5))
    }
}

/// The number before `word` in the agent's final "stopped after …" line.
pub fn final_count(stderr: &str, word: &str) -> u64 {
    let line = stderr
        .lines()
        .find(|l| l.contains("stopped after"))
        .unwrap_or_else(|| panic!("no final line in\n{stderr}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[1].trim_matches(|c: char| !c.is_alphanumeric()) == word)
        .and_then(|w| w[0].trim_start_matches('(').parse().ok())
        .unwrap_or_else(|| panic!("no count before {word:?} in {line}"))
}
