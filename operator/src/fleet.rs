//! The gateway replicas as the operator knows them from their stats: which
//! are live, and the address each advertises for workload traffic (the
//! endpoints of public Services that point at the gateways).
//!
//! A gateway is live while its reports keep coming: one that missed
//! [`SILENT_AFTER`] worth of them, or said it is draining, leaves the set at
//! once. Every operator replica receives the stats, so any leader knows the
//! fleet within one report interval of taking over.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::protocol::{STATS_INTERVAL, Stats};

/// A gateway is gone once it has not reported for this long.
pub const SILENT_AFTER: Duration = Duration::from_secs(5 * STATS_INTERVAL.as_secs());

#[derive(Debug, Clone)]
struct Member {
    address: Option<IpAddr>,
    seen: Instant,
}

/// The live gateways; see the module docs.
#[derive(Debug)]
pub struct Fleet {
    members: Mutex<BTreeMap<String, Member>>,
    addresses: watch::Sender<Arc<Vec<IpAddr>>>,
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet {
            members: Mutex::default(),
            addresses: watch::Sender::new(Arc::default()),
        }
    }
}

impl Fleet {
    /// Takes a gateway's report.
    pub fn record(&self, stats: &Stats, now: Instant) {
        let mut members = self.members.lock().expect("fleet lock");
        if stats.draining {
            members.remove(&stats.gateway);
        } else {
            members.insert(
                stats.gateway.clone(),
                Member {
                    address: stats.address,
                    seen: now,
                },
            );
        }
        self.publish(&mut members, now);
    }

    /// Forgets the gateways that went silent.
    pub fn expire(&self, now: Instant) {
        let mut members = self.members.lock().expect("fleet lock");
        self.publish(&mut members, now);
    }

    /// The addresses of the live gateways, sorted, without duplicates.
    pub fn addresses(&self) -> Arc<Vec<IpAddr>> {
        self.addresses.borrow().clone()
    }

    /// Changes of [`Fleet::addresses`].
    pub fn subscribe(&self) -> watch::Receiver<Arc<Vec<IpAddr>>> {
        self.addresses.subscribe()
    }

    fn publish(&self, members: &mut BTreeMap<String, Member>, now: Instant) {
        members.retain(|_, m| now.saturating_duration_since(m.seen) < SILENT_AFTER);
        let mut live: Vec<IpAddr> = members.values().filter_map(|m| m.address).collect();
        live.sort();
        live.dedup();
        self.addresses.send_if_modified(|current| {
            if **current == live {
                return false;
            }
            *current = Arc::new(live);
            true
        });
    }
}

/// Forgets silent gateways every second, until the fleet is dropped.
pub async fn expire_silent(fleet: std::sync::Weak<Fleet>) {
    let mut every = tokio::time::interval(STATS_INTERVAL);
    loop {
        every.tick().await;
        let Some(fleet) = fleet.upgrade() else { return };
        fleet.expire(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(gateway: &str, address: Option<&str>, draining: bool) -> Stats {
        Stats {
            gateway: gateway.into(),
            interval_ms: 1000,
            workloads: vec![],
            routes: vec![],
            address: address.map(|a| a.parse().unwrap()),
            draining,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn gateways_join_by_reporting_and_leave_when_silent_or_draining() {
        let fleet = Fleet::default();
        let mut changes = fleet.subscribe();
        let t0 = Instant::now();
        fleet.record(&report("b", Some("10.0.0.2"), false), t0);
        fleet.record(&report("a", Some("10.0.0.1"), false), t0);
        fleet.record(&report("c", None, false), t0);
        let ips =
            |list: &[&str]| -> Vec<IpAddr> { list.iter().map(|a| a.parse().unwrap()).collect() };
        assert_eq!(*fleet.addresses(), ips(&["10.0.0.1", "10.0.0.2"]));
        assert!(changes.has_changed().unwrap());
        changes.borrow_and_update();

        // Reports that change nothing publish nothing.
        fleet.record(
            &report("a", Some("10.0.0.1"), false),
            t0 + Duration::from_secs(3),
        );
        assert!(!changes.has_changed().unwrap());

        // b goes silent; a keeps reporting.
        fleet.expire(t0 + SILENT_AFTER);
        assert_eq!(*fleet.addresses(), ips(&["10.0.0.1"]));
        assert!(changes.has_changed().unwrap());

        // a drains: gone at once.
        fleet.record(&report("a", Some("10.0.0.1"), true), t0 + SILENT_AFTER);
        assert!(fleet.addresses().is_empty());
    }
}
