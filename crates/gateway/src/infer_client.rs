//! The gateway's client for `ModelInfer` calls to a worker: unary gRPC over one
//! HTTP/2 connection per endpoint, driven by `h2` directly.
//!
//! Why not tonic's client, which the gateway uses for every other call: measured on
//! the gateway hop (docs/benchmarks.md), tonic's channel and hyper's client send a
//! request's HEADERS and DATA frames in two writes, because hyper's body pipe waits
//! for the new stream's send capacity; on loopback each write wakes the worker, so
//! the worker woke twice per request. They also hand each call through two more
//! tasks (the channel's buffer, a task per response). Here the request is queued
//! whole before the connection task runs, so it leaves in one write, and the call
//! waits on its own stream. The gRPC framing itself is five bytes; statuses are read
//! by tonic's own `Status::from_header_map`.
//!
//! Large tensors are not copied into the request: the message is written as its small
//! fields plus the raw input buffers, each its own DATA frame ([`encode`]).
//!
//! A connection that fails or stops answering keep-alive pings is dropped, and the
//! next call connects again. Every failure of the transport is UNAVAILABLE (the
//! worker could not be reached or went away mid-call); a deadline that passes is
//! DEADLINE_EXCEEDED; a worker's own status passes through unchanged.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwapOption;
use aviary::pb::inference::{ModelInferRequest, ModelInferResponse};
use bytes::{BufMut, Bytes, BytesMut};
use h2::client::SendRequest;
use prost::Message;
use tokio::net::TcpStream;
use tonic::Status;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often an idle or busy connection is pinged, and how long a ping may take
/// before the connection counts as dead (as tonic's `http2_keep_alive_*`).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Flow-control windows: hyper's defaults, so large tensors are not held back by
/// HTTP/2's 64 KiB starting window.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;

/// Raw input buffers at least this large are sent as they are, not copied into the
/// message buffer; smaller ones cost less to copy than a DATA frame of their own.
const CHAIN_AT: usize = 16 * 1024;

const MODEL_INFER_PATH: &str = "/inference.GRPCInferenceService/ModelInfer";

/// TLS to a worker: the client settings, and the name its certificate must carry.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// rustls' client settings (ALPN `h2`), as [`crate::backend::WatchedTls`] keeps
    /// them: each new connection takes those in force.
    pub config: Arc<arc_swap::ArcSwap<tokio_rustls::rustls::ClientConfig>>,
    /// The name the worker's certificate must carry.
    pub server_name: tokio_rustls::rustls::pki_types::ServerName<'static>,
}

/// A `ModelInfer` client for one worker endpoint (`http://host:port`, or `https://`
/// with [`ClientTls`]).
#[derive(Debug)]
pub struct InferClient {
    /// `http://host:port/inference.GRPCInferenceService/ModelInfer`.
    uri: http::Uri,
    /// `host:port`, for connecting.
    authority: String,
    max_message_bytes: usize,
    /// `Bearer <key>` for a worker that checks keys.
    authorization: aviary::client::Authorization,
    /// TLS, for an `https://` endpoint.
    tls: Option<ClientTls>,
    /// The live connection, if any; cleared when it fails or ends.
    current: Arc<ArcSwapOption<Live>>,
    /// Numbers connections, so only a failed connection's own entry is cleared.
    connections: AtomicU64,
    /// Held while connecting, so concurrent calls make one connection.
    connecting: tokio::sync::Mutex<()>,
}

impl InferClient {
    /// A client for `endpoint`; nothing connects until the first call.
    pub fn new(
        endpoint: &str,
        max_message_bytes: usize,
        authorization: aviary::client::Authorization,
        tls: Option<ClientTls>,
    ) -> Result<InferClient, String> {
        let base: http::Uri = endpoint
            .parse()
            .map_err(|e| format!("invalid endpoint: {e}"))?;
        let authority = base
            .authority()
            .ok_or("invalid endpoint: no host")?
            .to_string();
        let authority = match (base.port(), base.scheme_str()) {
            (Some(_), _) => authority,
            (None, Some("https")) => format!("{authority}:443"),
            (None, _) => format!("{authority}:80"),
        };
        let scheme = match (base.scheme_str(), &tls) {
            (Some("http"), None) => "http",
            (Some("https"), Some(_)) => "https",
            (Some("https"), None) => return Err("https:// needs TLS settings".to_owned()),
            _ => return Err("only http:// and https:// endpoints can be called".to_owned()),
        };
        let uri = http::Uri::builder()
            .scheme(scheme)
            .authority(authority.as_str())
            .path_and_query(MODEL_INFER_PATH)
            .build()
            .map_err(|e| format!("invalid endpoint: {e}"))?;
        Ok(InferClient {
            uri,
            authority,
            max_message_bytes,
            authorization,
            tls,
            current: Arc::new(ArcSwapOption::empty()),
            connections: AtomicU64::new(0),
            connecting: tokio::sync::Mutex::new(()),
        })
    }

    /// Runs one inference on the worker, giving up at `deadline`. The remaining time
    /// travels as the call's `grpc-timeout`, so the worker drops the request if it
    /// expires in the worker's queue.
    pub async fn infer(
        &self,
        request: &ModelInferRequest,
        deadline: Option<Instant>,
    ) -> Result<ModelInferResponse, Status> {
        let call = self.call(request, deadline);
        match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), call)
                .await
                .unwrap_or_else(|_| {
                    // Dropping the call resets its stream: the worker stops on it.
                    Err(Status::deadline_exceeded(
                        "no answer from the worker within the deadline",
                    ))
                }),
            None => call.await,
        }
    }

    async fn call(
        &self,
        request: &ModelInferRequest,
        deadline: Option<Instant>,
    ) -> Result<ModelInferResponse, Status> {
        let body = encode(request, self.max_message_bytes)?;
        let mut http_request = http::Request::post(self.uri.clone())
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(key) = self.authorization.current() {
            http_request = http_request.header(http::header::AUTHORIZATION, key);
        }
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            http_request = http_request.header("grpc-timeout", grpc_timeout(left));
        }
        if aviary::telemetry::tracing_on()
            && let Some(headers) = http_request.headers_mut()
        {
            // The worker's spans join the trace as children of the current span.
            aviary::telemetry::outgoing_headers(headers);
        }
        let http_request = http_request
            .body(())
            .map_err(|e| Status::internal(format!("building the worker request: {e}")))?;
        let live = self.live().await?;
        let failed = |e: h2::Error| self.transport(&live, &e);
        let mut sender = live.sender.clone().ready().await.map_err(failed)?;
        let (response, mut stream) = sender.send_request(http_request, false).map_err(failed)?;
        let last = body.len() - 1;
        for (i, chunk) in body.into_iter().enumerate() {
            stream.send_data(chunk, i == last).map_err(failed)?;
        }
        let response = response.await.map_err(failed)?;
        self.read_response(&live, response).await
    }

    /// The message of a worker's response, or the status it answered with.
    async fn read_response(
        &self,
        live: &Live,
        response: http::Response<h2::RecvStream>,
    ) -> Result<ModelInferResponse, Status> {
        let (head, mut body) = response.into_parts();
        if head.status != http::StatusCode::OK {
            return Err(Status::unavailable(format!(
                "{} answered HTTP {} instead of gRPC",
                self.authority, head.status
            )));
        }
        // A trailers-only answer: the status is in the headers.
        if let Some(status) = Status::from_header_map(&head.headers)
            && status.code() != tonic::Code::Ok
        {
            return Err(status);
        }
        let mut message = BytesMut::new();
        let mut first: Option<Bytes> = None;
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| self.transport(live, &e))?;
            let _ = body.flow_control().release_capacity(chunk.len());
            if message.len() + first.as_ref().map_or(0, Bytes::len) + chunk.len()
                > self.max_message_bytes + 5
            {
                return Err(Status::resource_exhausted(format!(
                    "the worker's answer is larger than the {} byte limit",
                    self.max_message_bytes
                )));
            }
            // One DATA frame is the common case: keep it without copying.
            match first.take() {
                None if message.is_empty() => first = Some(chunk),
                Some(held) => {
                    message.extend_from_slice(&held);
                    message.extend_from_slice(&chunk);
                }
                None => message.extend_from_slice(&chunk),
            }
        }
        let trailers = body
            .trailers()
            .await
            .map_err(|e| self.transport(live, &e))?
            .unwrap_or_default();
        match Status::from_header_map(&trailers) {
            Some(status) if status.code() != tonic::Code::Ok => return Err(status),
            Some(_) => {}
            None => {
                return Err(Status::unavailable(format!(
                    "{} ended the call without a gRPC status",
                    self.authority
                )));
            }
        }
        let message = first.unwrap_or_else(|| message.freeze());
        decode(message)
    }

    /// The live connection, connecting first when there is none.
    async fn live(&self) -> Result<Arc<Live>, Status> {
        if let Some(live) = self.current.load_full() {
            return Ok(live);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(live) = self.current.load_full() {
            return Ok(live);
        }
        let live = Arc::new(self.connect().await?);
        self.current.store(Some(Arc::clone(&live)));
        Ok(live)
    }

    /// A new connection (over TLS for `https://`), its task spawned.
    async fn connect(&self) -> Result<Live, Status> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.authority))
            .await
            .map_err(|_| {
                Status::unavailable(format!(
                    "connecting to {}: no answer within {CONNECT_TIMEOUT:?}",
                    self.authority
                ))
            })?
            .map_err(|e| Status::unavailable(format!("connecting to {}: {e}", self.authority)))?;
        let _ = tcp.set_nodelay(true);
        let unavailable = |e: &dyn std::fmt::Display| {
            Status::unavailable(format!("connecting to {}: {e}", self.authority))
        };
        match &self.tls {
            None => self.handshake(tcp).await,
            Some(tls) => {
                let connector = tokio_rustls::TlsConnector::from(tls.config.load_full());
                let stream = tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    connector.connect(tls.server_name.clone(), tcp),
                )
                .await
                .map_err(|_| unavailable(&"no TLS handshake within the connect timeout"))?
                .map_err(|e| unavailable(&format!("TLS: {e}")))?;
                self.handshake(stream).await
            }
        }
    }

    /// HTTP/2 over `io`, its connection task spawned; the task forgets the connection
    /// when it ends.
    async fn handshake<T>(&self, io: T) -> Result<Live, Status>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| Status::unavailable(format!("connecting to {}: {e}", self.authority)))?;
        let id = self.connections.fetch_add(1, Ordering::Relaxed);
        let pings = connection.ping_pong();
        let current = Arc::clone(&self.current);
        let authority = self.authority.clone();
        tokio::spawn(async move {
            tokio::select! {
                ended = connection => {
                    if let Err(error) = ended {
                        tracing::debug!(%error, authority, "worker connection ended");
                    }
                }
                () = keep_alive(pings) => {
                    tracing::warn!(authority, "worker connection stopped answering pings; dropped");
                }
            }
            forget(&current, id);
        });
        Ok(Live { id, sender })
    }

    /// A transport failure: the worker is unreachable or went away mid-call. A reset
    /// of this one stream leaves the connection in use; anything else drops it, and
    /// the next call connects again.
    fn transport(&self, live: &Live, error: &h2::Error) -> Status {
        if !error.is_reset() || error.is_go_away() {
            forget(&self.current, live.id);
        }
        Status::unavailable(format!("calling {}: {error}", self.authority))
    }
}

/// One connection to the worker.
#[derive(Debug)]
struct Live {
    id: u64,
    sender: SendRequest<Bytes>,
}

/// Drops connection `id` from `current`, if it is still the one there.
fn forget(current: &ArcSwapOption<Live>, id: u64) {
    current.rcu(|held| match held {
        Some(live) if live.id == id => None,
        other => other.clone(),
    });
}

/// Pings every `KEEPALIVE_INTERVAL`; returns when a ping is not answered in time.
async fn keep_alive(pings: Option<h2::PingPong>) {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
    }
}

/// `grpc-timeout`'s value for `left`: at most eight digits, in the finest unit that
/// fits.
fn grpc_timeout(left: Duration) -> String {
    let micros = left.as_micros().max(1);
    if micros < 100_000_000 {
        format!("{micros}u")
    } else {
        format!("{}m", (left.as_millis()).min(99_999_999))
    }
}

/// The gRPC message (five-byte prefix, then the protobuf) of `request` as buffers to
/// send in order. Raw input buffers of at least `CHAIN_AT` bytes are their own
/// buffers, not copied: a message is a sequence of fields, so the other fields are
/// encoded first and each raw buffer follows as its own field 7 (tag, length, bytes).
fn encode(request: &ModelInferRequest, max_message_bytes: usize) -> Result<Vec<Bytes>, Status> {
    const RAW_INPUT_CONTENTS: u32 = 7;
    let total = request.encoded_len();
    if total > max_message_bytes {
        return Err(Status::resource_exhausted(format!(
            "the request is {total} bytes, over the {max_message_bytes} byte limit"
        )));
    }
    let length = u32::try_from(total)
        .map_err(|_| Status::resource_exhausted("the request is over 4 GiB"))?;
    let chained = request
        .raw_input_contents
        .iter()
        .any(|r| r.len() >= CHAIN_AT);
    let mut head = BytesMut::with_capacity(if chained { 5 + total / 8 } else { 5 + total });
    head.put_u8(0);
    head.put_u32(length);
    if !chained {
        request
            .encode(&mut head)
            .map_err(|e| Status::internal(format!("encoding the worker request: {e}")))?;
        return Ok(vec![head.freeze()]);
    }
    let mut small = request.clone();
    let raw = std::mem::take(&mut small.raw_input_contents);
    small
        .encode(&mut head)
        .map_err(|e| Status::internal(format!("encoding the worker request: {e}")))?;
    let mut buffers = Vec::with_capacity(raw.len() + 1);
    for contents in raw {
        prost::encoding::encode_key(
            RAW_INPUT_CONTENTS,
            prost::encoding::WireType::LengthDelimited,
            &mut head,
        );
        prost::encoding::encode_varint(contents.len() as u64, &mut head);
        if contents.len() >= CHAIN_AT {
            buffers.push(head.split().freeze());
            buffers.push(contents);
        } else {
            head.extend_from_slice(&contents);
        }
    }
    if !head.is_empty() {
        buffers.push(head.freeze());
    }
    Ok(buffers)
}

/// The response in a gRPC message (five-byte prefix, then the protobuf).
fn decode(mut message: Bytes) -> Result<ModelInferResponse, Status> {
    if message.len() < 5 {
        return Err(Status::internal("the worker's answer has no message"));
    }
    if message[0] != 0 {
        return Err(Status::internal(
            "the worker compressed its answer, which was not asked for",
        ));
    }
    let length = u32::from_be_bytes([message[1], message[2], message[3], message[4]]) as usize;
    let payload = message.split_off(5);
    if payload.len() != length {
        return Err(Status::internal(format!(
            "the worker's answer says {length} bytes but holds {}",
            payload.len()
        )));
    }
    ModelInferResponse::decode(payload)
        .map_err(|e| Status::internal(format!("the worker's answer does not decode: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aviary::pb::inference::model_infer_request::InferInputTensor;

    fn request(raw: Vec<Bytes>) -> ModelInferRequest {
        ModelInferRequest {
            model_name: "m".into(),
            model_version: "1".into(),
            id: "x".into(),
            inputs: vec![InferInputTensor {
                name: "input".into(),
                datatype: "FP32".into(),
                shape: vec![1, 4],
                ..Default::default()
            }],
            raw_input_contents: raw,
            ..Default::default()
        }
    }

    /// What the buffers decode to on the other side.
    fn joined(buffers: &[Bytes]) -> ModelInferRequest {
        let all: Vec<u8> = buffers.iter().flat_map(|b| b.iter().copied()).collect();
        let length = u32::from_be_bytes([all[1], all[2], all[3], all[4]]) as usize;
        assert_eq!(all[0], 0);
        assert_eq!(
            length,
            all.len() - 5,
            "the prefix states the message length"
        );
        ModelInferRequest::decode(&all[5..]).expect("decodes")
    }

    #[test]
    fn small_requests_are_one_buffer_and_decode_to_themselves() {
        let request = request(vec![Bytes::from(vec![7u8; 16])]);
        let buffers = encode(&request, 1 << 20).expect("encodes");
        assert_eq!(buffers.len(), 1);
        assert_eq!(joined(&buffers), request);
    }

    #[test]
    fn large_raw_inputs_are_sent_without_copying_and_decode_to_themselves() {
        let big = Bytes::from(vec![3u8; CHAIN_AT * 2]);
        let request = request(vec![
            Bytes::from(vec![1u8; 8]),
            big.clone(),
            Bytes::from(vec![2u8; 8]),
        ]);
        let buffers = encode(&request, 1 << 20).expect("encodes");
        assert!(
            buffers.iter().any(|b| b.as_ptr() == big.as_ptr()),
            "the large input is sent as it is"
        );
        assert_eq!(joined(&buffers), request);
    }

    #[test]
    fn a_request_over_the_limit_is_refused_before_sending() {
        let request = request(vec![Bytes::from(vec![0u8; 4096])]);
        let status = encode(&request, 1024).expect_err("over the limit");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn grpc_timeouts_fit_in_eight_digits() {
        assert_eq!(grpc_timeout(Duration::from_millis(1500)), "1500000u");
        assert_eq!(grpc_timeout(Duration::ZERO), "1u");
        assert_eq!(grpc_timeout(Duration::from_secs(1000)), "1000000m");
    }

    #[test]
    fn answers_that_are_not_one_whole_message_are_refused() {
        assert_eq!(
            decode(Bytes::from_static(b"\0\0"))
                .expect_err("refused")
                .code(),
            tonic::Code::Internal
        );
        assert_eq!(
            decode(Bytes::from_static(b"\x01\0\0\0\0"))
                .expect_err("refused")
                .code(),
            tonic::Code::Internal
        );
        assert_eq!(
            decode(Bytes::from_static(b"\0\0\0\0\x09abc"))
                .expect_err("refused")
                .code(),
            tonic::Code::Internal
        );
        let empty = decode(Bytes::from_static(b"\0\0\0\0\0")).expect("an empty message");
        assert_eq!(empty, ModelInferResponse::default());
    }
}
