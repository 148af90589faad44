//! Names that end up in file names and on the wire: volume names and remote
//! replica ids. One rule, used by the config parser, the owner and the server.

/// Longest volume name or replica id.
pub const MAX_NAME_LEN: usize = 64;

/// 1 to [`MAX_NAME_LEN`] bytes of `[A-Za-z0-9_.-]`, not `.` or `..`: a replica id
/// names files in a server's storage directory and nothing else.
pub fn valid_name(s: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&s.len())
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// What [`valid_name`] requires, for error messages.
pub const NAME_RULE: &str = "1 to 64 characters from [A-Za-z0-9_.-] (and not \".\" or \"..\")";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_escape_a_directory() {
        for ok in ["v1-r2", "a", "A.b_c-9", &"x".repeat(64)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "../x", "a b", &"x".repeat(65), "é"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
