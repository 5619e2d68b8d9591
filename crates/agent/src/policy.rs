//! The agent policy: package `agent_policy`, one boolean rule per request name
//! (`CreateContainerRequest`, `ExecProcessRequest`, …), evaluated with the whole request as
//! `input`. A request is allowed only when its rule is exactly `true`: a missing rule, an
//! undefined result, any other value or an evaluation error denies it.
//!
//! The policy comes from the initdata (`policy.rego`), whose digest the TEE evidence binds, or is
//! the built-in [`DEFAULT_POLICY`]. `SetPolicy` replaces it only where the policy in force allows
//! `SetPolicyRequest` for that request. Every decision goes to the audit sink.

use std::sync::{Arc, Mutex, RwLock};

use regorus::{Engine, Value as RegoValue};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The built-in policy.
pub const DEFAULT_POLICY: &str = include_str!("../policies/default.rego");

/// The policy package.
pub const PACKAGE: &str = "data.agent_policy";

/// Turns off backtraces for library errors (`RUST_LIB_BACKTRACE=0`) unless that variable is
/// set: the Rego engine creates error values while it evaluates (an undefined reference is one),
/// and with `RUST_BACKTRACE=1` each captured a backtrace, which made a decision about three times
/// slower. Panics keep their backtraces. Call it first in `main`, before any thread starts.
pub fn quiet_library_backtraces() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
}

/// A policy problem.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The text is not a valid agent policy.
    #[error("invalid agent policy: {0}")]
    Invalid(String),
    /// The request was denied; the message names it.
    #[error("denied by policy: {0}")]
    Denied(String),
}

/// Where decisions are recorded (the guest's audit stream).
pub trait Audit: Send + Sync {
    /// One decision, as a JSON object.
    fn record(&self, entry: Value);
}

/// An audit sink that keeps entries in memory (tests, and as a ring for GetGuestDetails).
#[derive(Default)]
pub struct MemoryAudit(pub Mutex<Vec<Value>>);

impl Audit for MemoryAudit {
    fn record(&self, entry: Value) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(entry);
    }
}

/// An audit sink appending JSON lines to a file (flushed per decision).
pub struct FileAudit(Mutex<std::fs::File>);

impl FileAudit {
    /// Opens (creating, appending) `path`.
    pub fn open(path: &std::path::Path) -> std::io::Result<Self> {
        Ok(Self(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        )))
    }
}

impl Audit for FileAudit {
    fn record(&self, mut entry: Value) {
        use std::io::Write;
        if let Some(m) = entry.as_object_mut() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            m.insert("time".into(), json!(now));
        }
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if writeln!(f, "{entry}").and_then(|_| f.flush()).is_err() {
            tracing::error!("cannot write the audit log");
        }
    }
}

/// A compiled policy.
struct Compiled {
    engine: Engine,
    id: String,
}

impl Compiled {
    fn new(text: &str) -> Result<Self, PolicyError> {
        use coffer_wire::rego::{nesting_depth, MAX_BYTES, MAX_NESTING};
        // Before the parser, whose time grows exponentially with nesting.
        if text.len() > MAX_BYTES {
            return Err(PolicyError::Invalid(format!(
                "{} bytes, more than the {MAX_BYTES} an agent policy may have",
                text.len()
            )));
        }
        let depth = nesting_depth(text);
        if depth > MAX_NESTING {
            return Err(PolicyError::Invalid(format!(
                "brackets nest {depth} deep, more than the {MAX_NESTING} an agent policy may"
            )));
        }
        let mut engine = Engine::new();
        let package = engine
            .add_policy("policy.rego".into(), text.to_string())
            .map_err(|e| PolicyError::Invalid(e.to_string()))?;
        if package != PACKAGE {
            return Err(PolicyError::Invalid(format!(
                "package is {package:?}; it must be `package agent_policy`"
            )));
        }
        // A trial evaluation prepares the engine (each request then clones it warm) and catches
        // conflicts early.
        let _ = engine.eval_rule(format!("{PACKAGE}.GetGuestDetailsRequest"));
        Ok(Self {
            engine,
            id: format!("sha256:{}", hex::encode(Sha256::digest(text.as_bytes()))),
        })
    }

    /// Decides `request` on `input`; when it is allowed and `then` names a rule, that rule's
    /// string value too (e.g. the digest to pull), and when it is denied, the policy's
    /// `denial[request]` explanation if it gives one.
    fn decide(&self, request: &str, input: &Value, then: Option<&str>) -> Decision {
        let mut engine = self.engine.clone();
        engine.set_input(RegoValue::from(input.clone()));
        let string_rule = |engine: &mut Engine, path: String| match engine.eval_rule(path) {
            Ok(RegoValue::String(s)) => Some(s.to_string()),
            _ => None,
        };
        // One query for the decision, the rule asked for and the denial's reason: the rules
        // they share are evaluated once.
        let first_string = |v: &RegoValue| match v.as_array().ok().and_then(|a| a.first()) {
            Some(RegoValue::String(s)) => Some(s.to_string()),
            _ => None,
        };
        let query = format!(
            "allow := {PACKAGE}.{request}; then := [x | x := {PACKAGE}.{}]; why := [x | x := {PACKAGE}.denial.{request}]",
            then.unwrap_or(request)
        );
        if let Ok(r) = engine.eval_query(query, false) {
            if let Some(b) = r.result.first().map(|r| &r.bindings) {
                let allowed = b[&RegoValue::from("allow")] == RegoValue::from(true);
                return Decision {
                    allowed,
                    error: None,
                    reason: if allowed {
                        None
                    } else {
                        first_string(&b[&RegoValue::from("why")]).map(|r| printable(&r, MAX_REASON))
                    },
                    then: match (allowed, then) {
                        (true, Some(_)) => first_string(&b[&RegoValue::from("then")]),
                        _ => None,
                    },
                };
            }
        }
        // No decision from the query: the rule alone says why (missing, an error).
        match engine.eval_rule(format!("{PACKAGE}.{request}")) {
            Ok(v) if v == RegoValue::from(true) => Decision {
                allowed: true,
                error: None,
                reason: None,
                then: then.and_then(|rule| string_rule(&mut engine, format!("{PACKAGE}.{rule}"))),
            },
            Ok(_) => Decision {
                allowed: false,
                error: None,
                reason: string_rule(&mut engine, format!("{PACKAGE}.denial.{request}"))
                    .map(|r| printable(&r, MAX_REASON)),
                then: None,
            },
            Err(e) if e.to_string().contains("not a valid rule path") => Decision {
                allowed: false,
                error: Some(format!("the policy has no rule {request}")),
                reason: None,
                then: None,
            },
            Err(e) => Decision {
                allowed: false,
                error: Some(e.to_string()),
                reason: None,
                then: None,
            },
        }
    }
}

/// One decision.
struct Decision {
    allowed: bool,
    /// Why the policy could not decide (counts as a denial).
    error: Option<String>,
    /// The policy's own explanation of a denial.
    reason: Option<String>,
    /// The value of the rule asked for after an allow.
    then: Option<String>,
}

/// The longest denial explanation passed on (it reaches the node's events).
const MAX_REASON: usize = 1024;

/// `text` with control characters replaced and cut to `max` bytes (at a character boundary).
fn printable(text: &str, max: usize) -> String {
    let mut out = String::new();
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > max {
            out.push('…');
            break;
        }
        out.push(c);
    }
    out
}

/// The policy in force, replaceable by an allowed `SetPolicy`.
pub struct AgentPolicy {
    current: RwLock<Arc<Compiled>>,
    audit: Arc<dyn Audit>,
}

impl AgentPolicy {
    /// The policy from the initdata's `policy.rego` when present, else the default.
    pub fn new(initdata_policy: Option<&str>, audit: Arc<dyn Audit>) -> Result<Self, PolicyError> {
        let compiled = Compiled::new(initdata_policy.unwrap_or(DEFAULT_POLICY))?;
        Ok(Self {
            current: RwLock::new(Arc::new(compiled)),
            audit,
        })
    }

    /// `sha256:<hex>` of the policy in force.
    pub fn id(&self) -> String {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .id
            .clone()
    }

    /// Allows or denies `request` (e.g. `ExecProcessRequest`) with `input` (the full request);
    /// the decision is audited. Denials name the request, and the policy's explanation when it
    /// gives one (`denied by policy: CreateContainerRequest: args[1] is …`).
    pub fn check(&self, request: &str, input: &Value) -> Result<(), PolicyError> {
        self.check_then(request, input, None).map(|_| ())
    }

    /// [`Self::check`], and on an allow the string value of rule `then` for the same input
    /// (`None`: the policy does not define it for this request).
    pub fn check_then(
        &self,
        request: &str,
        input: &Value,
        then: Option<&str>,
    ) -> Result<Option<String>, PolicyError> {
        let compiled = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let d = compiled.decide(request, input, then);
        self.audit.record(json!({
            "request": request,
            "decision": if d.allowed { "allow" } else { "deny" },
            "policy": compiled.id,
            "error": d.error,
            "reason": d.reason,
        }));
        if d.allowed {
            tracing::debug!(request, "allowed by policy");
            Ok(d.then)
        } else {
            tracing::info!(
                request,
                reason = d.reason.as_deref().unwrap_or(""),
                "denied by policy"
            );
            Err(PolicyError::Denied(match d.reason {
                Some(r) => format!("{request}: {r}"),
                None => request.to_string(),
            }))
        }
    }

    /// Records the decision on an owner-signed exec (`refused` = why it was refused), which is
    /// taken on the owner's signature instead of the policy.
    pub fn audit_owner_exec(
        &self,
        req: &crate::proto::ExecProcessRequest,
        refused: Option<String>,
    ) {
        self.audit.record(json!({
            "request": "ExecProcessRequest",
            "decision": if refused.is_none() { "allow" } else { "deny" },
            "by": "owner signature",
            "container_id": req.container_id,
            "args": req.args,
            "error": refused,
        }));
    }

    /// Replaces the policy with `text` if the policy in force allows this `SetPolicyRequest`
    /// (`input` = `{"policy": text}`) and `text` is a valid agent policy.
    pub fn set(&self, text: &str) -> Result<(), PolicyError> {
        self.check("SetPolicyRequest", &json!({ "policy": text }))?;
        let compiled = Arc::new(Compiled::new(text)?);
        let id = compiled.id.clone();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = compiled;
        self.audit
            .record(json!({"request": "SetPolicyRequest", "policy_now": id}));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: Option<&str>) -> (AgentPolicy, Arc<MemoryAudit>) {
        let audit = Arc::new(MemoryAudit::default());
        (AgentPolicy::new(text, audit.clone()).unwrap(), audit)
    }

    #[test]
    fn the_default_allows_the_lifecycle_and_denies_exec_writes_copies_and_changes() {
        let (p, audit) = policy(None);
        for ok in [
            "CreateSandboxRequest",
            "CreateContainerRequest",
            "StartContainerRequest",
            "ReadStreamRequest",
            "WaitProcessRequest",
            "RemoveContainerRequest",
        ] {
            p.check(ok, &json!({})).unwrap();
        }
        for denied in [
            "ExecProcessRequest",
            "WriteStreamRequest",
            "CopyFileRequest",
            "SetPolicyRequest",
            "SomethingNewRequest",
        ] {
            let e = p.check(denied, &json!({})).unwrap_err();
            assert_eq!(e.to_string(), format!("denied by policy: {denied}"));
        }
        assert!(p
            .set("package agent_policy\ndefault ExecProcessRequest := true\n")
            .is_err());
        let log = audit.0.lock().unwrap();
        assert_eq!(log.len(), 12);
        assert_eq!(log[6]["decision"], "deny");
        assert!(log[10]["error"].as_str().unwrap().contains("no rule"));
    }

    #[test]
    fn initdata_policies_replace_the_default_and_see_the_request() {
        let text = r#"package agent_policy
import rego.v1
default ExecProcessRequest := false
ExecProcessRequest if input.process.args == ["/bin/date"]
default SetPolicyRequest := false
SetPolicyRequest if contains(input.policy, "allow-all-exec")
default GetGuestDetailsRequest := true
"#;
        let (p, _) = policy(Some(text));
        p.check(
            "ExecProcessRequest",
            &json!({"process": {"args": ["/bin/date"]}}),
        )
        .unwrap();
        assert!(p
            .check(
                "ExecProcessRequest",
                &json!({"process": {"args": ["/bin/sh"]}})
            )
            .is_err());
        // Not in this policy: denied although the default would allow it.
        assert!(p.check("CreateContainerRequest", &json!({})).is_err());
        // SetPolicy only as the policy in force allows.
        assert!(p
            .set("package agent_policy\ndefault ExecProcessRequest := true\n")
            .is_err());
        let before = p.id();
        p.set("package agent_policy\n# allow-all-exec\ndefault ExecProcessRequest := true\n")
            .unwrap();
        assert_ne!(p.id(), before);
        p.check(
            "ExecProcessRequest",
            &json!({"process": {"args": ["/bin/sh"]}}),
        )
        .unwrap();
        // A non-boolean or wrong package is refused.
        assert!(
            AgentPolicy::new(Some("package other\n"), Arc::new(MemoryAudit::default())).is_err()
        );
        let (odd, _) = policy(Some(
            "package agent_policy\nExecProcessRequest := \"yes\"\n",
        ));
        assert!(odd.check("ExecProcessRequest", &json!({})).is_err());
    }

    #[test]
    fn a_denial_carries_the_policys_reason_and_an_allow_the_rule_asked_for() {
        let text = r#"package agent_policy
import rego.v1
default CreateContainerRequest := false
CreateContainerRequest if input.args == ["/app"]
pull_image := "docker://r/app@sha256:aa" if CreateContainerRequest
denial["CreateContainerRequest"] := sprintf("args is %v\u0007, the policy allows [\"/app\"]", [input.args])
"#;
        let (p, audit) = policy(Some(text));
        let pinned = p
            .check_then(
                "CreateContainerRequest",
                &json!({"args": ["/app"]}),
                Some("pull_image"),
            )
            .unwrap();
        assert_eq!(pinned.as_deref(), Some("docker://r/app@sha256:aa"));
        let e = p
            .check("CreateContainerRequest", &json!({"args": ["/bin/sh"]}))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "denied by policy: CreateContainerRequest: args is [\"/bin/sh\"] , the policy allows [\"/app\"]"
        );
        assert_eq!(
            audit.0.lock().unwrap()[1]["reason"],
            "args is [\"/bin/sh\"] , the policy allows [\"/app\"]"
        );
        assert_eq!(printable(&"é".repeat(10), 5), "éé…");
    }

    #[test]
    fn a_policy_bomb_is_refused_before_the_parser() {
        let bomb = format!("package agent_policy\nx := {}", "[".repeat(30));
        let err = AgentPolicy::new(Some(&bomb), Arc::new(MemoryAudit::default()))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("nest 30 deep"), "{err}");
        let (p, _) = policy(None);
        assert!(p.set(&bomb).is_err(), "SetPolicy takes the same check");
        let huge = format!("package agent_policy\n# {}\n", "x".repeat(300 << 10));
        assert!(AgentPolicy::new(Some(&huge), Arc::new(MemoryAudit::default())).is_err());
    }
}
