//! Aviary's protocol crate: the KServe v2 / Open Inference Protocol types (with the
//! Triton extensions Aviary implements), tensor encoding helpers shared by the gateway,
//! the worker and clients, the descriptor set that server reflection serves, and (by
//! feature) the shared server runner and a typed client.
//!
//! # Layout
//!
//! - [`pb`]: generated protobuf messages, the `GRPCInferenceService` and the admin
//!   API's clients and servers.
//! - [`codec`]: the codec of the generated services and clients: prost's, with each
//!   message's tensor contents decoded within a limit.
//! - [`contents`]: `InferTensorContents`, written by hand so BYTES contents decode
//!   into one buffer; re-exported in [`pb::inference`] with the generated messages.
//! - [`names`]: what a model or version name may be, for every path that takes one.
//! - [`parameters`]: every request, input and output parameter the protocol defines,
//!   what Aviary does with each, and typed reads of the ones it implements.
//! - [`json_tensors`] (features `client`, `server`): tensors as JSON values, nested
//!   arrays to raw contents and back.
//! - [`tensor`]: datatypes, element sizes, raw little-endian encoding and the BYTES
//!   length-prefix format.
//! - [`rest`] (feature `server`): the KServe v2 HTTP/REST endpoint, each request the
//!   equivalent gRPC call made in process.
//! - [`server`] (feature `server`): the server runner every Aviary server shares.
//! - [`shared_memory`] (feature `server`): Triton's system shared memory regions, and
//!   requests' inputs and outputs read from and written to them.
//! - [`calls`] (feature `server`): who is calling, and the guard and audit every
//!   call passes through.
//! - [`tls`] (feature `server`): TLS for listeners (certificates reloaded when their
//!   files change, optional client certificates) and clients.
//! - [`metrics`] (feature `server`): the `/metrics` endpoint and the process metrics.
//! - [`telemetry`] (feature `server`): trace export, W3C trace context in and out,
//!   and the spans of a request's stages.
//! - [`client`] (feature `client`): connecting, requests built from JSON values, and
//!   decoded responses (what `aviary infer` uses).
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors of every proto file.
#![forbid(unsafe_code)]

#[cfg(feature = "server")]
pub mod calls;
#[cfg(feature = "client")]
pub mod client;
pub mod codec;
pub mod contents;
#[cfg(any(feature = "client", feature = "server"))]
pub mod json_tensors;
#[cfg(feature = "server")]
pub mod metrics;
pub mod names;
pub mod parameters;
#[cfg(feature = "server")]
pub mod rest;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod shared_memory;
#[cfg(feature = "server")]
pub mod telemetry;
pub mod tensor;
#[cfg(feature = "server")]
pub mod tls;

/// Generated protocol code.
pub mod pb {
    /// `inference.*`: the KServe v2 gRPC service and Triton's model configuration.
    #[allow(clippy::all, unreachable_pub, rust_2018_idioms, missing_docs)]
    pub mod inference {
        tonic::include_proto!("inference");
        pub use crate::contents::InferTensorContents;
    }

    /// `aviary.admin.v1.*`: the gateway's control plane.
    #[allow(clippy::all, unreachable_pub, rust_2018_idioms, missing_docs)]
    pub mod admin {
        tonic::include_proto!("aviary.admin.v1");
    }
}

/// Encoded `FileDescriptorSet` of every proto file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/aviary_descriptor.bin"));

/// Server name reported by `ServerMetadata`.
pub const SERVER_NAME: &str = "aviary";

/// Aviary's version, reported by `ServerMetadata`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `at` in milliseconds since the Unix epoch, the unit every time in the protocol and
/// the admin API is in (0 before the epoch, saturating far after it).
pub fn unix_ms(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
