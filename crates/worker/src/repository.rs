//! The model repository on disk: `<repo>/<model>/<version>/model.onnx`, with numeric
//! version folders and an optional `model.toml` model card beside each model file.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    WorkerError,
    batching::BatchingCard,
    classification::LabelsCard,
    default_prediction::DefaultValues,
    drift::DriftCard,
    input_rules::InputRulesCard,
    registry::{Approval, Lineage, Sha256, Stage},
    warmup::WarmupCard,
};

/// File name of a version's ONNX model.
pub const MODEL_FILE: &str = "model.onnx";

/// File name of a version's optional model card.
pub const CARD_FILE: &str = "model.toml";

/// What a model card says about a version: who made it, for what, and how well it does.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelCard {
    /// What the model does.
    #[serde(default)]
    pub description: String,
    /// Team or person responsible.
    #[serde(default)]
    pub owner: String,
    /// What it should be used for.
    #[serde(default)]
    pub intended_use: String,
    /// Known limitations.
    #[serde(default)]
    pub limitations: String,
    /// What it was trained on.
    #[serde(default)]
    pub training_data: String,
    /// Evaluation metrics, by name.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// The version's semantic version ("2.1.0"), its name in the registry (see
    /// [`crate::registry`]).
    #[serde(default)]
    pub semver: Option<semver::Version>,
    /// The SHA-256 the model file must have (as `sha256sum` prints it): a file with
    /// another is refused at load.
    #[serde(default)]
    pub sha256: Option<Sha256>,
    /// Where the version came from: training data, code, run, hyperparameters.
    #[serde(default)]
    pub lineage: Option<Lineage>,
    /// Its stage in the approval workflow as it was published (a gateway's
    /// `[registry]` may have set another since); absent: candidate.
    #[serde(default)]
    pub stage: Option<Stage>,
    /// Who approved it, when and why (for a card published as approved).
    #[serde(default)]
    pub approval: Option<Approval>,
    /// One example's outputs, by output name, that a gateway answers with when a call
    /// fails and the route opts in (see [`crate::default_prediction`]).
    #[serde(default)]
    pub default_prediction: BTreeMap<String, DefaultValues>,
    /// Dynamic batching of the version's requests (see [`crate::batching`]).
    #[serde(default)]
    pub dynamic_batching: Option<BatchingCard>,
    /// Value rules for the inputs: ranges, allowed values, NaN and infinities (see
    /// [`crate::input_rules`]).
    #[serde(default)]
    pub input_rules: Option<InputRulesCard>,
    /// Drift tracking of the inputs and outputs against a reference (see
    /// [`crate::drift`]).
    #[serde(default)]
    pub drift: Option<DriftCard>,
    /// Labels of classification outputs, by output: a list, or a file beside the
    /// model (see [`crate::classification`]).
    #[serde(default)]
    pub labels: BTreeMap<String, LabelsCard>,
    /// Whether the version takes sequences (requests with a `sequence_id`): it keeps
    /// no state between them, or the client carries it. A gateway keeps each
    /// sequence on the version that served its start.
    #[serde(default)]
    pub sequences: bool,
    /// The warm-up every session runs at load (see [`crate::warmup`]); absent: zeros,
    /// or none for a model with a BYTES input.
    #[serde(default)]
    pub warmup: Option<WarmupCard>,
    /// The layout of image inputs, by input (`ModelConfig`'s `format`, which image
    /// clients read): checked against the schema at load.
    #[serde(default)]
    pub formats: BTreeMap<String, InputFormat>,
}

/// An image input's layout, as Triton's model configuration names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InputFormat {
    /// Channels first: `[C, H, W]`.
    #[serde(rename = "NCHW")]
    Nchw,
    /// Channels last: `[H, W, C]`.
    #[serde(rename = "NHWC")]
    Nhwc,
}

impl InputFormat {
    /// Checks the card's formats against `schema`: each names an input of rank 3 (an
    /// image), or 4 with a variable first dimension (a batch of images).
    pub fn check_all(
        formats: &BTreeMap<String, InputFormat>,
        schema: &crate::schema::ModelSchema,
    ) -> Result<(), String> {
        for (input, format) in formats {
            let spec = schema.input(input).ok_or_else(|| {
                format!("model card: formats.{input}: the model has no input \"{input}\"")
            })?;
            let image = match spec.shape.as_slice() {
                [_, _, _] => true,
                [first, _, _, _] => *first < 0,
                _ => false,
            };
            if !image {
                return Err(format!(
                    "model card: formats.{input}: {format:?} needs an image input (3 dimensions, \
                     or 4 with a variable batch first); \"{input}\" has shape {:?}",
                    spec.shape
                ));
            }
        }
        Ok(())
    }
}

/// Identity of a version's files as the filesystem sees them: replacing the model file
/// (an atomic rename gives a new inode) or rewriting it changes the fingerprint, and so
/// does editing its card (a new `sha256` or `semver` takes effect, and a load that
/// failed on a stale card is tried again once the card is fixed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fingerprint {
    /// Size in bytes.
    pub len: u64,
    /// Modification time, nanoseconds since the epoch.
    pub modified_ns: i128,
    /// Inode number.
    pub inode: u64,
    /// The card's size, modification time and inode, when there is a card.
    pub card: Option<(u64, i128, u64)>,
}

impl Fingerprint {
    /// The fingerprint of the model file at `path` now (without its card's).
    pub fn of(path: &Path) -> std::io::Result<Fingerprint> {
        let (len, modified_ns, inode) = stamp(path)?;
        Ok(Fingerprint {
            len,
            modified_ns,
            inode,
            card: None,
        })
    }

    /// This fingerprint with the card at `card` (if any) taken in: a card that cannot
    /// be read counts as none (its load will say why).
    pub fn with_card(self, card: Option<&Path>) -> Fingerprint {
        Fingerprint {
            card: card.and_then(|path| stamp(path).ok()),
            ..self
        }
    }
}

/// A file's size, modification time (ns since the epoch) and inode.
fn stamp(path: &Path) -> std::io::Result<(u64, i128, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path)?;
    Ok((
        meta.len(),
        i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        meta.ino(),
    ))
}

/// One version folder found in the repository.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionEntry {
    /// Model name (the model folder's name).
    pub model: String,
    /// Version (the numeric folder name).
    pub version: u64,
    /// Path of `model.onnx`.
    pub model_path: PathBuf,
    /// Path of `model.toml`, if present.
    pub card_path: Option<PathBuf>,
    /// The model file's fingerprint when scanned.
    pub fingerprint: Fingerprint,
}

/// Refuses a model name that is not one plain folder name of the repository (the rules
/// are `aviary::names`'): a name from a request is joined into a path, so `..`,
/// separators, an absolute path or a NUL would reach outside the repository.
pub fn check_model_name(model: &str) -> Result<(), WorkerError> {
    match aviary::names::model_name_problem(model) {
        Some(reason) => Err(WorkerError::invalid(format!(
            "model: {model:?} is not a model name: {reason} (a model is a folder of the repository)"
        ))),
        None => Ok(()),
    }
}

/// The entry of one version folder, or a load error saying what is missing.
pub fn version_entry(root: &Path, model: &str, version: u64) -> Result<VersionEntry, WorkerError> {
    check_model_name(model)?;
    let dir = root.join(model).join(version.to_string());
    let model_path = dir.join(MODEL_FILE);
    let fingerprint = Fingerprint::of(&model_path).map_err(|e| WorkerError::Load {
        path: model_path.clone(),
        reason: e.to_string(),
    })?;
    let card_path = Some(dir.join(CARD_FILE)).filter(|p| p.is_file());
    Ok(VersionEntry {
        model: model.to_owned(),
        version,
        model_path,
        fingerprint: fingerprint.with_card(card_path.as_deref()),
        card_path,
    })
}

/// Lists every `<model>/<version>/model.onnx` under `root`, sorted by model then
/// version. Folders whose name is not a number, hidden entries and version folders
/// without a model file are skipped (with a log line), as Triton does.
pub fn scan(root: &Path) -> Result<Vec<VersionEntry>, WorkerError> {
    let read = |path: &Path| {
        fs::read_dir(path).map_err(|e| WorkerError::Load {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    };
    let mut entries = Vec::new();
    for model_dir in read(root)? {
        let model_dir = model_dir.map_err(|e| WorkerError::Load {
            path: root.to_owned(),
            reason: e.to_string(),
        })?;
        let Some(model) = visible_dir_name(&model_dir.path()) else {
            continue;
        };
        if let Some(reason) = aviary::names::model_name_problem(&model) {
            tracing::warn!(path = %model_dir.path().display(), reason, "skipping a folder whose name is not a model name");
            continue;
        }
        for version_dir in read(&model_dir.path())? {
            let Ok(version_dir) = version_dir else {
                continue;
            };
            let path = version_dir.path();
            let Some(name) = visible_dir_name(&path) else {
                continue;
            };
            let Ok(version) = name.parse::<u64>() else {
                tracing::debug!(path = %path.display(), "skipping non-numeric version folder");
                continue;
            };
            let model_path = path.join(MODEL_FILE);
            let Ok(fingerprint) = Fingerprint::of(&model_path) else {
                tracing::debug!(path = %path.display(), "version folder has no {MODEL_FILE}; skipping");
                continue;
            };
            let card_path = Some(path.join(CARD_FILE)).filter(|p| p.is_file());
            entries.push(VersionEntry {
                model: model.clone(),
                version,
                model_path,
                fingerprint: fingerprint.with_card(card_path.as_deref()),
                card_path,
            });
        }
    }
    entries.sort_by(|a, b| (&a.model, a.version).cmp(&(&b.model, b.version)));
    Ok(entries)
}

fn visible_dir_name(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    (!name.starts_with('.') && path.is_dir()).then(|| name.to_owned())
}

/// Reads and parses a model card.
pub fn read_card(path: &Path) -> Result<ModelCard, WorkerError> {
    let text = fs::read_to_string(path).map_err(|e| WorkerError::Load {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e| WorkerError::Load {
        path: path.to_owned(),
        reason: format!("invalid model card: {e}"),
    })
}

/// The file a model card names beside its model: `name` must be a plain file name in
/// `folder` (no folder part, not absolute, not `.` or `..`), so a card (which a client
/// may supply with RepositoryModelLoad) can never make the worker read another file.
/// `key` names the card key for the error.
pub fn file_beside(folder: &Path, name: &str, key: &str) -> Result<PathBuf, String> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0');
    if !plain {
        return Err(format!(
            "model card: {key}: {name:?} must be the name of a file beside the model file \
             (no folder part)"
        ));
    }
    Ok(folder.join(name))
}

/// Writes a file a client supplied with RepositoryModelLoad into `<root>/<model>/<version>/`:
/// first beside it under a temporary name, then renamed over it, so a scan never sees
/// half a file and a failed write leaves the old one.
pub fn write_supplied(
    root: &Path,
    model: &str,
    file: &crate::load_request::SuppliedFile,
) -> Result<(), WorkerError> {
    use std::io::Write;
    let folder = root.join(model).join(file.version.to_string());
    let target = folder.join(file.name);
    let failed = |e: std::io::Error| WorkerError::Load {
        path: target.clone(),
        reason: format!("writing the supplied file: {e}"),
    };
    fs::create_dir_all(&folder).map_err(failed)?;
    // Unique per write, so concurrent loads never write into one temporary file.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temporary = folder.join(format!(
        ".{}.supplied-{}-{n}",
        file.name,
        std::process::id()
    ));
    let written = fs::File::create_new(&temporary).and_then(|mut out| {
        out.write_all(&file.bytes)?;
        out.sync_all()
    });
    if let Err(e) = written.and_then(|()| fs::rename(&temporary, &target)) {
        let _ = fs::remove_file(&temporary);
        return Err(failed(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_formats_need_an_image_input() {
        use crate::schema::{ModelSchema, TensorSpec};
        use aviary::tensor::Datatype;
        let spec = |name: &str, shape: &[i64]| TensorSpec {
            name: name.into(),
            datatype: Datatype::Fp32,
            shape: shape.to_vec(),
        };
        let schema = ModelSchema {
            inputs: vec![
                spec("image", &[3, 224, 224]),
                spec("batch", &[-1, 224, 224, 3]),
                spec("table", &[-1, 4]),
            ],
            outputs: Vec::new(),
        };
        let formats = |pairs: &[(&str, InputFormat)]| -> BTreeMap<String, InputFormat> {
            pairs.iter().map(|(n, f)| ((*n).to_owned(), *f)).collect()
        };
        assert!(
            InputFormat::check_all(
                &formats(&[("image", InputFormat::Nchw), ("batch", InputFormat::Nhwc)]),
                &schema
            )
            .is_ok()
        );
        let refused = InputFormat::check_all(&formats(&[("table", InputFormat::Nchw)]), &schema)
            .expect_err("not an image");
        assert!(
            refused.starts_with("model card: formats.table: Nchw needs an image input"),
            "{refused}"
        );
        let refused = InputFormat::check_all(&formats(&[("pixels", InputFormat::Nchw)]), &schema)
            .expect_err("no such input");
        assert!(refused.contains("no input \"pixels\""), "{refused}");
        let card: ModelCard = toml::from_str("[formats]\nimage = \"NCHW\"\n").expect("a card");
        assert_eq!(card.formats.get("image"), Some(&InputFormat::Nchw));
    }

    #[test]
    fn names_that_leave_the_repository_are_refused() {
        for bad in ["", "..", ".", "../x", "/etc", "a/b", "a\\b", "x\0y"] {
            let error = check_model_name(bad).expect_err(bad).to_string();
            assert!(error.starts_with("model: "), "{bad:?}: {error}");
        }
        for good in ["demo", "mlp", "a.b", "my-model_2"] {
            check_model_name(good).unwrap_or_else(|e| panic!("{good:?}: {e}"));
        }
    }

    #[test]
    fn scan_finds_numeric_versions_and_cards() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let root = dir.path();
        for (model, version) in [
            ("b", "10"),
            ("b", "2"),
            ("a", "1"),
            ("a", "latest"),
            (".hidden", "1"),
        ] {
            fs::create_dir_all(root.join(model).join(version))?;
            fs::write(root.join(model).join(version).join(MODEL_FILE), b"x")?;
        }
        fs::create_dir_all(root.join("a/3"))?; // no model file
        fs::write(
            root.join("a/1").join(CARD_FILE),
            "owner = \"ml\"\n[metrics]\naccuracy = 0.9\n",
        )?;

        let found: Vec<(String, u64, bool)> = scan(root)?
            .into_iter()
            .map(|e| (e.model, e.version, e.card_path.is_some()))
            .collect();
        assert_eq!(
            found,
            vec![
                ("a".into(), 1, true),
                ("b".into(), 2, false),
                ("b".into(), 10, false)
            ]
        );
        let card = read_card(&root.join("a/1").join(CARD_FILE))?;
        assert_eq!(card.owner, "ml");
        assert_eq!(card.metrics.get("accuracy"), Some(&0.9));
        Ok(())
    }

    #[test]
    fn card_with_unknown_key_is_a_load_error() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(CARD_FILE);
        fs::write(&path, "ownr = \"typo\"\n")?;
        let err = read_card(&path).expect_err("unknown key must be rejected");
        assert!(err.to_string().contains("ownr"), "{err}");
        Ok(())
    }

    #[test]
    fn registry_keys_are_checked_as_the_card_is_read() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(CARD_FILE);
        fs::write(
            &path,
            "semver = \"2.1.0-rc.1+build.5\"\n[lineage]\ntraining_run = \"r1\"\n",
        )?;
        let card = read_card(&path)?;
        assert_eq!(
            card.semver.map(|v| v.to_string()).as_deref(),
            Some("2.1.0-rc.1+build.5")
        );
        for (text, named) in [
            ("semver = \"2.1\"\n", "semver"),
            ("sha256 = \"abc\"\n", "not a SHA-256"),
            ("[lineage]\nrun = \"x\"\n", "run"),
        ] {
            fs::write(&path, text)?;
            let err = read_card(&path).expect_err("refused");
            assert!(err.to_string().contains(named), "{text}: {err}");
        }
        Ok(())
    }

    #[test]
    fn missing_repository_is_a_load_error() {
        let err = scan(Path::new("/definitely/not/here")).expect_err("missing folder");
        assert!(err.to_string().contains("/definitely/not/here"), "{err}");
    }
}
