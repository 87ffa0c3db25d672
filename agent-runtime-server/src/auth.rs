//! The `x-internal-auth` check: a constant-time comparison, so timing reveals nothing of the token.

use subtle::ConstantTimeEq;

/// Whether `given` is the token. Time depends on the lengths only, never on the contents.
pub fn token_matches(given: &[u8], token: &[u8]) -> bool {
    given.len() == token.len() && bool::from(given.ct_eq(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_token_matches() {
        assert!(token_matches(b"s3cret", b"s3cret"));
        assert!(!token_matches(b"s3creT", b"s3cret"));
        assert!(!token_matches(b"s3cre", b"s3cret"));
        assert!(!token_matches(b"", b"s3cret"));
    }
}
