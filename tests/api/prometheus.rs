//! A real Prometheus server (Debian's `prometheus`) scraping the API and
//! two `orchestrator worker` processes, each on its own `metrics_addr`:
//! PromQL sees queue depth (from the API alone, read at scrape time),
//! throughput, the wait-time p99 and busy slots per worker.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::api::TestApi;
use crate::support::{free_port, request, unique_queue, WorkerProcess};

const PROMETHEUS: &str = "/usr/bin/prometheus";

/// A Prometheus server scraping `targets` (job name → addresses) every
/// second; killed on drop.
struct Prometheus {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(targets: &[(&str, Vec<String>)]) -> Prometheus {
        assert!(
            std::path::Path::new(PROMETHEUS).exists(),
            "{PROMETHEUS} is missing: scripts/test.sh installs Debian's prometheus package"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
        );
        for (job, addrs) in targets {
            let list: Vec<String> = addrs.iter().map(|a| format!("'{a}'")).collect();
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
                list.join(", ")
            ));
        }
        let file = dir.path().join("prometheus.yml");
        std::fs::write(&file, config).expect("write config");
        let port = free_port();
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            base: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    /// The instant vector `query` evaluates to: (labels, value) pairs.
    async fn query(&self, client: &reqwest::Client, query: &str) -> Vec<(serde_json::Value, f64)> {
        let Ok(response) = client
            .get(format!("{}/api/v1/query", self.base))
            .query(&[("query", query)])
            .send()
            .await
        else {
            return Vec::new();
        };
        let Ok(body) = response.json::<serde_json::Value>().await else {
            return Vec::new();
        };
        assert_ne!(body["status"], "error", "{query}: {body}");
        body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|r| {
                let value = r["value"][1].as_str()?.parse::<f64>().ok()?;
                Some((r["metric"].clone(), value))
            })
            .collect()
    }

    /// Polls `query` until `done` holds for its result (within `limit`).
    async fn until(
        &self,
        client: &reqwest::Client,
        query: &str,
        limit: Duration,
        done: impl Fn(&[(serde_json::Value, f64)]) -> bool,
    ) -> Vec<(serde_json::Value, f64)> {
        let deadline = Instant::now() + limit;
        loop {
            let result = self.query(client, query).await;
            if done(&result) {
                return result;
            }
            assert!(Instant::now() < deadline, "{query} never held: {result:?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Enqueues `n` jobs that sleep `ms` each.
async fn sleepers(api: &TestApi, q: &str, n: usize, ms: u64) -> Vec<orchestrator::job::JobId> {
    let requests = (0..n)
        .map(|_| request("sleep", q, serde_json::json!({ "ms": ms })))
        .collect();
    api.env
        .enqueue(requests)
        .await
        .iter()
        .map(|j| j.id)
        .collect()
}

#[tokio::test]
async fn prometheus_sees_depth_throughput_wait_time_and_busy_slots() {
    let api = TestApi::spawn().await;
    let q = unique_queue();
    let ports = [free_port(), free_port()];
    let _workers: Vec<WorkerProcess> = ports
        .iter()
        .map(|p| {
            WorkerProcess::spawn_with(
                &api.env,
                &q,
                2,
                &[("ORCH_METRICS_ADDR", &format!("127.0.0.1:{p}"))],
            )
        })
        .collect();
    let client = reqwest::Client::new();
    // Each worker answers on its own address.
    for port in ports {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = client
                .get(format!("http://127.0.0.1:{port}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "worker on {port} never served /healthz"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let ready = client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            .expect("readyz");
        let body: serde_json::Value = ready.json().await.expect("json");
        assert_eq!(body["checks"]["postgres"], "ok", "{body}");
    }
    let api_addr = api.base.trim_start_matches("http://").to_owned();
    let prometheus = Prometheus::start(&[
        ("api", vec![api_addr]),
        (
            "workers",
            ports.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
        ),
    ]);

    let limit = Duration::from_secs(60);
    // Every target scraped before any job runs, so rates see them move.
    prometheus
        .until(&client, "sum(up)", limit, |r| {
            r.first().is_some_and(|(_, v)| *v == 3.0)
        })
        .await;

    // Four jobs fill both workers' two slots (no prefetch) and run until
    // Prometheus has scraped every slot busy; then they are cancelled.
    let holders = sleepers(&api, &q, 4, 600_000).await;
    let busy = prometheus
        .until(
            &client,
            "orchestrator_worker_slots_busy{job=\"workers\"}",
            limit,
            |r| r.len() == 2 && r.iter().all(|(_, v)| *v >= 2.0),
        )
        .await;
    assert!(busy.iter().all(|(_, v)| *v == 2.0), "{busy:?}");
    for id in &holders {
        api.env
            .app
            .cancel(*id, "test", "slots seen busy")
            .await
            .expect("cancel");
    }
    api.env
        .wait_terminal(&holders, Duration::from_secs(60))
        .await;

    // Five jobs wait an hour (delayed depth); twelve run a second each.
    let mut delayed = Vec::new();
    for _ in 0..5 {
        let mut r = request("noop", &q, serde_json::json!({}));
        r.delay_secs = Some(3600);
        delayed.push(r);
    }
    api.env.enqueue(delayed).await;
    let ids = sleepers(&api, &q, 12, 1000).await;
    api.env.wait_terminal(&ids, Duration::from_secs(60)).await;

    // Depth from the API alone, which runs no worker: read at scrape time.
    prometheus
        .until(
            &client,
            &format!("orchestrator_queue_depth{{job=\"api\",queue=\"{q}\",state=\"delayed\"}}"),
            limit,
            |r| r.len() == 1 && r[0].1 == 5.0,
        )
        .await;
    // Every process reports the same global depth: `max`, not `sum`.
    prometheus
        .until(
            &client,
            &format!("max by (queue, state) (orchestrator_queue_depth{{queue=\"{q}\",state=\"delayed\"}})"),
            limit,
            |r| r.len() == 1 && r[0].1 == 5.0,
        )
        .await;
    let finished = prometheus
        .until(
            &client,
            &format!("sum(max_over_time(orchestrator_jobs_finished_total{{queue=\"{q}\",outcome=\"succeeded\"}}[5m]))"),
            limit,
            |r| r.first().is_some_and(|(_, v)| *v == 12.0),
        )
        .await;
    assert_eq!(finished[0].1, 12.0, "throughput counts every job once");
    prometheus
        .until(
            &client,
            &format!("sum(rate(orchestrator_jobs_finished_total{{queue=\"{q}\"}}[1m]))"),
            limit,
            |r| r.first().is_some_and(|(_, v)| *v > 0.0),
        )
        .await;
    let p99 = prometheus
        .until(
            &client,
            &format!("histogram_quantile(0.99, sum by (le) (rate(orchestrator_job_wait_seconds_bucket{{queue=\"{q}\"}}[1m])))"),
            limit,
            |r| r.first().is_some_and(|(_, v)| v.is_finite() && *v >= 0.0),
        )
        .await;
    assert!(p99[0].1 < 60.0, "wait p99 {}", p99[0].1);
    let busy = prometheus
        .until(
            &client,
            "max by (instance) (max_over_time(orchestrator_worker_slots_busy{job=\"workers\"}[5m]))",
            limit,
            |r| r.len() == 2 && r.iter().all(|(_, v)| *v >= 2.0),
        )
        .await;
    assert!(
        busy.iter().all(|(_, v)| *v <= 2.0),
        "at most 2 slots each: {busy:?}"
    );
    let slots = prometheus
        .query(&client, "orchestrator_worker_slots{job=\"workers\"}")
        .await;
    assert_eq!(slots.len(), 2, "{slots:?}");
    assert!(slots.iter().all(|(_, v)| *v == 2.0), "{slots:?}");
}

fn deploy(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

fn promtool(args: &[&str]) -> std::process::Output {
    let promtool = std::env::var("ORCH_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    Command::new(promtool)
        .args(args)
        .output()
        .expect("run promtool (scripts/test.sh installs it)")
}

#[test]
fn the_alert_rules_are_valid_and_every_rule_is_unit_tested() {
    let rules = deploy("prometheus/alerts.yml");
    let checked = promtool(&["check", "rules", rules.to_str().expect("utf-8")]);
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stdout)
    );
    let tests = deploy("prometheus/alerts_test.yml");
    let tested = promtool(&["test", "rules", tests.to_str().expect("utf-8")]);
    assert!(
        tested.status.success(),
        "{}{}",
        String::from_utf8_lossy(&tested.stdout),
        String::from_utf8_lossy(&tested.stderr)
    );
    // Every rule has a case in the tests.
    let rules_text = std::fs::read_to_string(&rules).expect("read rules");
    let tests_text = std::fs::read_to_string(&tests).expect("read tests");
    let names: Vec<&str> = rules_text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert_eq!(names.len(), 6, "{names:?}");
    for name in names {
        assert!(
            tests_text.contains(&format!("alertname: {name}")),
            "{name} has no test"
        );
    }
    let config = deploy("prometheus/prometheus.yml");
    let checked = promtool(&["check", "config", config.to_str().expect("utf-8")]);
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stdout)
    );
}

#[tokio::test]
async fn every_dashboard_query_runs_against_a_real_prometheus() {
    let api = TestApi::spawn().await;
    let prometheus = Prometheus::start(&[(
        "orchestrator-api",
        vec![api.base.trim_start_matches("http://").to_owned()],
    )]);
    let client = reqwest::Client::new();
    prometheus
        .until(&client, "sum(up)", Duration::from_secs(60), |r| {
            r.first().is_some_and(|(_, v)| *v == 1.0)
        })
        .await;
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/orchestrator.json")).expect("read dashboard"),
    )
    .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 12, "{} panels", panels.len());
    let mut queries = 0;
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            // Grafana's own variable, as Grafana would fill it in.
            let expr = expr.replace("$__rate_interval", "1m");
            let response: serde_json::Value = client
                .get(format!("{}/api/v1/query", prometheus.base))
                .query(&[("query", expr.as_str())])
                .send()
                .await
                .expect("query")
                .json()
                .await
                .expect("json");
            assert_eq!(
                response["status"], "success",
                "panel {:?}: {expr}: {response}",
                panel["title"]
            );
            queries += 1;
        }
    }
    assert!(queries >= panels.len());
}
