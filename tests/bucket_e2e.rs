//! The bucket model source against a real S3-compatible server: moto in server mode
//! (from PyPI, installed by scripts/setup.sh into .aviary/moto), started on loopback
//! with in-memory state. Versions are uploaded with the same S3 client the gateway
//! uses (object_store, signed requests); the gateway resumes a download cut short
//! with a ranged GET, takes the whole versions, refuses a truncated upload, and keeps
//! serving when the store goes down.
mod support;

use std::{
    io::{BufRead, BufReader, Read, Write},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use aviary::pb::inference::ModelReadyRequest;
use aviary_gateway::{
    Mode,
    sources::bucket::{BucketConfig, BucketSource, MANIFEST_FILE},
};
use aviary_worker::registry::Sha256;
use object_store::{ObjectStore, PutPayload, aws::AmazonS3Builder, path::Path};

const ROWS: [[f32; 4]; 1] = [[5.1, 3.5, 1.4, 0.2]];

/// A moto server, killed on drop.
struct Moto {
    child: Child,
    endpoint: String,
    /// Its request log, line by line.
    log: Arc<Mutex<Vec<String>>>,
}

impl Moto {
    /// Starts moto on a port the system picks, read back from what it prints.
    fn start() -> Moto {
        let server = support::repo_root().join(".aviary/moto/bin/moto_server");
        assert!(
            server.exists(),
            "{} is missing: run scripts/setup.sh",
            server.display()
        );
        let mut child = Command::new(server)
            .args(["-H", "127.0.0.1", "-p", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("moto_server starts");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let endpoint = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|line| {
                line.split_once("Running on ")
                    .map(|(_, url)| url.trim().to_owned())
            })
            .expect("moto says where it listens");
        // The rest of its log is kept (and so drained: it never blocks on a full pipe).
        let log = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                kept.lock().expect("log").push(line);
            }
        });
        Moto {
            child,
            endpoint,
            log,
        }
    }

    /// Creates `bucket` (moto takes an unsigned request).
    fn create_bucket(&self, bucket: &str) {
        let address = self.endpoint.trim_start_matches("http://");
        let mut tcp = std::net::TcpStream::connect(address).expect("moto answers");
        write!(
            tcp,
            "PUT /{bucket} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .expect("request");
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).expect("answer");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    fn store(&self, bucket: &str) -> Arc<dyn ObjectStore> {
        let store = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id("testing")
            .with_secret_access_key("testing")
            .build()
            .expect("an S3 client");
        Arc::new(store)
    }

    /// Whether it answered a GET of `key` with 206 Partial Content (a ranged GET).
    fn answered_a_range_of(&self, key: &str) -> bool {
        // Its log colours some lines: the request and the code are matched apart.
        let get = format!("GET /models/{key} HTTP");
        self.log
            .lock()
            .expect("log")
            .iter()
            .any(|line| line.contains(&get) && line.contains("\" 206 "))
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn upload(store: &dyn ObjectStore, version: u64, file: &str, bytes: Vec<u8>) {
    store
        .put(
            &Path::from(format!("prod/demo/{version}/{file}")),
            PutPayload::from(bytes),
        )
        .await
        .expect("uploaded");
}

async fn ready(gateway: &support::Running, version: &str) -> bool {
    let mut client = gateway.client().await;
    client
        .model_ready(ModelReadyRequest {
            name: "demo".into(),
            version: version.into(),
        })
        .await
        .is_ok_and(|r| r.into_inner().ready)
}

fn demo_model(version: u64) -> Vec<u8> {
    let path: PathBuf = support::test_models().join(format!("demo/{version}/model.onnx"));
    std::fs::read(path).expect("a test model")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_come_from_the_bucket_whole_or_not_at_all_and_serving_outlives_the_store() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut moto = Moto::start();
    moto.create_bucket("models");
    let store = moto.store("models");
    let good = demo_model(1);
    let card = |bytes: &[u8]| format!("sha256 = \"{}\"\n", Sha256::of(bytes)).into_bytes();
    upload(&*store, 1, "model.toml", card(&good)).await;
    upload(&*store, 1, "model.onnx", good.clone()).await;

    let repository = dir.path().join("models");
    std::fs::create_dir_all(&repository).expect("repository");
    let credentials = dir.path().join("s3.toml");
    std::fs::write(
        &credentials,
        "access_key_id = \"testing\"\nsecret_access_key = \"testing\"\n",
    )
    .expect("credentials file");
    let bucket = format!(
        r#"url = "s3://models/prod"
endpoint = "{}"
region = "us-east-1"
credentials_file = "{}"
poll_interval_ms = 200
"#,
        moto.endpoint,
        credentials.display()
    );
    let config = format!(
        "[repository]\npath = \"{}\"\ninstances = 1\n\n[[bucket]]\n{bucket}",
        repository.display(),
    );

    // What a gateway killed in the middle of fetching version 1 left behind: the
    // manifest of the objects it started from, and the first half of the model file.
    let source = BucketSource::new(
        toml::from_str::<BucketConfig>(&bucket).expect("a bucket config"),
        repository.clone(),
    )
    .expect("a source");
    let listed = source.list().await.expect("listed");
    let partial = source.partial_folder("demo", 1);
    std::fs::create_dir_all(&partial).expect("partial folder");
    std::fs::write(
        partial.join(MANIFEST_FILE),
        serde_json::to_vec(&listed[&("demo".to_owned(), 1)]).expect("json"),
    )
    .expect("manifest");
    std::fs::write(partial.join("model.onnx"), &good[..good.len() / 2]).expect("half");
    let gateway = support::start_gateway(&config, Mode::Embedded)
        .await
        .expect("gateway starts with an empty repository");
    assert!(
        support::eventually(Duration::from_secs(30), || ready(&gateway, "1")).await,
        "version 1 comes from the bucket"
    );
    // The log line is read by another thread: it may come a moment after.
    let ranged = support::eventually(Duration::from_secs(5), || async {
        moto.answered_a_range_of("prod/demo/1/model.onnx")
    })
    .await;
    assert!(
        ranged,
        "the cut download was resumed with a ranged GET: {:#?}",
        moto.log.lock().expect("log")
    );
    assert_eq!(
        std::fs::read(repository.join("demo/1/model.onnx")).expect("version 1"),
        good
    );
    let stated = gateway.admin().await.list_models("demo").await;
    let card_of_1 = stated
        .iter()
        .find(|v| v.version == "1")
        .and_then(|v| v.card.clone())
        .expect("version 1 has its card");
    assert_eq!(card_of_1.stated_sha256, Sha256::of(&good).as_str());

    // Version 2: a truncated upload under the whole file's card. Version 3: a
    // truncated upload with no card (the runtime refuses it). Version 4: whole.
    let next = demo_model(2);
    upload(&*store, 2, "model.toml", card(&next)).await;
    upload(&*store, 2, "model.onnx", next[..next.len() / 2].to_vec()).await;
    upload(&*store, 3, "model.onnx", next[..next.len() / 3].to_vec()).await;
    upload(&*store, 4, "model.toml", card(&next)).await;
    upload(&*store, 4, "model.onnx", next.clone()).await;
    assert!(
        support::eventually(Duration::from_secs(30), || ready(&gateway, "4")).await,
        "version 4 comes from the bucket"
    );
    // A look takes the versions in order: 2 and 3 were tried before 4 was loaded.
    for version in ["2", "3"] {
        assert!(
            !ready(&gateway, version).await,
            "version {version} is refused"
        );
        assert!(
            !repository.join(format!("demo/{version}")).exists(),
            "no version {version} folder"
        );
    }
    let left: Vec<_> = std::fs::read_dir(repository.join("demo"))
        .expect("the model folder")
        .map(|entry| entry.expect("entry").file_name())
        .filter(|name| name.to_string_lossy().starts_with('.'))
        .collect();
    assert!(left.is_empty(), "no download is left behind: {left:?}");

    // The store goes down: the gateway keeps serving what it has, look after look.
    moto.stop();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut client = gateway.client().await;
    for version in ["1", "4"] {
        let answer = client
            .model_infer(support::demo_request(&ROWS, version))
            .await
            .expect("still served with the store down")
            .into_inner();
        assert_eq!(answer.model_version, version);
    }
    gateway.stop().await.expect("clean stop");
}
