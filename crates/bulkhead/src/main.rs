//! The `bulkhead` binary: a thin dispatcher over the subcommands.

mod admin;
mod bench;
mod cli;
mod config;
mod demo;
mod import;
mod serve;
mod synth;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    match cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
