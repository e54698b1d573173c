//! Tensor datatypes and encodings of the v2 protocol.
//!
//! Raw tensor contents are the flattened, row-major elements in little-endian byte
//! order with no padding; BYTES elements are each a 4-byte little-endian length
//! followed by that many bytes. Everything here is pure and never panics on input.

use std::fmt;

use crate::pb::inference::DataType as ConfigDataType;

/// A tensor element type, as the v2 protocol names it (`"FP32"`, `"BYTES"`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Datatype {
    /// `BOOL`, one byte per element (0 or 1).
    Bool,
    /// `UINT8`.
    Uint8,
    /// `UINT16`.
    Uint16,
    /// `UINT32`.
    Uint32,
    /// `UINT64`.
    Uint64,
    /// `INT8`.
    Int8,
    /// `INT16`.
    Int16,
    /// `INT32`.
    Int32,
    /// `INT64`.
    Int64,
    /// `FP16`, IEEE 754 half precision; travels raw only.
    Fp16,
    /// `BF16`, bfloat16; travels raw only.
    Bf16,
    /// `FP32`.
    Fp32,
    /// `FP64`.
    Fp64,
    /// `BYTES`: variable-length byte strings.
    Bytes,
}

impl Datatype {
    /// Every datatype, in protocol order.
    pub const ALL: [Datatype; 14] = [
        Datatype::Bool,
        Datatype::Uint8,
        Datatype::Uint16,
        Datatype::Uint32,
        Datatype::Uint64,
        Datatype::Int8,
        Datatype::Int16,
        Datatype::Int32,
        Datatype::Int64,
        Datatype::Fp16,
        Datatype::Bf16,
        Datatype::Fp32,
        Datatype::Fp64,
        Datatype::Bytes,
    ];

    /// Parses the protocol name (`"FP32"`); names are case-sensitive as in the spec.
    pub fn parse(name: &str) -> Option<Datatype> {
        Datatype::ALL.into_iter().find(|d| d.as_str() == name)
    }

    /// The protocol name.
    pub fn as_str(self) -> &'static str {
        match self {
            Datatype::Bool => "BOOL",
            Datatype::Uint8 => "UINT8",
            Datatype::Uint16 => "UINT16",
            Datatype::Uint32 => "UINT32",
            Datatype::Uint64 => "UINT64",
            Datatype::Int8 => "INT8",
            Datatype::Int16 => "INT16",
            Datatype::Int32 => "INT32",
            Datatype::Int64 => "INT64",
            Datatype::Fp16 => "FP16",
            Datatype::Bf16 => "BF16",
            Datatype::Fp32 => "FP32",
            Datatype::Fp64 => "FP64",
            Datatype::Bytes => "BYTES",
        }
    }

    /// Bytes per element in raw form; `None` for BYTES, whose elements vary in size.
    pub fn element_size(self) -> Option<usize> {
        match self {
            Datatype::Bool | Datatype::Uint8 | Datatype::Int8 => Some(1),
            Datatype::Uint16 | Datatype::Int16 | Datatype::Fp16 | Datatype::Bf16 => Some(2),
            Datatype::Uint32 | Datatype::Int32 | Datatype::Fp32 => Some(4),
            Datatype::Uint64 | Datatype::Int64 | Datatype::Fp64 => Some(8),
            Datatype::Bytes => None,
        }
    }

    /// The matching `DataType` of Triton's model configuration.
    pub fn config_type(self) -> ConfigDataType {
        match self {
            Datatype::Bool => ConfigDataType::TypeBool,
            Datatype::Uint8 => ConfigDataType::TypeUint8,
            Datatype::Uint16 => ConfigDataType::TypeUint16,
            Datatype::Uint32 => ConfigDataType::TypeUint32,
            Datatype::Uint64 => ConfigDataType::TypeUint64,
            Datatype::Int8 => ConfigDataType::TypeInt8,
            Datatype::Int16 => ConfigDataType::TypeInt16,
            Datatype::Int32 => ConfigDataType::TypeInt32,
            Datatype::Int64 => ConfigDataType::TypeInt64,
            Datatype::Fp16 => ConfigDataType::TypeFp16,
            Datatype::Bf16 => ConfigDataType::TypeBf16,
            Datatype::Fp32 => ConfigDataType::TypeFp32,
            Datatype::Fp64 => ConfigDataType::TypeFp64,
            Datatype::Bytes => ConfigDataType::TypeString,
        }
    }
}

impl fmt::Display for Datatype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a BYTES payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BytesFormatError {
    /// Fewer than 4 bytes remained where a length prefix was expected.
    #[error("element {index}: truncated length prefix at byte offset {offset}")]
    TruncatedPrefix {
        /// Element index.
        index: usize,
        /// Byte offset of the prefix.
        offset: usize,
    },
    /// A length prefix pointed past the end of the payload.
    #[error(
        "element {index}: length prefix {length} at byte offset {offset} runs past the end ({remaining} bytes remain)"
    )]
    LengthOverrun {
        /// Element index.
        index: usize,
        /// Byte offset of the prefix.
        offset: usize,
        /// The declared length.
        length: u32,
        /// Bytes left after the prefix.
        remaining: usize,
    },
    /// The payload held a different number of elements than the shape says.
    #[error("holds {found} elements, shape needs {expected}")]
    CountMismatch {
        /// Elements the shape needs.
        expected: usize,
        /// Elements found (or, with trailing bytes, at least found).
        found: usize,
    },
}

/// The elements of a raw BYTES payload, in order, without copying them: each item is
/// an element or the framing error that ends the payload (after which it yields
/// nothing more).
#[derive(Debug, Clone)]
pub struct BytesElementsIter<'a> {
    raw: &'a [u8],
    offset: usize,
    index: usize,
    failed: bool,
}

impl<'a> BytesElementsIter<'a> {
    /// Walks `raw`.
    pub fn new(raw: &'a [u8]) -> BytesElementsIter<'a> {
        BytesElementsIter {
            raw,
            offset: 0,
            index: 0,
            failed: false,
        }
    }
}

impl<'a> Iterator for BytesElementsIter<'a> {
    type Item = Result<&'a [u8], BytesFormatError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.offset >= self.raw.len() {
            return None;
        }
        let (index, offset) = (self.index, self.offset);
        let Some(prefix) = self.raw.get(offset..offset + 4) else {
            self.failed = true;
            return Some(Err(BytesFormatError::TruncatedPrefix { index, offset }));
        };
        let length = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        let start = offset + 4;
        let remaining = self.raw.len() - start;
        if length as usize > remaining {
            self.failed = true;
            return Some(Err(BytesFormatError::LengthOverrun {
                index,
                offset,
                length,
                remaining,
            }));
        }
        self.offset = start + length as usize;
        self.index += 1;
        Some(Ok(&self.raw[start..self.offset]))
    }
}

/// Checks that a raw BYTES payload holds exactly `expected` well-formed elements and
/// returns the bytes they hold together (prefixes excluded), without allocating: what
/// a request will cost can be known before it is decoded.
pub fn bytes_payload_len(raw: &[u8], expected: usize) -> Result<usize, BytesFormatError> {
    let mut found = 0;
    let mut payload = 0;
    for element in BytesElementsIter::new(raw) {
        if found == expected {
            return Err(BytesFormatError::CountMismatch {
                expected,
                found: found + 1,
            });
        }
        payload += element?.len();
        found += 1;
    }
    if found != expected {
        return Err(BytesFormatError::CountMismatch { expected, found });
    }
    Ok(payload)
}

/// Splits a raw BYTES payload into its elements, requiring exactly `expected`.
pub fn decode_bytes_elements(raw: &[u8], expected: usize) -> Result<Vec<&[u8]>, BytesFormatError> {
    bytes_payload_len(raw, expected)?;
    BytesElementsIter::new(raw).collect()
}

/// Encodes BYTES elements as length-prefixed raw contents.
pub fn encode_bytes_elements<I, B>(elements: I) -> Vec<u8>
where
    I: IntoIterator<Item = B>,
    B: AsRef<[u8]>,
{
    let mut out = Vec::new();
    for element in elements {
        let element = element.as_ref();
        // The protocol cannot carry elements of 4 GiB or more; message size limits
        // reject such requests long before this point.
        let length = u32::try_from(element.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&length.to_le_bytes());
        out.extend_from_slice(element);
    }
    out
}

/// A fixed-size element type with a little-endian raw encoding.
pub trait Element: Copy {
    /// The protocol datatype of this element type.
    const DATATYPE: Datatype;
    /// Appends the little-endian encoding of `self`.
    fn write_le(self, out: &mut Vec<u8>);
    /// Reads one element from exactly `size_of::<Self>()` bytes.
    fn read_le(bytes: &[u8]) -> Self;
}

macro_rules! numeric_element {
    ($($ty:ty => $dt:ident),* $(,)?) => {$(
        impl Element for $ty {
            const DATATYPE: Datatype = Datatype::$dt;
            fn write_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn read_le(bytes: &[u8]) -> Self {
                let mut buf = [0u8; std::mem::size_of::<$ty>()];
                buf.copy_from_slice(bytes);
                <$ty>::from_le_bytes(buf)
            }
        }
    )*};
}

numeric_element!(
    u8 => Uint8, u16 => Uint16, u32 => Uint32, u64 => Uint64,
    i8 => Int8, i16 => Int16, i32 => Int32, i64 => Int64,
    f32 => Fp32, f64 => Fp64,
);

impl Element for bool {
    const DATATYPE: Datatype = Datatype::Bool;
    fn write_le(self, out: &mut Vec<u8>) {
        out.push(u8::from(self));
    }
    fn read_le(bytes: &[u8]) -> Self {
        bytes.first().is_some_and(|b| *b != 0)
    }
}

/// Encodes elements as raw little-endian contents.
pub fn to_raw<T: Element>(values: &[T]) -> Vec<u8> {
    let mut out = Vec::with_capacity(std::mem::size_of_val(values));
    for value in values {
        value.write_le(&mut out);
    }
    out
}

/// Decodes raw little-endian contents; `None` if the length is not a whole number of
/// elements.
pub fn from_raw<T: Element>(raw: &[u8]) -> Option<Vec<T>> {
    let size = std::mem::size_of::<T>();
    if !raw.len().is_multiple_of(size) {
        return None;
    }
    Some(raw.chunks_exact(size).map(T::read_le).collect())
}

/// Number of elements of `shape`, or `None` if a dimension is negative or the product
/// overflows.
pub fn element_count(shape: &[i64]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &dim| {
        let dim = usize::try_from(dim).ok()?;
        acc.checked_mul(dim)
    })
}

/// `bytes` for people: `512 B`, `256 MiB`, `1.1 GiB`; `None` (a cost past `u64`) is
/// `more than 16 EiB`.
pub fn format_bytes(bytes: Option<u64>) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let Some(bytes) = bytes else {
        return "more than 16 EiB".to_owned();
    };
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let text = format!("{value:.1}");
    let text = text.strip_suffix(".0").unwrap_or(&text);
    format!("{text} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datatype_names_round_trip() {
        for dt in Datatype::ALL {
            assert_eq!(Datatype::parse(dt.as_str()), Some(dt));
        }
        assert_eq!(Datatype::parse("fp32"), None);
        assert_eq!(Datatype::parse("FLOAT"), None);
    }

    #[test]
    fn bytes_round_trip() {
        let raw = encode_bytes_elements(["", "ab", "héllo"]);
        let decoded = decode_bytes_elements(&raw, 3).expect("valid payload");
        assert_eq!(decoded, vec![&b""[..], b"ab", "héllo".as_bytes()]);
    }

    #[test]
    fn bytes_errors_name_the_element() {
        let mut raw = encode_bytes_elements(["abc"]);
        raw.extend_from_slice(&[1, 0]);
        assert_eq!(
            decode_bytes_elements(&raw, 2),
            Err(BytesFormatError::TruncatedPrefix {
                index: 1,
                offset: 7
            })
        );
        let overrun = [9, 0, 0, 0, b'x'];
        assert!(matches!(
            decode_bytes_elements(&overrun, 1),
            Err(BytesFormatError::LengthOverrun {
                length: 9,
                remaining: 1,
                ..
            })
        ));
        let two = encode_bytes_elements(["a", "b"]);
        assert_eq!(
            decode_bytes_elements(&two, 1),
            Err(BytesFormatError::CountMismatch {
                expected: 1,
                found: 2
            })
        );
        assert_eq!(
            decode_bytes_elements(&two, 3),
            Err(BytesFormatError::CountMismatch {
                expected: 3,
                found: 2
            })
        );
    }

    #[test]
    fn payload_len_counts_element_bytes_without_prefixes() {
        let raw = encode_bytes_elements(["", "ab", "héllo"]);
        assert_eq!(bytes_payload_len(&raw, 3), Ok(8));
        assert_eq!(bytes_payload_len(&[], 0), Ok(0));
        assert_eq!(
            bytes_payload_len(&raw, usize::MAX),
            Err(BytesFormatError::CountMismatch {
                expected: usize::MAX,
                found: 3
            })
        );
        let items: Vec<_> = BytesElementsIter::new(&[1, 0]).collect();
        assert_eq!(
            items,
            vec![Err(BytesFormatError::TruncatedPrefix {
                index: 0,
                offset: 0
            })]
        );
    }

    #[test]
    fn raw_round_trip_and_length_check() {
        let values = [1.5f32, -2.0, f32::MAX];
        assert_eq!(from_raw::<f32>(&to_raw(&values)), Some(values.to_vec()));
        assert_eq!(from_raw::<f32>(&[0, 0, 0]), None);
        assert_eq!(
            from_raw::<bool>(&to_raw(&[true, false])),
            Some(vec![true, false])
        );
    }

    #[test]
    fn element_count_rejects_negative_and_overflow() {
        assert_eq!(element_count(&[]), Some(1));
        assert_eq!(element_count(&[2, 3]), Some(6));
        assert_eq!(element_count(&[2, -1]), None);
        assert_eq!(element_count(&[i64::MAX, i64::MAX]), None);
        assert_eq!(element_count(&[0, i64::MAX]), Some(0));
    }

    #[test]
    fn bytes_read_in_binary_units() {
        assert_eq!(format_bytes(Some(0)), "0 B");
        assert_eq!(format_bytes(Some(1023)), "1023 B");
        assert_eq!(format_bytes(Some(1024)), "1 KiB");
        assert_eq!(format_bytes(Some(256 << 20)), "256 MiB");
        assert_eq!(format_bytes(Some(1 << 30)), "1 GiB");
        assert_eq!(format_bytes(Some(1_280_000_000)), "1.2 GiB");
        assert_eq!(format_bytes(Some(u64::MAX)), "16 EiB");
        assert_eq!(format_bytes(None), "more than 16 EiB");
    }
}
