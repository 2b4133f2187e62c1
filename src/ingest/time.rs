//! Timestamp parsing for the CSV timestamp column: epoch seconds or a calendar date.
//!
//! Accepted forms (all resolved to UTC epoch seconds as `f64`):
//! - a finite decimal number: epoch seconds, e.g. `1700000000` or `1700000000.25`. A
//!   column whose largest number is 1e11 or more (past the year 5138 in seconds) holds
//!   milliseconds, from 1e14 microseconds and from 1e17 nanoseconds, the units exporters
//!   write (`1700000000000` is the same instant as `1700000000`). The unit is decided once
//!   per column ([`epoch_divisor`] of its largest number), so a counter that grows past a
//!   boundary keeps its order;
//! - RFC 3339: `2023-11-14T22:13:20Z`, `2023-11-14T22:13:20.5+01:00` (`t`/`z` too);
//! - ISO 8601 dates and date-times: `2023-11-14` (midnight), `2023-11-14 22:13`,
//!   `2023-11-14T22:13:20[.fff]`, with a space or `T` between date and time, seconds
//!   optional, and an offset `Z`, `+hh:mm`, `+hhmm` or `+hh`. Without an offset, UTC is
//!   assumed (exporters that write local time without saying so shift by their offset).
//!   Only the extended form: a basic-form date such as `20231114` is a plain number, read
//!   as epoch seconds like any other.
//!
//! A leap second (`:60`) is accepted and lands on the next minute's `:00`.

/// One timestamp field (already trimmed): a date-time in epoch seconds, or a plain
/// number whose unit its column decides ([`epoch_divisor`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Stamp {
    Seconds(f64),
    Number(f64),
}

/// Parses one timestamp field. `None` when the text is neither a finite number nor a valid
/// date-time.
pub(crate) fn parse_stamp(text: &str) -> Option<Stamp> {
    if let Ok(x) = text.parse::<f64>() {
        return x.is_finite().then_some(Stamp::Number(x));
    }
    parse_datetime(text).map(Stamp::Seconds)
}

/// Parse one timestamp field alone into epoch seconds (a number's unit by its own size).
#[cfg(test)]
fn parse_timestamp(text: &str) -> Option<f64> {
    match parse_stamp(text)? {
        Stamp::Seconds(t) => Some(t),
        Stamp::Number(x) => Some(x / epoch_divisor(x.abs())),
    }
}

/// What divides an epoch number of this size into seconds: 1 below 1e11 (seconds up to
/// the year 5138), 1e3 from 1e11 (milliseconds), 1e6 from 1e14 (microseconds), 1e9 from
/// 1e17 (nanoseconds). CSV columns and ExaMon samples share it.
pub(crate) fn epoch_divisor(size: f64) -> f64 {
    match size {
        a if a >= 1e17 => 1e9,
        a if a >= 1e14 => 1e6,
        a if a >= 1e11 => 1e3,
        _ => 1.0,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
pub(crate) fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400; // [0, 399]
    let m = i64::from(month);
    let mp = if m > 2 { m - 3 } else { m + 9 }; // March = 0
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1; // [0, 365]
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // [0, 146096]
    era * 146_097 + doe - 719_468
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(year) => 29,
        _ => 28,
    }
}

/// A cursor over ASCII bytes; every read is bounds-checked so bad input yields `None`.
struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.i += 1)
    }

    /// Exactly `n` ASCII digits as a number.
    fn digits(&mut self, n: usize) -> Option<u32> {
        let mut v = 0u32;
        for _ in 0..n {
            let c = self.peek()?;
            if !c.is_ascii_digit() {
                return None;
            }
            v = v * 10 + u32::from(c - b'0');
            self.i += 1;
        }
        Some(v)
    }
}

/// A date-time (RFC 3339 or ISO 8601's extended form, above) in epoch seconds; `None` for
/// anything else, plain numbers included.
pub(crate) fn parse_datetime(text: &str) -> Option<f64> {
    let mut c = Cursor {
        b: text.as_bytes(),
        i: 0,
    };
    let year = i64::from(c.digits(4)?);
    c.eat(b'-')?;
    let month = c.digits(2)?;
    c.eat(b'-')?;
    let day = c.digits(2)?;
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    // A date alone is its midnight, UTC.
    if c.peek().is_none() {
        return Some((days_from_civil(year, month, day) * 86_400) as f64);
    }
    match c.peek()? {
        b'T' | b't' | b' ' => c.i += 1,
        _ => return None,
    }
    let hour = c.digits(2)?;
    c.eat(b':')?;
    let minute = c.digits(2)?;
    // Seconds are optional (`2024-03-01 12:00`); a fraction needs them.
    let has_seconds = c.peek() == Some(b':');
    let second = if has_seconds {
        c.i += 1;
        c.digits(2)?
    } else {
        0
    };
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut frac = 0.0f64;
    if has_seconds && c.peek() == Some(b'.') {
        let start = c.i;
        c.i += 1;
        let digits_start = c.i;
        while c.peek().is_some_and(|d| d.is_ascii_digit()) {
            c.i += 1;
        }
        if c.i == digits_start {
            return None;
        }
        // "0.fff" parses with correct rounding; the slice is ASCII digits only.
        frac = format!("0{}", text.get(start..c.i)?).parse().ok()?;
    }
    let offset_secs: i64 = match c.peek() {
        None => 0,
        Some(b'Z' | b'z') => {
            c.i += 1;
            0
        }
        Some(sign @ (b'+' | b'-')) => {
            c.i += 1;
            // `+hh:mm` (RFC 3339), or ISO 8601's `+hhmm` and `+hh`.
            let oh = c.digits(2)?;
            let om = match c.peek() {
                None => 0,
                Some(b':') => {
                    c.i += 1;
                    c.digits(2)?
                }
                Some(_) => c.digits(2)?,
            };
            if oh > 23 || om > 59 {
                return None;
            }
            let s = i64::from(oh * 3600 + om * 60);
            if sign == b'+' { s } else { -s }
        }
        Some(_) => return None,
    };
    if c.i != c.b.len() {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second) - offset_secs;
    Some(secs as f64 + frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_from_civil_matches_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2023, 11, 14), 19_675);
        assert_eq!(days_from_civil(2024, 2, 29), 19_782);
        assert_eq!(days_from_civil(1900, 3, 1), -25_508);
    }

    #[test]
    fn parses_epoch_and_calendar_forms() {
        assert_eq!(parse_timestamp("1700000000"), Some(1_700_000_000.0));
        assert_eq!(parse_timestamp("1700000000.25"), Some(1_700_000_000.25));
        // Milli-, micro- and nanoseconds, by size.
        assert_eq!(parse_timestamp("1700000000250"), Some(1_700_000_000.25));
        assert_eq!(parse_timestamp("1700000000250000"), Some(1_700_000_000.25));
        assert_eq!(
            parse_timestamp("1700000000000000000"),
            Some(1_700_000_000.0)
        );
        assert_eq!(parse_timestamp("99999999999"), Some(99_999_999_999.0));
        // 1700000000 is 2023-11-14T22:13:20Z.
        for s in [
            "2023-11-14T22:13:20Z",
            "2023-11-14t22:13:20z",
            "2023-11-14 22:13:20",
            "2023-11-14T22:13:20",
            "2023-11-14T23:13:20+01:00",
            "2023-11-14T20:43:20-01:30",
        ] {
            assert_eq!(parse_timestamp(s), Some(1_700_000_000.0), "{s}");
        }
        assert_eq!(
            parse_timestamp("2023-11-14 22:13:20.125"),
            Some(1_700_000_000.125)
        );
        assert_eq!(parse_timestamp("1970-01-01T00:00:00.5Z"), Some(0.5));
        assert_eq!(
            parse_timestamp("2016-12-31T23:59:60Z"),
            Some(1_483_228_800.0)
        );
    }

    /// Plain dates and date-times without seconds were refused as "not a timestamp".
    /// 2024-03-01 is day 19 783 (19 782 is 2024-02-29, above): 1 709 251 200 s.
    #[test]
    fn parses_iso_dates_and_date_times_without_seconds() {
        let midnight = 1_709_251_200.0;
        assert_eq!(parse_timestamp("2024-03-01"), Some(midnight));
        assert_eq!(parse_timestamp("1970-01-01"), Some(0.0));
        for (s, secs) in [
            ("2024-03-01 12:00", 43_200.0),
            ("2024-03-01T12:00", 43_200.0),
            ("2024-03-01T12:00Z", 43_200.0),
            ("2024-03-01 12:00:00", 43_200.0),
            ("2024-03-01T12:00:00Z", 43_200.0),
            ("2024-03-01T13:00:00+01:00", 43_200.0),
            ("2024-03-01T13:00:00+0100", 43_200.0),
            ("2024-03-01T13:00:00+01", 43_200.0),
            ("2024-03-01T10:30-0130", 43_200.0),
        ] {
            assert_eq!(parse_timestamp(s), Some(midnight + secs), "{s}");
        }
    }

    #[test]
    fn rejects_malformed_dates() {
        for s in [
            "",
            "nan",
            "inf",
            "-inf",
            "2023-13-01 00:00:00",
            "2023-02-29 00:00:00",
            "2023-04-31 00:00:00",
            "2023-11-14 24:00:00",
            "2023-11-14 22:60:00",
            "2023-11-14 22:13:61",
            "2023-11-14 ",
            "2023-11-14T",
            "2023-11-14 22",
            "2023-11-14 22:",
            "2023-11-14 22:1",
            "2023-11-14 22:13.5",
            "2023-11-14 22:13:",
            "2023-11-14 22:13:20.",
            "2023-11-14 22:13:20+1",
            "2023-11-14 22:13:20+01:",
            "2023-11-14 22:13:20+01:0",
            "2023-11-14 22:13:20+010",
            "2023-11-14 22:13:20+24:00",
            "2023-11-14 22:13:20+01:60",
            "2023-11-14Z",
            "2023-11-14+01:00",
            "2024-02-30",
            "2024-00-10",
            "2023-11-14 22:13:20Zjunk",
            "23-11-14 22:13:20",
            "2023-1-14 22:13:20",
            "２０２３-11-14 22:13:20",
        ] {
            assert_eq!(parse_timestamp(s), None, "{s:?}");
        }
        assert!(parse_timestamp("2024-02-29 00:00:00").is_some());
    }
}
