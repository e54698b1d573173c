//! The rollout driver: runs each model's [`Rollout`] state machine against this
//! gateway's own metrics and routes.
//!
//! It applies the machine's actions (weights through [`Control::set_route`], step
//! window resets in [`Metrics`]), judges every active rollout each
//! `[rollouts] evaluate_interval_ms`, and writes every rollout to the state file after
//! each change, so a restarted gateway carries on where it stopped. With many gateways
//! one `aviary controller` drives the rollouts on their summed stats (see
//! [`crate::controller`]); each gateway then runs with `[rollouts] controlled = true`
//! and its driver neither evaluates nor takes commands.
//!
//! The gates read the step windows (requests, errors, p99 latency, accuracy from
//! feedback received during the step) and, when the route's shadow is the canary, the
//! model's mirror: baseline answers compared with the canary's on the same inputs.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aviary_router::rollout::{Action, MetricsSnapshot, Rollout, RolloutPlan, StepMetrics};
use tokio::sync::{Mutex, watch};

use crate::{
    GatewayError,
    config::{PlanConfig, RolloutsConfig, VersionConfig},
    control::Control,
    metrics::Metrics,
};

/// How many times a weight change is retried when another change to the route table
/// lands between reading the route and writing it.
const SET_WEIGHTS_ATTEMPTS: usize = 5;

/// An operator command on a running rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Hold the current step.
    Pause,
    /// Carry on from a pause.
    Resume,
    /// Give the canary all the traffic now.
    Promote,
    /// Give the baseline all the traffic again.
    Abort,
}

impl Command {
    /// Runs the command on `rollout`; the actions to apply.
    pub(crate) fn run(
        self,
        rollout: &mut Rollout,
        now: u64,
        note: &str,
    ) -> Result<Vec<Action>, GatewayError> {
        Ok(match self {
            Command::Pause => rollout.pause(now, note),
            Command::Resume => rollout.resume(now, note),
            Command::Promote => rollout.promote_now(now, note),
            Command::Abort => rollout.abort(now, note),
        }?)
    }
}

/// Builds a rollout of `plan`, reporting the caller's `problems` together with the
/// plan's own, every one listed.
pub(crate) fn new_rollout(
    plan: &RolloutPlan,
    mut problems: Vec<String>,
) -> Result<Rollout, GatewayError> {
    let rollout = Rollout::new(plan.clone());
    if let Err(errors) = &rollout {
        problems.extend(errors.errors().iter().map(ToString::to_string));
    }
    match rollout {
        Ok(rollout) if problems.is_empty() => Ok(rollout),
        _ => Err(GatewayError::InvalidRollout(problems)),
    }
}

/// Refuses a second rollout of a model while one is still running.
pub(crate) fn ensure_none_active(
    rollouts: &BTreeMap<String, Rollout>,
    model: &str,
) -> Result<(), GatewayError> {
    match rollouts.get(model).filter(|r| !r.state().is_terminal()) {
        Some(active) => Err(GatewayError::Refused(format!(
            "model \"{model}\" already has a rollout ({} to version \"{}\"); abort it first",
            active.state().label(),
            active.plan().canary
        ))),
        None => Ok(()),
    }
}

/// A rollout with what its current step has measured so far.
#[derive(Debug, Clone)]
pub struct RolloutStatus {
    /// The rollout: plan, state and history.
    pub rollout: Rollout,
    /// The canary since the step began.
    pub canary: StepMetrics,
    /// The baseline since the step began.
    pub baseline: StepMetrics,
    /// What keeps the step from advancing; empty when not running or about to act.
    pub waiting_for: Vec<String>,
}

/// This gateway's rollouts, one per model (the last one started).
#[derive(Debug)]
pub struct Rollouts {
    control: Arc<Control>,
    metrics: Arc<Metrics>,
    state_file: Option<PathBuf>,
    controlled: bool,
    rollouts: Mutex<BTreeMap<String, Rollout>>,
}

impl Rollouts {
    /// Loads the rollouts saved in the state file, if any, and gives each one still
    /// running the canary weight its state calls for.
    pub async fn open(
        control: Arc<Control>,
        metrics: Arc<Metrics>,
        config: &RolloutsConfig,
    ) -> Result<Rollouts, GatewayError> {
        let saved = match &config.state_file {
            Some(path) if !config.controlled => load(path)?,
            _ => Vec::new(),
        };
        let rollouts = Rollouts {
            control,
            metrics,
            state_file: config.state_file.clone(),
            controlled: config.controlled,
            rollouts: Mutex::new(BTreeMap::new()),
        };
        let mut map = rollouts.rollouts.lock().await;
        for rollout in saved {
            if !rollout.state().is_terminal()
                && let Some(weight) = rollout.canary_weight()
            {
                let actions = [
                    Action::SetWeights {
                        canary_weight: weight,
                        baseline_weight: 100 - weight.min(100),
                    },
                    Action::ResetStepMetrics,
                ];
                match rollouts.apply(rollout.plan(), &actions).await {
                    Ok(()) => tracing::info!(
                        model = rollout.plan().model,
                        state = rollout.state().label(),
                        canary_weight = weight,
                        "rollout resumed from the state file"
                    ),
                    Err(error) => tracing::error!(
                        model = rollout.plan().model,
                        %error,
                        "could not restore a saved rollout's weights"
                    ),
                }
            }
            map.insert(rollout.plan().model.clone(), rollout);
        }
        drop(map);
        Ok(rollouts)
    }

    /// Starts each configured plan whose model has no active rollout and which has not
    /// run to its end already (a finished plan in the state file is not run again).
    pub async fn start_configured(
        &self,
        plans: &BTreeMap<String, PlanConfig>,
    ) -> Result<(), GatewayError> {
        for (model, config) in plans {
            let plan = config.plan(model);
            {
                let rollouts = self.rollouts.lock().await;
                if let Some(saved) = rollouts.get(model) {
                    if !saved.state().is_terminal() {
                        tracing::info!(
                            model,
                            "configured plan skipped: the model has an active rollout"
                        );
                        continue;
                    }
                    if saved.plan() == &plan {
                        tracing::info!(
                            model,
                            state = saved.state().label(),
                            "configured plan skipped: it already ran to its end"
                        );
                        continue;
                    }
                }
            }
            self.start(plan)
                .await
                .map_err(|error| GatewayError::Config {
                    path: format!("rollouts.plans.{model}"),
                    message: format!("cannot start the rollout: {error}"),
                })?;
        }
        Ok(())
    }

    /// Refuses rollout commands on a gateway whose rollouts a controller drives.
    fn check_not_controlled(&self) -> Result<(), GatewayError> {
        match self.controlled {
            true => Err(GatewayError::Refused(
                "rollouts are driven by the controller".to_owned(),
            )),
            false => Ok(()),
        }
    }

    /// Checks `plan` against the routes, starts it and applies its first step.
    pub async fn start(&self, plan: RolloutPlan) -> Result<RolloutStatus, GatewayError> {
        self.check_not_controlled()?;
        let mut problems = self.check_routable(&plan);
        problems.extend(self.unmeasured_gates(&plan));
        let mut rollout = new_rollout(&plan, problems)?;
        let mut rollouts = self.rollouts.lock().await;
        ensure_none_active(&rollouts, &plan.model)?;
        let actions = rollout.start(now_ms())?;
        self.apply(&plan, &actions).await?;
        tracing::info!(
            model = plan.model,
            canary = plan.canary,
            baseline = plan.baseline,
            "rollout started"
        );
        rollouts.insert(plan.model.clone(), rollout);
        self.persist(&rollouts);
        self.status_of(&rollouts, &plan.model)
    }

    /// Runs an operator command on the model's rollout.
    pub async fn command(
        &self,
        model: &str,
        command: Command,
        note: &str,
    ) -> Result<RolloutStatus, GatewayError> {
        self.check_not_controlled()?;
        let mut rollouts = self.rollouts.lock().await;
        let rollout = rollouts
            .get_mut(model)
            .ok_or_else(|| GatewayError::NoRollout {
                model: model.to_owned(),
            })?;
        let actions = command.run(rollout, now_ms(), note)?;
        let plan = rollout.plan().clone();
        tracing::info!(
            model,
            ?command,
            note,
            state = rollout.state().label(),
            "rollout command"
        );
        let applied = self.apply(&plan, &actions).await;
        self.persist(&rollouts);
        applied?;
        self.status_of(&rollouts, model)
    }

    /// The model's rollout and its current step's metrics.
    pub async fn status(&self, model: &str) -> Result<RolloutStatus, GatewayError> {
        self.check_not_controlled()?;
        let rollouts = self.rollouts.lock().await;
        self.status_of(&rollouts, model)
    }

    /// Judges every running rollout once on its step metrics and applies what it decides.
    pub async fn evaluate(&self) {
        let mut rollouts = self.rollouts.lock().await;
        let mut changed = false;
        let now = now_ms();
        for rollout in rollouts.values_mut() {
            if rollout.state().is_terminal() {
                continue;
            }
            let snapshot = self.snapshot(rollout.plan());
            let actions = rollout.evaluate(now, &snapshot);
            if actions.is_empty() {
                continue;
            }
            changed = true;
            let plan = rollout.plan();
            let reason = rollout
                .history()
                .last()
                .map(|d| d.reason.as_str())
                .unwrap_or_default();
            tracing::info!(
                model = plan.model,
                state = rollout.state().label(),
                reason,
                "rollout decision"
            );
            if let Err(error) = self.apply(plan, &actions).await {
                tracing::error!(model = plan.model, %error, "could not apply a rollout decision");
            }
        }
        if changed {
            self.persist(&rollouts);
        }
    }

    /// Evaluates every `interval` until `stop` turns true.
    pub async fn run(self: Arc<Self>, interval: Duration, mut stop: watch::Receiver<bool>) {
        if self.controlled {
            return;
        }
        let mut ticker = tokio::time::interval(interval);
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

    fn status_of(
        &self,
        rollouts: &BTreeMap<String, Rollout>,
        model: &str,
    ) -> Result<RolloutStatus, GatewayError> {
        let rollout = rollouts.get(model).ok_or_else(|| GatewayError::NoRollout {
            model: model.to_owned(),
        })?;
        let snapshot = self.snapshot(rollout.plan());
        Ok(RolloutStatus {
            waiting_for: rollout.waiting_for(now_ms(), &snapshot),
            canary: snapshot.canary,
            baseline: snapshot.baseline,
            rollout: rollout.clone(),
        })
    }

    fn snapshot(&self, plan: &RolloutPlan) -> MetricsSnapshot {
        let (shadow_agreement, distribution_p_value) = self.shadow_evidence(plan);
        MetricsSnapshot {
            canary: self.metrics.step(&plan.model, &plan.canary).step_metrics(),
            baseline: self
                .metrics
                .step(&plan.model, &plan.baseline)
                .step_metrics(),
            shadow_agreement,
            distribution_p_value,
        }
    }

    /// Agreement and KS p-value from the model's mirror when its shadow is the canary;
    /// `None`s otherwise or before the first comparison (which holds the step).
    ///
    /// A model may have several outputs; the gate reads the one with the most compared
    /// pairs, the best-supported figure (for a classifier, its label or probabilities).
    /// The mirror counts since it started, not since the step did: a route keeps one
    /// mirror across weight changes, and its samples cannot be split by step.
    fn shadow_evidence(&self, plan: &RolloutPlan) -> (Option<f64>, Option<f64>) {
        let routing = self.control.routing().load_full();
        let Some(mirror) = routing
            .mirror(&plan.model)
            .filter(|m| m.config().version == plan.canary)
        else {
            return (None, None);
        };
        let report = mirror.report();
        let Some(output) = report.outputs.values().max_by_key(|o| o.agreement_total) else {
            return (None, None);
        };
        let p_value =
            aviary_router::stats::ks_two_sample(&output.primary_sample, &output.shadow_sample)
                .map(|test| test.p_value);
        (output.agreement(), p_value)
    }

    /// Gates this gateway cannot measure for `plan`: a rollout using them would never pass.
    fn unmeasured_gates(&self, plan: &RolloutPlan) -> Vec<String> {
        let routing = self.control.routing().load_full();
        let shadow = routing
            .mirror(&plan.model)
            .map(|m| m.config().version.clone());
        if shadow.as_deref() == Some(plan.canary.as_str()) {
            return Vec::new();
        }
        let gates = &plan.gates;
        [
            ("min_shadow_agreement", gates.min_shadow_agreement.is_some()),
            ("min_distribution_p_value", gates.min_distribution_p_value.is_some()),
        ]
        .into_iter()
        .filter(|(_, set)| *set)
        .map(|(field, _)| {
            format!(
                "gates.{field}: needs the canary's answers compared with the baseline's, but route \"{}\" {}; \
                 set routes.{}.shadow.version = \"{}\" (with the canary at weight 0 in the config) or remove this gate",
                plan.model,
                match &shadow {
                    Some(version) => format!("shadows version \"{version}\", not the canary"),
                    None => "has no shadow".to_owned(),
                },
                plan.model,
                plan.canary
            )
        })
        .collect()
    }

    /// Every reason the plan's versions cannot carry a rollout on the current routes.
    fn check_routable(&self, plan: &RolloutPlan) -> Vec<String> {
        let routing = self.control.routing().load_full();
        let Some(route) = routing.table.route(&plan.model) else {
            return vec![format!("model: no route for model \"{}\"", plan.model)];
        };
        let routable: Vec<&str> = route.versions().map(|(v, _)| v).collect();
        [("canary", &plan.canary), ("baseline", &plan.baseline)]
            .into_iter()
            .filter(|(_, version)| !version.is_empty() && !routable.contains(&version.as_str()))
            .map(|(field, version)| {
                format!(
                    "{field}: version \"{version}\" is not a routable version of model \"{}\" (routable: {})",
                    plan.model,
                    routable.join(", ")
                )
            })
            .collect()
    }

    async fn apply(&self, plan: &RolloutPlan, actions: &[Action]) -> Result<(), GatewayError> {
        for action in actions {
            match *action {
                Action::SetWeights {
                    canary_weight,
                    baseline_weight,
                } => {
                    self.set_weights(plan, canary_weight, baseline_weight)
                        .await?
                }
                Action::ResetStepMetrics => {
                    self.metrics.reset_step(&plan.model, &plan.canary);
                    self.metrics.reset_step(&plan.model, &plan.baseline);
                }
            }
        }
        Ok(())
    }

    /// Routes the canary first with `canary`, the baseline with `baseline`, and leaves
    /// the route's other versions pinnable at weight 0; endpoints, faults, sticky keys,
    /// rules and shadow stay as they are.
    async fn set_weights(
        &self,
        plan: &RolloutPlan,
        canary: u32,
        baseline: u32,
    ) -> Result<(), GatewayError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let routing = self.control.routing().load_full();
            let mut route = routing.routes.get(&plan.model).cloned().unwrap_or_default();
            route.versions =
                rollout_versions(std::mem::take(&mut route.versions), plan, canary, baseline);
            match self
                .control
                .set_route(&plan.model, route, Some(routing.generation))
                .await
            {
                Err(GatewayError::GenerationMismatch { .. }) if attempt < SET_WEIGHTS_ATTEMPTS => {}
                Err(error) => return Err(error),
                Ok(generation) => {
                    tracing::info!(
                        model = plan.model,
                        canary = plan.canary,
                        canary_weight = canary,
                        baseline = plan.baseline,
                        baseline_weight = baseline,
                        generation,
                        "rollout weights applied"
                    );
                    return Ok(());
                }
            }
        }
    }

    /// Writes every rollout to the state file (a temporary file renamed over it, so a
    /// crash leaves the old or the new file, never half of one). A failure is logged:
    /// the rollout carries on in memory.
    fn persist(&self, rollouts: &BTreeMap<String, Rollout>) {
        let Some(path) = &self.state_file else {
            return;
        };
        let all: Vec<&Rollout> = rollouts.values().collect();
        let result = serde_json::to_vec_pretty(&all)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                let tmp = path.with_extension("json.tmp");
                std::fs::write(&tmp, bytes)?;
                std::fs::rename(&tmp, path)
            });
        if let Err(error) = result {
            tracing::error!(path = %path.display(), %error, "could not save rollouts");
        }
    }
}

/// A route's versions with the canary first at `canary`, the baseline at `baseline`,
/// and every other version kept pinnable at weight 0.
pub(crate) fn rollout_versions(
    mut versions: Vec<VersionConfig>,
    plan: &RolloutPlan,
    canary: u32,
    baseline: u32,
) -> Vec<VersionConfig> {
    let mut take = |version: &str, weight: u32| {
        let mut found = match versions.iter().position(|v| v.version == version) {
            Some(i) => versions.remove(i),
            None => VersionConfig {
                version: version.to_owned(),
                weight: 0,
                endpoint: None,
                fault: None,
            },
        };
        found.weight = weight;
        found
    };
    let mut ordered = vec![take(&plan.canary, canary), take(&plan.baseline, baseline)];
    for mut other in versions {
        other.weight = 0;
        ordered.push(other);
    }
    ordered
}

/// Reads the state file; a missing file is no rollouts.
fn load(path: &Path) -> Result<Vec<Rollout>, GatewayError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => {
            return Err(GatewayError::Config {
                path: path.display().to_string(),
                message: format!("cannot read the rollout state file: {error}"),
            });
        }
    };
    serde_json::from_slice(&bytes).map_err(|error| GatewayError::Config {
        path: path.display().to_string(),
        message: format!("rollout state file is not valid: {error}"),
    })
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
