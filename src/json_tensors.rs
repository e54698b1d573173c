//! Tensors as JSON values: nested arrays to raw little-endian contents and back, typed
//! by a v2 datatype. What `aviary infer` sends and prints, and what the HTTP/REST
//! endpoint reads and writes as JSON tensor data.

use serde_json::Value;

use crate::tensor::{self, Datatype};

/// What to do with a value JSON cannot carry as it is: a BYTES element that is not
/// UTF-8, a NaN or an infinity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fidelity {
    /// Write what comes closest (text for people to read): invalid UTF-8 replaced,
    /// NaN and the infinities as `null`.
    Lossy,
    /// Refuse it: the value would not arrive as it is.
    Exact,
}

/// Raw contents that cannot be written as JSON values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A value JSON cannot carry as it is, with [`Fidelity::Exact`].
    #[error("{0}")]
    NotJson(String),
    /// Contents that are not a tensor of their datatype and shape.
    #[error("{0}")]
    Malformed(String),
}

/// Shape and row-major leaves of a nested JSON array; ragged arrays are an error.
pub fn flatten(value: &Value) -> Result<(Vec<i64>, Vec<&Value>), String> {
    fn walk<'v>(
        value: &'v Value,
        depth: usize,
        shape: &mut Vec<i64>,
        leaves: &mut Vec<&'v Value>,
    ) -> Result<(), String> {
        match value {
            Value::Array(items) => {
                let len = i64::try_from(items.len()).map_err(|_| "array too long".to_owned())?;
                match shape.get(depth) {
                    Some(&expected) if expected != len => {
                        return Err(format!(
                            "ragged array: dimension {depth} has lengths {expected} and {len}"
                        ));
                    }
                    Some(_) => {}
                    None if leaves.is_empty() => shape.push(len),
                    None => {
                        return Err(format!(
                            "ragged array: nesting depth differs at dimension {depth}"
                        ));
                    }
                }
                items
                    .iter()
                    .try_for_each(|item| walk(item, depth + 1, shape, leaves))
            }
            leaf => {
                if depth != shape.len() {
                    return Err(format!(
                        "ragged array: a value sits at depth {depth} of {}",
                        shape.len()
                    ));
                }
                leaves.push(leaf);
                Ok(())
            }
        }
    }
    let mut shape = Vec::new();
    let mut leaves = Vec::new();
    walk(value, 0, &mut shape, &mut leaves)?;
    Ok((shape, leaves))
}

/// The raw little-endian contents of `leaves` as a `datatype` tensor: each leaf must
/// be a JSON value of that type (a number in range, a boolean, a string for BYTES).
pub fn encode(datatype: Datatype, leaves: &[&Value]) -> Result<Vec<u8>, String> {
    let number = |v: &Value| {
        v.as_f64()
            .ok_or_else(|| format!("{v} is not a number ({datatype} input)"))
    };
    let int = |v: &Value| {
        v.as_i64()
            .ok_or_else(|| format!("{v} is not an integer ({datatype} input)"))
    };
    let uint = |v: &Value| {
        v.as_u64()
            .ok_or_else(|| format!("{v} is not a non-negative integer ({datatype} input)"))
    };
    let narrow = |v: &Value| format!("{v} is out of range for {datatype}");
    // JSON numbers are finite; one past the datatype's largest would become an
    // infinity, another value: refused like an integer out of range.
    let finite = |v: &Value, is_finite: bool| match is_finite {
        true => Ok(()),
        false => Err(narrow(v)),
    };
    macro_rules! ints {
        ($ty:ty, $get:expr) => {{
            let values = leaves
                .iter()
                .map(|v| $get(v).and_then(|n| <$ty>::try_from(n).map_err(|_| narrow(v))))
                .collect::<Result<Vec<$ty>, String>>()?;
            tensor::to_raw(&values)
        }};
    }
    Ok(match datatype {
        Datatype::Bool => {
            let values = leaves
                .iter()
                .map(|v| {
                    v.as_bool()
                        .ok_or_else(|| format!("{v} is not true/false (BOOL input)"))
                })
                .collect::<Result<Vec<bool>, String>>()?;
            tensor::to_raw(&values)
        }
        Datatype::Uint8 => ints!(u8, uint),
        Datatype::Uint16 => ints!(u16, uint),
        Datatype::Uint32 => ints!(u32, uint),
        Datatype::Uint64 => ints!(u64, uint),
        Datatype::Int8 => ints!(i8, int),
        Datatype::Int16 => ints!(i16, int),
        Datatype::Int32 => ints!(i32, int),
        Datatype::Int64 => ints!(i64, int),
        Datatype::Fp16 => {
            let bits = leaves.iter().map(|v| {
                let x = half::f16::from_f64(number(v)?);
                finite(v, x.is_finite()).map(|()| x.to_bits())
            });
            tensor::to_raw(&bits.collect::<Result<Vec<u16>, String>>()?)
        }
        Datatype::Bf16 => {
            let bits = leaves.iter().map(|v| {
                let x = half::bf16::from_f64(number(v)?);
                finite(v, x.is_finite()).map(|()| x.to_bits())
            });
            tensor::to_raw(&bits.collect::<Result<Vec<u16>, String>>()?)
        }
        // Narrowing to f32 is what sending an FP32 tensor means.
        Datatype::Fp32 => tensor::to_raw(
            &leaves
                .iter()
                .map(|v| {
                    let x = number(v)? as f32;
                    finite(v, x.is_finite()).map(|()| x)
                })
                .collect::<Result<Vec<f32>, String>>()?,
        ),
        Datatype::Fp64 => tensor::to_raw(
            &leaves
                .iter()
                .map(|v| number(v))
                .collect::<Result<Vec<f64>, String>>()?,
        ),
        Datatype::Bytes => {
            let strings = leaves
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| format!("{v} is not a string (BYTES input)"))
                })
                .collect::<Result<Vec<String>, String>>()?;
            tensor::encode_bytes_elements(&strings)
        }
    })
}

/// The values of the typed contents field that carries `datatype`.
pub fn typed_values(
    datatype: Datatype,
    typed: &crate::contents::InferTensorContents,
) -> Vec<Value> {
    fn all<T: Clone + Into<Value>>(values: &[T]) -> Vec<Value> {
        values.iter().cloned().map(Into::into).collect()
    }
    match datatype {
        Datatype::Bool => all(&typed.bool_contents),
        Datatype::Int8 | Datatype::Int16 | Datatype::Int32 => all(&typed.int_contents),
        Datatype::Int64 => all(&typed.int64_contents),
        Datatype::Uint8 | Datatype::Uint16 | Datatype::Uint32 => all(&typed.uint_contents),
        Datatype::Uint64 => all(&typed.uint64_contents),
        Datatype::Fp32 => all(&typed.fp32_contents),
        Datatype::Fp64 => all(&typed.fp64_contents),
        Datatype::Fp16 | Datatype::Bf16 => Vec::new(),
        Datatype::Bytes => typed
            .bytes_contents
            .iter()
            .map(|e| Value::from(String::from_utf8_lossy(e).into_owned()))
            .collect(),
    }
}

/// The values of raw `datatype` contents of `shape`, as JSON values; what JSON cannot
/// carry as it is is handled as `fidelity` says.
pub fn decode_raw(
    datatype: Datatype,
    raw: &[u8],
    shape: &[i64],
    fidelity: Fidelity,
) -> Result<Vec<Value>, DecodeError> {
    let values = decode_values(datatype, raw, shape, fidelity)?;
    let float = matches!(
        datatype,
        Datatype::Fp16 | Datatype::Bf16 | Datatype::Fp32 | Datatype::Fp64
    );
    // A float that is not finite became null: JSON has no NaN or infinity.
    if float
        && fidelity == Fidelity::Exact
        && let Some(i) = values.iter().position(Value::is_null)
    {
        return Err(DecodeError::NotJson(format!(
            "element {i} is not a finite number (NaN or an infinity), which JSON cannot carry"
        )));
    }
    Ok(values)
}

fn decode_values(
    datatype: Datatype,
    raw: &[u8],
    shape: &[i64],
    fidelity: Fidelity,
) -> Result<Vec<Value>, DecodeError> {
    const NOT_WHOLE: &str = "raw contents are not a whole number of elements";
    let malformed = |reason: &str| DecodeError::Malformed(reason.to_owned());
    fn numbers<T: tensor::Element + Into<Value>>(raw: &[u8]) -> Result<Vec<Value>, DecodeError> {
        tensor::from_raw::<T>(raw)
            .map(|v| v.into_iter().map(Into::into).collect())
            .ok_or_else(|| DecodeError::Malformed(NOT_WHOLE.to_owned()))
    }
    let halves = |to_f64: fn(u16) -> f64| -> Result<Vec<Value>, DecodeError> {
        tensor::from_raw::<u16>(raw)
            .map(|v| v.into_iter().map(|b| Value::from(to_f64(b))).collect())
            .ok_or_else(|| DecodeError::Malformed(NOT_WHOLE.to_owned()))
    };
    match datatype {
        Datatype::Bool => numbers::<bool>(raw),
        Datatype::Uint8 => numbers::<u8>(raw),
        Datatype::Uint16 => numbers::<u16>(raw),
        Datatype::Uint32 => numbers::<u32>(raw),
        Datatype::Uint64 => numbers::<u64>(raw),
        Datatype::Int8 => numbers::<i8>(raw),
        Datatype::Int16 => numbers::<i16>(raw),
        Datatype::Int32 => numbers::<i32>(raw),
        Datatype::Int64 => numbers::<i64>(raw),
        Datatype::Fp16 => halves(|b| half::f16::from_bits(b).to_f64()),
        Datatype::Bf16 => halves(|b| half::bf16::from_bits(b).to_f64()),
        Datatype::Fp32 => tensor::from_raw::<f32>(raw)
            .map(|v| v.into_iter().map(shortest_f32).collect())
            .ok_or_else(|| DecodeError::Malformed(NOT_WHOLE.to_owned())),
        Datatype::Fp64 => numbers::<f64>(raw),
        Datatype::Bytes => {
            let count = tensor::element_count(shape).ok_or_else(|| malformed("invalid shape"))?;
            let elements =
                tensor::decode_bytes_elements(raw, count).map_err(|e| malformed(&e.to_string()))?;
            elements
                .into_iter()
                .enumerate()
                .map(|(i, e)| match (std::str::from_utf8(e), fidelity) {
                    (Ok(text), _) => Ok(Value::from(text)),
                    (Err(_), Fidelity::Lossy) => {
                        Ok(Value::from(String::from_utf8_lossy(e).into_owned()))
                    }
                    (Err(error), Fidelity::Exact) => Err(DecodeError::NotJson(format!(
                        "BYTES element {i} is not UTF-8 text ({error}), which JSON cannot carry"
                    ))),
                })
                .collect()
        }
    }
}

/// An FP32 value as the JSON number that reads back as it, written as briefly as f32
/// allows (0.1, not 0.10000000149011612); NaN and the infinities, which JSON cannot
/// hold, are null.
fn shortest_f32(value: f32) -> Value {
    // Rust prints an f32 in the fewest digits that read back as the same f32.
    value
        .to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flatten_gives_shape_and_rejects_ragged() {
        let value: Value = serde_json::json!([[1, 2, 3], [4, 5, 6]]);
        let (shape, leaves) = flatten(&value).expect("rectangular");
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(leaves.len(), 6);
        assert!(flatten(&serde_json::json!([[1, 2], [3]])).is_err());
        assert!(flatten(&serde_json::json!([[1, 2], 3])).is_err());
        assert_eq!(
            flatten(&serde_json::json!(7)).expect("scalar").0,
            Vec::<i64>::new()
        );
    }

    #[test]
    fn encode_checks_types_and_ranges() {
        let leaves = [&Value::from(300)];
        assert!(encode(Datatype::Uint8, &leaves).is_err());
        assert!(encode(Datatype::Fp32, &[&Value::from("x")]).is_err());
        assert_eq!(
            encode(Datatype::Int16, &[&Value::from(-2)]).expect("fits"),
            vec![0xfe, 0xff]
        );
    }

    #[test]
    fn bytes_that_are_not_utf8_are_refused_when_strict() {
        let raw = tensor::encode_bytes_elements([b"ok".as_slice(), &[0xff, 0xfe]]);
        let lossy = decode_raw(Datatype::Bytes, &raw, &[2], Fidelity::Lossy).expect("lossy");
        assert_eq!(lossy[0], Value::from("ok"));
        let error = decode_raw(Datatype::Bytes, &raw, &[2], Fidelity::Exact).expect_err("strict");
        assert!(
            matches!(&error, DecodeError::NotJson(e) if e.contains("element 1")),
            "{error}"
        );
    }

    #[test]
    fn fp32_values_are_written_as_briefly_as_they_read_back() {
        let raw = tensor::to_raw(&[0.1f32, 1.0e-7, f32::NAN]);
        let values = decode_raw(Datatype::Fp32, &raw, &[3], Fidelity::Lossy).expect("fp32");
        assert_eq!(
            serde_json::to_string(&values).expect("json"),
            "[0.1,1e-7,null]"
        );
        assert_eq!(values[0].as_f64().map(|f| f as f32), Some(0.1f32));
    }

    #[test]
    fn floats_json_cannot_carry_are_refused_when_exact() {
        let raw = tensor::to_raw(&[1.0f64, f64::INFINITY]);
        let error = decode_raw(Datatype::Fp64, &raw, &[2], Fidelity::Exact).expect_err("inf");
        assert!(
            matches!(&error, DecodeError::NotJson(e) if e.contains("element 1")),
            "{error}"
        );
        let lossy = decode_raw(Datatype::Fp64, &raw, &[2], Fidelity::Lossy).expect("lossy");
        assert_eq!(lossy[1], Value::Null);
        // A JSON number past FP32's (or FP16's) largest is out of range, not infinity.
        for datatype in [Datatype::Fp32, Datatype::Fp16, Datatype::Bf16] {
            let error = encode(datatype, &[&Value::from(1.0e300)]).expect_err("overflow");
            assert!(error.contains("out of range"), "{datatype}: {error}");
        }
        assert!(encode(Datatype::Fp16, &[&Value::from(65504.0)]).is_ok());
    }
}
