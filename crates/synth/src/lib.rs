//! Deterministic synthetic FHIR R4 data (placeholder; being written).
