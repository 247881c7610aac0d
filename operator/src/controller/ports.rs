//! Gateway ports: each workload reached through the gateways gets a port of
//! its own on every gateway pod, so a request that arrives there is that
//! workload's whatever its Host header says (an ingress that reads the
//! public Service's EndpointSlices forwards the client's Host, not the
//! Service's name).
//!
//! The port is recorded in the public Service (`targetPort`) and its
//! EndpointSlices, so it survives restarts and leader changes without a
//! store of its own: a workload keeps the port its Service has. A new one
//! takes the first free port from a start that a hash of its name picks
//! (so ports stay put across clusters built from the same manifests).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::time::Instant;

use crate::api::labels;

/// How long a port handed out stays reserved for its Service without the
/// cache showing that Service (the cache shows it well before).
const RESERVED_FOR: Duration = Duration::from_secs(60);

/// Hands out gateway ports; see the module docs.
#[derive(Debug)]
pub struct Ports {
    range: RangeInclusive<u16>,
    /// Ports handed out lately, by Service (namespace, name).
    reserved: Mutex<BTreeMap<(String, String), (u16, Instant)>>,
}

impl Ports {
    /// Hands out ports of `range`.
    pub fn new(range: RangeInclusive<u16>) -> Self {
        Ports {
            range,
            reserved: Mutex::default(),
        }
    }

    /// The port of public Service `name` in `namespace`: the one it has, else
    /// a free one; `None` when every port of the range is taken. `services`
    /// are the live Services Tandem manages (all namespaces it watches).
    pub fn port_of<'a>(
        &self,
        namespace: &str,
        name: &str,
        services: impl Iterator<Item = &'a Service>,
        now: Instant,
    ) -> Option<u16> {
        let mut reserved = self.reserved.lock().expect("ports lock");
        reserved.retain(|_, (_, at)| now.saturating_duration_since(*at) < RESERVED_FOR);
        let key = (namespace.to_string(), name.to_string());
        let mut taken = BTreeSet::new();
        let mut own = None;
        for service in services {
            let Some(port) = self.gateway_port(service) else {
                continue;
            };
            let is_own = service.metadata.namespace.as_deref() == Some(namespace)
                && service.metadata.name.as_deref() == Some(name);
            if is_own {
                own = Some(port);
            } else {
                taken.insert(port);
            }
        }
        // Two Services that both claim a port (restored from a backup, or
        // edited by hand): the one checked first keeps it, the other moves.
        let chosen = match (own, reserved.get(&key)) {
            (Some(port), _) if !self.reserved_by_other(&reserved, &key, port) => port,
            (_, Some((port, _))) if !taken.contains(port) => *port,
            _ => {
                taken.extend(
                    reserved
                        .iter()
                        .filter(|(k, _)| **k != key)
                        .map(|(_, (p, _))| *p),
                );
                self.free_from(start(&key, &self.range), &taken)?
            }
        };
        reserved.insert(key, (chosen, now));
        Some(chosen)
    }

    fn reserved_by_other(
        &self,
        reserved: &BTreeMap<(String, String), (u16, Instant)>,
        key: &(String, String),
        port: u16,
    ) -> bool {
        reserved.iter().any(|(k, (p, _))| k != key && *p == port)
    }

    /// The gateway port a live Service records, if it points at the
    /// gateways.
    fn gateway_port(&self, service: &Service) -> Option<u16> {
        let public = service
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(labels::SERVICE))
            .is_some_and(|kind| kind == labels::PUBLIC);
        let spec = service.spec.as_ref()?;
        if !public || spec.selector.as_ref().is_some_and(|s| !s.is_empty()) {
            return None;
        }
        let port = match spec.ports.as_ref()?.first()?.target_port.as_ref()? {
            IntOrString::Int(port) => u16::try_from(*port).ok()?,
            IntOrString::String(_) => return None,
        };
        self.range.contains(&port).then_some(port)
    }

    fn free_from(&self, start: u16, taken: &BTreeSet<u16>) -> Option<u16> {
        let (first, last) = (*self.range.start(), *self.range.end());
        (start..=last)
            .chain(first..start)
            .find(|port| !taken.contains(port))
    }
}

/// Where the search for a free port starts for `key`.
fn start(key: &(String, String), range: &RangeInclusive<u16>) -> u16 {
    let text = format!("{}/{}", key.0, key.1);
    let hash = text.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    let size = u64::from(*range.end() - *range.start()) + 1;
    range.start() + (hash % size) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(namespace: &str, name: &str, port: i32, selector: bool) -> Service {
        let mut spec = json!({"ports": [{"port": 80, "targetPort": port}]});
        if selector {
            spec["selector"] = json!({"a": "b"});
        }
        serde_json::from_value(json!({
            "metadata": {"namespace": namespace, "name": name, "labels": {labels::SERVICE: labels::PUBLIC}},
            "spec": spec,
        }))
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_keeps_its_port_and_new_ones_take_free_ports() {
        let ports = Ports::new(20000..=20003);
        let now = Instant::now();
        let live = [
            service("ns", "a", 20001, false),
            // Selector Services and ports outside the range are not claims.
            service("ns", "direct", 20002, true),
            service("ns", "outside", 8080, false),
        ];
        assert_eq!(ports.port_of("ns", "a", live.iter(), now), Some(20001));
        let mut handed = BTreeSet::from([20001]);
        for name in ["b", "c", "d"] {
            let port = ports.port_of("ns", name, live.iter(), now).unwrap();
            assert!(handed.insert(port), "{name} got {port}, already handed out");
            // Asked again before the cache shows it: the same port.
            assert_eq!(ports.port_of("ns", name, live.iter(), now), Some(port));
        }
        assert_eq!(
            ports.port_of("ns", "e", live.iter(), now),
            None,
            "the range is full"
        );
        // Reservations lapse once the cache would show the Services; here
        // b, c and d never appeared, so their ports are free again.
        let later = now + RESERVED_FOR;
        assert_eq!(ports.port_of("ns", "a", live.iter(), later), Some(20001));
        assert!(ports.port_of("ns", "e", live.iter(), later).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn two_services_claiming_one_port_end_with_different_ports() {
        let ports = Ports::new(20000..=20009);
        let now = Instant::now();
        let live = [
            service("ns", "a", 20005, false),
            service("other", "a", 20005, false),
        ];
        let first = ports.port_of("ns", "a", live.iter(), now).unwrap();
        let second = ports.port_of("other", "a", live.iter(), now).unwrap();
        assert_eq!(first, 20005);
        assert_ne!(first, second);
    }

    #[test]
    fn starts_are_spread_over_the_range() {
        let range = 20000..=29999;
        let starts: BTreeSet<u16> = (0..100)
            .map(|i| start(&("ns".into(), format!("app-{i}")), &range))
            .collect();
        assert!(starts.len() > 95, "{} distinct starts", starts.len());
        assert!(starts.iter().all(|p| range.contains(p)));
    }
}
