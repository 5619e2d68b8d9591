//! Errors and times as containerd's ttrpc and the agent's gRPC give and take them.

use std::{
    future::Future,
    time::{Duration, SystemTime},
};

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

/// How long a quick agent call (start, signal, exec, stats, remove) may take.
pub(super) const QUICK_CALL: Duration = Duration::from_secs(60);

/// How long CreateContainer may take: the agent attests, then pulls, verifies, decrypts and
/// unpacks the image inside the sandbox (a pod VM under TCG included).
pub(super) const CREATE_CALL: Duration = Duration::from_secs(600);

/// `call` to the agent, bounded by `wait`: a guest that stopped answering becomes an error that
/// names the call, instead of a containerd request that never returns.
pub(super) async fn bounded<T>(
    what: &str,
    wait: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, ShimError> {
    match tokio::time::timeout(wait, call).await {
        Ok(r) => r
            .map(tonic::Response::into_inner)
            .map_err(|e| agent_error(what, e)),
        Err(_) => Err(ShimError::Agent(format!(
            "{what}: the sandbox's agent did not answer within {wait:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_agent_that_does_not_answer_is_named_after_the_bound() {
        let never = std::future::pending::<Result<tonic::Response<()>, tonic::Status>>();
        let err = bounded("starting container web", Duration::from_millis(50), never)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            ShimError::Agent(
                "starting container web: the sandbox's agent did not answer within 50ms".into()
            )
            .to_string()
        );
        let refused =
            async { Err::<tonic::Response<()>, _>(tonic::Status::permission_denied("policy")) };
        let err = bounded("exec", QUICK_CALL, refused).await.unwrap_err();
        assert!(matches!(err, ShimError::Refused(_)), "{err}");
    }
}
