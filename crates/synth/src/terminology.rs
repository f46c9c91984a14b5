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
pub(crate) const OBSERVATION_CATEGORY: &str =
    "http://terminology.hl7.org/CodeSystem/observation-category";
pub(crate) const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
pub(crate) const CONDITION_CLINICAL: &str =
    "http://terminology.hl7.org/CodeSystem/condition-clinical";
pub(crate) const CONDITION_VER_STATUS: &str =
    "http://terminology.hl7.org/CodeSystem/condition-ver-status";
pub(crate) const CONDITION_CATEGORY: &str =
    "http://terminology.hl7.org/CodeSystem/condition-category";
pub(crate) const ALLERGY_CLINICAL: &str =
    "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical";
pub(crate) const ALLERGY_VERIFICATION: &str =
    "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification";
pub(crate) const V2_0074: &str = "http://terminology.hl7.org/CodeSystem/v2-0074";
pub(crate) const V2_0203: &str = "http://terminology.hl7.org/CodeSystem/v2-0203";
pub(crate) const CLAIM_TYPE: &str = "http://terminology.hl7.org/CodeSystem/claim-type";
pub(crate) const PROCESS_PRIORITY: &str = "http://terminology.hl7.org/CodeSystem/processpriority";
pub(crate) const ADJUDICATION: &str = "http://terminology.hl7.org/CodeSystem/adjudication";
pub(crate) const SUBSCRIBER_RELATIONSHIP: &str =
    "http://terminology.hl7.org/CodeSystem/subscriber-relationship";
pub(crate) const PROVENANCE_PARTICIPANT: &str =
    "http://terminology.hl7.org/CodeSystem/provenance-participant-type";
pub(crate) const ROLE_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-RoleCode";
pub(crate) const MARITAL_STATUS: &str = "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus";
pub(crate) const ORGANIZATION_TYPE: &str =
    "http://terminology.hl7.org/CodeSystem/organization-type";
pub(crate) const LOCATION_PHYSICAL_TYPE: &str =
    "http://terminology.hl7.org/CodeSystem/location-physical-type";
pub(crate) const DOCUMENT_CATEGORY: &str =
    "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category";
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

const fn c(system: &'static str, code: &'static str, display: &'static str) -> Code {
    Code { system, code, display }
}

/// A measured quantity: LOINC code, UCUM unit, and a normal-ish distribution to draw from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Measure {
    pub(crate) code: &'static str,
    pub(crate) display: &'static str,
    pub(crate) unit: &'static str,
    pub(crate) mean: f64,
    pub(crate) sd: f64,
    pub(crate) places: usize,
}

const fn m(code: &'static str, display: &'static str, unit: &'static str, mean: f64, sd: f64, places: usize) -> Measure {
    Measure { code, display, unit, mean, sd, places }
}

/// Vital signs, one Observation each per encounter (R4 vital-signs profile codes and units).
pub(crate) const VITALS: &[Measure] = &[
    m("8302-2", "Body height", "cm", 168.0, 10.0, 1),
    m("29463-7", "Body weight", "kg", 78.0, 15.0, 1),
    m("39156-5", "Body mass index (BMI) [Ratio]", "kg/m2", 27.0, 4.0, 1),
    m("8867-4", "Heart rate", "/min", 74.0, 9.0, 0),
    m("9279-1", "Respiratory rate", "/min", 15.0, 2.0, 0),
    m("8310-5", "Body temperature", "Cel", 36.8, 0.3, 1),
    m("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry", "%", 97.0, 1.2, 0),
];

/// Blood pressure panel and its two components (the profile puts them in `component`).
pub(crate) const BLOOD_PRESSURE: Code = c(LOINC, "85354-9", "Blood pressure panel with all children optional");
pub(crate) const SYSTOLIC: Measure = m("8480-6", "Systolic blood pressure", "mm[Hg]", 122.0, 14.0, 0);
pub(crate) const DIASTOLIC: Measure = m("8462-4", "Diastolic blood pressure", "mm[Hg]", 79.0, 9.0, 0);

/// A laboratory panel: the DiagnosticReport code and the Observations it groups.
pub(crate) struct Panel {
    pub(crate) code: &'static str,
    pub(crate) display: &'static str,
    pub(crate) tests: &'static [Measure],
}

pub(crate) const LAB_PANELS: &[Panel] = &[
    Panel {
        code: "51990-0",
        display: "Basic metabolic panel - Blood",
        tests: &[
            m("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL", 92.0, 12.0, 1),
            m("6299-2", "Urea nitrogen [Mass/volume] in Blood", "mg/dL", 14.0, 3.5, 1),
            m("38483-4", "Creatinine [Mass/volume] in Blood", "mg/dL", 0.95, 0.2, 2),
            m("49765-1", "Calcium [Mass/volume] in Blood", "mg/dL", 9.4, 0.4, 1),
            m("2947-0", "Sodium [Moles/volume] in Blood", "mmol/L", 140.0, 2.0, 0),
            m("6298-4", "Potassium [Moles/volume] in Blood", "mmol/L", 4.2, 0.3, 1),
            m("2069-3", "Chloride [Moles/volume] in Blood", "mmol/L", 103.0, 2.5, 0),
            m("20565-8", "Carbon dioxide, total [Moles/volume] in Blood", "mmol/L", 25.0, 2.0, 0),
        ],
    },
    Panel {
        code: "57698-3",
        display: "Lipid panel with direct LDL - Serum or Plasma",
        tests: &[
            m("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", 190.0, 30.0, 1),
            m("2571-8", "Triglycerides [Mass/volume] in Serum or Plasma", "mg/dL", 140.0, 35.0, 1),
            m("18262-6", "Cholesterol in LDL [Mass/volume] in Serum or Plasma by Direct assay", "mg/dL", 110.0, 25.0, 1),
            m("2085-9", "Cholesterol in HDL [Mass/volume] in Serum or Plasma", "mg/dL", 55.0, 12.0, 1),
        ],
    },
    Panel {
        code: "58410-2",
        display: "CBC panel - Blood by Automated count",
        tests: &[
            m("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL", 7.0, 1.5, 1),
            m("789-8", "Erythrocytes [#/volume] in Blood by Automated count", "10*6/uL", 4.7, 0.4, 2),
            m("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 14.2, 1.2, 1),
            m("4544-3", "Hematocrit [Volume Fraction] of Blood by Automated count", "%", 42.0, 3.5, 1),
            m("777-3", "Platelets [#/volume] in Blood by Automated count", "10*3/uL", 260.0, 50.0, 0),
        ],
    },
    Panel {
        code: "4548-4",
        display: "Hemoglobin A1c/Hemoglobin.total in Blood",
        tests: &[m("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", 5.8, 0.7, 1)],
    },
];

/// Encounter class (v3-ActCode, the R4 extensible binding's code system) with the encounter
/// types that go with it and the share of encounters in that class.
pub(crate) struct EncounterKind {
    pub(crate) class_code: &'static str,
    pub(crate) class_display: &'static str,
    pub(crate) types: &'static [Code],
    /// Length of stay range in minutes.
    pub(crate) minutes: (i64, i64),
    pub(crate) weight: u32,
}

pub(crate) const ENCOUNTER_KINDS: &[EncounterKind] = &[
    EncounterKind {
        class_code: "AMB",
        class_display: "ambulatory",
        types: &[
            c(SNOMED, "162673000", "General examination of patient (procedure)"),
            c(SNOMED, "185349003", "Encounter for check up (procedure)"),
            c(SNOMED, "185345009", "Encounter for symptom"),
            c(SNOMED, "185347001", "Encounter for problem (procedure)"),
            c(SNOMED, "390906007", "Follow-up encounter"),
            c(SNOMED, "698314001", "Consultation for treatment"),
            c(SNOMED, "410620009", "Well child visit (procedure)"),
        ],
        minutes: (15, 60),
        weight: 82,
    },
    EncounterKind {
        class_code: "EMER",
        class_display: "emergency",
        types: &[
            c(SNOMED, "50849002", "Emergency room admission (procedure)"),
            c(SNOMED, "702927004", "Urgent care clinic (procedure)"),
        ],
        minutes: (60, 360),
        weight: 10,
    },
    EncounterKind {
        class_code: "IMP",
        class_display: "inpatient encounter",
        types: &[c(SNOMED, "183452005", "Encounter Inpatient")],
        minutes: (24 * 60, 6 * 24 * 60),
        weight: 5,
    },
    EncounterKind {
        class_code: "VR",
        class_display: "virtual",
        types: &[c(SNOMED, "185316007", "Indirect encounter (procedure)")],
        minutes: (10, 30),
        weight: 3,
    },
];

/// A diagnosis, whether it lasts, and what is prescribed and planned for it.
pub(crate) struct Diagnosis {
    pub(crate) code: &'static str,
    pub(crate) display: &'static str,
    pub(crate) chronic: bool,
    /// Index into [`MEDICATIONS`].
    pub(crate) medication: Option<usize>,
    /// Care plan category (SNOMED) and one activity.
    pub(crate) care_plan: Option<(Code, Code)>,
}

const fn dx(code: &'static str, display: &'static str, chronic: bool, medication: Option<usize>, care_plan: Option<(Code, Code)>) -> Diagnosis {
    Diagnosis { code, display, chronic, medication, care_plan }
}

pub(crate) const DIAGNOSES: &[Diagnosis] = &[
    dx("444814009", "Viral sinusitis (disorder)", false, Some(7), None),
    dx("195662009", "Acute viral pharyngitis (disorder)", false, Some(7), None),
    dx("10509002", "Acute bronchitis (disorder)", false, Some(8), Some((c(SNOMED, "53950000", "Respiratory therapy"), c(SNOMED, "304510005", "Recommendation to avoid exercise")))),
    dx("43878008", "Streptococcal sore throat (disorder)", false, Some(6), None),
    dx("44465007", "Sprain of ankle", false, Some(9), Some((c(SNOMED, "91251008", "Physical therapy procedure"), c(SNOMED, "229586001", "Rest, ice, compression and elevation treatment programme")))),
    dx("65363002", "Otitis media", false, Some(6), None),
    dx("59621000", "Hypertension", true, Some(0), Some((c(SNOMED, "443402002", "Lifestyle education regarding hypertension"), c(SNOMED, "386463000", "Prescribed activity/exercise education")))),
    dx("55822004", "Hyperlipidemia", true, Some(3), Some((c(SNOMED, "736285004", "Hyperlipidemia clinical management plan"), c(SNOMED, "183063000", "Low salt diet education")))),
    dx("15777000", "Prediabetes", true, None, Some((c(SNOMED, "698360004", "Diabetes self management plan"), c(SNOMED, "160670007", "Diabetic diet")))),
    dx("44054006", "Diabetes mellitus type 2 (disorder)", true, Some(1), Some((c(SNOMED, "698360004", "Diabetes self management plan"), c(SNOMED, "160670007", "Diabetic diet")))),
    dx("195967001", "Asthma", true, Some(4), Some((c(SNOMED, "699728000", "Asthma self management"), c(SNOMED, "710081004", "Smoking cessation therapy")))),
    dx("49436004", "Atrial Fibrillation", true, Some(10), None),
    dx("271737000", "Anemia (disorder)", true, None, None),
    dx("162864005", "Body mass index 30+ - obesity (finding)", true, None, None),
    dx("239873007", "Osteoarthritis of knee", true, Some(9), Some((c(SNOMED, "408869004", "Musculoskeletal care"), c(SNOMED, "229065009", "Exercise therapy")))),
    dx("82423001", "Chronic pain", true, Some(11), None),
    dx("40055000", "Chronic sinusitis (disorder)", true, None, None),
    dx("64859006", "Osteoporosis (disorder)", true, None, None),
];

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

pub(crate) const GIVEN_FEMALE: &[&str] = &[
    "Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan", "Jessica", "Sarah", "Karen",
    "Lisa", "Nancy", "Betty", "Sandra", "Margaret", "Ashley", "Kimberly", "Emily", "Donna", "Michelle",
    "Maria", "Sofia", "Aiyana", "Mei", "Fatima", "Priya", "Olga", "Chloé", "Zoë", "Nia",
];

pub(crate) const GIVEN_MALE: &[&str] = &[
    "James", "Robert", "John", "Michael", "David", "William", "Richard", "Joseph", "Thomas", "Christopher",
    "Charles", "Daniel", "Matthew", "Anthony", "Mark", "Donald", "Steven", "Andrew", "Paul", "Joshua",
    "José", "Wei", "Mohammed", "Arjun", "Hiroshi", "Kwame", "Dmitri", "Liam", "Noah", "Mateo",
];

pub(crate) const FAMILY: &[&str] = &[
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez", "Martinez",
    "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor", "Moore", "Jackson", "Martin",
    "Lee", "Perez", "Thompson", "White", "Harris", "Sanchez", "Clark", "Ramirez", "Lewis", "Robinson",
    "Nguyen", "O'Brien", "Kowalski", "Müller", "Okafor", "Chen", "Patel", "Kim", "Yamamoto", "Schmidt",
];

/// City, state, ZIP prefix.
pub(crate) const CITIES: &[(&str, &str, &str)] = &[
    ("Boston", "MA", "021"), ("Worcester", "MA", "016"), ("Springfield", "MA", "011"),
    ("Providence", "RI", "029"), ("Hartford", "CT", "061"), ("Manchester", "NH", "031"),
    ("Burlington", "VT", "054"), ("Portland", "ME", "041"), ("Albany", "NY", "122"),
    ("Newark", "NJ", "071"), ("Philadelphia", "PA", "191"), ("Baltimore", "MD", "212"),
];

pub(crate) const STREETS: &[&str] = &[
    "Main St", "Oak Ave", "Maple Dr", "Cedar Ln", "Elm St", "Washington Blvd", "Park Rd",
    "Lake View Ter", "Hillside Ave", "River Rd", "Church St", "Mill Pond Way",
];

/// Payer names; each becomes an Organization of type `pay`.
pub(crate) const PAYERS: &[&str] = &[
    "Blue Cross Blue Shield", "Aetna", "UnitedHealthcare", "Cigna Health", "Humana",
    "Medicare", "Medicaid",
];

pub(crate) const HOSPITAL_WORDS: &[&str] = &[
    "General Hospital", "Medical Center", "Family Practice", "Community Health Center",
    "Urgent Care", "Clinic",
];
