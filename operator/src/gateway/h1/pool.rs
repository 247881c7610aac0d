//! Keep-alive connections to upstream endpoints, one pool per serving
//! thread (so a connection is only ever used by the thread that made it).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use tokio::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::net::TcpStream;

use crate::gateway::table::FastMap;

/// Idle connections kept per endpoint and thread, at most. As many as a
/// thread's busiest moment needed (a cap of 256 made 1,000 concurrent
/// clients open and close an upstream connection every twentieth request).
const MAX_IDLE_PER_ENDPOINT: usize = 1024;
/// A kept connection's read buffer is given back above this size (one
/// huge response must not pin its buffer for the connection's life; the
/// 64 KiB a body is read with stay).
const MAX_IDLE_BUFFER: usize = 80 * 1024;
/// An idle connection unused this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// One connection to an upstream endpoint, with its read buffer.
pub struct Upstream {
    /// The connection.
    pub stream: TcpStream,
    /// Bytes read from it and not yet used.
    pub buf: BytesMut,
    idle_since: Instant,
}

impl Upstream {
    /// Whether an idle connection can carry another request: the upstream
    /// has neither closed it nor sent anything unasked. Asks the kernel only
    /// when the runtime has seen the socket become readable.
    fn usable(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => matches!(
                self.stream.try_read(&mut [0u8; 1]),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock
            ),
        }
    }
}

/// Idle upstream connections by endpoint.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<FastMap<SocketAddr, Vec<Upstream>>>,
}

impl Pool {
    /// The most recently used idle connection to `endpoint` that is still
    /// usable, if any.
    pub fn checkout(&self, endpoint: SocketAddr) -> Option<Upstream> {
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.get_mut(&endpoint)?;
        while let Some(upstream) = list.pop() {
            if upstream.usable() && upstream.idle_since.elapsed() < IDLE_TIMEOUT {
                return Some(upstream);
            }
        }
        None
    }

    /// Keeps a connection whose last exchange ended cleanly.
    pub fn checkin(&self, endpoint: SocketAddr, mut upstream: Upstream) {
        upstream.idle_since = Instant::now();
        if upstream.buf.capacity() > MAX_IDLE_BUFFER {
            upstream.buf = BytesMut::with_capacity(8 * 1024);
        }
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.entry(endpoint).or_default();
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push(upstream);
        }
    }

    /// Closes connections idle longer than [`IDLE_TIMEOUT`].
    pub fn sweep(&self) {
        let mut idle = self.idle.lock().expect("pool lock");
        idle.retain(|_, list| {
            list.retain(|u| u.idle_since.elapsed() < IDLE_TIMEOUT);
            !list.is_empty()
        });
    }

    /// Closes the connections to endpoints not in `live`.
    pub fn retain(&self, live: &HashSet<SocketAddr>) {
        self.idle
            .lock()
            .expect("pool lock")
            .retain(|endpoint, _| live.contains(endpoint));
    }

    /// Connections kept now (all endpoints).
    pub fn idle_count(&self) -> usize {
        self.idle
            .lock()
            .expect("pool lock")
            .values()
            .map(Vec::len)
            .sum()
    }
}

/// A new connection to `endpoint`, within `timeout`.
pub async fn connect(endpoint: SocketAddr, timeout: Duration) -> std::io::Result<Upstream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(endpoint))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(Upstream {
        stream,
        buf: BytesMut::with_capacity(8 * 1024),
        idle_since: Instant::now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_connection_the_upstream_closed_or_wrote_to_is_not_reused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = Pool::default();
        let mut accepted = Vec::new();
        for _ in 0..3 {
            pool.checkin(addr, connect(addr, Duration::from_secs(1)).await.unwrap());
            accepted.push(listener.accept().await.unwrap().0);
        }
        assert_eq!(pool.idle_count(), 3);
        // The newest is closed by the server, the middle one gets bytes nobody asked for.
        drop(accepted.pop());
        accepted[1]
            .write_all(b"HTTP/1.1 408\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Let the runtime see the readiness events.
        tokio::task::yield_now().await;
        let kept = pool.checkout(addr).expect("the oldest is still fine");
        assert_eq!(
            pool.idle_count(),
            0,
            "the two bad ones were dropped on the way"
        );
        assert!(kept.usable());
    }
}
