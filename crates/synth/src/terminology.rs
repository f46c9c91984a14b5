//! Code systems and the value tables the generator draws from.
//!
//! Codes and displays are taken from real terminologies (LOINC, SNOMED CT, RxNorm, CVX, HL7
//! terminology) so that downstream tools that look codes up see plausible data; the choice
//! mirrors what Synthea emits, which is what most FHIR test suites already understand.

pub(crate) const LOINC: &str = "http://loinc.org";
pub(crate) const SNOMED: &str = "http://snomed.info/sct";
pub(crate) const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";
pub(crate) const CVX: &str = "http://hl7.org/fhir/sid/cvx";
pub(crate) const UCUM: &str = "http://unitsofmeasure.org";
pub(crate) const OBSERVATION_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
pub(crate) const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
pub(crate) const CONDITION_CLINICAL: &str = "http://terminology.hl7.org/CodeSystem/condition-clinical";
pub(crate) const CONDITION_VER_STATUS: &str = "http://terminology.hl7.org/CodeSystem/condition-ver-status";
pub(crate) const CONDITION_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/condition-category";
pub(crate) const ALLERGY_CLINICAL: &str = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical";
pub(crate) const ALLERGY_VERIFICATION: &str = "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification";
pub(crate) const V2_0074: &str = "http://terminology.hl7.org/CodeSystem/v2-0074";
pub(crate) const V2_0203: &str = "http://terminology.hl7.org/CodeSystem/v2-0203";
pub(crate) const CLAIM_TYPE: &str = "http://terminology.hl7.org/CodeSystem/claim-type";
pub(crate) const PROCESS_PRIORITY: &str = "http://terminology.hl7.org/CodeSystem/processpriority";
pub(crate) const ADJUDICATION: &str = "http://terminology.hl7.org/CodeSystem/adjudication";
pub(crate) const SUBSCRIBER_RELATIONSHIP: &str = "http://terminology.hl7.org/CodeSystem/subscriber-relationship";
pub(crate) const PROVENANCE_PARTICIPANT: &str = "http://terminology.hl7.org/CodeSystem/provenance-participant-type";
pub(crate) const ROLE_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-RoleCode";
pub(crate) const MARITAL_STATUS: &str = "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus";
pub(crate) const ORGANIZATION_TYPE: &str = "http://terminology.hl7.org/CodeSystem/organization-type";
pub(crate) const LOCATION_PHYSICAL_TYPE: &str = "http://terminology.hl7.org/CodeSystem/location-physical-type";
pub(crate) const DOCUMENT_CATEGORY: &str = "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category";
pub(crate) const NPI: &str = "http://hl7.org/fhir/sid/us-npi";
pub(crate) const SSN: &str = "http://hl7.org/fhir/sid/us-ssn";
/// Identifier namespace for the synthetic medical record numbers; any stable URI works.
pub(crate) const MRN_SYSTEM: &str = "https://bulkhead.example/fhir/sid/mrn";
pub(crate) const PAYER_ID_SYSTEM: &str = "https://bulkhead.example/fhir/sid/payer";
pub(crate) const MEMBER_ID_SYSTEM: &str = "https://bulkhead.example/fhir/sid/member";

/// A code with its system and display.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Code {
    pub(crate) system: &'static str,
    pub(crate) code: &'static str,
    pub(crate) display: &'static str,
}

pub(crate) const fn c(system: &'static str, code: &'static str, display: &'static str) -> Code {
    Code { system, code, display }
}

/// Medications, written once as shared Medication resources (RxNorm coded).
pub(crate) const MEDICATIONS: &[Code] = &[
    c(RXNORM, "310798", "Hydrochlorothiazide 25 MG Oral Tablet"),
    c(RXNORM, "860975", "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet"),
    c(RXNORM, "197361", "Amlodipine 5 MG Oral Tablet"),
    c(RXNORM, "314231", "Simvastatin 10 MG Oral Tablet"),
    c(RXNORM, "895994", "120 ACTUAT Fluticasone propionate 0.044 MG/ACTUAT Metered Dose Inhaler"),
    c(RXNORM, "313782", "Acetaminophen 325 MG Oral Tablet"),
    c(RXNORM, "834060", "Penicillin V Potassium 250 MG Oral Tablet"),
    c(RXNORM, "562251", "Amoxicillin 250 MG / Clavulanate 125 MG Oral Tablet"),
    c(RXNORM, "2123111", "NDA020503 200 ACTUAT Albuterol 0.09 MG/ACTUAT Metered Dose Inhaler"),
    c(RXNORM, "849574", "Naproxen sodium 220 MG Oral Tablet"),
    c(RXNORM, "855332", "Warfarin Sodium 5 MG Oral Tablet"),
    c(RXNORM, "1049221", "Acetaminophen 325 MG / Oxycodone Hydrochloride 5 MG Oral Tablet"),
    c(RXNORM, "309362", "Clopidogrel 75 MG Oral Tablet"),
    c(RXNORM, "197604", "Digoxin 0.125 MG Oral Tablet"),
    c(RXNORM, "310965", "Ibuprofen 200 MG Oral Tablet"),
];

pub(crate) const PROCEDURES: &[Code] = &[
    c(SNOMED, "430193006", "Medication Reconciliation (procedure)"),
    c(SNOMED, "171207006", "Depression screening"),
    c(SNOMED, "76601001", "Intramuscular injection"),
    c(SNOMED, "73761001", "Colonoscopy"),
    c(SNOMED, "117015009", "Throat culture (procedure)"),
    c(SNOMED, "127783003", "Spirometry (procedure)"),
    c(SNOMED, "71651007", "Mammography (procedure)"),
    c(SNOMED, "180325003", "Electrical cardioversion"),
    c(SNOMED, "228557008", "Cognitive and behavioral therapy"),
    c(SNOMED, "268556000", "Urine screening for glucose"),
];

pub(crate) const VACCINES: &[Code] = &[
    c(CVX, "140", "Influenza, seasonal, injectable, preservative free"),
    c(CVX, "113", "Td (adult) preservative free"),
    c(CVX, "115", "Tdap"),
    c(CVX, "133", "Pneumococcal conjugate PCV 13"),
    c(CVX, "62", "HPV, quadrivalent"),
    c(CVX, "43", "Hep B, adult"),
    c(CVX, "121", "zoster"),
    c(CVX, "208", "SARS-COV-2 (COVID-19) vaccine, mRNA, spike protein, LNP, preservative free, 30 mcg/0.3mL dose"),
];

/// Allergy substance code and its AllergyIntolerance category (a required binding).
pub(crate) const ALLERGIES: &[(Code, &str)] = &[
    (c(SNOMED, "419474003", "Allergy to mould"), "environment"),
    (c(SNOMED, "232347008", "Dander (animal) allergy"), "environment"),
    (c(SNOMED, "418689008", "Allergy to grass pollen"), "environment"),
    (c(SNOMED, "232350006", "House dust mite allergy"), "environment"),
    (c(SNOMED, "91934008", "Allergy to nut"), "food"),
    (c(SNOMED, "300913006", "Shellfish allergy"), "food"),
    (c(SNOMED, "91935009", "Allergy to peanuts"), "food"),
    (c(SNOMED, "91936005", "Allergy to penicillin"), "medication"),
];

/// Note types for DocumentReference.type (LOINC).
pub(crate) const NOTE_TYPES: &[Code] = &[
    c(LOINC, "34117-2", "History and physical note"),
    c(LOINC, "11506-3", "Progress note"),
    c(LOINC, "18842-5", "Discharge summary"),
];

/// RelatedPerson.relationship codes (v3-RoleCode, from the R4 preferred value set).
pub(crate) const RELATIONSHIPS: &[Code] = &[
    c(ROLE_CODE, "MTH", "mother"),
    c(ROLE_CODE, "FTH", "father"),
    c(ROLE_CODE, "SPS", "spouse"),
    c(ROLE_CODE, "CHILD", "child"),
    c(ROLE_CODE, "SIB", "sibling"),
];

pub(crate) const MARITAL: &[Code] = &[
    c(MARITAL_STATUS, "M", "Married"),
    c(MARITAL_STATUS, "S", "Never Married"),
    c(MARITAL_STATUS, "D", "Divorced"),
    c(MARITAL_STATUS, "W", "Widowed"),
];
