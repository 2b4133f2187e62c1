//! CSV tables: a header of feature names, comma-separated numeric rows, and an optional
//! timestamp column.
//!
//! Tolerated: a UTF-8 BOM, `\r\n` line ends, spaces around fields, simple double-quoted
//! fields (`"a,b"`, `"1.5"`, with `""` for a quote; no line breaks inside quotes), a
//! trailing comma on a line, blank trailing lines, and semicolons or tabs instead of
//! commas when the header line has no comma (or Excel's `sep=;` line names one). Rejected, with the line and column: blank
//! lines between rows, rows with the wrong number of fields, non-numbers (a decimal comma
//! is named as such), NaN/Inf, values that overflow float32, duplicate or empty column
//! names, UTF-16 text. [`read_csv_with_gaps`] instead reads a gap (an empty
//! cell, `NaN`, `Inf`, `null`, `NA`, `N/A`) in a feature column as NaN, for its caller
//! to fill ([`crate::replay::fill_gaps`]). Timestamps out of time order (a row earlier
//! than, or as early as, the row before) are read in file order, with one warning.

use std::path::Path;

use ndarray::Array2;

use super::time::{Stamp, epoch_divisor, parse_stamp};
use super::{IngestError, Table, TableOptions, TextPos, line_str, lines, read_bytes};

/// Header names that are taken as the timestamp column when none is configured.
pub const AUTO_TIMESTAMP_NAMES: &[&str] = &["timestamp", "time", "ts"];

/// Read a CSV table.
///
/// # Errors
/// [`IngestError`] naming the file and, for content errors, the line and column:
/// `Io`, `Empty`, `NoRows`, `NoFeatures`, `NotUtf8`, `Syntax`, `FieldCount`,
/// `DuplicateColumn`, `MissingTimestampColumn`, `AmbiguousTimestampColumn`,
/// `NotANumber`, `BadTimestamp`, `NonFinite`, `OutOfRange`.
pub fn read_csv(path: &Path, opts: &TableOptions) -> Result<Table, IngestError> {
    let bytes = read_bytes(path)?;
    parse_csv(path, &bytes, opts)
}

/// Parse CSV bytes already in memory; `path` is only used in error messages.
///
/// # Errors
/// As [`read_csv`], minus `Io`.
pub fn parse_csv(path: &Path, bytes: &[u8], opts: &TableOptions) -> Result<Table, IngestError> {
    parse(path, bytes, opts, false)
}

/// As [`read_csv`], but a gap in a feature column (an empty cell, `NaN`, `Inf`, `null`,
/// `NA` or `N/A`, any case) is read as NaN instead of refusing the file: telemetry exports
/// have gaps. The table's values are then not all finite: fill them before use
/// ([`crate::replay::fill_gaps`]). Text that is no number, and numbers beyond float32,
/// are still errors.
///
/// # Errors
/// As [`read_csv`], without `NonFinite`.
pub fn read_csv_with_gaps(path: &Path, opts: &TableOptions) -> Result<Table, IngestError> {
    let bytes = read_bytes(path)?;
    parse_csv_with_gaps(path, &bytes, opts)
}

/// [`read_csv_with_gaps`] on bytes already in memory; `path` is only used in error messages.
///
/// # Errors
/// As [`read_csv_with_gaps`], minus `Io`.
pub fn parse_csv_with_gaps(
    path: &Path,
    bytes: &[u8],
    opts: &TableOptions,
) -> Result<Table, IngestError> {
    parse(path, bytes, opts, true)
}

/// Whether a field is a gap: no value at all, as exporters write one.
fn is_gap(field: &str) -> bool {
    const WORDS: &[&str] = &["null", "na", "n/a"];
    field.is_empty()
        || WORDS.iter().any(|w| field.eq_ignore_ascii_case(w))
        || field.parse::<f32>().is_ok_and(|v| v.is_nan())
        || (field.to_ascii_lowercase().contains("inf") && field.parse::<f32>().is_ok())
}

fn parse(path: &Path, bytes: &[u8], opts: &TableOptions, gaps: bool) -> Result<Table, IngestError> {
    let err_path = || path.to_owned();
    // A spreadsheet's "Unicode text" export: every other byte is zero, so line 1 would be
    // "not valid UTF-8" or a column name full of NULs.
    if bytes.starts_with(b"\xFF\xFE") || bytes.starts_with(b"\xFE\xFF") {
        return Err(IngestError::Syntax {
            path: err_path(),
            pos: TextPos::line(1),
            message: "the file is UTF-16 text: save it as UTF-8 (iconv -f UTF-16 -t UTF-8)".into(),
        });
    }
    let all: Vec<(usize, &[u8])> = lines(bytes).collect();
    // Blank trailing lines are tolerated; any other blank line is an error below.
    // A line of tabs is a row of gaps in a tab-separated file, not a blank line (a review).
    let last_nonblank = all
        .iter()
        .rposition(|(_, l)| !l.trim_ascii().is_empty() || l.contains(&b'\t'));
    let Some(last) = last_nonblank else {
        return Err(IngestError::Empty { path: err_path() });
    };
    let mut all = &all[..=last];
    // Excel's `sep=;` first line names the separator; the header follows it.
    // Only the line end and spaces are trimmed: `sep=` followed by a tab names the tab.
    let mut first = all[0].1.trim_ascii_start();
    while let [rest @ .., b'\r' | b' '] = first {
        first = rest;
    }
    let named_sep = match first {
        [b's', b'e', b'p', b'=', c] if all.len() > 1 && matches!(c, b',' | b';' | b'\t') => {
            all = &all[1..];
            Some(char::from(*c))
        }
        _ => None,
    };
    let (header_no, header_bytes) = all[0];
    if header_bytes.trim_ascii().is_empty() {
        return Err(IngestError::Syntax {
            path: err_path(),
            pos: TextPos::line(header_no),
            message: "the header line is blank".into(),
        });
    }
    let header_text = line_str(path, header_no, header_bytes)?;
    let sep = named_sep.unwrap_or_else(|| separator(header_text));
    let mut header = split_fields(path, header_no, header_text, sep)?;
    // A trailing comma on every line (some exporters write one) is an unnamed, empty last
    // column: dropped, with the empty last field of each row below.
    let trailing = header.len() > 1 && header.last().is_some_and(String::is_empty);
    if trailing {
        header.pop();
    }
    // pandas' `to_csv()` keeps the index unless told `index=False`: an unnamed first
    // column, or `Unnamed: 0` once such a file is read back and written again (the row
    // counter then became a feature). It is skipped when its values are the row numbers
    // 0, 1, 2, … (checked row by row below); any other value there is an error that says so.
    let index_col = header.len() > 1
        && (header[0].is_empty() || header[0] == PANDAS_INDEX_NAME)
        && header[1..].iter().all(|n| !n.is_empty());
    let index_is = if index_col && !header[0].is_empty() {
        "is named \"Unnamed: 0\" (pandas' name for an unnamed index read back)"
    } else {
        "has an empty name"
    };
    let names = &header[usize::from(index_col)..];
    // A file without a header would lose its first row to it and train on features named
    // after numbers (checked first: such a row often repeats a value, a duplicate name).
    // pandas' default names, exactly 0, 1, …, d−1 with d ≥ 2, are a header: a data row that
    // counts up from 0 is implausible, but a single 0 is a plausible first value, unless an
    // index column comes before it (`pd.Series(x).to_csv()` writes `,0`).
    let pandas_names = is_pandas_default_header(names) || (index_col && names == ["0"]);
    if names.iter().all(|n| n.trim().parse::<f64>().is_ok()) && !pandas_names {
        let single_zero = names.len() == 1 && names[0] == "0";
        return Err(IngestError::Syntax {
            path: err_path(),
            pos: TextPos::line(header_no),
            message: format!(
                "the header line holds only numbers: the first line must name the columns (feature names, and a timestamp column if any): add a header line{}",
                if single_zero {
                    " (a lone \"0\" is pandas' name for an unnamed column, but is also a plausible first value, so it is not taken as one)"
                } else {
                    ""
                }
            ),
        });
    }
    for (i, name) in header.iter().enumerate() {
        if name.is_empty() && !(index_col && i == 0) {
            let hint = if i == 0 {
                ": an unnamed first column is usually a pandas index (write the file with to_csv(index=False))"
            } else {
                ""
            };
            return Err(IngestError::Syntax {
                path: err_path(),
                pos: TextPos::line(header_no),
                message: format!("column {} has an empty name{hint}", i + 1),
            });
        }
        if let Some(j) = header[..i].iter().position(|n| n == name) {
            return Err(IngestError::DuplicateColumn {
                path: err_path(),
                name: name.clone(),
                first: j + 1,
                second: i + 1,
            });
        }
    }
    let ts_col = timestamp_column(path, &header, opts)?;
    // The columns read as features: every other column, or only those wanted when the
    // header names them all.
    let is_feature: Vec<bool> = {
        let all = (0..header.len()).map(|i| Some(i) != ts_col && !(index_col && i == 0));
        match &opts.features {
            Some(want)
                if !want.is_empty()
                    && want.iter().all(|w| {
                        header
                            .iter()
                            .enumerate()
                            .any(|(i, h)| h == w && Some(i) != ts_col)
                    }) =>
            {
                all.zip(&header)
                    .map(|(f, h)| f && want.contains(h))
                    .collect()
            }
            _ => all.collect(),
        }
    };
    let features: Vec<String> = header
        .iter()
        .zip(&is_feature)
        .filter(|&(_, &f)| f)
        .map(|(n, _)| n.clone())
        .collect();
    if features.is_empty() {
        return Err(IngestError::NoFeatures { path: err_path() });
    }
    warn_label_columns(path, &features);
    // Columns left out because a model does not use them: said once, since a column the
    // model should have had (renamed, say) would otherwise vanish without a word.
    let skipped: Vec<&String> = header
        .iter()
        .enumerate()
        .filter(|&(i, _)| !is_feature[i] && Some(i) != ts_col && !(index_col && i == 0))
        .map(|(_, h)| h)
        .collect();
    if !skipped.is_empty() {
        tracing::warn!(
            "{}: {} not among the model's features, skipped: {}",
            path.display(),
            if skipped.len() == 1 {
                "1 column is".to_owned()
            } else {
                format!("{} columns are", skipped.len())
            },
            super::name_list(&skipped, 4)
        );
    }

    let width = header.len();
    let ts_name = ts_col.map(|i| header[i].as_str());
    let mut values: Vec<f32> = Vec::with_capacity(features.len() * (all.len() - 1));
    let mut stamps: Vec<Stamp> = Vec::new();
    // The line of each row, for the warning about time order.
    let mut stamp_lines: Vec<usize> = Vec::new();
    let mut fields: Vec<String> = Vec::with_capacity(width);
    for (row, &(line_no, raw)) in all[1..].iter().enumerate() {
        // With one column an empty cell is an empty line: a gap, when gaps are allowed
        // (blank lines at the end of the file are its end, not gaps).
        if gaps && width == 1 && raw.trim_ascii().is_empty() {
            if is_feature[0] {
                values.push(f32::NAN);
            }
            continue;
        }
        // A row of empty cells of a tab-separated file is its tabs, not a blank line.
        if raw.trim_ascii().is_empty() && !(sep == '\t' && raw.contains(&b'\t')) {
            return Err(IngestError::Syntax {
                path: err_path(),
                pos: TextPos::line(line_no),
                message: "blank line between data rows".into(),
            });
        }
        let text = line_str(path, line_no, raw)?;
        split_fields_into(path, line_no, text, sep, &mut fields)?;
        // A trailing comma: one more field than the header names, and an empty one.
        if fields.len() == width + 1 && fields.last().is_some_and(String::is_empty) {
            fields.pop();
        }
        if fields.len() != width {
            return Err(IngestError::FieldCount {
                path: err_path(),
                line: line_no,
                expected: width,
                found: fields.len(),
            });
        }
        for (col, field) in fields.iter().enumerate() {
            let pos = || TextPos::cell(line_no, &header[col]);
            if index_col && col == 0 {
                if field.parse::<usize>().ok() != Some(row) {
                    return Err(IngestError::Syntax {
                        path: err_path(),
                        pos: TextPos::line(line_no),
                        message: format!(
                            "column 1 {index_is} and holds {:?}, not the row number {row}: an unnamed first column is usually a pandas index (write the file with to_csv(index=False)); name it if it is data (timestamp, time or ts if it holds the times)",
                            super::Clipped(field)
                        ),
                    });
                }
            } else if Some(col) == ts_col {
                let t = parse_stamp(field).ok_or_else(|| IngestError::BadTimestamp {
                    path: err_path(),
                    pos: pos(),
                    value: field.clone(),
                })?;
                stamps.push(t);
                stamp_lines.push(line_no);
            } else if is_feature[col] {
                if gaps && is_gap(field) {
                    values.push(f32::NAN);
                } else {
                    values.push(parse_value(path, field, pos, ts_name, gaps)?);
                }
            }
        }
    }
    let rows = all.len() - 1;
    if rows == 0 {
        return Err(IngestError::NoRows { path: err_path() });
    }
    let values = Array2::from_shape_vec((rows, features.len()), values)
        .expect("every row contributed exactly one value per feature");
    if index_col {
        tracing::warn!(
            "{}: column 1 {} and holds the row numbers 0, 1, 2, …: a pandas index (to_csv without index=False), skipped, not read as a feature",
            path.display(),
            if header[0].is_empty() {
                "has no name"
            } else {
                index_is
            }
        );
    }
    // Plain numbers take one unit for the whole column, from the largest of them.
    let largest = stamps.iter().fold(0.0f64, |m, s| match s {
        Stamp::Number(x) => m.max(x.abs()),
        Stamp::Seconds(_) => m,
    });
    let divisor = epoch_divisor(largest);
    let timestamps: Vec<f64> = stamps
        .iter()
        .map(|s| match *s {
            Stamp::Number(x) => x / divisor,
            Stamp::Seconds(t) => t,
        })
        .collect();
    warn_out_of_order(path, &timestamps, &stamp_lines);
    Ok(Table {
        path: path.to_owned(),
        features,
        timestamps: ts_col.map(|_| timestamps),
        values,
    })
}

/// The name pandas gives an unnamed first column (the index of a `to_csv()` without
/// `index=False`) when the file is read back with `read_csv`.
const PANDAS_INDEX_NAME: &str = "Unnamed: 0";

/// Whether header names are pandas' default column names: exactly `0, 1, …, d−1`, d ≥ 2.
fn is_pandas_default_header(names: &[String]) -> bool {
    names.len() >= 2 && names.iter().enumerate().all(|(i, n)| *n == i.to_string())
}

/// Column names that usually hold the ground truth, not a measurement (compared in any
/// case). Short on purpose: `y` is left out (an accelerometer's x, y, z), as are names
/// that merely contain one of these (`attack_surface_bytes`).
pub const LABEL_COLUMN_NAMES: &[&str] = &[
    "label",
    "labels",
    "is_anomaly",
    "anomaly",
    "attack",
    "outlier",
    "target",
    "class",
];

/// Whether a column name is one of [`LABEL_COLUMN_NAMES`], in any case.
fn is_label_name(name: &str) -> bool {
    LABEL_COLUMN_NAMES
        .iter()
        .any(|n| name.trim().eq_ignore_ascii_case(n))
}

/// Warns once when feature columns look like labels: a model that reads the answer as a
/// feature scores far better in a replay than it ever will on live data. Not refused: a
/// metric may carry such a name.
fn warn_label_columns(path: &Path, features: &[String]) {
    let found: Vec<&String> = features.iter().filter(|f| is_label_name(f)).collect();
    if found.is_empty() {
        return;
    }
    let names: Vec<String> = found
        .iter()
        .map(|f| format!("{:?}", super::Clipped(f)))
        .collect();
    tracing::warn!(
        "{}: column {} looks like labels, not a measurement, and is read as a feature: a model that sees the labels learns nothing useful (and a replay on the same file looks perfect). Drop it from the file (pandas: df.drop(columns=[{}])) and give the labels to replay with --labels",
        path.display(),
        names.join(", "),
        names.join(", ")
    );
}

/// The index of the timestamp column, if any.
fn timestamp_column(
    path: &Path,
    header: &[String],
    opts: &TableOptions,
) -> Result<Option<usize>, IngestError> {
    if let Some(name) = &opts.timestamp_column {
        return match header.iter().position(|h| h == name.trim()) {
            Some(i) => Ok(Some(i)),
            None => Err(IngestError::MissingTimestampColumn {
                path: path.to_owned(),
                name: name.clone(),
            }),
        };
    }
    let candidates: Vec<usize> = (0..header.len())
        .filter(|&i| {
            AUTO_TIMESTAMP_NAMES
                .iter()
                .any(|n| header[i].eq_ignore_ascii_case(n))
        })
        .collect();
    match candidates.as_slice() {
        [] => Ok(None),
        [i] => {
            // Said, because the column then is no feature: a metric that happens to be
            // called `time` would otherwise vanish from the model without a word.
            tracing::info!(
                "{}: column {:?} (column {}) taken as the timestamps, not as a feature (a header named timestamp, time or ts is; rename it to keep it as a feature, or name another with [input] timestamp_column)",
                path.display(),
                header[*i],
                i + 1
            );
            Ok(Some(*i))
        }
        _ => Err(IngestError::AmbiguousTimestampColumn {
            path: path.to_owned(),
            candidates: candidates
                .iter()
                .map(|&i| format!("{:?}", header[i]))
                .collect(),
        }),
    }
}

/// Rows out of time order: how many are earlier than the row before, the first of them,
/// how many repeat the row before's time, and the first of those (0-based row indices).
#[derive(Debug, Default, PartialEq, Eq)]
struct OrderBreaks {
    backwards: usize,
    first_backwards: Option<usize>,
    repeated: usize,
    first_repeated: Option<usize>,
}

fn order_breaks(timestamps: &[f64]) -> OrderBreaks {
    let mut b = OrderBreaks::default();
    for (i, w) in timestamps.windows(2).enumerate() {
        if w[1] < w[0] {
            b.backwards += 1;
            b.first_backwards.get_or_insert(i + 1);
        } else if w[1] == w[0] {
            b.repeated += 1;
            b.first_repeated.get_or_insert(i + 1);
        }
    }
    b
}

/// Warns once when the timestamps are not strictly increasing. Not refused: the rows are
/// still scored in file order (labels align by position), but score smoothing and lag
/// windows take the rows before a row as its past, which only holds in time order.
fn warn_out_of_order(path: &Path, timestamps: &[f64], lines: &[usize]) {
    let b = order_breaks(timestamps);
    let line = |i: Option<usize>| i.and_then(|i| lines.get(i)).copied().unwrap_or(0);
    let rows = |n: usize, one: &str, many: &str| match n {
        1 => format!("1 row {one}"),
        n => format!("{n} rows {many}"),
    };
    let mut parts = Vec::new();
    if b.backwards > 0 {
        parts.push(format!(
            "{} back in time (the first at line {})",
            rows(b.backwards, "goes", "go"),
            line(b.first_backwards)
        ));
    }
    if b.repeated > 0 {
        parts.push(format!(
            "{} the time of the row before (the first at line {})",
            rows(b.repeated, "repeats", "repeat"),
            line(b.first_repeated)
        ));
    }
    if !parts.is_empty() {
        tracing::warn!(
            "{}: timestamps are not in time order: {}. Rows are used in file order, but score smoothing and lag windows take the rows before a row as its past: sort the file by time if it should be in order.",
            path.display(),
            parts.join(", and ")
        );
    }
}

/// One numeric field as a finite float32 (parsed directly as `f32`, correctly rounded).
/// `timestamps` names the file's timestamp column, if it has one (for the hint on a date).
fn parse_value(
    path: &Path,
    field: &str,
    pos: impl Fn() -> TextPos,
    timestamps: Option<&str>,
    gaps: bool,
) -> Result<f32, IngestError> {
    match field.parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(v) => {
            // "1e39" parses to inf; only a spelled-out inf/nan is a NaN/Inf error.
            let lower = field.to_ascii_lowercase();
            if v.is_nan() || lower.contains("inf") {
                Err(IngestError::NonFinite {
                    path: path.to_owned(),
                    pos: pos(),
                })
            } else {
                Err(IngestError::OutOfRange {
                    path: path.to_owned(),
                    pos: pos(),
                    value: field.to_owned(),
                })
            }
        }
        // A date in a feature column: most likely the timestamp column under another name.
        // A date in a feature column: most likely the timestamp column under another name,
        // unless the file has one already.
        Err(_) if matches!(parse_stamp(field), Some(Stamp::Seconds(_))) => {
            let how = match timestamps {
                None => {
                    "name this column timestamp, time or ts, or set [input] timestamp_column to it"
                        .to_owned()
                }
                Some(ts) => format!(
                    "the timestamps are column {:?}, so this one is read as a feature: drop it from the file, or set [input] timestamp_column to it if it holds the times instead",
                    super::Clipped(ts)
                ),
            };
            Err(IngestError::Syntax {
                path: path.to_owned(),
                pos: pos(),
                message: format!(
                    "value {:?} is a date, not a number: {how}",
                    super::Clipped(field)
                ),
            })
        }
        // Numbers separated by blanks: a space-separated file, read as one column.
        Err(_)
            if field.split_whitespace().count() > 1
                && field.split_whitespace().all(|v| v.parse::<f64>().is_ok()) =>
        {
            Err(IngestError::Syntax {
                path: path.to_owned(),
                pos: pos(),
                message: format!(
                    "value {:?} is several numbers: separate fields with commas (or semicolons or tabs), not spaces",
                    super::Clipped(field)
                ),
            })
        }
        // A decimal comma (a European export): said, not "not a number".
        Err(_) if field.contains(',') && field.replacen(',', ".", 1).parse::<f32>().is_ok() => {
            Err(IngestError::Syntax {
                path: path.to_owned(),
                pos: pos(),
                message: format!(
                    "value {:?} has a comma in a number (a decimal comma, or a thousands separator): write numbers with a decimal point and no separator ({})",
                    super::Clipped(field),
                    field.replacen(',', ".", 1)
                ),
            })
        }
        Err(_) => Err(IngestError::NotANumber {
            path: path.to_owned(),
            pos: pos(),
            value: field.to_owned(),
            hint: not_a_number_hint(field, gaps),
        }),
    }
}

/// Words that stand for a missing value in some exporter but are no gap here.
const GAP_LIKE: &[&str] = &[
    "none",
    "nil",
    "missing",
    "undefined",
    "nat",
    "#n/a",
    "n.a.",
    "na.",
    "-",
];

/// What to do about a cell that is no number: a missing value written in a way not
/// accepted (`None`, `?`) lists the spellings that are; text (`node01`) is a column to drop.
fn not_a_number_hint(field: &str, gaps: bool) -> &'static str {
    let gap_like = !field.chars().any(|c| c.is_alphanumeric())
        || GAP_LIKE.iter().any(|w| field.eq_ignore_ascii_case(w));
    match (gap_like, gaps) {
        (true, true) => GAP_HINT,
        (true, false) => "this reader takes no gaps: every cell must be a number",
        (false, _) => {
            "features must be numbers: drop the columns that hold text (a host name, a label) from the file (pandas: df.select_dtypes('number')); a timestamp column is recognised by its name (timestamp, time or ts) or [input] timestamp_column"
        }
    }
}

/// The spellings of a gap that the gap-reading reader accepts, for messages.
macro_rules! gap_spellings {
    () => {
        "an empty cell, NaN, Inf, null, NA or N/A (any case)"
    };
}
pub const GAP_SPELLINGS: &str = gap_spellings!();
const GAP_HINT: &str = concat!("a missing value is written as ", gap_spellings!());

/// The field separator, told from the header line: a comma, unless the header has none
/// and holds a semicolon (a spreadsheet's export where the comma is the decimal mark) or
/// a tab.
fn separator(header: &str) -> char {
    if header.contains(',') {
        ','
    } else if header.contains(';') {
        ';'
    } else if header.contains('\t') {
        '\t'
    } else {
        ','
    }
}

fn split_fields(
    path: &Path,
    line_no: usize,
    text: &str,
    sep: char,
) -> Result<Vec<String>, IngestError> {
    let mut out = Vec::new();
    split_fields_into(path, line_no, text, sep, &mut out)?;
    Ok(out)
}

/// Split one line at `sep` into trimmed, unquoted fields, reusing `out`'s allocation.
fn split_fields_into(
    path: &Path,
    line_no: usize,
    text: &str,
    sep: char,
    out: &mut Vec<String>,
) -> Result<(), IngestError> {
    // Blanks before a field are skipped; a tab is one unless it separates fields.
    let blank = |c: char| c == ' ' || (c == '\t' && sep != '\t');
    out.clear();
    let syntax = |message: &str| IngestError::Syntax {
        path: path.to_owned(),
        pos: TextPos::line(line_no),
        message: message.to_owned(),
    };
    let mut rest = text;
    loop {
        let field = rest.trim_start_matches(blank);
        if let Some(quoted) = field.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let after = loop {
                match chars.next() {
                    None => return Err(syntax("unterminated quoted field")),
                    Some((i, '"')) => {
                        if quoted[i + 1..].starts_with('"') {
                            value.push('"');
                            chars.next();
                        } else {
                            break &quoted[i + 1..];
                        }
                    }
                    Some((_, c)) => value.push(c),
                }
            };
            let after = after.trim_start_matches(blank);
            out.push(value.trim().to_owned());
            match after.strip_prefix(sep) {
                Some(next) => rest = next,
                None if after.is_empty() => return Ok(()),
                None => return Err(syntax("text after a closing quote")),
            }
        } else {
            match field.find(sep) {
                Some(i) => {
                    out.push(field[..i].trim().to_owned());
                    rest = &field[i + sep.len_utf8()..];
                }
                None => {
                    out.push(field.trim().to_owned());
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{npy, read_table};
    use super::*;

    fn parse(text: &str) -> Result<Table, IngestError> {
        parse_csv(
            Path::new("data.csv"),
            text.as_bytes(),
            &TableOptions::default(),
        )
    }

    fn parse_err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    /// The hint after a text cell's "is not a number".
    const TEXT: &str = ": features must be numbers: drop the columns that hold text (a host name, a label) from the file (pandas: df.select_dtypes('number')); a timestamp column is recognised by its name (timestamp, time or ts) or [input] timestamp_column";

    fn gappy(text: &str) -> Result<Table, IngestError> {
        parse_csv_with_gaps(
            Path::new("g.csv"),
            text.as_bytes(),
            &TableOptions::default(),
        )
    }

    /// `pd.DataFrame(X).to_csv(index=False)` names the columns 0, 1, …, d−1: that header
    /// was refused as "holds only numbers". A lone `0` is still refused (a plausible first
    /// value), as is any other all-number line, and the message now says what to do.
    #[test]
    fn pandas_default_column_names_are_a_header() {
        let t = parse(
            "0,1,2
0.5,1,2
0.25,3,4
",
        )
        .unwrap();
        assert_eq!(t.features, ["0", "1", "2"]);
        assert_eq!(t.values, ndarray::array![[0.5, 1.0, 2.0], [0.25, 3.0, 4.0]]);
        for text in [
            "1,2,3
4,5,6
",
            "0,2,1
4,5,6
",
            "0
1
",
        ] {
            let err = parse_err(text);
            assert!(
                err.contains("holds only numbers") && err.contains("add a header line"),
                "{err}"
            );
        }
        assert!(
            parse_err(
                "0
1
"
            )
            .contains("pandas' name for an unnamed column")
        );
    }

    /// `to_csv()` with its default `index=True` writes an unnamed first column of row
    /// numbers: skipped (with a warning). Any other unnamed first column is refused with
    /// the hint, as is a first column whose values are not 0, 1, 2, ….
    #[test]
    fn a_pandas_index_column_is_skipped_and_any_other_unnamed_first_column_explained() {
        let t = parse(
            ",a,b
0,1.5,2
1,3,4
2,5,6
",
        )
        .unwrap();
        assert_eq!(t.features, ["a", "b"]);
        assert_eq!(
            t.values,
            ndarray::array![[1.5, 2.0], [3.0, 4.0], [5.0, 6.0]]
        );
        // pandas' defaults on both axes.
        let t = parse(
            ",0,1
0,7,8
1,9,10
",
        )
        .unwrap();
        assert_eq!(t.features, ["0", "1"]);
        assert_eq!(t.values, ndarray::array![[7.0, 8.0], [9.0, 10.0]]);
        let err = parse_err(
            ",a,b
0,1,2
5,3,4
",
        );
        assert!(
            err.starts_with(
                "data.csv: line 3: column 1 has an empty name and holds \"5\", not the row number 1"
            ) && err.contains("to_csv(index=False)"),
            "{err}"
        );
        let err = parse_err(
            ",a
2024-01-01,1
",
        );
        assert!(err.contains("timestamp, time or ts"), "{err}");
        // pandas' `pd.read_csv(f).to_csv(g, index=False)`: the old index is `Unnamed: 0`,
        // skipped as the empty-named one is; not the row numbers, refused with the hint.
        let t = parse(
            "Unnamed: 0,0,1,2
0,1,2,3
1,4,5,6
",
        )
        .unwrap();
        assert_eq!(t.features, ["0", "1", "2"]);
        assert_eq!(t.values, ndarray::array![[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]);
        let err = parse_err(
            "Unnamed: 0,a
0,1
7,2
",
        );
        assert!(
            err.starts_with("data.csv: line 3: column 1 is named \"Unnamed: 0\" (pandas' name for an unnamed index read back) and holds \"7\", not the row number 1")
                && err.contains("to_csv(index=False)"),
            "{err}"
        );
        // `pd.Series(x).to_csv()`: an index, then pandas' lone `0`.
        for header in ["", "Unnamed: 0"] {
            let t = parse(&format!("{header},0\n0,0.5\n1,0.25\n")).unwrap();
            assert_eq!(t.features, ["0"]);
            assert_eq!(t.values, ndarray::array![[0.5], [0.25]]);
        }
        // Two unnamed columns are no index: the first still gets the hint.
        let err = parse_err(
            ",,b
0,1,2
",
        );
        assert!(
            err.ends_with("column 1 has an empty name: an unnamed first column is usually a pandas index (write the file with to_csv(index=False))"),
            "{err}"
        );
    }

    /// A cell such as `None` or `?` said only "is not a number"; a text column only named
    /// itself. Now the message lists the gap spellings, or says to drop text columns.
    #[test]
    fn not_a_number_says_how_to_write_a_gap_or_to_drop_a_text_column() {
        for v in ["None", "?", "--", "missing"] {
            let err = gappy(&format!("a,b\n1,2\n3,{v}\n"))
                .unwrap_err()
                .to_string();
            assert_eq!(
                err,
                format!(
                    "g.csv: line 3, column \"b\": value {v:?} is not a number: a missing value is written as {GAP_SPELLINGS}"
                )
            );
        }
        // Each spelling listed is read as a gap.
        let t = gappy("a,b\n1,\n1,NaN\n1,Inf\n1,null\n1,NA\n1,N/A\n").unwrap();
        assert!(t.values.column(1).iter().all(|v| v.is_nan()));
        let err = gappy("a,host\n1,node01\n").unwrap_err().to_string();
        assert_eq!(
            err,
            format!("g.csv: line 2, column \"host\": value \"node01\" is not a number{TEXT}")
        );
    }

    #[test]
    fn label_column_names_are_matched_in_any_case_and_exactly() {
        let hit = is_label_name;
        assert!(hit("Label") && hit("IS_ANOMALY") && hit(" attack "));
        assert!(!hit("y") && !hit("labelled_bytes") && !hit("cpu"));
    }

    #[test]
    fn reads_a_plain_table() {
        let t = parse("a,b,c\n1,2,3\n4.5,-6e-1,0\n").unwrap();
        assert_eq!(t.features, ["a", "b", "c"]);
        assert_eq!(t.timestamps, None);
        assert_eq!(t.values, ndarray::array![[1.0, 2.0, 3.0], [4.5, -0.6, 0.0]]);
        assert_eq!(t.path, Path::new("data.csv"));
    }

    #[test]
    fn a_file_without_a_header_is_refused_not_read_with_numbers_for_names() {
        let err = parse_err("0.5,1,2,1\n0.6,1,3,1\n");
        assert!(err.contains("data.csv") && err.contains("line 1"), "{err}");
        assert!(err.contains("holds only numbers"), "{err}");
        // One named column is enough to make a header.
        assert_eq!(parse("t,1,2\n5,6,7\n").unwrap().features, ["t", "1", "2"]);
    }

    #[test]
    fn tolerates_bom_crlf_spaces_quotes_and_trailing_blank_lines() {
        let text = "\u{feff} \"cpu, total\" , mem ,\"say \"\"hi\"\"\"\r\n 1 ,\" 2 \", 3\r\n4,5,6\r\n\r\n  \r\n\n";
        let t = parse(text).unwrap();
        assert_eq!(t.features, ["cpu, total", "mem", "say \"hi\""]);
        assert_eq!(t.values, ndarray::array![[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]);
        // No final newline at all.
        assert_eq!(parse("a\n1").unwrap().values, ndarray::array![[1.0]]);
    }

    #[test]
    fn auto_detects_timestamp_column_and_drops_it_from_features() {
        for name in ["timestamp", "Time", "TS"] {
            let t = parse(&format!(
                "cpu,{name}\n1,1700000000\n2,2023-11-14 22:14:20\n"
            ))
            .unwrap();
            assert_eq!(t.features, ["cpu"]);
            assert_eq!(t.timestamps, Some(vec![1_700_000_000.0, 1_700_000_060.0]));
            assert_eq!(t.values, ndarray::array![[1.0], [2.0]]);
        }
        // Not exact names: features.
        let t = parse("timestamps,time_s\n1,2\n").unwrap();
        assert_eq!(t.features, ["timestamps", "time_s"]);
        assert!(t.timestamps.is_none());
    }

    #[test]
    fn a_timestamp_column_takes_one_unit_from_its_largest_number() {
        // Milliseconds and nanoseconds since the epoch, by size.
        let t = parse("timestamp,a\n1700000000000,1\n1700000060500,2\n").unwrap();
        assert_eq!(t.timestamps, Some(vec![1_700_000_000.0, 1_700_000_060.5]));
        let t = parse("timestamp,a\n1700000000000000000,1\n").unwrap();
        assert_eq!(t.timestamps, Some(vec![1_700_000_000.0]));
        // A counter that crosses 1e11 keeps its order: the whole column is milliseconds.
        let t = parse("timestamp,a\n99999999000,1\n100000001000,2\n").unwrap();
        assert_eq!(t.timestamps, Some(vec![99_999_999.0, 100_000_001.0]));
        // Seconds stay seconds, and dates are not rescaled by a column's numbers.
        let t = parse("timestamp,a\n2023-11-14T22:13:20Z,1\n1700000000000,2\n").unwrap();
        assert_eq!(t.timestamps, Some(vec![1_700_000_000.0, 1_700_000_000.0]));
    }

    /// A replay names the model's features: other columns, text ones included, are skipped
    /// unread, but only when every wanted name is a column.
    #[test]
    fn columns_a_model_does_not_use_are_skipped_unread() {
        let bytes = b"ts,host,b,a,note\n1,node7,2,1,\"ok, fine\"\n2,node7,4,3,x\n";
        let want = TableOptions {
            features: Some(vec!["a".into(), "b".into()]),
            ..TableOptions::default()
        };
        let t = parse_csv(Path::new("x.csv"), bytes, &want).unwrap();
        assert_eq!(t.features, ["b", "a"]);
        assert_eq!(t.values.row(1).to_vec(), [4.0, 3.0]);
        assert_eq!(t.timestamps, Some(vec![1.0, 2.0]));
        // Without the option, or when a wanted name is missing, the text column is read
        // and refused, naming it.
        for opts in [
            TableOptions::default(),
            TableOptions {
                features: Some(vec!["a".into(), "c".into()]),
                ..TableOptions::default()
            },
        ] {
            let err = parse_csv(Path::new("x.csv"), bytes, &opts)
                .unwrap_err()
                .to_string();
            assert!(err.contains("host"), "{err}");
        }
        // The timestamp column is never a feature, even when a model names it.
        let ts = TableOptions {
            features: Some(vec!["ts".into(), "a".into()]),
            ..TableOptions::default()
        };
        assert!(parse_csv(Path::new("x.csv"), bytes, &ts).is_err());
    }

    #[test]
    fn named_timestamp_column() {
        let opts = TableOptions {
            timestamp_column: Some("when".into()),
            ..TableOptions::default()
        };
        let t = parse_csv(
            Path::new("x.csv"),
            b"when,ts\n2023-11-14T22:13:20Z,5\n",
            &opts,
        )
        .unwrap();
        assert_eq!(t.features, ["ts"]);
        assert_eq!(t.timestamps, Some(vec![1_700_000_000.0]));
        let err = parse_csv(Path::new("x.csv"), b"a,b\n1,2\n", &opts).unwrap_err();
        assert_eq!(
            err.to_string(),
            "x.csv: timestamp column \"when\" is not in the header"
        );
    }

    #[test]
    fn ambiguous_or_bad_timestamps_are_errors() {
        let msg = parse_err("time,ts,a\n1,2,3\n");
        assert!(
            msg.contains("several columns could be the timestamp"),
            "{msg}"
        );
        assert_eq!(
            parse_err("timestamp,a\n1,2\nyesterday,3\n"),
            "data.csv: line 3, column \"timestamp\": value \"yesterday\" is not a timestamp \
             (epoch seconds, RFC 3339, or an ISO 8601 date or date-time such as 2024-03-01 or \
             2024-03-01 12:00[:00[.fff]], UTC unless it has an offset)"
        );
        assert!(parse_err("ts,a\nnan,1\n").contains("line 2, column \"ts\""));
    }

    #[test]
    fn position_is_named_for_bad_values() {
        assert_eq!(
            parse_err("cpu,mem\n1,2\n3,abc\n"),
            format!("data.csv: line 3, column \"mem\": value \"abc\" is not a number{TEXT}")
        );
        assert_eq!(
            parse_err("cpu,mem\n1,2\n3,\n"),
            "data.csv: line 3, column \"mem\": value \"\" is not a number: this reader takes no gaps: every cell must be a number"
        );
        assert_eq!(
            parse_err("cpu,mem\n1,2\n3\n"),
            "data.csv: line 3: expected 2 fields, found 1"
        );
        assert_eq!(
            parse_err("cpu,mem\n1,2,3\n"),
            "data.csv: line 2: expected 2 fields, found 3"
        );
        for bad in ["NaN", "nan", "inf", "-Infinity", "+inf"] {
            assert_eq!(
                parse_err(&format!("cpu,mem\n1,2\n3,4\n5,{bad}\n")),
                "data.csv: line 4, column \"mem\": NaN/Inf is not allowed"
            );
        }
        assert_eq!(
            parse_err("cpu\n1e39\n"),
            "data.csv: line 2, column \"cpu\": value \"1e39\" is out of range for float32"
        );
    }

    /// Telemetry exports have gaps: the whole file was refused over one NaN or empty cell.
    #[test]
    fn with_gaps_reads_empty_nan_inf_and_null_cells_as_nan() {
        let text = "ts,cpu,mem\n1,1,\n2,NaN,2\n3, inf ,-Infinity\n4,null,N/A\n5,na,5\n";
        let t = parse_csv_with_gaps(
            Path::new("g.csv"),
            text.as_bytes(),
            &TableOptions::default(),
        )
        .unwrap();
        assert_eq!(t.values.dim(), (5, 2), "rows are never dropped");
        let nan: Vec<(usize, usize)> = t
            .values
            .indexed_iter()
            .filter(|(_, v)| v.is_nan())
            .map(|(i, _)| i)
            .collect();
        assert_eq!(
            nan,
            [(0, 1), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (4, 0)]
        );
        assert_eq!((t.values[[0, 0]], t.values[[4, 1]]), (1.0, 5.0));
        // The strict reader still refuses them, and the lenient one still refuses text,
        // numbers beyond float32 and a gap in the timestamp column.
        assert!(parse_err(text).contains("line 2, column \"mem\""));
        assert!(parse_err("a\n1\nNaN\n").contains("NaN/Inf is not allowed"));
        let gappy = |t: &str| gappy(t).unwrap_err().to_string();
        assert_eq!(
            gappy("a\n1\nabc\n"),
            format!("g.csv: line 3, column \"a\": value \"abc\" is not a number{TEXT}")
        );
        assert!(gappy("a\n1e39\n").contains("out of range"));
        assert!(gappy("ts,a\n1,1\n,2\n").contains("not a timestamp"));
    }

    /// In a one-column file an empty cell is an empty line: a gap row, not a refusal,
    /// so the rows still line up with their labels. Blank lines at the end stay the end.
    #[test]
    fn with_gaps_an_empty_line_of_a_one_column_file_is_a_gap_row() {
        let read = |t: &str| {
            parse_csv_with_gaps(Path::new("g.csv"), t.as_bytes(), &TableOptions::default())
        };
        let t = read("value\n1\n\n3\n\n\n").unwrap();
        let v: Vec<f32> = t.values.iter().copied().collect();
        assert_eq!(v.len(), 3);
        assert_eq!((v[0], v[2]), (1.0, 3.0));
        assert!(v[1].is_nan());
        // The strict reader and wider files keep refusing a blank line between rows.
        assert!(parse_err("value\n1\n\n3\n").contains("blank line between data rows"));
        let two = read("a,b\n1,2\n\n3,4\n").unwrap_err().to_string();
        assert!(two.contains("blank line between data rows"), "{two}");
    }

    #[test]
    fn a_date_in_a_feature_column_says_how_to_make_it_the_timestamps() {
        assert_eq!(
            parse_err("date,cpu\n2024-03-01,1\n"),
            "data.csv: line 2, column \"date\": value \"2024-03-01\" is a date, not a number: \
             name this column timestamp, time or ts, or set [input] timestamp_column to it"
        );
        // With a timestamp column already there, naming this one `timestamp` would make
        // two: the hint says what is true instead.
        assert_eq!(
            parse_err("ts,date,cpu\n1700000000,2024-03-01,1\n"),
            "data.csv: line 2, column \"date\": value \"2024-03-01\" is a date, not a number: \
             the timestamps are column \"ts\", so this one is read as a feature: drop it from \
             the file, or set [input] timestamp_column to it if it holds the times instead"
        );
        let named = TableOptions {
            timestamp_column: Some("when".into()),
            ..TableOptions::default()
        };
        let err = parse_csv(
            Path::new("x.csv"),
            b"when,date,cpu\n1,2024-03-01T00:00:00Z,1\n",
            &named,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("the timestamps are column \"when\"") && !err.contains("name this column"),
            "{err}"
        );
        let opts = TableOptions {
            timestamp_column: Some("date".into()),
            ..TableOptions::default()
        };
        let t = parse_csv(
            Path::new("x.csv"),
            b"date,cpu\n2024-03-01,1\n2024-03-02,2\n",
            &opts,
        )
        .unwrap();
        assert_eq!(t.timestamps, Some(vec![1_709_251_200.0, 1_709_337_600.0]));
    }

    /// Exports from spreadsheets and other tools: a trailing comma on each line, quoted
    /// numbers, semicolons (with a decimal comma) or tabs between fields, UTF-16 text.
    #[test]
    fn reads_a_trailing_comma_quoted_numbers_semicolons_and_tabs() {
        let want = ndarray::array![[1.5, 2.0], [3.0, 4.0]];
        for text in [
            "a,b,\n1.5,2,\n3,4,\n",
            // Only the rows, or only the header, end with one.
            "a,b\n1.5,2,\n3,4\n",
            "a,b,\n1.5,2\n3,4\n",
            "\"a\",\"b\"\n\"1.5\",\"2\"\n\" 3 \",4\n",
            "a;b\n1.5;2\n3 ; 4\n",
            "a\tb\n1.5\t2\n3\t 4\n",
            "\u{feff}a;b;\r\n1.5;2;\r\n3;4;\r\n",
        ] {
            let t = parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(t.features, ["a", "b"], "{text:?}");
            assert_eq!(t.values, want, "{text:?}");
        }
        // A one-column file with a trailing comma, and its gaps.
        let t = parse_csv_with_gaps(
            Path::new("g.csv"),
            b"a,\n1,\n,\n3,\n",
            &TableOptions::default(),
        )
        .unwrap();
        assert_eq!(t.values.dim(), (3, 1));
        assert!(t.values[[1, 0]].is_nan());
        // An empty cell between tabs is a gap, not skipped over.
        let t = parse_csv_with_gaps(
            Path::new("g.tsv"),
            b"a\tb\tc\n1\t\t3\n\t\t\n4\t5\t6\n",
            &TableOptions::default(),
        )
        .unwrap();
        assert_eq!(t.values.dim(), (3, 3));
        assert_eq!(t.values[[0, 2]], 3.0);
        assert!(t.values[[0, 1]].is_nan() && t.values.row(1).iter().all(|v| v.is_nan()));
        // Also as the last row: it used to be dropped as a blank trailing line, leaving the
        // file a row short of its labels.
        let t = parse_csv_with_gaps(
            Path::new("g.tsv"),
            b"a\tb\n1\t2\n\t\n",
            &TableOptions::default(),
        )
        .unwrap();
        assert_eq!(t.values.dim(), (2, 2));
        assert!(t.values.row(1).iter().all(|v| v.is_nan()));
        // Excel's `sep=;` line names the separator (line numbers still count it).
        // A review: `sep=` and a tab used to lose the tab to the trimming.
        let tab = parse("sep=\t\r\na\tb\n1\t2\n").unwrap();
        assert_eq!(tab.features, ["a", "b"]);
        let t = parse("sep=;\na,b;c\n1;2\n").unwrap();
        assert_eq!(t.features, ["a,b", "c"]);
        assert_eq!(
            parse_err("sep=;\na;b\n1;x\n"),
            format!("data.csv: line 3, column \"b\": value \"x\" is not a number{TEXT}")
        );
        // A space-separated file is one column of text: said as such.
        assert_eq!(
            parse_err("a b\n1 2.5\n"),
            "data.csv: line 2, column \"a b\": value \"1 2.5\" is several numbers: separate \
             fields with commas (or semicolons or tabs), not spaces"
        );
        // A value under the trailing comma is a field too many, not dropped.
        assert_eq!(
            parse_err("a,b,\n1,2,3\n"),
            "data.csv: line 2: expected 2 fields, found 3"
        );
        // A decimal comma is named, whichever the separator.
        assert_eq!(
            parse_err("a;b\n1,5;2\n"),
            "data.csv: line 2, column \"a\": value \"1,5\" has a comma in a number (a decimal comma, or a thousands separator): write numbers \
             with a decimal point and no separator (1.5)"
        );
        assert!(parse_err("a,b\n\"1,5\",2\n").contains("has a comma in a number"));
        assert_eq!(
            parse_csv(
                Path::new("u.csv"),
                b"\xFF\xFEa\x00,\x00b\x00\n\x00",
                &TableOptions::default()
            )
            .unwrap_err()
            .to_string(),
            "u.csv: line 1: the file is UTF-16 text: save it as UTF-8 (iconv -f UTF-16 -t UTF-8)"
        );
    }

    #[test]
    fn order_breaks_counts_rows_that_go_back_or_repeat() {
        assert_eq!(order_breaks(&[1.0, 2.0, 3.0]), OrderBreaks::default());
        assert_eq!(order_breaks(&[]), OrderBreaks::default());
        assert_eq!(
            order_breaks(&[1.0, 3.0, 2.0, 2.0, 5.0, 4.0, 4.0]),
            OrderBreaks {
                backwards: 2,
                first_backwards: Some(2),
                repeated: 2,
                first_repeated: Some(3),
            }
        );
    }

    #[test]
    fn structural_errors() {
        assert_eq!(parse_err(""), "data.csv: empty file");
        assert_eq!(parse_err("\u{feff}\r\n \n"), "data.csv: empty file");
        assert_eq!(parse_err("a,b\n"), "data.csv: no data rows");
        assert_eq!(parse_err("a,b\r\n\r\n"), "data.csv: no data rows");
        assert_eq!(parse_err("ts\n1\n"), "data.csv: no feature columns");
        assert_eq!(
            parse_err("a,b,a\n1,2,3\n"),
            "data.csv: line 1: duplicate column name \"a\" (columns 1 and 3)"
        );
        assert_eq!(
            parse_err("a,,b\n1,2,3\n"),
            "data.csv: line 1: column 2 has an empty name"
        );
        assert_eq!(
            parse_err("a\n1\n\n2\n"),
            "data.csv: line 3: blank line between data rows"
        );
        assert_eq!(
            parse_err("\na\n1\n"),
            "data.csv: line 1: the header line is blank"
        );
        assert_eq!(
            parse_err("a,b\n1,\"2\n"),
            "data.csv: line 2: unterminated quoted field"
        );
        assert_eq!(
            parse_err("a,b\n1,\"2\"x\n"),
            "data.csv: line 2: text after a closing quote"
        );
        assert_eq!(
            parse_csv(
                Path::new("data.csv"),
                b"a\n1\n\xff\n",
                &TableOptions::default()
            )
            .unwrap_err()
            .to_string(),
            "data.csv: line 3: not valid UTF-8"
        );
    }

    #[test]
    fn bundled_small_csv_matches_the_npy_slice_exactly() {
        let t = read_table(&smd("small.csv"), &TableOptions::default()).unwrap();
        assert_eq!(t.values.dim(), (2000, 38));
        assert_eq!(t.features.first().map(String::as_str), Some("m01"));
        assert_eq!(t.features.last().map(String::as_str), Some("m38"));
        let ts = t.timestamps.as_ref().unwrap();
        assert_eq!(ts[0], 1_700_000_000.0);
        assert!(ts.windows(2).all(|w| w[1] - w[0] == 60.0));
        let full = npy::read_npy(&smd("machine-1-6_test.npy")).unwrap();
        assert_eq!(t.values, full.values.slice(ndarray::s![4000..6000, ..]));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Fuzz(0x5EED);
        let alphabet = b"01234,.\"\r\n e-+naifNT:Z \xEF\xBB\xBF\xff";
        let base = std::fs::read(smd("small.csv")).unwrap();
        let base = &base[..4000];
        for round in 0..3000 {
            let bytes: Vec<u8> = match round % 3 {
                0 => (0..rng.below(80))
                    .map(|_| alphabet[rng.below(alphabet.len())])
                    .collect(),
                1 => base[..rng.below(base.len())].to_vec(),
                _ => {
                    let mut b = base.to_vec();
                    for _ in 0..1 + rng.below(5) {
                        let i = rng.below(b.len());
                        b[i] = alphabet[rng.below(alphabet.len())];
                    }
                    b
                }
            };
            let opts = TableOptions {
                timestamp_column: (round % 7 == 0).then(|| "m01".into()),
                ..TableOptions::default()
            };
            let read = if round % 2 == 0 {
                parse_csv(Path::new("f.csv"), &bytes, &opts)
            } else {
                parse_csv_with_gaps(Path::new("f.csv"), &bytes, &opts)
            };
            if let Err(e) = read {
                let msg = e.to_string();
                assert!(msg.starts_with("f.csv: ") && !msg.contains('\n'), "{msg}");
            }
        }
    }
}
