//! The request path of one routed version as a stack of tower layers around its
//! backend, outermost first:
//!
//! 1. [`breaker`]: a version failing again and again fails fast (UNAVAILABLE) until a
//!    probe succeeds. Outermost, so it sees a call that missed the route's deadline
//!    as the version's failure (and one that missed a client's shorter deadline as
//!    no failure), and an open breaker costs a call no place in the queue;
//! 2. [`deadline`]: the call ends at its deadline (DEADLINE_EXCEEDED);
//! 3. tower's `load_shed` + `concurrency_limit`: at most `max_in_flight + max_queue`
//!    calls are admitted, the excess is answered at once with RESOURCE_EXHAUSTED;
//! 4. [`queue`]: admitted calls wait for one of `max_in_flight` places;
//! 5. [`fault`]: injected faults, when configured;
//! 6. the backend (in-process worker or remote worker), which passes the deadline on.
//!
//! The state of the layers ([`Guards`]: semaphores and breaker) lives in the routing
//! pools and outlives routing snapshots, so a weight change resets no limit and no
//! breaker; [`version_service`] composes the stack once per snapshot.

mod breaker;
mod deadline;
mod fault;
mod queue;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use aviary::pb::inference::{ModelInferRequest, ModelInferResponse};
use futures::future::BoxFuture;
use tokio::sync::Semaphore;
use tower::{
    BoxError, Service, ServiceBuilder, limit::GlobalConcurrencyLimitLayer,
    load_shed::error::Overloaded, util::BoxCloneSyncService,
};

pub use breaker::{Admit, Breaker, BreakerLayer, BreakerService, BreakerSettings, BreakerState};
pub use deadline::{DeadlineLayer, DeadlineService};
pub use fault::{FaultLayer, FaultService};
pub use queue::{QueueLayer, QueueService};

use crate::{GatewayError, backend::Backend, config::FaultConfig};

/// When a call must have ended, and whose time that is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    /// The instant.
    pub at: Instant,
    /// The client asked for less time than the route gives a call: a version that
    /// misses this deadline has not failed, the client was in a hurry (its breaker
    /// does not count it).
    pub clients: bool,
}

impl Deadline {
    /// The route's own deadline at `at`: a version that misses it failed the call.
    pub fn routes(at: Instant) -> Deadline {
        Deadline { at, clients: false }
    }
}

/// One inference on its way to a version: the request (its version resolved) and
/// when the client stops waiting for it.
#[derive(Debug, Clone)]
pub struct Call {
    /// The request, `model_version` set to the version that serves it.
    pub request: ModelInferRequest,
    /// When the call must have ended, and whose time that is; `None`: no deadline.
    pub deadline: Option<Deadline>,
    /// Attempts the call may take over a version's replicas, the first included: the
    /// version's `retry_attempts`, set by its stack.
    pub max_attempts: u32,
}

impl Call {
    /// A call of `request` until `deadline`, given one attempt until a version's stack
    /// sets its own.
    pub fn new(request: ModelInferRequest, deadline: Option<Deadline>) -> Call {
        Call {
            request,
            deadline,
            max_attempts: 1,
        }
    }

    /// When the call must have ended; `None`: no deadline.
    pub fn expires_at(&self) -> Option<Instant> {
        self.deadline.map(|d| d.at)
    }
}

/// Which version a stack serves, shared by its layers for their errors (the stack is
/// cloned for every call: an `Arc` is all a clone copies).
#[derive(Debug)]
pub struct VersionName {
    /// Model name.
    pub model: String,
    /// Version.
    pub version: String,
}

impl VersionName {
    /// The name of `model` at `version`.
    pub fn of(model: &str, version: &str) -> Arc<VersionName> {
        Arc::new(VersionName {
            model: model.to_owned(),
            version: version.to_owned(),
        })
    }
}

/// A version's request path, ready to call.
pub type InferService = BoxCloneSyncService<Call, ModelInferResponse, GatewayError>;

/// The limits of one route's versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The deadline of a call whose client sets none.
    pub timeout: Duration,
    /// The longest deadline a client may set; a longer one is cut to this.
    pub max_timeout: Duration,
    /// Calls in flight to the backend at once, per version.
    pub max_in_flight: usize,
    /// Calls waiting for a place beyond those, per version; more are refused.
    pub max_queue: usize,
    /// When the version's breaker opens.
    pub breaker: BreakerSettings,
    /// Attempts of a call over several replicas, the first included.
    pub retry_attempts: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(300),
            max_in_flight: 64,
            max_queue: 256,
            breaker: BreakerSettings {
                failures: 5,
                open_for: Duration::from_secs(5),
            },
            retry_attempts: 3,
        }
    }
}

/// Most attempts a call may be given: more would only multiply an outage (the retry
/// budget bounds them too).
const MAX_RETRY_ATTEMPTS: u32 = 10;

/// How much before the client's own deadline the gateway gives up on a call: the
/// server side of the connection cancels the call at the client's deadline, so the
/// gateway answers DEADLINE_EXCEEDED just before, rather than the client getting a
/// bare "cancelled".
const ANSWER_MARGIN: Duration = Duration::from_millis(10);

impl Limits {
    /// The first setting that cannot work, as (setting, reason).
    pub fn check(&self) -> Result<(), (&'static str, &'static str)> {
        let problem = if self.timeout.is_zero() {
            ("timeout_ms", "must be at least 1")
        } else if self.max_timeout < self.timeout {
            ("max_timeout_ms", "must be at least timeout_ms")
        } else if self.max_in_flight == 0 {
            (
                "max_in_flight",
                "must be at least 1: no call could ever run",
            )
        } else if self.breaker.failures == 0 {
            ("breaker_failures", "must be at least 1")
        } else if self.breaker.open_for.is_zero() {
            ("breaker_open_ms", "must be at least 1")
        } else if !(1..=MAX_RETRY_ATTEMPTS).contains(&self.retry_attempts) {
            ("retry_attempts", "must be 1 to 10")
        } else {
            return Ok(());
        };
        Err(problem)
    }

    /// The deadline of a call that arrives at `now` with the client's `timeout`.
    pub fn deadline(&self, client_timeout: Option<Duration>, now: Instant) -> Deadline {
        let timeout = match client_timeout {
            Some(timeout) => timeout
                .min(self.max_timeout)
                .saturating_sub(ANSWER_MARGIN.min(timeout / 10)),
            None => self.timeout,
        };
        Deadline {
            at: now + timeout,
            clients: client_timeout.is_some_and(|asked| asked < self.timeout),
        }
    }
}

/// The state of one version's layers, kept across routing snapshots.
#[derive(Debug)]
pub struct Guards {
    limits: Limits,
    admitted: Arc<Semaphore>,
    in_flight: Arc<Semaphore>,
    breaker: Arc<Breaker>,
    shed: Arc<AtomicU64>,
}

impl Guards {
    /// Fresh state for `limits`.
    pub fn new(limits: Limits) -> Guards {
        Guards {
            limits,
            admitted: Arc::new(Semaphore::new(
                limits.max_in_flight.saturating_add(limits.max_queue),
            )),
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
            breaker: Arc::new(Breaker::new(limits.breaker)),
            shed: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Calls refused because the version's queue was full.
    pub fn shed(&self) -> u64 {
        self.shed.load(Ordering::Relaxed)
    }

    /// The limits this state was made for.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The version's circuit breaker.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }
}

/// The request path of `model` at `version` over `backend`.
pub fn version_service(
    model: &str,
    version: &str,
    backend: Arc<dyn Backend>,
    fault: Option<FaultConfig>,
    guards: &Guards,
) -> InferService {
    let max_attempts = guards.limits.retry_attempts;
    layered(
        BackendService {
            backend,
            max_attempts,
        },
        model,
        version,
        fault,
        guards,
    )
}

/// The layers of [`version_service`] around any innermost service.
fn layered<S>(
    inner: S,
    model: &str,
    version: &str,
    fault: Option<FaultConfig>,
    guards: &Guards,
) -> InferService
where
    S: Service<Call, Response = ModelInferResponse, Error = GatewayError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let name = VersionName::of(model, version);
    let shedding = Arc::clone(&name);
    let (limits, shed) = (guards.limits, Arc::clone(&guards.shed));
    let service = ServiceBuilder::new()
        .layer(BreakerLayer::new(
            Arc::clone(&guards.breaker),
            Arc::clone(&name),
        ))
        .layer(DeadlineLayer::new(name))
        .map_err(move |error: BoxError| {
            let error = shed_error(error, &shedding, limits);
            if matches!(error, GatewayError::Overloaded { .. }) {
                shed.fetch_add(1, Ordering::Relaxed);
            }
            error
        })
        .load_shed()
        .layer(GlobalConcurrencyLimitLayer::with_semaphore(Arc::clone(
            &guards.admitted,
        )))
        .layer(QueueLayer::new(Arc::clone(&guards.in_flight)))
        .option_layer(fault.map(FaultLayer::new))
        .service(inner);
    BoxCloneSyncService::new(service)
}

/// The error below `load_shed`, back as the gateway's: a shed call is the version's
/// full queue.
fn shed_error(error: BoxError, name: &VersionName, limits: Limits) -> GatewayError {
    if error.is::<Overloaded>() {
        return GatewayError::Overloaded {
            model: name.model.clone(),
            version: name.version.clone(),
            in_flight: limits.max_in_flight,
            queued: limits.max_queue,
        };
    }
    match error.downcast::<GatewayError>() {
        Ok(error) => *error,
        Err(other) => GatewayError::Refused(other.to_string()),
    }
}

/// A backend as the innermost service of the stack, giving each call the version's
/// retry attempts.
#[derive(Debug, Clone)]
struct BackendService {
    backend: Arc<dyn Backend>,
    max_attempts: u32,
}

impl Service<Call> for BackendService {
    type Response = ModelInferResponse;
    type Error = GatewayError;
    type Future = BoxFuture<'static, Result<ModelInferResponse, GatewayError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut call: Call) -> Self::Future {
        let backend = Arc::clone(&self.backend);
        call.max_attempts = self.max_attempts;
        Box::pin(async move { backend.infer(call).await })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::AtomicUsize;

    use tower::ServiceExt;

    use super::*;

    /// A backend that answers after a delay (or fails), counting what it finished.
    #[derive(Debug, Clone)]
    pub(crate) struct Fake {
        delay: Duration,
        fail: Option<tonic::Code>,
        completed: Arc<AtomicUsize>,
    }

    impl Fake {
        pub(crate) fn answering_after(delay: Duration) -> Fake {
            Fake {
                delay,
                fail: None,
                completed: Arc::new(AtomicUsize::new(0)),
            }
        }

        pub(crate) fn failing() -> Fake {
            Fake::failing_with(tonic::Code::Unavailable, Duration::ZERO)
        }

        /// A remote worker answering `code` after `delay`.
        pub(crate) fn failing_with(code: tonic::Code, delay: Duration) -> Fake {
            Fake {
                fail: Some(code),
                ..Fake::answering_after(delay)
            }
        }

        pub(crate) fn completed(&self) -> usize {
            self.completed.load(Ordering::SeqCst)
        }
    }

    impl Service<Call> for Fake {
        type Response = ModelInferResponse;
        type Error = GatewayError;
        type Future = BoxFuture<'static, Result<ModelInferResponse, GatewayError>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, call: Call) -> Self::Future {
            let this = self.clone();
            Box::pin(async move {
                tokio::time::sleep(this.delay).await;
                this.completed.fetch_add(1, Ordering::SeqCst);
                match this.fail {
                    Some(code) => Err(GatewayError::Remote {
                        endpoint: "http://fake".into(),
                        status: tonic::Status::new(code, "failed"),
                    }),
                    None => Ok(ModelInferResponse {
                        model_name: call.request.model_name,
                        model_version: call.request.model_version,
                        ..ModelInferResponse::default()
                    }),
                }
            })
        }
    }

    /// A call with the route's own `deadline`.
    pub(crate) fn call(deadline: Option<Instant>) -> Call {
        Call::new(
            ModelInferRequest {
                model_name: "demo".into(),
                model_version: "1".into(),
                ..ModelInferRequest::default()
            },
            deadline.map(Deadline::routes),
        )
    }

    /// A call whose client asked for less time than the route gives: until `at`.
    fn hurried_call(at: Instant) -> Call {
        Call {
            deadline: Some(Deadline { at, clients: true }),
            ..call(None)
        }
    }

    /// The stack over a fake backend instead of a real one.
    fn stack(fake: Fake, limits: Limits) -> (InferService, Guards) {
        let guards = Guards::new(limits);
        (layered(fake, "demo", "1", None, &guards), guards)
    }

    #[tokio::test(start_paused = true)]
    async fn calls_beyond_the_queue_are_refused_at_once_and_the_rest_answered() {
        let slow = Fake::answering_after(Duration::from_millis(100));
        let limits = Limits {
            max_in_flight: 2,
            max_queue: 3,
            ..Limits::default()
        };
        let (service, guards) = stack(slow.clone(), limits);
        let calls: Vec<_> = (0..8)
            .map(|_| tokio::spawn(service.clone().oneshot(call(None))))
            .collect();
        let mut answered = 0;
        let mut refused = Vec::new();
        for handle in calls {
            match handle.await.expect("task") {
                Ok(_) => answered += 1,
                Err(error) => refused.push(error),
            }
        }
        assert_eq!(answered, 5, "two in flight and three queued: {refused:?}");
        assert_eq!(refused.len(), 3);
        assert_eq!(guards.shed(), 3, "every refusal is counted");
        for error in &refused {
            assert!(
                matches!(
                    error,
                    GatewayError::Overloaded {
                        in_flight: 2,
                        queued: 3,
                        ..
                    }
                ),
                "{error:?}"
            );
        }
        assert_eq!(slow.completed(), 5);
        let status = tonic::Status::from(refused.remove(0));
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("model \"demo\" version \"1\""),
            "{status:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_version_opens_its_breaker_and_fails_fast() {
        let down = Fake::failing();
        let limits = Limits {
            breaker: BreakerSettings {
                failures: 3,
                open_for: Duration::from_secs(5),
            },
            ..Limits::default()
        };
        let (service, guards) = stack(down.clone(), limits);
        for _ in 0..3 {
            let result = service.clone().oneshot(call(None)).await;
            assert!(
                matches!(result, Err(GatewayError::Remote { .. })),
                "{result:?}"
            );
        }
        assert_eq!(guards.breaker().state().label(), "open");
        let fast = service.clone().oneshot(call(None)).await;
        assert!(
            matches!(fast, Err(GatewayError::BreakerOpen { .. })),
            "{fast:?}"
        );
        assert_eq!(down.completed(), 3, "an open breaker calls nothing");
        let status = tonic::Status::from(fast.expect_err("open"));
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }

    const THREE_FAILURES: Limits = Limits {
        breaker: BreakerSettings {
            failures: 3,
            open_for: Duration::from_secs(5),
        },
        timeout: Duration::from_secs(30),
        max_timeout: Duration::from_secs(300),
        max_in_flight: 64,
        max_queue: 256,
        retry_attempts: 3,
    };

    #[tokio::test(start_paused = true)]
    async fn a_version_that_misses_the_routes_deadline_opens_its_breaker() {
        let hung = Fake::answering_after(Duration::from_secs(60));
        let (service, guards) = stack(hung, THREE_FAILURES);
        for _ in 0..3 {
            let deadline = Instant::now() + Duration::from_millis(100);
            let result = service.clone().oneshot(call(Some(deadline))).await;
            assert!(
                matches!(result, Err(GatewayError::DeadlineExceeded { .. })),
                "{result:?}"
            );
        }
        assert_eq!(guards.breaker().state().label(), "open");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_deadline_shorter_than_the_routes_never_opens_the_breaker() {
        // Missed at the gateway's timer, or answered DEADLINE_EXCEEDED by the worker
        // the deadline was passed on to: neither is the version failing.
        let hung = Fake::answering_after(Duration::from_secs(60));
        let expiring = Fake::failing_with(tonic::Code::DeadlineExceeded, Duration::ZERO);
        for fake in [hung, expiring] {
            let (service, guards) = stack(fake, THREE_FAILURES);
            for _ in 0..10 {
                let at = Instant::now() + Duration::from_millis(100);
                let result = service.clone().oneshot(hurried_call(at)).await;
                assert!(
                    result.as_ref().is_err_and(GatewayError::is_deadline),
                    "{result:?}"
                );
            }
            assert_eq!(
                guards.breaker().state(),
                BreakerState::Closed { failures: 0 }
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_its_client_gives_up_on_leaves_the_next_call_to_probe() {
        let (service, guards) = stack(
            Fake::answering_after(Duration::from_secs(60)),
            THREE_FAILURES,
        );
        // Opened long enough ago that the next call is the probe.
        let long_ago = Instant::now() - Duration::from_secs(10);
        for _ in 0..3 {
            guards.breaker().record(Admit::Call, true, long_ago);
        }
        for _ in 0..3 {
            let probe = service.clone().oneshot(call(None));
            let gave_up = tokio::time::timeout(Duration::from_millis(10), probe).await;
            assert!(gave_up.is_err(), "the probe's client stopped waiting");
            assert_eq!(
                guards.breaker().admit(Instant::now()),
                Admit::Probe,
                "the next call probes: {:?}",
                guards.breaker().state()
            );
            guards.breaker().abandon(Admit::Probe, Instant::now());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_dropped_unfinished_gives_its_breaker_no_verdict() {
        let (service, guards) = stack(
            Fake::answering_after(Duration::from_secs(60)),
            THREE_FAILURES,
        );
        for _ in 0..5 {
            let call = service.clone().oneshot(call(None));
            let gave_up = tokio::time::timeout(Duration::from_millis(10), call).await;
            assert!(gave_up.is_err(), "the client stopped waiting");
        }
        assert_eq!(
            guards.breaker().state(),
            BreakerState::Closed { failures: 0 }
        );
    }

    #[test]
    fn a_client_deadline_is_capped_and_a_missing_one_defaulted() {
        let limits = Limits {
            timeout: Duration::from_secs(2),
            max_timeout: Duration::from_secs(10),
            ..Limits::default()
        };
        let now = Instant::now();
        let at = |client: Option<Duration>| limits.deadline(client, now).at;
        assert_eq!(at(None), now + Duration::from_secs(2));
        assert_eq!(
            at(Some(Duration::from_millis(300))),
            now + Duration::from_millis(290),
            "the gateway answers just before the client's deadline"
        );
        assert_eq!(
            at(Some(Duration::from_millis(50))),
            now + Duration::from_millis(45),
            "by at most a tenth of it"
        );
        assert_eq!(
            at(Some(Duration::from_secs(60))),
            now + Duration::from_secs(10) - Duration::from_millis(10)
        );
    }

    #[test]
    fn only_a_client_asking_for_less_than_the_routes_timeout_owns_the_deadline() {
        let limits = Limits {
            timeout: Duration::from_secs(2),
            ..Limits::default()
        };
        let now = Instant::now();
        let clients = |client: Option<Duration>| limits.deadline(client, now).clients;
        assert!(!clients(None));
        assert!(clients(Some(Duration::from_millis(300))));
        assert!(!clients(Some(Duration::from_secs(2))));
        assert!(!clients(Some(Duration::from_secs(60))));
    }
}
