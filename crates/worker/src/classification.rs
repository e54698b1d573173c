//! Triton's classification extension: a requested output with the `classification`
//! parameter comes back as its top k classes, each a BYTES element
//! `"score:index[:label]"`, with labels from the model card's `[labels]`.
//!
//! An output whose first dimension is the batch (dynamic in the model) is classified
//! row by row (shape `[rows, k]`); any other output as a whole (shape `[k]`). `k`
//! larger than the classes gives every class. Scores are written as Triton writes
//! them (`%f`: six decimals) for floating-point outputs, as integers otherwise; ties
//! go to the lower index. Pure code, apart from reading a labels file at load.

use std::{collections::BTreeMap, path::Path};

use aviary::tensor::{self, Datatype};
use serde::{Deserialize, Serialize};

use crate::{model::OutputTensor, schema::ModelSchema};

/// A card's labels of one output: the list, or a file beside the model with one label
/// per line (Triton's `label_filename`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LabelsCard {
    /// The labels, class 0 first.
    List(Vec<String>),
    /// A file in the version's folder, one label per line.
    File(String),
}

/// The labels of a version's outputs, checked against its schema.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Labels(BTreeMap<String, Vec<String>>);

impl Labels {
    /// The card's `[labels]`, files read from `folder`; every key must name an output
    /// and every list be non-empty.
    pub fn from_card(
        card: &BTreeMap<String, LabelsCard>,
        schema: &ModelSchema,
        folder: &Path,
    ) -> Result<Labels, String> {
        let mut labels = BTreeMap::new();
        for (output, given) in card {
            if schema.output(output).is_none() {
                return Err(format!(
                    "model card: labels.{output}: the model has no output \"{output}\""
                ));
            }
            let list = match given {
                LabelsCard::List(list) => list.clone(),
                LabelsCard::File(file) => {
                    let path =
                        crate::repository::file_beside(folder, file, &format!("labels.{output}"))?;
                    std::fs::read_to_string(&path)
                        .map_err(|e| {
                            format!("model card: labels.{output}: {}: {e}", path.display())
                        })?
                        .lines()
                        .map(str::to_owned)
                        .collect()
                }
            };
            if list.is_empty() {
                return Err(format!("model card: labels.{output}: no labels"));
            }
            labels.insert(output.clone(), list);
        }
        Ok(Labels(labels))
    }

    /// The labels of `output`, if the card gives them.
    pub fn of(&self, output: &str) -> Option<&[String]> {
        self.0.get(output).map(Vec::as_slice)
    }
}

/// `output` as its top `k` classes. `per_row`: the first dimension is the batch.
pub fn classify(
    output: &OutputTensor,
    k: u32,
    per_row: bool,
    labels: Option<&[String]>,
) -> Result<OutputTensor, String> {
    classifiable(&output.name, output.datatype)?;
    let integer = !matches!(
        output.datatype,
        Datatype::Fp16 | Datatype::Bf16 | Datatype::Fp32 | Datatype::Fp64
    );
    let values = numbers(output)?;
    let rows = match (per_row, output.shape.first()) {
        (true, Some(&rows)) if output.shape.len() >= 2 => usize::try_from(rows).unwrap_or(0),
        _ => 1,
    };
    let width = values.len().checked_div(rows).unwrap_or(0);
    let k = width.min(usize::try_from(k).unwrap_or(usize::MAX));
    let mut classes = Vec::with_capacity(rows * k);
    for row in values.chunks(width.max(1)).take(rows) {
        let mut order: Vec<usize> = (0..row.len()).collect();
        // Highest first; equal scores in index order (the sort is stable).
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        for &index in order.iter().take(k) {
            let score = if integer {
                format!("{}", row[index])
            } else {
                format!("{:.6}", row[index])
            };
            classes.push(match labels.and_then(|l| l.get(index)) {
                Some(label) => format!("{score}:{index}:{label}"),
                None => format!("{score}:{index}"),
            });
        }
    }
    let shape = if rows > 1 || (per_row && output.shape.len() >= 2) {
        vec![rows as i64, k as i64]
    } else {
        vec![k as i64]
    };
    Ok(OutputTensor {
        name: output.name.clone(),
        datatype: Datatype::Bytes,
        shape,
        raw: tensor::encode_bytes_elements(&classes),
    })
}

/// Whether output `name` of `datatype` can be classified: numbers only.
pub fn classifiable(name: &str, datatype: Datatype) -> Result<(), String> {
    match datatype {
        Datatype::Bytes | Datatype::Bool => Err(format!(
            "output \"{name}\" is {}: classification needs a numeric output",
            datatype.as_str()
        )),
        _ => Ok(()),
    }
}

/// The elements of a numeric output, as doubles (64-bit integers past 2^53 rounded,
/// which only reorders scores that close).
fn numbers(output: &OutputTensor) -> Result<Vec<f64>, String> {
    fn all<T: tensor::Element>(raw: &[u8], f: impl Fn(T) -> f64) -> Option<Vec<f64>> {
        tensor::from_raw::<T>(raw).map(|values| values.into_iter().map(f).collect())
    }
    let raw = &output.raw;
    let halves = |to_f32: fn([u8; 2]) -> f32| {
        raw.len().is_multiple_of(2).then(|| {
            raw.chunks_exact(2)
                .map(|c| f64::from(to_f32([c[0], c[1]])))
                .collect()
        })
    };
    match output.datatype {
        Datatype::Uint8 => all(raw, |v: u8| f64::from(v)),
        Datatype::Int8 => all(raw, |v: i8| f64::from(v)),
        Datatype::Uint16 => all(raw, |v: u16| f64::from(v)),
        Datatype::Int16 => all(raw, |v: i16| f64::from(v)),
        Datatype::Uint32 => all(raw, |v: u32| f64::from(v)),
        Datatype::Int32 => all(raw, |v: i32| f64::from(v)),
        Datatype::Uint64 => all(raw, |v: u64| v as f64),
        Datatype::Int64 => all(raw, |v: i64| v as f64),
        Datatype::Fp32 => all(raw, |v: f32| f64::from(v)),
        Datatype::Fp64 => all(raw, |v: f64| v),
        Datatype::Fp16 => halves(|b| half::f16::from_le_bytes(b).to_f32()),
        Datatype::Bf16 => halves(|b| half::bf16::from_le_bytes(b).to_f32()),
        Datatype::Bool | Datatype::Bytes => None,
    }
    .ok_or_else(|| {
        format!(
            "output \"{}\": {} bytes are not whole {} elements",
            output.name,
            raw.len(),
            output.datatype.as_str()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp32(shape: &[i64], values: &[f32]) -> OutputTensor {
        OutputTensor {
            name: "probabilities".into(),
            datatype: Datatype::Fp32,
            shape: shape.to_vec(),
            raw: tensor::to_raw(values),
        }
    }

    fn elements(output: &OutputTensor) -> Vec<String> {
        let count = tensor::element_count(&output.shape).expect("a shape");
        tensor::decode_bytes_elements(&output.raw, count)
            .expect("length-prefixed")
            .into_iter()
            .map(|b| String::from_utf8(b.to_vec()).expect("utf-8"))
            .collect()
    }

    #[test]
    fn each_row_gives_its_top_classes_with_labels() {
        let labels = ["setosa".to_owned(), "versicolor".into(), "virginica".into()];
        let output = fp32(&[2, 3], &[0.1, 0.7, 0.2, 0.5, 0.25, 0.25]);
        let classified = classify(&output, 2, true, Some(&labels)).expect("numeric");
        assert_eq!(classified.datatype, Datatype::Bytes);
        assert_eq!(classified.shape, vec![2, 2]);
        assert_eq!(
            elements(&classified),
            [
                "0.700000:1:versicolor",
                "0.200000:2:virginica",
                "0.500000:0:setosa",
                "0.250000:1:versicolor"
            ]
        );
    }

    #[test]
    fn without_labels_or_rows_and_with_k_past_the_classes() {
        let output = fp32(&[3], &[0.2, 0.5, 0.3]);
        let classified = classify(&output, 10, false, None).expect("numeric");
        assert_eq!(classified.shape, vec![3]);
        assert_eq!(
            elements(&classified),
            ["0.500000:1", "0.300000:2", "0.200000:0"]
        );
        let labels = OutputTensor {
            name: "label".into(),
            datatype: Datatype::Int64,
            shape: vec![1, 2],
            raw: tensor::to_raw(&[4i64, 9]),
        };
        assert_eq!(
            elements(&classify(&labels, 1, true, None).expect("numeric")),
            ["9:1"]
        );
    }

    #[test]
    fn non_numeric_outputs_are_refused() {
        let output = OutputTensor {
            name: "text".into(),
            datatype: Datatype::Bytes,
            shape: vec![1],
            raw: tensor::encode_bytes_elements([b"a"]),
        };
        let refused = classify(&output, 1, false, None).expect_err("bytes");
        assert!(refused.contains("needs a numeric output"), "{refused}");
    }
}
