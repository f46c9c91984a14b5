//! SMART scopes for system-level access (Backend Services): v1 (`system/Observation.read`,
//! `.write`, `.*`) and v2 (`system/*.rs`, any in-order subset of `cruds`), what a grant permits,
//! and how a request is narrowed to a client's registration.

use std::fmt;

use bulkhead_fhir::is_resource_type;

/// One kind of interaction with a resource type, as SMART v2 names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Create,
    Read,
    Update,
    Delete,
    Search,
}

impl Access {
    fn bit(self) -> u8 {
        match self {
            Access::Create => CREATE,
            Access::Read => READ,
            Access::Update => UPDATE,
            Access::Delete => DELETE,
            Access::Search => SEARCH,
        }
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Create => "create",
            Access::Read => "read",
            Access::Update => "update",
            Access::Delete => "delete",
            Access::Search => "search",
        })
    }
}

const CREATE: u8 = 1;
const READ: u8 = 2;
const UPDATE: u8 = 4;
const DELETE: u8 = 8;
const SEARCH: u8 = 16;
const ALL: u8 = CREATE | READ | UPDATE | DELETE | SEARCH;
/// The v2 letters in their required order, with their bits.
const LETTERS: [(char, u8); 5] = [('c', CREATE), ('r', READ), ('u', UPDATE), ('d', DELETE), ('s', SEARCH)];

/// One parsed scope: a resource type (`None`: `*`) and the interactions it allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    resource_type: Option<String>,
    permissions: u8,
    /// The scope as written (echoed in the token response when granted unchanged: SMART asks
    /// servers to answer v1 requests in v1 terms).
    text: String,
}

impl Scope {
    /// Parses one `system/` scope; anything else (user or patient scopes, granular `?param=`
    /// scopes, unknown types or suffixes) is an error naming the scope.
    pub fn parse(text: &str) -> Result<Scope, String> {
        let refuse = |why: &str| Err(format!("unsupported scope '{text}': {why}"));
        let Some(body) = text.strip_prefix("system/") else {
            return refuse("only system/ scopes are granted to backend services");
        };
        if body.contains('?') {
            return refuse("granular scopes with search parameters are not supported");
        }
        let Some((resource_type, suffix)) = body.rsplit_once('.') else { return refuse("expected Type.permissions") };
        let resource_type = match resource_type {
            "*" => None,
            name if is_resource_type(name) => Some(name.to_owned()),
            _ => return refuse("unknown resource type"),
        };
        let permissions = match suffix {
            "read" => READ | SEARCH,
            "write" => CREATE | UPDATE | DELETE,
            "*" => ALL,
            letters => v2_permissions(letters).ok_or_else(|| format!("unsupported scope '{text}': bad permissions"))?,
        };
        Ok(Scope { resource_type, permissions, text: text.to_owned() })
    }

    /// Whether everything `other` allows, `self` allows too.
    fn subsumes(&self, other: &Scope) -> bool {
        let types = match (&self.resource_type, &other.resource_type) {
            (None, _) => true,
            (Some(own), Some(theirs)) => own == theirs,
            (Some(_), None) => false,
        };
        types && self.permissions & other.permissions == other.permissions
    }

    fn covers_type(&self, resource_type: &str) -> bool {
        self.resource_type.as_deref().is_none_or(|own| own == resource_type)
    }

    /// The v2 spelling of a type and permission set.
    fn v2(resource_type: Option<&str>, permissions: u8) -> Scope {
        let letters: String = LETTERS.iter().filter(|(_, bit)| permissions & bit != 0).map(|(c, _)| *c).collect();
        let text = format!("system/{}.{letters}", resource_type.unwrap_or("*"));
        Scope { resource_type: resource_type.map(str::to_owned), permissions, text }
    }

    /// What `self` and `other` both allow, if anything.
    fn intersect(&self, other: &Scope) -> Option<Scope> {
        let resource_type = match (&self.resource_type, &other.resource_type) {
            (None, other_type) => other_type.clone(),
            (own, None) => own.clone(),
            (Some(a), Some(b)) if a == b => Some(a.clone()),
            _ => return None,
        };
        let permissions = self.permissions & other.permissions;
        if permissions == 0 {
            return None;
        }
        if resource_type == self.resource_type && permissions == self.permissions {
            return Some(self.clone());
        }
        Some(Scope::v2(resource_type.as_deref(), permissions))
    }
}

/// `cruds` letters: each at most once, in that order, at least one.
fn v2_permissions(letters: &str) -> Option<u8> {
    let mut permissions = 0;
    let mut next = 0;
    for letter in letters.chars() {
        let position = LETTERS[next..].iter().position(|(c, _)| *c == letter)? + next;
        permissions |= LETTERS[position].1;
        next = position + 1;
    }
    (permissions != 0).then_some(permissions)
}

/// Parses a space-separated scope list (at least one scope).
pub fn parse_scopes(text: &str) -> Result<Vec<Scope>, String> {
    let scopes: Vec<Scope> = text.split_ascii_whitespace().map(Scope::parse).collect::<Result<_, _>>()?;
    if scopes.is_empty() {
        return Err("no scope requested".into());
    }
    Ok(scopes)
}

/// What a caller may do in its tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Everything (client headers or Basic of a client registered without scopes).
    Full,
    /// What these scopes allow.
    Scopes(Vec<Scope>),
}

impl Grant {
    /// Whether the grant allows `access` on `resource_type`.
    pub fn permits(&self, resource_type: &str, access: Access) -> bool {
        match self {
            Grant::Full => true,
            Grant::Scopes(scopes) => {
                scopes.iter().any(|scope| scope.covers_type(resource_type) && scope.permissions & access.bit() != 0)
            }
        }
    }

    /// Whether the grant allows `access` on every type (a `*` scope).
    pub fn permits_every_type(&self, access: Access) -> bool {
        match self {
            Grant::Full => true,
            Grant::Scopes(scopes) => {
                scopes.iter().any(|scope| scope.resource_type.is_none() && scope.permissions & access.bit() != 0)
            }
        }
    }

    /// The grant for `requested` scopes under a registration that allows `registered`
    /// (`None`: anything): each requested scope narrowed to what the registration covers, the
    /// ones it does not cover at all dropped. Empty when nothing requested is allowed.
    pub fn narrow(requested: &[Scope], registered: Option<&[Scope]>) -> Vec<Scope> {
        let Some(registered) = registered else { return requested.to_vec() };
        let mut granted: Vec<Scope> = Vec::new();
        for wanted in requested {
            for allowed in registered {
                if let Some(scope) = wanted.intersect(allowed) {
                    if !granted.iter().any(|known| known.text == scope.text) {
                        granted.push(scope);
                    }
                }
            }
        }
        // Drop what another granted scope already allows (the first of two equal ones stays).
        let kept: Vec<bool> = (0..granted.len())
            .map(|i| {
                !granted
                    .iter()
                    .enumerate()
                    .any(|(j, other)| j != i && other.subsumes(&granted[i]) && (!granted[i].subsumes(other) || j < i))
            })
            .collect();
        granted.into_iter().zip(kept).filter_map(|(scope, keep)| keep.then_some(scope)).collect()
    }

    /// Adds read on Group to a grant that reads something and lacks it, when the registration
    /// allows it: a Group export needs read on Group, and clients such as smart-fetch ask only
    /// for the types they export. The grant stays within the pre-authorisation (RFC 6749 §3.3
    /// lets the server grant other scopes than requested; the answer's `scope` says which).
    pub fn with_group_read(mut granted: Vec<Scope>, registered: Option<&[Scope]>) -> Vec<Scope> {
        let reads = |scopes: &[Scope], resource_type: Option<&str>| {
            scopes.iter().any(|scope| {
                scope.permissions & READ != 0 && resource_type.is_none_or(|wanted| scope.covers_type(wanted))
            })
        };
        let allowed = registered.is_none_or(|registered| reads(registered, Some("Group")));
        if allowed && reads(&granted, None) && !reads(&granted, Some("Group")) {
            granted.push(Scope::v2(Some("Group"), READ | SEARCH));
        }
        granted
    }

    /// The space-separated scope text of a list.
    pub fn text(scopes: &[Scope]) -> String {
        scopes.iter().map(|scope| scope.text.as_str()).collect::<Vec<_>>().join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(text: &str) -> Grant {
        Grant::Scopes(parse_scopes(text).unwrap())
    }

    #[test]
    fn v1_and_v2_scopes_mean_the_same_permissions() {
        for (v1, v2) in [("system/*.read", "system/*.rs"), ("system/Observation.write", "system/Observation.cud")] {
            for access in [Access::Create, Access::Read, Access::Update, Access::Delete, Access::Search] {
                for resource_type in ["Observation", "Patient"] {
                    assert_eq!(
                        grant(v1).permits(resource_type, access),
                        grant(v2).permits(resource_type, access),
                        "{v1} vs {v2}: {access} {resource_type}"
                    );
                }
            }
        }
        let all = grant("system/Patient.*");
        assert!(all.permits("Patient", Access::Delete) && !all.permits("Observation", Access::Read));
    }

    #[test]
    fn scopes_limit_types_and_interactions() {
        let scopes = grant("system/Patient.rs system/Observation.r");
        assert!(scopes.permits("Patient", Access::Search));
        assert!(scopes.permits("Observation", Access::Read));
        assert!(!scopes.permits("Observation", Access::Search));
        assert!(!scopes.permits("Patient", Access::Create));
        assert!(!scopes.permits("Group", Access::Read));
        assert!(!scopes.permits_every_type(Access::Read));
        assert!(grant("system/*.cu").permits_every_type(Access::Create));
        assert!(Grant::Full.permits("Group", Access::Delete));
    }

    #[test]
    fn bad_scopes_are_refused() {
        for bad in [
            "patient/*.read",
            "user/Observation.rs",
            "system/Observation.rs?category=laboratory",
            "system/Nope.rs",
            "system/*.dus",
            "system/*.rr",
            "system/*.",
            "system/*",
            "openid",
            "launch",
        ] {
            assert!(Scope::parse(bad).is_err(), "{bad}");
        }
        assert!(parse_scopes("  ").is_err());
        assert!(parse_scopes("system/*.rs openid").is_err());
    }

    #[test]
    fn requests_are_narrowed_to_the_registration() {
        let registered = parse_scopes("system/*.rs system/Observation.cruds").unwrap();
        let narrow =
            |requested: &str| Grant::text(&Grant::narrow(&parse_scopes(requested).unwrap(), Some(&registered)));
        // Covered as asked: echoed as written, v1 included.
        assert_eq!(narrow("system/*.read"), "system/*.read");
        assert_eq!(narrow("system/Patient.rs"), "system/Patient.rs");
        // Wider than registered: narrowed to what is covered.
        assert_eq!(narrow("system/*.cruds"), "system/*.rs system/Observation.cruds");
        assert_eq!(narrow("system/Patient.*"), "system/Patient.rs");
        // Nothing covered: nothing granted.
        let only_patients = parse_scopes("system/Patient.rs").unwrap();
        assert!(Grant::narrow(&parse_scopes("system/Observation.rs").unwrap(), Some(&only_patients)).is_empty());
        // Readers of some types also read the Group they export, when registered for it.
        let with_group = |requested: &str, registered: &[Scope]| {
            let granted = Grant::narrow(&parse_scopes(requested).unwrap(), Some(registered));
            Grant::text(&Grant::with_group_read(granted, Some(registered)))
        };
        assert_eq!(with_group("system/Patient.read", &registered), "system/Patient.read system/Group.rs");
        assert_eq!(with_group("system/*.read", &registered), "system/*.read");
        assert_eq!(with_group("system/Observation.c", &registered), "system/Observation.c");
        assert_eq!(with_group("system/Patient.read", &only_patients), "system/Patient.read");
        // No registered scopes: anything asked is granted.
        assert_eq!(Grant::text(&Grant::narrow(&parse_scopes("system/*.cruds").unwrap(), None)), "system/*.cruds");
    }
}
