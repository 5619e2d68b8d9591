//! The agent API over a real unix socket with a real tonic client: every request goes through
//! the policy; denials are PermissionDenied naming the request.

use std::sync::Arc;

use coffer_agent::{
    api::{proto::agent_client::AgentClient, proto::*, serve_unix, AgentService},
    policy::{AgentPolicy, MemoryAudit},
};
use tonic::Code;

async fn start(
    policy: Option<&str>,
) -> (
    AgentClient<tonic::transport::Channel>,
    Arc<MemoryAudit>,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let audit = Arc::new(MemoryAudit::default());
    let policy = Arc::new(AgentPolicy::new(policy, audit.clone()).unwrap());
    let containers = Arc::new(coffer_agent::container::Containers::new(
        dir.path().join("bundles"),
        "runc".into(),
        Default::default(),
    ));
    let service = AgentService::new(policy, "ab".repeat(48), containers);
    let path = sock.clone();
    tokio::spawn(async move { serve_unix(&path, service).await.unwrap() });
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let client = coffer_agent::api::connect_unix(&sock).await.unwrap();
    (client, audit, dir)
}

#[tokio::test]
async fn requests_pass_the_policy_gate_or_are_denied_by_name() {
    let (mut c, audit, _dir) = start(None).await;
    let d = c
        .get_guest_details(GetGuestDetailsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.api_version, "coffer.agent.v1");
    assert_eq!(d.initdata_digest, "ab".repeat(48));
    assert!(d.policy_id.starts_with("sha256:"));

    let e = c
        .exec_process(ExecProcessRequest {
            container_id: "c1".into(),
            args: vec!["/bin/sh".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(e.message(), "denied by policy: ExecProcessRequest");
    let e = c
        .write_stream(WriteStreamRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.message(), "denied by policy: WriteStreamRequest");
    let e = c
        .set_policy(SetPolicyRequest {
            policy: "package agent_policy\ndefault ExecProcessRequest := true\n".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Allowed by policy, then checked: an empty container id is refused.
    let e = c
        .create_container(CreateContainerRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(c
        .list_containers(ListContainersRequest {})
        .await
        .unwrap()
        .into_inner()
        .container_ids
        .is_empty());

    let log = audit.0.lock().unwrap();
    let decisions: Vec<(&str, &str)> = log
        .iter()
        .map(|e| {
            (
                e["request"].as_str().unwrap(),
                e["decision"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert!(decisions.contains(&("ExecProcessRequest", "deny")));
    assert!(decisions.contains(&("GetGuestDetailsRequest", "allow")));
}

#[tokio::test]
async fn the_request_is_the_policy_input() {
    let policy = r#"package agent_policy
import rego.v1
default GetGuestDetailsRequest := true
default ExecProcessRequest := false
ExecProcessRequest if {
    input.container_id == "web"
    input.args == ["/bin/date"]
}
"#;
    let (mut c, _, _dir) = start(Some(policy)).await;
    let exec = |id: &str, args: &[&str]| ExecProcessRequest {
        container_id: id.into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    // Allowed by the policy (then refused: there is no such container), versus denied by it.
    let e = c
        .exec_process(exec("web", &["/bin/date"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c.exec_process(exec("web", &["/bin/sh"])).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = c
        .exec_process(exec("db", &["/bin/date"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}
