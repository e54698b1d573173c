//! Compiles `proto/` into Rust with protox (a pure-Rust protobuf compiler, so no
//! `protoc` is needed on the machine) and tonic-prost-build, and writes the encoded
//! descriptor set that server reflection serves.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &["proto/inference.proto", "proto/aviary/admin/v1/admin.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("aviary_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        // Tensor payloads stay `Bytes` so the gateway forwards them without copying.
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .bytes(".inference.ModelInferResponse.raw_output_contents")
        // Written by hand (src/contents.rs) so `bytes_contents` decodes into one buffer
        // instead of one allocation per element.
        .extern_path(
            ".inference.InferTensorContents",
            "crate::contents::InferTensorContents",
        )
        // prost's codec, but a request's tensor contents are decoded within a limit and
        // one over it is RESOURCE_EXHAUSTED (src/codec.rs).
        .codec_path("crate::codec::BoundedCodec")
        // `aviary ctl --json` prints the admin messages themselves.
        .type_attribute(
            ".aviary.admin.v1",
            "#[cfg_attr(feature = \"serde\", derive(serde::Serialize))]",
        )
        .compile_fds(descriptors)?;
    Ok(())
}
