//! The kube-rs client: the API server's URL, its CA, timeouts, and a request
//! layer of our own for the bearer token, the pacing of watches and the
//! health of watches the server accepted (kube-rs's watcher makes no event
//! for them, so a quiet node's recovery would otherwise wait for a pod to
//! change).
//!
//! The token is not given to kube-rs (`AuthInfo::token_file`): kube-rs reads
//! a token file again only once a minute, whatever happens. Ours is read again
//! every `token_reload_interval` and at once after a `401 Unauthorized`, so a
//! rotated token is picked up by the next request.

use std::{
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::{HeaderValue, Request, Response, StatusCode, header::AUTHORIZATION};
use kube::client::{Body, ClientBuilder};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use tower::{Layer, Service};

use super::{
    InCluster, KubernetesConfig, KubernetesError, ResolverCounters, health::ApiHealth, read_token,
};
use crate::support::backoff::Backoff;

/// A client for the API server of `cluster`, with `config`'s timeouts.
pub(super) fn build(
    cluster: &InCluster,
    config: &KubernetesConfig,
    counters: &ResolverCounters,
    health: &ApiHealth,
    watch_backoff: Backoff,
) -> Result<kube::Client, KubernetesError> {
    let url: http::Uri = cluster
        .api_url
        .parse()
        .map_err(|_| KubernetesError::BadUrl(cluster.api_url.clone()))?;
    let mut kube_config = kube::Config::new(url);
    if let Some(pem) = &cluster.ca_pem {
        let certificates = CertificateDer::pem_slice_iter(pem)
            .map(|certificate| certificate.map(|der| der.to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| KubernetesError::BadCa {
                path: config.ca_path.clone(),
                reason: err.to_string(),
            })?;
        if certificates.is_empty() {
            return Err(KubernetesError::BadCa {
                path: config.ca_path.clone(),
                reason: "no certificate in the file".to_owned(),
            });
        }
        // The only trust roots of the connection.
        kube_config.root_cert = Some(certificates);
    }
    kube_config.connect_timeout = Some(config.request_timeout);
    kube_config.write_timeout = Some(config.request_timeout);
    // Between two reads of one response: the server ends a watch after
    // watch_timeout, sending nothing meanwhile when nothing changes.
    kube_config.read_timeout = Some(config.watch_timeout + config.request_timeout);
    kube_config.reset_reader_on_write = true;
    // Failed requests are retried by the resolver, with its own back-off and
    // counters, not inside the client.
    kube_config.default_retry = false;
    let token = read_token(&cluster.token_path)?;
    let layer = RequestLayer {
        token: Arc::new(Token {
            path: cluster.token_path.clone(),
            reload_interval: config.token_reload_interval,
            cached: Mutex::new(Cached {
                header: bearer(&token, &cluster.token_path)?,
                read_at: Instant::now(),
                stale: false,
            }),
        }),
        pacer: Arc::new(Mutex::new(Pacer {
            last_watch: None,
            quick: config.backoff_min / 2,
            backoff: watch_backoff,
        })),
        counters: counters.clone(),
        health: health.clone(),
    };
    let builder = ClientBuilder::try_from(kube_config)
        .map_err(|err| KubernetesError::Client(crate::support::error_chain(&err)))?;
    Ok(builder.with_layer(&layer).build())
}

fn bearer(token: &str, path: &std::path::Path) -> Result<HeaderValue, KubernetesError> {
    let mut header = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
        KubernetesError::BadToken {
            path: path.to_owned(),
        }
    })?;
    header.set_sensitive(true);
    Ok(header)
}

struct Cached {
    header: HeaderValue,
    read_at: Instant,
    /// The server refused the token: read the file again before the next request.
    stale: bool,
}

/// The service account token: bound tokens are rotated by the kubelet.
struct Token {
    path: PathBuf,
    reload_interval: Duration,
    cached: Mutex<Cached>,
}

impl Token {
    /// The `Authorization` header, from a file read again when older than the
    /// reload interval or refused; the last good one when the file cannot be
    /// read (it is swapped atomically, so that is rare and short).
    fn header(&self) -> HeaderValue {
        let mut cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        if cached.stale || cached.read_at.elapsed() >= self.reload_interval {
            match read_token(&self.path).and_then(|token| bearer(&token, &self.path)) {
                Ok(header) => {
                    cached.header = header;
                    cached.read_at = Instant::now();
                    cached.stale = false;
                }
                Err(err) => tracing::debug!("keeping the previous token: {err}"),
            }
        }
        cached.header.clone()
    }

    fn refused(&self) {
        self.cached
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stale = true;
    }
}

/// kube-rs's watcher opens the next watch at once when the server ends one.
/// A server that ends every watch as soon as it starts would have it spin:
/// a watch opened less than `quick` after the previous one waits a back-off
/// first (`backoff_min` doubling up to `backoff_max`), reset by a watch that
/// lasted.
struct Pacer {
    last_watch: Option<Instant>,
    quick: Duration,
    backoff: Backoff,
}

impl Pacer {
    fn pause(&mut self) -> Option<Duration> {
        let now = Instant::now();
        let pause = match self.last_watch {
            Some(last) if now.saturating_duration_since(last) < self.quick => {
                Some(self.backoff.next_delay())
            }
            _ => {
                self.backoff.reset();
                None
            }
        };
        self.last_watch = Some(now + pause.unwrap_or_default());
        pause
    }
}

/// Sets the bearer token on every request, counts and paces watches, and
/// reports a watch the server accepted as a success.
#[derive(Clone)]
struct RequestLayer {
    token: Arc<Token>,
    pacer: Arc<Mutex<Pacer>>,
    counters: ResolverCounters,
    health: ApiHealth,
}

impl<S> Layer<S> for RequestLayer {
    type Service = RequestService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestService {
            inner,
            layer: self.clone(),
        }
    }
}

struct RequestService<S> {
    inner: S,
    layer: RequestLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

fn is_watch(request: &Request<Body>) -> bool {
    request.uri().query().is_some_and(|query| {
        query
            .split('&')
            .any(|pair| pair == "watch=true" || pair == "watch=1")
    })
}

impl<S, B> Service<Request<Body>> for RequestService<S>
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        request
            .headers_mut()
            .insert(AUTHORIZATION, self.layer.token.header());
        let watch = is_watch(&request);
        let pause = if watch {
            self.layer.counters.watches.inc();
            self.layer
                .pacer
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pause()
        } else {
            None
        };
        // The watcher waits for this future before its next request, so a
        // pause here paces it whether or not the request went out yet.
        let response = self.inner.call(request);
        let token = self.layer.token.clone();
        let health = self.layer.health.clone();
        Box::pin(async move {
            if let Some(pause) = pause {
                tracing::debug!("the last watch ended at once: next one in {pause:?}");
                tokio::time::sleep(pause).await;
            }
            let response = response.await?;
            if response.status() == StatusCode::UNAUTHORIZED {
                token.refused();
            }
            // A failed one is reported by the watcher's error, with its cause.
            if watch && response.status().is_success() {
                health.succeeded();
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watches_opened_in_quick_succession_are_paced() {
        let mut pacer = Pacer {
            last_watch: None,
            quick: Duration::from_secs(3600),
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(4), 0.0),
        };
        assert_eq!(pacer.pause(), None, "the first watch");
        let pauses: Vec<_> = (0..4).filter_map(|_| pacer.pause()).collect();
        assert_eq!(
            pauses,
            [1, 2, 4, 4].map(Duration::from_secs),
            "growing, up to the maximum"
        );
        pacer.quick = Duration::ZERO;
        pacer.last_watch = Some(Instant::now() - Duration::from_secs(1));
        assert_eq!(pacer.pause(), None, "a watch that lasted");
        pacer.quick = Duration::from_secs(3600);
        assert_eq!(pacer.pause(), Some(Duration::from_secs(1)), "reset");
    }

    #[test]
    fn watch_requests_are_recognised() {
        let request = |uri: &str| Request::get(uri).body(Body::empty()).unwrap();
        assert!(is_watch(&request(
            "/api/v1/pods?fieldSelector=spec.nodeName%3Dn&watch=true&resourceVersion=5"
        )));
        assert!(!is_watch(&request(
            "/api/v1/pods?fieldSelector=spec.nodeName%3Dn&limit=500"
        )));
    }
}
