//! Tries to read `/etc/hostname` for every event and records what happened in the
//! property `fs`: in weir's sandbox there is no directory to read from, so it is
//! always an error.

use weir_plugin_sdk::{Event, Outcome, plugin};

plugin!(read);

pub fn read(mut event: Event) -> Outcome {
    let result = match std::fs::read_to_string("/etc/hostname") {
        Ok(text) => format!("read {} bytes", text.len()),
        Err(e) => format!("error: {e}"),
    };
    event.set_property("fs", result);
    Outcome::keep(event)
}
