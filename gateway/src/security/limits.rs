//! Rate limits and quotas per role, from `policies/limits.toml`: a keyed
//! token bucket per (role, tool class) keyed by principal, plus a cap on each
//! principal's calls in flight. Buckets live in memory (per replica) by
//! design; quotas are checked in the database by the tools that consume them.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use moat_tools::ToolClass;
use serde::Deserialize;

use super::authz::ROLES;
use crate::principal::{Principal, Role};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    pub read: Rate,
    pub write: Rate,
    pub exec: Rate,
    pub max_concurrent: u32,
}

pub use crate::config::Quotas;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    tiers: BTreeMap<String, Tier>,
    quotas: BTreeMap<String, Quotas>,
}

impl LimitsConfig {
    pub fn parse(text: &str) -> Result<LimitsConfig, String> {
        let config: LimitsConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        for role in ROLES {
            let tier = config.tiers.get(role.as_str()).ok_or_else(|| format!("no [tiers.{}]", role.as_str()))?;
            for (class, rate) in [("read", &tier.read), ("write", &tier.write), ("exec", &tier.exec)] {
                if rate.per_second == 0 || rate.burst == 0 {
                    return Err(format!("tiers.{}.{class}: per_second and burst must be at least 1", role.as_str()));
                }
            }
            if tier.max_concurrent == 0 {
                return Err(format!("tiers.{}.max_concurrent must be at least 1", role.as_str()));
            }
            if !config.quotas.contains_key(role.as_str()) {
                return Err(format!("no [quotas.{}]", role.as_str()));
            }
        }
        for key in config.tiers.keys().chain(config.quotas.keys()) {
            key.parse::<Role>().map_err(|e| format!("[{key}]: {e}"))?;
        }
        Ok(config)
    }

    pub fn tier(&self, role: Role) -> &Tier {
        self.tiers.get(role.as_str()).expect("parse checked every role has a tier")
    }

    pub fn quotas(&self, role: Role) -> &Quotas {
        self.quotas.get(role.as_str()).expect("parse checked every role has quotas")
    }
}

/// Why a call was not let through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Limited {
    #[error("rate limited: {principal} may make {per_second} {class} calls per second (burst {burst}); retry in {} ms", retry_after.as_millis().max(1))]
    Rate { principal: String, class: &'static str, per_second: u32, burst: u32, retry_after: Duration },
    #[error("too many calls in flight: {principal} may have {max} at once; retry when one finishes")]
    Concurrency { principal: String, max: u32 },
}

impl Limited {
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Limited::Rate { retry_after, .. } => Some(*retry_after),
            Limited::Concurrency { .. } => None,
        }
    }
}

/// The live limiters for one limits config.
pub struct Limiter {
    config: LimitsConfig,
    buckets: HashMap<(Role, ToolClassKey), DefaultKeyedRateLimiter<String>>,
    in_flight: Arc<Mutex<HashMap<String, u32>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ToolClassKey(u8);

fn class_key(class: ToolClass) -> (ToolClassKey, &'static str) {
    match class {
        ToolClass::Read => (ToolClassKey(0), "read"),
        ToolClass::Write => (ToolClassKey(1), "write"),
        ToolClass::Exec => (ToolClassKey(2), "exec"),
    }
}

/// Held while a call runs; frees the principal's concurrency slot on drop.
pub struct Permit {
    principal: String,
    in_flight: Arc<Mutex<HashMap<String, u32>>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut map = self.in_flight.lock().expect("the in-flight lock is never poisoned");
        if let Some(n) = map.get_mut(&self.principal) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.principal);
            }
        }
    }
}

impl Limiter {
    pub fn new(config: &LimitsConfig) -> Limiter {
        let mut buckets = HashMap::new();
        for role in ROLES {
            let tier = config.tier(role);
            for (class, rate) in
                [(ToolClass::Read, &tier.read), (ToolClass::Write, &tier.write), (ToolClass::Exec, &tier.exec)]
            {
                let per_second = NonZeroU32::new(rate.per_second).expect("parse checked per_second >= 1");
                let burst = NonZeroU32::new(rate.burst).expect("parse checked burst >= 1");
                buckets.insert(
                    (role, class_key(class).0),
                    RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
                );
            }
        }
        Limiter { config: config.clone(), buckets, in_flight: Arc::default() }
    }

    pub fn config(&self) -> &LimitsConfig {
        &self.config
    }

    /// Takes a token and a concurrency slot, or says when to retry.
    pub fn admit(&self, principal: &Principal, class: ToolClass) -> Result<Permit, Limited> {
        let tier = self.config.tier(principal.role);
        let (key, class_name) = class_key(class);
        let bucket = self.buckets.get(&(principal.role, key)).expect("a bucket exists for every role and class");
        if let Err(not_until) = bucket.check_key(&principal.name) {
            let rate = match class {
                ToolClass::Read => &tier.read,
                ToolClass::Write => &tier.write,
                ToolClass::Exec => &tier.exec,
            };
            return Err(Limited::Rate {
                principal: principal.name.clone(),
                class: class_name,
                per_second: rate.per_second,
                burst: rate.burst,
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            });
        }
        let mut map = self.in_flight.lock().expect("the in-flight lock is never poisoned");
        let n = map.entry(principal.name.clone()).or_insert(0);
        if *n >= tier.max_concurrent {
            return Err(Limited::Concurrency { principal: principal.name.clone(), max: tier.max_concurrent });
        }
        *n += 1;
        Ok(Permit { principal: principal.name.clone(), in_flight: self.in_flight.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULTS: &str = include_str!("../../../policies/limits.toml");

    #[test]
    fn defaults_parse_and_bad_files_are_explained() {
        let c = LimitsConfig::parse(DEFAULTS).unwrap();
        assert_eq!(c.quotas(Role::Agent).running_vms, 4);
        let cases = [
            ("[tiers]\n[quotas]\n", "no [tiers.reader]"),
            ("", "missing field `tiers`"),
            (&DEFAULTS.replace("[tiers.agent]", "[tiers.agentt]"), "no [tiers.agent]"),
            (&DEFAULTS.replace("max_concurrent = 8", "max_concurrent = 0"), "max_concurrent must be at least 1"),
            (
                &DEFAULTS.replace("read = { per_second = 20, burst = 40 }", "read = { per_second = 0, burst = 40 }"),
                "at least 1",
            ),
            (
                &format!("{DEFAULTS}\n[quotas.root]\nrunning_vms = 1\nvcpus = 1\nmemory_mib = 1\nworkspaces = 1\n"),
                "unknown role",
            ),
        ];
        for (text, want) in cases {
            let err = LimitsConfig::parse(text).unwrap_err();
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn bursts_then_limits_with_a_retry_time() {
        let text = DEFAULTS.replace("read = { per_second = 20, burst = 40 }", "read = { per_second = 1, burst = 3 }");
        let limiter = Limiter::new(&LimitsConfig::parse(&text).unwrap());
        let p = Principal::new("r", Role::Reader);
        for _ in 0..3 {
            drop(limiter.admit(&p, ToolClass::Read).unwrap());
        }
        let err = limiter.admit(&p, ToolClass::Read).err().expect("the fourth call is limited");
        assert!(err.retry_after().unwrap() > Duration::ZERO);
        assert!(err.to_string().contains("retry in"), "{err}");
        // Another principal has its own bucket.
        let q = Principal::new("q", Role::Reader);
        assert!(limiter.admit(&q, ToolClass::Read).is_ok());
    }

    #[test]
    fn caps_calls_in_flight() {
        let text = DEFAULTS.replace("max_concurrent = 8", "max_concurrent = 2");
        let limiter = Limiter::new(&LimitsConfig::parse(&text).unwrap());
        let p = Principal::new("r", Role::Reader);
        let a = limiter.admit(&p, ToolClass::Read).unwrap();
        let _b = limiter.admit(&p, ToolClass::Read).unwrap();
        assert!(matches!(limiter.admit(&p, ToolClass::Read), Err(Limited::Concurrency { max: 2, .. })));
        drop(a);
        assert!(limiter.admit(&p, ToolClass::Read).is_ok());
    }
}
