//! `GET /console/`: the operator console's static files, compiled into the binary. They hold no
//! data, so they are the one exception to auth before routing; every call they make needs the token.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Response, StatusCode};

use crate::app::Body;
use crate::error::{ApiError, HttpError};

/// The label requests for the console carry in metrics and logs.
pub const LABEL: &str = "/console";

/// Only its own files, fetches to this server, no inline code, no framing: the page cannot be made to
/// run someone else's script or leak the token it holds.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One file of the console: its name under `/console/`, content type and bytes.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const ASSETS: &[Asset] = &[
    Asset {
        name: "",
        content_type: "text/html; charset=utf-8",
        body: include_str!("../console/index.html"),
    },
    Asset {
        name: "console.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../console/console.css"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../console/app.js"),
    },
    Asset {
        name: "api.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../console/api.js"),
    },
    Asset {
        name: "timeline.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../console/timeline.js"),
    },
];

/// What a console path asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsolePath {
    /// `/console` without the slash: redirected, so the page's relative links resolve under it.
    Bare,
    /// A file of the console (`/console/` is the page).
    File(usize),
}

/// The console file `path` names (with or without the `/api/v1` prefix), if any. Unknown names
/// under `/console/` are not console paths: they go through auth and routing like any other.
pub fn resolve(path: &str) -> Option<ConsolePath> {
    let path = path.strip_prefix("/api/v1").unwrap_or(path);
    let rest = path.strip_prefix("/console")?;
    if rest.is_empty() {
        return Some(ConsolePath::Bare);
    }
    let name = rest.strip_prefix('/')?;
    ASSETS.iter().position(|a| a.name == name).map(ConsolePath::File)
}

/// The response for a console path: the file, or the redirect to `/console/`.
pub fn serve(method: &Method, path: &str, found: ConsolePath) -> Response<Body> {
    if method != Method::GET && method != Method::HEAD {
        let e = ApiError::http(
            HttpError::MethodNotAllowed,
            format!("{method} is not allowed on {LABEL}"),
        );
        let mut r = crate::app::error_response(&e);
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let mut r = match found {
        ConsolePath::Bare => {
            let mut r = Response::new(Full::new(Bytes::new()).boxed_unsync());
            *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
            if let Ok(location) = HeaderValue::from_str(&format!("{path}/")) {
                r.headers_mut().insert(header::LOCATION, location);
            }
            r
        }
        ConsolePath::File(i) => {
            let Some(asset) = ASSETS.get(i) else {
                return crate::app::error_response(&ApiError::not_found(path));
            };
            let body = if method == Method::HEAD {
                Bytes::new()
            } else {
                Bytes::from_static(asset.body.as_bytes())
            };
            let mut r = Response::new(Full::new(body).boxed_unsync());
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
            r
        }
    };
    let h = r.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_paths_resolve_with_and_without_the_prefix() {
        let got: Vec<Option<ConsolePath>> = [
            "/console",
            "/console/",
            "/api/v1/console/",
            "/api/v1/console/app.js",
            "/console/nope.js",
            "/consoles",
            "/sessions",
        ]
        .iter()
        .map(|p| resolve(p))
        .collect();
        assert_eq!(
            got,
            vec![
                Some(ConsolePath::Bare),
                Some(ConsolePath::File(0)),
                Some(ConsolePath::File(0)),
                Some(ConsolePath::File(2)),
                None,
                None,
                None,
            ]
        );
    }
}
