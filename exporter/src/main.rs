use std::process::ExitCode;

use clap::Parser;
use fleetsnitch::{
    agent,
    cli::Cli,
    host::readiness,
    support::{logging, node},
};

/// Worker threads of the async runtime (the web server, the Kubernetes
/// watcher, OTLP): the counting work has threads of its own, so a node agent
/// needs no more on a 96-core host than on a 2-core one.
const RUNTIME_WORKERS: usize = 2;

fn main() -> ExitCode {
    limit_malloc_arenas();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(RUNTIME_WORKERS)
        .enable_all()
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(agent_main()),
        Err(error) => {
            eprintln!("fleetsnitch: cannot start the async runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

/// glibc gives each thread that allocates an arena of its own (up to eight
/// per core), each keeping the memory it freed: with a dozen threads that
/// allocate a little, that is megabytes of RSS for nothing. Two arenas are
/// plenty for the agent's allocation rate. Before any thread starts.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

async fn agent_main() -> ExitCode {
    let cli = Cli::parse();
    if cli.check {
        let (text, ready) = readiness::report(&readiness::inspect());
        print!("{text}");
        return if ready {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    logging::init(cli.log_format, &cli.log_level);
    if let Some(root) = &cli.rootfs
        && let Err(error) = node::use_root(root)
    {
        tracing::error!("{error}");
        return ExitCode::from(2);
    }

    let config = match cli.config() {
        Ok(config) => config,
        Err(error) => {
            tracing::error!("{error}");
            return ExitCode::from(2);
        }
    };
    match agent::run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::FAILURE
        }
    }
}
