//! What ties a sandbox's life to its keeper's: the launcher's pipe on the keeper's stdin, and
//! the parent-death signal of the processes the keeper starts.

/// Waits until the keeper's stdin ends when `watch` (the foreground `coffer run` went away);
/// never otherwise.
pub(crate) async fn owner_gone(watch: bool) {
    if !watch {
        return std::future::pending::<()>().await;
    }
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while let Ok(n) = tokio::io::AsyncReadExt::read(&mut stdin, &mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// Makes a child die with this keeper (parent-death signal): a keeper killed with SIGKILL
/// takes the sandbox with it.
pub(crate) fn die_with_keeper(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs between fork and exec and only makes one async-signal-safe
    // system call (prctl).
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
                .map_err(std::io::Error::from)
        });
    }
}
