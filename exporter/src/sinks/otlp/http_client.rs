//! The HTTP client of the OTLP/HTTP transport: the agent's own reqwest 0.12
//! (rustls with ring, already a dependency) rather than the reqwest 0.13 the
//! exporter crate would bring, with the TLS settings of `otlp.tls` and the
//! resolved headers, which override any other value of the same header.

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use opentelemetry_http::{HttpClient, HttpError, ResponseBodyTooLarge};

/// OTLP responses are tiny; anything larger than this is refused.
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug)]
pub(super) struct ReqwestHttpClient {
    pub(super) client: reqwest::Client,
    pub(super) headers: HeaderMap,
}

#[async_trait::async_trait]
impl HttpClient for ReqwestHttpClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let mut headers = parts.headers;
        for (name, value) in &self.headers {
            headers.insert(name.clone(), value.clone());
        }
        let mut response = self
            .client
            .request(parts.method, parts.uri.to_string())
            .headers(headers)
            .body(body)
            .send()
            .await?;
        let mut builder = Response::builder().status(response.status());
        if let Some(target) = builder.headers_mut() {
            *target = std::mem::take(response.headers_mut());
        }
        let mut received = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            if received.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(Box::new(ResponseBodyTooLarge::new()));
            }
            received.extend_from_slice(&chunk);
        }
        Ok(builder.body(Bytes::from(received))?)
    }
}
