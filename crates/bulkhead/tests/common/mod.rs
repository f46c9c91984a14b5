//! Helpers for the black-box tier: start the built `bulkhead` binary on a free port with a
//! temporary data directory, run its CLI against the same directory, and talk to it over HTTP
//! exactly as a user would.

#![allow(dead_code)]

use std::fs::File;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

mod api;
mod export;
mod postgres_cluster;
mod s3_bucket;

// Each test crate uses a part of the harness.
#[allow(unused_imports)]
pub use api::*;
#[allow(unused_imports)]
pub use export::*;
#[allow(unused_imports)]
pub use postgres_cluster::*;
#[allow(unused_imports)]
pub use s3_bucket::*;

/// The binary under test, built by cargo for this test target.
pub const BIN: &str = env!("CARGO_BIN_EXE_bulkhead");

/// How long a debug build may take to answer `/healthz`.
const STARTUP_DEADLINE: Duration = Duration::from_secs(30);

/// A `bulkhead` command with no `BULKHEAD_*` or proxy variables inherited from the test's
/// environment, so only what a test sets reaches the child.
pub fn bulkhead() -> Command {
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        if name.starts_with("BULKHEAD_") || name.to_ascii_lowercase().ends_with("_proxy") {
            command.env_remove(name);
        }
    }
    command
}

/// Runs `command` with the given umask (set in the child, so other tests are unaffected).
pub fn with_umask(command: &mut Command, mask: u32) {
    use std::os::unix::process::CommandExt;
    // SAFETY: umask is async-signal-safe and touches only the child's own process state.
    unsafe {
        command.pre_exec(move || {
            libc::umask(mask as libc::mode_t);
            Ok(())
        });
    }
}

/// Spawns `command` and reads its stdout until a line contains `marker`; returns the child
/// (still running, stdout still being drained) and the output so far. Fails the test when the
/// child exits first or `deadline` passes.
pub fn spawn_until(mut command: Command, marker: &str, deadline: Duration) -> (Child, String) {
    use std::io::BufRead;
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawning the command");
    let stdout = child.stdout.take().expect("piped stdout");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    // Keeps draining after the marker so the child never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    let mut seen = String::new();
    loop {
        match lines_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
                if line.contains(marker) {
                    return (child, seen);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let output = child.wait_with_output().expect("collecting the command's output");
                panic!(
                    "{command:?} ended without printing {marker:?}\nstdout:\n{seen}\nstderr:\n{}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("collecting the command's output");
            panic!(
                "{command:?} did not print {marker:?} within {deadline:?}\nstdout:\n{seen}\nstderr:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

/// Sends SIGTERM to a child this test started and waits for it to exit.
pub fn terminate_child(child: &mut Child, deadline: Duration) -> ExitStatus {
    let status = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().expect("running kill");
    assert!(status.success(), "kill -TERM {} failed", child.id());
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("waiting for the child") {
            return status;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            panic!("the child did not exit within {deadline:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A port nobody listens on right now (bound, read, released).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// Runs a command to completion, failing the test if it takes longer than `deadline`.
pub fn run_with_deadline(mut command: Command, deadline: Duration) -> Output {
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawning the command");
    let started = Instant::now();
    loop {
        if child.try_wait().expect("waiting for the command").is_some() {
            return child.wait_with_output().expect("collecting the command's output");
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("collecting the command's output");
            panic!(
                "{command:?} did not finish within {deadline:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts a CLI run succeeded and returns its stdout.
pub fn expect_success(output: &Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed with {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("stdout is UTF-8")
}

/// How to start a server.
#[derive(Default)]
pub struct Options {
    /// Environment variables for the child (e.g. `BULKHEAD_MAX_BODY_BYTES`).
    pub env: Vec<(String, String)>,
    /// Contents of a TOML file passed with `--config`.
    pub config_toml: Option<String>,
    /// A fixed port instead of a free one.
    pub port: Option<u16>,
    /// An existing data directory instead of a fresh one.
    pub data_dir: Option<PathBuf>,
    /// The server's umask (default: the test's own).
    pub umask: Option<u32>,
    /// PostgreSQL instead of SQLite (`serve --database-url`; [`Server::cli`] passes it on too).
    pub database_url: Option<String>,
}

/// A running `bulkhead serve`, killed (by its own PID) when dropped.
pub struct Server {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    pub port: u16,
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    log: PathBuf,
    _dir: TempDir,
}

impl Server {
    /// Starts a server with default settings on a fresh data directory.
    pub async fn start() -> Server {
        Server::start_with(Options::default()).await
    }

    /// Starts a server and waits until `GET /healthz` answers 200.
    pub async fn start_with(options: Options) -> Server {
        let mut dir = tempfile::tempdir().expect("temporary directory");
        let data_dir = options.data_dir.clone().unwrap_or_else(|| dir.path().join("data"));
        let config = options.config_toml.as_ref().map(|toml| {
            let path = dir.path().join("bulkhead.toml");
            std::fs::write(&path, toml).expect("writing the config file");
            path
        });
        // The port was free a moment ago; if someone else took it in between, try another.
        for attempt in 1..=3 {
            let port = options.port.unwrap_or_else(free_port);
            let log = dir.path().join(format!("server-{attempt}.log"));
            let mut command = bulkhead();
            command.arg("serve").arg("--listen").arg(format!("127.0.0.1:{port}")).arg("--data-dir").arg(&data_dir);
            if let Some(config) = &config {
                command.arg("--config").arg(config);
            }
            if let Some(url) = &options.database_url {
                command.arg("--database-url").arg(url);
            }
            command.envs(options.env.iter().map(|(name, value)| (name.as_str(), value.as_str())));
            if let Some(mask) = options.umask {
                with_umask(&mut command, mask);
            }
            command.env("RUST_LOG", "info");
            command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(File::create(&log).expect("creating the server log"));
            let child = command.spawn().expect("spawning bulkhead serve");
            let mut server = Server {
                child: Some(child),
                base: format!("http://127.0.0.1:{port}"),
                port,
                data_dir: data_dir.clone(),
                database_url: options.database_url.clone(),
                log,
                _dir: dir,
            };
            match server.wait_ready().await {
                Ok(()) => return server,
                Err(log) if attempt < 3 && options.port.is_none() && log.contains("binding") => {
                    dir = server.into_dir();
                    continue;
                }
                Err(log) => panic!("bulkhead serve did not come up on port {port}:\n{log}"),
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// Polls `/healthz` until 200; on failure returns the server's stderr.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let http = http_client();
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().expect("child").try_wait().expect("checking the server") {
                return Err(format!("exited early with {status}\n{}", self.log()));
            }
            if let Ok(response) = http.get(format!("{}/healthz", self.base)).send().await {
                if response.status() == 200 {
                    return Ok(());
                }
            }
            if started.elapsed() > STARTUP_DEADLINE {
                return Err(format!("no 200 from /healthz within {STARTUP_DEADLINE:?}\n{}", self.log()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the child and hands back the temporary directory (for a retry on another port).
    fn into_dir(mut self) -> TempDir {
        self.kill();
        let dir = tempfile::tempdir().expect("temporary directory");
        std::mem::replace(&mut self._dir, dir)
    }

    /// SIGKILL, as a crash or an out-of-memory kill would stop it: no shutdown of any kind.
    pub fn sigkill(&mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The server's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is running").id()
    }

    /// Sends SIGTERM and waits (up to `deadline`) for the process to exit.
    pub fn terminate(&mut self, deadline: Duration) -> ExitStatus {
        let pid = self.pid().to_string();
        let status = Command::new("kill").arg("-TERM").arg(&pid).status().expect("running kill");
        assert!(status.success(), "kill -TERM {pid} failed");
        let started = Instant::now();
        let child = self.child.as_mut().expect("server is running");
        loop {
            if let Some(status) = child.try_wait().expect("waiting for the server") {
                self.child = None;
                return status;
            }
            if started.elapsed() > deadline {
                panic!("bulkhead did not exit within {deadline:?} of SIGTERM\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs a `bulkhead` subcommand against this server's data directory (appends
    /// `--data-dir`, and `--database-url` on PostgreSQL), failing the test if it fails.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut command = bulkhead();
        command.args(args).arg("--data-dir").arg(&self.data_dir);
        if let Some(url) = &self.database_url {
            command.arg("--database-url").arg(url);
        }
        let output = run_with_deadline(command, Duration::from_secs(30));
        expect_success(&output, &format!("bulkhead {}", args.join(" ")))
    }

    /// `bulkhead tenant create NAME`.
    pub fn create_tenant(&self, name: &str) {
        self.cli(&["tenant", "create", name]);
    }

    /// `bulkhead client create --tenant NAME --json`: one JSON object with the credentials.
    pub fn create_client(&self, tenant: &str) -> Api {
        let stdout = self.cli(&["client", "create", "--tenant", tenant, "--json"]);
        let lines: Vec<&str> = stdout.lines().filter(|line| !line.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "client create --json must print exactly one JSON object, got:\n{stdout}");
        let created: Value =
            serde_json::from_str(lines[0]).unwrap_or_else(|error| panic!("not JSON ({error}): {stdout}"));
        let id = created["client_id"].as_str().unwrap_or_else(|| panic!("no client_id in {created}")).to_owned();
        let secret =
            created["client_secret"].as_str().unwrap_or_else(|| panic!("no client_secret in {created}")).to_owned();
        assert!(!id.is_empty() && !secret.is_empty(), "empty credentials: {created}");
        Api { http: http_client(), base: self.base.clone(), client_id: id, client_secret: secret, user: None }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The path of `program` on `PATH`, if installed.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join(program)).find(|path| path.is_file()))
}
