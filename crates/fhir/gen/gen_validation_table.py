#!/usr/bin/env python3
"""Generates crates/fhir/src/validation_table.rs, the R4 structural validation table.

Inputs (official HL7 FHIR R4 4.0.1 definitions, CC0, vendored under `testdata/fhir-r4`):
  - profiles-types.json.gz: the StructureDefinitions of the data types;
  - profiles-resources.json.gz: the StructureDefinitions of the resources (the one non-R4
    entry, `SubscriptionStatus` with fhirVersion 4.3.0, is skipped);
  - valuesets.json.gz: the ValueSets and CodeSystems, for `required` bindings.

From each snapshot the generator builds one table row per resource type and per complex data
type, and one per BackboneElement (named by its path, e.g. `Patient.contact`; a data type's
inline `Element` children such as `Timing.repeat` count too). A row lists its elements as JSON
property names: a choice element `value[x]` expands to one element per allowed type
(`valueQuantity`, `valueString`...), all in one choice group; a `contentReference`
(`Questionnaire.item.item`) points at the row of the referenced backbone. Data types are
listed once and referenced by index, so their element lists are shared.

Element names are interned (`NAMES`); each row's elements are sorted by name length, then
name, and the row has a small open-addressing hash table (`SLOTS`) for lookups. Element types
that the snapshots get wrong are overridden in TYPE_OVERRIDES, with the reason.

Each element records its minimum (required or not), whether it repeats (max > 1, a JSON array),
its type (a primitive, `Resource` for any resource, or a row), and for a `code` element with a
`required` binding the allowed codes, when the ValueSet can be enumerated from the bundle
(compose.include of CodeSystems with their concepts, nested concepts included, or explicit
concept lists, and imported ValueSets). Bindings that cannot be enumerated (filters, external
code systems such as BCP-47 or ISO 4217) are listed in a comment in the generated file.

Usage (from anywhere; paths default to the definitions vendored under `testdata/fhir-r4`):
  python3 crates/fhir/gen/gen_validation_table.py            # (re)write the table
  python3 crates/fhir/gen/gen_validation_table.py --check    # exit 1 if the file is stale
  python3 crates/fhir/gen/gen_validation_table.py --data-dir DIR --out FILE
"""

import argparse
import gzip
import json
import os
import sys

from generated_file import write_or_check

HERE = os.path.dirname(os.path.abspath(__file__))
CRATE_DIR = os.path.dirname(HERE)
DEFAULT_DATA_DIR = os.path.normpath(os.path.join(CRATE_DIR, "..", "..", "testdata", "fhir-r4"))
DEFAULT_OUT = os.path.join(CRATE_DIR, "src", "validation_table.rs")

TYPES_FILE = "profiles-types.json.gz"
RESOURCES_FILE = "profiles-resources.json.gz"
VALUESETS_FILE = "valuesets.json.gz"
FHIR_VERSION = "4.0.1"

# The R4 primitive types, in the order of `validation::Primitive` (a unit test checks it).
PRIMITIVES = [
    "base64Binary", "boolean", "canonical", "code", "date", "dateTime", "decimal", "id", "instant",
    "integer", "markdown", "oid", "positiveInt", "string", "time", "unsignedInt", "uri", "url",
    "uuid", "xhtml",
]
# Type number of "any resource" (`contained`, `Bundle.entry.resource`); rows come after it.
RESOURCE_TYPE = len(PRIMITIVES)
FIRST_ROW = RESOURCE_TYPE + 1
NO_BINDING = 0xFFFF
# Constraint profiles used as element types (`Quantity` with profile SimpleQuantity).
PROFILES = {"http://hl7.org/fhir/StructureDefinition/SimpleQuantity": "SimpleQuantity",
            "http://hl7.org/fhir/StructureDefinition/MoneyQuantity": "MoneyQuantity"}
# Element types the snapshots get wrong, by base path, with the reason (copied into the output).
TYPE_OVERRIDES = {
    # The R4 snapshots type Resource.id as System.String with fhir-type `string`, but the spec
    # (resource.html#id, and every resource page) says `id`: [A-Za-z0-9\-\.]{1,64}.
    "Resource.id": ("id", "R4 resource.html: a resource's id is of type id"),
}
FHIR_TYPE_EXTENSION = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"


def load_bundle(data_dir, name):
    with gzip.open(os.path.join(data_dir, name), "rt", encoding="utf-8") as f:
        return [e["resource"] for e in json.load(f).get("entry", [])]


def structure_definitions(data_dir):
    """{name: StructureDefinition} of the complex types, constraint profiles and resources."""
    result, primitives = {}, set()
    for sd in load_bundle(data_dir, TYPES_FILE) + load_bundle(data_dir, RESOURCES_FILE):
        if sd.get("resourceType") != "StructureDefinition" or sd.get("fhirVersion") != FHIR_VERSION:
            continue  # SubscriptionStatus (4.3.0) is an R4B backport, not R4
        kind = sd.get("kind")
        if kind == "primitive-type":
            primitives.add(sd["id"])
        elif kind == "complex-type" or (kind == "resource" and not sd.get("abstract")):
            result[sd["id"]] = sd
    if primitives != set(PRIMITIVES):
        sys.exit("primitive types differ from PRIMITIVES: %s" % sorted(primitives ^ set(PRIMITIVES)))
    return result


class ValueSets:
    """Enumerates the codes of ValueSets from the bundle, where that is possible."""

    def __init__(self, resources):
        self.value_sets = {r["url"]: r for r in resources if r.get("resourceType") == "ValueSet"}
        self.code_systems = {r["url"]: r for r in resources if r.get("resourceType") == "CodeSystem"}

    def codes(self, url, seen=()):
        """A sorted list of codes, or a string saying why the ValueSet cannot be enumerated."""
        url = url.split("|")[0]
        vs = self.value_sets.get(url)
        if vs is None:
            return "ValueSet not in the bundle"
        if url in seen:
            return "ValueSet imports itself"
        compose = vs.get("compose")
        if not compose:
            return "no compose"
        codes = set()
        for include in compose.get("include", []):
            found = self.include(include, seen + (url,))
            if isinstance(found, str):
                return found
            codes |= found
        for exclude in compose.get("exclude", []):
            found = self.include(exclude, seen + (url,))
            if isinstance(found, str):
                return "exclude: " + found
            codes -= found
        return sorted(codes)

    def include(self, include, seen):
        if include.get("filter"):
            return "filter on %s" % include.get("system")
        codes = None
        if "concept" in include:
            codes = {c["code"] for c in include["concept"]}
        elif "system" in include:
            cs = self.code_systems.get(include["system"])
            if cs is None:
                return "code system %s not in the bundle" % include["system"]
            if cs.get("content") != "complete" or not cs.get("concept"):
                return "code system %s is not complete" % include["system"]
            codes = set(all_concepts(cs["concept"]))
        for imported in include.get("valueSet", []):
            found = self.codes(imported, seen)
            if isinstance(found, str):
                return "imports %s: %s" % (imported, found)
            codes = set(found) if codes is None else codes & set(found)
        return codes if codes is not None else "include without system or concepts"


def all_concepts(concepts):
    for concept in concepts:
        yield concept["code"]
        yield from all_concepts(concept.get("concept", []))


def slot_hash(name):
    """The lookup hash of an element name; `validation::slot_hash` computes the same."""
    data = name.encode()
    n = len(data)
    h = n
    for i in (0, n // 2, n - 1, n * 3 // 4):
        h = (h * 31 + data[i]) & 0xFFFFFFFF
    return (h * 0x9E3779B1) & 0xFFFFFFFF


def slot_table(row):
    """Open-addressing table (load ≤ 1/2) of 1-based element indexes, 0 for an empty slot."""
    bits = 1
    while (1 << bits) < 2 * len(row):
        bits += 1
    slots = [0] * (1 << bits)
    for index, element in enumerate(row):
        at = slot_hash(element["name"]) >> (32 - bits)
        while slots[at]:
            at = (at + 1) & ((1 << bits) - 1)
        slots[at] = index + 1
    return bits, slots


def upper_first(name):
    return name[0].upper() + name[1:]


class Builder:
    """Turns snapshots into rows of elements."""

    def __init__(self, sds, value_sets):
        self.sds = sds
        self.value_sets = value_sets
        self.rows = {}  # row name -> list of element dicts
        self.row_index = {}
        self.bindings = []  # [(url, codes)]
        self.binding_index = {}
        self.unenumerable = {}  # url -> (reason, [paths])

    def build(self):
        # Row numbers: every data type and resource first (sorted), then backbones as met.
        for name in sorted(self.sds):
            self.number(name)
        for name in sorted(self.sds):
            sd = self.sds[name]
            elements = [e for e in sd["snapshot"]["element"] if "sliceName" not in e]
            by_path = {e["path"]: e for e in elements}
            root = elements[0]["path"]
            self.define_row(name, root, name, by_path, sd)
        return self

    def number(self, row_name):
        if row_name not in self.row_index:
            self.row_index[row_name] = len(self.row_index)
        return self.row_index[row_name] + FIRST_ROW

    def define_row(self, row_name, path, sd_name, by_path, sd):
        """Defines the row for the element at `path` (the root or a backbone)."""
        children = [e for p, e in by_path.items() if p.startswith(path + ".") and "." not in p[len(path) + 1:]]
        row = []
        for element in children:
            if element.get("max") == "0":
                continue  # removed by a constraint profile (SimpleQuantity.comparator)
            name = element["path"][len(path) + 1:]
            many = element.get("max") != "1"
            required = element.get("min", 0) >= 1
            if "contentReference" in element:
                target = element["contentReference"].lstrip("#")
                ty = self.number(sd_name + target[len(target.split(".")[0]):])
                row.append(dict(name=name, ty=ty, many=many, required=required, choice=None, binding=None))
                continue
            child_path = element["path"]
            if any(p.startswith(child_path + ".") for p in by_path):
                backbone = sd_name + child_path[len(path.split(".")[0]):]
                ty = self.number(backbone)
                self.define_row(backbone, child_path, sd_name, by_path, sd)
                row.append(dict(name=name, ty=ty, many=many, required=required, choice=None, binding=None))
                continue
            binding = self.binding(element, "%s.%s" % (row_name, name))
            if name.endswith("[x]"):
                base = name[:-3]
                for t in element["type"]:
                    row.append(dict(name=base + upper_first(t["code"]), ty=self.type_number(t), many=many,
                                    required=required, choice=base, binding=None))
            else:
                (t,) = element["type"]
                override = TYPE_OVERRIDES.get(element.get("base", {}).get("path"))
                if override:
                    t = {"code": override[0]}
                row.append(dict(name=name, ty=self.type_number(t), many=many, required=required, choice=None,
                                binding=binding if t["code"] == "code" else None))
        # Sorted by (length, bytes): a lookup compares lengths, held in the element, before text.
        self.rows[row_name] = sorted(row, key=lambda e: (len(e["name"].encode()), e["name"].encode()))

    def type_number(self, t):
        code = t["code"]
        if code.startswith("http://hl7.org/fhirpath/System."):
            # The `id` of elements and resources, `Extension.url`: the FHIR type is an extension.
            fhir_type = [x["valueUrl"] for x in t.get("extension", []) if x["url"] == FHIR_TYPE_EXTENSION]
            code = fhir_type[0] if fhir_type else "string"
        if code in PRIMITIVES:
            return PRIMITIVES.index(code)
        if code == "Resource":
            return RESOURCE_TYPE
        for profile in t.get("profile", []):
            if profile in PROFILES:
                return self.number(PROFILES[profile])
        if code not in self.sds:
            sys.exit("unknown type %s" % code)
        return self.number(code)

    def binding(self, element, where):
        binding = element.get("binding")
        if not binding or binding.get("strength") != "required" or not binding.get("valueSet"):
            return None
        if [t["code"] for t in element.get("type", [])] != ["code"]:
            return None  # Coding/CodeableConcept bindings are not checked
        url = binding["valueSet"].split("|")[0]
        if url in self.binding_index:
            return self.binding_index[url]
        codes = self.value_sets.codes(url)
        if isinstance(codes, str):
            self.unenumerable.setdefault(url, (codes, []))[1].append(where)
            return None
        self.binding_index[url] = len(self.bindings)
        self.bindings.append((url, codes))
        return self.binding_index[url]


def render(builder):
    names = sorted({e["name"] for row in builder.rows.values() for e in row}, key=str.encode)
    name_index = {n: i for i, n in enumerate(names)}
    order = sorted(builder.row_index, key=lambda r: builder.row_index[r])
    resources = sorted(n for n, sd in builder.sds.items() if sd["kind"] == "resource")

    out = [
        "// @generated by crates/fhir/gen/gen_validation_table.py -- do not edit by hand.",
        "//",
        "// Source: the HL7 FHIR R4 (%s) StructureDefinitions (%s, %s) and" % (FHIR_VERSION, TYPES_FILE,
                                                                              RESOURCES_FILE),
        "// ValueSets (%s), public domain (CC0). One row per resource type, complex data type and" % VALUESETS_FILE,
        "// BackboneElement; element types number the primitives (`Primitive` order), then `Resource`",
        "// (any resource), then the rows. Choice elements are expanded to their JSON names.",
        "//",
        "// Required bindings on `code` elements that cannot be enumerated from the bundle (not checked):",
    ]
    for url in sorted(builder.unenumerable):
        reason, paths = builder.unenumerable[url]
        out.append("//   %s (%s): %s" % (url, reason, ", ".join(sorted(set(paths)))))
    out.append("//")
    out.append("// Element types overridden by the generator (TYPE_OVERRIDES):")
    for base, (code, why) in sorted(TYPE_OVERRIDES.items()):
        out.append("//   %s: %s (%s)" % (base, code, why))
    out += [
        "//",
        "// Regenerate: python3 crates/fhir/gen/gen_validation_table.py",
        "",
        "use super::{el, Binding, Element, Row, NB};",
        "",
        "/// Names of the primitive types, in type-number order (a unit test checks `Primitive`).",
        "#[cfg_attr(not(test), allow(dead_code))]",
        "#[rustfmt::skip]",
        "pub(super) static PRIMITIVE_NAMES: &[&str] = &[%s];" % ", ".join(json.dumps(p) for p in PRIMITIVES),
        "",
        "/// Type number of the first row (`ROWS[0]`).",
        "pub(super) const FIRST_ROW: u16 = %d;" % FIRST_ROW,
        "",
        "/// Rows the validator handles specially: `Extension` (ext-1) and `Element` (`_x` properties).",
        "pub(super) const EXTENSION_ROW: u16 = %d;" % builder.row_index["Extension"],
        "pub(super) const ELEMENT_ROW: u16 = %d;" % builder.row_index["Element"],
        "",
        "/// Interned element names (JSON property names), sorted by bytes.",
        "#[rustfmt::skip]",
        "pub(super) static NAMES: &[&str] = &[",
    ]
    line = "   "
    for n in names:
        item = " %s," % json.dumps(n)
        if len(line) + len(item) > 118:
            out.append(line)
            line = "   "
        line += item
    out += [line, "];", ""]

    out += [
        "/// Resource types (sorted) and their rows.",
        "#[rustfmt::skip]",
        "pub(super) static RESOURCES: &[(&str, u16)] = &[",
    ]
    for r in resources:
        out.append("    (%s, %d)," % (json.dumps(r), builder.row_index[r]))
    out += ["];", ""]

    out += [
        "/// Rows: name, first element in `ELEMENTS`, element count (sorted by name length, then name),",
        "/// required slots, and the row's hash table in `SLOTS`.",
        "#[rustfmt::skip]",
        "pub(super) static ROWS: &[Row] = &[",
    ]
    elements, start, slots = [], 0, []
    for r in order:
        row = builder.rows[r]
        groups = []
        for e in row:
            if e["choice"] and e["choice"] not in groups:
                groups.append(e["choice"])
        if len(groups) > 32:
            sys.exit("%s has more than 32 choice elements" % r)
        required = sorted({e["choice"] or e["name"] for e in row if e["required"]})
        if len(required) > 32:
            sys.exit("%s has more than 32 required elements" % r)
        bits, row_slots = slot_table(row)
        out.append("    Row { name: %s, start: %d, len: %d, required: %d, slots: %d, slot_bits: %d }," % (
            json.dumps(r), start, len(row), len(required), len(slots), bits))
        slots.extend(row_slots)
        elements.append("    // %d: %s" % (len(out) - 1, r))
        for e in row:
            choice = groups.index(e["choice"]) + 1 if e["choice"] else 0
            req = required.index(e["choice"] or e["name"]) + 1 if e["required"] else 0
            binding = "NB" if e["binding"] is None else str(e["binding"])
            elements.append("    el(%d, %d, %d, %s, %d, %d, %d)," % (name_index[e["name"]], len(e["name"].encode()),
                                                                    e["ty"], binding, int(e["many"]), choice, req))
        start += len(row)
    out += ["];", ""]
    # The row comment numbers are rows, not lines: fix them up.
    fixed, row_number = [], 0
    for line in elements:
        if line.startswith("    // "):
            line = "    // row %d: %s" % (row_number, line.split(": ", 1)[1])
            row_number += 1
        fixed.append(line)
    out += [
        "/// Elements of every row: `el(name, name length, type, binding, repeats, choice group, required slot)`.",
        "#[rustfmt::skip]",
        "pub(super) static ELEMENTS: &[Element] = &[",
    ] + fixed + ["];", ""]

    if max(len(builder.rows[r]) for r in order) > 254 or len(slots) > 0xFFFF:
        sys.exit("rows too long for u8 slots or too many slots for u16 offsets")
    out += [
        "/// Hash slots of every row (`Row::slots`, 2^`slot_bits` each): 1-based element index in",
        "/// the row, 0 for empty.",
        "#[rustfmt::skip]",
        "pub(super) static SLOTS: &[u8] = &[",
    ]
    line = "   "
    for value in slots:
        item = " %d," % value
        if len(line) + len(item) > 118:
            out.append(line)
            line = "   "
        line += item
    out += [line, "];", ""]
    out += [
        "/// Required bindings whose codes are known (codes sorted by bytes).",
        "#[rustfmt::skip]",
        "pub(super) static BINDINGS: &[Binding] = &[",
    ]
    for url, codes in builder.bindings:
        out.append("    Binding {")
        out.append("        value_set: %s," % json.dumps(url))
        line = "        codes: &["
        for c in sorted(codes, key=str.encode):
            item = "%s, " % json.dumps(c)
            if len(line) + len(item) > 118:
                out.append(line.rstrip())
                line = "            "
            line += item
        out.append(line.rstrip(", ") + "],")
        out.append("    },")
    out += ["];", ""]
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="fail if --out is not up to date")
    args = parser.parse_args()

    value_sets = ValueSets(load_bundle(args.data_dir, VALUESETS_FILE))
    builder = Builder(structure_definitions(args.data_dir), value_sets).build()
    source = render(builder)
    write_or_check(args.out, source, args.check)


if __name__ == "__main__":
    main()
