//! Where the server's memory is: with `RUST_LOG=bulkhead::memory=debug`, a line a second with
//! the resident set, the Rust heap (mimalloc's committed memory) and SQLite's own allocations,
//! each now and at its peak, so a load's peak can be split between the two allocators.

use std::time::Duration;

const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// Resident set size in bytes (Linux), from `/proc/self/statm`.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Starts the reporting thread when its log target is enabled at debug level.
pub fn spawn_reporter() {
    if !tracing::enabled!(target: "bulkhead::memory", tracing::Level::DEBUG) {
        return;
    }
    let spawned = std::thread::Builder::new().name("memory-report".into()).spawn(|| {
        let mut peak_rss = 0;
        loop {
            std::thread::sleep(REPORT_INTERVAL);
            let rss = resident_bytes().unwrap_or(0);
            peak_rss = peak_rss.max(rss);
            let (mut current_commit, mut peak_commit) = (0usize, 0usize);
            let mut unused = [0usize; 6];
            let [a, b, c, d, e, f] = &mut unused;
            // SAFETY: mimalloc writes each statistic through its pointer; all are valid.
            unsafe {
                libmimalloc_sys::mi_process_info(a, b, c, d, e, &mut current_commit, &mut peak_commit, f);
            }
            let (sqlite, sqlite_peak) = bulkhead_store::sqlite::sqlite_memory();
            let (libc_in_use, libc_free) = libc_heap();
            let mib = |bytes: u64| bytes / (1024 * 1024);
            tracing::debug!(
                target: "bulkhead::memory",
                rss_mib = mib(rss),
                peak_rss_mib = mib(peak_rss),
                rust_heap_mib = mib(current_commit as u64),
                rust_heap_peak_mib = mib(peak_commit as u64),
                sqlite_mib = mib(sqlite.max(0) as u64),
                sqlite_peak_mib = mib(sqlite_peak.max(0) as u64),
                libc_in_use_mib = mib(libc_in_use),
                libc_free_mib = mib(libc_free),
                "memory"
            );
        }
    });
    if let Err(error) = spawned {
        tracing::warn!(error = %error, "could not start the memory report thread");
    }
}

/// Bytes glibc's malloc has handed out (SQLite's allocations among them) and holds free, over
/// all its arenas.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn libc_heap() -> (u64, u64) {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let info = unsafe { libc::mallinfo2() };
    ((info.uordblks + info.hblkhd) as u64, info.fordblks as u64)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn libc_heap() -> (u64, u64) {
    (0, 0)
}
