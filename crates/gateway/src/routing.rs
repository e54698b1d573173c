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
    backend::{Backend, InProcess, WorkerCalls},
    config::ShadowConfig,
    replicas::Replicas,
    route::{Route, Routes},
    shadow::Mirror,
    stack::{Guards, InferService, Limits, version_service},
};

/// What outlives routing snapshots: remote worker replica sets by endpoint list (so
/// a weight change never reconnects nor forgets ejections), shadow mirrors by model (their queues and comparisons
/// carry on), and each version's request-path state (its limits' semaphores and its
/// circuit breaker: a weight change resets neither).
#[derive(Debug, Default)]
pub struct Pools {
    /// Remote worker replica sets by their endpoint list.
    pub remotes: BTreeMap<String, Arc<dyn Backend>>,
    /// Shadow mirrors by model.
    pub mirrors: BTreeMap<String, Arc<Mirror>>,
    /// Request-path state by (model, version).
    pub guards: BTreeMap<(String, String), Arc<Guards>>,
}

/// What a snapshot is built from.
pub struct RoutingInputs<'a> {
    /// Explicit routes (config file and admin API).
    pub routes: &'a Routes,
    /// The embedded worker, if any.
    pub worker: Option<&'a Arc<Worker>>,
    /// Versions to leave out of every route (a version about to be unloaded).
    pub hidden: &'a BTreeSet<(String, String)>,
    /// How new remote clients call their workers.
    pub worker_calls: &'a WorkerCalls,
    /// The new snapshot's generation.
    pub generation: u64,
    /// Whether a version (model, version) may take an implicit route's unpinned
    /// traffic: with `[registry]`, only an approved one may.
    pub takes_unpinned: &'a dyn Fn(&str, &str) -> bool,
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
    services: BTreeMap<String, BTreeMap<String, InferService>>,
    guards: BTreeMap<(String, String), Arc<Guards>>,
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
            worker_calls,
            generation,
            takes_unpinned,
        } = inputs;
        let mut served = worker.map(|w| w.inventory()).unwrap_or_default();
        for (model, versions) in &mut served {
            versions.retain(|v| !hidden.contains(&(model.clone(), v.clone())));
        }
        let (routes, inventory) = with_implicit_routes(explicit, served, takes_unpinned);
        let table = check_routes(&routes, worker.is_some(), &inventory)?;

        let mut factory = BackendFactory {
            worker,
            remotes: &mut pools.remotes,
            used_remotes: BTreeSet::new(),
            worker_calls,
        };
        let mut guards = GuardPool {
            pool: &mut pools.guards,
            used: BTreeMap::new(),
        };
        let mut backends: BTreeMap<String, BTreeMap<String, Arc<dyn Backend>>> = BTreeMap::new();
        let mut services: BTreeMap<String, BTreeMap<String, InferService>> = BTreeMap::new();
        let mut shadows: BTreeMap<String, (ShadowConfig, InferService, Limits)> = BTreeMap::new();
        for (model, route) in &routes {
            for version in &route.versions {
                let backend = factory.backend(model, &version.version, &version.endpoints)?;
                let guards = guards.of(model, &version.version, route.limits_of(&version.version));
                let service = version_service(
                    model,
                    &version.version,
                    Arc::clone(&backend),
                    version.fault,
                    &guards,
                );
                backends
                    .entry(model.clone())
                    .or_default()
                    .insert(version.version.clone(), backend);
                services
                    .entry(model.clone())
                    .or_default()
                    .insert(version.version.clone(), service);
            }
            if let Some(shadow) = &route.shadow {
                let backend = factory
                    .backend(
                        model,
                        &shadow.version,
                        &Vec::from_iter(shadow.endpoint.clone()),
                    )
                    .map_err(|e| GatewayError::Config {
                        path: format!("routes.{model}.shadow.version"),
                        message: format!(
                            "shadow version \"{}\" cannot be served: {e}",
                            shadow.version
                        ),
                    })?;
                let limits = route.limits_of(&shadow.version);
                let guards = guards.of(model, &shadow.version, limits);
                let service =
                    version_service(model, &shadow.version, backend, shadow.fault, &guards);
                shadows.insert(model.clone(), (shadow.clone(), service, limits));
            }
        }
        // A remote no route uses any more is dropped with its connection; so is the
        // state of versions no route has any more.
        let used_remotes = factory.used_remotes;
        pools
            .remotes
            .retain(|endpoint, _| used_remotes.contains(endpoint));
        let used_guards = guards.used;
        pools.guards.clone_from(&used_guards);
        Ok(Routing {
            table,
            generation,
            routes,
            backends,
            services,
            guards: used_guards,
            mirrors: keep_mirrors(&mut pools.mirrors, shadows),
            worker: worker.cloned(),
            remotes: pools.remotes.values().cloned().collect(),
        })
    }

    /// The shadow mirror of `model`, if its route has one.
    pub fn mirror(&self, model: &str) -> Option<&Arc<Mirror>> {
        self.mirrors.get(model)
    }

    /// The request path of `model` at `version`.
    pub fn service(&self, model: &str, version: &str) -> Result<&InferService, GatewayError> {
        self.services
            .get(model)
            .and_then(|v| v.get(version))
            .ok_or_else(|| GatewayError::NoBackend {
                model: model.to_owned(),
                version: version.to_owned(),
            })
    }

    /// The request-path state of `model` at `version` (its breaker), if routed.
    pub fn guards(&self, model: &str, version: &str) -> Option<&Arc<Guards>> {
        self.guards.get(&(model.to_owned(), version.to_owned()))
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

/// Checks `routes` as [`Routing::build`] does before it makes any backend, and compiles
/// them: every version has an endpoint unless `embedded`, limits can work, each route
/// fits `inventory` (the versions that exist), every fallback is routable. Pure: no
/// I/O, so the fuzz targets run it on arbitrary routes.
pub fn check_routes(
    routes: &Routes,
    embedded: bool,
    inventory: &BTreeMap<String, BTreeSet<String>>,
) -> Result<RouteTable, GatewayError> {
    check_endpoints(routes, embedded)?;
    check_limits(routes)?;
    let specs: BTreeMap<String, RouteSpec> = routes
        .iter()
        .map(|(model, route)| (model.clone(), route.spec()))
        .collect();
    let table = RouteTable::compile(&specs, inventory)?;
    check_fallbacks(routes, &table)?;
    Ok(table)
}

/// Every fallback that names a version no route can serve.
fn check_fallbacks(routes: &Routes, table: &RouteTable) -> Result<(), GatewayError> {
    let problems: Vec<String> = routes
        .iter()
        .filter_map(|(model, route)| {
            let (target_model, target_version) = route.fallback.as_ref()?;
            let routable = table
                .route(target_model)
                .is_some_and(|r| r.versions().any(|(v, _)| v == target_version));
            match routable {
                false => Some(format!(
                    "routes.{model}.fallback: model \"{target_model}\" version \"{target_version}\" is not routable"
                )),
                true => None,
            }
        })
        .collect();
    match problems.is_empty() {
        true => Ok(()),
        false => Err(GatewayError::Config {
            path: "routes".into(),
            message: problems.join("\n"),
        }),
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
                .filter(|(_, v)| v.endpoints.is_empty())
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

/// Every route's limits can work (a queue with no place to run, a zero deadline).
fn check_limits(explicit: &Routes) -> Result<(), GatewayError> {
    let problems: Vec<String> = explicit
        .iter()
        .filter_map(|(model, route)| {
            let (path, reason) = route.check_limits().err()?;
            Some(format!("routes.{model}.{path}: {reason}"))
        })
        .collect();
    match problems.is_empty() {
        true => Ok(()),
        false => Err(GatewayError::Config {
            path: "routes".into(),
            message: problems.join("\n"),
        }),
    }
}

/// The explicit routes plus an implicit route for every model the embedded worker
/// `served` without one, and the versions each model can be routed to (`served`, or on
/// an endpoint). An implicit route's unpinned traffic goes to the newest version
/// `takes_unpinned` allows. Pure, so `aviary check-config` judges a file as a start
/// would.
pub fn with_implicit_routes(
    explicit: &Routes,
    mut served: BTreeMap<String, BTreeSet<String>>,
    takes_unpinned: &dyn Fn(&str, &str) -> bool,
) -> (Routes, BTreeMap<String, BTreeSet<String>>) {
    let mut routes = explicit.clone();
    served.retain(|_, versions| !versions.is_empty());
    let mut inventory = served;
    for (model, versions) in &inventory {
        if !routes.contains_key(model) {
            let route = Route::implicit(versions, |version| takes_unpinned(model, version));
            routes.insert(model.clone(), route);
        }
    }
    for (model, route) in explicit {
        for version in route.versions.iter().filter(|v| !v.endpoints.is_empty()) {
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
/// weight change never reconnects).
struct BackendFactory<'a> {
    worker: Option<&'a Arc<Worker>>,
    remotes: &'a mut BTreeMap<String, Arc<dyn Backend>>,
    used_remotes: BTreeSet<String>,
    worker_calls: &'a WorkerCalls,
}

impl BackendFactory<'_> {
    fn backend(
        &mut self,
        model: &str,
        version: &str,
        endpoints: &[String],
    ) -> Result<Arc<dyn Backend>, GatewayError> {
        Ok(match endpoints {
            [_, ..] => {
                let key = endpoints.join(",");
                self.used_remotes.insert(key.clone());
                match self.remotes.get(&key) {
                    Some(existing) => Arc::clone(existing),
                    None => {
                        let replicas: Arc<dyn Backend> =
                            Arc::new(Replicas::new(endpoints, self.worker_calls)?);
                        self.remotes.insert(key, Arc::clone(&replicas));
                        replicas
                    }
                }
            }
            [] => {
                let worker = self.worker.ok_or_else(|| GatewayError::NoBackend {
                    model: model.to_owned(),
                    version: version.to_owned(),
                })?;
                let slot = worker.slot(model, version)?;
                Arc::new(InProcess::new(Arc::clone(worker), slot))
            }
        })
    }
}

/// Each version's request-path state: the pool's when its limits are unchanged, fresh
/// state otherwise; `used` collects what the new snapshot keeps.
struct GuardPool<'a> {
    pool: &'a mut BTreeMap<(String, String), Arc<Guards>>,
    used: BTreeMap<(String, String), Arc<Guards>>,
}

impl GuardPool<'_> {
    fn of(&mut self, model: &str, version: &str, limits: Limits) -> Arc<Guards> {
        let key = (model.to_owned(), version.to_owned());
        let guards = match self.used.get(&key).or_else(|| self.pool.get(&key)) {
            Some(existing) if existing.limits() == limits => Arc::clone(existing),
            _ => Arc::new(Guards::new(limits)),
        };
        self.used.insert(key, Arc::clone(&guards));
        guards
    }
}

/// The mirrors of the new snapshot. Mirrors outlive snapshots (their queues and
/// comparisons carry on across weight changes): an unchanged shadow keeps its mirror
/// with the new backend; a changed shadow setting starts a fresh one.
fn keep_mirrors(
    pool: &mut BTreeMap<String, Arc<Mirror>>,
    shadows: BTreeMap<String, (ShadowConfig, InferService, Limits)>,
) -> BTreeMap<String, Arc<Mirror>> {
    pool.retain(|model, mirror| {
        shadows
            .get(model)
            .is_some_and(|(c, _, _)| c == mirror.config())
    });
    let mut mirrors = BTreeMap::new();
    for (model, (config, service, limits)) in shadows {
        let mirror = match pool.get(&model) {
            Some(existing) => {
                existing.set_service(service, limits);
                Arc::clone(existing)
            }
            None => Mirror::start(config, service, limits),
        };
        pool.insert(model.clone(), Arc::clone(&mirror));
        mirrors.insert(model, mirror);
    }
    mirrors
}
