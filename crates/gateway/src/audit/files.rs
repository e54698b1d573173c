//! The trail on disk: JSON lines appended to `audit.jsonl` in the trail's folder by
//! one writer thread, which empties its queue and flushes every [`POLL`]; the file is closed and renamed `audit-<ms>-<n>.jsonl` when it grows
//! past its size cap or gets a day old, and closed files go when the trail is over its
//! total size cap (oldest first) or older than the retention. Reading walks the closed
//! files in order, then the current one.

use std::{
    collections::VecDeque,
    fs::{self, File, OpenOptions},
    io::{BufRead, BufReader, BufWriter, Write},
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    time::{Duration, Instant, SystemTime},
};

use super::{Counts, Outcome, record::Filter, record::Record};

/// The file records are appended to.
const CURRENT: &str = "audit.jsonl";

/// How long one file is written before it is closed, whatever its size, so the
/// retention can delete old records even from a quiet trail.
const MAX_FILE_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// How often the writer empties the queue and flushes what it wrote: a record reaches
/// the file within about this long.
const POLL: Duration = Duration::from_millis(20);

/// The file's write buffer: one write(2) for about a thousand records.
const BUFFER_BYTES: usize = 256 * 1024;

/// Where the trail is kept and how much of it.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The folder.
    pub dir: PathBuf,
    /// The current file is closed past this size.
    pub max_file_bytes: u64,
    /// Closed files are deleted, oldest first, while all of them take more.
    pub max_total_bytes: u64,
    /// Closed files last written longer ago than this are deleted.
    pub retention: Duration,
}

/// What the writer thread is sent.
#[derive(Debug)]
pub enum Message {
    /// A record to append.
    Record(Box<Record>),
    /// Answered once every record sent before it is written and flushed.
    Sync(mpsc::SyncSender<()>),
}

/// Appends the records it receives to the trail until every sender is gone.
pub fn write(layout: &Layout, receiver: &mpsc::Receiver<Message>, counts: &Arc<Counts>) {
    let mut writer = match Current::open(layout) {
        Ok(writer) => Some(writer),
        Err(error) => {
            tracing::error!(dir = %layout.dir.display(), %error, "audit trail: cannot open its file; records are counted as failed until it can");
            None
        }
    };
    prune(layout);
    loop {
        if writer.is_none() {
            // The folder may be writable again (a full disk freed, a volume remounted).
            writer = Current::open(layout)
                .inspect(|_| tracing::info!("audit trail: its file can be written again"))
                .ok();
        }
        let mut waiting = Vec::new();
        let mut appended = false;
        let disconnected = loop {
            match receiver.try_recv() {
                Ok(Message::Record(record)) => {
                    let outcome = match writer.as_mut().map(|w| w.append(&record)) {
                        Some(Ok(())) => Outcome::Written,
                        Some(Err(error)) => {
                            tracing::error!(%error, "audit trail: a record could not be written");
                            Outcome::Failed
                        }
                        None => Outcome::Failed,
                    };
                    counts.add(record.kind, outcome);
                    appended = true;
                    if writer.as_ref().is_some_and(|w| w.is_full(layout)) {
                        writer = rotate(writer, layout);
                    }
                }
                Ok(Message::Sync(done)) => waiting.push(done),
                Err(mpsc::TryRecvError::Empty) => break false,
                Err(mpsc::TryRecvError::Disconnected) => break true,
            }
        };
        if appended && let Some(Err(error)) = writer.as_mut().map(Current::flush) {
            tracing::error!(%error, "audit trail: cannot flush its file");
        }
        for done in waiting {
            let _ = done.try_send(());
        }
        if disconnected {
            return;
        }
        // Polled, not woken: a sender never pays for waking this thread.
        std::thread::sleep(POLL);
    }
}

/// Closes the full current file and opens a new one, then prunes the closed files.
fn rotate(writer: Option<Current>, layout: &Layout) -> Option<Current> {
    let mut current = writer?;
    let fresh = match current.close(layout).and_then(|()| Current::open(layout)) {
        Ok(fresh) => Some(fresh),
        Err(error) => {
            tracing::error!(%error, "audit trail: cannot start a new file; records are counted as failed until it can");
            None
        }
    };
    prune(layout);
    fresh
}

/// The file being appended to.
struct Current {
    out: BufWriter<File>,
    bytes: u64,
    opened: Instant,
}

impl Current {
    fn open(layout: &Layout) -> std::io::Result<Current> {
        fs::create_dir_all(&layout.dir)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(layout.dir.join(CURRENT))?;
        let bytes = file.metadata()?.len();
        Ok(Current {
            out: BufWriter::with_capacity(BUFFER_BYTES, file),
            bytes,
            opened: Instant::now(),
        })
    }

    fn append(&mut self, record: &Record) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        self.out.write_all(&line)?;
        self.bytes += line.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    fn is_full(&self, layout: &Layout) -> bool {
        self.bytes >= layout.max_file_bytes
            || (self.bytes > 0 && self.opened.elapsed() >= MAX_FILE_AGE)
    }

    /// Flushes the file and renames it as closed (a name that sorts after every
    /// earlier closed file).
    fn close(&mut self, layout: &Layout) -> std::io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_all()?;
        let stamp = aviary::unix_ms(SystemTime::now());
        // Names sort as the files were closed: by time, then by a counter for files
        // closed within the same millisecond.
        let name = |n: u32| layout.dir.join(format!("audit-{stamp:020}-{n:06}.jsonl"));
        let mut n = 0;
        let mut closed = name(n);
        while closed.exists() {
            n += 1;
            closed = name(n);
        }
        fs::rename(layout.dir.join(CURRENT), closed)
    }
}

/// The closed files, oldest first.
fn closed_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("audit-") && n.ends_with(".jsonl"))
        })
        .collect();
    files.sort();
    files
}

/// Deletes closed files past the retention, then the oldest while over the size cap.
fn prune(layout: &Layout) {
    let now = SystemTime::now();
    let mut kept = Vec::new();
    for path in closed_files(&layout.dir) {
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        let age = meta
            .modified()
            .ok()
            .and_then(|at| now.duration_since(at).ok())
            .unwrap_or_default();
        if age > layout.retention {
            remove(&path, "past the retention");
        } else {
            kept.push((path, meta.len()));
        }
    }
    let current = fs::metadata(layout.dir.join(CURRENT)).map_or(0, |m| m.len());
    let mut total: u64 = current + kept.iter().map(|(_, len)| len).sum::<u64>();
    for (path, len) in kept {
        if total <= layout.max_total_bytes {
            break;
        }
        remove(&path, "over the trail's size cap");
        total -= len;
    }
}

fn remove(path: &Path, why: &str) {
    match fs::remove_file(path) {
        Ok(()) => tracing::info!(file = %path.display(), why, "audit trail: file deleted"),
        Err(error) => {
            tracing::warn!(file = %path.display(), %error, "audit trail: cannot delete a file")
        }
    }
}

/// The last `limit` records in `dir` that `filter` matches, oldest first, as the JSON
/// lines they are stored as; and whether more matched.
pub fn read(dir: &Path, filter: &Filter, limit: usize) -> std::io::Result<(Vec<String>, bool)> {
    let mut files = closed_files(dir);
    // A closed file last written before `since` holds nothing newer.
    if let Some(since) = filter.since_ms {
        files.retain(|path| {
            fs::metadata(path)
                .and_then(|m| m.modified())
                .map_or(true, |at| aviary::unix_ms(at) >= since)
        });
    }
    files.push(dir.join(CURRENT));
    let mut found = VecDeque::new();
    let mut more = false;
    for path in files {
        let file = match File::open(&path) {
            Ok(file) => file,
            // Deleted or renamed since it was listed: what it held is elsewhere or gone.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error),
        };
        for line in BufReader::new(file).lines() {
            let line = line?;
            let Ok(record) = serde_json::from_str::<Record>(&line) else {
                continue;
            };
            if filter.matches(&record) {
                found.push_back(line);
                if found.len() > limit {
                    found.pop_front();
                    more = true;
                }
            }
        }
    }
    Ok((found.into(), more))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::Kind;

    fn layout(dir: &Path, max_file_bytes: u64, max_total_bytes: u64) -> Layout {
        Layout {
            dir: dir.to_owned(),
            max_file_bytes,
            max_total_bytes,
            retention: Duration::from_secs(3600),
        }
    }

    fn record(i: u64) -> Message {
        Message::Record(Box::new(
            Record::new(i, Kind::Route, "key:ops".into(), "set")
                .about("demo", Some(&i.to_string())),
        ))
    }

    /// Writes `records` through a writer thread and waits until it is done.
    fn write_all(layout: &Layout, records: impl IntoIterator<Item = Message>) -> Arc<Counts> {
        let counts = Arc::new(Counts::default());
        let (sender, receiver) = mpsc::sync_channel(100_000);
        for message in records {
            sender.send(message).expect("queued");
        }
        drop(sender);
        write(layout, &receiver, &counts);
        counts
    }

    #[test]
    fn records_are_appended_as_lines_and_read_back_filtered() {
        let dir = tempfile::tempdir().expect("temp dir");
        let layout = layout(dir.path(), 1 << 20, 1 << 30);
        let counts = write_all(&layout, (0..10).map(record));
        assert_eq!(counts.get(Kind::Route, Outcome::Written), 10);
        let (lines, more) = read(dir.path(), &Filter::default(), 3).expect("reads");
        assert!(more);
        let versions: Vec<String> = lines
            .iter()
            .map(|l| {
                serde_json::from_str::<Record>(l)
                    .expect("a record")
                    .version
                    .expect("set")
            })
            .collect();
        assert_eq!(versions, ["7", "8", "9"]);
        let since = Filter {
            since_ms: Some(8),
            ..Filter::default()
        };
        assert_eq!(read(dir.path(), &since, 100).expect("reads").0.len(), 2);
    }

    #[test]
    fn a_full_file_is_closed_and_the_oldest_files_go_over_the_total_cap() {
        let dir = tempfile::tempdir().expect("temp dir");
        // About 100 bytes a record: a file closes every ~41 records, and the cap
        // keeps about three files.
        let layout = layout(dir.path(), 4096, 3 * 4096 + 2048);
        write_all(&layout, (0..1000).map(record));
        let closed = closed_files(dir.path());
        assert!(!closed.is_empty(), "files were closed");
        let total: u64 = fs::read_dir(dir.path())
            .expect("lists")
            .flatten()
            .map(|e| e.metadata().expect("meta").len())
            .sum();
        assert!(total <= layout.max_total_bytes + 4096, "{total} bytes kept");
        // What is kept is the newest, in order, with nothing missing in between.
        let (lines, _) = read(dir.path(), &Filter::default(), usize::MAX).expect("reads");
        let times: Vec<u64> = lines
            .iter()
            .map(|l| serde_json::from_str::<Record>(l).expect("a record").time_ms)
            .collect();
        assert_eq!(times.last(), Some(&999));
        assert!(times.windows(2).all(|w| w[1] == w[0] + 1), "contiguous");
        assert!(times.first() > Some(&0), "the oldest went");
    }

    #[test]
    fn a_trail_that_cannot_be_written_counts_failures_and_recovers() {
        let parent = tempfile::tempdir().expect("temp dir");
        let dir = parent.path().join("trail");
        // A file where the folder should be: nothing can be opened in it.
        std::fs::write(&dir, "in the way").expect("write");
        let layout = layout(&dir, 1 << 20, 1 << 30);
        let counts = Arc::new(Counts::default());
        let (sender, receiver) = mpsc::sync_channel(100);
        let writer = {
            let (layout, counts) = (layout.clone(), Arc::clone(&counts));
            std::thread::spawn(move || write(&layout, &receiver, &counts))
        };
        let synced = |sender: &mpsc::SyncSender<Message>| {
            let (done, answered) = mpsc::sync_channel(1);
            sender.send(Message::Sync(done)).expect("queued");
            answered.recv().expect("answered");
        };
        sender.send(record(1)).expect("queued");
        synced(&sender);
        assert_eq!(counts.get(Kind::Route, Outcome::Failed), 1);
        std::fs::remove_file(&dir).expect("out of the way");
        sender.send(record(2)).expect("queued");
        synced(&sender);
        drop(sender);
        writer.join().expect("the writer ends");
        assert_eq!(counts.get(Kind::Route, Outcome::Written), 1);
        let (lines, _) = read(&dir, &Filter::default(), 10).expect("reads");
        assert_eq!(lines.len(), 1, "{lines:?}");
    }

    #[test]
    fn a_sync_is_answered_after_what_was_sent_before_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let layout = layout(dir.path(), 1 << 20, 1 << 30);
        let (done, synced) = mpsc::sync_channel(1);
        write_all(&layout, (0..5).map(record).chain([Message::Sync(done)]));
        synced.try_recv().expect("answered");
        assert_eq!(
            read(dir.path(), &Filter::default(), 100)
                .expect("reads")
                .0
                .len(),
            5
        );
    }
}
