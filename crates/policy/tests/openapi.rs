//! The Kubernetes objects Coffer writes must validate against the published Kubernetes OpenAPI
//! v3 schemas of core/v1, apps/v1 and batch/v1 (tests/openapi/: the unmodified files and the
//! validator). These tests show that the validator accepts correct objects, rejects wrong ones
//! with the path of the fault, and that the policy generator's output validates.

#[path = "openapi/mod.rs"]
mod openapi;

use serde_json::{json, Value};

fn pod_spec() -> Value {
    json!({
        "initContainers": [{
            "name": "init",
            "image": "busybox:1.36",
            "command": ["sh", "-c", "echo init > /work/ready"],
            "volumeMounts": [{"name": "work", "mountPath": "/work"}]
        }],
        "containers": [{
            "name": "web",
            "image": "nginx:1.27",
            "imagePullPolicy": "IfNotPresent",
            "ports": [{"name": "http", "containerPort": 80, "protocol": "TCP"}],
            "env": [
                {"name": "MODE", "value": "production"},
                {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "web-config", "key": "level"}}}
            ],
            "envFrom": [{"configMapRef": {"name": "web-config"}}],
            "resources": {
                "requests": {"cpu": 0.25, "memory": "64Mi"},
                "limits": {"cpu": "500m", "memory": "128Mi"}
            },
            "readinessProbe": {"exec": {"command": ["cat", "/work/ready"]}, "periodSeconds": 5},
            "livenessProbe": {"httpGet": {"path": "/", "port": "http"}},
            "startupProbe": {"tcpSocket": {"port": 80}},
            "securityContext": {"runAsNonRoot": true, "runAsUser": 101},
            "volumeMounts": [{"name": "work", "mountPath": "/work", "readOnly": true}]
        }],
        "volumes": [{"name": "work", "emptyDir": {"sizeLimit": "64Mi"}}],
        "restartPolicy": "Always"
    })
}

fn deployment() -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "web",
            "namespace": "default",
            "labels": {"app.kubernetes.io/name": "web"},
            "creationTimestamp": null
        },
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": {"app": "web"}, "annotations": {"example.com/owner": "team-a"}},
                "spec": pod_spec()
            }
        }
    })
}

fn statefulset() -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "db"},
        "spec": {
            "serviceName": "db",
            "replicas": 1,
            "selector": {"matchLabels": {"app": "db"}},
            "template": {
                "metadata": {"labels": {"app": "db"}},
                "spec": {
                    "containers": [{
                        "name": "db",
                        "image": "postgres:17",
                        "ports": [{"containerPort": 5432}],
                        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"}]
                    }]
                }
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": "1Gi"}}
                }
            }]
        }
    })
}

fn job_spec() -> Value {
    json!({
        "backoffLimit": 2,
        "activeDeadlineSeconds": 600,
        "template": {
            "spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "migrate", "image": "busybox:1.36", "args": ["true"]}]
            }
        }
    })
}

fn job() -> Value {
    json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "migrate"}, "spec": job_spec()})
}

fn cronjob() -> Value {
    json!({
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": "nightly"},
        "spec": {
            "schedule": "0 3 * * *",
            "concurrencyPolicy": "Forbid",
            "jobTemplate": {"spec": job_spec()}
        }
    })
}

fn pod() -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"}, "spec": pod_spec()})
}

fn configmap() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "web-config"},
        "data": {"level": "info", "config.yaml": "a: 1\n"}
    })
}

fn secret() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "web-secret"},
        "type": "Opaque",
        "data": {"password": "aHVudGVyMg=="},
        "stringData": {"user": "admin"}
    })
}

fn service() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {
            "selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}]
        }
    })
}

fn daemonset() -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "agent"},
        "spec": {
            "selector": {"matchLabels": {"app": "agent"}},
            "template": {"metadata": {"labels": {"app": "agent"}}, "spec": pod_spec()}
        }
    })
}

fn assert_valid(doc: &Value) {
    if let Err(errors) = openapi::validate(doc) {
        panic!(
            "{} {} should validate:\n{}",
            doc["apiVersion"],
            doc["kind"],
            errors.join("\n")
        );
    }
}

/// Asserts that `doc` fails validation with an error at `path` whose message contains `needle`.
fn assert_error(doc: &Value, path: &str, needle: &str) -> Vec<String> {
    let errors = openapi::validate(doc).expect_err("the document should not validate");
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with(&format!("{path}: ")) && e.contains(needle)),
        "expected an error at {path} containing {needle:?}, got:\n{}",
        errors.join("\n")
    );
    errors
}

/// A pointer into `doc`, for building wrong documents.
fn at<'a>(doc: &'a mut Value, pointer: &str) -> &'a mut Value {
    doc.pointer_mut(pointer)
        .unwrap_or_else(|| panic!("no {pointer} in the fixture"))
}

#[test]
fn schemas_are_chosen_by_api_version_and_kind() {
    for (api_version, kind, file, def) in [
        (
            "v1",
            "Pod",
            "api__v1_openapi.json",
            "io.k8s.api.core.v1.Pod",
        ),
        (
            "v1",
            "ConfigMap",
            "api__v1_openapi.json",
            "io.k8s.api.core.v1.ConfigMap",
        ),
        (
            "v1",
            "Secret",
            "api__v1_openapi.json",
            "io.k8s.api.core.v1.Secret",
        ),
        (
            "v1",
            "Service",
            "api__v1_openapi.json",
            "io.k8s.api.core.v1.Service",
        ),
        (
            "apps/v1",
            "Deployment",
            "apis__apps__v1_openapi.json",
            "io.k8s.api.apps.v1.Deployment",
        ),
        (
            "apps/v1",
            "StatefulSet",
            "apis__apps__v1_openapi.json",
            "io.k8s.api.apps.v1.StatefulSet",
        ),
        (
            "apps/v1",
            "DaemonSet",
            "apis__apps__v1_openapi.json",
            "io.k8s.api.apps.v1.DaemonSet",
        ),
        (
            "apps/v1",
            "ReplicaSet",
            "apis__apps__v1_openapi.json",
            "io.k8s.api.apps.v1.ReplicaSet",
        ),
        (
            "batch/v1",
            "Job",
            "apis__batch__v1_openapi.json",
            "io.k8s.api.batch.v1.Job",
        ),
        (
            "batch/v1",
            "CronJob",
            "apis__batch__v1_openapi.json",
            "io.k8s.api.batch.v1.CronJob",
        ),
    ] {
        assert_eq!(openapi::schema_name(api_version, kind), Some((file, def)));
    }
    assert_eq!(openapi::schema_name("apps/v1beta1", "Deployment"), None);
    assert_eq!(openapi::schema_name("v1", "Deployment"), None);
}

#[test]
fn correct_objects_validate() {
    for doc in [
        deployment(),
        statefulset(),
        daemonset(),
        job(),
        cronjob(),
        pod(),
        configmap(),
        secret(),
        service(),
    ] {
        assert_valid(&doc);
    }
}

#[test]
fn unknown_kinds_and_missing_type_fields_fail() {
    let mut doc = deployment();
    doc["apiVersion"] = json!("apps/v1beta1");
    assert_error(&doc, "/", "no schema for apiVersion \"apps/v1beta1\"");
    doc.as_object_mut().unwrap().remove("apiVersion");
    assert_error(&doc, "/", "apiVersion");
    // The kind decides the schema: a Deployment's spec is not a valid Pod spec.
    let mut doc = deployment();
    doc["apiVersion"] = json!("v1");
    doc["kind"] = json!("Pod");
    assert_error(&doc, "/spec", "\"containers\" is a required property");
}

#[test]
fn string_for_an_integer_fails() {
    let mut doc = deployment();
    *at(&mut doc, "/spec/replicas") = json!("two");
    assert_error(&doc, "/spec/replicas", "is not of type \"integer\"");
    // Not only in strict mode: this is plain schema validation.
    assert!(openapi::validate_schema_only(&doc).is_err());

    let mut doc = deployment();
    *at(&mut doc, "/spec/replicas") = json!(1.5);
    assert_error(&doc, "/spec/replicas", "is not of type \"integer\"");
}

#[test]
fn misspelled_fields_fail_in_strict_mode() {
    // `contaners`: both undeclared and leaving the required `containers` out.
    let mut doc = deployment();
    let spec = at(&mut doc, "/spec/template/spec").as_object_mut().unwrap();
    let containers = spec.remove("containers").unwrap();
    spec.insert("contaners".into(), containers);
    assert_error(
        &doc,
        "/spec/template/spec/contaners",
        "unknown field \"contaners\"",
    );
    assert_error(
        &doc,
        "/spec/template/spec",
        "\"containers\" is a required property",
    );

    // A misspelled optional field passes plain JSON Schema validation (the Kubernetes schemas
    // do not forbid additional properties); the strict walk catches it, at any depth.
    let mut doc = deployment();
    let container = at(&mut doc, "/spec/template/spec/containers/0")
        .as_object_mut()
        .unwrap();
    let policy = container.remove("imagePullPolicy").unwrap();
    container.insert("imagePulPolicy".into(), policy);
    assert_eq!(openapi::validate_schema_only(&doc), Ok(()));
    let errors = assert_error(
        &doc,
        "/spec/template/spec/containers/0/imagePulPolicy",
        "unknown field",
    );
    assert_eq!(errors.len(), 1, "{errors:?}");

    for (pointer, field) in [
        ("/spec/template/metadata", "label"),
        (
            "/spec/template/spec/containers/0/readinessProbe/exec",
            "commands",
        ),
        ("/spec/template/spec/volumes/0/emptyDir", "size"),
        ("/spec", "replica"),
        ("", "metdata"),
    ] {
        let mut doc = deployment();
        at(&mut doc, pointer)
            .as_object_mut()
            .unwrap()
            .insert(field.into(), json!({}));
        assert_error(&doc, &format!("{pointer}/{field}"), "unknown field");
    }

    // Maps (labels, annotations, ConfigMap data) take any key.
    let mut doc = configmap();
    doc["data"]["any.key-at_all"] = json!("x");
    doc["metadata"]["annotations"] =
        json!({"io.katacontainers.config.hypervisor.cc_init_data": "H4sI"});
    assert_valid(&doc);
}

#[test]
fn container_without_name_fails() {
    let mut doc = deployment();
    at(&mut doc, "/spec/template/spec/containers/0")
        .as_object_mut()
        .unwrap()
        .remove("name");
    assert_error(
        &doc,
        "/spec/template/spec/containers/0",
        "\"name\" is a required property",
    );

    let mut doc = pod();
    at(&mut doc, "/spec/initContainers/0")
        .as_object_mut()
        .unwrap()
        .remove("name");
    assert_error(
        &doc,
        "/spec/initContainers/0",
        "\"name\" is a required property",
    );
}

#[test]
fn wrong_type_for_container_port_fails() {
    for bad in [json!("80"), json!(true), json!([80]), json!(80.5)] {
        let mut doc = deployment();
        *at(
            &mut doc,
            "/spec/template/spec/containers/0/ports/0/containerPort",
        ) = bad;
        assert_error(
            &doc,
            "/spec/template/spec/containers/0/ports/0/containerPort",
            "is not of type \"integer\"",
        );
    }
    // int32 range (checked by the strict walk: `jsonschema` applies formats to strings only).
    let mut doc = deployment();
    *at(
        &mut doc,
        "/spec/template/spec/containers/0/ports/0/containerPort",
    ) = json!(1u64 << 40);
    assert_error(
        &doc,
        "/spec/template/spec/containers/0/ports/0/containerPort",
        "out of the range of format \"int32\"",
    );
}

#[test]
fn other_schema_constraints_are_enforced() {
    // IntOrString is integer or string, not anything.
    let mut doc = service();
    *at(&mut doc, "/spec/ports/0/targetPort") = json!(true);
    assert_error(&doc, "/spec/ports/0/targetPort", "");
    // Quantity is string or number.
    let mut doc = deployment();
    *at(
        &mut doc,
        "/spec/template/spec/containers/0/resources/limits/cpu",
    ) = json!({"m": 500});
    assert_error(
        &doc,
        "/spec/template/spec/containers/0/resources/limits/cpu",
        "",
    );
    // A label value must be a string.
    let mut doc = deployment();
    *at(&mut doc, "/spec/template/metadata/labels/app") = json!(1);
    assert_error(
        &doc,
        "/spec/template/metadata/labels/app",
        "is not of type \"string\"",
    );
    // Secret data is `format: byte` (base64).
    let mut doc = secret();
    doc["data"]["password"] = json!("not base64!");
    assert_error(&doc, "/data/password", "is not a \"byte\"");
    doc["data"]["password"] = json!("aHVudGVyMg=");
    assert_error(&doc, "/data/password", "is not a \"byte\"");
    // Time is `format: date-time`.
    let mut doc = configmap();
    doc["metadata"]["creationTimestamp"] = json!("yesterday");
    assert_error(
        &doc,
        "/metadata/creationTimestamp",
        "is not a \"date-time\"",
    );
    doc["metadata"]["creationTimestamp"] = json!("2025-01-02T03:04:05Z");
    assert_valid(&doc);
    // A required field of a Deployment spec.
    let mut doc = deployment();
    doc["spec"].as_object_mut().unwrap().remove("selector");
    assert_error(&doc, "/spec", "\"selector\" is a required property");
    // Wrong shapes at the top.
    let mut doc = job();
    doc["spec"] = json!(5);
    assert_error(&doc, "/spec", "is not of type \"object\"");
    let mut doc = cronjob();
    doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"] = json!({"name": "x"});
    assert_error(
        &doc,
        "/spec/jobTemplate/spec/template/spec/containers",
        "is not of type \"array\"",
    );
}

// ---------------------------------------------------------------------------------------------
// The generator's output.

/// A multi-document input: a Deployment (two containers, an init container, env from a
/// ConfigMap, an emptyDir, an exec readiness probe), a Job, a CronJob, a StatefulSet and the
/// ConfigMap.
const WORKLOADS: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
  labels:
    app.kubernetes.io/name: web
spec:
  replicas: 3
  selector:
    matchLabels:
      app: web
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 25%
      maxUnavailable: 1
  template:
    metadata:
      labels:
        app: web
      annotations:
        example.com/owner: team-a
    spec:
      initContainers:
        - name: prepare
          image: registry.example/shop/prepare@sha256:1111111111111111111111111111111111111111111111111111111111111111
          command: ["sh", "-c", "echo ok > /work/ready"]
          volumeMounts:
            - name: work
              mountPath: /work
      containers:
        - name: web
          image: registry.example/shop/web@sha256:2222222222222222222222222222222222222222222222222222222222222222
          args: ["--listen", ":8080", "--level", "$(LEVEL)"]
          ports:
            - name: http
              containerPort: 8080
          env:
            - name: LEVEL
              valueFrom:
                configMapKeyRef:
                  name: web-config
                  key: level
          envFrom:
            - configMapRef:
                name: web-config
          readinessProbe:
            exec:
              command: ["cat", "/work/ready"]
            periodSeconds: 5
          resources:
            requests:
              cpu: 100m
              memory: 64Mi
          volumeMounts:
            - name: work
              mountPath: /work
              readOnly: true
        - name: sidecar
          image: registry.example/shop/sidecar@sha256:3333333333333333333333333333333333333333333333333333333333333333
          command: ["/sidecar"]
          env:
            - name: TARGET
              value: "http://localhost:8080"
      volumes:
        - name: work
          emptyDir: {}
---
apiVersion: batch/v1
kind: Job
metadata:
  name: migrate
  namespace: shop
spec:
  backoffLimit: 2
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: migrate
          image: registry.example/shop/migrate@sha256:4444444444444444444444444444444444444444444444444444444444444444
          args: ["up"]
---
apiVersion: batch/v1
kind: CronJob
metadata:
  name: nightly
  namespace: shop
spec:
  schedule: "0 3 * * *"
  concurrencyPolicy: Forbid
  jobTemplate:
    spec:
      template:
        metadata:
          labels:
            job: nightly
        spec:
          restartPolicy: OnFailure
          containers:
            - name: report
              image: registry.example/shop/report@sha256:5555555555555555555555555555555555555555555555555555555555555555
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: db
  namespace: shop
spec:
  serviceName: db
  replicas: 1
  selector:
    matchLabels:
      app: db
  template:
    metadata:
      labels:
        app: db
    spec:
      containers:
        - name: db
          image: registry.example/shop/db@sha256:6666666666666666666666666666666666666666666666666666666666666666
          ports:
            - containerPort: 5432
          volumeMounts:
            - name: data
              mountPath: /var/lib/db
  volumeClaimTemplates:
    - metadata:
        name: data
      spec:
        accessModes: ["ReadWriteOnce"]
        resources:
          requests:
            storage: 1Gi
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: web-config
  namespace: shop
data:
  level: info
  EXTRA: "1"
"#;

/// The images of [`WORKLOADS`], as the offline resolver reads them.
fn offline_images() -> String {
    let mut images = serde_json::Map::new();
    for (name, digit) in [
        ("prepare", '1'),
        ("web", '2'),
        ("sidecar", '3'),
        ("migrate", '4'),
        ("report", '5'),
        ("db", '6'),
    ] {
        let digest = format!("sha256:{}", String::from(digit).repeat(64));
        images.insert(
            format!("registry.example/shop/{name}@{digest}"),
            json!({
                "digest": digest,
                "config": {
                    "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                    "Entrypoint": [format!("/{name}")],
                    "WorkingDir": "/"
                }
            }),
        );
    }
    Value::Object(images).to_string()
}

/// Every document of a (multi-document) YAML text, as JSON values.
fn yaml_documents(text: &str) -> Vec<Value> {
    use serde::Deserialize as _;
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).expect("YAML document"))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// Where a kind keeps its pod template: (metadata pointer, spec pointer).
fn pod_template(kind: &str) -> Option<(&'static str, &'static str)> {
    match kind {
        "Pod" => Some(("/metadata", "/spec")),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            Some(("/spec/template/metadata", "/spec/template/spec"))
        }
        "CronJob" => Some((
            "/spec/jobTemplate/spec/template/metadata",
            "/spec/jobTemplate/spec/template/spec",
        )),
        _ => None,
    }
}

/// `doc` without what the generator may add to a pod template: `runtimeClassName` and the
/// initdata annotation (and the `annotations`/`metadata` objects, where that leaves them empty).
/// Returns what was removed.
fn without_generated(doc: &mut Value) -> (Option<Value>, Option<Value>) {
    let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
    let Some((meta, spec)) = pod_template(&kind) else {
        return (None, None);
    };
    let runtime_class = doc
        .pointer_mut(spec)
        .and_then(Value::as_object_mut)
        .and_then(|spec| spec.remove("runtimeClassName"));
    let mut initdata = None;
    let (parent, last) = meta.rsplit_once('/').unwrap();
    if let Some(parent) = doc.pointer_mut(parent).and_then(Value::as_object_mut) {
        if let Some(Value::Object(metadata)) = parent.get_mut(last) {
            if let Some(Value::Object(annotations)) = metadata.get_mut("annotations") {
                initdata = annotations.remove(coffer_policy::INITDATA_ANNOTATION);
                if annotations.is_empty() {
                    metadata.remove("annotations");
                }
            }
            if metadata.is_empty() {
                parent.remove(last);
            }
        }
    }
    (runtime_class, initdata)
}

#[tokio::test]
async fn generated_yaml_validates_and_changes_only_runtime_class_and_initdata() {
    let images = coffer_policy::OfflineImages::parse(&offline_images()).expect("images");
    let opts = coffer_policy::Options {
        kbs_url: "https://kbs.example:8080".into(),
        ..Default::default()
    };
    let generated = coffer_policy::generate(&[WORKLOADS.to_owned()], &images, &opts)
        .await
        .expect("generate");
    assert_eq!(generated.pods.len(), 4, "{:?}", generated.warnings);

    let inputs = yaml_documents(WORKLOADS);
    let outputs = yaml_documents(&generated.yaml);
    assert_eq!(inputs.len(), 5);
    assert_eq!(
        outputs.len(),
        inputs.len(),
        "one output document per input document:\n{}",
        generated.yaml
    );
    for input in &inputs {
        assert_valid(input);
    }
    for (input, output) in inputs.iter().zip(&outputs) {
        let what = format!("{} {}", output["kind"], output["metadata"]["name"]);
        if let Err(errors) = openapi::validate(output) {
            panic!("generated {what} does not validate:\n{}", errors.join("\n"));
        }
        let mut input = input.clone();
        let mut output = output.clone();
        let (_, input_initdata) = without_generated(&mut input);
        assert_eq!(input_initdata, None);
        let (runtime_class, initdata) = without_generated(&mut output);
        if pod_template(output["kind"].as_str().unwrap()).is_some() {
            assert_eq!(
                runtime_class,
                Some(json!(coffer_policy::RUNTIME_CLASS)),
                "{what}: runtimeClassName"
            );
            assert!(
                initdata
                    .as_ref()
                    .and_then(Value::as_str)
                    .is_some_and(|d| !d.is_empty()),
                "{what}: no {} annotation",
                coffer_policy::INITDATA_ANNOTATION
            );
        }
        assert_eq!(
            output, input,
            "{what}: the output differs from the input beyond runtimeClassName and the initdata \
             annotation"
        );
    }
}
