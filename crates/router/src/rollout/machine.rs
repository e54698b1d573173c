//! The rollout state machine: where a rollout is, what it decides, and why.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::gates::{self, MetricsSnapshot, StepMetrics};
use super::plan::RolloutPlan;
use crate::error::{ValidationError, ValidationErrors};

/// Where a rollout is.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "state", rename_all = "snake_case", deny_unknown_fields)]
pub enum RolloutState {
    /// Created but not started; the route's weights are untouched.
    Pending,
    /// Holding a step until its evidence is in.
    Progressing {
        /// Index into the plan's steps.
        step: usize,
        /// When the step began, in wall-clock milliseconds (so it survives a restart).
        step_started_ms: u64,
    },
    /// Held at a step by an operator, or by input drift (`pause_on_input_drift`):
    /// nothing advances, but a failed gate still rolls back.
    Paused {
        /// Index into the plan's steps.
        step: usize,
        /// When it paused, in wall-clock milliseconds.
        paused_at_ms: u64,
    },
    /// The canary has all the traffic. Terminal.
    Promoted,
    /// A gate failed and the baseline has all the traffic again. Terminal.
    RolledBack {
        /// Which gate failed, with its numbers.
        reason: String,
    },
    /// An operator stopped the rollout and the baseline has all the traffic again. Terminal.
    Aborted {
        /// What the operator said.
        reason: String,
    },
}

impl RolloutState {
    /// A short name for messages: `pending`, `progressing`, `paused`, `promoted`, `rolled back`, `aborted`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Progressing { .. } => "progressing",
            Self::Paused { .. } => "paused",
            Self::Promoted => "promoted",
            Self::RolledBack { .. } => "rolled back",
            Self::Aborted { .. } => "aborted",
        }
    }

    /// Whether the rollout is over: nothing changes it any more.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::Promoted | Self::RolledBack { .. } | Self::Aborted { .. }
        )
    }
}

/// What the driver must do, in order, for a decision to take effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Route the model's traffic in these percentages; they add up to 100.
    SetWeights {
        /// The canary's share, 0..=100.
        canary_weight: u32,
        /// The baseline's share, `100 - canary_weight`.
        baseline_weight: u32,
    },
    /// Count both versions' step metrics from zero again: a new step (or a resumed one) begins.
    ResetStepMetrics,
}

impl Action {
    fn weights(canary: u32) -> Self {
        let canary = canary.min(100);
        Self::SetWeights {
            canary_weight: canary,
            baseline_weight: 100 - canary,
        }
    }
}

/// One state change, with why it happened and the numbers behind it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionRecord {
    /// When, in wall-clock milliseconds.
    pub at_ms: u64,
    /// The state before.
    pub from: RolloutState,
    /// The state after.
    pub to: RolloutState,
    /// The actions handed to the driver.
    pub actions: Vec<Action>,
    /// Why, in words, e.g. `canary error rate 0.083 exceeds baseline 0.010 + 0.010`.
    pub reason: String,
    /// The measurements and limits the decision was made on, e.g. `canary_error_rate`.
    pub numbers: BTreeMap<String, f64>,
}

/// An operator command the rollout's state does not allow, e.g. resuming a promoted rollout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {command} the rollout of model {model:?}: it is {state}")]
pub struct CommandError {
    /// The refused command: `start`, `pause`, `resume`, `promote`, `abort`.
    pub command: &'static str,
    /// The model being rolled out.
    pub model: String,
    /// The state's label, see [`RolloutState::label`].
    pub state: &'static str,
}

/// What the baseline did in the last step it had traffic, for comparing a 100% canary with.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct BaselineReference {
    step: usize,
    metrics: StepMetrics,
}

/// One model's rollout: its plan, where it is, and every decision taken so far.
///
/// Pure: time is always an argument and metrics come from the driver. Serialize it
/// after every call that returned actions (or on every call) to persist it;
/// deserializing validates the plan and state again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "StoredRollout")]
pub struct Rollout {
    plan: RolloutPlan,
    state: RolloutState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    baseline_reference: Option<BaselineReference>,
    history: Vec<DecisionRecord>,
}

/// The persisted form, checked before it becomes a [`Rollout`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredRollout {
    plan: RolloutPlan,
    state: RolloutState,
    #[serde(default)]
    baseline_reference: Option<BaselineReference>,
    history: Vec<DecisionRecord>,
}

impl TryFrom<StoredRollout> for Rollout {
    type Error = ValidationErrors;

    fn try_from(stored: StoredRollout) -> Result<Self, Self::Error> {
        let mut errors = Vec::new();
        stored.plan.check(&mut errors);
        for error in &mut errors {
            error.path = format!("plan.{}", error.path);
        }
        if let RolloutState::Progressing { step, .. } | RolloutState::Paused { step, .. } =
            stored.state
            && step >= stored.plan.steps.len()
        {
            errors.push(ValidationError {
                path: "state.step".to_owned(),
                message: format!(
                    "step index {step} does not exist; the plan has {} steps",
                    stored.plan.steps.len()
                ),
            });
        }
        match ValidationErrors::from_vec(errors) {
            Some(errors) => Err(errors),
            None => Ok(Self {
                plan: stored.plan,
                state: stored.state,
                baseline_reference: stored.baseline_reference,
                history: stored.history,
            }),
        }
    }
}

/// What one evaluation concludes.
enum Verdict {
    RollBack {
        reason: String,
        numbers: BTreeMap<String, f64>,
    },
    Advance {
        step: usize,
        reason: String,
        numbers: BTreeMap<String, f64>,
    },
    Pause {
        step: usize,
        reason: String,
        numbers: BTreeMap<String, f64>,
    },
    Hold {
        blockers: Vec<String>,
    },
    Idle,
}

impl Rollout {
    /// A pending rollout of a checked plan.
    pub fn new(plan: RolloutPlan) -> Result<Self, ValidationErrors> {
        plan.validate()?;
        Ok(Self {
            plan,
            state: RolloutState::Pending,
            baseline_reference: None,
            history: Vec::new(),
        })
    }

    /// The plan being followed.
    pub fn plan(&self) -> &RolloutPlan {
        &self.plan
    }

    /// Where the rollout is.
    pub fn state(&self) -> &RolloutState {
        &self.state
    }

    /// Every decision so far, oldest first.
    pub fn history(&self) -> &[DecisionRecord] {
        &self.history
    }

    /// The canary weight the current state calls for; `None` while pending.
    ///
    /// A driver that has just loaded a persisted rollout applies this, and resets its
    /// step metrics: the step keeps its start time, so after a restart it needs its
    /// minimum requests again but not its minimum duration.
    pub fn canary_weight(&self) -> Option<u32> {
        match self.state {
            RolloutState::Pending => None,
            RolloutState::Progressing { step, .. } | RolloutState::Paused { step, .. } => {
                Some(self.step_weight(step))
            }
            RolloutState::Promoted => Some(100),
            RolloutState::RolledBack { .. } | RolloutState::Aborted { .. } => Some(0),
        }
    }

    /// Starts the first step.
    pub fn start(&mut self, now_ms: u64) -> Result<Vec<Action>, CommandError> {
        if self.state != RolloutState::Pending {
            return Err(self.refuse("start"));
        }
        let weight = self.step_weight(0);
        let reason = format!("started at {}", self.step_name(0));
        let numbers = BTreeMap::from([("canary_weight".to_owned(), f64::from(weight))]);
        Ok(self.transition(
            now_ms,
            RolloutState::Progressing {
                step: 0,
                step_started_ms: now_ms,
            },
            vec![Action::weights(weight), Action::ResetStepMetrics],
            reason,
            numbers,
        ))
    }

    /// Judges the current step on `metrics` (both versions since the step began).
    ///
    /// A failed gate rolls back at once (canary weight 0), before the step's minimums,
    /// once the canary has `min_requests_for_rollback` requests. The step advances, or
    /// the last one promotes, only when it has lasted `min_duration_ms`, the canary has
    /// `min_requests`, the baseline has had requests if it has weight, and every
    /// configured gate has evidence and passes. With `pause_on_input_drift`, a
    /// progressing step whose snapshot reports input drift pauses instead (no actions;
    /// the features in the decision). Otherwise, and in every state but progressing and
    /// paused, nothing happens and no actions are returned.
    pub fn evaluate(&mut self, now_ms: u64, metrics: &MetricsSnapshot) -> Vec<Action> {
        match self.assess(now_ms, metrics) {
            Verdict::RollBack { reason, numbers } => self.transition(
                now_ms,
                RolloutState::RolledBack {
                    reason: reason.clone(),
                },
                vec![Action::weights(0)],
                reason,
                numbers,
            ),
            Verdict::Advance {
                step,
                reason,
                numbers,
            } => {
                if metrics.baseline.requests > 0 {
                    self.baseline_reference = Some(BaselineReference {
                        step,
                        metrics: metrics.baseline,
                    });
                }
                match self.plan.steps.get(step + 1) {
                    Some(next) => {
                        let reason = format!("{reason}; moving to {}", self.step_name(step + 1));
                        let actions = vec![Action::weights(next.weight), Action::ResetStepMetrics];
                        self.transition(
                            now_ms,
                            RolloutState::Progressing {
                                step: step + 1,
                                step_started_ms: now_ms,
                            },
                            actions,
                            reason,
                            numbers,
                        )
                    }
                    None => self.transition(
                        now_ms,
                        RolloutState::Promoted,
                        vec![Action::weights(100)],
                        format!("{reason}; promoting the canary"),
                        numbers,
                    ),
                }
            }
            Verdict::Pause {
                step,
                reason,
                numbers,
            } => self.pause_at(now_ms, step, reason, numbers),
            Verdict::Hold { .. } | Verdict::Idle => Vec::new(),
        }
    }

    /// What keeps the current step from advancing on `metrics`; empty when
    /// [`evaluate`](Self::evaluate) would act, or when the rollout is not running.
    pub fn waiting_for(&self, now_ms: u64, metrics: &MetricsSnapshot) -> Vec<String> {
        match self.assess(now_ms, metrics) {
            Verdict::Hold { blockers } => blockers,
            _ => Vec::new(),
        }
    }

    /// Holds the current step: it stops advancing until [`resume`](Self::resume).
    pub fn pause(&mut self, now_ms: u64, note: &str) -> Result<Vec<Action>, CommandError> {
        let RolloutState::Progressing { step, .. } = self.state else {
            return Err(self.refuse("pause"));
        };
        let reason = format!("paused at {} {}", self.step_name(step), by_operator(note));
        let numbers = self.position_numbers(step);
        Ok(self.pause_at(now_ms, step, reason, numbers))
    }

    /// Holds `step` from `now_ms`, an operator's or input drift's doing: no actions.
    fn pause_at(
        &mut self,
        now_ms: u64,
        step: usize,
        reason: String,
        numbers: BTreeMap<String, f64>,
    ) -> Vec<Action> {
        let paused = RolloutState::Paused {
            step,
            paused_at_ms: now_ms,
        };
        self.transition(now_ms, paused, Vec::new(), reason, numbers)
    }

    /// Restarts the paused step: its duration and request count begin again from `now_ms`.
    pub fn resume(&mut self, now_ms: u64, note: &str) -> Result<Vec<Action>, CommandError> {
        let RolloutState::Paused { step, .. } = self.state else {
            return Err(self.refuse("resume"));
        };
        let reason = format!(
            "resumed {}; {} starts over",
            by_operator(note),
            self.step_name(step)
        );
        let numbers = self.position_numbers(step);
        Ok(self.transition(
            now_ms,
            RolloutState::Progressing {
                step,
                step_started_ms: now_ms,
            },
            vec![
                Action::weights(self.step_weight(step)),
                Action::ResetStepMetrics,
            ],
            reason,
            numbers,
        ))
    }

    /// Gives the canary all the traffic now, skipping the remaining steps and gates.
    pub fn promote_now(&mut self, now_ms: u64, note: &str) -> Result<Vec<Action>, CommandError> {
        let numbers = self
            .running_numbers()
            .ok_or_else(|| self.refuse("promote"))?;
        Ok(self.transition(
            now_ms,
            RolloutState::Promoted,
            vec![Action::weights(100)],
            format!("promoted {}", by_operator(note)),
            numbers,
        ))
    }

    /// Stops the rollout and gives the baseline all the traffic.
    pub fn abort(&mut self, now_ms: u64, note: &str) -> Result<Vec<Action>, CommandError> {
        let numbers = self.running_numbers().ok_or_else(|| self.refuse("abort"))?;
        let reason = format!("aborted {}", by_operator(note));
        Ok(self.transition(
            now_ms,
            RolloutState::Aborted {
                reason: reason.clone(),
            },
            vec![Action::weights(0)],
            reason,
            numbers,
        ))
    }

    fn assess(&self, now_ms: u64, metrics: &MetricsSnapshot) -> Verdict {
        let (step, started_ms) = match self.state {
            RolloutState::Progressing {
                step,
                step_started_ms,
            } => (step, Some(step_started_ms)),
            RolloutState::Paused { step, .. } => (step, None),
            _ => return Verdict::Idle,
        };
        // `new` and deserialization check that the step exists.
        let Some(current) = self.plan.steps.get(step).copied() else {
            return Verdict::Idle;
        };
        let (baseline, baseline_name) = match self.baseline_reference {
            Some(reference) if metrics.baseline.requests == 0 => (
                reference.metrics,
                format!("baseline (as in step {})", reference.step + 1),
            ),
            _ => (metrics.baseline, "baseline".to_owned()),
        };
        let judgement = gates::judge(&self.plan.gates, metrics, &baseline, &baseline_name);
        let mut numbers = judgement.numbers;
        numbers.extend(self.position_numbers(step));
        let at = self.step_name(step);
        let min_for_rollback = self.plan.gates.min_requests_for_rollback;
        let canary_requests = metrics.canary.requests;

        if !judgement.failures.is_empty() && canary_requests >= min_for_rollback {
            numbers.insert(
                "min_requests_for_rollback".to_owned(),
                min_for_rollback as f64,
            );
            return Verdict::RollBack {
                reason: format!("gate failed at {at}: {}", judgement.failures.join("; ")),
                numbers,
            };
        }

        let mut blockers: Vec<String> = judgement
            .failures
            .into_iter()
            .map(|failure| {
                format!(
                    "{failure} (too little evidence to roll back: {canary_requests} of {min_for_rollback} canary requests)"
                )
            })
            .collect();
        let Some(started_ms) = started_ms else {
            blockers.push("paused (see the last decision); resume to go on".to_owned());
            return Verdict::Hold { blockers };
        };
        if let Some(drifting) = metrics
            .input_drift
            .as_ref()
            .filter(|d| self.plan.gates.pause_on_input_drift && !d.is_empty())
        {
            numbers.insert("input_drift_features".to_owned(), drifting.len() as f64);
            return Verdict::Pause {
                step,
                reason: format!(
                    "paused at {at}: input drift makes the comparison unreliable: {}",
                    drifting.join("; ")
                ),
                numbers,
            };
        }
        let elapsed = now_ms.saturating_sub(started_ms);
        if elapsed < current.min_duration_ms {
            blockers.push(format!(
                "{at} has run {elapsed} ms of {} ms",
                current.min_duration_ms
            ));
        }
        if canary_requests < current.min_requests {
            blockers.push(format!(
                "{canary_requests} of {} canary requests",
                current.min_requests
            ));
        }
        if current.weight < 100 && metrics.baseline.requests == 0 {
            blockers.push("no baseline requests in this step".to_owned());
        }
        blockers.extend(judgement.missing);
        if !blockers.is_empty() {
            return Verdict::Hold { blockers };
        }

        numbers.insert("elapsed_ms".to_owned(), elapsed as f64);
        numbers.insert("min_duration_ms".to_owned(), current.min_duration_ms as f64);
        numbers.insert("min_requests".to_owned(), current.min_requests as f64);
        Verdict::Advance {
            step,
            reason: format!(
                "{at} passed: ran {elapsed} ms (min {}), {canary_requests} canary requests (min {}), every gate within its limit",
                current.min_duration_ms, current.min_requests
            ),
            numbers,
        }
    }

    fn transition(
        &mut self,
        at_ms: u64,
        to: RolloutState,
        actions: Vec<Action>,
        reason: String,
        numbers: BTreeMap<String, f64>,
    ) -> Vec<Action> {
        let from = std::mem::replace(&mut self.state, to.clone());
        self.history.push(DecisionRecord {
            at_ms,
            from,
            to,
            actions: actions.clone(),
            reason,
            numbers,
        });
        actions
    }

    /// The step's weight; a step that does not exist (never, for a validated plan) gets 0,
    /// the side that leaves the baseline serving.
    fn step_weight(&self, step: usize) -> u32 {
        self.plan.steps.get(step).map_or(0, |s| s.weight)
    }

    fn step_name(&self, step: usize) -> String {
        format!(
            "step {}/{} (canary {}%)",
            step + 1,
            self.plan.steps.len(),
            self.step_weight(step)
        )
    }

    fn position_numbers(&self, step: usize) -> BTreeMap<String, f64> {
        BTreeMap::from([
            ("step".to_owned(), (step + 1) as f64),
            (
                "canary_weight".to_owned(),
                f64::from(self.step_weight(step)),
            ),
        ])
    }

    /// Where a rollout that operators may still promote or abort is; `None` once terminal.
    fn running_numbers(&self) -> Option<BTreeMap<String, f64>> {
        match self.state {
            RolloutState::Pending => Some(BTreeMap::from([("canary_weight".to_owned(), 0.0)])),
            RolloutState::Progressing { step, .. } | RolloutState::Paused { step, .. } => {
                Some(self.position_numbers(step))
            }
            _ => None,
        }
    }

    fn refuse(&self, command: &'static str) -> CommandError {
        CommandError {
            command,
            model: self.plan.model.clone(),
            state: self.state.label(),
        }
    }
}

fn by_operator(note: &str) -> String {
    if note.is_empty() {
        "by operator".to_owned()
    } else {
        format!("by operator: {note}")
    }
}
