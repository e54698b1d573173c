//! An S3 or S3-compatible bucket as a model source (`[[bucket]]`).
//!
//! The bucket holds versions as the repository does, under a prefix:
//! `<prefix>/<model>/<version>/model.onnx`, with the version's card (`model.toml`) and
//! any other file it names beside it. Every `poll_interval_ms` the gateway lists the
//! prefix. A version whose `model.onnx` is there and which the repository does not
//! have is downloaded, every file of it, into a hidden folder of the model
//! (`.bucket-<version>.partial`, which the repository never loads). Each file is
//! fetched with the object's ETag as a precondition, so bytes of two different uploads
//! never mix, and its length is checked against the listing. The model file's SHA-256
//! is checked against the card's `sha256` when the card states one. Only then is the
//! folder renamed into place as `<repository>/<model>/<version>/` and the version
//! loaded: a version is whole or absent, whatever fails or however the gateway stops.
//!
//! A download cut short (the store down, the gateway killed) keeps what it has: the
//! next look resumes each file from its length with a ranged GET, unless the object
//! changed since (its ETag differs), which starts that file again. A version refused
//! (its SHA-256 is not the card's, or the model does not load) is not fetched again
//! until its `model.onnx` changes in the bucket.
//!
//! The store being down is logged and changes nothing: the gateway keeps serving what
//! it has. Removing a version from the bucket does not unload it.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path as FsPath, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use aviary_worker::{
    registry::{Sha256, check_file},
    repository::{CARD_FILE, read_card},
};
use futures::{StreamExt, TryStreamExt};
use object_store::{
    ClientOptions, GetOptions, GetRange, ObjectMeta, ObjectStore, RetryConfig,
    aws::AmazonS3Builder, path::Path,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256 as Hasher};
use tokio::{
    io::{AsyncSeekExt, AsyncWriteExt},
    sync::watch,
};

use super::{SourceError, common_problems, look_every};
use crate::{GatewayError, control::Control};

/// The model file a version must have to be taken.
const MODEL_FILE: &str = "model.onnx";

/// What a partial download was started from, kept beside it to resume it.
pub const MANIFEST_FILE: &str = ".aviary-download.json";

/// `[[bucket]]`: a bucket (and prefix) of an S3 or S3-compatible store, as a source
/// of versions of the models under it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketConfig {
    /// `s3://bucket` or `s3://bucket/prefix`.
    pub url: String,
    /// The store's address for an S3-compatible server (MinIO, Ceph, moto), e.g.
    /// `http://minio:9000`; default: AWS S3 for the region.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The region (default: `AWS_REGION`, else us-east-1).
    #[serde(default)]
    pub region: Option<String>,
    /// A TOML file with `access_key_id`, `secret_access_key` and optionally
    /// `session_token`; default: AWS's usual chain (the `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY` environment, web identity, ECS, instance metadata).
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// Only these models are taken from the bucket; default: every model in it.
    #[serde(default)]
    pub models: Vec<String>,
    /// How often the bucket is listed, in milliseconds (default 30000).
    #[serde(default = "super::default_poll_interval_ms")]
    pub poll_interval_ms: u64,
}

/// A `credentials_file`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Credentials {
    access_key_id: String,
    secret_access_key: String,
    #[serde(default)]
    session_token: Option<String>,
}

impl BucketConfig {
    /// The bucket and the prefix (without slashes at either end) of `url`.
    pub fn bucket_and_prefix(&self) -> Result<(String, String), String> {
        let rest = self
            .url
            .strip_prefix("s3://")
            .ok_or_else(|| format!("\"{}\" is not an s3:// URL", self.url))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!("\"{}\" names no bucket", self.url));
        }
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty()
            && let Err(e) = Path::parse(prefix)
        {
            return Err(format!(
                "\"{}\": the prefix is not an object path: {e}",
                self.url
            ));
        }
        Ok((bucket.to_owned(), prefix.to_owned()))
    }

    /// The store this source reads, its requests bounded so a store that is down
    /// costs a look seconds, not minutes.
    fn store(&self) -> Result<Arc<dyn ObjectStore>, SourceError> {
        let (bucket, _) = self.bucket_and_prefix().map_err(SourceError::Invalid)?;
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_retry(RetryConfig {
                max_retries: 2,
                retry_timeout: Duration::from_secs(10),
                ..RetryConfig::default()
            })
            // A large file may take long; a stalled one is cut and resumed later.
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(600)),
            );
        if let Some(endpoint) = &self.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        if let Some(region) = &self.region {
            builder = builder.with_region(region);
        }
        if let Some(file) = &self.credentials_file {
            let credentials = read_credentials(file)?;
            builder = builder
                .with_access_key_id(credentials.access_key_id)
                .with_secret_access_key(credentials.secret_access_key);
            if let Some(token) = credentials.session_token {
                builder = builder.with_token(token);
            }
        }
        let store = builder
            .build()
            .map_err(|e| SourceError::Invalid(format!("bucket {}: {e}", self.url)))?;
        Ok(Arc::new(store))
    }
}

fn read_credentials(file: &FsPath) -> Result<Credentials, SourceError> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| SourceError::Invalid(format!("{}: {e}", file.display())))?;
    toml::from_str(&text).map_err(|e| SourceError::Invalid(format!("{}: {e}", file.display())))
}

/// What is wrong with the `[[bucket]]` sources, each with its path; `repository`
/// is `[repository]`.
pub fn problems(
    sources: &[BucketConfig],
    repository: Option<&crate::config::RepositoryConfig>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (i, source) in sources.iter().enumerate() {
        let path = format!("bucket[{i}]");
        problems.extend(common_problems(
            &path,
            repository.is_some(),
            source.poll_interval_ms,
        ));
        if let Err(why) = source.bucket_and_prefix() {
            problems.push(format!("{path}.url: {why}"));
        }
        if let Some(endpoint) = &source.endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            problems.push(format!(
                "{path}.endpoint: \"{endpoint}\" is not an http:// or https:// address"
            ));
        }
        if let Some(file) = &source.credentials_file
            && let Err(error) = read_credentials(file)
        {
            problems.push(format!("{path}.credentials_file: {error}"));
        }
        for model in &source.models {
            if let Some(why) = aviary::names::model_name_problem(model) {
                problems.push(format!(
                    "{path}.models: \"{model}\" is not a model name: {why}"
                ));
            }
        }
    }
    problems
}

/// One object of a version in the bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Object {
    /// Its key in the bucket, as listed (fetched as is, never encoded again).
    pub key: String,
    /// Its path below the version's folder (`model.onnx`, `data/reference.json`).
    pub file: String,
    /// Its length in bytes.
    pub size: u64,
    /// Its ETag, when the store gives one.
    pub e_tag: Option<String>,
}

/// A version in the bucket: its objects, by their path below the version's folder.
pub type BucketVersion = BTreeMap<String, Object>;

/// The versions under `prefix` in a listing, by model and version number: those with
/// a `model.onnx`, of models `wanted` (all when empty). Objects outside the layout
/// (a bad model name, a version that is not a number, a hidden or `..` part) are
/// left out; the reasons are returned to be logged.
pub fn versions_in(
    listing: &[ObjectMeta],
    prefix: &str,
    wanted: &[String],
) -> (BTreeMap<(String, u64), BucketVersion>, BTreeSet<String>) {
    let mut versions: BTreeMap<(String, u64), BucketVersion> = BTreeMap::new();
    let mut skipped = BTreeSet::new();
    for meta in listing {
        let key = meta.location.as_ref();
        let below = match prefix.is_empty() {
            true => Some(key),
            false => key
                .strip_prefix(prefix)
                .and_then(|rest| rest.strip_prefix('/')),
        };
        let Some(below) = below else { continue };
        let mut parts = below.splitn(3, '/');
        let (Some(model), Some(version), Some(file)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if !wanted.is_empty() && !wanted.iter().any(|m| m == model) {
            continue;
        }
        if let Some(why) = aviary::names::model_name_problem(model) {
            skipped.insert(format!("{key}: \"{model}\" is not a model name: {why}"));
            continue;
        }
        let number = version
            .parse::<u64>()
            .ok()
            .filter(|n| n.to_string() == version);
        let Some(number) = number else {
            skipped.insert(format!(
                "{key}: \"{version}\" is not a version number (versions are folders named 1, 2, …)"
            ));
            continue;
        };
        if file
            .split('/')
            .any(|part| part.is_empty() || part.starts_with('.'))
        {
            continue;
        }
        versions
            .entry((model.to_owned(), number))
            .or_default()
            .insert(
                file.to_owned(),
                Object {
                    key: key.to_owned(),
                    file: file.to_owned(),
                    size: meta.size,
                    e_tag: meta.e_tag.clone(),
                },
            );
    }
    versions.retain(|_, objects| objects.contains_key(MODEL_FILE));
    (versions, skipped)
}

/// Where a file's download starts: from its first byte, or from `offset` (what the
/// partial file already holds of the same object).
pub fn resume_from(have: Option<u64>, started_as: Option<&Object>, now: &Object) -> u64 {
    match (have, started_as) {
        // The same object (its ETag unchanged) and no longer than it: go on.
        (Some(have), Some(then)) if then == now && now.e_tag.is_some() && have <= now.size => have,
        _ => 0,
    }
}

/// One `[[bucket]]` source over a repository.
#[derive(Debug)]
pub struct BucketSource {
    config: BucketConfig,
    store: Arc<dyn ObjectStore>,
    prefix: String,
    repository: PathBuf,
    /// Versions refused (checksum, load), with their objects as they were then: not
    /// fetched again until one of them changes.
    refused: Mutex<BTreeMap<(String, u64), BucketVersion>>,
    /// Listing problems already logged (each is logged once).
    said: Mutex<BTreeSet<String>>,
    /// The start of this source's partial folders' names: `.bucket-<url hash>-`, so
    /// two sources never share or remove each other's downloads.
    partial_prefix: String,
}

impl BucketSource {
    /// `config`'s source, writing versions into `repository`.
    pub fn new(config: BucketConfig, repository: PathBuf) -> Result<BucketSource, GatewayError> {
        let store = config.store()?;
        BucketSource::over(config, store, repository)
    }

    /// The source reading `store` (which must be `config`'s bucket).
    pub fn over(
        config: BucketConfig,
        store: Arc<dyn ObjectStore>,
        repository: PathBuf,
    ) -> Result<BucketSource, GatewayError> {
        let (_, prefix) = config.bucket_and_prefix().map_err(SourceError::Invalid)?;
        let hash = blake3::hash(config.url.as_bytes()).to_hex();
        let partial_prefix = format!(".bucket-{}-", &hash[..12]);
        Ok(BucketSource {
            partial_prefix,
            config,
            store,
            prefix,
            repository,
            refused: Mutex::new(BTreeMap::new()),
            said: Mutex::new(BTreeSet::new()),
        })
    }

    /// The versions in the bucket now.
    pub async fn list(&self) -> Result<BTreeMap<(String, u64), BucketVersion>, SourceError> {
        let prefix =
            match self.prefix.is_empty() {
                true => None,
                false => Some(Path::parse(&self.prefix).map_err(|e| {
                    SourceError::Invalid(format!("bucket {}: {e}", self.config.url))
                })?),
            };
        let listing: Vec<ObjectMeta> = self
            .store
            .list(prefix.as_ref())
            .try_collect()
            .await
            .map_err(|e| unreachable(&self.config.url, e))?;
        let (versions, skipped) = versions_in(&listing, &self.prefix, &self.config.models);
        let mut said = self.said.lock().unwrap_or_else(PoisonError::into_inner);
        for why in skipped {
            if said.insert(why.clone()) {
                tracing::warn!(
                    bucket = self.config.url,
                    why,
                    "bucket source: object left out"
                );
            }
        }
        Ok(versions)
    }

    /// One look at the bucket: every version the repository lacks is fetched and
    /// loaded. Returns the versions loaded; the first failure, after trying them all.
    pub async fn poll(&self, control: &Control) -> Result<Vec<(String, u64)>, GatewayError> {
        let versions = self.list().await?;
        self.forget_gone_downloads(&versions).await;
        let inventory = control.worker().map(|w| w.inventory()).unwrap_or_default();
        let mut loaded = Vec::new();
        let mut first_error = None;
        for ((model, number), objects) in versions {
            let version = number.to_string();
            let has = inventory.get(&model).is_some_and(|v| v.contains(&version));
            let folder = self.repository.join(&model).join(&version);
            if has || folder.exists() || self.was_refused(&model, number, &objects) {
                continue;
            }
            match self.bring(control, &model, number, &objects).await {
                Ok(()) => loaded.push((model, number)),
                Err(error) => {
                    tracing::warn!(bucket = self.config.url, model, version, %error, "bucket source: version not taken");
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(error) if loaded.is_empty() => Err(error),
            _ => Ok(loaded),
        }
    }

    /// Removes the partial downloads of versions no longer in the bucket (deleted
    /// while a download was cut short): nothing would ever resume them.
    async fn forget_gone_downloads(&self, versions: &BTreeMap<(String, u64), BucketVersion>) {
        let Ok(mut models) = tokio::fs::read_dir(&self.repository).await else {
            return;
        };
        while let Ok(Some(model)) = models.next_entry().await {
            let Ok(mut entries) = tokio::fs::read_dir(model.path()).await else {
                continue;
            };
            let model_name = model.file_name().to_string_lossy().into_owned();
            while let Ok(Some(entry)) = entries.next_entry().await {
                let name = entry.file_name().to_string_lossy().into_owned();
                let number = name
                    .strip_prefix(self.partial_prefix.as_str())
                    .and_then(|rest| rest.strip_suffix(".partial"))
                    .and_then(|n| n.parse::<u64>().ok());
                if let Some(number) = number
                    && !versions.contains_key(&(model_name.clone(), number))
                {
                    let _ = tokio::fs::remove_dir_all(entry.path()).await;
                }
            }
        }
    }

    /// Fetches and loads one version.
    async fn bring(
        &self,
        control: &Control,
        model: &str,
        number: u64,
        objects: &BucketVersion,
    ) -> Result<(), GatewayError> {
        let version = number.to_string();
        if let Err(error) = self.fetch(model, number, objects).await {
            if matches!(error, SourceError::Invalid(_)) {
                self.refuse(model, number, objects);
            }
            return Err(error.into());
        }
        match control.load_version(model, &version).await {
            Ok(_) => {
                tracing::info!(
                    bucket = self.config.url,
                    model,
                    version,
                    "version from the bucket loaded"
                );
                Ok(())
            }
            // The model itself does not load: not left loadable for the next start.
            Err(error @ GatewayError::Worker(_)) => {
                self.refuse(model, number, objects);
                let _ = tokio::fs::remove_dir_all(self.repository.join(model).join(&version)).await;
                Err(error)
            }
            Err(error) => Err(error),
        }
    }

    /// Downloads `objects` into the model's hidden partial folder, resuming what an
    /// earlier try left, verifies them and renames the folder into place.
    pub async fn fetch(
        &self,
        model: &str,
        number: u64,
        objects: &BucketVersion,
    ) -> Result<PathBuf, SourceError> {
        let partial = self.partial_folder(model, number);
        let folder = self.repository.join(model).join(number.to_string());
        let result = self
            .fetch_into(&partial, &folder, model, number, objects)
            .await;
        // What the store did not finish giving is resumed at the next look; anything
        // else (a file that cannot be whole, a failed check, the disk) starts over.
        if let Err(error) = &result
            && !matches!(
                error,
                SourceError::Unreachable(_) | SourceError::NotFound(_)
            )
        {
            let _ = tokio::fs::remove_dir_all(&partial).await;
        }
        result.map(|()| folder)
    }

    /// [`BucketSource::fetch`]'s steps, into `partial` and then renamed to `folder`.
    async fn fetch_into(
        &self,
        partial: &FsPath,
        folder: &FsPath,
        model: &str,
        number: u64,
        objects: &BucketVersion,
    ) -> Result<(), SourceError> {
        let offsets = self.prepare(partial, objects).await?;
        for (object, offset) in objects.values().zip(offsets) {
            self.download(object, &partial.join(&object.file), offset)
                .await?;
        }
        verify(partial, model, number).await?;
        drop_stage(&partial.join(CARD_FILE), model, number).await?;
        let storage = |path: &FsPath, e: std::io::Error| {
            SourceError::Storage(format!("{}: {e}", path.display()))
        };
        let manifest = partial.join(MANIFEST_FILE);
        tokio::fs::remove_file(&manifest)
            .await
            .map_err(|e| storage(&manifest, e))?;
        tokio::fs::rename(partial, folder)
            .await
            .map_err(|e| storage(folder, e))
    }

    /// `<model>/<partial prefix><number>.partial`: where `number` is downloaded.
    pub fn partial_folder(&self, model: &str, number: u64) -> PathBuf {
        self.repository
            .join(model)
            .join(format!("{}{number}.partial", self.partial_prefix))
    }

    /// Readies the partial folder for `objects`: every local file that cannot be
    /// resumed (its object changed, or it is no longer listed) is removed before the
    /// manifest of `objects` is written and synced, so a download cut short at any
    /// point resumes only bytes of the objects the manifest names. Returns where each
    /// object's download starts, in `objects`' order.
    async fn prepare(
        &self,
        partial: &FsPath,
        objects: &BucketVersion,
    ) -> Result<Vec<u64>, SourceError> {
        let storage =
            |e: std::io::Error| SourceError::Storage(format!("{}: {e}", partial.display()));
        tokio::fs::create_dir_all(partial).await.map_err(storage)?;
        let manifest = partial.join(MANIFEST_FILE);
        let started: BucketVersion = tokio::fs::read(&manifest)
            .await
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        let _ = tokio::fs::remove_file(&manifest).await;
        let root = partial.to_owned();
        let present = tokio::task::spawn_blocking(move || files_below(&root))
            .await
            .map_err(|e| SourceError::Storage(e.to_string()))?;
        for file in present {
            if !objects.contains_key(&file) {
                tokio::fs::remove_file(partial.join(&file))
                    .await
                    .map_err(storage)?;
            }
        }
        let mut offsets = Vec::with_capacity(objects.len());
        for object in objects.values() {
            let local = partial.join(&object.file);
            let have = tokio::fs::metadata(&local).await.ok().map(|m| m.len());
            let offset = resume_from(have, started.get(&object.file), object);
            if offset == 0 && have.is_some() {
                tokio::fs::remove_file(&local).await.map_err(storage)?;
            }
            offsets.push(offset);
        }
        let json = serde_json::to_vec(objects).map_err(|e| SourceError::Storage(e.to_string()))?;
        let mut file = tokio::fs::File::create(&manifest).await.map_err(storage)?;
        file.write_all(&json).await.map_err(storage)?;
        file.sync_all().await.map_err(storage)?;
        Ok(offsets)
    }

    /// Downloads `object` into `local` from byte `offset` (what it already holds);
    /// returns the bytes fetched. The object's ETag is the GET's precondition, so an
    /// object replaced meanwhile is never mixed into what was fetched of the old one.
    pub async fn download(
        &self,
        object: &Object,
        local: &FsPath,
        offset: u64,
    ) -> Result<u64, SourceError> {
        let storage = |e: std::io::Error| SourceError::Storage(format!("{}: {e}", local.display()));
        if let Some(parent) = local.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(storage)?;
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(offset == 0)
            .open(local)
            .await
            .map_err(storage)?;
        file.set_len(offset).await.map_err(storage)?;
        if offset == object.size {
            return Ok(0);
        }
        let key = &object.key;
        let location = Path::parse(key)
            .map_err(|e| SourceError::Invalid(format!("bucket {}: {key}: {e}", self.config.url)))?;
        let options = GetOptions {
            range: (offset > 0).then_some(GetRange::Offset(offset)),
            if_match: object.e_tag.clone(),
            ..GetOptions::default()
        };
        let answer = self
            .store
            .get_opts(&location, options)
            .await
            .map_err(|e| match e {
                // The object was replaced since the listing: the next look lists it
                // anew, and its new ETag starts the file again.
                object_store::Error::Precondition { .. } => SourceError::Unreachable(format!(
                    "{key} changed while it was being fetched; it is fetched again"
                )),
                object_store::Error::NotFound { .. } => {
                    SourceError::NotFound(format!("{key} is gone from the bucket"))
                }
                other => unreachable(&self.config.url, other),
            })?;
        let mut stream = answer.into_stream();
        let mut fetched = 0u64;
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(storage)?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| unreachable(&self.config.url, e))?;
            file.write_all(&chunk).await.map_err(storage)?;
            fetched += chunk.len() as u64;
        }
        file.sync_all().await.map_err(storage)?;
        let length = offset + fetched;
        if length != object.size {
            return Err(SourceError::Invalid(format!(
                "{key}: {length} bytes arrived, the listing says {}",
                object.size
            )));
        }
        Ok(fetched)
    }

    fn was_refused(&self, model: &str, number: u64, objects: &BucketVersion) -> bool {
        let refused = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
        refused
            .get(&(model.to_owned(), number))
            .is_some_and(|then| then == objects)
    }

    fn refuse(&self, model: &str, number: u64, objects: &BucketVersion) {
        self.refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((model.to_owned(), number), objects.clone());
    }

    /// Lists every `poll_interval_ms` until `stop` turns true; failures are logged.
    pub async fn run(self, control: Arc<Control>, stop: watch::Receiver<bool>) {
        let interval = Duration::from_millis(self.config.poll_interval_ms);
        let (this, control) = (&self, &control);
        look_every(interval, stop, || async move {
            let result = this.poll(control).await;
            if let Err(error) = &result {
                tracing::warn!(bucket = this.config.url, %error, "bucket source: nothing changed");
            }
            result.is_ok()
        })
        .await;
    }
}

fn unreachable(url: &str, error: object_store::Error) -> SourceError {
    SourceError::Unreachable(format!("bucket {url}: {error}"))
}

/// Checks a downloaded version: its card, when it has one, must parse, and the model
/// file's SHA-256 must be the one the card states.
async fn verify(partial: &FsPath, model: &str, number: u64) -> Result<(), SourceError> {
    let card_path = partial.join(CARD_FILE);
    let stated = match card_path.exists() {
        true => {
            read_card(&card_path)
                .map_err(|e| SourceError::Invalid(format!("{model} version {number}: {e}")))?
                .sha256
        }
        false => None,
    };
    let Some(stated) = stated else {
        return Ok(());
    };
    let file = partial.join(MODEL_FILE);
    let actual = tokio::task::spawn_blocking(move || sha256_of(&file))
        .await
        .map_err(|e| SourceError::Storage(e.to_string()))?
        .map_err(|e| SourceError::Storage(e.to_string()))?;
    check_file(&actual, Some(&stated))
        .map_err(|why| SourceError::Invalid(format!("{model} version {number}: {why}")))
}

/// Removes `stage` and `approval` from a fetched card: approval is given on this
/// gateway (`aviary ctl approve`), never by whoever can write to the bucket.
async fn drop_stage(card: &FsPath, model: &str, number: u64) -> Result<(), SourceError> {
    let Ok(text) = tokio::fs::read_to_string(card).await else {
        return Ok(());
    };
    let mut table: toml::Table = toml::from_str(&text)
        .map_err(|e| SourceError::Invalid(format!("{model} version {number}: {e}")))?;
    let dropped: Vec<_> = ["stage", "approval"]
        .into_iter()
        .filter(|key| table.remove(*key).is_some())
        .collect();
    if dropped.is_empty() {
        return Ok(());
    }
    tracing::warn!(
        model,
        version = number,
        ?dropped,
        "bucket source: a fetched card's stage is not taken; approve the version here"
    );
    let text = toml::to_string(&table).map_err(|e| SourceError::Invalid(e.to_string()))?;
    tokio::fs::write(card, text)
        .await
        .map_err(|e| SourceError::Storage(format!("{}: {e}", card.display())))
}

/// The files below `root` (the manifest aside), as paths relative to it with `/`.
fn files_below(root: &FsPath) -> Vec<String> {
    let mut files = Vec::new();
    let mut folders = vec![root.to_owned()];
    while let Some(folder) = folders.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                folders.push(path);
            } else if let Ok(relative) = path.strip_prefix(root) {
                let relative = relative.to_string_lossy().into_owned();
                if relative != MANIFEST_FILE {
                    files.push(relative);
                }
            }
        }
    }
    files
}

/// The SHA-256 of a file, read in pieces.
fn sha256_of(path: &FsPath) -> std::io::Result<Sha256> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Hasher::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(Sha256::of_digest(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use object_store::{PutPayload, memory::InMemory};

    use super::*;

    fn config(url: &str) -> BucketConfig {
        toml::from_str(&format!("url = \"{url}\"")).expect("a bucket config")
    }

    fn meta(key: &str, size: u64) -> ObjectMeta {
        ObjectMeta {
            location: Path::from(key),
            last_modified: Default::default(),
            size,
            e_tag: Some(format!("\"{key}\"")),
            version: None,
        }
    }

    #[test]
    fn urls_give_the_bucket_and_the_prefix() {
        let of = |url: &str| config(url).bucket_and_prefix();
        assert_eq!(of("s3://models"), Ok(("models".into(), String::new())));
        assert_eq!(
            of("s3://models/prod/iris/"),
            Ok(("models".into(), "prod/iris".into()))
        );
        assert!(of("https://models").is_err());
        assert!(of("s3:///prod").is_err());
        assert!(of("s3://models/../etc").is_err());
    }

    #[test]
    fn a_listing_gives_the_versions_with_a_model_file() {
        let listing = [
            meta("prod/iris/1/model.onnx", 10),
            meta("prod/iris/1/model.toml", 2),
            meta("prod/iris/1/data/reference.json", 3),
            meta("prod/iris/1/.hidden", 3),
            // Not yet whole: the card is there, the model file not.
            meta("prod/iris/2/model.toml", 2),
            meta("prod/iris/latest/model.onnx", 10),
            meta("prod/iris/01/model.onnx", 10),
            meta("prod/bad name/1/model.onnx", 10),
            meta("prod/other/3/model.onnx", 10),
            meta("prod/README", 1),
            meta("production/iris/9/model.onnx", 10),
        ];
        let (versions, skipped) = versions_in(&listing, "prod", &[]);
        let keys: Vec<_> = versions.keys().cloned().collect();
        assert_eq!(keys, [("iris".into(), 1), ("other".into(), 3)]);
        let files: Vec<_> = versions[&("iris".into(), 1)].keys().cloned().collect();
        assert_eq!(files, ["data/reference.json", "model.onnx", "model.toml"]);
        assert_eq!(skipped.len(), 3, "{skipped:#?}");
        assert!(
            skipped
                .iter()
                .any(|s| s.contains("\"01\" is not a version number"))
        );
        assert!(
            skipped
                .iter()
                .any(|s| s.contains("\"latest\" is not a version number"))
        );
        assert!(
            skipped
                .iter()
                .any(|s| s.contains("\"bad name\" is not a model name"))
        );
        let (only, _) = versions_in(&listing, "prod", &["other".into()]);
        assert_eq!(
            only.keys().cloned().collect::<Vec<_>>(),
            [("other".into(), 3)]
        );
        let (unprefixed, _) = versions_in(&[meta("iris/4/model.onnx", 1)], "", &[]);
        assert!(unprefixed.contains_key(&("iris".into(), 4)));
    }

    #[test]
    fn a_download_resumes_only_the_same_object() {
        let object = Object {
            key: "prod/iris/1/model.onnx".into(),
            file: "model.onnx".into(),
            size: 100,
            e_tag: Some("\"a\"".into()),
        };
        let replaced = Object {
            e_tag: Some("\"b\"".into()),
            ..object.clone()
        };
        let untagged = Object {
            e_tag: None,
            ..object.clone()
        };
        assert_eq!(resume_from(Some(40), Some(&object), &object), 40);
        assert_eq!(resume_from(Some(100), Some(&object), &object), 100);
        assert_eq!(resume_from(None, Some(&object), &object), 0);
        assert_eq!(resume_from(Some(40), None, &object), 0, "no manifest");
        assert_eq!(resume_from(Some(40), Some(&replaced), &object), 0);
        assert_eq!(resume_from(Some(140), Some(&object), &object), 0);
        assert_eq!(resume_from(Some(40), Some(&untagged), &untagged), 0);
    }

    #[test]
    fn problems_name_their_field() {
        let mut bad = config("gs://models");
        bad.endpoint = Some("minio:9000".into());
        bad.models = vec!["bad name".into()];
        bad.poll_interval_ms = 5;
        bad.credentials_file = Some("/nonexistent/credentials.toml".into());
        let found = problems(&[bad], None);
        crate::sources::assert_named(
            &found,
            &[
                "bucket[0]: needs [repository]",
                "bucket[0].url: \"gs://models\" is not an s3:// URL",
                "bucket[0].endpoint: \"minio:9000\" is not an http:// or https:// address",
                "bucket[0].credentials_file: /nonexistent/credentials.toml",
                "bucket[0].models: \"bad name\" is not a model name",
                "bucket[0].poll_interval_ms: 5",
            ],
        );
        let repository: crate::config::RepositoryConfig =
            toml::from_str("path = \"models\"").expect("a repository");
        assert!(problems(&[config("s3://models/prod")], Some(&repository)).is_empty());
    }

    /// A source over an in-memory bucket holding `files` of iris version 1 under
    /// `prod/`, writing into `repository`.
    async fn source_over(
        files: &[(&str, &[u8])],
        repository: &FsPath,
    ) -> (BucketSource, BucketVersion) {
        let store = Arc::new(InMemory::new());
        for (file, bytes) in files {
            let key = Path::from(format!("prod/iris/1/{file}"));
            store
                .put(&key, PutPayload::from(bytes.to_vec()))
                .await
                .expect("put");
        }
        let source = BucketSource::over(config("s3://models/prod"), store, repository.to_owned())
            .expect("a source");
        let mut versions = source.list().await.expect("listed");
        let version = versions.remove(&("iris".into(), 1)).expect("iris 1");
        (source, version)
    }

    fn model_bytes() -> Vec<u8> {
        (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect()
    }

    #[tokio::test]
    async fn a_download_cut_short_is_resumed_from_where_it_stopped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let bytes = model_bytes();
        let card = format!(
            "sha256 = \"{}\"\nstage = \"production\"\n",
            Sha256::of(&bytes)
        );
        let (source, version) = source_over(
            &[("model.onnx", &bytes), ("model.toml", card.as_bytes())],
            dir.path(),
        )
        .await;
        // What a download cut short left: the manifest and the first part of the file.
        let partial = source.partial_folder("iris", 1);
        std::fs::create_dir_all(&partial).expect("partial folder");
        std::fs::write(
            partial.join(MANIFEST_FILE),
            serde_json::to_vec(&version).expect("json"),
        )
        .expect("manifest");
        let kept = 123_456;
        std::fs::write(partial.join("model.onnx"), &bytes[..kept]).expect("part");
        let object = &version["model.onnx"];
        let have = std::fs::metadata(partial.join("model.onnx"))
            .expect("part")
            .len();
        let offset = resume_from(Some(have), Some(object), object);
        assert_eq!(offset, kept as u64);
        let fetched = source
            .download(object, &partial.join("model.onnx"), offset)
            .await
            .expect("resumed");
        assert_eq!(
            fetched,
            (bytes.len() - kept) as u64,
            "only the rest is fetched"
        );
        // The whole fetch finds the model file complete, takes the card and renames.
        let folder = source.fetch("iris", 1, &version).await.expect("fetched");
        assert_eq!(folder, dir.path().join("iris/1"));
        let card = read_card(&folder.join(CARD_FILE)).expect("the card");
        assert_eq!(card.sha256, Some(Sha256::of(&bytes)));
        assert_eq!(card.stage, None, "a bucket's card approves nothing");
        assert_eq!(
            std::fs::read(folder.join("model.onnx")).expect("model"),
            bytes
        );
        assert!(!partial.exists());
        assert!(!folder.join(MANIFEST_FILE).exists());
    }

    #[tokio::test]
    async fn a_file_that_is_not_the_cards_never_becomes_a_version() {
        let dir = tempfile::tempdir().expect("temp dir");
        let bytes = model_bytes();
        let card = format!("sha256 = \"{}\"\n", Sha256::of(&bytes));
        // A truncated upload: half the file under the whole file's card.
        let (source, version) = source_over(
            &[
                ("model.onnx", &bytes[..bytes.len() / 2]),
                ("model.toml", card.as_bytes()),
            ],
            dir.path(),
        )
        .await;
        let error = source
            .fetch("iris", 1, &version)
            .await
            .expect_err("refused");
        assert!(matches!(error, SourceError::Invalid(_)), "{error:?}");
        assert!(
            error.to_string().contains("its card states sha256"),
            "{error}"
        );
        assert!(!dir.path().join("iris/1").exists());
        assert!(
            !source.partial_folder("iris", 1).exists(),
            "nothing of it is kept"
        );
    }

    #[tokio::test]
    async fn the_download_of_a_version_gone_from_the_bucket_is_removed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (source, version) = source_over(&[("model.onnx", b"onnx")], dir.path()).await;
        let gone = source.partial_folder("iris", 7);
        let kept = source.partial_folder("iris", 1);
        let others = dir.path().join("iris/.bucket-0123456789ab-7.partial");
        for partial in [&gone, &kept, &others] {
            std::fs::create_dir_all(partial).expect("partial folder");
        }
        let listed = BTreeMap::from([(("iris".to_owned(), 1), version)]);
        source.forget_gone_downloads(&listed).await;
        assert!(!gone.exists());
        assert!(kept.exists(), "a version still listed resumes later");
        assert!(others.exists(), "another source's download is its own");
    }

    #[tokio::test]
    async fn an_object_replaced_since_the_partial_download_is_fetched_again() {
        let dir = tempfile::tempdir().expect("temp dir");
        let bytes = model_bytes();
        let (source, version) = source_over(&[("model.onnx", &bytes)], dir.path()).await;
        let partial = source.partial_folder("iris", 1);
        std::fs::create_dir_all(&partial).expect("partial folder");
        let mut stale = version.clone();
        stale.get_mut("model.onnx").expect("model").e_tag = Some("\"old\"".into());
        std::fs::write(
            partial.join(MANIFEST_FILE),
            serde_json::to_vec(&stale).expect("json"),
        )
        .expect("manifest");
        std::fs::write(partial.join("model.onnx"), vec![7u8; 5000]).expect("old part");
        std::fs::write(partial.join("extra.bin"), b"no longer listed").expect("old file");
        // A look cut short right after it readied the folder: the old bytes are gone
        // before the new manifest could make them look like the new object's.
        source.prepare(&partial, &version).await.expect("readied");
        assert!(!partial.join("model.onnx").exists());
        assert!(!partial.join("extra.bin").exists());
        let folder = source.fetch("iris", 1, &version).await.expect("fetched");
        assert_eq!(
            std::fs::read(folder.join("model.onnx")).expect("model"),
            bytes
        );
        assert!(!folder.join("extra.bin").exists());
    }
}
