//! Errors and times as containerd's ttrpc and the agent's gRPC give and take them.

use std::time::SystemTime;

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;

use crate::ShimError;

/// A ttrpc error with a gRPC code containerd understands.
pub(super) fn rpc(
    code: containerd_shim::protos::ttrpc::Code,
    msg: impl Into<String>,
) -> TtrpcError {
    containerd_shim::protos::ttrpc::Error::RpcStatus(containerd_shim::protos::ttrpc::get_status(
        code,
        msg.into(),
    ))
}

type TtrpcError = containerd_shim::protos::ttrpc::Error;

impl From<ShimError> for TtrpcError {
    fn from(e: ShimError) -> Self {
        use containerd_shim::protos::ttrpc::Code;
        let code = match &e {
            ShimError::Invalid(_) | ShimError::Config(_) => Code::INVALID_ARGUMENT,
            ShimError::Refused(_) => Code::PERMISSION_DENIED,
            ShimError::NotFound(_) => Code::NOT_FOUND,
            _ => Code::UNKNOWN,
        };
        rpc(code, e.to_string())
    }
}

/// `t` as a protobuf timestamp.
pub(crate) fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = d.as_secs() as i64;
    ts.nanos = d.subsec_nanos() as i32;
    ts
}

pub(super) fn agent_error(what: &str, e: tonic::Status) -> ShimError {
    match e.code() {
        tonic::Code::PermissionDenied => {
            ShimError::Refused(format!("{what}: the agent refused: {}", e.message()))
        }
        tonic::Code::NotFound => ShimError::NotFound(format!("{what}: {}", e.message())),
        _ => ShimError::Agent(format!("{what}: {}", e.message())),
    }
}
