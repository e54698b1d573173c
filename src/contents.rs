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
//!
//! Packed varints expand too: a zero is one wire byte and 8 bytes as an `i64`, so 40 MB
//! of INT64 zeros became 320 MB (and a `Vec` grown by doubling reserves up to twice
//! that) before any admission check could see the request. So every field's decoded
//! size is counted against a budget while it decodes: [`decode_within`] gives one
//! message (a whole request) a limit for all its tensor contents together, and a
//! packed field's elements are counted (the bytes without the continuation bit) and
//! charged before any is decoded, so one over the limit is never decoded at all. The
//! servers' codec ([`crate::codec`]) decodes every message that way, within the
//! process-wide [`decode_limit`].

use std::{
    cell::Cell,
    fmt,
    sync::atomic::{AtomicU64, Ordering},
};

use bytes::{Buf, BufMut, Bytes};
use prost::{
    DecodeError, Message,
    encoding::{
        self, DecodeContext, WireType, decode_varint, encode_key, encode_varint,
        encoded_len_varint, key_len,
    },
};

use crate::tensor::{self, format_bytes};

/// Field number of `bytes_contents` in `InferTensorContents`.
const BYTES_CONTENTS_TAG: u32 = 8;

/// Default [`decode_limit`]: 256 MiB, a worker's default `max_request_tensor_bytes`.
pub const DEFAULT_DECODE_LIMIT: u64 = 256 << 20;

/// Process-wide because tonic makes a service's codec with `Default`, so a server has
/// no way to hand its codec a setting; see [`set_decode_limit`].
static DECODE_LIMIT: AtomicU64 = AtomicU64::new(DEFAULT_DECODE_LIMIT);

/// Sets the limit the codec of every gRPC service and client in this process holds
/// one message's tensor contents to, once decoded. A worker sets it to its
/// `max_request_tensor_bytes` when it opens: a request the per-request budget would
/// refuse anyway is refused before it is decoded. The last call wins.
pub fn set_decode_limit(bytes: u64) {
    DECODE_LIMIT.store(bytes, Ordering::Relaxed);
}

/// The limit [`set_decode_limit`] set ([`DEFAULT_DECODE_LIMIT`] before any call).
pub fn decode_limit() -> u64 {
    DECODE_LIMIT.load(Ordering::Relaxed)
}

/// Tensor contents that would have decoded past a message's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverLimit {
    /// The field whose elements did not fit.
    pub field: &'static str,
    /// Bytes the message's contents would have taken with them, at least.
    pub needed: u64,
    /// The limit, in bytes.
    pub limit: u64,
}

impl fmt::Display for OverLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the request's tensor contents decode to at least {} (with {}), over \
             max_request_tensor_bytes = {}; send fewer elements, or raw_input_contents",
            format_bytes(Some(self.needed)),
            self.field,
            format_bytes(Some(self.limit))
        )
    }
}

/// What the message being decoded on this thread may still decode.
#[derive(Debug, Clone, Copy)]
struct Budget {
    limit: u64,
    used: u64,
    over: Option<OverLimit>,
}

thread_local! {
    /// The budget of the [`decode_within`] running on this thread; `None` outside
    /// one, where decoding is unbounded as prost's is. A thread-local because prost's
    /// `Message` has nowhere else to carry it down to nested messages, and a decode
    /// runs start to end on one thread.
    static BUDGET: Cell<Option<Budget>> = const { Cell::new(None) };
}

/// Runs `decode` with every tensor contents it decodes on this thread held to `limit`
/// bytes together. Returns what `decode` returned and, when it failed because the
/// contents would have gone over, which field and by how much.
pub fn decode_within<T>(limit: u64, decode: impl FnOnce() -> T) -> (T, Option<OverLimit>) {
    /// Puts the enclosing budget back even if `decode` panics, so a later decode on
    /// this thread is not held to this one's.
    struct Restore(Option<Budget>);
    impl Drop for Restore {
        fn drop(&mut self) {
            BUDGET.set(self.0);
        }
    }
    let fresh = Budget {
        limit,
        used: 0,
        over: None,
    };
    let _restore = Restore(BUDGET.replace(Some(fresh)));
    let decoded = decode();
    let over = BUDGET.get().and_then(|budget| budget.over);
    (decoded, over)
}

/// Counts `bytes` more of decoded `field` against the budget of the message being
/// decoded on this thread, if there is one.
fn charge(field: &'static str, bytes: u64) -> Result<(), DecodeError> {
    let Some(mut budget) = BUDGET.get() else {
        return Ok(());
    };
    let needed = budget.used.saturating_add(bytes);
    if needed > budget.limit {
        let over = OverLimit {
            field,
            needed,
            limit: budget.limit,
        };
        budget.over = Some(over);
        BUDGET.set(Some(budget));
        return Err(decode_error(over.to_string()));
    }
    budget.used = needed;
    BUDGET.set(Some(budget));
    Ok(())
}

/// A decode error of Aviary's own. prost has no other public way to make one; the
/// constructor is deprecated only as a warning that a later prost may remove it.
#[cold]
fn decode_error(description: impl Into<std::borrow::Cow<'static, str>>) -> DecodeError {
    #[allow(deprecated)]
    DecodeError::new(description)
}

/// Varints in `payload`: every varint ends with the one byte whose continuation bit
/// (0x80) is clear, so counting them needs no decoding.
fn count_varints(payload: &[u8]) -> usize {
    payload.iter().filter(|&&byte| byte < 0x80).count()
}

/// Merges one occurrence of a repeated numeric `field` into `values`: a packed run
/// (length-delimited), or one element whose wire type is `element`. Each element is
/// `size_of::<T>()` bytes once decoded. A packed run's elements are counted and
/// charged before any is decoded, then the vector grows once to hold them all.
fn merge_numbers<T, B>(
    field: &'static str,
    element: WireType,
    wire_type: WireType,
    values: &mut Vec<T>,
    buf: &mut B,
    ctx: DecodeContext,
    merge: impl Fn(WireType, &mut T, &mut B, DecodeContext) -> Result<(), DecodeError>,
) -> Result<(), DecodeError>
where
    T: Default,
    B: Buf,
{
    let size = size_of::<T>();
    if wire_type != WireType::LengthDelimited {
        charge(field, size as u64)?;
        let mut value = T::default();
        merge(wire_type, &mut value, buf, ctx)?;
        values.push(value);
        return Ok(());
    }
    let len = decode_varint(buf)?;
    let remaining = buf.remaining();
    let len = usize::try_from(len)
        .ok()
        .filter(|&len| len <= remaining)
        .ok_or_else(|| decode_error("buffer underflow"))?;
    let count = match element {
        WireType::Varint => match buf.chunk().get(..len) {
            Some(payload) => count_varints(payload),
            // Not in one piece (never so for tonic's buffers or a slice): no run of
            // `len` bytes holds more than `len` varints.
            None => len,
        },
        _ => len / size,
    };
    charge(field, (count as u64).saturating_mul(size as u64))?;
    values.reserve(count);
    let limit = remaining - len;
    while buf.remaining() > limit {
        let mut value = T::default();
        merge(element, &mut value, buf, ctx.clone())?;
        values.push(value);
    }
    if buf.remaining() != limit {
        return Err(decode_error("delimited length exceeded"));
    }
    Ok(())
}

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
        use WireType::{SixtyFourBit, ThirtyTwoBit, Varint};
        // `field` decoded as prost's `encoding` decodes one `element` of it.
        macro_rules! numbers {
            ($field:ident, $element:ident, $encoding:ident) => {{
                let field = stringify!($field);
                let values = &mut self.$field;
                let merge = encoding::$encoding::merge;
                let result = merge_numbers(field, $element, wire_type, values, buf, ctx, merge);
                (result, field)
            }};
        }
        let (result, field) = match tag {
            1 => numbers!(bool_contents, Varint, bool),
            2 => numbers!(int_contents, Varint, int32),
            3 => numbers!(int64_contents, Varint, int64),
            4 => numbers!(uint_contents, Varint, uint32),
            5 => numbers!(uint64_contents, Varint, uint64),
            6 => numbers!(fp32_contents, ThirtyTwoBit, float),
            7 => numbers!(fp64_contents, SixtyFourBit, double),
            BYTES_CONTENTS_TAG => {
                // Zero-copy when the buffer is tonic's (a slice of the received message);
                // the element lives only until it is appended to the one buffer, where
                // it takes its length prefix and its bytes.
                let field = "bytes_contents";
                let mut element = Bytes::new();
                let result = encoding::bytes::merge(wire_type, &mut element, buf, ctx)
                    .and_then(|()| charge(field, 4 + element.len() as u64));
                if result.is_ok() {
                    self.bytes_contents.push(&element);
                }
                (result, field)
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

    #[test]
    fn varints_are_counted_by_their_last_bytes() {
        assert_eq!(count_varints(&[]), 0);
        assert_eq!(count_varints(&[0x00, 0x7f]), 2);
        // 300 (two bytes), then -1 as an int64 (ten bytes), then 1.
        let mut wire = Vec::new();
        for value in [300u64, u64::MAX, 1] {
            encode_varint(value, &mut wire);
        }
        assert_eq!(wire.len(), 13);
        assert_eq!(count_varints(&wire), 3);
    }

    /// `int64_contents` of `count` zeros, packed: 1 wire byte, 8 decoded bytes each.
    fn packed_zeros(count: usize) -> Vec<u8> {
        InferTensorContents {
            int64_contents: vec![0; count],
            ..InferTensorContents::default()
        }
        .encode_to_vec()
    }

    fn decode_limited(
        wire: &[u8],
        limit: u64,
    ) -> (Result<InferTensorContents, DecodeError>, Option<OverLimit>) {
        decode_within(limit, || InferTensorContents::decode(wire))
    }

    #[test]
    fn packed_varints_decode_up_to_the_limit_exactly() {
        let (fits, over) = decode_limited(&packed_zeros(100), 801);
        assert_eq!(fits.expect("under the limit").int64_contents.len(), 100);
        assert_eq!(over, None);
        let (exact, over) = decode_limited(&packed_zeros(100), 800);
        assert_eq!(exact.expect("at the limit").int64_contents, vec![0; 100]);
        assert_eq!(over, None);
    }

    #[test]
    fn packed_varints_over_the_limit_are_refused_before_decoding() {
        let (decoded, over) = decode_limited(&packed_zeros(100), 799);
        let error = decoded.expect_err("over the limit");
        assert_eq!(
            over,
            Some(OverLimit {
                field: "int64_contents",
                needed: 800,
                limit: 799
            })
        );
        assert!(error.to_string().contains("int64_contents"), "{error}");
        assert!(
            error
                .to_string()
                .contains("max_request_tensor_bytes = 799 B"),
            "{error}"
        );
    }

    #[test]
    fn every_field_of_a_message_counts_against_one_limit() {
        let contents = InferTensorContents {
            bool_contents: vec![true; 10],
            int_contents: vec![1; 10],
            uint64_contents: vec![u64::MAX; 10],
            fp32_contents: vec![1.0; 10],
            bytes_contents: [b"ab"; 10].iter().collect(),
            ..InferTensorContents::default()
        };
        // 10 + 40 + 80 + 40 + 10 × (4 + 2).
        let wire = contents.encode_to_vec();
        let (decoded, over) = decode_limited(&wire, 230);
        assert_eq!(decoded.expect("exactly at the limit"), contents);
        assert_eq!(over, None);
        let (decoded, over) = decode_limited(&wire, 229);
        assert!(decoded.is_err());
        assert_eq!(over.map(|o| o.field), Some("bytes_contents"));
    }

    #[test]
    fn unpacked_varints_are_counted_as_they_come() {
        // int64_contents 0, unpacked (tag 3, varint), 100 times.
        let wire: Vec<u8> = (0..100).flat_map(|_| [0x18, 0x00]).collect();
        let (decoded, over) = decode_limited(&wire, 800);
        assert_eq!(decoded.expect("at the limit").int64_contents, vec![0; 100]);
        assert_eq!(over, None);
        let (decoded, over) = decode_limited(&wire, 799);
        assert!(decoded.is_err());
        assert_eq!(
            over,
            Some(OverLimit {
                field: "int64_contents",
                needed: 800,
                limit: 799
            })
        );
    }

    #[test]
    fn a_packed_run_in_pieces_is_charged_its_length_in_elements() {
        // The buffer is two chunks, so the payload cannot be counted in place: 100
        // one-byte zeros are charged as 100 elements, which they are.
        let wire = packed_zeros(100);
        let (head, tail) = wire.split_at(10);
        let (decoded, over) = decode_within(800, || InferTensorContents::decode(head.chain(tail)));
        assert_eq!(decoded.expect("at the limit").int64_contents, vec![0; 100]);
        assert_eq!(over, None);
    }

    #[test]
    fn outside_a_limited_decode_nothing_is_counted() {
        let (_, over) = decode_limited(&packed_zeros(1), 0);
        assert!(over.is_some(), "a limit of 0 refuses one element");
        let decoded = InferTensorContents::decode(&packed_zeros(1000)[..]).expect("no limit");
        assert_eq!(decoded.int64_contents.len(), 1000);
    }

    #[test]
    fn malformed_packed_runs_are_decode_errors() {
        // int64_contents says 5 bytes follow, 2 do.
        let error = InferTensorContents::decode(&[0x1a, 0x05, 0x00, 0x00][..]).expect_err("short");
        assert!(error.to_string().contains("int64_contents"), "{error}");
        // A run whose last varint goes on past its length.
        let error =
            InferTensorContents::decode(&[0x1a, 0x01, 0x80, 0x01][..]).expect_err("overlong");
        assert!(error.to_string().contains("int64_contents"), "{error}");
    }
}
