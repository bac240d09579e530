//! A small, paced client for the footprint benchmark: many copies of it, each a
//! distinct executable, open new TCP connections at a steady rate.
//!
//! ```text
//! connector --addr 127.0.0.1:PORT --per-second N --seconds S [--start-after-ms MS]
//! ```
//! Each connection sends 64 bytes and closes. Prints `{"connections":N}`.
//! Bounded by `--per-second` x `--seconds`.

use std::{
    io::Write,
    net::{SocketAddr, TcpStream},
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

fn option(args: &[String], name: &str) -> Result<String, String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .ok_or_else(|| format!("missing {name}"))
}

fn run(args: &[String]) -> Result<u32, String> {
    let addr: SocketAddr = option(args, "--addr")?
        .parse()
        .map_err(|e| format!("--addr: {e}"))?;
    let per_second: u32 = option(args, "--per-second")?
        .parse()
        .map_err(|e| format!("--per-second: {e}"))?;
    let seconds: u32 = option(args, "--seconds")?
        .parse()
        .map_err(|e| format!("--seconds: {e}"))?;
    if per_second == 0 || per_second > 10_000 || seconds > 3_600 {
        return Err("--per-second must be 1..=10000 and --seconds at most 3600".into());
    }
    let start_after: u64 = match option(args, "--start-after-ms") {
        Ok(ms) => ms.parse().map_err(|e| format!("--start-after-ms: {e}"))?,
        Err(_) => 0,
    };
    if start_after > 60_000 {
        return Err("--start-after-ms is at most 60000".into());
    }
    thread::sleep(Duration::from_millis(start_after));
    let interval = Duration::from_secs(1) / per_second;
    let start = Instant::now();
    let mut made = 0;
    for index in 0..per_second * seconds {
        // Paced against the start, so a slow connection does not shift the rest.
        let due = start + interval * index;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        if let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
            && stream.write_all(&[0x5a; 64]).is_ok()
        {
            made += 1;
        }
    }
    Ok(made)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(made) => {
            println!("{{\"connections\":{made}}}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("connector: {error}");
            ExitCode::FAILURE
        }
    }
}
