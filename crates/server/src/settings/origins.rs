//! `allowed_origins`: which web origins a browser may call the API from (CORS). None by
//! default, so that a page on another site cannot read answers with a visitor's network
//! position; `*` for any, or a comma-separated list of exact origins.

use anyhow::bail;

/// Origins whose pages may call the API.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AllowedOrigins {
    /// No CORS headers at all: browsers keep other sites' pages out.
    #[default]
    None,
    /// Any origin (`*`).
    Any,
    /// Exactly these origins (`scheme://host[:port]`, as browsers send them).
    List(Vec<String>),
}

impl AllowedOrigins {
    /// `none`, `*`, or a comma-separated list of origins such as `https://app.example`.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        match text.trim() {
            "" | "none" => return Ok(Self::None),
            "*" => return Ok(Self::Any),
            _ => {}
        }
        let mut origins = Vec::new();
        for origin in text.split(',').map(str::trim) {
            let Some((scheme, host)) = origin.split_once("://") else {
                bail!("allowed_origins: `{origin}` is not an origin (scheme://host[:port])");
            };
            let plain = |c: char| c.is_ascii_alphanumeric() || "-.:[]".contains(c);
            if !matches!(scheme, "http" | "https") || host.is_empty() || !host.chars().all(plain) {
                bail!(
                    "allowed_origins: `{origin}` is not an origin: an http or https scheme and a \
                     host, with no path (e.g. https://app.example)"
                );
            }
            origins.push(origin.to_string());
        }
        Ok(Self::List(origins))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        assert_eq!(AllowedOrigins::parse("none").unwrap(), AllowedOrigins::None);
        assert_eq!(AllowedOrigins::parse("*").unwrap(), AllowedOrigins::Any);
        assert_eq!(
            AllowedOrigins::parse("https://a.example, http://localhost:3000").unwrap(),
            AllowedOrigins::List(vec![
                "https://a.example".into(),
                "http://localhost:3000".into()
            ])
        );
        for bad in [
            "a.example",
            "ftp://a.example",
            "https://a.example/",
            "https://",
            "https://a b",
        ] {
            let err = AllowedOrigins::parse(bad).unwrap_err().to_string();
            assert!(err.contains("allowed_origins"), "{bad}: {err}");
        }
    }
}
