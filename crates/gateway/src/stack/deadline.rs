//! The call's deadline (the client's `grpc-timeout`, bounded by the route's limits)
//! bounds everything below it: waiting in the queue, the backend call, a remote
//! worker's own queue (the backend passes on what is left). A call past it ends with
//! DEADLINE_EXCEEDED at once, whatever the layers below are doing.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use aviary::pb::inference::ModelInferResponse;
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::{Layer, Service};

use super::{Call, VersionName};
use crate::GatewayError;

/// Ends a call of one version at its deadline.
#[derive(Debug, Clone)]
pub struct DeadlineLayer {
    name: Arc<VersionName>,
}

impl DeadlineLayer {
    /// The layer of the version `name`.
    pub fn new(name: Arc<VersionName>) -> DeadlineLayer {
        DeadlineLayer { name }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;

    fn layer(&self, inner: S) -> DeadlineService<S> {
        DeadlineService {
            inner,
            name: Arc::clone(&self.name),
        }
    }
}

/// A service whose calls end at their deadline.
#[derive(Debug, Clone)]
pub struct DeadlineService<S> {
    inner: S,
    name: Arc<VersionName>,
}

impl<S> Service<Call> for DeadlineService<S>
where
    S: Service<Call, Response = ModelInferResponse, Error = GatewayError>,
{
    type Response = ModelInferResponse;
    type Error = GatewayError;
    type Future = DeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let expiry = call
            .expires_at()
            .map(|d| tokio::time::sleep_until(d.into()));
        DeadlineFuture {
            response: self.inner.call(call),
            expiry,
            started: Instant::now(),
            name: Arc::clone(&self.name),
        }
    }
}

pin_project! {
    /// A call's response, or DEADLINE_EXCEEDED once its deadline passes (the response
    /// future is then dropped, which cancels what runs below).
    pub struct DeadlineFuture<F> {
        #[pin]
        response: F,
        #[pin]
        expiry: Option<Sleep>,
        started: Instant,
        name: Arc<VersionName>,
    }
}

impl<F> Future for DeadlineFuture<F>
where
    F: Future<Output = Result<ModelInferResponse, GatewayError>>,
{
    type Output = Result<ModelInferResponse, GatewayError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.response.poll(cx) {
            return Poll::Ready(result);
        }
        match this.expiry.as_pin_mut().map(|expiry| expiry.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(GatewayError::DeadlineExceeded {
                model: this.name.model.clone(),
                version: this.name.version.clone(),
                after_ms: this.started.elapsed().as_millis(),
            })),
            _ => Poll::Pending,
        }
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
        let result = DeadlineLayer::new(VersionName::of("demo", "1"))
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
            let result = DeadlineLayer::new(VersionName::of("demo", "1"))
                .layer(quick.clone())
                .oneshot(call(deadline))
                .await;
            assert!(result.is_ok(), "{result:?}");
        }
    }
}
