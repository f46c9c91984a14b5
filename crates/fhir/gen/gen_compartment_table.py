#!/usr/bin/env python3
"""Generates crates/fhir/src/compartment_table.rs, the R4 Patient compartment table.

Inputs (official HL7 FHIR R4 4.0.1 definitions, CC0):
  - compartmentdefinition-patient.json: for each resource type, the search parameter codes
    that put a resource of that type into a patient's compartment;
  - search-parameters.json: the Bundle of all R4 SearchParameters (code, base, expression).

For every (type, param) pair in the CompartmentDefinition, the generator finds the
SearchParameter with that `code` whose `base` contains the type, keeps the union branches of
its FHIRPath `expression` that start with `{Type}.`, and turns each branch into a JSON element
path (a list of property names). The table is written sorted by type name so that the Rust
side can binary-search it.

Usage (from anywhere; paths default to the definitions vendored under `testdata/fhir-r4`):
  python3 crates/fhir/gen/gen_compartment_table.py            # (re)write the table
  python3 crates/fhir/gen/gen_compartment_table.py --check    # exit 1 if the file is stale
  python3 crates/fhir/gen/gen_compartment_table.py --data-dir DIR --out FILE

Any branch that cannot be translated is reported on stderr. Every (type, param) pair must
end up with at least one path; if one cannot, the generator fails unless the pair has a
documented entry in EXCEPTIONS below.
"""

import argparse
import json
import os
import re
import subprocess
import sys

from generated_file import write_or_check

HERE = os.path.dirname(os.path.abspath(__file__))
CRATE_DIR = os.path.dirname(HERE)
# The official definitions are vendored in the repository (testdata/README.md says from where).
DEFAULT_DATA_DIR = os.path.normpath(os.path.join(CRATE_DIR, "..", "..", "testdata", "fhir-r4"))
DEFAULT_OUT = os.path.join(CRATE_DIR, "src", "compartment_table.rs")

COMPARTMENT_FILE = "compartmentdefinition-patient.json"
SEARCH_PARAMS_FILE = "search-parameters.json"

# Hand-written paths for (type, param) pairs whose expression cannot be translated
# mechanically, with the reason. R4 4.0.1 needs none: every compartment parameter's
# expression is a plain path, optionally with `.where(resolve() is Patient)`. Keep the
# reason next to any entry added here; it is copied into the generated file.
EXCEPTIONS = {
    # ("Type", "param"): ([["element", "path"]], "why this is hand-written"),
}

# The compartment's defining parameter: a Patient is in its own compartment. The Rust side
# handles that (it adds the Patient's own id), so it needs no table path.
DEF_PARAM = "{def}"

# Lines are laid out as rustfmt would (default max_width and array_width), so that
# formatting the crate leaves the generated file alone.
RUSTFMT_MAX_WIDTH = 100
RUSTFMT_ARRAY_WIDTH = 60

SEGMENT = re.compile(r"[a-z][A-Za-z0-9]*(\[x\])?$")
WHERE_PATIENT = re.compile(r"\.where\(\s*resolve\(\)\s+is\s+Patient\s*\)$")
AS_FUNCTION = re.compile(r"\.as\(\s*([A-Za-z]+)\s*\)$")
AS_OPERATOR = re.compile(r"\s+as\s+([A-Za-z]+)$")


class Untranslatable(Exception):
    """A FHIRPath branch the table cannot express."""


def strip_parens(text):
    """Removes whitespace and any number of parentheses that wrap the whole expression."""
    text = text.strip()
    while text.startswith("(") and text.endswith(")") and balanced(text[1:-1]):
        text = text[1:-1].strip()
    return text


def balanced(text):
    depth = 0
    for ch in text:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def split_union(expression):
    """Splits a FHIRPath expression into its union (`|`) branches, also inside parentheses."""
    text = strip_parens(expression)
    branches, depth, quoted, start = [], 0, False, 0
    for i, ch in enumerate(text):
        if ch == "'":
            quoted = not quoted
        elif quoted:
            continue
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            branches.append(text[start:i])
            start = i + 1
    if start == 0:
        return [text]
    branches.append(text[start:])
    return [leaf for branch in branches for leaf in split_union(branch)]


def translate(branch, resource_type):
    """Turns one FHIRPath branch into (element path, note).

    Handles plain paths, `.where(resolve() is Patient)` (dropped: only references to Patients
    are counted anyway), casts to Reference (`.as(Reference)`, `X.y as Reference`), which in
    R4 search parameters always select the Reference choice of a `y[x]` element and so become
    the JSON property `yReference`, and a literal `y[x]` segment (also `yReference`).
    """
    text = strip_parens(branch)
    notes = []
    if WHERE_PATIENT.search(text):
        text = strip_parens(WHERE_PATIENT.sub("", text))
        notes.append("only Patient targets count")
    cast = AS_FUNCTION.search(text) or AS_OPERATOR.search(text)
    if cast:
        if cast.group(1) != "Reference":
            raise Untranslatable("cast to %s cannot hold a reference" % cast.group(1))
        text = strip_parens(text[: cast.start()])
        if text.endswith("[x]"):
            text = text[:-3]
        text += "[x]"
        notes.append("choice type, Reference branch")
    prefix = resource_type + "."
    if not text.startswith(prefix):
        raise Untranslatable("does not start with %s" % prefix)
    path = []
    for segment in text[len(prefix):].split("."):
        if not SEGMENT.match(segment):
            raise Untranslatable("unsupported FHIRPath step %r" % segment)
        if segment.endswith("[x]"):
            # A choice element: its reference form is the JSON property `{name}Reference`.
            segment = segment[:-3] + "Reference"
        path.append(segment)
    return path, "; ".join(notes)


def find_search_parameter(search_params, resource_type, code):
    """The SearchParameter with this code whose base includes the type (exactly one in R4)."""
    matches = [sp for sp in search_params if sp.get("code") == code and resource_type in sp.get("base", [])]
    if len(matches) != 1:
        raise Untranslatable("%d SearchParameters with code %r and base %s" % (len(matches), code, resource_type))
    return matches[0]


def paths_for(search_params, resource_type, code):
    """All element paths for one (type, param) pair, as [(path, note, source)]."""
    if (resource_type, code) in EXCEPTIONS:
        paths, why = EXCEPTIONS[(resource_type, code)]
        return [(p, "hand-written: " + why, "generator EXCEPTIONS") for p in paths]
    sp = find_search_parameter(search_params, resource_type, code)
    result = []
    for branch in split_union(sp.get("expression", "")):
        if not branch.startswith(resource_type + "."):
            continue  # a branch for another base type of a shared parameter
        try:
            path, note = translate(branch, resource_type)
        except Untranslatable as err:
            print("untranslatable: %s %s: %r: %s" % (resource_type, code, branch, err), file=sys.stderr)
            continue
        if path not in [p for p, _, _ in result]:
            result.append((path, note, "SearchParameter/%s: %s" % (sp["id"], branch)))
    return result


def build_table(compartment, search_params):
    """{type: [(code, path, note, source)]} for every type with compartment params."""
    table, missing = {}, []
    for entry in compartment["resource"]:
        resource_type, rows = entry["code"], []
        for code in entry.get("param", []):
            if code == DEF_PARAM:
                continue
            try:
                paths = paths_for(search_params, resource_type, code)
            except Untranslatable as err:
                print("untranslatable: %s %s: %s" % (resource_type, code, err), file=sys.stderr)
                paths = []
            if not paths:
                missing.append((resource_type, code))
            rows.extend((code, path, note, source) for path, note, source in paths)
        if entry.get("param"):
            table[resource_type] = rows
    if missing:
        sys.exit("no path for %s; add documented EXCEPTIONS entries" % missing)
    return table


def rust_str_list(items):
    return "&[" + ", ".join(json.dumps(i) for i in items) + "]"


def render(table, compartment):
    """The Rust source for the table."""
    version = compartment.get("version", "?")
    out = [
        "// @generated by crates/fhir/gen/gen_compartment_table.py -- do not edit by hand.",
        "//",
        "// Source: the HL7 FHIR R4 (%s) Patient CompartmentDefinition (%s)" % (version, COMPARTMENT_FILE),
        "// and the R4 SearchParameter Bundle (%s), both public domain (CC0)." % SEARCH_PARAMS_FILE,
        "// Each compartment parameter's FHIRPath expression is reduced to the JSON element path",
        "// that holds the reference; `.where(resolve() is Patient)` filters are dropped because",
        "// only references to Patients are counted anyway.",
        "//",
        "// Regenerate: python3 crates/fhir/gen/gen_compartment_table.py",
        "",
        "use super::CompartmentRow;",
        "",
        "/// Resource types with a Patient compartment definition, sorted (byte order).",
        "pub(super) static TYPES: &[&str] = &[",
    ]
    out += ["    %s," % json.dumps(t) for t in sorted(table)]
    out += [
        "];",
        "",
        "/// One row per entry of `TYPES`, in the same order.",
        "pub(super) static ROWS: &[CompartmentRow] = &[",
    ]
    for resource_type in sorted(table):
        out += render_row(resource_type, table[resource_type])
    out += ["];", ""]
    return "\n".join(out)


def render_row(resource_type, rows):
    lines = ["    CompartmentRow {", "        resource_type: %s," % json.dumps(resource_type), "        params: &["]
    for code, path, note, source in rows:
        lines.append("            // %s%s" % (source, " (%s)" % note if note else ""))
        lines.append("            (%s, %s)," % (json.dumps(code), rust_str_list(path)))
    lines.append("        ],")
    distinct = []
    for _, path, _, _ in rows:
        if path not in distinct:
            distinct.append(path)
    lines += wrap_list("        paths: ", [rust_str_list(p) for p in distinct])
    lines.append("    },")
    return lines


def wrap_list(prefix, items):
    """`prefix&[a, b],` on one line, or one item per line when too long, as rustfmt would."""
    literal = "&[%s]" % ", ".join(items)
    one_line = prefix + literal + ","
    if len(literal) <= RUSTFMT_ARRAY_WIDTH and len(one_line) <= RUSTFMT_MAX_WIDTH:
        return [one_line]
    indent = " " * (len(prefix) - len(prefix.lstrip()))
    return [prefix + "&["] + ["%s    %s," % (indent, item) for item in items] + [indent + "],"]


def rustfmt(source):
    """The source as `cargo fmt` leaves it (the repository's rustfmt.toml), so the committed,
    formatted file and a fresh rendering compare equal."""
    config = os.path.join(CRATE_DIR, "..", "..", "rustfmt.toml")
    result = subprocess.run(
        ["rustfmt", "--edition", "2021", "--config-path", config, "--emit", "stdout"],
        input=source, capture_output=True, text=True, check=True,
    )
    return result.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="fail if --out is not up to date")
    args = parser.parse_args()

    with open(os.path.join(args.data_dir, COMPARTMENT_FILE)) as f:
        compartment = json.load(f)
    with open(os.path.join(args.data_dir, SEARCH_PARAMS_FILE)) as f:
        bundle = json.load(f)
    search_params = [e["resource"] for e in bundle.get("entry", [])]

    source = rustfmt(render(build_table(compartment, search_params), compartment))
    write_or_check(args.out, source, args.check)


if __name__ == "__main__":
    main()
