//! The bandit driver: one policy per bandit route, replanned when its interval is due
//! over a [`BanditTarget`]'s feedback, its weights applied there. A gateway drives its
//! own routes ([`LocalBandits`]); `aviary controller` drives many gateways' on their
//! summed feedback ([`super::fleet::FleetBandits`]).

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aviary::pb::admin::{BanditArm, BanditReport};
use aviary_router::bandit::{Posterior, posterior};
use rand::{SeedableRng, rngs::StdRng};
use tokio::sync::watch;

use super::{Arm, BanditConfig, Plan, arm_rewards, assignments::Assignments, plan};
use crate::{
    GatewayError,
    control::{BanditApplied, Control},
    metrics::Metrics,
};

/// How often a gateway's driver looks for routes that are due.
pub const LOCAL_TICK: Duration = Duration::from_millis(50);

/// One bandit route's arms and their feedback, as a target sees them now.
#[derive(Debug, Clone, PartialEq)]
pub struct BanditInput {
    /// The model.
    pub model: String,
    /// Its policy's setting.
    pub config: BanditConfig,
    /// Its arms, in the route's order.
    pub arms: Vec<Arm>,
}

/// Where a driver reads feedback and applies weights.
pub trait BanditTarget: Send + Sync + 'static {
    /// Every bandit route, with its arms' feedback now.
    fn inputs(&self) -> impl Future<Output = Vec<BanditInput>> + Send;

    /// Gives `model`'s arms `weights` (out of [`super::WEIGHT_SCALE`]); `report` is
    /// the policy's state, kept where experiment reports read it (with why the
    /// weights were not applied, if so).
    fn apply(
        &self,
        model: &str,
        weights: Vec<(String, u32)>,
        report: BanditReport,
    ) -> impl Future<Output = Result<BanditApplied, GatewayError>> + Send;

    /// Keeps `report` of a plan that gave no weights (no arm may take traffic).
    fn record(&self, model: &str, report: BanditReport) {
        tracing::warn!(
            model,
            why = report.not_applied,
            "the bandit has no weights to give"
        );
    }
}

/// One bandit route's policy between updates.
#[derive(Debug)]
struct Policy {
    config: BanditConfig,
    /// Seeded from the config's `seed`, so a seeded run draws the same shares.
    rng: StdRng,
    due: Instant,
}

impl Policy {
    fn new(config: &BanditConfig, now: Instant) -> Policy {
        let rng = match config.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_rng(&mut rand::rng()),
        };
        Policy {
            config: config.clone(),
            rng,
            due: now,
        }
    }
}

/// The policies of a target's bandit routes.
#[derive(Debug)]
pub struct Driver<T> {
    target: T,
    policies: Mutex<BTreeMap<String, Policy>>,
}

impl<T: BanditTarget> Driver<T> {
    /// A driver with no policy yet: each starts at the route's first update.
    pub fn new(target: T) -> Driver<T> {
        Driver {
            target,
            policies: Mutex::new(BTreeMap::new()),
        }
    }

    fn policies(&self) -> MutexGuard<'_, BTreeMap<String, Policy>> {
        self.policies.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replans every bandit route whose interval is due and applies its weights. A
    /// route whose setting changed starts a new policy (seeded again).
    pub async fn update(&self) {
        let inputs = self.target.inputs().await;
        let now = Instant::now();
        let planned: Vec<(BanditInput, Plan)> = {
            let mut policies = self.policies();
            // A round with no route at all may be a round no gateway answered: the
            // policies (their seeded draws) are kept for the next.
            if !inputs.is_empty() {
                policies.retain(|model, _| inputs.iter().any(|i| &i.model == model));
            }
            inputs
                .into_iter()
                .filter_map(|input| {
                    let policy = policies
                        .entry(input.model.clone())
                        .or_insert_with(|| Policy::new(&input.config, now));
                    if policy.config != input.config {
                        *policy = Policy::new(&input.config, now);
                    }
                    if policy.due > now {
                        return None;
                    }
                    policy.due = now + Duration::from_millis(policy.config.interval_ms);
                    let plan = plan(&policy.config, &input.arms, &mut policy.rng);
                    Some((input, plan))
                })
                .collect()
        };
        for (input, plan) in planned {
            let report = report(&input.config, &input.arms, &plan);
            if plan.weights.is_empty() {
                let report = BanditReport {
                    not_applied: "no arm may take traffic: none is approved under [registry] \
                                  with a canary cap of 0"
                        .to_owned(),
                    ..report
                };
                self.target.record(&input.model, report);
                continue;
            }
            if let Err(error) = self.target.apply(&input.model, plan.weights, report).await {
                tracing::warn!(model = input.model, %error, "the bandit's weights were not applied");
            }
        }
    }

    /// Updates every `tick` until `stop` turns true.
    pub async fn run(self: Arc<Self>, tick: Duration, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            self.update().await;
        }
    }
}

/// What an experiment report shows of a plan (applied: `not_applied` empty).
fn report(config: &BanditConfig, arms: &[Arm], plan: &Plan) -> BanditReport {
    let kind = config.kind();
    BanditReport {
        strategy: config.strategy_name().to_owned(),
        reward: config.reward_name().to_owned(),
        warmup: config.warmup,
        rewards: plan.rewards,
        warming_up: plan.warming_up,
        min_share: plan.floor,
        arms: arms
            .iter()
            .zip(&plan.shares)
            .map(|(arm, &share)| {
                let posterior = posterior(kind, &arm.rewards);
                let (alpha, beta) = match posterior {
                    Posterior::Beta { alpha, beta } => (alpha, beta),
                    Posterior::Normal { .. } => (0.0, 0.0),
                };
                BanditArm {
                    version: arm.version.clone(),
                    share,
                    rewards: arm.rewards.count,
                    mean_reward: arm.rewards.mean(),
                    posterior_alpha: alpha,
                    posterior_beta: beta,
                    posterior_mean: posterior.mean(),
                    posterior_sd: posterior.sd(),
                    max_share: arm.max_share,
                }
            })
            .collect(),
        updated_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        not_applied: String::new(),
    }
}

/// The report of a bandit route not planned yet: its setting, warming up, no arms.
pub fn pending_report(config: &BanditConfig) -> BanditReport {
    BanditReport {
        strategy: config.strategy_name().to_owned(),
        reward: config.reward_name().to_owned(),
        warmup: config.warmup,
        warming_up: true,
        min_share: config.min_share,
        ..BanditReport::default()
    }
}

/// Why weights were not applied, for the report; empty when they were.
pub fn not_applied(result: &Result<BanditApplied, GatewayError>) -> String {
    match result {
        Ok(BanditApplied::Published(_) | BanditApplied::Unchanged) => String::new(),
        Ok(BanditApplied::Held) => "a running rollout holds the weights".to_owned(),
        Err(error) => error.to_string(),
    }
}

/// A gateway's bandit state: the policies' last reports (its own driver's, or the
/// controller's) and the sticky users they placed.
#[derive(Debug)]
pub struct Bandits {
    /// Whether `aviary controller` plans this gateway's bandit routes.
    controlled: bool,
    reports: Mutex<BTreeMap<String, BanditReport>>,
    assignments: Assignments,
}

impl Bandits {
    /// No report yet; `controlled`: a controller plans the routes, not this gateway.
    pub fn new(controlled: bool) -> Bandits {
        Bandits {
            controlled,
            reports: Mutex::new(BTreeMap::new()),
            assignments: Assignments::default(),
        }
    }

    /// Whether `aviary controller` plans this gateway's bandit routes.
    pub fn controlled(&self) -> bool {
        self.controlled
    }

    /// Sticky users' versions on bandit routes.
    pub fn assignments(&self) -> &Assignments {
        &self.assignments
    }

    /// `model`'s policy as last updated.
    pub fn report(&self, model: &str) -> Option<BanditReport> {
        self.reports().get(model).cloned()
    }

    /// Whether sticky users placed on `model` `version` stay there: not once the
    /// policy holds it at its least share (starved) or at a cap (its users beyond the
    /// cap would pass it); before any plan, they do.
    pub fn keeps_users(&self, model: &str, version: &str) -> bool {
        let reports = self.reports();
        let Some(report) = reports.get(model) else {
            return true;
        };
        report.arms.iter().any(|arm| {
            arm.version == version && arm.max_share.is_none() && arm.share > report.min_share + 1e-3
        })
    }

    /// Keeps `model`'s latest report.
    pub fn record(&self, model: &str, report: BanditReport) {
        self.reports().insert(model.to_owned(), report);
    }

    /// Forgets the reports and sticky users of models that are no longer bandits.
    pub fn keep_only(&self, models: &[&str]) {
        let gone: Vec<String> = self
            .reports()
            .keys()
            .filter(|model| !models.contains(&model.as_str()))
            .cloned()
            .collect();
        for model in gone {
            self.reports().remove(&model);
            self.assignments.forget(&model);
        }
    }

    fn reports(&self) -> MutexGuard<'_, BTreeMap<String, BanditReport>> {
        self.reports.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A gateway's own bandit routes: feedback from its metrics, weights through its
/// [`Control`].
#[derive(Debug, Clone)]
pub struct LocalBandits {
    control: Arc<Control>,
    metrics: Arc<Metrics>,
}

impl LocalBandits {
    /// Over `control`'s routes and `metrics`' feedback.
    pub fn new(control: Arc<Control>, metrics: Arc<Metrics>) -> LocalBandits {
        LocalBandits { control, metrics }
    }
}

/// `control`'s bandit routes with their arms' feedback in `metrics`.
pub async fn local_inputs(control: &Control, metrics: &Metrics) -> Vec<BanditInput> {
    let routes = control.bandit_routes().await;
    let models: Vec<&str> = routes.iter().map(|r| r.model.as_str()).collect();
    control.bandits().keep_only(&models);
    routes
        .iter()
        .map(|route| BanditInput {
            model: route.model.clone(),
            config: route.config.clone(),
            arms: route
                .arms
                .iter()
                .map(|(version, configured)| {
                    let (outcomes, errors) = metrics.outcomes_and_failures(&route.model, version);
                    Arm {
                        version: version.clone(),
                        configured: *configured,
                        rewards: arm_rewards(&route.config, &outcomes, errors),
                        max_share: control.arm_cap(&route.model, version),
                    }
                })
                .collect(),
        })
        .collect()
}

/// Applies `weights` to `control`'s route of `model` and keeps `report`, saying why
/// they were not applied if so.
pub async fn apply_local(
    control: &Control,
    model: &str,
    weights: Vec<(String, u32)>,
    mut report: BanditReport,
) -> Result<BanditApplied, GatewayError> {
    let result = control.set_bandit_weights(model, weights).await;
    report.not_applied = not_applied(&result);
    control.bandits().record(model, report);
    result
}

impl BanditTarget for LocalBandits {
    async fn inputs(&self) -> Vec<BanditInput> {
        local_inputs(&self.control, &self.metrics).await
    }

    async fn apply(
        &self,
        model: &str,
        weights: Vec<(String, u32)>,
        report: BanditReport,
    ) -> Result<BanditApplied, GatewayError> {
        apply_local(&self.control, model, weights, report).await
    }

    fn record(&self, model: &str, report: BanditReport) {
        self.control.bandits().record(model, report);
    }
}
