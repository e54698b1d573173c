//! When a call to one replica fails because that replica is unreachable, it is tried
//! again, on whichever replica the balancer picks then (an unreachable one is soon
//! ejected): at most the call's `max_attempts` in all (the version's
//! `retry_attempts`), after a short jittered backoff, only while the call's deadline
//! allows, and only within a retry budget (at most a fifth more load than the calls
//! themselves, plus a small floor), so retries cannot multiply an outage. Inference is
//! idempotent, so a retried call is safe.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aviary::pb::inference::ModelInferResponse;
use futures::future::BoxFuture;
use tower::retry::{
    Policy,
    budget::{Budget, TpsBudget},
};

use crate::{GatewayError, stack::Call};

/// Backoff before the first retry; doubled for each next one, with jitter.
const BASE_BACKOFF: Duration = Duration::from_millis(5);

/// The retry policy of one version's replicas; clones share the budget and counters.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    budget: Arc<TpsBudget>,
    retries: Arc<AtomicU64>,
    attempts: u32,
}

impl RetryPolicy {
    /// A policy with a budget of 20 % of calls plus 10 retries a second, over 10 s.
    pub fn new() -> RetryPolicy {
        RetryPolicy {
            budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2)),
            retries: Arc::new(AtomicU64::new(0)),
            attempts: 1,
        }
    }

    /// Retries made so far.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::new()
    }
}

/// Whether another replica might answer: this one could not be reached, or broke
/// the connection. A replica's own answer (a bad request, a model error) is final.
pub fn retryable(error: &GatewayError) -> bool {
    match error {
        GatewayError::Remote { status, .. } => status.code() == tonic::Code::Unavailable,
        GatewayError::NoBackend { .. } | GatewayError::Unreachable(_) => true,
        _ => false,
    }
}

impl Policy<Call, ModelInferResponse, GatewayError> for RetryPolicy {
    type Future = BoxFuture<'static, ()>;

    fn retry(
        &mut self,
        call: &mut Call,
        result: &mut Result<ModelInferResponse, GatewayError>,
    ) -> Option<Self::Future> {
        let error = match result {
            Ok(_) => {
                self.budget.deposit();
                return None;
            }
            Err(error) => error,
        };
        if !retryable(error) || self.attempts >= call.max_attempts {
            return None;
        }
        let backoff = BASE_BACKOFF * 2u32.pow(self.attempts - 1);
        let delay = backoff / 2 + backoff.mul_f64(rand::random::<f64>() / 2.0);
        if call
            .expires_at()
            .is_some_and(|d| Instant::now() + delay >= d)
            || !self.budget.withdraw()
        {
            return None;
        }
        self.attempts += 1;
        self.retries.fetch_add(1, Ordering::Relaxed);
        Some(Box::pin(tokio::time::sleep(delay)))
    }

    fn clone_request(&mut self, call: &Call) -> Option<Call> {
        Some(call.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreachable() -> Result<ModelInferResponse, GatewayError> {
        Err(GatewayError::Remote {
            endpoint: "http://127.0.0.1:1".into(),
            status: tonic::Status::unavailable("connection refused"),
        })
    }

    fn call() -> Call {
        Call {
            max_attempts: 3,
            ..Call::new(Default::default(), None)
        }
    }

    #[tokio::test]
    async fn only_unreachable_replicas_are_retried_and_at_most_twice() {
        let mut policy = RetryPolicy::new();
        let mut call = call();
        assert!(policy.retry(&mut call, &mut unreachable()).is_some());
        assert!(policy.retry(&mut call, &mut unreachable()).is_some());
        assert!(
            policy.retry(&mut call, &mut unreachable()).is_none(),
            "three attempts in all"
        );
        let mut fresh = RetryPolicy::new();
        let mut invalid = Err(GatewayError::Remote {
            endpoint: "http://w".into(),
            status: tonic::Status::invalid_argument("bad input"),
        });
        assert!(
            fresh.retry(&mut call, &mut invalid).is_none(),
            "a replica's answer is final"
        );
    }

    #[tokio::test]
    async fn a_call_allowed_one_attempt_is_never_retried() {
        let mut policy = RetryPolicy::new();
        let mut call = Call {
            max_attempts: 1,
            ..call()
        };
        assert!(policy.retry(&mut call, &mut unreachable()).is_none());
        assert_eq!(policy.retries(), 0);
    }

    #[tokio::test]
    async fn a_call_whose_deadline_is_near_is_not_retried() {
        let mut policy = RetryPolicy::new();
        let mut call = Call {
            deadline: Some(crate::stack::Deadline::routes(Instant::now())),
            ..call()
        };
        assert!(policy.retry(&mut call, &mut unreachable()).is_none());
    }

    #[tokio::test]
    async fn the_budget_bounds_retries_when_everything_fails() {
        let policy = RetryPolicy::new();
        let mut granted = 0;
        for _ in 0..1000 {
            // Every call is a fresh clone of the service's policy, sharing its budget.
            let mut attempt = policy.clone();
            if attempt.retry(&mut call(), &mut unreachable()).is_some() {
                granted += 1;
            }
        }
        // No successes were deposited: only the reserve of the floor (10 a second over
        // the 10 s window) is there to withdraw from.
        assert!(
            (1..=100).contains(&granted),
            "{granted} retries granted for 1000 failing calls"
        );
        assert_eq!(policy.retries(), granted);
    }
}
