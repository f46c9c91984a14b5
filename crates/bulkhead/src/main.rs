//! The `bulkhead` binary: a thin dispatcher over the subcommands.

/// `println!` for the commands' output; when stdout is a closed pipe (`bulkhead synth … | head`)
/// the process ends quietly, as Unix tools do, instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => { $crate::output::line(format_args!($($arg)*)) };
}

mod admin;
mod audit;
mod backup;
mod bench;
mod cli;
mod config;
mod demo;
mod import;
mod keys;
mod memory;
mod output;
mod private_files;
mod retention;
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

/// Reports a problem that does not stop the command: a log line once logging is set up (the
/// server), a `warning:` line on stderr before that and in the command-line tools.
pub fn warn(message: &str) {
    if tracing::dispatcher::has_been_set() {
        tracing::warn!("{message}");
    } else {
        eprintln!("warning: {message}");
    }
}

/// How the allocators should treat freed memory.
pub enum MemoryProfile {
    /// Long-running servers: freed memory goes back at once, so resident memory stays flat
    /// across the pool of blocking threads whatever the export's size. mimalloc purges
    /// immediately (instead of when the possibly idle thread next allocates), and glibc, which
    /// SQLite's page caches allocate from, gets two arenas instead of one per thread.
    ///
    /// Transparent huge pages are off for the process: mimalloc asks for them on its arenas,
    /// and a purged 4 KiB page inside a 2 MiB one stays resident, so under concurrent exports
    /// and writes the resident set grew to twice what was in use (BENCHMARKS.md, session 7).
    Server,
    /// Bulk loads and the benchmark's load client: freed memory is kept for the next batch (or
    /// response buffer); purging it cost a fifth of the import's time in page faults.
    BulkLoad,
}

/// Applies a memory profile; call it before starting any thread.
pub fn set_memory_profile(profile: MemoryProfile) {
    // The Rust binding names no constant for `mi_option_purge_delay`; in mimalloc.h (v2 and v3)
    // it is the option just before `mi_option_use_numa_nodes`.
    let purge_delay = libmimalloc_sys::mi_option_use_numa_nodes - 1;
    // SAFETY: these calls only adjust allocator and memory-policy parameters.
    unsafe {
        match profile {
            MemoryProfile::Server => {
                // mimalloc's own `MIMALLOC_PURGE_DELAY` (milliseconds), when set, overrides this.
                if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
                    libmimalloc_sys::mi_option_set(purge_delay, 0);
                }
                #[cfg(all(target_os = "linux", target_env = "gnu"))]
                libc::mallopt(libc::M_ARENA_MAX, 2);
                #[cfg(target_os = "linux")]
                if libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0 {
                    warn("could not turn transparent huge pages off; resident memory may grow under load");
                }
            }
            MemoryProfile::BulkLoad => libmimalloc_sys::mi_option_set(purge_delay, -1),
        }
    }
}
