//! The split topology of `deploy/k8s/split` as real processes on loopback, wired the
//! way the manifests wire them: two `aviary gateway`s reading one config folder that
//! is updated the way the kubelet updates a ConfigMap volume (a `..data` symlink
//! swap), workers found through a name that resolves to every worker's address (a
//! headless Service), and one `aviary controller` finding the gateways the same way.
//!
//! DNS is an `/etc/hosts` of the test's own, bind-mounted over the real one in a
//! mount namespace of each process (`unshare`), and rewritten as pods come and go:
//! each pod has an address of its own (127.0.0.11, 127.0.0.12, ...) and the same
//! port, as in a cluster. What Kubernetes does before it stops a pod (endpoints
//! removed, then the preStop hook, then SIGTERM) is done the same way: the pod leaves
//! the names and the clients' endpoint list, the test waits until no one picks it any
//! more (observed, not slept), then sends SIGTERM.
//!
//! Under constant load it does a config edit, a rolling restart of the gateways and
//! a scale of the workers 2 → 3 → 1, and asserts that no request failed.

mod support;

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use support::*;

/// The name every worker pod's address is published under (a headless Service).
const WORKERS: &str = "aviary-workers";
/// The same for the gateways' admin listeners, which the controller calls.
const GATEWAYS: &str = "aviary-gateways";

/// Upper bound for a change to be seen: DNS is looked up again every 5 s, the config
/// file re-read on its events or every 2 s (hang protection only).
const CONVERGE: Duration = Duration::from_secs(30);

/// The names the processes resolve: an `/etc/hosts` of the test's own, rewritten in
/// place (a bind mount pins the file, not its name).
struct Hosts {
    path: PathBuf,
    entries: Mutex<BTreeMap<String, Vec<String>>>,
}

impl Hosts {
    fn new(dir: &Path) -> Hosts {
        let hosts = Hosts {
            path: dir.join("hosts"),
            entries: Mutex::new(BTreeMap::new()),
        };
        hosts.write();
        hosts
    }

    fn add(&self, name: &str, ip: &str) {
        self.entries
            .lock()
            .expect("hosts")
            .entry(name.to_owned())
            .or_default()
            .push(ip.to_owned());
        self.write();
    }

    fn remove(&self, name: &str, ip: &str) {
        if let Some(ips) = self.entries.lock().expect("hosts").get_mut(name) {
            ips.retain(|i| i != ip);
        }
        self.write();
    }

    fn write(&self) {
        let mut text = String::from("127.0.0.1 localhost\n");
        for (name, ips) in self.entries.lock().expect("hosts").iter() {
            for ip in ips {
                text.push_str(&format!("{ip} {name}\n"));
            }
        }
        fs::write(&self.path, text).expect("rewrite hosts in place");
    }

    /// `aviary ARGS` in a mount namespace of its own where `/etc/hosts` is this file.
    /// `unshare` and `sh` exec, so the process's pid is aviary's and signals reach it.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("unshare");
        // Root creates the mount namespace directly; anyone else needs a user
        // namespace to be allowed to mount in it.
        if !is_root() {
            command.arg("--map-root-user");
        }
        command
            .args(["--mount", "--", "sh", "-c"])
            .arg("mount --bind \"$0\" /etc/hosts && exec \"$@\"")
            .arg(&self.path)
            .arg(env!("CARGO_BIN_EXE_aviary"))
            .args(args);
        command
    }
}

/// A config folder as the kubelet keeps a ConfigMap volume: `aviary.toml` →
/// `..data/aviary.toml`, `..data` → a timestamped folder; an update writes a new
/// folder and swaps `..data` with one rename.
struct ConfigVolume {
    dir: PathBuf,
    updates: u32,
}

impl ConfigVolume {
    fn new(dir: &Path, text: &str) -> ConfigVolume {
        let dir = dir.join("config");
        fs::create_dir_all(&dir).expect("config folder");
        let mut volume = ConfigVolume { dir, updates: 0 };
        volume.update(text);
        symlink("..data/aviary.toml", volume.file()).expect("aviary.toml link");
        volume
    }

    fn file(&self) -> PathBuf {
        self.dir.join("aviary.toml")
    }

    fn update(&mut self, text: &str) {
        self.updates += 1;
        let version = format!(
            "..2026_12_02_00_00_{:02}.{}",
            self.updates,
            std::process::id()
        );
        fs::create_dir(self.dir.join(&version)).expect("new data folder");
        fs::write(self.dir.join(&version).join("aviary.toml"), text).expect("write config");
        let staged = self.dir.join("..data_tmp");
        symlink(&version, &staged).expect("..data_tmp link");
        let previous = fs::read_link(self.dir.join("..data")).ok();
        fs::rename(&staged, self.dir.join("..data")).expect("swap ..data");
        if let Some(previous) = previous {
            fs::remove_dir_all(self.dir.join(previous)).expect("old data folder");
        }
    }
}

/// The gateways' config: `demo` on every worker behind [`WORKERS`], its rollouts
/// driven by the controller.
fn gateway_config(worker_port: u16, weights: (u32, u32)) -> String {
    format!(
        r#"
[rollouts]
controlled = true

[routes.demo]
versions = [
  {{ version = "1", weight = {}, endpoint = "http://{WORKERS}:{worker_port}" }},
  {{ version = "2", weight = {}, endpoint = "http://{WORKERS}:{worker_port}" }},
]
"#,
        weights.0, weights.1
    )
}

/// One pod: its process and its address.
struct Pod {
    process: Process,
    ip: String,
}

/// Where clients send requests: the gateways' inference addresses, as a Service's
/// endpoints. Each entry has a generation, so a restarted pod gets fresh connections.
#[derive(Default)]
struct Endpoints {
    list: Mutex<Vec<(String, u64)>>,
    generation: AtomicU64,
}

impl Endpoints {
    fn add(&self, addr: &str) {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        self.list
            .lock()
            .expect("endpoints")
            .push((addr.to_owned(), generation));
    }

    fn remove(&self, addr: &str) {
        self.list
            .lock()
            .expect("endpoints")
            .retain(|(a, _)| a != addr);
    }

    fn pick(&self, turn: usize) -> Option<(String, u64)> {
        let list = self.list.lock().expect("endpoints");
        (!list.is_empty()).then(|| list[turn % list.len()].clone())
    }
}

/// The longest the load runs (hang protection only: the test stops it, after drains
/// of up to 40 s each and DNS refreshes on a busy machine).
const CLUSTER_LOAD_LIMIT: Duration = Duration::from_secs(600);

/// Clients sending unpinned demo requests over [`Endpoints`] in turn until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    /// Requests each client has had answered.
    picks: Vec<Arc<AtomicU64>>,
    threads: Vec<std::thread::JoinHandle<Seen>>,
}

impl Load {
    fn start(endpoints: &Arc<Endpoints>, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let picks: Vec<Arc<AtomicU64>> = (0..clients).map(|_| Arc::default()).collect();
        let threads = picks
            .iter()
            .map(|picked| {
                let (endpoints, stop, picked) =
                    (Arc::clone(endpoints), Arc::clone(&stop), Arc::clone(picked));
                std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime");
                    runtime.block_on(send(endpoints, stop, picked))
                })
            })
            .collect();
        Load {
            stop,
            picks,
            threads,
        }
    }

    /// Waits until every client has had another request answered: after a pod left
    /// the endpoints, none has a request to it in flight, and none picks it again.
    fn wait_moved_on(&self) {
        let before: Vec<u64> = self
            .picks
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .collect();
        assert!(
            eventually(CONVERGE, || self
                .picks
                .iter()
                .zip(&before)
                .all(|(p, b)| p.load(Ordering::Relaxed) > *b)),
            "every client sends on"
        );
    }

    fn stop(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        let (mut answered, mut failures) = (BTreeMap::new(), Vec::new());
        for thread in self.threads {
            let (by_version, failed) = thread.join().expect("load thread");
            for (version, n) in by_version {
                *answered.entry(version).or_default() += n;
            }
            failures.extend(failed);
        }
        (answered, failures)
    }
}

async fn send(endpoints: Arc<Endpoints>, stop: Arc<AtomicBool>, picked: Arc<AtomicU64>) -> Seen {
    let mut clients = BTreeMap::new();
    let (mut answered, mut failures) = (BTreeMap::<String, u64>::new(), Vec::new());
    let started = Instant::now();
    let mut turn = 0;
    while !stop.load(Ordering::Relaxed) && started.elapsed() < CLUSTER_LOAD_LIMIT {
        turn += 1;
        let Some(endpoint) = endpoints.pick(turn) else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        if !clients.contains_key(&endpoint) {
            let client = aviary::client::connect(&endpoint.0, None, &Default::default())
                .await
                .expect("a gateway in the endpoints accepts connections");
            clients.insert(endpoint.clone(), client);
        }
        let client = clients.get_mut(&endpoint).expect("client made above");
        match client.model_infer(demo_request()).await {
            Ok(response) => {
                *answered
                    .entry(response.into_inner().model_version)
                    .or_default() += 1
            }
            Err(status) => failures.push(format!(
                "{} {:?}: {}",
                endpoint.0,
                status.code(),
                status.message()
            )),
        }
        // Counted once answered: a request picked before a pod left the endpoints
        // has then finished, and the next pick cannot be that pod.
        picked.fetch_add(1, Ordering::Relaxed);
    }
    (answered, failures)
}

/// The whole topology and what talks to it.
struct Cluster {
    dir: tempfile::TempDir,
    hosts: Hosts,
    config: ConfigVolume,
    worker_port: u16,
    inference_port: u16,
    admin_port: u16,
    workers: BTreeMap<String, Pod>,
    gateways: BTreeMap<String, Pod>,
    endpoints: Arc<Endpoints>,
}

impl Cluster {
    fn worker_args(ip: &str, port: u16) -> Vec<String> {
        let models = repo_root().join("tests/models");
        vec![
            "worker".into(),
            "--repo".into(),
            models.display().to_string(),
            "--listen".into(),
            format!("{ip}:{port}"),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--instances".into(),
            "1".into(),
        ]
    }

    /// Starts a worker pod at `ip` on the workers' port (the first picks it) and
    /// publishes it under [`WORKERS`] once it listens (endpoints list ready pods).
    fn start_worker(&mut self, ip: &str) {
        let args = Cluster::worker_args(ip, self.worker_port);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut process =
            Process::spawn_command(self.hosts.command(&args), &format!("worker {ip}"));
        let addr = process.wait_listening();
        let url = format!("http://{addr}");
        assert_eq!(
            health(&url, "liveness"),
            Some(SERVING),
            "worker {ip} is live"
        );
        assert_eq!(
            health(&url, ""),
            Some(SERVING),
            "worker {ip} listens once its models are loaded"
        );
        if self.worker_port == 0 {
            self.worker_port = addr.port();
        }
        self.hosts.add(WORKERS, ip);
        self.workers.insert(
            ip.to_owned(),
            Pod {
                process,
                ip: ip.to_owned(),
            },
        );
    }

    /// Starts a gateway pod at `ip`, waits until its readiness says SERVING, then
    /// publishes it: under [`GATEWAYS`] for the controller, in the clients' endpoints.
    fn start_gateway(&mut self, ip: &str) {
        let config = self.config.file().display().to_string();
        let listen = format!("{ip}:{}", self.inference_port);
        let admin = format!("{ip}:{}", self.admin_port);
        let args = [
            "gateway",
            "--config",
            &config,
            "--listen",
            &listen,
            "--admin-listen",
            &admin,
            "--metrics-listen",
            "127.0.0.1:0",
            "--grace-period",
            "20",
        ];
        let mut process =
            Process::spawn_command(self.hosts.command(&args), &format!("gateway {ip}"));
        let inference = process.wait_listening();
        let admin = process.wait_admin();
        self.inference_port = inference.port();
        self.admin_port = admin.port();
        let addr = format!("http://{inference}");
        assert!(
            eventually(CONVERGE, || health(&addr, "") == Some(SERVING)),
            "gateway {ip} becomes ready"
        );
        self.hosts.add(GATEWAYS, ip);
        self.endpoints.add(&addr);
        self.gateways.insert(
            ip.to_owned(),
            Pod {
                process,
                ip: ip.to_owned(),
            },
        );
    }

    fn gateway_addr(&self, ip: &str) -> String {
        format!("http://{ip}:{}", self.inference_port)
    }

    fn gateway_admin(&self, ip: &str) -> String {
        format!("http://{ip}:{}", self.admin_port)
    }

    /// `ctl routes --json` of one gateway.
    fn routes(&self, ip: &str) -> Value {
        run(
            &[
                "ctl",
                "--admin",
                &self.gateway_admin(ip),
                "routes",
                "--json",
            ],
            &[],
        )
        .json()
    }

    /// The worker addresses each gateway balances `demo` version 1 over now.
    fn live_workers(&self) -> Vec<Vec<String>> {
        self.gateways
            .keys()
            .map(|ip| {
                let routes = self.routes(ip);
                let version = routes["routes"]
                    .as_array()
                    .and_then(|r| r.iter().find(|r| r["model"] == "demo"))
                    .and_then(|r| r["versions"].as_array())
                    .and_then(|v| v.iter().find(|v| v["version"] == "1"))
                    .cloned()
                    .unwrap_or_default();
                let mut live: Vec<String> = version["live_replicas"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                live.sort();
                live
            })
            .collect()
    }

    fn worker_urls(&self, ips: &[&str]) -> Vec<String> {
        let mut urls: Vec<String> = ips
            .iter()
            .map(|ip| format!("http://{ip}:{}", self.worker_port))
            .collect();
        urls.sort();
        urls
    }

    /// Waits until every gateway balances over exactly the workers at `ips`.
    fn wait_workers(&self, ips: &[&str]) {
        let want = self.worker_urls(ips);
        assert!(
            eventually(CONVERGE, || self
                .live_workers()
                .iter()
                .all(|live| *live == want)),
            "every gateway balances over {want:?}: {:?}",
            self.live_workers()
        );
    }

    /// Stops a pod the way Kubernetes does: out of the names (and, for a gateway, the
    /// clients' endpoints), wait until no one picks it (`moved_on`), then SIGTERM; it
    /// must drain and exit 0.
    fn stop_pod(&mut self, gateway: bool, ip: &str, moved_on: impl FnOnce(&Cluster)) {
        let name = if gateway { GATEWAYS } else { WORKERS };
        self.hosts.remove(name, ip);
        if gateway {
            self.endpoints.remove(&self.gateway_addr(ip));
        }
        moved_on(self);
        let pods = if gateway {
            &mut self.gateways
        } else {
            &mut self.workers
        };
        let mut pod = pods.remove(ip).expect("a running pod");
        sigterm(&pod.process);
        let status = pod.process.wait_exit(Duration::from_secs(40));
        assert!(
            status.success(),
            "{name} pod {} drains and exits 0: {status}",
            pod.ip
        );
    }
}

const SERVING: i32 = 1;

/// The gRPC health status of `service` at `addr`, `None` when it does not answer.
fn health(addr: &str, service: &str) -> Option<i32> {
    runtime().block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(addr.to_owned())
            .ok()?
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .ok()?;
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .ok()
            .map(|r| r.into_inner().status)
    })
}

fn sum(seen: &BTreeMap<String, u64>) -> u64 {
    seen.values().sum()
}

#[test]
fn a_rolling_restart_and_worker_scaling_under_load_fail_no_request() {
    let dir = tempfile::tempdir().expect("temp dir");
    let hosts = Hosts::new(dir.path());
    let config = ConfigVolume::new(dir.path(), "");
    let mut cluster = Cluster {
        hosts,
        config,
        worker_port: 0,
        inference_port: 0,
        admin_port: 0,
        workers: BTreeMap::new(),
        gateways: BTreeMap::new(),
        endpoints: Arc::default(),
        dir,
    };
    for ip in ["127.0.0.11", "127.0.0.12"] {
        cluster.start_worker(ip);
    }
    let text = gateway_config(cluster.worker_port, (90, 10));
    cluster.config.update(&text);
    for ip in ["127.0.0.21", "127.0.0.22"] {
        cluster.start_gateway(ip);
    }
    cluster.wait_workers(&["127.0.0.11", "127.0.0.12"]);
    let gateways_dns = format!("{GATEWAYS}:{}", cluster.admin_port);
    let state_file = cluster.dir.path().join("controller-state.json");
    let state_file = state_file.display().to_string();
    let controller_args = [
        "controller",
        "--gateways-dns",
        &gateways_dns,
        "--admin-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--evaluate-interval-ms",
        "200",
        "--state-file",
        &state_file,
    ];
    let mut controller =
        Process::spawn_command(cluster.hosts.command(&controller_args), "controller");
    let controller_admin = format!("http://{}", controller.wait_admin());
    assert_eq!(
        health(&controller_admin, ""),
        Some(SERVING),
        "the controller is ready"
    );
    assert_eq!(health(&controller_admin, "liveness"), Some(SERVING));

    let load = Load::start(&cluster.endpoints, 4);

    // A ConfigMap edit: both gateways take the new weights, without a restart.
    cluster
        .config
        .update(&gateway_config(cluster.worker_port, (60, 40)));
    for ip in ["127.0.0.21", "127.0.0.22"] {
        assert!(
            eventually(CONVERGE, || route_of(&cluster.routes(ip), "demo")
                == pairs(&[("1", 60), ("2", 40)])),
            "gateway {ip} applies the edited ConfigMap"
        );
    }

    // A rollout the controller drives on every gateway it finds through DNS; its
    // first step lasts longer than this test, so its weights stay in force.
    let mut start = vec!["ctl", "--admin", &controller_admin];
    start.extend(DEMO_ROLLOUT);
    start.extend(["--step-duration", "600", "--json"]);
    let started = run(&start, &[]).json();
    assert_eq!(started["canary_weight"], 50, "{started:#}");
    let rollout_weights = pairs(&[("2", 50), ("1", 50)]);
    for ip in ["127.0.0.21", "127.0.0.22"] {
        assert_eq!(
            route_of(&cluster.routes(ip), "demo"),
            rollout_weights,
            "{ip}"
        );
    }

    // Rolling restart of the gateways, one at a time. A restarted gateway reads the
    // file's weights; the controller finds it again through DNS and gives it the
    // rollout's.
    for ip in ["127.0.0.21", "127.0.0.22"] {
        let addr = cluster.gateway_addr(ip);
        assert_eq!(health(&addr, "liveness"), Some(SERVING));
        cluster.stop_pod(true, ip, |_| load.wait_moved_on());
        cluster.start_gateway(ip);
        assert!(
            eventually(CONVERGE, || route_of(&cluster.routes(ip), "demo")
                == rollout_weights),
            "the controller gives the restarted gateway {ip} the rollout's weights: {:?}",
            route_of(&cluster.routes(ip), "demo")
        );
    }

    // Workers 2 → 3: the new pod is found through DNS and takes requests.
    cluster.start_worker("127.0.0.13");
    cluster.wait_workers(&["127.0.0.11", "127.0.0.12", "127.0.0.13"]);
    let third = format!("http://127.0.0.13:{}", cluster.worker_port);
    assert!(
        eventually(CONVERGE, || runtime().block_on(successes(&third, "1"))
            + runtime().block_on(successes(&third, "2"))
            > 0),
        "the third worker serves"
    );

    // Workers 3 → 1: each leaves DNS, every gateway stops balancing over it, then it
    // is stopped.
    for ip in ["127.0.0.12", "127.0.0.13"] {
        cluster.stop_pod(false, ip, |cluster| {
            let remaining: Vec<&str> = cluster
                .workers
                .keys()
                .map(String::as_str)
                .filter(|w| *w != ip)
                .collect();
            cluster.wait_workers(&remaining);
        });
    }
    let first = format!("http://127.0.0.11:{}", cluster.worker_port);
    let served_before = runtime().block_on(successes(&first, "1"));
    assert!(
        eventually(CONVERGE, || runtime().block_on(successes(&first, "1"))
            > served_before),
        "the one worker left serves on"
    );

    let (answered, failures) = load.stop();
    assert!(failures.is_empty(), "no request failed: {failures:#?}");
    assert!(sum(&answered) > 100, "the load ran: {answered:?}");
    assert!(
        answered.contains_key("1") && answered.contains_key("2"),
        "{answered:?}"
    );
    let status = run(
        &[
            "ctl",
            "--admin",
            &controller_admin,
            "rollout",
            "status",
            "demo",
            "--json",
        ],
        &[],
    )
    .json();
    assert_eq!(
        status["state"], "progressing",
        "the rollout held on: {status:#}"
    );
    sigterm(&controller);
    assert!(controller.wait_exit(Duration::from_secs(30)).success());
    drop(cluster);
}
