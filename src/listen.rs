//! Accepted connections, bounded: every listener caps how many connections
//! it holds, closes a connection that has been silent too long, and backs
//! off when accepting fails (at the descriptor limit) instead of spinning.
//!
//! What a peer can make keyward hold is bounded here per listener: at most
//! `max_connections` sockets (one more is accepted and closed at once, so a
//! client learns it in a round trip instead of waiting in the kernel's
//! backlog), none kept longer than `idle_timeout` without a byte from the
//! peer or a write that makes progress. HTTP/2's own bounds (streams per
//! connection) are set where the servers are built.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_io_timeout::TimeoutStream;
use tonic::transport::server::Connected;

/// How long an idle connection waits before TCP keepalive probes start: a
/// peer that vanished (a pod deleted without FIN) is noticed in minutes,
/// not hours.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// First and longest pause after a failed accept (EMFILE and the like):
/// the error persists until a descriptor frees, so retrying at once only
/// burns a core.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Repeated warnings of one kind are logged at most this often, with the
/// number suppressed in between.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The limits every listener applies to its connections.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Most connections open at once.
    pub max_connections: usize,
    /// A connection with no byte read for this long (or a write stuck this
    /// long) is closed.
    pub idle_timeout: Duration,
}

/// What a listener reports: connections open, refused at the cap, and
/// failed accepts.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// Connections open now.
    pub open: Gauge,
    /// Connections closed at once because the listener was at its cap.
    pub refused: Counter,
    /// Accepts that failed (e.g. out of file descriptors).
    pub accept_errors: Counter,
}

/// A socket a listener can accept.
pub trait Accept: Send + Unpin + 'static {
    /// The accepted connection.
    type Io: AsyncRead + AsyncWrite + Connected + Send + Unpin + 'static;
    /// Polls for the next connection.
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<Self::Io>>;
}

impl Accept for TcpListener {
    type Io = TcpStream;

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<TcpStream>> {
        let (stream, _) = ready!(TcpListener::poll_accept(self, cx))?;
        // Without no-delay, Nagle's algorithm holds back the small HTTP/2
        // frames of each reply until the peer's delayed ACK (one channel
        // topped out at a fifth of its rate). Failing to set an option
        // leaves a working, slower socket: not a reason to refuse it.
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        Poll::Ready(Ok(stream))
    }
}

impl Accept for UnixListener {
    type Io = UnixStream;

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<UnixStream>> {
        let (stream, _) = ready!(UnixListener::poll_accept(self, cx))?;
        Poll::Ready(Ok(stream))
    }
}

/// The connections of one listener, within its [`Bounds`]. A stream that
/// never yields an error: failed accepts are counted, logged (throttled)
/// and retried after a pause.
#[derive(Debug)]
pub struct Incoming<L> {
    listener: L,
    name: &'static str,
    bounds: Bounds,
    slots: Arc<Semaphore>,
    counters: Counters,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    next_pause: Duration,
    refused_warning: Throttle,
    error_warning: Throttle,
}

impl<L: Accept> Incoming<L> {
    /// Bounds `listener`'s connections; `name` labels its log lines.
    #[must_use]
    pub fn new(listener: L, name: &'static str, bounds: Bounds, counters: Counters) -> Self {
        Self {
            listener,
            name,
            bounds,
            slots: Arc::new(Semaphore::new(bounds.max_connections)),
            counters,
            pause: None,
            next_pause: BACKOFF_MIN,
            refused_warning: Throttle::default(),
            error_warning: Throttle::default(),
        }
    }

    /// The listener, e.g. for its address.
    #[must_use]
    pub fn get_ref(&self) -> &L {
        &self.listener
    }
}

impl<L: Accept> tokio_stream::Stream for Incoming<L> {
    type Item = std::io::Result<Conn<L::Io>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(pause) = &mut this.pause {
                ready!(pause.as_mut().poll(cx));
                this.pause = None;
            }
            match ready!(this.listener.poll_accept(cx)) {
                Ok(io) => {
                    this.next_pause = BACKOFF_MIN;
                    if let Ok(permit) = Arc::clone(&this.slots).try_acquire_owned() {
                        return Poll::Ready(Some(Ok(Conn::new(
                            io,
                            Slot::new(permit, this.counters.open.clone()),
                            this.bounds.idle_timeout,
                        ))));
                    }
                    this.counters.refused.inc();
                    if let Some(suppressed) = this.refused_warning.ready() {
                        tracing::warn!(
                            listener = this.name,
                            max_connections = this.bounds.max_connections,
                            suppressed,
                            "at the connection cap: new connections are closed until one ends"
                        );
                    }
                }
                // The peer gave up before we took it: nothing to wait for.
                Err(error) if is_per_connection(&error) => {}
                Err(error) => {
                    this.counters.accept_errors.inc();
                    if let Some(suppressed) = this.error_warning.ready() {
                        tracing::warn!(
                            listener = this.name,
                            %error,
                            suppressed,
                            "accepting a connection failed; pausing before the next attempt"
                        );
                    }
                    this.pause = Some(Box::pin(tokio::time::sleep(this.next_pause)));
                    this.next_pause = (this.next_pause * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

fn is_per_connection(error: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        error.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::Interrupted
    )
}

/// A place under a listener's cap, given back when the connection closes.
#[derive(Debug)]
struct Slot {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, open: Gauge) -> Self {
        open.inc();
        Self {
            _permit: permit,
            open,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// An accepted connection: reads fail with `TimedOut` once nothing has
/// arrived for the idle timeout (writes once one has made no progress for
/// it), which closes the connection; its slot frees when it is dropped.
#[derive(Debug)]
pub struct Conn<IO> {
    io: Pin<Box<TimeoutStream<IO>>>,
    _slot: Slot,
}

impl<IO: AsyncRead + AsyncWrite> Conn<IO> {
    fn new(io: IO, slot: Slot, idle: Duration) -> Self {
        let mut io = TimeoutStream::new(io);
        io.set_read_timeout(Some(idle));
        io.set_write_timeout(Some(idle));
        Self {
            io: Box::pin(io),
            _slot: slot,
        }
    }

    /// The socket.
    #[must_use]
    pub fn get_ref(&self) -> &IO {
        self.io.get_ref()
    }
}

impl<IO: Connected + AsyncRead + AsyncWrite> Connected for Conn<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.get_ref().connect_info()
    }
}

impl<IO: AsyncRead + AsyncWrite> AsyncRead for Conn<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.io.as_mut().poll_read(cx, buf)
    }
}

impl<IO: AsyncRead + AsyncWrite> AsyncWrite for Conn<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.io.as_mut().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.io.as_mut().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.io.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.io.as_mut().poll_shutdown(cx)
    }
}

/// Lets one line of a kind through every [`WARN_EVERY`], and says how many
/// were held back meanwhile: a condition that repeats thousands of times a
/// second (a full descriptor table) must not become a log flood.
#[derive(Debug, Default)]
pub struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// `Some(suppressed since the last line)` when a line may be logged now.
    pub fn ready(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < WARN_EVERY)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::Throttle;

    #[test]
    fn a_throttle_lets_one_line_through_and_counts_the_rest() {
        let mut throttle = Throttle::default();
        assert_eq!(throttle.ready(), Some(0));
        for _ in 0..1000 {
            assert_eq!(throttle.ready(), None);
        }
        throttle.last = throttle
            .last
            .and_then(|last| last.checked_sub(super::WARN_EVERY * 2));
        assert_eq!(throttle.ready(), Some(1000));
    }
}
