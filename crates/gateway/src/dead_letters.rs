//! The dead-letter queue: requests that finally failed (after retries and fallback),
//! kept on disk for routes that opt in, to be sent again once the cause is fixed.
//!
//! The request path never waits for it: a failed request is handed to a writer task
//! through a bounded queue, and dropped (and counted) when the queue is full. The
//! writer appends length-prefixed `DeadLetter` messages to segment files in a folder
//! (`dead-letters-<n>.bin`), starts a new segment past a quarter of the size cap, and
//! deletes the oldest segments (counting their letters) to stay under the cap. The
//! folder survives restarts; ids carry on from the highest kept.
//!
//! With `[dead_letters] redis` set, each letter is also added to a Redis stream by a
//! task of its own ([`redis_sink`]); the folder stays the record that list and replay
//! read.

mod redis_sink;

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use aviary::pb::{admin::DeadLetter, inference::ModelInferRequest};
use prost::Message;
use tokio::sync::mpsc;

use self::redis_sink::RedisSink;
use crate::{GatewayError, config::DeadLettersConfig};

/// Failed requests waiting for the writer; more are dropped.
const QUEUE: usize = 256;

/// Where failed requests are kept, and how much of them.
#[derive(Debug)]
pub struct DeadLetters {
    folder: PathBuf,
    queue: mpsc::Sender<Arc<DeadLetter>>,
    next_id: AtomicU64,
    dropped_busy: AtomicU64,
    redis: Option<RedisSink>,
    /// Serialises file access between the writer and readers (list, replay).
    files: Arc<Mutex<Segments>>,
}

/// Letters lost so far, by cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    /// Kept, then deleted with the oldest segment to stay under the size cap.
    pub oldest: u64,
    /// Never kept: the writer's queue was full.
    pub busy: u64,
    /// Not added to the Redis stream (still kept on disk).
    pub redis: u64,
}

/// The segment files and what the cap has cost.
#[derive(Debug)]
struct Segments {
    folder: PathBuf,
    max_bytes: u64,
    dropped_oldest: u64,
}

impl DeadLetters {
    /// The queue in the configured folder (made if missing), holding at most
    /// `max_bytes` on disk, with its Redis sink when one is set. Letters already there
    /// are kept.
    pub fn open(config: &DeadLettersConfig) -> Result<Arc<DeadLetters>, GatewayError> {
        let (folder, max_bytes) = (config.folder.as_path(), config.max_bytes);
        let error = |e: std::io::Error| GatewayError::Config {
            path: folder.display().to_string(),
            message: format!("dead-letter folder: {e}"),
        };
        fs::create_dir_all(folder).map_err(error)?;
        let segments = Segments {
            folder: folder.to_owned(),
            max_bytes,
            dropped_oldest: 0,
        };
        let next_id = segments
            .read_all()
            .map_err(error)?
            .iter()
            .map(|l| l.id)
            .max()
            .unwrap_or(0)
            + 1;
        let redis = config.redis.as_ref().map(RedisSink::start).transpose()?;
        let (queue, letters) = mpsc::channel(QUEUE);
        let dead_letters = Arc::new(DeadLetters {
            folder: folder.to_owned(),
            queue,
            next_id: AtomicU64::new(next_id),
            dropped_busy: AtomicU64::new(0),
            redis,
            files: Arc::new(Mutex::new(segments)),
        });
        tokio::spawn(write(Arc::clone(&dead_letters.files), letters));
        Ok(dead_letters)
    }

    /// Keeps `request`, which failed on `model` at `version` with `status`; never
    /// waits (a full queue drops it and counts it).
    pub fn keep(
        &self,
        model: &str,
        version: &str,
        status: &tonic::Status,
        request: &ModelInferRequest,
    ) {
        // Shared by the disk writer and the Redis sink: the request is encoded once.
        let letter = Arc::new(DeadLetter {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            at_ms: aviary::unix_ms(std::time::SystemTime::now()),
            model: model.to_owned(),
            version: version.to_owned(),
            code: status.code() as i32,
            error: status.message().to_owned(),
            request: request.encode_to_vec(),
        });
        if let Some(redis) = &self.redis {
            redis.send(Arc::clone(&letter));
        }
        if self.queue.try_send(letter).is_err() {
            self.dropped_busy.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Every kept letter of `model` (all when empty), oldest first.
    pub fn list(&self, model: &str) -> Result<Vec<DeadLetter>, GatewayError> {
        let files = self.lock();
        let letters = files.read_all().map_err(|e| self.io_error(e))?;
        Ok(letters
            .into_iter()
            .filter(|l| model.is_empty() || l.model == model)
            .collect())
    }

    /// Removes the letters with these ids (replayed successfully).
    pub fn remove(&self, ids: &[u64]) -> Result<(), GatewayError> {
        let files = self.lock();
        files.rewrite_without(ids).map_err(|e| self.io_error(e))
    }

    /// Letters lost so far, by cause.
    pub fn dropped(&self) -> Dropped {
        Dropped {
            oldest: self.lock().dropped_oldest,
            busy: self.dropped_busy.load(Ordering::Relaxed),
            redis: self.redis.as_ref().map_or(0, RedisSink::dropped),
        }
    }

    /// The Redis stream letters are also added to, if any.
    pub fn redis_stream(&self) -> Option<&str> {
        self.redis.as_ref().map(RedisSink::stream)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Segments> {
        // The guarded state is file names and a counter: whole after every write.
        self.files.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn io_error(&self, error: std::io::Error) -> GatewayError {
        GatewayError::Unreachable(format!(
            "dead-letter folder {}: {error}",
            self.folder.display()
        ))
    }
}

/// Appends queued letters until the queue closes; a write error is logged and the
/// letter lost (counted nowhere else: the log says so).
async fn write(files: Arc<Mutex<Segments>>, mut letters: mpsc::Receiver<Arc<DeadLetter>>) {
    while let Some(letter) = letters.recv().await {
        let files = Arc::clone(&files);
        let written = tokio::task::spawn_blocking(move || {
            files
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .append(&letter)
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "cannot keep a dead letter"),
            Err(error) => tracing::error!(%error, "dead-letter writer failed"),
        }
    }
}

impl Segments {
    /// Segment files, oldest first.
    fn files(&self) -> std::io::Result<Vec<(u64, PathBuf)>> {
        let mut files: Vec<(u64, PathBuf)> = fs::read_dir(&self.folder)?
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let n = name
                    .strip_prefix("dead-letters-")?
                    .strip_suffix(".bin")?
                    .parse()
                    .ok()?;
                Some((n, entry.path()))
            })
            .collect();
        files.sort();
        Ok(files)
    }

    fn append(&mut self, letter: &DeadLetter) -> std::io::Result<()> {
        let files = self.files()?;
        let segment_cap = (self.max_bytes / 4).max(1);
        let path = match files.last() {
            Some((_, path)) if fs::metadata(path)?.len() < segment_cap => path.clone(),
            last => {
                let n = last.map_or(1, |(n, _)| n + 1);
                self.folder.join(format!("dead-letters-{n}.bin"))
            }
        };
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        file.write_all(&letter.encode_length_delimited_to_vec())?;
        file.sync_data()?;
        self.enforce_cap()
    }

    /// Deletes the oldest segments while the folder is over its cap (never the newest).
    fn enforce_cap(&mut self) -> std::io::Result<()> {
        let files = self.files()?;
        let mut sizes: Vec<(PathBuf, u64)> = files
            .into_iter()
            .map(|(_, p)| {
                let len = fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                (p, len)
            })
            .collect();
        let mut total: u64 = sizes.iter().map(|(_, len)| len).sum();
        while total > self.max_bytes && sizes.len() > 1 {
            let (oldest, len) = sizes.remove(0);
            self.dropped_oldest += read_segment(&oldest)?.len() as u64;
            fs::remove_file(&oldest)?;
            total -= len;
        }
        Ok(())
    }

    fn read_all(&self) -> std::io::Result<Vec<DeadLetter>> {
        let mut all = Vec::new();
        for (_, path) in self.files()? {
            all.extend(read_segment(&path)?);
        }
        Ok(all)
    }

    /// Rewrites every segment holding one of `ids` without it (a new file renamed over
    /// the old, so a crash leaves one or the other).
    fn rewrite_without(&self, ids: &[u64]) -> std::io::Result<()> {
        for (_, path) in self.files()? {
            let letters = read_segment(&path)?;
            if !letters.iter().any(|l| ids.contains(&l.id)) {
                continue;
            }
            let kept: Vec<u8> = letters
                .iter()
                .filter(|l| !ids.contains(&l.id))
                .flat_map(Message::encode_length_delimited_to_vec)
                .collect();
            let tmp = path.with_extension("tmp");
            fs::write(&tmp, kept)?;
            fs::rename(&tmp, &path)?;
        }
        Ok(())
    }
}

/// The letters of one segment; a torn last record (a crash mid-write) is ignored.
fn read_segment(path: &Path) -> std::io::Result<Vec<DeadLetter>> {
    let bytes = fs::read(path)?;
    let mut buffer = bytes.as_slice();
    let mut letters = Vec::new();
    while !buffer.is_empty() {
        match DeadLetter::decode_length_delimited(&mut buffer) {
            Ok(letter) => letters.push(letter),
            Err(_) => break,
        }
    }
    Ok(letters)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn request(n: usize) -> ModelInferRequest {
        ModelInferRequest {
            model_name: "demo".into(),
            id: format!("r{n}"),
            raw_input_contents: vec![vec![7u8; 100].into()],
            ..ModelInferRequest::default()
        }
    }

    fn config(folder: &Path, max_bytes: u64) -> DeadLettersConfig {
        DeadLettersConfig {
            folder: folder.to_owned(),
            max_bytes,
            redis: None,
        }
    }

    async fn until(mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "condition not met in time");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn kept_letters_survive_a_reopen_and_can_be_removed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let status = tonic::Status::unavailable("worker down");
        let letters = DeadLetters::open(&config(dir.path(), 1 << 20)).expect("opens");
        for n in 0..3 {
            letters.keep("demo", "2", &status, &request(n));
        }
        until(|| letters.list("").map(|l| l.len()).ok() == Some(3)).await;
        drop(letters);

        let reopened = DeadLetters::open(&config(dir.path(), 1 << 20)).expect("opens again");
        let kept = reopened.list("demo").expect("list");
        assert_eq!(kept.len(), 3);
        assert_eq!(kept[0].code, tonic::Code::Unavailable as i32);
        let first = ModelInferRequest::decode(kept[0].request.as_slice()).expect("a request");
        assert_eq!(first, request(0));
        reopened.remove(&[kept[0].id, kept[2].id]).expect("removes");
        let left: Vec<u64> = reopened
            .list("")
            .expect("list")
            .iter()
            .map(|l| l.id)
            .collect();
        assert_eq!(left, [kept[1].id]);
        reopened.keep("demo", "2", &status, &request(9));
        until(|| reopened.list("").map(|l| l.len()).ok() == Some(2)).await;
        let ids: Vec<u64> = reopened
            .list("")
            .expect("list")
            .iter()
            .map(|l| l.id)
            .collect();
        assert!(ids[1] > kept[2].id, "ids carry on after a reopen: {ids:?}");
    }

    #[tokio::test]
    async fn a_full_log_drops_its_oldest_letters_and_counts_them() {
        let dir = tempfile::tempdir().expect("temp dir");
        let status = tonic::Status::internal("broken");
        // Each letter is about 150 bytes; the cap holds a few dozen.
        let letters = DeadLetters::open(&config(dir.path(), 4_000)).expect("opens");
        for n in 0..200 {
            letters.keep("demo", "1", &status, &request(n));
            if n % 50 == 49 {
                // Let the writer catch up, so none are dropped as busy.
                let expected = n as u64 + 1;
                until(|| {
                    let Dropped { oldest, busy, .. } = letters.dropped();
                    letters.list("").map(|l| l.len() as u64).unwrap_or(0) + oldest + busy
                        == expected
                })
                .await;
            }
        }
        let Dropped { oldest, busy, .. } = letters.dropped();
        let kept = letters.list("").expect("list");
        assert!(oldest > 0, "the cap dropped old letters");
        assert_eq!(
            kept.len() as u64 + oldest + busy,
            200,
            "every letter is kept or counted"
        );
        let total: u64 = fs::read_dir(dir.path())
            .expect("folder")
            .filter_map(Result::ok)
            .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .sum();
        assert!(total <= 4_000 + 1_000, "{total} bytes on disk");
        let newest = ModelInferRequest::decode(kept.last().expect("some").request.as_slice())
            .expect("a request");
        assert_eq!(newest.id, "r199", "the newest are the ones kept");
    }
}
