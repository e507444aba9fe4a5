//! Bearer-token authentication with scopes.
//!
//! Tokens come from config (`[[api.tokens]]`: name, token, scopes) and from
//! `ORCH_ADMIN_TOKEN` (name `admin`, every scope). A token is compared in
//! constant time against every configured one; its *name* is the actor in
//! the audit trail. Tokens are never logged.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::ApiState;
use crate::auth::Scope;
use crate::config::Settings;

struct Token {
    name: String,
    secret: Vec<u8>,
    scopes: Vec<Scope>,
}

/// The configured tokens.
#[derive(Clone)]
pub struct Tokens(Arc<Vec<Token>>);

impl Tokens {
    pub fn from_settings(settings: &Settings) -> Self {
        let mut tokens: Vec<Token> = settings
            .api
            .tokens
            .iter()
            .map(|t| Token {
                name: t.name.clone(),
                secret: t.token.expose().as_bytes().to_vec(),
                scopes: t.scopes.clone(),
            })
            .collect();
        if let Some(admin) = &settings.admin_token {
            tokens.push(Token {
                name: "admin".to_owned(),
                secret: admin.expose().as_bytes().to_vec(),
                scopes: vec![Scope::Admin],
            });
        }
        Tokens(Arc::new(tokens))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The token whose secret equals `presented`. Every token is compared,
    /// each in constant time, so timing tells nothing about which matched.
    fn find(&self, presented: &[u8]) -> Option<&Token> {
        let mut found = None;
        for token in self.0.iter() {
            if bool::from(token.secret.as_slice().ct_eq(presented)) {
                found = Some(token);
            }
        }
        found
    }
}

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

fn mac(secret: &[u8], message: &[u8]) -> HmacSha256 {
    use hmac::Mac;
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(message);
    mac
}

impl Tokens {
    /// Logs in with a presented token: its caller, and a MAC of `message`
    /// under the token's secret. A session stores the MAC, never the token,
    /// and [`Tokens::resume`] checks it against the token configured now, so
    /// rotating or removing a token ends the sessions it opened.
    pub(super) fn login(&self, presented: &[u8], message: &[u8]) -> Option<(Caller, Vec<u8>)> {
        use hmac::Mac;
        let token = self.find(presented)?;
        let tag = mac(&token.secret, message).finalize().into_bytes().to_vec();
        Some((token.caller(), tag))
    }

    /// The caller of a session opened by the token named `name`, if `tag`
    /// is still that token's MAC of `message` (checked in constant time).
    pub(super) fn resume(&self, name: &str, message: &[u8], tag: &[u8]) -> Option<Caller> {
        use hmac::Mac;
        let mut found = None;
        for token in self.0.iter().filter(|t| t.name == name) {
            if mac(&token.secret, message).verify_slice(tag).is_ok() {
                found = Some(token.caller());
            }
        }
        found
    }
}

impl Token {
    fn caller(&self) -> Caller {
        Caller {
            name: self.name.clone(),
            scopes: self.scopes.clone(),
        }
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub scopes: Vec<Scope>,
}

impl Caller {
    /// Whether this caller may do what `scope` allows.
    pub fn can(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin)
    }

    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.can(scope) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "token {:?} lacks the {:?} scope this request needs",
                    self.name,
                    scope.as_str()
                ),
            ))
        }
    }
}

/// A missing or unknown token: 401 with a `WWW-Authenticate` challenge.
pub struct Unauthorized(&'static str);

impl IntoResponse for Unauthorized {
    fn into_response(self) -> Response {
        let mut response = ApiError::new(StatusCode::UNAUTHORIZED, self.0).into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        response
    }
}

pub fn authenticate(tokens: &Tokens, headers: &header::HeaderMap) -> Result<Caller, Unauthorized> {
    let value = headers.get(header::AUTHORIZATION).ok_or(Unauthorized(
        "this endpoint needs an Authorization: Bearer <token> header",
    ))?;
    let presented = value
        .as_bytes()
        .strip_prefix(b"Bearer ")
        .ok_or(Unauthorized(
            "the Authorization header must be \"Bearer <token>\"",
        ))?;
    let token = tokens
        .find(presented)
        .ok_or(Unauthorized("the bearer token is not valid"))?;
    Ok(token.caller())
}

impl FromRequestParts<ApiState> for Caller {
    type Rejection = Unauthorized;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ApiState,
    ) -> Result<Self, Self::Rejection> {
        authenticate(&state.tokens, &parts.headers)
    }
}
