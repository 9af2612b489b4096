use std::process::ExitCode;

use clap::Parser;
use piprov::cli::{self, Cli};

fn main() -> ExitCode {
    piprov::contain_fatfs_panics();
    let cli = Cli::parse();
    match cli::run(cli) {
        Ok(code) => code,
        // `piprov inspect … | head` closing the pipe early is not a failure.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("piprov: error: {e:#}");
            // 2: no card was touched; 1: cards were, and are left blank.
            if e.downcast_ref::<piprov::flash::CardsLeftBlank>().is_some() {
                ExitCode::from(cli::exit::RISKY)
            } else {
                ExitCode::from(cli::exit::ERROR)
            }
        }
    }
}
