//! Reference values: named lists of accepted values that appraisal policies consult as
//! `data.reference.<name>`.
//!
//! The document `coffer kbs set-reference-values --file refs.json` loads is a JSON object whose
//! keys are names and whose values are arrays, for example
//! `{"measurement": ["a1f3…"], "init_data": ["9e4c…"], "snp_tcb_min": [{"bootloader": 3, …}]}`.
//! Setting a name replaces its whole list; names not in the document are left alone.

use std::collections::BTreeMap;

use serde_json::Value;

/// A set of named reference-value lists.
pub type ReferenceValues = BTreeMap<String, Vec<Value>>;

/// Error in a reference-value document.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    /// The document is not JSON of the expected shape.
    #[error("reference values must be a JSON object mapping names to arrays: {0}")]
    Shape(String),
    /// A name is empty or uses characters other than ASCII letters, digits, `_`, `-`, `.`.
    #[error("invalid reference value name {0:?}: use ASCII letters, digits, '_', '-' or '.'")]
    Name(String),
}

/// True when `name` is usable as a reference-value name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Parses and validates a reference-value document.
pub fn parse(bytes: &[u8]) -> Result<ReferenceValues, ReferenceError> {
    let values: ReferenceValues =
        serde_json::from_slice(bytes).map_err(|e| ReferenceError::Shape(e.to_string()))?;
    if let Some(bad) = values.keys().find(|k| !valid_name(k)) {
        return Err(ReferenceError::Name(bad.clone()));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_named_lists_and_rejects_other_shapes() {
        let v = parse(br#"{"measurement":["ab"],"svn":[1,2]}"#).unwrap();
        assert_eq!(v["svn"].len(), 2);
        assert!(matches!(
            parse(br#"{"measurement":"ab"}"#),
            Err(ReferenceError::Shape(_))
        ));
        assert!(matches!(
            parse(br#"{"a b":[]}"#),
            Err(ReferenceError::Name(_))
        ));
        assert!(parse(b"[1]").is_err());
    }
}
