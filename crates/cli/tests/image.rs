//! The container image's layout, checked where no Docker daemon runs: the final stage
//! of the `Dockerfile` is read, every file it copies is put at its path under a
//! temporary root (the binary this build made, ONNX Runtime from the same wheel the
//! image fetches, the config and models from the checkout), with the C and C++
//! runtime libraries the base image provides (taken from this machine, Debian 12 like
//! the base image). The image's `ENTRYPOINT` + `CMD` then runs in that root as the
//! Kubernetes manifests run it: `chroot`ed into it, mounted read-only, as uid/gid
//! 10001, in its WORKDIR, with a tmpfs only at `/tmp` (the manifests' emptyDir; their
//! model volume is read-only). So the binary can only find ONNX Runtime where the
//! image puts it, needs nothing from the checkout, and must serve the demo without
//! writing anywhere but `/tmp`.

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
    assert_eq!(stage.exposed, [8000, 8001, 8002, 8003]);
    assert_eq!(stage.entrypoint, ["/usr/local/bin/aviary"]);

    let image = tempfile::tempdir().expect("temp dir");
    let root = image.path();
    for (source, destination) in &stage.copies {
        copy_into(
            &source_here(source),
            &root.join(destination.trim_start_matches('/')),
        );
    }
    // What the binary and the libraries the image copies load.
    let loaded: Vec<PathBuf> = std::iter::once(stage.entrypoint[0].as_str())
        .chain(
            stage
                .copies
                .iter()
                .map(|(_, destination)| destination.as_str())
                .filter(|d| d.ends_with(".so") || d.contains(".so.")),
        )
        .flat_map(|file| shared_libraries(&root.join(file.trim_start_matches('/'))))
        .collect();
    for library in loaded {
        copy_into(
            &library,
            &root.join(library.strip_prefix("/").expect("absolute")),
        );
    }
    // Its WORKDIR (read-only, as under the manifests) and mount points: /tmp, the one
    // writable place, and what the kernel provides.
    let workdir = stage.workdir.trim_start_matches('/');
    for dir in [workdir, "tmp", "proc", "dev"] {
        fs::create_dir_all(root.join(dir)).expect("mount point");
    }
    let before = tree(root);

    let mut server = Process::spawn_command(
        in_image(root, &stage, &stage.user),
        "the image's aviary serve",
    );
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

    let written: Vec<PathBuf> = tree(root).difference(&before).cloned().collect();
    assert!(
        written.is_empty(),
        "the read-only root was written: {written:?}"
    );
    let stderr = server.take_stderr();
    assert!(
        !stderr.contains("WARN") && !stderr.contains("ERROR"),
        "a clean start and stop: {stderr}"
    );
}

/// The libraries `file` loads (its `ldd` list), as absolute paths on this machine.
fn shared_libraries(file: &Path) -> Vec<PathBuf> {
    let output = Command::new("ldd").arg(file).output().expect("ldd runs");
    assert!(output.status.success(), "ldd {}", file.display());
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x…)"; the vDSO has no file.
            let path = line.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// The image's `ENTRYPOINT` + `CMD` (with every listener on a free loopback port) run
/// as a container would run it: in a mount namespace of its own, `root` bound
/// read-only, a tmpfs at `/tmp`, `/dev` and `/proc` from the host, then
/// `unshare --root` into it as `user` in the WORKDIR. Not root: a user namespace
/// stands in, where the process is root of the namespace, not uid 10001.
fn in_image(root: &Path, stage: &Stage, user: &str) -> Command {
    let (uid, gid) = user.split_once(':').expect("USER uid:gid");
    let as_root = is_root();
    let mut command = Command::new("unshare");
    if !as_root {
        command.arg("--map-root-user");
    }
    // Only root can become uid 10001.
    let switch_user = match as_root {
        true => format!("--setuid {uid} --setgid {gid}"),
        false => String::new(),
    };
    let script = format!(
        r#"set -e
R="$0"
mount --bind "$R" "$R"
mount -o remount,bind,ro "$R"
mount --rbind /dev "$R/dev"
mount --rbind /proc "$R/proc"
mount -t tmpfs -o mode=1777 tmpfs "$R/tmp"
exec unshare --root="$R" --wd={workdir} {switch_user} "$@""#,
        workdir = stage.workdir,
    );
    command
        .args(["--mount", "--", "sh", "-c", &script])
        .arg(root)
        .args(&stage.entrypoint)
        .args(&stage.cmd)
        .args(LOOPBACK_LISTENERS)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin");
    command
}
