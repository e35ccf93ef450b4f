//! Sizes as settings give them: bytes with an optional unit (`512MB`, `4GiB`), and the KV
//! cache's memory as bytes or as a fraction of what is free.

use anyhow::{bail, Context};

/// How much memory the KV cache gets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvCacheMemory {
    Bytes(u64),
    /// Of the memory available when the model has loaded.
    Fraction(f64),
}

impl KvCacheMemory {
    /// A decimal number up to 1 (`0.5`, `1.0`) is a fraction; anything else is a size.
    pub fn parse(text: &str) -> anyhow::Result<KvCacheMemory> {
        let text = text.trim();
        if text.contains('.') && text.chars().all(|c| c.is_ascii_digit() || c == '.') {
            let fraction: f64 = text
                .parse()
                .with_context(|| format!("`{text}` is not a number"))?;
            if !(fraction > 0.0 && fraction <= 1.0) {
                bail!("a fraction of memory must be in (0, 1], got {text}");
            }
            return Ok(KvCacheMemory::Fraction(fraction));
        }
        parse_bytes(text).map(KvCacheMemory::Bytes)
    }
}

/// `4096`, `512MB`, `4GiB`, …: bytes.
pub fn parse_bytes(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("`{text}` is not a size in bytes"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        other => bail!("unknown size unit `{other}` (B, KB, MB, GB, KiB, MiB, GiB)"),
    };
    let bytes = number * scale as f64;
    if !(bytes.is_finite() && bytes >= 1.0) {
        bail!("`{text}` must be at least one byte");
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("1.5 GB").unwrap(), 1_500_000_000);
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("lots").is_err());
        assert_eq!(
            KvCacheMemory::parse("0.5").unwrap(),
            KvCacheMemory::Fraction(0.5)
        );
        assert_eq!(
            KvCacheMemory::parse("1.0").unwrap(),
            KvCacheMemory::Fraction(1.0)
        );
        assert_eq!(
            KvCacheMemory::parse("2GiB").unwrap(),
            KvCacheMemory::Bytes(2 << 30)
        );
        assert!(KvCacheMemory::parse("1.5").is_err());
    }
}
