//! Measurements and notes: vital-sign and laboratory Observations, DiagnosticReports,
//! DocumentReferences.

use crate::clinical::Visit;
use crate::datatypes::Ref;
use crate::json::{base64_encode, JsonWriter};
use crate::measures::{Measure, Panel, BLOOD_PRESSURE, DIASTOLIC, LAB_PANELS, SYSTOLIC, VITALS};
use crate::patient::PatientCtx;
use crate::terminology::{Code, DOCUMENT_CATEGORY, LOINC, NOTE_TYPES, OBSERVATION_CATEGORY, V2_0074};
use crate::writer::Output;
use crate::SynthError;

/// The R4 vital-signs profile's fixed category coding.
const VITAL_SIGNS: Code = Code { system: OBSERVATION_CATEGORY, code: "vital-signs", display: "Vital Signs" };
const LABORATORY: Code = Code { system: OBSERVATION_CATEGORY, code: "laboratory", display: "Laboratory" };

const PULSE_OXIMETRY: &str = "59408-5";
const OXYGEN_SATURATION: Code = Code { system: LOINC, code: "2708-6", display: "Oxygen saturation in Arterial blood" };

/// Draws a plausible value for `m`, never negative.
fn draw(ctx: &mut PatientCtx, m: &Measure) -> f64 {
    ctx.rng.normal(m.mean, m.sd).max(m.mean * 0.2)
}

/// The fields every Observation we write shares (profile-required ones first).
fn observation_head(w: &mut JsonWriter, category: &Code, code: &Code, patient: Ref, visit: &Visit) {
    w.field_str("status", "final");
    w.concept_list("category", category);
    if code.code == PULSE_OXIMETRY {
        // The R4 oxygen-saturation profile fixes LOINC 2708-6; US Core adds 59408-5 (pulse
        // oximetry). Both codings satisfy both.
        w.field_obj("code");
        w.field_arr("coding");
        w.coding_value(code);
        w.coding_value(&OXYGEN_SATURATION);
        w.end_arr();
        w.field_str("text", code.display);
        w.end_obj();
    } else {
        w.concept("code", code);
    }
    w.reference("subject", patient);
    w.reference("encounter", visit.encounter);
    w.field_date_time("effectiveDateTime", visit.start);
    w.field_date_time("issued", visit.start.plus(600));
}

/// The full vital-signs set: seven single-value Observations and a blood pressure panel.
pub(crate) fn vital_signs(ctx: &mut PatientCtx, out: &mut Output, visit: &Visit) -> Result<(), SynthError> {
    let patient = ctx.patient;
    for m in VITALS {
        let value = draw(ctx, m);
        let r = ctx.mint("Observation");
        out.resource("Observation", r.id, |w| {
            observation_head(
                w,
                &VITAL_SIGNS,
                &Code { system: LOINC, code: m.code, display: m.display },
                patient,
                visit,
            );
            w.ucum_quantity("valueQuantity", value, m);
        })?;
    }
    let systolic = draw(ctx, &SYSTOLIC);
    let diastolic = draw(ctx, &DIASTOLIC).min(systolic - 20.0);
    let r = ctx.mint("Observation");
    out.resource("Observation", r.id, |w| {
        observation_head(w, &VITAL_SIGNS, &BLOOD_PRESSURE, patient, visit);
        w.field_arr("component");
        for (m, v) in [(&SYSTOLIC, systolic), (&DIASTOLIC, diastolic)] {
            w.begin_obj();
            w.concept("code", &Code { system: LOINC, code: m.code, display: m.display });
            w.ucum_quantity("valueQuantity", v, m);
            w.end_obj();
        }
        w.end_arr();
    })
}

/// One laboratory panel: an Observation per test and the DiagnosticReport that lists them.
pub(crate) fn lab_panel(ctx: &mut PatientCtx, out: &mut Output, visit: &Visit) -> Result<(), SynthError> {
    let panel: &Panel = ctx.rng.pick(LAB_PANELS);
    let patient = ctx.patient;
    let mut results = Vec::with_capacity(panel.tests.len());
    for m in panel.tests {
        let value = draw(ctx, m);
        let (low, high) = (m.mean - 2.0 * m.sd, m.mean + 2.0 * m.sd);
        let flag = if value < low {
            Some(("L", "Low"))
        } else if value > high {
            Some(("H", "High"))
        } else {
            None
        };
        let r = ctx.mint("Observation");
        results.push(r);
        out.resource("Observation", r.id, |w| {
            observation_head(w, &LABORATORY, &Code { system: LOINC, code: m.code, display: m.display }, patient, visit);
            w.ucum_quantity("valueQuantity", value, m);
            if let Some((code, display)) = flag {
                w.concept_list(
                    "interpretation",
                    &Code {
                        system: "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                        code,
                        display,
                    },
                );
            }
        })?;
    }
    let report = ctx.mint("DiagnosticReport");
    out.resource("DiagnosticReport", report.id, |w| {
        w.field_str("status", "final");
        w.concept_list("category", &Code { system: V2_0074, code: "LAB", display: "Laboratory" });
        w.concept("code", &Code { system: LOINC, code: panel.code, display: panel.display });
        w.reference("subject", patient);
        w.reference("encounter", visit.encounter);
        w.field_date_time("effectiveDateTime", visit.start);
        w.field_date_time("issued", visit.start.plus(3600));
        w.field_arr("performer");
        w.reference_value(visit.org, None);
        w.end_arr();
        w.field_arr("result");
        for r in &results {
            w.reference_value(*r, None);
        }
        w.end_arr();
    })
}

/// A clinical note: inline base64 text for most, a URL to the document store for some (both
/// shapes occur in real exports and consumers must handle both).
pub(crate) fn document(ctx: &mut PatientCtx, out: &mut Output, visit: &Visit) -> Result<(), SynthError> {
    let note = if visit.class_code() == "IMP" { NOTE_TYPES[2] } else { NOTE_TYPES[ctx.rng.below(2) as usize] };
    let inline = ctx.rng.chance(0.8);
    let r = ctx.mint("DocumentReference");
    let patient = ctx.patient;
    let practitioner_name = &ctx.shared.practitioners[visit.practitioner_index].name;
    let text = format!(
        "{}\n\nPatient: {}\nDate: {}\nVisit: {}\nClinician: Dr. {}\n\nPatient seen and examined. Plan discussed with the patient.\n",
        note.display,
        ctx.display_name,
        visit.start.date().as_str(),
        visit.type_code.display,
        practitioner_name,
    );
    let mut data = String::new();
    if inline {
        base64_encode(text.as_bytes(), &mut data);
    }
    out.resource("DocumentReference", r.id, |w| {
        w.field_str("status", "current");
        w.field_str("docStatus", "final");
        w.concept("type", &note);
        w.concept_list(
            "category",
            &Code { system: DOCUMENT_CATEGORY, code: "clinical-note", display: "Clinical Note" },
        );
        w.reference("subject", patient);
        w.field_date_time("date", visit.end);
        w.field_arr("author");
        w.reference_value(visit.practitioner, None);
        w.end_arr();
        w.reference("custodian", visit.org);
        w.field_arr("content");
        w.begin_obj();
        w.field_obj("attachment");
        w.field_str("contentType", "text/plain; charset=utf-8");
        if inline {
            w.field_str("data", &data);
        } else {
            w.key("url");
            w.str_parts(&["https://documents.bulkhead.example/notes/", r.id.as_str(), ".txt"]);
            w.field_u64("size", text.len() as u64);
        }
        w.field_str("title", note.display);
        w.field_date_time("creation", visit.end);
        w.end_obj();
        w.end_obj();
        w.end_arr();
        w.field_obj("context");
        w.field_arr("encounter");
        w.reference_value(visit.encounter, None);
        w.end_arr();
        w.period("period", visit.start, Some(visit.end));
        w.end_obj();
    })
}
