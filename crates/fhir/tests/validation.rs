//! The R4 structural validator: the whole vendored Synthea sample is valid, the generated table
//! is fresh, and a table of broken resources yields exactly the expected violations.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use bulkhead_fhir::validation::{validate_resource, Violation, MAX_VIOLATIONS};
use bulkhead_fhir::IssueType;
use serde_json::Value;

fn test_data(relative: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata").join(relative);
    assert!(path.exists(), "test data missing: {} (vendored under testdata/)", path.display());
    path
}

/// Every line of every vendored Synthea file, as (file name, line number, text).
fn synthea_lines() -> Vec<(String, usize, String)> {
    let dir = test_data("synthea-100");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("read synthea-100")
        .map(|entry| entry.expect("dir entry").path())
        .filter(|path| path.to_string_lossy().ends_with(".ndjson.gz"))
        .collect();
    files.sort();
    let mut lines = Vec::new();
    for path in files {
        let output = Command::new("gzip").arg("-dc").arg(&path).output().expect("run gzip -dc");
        assert!(output.status.success(), "gzip -dc {} failed", path.display());
        let text = String::from_utf8(output.stdout).expect("utf-8 NDJSON");
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        for (index, line) in text.lines().enumerate() {
            lines.push((name.clone(), index + 1, line.to_owned()));
        }
    }
    lines
}

#[test]
fn every_synthea_resource_is_valid_r4() {
    let lines = synthea_lines();
    assert_eq!(lines.len(), 38_483, "the vendored sample has 38,483 resources");
    let parse_start = thread_cpu_nanos();
    let resources: Vec<Value> = lines.iter().map(|(_, _, text)| serde_json::from_str(text).expect("JSON")).collect();
    if let (Some(before), Some(after)) = (parse_start, thread_cpu_nanos()) {
        // For scale: what parsing the same lines into serde_json Values costs.
        eprintln!("parsing: {:.0} ns/resource on CPU", (after - before) as f64 / resources.len() as f64);
    }
    let mut problems = Vec::new();
    for ((file, line, _), resource) in lines.iter().zip(&resources) {
        for violation in validate_resource(resource) {
            problems.push(format!("{file}:{line}: {}: {}", violation.expression, violation.message));
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems, first ones:\n{}",
        problems.len(),
        problems[..problems.len().min(20)].join("\n")
    );

    // Speed, on the same data (a release build is what counts: `cargo test --release`). CPU time
    // of this thread too, since wall time on a shared machine says little.
    let (start, cpu_start) = (Instant::now(), thread_cpu_nanos());
    let rounds = 5;
    for _ in 0..rounds {
        for resource in &resources {
            std::hint::black_box(validate_resource(resource));
        }
    }
    let count = (rounds * resources.len()) as f64;
    let wall = start.elapsed().as_nanos() as f64 / count;
    eprintln!("validation: {wall:.0} ns/resource wall, {:.0} resources/s", 1e9 / wall);
    if let (Some(before), Some(after)) = (cpu_start, thread_cpu_nanos()) {
        let cpu = (after - before) as f64 / count;
        eprintln!(
            "validation of resources in memory: {cpu:.0} ns/resource on CPU, {:.0} resources/s per core",
            1e9 / cpu
        );
    }
    // As an import sees it: each line parsed and validated at once, while it is in the cache.
    // The cost is parse + validate minus parse alone.
    let time_lines = |validate: bool| {
        let before = thread_cpu_nanos();
        for (_, _, text) in &lines {
            let resource: Value = serde_json::from_str(text).expect("JSON");
            if validate {
                std::hint::black_box(validate_resource(&resource));
            }
            std::hint::black_box(resource);
        }
        Some(thread_cpu_nanos()? - before?)
    };
    if let (Some(parse), Some(both)) = (time_lines(false), time_lines(true)) {
        let cpu = both.saturating_sub(parse) as f64 / lines.len() as f64;
        eprintln!("validation right after parsing: {cpu:.0} ns/resource on CPU, {:.0} resources/s per core", 1e9 / cpu);
    }
}

/// This thread's time on a CPU so far (Linux `schedstat`), if the system says.
fn thread_cpu_nanos() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

#[test]
fn generated_table_is_fresh() {
    let generator = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("gen/gen_validation_table.py");
    let status = Command::new("python3").arg(&generator).arg("--check").status().expect("run python3");
    assert!(status.success(), "validation_table.rs is stale: run python3 crates/fhir/gen/gen_validation_table.py");
}

fn violations(text: &str) -> Vec<(String, IssueType)> {
    let resource: Value = serde_json::from_str(text).expect("test JSON");
    validate_resource(&resource).into_iter().map(|v| (v.expression, v.code)).collect()
}

fn expect(text: &str, expected: &[(&str, IssueType)]) {
    let found = violations(text);
    let expected: Vec<(String, IssueType)> = expected.iter().map(|(e, c)| (e.to_string(), *c)).collect();
    assert_eq!(found, expected, "for {text}");
}

#[test]
fn rejects_the_issue_examples() {
    use IssueType::*;
    expect(
        r#"{"resourceType":"Patient","gender":"banana","birthDate":"not-a-date","foo":1}"#,
        &[("Patient.gender", CodeInvalid), ("Patient.birthDate", Value), ("Patient.foo", Structure)],
    );
    expect(
        r#"{"resourceType":"Observation","status":"bogus"}"#,
        &[("Observation.status", CodeInvalid), ("Observation.code", Required)],
    );
}

#[test]
fn broken_resources_yield_exact_violations() {
    use IssueType::*;
    let cases: &[(&str, &[(&str, IssueType)])] = &[
        // Arrays where single values belong, and the reverse.
        (r#"{"resourceType":"Patient","gender":["male"]}"#, &[("Patient.gender", Structure)]),
        (r#"{"resourceType":"Patient","name":{"family":"Doe"}}"#, &[("Patient.name", Structure)]),
        (r#"{"resourceType":"Patient","name":[{"given":"Jo"}]}"#, &[("Patient.name[0].given", Structure)]),
        // Wrong JSON types, nulls, empty strings. (Empty arrays are accepted: a Group whose last
        // member left is written as `"member": []` by real clients.)
        (r#"{"resourceType":"Patient","active":"true"}"#, &[("Patient.active", Structure)]),
        (r#"{"resourceType":"Patient","name":[{"given":["Jo",1]}]}"#, &[("Patient.name[0].given[1]", Structure)]),
        (r#"{"resourceType":"Patient","name":[{"family":""}]}"#, &[("Patient.name[0].family", Value)]),
        (r#"{"resourceType":"Patient","gender":null}"#, &[("Patient.gender", Structure)]),
        (r#"{"resourceType":"Patient","maritalStatus":"M"}"#, &[("Patient.maritalStatus", Structure)]),
        // Two choice values.
        (
            r#"{"resourceType":"Patient","deceasedBoolean":true,"deceasedDateTime":"2020-01-01"}"#,
            &[("Patient.deceasedDateTime", Structure)],
        ),
        // A bad contained resource, and a contained resource containing another.
        (
            r#"{"resourceType":"Patient","contained":[{"resourceType":"Observation","id":"o","status":"final"}]}"#,
            &[("Patient.contained[0].code", Required)],
        ),
        (
            r#"{"resourceType":"Patient","contained":[{"resourceType":"Nope"}]}"#,
            &[("Patient.contained[0].resourceType", Value)],
        ),
        (
            r#"{"resourceType":"Patient","contained":[{"resourceType":"Patient","contained":[{"resourceType":"Patient"}]}]}"#,
            &[("Patient.contained[0].contained", Structure)],
        ),
        // Extensions: url required, value xor nested extensions, one value; modifierExtension too.
        (r#"{"resourceType":"Patient","extension":[{"valueString":"x"}]}"#, &[("Patient.extension[0].url", Required)]),
        (
            r#"{"resourceType":"Patient","extension":[{"url":"u","valueString":"x","valueBoolean":true}]}"#,
            &[("Patient.extension[0].valueBoolean", Structure)],
        ),
        (
            r#"{"resourceType":"Patient","extension":[{"url":"u","valueString":"x","extension":[{"url":"v","valueCode":"c"}]}]}"#,
            &[("Patient.extension[0]", Structure)],
        ),
        (
            r#"{"resourceType":"Patient","modifierExtension":[{"url":"u","valueFoo":1}]}"#,
            &[("Patient.modifierExtension[0].valueFoo", Structure)],
        ),
        // Primitive extensions: objects, aligned arrays with nulls.
        (r#"{"resourceType":"Patient","_birthDate":"x"}"#, &[("Patient._birthDate", Structure)]),
        (
            r#"{"resourceType":"Patient","_birthDate":{"extension":[{"valueCode":"unknown"}]}}"#,
            &[("Patient._birthDate.extension[0].url", Required)],
        ),
        (r#"{"resourceType":"Patient","_name":{}}"#, &[("Patient._name", Structure)]),
        (r#"{"resourceType":"Patient","name":[{"given":["a",null]}]}"#, &[("Patient.name[0].given[1]", Structure)]),
        (
            r#"{"resourceType":"Patient","name":[{"given":["a","b"],"_given":[null]}]}"#,
            &[("Patient.name[0]._given", Structure)],
        ),
        // Integers out of range, decimals as strings.
        (r#"{"resourceType":"Patient","multipleBirthInteger":2147483648}"#, &[("Patient.multipleBirthInteger", Value)]),
        (r#"{"resourceType":"Patient","multipleBirthInteger":1.5}"#, &[("Patient.multipleBirthInteger", Value)]),
        (
            r#"{"resourceType":"Observation","status":"final","code":{"text":"t"},"valueQuantity":{"value":"1.5"}}"#,
            &[("Observation.valueQuantity.value", Structure)],
        ),
        // Other formats.
        (r#"{"resourceType":"Patient","id":"a_b"}"#, &[("Patient.id", Value)]),
        (r#"{"resourceType":"Patient","meta":{"lastUpdated":"2020-01-01"}}"#, &[("Patient.meta.lastUpdated", Value)]),
        (r#"{"resourceType":"Patient","photo":[{"data":"abc"}]}"#, &[("Patient.photo[0].data", Value)]),
        (r#"{"resourceType":"Patient","identifier":[{"system":"a b"}]}"#, &[("Patient.identifier[0].system", Value)]),
        // Backbone elements and contentReference (Questionnaire.item.item).
        (r#"{"resourceType":"Patient","contact":[{"gender":"x"}]}"#, &[("Patient.contact[0].gender", CodeInvalid)]),
        (
            r#"{"resourceType":"Questionnaire","status":"draft","item":[{"linkId":"1","type":"group","item":[{"linkId":"2"}]}]}"#,
            &[("Questionnaire.item[0].item[0].type", Required)],
        ),
        // Resources anywhere: Bundle entries are validated as resources.
        (
            r#"{"resourceType":"Bundle","type":"collection","entry":[{"resource":{"resourceType":"Patient","gender":"x"}}]}"#,
            &[("Bundle.entry[0].resource.gender", CodeInvalid)],
        ),
        // resourceType itself.
        (r#"{"resourceType":"HumanName"}"#, &[("resourceType", Value)]),
        (r#"{"gender":"male"}"#, &[("resourceType", Required)]),
    ];
    for (text, expected) in cases {
        expect(text, expected);
    }
}

#[test]
fn accepts_valid_edge_cases() {
    let valid = [
        // Decimals keep their text: all of these are valid R4 decimals.
        r#"{"resourceType":"Observation","status":"final","code":{"text":"t"},"valueQuantity":{"value":-0.0}}"#,
        r#"{"resourceType":"Observation","status":"final","code":{"text":"t"},"valueQuantity":{"value":1e2}}"#,
        r#"{"resourceType":"Observation","status":"final","code":{"text":"t"},"valueQuantity":{"value":1.50}}"#,
        r#"{"resourceType":"Observation","status":"final","code":{"text":"t"},"valueQuantity":{"value":3.14159265358979323846264338}}"#,
        // A primitive with only an extension satisfies min 1; aligned arrays with nulls.
        r#"{"resourceType":"Observation","_status":{"extension":[{"url":"http://hl7.org/fhir/StructureDefinition/data-absent-reason","valueCode":"unknown"}]},"code":{"text":"t"}}"#,
        r#"{"resourceType":"Patient","name":[{"given":["a",null],"_given":[null,{"extension":[{"url":"u","valueString":"b"}]}]}]}"#,
        r#"{"resourceType":"Patient","birthDate":"1970","_birthDate":{"extension":[{"url":"u","valueDateTime":"1970-01-01T10:00:00Z"}]}}"#,
        r##"{"resourceType":"Patient","contained":[{"resourceType":"Organization","id":"o1","name":"Org"}],"managingOrganization":{"reference":"#o1"}}"##,
        r#"{"resourceType":"Patient","extension":[{"url":"u","extension":[{"url":"v","valueInteger":-2147483648}]}]}"#,
        r#"{"resourceType":"Questionnaire","status":"draft","item":[{"linkId":"1","type":"group","item":[{"linkId":"2","type":"string"}]}]}"#,
        r#"{"resourceType":"Parameters","parameter":[{"name":"p","resource":{"resourceType":"Patient","active":true}}]}"#,
    ];
    for text in valid {
        assert_eq!(violations(text), vec![], "for {text}");
    }
}

#[test]
fn messages_say_what_is_wrong() {
    let resource: Value =
        serde_json::from_str(r#"{"resourceType":"Patient","gender":"banana","birthDate":"not-a-date","foo":1}"#)
            .unwrap();
    let messages: Vec<String> = validate_resource(&resource).into_iter().map(|v| v.message).collect();
    assert!(
        messages[0].contains("'banana'") && messages[0].contains("female | male | other | unknown"),
        "{messages:?}"
    );
    assert!(messages[1].contains("'not-a-date' is not a date"), "{messages:?}");
    assert!(messages[2].contains("unknown element 'foo'"), "{messages:?}");
}

#[test]
fn violations_are_capped() {
    let fields: Vec<String> = (0..500).map(|i| format!("\"bad{i}\":1")).collect();
    let text = format!("{{\"resourceType\":\"Patient\",{}}}", fields.join(","));
    let found: Vec<Violation> = validate_resource(&serde_json::from_str(&text).unwrap());
    assert_eq!(found.len(), MAX_VIOLATIONS);
    assert_eq!(found.last().unwrap().code, IssueType::TooCostly);
}
