//! `--web.config.file`: TLS, client certificates and basic authentication for
//! `/metrics` and `/healthz`, in the Prometheus exporter-toolkit's format (the
//! file node_exporter and Prometheus accept), so one file serves a fleet's
//! exporters alike.
//!
//! Supported keys: `tls_server_config` (`cert_file`, `key_file`, `cert`, `key`,
//! `client_auth_type`, `client_ca_file`, `client_ca`, `min_version`,
//! `max_version`), `http_server_config` (`headers`, and `http2`, accepted but
//! without effect: fleetsnitch serves HTTP/1.1 only) and `basic_auth_users`
//! (user: bcrypt hash). Any other key is an error, as in the exporter-toolkit:
//! a security setting silently ignored is worse than a refusal. Relative paths
//! are relative to the file's directory.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
};

use http::{HeaderName, HeaderValue};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject};
use serde::Deserialize;
use tokio_rustls::rustls::{
    self, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
    SupportedProtocolVersion,
    client::danger::HandshakeSignatureValid,
    crypto::CryptoProvider,
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

/// Why a web configuration file was refused: the file, then the key and value.
#[derive(Debug, thiserror::Error)]
#[error("web configuration {}: {message}", path.display())]
pub struct WebConfigError {
    pub path: PathBuf,
    pub message: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebConfigFile {
    #[serde(default)]
    tls_server_config: Option<TlsServerConfig>,
    #[serde(default)]
    http_server_config: Option<HttpServerConfig>,
    #[serde(default)]
    basic_auth_users: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpServerConfig {
    /// The exporter-toolkit enables HTTP/2 over TLS unless this is false.
    /// fleetsnitch speaks HTTP/1.1 only (and says so in ALPN), so either value
    /// is accepted: a file shared with node_exporter must not be refused.
    #[serde(default)]
    #[expect(dead_code, reason = "accepted for compatibility, see above")]
    http2: Option<bool>,
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
}

/// The response headers `http_server_config.headers` may set, and the values
/// each allows (none listed: any value), as in the exporter-toolkit: the same
/// list everywhere in the Prometheus ecosystem.
const CONFIGURABLE_HEADERS: &[(&str, &[&str])] = &[
    ("Strict-Transport-Security", &[]),
    ("X-Content-Type-Options", &["nosniff"]),
    ("X-Frame-Options", &["deny", "sameorigin"]),
    ("X-XSS-Protection", &[]),
    ("Content-Security-Policy", &[]),
];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsServerConfig {
    #[serde(default)]
    cert_file: Option<PathBuf>,
    #[serde(default)]
    key_file: Option<PathBuf>,
    /// Inline PEM, instead of `cert_file`.
    #[serde(default)]
    cert: Option<String>,
    /// Inline PEM, instead of `key_file`.
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    client_auth_type: Option<String>,
    #[serde(default)]
    client_ca_file: Option<PathBuf>,
    #[serde(default)]
    client_ca: Option<String>,
    #[serde(default)]
    min_version: Option<String>,
    #[serde(default)]
    max_version: Option<String>,
}

/// The exporter-toolkit's `client_auth_type` values (Go's `tls.ClientAuthType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    NoClientCert,
    RequestClientCert,
    RequireAnyClientCert,
    VerifyClientCertIfGiven,
    RequireAndVerifyClientCert,
}

impl FromStr for ClientAuth {
    type Err = ();

    fn from_str(value: &str) -> Result<Self, ()> {
        Ok(match value {
            "" | "NoClientCert" => Self::NoClientCert,
            "RequestClientCert" => Self::RequestClientCert,
            "RequireAnyClientCert" | "RequireClientCert" => Self::RequireAnyClientCert,
            "VerifyClientCertIfGiven" => Self::VerifyClientCertIfGiven,
            "RequireAndVerifyClientCert" => Self::RequireAndVerifyClientCert,
            _ => return Err(()),
        })
    }
}

/// The settings in force: what each new connection and each request is checked against.
pub struct WebSettings {
    /// `None`: plain HTTP.
    pub tls: Option<Arc<ServerConfig>>,
    /// User name to bcrypt hash; empty: no authentication.
    pub users: BTreeMap<String, String>,
    /// Added to every response (`http_server_config.headers`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl fmt::Debug for WebSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hashes stay out of logs.
        f.debug_struct("WebSettings")
            .field("tls", &self.tls.is_some())
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .field(
                "headers",
                &self
                    .headers
                    .iter()
                    .map(|(name, _)| name.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl WebSettings {
    /// Reads and checks the file at `path`; every error names the file, key and value.
    pub fn load(path: &Path) -> Result<Self, WebConfigError> {
        let fail = |message: String| WebConfigError {
            path: path.to_owned(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|error| fail(error.to_string()))?;
        Self::parse(&text, path.parent().unwrap_or(Path::new("."))).map_err(fail)
    }

    /// Parses `text`; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, String> {
        // An empty file is valid in the exporter-toolkit: plain HTTP, no authentication.
        let file: WebConfigFile = if text.trim().is_empty() {
            WebConfigFile::default()
        } else {
            yaml_serde::from_str(text).map_err(|error| error.to_string())?
        };
        let users = file.basic_auth_users.unwrap_or_default();
        for (user, hash) in &users {
            if user.contains(':') {
                return Err(format!(
                    "basic_auth_users: user name {user:?} contains ':', which basic \
                     authentication cannot carry"
                ));
            }
            bcrypt::HashParts::from_str(hash)
                .map_err(|error| format!("basic_auth_users.{user}: not a bcrypt hash ({error})"))?;
        }
        let headers = response_headers(
            file.http_server_config
                .and_then(|http| http.headers)
                .unwrap_or_default(),
        )?;
        let tls = match file.tls_server_config {
            Some(tls) => tls_config(tls, base)?.map(Arc::new),
            None => None,
        };
        Ok(Self {
            tls,
            users,
            headers,
        })
    }
}

/// `http_server_config.headers`, checked as the exporter-toolkit checks them
/// (names exactly as listed, enumerated values exactly), and as HTTP requires.
fn response_headers(
    configured: BTreeMap<String, String>,
) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    let mut headers = Vec::with_capacity(configured.len());
    for (name, value) in configured {
        let key = format!("http_server_config.headers.{name}");
        let Some((_, allowed)) = CONFIGURABLE_HEADERS
            .iter()
            .find(|(configurable, _)| *configurable == name)
        else {
            let names: Vec<&str> = CONFIGURABLE_HEADERS.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "{key}: this header cannot be configured (one of {})",
                names.join(", ")
            ));
        };
        if !allowed.is_empty() && !allowed.contains(&value.as_str()) {
            return Err(format!(
                "{key} ({value}): expected one of {}",
                allowed.join(", ")
            ));
        }
        let header_value = HeaderValue::from_str(&value).map_err(|_| {
            format!("{key} ({value:?}): not a valid HTTP header value (control characters?)")
        })?;
        let header_name =
            HeaderName::from_bytes(name.as_bytes()).map_err(|error| format!("{key}: {error}"))?;
        headers.push((header_name, header_value));
    }
    Ok(headers)
}

fn tls_config(tls: TlsServerConfig, base: &Path) -> Result<Option<ServerConfig>, String> {
    let resolve = |file: &Path| base.join(file);
    let certs = match (&tls.cert_file, &tls.cert) {
        (Some(_), Some(_)) => return Err("tls_server_config: both cert and cert_file set".into()),
        (Some(file), None) => Some(read_certs(&resolve(file), "tls_server_config.cert_file")?),
        (None, Some(pem)) => Some(parse_certs(pem.as_bytes(), "tls_server_config.cert")?),
        (None, None) => None,
    };
    let key = match (&tls.key_file, &tls.key) {
        (Some(_), Some(_)) => return Err("tls_server_config: both key and key_file set".into()),
        (Some(file), None) => {
            let path = resolve(file);
            Some(PrivateKeyDer::from_pem_file(&path).map_err(|error| {
                format!(
                    "tls_server_config.key_file ({}): no private key: {error}",
                    path.display()
                )
            })?)
        }
        (None, Some(pem)) => Some(
            PrivateKeyDer::from_pem_slice(pem.as_bytes())
                .map_err(|error| format!("tls_server_config.key: no private key: {error}"))?,
        ),
        (None, None) => None,
    };
    let client_auth_name = tls.client_auth_type.as_deref().unwrap_or("");
    let client_auth = ClientAuth::from_str(client_auth_name).map_err(|()| {
        format!(
            "tls_server_config.client_auth_type ({client_auth_name}): expected one of \
             NoClientCert, RequestClientCert, RequireAnyClientCert, \
             VerifyClientCertIfGiven, RequireAndVerifyClientCert"
        )
    })?;
    let client_cas = match (&tls.client_ca_file, &tls.client_ca) {
        (Some(_), Some(_)) => {
            return Err("tls_server_config: both client_ca and client_ca_file set".into());
        }
        (Some(file), None) => Some(read_certs(
            &resolve(file),
            "tls_server_config.client_ca_file",
        )?),
        (None, Some(pem)) => Some(parse_certs(pem.as_bytes(), "tls_server_config.client_ca")?),
        (None, None) => None,
    };
    let (certs, key) = match (certs, key) {
        (None, None) => {
            // The exporter-toolkit's rule: no certificate and no key is plain HTTP;
            // anything else asking for TLS without them is a mistake.
            if client_cas.is_some() || client_auth != ClientAuth::NoClientCert {
                return Err(
                    "tls_server_config: client authentication needs cert_file and \
                            key_file (TLS) as well"
                        .into(),
                );
            }
            return Ok(None);
        }
        (Some(_), None) => return Err("tls_server_config: cert_file without key_file".into()),
        (None, Some(_)) => return Err("tls_server_config: key_file without cert_file".into()),
        (Some(certs), Some(key)) => (certs, key),
    };
    let versions = protocol_versions(tls.min_version.as_deref(), tls.max_version.as_deref())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ClientCertVerifier> = match (client_auth, client_cas) {
        (ClientAuth::NoClientCert, Some(_)) => {
            return Err(
                "tls_server_config: client_ca_file is set but client_auth_type is \
                        NoClientCert; set client_auth_type to RequireAndVerifyClientCert \
                        (or VerifyClientCertIfGiven)"
                    .into(),
            );
        }
        (ClientAuth::NoClientCert, None) => Arc::new(rustls::server::NoClientAuth),
        (ClientAuth::RequestClientCert | ClientAuth::RequireAnyClientCert, _) => {
            Arc::new(AnyClientCert {
                mandatory: client_auth == ClientAuth::RequireAnyClientCert,
                provider: provider.clone(),
            })
        }
        (ClientAuth::VerifyClientCertIfGiven | ClientAuth::RequireAndVerifyClientCert, None) => {
            return Err(format!(
                "tls_server_config.client_auth_type ({client_auth_name}) needs client_ca_file"
            ));
        }
        (
            ClientAuth::VerifyClientCertIfGiven | ClientAuth::RequireAndVerifyClientCert,
            Some(cas),
        ) => {
            let mut roots = RootCertStore::empty();
            for ca in cas {
                roots.add(ca).map_err(|error| {
                    format!("tls_server_config.client_ca_file: unusable CA certificate: {error}")
                })?;
            }
            let builder =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let builder = if client_auth == ClientAuth::VerifyClientCertIfGiven {
                builder.allow_unauthenticated()
            } else {
                builder
            };
            builder.build().map_err(|error| {
                format!("tls_server_config.client_ca_file: unusable CA certificates: {error}")
            })?
        }
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)
        .map_err(|error| format!("tls_server_config.min_version/max_version: {error}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|error| {
            format!("tls_server_config.cert_file/key_file: the key does not fit the certificate: {error}")
        })?;
    // Only HTTP/1.1 is served; saying so lets HTTP/2-capable clients settle at once.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(config))
}

fn read_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem =
        std::fs::read(path).map_err(|error| format!("{key} ({}): {error}", path.display()))?;
    parse_certs(&pem, &format!("{key} ({})", path.display()))
}

fn parse_certs(pem: &[u8], key: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("{key}: not PEM certificates: {error}"))?;
    if certs.is_empty() {
        return Err(format!("{key}: no PEM certificate in it"));
    }
    Ok(certs)
}

/// `min_version`/`max_version` (TLS10..TLS13) as the versions rustls offers. rustls
/// speaks only TLS 1.2 and 1.3, so a minimum below 1.2 means 1.2.
fn protocol_versions(
    min: Option<&str>,
    max: Option<&str>,
) -> Result<Vec<&'static SupportedProtocolVersion>, String> {
    let parse = |key: &str, value: &str| -> Result<u8, String> {
        match value {
            "TLS10" => Ok(10),
            "TLS11" => Ok(11),
            "TLS12" => Ok(12),
            "TLS13" => Ok(13),
            other => Err(format!(
                "tls_server_config.{key} ({other}): expected TLS10, TLS11, TLS12 or TLS13"
            )),
        }
    };
    // The exporter-toolkit's default minimum is TLS 1.2.
    let min = min.map_or(Ok(12), |value| parse("min_version", value))?;
    let max = max.map_or(Ok(13), |value| parse("max_version", value))?;
    let versions: Vec<_> = [(12, &rustls::version::TLS12), (13, &rustls::version::TLS13)]
        .into_iter()
        .filter(|(version, _)| (min..=max).contains(version))
        .map(|(_, version)| version)
        .collect();
    if versions.is_empty() {
        return Err(format!(
            "tls_server_config.min_version/max_version (TLS{min}..TLS{max}): no version \
             fleetsnitch speaks (TLS 1.2 and 1.3)"
        ));
    }
    Ok(versions)
}

/// `RequestClientCert` / `RequireAnyClientCert`: a certificate is asked for
/// (or required) but not checked against any CA, as in Go; its signature on the
/// handshake still is, so the client holds the certificate's key.
#[derive(Debug)]
struct AnyClientCert {
    mandatory: bool,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AnyClientCert {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<WebSettings, String> {
        WebSettings::parse(text, Path::new("/nonexistent"))
    }

    #[test]
    fn empty_file_is_plain_http_without_authentication() {
        let settings = parse("").unwrap();
        assert!(settings.tls.is_none() && settings.users.is_empty());
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = parse("tls_server_config:\n  cert_fil: x\n").unwrap_err();
        assert!(err.contains("cert_fil"), "{err}");
        let err = parse("basic_auth_user:\n  a: b\n").unwrap_err();
        assert!(err.contains("basic_auth_user"), "{err}");
    }

    #[test]
    fn a_password_in_clear_is_refused_naming_the_user() {
        let err = parse("basic_auth_users:\n  prometheus: secret\n").unwrap_err();
        assert!(err.contains("basic_auth_users.prometheus"), "{err}");
    }

    #[test]
    fn bad_values_name_key_and_value() {
        let err = parse(
            "tls_server_config:\n  cert_file: c.pem\n  key_file: k.pem\n  client_auth_type: Sometimes\n",
        )
        .unwrap_err();
        // The certificate is read first: its path is named.
        assert!(err.contains("/nonexistent/c.pem"), "{err}");
        let err = protocol_versions(Some("TLS14"), None).unwrap_err();
        assert!(err.contains("min_version (TLS14)"), "{err}");
        assert!(protocol_versions(Some("TLS13"), Some("TLS12")).is_err());
        assert_eq!(protocol_versions(Some("TLS10"), None).unwrap().len(), 2);
    }

    #[test]
    fn node_exporter_http_server_config_is_accepted() {
        let settings = parse(
            "http_server_config:\n  http2: false\n  headers:\n    \
             X-Frame-Options: deny\n    X-Content-Type-Options: nosniff\n    \
             Strict-Transport-Security: max-age=31536000\n    \
             Content-Security-Policy: \"default-src 'self'\"\n    \
             X-XSS-Protection: \"1; mode=block\"\n",
        )
        .unwrap();
        let headers: Vec<(&str, &str)> = settings
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.to_str().unwrap()))
            .collect();
        assert_eq!(
            headers,
            [
                ("content-security-policy", "default-src 'self'"),
                ("strict-transport-security", "max-age=31536000"),
                ("x-content-type-options", "nosniff"),
                ("x-frame-options", "deny"),
                ("x-xss-protection", "1; mode=block"),
            ]
        );
        assert!(parse("http_server_config:\n  http2: true\n").is_ok());
    }

    #[test]
    fn headers_outside_the_toolkits_list_or_values_are_refused() {
        let err = parse("http_server_config:\n  headers:\n    Server: x\n").unwrap_err();
        assert!(
            err.contains("http_server_config.headers.Server") && err.contains("X-Frame-Options"),
            "{err}"
        );
        let err =
            parse("http_server_config:\n  headers:\n    X-Frame-Options: allow\n").unwrap_err();
        assert!(
            err.contains("http_server_config.headers.X-Frame-Options (allow)")
                && err.contains("deny, sameorigin"),
            "{err}"
        );
        let err =
            parse("http_server_config:\n  headers:\n    Content-Security-Policy: \"a\\nb\"\n")
                .unwrap_err();
        assert!(
            err.contains("http_server_config.headers.Content-Security-Policy"),
            "{err}"
        );
        let err = parse("http_server_config:\n  header: {}\n").unwrap_err();
        assert!(err.contains("header"), "{err}");
    }

    #[test]
    fn key_without_certificate_is_an_error() {
        let err = parse("tls_server_config:\n  key: x\n").unwrap_err();
        assert!(err.contains("tls_server_config.key"), "{err}");
    }
}
