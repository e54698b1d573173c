//! Routing decisions for Aviary: which version of a model answers a request.
//!
//! This crate is pure decision logic with no I/O. The gateway parses route specs (from
//! its config file or the admin API), compiles them here into an immutable
//! [`RouteTable`] and publishes that snapshot behind one `ArcSwap`. Per request it
//! calls [`RouteTable::resolve`], which honours an explicit version pin or draws a
//! version from the weighted split. [`RouteTable::compile`] checks every spec against
//! an [`Inventory`] of loaded versions and reports every problem with its path, so an
//! invalid config never replaces a good table.
//!
//! # Layout
//!
//! - `spec`: [`RouteSpec`] and [`VersionWeight`], what config and admin API ask for,
//!   and the [`Inventory`] they are checked against.
//! - `validate`: the validation rules, run while one model's route is compiled.
//! - `route`: [`Route`], one model's compiled weighted split and its pick functions.
//! - `table`: [`RouteTable`], the snapshot the gateway reads, and [`Decision`].
//! - `error`: [`RouteError`] for request-time failures, [`ValidationErrors`] for
//!   rejected specs.
#![forbid(unsafe_code)]

mod error;
mod route;
mod spec;
mod table;
mod validate;

pub use error::{RouteError, ValidationError, ValidationErrors};
pub use route::Route;
pub use spec::{Inventory, RouteSpec, VersionWeight};
pub use table::{Decision, DecisionReason, RouteTable};
