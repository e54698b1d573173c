//! Injected faults for tests and game days: a delay before each call and a share of
//! calls failed with INTERNAL "injected fault". Below the breaker, so injected
//! failures count as the version's own.

use std::{
    task::{Context, Poll},
    time::Duration,
};

use aviary::pb::inference::ModelInferResponse;
use futures::future::BoxFuture;
use tower::{Layer, Service};

use super::Call;
use crate::{GatewayError, config::FaultConfig};

/// Injects `fault` into every call.
#[derive(Debug, Clone, Copy)]
pub struct FaultLayer {
    fault: FaultConfig,
}

impl FaultLayer {
    /// The layer of one version's configured fault.
    pub fn new(fault: FaultConfig) -> FaultLayer {
        FaultLayer { fault }
    }
}

impl<S> Layer<S> for FaultLayer {
    type Service = FaultService<S>;

    fn layer(&self, inner: S) -> FaultService<S> {
        FaultService {
            inner,
            fault: self.fault,
        }
    }
}

/// A service with injected faults.
#[derive(Debug, Clone)]
pub struct FaultService<S> {
    inner: S,
    fault: FaultConfig,
}

impl<S> Service<Call> for FaultService<S>
where
    S: Service<Call, Response = ModelInferResponse, Error = GatewayError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = ModelInferResponse;
    type Error = GatewayError;
    type Future = BoxFuture<'static, Result<ModelInferResponse, GatewayError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let fault = self.fault;
        // The ready clone goes into the future: the delay comes before the call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            if fault.delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(fault.delay_ms)).await;
            }
            if fault.error_rate > 0.0 && rand::random::<f64>() < fault.error_rate {
                return Err(GatewayError::InjectedFault {
                    model: call.request.model_name,
                    version: call.request.model_version,
                });
            }
            inner.call(call).await
        })
    }
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt;

    use super::*;
    use crate::stack::tests::{Fake, call};

    #[tokio::test]
    async fn an_error_rate_of_one_fails_every_call_without_calling_through() {
        let backend = Fake::answering_after(Duration::ZERO);
        let layer = FaultLayer::new(FaultConfig {
            error_rate: 1.0,
            delay_ms: 0,
        });
        for _ in 0..10 {
            let result = layer.layer(backend.clone()).oneshot(call(None)).await;
            assert!(matches!(result, Err(GatewayError::InjectedFault { .. })));
        }
        assert_eq!(backend.completed(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_comes_before_the_call() {
        let backend = Fake::answering_after(Duration::ZERO);
        let layer = FaultLayer::new(FaultConfig {
            error_rate: 0.0,
            delay_ms: 500,
        });
        let started = tokio::time::Instant::now();
        layer
            .layer(backend.clone())
            .oneshot(call(None))
            .await
            .expect("answered");
        assert!(started.elapsed() >= Duration::from_millis(500));
        assert_eq!(backend.completed(), 1);
    }
}
