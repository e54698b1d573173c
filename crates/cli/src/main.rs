//! The `aviary` binary: parses the command line and runs it (see [`aviary_cli::run`]).

use clap::Parser;

fn main() -> std::process::ExitCode {
    match aviary_cli::run::run(aviary_cli::args::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
