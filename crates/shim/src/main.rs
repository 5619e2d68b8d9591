//! `containerd-shim-coffer-v2`: containerd starts it as the runtime `io.containerd.coffer.v2`.

fn main() {
    // The server's stderr goes nowhere: a panic is logged where containerd relays the shim's log.
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(panic = %info, "containerd-shim-coffer-v2 panicked");
    }));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{}: cannot start a runtime: {e}", coffer_shim::RUNTIME_ID);
            std::process::exit(1);
        }
    };
    runtime.block_on(containerd_shim::asynchronous::run::<coffer_shim::Shim>(
        coffer_shim::RUNTIME_ID,
        Some(coffer_shim::shim_config()),
    ));
    // Copies still blocked on a FIFO containerd never closed must not hold the shim: the
    // server is down and every sandbox is gone.
    runtime.shutdown_background();
    std::process::exit(0);
}
