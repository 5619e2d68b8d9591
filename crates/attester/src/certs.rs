//! The SEV-SNP certificate table the host may supply with a report (configfs-tsm's `auxblob`,
//! the extended report's certificate buffer): entries of a 16-byte GUID, a 32-bit offset and a
//! 32-bit length (little-endian, offsets from the table's start), ended by an all-zero entry.
//! The host writes it, so every entry is bounds-checked.

use sev::firmware::host::CertType;

use crate::AttesterError;

/// One entry's size: GUID, offset, length.
const ENTRY: usize = 24;

/// Most entries a table may hold (ARK, ASK, VCEK or VLEK, CRL and a few more).
const MAX_ENTRIES: usize = 64;

/// One certificate from the table: its kind, as the SNP verifier names it (`VCEK`, `VLEK`,
/// `ASK`, `ARK`, `CRL`, or the GUID), and its DER bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cert {
    /// `VCEK`, `VLEK`, `ASK`, `ARK`, `CRL` or the GUID of another kind.
    pub kind: String,
    /// The certificate (DER) or CRL.
    pub data: Vec<u8>,
}

/// Parses a certificate table; an entry pointing outside the buffer, a table without its
/// terminating entry or with more than 64 entries is refused, naming the entry.
pub fn parse(table: &[u8]) -> Result<Vec<Cert>, AttesterError> {
    let bad = |why: String| AttesterError::Invalid(format!("the host's certificate table: {why}"));
    let mut certs = Vec::new();
    for i in 0.. {
        if i > MAX_ENTRIES {
            return Err(bad(format!("more than {MAX_ENTRIES} entries")));
        }
        let at = i * ENTRY;
        let entry = table
            .get(at..at + ENTRY)
            .ok_or_else(|| bad(format!("entry {i} is past its end (no terminating entry)")))?;
        let guid = uuid::Uuid::from_slice(&entry[..16]).map_err(|e| bad(e.to_string()))?;
        let word =
            |o: usize| u32::from_le_bytes([entry[o], entry[o + 1], entry[o + 2], entry[o + 3]]);
        let (offset, length) = (word(16) as usize, word(20) as usize);
        if guid.is_nil() {
            break;
        }
        let data = offset
            .checked_add(length)
            .and_then(|end| table.get(offset..end))
            .ok_or_else(|| {
                bad(format!(
                    "entry {i} ({guid}) points at bytes {offset}..+{length} of {}",
                    table.len()
                ))
            })?;
        let kind = match CertType::try_from(&guid) {
            Ok(CertType::VCEK) => "VCEK".to_string(),
            Ok(CertType::VLEK) => "VLEK".to_string(),
            Ok(CertType::ASK) => "ASK".to_string(),
            Ok(CertType::ARK) => "ARK".to_string(),
            Ok(CertType::CRL) => "CRL".to_string(),
            _ => guid.to_string(),
        };
        certs.push(Cert {
            kind,
            data: data.to_vec(),
        });
    }
    Ok(certs)
}

/// Writes a certificate table of `certs` (each `(GUID, data)`), as a host does: the entries,
/// the terminating entry, then the data in order. For tests and tools.
pub fn encode(certs: &[(uuid::Uuid, &[u8])]) -> Vec<u8> {
    let mut offset = (certs.len() + 1) * ENTRY;
    let mut out = Vec::new();
    for (guid, data) in certs {
        out.extend_from_slice(guid.as_bytes());
        out.extend_from_slice(&(offset as u32).to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        offset += data.len();
    }
    out.extend_from_slice(&[0u8; ENTRY]);
    for (_, data) in certs {
        out.extend_from_slice(data);
    }
    out
}

/// The GUID the host files a VCEK under.
pub const VCEK_GUID: uuid::Uuid = uuid::uuid!("63da758d-e664-4564-adc5-f4b93be8accd");
/// The GUID the host files a VLEK under.
pub const VLEK_GUID: uuid::Uuid = uuid::uuid!("a8074bc2-a25a-483e-aae6-39c045a0b8a1");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_round_trips_and_bad_entries_are_named() {
        let ask = uuid::uuid!("4ab7b379-bbac-4fe4-a02f-05aef327c782");
        let other = uuid::uuid!("11111111-2222-3333-4444-555555555555");
        let t = encode(&[(VCEK_GUID, b"vcek-der"), (ask, b"ask"), (other, b"x")]);
        let certs = parse(&t).unwrap();
        assert_eq!(
            certs,
            [
                Cert {
                    kind: "VCEK".into(),
                    data: b"vcek-der".to_vec()
                },
                Cert {
                    kind: "ASK".into(),
                    data: b"ask".to_vec()
                },
                Cert {
                    kind: other.to_string(),
                    data: b"x".to_vec()
                },
            ]
        );
        assert!(parse(&encode(&[])).unwrap().is_empty());

        // An entry past the buffer, a missing terminator, an offset overflow.
        let mut bad = t.clone();
        bad[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = parse(&bad).unwrap_err().to_string();
        assert!(
            e.contains("entry 0 (63da758d-e664-4564-adc5-f4b93be8accd) points at"),
            "{e}"
        );
        let mut unterminated = VCEK_GUID.as_bytes().to_vec();
        unterminated.extend_from_slice(&[0u8; 8]);
        let e = parse(&unterminated).unwrap_err().to_string();
        assert!(
            e.contains("entry 1 is past its end (no terminating entry)"),
            "{e}"
        );
        let mut bad = t;
        bad[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse(&bad).is_err());
        let mut many = Vec::new();
        for _ in 0..70 {
            many.extend_from_slice(VCEK_GUID.as_bytes());
            many.extend_from_slice(&[0u8; 8]);
        }
        let e = parse(&many).unwrap_err().to_string();
        assert!(e.contains("more than 64 entries"), "{e}");
    }
}
