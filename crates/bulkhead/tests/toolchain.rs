//! The workspace's `rust-version` is a promise to anyone building with an older toolchain: it
//! must be at least the `rust-version` of every locked dependency, or `cargo build --locked` on
//! that toolchain fails inside a dependency instead of with cargo's clear message.
//!
//! Only one toolchain is installed where this runs, so the promise is checked against the lock
//! file's metadata, not by building with the older compiler.

use std::process::Command;

use serde_json::Value;

/// `1.89` and `1.89.0` are the same version: missing parts are zero.
fn parse_version(text: &str) -> [u64; 3] {
    let mut parts = text.split('.').map(|part| part.parse().unwrap_or(0));
    [(); 3].map(|_| parts.next().unwrap_or(0))
}

#[test]
fn rust_version_covers_every_locked_dependency() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.toml");
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--manifest-path", manifest])
        .output()
        .expect("running cargo metadata");
    if !output.status.success() {
        // Without the registry (no network, nothing cached) the metadata cannot be computed.
        eprintln!(
            "\n*** SKIPPED: cargo metadata failed, rust-version NOT checked ***\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        return;
    }
    let metadata: Value = serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON");
    let packages = metadata["packages"].as_array().expect("packages");
    let workspace_members: Vec<&Value> = metadata["workspace_members"].as_array().expect("members").iter().collect();
    // Every workspace crate must declare it (`rust-version.workspace = true`): cargo checks
    // only the package's own field, never `[workspace.package]` alone.
    let members: Vec<&Value> = packages.iter().filter(|package| workspace_members.contains(&&package["id"])).collect();
    let undeclared: Vec<&Value> =
        members.iter().filter(|package| package["rust_version"].is_null()).map(|package| &package["name"]).collect();
    assert!(undeclared.is_empty(), "crates without a rust-version: {undeclared:?}");
    let ours = members[0]["rust_version"].as_str().expect("a rust-version");
    assert!(members.iter().all(|package| package["rust_version"] == ours), "the crates disagree on rust-version");
    let resolved: Vec<&str> = metadata["resolve"]["nodes"]
        .as_array()
        .expect("resolve graph")
        .iter()
        .filter_map(|node| node["id"].as_str())
        .collect();
    let too_new: Vec<String> = packages
        .iter()
        .filter(|package| resolved.contains(&package["id"].as_str().unwrap_or("")))
        .filter(|package| !workspace_members.contains(&&package["id"]))
        .filter_map(|package| {
            let needed = package["rust_version"].as_str()?;
            (parse_version(needed) > parse_version(ours))
                .then(|| format!("{} {} needs {needed}", package["name"], package["version"]))
        })
        .collect();
    assert!(
        too_new.is_empty(),
        "rust-version = {ours} in Cargo.toml, but locked dependencies need more:\n{too_new:#?}"
    );
}
