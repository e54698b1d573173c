//! Aviary's gateway: the front KServe v2 server that picks a version of each model by
//! its route and calls that version's backend (the embedded worker or a remote worker
//! server), its admin API, the rollout driver, and `aviary controller`'s library. The
//! `aviary` binary is the `aviary-cli` crate.
//!
//! # Layout
//!
//! - [`config`]: the `aviary.toml` file.
//! - [`check`]: `aviary check-config`: every problem of a config file, nothing started.
//! - [`route`]: a model's route: versions, weights, endpoints, sticky key, rules, shadow.
//! - [`routing`]: the route table and backends as one swappable snapshot.
//! - [`sequences`]: sequence affinity: each open sequence's version.
//! - [`shadow`]: mirroring a share of requests to a shadow version and comparing answers.
//! - [`metrics`]: requests, errors and latency per routed version, with rollout step windows.
//! - [`exposition`]: those metrics and the routes' weights on `/metrics`.
//! - [`bandit`]: routes whose weights a multi-armed bandit learns from feedback.
//! - [`experiment`]: A/B experiment reports: per-variant outcomes and significance tests.
//! - [`rollouts`]: the rollout driver, generic over its target: this gateway, or many
//!   gateways through their admin API.
//! - [`control`]: live changes and who owns a route's weights: the config file, the
//!   admin API, a running rollout; version load/reload/unload, repository sync.
//! - [`controller`]: `aviary controller`: the rollout driver over many gateways.
//! - [`watch`]: watching the config file and the model repository.
//! - [`sources`]: model versions fetched from an MLflow Model Registry or an S3 bucket.
//! - [`dead_letters`]: requests that finally failed, kept on disk to be sent again.
//! - [`defaults`]: the model cards' default predictions, held for calls that failed.
//! - [`cache`]: the prediction cache: answers served again to identical requests, in
//!   this process and in a shared Redis.
//! - [`admin`]: the admin API's services (routes, models, rollouts, experiments,
//!   fleet) over [`control`], [`metrics`] and a rollout driver.
//! - [`backend`]: the [`backend::Backend`] trait, in-process and remote.
//! - [`infer_client`]: the remote backend's `ModelInfer` client, on HTTP/2 directly.
//! - [`replicas`]: a version on several worker replicas: balancing, ejection, DNS,
//!   retries.
//! - [`stack`]: a version's request path as tower layers: deadline, load shedding,
//!   circuit breaker, injected faults.
//! - [`front`]: the v2 service clients talk to.
//! - [`auth`]: API keys, the roles they grant, and the check every call passes.
//! - [`peer_limits`]: rate limits per client address, for gateways without keys.
//! - [`registry`]: the approval workflow: versions' stages, and the canary cap on
//!   versions not approved.
//! - [`audit`]: the audit trail: changes with who made them, and sampled predictions.
//! - [`app`]: assembling a gateway and running it until shutdown.
//! - [`error`]: [`GatewayError`] and its mapping to gRPC statuses.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod audit;
pub mod auth;
pub mod backend;
pub mod bandit;
pub mod cache;
pub mod check;
pub mod config;
pub mod control;
pub mod controller;
pub mod dead_letters;
pub mod defaults;
pub mod error;
pub mod experiment;
pub mod exposition;
pub mod front;
pub mod infer_client;
pub mod metrics;
pub mod peer_limits;
pub mod registry;
pub mod replicas;
pub mod rollouts;
pub mod route;
pub mod routing;
pub mod sequences;
pub mod shadow;
pub mod sources;
pub mod stack;
pub mod watch;

pub use app::{Gateway, Listeners, Mode};
pub use config::Config;
pub use error::GatewayError;
