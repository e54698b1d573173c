//! The waiting room in front of a version: admitted calls (bounded above by tower's
//! `load_shed` + `concurrency_limit`) wait here for one of `max_in_flight` places, so a
//! full version answers the excess at once with RESOURCE_EXHAUSTED instead of queueing
//! without bound. Waiting happens in the call future, not in `poll_ready`: a call
//! that waits is admitted, not shed.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use aviary::pb::inference::ModelInferResponse;
use futures::future::BoxFuture;
use tokio::sync::Semaphore;
use tower::{Layer, Service};

use super::Call;
use crate::GatewayError;

/// Calls wait for one of the places of `in_flight`.
#[derive(Debug, Clone)]
pub struct QueueLayer {
    in_flight: Arc<Semaphore>,
}

impl QueueLayer {
    /// Calls go through `in_flight` places at a time.
    pub fn new(in_flight: Arc<Semaphore>) -> QueueLayer {
        QueueLayer { in_flight }
    }
}

impl<S> Layer<S> for QueueLayer {
    type Service = QueueService<S>;

    fn layer(&self, inner: S) -> QueueService<S> {
        QueueService {
            inner,
            in_flight: Arc::clone(&self.in_flight),
        }
    }
}

/// A service with a bounded number of calls in flight; the rest wait their turn.
#[derive(Debug, Clone)]
pub struct QueueService<S> {
    inner: S,
    in_flight: Arc<Semaphore>,
}

impl<S> Service<Call> for QueueService<S>
where
    S: Service<Call, Response = ModelInferResponse, Error = GatewayError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = ModelInferResponse;
    type Error = GatewayError;
    type Future = BoxFuture<'static, Result<ModelInferResponse, GatewayError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let in_flight = Arc::clone(&self.in_flight);
        let inner = self.inner.clone();
        Box::pin(async move {
            // The semaphore is never closed: acquiring only fails on a closed one.
            let _place = in_flight
                .acquire_owned()
                .await
                .map_err(|_| GatewayError::Refused("the version's queue is closed".to_owned()))?;
            tower::ServiceExt::oneshot(inner, call).await
        })
    }
}
