//! A `redis-server` of a test's own, for the tests of Aviary's Redis features.

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A `redis-server` of the test's own on 127.0.0.1, with nothing saved to disk;
/// killed on drop.
pub struct RedisServer {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts one on `port`, or on a free port when `None`.
    pub fn start(port: Option<u16>) -> RedisServer {
        // Redis takes no port 0: a free port is picked here and handed over; another
        // process may take it in between, so a server that exits at once is retried.
        for _ in 0..5 {
            let port = port.unwrap_or_else(free_port);
            let dir = tempfile::tempdir().expect("temp dir");
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path())
                // Small stream nodes, so `MAXLEN ~` trims close to its bound.
                .args(["--stream-node-max-entries", "10"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot start redis-server ({e}): it is not installed; run scripts/setup.sh \
                         (it installs Debian's redis-server package)"
                    )
                });
            let mut server = RedisServer {
                child,
                url: format!("redis://127.0.0.1:{port}/0"),
                _dir: dir,
            };
            if server.wait_ready() {
                return server;
            }
        }
        panic!("redis-server did not start on 127.0.0.1 within five tries");
    }

    /// Whether it answers PING before it exits or 10 s pass.
    pub fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().expect("try_wait").is_some() {
                return false;
            }
            let pong = redis::Client::open(self.url.as_str())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(500)))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if pong.is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url.as_str())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(5)))
            .expect("a connection to the test's redis-server")
    }

    /// `kill SIGNAL` to the server.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill {signal} delivered");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}
