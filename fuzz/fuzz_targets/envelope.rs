//! weir's own `/v1/events` body, in both framings: any bytes get events or a refusal
//! with a documented code, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir::ingest::envelope::{BodyFormat, parse_body};

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    for format in [BodyFormat::Json, BodyFormat::Ndjson] {
        match parse_body(data, format, &common::LIMITS, common::NOW_MS, common::ids()) {
            Ok(events) => common::check_accepted(&events),
            Err(e) => common::check_refusal(&e),
        }
    }
});
