//! Timestamps as the API writes them: RFC 3339, UTC, with a `Z`, millisecond precision.

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A point in time, UTC, millisecond precision (so it survives every storage backend unchanged).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    /// Now, truncated to the millisecond.
    pub fn now() -> Self {
        Timestamp(Utc::now().timestamp_millis())
    }

    /// From milliseconds since the Unix epoch.
    pub fn from_millis(ms: i64) -> Self {
        Timestamp(ms)
    }

    /// Milliseconds since the Unix epoch (how storage keeps it).
    pub fn as_millis(self) -> i64 {
        self.0
    }

    /// This time plus `d` (saturating).
    pub fn plus(self, d: std::time::Duration) -> Self {
        Timestamp(
            self.0
                .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }

    /// RFC 3339 with `Z`, e.g. `2024-01-09T10:00:00Z` or `2024-01-09T10:00:00.250Z`.
    pub fn to_rfc3339(self) -> String {
        let dt: DateTime<Utc> = Utc
            .timestamp_millis_opt(self.0)
            .single()
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        dt.to_rfc3339_opts(SecondsFormat::AutoSi, true)
    }

    /// Parses RFC 3339 (any offset; converted to UTC).
    pub fn parse(s: &str) -> Option<Self> {
        DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|d| Timestamp(d.with_timezone(&Utc).timestamp_millis()))
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

/// On the wire a timestamp is a plain RFC 3339 string (no `format`, so generated clients keep it
/// a string, as they did when the server described these fields itself).
#[cfg(feature = "schema")]
impl schemars::JsonSchema for Timestamp {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Timestamp".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string"})
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Timestamp::parse(&s).ok_or_else(|| serde::de::Error::custom("expected an RFC 3339 time"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_rfc3339_utc_with_z() {
        let t = Timestamp::parse("2024-01-09T10:00:00Z").unwrap();
        assert_eq!(t.to_rfc3339(), "2024-01-09T10:00:00Z");
        assert_eq!(
            Timestamp::from_millis(t.as_millis() + 250).to_rfc3339(),
            "2024-01-09T10:00:00.250Z"
        );
        assert_eq!(serde_json::to_string(&t).unwrap(), "\"2024-01-09T10:00:00Z\"");
    }

    #[test]
    fn offsets_are_converted_to_utc() {
        let t = Timestamp::parse("2024-01-09T12:00:00+02:00").unwrap();
        assert_eq!(t.to_rfc3339(), "2024-01-09T10:00:00Z");
    }
}
