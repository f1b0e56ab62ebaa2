// mimalloc instead of glibc's malloc: the processor allocates and frees a few small
// strings per event on two threads, and glibc's allocator (free-list consolidation,
// arena locks) took about a quarter of weir's CPU in the drain profile (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    weir::cli::main()
}
