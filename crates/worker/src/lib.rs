//! Aviary's worker: serves the ONNX models of one model repository through ONNX
//! Runtime, either in-process (embedded in the gateway) or as its own v2 gRPC server
//! (`aviary worker`).
//!
//! # Layout
//!
//! - [`runtime`]: finds the ONNX Runtime shared library and creates the environment.
//! - [`repository`]: the on-disk layout `<repo>/<model>/<version>/model.onnx` and model cards.
//! - [`schema`]: a model's input/output tensors in protocol terms.
//! - [`validate`]: pure request validation and tensor decoding.
//! - [`model`]: a loaded version, its session pool, and ORT value conversion.
//! - [`stats`]: per-version statistics.
//! - [`lifecycle`]: load, reload, unload, version policies and repository sync.
//! - [`worker`]: the catalog of loaded versions and the v2 operations on it.
//! - [`server`]: the v2 gRPC service over a [`Worker`], and the server runner shared
//!   with the gateway.
//! - [`error`]: [`WorkerError`] and its mapping to gRPC statuses.
#![forbid(unsafe_code)]

pub mod error;
pub mod lifecycle;
pub mod model;
pub mod repository;
pub mod runtime;
pub mod schema;
pub mod server;
pub mod stats;
pub mod validate;
pub mod worker;

pub use error::WorkerError;
pub use lifecycle::{LoadOutcome, SyncReport, VersionPolicy};
pub use model::SessionOptions;
pub use worker::{VersionSlot, Worker, WorkerConfig, infer_on};
