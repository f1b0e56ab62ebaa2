//! The ClickHouse sink: the `events` and `dead_letters` tables, and the typed tables
//! a pipeline routes rows to.
//!
//! weir creates its database and tables itself, in the form of the server's release
//! ([`ServerVersion`]: from 20.3 on, `LowCardinality` strings and column codecs). The
//! SQL runs on ClickHouse 18.16 (Debian 12's package) and on current releases: plain
//! `DateTime` (no DateTime64), `String` JSON text (no JSON type), and `RowBinary`
//! inserts without the server-side type header (`with_validation(false)`), which 18.16
//! lacks (RowBinary writes a `LowCardinality(String)` as a `String`).

mod config;
mod sink;
mod table;

pub use config::*;
pub use sink::*;
pub use table::*;
