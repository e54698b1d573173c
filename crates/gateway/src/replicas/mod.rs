//! A version served by several worker replicas: the `endpoints` of a route version,
//! each a worker address or a DNS name standing for many ([`discovery`]).
//!
//! Calls are balanced over the live replicas by tower's power-of-two-choices balancer
//! on their pending requests; a replica that cannot be reached, or fails
//! `EJECT_AFTER` calls in a row (broken, too slow), is ejected from the balancer for a
//! backoff that doubles up to `MAX_EJECTION`, then probed with a gRPC health check
//! (with a timeout) and let back in when it answers SERVING. A call that found its replica
//! unreachable is retried on another ([`retry`]). With no live replica, calls fail at
//! once with UNAVAILABLE. A task per replica set keeps the balancer's set in line with
//! DNS, ejections and probes; it ends with the set.

mod discovery;
mod retry;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use aviary::pb::inference::{
    ModelConfig, ModelInferResponse, ModelMetadataResponse, ModelStatistics,
    repository_index_response::ModelIndex,
};
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot, watch};
use tower::{
    Service, ServiceExt,
    balance::p2c::Balance,
    buffer::Buffer,
    discover::Change,
    load::{CompleteOnResponse, PendingRequests},
    retry::Retry,
    util::MapFuture,
};

pub use discovery::Configured;
pub use retry::{RetryPolicy, retryable};

use crate::{
    GatewayError,
    backend::{Backend, Remote, ReplicaCounts, WorkerCalls},
    stack::Call,
};

/// Failures in a row that eject a replica.
const EJECT_AFTER: u32 = 3;

/// The first ejection's length; each next one of the same replica doubles it.
const FIRST_EJECTION: Duration = Duration::from_millis(500);

/// The longest ejection.
const MAX_EJECTION: Duration = Duration::from_secs(30);

/// How long a probe of an ejected replica may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// How often DNS names are resolved again and ejected replicas looked at.
const REFRESH: Duration = Duration::from_millis(250);

/// Resolving names every `REFRESH` would be wasteful: names are looked up this often.
const DNS_REFRESH: Duration = Duration::from_secs(5);

/// Calls waiting for the balancer at once, per replica set.
const BUFFER: usize = 1024;

/// The balancer behind its buffer (so it can be shared), errors back as the gateway's.
#[derive(Clone)]
struct Balanced(Buffer<Call, BoxFuture<'static, Result<ModelInferResponse, tower::BoxError>>>);

impl Service<Call> for Balanced {
    type Response = ModelInferResponse;
    type Error = GatewayError;
    type Future = BoxFuture<'static, Result<ModelInferResponse, GatewayError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.0.poll_ready(cx).map_err(from_balancer)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let response = self.0.call(call);
        Box::pin(async move { response.await.map_err(from_balancer) })
    }
}

/// An error from the balancer's buffer: the call's own error, or the buffer's.
fn from_balancer(error: tower::BoxError) -> GatewayError {
    match error.downcast::<GatewayError>() {
        Ok(error) => *error,
        Err(other) => GatewayError::Unreachable(format!("replica balancer: {other}")),
    }
}

/// A replica as the balancer sees it: its client, and its run of failures.
#[derive(Clone)]
struct Tracked {
    endpoint: String,
    remote: Arc<Remote>,
    failures: Arc<AtomicU32>,
    events: mpsc::UnboundedSender<Event>,
}

impl fmt::Debug for Tracked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracked")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl Service<Call> for Tracked {
    type Response = ModelInferResponse;
    type Error = GatewayError;
    type Future = BoxFuture<'static, Result<ModelInferResponse, GatewayError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let result = this.remote.infer(call).await;
            match &result {
                Err(error) if error.is_backend_failure() => {
                    let failures = this.failures.fetch_add(1, Ordering::Relaxed) + 1;
                    // Unreachable is no passing fault: out at once, so the retry of
                    // this very call finds another replica.
                    let unreachable = retryable(error);
                    if failures == EJECT_AFTER || (unreachable && failures == 1) {
                        let _ = this.events.send(Event::Failing(this.endpoint.clone()));
                    }
                }
                _ => this.failures.store(0, Ordering::Relaxed),
            }
            result
        })
    }
}

/// What the replica set's task hears from the request path.
#[derive(Debug)]
enum Event {
    /// This replica failed `EJECT_AFTER` calls in a row.
    Failing(String),
}

/// Where one concrete replica is.
#[derive(Debug)]
enum Standing {
    /// In the balancer.
    Live,
    /// Out of it until `until`, then probed; the next ejection lasts `next`.
    Ejected { until: Instant, next: Duration },
}

/// The replicas of one endpoint list.
pub struct Replicas {
    location: String,
    service: Retry<RetryPolicy, Balanced>,
    policy: RetryPolicy,
    /// Clients of the replicas in the balancer now, for metadata and readiness.
    live: Arc<Mutex<BTreeMap<String, Arc<Remote>>>>,
    /// True once DNS names were looked up for the first time.
    resolved: watch::Receiver<bool>,
    ejections: Arc<AtomicU64>,
    _stop: oneshot::Sender<()>,
}

impl fmt::Debug for Replicas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replicas")
            .field("location", &self.location)
            .field("live", &self.live_endpoints())
            .finish()
    }
}

impl Replicas {
    /// The replicas of `endpoints` (URLs, IP or DNS hosts), connected lazily: the
    /// gateway starts even when none is up yet.
    pub fn new(endpoints: &[String], calls: &WorkerCalls) -> Result<Replicas, GatewayError> {
        let configured = endpoints
            .iter()
            .map(|e| {
                Configured::parse(e).map_err(|message| GatewayError::Config {
                    path: e.clone(),
                    message,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (changes_tx, changes) =
            mpsc::unbounded_channel::<Result<Change<String, _>, GatewayError>>();
        let discover = tokio_stream::wrappers::UnboundedReceiverStream::new(changes);
        let balance: Balance<_, Call> = Balance::new(discover);
        let boxed = MapFuture::new(balance, |f| Box::pin(f) as BoxFuture<'static, _>);
        let balanced = Balanced(Buffer::new(boxed, BUFFER));
        let policy = RetryPolicy::new();
        let (events_tx, events) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel();
        let live = Arc::new(Mutex::new(BTreeMap::new()));
        let (resolved_tx, resolved) = watch::channel(false);
        let ejections = Arc::new(AtomicU64::new(0));
        let mut manager = Manager {
            configured,
            calls: calls.clone(),
            server_names: BTreeMap::new(),
            changes: changes_tx,
            events_tx,
            standing: BTreeMap::new(),
            live: Arc::clone(&live),
            resolved_at: None,
            resolved: resolved_tx,
            ejections: Arc::clone(&ejections),
        };
        // Addresses need no lookup: they are in the balancer before the first call.
        manager.insert_literals();
        tokio::spawn(manager.run(events, stopped));
        Ok(Replicas {
            location: endpoints.join(","),
            service: Retry::new(policy.clone(), balanced),
            policy,
            live,
            resolved,
            ejections,
            _stop: stop,
        })
    }

    /// The replicas in the balancer now.
    pub fn live_endpoints(&self) -> Vec<String> {
        self.live().keys().cloned().collect()
    }

    fn live(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Remote>>> {
        // A map replaced whole under the lock: a poisoned lock still holds a whole map.
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One live replica's client, for calls any replica answers alike.
    fn any(&self) -> Result<Arc<Remote>, GatewayError> {
        self.live()
            .values()
            .next()
            .cloned()
            .ok_or_else(|| self.none_live())
    }

    fn none_live(&self) -> GatewayError {
        GatewayError::Unreachable(format!(
            "no replica of {} is up (all unreachable or ejected)",
            self.location
        ))
    }
}

impl Backend for Replicas {
    fn location(&self) -> &str {
        &self.location
    }

    fn replica_counts(&self) -> ReplicaCounts {
        ReplicaCounts {
            // Every one within the budget.
            retries: self.policy.retries(),
            ejections: self.ejections.load(Ordering::Relaxed),
        }
    }

    fn live_replicas(&self) -> Vec<String> {
        self.live_endpoints()
    }

    fn infer(&self, call: Call) -> BoxFuture<'_, Result<ModelInferResponse, GatewayError>> {
        let service = self.service.clone();
        let mut resolved = self.resolved.clone();
        Box::pin(async move {
            if self.live().is_empty() {
                // Right after start, names may not be looked up yet: wait for that
                // (within the deadline), not for replicas to come back.
                let first_lookup = resolved.wait_for(|done| *done);
                let _ = match call.expires_at() {
                    Some(deadline) => tokio::time::timeout_at(deadline.into(), first_lookup)
                        .await
                        .ok(),
                    None => Some(first_lookup.await),
                };
                if self.live().is_empty() {
                    return Err(self.none_live());
                }
            }
            service.oneshot(call).await
        })
    }

    fn ready(&self, model: String, version: String) -> BoxFuture<'_, bool> {
        let live: Vec<Arc<Remote>> = self.live().values().cloned().collect();
        Box::pin(async move {
            for remote in live {
                if remote.ready(model.clone(), version.clone()).await {
                    return true;
                }
            }
            false
        })
    }

    fn metadata(
        &self,
        model: String,
        version: String,
    ) -> BoxFuture<'_, Result<ModelMetadataResponse, GatewayError>> {
        Box::pin(async move { self.any()?.metadata(model, version).await })
    }

    fn config(
        &self,
        model: String,
        version: String,
    ) -> BoxFuture<'_, Result<ModelConfig, GatewayError>> {
        Box::pin(async move { self.any()?.config(model, version).await })
    }

    fn statistics(
        &self,
        model: String,
        version: String,
    ) -> BoxFuture<'_, Result<Vec<ModelStatistics>, GatewayError>> {
        Box::pin(async move { self.any()?.statistics(model, version).await })
    }

    fn index(&self) -> BoxFuture<'_, Result<Vec<ModelIndex>, GatewayError>> {
        Box::pin(async move { self.any()?.index().await })
    }
}

type Endpoint = PendingRequests<Tracked, CompleteOnResponse>;

/// Keeps the balancer's set equal to the resolved replicas less the ejected ones.
struct Manager {
    configured: Vec<Configured>,
    calls: WorkerCalls,
    /// The host each resolved endpoint was configured with: the name its TLS
    /// certificate must carry.
    server_names: BTreeMap<String, String>,
    changes: mpsc::UnboundedSender<Result<Change<String, Endpoint>, GatewayError>>,
    events_tx: mpsc::UnboundedSender<Event>,
    standing: BTreeMap<String, Standing>,
    live: Arc<Mutex<BTreeMap<String, Arc<Remote>>>>,
    resolved_at: Option<Instant>,
    resolved: watch::Sender<bool>,
    ejections: Arc<AtomicU64>,
}

impl Manager {
    async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<Event>,
        mut stopped: oneshot::Receiver<()>,
    ) {
        let mut ticker = tokio::time::interval(REFRESH);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stopped => return,
                Some(event) = events.recv() => match event {
                    Event::Failing(endpoint) => self.eject(&endpoint),
                },
                _ = ticker.tick() => {
                    if self.resolved_at.is_none_or(|at| at.elapsed() >= DNS_REFRESH) {
                        self.resolve().await;
                    }
                    self.probe_due().await;
                }
            }
        }
    }

    /// Brings the set in line with what the configured endpoints resolve to now. A
    /// name that does not resolve keeps the replicas it had.
    /// Puts the endpoints whose host is an address into the balancer.
    fn insert_literals(&mut self) {
        let literals: Vec<(String, String)> = self
            .configured
            .iter()
            .filter_map(|c| Some((c.literal()?, c.host().to_owned())))
            .collect();
        for (endpoint, host) in literals {
            self.server_names.insert(endpoint.clone(), host);
            self.insert(&endpoint);
        }
    }

    async fn resolve(&mut self) {
        self.resolved_at = Some(Instant::now());
        let mut wanted = BTreeSet::new();
        let mut complete = true;
        for configured in &self.configured {
            match configured.resolve().await {
                Ok(found) => {
                    for endpoint in &found {
                        self.server_names
                            .insert(endpoint.clone(), configured.host().to_owned());
                    }
                    wanted.extend(found);
                }
                Err(error) => {
                    tracing::warn!(?configured, %error, "cannot resolve a replica endpoint; keeping the replicas");
                    complete = false;
                }
            }
        }
        // A lookup that failed says nothing about who left: remove only on a full answer.
        let gone: Vec<String> = match complete {
            true => self
                .standing
                .keys()
                .filter(|e| !wanted.contains(*e))
                .cloned()
                .collect(),
            false => Vec::new(),
        };
        for endpoint in gone {
            tracing::info!(endpoint, "replica left");
            self.standing.remove(&endpoint);
            self.remove(&endpoint);
        }
        for endpoint in wanted {
            if !self.standing.contains_key(&endpoint) {
                tracing::info!(endpoint, "replica joined");
                self.insert(&endpoint);
            }
        }
        self.resolved.send_replace(true);
    }

    fn eject(&mut self, endpoint: &str) {
        let next = match self.standing.get(endpoint) {
            Some(Standing::Live) => FIRST_EJECTION,
            // Already out (a late report of a call made before): nothing to do.
            _ => return,
        };
        let live = self
            .standing
            .values()
            .filter(|s| matches!(s, Standing::Live))
            .count();
        if live <= 1 {
            // An empty balancer would hold calls until their deadline; the last replica
            // stays in, so its calls fail fast (and the version's breaker decides).
            tracing::warn!(endpoint, "replica failing, but it is the last one; kept in");
            return;
        }
        tracing::warn!(endpoint, ejected_for = ?next, "replica failing; ejected");
        self.ejections.fetch_add(1, Ordering::Relaxed);
        self.standing.insert(
            endpoint.to_owned(),
            Standing::Ejected {
                until: Instant::now() + next,
                next: (next * 2).min(MAX_EJECTION),
            },
        );
        self.remove(endpoint);
    }

    /// Probes every ejected replica whose ejection is over: SERVING lets it back in,
    /// anything else ejects it again for longer.
    async fn probe_due(&mut self) {
        let now = Instant::now();
        let due: Vec<(String, Duration)> = self
            .standing
            .iter()
            .filter_map(|(endpoint, standing)| match standing {
                Standing::Ejected { until, next } if *until <= now => {
                    Some((endpoint.clone(), *next))
                }
                _ => None,
            })
            .collect();
        for (endpoint, next) in due {
            let checked = self
                .calls
                .channel(&endpoint, self.server_name(&endpoint), |built| {
                    built.connect_timeout(PROBE_TIMEOUT)
                });
            if probe(checked).await {
                tracing::info!(endpoint, "replica answers again; back in");
                self.insert(&endpoint);
            } else {
                self.standing.insert(
                    endpoint,
                    Standing::Ejected {
                        until: Instant::now() + next,
                        next: (next * 2).min(MAX_EJECTION),
                    },
                );
            }
        }
    }

    /// The name `endpoint`'s certificate must carry: its configured host.
    fn server_name<'a>(&'a self, endpoint: &'a str) -> &'a str {
        self.server_names
            .get(endpoint)
            .map_or(endpoint, String::as_str)
    }

    fn insert(&mut self, endpoint: &str) {
        let remote = match Remote::connect_lazy(endpoint, &self.calls, self.server_name(endpoint)) {
            Ok(remote) => Arc::new(remote),
            Err(error) => {
                tracing::error!(endpoint, %error, "cannot make a client for a replica");
                return;
            }
        };
        let tracked = Tracked {
            endpoint: endpoint.to_owned(),
            remote: Arc::clone(&remote),
            failures: Arc::new(AtomicU32::new(0)),
            events: self.events_tx.clone(),
        };
        let service = PendingRequests::new(tracked, CompleteOnResponse::default());
        let _ = self
            .changes
            .send(Ok(Change::Insert(endpoint.to_owned(), service)));
        self.standing.insert(endpoint.to_owned(), Standing::Live);
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(endpoint.to_owned(), remote);
    }

    fn remove(&mut self, endpoint: &str) {
        let _ = self.changes.send(Ok(Change::Remove(endpoint.to_owned())));
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(endpoint);
    }
}

/// Whether the replica on `channel` (a lazy channel, or why there is none) answers the
/// gRPC health check with SERVING in time.
async fn probe(channel: Result<tonic::transport::Channel, GatewayError>) -> bool {
    let check = async {
        let channel = channel.ok()?;
        let response = tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .ok()?;
        Some(
            response.into_inner().status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
        )
    };
    tokio::time::timeout(PROBE_TIMEOUT, check)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}
