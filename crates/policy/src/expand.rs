//! Kubernetes' `$(VAR)` expansion of container commands, arguments and environment values,
//! byte for byte as the kubelet does it (`third_party/forked/golang/expansion`): `$(NAME)` is
//! replaced by the variable's value when it is defined and left as written when not; `$$` is a
//! literal `$`; a `$` before anything else, or an unclosed `$(`, stays as written.

/// What a variable name stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Var {
    /// A value known when the policy is written.
    Value(String),
    /// Defined, but with a value only the node knows (a Secret's, a field of the running pod):
    /// the expanded text cannot be pinned.
    Unpinned,
    /// Not defined: the reference stays as written.
    Unknown,
}

/// Why a text cannot be expanded into a pinned value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpandError {
    /// The text refers to this variable, whose value is not pinned.
    Unpinned(String),
    /// The kubelet's expansion would turn the text into invalid UTF-8 (a `$` before a
    /// multi-byte character), which the runtime refuses.
    NotUtf8,
}

/// Expands `input` with `lookup`.
pub fn expand(input: &str, mut lookup: impl FnMut(&str) -> Var) -> Result<String, ExpandError> {
    let bytes = input.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut checkpoint = 0;
    let mut cursor = 0;
    while cursor < bytes.len() {
        if bytes[cursor] == b'$' && cursor + 1 < bytes.len() {
            out.extend_from_slice(&bytes[checkpoint..cursor]);
            let rest = &bytes[cursor + 1..];
            let advance = match rest[0] {
                b'$' => {
                    out.push(b'$');
                    1
                }
                b'(' => match rest.iter().skip(1).position(|b| *b == b')') {
                    Some(close) => {
                        let close = close + 1;
                        // Between ASCII delimiters of valid UTF-8: valid UTF-8.
                        let name = std::str::from_utf8(&rest[1..close])
                            .map_err(|_| ExpandError::NotUtf8)?;
                        match lookup(name) {
                            Var::Value(v) => out.extend_from_slice(v.as_bytes()),
                            Var::Unpinned => return Err(ExpandError::Unpinned(name.to_string())),
                            Var::Unknown => {
                                out.extend_from_slice(b"$(");
                                out.extend_from_slice(name.as_bytes());
                                out.push(b')');
                            }
                        }
                        close + 1
                    }
                    None => {
                        out.extend_from_slice(b"$(");
                        1
                    }
                },
                other => {
                    // Go's string(byte) is the rune of that byte's value.
                    out.push(b'$');
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(char::from(other).encode_utf8(&mut buf).as_bytes());
                    1
                }
            };
            cursor += advance;
            checkpoint = cursor + 1;
        }
        cursor += 1;
    }
    if checkpoint < bytes.len() {
        out.extend_from_slice(&bytes[checkpoint..]);
    }
    String::from_utf8(out).map_err(|_| ExpandError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(name: &str) -> Var {
        match name {
            "A" => Var::Value("alpha".into()),
            "EMPTY" => Var::Value(String::new()),
            "SECRET" => Var::Unpinned,
            _ => Var::Unknown,
        }
    }

    #[test]
    fn expansion_follows_the_kubelet() {
        let cases = [
            ("$(A)", "alpha"),
            ("x$(A)y", "xalphay"),
            ("$(A)$(A)", "alphaalpha"),
            ("$$(A)", "$(A)"),
            ("$$$(A)", "$alpha"),
            ("$$", "$"),
            ("$", "$"),
            ("a$", "a$"),
            ("$(B)", "$(B)"),
            ("$(", "$("),
            ("$(A", "$(A"),
            ("$(A$(A)", "$(A$(A)"),
            ("$x", "$x"),
            ("$ (A)", "$ (A)"),
            ("$(EMPTY)-", "-"),
            ("$()", "$()"),
            ("", ""),
            ("plain", "plain"),
            ("$(A))", "alpha)"),
        ];
        for (input, want) in cases {
            assert_eq!(expand(input, vars).as_deref(), Ok(want), "{input:?}");
        }
    }

    #[test]
    fn unpinned_references_are_errors() {
        assert_eq!(
            expand("x $(SECRET)", vars),
            Err(ExpandError::Unpinned("SECRET".into()))
        );
        // Escaped: no reference.
        assert_eq!(expand("$$(SECRET)", vars).as_deref(), Ok("$(SECRET)"));
    }

    #[test]
    fn a_dollar_before_a_multibyte_character_is_refused() {
        assert_eq!(expand("$é", vars), Err(ExpandError::NotUtf8));
        assert_eq!(expand("é$(A)é", vars).as_deref(), Ok("éalphaé"));
    }
}
