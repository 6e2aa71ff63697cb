//! Disk layouts on this host. Pure planners ([`plan`]: checks and places partitions;
//! [`classify`]: the safety classifier; [`disko`]: the disko renderer) that the gateway also
//! runs for its pre-flight, beside the code that touches the host: [`probe`] takes the
//! snapshot they judge, [`apply`] is the authoritative gate and the two appliers.

pub mod apply;
pub mod classify;
pub mod disko;
pub mod plan;
pub mod probe;

pub use apply::{ApplyReport, DiskSettings, Disks};
