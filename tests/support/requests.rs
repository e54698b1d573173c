//! Building v2 requests and reading their answers: what every test file sends.

use std::time::Duration;

use aviary::{
    pb::inference::{
        ModelConfig, ModelConfigRequest, ModelInferRequest, ModelInferResponse,
        ModelMetadataRequest, ModelMetadataResponse, ModelReadyRequest, ServerReadyRequest,
        grpc_inference_service_client::GrpcInferenceServiceClient,
        model_infer_request::InferInputTensor,
    },
    tensor,
};
use tonic::{Status, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// A v2 inference client.
pub type Client = GrpcInferenceServiceClient<Channel>;

/// How long a condition that depends on a server's readiness loop may take (hang
/// protection only).
pub const READINESS_DEADLINE: Duration = Duration::from_secs(15);

/// An input tensor header without data.
pub fn input(name: &str, datatype: &str, shape: &[i64]) -> InferInputTensor {
    InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
        ..Default::default()
    }
}

/// A request for `model` at `version` ("" for unpinned) with raw input contents.
pub fn request(
    model: &str,
    version: &str,
    inputs: Vec<InferInputTensor>,
    raw: Vec<Vec<u8>>,
) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.into(),
        model_version: version.into(),
        id: "e2e".into(),
        inputs,
        raw_input_contents: raw.into_iter().map(Into::into).collect(),
        ..Default::default()
    }
}

/// A `demo` request with FP32 rows of 4 features, as raw contents.
pub fn demo_request(rows: &[[f32; 4]], version: &str) -> ModelInferRequest {
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let mut request = request(
        "demo",
        version,
        vec![input(
            "input",
            "FP32",
            &[i64::try_from(rows.len()).expect("small"), 4],
        )],
        vec![tensor::to_raw(&flat)],
    );
    request.id = "req-1".into();
    request
}

/// The raw output `name` of a response decoded as `T`.
pub fn output<T: tensor::Element>(response: &ModelInferResponse, name: &str) -> Vec<T> {
    let index = response
        .outputs
        .iter()
        .position(|o| o.name == name)
        .unwrap_or_else(|| panic!("response has no output {name}"));
    tensor::from_raw(&response.raw_output_contents[index]).expect("whole elements")
}

/// The answer to `request`, which must succeed.
pub async fn infer(client: &mut Client, request: ModelInferRequest) -> ModelInferResponse {
    let what = format!("{} {:?}", request.model_name, request.model_version);
    client
        .model_infer(request)
        .await
        .unwrap_or_else(|status| panic!("inference ({what}) failed: {status:?}"))
        .into_inner()
}

/// The error `request` gets; panics if it is answered.
pub async fn infer_error(client: &mut Client, request: ModelInferRequest) -> Status {
    match client.model_infer(request).await {
        Ok(response) => panic!("expected an error, got {:?}", response.into_inner()),
        Err(status) => status,
    }
}

/// ServerReady's answer (false on an error).
pub async fn server_ready(client: &mut Client) -> bool {
    client
        .server_ready(ServerReadyRequest {})
        .await
        .is_ok_and(|r| r.into_inner().ready)
}

/// ModelReady's answer for `name` at `version`; it must answer (unknown models and
/// versions are not ready, not an error).
pub async fn model_ready(client: &mut Client, name: &str, version: &str) -> bool {
    client
        .model_ready(ModelReadyRequest {
            name: name.into(),
            version: version.into(),
        })
        .await
        .unwrap_or_else(|s| panic!("ModelReady({name}, {version:?}) is no error: {s:?}"))
        .into_inner()
        .ready
}

/// The gRPC health status of the whole server (`""`), if it answers.
pub async fn health_status(channel: Channel) -> Option<ServingStatus> {
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?
        .into_inner();
    ServingStatus::try_from(response.status).ok()
}

/// ModelMetadata of `name` at `version`, which must answer.
pub async fn model_metadata(
    client: &mut Client,
    name: &str,
    version: &str,
) -> ModelMetadataResponse {
    client
        .model_metadata(ModelMetadataRequest {
            name: name.into(),
            version: version.into(),
        })
        .await
        .unwrap_or_else(|s| panic!("ModelMetadata({name}, {version:?}): {s:?}"))
        .into_inner()
}

/// ModelConfig's config of `name` at `version`, which must answer with one.
pub async fn model_config(client: &mut Client, name: &str, version: &str) -> ModelConfig {
    client
        .model_config(ModelConfigRequest {
            name: name.into(),
            version: version.into(),
        })
        .await
        .unwrap_or_else(|s| panic!("ModelConfig({name}, {version:?}): {s:?}"))
        .into_inner()
        .config
        .unwrap_or_else(|| panic!("ModelConfig({name}, {version:?}) has a config"))
}
