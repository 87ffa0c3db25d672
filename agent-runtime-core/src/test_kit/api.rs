//! Calls of the HTTP API that tests, examples and benches make the same way: for now, creating a
//! session and reading its id.

use serde_json::Value;

/// `POST {base}/sessions` with `body` and the `x-internal-auth` token: the new session's id. An
/// error names what went wrong (no answer, not JSON, no `session_id`).
pub async fn create_session(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    body: &Value,
) -> Result<String, String> {
    let created: Value = client
        .post(format!("{base}/sessions"))
        .header("x-internal-auth", token)
        .json(body)
        .send()
        .await
        .map_err(|e| format!("POST {base}/sessions: {e}"))?
        .json()
        .await
        .map_err(|e| format!("POST {base}/sessions answered no JSON: {e}"))?;
    created["session_id"]
        .as_str()
        .map(String::from)
        .ok_or_else(|| format!("POST {base}/sessions answered no session_id: {created}"))
}
