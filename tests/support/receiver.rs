//! A webhook receiver on 127.0.0.1 for tests: it checks every signature
//! with its own implementation of the Standard Webhooks algorithm (not the
//! crate's), records what arrives in order, and can misbehave on request:
//! fail the first deliveries, go down for a while, hold requests, or (as a
//! coordinator) answer with a body of the test's choosing, signed or not.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// One request as it arrived.
#[derive(Debug, Clone)]
pub struct Received {
    pub id: String,
    pub timestamp: String,
    pub signature: String,
    pub body: serde_json::Value,
    /// The signature verified under the receiver's secret.
    pub valid: bool,
    /// What the receiver answered (0: it was down or hung up).
    pub answered: u16,
}

/// What the receiver answers, request by request.
#[derive(Clone)]
pub enum Answer {
    /// 204 to everything.
    Ok,
    /// A JSON body, signed with `signer` under the request's webhook-id
    /// (or another id, or unsigned), after `delay`.
    Body {
        body: serde_json::Value,
        sign: Signing,
        delay: Duration,
        status: u16,
    },
}

#[derive(Clone)]
pub enum Signing {
    /// With the receiver's secret, under the request's id.
    Good,
    /// With another secret.
    Forged(String),
    /// With the right secret, under another message id (a replay).
    OtherId,
    None,
}

struct State {
    got: Vec<Received>,
    fail_first: usize,
    /// After this many successful answers, go down for `down_for`.
    down_after: Option<(usize, Duration)>,
    successes: usize,
    answer: Answer,
}

pub struct Receiver {
    pub url: String,
    key: Vec<u8>,
    state: Arc<Mutex<State>>,
    /// While true, requests wait (unanswered) until it turns false.
    hold: watch::Sender<bool>,
    stop: CancellationToken,
}

/// The key bytes of a `whsec_` secret.
pub fn key_of(secret: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .expect("a whsec_ secret")
}

/// The Standard Webhooks signature, computed here independently.
pub fn sign(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

impl Receiver {
    /// Starts on a free port of 127.0.0.1, verifying with `secret`.
    pub async fn start(secret: &str) -> Receiver {
        let (hold, _) = watch::channel(false);
        let receiver = Receiver {
            url: String::new(),
            key: key_of(secret),
            state: Arc::new(Mutex::new(State {
                got: Vec::new(),
                fail_first: 0,
                down_after: None,
                successes: 0,
                answer: Answer::Ok,
            })),
            hold,
            stop: CancellationToken::new(),
        };
        let socket = bind(0);
        let addr = socket.local_addr().expect("addr");
        let mut receiver = receiver;
        receiver.url = format!("http://{addr}/hook");
        receiver.serve(socket);
        receiver
    }

    fn serve(&self, first: tokio::net::TcpListener) {
        let state = self.state.clone();
        let key = self.key.clone();
        let hold = self.hold.subscribe();
        let stop = self.stop.clone();
        let port = first.local_addr().expect("addr").port();
        tokio::spawn(async move {
            let mut listener = Some(first);
            loop {
                let down = CancellationToken::new();
                let app = {
                    let (state, key, hold, down) =
                        (state.clone(), key.clone(), hold.clone(), down.clone());
                    axum::Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
                        handle(
                            state.clone(),
                            key.clone(),
                            hold.clone(),
                            down.clone(),
                            headers,
                            body,
                        )
                    })
                };
                let l = listener.take().unwrap_or_else(|| bind(port));
                let until = down.clone();
                let stopped = stop.clone();
                let served = axum::serve(l, app).with_graceful_shutdown(async move {
                    tokio::select! {
                        () = until.cancelled() => {}
                        () = stopped.cancelled() => {}
                    }
                });
                let _ = served.await;
                if stop.is_cancelled() {
                    return;
                }
                // Down: nothing listens on the port for a while.
                let pause = state
                    .lock()
                    .expect("lock")
                    .down_after
                    .take()
                    .map_or(Duration::ZERO, |(_, d)| d);
                tokio::time::sleep(pause).await;
            }
        });
    }

    pub fn fail_first(&self, n: usize) {
        self.state.lock().expect("lock").fail_first = n;
    }

    pub fn down_after(&self, successes: usize, down_for: Duration) {
        self.state.lock().expect("lock").down_after = Some((successes, down_for));
    }

    pub fn answer(&self, answer: Answer) {
        self.state.lock().expect("lock").answer = answer;
    }

    pub fn hold(&self, on: bool) {
        self.hold.send_replace(on);
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().expect("lock").got.clone()
    }

    /// A signature over `body` as the receiver would make it.
    pub fn sign(&self, id: &str, timestamp: &str, body: &[u8]) -> String {
        sign(&self.key, id, timestamp, body)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn bind(port: u16) -> tokio::net::TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    // Coming back up on the same port right after going down.
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .expect("bind the receiver");
    socket.listen(1024).expect("listen")
}

async fn handle(
    state: Arc<Mutex<State>>,
    key: Vec<u8>,
    mut hold: watch::Receiver<bool>,
    down: CancellationToken,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (id, timestamp, signature) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let expected = sign(&key, &id, &timestamp, &body);
    let valid = !id.is_empty()
        && signature
            .split(' ')
            .any(|s| s.strip_prefix("v1,") == Some(expected.as_str()));
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let index = {
        let mut s = state.lock().expect("lock");
        s.got.push(Received {
            id: id.clone(),
            timestamp,
            signature,
            body: json,
            valid,
            answered: 0,
        });
        s.got.len() - 1
    };
    // Held: wait, unanswered, until released (or the client gives up).
    while *hold.borrow_and_update() {
        if hold.changed().await.is_err() {
            break;
        }
    }
    let (status, answer) = {
        let mut s = state.lock().expect("lock");
        let status = if s.fail_first > 0 {
            s.fail_first -= 1;
            500
        } else {
            200
        };
        if status == 200 {
            s.successes += 1;
            if let Some((after, _)) = s.down_after {
                if s.successes >= after {
                    down.cancel();
                }
            }
        }
        s.got[index].answered = status;
        (status, s.answer.clone())
    };
    if status != 200 {
        return (StatusCode::INTERNAL_SERVER_ERROR, "failing on purpose").into_response();
    }
    match answer {
        Answer::Ok => StatusCode::NO_CONTENT.into_response(),
        Answer::Body {
            body,
            sign: signing,
            delay,
            status,
        } => {
            tokio::time::sleep(delay).await;
            let bytes = serde_json::to_vec(&body).expect("json");
            let ts = chrono::Utc::now().timestamp().to_string();
            let mut response = Response::builder()
                .status(status)
                .header("content-type", "application/json");
            let signed = match signing {
                Signing::Good => Some((id.clone(), sign(&key, &id, &ts, &bytes))),
                Signing::Forged(other) => {
                    Some((id.clone(), sign(&key_of(&other), &id, &ts, &bytes)))
                }
                Signing::OtherId => {
                    let other = format!("{id}-replayed");
                    Some((other.clone(), sign(&key, &other, &ts, &bytes)))
                }
                Signing::None => None,
            };
            if let Some((answer_id, sig)) = signed {
                response = response
                    .header("webhook-id", answer_id)
                    .header("webhook-timestamp", ts)
                    .header("webhook-signature", format!("v1,{sig}"));
            }
            response
                .body(axum::body::Body::from(bytes))
                .expect("response")
        }
    }
}
