//! A version's default prediction: fixed outputs its model card states
//! (`[default_prediction]` in `model.toml`), which a gateway answers with in place of a
//! call that failed, when the route opts in. The last resort of graceful degradation:
//! a client gets a safe, known answer (a neutral score, an "unknown" label) marked as
//! such, instead of an error.
//!
//! The card gives one example's values per output; a batched output (first dimension
//! `-1`) repeats them once per row of the request. They are checked against the
//! version's schema when it loads, so a card that cannot be served fails the load, not a
//! request. The checked prediction travels to gateways as JSON in the version's
//! `ModelConfig` parameters ([`PARAMETER`]), and is checked again when read.

use std::collections::BTreeMap;

use aviary::{
    pb::inference::model_infer_response::InferOutputTensor,
    tensor::{self, Datatype},
};
use serde::{Deserialize, Serialize};

use crate::schema::ModelSchema;

/// The `ModelConfig` parameter carrying a version's default prediction as JSON.
pub const PARAMETER: &str = "card.default_prediction";

/// One output's values as a card writes them: numbers, or strings for BYTES.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DefaultValues {
    /// Values of a numeric or BOOL (0 or 1) output.
    Numbers(Vec<f64>),
    /// Elements of a BYTES output.
    Texts(Vec<String>),
}

impl DefaultValues {
    fn len(&self) -> usize {
        match self {
            DefaultValues::Numbers(v) => v.len(),
            DefaultValues::Texts(v) => v.len(),
        }
    }
}

/// One output of a default prediction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DefaultOutput {
    /// Output name.
    pub name: String,
    /// Element type, as the protocol names it.
    pub datatype: String,
    /// The output's shape; a first dimension of `-1` is the request's rows.
    pub shape: Vec<i64>,
    /// One example's values (the whole tensor when the output is not batched).
    pub values: DefaultValues,
}

/// A version's default prediction, checked against its outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DefaultPrediction {
    /// Every output of the version, in graph order.
    pub outputs: Vec<DefaultOutput>,
}

impl DefaultPrediction {
    /// The prediction a card's `[default_prediction]` states, checked against `schema`:
    /// every output given, no other, each with one example's values of its type.
    /// `None` when the card states none. Errors name the card key.
    pub fn from_card(
        card: &BTreeMap<String, DefaultValues>,
        schema: &ModelSchema,
    ) -> Result<Option<DefaultPrediction>, String> {
        if card.is_empty() {
            return Ok(None);
        }
        if let Some(unknown) = card.keys().find(|name| schema.output(name).is_none()) {
            let known: Vec<&str> = schema.outputs.iter().map(|o| o.name.as_str()).collect();
            return Err(format!(
                "model.toml default_prediction.{unknown}: the model has no output \"{unknown}\" (outputs: {})",
                known.join(", ")
            ));
        }
        let outputs = schema
            .outputs
            .iter()
            .map(|spec| {
                let values = card.get(&spec.name).ok_or_else(|| {
                    format!(
                        "model.toml default_prediction: output \"{}\" has no value; a default must give every output",
                        spec.name
                    )
                })?;
                let output = DefaultOutput {
                    name: spec.name.clone(),
                    datatype: spec.datatype.as_str().to_owned(),
                    shape: spec.shape.clone(),
                    values: values.clone(),
                };
                example_raw(&output)
                    .map_err(|e| format!("model.toml default_prediction.{}: {e}", spec.name))?;
                Ok(output)
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Some(DefaultPrediction { outputs }))
    }

    /// As the `ModelConfig` parameter carries it.
    pub fn to_json(&self) -> String {
        // Plain data of strings, numbers and vectors: serialising cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Read back from the `ModelConfig` parameter, and checked again (it crossed a
    /// network from another program).
    pub fn from_json(text: &str) -> Result<DefaultPrediction, String> {
        let prediction: DefaultPrediction =
            serde_json::from_str(text).map_err(|e| format!("{PARAMETER}: {e}"))?;
        for output in &prediction.outputs {
            example_raw(output)
                .map_err(|e| format!("{PARAMETER} output \"{}\": {e}", output.name))?;
        }
        Ok(prediction)
    }

    /// The outputs for a request of `rows` rows (the first input's first dimension),
    /// only those named in `requested` when it names any, with their raw contents.
    pub fn outputs(&self, rows: i64, requested: &[String]) -> Vec<(InferOutputTensor, Vec<u8>)> {
        let rows = rows.max(1);
        self.outputs
            .iter()
            .filter(|o| requested.is_empty() || requested.contains(&o.name))
            .map(|output| {
                // Checked when built or read: encoding cannot fail here.
                let example = example_raw(output).unwrap_or_default();
                let batched = output.shape.first() == Some(&-1);
                let mut shape = output.shape.clone();
                let raw = if batched {
                    shape[0] = rows;
                    example.repeat(usize::try_from(rows).unwrap_or(1))
                } else {
                    example
                };
                let tensor = InferOutputTensor {
                    name: output.name.clone(),
                    datatype: output.datatype.clone(),
                    shape,
                    ..InferOutputTensor::default()
                };
                (tensor, raw)
            })
            .collect()
    }
}

/// One example's raw contents, or why the values do not fit the output: the count
/// the shape asks for, and values of the output's type.
fn example_raw(output: &DefaultOutput) -> Result<Vec<u8>, String> {
    let datatype = Datatype::parse(&output.datatype)
        .ok_or_else(|| format!("unknown datatype \"{}\"", output.datatype))?;
    let example_dims = match output.shape.split_first() {
        Some((-1, rest)) => rest,
        _ => &output.shape[..],
    };
    if example_dims.iter().any(|&d| d < 0) {
        return Err(format!(
            "the output's shape {:?} has a variable dimension besides the first; a fixed default cannot be shaped",
            output.shape
        ));
    }
    let expected = tensor::element_count(example_dims)
        .ok_or_else(|| format!("shape {:?} is too large", output.shape))?;
    if output.values.len() != expected {
        return Err(format!(
            "{} values given, the output's shape {:?} takes {expected} per example",
            output.values.len(),
            output.shape
        ));
    }
    values_raw(&output.values, datatype)
}

/// Raw contents of `values` as a tensor of `datatype`: strings for BYTES; numbers
/// otherwise, whole and in range for integers, 0 or 1 for BOOL.
pub fn values_raw(values: &DefaultValues, datatype: Datatype) -> Result<Vec<u8>, String> {
    match (values, datatype) {
        (DefaultValues::Texts(texts), Datatype::Bytes) => Ok(tensor::encode_bytes_elements(
            texts.iter().map(String::as_bytes),
        )),
        (DefaultValues::Numbers(numbers), Datatype::Bytes) if numbers.is_empty() => Ok(Vec::new()),
        (DefaultValues::Texts(texts), _) if texts.is_empty() => Ok(Vec::new()),
        (DefaultValues::Numbers(_), Datatype::Bytes) => {
            Err("the tensor is BYTES: give strings".to_owned())
        }
        (DefaultValues::Texts(_), _) => {
            Err(format!("the tensor is {}: give numbers", datatype.as_str()))
        }
        (DefaultValues::Numbers(numbers), _) => numbers_raw(numbers, datatype),
    }
}

/// Little-endian contents of `numbers` as `datatype`; integers must be whole and in
/// range, BOOL 0 or 1.
fn numbers_raw(numbers: &[f64], datatype: Datatype) -> Result<Vec<u8>, String> {
    use tensor::Element;
    let mut raw = Vec::with_capacity(numbers.len() * datatype.element_size().unwrap_or(1));
    for &n in numbers {
        let whole = |min: f64, max: f64| -> Result<f64, String> {
            match n.fract() == 0.0 && (min..=max).contains(&n) {
                true => Ok(n),
                false => Err(format!(
                    "{n} is not a {} value ({min} to {max}, whole)",
                    datatype.as_str()
                )),
            }
        };
        // `as` below converts values just checked to be whole and in range.
        match datatype {
            Datatype::Bool => (whole(0.0, 1.0)? == 1.0).write_le(&mut raw),
            Datatype::Uint8 => (whole(0.0, 255.0)? as u8).write_le(&mut raw),
            Datatype::Uint16 => (whole(0.0, 65_535.0)? as u16).write_le(&mut raw),
            Datatype::Uint32 => (whole(0.0, 4_294_967_295.0)? as u32).write_le(&mut raw),
            Datatype::Uint64 => (whole(0.0, 2f64.powi(53))? as u64).write_le(&mut raw),
            Datatype::Int8 => (whole(-128.0, 127.0)? as i8).write_le(&mut raw),
            Datatype::Int16 => (whole(-32_768.0, 32_767.0)? as i16).write_le(&mut raw),
            Datatype::Int32 => {
                (whole(-2_147_483_648.0, 2_147_483_647.0)? as i32).write_le(&mut raw)
            }
            Datatype::Int64 => (whole(-(2f64.powi(53)), 2f64.powi(53))? as i64).write_le(&mut raw),
            Datatype::Fp16 => raw.extend_from_slice(&half::f16::from_f64(n).to_le_bytes()),
            Datatype::Bf16 => raw.extend_from_slice(&half::bf16::from_f64(n).to_le_bytes()),
            Datatype::Fp32 => (n as f32).write_le(&mut raw),
            Datatype::Fp64 => n.write_le(&mut raw),
            Datatype::Bytes => unreachable!("BYTES takes strings, handled by the caller"),
        }
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::TensorSpec;

    fn schema() -> ModelSchema {
        ModelSchema {
            inputs: vec![TensorSpec {
                name: "x".into(),
                datatype: Datatype::Fp32,
                shape: vec![-1, 4],
            }],
            outputs: vec![
                TensorSpec {
                    name: "scores".into(),
                    datatype: Datatype::Fp32,
                    shape: vec![-1, 3],
                },
                TensorSpec {
                    name: "label".into(),
                    datatype: Datatype::Bytes,
                    shape: vec![-1],
                },
                TensorSpec {
                    name: "flags".into(),
                    datatype: Datatype::Int64,
                    shape: vec![2],
                },
            ],
        }
    }

    fn card(text: &str) -> BTreeMap<String, DefaultValues> {
        #[derive(Deserialize)]
        struct Card {
            default_prediction: BTreeMap<String, DefaultValues>,
        }
        toml::from_str::<Card>(text)
            .expect("valid TOML")
            .default_prediction
    }

    const GOOD: &str = r#"
        [default_prediction]
        scores = [0.25, 0.25, 0.5]
        label = ["unknown"]
        flags = [0, -1]
    "#;

    #[test]
    fn a_batched_output_repeats_the_example_per_row() {
        let prediction = DefaultPrediction::from_card(&card(GOOD), &schema())
            .expect("fits")
            .expect("stated");
        let outputs = prediction.outputs(2, &[]);
        let shapes: Vec<(&str, &[i64])> = outputs
            .iter()
            .map(|(t, _)| (t.name.as_str(), t.shape.as_slice()))
            .collect();
        assert_eq!(
            shapes,
            [
                ("scores", &[2, 3][..]),
                ("label", &[2][..]),
                ("flags", &[2][..])
            ]
        );
        assert_eq!(
            outputs[0].1,
            tensor::to_raw(&[0.25f32, 0.25, 0.5, 0.25, 0.25, 0.5])
        );
        assert_eq!(
            outputs[1].1,
            tensor::encode_bytes_elements(["unknown", "unknown"].map(str::as_bytes))
        );
        assert_eq!(outputs[2].1, tensor::to_raw(&[0i64, -1]), "not batched");
        let only = prediction.outputs(1, &["label".to_owned()]);
        assert_eq!(only.len(), 1, "only the outputs the request names");
    }

    #[test]
    fn it_survives_the_trip_through_the_config_parameter() {
        let prediction = DefaultPrediction::from_card(&card(GOOD), &schema())
            .expect("fits")
            .expect("stated");
        assert_eq!(
            DefaultPrediction::from_json(&prediction.to_json()),
            Ok(prediction)
        );
        let tampered =
            r#"{"outputs":[{"name":"y","datatype":"FP32","shape":[-1,2],"values":[1]}]}"#;
        assert!(
            DefaultPrediction::from_json(tampered)
                .expect_err("a count that does not fit is refused")
                .contains("1 values given")
        );
    }

    #[test]
    fn a_card_that_cannot_be_served_is_refused_naming_its_key() {
        let refused =
            |text: &str| DefaultPrediction::from_card(&card(text), &schema()).expect_err("refused");
        let cases = [
            (
                "[default_prediction]\nscores = [1, 2]\nlabel = [\"a\"]\nflags = [0, 0]",
                "default_prediction.scores: 2 values given",
            ),
            (
                "[default_prediction]\nscores = [1, 2, 3]\nlabel = [1]\nflags = [0, 0]",
                "default_prediction.label: the tensor is BYTES",
            ),
            (
                "[default_prediction]\nscores = [1, 2, 3]\nlabel = [\"a\"]\nflags = [0.5, 0]",
                "default_prediction.flags: 0.5 is not a INT64 value",
            ),
            (
                "[default_prediction]\nscores = [1, 2, 3]\nlabel = [\"a\"]",
                "output \"flags\" has no value",
            ),
            (
                "[default_prediction]\nscores = [1, 2, 3]\nlabel = [\"a\"]\nflags = [0, 0]\nextra = [1]",
                "default_prediction.extra: the model has no output",
            ),
        ];
        for (text, expected) in cases {
            let error = refused(text);
            assert!(error.contains(expected), "{text}: {error}");
        }
        assert_eq!(
            DefaultPrediction::from_card(&BTreeMap::new(), &schema()),
            Ok(None)
        );
    }

    #[test]
    fn a_variable_inner_dimension_cannot_take_a_default() {
        let schema = ModelSchema {
            inputs: vec![],
            outputs: vec![TensorSpec {
                name: "y".into(),
                datatype: Datatype::Fp32,
                shape: vec![-1, -1],
            }],
        };
        let error = DefaultPrediction::from_card(&card("[default_prediction]\ny = [1]"), &schema)
            .expect_err("cannot be shaped");
        assert!(error.contains("variable dimension"), "{error}");
    }
}
