//! One Valkey server or a Valkey Cluster, behind one connection type.
//!
//! The crate has a connection type for each (a `ConnectionManager`, a
//! cluster's `ClusterConnection`) and no common one, so this enum forwards
//! the three methods of `ConnectionLike`; every command, pipeline and
//! script then works on either. Both reconnect by themselves: the manager
//! redials its server, the cluster connection follows `MOVED`, `ASK` and a
//! failover's new primary, refreshing its slot map.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// Where Valkey is: `valkey_url` names one server, or several (comma
/// separated) seed nodes of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub urls: Vec<String>,
    pub cluster: bool,
}

impl Topology {
    /// `cluster` is `valkey.cluster`; a list of several URLs means a
    /// cluster either way.
    pub fn parse(url: &str, cluster: bool) -> Self {
        let urls: Vec<String> = url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        let cluster = cluster || urls.len() > 1;
        Topology { urls, cluster }
    }

    /// The URLs without their passwords, for errors and logs.
    pub fn redacted(&self) -> String {
        self.urls
            .iter()
            .map(|u| match url::Url::parse(u) {
                Ok(mut parsed) => {
                    if parsed.password().is_some() {
                        // Only fails for URLs that cannot carry one.
                        let _ = parsed.set_password(Some("***"));
                    }
                    parsed.to_string()
                }
                Err(_) => "<not a URL>".to_owned(),
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Connection {
    pub async fn open(topology: &Topology) -> redis::RedisResult<Self> {
        if topology.cluster {
            // The crate's defaults retry 16 times over minutes; a queue
            // operation should fail within seconds and let its caller (or
            // Postgres, which holds the truth) decide.
            let client = ClusterClientBuilder::new(topology.urls.iter().map(String::as_str))
                .connection_timeout(Duration::from_secs(3))
                .response_timeout(Duration::from_secs(10))
                .overall_response_timeout(Some(Duration::from_secs(20)))
                .retries(8)
                .min_retry_wait(50)
                .max_retry_wait(2_000)
                .build()?;
            Ok(Connection::Cluster(client.get_async_connection().await?))
        } else {
            let url = topology.urls.first().map(String::as_str).unwrap_or("");
            let client = redis::Client::open(url)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(3)))
                .set_response_timeout(Some(Duration::from_secs(10)))
                .set_number_of_retries(3)
                .set_max_delay(Duration::from_secs(2));
            Ok(Connection::Single(
                client.get_connection_manager_with_config(config).await?,
            ))
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Connection::Cluster(_))
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_urls_mean_a_cluster() {
        let one = Topology::parse("redis://127.0.0.1:6379", false);
        assert_eq!(one.urls, vec!["redis://127.0.0.1:6379"]);
        assert!(!one.cluster);
        assert!(Topology::parse("redis://127.0.0.1:7000", true).cluster);
        let many = Topology::parse(" redis://a:7000, redis://b:7001 ,", false);
        assert_eq!(many.urls, vec!["redis://a:7000", "redis://b:7001"]);
        assert!(many.cluster);
        let secret = Topology::parse(
            "redis://:hunter2@a:7000,redis://u:pw@b:7001,nonsense",
            false,
        );
        let shown = secret.redacted();
        assert!(
            !shown.contains("hunter2") && !shown.contains(":pw@"),
            "{shown}"
        );
        assert_eq!(
            shown,
            "redis://:***@a:7000,redis://u:***@b:7001,<not a URL>"
        );
    }
}
