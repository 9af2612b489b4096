use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use piprov::cli::{self, Cli};

fn main() -> ExitCode {
    piprov::contain_fatfs_panics();
    let matches = Cli::command().get_matches();
    let json = cli::json_requested(&matches);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
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
            let code = if e.downcast_ref::<piprov::flash::CardsLeftBlank>().is_some() {
                cli::exit::RISKY
            } else {
                cli::exit::ERROR
            };
            // A script reading --json reads stdout: the error goes there too.
            if json {
                println!(
                    "{}",
                    serde_json::json!({"event": "error", "error": format!("{e:#}"), "exit_code": code})
                );
            }
            ExitCode::from(code)
        }
    }
}
