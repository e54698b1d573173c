//! The server runner every Aviary server shares (worker, gateway, controller): the v2
//! service with message size limits, gRPC health and server reflection on one port,
//! TCP_NODELAY on accepted connections, and graceful shutdown with a grace period.
//! Also the pieces of the v2 service that do not depend on what serves the models:
//! `ServerMetadata` and the `ModelStreamInfer` adapter.

use std::{future::Future, pin::Pin, time::Duration};

use futures::{Stream, StreamExt};
use tokio::net::TcpListener;
use tonic::{Status, Streaming};
use tonic_health::server::HealthReporter;

use crate::calls::{CallChecks, Guarded};
use crate::pb::inference::{
    ModelInferRequest, ModelInferResponse, ModelStreamInferResponse, ServerMetadataResponse,
    grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer},
};

/// The server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[error("server: {0}")]
pub struct ServeError(String);

impl ServeError {
    /// A server error described by `message`.
    pub fn new(message: impl Into<String>) -> ServeError {
        ServeError(message.into())
    }
}

/// Default largest gRPC message accepted or sent: 64 MiB, well above tonic's 4 MiB so
/// real tensors fit.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Extensions reported by `ServerMetadata`.
pub const EXTENSIONS: &[&str] = &[
    "model_configuration",
    "statistics",
    "model_repository",
    "classification",
    "sequence",
    "system_shared_memory",
];

/// gRPC health service name of the inference service.
pub const HEALTH_SERVICE: &str = "inference.GRPCInferenceService";

/// gRPC health service that answers SERVING whenever the process answers calls (it is
/// never set otherwise; once shutdown closes the listener nothing answers): what a
/// liveness or startup probe asks. The empty service and
/// [`HEALTH_SERVICE`] are readiness (models loaded, not shutting down); a liveness probe
/// on them would restart a process whose models are merely still loading or whose
/// workers are down.
pub const LIVENESS_SERVICE: &str = "liveness";

/// Response stream of `ModelStreamInfer`.
pub type InferStream =
    Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send + 'static>>;

/// How a server listens and stops.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Largest request or response message, in bytes.
    pub max_message_bytes: usize,
    /// How long in-flight requests (and open streams) may run after shutdown begins.
    pub grace_period: Duration,
    /// TLS on the listener; `None`: plaintext.
    pub tls: Option<std::sync::Arc<crate::tls::ServerTls>>,
    /// Compressions of inference responses, in order of preference, for clients whose
    /// `grpc-accept-encoding` names one; empty: responses go uncompressed. Requests
    /// compressed with gzip or deflate are always accepted.
    pub response_compression: Vec<tonic::codec::CompressionEncoding>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            grace_period: DEFAULT_GRACE_PERIOD,
            tls: None,
            response_compression: Vec::new(),
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
) -> Result<(), ServeError>
where
    S: GrpcInferenceService,
    F: Future<Output = ()> + Send,
{
    serve_guarded(
        service,
        listener,
        options,
        CallChecks::default(),
        health,
        shutdown,
    )
    .await
}

/// [`serve`], every call (health and reflection too) behind `checks` (see
/// [`Guarded`]), each run as its [`Caller`](crate::calls::Caller).
pub async fn serve_guarded<S, F>(
    service: S,
    listener: TcpListener,
    options: ServeOptions,
    checks: CallChecks,
    health: HealthReporter,
    shutdown: F,
) -> Result<(), ServeError>
where
    S: GrpcInferenceService,
    F: Future<Output = ()> + Send,
{
    set_live(&health).await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| ServeError(e.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| ServeError(e.to_string()))?;
    let inference = inference_service(service, &options);
    let health_service =
        tonic_health::pb::health_server::HealthServer::new(health_service_from(health));
    let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = draining_tx.send(());
    };
    let serving = tonic::transport::Server::builder()
        .layer(tower::layer::layer_fn(ClientDeadline))
        .add_service(Guarded::new(health_service, checks.clone()))
        .add_service(Guarded::new(reflection_v1, checks.clone()))
        .add_service(Guarded::new(reflection_v1alpha, checks.clone()))
        .add_service(Guarded::new(inference, checks.clone()))
        .serve_with_incoming_shutdown(
            crate::tls::incoming(listener, options.tls.clone()),
            shutdown,
        );
    let grace_over = async move {
        if draining_rx.await.is_ok() {
            tokio::time::sleep(options.grace_period).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = serving => result.map_err(|e| ServeError(e.to_string())),
        () = grace_over => {
            tracing::warn!(
                grace_period = ?options.grace_period,
                "grace period over; abandoning connections that are still open"
            );
            Ok(())
        }
    }
}

/// The connections `listener` accepts, plaintext (see [`crate::tls::incoming`]).
pub fn incoming(
    listener: TcpListener,
) -> std::pin::Pin<Box<dyn Stream<Item = std::io::Result<crate::tls::Conn>> + Send>> {
    crate::tls::incoming(listener, None)
}

/// The v2 service as every listener serves it: requests compressed as Triton's
/// clients compress them accepted, responses compressed as `options` says, messages
/// held to its limit, and a client's malformed message answered with a client's code.
pub fn inference_service<S: GrpcInferenceService>(
    service: S,
    options: &ServeOptions,
) -> ClientErrorCodes<GrpcInferenceServiceServer<S>> {
    use tonic::codec::CompressionEncoding;
    // What Triton accepts (tritonclient's `compression_algorithm`); any other
    // `grpc-encoding` is refused with UNIMPLEMENTED naming it.
    let mut inference = GrpcInferenceServiceServer::new(service)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Deflate)
        .max_decoding_message_size(options.max_message_bytes)
        .max_encoding_message_size(options.max_message_bytes);
    for encoding in &options.response_compression {
        inference = inference.send_compressed(*encoding);
    }
    ClientErrorCodes(inference)
}

fn health_service_from(reporter: HealthReporter) -> impl tonic_health::pb::health_server::Health {
    tonic_health::server::HealthService::from_health_reporter(reporter)
}

/// Marks [`LIVENESS_SERVICE`] serving: the process answers calls. Nothing marks it
/// otherwise; a process that stops answering fails the probe by not answering.
pub async fn set_live(health: &HealthReporter) {
    health
        .set_service_status(LIVENESS_SERVICE, tonic_health::ServingStatus::Serving)
        .await;
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

/// The client's deadline from a request's `grpc-timeout` header, as gRPC encodes it
/// (at most 8 digits and a unit: `H`, `M`, `S`, `m`, `u`, `n`); `None` when the header
/// is absent or malformed (a malformed one is ignored, as gRPC servers do).
pub fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    grpc_timeout_header(metadata.as_ref())
}

/// [`grpc_timeout`] of a call's HTTP headers.
fn grpc_timeout_header(headers: &http::HeaderMap) -> Option<Duration> {
    let text = headers.get("grpc-timeout")?.to_str().ok()?;
    let split = text.len().checked_sub(1)?;
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value.checked_mul(3600)?),
        "M" => Duration::from_secs(value.checked_mul(60)?),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

/// The answer to Triton's TraceSetting RPC: traces are set in the configuration.
pub fn trace_setting_unimplemented() -> Status {
    Status::unimplemented(
        "TraceSetting is not supported: Aviary exports OpenTelemetry traces as its \
         [tracing] configuration says (docs/tracing.md); requests carrying a W3C \
         traceparent are traced with their caller",
    )
}

/// The answer to Triton's LogSettings RPC: logging is set at start.
pub fn log_settings_unimplemented() -> Status {
    Status::unimplemented(
        "LogSettings is not supported: Aviary's log filters and format are set at start \
         (AVIARY_LOG or RUST_LOG, --log-format)",
    )
}

/// `ServerMetadata` of every Aviary server.
pub fn server_metadata() -> ServerMetadataResponse {
    ServerMetadataResponse {
        name: crate::SERVER_NAME.to_owned(),
        version: crate::VERSION.to_owned(),
        extensions: EXTENSIONS.iter().map(|e| (*e).to_owned()).collect(),
    }
}

/// The inference service, with the codes of the errors tonic's codec gives a client's
/// own bad message turned into client codes, as the protocol documents them (and
/// Triton clients match): a message over the size limit is RESOURCE_EXHAUSTED (tonic:
/// OUT_OF_RANGE), bytes that do not decode as the request INVALID_ARGUMENT (tonic:
/// INTERNAL, for any parse error). The message is kept. Only answers that carry their
/// status in the headers (a unary call refused before it ran) are looked at.
#[derive(Debug, Clone)]
pub struct ClientErrorCodes<S>(pub S);

impl<S: tonic::server::NamedService> tonic::server::NamedService for ClientErrorCodes<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tonic::codegen::Service<http::Request<B>> for ClientErrorCodes<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::MapOk<S::Future, fn(Self::Response) -> Self::Response>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        use futures::TryFutureExt;
        self.0.call(request).map_ok(client_error_code)
    }
}

/// Every call of a server, answered DEADLINE_EXCEEDED when the client's `grpc-timeout`
/// passes first. tonic's server enforces that timeout too, but answers CANCELLED
/// "Timeout expired". This is a layer of the whole server, so tonic calls it (and its
/// timer starts) before tonic starts its own; the timer also ends a tick (1 ms) early,
/// and tokio fires timers in deadline order, tick by tick; and tonic polls the call
/// before its timer. So whenever tonic's timer has fired, this one has, and its answer
/// is the one given. (A per-service wrapper would not do: tonic's router calls a
/// service only when its answer is first polled, after tonic's timer started.)
#[derive(Debug, Clone)]
pub struct ClientDeadline<S>(pub S);

/// The resolution of tokio's timers.
const TIMER_TICK: Duration = Duration::from_millis(1);

type HttpAnswer<E> = Result<http::Response<tonic::body::Body>, E>;

impl<S, B> tonic::codegen::Service<http::Request<B>> for ClientDeadline<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::Either<
        S::Future,
        Pin<Box<dyn Future<Output = HttpAnswer<S::Error>> + Send>>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        use futures::future::Either;
        let timeout = grpc_timeout_header(request.headers());
        let answer = self.0.call(request);
        let Some(timeout) = timeout else {
            return Either::Left(answer);
        };
        // Created now, not when first polled: its deadline is fixed from this moment.
        let timed = tokio::time::timeout(timeout.saturating_sub(TIMER_TICK), answer);
        Either::Right(Box::pin(async move {
            match timed.await {
                Ok(answer) => answer,
                Err(_) => Ok(Status::deadline_exceeded(format!(
                    "deadline exceeded: the client's grpc-timeout of {timeout:?} passed before \
                     an answer"
                ))
                .into_http()),
            }
        }))
    }
}

/// What tonic's codec says when a request is over the size limit, and when it does not
/// decode (prost's `DecodeError`).
const TOO_LARGE: &str = "Error, decoded message length too large";
const UNDECODABLE: &str = "failed to decode Protobuf message";

fn client_error_code(
    mut response: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    let Some(status) = Status::from_header_map(response.headers()) else {
        return response;
    };
    let code = match status.code() {
        tonic::Code::OutOfRange if status.message().starts_with(TOO_LARGE) => {
            tonic::Code::ResourceExhausted
        }
        tonic::Code::Internal if status.message().starts_with(UNDECODABLE) => {
            tonic::Code::InvalidArgument
        }
        _ => return response,
    };
    let headers = response.headers_mut();
    headers.remove("grpc-status");
    headers.remove("grpc-message");
    // Writing a status only fails on a message that cannot be a header value: this one
    // was one already.
    let _ = Status::new(code, status.message()).add_header(headers);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout(header: &str) -> Option<Duration> {
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert(
            "grpc-timeout",
            header.parse().expect("an ASCII header value"),
        );
        grpc_timeout(&metadata)
    }

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(timeout("5n"), Some(Duration::from_nanos(5)));
    }

    #[test]
    fn malformed_grpc_timeouts_are_ignored() {
        for bad in ["", "m", "100", "123456789m", "1x", "-1m", "1.5S"] {
            assert_eq!(timeout(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&tonic::metadata::MetadataMap::new()), None);
    }
}
