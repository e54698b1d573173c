//! Routing decisions for Aviary: which version of a model answers a request.
//!
//! This crate is pure decision logic with no I/O. The gateway parses route specs (from
//! its config file or the admin API), compiles them here into an immutable
//! [`RouteTable`] and publishes that snapshot behind one `ArcSwap`. Per request it
//! calls [`RouteTable::resolve_with`], which honours, in order, an explicit version
//! pin, the first matching header/parameter rule, the request's sticky routing key,
//! and otherwise draws a version from the weighted split. [`RouteTable::compile`]
//! checks every spec against an [`Inventory`] of loaded versions and reports every
//! problem with its path, so an invalid config never replaces a good table.
//!
//! Sticky keys are placed on the split by [`sticky_hash`], which is part of the wire
//! contract: changing it reshuffles every user. Segments are laid out in config order
//! from 0, so list the canary first: raising its weight then only moves keys into it.
//!
//! # Layout
//!
//! - `spec`: [`RouteSpec`], [`VersionWeight`], [`StickySpec`] and [`RuleSpec`], what
//!   config and admin API ask for, and the [`Inventory`] they are checked against.
//! - `validate`: the validation rules, run while one model's route is compiled.
//! - `route`: [`Route`], one model's compiled route and its pick functions.
//! - `rules`: compiled match rules (regexes are compiled once, here).
//! - `sticky`: [`sticky_hash`] and the compiled sticky key.
//! - `attributes`: [`RequestAttributes`], the headers and parameters a request
//!   offers, and [`Attributes`], a map-backed implementation.
//! - `table`: [`RouteTable`], the snapshot the gateway reads, and [`Decision`].
//! - `error`: [`RouteError`] for request-time failures, [`ValidationErrors`] for
//!   rejected specs.
//! - `rollout`: [`rollout::Rollout`], the pure state machine behind progressive rollouts.
//! - `bandit`: traffic shares learnt from feedback (Thompson sampling, ε-greedy) within
//!   guardrails; not a route policy yet.
//! - `stats`: significance tests, confidence intervals and the KS drift test for
//!   experiment and canary reports.
#![forbid(unsafe_code)]

mod attributes;
pub mod bandit;
mod error;
pub mod rollout;
mod route;
mod rules;
mod spec;
pub mod stats;
mod sticky;
mod table;
mod validate;

pub use attributes::{Attributes, RequestAttributes};
pub use error::{RouteError, ValidationError, ValidationErrors};
pub use route::Route;
pub use spec::{Inventory, RouteSpec, RuleSpec, StickySpec, VersionWeight};
pub use sticky::sticky_hash;
pub use table::{Decision, DecisionReason, RouteTable};
