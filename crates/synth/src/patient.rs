//! One patient's record: demographics, then a timeline of encounters, then Provenance.

use crate::calendar::{Moment, ANCHOR, DAY, YEAR};
use crate::care_patterns::DIAGNOSES;
use crate::clinical::{self, ActiveProblem, Visit};
use crate::datatypes::Ref;
use crate::financial;
use crate::observations;
use crate::population::{CITIES, FAMILY, GIVEN_FEMALE, GIVEN_MALE, STREETS};
use crate::rng::{Id, Rng};
use crate::shared::{address_list, Shared};
use crate::terminology::{
    Code, ALLERGIES, ALLERGY_CLINICAL, ALLERGY_VERIFICATION, MARITAL, MRN_SYSTEM, PROVENANCE_PARTICIPANT,
    RELATIONSHIPS, SSN, V2_0203,
};
use crate::writer::Output;
use crate::SynthError;

/// Encounters per patient follow a capped heavy tail: median ≈ 6, mean ≈ 11, a few at the cap.
const ENCOUNTER_MIN: f64 = 3.5;
const ENCOUNTER_CAP: u64 = 300;
/// How far back the record reaches from [`ANCHOR`].
const HISTORY: i64 = 10 * YEAR;
/// Provenance targets per resource: keeps lines bounded for the heaviest patients.
const PROVENANCE_CHUNK: usize = 250;

/// Generation state for one patient; everything it writes is derived from `(seed, index)` only.
pub(crate) struct PatientCtx<'a> {
    seed: u64,
    slot: u64,
    next: u64,
    pub(crate) rng: Rng,
    pub(crate) shared: &'a Shared,
    pub(crate) patient: Ref,
    pub(crate) display_name: String,
    pub(crate) birth: Moment,
    /// Index of the provider where the patient usually goes.
    pub(crate) home: usize,
    pub(crate) coverage: Ref,
    pub(crate) payer: usize,
    /// Every resource minted for the patient, for Provenance.target.
    written: Vec<Ref>,
}

impl PatientCtx<'_> {
    /// A fresh id in this patient's key space: `slot << 24 | counter` is unique data-set-wide.
    pub(crate) fn mint(&mut self, resource_type: &'static str) -> Ref {
        let key = (self.slot << 24) | self.next;
        self.next += 1;
        let r = Ref { resource_type, id: Id::mint(self.seed, key), local: true };
        self.written.push(r);
        r
    }
}

/// Writes patient `index` (0-based) and all of its resources; returns how many were written.
pub(crate) fn generate(seed: u64, index: u64, shared: &Shared, out: &mut Output) -> Result<u64, SynthError> {
    let mut rng = Rng::for_stream(seed, index);
    let female = rng.chance(0.51);
    // Ages 0..95, weighted towards adults as in a real practice panel.
    let age_years = if rng.chance(0.2) { rng.range(0, 17) } else { rng.range(18, 95) };
    let birth = ANCHOR.plus(-(age_years * YEAR) - rng.range(1, 364) * DAY);
    let given = if female { *rng.pick(GIVEN_FEMALE) } else { *rng.pick(GIVEN_MALE) };
    let family = *rng.pick(FAMILY);
    let home = rng.below(shared.providers.len() as u64) as usize;
    // Medicare (index 5 of PAYERS) covers the over-65s and only them.
    let payer = if age_years >= 65 { 5 } else { *rng.pick(&[0, 1, 2, 3, 4, 6]) };
    let placeholder = Ref { resource_type: "Patient", id: Id::mint(seed, 0), local: true };
    let mut ctx = PatientCtx {
        seed,
        slot: index + 1,
        next: 0,
        rng,
        shared,
        patient: placeholder,
        display_name: format!("{given} {family}"),
        birth,
        home,
        coverage: placeholder,
        payer,
        written: Vec::with_capacity(256),
    };
    ctx.patient = ctx.mint("Patient");
    out.begin_group(&format!("patient-{:07}-{}.json", index, ctx.patient.id.as_str()));

    // About 2% died within the record window; nothing is recorded after death.
    let death = (age_years > 40 && ctx.rng.chance(0.02)).then(|| ANCHOR.plus(-ctx.rng.range(30, 5 * 365) * DAY));
    write_patient(&mut ctx, out, female, given, family, age_years, death)?;
    write_related_persons(&mut ctx, out, family)?;
    ctx.coverage = financial::coverage(&mut ctx, out)?;
    write_allergies(&mut ctx, out)?;
    let end = death.unwrap_or(ANCHOR.plus(-3600));
    write_timeline(&mut ctx, out, end)?;
    write_provenance(&mut ctx, out, end)?;
    out.end_group()?;
    Ok(ctx.next)
}

fn write_patient(
    ctx: &mut PatientCtx,
    out: &mut Output,
    female: bool,
    given: &str,
    family: &str,
    age_years: i64,
    death: Option<Moment>,
) -> Result<(), SynthError> {
    let rng = &mut ctx.rng;
    let middle = rng.chance(0.4).then(|| if female { *rng.pick(GIVEN_FEMALE) } else { *rng.pick(GIVEN_MALE) });
    let (city, state, zip) = *rng.pick(CITIES);
    let street = format!("{} {}", rng.range(1, 9999), rng.pick(STREETS));
    let ssn = format!("999-{:02}-{:04}", rng.below(100), rng.below(10_000));
    let phone = format!("555-{:03}-{:04}", rng.below(1000), rng.below(10_000));
    let marital = (age_years >= 18).then(|| *rng.pick(MARITAL));
    let zip_salt = rng.below(100);
    let mrn = format!("MRN-{}", &ctx.patient.id.as_str()[..8]);
    let birth = ctx.birth;
    out.resource("Patient", ctx.patient.id, |w| {
        w.field_arr("identifier");
        w.begin_obj();
        w.concept("type", &Code { system: V2_0203, code: "MR", display: "Medical Record Number" });
        w.field_str("system", MRN_SYSTEM);
        w.field_str("value", &mrn);
        w.end_obj();
        w.begin_obj();
        w.concept("type", &Code { system: V2_0203, code: "SS", display: "Social Security number" });
        w.field_str("system", SSN);
        w.field_str("value", &ssn);
        w.end_obj();
        w.end_arr();
        w.field_bool("active", death.is_none());
        w.field_arr("name");
        w.begin_obj();
        w.field_str("use", "official");
        w.field_str("family", family);
        w.field_arr("given");
        w.str(given);
        if let Some(m) = middle {
            w.str(m);
        }
        w.end_arr();
        w.end_obj();
        w.end_arr();
        w.field_arr("telecom");
        w.begin_obj();
        w.field_str("system", "phone");
        w.field_str("value", &phone);
        w.field_str("use", "home");
        w.end_obj();
        w.end_arr();
        w.field_str("gender", if female { "female" } else { "male" });
        w.field_date("birthDate", birth);
        if let Some(d) = death {
            w.field_date_time("deceasedDateTime", d);
        }
        address_list(w, &street, city, state, zip, zip_salt);
        if let Some(m) = &marital {
            w.concept("maritalStatus", m);
        }
        w.field_arr("communication");
        w.begin_obj();
        w.concept("language", &Code { system: "urn:ietf:bcp:47", code: "en-US", display: "English (United States)" });
        w.field_bool("preferred", true);
        w.end_obj();
        w.end_arr();
    })
}

/// Next of kin for about a third of patients.
fn write_related_persons(ctx: &mut PatientCtx, out: &mut Output, family: &str) -> Result<(), SynthError> {
    let count = if ctx.rng.chance(0.33) { ctx.rng.range(1, 2) } else { 0 };
    for _ in 0..count {
        let relation = *ctx.rng.pick(RELATIONSHIPS);
        let female = match relation.code {
            "MTH" => true,
            "FTH" => false,
            _ => ctx.rng.chance(0.5),
        };
        let given = if female { *ctx.rng.pick(GIVEN_FEMALE) } else { *ctx.rng.pick(GIVEN_MALE) };
        let phone = format!("555-{:03}-{:04}", ctx.rng.below(1000), ctx.rng.below(10_000));
        let r = ctx.mint("RelatedPerson");
        let patient = ctx.patient;
        out.resource("RelatedPerson", r.id, |w| {
            w.field_bool("active", true);
            w.reference("patient", patient);
            w.concept_list("relationship", &relation);
            w.field_arr("name");
            w.begin_obj();
            w.field_str("family", family);
            w.field_arr("given");
            w.str(given);
            w.end_arr();
            w.end_obj();
            w.end_arr();
            w.field_arr("telecom");
            w.begin_obj();
            w.field_str("system", "phone");
            w.field_str("value", &phone);
            w.end_obj();
            w.end_arr();
            w.field_str("gender", if female { "female" } else { "male" });
        })?;
    }
    Ok(())
}

fn write_allergies(ctx: &mut PatientCtx, out: &mut Output) -> Result<(), SynthError> {
    let count = if ctx.rng.chance(0.15) { ctx.rng.range(1, 3) } else { 0 };
    for _ in 0..count {
        let (code, category) = *ctx.rng.pick(ALLERGIES);
        let recorded = ctx.birth.max(ANCHOR.plus(-HISTORY)).plus(ctx.rng.range(1, 300) * DAY);
        let critical = ctx.rng.chance(0.2);
        let r = ctx.mint("AllergyIntolerance");
        let patient = ctx.patient;
        out.resource("AllergyIntolerance", r.id, |w| {
            w.status_concept("clinicalStatus", ALLERGY_CLINICAL, "active");
            w.status_concept("verificationStatus", ALLERGY_VERIFICATION, "confirmed");
            w.field_str("type", "allergy");
            w.field_arr("category");
            w.str(category);
            w.end_arr();
            w.field_str("criticality", if critical { "high" } else { "low" });
            w.concept("code", &code);
            w.reference("patient", patient);
            w.field_date_time("recordedDate", recorded.min(ANCHOR.plus(-DAY)));
        })?;
    }
    Ok(())
}

/// The encounters, in time order, and everything each one produces.
fn write_timeline(ctx: &mut PatientCtx, out: &mut Output, end: Moment) -> Result<(), SynthError> {
    // Midnight-aligned, so the time of day chosen per encounter is the real time of day.
    let first_day = ctx.birth.max(ANCHOR.plus(-HISTORY)).plus(DAY);
    let start = Moment(first_day.0.div_euclid(DAY) * DAY);
    let span = (end.0 - start.0).max(DAY);
    let n = ctx.rng.heavy_tail(ENCOUNTER_MIN, ENCOUNTER_CAP).max(1) as usize;
    let mut days: Vec<i64> = (0..n).map(|_| ctx.rng.below(span as u64) as i64 / DAY).collect();
    days.sort_unstable();

    // Chronic problems appear at some encounter and then drive refills; heavy users have more.
    let chronic: Vec<usize> = (0..DIAGNOSES.len()).filter(|&i| DIAGNOSES[i].chronic).collect();
    let wanted = ((n as f64).sqrt() as usize / 2 + ctx.rng.below(2) as usize).min(5);
    let mut onsets: Vec<(usize, usize)> = Vec::with_capacity(wanted);
    for _ in 0..wanted {
        let dx = *ctx.rng.pick(&chronic);
        if onsets.iter().all(|&(_, d)| d != dx) {
            onsets.push((ctx.rng.below(n as u64) as usize, dx));
        }
    }
    let mut active: Vec<ActiveProblem> = Vec::new();
    let mut last_flu_year = 0;
    for (i, &day) in days.iter().enumerate() {
        let at = start.plus(day * DAY);
        let visit = clinical::encounter(ctx, out, at, end)?;
        for &(_, dx) in onsets.iter().filter(|&&(e, _)| e == i) {
            let problem = clinical::diagnose(ctx, out, &visit, dx, end)?;
            active.push(problem);
        }
        if !visit.is_virtual() && ctx.rng.chance(0.2) {
            let acute: Vec<usize> = (0..DIAGNOSES.len()).filter(|&i| !DIAGNOSES[i].chronic).collect();
            let dx = *ctx.rng.pick(&acute);
            clinical::diagnose(ctx, out, &visit, dx, end)?;
        }
        for problem in &active {
            if ctx.rng.chance(0.25) {
                clinical::refill(ctx, out, &visit, problem)?;
            }
        }
        write_visit_details(ctx, out, &visit, &mut last_flu_year)?;
    }
    Ok(())
}

/// Measurements, procedures, shots, notes and billing for one encounter.
fn write_visit_details(
    ctx: &mut PatientCtx,
    out: &mut Output,
    visit: &Visit,
    last_flu_year: &mut i64,
) -> Result<(), SynthError> {
    if !visit.is_virtual() {
        observations::vital_signs(ctx, out, visit)?;
    }
    let lab_chance = match visit.class_code() {
        "IMP" => 1.0,
        "EMER" => 0.6,
        "AMB" => 0.2,
        _ => 0.0,
    };
    if ctx.rng.chance(lab_chance) {
        observations::lab_panel(ctx, out, visit)?;
    }
    let mut procedures = Vec::new();
    if !visit.is_virtual() && ctx.rng.chance(0.2) {
        procedures.push(clinical::procedure(ctx, out, visit)?);
    }
    let year = visit.start.year();
    if !visit.is_virtual() && year != *last_flu_year && ctx.rng.chance(0.7) {
        *last_flu_year = year;
        clinical::immunization(ctx, out, visit, 0)?;
    } else if !visit.is_virtual() && ctx.rng.chance(0.04) {
        let vaccine = 1 + ctx.rng.below(7) as usize;
        clinical::immunization(ctx, out, visit, vaccine)?;
    }
    if visit.class_code() == "IMP" || ctx.rng.chance(0.25) {
        observations::document(ctx, out, visit)?;
    }
    financial::claim_and_eob(ctx, out, visit, &procedures)
}

/// Provenance for everything written, in chunks; each chunk also targets the Patient so that
/// it sits in the patient's compartment (R4 Provenance is there through `patient` = target).
fn write_provenance(ctx: &mut PatientCtx, out: &mut Output, end: Moment) -> Result<(), SynthError> {
    let provider = &ctx.shared.providers[ctx.home];
    let author = ctx.shared.practitioners[provider.staff.start].person;
    let org = provider.org;
    let targets: Vec<Ref> = ctx.written[1..].to_vec();
    let recorded = end.min(ANCHOR.plus(-DAY));
    for chunk in targets.chunks(PROVENANCE_CHUNK) {
        let r = ctx.mint("Provenance");
        let patient = ctx.patient;
        out.resource("Provenance", r.id, |w| {
            w.field_arr("target");
            w.reference_value(patient, None);
            for t in chunk {
                w.reference_value(*t, None);
            }
            w.end_arr();
            w.field_date_time("recorded", recorded);
            w.field_arr("agent");
            w.begin_obj();
            w.field_obj("type");
            w.field_arr("coding");
            w.begin_obj();
            w.field_str("system", PROVENANCE_PARTICIPANT);
            w.field_str("code", "author");
            w.field_str("display", "Author");
            w.end_obj();
            w.end_arr();
            w.end_obj();
            w.reference("who", author);
            w.reference("onBehalfOf", org);
            w.end_obj();
            w.end_arr();
        })?;
    }
    Ok(())
}
