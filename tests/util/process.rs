//! The real binary as a long-running child process, as the agent (`darkwatch run`) and
//! Alertmanager bridge (`darkwatch alertmanager`) tests run it: its stderr collected as it
//! comes, stopped with SIGTERM, killed if a test fails first; and its `/metrics`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::broker::WAIT;

/// A child process whose stderr a thread collects; killed on drop if it still runs.
pub struct Logged {
    child: Child,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl Logged {
    /// Spawns `cmd` with stdout discarded and stderr collected.
    pub fn spawn(cmd: &mut Command) -> Logged {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Bytes, decoded whole in `stderr()`: a character split between two reads must not
        // turn into two replacement characters that a `contains` would miss.
        let stderr: Arc<Mutex<Vec<u8>>> = Arc::default();
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Logged { child, stderr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Its exit status, once it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// `kill -<sig>` to it.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// SIGTERM, then its exit status (after [`WAIT`] it is killed and the test fails,
    /// naming `who`), and its stderr once it holds `last` (its final line; waited for up to
    /// `grace`, as the reader thread may not have taken it yet).
    pub fn stop(mut self, who: &str, last: &str, grace: Duration) -> (ExitStatus, String) {
        self.signal("TERM");
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.exited() {
                break s;
            }
            if start.elapsed() > WAIT {
                let _ = self.child.kill();
                panic!("{who} ignored SIGTERM:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let start = Instant::now();
        while !self.stderr().contains(last) && start.elapsed() < grace {
            std::thread::sleep(Duration::from_millis(20));
        }
        (status, self.stderr())
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `GET /metrics` on `127.0.0.1:port`: the whole HTTP response when it is a 200, else
/// `None` (nothing listening yet, an error).
pub fn scrape(port: u16) -> Option<String> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(conn, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    conn.read_to_string(&mut out).ok()?;
    out.starts_with("HTTP/1.1 200").then_some(out)
}

/// One sample of an exposition: `name` with its labels, as exposed.
pub fn sample(exposition: &str, name: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
