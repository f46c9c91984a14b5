//! The `bulkhead` binary: a thin dispatcher over the subcommands.

mod admin;
mod bench;
mod cli;
mod config;
mod demo;
mod import;
mod serve;
mod synth;

use clap::Parser;

// mimalloc: the write path allocates many small JSON nodes; glibc malloc spent a fifth of the
// import's time in its free lists.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    match cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// For long-running servers: keeps freed memory from piling up across the pool of blocking
/// threads, so resident memory stays flat whatever the export's size. mimalloc returns freed
/// pages at once instead of when the (possibly idle) thread next allocates, and glibc, which
/// SQLite's page caches allocate from, gets two arenas instead of one per thread. Bulk loads do
/// without it: immediate purging costs them a fifth of their time in page faults.
pub fn bound_allocator_memory() {
    // SAFETY: both calls only adjust allocator parameters; callers run this before starting the
    // server's threads.
    unsafe {
        // The Rust binding names no constant for `mi_option_purge_delay`; in mimalloc.h (v2 and v3)
        // it is the option just before `mi_option_use_numa_nodes`.
        libmimalloc_sys::mi_option_set(libmimalloc_sys::mi_option_use_numa_nodes - 1, 0);
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
