//! Backends: where a routed model version runs. [`InProcess`] calls the embedded
//! worker directly; [`Remote`] calls a worker server over gRPC (one HTTP/2 channel per
//! endpoint, shared by every version served there). The request path around a backend
//! (deadline, load shedding, breaker, faults) is [`crate::stack`].

use std::{fmt, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use tokio::net::TcpStream;
use tokio_rustls::rustls::{ClientConfig, pki_types::ServerName};

use aviary::telemetry::{self, SPAN_TARGET};

use aviary::client::TokenChannel;
use aviary::pb::inference::{
    ModelConfig, ModelConfigRequest, ModelInferResponse, ModelMetadataRequest,
    ModelMetadataResponse, ModelReadyRequest, ModelStatistics, ModelStatisticsRequest,
    RepositoryIndexRequest, grpc_inference_service_client::GrpcInferenceServiceClient,
    repository_index_response::ModelIndex,
};
use aviary_worker::{VersionSlot, Worker, infer_on};
use futures::future::BoxFuture;
use tonic::transport::Endpoint;
use tracing::Instrument;

use crate::{GatewayError, config::Config, infer_client::InferClient, stack::Call};

/// How the gateway calls its remote workers: the largest message, the API key it
/// sends (workers started with `--keys-file` check it), and TLS for `https://`
/// endpoints.
#[derive(Debug, Clone)]
pub struct WorkerCalls {
    /// Largest request or response message.
    pub max_message_bytes: usize,
    /// The `authorization` header sent with every call (none: no key).
    pub authorization: aviary::client::Authorization,
    /// The file of `[workers] token_file`, watched by the gateway once it runs.
    pub token_file: Option<Arc<crate::auth::TokenFile>>,
    /// What `https://` endpoints are called with; `None`: they cannot be.
    pub tls: Option<Arc<WatchedTls>>,
}

/// A client's TLS: rustls settings from PEM files (`[workers] tls`, the controller's
/// `--gateway-tls-*`), rebuilt when they change ([`WatchedTls::watch`]), so a rotated
/// client certificate (cert-manager) is presented on every new connection without a
/// restart. tonic's channels ([`WatchedTls::connector`]) and the `ModelInfer` client
/// both connect through it.
#[derive(Debug)]
pub struct WatchedTls {
    files: aviary::client::ClientTlsFiles,
    config: Arc<ArcSwap<ClientConfig>>,
}

/// How often a client's TLS files are looked at for changes.
const TLS_WATCH_INTERVAL: Duration = Duration::from_secs(1);

impl WatchedTls {
    /// Reads `files` (`ca` is required).
    pub fn open(files: aviary::client::ClientTlsFiles) -> Result<WatchedTls, String> {
        let config = Self::build(&files)?;
        Ok(WatchedTls {
            files,
            config: Arc::new(ArcSwap::from_pointee(config)),
        })
    }

    fn build(files: &aviary::client::ClientTlsFiles) -> Result<ClientConfig, String> {
        let ca = files.ca.as_deref().ok_or("ca: required")?;
        let identity = files.cert.as_deref().zip(files.key.as_deref());
        aviary::tls::client_config(ca, identity, &[b"h2"]).map_err(|e| e.to_string())
    }

    /// Rebuilds the settings whenever a file changes, until the process ends; a set
    /// that does not load (half-written) keeps the last good one and is tried again on
    /// the next change.
    pub async fn watch(self: Arc<Self>) {
        let mut seen = self.files.modified();
        loop {
            tokio::time::sleep(TLS_WATCH_INTERVAL).await;
            let now = self.files.modified();
            if now == seen {
                continue;
            }
            seen = now;
            match Self::build(&self.files) {
                Ok(config) => {
                    self.config.store(Arc::new(config));
                    tracing::info!("client TLS files changed; new connections use them");
                }
                Err(error) => {
                    tracing::warn!(%error, "the changed client TLS files do not load; keeping the last good ones");
                }
            }
        }
    }

    /// A connector for tonic (give the endpoint an `http://` URI: the connector speaks
    /// TLS): TCP to the URI's authority, then TLS with the settings in force, the
    /// server's certificate checked against `server_name`.
    pub fn connector(
        &self,
        server_name: ServerName<'static>,
    ) -> impl tower::Service<
        http::Uri,
        Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
        Error = std::io::Error,
        Future = BoxFuture<
            'static,
            std::io::Result<hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>,
        >,
    > + Clone
    + Send
    + 'static {
        let config = Arc::clone(&self.config);
        tower::service_fn(move |uri: http::Uri| {
            let connector = tokio_rustls::TlsConnector::from(config.load_full());
            let name = server_name.clone();
            Box::pin(async move {
                let authority = uri
                    .authority()
                    .ok_or_else(|| std::io::Error::other("no host in the endpoint"))?;
                let port = authority.port_u16().unwrap_or(443);
                let tcp = TcpStream::connect((authority.host(), port)).await?;
                let _ = tcp.set_nodelay(true);
                let tls = connector.connect(name, tcp).await?;
                Ok(hyper_util::rt::TokioIo::new(tls))
            }) as BoxFuture<'static, _>
        })
    }
}

impl WorkerCalls {
    /// Plain calls of at most `max_message_bytes`, without a key.
    pub fn new(max_message_bytes: usize) -> WorkerCalls {
        WorkerCalls {
            max_message_bytes,
            authorization: aviary::client::Authorization::default(),
            token_file: None,
            tls: None,
        }
    }

    /// What `config` says: its message limit, the key in `[workers] token_file`, and
    /// the files of `[workers] tls` (read now; [`crate::auth::TokenFile::watch`] and
    /// [`WatchedTls::watch`] keep them fresh).
    pub fn from_config(config: &Config) -> Result<WorkerCalls, GatewayError> {
        let mut calls = WorkerCalls::new(config.server.max_message_bytes);
        if let Some(path) = &config.workers.token_file {
            let file = crate::auth::TokenFile::open(path, "workers.token_file")?;
            calls.authorization = file.authorization();
            calls.token_file = Some(file);
        }
        if let Some(tls) = &config.workers.tls {
            let files = aviary::client::ClientTlsFiles {
                ca: Some(tls.ca.clone()),
                cert: tls.cert.clone(),
                key: tls.key.clone(),
            };
            let tls = WatchedTls::open(files).map_err(|message| GatewayError::Config {
                path: "workers.tls".into(),
                message,
            })?;
            calls.tls = Some(Arc::new(tls));
        }
        Ok(calls)
    }

    /// The TLS settings of `endpoint`: none for `http://`; for `https://`, those of
    /// `[workers] tls`, or an error saying they are missing.
    fn tls_of(&self, endpoint: &str) -> Result<Option<&WatchedTls>, GatewayError> {
        if !endpoint.starts_with("https://") {
            return Ok(None);
        }
        self.tls
            .as_deref()
            .map(Some)
            .ok_or_else(|| GatewayError::Config {
                path: endpoint.to_owned(),
                message: "https:// needs [workers] tls (the CA the worker's certificate chains to)"
                    .into(),
            })
    }

    /// A lazily connecting tonic channel to `endpoint` with `settings` applied, whose
    /// certificate must name `server_name` when it is `https://`.
    pub fn channel(
        &self,
        endpoint: &str,
        server_name: &str,
        settings: impl FnOnce(Endpoint) -> Endpoint,
    ) -> Result<tonic::transport::Channel, GatewayError> {
        let invalid = |message: String| GatewayError::Config {
            path: endpoint.to_owned(),
            message,
        };
        match self.tls_of(endpoint)? {
            None => Endpoint::from_shared(endpoint.to_owned())
                .map(|built| settings(built).connect_lazy())
                .map_err(|e| invalid(format!("invalid endpoint: {e}"))),
            Some(tls) => {
                // The connector speaks TLS; tonic sees a plain URI to connect it to.
                let plain = endpoint.replacen("https://", "http://", 1);
                let built = Endpoint::from_shared(plain)
                    .map_err(|e| invalid(format!("invalid endpoint: {e}")))?;
                let connector = tls.connector(server_name_of(endpoint, server_name)?);
                Ok(settings(built).connect_with_connector_lazy(connector))
            }
        }
    }

    /// The `ModelInfer` client's TLS for `endpoint` (none for `http://`).
    fn infer_tls(
        &self,
        endpoint: &str,
        server_name: &str,
    ) -> Result<Option<crate::infer_client::ClientTls>, GatewayError> {
        let Some(tls) = self.tls_of(endpoint)? else {
            return Ok(None);
        };
        Ok(Some(crate::infer_client::ClientTls {
            config: Arc::clone(&tls.config),
            server_name: server_name_of(endpoint, server_name)?,
        }))
    }
}

/// `server_name` as rustls takes it, or a config error naming `endpoint`.
fn server_name_of(endpoint: &str, server_name: &str) -> Result<ServerName<'static>, GatewayError> {
    ServerName::try_from(server_name.to_owned()).map_err(|e| GatewayError::Config {
        path: endpoint.to_owned(),
        message: format!("\"{server_name}\" cannot be a TLS server name: {e}"),
    })
}

/// A place that runs model versions.
pub trait Backend: Send + Sync + fmt::Debug + 'static {
    /// Where it is, for logs and errors (`in-process`, or the endpoint URL).
    fn location(&self) -> &str;

    /// Runs one inference; `call.request.model_version` is already resolved.
    /// `call.deadline` is when the client stops waiting: a backend passes it on (a
    /// worker drops a request whose deadline passed before it ran).
    fn infer(&self, call: Call) -> BoxFuture<'_, Result<ModelInferResponse, GatewayError>>;

    /// Whether the version is loaded and ready.
    fn ready(&self, model: String, version: String) -> BoxFuture<'_, bool>;

    /// The version's metadata.
    fn metadata(
        &self,
        model: String,
        version: String,
    ) -> BoxFuture<'_, Result<ModelMetadataResponse, GatewayError>>;

    /// The version's model configuration.
    fn config(
        &self,
        model: String,
        version: String,
    ) -> BoxFuture<'_, Result<ModelConfig, GatewayError>>;

    /// The version's statistics.
    fn statistics(
        &self,
        model: String,
        version: String,
    ) -> BoxFuture<'_, Result<Vec<ModelStatistics>, GatewayError>>;

    /// Everything the backend's repository holds.
    fn index(&self) -> BoxFuture<'_, Result<Vec<ModelIndex>, GatewayError>>;

    /// The fingerprint of the weights that will answer the next call, when the backend
    /// knows it exactly (the embedded worker's slot); `None` for remote workers, whose
    /// answers name it instead (see [`crate::cache`]).
    fn fingerprint(&self) -> Option<String> {
        None
    }

    /// What balancing over replicas has done so far (nothing for one worker).
    fn replica_counts(&self) -> ReplicaCounts {
        ReplicaCounts::default()
    }

    /// The worker addresses calls are balanced over now (names resolved, ejected
    /// replicas left out); empty for the embedded worker.
    fn live_replicas(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Counters of a version's replicas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicaCounts {
    /// Calls tried again on another replica.
    pub retries: u64,
    /// Times a failing replica was taken out of the balancer.
    pub ejections: u64,
}

/// One version of the worker embedded in this process. It holds the version's slot,
/// so a request that picked it keeps working even if the version is unloaded while
/// the request runs.
#[derive(Debug, Clone)]
pub struct InProcess {
    worker: Arc<Worker>,
    slot: Arc<VersionSlot>,
}

impl InProcess {
    /// The backend of one loaded version.
    pub fn new(worker: Arc<Worker>, slot: Arc<VersionSlot>) -> InProcess {
        InProcess { worker, slot }
    }
}

impl Backend for InProcess {
    fn location(&self) -> &str {
        "in-process"
    }

    fn infer(&self, call: Call) -> BoxFuture<'_, Result<ModelInferResponse, GatewayError>> {
        let deadline = call.expires_at();
        let run = async move { Ok(infer_on(&self.slot, call.request, deadline).await?) };
        if !telemetry::in_recorded_request() {
            return Box::pin(run);
        }
        let span = tracing::info_span!(
            target: SPAN_TARGET,
            "in-process worker",
            otel.name = "aviary.worker",
            otel.kind = "internal",
            otel.status_code = tracing::field::Empty,
            aviary.model = %self.slot.current().model,
            aviary.version = %self.slot.current().version,
        );
        Box::pin(traced(span, run))
    }

    fn fingerprint(&self) -> Option<String> {
        Some(self.slot.current().content_hash.clone())
    }

    fn ready(&self, _model: String, _version: String) -> BoxFuture<'_, bool> {
        // A slot exists only once its version is loaded and warmed up.
        Box::pin(async { true })
    }

    fn metadata(
        &self,
        model: String,
        version: String,
    ) -> BoxFuture<'_, Result<ModelMetadataResponse, GatewayError>> {
        Box::pin(async move { Ok(self.worker.metadata(&model, &version)?) })
    }

    fn config(
        &self,
        model: String,
        version: String,
    ) -> BoxFuture<'_, Result<ModelConfig, GatewayError>> {
        Box::pin(async move { Ok(self.worker.config(&model, &version)?) })
    }

    fn statistics(
        &self,
        model: String,
        version: String,
    ) -> BoxFuture<'_, Result<Vec<ModelStatistics>, GatewayError>> {
        Box::pin(async move { Ok(self.worker.statistics(&model, &version)?) })
    }

    fn index(&self) -> BoxFuture<'_, Result<Vec<ModelIndex>, GatewayError>> {
        Box::pin(async move { Ok(self.worker.index(false)) })
    }
}

/// A worker server reached over gRPC: inferences through [`InferClient`], every
/// other call through tonic's client.
#[derive(Debug)]
pub struct Remote {
    endpoint: String,
    client: GrpcInferenceServiceClient<TokenChannel>,
    infer: InferClient,
}

impl Remote {
    /// A lazily connected client for `endpoint`: the gateway starts even when the
    /// worker is not up yet, and reports not ready until it is. Over `https://`, the
    /// worker's certificate must name `server_name` (the endpoint's host as configured,
    /// before it was resolved to this address).
    pub fn connect_lazy(
        endpoint: &str,
        calls: &WorkerCalls,
        server_name: &str,
    ) -> Result<Remote, GatewayError> {
        let max_message_bytes = calls.max_message_bytes;
        let channel = calls.channel(endpoint, server_name, |built| {
            built
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
        })?;
        let tls = calls.infer_tls(endpoint, server_name)?;
        let authorization = calls.authorization.clone();
        let client = GrpcInferenceServiceClient::new(TokenChannel::with_authorization(
            channel,
            authorization.clone(),
        ))
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
        let infer = InferClient::new(endpoint, max_message_bytes, authorization, tls).map_err(
            |message| GatewayError::Config {
                path: endpoint.to_owned(),
                message,
            },
        )?;
        Ok(Remote {
            endpoint: endpoint.to_owned(),
            client,
            infer,
        })
    }

    /// A failed call. A status with a source error was made on this side, not sent by
    /// the worker: a transport failure (the connection broke, the worker died
    /// mid-call) tonic gives UNKNOWN or CANCELLED (a reset stream), but the worker is
    /// unavailable (this side never cancels a call it still waits for); the call's own
    /// deadline (its grpc-timeout) passing is tonic's CANCELLED "Timeout expired", but
    /// to the caller it is DEADLINE_EXCEEDED.
    fn error(&self, status: tonic::Status) -> GatewayError {
        let source = std::error::Error::source(&status);
        let timed_out =
            std::iter::successors(source, |e| e.source()).any(|e| e.is::<tonic::TimeoutExpired>());
        let status = if timed_out {
            tonic::Status::deadline_exceeded(format!(
                "no answer within the deadline ({})",
                status.message()
            ))
        } else if source.is_some()
            && !matches!(
                status.code(),
                tonic::Code::DeadlineExceeded | tonic::Code::Unavailable
            )
        {
            tonic::Status::unavailable(status.message())
        } else {
            status
        };
        GatewayError::Remote {
            endpoint: self.endpoint.clone(),
            status,
        }
    }
}

impl Backend for Remote {
    fn location(&self) -> &str {
        &self.endpoint
    }

    fn infer(&self, call: Call) -> BoxFuture<'_, Result<ModelInferResponse, GatewayError>> {
        let span = telemetry::in_recorded_request().then(|| {
            telemetry::infer_client_span(
                &call.request.model_name,
                &call.request.model_version,
                &self.endpoint,
            )
        });
        let run = async move {
            self.infer
                .infer(&call.request, call.expires_at())
                .await
                .map_err(|status| GatewayError::Remote {
                    endpoint: self.endpoint.clone(),
                    status,
                })
        };
        match span {
            Some(span) => Box::pin(traced(span, run)),
            None => Box::pin(run),
        }
    }

    fn ready(&self, model: String, version: String) -> BoxFuture<'_, bool> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let request = ModelReadyRequest {
                name: model,
                version,
            };
            client
                .model_ready(request)
                .await
                .is_ok_and(|r| r.into_inner().ready)
        })
    }

    fn metadata(
        &self,
        model: String,
        version: String,
    ) -> BoxFuture<'_, Result<ModelMetadataResponse, GatewayError>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let request = ModelMetadataRequest {
                name: model,
                version,
            };
            client
                .model_metadata(request)
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| self.error(s))
        })
    }

    fn config(
        &self,
        model: String,
        version: String,
    ) -> BoxFuture<'_, Result<ModelConfig, GatewayError>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let request = ModelConfigRequest {
                name: model,
                version,
            };
            let response = client
                .model_config(request)
                .await
                .map_err(|s| self.error(s))?;
            Ok(response.into_inner().config.unwrap_or_default())
        })
    }

    fn statistics(
        &self,
        model: String,
        version: String,
    ) -> BoxFuture<'_, Result<Vec<ModelStatistics>, GatewayError>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let request = ModelStatisticsRequest {
                name: model,
                version,
            };
            let response = client
                .model_statistics(request)
                .await
                .map_err(|s| self.error(s))?;
            Ok(response.into_inner().model_stats)
        })
    }

    fn index(&self) -> BoxFuture<'_, Result<Vec<ModelIndex>, GatewayError>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let response = client
                .repository_index(RepositoryIndexRequest::default())
                .await
                .map_err(|s| self.error(s))?;
            Ok(response.into_inner().models)
        })
    }
}

/// `call` run inside `span`, which records how it ended.
async fn traced<T>(
    span: tracing::Span,
    call: impl Future<Output = Result<T, GatewayError>>,
) -> Result<T, GatewayError> {
    let result = call.instrument(span.clone()).await;
    match &result {
        Ok(_) => telemetry::record_outcome(&span, tonic::Code::Ok, ""),
        Err(error) => {
            let status = error.status();
            telemetry::record_outcome(&span, status.code(), status.message());
        }
    }
    result
}
