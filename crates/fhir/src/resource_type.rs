//! The 146 R4 (4.0.1) resource types.

/// Every concrete R4 resource type, sorted (binary-searchable).
pub const RESOURCE_TYPES: &[&str] = &[
    "Account",
    "ActivityDefinition",
    "AdverseEvent",
    "AllergyIntolerance",
    "Appointment",
    "AppointmentResponse",
    "AuditEvent",
    "Basic",
    "Binary",
    "BiologicallyDerivedProduct",
    "BodyStructure",
    "Bundle",
    "CapabilityStatement",
    "CarePlan",
    "CareTeam",
    "CatalogEntry",
    "ChargeItem",
    "ChargeItemDefinition",
    "Claim",
    "ClaimResponse",
    "ClinicalImpression",
    "CodeSystem",
    "Communication",
    "CommunicationRequest",
    "CompartmentDefinition",
    "Composition",
    "ConceptMap",
    "Condition",
    "Consent",
    "Contract",
    "Coverage",
    "CoverageEligibilityRequest",
    "CoverageEligibilityResponse",
    "DetectedIssue",
    "Device",
    "DeviceDefinition",
    "DeviceMetric",
    "DeviceRequest",
    "DeviceUseStatement",
    "DiagnosticReport",
    "DocumentManifest",
    "DocumentReference",
    "EffectEvidenceSynthesis",
    "Encounter",
    "Endpoint",
    "EnrollmentRequest",
    "EnrollmentResponse",
    "EpisodeOfCare",
    "EventDefinition",
    "Evidence",
    "EvidenceVariable",
    "ExampleScenario",
    "ExplanationOfBenefit",
    "FamilyMemberHistory",
    "Flag",
    "Goal",
    "GraphDefinition",
    "Group",
    "GuidanceResponse",
    "HealthcareService",
    "ImagingStudy",
    "Immunization",
    "ImmunizationEvaluation",
    "ImmunizationRecommendation",
    "ImplementationGuide",
    "InsurancePlan",
    "Invoice",
    "Library",
    "Linkage",
    "List",
    "Location",
    "Measure",
    "MeasureReport",
    "Media",
    "Medication",
    "MedicationAdministration",
    "MedicationDispense",
    "MedicationKnowledge",
    "MedicationRequest",
    "MedicationStatement",
    "MedicinalProduct",
    "MedicinalProductAuthorization",
    "MedicinalProductContraindication",
    "MedicinalProductIndication",
    "MedicinalProductIngredient",
    "MedicinalProductInteraction",
    "MedicinalProductManufactured",
    "MedicinalProductPackaged",
    "MedicinalProductPharmaceutical",
    "MedicinalProductUndesirableEffect",
    "MessageDefinition",
    "MessageHeader",
    "MolecularSequence",
    "NamingSystem",
    "NutritionOrder",
    "Observation",
    "ObservationDefinition",
    "OperationDefinition",
    "OperationOutcome",
    "Organization",
    "OrganizationAffiliation",
    "Parameters",
    "Patient",
    "PaymentNotice",
    "PaymentReconciliation",
    "Person",
    "PlanDefinition",
    "Practitioner",
    "PractitionerRole",
    "Procedure",
    "Provenance",
    "Questionnaire",
    "QuestionnaireResponse",
    "RelatedPerson",
    "RequestGroup",
    "ResearchDefinition",
    "ResearchElementDefinition",
    "ResearchStudy",
    "ResearchSubject",
    "RiskAssessment",
    "RiskEvidenceSynthesis",
    "Schedule",
    "SearchParameter",
    "ServiceRequest",
    "Slot",
    "Specimen",
    "SpecimenDefinition",
    "StructureDefinition",
    "StructureMap",
    "Subscription",
    "Substance",
    "SubstanceNucleicAcid",
    "SubstancePolymer",
    "SubstanceProtein",
    "SubstanceReferenceInformation",
    "SubstanceSourceMaterial",
    "SubstanceSpecification",
    "SupplyDelivery",
    "SupplyRequest",
    "Task",
    "TerminologyCapabilities",
    "TestReport",
    "TestScript",
    "ValueSet",
    "VerificationResult",
    "VisionPrescription",
];

/// True when `name` is an R4 resource type.
pub fn is_resource_type(name: &str) -> bool {
    resource_type_index(name).is_some()
}

/// A small integer standing for an R4 resource type in storage indexes: its position in
/// [`RESOURCE_TYPES`] (Account = 0 … VisionPrescription = 145). R4 is frozen, so the codes are
/// stable; databases store them, so the list must never be reordered. None for other names.
pub fn resource_type_code(name: &str) -> Option<i64> {
    resource_type_index(name).map(|index| index as i64)
}

/// The position of `name` in [`RESOURCE_TYPES`]. Every reference in every written resource
/// asks, several times over (validation, compartments, references), so this is one hash and
/// usually one comparison rather than a binary search's eight.
pub fn resource_type_index(name: &str) -> Option<usize> {
    let bytes = name.as_bytes();
    if bytes.is_empty() {
        return None;
    }
    let mask = TYPE_SLOTS.len() - 1;
    let mut at = type_slot(bytes);
    loop {
        let index = usize::from(TYPE_SLOTS[at]).checked_sub(1)?;
        if RESOURCE_TYPES[index] == name {
            return Some(index);
        }
        at = (at + 1) & mask;
    }
}

/// Open addressing over [`RESOURCE_TYPES`] (load under 1/3): each slot holds a type's position
/// plus one, 0 when empty. Built at compile time.
static TYPE_SLOTS: [u8; 512] = type_slots();

/// The first slot tried for a (non-empty) name: its length and four of its bytes, mixed.
const fn type_slot(name: &[u8]) -> usize {
    let n = name.len();
    let picks = [0, n / 2, n - 1, n * 3 / 4];
    let mut hash = n as u32;
    let mut pick = 0;
    while pick < picks.len() {
        hash = hash.wrapping_mul(31).wrapping_add(name[picks[pick]] as u32);
        pick += 1;
    }
    (hash.wrapping_mul(0x9E37_79B1) >> (32 - 9)) as usize
}

const fn type_slots() -> [u8; 512] {
    assert!(RESOURCE_TYPES.len() < 255);
    let mut slots = [0u8; 512];
    let mut index = 0;
    while index < RESOURCE_TYPES.len() {
        let mut at = type_slot(RESOURCE_TYPES[index].as_bytes());
        while slots[at] != 0 {
            at = (at + 1) & 511;
        }
        slots[at] = index as u8 + 1;
        index += 1;
    }
    slots
}

/// The resource type a [`resource_type_code`] stands for.
pub fn resource_type_name(code: i64) -> Option<&'static str> {
    usize::try_from(code).ok().and_then(|index| RESOURCE_TYPES.get(index)).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_is_sorted_and_complete() {
        assert!(RESOURCE_TYPES.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(RESOURCE_TYPES.len(), 146);
        assert!(is_resource_type("Observation"));
        assert!(is_resource_type("Binary"));
        assert!(is_resource_type("BiologicallyDerivedProduct"));
        assert!(!is_resource_type("observation"));
        assert!(!is_resource_type("MedicationOrder"));
        for name in ["", "A", "Observatio", "Observations", "VisionPrescriptionX", "patient", "Patient/1"] {
            assert!(!is_resource_type(name), "{name}");
        }
    }

    /// Databases store these codes: they must never change.
    #[test]
    fn type_codes_are_stable_and_round_trip() {
        assert_eq!(resource_type_code("Account"), Some(0));
        assert_eq!(resource_type_code("Observation"), Some(95));
        assert_eq!(resource_type_code("Patient"), Some(102));
        assert_eq!(resource_type_code("VisionPrescription"), Some(145));
        assert_eq!(resource_type_code("observation"), None);
        assert_eq!(resource_type_name(146), None);
        assert_eq!(resource_type_name(-1), None);
        for (index, name) in RESOURCE_TYPES.iter().enumerate() {
            assert_eq!(resource_type_code(name), Some(index as i64));
            assert_eq!(resource_type_name(index as i64), Some(*name));
        }
    }
}
