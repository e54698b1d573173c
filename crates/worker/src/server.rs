//! The v2 gRPC service over a [`Worker`] (`aviary worker`) and the standalone worker
//! server; the server runner itself is [`aviary::server`], shared with the gateway.

use std::{future::Future, sync::Arc, time::Instant};

use aviary::{
    calls::CallChecks,
    pb::inference::{
        CudaSharedMemoryRegisterRequest, CudaSharedMemoryRegisterResponse,
        CudaSharedMemoryStatusRequest, CudaSharedMemoryStatusResponse,
        CudaSharedMemoryUnregisterRequest, CudaSharedMemoryUnregisterResponse, LogSettingsRequest,
        LogSettingsResponse, ModelConfigRequest, ModelConfigResponse, ModelInferRequest,
        ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse, ModelReadyRequest,
        ModelReadyResponse, ModelStatisticsRequest, ModelStatisticsResponse,
        RepositoryIndexRequest, RepositoryIndexResponse, RepositoryModelLoadRequest,
        RepositoryModelLoadResponse, RepositoryModelUnloadRequest, RepositoryModelUnloadResponse,
        ServerLiveRequest, ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse,
        ServerReadyRequest, ServerReadyResponse, SystemSharedMemoryRegisterRequest,
        SystemSharedMemoryRegisterResponse, SystemSharedMemoryStatusRequest,
        SystemSharedMemoryStatusResponse, SystemSharedMemoryUnregisterRequest,
        SystemSharedMemoryUnregisterResponse, TraceSettingRequest, TraceSettingResponse,
        grpc_inference_service_server::GrpcInferenceService,
    },
    server::{
        InferStream, ServeOptions, grpc_timeout, serve_guarded, server_metadata, set_serving,
        stream_responses,
    },
    shared_memory,
    telemetry::{self, RequestTrace},
};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::{ModelControl, Worker, WorkerError, load_request};

/// The v2 service of a standalone worker.
#[derive(Debug, Clone)]
pub struct WorkerService {
    worker: Arc<Worker>,
    model_control: ModelControl,
    shared_memory: Arc<shared_memory::Registry>,
}

impl WorkerService {
    /// Runs one inference, traced when the caller's trace is recorded.
    async fn infer_traced(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<ModelInferResponse, Status> {
        // The client's deadline (a gateway passes on what is left of its own) bounds
        // the wait for a session: an expired request is never run.
        let deadline = grpc_timeout(request.metadata()).map(|timeout| Instant::now() + timeout);
        // A gateway's call continues its trace here; one it does not record is not
        // recorded here either.
        let Some(RequestTrace::Recorded(parent)) = telemetry::decide(request.metadata().as_ref())
        else {
            return Ok(self.worker.infer(request.into_inner(), deadline).await?);
        };
        let span = telemetry::infer_server_span(
            &request.get_ref().model_name,
            Some(&request.get_ref().model_version),
        );
        telemetry::set_parent(&span, parent);
        let result = self
            .worker
            .infer(request.into_inner(), deadline)
            .instrument(span.clone())
            .await
            .map_err(Status::from);
        match &result {
            Ok(_) => telemetry::record_outcome(&span, tonic::Code::Ok, ""),
            Err(status) => telemetry::record_outcome(&span, status.code(), status.message()),
        }
        result
    }

    /// Holds what one request reads from shared memory to `bytes` (the message limit).
    pub fn with_message_limit(mut self, bytes: usize) -> WorkerService {
        self.shared_memory = Arc::new(shared_memory::Registry::new(bytes as u64));
        self
    }

    /// Serves `worker`; Triton's load and unload RPCs as `model_control` says.
    pub fn new(worker: Arc<Worker>, model_control: ModelControl) -> WorkerService {
        WorkerService {
            worker,
            model_control,
            shared_memory: Arc::default(),
        }
    }
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
        let (metadata, extensions, mut inner) = request.into_parts();
        let placements = self.shared_memory.take_inputs(&mut inner)?;
        let mut response = self
            .infer_traced(Request::from_parts(metadata, extensions, inner))
            .await?;
        self.shared_memory
            .place_outputs(&mut response, &placements)?;
        Ok(Response::new(response))
    }

    type ModelStreamInferStream = InferStream;

    async fn model_stream_infer(
        &self,
        request: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<InferStream>, Status> {
        let worker = Arc::clone(&self.worker);
        let regions = Arc::clone(&self.shared_memory);
        Ok(Response::new(stream_responses(
            request.into_inner(),
            move |mut r| {
                let (worker, regions) = (Arc::clone(&worker), Arc::clone(&regions));
                async move {
                    let placements = regions.take_inputs(&mut r)?;
                    let mut response = worker.infer(r, None).await?;
                    regions.place_outputs(&mut response, &placements)?;
                    Ok(response)
                }
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
        let request = request.into_inner();
        let model = request.model_name;
        self.model_control.allow("RepositoryModelLoad", &model)?;
        let load = load_request::read(&model, &request.repository_name, &request.parameters)?;
        self.worker.load_model(&model, load, &|_, _| true).await?;
        tracing::info!(%model, "model loaded through RepositoryModelLoad");
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        let model = request.into_inner().model_name;
        self.model_control.allow("RepositoryModelUnload", &model)?;
        self.worker.unload_model(&model).await?;
        tracing::info!(%model, "model unloaded through RepositoryModelUnload");
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }

    async fn system_shared_memory_status(
        &self,
        request: Request<SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<SystemSharedMemoryStatusResponse>, Status> {
        self.shared_memory.status_call(request)
    }

    async fn system_shared_memory_register(
        &self,
        request: Request<SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<SystemSharedMemoryRegisterResponse>, Status> {
        self.shared_memory.register_call(request)
    }

    async fn system_shared_memory_unregister(
        &self,
        request: Request<SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<SystemSharedMemoryUnregisterResponse>, Status> {
        self.shared_memory.unregister_call(request)
    }

    async fn cuda_shared_memory_status(
        &self,
        _: Request<CudaSharedMemoryStatusRequest>,
    ) -> Result<Response<CudaSharedMemoryStatusResponse>, Status> {
        Err(shared_memory::cuda_unimplemented())
    }

    async fn cuda_shared_memory_register(
        &self,
        _: Request<CudaSharedMemoryRegisterRequest>,
    ) -> Result<Response<CudaSharedMemoryRegisterResponse>, Status> {
        Err(shared_memory::cuda_unimplemented())
    }

    async fn cuda_shared_memory_unregister(
        &self,
        _: Request<CudaSharedMemoryUnregisterRequest>,
    ) -> Result<Response<CudaSharedMemoryUnregisterResponse>, Status> {
        Err(shared_memory::cuda_unimplemented())
    }

    async fn trace_setting(
        &self,
        _: Request<TraceSettingRequest>,
    ) -> Result<Response<TraceSettingResponse>, Status> {
        Err(aviary::server::trace_setting_unimplemented())
    }

    async fn log_settings(
        &self,
        _: Request<LogSettingsRequest>,
    ) -> Result<Response<LogSettingsResponse>, Status> {
        Err(aviary::server::log_settings_unimplemented())
    }
}

/// Runs a standalone worker server on `listener` until `shutdown` resolves, every call
/// behind `checks` (API keys). Health is SERVING from the start (every version was
/// loaded before the worker existed) and turns NOT_SERVING as soon as shutdown begins.
pub async fn run_worker<F>(
    worker: Arc<Worker>,
    listener: TcpListener,
    options: ServeOptions,
    model_control: ModelControl,
    checks: CallChecks,
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
    let service =
        WorkerService::new(worker, model_control).with_message_limit(options.max_message_bytes);
    serve_guarded(service, listener, options, checks, health, draining)
        .await
        .map_err(|e| WorkerError::Serve(e.to_string()))
}
