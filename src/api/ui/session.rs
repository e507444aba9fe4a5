//! Dashboard sessions.
//!
//! Logging in with a bearer token opens a session: a random id in an
//! `HttpOnly`, `SameSite=Strict` cookie (`Secure` behind TLS). Valkey holds
//! the session under the SHA-256 of that id, with the token's *name*, a MAC
//! binding the session to the token's current secret (see
//! `Tokens::login`) and a CSRF token; never the token. Every action
//! checks the CSRF token, and refuses a request another site started.

use std::time::Duration;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Form;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::super::auth::Caller;
use super::super::error::ApiError;
use super::super::ApiState;
use super::{to_login, views, wants_html, OrUi, UiError};

const COOKIE: &str = "orch_session";
/// What the session MAC covers, besides the id: a MAC made for anything
/// else can never pass for a session's.
const MAC_CONTEXT: &[u8] = b"orchestrator ui session\0";
/// Longer than any token we accept is a mistake, not a login.
const MAX_TOKEN_LEN: usize = 4096;

/// 32 random bytes, base64url: a session id or a CSRF token.
fn random_token() -> Result<String, ApiError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| {
        tracing::error!(error = %e, "no randomness for a session");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot open a session now; it has been logged",
        )
    })?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

fn id_hash(id: &str) -> String {
    crate::digest::sha256_hex(id.as_bytes())
}

fn mac_message(id: &str) -> Vec<u8> {
    [MAC_CONTEXT, id.as_bytes()].concat()
}

/// The session ids a request's cookies carry, well-formed ones only, at
/// most four. All are tried: a cookie of the same name planted by a
/// sibling domain must not hide the real one. Parsed by hand: one cookie,
/// whose value we generated (base64url), is all we ever read.
fn session_cookies(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(name, value)| {
            *name == COOKIE
                && value.len() == 43
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .map(|(_, value)| value.to_owned())
        .take(4)
        .collect()
}

fn cookie_header(state: &ApiState, headers: &HeaderMap, value: &str, max_age: u64) -> HeaderValue {
    let behind_tls = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    let secure = if state.app.settings().api.ui_secure_cookie || behind_tls {
        "; Secure"
    } else {
        ""
    };
    let cookie =
        format!("{COOKIE}={value}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}");
    // The value is base64url and the rest is ours: always a valid header.
    HeaderValue::from_str(&cookie).unwrap_or(HeaderValue::from_static("orch_session=; Max-Age=0"))
}

/// A logged-in dashboard user.
#[derive(Debug, Clone)]
pub struct Session {
    pub caller: Caller,
    pub csrf: String,
    id_hash: String,
}

impl Session {
    /// Refuses an action another site started, or one without this
    /// session's CSRF token.
    pub fn check(&self, headers: &HeaderMap, csrf: &str) -> Result<(), UiError> {
        same_origin(headers)?;
        if !bool::from(csrf.as_bytes().ct_eq(self.csrf.as_bytes())) {
            return Err(UiError::new(
                headers,
                ApiError::new(
                    StatusCode::FORBIDDEN,
                    "the form's CSRF token is missing or wrong; reload the page and try again",
                )
                .field("csrf"),
            ));
        }
        Ok(())
    }

    async fn load(state: &ApiState, headers: &HeaderMap) -> Result<Option<Session>, ApiError> {
        for id in session_cookies(headers) {
            if let Some(session) = Session::resume(state, &id).await? {
                return Ok(Some(session));
            }
        }
        Ok(None)
    }

    async fn resume(state: &ApiState, id: &str) -> Result<Option<Session>, ApiError> {
        let hash = id_hash(id);
        let Some(fields) = state.app.session(&hash).await? else {
            return Ok(None);
        };
        let (Some(name), Some(binding), Some(csrf)) = (
            fields.get("name"),
            fields.get("binding"),
            fields.get("csrf"),
        ) else {
            return Ok(None);
        };
        let Ok(tag) = URL_SAFE_NO_PAD.decode(binding) else {
            return Ok(None);
        };
        match state.tokens.resume(name, &mac_message(id), &tag) {
            Some(caller) => Ok(Some(Session {
                caller,
                csrf: csrf.clone(),
                id_hash: hash,
            })),
            None => {
                // The token was rotated or removed: the session ends with it.
                state.app.end_session(&hash).await?;
                Ok(None)
            }
        }
    }
}

/// A request a browser sent from another site: refused before anything
/// else is looked at. `Sec-Fetch-Site` and `Origin` are set by browsers,
/// not by scripts, so a page elsewhere cannot hide where it is.
fn same_origin(headers: &HeaderMap) -> Result<(), UiError> {
    let refuse = || {
        UiError::new(
            headers,
            ApiError::new(
                StatusCode::FORBIDDEN,
                "a request from another site is refused",
            ),
        )
    };
    // A browser that sends Sec-Fetch-Site says where the request came
    // from, whatever a proxy did to Host: that is the answer.
    if let Some(site) = headers.get("sec-fetch-site") {
        return match site.as_bytes() {
            b"same-origin" | b"none" => Ok(()),
            _ => Err(refuse()),
        };
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        // Not a browser, or one too old to say: the CSRF token decides.
        return Ok(());
    };
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| url::Url::parse(o).ok())
        .and_then(|u| {
            let host = u.host_str()?.to_owned();
            Some(match u.port() {
                Some(port) => format!("{host}:{port}"),
                None => host,
            })
        });
    // Behind a proxy that rewrites Host, the original is X-Forwarded-Host;
    // a page elsewhere cannot set either on a form post.
    let ours = [headers.get("x-forwarded-host"), headers.get(header::HOST)];
    match origin_host {
        Some(o)
            if ours
                .iter()
                .flatten()
                .any(|h| o.as_bytes().eq_ignore_ascii_case(h.as_bytes())) =>
        {
            Ok(())
        }
        _ => Err(refuse()),
    }
}

/// What a page does without a session: a browser asking for a page goes
/// to the login form; anything else (the script's fetches, a form post)
/// gets 401.
pub struct NoSession(Response);

impl IntoResponse for NoSession {
    fn into_response(self) -> Response {
        self.0
    }
}

impl FromRequestParts<ApiState> for Session {
    type Rejection = NoSession;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ApiState,
    ) -> Result<Self, Self::Rejection> {
        match Session::load(state, &parts.headers).await {
            Ok(Some(session)) => Ok(session),
            Ok(None) => {
                let page = parts.method == Method::GET
                    && wants_html(&parts.headers)
                    && parts.headers.get("x-orch-fragment").is_none();
                if page {
                    Err(NoSession(to_login()))
                } else {
                    Err(NoSession(
                        UiError::new(
                            &parts.headers,
                            ApiError::new(
                                StatusCode::UNAUTHORIZED,
                                "not logged in (or the session ended); log in at /ui/login",
                            ),
                        )
                        .into_response(),
                    ))
                }
            }
            Err(err) => Err(NoSession(UiError::new(&parts.headers, err).into_response())),
        }
    }
}

pub async fn login_page() -> Html<String> {
    Html(views::login_page(None).into_string())
}

#[derive(Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    token: String,
}

pub async fn login(
    State(state): State<ApiState>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Result<Response, UiError> {
    // A login from another site would log a person into someone else's
    // session: refused like any cross-site action.
    same_origin(&headers)?;
    let Form(form) = form
        .map_err(|e| ApiError::bad_request(e.body_text()))
        .or_ui(&headers)?;
    let presented = form.token.trim();
    let id = random_token().or_ui(&headers)?;
    let login = (presented.len() <= MAX_TOKEN_LEN)
        .then(|| state.tokens.login(presented.as_bytes(), &mac_message(&id)))
        .flatten();
    let Some((caller, tag)) = login else {
        tracing::info!("dashboard login refused: unknown token");
        let page = views::login_page(Some("That token is not valid."));
        return Ok((StatusCode::UNAUTHORIZED, Html(page.into_string())).into_response());
    };
    // A new login replaces whatever session this browser had.
    for old in session_cookies(&headers) {
        state
            .app
            .end_session(&id_hash(&old))
            .await
            .or_ui(&headers)?;
    }
    let csrf = random_token().or_ui(&headers)?;
    let ttl = Duration::from_secs(state.app.settings().api.ui_session_secs);
    let fields = [
        ("name", caller.name.clone()),
        ("binding", URL_SAFE_NO_PAD.encode(tag)),
        ("csrf", csrf),
        (
            "created_ms",
            chrono::Utc::now().timestamp_millis().to_string(),
        ),
    ];
    state
        .app
        .put_session(&id_hash(&id), &fields, ttl)
        .await
        .or_ui(&headers)?;
    tracing::info!(actor = %caller.name, "dashboard login");
    let cookie = cookie_header(&state, &headers, &id, ttl.as_secs());
    Ok((
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, cookie),
            (header::LOCATION, HeaderValue::from_static("/ui/")),
        ],
    )
        .into_response())
}

#[derive(Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    pub csrf: String,
}

pub async fn logout(
    State(state): State<ApiState>,
    session: Session,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, axum::extract::rejection::FormRejection>,
) -> Result<Response, UiError> {
    let csrf = form.map(|Form(f)| f.csrf).unwrap_or_default();
    session.check(&headers, &csrf)?;
    state
        .app
        .end_session(&session.id_hash)
        .await
        .or_ui(&headers)?;
    let cookie = cookie_header(&state, &headers, "", 0);
    Ok((
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, cookie),
            (header::LOCATION, HeaderValue::from_static("/ui/login")),
        ],
    )
        .into_response())
}
