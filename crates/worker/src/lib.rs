//! Aviary's worker: serves the ONNX models of one model repository through ONNX
//! Runtime, either in-process (embedded in the gateway) or as its own v2 gRPC server
//! (`aviary worker`).
//!
//! # Layout
//!
//! - [`runtime`]: finds the ONNX Runtime shared library and creates the environment.
//! - [`repository`]: the on-disk layout `<repo>/<model>/<version>/model.onnx` and model cards.
//! - [`schema`]: a model's input/output tensors in protocol terms.
//! - [`validate`]: pure request validation and tensor decoding, in two steps: a check
//!   that decodes nothing and says what decoding will cost, then the decoding.
//! - [`admission`]: that cost, and the per-request and per-process budgets a request
//!   is held to before it is decoded.
//! - [`default_prediction`]: the fixed outputs a model card states for when a call
//!   fails, checked against the schema.
//! - [`input_rules`]: the value rules a model card declares for the inputs (ranges,
//!   allowed values, NaN and infinities, per feature), checked on decoded requests.
//! - [`drift`]: per-feature drift of inputs and outputs from a reference, when a model
//!   card asks for it, and between two versions' outputs for a rollout.
//! - [`data_watch`]: the task that logs (and reports) features crossing into drift and
//!   values flag-mode input rules let through.
//! - [`batching`] and [`batcher`]: dynamic batching, its pure rules (settings from the
//!   model card, which requests share a run, joining inputs and splitting outputs) and
//!   the task that forms and runs batches.
//! - [`classification`]: Triton's classification extension: an output's top classes
//!   as `score:index[:label]` BYTES, labels from the model card.
//! - [`warmup`]: the warm-up a model card declares (off, zeros or sample inputs).
//! - [`string_tensors`]: ONNX string tensors written from and read as bytes (the
//!   worker's only `unsafe` code: ONNX Runtime's C API).
//! - [`registry`]: a version's registry record in its card: semantic version, lineage,
//!   the SHA-256 its model file must have.
//! - [`model`]: a loaded version, its session pool, and ORT value conversion.
//! - [`stats`]: per-version statistics.
//! - [`exposition`]: those statistics and the versions' states on `/metrics`.
//! - [`catalog`]: the loaded and failed versions as pure data, and the look-ups on them.
//! - [`lifecycle`]: load, reload, unload, version policies and repository sync, applied
//!   to a catalog it is given.
//! - [`load_request`]: what a RepositoryModelLoad asks beyond the load: a `config`
//!   override of the settings Aviary has, and model files supplied by the client.
//! - [`loader`]: the low-priority threads that load model files and free old ones.
//! - [`worker`]: a catalog and its lifecycle composed into a [`Worker`], and the v2
//!   operations on it.
//! - [`model_control`]: whether Triton's load and unload RPCs are served on the
//!   inference port.
//! - [`server`]: the v2 gRPC service over a [`Worker`] and the standalone worker
//!   server (the runner itself is `aviary::server`, shared with the gateway).
//! - [`error`]: [`WorkerError`] and its mapping to gRPC statuses.
// One module reads ONNX Runtime string tensors through its C API (`string_tensors`,
// each `unsafe` block with its reasons); nothing else may use `unsafe`.
#![deny(unsafe_code)]

pub mod admission;
pub mod batcher;
pub mod batching;
pub mod catalog;
pub mod classification;
pub mod data_watch;
pub mod default_prediction;
pub mod drift;
pub mod error;
pub mod exposition;
pub mod input_rules;
pub mod lifecycle;
pub mod load_request;
pub mod loader;
pub mod model;
pub mod model_control;
pub mod registry;
pub mod repository;
pub mod runtime;
pub mod schema;
pub mod server;
pub mod stats;
pub mod string_tensors;
pub mod validate;
pub mod warmup;
pub mod worker;

pub use admission::TensorLimits;
pub use default_prediction::DefaultPrediction;
pub use error::WorkerError;
pub use lifecycle::{LoadOutcome, SyncReport, VersionPolicy};
pub use model::SessionOptions;
pub use model_control::ModelControl;
pub use worker::{VersionSlot, Worker, WorkerConfig, infer_on};
