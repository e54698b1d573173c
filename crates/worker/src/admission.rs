//! Memory admission: what a request's decoded tensors will cost, and the two budgets
//! that cost is held to before anything is decoded — one per request, one for every
//! request being decoded or run at once in the process.
//!
//! Decoding expands a request far beyond its wire size: an empty BYTES element is 4
//! bytes on the wire and over 100 in memory (see [`BYTES_ELEMENT_OVERHEAD`]), so a
//! 40 MB request of 10 M empty strings took a worker from 50 MB to 1.1 GB. The cost is
//! computed from what the request declares (its shapes, and for BYTES the lengths its
//! payload already gives) without allocating per element, and a request over either
//! budget is refused at once with `RESOURCE_EXHAUSTED`: it never waits for room,
//! because a queue of admitted-later requests would hold their wire buffers meanwhile.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use aviary::tensor::Datatype;

use crate::WorkerError;

/// Fixed bytes one BYTES element costs while it is turned into an ONNX string tensor,
/// when the most copies of it are alive at once: the decoded bytes (24, and a heap
/// block of at least 32 when not empty), the empty NUL-terminated string `ort`
/// creates the element with (16, and a heap block), the pointer array ONNX Runtime
/// reads those from (8) and ONNX Runtime's own `std::string` (32). Measured on a
/// worker when `ort` still copied every element's bytes: 114 bytes per empty element,
/// 147 per one-byte element; the bound is kept.
pub const BYTES_ELEMENT_OVERHEAD: u64 = 144;
/// Copies of a BYTES element's own bytes counted as alive at that moment: the decoded
/// bytes and ONNX Runtime's `std::string` (two since the worker writes elements into
/// ONNX Runtime itself, `string_tensors`), and one more kept from when `ort` copied
/// them too, so the budget errs on the safe side.
pub const BYTES_COPIES: u64 = 3;

/// Default [`TensorLimits::max_request_tensor_bytes`]: 256 MiB, also the decode limit
/// of a process that opens no worker (a remote-only gateway).
pub const DEFAULT_MAX_REQUEST_TENSOR_BYTES: u64 = aviary::contents::DEFAULT_DECODE_LIMIT;

/// Default [`TensorLimits::max_inflight_tensor_bytes`]: 1 GiB.
pub const DEFAULT_MAX_INFLIGHT_TENSOR_BYTES: u64 = 1 << 30;

/// What one input tensor costs once decoded, in bytes: `count` elements of `datatype`,
/// BYTES elements at [`BYTES_ELEMENT_OVERHEAD`] each plus [`BYTES_COPIES`] times the
/// `payload` bytes they hold together (ignored for fixed-size types). `None` when the
/// cost does not fit in a `u64`: no budget can hold it.
pub fn tensor_cost(datatype: Datatype, count: u64, payload: u64) -> Option<u64> {
    match datatype.element_size() {
        Some(size) => count.checked_mul(size as u64),
        None => count
            .checked_mul(BYTES_ELEMENT_OVERHEAD)?
            .checked_add(payload.checked_mul(BYTES_COPIES)?),
    }
}

/// The decoded-tensor budgets of a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorLimits {
    /// Largest decoded size of one request's input tensors, in bytes.
    pub max_request_tensor_bytes: u64,
    /// Largest decoded size of the input tensors of every request being decoded or run
    /// at once, in bytes.
    pub max_inflight_tensor_bytes: u64,
}

impl Default for TensorLimits {
    fn default() -> Self {
        TensorLimits {
            max_request_tensor_bytes: DEFAULT_MAX_REQUEST_TENSOR_BYTES,
            max_inflight_tensor_bytes: DEFAULT_MAX_INFLIGHT_TENSOR_BYTES,
        }
    }
}

impl TensorLimits {
    /// Every problem with these limits, each starting with the setting's name.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (name, value) in [
            ("max_request_tensor_bytes", self.max_request_tensor_bytes),
            ("max_inflight_tensor_bytes", self.max_inflight_tensor_bytes),
        ] {
            if value == 0 {
                problems.push(format!("{name}: must be at least 1"));
            }
        }
        if self.max_request_tensor_bytes > self.max_inflight_tensor_bytes {
            problems.push(format!(
                "max_request_tensor_bytes: {} is above max_inflight_tensor_bytes ({}), so a \
                 request that large could never be admitted",
                self.max_request_tensor_bytes, self.max_inflight_tensor_bytes
            ));
        }
        problems
    }
}

/// The budgets and what requests in flight hold of the process budget. Shared by every
/// version of a worker.
#[derive(Debug)]
pub struct Admission {
    limits: TensorLimits,
    held: Arc<AtomicU64>,
}

impl Admission {
    /// Budgets of `limits`, nothing held yet.
    pub fn new(limits: TensorLimits) -> Admission {
        Admission {
            limits,
            held: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The budgets.
    pub fn limits(&self) -> TensorLimits {
        self.limits
    }

    /// Bytes held by admitted requests right now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }

    /// Reserves `cost` bytes (`None`: more than a `u64`) for one request, or refuses
    /// it at once when it is over the per-request budget or would take the process
    /// over its budget. The reservation is returned when the [`Reservation`] drops.
    pub fn admit(&self, cost: Option<u64>) -> Result<Reservation, WorkerError> {
        let over =
            |limit: &'static str, limit_bytes: u64, held: Option<u64>| WorkerError::OverBudget {
                needed: cost,
                held,
                limit,
                limit_bytes,
            };
        let TensorLimits {
            max_request_tensor_bytes,
            max_inflight_tensor_bytes,
        } = self.limits;
        let bytes = cost
            .filter(|&c| c <= max_request_tensor_bytes)
            .ok_or_else(|| over("max_request_tensor_bytes", max_request_tensor_bytes, None))?;
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes)
                    .filter(|&total| total <= max_inflight_tensor_bytes)
            })
            .map_err(|held| {
                over(
                    "max_inflight_tensor_bytes",
                    max_inflight_tensor_bytes,
                    Some(held),
                )
            })?;
        Ok(Reservation {
            held: Arc::clone(&self.held),
            bytes,
        })
    }
}

/// Bytes of the process budget one admitted request holds until it drops.
#[derive(Debug)]
pub struct Reservation {
    held: Arc<AtomicU64>,
    bytes: u64,
}

impl Reservation {
    /// The bytes reserved.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests;
