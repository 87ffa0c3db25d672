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
        let mut buf = Vec::with_capacity(24);
        self.write_rfc3339(&mut buf);
        // Only ASCII digits and punctuation, or chrono's own text.
        String::from_utf8(buf).unwrap_or_default()
    }

    /// [`Timestamp::to_rfc3339`]'s text appended to `buf`. Years 0 to 9999 are written from the
    /// calendar computed here (chrono's formatter cost about 1,000 instructions a time, and the
    /// history writes one per message); any other year as chrono writes it.
    pub fn write_rfc3339(self, buf: &mut Vec<u8>) {
        let days = self.0.div_euclid(86_400_000);
        let ms_of_day = self.0.rem_euclid(86_400_000);
        let (year, month, day) = civil_from_days(days);
        if !(0..=9999).contains(&year) {
            let dt: DateTime<Utc> = Utc
                .timestamp_millis_opt(self.0)
                .single()
                .unwrap_or(DateTime::<Utc>::MIN_UTC);
            buf.extend_from_slice(dt.to_rfc3339_opts(SecondsFormat::AutoSi, true).as_bytes());
            return;
        }
        let (secs, ms) = (ms_of_day / 1000, ms_of_day % 1000);
        let digits = |buf: &mut Vec<u8>, n: i64, width: u32| {
            for p in (0..width).rev() {
                // A digit: the quotient's last decimal place.
                buf.push(b'0' + (n / 10i64.pow(p) % 10) as u8);
            }
        };
        digits(buf, year, 4);
        buf.push(b'-');
        digits(buf, month, 2);
        buf.push(b'-');
        digits(buf, day, 2);
        buf.push(b'T');
        digits(buf, secs / 3600, 2);
        buf.push(b':');
        digits(buf, secs / 60 % 60, 2);
        buf.push(b':');
        digits(buf, secs % 60, 2);
        if ms != 0 {
            buf.push(b'.');
            digits(buf, ms, 3);
        }
        buf.push(b'Z');
    }

    /// The time as a JSON string (what its `Serialize` writes) appended to `buf`.
    pub fn write_json(self, buf: &mut Vec<u8>) {
        buf.push(b'"');
        self.write_rfc3339(buf);
        buf.push(b'"');
    }

    /// Parses RFC 3339 (any offset; converted to UTC).
    pub fn parse(s: &str) -> Option<Self> {
        DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|d| Timestamp(d.with_timezone(&Utc).timestamp_millis()))
    }
}

/// The proleptic Gregorian date (year, month, day) of a day count from 1970-01-01 (H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
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
        let mut buf = Vec::with_capacity(24);
        self.write_rfc3339(&mut buf);
        s.serialize_str(std::str::from_utf8(&buf).unwrap_or_default())
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

    /// What chrono writes for `ms` (the formatter before this one).
    fn chrono_text(ms: i64) -> String {
        let dt: DateTime<Utc> = Utc
            .timestamp_millis_opt(ms)
            .single()
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        dt.to_rfc3339_opts(SecondsFormat::AutoSi, true)
    }

    #[test]
    fn a_time_is_written_as_chrono_writes_it_in_every_year_and_outside_them() {
        let day = 86_400_000i64;
        let year_zero = -62_167_219_200_000i64;
        let year_ten_thousand = 253_402_300_800_000i64;
        let mut times = vec![
            0,
            -1,
            1,
            999,
            1000,
            day - 1,
            -day,
            year_zero,
            year_zero - 1,
            year_ten_thousand - 1,
            year_ten_thousand,
            i64::MIN,
            i64::MAX,
            951_782_400_000,   // 2000-02-29
            4_107_456_000_000, // 2100-02-28
        ];
        // Every day of 400 years (a whole Gregorian cycle), at a time with and without millis.
        let mut t = 946_684_800_000i64; // 2000-01-01
        for i in 0..146_097 {
            times.push(t + (i % 86_400) * 1000 + if i % 2 == 0 { 0 } else { i % 1000 });
            t += day;
        }
        // Spread over every year from 0 to 9999 and past both ends.
        let mut t = year_zero - 50 * 365 * day;
        while t < year_ten_thousand + 50 * 365 * day {
            times.push(t);
            t += 7 * day + 3_723_017;
        }
        let ours: Vec<String> = times.iter().map(|&ms| Timestamp(ms).to_rfc3339()).collect();
        let chrono: Vec<String> = times.iter().map(|&ms| chrono_text(ms)).collect();
        assert_eq!(ours, chrono);
        let json: Vec<String> = times
            .iter()
            .map(|&ms| {
                let mut buf = Vec::new();
                Timestamp(ms).write_json(&mut buf);
                String::from_utf8(buf).unwrap()
            })
            .collect();
        let serialized: Vec<String> = times
            .iter()
            .map(|&ms| serde_json::to_string(&chrono_text(ms)).unwrap())
            .collect();
        assert_eq!(json, serialized);
    }

    #[test]
    fn offsets_are_converted_to_utc() {
        let t = Timestamp::parse("2024-01-09T12:00:00+02:00").unwrap();
        assert_eq!(t.to_rfc3339(), "2024-01-09T10:00:00Z");
    }
}
