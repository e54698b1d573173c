use super::*;
use crate::pb::inference::{
    model_infer_request::{InferInputTensor, InferRequestedOutputTensor},
    model_infer_response::InferOutputTensor,
};

/// A POSIX shared memory object of `size` bytes, removed when dropped.
struct Object(String);

impl Object {
    fn new(tag: &str, size: usize) -> Object {
        let name = format!("aviary-test-{tag}-{}", std::process::id());
        std::fs::write(PathBuf::from(SHM_ROOT).join(&name), vec![0u8; size]).expect("/dev/shm");
        Object(name)
    }

    fn key(&self) -> String {
        format!("/{}", self.0)
    }

    fn bytes(&self) -> Vec<u8> {
        std::fs::read(PathBuf::from(SHM_ROOT).join(&self.0)).expect("read back")
    }

    fn write(&self, at: u64, bytes: &[u8]) {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(PathBuf::from(SHM_ROOT).join(&self.0))
            .expect("open");
        file.write_all_at(bytes, at).expect("write");
    }
}

impl Drop for Object {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(PathBuf::from(SHM_ROOT).join(&self.0));
    }
}

fn in_region(
    region: &str,
    offset: i64,
    size: i64,
) -> std::collections::HashMap<String, InferParameter> {
    [
        (SHARED_MEMORY_REGION.to_owned(), text(region)),
        (
            SHARED_MEMORY_OFFSET.to_owned(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(offset)),
            },
        ),
        (
            SHARED_MEMORY_BYTE_SIZE.to_owned(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(size)),
            },
        ),
    ]
    .into()
}

#[test]
fn regions_register_list_and_unregister() {
    let object = Object::new("registry", 64);
    let registry = Registry::default();
    registry.register("in", &object.key(), 8, 32).expect("fits");
    assert_eq!(
        registry.register("in", &object.key(), 0, 8),
        Err(SharedMemoryError::Exists("in".into()))
    );
    let refused = registry
        .register("big", &object.key(), 40, 32)
        .expect_err("past the end");
    assert!(
        refused
            .to_string()
            .starts_with("offset 40 + byte_size 32: past the end"),
        "{refused}"
    );
    let refused = registry
        .register("x", "/no-such-aviary-object", 0, 1)
        .expect_err("missing");
    assert!(
        refused
            .to_string()
            .contains("unable to open shared memory region"),
        "{refused}"
    );
    let refused = registry.register("x", "/a/b", 0, 1).expect_err("a path");
    assert!(
        refused
            .to_string()
            .contains("not a POSIX shared memory name"),
        "{refused}"
    );
    let status = registry.status("").expect("all");
    assert_eq!(status.regions["in"].byte_size, 32);
    assert_eq!(
        registry.status("nope"),
        Err(SharedMemoryError::Unknown("nope".into()))
    );
    registry.unregister("in");
    assert!(registry.status("").expect("all").regions.is_empty());
}

#[test]
fn inputs_are_read_from_regions_and_outputs_written_to_them() {
    let object = Object::new("io", 64);
    object.write(4, &[1, 2, 3, 4]);
    let registry = Registry::default();
    registry.register("r", &object.key(), 4, 60).expect("fits");
    let mut request = ModelInferRequest {
        inputs: vec![
            InferInputTensor {
                name: "a".into(),
                parameters: in_region("r", 0, 4),
                ..Default::default()
            },
            InferInputTensor {
                name: "b".into(),
                ..Default::default()
            },
        ],
        outputs: vec![InferRequestedOutputTensor {
            name: "y".into(),
            parameters: in_region("r", 16, 8),
        }],
        raw_input_contents: vec![Bytes::from_static(&[9, 9])],
        ..Default::default()
    };
    let placements = registry.take_inputs(&mut request).expect("resolved");
    assert_eq!(
        request.raw_input_contents,
        vec![
            Bytes::from_static(&[1, 2, 3, 4]),
            Bytes::from_static(&[9, 9])
        ]
    );
    assert!(request.inputs[0].parameters.is_empty() && request.outputs[0].parameters.is_empty());
    let mut response = ModelInferResponse {
        outputs: vec![InferOutputTensor {
            name: "y".into(),
            ..Default::default()
        }],
        raw_output_contents: vec![Bytes::from_static(&[7, 7, 7])],
        ..Default::default()
    };
    registry
        .place_outputs(&mut response, &placements)
        .expect("written");
    assert_eq!(&object.bytes()[20..23], &[7, 7, 7]);
    assert!(response.raw_output_contents[0].is_empty());
    assert_eq!(
        response.outputs[0].parameters[SHARED_MEMORY_REGION],
        text("r")
    );
    // An output larger than its place says how much it needs.
    let mut small = placements.clone();
    small[0].byte_size = 2;
    response.raw_output_contents[0] = Bytes::from_static(&[1, 2, 3]);
    let refused = registry
        .place_outputs(&mut response, &small)
        .expect_err("too small");
    assert!(
        refused.to_string().contains("should be at least 3 bytes"),
        "{refused}"
    );
}

#[test]
fn requests_naming_regions_wrongly_are_refused() {
    let object = Object::new("wrong", 16);
    let registry = Registry::default();
    registry.register("r", &object.key(), 0, 16).expect("fits");
    let request = |parameters| ModelInferRequest {
        inputs: vec![InferInputTensor {
            name: "a".into(),
            parameters,
            ..Default::default()
        }],
        ..Default::default()
    };
    for (parameters, says) in [
        (
            in_region("r", 8, 16),
            "input \"a\": offset 8 + byte_size 16 is past the end",
        ),
        (
            in_region("nope", 0, 4),
            "Unable to find system shared memory region: 'nope'",
        ),
        (
            [(SHARED_MEMORY_OFFSET.to_owned(), text("0"))].into(),
            "input \"a\": shared_memory_offset or shared_memory_byte_size without",
        ),
    ] {
        let refused = registry
            .take_inputs(&mut request(parameters))
            .expect_err("refused");
        assert!(refused.to_string().starts_with(says), "{refused}");
    }
}

#[test]
fn only_regular_objects_are_registered_never_through_a_link() {
    let registry = Registry::default();
    let target = Object::new("target", 16);
    let link = format!("aviary-test-link-{}", std::process::id());
    let link_path = PathBuf::from(SHM_ROOT).join(&link);
    let _ = std::fs::remove_file(&link_path);
    std::os::unix::fs::symlink(PathBuf::from(SHM_ROOT).join(&target.0), &link_path)
        .expect("a symlink");
    let refused = registry
        .register("l", &format!("/{link}"), 0, 8)
        .expect_err("a symlink");
    let _ = std::fs::remove_file(&link_path);
    assert!(
        refused
            .to_string()
            .contains("unable to open shared memory region"),
        "{refused}"
    );

    let fifo = format!("aviary-test-fifo-{}", std::process::id());
    let fifo_path = PathBuf::from(SHM_ROOT).join(&fifo);
    let _ = std::fs::remove_file(&fifo_path);
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo_path)
        .status()
        .expect("mkfifo runs");
    assert!(made.success());
    // Refused at once: opening never waits for a writer.
    let refused = registry
        .register("f", &format!("/{fifo}"), 0, 0)
        .expect_err("a FIFO");
    let _ = std::fs::remove_file(&fifo_path);
    assert!(
        refused.to_string().contains("not a shared memory object"),
        "{refused}"
    );

    for key in ["/.", "/..", "", "/"] {
        assert!(registry.register("k", key, 0, 0).is_err(), "{key:?}");
    }
}

#[test]
fn a_region_whose_object_shrank_is_an_error_and_reads_are_held_to_the_limit() {
    let object = Object::new("shrink", 64);
    let registry = Registry::new(16);
    registry.register("r", &object.key(), 0, 64).expect("fits");
    let mut request = ModelInferRequest {
        inputs: vec![InferInputTensor {
            name: "a".into(),
            parameters: in_region("r", 0, 32),
            ..Default::default()
        }],
        ..Default::default()
    };
    let refused = registry
        .take_inputs(&mut request.clone())
        .expect_err("over 16 bytes");
    assert!(
        refused
            .to_string()
            .contains("over the server's message limit of 16 bytes"),
        "{refused}"
    );
    let registry = Registry::default();
    registry.register("r", &object.key(), 0, 64).expect("fits");
    std::fs::OpenOptions::new()
        .write(true)
        .open(PathBuf::from(SHM_ROOT).join(&object.0))
        .and_then(|f| f.set_len(8))
        .expect("shrunk");
    let refused = registry.take_inputs(&mut request).expect_err("shrank");
    assert!(
        refused.to_string().contains("region 'r' shrank"),
        "{refused}"
    );
}
