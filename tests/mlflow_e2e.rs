//! The MLflow model source against a real MLflow tracking server (from PyPI, installed
//! by scripts/setup.sh into .aviary/mlflow), started on loopback with a sqlite store
//! and a local artifact folder: versions registered there, the alias moved, and the
//! gateway following it, with the registry's metadata as the cards.
mod support;

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use aviary::pb::inference::ModelReadyRequest;
use aviary_gateway::Mode;

const ROWS: [[f32; 4]; 1] = [[5.1, 3.5, 1.4, 0.2]];

/// A tracking server in its own process group, stopped (with its workers) on drop.
struct Mlflow {
    child: Child,
    uri: String,
    folder: PathBuf,
}

impl Mlflow {
    fn python() -> PathBuf {
        support::repo_root().join(".aviary/mlflow/bin/python")
    }

    async fn start(folder: &Path) -> Mlflow {
        let mlflow = support::repo_root().join(".aviary/mlflow/bin/mlflow");
        assert!(
            mlflow.exists(),
            "{} is missing: run scripts/setup.sh",
            mlflow.display()
        );
        // A port the system picks; the server binds it a moment later.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(mlflow)
            .args(["server", "--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--workers", "1"])
            .arg("--backend-store-uri")
            .arg(format!("sqlite:///{}", folder.join("mlflow.db").display()))
            .arg("--artifacts-destination")
            .arg(folder.join("artifacts"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("mlflow server starts");
        let server = Mlflow {
            child,
            uri: format!("http://127.0.0.1:{port}"),
            folder: folder.to_owned(),
        };
        let up = support::eventually(Duration::from_secs(90), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        assert!(up, "the MLflow server answers on {}", server.uri);
        server
    }

    /// Registers `file` as a new version of `name` (accuracy `accuracy`, tagged with
    /// `sha256` or the file's), moving `alias` to it; returns (version, run id).
    async fn register(
        &self,
        name: &str,
        file: &Path,
        accuracy: f64,
        sha256: Option<&str>,
        alias: &str,
    ) -> (String, String) {
        let mut args = vec![
            file.display().to_string(),
            accuracy.to_string(),
            "--alias".into(),
            alias.into(),
        ];
        if let Some(sha256) = sha256 {
            args.extend(["--sha256".into(), sha256.into()]);
        }
        self.client(name, args).await
    }

    /// Registers `file` as a new version of `name` at the (legacy) `stage`.
    async fn register_at_stage(&self, name: &str, file: &Path, stage: &str) -> String {
        let args = vec![
            file.display().to_string(),
            "0.9".into(),
            "--stage".into(),
            stage.into(),
        ];
        self.client(name, args).await.0
    }

    /// Moves `alias` of `name` back to an existing `version`.
    async fn move_alias(&self, name: &str, alias: &str, version: &str) {
        let args = vec!["--move".into(), alias.into(), "--to".into(), version.into()];
        self.client(name, args).await;
    }

    /// Runs tests/mlflow/register.py on `name` with `args`; returns (version, run id).
    /// Runs off the test's runtime threads: the Python client takes seconds to start.
    async fn client(&self, name: &str, args: Vec<String>) -> (String, String) {
        let mut command = Command::new(Self::python());
        command
            .arg(support::repo_root().join("tests/mlflow/register.py"))
            .arg(&self.uri)
            .arg(name)
            .args(args)
            .current_dir(&self.folder);
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("joined")
            .expect("register.py runs");
        assert!(
            output.status.success(),
            "register.py: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        let last = stdout.lines().last().unwrap_or_default();
        let answer: serde_json::Value = serde_json::from_str(last).expect("JSON");
        (
            answer["version"].as_str().expect("version").to_owned(),
            answer["run_id"].as_str().expect("run id").to_owned(),
        )
    }

    fn stop(&mut self) {
        // The whole group: the server's workers too.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Mlflow {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn ready(gateway: &support::Running, version: &str) -> bool {
    ready_model(gateway, "iris", version).await
}

async fn ready_model(gateway: &support::Running, model: &str, version: &str) -> bool {
    let mut client = gateway.client().await;
    client
        .model_ready(ModelReadyRequest {
            name: model.into(),
            version: version.into(),
        })
        .await
        .is_ok_and(|r| r.into_inner().ready)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_follows_the_alias_with_the_registrys_metadata_and_rolls_the_new_version_out() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut mlflow = Mlflow::start(dir.path()).await;
    let demo = support::test_models().join("demo");
    let (v1, _) = mlflow
        .register(
            "iris-classifier",
            &demo.join("1/model.onnx"),
            0.91,
            None,
            "champion",
        )
        .await;
    assert_eq!(v1, "1");

    let repository = dir.path().join("models");
    std::fs::create_dir_all(&repository).expect("repository");
    let config = format!(
        r#"
[repository]
path = "{}"
instances = 1

[rollouts]
evaluate_interval_ms = 100

[[mlflow]]
tracking_uri = "{}"
registered_model = "iris-classifier"
model = "iris"
alias = "champion"
poll_interval_ms = 200
rollout = {{ steps = [ {{ weight = 50, min_duration_ms = 3600000, min_requests = 1000 }}, {{ weight = 100, min_duration_ms = 3600000, min_requests = 1000 }} ], gates = {{ max_error_rate_increase = 0.05 }} }}

[[mlflow]]
tracking_uri = "{1}"
registered_model = "iris-staged"
model = "staged"
stage = "Production"
poll_interval_ms = 200
"#,
        repository.display(),
        mlflow.uri
    );
    let gateway = support::start_gateway(&config, Mode::Embedded)
        .await
        .expect("gateway starts with an empty repository");
    assert!(
        support::eventually(Duration::from_secs(30), || ready(&gateway, "1")).await,
        "version 1 comes from MLflow"
    );
    let admin = gateway.admin().await;
    let mut client = gateway.client().await;
    client
        .model_infer(support::demo_request(&ROWS, "").tap_model("iris"))
        .await
        .expect("iris answers");

    // The alias moves to version 2: it is fetched, loaded and rolled out as the canary.
    let (v2, run2) = mlflow
        .register(
            "iris-classifier",
            &demo.join("2/model.onnx"),
            0.97,
            None,
            "champion",
        )
        .await;
    assert_eq!(v2, "2");
    assert!(
        support::eventually(Duration::from_secs(30), || ready(&gateway, "2")).await,
        "version 2 follows the alias"
    );
    // The rollout starts just after the load.
    let started = support::eventually(Duration::from_secs(10), || async {
        admin
            .rollouts()
            .get_rollout(aviary::pb::admin::GetRolloutRequest {
                model: "iris".into(),
            })
            .await
            .is_ok()
    })
    .await;
    assert!(started, "a rollout of version 2 starts");
    let rollout = admin.rollout("iris").await;
    assert_eq!(
        (
            rollout.canary.as_str(),
            rollout.baseline.as_str(),
            rollout.canary_weight
        ),
        ("2", "1", 50),
        "{rollout:?}"
    );
    let versions = admin.list_models("iris").await;
    let card = versions
        .iter()
        .find(|v| v.version == "2")
        .and_then(|v| v.card.clone())
        .expect("version 2 has a card");
    assert_eq!(card.metrics.get("accuracy"), Some(&0.97), "{card:?}");
    let lineage = card.lineage.expect("lineage");
    assert_eq!(lineage.training_run, run2);
    assert!(
        lineage.hyperparameters.contains("\"optimizer\":\"sgd\""),
        "{lineage:?}"
    );
    assert_eq!(card.semver, "1.0.0");
    let file = std::fs::read(demo.join("2/model.onnx")).expect("model");
    assert_eq!(
        card.stated_sha256,
        aviary_worker::registry::Sha256::of(&file).as_str()
    );

    // A version whose file is not the one the registry's sha256 tag names is refused:
    // never loaded, never left in the repository.
    let wrong = "0".repeat(64);
    let (v3, _) = mlflow
        .register(
            "iris-classifier",
            &demo.join("1/model.onnx"),
            0.99,
            Some(&wrong),
            "champion",
        )
        .await;
    assert_eq!(v3, "3");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!ready(&gateway, "3").await, "version 3 is refused");
    assert!(!repository.join("iris/3").exists(), "no version 3 folder");
    assert!(
        !repository.join("iris/.mlflow-3.partial").exists(),
        "nor its download"
    );

    // A rollback in MLflow: with version 2 serving everything, the alias moves back
    // to version 1, which the gateway has: 1 is rolled out against 2.
    let abort = aviary::pb::admin::RolloutCommandRequest {
        model: "iris".into(),
        note: "to move the weights by hand".into(),
    };
    admin
        .rollouts()
        .abort_rollout(abort)
        .await
        .expect("the rollout of 2 is aborted");
    admin.set_weights("iris", &[("1", 0), ("2", 100)]).await;
    mlflow.move_alias("iris-classifier", "champion", "1").await;
    let rolled_back = support::eventually(Duration::from_secs(10), || async {
        let rollout = admin.rollout("iris").await;
        (rollout.canary.as_str(), rollout.baseline.as_str()) == ("1", "2")
    })
    .await;
    assert!(rolled_back, "{:?}", admin.rollout("iris").await);

    // A source following a (legacy) stage takes the latest version at it.
    let staged = mlflow
        .register_at_stage("iris-staged", &demo.join("2/model.onnx"), "Production")
        .await;
    assert!(
        support::eventually(Duration::from_secs(30), || ready_model(
            &gateway, "staged", &staged
        ))
        .await,
        "version {staged} of the staged model comes from MLflow"
    );

    // The registry goes down: the gateway keeps serving what it has.
    mlflow.stop();
    tokio::time::sleep(Duration::from_millis(600)).await;
    for version in ["1", "2"] {
        let answer = client
            .model_infer(support::demo_request(&ROWS, version).tap_model("iris"))
            .await
            .expect("still served with MLflow down")
            .into_inner();
        assert_eq!(answer.model_version, version);
    }
    gateway.stop().await.expect("clean stop");
}

/// `demo_request` for another model name.
trait TapModel {
    fn tap_model(self, model: &str) -> Self;
}

impl TapModel for aviary::pb::inference::ModelInferRequest {
    fn tap_model(mut self, model: &str) -> Self {
        self.model_name = model.to_owned();
        self
    }
}
