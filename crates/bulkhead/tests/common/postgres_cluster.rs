//! A PostgreSQL cluster of a test's own, for tests that stop and start the server (the shared
//! cluster of `scripts/with-postgres` must stay up for every other test). Set up as that script
//! does it: `initdb` in a temporary directory, run as an unprivileged user when the test runs as
//! root (PostgreSQL refuses root), listening on 127.0.0.1 and a free port only, tuned for tests
//! (no fsync: the machine does not crash in a test), but with `synchronous_commit` on: these tests
//! kill the server, and a commit it acknowledged must survive that (with it off, a job's finish
//! acknowledged just before `pg_ctl stop -m immediate` was lost, and the job sat with a live
//! lease). Stopped (immediately) and deleted when dropped.
//!
//! Without PostgreSQL's binaries the test is skipped with a loud notice, unless `CI` is set:
//! then it fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use super::{expect_success, free_port, run_with_deadline};

/// A running (or stopped) cluster with one superuser `bulkhead` (trust authentication).
pub struct PgCluster {
    bin: PathBuf,
    /// The unprivileged user that owns the cluster when the test runs as root.
    owner: Option<String>,
    dir: TempDir,
    /// The port it listens on, the same across restarts.
    pub port: u16,
}

impl PgCluster {
    /// Initialises and starts a cluster; `None` (after a loud notice) without PostgreSQL's
    /// binaries outside CI.
    pub fn start() -> Option<PgCluster> {
        let Some(bin) = postgres_bin() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI is set but no PostgreSQL binaries (initdb, pg_ctl) were found; install PostgreSQL or set PG_BIN"
            );
            eprintln!("\n*** SKIPPED: no PostgreSQL binaries (initdb, pg_ctl); install PostgreSQL or set PG_BIN ***\n");
            return None;
        };
        // SAFETY: geteuid has no preconditions and only reads the process's credentials.
        let owner = (unsafe { libc::geteuid() } == 0).then(|| {
            let postgres = Command::new("id").arg("postgres").output().is_ok_and(|output| output.status.success());
            if postgres { "postgres" } else { "nobody" }.to_owned()
        });
        let dir = tempfile::Builder::new().prefix("bulkhead-own-pg.").tempdir().expect("temporary directory");
        if let Some(owner) = &owner {
            let chowned = Command::new("chown").arg(owner).arg(dir.path()).status().expect("running chown");
            assert!(chowned.success(), "chown {owner} {}", dir.path().display());
        }
        let mut cluster = PgCluster { bin, owner, dir, port: 0 };
        let mut initdb = cluster.command("initdb");
        initdb.arg("-D").arg(cluster.data()).args(["-U", "bulkhead", "--auth=trust", "-E", "UTF8", "--no-locale"]);
        expect_success(&run_with_deadline(initdb, Duration::from_secs(120)), "initdb");
        // A port can be taken between choosing and binding it: try a few.
        for attempt in 1..=5 {
            cluster.port = free_port();
            if cluster.try_start() {
                return Some(cluster);
            }
            assert!(attempt < 5, "PostgreSQL did not start:\n{}", cluster.log());
        }
        unreachable!("the loop returns or panics")
    }

    /// The URL of database `name` as the superuser.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://bulkhead@127.0.0.1:{}/{name}", self.port)
    }

    /// `pg_ctl stop -m MODE` (`fast`: sessions are terminated; `immediate`: a crash).
    pub fn stop(&self, mode: &str) {
        let mut stop = self.command("pg_ctl");
        stop.arg("-D").arg(self.data()).args(["-m", mode, "-w", "-t", "60", "stop"]);
        expect_success(&run_with_deadline(stop, Duration::from_secs(90)), "pg_ctl stop");
    }

    /// Starts the stopped cluster again on the same port (retrying while the port is still in
    /// TIME_WAIT or briefly taken).
    pub fn restart(&self) {
        for attempt in 1..=10 {
            if self.try_start() {
                return;
            }
            assert!(attempt < 10, "PostgreSQL did not start again on port {}:\n{}", self.port, self.log());
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    fn try_start(&self) -> bool {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c full_page_writes=off -c max_connections=100",
            self.port,
            self.dir.path().display()
        );
        let mut start = self.command("pg_ctl");
        start.arg("-D").arg(self.data()).arg("-l").arg(self.dir.path().join("postgres.log"));
        start.args(["-w", "-t", "60", "-o", &options, "start"]);
        run_with_deadline(start, Duration::from_secs(90)).status.success()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// One of PostgreSQL's programs, run as the cluster's owner.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut command = match &self.owner {
            Some(owner) => {
                let mut command = Command::new("runuser");
                command.args(["-u", owner, "--"]).arg(path);
                command
            }
            None => Command::new(path),
        };
        // A directory the owner may enter (the test's own may be closed to it).
        command.current_dir(self.dir.path());
        command
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let mut stop = self.command("pg_ctl");
        stop.arg("-D").arg(self.data()).args(["-m", "immediate", "-w", "stop"]);
        let _ = stop.output();
    }
}

/// Where `initdb` and `pg_ctl` are: `PG_BIN`, `PATH`, `pg_config --bindir`, or the newest
/// `/usr/lib/postgresql/*/bin` (as `scripts/with-postgres` looks).
fn postgres_bin() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("PG_BIN") {
        return Some(PathBuf::from(bin));
    }
    if let Some(pg_ctl) = super::which("pg_ctl") {
        return pg_ctl.parent().map(Path::to_path_buf);
    }
    let from_config = Command::new("pg_config").arg("--bindir").output().ok().filter(|output| output.status.success());
    if let Some(output) = from_config {
        let bin = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if bin.join("pg_ctl").is_file() {
            return Some(bin);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| Some((entry.file_name().to_str()?.parse().ok()?, entry.path().join("bin"))))
        .filter(|(_, bin)| bin.join("pg_ctl").is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}
