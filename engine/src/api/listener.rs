//! The HTTP listener: every connection is timed out and counted. A client gets a bounded
//! time to send its request headers (and an idle keep-alive connection the same to send
//! its next request), a bounded time for a body, a bounded time to take each part of an
//! answer, and past the connection cap a new connection gets a clear 503 and is closed
//! instead of starving the ones being served.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::telemetry;

/// What one connection may take.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// To send a request's headers, and for an idle keep-alive connection to start its
    /// next request; past it the connection is closed.
    pub header_timeout: Duration,
    /// To send a whole request body (see `BoundedBytes`): 408 past it.
    pub body_timeout: Duration,
    /// For a write of the answer (or of a WebSocket frame) to make progress: a client
    /// that stops reading is disconnected past it.
    pub write_timeout: Duration,
    /// Open connections at most; one more is answered 503 and closed.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            max_connections: 4096,
        }
    }
}

/// File descriptors kept back from the connection cap for the engine's own files.
const FDS_RESERVED: u64 = 256;
/// How long the server waits for requests in flight once asked to stop.
const DRAIN: Duration = Duration::from_secs(10);
const REFUSAL: &str = "{\"error\":\"too many connections\",\"detail\":{\"message\":\"the engine is at its connection \
    cap (--max-connections); retry shortly\"}}";

/// Raises the soft limit on open files to the hard limit (where allowed), and returns the
/// connection cap that fits under it beside `ws_clients` WebSockets (an upgraded socket
/// leaves the cap's count, not the file table).
pub fn fit_connection_cap(wanted: usize, ws_clients: usize) -> usize {
    let fds = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit; the cap fits the current one");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    };
    let fits = fds.saturating_sub(FDS_RESERVED + ws_clients as u64).max(16) as usize;
    if fits < wanted {
        tracing::warn!(open_files = fds, cap = fits, wanted, "the open-file limit lowers the connection cap");
    }
    wanted.min(fits)
}

/// Serves `app` on `listener` until `shutdown` completes, then lets requests in flight
/// finish for up to [`DRAIN`].
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    // HTTP/1.1 only, so the header timer runs from the first byte a connection owes us
    // (an auto-detecting server waits for a protocol preface with no timer) and the Host
    // check always has a Host header to read.
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // hyper's default (about 400 KB) times thousands of connections is too much memory.
        .max_buf_size(64 << 10);
    let slots = Arc::new(Semaphore::new(limits.max_connections.min(Semaphore::MAX_PERMITS)));
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let open = metrics::gauge!(telemetry::HTTP_CONNECTIONS);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, most likely: say so, and give the
                    // connections being served a moment to finish.
                    metrics::counter!(telemetry::CONNECTIONS_REFUSED, "reason" => "accept_failed").increment(1);
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!(telemetry::CONNECTIONS_REFUSED, "reason" => "cap").increment(1);
            tokio::spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        // Handlers that need the peer (the webhook's refusal budget) read it as ConnectInfo.
        let service = TowerToHyperService::new(app.clone().map_request(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            req
        }));
        let stream = WriteTimeout::new(stream, limits.write_timeout);
        let connection = builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
        let (open, mut stopping) = (open.clone(), stopping.clone());
        open.increment(1.0);
        tokio::spawn(async move {
            tokio::pin!(connection);
            // Errors here are clients that went away or timed out: nothing to report.
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stopping.changed() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            open.decrement(1.0);
            drop(slot);
        });
    }
    drop(listener);
    let _ = stop.send(true);
    // Every connection gives its slot back when it ends: all slots back, all done.
    let all = u32::try_from(limits.max_connections.min(Semaphore::MAX_PERMITS)).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN, slots.acquire_many(all)).await.is_err() {
        tracing::warn!("requests still in flight after {DRAIN:?}; stopping anyway");
    }
    Ok(())
}

/// A stream whose writes fail once one has made no progress for `limit`: the peer's
/// window stayed shut (it stopped reading), so its connection is freed instead of held
/// while its answer waits. Reads, and a connection with nothing to send, are untouched.
struct WriteTimeout<S> {
    inner: S,
    limit: Duration,
    /// Running while a write is blocked; reset by any progress.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteTimeout<S> {
    fn new(inner: S, limit: Duration) -> Self {
        Self { inner, limit, stalled: None }
    }

    /// After the inner stream said Pending: Pending until the limit, then an error.
    fn blocked<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = self.limit;
        let timer = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client took nothing for {limit:?} (--write-timeout-secs)"),
            ))),
        }
    }

    fn progressed<T>(&mut self, result: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match result {
            Poll::Pending => self.blocked(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteTimeout<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.progressed(result, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.progressed(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        this.progressed(result, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.progressed(result, cx)
    }
}

/// The answer past the cap: a complete 503 the client can read, then the connection closes.
async fn refuse(mut stream: tokio::net::TcpStream) {
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{REFUSAL}",
        REFUSAL.len()
    );
    let write = async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}
