//! v2 messages as the JSON the HTTP/REST endpoint answers with, written from their
//! descriptors ([`crate::FILE_DESCRIPTOR_SET`]) as Triton writes them: proto field
//! names, enums by name, 64-bit integers as JSON numbers, fields at their defaults
//! included. Model configuration, statistics, metadata and the repository index are
//! all answered this way, so a field added to the protocol appears without code here.

use std::sync::LazyLock;

use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use serde_json::Value;

static POOL: LazyLock<Result<DescriptorPool, String>> = LazyLock::new(|| {
    DescriptorPool::decode(crate::FILE_DESCRIPTOR_SET).map_err(|error| error.to_string())
});

/// `message` (of the protobuf type `full_name`, e.g. `inference.ModelConfig`) as JSON.
pub fn to_json(full_name: &str, message: &impl Message) -> Result<Value, String> {
    let pool = POOL.as_ref().map_err(Clone::clone)?;
    let descriptor = pool
        .get_message_by_name(full_name)
        .ok_or_else(|| format!("no message {full_name} in the descriptors"))?;
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
        .map_err(|error| format!("{full_name}: {error}"))?;
    let options = SerializeOptions::new()
        .stringify_64_bit_integers(false)
        .use_proto_field_name(true)
        .skip_default_fields(false);
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|error| format!("{full_name}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::inference::{
        DataType, ModelConfig, ModelInput, ModelStatistics, ModelStatisticsResponse,
        StatisticDuration,
    };

    #[test]
    fn a_model_config_is_written_as_triton_writes_it() {
        let config = ModelConfig {
            name: "iris".into(),
            platform: "onnxruntime_onnx".into(),
            max_batch_size: 8,
            input: vec![ModelInput {
                name: "x".into(),
                data_type: DataType::TypeFp32 as i32,
                dims: vec![4],
                ..Default::default()
            }],
            ..Default::default()
        };
        let json = to_json("inference.ModelConfig", &config).expect("json");
        assert_eq!(json["name"], "iris");
        assert_eq!(json["max_batch_size"], 8);
        assert_eq!(json["input"][0]["data_type"], "TYPE_FP32");
        // int64 dims are numbers, not proto3 JSON's strings, as Triton writes them.
        assert_eq!(json["input"][0]["dims"], serde_json::json!([4]));
        // Defaults are there too: a client reads `dynamic_batching` or `backend` as set.
        assert_eq!(json["backend"], "");
    }

    #[test]
    fn statistics_counts_are_numbers() {
        let response = ModelStatisticsResponse {
            model_stats: vec![ModelStatistics {
                name: "iris".into(),
                version: "1".into(),
                inference_count: 12,
                inference_stats: Some(crate::pb::inference::InferStatistics {
                    success: Some(StatisticDuration { count: 3, ns: 4500 }),
                    ..Default::default()
                }),
                ..Default::default()
            }],
        };
        let json = to_json("inference.ModelStatisticsResponse", &response).expect("json");
        let stats = &json["model_stats"][0];
        assert_eq!(stats["inference_count"], 12);
        assert_eq!(stats["inference_stats"]["success"]["ns"], 4500);
    }

    #[test]
    fn an_unknown_message_name_is_an_error() {
        assert!(to_json("inference.Nope", &ModelConfig::default()).is_err());
    }
}
