//! Facts about Rego policy texts that both sides check before a Rego parser sees them: the KBS
//! (attestation and resource policies from its admin) and the guest agent (its policy from the
//! initdata or `SetPolicy`). Rego parsers backtrack exponentially on deeply nested brackets, so
//! the nesting is bounded first.

/// The deepest bracket nesting the agent accepts in its policy (the KBS's is configurable,
/// with this default). At this depth a worst-case text still compiles in tens of milliseconds.
pub const MAX_NESTING: usize = 10;

/// The largest policy text the agent accepts, in bytes (the KBS's is configurable, with this
/// default).
pub const MAX_BYTES: usize = 256 << 10;

/// The deepest nesting of `[`, `{` and `(` in a Rego text, outside string literals (`"…"` with
/// escapes, raw `` `…` ``) and comments (`#` to the end of the line).
pub fn nesting_depth(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '#' => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '"' => {
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '`' => {
                for c in chars.by_ref() {
                    if c == '`' {
                        break;
                    }
                }
            }
            '[' | '{' | '(' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ']' | '}' | ')' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brackets_in_strings_and_comments_do_not_count() {
        assert_eq!(nesting_depth("x := [[{(1)}]]"), 4);
        assert_eq!(nesting_depth("x := [[[[[[[[[[[[[[[[[[[["), 20);
        assert_eq!(
            nesting_depth("# [[[[[\nx := \"[[[[\\\"[[\" + `[[[`\ny := [1]"),
            1
        );
        assert_eq!(nesting_depth("]]]] [ ]"), 1);
    }
}
