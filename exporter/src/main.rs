use std::process::ExitCode;

use clap::Parser;
use fleetsnitch::{
    agent,
    cli::Cli,
    host::readiness,
    support::{logging, node},
};

#[tokio::main]
async fn main() -> ExitCode {
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
