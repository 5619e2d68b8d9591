//! Small helpers of the guest's boot, shared by its steps: waiting for a device to appear and
//! running a tool of the image.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

/// Polls `find` until it finds something, up to 20 s; `what` names it in the error.
pub fn wait_for(what: &str, find: impl Fn() -> Option<PathBuf>) -> Result<PathBuf, String> {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(p) = find() {
            return Ok(p);
        }
        if Instant::now() > until {
            return Err(format!("no {what}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `prog` with `args`; its error output names what failed.
pub fn run_tool(prog: &str, args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new(prog)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {prog}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{prog} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}
