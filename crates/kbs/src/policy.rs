//! Rego policies (regorus): the attestation (appraisal) policy that sets each submodule's EAR
//! status, and the resource policy that decides each release.
//!
//! Both use package `policy`.
//! * Attestation policy: `input` = the annotated evidence (`{"tee": "<tee>", "<tee>": {claims},
//!   "init_data": "<hex>", "init_data_claims": {…}, "runtime_data_claims": {…}}`),
//!   `data.reference` = the reference values. Rule `status` must be one of `affirming`, `warning`,
//!   `contraindicated`, `none`; optional rule `reason` (a string shown to the admin, never to
//!   the client) and `trust_vector` (an object of AR4SI claims).
//! * Resource policy: `input` = the token claims, `data` = `{"plugin": "resource",
//!   "resource-path": "/<repo>/<type>/<tag>", "repository", "type", "tag"}`; rule `allow`.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use coffer_wire::{ear::Status, reference::ReferenceValues};
use regorus::{
    languages::rego::compiler::Compiler as RvmCompiler,
    rvm::{program::Program, vm::RegoVM},
    CompiledPolicy, Engine, Value as RegoValue,
};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::RwLock;

use crate::store::{PolicyKind, Store, StoreError};

/// The rule a resource policy decides with.
const RESOURCE_RULE: &str = "data.policy.allow";

/// How many resources' prepared resource-policy engines are kept.
const RESOURCE_ENGINES: usize = 64;

/// The most instructions one appraisal may run on the Rego VM. Beyond it the interpreter,
/// which has no such bound, decides (as for any error of the VM).
const RVM_MAX_INSTRUCTIONS: usize = 10_000_000;

/// The default attestation policy.
pub const DEFAULT_ATTESTATION_POLICY: &str = include_str!("../policies/attestation.rego");
/// The default resource policy: release only when every submodule is affirming.
pub const DEFAULT_RESOURCE_POLICY: &str = include_str!("../policies/resource.rego");

/// The package of the helper module added beside an attestation policy: its one rule gathers
/// `status` and the optional rules the policy defines.
const APPRAISAL_PACKAGE: &str = "coffer_appraisal";

/// A policy failed to compile or evaluate.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The text is not a valid policy.
    #[error("invalid {kind} policy: {detail}")]
    Invalid {
        /// Which policy.
        kind: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// Evaluation failed.
    #[error("{kind} policy evaluation failed: {detail}")]
    Eval {
        /// Which policy.
        kind: &'static str,
        /// What failed.
        detail: String,
    },
    /// The text exceeds a limit, or its compilation its time budget.
    #[error("{kind} policy refused: {detail}")]
    TooComplex {
        /// Which policy.
        kind: &'static str,
        /// Which limit.
        detail: String,
    },
    /// Loading policies from the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a policy text may cost before the Rego parser sees it.
#[derive(Clone, Copy, Debug)]
pub struct PolicyLimits {
    /// Largest text in bytes.
    pub max_bytes: usize,
    /// Deepest nesting of `[`, `{` and `(` outside strings and comments.
    pub max_nesting: usize,
    /// Time budget of one compilation (on the blocking pool, never on an async worker).
    pub compile_timeout: std::time::Duration,
}

impl PolicyLimits {
    /// The limits `config` sets.
    pub fn of(config: &crate::Config) -> Self {
        Self {
            max_bytes: config.max_policy_bytes,
            max_nesting: config.max_policy_nesting,
            compile_timeout: std::time::Duration::from_millis(config.policy_compile_timeout_ms),
        }
    }
}

impl Default for PolicyLimits {
    fn default() -> Self {
        Self::of(&crate::Config::default())
    }
}

/// Checks `text` against `limits` before any parsing.
pub fn check_limits(
    kind: PolicyKind,
    text: &str,
    limits: &PolicyLimits,
) -> Result<(), PolicyError> {
    let refuse = |detail: String| PolicyError::TooComplex {
        kind: kind.key(),
        detail,
    };
    if text.len() > limits.max_bytes {
        return Err(refuse(format!(
            "{} bytes exceeds max-policy-bytes ({})",
            text.len(),
            limits.max_bytes
        )));
    }
    let depth = coffer_wire::rego::nesting_depth(text);
    if depth > limits.max_nesting {
        return Err(refuse(format!(
            "brackets nest {depth} deep, more than max-policy-nesting ({})",
            limits.max_nesting
        )));
    }
    Ok(())
}

/// Compiles a policy within `limits`: the limits are checked first, then the compilation runs
/// on the blocking pool with its time budget.
pub async fn compile(
    kind: PolicyKind,
    text: String,
    data: Value,
    limits: &PolicyLimits,
) -> Result<Arc<Compiled>, PolicyError> {
    check_limits(kind, &text, limits)?;
    let job = tokio::task::spawn_blocking(move || Compiled::new(kind, &text, data).map(Arc::new));
    match tokio::time::timeout(limits.compile_timeout, job).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(PolicyError::Invalid {
            kind: kind.key(),
            detail: format!("the compilation failed: {e}"),
        }),
        Err(_) => Err(PolicyError::TooComplex {
            kind: kind.key(),
            detail: format!(
                "its compilation exceeded {} ms (policy-compile-timeout-ms)",
                limits.compile_timeout.as_millis()
            ),
        }),
    }
}

/// A compiled policy with its data, ready to evaluate.
pub struct Compiled {
    engine: Mutex<Engine>,
    /// Resource policies: prepared engines with each recently asked resource's `data` added,
    /// so that a decision is one rule evaluation (no query to parse, no `with` to apply).
    by_resource: Mutex<HashMap<String, Engine>>,
    /// Optional attestation rules (`reason`, `trust_vector`) the policy defines.
    optional_rules: Vec<&'static str>,
    /// The rule evaluated for an appraisal (see [`APPRAISAL_PACKAGE`]).
    appraisal_rule: String,
    /// The main rule (the appraisal rule, or `allow`) compiled for regorus's register VM: for the
    /// two default policies only, about six times faster than interpreting it. The VM's
    /// semantics differ from Rego's in places (an assignment from an undefined reference
    /// succeeds), so it runs only the policies whose every rule the tests compare with the
    /// interpreter.
    rvm: Option<Rvm>,
    /// `sha256:<hex>` of the policy text.
    pub id: String,
}

/// A default policy's main rule as a Rego VM program, with its `data` (the attestation
/// policy's; a resource policy's `data` is the resource's, given with each decision).
struct Rvm {
    policy: CompiledPolicy,
    program: Arc<Program>,
    data: RegoValue,
}

impl Rvm {
    /// Compiles `rule` of `engine` (whose `data` is `data`) for the VM.
    fn compile(engine: &mut Engine, rule: &str, data: RegoValue) -> Result<Self, String> {
        let policy = engine
            .compile_with_entrypoint(&Arc::from(rule))
            .map_err(|e| e.to_string())?;
        let program =
            RvmCompiler::compile_from_policy(&policy, &[rule]).map_err(|e| e.to_string())?;
        Ok(Self {
            policy,
            program,
            data,
        })
    }

    /// `rule` of `engine` (policy `id`) compiled for the VM with `data`, if the VM compiles it
    /// and its trial (with `trial_data`, empty input) gives what the interpreter's gave
    /// (`interpreted`); otherwise the policy is interpreted, and the log says why.
    fn trusted(
        engine: &Engine,
        rule: &str,
        data: RegoValue,
        trial_data: RegoValue,
        interpreted: anyhow::Result<RegoValue>,
        id: &str,
    ) -> Option<Self> {
        let rvm = match Self::compile(&mut engine.clone(), rule, data) {
            Ok(rvm) => rvm,
            Err(e) => {
                tracing::info!(policy = %id, error = %e, "this policy is interpreted (the Rego VM cannot compile it)");
                return None;
            }
        };
        match (
            rvm.eval_with(rule, trial_data, RegoValue::new_object()),
            interpreted,
        ) {
            (Ok(a), Ok(b)) if a == b => Some(rvm),
            (a, b) => {
                tracing::warn!(policy = %id, vm = ?a, interpreter = ?b.map_err(|e| e.to_string()),
                    "the Rego VM and the interpreter disagree on this policy's trial; it is interpreted");
                None
            }
        }
    }

    /// Evaluates the entry point for `input` in a VM of its own.
    fn eval(&self, rule: &str, input: RegoValue) -> Result<RegoValue, String> {
        self.eval_with(rule, self.data.clone(), input)
    }

    /// Evaluates the entry point for `input` with `data`, in a VM of its own.
    fn eval_with(
        &self,
        rule: &str,
        data: RegoValue,
        input: RegoValue,
    ) -> Result<RegoValue, String> {
        let mut vm = RegoVM::new_with_policy(self.policy.clone());
        vm.load_program(self.program.clone());
        vm.set_max_instructions(RVM_MAX_INSTRUCTIONS);
        vm.set_data(data).map_err(|e| e.to_string())?;
        vm.set_input(input);
        vm.execute_entry_point_by_name(rule)
            .map_err(|e| e.to_string())
    }
}

/// The result of an appraisal.
#[derive(Clone, Debug)]
pub struct Appraisal {
    /// The EAR status.
    pub status: Status,
    /// Why (for the admin).
    pub reason: Option<String>,
    /// AR4SI trustworthiness vector, when the policy sets one.
    pub trust_vector: BTreeMap<String, i64>,
}

impl Compiled {
    /// Compiles `text` with `data`, and checks that its main rule evaluates on empty input.
    pub fn new(kind: PolicyKind, text: &str, data: Value) -> Result<Self, PolicyError> {
        let invalid = |detail: String| PolicyError::Invalid {
            kind: kind.key(),
            detail,
        };
        let mut engine = Engine::new();
        let package = engine
            .add_policy(format!("{}.rego", kind.key()), text.to_string())
            .map_err(|e| invalid(e.to_string()))?;
        if package != "data.policy" {
            return Err(invalid(format!(
                "package is {package:?}; it must be `package policy`"
            )));
        }
        let data = RegoValue::from(data);
        engine
            .add_data(data.clone())
            .map_err(|e| invalid(e.to_string()))?;
        // Trial evaluation on the template itself: catches undefined references and conflicts
        // early, and leaves the template prepared so that each per-request clone starts warm
        // instead of re-analysing the policy.
        let main = match kind {
            PolicyKind::Resource => "data.policy.allow",
            PolicyKind::Attestation => "data.policy.status",
        };
        engine
            .eval_rule(main.to_string())
            .map_err(|e| invalid(e.to_string()))?;
        let mut optional_rules = Vec::new();
        if kind == PolicyKind::Attestation {
            for rule in ["reason", "trust_vector"] {
                match engine.eval_rule(format!("data.policy.{rule}")) {
                    Ok(_) => optional_rules.push(rule),
                    Err(e) if e.to_string().contains("not a valid rule path") => {}
                    Err(e) => return Err(invalid(e.to_string())),
                }
            }
        }
        // One rule gathering every rule the policy defines, so that rules they share are
        // evaluated once and nothing is parsed per request. Optional rules sit in comprehensions:
        // undefined gives `[]` instead of an undefined result.
        let mut appraisal_rule = String::new();
        if kind == PolicyKind::Attestation {
            let helper = format!(
                "package {APPRAISAL_PACKAGE}\nimport rego.v1\nappraisal := [data.policy.status{}]\n",
                optional_rules
                    .iter()
                    .map(|r| format!(", [x | x := data.policy.{r}]"))
                    .collect::<String>()
            );
            engine
                .add_policy(format!("{APPRAISAL_PACKAGE}.rego"), helper)
                .map_err(|e| invalid(e.to_string()))?;
            appraisal_rule = format!("data.{APPRAISAL_PACKAGE}.appraisal");
            engine
                .eval_rule(appraisal_rule.clone())
                .map_err(|e| invalid(e.to_string()))?;
        }
        let id = format!("sha256:{}", hex::encode(Sha256::digest(text.as_bytes())));
        // The VM is an optimisation, never the judge of what a policy means: only the default
        // policy runs on it, and only when it compiles and agrees with the interpreter's trial.
        let rvm = if kind == PolicyKind::Attestation && text == DEFAULT_ATTESTATION_POLICY {
            let mut e = engine.clone();
            e.set_input(RegoValue::new_object());
            let interpreted = e.eval_rule(appraisal_rule.clone());
            Rvm::trusted(
                &engine,
                &appraisal_rule,
                data.clone(),
                data,
                interpreted,
                &id,
            )
        } else if kind == PolicyKind::Resource && text == DEFAULT_RESOURCE_POLICY {
            let trial = resource_data("/default/test/key", ["default", "test", "key"]);
            let mut e = engine.clone();
            let interpreted = e.add_data(trial.clone()).and_then(|()| {
                e.set_input(RegoValue::new_object());
                e.eval_rule(RESOURCE_RULE.to_string())
            });
            let data = RegoValue::new_object();
            Rvm::trusted(&engine, RESOURCE_RULE, data, trial, interpreted, &id)
        } else {
            None
        };
        let compiled = Self {
            engine: Mutex::new(engine),
            by_resource: Mutex::new(HashMap::new()),
            optional_rules,
            appraisal_rule,
            rvm,
            id,
        };
        if kind == PolicyKind::Attestation {
            compiled
                .appraise(&json!({}))
                .map_err(|e| invalid(e.to_string()))?;
        }
        Ok(compiled)
    }

    /// A clone of the prepared template with `input` set.
    fn engine_with(&self, input: RegoValue) -> Engine {
        let mut engine = self
            .engine
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        engine.set_input(input);
        engine
    }

    /// Evaluates the resource policy's `allow` for a resource, with `data` carrying the
    /// resource: `plugin`, `resource-path` (`/<repo>/<type>/<tag>`), `repository`, `type` and
    /// `tag`. Each resource's data is added once to a prepared copy of the policy, kept for the
    /// most recently asked resources (adding data per request would force a full re-analysis);
    /// a decision is then one evaluation of `allow`. `parts` must be validated resource-path
    /// components (ASCII letters, digits, `._-`).
    pub fn allow_resource(&self, input: &Value, parts: [&str; 3]) -> Result<bool, PolicyError> {
        let input = rego_input(input).map_err(|detail| PolicyError::Eval {
            kind: "resource",
            detail,
        })?;
        debug_assert!(parts.iter().all(|p| p
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))));
        self.allow_resource_on(input, parts, true)
    }

    /// [`Self::allow_resource`], on the Rego VM where `vm` and the policy has a VM program, else
    /// interpreted.
    fn allow_resource_on(
        &self,
        input: RegoValue,
        parts: [&str; 3],
        vm: bool,
    ) -> Result<bool, PolicyError> {
        let [repo, ty, tag] = parts;
        let path = format!("/{repo}/{ty}/{tag}");
        let eval_err = |detail: String| PolicyError::Eval {
            kind: "resource",
            detail,
        };
        if let Some(rvm) = self.rvm.as_ref().filter(|_| vm) {
            // The default policy's data is empty: the resource's is all of it.
            match rvm.eval_with(RESOURCE_RULE, resource_data(&path, parts), input.clone()) {
                Ok(allow) => return Ok(allow == RegoValue::from(true)),
                Err(e) => {
                    tracing::debug!(policy = %self.id, error = %e, "the Rego VM failed; interpreting")
                }
            }
        }
        let cached = self
            .by_resource
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&path)
            .cloned();
        let mut engine = match cached {
            Some(e) => e,
            None => {
                let mut e = self
                    .engine
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                e.add_data(resource_data(&path, parts))
                    .map_err(|e| eval_err(e.to_string()))?;
                // Prepared here, once, rather than by the first decision.
                e.eval_rule(RESOURCE_RULE.to_string())
                    .map_err(|e| eval_err(e.to_string()))?;
                let mut map = self.by_resource.lock().unwrap_or_else(|p| p.into_inner());
                if map.len() >= RESOURCE_ENGINES {
                    map.clear();
                }
                map.insert(path, e.clone());
                e
            }
        };
        engine.set_input(input);
        let allow = engine
            .eval_rule(RESOURCE_RULE.to_string())
            .map_err(|e| eval_err(e.to_string()))?;
        Ok(allow == RegoValue::from(true))
    }

    /// Evaluates the attestation policy: `status`, then the optional `reason` and
    /// `trust_vector` when the policy defines them.
    pub fn appraise(&self, input: &Value) -> Result<Appraisal, PolicyError> {
        self.appraise_on(input, true)
    }

    /// [`Self::appraise`], on the Rego VM where `vm` and the policy has a VM program, else
    /// interpreted.
    fn appraise_on(&self, input: &Value, vm: bool) -> Result<Appraisal, PolicyError> {
        let eval_err = |detail: String| PolicyError::Eval {
            kind: "attestation",
            detail,
        };
        let input = rego_input(input).map_err(eval_err)?;
        // `[status, [reason]?, [trust_vector]?]`, from the helper rule: on the VM, and by the
        // interpreter whenever the VM fails (an error, its instruction bound).
        let vm_result = self.rvm.as_ref().filter(|_| vm).map(|rvm| {
            rvm.eval(&self.appraisal_rule, input.clone())
                .inspect_err(|e| {
                    tracing::debug!(policy = %self.id, error = %e, "the Rego VM failed; interpreting");
                })
        });
        let result = match vm_result {
            Some(Ok(v)) => v,
            _ => self
                .engine_with(input)
                .eval_rule(self.appraisal_rule.clone())
                .map_err(|e| eval_err(e.to_string()))?,
        };
        if result == RegoValue::Undefined {
            return Err(eval_err("status is undefined".into()));
        }
        let values = serde_json::from_str::<Vec<Value>>(
            &result.to_json_str().map_err(|e| eval_err(e.to_string()))?,
        )
        .map_err(|e| eval_err(e.to_string()))?;
        let status_value = values.first().cloned().unwrap_or(Value::Null);
        let status = status_value
            .as_str()
            .and_then(Status::parse)
            .ok_or_else(|| {
                eval_err(format!(
                    "status is {status_value}, not one of affirming, warning, contraindicated, none"
                ))
            })?;
        let mut reason = None;
        let mut trust_vector = BTreeMap::new();
        for (rule, v) in self.optional_rules.iter().zip(values.into_iter().skip(1)) {
            let Some(v) = v.as_array().and_then(|a| a.first()).cloned() else {
                continue;
            };
            match *rule {
                "reason" => reason = v.as_str().map(str::to_string),
                _ => {
                    trust_vector = serde_json::from_value(v).map_err(|e| {
                        eval_err(format!("trust_vector must map names to integers: {e}"))
                    })?
                }
            }
        }
        Ok(Appraisal {
            status,
            reason,
            trust_vector,
        })
    }
}

/// `input` as a Rego value, converted from the borrowed JSON as it is read: no copy of the JSON
/// first (a Rego value's documents are shared, so its clones are cheap).
fn rego_input(input: &Value) -> Result<RegoValue, String> {
    RegoValue::deserialize(input).map_err(|e| format!("the input is not a JSON document: {e}"))
}

/// The `data` a resource policy decides a release of resource `parts` (at `path`) with.
fn resource_data(path: &str, [repo, ty, tag]: [&str; 3]) -> RegoValue {
    RegoValue::from(json!({
        "plugin": "resource",
        "resource-path": path,
        "repository": repo,
        "type": ty,
        "tag": tag,
    }))
}

/// Builds the `data` document of each policy.
fn policy_data(kind: PolicyKind, refs: &ReferenceValues) -> Value {
    match kind {
        PolicyKind::Attestation => json!({ "reference": refs }),
        PolicyKind::Resource => json!({}),
    }
}

/// The compiled policies of one store generation.
#[derive(Clone)]
pub struct Policies {
    /// The resource policy.
    pub resource: Arc<Compiled>,
    /// The attestation policy.
    pub attestation: Arc<Compiled>,
}

/// The cache key of a policy compiled with its data.
fn cache_key(kind: PolicyKind, text: &str, data: &Value) -> String {
    let mut h = Sha256::new();
    h.update(kind.key().as_bytes());
    h.update([0]);
    h.update(text.as_bytes());
    h.update([0]);
    h.update(data.to_string().as_bytes());
    hex::encode(h.finalize())
}

/// Compiled policies. The policies in force are looked up again whenever the store's
/// generation changes (on this replica or any other sharing the store), but a policy is
/// compiled only when its text or data changed: compiled forms are kept by the digest of kind,
/// text and data. An admin write compiles its policy on its own request ([`Self::prepare`]), so
/// the attestations after it find it compiled; a replica that did not take the write compiles
/// it once, within the limits, off the async workers.
pub struct PolicyCache {
    current: RwLock<Option<(u64, Policies)>>,
    compiled: Mutex<HashMap<String, Arc<Compiled>>>,
    limits: PolicyLimits,
}

impl Default for PolicyCache {
    fn default() -> Self {
        Self::new(PolicyLimits::default())
    }
}

impl PolicyCache {
    /// An empty cache whose compilations keep to `limits`.
    pub fn new(limits: PolicyLimits) -> Self {
        Self {
            current: RwLock::new(None),
            compiled: Mutex::new(HashMap::new()),
            limits,
        }
    }

    /// `text` compiled with `data`, from the cache or compiled now.
    async fn compiled(
        &self,
        kind: PolicyKind,
        text: String,
        data: Value,
    ) -> Result<Arc<Compiled>, PolicyError> {
        let key = cache_key(kind, &text, &data);
        if let Some(c) = self.lock().get(&key) {
            return Ok(c.clone());
        }
        let c = compile(kind, text, data, &self.limits).await?;
        let mut map = self.lock();
        // Forms no generation uses pile up with every policy or reference-value change.
        if map.len() >= 16 {
            map.clear();
        }
        map.insert(key, c.clone());
        Ok(c)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Compiled>>> {
        self.compiled.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Compiles `text` as it would be used with the reference values in `store` now, within
    /// the limits, and keeps the compiled form for the requests after the write (admin
    /// validation).
    pub async fn prepare(
        &self,
        kind: PolicyKind,
        text: &str,
        store: &Store,
    ) -> Result<(), PolicyError> {
        let refs = store.reference_values().await?;
        self.compiled(kind, text.to_string(), policy_data(kind, &refs))
            .await
            .map(|_| ())
    }

    /// The policies in force now.
    pub async fn get(&self, store: &Store) -> Result<Policies, PolicyError> {
        let generation = store.generation().await?;
        if let Some((g, p)) = &*self.current.read().await {
            if *g == generation {
                return Ok(p.clone());
            }
        }
        let mut slot = self.current.write().await;
        if let Some((g, p)) = &*slot {
            if *g == generation {
                return Ok(p.clone());
            }
        }
        let refs = store.reference_values().await?;
        let resource_text = store
            .get_policy(PolicyKind::Resource)
            .await?
            .unwrap_or_else(|| DEFAULT_RESOURCE_POLICY.to_string());
        let attestation_text = store
            .get_policy(PolicyKind::Attestation)
            .await?
            .unwrap_or_else(|| DEFAULT_ATTESTATION_POLICY.to_string());
        let policies = Policies {
            resource: self
                .compiled(
                    PolicyKind::Resource,
                    resource_text,
                    policy_data(PolicyKind::Resource, &refs),
                )
                .await?,
            attestation: self
                .compiled(
                    PolicyKind::Attestation,
                    attestation_text,
                    policy_data(PolicyKind::Attestation, &refs),
                )
                .await?,
        };
        *slot = Some((generation, policies.clone()));
        Ok(policies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks a policy text against the default limits and compiles it with empty reference
    /// values, synchronously (the server uses [`PolicyCache::prepare`]).
    fn validate(kind: PolicyKind, text: &str) -> Result<(), PolicyError> {
        check_limits(kind, text, &PolicyLimits::default())?;
        Compiled::new(kind, text, policy_data(kind, &ReferenceValues::new())).map(|_| ())
    }

    /// Every leaf of `v` with its path.
    fn leaves(v: &Value, path: Vec<String>, out: &mut Vec<(Vec<String>, Value)>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    let mut p = path.clone();
                    p.push(k.clone());
                    leaves(x, p, out);
                }
            }
            _ => out.push((path, v.clone())),
        }
    }

    /// `v` with the leaf at `path` replaced (`Some`) or removed (`None`).
    fn with_leaf(v: &Value, path: &[String], to: Option<Value>) -> Value {
        let mut v = v.clone();
        let mut at = &mut v;
        for k in &path[..path.len() - 1] {
            at = &mut at[k.as_str()];
        }
        let map = at.as_object_mut().unwrap();
        let last = &path[path.len() - 1];
        match to {
            Some(x) => map.insert(last.clone(), x),
            None => map.remove(last),
        };
        v
    }

    /// Other values for a leaf: each makes one check of the default policy see something else.
    fn other_values(v: &Value) -> Vec<Value> {
        match v {
            Value::String(_) => vec![json!("zz")],
            Value::Bool(b) => vec![json!(!b)],
            Value::Number(n) => {
                let n = n.as_i64().unwrap();
                vec![json!(n - 1), json!(n + 1)]
            }
            _ => vec![],
        }
    }

    #[test]
    fn the_rego_vm_and_the_interpreter_agree_on_every_rule_of_the_default_policy() {
        let snp = json!({"measurement": "aa", "policy_debug_allowed": false,
            "reported_tcb": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}});
        let snp_refs = json!({"measurement": ["aa"], "init_data": ["bb"],
            "snp_tcb_min": [{"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}]});
        let tdx = json!({"mr_td": "aa", "debug": false, "tcb_status": "UpToDate",
            "rtmr0": "r0", "rtmr1": "r1", "rtmr2": "r2", "rtmr3": "r3"});
        let tdx_refs = json!({"mr_td": ["aa"], "init_data": ["bb"], "tdx_tcb_status": ["UpToDate"],
            "rtmr0": ["r0"], "rtmr1": ["r1"], "rtmr2": ["r2"], "rtmr3": ["r3"]});
        // Each TEE with evidence that passes every check of its rules, and reference values.
        let cases = [
            (
                json!({"tee": "sample", "init_data": "bb", "sample": {"svn": "1"}}),
                json!({"sample_svn": ["1"], "init_data": ["bb"]}),
            ),
            (
                json!({"tee": "snp", "init_data": "bb", "snp": snp}),
                snp_refs.clone(),
            ),
            (
                json!({"tee": "tdx", "init_data": "bb", "tdx": tdx}),
                tdx_refs.clone(),
            ),
            (
                json!({"tee": "se", "init_data": "bb", "se": {"image_tags": "tt", "attestation_phkh": "hh"}}),
                json!({"se_image_tags": ["tt"], "init_data": ["bb"], "se_attestation_phkh": ["hh"]}),
            ),
            (
                json!({"tee": "az-snp-vtpm", "init_data": "bb", "az-snp-vtpm": {"snp": snp}}),
                snp_refs,
            ),
            (
                json!({"tee": "az-tdx-vtpm", "init_data": "bb", "az-tdx-vtpm": {"tdx": tdx}}),
                tdx_refs,
            ),
            (
                json!({"tee": "nvidia", "nvidia": {"fwid": "ff", "driver_version": "550.90.07"}}),
                json!({"nvidia_fwid": ["ff"], "nvidia_driver_version": ["550.90.07"]}),
            ),
            (
                json!({"tee": "sgx", "sgx": {"mr_enclave": "aa", "debug": false, "tcb_status": "UpToDate"}}),
                json!({"mr_enclave": ["aa"], "sgx_tcb_status": ["UpToDate"]}),
            ),
            (
                json!({"tee": "unknown", "unknown": {"x": "y"}}),
                json!({"x": ["y"]}),
            ),
        ];
        let mut compared = 0;
        for (good, refs) in cases {
            let tee = good["tee"].as_str().unwrap().to_string();
            // The evidence as is, each leaf removed, and each leaf changed.
            let mut inputs = vec![good.clone()];
            let mut input_leaves = Vec::new();
            leaves(&good, vec![], &mut input_leaves);
            for (path, v) in &input_leaves {
                if path == &["tee".to_string()] {
                    continue;
                }
                inputs.push(with_leaf(&good, path, None));
                for o in other_values(v) {
                    inputs.push(with_leaf(&good, path, Some(o)));
                }
            }
            // The reference values as given, none, and each one missing, empty or different.
            let mut all_refs = vec![refs.clone(), json!({})];
            for (k, v) in refs.as_object().unwrap() {
                let mut r = refs.clone();
                r.as_object_mut().unwrap().remove(k);
                all_refs.push(r);
                for other in [json!([]), json!(["zz"])] {
                    let mut r = refs.clone();
                    r[k.as_str()] = other;
                    all_refs.push(r);
                }
                // A minimum TCB above the reported one, field by field.
                if let Some(min) = v
                    .as_array()
                    .and_then(|a| a.first())
                    .filter(|m| m.is_object())
                {
                    for field in min.as_object().unwrap().keys() {
                        let mut higher = min.clone();
                        higher[field.as_str()] = json!(min[field.as_str()].as_i64().unwrap() + 1);
                        let mut r = refs.clone();
                        r[k.as_str()] = json!([higher]);
                        all_refs.push(r);
                    }
                }
            }
            let mut statuses = std::collections::BTreeSet::new();
            for refs in &all_refs {
                let refs: ReferenceValues = serde_json::from_value(refs.clone()).unwrap();
                let policy = Compiled::new(
                    PolicyKind::Attestation,
                    DEFAULT_ATTESTATION_POLICY,
                    policy_data(PolicyKind::Attestation, &refs),
                )
                .unwrap();
                assert!(policy.rvm.is_some(), "the default policy runs on the VM");
                for input in &inputs {
                    let vm = policy.appraise_on(input, true).unwrap();
                    let interpreted = policy.appraise_on(input, false).unwrap();
                    assert_eq!(
                        (vm.status, &vm.reason, &vm.trust_vector),
                        (
                            interpreted.status,
                            &interpreted.reason,
                            &interpreted.trust_vector
                        ),
                        "VM and interpreter differ for {input} with reference values {refs:?}"
                    );
                    statuses.insert(format!("{:?}", vm.status));
                    compared += 1;
                }
            }
            if tee != "unknown" {
                assert_eq!(
                    statuses.len(),
                    2,
                    "{tee}: both outcomes compared: {statuses:?}"
                );
            }
        }
        assert!(compared > 1000, "{compared} appraisals compared");
    }

    #[test]
    fn the_rego_vm_and_the_interpreter_agree_on_the_default_resource_policy() {
        let policy =
            Compiled::new(PolicyKind::Resource, DEFAULT_RESOURCE_POLICY, json!({})).unwrap();
        assert!(
            policy.rvm.is_some(),
            "the default resource policy runs on the VM"
        );
        let ok = json!({"ear.status": "affirming"});
        let warn = json!({"ear.status": "warning"});
        let inputs = [
            json!({}),
            json!({"submods": {}}),
            json!({"submods": []}),
            json!({"submods": "x"}),
            json!({"submods": {"cpu0": ok}}),
            json!({"submods": {"cpu0": warn}}),
            json!({"submods": {"cpu0": ok, "gpu0": ok}}),
            json!({"submods": {"cpu0": ok, "gpu0": warn}}),
            json!({"submods": {"cpu0": ok, "gpu0": {}}}),
            json!({"submods": {"cpu0": {"ear.status": true}}}),
            json!({"submods": {"cpu0": {"ear.status": ["affirming"]}}}),
            json!({"submods": [ok]}),
            json!({"submods": [ok, warn]}),
            json!({"submods": {"cpu0": "affirming"}}),
        ];
        let mut allowed = 0;
        for input in &inputs {
            for parts in [
                ["default", "test", "key"],
                ["mesh", "certificate", "workload"],
            ] {
                let rego = rego_input(input).unwrap();
                let vm = policy.allow_resource_on(rego.clone(), parts, true).unwrap();
                let interpreted = policy.allow_resource_on(rego, parts, false).unwrap();
                assert_eq!(
                    vm, interpreted,
                    "VM and interpreter differ for {input} on {parts:?}"
                );
                allowed += usize::from(vm);
            }
        }
        assert!(allowed > 0 && allowed < inputs.len() * 2, "{allowed}");
    }

    #[test]
    fn only_the_default_policies_run_on_the_rego_vm() {
        let custom = "package policy\nimport rego.v1\ndefault status := \"affirming\"\n";
        let p = Compiled::new(PolicyKind::Attestation, custom, json!({})).unwrap();
        assert!(p.rvm.is_none());
        assert_eq!(p.appraise(&json!({})).unwrap().status, Status::Affirming);
        let mut modified = DEFAULT_ATTESTATION_POLICY.to_string();
        modified.push_str("\n# changed\n");
        let p =
            Compiled::new(PolicyKind::Attestation, &modified, json!({"reference": {}})).unwrap();
        assert!(p.rvm.is_none());
        let p = Compiled::new(
            PolicyKind::Resource,
            "package policy\nallow := true\n",
            json!({}),
        )
        .unwrap();
        assert!(p.rvm.is_none());
        assert!(p.allow_resource(&json!({}), ["a", "b", "c"]).unwrap());
    }

    fn attest(refs: Value, input: Value) -> Appraisal {
        let refs: ReferenceValues = serde_json::from_value(refs).unwrap();
        Compiled::new(
            PolicyKind::Attestation,
            DEFAULT_ATTESTATION_POLICY,
            policy_data(PolicyKind::Attestation, &refs),
        )
        .unwrap()
        .appraise(&input)
        .unwrap()
    }

    #[test]
    fn default_attestation_policy_for_sample() {
        let a = attest(json!({}), json!({"tee": "sample", "sample": {"svn": "1"}}));
        assert_eq!(a.status, Status::Affirming);
        let a = attest(
            json!({"sample_svn": ["2"]}),
            json!({"tee": "sample", "sample": {"svn": "1"}}),
        );
        assert_eq!(a.status, Status::Contraindicated);
        assert!(a.reason.unwrap().contains("sample_svn"));
        let a = attest(
            json!({"init_data": ["aa"]}),
            json!({"tee": "sample", "sample": {"svn": "1"}}),
        );
        assert_eq!(a.status, Status::Contraindicated);
        let a = attest(
            json!({"init_data": ["aa"]}),
            json!({"tee": "sample", "sample": {"svn": "1"}, "init_data": "aa"}),
        );
        assert_eq!(a.status, Status::Affirming);
        let a = attest(json!({}), json!({"tee": "tdx", "tdx": {}}));
        assert_eq!(a.status, Status::Contraindicated);
    }

    #[test]
    fn default_attestation_policy_for_snp() {
        let refs = json!({
            "measurement": ["aa"],
            "init_data": ["bb"],
            "snp_tcb_min": [{"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}],
        });
        let good = json!({"tee": "snp", "init_data": "bb", "snp": {
            "measurement": "aa", "policy_debug_allowed": false,
            "reported_tcb": {"bootloader": 3, "tee": 0, "snp": 9, "microcode": 115}}});
        let a = attest(refs.clone(), good.clone());
        assert_eq!(a.status, Status::Affirming, "{:?}", a.reason);
        let mut debug = good.clone();
        debug["snp"]["policy_debug_allowed"] = json!(true);
        let a = attest(refs.clone(), debug);
        assert_eq!(a.status, Status::Contraindicated);
        assert!(a.reason.unwrap().contains("debugging"));
        let mut old = good.clone();
        old["snp"]["reported_tcb"]["microcode"] = json!(114);
        let a = attest(refs.clone(), old);
        assert!(a.reason.unwrap().contains("TCB"));
        let mut no_init = good.clone();
        no_init.as_object_mut().unwrap().remove("init_data");
        let a = attest(refs.clone(), no_init);
        assert_eq!(a.status, Status::Contraindicated);
        assert!(a.reason.unwrap().contains("init_data"));
        let mut other = good.clone();
        other["snp"]["measurement"] = json!("cc");
        let a = attest(refs, other);
        assert!(a.reason.unwrap().contains("measurement"));
        // Nothing registered: nothing is affirming.
        let a = attest(json!({}), good);
        assert_eq!(a.status, Status::Contraindicated);
    }

    #[test]
    fn default_attestation_policy_for_azure_snp() {
        let refs = json!({"measurement": ["aa"], "init_data": ["bb"],
            "snp_tcb_min": [{"bootloader": 0, "tee": 0, "snp": 0, "microcode": 0}]});
        let good = json!({"tee": "az-snp-vtpm", "init_data": "bb", "az-snp-vtpm": {"snp": {
            "measurement": "aa", "policy_debug_allowed": false,
            "reported_tcb": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}}}});
        assert_eq!(attest(refs.clone(), good.clone()).status, Status::Affirming);
        let mut other = good;
        other["az-snp-vtpm"]["snp"]["measurement"] = json!("cc");
        assert!(attest(refs, other).reason.unwrap().contains("measurement"));
    }

    #[test]
    fn default_attestation_policy_for_azure_tdx() {
        let refs = json!({"mr_td": ["aa"], "init_data": ["bb"]});
        let good = json!({"tee": "az-tdx-vtpm", "init_data": "bb", "az-tdx-vtpm": {"tdx": {
            "mr_td": "aa", "debug": false, "tcb_status": "UpToDate"}}});
        assert_eq!(attest(refs.clone(), good.clone()).status, Status::Affirming);
        let mut debug = good.clone();
        debug["az-tdx-vtpm"]["tdx"]["debug"] = json!(true);
        assert!(attest(refs, debug).reason.unwrap().contains("debuggable"));
        let mut rtmr = good;
        rtmr["az-tdx-vtpm"]["tdx"]["rtmr2"] = json!("21");
        let pinned = json!({"mr_td": ["aa"], "init_data": ["bb"], "rtmr2": ["22"]});
        assert_eq!(
            attest(pinned, rtmr).reason.unwrap(),
            "RTMR2 is not in reference value rtmr2"
        );
    }

    #[test]
    fn default_attestation_policy_for_nvidia_gpus() {
        let refs = json!({"nvidia_fwid": ["ff"], "nvidia_driver_version": ["550.90.07"]});
        let good =
            json!({"tee": "nvidia", "nvidia": {"fwid": "ff", "driver_version": "550.90.07"}});
        assert_eq!(attest(refs.clone(), good.clone()).status, Status::Affirming);
        let a = attest(json!({}), good);
        assert_eq!(a.status, Status::Contraindicated);
        assert!(a.reason.unwrap().contains("nvidia_fwid"));
    }

    #[test]
    fn default_attestation_policy_for_sgx() {
        let refs =
            json!({"mr_enclave": ["aa"], "sgx_tcb_status": ["ConfigurationAndSWHardeningNeeded"]});
        let good = json!({"tee": "sgx", "sgx": {"mr_enclave": "aa", "debug": false,
            "tcb_status": "ConfigurationAndSWHardeningNeeded"}});
        assert_eq!(attest(refs.clone(), good.clone()).status, Status::Affirming);
        let a = attest(json!({"mr_enclave": ["aa"]}), good);
        assert!(a.reason.unwrap().contains("sgx_tcb_status"));
    }

    #[test]
    fn default_attestation_policy_for_tdx() {
        let refs = json!({"mr_td": ["aa"], "init_data": ["bb"]});
        let good = json!({"tee": "tdx", "init_data": "bb",
            "tdx": {"mr_td": "aa", "debug": false, "tcb_status": "UpToDate"}});
        assert_eq!(attest(refs.clone(), good.clone()).status, Status::Affirming);
        let mut old = good.clone();
        old["tdx"]["tcb_status"] = json!("OutOfDate");
        let a = attest(refs.clone(), old.clone());
        assert!(a.reason.unwrap().contains("tdx_tcb_status"));
        let tolerant = json!({"mr_td": ["aa"], "init_data": ["bb"], "tdx_tcb_status": ["UpToDate", "OutOfDate"]});
        assert_eq!(attest(tolerant, old).status, Status::Affirming);
        let mut debug = good.clone();
        debug["tdx"]["debug"] = json!(true);
        assert!(attest(refs, debug).reason.unwrap().contains("debuggable"));
        // RTMRs are checked only where reference values name them.
        let mut with_rtmr = good.clone();
        with_rtmr["tdx"]["rtmr1"] = json!("11");
        with_rtmr["tdx"]["rtmr2"] = json!("22");
        let pinned = json!({"mr_td": ["aa"], "init_data": ["bb"], "rtmr1": ["11", "12"]});
        assert_eq!(
            attest(pinned.clone(), with_rtmr.clone()).status,
            Status::Affirming
        );
        with_rtmr["tdx"]["rtmr1"] = json!("13");
        let a = attest(pinned, with_rtmr.clone());
        assert_eq!(a.status, Status::Contraindicated);
        assert_eq!(a.reason.unwrap(), "RTMR1 is not in reference value rtmr1");
        let both = json!({"mr_td": ["aa"], "init_data": ["bb"], "rtmr1": ["11"], "rtmr2": ["99"]});
        let a = attest(both, with_rtmr);
        assert_eq!(
            a.reason.unwrap(),
            "RTMR1 is not in reference value rtmr1; RTMR2 is not in reference value rtmr2"
        );
    }

    #[test]
    fn default_resource_policy_needs_every_submodule_affirming() {
        let p = Compiled::new(PolicyKind::Resource, DEFAULT_RESOURCE_POLICY, json!({})).unwrap();
        let path_policy = Compiled::new(
            PolicyKind::Resource,
            "package policy\nimport rego.v1\ndefault allow := false\nallow if {\n data.plugin == \"resource\"\n data[\"resource-path\"] == \"/default/test/key\"\n data.repository == \"default\"\n data.type == \"test\"\n data.tag == \"key\"\n}\n",
            json!({}),
        )
        .unwrap();
        assert!(path_policy
            .allow_resource(&json!({}), ["default", "test", "key"])
            .unwrap());
        assert!(!path_policy
            .allow_resource(&json!({}), ["default", "test", "other"])
            .unwrap());
        let path = ["default", "test", "key"];
        let ok = json!({"submods": {"cpu0": {"ear.status": "affirming"}}});
        assert!(p.allow_resource(&ok, path).unwrap());
        let warn = json!({"submods": {"cpu0": {"ear.status": "affirming"}, "gpu0": {"ear.status": "warning"}}});
        assert!(!p.allow_resource(&warn, path).unwrap());
        assert!(!p.allow_resource(&json!({"submods": {}}), path).unwrap());
        assert!(!p.allow_resource(&json!({}), path).unwrap());
    }

    #[test]
    fn custom_policy_sets_reason_and_trust_vector() {
        let text = "package policy\nimport rego.v1\ndefault status := \"warning\"\nstatus := \"affirming\" if input.ok\ntrust_vector := {\"hardware\": 2, \"executables\": 3}\n";
        let p = Compiled::new(PolicyKind::Attestation, text, json!({})).unwrap();
        let a = p.appraise(&json!({"ok": true})).unwrap();
        assert_eq!(a.status, Status::Affirming);
        assert_eq!(a.reason, None);
        assert_eq!(a.trust_vector["hardware"], 2);
        assert_eq!(p.appraise(&json!({})).unwrap().status, Status::Warning);
        let bad = "package policy\nstatus := \"affirming\"\ntrust_vector := \"high\"\n";
        assert!(validate(PolicyKind::Attestation, bad).is_err());
    }

    #[test]
    fn optional_rules_may_be_undefined_for_some_inputs() {
        let text = "package policy\nimport rego.v1\ndefault status := \"affirming\"\nreason := \"odd\" if input.odd\n";
        let p = Compiled::new(PolicyKind::Attestation, text, json!({})).unwrap();
        assert_eq!(p.appraise(&json!({})).unwrap().reason, None);
        assert_eq!(
            p.appraise(&json!({"odd": true})).unwrap().reason.as_deref(),
            Some("odd")
        );
    }

    #[test]
    fn invalid_policies_are_refused() {
        assert!(validate(PolicyKind::Resource, "package other\nallow := true").is_err());
        assert!(validate(PolicyKind::Resource, "package policy\nallow if {").is_err());
        assert!(validate(
            PolicyKind::Resource,
            "package policy\ndefault allow := false"
        )
        .is_ok());
    }
}
