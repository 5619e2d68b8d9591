//! `containerd-shim-coffer-v2`: containerd starts it as the runtime `io.containerd.coffer.v2`.

#[tokio::main]
async fn main() {
    containerd_shim::asynchronous::run::<coffer_shim::Shim>(
        coffer_shim::RUNTIME_ID,
        Some(coffer_shim::shim_config()),
    )
    .await;
}
