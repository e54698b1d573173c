//! KServe v2 inference over HTTP: the JSON request, with Triton's binary tensor data
//! extension, read into a `ModelInferRequest`; a `ModelInferResponse` written back as
//! the JSON answer and the binary outputs after it. Pure: no I/O.
//!
//! A request body is a JSON header, then (when `Inference-Header-Content-Length`
//! says where the JSON ends) the raw contents of the inputs whose `binary_data_size`
//! parameter says how many of those bytes are theirs, in input order. Every input
//! becomes raw contents, as tritonclient's gRPC requests are. An output is answered
//! in binary when its `binary_data` parameter, or else the request's
//! `binary_data_output`, says so; its JSON then has `binary_data_size` in place of
//! `data`, and the response says where its JSON ends in the same header.

use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::{
    json_tensors::{self, DecodeError, Fidelity},
    parameters::{BINARY_DATA, BINARY_DATA_OUTPUT, BINARY_DATA_SIZE, SHARED_MEMORY_REGION},
    pb::inference::{
        InferParameter, ModelInferRequest, ModelInferResponse,
        infer_parameter::ParameterChoice,
        model_infer_request::{InferInputTensor, InferRequestedOutputTensor},
    },
    tensor::{self, Datatype},
};

/// The header saying how many bytes of a body are its JSON, the rest being binary
/// tensor data.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// A request the endpoint cannot read, for the reason given (a 400 answer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);

fn bad(message: impl Into<String>) -> BadRequest {
    BadRequest(message.into())
}

/// The JSON of an inference request, as KServe v2 defines it. Fields it does not
/// define are refused, not ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestJson {
    #[serde(default)]
    id: Option<String>,
    #[serde(default, deserialize_with = "unique_keys")]
    parameters: Option<Map<String, Value>>,
    inputs: Vec<InputJson>,
    #[serde(default)]
    outputs: Option<Vec<OutputJson>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputJson {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default, deserialize_with = "unique_keys")]
    parameters: Option<Map<String, Value>>,
    /// `Some(Null)` for `"data": null`: present, and refused as no tensor's data.
    #[serde(default, deserialize_with = "present")]
    data: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputJson {
    name: String,
    #[serde(default, deserialize_with = "unique_keys")]
    parameters: Option<Map<String, Value>>,
}

/// A field that is there, whatever its value (`null` included).
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

/// A parameters object whose names are each given once: a repeated name is refused
/// rather than one of its values dropped.
fn unique_keys<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Map<String, Value>>, D::Error> {
    struct Unique;
    impl<'de> serde::de::Visitor<'de> for Unique {
        type Value = Option<Map<String, Value>>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object of parameters")
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut parameters = Map::new();
            while let Some((name, value)) = map.next_entry::<String, Value>()? {
                if parameters.contains_key(&name) {
                    return Err(serde::de::Error::custom(format!(
                        "parameter \"{name}\" is given twice"
                    )));
                }
                parameters.insert(name, value);
            }
            Ok(Some(parameters))
        }
    }
    deserializer.deserialize_any(Unique)
}

/// How the answer's outputs are written: each requested output's choice, and the
/// request's default for the others.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputForm {
    /// `binary_data_output`: outputs not named below are answered in binary.
    binary_by_default: bool,
    /// Each requested output's own `binary_data`, when it set one.
    binary: HashMap<String, bool>,
}

impl OutputForm {
    fn is_binary(&self, output: &str) -> bool {
        self.binary
            .get(output)
            .copied()
            .unwrap_or(self.binary_by_default)
    }
}

/// The request for `model` (at `version`, empty: the server picks) that `body` holds;
/// `json_length` is its `Inference-Header-Content-Length`, if it had one.
pub fn read_request(
    model: &str,
    version: &str,
    body: &[u8],
    json_length: Option<usize>,
) -> Result<(ModelInferRequest, OutputForm), BadRequest> {
    let (json, mut binary) = match json_length {
        Some(length) if length > body.len() => {
            return Err(bad(format!(
                "{HEADER_LENGTH} is {length} but the body has only {} bytes",
                body.len()
            )));
        }
        Some(length) => body.split_at(length),
        None => (body, &[][..]),
    };
    let parsed: RequestJson = serde_json::from_slice(json).map_err(|error| {
        bad(format!(
            "the request is not a KServe v2 inference request: {error}"
        ))
    })?;
    let mut parameters = parsed.parameters.unwrap_or_default();
    let binary_by_default = take_bool(&mut parameters, BINARY_DATA_OUTPUT, "the request")?;
    let mut request = ModelInferRequest {
        model_name: model.to_owned(),
        model_version: version.to_owned(),
        id: parsed.id.unwrap_or_default(),
        parameters: to_parameters(parameters, "the request")?,
        ..Default::default()
    };
    for input in parsed.inputs {
        let (tensor, raw) = read_input(input, &mut binary)?;
        request.inputs.push(tensor);
        request.raw_input_contents.extend(raw);
    }
    if !binary.is_empty() {
        return Err(bad(format!(
            "{} bytes of binary data follow the JSON that no input's {BINARY_DATA_SIZE} claims",
            binary.len()
        )));
    }
    let mut form = OutputForm {
        binary_by_default,
        binary: HashMap::new(),
    };
    for output in parsed.outputs.unwrap_or_default() {
        let place = format!("output \"{}\"", output.name);
        let mut parameters = output.parameters.unwrap_or_default();
        if let Some(binary) = take_optional_bool(&mut parameters, BINARY_DATA, &place)? {
            form.binary.insert(output.name.clone(), binary);
        }
        request.outputs.push(InferRequestedOutputTensor {
            parameters: to_parameters(parameters, &place)?,
            name: output.name,
        });
    }
    Ok((request, form))
}

/// One input: its tensor, and its raw contents (none when a shared memory region
/// holds them), taken from its JSON `data` or from the front of `binary`.
fn read_input(
    input: InputJson,
    binary: &mut &[u8],
) -> Result<(InferInputTensor, Option<Bytes>), BadRequest> {
    let place = format!("input \"{}\"", input.name);
    let mut parameters = input.parameters.unwrap_or_default();
    let binary_size = match parameters.remove(BINARY_DATA_SIZE) {
        None => None,
        Some(value) => Some(
            value
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| {
                    bad(format!(
                        "{place}: parameter \"{BINARY_DATA_SIZE}\" must be a non-negative integer, not {value}"
                    ))
                })?,
        ),
    };
    let in_shared_memory = parameters.contains_key(SHARED_MEMORY_REGION);
    if input.data == Some(Value::Null) {
        return Err(bad(format!("{place}: \"data\" is null")));
    }
    let raw = match (binary_size, input.data, in_shared_memory) {
        (Some(_), Some(_), _) => {
            return Err(bad(format!(
                "{place}: has both \"data\" and parameter \"{BINARY_DATA_SIZE}\"; send one"
            )));
        }
        (Some(size), None, _) => {
            if size > binary.len() {
                return Err(bad(format!(
                    "{place}: {BINARY_DATA_SIZE} is {size} but only {} bytes of binary data are left",
                    binary.len()
                )));
            }
            let (mine, rest) = binary.split_at(size);
            *binary = rest;
            Some(Bytes::copy_from_slice(mine))
        }
        (None, Some(data), _) => Some(Bytes::from(
            json_data(&input.datatype, &input.shape, &data)
                .map_err(|reason| bad(format!("{place}: {reason}")))?,
        )),
        (None, None, true) => None,
        (None, None, false) => {
            return Err(bad(format!(
                "{place}: has no \"data\", no parameter \"{BINARY_DATA_SIZE}\" and no shared memory region"
            )));
        }
    };
    let tensor = InferInputTensor {
        parameters: to_parameters(parameters, &place)?,
        name: input.name,
        datatype: input.datatype,
        shape: input.shape,
        contents: None,
    };
    Ok((tensor, raw))
}

/// The raw contents of an input's JSON `data` (flat or nested, row-major) as a
/// `datatype` tensor of `shape`.
fn json_data(datatype: &str, shape: &[i64], data: &Value) -> Result<Vec<u8>, String> {
    let datatype = Datatype::parse(datatype)
        .ok_or_else(|| format!("datatype \"{datatype}\" is not a v2 datatype"))?;
    let (_, leaves) = json_tensors::flatten(data)?;
    let expected = tensor::element_count(shape)
        .ok_or_else(|| format!("shape {shape:?} is not a tensor shape"))?;
    if leaves.len() != expected {
        return Err(format!(
            "shape {shape:?} has {expected} elements but \"data\" has {}",
            leaves.len()
        ));
    }
    json_tensors::encode(datatype, &leaves)
}

/// Takes `name` off `parameters` as a boolean; absent: false.
fn take_bool(
    parameters: &mut Map<String, Value>,
    name: &str,
    place: &str,
) -> Result<bool, BadRequest> {
    Ok(take_optional_bool(parameters, name, place)?.unwrap_or(false))
}

fn take_optional_bool(
    parameters: &mut Map<String, Value>,
    name: &str,
    place: &str,
) -> Result<Option<bool>, BadRequest> {
    match parameters.remove(name) {
        None => Ok(None),
        Some(Value::Bool(value)) => Ok(Some(value)),
        Some(other) => Err(bad(format!(
            "{place}: parameter \"{name}\" must be true or false, not {other}"
        ))),
    }
}

/// JSON parameters as v2 parameters: booleans, integers, other numbers and strings.
pub fn to_parameters(
    parameters: Map<String, Value>,
    place: &str,
) -> Result<HashMap<String, InferParameter>, BadRequest> {
    parameters
        .into_iter()
        .map(|(name, value)| {
            let choice = match &value {
                Value::Bool(b) => ParameterChoice::BoolParam(*b),
                Value::String(s) => ParameterChoice::StringParam(s.clone()),
                Value::Number(n) => {
                    if let Some(i) = n.as_i64() {
                        ParameterChoice::Int64Param(i)
                    } else if let Some(u) = n.as_u64() {
                        ParameterChoice::Uint64Param(u)
                    } else {
                        // Neither integer form: serde_json holds it as an f64.
                        ParameterChoice::DoubleParam(n.as_f64().unwrap_or(f64::NAN))
                    }
                }
                Value::Null | Value::Array(_) | Value::Object(_) => {
                    return Err(bad(format!(
                        "{place}: parameter \"{name}\" must be a boolean, a number or a string, not {value}"
                    )));
                }
            };
            Ok((
                name,
                InferParameter {
                    parameter_choice: Some(choice),
                },
            ))
        })
        .collect()
}

/// A v2 parameter as JSON (`null` for one with no value).
pub fn parameter_json(parameter: &InferParameter) -> Value {
    match &parameter.parameter_choice {
        Some(ParameterChoice::BoolParam(b)) => Value::from(*b),
        Some(ParameterChoice::Int64Param(i)) => Value::from(*i),
        Some(ParameterChoice::Uint64Param(u)) => Value::from(*u),
        Some(ParameterChoice::DoubleParam(f)) => Value::from(*f),
        Some(ParameterChoice::StringParam(s)) => Value::from(s.as_str()),
        None => Value::Null,
    }
}

/// The parameters of a response (or of one of its outputs) as a JSON object.
fn parameters_json(parameters: &HashMap<String, InferParameter>) -> Map<String, Value> {
    let mut sorted: Vec<_> = parameters.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    sorted
        .into_iter()
        .map(|(name, value)| (name.clone(), parameter_json(value)))
        .collect()
}

/// An answer as the endpoint sends it: the body, and where its JSON ends when binary
/// outputs follow it.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// JSON, then the binary outputs.
    pub body: Bytes,
    /// `Inference-Header-Content-Length`, when binary outputs follow the JSON.
    pub json_length: Option<usize>,
}

/// An answer that cannot be written as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unwritable {
    /// An output JSON cannot carry (bytes that are not UTF-8, a NaN): the client asked
    /// for JSON where only binary data would do.
    #[error("{0}")]
    NotJson(String),
    /// The answer itself is malformed (no contents, an unknown datatype).
    #[error("{0}")]
    Malformed(String),
}

/// `response` as JSON with its binary outputs after it, as `form` asks.
pub fn write_response(
    response: &ModelInferResponse,
    form: &OutputForm,
) -> Result<Answer, Unwritable> {
    let mut outputs = Vec::with_capacity(response.outputs.len());
    let mut binary = Vec::new();
    for (i, output) in response.outputs.iter().enumerate() {
        let place = format!("output \"{}\"", output.name);
        let mut json = Map::new();
        json.insert("name".into(), Value::from(output.name.as_str()));
        json.insert("datatype".into(), Value::from(output.datatype.as_str()));
        json.insert("shape".into(), Value::from(output.shape.clone()));
        let mut parameters = parameters_json(&output.parameters);
        if !output.parameters.contains_key(SHARED_MEMORY_REGION) {
            let raw = output_contents(response, i)
                .map_err(|e| Unwritable::Malformed(format!("{place}: {e}")))?;
            if form.is_binary(&output.name) {
                parameters.insert(BINARY_DATA_SIZE.into(), Value::from(raw.len()));
                binary.push(raw);
            } else {
                let datatype = Datatype::parse(&output.datatype).ok_or_else(|| {
                    Unwritable::Malformed(format!("{place}: unknown datatype {}", output.datatype))
                })?;
                let data = json_tensors::decode_raw(datatype, &raw, &output.shape, Fidelity::Exact)
                    .map_err(|e| match e {
                        DecodeError::NotJson(e) => Unwritable::NotJson(format!(
                            "{place}: {e}; ask for it with \"{BINARY_DATA}\": true"
                        )),
                        DecodeError::Malformed(e) => Unwritable::Malformed(format!("{place}: {e}")),
                    })?;
                json.insert("data".into(), Value::Array(data));
            }
        }
        if !parameters.is_empty() {
            json.insert("parameters".into(), Value::Object(parameters));
        }
        outputs.push(Value::Object(json));
    }
    let mut head = Map::new();
    head.insert(
        "model_name".into(),
        Value::from(response.model_name.as_str()),
    );
    head.insert(
        "model_version".into(),
        Value::from(response.model_version.as_str()),
    );
    if !response.id.is_empty() {
        head.insert("id".into(), Value::from(response.id.as_str()));
    }
    if !response.parameters.is_empty() {
        head.insert(
            "parameters".into(),
            Value::Object(parameters_json(&response.parameters)),
        );
    }
    head.insert("outputs".into(), Value::Array(outputs));
    let json = serde_json::to_vec(&Value::Object(head))
        .map_err(|e| Unwritable::Malformed(e.to_string()))?;
    if binary.is_empty() {
        return Ok(Answer {
            body: Bytes::from(json),
            json_length: None,
        });
    }
    let json_length = json.len();
    let mut body =
        BytesMut::with_capacity(json_length + binary.iter().map(Bytes::len).sum::<usize>());
    body.put_slice(&json);
    for raw in binary {
        body.put_slice(&raw);
    }
    Ok(Answer {
        body: body.freeze(),
        json_length: Some(json_length),
    })
}

/// The raw contents of output `index`: its raw contents, or its typed contents
/// written raw.
fn output_contents(response: &ModelInferResponse, index: usize) -> Result<Bytes, String> {
    if let Some(raw) = response.raw_output_contents.get(index) {
        return Ok(raw.clone());
    }
    let output = &response.outputs[index];
    let typed = output
        .contents
        .as_ref()
        .ok_or("the answer has no contents for it")?;
    let datatype = Datatype::parse(&output.datatype)
        .ok_or_else(|| format!("unknown datatype {}", output.datatype))?;
    if datatype == Datatype::Bytes {
        return Ok(Bytes::from(tensor::encode_bytes_elements(
            typed.bytes_contents.iter(),
        )));
    }
    let values = json_tensors::typed_values(datatype, typed);
    let leaves: Vec<&Value> = values.iter().collect();
    json_tensors::encode(datatype, &leaves).map(Bytes::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::inference::model_infer_response::InferOutputTensor;
    use serde_json::json;

    fn read(
        body: &[u8],
        json_length: Option<usize>,
    ) -> Result<(ModelInferRequest, OutputForm), BadRequest> {
        read_request("m", "", body, json_length)
    }

    #[test]
    fn json_inputs_become_raw_contents_and_parameters_keep_their_types() {
        let body = json!({
            "id": "r1",
            "parameters": {"sequence_id": 7, "sequence_start": true, "binary_data_output": true, "tag": "x", "w": 0.5},
            "inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1.0, 2.0], [3.0, 4.0]]}],
            "outputs": [{"name": "y", "parameters": {"binary_data": false, "classification": 2}}]
        });
        let (request, form) = read(body.to_string().as_bytes(), None).expect("reads");
        assert_eq!(request.id, "r1");
        assert_eq!(
            request.raw_input_contents[0],
            tensor::to_raw(&[1.0f32, 2.0, 3.0, 4.0])
        );
        let p = &request.parameters;
        assert_eq!(
            p["sequence_id"].parameter_choice,
            Some(ParameterChoice::Int64Param(7))
        );
        assert_eq!(
            p["sequence_start"].parameter_choice,
            Some(ParameterChoice::BoolParam(true))
        );
        assert_eq!(
            p["w"].parameter_choice,
            Some(ParameterChoice::DoubleParam(0.5))
        );
        // The binary extension's own parameters are read here, never passed on.
        assert!(!p.contains_key(BINARY_DATA_OUTPUT));
        assert!(!request.outputs[0].parameters.contains_key(BINARY_DATA));
        assert!(request.outputs[0].parameters.contains_key("classification"));
        assert!(!form.is_binary("y"), "its own binary_data wins");
        assert!(form.is_binary("z"), "the request's default");
    }

    #[test]
    fn binary_inputs_take_their_bytes_in_order() {
        let a = tensor::to_raw(&[1i32, 2, 3]);
        let b = tensor::encode_bytes_elements([b"\x00\xff".as_slice(), b"ok"]);
        let head = json!({"inputs": [
            {"name": "a", "shape": [3], "datatype": "INT32", "parameters": {"binary_data_size": a.len()}},
            {"name": "j", "shape": [1], "datatype": "BOOL", "data": [true]},
            {"name": "b", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": b.len()}}
        ]})
        .to_string();
        let body = [head.as_bytes(), &a, &b].concat();
        let (request, _) = read(&body, Some(head.len())).expect("reads");
        assert_eq!(
            request.raw_input_contents,
            vec![
                Bytes::from(a.clone()),
                Bytes::from(vec![1u8]),
                Bytes::from(b.clone())
            ]
        );
        assert!(
            request
                .inputs
                .iter()
                .all(|i| !i.parameters.contains_key(BINARY_DATA_SIZE))
        );

        // One byte more than the inputs claim, one byte fewer, or a length past the end.
        let extra = [body.as_slice(), b"!"].concat();
        let error = read(&extra, Some(head.len())).expect_err("extra byte");
        assert!(error.0.contains("1 bytes of binary data"), "{error}");
        let error = read(&body[..body.len() - 1], Some(head.len())).expect_err("short");
        assert!(error.0.contains("input \"b\""), "{error}");
        let error = read(&body, Some(body.len() + 1)).expect_err("past the end");
        assert!(error.0.contains(HEADER_LENGTH), "{error}");
    }

    #[test]
    fn malformed_requests_are_refused_naming_what_is_wrong() {
        let cases = [
            (
                json!({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0]}]}),
                "has 2 elements but \"data\" has 1",
            ),
            (
                json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}),
                "input \"x\": has no \"data\"",
            ),
            (
                json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1], "parameters": {"binary_data_size": 4}}]}),
                "both",
            ),
            (
                json!({"inputs": [{"name": "x", "shape": [1], "datatype": "UINT8", "data": [300]}]}),
                "out of range for UINT8",
            ),
            (
                json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP99", "data": [1]}]}),
                "\"FP99\" is not a v2 datatype",
            ),
            (json!({"inputs": [], "extra": 1}), "unknown field `extra`"),
            (
                json!({"inputs": [], "parameters": {"binary_data_output": "yes"}}),
                "must be true or false",
            ),
            (
                json!({"inputs": [], "parameters": {"p": [1]}}),
                "parameter \"p\" must be a boolean, a number or a string",
            ),
        ];
        for (body, expected) in cases {
            let error = read(body.to_string().as_bytes(), None).expect_err("refused");
            assert!(error.0.contains(expected), "{body}: {error}");
        }
        // Inputs in shared memory have no data of their own.
        let shm = json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
            "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 4}}]});
        let (request, _) = read(shm.to_string().as_bytes(), None).expect("shared memory input");
        assert!(request.raw_input_contents.is_empty());
    }

    fn response() -> ModelInferResponse {
        ModelInferResponse {
            model_name: "m".into(),
            model_version: "2".into(),
            id: "r1".into(),
            outputs: vec![
                InferOutputTensor {
                    name: "y".into(),
                    datatype: "FP32".into(),
                    shape: vec![2],
                    ..Default::default()
                },
                InferOutputTensor {
                    name: "s".into(),
                    datatype: "BYTES".into(),
                    shape: vec![1],
                    ..Default::default()
                },
            ],
            raw_output_contents: vec![
                Bytes::from(tensor::to_raw(&[0.5f32, 0.25])),
                Bytes::from(tensor::encode_bytes_elements([[0xffu8, 0x00]])),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn binary_outputs_follow_the_json_and_say_their_size() {
        let form = OutputForm {
            binary_by_default: true,
            binary: HashMap::new(),
        };
        let answer = write_response(&response(), &form).expect("writes");
        let length = answer.json_length.expect("binary follows");
        let head: Value = serde_json::from_slice(&answer.body[..length]).expect("json");
        assert_eq!(head["model_version"], "2");
        assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert!(head["outputs"][0].get("data").is_none());
        let mut expected = tensor::to_raw(&[0.5f32, 0.25]);
        expected.extend(tensor::encode_bytes_elements([[0xffu8, 0x00]]));
        assert_eq!(&answer.body[length..], expected.as_slice());
    }

    #[test]
    fn json_outputs_carry_data_and_bytes_json_cannot_hold_are_refused() {
        let form = OutputForm {
            binary_by_default: false,
            binary: HashMap::from([("s".to_owned(), true)]),
        };
        let answer = write_response(&response(), &form).expect("writes");
        let length = answer.json_length.expect("s is binary");
        let head: Value = serde_json::from_slice(&answer.body[..length]).expect("json");
        assert_eq!(head["outputs"][0]["data"], json!([0.5, 0.25]));
        let all_json = OutputForm::default();
        let error = write_response(&response(), &all_json).expect_err("not UTF-8");
        assert!(matches!(error, Unwritable::NotJson(_)), "{error:?}");
        let text = error.to_string();
        assert!(
            text.contains("output \"s\"") && text.contains("binary_data"),
            "{text}"
        );
    }

    proptest::proptest! {
        /// Any FP32 tensor reads the same from JSON data as from binary data.
        #[test]
        fn json_and_binary_fp32_inputs_agree(values in proptest::collection::vec(-1.0e30f32..1.0e30, 0..64)) {
            let raw = tensor::to_raw(&values);
            let shape = [values.len()];
            let json_body = json!({"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": values}]}).to_string();
            let head = json!({"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "parameters": {"binary_data_size": raw.len()}}]}).to_string();
            let binary_body = [head.as_bytes(), &raw].concat();
            let (from_json, _) = read(json_body.as_bytes(), None).expect("json");
            let (from_binary, _) = read(&binary_body, Some(head.len())).expect("binary");
            proptest::prop_assert_eq!(&from_json.raw_input_contents, &from_binary.raw_input_contents);
            proptest::prop_assert_eq!(from_json.raw_input_contents[0].as_ref(), raw.as_slice());
        }
    }
}
