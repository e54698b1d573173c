//! Shared support for the end-to-end tests: real servers on 127.0.0.1:0 (a server
//! whose task failed fails the test that drops it), real gRPC clients, the request
//! helpers every test file uses, admin API look-ups, and load that stops itself.
#![allow(dead_code, unreachable_pub, unused_imports)]

mod admin_api;
mod load;
mod requests;

pub use admin_api::*;
pub use load::*;
pub use requests::*;

use std::{
    collections::BTreeMap,
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use aviary::pb::{admin, inference::grpc_inference_service_client::GrpcInferenceServiceClient};
use aviary_gateway::{Config, Gateway, Listeners, Mode};
use aviary_worker::{SessionOptions, Worker, WorkerConfig, server};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The test model repository (`tests/models`).
pub fn test_models() -> PathBuf {
    repo_root().join("tests/models")
}

/// A connection to an admin API (a gateway's or a controller's), with a client for
/// each of its services.
#[derive(Debug, Clone)]
pub struct Admin {
    channel: Channel,
}

impl Admin {
    /// Connects to the admin API at `addr`.
    pub async fn connect(addr: SocketAddr) -> Admin {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("valid url")
            .connect()
            .await
            .expect("admin API accepts connections");
        Admin { channel }
    }

    pub fn routes(&self) -> admin::routes_client::RoutesClient<Channel> {
        admin::routes_client::RoutesClient::new(self.channel.clone())
    }

    pub fn models(&self) -> admin::models_client::ModelsClient<Channel> {
        admin::models_client::ModelsClient::new(self.channel.clone())
    }

    pub fn rollouts(&self) -> admin::rollouts_client::RolloutsClient<Channel> {
        admin::rollouts_client::RolloutsClient::new(self.channel.clone())
    }

    pub fn experiments(&self) -> admin::experiments_client::ExperimentsClient<Channel> {
        admin::experiments_client::ExperimentsClient::new(self.channel.clone())
    }

    pub fn fleet(&self) -> admin::fleet_client::FleetClient<Channel> {
        admin::fleet_client::FleetClient::new(self.channel.clone())
    }
}

/// A server running in this process until stopped (or dropped).
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where its admin API listens (gateways only).
    pub admin_addr: Option<SocketAddr>,
    /// Where its HTTP/REST endpoint listens (gateways only).
    pub http_addr: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), String>>>,
}

impl Running {
    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A connected v2 client.
    pub async fn client(&self) -> GrpcInferenceServiceClient<Channel> {
        let channel = tonic::transport::Endpoint::from_shared(self.url())
            .expect("valid url")
            .connect()
            .await
            .expect("server accepts connections");
        GrpcInferenceServiceClient::new(channel)
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20)
    }

    /// A connected admin API client (gateways only).
    pub async fn admin(&self) -> Admin {
        Admin::connect(self.admin_addr.expect("a gateway has an admin listener")).await
    }

    /// A raw channel (for health and reflection clients).
    pub async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(self.url())
            .expect("valid url")
            .connect()
            .await
            .expect("server accepts connections")
    }

    /// Asks the server to shut down and waits until it has.
    pub async fn stop(mut self) -> Result<(), String> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.handle.take() {
            Some(handle) => tokio::time::timeout(Duration::from_secs(30), handle)
                .await
                .map_err(|_| "server did not stop within 30 s".to_owned())?
                .map_err(|e| e.to_string())?,
            None => Ok(()),
        }
    }
}

/// A server dropped without [`Running::stop`] is stopped all the same, and a server
/// whose task failed (or fails while stopping) fails the test, unless the test is
/// already panicking.
impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let Some(handle) = self.handle.take() else {
            return;
        };
        if std::thread::panicking() {
            return;
        }
        let outcome = match tokio::runtime::Handle::try_current() {
            Ok(runtime)
                if runtime.runtime_flavor() != tokio::runtime::RuntimeFlavor::CurrentThread =>
            {
                tokio::task::block_in_place(|| {
                    runtime.block_on(async {
                        tokio::time::timeout(Duration::from_secs(30), handle).await
                    })
                })
                .map_err(|_| "did not stop within 30 s".to_owned())
                .and_then(|joined| joined.map_err(|e| e.to_string()))
                .and_then(|result| result)
            }
            // No runtime to wait on: judge only a task that has already finished.
            _ if handle.is_finished() => futures::FutureExt::now_or_never(handle)
                .map_or(Ok(()), |joined| {
                    joined.map_err(|e| e.to_string()).and_then(|r| r)
                }),
            _ => Ok(()),
        };
        if let Err(error) = outcome {
            panic!("the server on {} failed: {error}", self.addr);
        }
    }
}

fn spawn<F, Fut>(addr: SocketAddr, run: F) -> Running
where
    F: FnOnce(oneshot::Receiver<()>) -> Fut,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let handle = tokio::spawn(run(rx));
    Running {
        addr,
        admin_addr: None,
        http_addr: None,
        shutdown: Some(tx),
        handle: Some(handle),
    }
}

/// Session settings small enough for a 2-core machine running tests in parallel.
pub fn test_sessions() -> SessionOptions {
    SessionOptions {
        instances: 2,
        intra_op_threads: 1,
        inter_op_threads: 1,
        ..SessionOptions::default()
    }
}

/// Starts a gateway from config text. `{models}` in the text is replaced by the test
/// repository's absolute path.
pub async fn start_gateway(config_text: &str, mode: Mode) -> Result<Running, String> {
    let text = config_text.replace("{models}", &test_models().display().to_string());
    let config = Config::parse(&text)?;
    let gateway = Gateway::start(config, mode)
        .await
        .map_err(|e| e.to_string())?;
    serve_gateway(gateway).await
}

/// The error a gateway started from `config_text` fails with; panics if it starts.
pub async fn rejected_at_start(config_text: &str, mode: Mode) -> String {
    match start_gateway(config_text, mode).await {
        Ok(gateway) => {
            gateway.stop().await.expect("clean stop");
            panic!("the config must be rejected at start:\n{config_text}")
        }
        Err(error) => error,
    }
}

/// Starts a gateway from a config file that it watches while it runs, as `aviary
/// serve --config PATH` does.
pub async fn start_gateway_from_file(path: &Path, mode: Mode) -> Result<Running, String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    let gateway = Gateway::start(config, mode)
        .await
        .map_err(|e| e.to_string())?
        .watch_config(path.to_owned());
    serve_gateway(gateway).await
}

/// Serves a started gateway on ephemeral inference and admin ports.
pub async fn serve_gateway(gateway: Gateway) -> Result<Running, String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let admin = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let admin_addr = admin.local_addr().map_err(|e| e.to_string())?;
    let http = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let http_addr = http.local_addr().map_err(|e| e.to_string())?;
    let mut running = spawn(addr, move |rx| async move {
        let listeners = Listeners {
            inference: listener,
            admin: Some(admin),
            metrics: None,
            http: Some(http),
        };
        gateway
            .serve(listeners, aviary::server::DEFAULT_GRACE_PERIOD, async {
                let _ = rx.await;
            })
            .await
            .map_err(|e| e.to_string())
    });
    running.admin_addr = Some(admin_addr);
    running.http_addr = Some(http_addr);
    Ok(running)
}

/// Copies the test repository into `dir` (tests that change model files work on a copy).
pub fn copy_test_models(dir: &Path) -> PathBuf {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("create folder");
        for entry in std::fs::read_dir(from).expect("read folder") {
            let entry = entry.expect("entry");
            let target = to.join(entry.file_name());
            if entry.file_type().expect("type").is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).expect("copy file");
            }
        }
    }
    let target = dir.join("models");
    copy(&test_models(), &target);
    target
}

/// Starts an embedded gateway over the test repository with `routes` (TOML route
/// tables, e.g. `[routes.demo] versions = [...]`).
pub async fn start_embedded(routes: &str) -> Running {
    let text = format!("[repository]\npath = \"{{models}}\"\ninstances = 2\n\n{routes}");
    start_gateway(&text, Mode::Embedded)
        .await
        .expect("gateway starts")
}

/// Starts a standalone worker over `repository`.
pub async fn start_worker(repository: &Path) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    start_worker_on(repository, listener).await
}

/// Starts a standalone worker over `repository` serving on `listener`.
pub async fn start_worker_on(repository: &Path, listener: TcpListener) -> Running {
    let worker = Worker::open(WorkerConfig::new(repository.to_owned(), test_sessions()))
        .await
        .expect("worker loads the repository");
    let addr = listener.local_addr().expect("local addr");
    spawn(addr, move |rx| async move {
        server::run_worker(
            Arc::new(worker),
            listener,
            aviary::server::ServeOptions::default(),
            aviary_worker::ModelControl::default(),
            aviary::calls::CallChecks::default(),
            async {
                let _ = rx.await;
            },
        )
        .await
        .map_err(|e| e.to_string())
    })
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An HTTP/1.1 answer: status, headers (names lowercase) and body.
#[allow(dead_code)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

/// Sends one HTTP/1.1 request to `addr` on a connection of its own (closed after the
/// answer): enough of a client for the HTTP/REST endpoint, with no client library.
#[allow(dead_code)]
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpAnswer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.expect("write head");
    stream.write_all(body).await.expect("write body");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("read answer");
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP answer has a head");
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    HttpAnswer {
        status,
        headers,
        body: answer[split + 4..].to_vec(),
    }
}
