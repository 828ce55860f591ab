//! Kubernetes resource quantities (`100m`, `0.5`, `64Mi`, `1G`, `1e3`) as the integers the
//! runtime needs: millicores for CPU, bytes for memory.

/// A quantity scaled by 1000 (millis), rounded up as the apiserver rounds requests; `None` for
/// text that is not a quantity.
pub fn milli_value(text: &str) -> Option<i128> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    if number.is_empty() {
        return None;
    }
    let negative = number.starts_with('-');
    let number = number.trim_start_matches(['+', '-']);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    if !whole
        .chars()
        .chain(fraction.chars())
        .all(|c| c.is_ascii_digit())
    {
        return None;
    }
    // value = digits * 10^(exp10) * 2^(exp2), with digits = whole.fraction as an integer.
    let digits: i128 = format!("{whole}{fraction}").parse().ok().unwrap_or(0);
    let mut exp10: i32 = -(fraction.len() as i32) + 3; // millis
    let mut exp2: u32 = 0;
    match suffix {
        "" => {}
        "n" => exp10 -= 9,
        "u" => exp10 -= 6,
        "m" => exp10 -= 3,
        "k" => exp10 += 3,
        "M" => exp10 += 6,
        "G" => exp10 += 9,
        "T" => exp10 += 12,
        "P" => exp10 += 15,
        "E" => exp10 += 18,
        "Ki" => exp2 = 10,
        "Mi" => exp2 = 20,
        "Gi" => exp2 = 30,
        "Ti" => exp2 = 40,
        "Pi" => exp2 = 50,
        "Ei" => exp2 = 60,
        exponent if exponent.starts_with(['e', 'E']) => {
            exp10 += exponent[1..].parse::<i32>().ok()?;
        }
        _ => return None,
    }
    let mut value = digits.checked_mul(1i128.checked_shl(exp2)?)?;
    if exp10 >= 0 {
        value = value.checked_mul(10i128.checked_pow(exp10 as u32)?)?;
    } else {
        let divisor = 10i128.checked_pow((-exp10) as u32)?;
        value = (value + divisor - 1) / divisor;
    }
    Some(if negative { -value } else { value })
}

/// CPU in millicores.
pub fn millicores(text: &str) -> Option<i64> {
    milli_value(text).and_then(|m| i64::try_from(m).ok())
}

/// Bytes (memory, storage), rounded up.
pub fn bytes(text: &str) -> Option<i64> {
    milli_value(text).and_then(|m| i64::try_from((m + 999) / 1000).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_memory_forms() {
        assert_eq!(millicores("100m"), Some(100));
        assert_eq!(millicores("0.5"), Some(500));
        assert_eq!(millicores("2"), Some(2000));
        assert_eq!(millicores("1.2345"), Some(1235));
        assert_eq!(bytes("64Mi"), Some(64 << 20));
        assert_eq!(bytes("1G"), Some(1_000_000_000));
        assert_eq!(bytes("1e3"), Some(1000));
        assert_eq!(bytes("128974848"), Some(128974848));
        assert_eq!(bytes("129e6"), Some(129_000_000));
        assert_eq!(bytes("1.5Gi"), Some(3 << 29));
        assert_eq!(millicores("abc"), None);
        assert_eq!(bytes("12Xi"), None);
        assert_eq!(bytes(""), None);
    }
}
