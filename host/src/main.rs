fn main() -> anyhow::Result<()> {
    weir::cli::main()
}
