//! The SAE commands and label files as a new user meets them: the real binary, each test in
//! its own temp dir.

use std::path::Path;

/// Writes 0/1 `labels` as an `.npy` vector of int64, as `np.save("y.npy", y)` does.
fn write_npy_labels(path: &Path, labels: &[u8]) {
    let mut header = format!(
        "{{'descr': '<i8', 'fortran_order': False, 'shape': ({},), }}",
        labels.len()
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(labels.iter().flat_map(|&l| i64::from(l).to_le_bytes()));
    std::fs::write(path, bytes).unwrap();
}

/// `replay --labels y.npy` used to fail with "line 1: not valid UTF-8": the same labels as an
/// .npy vector now evaluate exactly as the text file does.
#[test]
fn replay_takes_npy_labels_as_it_takes_text_ones() {
    let (dir, model, test, lab) = crate::trained();
    let text = std::fs::read_to_string(&lab).unwrap();
    let labels: Vec<u8> = text.lines().map(|l| l.trim().parse().unwrap()).collect();
    let npy = dir.path().join("labels.npy");
    write_npy_labels(&npy, &labels);
    let (code, from_text, err) = crate::replay_with(&model, &test, &lab, &[] as &[&str]);
    assert_eq!(code, 0, "{err}");
    let (code, from_npy, err) = crate::replay_with(&model, &test, &npy, &[] as &[&str]);
    assert_eq!(code, 0, "{err}");
    assert!(from_text.contains("AUROC"), "{from_text}");
    // The evaluation, not the timings.
    let metrics = |out: &str| -> Vec<String> {
        out.lines()
            .filter(|l| {
                ["rows:", "point-", "threshold", "events"]
                    .iter()
                    .any(|p| l.starts_with(p))
            })
            .map(String::from)
            .collect()
    };
    assert_eq!(metrics(&from_npy), metrics(&from_text));
    assert!(
        metrics(&from_text)
            .iter()
            .any(|l| l.starts_with("point-wise AUROC")),
        "{from_text}"
    );
    // A wrong count names both, as for text.
    write_npy_labels(&npy, &labels[1..]);
    let (code, _, err) = crate::replay_with(&model, &test, &npy, &[] as &[&str]);
    assert_eq!(code, 1);
    assert!(
        err.contains("999 labels, but the data has 1000 rows"),
        "{err}"
    );
}
