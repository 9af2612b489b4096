use std::process::ExitCode;

use clap::Parser;
use piprov::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("piprov: error: {e:#}");
            ExitCode::from(cli::exit::ERROR)
        }
    }
}
