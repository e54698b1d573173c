//! The HTTP/1.1 calls of model sources, on hyper: a JSON GET, and a download streamed
//! to a file while it is hashed. Plain `http://` only (see `problems` in
//! [`super::mlflow`]); one connection per call, which polling every few seconds can
//! afford.

use std::time::Duration;

use aviary_worker::registry::Sha256 as Sha256Digest;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::{io::AsyncWriteExt, net::TcpStream};

use super::SourceError;

/// How long connecting and each response (headers, then each body chunk) may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest JSON answer read (model versions, runs).
const MAX_JSON_BYTES: usize = 16 << 20;

/// Whether `uri` is one this client can call: `http://host[:port]/...`.
pub fn check_uri(uri: &str) -> Result<Uri, String> {
    let parsed: Uri = uri.parse().map_err(|e| format!("not a URI ({e})"))?;
    match parsed.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(
                "https is not supported yet: reach the server over http (a loopback \
                        or in-cluster address)"
                    .to_owned(),
            );
        }
        _ => return Err("must start with http://".to_owned()),
    }
    if parsed.host().is_none_or(str::is_empty) {
        return Err("names no host".to_owned());
    }
    if parsed.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err("must not carry credentials (user:password@): none are sent".to_owned());
    }
    Ok(parsed)
}

async fn get(uri: &Uri) -> Result<hyper::Response<Incoming>, SourceError> {
    let call = |message: String| SourceError::Unreachable(format!("{uri}: {message}"));
    let host = uri.host().ok_or_else(|| call("no host".into()))?;
    let port = uri.port_u16().unwrap_or(80);
    // An IPv6 literal keeps its brackets in the URI, not in the address.
    let address = host.trim_start_matches('[').trim_end_matches(']');
    let stream = tokio::time::timeout(CALL_TIMEOUT, TcpStream::connect((address, port)))
        .await
        .map_err(|_| call("connect timed out".into()))?
        .map_err(|e| call(e.to_string()))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| call(e.to_string()))?;
    tokio::spawn(async move {
        // Ends when the response body is read or dropped; its errors reach the body.
        let _ = connection.await;
    });
    let authority = uri.authority().map_or(host, |a| a.as_str());
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = Request::get(path)
        .header(http::header::HOST, authority)
        .body(Empty::<Bytes>::new())
        .map_err(|e| call(e.to_string()))?;
    tokio::time::timeout(CALL_TIMEOUT, sender.send_request(request))
        .await
        .map_err(|_| call("no answer in time".into()))?
        .map_err(|e| call(e.to_string()))
}

/// The next chunk of `body`, within [`CALL_TIMEOUT`]; `None` at its end.
async fn next_chunk(uri: &Uri, body: &mut Incoming) -> Result<Option<Bytes>, SourceError> {
    let call = |message: String| SourceError::Unreachable(format!("{uri}: {message}"));
    loop {
        let frame = tokio::time::timeout(CALL_TIMEOUT, body.frame())
            .await
            .map_err(|_| call("the answer stalled".into()))?;
        match frame {
            None => return Ok(None),
            Some(Err(e)) => return Err(call(e.to_string())),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    return Ok(Some(data));
                }
            }
        }
    }
}

/// The JSON `uri` answers with. A non-2xx answer is an error carrying the server's
/// status and message (MLflow's `{"error_code", "message"}`); `NotFound` for 404.
pub async fn get_json(uri: &Uri) -> Result<serde_json::Value, SourceError> {
    let response = get(uri).await?;
    let status = response.status();
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = next_chunk(uri, &mut body).await? {
        if bytes.len() + chunk.len() > MAX_JSON_BYTES {
            return Err(SourceError::Invalid(format!(
                "{uri}: the answer is over {MAX_JSON_BYTES} bytes"
            )));
        }
        bytes.extend_from_slice(&chunk);
    }
    let json = serde_json::from_slice::<serde_json::Value>(&bytes);
    let json = match (status.is_success(), json) {
        (true, Ok(json)) => return Ok(json),
        (true, Err(e)) => {
            return Err(SourceError::Invalid(format!(
                "{uri}: answered {status} with no JSON ({e})"
            )));
        }
        // An error page of a proxy in front of the server: it is unreachable.
        (false, Err(_)) => {
            return Err(SourceError::Unreachable(format!(
                "{uri}: answered {status}"
            )));
        }
        (false, Ok(json)) => json,
    };
    let message = json["message"].as_str().unwrap_or("no message").to_owned();
    match status {
        StatusCode::NOT_FOUND => Err(SourceError::NotFound(message)),
        _ if json["error_code"] == "RESOURCE_DOES_NOT_EXIST" => Err(SourceError::NotFound(message)),
        _ if json["error_code"] == "INVALID_PARAMETER_VALUE" && message.contains("not found") => {
            Err(SourceError::NotFound(message))
        }
        _ => Err(SourceError::Unreachable(format!(
            "{uri}: {status}: {message}"
        ))),
    }
}

/// Streams `uri`'s body into `file`; returns its length and SHA-256. An answer
/// that is not 200, or shorter or longer than its `content-length`, is an error.
pub async fn download(
    uri: &Uri,
    file: &mut tokio::fs::File,
) -> Result<(u64, Sha256Digest), SourceError> {
    let response = get(uri).await?;
    match response.status() {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND => {
            return Err(SourceError::NotFound(format!("{uri}: no such artifact")));
        }
        status => {
            return Err(SourceError::Unreachable(format!(
                "{uri}: answered {status}"
            )));
        }
    }
    let declared: Option<u64> = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let mut body = response.into_body();
    let (mut length, mut hasher) = (0u64, Sha256::new());
    while let Some(chunk) = next_chunk(uri, &mut body).await? {
        hasher.update(&chunk);
        length += chunk.len() as u64;
        file.write_all(&chunk)
            .await
            .map_err(|e| SourceError::Storage(e.to_string()))?;
    }
    if let Some(declared) = declared.filter(|d| *d != length) {
        return Err(SourceError::Unreachable(format!(
            "{uri}: the download stopped at {length} of {declared} bytes"
        )));
    }
    Ok((length, Sha256Digest::of_digest(&hasher.finalize())))
}
