//! The HTTP/REST endpoint's calls into the v2 gRPC service, in process: each HTTP
//! request becomes the equivalent unary gRPC call (same method path, the HTTP
//! headers as its metadata, the connection's [`ConnInfo`](crate::tls::ConnInfo) in its
//! extensions) and goes through the very service the gRPC listener serves, behind the
//! same [`Guarded`] checks. Keys, roles, rate limits, the audit trail, routing, the
//! variant header, validation and error codes are therefore one implementation, not
//! two. The cost is encoding the message once more in memory, small beside JSON.

use std::convert::Infallible;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::BodyExt;
use prost::Message;
use tonic::Status;
use tower::{ServiceExt, util::BoxCloneSyncService};

use crate::{
    calls::{CallChecks, Guarded},
    pb::inference::grpc_inference_service_server::GrpcInferenceService,
    server::{ServeOptions, inference_service},
};

/// The v2 service as the endpoint calls it (HTTP/2-shaped gRPC requests in, gRPC
/// responses out), and the checks it is behind.
#[derive(Clone)]
pub struct Inference {
    service: BoxCloneSyncService<
        http::Request<tonic::body::Body>,
        http::Response<tonic::body::Body>,
        Infallible,
    >,
    checks: CallChecks,
}

/// `service` as the gRPC listener serves it (message limits, client error codes),
/// behind `checks`.
pub fn in_process<S: GrpcInferenceService>(
    service: S,
    options: &ServeOptions,
    checks: CallChecks,
) -> Inference {
    Inference {
        service: BoxCloneSyncService::new(Guarded::new(
            inference_service(service, options),
            checks.clone(),
        )),
        checks,
    }
}

/// The path of the v2 service's `method`.
fn path_of(method: &str) -> String {
    format!("/inference.GRPCInferenceService/{method}")
}

impl Inference {
    /// Checks now whether a caller with `headers` (on the connection `extensions`
    /// describe) may call `method`, as the service would when called; the call, made
    /// with these `extensions`, is not checked again. A request's body is read only
    /// once its caller is known to be let in, as gRPC decodes a message only then.
    pub fn check_ahead(
        &self,
        method: &str,
        headers: &http::HeaderMap,
        extensions: &mut http::Extensions,
    ) -> Result<(), Status> {
        self.checks
            .check_ahead(&path_of(method), headers, extensions)
    }
}

/// Request headers that describe the HTTP exchange itself, not the call: not passed on
/// as gRPC metadata.
const NOT_METADATA: &[&str] = &[
    "host",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "content-type",
    "content-encoding",
    "accept",
    "accept-encoding",
    "user-agent",
    "te",
    "upgrade",
    "expect",
    "grpc-encoding",
    "grpc-accept-encoding",
    "grpc-timeout",
    super::infer::HEADER_LENGTH,
];

/// What a call answered: its message and its response metadata (`x-aviary-variant`
/// and the like).
#[derive(Debug)]
pub struct Answered<M> {
    /// The response message.
    pub message: M,
    /// The response headers and trailers (see [`super::answer_headers`]).
    pub metadata: http::HeaderMap,
}

/// Calls `method` of the v2 service with `message`, as a client with `headers` on the
/// connection `extensions` describe.
pub async fn call<Req: Message, Resp: Message + Default>(
    inference: &Inference,
    method: &str,
    headers: &http::HeaderMap,
    extensions: http::Extensions,
    message: &Req,
) -> Result<Answered<Resp>, Status> {
    let length = message.encoded_len();
    let prefix = u32::try_from(length)
        .map_err(|_| Status::resource_exhausted("the request is over 4 GiB"))?;
    let mut frame = BytesMut::with_capacity(5 + length);
    frame.put_u8(0);
    frame.put_u32(prefix);
    message
        .encode(&mut frame)
        .map_err(|error| Status::internal(format!("encoding the request: {error}")))?;
    let mut request = http::Request::new(tonic::body::Body::new(http_body_util::Full::new(
        frame.freeze(),
    )));
    *request.method_mut() = http::Method::POST;
    *request.version_mut() = http::Version::HTTP_2;
    *request.uri_mut() = http::Uri::try_from(path_of(method))
        .map_err(|error| Status::internal(format!("method {method}: {error}")))?;
    *request.extensions_mut() = extensions;
    let forwarded = request.headers_mut();
    for (name, value) in headers {
        if !NOT_METADATA.contains(&name.as_str()) {
            forwarded.append(name, value.clone());
        }
    }
    forwarded.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    forwarded.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    let response = match inference.service.clone().oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let (parts, body) = response.into_parts();
    if let Some(status) = refusal(&parts.headers) {
        return Err(status);
    }
    let collected = body
        .collect()
        .await
        .map_err(|error| Status::internal(format!("reading the answer: {error}")))?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    if let Some(status) = refusal(&trailers) {
        return Err(status);
    }
    let message = decode_frame(collected.to_bytes())?;
    let mut metadata = parts.headers;
    metadata.extend(trailers);
    Ok(Answered { message, metadata })
}

/// The status in `headers`, when it is one that failed the call.
fn refusal(headers: &http::HeaderMap) -> Option<Status> {
    Status::from_header_map(headers).filter(|status| status.code() != tonic::Code::Ok)
}

/// The one message of a unary answer's body (uncompressed: the call asked for no
/// compression).
fn decode_frame<M: Message + Default>(mut body: Bytes) -> Result<M, Status> {
    if body.len() < 5 {
        return Err(Status::internal("the answer has no message"));
    }
    let compressed = body.get_u8();
    let length = body.get_u32() as usize;
    if compressed != 0 || length > body.len() {
        return Err(Status::internal("the answer's message frame is malformed"));
    }
    M::decode(body.split_to(length))
        .map_err(|error| Status::internal(format!("decoding the answer: {error}")))
}
