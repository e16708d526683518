//! The metrics HTTP endpoint: a deliberately small HTTP/1.1 server.
//!
//! - `GET /metrics`: OpenMetrics text (Prometheus scrapes it as is).
//! - `GET /health`: liveness, 200 whenever the process answers; after
//!   "ok", a line per storage fallback in use (no O_DIRECT, no fallocate).
//! - `GET /ready`: 200 once storage, the producer table and the
//!   coordinators' logs are recovered and every listener is bound (the
//!   `ready` flag), 503 before; transactions the last run left open may
//!   still be ending then (`Server::start`).
//!
//! One request per connection (`Connection: close`), headers bounded, one
//! deadline for the whole exchange, a bounded number of connections served
//! at once: a stuck or hostile scraper costs a few KiB and a timeout, never
//! the broker's memory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::net::{TcpListener, TcpStream};

use super::Metrics;

pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
const CONTENT_TYPE_TEXT: &str = "text/plain; charset=utf-8";
/// Headers a request may carry; scrapers send fewer than ten.
const HEADERS_MAX: usize = 32;
/// Input read and discarded after refusing a request, before closing.
const DRAIN_BYTES_MAX: usize = 64 * 1024;
/// Pause after a failed accept (EMFILE, ENFILE): retrying at once would
/// spin a core while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Bounds of the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Request line and headers; larger requests get 431.
    pub header_bytes_max: usize,
    /// Deadline for reading the request and writing the response.
    pub request_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub connections_max: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_bytes_max: 8 * 1024,
            request_timeout: Duration::from_secs(5),
            connections_max: 8,
        }
    }
}

/// Serves `/metrics`, `/health` and `/ready` on `listener` until the future
/// is dropped. Connection tasks run on smol's global executor.
pub async fn serve_http(listener: TcpListener, metrics: Arc<Metrics>, ready: Arc<AtomicBool>) {
    serve_http_with(listener, metrics, ready, HttpLimits::default()).await;
}

/// [`serve_http`] with explicit limits (tests use short timeouts).
pub async fn serve_http_with(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    limits: HttpLimits,
) {
    let slots = Arc::new(smol::lock::Semaphore::new(limits.connections_max));
    loop {
        let slot = slots.acquire_arc().await;
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                log::warn!("metrics endpoint: accept failed: {e}");
                smol::Timer::after(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let metrics = Arc::clone(&metrics);
        let ready = Arc::clone(&ready);
        smol::spawn(async move {
            let exchange = handle(stream, &metrics, &ready, limits);
            let deadline = async {
                smol::Timer::after(limits.request_timeout).await;
                Ok(())
            };
            // On timeout the exchange future is dropped, closing the socket.
            if let Err(e) = smol::future::or(exchange, deadline).await {
                log::debug!("metrics endpoint: {e}");
            }
            drop(slot);
        })
        .detach();
    }
}

/// What a request resolves to, before rendering.
struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    body: String,
}

impl Response {
    fn text(status: u16, reason: &'static str, body: &str) -> Response {
        Response {
            status,
            reason,
            content_type: CONTENT_TYPE_TEXT,
            body: body.to_string(),
        }
    }
}

/// Reads one request, answers it, closes.
async fn handle(
    mut stream: TcpStream,
    metrics: &Metrics,
    ready: &AtomicBool,
    limits: HttpLimits,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; limits.header_bytes_max];
    let mut filled = 0;
    // `unread`: the request was refused before its end, so the client may
    // still be sending; see the drain below.
    let (response, head_only, unread) = loop {
        if filled == buf.len() {
            break (
                Response::text(
                    431,
                    "Request Header Fields Too Large",
                    "headers too large\n",
                ),
                false,
                true,
            );
        }
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            // Closed before a whole request: nothing to answer.
            return Ok(());
        }
        filled += n;
        let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf[..filled]) {
            Ok(httparse::Status::Partial) => continue,
            Ok(httparse::Status::Complete(_)) => {
                let method = request.method.unwrap_or("");
                let path = request.path.unwrap_or("");
                break (route(method, path, metrics, ready), method == "HEAD", false);
            }
            Err(httparse::Error::TooManyHeaders) => {
                break (
                    Response::text(431, "Request Header Fields Too Large", "too many headers\n"),
                    false,
                    true,
                )
            }
            Err(_) => {
                break (
                    Response::text(400, "Bad Request", "bad request\n"),
                    false,
                    true,
                )
            }
        }
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        response.status,
        response.reason,
        response.content_type,
        response.body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if !head_only {
        stream.write_all(response.body.as_bytes()).await?;
    }
    stream.flush().await?;
    stream.shutdown(std::net::Shutdown::Write)?;
    if unread {
        // Closing a socket with unread input makes the kernel send a reset,
        // which can destroy the response before the client reads it. Read
        // (and discard) what the client still sends, up to a bound; the
        // exchange deadline covers a client that never stops.
        let mut drained = 0;
        let mut sink = [0u8; 1024];
        while drained < DRAIN_BYTES_MAX {
            match stream.read(&mut sink).await? {
                0 => break,
                n => drained += n,
            }
        }
    }
    Ok(())
}

fn route(method: &str, target: &str, metrics: &Metrics, ready: &AtomicBool) -> Response {
    if method != "GET" && method != "HEAD" {
        return Response::text(405, "Method Not Allowed", "only GET and HEAD\n");
    }
    // Scrapers may add a query string (`/metrics?name[]=...`); ignore it.
    let path = target.split('?').next().unwrap_or(target);
    match path {
        "/metrics" => Response {
            status: 200,
            reason: "OK",
            content_type: CONTENT_TYPE_OPENMETRICS,
            body: metrics.encode(),
        },
        "/health" => Response::text(200, "OK", &metrics.health_text()),
        "/ready" if ready.load(Ordering::Acquire) => Response::text(200, "OK", "ready\n"),
        "/ready" => Response::text(503, "Service Unavailable", "not ready\n"),
        _ => Response::text(
            404,
            "Not Found",
            "not found: try /metrics, /health, /ready\n",
        ),
    }
}
