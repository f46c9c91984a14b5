//! Resources shared by many patients, written once: Organizations (providers and payers),
//! Locations, Practitioners and Medications.

use std::ops::Range;

use crate::datatypes::Ref;
use crate::json::JsonWriter;
use crate::population::{CITIES, FAMILY, GIVEN_FEMALE, GIVEN_MALE, HOSPITAL_WORDS, PAYERS, STREETS};
use crate::rng::{Id, Rng};
use crate::terminology::{Code, LOCATION_PHYSICAL_TYPE, MEDICATIONS, NPI, ORGANIZATION_TYPE, PAYER_ID_SYSTEM};
use crate::writer::Output;
use crate::SynthError;

/// Id key space of the shared resources: slot 0 (patients use slots 1..).
const SHARED_SLOT: u64 = 0;
/// The RNG stream for shared resources; patient streams are their index, far below this.
const SHARED_STREAM: u64 = u64::MAX;

/// A care provider organization with its site and staff.
pub(crate) struct Provider {
    pub(crate) org: Ref,
    pub(crate) location: Ref,
    pub(crate) name: String,
    /// Indexes into [`Shared::practitioners`].
    pub(crate) staff: Range<usize>,
}

pub(crate) struct Payer {
    pub(crate) org: Ref,
    pub(crate) name: &'static str,
}

pub(crate) struct Clinician {
    pub(crate) person: Ref,
    pub(crate) name: String,
}

/// Everything a patient's resources may point at outside the patient.
pub(crate) struct Shared {
    pub(crate) providers: Vec<Provider>,
    pub(crate) payers: Vec<Payer>,
    pub(crate) practitioners: Vec<Clinician>,
    /// Parallel to [`MEDICATIONS`].
    pub(crate) medications: Vec<Ref>,
}

/// Mints ids in the shared key space.
struct SharedIds {
    seed: u64,
    next: u64,
}

impl SharedIds {
    fn mint(&mut self, resource_type: &'static str) -> Ref {
        let key = (SHARED_SLOT << 24) | self.next;
        self.next += 1;
        Ref { resource_type, id: Id::mint(self.seed, key), local: false }
    }
}

/// Plans the shared resources. Their number grows slowly with the data set (a health system
/// of 100,000 patients has more sites than one of 100) but stays bounded.
pub(crate) fn plan(seed: u64, patients: u64) -> Shared {
    let mut rng = Rng::for_stream(seed, SHARED_STREAM);
    let mut ids = SharedIds { seed, next: 0 };
    let provider_count = (patients / 250).clamp(5, 400) as usize;
    let mut providers = Vec::with_capacity(provider_count);
    let mut practitioners = Vec::new();
    for i in 0..provider_count {
        let (city, _, _) = CITIES[i % CITIES.len()];
        let name = format!("{city} {} {}", rng.pick(HOSPITAL_WORDS), i / CITIES.len() + 1);
        let org = ids.mint("Organization");
        let location = ids.mint("Location");
        let first = practitioners.len();
        for _ in 0..rng.range(4, 12) {
            let given = if rng.chance(0.5) { rng.pick(GIVEN_FEMALE) } else { rng.pick(GIVEN_MALE) };
            let name = format!("{given} {}", rng.pick(FAMILY));
            practitioners.push(Clinician { person: ids.mint("Practitioner"), name });
        }
        providers.push(Provider { org, location, name, staff: first..practitioners.len() });
    }
    let payers = PAYERS.iter().map(|&name| Payer { org: ids.mint("Organization"), name }).collect();
    let medications = MEDICATIONS.iter().map(|_| ids.mint("Medication")).collect();
    Shared { providers, payers, practitioners, medications }
}

/// Writes the shared resources (as the first group: a Bundle named to sort before patients').
pub(crate) fn write(shared: &Shared, seed: u64, out: &mut Output) -> Result<(), SynthError> {
    let mut rng = Rng::for_stream(seed, SHARED_STREAM - 1);
    out.begin_group("0000-shared.json");
    for (i, p) in shared.providers.iter().enumerate() {
        let (city, state, zip) = CITIES[i % CITIES.len()];
        let street = format!("{} {}", rng.range(1, 999), rng.pick(STREETS));
        let phone = format!("555-{:03}-{:04}", rng.below(1000), rng.below(10_000));
        out.resource("Organization", p.org.id, |w| {
            w.field_arr("identifier");
            w.identifier_value(NPI, &format!("{:010}", 1_000_000_000 + i as u64 * 7919 % 1_000_000_000));
            w.end_arr();
            w.field_bool("active", true);
            w.concept_list("type", &Code { system: ORGANIZATION_TYPE, code: "prov", display: "Healthcare Provider" });
            w.field_str("name", &p.name);
            phone_list(w, &phone);
            address_list(w, &street, city, state, zip, i as u64);
        })?;
        out.resource("Location", p.location.id, |w| {
            w.field_str("status", "active");
            w.field_str("name", &p.name);
            w.field_str("mode", "instance");
            phone_list(w, &phone);
            w.key("address");
            address_value(w, &street, city, state, zip, i as u64);
            w.concept("physicalType", &Code { system: LOCATION_PHYSICAL_TYPE, code: "bu", display: "Building" });
            w.reference("managingOrganization", p.org);
        })?;
        for (n, c) in shared.practitioners[p.staff.clone()].iter().enumerate() {
            let (given, family) = c.name.split_once(' ').unwrap_or((&c.name, ""));
            let npi = format!("{:010}", 1_500_000_000 + (i as u64 * 64 + n as u64) * 104_729 % 500_000_000);
            let gender = if GIVEN_FEMALE.contains(&given) { "female" } else { "male" };
            out.resource("Practitioner", c.person.id, |w| {
                w.field_arr("identifier");
                w.identifier_value(NPI, &npi);
                w.end_arr();
                w.field_bool("active", true);
                w.field_arr("name");
                w.begin_obj();
                w.field_str("use", "official");
                w.field_str("family", family);
                w.field_arr("given");
                w.str(given);
                w.end_arr();
                w.field_arr("prefix");
                w.str("Dr.");
                w.end_arr();
                w.end_obj();
                w.end_arr();
                w.field_str("gender", gender);
                address_list(w, &street, city, state, zip, i as u64);
            })?;
        }
    }
    for (i, p) in shared.payers.iter().enumerate() {
        out.resource("Organization", p.org.id, |w| {
            w.field_arr("identifier");
            w.identifier_value(PAYER_ID_SYSTEM, &format!("PAYER-{:03}", i + 1));
            w.end_arr();
            w.field_bool("active", true);
            w.concept_list("type", &Code { system: ORGANIZATION_TYPE, code: "pay", display: "Payer" });
            w.field_str("name", p.name);
        })?;
    }
    for (code, m) in MEDICATIONS.iter().zip(&shared.medications) {
        out.resource("Medication", m.id, |w| {
            w.concept("code", code);
            w.field_str("status", "active");
        })?;
    }
    out.end_group()
}

fn phone_list(w: &mut JsonWriter, phone: &str) {
    w.field_arr("telecom");
    w.begin_obj();
    w.field_str("system", "phone");
    w.field_str("value", phone);
    w.field_str("use", "work");
    w.end_obj();
    w.end_arr();
}

/// `"address":[{...}]`; `salt` varies the ZIP suffix.
pub(crate) fn address_list(w: &mut JsonWriter, street: &str, city: &str, state: &str, zip: &str, salt: u64) {
    w.field_arr("address");
    address_value(w, street, city, state, zip, salt);
    w.end_arr();
}

fn address_value(w: &mut JsonWriter, street: &str, city: &str, state: &str, zip: &str, salt: u64) {
    w.begin_obj();
    w.field_arr("line");
    w.str(street);
    w.end_arr();
    w.field_str("city", city);
    w.field_str("state", state);
    w.key("postalCode");
    w.str(&format!("{zip}{:02}", salt % 100));
    w.field_str("country", "US");
    w.end_obj();
}
