//! The rollout driver: runs each model's [`Rollout`] state machine and applies what it
//! decides. One driver serves both deployments, generic over its [`Target`], where the
//! evidence comes from and where the decisions go:
//!
//! - [`LocalGateway`]: this gateway's own metrics and routes (`aviary serve` and
//!   `aviary gateway` with `[rollouts] controlled = false`);
//! - [`RemoteGateways`]: many gateways through their admin API, their stats summed
//!   (`aviary controller`; the gateways run with `[rollouts] controlled = true`).
//!
//! Every `evaluate_interval` the driver brings the target to each running rollout's
//! weights (a no-op where they are in force; it catches up a gateway that restarted or
//! missed a round), judges the rollout on the step's evidence and applies its actions.
//! While a rollout runs its weights are held: config file edits and `SetRoute` do not
//! move them (see [`crate::control`]). Every rollout is written to the state file after
//! each change, so a restarted driver carries on where it stopped.

mod fleet;
mod local;

use std::{
    collections::BTreeMap,
    future::Future,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use aviary_router::rollout::{
    Action, MetricsSnapshot, Rollout, RolloutPlan, RolloutState, StepMetrics,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, watch};

pub use fleet::{Gateways, RemoteGateways};
pub use local::{LocalGateway, plan_problems};

use crate::{
    GatewayError,
    audit::{Audit, Kind},
    config::PlanConfig,
    control::{Holding, RolloutWeights},
};

/// Where a driver's evidence comes from and where its decisions go.
pub trait Target: Send + Sync + 'static {
    /// Why `plan` cannot run here, each problem with its field (the plan's own checks
    /// are the driver's): versions that are not routable, gates nothing measures.
    fn check(&self, plan: &RolloutPlan) -> impl Future<Output = Vec<String>> + Send;

    /// Why a valid `plan` may not run here now (refused as a failed precondition):
    /// with `[registry]`, a canary that is not approved stepped past the canary cap.
    fn preconditions(&self, plan: &RolloutPlan) -> impl Future<Output = Vec<String>> + Send {
        let _ = plan;
        std::future::ready(Vec::new())
    }

    /// The evidence for the current step of `plan`.
    fn snapshot(&self, plan: &RolloutPlan) -> impl Future<Output = MetricsSnapshot> + Send;

    /// Gives the plan's versions `weights`: held while the rollout runs, the route's
    /// own once it ended.
    fn set_weights(
        &self,
        plan: &RolloutPlan,
        weights: RolloutWeights,
        held: bool,
    ) -> impl Future<Output = Result<(), GatewayError>> + Send;

    /// Starts a new step window for the plan's versions.
    fn reset_step(
        &self,
        plan: &RolloutPlan,
    ) -> impl Future<Output = Result<(), GatewayError>> + Send;
}

/// How a target holds weights the driver sends: `held` while the rollout runs, with
/// the lease a remote target gives them.
fn holding(held: bool, lease: Option<Duration>) -> Holding {
    match held {
        true => Holding::Running { lease },
        false => Holding::Ended,
    }
}

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
    fn run(self, rollout: &mut Rollout, now: u64, note: &str) -> Result<Vec<Action>, GatewayError> {
        Ok(match self {
            Command::Pause => rollout.pause(now, note),
            Command::Resume => rollout.resume(now, note),
            Command::Promote => rollout.promote_now(now, note),
            Command::Abort => rollout.abort(now, note),
        }?)
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

/// A rollout and whether its weights are known to be in force on the target; the
/// state file keeps both, so final weights that did not reach every gateway before a
/// restart are still sent after it.
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    rollout: Rollout,
    #[serde(rename = "weights_applied")]
    synced: bool,
}

/// One rollout in the state file: an entry, or a bare rollout as files written before
/// `weights_applied` existed hold them.
#[derive(Deserialize)]
#[serde(untagged)]
enum Saved {
    Entry(Entry),
    Rollout(Rollout),
}

/// The rollouts of one target, one per model (the last one started).
#[derive(Debug)]
pub struct Driver<T> {
    target: T,
    state_file: Option<PathBuf>,
    entries: Mutex<BTreeMap<String, Entry>>,
    /// What `/metrics` shows, updated with every change (see [`Driver::gauges`]).
    gauges: std::sync::Mutex<RolloutGauges>,
    /// Where starts, commands and decisions are recorded.
    audit: Audit,
}

/// A rollout's state and canary weight, as the audit trail shows them before and after.
fn rollout_state(rollout: &Rollout) -> serde_json::Value {
    serde_json::json!({
        "state": rollout.state().label(),
        "canary_weight": rollout.canary_weight(),
    })
}

/// The audit record of `action` on `rollout`, which was `before`.
fn rollout_record(
    action: &str,
    rollout: &Rollout,
    before: Option<serde_json::Value>,
) -> crate::audit::Record {
    let plan = rollout.plan();
    let mut record = Audit::record_of(Kind::Rollout, action).about(&plan.model, Some(&plan.canary));
    record.before = before;
    record.after = Some(rollout_state(rollout));
    record.reason = rollout.history().last().map(|d| d.reason.clone());
    record
}

/// The rollouts as `/metrics` shows them: each model's rollout now, and how many have
/// ended each way since start-up.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RolloutGauges {
    /// Per model: the canary, the state's label and the step (running or paused).
    pub rollouts: BTreeMap<String, (String, &'static str, Option<usize>)>,
    /// Rollouts that ended since start-up, by the state they ended in.
    pub ended: BTreeMap<&'static str, u64>,
}

impl RolloutGauges {
    /// Takes in the rollouts now, counting those that ended since the last time.
    fn update(&mut self, entries: &BTreeMap<String, Entry>) {
        for (model, entry) in entries {
            let state = entry.rollout.state();
            let step = match state {
                RolloutState::Progressing { step, .. } | RolloutState::Paused { step, .. } => {
                    Some(*step)
                }
                _ => None,
            };
            let now = (entry.rollout.plan().canary.clone(), state.label(), step);
            let was_running = self
                .rollouts
                .get(model)
                .is_none_or(|(canary, label, _)| *canary != now.0 || !is_terminal_label(label));
            if state.is_terminal() && was_running {
                *self.ended.entry(state.label()).or_insert(0) += 1;
            }
            self.rollouts.insert(model.clone(), now);
        }
    }
}

fn is_terminal_label(label: &str) -> bool {
    matches!(label, "promoted" | "rolled back" | "aborted")
}

/// The driver of one gateway's own rollouts.
pub type Rollouts = Driver<LocalGateway>;

impl<T: Target> Driver<T> {
    /// A driver over `target` with the rollouts saved in `state_file` (if any); each
    /// one still running gets its weights back before this returns.
    pub async fn open(target: T, state_file: Option<PathBuf>) -> Result<Driver<T>, GatewayError> {
        let saved = match &state_file {
            Some(path) => load(path)?,
            None => Vec::new(),
        };
        let entries = saved
            .into_iter()
            .map(|saved| {
                let entry = match saved {
                    // A running rollout's weights are sent again on open in any case.
                    Saved::Entry(entry) => Entry {
                        synced: entry.synced && entry.rollout.state().is_terminal(),
                        ..entry
                    },
                    Saved::Rollout(rollout) => Entry {
                        synced: rollout.state().is_terminal(),
                        rollout,
                    },
                };
                (entry.rollout.plan().model.clone(), entry)
            })
            .collect();
        let mut gauges = RolloutGauges::default();
        gauges.update(&entries);
        // Rollouts that ended before this start are not this process's to count.
        gauges.ended.clear();
        let driver = Driver {
            target,
            state_file,
            entries: Mutex::new(entries),
            gauges: std::sync::Mutex::new(gauges),
            audit: Audit::off(),
        };
        let mut entries = driver.entries.lock().await;
        let mut resumed = false;
        for entry in entries.values_mut().filter(|e| !e.synced) {
            driver.sync(entry).await;
            resumed = true;
            tracing::info!(
                model = entry.rollout.plan().model,
                state = entry.rollout.state().label(),
                canary_weight = entry.rollout.canary_weight(),
                weights_applied = entry.synced,
                "rollout resumed from the state file"
            );
        }
        if resumed {
            driver.persist(&entries);
        }
        drop(entries);
        Ok(driver)
    }

    /// Records every start, command and decision in `audit`.
    pub fn with_audit(mut self, audit: Audit) -> Driver<T> {
        self.audit = audit;
        self
    }

    /// What the driver drives.
    pub fn target(&self) -> &T {
        &self.target
    }

    /// Starts each plan whose model has no running rollout and which has not run to its
    /// end already (a finished plan in the state file is not run again). Returns a note
    /// for every plan it did not start, with the reason.
    pub async fn start_plans(
        &self,
        plans: &BTreeMap<String, PlanConfig>,
    ) -> Result<Vec<String>, GatewayError> {
        let mut skipped = Vec::new();
        for (model, config) in plans {
            let plan = config.plan(model);
            let entries = self.entries.lock().await;
            match entries.get(model).map(|e| &e.rollout) {
                // Resumed from the state file, or already run to its end.
                Some(saved) if saved.plan() == &plan => continue,
                Some(saved) if !saved.state().is_terminal() => {
                    skipped.push(format!(
                        "rollouts.plans.{model}: not started: the model's rollout to version \"{}\" is still {}; \
                         abort it to start this plan",
                        saved.plan().canary,
                        saved.state().label()
                    ));
                    continue;
                }
                _ => drop(entries),
            }
            self.start(plan)
                .await
                .map_err(|error| GatewayError::Config {
                    path: format!("rollouts.plans.{model}"),
                    message: format!("cannot start the rollout: {error}"),
                })?;
        }
        Ok(skipped)
    }

    /// Checks `plan` against the target, starts it and applies its first step.
    pub async fn start(&self, plan: RolloutPlan) -> Result<RolloutStatus, GatewayError> {
        let mut problems = self.target.check(&plan).await;
        let rollout = Rollout::new(plan.clone());
        if let Err(errors) = &rollout {
            problems.extend(errors.errors().iter().map(ToString::to_string));
        }
        let mut rollout = match rollout {
            Ok(rollout) if problems.is_empty() => rollout,
            _ => return Err(GatewayError::InvalidRollout(problems)),
        };
        let unmet = self.target.preconditions(&plan).await;
        if !unmet.is_empty() {
            return Err(GatewayError::Refused(format!(
                "rollout refused: {}",
                unmet.join("; ")
            )));
        }
        let mut entries = self.entries.lock().await;
        if let Some(active) = entries
            .get(&plan.model)
            .filter(|e| !e.rollout.state().is_terminal())
        {
            return Err(GatewayError::Refused(format!(
                "model \"{}\" already has a rollout ({} to version \"{}\"); abort it first",
                plan.model,
                active.rollout.state().label(),
                active.rollout.plan().canary
            )));
        }
        let actions = rollout.start(now_ms())?;
        let mut entry = Entry {
            rollout,
            synced: false,
        };
        // A rollout that cannot take its first step is not kept.
        let applied = self.apply(&mut entry, &actions).await;
        let mut record = rollout_record("start", &entry.rollout, None);
        if let Err(error) = &applied {
            record = record.outcome(&error.status());
        }
        self.audit.record(record);
        applied?;
        tracing::info!(
            model = plan.model,
            canary = plan.canary,
            baseline = plan.baseline,
            "rollout started"
        );
        entries.insert(plan.model.clone(), entry);
        self.persist(&entries);
        self.status_of(&entries, &plan.model).await
    }

    /// Runs an operator command on the model's rollout.
    pub async fn command(
        &self,
        model: &str,
        command: Command,
        note: &str,
    ) -> Result<RolloutStatus, GatewayError> {
        let mut entries = self.entries.lock().await;
        let entry = entries
            .get_mut(model)
            .ok_or_else(|| GatewayError::NoRollout {
                model: model.to_owned(),
            })?;
        let before = rollout_state(&entry.rollout);
        let actions = command.run(&mut entry.rollout, now_ms(), note);
        let action = format!("{command:?}").to_lowercase();
        let actions = match actions {
            Ok(actions) => actions,
            Err(error) => {
                let record = rollout_record(&action, &entry.rollout, Some(before));
                self.audit.record(record.outcome(&error.status()));
                return Err(error);
            }
        };
        tracing::info!(
            model,
            ?command,
            note,
            state = entry.rollout.state().label(),
            "rollout command"
        );
        let applied = self.apply(entry, &actions).await;
        let mut record = rollout_record(&action, &entry.rollout, Some(before));
        if let Err(error) = &applied {
            record = record.outcome(&error.status());
        }
        self.audit.record(record);
        self.persist(&entries);
        applied?;
        self.status_of(&entries, model).await
    }

    /// The model's rollout and its current step's metrics.
    pub async fn status(&self, model: &str) -> Result<RolloutStatus, GatewayError> {
        let entries = self.entries.lock().await;
        self.status_of(&entries, model).await
    }

    /// Brings the target to every rollout's weights, then judges every running rollout
    /// once on its step's evidence and applies what it decides.
    pub async fn evaluate(&self) {
        let mut entries = self.entries.lock().await;
        let mut changed = false;
        let now = now_ms();
        for entry in entries.values_mut() {
            let terminal = entry.rollout.state().is_terminal();
            if !terminal || !entry.synced {
                let was_synced = entry.synced;
                self.sync(entry).await;
                changed |= terminal && entry.synced != was_synced;
            }
            if terminal {
                continue;
            }
            let snapshot = self.target.snapshot(entry.rollout.plan()).await;
            let before = rollout_state(&entry.rollout);
            let actions = entry.rollout.evaluate(now, &snapshot);
            if actions.is_empty() {
                continue;
            }
            changed = true;
            tracing::info!(
                model = entry.rollout.plan().model,
                state = entry.rollout.state().label(),
                reason = entry.rollout.history().last().map(|d| d.reason.as_str()),
                "rollout decision"
            );
            let applied = self.apply(entry, &actions).await;
            let mut record = rollout_record("decision", &entry.rollout, Some(before));
            if let Err(error) = applied {
                tracing::error!(model = entry.rollout.plan().model, %error, "could not apply a rollout decision; retrying next round");
                record = record.outcome(&error.status());
            }
            self.audit.record(record);
        }
        if changed {
            self.persist(&entries);
        }
    }

    /// Evaluates every `interval` until `stop` turns true.
    pub async fn run(self: Arc<Self>, interval: Duration, mut stop: watch::Receiver<bool>) {
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

    async fn status_of(
        &self,
        entries: &BTreeMap<String, Entry>,
        model: &str,
    ) -> Result<RolloutStatus, GatewayError> {
        let rollout = &entries
            .get(model)
            .ok_or_else(|| GatewayError::NoRollout {
                model: model.to_owned(),
            })?
            .rollout;
        let snapshot = self.target.snapshot(rollout.plan()).await;
        Ok(RolloutStatus {
            waiting_for: rollout.waiting_for(now_ms(), &snapshot),
            canary: snapshot.canary,
            baseline: snapshot.baseline,
            rollout: rollout.clone(),
        })
    }

    async fn apply(&self, entry: &mut Entry, actions: &[Action]) -> Result<(), GatewayError> {
        for action in actions {
            match action {
                Action::SetWeights { .. } => {
                    entry.synced = false;
                    self.set_weights(entry).await?;
                }
                Action::ResetStepMetrics => self.target.reset_step(entry.rollout.plan()).await?,
            }
        }
        Ok(())
    }

    /// Gives the target the weights the rollout's state calls for; a failure is logged
    /// and retried on the next round.
    async fn sync(&self, entry: &mut Entry) {
        if let Err(error) = self.set_weights(entry).await {
            tracing::warn!(model = entry.rollout.plan().model, %error, "cannot set the rollout's weights; retrying next round");
        }
    }

    async fn set_weights(&self, entry: &mut Entry) -> Result<(), GatewayError> {
        let rollout = &entry.rollout;
        let Some(canary_weight) = rollout.canary_weight() else {
            return Ok(());
        };
        let plan = rollout.plan();
        let weights = RolloutWeights {
            canary: plan.canary.clone(),
            canary_weight,
            baseline: plan.baseline.clone(),
            baseline_weight: 100 - canary_weight.min(100),
        };
        let held = !rollout.state().is_terminal();
        self.target.set_weights(plan, weights, held).await?;
        entry.synced = true;
        Ok(())
    }

    /// The rollouts as `/metrics` shows them.
    pub fn gauges(&self) -> RolloutGauges {
        self.gauges
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Saves the rollouts (with a state file) and publishes them for `/metrics`; called
    /// after every change. The file is written whole to a temporary file renamed over
    /// it, so a crash leaves the old or the new file, never half of one; a failure is
    /// logged and the rollout carries on in memory.
    fn persist(&self, entries: &BTreeMap<String, Entry>) {
        self.gauges
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .update(entries);
        let Some(path) = &self.state_file else {
            return;
        };
        let all: Vec<&Entry> = entries.values().collect();
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

/// Reads the state file; a missing file is no rollouts.
fn load(path: &Path) -> Result<Vec<Saved>, GatewayError> {
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

fn now_ms() -> u64 {
    aviary::unix_ms(SystemTime::now())
}

#[cfg(test)]
mod tests;
