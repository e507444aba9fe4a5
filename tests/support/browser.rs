//! A headless Debian chromium, driven through chromium-driver over the W3C
//! WebDriver protocol.
//!
//! Written on reqwest rather than with fantoccini or thirtyfour: both build
//! on Mozilla's `webdriver` crate, which is MPL-2.0 and outside deny.toml's
//! permissive-only policy, and the dozen endpoints used here are plain JSON.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

use super::env::free_port;
use super::servers::wait_port;

/// The W3C key for an element reference in WebDriver JSON.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// How long `wait_*` helpers wait by default.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub struct Browser {
    driver: Child,
    base: String,
    client: reqwest::Client,
    _profile: tempfile::TempDir,
}

/// A node on the page, as WebDriver names it.
#[derive(Debug, Clone)]
pub struct Element(String);

impl Browser {
    pub async fn start() -> Browser {
        let driver_bin = std::env::var("ORCH_CHROMEDRIVER")
            .unwrap_or_else(|_| "/usr/bin/chromedriver".to_owned());
        let chromium =
            std::env::var("ORCH_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
        assert!(
            Path::new(&driver_bin).exists() && Path::new(&chromium).exists(),
            "no {chromium} or {driver_bin}: run the tests with scripts/test.sh, which installs chromium and chromium-driver"
        );
        let port = free_port();
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chromedriver");
        wait_port(port, Duration::from_secs(20));
        let profile = tempfile::tempdir().expect("profile dir");
        let client = reqwest::Client::new();
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--window-size=1400,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        } } });
        let r: Value = client
            .post(format!("http://127.0.0.1:{port}/session"))
            .json(&caps)
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .expect("session JSON");
        let id = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("chromedriver refused a session: {r}"))
            .to_owned();
        Browser {
            driver,
            base: format!("http://127.0.0.1:{port}/session/{id}"),
            client,
            _profile: profile,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut r = self.client.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            r = r.json(&body);
        }
        let v: Value = r
            .send()
            .await
            .expect("WebDriver")
            .json()
            .await
            .expect("WebDriver JSON");
        v["value"].clone()
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn get(&self, path: &str) -> Value {
        self.call(reqwest::Method::GET, path, None).await
    }

    pub async fn goto(&self, url: &str) {
        let v = self.post("/url", json!({ "url": url })).await;
        assert!(v.is_null(), "navigating to {url}: {v}");
    }

    pub async fn url(&self) -> String {
        self.get("/url")
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Every element matching a CSS selector (none is not an error).
    pub async fn find_all(&self, css: &str) -> Vec<Element> {
        let v = self
            .post(
                "/elements",
                json!({ "using": "css selector", "value": css }),
            )
            .await;
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e[ELEMENT].as_str().map(|s| Element(s.to_owned())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The element matching `css`, waiting for it to appear.
    pub async fn find(&self, css: &str) -> Element {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(e) = self.find_all(css).await.into_iter().next() {
                return e;
            }
            if Instant::now() >= deadline {
                let body = self.text_of("body").await;
                panic!(
                    "no element {css} on {}, which shows:\n{body}",
                    self.url().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn text(&self, e: &Element) -> String {
        self.get(&format!("/element/{}/text", e.0))
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The text of the element matching `css` ("" when there is none, or
    /// it was replaced while being read).
    pub async fn text_of(&self, css: &str) -> String {
        match self.find_all(css).await.into_iter().next() {
            Some(e) => self.text(&e).await,
            None => String::new(),
        }
    }

    pub async fn attribute(&self, css: &str, name: &str) -> Option<String> {
        let e = self.find_all(css).await.into_iter().next()?;
        self.get(&format!("/element/{}/property/{name}", e.0))
            .await
            .as_str()
            .map(str::to_owned)
    }

    /// Waits until the text of `css` satisfies `check`, which the page must
    /// reach by itself (nothing here reloads it); returns that text.
    pub async fn wait_text(&self, css: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let text = self.text_of(css).await;
            if check(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{css} never showed {what}; it shows {text:?} on {}",
                self.url().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn click(&self, css: &str) {
        let e = self.find(css).await;
        let v = self
            .post(&format!("/element/{}/click", e.0), json!({}))
            .await;
        assert!(v.is_null(), "clicking {css}: {v}");
    }

    /// Types into the field matching `css`, as a person would.
    pub async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        let v = self
            .post(&format!("/element/{}/value", e.0), json!({ "text": text }))
            .await;
        assert!(v.is_null(), "typing into {css}: {v}");
    }

    /// The value of a cookie the page holds (HttpOnly ones included: the
    /// driver sees what a script cannot).
    pub async fn cookie(&self, name: &str) -> Option<Value> {
        let v = self.get(&format!("/cookie/{name}")).await;
        v.get("value").is_some().then_some(v)
    }

    /// Runs a script in the page and returns its value.
    pub async fn script(&self, source: &str) -> Value {
        self.post("/execute/sync", json!({ "script": source, "args": [] }))
            .await
    }

    /// A PNG of the viewport, written to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let v = self.get("/screenshot").await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64 PNG"))
            .expect("PNG");
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(path, png).expect("write screenshot");
    }

    /// Logs in at `base` with `token` through the form, and waits for the
    /// overview.
    pub async fn login(&self, base: &str, token: &str) {
        self.goto(&format!("{base}/ui/")).await;
        assert!(
            self.url().await.ends_with("/ui/login"),
            "a visitor goes to the login form"
        );
        self.type_into("#token", token).await;
        self.click("#login").await;
        self.find("#whoami").await;
    }
}

impl Browser {
    /// Ends the session, which closes chromium.
    pub async fn quit(self) {
        let _ = self.client.delete(&self.base).send().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // After `quit`, or when a test failed before it: the driver goes.
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// The repository's `docs/` directory, where screenshots go.
pub fn docs_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs")
}
