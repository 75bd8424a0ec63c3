//! `ustad`: run any program as a supervised cluster of worker processes.

mod cli;
mod client;
mod demo;
mod exit;
mod human;
mod logging;
mod preload;
mod run;
mod top;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use ustad_core::output::OutputStyle;

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.upgrade_check {
        return run::upgrade_check(&cli.command);
    }
    // The parser took ~90 KiB of stack, kept for the life of a primary unless given back.
    ustad_core::stack::release_unused();
    match cli.command {
        Command::Run(args) => {
            let output = || OutputStyle {
                color_stdout: logging::use_color(cli.color, std::io::stdout().is_terminal()),
                color_stderr: logging::use_color(cli.color, std::io::stderr().is_terminal()),
            };
            if let Some(handover) = cli.handover {
                logging::init(cli.log_format, cli.color);
                return match run::resume(handover, &args, output()) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(failure) => failure.report(),
                };
            }
            let (config, source) = match run::config_from_args(&args) {
                Ok(found) => found,
                Err(failure) => return failure.report(),
            };
            logging::init(cli.log_format, cli.color);
            match run::run(config, source, &args, output()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(failure) => failure.report(),
            }
        }
        Command::Check { config } => run::check(&config).unwrap_or_else(exit::Failure::report),
        Command::Status { json, target } => client::status(&target.target(), json),
        Command::Reload {
            pools,
            wait,
            target,
        } => client::reload(&target.target(), pools, wait),
        Command::Upgrade {
            binary,
            wait,
            target,
        } => client::upgrade(&target.target(), binary, wait),
        Command::Scale { pool, size, target } => client::scale(&target.target(), pool, &size),
        Command::Restart { what, target } => client::restart(&target.target(), &what),
        Command::Stop {
            worker: Some(id),
            timeout: _,
            target,
        } => client::stop_worker(&target.target(), id),
        Command::Stop {
            worker: None,
            timeout,
            target,
        } => client::stop(&target.target(), timeout),
        Command::Kill {
            what,
            signal,
            target,
        } => client::kill(&target.target(), &what, &signal),
        Command::Events { json, target } => client::events(&target.target(), json),
        Command::Logs {
            pool,
            follow,
            lines,
            target,
        } => client::logs(&target.target(), pool, lines, follow),
        Command::Top { interval, target } => match top::run(
            &target.target(),
            interval,
            logging::use_color(cli.color, std::io::stdout().is_terminal()),
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => exit::Failure::runtime(format!("{error:#}")).report(),
        },
        Command::DemoWorker { idle_grace } => {
            logging::init(cli.log_format, cli.color);
            demo_worker(idle_grace)
        }
    }
}

fn demo_worker(idle_grace: std::time::Duration) -> ExitCode {
    match demo::run(demo::Options { idle_grace }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ustad demo-worker: error: {error:#}");
            ExitCode::from(exit::RUNTIME)
        }
    }
}
