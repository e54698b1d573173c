//! The call's deadline (the client's `grpc-timeout`, bounded by the route's limits)
//! bounds everything below it: waiting in the queue, the backend call, a remote
//! worker's own queue (the backend passes on what is left). A call past it ends with
//! DEADLINE_EXCEEDED at once, whatever the layers below are doing.

use std::task::{Context, Poll};

use aviary::pb::inference::ModelInferResponse;
use futures::future::BoxFuture;
use tower::{Layer, Service};

use super::Call;
use crate::GatewayError;

/// Ends a call at its deadline.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeadlineLayer;

impl<S> Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;

    fn layer(&self, inner: S) -> DeadlineService<S> {
        DeadlineService { inner }
    }
}

/// A service whose calls end at their deadline.
#[derive(Debug, Clone)]
pub struct DeadlineService<S> {
    inner: S,
}

impl<S> Service<Call> for DeadlineService<S>
where
    S: Service<Call, Response = ModelInferResponse, Error = GatewayError>,
    S::Future: Send + 'static,
{
    type Response = ModelInferResponse;
    type Error = GatewayError;
    type Future = BoxFuture<'static, Result<ModelInferResponse, GatewayError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let Some(deadline) = call.deadline else {
            return Box::pin(self.inner.call(call));
        };
        let started = std::time::Instant::now();
        let (model, version) = (
            call.request.model_name.clone(),
            call.request.model_version.clone(),
        );
        let response = self.inner.call(call);
        Box::pin(async move {
            match tokio::time::timeout_at(deadline.into(), response).await {
                Ok(result) => result,
                Err(_) => Err(GatewayError::DeadlineExceeded {
                    model,
                    version,
                    after_ms: started.elapsed().as_millis(),
                }),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tower::ServiceExt;

    use super::*;
    use crate::stack::tests::{Fake, call};

    #[tokio::test(start_paused = true)]
    async fn a_call_past_its_deadline_ends_with_deadline_exceeded() {
        let slow = Fake::answering_after(Duration::from_secs(10));
        let deadline = Instant::now() + Duration::from_secs(1);
        let result = DeadlineLayer
            .layer(slow.clone())
            .oneshot(call(Some(deadline)))
            .await;
        assert!(
            matches!(result, Err(GatewayError::DeadlineExceeded { .. })),
            "{result:?}"
        );
        assert_eq!(slow.completed(), 0, "the backend call was dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_within_its_deadline_or_without_one_is_answered() {
        let quick = Fake::answering_after(Duration::from_millis(10));
        let deadline = Instant::now() + Duration::from_secs(1);
        for deadline in [Some(deadline), None] {
            let result = DeadlineLayer
                .layer(quick.clone())
                .oneshot(call(deadline))
                .await;
            assert!(result.is_ok(), "{result:?}");
        }
    }
}
