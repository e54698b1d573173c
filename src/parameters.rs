//! The parameters of an inference request, its inputs and its requested outputs: every
//! one the KServe v2 protocol and Triton's extensions define, what Aviary does with
//! each ([`KNOWN`]), and typed reads of the ones it implements.
//!
//! Nothing a client asks for is silently ignored: a parameter Aviary does not know, or
//! knows but does not implement, is refused naming it ([`ParameterError`]). Pure code.

use std::{collections::HashMap, time::Duration};

use crate::pb::inference::{InferParameter, infer_parameter::ParameterChoice};

/// Request: the sequence (Triton's sequence extension) a request belongs to; an
/// integer or a string; 0 or "" means none.
pub const SEQUENCE_ID: &str = "sequence_id";
/// Request: the first request of its sequence.
pub const SEQUENCE_START: &str = "sequence_start";
/// Request: the last request of its sequence.
pub const SEQUENCE_END: &str = "sequence_end";
/// Request: Triton's scheduling priority.
pub const PRIORITY: &str = "priority";
/// Request: Triton's per-request timeout, in microseconds.
pub const TIMEOUT: &str = "timeout";
/// Request: HTTP/REST binary tensor extension, all outputs as binary.
pub const BINARY_DATA_OUTPUT: &str = "binary_data_output";
/// Request: an empty final response on streams of decoupled models.
pub const EMPTY_FINAL_RESPONSE: &str = "triton_enable_empty_final_response";
/// Input (HTTP/REST binary tensor extension): the input's bytes in the body.
pub const BINARY_DATA_SIZE: &str = "binary_data_size";
/// Output (HTTP/REST binary tensor extension): this output as binary.
pub const BINARY_DATA: &str = "binary_data";
/// Output (classification extension): the top-k classes instead of the tensor.
pub const CLASSIFICATION: &str = "classification";
/// Input or output (shared memory extensions): the region holding the tensor.
pub const SHARED_MEMORY_REGION: &str = "shared_memory_region";
/// Input or output: where in the region the tensor starts.
pub const SHARED_MEMORY_OFFSET: &str = "shared_memory_offset";
/// Input or output: how many bytes of the region the tensor takes.
pub const SHARED_MEMORY_BYTE_SIZE: &str = "shared_memory_byte_size";

/// Where a parameter is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// `ModelInferRequest.parameters`.
    Request,
    /// `InferInputTensor.parameters`.
    Input,
    /// `InferRequestedOutputTensor.parameters`.
    Output,
}

/// What Aviary does with a parameter the protocol defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// Honoured as the protocol says.
    Implemented,
    /// Accepted only with the value that asks for nothing (given as text); any other
    /// value is refused for the reason.
    OnlyDefault(&'static str, &'static str),
    /// Refused with INVALID_ARGUMENT for the reason (it does not apply here).
    Refused(&'static str),
    /// Honoured by the server that receives the request before anything else reads
    /// it (and taken off the request): here, it was not, so it is refused.
    ResolvedFirst(&'static str),
}

/// One parameter the protocol defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Known {
    /// Its name.
    pub name: &'static str,
    /// Where it is set.
    pub place: Place,
    /// What Aviary does with it.
    pub support: Support,
}

const GRPC_HAS_NO_JSON: &str = "it belongs to the HTTP/REST binary tensor extension, which \
                                the HTTP endpoint reads; over gRPC tensors are always binary \
                                (raw contents)";
const SHARED_MEMORY: &str = "a shared memory region is read or written by the server that \
                             receives the request (aviary::shared_memory), before this";

/// Every parameter the KServe v2 protocol and Triton's extensions define, and what
/// Aviary does with it. Any other name is refused, except those the caller knows
/// (a gateway's routing keys, its own internal parameters).
pub const KNOWN: &[Known] = &[
    Known {
        name: SEQUENCE_ID,
        place: Place::Request,
        support: Support::Implemented,
    },
    Known {
        name: SEQUENCE_START,
        place: Place::Request,
        support: Support::Implemented,
    },
    Known {
        name: SEQUENCE_END,
        place: Place::Request,
        support: Support::Implemented,
    },
    Known {
        name: TIMEOUT,
        place: Place::Request,
        support: Support::Implemented,
    },
    Known {
        name: PRIORITY,
        place: Place::Request,
        support: Support::OnlyDefault(
            "0",
            "Aviary has no priority levels: every request is served in arrival order",
        ),
    },
    Known {
        name: EMPTY_FINAL_RESPONSE,
        place: Place::Request,
        support: Support::OnlyDefault(
            "false",
            "Aviary's models are not decoupled: every request has exactly one response",
        ),
    },
    Known {
        name: BINARY_DATA_OUTPUT,
        place: Place::Request,
        support: Support::Refused(GRPC_HAS_NO_JSON),
    },
    Known {
        name: BINARY_DATA_SIZE,
        place: Place::Input,
        support: Support::Refused(GRPC_HAS_NO_JSON),
    },
    Known {
        name: BINARY_DATA,
        place: Place::Output,
        support: Support::Refused(GRPC_HAS_NO_JSON),
    },
    Known {
        name: CLASSIFICATION,
        place: Place::Output,
        support: Support::Implemented,
    },
    Known {
        name: SHARED_MEMORY_REGION,
        place: Place::Input,
        support: Support::ResolvedFirst(SHARED_MEMORY),
    },
    Known {
        name: SHARED_MEMORY_OFFSET,
        place: Place::Input,
        support: Support::ResolvedFirst(SHARED_MEMORY),
    },
    Known {
        name: SHARED_MEMORY_BYTE_SIZE,
        place: Place::Input,
        support: Support::ResolvedFirst(SHARED_MEMORY),
    },
    Known {
        name: SHARED_MEMORY_REGION,
        place: Place::Output,
        support: Support::ResolvedFirst(SHARED_MEMORY),
    },
    Known {
        name: SHARED_MEMORY_OFFSET,
        place: Place::Output,
        support: Support::ResolvedFirst(SHARED_MEMORY),
    },
    Known {
        name: SHARED_MEMORY_BYTE_SIZE,
        place: Place::Output,
        support: Support::ResolvedFirst(SHARED_MEMORY),
    },
];

/// A parameter refused: where, which, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("parameter \"{name}\"{where_}: {reason}", where_ = where_(.place, .tensor))]
pub struct ParameterError {
    /// The parameter's name.
    pub name: String,
    /// Where it was set.
    pub place: Place,
    /// The input or output it was set on (empty for the request).
    pub tensor: String,
    /// Why it is refused.
    pub reason: String,
}

fn where_(place: &Place, tensor: &str) -> String {
    match place {
        Place::Request => String::new(),
        Place::Input => format!(" of input \"{tensor}\""),
        Place::Output => format!(" of output \"{tensor}\""),
    }
}

/// The sequence a request belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SequenceId {
    /// An integer id.
    Number(u64),
    /// A string id.
    Text(String),
}

impl std::fmt::Display for SequenceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SequenceId::Number(n) => write!(f, "{n}"),
            SequenceId::Text(t) => write!(f, "{t:?}"),
        }
    }
}

/// A request's place in its sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    /// Which sequence.
    pub id: SequenceId,
    /// Whether this request starts it.
    pub start: bool,
    /// Whether this request ends it.
    pub end: bool,
}

/// What a request's own parameters ask for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestParameters {
    /// The sequence it belongs to, if any.
    pub sequence: Option<Sequence>,
    /// Triton's `timeout`: how long the request may take (0 or absent: no limit).
    pub timeout: Option<Duration>,
}

/// Reads a request's parameters; `also_known` says which other names the caller
/// handles itself (they are skipped). Any other name is refused.
pub fn read_request(
    parameters: &HashMap<String, InferParameter>,
    also_known: impl Fn(&str) -> bool,
) -> Result<RequestParameters, ParameterError> {
    let mut read = RequestParameters::default();
    if parameters.is_empty() {
        return Ok(read);
    }
    let error = |name: &str, reason: String| ParameterError {
        name: name.to_owned(),
        place: Place::Request,
        tensor: String::new(),
        reason,
    };
    for (name, value) in parameters {
        if also_known(name) {
            continue;
        }
        check_support(name, value, Place::Request, "")?;
    }
    let flag = |name: &str| match parameters.get(name).map(choice) {
        None => Ok(false),
        Some(Some(ParameterChoice::BoolParam(flag))) => Ok(*flag),
        Some(other) => Err(error(name, format!("must be a bool, not {}", kind(other)))),
    };
    let (start, end) = (flag(SEQUENCE_START)?, flag(SEQUENCE_END)?);
    read.sequence = match parameters.get(SEQUENCE_ID).map(choice) {
        None => None,
        Some(Some(ParameterChoice::Int64Param(0) | ParameterChoice::Uint64Param(0))) => None,
        Some(Some(ParameterChoice::StringParam(text))) if text.is_empty() => None,
        Some(Some(ParameterChoice::Int64Param(n))) => {
            Some(SequenceId::Number(u64::try_from(*n).map_err(|_| {
                error(SEQUENCE_ID, format!("{n} is negative"))
            })?))
        }
        Some(Some(ParameterChoice::Uint64Param(n))) => Some(SequenceId::Number(*n)),
        Some(Some(ParameterChoice::StringParam(text))) => Some(SequenceId::Text(text.clone())),
        Some(other) => {
            return Err(error(
                SEQUENCE_ID,
                format!("must be an integer or a string, not {}", kind(other)),
            ));
        }
    }
    .map(|id| Sequence { id, start, end });
    if read.sequence.is_none() && (start || end) {
        let name = if start { SEQUENCE_START } else { SEQUENCE_END };
        return Err(error(
            name,
            format!("set without a {SEQUENCE_ID}: a sequence needs an id (not 0 or \"\")"),
        ));
    }
    // As Triton: 0 is no timeout.
    read.timeout = match parameters.get(TIMEOUT).map(choice) {
        None
        | Some(Some(ParameterChoice::Int64Param(0)))
        | Some(Some(ParameterChoice::Uint64Param(0))) => None,
        Some(Some(ParameterChoice::Int64Param(us))) => {
            Some(Duration::from_micros(u64::try_from(*us).map_err(|_| {
                error(TIMEOUT, format!("{us} µs is negative"))
            })?))
        }
        Some(Some(ParameterChoice::Uint64Param(us))) => Some(Duration::from_micros(*us)),
        Some(other) => {
            return Err(error(
                TIMEOUT,
                format!("must be an integer (microseconds), not {}", kind(other)),
            ));
        }
    };
    Ok(read)
}

/// Checks the parameters of input `input`: every one is refused (none of the input
/// parameters the protocol defines is implemented over gRPC).
pub fn check_input(
    input: &str,
    parameters: &HashMap<String, InferParameter>,
) -> Result<(), ParameterError> {
    for (name, value) in parameters {
        check_support(name, value, Place::Input, input)?;
    }
    Ok(())
}

/// Reads the parameters of requested output `output`: the number of classes asked
/// for with `classification`, if any.
pub fn read_output(
    output: &str,
    parameters: &HashMap<String, InferParameter>,
) -> Result<Option<u32>, ParameterError> {
    for (name, value) in parameters {
        check_support(name, value, Place::Output, output)?;
    }
    let error = |reason: String| ParameterError {
        name: CLASSIFICATION.to_owned(),
        place: Place::Output,
        tensor: output.to_owned(),
        reason,
    };
    let count = match parameters.get(CLASSIFICATION).map(choice) {
        None => return Ok(None),
        Some(Some(ParameterChoice::Int64Param(n))) => u64::try_from(*n).ok(),
        Some(Some(ParameterChoice::Uint64Param(n))) => Some(*n),
        Some(other) => {
            return Err(error(format!(
                "must be an integer (how many classes), not {}",
                kind(other)
            )));
        }
    };
    match count.and_then(|n| u32::try_from(n).ok()) {
        Some(n) if n >= 1 => Ok(Some(n)),
        _ => Err(error(
            "must be at least 1 (how many classes to return)".to_owned(),
        )),
    }
}

/// Refuses `name` at `place` unless the protocol defines it there and Aviary
/// implements it, or it is set to the value that asks for nothing.
fn check_support(
    name: &str,
    value: &InferParameter,
    place: Place,
    tensor: &str,
) -> Result<(), ParameterError> {
    let refuse = |reason: String| ParameterError {
        name: name.to_owned(),
        place,
        tensor: tensor.to_owned(),
        reason,
    };
    let Some(known) = KNOWN.iter().find(|k| k.name == name && k.place == place) else {
        let elsewhere = KNOWN.iter().find(|k| k.name == name).map(|k| k.place);
        let reason = match elsewhere {
            Some(Place::Request) => "it is a request parameter, not a tensor's".to_owned(),
            Some(Place::Input) => "it is an input's parameter".to_owned(),
            Some(Place::Output) => "it is a requested output's parameter".to_owned(),
            None => format!(
                "not a parameter Aviary knows ({}); a route's sticky key or match rule \
                 may read other request parameters",
                names_at(place)
            ),
        };
        return Err(refuse(reason));
    };
    match known.support {
        Support::Implemented => Ok(()),
        Support::OnlyDefault(default, reason) => {
            if is_default(value) {
                Ok(())
            } else {
                Err(refuse(format!("{reason} (only {default} is accepted)")))
            }
        }
        Support::Refused(reason) | Support::ResolvedFirst(reason) => Err(refuse(reason.to_owned())),
    }
}

/// Whether `value` asks for nothing: 0, false or an empty string.
fn is_default(value: &InferParameter) -> bool {
    match choice(value) {
        None => true,
        Some(ParameterChoice::BoolParam(b)) => !b,
        Some(ParameterChoice::Int64Param(n)) => *n == 0,
        Some(ParameterChoice::Uint64Param(n)) => *n == 0,
        Some(ParameterChoice::DoubleParam(x)) => *x == 0.0,
        Some(ParameterChoice::StringParam(s)) => s.is_empty(),
    }
}

fn choice(value: &InferParameter) -> Option<&ParameterChoice> {
    value.parameter_choice.as_ref()
}

fn kind(value: Option<&ParameterChoice>) -> &'static str {
    match value {
        None => "unset",
        Some(ParameterChoice::BoolParam(_)) => "a bool",
        Some(ParameterChoice::Int64Param(_)) => "an int64",
        Some(ParameterChoice::Uint64Param(_)) => "a uint64",
        Some(ParameterChoice::DoubleParam(_)) => "a double",
        Some(ParameterChoice::StringParam(_)) => "a string",
    }
}

/// The names the protocol defines at `place`, for messages.
fn names_at(place: Place) -> String {
    let mut names: Vec<&str> = KNOWN
        .iter()
        .filter(|k| k.place == place)
        .map(|k| k.name)
        .collect();
    names.sort_unstable();
    names.dedup();
    names.join(", ")
}

#[cfg(test)]
mod tests;
