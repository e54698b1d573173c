//! The audit record of one prediction: what is taken from the request before it is
//! served (its id, a hash of its inputs, the pseudonym of its sticky key, the routing
//! reason, and with `[audit] payloads` the inputs themselves) and what is added once it
//! is answered (the version and model file that answered, the status, the latency, and
//! the outputs).

use std::time::Duration;

use aviary::pb::inference::{
    ModelInferRequest, ModelInferResponse, infer_parameter::ParameterChoice,
};
use aviary_router::RequestAttributes;
use aviary_worker::model::FINGERPRINT_PARAMETER;
use prost::Message;

use super::{Audit, Kind};
use crate::{
    GatewayError,
    cache::CACHE_PARAMETER,
    front::{DEFAULT_PARAMETER, FALLBACK_PARAMETER},
};

/// A sampled prediction, between its routing and its answer.
#[derive(Debug)]
pub struct PendingPrediction {
    request_id: String,
    inputs_hash: String,
    subject: Option<String>,
    reason: &'static str,
    inputs: Option<serde_json::Value>,
}

impl PendingPrediction {
    /// What the record needs of `request` before it is served: `route` (the model's
    /// compiled route) says where its sticky key is, `reason` why its version was chosen.
    pub fn begin<A: RequestAttributes>(
        audit: &Audit,
        route: Option<&aviary_router::Route>,
        request: &ModelInferRequest,
        attributes: &A,
        reason: &'static str,
    ) -> PendingPrediction {
        let subject = route
            .and_then(|r| r.sticky_key(attributes))
            .and_then(|key| audit.pseudonym(key));
        PendingPrediction {
            request_id: request.id.clone(),
            inputs_hash: inputs_hash(request),
            subject,
            reason,
            inputs: audit
                .payload_cap()
                .map(|cap| capped(aviary::client::decode_request(request), cap)),
        }
    }

    /// Records the prediction of `model`, routed to `version`, answered with `result`
    /// (before the fingerprint is taken out of it) after `latency`.
    pub fn finish(
        self,
        audit: &Audit,
        model: &str,
        version: &str,
        result: &Result<ModelInferResponse, GatewayError>,
        latency: Duration,
    ) {
        let mut record = Audit::record_of(Kind::Prediction, "infer");
        record.reason = Some(self.reason.to_owned());
        match result {
            Ok(response) => {
                let answered = Some(response.model_version.as_str()).filter(|v| !v.is_empty());
                record = record.about(model, Some(answered.unwrap_or(version)));
                record.fingerprint = string_parameter(response, FINGERPRINT_PARAMETER);
                if response.parameters.contains_key(FALLBACK_PARAMETER) {
                    record.reason = Some("fallback".to_owned());
                } else if response.parameters.contains_key(DEFAULT_PARAMETER) {
                    record.reason = Some("default".to_owned());
                } else if string_parameter(response, CACHE_PARAMETER).as_deref() == Some("hit") {
                    record.reason = Some("cache".to_owned());
                }
                record.outputs = audit
                    .payload_cap()
                    .map(|cap| capped(aviary::client::decode_response(response), cap));
            }
            Err(error) => record = record.about(model, Some(version)).outcome(&error.status()),
        }
        record.request_id = Some(self.request_id).filter(|id| !id.is_empty());
        record.latency_us = Some(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
        record.inputs_hash = Some(self.inputs_hash);
        record.inputs = self.inputs;
        record.subject = self.subject;
        audit.record(record);
    }
}

/// The tensors as JSON when they fit in `cap` bytes of it; otherwise, or when they do
/// not decode, a string saying so (the record stays bounded and says what is missing).
fn capped(
    tensors: Result<Vec<aviary::client::DecodedTensor>, String>,
    cap: usize,
) -> serde_json::Value {
    let tensors = match tensors {
        Ok(tensors) => tensors,
        Err(error) => return format!("not recorded: {error}").into(),
    };
    match serde_json::to_vec(&tensors) {
        Ok(json) if json.len() <= cap => {
            serde_json::to_value(&tensors).unwrap_or_else(|e| e.to_string().into())
        }
        Ok(json) => format!(
            "not recorded: {} bytes of JSON, over audit.max_payload_bytes ({cap})",
            json.len()
        )
        .into(),
        Err(error) => format!("not recorded: {error}").into(),
    }
}

fn string_parameter(response: &ModelInferResponse, name: &str) -> Option<String> {
    match response.parameters.get(name)?.parameter_choice.as_ref()? {
        ParameterChoice::StringParam(value) => Some(value.clone()),
        _ => None,
    }
}

/// BLAKE3 of the request's inputs, in order: each one's name, datatype, shape and
/// contents (typed or raw), every field length-prefixed so no two requests hash the
/// same by running into each other. The first 128 bits, in hex.
pub fn inputs_hash(request: &ModelInferRequest) -> String {
    let mut hasher = blake3::Hasher::new();
    let mut field = |bytes: &[u8]| {
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    for (i, input) in request.inputs.iter().enumerate() {
        field(input.name.as_bytes());
        field(input.datatype.as_bytes());
        let shape: Vec<u8> = input.shape.iter().flat_map(|d| d.to_le_bytes()).collect();
        field(&shape);
        match request.raw_input_contents.get(i) {
            Some(raw) => field(raw),
            None => field(
                &input
                    .contents
                    .as_ref()
                    .map(Message::encode_to_vec)
                    .unwrap_or_default(),
            ),
        }
    }
    hasher.finalize().to_hex()[..32].to_owned()
}

#[cfg(test)]
mod tests {
    use aviary::pb::inference::{InferTensorContents, model_infer_request::InferInputTensor};

    use super::*;

    fn request(values: Vec<f32>, raw: bool) -> ModelInferRequest {
        let mut input = InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![1, values.len() as i64],
            ..InferInputTensor::default()
        };
        let mut request = ModelInferRequest::default();
        if raw {
            request.raw_input_contents =
                vec![values.iter().flat_map(|v| v.to_le_bytes()).collect()];
        } else {
            input.contents = Some(InferTensorContents {
                fp32_contents: values,
                ..InferTensorContents::default()
            });
        }
        request.inputs = vec![input];
        request
    }

    #[test]
    fn equal_inputs_hash_equal_and_any_change_shows() {
        let base = inputs_hash(&request(vec![1.0, 2.0], false));
        assert_eq!(base, inputs_hash(&request(vec![1.0, 2.0], false)));
        assert_eq!(base.len(), 32);
        assert_ne!(base, inputs_hash(&request(vec![1.0, 2.5], false)));
        let raw = inputs_hash(&request(vec![1.0, 2.0], true));
        assert_eq!(raw, inputs_hash(&request(vec![1.0, 2.0], true)));
        assert_ne!(raw, inputs_hash(&request(vec![2.0, 1.0], true)));
        let mut renamed = request(vec![1.0, 2.0], false);
        renamed.inputs[0].name = "other".into();
        assert_ne!(base, inputs_hash(&renamed));
    }
}
