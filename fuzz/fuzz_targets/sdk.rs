//! Segment's (and RudderStack's) tracking API and PostHog's capture API: the first
//! byte picks the endpoint, the rest is the body. Any body gets weir events or a
//! refusal with a documented code, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir::ingest::sdk::segment::{Call, Type};
use weir::ingest::sdk::{posthog, segment};

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let result = match which % 8 {
        0 => posthog::parse(body, &common::LIMITS, common::NOW_MS, common::ids()),
        n => {
            let call = match n {
                1 => Call::Batch,
                2 => Call::One(Type::Track),
                3 => Call::One(Type::Identify),
                4 => Call::One(Type::Page),
                5 => Call::One(Type::Screen),
                6 => Call::One(Type::Group),
                _ => Call::One(Type::Alias),
            };
            segment::parse(body, call, &common::LIMITS, common::NOW_MS, common::ids())
        }
    };
    match result {
        Ok(parsed) => common::check_accepted(&parsed.events),
        Err(e) => common::check_refusal(&e),
    }
});
