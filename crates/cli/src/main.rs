//! The `aviary` binary: parses the command line and runs it (see [`aviary_cli::run`]).

use clap::Parser;

// glibc's malloc took about 13 % of the gateway's CPU at c=32, some of it waiting on
// its arena locks; mimalloc's per-thread heaps do not contend (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    match aviary_cli::run::run(aviary_cli::args::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
