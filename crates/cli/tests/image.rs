//! The container image's layout, checked where no Docker daemon runs: the final stage
//! of the `Dockerfile` is read, every file it copies is put at its path under a
//! temporary root (the binary this build made, ONNX Runtime from the same wheel the
//! image fetches, the config and models from the checkout), and the image's
//! `ENTRYPOINT` + `CMD` is started from there: no `ORT_DYLIB_PATH`, a working folder
//! outside the checkout, so the binary can only find the library where the image puts
//! it. It must serve the demo, and write nothing outside the image's declared writable
//! places.

mod support;

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use support::*;

/// What the final stage of the Dockerfile says.
#[derive(Debug, Default)]
struct Stage {
    /// (source, destination): a source is `stage:path` for `COPY --from=stage`, else a
    /// path in the checkout.
    copies: Vec<(String, String)>,
    user: String,
    workdir: String,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    stop_signal: String,
    exposed: Vec<u16>,
}

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn instructions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

fn final_stage(text: &str) -> Stage {
    let all = instructions(text);
    let from = all
        .iter()
        .rposition(|i| i.starts_with("FROM "))
        .expect("the Dockerfile has a FROM");
    let json = |rest: &str| -> Vec<String> {
        serde_json::from_str(rest).unwrap_or_else(|e| panic!("exec form expected: {rest}: {e}"))
    };
    let mut stage = Stage::default();
    for instruction in &all[from + 1..] {
        let (keyword, rest) = instruction
            .split_once(' ')
            .expect("instruction has arguments");
        let rest = rest.trim();
        match keyword {
            "COPY" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                let (source, destination) = match words.as_slice() {
                    [flag, source, destination] => {
                        let stage = flag.strip_prefix("--from=").expect("COPY flag is --from");
                        (format!("{stage}:{source}"), (*destination).to_owned())
                    }
                    [source, destination] => ((*source).to_owned(), (*destination).to_owned()),
                    _ => panic!("a COPY of one source to one destination: {instruction}"),
                };
                stage.copies.push((source, destination));
            }
            "USER" => stage.user = rest.to_owned(),
            "WORKDIR" => stage.workdir = rest.to_owned(),
            "ENTRYPOINT" => stage.entrypoint = json(rest),
            "CMD" => stage.cmd = json(rest),
            "STOPSIGNAL" => stage.stop_signal = rest.to_owned(),
            "EXPOSE" => {
                stage.exposed = rest
                    .split_whitespace()
                    .map(|p| p.parse().expect("EXPOSE takes port numbers"))
                    .collect()
            }
            _ => {}
        }
    }
    stage
}

/// Where a file the image copies comes from here.
fn source_here(source: &str) -> PathBuf {
    let root = repo_root();
    match source.split_once(':') {
        Some(("build", "/aviary")) => PathBuf::from(env!("CARGO_BIN_EXE_aviary")),
        Some(("onnxruntime", path)) => root.join(".aviary/onnxruntime").join(
            path.strip_prefix("/onnxruntime/").unwrap_or_else(|| {
                panic!("the onnxruntime stage's files are under /onnxruntime: {path}")
            }),
        ),
        Some((stage, path)) => panic!(
            "this test does not know what stage {stage:?} builds at {path}; teach source_here"
        ),
        None => root.join(source),
    }
}

fn copy_into(source: &Path, destination: &Path) {
    if source.is_dir() {
        fs::create_dir_all(destination).expect("create folder");
        for entry in fs::read_dir(source).expect("read folder") {
            let entry = entry.expect("folder entry");
            copy_into(&entry.path(), &destination.join(entry.file_name()));
        }
    } else {
        fs::create_dir_all(destination.parent().expect("file has a folder"))
            .expect("create folder");
        fs::copy(source, destination).unwrap_or_else(|e| {
            panic!(
                "copy {} to {}: {e}",
                source.display(),
                destination.display()
            )
        });
    }
}

/// Every file and folder under `root`, relative to it.
fn tree(root: &Path) -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read folder") {
            let path = entry.expect("entry").path();
            found.insert(path.strip_prefix(root).expect("under root").to_path_buf());
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    found
}

#[test]
fn the_image_layout_serves_the_demo_with_nothing_but_its_own_files() {
    let dockerfile = fs::read_to_string(repo_root().join("Dockerfile")).expect("Dockerfile");
    let stage = final_stage(&dockerfile);
    assert_eq!(stage.stop_signal, "SIGTERM");
    assert_eq!(
        stage.user, "10001:10001",
        "runs as the non-root user the manifests name"
    );
    assert_eq!(stage.exposed, [8001, 8002, 8003]);
    assert_eq!(stage.entrypoint, ["/usr/local/bin/aviary"]);

    let image = tempfile::tempdir().expect("temp dir");
    let root = image.path();
    for (source, destination) in &stage.copies {
        copy_into(
            &source_here(source),
            &root.join(destination.trim_start_matches('/')),
        );
    }
    // The writable places the image declares: its WORKDIR (a volume in Kubernetes) and /tmp.
    let workdir = root.join(stage.workdir.trim_start_matches('/'));
    fs::create_dir_all(&workdir).expect("workdir");
    fs::create_dir_all(root.join("tmp")).expect("tmp");
    let before = tree(root);

    // Paths in the command are the image's: re-rooted under the temporary root.
    let rerooted = |arg: &String| match arg.strip_prefix('/') {
        Some(path) if root.join(path).exists() => root.join(path).display().to_string(),
        _ => arg.clone(),
    };
    let mut command = Command::new(rerooted(&stage.entrypoint[0]));
    command
        .args(stage.cmd.iter().map(rerooted))
        .args(LOOPBACK_LISTENERS)
        .current_dir(&workdir)
        .env_remove("ORT_DYLIB_PATH")
        .env("TMPDIR", root.join("tmp"))
        .env("HOME", &workdir);
    let mut server = Process::spawn_command(command, "the image's aviary serve");
    let addr = format!("http://{}", server.wait_listening());

    let answered = infer_versions(&addr, None, 40);
    assert_eq!(answered.values().sum::<u64>(), 40, "{answered:?}");
    assert!(
        answered.keys().all(|v| v == "1" || v == "2"),
        "the demo's versions answer: {answered:?}"
    );
    sigterm(&server);
    assert!(
        server.wait_exit(START_DEADLINE).success(),
        "SIGTERM exits 0"
    );

    let written: Vec<PathBuf> = tree(root)
        .difference(&before)
        .filter(|p| !p.starts_with(stage.workdir.trim_start_matches('/')) && !p.starts_with("tmp"))
        .cloned()
        .collect();
    assert!(
        written.is_empty(),
        "a read-only root filesystem would have refused: {written:?}"
    );
}
