//! An apalis worker and an apalis producer on an orchestrator queue.
//!
//! ```text
//! cargo run --features apalis --example apalis_worker -- produce --queue chores --count 10
//! cargo run --features apalis --example apalis_worker -- work --queue chores
//! ```
//!
//! Both read the same settings as the `orchestrator` binary (`ORCH_*`, or
//! `--config`). The worker prints one line per event of its handler, which
//! the tests in `tests/apalis` read:
//! `start <job id> <label> <attempt>`, `done <job id>`, `cancelled <job id>`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use apalis::prelude::*;
use clap::{Parser, Subcommand, ValueEnum};
use orchestrator::apalis::{Cancellation, Config, OrchestratorStorage};
use orchestrator::app::App;
use orchestrator::config::Settings;
use serde::{Deserialize, Serialize};

/// The kind of this example's jobs.
const KIND: &str = "apalis-chore";

/// A task's arguments: what the handler does, and for how long.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Chore {
    label: String,
    behaviour: Behaviour,
    /// For `sleep`: how long.
    #[serde(default)]
    ms: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
enum Behaviour {
    /// Returns at once.
    Noop,
    /// Sleeps `ms`, then returns.
    Sleep,
    /// Runs until cancelled, then says so and returns an error.
    WaitForCancel,
    /// Fails its first attempt with an `Err`, then succeeds.
    FailOnce,
    /// Panics on its first attempt, then succeeds.
    PanicOnce,
    /// Fails with `AbortError`: no retry.
    Abort,
}

#[derive(Parser)]
struct Cli {
    /// A TOML settings file, as `orchestrator --config`.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pushes tasks through apalis's `TaskSink`.
    Produce(Produce),
    /// Runs an apalis worker until SIGTERM or Ctrl-C.
    Work(Work),
}

#[derive(clap::Args)]
struct Produce {
    #[arg(long)]
    queue: String,
    #[arg(long, default_value_t = 1)]
    count: usize,
    #[arg(long, value_enum, default_value_t = Behaviour::Noop)]
    behaviour: Behaviour,
    #[arg(long, default_value_t = 0)]
    ms: u64,
    /// Labels are `<label>-<n>`.
    #[arg(long, default_value = "chore")]
    label: String,
    /// 1 (lowest) to 10 (highest).
    #[arg(long)]
    priority: Option<usize>,
    /// Run no earlier than this many seconds from now.
    #[arg(long)]
    delay_secs: Option<u64>,
    #[arg(long)]
    max_attempts: Option<usize>,
    /// Each task's time limit.
    #[arg(long)]
    timeout_secs: Option<u64>,
    /// The same key twice is one job.
    #[arg(long)]
    idempotency_key: Option<String>,
}

#[derive(clap::Args)]
struct Work {
    #[arg(long)]
    queue: String,
    /// The apalis worker's name, printed with each line.
    #[arg(long, default_value = "apalis-worker")]
    name: String,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    orchestrator::telemetry::init();
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load(cli.config.as_deref())?;
    let app = App::connect(settings).await?;
    // An example runs on a fresh database too (migrations take a lock).
    app.migrate().await?;
    match cli.command {
        Command::Produce(args) => produce(app, args).await,
        Command::Work(args) => work(app, args).await,
    }
}

async fn produce(app: App, args: Produce) -> anyhow::Result<()> {
    let mut config = Config::new(KIND)?.queue(&args.queue)?;
    if let Some(secs) = args.timeout_secs {
        config = config.timeout(Duration::from_secs(secs))?;
    }
    let mut storage = OrchestratorStorage::<Chore>::new(app, config);
    let tasks: Vec<_> = (0..args.count)
        .map(|n| {
            let chore = Chore {
                label: format!("{}-{n}", args.label),
                behaviour: args.behaviour,
                ms: args.ms,
            };
            let mut task = TaskBuilder::new(chore);
            if let Some(priority) = args.priority {
                task = task.priority(priority);
            }
            if let Some(secs) = args.delay_secs {
                task = task.run_after(Duration::from_secs(secs));
            }
            if let Some(max) = args.max_attempts {
                task = task.max_attempts(max);
            }
            if let Some(key) = &args.idempotency_key {
                task = task.idempotency_key(key.clone());
            }
            task.build()
        })
        .collect();
    storage
        .push_all(futures_util::stream::iter(tasks))
        .await
        .context("pushing the tasks")?;
    say(&format!("pushed {}", args.count));
    Ok(())
}

async fn work(app: App, args: Work) -> anyhow::Result<()> {
    let stop = orchestrator::telemetry::shutdown_signal();
    // /metrics, /healthz and /readyz, as `orchestrator worker` serves them.
    let observability = orchestrator::api::spawn_observability(&app, stop.clone(), false).await?;
    let config = Config::new(KIND)?
        .queue(&args.queue)?
        .concurrency(args.concurrency)?;
    let storage = OrchestratorStorage::<Chore>::new(app, config);
    let worker = WorkerBuilder::new(args.name)
        .backend(storage)
        .concurrency(args.concurrency)
        .build(chore);
    let until = stop.clone();
    worker
        .run_until(async move {
            until.cancelled().await;
            Ok::<(), std::io::Error>(())
        })
        .await
        .context("the apalis worker failed")?;
    stop.cancel();
    if let Some(served) = observability {
        served.await.context("metrics server task failed")??;
    }
    Ok(())
}

/// The handler: an ordinary apalis task function. Its `Cancellation` fires
/// when the job is cancelled in orchestrator.
async fn chore(
    chore: Chore,
    id: TaskId,
    attempt: Attempt,
    cancel: Cancellation,
    worker: WorkerContext,
) -> Result<String, BoxDynError> {
    let attempt = attempt.current();
    say(&format!(
        "start {id} {} {attempt} {}",
        chore.label,
        worker.name()
    ));
    let first = attempt <= 1;
    match chore.behaviour {
        Behaviour::Noop => {}
        Behaviour::Sleep => tokio::time::sleep(Duration::from_millis(chore.ms)).await,
        Behaviour::WaitForCancel => {
            cancel.cancelled().await;
            say(&format!("cancelled {id}"));
            return Err("stopped by its cancel".into());
        }
        Behaviour::FailOnce if first => return Err("failing the first attempt".into()),
        Behaviour::PanicOnce if first => panic!("panicking on the first attempt"),
        Behaviour::FailOnce | Behaviour::PanicOnce => {}
        Behaviour::Abort => return Err(AbortError::new("this chore cannot succeed").into()),
    }
    say(&format!("done {id}"));
    Ok(format!("{} by {}", chore.label, worker.name()))
}

/// One line on stdout, flushed at once (a test reads it while we run).
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // Nobody to tell if stdout is gone.
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}
