//! The routes of the HTTP/REST endpoint, as KServe v2 and Triton's extensions name
//! them, and their handlers: each reads its request, makes the equivalent gRPC call
//! ([`super::bridge`]) and writes the answer as JSON.

use std::collections::HashMap;

use axum::{
    Router,
    body::Body,
    extract::{ConnectInfo, FromRequestParts, Path, Request, State},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{any, get, post},
};
use base64::Engine;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use prost::Message;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{
    Failure, answer_headers, body,
    bridge::{self, Answered, Inference},
    infer, proto_json,
};
use crate::{
    pb::inference::{
        CudaSharedMemoryStatusRequest, CudaSharedMemoryStatusResponse, LogSettingsRequest,
        LogSettingsResponse, ModelConfigRequest, ModelConfigResponse, ModelInferResponse,
        ModelMetadataRequest, ModelMetadataResponse, ModelReadyRequest, ModelReadyResponse,
        ModelRepositoryParameter, ModelStatisticsRequest, ModelStatisticsResponse,
        RepositoryIndexRequest, RepositoryIndexResponse, RepositoryModelLoadRequest,
        RepositoryModelLoadResponse, RepositoryModelUnloadRequest, RepositoryModelUnloadResponse,
        ServerLiveRequest, ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse,
        ServerReadyRequest, ServerReadyResponse, SystemSharedMemoryRegisterRequest,
        SystemSharedMemoryRegisterResponse, SystemSharedMemoryStatusRequest,
        SystemSharedMemoryStatusResponse, SystemSharedMemoryUnregisterRequest,
        SystemSharedMemoryUnregisterResponse, TraceSettingRequest, TraceSettingResponse,
        model_repository_parameter::ParameterChoice,
    },
    tls::ConnInfo,
};

/// What every handler shares: the service it calls and the body limit.
#[derive(Clone)]
struct Endpoint {
    inference: Inference,
    limit: usize,
}

/// The endpoint's routes over `inference`, bodies held to `limit` bytes.
pub fn router(inference: Inference, limit: usize) -> Router {
    let model = |tail: &str| {
        [
            format!("/v2/models/{{model}}{tail}"),
            format!("/v2/models/{{model}}/versions/{{version}}{tail}"),
        ]
    };
    let mut router = Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(server_metadata))
        // Before `/v2/models/{model}`: a static segment wins over a parameter.
        .route("/v2/models/stats", get(statistics));
    for path in model("") {
        router = router.route(&path, get(model_metadata));
    }
    for path in model("/ready") {
        router = router.route(&path, get(model_ready));
    }
    for path in model("/config") {
        router = router.route(&path, get(model_config));
    }
    for path in model("/stats") {
        router = router.route(&path, get(statistics));
    }
    for path in model("/infer") {
        router = router.route(&path, post(infer));
    }
    router
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{model}/load", post(load))
        .route("/v2/repository/models/{model}/unload", post(unload))
        .route("/v2/systemsharedmemory/status", get(shared_memory_status))
        .route(
            "/v2/systemsharedmemory/region/{region}/status",
            get(shared_memory_status),
        )
        .route(
            "/v2/systemsharedmemory/region/{region}/register",
            post(shared_memory_register),
        )
        .route(
            "/v2/systemsharedmemory/unregister",
            post(shared_memory_unregister),
        )
        .route(
            "/v2/systemsharedmemory/region/{region}/unregister",
            post(shared_memory_unregister),
        )
        .route("/v2/cudasharedmemory/{*rest}", any(cuda_shared_memory))
        .route("/v2/trace/setting", any(trace_setting))
        .route("/v2/models/{model}/trace/setting", any(trace_setting))
        .route("/v2/logging", any(log_settings))
        .fallback(no_endpoint)
        .method_not_allowed_fallback(wrong_method)
        .layer(middleware::from_fn(refuse_unread))
        .layer(middleware::map_response(errors_as_json))
        .with_state(Endpoint { inference, limit })
}

/// The caller of a request, as its gRPC call will see it: its headers, and the
/// connection's [`ConnInfo`].
struct Caller {
    headers: HeaderMap,
    extensions: http::Extensions,
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _: &S,
    ) -> Result<Caller, Self::Rejection> {
        // What the guard reads (the connection's ConnInfo) and leaves (the caller's
        // identity) go with the call.
        let mut extensions = parts.extensions.clone();
        if let Some(ConnectInfo(info)) = parts.extensions.get::<ConnectInfo<ConnInfo>>() {
            extensions.insert(info.clone());
        }
        Ok(Caller {
            headers: parts.headers.clone(),
            extensions,
        })
    }
}

impl Caller {
    /// The body `sent` to call `method` with, read only once this caller is known to
    /// be let in: keys and rate limits are checked first, as gRPC checks them before
    /// it decodes a message (see [`bridge::Inference::check_ahead`]).
    async fn read_body(
        &mut self,
        endpoint: &Endpoint,
        method: &str,
        sent: Body,
    ) -> Result<bytes::Bytes, Failure> {
        endpoint
            .inference
            .check_ahead(method, &self.headers, &mut self.extensions)
            .map_err(Failure::from)?;
        body::read(&self.headers, sent, endpoint.limit).await
    }

    /// Calls `method` with `message` as this caller.
    async fn call<Req: Message, Resp: Message + Default>(
        &self,
        endpoint: &Endpoint,
        method: &str,
        message: &Req,
    ) -> Result<Answered<Resp>, Failure> {
        bridge::call(
            &endpoint.inference,
            method,
            &self.headers,
            self.extensions.clone(),
            message,
        )
        .await
        .map_err(Failure::from)
    }
}

impl Caller {
    /// Calls `method` with `message` and answers its response (of protobuf type
    /// `full_name`) as JSON.
    async fn call_json<Req: Message, Resp: Message + Default>(
        &self,
        endpoint: &Endpoint,
        method: &str,
        message: &Req,
        full_name: &str,
    ) -> Result<Response, Failure> {
        let answered: Answered<Resp> = self.call(endpoint, method, message).await?;
        message_json(full_name, &answered.message, &answered.metadata)
    }
}

/// The model and version a path names (version empty: the server picks).
fn model_and_version(path: &HashMap<String, String>) -> (String, String) {
    let get = |key: &str| path.get(key).cloned().unwrap_or_default();
    (get("model"), get("version"))
}

/// `value` as a JSON answer, with the call's headers for the caller.
fn json(value: &Value, metadata: &HeaderMap) -> Response {
    let mut response = super::json_response(StatusCode::OK, value);
    response.headers_mut().extend(answer_headers(metadata));
    response
}

/// `message` (of protobuf type `full_name`) as a JSON answer.
fn message_json(
    full_name: &str,
    message: &impl Message,
    metadata: &HeaderMap,
) -> Result<Response, Failure> {
    let value = proto_json::to_json(full_name, message)
        .map_err(|error| Failure::new(StatusCode::INTERNAL_SERVER_ERROR, error))?;
    Ok(json(&value, metadata))
}

/// A health or readiness answer: 200 when true, 400 when false, with no body, as
/// KServe v2 says.
fn flag(true_or_false: bool) -> Response {
    match true_or_false {
        true => StatusCode::OK.into_response(),
        false => StatusCode::BAD_REQUEST.into_response(),
    }
}

async fn live(State(endpoint): State<Endpoint>, caller: Caller) -> Result<Response, Failure> {
    let answered: Answered<ServerLiveResponse> = caller
        .call(&endpoint, "ServerLive", &ServerLiveRequest {})
        .await?;
    Ok(flag(answered.message.live))
}

async fn ready(State(endpoint): State<Endpoint>, caller: Caller) -> Result<Response, Failure> {
    let answered: Answered<ServerReadyResponse> = caller
        .call(&endpoint, "ServerReady", &ServerReadyRequest {})
        .await?;
    Ok(flag(answered.message.ready))
}

async fn server_metadata(
    State(endpoint): State<Endpoint>,
    caller: Caller,
) -> Result<Response, Failure> {
    caller
        .call_json::<_, ServerMetadataResponse>(
            &endpoint,
            "ServerMetadata",
            &ServerMetadataRequest {},
            "inference.ServerMetadataResponse",
        )
        .await
}

async fn model_metadata(
    State(endpoint): State<Endpoint>,
    caller: Caller,
    Path(path): Path<HashMap<String, String>>,
) -> Result<Response, Failure> {
    let (name, version) = model_and_version(&path);
    caller
        .call_json::<_, ModelMetadataResponse>(
            &endpoint,
            "ModelMetadata",
            &ModelMetadataRequest { name, version },
            "inference.ModelMetadataResponse",
        )
        .await
}

async fn model_ready(
    State(endpoint): State<Endpoint>,
    caller: Caller,
    Path(path): Path<HashMap<String, String>>,
) -> Result<Response, Failure> {
    let (name, version) = model_and_version(&path);
    let answered: Answered<ModelReadyResponse> = caller
        .call(
            &endpoint,
            "ModelReady",
            &ModelReadyRequest { name, version },
        )
        .await?;
    Ok(flag(answered.message.ready))
}

async fn model_config(
    State(endpoint): State<Endpoint>,
    caller: Caller,
    Path(path): Path<HashMap<String, String>>,
) -> Result<Response, Failure> {
    let (name, version) = model_and_version(&path);
    let answered: Answered<ModelConfigResponse> = caller
        .call(
            &endpoint,
            "ModelConfig",
            &ModelConfigRequest { name, version },
        )
        .await?;
    // Triton answers the configuration itself, not the response that holds it.
    message_json(
        "inference.ModelConfig",
        &answered.message.config.unwrap_or_default(),
        &answered.metadata,
    )
}

async fn statistics(
    State(endpoint): State<Endpoint>,
    caller: Caller,
    path: Option<Path<HashMap<String, String>>>,
) -> Result<Response, Failure> {
    let (name, version) = path
        .map(|Path(p)| model_and_version(&p))
        .unwrap_or_default();
    caller
        .call_json::<_, ModelStatisticsResponse>(
            &endpoint,
            "ModelStatistics",
            &ModelStatisticsRequest { name, version },
            "inference.ModelStatisticsResponse",
        )
        .await
}

async fn infer(
    State(endpoint): State<Endpoint>,
    mut caller: Caller,
    Path(path): Path<HashMap<String, String>>,
    sent: Body,
) -> Result<Response, Failure> {
    let (model, version) = model_and_version(&path);
    let bytes = caller.read_body(&endpoint, "ModelInfer", sent).await?;
    let json_length = match caller.headers.get(infer::HEADER_LENGTH) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    Failure::bad_request(format!(
                        "{}: {value:?} is not a byte count",
                        infer::HEADER_LENGTH
                    ))
                })?,
        ),
    };
    let (request, form) = infer::read_request(&model, &version, &bytes, json_length)?;
    // JSON numbers can take more room as tensors (an INT64 `0,` is 2 bytes of JSON, 8
    // as a tensor): the request as the gRPC service takes it is held to the same limit.
    let encoded = request.encoded_len();
    if encoded > endpoint.limit {
        return Err(Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request takes {encoded} bytes as tensors, over the server's message limit of {} bytes",
                endpoint.limit
            ),
        ));
    }
    let answered: Answered<ModelInferResponse> =
        caller.call(&endpoint, "ModelInfer", &request).await?;
    // The model has run (a sequence has moved on): a failure here still says which
    // version answered.
    let answer = infer::write_response(&answered.message, &form).map_err(|error| {
        let status = match &error {
            infer::Unwritable::NotJson(_) => StatusCode::BAD_REQUEST,
            infer::Unwritable::Malformed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Failure::new(status, error.to_string()).with_headers(answer_headers(&answered.metadata))
    })?;
    let mut headers = answer_headers(&answered.metadata);
    let content_type = match answer.json_length {
        Some(length) => {
            headers.insert(infer::HEADER_LENGTH, HeaderValue::from(length));
            "application/octet-stream"
        }
        None => "application/json",
    };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    let sent_body = match body::accepted(&caller.headers) {
        Some(encoding) => {
            let (compressed, name) = body::compress(&answer.body, encoding);
            headers.insert(header::CONTENT_ENCODING, name);
            headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
            compressed
        }
        None => answer.body,
    };
    Ok((headers, sent_body).into_response())
}

/// A JSON body of type `T`; an empty body is `T`'s default (tritonclient sends none
/// for calls without options).
async fn json_body<T: for<'de> Deserialize<'de> + Default>(
    caller: &mut Caller,
    endpoint: &Endpoint,
    method: &str,
    sent: Body,
    what: &str,
) -> Result<T, Failure> {
    let bytes = caller.read_body(endpoint, method, sent).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&bytes)
        .map_err(|error| Failure::bad_request(format!("the body is not {what}: {error}")))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct IndexJson {
    #[serde(default)]
    ready: bool,
}

async fn repository_index(
    State(endpoint): State<Endpoint>,
    mut caller: Caller,
    sent: Body,
) -> Result<Response, Failure> {
    let asked: IndexJson = json_body(
        &mut caller,
        &endpoint,
        "RepositoryIndex",
        sent,
        "a repository index request",
    )
    .await?;
    let answered: Answered<RepositoryIndexResponse> = caller
        .call(
            &endpoint,
            "RepositoryIndex",
            &RepositoryIndexRequest {
                repository_name: String::new(),
                ready: asked.ready,
            },
        )
        .await?;
    // Triton answers the list of models itself.
    let value = proto_json::to_json("inference.RepositoryIndexResponse", &answered.message)
        .map_err(|error| Failure::new(StatusCode::INTERNAL_SERVER_ERROR, error))?;
    let models = value
        .get("models")
        .cloned()
        .unwrap_or(Value::Array(Vec::new()));
    Ok(json(&models, &answered.metadata))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RepositoryJson {
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// A load or unload request's JSON parameters as repository parameters: `file:`
/// contents arrive as base64 and become bytes, as Triton's HTTP endpoint reads them.
fn repository_parameters(
    parameters: Map<String, Value>,
) -> Result<HashMap<String, ModelRepositoryParameter>, Failure> {
    parameters
        .into_iter()
        .map(|(name, value)| {
            let choice = match &value {
                Value::String(text) if name.starts_with("file:") => ParameterChoice::BytesParam(
                    base64::engine::general_purpose::STANDARD
                        .decode(text)
                        .map_err(|error| {
                            Failure::bad_request(format!(
                                "parameter \"{name}\": file contents must be base64: {error}"
                            ))
                        })?,
                ),
                Value::String(text) => ParameterChoice::StringParam(text.clone()),
                Value::Bool(b) => ParameterChoice::BoolParam(*b),
                Value::Number(n) if n.as_i64().is_some() => {
                    ParameterChoice::Int64Param(n.as_i64().unwrap_or_default())
                }
                _ => {
                    return Err(Failure::bad_request(format!(
                        "parameter \"{name}\": must be a string, a boolean or an integer, not {value}"
                    )));
                }
            };
            Ok((
                name,
                ModelRepositoryParameter {
                    parameter_choice: Some(choice),
                },
            ))
        })
        .collect()
}

/// A load or unload's parameters, read after the caller's check: the JSON body's
/// `parameters` as the repository call takes them.
async fn repository_body(
    caller: &mut Caller,
    endpoint: &Endpoint,
    method: &str,
    sent: Body,
) -> Result<HashMap<String, ModelRepositoryParameter>, Failure> {
    let what = format!("a {method} request ({{\"parameters\": {{…}}}})");
    let asked: RepositoryJson = json_body(caller, endpoint, method, sent, &what).await?;
    repository_parameters(asked.parameters)
}

async fn load(
    State(endpoint): State<Endpoint>,
    mut caller: Caller,
    Path(model_name): Path<String>,
    sent: Body,
) -> Result<Response, Failure> {
    let method = "RepositoryModelLoad";
    let request = RepositoryModelLoadRequest {
        repository_name: String::new(),
        parameters: repository_body(&mut caller, &endpoint, method, sent).await?,
        model_name,
    };
    let answered: Answered<RepositoryModelLoadResponse> =
        caller.call(&endpoint, method, &request).await?;
    Ok((answer_headers(&answered.metadata), StatusCode::OK).into_response())
}

async fn unload(
    State(endpoint): State<Endpoint>,
    mut caller: Caller,
    Path(model_name): Path<String>,
    sent: Body,
) -> Result<Response, Failure> {
    let method = "RepositoryModelUnload";
    let request = RepositoryModelUnloadRequest {
        repository_name: String::new(),
        parameters: repository_body(&mut caller, &endpoint, method, sent).await?,
        model_name,
    };
    let answered: Answered<RepositoryModelUnloadResponse> =
        caller.call(&endpoint, method, &request).await?;
    Ok((answer_headers(&answered.metadata), StatusCode::OK).into_response())
}

/// The region a shared memory path names; empty: every region.
fn region(path: Option<Path<String>>) -> String {
    path.map(|Path(region)| region).unwrap_or_default()
}

async fn shared_memory_status(
    State(endpoint): State<Endpoint>,
    caller: Caller,
    path: Option<Path<String>>,
) -> Result<Response, Failure> {
    let request = SystemSharedMemoryStatusRequest { name: region(path) };
    let answered: Answered<SystemSharedMemoryStatusResponse> = caller
        .call(&endpoint, "SystemSharedMemoryStatus", &request)
        .await?;
    // Triton answers a list of regions, by name.
    let mut regions: Vec<_> = answered.message.regions.into_values().collect();
    regions.sort_by(|a, b| a.name.cmp(&b.name));
    let list = regions
        .into_iter()
        .map(|r| {
            serde_json::json!({
                "name": r.name,
                "key": r.key,
                "offset": r.offset,
                "byte_size": r.byte_size,
            })
        })
        .collect();
    Ok(json(&Value::Array(list), &answered.metadata))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterJson {
    key: String,
    #[serde(default)]
    offset: u64,
    byte_size: u64,
}

async fn shared_memory_register(
    State(endpoint): State<Endpoint>,
    mut caller: Caller,
    Path(name): Path<String>,
    sent: Body,
) -> Result<Response, Failure> {
    let bytes = caller
        .read_body(&endpoint, "SystemSharedMemoryRegister", sent)
        .await?;
    let asked: RegisterJson = serde_json::from_slice(&bytes).map_err(|error| {
        Failure::bad_request(format!(
            "the body is not a shared memory registration ({{\"key\", \"offset\", \"byte_size\"}}): {error}"
        ))
    })?;
    let request = SystemSharedMemoryRegisterRequest {
        name,
        key: asked.key,
        offset: asked.offset,
        byte_size: asked.byte_size,
    };
    let answered: Answered<SystemSharedMemoryRegisterResponse> = caller
        .call(&endpoint, "SystemSharedMemoryRegister", &request)
        .await?;
    Ok((answer_headers(&answered.metadata), StatusCode::OK).into_response())
}

async fn shared_memory_unregister(
    State(endpoint): State<Endpoint>,
    caller: Caller,
    path: Option<Path<String>>,
) -> Result<Response, Failure> {
    let request = SystemSharedMemoryUnregisterRequest { name: region(path) };
    let answered: Answered<SystemSharedMemoryUnregisterResponse> = caller
        .call(&endpoint, "SystemSharedMemoryUnregister", &request)
        .await?;
    Ok((answer_headers(&answered.metadata), StatusCode::OK).into_response())
}

/// CUDA shared memory: the gRPC service's answer (UNIMPLEMENTED, 501), whatever the
/// call.
async fn cuda_shared_memory(
    State(endpoint): State<Endpoint>,
    caller: Caller,
) -> Result<Response, Failure> {
    let _: Answered<CudaSharedMemoryStatusResponse> = caller
        .call(
            &endpoint,
            "CudaSharedMemoryStatus",
            &CudaSharedMemoryStatusRequest::default(),
        )
        .await?;
    Err(Failure::new(
        StatusCode::NOT_IMPLEMENTED,
        "CUDA shared memory is not supported",
    ))
}

async fn trace_setting(
    State(endpoint): State<Endpoint>,
    caller: Caller,
) -> Result<Response, Failure> {
    caller
        .call_json::<_, TraceSettingResponse>(
            &endpoint,
            "TraceSetting",
            &TraceSettingRequest::default(),
            "inference.TraceSettingResponse",
        )
        .await
}

async fn log_settings(
    State(endpoint): State<Endpoint>,
    caller: Caller,
) -> Result<Response, Failure> {
    caller
        .call_json::<_, LogSettingsResponse>(
            &endpoint,
            "LogSettings",
            &LogSettingsRequest::default(),
            "inference.LogSettingsResponse",
        )
        .await
}

async fn no_endpoint(request: Request) -> Failure {
    Failure::new(
        StatusCode::NOT_FOUND,
        format!(
            "no KServe v2 endpoint at {} {} (see docs/protocol.md, \"HTTP/REST\")",
            request.method(),
            request.uri().path()
        ),
    )
}

async fn wrong_method(request: Request) -> Failure {
    Failure::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{} is not a method of {} (see docs/protocol.md, \"HTTP/REST\")",
            request.method(),
            request.uri().path()
        ),
    )
}

/// What no endpoint reads is refused, not ignored: a query string, and gRPC's
/// `grpc-timeout` (an HTTP client sets a deadline with the `timeout` parameter).
async fn refuse_unread(request: Request, next: Next) -> Response {
    if let Some(query) = request.uri().query().filter(|q| !q.is_empty()) {
        return Failure::bad_request(format!(
            "query parameters are not supported (got \"{query}\"): the v2 endpoints take their options in the JSON body"
        ))
        .into_response();
    }
    if request.headers().contains_key("grpc-timeout") {
        return Failure::bad_request(
            "header grpc-timeout is gRPC's: over HTTP set a deadline with the request parameter \"timeout\" (microseconds)",
        )
        .into_response();
    }
    next.run(request).await
}

/// Errors axum answers itself (a path that does not decode, say) written as the
/// endpoint's own are: `{"error": "…"}`.
async fn errors_as_json(response: Response) -> Response {
    // axum's refusals are plain text; the endpoint's own answers are JSON, or empty
    // (a health check's "false").
    let plain_text = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/plain"));
    if response.status().is_success() || !plain_text {
        return response;
    }
    let status = response.status();
    let text = match axum::body::to_bytes(response.into_body(), 64 * 1024).await {
        Ok(bytes) if !bytes.is_empty() => String::from_utf8_lossy(&bytes).into_owned(),
        _ => status.canonical_reason().unwrap_or("error").to_owned(),
    };
    Failure::new(status, text).into_response()
}
