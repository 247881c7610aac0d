//! The control-plane binaries, built from the upstream Go modules pinned in
//! `testenv/controlplane/go.mod` and cached by version.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The Go wrapper module that pins Kubernetes and etcd.
pub fn go_module_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("controlplane")
}

/// Paths of the binaries of one pinned release.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// Directory holding the binaries.
    pub dir: PathBuf,
    /// The Kubernetes version, e.g. `v1.36.3`.
    pub kubernetes_version: String,
    /// The etcd version, e.g. `v3.6.8`.
    pub etcd_version: String,
    /// How long this call spent building (zero when the cache was warm).
    pub build_time: Duration,
    /// How long the first build of this cache entry took, as recorded then.
    pub first_build_time: Option<Duration>,
}

impl Binaries {
    /// `etcd`.
    pub fn etcd(&self) -> PathBuf {
        self.dir.join("etcd")
    }
    /// `kube-apiserver`.
    pub fn kube_apiserver(&self) -> PathBuf {
        self.dir.join("kube-apiserver")
    }
    /// `kube-controller-manager`.
    pub fn kube_controller_manager(&self) -> PathBuf {
        self.dir.join("kube-controller-manager")
    }
    /// `kube-proxy`.
    pub fn kube_proxy(&self) -> PathBuf {
        self.dir.join("kube-proxy")
    }

    /// Returns the cached binaries, building them first if needed.
    ///
    /// The cache lives in `$TANDEM_TESTENV_CACHE`, else
    /// `$XDG_CACHE_HOME/tandem/controlplane`, else `~/.cache/tandem/controlplane`,
    /// in a folder named after the versions and a fingerprint of go.sum, so a
    /// changed pin never reuses stale binaries. A file lock serialises
    /// concurrent builders (parallel test binaries).
    pub fn ensure() -> Result<Self> {
        let module = go_module_dir();
        let go_mod = std::fs::read_to_string(module.join("go.mod"))
            .with_context(|| format!("read {}", module.join("go.mod").display()))?;
        let go_sum = std::fs::read(module.join("go.sum")).context("read go.sum")?;
        let kubernetes_version = required_version(&go_mod, "k8s.io/kubernetes")?;
        let etcd_version = required_version(&go_mod, "go.etcd.io/etcd/server/v3")?;
        let key = format!(
            "{kubernetes_version}-etcd-{etcd_version}-{:08x}",
            fnv1a(&go_sum) as u32
        );
        let dir = cache_root().join(&key);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;

        let mut binaries = Self {
            dir: dir.clone(),
            kubernetes_version,
            etcd_version,
            build_time: Duration::ZERO,
            first_build_time: None,
        };
        let lock = std::fs::File::create(dir.join(".lock"))?;
        lock.lock().context("lock the control-plane cache")?;
        if !binaries.complete() {
            eprintln!(
                "testenv: building kube-apiserver, kube-controller-manager, kube-proxy and etcd {} from Go modules into {} (first run only; takes several minutes on 2 cores)",
                binaries.kubernetes_version,
                dir.display()
            );
            let start = Instant::now();
            let status = std::process::Command::new("bash")
                .arg(module.join("build.sh"))
                .arg(&dir)
                .status()
                .context("run testenv/controlplane/build.sh (is Go installed?)")?;
            if !status.success() {
                bail!("building the control plane failed ({status}); see the output above");
            }
            binaries.build_time = start.elapsed();
            std::fs::write(
                dir.join("BUILD_SECONDS"),
                format!("{}", binaries.build_time.as_secs()),
            )?;
        }
        binaries.first_build_time = std::fs::read_to_string(dir.join("BUILD_SECONDS"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .map(Duration::from_secs);
        drop(lock);
        if !binaries.complete() {
            bail!("the build finished but {} is incomplete", dir.display());
        }
        Ok(binaries)
    }

    fn complete(&self) -> bool {
        self.dir.join("VERSION").exists()
            && [
                self.etcd(),
                self.kube_apiserver(),
                self.kube_controller_manager(),
                self.kube_proxy(),
            ]
            .iter()
            .all(|p| p.exists())
    }
}

fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("TANDEM_TESTENV_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("tandem").join("controlplane")
}

fn required_version(go_mod: &str, module: &str) -> Result<String> {
    go_mod
        .lines()
        .map(str::split_whitespace)
        .find_map(|mut words| {
            let first = words.next()?;
            let first = if first == "require" {
                words.next()?
            } else {
                first
            };
            (first == module).then(|| words.next().map(str::to_string))?
        })
        .with_context(|| format!("go.mod does not require {module}"))
}

/// FNV-1a: a stable fingerprint (std's hashers may change between releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x100000001b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pinned_versions_from_go_mod() {
        let go_mod = "module x\n\nrequire (\n\tgo.etcd.io/etcd/server/v3 v3.6.8 // indirect\n\tk8s.io/kubernetes v1.36.3 // indirect\n)\n\ntool (\n\tgo.etcd.io/etcd/server/v3\n)\n";
        assert_eq!(
            required_version(go_mod, "k8s.io/kubernetes").unwrap(),
            "v1.36.3"
        );
        assert_eq!(
            required_version(go_mod, "go.etcd.io/etcd/server/v3").unwrap(),
            "v3.6.8"
        );
        assert!(required_version(go_mod, "k8s.io/api").is_err());
    }
}
