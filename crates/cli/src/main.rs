//! The `aviary` binary: parses the command line and runs it (see [`aviary_cli::run`]).

use clap::Parser;

// glibc's malloc took about 13 % of the gateway's CPU at c=32, some of it waiting on
// its arena locks; mimalloc's per-thread heaps do not contend (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    disable_onnx_runtime_telemetry();
    match aviary_cli::run::run(aviary_cli::args::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Microsoft's ONNX Runtime builds start a telemetry client when the first ONNX Runtime
/// environment is made: it writes a device id and an event database under
/// `~/.cache/Microsoft/DeveloperTools/.onnxruntime` and can upload events over HTTPS.
/// The worker's `DisableTelemetryEvents` comes only after that start; the library's
/// `ORT_DISABLE_TELEMETRY` variable stops it before. A gateway must not write to its
/// user's home or call out to the internet, so it is set unless the user set it.
#[allow(unsafe_code)]
fn disable_onnx_runtime_telemetry() {
    const VARIABLE: &str = "ORT_DISABLE_TELEMETRY";
    if std::env::var_os(VARIABLE).is_none() {
        // SAFETY: the first thing `main` does, before any thread exists (the runtime is
        // built later), so no other thread reads or writes the environment meanwhile.
        unsafe { std::env::set_var(VARIABLE, "1") };
    }
}
