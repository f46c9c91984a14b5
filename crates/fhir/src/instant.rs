//! FHIR `instant`, `dateTime` and `date` values as microseconds since the Unix epoch.
//!
//! The server keeps every timestamp as an `i64` count of microseconds (UTC), which makes
//! `_since < lastUpdated <= transactionTime` a plain integer comparison.

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// Microseconds since 1970-01-01T00:00:00Z.
pub type Micros = i64;

/// Why a date or instant string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{value}' is not a valid FHIR {expected}")]
pub struct InstantError {
    pub value: String,
    pub expected: &'static str,
}

/// A parsed date, dateTime or instant together with its precision, as the half-open range
/// `[start, end)` of instants it covers (`2024` covers the whole year).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateRange {
    pub start: Micros,
    pub end: Micros,
}

/// Parses a FHIR `instant` (`2024-05-01T10:00:00.123Z`, any fraction, `Z` or `±hh:mm`) or a
/// plain date `YYYY-MM-DD`, which 1upHealth documents for `_since`; a date means its midnight UTC.
pub fn parse_since(value: &str) -> Result<Micros, InstantError> {
    let err = || InstantError { value: value.to_owned(), expected: "instant or date (YYYY-MM-DD)" };
    if value.len() == 10 {
        return parse_range(value).map(|range| range.start).map_err(|_| err());
    }
    if !value.contains('T') {
        return Err(err());
    }
    let range = parse_range(value).map_err(|_| err())?;
    // An instant must carry seconds and a zone; parse_range already insists on the zone.
    if value.len() < "YYYY-MM-DDThh:mm:ssZ".len() {
        return Err(err());
    }
    Ok(range.start)
}

/// Parses a FHIR `date` or `dateTime` of any precision into the range it covers.
/// A time part requires a zone (`Z` or `±hh:mm`), as FHIR requires.
pub fn parse_range(value: &str) -> Result<DateRange, InstantError> {
    let err = || InstantError { value: value.to_owned(), expected: "date or dateTime" };
    let (date_part, time_part) = match value.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (value, None),
    };
    let mut fields = date_part.split('-');
    let year = parse_digits(fields.next(), 4).ok_or_else(err)? as i32;
    let month = fields.next().map(|m| parse_digits(Some(m), 2).ok_or_else(err)).transpose()?;
    let day = fields.next().map(|d| parse_digits(Some(d), 2).ok_or_else(err)).transpose()?;
    if fields.next().is_some() || (time_part.is_some() && day.is_none()) {
        return Err(err());
    }
    let month_of = |m: u32| Month::try_from(m as u8).map_err(|_| err());
    let start_date =
        Date::from_calendar_date(year, month_of(month.unwrap_or(1))?, day.unwrap_or(1) as u8).map_err(|_| err())?;
    let Some(time_part) = time_part else {
        let start = to_micros(PrimitiveDateTime::new(start_date, Time::MIDNIGHT).assume_utc());
        let end_date = match (month, day) {
            (None, _) => Date::from_calendar_date(year + 1, Month::January, 1).ok(),
            (Some(m), None) => {
                let next = month_of(m)?.next();
                let next_year = if next == Month::January { year + 1 } else { year };
                Date::from_calendar_date(next_year, next, 1).ok()
            }
            (Some(_), Some(_)) => start_date.next_day(),
        }
        .ok_or_else(err)?;
        let end = to_micros(PrimitiveDateTime::new(end_date, Time::MIDNIGHT).assume_utc());
        return Ok(DateRange { start, end });
    };
    parse_time_with_zone(start_date, time_part).ok_or_else(err)
}

/// `hh:mm[:ss[.f+]](Z|±hh:mm)` on `date`; returns the range its precision covers.
fn parse_time_with_zone(date: Date, text: &str) -> Option<DateRange> {
    let zone_at = text.find(['Z', '+', '-'])?;
    let (clock, zone) = text.split_at(zone_at);
    let offset = if zone == "Z" {
        UtcOffset::UTC
    } else {
        let sign: i8 = if zone.starts_with('-') { -1 } else { 1 };
        let (h, m) = zone[1..].split_once(':')?;
        let (h, m) = (parse_digits(Some(h), 2)? as i8, parse_digits(Some(m), 2)? as i8);
        if h > 14 || m > 59 {
            return None;
        }
        UtcOffset::from_hms(sign * h, sign * m, 0).ok()?
    };
    let mut parts = clock.split(':');
    let hour = parse_digits(parts.next(), 2)? as u8;
    let minute = parse_digits(parts.next(), 2)? as u8;
    let (seconds, fraction) = match parts.next() {
        Some(s) => match s.split_once('.') {
            Some((whole, frac)) => (Some(parse_digits(Some(whole), 2)? as u8), Some(frac)),
            None => (Some(parse_digits(Some(s), 2)? as u8), None),
        },
        None => (None, None),
    };
    if parts.next().is_some() {
        return None;
    }
    let (micros, precision) = match fraction {
        Some(frac) => {
            if frac.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            // Digits past the microsecond are dropped: the server never stores finer times.
            let digits: String = frac.chars().chain(std::iter::repeat('0')).take(6).collect();
            let precision = 10i64.pow(6 - frac.len().min(6) as u32);
            (digits.parse::<u32>().ok()?, precision)
        }
        None if seconds.is_some() => (0, 1_000_000),
        None => (0, 60_000_000),
    };
    let time = Time::from_hms_micro(hour, minute, seconds.unwrap_or(0), micros).ok()?;
    let start = to_micros(PrimitiveDateTime::new(date, time).assume_offset(offset));
    Some(DateRange { start, end: start + precision })
}

fn parse_digits(text: Option<&str>, width: usize) -> Option<u32> {
    let text = text?;
    if text.len() != width || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn to_micros(at: OffsetDateTime) -> Micros {
    (at.unix_timestamp_nanos() / 1_000) as Micros
}

/// Formats microseconds as a FHIR instant in UTC with microsecond precision,
/// e.g. `2026-11-26T12:00:00.123456Z`.
pub fn format_instant(micros: Micros) -> String {
    let at = OffsetDateTime::from_unix_timestamp_nanos(micros as i128 * 1_000).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        at.year(),
        at.month() as u8,
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.microsecond()
    )
}

/// The current time in microseconds since the epoch.
pub fn now_micros() -> Micros {
    to_micros(OffsetDateTime::now_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn dates_mean_midnight_utc() {
        assert_eq!(parse_since("2024-01-01").unwrap(), 1_704_067_200_000_000);
    }

    #[test]
    fn instants_with_offsets_and_fractions() {
        assert_eq!(parse_since("2024-01-01T00:00:00Z").unwrap(), 1_704_067_200_000_000);
        assert_eq!(parse_since("2024-01-01T01:00:00+01:00").unwrap(), 1_704_067_200_000_000);
        assert_eq!(parse_since("2024-01-01T00:00:00.5Z").unwrap(), 1_704_067_200_500_000);
        assert_eq!(parse_since("2024-01-01T00:00:00.123456789Z").unwrap(), 1_704_067_200_123_456);
    }

    #[test]
    fn rejects_what_is_not_an_instant() {
        for bad in [
            "",
            "yesterday",
            "2024-13-01",
            "2024-02-30",
            "2024-01-01T00:00:00",
            "2024-01-01T25:00:00Z",
            "2024-01-01T00:00Z0",
            "2024-01-01T00:00:00.Z",
            "2024-1-01",
            "2024-01-01T00:00:00+15:00",
        ] {
            assert!(parse_since(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn ranges_follow_precision() {
        let year = parse_range("2024").unwrap();
        assert_eq!(year.end - year.start, 366 * 86_400_000_000);
        let month = parse_range("2024-02").unwrap();
        assert_eq!(month.end - month.start, 29 * 86_400_000_000);
        let second = parse_range("2024-02-01T10:00:00Z").unwrap();
        assert_eq!(second.end - second.start, 1_000_000);
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(micros in 0i64..4_102_444_800_000_000) {
            prop_assert_eq!(parse_since(&format_instant(micros)).unwrap(), micros);
        }
    }
}
