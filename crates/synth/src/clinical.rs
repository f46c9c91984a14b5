//! Encounters and what clinicians record at them: Conditions, MedicationRequests, CarePlans,
//! Procedures and Immunizations.

use crate::calendar::{Moment, ANCHOR, DAY, YEAR};
use crate::care_patterns::{EncounterKind, DIAGNOSES, ENCOUNTER_KINDS};
use crate::datatypes::Ref;
use crate::patient::PatientCtx;
use crate::terminology::{
    Code, ACT_CODE, CONDITION_CATEGORY, CONDITION_CLINICAL, CONDITION_VER_STATUS, MEDICATIONS, PROCEDURES, SNOMED,
    VACCINES,
};
use crate::writer::Output;
use crate::SynthError;

const PARTICIPATION_TYPE: &str = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType";

/// An encounter already written, and who/where it happened, for the resources it produces.
pub(crate) struct Visit {
    pub(crate) encounter: Ref,
    pub(crate) start: Moment,
    pub(crate) end: Moment,
    pub(crate) kind: &'static EncounterKind,
    pub(crate) type_code: Code,
    pub(crate) practitioner: Ref,
    /// Index of `practitioner` in [`crate::shared::Shared::practitioners`].
    pub(crate) practitioner_index: usize,
    pub(crate) location: Ref,
    pub(crate) org: Ref,
}

impl Visit {
    pub(crate) fn class_code(&self) -> &'static str {
        self.kind.class_code
    }

    /// Telehealth visits have no vitals, shots or procedures.
    pub(crate) fn is_virtual(&self) -> bool {
        self.kind.class_code == "VR"
    }
}

/// A chronic condition that stays active and keeps generating prescriptions.
pub(crate) struct ActiveProblem {
    pub(crate) condition: Ref,
    pub(crate) diagnosis: usize,
}

/// Writes an Encounter on the day `day` (time of day chosen here), ending before `limit`.
pub(crate) fn encounter(
    ctx: &mut PatientCtx,
    out: &mut Output,
    day: Moment,
    limit: Moment,
) -> Result<Visit, SynthError> {
    let total: u32 = ENCOUNTER_KINDS.iter().map(|k| k.weight).sum();
    let mut pick = ctx.rng.below(total as u64) as u32;
    let kind = ENCOUNTER_KINDS
        .iter()
        .find(|k| {
            let hit = pick < k.weight;
            pick = pick.saturating_sub(k.weight);
            hit
        })
        .unwrap_or(&ENCOUNTER_KINDS[0]);
    let mut type_code = *ctx.rng.pick(kind.types);
    // Well-child visits are for children only.
    if type_code.code == "410620009" && day.0 - ctx.birth.0 >= 18 * YEAR {
        type_code = kind.types[0];
    }
    // Office visits happen in office hours; emergencies and admissions at any time.
    let seconds = match kind.class_code {
        "AMB" | "VR" => ctx.rng.range(8 * 3600, 17 * 3600) / 300 * 300,
        _ => ctx.rng.range(0, DAY - 1) / 60 * 60,
    };
    let minutes = ctx.rng.range(kind.minutes.0, kind.minutes.1);
    let mut start = day.plus(seconds);
    if start.plus(minutes * 60) > limit {
        start = limit.plus(-minutes * 60 - 60);
    }
    let end = start.plus(minutes * 60);
    let provider =
        if ctx.rng.chance(0.8) { ctx.home } else { ctx.rng.below(ctx.shared.providers.len() as u64) as usize };
    let p = &ctx.shared.providers[provider];
    let practitioner_index = p.staff.start + ctx.rng.below(p.staff.len() as u64) as usize;
    let practitioner = ctx.shared.practitioners[practitioner_index].person;
    let (location, org) = (p.location, p.org);
    let encounter = ctx.mint("Encounter");
    let patient = ctx.patient;
    let display_name = &ctx.display_name;
    out.resource("Encounter", encounter.id, |w| {
        w.field_str("status", "finished");
        w.field_obj("class");
        w.field_str("system", ACT_CODE);
        w.field_str("code", kind.class_code);
        w.field_str("display", kind.class_display);
        w.end_obj();
        w.concept_list("type", &type_code);
        w.key("subject");
        w.reference_value(patient, Some(display_name));
        w.field_arr("participant");
        w.begin_obj();
        w.concept_list("type", &Code { system: PARTICIPATION_TYPE, code: "PPRF", display: "primary performer" });
        w.period("period", start, Some(end));
        w.reference("individual", practitioner);
        w.end_obj();
        w.end_arr();
        w.period("period", start, Some(end));
        w.field_arr("location");
        w.begin_obj();
        w.reference("location", location);
        w.end_obj();
        w.end_arr();
        w.reference("serviceProvider", org);
    })?;
    Ok(Visit { encounter, start, end, kind, type_code, practitioner, practitioner_index, location, org })
}

/// Records diagnosis `dx` at `visit`: the Condition, a prescription and a care plan when the
/// diagnosis has them. Acute problems resolve within weeks; chronic ones stay active.
pub(crate) fn diagnose(
    ctx: &mut PatientCtx,
    out: &mut Output,
    visit: &Visit,
    dx: usize,
    limit: Moment,
) -> Result<ActiveProblem, SynthError> {
    let d = &DIAGNOSES[dx];
    let abatement = (!d.chronic).then(|| visit.start.plus(ctx.rng.range(7, 30) * DAY)).filter(|&a| a < limit);
    let condition = ctx.mint("Condition");
    let patient = ctx.patient;
    out.resource("Condition", condition.id, |w| {
        // con-3/con-4: an abated condition must not be `active`.
        let clinical = if abatement.is_some() { "resolved" } else { "active" };
        w.status_concept("clinicalStatus", CONDITION_CLINICAL, clinical);
        w.status_concept("verificationStatus", CONDITION_VER_STATUS, "confirmed");
        let category = if d.chronic {
            Code { system: CONDITION_CATEGORY, code: "problem-list-item", display: "Problem List Item" }
        } else {
            Code { system: CONDITION_CATEGORY, code: "encounter-diagnosis", display: "Encounter Diagnosis" }
        };
        w.concept_list("category", &category);
        w.concept("code", &Code { system: SNOMED, code: d.code, display: d.display });
        w.reference("subject", patient);
        w.reference("encounter", visit.encounter);
        w.field_date_time("onsetDateTime", visit.start);
        if let Some(a) = abatement {
            w.field_date_time("abatementDateTime", a);
        }
        w.field_date_time("recordedDate", visit.start);
        w.reference("recorder", visit.practitioner);
    })?;
    let problem = ActiveProblem { condition, diagnosis: dx };
    if d.medication.is_some() {
        refill(ctx, out, visit, &problem)?;
    }
    if let Some((category, activity)) = d.care_plan {
        let plan = ctx.mint("CarePlan");
        // A plan for an acute problem ends when the problem resolves.
        let plan_end = abatement;
        out.resource("CarePlan", plan.id, |w| {
            w.field_str("status", if plan_end.is_some() { "completed" } else { "active" });
            w.field_str("intent", "plan");
            w.field_arr("category");
            w.concept_value(&Code { system: SNOMED, code: "734163000", display: "Care plan" });
            w.concept_value(&category);
            w.end_arr();
            w.field_str("title", category.display);
            w.reference("subject", patient);
            w.reference("encounter", visit.encounter);
            w.period("period", visit.start, plan_end);
            w.reference("author", visit.practitioner);
            w.field_arr("addresses");
            w.reference_value(condition, None);
            w.end_arr();
            w.field_arr("activity");
            w.begin_obj();
            w.field_obj("detail");
            w.concept("code", &activity);
            w.field_str("status", if plan_end.is_some() { "completed" } else { "in-progress" });
            w.reference("location", visit.location);
            w.end_obj();
            w.end_obj();
            w.end_arr();
        })?;
    }
    Ok(problem)
}

/// A prescription for the problem's medication. Prescriptions from the last year are still
/// `active`; older ones `completed` (both in the R4 required value set).
pub(crate) fn refill(
    ctx: &mut PatientCtx,
    out: &mut Output,
    visit: &Visit,
    problem: &ActiveProblem,
) -> Result<(), SynthError> {
    let Some(med) = DIAGNOSES[problem.diagnosis].medication else {
        return Ok(());
    };
    // Most systems point at a Medication resource; some inline the RxNorm code.
    let by_reference = ctx.rng.chance(0.7);
    let per_day = ctx.rng.range(1, 3) as u64;
    let request = ctx.mint("MedicationRequest");
    let patient = ctx.patient;
    let medication = ctx.shared.medications[med];
    let status = if visit.start > ANCHOR.plus(-YEAR) { "active" } else { "completed" };
    out.resource("MedicationRequest", request.id, |w| {
        w.field_str("status", status);
        w.field_str("intent", "order");
        if by_reference {
            w.reference("medicationReference", medication);
        } else {
            w.concept("medicationCodeableConcept", &MEDICATIONS[med]);
        }
        w.reference("subject", patient);
        w.reference("encounter", visit.encounter);
        w.field_date_time("authoredOn", visit.start);
        w.reference("requester", visit.practitioner);
        w.field_arr("reasonReference");
        w.reference_value(problem.condition, None);
        w.end_arr();
        w.field_arr("dosageInstruction");
        w.begin_obj();
        w.field_u64("sequence", 1);
        w.field_str("text", if per_day == 1 { "Take one dose daily" } else { "Take one dose several times a day" });
        w.field_obj("timing");
        w.field_obj("repeat");
        w.field_u64("frequency", per_day);
        w.field_u64("period", 1);
        w.field_str("periodUnit", "d");
        w.end_obj();
        w.end_obj();
        w.field_bool("asNeededBoolean", false);
        w.field_arr("doseAndRate");
        w.begin_obj();
        w.field_obj("doseQuantity");
        w.field_u64("value", 1);
        w.end_obj();
        w.end_obj();
        w.end_arr();
        w.end_obj();
        w.end_arr();
    })
}

/// A completed Procedure during the visit; returns its reference for the Claim.
pub(crate) fn procedure(ctx: &mut PatientCtx, out: &mut Output, visit: &Visit) -> Result<(Ref, Code), SynthError> {
    let code = *ctx.rng.pick(PROCEDURES);
    let minutes = ctx.rng.range(5, 45).min((visit.end.0 - visit.start.0) / 60);
    let r = ctx.mint("Procedure");
    let patient = ctx.patient;
    out.resource("Procedure", r.id, |w| {
        w.field_str("status", "completed");
        w.concept("code", &code);
        w.reference("subject", patient);
        w.reference("encounter", visit.encounter);
        w.period("performedPeriod", visit.start, Some(visit.start.plus(minutes * 60)));
        w.field_arr("performer");
        w.begin_obj();
        w.reference("actor", visit.practitioner);
        w.end_obj();
        w.end_arr();
        w.reference("location", visit.location);
    })?;
    Ok((r, code))
}

/// A given vaccine dose (`vaccine` indexes [`VACCINES`]; 0 is the seasonal flu shot).
pub(crate) fn immunization(
    ctx: &mut PatientCtx,
    out: &mut Output,
    visit: &Visit,
    vaccine: usize,
) -> Result<(), SynthError> {
    let lot = format!("LOT{:06}", ctx.rng.below(1_000_000));
    let r = ctx.mint("Immunization");
    let patient = ctx.patient;
    out.resource("Immunization", r.id, |w| {
        w.field_str("status", "completed");
        w.concept("vaccineCode", &VACCINES[vaccine]);
        w.reference("patient", patient);
        w.reference("encounter", visit.encounter);
        w.field_date_time("occurrenceDateTime", visit.start);
        w.field_bool("primarySource", true);
        w.reference("location", visit.location);
        w.field_str("lotNumber", &lot);
        w.field_arr("performer");
        w.begin_obj();
        w.reference("actor", visit.practitioner);
        w.end_obj();
        w.end_arr();
    })
}
