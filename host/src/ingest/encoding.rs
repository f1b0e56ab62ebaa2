//! `Content-Encoding` of request bodies: `gzip` (what the tracking SDKs send) or none.
//! The size limits of a request apply to the bytes it decompresses to, and
//! decompression stops one byte past the limit: a small body that inflates to
//! gigabytes (a zip bomb) costs at most the limit in memory and gets 413.

use std::io::Read;

use axum::http::{HeaderMap, StatusCode, header};
use bytes::Bytes;

use super::ApiError;

/// The encodings a request body may have.
pub const ENCODINGS: &str = "gzip (or x-gzip) or identity";

/// The body as the client meant it: decompressed when `Content-Encoding` says gzip, at
/// most `limit` bytes.
pub fn decode(headers: &HeaderMap, body: Bytes, limit: usize) -> Result<Bytes, ApiError> {
    let Some(value) = headers.get(header::CONTENT_ENCODING) else {
        return Ok(body);
    };
    // A value that is not visible ASCII names no encoding weir knows: 415 below.
    let encoding = value
        .to_str()
        .unwrap_or("\u{fffd}")
        .trim()
        .to_ascii_lowercase();
    match encoding.as_str() {
        "" | "identity" => Ok(body),
        "gzip" | "x-gzip" => gunzip(&body, limit),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_encoding",
            format!(
                "Content-Encoding {:?} is not supported; use {ENCODINGS}",
                value.to_str().unwrap_or("(not text)")
            ),
        )),
    }
}

/// `body` decompressed as gzip, at most `limit` bytes (413 beyond, 400 if not gzip).
pub fn gunzip(body: &[u8], limit: usize) -> Result<Bytes, ApiError> {
    // Members one after another are one body (as `gzip a b` writes them).
    let decoder = flate2::read::MultiGzDecoder::new(body);
    let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(limit));
    decoder
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_encoding",
                format!("the body is not valid gzip: {e}"),
            )
        })?;
    if out.len() > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body decompresses to more than {limit} bytes"),
        ));
    }
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn headers(encoding: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_ENCODING, encoding.parse().unwrap());
        h
    }

    #[test]
    fn gzip_bodies_are_decompressed_and_others_pass_as_they_are() {
        let text = br#"{"name":"app_opened"}"#;
        let out = decode(&headers("gzip"), gzip(text).into(), 1000).unwrap();
        assert_eq!(&out[..], text);
        let out = decode(&headers("X-Gzip"), gzip(text).into(), 1000).unwrap();
        assert_eq!(&out[..], text);
        let out = decode(&headers("identity"), Bytes::from_static(text), 1000).unwrap();
        assert_eq!(&out[..], text);
        let out = decode(&HeaderMap::new(), Bytes::from_static(text), 1000).unwrap();
        assert_eq!(&out[..], text);
        // Two members are one body.
        let mut two = gzip(b"[1,");
        two.extend(gzip(b"2]"));
        assert_eq!(
            &decode(&headers("gzip"), two.into(), 1000).unwrap()[..],
            b"[1,2]"
        );
    }

    #[test]
    fn a_bomb_stops_at_the_limit_with_413() {
        // 16 MiB of zeros compress to ~16 KiB.
        let bomb = gzip(&vec![0u8; 16 << 20]);
        assert!(bomb.len() < 64 << 10);
        let e = decode(&headers("gzip"), bomb.into(), 1 << 20).unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(
            e.message
                .contains("decompresses to more than 1048576 bytes"),
            "{}",
            e.message
        );
        // Exactly the limit is fine.
        let exact = gzip(&vec![b' '; 1000]);
        assert_eq!(
            decode(&headers("gzip"), exact.into(), 1000).unwrap().len(),
            1000
        );
    }

    #[test]
    fn bad_gzip_and_unknown_encodings_are_refused_naming_why() {
        let e = decode(&headers("gzip"), Bytes::from_static(b"not gzip"), 1000).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::BAD_REQUEST, "bad_encoding")
        );
        let mut cut = gzip(b"{\"name\":\"app_opened\"}");
        cut.truncate(cut.len() - 6);
        let e = decode(&headers("gzip"), cut.into(), 1000).unwrap_err();
        assert_eq!(e.code, "bad_encoding");
        let e = decode(&headers("br"), Bytes::from_static(b"x"), 1000).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_encoding")
        );
        assert!(e.message.contains("\"br\""), "{}", e.message);
        // A value that is not visible ASCII is no encoding weir knows, not "none".
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_ENCODING,
            axum::http::HeaderValue::from_bytes(b"gz\xffip").unwrap(),
        );
        let e = decode(&h, Bytes::from_static(b"x"), 1000).unwrap_err();
        assert_eq!(e.code, "unsupported_encoding");
    }
}
