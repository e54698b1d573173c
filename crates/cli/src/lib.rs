//! The `aviary` command line: one binary that runs every server (`serve`, `gateway`,
//! `worker`, `controller`) and the clients people use against them (`infer`, `bench`,
//! `ctl`). The servers themselves live in the library crates; this crate parses
//! arguments, binds listeners, prints, and exits with a status.
//!
//! # Layout
//!
//! - [`args`]: the command line (clap derive) and its `AVIARY_*` variables.
//! - [`run`]: what each subcommand does.
//! - [`logs`]: the log lines and, when configured, the trace export.
//! - [`ctl`]: `aviary ctl`, the admin API's command-line client.
//! - [`bench`]: `aviary bench`, a closed-loop load generator.
#![forbid(unsafe_code)]

pub mod args;
pub mod bench;
pub mod ctl;
pub mod logs;
pub mod run;
