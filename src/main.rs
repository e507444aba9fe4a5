//! The `orchestrator` command line.

mod cli;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    orchestrator::telemetry::init();
    match cli::run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
