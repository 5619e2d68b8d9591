//! Validation of Kubernetes objects against the published Kubernetes OpenAPI v3 schemas.
//!
//! The schemas are the unmodified files `api/openapi-spec/v3/{api__v1,apis__apps__v1,
//! apis__batch__v1}_openapi.json` of kubernetes/kubernetes (see README.md next to this file),
//! stored gzip-compressed and loaded as they are: a document is validated by the `jsonschema`
//! crate against the component schema that the files themselves declare for the document's
//! `apiVersion` and `kind` (`x-kubernetes-group-version-kind`), with every `$ref` resolved inside
//! the same file. Nothing of the schemas is re-typed here.
//!
//! On top of that, [`validate`] is strict in the way `kubectl --validate=strict` is: the
//! Kubernetes schemas do not set `additionalProperties: false`, so a misspelled field would pass
//! plain JSON Schema validation; a walk over the schema reports every field of the document that
//! the schema does not declare (following `$ref` and `allOf`; `x-kubernetes-preserve-unknown-fields`
//! and opaque `type: object` schemas without properties stay open), and every integer outside
//! the range of its `format: int32`/`int64`.
//!
//! Object fields whose value is `null` are dropped before validating: the API server decodes
//! `null` as "unset" (this is how `creationTimestamp: null` in `kubectl create --dry-run -o yaml`
//! output is accepted).
//!
//! The files are decompressed and parsed once per test process, and each schema is compiled once
//! (on first use) and cached.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::{json, Value};

/// One published OpenAPI file.
struct Spec {
    /// The file's `components` object (`schemas` keyed by definition name).
    components: Value,
}

/// The three published files, in the order of [`FILES`].
const FILES: [(&str, &[u8]); 3] = [
    (
        "api__v1_openapi.json",
        include_bytes!("api__v1_openapi.json.gz"),
    ),
    (
        "apis__apps__v1_openapi.json",
        include_bytes!("apis__apps__v1_openapi.json.gz"),
    ),
    (
        "apis__batch__v1_openapi.json",
        include_bytes!("apis__batch__v1_openapi.json.gz"),
    ),
];

struct Schemas {
    specs: Vec<Spec>,
    /// `(apiVersion, kind)` → (index into `specs`, component schema name), from the
    /// `x-kubernetes-group-version-kind` of every component schema.
    by_gvk: HashMap<(String, String), (usize, String)>,
}

fn schemas() -> &'static Schemas {
    static SCHEMAS: OnceLock<Schemas> = OnceLock::new();
    SCHEMAS.get_or_init(|| {
        let mut specs = Vec::new();
        let mut by_gvk = HashMap::new();
        for (index, (name, gz)) in FILES.iter().enumerate() {
            let mut text = Vec::new();
            flate2::read::GzDecoder::new(*gz)
                .read_to_end(&mut text)
                .unwrap_or_else(|e| panic!("decompressing {name}: {e}"));
            let mut file: Value =
                serde_json::from_slice(&text).unwrap_or_else(|e| panic!("parsing {name}: {e}"));
            let components = file
                .get_mut("components")
                .map(Value::take)
                .unwrap_or_else(|| panic!("{name} has no components"));
            let defs = components["schemas"]
                .as_object()
                .unwrap_or_else(|| panic!("{name} has no components.schemas"));
            for (def, schema) in defs {
                let gvks = schema
                    .get("x-kubernetes-group-version-kind")
                    .and_then(Value::as_array);
                for gvk in gvks.into_iter().flatten() {
                    let (Some(group), Some(version), Some(kind)) = (
                        gvk["group"].as_str(),
                        gvk["version"].as_str(),
                        gvk["kind"].as_str(),
                    ) else {
                        continue;
                    };
                    let api_version = if group.is_empty() {
                        version.to_owned()
                    } else {
                        format!("{group}/{version}")
                    };
                    by_gvk
                        .entry((api_version, kind.to_owned()))
                        .or_insert_with(|| (index, def.clone()));
                }
            }
            specs.push(Spec { components });
        }
        Schemas { specs, by_gvk }
    })
}

/// Checks for the `format`s the files use; `should_ignore_unknown_formats(false)` makes any other
/// format a compile error instead of a silent pass. (The `jsonschema` crate applies formats to
/// strings only: integer ranges of `int32`/`int64` are checked by the strict walk.)
fn options() -> jsonschema::ValidationOptions<'static> {
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .should_validate_formats(true)
        .should_ignore_unknown_formats(false)
        .with_format("int32", |s: &str| s.parse::<i32>().is_ok())
        .with_format("int64", |s: &str| s.parse::<i64>().is_ok())
        // IntOrString is `oneOf: [integer, string]`: any string is allowed.
        .with_format("int-or-string", |_: &str| true)
        .with_format("byte", is_base64)
}

/// Standard base64 with padding, as Go's `encoding/json` decodes `[]byte` (line breaks are
/// skipped).
fn is_base64(s: &str) -> bool {
    let bytes: Vec<u8> = s.bytes().filter(|b| !matches!(b, b'\r' | b'\n')).collect();
    let body = bytes.iter().rposition(|&b| b != b'=').map_or(0, |i| i + 1);
    bytes.chunks_exact(4).remainder().is_empty()
        && bytes.len() - body <= 2
        && bytes[..body]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// Compiled validators by (index into `FILES`, component schema name).
type Cache = Mutex<HashMap<(usize, String), Arc<jsonschema::Validator>>>;

/// The compiled validator of one component schema (compiled on first use, then cached).
fn compiled(spec: usize, def: &str) -> Arc<jsonschema::Validator> {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (spec, def.to_owned());
    if let Some(validator) = cache.lock().unwrap().get(&key) {
        return validator.clone();
    }
    // The root is a reference into the file's own components, so that every `$ref` of the file
    // (`#/components/schemas/...`) resolves against the whole, unmodified file.
    let root = json!({
        "$ref": format!("#/components/schemas/{def}"),
        "components": schemas().specs[spec].components,
    });
    let validator = Arc::new(
        options()
            .build(&root)
            .unwrap_or_else(|e| panic!("compiling {def}: {e}")),
    );
    cache.lock().unwrap().insert(key, validator.clone());
    validator
}

/// The component schema name and file the published schemas declare for `apiVersion`/`kind`.
pub fn schema_name(api_version: &str, kind: &str) -> Option<(&'static str, &'static str)> {
    let (spec, def) = schemas()
        .by_gvk
        .get(&(api_version.to_owned(), kind.to_owned()))?;
    Some((FILES[*spec].0, def.as_str()))
}

/// Validates one Kubernetes object against the published schema of its `apiVersion`/`kind`, in
/// strict mode (no undeclared fields). The errors name the JSON pointer of the offending value.
pub fn validate(doc: &Value) -> Result<(), Vec<String>> {
    validate_with(doc, true)
}

/// Like [`validate`] but without the strict walk: plain JSON Schema validation only, which
/// accepts undeclared (e.g. misspelled optional) fields.
pub fn validate_schema_only(doc: &Value) -> Result<(), Vec<String>> {
    validate_with(doc, false)
}

fn validate_with(doc: &Value, strict: bool) -> Result<(), Vec<String>> {
    let api_version = doc.get("apiVersion").and_then(Value::as_str);
    let kind = doc.get("kind").and_then(Value::as_str);
    let (Some(api_version), Some(kind)) = (api_version, kind) else {
        return Err(vec![
            "/: a Kubernetes object needs string `apiVersion` and `kind`".to_owned(),
        ]);
    };
    let Some((spec, def)) = schemas()
        .by_gvk
        .get(&(api_version.to_owned(), kind.to_owned()))
    else {
        return Err(vec![format!(
            "/: no schema for apiVersion {api_version:?} kind {kind:?} in the core/v1, apps/v1 \
             and batch/v1 OpenAPI files"
        )]);
    };
    let doc = without_nulls(doc);
    let validator = compiled(*spec, def);
    let mut errors: Vec<String> = validator
        .iter_errors(&doc)
        .map(|e| format!("{}: {e}", pointer_or_root(&e.instance_path().to_string())))
        .collect();
    if strict {
        let components = &schemas().specs[*spec].components;
        let root = json!({ "$ref": format!("#/components/schemas/{def}") });
        walk(components, &root, &doc, &mut String::new(), &mut errors);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn pointer_or_root(pointer: &str) -> &str {
    if pointer.is_empty() {
        "/"
    } else {
        pointer
    }
}

/// A copy of `value` without object fields that are `null` (at any depth).
fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

/// What a schema says about the shape of a value, gathered through `$ref` and `allOf`.
#[derive(Default)]
struct Shape<'a> {
    preserve_unknown_fields: bool,
    has_properties: bool,
    properties: HashMap<&'a str, &'a Value>,
    additional: Option<&'a Value>,
    items: Option<&'a Value>,
    formats: Vec<&'a str>,
}

fn gather<'a>(components: &'a Value, schema: &'a Value, shape: &mut Shape<'a>, depth: usize) {
    assert!(depth < 64, "$ref cycle without a value in between");
    let Some(obj) = schema.as_object() else {
        return;
    };
    if let Some(target) = obj.get("$ref").and_then(Value::as_str) {
        let name = target
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected $ref {target}"));
        let resolved = &components["schemas"][name];
        assert!(!resolved.is_null(), "dangling $ref {target}");
        gather(components, resolved, shape, depth + 1);
    }
    for sub in obj
        .get("allOf")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        gather(components, sub, shape, depth + 1);
    }
    if obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        shape.preserve_unknown_fields = true;
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        shape.has_properties = true;
        for (k, v) in props {
            shape.properties.entry(k.as_str()).or_insert(v);
        }
    }
    if let Some(additional) = obj.get("additionalProperties") {
        shape.additional = Some(additional);
    }
    if let Some(items) = obj.get("items") {
        shape.items = Some(items);
    }
    if let Some(format) = obj.get("format").and_then(Value::as_str) {
        shape.formats.push(format);
    }
}

/// The strict walk: reports fields the schema does not declare, and integers outside the range
/// of their `int32`/`int64` format.
fn walk(
    components: &Value,
    schema: &Value,
    value: &Value,
    path: &mut String,
    errors: &mut Vec<String>,
) {
    let mut shape = Shape::default();
    gather(components, schema, &mut shape, 0);
    if shape.preserve_unknown_fields {
        return;
    }
    match value {
        Value::Object(map) => {
            // `type: object` without properties (RawExtension, FieldsV1): opaque, open.
            if !shape.has_properties && shape.additional.is_none() {
                return;
            }
            for (key, field) in map {
                let len = path.len();
                path.push('/');
                path.push_str(&key.replace('~', "~0").replace('/', "~1"));
                if let Some(sub) = shape.properties.get(key.as_str()) {
                    walk(components, sub, field, path, errors);
                } else {
                    match shape.additional {
                        Some(Value::Bool(true)) => {}
                        Some(sub @ Value::Object(_)) => walk(components, sub, field, path, errors),
                        _ => errors.push(format!(
                            "{path}: unknown field {key:?} (the schema declares no such field)"
                        )),
                    }
                }
                path.truncate(len);
            }
        }
        Value::Array(items) => {
            if let Some(sub) = shape.items {
                for (i, item) in items.iter().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("/{i}"));
                    walk(components, sub, item, path, errors);
                    path.truncate(len);
                }
            }
        }
        Value::Number(n) => {
            let fits = |min: i64, max: i64| n.as_i64().is_some_and(|i| (min..=max).contains(&i));
            for format in &shape.formats {
                let ok = match *format {
                    "int32" if n.is_i64() || n.is_u64() => fits(i32::MIN.into(), i32::MAX.into()),
                    "int64" if n.is_i64() || n.is_u64() => fits(i64::MIN, i64::MAX),
                    _ => true,
                };
                if !ok {
                    errors.push(format!(
                        "{}: {n} is out of the range of format {format:?}",
                        pointer_or_root(path)
                    ));
                }
            }
        }
        _ => {}
    }
}
