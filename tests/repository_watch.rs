//! Repository watch mode end to end: an embedded gateway (in this process) over a copy
//! of `tests/models` with `watch = true`, changed on disk the ways docs/operations.md
//! tells operators to publish, and observed through real gRPC clients. Without an
//! explicit `demo` route, the implicit one sends unpinned traffic to the newest version
//! and keeps older ones pinnable with weight 0.
mod support;

use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aviary::pb::{
    admin::ListModelsRequest,
    inference::{
        ModelReadyRequest, RepositoryIndexRequest,
        grpc_inference_service_client::GrpcInferenceServiceClient,
    },
};
use aviary_gateway::Mode;
use tonic::{Code, Status, transport::Channel};

type Client = GrpcInferenceServiceClient<Channel>;

/// How often the watcher scans in these tests.
const SCAN: Duration = Duration::from_millis(100);

/// Upper bound for a change on disk to show (hang protection only: a change takes two
/// scans to settle, then a load of a few milliseconds).
const DEADLINE: Duration = Duration::from_secs(20);

/// Inputs on which the demo versions answer differently.
const ROWS: [[f32; 4]; 3] = [
    [5.1, 3.5, 1.4, 0.2],
    [6.0, 2.9, 4.5, 1.5],
    [6.7, 3.1, 5.6, 2.4],
];

/// A watching gateway over a private copy of the test repository.
struct Watched {
    gateway: support::Running,
    client: Client,
    models: PathBuf,
    _dir: tempfile::TempDir,
}

impl Watched {
    /// Starts a gateway watching a fresh copy of `tests/models`; `extra` is appended to
    /// the config (e.g. `[repository.policies]`).
    async fn start(extra: &str) -> Watched {
        let dir = tempfile::tempdir().expect("temp dir");
        let models = support::copy_test_models(dir.path());
        let config = format!(
            "[repository]\npath = \"{}\"\ninstances = 1\nwatch = true\nwatch_interval_ms = {}\n\n{extra}",
            models.display(),
            SCAN.as_millis()
        );
        let gateway = support::start_gateway(&config, Mode::Embedded)
            .await
            .expect("gateway starts");
        let client = gateway.client().await;
        Watched {
            gateway,
            client,
            models,
            _dir: dir,
        }
    }

    fn version_dir(&self, version: &str) -> PathBuf {
        self.models.join("demo").join(version)
    }

    /// The bytes of `demo/<version>/model.onnx` in the test repository.
    fn model_bytes(version: &str) -> Vec<u8> {
        std::fs::read(
            support::test_models()
                .join("demo")
                .join(version)
                .join("model.onnx"),
        )
        .expect("read a test model")
    }

    /// Publishes `demo/<to>` as a copy of `demo/<from>`, the safe way: write every file
    /// into a hidden folder, then rename the folder into place.
    fn publish_copy(&self, from: &str, to: &str) {
        self.publish_model_copy("demo", from, to);
    }

    /// [`Watched::publish_copy`] for any model.
    fn publish_model_copy(&self, model: &str, from: &str, to: &str) {
        let folder = self.models.join(model);
        let hidden = folder.join(format!(".tmp-{to}"));
        std::fs::create_dir(&hidden).expect("create the hidden folder");
        for entry in std::fs::read_dir(folder.join(from)).expect("read the version") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), hidden.join(entry.file_name())).expect("copy a file");
        }
        std::fs::rename(&hidden, folder.join(to)).expect("rename into place");
    }

    /// `probabilities` of every row of `ROWS`, pinned to `version` ("" for unpinned),
    /// and the versions that answered.
    async fn answers(&self, version: &str) -> Result<(Vec<Vec<f32>>, Vec<String>), Status> {
        let mut client = self.client.clone();
        let mut probabilities = Vec::new();
        let mut versions = Vec::new();
        for row in ROWS {
            let response = client
                .model_infer(support::demo_request(&[row], version))
                .await?
                .into_inner();
            probabilities.push(support::output::<f32>(&response, "probabilities"));
            versions.push(response.model_version);
        }
        Ok((probabilities, versions))
    }

    /// `probabilities` of every row, pinned to `version`, which must answer.
    async fn pinned(&self, version: &str) -> Vec<Vec<f32>> {
        let (probabilities, versions) = self
            .answers(version)
            .await
            .unwrap_or_else(|status| panic!("pinned to demo {version}: {status:?}"));
        assert!(versions.iter().all(|v| v == version), "{versions:?}");
        probabilities
    }

    /// The error of a request pinned to `version`, or `None` if it was answered.
    async fn pinned_error(&self, version: &str) -> Option<Code> {
        self.answers(version).await.err().map(|s| s.code())
    }

    async fn model_ready(&self, version: &str) -> bool {
        self.client
            .clone()
            .model_ready(ModelReadyRequest {
                name: "demo".into(),
                version: version.into(),
            })
            .await
            .is_ok_and(|r| r.into_inner().ready)
    }

    /// `(version, state, reason)` of every demo entry in the v2 RepositoryIndex.
    async fn index(&self) -> Vec<(String, String, String)> {
        self.model_index("demo").await
    }

    /// `(version, state, reason)` of every `model` entry in the v2 RepositoryIndex,
    /// failed loads included (`ready: false`).
    async fn model_index(&self, model: &str) -> Vec<(String, String, String)> {
        self.client
            .clone()
            .repository_index(RepositoryIndexRequest {
                repository_name: String::new(),
                ready: false,
            })
            .await
            .expect("repository index")
            .into_inner()
            .models
            .into_iter()
            .filter(|m| m.name == model)
            .map(|m| (m.version, m.state, m.reason))
            .collect()
    }

    /// `(version, state, reason)` of every demo version in the admin API's ListModels.
    async fn listed(&self) -> Vec<(String, String, String)> {
        self.gateway
            .admin()
            .await
            .models()
            .list_models(ListModelsRequest {
                model: "demo".into(),
            })
            .await
            .expect("list models")
            .into_inner()
            .versions
            .into_iter()
            .map(|v| (v.version, v.state, v.reason))
            .collect()
    }
}

/// Replaces `target` the safe way: write a temporary file beside it, then rename it
/// over the target.
fn replace_file(target: &Path, bytes: &[u8]) {
    let temporary = target.with_extension("onnx.tmp");
    std::fs::write(&temporary, bytes).expect("write the temporary file");
    std::fs::rename(&temporary, target).expect("rename over the model file");
}

/// Polls `probe` until it returns `Some`, or panics after `DEADLINE` saying `what`
/// did not happen.
async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not happen within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn entry(version: &str, state: &str) -> (String, String, String) {
    (version.to_owned(), state.to_owned(), String::new())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_published_by_renaming_a_hidden_folder_becomes_pinnable() {
    let watched = Watched::start("").await;
    let v2 = watched.pinned("2").await;
    assert_ne!(watched.pinned("1").await, v2, "the versions must differ");
    assert_eq!(watched.pinned_error("3").await, Some(Code::NotFound));

    watched.publish_copy("2", "3");

    wait_for("demo 3 ready and pinnable", || async {
        (watched.model_ready("3").await && watched.pinned_error("3").await.is_none()).then_some(())
    })
    .await;
    assert_eq!(
        watched.pinned("3").await,
        v2,
        "demo 3 answers like the version it copies"
    );
    let (_, versions) = watched.answers("").await.expect("unpinned requests");
    assert!(
        versions.iter().all(|v| v == "3"),
        "unpinned traffic follows the newest version: {versions:?}"
    );
    assert_eq!(
        watched.pinned("1").await.len(),
        ROWS.len(),
        "older versions stay pinnable"
    );
    watched.gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_file_replaced_by_rename_is_reloaded_without_failing_a_request() {
    let watched = Watched::start("").await;
    let v1 = watched.pinned("1").await;
    let v2 = watched.pinned("2").await;
    assert_ne!(v1, v2, "the versions must differ");

    replace_file(
        &watched.version_dir("1").join("model.onnx"),
        &Watched::model_bytes("2"),
    );

    // Every request pinned to version 1 during the swap answers, as the old or the new
    // file; none fails (`pinned` panics on an error).
    wait_for("demo 1 answering like demo 2's file", || async {
        let answer = watched.pinned("1").await;
        // One request per row: the swap may fall between two of them.
        for (row, probabilities) in answer.iter().enumerate() {
            assert!(
                *probabilities == v1[row] || *probabilities == v2[row],
                "row {row}: demo 1 answers as one of the two files: {probabilities:?}"
            );
        }
        (answer == v2).then_some(())
    })
    .await;
    assert!(watched.model_ready("1").await);
    assert_eq!(
        watched.index().await,
        [entry("1", "READY"), entry("2", "READY")]
    );
    watched.gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_version_folder_is_unloaded_only_when_it_has_no_weight() {
    let watched = Watched::start("").await;
    let v2 = watched.pinned("2").await;
    let routes = watched
        .gateway
        .admin()
        .await
        .routes()
        .get_routes(aviary::pb::admin::GetRoutesRequest {})
        .await
        .expect("routes")
        .into_inner();
    let demo: Vec<(String, u32)> = routes
        .routes
        .iter()
        .find(|r| r.model == "demo")
        .expect("demo has an implicit route")
        .versions
        .iter()
        .map(|v| (v.version.clone(), v.weight))
        .collect();
    assert_eq!(
        demo,
        [("1".to_owned(), 0), ("2".to_owned(), 1)],
        "the newest version takes the traffic, the older one is pinnable"
    );

    // Version 2 goes first: once the scan that sees version 1 gone has run, it has seen
    // version 2 gone too.
    std::fs::remove_dir_all(watched.version_dir("2")).expect("delete demo/2");
    std::fs::remove_dir_all(watched.version_dir("1")).expect("delete demo/1");

    wait_for("demo 1 (weight 0) unloaded", || async {
        (watched.pinned_error("1").await == Some(Code::NotFound)).then_some(())
    })
    .await;
    assert_eq!(
        watched.pinned("2").await,
        v2,
        "demo 2 (weight 1) keeps serving without its folder"
    );
    assert!(watched.model_ready("2").await);
    let (_, versions) = watched.answers("").await.expect("unpinned requests");
    assert!(versions.iter().all(|v| v == "2"), "{versions:?}");
    assert_eq!(watched.listed().await, [entry("2", "READY")]);
    watched.gateway.stop().await.expect("clean stop");
}

/// A gateway keeping only the newest demo version, after demo 3 (a copy of version 1,
/// so it answers unlike version 2) was published and became pinnable. Returns it with
/// the answers of versions 2 and 3.
async fn latest_one_after_publishing_3() -> (Watched, Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let watched = Watched::start("[repository.policies]\ndemo = { latest = 1 }\n").await;
    let v2 = watched.pinned("2").await;
    assert_eq!(
        watched.pinned_error("1").await,
        Some(Code::NotFound),
        "version 1 is outside the policy"
    );
    assert_eq!(watched.index().await, [entry("2", "READY")]);

    watched.publish_copy("1", "3");
    let v3 = wait_for("demo 3 pinnable", || async {
        watched
            .answers("3")
            .await
            .ok()
            .map(|(probabilities, _)| probabilities)
    })
    .await;
    (watched, v2, v3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latest_policy_loads_only_the_newest_version_and_routes_a_new_one() {
    let (watched, v2, v3) = latest_one_after_publishing_3().await;
    assert_ne!(v3, v2, "demo 3 is the copy of version 1");
    let (_, versions) = watched.answers("").await.expect("unpinned requests");
    assert!(
        versions.iter().all(|v| v == "3"),
        "unpinned traffic moves to the new version: {versions:?}"
    );
    watched.gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latest_policy_unloads_the_version_a_new_one_replaces() {
    let (watched, _, _) = latest_one_after_publishing_3().await;
    wait_for("demo 2 unloaded (outside the latest-1 policy)", || async {
        (watched.pinned_error("2").await == Some(Code::NotFound)).then_some(())
    })
    .await;
    assert_eq!(watched.index().await, [entry("3", "READY")]);
    watched.gateway.stop().await.expect("clean stop");
}

/// A writer that keeps a model file changing in place: it writes `bytes` at the start
/// of the file, then writes them again every few milliseconds (each write gives the
/// file a new mtime, as a writer still at work does) until stopped.
struct InPlaceWriter {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(std::fs::File, Duration)>,
}

impl InPlaceWriter {
    fn start(path: &Path, bytes: Vec<u8>) -> InPlaceWriter {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::create(path).expect("create the model file");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut last = Instant::now();
            let mut longest = Duration::ZERO;
            while !stopping.load(Ordering::Relaxed) && started.elapsed() < DEADLINE {
                file.write_all_at(&bytes, 0).expect("write in place");
                longest = longest.max(last.elapsed());
                last = Instant::now();
                std::thread::sleep(Duration::from_millis(2));
            }
            (file, longest)
        });
        InPlaceWriter { stop, thread }
    }

    /// Stops writing; the file, and the longest the file went without a write.
    fn stop(self) -> (std::fs::File, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the writer does not panic")
    }
}

/// What one try of the in-place write found.
enum Window {
    /// The half-written file kept changing through two scans or more, and no load
    /// of it was tried: the rule held.
    Held(std::fs::File),
    /// The writer stalled for a scan interval (the machine was too busy): the watcher
    /// may rightly have loaded the half file, so this try tells nothing.
    WriterStalled(Duration),
}

/// Writes half of demo 2's file in place as demo/`version` and keeps it changing while
/// a marker version (`fixed`/`marker`, published by rename) is loaded: that takes two
/// scans, both after the half file was there. Throughout, demo/`version` must never
/// be tried: no RepositoryIndex entry (a failed load is listed UNAVAILABLE), and
/// requests pinned to it are NOT_FOUND.
async fn hold_half_written(watched: &Watched, version: &str, marker: &str) -> Window {
    let bytes = Watched::model_bytes("2");
    std::fs::create_dir(watched.version_dir(version)).expect("create the version folder");
    let writer = InPlaceWriter::start(
        &watched.version_dir(version).join("model.onnx"),
        bytes[..bytes.len() / 2].to_vec(),
    );
    watched.publish_model_copy("fixed", "1", marker);
    let tried = std::cell::RefCell::new(None);
    let marker_loaded = wait_for("the marker version loaded (two scans)", || async {
        let index = watched.index().await;
        if let Some(entry) = index.iter().find(|(v, _, _)| v == version) {
            tried.borrow_mut().get_or_insert_with(|| entry.clone());
        }
        if watched.pinned_error(version).await != Some(Code::NotFound) {
            tried
                .borrow_mut()
                .get_or_insert_with(|| (version.to_owned(), "answered".into(), String::new()));
        }
        let markers = watched.model_index("fixed").await;
        markers
            .iter()
            .find(|(v, _, _)| v == marker)
            .map(|(_, state, _)| state.clone())
    })
    .await;
    let (file, longest_gap) = writer.stop();
    assert_eq!(marker_loaded, "READY", "the marker version loads");
    if longest_gap >= SCAN / 2 {
        return Window::WriterStalled(longest_gap);
    }
    assert_eq!(
        tried.into_inner(),
        None,
        "demo {version} was tried while its file was still being written"
    );
    Window::Held(file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_file_written_in_place_is_served_once_complete_without_a_stale_error() {
    let watched = Watched::start("").await;
    let v2 = watched.pinned("2").await;
    let bytes = Watched::model_bytes("2");

    // A try whose writer stalled judges nothing; the next one uses a new version.
    let mut stalls = Vec::new();
    let (version, file) = loop {
        let version = (3 + stalls.len()).to_string();
        let marker = (2 + stalls.len()).to_string();
        match hold_half_written(&watched, &version, &marker).await {
            Window::Held(file) => break (version, file),
            Window::WriterStalled(gap) if stalls.len() < 3 => stalls.push(gap),
            Window::WriterStalled(gap) => {
                panic!("the writer stalled in every try: {stalls:?}, {gap:?}")
            }
        }
    };
    {
        use std::os::unix::fs::FileExt;
        file.write_all_at(&bytes, 0).expect("write the whole file");
        file.sync_all().expect("flush");
    }
    drop(file);

    wait_for("the completed file ready with no error", || async {
        let index = watched.index().await;
        let listed = watched.listed().await;
        (index.contains(&entry(&version, "READY")) && listed.contains(&entry(&version, "READY")))
            .then_some(())
    })
    .await;
    let index = watched.index().await;
    let ours: Vec<_> = index.iter().filter(|(v, _, _)| *v == version).collect();
    assert_eq!(
        ours,
        [&entry(&version, "READY")],
        "demo {version} is listed once, READY, with no load error: {index:?}"
    );
    assert_eq!(
        watched.pinned(&version).await,
        v2,
        "demo {version} serves the whole file"
    );
    watched.gateway.stop().await.expect("clean stop");
}

/// A new version whose file does not load is listed as failed, with the reason; once
/// its folder is deleted it is gone from every listing (and so from the alerts),
/// instead of staying UNAVAILABLE until a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_new_version_is_forgotten_when_its_folder_is_deleted() {
    let watched = Watched::start("").await;
    let folder = watched.models.join("demo");
    let hidden = folder.join(".tmp-3");
    std::fs::create_dir(&hidden).expect("create the hidden folder");
    std::fs::write(hidden.join("model.onnx"), b"not an onnx model").expect("write garbage");
    std::fs::rename(&hidden, folder.join("3")).expect("rename into place");

    let failed = wait_for("demo 3 listed as failed", || async {
        watched
            .index()
            .await
            .into_iter()
            .find(|(version, state, _)| version == "3" && state == "UNAVAILABLE")
    })
    .await;
    assert!(
        failed.2.contains("model.onnx"),
        "the reason names the file: {failed:?}"
    );
    assert!(
        watched
            .listed()
            .await
            .iter()
            .any(|(v, state, _)| v == "3" && state == "UNAVAILABLE")
    );

    std::fs::remove_dir_all(watched.version_dir("3")).expect("delete demo/3");
    wait_for("demo 3 gone from the index", || async {
        (watched.index().await == [entry("1", "READY"), entry("2", "READY")]).then_some(())
    })
    .await;
    assert_eq!(
        watched.listed().await,
        [entry("1", "READY"), entry("2", "READY")]
    );
    watched.gateway.stop().await.expect("clean stop");
}
