//! A newcomer's first hour (issue 7 §4), through the real binary: the demo, the data tools and
//! the command line's treatment of a mistyped data directory, the environment, host names,
//! closed pipes and file permissions.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const CLI_DEADLINE: Duration = Duration::from_secs(60);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a `bulkhead` command to completion.
fn run(args: &[&str], data_dir: Option<&Path>) -> std::process::Output {
    let mut command = bulkhead();
    command.args(args);
    if let Some(data_dir) = data_dir {
        command.arg("--data-dir").arg(data_dir);
    }
    run_with_deadline(command, CLI_DEADLINE)
}

/// Counts of one thing printed with a plural noun (`1 resources`, `1 members`, …).
fn singular_mistakes(output: &str) -> Vec<String> {
    let words: Vec<&str> = output.split_whitespace().collect();
    words
        .windows(2)
        .filter(|pair| pair[0] == "1" && ["resources", "members", "files", "lines", "patients"].contains(&pair[1]))
        .map(|pair| pair.join(" "))
        .collect()
}

/// The summary lines of a demo run: `(sum of per-type counts, total, files)`.
fn export_summary(stdout: &str) -> (u64, u64, u64) {
    let (mut per_type, mut total) = (0, None);
    for line in stdout.lines() {
        match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["total", n, "resources" | "resource", "in", m, "files" | "file"] => {
                total = Some((n.parse::<u64>().unwrap(), m.parse::<u64>().unwrap()))
            }
            [_, n, "resources" | "resource"] => per_type += n.parse::<u64>().unwrap(),
            _ => {}
        }
    }
    let (resources, files) = total.unwrap_or_else(|| panic!("no total line:\n{stdout}"));
    (per_type, resources, files)
}

#[test]
fn demo_once_shows_the_export_but_no_curl_lines_for_its_stopped_server() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("demo");
    let listen = format!("127.0.0.1:{}", free_port());
    let demo = |patients: &str| {
        let mut command = bulkhead();
        command.args(["demo", "--once", "--listen", &listen, "--group-size", "1", "--patients", patients]);
        command.arg("--data-dir").arg(&data_dir);
        expect_success(&run_with_deadline(command, Duration::from_secs(120)), "bulkhead demo --once")
    };
    let stdout = demo("3");
    assert!(stdout.contains("$export → 200"), "no export line:\n{stdout}");
    let (per_type, resources, files) = export_summary(&stdout);
    assert!(resources >= 1 && files >= 1 && per_type == resources, "{stdout}");
    assert!(stdout.contains("with 1 member\n"), "a Group of one is '1 member':\n{stdout}");
    assert_eq!(singular_mistakes(&stdout), Vec::<String>::new(), "{stdout}");
    assert!(!stdout.contains("curl "), "curl lines for a server that has stopped:\n{stdout}");
    let rerun = format!("bulkhead demo --listen {listen} --data-dir {}", data_dir.display());
    assert!(stdout.contains("has stopped") && stdout.contains(&rerun), "no way to try the API named:\n{stdout}");

    // A second run keeps the data; a --patients that cannot take effect says so.
    let again = demo("7");
    assert!(!again.contains("generating"), "{again}");
    assert!(again.contains("--patients 7 is ignored"), "--patients silently ignored:\n{again}");
}

/// The demo serves until stopped, and the curl lines it prints work against it as printed.
#[tokio::test]
async fn demo_serves_and_its_curl_lines_work() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut command = bulkhead();
    command.args(["demo", "--listen", &format!("127.0.0.1:{port}"), "--patients", "20", "--data-dir"]);
    command.arg(dir.path().join("demo"));
    let (mut demo, stdout) = spawn_until(command, "serving on", Duration::from_secs(120));
    let (_, resources, files) = export_summary(&stdout);
    assert!(resources > 20 && files > 1, "{stdout}");
    let curl_lines: Vec<&str> = stdout.lines().map(str::trim).filter(|line| line.starts_with("curl ")).collect();
    assert!(curl_lines.len() >= 3, "curl lines:\n{stdout}");
    for line in &curl_lines {
        assert!(line.contains(&format!("http://127.0.0.1:{port}/")) && line.contains("client_id: bh_"), "{line}");
    }
    if which("curl").is_none() {
        eprintln!("curl is not installed: not running the printed curl lines");
    } else {
        check_curl_lines(&curl_lines);
    }
    let status = terminate_child(&mut demo, Duration::from_secs(10));
    assert!(status.success(), "demo exit status after SIGTERM: {status}");
}

fn check_curl_lines(curl_lines: &[&str]) {
    let mut typed_manifest = None;
    for line in curl_lines {
        let mut shell = Command::new("sh");
        shell.arg("-c").arg(format!("{line} --noproxy '*' -w '\\n%{{http_code}}'"));
        let text = expect_success(&run_with_deadline(shell, Duration::from_secs(30)), line);
        let (body, code) = text.trim_end().rsplit_once('\n').unwrap_or_else(|| panic!("{line}: {text}"));
        if line.contains("respond-async") {
            // Headers are dumped (-D -): a 202 with a status URL to poll.
            assert_eq!(code, "202", "{line}: {body}");
            assert!(body.to_ascii_lowercase().contains("content-location: http://127.0.0.1:"), "{line}: {body}");
            continue;
        }
        assert_eq!(code, "200", "{line}: {body}");
        let body: Value =
            serde_json::from_str(body).unwrap_or_else(|error| panic!("{line}: not JSON ({error}): {body}"));
        if !line.contains("$export") {
            assert_eq!(
                (body["resourceType"].as_str(), body["member"].as_array().map(Vec::len)),
                (Some("Group"), Some(20)),
                "{line}"
            );
        } else if line.contains("_since=") {
            // Nothing changed since the demo's own export.
            assert!(body["output"].as_array().unwrap().is_empty(), "{line}: {body}");
            assert!(body["deleted"].as_array().unwrap().is_empty(), "{line}: {body}");
        } else {
            assert!(!body["output"].as_array().unwrap().is_empty(), "{line}: {body}");
            if line.contains("_type=") {
                typed_manifest = Some(body);
            }
        }
    }
    // The `_type=Patient,Observation` line gives just those, and its Patient file downloads with
    // curl --compressed (as the demo suggests) with `count` lines.
    let typed = typed_manifest.expect("a curl line with _type");
    let types: BTreeSet<&str> =
        typed["output"].as_array().unwrap().iter().map(|item| item["type"].as_str().unwrap()).collect();
    assert_eq!(types, BTreeSet::from(["Observation", "Patient"]));
    let patients = typed["output"].as_array().unwrap().iter().find(|item| item["type"] == "Patient").unwrap();
    let headers: Vec<&str> = curl_lines[0].split('\'').filter(|part| part.starts_with("client_")).collect();
    assert_eq!(headers.len(), 2, "{}", curl_lines[0]);
    let mut curl = Command::new("curl");
    curl.args([
        "-s",
        "-f",
        "--compressed",
        "--noproxy",
        "*",
        "-H",
        headers[0],
        "-H",
        headers[1],
        patients["url"].as_str().unwrap(),
    ]);
    let ndjson = expect_success(&run_with_deadline(curl, Duration::from_secs(30)), "curl download");
    assert_eq!(ndjson.lines().count() as u64, patients["count"].as_u64().unwrap());
    assert!(ndjson.lines().all(|line| line.starts_with("{\"resourceType\":\"Patient\"")), "{ndjson}");
}

/// The port is checked before minutes of data generation, not after.
#[test]
fn demo_fails_at_once_when_its_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("demo");
    let mut command = bulkhead();
    // Enough patients that generating them first would take far longer than the deadline.
    command.args(["demo", "--once", "--listen", &address, "--patients", "200000", "--data-dir"]).arg(&data_dir);
    let started = Instant::now();
    let output = run_with_deadline(command, Duration::from_secs(30));
    assert!(!output.status.success(), "demo ran on a taken port");
    let stderr = text(&output.stderr);
    assert!(stderr.contains(&format!("binding {address}")), "{stderr}");
    assert!(!data_dir.join("synth").exists(), "data generated before the port was tried");
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
}

/// `bulkhead synth … | head` and `bulkhead demo … | head`: the reader goes away; the command
/// ends quietly instead of panicking on the broken pipe.
#[test]
fn a_closed_stdout_ends_synth_and_demo_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let synth_out = dir.path().join("synth");
    let demo_dir = dir.path().join("demo");
    let commands: [(&str, Vec<&str>); 2] = [
        ("synth", vec!["synth", "--patients", "3", "--out", synth_out.to_str().unwrap()]),
        (
            "demo",
            vec!["demo", "--once", "--patients", "3", "--listen", &listen, "--data-dir", demo_dir.to_str().unwrap()],
        ),
    ];
    for (name, args) in commands {
        let mut child =
            bulkhead().args(&args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        drop(child.stdout.take()); // the reader is gone before the first line
        let output = child.wait_with_output().unwrap();
        let stderr = text(&output.stderr);
        assert!(!stderr.contains("panicked"), "{name} panicked on a closed pipe:\n{stderr}");
        assert!(output.status.success(), "{name}: {}\n{stderr}", output.status);
    }
}

#[test]
fn a_data_directory_without_a_database_is_refused_and_hints_name_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let typo = dir.path().join("dta");
    let created = expect_success(&run(&["tenant", "create", "acme"], Some(&data)), "tenant create");
    assert!(
        created.contains(&format!("bulkhead client create --tenant acme --data-dir {}", data.display())),
        "{created}"
    );
    let file = dir.path().join("one.ndjson");
    std::fs::write(&file, r#"{"resourceType":"Patient","id":"p1"}"#).unwrap();
    let file = file.to_str().unwrap();
    for args in [
        vec!["tenant", "list"],
        vec!["client", "create", "--tenant", "acme"],
        vec!["client", "list", "--tenant", "acme"],
        vec!["client", "revoke", "bh_nothing"],
        vec!["import", "--tenant", "acme", file],
    ] {
        let output = run(&args, Some(&typo));
        assert!(!output.status.success(), "{args:?} succeeded on a data directory without a database");
        let stderr = text(&output.stderr);
        let database = typo.join("bulkhead.db");
        assert!(stderr.contains(&format!("no Bulkhead database at {}", database.display())), "{args:?}: {stderr}");
        assert!(!typo.exists(), "{args:?} created {}", typo.display());
    }
    // Hints that name a command name the data directory too.
    let output = run(&["client", "create", "--tenant", "acne"], Some(&data));
    let hint = format!("bulkhead tenant create acne --data-dir {}", data.display());
    assert!(!output.status.success() && text(&output.stderr).contains(&hint), "{}", text(&output.stderr));
    let output = run(&["import", "--tenant", "acne", file], Some(&data));
    assert!(!output.status.success() && text(&output.stderr).contains(&hint), "{}", text(&output.stderr));
    let output = run(&["client", "revoke", "bh_nothing"], Some(&data));
    let hint = format!("bulkhead client list --tenant NAME --data-dir {}", data.display());
    assert!(!output.status.success() && text(&output.stderr).contains(&hint), "{}", text(&output.stderr));
}

/// Kubernetes injects `BULKHEAD_PORT=tcp://…` (and more) for a Service named `bulkhead`: the
/// server starts, warning about each by name, never showing the value.
#[tokio::test]
async fn unknown_bulkhead_variables_are_warnings_that_never_show_their_values() {
    let env = vec![
        ("BULKHEAD_PORT".to_owned(), "tcp://10.0.0.1:8080".to_owned()),
        ("BULKHEAD_SERVICE_HOST".to_owned(), "10.0.0.1".to_owned()),
        ("BULKHEAD_MAX_BODY_BYTES".to_owned(), "4096".to_owned()),
    ];
    let server = Server::start_with(Options { env: env.clone(), ..Default::default() }).await;
    let log = server.log();
    for name in ["BULKHEAD_PORT", "BULKHEAD_SERVICE_HOST"] {
        assert!(log.contains(name), "no warning about {name}:\n{log}");
    }
    assert!(!log.contains("BULKHEAD_MAX_BODY_BYTES") && !log.contains("10.0.0.1"), "{log}");
    // The known key still took effect.
    server.create_tenant("acme");
    let api = server.create_client("acme");
    let big = serde_json::json!({"resourceType": "Patient", "name": [{"family": "x".repeat(5000)}]});
    assert_eq!(api.post("/r4/Patient", &big).await.status, 413);
    // The command-line tools warn the same way.
    let mut command = bulkhead();
    command.args(["tenant", "list", "--data-dir"]).arg(&server.data_dir).envs(env);
    let output = run_with_deadline(command, CLI_DEADLINE);
    let stderr = text(&output.stderr);
    assert!(
        output.status.success() && stderr.contains("warning: ignoring environment variable BULKHEAD_PORT"),
        "{stderr}"
    );
    assert!(!stderr.contains("10.0.0.1"), "{stderr}");
}

#[tokio::test]
async fn listen_accepts_a_host_name() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut command = bulkhead();
    command.args(["serve", "--listen", &format!("localhost:{port}"), "--data-dir"]).arg(dir.path().join("data"));
    command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let started = Instant::now();
    let mut healthy = false;
    while started.elapsed() < Duration::from_secs(30) && !healthy {
        if let Some(status) = child.try_wait().unwrap() {
            let output = child.wait_with_output().unwrap();
            panic!("serve --listen localhost:{port} exited with {status}: {}", text(&output.stderr));
        }
        let reply = http_client().get(format!("http://localhost:{port}/healthz")).send().await;
        healthy = reply.is_ok_and(|reply| reply.status() == 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = terminate_child(&mut child, Duration::from_secs(10));
    assert!(healthy, "no answer on localhost:{port}");
    assert!(status.success(), "{status}");
}

#[test]
fn import_reads_jsonl_refuses_an_empty_directory_and_says_what_it_stored() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    expect_success(&run(&["tenant", "create", "t"], Some(&data)), "tenant create");
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("a.jsonl"), "{\"resourceType\":\"Patient\",\"id\":\"a\"}\n").unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, b"{\"resourceType\":\"Patient\",\"id\":\"b\"}\n").unwrap();
    std::fs::write(files.join("b.jsonl.gz"), gz.finish().unwrap()).unwrap();
    std::fs::write(files.join("notes.txt"), "not data").unwrap();
    // Hidden entries are skipped without a word, even when named like data.
    std::fs::write(files.join(".complete"), "").unwrap();
    std::fs::create_dir_all(files.join(".cache")).unwrap();
    std::fs::write(files.join(".cache").join("c.ndjson"), "{\"resourceType\":\"Patient\",\"id\":\"hidden\"}\n")
        .unwrap();
    let output = run(&["import", "--tenant", "t", files.to_str().unwrap()], Some(&data));
    let stdout = expect_success(&output, "import of .jsonl files");
    assert!(stdout.contains("imported 2 resources") && stdout.contains("2 created"), "{stdout}");
    assert!(
        text(&output.stderr).contains("skipping") && text(&output.stderr).contains("notes.txt"),
        "{}",
        text(&output.stderr)
    );
    assert!(!text(&output.stderr).contains(".complete"), "{}", text(&output.stderr));

    // One resource is "1 resource".
    let one = dir.path().join("one.ndjson");
    std::fs::write(&one, "{\"resourceType\":\"Patient\",\"id\":\"c\"}\n").unwrap();
    let stdout = expect_success(&run(&["import", "--tenant", "t", one.to_str().unwrap()], Some(&data)), "import");
    assert!(stdout.contains("imported 1 resource in"), "{stdout}");

    // A directory with nothing to import is an error, not "imported 0 resources".
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let only_notes = dir.path().join("notes");
    std::fs::create_dir_all(&only_notes).unwrap();
    std::fs::write(only_notes.join("readme.txt"), "x").unwrap();
    for directory in [&empty, &only_notes] {
        let output = run(&["import", "--tenant", "t", directory.to_str().unwrap()], Some(&data));
        assert!(!output.status.success(), "importing {} succeeded", directory.display());
        assert!(text(&output.stderr).contains("holds no file to import"), "{}", text(&output.stderr));
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Every file and directory under `dir` with its mode.
fn modes(dir: &Path) -> Vec<(String, u32)> {
    let mut found = vec![(dir.display().to_string(), mode(dir))];
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(modes(&path));
        } else {
            found.push((path.display().to_string(), mode(&path)));
        }
    }
    found
}

/// The data directory holds patient data and signing keys: with the most permissive umask the
/// server creates nothing another user can read, and tightens what was left readable.
#[tokio::test]
async fn the_data_directory_is_private_whatever_the_umask() {
    let server = Server::start_with(Options { umask: Some(0), ..Default::default() }).await;
    server.create_tenant("acme");
    let api = server.create_client("acme");
    api.upsert(&patient(Some("p1"), "Private")).await;
    assert!(!server.log().contains("readable by other users"), "a false alarm:\n{}", server.log());
    let found = modes(&server.data_dir);
    for name in ["bulkhead.db", "bulkhead.db-wal", "bulkhead.db-shm", "output"] {
        assert!(found.iter().any(|(path, _)| path.ends_with(name)), "{name} not created: {found:?}");
    }
    let exposed: Vec<String> = found
        .iter()
        .filter(|(path, mode)| *mode != if Path::new(path).is_dir() { 0o700 } else { 0o600 })
        .map(|(path, mode)| format!("{path} {mode:o}"))
        .collect();
    assert!(exposed.is_empty(), "not private (want 0700 directories, 0600 files): {exposed:?}");
    drop(api);
    drop(server);

    // Left readable by an older version or by hand: tightened at the next start, with a warning.
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let first = Server::start_with(Options { data_dir: Some(data_dir.clone()), ..Default::default() }).await;
    drop(first);
    for (name, loose) in [("", 0o755), ("bulkhead.db", 0o644), ("output", 0o777)] {
        std::fs::set_permissions(data_dir.join(name), std::fs::Permissions::from_mode(loose)).unwrap();
    }
    let second = Server::start_with(Options { data_dir: Some(data_dir.clone()), ..Default::default() }).await;
    let log = second.log();
    assert!(log.contains("readable by other users"), "no warning:\n{log}");
    for (name, private) in [("", 0o700), ("bulkhead.db", 0o600), ("output", 0o700)] {
        assert_eq!(mode(&data_dir.join(name)), private, "{name} after a restart: {:o}", mode(&data_dir.join(name)));
    }
}
