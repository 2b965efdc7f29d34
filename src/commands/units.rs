//! Parsing of human-written quantities on the command line.

/// Parses a byte count: a plain number or one with a `k`/`M`/`G`/`T` (powers of 1000) or
/// `Ki`/`Mi`/`Gi`/`Ti` (powers of 1024) prefix, optionally followed by `B`: `512MiB`, `2G`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix('B').unwrap_or(t);
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale: u64 = match unit {
        "" => 1,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return Err(format!("unknown unit {unit:?} in {s:?} (use k, M, G, T, Ki, Mi, Gi or Ti)")),
    };
    let value: f64 = number.parse().map_err(|_| format!("{s:?} is not a byte count"))?;
    let bytes = value * scale as f64;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn byte_counts() {
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2G"), Ok(2_000_000_000));
        assert_eq!(parse_bytes("1.5Ki"), Ok(1536));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("12XB").is_err());
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("GiB").is_err());
    }
}
