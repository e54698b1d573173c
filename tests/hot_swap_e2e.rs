//! End-to-end tests of hot swap: model versions reloaded, loaded and unloaded, routes
//! changed through the admin API and through the watched config file, all inside a
//! running embedded gateway while clients keep sending requests. What a client must
//! see: no failed request, and every answer from a version that could be routed.
mod support;

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use aviary::pb::{
    admin::{
        GetConfigStatusRequest, GetRoutesRequest, GetRoutesResponse, ListModelsRequest, Route,
        SetRouteRequest, UnloadVersionRequest, VersionRequest,
    },
    inference::{
        ModelInferResponse, ModelReadyRequest, ModelRepositoryParameter,
        RepositoryModelLoadRequest, RepositoryModelUnloadRequest, model_repository_parameter,
    },
};
use aviary_gateway::Mode;
use tonic::{Code, Status};

use support::{Admin, Client};

/// Route splitting `demo` evenly between its two versions.
const DEMO_BOTH: &str = "[routes.demo]\nversions = [ { version = \"1\", weight = 50 }, { version = \"2\", weight = 50 } ]\n";

/// An input on which demo/1 and demo/2 answer differently (checked by [`reference`]).
const ROW: [f32; 4] = [6.0, 2.9, 4.5, 1.5];

/// Generous bound for conditions that normally hold within milliseconds.
const PATIENCE: Duration = Duration::from_secs(15);

// ---- small helpers -------------------------------------------------------------

fn demo_route(weights: [u32; 2]) -> Route {
    support::route("demo", &[("1", weights[0]), ("2", weights[1])])
}

async fn set_demo(admin: &mut Admin, weights: [u32; 2]) -> u64 {
    admin
        .set_weights("demo", &[("1", weights[0]), ("2", weights[1])])
        .await
}

async fn get_routes(admin: &mut Admin) -> GetRoutesResponse {
    admin.get_routes().await
}

/// `demo`'s route as (version, weight) pairs; empty when it has none.
fn demo_weights(routes: &GetRoutesResponse) -> Vec<(String, u32)> {
    support::route_weights(routes, "demo")
}

fn pairs(weights: [u32; 2]) -> Vec<(String, u32)> {
    support::owned(&[("1", weights[0]), ("2", weights[1])])
}

async fn infer(client: &mut Client, version: &str) -> ModelInferResponse {
    support::infer(client, support::demo_request(&[ROW], version)).await
}

async fn infer_error(client: &mut Client, version: &str) -> Status {
    support::infer_error(client, support::demo_request(&[ROW], version)).await
}

fn probabilities(response: &ModelInferResponse) -> Vec<f32> {
    support::output::<f32>(response, "probabilities")
}

/// The outputs of demo/1 and demo/2 on [`ROW`], pinned; they must differ.
async fn reference(client: &mut Client) -> [Vec<f32>; 2] {
    let v1 = probabilities(&infer(client, "1").await);
    let v2 = probabilities(&infer(client, "2").await);
    assert_ne!(
        v1, v2,
        "demo/1 and demo/2 must differ on {ROW:?}, or a mixed-up answer would go unnoticed"
    );
    [v1, v2]
}

/// Replaces `target` atomically (write a temporary file beside it, rename it over).
fn replace_file(target: &Path, bytes: &[u8]) {
    let tmp = target.with_file_name(".replace.tmp");
    std::fs::write(&tmp, bytes).expect("write temporary file");
    std::fs::rename(&tmp, target).expect("rename over target");
}

fn repository_section(models: &Path) -> String {
    format!(
        "[repository]\npath = '{}'\ninstances = 2\nintra_op_threads = 1\ninter_op_threads = 1\n\n",
        models.display()
    )
}

fn config_text(models: &Path, weights: [u32; 2], note: &str) -> String {
    format!(
        "# {note}\n{}[routes.demo]\nversions = [ {{ version = \"1\", weight = {} }}, {{ version = \"2\", weight = {} }} ]\n",
        repository_section(models),
        weights[0],
        weights[1]
    )
}

/// The integers in `text`, e.g. the generations an error message names.
fn numbers_in(text: &str) -> BTreeSet<u64> {
    text.split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// A small deterministic generator (xorshift64*), so a failing run can be replayed.
#[cfg(unix)]
struct Rng(u64);

#[cfg(unix)]
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u32 {
        u32::try_from(self.next() % n).expect("small")
    }

    /// Weights for versions 1 and 2, at least one positive; a third of them exclusive.
    fn weights(&mut self) -> [u32; 2] {
        match self.below(6) {
            0 => [0, 100],
            1 => [100, 0],
            _ => {
                let w = [self.below(101), self.below(101)];
                if w == [0, 0] { [1, 0] } else { w }
            }
        }
    }
}

/// When each demo version was last loaded, by version (ListModels' `loaded_at_ms`).
/// demo's `version` as the admin API's ListModels lists it.
async fn listed_version(admin: &Admin, version: &str) -> aviary::pb::admin::ModelVersionInfo {
    admin
        .models()
        .list_models(ListModelsRequest {
            model: "demo".into(),
        })
        .await
        .expect("ListModels")
        .into_inner()
        .versions
        .into_iter()
        .find(|v| v.version == version)
        .unwrap_or_else(|| panic!("demo/{version} listed"))
}

async fn loaded_at(admin: &Admin) -> std::collections::BTreeMap<String, u64> {
    admin
        .list_models("demo")
        .await
        .into_iter()
        .map(|v| (v.version, v.loaded_at_ms))
        .collect()
}

// ---- continuous load -----------------------------------------------------------

/// One request of a [`Load`].
#[derive(Debug)]
struct Sample {
    sent: Instant,
    answered: Instant,
    pinned: Option<&'static str>,
    /// The answering version and whose outputs it gave (0: demo/1's model, 1: demo/2's).
    outcome: Result<(String, usize), String>,
}

/// Client tasks sending `demo` requests back to back until finished.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    tasks: tokio::task::JoinSet<Vec<Sample>>,
    clients: usize,
    pin_every: usize,
}

impl Load {
    /// `clients` tasks, each on its own connection; every `pin_every`-th request of a
    /// task is pinned (alternately to 1 and 2), the others are unpinned (0: none pinned).
    async fn start(
        gateway: &support::Running,
        reference: &[Vec<f32>; 2],
        clients: usize,
        pin_every: usize,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..clients {
            let mut client = gateway.client().await;
            let reference = reference.clone();
            let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
            tasks.spawn(async move {
                let mut samples = Vec::new();
                let mut i = 0usize;
                let started = Instant::now();
                while !stop.load(Ordering::Relaxed) && started.elapsed() < support::LOAD_LIMIT {
                    i += 1;
                    let pinned = (pin_every > 0 && i.is_multiple_of(pin_every)).then(|| {
                        if (i / pin_every + task).is_multiple_of(2) {
                            "1"
                        } else {
                            "2"
                        }
                    });
                    let request = support::demo_request(&[ROW], pinned.unwrap_or(""));
                    let sent = Instant::now();
                    let result = client.model_infer(request).await;
                    let answered = Instant::now();
                    let outcome = match result {
                        Ok(response) => {
                            let response = response.into_inner();
                            let got = probabilities(&response);
                            match reference.iter().position(|r| *r == got) {
                                Some(which) => Ok((response.model_version, which)),
                                None => Err(format!(
                                    "version {:?} answered {got:?}, the outputs of neither model",
                                    response.model_version
                                )),
                            }
                        }
                        Err(status) => Err(format!("{status:?}")),
                    };
                    samples.push(Sample {
                        sent,
                        answered,
                        pinned,
                        outcome,
                    });
                    done.fetch_add(1, Ordering::Relaxed);
                }
                samples
            });
        }
        Load {
            stop,
            done,
            tasks,
            clients,
            pin_every,
        }
    }

    fn done(&self) -> usize {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits until `more` further requests have been answered.
    async fn wait_for(&self, more: usize) {
        let target = self.done() + more;
        assert!(
            support::eventually(PATIENCE, || async { self.done() >= target }).await,
            "the load stalled at {} requests",
            self.done()
        );
    }

    /// Holds the route change just applied (`weights`) until requests flew inside it:
    /// at least one when both versions have weight; when one has none (an exclusive
    /// phase), enough that an unpinned one flew entirely within the phase. Each client
    /// has at most one request in flight when the phase starts, and every later answer
    /// of a client was sent after it, so after `clients` answers the next `clients + 1`
    /// were sent and answered inside the phase, two of them consecutive requests of one
    /// client; of two consecutive requests at most one is pinned (`pin_every` is never
    /// 1), so one of them is unpinned. Returns whether the phase was exclusive.
    async fn hold_phase(&self, weights: [u32; 2]) -> bool {
        assert_ne!(self.pin_every, 1, "some requests must be unpinned");
        let exclusive = weights.contains(&0);
        if exclusive {
            self.wait_for(2 * self.clients + 1).await;
        } else {
            self.wait_for(1).await;
        }
        exclusive
    }

    async fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let mut samples = Vec::new();
        while let Some(joined) = self.tasks.join_next().await {
            samples.extend(joined.expect("client task did not panic"));
        }
        samples
    }
}

/// Asserts that no request failed and every pinned one was answered by its version.
fn assert_no_failures(samples: &[Sample]) {
    let failures: Vec<String> = samples
        .iter()
        .filter_map(|s| match &s.outcome {
            Err(error) => Some(error.clone()),
            Ok((version, _)) if s.pinned.is_some_and(|p| p != version) => {
                Some(format!("pinned to {:?}, answered by {version:?}", s.pinned))
            }
            Ok(_) => None,
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed; first: {:#?}",
        failures.len(),
        samples.len(),
        &failures[..failures.len().min(5)]
    );
}

// ---- the churn test --------------------------------------------------------------

/// One route change: published somewhere in `[start, end]` (`end`: when the driver saw
/// it applied), giving versions 1 and 2 these weights.
#[cfg(unix)]
#[derive(Debug, Clone, Copy)]
struct Change {
    start: Instant,
    end: Instant,
    weights: [u32; 2],
}

/// The versions an unpinned request sent at `sent` and answered at `answered` may have
/// been routed to: those with weight in any route state that may have been published
/// at some instant in between. State `i` is current from its publication (no earlier
/// than `start[i]`) until the next one's (no later than `end[i + 1]`).
#[cfg(unix)]
fn routable(changes: &[Change], sent: Instant, answered: Instant) -> BTreeSet<&'static str> {
    let last = changes
        .partition_point(|c| c.start <= answered)
        .saturating_sub(1);
    let first = changes.partition_point(|c| c.end < sent).saturating_sub(1);
    let mut versions = BTreeSet::new();
    for change in &changes[first.min(last)..=last] {
        for (i, name) in ["1", "2"].into_iter().enumerate() {
            if change.weights[i] > 0 {
                versions.insert(name);
            }
        }
    }
    versions
}

/// The churn test's config file `aviary.toml`: either a ConfigMap-style symlink
/// (`aviary.toml -> ..data/aviary.toml`, `..data -> ..<timestamp>`) or, after a
/// write-then-rename, a regular file.
#[cfg(unix)]
struct WatchedConfig {
    dir: PathBuf,
    serial: u32,
    data: Option<PathBuf>,
}

#[cfg(unix)]
impl WatchedConfig {
    fn path(&self) -> PathBuf {
        self.dir.join("aviary.toml")
    }

    /// An editor's save: write a temporary file, rename it over the config.
    fn write_renamed(&mut self, text: &str) {
        let tmp = self.dir.join(".aviary.toml.swp");
        std::fs::write(&tmp, text).expect("write temporary config");
        std::fs::rename(&tmp, self.path()).expect("rename over the config");
    }

    /// A Kubernetes ConfigMap update: a new timestamped folder, `..data_tmp` pointing at
    /// it renamed over `..data`, the old folder removed. If a write-then-rename left a
    /// regular file, the `aviary.toml` symlink is put back the same atomic way.
    fn swap_configmap(&mut self, text: &str) {
        use std::os::unix::fs::symlink;
        self.serial += 1;
        let name = format!(
            "..2025_06_01_12_00_{:02}.{:09}",
            self.serial % 60,
            self.serial
        );
        let folder = self.dir.join(&name);
        std::fs::create_dir(&folder).expect("create ConfigMap folder");
        std::fs::write(folder.join("aviary.toml"), text).expect("write ConfigMap file");
        let data_tmp = self.dir.join("..data_tmp");
        symlink(&name, &data_tmp).expect("symlink ..data_tmp");
        std::fs::rename(&data_tmp, self.dir.join("..data")).expect("rename ..data_tmp over ..data");
        let link = self.path();
        let is_link = std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink());
        if !is_link {
            let link_tmp = self.dir.join(".aviary.toml.link");
            symlink("..data/aviary.toml", &link_tmp).expect("symlink aviary.toml");
            std::fs::rename(&link_tmp, &link).expect("rename link over aviary.toml");
        }
        if let Some(old) = self.data.replace(folder) {
            std::fs::remove_dir_all(old).expect("remove the old ConfigMap folder");
        }
    }
}

/// The churn test: 50 reloads, 200 weight changes and 20 config file rewrites while six
/// clients send requests; not one may fail or be answered by a version without weight.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_weight_changes_and_config_rewrites_under_load_fail_no_request() {
    const CLIENTS: usize = 6;
    const ROUNDS: usize = 20;
    const SET_ROUTES_PER_ROUND: usize = 10;

    let dir = tempfile::tempdir().expect("tempdir");
    let models = support::copy_test_models(dir.path());
    let original = [
        std::fs::read(models.join("demo/1/model.onnx")).expect("read demo/1"),
        std::fs::read(models.join("demo/2/model.onnx")).expect("read demo/2"),
    ];
    let config_dir = dir.path().join("config");
    std::fs::create_dir(&config_dir).expect("config folder");
    let mut config = WatchedConfig {
        dir: config_dir,
        serial: 0,
        data: None,
    };
    let mut changes = vec![Change {
        start: Instant::now(),
        end: Instant::now(),
        weights: [50, 50],
    }];
    config.swap_configmap(&config_text(&models, [50, 50], "initial"));
    let gateway = support::start_gateway_from_file(&config.path(), Mode::Embedded)
        .await
        .expect("gateway starts");
    let mut admin = gateway.admin().await;
    wait_for_watcher(&mut admin).await;
    let mut client = gateway.client().await;
    let reference = reference(&mut client).await;
    assert_eq!(demo_weights(&get_routes(&mut admin).await), pairs([50, 50]));

    let start_generation = get_routes(&mut admin).await.generation;
    let loaded_before = loaded_at(&admin).await;
    let load = Load::start(&gateway, &reference, CLIENTS, 7).await;
    load.wait_for(20).await;

    let mut exclusive_phases = 0usize;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut current = [50, 50];
    let mut in_file = current;
    let (mut reloads, mut set_routes, mut rewrites) = (0usize, 0usize, 0usize);
    for round in 0..ROUNDS {
        // A config file rewrite, alternately as a ConfigMap swap and an editor's save,
        // with weights the route does not have yet, so its arrival is visible, and that
        // the file did not have: a file change applies to the routes it changes.
        let weights = loop {
            let w = rng.weights();
            if w != current && w != in_file {
                break w;
            }
        };
        in_file = weights;
        let text = config_text(&models, weights, &format!("rewrite {round}"));
        let start = Instant::now();
        if round.is_multiple_of(2) {
            config.swap_configmap(&text);
        } else {
            config.write_renamed(&text);
        }
        let applied = support::eventually(PATIENCE, || {
            let mut admin = admin.clone();
            async move { demo_weights(&get_routes(&mut admin).await) == pairs(weights) }
        })
        .await;
        let status = admin
            .routes()
            .get_config_status(GetConfigStatusRequest {})
            .await
            .expect("GetConfigStatus")
            .into_inner();
        assert!(
            applied,
            "config rewrite {round} ({weights:?}) never applied; status {status:?}"
        );
        changes.push(Change {
            start,
            end: Instant::now(),
            weights,
        });
        current = weights;
        rewrites += 1;
        exclusive_phases += usize::from(load.hold_phase(weights).await);

        let reload_slots: &[usize] = if round.is_multiple_of(2) {
            &[2, 5, 8]
        } else {
            &[3, 7]
        };
        for step in 0..SET_ROUTES_PER_ROUND {
            let weights = rng.weights();
            let start = Instant::now();
            set_demo(&mut admin, weights).await;
            changes.push(Change {
                start,
                end: Instant::now(),
                weights,
            });
            current = weights;
            set_routes += 1;

            if reload_slots.contains(&step) {
                // Reload a version, every other time of a version with the other
                // version's model file, so the reload visibly changes its answers.
                let version = 1 + reloads % 2;
                let source = if !(reloads / 2).is_multiple_of(2) {
                    3 - version
                } else {
                    version
                };
                replace_file(
                    &models.join(format!("demo/{version}/model.onnx")),
                    &original[source - 1],
                );
                let response = admin
                    .models()
                    .reload_version(VersionRequest {
                        model: "demo".into(),
                        version: version.to_string(),
                    })
                    .await
                    .unwrap_or_else(|s| panic!("reload {reloads} of demo/{version} failed: {s:?}"))
                    .into_inner();
                assert_eq!(
                    response.version.map(|v| v.state).as_deref(),
                    Some("READY"),
                    "demo/{version} after reload {reloads}"
                );
                let pinned = infer(&mut client, &version.to_string()).await;
                assert_eq!(
                    probabilities(&pinned),
                    reference[source - 1],
                    "after reload {reloads}, demo/{version} must answer with demo/{source}'s model file"
                );
                reloads += 1;
            }
            exclusive_phases += usize::from(load.hold_phase(weights).await);
        }
    }
    load.wait_for(20).await;
    let samples = load.finish().await;

    // Every change was published: each SetRoute and each file rewrite adds a generation.
    let end_generation = get_routes(&mut admin).await.generation;
    assert!(
        end_generation >= start_generation + (set_routes + rewrites) as u64,
        "{set_routes} SetRoutes and {rewrites} rewrites took the routes from generation \
         {start_generation} only to {end_generation}"
    );
    // Both versions were reloaded: the worker loaded each one again after the start.
    let loaded_at = loaded_at(&admin).await;
    for (version, before) in &loaded_before {
        assert!(
            loaded_at[version] > *before,
            "demo/{version} was never reloaded: loaded at {before} ms and still {} ms",
            loaded_at[version]
        );
    }

    assert_no_failures(&samples);
    let mut exclusive = 0usize;
    let mut answered_by = [0usize; 2];
    for sample in samples.iter().filter(|s| s.pinned.is_none()) {
        let (version, _) = sample.outcome.as_ref().expect("checked above");
        let possible = routable(&changes, sample.sent, sample.answered);
        assert!(
            possible.contains(version.as_str()),
            "an unpinned request sent {:?} and answered {:?} after the test began was answered by \
             version {version:?}, which had no weight at any time in between (routable: {possible:?})",
            sample.sent - changes[0].start,
            sample.answered - changes[0].start,
        );
        if possible.len() == 1 {
            exclusive += 1;
        }
        match version.as_str() {
            "1" => answered_by[0] += 1,
            _ => answered_by[1] += 1,
        }
    }
    // The check above can only catch a misroute when one version had no weight for a
    // request's whole flight: every exclusive phase was held until one did.
    assert!(
        exclusive >= exclusive_phases,
        "only {exclusive} unpinned requests flew entirely within one of the {exclusive_phases} \
         phases where one version had weight 0 ({} requests in all)",
        samples.len()
    );
    assert!(
        answered_by.iter().all(|&n| n > 0),
        "both versions answered unpinned requests: {answered_by:?}"
    );

    // The gateway still answers as its last state says, and the config applied cleanly.
    let routes = get_routes(&mut admin).await;
    assert_eq!(demo_weights(&routes), pairs(current));
    for version in ["1", "2"] {
        let response = infer(&mut client, version).await;
        let which = usize::from(version == "2");
        assert_eq!(
            probabilities(&response),
            reference[which],
            "demo/{version} ends on its own model file"
        );
    }
    infer(&mut client, "").await;
    let status = admin
        .routes()
        .get_config_status(GetConfigStatusRequest {})
        .await
        .expect("GetConfigStatus")
        .into_inner();
    assert!(status.errors.is_empty(), "config status: {status:?}");
    assert!(status.applied_at_ms > 0, "config status: {status:?}");
    let models = admin
        .models()
        .list_models(ListModelsRequest {
            model: "demo".into(),
        })
        .await
        .expect("ListModels")
        .into_inner();
    let states: Vec<(String, String)> = models
        .versions
        .iter()
        .map(|v| (v.version.clone(), v.state.clone()))
        .collect();
    assert_eq!(
        states,
        [("1".into(), "READY".into()), ("2".into(), "READY".into())]
    );
    gateway.stop().await.expect("clean stop");
}

// ---- weight changes, compare-and-set, invalid routes ----------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_change_applies_to_every_request_after_it_returns() {
    let gateway = support::start_embedded(DEMO_BOTH).await;
    let mut admin = gateway.admin().await;
    let mut client = gateway.client().await;
    let reference = reference(&mut client).await;

    for (weights, version) in [([0, 100], "2"), ([100, 0], "1")] {
        set_demo(&mut admin, weights).await;
        let which = usize::from(version == "2");
        for i in 0..100 {
            let response = infer(&mut client, "").await;
            assert_eq!(
                response.model_version, version,
                "request {i} after SetRoute {weights:?} returned"
            );
            assert_eq!(probabilities(&response), reference[which]);
        }
    }
    gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_route_with_a_stale_generation_is_refused_and_with_the_current_one_applies() {
    let gateway = support::start_embedded(DEMO_BOTH).await;
    let mut admin = gateway.admin().await;
    let stale = get_routes(&mut admin).await.generation;
    let current = set_demo(&mut admin, [70, 30]).await;
    assert_eq!(current, stale + 1, "every applied change adds one");

    let status = admin
        .routes()
        .set_route(SetRouteRequest {
            route: Some(demo_route([10, 90])),
            expected_generation: Some(stale),
        })
        .await
        .expect_err("a stale generation must be refused");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let named = numbers_in(status.message());
    assert!(
        named.contains(&stale) && named.contains(&current),
        "the refusal names the expected ({stale}) and current ({current}) generations: {:?}",
        status.message()
    );
    let routes = get_routes(&mut admin).await;
    assert_eq!(
        routes.generation, current,
        "a refused change changes nothing"
    );
    assert_eq!(demo_weights(&routes), pairs([70, 30]));

    let applied = admin
        .routes()
        .set_route(SetRouteRequest {
            route: Some(demo_route([10, 90])),
            expected_generation: Some(current),
        })
        .await
        .expect("the current generation applies")
        .into_inner();
    assert_eq!(applied.generation, current + 1);
    let routes = get_routes(&mut admin).await;
    assert_eq!(routes.generation, current + 1);
    assert_eq!(demo_weights(&routes), pairs([10, 90]));
    gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_route_is_rejected_listing_every_problem_and_changes_nothing() {
    let gateway = support::start_embedded(DEMO_BOTH).await;
    let mut admin = gateway.admin().await;
    let mut client = gateway.client().await;
    let before = get_routes(&mut admin).await;

    let status = admin
        .routes()
        .set_route(SetRouteRequest {
            route: Some(support::route("demo", &[("1", 0), ("9", 0), ("1", 0)])),
            expected_generation: None,
        })
        .await
        .expect_err("an invalid route must be refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let message = status.message();
    for (path, problem) in [
        ("routes.demo.versions[1].version: ", "\"9\""),
        ("routes.demo.versions[2].version: ", "listed twice"),
        ("routes.demo.versions: ", "all weights are 0"),
    ] {
        assert!(
            message
                .lines()
                .any(|line| line.contains(path) && line.contains(problem)),
            "no line names {path:?} with {problem:?} in:\n{message}"
        );
    }

    assert_eq!(get_routes(&mut admin).await, before, "the old table stays");
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        seen.insert(infer(&mut client, "").await.model_version);
    }
    assert_eq!(
        seen,
        BTreeSet::from(["1".to_owned(), "2".to_owned()]),
        "traffic still splits"
    );
    gateway.stop().await.expect("clean stop");
}

// ---- failed loads ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_model_file_fails_the_reload_and_the_running_copy_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let models = support::copy_test_models(dir.path());
    let text = format!("{}{DEMO_BOTH}", repository_section(&models));
    let gateway = support::start_gateway(&text, Mode::Embedded)
        .await
        .expect("gateway starts");
    let admin = gateway.admin().await;
    let mut client = gateway.client().await;
    let reference = reference(&mut client).await;
    let load = Load::start(&gateway, &reference, 2, 3).await;

    let file = models.join("demo/2/model.onnx");
    let real = std::fs::read(&file).expect("read demo/2");
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    for (what, bytes) in [
        ("garbage", &garbage[..]),
        ("truncated", &real[..real.len() / 2]),
    ] {
        replace_file(&file, bytes);
        let status = admin
            .models()
            .reload_version(VersionRequest {
                model: "demo".into(),
                version: "2".into(),
            })
            .await
            .expect_err("reloading a corrupt file must fail");
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{what}: {status:?}"
        );
        assert!(
            status.message().contains(&file.display().to_string()),
            "{what}: the error names {}: {:?}",
            file.display(),
            status.message()
        );
        for _ in 0..5 {
            let response = infer(&mut client, "2").await;
            assert_eq!(
                probabilities(&response),
                reference[1],
                "{what}: demo/2 still answers with its old model"
            );
        }
        let v2 = listed_version(&admin, "2").await;
        assert_eq!(
            v2.state, "READY",
            "{what}: the running copy is ready: {v2:?}"
        );
        assert!(
            v2.reason.contains("the last reload failed")
                && v2.reason.contains(&file.display().to_string()),
            "{what}: the failure shows beside READY: {v2:?}"
        );
        let index = client
            .repository_index(aviary::pb::inference::RepositoryIndexRequest::default())
            .await
            .expect("RepositoryIndex")
            .into_inner();
        let entry = index
            .models
            .iter()
            .find(|m| m.name == "demo" && m.version == "2")
            .expect("demo/2 in the index");
        assert_eq!(
            (entry.state.as_str(), entry.reason.as_str()),
            ("READY", v2.reason.as_str()),
            "{what}: RepositoryIndex tells the same"
        );
    }

    let status = admin
        .models()
        .load_version(VersionRequest {
            model: "demo".into(),
            version: "7".into(),
        })
        .await
        .expect_err("there is no demo/7");
    assert!(
        matches!(status.code(), Code::FailedPrecondition | Code::NotFound),
        "{status:?}"
    );
    assert!(
        status.message().contains("demo/7"),
        "the error names demo/7: {:?}",
        status.message()
    );

    // The real file back: the reload works again.
    replace_file(&file, &real);
    admin
        .models()
        .reload_version(VersionRequest {
            model: "demo".into(),
            version: "2".into(),
        })
        .await
        .expect("reloading the real file works");
    assert_eq!(probabilities(&infer(&mut client, "2").await), reference[1]);
    let v2 = listed_version(&admin, "2").await;
    assert_eq!(
        (v2.state.as_str(), v2.reason.as_str()),
        ("READY", ""),
        "a good reload clears the failure"
    );

    load.wait_for(10).await;
    assert_no_failures(&load.finish().await);
    gateway.stop().await.expect("clean stop");
}

// ---- the watched config file ---------------------------------------------------

async fn config_errors(admin: &mut Admin) -> Vec<String> {
    admin.config_status().await.errors
}

/// Waits until the gateway's config watcher runs (it names its file in the status).
/// Changes written before that are missed (see
/// `a_config_change_written_while_the_gateway_starts_applies`).
async fn wait_for_watcher(admin: &mut Admin) {
    let running = support::eventually(PATIENCE, || {
        let admin = admin.clone();
        async move {
            let status = admin
                .routes()
                .get_config_status(GetConfigStatusRequest {})
                .await
                .expect("GetConfigStatus")
                .into_inner();
            !status.path.is_empty()
        }
    })
    .await;
    assert!(running, "the config watcher never started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_or_deleted_config_file_keeps_the_last_good_routes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let models = support::test_models();
    let path = dir.path().join("aviary.toml");
    let write = |text: &str| replace_file(&path, text.as_bytes());
    write(&config_text(&models, [50, 50], "initial"));
    let gateway = support::start_gateway_from_file(&path, Mode::Embedded)
        .await
        .expect("gateway starts");
    let mut admin = gateway.admin().await;
    wait_for_watcher(&mut admin).await;
    let mut client = gateway.client().await;
    let good = get_routes(&mut admin).await;
    assert_eq!(demo_weights(&good), pairs([50, 50]));

    // A typo'd key (and a route to a version that does not exist).
    write(&format!(
        "{}[routes.demo]\nversions = [ {{ version = \"1\", wieght = 50 }}, {{ version = \"9\", weight = 50 }} ]\n",
        repository_section(&models)
    ));
    let shown = support::eventually(PATIENCE, || {
        let mut admin = admin.clone();
        async move {
            config_errors(&mut admin)
                .await
                .iter()
                .any(|e| e.contains("wieght"))
        }
    })
    .await;
    assert!(shown, "errors: {:?}", config_errors(&mut admin).await);
    assert_eq!(get_routes(&mut admin).await, good, "the old routes stay");
    for _ in 0..10 {
        infer(&mut client, "").await;
    }

    // Valid TOML, but a route to a version that does not exist.
    write(&format!(
        "{}[routes.demo]\nversions = [ {{ version = \"1\", weight = 50 }}, {{ version = \"9\", weight = 50 }} ]\n",
        repository_section(&models)
    ));
    let shown = support::eventually(PATIENCE, || {
        let mut admin = admin.clone();
        async move {
            config_errors(&mut admin)
                .await
                .iter()
                .any(|e| e.contains("routes.demo.versions[1].version") && e.contains("\"9\""))
        }
    })
    .await;
    assert!(shown, "errors: {:?}", config_errors(&mut admin).await);
    assert_eq!(get_routes(&mut admin).await, good, "the old routes stay");
    for _ in 0..10 {
        infer(&mut client, "").await;
    }

    // A valid file: the errors clear and the new routes apply.
    write(&config_text(&models, [0, 100], "fixed"));
    let applied = support::eventually(PATIENCE, || {
        let mut admin = admin.clone();
        async move {
            config_errors(&mut admin).await.is_empty()
                && demo_weights(&get_routes(&mut admin).await) == pairs([0, 100])
        }
    })
    .await;
    assert!(applied, "errors: {:?}", config_errors(&mut admin).await);
    for _ in 0..20 {
        assert_eq!(infer(&mut client, "").await.model_version, "2");
    }

    // Deleted: the last good config keeps serving, and the status says the file
    // cannot be read once the watcher has tried.
    let last_good = get_routes(&mut admin).await;
    std::fs::remove_file(&path).expect("delete the config");
    let noticed = support::eventually(PATIENCE, || {
        let admin = admin.clone();
        async move {
            admin
                .config_status()
                .await
                .unreadable
                .starts_with("cannot read the file")
        }
    })
    .await;
    assert!(noticed, "the watcher read the missing file");
    for _ in 0..20 {
        assert_eq!(infer(&mut client, "").await.model_version, "2");
    }
    assert_eq!(get_routes(&mut admin).await, last_good);
    assert!(config_errors(&mut admin).await.is_empty());

    // Written again: the watcher is still at work, and the recreated file is the only
    // change published since the deletion.
    write(&config_text(&models, [100, 0], "recreated"));
    let applied = support::eventually(PATIENCE, || {
        let mut admin = admin.clone();
        async move { demo_weights(&get_routes(&mut admin).await) == pairs([100, 0]) }
    })
    .await;
    assert!(applied, "the recreated config applies");
    assert_eq!(
        get_routes(&mut admin).await.generation,
        last_good.generation + 1,
        "nothing was published while the file was gone"
    );
    assert_eq!(infer(&mut client, "").await.model_version, "1");
    gateway.stop().await.expect("clean stop");
}

// ---- unloading -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unloading_a_weighted_version_needs_force_and_drops_no_request() {
    let gateway = support::start_embedded(DEMO_BOTH).await;
    let mut admin = gateway.admin().await;
    let mut client = gateway.client().await;
    let reference = reference(&mut client).await;
    let unload = |force: bool| UnloadVersionRequest {
        model: "demo".into(),
        version: "2".into(),
        force,
    };

    let status = admin
        .models()
        .unload_version(unload(false))
        .await
        .expect_err("demo/2 has weight 50");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("weight"), "{status:?}");
    assert_eq!(demo_weights(&get_routes(&mut admin).await), pairs([50, 50]));

    let load = Load::start(&gateway, &reference, 4, 0).await;
    load.wait_for(50).await;
    admin
        .models()
        .unload_version(unload(true))
        .await
        .expect("a forced unload works");
    let unloaded = Instant::now();
    load.wait_for(50).await;
    let samples = load.finish().await;
    assert_no_failures(&samples);
    let late: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.sent > unloaded && s.outcome.as_ref().is_ok_and(|(v, _)| v != "1"))
        .collect();
    assert!(
        late.is_empty(),
        "answered by demo/2 after its unload: {late:?}"
    );

    for _ in 0..50 {
        assert_eq!(infer(&mut client, "").await.model_version, "1");
    }
    assert_eq!(
        demo_weights(&get_routes(&mut admin).await),
        vec![("1".to_owned(), 50)]
    );
    let status = infer_error(&mut client, "2").await;
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    // Back again, then unloaded at weight 0: no force needed.
    admin
        .models()
        .load_version(VersionRequest {
            model: "demo".into(),
            version: "2".into(),
        })
        .await
        .expect("demo/2 loads again");
    set_demo(&mut admin, [100, 0]).await;
    assert_eq!(probabilities(&infer(&mut client, "2").await), reference[1]);
    admin
        .models()
        .unload_version(unload(false))
        .await
        .expect("a version with weight 0 unloads without force");
    assert_eq!(
        demo_weights(&get_routes(&mut admin).await),
        vec![("1".to_owned(), 100)]
    );
    let status = infer_error(&mut client, "2").await;
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(infer(&mut client, "").await.model_version, "1");
    gateway.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triton_repository_unload_and_load_remove_and_restore_a_model() {
    let routes = format!("[server]\nmodel_control = \"explicit\"\n\n{DEMO_BOTH}");
    let gateway = support::start_embedded(&routes).await;
    let mut client = gateway.client().await;
    let reference = reference(&mut client).await;
    let ready = |name: &str| ModelReadyRequest {
        name: name.into(),
        version: String::new(),
    };

    client
        .repository_model_unload(RepositoryModelUnloadRequest {
            model_name: "demo".into(),
            // demo has weight: only a forced unload takes it.
            parameters: HashMap::from([(
                "force".to_owned(),
                ModelRepositoryParameter {
                    parameter_choice: Some(model_repository_parameter::ParameterChoice::BoolParam(
                        true,
                    )),
                },
            )]),
            ..Default::default()
        })
        .await
        .expect("RepositoryModelUnload demo");
    let mut admin = gateway.admin().await;
    assert_eq!(
        demo_weights(&get_routes(&mut admin).await),
        [],
        "an unloaded model has no route"
    );
    for version in ["", "1", "2"] {
        let status = infer_error(&mut client, version).await;
        assert_eq!(
            status.code(),
            Code::NotFound,
            "version {version:?}: {status:?}"
        );
    }
    let demo_ready = client.model_ready(ready("demo")).await.expect("ModelReady");
    assert!(!demo_ready.into_inner().ready, "demo is unloaded");
    let fixed_ready = client
        .model_ready(ready("fixed"))
        .await
        .expect("ModelReady");
    assert!(fixed_ready.into_inner().ready, "other models stay");

    client
        .repository_model_load(RepositoryModelLoadRequest {
            model_name: "demo".into(),
            ..Default::default()
        })
        .await
        .expect("RepositoryModelLoad demo");
    // Loaded again, the model gets its configured route back.
    assert_eq!(
        demo_weights(&get_routes(&mut admin).await),
        pairs([50, 50]),
        "the routes after RepositoryModelLoad"
    );
    let demo_ready = client.model_ready(ready("demo")).await.expect("ModelReady");
    assert!(demo_ready.into_inner().ready, "demo is back");
    for (which, version) in ["1", "2"].into_iter().enumerate() {
        let response = infer(&mut client, version).await;
        assert_eq!(response.model_version, version);
        assert_eq!(probabilities(&response), reference[which]);
    }
    // The configured 50/50 split again: P(one version never answers 200) = 2^-199.
    let mut answered = BTreeSet::new();
    for _ in 0..200 {
        answered.insert(infer(&mut client, "").await.model_version);
    }
    assert_eq!(answered, BTreeSet::from(["1".to_owned(), "2".to_owned()]));
    gateway.stop().await.expect("clean stop");
}

/// An in-place save (truncate, then write) by a writer slower than the watcher's settle
/// time: the watcher must not apply the momentarily empty file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_place_save_never_applies_the_momentarily_empty_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let models = support::test_models();
    let path = dir.path().join("aviary.toml");
    replace_file(&path, config_text(&models, [100, 0], "initial").as_bytes());
    let gateway = support::start_gateway_from_file(&path, Mode::Embedded)
        .await
        .expect("gateway starts");
    let mut admin = gateway.admin().await;
    wait_for_watcher(&mut admin).await;
    let mut client = gateway.client().await;
    let before = get_routes(&mut admin).await;
    assert_eq!(demo_weights(&before), pairs([100, 0]));

    // The editor has truncated the file and not written yet: the watcher reads the
    // empty file (the status says so) and applies nothing.
    let mut file = std::fs::File::create(&path).expect("truncate the config in place");
    let noticed = support::eventually(PATIENCE, || {
        let admin = admin.clone();
        async move { admin.config_status().await.unreadable == "the file is empty" }
    })
    .await;
    assert!(noticed, "the watcher read the empty file");
    for _ in 0..20 {
        assert_eq!(
            infer(&mut client, "").await.model_version,
            "1",
            "demo/2 has weight 0 in every config ever written; routes now: {:?}",
            demo_weights(&get_routes(&mut admin).await)
        );
    }
    assert_eq!(
        get_routes(&mut admin).await,
        before,
        "the last good routes stay"
    );

    // The save completes: it applies.
    std::io::Write::write_all(
        &mut file,
        config_text(&models, [0, 100], "saved in place").as_bytes(),
    )
    .expect("write the config in place");
    drop(file);
    let applied = support::eventually(PATIENCE, || {
        let mut admin = admin.clone();
        async move { demo_weights(&get_routes(&mut admin).await) == pairs([0, 100]) }
    })
    .await;
    assert!(applied, "the completed in-place save applies");
    assert_eq!(
        get_routes(&mut admin).await.generation,
        before.generation + 1,
        "the completed save is the only change published: the empty file published nothing"
    );
    gateway.stop().await.expect("clean stop");
}

/// A config file with a typo'd key and a route to a version that does not exist: the
/// typo stops parsing and is reported as one line with its position; once it is fixed,
/// the route problem is reported with its path. The old routes serve throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_config_file_reports_the_typo_then_the_route_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let models = support::test_models();
    let path = dir.path().join("aviary.toml");
    replace_file(&path, config_text(&models, [50, 50], "initial").as_bytes());
    let gateway = support::start_gateway_from_file(&path, Mode::Embedded)
        .await
        .expect("gateway starts");
    let mut admin = gateway.admin().await;
    wait_for_watcher(&mut admin).await;
    let before = admin
        .routes()
        .get_routes(GetRoutesRequest {})
        .await
        .expect("routes")
        .into_inner();
    for (route, expected) in [
        (
            r#"{ version = "1", wieght = 50 }, { version = "9", weight = 50 }"#,
            "wieght",
        ),
        (
            r#"{ version = "1", weight = 50 }, { version = "9", weight = 50 }"#,
            "routes.demo.versions[1]",
        ),
    ] {
        replace_file(
            &path,
            format!(
                "{}[routes.demo]\nversions = [ {route} ]\n",
                repository_section(&models)
            )
            .as_bytes(),
        );
        let rejected = support::eventually(PATIENCE, || {
            let mut admin = admin.clone();
            async move {
                config_errors(&mut admin)
                    .await
                    .iter()
                    .any(|e| e.contains(expected))
            }
        })
        .await;
        let errors = config_errors(&mut admin).await;
        assert!(rejected, "{expected} is reported: {errors:?}");
        if expected == "wieght" {
            assert_eq!(errors.len(), 1, "one line for the syntax error: {errors:?}");
            assert!(
                errors[0].contains("line 8"),
                "the position is given: {errors:?}"
            );
        } else {
            assert!(
                errors.iter().any(|e| e.contains("\"9\"")),
                "the version is named: {errors:?}"
            );
        }
        let now = admin
            .routes()
            .get_routes(GetRoutesRequest {})
            .await
            .expect("routes")
            .into_inner();
        assert_eq!(
            now.generation, before.generation,
            "the old routes keep serving"
        );
    }
    gateway.stop().await.expect("clean stop");
}

/// `aviary serve --config` reads the file, loads the models (which can take long), then
/// starts watching. A change saved in between must still apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_change_written_while_the_gateway_starts_applies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let models = support::test_models();
    let path = dir.path().join("aviary.toml");
    replace_file(&path, config_text(&models, [50, 50], "initial").as_bytes());
    let config = aviary_gateway::Config::load(&path).expect("valid config");
    let gateway = aviary_gateway::Gateway::start(config, Mode::Embedded)
        .await
        .expect("gateway starts")
        .watch_config(path.clone());
    // Saved after the config was read, before the gateway serves (and watches).
    replace_file(
        &path,
        config_text(&models, [0, 100], "saved during startup").as_bytes(),
    );
    let gateway = support::serve_gateway(gateway)
        .await
        .expect("gateway serves");
    let mut admin = gateway.admin().await;
    // Three times the watcher's fallback poll interval (2 s), events aside.
    let applied = support::eventually(Duration::from_secs(6), || {
        let mut admin = admin.clone();
        async move { demo_weights(&get_routes(&mut admin).await) == pairs([0, 100]) }
    })
    .await;
    assert!(
        applied,
        "the file says demo 0/100, the gateway still routes {:?}",
        demo_weights(&get_routes(&mut admin).await)
    );
    gateway.stop().await.expect("clean stop");
}
