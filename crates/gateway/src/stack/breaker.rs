//! A circuit breaker per version: after `failures` consecutive failures it opens and
//! fails calls fast for `open_for`; then one probe call is let through (half-open):
//! its success closes the breaker, its failure opens it again. Pure state driven by
//! the caller's clock, and the tower layer that applies it.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use aviary::pb::inference::ModelInferResponse;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::{Call, VersionName};
use crate::GatewayError;

/// When a breaker opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failures that open it.
    pub failures: u32,
    /// How long it stays open before a probe.
    pub open_for: Duration,
}

/// Where a breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through; `failures` in a row so far.
    Closed {
        /// Consecutive failures.
        failures: u32,
    },
    /// Calls fail fast until `until`.
    Open {
        /// When a probe may go through.
        until: Instant,
    },
    /// One probe is out; other calls fail fast until it returns.
    HalfOpen,
}

impl BreakerState {
    /// `closed`, `open` or `half-open`, as the admin API and metrics say it.
    pub fn label(&self) -> &'static str {
        match self {
            BreakerState::Closed { .. } => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }
}

/// The decision for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Call through.
    Call,
    /// Call through as the half-open probe.
    Probe,
    /// Fail fast; a probe may go in `retry_in`.
    Reject {
        /// Time until the breaker lets a probe through.
        retry_in: Duration,
    },
}

/// One version's breaker.
#[derive(Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    state: Mutex<BreakerState>,
    opened: AtomicU64,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(settings: BreakerSettings) -> Breaker {
        Breaker {
            settings,
            state: Mutex::new(BreakerState::Closed { failures: 0 }),
            opened: AtomicU64::new(0),
        }
    }

    /// Times it opened (a failed probe opening it again counts too).
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Its settings.
    pub fn settings(&self) -> BreakerSettings {
        self.settings
    }

    /// Where it is now.
    pub fn state(&self) -> BreakerState {
        *self.lock()
    }

    /// Whether a call at `now` may go through.
    pub fn admit(&self, now: Instant) -> Admit {
        let mut state = self.lock();
        match *state {
            BreakerState::Closed { .. } => Admit::Call,
            BreakerState::Open { until } if now >= until => {
                *state = BreakerState::HalfOpen;
                Admit::Probe
            }
            BreakerState::Open { until } => Admit::Reject {
                retry_in: until - now,
            },
            BreakerState::HalfOpen => Admit::Reject {
                retry_in: Duration::ZERO,
            },
        }
    }

    /// Records the outcome of a call admitted at `admitted` (a probe's decides the
    /// half-open state), at `now`.
    pub fn record(&self, admitted: Admit, failed: bool, now: Instant) {
        let mut state = self.lock();
        let was_open = matches!(*state, BreakerState::Open { .. });
        *state = match (*state, admitted, failed) {
            (_, Admit::Probe, false) => BreakerState::Closed { failures: 0 },
            (_, Admit::Probe, true) => BreakerState::Open {
                until: now + self.settings.open_for,
            },
            (BreakerState::Closed { .. }, _, false) => BreakerState::Closed { failures: 0 },
            (BreakerState::Closed { failures }, _, true)
                if failures + 1 >= self.settings.failures =>
            {
                BreakerState::Open {
                    until: now + self.settings.open_for,
                }
            }
            (BreakerState::Closed { failures }, _, true) => BreakerState::Closed {
                failures: failures + 1,
            },
            // A call admitted before the breaker opened changes nothing after.
            (other, _, _) => other,
        };
        if !was_open && matches!(*state, BreakerState::Open { .. }) {
            self.opened.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records that a call admitted at `admitted` ended without a verdict (its client
    /// gave up on it) at `now`: if it was the probe, the next call probes instead, or
    /// the breaker would stay half-open, failing every call, for good.
    pub fn abandon(&self, admitted: Admit, now: Instant) {
        let mut state = self.lock();
        if admitted == Admit::Probe && *state == BreakerState::HalfOpen {
            *state = BreakerState::Open { until: now };
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        // The state is one Copy value, whole after every write.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Applies a [`Breaker`] to a version's calls.
#[derive(Debug, Clone)]
pub struct BreakerLayer {
    breaker: Arc<Breaker>,
    name: Arc<VersionName>,
}

impl BreakerLayer {
    /// The layer of the version `name`.
    pub fn new(breaker: Arc<Breaker>, name: Arc<VersionName>) -> BreakerLayer {
        BreakerLayer { breaker, name }
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = BreakerService<S>;

    fn layer(&self, inner: S) -> BreakerService<S> {
        BreakerService {
            inner,
            layer: self.clone(),
        }
    }
}

/// A service behind a breaker.
#[derive(Debug, Clone)]
pub struct BreakerService<S> {
    inner: S,
    layer: BreakerLayer,
}

impl<S> Service<Call> for BreakerService<S>
where
    S: Service<Call, Response = ModelInferResponse, Error = GatewayError>,
{
    type Response = ModelInferResponse;
    type Error = GatewayError;
    type Future = BreakerFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let admitted = self.layer.breaker.admit(Instant::now());
        if let Admit::Reject { retry_in } = admitted {
            return BreakerFuture::Rejected {
                error: Some(GatewayError::BreakerOpen {
                    model: self.layer.name.model.clone(),
                    version: self.layer.name.version.clone(),
                    retry_in_ms: retry_in.as_millis(),
                }),
            };
        }
        let owed = Owed {
            breaker: Arc::clone(&self.layer.breaker),
            admitted,
            deadline_is_clients: call.deadline.is_some_and(|d| d.clients),
            settled: false,
        };
        BreakerFuture::Admitted {
            response: self.inner.call(call),
            owed,
        }
    }
}

/// What an admitted call owes its breaker: its outcome, recorded when it ends. A call
/// dropped unfinished (its client gave up) leaves no verdict.
#[derive(Debug)]
pub struct Owed {
    breaker: Arc<Breaker>,
    admitted: Admit,
    deadline_is_clients: bool,
    settled: bool,
}

impl Owed {
    fn settle(&mut self, result: &Result<ModelInferResponse, GatewayError>) {
        let failed = result.as_ref().err().is_some_and(|error| {
            // A client that asked for less time than the route gives a call and did
            // not get its answer in it was in a hurry; the version did not fail.
            error.is_backend_failure() && !(self.deadline_is_clients && error.is_deadline())
        });
        self.breaker.record(self.admitted, failed, Instant::now());
        self.settled = true;
    }
}

impl Drop for Owed {
    fn drop(&mut self) {
        if !self.settled {
            self.breaker.abandon(self.admitted, Instant::now());
        }
    }
}

pin_project! {
    /// A call refused by an open breaker, or an admitted call whose outcome the
    /// breaker records when it ends.
    #[project = BreakerProjection]
    pub enum BreakerFuture<F> {
        /// Refused: the error, taken when polled.
        Rejected { error: Option<GatewayError> },
        /// Admitted (as a call or as the half-open probe).
        Admitted {
            #[pin]
            response: F,
            owed: Owed,
        },
    }
}

impl<F> Future for BreakerFuture<F>
where
    F: Future<Output = Result<ModelInferResponse, GatewayError>>,
{
    type Output = Result<ModelInferResponse, GatewayError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            BreakerProjection::Rejected { error } => Poll::Ready(Err(error
                .take()
                .unwrap_or_else(|| GatewayError::Refused("breaker future polled again".into())))),
            BreakerProjection::Admitted { response, owed } => {
                let result = std::task::ready!(response.poll(cx));
                owed.settle(&result);
                Poll::Ready(result)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: BreakerSettings = BreakerSettings {
        failures: 3,
        open_for: Duration::from_secs(5),
    };

    #[test]
    fn consecutive_failures_open_it_and_a_success_in_between_resets_the_count() {
        let breaker = Breaker::new(SETTINGS);
        let t0 = Instant::now();
        for failed in [true, true, false, true, true] {
            assert_eq!(breaker.admit(t0), Admit::Call);
            breaker.record(Admit::Call, failed, t0);
        }
        assert_eq!(breaker.state(), BreakerState::Closed { failures: 2 });
        assert_eq!(breaker.opened(), 0);
        breaker.record(Admit::Call, true, t0);
        assert_eq!(breaker.state().label(), "open");
        assert_eq!(breaker.opened(), 1);
        assert_eq!(
            breaker.admit(t0 + Duration::from_secs(1)),
            Admit::Reject {
                retry_in: Duration::from_secs(4)
            }
        );
    }

    #[test]
    fn one_probe_after_the_open_period_decides() {
        let breaker = Breaker::new(SETTINGS);
        let t0 = Instant::now();
        for _ in 0..3 {
            breaker.record(Admit::Call, true, t0);
        }
        let later = t0 + SETTINGS.open_for;
        assert_eq!(breaker.admit(later), Admit::Probe);
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(
            matches!(breaker.admit(later), Admit::Reject { .. }),
            "one probe at a time"
        );
        breaker.record(Admit::Probe, true, later);
        assert_eq!(
            breaker.state(),
            BreakerState::Open {
                until: later + SETTINGS.open_for
            },
            "a failed probe opens it again"
        );
        assert_eq!(breaker.opened(), 2, "and counts as opening");
        let again = later + SETTINGS.open_for;
        assert_eq!(breaker.admit(again), Admit::Probe);
        breaker.record(Admit::Probe, false, again);
        assert_eq!(breaker.state(), BreakerState::Closed { failures: 0 });
        assert_eq!(breaker.admit(again), Admit::Call);
    }

    #[test]
    fn calls_admitted_before_it_opened_change_nothing_after() {
        let breaker = Breaker::new(SETTINGS);
        let t0 = Instant::now();
        for _ in 0..3 {
            breaker.record(Admit::Call, true, t0);
        }
        breaker.record(Admit::Call, false, t0);
        assert_eq!(
            breaker.state().label(),
            "open",
            "a late success does not close it"
        );
        breaker.record(Admit::Call, true, t0);
        assert_eq!(breaker.opened(), 1, "a late failure does not open it twice");
    }
}
