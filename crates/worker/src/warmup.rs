//! Warm-up, as a version's model card declares it: the inputs every session runs once
//! at load, so the first real request does not pay for ONNX Runtime's lazy set-up.
//!
//! `warmup = "off"` runs nothing; `warmup = "zeros"` runs zero-filled inputs (every
//! variable dimension 1); a `[warmup]` table gives sample inputs, inline or in a JSON
//! file beside the model. Without a `warmup` key, a model with a BYTES input is not
//! warmed up (an empty string is rarely a valid input), any other on zeros. Samples
//! are checked against the schema at load like any request. Pure code, apart from
//! reading the samples file.

use std::{collections::BTreeMap, path::Path};

use aviary::{
    pb::inference::{ModelInferRequest, model_infer_request::InferInputTensor},
    tensor::{self, Datatype},
};
use serde::{Deserialize, Serialize};

use crate::{
    default_prediction::{self, DefaultValues},
    schema::ModelSchema,
    validate::{self, InputTensor, ValidatedRequest},
};

/// What a card's `warmup` says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum WarmupCard {
    /// `"off"` or `"zeros"`.
    Switch(WarmupSwitch),
    /// Sample inputs.
    Samples(SamplesCard),
}

/// A warm-up without samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WarmupSwitch {
    /// No warm-up.
    Off,
    /// Zero-filled inputs.
    Zeros,
}

/// `[warmup]`: sample inputs, by input name, inline (`inputs`) or in a JSON file
/// (`file`, the same object); exactly one of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplesCard {
    /// Each input's shape and values.
    #[serde(default)]
    pub inputs: BTreeMap<String, Sample>,
    /// A JSON file beside the model with the same object.
    #[serde(default)]
    pub file: Option<String>,
}

/// One input's sample: its shape and its values, row-major (strings for BYTES).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sample {
    /// The concrete shape.
    pub shape: Vec<i64>,
    /// The elements.
    pub values: DefaultValues,
}

/// A version's warm-up, ready to run.
#[derive(Debug, Clone, PartialEq)]
pub enum Warmup {
    /// None.
    Off,
    /// Zero-filled inputs.
    Zeros,
    /// The card's samples, validated.
    Samples(ValidatedRequest),
}

impl Warmup {
    /// The warm-up `card` declares for a model of `schema`, its samples file read from
    /// `folder`. Errors name the card key.
    pub fn from_card(
        card: Option<&WarmupCard>,
        schema: &ModelSchema,
        folder: &Path,
    ) -> Result<Warmup, String> {
        match card {
            None if schema.inputs.iter().any(|i| i.datatype == Datatype::Bytes) => Ok(Warmup::Off),
            None | Some(WarmupCard::Switch(WarmupSwitch::Zeros)) => Ok(Warmup::Zeros),
            Some(WarmupCard::Switch(WarmupSwitch::Off)) => Ok(Warmup::Off),
            Some(WarmupCard::Samples(samples)) => {
                let inputs = match (&samples.file, samples.inputs.is_empty()) {
                    (None, false) => samples.inputs.clone(),
                    (Some(file), true) => {
                        let path = crate::repository::file_beside(folder, file, "warmup.file")
                            .map_err(|e| e.trim_start_matches("model card: ").to_owned())?;
                        let text = std::fs::read_to_string(&path)
                            .map_err(|e| format!("warmup.file: {}: {e}", path.display()))?;
                        serde_json::from_str(&text)
                            .map_err(|e| format!("warmup.file: {}: {e}", path.display()))?
                    }
                    _ => {
                        return Err(
                            "warmup: give sample inputs in exactly one of `inputs` and `file`"
                                .to_owned(),
                        );
                    }
                };
                samples_request(&inputs, schema).map(Warmup::Samples)
            }
        }
    }

    /// The request to run, `None` when off.
    pub fn request(&self, schema: &ModelSchema) -> Option<ValidatedRequest> {
        let outputs = || schema.outputs.iter().map(|o| o.name.clone()).collect();
        match self {
            Warmup::Off => None,
            Warmup::Samples(request) => Some(request.clone()),
            Warmup::Zeros => Some(ValidatedRequest {
                inputs: schema
                    .inputs
                    .iter()
                    .map(|spec| {
                        let shape: Vec<i64> = spec.shape.iter().map(|&d| d.max(1)).collect();
                        let count = tensor::element_count(&shape).unwrap_or(0);
                        InputTensor {
                            name: spec.name.clone(),
                            shape,
                            data: zeros(spec.datatype, count),
                        }
                    })
                    .collect(),
                outputs: outputs(),
            }),
        }
    }

    /// In words, for a failed warm-up's message.
    pub fn describe(&self) -> &'static str {
        match self {
            Warmup::Off => "no warm-up",
            Warmup::Zeros => {
                "warm-up on zero-filled inputs (the default; declare sample inputs in the \
                 model card's [warmup], or warmup = \"off\")"
            }
            Warmup::Samples(_) => "warm-up on the model card's [warmup] samples",
        }
    }
}

/// The samples as a request, checked against `schema` as any request is.
fn samples_request(
    inputs: &BTreeMap<String, Sample>,
    schema: &ModelSchema,
) -> Result<ValidatedRequest, String> {
    let mut request = ModelInferRequest::default();
    for (name, sample) in inputs {
        let spec = schema
            .input(name)
            .ok_or_else(|| format!("warmup.inputs.{name}: the model has no input \"{name}\""))?;
        let raw = default_prediction::values_raw(&sample.values, spec.datatype)
            .map_err(|e| format!("warmup.inputs.{name}: {e}"))?;
        request.inputs.push(InferInputTensor {
            name: name.clone(),
            datatype: spec.datatype.as_str().to_owned(),
            shape: sample.shape.clone(),
            ..InferInputTensor::default()
        });
        request.raw_input_contents.push(raw.into());
    }
    validate::validate(schema, &request).map_err(|e| format!("warmup: {e}"))
}

fn zeros(datatype: Datatype, count: usize) -> validate::TensorData {
    use validate::TensorData;
    match datatype {
        Datatype::Bool => TensorData::Bool(vec![false; count]),
        Datatype::Uint8 => TensorData::Uint8(vec![0; count]),
        Datatype::Uint16 => TensorData::Uint16(vec![0; count]),
        Datatype::Uint32 => TensorData::Uint32(vec![0; count]),
        Datatype::Uint64 => TensorData::Uint64(vec![0; count]),
        Datatype::Int8 => TensorData::Int8(vec![0; count]),
        Datatype::Int16 => TensorData::Int16(vec![0; count]),
        Datatype::Int32 => TensorData::Int32(vec![0; count]),
        Datatype::Int64 => TensorData::Int64(vec![0; count]),
        Datatype::Fp16 => TensorData::Fp16(vec![half::f16::ZERO; count]),
        Datatype::Bf16 => TensorData::Bf16(vec![half::bf16::ZERO; count]),
        Datatype::Fp32 => TensorData::Fp32(vec![0.0; count]),
        Datatype::Fp64 => TensorData::Fp64(vec![0.0; count]),
        Datatype::Bytes => TensorData::Bytes(vec![Vec::new(); count]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::TensorSpec;

    fn schema(inputs: &[(&str, Datatype, &[i64])]) -> ModelSchema {
        ModelSchema {
            inputs: inputs
                .iter()
                .map(|(name, datatype, shape)| TensorSpec {
                    name: (*name).to_owned(),
                    datatype: *datatype,
                    shape: shape.to_vec(),
                })
                .collect(),
            outputs: vec![TensorSpec {
                name: "y".into(),
                datatype: Datatype::Fp32,
                shape: vec![-1],
            }],
        }
    }

    fn card(text: &str) -> Option<WarmupCard> {
        #[derive(Deserialize)]
        struct Card {
            warmup: Option<WarmupCard>,
        }
        toml::from_str::<Card>(text).expect("a card").warmup
    }

    #[test]
    fn string_inputs_are_not_warmed_up_unless_the_card_says_how() {
        let text = schema(&[("text", Datatype::Bytes, &[-1])]);
        let numbers = schema(&[("x", Datatype::Fp32, &[-1, 4])]);
        let here = Path::new(".");
        assert_eq!(Warmup::from_card(None, &text, here), Ok(Warmup::Off));
        assert_eq!(Warmup::from_card(None, &numbers, here), Ok(Warmup::Zeros));
        let off = card(r#"warmup = "off""#);
        assert_eq!(
            Warmup::from_card(off.as_ref(), &numbers, here),
            Ok(Warmup::Off)
        );
        let samples = card(
            r#"[warmup.inputs.text]
shape = [2]
values = ["a photo of a cat", "ünïcode"]"#,
        );
        let Ok(Warmup::Samples(request)) = Warmup::from_card(samples.as_ref(), &text, here) else {
            panic!("samples");
        };
        assert_eq!(
            request.inputs[0].data,
            validate::TensorData::Bytes(vec![
                b"a photo of a cat".to_vec(),
                "ünïcode".as_bytes().to_vec()
            ])
        );
        let zeros = Warmup::Zeros.request(&numbers).expect("a request");
        assert_eq!(zeros.inputs[0].shape, vec![1, 4]);
    }

    #[test]
    fn samples_that_do_not_fit_name_the_key() {
        let numbers = schema(&[("x", Datatype::Fp32, &[-1, 4])]);
        let here = Path::new(".");
        for (text, says) in [
            (
                "[warmup.inputs.z]\nshape = [1]\nvalues = [1.0]",
                "warmup.inputs.z: the model has no input \"z\"",
            ),
            (
                "[warmup.inputs.x]\nshape = [1, 3]\nvalues = [1.0, 2.0, 3.0]",
                "warmup: input \"x\"",
            ),
            (
                "[warmup.inputs.x]\nshape = [1, 4]\nvalues = [\"a\", \"b\", \"c\", \"d\"]",
                "warmup.inputs.x: ",
            ),
            (
                "[warmup]\nfile = \"missing.json\"",
                "warmup.file: ./missing.json",
            ),
            ("[warmup]\n", "warmup: give sample inputs in exactly one"),
        ] {
            let refused = Warmup::from_card(card(text).as_ref(), &numbers, here).expect_err(text);
            assert!(refused.starts_with(says), "{text}: {refused}");
        }
    }
}
