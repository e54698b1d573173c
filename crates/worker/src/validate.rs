//! Request validation: checks a `ModelInferRequest` against a model's schema and
//! decodes its tensors, before anything reaches ONNX Runtime.
//!
//! Pure code: no I/O and no panics on any input. Every error names the input (or
//! field) and the reason, and maps to `INVALID_ARGUMENT`.

use aviary::{
    pb::inference::{
        InferTensorContents, ModelInferRequest, model_infer_request::InferInputTensor,
    },
    tensor::{self, Datatype},
};

use crate::{
    WorkerError,
    schema::{ModelSchema, TensorSpec},
};

/// Decoded elements of one tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// BOOL.
    Bool(Vec<bool>),
    /// UINT8.
    Uint8(Vec<u8>),
    /// UINT16.
    Uint16(Vec<u16>),
    /// UINT32.
    Uint32(Vec<u32>),
    /// UINT64.
    Uint64(Vec<u64>),
    /// INT8.
    Int8(Vec<i8>),
    /// INT16.
    Int16(Vec<i16>),
    /// INT32.
    Int32(Vec<i32>),
    /// INT64.
    Int64(Vec<i64>),
    /// FP16.
    Fp16(Vec<half::f16>),
    /// BF16.
    Bf16(Vec<half::bf16>),
    /// FP32.
    Fp32(Vec<f32>),
    /// FP64.
    Fp64(Vec<f64>),
    /// BYTES, as ONNX strings.
    Bytes(Vec<String>),
}

/// One validated input tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct InputTensor {
    /// Input name.
    pub name: String,
    /// Concrete shape (no negative dimensions).
    pub shape: Vec<i64>,
    /// Elements, row-major.
    pub data: TensorData,
}

/// A request that fits the model: decoded inputs in the model's input order, and the
/// outputs to return.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedRequest {
    /// One entry per model input, in graph order.
    pub inputs: Vec<InputTensor>,
    /// Names of the outputs to compute and return, in the order to return them.
    pub outputs: Vec<String>,
}

/// Validates `request` against `schema` and decodes its inputs.
pub fn validate(
    schema: &ModelSchema,
    request: &ModelInferRequest,
) -> Result<ValidatedRequest, WorkerError> {
    let raw = &request.raw_input_contents;
    if !raw.is_empty() && raw.len() != request.inputs.len() {
        return Err(WorkerError::invalid(format!(
            "raw_input_contents has {} entries for {} inputs; give one entry per input, in the order of inputs",
            raw.len(),
            request.inputs.len()
        )));
    }

    let mut decoded: Vec<Option<InputTensor>> = vec![None; schema.inputs.len()];
    for (index, input) in request.inputs.iter().enumerate() {
        let Some(position) = schema.inputs.iter().position(|s| s.name == input.name) else {
            return Err(WorkerError::invalid(format!(
                "input \"{}\" is not an input of this model (inputs: {})",
                input.name,
                names(&schema.inputs)
            )));
        };
        if decoded[position].is_some() {
            return Err(WorkerError::invalid(format!(
                "input \"{}\" is given twice",
                input.name
            )));
        }
        let spec = &schema.inputs[position];
        let raw_contents = raw.get(index).map(|b| &b[..]);
        let tensor = decode_input(spec, input, raw_contents).map_err(|reason| {
            WorkerError::invalid(format!("input \"{}\": {reason}", input.name))
        })?;
        decoded[position] = Some(tensor);
    }
    let missing: Vec<&str> = schema
        .inputs
        .iter()
        .zip(&decoded)
        .filter(|(_, d)| d.is_none())
        .map(|(s, _)| s.name.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(WorkerError::invalid(format!(
            "missing input{} {} (the model needs: {})",
            if missing.len() > 1 { "s" } else { "" },
            missing
                .iter()
                .map(|m| format!("\"{m}\""))
                .collect::<Vec<_>>()
                .join(", "),
            names(&schema.inputs)
        )));
    }
    Ok(ValidatedRequest {
        inputs: decoded.into_iter().flatten().collect(),
        outputs: requested_outputs(schema, request)?,
    })
}

fn requested_outputs(
    schema: &ModelSchema,
    request: &ModelInferRequest,
) -> Result<Vec<String>, WorkerError> {
    if request.outputs.is_empty() {
        return Ok(schema.outputs.iter().map(|o| o.name.clone()).collect());
    }
    let mut outputs: Vec<String> = Vec::with_capacity(request.outputs.len());
    for requested in &request.outputs {
        if schema.output(&requested.name).is_none() {
            return Err(WorkerError::invalid(format!(
                "output \"{}\" is not an output of this model (outputs: {})",
                requested.name,
                names(&schema.outputs)
            )));
        }
        if outputs.contains(&requested.name) {
            return Err(WorkerError::invalid(format!(
                "output \"{}\" is requested twice",
                requested.name
            )));
        }
        outputs.push(requested.name.clone());
    }
    Ok(outputs)
}

fn names(specs: &[TensorSpec]) -> String {
    specs
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn decode_input(
    spec: &TensorSpec,
    input: &InferInputTensor,
    raw: Option<&[u8]>,
) -> Result<InputTensor, String> {
    let datatype = Datatype::parse(&input.datatype).ok_or_else(|| {
        format!(
            "unknown datatype \"{}\" (expected {})",
            input.datatype, spec.datatype
        )
    })?;
    if datatype != spec.datatype {
        return Err(format!(
            "expected datatype {}, got {}",
            spec.datatype, datatype
        ));
    }
    check_shape(&spec.shape, &input.shape)?;
    let count = tensor::element_count(&input.shape).ok_or_else(|| {
        format!(
            "shape {:?} has more elements than this machine can address",
            input.shape
        )
    })?;

    let data = match (raw, &input.contents) {
        (Some(_), Some(contents)) if has_any_contents(contents) => {
            return Err("both contents and raw_input_contents are set; send one of them".into());
        }
        (Some(raw), _) => decode_raw(datatype, raw, count)?,
        // A zero-element tensor has nothing to put in a typed field.
        (None, Some(_)) if count == 0 => decode_raw(datatype, &[], 0)?,
        (None, Some(contents)) if has_any_contents(contents) => {
            decode_typed(datatype, contents, count)?
        }
        (None, _) => return Err("no data: set contents or raw_input_contents".into()),
    };
    Ok(InputTensor {
        name: input.name.clone(),
        shape: input.shape.clone(),
        data,
    })
}

fn check_shape(expected: &[i64], got: &[i64]) -> Result<(), String> {
    if let Some(dim) = got.iter().find(|&&d| d < 0) {
        return Err(format!("shape {got:?} has negative dimension {dim}"));
    }
    let fits =
        expected.len() == got.len() && expected.iter().zip(got).all(|(&e, &g)| e < 0 || e == g);
    if fits {
        Ok(())
    } else {
        Err(format!(
            "expected shape {expected:?} (rank {}), got {got:?} (rank {})",
            expected.len(),
            got.len()
        ))
    }
}

fn has_any_contents(c: &InferTensorContents) -> bool {
    !(c.bool_contents.is_empty()
        && c.int_contents.is_empty()
        && c.int64_contents.is_empty()
        && c.uint_contents.is_empty()
        && c.uint64_contents.is_empty()
        && c.fp32_contents.is_empty()
        && c.fp64_contents.is_empty()
        && c.bytes_contents.is_empty())
}

fn decode_raw(datatype: Datatype, raw: &[u8], count: usize) -> Result<TensorData, String> {
    let Some(size) = datatype.element_size() else {
        let elements = tensor::decode_bytes_elements(raw, count)
            .map_err(|e| format!("raw BYTES contents: {e}"))?;
        return utf8_strings(elements.into_iter()).map(TensorData::Bytes);
    };
    let expected = count
        .checked_mul(size)
        .ok_or_else(|| format!("{count} elements of {datatype} overflow the byte size"))?;
    if raw.len() != expected {
        return Err(format!(
            "raw contents hold {} bytes, shape × {datatype} size needs {expected} ({count} elements × {size} bytes)",
            raw.len()
        ));
    }
    // The length check above makes every chunk exactly one element wide.
    let chunks = raw.chunks_exact(size);
    Ok(match datatype {
        Datatype::Bool => TensorData::Bool(chunks.map(|c| c[0] != 0).collect()),
        Datatype::Uint8 => TensorData::Uint8(raw.to_vec()),
        Datatype::Int8 => TensorData::Int8(raw.iter().map(|&b| b as i8).collect()),
        Datatype::Uint16 => TensorData::Uint16(chunks.map(u16_le).collect()),
        Datatype::Int16 => TensorData::Int16(chunks.map(|c| u16_le(c) as i16).collect()),
        Datatype::Fp16 => {
            TensorData::Fp16(chunks.map(|c| half::f16::from_bits(u16_le(c))).collect())
        }
        Datatype::Bf16 => {
            TensorData::Bf16(chunks.map(|c| half::bf16::from_bits(u16_le(c))).collect())
        }
        Datatype::Uint32 => TensorData::Uint32(chunks.map(u32_le).collect()),
        Datatype::Int32 => TensorData::Int32(chunks.map(|c| u32_le(c) as i32).collect()),
        Datatype::Fp32 => TensorData::Fp32(chunks.map(|c| f32::from_bits(u32_le(c))).collect()),
        Datatype::Uint64 => TensorData::Uint64(chunks.map(u64_le).collect()),
        Datatype::Int64 => TensorData::Int64(chunks.map(|c| u64_le(c) as i64).collect()),
        Datatype::Fp64 => TensorData::Fp64(chunks.map(|c| f64::from_bits(u64_le(c))).collect()),
        Datatype::Bytes => unreachable_bytes(),
    })
}

// BYTES has no element size and is handled before the fixed-size match.
fn unreachable_bytes() -> TensorData {
    TensorData::Bytes(Vec::new())
}

fn u16_le(c: &[u8]) -> u16 {
    u16::from_le_bytes([c[0], c[1]])
}

fn u32_le(c: &[u8]) -> u32 {
    u32::from_le_bytes([c[0], c[1], c[2], c[3]])
}

fn u64_le(c: &[u8]) -> u64 {
    u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
}

fn utf8_strings<'a>(elements: impl Iterator<Item = &'a [u8]>) -> Result<Vec<String>, String> {
    elements
        .enumerate()
        .map(|(i, e)| {
            if e.contains(&0) {
                return Err(format!(
                    "BYTES element {i} contains a NUL byte, which ONNX Runtime string tensors cannot hold"
                ));
            }
            String::from_utf8(e.to_vec())
                .map_err(|_| format!("BYTES element {i} is not valid UTF-8 (ONNX string tensors hold UTF-8 text)"))
        })
        .collect()
}

/// Which typed `contents` field carries a datatype.
fn contents_field(datatype: Datatype) -> Option<&'static str> {
    Some(match datatype {
        Datatype::Bool => "bool_contents",
        Datatype::Int8 | Datatype::Int16 | Datatype::Int32 => "int_contents",
        Datatype::Int64 => "int64_contents",
        Datatype::Uint8 | Datatype::Uint16 | Datatype::Uint32 => "uint_contents",
        Datatype::Uint64 => "uint64_contents",
        Datatype::Fp32 => "fp32_contents",
        Datatype::Fp64 => "fp64_contents",
        Datatype::Bytes => "bytes_contents",
        Datatype::Fp16 | Datatype::Bf16 => return None,
    })
}

fn populated_fields(c: &InferTensorContents) -> Vec<&'static str> {
    [
        ("bool_contents", c.bool_contents.len()),
        ("int_contents", c.int_contents.len()),
        ("int64_contents", c.int64_contents.len()),
        ("uint_contents", c.uint_contents.len()),
        ("uint64_contents", c.uint64_contents.len()),
        ("fp32_contents", c.fp32_contents.len()),
        ("fp64_contents", c.fp64_contents.len()),
        ("bytes_contents", c.bytes_contents.len()),
    ]
    .into_iter()
    .filter(|(_, n)| *n > 0)
    .map(|(f, _)| f)
    .collect()
}

fn decode_typed(
    datatype: Datatype,
    c: &InferTensorContents,
    count: usize,
) -> Result<TensorData, String> {
    let Some(field) = contents_field(datatype) else {
        return Err(format!(
            "{datatype} has no typed contents field; send it in raw_input_contents"
        ));
    };
    if let Some(other) = populated_fields(c).into_iter().find(|f| *f != field) {
        return Err(format!(
            "contents.{other} is set, but {datatype} data belongs in contents.{field}"
        ));
    }
    let check_len = |len: usize| {
        if len == count {
            Ok(())
        } else {
            Err(format!(
                "contents.{field} holds {len} elements, shape needs {count}"
            ))
        }
    };
    let narrow = |what: &str| format!("contents.{field} holds a value outside the range of {what}");
    Ok(match datatype {
        Datatype::Bool => {
            check_len(c.bool_contents.len())?;
            TensorData::Bool(c.bool_contents.clone())
        }
        Datatype::Int8 => {
            check_len(c.int_contents.len())?;
            TensorData::Int8(convert(&c.int_contents).ok_or_else(|| narrow("INT8"))?)
        }
        Datatype::Int16 => {
            check_len(c.int_contents.len())?;
            TensorData::Int16(convert(&c.int_contents).ok_or_else(|| narrow("INT16"))?)
        }
        Datatype::Int32 => {
            check_len(c.int_contents.len())?;
            TensorData::Int32(c.int_contents.clone())
        }
        Datatype::Int64 => {
            check_len(c.int64_contents.len())?;
            TensorData::Int64(c.int64_contents.clone())
        }
        Datatype::Uint8 => {
            check_len(c.uint_contents.len())?;
            TensorData::Uint8(convert(&c.uint_contents).ok_or_else(|| narrow("UINT8"))?)
        }
        Datatype::Uint16 => {
            check_len(c.uint_contents.len())?;
            TensorData::Uint16(convert(&c.uint_contents).ok_or_else(|| narrow("UINT16"))?)
        }
        Datatype::Uint32 => {
            check_len(c.uint_contents.len())?;
            TensorData::Uint32(c.uint_contents.clone())
        }
        Datatype::Uint64 => {
            check_len(c.uint64_contents.len())?;
            TensorData::Uint64(c.uint64_contents.clone())
        }
        Datatype::Fp32 => {
            check_len(c.fp32_contents.len())?;
            TensorData::Fp32(c.fp32_contents.clone())
        }
        Datatype::Fp64 => {
            check_len(c.fp64_contents.len())?;
            TensorData::Fp64(c.fp64_contents.clone())
        }
        Datatype::Bytes => {
            check_len(c.bytes_contents.len())?;
            TensorData::Bytes(utf8_strings(c.bytes_contents.iter().map(|b| &b[..]))?)
        }
        Datatype::Fp16 | Datatype::Bf16 => return Err(format!("{datatype} must be sent raw")),
    })
}

fn convert<A: Copy, B: TryFrom<A>>(values: &[A]) -> Option<Vec<B>> {
    values.iter().map(|&v| B::try_from(v).ok()).collect()
}

#[cfg(test)]
mod tests;
