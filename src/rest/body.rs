//! Bodies of the HTTP/REST endpoint: read within the message limit, decompressed as
//! their `Content-Encoding` says (gzip or deflate, what tritonclient's
//! `request_compression_algorithm` sends), and answers compressed as a client's
//! `Accept-Encoding` asks (its `response_compression_algorithm`).

use std::io::{Read, Write};

use bytes::Bytes;
use flate2::{
    Compression,
    bufread::{MultiGzDecoder, ZlibDecoder},
    write::{GzEncoder, ZlibEncoder},
};
use http::{HeaderMap, StatusCode, header};
use http_body_util::BodyExt;

use super::Failure;

/// A body's compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// gzip (RFC 1952).
    Gzip,
    /// HTTP's "deflate": the zlib format (RFC 1950), as tritonclient sends it.
    Deflate,
}

impl Encoding {
    fn name(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::Deflate => "deflate",
        }
    }
}

/// The body of a request with `headers`, whole and decompressed, refused (413) when it
/// is over `limit` bytes before or after decompression.
pub async fn read(
    headers: &HeaderMap,
    body: axum::body::Body,
    limit: usize,
) -> Result<Bytes, Failure> {
    let encoding = content_encoding(headers)?;
    let over = || {
        Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is over the server's message limit of {limit} bytes"),
        )
    };
    let sent = http_body_util::Limited::new(body, limit)
        .collect()
        .await
        .map_err(
            |error| match error.downcast::<http_body_util::LengthLimitError>() {
                Ok(_) => over(),
                Err(error) => Failure::bad_request(format!("reading the request body: {error}")),
            },
        )?
        .to_bytes();
    let Some(encoding) = encoding else {
        return Ok(sent);
    };
    let invalid = |error: &dyn std::fmt::Display| {
        Failure::bad_request(format!(
            "the request body is not valid {} data: {error}",
            encoding.name()
        ))
    };
    let mut plain = Vec::new();
    let cap = limit as u64 + 1;
    match encoding {
        // Every member of a gzip body is read (RFC 1952 allows several).
        Encoding::Gzip => {
            MultiGzDecoder::new(&sent[..])
                .take(cap)
                .read_to_end(&mut plain)
                .map_err(|e| invalid(&e))?;
        }
        Encoding::Deflate => {
            let mut decoder = ZlibDecoder::new(&sent[..]).take(cap);
            decoder.read_to_end(&mut plain).map_err(|e| invalid(&e))?;
            // Bytes after the zlib stream's end would be lost: refused, not dropped.
            if plain.len() <= limit && !decoder.into_inner().into_inner().is_empty() {
                return Err(invalid(&"bytes follow the end of the compressed stream"));
            }
        }
    }
    if plain.len() > limit {
        return Err(over());
    }
    Ok(Bytes::from(plain))
}

/// The compression a request's `Content-Encoding` names; any but gzip, deflate and
/// identity is refused (415) rather than read as if it were plain.
fn content_encoding(headers: &HeaderMap) -> Result<Option<Encoding>, Failure> {
    let Some(value) = headers.get(header::CONTENT_ENCODING) else {
        return Ok(None);
    };
    match value
        .to_str()
        .map(|v| v.trim().to_ascii_lowercase())
        .as_deref()
    {
        Ok("gzip" | "x-gzip") => Ok(Some(Encoding::Gzip)),
        Ok("deflate") => Ok(Some(Encoding::Deflate)),
        Ok("identity" | "") => Ok(None),
        _ => Err(Failure::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "Content-Encoding {value:?} is not supported: send gzip, deflate or an uncompressed body"
            ),
        )),
    }
}

/// The compression a client's `Accept-Encoding` asks for: gzip or deflate when it
/// names one with a non-zero weight (gzip first); otherwise none.
pub fn accepted(headers: &HeaderMap) -> Option<Encoding> {
    let accepts = |wanted: &str| {
        headers
            .get_all(header::ACCEPT_ENCODING)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|item| {
                let mut parts = item.split(';').map(str::trim);
                let name = parts.next().unwrap_or_default();
                let refused = parts
                    .filter_map(|p| p.strip_prefix("q="))
                    .any(|q| q.trim().parse::<f32>().is_ok_and(|q| q <= 0.0));
                name.eq_ignore_ascii_case(wanted) && !refused
            })
    };
    if accepts("gzip") {
        Some(Encoding::Gzip)
    } else if accepts("deflate") {
        Some(Encoding::Deflate)
    } else {
        None
    }
}

/// `body` compressed with `encoding`, and the `Content-Encoding` that says so.
pub fn compress(body: &[u8], encoding: Encoding) -> (Bytes, http::HeaderValue) {
    let written = match encoding {
        Encoding::Gzip => {
            let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
            encoder.write_all(body).and_then(|()| encoder.finish())
        }
        Encoding::Deflate => {
            let mut encoder = ZlibEncoder::new(Vec::new(), Compression::fast());
            encoder.write_all(body).and_then(|()| encoder.finish())
        }
    };
    // Writing into a Vec cannot fail.
    let compressed = written.unwrap_or_default();
    (
        Bytes::from(compressed),
        http::HeaderValue::from_static(encoding.name()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: header::HeaderName, value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(name, value.parse().expect("header value"));
        headers
    }

    #[tokio::test]
    async fn compressed_bodies_are_read_within_the_limit() {
        for encoding in [Encoding::Gzip, Encoding::Deflate] {
            let plain = vec![7u8; 10_000];
            let (compressed, name) = compress(&plain, encoding);
            let sent = headers(header::CONTENT_ENCODING, name.to_str().expect("ascii"));
            let read = read(&sent, axum::body::Body::from(compressed.clone()), 20_000)
                .await
                .expect("within the limit");
            assert_eq!(read, plain);
            // Small on the wire, over the limit once decompressed: refused all the same.
            let over = super::read(&sent, axum::body::Body::from(compressed), 9_999)
                .await
                .expect_err("over the limit");
            assert_eq!(over.status, StatusCode::PAYLOAD_TOO_LARGE);
        }
    }

    #[tokio::test]
    async fn every_gzip_member_is_read_and_nothing_after_a_zlib_stream_is_dropped() {
        let (first, _) = compress(b"hello ", Encoding::Gzip);
        let (second, _) = compress(b"world", Encoding::Gzip);
        let gzip = headers(header::CONTENT_ENCODING, "gzip");
        let both = [first.as_ref(), second.as_ref()].concat();
        let read_back = read(&gzip, axum::body::Body::from(both), 100)
            .await
            .expect("two members");
        assert_eq!(read_back, "hello world");
        let (zlib, _) = compress(b"hello", Encoding::Deflate);
        let deflate = headers(header::CONTENT_ENCODING, "deflate");
        let trailing = [zlib.as_ref(), b"junk"].concat();
        let refused = read(&deflate, axum::body::Body::from(trailing), 100)
            .await
            .expect_err("trailing bytes");
        assert!(
            refused.message.contains("bytes follow"),
            "{}",
            refused.message
        );
    }

    #[tokio::test]
    async fn unknown_encodings_and_corrupt_data_are_refused() {
        let brotli = headers(header::CONTENT_ENCODING, "br");
        let refused = read(&brotli, axum::body::Body::from("x"), 100)
            .await
            .expect_err("br");
        assert_eq!(refused.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let gzip = headers(header::CONTENT_ENCODING, "gzip");
        let corrupt = read(&gzip, axum::body::Body::from("not gzip"), 100)
            .await
            .expect_err("corrupt");
        assert_eq!(corrupt.status, StatusCode::BAD_REQUEST);
        let plain = read(
            &HeaderMap::new(),
            axum::body::Body::from(vec![0u8; 101]),
            100,
        )
        .await
        .expect_err("over");
        assert_eq!(plain.status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn accept_encoding_is_read_with_weights() {
        let accept = |v: &str| accepted(&headers(header::ACCEPT_ENCODING, v));
        assert_eq!(accept("gzip"), Some(Encoding::Gzip));
        assert_eq!(accept("deflate, gzip;q=0"), Some(Encoding::Deflate));
        assert_eq!(accept("br"), None);
        assert_eq!(accepted(&HeaderMap::new()), None);
    }
}
