//! The HTTP server under the ingest and admin ports, for clients that may be hostile:
//! a bounded number of connections (beyond it, a new connection gets `503` with
//! `Retry-After` and is closed at once, before it holds anything), a deadline for a
//! request's headers that is also the idle timeout of a kept-alive connection (a
//! connection trickling its headers, or opened and left idle, is closed). HTTP/1.1
//! only, as before (the SDKs that post events use it). Request bodies have their own
//! deadline where a handler reads them (see `ingest::read_body`).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1::Builder;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// How an HTTP server bounds what its clients may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// Longest a client may take to send a request's headers, and longest a
    /// kept-alive connection may stay idle between requests.
    pub header_timeout: Duration,
}

/// The whole answer to a connection over the limit: written without waiting (the
/// socket's buffer takes it), then the connection is closed.
const SHED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-length: 91\r\n\
\r\n\
{\"error\":{\"code\":\"too_many_connections\",\"message\":\"the server is at its connection limit\"}}";

/// After a failed `accept` (out of file descriptors, most often), how long the server
/// waits before it accepts again: the connections it holds must close first.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `router` on `listener` until `shutdown` completes, then stops accepting
/// and waits for the open connections to finish their requests (the caller bounds
/// how long). `name` says which server it is in logs and metrics.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(server = name, error = %e, "cannot accept a connection; retrying shortly");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            crate::metrics::HTTP_CONNECTIONS_SHED
                .with_label_values(&[name])
                .inc();
            // Best effort and without waiting: a client that does not read gets nothing.
            let _ = stream.try_write(SHED);
            debug!(server = name, %peer, "connection refused: at the connection limit");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        let open = crate::metrics::HTTP_CONNECTIONS.with_label_values(&[name]);
        open.inc();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(server = name, %peer, error = %e, "connection ended with an error");
            }
            open.dec();
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Raises this process's soft limit on open files to `wanted` (connections, plus what
/// Kafka, ClickHouse and Redis clients hold), as far as the hard limit allows, and
/// returns the limit in force: a server at its connection limit must still be able
/// to open the sockets it needs for its own work.
pub fn raise_open_files_limit(wanted: libc::rlim_t) -> std::io::Result<libc::rlim_t> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur >= wanted {
        return Ok(lim.rlim_cur);
    }
    let raised = libc::rlimit {
        rlim_cur: wanted.min(lim.rlim_max),
        rlim_max: lim.rlim_max,
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(raised.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shed_answer_is_one_whole_http_response() {
        let text = std::str::from_utf8(SHED).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(length, body.len());
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"]["code"], "too_many_connections");
    }
}
