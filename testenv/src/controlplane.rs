//! etcd, kube-apiserver and kube-controller-manager as child processes.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::binaries::Binaries;
use crate::network::{PodNetwork, state_root};
use crate::process::{ChildProcess, ProcessSpec, peak_rss_bytes, run, spawn};

/// The service range; distinct from every pod range (10.244.0.0/16).
const SERVICE_CIDR: &str = "10.96.0.0/16";

/// Optional features of a control plane.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Write an audit log (`audit.log`, JSON, one line per request at
    /// metadata level) so a benchmark can count requests per user.
    pub audit_log: bool,
    /// More kube-apiserver flags (a fault test may turn the watch cache
    /// off and compact etcd often, so that resumed watches get 410 Gone).
    pub apiserver_args: Vec<String>,
}

/// A running local control plane with its pod network.
#[derive(Debug)]
pub struct ControlPlane {
    /// Working directory: certificates, logs, etcd data, kubeconfig.
    pub dir: PathBuf,
    /// Admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// `https://<node ip>:<port>`.
    pub server: String,
    /// PEM of the serving certificate chain, usable as a CA bundle.
    pub ca_pem: Vec<u8>,
    /// The binaries that are running.
    pub binaries: Binaries,
    /// The pod network; the API server listens on its node address.
    pub network: Arc<PodNetwork>,
    /// Time from the call to `start` until the control plane was ready.
    pub startup_time: Duration,
    processes: Vec<(&'static str, ChildProcess)>,
}

impl ControlPlane {
    /// Builds (first run only) and starts the control plane, then waits until
    /// the API server is ready and the controller-manager is working.
    pub async fn start() -> Result<Self> {
        Self::start_with(Options::default()).await
    }

    /// Like [`ControlPlane::start`], with options.
    pub async fn start_with(options: Options) -> Result<Self> {
        let binaries = tokio::task::spawn_blocking(Binaries::ensure).await??;
        let started = Instant::now();
        let network = Arc::new(tokio::task::spawn_blocking(PodNetwork::create).await??);
        let dir = state_root().join(format!("run-{}", network.slot()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("pki"))?;
        std::fs::create_dir_all(dir.join("logs"))?;

        let node_ip = network.node_ip();
        let etcd_client = free_port(Ipv4Addr::LOCALHOST)?;
        let etcd_peer = free_port(Ipv4Addr::LOCALHOST)?;
        let api_port = free_port(node_ip)?;
        let server = format!("https://{node_ip}:{api_port}");
        let admin_token = random_hex(16)?;

        run(
            "openssl",
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                path_str(&dir.join("sa.key")),
            ],
        )?;
        // The controller-manager gets its own user, so the audit log (and
        // anyone reading it) can tell its requests from the admin's.
        let controller_token = random_hex(16)?;
        std::fs::write(
            dir.join("tokens.csv"),
            format!(
                "{admin_token},tandem-admin,tandem-admin,\"system:masters\"\n{controller_token},system:kube-controller-manager,kube-controller-manager,\"system:masters\"\n"
            ),
        )?;

        let mut control_plane = Self {
            kubeconfig: dir.join("kubeconfig"),
            dir,
            server,
            ca_pem: Vec::new(),
            binaries,
            network,
            startup_time: Duration::ZERO,
            processes: Vec::new(),
        };
        let dir = control_plane.dir.clone();
        let log = |name: &str| dir.join("logs").join(format!("{name}.log"));

        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        control_plane.spawn(
            "etcd",
            ProcessSpec::new(
                path_str(&control_plane.binaries.etcd()),
                &[
                    "--name=testenv",
                    &format!("--data-dir={}", dir.join("etcd").display()),
                    &format!("--listen-client-urls={etcd_url}"),
                    &format!("--advertise-client-urls={etcd_url}"),
                    &format!("--listen-peer-urls={peer_url}"),
                    &format!("--initial-advertise-peer-urls={peer_url}"),
                    &format!("--initial-cluster=testenv={peer_url}"),
                    "--unsafe-no-fsync=true",
                    "--log-level=warn",
                ],
                &log("etcd"),
            ),
        )?;
        control_plane
            .wait_for_tcp("etcd", SocketAddr::from((Ipv4Addr::LOCALHOST, etcd_client)))
            .await?;

        let sa_key = dir.join("sa.key");
        let mut audit_flags = Vec::new();
        if options.audit_log {
            std::fs::write(
                dir.join("audit-policy.yaml"),
                "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n",
            )?;
            audit_flags = vec![
                format!(
                    "--audit-policy-file={}",
                    dir.join("audit-policy.yaml").display()
                ),
                format!("--audit-log-path={}", dir.join("audit.log").display()),
                "--audit-log-format=json".to_string(),
                "--audit-log-maxsize=0".to_string(),
            ];
        }
        let mut apiserver = ProcessSpec::new(
            path_str(&control_plane.binaries.kube_apiserver()),
            &[
                &format!("--etcd-servers={etcd_url}"),
                &format!("--bind-address={node_ip}"),
                &format!("--advertise-address={node_ip}"),
                &format!("--secure-port={api_port}"),
                &format!("--cert-dir={}", dir.join("pki").display()),
                &format!("--token-auth-file={}", dir.join("tokens.csv").display()),
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                &format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                &format!("--service-account-issuer={}", control_plane.server),
                &format!("--service-account-key-file={}", sa_key.display()),
                &format!("--service-account-signing-key-file={}", sa_key.display()),
                "--profiling=false",
                "--v=1",
            ],
            &log("kube-apiserver"),
        );
        apiserver.args.extend(audit_flags);
        apiserver
            .args
            .extend(options.apiserver_args.iter().cloned());
        control_plane.spawn("kube-apiserver", apiserver)?;
        let cert = dir.join("pki").join("apiserver.crt");
        control_plane.ca_pem = control_plane.wait_for_file("kube-apiserver", &cert).await?;
        std::fs::write(
            &control_plane.kubeconfig,
            control_plane.kubeconfig_for("tandem-admin", &admin_token, "default"),
        )?;
        control_plane.wait_for_api_server().await?;
        let controller_kubeconfig = dir.join("kube-controller-manager.kubeconfig");
        std::fs::write(
            &controller_kubeconfig,
            control_plane.kubeconfig_for(
                "system:kube-controller-manager",
                &controller_token,
                "kube-system",
            ),
        )?;

        control_plane.spawn(
            "kube-controller-manager",
            ProcessSpec::new(
                path_str(&control_plane.binaries.kube_controller_manager()),
                &[
                    &format!("--kubeconfig={}", controller_kubeconfig.display()),
                    "--leader-elect=false",
                    "--bind-address=127.0.0.1",
                    "--secure-port=0",
                    &format!("--service-account-private-key-file={}", sa_key.display()),
                    &format!("--root-ca-file={}", cert.display()),
                    &format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                    "--use-service-account-credentials=false",
                    "--v=1",
                ],
                &log("kube-controller-manager"),
            ),
        )?;
        control_plane.wait_for_controller_manager().await?;
        control_plane.startup_time = started.elapsed();
        Ok(control_plane)
    }

    /// Starts kube-proxy (iptables mode) in the pod network namespace, so a
    /// call from a pod to a Service's cluster IP reaches its endpoints as on
    /// a node; waits until it has written its rules. Call it once the
    /// process kubelet has registered `node` (kube-proxy takes the node's
    /// addresses at start, and exits when they change).
    pub async fn start_kube_proxy(&mut self, node: &str) -> Result<()> {
        if run("sh", &["-c", "command -v iptables-restore"]).is_err() {
            bail!(
                "kube-proxy needs iptables (iptables-restore); install the Debian package `iptables` (.ci/run does)"
            );
        }
        self.network.route_services(SERVICE_CIDR)?;
        let kubeconfig = self.kubeconfig.clone();
        let log = self.dir.join("logs").join("kube-proxy.log");
        let mut spec = ProcessSpec::new(
            path_str(&self.binaries.kube_proxy()),
            &[
                &format!("--kubeconfig={}", kubeconfig.display()),
                "--proxy-mode=iptables",
                &format!("--hostname-override={node}"),
                &format!("--cluster-cidr={}", self.network.cidr()),
                // The namespace's conntrack table is the host's: leave its
                // sysctls alone.
                "--conntrack-max-per-core=0",
                "--conntrack-tcp-timeout-established=0",
                "--conntrack-tcp-timeout-close-wait=0",
                "--v=1",
            ],
            &log,
        );
        spec.netns = Some(self.network.namespace());
        self.spawn("kube-proxy", spec)?;
        let ns = self.network.namespace();
        self.poll("kube-proxy", || {
            let ns = ns.clone();
            async move {
                Ok(
                    run("ip", &["netns", "exec", &ns, "iptables", "-t", "nat", "-S"])
                        .is_ok_and(|rules| rules.contains("KUBE-SERVICES")),
                )
            }
        })
        .await
    }

    fn spawn(&mut self, name: &'static str, spec: ProcessSpec) -> Result<()> {
        let child = spawn(spec).with_context(|| format!("start {name}"))?;
        self.processes.push((name, child));
        Ok(())
    }

    /// An admin client (group `system:masters`).
    pub async fn client(&self) -> Result<kube::Client> {
        client_from_kubeconfig(&std::fs::read_to_string(&self.kubeconfig)?).await
    }

    /// A kubeconfig that authenticates with `token`.
    pub fn kubeconfig_for(&self, user: &str, token: &str, namespace: &str) -> String {
        crate::kubeconfig(&self.server, &self.ca_pem, user, token, namespace)
    }

    /// The audit log, when started with [`Options::audit_log`].
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("audit.log")
    }

    /// CPU seconds (user + system) each control-plane process has used so
    /// far, by name.
    pub fn cpu_seconds(&self) -> Vec<(&'static str, f64)> {
        self.processes
            .iter()
            .filter_map(|(name, process)| {
                crate::process::cpu_seconds(process.pid()).map(|cpu| (*name, cpu))
            })
            .collect()
    }

    /// Sum of the peak resident memory of etcd, the API server and the
    /// controller-manager so far.
    pub fn peak_memory_bytes(&self) -> u64 {
        self.processes
            .iter()
            .filter_map(|(_, p)| peak_rss_bytes(p.pid()))
            .sum()
    }

    /// Process ids of the control-plane components, by name.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        self.processes.iter().map(|(n, p)| (*n, p.pid())).collect()
    }

    /// Stops every component, newest first, and removes the pod network.
    pub fn stop(&mut self) {
        while let Some((_, process)) = self.processes.pop() {
            process.terminate_blocking(Duration::from_secs(5));
        }
    }

    fn check_running(&self) -> Result<()> {
        for (name, process) in &self.processes {
            if let Some(status) = process.exit_status() {
                let log = self.dir.join("logs").join(format!("{name}.log"));
                bail!(
                    "{name} exited ({status}); last lines of {}:\n{}",
                    log.display(),
                    tail(&log, 20)
                );
            }
        }
        Ok(())
    }

    async fn wait_for_tcp(&self, what: &str, addr: SocketAddr) -> Result<()> {
        self.poll(what, || async move {
            Ok(tokio::net::TcpStream::connect(addr).await.is_ok())
        })
        .await
    }

    async fn wait_for_file(&self, what: &str, path: &Path) -> Result<Vec<u8>> {
        self.poll(what, || async move {
            Ok(std::fs::metadata(path)
                .map(|m| m.len() > 0)
                .unwrap_or(false))
        })
        .await?;
        Ok(std::fs::read(path)?)
    }

    async fn wait_for_api_server(&self) -> Result<()> {
        let client = self.client().await?;
        self.poll("kube-apiserver /readyz", || {
            let client = client.clone();
            async move {
                let request = http::Request::get("/readyz").body(Vec::new())?;
                Ok(matches!(client.request_text(request).await, Ok(body) if body.trim() == "ok"))
            }
        })
        .await?;
        let namespaces: Api<Namespace> = Api::all(client);
        self.poll("the default namespace", || {
            let namespaces = namespaces.clone();
            async move { Ok(namespaces.get_opt("default").await?.is_some()) }
        })
        .await
    }

    async fn wait_for_controller_manager(&self) -> Result<()> {
        // The service-account controller creating `default` proves the
        // controller-manager runs and is authorised.
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client().await?, "default");
        self.poll("kube-controller-manager (default ServiceAccount)", || {
            let accounts = accounts.clone();
            async move { Ok(accounts.get_opt("default").await?.is_some()) }
        })
        .await
    }

    /// Polls `check` every 50 ms for up to 90 s, failing early (with the
    /// component's log) if a component exits.
    async fn poll<F, Fut>(&self, what: &str, mut check: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<bool>>,
    {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut last_error = None;
        loop {
            self.check_running()?;
            match check().await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(error) => last_error = Some(error),
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out after 90s waiting for {what} (last error: {last_error:?}); logs in {}",
                    self.dir.join("logs").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A client from kubeconfig text.
pub async fn client_from_kubeconfig(yaml: &str) -> Result<kube::Client> {
    let config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::from_yaml(yaml)?,
        &KubeConfigOptions::default(),
    )
    .await?;
    Ok(kube::Client::try_from(config)?)
}

fn free_port(ip: Ipv4Addr) -> Result<u16> {
    Ok(TcpListener::bind((ip, 0))
        .with_context(|| format!("bind a free port on {ip}"))?
        .local_addr()?
        .port())
}

/// `bytes` random bytes from the kernel, as hex.
pub fn random_hex(bytes: usize) -> Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("testenv paths are UTF-8")
}

/// The last `lines` lines of a file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
