//! The `_typeFilter` search-parameter table is generated from the vendored R4 definitions and
//! must not drift from them.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn the_search_parameter_table_is_up_to_date() {
    let generator = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("gen/gen_search_param_table.py");
    let output = Command::new("python3").arg(&generator).arg("--check").output().expect("run python3");
    assert!(
        output.status.success(),
        "search_param_table.rs is stale: run python3 crates/fhir/gen/gen_search_param_table.py ({})",
        String::from_utf8_lossy(&output.stderr)
    );
}
