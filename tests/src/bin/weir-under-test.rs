//! The `weir` binary, built inside this package so that integration tests can run it
//! as a real process (`CARGO_BIN_EXE_weir-under-test`), restart it and kill it.
fn main() -> anyhow::Result<()> {
    weir::cli::main()
}
