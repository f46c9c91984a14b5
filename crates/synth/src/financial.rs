//! Insurance and billing: Coverage, Claims and ExplanationOfBenefits.

use crate::clinical::Visit;
use crate::datatypes::Ref;
use crate::json::JsonWriter;
use crate::patient::PatientCtx;
use crate::terminology::{
    Code, ACT_CODE, ADJUDICATION, CLAIM_TYPE, MEMBER_ID_SYSTEM, PROCESS_PRIORITY, SUBSCRIBER_RELATIONSHIP,
};
use crate::writer::Output;
use crate::SynthError;

const COVERAGE_CLASS: &str = "http://terminology.hl7.org/CodeSystem/coverage-class";

/// The patient's insurance (R4 Coverage requires status, beneficiary and payor).
pub(crate) fn coverage(ctx: &mut PatientCtx, out: &mut Output) -> Result<Ref, SynthError> {
    let r = ctx.mint("Coverage");
    let payer = &ctx.shared.payers[ctx.payer];
    let member_id = format!("M{:09}", ctx.rng.below(1_000_000_000));
    let group = format!("GRP-{:04}", ctx.rng.below(10_000));
    let patient = ctx.patient;
    let since = ctx.birth.max(crate::calendar::ANCHOR.plus(-12 * crate::calendar::YEAR));
    out.resource("Coverage", r.id, |w| {
        w.field_arr("identifier");
        w.identifier_value(MEMBER_ID_SYSTEM, &member_id);
        w.end_arr();
        w.field_str("status", "active");
        w.concept("type", &Code { system: ACT_CODE, code: "HIP", display: "health insurance plan policy" });
        w.field_str("subscriberId", &member_id);
        w.reference("beneficiary", patient);
        w.concept("relationship", &Code { system: SUBSCRIBER_RELATIONSHIP, code: "self", display: "Self" });
        w.period("period", since, None);
        w.field_arr("payor");
        w.reference_value(payer.org, Some(payer.name));
        w.end_arr();
        w.field_arr("class");
        w.begin_obj();
        w.concept("type", &Code { system: COVERAGE_CLASS, code: "group", display: "Group" });
        w.field_str("value", &group);
        w.field_str("name", payer.name);
        w.end_obj();
        w.end_arr();
    })?;
    Ok(r)
}

/// The visit's Claim and the payer's ExplanationOfBenefit for it.
pub(crate) fn claim_and_eob(
    ctx: &mut PatientCtx,
    out: &mut Output,
    visit: &Visit,
    procedures: &[(Ref, Code)],
) -> Result<(), SynthError> {
    // Charges in cents, by setting; each procedure adds its own line.
    let (lo, hi) = match visit.class_code() {
        "IMP" => (500_000, 4_000_000),
        "EMER" => (80_000, 300_000),
        "VR" => (5_000, 12_000),
        _ => (12_000, 30_000),
    };
    let mut lines: Vec<(Code, u64)> = vec![(visit.type_code, ctx.rng.range(lo, hi) as u64)];
    for (_, code) in procedures {
        lines.push((*code, ctx.rng.range(5_000, 150_000) as u64));
    }
    let total: u64 = lines.iter().map(|l| l.1).sum();
    // The payer pays 60–90% of the charge.
    let paid: Vec<u64> = lines.iter().map(|l| l.1 * ctx.rng.range(60, 90) as u64 / 100).collect();
    let claim_type = match visit.class_code() {
        "IMP" | "EMER" => Code { system: CLAIM_TYPE, code: "institutional", display: "Institutional" },
        _ => Code { system: CLAIM_TYPE, code: "professional", display: "Professional" },
    };
    let payer = &ctx.shared.payers[ctx.payer];
    let (patient, coverage) = (ctx.patient, ctx.coverage);
    let claim = ctx.mint("Claim");
    out.resource("Claim", claim.id, |w| {
        w.field_str("status", "active");
        w.concept("type", &claim_type);
        w.field_str("use", "claim");
        w.reference("patient", patient);
        w.period("billablePeriod", visit.start, Some(visit.end));
        w.field_date_time("created", visit.end);
        w.reference("provider", visit.org);
        w.concept("priority", &Code { system: PROCESS_PRIORITY, code: "normal", display: "Normal" });
        w.reference("facility", visit.location);
        if !procedures.is_empty() {
            w.field_arr("procedure");
            for (i, (p, _)) in procedures.iter().enumerate() {
                w.begin_obj();
                w.field_u64("sequence", i as u64 + 1);
                w.reference("procedureReference", *p);
                w.end_obj();
            }
            w.end_arr();
        }
        insurance(w, coverage, payer.name, true);
        w.field_arr("item");
        for (i, (code, cents)) in lines.iter().enumerate() {
            w.begin_obj();
            w.field_u64("sequence", i as u64 + 1);
            w.concept("productOrService", code);
            w.field_arr("encounter");
            w.reference_value(visit.encounter, None);
            w.end_arr();
            w.money("net", *cents);
            w.end_obj();
        }
        w.end_arr();
        w.money("total", total);
    })?;
    let eob = ctx.mint("ExplanationOfBenefit");
    out.resource("ExplanationOfBenefit", eob.id, |w| {
        w.field_str("status", "active");
        w.concept("type", &claim_type);
        w.field_str("use", "claim");
        w.reference("patient", patient);
        w.period("billablePeriod", visit.start, Some(visit.end));
        w.field_date_time("created", visit.end.plus(7 * 86_400).min(crate::calendar::ANCHOR));
        w.key("insurer");
        w.reference_value(payer.org, Some(payer.name));
        w.reference("provider", visit.org);
        w.reference("claim", claim);
        w.field_str("outcome", "complete");
        insurance(w, coverage, payer.name, false);
        w.field_arr("item");
        for (i, ((code, cents), paid)) in lines.iter().zip(&paid).enumerate() {
            w.begin_obj();
            w.field_u64("sequence", i as u64 + 1);
            w.concept("productOrService", code);
            w.field_date("servicedDate", visit.start);
            w.field_arr("encounter");
            w.reference_value(visit.encounter, None);
            w.end_arr();
            w.money("net", *cents);
            w.field_arr("adjudication");
            adjudication(w, "submitted", "Submitted Amount", *cents);
            adjudication(w, "benefit", "Benefit Amount", *paid);
            w.end_arr();
            w.end_obj();
        }
        w.end_arr();
        let paid_total: u64 = paid.iter().sum();
        w.field_arr("total");
        adjudication(w, "submitted", "Submitted Amount", total);
        adjudication(w, "benefit", "Benefit Amount", paid_total);
        w.end_arr();
        w.field_obj("payment");
        w.money("amount", paid_total);
        w.end_obj();
    })
}

/// `insurance[0]`: the focal Coverage. Claim also needs `sequence` (R4 Claim.insurance.sequence
/// is 1..1; in EOB it does not exist).
fn insurance(w: &mut JsonWriter, coverage: Ref, payer: &str, with_sequence: bool) {
    w.field_arr("insurance");
    w.begin_obj();
    if with_sequence {
        w.field_u64("sequence", 1);
    }
    w.field_bool("focal", true);
    w.key("coverage");
    w.reference_value(coverage, Some(payer));
    w.end_obj();
    w.end_arr();
}

fn adjudication(w: &mut JsonWriter, code: &'static str, display: &'static str, cents: u64) {
    w.begin_obj();
    w.concept("category", &Code { system: ADJUDICATION, code, display });
    w.money("amount", cents);
    w.end_obj();
}
