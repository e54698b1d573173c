//! The request path of one routed version as a stack of tower layers around its
//! backend, outermost first:
//!
//! 1. [`deadline`]: the call ends at its deadline (DEADLINE_EXCEEDED);
//! 2. tower's `load_shed` + `concurrency_limit`: at most `max_in_flight + max_queue`
//!    calls are admitted, the excess is answered at once with RESOURCE_EXHAUSTED;
//! 3. [`queue`]: admitted calls wait for one of `max_in_flight` places;
//! 4. [`breaker`]: a version failing again and again fails fast (UNAVAILABLE) until a
//!    probe succeeds;
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

/// One inference on its way to a version: the request (its version resolved) and
/// when the client stops waiting for it.
#[derive(Debug, Clone)]
pub struct Call {
    /// The request, `model_version` set to the version that serves it.
    pub request: ModelInferRequest,
    /// When the call must have ended; `None`: no deadline.
    pub deadline: Option<Instant>,
    /// Attempts the call may take over a version's replicas, the first included: the
    /// version's `retry_attempts`, set by its stack.
    pub max_attempts: u32,
}

impl Call {
    /// A call of `request` until `deadline`, given one attempt until a version's stack
    /// sets its own.
    pub fn new(request: ModelInferRequest, deadline: Option<Instant>) -> Call {
        Call {
            request,
            deadline,
            max_attempts: 1,
        }
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
    pub fn deadline(&self, client_timeout: Option<Duration>, now: Instant) -> Instant {
        let timeout = match client_timeout {
            Some(timeout) => timeout
                .min(self.max_timeout)
                .saturating_sub(ANSWER_MARGIN.min(timeout / 10)),
            None => self.timeout,
        };
        now + timeout
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
        .layer(DeadlineLayer::new(Arc::clone(&name)))
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
        .layer(BreakerLayer::new(Arc::clone(&guards.breaker), name))
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
        fail: bool,
        completed: Arc<AtomicUsize>,
    }

    impl Fake {
        pub(crate) fn answering_after(delay: Duration) -> Fake {
            Fake {
                delay,
                fail: false,
                completed: Arc::new(AtomicUsize::new(0)),
            }
        }

        pub(crate) fn failing() -> Fake {
            Fake {
                fail: true,
                ..Fake::answering_after(Duration::ZERO)
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
                    true => Err(GatewayError::Remote {
                        endpoint: "http://fake".into(),
                        status: tonic::Status::unavailable("down"),
                    }),
                    false => Ok(ModelInferResponse {
                        model_name: call.request.model_name,
                        model_version: call.request.model_version,
                        ..ModelInferResponse::default()
                    }),
                }
            })
        }
    }

    pub(crate) fn call(deadline: Option<Instant>) -> Call {
        Call::new(
            ModelInferRequest {
                model_name: "demo".into(),
                model_version: "1".into(),
                ..ModelInferRequest::default()
            },
            deadline,
        )
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

    #[test]
    fn a_client_deadline_is_capped_and_a_missing_one_defaulted() {
        let limits = Limits {
            timeout: Duration::from_secs(2),
            max_timeout: Duration::from_secs(10),
            ..Limits::default()
        };
        let now = Instant::now();
        assert_eq!(limits.deadline(None, now), now + Duration::from_secs(2));
        assert_eq!(
            limits.deadline(Some(Duration::from_millis(300)), now),
            now + Duration::from_millis(290),
            "the gateway answers just before the client's deadline"
        );
        assert_eq!(
            limits.deadline(Some(Duration::from_millis(50)), now),
            now + Duration::from_millis(45),
            "by at most a tenth of it"
        );
        assert_eq!(
            limits.deadline(Some(Duration::from_secs(60)), now),
            now + Duration::from_secs(10) - Duration::from_millis(10)
        );
    }
}
