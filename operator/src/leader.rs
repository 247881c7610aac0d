//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! Only the holder of the Lease runs the controller and writes. The holder
//! renews every `renew_every`; if it cannot renew within `renew_deadline` it
//! has lost the lease and must stop writing at once (the process exits, and
//! Kubernetes restarts it as a candidate). A candidate takes the lease over
//! when the record has not changed for `lease_duration` as measured by its own
//! clock, so clock skew between nodes does not matter (as in client-go).

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

/// Where and how long the lease is held.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This process's identity (the pod name).
    pub identity: String,
    /// How long a lease stays valid without renewal.
    pub lease_duration: Duration,
    /// How long the holder keeps trying to renew before giving up.
    pub renew_deadline: Duration,
    /// How often the holder renews and a candidate retries.
    pub renew_every: Duration,
}

impl LeaseConfig {
    /// Defaults from client-go scaled down: 15 s lease, 10 s renew deadline,
    /// 2 s retry.
    pub fn new(namespace: String, name: String, identity: String) -> Self {
        Self {
            namespace,
            name,
            identity,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            renew_every: Duration::from_secs(2),
        }
    }
}

/// Errors of the election loop.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The API server refused or failed a Lease request.
    #[error("lease request failed: {0}")]
    Kube(#[from] kube::Error),
}

/// A held lease. Dropping it does not release it; call [`HeldLease::release`].
pub struct HeldLease {
    lost: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
    api: Api<Lease>,
    config: LeaseConfig,
}

impl HeldLease {
    /// Completes when the lease is lost (renewal failed past the deadline).
    pub async fn lost(&mut self) {
        while !*self.lost.borrow_and_update() {
            if self.lost.changed().await.is_err() {
                return;
            }
        }
    }

    /// Stops renewing and gives the lease up so another replica takes over
    /// without waiting for it to expire.
    pub async fn release(self) {
        self.task.abort();
        if let Ok(mut lease) = self.api.get(&self.config.name).await {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() == Some(&self.config.identity) {
                spec.holder_identity = None;
                spec.lease_duration_seconds = Some(1);
                let _ = self
                    .api
                    .replace(&self.config.name, &PostParams::default(), &lease)
                    .await;
            }
        }
    }
}

/// Waits until this process holds the lease, then keeps renewing it in the
/// background.
pub async fn acquire(client: kube::Client, config: LeaseConfig) -> HeldLease {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut observed: Option<(String, Instant)> = None;
    loop {
        match try_acquire_or_renew(&api, &config, &mut observed).await {
            Ok(true) => break,
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "leader election"),
        }
        tokio::time::sleep(config.renew_every).await;
    }
    tracing::info!(identity = %config.identity, lease = %config.name, "acquired the lease; leading");
    let (lost_tx, lost) = watch::channel(false);
    let task = {
        let api = api.clone();
        let config = config.clone();
        tokio::spawn(async move {
            let mut last_renewal = Instant::now();
            let mut observed = None;
            loop {
                tokio::time::sleep(config.renew_every).await;
                match try_acquire_or_renew(&api, &config, &mut observed).await {
                    Ok(true) => last_renewal = Instant::now(),
                    Ok(false) => {
                        tracing::error!("another replica took the lease");
                        break;
                    }
                    Err(error) => tracing::warn!(%error, "renew lease"),
                }
                if last_renewal.elapsed() > config.renew_deadline {
                    tracing::error!(deadline = ?config.renew_deadline, "could not renew the lease in time");
                    break;
                }
            }
            let _ = lost_tx.send(true);
        })
    };
    HeldLease {
        lost,
        task,
        api,
        config,
    }
}

/// One round of the election: returns whether we hold the lease afterwards.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    config: &LeaseConfig,
    observed: &mut Option<(String, Instant)>,
) -> Result<bool, LeaderError> {
    let now = MicroTime(Timestamp::now());
    let Some(mut lease) = api.get_opt(&config.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.name.clone()),
                namespace: Some(config.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(config.lease_duration.as_secs() as i32),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error.into()),
        };
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let record = format!(
        "{holder}/{:?}/{:?}",
        spec.renew_time.as_ref().map(|t| t.0),
        spec.lease_duration_seconds
    );
    // Expiry is judged by when *we* last saw the record change.
    let seen_at = match observed {
        Some((previous, at)) if *previous == record => *at,
        _ => {
            *observed = Some((record, Instant::now()));
            Instant::now()
        }
    };
    let duration = spec
        .lease_duration_seconds
        .map(|s| Duration::from_secs(s.max(0) as u64))
        .unwrap_or(config.lease_duration);
    let mine = holder == config.identity;
    let expired = holder.is_empty() || seen_at.elapsed() > duration;
    if !mine && !expired {
        return Ok(false);
    }
    if !mine {
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        spec.acquire_time = Some(now.clone());
        spec.holder_identity = Some(config.identity.clone());
    }
    spec.lease_duration_seconds = Some(config.lease_duration.as_secs() as i32);
    spec.renew_time = Some(now);
    // `replace` carries the resourceVersion we read: a concurrent writer makes
    // it fail with 409 instead of both believing they lead.
    match api
        .replace(&config.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(error) => Err(error.into()),
    }
}
