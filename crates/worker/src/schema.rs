//! A model version's input and output tensors, as the v2 protocol describes them.

use aviary::tensor::Datatype;
use ort::{
    session::Session,
    value::{TensorElementType, ValueType},
};

/// One input or output tensor of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Tensor name in the ONNX graph.
    pub name: String,
    /// Element type.
    pub datatype: Datatype,
    /// Dimensions; `-1` marks a dimension the request chooses.
    pub shape: Vec<i64>,
}

/// All inputs and outputs of a model version, in graph order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelSchema {
    /// Graph inputs.
    pub inputs: Vec<TensorSpec>,
    /// Graph outputs.
    pub outputs: Vec<TensorSpec>,
}

impl ModelSchema {
    /// Reads the schema of a loaded session; fails on tensors the protocol cannot carry
    /// (sequences, maps, complex numbers, 4- and 8-bit floats).
    pub fn from_session(session: &Session) -> Result<ModelSchema, String> {
        let convert = |kind: &str, outlets: &[ort::value::Outlet]| {
            outlets
                .iter()
                .map(|outlet| tensor_spec(kind, outlet.name(), outlet.dtype()))
                .collect::<Result<Vec<_>, String>>()
        };
        Ok(ModelSchema {
            inputs: convert("input", session.inputs())?,
            outputs: convert("output", session.outputs())?,
        })
    }

    /// The input with this name.
    pub fn input(&self, name: &str) -> Option<&TensorSpec> {
        self.inputs.iter().find(|t| t.name == name)
    }

    /// The output with this name.
    pub fn output(&self, name: &str) -> Option<&TensorSpec> {
        self.outputs.iter().find(|t| t.name == name)
    }
}

fn tensor_spec(kind: &str, name: &str, dtype: &ValueType) -> Result<TensorSpec, String> {
    let ValueType::Tensor { ty, shape, .. } = dtype else {
        return Err(format!(
            "{kind} \"{name}\" is a {dtype:?}, not a tensor; only tensors can be served"
        ));
    };
    let datatype = datatype_of(*ty).ok_or_else(|| {
        format!("{kind} \"{name}\" has element type {ty:?}, which the v2 protocol cannot carry")
    })?;
    Ok(TensorSpec {
        name: name.to_owned(),
        datatype,
        shape: shape.iter().map(|&d| if d < 0 { -1 } else { d }).collect(),
    })
}

/// The protocol datatype of an ONNX tensor element type, if it has one.
pub fn datatype_of(ty: TensorElementType) -> Option<Datatype> {
    Some(match ty {
        TensorElementType::Bool => Datatype::Bool,
        TensorElementType::Uint8 => Datatype::Uint8,
        TensorElementType::Uint16 => Datatype::Uint16,
        TensorElementType::Uint32 => Datatype::Uint32,
        TensorElementType::Uint64 => Datatype::Uint64,
        TensorElementType::Int8 => Datatype::Int8,
        TensorElementType::Int16 => Datatype::Int16,
        TensorElementType::Int32 => Datatype::Int32,
        TensorElementType::Int64 => Datatype::Int64,
        TensorElementType::Float16 => Datatype::Fp16,
        TensorElementType::Bfloat16 => Datatype::Bf16,
        TensorElementType::Float32 => Datatype::Fp32,
        TensorElementType::Float64 => Datatype::Fp64,
        TensorElementType::String => Datatype::Bytes,
        _ => return None,
    })
}
