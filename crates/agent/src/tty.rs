//! Terminals of TTY processes, taken from the runtime through its console socket.
//!
//! A foreground `runc run|exec -t` relays the container's terminal to its own stdio, and that
//! makes the newline translation depend on scheduling: runc clears `ONLCR` on the container's
//! terminal only after the container's process may already have written (one `\r` added), and
//! turns output processing on for its own stdio (a second one). So a line came out as `\r\n`
//! or `\r\r\n` depending on who ran first. Instead the agent starts the runtime detached with
//! `--console-socket` and keeps the master side of the container's own terminal, whose modes
//! are the kernel's defaults from its creation, before the process runs, and which nobody
//! changes: each `\n` the process writes is translated exactly once, to `\r\n`, as on any
//! terminal. Window size changes go straight to that terminal (the kernel signals the
//! foreground process group).
//!
//! A detached process is not the runtime's child once the runtime has exited: it is reparented
//! to the agent (PID 1 of the sandbox, or a child subreaper), which waits for it by its pid.

use std::{
    io::IoSliceMut,
    mem::MaybeUninit,
    os::{
        fd::{AsFd, OwnedFd},
        unix::fs::DirBuilderExt,
    },
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
use tokio::io::Interest;

/// How long the runtime has to hand over the terminal.
pub(crate) const HANDOVER: Duration = Duration::from_secs(60);

/// A private directory (mode 0700) holding the console socket and the pid file of one TTY
/// process, removed on drop. It lives under the temporary directory: a unix socket's path must
/// stay short, and bundle paths need not be.
pub(crate) struct ConsoleDir(PathBuf);

impl ConsoleDir {
    /// Creates a new one.
    pub(crate) fn new() -> std::io::Result<Self> {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "coffer-tty-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(Self(dir))
    }

    /// The console socket's path.
    pub(crate) fn socket(&self) -> PathBuf {
        self.0.join("console.sock")
    }

    /// The pid file's path.
    pub(crate) fn pid_file(&self) -> PathBuf {
        self.0.join("pid")
    }

    /// The process id the runtime wrote.
    pub(crate) fn pid(&self) -> std::io::Result<u32> {
        let text = std::fs::read_to_string(self.pid_file())?;
        text.trim().parse().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("the runtime's pid file holds {:?}", text.trim()),
            )
        })
    }
}

impl Drop for ConsoleDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Accepts the runtime's connection on `listener` and receives the terminal's master side,
/// waiting up to `wait`.
pub(crate) async fn receive_console(
    listener: tokio::net::UnixListener,
    wait: Duration,
) -> std::io::Result<std::fs::File> {
    let (conn, _) = tokio::time::timeout(wait, listener.accept())
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the runtime did not hand over the terminal",
            )
        })??;
    loop {
        conn.readable().await?;
        match conn.try_io(Interest::READABLE, || receive_fd(&conn)) {
            Ok(Some(fd)) => return Ok(std::fs::File::from(fd)),
            Ok(None) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the runtime's console message carried no file descriptor",
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// One `recvmsg` on `socket`: the first file descriptor passed (SCM_RIGHTS), close-on-exec.
fn receive_fd(socket: impl AsFd) -> std::io::Result<Option<OwnedFd>> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut name = [0u8; 256];
    let mut iov = [IoSliceMut::new(&mut name)];
    recvmsg(&socket, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
    let mut found = None;
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = m {
            for fd in fds {
                // Only the first is the terminal; any other is closed here.
                if found.is_none() {
                    found = Some(fd);
                }
            }
        }
    }
    Ok(found)
}

/// Sets the terminal's window size.
pub(crate) fn set_size(master: &std::fs::File, rows: u16, columns: u16) -> std::io::Result<()> {
    rustix::termios::tcsetwinsize(
        master,
        rustix::termios::Winsize {
            ws_row: rows,
            ws_col: columns,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )?;
    Ok(())
}

/// Waits for the exit of process `pid`, which must be this process's child (a detached
/// container process reparented to the agent); its status as a shell reports it (128 + the
/// signal for a process killed by one). A blocking wait on a thread of its own: TTY processes
/// are few.
pub(crate) async fn wait_pid(pid: u32) -> std::io::Result<i32> {
    let pid = rustix::process::Pid::from_raw(pid as i32)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "process id 0"))?;
    tokio::task::spawn_blocking(move || loop {
        match rustix::process::waitid(
            rustix::process::WaitId::Pid(pid),
            rustix::process::WaitIdOptions::EXITED,
        ) {
            Ok(Some(s)) => {
                return Ok(s
                    .exit_status()
                    .or_else(|| s.terminating_signal().map(|sig| 128 + sig))
                    .unwrap_or(-1))
            }
            Ok(None) => continue,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Makes this process the reaper of its orphaned descendants, so that a detached container
/// process is this process's child once the runtime exits (a sandbox's agent is PID 1 of its
/// namespace and reaps them anyway; this covers an agent that is not).
pub(crate) fn become_subreaper() {
    if let Err(e) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
        tracing::warn!(error = %e, "cannot become the reaper of detached container processes");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_terminal_passed_over_the_socket_arrives_and_translates_newlines_once() {
        let dir = ConsoleDir::new().unwrap();
        let listener = tokio::net::UnixListener::bind(dir.socket()).unwrap();
        // The runtime's side: a new terminal whose master goes over the socket.
        let master =
            rustix::pty::openpt(rustix::pty::OpenptFlags::RDWR | rustix::pty::OpenptFlags::NOCTTY)
                .unwrap();
        rustix::pty::grantpt(&master).unwrap();
        rustix::pty::unlockpt(&master).unwrap();
        let name = rustix::pty::ptsname(&master, Vec::new()).unwrap();
        let sock = dir.socket();
        let sender = std::thread::spawn(move || {
            let s = std::os::unix::net::UnixStream::connect(sock).unwrap();
            let fds = [master.as_fd()];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
            assert!(control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds)));
            rustix::net::sendmsg(
                &s,
                &[std::io::IoSlice::new(b"/dev/ptmx")],
                &mut control,
                rustix::net::SendFlags::empty(),
            )
            .unwrap();
        });
        let got = receive_console(listener, HANDOVER).await.unwrap();
        sender.join().unwrap();
        set_size(&got, 30, 100).unwrap();
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(std::ffi::OsString::from(
                String::from_utf8(name.into_bytes()).unwrap(),
            ))
            .unwrap();
        let size = rustix::termios::tcgetwinsize(&slave).unwrap();
        assert_eq!((size.ws_row, size.ws_col), (30, 100));
        std::io::Write::write_all(&mut &slave, b"line\n").unwrap();
        let mut buf = [0u8; 16];
        let n = std::io::Read::read(&mut &got, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"line\r\n");
    }

    #[tokio::test]
    async fn a_runtime_that_never_connects_is_not_waited_for_forever() {
        let dir = ConsoleDir::new().unwrap();
        let listener = tokio::net::UnixListener::bind(dir.socket()).unwrap();
        let err = receive_console(listener, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    #[allow(clippy::zombie_processes)] // wait_pid reaps them
    async fn a_childs_exit_status_and_signal_are_reported() {
        let c = std::process::Command::new("sh")
            .args(["-c", "exit 5"])
            .spawn()
            .unwrap();
        assert_eq!(wait_pid(c.id()).await.unwrap(), 5);
        let c = std::process::Command::new("sh")
            .args(["-c", "kill -9 $$"])
            .spawn()
            .unwrap();
        assert_eq!(wait_pid(c.id()).await.unwrap(), 128 + 9);
    }
}
