//! `--web.config.file`: a real Prometheus scrapes the agent over TLS with basic
//! auth, while scrapes without credentials, with a wrong password or over plain
//! HTTP fail; a broken file at reload keeps the old settings (and is counted),
//! a valid new one takes effect; client certificates are checked against the
//! CA; an invalid file stops the agent at start naming file and key.
//! Certificates come from the `openssl` CLI, hashes from the bcrypt crate.
//! Needs root (the agent loads eBPF); skips otherwise.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use fleetsnitch_e2e::{
    ProcessGuard, TempDir, Testbed,
    agent::free_port,
    agent_binary,
    metrics::http_get,
    process::{file_tail, run_bounded},
    require_root,
    servers::Prometheus,
    wait_until,
};

const USER: &str = "prometheus";
const PASSWORD: &str = "s3cret \"quoted\"";
const NEW_PASSWORD: &str = "n3w-secret";

/// A CA, a server certificate for 127.0.0.1, a client certificate signed by the
/// CA and one signed by nobody the agent trusts.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    stranger_cert: PathBuf,
    stranger_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = run_bounded(
        Command::new("openssl").current_dir(dir).args(args),
        Duration::from_secs(30),
    )?;
    ensure!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        out.stderr
    );
    Ok(())
}

fn key_and_request(dir: &Path, name: &str, subject: &str) -> Result<()> {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            subject,
        ],
    )
}

fn sign(dir: &Path, name: &str, ca: &str, extensions: &str) -> Result<()> {
    fs::write(dir.join(format!("{name}.ext")), extensions)?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{name}.pem"),
            "-extfile",
            &format!("{name}.ext"),
        ],
    )
}

fn self_signed_ca(dir: &Path, name: &str) -> Result<()> {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    )
}

impl Pki {
    fn generate(dir: &Path) -> Result<Self> {
        self_signed_ca(dir, "ca")?;
        self_signed_ca(dir, "stranger-ca")?;
        key_and_request(dir, "server", "/CN=127.0.0.1")?;
        sign(
            dir,
            "server",
            "ca",
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n",
        )?;
        let client_ext = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
                          extendedKeyUsage=clientAuth\n";
        key_and_request(dir, "client", "/CN=prometheus")?;
        sign(dir, "client", "ca", client_ext)?;
        key_and_request(dir, "stranger", "/CN=stranger")?;
        sign(dir, "stranger", "stranger-ca", client_ext)?;
        Ok(Self {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            stranger_cert: dir.join("stranger.pem"),
            stranger_key: dir.join("stranger.key"),
        })
    }

    fn tls_section(&self, client_auth: Option<&str>) -> String {
        let mut section = format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
            self.server_cert.display(),
            self.server_key.display()
        );
        if let Some(kind) = client_auth {
            section += &format!(
                "  client_auth_type: {kind}\n  client_ca_file: {}\n",
                self.ca.display()
            );
        }
        section
    }
}

fn users_section(password: &str) -> Result<String> {
    // Cost 4 keeps the test quick; the agent accepts any bcrypt cost.
    let hash = bcrypt::hash(password, 4)?;
    Ok(format!("basic_auth_users:\n  {USER}: {hash}\n"))
}

/// Replaces `path` atomically (write + rename), as an operator or a Kubernetes
/// secret update does, so the agent never reads a half-written file.
fn replace(path: &Path, content: &str) -> Result<()> {
    let staging = path.with_extension("new");
    fs::write(&staging, content)?;
    fs::rename(&staging, path).with_context(|| format!("rename onto {}", path.display()))
}

/// What curl saw: the HTTP status (0 when no HTTP answer came) and the
/// response head and body.
struct Answer {
    status: u16,
    text: String,
}

fn curl(addr: SocketAddr, scheme: &str, path: &str, extra: &[&str]) -> Result<Answer> {
    let url = format!("{scheme}://{addr}{path}");
    let out = run_bounded(
        Command::new("curl")
            .args(["-sS", "-i", "--max-time", "10", "-w", "\n%{http_code}"])
            .args(extra)
            .arg(&url),
        Duration::from_secs(20),
    )?;
    let (text, code) = out.stdout.rsplit_once('\n').unwrap_or(("", &out.stdout));
    Ok(Answer {
        status: code.trim().parse().unwrap_or(0),
        text: format!("{text}{}", out.stderr),
    })
}

fn with_ca(pki: &Pki) -> Vec<String> {
    vec!["--cacert".into(), pki.ca.display().to_string()]
}

fn args(list: &[String]) -> Vec<&str> {
    list.iter().map(String::as_str).collect()
}

fn credentials(password: &str) -> Vec<String> {
    vec!["-u".into(), format!("{USER}:{password}")]
}

fn reloads(addr: SocketAddr, pki: &Pki, password: &str, result: &str) -> Result<f64> {
    let mut options = with_ca(pki);
    options.extend(credentials(password));
    let answer = curl(addr, "https", "/metrics", &args(&options))?;
    ensure!(
        answer.status == 200,
        "authenticated scrape: {}",
        answer.text
    );
    let line = format!("fleetsnitch_web_config_reloads_total{{result=\"{result}\"}} ");
    Ok(answer
        .text
        .lines()
        .find_map(|l| l.strip_prefix(&line))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}

fn up(prometheus: &Prometheus, job: &str) -> Result<Option<f64>> {
    let result = prometheus.query(&format!("up{{job=\"{job}\"}}"))?;
    Ok(result
        .first()
        .and_then(|sample| sample["value"][1].as_str())
        .and_then(|v| v.parse().ok()))
}

#[test]
fn prometheus_scrapes_over_tls_with_basic_auth_and_reloads_keep_or_change_settings() -> Result<()> {
    require_root!("the agent loads eBPF");
    let setup = Testbed::setup("fsn-web")?;
    let pki = Pki::generate(setup.dir())?;
    let web_config = setup.dir().join("web.yml");
    // Empty: plain HTTP, which the harness's health check speaks; TLS arrives by reload.
    fs::write(&web_config, "")?;
    let mut bed = setup
        .args(&["--web.config.file", web_config.to_str().unwrap()])
        .start()?;
    let addr = bed.addr();

    replace(
        &web_config,
        &(pki.tls_section(None) + &users_section(PASSWORD)?),
    )?;
    let mut good = with_ca(&pki);
    good.extend(credentials(PASSWORD));
    wait_until(
        Duration::from_secs(30),
        "TLS and basic auth in force",
        || Ok(curl(addr, "https", "/metrics", &args(&good))?.status == 200),
    )
    .with_context(|| bed.log_tail(20))?;

    // Direct requests: what each failure looks like.
    let answer = curl(addr, "https", "/metrics", &args(&with_ca(&pki)))?;
    ensure!(answer.status == 401, "no credentials: {}", answer.text);
    ensure!(
        answer
            .text
            .to_ascii_lowercase()
            .contains("www-authenticate: basic"),
        "401 without WWW-Authenticate: {}",
        answer.text
    );
    let mut wrong = with_ca(&pki);
    wrong.extend(credentials("not-the-password"));
    let answer = curl(addr, "https", "/metrics", &args(&wrong))?;
    ensure!(answer.status == 401, "wrong password: {}", answer.text);
    let answer = curl(addr, "https", "/healthz", &args(&with_ca(&pki)))?;
    ensure!(
        answer.status == 401,
        "/healthz is protected too: {}",
        answer.text
    );
    let answer = curl(addr, "https", "/healthz", &args(&good))?;
    ensure!(
        answer.status == 200,
        "/healthz with credentials: {}",
        answer.text
    );
    let plain = http_get(addr, "/metrics", Duration::from_secs(5));
    ensure!(
        !plain.as_ref().is_ok_and(|r| r.status == 200),
        "plain HTTP was served: {:?}",
        plain.map(|r| r.status)
    );

    // A real Prometheus: one job with the right settings, three without.
    let target = format!("static_configs:\n      - targets: ['{addr}']");
    let ca = pki.ca.display();
    let prometheus = Prometheus::start(&format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n\
         \x20 - job_name: good\n    scheme: https\n    tls_config:\n      ca_file: {ca}\n    \
         basic_auth:\n      username: {USER}\n      password: '{PASSWORD}'\n    {target}\n\
         \x20 - job_name: no_credentials\n    scheme: https\n    tls_config:\n      ca_file: {ca}\n    {target}\n\
         \x20 - job_name: wrong_password\n    scheme: https\n    tls_config:\n      ca_file: {ca}\n    \
         basic_auth:\n      username: {USER}\n      password: wrong\n    {target}\n\
         \x20 - job_name: plain_http\n    scheme: http\n    \
         basic_auth:\n      username: {USER}\n      password: '{PASSWORD}'\n    {target}\n"
    ))?;
    let jobs = ["good", "no_credentials", "wrong_password", "plain_http"];
    let expected = [1.0, 0.0, 0.0, 0.0];
    let mut seen = Vec::new();
    wait_until(Duration::from_secs(60), "every job scraped", || {
        seen = jobs
            .iter()
            .map(|job| up(&prometheus, job))
            .collect::<Result<_>>()?;
        Ok(seen.iter().all(Option::is_some))
    })
    .with_context(|| format!("up per job {jobs:?}: {seen:?}"))?;
    let seen: Vec<f64> = seen.into_iter().flatten().collect();
    ensure!(
        seen == expected,
        "up per job {jobs:?}: expected {expected:?}, saw {seen:?}"
    );
    let scraped = prometheus.query("fleetsnitch_start_time_seconds{job=\"good\"}")?;
    ensure!(
        !scraped.is_empty(),
        "Prometheus stored no agent metric from the good job"
    );

    // A broken file: rejected, counted, and the old settings stay.
    let failures_before = reloads(addr, &pki, PASSWORD, "failure")?;
    replace(&web_config, "tls_server_config:\n  cert_file: [\n")?;
    wait_until(Duration::from_secs(30), "failed reload counted", || {
        Ok(reloads(addr, &pki, PASSWORD, "failure")? > failures_before)
    })?;
    let answer = curl(addr, "https", "/metrics", &args(&with_ca(&pki)))?;
    ensure!(
        answer.status == 401,
        "after a rejected reload, authentication must still be required: {}",
        answer.text
    );
    ensure!(
        bed.log_tail(40)
            .contains("web configuration rejected at reload"),
        "the rejection is not logged:\n{}",
        bed.log_tail(40)
    );
    // An empty file (what a half-written one looks like) would turn every
    // protection off: refused at reload too.
    let failures_before = reloads(addr, &pki, PASSWORD, "failure")?;
    replace(&web_config, "")?;
    wait_until(Duration::from_secs(30), "empty file rejected", || {
        Ok(reloads(addr, &pki, PASSWORD, "failure")? > failures_before)
    })?;
    let plain = http_get(addr, "/metrics", Duration::from_secs(5));
    ensure!(
        !plain.as_ref().is_ok_and(|r| r.status == 200),
        "an empty file at reload turned TLS off"
    );
    let ups_before = prometheus.query("count_over_time(up{job=\"good\"}[1h])")?;
    let count = |r: &[serde_json::Value]| -> f64 {
        r.first()
            .and_then(|s| s["value"][1].as_str())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let before = count(&ups_before);
    wait_until(
        Duration::from_secs(30),
        "Prometheus keeps scraping after the rejected reload",
        || {
            let now = prometheus.query("count_over_time(up{job=\"good\"}[1h])")?;
            Ok(count(&now) >= before + 2.0)
        },
    )?;
    ensure!(
        up(&prometheus, "good")? == Some(1.0),
        "the good job stopped working after a rejected reload"
    );

    // A valid new file (new password): takes effect, the old password stops working.
    replace(
        &web_config,
        &(pki.tls_section(None) + &users_section(NEW_PASSWORD)?),
    )?;
    let mut new = with_ca(&pki);
    new.extend(credentials(NEW_PASSWORD));
    wait_until(Duration::from_secs(30), "new password in force", || {
        Ok(curl(addr, "https", "/metrics", &args(&new))?.status == 200)
    })?;
    let answer = curl(addr, "https", "/metrics", &args(&good))?;
    ensure!(
        answer.status == 401,
        "the old password still works after the reload: {}",
        answer.text
    );
    ensure!(reloads(addr, &pki, NEW_PASSWORD, "success")? >= 2.0);

    // SIGHUP re-reads the file even when nothing changed.
    let successes = reloads(addr, &pki, NEW_PASSWORD, "success")?;
    bed.agent.signal(libc::SIGHUP);
    wait_until(Duration::from_secs(30), "reload on SIGHUP", || {
        Ok(reloads(addr, &pki, NEW_PASSWORD, "success")? > successes)
    })?;
    bed.agent.check_running()?;
    Ok(())
}

/// The agent started directly from a web config, outside the harness's
/// plain-HTTP health check; stopped on drop.
struct TlsAgent {
    process: ProcessGuard,
    addr: SocketAddr,
    log: PathBuf,
}

impl TlsAgent {
    fn start(dir: &Path, web_config: &Path, ready: impl Fn(SocketAddr) -> bool) -> Result<Self> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let log = dir.join("agent.log");
        let out = fs::File::create(&log)?;
        let mut command = Command::new(agent_binary()?);
        command
            .arg("--web.listen-address")
            .arg(addr.to_string())
            .arg("--journal.path")
            .arg(dir.join("journal.db"))
            .arg("--web.config.file")
            .arg(web_config)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let mut agent = Self {
            process: ProcessGuard::spawn("fleetsnitch", &mut command, Duration::from_secs(10))?,
            addr,
            log,
        };
        let started = wait_until(Duration::from_secs(60), "agent serving over TLS", || {
            if let Some(status) = agent.process.child_mut().try_wait()? {
                bail!("fleetsnitch exited ({status})");
            }
            Ok(ready(addr))
        });
        started.with_context(|| file_tail(&agent.log, 30))?;
        Ok(agent)
    }
}

#[test]
fn client_certificates_are_required_and_checked_against_the_ca() -> Result<()> {
    require_root!("the agent loads eBPF");
    let dir = TempDir::new("fsn-web-mtls")?;
    let pki = Pki::generate(dir.path())?;
    let web_config = dir.path().join("web.yml");
    fs::write(
        &web_config,
        pki.tls_section(Some("RequireAndVerifyClientCert")),
    )?;
    let client = |cert: &Path, key: &Path| -> Vec<String> {
        let mut options = with_ca(&pki);
        options.extend([
            "--cert".into(),
            cert.display().to_string(),
            "--key".into(),
            key.display().to_string(),
        ]);
        options
    };
    let trusted = client(&pki.client_cert, &pki.client_key);
    let agent = TlsAgent::start(dir.path(), &web_config, |addr| {
        curl(addr, "https", "/healthz", &args(&trusted)).is_ok_and(|a| a.status == 200)
    })?;

    let answer = curl(agent.addr, "https", "/metrics", &args(&trusted))?;
    ensure!(
        answer.status == 200 && answer.text.contains("fleetsnitch_start_time_seconds"),
        "client certificate signed by the CA: {}",
        answer.text
    );
    let answer = curl(agent.addr, "https", "/metrics", &args(&with_ca(&pki)))?;
    ensure!(answer.status == 0, "no client certificate: {}", answer.text);
    let stranger = client(&pki.stranger_cert, &pki.stranger_key);
    let answer = curl(agent.addr, "https", "/metrics", &args(&stranger))?;
    ensure!(
        answer.status == 0,
        "client certificate from another CA: {}",
        answer.text
    );
    Ok(())
}

#[test]
fn an_invalid_web_config_stops_the_agent_at_start_naming_file_and_key() -> Result<()> {
    require_root!("the agent loads eBPF");
    let dir = TempDir::new("fsn-web-bad")?;
    let web_config = dir.path().join("web.yml");
    let cases = [
        ("tls_server_config:\n  cert_fil: x.pem\n", "cert_fil"),
        (
            "basic_auth_users:\n  prometheus: plaintext\n",
            "basic_auth_users.prometheus",
        ),
        (
            "tls_server_config:\n  cert_file: missing.pem\n  key_file: missing.key\n",
            "tls_server_config.cert_file",
        ),
    ];
    for (content, key) in cases {
        fs::write(&web_config, content)?;
        let out = run_bounded(
            Command::new(agent_binary()?).args([
                "--web.listen-address",
                &format!("127.0.0.1:{}", free_port()?),
                "--journal.path",
                dir.path().join("journal.db").to_str().unwrap(),
                "--web.config.file",
                web_config.to_str().unwrap(),
            ]),
            Duration::from_secs(60),
        )?;
        let output = format!("{}{}", out.stdout, out.stderr);
        ensure!(!out.status.success(), "started with {content:?}:\n{output}");
        ensure!(
            output.contains(web_config.to_str().unwrap()) && output.contains(key),
            "the error for {content:?} should name {} and {key}:\n{output}",
            web_config.display()
        );
    }
    Ok(())
}
