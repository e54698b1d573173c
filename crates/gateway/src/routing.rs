//! The routing snapshot: the compiled route table together with the backend of every
//! routed version and the table's generation number. The gateway holds one behind an
//! `ArcSwap`, so each request sees one consistent table and set of backends; every
//! change builds and validates a whole new snapshot off the request path.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use aviary_router::{RouteSpec, RouteTable};
use aviary_worker::Worker;

use crate::{
    GatewayError,
    backend::{Backend, Faulty, InProcess, Remote},
    config::{FaultConfig, ShadowConfig},
    route::{Route, Routes},
    shadow::Mirror,
};

/// What outlives routing snapshots: remote worker clients by endpoint (so a weight
/// change never reconnects) and shadow mirrors by model (their queues and comparisons
/// carry on).
#[derive(Debug, Default)]
pub struct Pools {
    /// Remote worker clients by endpoint.
    pub remotes: BTreeMap<String, Arc<dyn Backend>>,
    /// Shadow mirrors by model.
    pub mirrors: BTreeMap<String, Arc<Mirror>>,
}

/// What a snapshot is built from.
#[derive(Debug)]
pub struct RoutingInputs<'a> {
    /// Explicit routes (config file and admin API).
    pub routes: &'a Routes,
    /// The embedded worker, if any.
    pub worker: Option<&'a Arc<Worker>>,
    /// Versions to leave out of every route (a version about to be unloaded).
    pub hidden: &'a BTreeSet<(String, String)>,
    /// Largest message for new remote clients.
    pub max_message_bytes: usize,
    /// The new snapshot's generation.
    pub generation: u64,
}

/// A compiled route table and the backends behind it.
#[derive(Debug)]
pub struct Routing {
    /// Which version serves which request.
    pub table: RouteTable,
    /// Increases with every applied change.
    pub generation: u64,
    /// The routes as configured, with implicit routes of unrouted embedded models.
    pub routes: Routes,
    backends: BTreeMap<String, BTreeMap<String, Arc<dyn Backend>>>,
    mirrors: BTreeMap<String, Arc<Mirror>>,
    worker: Option<Arc<Worker>>,
    remotes: Vec<Arc<dyn Backend>>,
}

impl Routing {
    /// Builds and validates a snapshot. With an embedded `worker`, versions without an
    /// `endpoint` run in-process, and every repository model without an explicit route
    /// gets one that sends unpinned traffic to its newest version and lets requests pin
    /// any loaded version. Every problem is reported, each with its path.
    pub fn build(inputs: RoutingInputs<'_>, pools: &mut Pools) -> Result<Routing, GatewayError> {
        let RoutingInputs {
            routes: explicit,
            worker,
            hidden,
            max_message_bytes,
            generation,
        } = inputs;
        check_endpoints(explicit, worker.is_some())?;
        let (routes, inventory) = with_implicit_routes(explicit, worker, hidden);
        let specs: BTreeMap<String, RouteSpec> = routes
            .iter()
            .map(|(model, route)| (model.clone(), route.spec()))
            .collect();
        let table = RouteTable::compile(&specs, &inventory)?;

        let mut factory = BackendFactory {
            worker,
            remotes: &mut pools.remotes,
            used_remotes: BTreeSet::new(),
            max_message_bytes,
        };
        let mut backends: BTreeMap<String, BTreeMap<String, Arc<dyn Backend>>> = BTreeMap::new();
        let mut shadows: BTreeMap<String, (ShadowConfig, Arc<dyn Backend>)> = BTreeMap::new();
        for (model, route) in &routes {
            for version in &route.versions {
                let backend = factory.backend(
                    model,
                    &version.version,
                    version.endpoint.as_ref(),
                    version.fault,
                )?;
                backends
                    .entry(model.clone())
                    .or_default()
                    .insert(version.version.clone(), backend);
            }
            if let Some(shadow) = &route.shadow {
                let backend = factory
                    .backend(
                        model,
                        &shadow.version,
                        shadow.endpoint.as_ref(),
                        shadow.fault,
                    )
                    .map_err(|e| GatewayError::Config {
                        path: format!("routes.{model}.shadow.version"),
                        message: format!(
                            "shadow version \"{}\" cannot be served: {e}",
                            shadow.version
                        ),
                    })?;
                shadows.insert(model.clone(), (shadow.clone(), backend));
            }
        }
        // A remote no route uses any more is dropped with its connection.
        let used_remotes = factory.used_remotes;
        pools
            .remotes
            .retain(|endpoint, _| used_remotes.contains(endpoint));
        Ok(Routing {
            table,
            generation,
            routes,
            backends,
            mirrors: keep_mirrors(&mut pools.mirrors, shadows),
            worker: worker.cloned(),
            remotes: pools.remotes.values().cloned().collect(),
        })
    }

    /// The shadow mirror of `model`, if its route has one.
    pub fn mirror(&self, model: &str) -> Option<&Arc<Mirror>> {
        self.mirrors.get(model)
    }

    /// The backend serving `model` at `version`.
    pub fn backend(&self, model: &str, version: &str) -> Result<&Arc<dyn Backend>, GatewayError> {
        self.backends
            .get(model)
            .and_then(|v| v.get(version))
            .ok_or_else(|| GatewayError::NoBackend {
                model: model.to_owned(),
                version: version.to_owned(),
            })
    }

    /// The version that answers metadata and config questions about a model when the
    /// caller names none: the one with the largest share (the first on a tie).
    pub fn primary_version(&self, model: &str) -> Option<&str> {
        let route = self.table.route(model)?;
        let mut best: Option<(&str, u32)> = None;
        for (version, weight) in route.versions() {
            if best.is_none_or(|(_, w)| weight > w) {
                best = Some((version, weight));
            }
        }
        best.map(|(v, _)| v)
    }

    /// The weight of `model` at `version` in the table (0 when not routed).
    pub fn weight(&self, model: &str, version: &str) -> u32 {
        self.table
            .route(model)
            .and_then(|r| r.weight(version))
            .unwrap_or(0)
    }

    /// Every (model, version) the table routes, in order.
    pub fn routed_versions(&self) -> impl Iterator<Item = (&str, &str)> {
        self.table
            .models()
            .filter_map(|m| self.table.route(m).map(|r| (m, r)))
            .flat_map(|(m, r)| r.versions().map(move |(v, _)| (m, v)))
    }

    /// The embedded worker, if any.
    pub fn worker(&self) -> Option<&Arc<Worker>> {
        self.worker.as_ref()
    }

    /// Each remote worker the table routes to, once.
    pub fn remotes(&self) -> &[Arc<dyn Backend>] {
        &self.remotes
    }
}

/// Every explicit version without an endpoint, when there is no embedded worker to run
/// it.
fn check_endpoints(explicit: &Routes, embedded: bool) -> Result<(), GatewayError> {
    if embedded {
        return Ok(());
    }
    let missing: Vec<String> = explicit
        .iter()
        .flat_map(|(model, route)| {
            route
                .versions
                .iter()
                .enumerate()
                .filter(|(_, v)| v.endpoint.is_none())
                .map(move |(i, _)| {
                    format!(
                        "routes.{model}.versions[{i}].endpoint: required, since `aviary gateway` has no embedded worker \
                         (use `aviary serve` with a [repository] to run models in-process)"
                    )
                })
        })
        .collect();
    match missing.is_empty() {
        true => Ok(()),
        false => Err(GatewayError::Config {
            path: "routes".into(),
            message: missing.join("\n"),
        }),
    }
}

/// The explicit routes plus an implicit route for every embedded model without one,
/// and the versions each model can be routed to (loaded in the worker, or on an
/// endpoint); `hidden` versions are left out of both.
fn with_implicit_routes(
    explicit: &Routes,
    worker: Option<&Arc<Worker>>,
    hidden: &BTreeSet<(String, String)>,
) -> (Routes, BTreeMap<String, BTreeSet<String>>) {
    let mut routes = explicit.clone();
    let mut inventory = worker.map(|w| w.inventory()).unwrap_or_default();
    for (model, versions) in &mut inventory {
        versions.retain(|v| !hidden.contains(&(model.clone(), v.clone())));
    }
    inventory.retain(|_, versions| !versions.is_empty());
    for (model, versions) in &inventory {
        if !routes.contains_key(model) {
            routes.insert(model.clone(), Route::implicit(versions));
        }
    }
    for (model, route) in explicit {
        for version in route.versions.iter().filter(|v| v.endpoint.is_some()) {
            inventory
                .entry(model.clone())
                .or_default()
                .insert(version.version.clone());
        }
    }
    (routes, inventory)
}

/// Makes the backend of each routed version: the embedded worker's slot, or a remote
/// worker client shared by every version on that endpoint (kept across snapshots, so a
/// weight change never reconnects), wrapped in fault injection when configured.
struct BackendFactory<'a> {
    worker: Option<&'a Arc<Worker>>,
    remotes: &'a mut BTreeMap<String, Arc<dyn Backend>>,
    used_remotes: BTreeSet<String>,
    max_message_bytes: usize,
}

impl BackendFactory<'_> {
    fn backend(
        &mut self,
        model: &str,
        version: &str,
        endpoint: Option<&String>,
        fault: Option<FaultConfig>,
    ) -> Result<Arc<dyn Backend>, GatewayError> {
        let backend: Arc<dyn Backend> = match endpoint {
            Some(endpoint) => {
                self.used_remotes.insert(endpoint.clone());
                match self.remotes.get(endpoint) {
                    Some(existing) => Arc::clone(existing),
                    None => {
                        let remote: Arc<dyn Backend> =
                            Arc::new(Remote::connect_lazy(endpoint, self.max_message_bytes)?);
                        self.remotes.insert(endpoint.clone(), Arc::clone(&remote));
                        remote
                    }
                }
            }
            None => {
                let worker = self.worker.ok_or_else(|| GatewayError::NoBackend {
                    model: model.to_owned(),
                    version: version.to_owned(),
                })?;
                let slot = worker.slot(model, version)?;
                Arc::new(InProcess::new(Arc::clone(worker), slot))
            }
        };
        Ok(match fault {
            Some(fault) => Arc::new(Faulty::new(backend, fault)),
            None => backend,
        })
    }
}

/// The mirrors of the new snapshot. Mirrors outlive snapshots (their queues and
/// comparisons carry on across weight changes): an unchanged shadow keeps its mirror
/// with the new backend; a changed shadow setting starts a fresh one.
fn keep_mirrors(
    pool: &mut BTreeMap<String, Arc<Mirror>>,
    shadows: BTreeMap<String, (ShadowConfig, Arc<dyn Backend>)>,
) -> BTreeMap<String, Arc<Mirror>> {
    pool.retain(|model, mirror| {
        shadows
            .get(model)
            .is_some_and(|(c, _)| c == mirror.config())
    });
    let mut mirrors = BTreeMap::new();
    for (model, (config, backend)) in shadows {
        let mirror = match pool.get(&model) {
            Some(existing) => {
                existing.set_backend(backend);
                Arc::clone(existing)
            }
            None => Mirror::start(config, backend),
        };
        pool.insert(model.clone(), Arc::clone(&mirror));
        mirrors.insert(model, mirror);
    }
    mirrors
}
