//! What is measured: vital signs and laboratory panels (LOINC codes, UCUM units, and the
//! distributions values are drawn from).

use crate::terminology::{c, Code, LOINC};

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

const fn m(
    code: &'static str,
    display: &'static str,
    unit: &'static str,
    mean: f64,
    sd: f64,
    places: usize,
) -> Measure {
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
            m(
                "18262-6",
                "Cholesterol in LDL [Mass/volume] in Serum or Plasma by Direct assay",
                "mg/dL",
                110.0,
                25.0,
                1,
            ),
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
