//! Short, stable interface and chain names: Linux allows 15 bytes for an interface name, and
//! network and VM names are up to 63. Derived from ids by hash, so they never change and never
//! carry anything a caller typed.

use sha2::Digest;

/// 8 hex digits of the id's SHA-256.
pub fn short(id: &str) -> String {
    sha2::Sha256::digest(id.as_bytes()).iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// The bridge of network `id`: `mb` and 8 hex digits.
pub fn bridge(id: &str) -> String {
    format!("mb{}", short(id))
}

/// The tap of VM `id`: `mt` and 8 hex digits.
pub fn tap(id: &str) -> String {
    format!("mt{}", short(id))
}

/// Whether `name` is one of moat's bridges (`mb` and 8 hex digits): only those are ever removed.
pub fn is_bridge(name: &str) -> bool {
    name.len() == 10 && name.starts_with("mb") && name[2..].bytes().all(|b| b.is_ascii_hexdigit())
}
