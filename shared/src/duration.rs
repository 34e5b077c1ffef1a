//! Human durations in documents (`60s`, `250ms`, `1m30s`, `2h`) and their protobuf form.

use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DurationError {
    #[error("empty duration")]
    Empty,
    #[error("invalid duration {0:?}: expected a number and a unit (ms, s, m, h), e.g. 250ms or 1m30s")]
    Syntax(String),
    #[error("duration {0:?} is too large")]
    Overflow(String),
}

/// Parses a sequence of `<integer><unit>` parts; units are `ms`, `s`, `m`, `h`, `d`.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    let syntax = || DurationError::Syntax(text.to_owned());
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(syntax());
        }
        let value: u64 = rest[..digits].parse().map_err(|_| DurationError::Overflow(text.to_owned()))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let millis_per_unit: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(syntax()),
        };
        rest = &rest[unit_len..];
        total = value
            .checked_mul(millis_per_unit)
            .and_then(|ms| total.checked_add(ms))
            .ok_or_else(|| DurationError::Overflow(text.to_owned()))?;
    }
    Ok(Duration::from_millis(total))
}

/// The shortest document form: `1m30s`, `250ms`, `0s`.
pub fn format(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (unit, size) in [("d", 86_400_000u128), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
        if ms >= size {
            out.push_str(&format!("{}{unit}", ms / size));
            ms %= size;
        }
    }
    out
}

pub fn to_proto(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// `None` for negative or out-of-range protobuf durations.
pub fn from_proto(d: &prost_types::Duration) -> Option<Duration> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return None;
    }
    Some(Duration::new(u64::try_from(d.seconds).ok()?, u32::try_from(d.nanos).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, want: Result<u64, DurationError>) {
        assert_eq!(parse(input).map(|d| d.as_millis() as u64), want, "{input}");
    }

    #[test]
    fn parses() {
        check("60s", Ok(60_000));
        check("250ms", Ok(250));
        check("1m30s", Ok(90_000));
        check("2h", Ok(7_200_000));
        check("1d", Ok(86_400_000));
        check(" 5s ", Ok(5_000));
        check("", Err(DurationError::Empty));
        check("5", Err(DurationError::Syntax("5".into())));
        check("s", Err(DurationError::Syntax("s".into())));
        check("5 s", Err(DurationError::Syntax("5 s".into())));
        check("-5s", Err(DurationError::Syntax("-5s".into())));
        check("1.5s", Err(DurationError::Syntax("1.5s".into())));
        check("5y", Err(DurationError::Syntax("5y".into())));
        check("99999999999999999999s", Err(DurationError::Overflow("99999999999999999999s".into())));
        check("999999999999999d", Err(DurationError::Overflow("999999999999999d".into())));
    }

    #[test]
    fn formats_and_round_trips() {
        for ms in [0u64, 1, 250, 1_000, 60_000, 90_000, 3_600_000, 90_061_001] {
            let d = Duration::from_millis(ms);
            assert_eq!(parse(&format(d)), Ok(d), "{ms}");
        }
        assert_eq!(format(Duration::from_millis(90_000)), "1m30s");
    }

    #[test]
    fn proto_rejects_negative() {
        assert_eq!(from_proto(&prost_types::Duration { seconds: -1, nanos: 0 }), None);
        assert_eq!(from_proto(&prost_types::Duration { seconds: 1, nanos: -1 }), None);
        assert_eq!(from_proto(&to_proto(Duration::from_millis(1500))), Some(Duration::from_millis(1500)));
    }
}
