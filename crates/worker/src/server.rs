//! The v2 gRPC service over a [`Worker`] (`aviary worker`), and [`serve`], the server
//! runner that the worker and the gateway share: message size limits, gRPC health and
//! server reflection on the same port, and graceful shutdown.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use aviary::pb::inference::{
    ModelConfigRequest, ModelConfigResponse, ModelInferRequest, ModelInferResponse,
    ModelMetadataRequest, ModelMetadataResponse, ModelReadyRequest, ModelReadyResponse,
    ModelStatisticsRequest, ModelStatisticsResponse, ModelStreamInferResponse,
    RepositoryIndexRequest, RepositoryIndexResponse, RepositoryModelLoadRequest,
    RepositoryModelLoadResponse, RepositoryModelUnloadRequest, RepositoryModelUnloadResponse,
    ServerLiveRequest, ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse,
    ServerReadyRequest, ServerReadyResponse,
    grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer},
};
use futures::{Stream, StreamExt};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, Streaming};
use tonic_health::server::HealthReporter;

use crate::{Worker, WorkerError};

/// Default largest gRPC message accepted or sent: 64 MiB, well above tonic's 4 MiB so
/// real tensors fit.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Extensions reported by `ServerMetadata`.
pub const EXTENSIONS: &[&str] = &["model_configuration", "statistics", "model_repository"];

/// gRPC health service name of the inference service.
pub const HEALTH_SERVICE: &str = "inference.GRPCInferenceService";

/// Response stream of `ModelStreamInfer`.
pub type InferStream =
    Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send + 'static>>;

/// How a server listens and stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeOptions {
    /// Largest request or response message, in bytes.
    pub max_message_bytes: usize,
    /// How long in-flight requests (and open streams) may run after shutdown begins.
    pub grace_period: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            grace_period: DEFAULT_GRACE_PERIOD,
        }
    }
}

/// Default time in-flight requests get to finish after shutdown begins.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(30);

/// Runs `service` on `listener` with health and reflection until `shutdown` resolves.
/// Then the listener closes at once (new connections are refused), in-flight requests
/// get up to `grace_period` to finish, and whatever is still open after that (an idle
/// stream, a health watch) is abandoned so the process can exit.
pub async fn serve<S, F>(
    service: S,
    listener: TcpListener,
    options: ServeOptions,
    health: HealthReporter,
    shutdown: F,
) -> Result<(), WorkerError>
where
    S: GrpcInferenceService,
    F: Future<Output = ()> + Send,
{
    let max_message_bytes = options.max_message_bytes;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(aviary::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| WorkerError::Serve(e.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| WorkerError::Serve(e.to_string()))?;
    let inference = GrpcInferenceServiceServer::new(service)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    let health_service =
        tonic_health::pb::health_server::HealthServer::new(health_service_from(health));
    let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = draining_tx.send(());
    };
    let serving = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(inference)
        .serve_with_incoming_shutdown(incoming(listener), shutdown);
    let grace_over = async move {
        if draining_rx.await.is_ok() {
            tokio::time::sleep(options.grace_period).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = serving => result.map_err(|e| WorkerError::Serve(e.to_string())),
        () = grace_over => {
            tracing::warn!(
                grace_period = ?options.grace_period,
                "grace period over; abandoning connections that are still open"
            );
            Ok(())
        }
    }
}

/// Accepted connections with TCP_NODELAY: without it, small responses wait for
/// delayed ACKs and the latency tail grows by ~40 ms.
pub fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

fn health_service_from(reporter: HealthReporter) -> impl tonic_health::pb::health_server::Health {
    tonic_health::server::HealthService::from_health_reporter(reporter)
}

/// Marks the inference service (and the whole server, `""`) serving or not.
pub async fn set_serving(health: &HealthReporter, serving: bool) {
    let status = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    health.set_service_status("", status).await;
    health.set_service_status(HEALTH_SERVICE, status).await;
}

/// The v2 service of a standalone worker.
#[derive(Debug, Clone)]
pub struct WorkerService {
    worker: Arc<Worker>,
}

impl WorkerService {
    /// Serves `worker`.
    pub fn new(worker: Arc<Worker>) -> WorkerService {
        WorkerService { worker }
    }
}

/// Answers a stream of inference requests with one response each, in order; a failed
/// request reports its error in the response and the stream goes on, as in Triton.
pub fn stream_responses<F, Fut>(inbound: Streaming<ModelInferRequest>, infer: F) -> InferStream
where
    F: Fn(ModelInferRequest) -> Fut + Send + 'static,
    Fut: Future<Output = Result<ModelInferResponse, Status>> + Send + 'static,
{
    Box::pin(inbound.then(move |next| {
        let result = next.map(&infer);
        async move {
            match result {
                Ok(pending) => Ok(match pending.await {
                    Ok(response) => ModelStreamInferResponse {
                        error_message: String::new(),
                        infer_response: Some(response),
                    },
                    Err(status) => ModelStreamInferResponse {
                        error_message: status.message().to_owned(),
                        infer_response: None,
                    },
                }),
                Err(status) => Err(status),
            }
        }
    }))
}

#[tonic::async_trait]
impl GrpcInferenceService for WorkerService {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: true }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let request = request.into_inner();
        let ready = self.worker.ready(&request.name, &request.version);
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(server_metadata()))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(
            self.worker.metadata(&request.name, &request.version)?,
        ))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        Ok(Response::new(
            self.worker.infer(request.into_inner()).await?,
        ))
    }

    type ModelStreamInferStream = InferStream;

    async fn model_stream_infer(
        &self,
        request: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<InferStream>, Status> {
        let worker = Arc::clone(&self.worker);
        Ok(Response::new(stream_responses(
            request.into_inner(),
            move |r| {
                let worker = Arc::clone(&worker);
                async move { worker.infer(r).await.map_err(Status::from) }
            },
        )))
    }

    async fn model_config(
        &self,
        request: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        let request = request.into_inner();
        let config = self.worker.config(&request.name, &request.version)?;
        Ok(Response::new(ModelConfigResponse {
            config: Some(config),
        }))
    }

    async fn model_statistics(
        &self,
        request: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        let request = request.into_inner();
        let model_stats = self.worker.statistics(&request.name, &request.version)?;
        Ok(Response::new(ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let models = self.worker.index(request.into_inner().ready);
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        let model = request.into_inner().model_name;
        self.worker.load_model(&model, &|_, _| true).await?;
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        let model = request.into_inner().model_name;
        self.worker.unload_model(&model).await?;
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }
}

/// `ServerMetadata` of every Aviary server.
pub fn server_metadata() -> ServerMetadataResponse {
    ServerMetadataResponse {
        name: aviary::SERVER_NAME.to_owned(),
        version: aviary::VERSION.to_owned(),
        extensions: EXTENSIONS.iter().map(|e| (*e).to_owned()).collect(),
    }
}

/// Runs a standalone worker server on `listener` until `shutdown` resolves. Health is
/// SERVING from the start (every version was loaded before the worker existed) and
/// turns NOT_SERVING as soon as shutdown begins.
pub async fn run_worker<F>(
    worker: Arc<Worker>,
    listener: TcpListener,
    options: ServeOptions,
    shutdown: F,
) -> Result<(), WorkerError>
where
    F: Future<Output = ()> + Send,
{
    let (health, _) = tonic_health::server::health_reporter();
    set_serving(&health, true).await;
    let draining = {
        let health = health.clone();
        async move {
            shutdown.await;
            set_serving(&health, false).await;
        }
    };
    serve(
        WorkerService::new(worker),
        listener,
        options,
        health,
        draining,
    )
    .await
}
