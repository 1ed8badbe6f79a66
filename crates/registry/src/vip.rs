//! Virtual IPs for services that have none written: Services without a
//! `clusterIP` (from the service range) and ServiceEntries without addresses
//! (from Istio's `240.240.0.0/16`, so DNS can answer for them).
//!
//! An allocation never moves while its host exists: new hosts take a free
//! address found from a hash of the hostname, so the result does not depend on
//! which other services come and go, and the caller persists
//! [`VipAllocator::allocations`] so VIPs survive restarts.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use crate::build::Draft;
use ipnet::Ipv4Net;

/// Default range for Services' VIPs (Kubernetes' usual service CIDR).
pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/16";
/// Default range for ServiceEntries' VIPs (Istio's auto-allocation range).
pub const DEFAULT_SERVICE_ENTRY_CIDR: &str = "240.240.0.0/16";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "invalid {what} {value:?}: expected an IPv4 CIDR with room for at least two addresses, such as {example}"
    )]
    Cidr {
        what: &'static str,
        value: String,
        example: &'static str,
    },
}

/// Which range a service's VIP comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pool {
    Service,
    ServiceEntry,
}

/// The VIPs allocated so far, by hostname, and the ranges new ones come from.
#[derive(Debug, Clone, PartialEq)]
pub struct VipAllocator {
    service_cidr: Ipv4Net,
    service_entry_cidr: Ipv4Net,
    allocations: BTreeMap<String, IpAddr>,
}

impl Default for VipAllocator {
    fn default() -> Self {
        VipAllocator {
            service_cidr: Ipv4Net::new_assert(Ipv4Addr::new(10, 96, 0, 0), 16),
            service_entry_cidr: Ipv4Net::new_assert(Ipv4Addr::new(240, 240, 0, 0), 16),
            allocations: BTreeMap::new(),
        }
    }
}

impl VipAllocator {
    /// An allocator over the two ranges that starts from `existing`
    /// allocations (as [`allocations`](Self::allocations) returned them).
    pub fn new(
        service_cidr: &str,
        service_entry_cidr: &str,
        existing: BTreeMap<String, IpAddr>,
    ) -> Result<VipAllocator, Error> {
        Ok(VipAllocator {
            service_cidr: range("service CIDR", service_cidr, DEFAULT_SERVICE_CIDR)?,
            service_entry_cidr: range(
                "ServiceEntry CIDR",
                service_entry_cidr,
                DEFAULT_SERVICE_ENTRY_CIDR,
            )?,
            allocations: existing,
        })
    }

    /// Every allocation, by hostname: what the caller persists.
    pub fn allocations(&self) -> &BTreeMap<String, IpAddr> {
        &self.allocations
    }

    /// The VIP allocated to a hostname.
    pub fn get(&self, hostname: &str) -> Option<IpAddr> {
        self.allocations.get(hostname).copied()
    }

    /// Brings the allocations in line with the services: hosts that need a
    /// VIP and have none get one, hosts that no longer need one release
    /// theirs, and every other allocation stays. Returns whether anything changed.
    pub(crate) fn assign(&mut self, drafts: &[Draft]) -> bool {
        let wanted: BTreeMap<&str, Pool> = drafts
            .iter()
            .filter_map(|d| Some((d.service.hostname.as_str(), d.auto_vip?)))
            .collect();
        let before = self.allocations.len();
        self.allocations
            .retain(|host, _| wanted.contains_key(host.as_str()));
        let mut changed = self.allocations.len() != before;

        let mut in_use: BTreeSet<IpAddr> = drafts
            .iter()
            .flat_map(|d| d.service.addresses.iter().copied())
            .chain(self.allocations.values().copied())
            .collect();
        for (host, pool) in wanted {
            if self.allocations.contains_key(host) {
                continue;
            }
            let range = match pool {
                Pool::Service => self.service_cidr,
                Pool::ServiceEntry => self.service_entry_cidr,
            };
            match free_address(range, host, &in_use) {
                Some(ip) => {
                    in_use.insert(ip);
                    self.allocations.insert(host.to_string(), ip);
                    changed = true;
                }
                None => tracing::warn!(host, %range, "no free virtual IP left in range"),
            }
        }
        changed
    }
}

fn range(what: &'static str, value: &str, example: &'static str) -> Result<Ipv4Net, Error> {
    let error = || Error::Cidr {
        what,
        value: value.to_string(),
        example,
    };
    let net: Ipv4Net = value.trim().parse().map_err(|_| error())?;
    if net.prefix_len() > 30 {
        return Err(error());
    }
    Ok(net.trunc())
}

/// The first address not in use, going up (and round) from the hostname's
/// hash within the range, never the range's network or broadcast address.
fn free_address(range: Ipv4Net, host: &str, in_use: &BTreeSet<IpAddr>) -> Option<IpAddr> {
    let first = u64::from(u32::from(range.network())) + 1;
    let count = u64::from(u32::from(range.broadcast())) - first;
    let start = fnv1a(host.as_bytes()) % count;
    (0..count)
        .map(|i| IpAddr::V4(Ipv4Addr::from((first + (start + i) % count) as u32)))
        .find(|ip| !in_use.contains(ip))
}

/// FNV-1a: a hash that stays the same across Rust versions and platforms.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use vmesh_api::Object;

    use super::*;
    use crate::build::drafts;
    use crate::fixtures::decode;
    use crate::inputs::Inputs;
    use crate::{DecodeCache, Snapshot};

    fn service(name: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n---\n"
        )
    }

    fn entry(host: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {host}, namespace: shop}}\nspec: {{hosts: [{host}], ports: [{{name: tcp, number: 9000}}], resolution: DNS}}\n---\n"
        )
    }

    fn objects(parts: &[String]) -> Vec<Object> {
        decode("t.yaml", &parts.concat())
    }

    fn assign(vips: &mut VipAllocator, objects: &[Object]) -> bool {
        vips.assign(&drafts(&Inputs::decode(
            objects,
            &mut DecodeCache::default(),
        )))
    }

    #[test]
    fn vips_stay_put_as_services_come_and_go() {
        let mut vips = VipAllocator::default();
        assert!(assign(
            &mut vips,
            &objects(&[service("a"), service("b"), entry("db.internal")])
        ));
        let b = vips.get("b.shop.svc.cluster.local").unwrap();
        let db = vips.get("db.internal").unwrap();
        assert!(
            DEFAULT_SERVICE_CIDR
                .parse::<ipnet::IpNet>()
                .unwrap()
                .contains(&b)
        );
        assert!(
            DEFAULT_SERVICE_ENTRY_CIDR
                .parse::<ipnet::IpNet>()
                .unwrap()
                .contains(&db)
        );
        assert!(!assign(
            &mut vips,
            &objects(&[service("a"), service("b"), entry("db.internal")])
        ));

        let later = objects(&[service("b"), service("c"), entry("db.internal")]);
        assert!(assign(&mut vips, &later));
        assert_eq!(vips.get("a.shop.svc.cluster.local"), None, "released");
        assert_eq!(vips.get("b.shop.svc.cluster.local"), Some(b));
        assert_eq!(vips.get("db.internal"), Some(db));
        let c = vips.get("c.shop.svc.cluster.local").unwrap();
        assert_ne!(c, b);

        // After a restart, the persisted allocations give the same VIPs.
        let mut restarted = VipAllocator::new(
            DEFAULT_SERVICE_CIDR,
            DEFAULT_SERVICE_ENTRY_CIDR,
            vips.allocations().clone(),
        )
        .unwrap();
        assert!(!assign(&mut restarted, &later));
        assert_eq!(restarted, vips);
        assert_eq!(
            Snapshot::build(&later, &mut DecodeCache::default(), &mut restarted),
            Snapshot::build(&later, &mut DecodeCache::default(), &mut vips)
        );
        let snapshot = Snapshot::build(&later, &mut DecodeCache::default(), &mut restarted);
        assert_eq!(
            snapshot
                .service("c.shop.svc.cluster.local")
                .unwrap()
                .addresses,
            [c]
        );
    }

    #[test]
    fn allocation_depends_only_on_the_hostname_when_free() {
        let mut alone = VipAllocator::default();
        assign(&mut alone, &objects(&[service("c")]));
        let mut crowded = VipAllocator::default();
        assign(
            &mut crowded,
            &objects(&[service("a"), service("b"), service("c")]),
        );
        assert_eq!(
            alone.get("c.shop.svc.cluster.local"),
            crowded.get("c.shop.svc.cluster.local")
        );
    }

    #[test]
    fn written_addresses_are_not_allocated_and_not_reused() {
        let fixed = "apiVersion: v1\nkind: Service\nmetadata: {name: fixed, namespace: shop}\nspec: {clusterIP: 10.0.0.1, ports: [{name: http, port: 80}]}\n---\n";
        let mut vips = VipAllocator::new("10.0.0.0/30", "10.0.1.0/30", BTreeMap::new()).unwrap();
        let objects = objects(&[fixed.to_string(), service("a"), service("b")]);
        assign(&mut vips, &objects);
        // 10.0.0.1 and .2 are the only usable addresses; .1 is taken by the clusterIP.
        assert_eq!(vips.allocations().len(), 1, "{:?}", vips.allocations());
        assert_eq!(
            vips.allocations().values().next(),
            Some(&"10.0.0.2".parse().unwrap())
        );
        assert_eq!(vips.get("fixed.shop.svc.cluster.local"), None);
        let snapshot = Snapshot::build(&objects, &mut DecodeCache::default(), &mut vips);
        let unallocated = snapshot
            .services
            .iter()
            .filter(|s| s.addresses.is_empty())
            .count();
        assert_eq!(
            unallocated, 1,
            "the range is full: one service goes without"
        );
    }

    #[test]
    fn bad_ranges_are_refused() {
        for bad in ["10.96.0.0", "10.96.0.0/31", "fd00::/64", "ten/8"] {
            let error = VipAllocator::new(bad, DEFAULT_SERVICE_ENTRY_CIDR, BTreeMap::new())
                .unwrap_err()
                .to_string();
            assert!(error.starts_with("invalid service CIDR"), "{error}");
        }
        let trimmed = VipAllocator::new("10.96.3.4/16", "240.240.0.0/16", BTreeMap::new()).unwrap();
        assert_eq!(trimmed, VipAllocator::default());
    }
}
