//! Dates and times relative to a fixed anchor.
//!
//! Nothing reads the wall clock: every date is an offset from [`ANCHOR`], so a data set generated
//! today and next year is byte-identical, and the ~10-year spread gives `_since` something to cut.

/// Seconds since the Unix epoch, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Moment(pub(crate) i64);

/// 2026-01-01T00:00:00Z: "now" for the data set; nothing happens after it.
pub(crate) const ANCHOR: Moment = Moment(1_767_225_600);

pub(crate) const DAY: i64 = 86_400;
pub(crate) const YEAR: i64 = 365 * DAY + DAY / 4;

impl Moment {
    pub(crate) fn plus(self, secs: i64) -> Moment {
        Moment(self.0 + secs)
    }

    /// `YYYY-MM-DD` (FHIR `date`).
    pub(crate) fn date(self) -> DateText {
        let (y, m, d) = civil_from_days(self.0.div_euclid(DAY));
        let mut t = DateText { bytes: [0; 20], len: 10 };
        put_digits(&mut t.bytes[0..4], y as u64);
        t.bytes[4] = b'-';
        put_digits(&mut t.bytes[5..7], m as u64);
        t.bytes[7] = b'-';
        put_digits(&mut t.bytes[8..10], d as u64);
        t
    }

    /// `YYYY-MM-DDThh:mm:ssZ`: valid both as FHIR `dateTime` and as `instant`.
    pub(crate) fn date_time(self) -> DateText {
        let mut t = self.date();
        let sod = self.0.rem_euclid(DAY) as u64;
        t.bytes[10] = b'T';
        put_digits(&mut t.bytes[11..13], sod / 3600);
        t.bytes[13] = b':';
        put_digits(&mut t.bytes[14..16], sod / 60 % 60);
        t.bytes[16] = b':';
        put_digits(&mut t.bytes[17..19], sod % 60);
        t.bytes[19] = b'Z';
        t.len = 20;
        t
    }

    /// The calendar year, for identifiers and prose.
    pub(crate) fn year(self) -> i64 {
        civil_from_days(self.0.div_euclid(DAY)).0
    }
}

/// A formatted date or date-time held inline (no allocation per field).
#[derive(Clone, Copy)]
pub(crate) struct DateText {
    bytes: [u8; 20],
    len: usize,
}

impl DateText {
    pub(crate) fn as_str(&self) -> &str {
        // Only ASCII digits and separators are ever written.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }
}

fn put_digits(out: &mut [u8], mut v: u64) {
    for slot in out.iter_mut().rev() {
        *slot = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day), proleptic
/// Gregorian, exact for the whole range we use.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(ANCHOR.date_time().as_str(), "2026-01-01T00:00:00Z");
        assert_eq!(Moment(0).date().as_str(), "1970-01-01");
        // 2000-02-29T12:34:56Z, a leap day.
        assert_eq!(Moment(951_827_696).date_time().as_str(), "2000-02-29T12:34:56Z");
        assert_eq!(Moment(-DAY).date().as_str(), "1969-12-31");
        assert_eq!(ANCHOR.year(), 2026);
    }
}
