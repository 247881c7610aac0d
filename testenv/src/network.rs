//! The pod network: a network namespace of our own joined to the host by a
//! veth pair.
//!
//! The API server refuses loopback addresses in EndpointSlices, so pods get
//! addresses from `10.244.<slot>.0/24` inside the namespace `tandem-<slot>`;
//! the host end of the veth holds `10.244.<slot>.1`, where the API server
//! listens so that pods reach it too. Each environment holds an exclusive lock
//! on its slot; a slot whose lock is free but whose namespace still exists
//! belongs to a crashed run and is cleaned before reuse.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::process::run;

/// Number of slots, i.e. environments that may run side by side.
const SLOTS: u8 = 64;

/// The state directory shared by all environments on this machine.
pub fn state_root() -> PathBuf {
    std::env::var_os("TANDEM_TESTENV_STATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/tandem-testenv"))
}

/// One pod network, removed when dropped.
#[derive(Debug)]
pub struct PodNetwork {
    slot: u8,
    _lock: File,
    /// Held open for our lifetime; see [`spawn_janitor`].
    janitor: Option<std::process::Child>,
}

impl PodNetwork {
    /// Claims a free slot, removes leftovers of a crashed run in it, and
    /// creates the namespace and veth pair.
    pub fn create() -> Result<Self> {
        if !nix::unistd::geteuid().is_root() {
            bail!(
                "the pod network needs root (it creates a network namespace and a veth pair with `ip`); run as root"
            );
        }
        let locks = state_root().join("locks");
        std::fs::create_dir_all(&locks).with_context(|| format!("create {}", locks.display()))?;
        for slot in 1..SLOTS {
            let path = locks.join(format!("slot-{slot}.lock"));
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .with_context(|| format!("open {}", path.display()))?;
            if file.try_lock().is_err() {
                continue;
            }
            let mut network = Self {
                slot,
                _lock: file,
                janitor: None,
            };
            network.remove_links();
            network.setup()?;
            network.janitor = Some(network.spawn_janitor(&path)?);
            return Ok(network);
        }
        bail!("all {SLOTS} pod network slots are in use")
    }

    /// The slot number of this environment.
    pub fn slot(&self) -> u8 {
        self.slot
    }

    /// The network namespace name.
    pub fn namespace(&self) -> String {
        format!("tandem-{}", self.slot)
    }

    fn host_link(&self) -> String {
        format!("tandem{}h", self.slot)
    }

    /// The host side of the veth: where the API server listens.
    pub fn node_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.slot, 1)
    }

    /// The address of pod number `index` (0-based, up to 251).
    pub fn pod_ip(&self, index: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.slot, index + 2)
    }

    /// Number of pod addresses available.
    pub fn capacity(&self) -> u8 {
        252
    }

    /// A permanent address inside the namespace. Linux flushes every route
    /// of an interface when its last IPv4 address goes, which would cut the
    /// pod network off after scaling to zero; this one never goes.
    fn anchor_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.slot, 254)
    }

    /// The pod CIDR.
    pub fn cidr(&self) -> String {
        format!("10.244.{}.0/24", self.slot)
    }

    fn setup(&self) -> Result<()> {
        let ns = self.namespace();
        let host = self.host_link();
        run("ip", &["netns", "add", &ns])?;
        run(
            "ip",
            &[
                "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", self.node_ip()),
                "dev",
                &host,
            ],
        )?;
        run("ip", &["link", "set", &host, "up"])?;
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        run(
            "ip",
            &[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/32", self.anchor_ip()),
                "dev",
                "eth0",
            ],
        )?;
        // Pod addresses are added one by one as /32; this route makes the whole
        // pod range reachable from each pod and the node reachable as gateway.
        run(
            "ip",
            &["-n", &ns, "route", "add", &self.cidr(), "dev", "eth0"],
        )?;
        Ok(())
    }

    /// Routes the Service range `cidr` from the pods (as a node's default
    /// route would) so that kube-proxy's rules can rewrite a call to a
    /// cluster IP, and refuses whatever call its rules did not rewrite, so
    /// such a packet never leaves the namespace for the host's network.
    pub fn route_services(&self, cidr: &str) -> Result<()> {
        let ns = self.namespace();
        let anchor = self.anchor_ip().to_string();
        run(
            "ip",
            &[
                "-n", &ns, "route", "replace", cidr, "dev", "eth0", "src", &anchor,
            ],
        )?;
        run(
            "ip",
            &[
                "netns", "exec", &ns, "iptables", "-A", "OUTPUT", "-d", cidr, "-p", "all", "-j",
                "REJECT",
            ],
        )
        .map(drop)
    }

    /// Gives a pod its address inside the namespace.
    pub fn add_pod_ip(&self, ip: Ipv4Addr) -> Result<()> {
        run(
            "ip",
            &[
                "-n",
                &self.namespace(),
                "addr",
                "add",
                &format!("{ip}/32"),
                "dev",
                "eth0",
            ],
        )
        .map(drop)
    }

    /// The network namespace of a pod with a namespace of its own.
    pub fn own_namespace(&self, ip: Ipv4Addr) -> String {
        format!("{}-p{}", self.namespace(), ip.octets()[3])
    }

    /// Gives a pod a network namespace of its own, joined to the pod
    /// network as a node joins its pods: a veth pair, the pod's address on
    /// its `eth0` with a default route through the pod network, and a /32
    /// route to it there (forwarding on). For programs that listen on every
    /// address (`:3000`), which would clash in the shared namespace.
    pub fn add_own_pod(&self, ip: Ipv4Addr) -> Result<String> {
        let shared = self.namespace();
        let own = self.own_namespace(ip);
        let link = format!("p{}", ip.octets()[3]);
        let anchor = self.anchor_ip().to_string();
        let _ = run("ip", &["netns", "del", &own]);
        run("ip", &["netns", "add", &own])?;
        run(
            "ip",
            &[
                "-n", &shared, "link", "add", &link, "type", "veth", "peer", "name", "eth0",
                "netns", &own,
            ],
        )?;
        run("ip", &["-n", &shared, "link", "set", &link, "up"])?;
        run("ip", &["-n", &own, "link", "set", "lo", "up"])?;
        run("ip", &["-n", &own, "link", "set", "eth0", "up"])?;
        run(
            "ip",
            &[
                "-n",
                &own,
                "addr",
                "add",
                &format!("{ip}/32"),
                "dev",
                "eth0",
            ],
        )?;
        run("ip", &["-n", &own, "route", "add", &anchor, "dev", "eth0"])?;
        run(
            "ip",
            &[
                "-n", &own, "route", "add", "default", "via", &anchor, "dev", "eth0",
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                &shared,
                "route",
                "replace",
                &format!("{ip}/32"),
                "dev",
                &link,
            ],
        )?;
        sysctl(&shared, "net.ipv4.ip_forward=1")?;
        // The host asks for the pod's address on the pod network's link:
        // answered for the pod, now that the address lives behind a route.
        sysctl(&shared, "net.ipv4.conf.eth0.proxy_arp=1")?;
        Ok(own)
    }

    /// Removes a pod's own network namespace (and so its veth pair and
    /// route).
    pub fn remove_own_pod(&self, ip: Ipv4Addr) -> Result<()> {
        run("ip", &["netns", "del", &self.own_namespace(ip)]).map(drop)
    }

    /// Takes a pod's address away again.
    pub fn remove_pod_ip(&self, ip: Ipv4Addr) -> Result<()> {
        run(
            "ip",
            &[
                "-n",
                &self.namespace(),
                "addr",
                "del",
                &format!("{ip}/32"),
                "dev",
                "eth0",
            ],
        )
        .map(drop)
    }

    /// Starts a process that removes the namespace once we are gone, however
    /// we go (statics of a test binary are never dropped, and a SIGKILL runs
    /// no destructor): it blocks reading a pipe whose only writer is this
    /// process, and the kernel closes that pipe when we exit. It takes the slot
    /// lock first, so it never removes the namespace of a newer run.
    fn spawn_janitor(&self, lock: &std::path::Path) -> Result<std::process::Child> {
        let script = format!(
            "cat >/dev/null; exec flock '{}' sh -c 'ip netns del {} 2>/dev/null; ip link del {} 2>/dev/null; true'",
            lock.display(),
            self.namespace(),
            self.host_link()
        );
        std::process::Command::new("sh")
            .args(["-c", &script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("start the pod network janitor")
    }

    fn remove_links(&self) {
        // Deleting the namespace removes its veth end, which removes the pair.
        let _ = run("ip", &["netns", "del", &self.namespace()]);
        let _ = run("ip", &["link", "del", &self.host_link()]);
    }
}

/// Sets a kernel parameter inside the network namespace `ns`.
fn sysctl(ns: &str, setting: &str) -> Result<()> {
    run("ip", &["netns", "exec", ns, "sysctl", "-q", "-w", setting]).map(drop)
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        self.remove_links();
        // Closing its stdin lets the janitor finish; it waits for our lock,
        // which is released right after this.
        if let Some(mut janitor) = self.janitor.take() {
            drop(janitor.stdin.take());
            std::thread::spawn(move || janitor.wait());
        }
    }
}
