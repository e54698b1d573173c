//! The codec of every gRPC service and client generated from `proto/`: tonic's prost
//! codec, except that each message is decoded within [`contents::decode_limit`], so a
//! request whose tensor contents would expand past it is refused before they are
//! decoded, with RESOURCE_EXHAUSTED naming the field and the limit (a message that
//! does not decode for another reason is INTERNAL, as with tonic's codec).

use std::marker::PhantomData;

use bytes::Buf;
use prost::Message;
use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::ProstEncoder;

use crate::contents;

/// Encodes `T` as tonic's prost codec does; decodes `U` within the decode limit.
#[derive(Debug, Clone, Copy)]
pub struct BoundedCodec<T, U>(PhantomData<fn(T) -> U>);

impl<T, U> Default for BoundedCodec<T, U> {
    fn default() -> Self {
        BoundedCodec(PhantomData)
    }
}

impl<T, U> Codec for BoundedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = BoundedDecoder<U>;

    fn encoder(&mut self) -> ProstEncoder<T> {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> BoundedDecoder<U> {
        BoundedDecoder(PhantomData)
    }
}

/// Decodes `U` with its tensor contents held to [`contents::decode_limit`].
#[derive(Debug, Clone, Copy)]
pub struct BoundedDecoder<U>(PhantomData<fn() -> U>);

impl<U: Message + Default> Decoder for BoundedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        decode_bounded(buf, contents::decode_limit()).map(Some)
    }
}

/// `U` from `buf`, its tensor contents held to `limit` bytes.
fn decode_bounded<U: Message + Default>(buf: impl Buf, limit: u64) -> Result<U, Status> {
    match contents::decode_within(limit, || U::decode(buf)) {
        (Ok(message), _) => Ok(message),
        (Err(_), Some(over)) => Err(Status::resource_exhausted(over.to_string())),
        (Err(error), None) => Err(Status::internal(error.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::inference::{
        InferTensorContents, ModelInferRequest, model_infer_request::InferInputTensor,
    };

    /// A request whose only input holds `int64_contents`.
    fn request(int64_contents: Vec<i64>) -> ModelInferRequest {
        ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![InferInputTensor {
                name: "x".into(),
                contents: Some(InferTensorContents {
                    int64_contents,
                    ..InferTensorContents::default()
                }),
                ..InferInputTensor::default()
            }],
            ..ModelInferRequest::default()
        }
    }

    #[test]
    fn messages_within_the_limit_decode_as_with_prost() {
        let small = request(vec![0, -1, i64::MAX]);
        let decoded: ModelInferRequest =
            decode_bounded(&small.encode_to_vec()[..], 24).expect("24 bytes fit");
        assert_eq!(decoded, small);
    }

    #[test]
    fn contents_over_the_limit_are_resource_exhausted_naming_field_and_limit() {
        // 1024 zeros: one wire byte each, 8 KiB decoded.
        let zeros = request(vec![0; 1024]);
        let status = decode_bounded::<ModelInferRequest>(&zeros.encode_to_vec()[..], 4096)
            .expect_err("over the limit");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert_eq!(
            status.message(),
            "the request's tensor contents decode to at least 8 KiB (with int64_contents), \
             over max_request_tensor_bytes = 4 KiB; send fewer elements, or raw_input_contents"
        );
    }

    #[test]
    fn a_malformed_message_is_internal_as_with_tonic() {
        // model_name says 5 bytes follow, 1 does.
        let status = decode_bounded::<ModelInferRequest>(&[0x0a, 0x05, b'm'][..], 1024)
            .expect_err("truncated");
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    }
}
