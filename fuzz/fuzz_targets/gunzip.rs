//! gzip request bodies: any bytes inflate to at most the limit or are refused, never
//! a panic and never more memory than the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    match weir::ingest::encoding::gunzip(data, LIMIT) {
        Ok(inflated) => assert!(inflated.len() <= LIMIT, "{} bytes", inflated.len()),
        Err(e) => {
            let code = e.code();
            assert!(
                code == "bad_encoding" || code == "body_too_large",
                "gunzip refused with {code}"
            );
        }
    }
});
