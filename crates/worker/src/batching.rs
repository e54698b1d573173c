//! Dynamic batching, the pure part: a version's settings (`[dynamic_batching]` in its
//! model card, Triton's semantics), which requests may share a run, how their inputs
//! are joined along the batch (first) dimension and the outputs split back, and when a
//! batch is ready to go. The task that queues requests and runs batches is
//! [`crate::batcher`].

use std::time::Duration;

use aviary::tensor::{self, Datatype};
use serde::{Deserialize, Serialize};

use crate::{
    model::OutputTensor,
    schema::ModelSchema,
    validate::{InputTensor, TensorData, ValidatedRequest},
};

/// `[dynamic_batching]` as a model card writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingCard {
    /// Most rows one run takes.
    pub max_batch_size: usize,
    /// Longest a request waits for others to join its batch, in microseconds.
    #[serde(default)]
    pub max_queue_delay_us: u64,
    /// Batch sizes that go at once, without waiting out the delay.
    #[serde(default)]
    pub preferred_batch_sizes: Vec<usize>,
}

/// A version's batching settings, checked against its schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchSettings {
    /// Most rows one run takes.
    pub max_batch_size: usize,
    /// Longest the first request of a batch waits for others.
    pub max_queue_delay: Duration,
    /// Sizes that go at once, ascending.
    pub preferred: Vec<usize>,
}

impl BatchSettings {
    /// The card's settings, if the model can be batched: every input and output must
    /// have a variable first (batch) dimension. Errors name the card key.
    pub fn from_card(card: &BatchingCard, schema: &ModelSchema) -> Result<BatchSettings, String> {
        let key = "model.toml dynamic_batching";
        if card.max_batch_size == 0 {
            return Err(format!("{key}.max_batch_size: must be at least 1"));
        }
        if let Some(size) = card
            .preferred_batch_sizes
            .iter()
            .find(|&&s| s == 0 || s > card.max_batch_size)
        {
            return Err(format!(
                "{key}.preferred_batch_sizes: {size} is not between 1 and max_batch_size ({})",
                card.max_batch_size
            ));
        }
        let fixed = schema
            .inputs
            .iter()
            .map(|t| ("input", t))
            .chain(schema.outputs.iter().map(|t| ("output", t)))
            .find(|(_, t)| t.shape.first() != Some(&-1));
        if let Some((kind, tensor)) = fixed {
            return Err(format!(
                "{key}: {kind} \"{}\" has shape {:?}; batching needs a variable first dimension on every input and output",
                tensor.name, tensor.shape
            ));
        }
        let mut preferred = card.preferred_batch_sizes.clone();
        preferred.sort_unstable();
        preferred.dedup();
        Ok(BatchSettings {
            max_batch_size: card.max_batch_size,
            max_queue_delay: Duration::from_micros(card.max_queue_delay_us),
            preferred,
        })
    }

    /// Whether a batch of `rows` goes now rather than waiting for more.
    pub fn full(&self, rows: usize) -> bool {
        rows >= self.max_batch_size || self.preferred.contains(&rows)
    }
}

/// What requests must share to run together: each input's name, type and shape past
/// the batch dimension, and the outputs asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchKey {
    inputs: Vec<(String, Datatype, Vec<i64>)>,
    outputs: Vec<String>,
}

impl BatchKey {
    /// The key of `request`.
    pub fn of(request: &ValidatedRequest) -> BatchKey {
        BatchKey {
            inputs: request
                .inputs
                .iter()
                .map(|i| (i.name.clone(), i.data.datatype(), i.shape[1..].to_vec()))
                .collect(),
            outputs: request.outputs.clone(),
        }
    }
}

/// A request's rows: its inputs' first dimension (validation made them agree for a
/// batchable model).
pub fn rows(request: &ValidatedRequest) -> usize {
    request
        .inputs
        .first()
        .and_then(|i| i.shape.first())
        .map_or(0, |&d| usize::try_from(d).unwrap_or(0))
}

/// The requests (all of one [`BatchKey`]) as one, their inputs joined along the batch
/// dimension in order.
pub fn join(requests: Vec<ValidatedRequest>) -> ValidatedRequest {
    let mut requests = requests.into_iter();
    let Some(mut joined) = requests.next() else {
        return ValidatedRequest {
            inputs: Vec::new(),
            outputs: Vec::new(),
        };
    };
    for request in requests {
        for (into, from) in joined.inputs.iter_mut().zip(request.inputs) {
            append(into, from);
        }
    }
    joined
}

fn append(into: &mut InputTensor, from: InputTensor) {
    into.shape[0] += from.shape[0];
    macro_rules! extend {
        ($($variant:ident),*) => {
            match (&mut into.data, from.data) {
                $((TensorData::$variant(a), TensorData::$variant(b)) => a.extend(b),)*
                // Same key, same datatypes: other pairs do not occur.
                _ => {}
            }
        };
    }
    extend!(
        Bool, Uint8, Uint16, Uint32, Uint64, Int8, Int16, Int32, Int64, Fp16, Bf16, Fp32, Fp64,
        Bytes
    );
}

/// A joined run's outputs cut back into each request's, by its `rows`, in order.
pub fn split(outputs: Vec<OutputTensor>, rows: &[usize]) -> Result<Vec<Vec<OutputTensor>>, String> {
    let total: usize = rows.iter().sum();
    let mut parts: Vec<Vec<OutputTensor>> = rows.iter().map(|_| Vec::new()).collect();
    for output in outputs {
        if output.shape.first().and_then(|&d| usize::try_from(d).ok()) != Some(total) {
            return Err(format!(
                "output \"{}\" has shape {:?}, not {total} rows: the model does not keep rows apart",
                output.name, output.shape
            ));
        }
        let per_row = tensor::element_count(&output.shape[1..]).unwrap_or(0);
        let pieces = cut(&output, per_row, rows)?;
        for ((part, raw), &n) in parts.iter_mut().zip(pieces).zip(rows) {
            let mut shape = output.shape.clone();
            shape[0] = n as i64;
            part.push(OutputTensor {
                name: output.name.clone(),
                datatype: output.datatype,
                shape,
                raw,
            });
        }
    }
    Ok(parts)
}

/// `output`'s raw contents cut into pieces of `rows[i] * per_row` elements.
fn cut(output: &OutputTensor, per_row: usize, rows: &[usize]) -> Result<Vec<Vec<u8>>, String> {
    let Some(size) = output.datatype.element_size() else {
        // BYTES: length-prefixed elements of different sizes, walked one by one.
        let total: usize = rows.iter().sum::<usize>() * per_row;
        let elements = tensor::decode_bytes_elements(&output.raw, total)
            .map_err(|e| format!("output \"{}\": {e}", output.name))?;
        let mut elements = elements.into_iter();
        return Ok(rows
            .iter()
            .map(|&n| tensor::encode_bytes_elements(elements.by_ref().take(n * per_row)))
            .collect());
    };
    let mut at = 0;
    Ok(rows
        .iter()
        .map(|&n| {
            let len = n * per_row * size;
            let piece = output.raw[at..at + len].to_vec();
            at += len;
            piece
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::schema::TensorSpec;

    fn request(rows: usize, first: f32) -> ValidatedRequest {
        ValidatedRequest {
            inputs: vec![
                InputTensor {
                    name: "x".into(),
                    shape: vec![rows as i64, 2],
                    data: TensorData::Fp32((0..rows * 2).map(|i| first + i as f32).collect()),
                },
                InputTensor {
                    name: "s".into(),
                    shape: vec![rows as i64],
                    data: TensorData::Bytes(
                        (0..rows).map(|i| format!("r{i}").into_bytes()).collect(),
                    ),
                },
            ],
            outputs: vec!["y".into()],
        }
    }

    #[test]
    fn requests_join_along_the_batch_dimension_in_order() {
        let joined = join(vec![request(1, 0.0), request(2, 10.0)]);
        assert_eq!(joined.inputs[0].shape, [3, 2]);
        assert_eq!(
            joined.inputs[0].data,
            TensorData::Fp32(vec![0.0, 1.0, 10.0, 11.0, 12.0, 13.0])
        );
        assert_eq!(
            joined.inputs[1].data,
            TensorData::Bytes(vec![b"r0".to_vec(), b"r0".to_vec(), b"r1".to_vec()])
        );
        assert_eq!(
            BatchKey::of(&request(1, 0.0)),
            BatchKey::of(&request(5, 1.0))
        );
    }

    #[test]
    fn a_different_row_shape_or_output_list_is_another_key() {
        let mut wide = request(1, 0.0);
        wide.inputs[0].shape = vec![1, 3];
        assert_ne!(BatchKey::of(&wide), BatchKey::of(&request(1, 0.0)));
        let mut other = request(1, 0.0);
        other.outputs = vec!["z".into()];
        assert_ne!(BatchKey::of(&other), BatchKey::of(&request(1, 0.0)));
    }

    #[test]
    fn bytes_outputs_split_by_element() {
        let output = OutputTensor {
            name: "label".into(),
            datatype: Datatype::Bytes,
            shape: vec![3],
            raw: tensor::encode_bytes_elements(["a", "bb", "ccc"].map(str::as_bytes)),
        };
        let parts = split(vec![output], &[2, 1]).expect("splits");
        assert_eq!(
            parts[0][0].raw,
            tensor::encode_bytes_elements(["a", "bb"].map(str::as_bytes))
        );
        assert_eq!(parts[1][0].shape, [1]);
    }

    #[test]
    fn outputs_without_the_joined_rows_are_refused() {
        let output = OutputTensor {
            name: "y".into(),
            datatype: Datatype::Fp32,
            shape: vec![1, 2],
            raw: tensor::to_raw(&[1f32, 2.0]),
        };
        assert!(split(vec![output], &[1, 1]).is_err());
    }

    #[test]
    fn settings_need_a_batch_dimension_everywhere() {
        let spec = |shape: Vec<i64>| TensorSpec {
            name: "t".into(),
            datatype: Datatype::Fp32,
            shape,
        };
        let card = BatchingCard {
            max_batch_size: 8,
            max_queue_delay_us: 500,
            preferred_batch_sizes: vec![4, 8],
        };
        let batchable = ModelSchema {
            inputs: vec![spec(vec![-1, 4])],
            outputs: vec![spec(vec![-1])],
        };
        let settings = BatchSettings::from_card(&card, &batchable).expect("batchable");
        assert!(settings.full(4) && settings.full(8) && !settings.full(5));
        let fixed = ModelSchema {
            inputs: vec![spec(vec![2, 3])],
            outputs: vec![spec(vec![2, 3])],
        };
        let error = BatchSettings::from_card(&card, &fixed).expect_err("no batch dimension");
        assert!(error.contains("variable first dimension"), "{error}");
        let too_big = BatchingCard {
            preferred_batch_sizes: vec![9],
            ..card
        };
        assert!(BatchSettings::from_card(&too_big, &batchable).is_err());
    }

    proptest! {
        #[test]
        fn split_undoes_join_for_any_rows(rows in prop::collection::vec(1usize..5, 1..6)) {
            // An identity "model": the joined input back as the output.
            let requests: Vec<ValidatedRequest> =
                rows.iter().enumerate().map(|(i, &n)| request(n, i as f32 * 100.0)).collect();
            let expected: Vec<Vec<u8>> = requests
                .iter()
                .map(|r| match &r.inputs[0].data {
                    TensorData::Fp32(v) => tensor::to_raw(v),
                    _ => unreachable!(),
                })
                .collect();
            let joined = join(requests);
            let TensorData::Fp32(values) = &joined.inputs[0].data else { unreachable!() };
            let output = OutputTensor {
                name: "y".into(),
                datatype: Datatype::Fp32,
                shape: joined.inputs[0].shape.clone(),
                raw: tensor::to_raw(values),
            };
            let parts = split(vec![output], &rows).expect("splits");
            for ((part, want), &n) in parts.iter().zip(&expected).zip(&rows) {
                prop_assert_eq!(&part[0].raw, want);
                prop_assert_eq!(part[0].shape.clone(), vec![n as i64, 2]);
            }
        }
    }
}
