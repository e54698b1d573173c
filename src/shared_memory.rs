//! Triton's system shared memory extension: a client registers a region of POSIX
//! shared memory (`shm_open` key, offset, size) on the server's host, then names it in
//! an input's or a requested output's parameters instead of sending the bytes; the
//! server reads the input from the region and writes the output into it.
//!
//! Regions are read and written through their files under `/dev/shm` (where Linux
//! keeps POSIX shared memory), opened once at registration as `shm_open` opens them
//! (no symlink followed, never blocking) and only when they are regular files, then
//! read and written at positions through that handle: no mapping, so no `unsafe`, and
//! a region that shrank under us is an error, not a crash. What one request reads is
//! held to the server's message limit, as if it had been sent. Every server that takes
//! requests (a gateway, a standalone worker) holds its own registry: regions are per
//! process, as in Triton. [`Registry::take_inputs`] turns a request's shared-memory
//! inputs into raw contents before anything else sees it; [`Registry::place_outputs`]
//! writes the outputs asked for into their regions.

use std::{
    collections::BTreeMap,
    fs::File,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::PathBuf,
    sync::{Arc, PoisonError, RwLock},
};

use bytes::Bytes;

use crate::parameters::{SHARED_MEMORY_BYTE_SIZE, SHARED_MEMORY_OFFSET, SHARED_MEMORY_REGION};
use crate::pb::inference::{
    InferParameter, ModelInferRequest, ModelInferResponse, SystemSharedMemoryRegisterRequest,
    SystemSharedMemoryRegisterResponse, SystemSharedMemoryStatusRequest,
    SystemSharedMemoryStatusResponse, SystemSharedMemoryUnregisterRequest,
    SystemSharedMemoryUnregisterResponse, infer_parameter::ParameterChoice,
    system_shared_memory_status_response::RegionStatus,
};

/// Where Linux keeps POSIX shared memory objects.
const SHM_ROOT: &str = "/dev/shm";

/// Why a shared memory call or a request naming a region was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SharedMemoryError {
    /// The request is wrong: INVALID_ARGUMENT.
    #[error("{0}")]
    Invalid(String),
    /// No region of that name: NOT_FOUND.
    #[error("Unable to find system shared memory region: '{0}'")]
    Unknown(String),
    /// A region of that name exists: ALREADY_EXISTS.
    #[error("shared memory region '{0}' already in manager")]
    Exists(String),
    /// Reading or writing the region failed: INTERNAL.
    #[error("{0}")]
    Io(String),
}

impl SharedMemoryError {
    /// The gRPC code a client gets.
    pub fn code(&self) -> tonic::Code {
        match self {
            SharedMemoryError::Invalid(_) => tonic::Code::InvalidArgument,
            SharedMemoryError::Unknown(_) => tonic::Code::NotFound,
            SharedMemoryError::Exists(_) => tonic::Code::AlreadyExists,
            SharedMemoryError::Io(_) => tonic::Code::Internal,
        }
    }
}

impl From<SharedMemoryError> for tonic::Status {
    fn from(error: SharedMemoryError) -> tonic::Status {
        tonic::Status::new(error.code(), error.to_string())
    }
}

/// One registered region, its object open since registration.
#[derive(Debug, Clone)]
struct Region {
    key: String,
    offset: u64,
    byte_size: u64,
    file: Arc<File>,
}

/// A server's registered regions.
#[derive(Debug)]
pub struct Registry {
    regions: RwLock<BTreeMap<String, Region>>,
    /// Most bytes one request may read from regions: the server's message limit.
    max_request_bytes: u64,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new(crate::server::DEFAULT_MAX_MESSAGE_BYTES as u64)
    }
}

/// An output to write into a region once the response is there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputPlacement {
    output: String,
    region: String,
    offset: u64,
    byte_size: u64,
}

/// Where a tensor's parameters put it, if they name a region.
struct Placement {
    region: String,
    offset: u64,
    byte_size: u64,
}

impl Registry {
    /// An empty registry whose requests may read at most `max_request_bytes` from
    /// regions (the server's message limit).
    pub fn new(max_request_bytes: u64) -> Registry {
        Registry {
            regions: RwLock::default(),
            max_request_bytes,
        }
    }

    /// Registers `name` for `byte_size` bytes at `offset` of the shared memory object
    /// `key` (as `shm_open` names it: `/name`).
    pub fn register(
        &self,
        name: &str,
        key: &str,
        offset: u64,
        byte_size: u64,
    ) -> Result<(), SharedMemoryError> {
        if name.is_empty() {
            return Err(SharedMemoryError::Invalid(
                "name: a region needs a name".into(),
            ));
        }
        let object = key.strip_prefix('/').unwrap_or(key);
        if object.is_empty() || object.contains('/') || object == "." || object == ".." {
            return Err(SharedMemoryError::Invalid(format!(
                "key {key:?}: not a POSIX shared memory name (\"/name\", no other slash)"
            )));
        }
        let path = PathBuf::from(SHM_ROOT).join(object);
        let unable = |reason: String| {
            SharedMemoryError::Invalid(format!(
                "key {key:?}: unable to open shared memory region ({}: {reason}); the server \
                 must run on the same host as the client",
                path.display()
            ))
        };
        // As shm_open: never through a symlink, never waiting on a FIFO.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| unable(e.to_string()))?;
        let metadata = file.metadata().map_err(|e| unable(e.to_string()))?;
        if !metadata.is_file() {
            return Err(unable("not a shared memory object (a regular file)".into()));
        }
        let size = metadata.len();
        let end = offset.checked_add(byte_size);
        if end.is_none_or(|end| end > size) {
            return Err(SharedMemoryError::Invalid(format!(
                "offset {offset} + byte_size {byte_size}: past the end of {key:?} ({size} bytes)"
            )));
        }
        let mut regions = self.regions.write().unwrap_or_else(PoisonError::into_inner);
        if regions.contains_key(name) {
            return Err(SharedMemoryError::Exists(name.to_owned()));
        }
        regions.insert(
            name.to_owned(),
            Region {
                key: key.to_owned(),
                offset,
                byte_size,
                file: Arc::new(file),
            },
        );
        Ok(())
    }

    /// Unregisters `name`, or every region when it is empty. Unregistering a name
    /// that is not registered does nothing, as in Triton.
    pub fn unregister(&self, name: &str) {
        let mut regions = self.regions.write().unwrap_or_else(PoisonError::into_inner);
        if name.is_empty() {
            regions.clear();
        } else {
            regions.remove(name);
        }
    }

    /// The status of `name`, or of every region when it is empty.
    pub fn status(
        &self,
        name: &str,
    ) -> Result<SystemSharedMemoryStatusResponse, SharedMemoryError> {
        let regions = self.regions.read().unwrap_or_else(PoisonError::into_inner);
        let status = |(name, region): (&String, &Region)| {
            (
                name.clone(),
                RegionStatus {
                    name: name.clone(),
                    key: region.key.clone(),
                    offset: region.offset,
                    byte_size: region.byte_size,
                },
            )
        };
        let listed = if name.is_empty() {
            regions.iter().map(status).collect()
        } else {
            let region = regions
                .get_key_value(name)
                .ok_or_else(|| SharedMemoryError::Unknown(name.to_owned()))?;
            [status(region)].into()
        };
        Ok(SystemSharedMemoryStatusResponse { regions: listed })
    }

    /// Reads every input of `request` that names a region into its raw contents, and
    /// takes the shared-memory parameters off its inputs and requested outputs; returns
    /// where the outputs go. A request that names no region is left as it is.
    pub fn take_inputs(
        &self,
        request: &mut ModelInferRequest,
    ) -> Result<Vec<OutputPlacement>, SharedMemoryError> {
        let names_region = |p: &std::collections::HashMap<String, InferParameter>| {
            [
                SHARED_MEMORY_REGION,
                SHARED_MEMORY_OFFSET,
                SHARED_MEMORY_BYTE_SIZE,
            ]
            .iter()
            .any(|k| p.contains_key(*k))
        };
        let inputs_named = request.inputs.iter().any(|i| names_region(&i.parameters));
        let outputs_named = request.outputs.iter().any(|o| names_region(&o.parameters));
        if !inputs_named && !outputs_named {
            return Ok(Vec::new());
        }
        if inputs_named {
            // The raw contents list only the inputs that are not in shared memory, in
            // order; rebuilt with one entry per input.
            let mut sent = std::mem::take(&mut request.raw_input_contents).into_iter();
            let any_raw = sent.len() > 0;
            let mut raw = Vec::with_capacity(request.inputs.len());
            let mut read = 0u64;
            for input in &mut request.inputs {
                let place = format!("input \"{}\"", input.name);
                match placement(&mut input.parameters, &place)? {
                    Some(at) => {
                        read = read.saturating_add(at.byte_size);
                        if read > self.max_request_bytes {
                            return Err(SharedMemoryError::Invalid(format!(
                                "{place}: the request's inputs in shared memory take {read} \
                                 bytes or more, over the server's message limit of {} bytes",
                                self.max_request_bytes
                            )));
                        }
                        raw.push(Bytes::from(self.read(&at, &place)?));
                    }
                    None if any_raw => raw.push(sent.next().ok_or_else(|| {
                        SharedMemoryError::Invalid(format!(
                            "{place}: no raw_input_contents entry left for it (entries are \
                             given for the inputs not in shared memory, in order)"
                        ))
                    })?),
                    None => {
                        return Err(SharedMemoryError::Invalid(format!(
                            "{place}: with inputs in shared memory, the others go in \
                             raw_input_contents"
                        )));
                    }
                }
            }
            if sent.next().is_some() {
                return Err(SharedMemoryError::Invalid(
                    "raw_input_contents has more entries than the inputs not in shared memory"
                        .into(),
                ));
            }
            request.raw_input_contents = raw;
        }
        let mut outputs = Vec::new();
        for output in &mut request.outputs {
            let place = format!("output \"{}\"", output.name);
            if let Some(at) = placement(&mut output.parameters, &place)? {
                self.region(&at.region)?;
                outputs.push(OutputPlacement {
                    output: output.name.clone(),
                    region: at.region,
                    offset: at.offset,
                    byte_size: at.byte_size,
                });
            }
        }
        Ok(outputs)
    }

    /// Writes the outputs `placements` name into their regions, leaving each an empty
    /// raw entry and the region's parameters, as Triton answers.
    pub fn place_outputs(
        &self,
        response: &mut ModelInferResponse,
        placements: &[OutputPlacement],
    ) -> Result<(), SharedMemoryError> {
        for placement in placements {
            let place = format!("output \"{}\"", placement.output);
            let index = response
                .outputs
                .iter()
                .position(|o| o.name == placement.output)
                .ok_or_else(|| SharedMemoryError::Io(format!("{place}: not in the answer")))?;
            let raw = response
                .raw_output_contents
                .get_mut(index)
                .map(std::mem::take)
                .ok_or_else(|| {
                    SharedMemoryError::Io(format!("{place}: the answer has no raw contents for it"))
                })?;
            if raw.len() as u64 > placement.byte_size {
                return Err(SharedMemoryError::Invalid(format!(
                    "shared memory size specified with the request for {place} should be at \
                     least {} bytes (shared_memory_byte_size {})",
                    raw.len(),
                    placement.byte_size
                )));
            }
            let at = Placement {
                region: placement.region.clone(),
                offset: placement.offset,
                byte_size: raw.len() as u64,
            };
            self.write(&at, &raw, &place)?;
            let parameters = &mut response.outputs[index].parameters;
            parameters.insert(SHARED_MEMORY_REGION.into(), text(&placement.region));
            parameters.insert(SHARED_MEMORY_OFFSET.into(), number(placement.offset));
            parameters.insert(SHARED_MEMORY_BYTE_SIZE.into(), number(raw.len() as u64));
        }
        Ok(())
    }

    fn region(&self, name: &str) -> Result<Region, SharedMemoryError> {
        self.regions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
            .ok_or_else(|| SharedMemoryError::Unknown(name.to_owned()))
    }

    /// The region of `at` and the absolute position of `at` in its object, checked to
    /// lie inside the region and inside the object as it is now (it may have shrunk).
    fn locate(&self, at: &Placement, place: &str) -> Result<(Region, u64), SharedMemoryError> {
        let region = self.region(&at.region)?;
        let end = at.offset.checked_add(at.byte_size);
        if end.is_none_or(|end| end > region.byte_size) {
            return Err(SharedMemoryError::Invalid(format!(
                "{place}: offset {} + byte_size {} is past the end of region '{}' ({} bytes)",
                at.offset, at.byte_size, at.region, region.byte_size
            )));
        }
        let position = region.offset + at.offset;
        let size = region
            .file
            .metadata()
            .map_err(|e| SharedMemoryError::Io(format!("region '{}': {e}", at.region)))?
            .len();
        if position + at.byte_size > size {
            return Err(SharedMemoryError::Invalid(format!(
                "{place}: region '{}' shrank: its object holds {size} bytes now",
                at.region
            )));
        }
        Ok((region, position))
    }

    fn read(&self, at: &Placement, place: &str) -> Result<Vec<u8>, SharedMemoryError> {
        let (region, position) = self.locate(at, place)?;
        // Held to the message limit by the caller, so it fits in memory and a usize.
        let mut bytes = vec![0u8; usize::try_from(at.byte_size).unwrap_or(usize::MAX)];
        region
            .file
            .read_exact_at(&mut bytes, position)
            .map_err(|e| {
                SharedMemoryError::Io(format!("{place}: reading region '{}': {e}", at.region))
            })?;
        Ok(bytes)
    }

    fn write(&self, at: &Placement, bytes: &[u8], place: &str) -> Result<(), SharedMemoryError> {
        let (region, position) = self.locate(at, place)?;
        region.file.write_all_at(bytes, position).map_err(|e| {
            SharedMemoryError::Io(format!("{place}: writing region '{}': {e}", at.region))
        })
    }
}

/// Takes a tensor's shared-memory parameters off it; `None` when it names no region.
fn placement(
    parameters: &mut std::collections::HashMap<String, InferParameter>,
    place: &str,
) -> Result<Option<Placement>, SharedMemoryError> {
    let region = parameters.remove(SHARED_MEMORY_REGION);
    let offset = parameters.remove(SHARED_MEMORY_OFFSET);
    let size = parameters.remove(SHARED_MEMORY_BYTE_SIZE);
    let Some(region) = region else {
        if offset.is_some() || size.is_some() {
            return Err(SharedMemoryError::Invalid(format!(
                "{place}: shared_memory_offset or shared_memory_byte_size without \
                 shared_memory_region"
            )));
        }
        return Ok(None);
    };
    let Some(ParameterChoice::StringParam(region)) = region.parameter_choice else {
        return Err(SharedMemoryError::Invalid(format!(
            "{place}: shared_memory_region must be a string"
        )));
    };
    let whole =
        |value: Option<InferParameter>, name: &str| match value.and_then(|v| v.parameter_choice) {
            None => Ok(None),
            Some(ParameterChoice::Int64Param(n)) if n >= 0 => Ok(Some(n as u64)),
            Some(ParameterChoice::Uint64Param(n)) => Ok(Some(n)),
            Some(_) => Err(SharedMemoryError::Invalid(format!(
                "{place}: {name} must be a whole number ≥ 0"
            ))),
        };
    let offset = whole(offset, SHARED_MEMORY_OFFSET)?.unwrap_or(0);
    let byte_size = whole(size, SHARED_MEMORY_BYTE_SIZE)?.ok_or_else(|| {
        SharedMemoryError::Invalid(format!(
            "{place}: shared_memory_region needs shared_memory_byte_size"
        ))
    })?;
    Ok(Some(Placement {
        region,
        offset,
        byte_size,
    }))
}

fn text(value: &str) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::StringParam(value.to_owned())),
    }
}

fn number(value: u64) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::Int64Param(
            i64::try_from(value).unwrap_or(i64::MAX),
        )),
    }
}

impl Registry {
    /// The SystemSharedMemoryStatus RPC.
    pub fn status_call(
        &self,
        request: tonic::Request<SystemSharedMemoryStatusRequest>,
    ) -> Result<tonic::Response<SystemSharedMemoryStatusResponse>, tonic::Status> {
        Ok(tonic::Response::new(
            self.status(&request.into_inner().name)?,
        ))
    }

    /// The SystemSharedMemoryRegister RPC.
    pub fn register_call(
        &self,
        request: tonic::Request<SystemSharedMemoryRegisterRequest>,
    ) -> Result<tonic::Response<SystemSharedMemoryRegisterResponse>, tonic::Status> {
        let request = request.into_inner();
        self.register(
            &request.name,
            &request.key,
            request.offset,
            request.byte_size,
        )?;
        Ok(tonic::Response::new(SystemSharedMemoryRegisterResponse {}))
    }

    /// The SystemSharedMemoryUnregister RPC.
    pub fn unregister_call(
        &self,
        request: tonic::Request<SystemSharedMemoryUnregisterRequest>,
    ) -> Result<tonic::Response<SystemSharedMemoryUnregisterResponse>, tonic::Status> {
        self.unregister(&request.into_inner().name);
        Ok(tonic::Response::new(
            SystemSharedMemoryUnregisterResponse {},
        ))
    }
}

/// The answer to every CUDA shared memory RPC: Aviary runs on CPUs.
pub fn cuda_unimplemented() -> tonic::Status {
    tonic::Status::unimplemented(
        "CUDA shared memory is not supported: Aviary runs models on CPU; use system shared \
         memory (SystemSharedMemoryRegister) or send tensors in the request",
    )
}

#[cfg(test)]
mod tests;
