//! NumPy `.npz` archives (a zip of `.npy` members, stored or deflated), as the ODDS /
//! ADBench tables ship: `X` (rows × features) and `y` (one 0/1 label per row).
//!
//! A small reader of the zip central directory; members are inflated with `miniz_oxide`
//! and parsed by [`super::npy::parse_npy`], so every NPY check applies.

use std::path::{Path, PathBuf};

use super::npy::parse_npy_allow_1d;
use super::{IngestError, Table};

/// Reads member `name` (without `.npy`) of an `.npz` file as a table (a 1-D member
/// becomes one column).
///
/// # Errors
/// Not a zip archive, no such member, an unsupported compression method, a corrupt
/// deflate stream, or anything the NPY parser rejects.
pub fn read_npz_member(path: &Path, name: &str) -> Result<Table, IngestError> {
    let bytes = std::fs::read(path).map_err(|e| IngestError::io(path, e))?;
    let (shown, member) = member_npy(path, &bytes, name)?;
    parse_npy_allow_1d(&shown, &member)
}

/// The NPY bytes of member `name` (without `.npy`) of an `.npz` archive already in memory,
/// with the name to show in messages about its content (`t.npz:X.npy`).
///
/// # Errors
/// As [`read_npz_member`], minus `Io` and the NPY parser's.
pub(crate) fn member_npy(
    path: &Path,
    zip: &[u8],
    name: &str,
) -> Result<(PathBuf, Vec<u8>), IngestError> {
    let member = extract(path, zip, &format!("{name}.npy"))?;
    let shown = path.with_file_name(format!(
        "{}:{name}.npy",
        path.file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    Ok((shown, member))
}

/// Whether bytes start as a zip archive (an `.npz`) does.
pub(crate) fn is_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06")
}

/// Reads an ODDS-style `.npz`: the table `X` and the labels `y` (1 = anomalous).
///
/// # Errors
/// As [`read_npz_member`], plus `y` not having one value per row of `X`, or a `y` that is
/// not 0 or 1 (as in a label file: a 2 or a 0.5 is more likely a class index or a score
/// than a label).
pub fn read_npz_labelled(path: &Path) -> Result<(Table, Vec<u8>), IngestError> {
    let x = read_npz_member(path, "X")?;
    let labels = read_npz_labels(path, x.values.nrows())?;
    Ok((x, labels))
}

/// The archive's `y`: one 0/1 label per row of an `X` of `rows` rows.
///
/// # Errors
/// As [`read_npz_member`], plus a `y` that is not 0/1 or not `rows` long.
pub fn read_npz_labels(path: &Path, rows: usize) -> Result<Vec<u8>, IngestError> {
    let y = read_npz_member(path, "y")?;
    if let Some((i, v)) = y
        .values
        .iter()
        .enumerate()
        .find(|(_, v)| **v != 0.0 && **v != 1.0)
    {
        return Err(bad(
            path,
            format!("label y[{i}] is {v}, not 0 or 1 (y must hold one 0/1 label per row of X)"),
        ));
    }
    let labels: Vec<u8> = y.values.iter().map(|&v| u8::from(v == 1.0)).collect();
    if labels.len() != rows {
        return Err(IngestError::LabelCount {
            path: y.path,
            found: labels.len(),
            expected: rows,
            note: "",
        });
    }
    Ok(labels)
}

fn bad(path: &Path, message: impl Into<String>) -> IngestError {
    IngestError::Npz {
        path: path.to_owned(),
        message: message.into(),
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<usize> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]) as usize)
}

fn u32_at(b: &[u8], at: usize) -> Option<usize> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize)
}

/// The bytes of one member, found through the central directory.
fn extract(path: &Path, zip: &[u8], member: &str) -> Result<Vec<u8>, IngestError> {
    const EOCD: [u8; 4] = [0x50, 0x4b, 0x05, 0x06];
    const CENTRAL: [u8; 4] = [0x50, 0x4b, 0x01, 0x02];
    const LOCAL: [u8; 4] = [0x50, 0x4b, 0x03, 0x04];
    let not_zip = || bad(path, "not an NPZ archive (no zip directory found)");
    let eocd = (0..zip.len().saturating_sub(21))
        .rev()
        .take(65_557)
        .find(|&i| zip[i..i + 4] == EOCD)
        .ok_or_else(not_zip)?;
    let entries = u16_at(zip, eocd + 10).ok_or_else(not_zip)?;
    let mut at = u32_at(zip, eocd + 16).ok_or_else(not_zip)?;
    let mut names = Vec::new();
    for _ in 0..entries {
        if zip.get(at..at + 4) != Some(&CENTRAL[..]) {
            return Err(bad(path, "corrupt NPZ archive: bad zip central directory"));
        }
        let field = |off: usize, wide: bool| {
            if wide {
                u32_at(zip, at + off)
            } else {
                u16_at(zip, at + off)
            }
        };
        let (
            Some(method),
            Some(csize),
            Some(usize_),
            Some(nlen),
            Some(xlen),
            Some(clen),
            Some(local),
        ) = (
            field(10, false),
            field(20, true),
            field(24, true),
            field(28, false),
            field(30, false),
            field(32, false),
            field(42, true),
        )
        else {
            return Err(bad(
                path,
                "corrupt NPZ archive: truncated zip central directory",
            ));
        };
        let name = zip
            .get(at + 46..at + 46 + nlen)
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .ok_or_else(|| bad(path, "corrupt NPZ archive: truncated zip central directory"))?;
        if name == member {
            if zip.get(local..local + 4) != Some(&LOCAL[..]) {
                return Err(bad(path, format!("member {member}: corrupt local header")));
            }
            let (Some(ln), Some(lx)) = (u16_at(zip, local + 26), u16_at(zip, local + 28)) else {
                return Err(bad(
                    path,
                    format!("member {member}: truncated local header"),
                ));
            };
            let start = local + 30 + ln + lx;
            let data = zip.get(start..start + csize).ok_or_else(|| {
                bad(
                    path,
                    format!("member {member}: truncated ({csize} bytes expected)"),
                )
            })?;
            return match method {
                0 => Ok(data.to_vec()),
                8 => miniz_oxide::inflate::decompress_to_vec_with_limit(data, usize_.max(1) * 2)
                    .map_err(|e| {
                        bad(
                            path,
                            format!("member {member}: corrupt deflate data ({:?})", e.status),
                        )
                    }),
                m => Err(bad(
                    path,
                    format!("member {member}: unsupported zip compression method {m}"),
                )),
            };
        }
        names.push(name);
        at += 46 + nlen + xlen + clen;
    }
    Err(bad(
        path,
        format!(
            "the archive has no member {member} (its members: {})",
            names.join(", ")
        ),
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A stored (uncompressed) zip with the given members, built by hand.
    pub(crate) fn stored_zip(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data) in members {
            let offset = out.len() as u32;
            out.extend_from_slice(&[0x50, 0x4b, 0x03, 0x04, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            out.extend_from_slice(&[0; 4]); // crc (unchecked)
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(data);
            central
                .extend_from_slice(&[0x50, 0x4b, 0x01, 0x02, 20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            central.extend_from_slice(&[0; 4]);
            central.extend_from_slice(&(data.len() as u32).to_le_bytes());
            central.extend_from_slice(&(data.len() as u32).to_le_bytes());
            central.extend_from_slice(&(name.len() as u16).to_le_bytes());
            central.extend_from_slice(&[0; 12]);
            central.extend_from_slice(&offset.to_le_bytes());
            central.extend_from_slice(name.as_bytes());
        }
        let cd_offset = out.len() as u32;
        let cd_len = central.len() as u32;
        out.extend_from_slice(&central);
        out.extend_from_slice(&[0x50, 0x4b, 0x05, 0x06, 0, 0, 0, 0]);
        out.extend_from_slice(&(members.len() as u16).to_le_bytes());
        out.extend_from_slice(&(members.len() as u16).to_le_bytes());
        out.extend_from_slice(&cd_len.to_le_bytes());
        out.extend_from_slice(&cd_offset.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out
    }

    pub(crate) fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut header =
            format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn reads_x_and_y_from_a_stored_archive() {
        let x = x_bytes();
        let y: Vec<u8> = [0i64, 1].iter().flat_map(|v| v.to_le_bytes()).collect();
        let zip = stored_zip(&[
            ("X.npy", npy("<f8", "(2, 2)", &x)),
            ("y.npy", npy("<i8", "(2,)", &y)),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.npz");
        std::fs::write(&p, zip).unwrap();
        let (x, y) = read_npz_labelled(&p).unwrap();
        assert_eq!(x.values.row(1).to_vec(), vec![3.0, 4.0]);
        assert_eq!(y, vec![0, 1]);
        let err = read_npz_member(&p, "Z").unwrap_err().to_string();
        assert!(
            err.contains("no member Z.npy") && err.contains("X.npy, y.npy"),
            "{err}"
        );
        // Labels other than 0 and 1 are refused, as in a label file.
        for bad_y in [2.0f64, -1.0, 0.5] {
            let y: Vec<u8> = [0.0f64, bad_y]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            let zip = stored_zip(&[
                ("X.npy", npy("<f8", "(2, 2)", &x_bytes())),
                ("y.npy", npy("<f8", "(2,)", &y)),
            ]);
            std::fs::write(&p, zip).unwrap();
            let err = read_npz_labelled(&p).unwrap_err().to_string();
            assert!(
                err.contains("y[1] is") && err.contains("not 0 or 1"),
                "{err}"
            );
        }
    }

    fn x_bytes() -> Vec<u8> {
        [1.0f64, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }

    /// A valid archive with the wrong contents is not "not an NPZ archive": each error
    /// says its cause.
    #[test]
    fn errors_are_worded_by_cause() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.npz");
        let y2: Vec<u8> = [0i64, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
        let cases: [(Vec<u8>, &str); 3] = [
            (
                stored_zip(&[
                    ("X.npy", npy("<f8", "(2, 2)", &x_bytes())),
                    ("y.npy", npy("<i8", "(2,)", &y2)),
                ]),
                "t.npz: label y[1] is 2, not 0 or 1",
            ),
            (
                stored_zip(&[("X.npy", npy("<f8", "(2, 2)", &x_bytes()))]),
                "t.npz: the archive has no member y.npy (its members: X.npy)",
            ),
            (b"plain text".to_vec(), "t.npz: not an NPZ archive"),
        ];
        for (bytes, want) in cases {
            std::fs::write(&p, bytes).unwrap();
            let err = read_npz_labelled(&p).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
            if !want.contains("not an NPZ") {
                assert!(!err.contains("not an NPZ archive"), "{err}");
            }
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.npz");
        for bytes in [Vec::new(), b"PK\x05\x06".to_vec(), vec![0x50; 100]] {
            std::fs::write(&p, &bytes).unwrap();
            assert!(read_npz_member(&p, "X").is_err());
        }
    }
}
