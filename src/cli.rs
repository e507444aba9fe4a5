//! Command definitions and dispatch: the binary's edge, where errors become
//! `anyhow` messages for people.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use orchestrator::api::{self, ApiState};
use orchestrator::app::App;
use orchestrator::app::PoolConfig;
use orchestrator::bench::{self, BenchOptions};
use orchestrator::config::Settings;
use orchestrator::job::JobFilter;
use orchestrator::job::{
    JobId, JobRequest, QueueName, ScheduleId, ScheduleRequest, Status, UniqueRequest,
};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "orchestrator",
    version,
    about = "A durable job-queue worker pool for coding agents"
)]
struct Cli {
    /// Config file layered over the built-in defaults.
    #[arg(long, global = true, env = "ORCH_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply database migrations.
    Migrate,
    /// Run a worker: claim and run jobs until SIGTERM/SIGINT.
    Worker(WorkerArgs),
    /// Run the HTTP API alone.
    Serve,
    /// Run API, workers and maintenance in one process (migrates first).
    Run(WorkerArgs),
    /// Enqueue one job and print it.
    Enqueue(EnqueueArgs),
    /// Cancel a job wherever it is; a running one is stopped by its worker.
    Cancel {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Engage the kill switch: pause every queue and cancel every running
    /// job on every worker (queued jobs stay queued). Exits 1 if any running
    /// job was not confirmed stopped.
    KillAll {
        #[arg(long)]
        reason: String,
    },
    /// Lift the kill switch: every queue it paused runs again.
    Resume {
        #[arg(long, default_value = RESUME_REASON)]
        reason: String,
    },
    /// Whether the kill switch is engaged, by whom, why and since when.
    KillSwitch,
    /// Inspect and retry jobs.
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
    },
    /// Webhook subscriptions, and a secret to sign them with.
    Webhooks {
        #[command(subcommand)]
        command: WebhooksCommand,
    },
    /// Cron schedules that enqueue a job every tick.
    Schedules {
        #[command(subcommand)]
        command: SchedulesCommand,
    },
    /// Queue depths; pause or resume a queue.
    Queues {
        #[command(subcommand)]
        command: Option<QueuesCommand>,
    },
    /// Benchmarks (`scripts/bench.sh` runs the queue peers beside them).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Args, Clone)]
struct WorkerArgs {
    /// Jobs run at once.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Queues to claim from, comma-separated.
    #[arg(long, value_delimiter = ',')]
    queues: Vec<String>,
    /// Claim one job, run it to its end, and exit (a Kubernetes ScaledJob's
    /// pod: scaling down never interrupts a job). Implies --concurrency 1
    /// and no prefetch.
    #[arg(long)]
    one_job: bool,
    /// Exit once nothing was claimed or running for this many seconds.
    #[arg(long)]
    idle_exit_secs: Option<u64>,
    /// Claim nothing: run only the maintenance (promoting delayed jobs,
    /// reaping expired leases, re-indexing, schedules, retention) until
    /// stopped. Beside --one-job pods, which must not take it with them.
    #[arg(long, conflicts_with_all = ["concurrency", "one_job", "idle_exit_secs"])]
    maintenance_only: bool,
}

#[derive(Args)]
struct EnqueueArgs {
    /// Job kind (noop, sleep, flaky, …).
    kind: String,
    #[arg(long)]
    queue: Option<String>,
    #[arg(long)]
    priority: Option<i64>,
    /// Payload as a JSON object.
    #[arg(long)]
    payload: Option<String>,
    #[arg(long)]
    max_attempts: Option<i64>,
    #[arg(long)]
    timeout_secs: Option<i64>,
    #[arg(long)]
    delay_secs: Option<i64>,
    /// RFC 3339 time to run at.
    #[arg(long)]
    run_at: Option<String>,
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Where the job's events go as signed webhooks.
    #[arg(long)]
    callback_url: Option<String>,
    /// At most one unfinished job with this key (see --unique-for-secs).
    #[arg(long)]
    unique_key: Option<String>,
    /// How long the unique key holds.
    #[arg(long, requires = "unique_key")]
    unique_for_secs: Option<i64>,
    /// Jobs sharing this key run at most max_per_key at once.
    #[arg(long)]
    concurrency_key: Option<String>,
    /// Wait until the job is finished, then print it.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 120)]
    wait_secs: u64,
}

#[derive(Subcommand)]
enum JobsCommand {
    /// Jobs newest first.
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        queue: Option<String>,
        #[arg(long)]
        kind: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Only jobs older than this id.
        #[arg(long)]
        before: Option<String>,
    },
    /// One job and its audit trail.
    Show { id: String },
    /// Put a dead job back in its queue with a fresh set of attempts.
    Retry { id: String },
    /// A job's webhook deliveries and their attempts.
    Deliveries { id: String },
    /// Send a delivered or dead delivery again (same webhook-id).
    Redeliver { id: String, delivery: i64 },
}

#[derive(Subcommand)]
enum WebhooksCommand {
    /// Subscribe a URL to events.
    Add {
        url: String,
        /// Comma-separated: started, progress, succeeded, failed, dead,
        /// cancelled, engaged, lifted.
        #[arg(long, value_delimiter = ',', required = true)]
        events: Vec<String>,
        /// Only these queues (default: all).
        #[arg(long, value_delimiter = ',')]
        queues: Vec<String>,
        /// Only these kinds (default: all).
        #[arg(long, value_delimiter = ',')]
        kinds: Vec<String>,
        #[arg(long)]
        description: Option<String>,
    },
    /// Every subscription.
    List,
    /// Unsubscribe; what it had left to send is dropped.
    Remove { id: String },
    /// Print a new random secret for ORCH_WEBHOOK_SECRET.
    Secret,
}

#[derive(Subcommand)]
enum SchedulesCommand {
    /// Create a schedule.
    Add {
        name: String,
        /// 5 fields (minute hour day-of-month month day-of-week), or 6 with
        /// seconds first; quote it.
        #[arg(long)]
        cron: String,
        /// An IANA time zone.
        #[arg(long, default_value = "UTC")]
        timezone: String,
        /// The job, as POST /v1/jobs takes it (JSON).
        #[arg(long)]
        job: String,
        /// skip (while the last job is unfinished) or allow.
        #[arg(long, value_parser = ["skip", "allow"])]
        overlap: Option<String>,
        /// What missed ticks do: none, latest or all.
        #[arg(long, value_parser = ["none", "latest", "all"])]
        catch_up: Option<String>,
        #[arg(long)]
        catch_up_limit: Option<i64>,
        /// Create it paused.
        #[arg(long)]
        paused: bool,
    },
    /// Change what is given of a schedule (as PATCH /v1/schedules/{id}).
    Edit {
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        cron: Option<String>,
        #[arg(long)]
        timezone: Option<String>,
        /// The new job, whole (JSON, as POST /v1/jobs takes).
        #[arg(long)]
        job: Option<String>,
        #[arg(long, value_parser = ["skip", "allow"])]
        overlap: Option<String>,
        #[arg(long, value_parser = ["none", "latest", "all"])]
        catch_up: Option<String>,
        #[arg(long)]
        catch_up_limit: Option<i64>,
    },
    /// Every schedule.
    List,
    /// One schedule.
    Show { id: String },
    /// Stop a schedule's ticks.
    Pause { id: String },
    /// Start again from the next tick (what was missed is not caught up).
    Resume { id: String },
    /// Delete a schedule; its jobs stay.
    Remove { id: String },
}

#[derive(Subcommand)]
enum QueuesCommand {
    Pause { name: String },
    Resume { name: String },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Queue throughput and latency through the real path (noop jobs).
    Queue(BenchArgs),
    /// A do-nothing agent job through every stage against the same steps by
    /// hand with the git and docker CLIs.
    Lifecycle {
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
    /// Worktree creation through the git stage against `git worktree add`.
    Git {
        #[arg(long, default_value_t = 10_000)]
        files: usize,
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
    /// Spawn-to-exit of a sandbox against `docker run --rm`, side by side.
    Sandbox {
        #[arg(long, default_value_t = 30)]
        runs: usize,
        #[arg(long, default_value = "orchestrator/script-agent:latest")]
        image: String,
    },
    /// No-op throughput with a webhook for every job event against none,
    /// rounds alternating in one sitting (a receiver on 127.0.0.1).
    Webhooks {
        #[command(flatten)]
        queue: BenchArgs,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// No-op throughput while retention prunes a million finished jobs,
    /// against none, in one sitting.
    Retention {
        #[command(flatten)]
        queue: BenchArgs,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Finished jobs written first, for the pruning rounds to delete.
        #[arg(long, default_value_t = 1_000_000)]
        seed_jobs: u64,
    },
    /// Scale-out: I/O-bound `sleep` jobs through 1, 2, 4, 8 worker
    /// processes (efficiency against linear), then no-op jobs at 1 and 2.
    Replicas {
        /// Replica counts; the first is the baseline.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
        replicas: Vec<usize>,
        /// Slots per replica.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 1_000)]
        sleep_ms: u64,
        /// Jobs per slot in each round.
        #[arg(long, default_value_t = 5)]
        waves: usize,
        #[arg(long, default_value_t = 20_000)]
        noop_jobs: usize,
        #[arg(long, default_value_t = 500)]
        noop_prefetch: usize,
        /// Rounds per replica count (the median counts).
        #[arg(long, default_value_t = 3)]
        repeat: usize,
    },
    /// Cancel latency (request to sandbox gone) and kill-all wall time with
    /// running `sleep` agents, against `docker rm -f` of as many containers.
    Cancel {
        #[arg(long, default_value_t = 20)]
        runs: usize,
        #[arg(long, default_value_t = 20)]
        agents: usize,
    },
}

#[derive(Args)]
struct BenchArgs {
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Jobs claimed ahead of free slots (graphile-worker's "local queue").
    #[arg(long, default_value_t = 500)]
    prefetch: usize,
    #[arg(long, default_value_t = 1_000)]
    enqueue_batch: usize,
    #[arg(long, default_value_t = 1_000)]
    latency_jobs: usize,
    #[arg(long, default_value_t = 200)]
    latency_rate: u32,
    /// Keep the bench jobs in the database.
    #[arg(long)]
    keep: bool,
}

/// The actor the CLI's changes are recorded under.
const CLI_ACTOR: &str = "cli";

pub async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load(cli.config.as_deref())?;
    match cli.command {
        Command::Migrate => {
            let app = App::connect(settings).await?;
            app.migrate().await?;
            eprintln!("migrations applied");
        }
        Command::Worker(args) => {
            let app = connect_migrated(settings).await?;
            let stop = orchestrator::telemetry::shutdown_signal();
            let pool = app.pool(pool_config(&app, &args)?);
            // A maintenance-only worker starts no sandbox: its /readyz
            // does not need a Docker daemon.
            let served =
                api::spawn_observability(&app, stop.clone(), !args.maintenance_only).await?;
            pool.run(stop.clone()).await;
            stop.cancel();
            if let Some(served) = served {
                served.await.context("metrics server task failed")??;
            }
        }
        Command::Serve => {
            let app = connect_migrated(settings).await?;
            let stop = orchestrator::telemetry::shutdown_signal();
            let deliverer = app.clone();
            let until = stop.clone();
            let delivering = tokio::spawn(async move { deliverer.deliver_webhooks(until).await });
            let served = serve_http(&app, stop.clone(), false).await;
            stop.cancel();
            delivering.await.context("webhook deliverer task failed")?;
            served?;
        }
        Command::Run(args) => {
            let app = App::connect(settings).await?;
            app.migrate().await?;
            let stop = orchestrator::telemetry::shutdown_signal();
            let pool = app.pool(pool_config(&app, &args)?);
            // A pool that ends by itself (--one-job, --idle-exit-secs)
            // takes the HTTP server down with it.
            let worker = tokio::spawn({
                let stop = stop.clone();
                async move {
                    pool.run(stop.clone()).await;
                    stop.cancel();
                }
            });
            let served = serve_http(&app, stop.clone(), true).await;
            stop.cancel();
            worker.await.context("worker task failed")?;
            served?;
        }
        Command::Enqueue(args) => enqueue(settings, args).await?,
        Command::Jobs { command } => jobs(settings, command).await?,
        Command::Cancel { id, reason } => cancel(settings, &id, &reason).await?,
        Command::KillAll { reason } => kill_all(settings, &reason).await?,
        Command::Resume { reason } => resume(settings, &reason).await?,
        Command::KillSwitch => {
            let app = App::connect_without_postgres(settings).await?;
            let state = app.kill_switch().await?;
            out(&serde_json::to_string_pretty(
                &orchestrator::app::KillSwitchStatus::from_state(state.as_ref()),
            )?)?;
        }
        Command::Queues { command } => queues(settings, command).await?,
        Command::Webhooks { command } => webhooks(settings, command).await?,
        Command::Schedules { command } => schedules(settings, command).await?,
        Command::Bench {
            what: BenchCommand::Lifecycle { runs },
        } => {
            let report = orchestrator::bench::lifecycle::run(settings, runs.max(1))
                .await
                .map_err(anyhow::Error::msg)?;
            out(&serde_json::to_string(&report)?)?;
        }
        Command::Bench {
            what: BenchCommand::Git { files, runs },
        } => {
            let report = tokio::task::spawn_blocking(move || {
                orchestrator::bench::git::run(files, runs.max(1))
            })
            .await??;
            out(&serde_json::to_string(&report)?)?;
        }
        Command::Bench {
            what: BenchCommand::Cancel { runs, agents },
        } => {
            let report =
                orchestrator::bench::cancel::run(settings, runs.max(1), agents.clamp(1, 200))
                    .await
                    .map_err(anyhow::Error::msg)?;
            out(&serde_json::to_string(&report)?)?;
        }
        Command::Bench {
            what: BenchCommand::Sandbox { runs, image },
        } => {
            let report = orchestrator::bench::sandbox::run(&image, runs.max(1)).await?;
            out(&serde_json::to_string(&report)?)?;
        }
        Command::Bench {
            what:
                BenchCommand::Webhooks {
                    queue: args,
                    rounds,
                },
        } => {
            let opts = bench_options(&args);
            let report = orchestrator::bench::webhooks::run(settings, &opts, rounds.max(1)).await?;
            out(&serde_json::to_string(&report)?)?;
        }
        Command::Bench {
            what:
                BenchCommand::Replicas {
                    replicas,
                    concurrency,
                    sleep_ms,
                    waves,
                    noop_jobs,
                    noop_prefetch,
                    repeat,
                },
        } => {
            if replicas.is_empty() || replicas.iter().any(|&n| n == 0 || n > 64) {
                bail!("--replicas takes counts between 1 and 64");
            }
            if concurrency == 0 || concurrency > 10_000 || waves == 0 || noop_jobs == 0 {
                bail!("--concurrency, --waves and --noop-jobs must be positive");
            }
            let app = connect_migrated(settings).await?;
            let opts = orchestrator::bench::replicas::ReplicaOptions {
                replicas,
                concurrency,
                sleep_ms,
                waves,
                noop_jobs,
                noop_prefetch,
                repeat,
            };
            let report = orchestrator::bench::replicas::run(&app, &opts).await?;
            out(&serde_json::to_string(&report)?)?;
        }
        Command::Bench {
            what:
                BenchCommand::Retention {
                    queue: args,
                    rounds,
                    seed_jobs,
                },
        } => {
            let opts = bench_options(&args);
            let report =
                orchestrator::bench::retention::run(settings, &opts, rounds.max(1), seed_jobs)
                    .await?;
            out(&serde_json::to_string(&report)?)?;
        }
        Command::Bench {
            what: BenchCommand::Queue(args),
        } => {
            let app = connect_migrated(settings).await?;
            let opts = bench_options(&args);
            let report = bench::run(&app, &opts).await?;
            let expected = (opts.jobs + opts.latency_jobs) as i64;
            if report.verified_succeeded != expected || report.verified_events != expected * 3 {
                bail!(
                    "verification failed: {} of {expected} jobs succeeded with {} events",
                    report.verified_succeeded,
                    report.verified_events
                );
            }
            out(&serde_json::to_string(&report)?)?;
        }
    }
    Ok(())
}

fn bench_options(args: &BenchArgs) -> BenchOptions {
    BenchOptions {
        jobs: args.jobs,
        concurrency: args.concurrency,
        prefetch: args.prefetch,
        enqueue_batch: args.enqueue_batch,
        latency_jobs: args.latency_jobs,
        latency_rate: args.latency_rate,
        keep: args.keep,
    }
}

async fn connect_migrated(settings: Settings) -> anyhow::Result<App> {
    let app = App::connect(settings).await?;
    app.ensure_migrated().await?;
    Ok(app)
}

fn pool_config(app: &App, args: &WorkerArgs) -> anyhow::Result<PoolConfig> {
    let mut cfg = app.settings().pool_config();
    if let Some(c) = args.concurrency {
        if c == 0 || c > 10_000 {
            bail!("--concurrency must be between 1 and 10000, got {c}");
        }
        cfg.concurrency = c;
    }
    if !args.queues.is_empty() {
        cfg.queues = args
            .queues
            .iter()
            .map(|q| QueueName::parse(q.as_str()))
            .collect::<Result<_, _>>()
            .context("--queues")?;
    }
    if args.one_job {
        if args.concurrency.is_some_and(|c| c != 1) {
            bail!("--one-job runs one job; drop --concurrency");
        }
        cfg.concurrency = 1;
        cfg.prefetch = 0;
        cfg.claim_batch = 1;
        cfg.max_jobs = Some(1);
    }
    if let Some(secs) = args.idle_exit_secs {
        if secs == 0 || secs > 7 * 24 * 3600 {
            bail!("--idle-exit-secs must be between 1 and 604800, got {secs}");
        }
        cfg.idle_exit = Some(Duration::from_secs(secs));
    }
    if args.maintenance_only {
        cfg.claim = false;
        cfg.concurrency = 0;
        cfg.prefetch = 0;
    }
    Ok(cfg)
}

/// `runs_agents`: workers run in this process too, so `/readyz` needs a
/// sandbox runtime.
async fn serve_http(app: &App, stop: CancellationToken, runs_agents: bool) -> anyhow::Result<()> {
    let handle = orchestrator::metrics::install().context("installing the metrics recorder")?;
    let addr = app.settings().http_addr.clone();
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (set ORCH_HTTP_ADDR)"))?;
    tracing::info!(addr = %listener.local_addr()?, "HTTP API listening");
    let mut state = ApiState::new(app.clone(), handle);
    state.runs_agents = runs_agents;
    api::serve(listener, api::router(state), stop).await?;
    Ok(())
}

async fn enqueue(settings: Settings, args: EnqueueArgs) -> anyhow::Result<()> {
    let app = connect_migrated(settings).await?;
    let payload = match &args.payload {
        Some(text) => Some(serde_json::from_str(text).context("--payload is not valid JSON")?),
        None => None,
    };
    let run_at = match &args.run_at {
        Some(text) => Some(
            chrono::DateTime::parse_from_rfc3339(text)
                .context("--run-at must be an RFC 3339 time, e.g. 2026-01-01T12:00:00Z")?
                .with_timezone(&chrono::Utc),
        ),
        None => None,
    };
    let request = JobRequest {
        kind: args.kind,
        queue: args.queue,
        priority: args.priority,
        payload,
        max_attempts: args.max_attempts,
        timeout_secs: args.timeout_secs,
        run_at,
        delay_secs: args.delay_secs,
        idempotency_key: args.idempotency_key,
        callback_url: args.callback_url,
        unique: args.unique_key.map(|key| UniqueRequest {
            key,
            for_secs: args.unique_for_secs,
            states: None,
        }),
        concurrency_key: args.concurrency_key,
        ..JobRequest::default()
    };
    let jobs = app.validate(vec![request], CLI_ACTOR)?;
    let stored = app.enqueue(&jobs).await?;
    let Some((mut job, _)) = stored.into_iter().next() else {
        bail!("nothing was enqueued");
    };
    if args.wait {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(args.wait_secs);
        while !job.status.is_terminal() {
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "job {} is still {} after {}s",
                    job.id,
                    job.status,
                    args.wait_secs
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            job = app.job(job.id).await?;
        }
    }
    out(&serde_json::to_string_pretty(&job)?)?;
    Ok(())
}

/// Prints a line to stdout; a closed pipe (`| head`) ends the output quietly.
fn out(line: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{line}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn parse_id(id: &str) -> anyhow::Result<JobId> {
    id.parse()
        .with_context(|| format!("{id:?} is not a job id (a UUID)"))
}

async fn jobs(settings: Settings, command: JobsCommand) -> anyhow::Result<()> {
    let app = connect_migrated(settings).await?;
    match command {
        JobsCommand::List {
            status,
            queue,
            kind,
            limit,
            before,
        } => {
            let filter = JobFilter {
                status: status.map(|s| s.parse::<Status>()).transpose()?,
                queue,
                kind,
                before: before.map(|b| parse_id(&b)).transpose()?,
                limit: limit.clamp(1, 1000),
            };
            for job in app.jobs(&filter).await? {
                out(&format!(
                    "{}  {:<9}  {:<12} {:<10} p{:<2} attempt {}/{}  {}",
                    job.id,
                    job.status,
                    job.queue,
                    job.kind,
                    job.priority,
                    job.attempt,
                    job.max_attempts,
                    job.created_at.to_rfc3339()
                ))?;
            }
        }
        JobsCommand::Show { id } => {
            let id = parse_id(&id)?;
            let job = app.job(id).await?;
            let events = app.job_events(id, None).await?;
            let shown = serde_json::json!({ "job": job, "events": events });
            out(&serde_json::to_string_pretty(&shown)?)?;
        }
        JobsCommand::Retry { id } => {
            let job = app.retry_dead(parse_id(&id)?, CLI_ACTOR).await?;
            out(&serde_json::to_string_pretty(&job)?)?;
        }
        JobsCommand::Deliveries { id } => {
            let deliveries = app.deliveries(parse_id(&id)?).await?;
            out(&serde_json::to_string_pretty(&deliveries)?)?;
        }
        JobsCommand::Redeliver { id, delivery } => {
            let again = app.redeliver(parse_id(&id)?, delivery, CLI_ACTOR).await?;
            out(&serde_json::to_string_pretty(&again)?)?;
        }
    }
    Ok(())
}

async fn webhooks(settings: Settings, command: WebhooksCommand) -> anyhow::Result<()> {
    if let WebhooksCommand::Secret = command {
        let secret = orchestrator::app::new_webhook_secret()
            .map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
        return out(&secret);
    }
    let app = connect_migrated(settings).await?;
    let some = |list: Vec<String>| (!list.is_empty()).then_some(list);
    match command {
        WebhooksCommand::Add {
            url,
            events,
            queues,
            kinds,
            description,
        } => {
            let request = orchestrator::job::WebhookRequest {
                url,
                events,
                queues: some(queues),
                kinds: some(kinds),
                description,
            };
            let hook = app.create_webhook(request, CLI_ACTOR).await?;
            out(&serde_json::to_string_pretty(&hook)?)?;
        }
        WebhooksCommand::List => {
            out(&serde_json::to_string_pretty(&app.webhooks().await?)?)?;
        }
        WebhooksCommand::Remove { id } => {
            let id: uuid::Uuid = id.parse().context("not a webhook id (a UUID)")?;
            let dropped = app.delete_webhook(id, CLI_ACTOR).await?;
            eprintln!("webhook {id} removed; {dropped} pending deliveries dropped");
        }
        // Answered above, before connecting.
        WebhooksCommand::Secret => {}
    }
    Ok(())
}

/// A schedule policy flag (`skip`, `latest`, …) as its type: clap has
/// checked the word, and as a JSON string it parses.
fn policy<T: serde::de::DeserializeOwned>(raw: Option<String>) -> anyhow::Result<Option<T>> {
    Ok(raw
        .map(|word| serde_json::from_value(serde_json::Value::String(word)))
        .transpose()?)
}

async fn schedules(settings: Settings, command: SchedulesCommand) -> anyhow::Result<()> {
    let app = connect_migrated(settings).await?;
    let id = |raw: &str| -> anyhow::Result<ScheduleId> {
        Ok(ScheduleId(
            raw.parse().context("not a schedule id (a UUID)")?,
        ))
    };
    let job = |raw: Option<String>| -> anyhow::Result<Option<orchestrator::job::JobRequest>> {
        raw.map(|j| {
            serde_json::from_str(&j)
                .context("--job is not a valid job (JSON, as POST /v1/jobs takes)")
        })
        .transpose()
    };
    let schedule = match command {
        SchedulesCommand::Add {
            name,
            cron,
            timezone,
            job: raw_job,
            overlap,
            catch_up,
            catch_up_limit,
            paused,
        } => {
            let request = ScheduleRequest {
                name: Some(name),
                cron: Some(cron),
                timezone: Some(timezone),
                job: job(Some(raw_job))?,
                paused: Some(paused),
                overlap: policy(overlap)?,
                catch_up: policy(catch_up)?,
                catch_up_limit,
            };
            app.create_schedule(request, CLI_ACTOR).await?
        }
        SchedulesCommand::Edit {
            id: raw,
            name,
            cron,
            timezone,
            job: raw_job,
            overlap,
            catch_up,
            catch_up_limit,
        } => {
            let patch = ScheduleRequest {
                name,
                cron,
                timezone,
                job: job(raw_job)?,
                paused: None,
                overlap: policy(overlap)?,
                catch_up: policy(catch_up)?,
                catch_up_limit,
            };
            app.update_schedule(id(&raw)?, patch, CLI_ACTOR).await?
        }
        SchedulesCommand::List => {
            return out(&serde_json::to_string_pretty(&app.schedules().await?)?);
        }
        SchedulesCommand::Show { id: raw } => app.schedule(id(&raw)?).await?,
        SchedulesCommand::Pause { id: raw } => {
            let patch = ScheduleRequest {
                paused: Some(true),
                ..ScheduleRequest::default()
            };
            app.update_schedule(id(&raw)?, patch, CLI_ACTOR).await?
        }
        SchedulesCommand::Resume { id: raw } => {
            let patch = ScheduleRequest {
                paused: Some(false),
                ..ScheduleRequest::default()
            };
            app.update_schedule(id(&raw)?, patch, CLI_ACTOR).await?
        }
        SchedulesCommand::Remove { id: raw } => {
            let id = id(&raw)?;
            app.delete_schedule(id).await?;
            eprintln!("schedule {id} removed; the jobs it enqueued stay");
            return Ok(());
        }
    };
    out(&serde_json::to_string_pretty(&schedule)?)
}

/// What a resume records when no reason is given.
const RESUME_REASON: &str = "no reason given";

fn reason_arg(raw: &str) -> anyhow::Result<&str> {
    orchestrator::app::valid_reason(raw).map_err(|e| anyhow::anyhow!("--{e}"))
}

async fn kill_all(settings: Settings, reason: &str) -> anyhow::Result<()> {
    let reason = reason_arg(reason)?;
    let app = App::connect_without_postgres(settings).await?;
    let report = app.kill_all(CLI_ACTOR, reason).await?;
    out(&serde_json::to_string_pretty(&report)?)?;
    eprintln!(
        "kill switch engaged: {} cancelled, {} finished first, {} failed",
        report.cancelled, report.finished, report.failed
    );
    anyhow::ensure!(
        report.failed == 0,
        "{} running jobs were not confirmed stopped (see \"jobs\")",
        report.failed
    );
    Ok(())
}

async fn resume(settings: Settings, reason: &str) -> anyhow::Result<()> {
    let reason = reason_arg(reason)?;
    let app = App::connect_without_postgres(settings).await?;
    let report = app.resume(CLI_ACTOR, reason).await?;
    out(&serde_json::to_string_pretty(&report)?)?;
    Ok(())
}

async fn cancel(settings: Settings, id: &str, reason: &str) -> anyhow::Result<()> {
    let reason = reason_arg(reason)?;
    let app = connect_migrated(settings).await?;
    let (job, note) = match app.cancel(parse_id(id)?, CLI_ACTOR, reason).await? {
        orchestrator::app::Cancel::Done(job) => (job, "cancelled"),
        orchestrator::app::Cancel::Requested(job) => (job, "running; its worker will stop it"),
    };
    eprintln!("{}: {note}", job.id);
    out(&serde_json::to_string_pretty(&job)?)?;
    Ok(())
}

async fn queues(settings: Settings, command: Option<QueuesCommand>) -> anyhow::Result<()> {
    let app = connect_migrated(settings).await?;
    match command {
        None => {
            println!(
                "{:<24} {:>8} {:>8} {:>8}  paused",
                "queue", "pending", "delayed", "active"
            );
            for q in app.queues().await? {
                println!(
                    "{:<24} {:>8} {:>8} {:>8}  {}",
                    q.name, q.pending, q.delayed, q.active, q.paused
                );
            }
        }
        Some(QueuesCommand::Pause { name }) => {
            let q = QueueName::parse(name)?;
            app.set_paused(&q, true, CLI_ACTOR).await?;
            eprintln!("queue {q} paused");
        }
        Some(QueuesCommand::Resume { name }) => {
            let q = QueueName::parse(name)?;
            app.set_paused(&q, false, CLI_ACTOR).await?;
            eprintln!("queue {q} resumed");
        }
    }
    Ok(())
}
