//! Values from the traffic are data in every sink. Executables with hostile
//! names (quotes, backslashes, newlines, tabs, terminal escapes, format
//! directives, shell syntax, invalid UTF-8, a 255-byte component: the file
//! system's limit) talk on loopback, and then:
//! - `/metrics` passes `promtool check metrics` and parses back to the exact names;
//! - the journal (read with the sqlite3 shell) holds the exact names;
//! - every line of the JSON-lines connection log parses, with the exact names;
//! - the OTLP/HTTP requests carry the exact names as protobuf strings.
//!
//! Domains the same way: a client resolves a hostile name through the peer's
//! DNS service and talks to the address; the name reaches every sink in its
//! RFC 1035 presentation form.
//!
//! Invalid UTF-8 bytes are carried as `\xNN` (README "Hostile values"); the
//! expected text is built here independently. NUL cannot be part of a path.
//! Needs root (the agent loads eBPF); skips otherwise.

use std::{
    collections::BTreeSet,
    ffi::OsStr,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use fleetsnitch_e2e::{
    Testbed, parse_samples, process::run_bounded, program, query_journal, require_root, wait_until,
};

/// The text the agent writes for a name: valid UTF-8 as is, each byte of an
/// invalid sequence as `\xNN`.
fn expected_text(bytes: &[u8]) -> String {
    let mut text = String::new();
    for chunk in bytes.utf8_chunks() {
        text.push_str(chunk.valid());
        for byte in chunk.invalid() {
            text.push_str(&format!("\\x{byte:02x}"));
        }
    }
    text
}

/// An OTLP/HTTP receiver that answers every request with an empty success
/// and keeps the request bodies; stopped on drop.
struct OtlpSink {
    addr: SocketAddr,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl OtlpSink {
    fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (bodies, stop) = (bodies.clone(), stop.clone());
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    let bodies = bodies.clone();
                    thread::spawn(move || {
                        let _ = serve(stream, &bodies);
                    });
                }
            })
        };
        Ok(Self {
            addr,
            bodies,
            stop,
            thread: Some(thread),
        })
    }

    fn bodies(&self) -> Vec<Vec<u8>> {
        self.bodies.lock().map(|b| b.clone()).unwrap_or_default()
    }
}

impl Drop for OtlpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One keep-alive connection: requests with a Content-Length body, each
/// answered 200 with an empty (valid) protobuf response.
fn serve(stream: TcpStream, bodies: &Mutex<Vec<Vec<u8>>>) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut length = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse()?;
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        bodies
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .push(body);
        writer.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n",
        )?;
    }
}

/// `text` as a protobuf string field's payload: varint length, then the bytes.
fn protobuf_string(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut length = text.len();
    while length >= 0x80 {
        out.push((length as u8) | 0x80);
        length >>= 7;
    }
    out.push(length as u8);
    out.extend_from_slice(text.as_bytes());
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// `hex(path)` of every executable in the journal.
fn journal_paths(journal: &Path) -> Result<BTreeSet<String>> {
    Ok(query_journal(journal, "SELECT hex(path) FROM executables")?
        .lines()
        .map(str::to_owned)
        .collect())
}

fn hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02X}")).collect()
}

/// `promtool check metrics` parses the page: exit 0, or 3 with only the
/// findings every OpenMetrics page gets from its text parser.
fn promtool_accepts(dir: &Path, text: &str) -> Result<()> {
    let scrape = dir.join("scrape.txt");
    fs::write(&scrape, text)?;
    let promtool = run_bounded(
        Command::new("sh")
            .arg("-c")
            .arg("promtool check metrics < \"$1\"")
            .arg("sh")
            .arg(&scrape)
            .stdin(Stdio::null()),
        Duration::from_secs(30),
    )?;
    let findings = format!("{}{}", promtool.stdout, promtool.stderr);
    // Exit 3 is lint findings; 1 (or anything else) is a page that does not parse.
    ensure!(
        matches!(promtool.status.code(), Some(0 | 3)),
        "promtool check metrics failed ({}):\n{findings}",
        promtool.status
    );
    // The only finding is the text parser not pairing OpenMetrics counter
    // families with their _total samples ("no help text"); nothing about labels.
    for line in findings.lines().filter(|l| !l.trim().is_empty()) {
        ensure!(
            line.ends_with("no help text"),
            "promtool: {line}\n{findings}"
        );
    }
    Ok(())
}

/// The `key` values of every line of the connection log; each line must be JSON.
fn connection_log_values(path: &Path, key: &str) -> Result<BTreeSet<String>> {
    let content = fs::read_to_string(path).unwrap_or_default();
    let mut values = BTreeSet::new();
    for (number, line) in content.lines().enumerate() {
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("line {} is not JSON: {line:?}", number + 1))?;
        if let Some(text) = value[key].as_str() {
            values.insert(text.to_owned());
        }
    }
    Ok(values)
}

/// The agent's configuration for these tests: every sink on (the connection log at
/// `dir/connections.jsonl`), plus `extra`.
fn all_sinks_config(dir: &Path, otlp: &OtlpSink, extra: &str) -> String {
    format!(
        "journal:\n  write_interval: 1s\n\
         otlp:\n  enabled: true\n  protocol: http/protobuf\n  endpoint: http://{}\n  batch_delay: 200ms\n\
         connection_log:\n  enabled: true\n  path: {}\n{extra}",
        otlp.addr,
        dir.join("connections.jsonl").display()
    )
}

/// The label the agent gave the path `expected`: the path itself or, for a
/// path too long for the kernel's walk whose process exited before /proc was
/// read, `/…` and the part the walk got (README "How it counts").
fn label_for<'a>(names: &BTreeSet<&'a str>, expected: &str) -> Option<&'a str> {
    if let Some(name) = names.get(expected) {
        return Some(name);
    }
    names.iter().copied().find(|name| {
        name.strip_prefix("/\u{2026}")
            .is_some_and(|walked| walked.len() > 64 && expected.starts_with(walked))
    })
}

#[test]
fn hostile_names_reach_every_sink_intact() -> Result<()> {
    require_root!("the agent loads eBPF");
    let otlp = OtlpSink::start()?;
    let setup = Testbed::setup("fsn-hostile")?;
    let log_path = setup.dir().join("connections.jsonl");
    let config = all_sinks_config(setup.dir(), &otlp, "");
    let bed = setup
        .config(config)
        // Debug: the lines naming each new executable are logged too.
        .args(&["--log.level", "fleetsnitch=debug"])
        .start()?;
    let dir = bed.dir();

    // Short components, so the kernel's own path walk names them, and a
    // 255-byte one, past the walk's per-component limit: named through /proc
    // while the process runs, else by what the walk got (see label_for).
    let mut hostile: Vec<Vec<u8>> = vec![
        b"q\"uo'te\\back\nline\ttab\x1b[31mred{exe=\"x\"} #%s%n$(id);`id`|\xff\xfe\xc3(".to_vec(),
        b"{{.Values}}\r\x7f\\x41 \\\\ \"\"".to_vec(),
    ];
    let mut long = b"long\"\\\n\xff".to_vec();
    long.resize(255, b'L');
    hostile.push(long);
    let mut expected = Vec::new();
    for (index, name) in hostile.iter().enumerate() {
        let sub = dir.join(format!("d{index}"));
        fs::create_dir(&sub)?;
        let exe = sub.join(OsStr::from_bytes(name));
        fs::copy(program("trafficgen")?, &exe).with_context(|| format!("copy to {exe:?}"))?;
        let mut raw = sub.as_os_str().as_bytes().to_vec();
        raw.push(b'/');
        raw.extend_from_slice(name);
        expected.push((exe, expected_text(&raw)));
    }
    for (exe, _) in &expected {
        // argv[0] stays plain: trafficgen reads its arguments as UTF-8.
        let out = run_bounded(
            Command::new(exe)
                .arg0("trafficgen")
                .args(["client", "loopback", "--bytes", "30000"]),
            Duration::from_secs(30),
        )?;
        ensure!(out.status.success(), "{exe:?}: {}", out.stderr);
    }

    // /metrics: the exposition parses, and each name comes back exactly.
    let mut text = String::new();
    let mut labels: Vec<Option<String>> = Vec::new();
    wait_until(
        Duration::from_secs(30),
        "every hostile name in /metrics",
        || {
            text = bed.metrics().text()?;
            let samples = parse_samples(&text, "fleetsnitch_bytes_total")?;
            let names: BTreeSet<&str> = samples
                .iter()
                .filter_map(|s| s.labels.get("exe").map(String::as_str))
                .collect();
            labels = expected
                .iter()
                .map(|(_, name)| label_for(&names, name).map(str::to_owned))
                .collect();
            Ok(labels.iter().all(Option::is_some))
        },
    )
    .with_context(|| {
        format!(
            "expected {:?} among the exe labels of:\n{}",
            expected.iter().map(|(_, n)| n).collect::<Vec<_>>(),
            text.lines()
                .filter(|l| l.starts_with("fleetsnitch_bytes_total"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    })?;
    // From here on, each name as the agent gave it (exact, or the walked part
    // of the long one): every other sink must carry that text unchanged.
    let short_names = expected.len() - 1;
    ensure!(
        labels[..short_names]
            .iter()
            .zip(&expected)
            .all(|(label, (_, name))| label.as_deref() == Some(name.as_str())),
        "names the kernel walk covers must come back exactly: {labels:?}"
    );
    let exact: Vec<(PathBuf, bool)> = expected
        .iter()
        .zip(&labels)
        .map(|((exe, name), label)| (exe.clone(), label.as_deref() == Some(name.as_str())))
        .collect();
    let expected: Vec<(PathBuf, String)> = expected
        .into_iter()
        .zip(labels)
        .map(|((exe, _), label)| (exe, label.unwrap_or_default()))
        .collect();
    promtool_accepts(dir, &text)?;
    let sha256 = parse_samples(&text, "fleetsnitch_executable_info")?;
    // A long path whose process was gone before /proc was read cannot be
    // opened by the walked part: its hash is "unavailable", by design.
    for ((exe, name), _) in expected.iter().zip(&exact).filter(|(_, (_, exact))| *exact) {
        let info = sha256.iter().find(|s| s.labels.get("exe") == Some(name));
        let digest = fleetsnitch_e2e::sha256_file(exe)?;
        wait_until(
            Duration::from_secs(20),
            "hash of the hostile executable",
            || {
                let samples = parse_samples(&bed.metrics().text()?, "fleetsnitch_executable_info")?;
                Ok(samples.iter().any(|s| {
                    s.labels.get("exe") == Some(name) && s.labels.get("sha256") == Some(&digest)
                }))
            },
        )
        .with_context(|| format!("{name:?}: executable_info {info:?}"))?;
    }

    // The journal: the exact text, read back by another program.
    let journal = bed.journal();
    let mut paths = BTreeSet::new();
    wait_until(
        Duration::from_secs(30),
        "hostile names in the journal",
        || {
            paths = journal_paths(journal)?;
            Ok(expected.iter().all(|(_, name)| paths.contains(&hex(name))))
        },
    )
    .with_context(|| format!("journal paths (hex): {paths:?}"))?;
    // Process names: the kernel's 15 first bytes of each file name.
    let names: BTreeSet<String> = query_journal(journal, "SELECT hex(name) FROM executable_names")?
        .lines()
        .map(str::to_owned)
        .collect();
    for name in &hostile {
        let comm = expected_text(&name[..name.len().min(15)]);
        ensure!(
            names.contains(&hex(&comm)),
            "process name {comm:?} not in the journal (hex): {names:?}"
        );
    }

    // The connection log: every line is one JSON value; the names come back exactly.
    let mut exes = BTreeSet::new();
    wait_until(
        Duration::from_secs(30),
        "hostile names in the connection log",
        || {
            exes = connection_log_values(&log_path, "exe")?;
            Ok(expected.iter().all(|(_, name)| exes.contains(name)))
        },
    )
    .with_context(|| format!("exe values in the connection log: {exes:?}"))?;

    // OTLP: each name travels as one protobuf string, byte for byte.
    wait_until(
        Duration::from_secs(30),
        "hostile names in OTLP requests",
        || {
            let bodies = otlp.bodies();
            Ok(expected.iter().all(|(_, name)| {
                let field = protobuf_string(name);
                bodies.iter().any(|body| contains(body, &field))
            }))
        },
    )
    .with_context(|| format!("{} OTLP requests received", otlp.bodies().len()))?;

    // The agent's own log: a name is one escaped value, never a forged line.
    let log = fs::read(bed.agent.log_path())?;
    let log = String::from_utf8_lossy(&log);
    ensure!(
        log.contains("new executable"),
        "the debug log does not name new executables; the check below would prove nothing"
    );
    let forged: Vec<&str> = log
        .lines()
        .filter(|line| line.starts_with("line\ttab") || line.starts_with("line"))
        .collect();
    ensure!(forged.is_empty(), "log lines forged by a path: {forged:?}");
    Ok(())
}

/// A domain as the agent writes it (RFC 1035 presentation format): lowercase
/// letters, digits, `-`, `_` and `*` as they are, every other octet `\DDD`.
fn expected_domain(name: &str) -> String {
    name.split('.')
        .map(|label| {
            label
                .bytes()
                .map(|byte| match byte.to_ascii_lowercase() {
                    plain @ (b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'*') => {
                        (plain as char).to_string()
                    }
                    other => format!("\\{other:03}"),
                })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join(".")
}

#[test]
fn hostile_domain_names_reach_every_sink_intact() -> Result<()> {
    require_root!("eBPF, network namespaces");
    let otlp = OtlpSink::start()?;
    let setup = Testbed::setup("fsn-hostile-dns")?;
    let config = all_sinks_config(
        setup.dir(),
        &otlp,
        "metrics:\n  bytes_labels: [domain, remote_port]\n",
    );
    // The peer's DNS service answers every A query with the peer's address.
    let bed = setup.config(config).peer().start()?;
    // Labels of up to 63 octets may hold anything but a dot on the wire.
    let name = "Evil\"quote\\back\nline\t{x=\"y\"}%s$(id)`id`\u{1b}[31m.\u{e9}t\u{e9}-\u{fc}.Test";
    let expected = expected_domain(name);
    let exe = bed.copy("dnsclient", "dns-hostile")?;
    // The peer's services may take a moment to bind: retry briefly, bounded.
    let mut attempts = 0;
    let out = loop {
        attempts += 1;
        let out = run_bounded(
            &mut bed.net().in_client(
                &exe,
                &[
                    "udp",
                    name,
                    "--server",
                    "198.18.0.2",
                    "--port",
                    "5001",
                    "--bytes",
                    "20000",
                ],
            ),
            Duration::from_secs(30),
        )?;
        if out.status.success() || attempts >= 20 {
            break out;
        }
        thread::sleep(Duration::from_millis(250));
    };
    ensure!(out.status.success(), "dnsclient: {}", out.stderr);
    let exe_text = exe.to_str().context("test paths are UTF-8")?.to_owned();

    let mut text = String::new();
    wait_until(Duration::from_secs(30), "the domain in /metrics", || {
        text = bed.metrics().text()?;
        Ok(parse_samples(&text, "fleetsnitch_bytes_total")?
            .iter()
            .any(|s| {
                s.labels.get("exe") == Some(&exe_text) && s.labels.get("domain") == Some(&expected)
            }))
    })
    .with_context(|| {
        format!(
            "expected domain {expected:?} for {exe_text}:\n{}",
            text.lines()
                .filter(|l| l.contains("dns-hostile"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    })?;
    promtool_accepts(bed.dir(), &text)?;

    let mut domains = String::new();
    wait_until(Duration::from_secs(30), "the domain in the journal", || {
        domains = query_journal(
            bed.journal(),
            "SELECT DISTINCT hex(domain) FROM connections",
        )?;
        Ok(domains.lines().any(|d| d == hex(&expected)))
    })
    .with_context(|| format!("journal domains (hex): {domains}"))?;

    let log_path = bed.dir().join("connections.jsonl");
    let mut logged = BTreeSet::new();
    wait_until(
        Duration::from_secs(30),
        "the domain in the connection log",
        || {
            logged = connection_log_values(&log_path, "domain")?;
            Ok(logged.contains(&expected))
        },
    )
    .with_context(|| format!("domains in the connection log: {logged:?}"))?;

    let field = protobuf_string(&expected);
    wait_until(
        Duration::from_secs(30),
        "the domain in OTLP requests",
        || Ok(otlp.bodies().iter().any(|body| contains(body, &field))),
    )
    .with_context(|| format!("{} OTLP requests received", otlp.bodies().len()))?;
    Ok(())
}
