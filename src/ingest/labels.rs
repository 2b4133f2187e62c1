//! Label files: point labels (one 0/1 per row) and SMD interpretation labels
//! (anomaly segments with the metrics the labellers blamed).
//!
//! Point labels feed [`crate::eval`] (`replay`, `harness`) and `sae-score`; segments let a
//! replay check that an alert names the right metrics. One reader takes both point-label
//! formats, told apart by their first bytes: an `.npy` vector (the NPY magic), else text.

use std::path::Path;

use super::{IngestError, TextPos, line_str, lines, npy, npz, read_bytes};

/// One labelled anomaly segment, converted to 0-based indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// First anomalous row, 0-based.
    pub start: usize,
    /// Last anomalous row, 0-based inclusive.
    pub end: usize,
    /// The blamed features, 0-based, in file order.
    pub dims: Vec<usize>,
}

impl Segment {
    /// Number of rows in the segment.
    pub fn len(&self) -> usize {
        self.end - self.start + 1
    }

    /// Always false: a segment holds at least one row.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether 0-based `row` lies in the segment.
    pub fn contains(&self, row: usize) -> bool {
        (self.start..=self.end).contains(&row)
    }
}

/// Read point labels: a file that starts with the NPY magic is an `.npy` vector (`[n]` or
/// `[n, 1]`, of any integer, bool or float dtype, holding only 0 and 1); any other is text,
/// one `0` or `1` per line (`0.0`/`1.0` are accepted too; spaces, `\r`, a BOM and blank
/// trailing lines are tolerated).
///
/// # Errors
/// `Io`; `Empty`; for text `BadLabel` or `Syntax` (blank line before the end) with the
/// line; for NPY whatever the NPY reader refuses, `LabelShape`, or `BadLabelAt` with the
/// element; `LabelCount` naming both counts when `expected_rows` is given and differs.
pub fn read_labels(path: &Path, expected_rows: Option<usize>) -> Result<Vec<u8>, IngestError> {
    let bytes = read_bytes(path)?;
    parse_labels(path, &bytes, expected_rows)
}

/// Parse point labels already in memory; `path` is only used in error messages.
///
/// # Errors
/// As [`read_labels`], minus `Io`.
pub fn parse_labels(
    path: &Path,
    bytes: &[u8],
    expected_rows: Option<usize>,
) -> Result<Vec<u8>, IngestError> {
    // A file named `.npy` is read as one even when its magic is damaged, so the NPY
    // parser's error names what is wrong, not the text parser's "not valid UTF-8".
    let named = |ext: &str| {
        path.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case(ext))
    };
    let mut text = false;
    let labels = if named("npz") || (!named("npy") && npz::is_zip(bytes)) {
        // An ODDS / ADBench archive: the labels are its array `y`.
        let (shown, member) = npz::member_npy(path, bytes, "y")?;
        parse_npy_labels(&shown, &member)?
    } else if named("npy") || bytes.starts_with(npy::MAGIC) {
        parse_npy_labels(path, bytes)?
    } else {
        text = true;
        parse_text_labels(path, bytes)?
    };
    match expected_rows {
        Some(expected) if expected != labels.len() => Err(IngestError::LabelCount {
            path: path.to_owned(),
            found: labels.len(),
            expected,
            note: if text {
                header_note(bytes, labels.len(), expected)
            } else {
                ""
            },
        }),
        _ => Ok(labels),
    }
}

/// What to say after a label count one too many when the first line is `0`: pandas'
/// `pd.Series(y).to_csv(index=False)` writes the header `0` (an unnamed Series' name),
/// which is also a valid label, so only the count gives it away.
fn header_note(bytes: &[u8], found: usize, expected: usize) -> &'static str {
    let first = lines(bytes).next().map(|(_, l)| l.trim_ascii());
    if found == expected + 1 && first == Some(b"0") {
        "; the first line, \"0\", looks like a header (pandas writes one for an unnamed Series): remove it, or write the labels with to_csv(index=False, header=False)"
    } else {
        ""
    }
}

/// An `.npy` vector of 0/1 labels.
fn parse_npy_labels(path: &Path, bytes: &[u8]) -> Result<Vec<u8>, IngestError> {
    let shape_err = |shape: Vec<u64>| IngestError::LabelShape {
        path: path.to_owned(),
        shape,
    };
    let table = npy::parse_npy_allow_1d(path, bytes).map_err(|e| match e {
        IngestError::NotTwoD { shape, .. } => shape_err(shape),
        other => other,
    })?;
    let (rows, cols) = table.values.dim();
    if cols != 1 {
        return Err(shape_err(vec![rows as u64, cols as u64]));
    }
    table
        .values
        .iter()
        .enumerate()
        .map(|(index, &value)| match value {
            0.0 => Ok(0),
            1.0 => Ok(1),
            _ => Err(IngestError::BadLabelAt {
                path: path.to_owned(),
                index,
                value,
            }),
        })
        .collect()
}

/// Text labels, one per line.
fn parse_text_labels(path: &Path, bytes: &[u8]) -> Result<Vec<u8>, IngestError> {
    let mut labels = Vec::new();
    let mut blank_at: Option<usize> = None;
    for (line_no, raw) in lines(bytes) {
        let text = line_str(path, line_no, raw)?.trim();
        if text.is_empty() {
            blank_at.get_or_insert(line_no);
            continue;
        }
        if let Some(blank) = blank_at {
            return Err(IngestError::Syntax {
                path: path.to_owned(),
                pos: TextPos::line(blank),
                message: "blank line between labels".into(),
            });
        }
        let Some(label) = text_label(text) else {
            // A header line (`label`, `y`, `is_anomaly`) over valid labels: said so.
            if labels.is_empty()
                && lines(bytes)
                    .skip(1)
                    .filter_map(|(_, l)| std::str::from_utf8(l).ok())
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .all(|l| text_label(l).is_some())
            {
                return Err(IngestError::Syntax {
                    path: path.to_owned(),
                    pos: TextPos::line(line_no),
                    message: format!(
                        "label {:?} is not 0 or 1, but every line after it is: the first line looks like a header: remove it (pandas: to_csv(index=False, header=False))",
                        super::Clipped(text)
                    ),
                });
            }
            // `pd.Series(y).to_csv()` writes the index too: `,0` then `0,1`, `1,0`, ….
            if text.contains(',') {
                return Err(IngestError::Syntax {
                    path: path.to_owned(),
                    pos: TextPos::line(line_no),
                    message: format!(
                        "label {:?} is not 0 or 1: a label file holds one label per line, with no header and no index column (pandas: to_csv(index=False, header=False))",
                        super::Clipped(text)
                    ),
                });
            }
            // scikit-learn's `predict` marks outliers -1 and inliers 1.
            if text == "-1" {
                return Err(IngestError::Syntax {
                    path: path.to_owned(),
                    pos: TextPos::line(line_no),
                    message: "label \"-1\" is not 0 or 1: -1 for an outlier and 1 for an inlier is scikit-learn's predict() convention, not a label file's: write 1 for anomalous and 0 for normal (numpy: (pred == -1).astype(int))".into(),
                });
            }
            return Err(IngestError::BadLabel {
                path: path.to_owned(),
                pos: TextPos::line(line_no),
                value: text.to_owned(),
            });
        };
        labels.push(label);
    }
    if labels.is_empty() {
        return Err(IngestError::Empty {
            path: path.to_owned(),
        });
    }
    // A first line `0` is pandas' header for an unnamed Series, or a first label: the same
    // text. When the labels after it are written as decimals (`0.0`, `1.0`: a float Series)
    // or booleans (`True`, `False`: a bool Series) it is the header, and reading it would
    // shift every label by one row.
    let mut texts = lines(bytes)
        .filter_map(|(_, l)| std::str::from_utf8(l).ok())
        .map(str::trim)
        .filter(|l| !l.is_empty());
    if texts.next() == Some("0")
        && labels.len() > 1
        && texts.all(|l| l.contains('.') || boolean_label(l).is_some())
    {
        return Err(IngestError::Syntax {
            path: path.to_owned(),
            pos: TextPos::line(1),
            message: "the first line is \"0\" and every label after it a decimal (0.0, 1.0) or a boolean (True, False): it is pandas' header for an unnamed Series, and would shift every label by one row: remove it (pandas: to_csv(index=False, header=False))".into(),
        });
    }
    Ok(labels)
}

/// One text label: `0` or `1` (or a number equal to one, such as `1.0`), or a boolean as
/// pandas and Python write one (`True`, `False`; any case): a bool `.npy` reads, so its
/// text reads too.
fn text_label(text: &str) -> Option<u8> {
    match text {
        "0" => Some(0),
        "1" => Some(1),
        _ => match text.parse::<f64>() {
            Ok(0.0) => Some(0),
            Ok(1.0) => Some(1),
            _ => boolean_label(text),
        },
    }
}

/// `True` as 1 and `False` as 0, in any case.
fn boolean_label(text: &str) -> Option<u8> {
    if text.eq_ignore_ascii_case("true") {
        Some(1)
    } else if text.eq_ignore_ascii_case("false") {
        Some(0)
    } else {
        None
    }
}

/// Read OmniAnomaly SMD interpretation labels: one `a-b:d,d,...` per line.
///
/// Dims are 1-based and become 0-based. The row range `a-b` is converted so that it
/// agrees with the same dataset's `test_label` file: rows `a..=b-1` 0-based (NumPy's
/// `[a:b]`; equivalently 1-based inclusive `a+1..=b`). This was checked on every segment
/// of SMD machines 1-6, 2-1 and 3-4; reading `a-b` as 1-based inclusive instead would
/// mark one normal row before every segment. An empty file yields no segments.
///
/// # Errors
/// `Io`; `Syntax` naming the line for anything that is not `a-b:d[,d...]` with
/// `a < b` and dims ≥ 1.
pub fn read_interpretation_labels(path: &Path) -> Result<Vec<Segment>, IngestError> {
    let bytes = read_bytes(path)?;
    parse_interpretation_labels(path, &bytes)
}

/// What interpretation labels may refer to: the features of the model that ranks the
/// frames and the rows of the input it scores ([`read_interpretation_labels_within`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentBounds {
    /// The model's features: dims may be 1 to `features` (1-based).
    pub features: usize,
    /// The input's rows: a segment `a-b` covers 1-based rows `a+1..=b`, so `b` may be at
    /// most `rows`.
    pub rows: usize,
}

/// [`read_interpretation_labels`], checking every segment against `bounds`.
///
/// # Errors
/// As [`read_interpretation_labels`], and `Syntax` naming the line of a dim past the
/// model's features or a segment past the input's rows.
pub fn read_interpretation_labels_within(
    path: &Path,
    bounds: SegmentBounds,
) -> Result<Vec<Segment>, IngestError> {
    let bytes = read_bytes(path)?;
    parse_interpretation_labels_within(path, &bytes, Some(bounds))
}

/// Parse interpretation labels already in memory; `path` is only used in error messages.
///
/// # Errors
/// As [`read_interpretation_labels`], minus `Io`.
pub fn parse_interpretation_labels(path: &Path, bytes: &[u8]) -> Result<Vec<Segment>, IngestError> {
    parse_interpretation_labels_within(path, bytes, None)
}

/// [`parse_interpretation_labels`], checking every segment against `bounds` when given.
///
/// # Errors
/// As [`read_interpretation_labels_within`], minus `Io`.
pub fn parse_interpretation_labels_within(
    path: &Path,
    bytes: &[u8],
    bounds: Option<SegmentBounds>,
) -> Result<Vec<Segment>, IngestError> {
    let mut segments = Vec::new();
    for (line_no, raw) in lines(bytes) {
        let text = line_str(path, line_no, raw)?.trim();
        if text.is_empty() {
            continue;
        }
        let syntax = |message: String| IngestError::Syntax {
            path: path.to_owned(),
            pos: TextPos::line(line_no),
            message,
        };
        let expected = || {
            syntax(format!(
                "expected \"start-end:dim,dim,...\", found {:?}",
                super::Clipped(text)
            ))
        };
        let (range, dims) = text.split_once(':').ok_or_else(expected)?;
        let (a, b) = range.split_once('-').ok_or_else(expected)?;
        let (a, b) = (
            number(a).ok_or_else(expected)?,
            number(b).ok_or_else(expected)?,
        );
        if a >= b {
            return Err(syntax(format!("segment {a}-{b} is empty or reversed")));
        }
        let dims = dims
            .split(',')
            .map(|d| match number(d) {
                Some(d) if d >= 1 => Ok(d - 1),
                _ => Err(syntax(format!(
                    "dim {:?} is not a 1-based index",
                    super::Clipped(d.trim())
                ))),
            })
            .collect::<Result<Vec<usize>, _>>()?;
        // A repeated culprit would count twice in |G| but match once, capping the frame's
        // HitRate below 1.
        if let Some((_, &d)) = dims
            .iter()
            .enumerate()
            .find(|&(i, d)| dims[..i].contains(d))
        {
            return Err(syntax(format!("dim {} is listed twice", d + 1)));
        }
        if let Some(bounds) = bounds {
            if let Some(&d) = dims.iter().find(|&&d| d >= bounds.features) {
                return Err(syntax(format!(
                    "dim {} is out of range: the model has {} features (dims are 1-based, 1 to {})",
                    d + 1,
                    bounds.features,
                    bounds.features
                )));
            }
            if b > bounds.rows {
                return Err(syntax(format!(
                    "segment {a}-{b} runs past the input's {} rows (a segment a-b covers the 1-based rows a+1 to b, so b may be at most {})",
                    bounds.rows, bounds.rows
                )));
            }
        }
        segments.push(Segment {
            start: a,
            end: b - 1,
            dims,
        });
    }
    Ok(segments)
}

fn number(text: &str) -> Option<usize> {
    let t = text.trim();
    if t.is_empty() || !t.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    t.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    fn labels(text: &str, expected: Option<usize>) -> Result<Vec<u8>, IngestError> {
        parse_labels(Path::new("labels.txt"), text.as_bytes(), expected)
    }

    fn segments(text: &str) -> Result<Vec<Segment>, IngestError> {
        parse_interpretation_labels(Path::new("interp.txt"), text.as_bytes())
    }

    #[test]
    fn reads_point_labels() {
        assert_eq!(
            labels("0\n1\r\n 1 \n0.0\n1.0\n\n\r\n", None).unwrap(),
            [0, 1, 1, 0, 1]
        );
        assert_eq!(labels("\u{feff}1", Some(1)).unwrap(), [1]);
    }

    #[test]
    fn point_label_errors() {
        assert_eq!(
            labels("0\n1\n0\n", Some(4)).unwrap_err().to_string(),
            "labels.txt: 3 labels, but the data has 4 rows"
        );
        assert_eq!(
            labels("0\n2\n", None).unwrap_err().to_string(),
            "labels.txt: line 2: label \"2\" is not 0 or 1"
        );
        assert_eq!(
            labels("0\nyes\n", None).unwrap_err().to_string(),
            "labels.txt: line 2: label \"yes\" is not 0 or 1"
        );
        assert_eq!(
            labels("0\n\n1\n", None).unwrap_err().to_string(),
            "labels.txt: line 2: blank line between labels"
        );
        assert_eq!(
            labels("", None).unwrap_err().to_string(),
            "labels.txt: empty file"
        );
        assert_eq!(
            labels("\n\n", Some(0)).unwrap_err().to_string(),
            "labels.txt: empty file"
        );
        assert!(labels("0\nnan\n", None).is_err());
        // scikit-learn's predict() output, named as such.
        let err = labels("1\n-1\n", None).unwrap_err().to_string();
        assert!(
            err.starts_with("labels.txt: line 2: label \"-1\" is not 0 or 1: -1 for an outlier and 1 for an inlier is scikit-learn's predict() convention"),
            "{err}"
        );
    }

    /// pandas writes a bool Series as `True` / `False`; a bool `.npy` reads, so they do
    /// too, in any case. Its header `0` over them is told as a header, not a label.
    #[test]
    fn boolean_labels_read_as_0_and_1() {
        assert_eq!(
            labels("False\nTrue\ntrue\nFALSE\n", Some(4)).unwrap(),
            [0, 1, 1, 0]
        );
        let err = labels("0\nFalse\nTrue\n", Some(3)).unwrap_err().to_string();
        assert!(
            err.contains("every label after it a decimal (0.0, 1.0) or a boolean (True, False): it is pandas' header"),
            "{err}"
        );
        // Mixed with integers, a first `0` is a label.
        assert_eq!(labels("0\nTrue\n1\n", Some(3)).unwrap(), [0, 1, 1]);
        assert_eq!(
            labels("0\nyes\n", None).unwrap_err().to_string(),
            "labels.txt: line 2: label \"yes\" is not 0 or 1"
        );
    }

    /// `pd.Series(y).to_csv("y.csv", index=False)` writes the header `0`, a valid label:
    /// the count was one too many with no word why. A header that is no label said only
    /// "not 0 or 1".
    #[test]
    fn a_header_line_over_labels_is_named_as_one() {
        let err = labels("0\n1\n0\n1\n", Some(3)).unwrap_err().to_string();
        assert_eq!(
            err,
            "labels.txt: 4 labels, but the data has 3 rows; the first line, \"0\", looks like a header (pandas writes one for an unnamed Series): remove it, or write the labels with to_csv(index=False, header=False)"
        );
        // One too many after a first line `1`, or two too many: no guess.
        let err = labels("1\n1\n0\n1\n", Some(3)).unwrap_err().to_string();
        assert_eq!(err, "labels.txt: 4 labels, but the data has 3 rows");
        let err = labels("0\n1\n0\n1\n", Some(2)).unwrap_err().to_string();
        assert_eq!(err, "labels.txt: 4 labels, but the data has 2 rows");
        let err = labels("is_anomaly\n0\n1\n\n", Some(2))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "labels.txt: line 1: label \"is_anomaly\" is not 0 or 1, but every line after it is: the first line looks like a header: remove it (pandas: to_csv(index=False, header=False))"
        );
        // `pd.Series(y).to_csv()`: the index and a header, said so.
        let err = labels(",0\n0,1\n1,0\n", Some(2)).unwrap_err().to_string();
        assert_eq!(
            err,
            "labels.txt: line 1: label \",0\" is not 0 or 1: a label file holds one label per line, with no header and no index column (pandas: to_csv(index=False, header=False))"
        );
        // `pd.Series(y_float[1:]).to_csv(index=False)`: the count matches, the header `0`
        // is told from a first label by the decimals after it.
        let err = labels("0\n1.0\n0.0\n", Some(3)).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "labels.txt: line 1: the first line is \"0\" and every label after it a decimal"
            ),
            "{err}"
        );
        // A first label 0 over integer labels is a label (pandas' int Series is ambiguous).
        assert_eq!(labels("0\n1\n0\n", Some(3)).unwrap(), [0, 1, 0]);
        // A bad label further down is no header.
        let err = labels("label\n0\nx\n", None).unwrap_err().to_string();
        assert_eq!(err, "labels.txt: line 1: label \"label\" is not 0 or 1");
    }

    /// `--labels x.npz` reads the archive's `y`, as the harness does (it was read as text).
    #[test]
    fn an_npz_gives_its_array_y() {
        use super::super::npz::tests::{npy, stored_zip};
        let y: Vec<u8> = [0i64, 1, 1].iter().flat_map(|v| v.to_le_bytes()).collect();
        let x: Vec<u8> = [0.5f64; 3].iter().flat_map(|v| v.to_le_bytes()).collect();
        let zip = stored_zip(&[
            ("X.npy", npy("<f8", "(3, 1)", &x)),
            ("y.npy", npy("<i8", "(3,)", &y)),
        ]);
        for name in ["t.npz", "noext"] {
            assert_eq!(
                parse_labels(Path::new(name), &zip, Some(3)).unwrap(),
                [0, 1, 1]
            );
        }
        let err = parse_labels(Path::new("t.npz"), &zip, Some(4))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "t.npz: 3 labels, but the data has 4 rows");
        let zip = stored_zip(&[("X.npy", npy("<f8", "(3, 1)", &x))]);
        let err = parse_labels(Path::new("t.npz"), &zip, None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "t.npz: the archive has no member y.npy (its members: X.npy)"
        );
    }

    /// An `.npy` label vector (as numpy writes `y.astype(...)`) reads like the text file,
    /// with errors that name the element; text keeps its line-numbered errors.
    #[test]
    fn reads_npy_label_vectors_of_any_integer_bool_or_float_dtype() {
        use super::super::npy::tests::npy_bytes;
        let npy = |descr: &str, shape: &str, data: &[u8]| {
            let h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
            npy_bytes(1, &h, data)
        };
        let parse = |bytes: &[u8], expected| parse_labels(Path::new("y.npy"), bytes, expected);
        let want = [0u8, 1, 1, 0];
        let f32s: Vec<u8> = [0.0f32, 1.0, 1.0, 0.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let i64s: Vec<u8> = [0i64, 1, 1, 0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let f16s: Vec<u8> = [0.0f32, 1.0, 1.0, 0.0]
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        // A damaged header in a file named .npy gets the NPY parser's error.
        let mut damaged = npy("<i8", "(4,)", &i64s);
        damaged[0] = b'x';
        let e = parse(&damaged, Some(4)).unwrap_err().to_string();
        assert!(e.contains("NUMPY") && !e.contains("UTF-8"), "{e}");
        for bytes in [
            npy("|u1", "(4, 1)", &want),
            npy("<i8", "(4,)", &i64s),
            npy("<f4", "(4,)", &f32s),
            npy("<f2", "(4,)", &f16s),
        ] {
            assert_eq!(parse(&bytes, Some(4)).unwrap(), want);
        }
        for (bytes, expected, msg) in [
            (
                npy("<i8", "(4,)", &i64s),
                Some(5),
                "y.npy: 4 labels, but the data has 5 rows",
            ),
            (
                npy("<i4", "(2,)", &[0, 0, 0, 0, 2, 0, 0, 0]),
                None,
                "y.npy: element 1 (0-based): label 2 is not 0 or 1",
            ),
            (
                npy("<f4", "(1,)", &0.5f32.to_le_bytes()),
                None,
                "y.npy: element 0 (0-based): label 0.5 is not 0 or 1",
            ),
            (
                npy("|u1", "(2, 2)", &want),
                None,
                "y.npy: labels must be a vector, one per row ([n] or [n, 1]), found shape [2, 2]",
            ),
            (
                npy("|u1", "(1, 2, 2)", &want),
                None,
                "y.npy: labels must be a vector, one per row ([n] or [n, 1]), found shape [1, 2, 2]",
            ),
            (
                npy("<f4", "(1,)", &f32::NAN.to_le_bytes()),
                None,
                "y.npy: row 0, column 0 (0-based): NaN/Inf is not allowed",
            ),
            (
                npy("<i4", "(4,)", &want),
                None,
                "y.npy: truncated: header says 4×1 int32 (16 bytes of data) but the file has 4 bytes of data",
            ),
        ] {
            assert_eq!(parse(&bytes, expected).unwrap_err().to_string(), msg);
        }
    }

    #[test]
    fn reads_interpretation_segments() {
        let s = segments("246-252:1,2,3\r\n2884-2888:6\n\n").unwrap();
        assert_eq!(
            s,
            [
                Segment {
                    start: 246,
                    end: 251,
                    dims: vec![0, 1, 2]
                },
                Segment {
                    start: 2884,
                    end: 2887,
                    dims: vec![5]
                },
            ]
        );
        assert_eq!(s[0].len(), 6);
        assert!(s[0].contains(251) && !s[0].contains(252) && !s[0].contains(245));
        assert!(segments("").unwrap().is_empty());
    }

    #[test]
    fn interpretation_errors_name_the_line() {
        for (text, want) in [
            (
                "1-5:1\nabc\n",
                "interp.txt: line 2: expected \"start-end:dim,dim,...\", found \"abc\"",
            ),
            (
                "5-5:1\n",
                "interp.txt: line 1: segment 5-5 is empty or reversed",
            ),
            (
                "7-5:1\n",
                "interp.txt: line 1: segment 7-5 is empty or reversed",
            ),
            (
                "1-5:1,0\n",
                "interp.txt: line 1: dim \"0\" is not a 1-based index",
            ),
            (
                "1-5:\n",
                "interp.txt: line 1: dim \"\" is not a 1-based index",
            ),
            (
                "1-5:1\n1-3:1,1\n",
                "interp.txt: line 2: dim 1 is listed twice",
            ),
            ("1-3:4,2, 4\n", "interp.txt: line 1: dim 4 is listed twice"),
            (
                "1-5\n",
                "interp.txt: line 1: expected \"start-end:dim,dim,...\", found \"1-5\"",
            ),
            (
                "-1-5:2\n",
                "interp.txt: line 1: expected \"start-end:dim,dim,...\", found \"-1-5:2\"",
            ),
            (
                "1-99999999999999999999999:2\n",
                "interp.txt: line 1: expected \"start-end:dim,dim,...\", found \"1-99999999999999999999999:2\"",
            ),
        ] {
            assert_eq!(segments(text).unwrap_err().to_string(), want, "{text:?}");
        }
    }

    /// `replay --interpretation` checks each segment against the model and the input, and
    /// names the line.
    #[test]
    fn interpretation_labels_beyond_the_model_or_the_input_name_the_line() {
        let within = |text: &str| {
            parse_interpretation_labels_within(
                Path::new("interp.txt"),
                text.as_bytes(),
                Some(SegmentBounds {
                    features: 38,
                    rows: 2000,
                }),
            )
        };
        assert_eq!(within("1-2000:1,38\n").unwrap().len(), 1);
        for (text, want) in [
            (
                "1-5:1\n\n7-9:2,39\n",
                "interp.txt: line 3: dim 39 is out of range: the model has 38 features (dims are 1-based, 1 to 38)",
            ),
            (
                "1-5:1\n1990-2001:4\n",
                "interp.txt: line 2: segment 1990-2001 runs past the input's 2000 rows (a segment a-b covers the 1-based rows a+1 to b, so b may be at most 2000)",
            ),
            // Malformed lines are told as without bounds.
            (
                "1-5:1\n5-x:2\n",
                "interp.txt: line 2: expected \"start-end:dim,dim,...\", found \"5-x:2\"",
            ),
        ] {
            assert_eq!(within(text).unwrap_err().to_string(), want, "{text:?}");
        }
        // Without bounds the same lines are read.
        assert!(segments("1-5:1\n\n7-9:2,39\n").is_ok());
    }

    #[test]
    fn bundled_interpretation_labels_agree_with_point_labels() {
        let points = read_labels(&smd("machine-1-6_test_label.txt"), Some(23689)).unwrap();
        assert_eq!(points.iter().filter(|&&l| l == 1).count(), 3708);
        let segs =
            read_interpretation_labels(&smd("machine-1-6_interpretation_label.txt")).unwrap();
        assert_eq!(segs.len(), 30);
        let mut from_segments = vec![0u8; points.len()];
        for s in &segs {
            assert!(s.dims.iter().all(|&d| d < 38));
            from_segments[s.start..=s.end].fill(1);
        }
        assert_eq!(from_segments, points);
        let small = read_labels(&smd("small_labels.txt"), Some(2000)).unwrap();
        assert_eq!(small, points[4000..6000]);
        assert_eq!(small.iter().filter(|&&l| l == 1).count(), 420);
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Fuzz(42);
        let alphabet = b"0123456789-:,. \r\n\xffa";
        for _ in 0..3000 {
            let bytes: Vec<u8> = (0..rng.below(40))
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect();
            let _ = parse_labels(Path::new("l"), &bytes, Some(rng.below(4)));
            let _ = parse_interpretation_labels(Path::new("i"), &bytes);
        }
    }
}
