//! A typed v2 client: connecting with message limits fit for tensors, building
//! requests from JSON values using the model's metadata, and decoding responses into
//! JSON values and text for people (what `aviary infer` prints).

use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::Value;
use tonic::transport::{Channel, Endpoint};

use crate::{
    json_tensors::{DecodeError, Fidelity, decode_raw, encode, flatten, typed_values},
    pb::inference::{
        ModelInferRequest, ModelInferResponse, ModelMetadataResponse,
        grpc_inference_service_client::GrpcInferenceServiceClient,
        model_infer_request::InferInputTensor,
    },
    tensor::Datatype,
};

/// Connects to a v2 server at `addr` (`http://host:port`, or `https://` with `tls`)
/// with TCP_NODELAY and no message size limit of its own (the server's limit is the one
/// that counts).
pub async fn connect(
    addr: &str,
    token: Option<&str>,
    tls: &ClientTlsFiles,
) -> Result<GrpcInferenceServiceClient<TokenChannel>, ConnectError> {
    let channel = endpoint(addr, tls)?.tcp_nodelay(true).connect().await?;
    Ok(
        GrpcInferenceServiceClient::new(TokenChannel::new(channel, token)?)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX),
    )
}

/// The endpoint of `addr`: plaintext for `http://`, TLS with `tls`'s files for
/// `https://`. TLS files with an `http://` address are refused rather than ignored.
pub fn endpoint(addr: &str, tls: &ClientTlsFiles) -> Result<Endpoint, ConnectError> {
    let endpoint = Endpoint::from_shared(addr.to_owned())?;
    match addr.starts_with("https://") {
        true => Ok(endpoint.tls_config(tls.tonic_config()?)?),
        false if tls.is_set() => Err(ConnectError::Tls(format!(
            "{addr} is plaintext (http://) but TLS files were given; use https://"
        ))),
        false => Ok(endpoint),
    }
}

/// What a client trusts and, for mTLS, presents (PEM files).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// The CA the server's certificate must chain to.
    pub ca: Option<std::path::PathBuf>,
    /// The client certificate (mTLS), with `key`.
    pub cert: Option<std::path::PathBuf>,
    /// The client certificate's private key.
    pub key: Option<std::path::PathBuf>,
}

impl ClientTlsFiles {
    /// Whether any file is set.
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    /// The files' modification times (`None` for one that cannot be read): a client
    /// that keeps connections compares them to know when to reconnect with new files.
    pub fn modified(&self) -> Vec<Option<std::time::SystemTime>> {
        [&self.ca, &self.cert, &self.key]
            .into_iter()
            .flatten()
            .map(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok())
            .collect()
    }

    /// tonic's client TLS settings for these files.
    pub fn tonic_config(&self) -> Result<tonic::transport::ClientTlsConfig, ConnectError> {
        let read = |path: &std::path::PathBuf| {
            std::fs::read(path).map_err(|e| ConnectError::Tls(format!("{}: {e}", path.display())))
        };
        let Some(ca) = &self.ca else {
            return Err(ConnectError::Tls(
                "--tls-ca: an https:// server needs the CA its certificate chains to".into(),
            ));
        };
        let mut config = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                config = config.identity(tonic::transport::Identity::from_pem(
                    read(cert)?,
                    read(key)?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(ConnectError::Tls(
                    "--tls-cert, --tls-key: a client certificate needs both".into(),
                ));
            }
        }
        Ok(config)
    }
}

/// Connecting failed, or the token cannot be sent as a header.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The address or the connection.
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    /// The API key has characters a header cannot carry.
    #[error("the API key may hold printable ASCII only (no spaces, no other characters)")]
    Token,
    /// The TLS settings cannot be used.
    #[error("TLS: {0}")]
    Tls(String),
}

/// A channel that sends an API key (`authorization: Bearer <token>`) with every call,
/// when it has one: what every Aviary client uses against a server that requires keys.
#[derive(Debug, Clone)]
pub struct TokenChannel {
    channel: Channel,
    authorization: Authorization,
}

/// The `authorization` header a client sends with each call: none, one fixed key, or
/// a shared one that its owner replaces (a key file read again when it changes), so
/// every client made with it sends the new key from its next call on.
#[derive(Debug, Clone, Default)]
pub struct Authorization(Option<std::sync::Arc<arc_swap::ArcSwap<http::HeaderValue>>>);

impl Authorization {
    /// Sends `value` (a [`bearer`] header) with every call; `None`: nothing.
    pub fn fixed(value: Option<http::HeaderValue>) -> Authorization {
        Authorization(value.map(|v| std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(v))))
    }

    /// Sends whatever `current` holds at each call.
    pub fn shared(current: std::sync::Arc<arc_swap::ArcSwap<http::HeaderValue>>) -> Authorization {
        Authorization(Some(current))
    }

    /// The header to send now, if any.
    pub fn current(&self) -> Option<http::HeaderValue> {
        self.0
            .as_ref()
            .map(|value| http::HeaderValue::clone(&value.load()))
    }
}

/// The `authorization` header that sends API key `token`.
pub fn bearer(token: &str) -> Result<http::HeaderValue, ConnectError> {
    // A header value may carry bytes past ASCII, but a server reads the key as text:
    // such a key could never match, so it is refused here, where it is given.
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConnectError::Token);
    }
    let mut value =
        http::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| ConnectError::Token)?;
    // Kept out of debug output and HPACK's index.
    value.set_sensitive(true);
    Ok(value)
}

impl TokenChannel {
    /// `channel`, sending `token` (if any) with each call.
    pub fn new(channel: Channel, token: Option<&str>) -> Result<TokenChannel, ConnectError> {
        let authorization = token.map(bearer).transpose()?;
        Ok(TokenChannel::with_authorization(
            channel,
            Authorization::fixed(authorization),
        ))
    }

    /// `channel`, sending `authorization` with each call.
    pub fn with_authorization(channel: Channel, authorization: Authorization) -> TokenChannel {
        TokenChannel {
            channel,
            authorization,
        }
    }
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for TokenChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = tonic::transport::channel::ResponseFuture;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        tonic::codegen::Service::<http::Request<tonic::body::Body>>::poll_ready(
            &mut self.channel,
            cx,
        )
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        if let Some(value) = self.authorization.current() {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, value);
        }
        self.channel.call(request)
    }
}

/// A JSON tensor value that cannot be sent as the model's input.
#[derive(Debug, thiserror::Error)]
#[error("input \"{input}\": {reason}")]
pub struct InputError {
    input: String,
    reason: String,
}

/// Builds a request for `model` from `inputs` (input name → nested JSON array), typed
/// by the model's metadata. A scalar JSON value is a tensor of shape `[]`.
pub fn build_request(
    metadata: &ModelMetadataResponse,
    version: Option<&str>,
    inputs: &BTreeMap<String, Value>,
) -> Result<ModelInferRequest, InputError> {
    let mut request = ModelInferRequest {
        model_name: metadata.name.clone(),
        model_version: version.unwrap_or_default().to_owned(),
        ..Default::default()
    };
    for (name, value) in inputs {
        let error = |reason: String| InputError {
            input: name.clone(),
            reason,
        };
        let spec = metadata
            .inputs
            .iter()
            .find(|i| &i.name == name)
            .ok_or_else(|| {
                let known: Vec<&str> = metadata.inputs.iter().map(|i| i.name.as_str()).collect();
                error(format!(
                    "the model has no such input (inputs: {})",
                    known.join(", ")
                ))
            })?;
        let datatype = Datatype::parse(&spec.datatype).ok_or_else(|| {
            error(format!(
                "the model declares unknown datatype {}",
                spec.datatype
            ))
        })?;
        let (shape, leaves) = flatten(value).map_err(error)?;
        let raw = encode(datatype, &leaves).map_err(error)?;
        request.inputs.push(InferInputTensor {
            name: name.clone(),
            datatype: datatype.as_str().to_owned(),
            shape,
            ..Default::default()
        });
        request.raw_input_contents.push(Bytes::from(raw));
    }
    Ok(request)
}

/// One decoded tensor (an input or an output): name, datatype, shape and values as JSON.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DecodedTensor {
    /// Output name.
    pub name: String,
    /// Datatype.
    pub datatype: String,
    /// Shape.
    pub shape: Vec<i64>,
    /// Row-major values.
    pub data: Vec<Value>,
}

/// Decodes every output of a response (raw or typed contents).
pub fn decode_response(response: &ModelInferResponse) -> Result<Vec<DecodedTensor>, String> {
    response
        .outputs
        .iter()
        .enumerate()
        .map(|(i, output)| {
            let datatype = Datatype::parse(&output.datatype).ok_or_else(|| {
                format!(
                    "output \"{}\": unknown datatype {}",
                    output.name, output.datatype
                )
            })?;
            let raw = response.raw_output_contents.get(i).ok_or_else(|| {
                format!(
                    "output \"{}\": no raw contents in the response",
                    output.name
                )
            })?;
            let data = decode_raw(datatype, raw, &output.shape, Fidelity::Lossy)
                .map_err(|e| format!("output \"{}\": {e}", output.name))?;
            Ok(DecodedTensor {
                name: output.name.clone(),
                datatype: output.datatype.clone(),
                shape: output.shape.clone(),
                data,
            })
        })
        .collect()
}

/// Decodes every input of a request (raw or typed contents), as [`decode_response`]
/// does a response's outputs. FP16 and BF16 have no typed field: they are raw or absent.
pub fn decode_request(request: &ModelInferRequest) -> Result<Vec<DecodedTensor>, String> {
    request
        .inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let datatype = Datatype::parse(&input.datatype).ok_or_else(|| {
                format!(
                    "input \"{}\": unknown datatype {}",
                    input.name, input.datatype
                )
            })?;
            let data = match (request.raw_input_contents.get(i), &input.contents) {
                (Some(raw), _) => decode_raw(datatype, raw, &input.shape, Fidelity::Lossy),
                (None, Some(typed)) => Ok(typed_values(datatype, typed)),
                (None, None) => Err(DecodeError::Malformed("no contents".to_owned())),
            }
            .map_err(|e| format!("input \"{}\": {e}", input.name))?;
            Ok(DecodedTensor {
                name: input.name.clone(),
                datatype: input.datatype.clone(),
                shape: input.shape.clone(),
                data,
            })
        })
        .collect()
}

/// Renders values as a nested array following `shape`, cutting long tensors short.
pub fn render(shape: &[i64], data: &[Value], limit: usize) -> String {
    fn nest(shape: &[i64], data: &[Value], limit: usize, out: &mut String) {
        match shape.split_first() {
            None => out.push_str(&data.first().map(render_leaf).unwrap_or_default()),
            Some((&dim, rest)) => {
                let stride: usize = rest
                    .iter()
                    .map(|&d| usize::try_from(d).unwrap_or(0))
                    .product();
                out.push('[');
                let dim = usize::try_from(dim).unwrap_or(0);
                for i in 0..dim {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    if i == limit {
                        out.push('…');
                        break;
                    }
                    let start = (i * stride).min(data.len());
                    let end = (start + stride).min(data.len());
                    nest(rest, &data[start..end], limit, out);
                }
                out.push(']');
            }
        }
    }
    let mut out = String::new();
    nest(shape, data, limit, &mut out);
    out
}

fn render_leaf(value: &Value) -> String {
    match value.as_f64() {
        Some(f) if value.is_f64() => format!("{f:.6}"),
        _ => value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_nests_and_truncates() {
        let data: Vec<Value> = (0..6).map(Value::from).collect();
        assert_eq!(render(&[2, 3], &data, 10), "[[0, 1, 2], [3, 4, 5]]");
        assert_eq!(render(&[6], &data, 2), "[0, 1, …]");
    }
}
