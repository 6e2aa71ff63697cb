//! Where a new VM goes: which nodes can take it (reachable, with a runtime and
//! the image, room left after what the gateway placed there), and the pure
//! choice among them (most free memory, then vCPUs, then name).

use moat_tools::NodeDetail;

use crate::store::vms::VCPU_OVERCOMMIT;
use crate::store::{State, StateError};

/// A reachable node able to run VMs, with what it has left.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub free_memory_mib: u64,
    pub free_vcpus: u64,
}

/// Most free memory first, then most free vCPUs, then name; only nodes the VM fits on.
pub fn choose(candidates: &[Candidate], vcpus: u32, memory_mib: u64) -> Option<&Candidate> {
    candidates.iter().filter(|c| c.free_memory_mib >= memory_mib && c.free_vcpus >= u64::from(vcpus)).max_by(|a, b| {
        (a.free_memory_mib, a.free_vcpus).cmp(&(b.free_memory_mib, b.free_vcpus)).then(b.name.cmp(&a.name))
    })
}

/// Why a node cannot take VMs, or its capacity left after what the gateway has placed there.
pub async fn candidate(
    state: &State,
    detail: &NodeDetail,
    image: &str,
) -> Result<Result<Candidate, String>, StateError> {
    if !detail.reachable {
        return Ok(Err(format!(
            "node {} is unreachable: {}",
            detail.name,
            detail.error.as_deref().unwrap_or("no answer")
        )));
    }
    if detail.runtime.is_none() {
        let why = detail.runtime_detail.as_deref().unwrap_or("no VMM installed");
        return Ok(Err(format!("no VM runtime on node {}: {why}", detail.name)));
    }
    if !detail.images.iter().any(|i| i == image) {
        return Ok(Err(format!(
            "node {} does not have image `{image}` (it has: {}); build it there with `moat image build`",
            detail.name,
            if detail.images.is_empty() { "none".to_string() } else { detail.images.join(", ") }
        )));
    }
    let placed = state.vms_on(&detail.name).await?;
    let cpus = detail.cpus.unwrap_or(0);
    let memory_mib = detail.memory_total_mib.unwrap_or(0);
    let used_memory: u64 = placed.iter().map(|v| v.memory_mib as u64).sum();
    let used_vcpus: u64 = placed.iter().map(|v| v.vcpus as u64).sum();
    Ok(Ok(Candidate {
        name: detail.name.clone(),
        cpus,
        memory_mib,
        free_memory_mib: memory_mib.saturating_sub(used_memory),
        free_vcpus: (u64::from(cpus) * VCPU_OVERCOMMIT).saturating_sub(used_vcpus),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, free_memory_mib: u64, free_vcpus: u64) -> Candidate {
        Candidate { name: name.into(), cpus: 4, memory_mib: 8192, free_memory_mib, free_vcpus }
    }

    #[test]
    fn placement_is_most_free_memory_then_vcpus_among_fitting_nodes() {
        let nodes = [c("a", 4096, 8), c("b", 8192, 2), c("c", 8192, 6), c("d", 100, 64)];
        assert_eq!(choose(&nodes, 1, 512).unwrap().name, "c", "b and c tie on memory; c has more vCPUs");
        assert_eq!(choose(&nodes, 7, 512).unwrap().name, "a", "only a has 7 vCPUs free and room");
        assert!(choose(&nodes, 1, 16384).is_none());
        assert!(choose(&[], 1, 64).is_none());
        let tied = [c("x", 1024, 4), c("w", 1024, 4)];
        assert_eq!(choose(&tied, 1, 64).unwrap().name, "w", "a full tie goes to the first name");
    }
}
