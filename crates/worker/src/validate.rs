//! Request validation: checks a `ModelInferRequest` against a model's schema and
//! decodes its tensors, before anything reaches ONNX Runtime.
//!
//! Two steps, so a worker can hold a request to its memory budgets in between:
//! [`check`] looks at everything that needs no decoding and says what decoding will
//! cost, allocating nothing in proportion to the tensors; [`Checked::decode`] then
//! builds the tensors. [`validate`] does both.
//!
//! Pure code: no I/O and no panics on any input. Every error names the input (or
//! field) and the reason, and maps to `INVALID_ARGUMENT`.

use aviary::{
    parameters,
    pb::inference::{
        InferTensorContents, ModelInferRequest, model_infer_request::InferInputTensor,
    },
    tensor::{self, Datatype},
};

use crate::{
    WorkerError, admission,
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
    /// BYTES: any bytes, as ONNX Runtime's string tensors hold them.
    Bytes(Vec<Vec<u8>>),
}

impl TensorData {
    /// The protocol datatype of these elements.
    pub fn datatype(&self) -> Datatype {
        match self {
            TensorData::Bool(_) => Datatype::Bool,
            TensorData::Uint8(_) => Datatype::Uint8,
            TensorData::Uint16(_) => Datatype::Uint16,
            TensorData::Uint32(_) => Datatype::Uint32,
            TensorData::Uint64(_) => Datatype::Uint64,
            TensorData::Int8(_) => Datatype::Int8,
            TensorData::Int16(_) => Datatype::Int16,
            TensorData::Int32(_) => Datatype::Int32,
            TensorData::Int64(_) => Datatype::Int64,
            TensorData::Fp16(_) => Datatype::Fp16,
            TensorData::Bf16(_) => Datatype::Bf16,
            TensorData::Fp32(_) => Datatype::Fp32,
            TensorData::Fp64(_) => Datatype::Fp64,
            TensorData::Bytes(_) => Datatype::Bytes,
        }
    }

    /// How many elements there are.
    pub fn len(&self) -> usize {
        match self {
            TensorData::Bool(v) => v.len(),
            TensorData::Uint8(v) => v.len(),
            TensorData::Uint16(v) => v.len(),
            TensorData::Uint32(v) => v.len(),
            TensorData::Uint64(v) => v.len(),
            TensorData::Int8(v) => v.len(),
            TensorData::Int16(v) => v.len(),
            TensorData::Int32(v) => v.len(),
            TensorData::Int64(v) => v.len(),
            TensorData::Fp16(v) => v.len(),
            TensorData::Bf16(v) => v.len(),
            TensorData::Fp32(v) => v.len(),
            TensorData::Fp64(v) => v.len(),
            TensorData::Bytes(v) => v.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` as a number (BOOL as 0 or 1; 64-bit integers past 2^53 as their
    /// nearest double); `None` for BYTES or past the end.
    pub fn number_at(&self, i: usize) -> Option<f64> {
        fn at<T: Copy>(values: &[T], i: usize, f: impl Fn(T) -> f64) -> Option<f64> {
            values.get(i).map(|v| f(*v))
        }
        match self {
            TensorData::Bool(v) => at(v, i, |b| f64::from(u8::from(b))),
            TensorData::Uint8(v) => at(v, i, f64::from),
            TensorData::Uint16(v) => at(v, i, f64::from),
            TensorData::Uint32(v) => at(v, i, f64::from),
            TensorData::Uint64(v) => at(v, i, |x| x as f64),
            TensorData::Int8(v) => at(v, i, f64::from),
            TensorData::Int16(v) => at(v, i, f64::from),
            TensorData::Int32(v) => at(v, i, f64::from),
            TensorData::Int64(v) => at(v, i, |x| x as f64),
            TensorData::Fp16(v) => at(v, i, |x| f64::from(x.to_f32())),
            TensorData::Bf16(v) => at(v, i, |x| f64::from(x.to_f32())),
            TensorData::Fp32(v) => at(v, i, f64::from),
            TensorData::Fp64(v) => at(v, i, |x| x),
            TensorData::Bytes(_) => None,
        }
    }
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

/// Validates `request` against `schema` and decodes its inputs, whatever they cost
/// (the worker holds them to its budgets between [`check`] and [`Checked::decode`]).
pub fn validate(
    schema: &ModelSchema,
    request: &ModelInferRequest,
) -> Result<ValidatedRequest, WorkerError> {
    check(schema, request)?.decode()
}

/// A request whose structure fits the model, and what decoding it will cost; nothing
/// is decoded yet.
#[derive(Debug)]
pub struct Checked<'a> {
    /// One per model input, in graph order.
    inputs: Vec<Planned<'a>>,
    outputs: Vec<String>,
    classifications: Classifications,
    cost: Option<u64>,
}

/// One input as checked: where its elements are and how many there are.
#[derive(Debug)]
struct Planned<'a> {
    name: &'a str,
    shape: &'a [i64],
    datatype: Datatype,
    count: usize,
    source: Source<'a>,
}

#[derive(Debug)]
enum Source<'a> {
    Raw(&'a [u8]),
    Typed(&'a InferTensorContents),
    /// A zero-element tensor sent with present but empty typed contents.
    Empty,
}

/// Checks everything about `request` that needs no decoding: names, datatypes, shapes,
/// which contents field holds each input and how many elements it has, the BYTES
/// framing, and the outputs. Allocates nothing in proportion to the tensors, so even
/// a request that could never be afforded costs only its walk.
pub fn check<'a>(
    schema: &ModelSchema,
    request: &'a ModelInferRequest,
) -> Result<Checked<'a>, WorkerError> {
    let raw = &request.raw_input_contents;
    if !raw.is_empty() && raw.len() != request.inputs.len() {
        return Err(WorkerError::invalid(format!(
            "raw_input_contents has {} entries for {} inputs; give one entry per input, in the order of inputs",
            raw.len(),
            request.inputs.len()
        )));
    }

    let mut planned: Vec<Option<Planned<'a>>> = (0..schema.inputs.len()).map(|_| None).collect();
    let mut cost = Some(0u64);
    for (index, input) in request.inputs.iter().enumerate() {
        let Some(position) = schema.inputs.iter().position(|s| s.name == input.name) else {
            return Err(WorkerError::invalid(format!(
                "unexpected inference input '{}' for model '{}' (inputs: {})",
                input.name,
                request.model_name,
                names(&schema.inputs)
            )));
        };
        if planned[position].is_some() {
            return Err(WorkerError::invalid(format!(
                "input \"{}\" is given twice",
                input.name
            )));
        }
        parameters::check_input(&input.name, &input.parameters)?;
        let raw_contents = raw.get(index).map(|b| &b[..]);
        let (plan, input_cost) = plan_input(&schema.inputs[position], input, raw_contents)
            .map_err(|reason| {
                WorkerError::invalid(format!("input \"{}\": {reason}", input.name))
            })?;
        cost = cost.zip(input_cost).and_then(|(a, b)| a.checked_add(b));
        planned[position] = Some(plan);
    }
    let missing: Vec<&str> = schema
        .inputs
        .iter()
        .zip(&planned)
        .filter(|(_, p)| p.is_none())
        .map(|(s, _)| s.name.as_str())
        .collect();
    if !missing.is_empty() {
        // Triton's wording first (its clients match on it), then which ones.
        return Err(WorkerError::invalid(format!(
            "expected {} inputs but got {} inputs for model '{}': missing input{} {} (the model needs: {})",
            schema.inputs.len(),
            request.inputs.len(),
            request.model_name,
            if missing.len() > 1 { "s" } else { "" },
            missing
                .iter()
                .map(|m| format!("\"{m}\""))
                .collect::<Vec<_>>()
                .join(", "),
            names(&schema.inputs)
        )));
    }
    let (outputs, classifications) = requested_outputs(schema, request)?;
    Ok(Checked {
        inputs: planned.into_iter().flatten().collect(),
        outputs,
        classifications,
        cost,
    })
}

impl Checked<'_> {
    /// Bytes the decoded inputs will take ([`crate::admission::tensor_cost`] of each);
    /// `None` when that does not fit in a `u64`.
    pub fn cost(&self) -> Option<u64> {
        self.cost
    }

    /// The requested outputs to return as their top classes (Triton's classification
    /// extension), and how many classes each.
    pub fn classifications(&self) -> &[(String, u32)] {
        &self.classifications
    }

    /// Decodes the inputs: converts and range-checks typed values, and copies BYTES
    /// elements out.
    pub fn decode(self) -> Result<ValidatedRequest, WorkerError> {
        let inputs = self
            .inputs
            .into_iter()
            .map(|plan| {
                let data = match plan.source {
                    Source::Raw(raw) => decode_raw(plan.datatype, raw, plan.count),
                    Source::Typed(contents) => decode_typed(plan.datatype, contents, plan.count),
                    Source::Empty => decode_raw(plan.datatype, &[], 0),
                }
                .map_err(|reason| {
                    WorkerError::invalid(format!("input \"{}\": {reason}", plan.name))
                })?;
                Ok(InputTensor {
                    name: plan.name.to_owned(),
                    shape: plan.shape.to_vec(),
                    data,
                })
            })
            .collect::<Result<Vec<_>, WorkerError>>()?;
        Ok(ValidatedRequest {
            inputs,
            outputs: self.outputs,
        })
    }
}

/// Requested outputs asked for as their top classes, and how many classes each.
pub type Classifications = Vec<(String, u32)>;

/// The outputs to compute, in the order to return them, and those of them asked for
/// as classes.
fn requested_outputs(
    schema: &ModelSchema,
    request: &ModelInferRequest,
) -> Result<(Vec<String>, Classifications), WorkerError> {
    if request.outputs.is_empty() {
        let all = schema.outputs.iter().map(|o| o.name.clone()).collect();
        return Ok((all, Vec::new()));
    }
    let mut outputs: Vec<String> = Vec::with_capacity(request.outputs.len());
    let mut classifications = Vec::new();
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
        if let Some(classes) = parameters::read_output(&requested.name, &requested.parameters)? {
            classifications.push((requested.name.clone(), classes));
        }
        outputs.push(requested.name.clone());
    }
    Ok((outputs, classifications))
}

fn names(specs: &[TensorSpec]) -> String {
    specs
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks one input against its spec and says where its elements are and what they
/// will cost decoded.
fn plan_input<'a>(
    spec: &TensorSpec,
    input: &'a InferInputTensor,
    raw: Option<&'a [u8]>,
) -> Result<(Planned<'a>, Option<u64>), String> {
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

    let (source, payload) = match (raw, &input.contents) {
        (Some(_), Some(contents)) if has_any_contents(contents) => {
            return Err("both contents and raw_input_contents are set; send one of them".into());
        }
        (Some(raw), _) => (Source::Raw(raw), check_raw(datatype, raw, count)?),
        (None, Some(contents)) if has_any_contents(contents) => (
            Source::Typed(contents),
            check_typed(datatype, contents, count)?,
        ),
        // A zero-element tensor has nothing to put in a typed field.
        (None, Some(_)) if count == 0 => (Source::Empty, 0),
        (None, _) => return Err("no data: set contents or raw_input_contents".into()),
    };
    let cost = admission::tensor_cost(datatype, count as u64, payload as u64);
    let plan = Planned {
        name: &input.name,
        shape: &input.shape,
        datatype,
        count,
        source,
    };
    Ok((plan, cost))
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

/// Checks that raw contents hold `count` elements of `datatype`; for BYTES, walks the
/// length prefixes (allocating nothing) and returns the bytes the elements hold.
fn check_raw(datatype: Datatype, raw: &[u8], count: usize) -> Result<usize, String> {
    let Some(size) = datatype.element_size() else {
        return tensor::bytes_payload_len(raw, count)
            .map_err(|e| format!("raw BYTES contents: {e}"));
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
    Ok(0)
}

/// Decodes raw contents that [`check_raw`] accepted.
fn decode_raw(datatype: Datatype, raw: &[u8], count: usize) -> Result<TensorData, String> {
    let Some(size) = datatype.element_size() else {
        let elements = tensor::BytesElementsIter::new(raw).map_while(Result::ok);
        return Ok(TensorData::Bytes(byte_strings(elements, count)));
    };
    // `check_raw` made the length count × size, so every chunk is one element wide.
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

/// Turns checked BYTES elements into ONNX string elements: any bytes (binary data,
/// encoded images, text in any encoding), as ONNX Runtime's strings hold them. `count`
/// is how many there are (the check walked them), so the vector is allocated once.
fn byte_strings<'a>(elements: impl Iterator<Item = &'a [u8]>, count: usize) -> Vec<Vec<u8>> {
    let mut strings = Vec::with_capacity(count);
    strings.extend(elements.map(<[u8]>::to_vec));
    strings
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

/// Every typed field with its element count.
fn field_lengths(c: &InferTensorContents) -> [(&'static str, usize); 8] {
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
}

/// Checks that typed contents sit in the field of `datatype` alone and hold `count`
/// elements, from the fields' lengths only: contents of the wrong kind are refused
/// before any of them is converted. Returns the bytes BYTES elements hold.
fn check_typed(datatype: Datatype, c: &InferTensorContents, count: usize) -> Result<usize, String> {
    let Some(field) = contents_field(datatype) else {
        return Err(format!(
            "{datatype} has no typed contents field; send it in raw_input_contents"
        ));
    };
    let lengths = field_lengths(c);
    if let Some((other, _)) = lengths.iter().find(|(f, n)| *n > 0 && *f != field) {
        return Err(format!(
            "contents.{other} is set, but {datatype} data belongs in contents.{field}"
        ));
    }
    let len = lengths
        .iter()
        .find(|(f, _)| *f == field)
        .map_or(0, |(_, n)| *n);
    if len != count {
        return Err(format!(
            "contents.{field} holds {len} elements, shape needs {count}"
        ));
    }
    Ok(c.bytes_contents.payload_len())
}

/// Decodes typed contents that [`check_typed`] accepted: narrows and range-checks
/// INT8/16 and UINT8/16, checks BYTES elements like raw ones.
fn decode_typed(
    datatype: Datatype,
    c: &InferTensorContents,
    count: usize,
) -> Result<TensorData, String> {
    let narrow = |what: &str, field: &str| {
        format!("contents.{field} holds a value outside the range of {what}")
    };
    Ok(match datatype {
        Datatype::Bool => TensorData::Bool(c.bool_contents.clone()),
        Datatype::Int8 => TensorData::Int8(
            convert(&c.int_contents).ok_or_else(|| narrow("INT8", "int_contents"))?,
        ),
        Datatype::Int16 => TensorData::Int16(
            convert(&c.int_contents).ok_or_else(|| narrow("INT16", "int_contents"))?,
        ),
        Datatype::Int32 => TensorData::Int32(c.int_contents.clone()),
        Datatype::Int64 => TensorData::Int64(c.int64_contents.clone()),
        Datatype::Uint8 => TensorData::Uint8(
            convert(&c.uint_contents).ok_or_else(|| narrow("UINT8", "uint_contents"))?,
        ),
        Datatype::Uint16 => TensorData::Uint16(
            convert(&c.uint_contents).ok_or_else(|| narrow("UINT16", "uint_contents"))?,
        ),
        Datatype::Uint32 => TensorData::Uint32(c.uint_contents.clone()),
        Datatype::Uint64 => TensorData::Uint64(c.uint64_contents.clone()),
        Datatype::Fp32 => TensorData::Fp32(c.fp32_contents.clone()),
        Datatype::Fp64 => TensorData::Fp64(c.fp64_contents.clone()),
        Datatype::Bytes => decode_raw(datatype, c.bytes_contents.as_raw(), count)?,
        Datatype::Fp16 | Datatype::Bf16 => return Err(format!("{datatype} must be sent raw")),
    })
}

fn convert<A: Copy, B: TryFrom<A>>(values: &[A]) -> Option<Vec<B>> {
    values.iter().map(|&v| B::try_from(v).ok()).collect()
}

#[cfg(test)]
mod tests;
