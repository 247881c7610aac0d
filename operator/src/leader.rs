//! Leader election on a `coordination.k8s.io/v1` Lease, and the fence that
//! keeps every write of this process inside the time it holds the lease.
//!
//! Timing (defaults from client-go scaled down: lease duration 15 s, renew
//! deadline 10 s, retry period 2 s; `--lease-duration` sets the first, the
//! others follow as 2/3 and 1/7 of it):
//!
//! - The holder renews every retry period. A renewal whose request *started*
//!   at S and succeeded opens the fence until S + renew deadline: writes may
//!   start until then, and each write has a timeout that ends by
//!   S + lease duration.
//! - Each renewal call may take only until the fence would close. If the
//!   fence closes without a renewal (the API server is unreachable, slow,
//!   or another replica took the lease), every further write is refused at
//!   once, in the process, and the process exits (Kubernetes restarts it as
//!   a candidate).
//! - A candidate takes over only after it has seen the Lease record
//!   unchanged for a lease duration on its own clock. The old holder's last
//!   renewal changed the record at some T >= S, so a new holder starts at
//!   T + lease duration >= S + lease duration: after every write of the old
//!   holder has ended or been given up. The worst-case overlap is zero,
//!   as long as the two clocks run at the same rate to within the margin
//!   (lease duration minus renew deadline: 5 s in 15 s), which real clocks
//!   do by orders of magnitude.
//! - The one thing a client cannot take back is a request the API server
//!   already received when the client gave up on it; that is why a write's
//!   timeout ends a full margin before a standby could act.
//!
//! The fence is applied to the operator's Kubernetes client as a tower
//! layer ([`FenceLayer`]): every mutating request (POST, PUT, PATCH, DELETE)
//! of the reconciler, the autoscaler and the event recorders passes it;
//! reads and watches do not. The Lease calls use a client of their own.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::{Duration, Instant};

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
    /// How long after a renewal's start the holder may keep writing.
    pub renew_deadline: Duration,
    /// How often the holder renews and a candidate retries.
    pub renew_every: Duration,
}

impl LeaseConfig {
    /// The timing for `lease_duration` (see the module docs).
    pub fn new(
        namespace: String,
        name: String,
        identity: String,
        lease_duration: Duration,
    ) -> Self {
        Self {
            namespace,
            name,
            identity,
            lease_duration,
            renew_deadline: lease_duration * 2 / 3,
            renew_every: (lease_duration / 7).max(Duration::from_millis(200)),
        }
    }
}

/// Errors of the election loop.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The API server refused or failed a Lease request.
    #[error("lease request failed: {0}")]
    Kube(#[from] kube::Error),
    /// A Lease request took longer than the time left.
    #[error("lease request timed out")]
    Timeout,
}

/// Whether, and for how long, this process may write. Shared by every
/// writer through [`FenceLayer`].
#[derive(Clone, Debug)]
pub struct Fence(Arc<FenceState>);

#[derive(Debug)]
struct FenceState {
    base: Instant,
    /// Writes may start before this (milliseconds after `base`; 0: closed).
    open_until: AtomicU64,
    /// Writes must be over by this.
    writes_end: AtomicU64,
    /// No leader election: always open, writes time out after this.
    unfenced: Option<Duration>,
}

/// Why a write was refused or given up.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// This replica does not hold the lease (or its time ran out).
    #[error("not the leader: this replica does not hold the lease")]
    NotLeader,
    /// The write did not finish in the time the lease leaves it.
    #[error("write timed out ({0:?}) before the lease could pass to another replica")]
    Timeout(Duration),
}

impl Fence {
    /// A closed fence, opened by the lease.
    pub fn new() -> Self {
        Self(Arc::new(FenceState {
            base: Instant::now(),
            open_until: AtomicU64::new(0),
            writes_end: AtomicU64::new(0),
            unfenced: None,
        }))
    }

    /// A fence for a single replica without leader election: always open,
    /// each write bounded by `timeout`.
    pub fn unfenced(timeout: Duration) -> Self {
        Self(Arc::new(FenceState {
            base: Instant::now(),
            open_until: AtomicU64::new(u64::MAX),
            writes_end: AtomicU64::new(u64::MAX),
            unfenced: Some(timeout),
        }))
    }

    fn at(&self, millis: u64) -> Instant {
        self.0.base + Duration::from_millis(millis)
    }

    fn millis(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.0.base).as_millis() as u64
    }

    /// A renewal that started at `started` succeeded.
    fn extend(&self, started: Instant, config: &LeaseConfig) {
        self.0.open_until.store(
            self.millis(started + config.renew_deadline).max(1),
            Ordering::SeqCst,
        );
        self.0.writes_end.store(
            self.millis(started + config.lease_duration),
            Ordering::SeqCst,
        );
    }

    /// Refuses every write from now on.
    pub fn close(&self) {
        self.0.open_until.store(0, Ordering::SeqCst);
    }

    /// Until when writes may start, if they may now.
    pub fn open_until(&self) -> Option<Instant> {
        let open = self.0.open_until.load(Ordering::SeqCst);
        if open == u64::MAX {
            return Some(Instant::now() + Duration::from_secs(3600));
        }
        let until = self.at(open);
        (open > 0 && Instant::now() < until).then_some(until)
    }

    /// How long a write that starts now may take, or `None` if none may
    /// start.
    pub fn write_budget(&self) -> Option<Duration> {
        if let Some(timeout) = self.0.unfenced {
            return Some(timeout);
        }
        self.open_until()?;
        let end = self.at(self.0.writes_end.load(Ordering::SeqCst));
        Some(end.saturating_duration_since(Instant::now()))
    }
}

impl Default for Fence {
    fn default() -> Self {
        Self::new()
    }
}

/// A tower layer that passes mutating requests only through an open
/// [`Fence`], each with the fence's timeout.
#[derive(Clone, Debug)]
pub struct FenceLayer(pub Fence);

impl<S> tower::Layer<S> for FenceLayer {
    type Service = Fenced<S>;

    fn layer(&self, inner: S) -> Fenced<S> {
        Fenced {
            inner,
            fence: self.0.clone(),
        }
    }
}

/// The service [`FenceLayer`] makes.
#[derive(Clone, Debug)]
pub struct Fenced<S> {
    inner: S,
    fence: Fence,
}

impl<S, B> tower::Service<http::Request<B>> for Fenced<S>
where
    S: tower::Service<http::Request<B>, Error = tower::BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = tower::BoxError;
    type Future = BoxFuture<'static, Result<S::Response, tower::BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let reads = matches!(
            *request.method(),
            http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
        );
        if reads {
            return Box::pin(self.inner.call(request));
        }
        let Some(budget) = self.fence.write_budget() else {
            return Box::pin(std::future::ready(Err(FenceError::NotLeader.into())));
        };
        let sent = self.inner.call(request);
        Box::pin(async move {
            tokio::time::timeout(budget, sent)
                .await
                .map_err(|_| FenceError::Timeout(budget))?
        })
    }
}

/// A held lease. Dropping it does not release it; call [`HeldLease::release`].
pub struct HeldLease {
    lost: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
    api: Api<Lease>,
    config: LeaseConfig,
    fence: Fence,
}

impl HeldLease {
    /// Completes when the lease is lost: the fence has closed already.
    pub async fn lost(&mut self) {
        while !*self.lost.borrow_and_update() {
            if self.lost.changed().await.is_err() {
                return;
            }
        }
    }

    /// Stops writing, stops renewing, and gives the lease up so another
    /// replica takes over without waiting for it to expire.
    pub async fn release(self) {
        self.fence.close();
        self.task.abort();
        let give_up = async {
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
        };
        let _ = tokio::time::timeout(self.config.renew_deadline, give_up).await;
    }
}

/// Waits until this process holds the lease (through `client`, which must
/// not be fenced), opens `fence`, and keeps renewing in the background;
/// when a renewal does not succeed in time, closes the fence and reports
/// the lease lost.
pub async fn acquire(client: kube::Client, config: LeaseConfig, fence: Fence) -> HeldLease {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut observed: Option<(String, Instant)> = None;
    loop {
        let started = Instant::now();
        let attempt = tokio::time::timeout(
            config.renew_deadline,
            try_acquire_or_renew(&api, &config, &mut observed),
        )
        .await
        .unwrap_or(Err(LeaderError::Timeout));
        match attempt {
            Ok(true) => {
                fence.extend(started, &config);
                break;
            }
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "leader election"),
        }
        tokio::time::sleep(config.renew_every).await;
    }
    tracing::info!(identity = %config.identity, lease = %config.name, "acquired the lease; leading");
    let (lost_tx, lost) = watch::channel(false);
    let task = tokio::spawn(renew(api.clone(), config.clone(), fence.clone(), lost_tx));
    HeldLease {
        lost,
        task,
        api,
        config,
        fence,
    }
}

/// Renews every retry period; each call may take only until the fence
/// closes. Ends, with the fence closed, when the lease is lost.
async fn renew(api: Api<Lease>, config: LeaseConfig, fence: Fence, lost: watch::Sender<bool>) {
    let mut observed = None;
    loop {
        tokio::time::sleep(config.renew_every).await;
        let Some(open_until) = fence.open_until() else {
            tracing::error!(deadline = ?config.renew_deadline, "could not renew the lease in time; writes stopped");
            break;
        };
        let started = Instant::now();
        let renewed = tokio::time::timeout_at(
            open_until,
            try_acquire_or_renew(&api, &config, &mut observed),
        )
        .await;
        match renewed {
            Ok(Ok(true)) => fence.extend(started, &config),
            Ok(Ok(false)) => {
                tracing::error!("another replica took the lease; writes stopped");
                break;
            }
            Ok(Err(error)) => tracing::warn!(%error, "renew lease"),
            Err(_) => {
                tracing::error!(deadline = ?config.renew_deadline, "could not renew the lease in time; writes stopped");
                break;
            }
        }
    }
    fence.close();
    let _ = lost.send(true);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LeaseConfig {
        LeaseConfig::new(
            "ns".into(),
            "lease".into(),
            "me".into(),
            Duration::from_secs(15),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_fence_opens_for_the_renew_deadline_and_writes_end_before_a_standby_could_take_over()
    {
        let config = config();
        let fence = Fence::new();
        assert!(
            fence.write_budget().is_none(),
            "closed until the lease is held"
        );
        let renewal_started = Instant::now();
        // The renewal's answer took 3 s: the fence counts from its start.
        tokio::time::advance(Duration::from_secs(3)).await;
        fence.extend(renewal_started, &config);
        let budget = fence.write_budget().expect("open");
        assert_eq!(
            budget,
            Duration::from_secs(12),
            "a write must end by start + 15 s"
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(fence.write_budget(), Some(Duration::from_secs(6)));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(
            fence.write_budget().is_none(),
            "no write starts after start + 10 s"
        );
        fence.extend(Instant::now(), &config);
        assert!(fence.write_budget().is_some());
        fence.close();
        assert!(fence.write_budget().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_fence_layer_refuses_writes_when_closed_and_times_them_out_but_never_reads() {
        use tower::{Service, ServiceExt};
        let fence = Fence::new();
        // A service that never answers.
        let hanging = tower::service_fn(|_: http::Request<()>| {
            std::future::pending::<Result<http::Response<()>, tower::BoxError>>()
        });
        let mut fenced = tower::Layer::layer(&FenceLayer(fence.clone()), hanging);
        let write = || {
            http::Request::patch("/apis/apps/v1/deployments/x")
                .body(())
                .unwrap()
        };
        let refused = fenced
            .ready()
            .await
            .unwrap()
            .call(write())
            .await
            .unwrap_err();
        assert!(refused.to_string().contains("not the leader"), "{refused}");

        fence.extend(Instant::now(), &config());
        let started = Instant::now();
        let timed_out = fenced
            .ready()
            .await
            .unwrap()
            .call(write())
            .await
            .unwrap_err();
        assert!(timed_out.to_string().contains("timed out"), "{timed_out}");
        assert_eq!(started.elapsed(), Duration::from_secs(15));

        // Reads are never refused or cut by the fence.
        fence.close();
        let read = fenced.ready().await.unwrap().call(
            http::Request::get("/api/v1/pods?watch=true")
                .body(())
                .unwrap(),
        );
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), read)
                .await
                .is_err(),
            "a read passes the closed fence and waits as long as the server takes"
        );
    }
}
