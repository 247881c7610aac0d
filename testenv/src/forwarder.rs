//! A TCP forwarder to the API server that a test can cut (every connection
//! closed, new ones refused) and restore on the same address: a network
//! partition of one client, without touching the others.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::controlplane::ControlPlane;

/// A forwarder on loopback to the API server.
pub struct Forwarder {
    /// Where clients connect.
    pub address: SocketAddr,
    upstream: SocketAddr,
    host: String,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Forwarder {
    /// A forwarder to `control_plane`'s API server.
    pub async fn to_api_server(control_plane: &ControlPlane) -> Self {
        let authority = control_plane
            .server
            .trim_start_matches("https://")
            .to_string();
        let upstream: SocketAddr = authority.parse().expect("the API server's ip:port");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a forwarder");
        let mut forwarder = Forwarder {
            address: listener.local_addr().expect("the forwarder's address"),
            upstream,
            host: upstream.ip().to_string(),
            task: None,
        };
        forwarder.serve(listener);
        forwarder
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let upstream = self.upstream;
        self.task = Some(tokio::spawn(async move {
            // Dropped with this task: every forwarded connection ends too.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                connections.spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        }));
    }

    /// A copy of `kubeconfig` (at `out`) that goes through the forwarder
    /// (TLS still checks the API server's own name).
    pub fn kubeconfig(&self, kubeconfig: &Path, out: &Path) -> PathBuf {
        let text = std::fs::read_to_string(kubeconfig).expect("read the kubeconfig");
        let server = format!("server: https://{}", self.upstream);
        assert!(text.contains(&server), "{text}");
        let text = text.replace(
            &server,
            &format!(
                "server: https://{}\n    tls-server-name: {}",
                self.address, self.host
            ),
        );
        std::fs::write(out, text).expect("write the kubeconfig");
        out.to_path_buf()
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Forwards again, on the same address.
    pub async fn restore(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(self.address).await {
                Ok(listener) => break listener,
                Err(error) if std::time::Instant::now() < deadline => {
                    tracing::debug!(%error, "the forwarder's address is not free yet");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => panic!("rebind {}: {error}", self.address),
            }
        };
        self.serve(listener);
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.cut();
    }
}
