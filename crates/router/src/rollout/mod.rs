//! Progressive rollouts: moving a model's traffic from a baseline version to a canary,
//! step by step, while gates compare the two.
//!
//! A [`Rollout`] is a pure state machine. It reads no clock and does no I/O: the
//! driver (the gateway, or one `aviary controller` for many gateways) passes the time
//! in wall-clock milliseconds and a [`MetricsSnapshot`] of both versions since the
//! current step began, and applies the [`Action`]s it gets back, in order. The driver:
//!
//! 1. builds a [`RolloutPlan`], calls [`Rollout::new`] and [`Rollout::start`];
//! 2. every few seconds calls [`Rollout::evaluate`] with fresh metrics, resetting its
//!    counters on [`Action::ResetStepMetrics`];
//! 3. forwards operator commands: [`Rollout::pause`], [`Rollout::resume`],
//!    [`Rollout::promote_now`], [`Rollout::abort`];
//! 4. persists the rollout (it is `Serialize`/`Deserialize`, e.g. with `serde_json`)
//!    whenever a call returned actions, and after a restart loads it, applies
//!    [`Rollout::canary_weight`] and carries on.
//!
//! States: pending, progressing (step k), paused, promoted, rolled back, aborted. A
//! failed gate rolls back at once; too little evidence only waits, so a canary that
//! gets no traffic is never promoted. Every state change is kept in
//! [`Rollout::history`] as a [`DecisionRecord`] with its reason and numbers.
//!
//! # Layout
//!
//! - `plan`: [`RolloutPlan`], [`Step`] and [`Gates`], and their validation.
//! - `gates`: [`StepMetrics`] and [`MetricsSnapshot`], and how the gates judge them.
//! - `machine`: [`Rollout`], [`RolloutState`], [`Action`], [`DecisionRecord`] and
//!   [`CommandError`].

mod gates;
mod machine;
mod plan;

pub use gates::{FeatureValue, MetricsSnapshot, StepMetrics};
pub use machine::{Action, CommandError, DecisionRecord, Rollout, RolloutState};
pub use plan::{Gates, RolloutPlan, Step};

#[cfg(test)]
mod tests;
