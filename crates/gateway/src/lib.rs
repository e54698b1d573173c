//! Aviary's gateway: the front KServe v2 server that picks a version of each model by
//! its route and calls that version's backend (the embedded worker or a remote worker
//! server), plus the `aviary` command line.
//!
//! # Layout
//!
//! - [`config`]: the `aviary.toml` file.
//! - [`routing`]: the route table and backends as one swappable snapshot.
//! - [`shadow`]: mirroring a share of requests to a shadow version and comparing answers.
//! - [`metrics`]: requests, errors and latency per routed version, with rollout step windows.
//! - [`experiment`]: A/B experiment reports: per-variant outcomes and significance tests.
//! - [`rollouts`]: the rollout driver: progressive rollouts on this gateway's traffic.
//! - [`control`]: live changes: routes, version load/reload/unload, repository sync.
//! - [`controller`]: `aviary controller`: one rollout driver for many gateways.
//! - [`watch`]: watching the config file and the model repository.
//! - [`admin`]: the admin API (`aviary.admin.v1.Admin`) over [`control`].
//! - [`backend`]: the [`backend::Backend`] trait, in-process and remote.
//! - [`front`]: the v2 service clients talk to.
//! - [`app`]: assembling a gateway and running it until shutdown.
//! - [`client`]: `aviary infer`, a small v2 client.
//! - [`bench`]: `aviary bench`, a closed-loop load generator.
//! - [`ctl`]: `aviary ctl`, the admin API's command-line client.
//! - [`cli`]: the command line.
//! - [`error`]: [`GatewayError`] and its mapping to gRPC statuses.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod backend;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod control;
pub mod controller;
pub mod ctl;
pub mod error;
pub mod experiment;
pub mod front;
pub mod metrics;
pub mod rollouts;
pub mod routing;
pub mod shadow;
pub mod watch;

pub use app::{Gateway, Listeners, Mode};
pub use config::Config;
pub use error::GatewayError;
