//! Confidential-computing event logs (TDX CCEL): the TCG crypto-agile format, replayed against
//! the TD's runtime measurement registers.
//!
//! Layout (TCG PC Client PFP): a first event in the SHA-1 format whose data is the
//! "Spec ID Event03" structure listing the digest algorithms and sizes; then `TCG_PCR_EVENT2`
//! events: MR index (u32; 1–4 are RTMR0–3), event type (u32), digest count (u32), per digest an
//! algorithm id (u16) and the digest, event size (u32) and data. The log ends at an index of
//! `0xFFFFFFFF` or unused (zero or 0xFF) space. Replay: `RTMR[i] = SHA-384(RTMR[i] ‖ digest)`.

use aws_lc_rs::digest;

use crate::VerifyError;

const TPM_ALG_SHA384: u16 = 0x000C;
const SPEC_ID: &[u8] = b"Spec ID Event03\0";
/// Bound on the number of events (a log is at most a few MiB).
const MAX_EVENTS: usize = 100_000;

/// One measured event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// CC measurement register index (1–4: RTMR0–3).
    pub index: u32,
    /// TCG event type.
    pub event_type: u32,
    /// The SHA-384 digest extended.
    pub digest: Vec<u8>,
    /// The event data.
    pub data: Vec<u8>,
}

fn bad(msg: impl Into<String>) -> VerifyError {
    VerifyError::Malformed(format!("event log: {}", msg.into()))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, VerifyError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
        .ok_or_else(|| bad("truncated"))
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, VerifyError> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes(s.try_into().expect("2 bytes")))
        .ok_or_else(|| bad("truncated"))
}

/// Parses a crypto-agile event log.
pub fn parse(log: &[u8]) -> Result<Vec<Event>, VerifyError> {
    // The Spec ID event: index, type, SHA-1 digest (20), size, data.
    let size = u32_at(log, 28)? as usize;
    let spec = log
        .get(32..32 + size)
        .ok_or_else(|| bad("truncated Spec ID event"))?;
    if !spec.starts_with(SPEC_ID) {
        return Err(bad("first event is not a Spec ID Event03"));
    }
    let algs_n = u32_at(spec, 24)? as usize;
    if algs_n > 16 {
        return Err(bad("too many digest algorithms"));
    }
    let mut sizes = Vec::with_capacity(algs_n);
    for i in 0..algs_n {
        sizes.push((
            u16_at(spec, 28 + 4 * i)?,
            u16_at(spec, 30 + 4 * i)? as usize,
        ));
    }
    let mut at = 32 + size;
    let mut events = Vec::new();
    while at + 8 <= log.len() {
        let index = u32_at(log, at)?;
        let event_type = u32_at(log, at + 4)?;
        if index == u32::MAX || (index == 0 && event_type == 0) {
            break;
        }
        if events.len() >= MAX_EVENTS {
            return Err(bad("too many events"));
        }
        let count = u32_at(log, at + 8)? as usize;
        if count > 16 {
            return Err(bad("too many digests in an event"));
        }
        let mut p = at + 12;
        let mut sha384 = None;
        for _ in 0..count {
            let alg = u16_at(log, p)?;
            let len = sizes
                .iter()
                .find(|(a, _)| *a == alg)
                .map(|(_, l)| *l)
                .ok_or_else(|| bad(format!("digest algorithm {alg:#x} is not declared")))?;
            let d = log
                .get(p + 2..p + 2 + len)
                .ok_or_else(|| bad("truncated digest"))?;
            if alg == TPM_ALG_SHA384 {
                sha384 = Some(d.to_vec());
            }
            p += 2 + len;
        }
        let data_len = u32_at(log, p)? as usize;
        let data = log
            .get(p + 4..(p + 4).saturating_add(data_len))
            .ok_or_else(|| bad("truncated event data"))?;
        events.push(Event {
            index,
            event_type,
            digest: sha384.ok_or_else(|| bad("an event has no SHA-384 digest"))?,
            data: data.to_vec(),
        });
        at = p + 4 + data_len;
    }
    Ok(events)
}

/// Replays the events into RTMR0–3.
pub fn replay(events: &[Event]) -> [[u8; 48]; 4] {
    let mut rtmr = [[0u8; 48]; 4];
    for e in events {
        // EV_NO_ACTION (3) events are informational and not extended.
        if e.event_type == 3 || !(1..=4).contains(&e.index) {
            continue;
        }
        let r = &mut rtmr[(e.index - 1) as usize];
        let mut ctx = digest::Context::new(&digest::SHA384);
        ctx.update(r);
        ctx.update(&e.digest);
        r.copy_from_slice(ctx.finish().as_ref());
    }
    rtmr
}

/// The name of a TCG event type, when it is a common one.
pub fn type_name(t: u32) -> Option<&'static str> {
    Some(match t {
        0x0000_0003 => "EV_NO_ACTION",
        0x0000_0004 => "EV_SEPARATOR",
        0x0000_0006 => "EV_EVENT_TAG",
        0x0000_000A => "EV_PLATFORM_CONFIG_FLAGS",
        0x0000_000D => "EV_IPL",
        0x8000_0001 => "EV_EFI_VARIABLE_DRIVER_CONFIG",
        0x8000_0002 => "EV_EFI_VARIABLE_BOOT",
        0x8000_0003 => "EV_EFI_BOOT_SERVICES_APPLICATION",
        0x8000_0004 => "EV_EFI_BOOT_SERVICES_DRIVER",
        0x8000_0007 => "EV_EFI_ACTION",
        0x8000_0009 => "EV_EFI_HANDOFF_TABLES",
        0x8000_000A => "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
        0x8000_000B => "EV_EFI_HANDOFF_TABLES2",
        0x8000_00E0 => "EV_EFI_VARIABLE_AUTHORITY",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use base64::{engine::general_purpose::STANDARD, Engine};
    use serde_json::Value;

    use super::*;

    fn check_against_upstream(log: &[u8], out: &str) {
        let events = parse(log).unwrap();
        let want: Value = serde_json::from_str(out).unwrap();
        let want = want["uefi_event_logs"].as_array().unwrap();
        // Upstream lists every event after the Spec ID header.
        assert_eq!(events.len(), want.len());
        for (e, w) in events.iter().zip(want) {
            assert_eq!(e.index as u64, w["index"].as_u64().unwrap());
            let d = w["digests"]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["alg"] == "SHA-384")
                .unwrap();
            assert_eq!(hex::encode(&e.digest), d["digest"].as_str().unwrap());
            assert_eq!(STANDARD.encode(&e.data), w["event"].as_str().unwrap());
            if let Some(name) = type_name(e.event_type) {
                assert_eq!(name, w["type_name"].as_str().unwrap());
            }
        }
        // Replay from upstream's digests equals replay from ours.
        let theirs: Vec<Event> = want
            .iter()
            .map(|w| Event {
                index: w["index"].as_u64().unwrap() as u32,
                event_type: if w["type_name"] == "EV_NO_ACTION" {
                    3
                } else {
                    1
                },
                digest: hex::decode(
                    w["digests"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|d| d["alg"] == "SHA-384")
                        .unwrap()["digest"]
                        .as_str()
                        .unwrap(),
                )
                .unwrap(),
                data: Vec::new(),
            })
            .collect();
        assert_eq!(replay(&events), replay(&theirs));
        assert_ne!(replay(&events)[0], [0u8; 48]);
    }

    #[test]
    fn parses_real_ccel_logs_like_upstream() {
        check_against_upstream(
            include_bytes!("../testdata/eventlog/CCEL_data_ovmf"),
            include_str!("../testdata/eventlog/CCEL_data_ovmf_out.json"),
        );
        check_against_upstream(
            include_bytes!("../testdata/eventlog/CCEL_data_grub"),
            include_str!("../testdata/eventlog/CCEL_data_grub_out.json"),
        );
    }

    #[test]
    fn rejects_malformed_logs() {
        assert!(parse(&[]).is_err());
        assert!(parse(&[0u8; 64]).is_err());
        let log = include_bytes!("../testdata/eventlog/CCEL_data_ovmf");
        let first = 32 + u32_at(log, 28).unwrap() as usize;
        // Truncated in the middle of an event.
        assert!(parse(&log[..first + 30]).is_err());
    }
}
