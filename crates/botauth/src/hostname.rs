//! The rules for bot host names, checked up front by every tool so a bad name
//! is refused with a sentence rather than a failed certificate later.

/// The default DNS domain under which bot names are certified.
pub const DEFAULT_BOT_DOMAIN: &str = "bots.farmer.internal";

/// Checks a bot host name: lowercase letters, digits and single dashes, at
/// most 63 characters, not starting or ending with a dash.
pub fn validate(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the hostname is empty".into());
    }
    if name.len() > 63 {
        return Err(format!(
            "hostname {name:?} is {} characters long; at most 63 are allowed",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "hostname {name:?} contains {c:?}; use only lowercase letters, digits and dashes"
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(format!(
            "hostname {name:?} must not start or end with a dash"
        ));
    }
    if name.contains("--") {
        return Err(format!(
            "hostname {name:?} contains \"--\"; use single dashes"
        ));
    }
    Ok(())
}

/// The certified name of a bot: `<hostname>.<domain>`.
pub fn bot_dns_name(hostname: &str, domain: &str) -> String {
    format!("{hostname}.{}", domain.trim_matches('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        assert!(validate("linux-riscv64-alice").is_ok());
        assert!(validate("a").is_ok());
        for (bad, why) in [
            ("", "empty"),
            ("Linux", "'L'"),
            ("a_b", "'_'"),
            ("a.b", "'.'"),
            ("-a", "dash"),
            ("a-", "dash"),
            ("a--b", "\"--\""),
        ] {
            let e = validate(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let long = "a".repeat(64);
        assert!(validate(&long).unwrap_err().contains("63"));
        assert!(validate(&"a".repeat(63)).is_ok());
    }
}
