//! Live changes to a running gateway: routes (admin API and config file), model
//! versions of the embedded worker (load, reload, unload), and repository syncs.
//!
//! Writers are serialised by one async mutex; every change builds a whole new routing
//! snapshot, validates it, and publishes it with one `ArcSwap` store, so requests never
//! wait and never see half a change. A change that fails validation publishes nothing.
//!
//! Who owns a route's weights:
//! - the config file, per model: a file change applies to the models whose route in
//!   the file changed, so an edit to one model never undoes live changes to another;
//! - the admin API (`SetRoute`), until the file changes that model's route again;
//! - a running rollout, above both: while it runs, its canary and baseline weights are
//!   held; a file edit to that model's weights is reported in the config status as held,
//!   and `SetRoute` that would change them is refused. When the rollout ends its final
//!   weights become the route's own;
//! - a bandit policy (`routes.<model>.bandit`), between the route's own weights and a
//!   rollout's: its learnt weights lie over the configured ones (see [`bandit`]).

mod bandit;

pub use bandit::{BanditApplied, BanditRoute};

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use arc_swap::ArcSwap;
use aviary_worker::{LoadOutcome, SyncReport, Worker, WorkerError, registry::Stage};

use crate::{
    GatewayError,
    audit::{Audit, Kind},
    backend::WorkerCalls,
    bandit::driver::Bandits,
    config::Config,
    defaults::Defaults,
    registry::{StageRecord, StageRegistry},
    route::{Route, RouteVersion, Routes},
    routing::{Pools, Routing, RoutingInputs},
};

/// The stage `model` `version`'s card declares, when the embedded worker has it loaded.
fn declared_stage(worker: Option<&Arc<Worker>>, model: &str, version: &str) -> Option<StageRecord> {
    let loaded = worker?.slot(model, version).ok()?.current();
    let card = loaded.card.as_ref()?;
    let stage = card.stage?;
    let approval = card.approval.clone().unwrap_or_default();
    Some(StageRecord {
        stage,
        by: match approval.by.is_empty() {
            true => "model card".to_owned(),
            false => approval.by,
        },
        at_ms: 0,
        note: approval.note,
    })
}

/// Whether `model` `version` may take unpinned traffic past the canary cap: any
/// version without a registry, an approved or production one with it.
fn takes_unpinned(
    registry: Option<&StageRegistry>,
    worker: Option<&Arc<Worker>>,
    model: &str,
    version: &str,
) -> bool {
    registry.is_none_or(|registry| {
        registry
            .stage(model, version, declared_stage(worker, model, version))
            .stage
            .may_take_traffic()
    })
}

/// At start, for each model the config file routes past the cap and the registry has
/// no stage for: its weighted versions whose cards state no stage are approved by
/// `config-file`. They are what ran before `[registry]` was turned on (or before a
/// memory-only registry restarted); once the registry has a stage for a model, its
/// weights in the file are judged like any change.
fn adopt_configured(
    registry: &StageRegistry,
    worker: Option<&Arc<Worker>>,
    configured: &Routes,
    audit: &Audit,
) -> Result<(), GatewayError> {
    for (model, route) in configured {
        if !registry.versions(model).is_empty() {
            continue;
        }
        let weights = route_weights(route);
        let stage_of = |version: &str| {
            registry
                .stage(model, version, declared_stage(worker, model, version))
                .stage
        };
        if crate::registry::check_weights(model, &weights, registry.cap_percent(), stage_of).is_ok()
        {
            continue;
        }
        for (version, _) in weights.iter().filter(|(_, weight)| *weight > 0) {
            if declared_stage(worker, model, version).is_some() {
                continue;
            }
            let before = registry.stage(model, version, None);
            let after = StageRecord {
                stage: Stage::Approved,
                by: "config-file".to_owned(),
                at_ms: aviary::unix_ms(SystemTime::now()),
                note: "routed by the config file at start, before the registry had a stage for \
                       this model"
                    .to_owned(),
            };
            registry.set(model, version, after.clone())?;
            tracing::warn!(
                model,
                version,
                "[registry]: approved as the config file routes it (the registry had no stage for this model)"
            );
            record_stage(audit, model, version, &before, &after);
        }
    }
    Ok(())
}

/// Records a stage change in the audit trail, before and after, as done by whoever
/// the new stage names.
fn record_stage(
    audit: &Audit,
    model: &str,
    version: &str,
    before: &StageRecord,
    after: &StageRecord,
) {
    let mut record = Audit::record_of(Kind::Model, after.stage.name()).about(model, Some(version));
    record.actor = after.by.clone();
    record.before = Some(serde_json::json!({ "stage": before.stage.name() }));
    record.after = Some(serde_json::json!({ "stage": after.stage.name(), "note": after.note }));
    audit.record(record);
}

/// A route's versions and weights, in order.
fn route_weights(route: &Route) -> Vec<(String, u32)> {
    route
        .versions
        .iter()
        .map(|v| (v.version.clone(), v.weight))
        .collect()
}

/// Checks every route's weights against the registry's cap (see
/// [`crate::registry::check_weights`]).
fn check_stages(
    registry: &StageRegistry,
    worker: Option<&Arc<Worker>>,
    routes: &Routes,
    models: &BTreeSet<String>,
) -> Result<(), GatewayError> {
    for (model, route) in routes.iter().filter(|(model, _)| models.contains(*model)) {
        let weights = route_weights(route);
        crate::registry::check_weights(model, &weights, registry.cap_percent(), |version| {
            registry
                .stage(model, version, declared_stage(worker, model, version))
                .stage
        })?;
    }
    Ok(())
}

/// The models whose versions or weights differ between `before` and `after`.
fn moved_models(before: &Routes, after: &Routes) -> BTreeSet<String> {
    let weights = |route: Option<&Route>| route.map(route_weights).unwrap_or_default();
    before
        .keys()
        .chain(after.keys())
        .filter(|model| weights(before.get(*model)) != weights(after.get(*model)))
        .cloned()
        .collect()
}

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
    /// What of the applied file is not in force as written, each with its path.
    pub notes: Vec<String>,
    /// Why the file cannot be used right now (deleted, unreadable, empty); empty when
    /// the watcher last read it fine.
    pub unreadable: String,
    /// Since when it has been so (ms since the epoch; 0 when readable).
    pub unreadable_since_ms: u64,
}

/// How the watched config file's changes went since start-up, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConfigCounts {
    /// Changes that applied.
    pub applied: u64,
    /// Changes that were rejected (the last good config kept serving).
    pub rejected: u64,
    /// Whether the last change read applied (true before any change).
    pub last_applied: bool,
    /// Whether the file could be read at the last look (not deleted, not empty).
    pub readable: bool,
}

/// The watched config file: its status and the routes it last gave.
#[derive(Debug, Default)]
struct FileState {
    status: ConfigStatus,
    /// Changes applied and rejected since start-up.
    applied: u64,
    rejected: u64,
    /// The file's routes as last applied (the ones the gateway started with at first).
    routes: Routes,
}

/// The weights a rollout gives its model's route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutWeights {
    /// The version being rolled out.
    pub canary: String,
    /// Its weight, 0 to 100.
    pub canary_weight: u32,
    /// The version serving before the rollout.
    pub baseline: String,
    /// Its weight, 0 to 100.
    pub baseline_weight: u32,
}

impl RolloutWeights {
    /// `route` with these weights: the canary first (so sticky users only ever move
    /// into it as it grows), the baseline second, every other version kept pinnable at
    /// weight 0. Endpoints, faults, sticky key, rules and shadow stay as they are.
    pub fn apply_to(&self, route: &Route) -> Route {
        let mut versions = route.versions.clone();
        let mut take = |version: &str, weight: u32| {
            let mut found = match versions.iter().position(|v| v.version == version) {
                Some(i) => versions.remove(i),
                None => RouteVersion::new(version, 0),
            };
            found.weight = weight;
            found
        };
        let mut ordered = vec![
            take(&self.canary, self.canary_weight),
            take(&self.baseline, self.baseline_weight),
        ];
        for mut other in versions {
            other.weight = 0;
            ordered.push(other);
        }
        Route {
            versions: ordered,
            ..route.clone()
        }
    }

    /// Whether `route` gives any version another weight than these (the order of the
    /// versions aside).
    fn differ_from(&self, route: &Route) -> bool {
        let held = self.apply_to(route);
        let weight = |route: &Route, version: &str| {
            route
                .versions
                .iter()
                .find(|v| v.version == version)
                .map(|v| v.weight)
        };
        held.versions
            .iter()
            .any(|v| weight(route, &v.version) != Some(v.weight))
    }

    /// `canary "2" at 20, baseline "1" at 80`.
    fn describe(&self) -> String {
        format!(
            "canary \"{}\" at {}, baseline \"{}\" at {}",
            self.canary, self.canary_weight, self.baseline, self.baseline_weight
        )
    }
}

/// How long a rollout holds its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    /// While the rollout runs. With a lease the hold ends by itself when it is not
    /// renewed in time (a controller that stopped without ending its rollout); the
    /// weights then stay as the route's own.
    Running {
        /// How long the hold lasts unless set again; `None`: until the rollout ends.
        lease: Option<Duration>,
    },
    /// The rollout ended: the weights become the route's own and the hold is released.
    Ended,
}

/// Weights a running rollout holds, and until when.
#[derive(Debug, Clone)]
struct Hold {
    weights: RolloutWeights,
    expires: Option<Instant>,
}

#[derive(Debug)]
struct Writer {
    /// The routes before rollout holds: the file's, with admin changes and finished
    /// rollouts' weights on top.
    routes: Routes,
    /// Weights of running rollouts, by model.
    holds: BTreeMap<String, Hold>,
    /// Weights bandit policies chose, by model: each arm's, over the route's own.
    bandit: BTreeMap<String, Vec<(String, u32)>>,
    pools: Pools,
}

/// The gateway's live state and every way to change it.
#[derive(Debug)]
pub struct Control {
    routing: Arc<ArcSwap<Routing>>,
    worker: Option<Arc<Worker>>,
    worker_calls: WorkerCalls,
    writer: tokio::sync::Mutex<Writer>,
    file: Mutex<FileState>,
    /// The last readiness check of each routed version: up or not.
    health: Mutex<BTreeMap<(String, String), bool>>,
    /// Default predictions of the versions whose route opts in.
    defaults: Defaults,
    /// The canary of each model whose weights a running rollout holds, copied from
    /// the writer's holds whenever they change: `/metrics` reads it without that lock.
    canaries: Mutex<BTreeMap<String, String>>,
    /// Where every change is recorded, with who made it.
    audit: Audit,
    /// The approval workflow, when `[registry]` is set.
    registry: Option<Arc<StageRegistry>>,
    /// The bandit routes' policies and the sticky users they placed.
    bandits: Bandits,
}

impl Control {
    /// Builds the first routing snapshot (generation 1) from `config`; every change
    /// (routes, versions, stages) is recorded in `audit`.
    pub fn new(
        config: &Config,
        worker: Option<Arc<Worker>>,
        audit: Audit,
    ) -> Result<Control, GatewayError> {
        let mut pools = Pools::default();
        let routes = Route::all_from(&config.routes);
        let registry = config
            .registry
            .as_ref()
            .map(|r| StageRegistry::open(r.canary_cap_percent, r.state_file.clone()))
            .transpose()?
            .map(Arc::new);
        let worker_calls = WorkerCalls::from_config(config)?;
        if let Some(registry) = &registry {
            adopt_configured(registry, worker.as_ref(), &routes, &audit)?;
        }
        let routing = Routing::build(
            RoutingInputs {
                routes: &routes,
                worker: worker.as_ref(),
                hidden: &BTreeSet::new(),
                worker_calls: &worker_calls,
                generation: 1,
                takes_unpinned: &|model, version| {
                    takes_unpinned(registry.as_deref(), worker.as_ref(), model, version)
                },
            },
            &mut pools,
        )?;
        if let Some(registry) = &registry {
            let every: BTreeSet<String> = routing.routes.keys().cloned().collect();
            check_stages(registry, worker.as_ref(), &routing.routes, &every)?;
        }
        Ok(Control {
            routing: Arc::new(ArcSwap::from_pointee(routing)),
            worker,
            worker_calls,
            writer: tokio::sync::Mutex::new(Writer {
                routes: routes.clone(),
                holds: BTreeMap::new(),
                bandit: BTreeMap::new(),
                pools,
            }),
            file: Mutex::new(FileState {
                routes,
                ..FileState::default()
            }),
            health: Mutex::new(BTreeMap::new()),
            defaults: Defaults::default(),
            canaries: Mutex::new(BTreeMap::new()),
            audit,
            registry,
            bandits: Bandits::new(config.rollouts.controlled),
        })
    }

    /// The bandit routes' policies and the sticky users they placed.
    pub fn bandits(&self) -> &Bandits {
        &self.bandits
    }

    /// The approval workflow, when `[registry]` is set.
    pub fn registry(&self) -> Option<&Arc<StageRegistry>> {
        self.registry.as_ref()
    }

    /// The stage of `model` `version`, when `[registry]` is set.
    pub fn stage(&self, model: &str, version: &str) -> Option<StageRecord> {
        let registry = self.registry.as_ref()?;
        Some(registry.stage(
            model,
            version,
            declared_stage(self.worker.as_ref(), model, version),
        ))
    }

    /// Approves `model` `version` (admin: `aviary ctl approve`), as the caller of the
    /// call this runs in, with `note`. Stages other than candidate and approved are
    /// kept (approving a production version changes nothing).
    pub async fn approve(
        &self,
        model: &str,
        version: &str,
        note: &str,
    ) -> Result<StageRecord, GatewayError> {
        // Under the writer's lock: a promotion (made while publishing) cannot come
        // between reading the stage and setting it.
        let mut writer = self.writer.lock().await;
        let registry = self.registry.as_ref().ok_or_else(|| GatewayError::Config {
            path: "registry".to_owned(),
            message: "this gateway has no [registry]: versions take traffic whatever their stage"
                .to_owned(),
        })?;
        // A version this gateway routes or has loaded: approving a name that exists
        // nowhere would approve whatever later takes it.
        let inventory = self
            .worker
            .as_ref()
            .map(|w| w.inventory())
            .unwrap_or_default();
        let routing = self.routing.load();
        let routed: Vec<String> = routing
            .table
            .route(model)
            .map(|r| r.versions().map(|(v, _)| v.to_owned()).collect())
            .unwrap_or_default();
        let known = inventory
            .get(model)
            .is_some_and(|set| set.contains(version));
        if !known && !routed.iter().any(|v| v == version) {
            return Err(GatewayError::Route(
                aviary_router::RouteError::UnknownVersion {
                    model: model.to_owned(),
                    version: version.to_owned(),
                    routable: routed,
                },
            ));
        }
        let current = registry.stage(
            model,
            version,
            declared_stage(self.worker.as_ref(), model, version),
        );
        if matches!(current.stage, Stage::Production) {
            return Ok(current);
        }
        let record = StageRecord {
            stage: Stage::Approved,
            by: aviary::calls::caller().to_string(),
            at_ms: aviary::unix_ms(std::time::SystemTime::now()),
            note: note.to_owned(),
        };
        registry.set(model, version, record.clone())?;
        record_stage(&self.audit, model, version, &current, &record);
        // An implicit route sends its model's unpinned traffic to the newest approved
        // version: rebuilt, it may now go to this one (which then becomes production).
        let routes = writer.routes.clone();
        if let Err(error) = self.publish(&mut writer, routes, &BTreeSet::new()) {
            tracing::error!(%error, model, version, "routes not rebuilt after an approval");
        }
        Ok(self.stage(model, version).unwrap_or(record))
    }

    /// After a routing change: an approved version that now takes all of its model's
    /// unpinned traffic becomes production, and the model's production version before
    /// it archived. A failure to save is logged: the routing change stands.
    fn promote(&self, registry: &StageRegistry, in_force: &Routes, models: &BTreeSet<String>) {
        for (model, route) in in_force.iter().filter(|(model, _)| models.contains(*model)) {
            let weighted: Vec<&RouteVersion> =
                route.versions.iter().filter(|v| v.weight > 0).collect();
            let [only] = weighted.as_slice() else {
                continue;
            };
            let stage_of = |version: &str| {
                registry.stage(
                    model,
                    version,
                    declared_stage(self.worker.as_ref(), model, version),
                )
            };
            let promoted = stage_of(&only.version);
            if promoted.stage != Stage::Approved {
                continue;
            }
            let now = aviary::unix_ms(SystemTime::now());
            let by = aviary::calls::caller().to_string();
            let mut changes = vec![(
                only.version.clone(),
                promoted,
                StageRecord {
                    stage: Stage::Production,
                    by: by.clone(),
                    at_ms: now,
                    note: "took all unpinned traffic".to_owned(),
                },
            )];
            // Every version of the model the registry knows, in the route or not.
            let mut others: BTreeSet<String> =
                route.versions.iter().map(|v| v.version.clone()).collect();
            others.extend(registry.versions(model));
            if let Some(worker) = &self.worker {
                others.extend(worker.inventory().get(model).cloned().unwrap_or_default());
            }
            for other in others.iter().filter(|v| **v != only.version) {
                let before = stage_of(other);
                if before.stage == Stage::Production {
                    let after = StageRecord {
                        stage: Stage::Archived,
                        by: by.clone(),
                        at_ms: now,
                        note: format!("replaced by version {}", only.version),
                    };
                    changes.push((other.clone(), before, after));
                }
            }
            for (version, before, after) in changes {
                match registry.set(model, &version, after.clone()) {
                    Ok(()) => {
                        tracing::info!(model, version, stage = after.stage.name(), "stage changed");
                        record_stage(&self.audit, model, &version, &before, &after);
                    }
                    Err(error) => tracing::error!(%error, model, version, "saving a stage failed"),
                }
            }
        }
    }

    /// The TLS of calls to `https://` workers, when `[workers] tls` is set.
    pub fn worker_tls(&self) -> Option<Arc<crate::backend::WatchedTls>> {
        self.worker_calls.tls.clone()
    }

    /// The key file sent to workers, when `[workers] token_file` is set.
    pub fn worker_token_file(&self) -> Option<Arc<crate::auth::TokenFile>> {
        self.worker_calls.token_file.clone()
    }

    /// The audit trail changes are recorded in.
    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    /// The default predictions held for failed calls.
    pub fn defaults(&self) -> &Defaults {
        &self.defaults
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
        route: Route,
        expected_generation: Option<u64>,
    ) -> Result<u64, GatewayError> {
        let mut writer = self.writer.lock().await;
        let current = self.routing.load().generation;
        self.expire_holds(&mut writer);
        if let Some(expected) = expected_generation.filter(|&e| e != current) {
            return Err(GatewayError::GenerationMismatch { expected, current });
        }
        let mut routes = writer.routes.clone();
        let mut route = route;
        // The admin API sets versions, weights and the limits it names; a route's
        // sticky key, match rules, shadow, fallback, dead letters, default prediction, cache,
        // input-rule mode, bandit policy, injected faults and the limits the request
        // leaves out stay as they are.
        if let Some(existing) = routes.get(model) {
            route.sticky = route.sticky.or_else(|| existing.sticky.clone());
            route.shadow = route.shadow.or_else(|| existing.shadow.clone());
            route.limits = existing.limits.overlaid(route.limits);
            route.fallback = route.fallback.or_else(|| existing.fallback.clone());
            route.dead_letters = existing.dead_letters;
            route.default_prediction = existing.default_prediction;
            route.cache_ttl = existing.cache_ttl;
            route.input_rules_mode = existing.input_rules_mode;
            route.bandit = existing.bandit.clone();
            if route.bandit.is_some() {
                bandit::keep_configured_weights(model, &mut route, existing, &self.routing.load())?;
            }
            if route.rules.is_empty() {
                route.rules = existing.rules.clone();
            }
            for version in &mut route.versions {
                let configured = existing
                    .versions
                    .iter()
                    .find(|v| v.version == version.version);
                version.fault = version.fault.or_else(|| configured.and_then(|v| v.fault));
                if let Some(configured) = configured {
                    version.limits = configured.limits.overlaid(version.limits);
                }
            }
        }
        if let Some(hold) = writer.holds.get(model)
            && hold.weights.differ_from(&route)
        {
            return Err(GatewayError::HeldByRollout {
                model: model.to_owned(),
                weights: hold.weights.describe(),
            });
        }
        routes.insert(model.to_owned(), route);
        self.publish(&mut writer, routes, &BTreeSet::new())
    }

    /// Loads `version` of the embedded worker at weight 0: it joins `model`'s route
    /// (made explicit from the one in force when the model had an implicit route, which
    /// would give the newest version everything) pinnable, with no unpinned traffic, in
    /// the same publication that makes it routable. For a model with no route yet, as
    /// [`Control::load_version`].
    pub async fn load_version_unweighted(
        &self,
        model: &str,
        version: &str,
    ) -> Result<(LoadOutcome, u64), GatewayError> {
        // Held through the load: a change published meanwhile would route the new
        // version (the newest) on an implicit route.
        let mut writer = self.writer.lock().await;
        let outcome = self.load_audited(model, version).await?;
        let mut routes = writer.routes.clone();
        let in_force = self
            .routing
            .load()
            .routes
            .get(model)
            .filter(|r| !r.pinned_only && r.versions.iter().any(|v| v.weight > 0))
            .cloned();
        if let Some(mut route) = routes.get(model).cloned().or(in_force) {
            if !route.versions.iter().any(|v| v.version == version) {
                route.versions.push(RouteVersion::new(version, 0));
            }
            routes.insert(model.to_owned(), route);
        }
        let generation = self.publish(&mut writer, routes, &BTreeSet::new())?;
        Ok((outcome, generation))
    }

    /// Applies a new version of the config file's routes: each model whose route in
    /// the file changed since the last applied version takes the file's route; the
    /// others keep theirs (admin changes, finished rollouts). Running rollouts keep
    /// their weights ([`Control::config_status`] reports the file's weights as held).
    /// Returns the generation in force afterwards.
    pub async fn apply_file_routes(&self, file_routes: Routes) -> Result<u64, GatewayError> {
        let mut writer = self.writer.lock().await;
        self.expire_holds(&mut writer);
        let previous = self.file_state(|file| file.routes.clone());
        let changed: BTreeSet<&String> = file_routes
            .keys()
            .chain(previous.keys())
            .filter(|model| file_routes.get(*model) != previous.get(*model))
            .collect();
        if changed.is_empty() {
            return Ok(self.routing.load().generation);
        }
        let mut routes = writer.routes.clone();
        for model in changed {
            match file_routes.get(model) {
                Some(route) => routes.insert(model.clone(), route.clone()),
                None => routes.remove(model),
            };
        }
        let generation = self.publish(&mut writer, routes, &BTreeSet::new())?;
        self.file_state(|file| file.routes = file_routes);
        Ok(generation)
    }

    /// Gives a rollout's versions their weights. While the rollout runs they are held
    /// against file edits and `SetRoute` (renewing the lease, if any); once it ended
    /// they become the route's own and the hold is released. Setting what is already
    /// in force publishes nothing. Returns the generation in force afterwards.
    pub async fn set_rollout_weights(
        &self,
        model: &str,
        weights: RolloutWeights,
        holding: Holding,
    ) -> Result<u64, GatewayError> {
        let mut writer = self.writer.lock().await;
        let result = self.hold_rollout_weights(&mut writer, model, weights, holding);
        self.note_canaries(&writer);
        result
    }

    fn hold_rollout_weights(
        &self,
        writer: &mut Writer,
        model: &str,
        weights: RolloutWeights,
        holding: Holding,
    ) -> Result<u64, GatewayError> {
        self.expire_holds(writer);
        let mut routes = writer.routes.clone();
        let previous = writer.holds.get(model).cloned();
        match holding {
            Holding::Running { lease } => {
                let hold = Hold {
                    expires: lease.map(|lease| Instant::now() + lease),
                    weights,
                };
                let unchanged = previous.as_ref().is_some_and(|p| p.weights == hold.weights);
                writer.holds.insert(model.to_owned(), hold);
                if unchanged {
                    return Ok(self.routing.load().generation);
                }
            }
            Holding::Ended => {
                let route = routes.get(model).cloned().unwrap_or_default();
                let committed = weights.apply_to(&route);
                if previous.is_none() && committed == route {
                    return Ok(self.routing.load().generation);
                }
                routes.insert(model.to_owned(), committed);
                writer.holds.remove(model);
            }
        }
        let published = self.publish(writer, routes, &BTreeSet::new());
        if published.is_err() {
            match previous {
                Some(previous) => writer.holds.insert(model.to_owned(), previous),
                None => writer.holds.remove(model),
            };
        }
        published
    }

    /// Ends the holds whose lease ran out: their weights stay, as the routes' own. The
    /// routes in force do not change, so nothing is published.
    fn expire_holds(&self, writer: &mut Writer) {
        let now = Instant::now();
        let expired: Vec<String> = writer
            .holds
            .iter()
            .filter(|(_, hold)| hold.expires.is_some_and(|at| at <= now))
            .map(|(model, _)| model.clone())
            .collect();
        for model in expired {
            if let Some(hold) = writer.holds.remove(&model) {
                tracing::warn!(
                    model,
                    weights = hold.weights.describe(),
                    "a rollout's hold on the weights expired (its controller stopped renewing it); \
                     the weights stay as the route's own"
                );
                let route = writer.routes.get(&model).cloned().unwrap_or_default();
                writer.routes.insert(model, hold.weights.apply_to(&route));
                self.note_canaries(writer);
            }
        }
    }

    /// Copies who is canary in the writer's holds for `/metrics`.
    fn note_canaries(&self, writer: &Writer) {
        let canaries = writer
            .holds
            .iter()
            .map(|(model, hold)| (model.clone(), hold.weights.canary.clone()))
            .collect();
        *self.canaries.lock().unwrap_or_else(PoisonError::into_inner) = canaries;
    }

    /// The canary of each model whose weights a running rollout holds.
    pub fn canaries(&self) -> BTreeMap<String, String> {
        self.canaries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Loads (or reloads) a version of the embedded worker; routes are rebuilt so a
    /// new version can be routed (and, unrouted, is pinnable at once).
    pub async fn load_version(
        &self,
        model: &str,
        version: &str,
    ) -> Result<(LoadOutcome, u64), GatewayError> {
        // Loading can take long; route changes need not wait for it.
        let outcome = self.load_audited(model, version).await?;
        let mut writer = self.writer.lock().await;
        let routes = writer.routes.clone();
        let generation = self.publish(&mut writer, routes, &BTreeSet::new())?;
        Ok((outcome, generation))
    }

    /// Loads `version` into the embedded worker, recording the attempt in the audit
    /// trail; routes are the caller's.
    async fn load_audited(&self, model: &str, version: &str) -> Result<LoadOutcome, GatewayError> {
        let worker = self.embedded()?;
        let number = version_number(model, version)?;
        let loaded = worker.load_version(model, number).await;
        self.audit_version("load", model, version, loaded.as_ref().map(|_| ()));
        Ok(loaded?)
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
        let reloaded = worker.reload_version(model, number).await;
        self.audit_version("reload", model, version, reloaded.as_ref().map(|_| ()));
        Ok(reloaded?)
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
        self.expire_holds(&mut writer);
        if let Some(hold) = writer
            .holds
            .get(model)
            .filter(|h| h.weights.canary == version || h.weights.baseline == version)
        {
            return Err(GatewayError::HeldByRollout {
                model: model.to_owned(),
                weights: hold.weights.describe(),
            });
        }
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
        let fingerprint = self.fingerprint(model, version);
        let unloaded = worker.unload_version(model, number).await;
        self.audit_unload(model, version, fingerprint, unloaded.as_ref().map(|_| ()));
        unloaded?;
        self.publish(&mut writer, routes, &BTreeSet::new())
    }

    /// Triton's RepositoryModelLoad on the embedded worker: load or reload the model's
    /// versions as its policy says, then rebuild the routes. A model without a route in
    /// force (unloaded before) gets the config file's route for it back, if any.
    pub async fn load_model(
        &self,
        model: &str,
        request: aviary_worker::load_request::LoadRequest,
    ) -> Result<u64, GatewayError> {
        let worker = self.embedded()?;
        let mut writer = self.writer.lock().await;
        let routing = self.routing.load_full();
        let may_unload = |m: &str, v: u64| routing.weight(m, &v.to_string()) == 0;
        let result = worker.load_model(model, request, &may_unload).await;
        match &result {
            Ok(report) => self.audit_report(report),
            Err(error) => self.audit_version("load", model, "", Err(error)),
        }
        let mut routes = writer.routes.clone();
        if result.is_ok()
            && !routes.contains_key(model)
            && let Some(configured) = self.file_state(|file| file.routes.get(model).cloned())
        {
            routes.insert(model.to_owned(), configured);
        }
        let mut generation = self.publish_keeping(&mut writer, routes)?;
        if let Ok(report) = &result {
            generation = self
                .release_kept(&mut writer, worker, &report.kept)
                .await?
                .unwrap_or(generation);
        }
        result.map(|_| generation).map_err(Into::into)
    }

    /// Triton's RepositoryModelUnload: refused while a version of the model has weight
    /// unless `force`; then removes the model's route and unloads it (a later
    /// RepositoryModelLoad brings the config file's route back).
    pub async fn unload_model(&self, model: &str, force: bool) -> Result<u64, GatewayError> {
        let worker = self.embedded()?;
        worker.slot(model, "")?;
        let mut writer = self.writer.lock().await;
        let weighted: Vec<String> = self
            .routing
            .load()
            .table
            .route(model)
            .map(|route| {
                route
                    .versions()
                    .filter(|(_, weight)| *weight > 0)
                    .map(|(version, weight)| format!("{version} ({weight})"))
                    .collect()
            })
            .unwrap_or_default();
        if !weighted.is_empty() && !force {
            return Err(GatewayError::Refused(format!(
                "model \"{model}\" serves traffic (weights: {}); set its weights to 0 first, \
                 or unload with the parameter \"force\" = true (its route comes back from the \
                 config file when it is loaded again)",
                weighted.join(", ")
            )));
        }
        let mut routes = writer.routes.clone();
        routes.remove(model);
        let hidden: BTreeSet<(String, String)> = worker
            .versions(model)
            .into_iter()
            .map(|v| (model.to_owned(), v))
            .collect();
        self.publish(&mut writer, routes.clone(), &hidden)?;
        let fingerprints: Vec<(String, Option<String>)> = hidden
            .iter()
            .map(|(model, version)| (version.clone(), self.fingerprint(model, version)))
            .collect();
        let unloaded = worker.unload_model(model).await;
        for (version, fingerprint) in fingerprints {
            self.audit_unload(model, &version, fingerprint, unloaded.as_ref().map(|_| ()));
        }
        unloaded?;
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
        self.audit_report(&report);
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
            let name = version.to_string();
            let fingerprint = self.fingerprint(model, &name);
            let unloaded = worker.unload_version(model, *version).await;
            self.audit_unload(model, &name, fingerprint, unloaded.as_ref().map(|_| ()));
            unloaded?;
        }
        self.publish_keeping(writer, routes).map(Some)
    }

    /// Records the last readiness check of every routed version.
    pub fn record_health(&self, health: BTreeMap<(String, String), bool>) {
        *self.health.lock().unwrap_or_else(PoisonError::into_inner) = health;
    }

    /// Whether the last readiness check found `model` at `version` up; `None` before
    /// its first check.
    pub fn version_up(&self, model: &str, version: &str) -> Option<bool> {
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(model.to_owned(), version.to_owned()))
            .copied()
    }

    /// The status of the watched config file, with a note for every model whose
    /// weights in the file a running rollout holds.
    pub async fn config_status(&self) -> ConfigStatus {
        let holds = {
            let mut writer = self.writer.lock().await;
            self.expire_holds(&mut writer);
            writer.holds.clone()
        };
        self.file_state(|file| {
            let mut status = file.status.clone();
            for (model, hold) in &holds {
                let Some(route) = file.routes.get(model) else {
                    continue;
                };
                if hold.weights.differ_from(route) {
                    status.notes.push(format!(
                        "routes.{model}: the file's weights are not in force: a running rollout holds them ({}); \
                         when it ends its final weights stay until the file changes this route again",
                        hold.weights.describe()
                    ));
                }
            }
            status
        })
    }

    /// Names the config file being watched.
    pub fn watching_config(&self, path: &str) {
        self.file_state(|file| {
            file.status.path = path.to_owned();
            file.status.applied_at_ms = now_ms();
        });
    }

    /// Records whether the watcher could use the file it read: `Some(why)` when it is
    /// deleted, unreadable or empty (the last good config keeps serving), `None` when
    /// it read contents.
    pub fn record_file_readable(&self, unreadable: Option<String>) {
        self.file_state(|file| {
            let status = &mut file.status;
            match unreadable {
                Some(why) if status.unreadable.is_empty() => {
                    status.unreadable = why;
                    status.unreadable_since_ms = now_ms();
                }
                Some(why) => status.unreadable = why,
                None => {
                    status.unreadable.clear();
                    status.unreadable_since_ms = 0;
                }
            }
        });
    }

    /// Records the outcome of applying the config file: the errors that rejected it,
    /// or (when it applied) notes on what of it is not in force as written.
    pub fn record_config(&self, path: &str, errors: Vec<String>, notes: Vec<String>) {
        if self.audit.is_on() {
            let mut record = Audit::record_of(Kind::Config, "apply");
            if !errors.is_empty() {
                record = record.outcome(&tonic::Status::invalid_argument(errors.join("; ")));
            }
            record.after = Some(serde_json::json!({ "path": path, "notes": notes }));
            self.audit.record(record);
        }
        self.file_state(|file| {
            let status = &mut file.status;
            status.path = path.to_owned();
            if errors.is_empty() {
                status.applied_at_ms = now_ms();
                status.errors.clear();
                status.notes = notes;
                file.applied += 1;
            } else {
                status.rejected_at_ms = now_ms();
                status.errors = errors;
                file.rejected += 1;
            }
        });
    }

    /// How the watched config file's changes went, or `None` when no file is watched.
    pub fn config_counts(&self) -> Option<ConfigCounts> {
        self.file_state(|file| {
            (!file.status.path.is_empty()).then_some(ConfigCounts {
                applied: file.applied,
                rejected: file.rejected,
                last_applied: file.status.errors.is_empty(),
                readable: file.status.unreadable.is_empty(),
            })
        })
    }

    fn file_state<R>(&self, f: impl FnOnce(&mut FileState) -> R) -> R {
        // The state is plain data, whole after every write: a panic elsewhere while the
        // lock was held leaves nothing half-changed, so a poisoned lock is taken as is.
        f(&mut self.file.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn embedded(&self) -> Result<&Arc<Worker>, GatewayError> {
        self.worker.as_ref().ok_or_else(|| {
            GatewayError::Refused(
                "this gateway has no embedded worker (aviary gateway); load and unload on the worker servers".into(),
            )
        })
    }

    /// Builds, validates and stores a snapshot of `routes` with the rollouts' held
    /// weights on top; on success `routes` become the explicit routes.
    /// The content hash of the embedded worker's copy of `model` at `version`, if loaded.
    fn fingerprint(&self, model: &str, version: &str) -> Option<String> {
        let slot = self.worker.as_ref()?.slot(model, version).ok()?;
        Some(slot.current().content_hash.clone())
    }

    /// Records a load or reload of `model` at `version` (the newest when empty) and
    /// its outcome, with the fingerprint of what is now loaded.
    fn audit_version(
        &self,
        action: &str,
        model: &str,
        version: &str,
        result: Result<(), &WorkerError>,
    ) {
        if !self.audit.is_on() {
            return;
        }
        let version = Some(version).filter(|v| !v.is_empty());
        let mut record = Audit::record_of(Kind::Model, action).about(model, version);
        match result {
            Ok(()) => record.fingerprint = version.and_then(|v| self.fingerprint(model, v)),
            Err(error) => {
                record = record.outcome(&tonic::Status::new(error.code(), error.to_string()))
            }
        }
        self.audit.record(record);
    }

    /// Records an unload of `model` at `version`, whose file had `fingerprint`.
    fn audit_unload(
        &self,
        model: &str,
        version: &str,
        fingerprint: Option<String>,
        result: Result<(), &WorkerError>,
    ) {
        if !self.audit.is_on() {
            return;
        }
        let mut record = Audit::record_of(Kind::Model, "unload").about(model, Some(version));
        record.fingerprint = fingerprint;
        if let Err(error) = result {
            record = record.outcome(&tonic::Status::new(error.code(), error.to_string()));
        }
        self.audit.record(record);
    }

    /// Records what a repository sync (or a Triton model load) did to each version.
    fn audit_report(&self, report: &SyncReport) {
        if !self.audit.is_on() {
            return;
        }
        for (action, versions) in [("load", &report.loaded), ("reload", &report.reloaded)] {
            for (model, version) in versions {
                self.audit_version(action, model, &version.to_string(), Ok(()));
            }
        }
        for (model, version) in &report.unloaded {
            self.audit_unload(model, &version.to_string(), None, Ok(()));
        }
        for (model, version, reason) in &report.failed {
            let record = Audit::record_of(Kind::Model, "load")
                .about(model, Some(&version.to_string()))
                .outcome(&tonic::Status::unavailable(reason.clone()));
            self.audit.record(record);
        }
    }

    fn publish(
        &self,
        writer: &mut Writer,
        routes: Routes,
        hidden: &BTreeSet<(String, String)>,
    ) -> Result<u64, GatewayError> {
        let generation = self.routing.load().generation + 1;
        let mut in_force = routes.clone();
        bandit::lay_over(&mut in_force, &writer.bandit);
        for (model, hold) in &writer.holds {
            let route = in_force.get(model).cloned().unwrap_or_default();
            in_force.insert(model.clone(), hold.weights.apply_to(&route));
        }
        let routing = Routing::build(
            RoutingInputs {
                routes: &in_force,
                worker: self.worker.as_ref(),
                hidden,
                worker_calls: &self.worker_calls,
                generation,
                takes_unpinned: &|model, version| {
                    takes_unpinned(
                        self.registry.as_deref(),
                        self.worker.as_ref(),
                        model,
                        version,
                    )
                },
            },
            &mut writer.pools,
        )?;
        // The routes in force, implicit ones included; only the models whose weights
        // this change moves are judged, so one model out of rule (a card reloaded at a
        // lower stage) never blocks another's change, or its own rollback.
        let changed = match &self.registry {
            Some(registry) => {
                let changed = moved_models(&self.routing.load().routes, &routing.routes);
                check_stages(registry, self.worker.as_ref(), &routing.routes, &changed)?;
                changed
            }
            None => BTreeSet::new(),
        };
        log_route_changes(&self.routing.load(), &routing, &self.audit);
        let in_force_now = routing.routes.clone();
        self.routing.store(Arc::new(routing));
        // A policy's weights last while the route is a bandit over the same arms.
        writer.bandit.retain(|model, weights| {
            routes
                .get(model)
                .is_some_and(|r| r.bandit.is_some() && bandit::same_arms(r, weights))
        });
        writer.routes = routes;
        if let Some(registry) = &self.registry {
            // Not while a rollout holds the weights: its last step is still judged, and
            // a rollback must find its baseline as it was.
            // Nor on a bandit route: its policy moves the weights all the time, and a
            // share of 100 % there is a passing estimate, not a promotion.
            let settled: BTreeSet<String> = changed
                .into_iter()
                .filter(|model| !writer.holds.contains_key(model))
                .filter(|model| in_force_now.get(model).is_none_or(|r| r.bandit.is_none()))
                .collect();
            self.promote(registry, &in_force_now, &settled);
        }
        Ok(generation)
    }

    /// Like [`Control::publish`], after the worker's versions changed underneath: if an
    /// explicit route now names a version that is gone, the routes are kept as they
    /// were and the error reported (the worker only unloads unweighted versions, so
    /// this means a weight-0 version left a route).
    fn publish_keeping(&self, writer: &mut Writer, routes: Routes) -> Result<u64, GatewayError> {
        match self.publish(writer, routes.clone(), &BTreeSet::new()) {
            Ok(generation) => Ok(generation),
            Err(error) => {
                // Drop versions that no longer exist from explicit routes, keeping weights.
                let inventory = self
                    .worker
                    .as_ref()
                    .map(|w| w.inventory())
                    .unwrap_or_default();
                let pruned: Routes = routes
                    .into_iter()
                    .filter_map(|(model, mut route)| {
                        route.versions.retain(|v| {
                            !v.endpoints.is_empty()
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
    aviary::unix_ms(SystemTime::now())
}

/// One log line (and, with a trail, one audit record) per model whose versions or
/// weights differ between `before` and `after`: what served which traffic when.
fn log_route_changes(before: &Routing, after: &Routing, audit: &Audit) {
    let weights = |routing: &Routing, model: &str| -> Vec<(String, u32)> {
        routing
            .table
            .route(model)
            .map(|route| route.versions().map(|(v, w)| (v.to_owned(), w)).collect())
            .unwrap_or_default()
    };
    let models: BTreeSet<&str> = before.table.models().chain(after.table.models()).collect();
    for model in models {
        let (was, now) = (weights(before, model), weights(after, model));
        if was != now {
            let shown = |w: &[(String, u32)]| {
                w.iter()
                    .map(|(v, weight)| format!("{v}={weight}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            tracing::info!(
                generation = after.generation,
                model,
                before = %shown(&was),
                after = %shown(&now),
                "route changed"
            );
            if audit.is_on() {
                let as_json = |w: &[(String, u32)]| {
                    serde_json::Value::Object(
                        w.iter()
                            .map(|(v, weight)| (v.clone(), serde_json::Value::from(*weight)))
                            .collect(),
                    )
                };
                let mut record = Audit::record_of(Kind::Route, "route-change").about(model, None);
                record.before = Some(as_json(&was));
                record.after = Some(as_json(&now));
                record.generation = Some(after.generation);
                audit.record(record);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use aviary::pb::admin as pb;

    use super::*;

    /// Two models on remote endpoints (connected lazily: nothing is dialled).
    fn config() -> Config {
        Config::parse(
            r#"
            [routes.a]
            versions = [ { version = "1", weight = 100, endpoint = "http://127.0.0.1:9" },
                         { version = "2", weight = 0, endpoint = "http://127.0.0.1:9" } ]
            [routes.b]
            versions = [ { version = "1", weight = 100, endpoint = "http://127.0.0.1:9" } ]
            "#,
        )
        .expect("valid config")
    }

    fn weights(control: &Control, model: &str) -> Vec<(String, u32)> {
        control.routing().load().routes[model]
            .versions
            .iter()
            .map(|v| (v.version.clone(), v.weight))
            .collect()
    }

    fn pairs(list: &[(&str, u32)]) -> Vec<(String, u32)> {
        list.iter().map(|(v, w)| ((*v).to_owned(), *w)).collect()
    }

    fn with_weights(route: &Route, list: &[(&str, u32)]) -> Route {
        let mut route = route.clone();
        for (version, weight) in list {
            if let Some(v) = route.versions.iter_mut().find(|v| v.version == *version) {
                v.weight = *weight;
            }
        }
        route
    }

    const RUNNING: Holding = Holding::Running { lease: None };

    fn held() -> RolloutWeights {
        RolloutWeights {
            canary: "2".into(),
            canary_weight: 20,
            baseline: "1".into(),
            baseline_weight: 80,
        }
    }

    #[tokio::test]
    async fn a_file_change_applies_to_the_models_it_changes() {
        let config = config();
        let control = Control::new(&config, None, Audit::off()).expect("builds");
        let file = Route::all_from(&config.routes);
        let generation = control.routing().load().generation;
        assert_eq!(
            control
                .apply_file_routes(file.clone())
                .await
                .expect("applies"),
            generation,
            "the file as the gateway started with it changes nothing"
        );

        let a = with_weights(&file["a"], &[("1", 50), ("2", 50)]);
        control.set_route("a", a, None).await.expect("admin change");
        let mut edited = file.clone();
        edited.insert("b".into(), with_weights(&file["b"], &[("1", 7)]));
        control
            .apply_file_routes(edited.clone())
            .await
            .expect("applies");
        assert_eq!(
            weights(&control, "a"),
            pairs(&[("1", 50), ("2", 50)]),
            "a keeps the admin's weights"
        );
        assert_eq!(weights(&control, "b"), pairs(&[("1", 7)]));

        edited.insert(
            "a".into(),
            with_weights(&file["a"], &[("1", 90), ("2", 10)]),
        );
        control.apply_file_routes(edited).await.expect("applies");
        assert_eq!(
            weights(&control, "a"),
            pairs(&[("1", 90), ("2", 10)]),
            "a changed in the file"
        );
    }

    #[tokio::test]
    async fn the_admin_api_changes_only_the_limits_it_names() {
        let config = Config::parse(
            r#"
            [routes.a]
            versions = [ { version = "1", weight = 100, endpoint = "http://127.0.0.1:9" },
                         { version = "2", weight = 0, endpoint = "http://127.0.0.1:9", limits = { max_queue = 4 } } ]
            limits = { max_in_flight = 16, timeout_ms = 2000 }
            "#,
        )
        .expect("valid config");
        let control = Control::new(&config, None, Audit::off()).expect("builds");
        let limits = |version: &str| control.routing().load().routes["a"].limits_of(version);
        assert_eq!(
            (limits("2").max_in_flight, limits("2").max_queue),
            (16, 4),
            "a version takes the route's settings under its own"
        );

        let mut message = control.routing().load().routes["a"].to_message("a");
        for version in &mut message.versions {
            version.limits = (version.version == "2").then(|| pb::Limits {
                max_in_flight: Some(2),
                ..pb::Limits::default()
            });
        }
        message.limits = Some(pb::Limits {
            timeout_ms: Some(500),
            ..pb::Limits::default()
        });
        control
            .set_route("a", Route::from_message(&message), None)
            .await
            .expect("applies");
        let (one, two) = (limits("1"), limits("2"));
        assert_eq!(
            (one.max_in_flight, one.max_queue, one.timeout),
            (16, 256, Duration::from_millis(500)),
            "version 1: the route's new deadline, its in-flight limit kept"
        );
        assert_eq!(
            (two.max_in_flight, two.max_queue, two.timeout),
            (2, 4, Duration::from_millis(500)),
            "version 2: its new in-flight limit, its queue kept"
        );
        let guards = control
            .routing()
            .load()
            .guards("a", "2")
            .map(|g| g.limits());
        assert_eq!(guards, Some(two), "the request path runs with them");

        message.versions[1].limits = Some(pb::Limits {
            max_in_flight: Some(0),
            ..pb::Limits::default()
        });
        let error = control
            .set_route("a", Route::from_message(&message), None)
            .await
            .expect_err("no call could run");
        assert_eq!(error.status().code(), tonic::Code::InvalidArgument);
        assert!(
            error
                .to_string()
                .contains("routes.a.versions[1].limits.max_in_flight"),
            "{error}"
        );
        assert_eq!(
            limits("2").max_in_flight,
            2,
            "the refused change left no trace"
        );
    }

    #[tokio::test]
    async fn a_running_rollout_holds_its_weights_until_it_ends() {
        let config = config();
        let control = Control::new(&config, None, Audit::off()).expect("builds");
        let file = Route::all_from(&config.routes);
        control
            .set_rollout_weights("a", held(), RUNNING)
            .await
            .expect("held");
        assert_eq!(
            weights(&control, "a"),
            pairs(&[("2", 20), ("1", 80)]),
            "canary first"
        );
        let generation = control.routing().load().generation;
        assert_eq!(
            control
                .set_rollout_weights("a", held(), RUNNING)
                .await
                .expect("same"),
            generation,
            "holding the same weights again publishes nothing"
        );

        let mut edited = file.clone();
        edited.insert(
            "a".into(),
            with_weights(&file["a"], &[("1", 50), ("2", 50)]),
        );
        control.apply_file_routes(edited).await.expect("applies");
        assert_eq!(
            weights(&control, "a"),
            pairs(&[("2", 20), ("1", 80)]),
            "the file does not move them"
        );
        let notes = control.config_status().await.notes;
        assert!(
            notes.len() == 1
                && notes[0].starts_with("routes.a: the file's weights are not in force"),
            "{notes:?}"
        );
        let refused = control
            .set_route("a", with_weights(&file["a"], &[("1", 100), ("2", 0)]), None)
            .await;
        assert!(
            matches!(refused, Err(GatewayError::HeldByRollout { .. })),
            "{refused:?}"
        );
        let same = with_weights(&file["a"], &[("1", 80), ("2", 20)]);
        control
            .set_route("a", same, None)
            .await
            .expect("a route with the held weights is taken");

        let ended = RolloutWeights {
            canary_weight: 100,
            baseline_weight: 0,
            ..held()
        };
        control
            .set_rollout_weights("a", ended, Holding::Ended)
            .await
            .expect("ends");
        assert_eq!(weights(&control, "a"), pairs(&[("2", 100), ("1", 0)]));
        assert!(
            control.config_status().await.notes.is_empty(),
            "nothing is held"
        );
        control
            .set_route("a", with_weights(&file["a"], &[("1", 30), ("2", 70)]), None)
            .await
            .expect("free again");
    }

    #[tokio::test]
    async fn a_hold_whose_lease_ran_out_leaves_its_weights_free() {
        let config = config();
        let control = Control::new(&config, None, Audit::off()).expect("builds");
        let file = Route::all_from(&config.routes);
        let lapsing = Holding::Running {
            lease: Some(Duration::ZERO),
        };
        control
            .set_rollout_weights("a", held(), lapsing)
            .await
            .expect("held");
        assert_eq!(weights(&control, "a"), pairs(&[("2", 20), ("1", 80)]));
        assert!(
            control.config_status().await.notes.is_empty(),
            "an expired hold holds nothing"
        );
        let mut edited = file.clone();
        edited.insert("b".into(), with_weights(&file["b"], &[("1", 3)]));
        control.apply_file_routes(edited).await.expect("applies");
        assert_eq!(
            weights(&control, "a"),
            pairs(&[("2", 20), ("1", 80)]),
            "the weights stay as the route's own"
        );
        control
            .set_route("a", with_weights(&file["a"], &[("1", 60), ("2", 40)]), None)
            .await
            .expect("free again");
    }

    #[tokio::test]
    async fn a_remote_no_route_uses_is_dropped() {
        let config = config();
        let control = Control::new(&config, None, Audit::off()).expect("builds");
        assert_eq!(control.routing().load().remotes().len(), 1);
        let mut moved = Route::all_from(&config.routes);
        for route in moved.values_mut() {
            for version in &mut route.versions {
                version.endpoints = vec!["http://127.0.0.1:10".into()];
            }
        }
        control.apply_file_routes(moved).await.expect("applies");
        let routing = control.routing().load();
        let locations: Vec<&str> = routing.remotes().iter().map(|r| r.location()).collect();
        assert_eq!(locations, ["http://127.0.0.1:10"]);
    }
}
