//! Keeps every event unchanged: the cheapest possible plugin, for measuring the cost
//! of the call path itself (crossing into the sandbox and back, lifting and lowering).

use weir_plugin_sdk::{Event, Outcome, plugin};

plugin!(pass);

pub fn pass(event: Event) -> Outcome {
    Outcome::keep(event)
}
