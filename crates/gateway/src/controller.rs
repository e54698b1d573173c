//! `aviary controller`: one rollout driver for many gateways.
//!
//! Every `evaluate_interval` it finds the gateways (a fixed list, or a DNS name
//! resolved again each round so it follows the replicas of a Kubernetes headless
//! Service), reads each one's step windows with `GetVariantStats`, sums them (latency
//! histograms bucket by bucket, so the p99 is the fleet's), runs the same [`Rollout`]
//! state machine as a single gateway, and applies its actions on every gateway:
//! weights with `SetRoute` (canary first), step windows with `ResetVariantStats`. A
//! gateway that cannot be reached is logged and brought to the rollout's weights on a
//! later round; it never holds back the others. The gateways run with
//! `[rollouts] controlled = true`, so they drive nothing themselves.
//!
//! The controller serves the rollout RPCs of the admin API on its own listener, so
//! `aviary ctl --admin <controller> rollout ...` works as with one gateway. Rollouts are
//! kept in memory: a restarted controller has none.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    future::Future,
    sync::Arc,
    time::Duration,
};

use aviary::pb::admin::{
    self as pb, GetRoutesRequest, Route, SetRouteRequest, VariantStatsRequest, VersionWeight,
    admin_client::AdminClient,
    admin_server::{Admin, AdminServer},
};
use aviary_router::rollout::{Action, MetricsSnapshot, Rollout, RolloutPlan};
use tokio::{
    net::TcpListener,
    sync::{Mutex, watch},
};
use tonic::{Request, Response, Status, transport::Channel};

use crate::{
    GatewayError,
    admin::{plan_from, required, status_message},
    config::VersionConfig,
    metrics::Window,
    rollouts::{Command, RolloutStatus, ensure_none_active, new_rollout, now_ms, rollout_versions},
};

/// How long one admin call to a gateway may take before it counts as unreachable.
const GATEWAY_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the gateways are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gateways {
    /// Admin addresses, `HOST:PORT`.
    List(Vec<String>),
    /// A `NAME:PORT` resolved every round; each address is one gateway's admin API.
    Dns(String),
}

/// How the controller runs.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// How often active rollouts are judged on the summed stats.
    pub evaluate_interval: Duration,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        ControllerOptions {
            evaluate_interval: Duration::from_secs(5),
        }
    }
}

/// The rollouts of many gateways, one per model (the last one started).
#[derive(Debug)]
pub struct Controller {
    gateways: Gateways,
    options: ControllerOptions,
    clients: std::sync::Mutex<HashMap<String, AdminClient<Channel>>>,
    rollouts: Mutex<BTreeMap<String, Rollout>>,
    /// Models whose finished rollout's weights did not reach every gateway yet.
    unsynced: Mutex<BTreeSet<String>>,
}

impl Controller {
    /// A controller over the gateways at these admin addresses (`HOST:PORT`).
    pub fn new(gateways: Vec<String>, options: ControllerOptions) -> Controller {
        Controller::with_gateways(Gateways::List(gateways), options)
    }

    /// A controller over a list of gateways or a DNS name.
    pub fn with_gateways(gateways: Gateways, options: ControllerOptions) -> Controller {
        Controller {
            gateways,
            options,
            clients: std::sync::Mutex::new(HashMap::new()),
            rollouts: Mutex::new(BTreeMap::new()),
            unsynced: Mutex::new(BTreeSet::new()),
        }
    }

    /// Judges the rollouts every evaluate interval and serves the rollout RPCs on
    /// `listener`, until `shutdown` resolves.
    pub async fn serve<F>(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: F,
    ) -> Result<(), GatewayError>
    where
        F: Future<Output = ()> + Send,
    {
        let (stop_tx, stop_rx) = watch::channel(false);
        let driver = tokio::spawn(Arc::clone(&self).run(stop_rx));
        let served = tonic::transport::Server::builder()
            .add_service(AdminServer::new(ControllerService {
                controller: Arc::clone(&self),
            }))
            .serve_with_incoming_shutdown(aviary_worker::server::incoming(listener), shutdown)
            .await
            .map_err(|e| GatewayError::Refused(format!("controller admin server: {e}")));
        let _ = stop_tx.send(true);
        let _ = driver.await;
        served
    }

    /// Evaluates every evaluate interval until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(self.options.evaluate_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The watch guard is dropped at once: it must not live across an await.
            let stopped = async { stop.wait_for(|stopped| *stopped).await.is_ok() };
            tokio::select! {
                _ = ticker.tick() => self.evaluate().await,
                _ = stopped => return,
            }
        }
    }

    /// Brings every gateway to each rollout's weights, then judges every running
    /// rollout once on the gateways' summed stats and applies what it decides.
    pub async fn evaluate(&self) {
        let gateways = self.addresses().await;
        let mut rollouts = self.rollouts.lock().await;
        let now = now_ms();
        for rollout in rollouts.values_mut() {
            let model = rollout.plan().model.clone();
            let terminal = rollout.state().is_terminal();
            // A finished rollout's weights are pushed again only to catch up gateways
            // that missed them: an operator may change routes after it.
            let unsynced = self.unsynced.lock().await.contains(&model);
            if (!terminal || unsynced)
                && let Some(weight) = rollout.canary_weight()
            {
                self.set_weights(&gateways, rollout.plan(), weight, 100 - weight.min(100))
                    .await;
            }
            if terminal {
                continue;
            }
            let snapshot = self.snapshot(&gateways, rollout.plan()).await;
            let actions = rollout.evaluate(now, &snapshot);
            if actions.is_empty() {
                continue;
            }
            let reason = rollout
                .history()
                .last()
                .map(|d| d.reason.clone())
                .unwrap_or_default();
            tracing::info!(
                model,
                state = rollout.state().label(),
                reason,
                "rollout decision"
            );
            self.apply(&gateways, rollout.plan(), &actions).await;
        }
    }

    /// Checks `plan` against every reachable gateway's routes, starts it and applies
    /// its first step.
    pub async fn start(&self, plan: RolloutPlan) -> Result<RolloutStatus, GatewayError> {
        let gateways = self.addresses().await;
        let mut problems = self.check_routable(&gateways, &plan).await;
        let gates = &plan.gates;
        for (field, set) in [
            ("min_shadow_agreement", gates.min_shadow_agreement.is_some()),
            (
                "min_distribution_p_value",
                gates.min_distribution_p_value.is_some(),
            ),
        ] {
            if set {
                problems.push(format!(
                    "gates.{field}: the controller does not read the gateways' shadow comparisons; remove this gate"
                ));
            }
        }
        let mut rollout = new_rollout(&plan, problems)?;
        let mut rollouts = self.rollouts.lock().await;
        ensure_none_active(&rollouts, &plan.model)?;
        let actions = rollout.start(now_ms())?;
        self.apply(&gateways, &plan, &actions).await;
        tracing::info!(
            model = plan.model,
            canary = plan.canary,
            baseline = plan.baseline,
            gateways = gateways.len(),
            "rollout started"
        );
        rollouts.insert(plan.model.clone(), rollout);
        self.status_of(&gateways, &rollouts, &plan.model).await
    }

    /// Runs an operator command on the model's rollout.
    pub async fn command(
        &self,
        model: &str,
        command: Command,
        note: &str,
    ) -> Result<RolloutStatus, GatewayError> {
        let gateways = self.addresses().await;
        let mut rollouts = self.rollouts.lock().await;
        let rollout = rollouts
            .get_mut(model)
            .ok_or_else(|| GatewayError::NoRollout {
                model: model.to_owned(),
            })?;
        let actions = command.run(rollout, now_ms(), note)?;
        tracing::info!(
            model,
            ?command,
            note,
            state = rollout.state().label(),
            "rollout command"
        );
        let plan = rollout.plan().clone();
        self.apply(&gateways, &plan, &actions).await;
        self.status_of(&gateways, &rollouts, model).await
    }

    /// The model's rollout and its current step's summed metrics.
    pub async fn status(&self, model: &str) -> Result<RolloutStatus, GatewayError> {
        let gateways = self.addresses().await;
        let rollouts = self.rollouts.lock().await;
        self.status_of(&gateways, &rollouts, model).await
    }

    async fn status_of(
        &self,
        gateways: &[String],
        rollouts: &BTreeMap<String, Rollout>,
        model: &str,
    ) -> Result<RolloutStatus, GatewayError> {
        let rollout = rollouts.get(model).ok_or_else(|| GatewayError::NoRollout {
            model: model.to_owned(),
        })?;
        let snapshot = self.snapshot(gateways, rollout.plan()).await;
        Ok(RolloutStatus {
            waiting_for: rollout.waiting_for(now_ms(), &snapshot),
            canary: snapshot.canary,
            baseline: snapshot.baseline,
            rollout: rollout.clone(),
        })
    }

    /// The gateways' admin addresses now; a failed DNS lookup is logged and is none.
    async fn addresses(&self) -> Vec<String> {
        match &self.gateways {
            Gateways::List(list) => list.clone(),
            Gateways::Dns(name) => match tokio::net::lookup_host(name.as_str()).await {
                Ok(found) => {
                    let mut addresses: Vec<String> = found.map(|a| a.to_string()).collect();
                    addresses.sort();
                    addresses.dedup();
                    addresses
                }
                Err(error) => {
                    tracing::warn!(name, %error, "cannot resolve the gateways' DNS name");
                    Vec::new()
                }
            },
        }
    }

    fn client(&self, address: &str) -> Result<AdminClient<Channel>, GatewayError> {
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(client) = clients.get(address) {
            return Ok(client.clone());
        }
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| GatewayError::Refused(format!("gateway \"{address}\": {e}")))?
            .connect_timeout(GATEWAY_TIMEOUT)
            .timeout(GATEWAY_TIMEOUT)
            .connect_lazy();
        let client = AdminClient::new(channel);
        clients.insert(address.to_owned(), client.clone());
        Ok(client)
    }

    /// The canary's and the baseline's step windows summed over every gateway that
    /// answers; one that does not is logged and left out of this round.
    async fn snapshot(&self, gateways: &[String], plan: &RolloutPlan) -> MetricsSnapshot {
        let (mut canary, mut baseline) = (Window::new(), Window::new());
        for address in gateways {
            let stats = match self.client(address) {
                Ok(mut client) => client
                    .get_variant_stats(VariantStatsRequest {
                        model: plan.model.clone(),
                    })
                    .await
                    .map_err(|status| status.message().to_owned()),
                Err(error) => Err(error.to_string()),
            };
            let stats = match stats {
                Ok(stats) => stats.into_inner(),
                Err(error) => {
                    tracing::warn!(gateway = address, error, "cannot read the gateway's stats");
                    continue;
                }
            };
            for version in stats.versions {
                let window = if version.version == plan.canary {
                    &mut canary
                } else if version.version == plan.baseline {
                    &mut baseline
                } else {
                    continue;
                };
                let buckets: Vec<(u64, u64)> = version
                    .latency
                    .iter()
                    .map(|b| (b.value_us, b.count))
                    .collect();
                window.add(
                    version.requests,
                    version.errors,
                    &buckets,
                    version.labelled,
                    version.correct,
                );
            }
        }
        MetricsSnapshot {
            canary: canary.step_metrics(),
            baseline: baseline.step_metrics(),
            shadow_agreement: None,
            distribution_p_value: None,
        }
    }

    /// Every reason the plan cannot run on the reachable gateways' routes.
    async fn check_routable(&self, gateways: &[String], plan: &RolloutPlan) -> Vec<String> {
        let mut problems = Vec::new();
        let mut reached = 0;
        for address in gateways {
            let Ok(route) = self.route(address, &plan.model).await else {
                continue;
            };
            reached += 1;
            let Some(route) = route else {
                problems.push(format!(
                    "model: gateway {address} has no route for model \"{}\"",
                    plan.model
                ));
                continue;
            };
            for (field, version) in [("canary", &plan.canary), ("baseline", &plan.baseline)] {
                if !version.is_empty() && !route.versions.iter().any(|v| &v.version == version) {
                    problems.push(format!(
                        "{field}: version \"{version}\" is not in gateway {address}'s route for model \"{}\"",
                        plan.model
                    ));
                }
            }
        }
        if reached == 0 {
            problems.push(format!(
                "no gateway answered ({}): the controller needs at least one",
                gateways.join(", ")
            ));
        }
        problems
    }

    /// The gateway's route for `model`; `Err` (logged) when it cannot be reached.
    async fn route(&self, address: &str, model: &str) -> Result<Option<Route>, ()> {
        let routes = match self.client(address) {
            Ok(mut client) => client
                .get_routes(GetRoutesRequest {})
                .await
                .map_err(|status| status.message().to_owned()),
            Err(error) => Err(error.to_string()),
        };
        match routes {
            Ok(routes) => Ok(routes
                .into_inner()
                .routes
                .into_iter()
                .find(|r| r.model == model)),
            Err(error) => {
                tracing::warn!(gateway = address, error, "cannot read the gateway's routes");
                Err(())
            }
        }
    }

    async fn apply(&self, gateways: &[String], plan: &RolloutPlan, actions: &[Action]) {
        for action in actions {
            match *action {
                Action::SetWeights {
                    canary_weight,
                    baseline_weight,
                } => {
                    self.set_weights(gateways, plan, canary_weight, baseline_weight)
                        .await
                }
                Action::ResetStepMetrics => {
                    for address in gateways {
                        let reset = match self.client(address) {
                            Ok(mut client) => client
                                .reset_variant_stats(VariantStatsRequest {
                                    model: plan.model.clone(),
                                })
                                .await
                                .map(drop)
                                .map_err(|status| status.message().to_owned()),
                            Err(error) => Err(error.to_string()),
                        };
                        if let Err(error) = reset {
                            tracing::warn!(
                                gateway = address,
                                error,
                                "cannot reset the gateway's stats"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Gives every gateway whose route differs the canary at `canary` (first) and the
    /// baseline at `baseline`; remembers the model when a gateway could not be set.
    async fn set_weights(
        &self,
        gateways: &[String],
        plan: &RolloutPlan,
        canary: u32,
        baseline: u32,
    ) {
        let mut all_set = true;
        for address in gateways {
            if let Err(error) = self
                .set_gateway_weights(address, plan, canary, baseline)
                .await
            {
                all_set = false;
                tracing::warn!(
                    gateway = address,
                    model = plan.model,
                    error,
                    "cannot set the rollout's weights; retrying next round"
                );
            }
        }
        let mut unsynced = self.unsynced.lock().await;
        match all_set {
            true => unsynced.remove(&plan.model),
            false => unsynced.insert(plan.model.clone()),
        };
    }

    async fn set_gateway_weights(
        &self,
        address: &str,
        plan: &RolloutPlan,
        canary: u32,
        baseline: u32,
    ) -> Result<(), String> {
        let mut client = self.client(address).map_err(|e| e.to_string())?;
        let routes = client
            .get_routes(GetRoutesRequest {})
            .await
            .map_err(|status| status.message().to_owned())?
            .into_inner();
        let current: Vec<VersionConfig> = routes
            .routes
            .iter()
            .find(|r| r.model == plan.model)
            .map(|r| {
                r.versions
                    .iter()
                    .map(|v| VersionConfig {
                        version: v.version.clone(),
                        weight: v.weight,
                        endpoint: Some(v.endpoint.clone()).filter(|e| !e.is_empty()),
                        fault: None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let wanted = rollout_versions(current.clone(), plan, canary, baseline);
        let weight = |versions: &[VersionConfig], version: &str| {
            versions
                .iter()
                .find(|v| v.version == version)
                .map(|v| v.weight)
        };
        if [&plan.canary, &plan.baseline]
            .iter()
            .all(|v| weight(&current, v) == weight(&wanted, v))
            && current
                .iter()
                .all(|v| weight(&wanted, &v.version) == Some(v.weight))
        {
            return Ok(());
        }
        let route = Route {
            model: plan.model.clone(),
            versions: wanted
                .into_iter()
                .map(|v| VersionWeight {
                    version: v.version,
                    weight: v.weight,
                    endpoint: v.endpoint.unwrap_or_default(),
                })
                .collect(),
        };
        let generation = client
            .set_route(SetRouteRequest {
                route: Some(route),
                expected_generation: Some(routes.generation),
            })
            .await
            .map_err(|status| status.message().to_owned())?
            .into_inner()
            .generation;
        tracing::info!(
            gateway = address,
            model = plan.model,
            canary_weight = canary,
            baseline_weight = baseline,
            generation,
            "rollout weights applied"
        );
        Ok(())
    }
}

/// The controller's admin service: the rollout RPCs; everything else belongs to a
/// gateway.
#[derive(Debug, Clone)]
struct ControllerService {
    controller: Arc<Controller>,
}

impl ControllerService {
    async fn command(
        &self,
        request: Request<pb::RolloutCommandRequest>,
        command: Command,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let request = request.into_inner();
        let model = required("model", &request.model)?;
        let status = self
            .controller
            .command(model, command, &request.note)
            .await?;
        Ok(Response::new(status_message(&status)))
    }
}

fn gateway_only<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented(
        "the controller serves only the rollout RPCs; ask a gateway's admin API",
    ))
}

#[tonic::async_trait]
impl Admin for ControllerService {
    async fn get_routes(
        &self,
        _: Request<GetRoutesRequest>,
    ) -> Result<Response<pb::GetRoutesResponse>, Status> {
        gateway_only()
    }

    async fn set_route(
        &self,
        _: Request<SetRouteRequest>,
    ) -> Result<Response<pb::SetRouteResponse>, Status> {
        gateway_only()
    }

    async fn list_models(
        &self,
        _: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        gateway_only()
    }

    async fn load_version(
        &self,
        _: Request<pb::VersionRequest>,
    ) -> Result<Response<pb::VersionResponse>, Status> {
        gateway_only()
    }

    async fn reload_version(
        &self,
        _: Request<pb::VersionRequest>,
    ) -> Result<Response<pb::VersionResponse>, Status> {
        gateway_only()
    }

    async fn unload_version(
        &self,
        _: Request<pb::UnloadVersionRequest>,
    ) -> Result<Response<pb::VersionResponse>, Status> {
        gateway_only()
    }

    async fn get_config_status(
        &self,
        _: Request<pb::GetConfigStatusRequest>,
    ) -> Result<Response<pb::ConfigStatus>, Status> {
        gateway_only()
    }

    async fn get_shadow_report(
        &self,
        _: Request<pb::ShadowReportRequest>,
    ) -> Result<Response<pb::ShadowReport>, Status> {
        gateway_only()
    }

    async fn start_rollout(
        &self,
        request: Request<pb::StartRolloutRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let status = self
            .controller
            .start(plan_from(request.into_inner()))
            .await?;
        Ok(Response::new(status_message(&status)))
    }

    async fn pause_rollout(
        &self,
        request: Request<pb::RolloutCommandRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.command(request, Command::Pause).await
    }

    async fn resume_rollout(
        &self,
        request: Request<pb::RolloutCommandRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.command(request, Command::Resume).await
    }

    async fn promote_rollout(
        &self,
        request: Request<pb::RolloutCommandRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.command(request, Command::Promote).await
    }

    async fn abort_rollout(
        &self,
        request: Request<pb::RolloutCommandRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.command(request, Command::Abort).await
    }

    async fn get_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let model = request.into_inner().model;
        let status = self.controller.status(required("model", &model)?).await?;
        Ok(Response::new(status_message(&status)))
    }

    async fn feedback(
        &self,
        _: Request<pb::FeedbackRequest>,
    ) -> Result<Response<pb::FeedbackResponse>, Status> {
        gateway_only()
    }

    async fn get_experiment_report(
        &self,
        _: Request<pb::ExperimentReportRequest>,
    ) -> Result<Response<pb::ExperimentReport>, Status> {
        gateway_only()
    }

    async fn get_variant_stats(
        &self,
        _: Request<VariantStatsRequest>,
    ) -> Result<Response<pb::VariantStatsResponse>, Status> {
        gateway_only()
    }

    async fn reset_variant_stats(
        &self,
        _: Request<VariantStatsRequest>,
    ) -> Result<Response<pb::ResetVariantStatsResponse>, Status> {
        gateway_only()
    }
}
