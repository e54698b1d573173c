//! `inference.InferTensorContents`, written by hand instead of generated, so that its
//! `bytes_contents` decode into one buffer instead of one allocation per element.
//!
//! prost decodes `repeated bytes` into a `Vec<Vec<u8>>`: 24 bytes of `Vec` plus a heap
//! block of at least 32 bytes per element, before any of Aviary's code sees the
//! request. A message of one-byte strings (3 wire bytes each) grows ~19× that way, so
//! 30 MB on the wire became 560 MB in a worker even though validation refused it at
//! once. [`BytesElements`] keeps the elements in the v2 raw BYTES layout (a 4-byte
//! little-endian length before each), at most twice the wire size, and is what
//! validation decodes like `raw_input_contents`. Every other field decodes and encodes
//! exactly as the generated code did; the wire format is unchanged.

use std::fmt;

use bytes::{Buf, BufMut, Bytes};
use prost::{
    DecodeError, Message,
    encoding::{
        self, DecodeContext, WireType, encode_key, encode_varint, encoded_len_varint, key_len,
    },
};

use crate::tensor;

/// Field number of `bytes_contents` in `InferTensorContents`.
const BYTES_CONTENTS_TAG: u32 = 8;

/// Typed tensor contents; the repeated field that matches the tensor's datatype holds
/// the flattened, row-major elements.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct InferTensorContents {
    /// BOOL.
    pub bool_contents: Vec<bool>,
    /// INT8, INT16 and INT32.
    pub int_contents: Vec<i32>,
    /// INT64.
    pub int64_contents: Vec<i64>,
    /// UINT8, UINT16 and UINT32.
    pub uint_contents: Vec<u32>,
    /// UINT64.
    pub uint64_contents: Vec<u64>,
    /// FP32.
    pub fp32_contents: Vec<f32>,
    /// FP64.
    pub fp64_contents: Vec<f64>,
    /// BYTES.
    pub bytes_contents: BytesElements,
}

/// A list of byte strings in one buffer, in the v2 raw BYTES layout: each element is a
/// 4-byte little-endian length followed by its bytes.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct BytesElements {
    raw: Vec<u8>,
    len: usize,
}

impl BytesElements {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends one element. Elements of 4 GiB or more cannot be carried (the length
    /// prefix is 32 bits, and gRPC messages are far smaller); they are cut to 4 GiB - 1.
    pub fn push(&mut self, element: &[u8]) {
        let length = u32::try_from(element.len()).unwrap_or(u32::MAX);
        self.raw.extend_from_slice(&length.to_le_bytes());
        self.raw.extend_from_slice(&element[..length as usize]);
        self.len += 1;
    }

    /// The elements in the raw BYTES layout, as `raw_input_contents` carries them.
    pub fn as_raw(&self) -> &[u8] {
        &self.raw
    }

    /// Bytes of all elements together, without their length prefixes.
    pub fn payload_len(&self) -> usize {
        self.raw.len() - 4 * self.len
    }

    /// The elements, in order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        // Built only by `push`, so every prefix is whole and in bounds.
        tensor::BytesElementsIter::new(&self.raw).map_while(Result::ok)
    }
}

impl<B: AsRef<[u8]>> FromIterator<B> for BytesElements {
    fn from_iter<I: IntoIterator<Item = B>>(elements: I) -> BytesElements {
        let mut list = BytesElements::default();
        for element in elements {
            list.push(element.as_ref());
        }
        list
    }
}

impl fmt::Debug for BytesElements {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Like `Vec<Vec<u8>>` did, so test failures and logs read the same.
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Message for InferTensorContents {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encoding::bool::encode_packed(1, &self.bool_contents, buf);
        encoding::int32::encode_packed(2, &self.int_contents, buf);
        encoding::int64::encode_packed(3, &self.int64_contents, buf);
        encoding::uint32::encode_packed(4, &self.uint_contents, buf);
        encoding::uint64::encode_packed(5, &self.uint64_contents, buf);
        encoding::float::encode_packed(6, &self.fp32_contents, buf);
        encoding::double::encode_packed(7, &self.fp64_contents, buf);
        for element in self.bytes_contents.iter() {
            encode_key(BYTES_CONTENTS_TAG, WireType::LengthDelimited, buf);
            encode_varint(element.len() as u64, buf);
            buf.put_slice(element);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        const NAME: &str = "InferTensorContents";
        let (result, field) = match tag {
            1 => (
                encoding::bool::merge_repeated(wire_type, &mut self.bool_contents, buf, ctx),
                "bool_contents",
            ),
            2 => (
                encoding::int32::merge_repeated(wire_type, &mut self.int_contents, buf, ctx),
                "int_contents",
            ),
            3 => (
                encoding::int64::merge_repeated(wire_type, &mut self.int64_contents, buf, ctx),
                "int64_contents",
            ),
            4 => (
                encoding::uint32::merge_repeated(wire_type, &mut self.uint_contents, buf, ctx),
                "uint_contents",
            ),
            5 => (
                encoding::uint64::merge_repeated(wire_type, &mut self.uint64_contents, buf, ctx),
                "uint64_contents",
            ),
            6 => (
                encoding::float::merge_repeated(wire_type, &mut self.fp32_contents, buf, ctx),
                "fp32_contents",
            ),
            7 => (
                encoding::double::merge_repeated(wire_type, &mut self.fp64_contents, buf, ctx),
                "fp64_contents",
            ),
            BYTES_CONTENTS_TAG => {
                // Zero-copy when the buffer is tonic's (a slice of the received message);
                // the element lives only until it is appended to the one buffer.
                let mut element = Bytes::new();
                let result = encoding::bytes::merge(wire_type, &mut element, buf, ctx);
                if result.is_ok() {
                    self.bytes_contents.push(&element);
                }
                (result, "bytes_contents")
            }
            _ => return encoding::skip_field(wire_type, tag, buf, ctx),
        };
        result.map_err(|mut error| {
            error.push(NAME, field);
            error
        })
    }

    fn encoded_len(&self) -> usize {
        let bytes: usize = self
            .bytes_contents
            .iter()
            .map(|e| key_len(BYTES_CONTENTS_TAG) + encoded_len_varint(e.len() as u64) + e.len())
            .sum();
        encoding::bool::encoded_len_packed(1, &self.bool_contents)
            + encoding::int32::encoded_len_packed(2, &self.int_contents)
            + encoding::int64::encoded_len_packed(3, &self.int64_contents)
            + encoding::uint32::encoded_len_packed(4, &self.uint_contents)
            + encoding::uint64::encoded_len_packed(5, &self.uint64_contents)
            + encoding::float::encoded_len_packed(6, &self.fp32_contents)
            + encoding::double::encoded_len_packed(7, &self.fp64_contents)
            + bytes
    }

    fn clear(&mut self) {
        *self = InferTensorContents::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message prost generates from the same proto, to check the wire format
    /// against.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Generated {
        #[prost(bool, repeated, tag = "1")]
        bool_contents: Vec<bool>,
        #[prost(int32, repeated, tag = "2")]
        int_contents: Vec<i32>,
        #[prost(int64, repeated, tag = "3")]
        int64_contents: Vec<i64>,
        #[prost(uint32, repeated, tag = "4")]
        uint_contents: Vec<u32>,
        #[prost(uint64, repeated, tag = "5")]
        uint64_contents: Vec<u64>,
        #[prost(float, repeated, tag = "6")]
        fp32_contents: Vec<f32>,
        #[prost(double, repeated, tag = "7")]
        fp64_contents: Vec<f64>,
        #[prost(bytes = "vec", repeated, tag = "8")]
        bytes_contents: Vec<Vec<u8>>,
    }

    fn generated() -> Generated {
        Generated {
            bool_contents: vec![true, false],
            int_contents: vec![-1, 7],
            int64_contents: vec![i64::MIN, 3],
            uint_contents: vec![u32::MAX],
            uint64_contents: vec![u64::MAX, 0],
            fp32_contents: vec![1.5, -0.0],
            fp64_contents: vec![f64::MAX],
            bytes_contents: vec![b"".to_vec(), b"ab".to_vec(), vec![0xff; 300]],
        }
    }

    fn hand_written() -> InferTensorContents {
        let g = generated();
        InferTensorContents {
            bool_contents: g.bool_contents,
            int_contents: g.int_contents,
            int64_contents: g.int64_contents,
            uint_contents: g.uint_contents,
            uint64_contents: g.uint64_contents,
            fp32_contents: g.fp32_contents,
            fp64_contents: g.fp64_contents,
            bytes_contents: g.bytes_contents.iter().collect(),
        }
    }

    #[test]
    fn encodes_like_the_generated_message() {
        let ours = hand_written();
        assert_eq!(ours.encode_to_vec(), generated().encode_to_vec());
        assert_eq!(ours.encoded_len(), ours.encode_to_vec().len());
    }

    #[test]
    fn decodes_what_the_generated_message_encodes() {
        let wire = generated().encode_to_vec();
        let decoded = InferTensorContents::decode(&wire[..]).expect("valid message");
        assert_eq!(decoded, hand_written());
        let items: Vec<&[u8]> = decoded.bytes_contents.iter().collect();
        assert_eq!(items, vec![&b""[..], b"ab", &[0xff; 300][..]]);
        assert_eq!(decoded.bytes_contents.payload_len(), 302);
        assert_eq!(
            decoded.bytes_contents.as_raw(),
            &tensor::encode_bytes_elements(&items)[..]
        );
    }

    #[test]
    fn unpacked_numbers_and_unknown_fields_decode_too() {
        // int_contents 5 unpacked (tag 2, varint), then an unknown field 15 (varint).
        let wire = [0x10, 0x05, 0x78, 0x01];
        let decoded = InferTensorContents::decode(&wire[..]).expect("valid message");
        assert_eq!(decoded.int_contents, vec![5]);
    }

    #[test]
    fn truncated_bytes_are_a_decode_error_naming_the_field() {
        // bytes_contents says 5 bytes follow, 1 does.
        let error =
            InferTensorContents::decode(&[0x42, 0x05, b'x'][..]).expect_err("truncated element");
        assert!(error.to_string().contains("bytes_contents"), "{error}");
    }

    #[test]
    fn decoded_strings_cost_their_raw_layout_not_an_allocation_each() {
        let wire: Vec<u8> = (0..1000).flat_map(|_| [0x42, 0x01, b'x']).collect();
        let decoded = InferTensorContents::decode(&wire[..]).expect("valid message");
        assert_eq!(decoded.bytes_contents.len(), 1000);
        assert_eq!(decoded.bytes_contents.as_raw().len(), 5 * 1000);
    }
}
