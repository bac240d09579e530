//! Serving `/metrics` and `/healthz` under a `--web.config.file`: TLS per
//! connection, basic authentication per request, the configured response
//! headers on every response, and the file re-read when it changes or on
//! SIGHUP.
//!
//! Every path is protected, `/healthz` included, as the exporter-toolkit does:
//! with client certificates required the handshake itself refuses a client
//! before any path is known, and an unauthenticated health endpoint on the same
//! port would be the one thing an operator forgot to firewall.

use std::{
    collections::HashSet,
    future::Future,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use axum::{Router, body::Body};
use base64::Engine as _;
use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::{net::TcpListener, signal::unix::Signal};
use tokio_rustls::TlsAcceptor;

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::config::{WebConfigError, WebSettings};
use crate::telemetry::ResultLabels;

/// `fleetsnitch_web_config_*`: how re-reads of `--web.config.file` went.
#[derive(Debug, Clone, Default)]
pub struct WebConfigMetrics {
    reloads: Family<ResultLabels, Counter>,
    last_reload_successful: Gauge,
}

impl WebConfigMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "web_config_reloads",
            "Re-reads of --web.config.file by result (success, failure: old settings kept)",
            metrics.reloads.clone(),
        );
        registry.register(
            "web_config_last_reload_successful",
            "Whether the last re-read of --web.config.file was accepted (1) or rejected (0); \
             1 without a web configuration",
            metrics.last_reload_successful.clone(),
        );
        // Without --web.config.file nothing was rejected: 1, as Prometheus and
        // Alertmanager report `*_config_last_reload_successful` 1 once their
        // configuration is loaded. The usual alert (`== 0`) must mean "a
        // rejected file is being ignored", never "no file was given".
        metrics.last_reload_successful.set(1);
        metrics
    }
}

/// How often the file's modification time is looked at.
const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Successful bcrypt verifications remembered; past this the cache starts over.
const AUTH_CACHE_ENTRIES: usize = 1024;

/// The web configuration in force and where it came from.
pub struct WebState {
    path: PathBuf,
    settings: RwLock<Arc<WebSettings>>,
    /// Bumped at every successful reload: connections opened under older
    /// settings are closed after their current request.
    generation: AtomicU64,
    /// Digests of (user, password, hash) that bcrypt accepted. bcrypt costs tens
    /// of milliseconds by design; a scrape every few seconds should not.
    verified: Mutex<HashSet<[u8; 32]>>,
    metrics: WebConfigMetrics,
}

impl WebState {
    /// Loads `path`; an invalid file is an error (the agent does not start).
    pub fn load(path: &Path) -> Result<WebSettings, WebConfigError> {
        let settings = WebSettings::load(path)?;
        tracing::info!(path = %path.display(), ?settings, "web configuration loaded");
        Ok(settings)
    }

    /// The state serving `settings`, read from `path` by [`Self::load`].
    pub fn new(path: &Path, settings: WebSettings, metrics: WebConfigMetrics) -> Arc<Self> {
        metrics.last_reload_successful.set(1);
        Arc::new(Self {
            path: path.to_owned(),
            settings: RwLock::new(Arc::new(settings)),
            generation: AtomicU64::new(0),
            verified: Mutex::new(HashSet::new()),
            metrics,
        })
    }

    fn current(&self) -> Arc<WebSettings> {
        self.settings
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Re-reads the file; on error the settings in force stay and the
    /// rejection is logged and counted.
    pub fn reload(&self) -> bool {
        let result = WebSettings::load(&self.path).and_then(|settings| {
            // An empty file is valid (plain HTTP, no authentication), and it is
            // also what a file caught half-written looks like: turning every
            // protection off takes a restart, never a reload.
            if settings.tls.is_none() && settings.users.is_empty() {
                let current = self.current();
                if current.tls.is_some() || !current.users.is_empty() {
                    return Err(WebConfigError {
                        path: self.path.clone(),
                        message: "neither TLS nor basic_auth_users: turning every protection \
                                  off is refused at reload (an empty or half-written file?); \
                                  restart the agent to serve plain HTTP"
                            .to_owned(),
                    });
                }
            }
            Ok(settings)
        });
        let ok = result.is_ok();
        match result {
            Ok(settings) => {
                tracing::info!(path = %self.path.display(), ?settings, "web configuration reloaded");
                *self
                    .settings
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(settings);
                self.generation.fetch_add(1, Ordering::SeqCst);
            }
            Err(error) => tracing::error!(
                %error,
                "web configuration rejected at reload; the previous settings stay in force"
            ),
        }
        self.metrics
            .reloads
            .get_or_create(&ResultLabels::new(if ok { "success" } else { "failure" }))
            .inc();
        self.metrics.last_reload_successful.set(i64::from(ok));
        ok
    }

    /// Whether `request` carries credentials the settings in force accept.
    async fn authorized(&self, settings: &WebSettings, request: &Request<Incoming>) -> bool {
        if settings.users.is_empty() {
            return true;
        }
        let Some((user, password)) = basic_credentials(request) else {
            return false;
        };
        // An unknown user still costs one bcrypt verification, so response
        // times do not tell which users exist.
        let (known, hash) = match settings.users.get(&user) {
            Some(hash) => (true, hash.clone()),
            None => (
                false,
                settings.users.values().next().cloned().unwrap_or_default(),
            ),
        };
        let digest: [u8; 32] = Sha256::new()
            .chain_update(user.as_bytes())
            .chain_update([0])
            .chain_update(&password)
            .chain_update([0])
            .chain_update(hash.as_bytes())
            .finalize()
            .into();
        if known && self.cache().contains(&digest) {
            return true;
        }
        let verified =
            tokio::task::spawn_blocking(move || bcrypt::verify(&password, &hash).unwrap_or(false))
                .await
                .unwrap_or(false);
        if known && verified {
            let mut cache = self.cache();
            if cache.len() >= AUTH_CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(digest);
        }
        known && verified
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashSet<[u8; 32]>> {
        self.verified
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The user and password of an `Authorization: Basic` header.
fn basic_credentials<B>(request: &Request<B>) -> Option<(String, Vec<u8>)> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let colon = decoded.iter().position(|&byte| byte == b':')?;
    let user = String::from_utf8(decoded[..colon].to_vec()).ok()?;
    Some((user, decoded[colon + 1..].to_vec()))
}

fn unauthorized() -> Response<Body> {
    let mut response = Response::new(Body::from("Unauthorized\n"));
    *response.status_mut() = StatusCode::UNAUTHORIZED;
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"fleetsnitch\", charset=\"UTF-8\""),
    );
    response
}

/// Answers SIGHUP until the process exits: re-reads the web configuration,
/// if there is one (it is also re-read when its modification time, size or
/// inode changes), and says so; without one, logs that there is nothing to
/// reload. The SIGHUP stream (`hangup`) is opened by the caller as early as it
/// can: from then on SIGHUP no longer terminates the process.
pub fn spawn_reloader(state: Option<Arc<WebState>>, mut hangup: Option<Signal>) {
    tokio::spawn(async move {
        let mut seen = state.as_ref().and_then(|state| stamp(&state.path));
        let mut ticker = tokio::time::interval(POLL_INTERVAL);
        loop {
            let hangup_received = async {
                match &mut hangup {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = ticker.tick(), if state.is_some() => {
                    if let Some(state) = &state {
                        let now = stamp(&state.path);
                        if now != seen {
                            seen = now;
                            state.reload();
                        }
                    }
                }
                received = hangup_received => {
                    if received.is_none() {
                        // The signal driver is gone (runtime shutting down).
                        hangup = None;
                        continue;
                    }
                    match &state {
                        Some(state) => {
                            tracing::info!(
                                path = %state.path.display(),
                                "SIGHUP: re-reading the web configuration (--config.file \
                                 changes take a restart)"
                            );
                            seen = stamp(&state.path);
                            state.reload();
                        }
                        None => tracing::info!(
                            "SIGHUP: nothing to reload: no --web.config.file is set \
                             (--config.file changes take a restart)"
                        ),
                    }
                }
            }
        }
    });
}

/// The SIGHUP stream; `None` (logged) if it cannot be had, and SIGHUP then
/// keeps its default action.
pub fn hangup_signal() -> Option<Signal> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(error) => {
            tracing::warn!(
                %error,
                "cannot listen for SIGHUP; the web configuration is reloaded when it changes only"
            );
            None
        }
    }
}

/// What identifies a version of the file: replaced (new inode, as editors and
/// Kubernetes secret updates do), rewritten (size) or touched (mtime).
fn stamp(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len(), metadata.ino()))
}

/// Serves `router` on `listener` under the web configuration in `state`, until
/// `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    state: Arc<WebState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(%error, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let generation = state.generation.load(Ordering::SeqCst);
            let tls = state.current().tls.clone();
            let result = match tls {
                Some(tls) => {
                    let handshake = TlsAcceptor::from(tls).accept(stream);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(stream)) => serve_connection(stream, router, state, generation).await,
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
                None => serve_connection(stream, router, state, generation).await,
            };
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "HTTP connection ended with an error");
            }
        });
    }
}

async fn serve_connection<S>(
    stream: S,
    router: Router,
    state: Arc<WebState>,
    generation: u64,
) -> hyper::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let mut router = router.clone();
        let state = state.clone();
        async move {
            let settings = state.current();
            let mut response = if state.authorized(&settings, &request).await {
                match tower_service::Service::call(&mut router, request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                }
            } else {
                unauthorized()
            };
            // On every response, refusals included, as the exporter-toolkit
            // does: a policy such as Strict-Transport-Security holds for the
            // endpoint, not only for the answers that carry metrics.
            for (name, value) in &settings.headers {
                response.headers_mut().insert(name.clone(), value.clone());
            }
            // Settings changed since this connection was opened: its TLS
            // parameters are stale, so the client reconnects for the next request.
            if state.generation.load(Ordering::SeqCst) != generation {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_authorization(value: &str) -> Request<()> {
        Request::builder()
            .header(header::AUTHORIZATION, value)
            .body(())
            .unwrap()
    }

    #[test]
    fn without_a_web_configuration_the_last_reload_reads_successful() {
        let mut registry = crate::telemetry::registry();
        let _metrics = WebConfigMetrics::register(&mut registry);
        let page = crate::telemetry::encode(&registry);
        assert!(
            page.contains("\nfleetsnitch_web_config_last_reload_successful 1\n"),
            "{page}"
        );
    }

    #[test]
    fn basic_credentials_are_decoded() {
        // "prometheus:pa:ss" (a colon in the password is allowed).
        let request = with_authorization("Basic cHJvbWV0aGV1czpwYTpzcw==");
        assert_eq!(
            basic_credentials(&request),
            Some(("prometheus".to_owned(), b"pa:ss".to_vec()))
        );
        let request = with_authorization("basic cHJvbWV0aGV1czpwYTpzcw==");
        assert!(
            basic_credentials(&request).is_some(),
            "the scheme is case-insensitive"
        );
    }

    #[test]
    fn anything_else_is_no_credentials() {
        for value in [
            "Bearer cHJvbWV0aGV1czpw",
            "Basic !!!",
            "Basic cHJvbWV0aGV1cw==", // no colon
            "Basic",
        ] {
            assert_eq!(
                basic_credentials(&with_authorization(value)),
                None,
                "{value}"
            );
        }
        let request = Request::builder().body(()).unwrap();
        assert_eq!(basic_credentials(&request), None);
    }
}
