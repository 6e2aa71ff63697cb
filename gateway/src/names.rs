//! Names moat accepts for the things it names (nodes, VMs): DNS labels, so
//! they fit in URLs, certificates, resource ids and host names.

pub use moat_tools::names::is_dns_label;
