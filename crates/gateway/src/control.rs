//! Live changes to a running gateway: routes (admin API and config file), model
//! versions of the embedded worker (load, reload, unload), and repository syncs.
//!
//! Writers are serialised by one async mutex; every change builds a whole new routing
//! snapshot, validates it, and publishes it with one `ArcSwap` store, so requests never
//! wait and never see half a change. A change that fails validation publishes nothing.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use aviary_worker::{LoadOutcome, SyncReport, Worker, WorkerError};

use crate::{
    GatewayError,
    config::{Config, RouteConfig},
    routing::{Pools, Routing, RoutingInputs},
};

/// Whether the last config file change applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigStatus {
    /// The watched file.
    pub path: String,
    /// When the file last applied (ms since the epoch; 0: never).
    pub applied_at_ms: u64,
    /// Errors of the last rejected change; empty once a change applies.
    pub errors: Vec<String>,
    /// When a change was last rejected (ms since the epoch; 0: never).
    pub rejected_at_ms: u64,
}

#[derive(Debug)]
struct Writer {
    routes: BTreeMap<String, RouteConfig>,
    pools: Pools,
}

/// The gateway's live state and every way to change it.
#[derive(Debug)]
pub struct Control {
    routing: Arc<ArcSwap<Routing>>,
    worker: Option<Arc<Worker>>,
    max_message_bytes: usize,
    writer: tokio::sync::Mutex<Writer>,
    config_status: Mutex<ConfigStatus>,
}

impl Control {
    /// Builds the first routing snapshot (generation 1) from `config`.
    pub fn new(config: &Config, worker: Option<Arc<Worker>>) -> Result<Control, GatewayError> {
        let mut pools = Pools::default();
        let routing = Routing::build(
            RoutingInputs {
                routes: &config.routes,
                worker: worker.as_ref(),
                hidden: &BTreeSet::new(),
                max_message_bytes: config.server.max_message_bytes,
                generation: 1,
            },
            &mut pools,
        )?;
        Ok(Control {
            routing: Arc::new(ArcSwap::from_pointee(routing)),
            worker,
            max_message_bytes: config.server.max_message_bytes,
            writer: tokio::sync::Mutex::new(Writer {
                routes: config.routes.clone(),
                pools,
            }),
            config_status: Mutex::new(ConfigStatus::default()),
        })
    }

    /// The routing snapshot requests read.
    pub fn routing(&self) -> &Arc<ArcSwap<Routing>> {
        &self.routing
    }

    /// The embedded worker, if any.
    pub fn worker(&self) -> Option<&Arc<Worker>> {
        self.worker.as_ref()
    }

    /// Replaces one model's route. With `expected_generation`, applies only if the table
    /// is still at that generation. Returns the new generation.
    pub async fn set_route(
        &self,
        model: &str,
        route: RouteConfig,
        expected_generation: Option<u64>,
    ) -> Result<u64, GatewayError> {
        let mut writer = self.writer.lock().await;
        let current = self.routing.load().generation;
        if let Some(expected) = expected_generation.filter(|&e| e != current) {
            return Err(GatewayError::GenerationMismatch { expected, current });
        }
        let mut routes = writer.routes.clone();
        let mut route = route;
        // The admin API sets versions and weights; a route's sticky key, match rules,
        // shadow and injected faults (config file) stay as they are.
        if let Some(existing) = routes.get(model) {
            route.sticky = route.sticky.or_else(|| existing.sticky.clone());
            route.shadow = route.shadow.or_else(|| existing.shadow.clone());
            if route.rules.is_empty() {
                route.rules = existing.rules.clone();
            }
            for version in &mut route.versions {
                let configured = existing
                    .versions
                    .iter()
                    .find(|v| v.version == version.version);
                version.fault = version.fault.or_else(|| configured.and_then(|v| v.fault));
            }
        }
        routes.insert(model.to_owned(), route);
        self.publish(&mut writer, routes, &BTreeSet::new())
    }

    /// Replaces every explicit route (a config file change). Returns the new generation.
    pub async fn replace_routes(
        &self,
        routes: BTreeMap<String, RouteConfig>,
    ) -> Result<u64, GatewayError> {
        let mut writer = self.writer.lock().await;
        if routes == writer.routes {
            return Ok(self.routing.load().generation);
        }
        self.publish(&mut writer, routes, &BTreeSet::new())
    }

    /// Loads (or reloads) a version of the embedded worker; routes are rebuilt so a
    /// new version can be routed (and, unrouted, is pinnable at once).
    pub async fn load_version(
        &self,
        model: &str,
        version: &str,
    ) -> Result<(LoadOutcome, u64), GatewayError> {
        let worker = self.embedded()?;
        let number = version_number(model, version)?;
        // Loading can take long; route changes need not wait for it.
        let outcome = worker.load_version(model, number).await?;
        let mut writer = self.writer.lock().await;
        let routes = writer.routes.clone();
        let generation = self.publish(&mut writer, routes, &BTreeSet::new())?;
        Ok((outcome, generation))
    }

    /// Loads a running version's file again and swaps it in; routes do not change.
    pub async fn reload_version(
        &self,
        model: &str,
        version: &str,
    ) -> Result<LoadOutcome, GatewayError> {
        let worker = self.embedded()?;
        let number = version_number(model, version)?;
        // The slot stays the same, so routes are untouched and need no lock.
        Ok(worker.reload_version(model, number).await?)
    }

    /// Unloads a version of the embedded worker. A version with weight is refused
    /// unless `force`, which first publishes routes without it (the version is removed
    /// from its explicit route); requests already on it finish.
    pub async fn unload_version(
        &self,
        model: &str,
        version: &str,
        force: bool,
    ) -> Result<u64, GatewayError> {
        let worker = self.embedded()?;
        let number = version_number(model, version)?;
        worker.slot(model, version)?;
        let mut writer = self.writer.lock().await;
        let weight = self.routing.load().weight(model, version);
        if weight > 0 && !force {
            return Err(GatewayError::Refused(format!(
                "model \"{model}\" version \"{version}\" has weight {weight}; set its weight to 0 first, or force the unload \
                 (which removes it from the route)"
            )));
        }
        let mut routes = writer.routes.clone();
        if let Some(route) = routes.get_mut(model) {
            route.versions.retain(|v| v.version != version);
            if route.versions.is_empty() {
                routes.remove(model);
            } else if route.versions.iter().all(|v| v.weight == 0) {
                return Err(GatewayError::Refused(format!(
                    "model \"{model}\" version \"{version}\" is the only version of its route with weight; give \
                     another version weight first (aviary ctl set-weights)"
                )));
            }
        }
        let hidden = BTreeSet::from([(model.to_owned(), version.to_owned())]);
        self.publish(&mut writer, routes.clone(), &hidden)?;
        worker.unload_version(model, number).await?;
        self.publish(&mut writer, routes, &BTreeSet::new())
    }

    /// Triton's RepositoryModelLoad on the embedded worker: load or reload the model's
    /// versions as its policy says, then rebuild the routes.
    pub async fn load_model(&self, model: &str) -> Result<u64, GatewayError> {
        let worker = self.embedded()?;
        let mut writer = self.writer.lock().await;
        let routing = self.routing.load_full();
        let may_unload = |m: &str, v: u64| routing.weight(m, &v.to_string()) == 0;
        let result = worker.load_model(model, &may_unload).await;
        let routes = writer.routes.clone();
        let mut generation = self.publish_keeping(&mut writer, routes)?;
        if let Ok(report) = &result {
            generation = self
                .release_kept(&mut writer, worker, &report.kept)
                .await?
                .unwrap_or(generation);
        }
        result.map(|_| generation).map_err(Into::into)
    }

    /// Triton's RepositoryModelUnload: removes the model's route, then unloads it.
    pub async fn unload_model(&self, model: &str) -> Result<u64, GatewayError> {
        let worker = self.embedded()?;
        worker.slot(model, "")?;
        let mut writer = self.writer.lock().await;
        let mut routes = writer.routes.clone();
        routes.remove(model);
        let hidden: BTreeSet<(String, String)> = worker
            .versions(model)
            .into_iter()
            .map(|v| (model.to_owned(), v))
            .collect();
        self.publish(&mut writer, routes.clone(), &hidden)?;
        worker.unload_model(model).await?;
        self.publish(&mut writer, routes, &BTreeSet::new())
    }

    /// Syncs the embedded worker with its repository (watch mode); versions that still
    /// have weight are kept even when their folder is gone.
    pub async fn sync_repository(
        &self,
        unsettled: &BTreeSet<(String, u64)>,
    ) -> Result<SyncReport, GatewayError> {
        let worker = self.embedded()?;
        let mut writer = self.writer.lock().await;
        let routing = self.routing.load_full();
        let may_unload = |m: &str, v: u64| routing.weight(m, &v.to_string()) == 0;
        let report = worker.sync(None, unsettled, &may_unload).await?;
        if report.changed_inventory() {
            let routes = writer.routes.clone();
            self.publish_keeping(&mut writer, routes)?;
        }
        self.release_kept(&mut writer, worker, &report.kept).await?;
        Ok(report)
    }

    /// A sync keeps versions that had weight when it started; the routes it publishes
    /// can take that weight away (a new newest version takes over an implicit route).
    /// Unloads those now-unweighted versions; returns the new generation if any went.
    async fn release_kept(
        &self,
        writer: &mut Writer,
        worker: &Worker,
        kept: &[(String, u64)],
    ) -> Result<Option<u64>, GatewayError> {
        let routing = self.routing.load_full();
        let free: Vec<&(String, u64)> = kept
            .iter()
            .filter(|(model, version)| routing.weight(model, &version.to_string()) == 0)
            // A version an explicit route names (even at weight 0) is the operator's to remove.
            .filter(|(model, version)| {
                let version = version.to_string();
                !writer
                    .routes
                    .get(model)
                    .is_some_and(|r| r.versions.iter().any(|v| v.version == version))
            })
            .collect();
        if free.is_empty() {
            return Ok(None);
        }
        let hidden: BTreeSet<(String, String)> = free
            .iter()
            .map(|(m, v)| (m.clone(), v.to_string()))
            .collect();
        let routes = writer.routes.clone();
        self.publish(writer, routes.clone(), &hidden)?;
        for (model, version) in free {
            worker.unload_version(model, *version).await?;
        }
        self.publish_keeping(writer, routes).map(Some)
    }

    /// The status of the watched config file.
    pub fn config_status(&self) -> ConfigStatus {
        self.config_status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Names the config file being watched.
    pub fn watching_config(&self, path: &str) {
        if let Ok(mut status) = self.config_status.lock() {
            status.path = path.to_owned();
            status.applied_at_ms = now_ms();
        }
    }

    /// Records the outcome of applying the config file.
    pub fn record_config(&self, path: &str, errors: Vec<String>) {
        if let Ok(mut status) = self.config_status.lock() {
            status.path = path.to_owned();
            if errors.is_empty() {
                status.applied_at_ms = now_ms();
                status.errors.clear();
            } else {
                status.rejected_at_ms = now_ms();
                status.errors = errors;
            }
        }
    }

    fn embedded(&self) -> Result<&Arc<Worker>, GatewayError> {
        self.worker.as_ref().ok_or_else(|| {
            GatewayError::Refused(
                "this gateway has no embedded worker (aviary gateway); load and unload on the worker servers".into(),
            )
        })
    }

    /// Builds, validates and stores a snapshot of `routes`; on success they become the
    /// explicit routes.
    fn publish(
        &self,
        writer: &mut Writer,
        routes: BTreeMap<String, RouteConfig>,
        hidden: &BTreeSet<(String, String)>,
    ) -> Result<u64, GatewayError> {
        let generation = self.routing.load().generation + 1;
        let routing = Routing::build(
            RoutingInputs {
                routes: &routes,
                worker: self.worker.as_ref(),
                hidden,
                max_message_bytes: self.max_message_bytes,
                generation,
            },
            &mut writer.pools,
        )?;
        self.routing.store(Arc::new(routing));
        writer.routes = routes;
        Ok(generation)
    }

    /// Like [`Control::publish`], after the worker's versions changed underneath: if an
    /// explicit route now names a version that is gone, the routes are kept as they
    /// were and the error reported (the worker only unloads unweighted versions, so
    /// this means a weight-0 version left a route).
    fn publish_keeping(
        &self,
        writer: &mut Writer,
        routes: BTreeMap<String, RouteConfig>,
    ) -> Result<u64, GatewayError> {
        match self.publish(writer, routes.clone(), &BTreeSet::new()) {
            Ok(generation) => Ok(generation),
            Err(error) => {
                // Drop versions that no longer exist from explicit routes, keeping weights.
                let inventory = self
                    .worker
                    .as_ref()
                    .map(|w| w.inventory())
                    .unwrap_or_default();
                let pruned: BTreeMap<String, RouteConfig> = routes
                    .into_iter()
                    .filter_map(|(model, mut route)| {
                        route.versions.retain(|v| {
                            v.endpoint.is_some()
                                || inventory
                                    .get(&model)
                                    .is_some_and(|set| set.contains(&v.version))
                        });
                        (!route.versions.is_empty()).then_some((model, route))
                    })
                    .collect();
                tracing::warn!(%error, "routes named versions that are gone; removing them from their routes");
                self.publish(writer, pruned, &BTreeSet::new())
            }
        }
    }
}

fn version_number(model: &str, version: &str) -> Result<u64, GatewayError> {
    version.parse().map_err(|_| {
        GatewayError::Worker(WorkerError::UnknownVersion {
            model: model.to_owned(),
            version: version.to_owned(),
            available: "numeric repository versions".to_owned(),
        })
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
