//! The rollout target of `aviary controller`: many gateways reached through their
//! admin API. Evidence is the gateways' step windows summed (latency histograms bucket
//! by bucket, so the p99 is the fleet's); decisions go to every gateway.
//!
//! A gateway that does not answer is logged and left out of that round: it never holds
//! back the others, and the driver's next round brings it to the rollout's weights. A
//! running rollout's weights count as applied when at least one gateway took them (the
//! rest are caught up every round); a finished rollout's only when every gateway did.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use aviary::client::TokenChannel;
use aviary::pb::admin::{
    GetRoutesRequest, RolloutWeights as WeightsMessage, VariantStatsRequest, VersionRequest,
    fleet_client::FleetClient, models_client::ModelsClient, routes_client::RoutesClient,
};
use aviary_router::rollout::{MetricsSnapshot, RolloutPlan};
use aviary_worker::registry::Stage;
use tokio_rustls::rustls::pki_types::ServerName;
use tonic::transport::Channel;

use super::Target;
use crate::{GatewayError, backend::WatchedTls, control::RolloutWeights, metrics::Window};

/// How long one admin call to a gateway may take before it counts as unreachable.
const GATEWAY_TIMEOUT: Duration = Duration::from_secs(2);

/// Evaluate intervals a gateway holds a running rollout's weights without hearing
/// from the controller: a round or two can fail without the hold lapsing.
const LEASE_ROUNDS: u32 = 5;

/// The shortest lease, so that a fast evaluate interval still outlasts a slow round
/// (each gateway call may take up to `GATEWAY_TIMEOUT`).
const MIN_LEASE: Duration = Duration::from_secs(30);

/// Where the gateways are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gateways {
    /// Admin addresses, `HOST:PORT`.
    List(Vec<String>),
    /// A `NAME:PORT` resolved every round; each address is one gateway's admin API.
    Dns(String),
}

/// Many gateways, as the place a rollout reads its evidence from and applies its
/// decisions to.
#[derive(Debug)]
pub struct RemoteGateways {
    gateways: Gateways,
    lease: Duration,
    channels: Mutex<HashMap<String, Channel>>,
    /// The `authorization` header sent to every gateway (they check it with `[auth]`).
    authorization: aviary::client::Authorization,
    /// TLS to the gateways' admin listeners; `None`: plaintext.
    tls: Option<Arc<WatchedTls>>,
}

impl RemoteGateways {
    /// The gateways at `gateways`, driven every `evaluate_interval`. A running
    /// rollout's weights are held on each gateway for a lease of a few intervals,
    /// renewed every round: a controller that stops without ending its rollouts leaves
    /// the gateways free again once the lease runs out (the weights stay).
    pub fn new(gateways: Gateways, evaluate_interval: Duration) -> RemoteGateways {
        RemoteGateways {
            gateways,
            lease: (evaluate_interval * LEASE_ROUNDS).max(MIN_LEASE),
            channels: Mutex::new(HashMap::new()),
            authorization: aviary::client::Authorization::default(),
            tls: None,
        }
    }

    /// Calls the gateways over `tls` (its client certificate for admin listeners with
    /// a `client_ca`). A gateway's certificate must name the host its address is
    /// written with (the DNS name with [`Gateways::Dns`]). Rotated files are used by
    /// new connections once `tls` is watched.
    pub fn with_tls(mut self, tls: Arc<WatchedTls>) -> RemoteGateways {
        self.tls = Some(tls);
        self
    }

    /// Sends `authorization` (an `admin` key of the gateways) with every call.
    pub fn with_authorization(
        mut self,
        authorization: aviary::client::Authorization,
    ) -> RemoteGateways {
        self.authorization = authorization;
        self
    }

    /// The gateways' admin addresses now; a failed DNS lookup is logged and is none.
    pub(crate) async fn addresses(&self) -> Vec<String> {
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

    /// A channel to the gateway's admin API, made once and kept (it reconnects by
    /// itself), sending the key.
    fn channel(&self, address: &str) -> Result<TokenChannel, String> {
        let channel = self.kept_channel(address)?;
        Ok(TokenChannel::with_authorization(
            channel,
            self.authorization.clone(),
        ))
    }

    /// The host a gateway's certificate must name: the DNS name's, or the address's.
    fn server_name(&self, address: &str) -> String {
        let written = match &self.gateways {
            Gateways::Dns(name) => name.as_str(),
            Gateways::List(_) => address,
        };
        let host = written
            .rsplit_once(':')
            .map_or(written, |(host, _port)| host);
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned()
    }

    fn kept_channel(&self, address: &str) -> Result<Channel, String> {
        // The map only ever gains complete entries, so a poisoned lock holds good data.
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        // Over TLS too the URI is http://: the connector speaks TLS.
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(GATEWAY_TIMEOUT)
            .timeout(GATEWAY_TIMEOUT);
        let channel = match &self.tls {
            None => endpoint.connect_lazy(),
            Some(tls) => {
                let name = ServerName::try_from(self.server_name(address))
                    .map_err(|e| format!("not a TLS server name: {e}"))?;
                endpoint.connect_with_connector_lazy(tls.connector(name))
            }
        };
        channels.insert(address.to_owned(), channel.clone());
        Ok(channel)
    }

    pub(crate) fn fleet(&self, address: &str) -> Result<FleetClient<TokenChannel>, String> {
        self.channel(address).map(FleetClient::new)
    }

    /// The versions of the gateway's route for `plan.model`, `None` when it has none;
    /// `Err` when the gateway cannot be reached.
    async fn route_versions(
        &self,
        address: &str,
        model: &str,
    ) -> Result<Option<Vec<String>>, String> {
        let mut client = RoutesClient::new(self.channel(address)?);
        let routes = client
            .get_routes(GetRoutesRequest {})
            .await
            .map_err(|status| status.message().to_owned())?
            .into_inner();
        Ok(routes
            .routes
            .into_iter()
            .find(|r| r.model == model)
            .map(|r| r.versions.into_iter().map(|v| v.version).collect()))
    }

    /// Why `plan` could never finish on the gateway at `address` under its
    /// `[registry]` (a canary not approved there, stepped past its cap); `Err` when the
    /// gateway cannot be asked. Stages are each gateway's own.
    async fn unapproved(
        &self,
        address: &str,
        plan: &RolloutPlan,
    ) -> Result<Option<String>, String> {
        let mut client = ModelsClient::new(self.channel(address)?);
        let answer = client
            .get_stage(VersionRequest {
                model: plan.model.clone(),
                version: plan.canary.clone(),
            })
            .await
            .map_err(|status| status.message().to_owned())?
            .into_inner();
        let stage = match answer.stage.filter(|_| answer.enforced) {
            None => return Ok(None),
            Some(stage) => Stage::from_name(&stage.stage).ok_or_else(|| {
                format!("stage \"{}\" is not one this controller knows", stage.stage)
            })?,
        };
        Ok(
            crate::registry::plan_past_cap(plan, stage, answer.canary_cap_percent)
                .map(|why| format!("canary: on gateway {address}, {why}")),
        )
    }
}

impl Target for RemoteGateways {
    async fn check(&self, plan: &RolloutPlan) -> Vec<String> {
        let gateways = self.addresses().await;
        let mut problems = Vec::new();
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
        for field in gates.data_gates() {
            problems.push(format!(
                "gates.{field}: the controller does not read the workers' drift tracking (only aviary serve's own rollouts do); remove this gate"
            ));
        }
        let mut reached = 0;
        let mut unreachable = Vec::new();
        for address in &gateways {
            let versions = match self.route_versions(address, &plan.model).await {
                Ok(versions) => versions,
                Err(error) => {
                    tracing::warn!(gateway = address, error, "cannot read the gateway's routes");
                    unreachable.push(format!("{address}: {error}"));
                    continue;
                }
            };
            reached += 1;
            let Some(versions) = versions else {
                problems.push(format!(
                    "model: gateway {address} has no route for model \"{}\"",
                    plan.model
                ));
                continue;
            };
            for (field, version) in [("canary", &plan.canary), ("baseline", &plan.baseline)] {
                if !version.is_empty() && !versions.contains(version) {
                    problems.push(format!(
                        "{field}: version \"{version}\" is not in gateway {address}'s route for model \"{}\"",
                        plan.model
                    ));
                }
            }
        }
        if reached == 0 {
            let why = match unreachable.is_empty() {
                true => "none is configured or resolved".to_owned(),
                false => unreachable.join("; "),
            };
            problems.push(format!(
                "no gateway answered ({}): the controller needs at least one ({why})",
                gateways.join(", ")
            ));
        }
        problems
    }

    /// Each gateway's own `[registry]` judges the canary: one that has not approved it
    /// refuses every step past its cap, so the rollout could never finish. And a
    /// bandit route's weights are its policy's: a rollout would fight it.
    async fn preconditions(&self, plan: &RolloutPlan) -> Vec<String> {
        let mut unmet = Vec::new();
        for address in self.addresses().await {
            match self.unapproved(&address, plan).await {
                Ok(why) => unmet.extend(why),
                Err(error) => unmet.push(format!(
                    "gateway {address} did not say the canary's stage: {error}"
                )),
            }
            let bandits = match self.fleet(&address) {
                Ok(mut client) => client
                    .get_bandit_feedback(aviary::pb::admin::BanditFeedbackRequest {})
                    .await
                    .map(|r| r.into_inner().routes)
                    .map_err(|status| status.message().to_owned()),
                Err(error) => Err(error),
            };
            match bandits {
                Ok(routes) if routes.iter().any(|r| r.model == plan.model) => unmet.push(format!(
                    "routes.{}.bandit: gateway {address} learns the model's weights with a bandit \
                     policy; remove the bandit from its config file to roll out a version",
                    plan.model
                )),
                Ok(_) => {}
                Err(error) => unmet.push(format!(
                    "gateway {address} did not say whether the route is a bandit: {error}"
                )),
            }
        }
        unmet
    }

    /// The canary's and the baseline's step windows summed over every gateway that
    /// answers; one that does not is logged and left out of this round.
    async fn snapshot(&self, plan: &RolloutPlan) -> MetricsSnapshot {
        let (mut canary, mut baseline) = (Window::new(), Window::new());
        for address in self.addresses().await {
            let stats = match self.fleet(&address) {
                Ok(mut client) => client
                    .get_variant_stats(VariantStatsRequest {
                        model: plan.model.clone(),
                    })
                    .await
                    .map_err(|status| status.message().to_owned()),
                Err(error) => Err(error),
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
            ..MetricsSnapshot::default()
        }
    }

    async fn set_weights(
        &self,
        plan: &RolloutPlan,
        weights: RolloutWeights,
        held: bool,
    ) -> Result<(), GatewayError> {
        let gateways = self.addresses().await;
        let message = WeightsMessage {
            model: plan.model.clone(),
            canary: weights.canary,
            canary_weight: weights.canary_weight,
            baseline: weights.baseline,
            baseline_weight: weights.baseline_weight,
            held,
            lease_ms: u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX),
        };
        let mut missed = Vec::new();
        for address in &gateways {
            let result = match self.fleet(address) {
                Ok(mut client) => client
                    .set_rollout_weights(message.clone())
                    .await
                    .map(|r| r.into_inner().generation)
                    .map_err(|status| status.message().to_owned()),
                Err(error) => Err(error),
            };
            match result {
                Ok(generation) => tracing::debug!(
                    gateway = address,
                    model = plan.model,
                    generation,
                    "rollout weights set"
                ),
                Err(error) => {
                    tracing::warn!(
                        gateway = address,
                        model = plan.model,
                        error,
                        "cannot set the rollout's weights"
                    );
                    missed.push(format!("{address} ({error})"));
                }
            }
        }
        let enough = match held {
            true => missed.len() < gateways.len(),
            false => missed.is_empty(),
        };
        match enough {
            true => Ok(()),
            false => Err(GatewayError::Unreachable(format!(
                "the rollout's weights did not reach {} (sent again every round until they do)",
                if missed.is_empty() {
                    "any gateway (none found)".to_owned()
                } else {
                    missed.join(", ")
                }
            ))),
        }
    }

    async fn reset_step(&self, plan: &RolloutPlan) -> Result<(), GatewayError> {
        for address in self.addresses().await {
            let reset = match self.fleet(&address) {
                Ok(mut client) => client
                    .reset_variant_stats(VariantStatsRequest {
                        model: plan.model.clone(),
                    })
                    .await
                    .map(drop)
                    .map_err(|status| status.message().to_owned()),
                Err(error) => Err(error),
            };
            if let Err(error) = reset {
                tracing::warn!(gateway = address, error, "cannot reset the gateway's stats");
            }
        }
        Ok(())
    }
}
