//! Finding the ONNX Runtime shared library and creating the process-wide environment.
//!
//! `ort` is built with `load-dynamic`, so nothing is linked or downloaded at build
//! time. The library comes from the official `onnxruntime` wheel, which `make setup`
//! unpacks into `.aviary/onnxruntime/` at the repository root. Search order:
//! `ORT_DYLIB_PATH` when set, then beside the executable, `../lib` of the executable,
//! and `.aviary/onnxruntime/` in any ancestor of the executable or of the current
//! directory (which covers `target/debug/aviary` and test binaries in a checkout).

use std::{
    env,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use ort::environment::Environment;

use crate::WorkerError;

/// File name of the shared library the project installs (ONNX Runtime 1.31.1).
pub const LIBRARY_FILE: &str = "libonnxruntime.so.1.31.1";

/// Folder, relative to the repository root, where `make setup` unpacks the library.
pub const LOCAL_DIR: &str = ".aviary/onnxruntime";

static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

/// The process-wide ONNX Runtime environment, created on first use.
pub fn environment() -> Result<&'static Environment, WorkerError> {
    ENVIRONMENT
        .get_or_init(init)
        .as_ref()
        .map_err(|reason| WorkerError::Runtime(reason.clone()))
}

fn init() -> Result<Environment, String> {
    let path = locate_library()?;
    tracing::debug!(path = %path.display(), "loading ONNX Runtime");
    ort::init_from(&path)
        .map_err(|e| format!("loading ONNX Runtime from {}: {e}", path.display()))?
        .with_name("aviary")
        .with_telemetry(false)
        .build()
        .map_err(|e| format!("initialising ONNX Runtime from {}: {e}", path.display()))
}

/// Where the library is, or a message that says exactly what to do.
pub fn locate_library() -> Result<PathBuf, String> {
    if let Some(path) = env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "ORT_DYLIB_PATH points at {}, which does not exist; unset it to use the \
                 library `make setup` installs, or point it at {LIBRARY_FILE}",
                path.display()
            ))
        };
    }
    let candidates = candidate_paths(
        env::current_exe().ok().as_deref(),
        env::current_dir().ok().as_deref(),
    );
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
            format!(
                "ONNX Runtime library {LIBRARY_FILE} not found. Run `make setup` in the Aviary \
             checkout (it downloads the onnxruntime==1.31.1 wheel from PyPI with pip and \
             unpacks the library into {LOCAL_DIR}/), or set ORT_DYLIB_PATH to the library's \
             path. Looked in: {}",
                looked.join(", ")
            )
        })
}

fn candidate_paths(exe: Option<&Path>, cwd: Option<&Path>) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Some(exe_dir) = exe.and_then(Path::parent) {
        paths.push(exe_dir.join(LIBRARY_FILE));
        paths.push(exe_dir.join("../lib").join(LIBRARY_FILE));
        paths.extend(
            exe_dir
                .ancestors()
                .map(|d| d.join(LOCAL_DIR).join(LIBRARY_FILE)),
        );
    }
    if let Some(cwd) = cwd {
        paths.extend(
            cwd.ancestors()
                .map(|d| d.join(LOCAL_DIR).join(LIBRARY_FILE)),
        );
    }
    let mut seen = std::collections::HashSet::new();
    paths.retain(|p| seen.insert(p.clone()));
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_cover_checkout_layout() {
        let paths = candidate_paths(
            Some(Path::new("/src/aviary/target/debug/deps/e2e-123")),
            Some(Path::new("/elsewhere")),
        );
        assert!(paths.contains(&PathBuf::from(
            "/src/aviary/.aviary/onnxruntime/libonnxruntime.so.1.31.1"
        )));
        assert!(paths.contains(&PathBuf::from(
            "/src/aviary/target/debug/deps/libonnxruntime.so.1.31.1"
        )));
        assert!(paths.contains(&PathBuf::from(
            "/elsewhere/.aviary/onnxruntime/libonnxruntime.so.1.31.1"
        )));
    }
}
