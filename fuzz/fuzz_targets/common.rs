//! What every target checks of an answer: an accepted event is a weir event (its name
//! held to weir's rule, its id set and bounded, `properties` and `context` JSON
//! objects); a refusal carries a documented code and a message.

use weir::ingest::envelope::{CODES, EnvelopeError, Limits};
use weir::model::WireEvent;

/// The limits of the ingest endpoint's defaults.
pub const LIMITS: Limits = Limits {
    max_event_bytes: 32 * 1024,
    max_events: 1000,
    max_depth: 32,
};

/// The receive time given to the parsers.
pub const NOW_MS: i64 = 1_700_000_000_000;

pub fn check_refusal(e: &EnvelopeError) {
    assert!(CODES.contains(&e.code), "undocumented code {:?}", e.code);
    assert!(!e.message.is_empty(), "a refusal without a message");
}

pub fn check_accepted(events: &[WireEvent]) {
    assert!(!events.is_empty(), "accepted without events");
    assert!(events.len() <= LIMITS.max_events, "{} events", events.len());
    for e in events {
        assert!(
            weir::model::check_name(&e.name).is_ok(),
            "name {:?}",
            e.name
        );
        assert!(
            !e.event_id.is_empty() && e.event_id.len() <= 256,
            "id {:?}",
            e.event_id
        );
        for (what, raw) in [
            ("properties", e.properties.get()),
            ("context", e.context.get()),
        ] {
            let parsed: Result<serde_json::Map<String, serde_json::Value>, _> =
                serde_json::from_str(raw);
            assert!(parsed.is_ok(), "{what} is not a JSON object: {raw}");
        }
    }
}

/// Ids for events sent without one.
pub fn ids() -> impl FnMut() -> String {
    let mut n = 0;
    move || {
        n += 1;
        format!("generated-{n}")
    }
}
