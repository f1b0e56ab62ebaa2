// mimalloc instead of glibc's malloc: the processor allocates and frees a few small
// strings per event on two threads, and glibc's allocator (free-list consolidation,
// arena locks) took about a quarter of weir's CPU in the drain profile (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's option `arena_eager_commit` (`mi_option_t` 4 in mimalloc 3, which the
/// bindings do not name; `MIMALLOC_ARENA_EAGER_COMMIT` in the environment). On Linux it
/// commits whole arenas up front: 40-50 MiB more peak RSS in the drain benchmark, and
/// no CPU measurably saved.
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Sets mimalloc's defaults before anything allocates: the first arena is reserved at
/// the first allocation, which the Rust runtime makes before `main`. An environment
/// variable of the same name still overrides a default.
extern "C" fn allocator_defaults() {
    // SAFETY: runs once, single-threaded, before any allocation; only sets a default.
    unsafe { libmimalloc_sys::mi_option_set_default(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
}

#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array")]
static ALLOCATOR_DEFAULTS: extern "C" fn() = allocator_defaults;

fn main() -> anyhow::Result<()> {
    weir::cli::main()
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn mimalloc_commits_arenas_on_demand() {
        if std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_some() {
            return; // the environment decides
        }
        // SAFETY: reads one of mimalloc's options.
        let value = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_ARENA_EAGER_COMMIT) };
        assert_eq!(value, 0);
    }
}
