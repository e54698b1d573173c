//! The waiting room in front of a version: admitted calls (bounded above by tower's
//! `load_shed` + `concurrency_limit`) wait here for one of `max_in_flight` places, so a
//! full version answers the excess at once with RESOURCE_EXHAUSTED instead of queueing
//! without bound. Waiting happens in the call future, not in `poll_ready`: a call
//! that waits is admitted, not shed.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use aviary::pb::inference::ModelInferResponse;
use futures::future::BoxFuture;
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
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
    type Future = QueueFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        // Ready as soon as the layers below are: waiting for a place happens in the
        // call, so a waiting call counts as admitted.
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        // A free place (the usual case) goes straight through, with nothing to box.
        if let Ok(place) = Arc::clone(&self.in_flight).try_acquire_owned() {
            return QueueFuture::Placed {
                response: self.inner.call(call),
                _place: place,
            };
        }
        let in_flight = Arc::clone(&self.in_flight);
        // The clone waits and is made ready later; `self.inner` stays ready for the
        // next call, as tower's contract wants.
        let inner = self.inner.clone();
        QueueFuture::Waiting {
            waiting: Box::pin(async move {
                // The semaphore is never closed: acquiring only fails on a closed one.
                let _place = in_flight.acquire_owned().await.map_err(|_| {
                    GatewayError::Refused("the version's queue is closed".to_owned())
                })?;
                tower::ServiceExt::oneshot(inner, call).await
            }),
        }
    }
}

pin_project! {
    /// A call that found a place at once, or one waiting for a place.
    #[project = QueueProjection]
    pub enum QueueFuture<F> {
        /// Running, holding its place until it ends.
        Placed {
            #[pin]
            response: F,
            _place: OwnedSemaphorePermit,
        },
        /// Waiting for a place, then running.
        Waiting {
            waiting: BoxFuture<'static, Result<ModelInferResponse, GatewayError>>,
        },
    }
}

impl<F> Future for QueueFuture<F>
where
    F: Future<Output = Result<ModelInferResponse, GatewayError>>,
{
    type Output = Result<ModelInferResponse, GatewayError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            QueueProjection::Placed { response, .. } => response.poll(cx),
            QueueProjection::Waiting { waiting } => waiting.as_mut().poll(cx),
        }
    }
}
