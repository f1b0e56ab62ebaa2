//! A plugin that misbehaves on purpose, so tests can show the sandbox holds. What it
//! does depends on the event's name:
//! - `loop`: spins forever (the call deadline must stop it);
//! - `alloc`: allocates until memory runs out (the memory cap must stop it);
//! - `recurse`: recurses without end (the stack cap must stop it);
//! - `panic`: panics, which traps;
//! - `sleep`: sleeps for an hour inside a WASI host call (epochs cannot interrupt host
//!   code: the host must abandon the call at its deadline);
//! - `amplify`: forwarded to 64 sinks whose names are all the same 1 MiB of its memory
//!   (aliased strings): it holds 1 MiB, the host would copy 64 MiB for this event
//!   alone (the per-call cap on what the host copies out must stop it);
//! - `tally`: kept, with `properties.nth` = how many `tally` events this instance has
//!   seen (instances share nothing: this tells them apart);
//! - anything else: kept, with `properties.seen = true`.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use weir_plugin_sdk::{Event, Outcome, plugin};

plugin!(misbehave);

pub fn misbehave(mut event: Event) -> Outcome {
    match event.name() {
        "loop" => {
            let mut n = 0u64;
            loop {
                n = black_box(n.wrapping_add(1));
            }
        }
        "alloc" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(black_box(vec![1u8; 1 << 20]));
            }
        }
        "recurse" => {
            black_box(recurse(black_box(1)));
        }
        "panic" => panic!("hostile plugin panics on event {}", event.event_id()),
        "sleep" => std::thread::sleep(std::time::Duration::from_secs(3600)),
        "amplify" => {
            let mut name = std::mem::ManuallyDrop::new("x".repeat(1 << 20));
            for _ in 0..64 {
                // SAFETY: none. Hostile on purpose: 64 strings own one buffer, so the
                // outcome points at it 64 times; it is never freed in this instance's
                // lifetime (the host replaces the instance when the call fails).
                let alias = unsafe {
                    String::from_raw_parts(name.as_mut_ptr(), name.len(), name.capacity())
                };
                event.forward(alias);
            }
        }
        "tally" => {
            static TALLY: AtomicU64 = AtomicU64::new(0);
            event.set_property("nth", TALLY.fetch_add(1, Ordering::Relaxed) + 1);
        }
        _ => {}
    }
    event.set_property("seen", true);
    Outcome::keep(event)
}

// Endless on purpose: the wasm stack cap must stop it. Only scalars, so every frame
// lives on the wasm stack (an array here would overflow the guest's own shadow stack
// in linear memory first, which traps as an out-of-bounds access).
#[allow(unconditional_recursion)]
fn recurse(n: u64) -> u64 {
    black_box(recurse(black_box(n + 1))).wrapping_add(n)
}
