//! Where model files are loaded and old copies freed: off the serving threads, on a
//! thread of its own at a lower CPU priority.
//!
//! Why: building ONNX Runtime sessions and warming them up takes milliseconds of CPU
//! (about 10 ms for `mlp`). On the blocking pool at normal priority that time is taken
//! from the requests being served, and during a reload every 200 ms the p99 latency
//! tripled. At niceness [`LOAD_NICENESS`] the scheduler gives serving threads about
//! nine tenths of a contended core, so a reload takes longer but serving does not
//! wait for it; on an idle core a load runs at full speed.

use crate::WorkerError;

/// The niceness of loading threads: the scheduler's weight of nice 10 is about a
/// tenth of nice 0's (Linux's CFS weights 110 against 1024).
pub const LOAD_NICENESS: i32 = 10;

/// Runs `job` on a new low-priority thread and waits for its result without holding
/// an async thread.
pub async fn off_the_serving_path<T, F>(what: &str, job: F) -> Result<T, WorkerError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (sender, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("aviary-{what}"))
        .spawn(move || {
            lower_priority();
            let _ = sender.send(job());
        })
        .map_err(|e| WorkerError::Unavailable(format!("starting a {what} thread: {e}")))?;
    result
        .await
        .map_err(|_| WorkerError::Unavailable(format!("the {what} thread failed")))
}

/// Frees `value` on a low-priority thread: an ONNX Runtime session's teardown is not
/// for a serving thread either. Nothing waits for it.
pub fn drop_off_the_serving_path<T: Send + 'static>(what: &str, value: T) {
    let spawned = std::thread::Builder::new()
        .name(format!("aviary-{what}"))
        .spawn(move || {
            lower_priority();
            drop(value);
        });
    // Without a thread (the process is out of them) the value was dropped here.
    if let Err(error) = spawned {
        tracing::warn!(%error, what, "no thread to free an old model on; freed in place");
    }
}

/// Lowers the calling thread's priority. On Linux, niceness belongs to a thread, so
/// this leaves the serving threads alone. Where it fails (a container that forbids
/// it), loading still works at normal priority.
fn lower_priority() {
    if let Err(error) = rustix::process::setpriority_process(None, LOAD_NICENESS) {
        tracing::debug!(%error, "could not lower the loading thread's priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_job_runs_at_a_lower_priority_and_returns_its_result() {
        let niceness = off_the_serving_path("test", || {
            rustix::process::getpriority_process(None).expect("getpriority")
        })
        .await
        .expect("the job ran");
        assert_eq!(niceness, LOAD_NICENESS);
        // The calling thread's own priority is untouched.
        assert_eq!(
            rustix::process::getpriority_process(None).expect("getpriority"),
            0
        );
    }
}
