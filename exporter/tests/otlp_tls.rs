//! OTLP export over TLS with a client certificate (`otlp.tls.*`), over gRPC
//! and HTTP. rotel's receiver has no TLS, so a loopback TLS terminator (rustls,
//! client certificate required, both certificates signed by a CA made here)
//! forwards the decrypted bytes to the real collector.

use std::{fs, path::Path, sync::Arc, time::Duration};

use fleetsnitch::model::{Bytes, FlowRecord, Peer, Program, Window};
use fleetsnitch::sinks::otlp::{
    OtlpConfig, OtlpExporter, OtlpProtocol, OtlpTlsConfig, ResourceInfo,
};
use tokio_rustls::rustls::{
    self, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::WebPkiClientVerifier,
};

use fleetsnitch_e2e::otlp_collector::{Collector, free_port, rotel_agent, wait_for};

struct Pki {
    ca_pem: String,
    server_der: Vec<u8>,
    server_key_der: Vec<u8>,
    client_pem: String,
    client_key_pem: String,
}

fn ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    (params.self_signed(&key).unwrap(), key)
}

fn pki() -> Pki {
    let (ca, ca_key) = ca("otlp test CA");
    let server_key = rcgen::KeyPair::generate().unwrap();
    let mut server_params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    server_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "collector");
    let server = server_params.signed_by(&server_key, &ca, &ca_key).unwrap();
    let client_key = rcgen::KeyPair::generate().unwrap();
    let mut client_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    client_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "fleetsnitch");
    client_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let client = client_params.signed_by(&client_key, &ca, &ca_key).unwrap();
    Pki {
        ca_pem: ca.pem(),
        server_der: server.der().to_vec(),
        server_key_der: server_key.serialize_der(),
        client_pem: client.pem(),
        client_key_pem: client_key.serialize_pem(),
    }
}

/// Terminates TLS (client certificate required) on a loopback port and
/// forwards each connection to `target`. Returns the port.
fn start_tls_terminator(
    runtime: &tokio::runtime::Runtime,
    pki: &Pki,
    alpn: &[u8],
    target: u16,
) -> u16 {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    let ca_der = rustls_pemfile_ca(&pki.ca_pem);
    roots.add(ca_der).unwrap();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(pki.server_der.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.server_key_der.clone())),
        )
        .unwrap();
    config.alpn_protocols = vec![alpn.to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    runtime.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client without an acceptable certificate ends here.
                let Ok(Ok(mut tls)) =
                    tokio::time::timeout(Duration::from_secs(5), acceptor.accept(stream)).await
                else {
                    return;
                };
                let Ok(mut upstream) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
            });
        }
    });
    port
}

/// The DER of the first certificate of a PEM text.
fn rustls_pemfile_ca(pem: &str) -> CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

fn record(id: u16) -> Window {
    Window {
        start: 1_767_225_600,
        seconds: 10,
        flows: vec![FlowRecord {
            program: Program {
                exe: "/usr/bin/curl".into(),
                ..Program::default()
            },
            peer: Peer {
                transport: "tcp",
                remote_address: "192.0.2.1".parse().ok(),
                remote_port: Some(id),
                ..Peer::default()
            },
            bytes: Bytes {
                sent: 1,
                received: 2,
            },
            ..FlowRecord::default()
        }],
        events: Vec::new(),
    }
}

fn config(protocol: OtlpProtocol, port: u16, dir: &Path, ca_file: &str) -> OtlpConfig {
    OtlpConfig {
        enabled: true,
        protocol: Some(protocol),
        endpoint: Some(format!("https://127.0.0.1:{port}")),
        timeout: Some(Duration::from_secs(3)),
        tls: OtlpTlsConfig {
            ca_file: Some(dir.join(ca_file)),
            cert_file: Some(dir.join("client.pem")),
            key_file: Some(dir.join("client-key.pem")),
        },
        batch_delay: Duration::from_millis(20),
        retry_initial_backoff: Duration::from_millis(50),
        retry_max_backoff: Duration::from_millis(200),
        ..OtlpConfig::default()
    }
}

fn mutual_tls(protocol: OtlpProtocol) {
    let Some(binary) = rotel_agent() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    fs::write(dir.path().join("ca.pem"), &pki.ca_pem).unwrap();
    fs::write(dir.path().join("other-ca.pem"), ca("another CA").0.pem()).unwrap();
    fs::write(dir.path().join("client.pem"), &pki.client_pem).unwrap();
    fs::write(dir.path().join("client-key.pem"), &pki.client_key_pem).unwrap();
    let (grpc_port, http_port) = (free_port(), free_port());
    let collector = Collector::start(&binary, dir.path(), "collector", grpc_port, http_port);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (alpn, target): (&[u8], u16) = match protocol {
        OtlpProtocol::Grpc => (b"h2", grpc_port),
        OtlpProtocol::HttpProtobuf => (b"http/1.1", http_port),
    };
    let tls_port = start_tls_terminator(&runtime, &pki, alpn, target);
    let resource = ResourceInfo::default();

    // A server certificate from a CA we were not told to trust: nothing is
    // sent, the attempts count as errors, and the record stays queued.
    let mut untrusting = OtlpExporter::start(
        &config(protocol, tls_port, dir.path(), "other-ca.pem"),
        &resource,
    )
    .unwrap();
    untrusting.export(&record(7));
    let counters = untrusting.counters();
    wait_for("failed TLS handshakes", Duration::from_secs(20), || {
        counters.export_errors_total() >= 2
    });
    assert_eq!(counters.exported_total(), 0);
    assert_eq!(counters.queued(), 1);
    untrusting.shutdown(Duration::ZERO);
    assert_eq!(counters.dropped_total(), 1);

    // The right CA and a client certificate: delivered.
    let mut exporter =
        OtlpExporter::start(&config(protocol, tls_port, dir.path(), "ca.pem"), &resource).unwrap();
    exporter.export(&record(443));
    let counters = exporter.counters();
    wait_for("the record over TLS", Duration::from_secs(30), || {
        counters.exported_total() == 1
    });
    exporter.shutdown(Duration::from_secs(5));
    let ports: Vec<Option<i64>> = collector
        .records()
        .iter()
        .map(|record| record.int("network.peer.port"))
        .collect();
    assert_eq!(ports, vec![Some(443)]);
}

#[test]
fn grpc_over_mutual_tls() {
    mutual_tls(OtlpProtocol::Grpc);
}

#[test]
fn http_over_mutual_tls() {
    mutual_tls(OtlpProtocol::HttpProtobuf);
}
