//! The agent API's generated protobuf types and service traits
//! (`proto/coffer/agent/v1/agent.proto`): the requests the API serves, the policy judges and the
//! containers and owner-signed exec take. Also reachable as `api::proto`.

tonic::include_proto!("coffer.agent.v1");
