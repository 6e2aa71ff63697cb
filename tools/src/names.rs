//! Names moat gives things (nodes, VMs): DNS labels, so they fit in URLs,
//! certificates, resource ids and host names. One pattern, used by every
//! schema that takes a name and by the gateway's own checks.

/// 1-63 of a-z, 0-9 and '-', not starting or ending with '-' (the length is checked apart).
pub const DNS_LABEL: &str = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$";

/// Whether `name` is a DNS label as [`DNS_LABEL`] and the 63-byte limit say.
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A name as a schema item, for lists of names (`["web", "db"]`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct Label(#[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL))] pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        for ok in ["a", "n1", "web-2", &"a".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }
}
