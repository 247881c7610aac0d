//! Child processes that never outlive the process that started them.
//!
//! Every child is started through `setpriv --pdeathsig KILL`, so the kernel
//! kills it when its parent goes away, even on a panic, SIGKILL or Ctrl-C.
//! Linux ties the parent-death signal to the *thread* that forked, not the
//! process: a child forked from a test thread or a tokio blocking thread would
//! be killed when that thread ends. All forks therefore happen on one
//! dedicated supervisor thread that lives as long as the process, which also
//! reaps the children and publishes their exit status.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::watch;

/// What to run: a program, its arguments, environment and log file.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// Program to execute (a path or a name on PATH).
    pub program: String,
    /// Arguments after the program.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// File that receives both stdout and stderr (appended).
    pub log: std::path::PathBuf,
    /// Network namespace to run in, if any (via `ip netns exec`).
    pub netns: Option<String>,
}

impl ProcessSpec {
    /// A spec for `program` with arguments, logging to `log`.
    pub fn new(program: impl Into<String>, args: &[&str], log: &Path) -> Self {
        Self {
            program: program.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: Vec::new(),
            log: log.to_path_buf(),
            netns: None,
        }
    }
}

/// A running (or finished) child process.
#[derive(Debug, Clone)]
pub struct ChildProcess {
    pid: u32,
    name: String,
    exit: watch::Receiver<Option<ExitStatus>>,
}

impl ChildProcess {
    /// The operating-system process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit status, once the process has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// Whether the process is still running.
    pub fn is_running(&self) -> bool {
        self.exit_status().is_none()
    }

    /// Sends `signal` unless the process has already been reaped.
    pub fn signal(&self, signal: Signal) {
        if self.is_running() {
            // The supervisor reaps only after this check could race, but pids
            // are not reused while the zombie is unreaped, and we reap on the
            // supervisor thread after publishing, so at worst the signal is lost.
            let _ = kill(Pid::from_raw(self.pid as i32), signal);
        }
    }

    /// Waits until the process exits.
    pub async fn wait(&self) -> ExitStatus {
        let mut exit = self.exit.clone();
        loop {
            if let Some(status) = *exit.borrow_and_update() {
                return status;
            }
            if exit.changed().await.is_err() {
                // The supervisor never drops senders of live children.
                return (*exit.borrow()).expect("supervisor gone while child running");
            }
        }
    }

    /// SIGTERM, then SIGKILL after `grace` if it is still running.
    pub async fn terminate(&self, grace: Duration) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        match tokio::time::timeout(grace, self.wait()).await {
            Ok(status) => status,
            Err(_) => {
                tracing::warn!(name = %self.name, pid = self.pid, "did not stop within {grace:?}; killing");
                self.signal(Signal::SIGKILL);
                self.wait().await
            }
        }
    }

    /// Blocking SIGTERM-then-SIGKILL, for `Drop` implementations.
    pub fn terminate_blocking(&self, grace: Duration) {
        self.signal(Signal::SIGTERM);
        let deadline = std::time::Instant::now() + grace;
        while self.is_running() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.is_running() {
            self.signal(Signal::SIGKILL);
            while self.is_running() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

struct SpawnRequest {
    spec: ProcessSpec,
    reply: mpsc::Sender<Result<ChildProcess>>,
}

struct Supervisor {
    requests: mpsc::Sender<SpawnRequest>,
}

fn supervisor() -> &'static std::sync::Mutex<Supervisor> {
    static SUPERVISOR: OnceLock<std::sync::Mutex<Supervisor>> = OnceLock::new();
    SUPERVISOR.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("testenv-supervisor".into())
            .spawn(move || supervise(rx))
            .expect("start supervisor thread");
        std::sync::Mutex::new(Supervisor { requests: tx })
    })
}

fn supervise(requests: mpsc::Receiver<SpawnRequest>) {
    let mut children: HashMap<u32, (std::process::Child, watch::Sender<Option<ExitStatus>>)> =
        HashMap::new();
    loop {
        match requests.recv_timeout(Duration::from_millis(10)) {
            Ok(request) => {
                let result = start(&request.spec).map(|child| {
                    let pid = child.id();
                    let (tx, rx) = watch::channel(None);
                    children.insert(pid, (child, tx));
                    ChildProcess {
                        pid,
                        name: request.spec.program.clone(),
                        exit: rx,
                    }
                });
                let _ = request.reply.send(result);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Never happens: the sender lives in a static.
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        children.retain(|_, (child, status)| match child.try_wait() {
            Ok(Some(exit)) => {
                status.send_replace(Some(exit));
                false
            }
            Ok(None) => true,
            Err(_) => true,
        });
    }
}

fn start(spec: &ProcessSpec) -> Result<std::process::Child> {
    let log = File::options()
        .create(true)
        .append(true)
        .open(&spec.log)
        .with_context(|| format!("open log {}", spec.log.display()))?;
    let mut command = Command::new("setpriv");
    command.args(["--pdeathsig", "KILL", "--"]);
    if let Some(netns) = &spec.netns {
        command.args(["ip", "netns", "exec", netns]);
    }
    command
        .arg(&spec.program)
        .args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    command
        .spawn()
        .with_context(|| format!("start {} (via setpriv)", spec.program))
}

/// Starts a child process on the supervisor thread.
pub fn spawn(spec: ProcessSpec) -> Result<ChildProcess> {
    let (reply, response) = mpsc::channel();
    let name = spec.program.clone();
    supervisor()
        .lock()
        .map_err(|_| anyhow!("supervisor lock poisoned"))?
        .requests
        .send(SpawnRequest { spec, reply })
        .map_err(|_| anyhow!("supervisor thread is gone"))?;
    response
        .recv()
        .map_err(|_| anyhow!("supervisor dropped the request for {name}"))?
}

/// Peak resident memory (VmHWM) of a process in bytes, if it is still running.
pub fn peak_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
}

/// CPU time (user and system) a process has used so far, if it is still
/// running.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces, inside parens):
    // state is field 3, utime 14 and stime 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100);
    Some(ticks as f64 / hz as f64)
}

/// Runs a short command to completion and fails with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    if !output.status.success() {
        return Err(anyhow!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
