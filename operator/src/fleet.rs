//! The gateway replicas as the operator knows them from their stats: which
//! are live, the address each advertises for workload traffic (the
//! endpoints of public Services that point at the gateways), and which
//! HybridApp generations each serves (whether an app is routable).
//!
//! A gateway is live while its reports keep coming: one that missed
//! [`SILENT_AFTER`] worth of them, or said it is draining, leaves the set at
//! once. A new leader knows the fleet one report interval after taking over;
//! until [`WARM_UP`] has passed the fleet is not [`Fleet::is_warm`], and the
//! reconciler leaves the public Services' endpoints as they are rather than
//! empty them (its subscribers are told when the warm-up ends).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::protocol::{STATS_INTERVAL, Stats};

/// A gateway is gone once it has not reported for this long.
pub const SILENT_AFTER: Duration = Duration::from_secs(5 * STATS_INTERVAL.as_secs());
/// How long after it starts the fleet has heard from every live gateway.
pub const WARM_UP: Duration = Duration::from_secs(3 * STATS_INTERVAL.as_secs());

/// Names one HybridApp: namespace and name.
pub type AppKey = (String, String);

#[derive(Debug, Clone)]
struct Member {
    address: Option<IpAddr>,
    seen: Instant,
    programmed: BTreeMap<AppKey, i64>,
}

/// How many live gateways serve an app's generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Serving {
    /// Live gateways.
    pub gateways: usize,
    /// Of which serve the generation asked about (or a newer one).
    pub current: usize,
}

/// The live gateways; see the module docs.
#[derive(Debug)]
pub struct Fleet {
    members: Mutex<BTreeMap<String, Member>>,
    addresses: watch::Sender<Arc<Vec<IpAddr>>>,
    /// Apps whose programmed state changed since the reconciler last took
    /// them (a set: bounded by the number of apps).
    changed: Mutex<BTreeSet<AppKey>>,
    wake: tokio::sync::Notify,
    /// When the warm-up ends, and whether subscribers were told.
    warm_at: Instant,
    told_warm: std::sync::atomic::AtomicBool,
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet {
            members: Mutex::default(),
            addresses: watch::Sender::new(Arc::default()),
            changed: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            warm_at: Instant::now() + WARM_UP,
            told_warm: Default::default(),
        }
    }
}

impl Fleet {
    /// Takes a gateway's report.
    pub fn record(&self, stats: &Stats, now: Instant) {
        let mut members = self.members.lock().expect("fleet lock");
        let before = members.get(&stats.gateway).map(|m| m.programmed.clone());
        let after = if stats.draining {
            members.remove(&stats.gateway);
            None
        } else {
            let programmed: BTreeMap<AppKey, i64> = stats
                .programmed
                .iter()
                .map(|p| ((p.namespace.clone(), p.app.clone()), p.generation))
                .collect();
            members.insert(
                stats.gateway.clone(),
                Member {
                    address: stats.address,
                    seen: now,
                    programmed: programmed.clone(),
                },
            );
            Some(programmed)
        };
        if before != after {
            let (before, after) = (before.unwrap_or_default(), after.unwrap_or_default());
            // A gateway that joins or leaves changes every app's count.
            let joined_or_left = before.is_empty() || after.is_empty();
            let changed = before
                .iter()
                .chain(after.iter())
                .filter(|(app, _)| joined_or_left || before.get(*app) != after.get(*app))
                .map(|(app, _)| app.clone());
            self.mark(changed);
        }
        self.publish(&mut members, now);
    }

    /// How many live gateways serve generation `generation` of `app`.
    pub fn serving(&self, app: &AppKey, generation: i64) -> Serving {
        let members = self.members.lock().expect("fleet lock");
        Serving {
            gateways: members.len(),
            current: members
                .values()
                .filter(|m| m.programmed.get(app).is_some_and(|g| *g >= generation))
                .count(),
        }
    }

    /// Waits until some app's programmed state changed and takes those apps.
    pub async fn changed_apps(&self) -> BTreeSet<AppKey> {
        loop {
            let wake = self.wake.notified();
            let taken = std::mem::take(&mut *self.changed.lock().expect("fleet lock"));
            if !taken.is_empty() {
                return taken;
            }
            wake.await;
        }
    }

    fn mark(&self, apps: impl Iterator<Item = AppKey>) {
        let mut changed = self.changed.lock().expect("fleet lock");
        let before = changed.len();
        changed.extend(apps);
        if changed.len() > before {
            self.wake.notify_one();
        }
    }

    /// Forgets the gateways that went silent; at the end of the warm-up,
    /// tells the subscribers of [`Fleet::addresses`].
    pub fn expire(&self, now: Instant) {
        let mut members = self.members.lock().expect("fleet lock");
        self.publish(&mut members, now);
        if now >= self.warm_at
            && !self
                .told_warm
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            self.addresses.send_modify(|_| {});
        }
    }

    /// Whether the fleet has had time to hear from every live gateway.
    pub fn is_warm(&self, now: Instant) -> bool {
        now >= self.warm_at
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
        let mut gone = Vec::new();
        members.retain(|_, m| {
            let live = now.saturating_duration_since(m.seen) < SILENT_AFTER;
            if !live {
                gone.extend(m.programmed.keys().cloned());
            }
            live
        });
        self.mark(gone.into_iter());
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
            ..Default::default()
        }
    }

    fn serving_report(gateway: &str, apps: &[(&str, i64)]) -> Stats {
        Stats {
            gateway: gateway.into(),
            programmed: apps
                .iter()
                .map(|(app, generation)| crate::protocol::Programmed {
                    namespace: "ns".into(),
                    app: (*app).into(),
                    generation: *generation,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_app_is_served_once_every_live_gateway_has_its_generation() {
        let fleet = Fleet::default();
        let t0 = Instant::now();
        let shop = ("ns".to_string(), "shop".to_string());
        assert_eq!(
            fleet.serving(&shop, 1),
            Serving {
                gateways: 0,
                current: 0
            }
        );
        fleet.record(&serving_report("a", &[("shop", 1), ("blog", 4)]), t0);
        fleet.record(&serving_report("b", &[("blog", 4)]), t0);
        assert_eq!(
            fleet.serving(&shop, 1),
            Serving {
                gateways: 2,
                current: 1
            }
        );
        let changed = fleet.changed_apps().await;
        assert!(changed.contains(&shop) && changed.len() == 2, "{changed:?}");

        // b catches up; a newer generation is served by neither yet.
        fleet.record(&serving_report("b", &[("shop", 1), ("blog", 4)]), t0);
        assert_eq!(fleet.changed_apps().await, BTreeSet::from([shop.clone()]));
        assert_eq!(
            fleet.serving(&shop, 1),
            Serving {
                gateways: 2,
                current: 2
            }
        );
        assert_eq!(fleet.serving(&shop, 2).current, 0);

        // The same report again changes nothing; b going silent changes
        // what it served.
        fleet.record(&serving_report("a", &[("shop", 1), ("blog", 4)]), t0);
        assert!(fleet.changed.lock().unwrap().is_empty());
        fleet.record(
            &serving_report("a", &[("shop", 2), ("blog", 4)]),
            t0 + SILENT_AFTER,
        );
        fleet.expire(t0 + SILENT_AFTER);
        assert_eq!(
            fleet.serving(&shop, 2),
            Serving {
                gateways: 1,
                current: 1
            }
        );
        assert_eq!(
            fleet.changed_apps().await.len(),
            2,
            "b served shop and blog"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn gateways_join_by_reporting_and_leave_when_silent_or_draining() {
        let fleet = Fleet::default();
        let mut changes = fleet.subscribe();
        let t0 = Instant::now();
        assert!(!fleet.is_warm(t0));
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

        // The warm-up ends: told, though no address changed.
        fleet.expire(t0 + WARM_UP);
        assert!(fleet.is_warm(t0 + WARM_UP));
        assert!(
            changes.has_changed().unwrap(),
            "the end of the warm-up is told"
        );
        changes.borrow_and_update();
        fleet.expire(t0 + WARM_UP);
        assert!(!changes.has_changed().unwrap(), "once");

        // b goes silent; a keeps reporting.
        fleet.expire(t0 + SILENT_AFTER);
        assert_eq!(*fleet.addresses(), ips(&["10.0.0.1"]));
        assert!(changes.has_changed().unwrap());

        // a drains: gone at once.
        fleet.record(&report("a", Some("10.0.0.1"), true), t0 + SILENT_AFTER);
        assert!(fleet.addresses().is_empty());
    }
}
