//! The channel through which a guest asks the emulated PSP for a report: a unix socket the
//! launcher serves and hands to the guest alone. One JSON line in, one out:
//! `{"report_data": "<128 hex>"}` → `{"evidence": {…SNP evidence…}}` or `{"error": "…"}`.
//! The guest supplies only REPORT_DATA; MEASUREMENT and HOST_DATA are what the launcher set.
//! In a pod VM the channel is a virtio-serial port (a character device the guest opens; QEMU
//! connects it to the launcher's socket): the same lines, one request at a time.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::Path,
    sync::Arc,
    time::Duration,
};

use serde_json::{json, Value};

use crate::EmulatedPsp;

fn answer(psp: &EmulatedPsp, line: &str) -> Value {
    let rd = serde_json::from_str::<Value>(line)
        .ok()
        .and_then(|v| v["report_data"].as_str().and_then(|h| hex::decode(h).ok()))
        .and_then(|b| <[u8; 64]>::try_from(b).ok());
    match rd {
        Some(rd) => match psp.evidence(&rd) {
            Ok(e) => json!({ "evidence": e }),
            Err(e) => json!({ "error": e.to_string() }),
        },
        None => json!({ "error": "expected {\"report_data\": \"<64 bytes as hex>\"}" }),
    }
}

/// Serves reports from `psp` on `listener` until the listener fails; one thread per connection.
/// A connection stays open as long as its peer keeps it (a pod VM's port is one connection for
/// the VM's whole life).
pub fn serve(psp: Arc<EmulatedPsp>, listener: UnixListener) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let psp = psp.clone();
        std::thread::spawn(move || {
            let Ok(reader) = conn.try_clone() else { return };
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { return };
                let mut out = answer(&psp, &line).to_string();
                out.push('\n');
                if conn.write_all(out.as_bytes()).is_err() {
                    return;
                }
            }
        });
    }
}

/// Asks the PSP behind `path` — a unix socket, or a serial port (character device) — for
/// evidence carrying `report_data`.
pub fn request_evidence(path: &Path, report_data: &[u8; 64]) -> Result<Value, String> {
    use std::os::unix::fs::FileTypeExt;
    let mut req = json!({ "report_data": hex::encode(report_data) }).to_string();
    req.push('\n');
    let mut line = String::new();
    let is_port = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_char_device());
    if is_port {
        // One user of the port at a time; answers come in order.
        static PORT: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = PORT.lock().unwrap_or_else(|p| p.into_inner());
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| format!("cannot open the PSP port {}: {e}", path.display()))?;
        f.write_all(req.as_bytes())
            .map_err(|e| format!("PSP channel: {e}"))?;
        // Byte by byte: nothing past the answer's end is consumed.
        let mut b = [0u8; 1];
        let mut bytes = Vec::new();
        loop {
            match std::io::Read::read(&mut f, &mut b) {
                Ok(1) if b[0] == b'\n' => break,
                Ok(1) => bytes.push(b[0]),
                Ok(_) => return Err("PSP channel: closed".into()),
                Err(e) => return Err(format!("PSP channel: {e}")),
            }
        }
        line = String::from_utf8(bytes).map_err(|_| "PSP channel: malformed answer".to_string())?;
    } else {
        let mut s = UnixStream::connect(path)
            .map_err(|e| format!("cannot reach the PSP at {}: {e}", path.display()))?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        s.write_all(req.as_bytes())
            .map_err(|e| format!("PSP channel: {e}"))?;
        BufReader::new(s)
            .read_line(&mut line)
            .map_err(|e| format!("PSP channel: {e}"))?;
    }
    let v: Value =
        serde_json::from_str(&line).map_err(|_| "PSP channel: malformed answer".to_string())?;
    if let Some(e) = v["error"].as_str() {
        return Err(format!("the PSP refused: {e}"));
    }
    Ok(v["evidence"].clone())
}
