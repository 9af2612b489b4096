//! The process's one tokio runtime: the AWS SDK's calls, the broker's database
//! and its HTTPS server all run on it, built on first use. It is never dropped:
//! when a command's work is done the process ends, without waiting for the
//! database pool's connection closes on blocking threads (what they close is
//! already committed).

use std::future::Future;
use std::sync::OnceLock;

use anyhow::{Context, Result};
use tokio::runtime::Runtime;

fn runtime() -> Result<&'static Runtime> {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    if let Some(runtime) = RUNTIME.get() {
        return Ok(runtime);
    }
    let built = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("piprov-async")
        .build()
        .context("starting the async runtime")?;
    // Two threads racing here build two; one is kept, the other dropped unused.
    let _ = RUNTIME.set(built);
    Ok(RUNTIME.get().expect("set above"))
}

/// Runs `work` to completion from synchronous code (a command, a flash thread).
pub fn block_on<T>(work: impl Future<Output = Result<T>>) -> Result<T> {
    runtime()?.block_on(work)
}
