//! The KServe v2 HTTP/REST endpoint (Triton's HTTP port): health, server and model
//! metadata, model configuration and statistics, inference with JSON tensors and the
//! binary tensor data extension, the model repository, and system shared memory.
//!
//! Every endpoint is the equivalent gRPC call made in process through the same
//! guarded service the gRPC listener serves ([`bridge`]), so the two protocols cannot
//! differ in who may call what, how a request is routed, validated or audited, or what
//! an error says. A failed call answers `{"error": "…"}` with the HTTP status of its
//! gRPC code ([`http_status`]), as Triton's HTTP server does.
//!
//! # Layout
//!
//! - [`endpoints`]: the routes and their handlers.
//! - [`bridge`]: the in-process gRPC call each handler makes.
//! - [`infer`]: inference requests and answers as JSON and binary data.
//! - [`proto_json`]: protocol messages as JSON, from their descriptors.
//! - [`body`]: reading bodies (size limit, gzip and deflate) and compressing answers.

pub mod body;
pub mod bridge;
pub mod endpoints;
pub mod infer;
pub mod proto_json;

use std::{future::Future, sync::Arc};

use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;

use crate::tls::{ConnInfo, HttpIncoming, ServerTls};

pub use bridge::{Inference, in_process};

/// The ALPN protocol the endpoint offers over TLS: it speaks HTTP/1.1, as Triton's
/// HTTP endpoint and its clients do.
pub const ALPN: &[&[u8]] = &[b"http/1.1"];

/// Serves the endpoint for `inference` on `listener` until `shutdown` resolves; over
/// TLS when `tls` is set (opened with [`ALPN`]). Bodies are held to
/// `max_message_bytes`, the gRPC listener's message limit, after decompression.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    inference: Inference,
    max_message_bytes: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = endpoints::router(inference, max_message_bytes);
    axum::serve(
        HttpIncoming::new(listener, tls)?,
        app.into_make_service_with_connect_info::<ConnInfo>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// The HTTP status of a call that ended with gRPC `code`, as Triton's HTTP server
/// answers its errors (and as load balancers and HTTP clients read them).
pub fn http_status(code: tonic::Code) -> http::StatusCode {
    use http::StatusCode as H;
    use tonic::Code as G;
    match code {
        G::Ok => H::OK,
        G::InvalidArgument
        | G::FailedPrecondition
        | G::OutOfRange
        | G::AlreadyExists
        | G::Cancelled
        | G::Unknown => H::BAD_REQUEST,
        G::NotFound => H::NOT_FOUND,
        G::Unauthenticated => H::UNAUTHORIZED,
        G::PermissionDenied => H::FORBIDDEN,
        G::ResourceExhausted => H::TOO_MANY_REQUESTS,
        G::Aborted => H::CONFLICT,
        G::Unimplemented => H::NOT_IMPLEMENTED,
        G::Unavailable => H::SERVICE_UNAVAILABLE,
        G::DeadlineExceeded => H::GATEWAY_TIMEOUT,
        G::Internal | G::DataLoss => H::INTERNAL_SERVER_ERROR,
    }
}

/// A request the endpoint answers with an error: `{"error": message}` with `status`,
/// and the call's metadata (e.g. `x-aviary-variant`) as headers.
#[derive(Debug)]
pub struct Failure {
    status: http::StatusCode,
    message: String,
    /// Boxed: most failures have none, and a `Result` carrying a bare map is large.
    headers: Box<http::HeaderMap>,
}

impl Failure {
    /// A failure with `status` that says `message`.
    pub fn new(status: http::StatusCode, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
            headers: Box::default(),
        }
    }

    /// This failure, carrying `headers` for the caller too.
    pub fn with_headers(mut self, headers: http::HeaderMap) -> Failure {
        self.headers = Box::new(headers);
        self
    }

    /// A request that cannot be read as sent (400).
    pub fn bad_request(message: impl Into<String>) -> Failure {
        Failure::new(http::StatusCode::BAD_REQUEST, message)
    }
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Failure {
        let metadata = status.metadata().as_ref();
        let mut headers = answer_headers(metadata);
        // gRPC's retry pushback (a rate limit's wait) is HTTP's Retry-After, in whole
        // seconds, rounded up.
        if let Some(wait_ms) = metadata
            .get("grpc-retry-pushback-ms")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            headers.insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from(wait_ms.div_ceil(1000).max(1)),
            );
        }
        Failure {
            status: http_status(status.code()),
            message: status.message().to_owned(),
            headers: Box::new(headers),
        }
    }
}

impl From<infer::BadRequest> for Failure {
    fn from(error: infer::BadRequest) -> Failure {
        Failure::bad_request(error.0)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let mut response =
            json_response(self.status, &serde_json::json!({ "error": self.message }));
        response.headers_mut().extend(*self.headers);
        response
    }
}

/// `value` as a JSON answer with `status`.
pub fn json_response(status: http::StatusCode, value: &serde_json::Value) -> Response {
    // A Value always serializes.
    let body = serde_json::to_vec(value).unwrap_or_default();
    (
        status,
        [(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// The headers of a call's metadata that an Aviary answer carries for its caller
/// (`x-aviary-*`, `retry-after`); gRPC's own and the rest are dropped.
pub fn answer_headers(metadata: &http::HeaderMap) -> http::HeaderMap {
    metadata
        .iter()
        .filter(|(name, _)| {
            let name = name.as_str();
            // The variant, fallback, default and cache headers, and the trace id.
            name.starts_with("x-aviary-") || name == "retry-after"
        })
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}
