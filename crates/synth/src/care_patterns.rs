//! How care happens: encounter classes and types, and the diagnoses with the prescriptions and
//! care plans they lead to.

use crate::terminology::{c, Code, SNOMED};

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
    /// Index into [`crate::terminology::MEDICATIONS`].
    pub(crate) medication: Option<usize>,
    /// Care plan category (SNOMED) and one activity.
    pub(crate) care_plan: Option<(Code, Code)>,
}

const fn dx(
    code: &'static str,
    display: &'static str,
    chronic: bool,
    medication: Option<usize>,
    care_plan: Option<(Code, Code)>,
) -> Diagnosis {
    Diagnosis { code, display, chronic, medication, care_plan }
}

pub(crate) const DIAGNOSES: &[Diagnosis] = &[
    dx("444814009", "Viral sinusitis (disorder)", false, Some(7), None),
    dx("195662009", "Acute viral pharyngitis (disorder)", false, Some(7), None),
    dx(
        "10509002",
        "Acute bronchitis (disorder)",
        false,
        Some(8),
        Some((
            c(SNOMED, "53950000", "Respiratory therapy"),
            c(SNOMED, "304510005", "Recommendation to avoid exercise"),
        )),
    ),
    dx("43878008", "Streptococcal sore throat (disorder)", false, Some(6), None),
    dx(
        "44465007",
        "Sprain of ankle",
        false,
        Some(9),
        Some((
            c(SNOMED, "91251008", "Physical therapy procedure"),
            c(SNOMED, "229586001", "Rest, ice, compression and elevation treatment programme"),
        )),
    ),
    dx("65363002", "Otitis media", false, Some(6), None),
    dx(
        "59621000",
        "Hypertension",
        true,
        Some(0),
        Some((
            c(SNOMED, "443402002", "Lifestyle education regarding hypertension"),
            c(SNOMED, "386463000", "Prescribed activity/exercise education"),
        )),
    ),
    dx(
        "55822004",
        "Hyperlipidemia",
        true,
        Some(3),
        Some((
            c(SNOMED, "736285004", "Hyperlipidemia clinical management plan"),
            c(SNOMED, "183063000", "Low salt diet education"),
        )),
    ),
    dx(
        "15777000",
        "Prediabetes",
        true,
        None,
        Some((c(SNOMED, "698360004", "Diabetes self management plan"), c(SNOMED, "160670007", "Diabetic diet"))),
    ),
    dx(
        "44054006",
        "Diabetes mellitus type 2 (disorder)",
        true,
        Some(1),
        Some((c(SNOMED, "698360004", "Diabetes self management plan"), c(SNOMED, "160670007", "Diabetic diet"))),
    ),
    dx(
        "195967001",
        "Asthma",
        true,
        Some(4),
        Some((c(SNOMED, "699728000", "Asthma self management"), c(SNOMED, "710081004", "Smoking cessation therapy"))),
    ),
    dx("49436004", "Atrial Fibrillation", true, Some(10), None),
    dx("271737000", "Anemia (disorder)", true, None, None),
    dx("162864005", "Body mass index 30+ - obesity (finding)", true, None, None),
    dx(
        "239873007",
        "Osteoarthritis of knee",
        true,
        Some(9),
        Some((c(SNOMED, "408869004", "Musculoskeletal care"), c(SNOMED, "229065009", "Exercise therapy"))),
    ),
    dx("82423001", "Chronic pain", true, Some(11), None),
    dx("40055000", "Chronic sinusitis (disorder)", true, None, None),
    dx("64859006", "Osteoporosis (disorder)", true, None, None),
];
