//! File inputs: the tables that `train` fits on and `replay` scores, and their labels.
//!
//! Fed by paths from the command line or the config; feeds [`crate::train`] (a
//! [`Table`] of training rows), the replay source (rows in file order, with optional
//! timestamps) and [`crate::eval`] (point labels from [`read_labels`], anomaly segments
//! with the blamed metrics from [`read_interpretation_labels`]).
//!
//! Everything here is strict: a file given on the command line is either read
//! completely and finitely, or rejected with an [`IngestError`] whose message is one
//! line naming the file and the position (line and column for text, row and column
//! index for NPY). No input makes these readers panic. The one exception is asked for by
//! name: [`DataFile::table_with_gaps`] reads gaps (empty, NaN, Inf cells) as NaN for
//! `replay`, `demo` and `train` to fill. A file is read once ([`read_data_file`]), so a
//! pipe works as a file does.
//!
//! - [`csv`]: comma-separated tables with a header and an optional timestamp column.
//! - [`npy`]: NumPy `.npy` arrays (2-D, or rows with leading dimensions flattened; `<f2`/`<f4`/`<f8`
//!   or integer, C or Fortran order).
//! - [`labels`]: point labels (one 0/1 per line, or an `.npy` vector of 0/1) and SMD
//!   interpretation labels.
//! - [`examon`]: ExaMon MQTT messages (tags in the topic, `value;timestamp` payload) to samples.
//! - [`telegraf`]: Telegraf MQTT output (JSON or Influx line protocol) to samples.
//! - [`raw`]: raw MQTT frames of `d` little-endian `f32` values.
//! - [`assemble`]: the decoders' `Sample`/`DecodeError`, and samples to per-stream window frames.
//! - `time`: timestamp parsing (epoch seconds and units, RFC 3339, ISO 8601 dates).

pub mod assemble;
pub mod csv;
pub mod examon;
pub mod labels;
pub mod npy;
pub mod npz;
pub mod raw;
pub mod telegraf;
mod time;

use std::fmt;
use std::path::{Path, PathBuf};

use ndarray::Array2;

pub use labels::{
    Segment, SegmentBounds, read_interpretation_labels, read_interpretation_labels_within,
    read_labels,
};

/// A numeric table read from a file: one row per sample, one column per feature.
#[derive(Debug, Clone)]
pub struct Table {
    /// The file it came from.
    pub path: PathBuf,
    /// Feature names, one per column of `values` (`f0..f{d-1}` for NPY).
    pub features: Vec<String>,
    /// Epoch seconds per row, when the file had a timestamp column (CSV only).
    pub timestamps: Option<Vec<f64>>,
    /// rows × features: finite, except where a CSV left a gap (NaN), which
    /// `replay::read_input` fills before anything scores or trains on it.
    pub values: Array2<f32>,
}

impl Table {
    /// Number of rows (samples).
    pub fn rows(&self) -> usize {
        self.values.nrows()
    }

    /// Number of features (columns of `values`).
    pub fn n_features(&self) -> usize {
        self.values.ncols()
    }
}

/// How to read a table.
#[derive(Default, Clone, Debug)]
pub struct TableOptions {
    /// CSV column that holds timestamps (not a feature). When `None`, a header that is
    /// exactly `timestamp`, `time` or `ts` (any case) is used if there is exactly one.
    pub timestamp_column: Option<String>,
    /// The feature columns a model wants (CSV only). When the header names every one of
    /// them, the other columns are skipped unread, so a text column such as a host name
    /// may be there; otherwise every column is read, as without it.
    pub features: Option<Vec<String>>,
}

/// The file formats [`read_table`] understands, by extension.
pub const SUPPORTED_TABLE_EXTENSIONS: &[&str] = &["csv", "npy", "npz"];

/// A table file's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableFormat {
    Csv,
    Npy,
    /// An `.npz` archive: its array `X` is the table (ODDS / ADBench's layout).
    Npz,
}

/// A table file read whole, once: a pipe, a FIFO or a process substitution (`<(zcat
/// x.csv.gz)`, `/dev/stdin`) can be read only once, so the bytes are parsed (and, for
/// `train`, hashed) from here.
#[derive(Debug, Clone)]
pub struct DataFile {
    /// The path as given, for messages.
    pub path: PathBuf,
    pub format: TableFormat,
    pub bytes: Vec<u8>,
}

impl DataFile {
    /// The table, strictly: any NaN, Inf or empty cell is an error.
    ///
    /// # Errors
    /// What the format's reader rejects ([`csv::parse_csv`], [`npy::parse_npy_allow_1d`]),
    /// and a timestamp column asked of an NPY.
    pub fn table(&self, opts: &TableOptions) -> Result<Table, IngestError> {
        self.parse(opts, false)
    }

    /// The table with its gaps (a CSV's empty, NaN, Inf, `null`, `NA` cells, an NPY's NaN
    /// and ±Inf) as NaN, for [`crate::replay::fill_gaps`] to fill.
    ///
    /// # Errors
    /// As [`DataFile::table`], but a gap is none.
    pub fn table_with_gaps(&self, opts: &TableOptions) -> Result<Table, IngestError> {
        self.parse(opts, true)
    }

    /// Lowercase hex SHA-256 of the bytes (model provenance), as [`file_sha256`] of the
    /// file.
    pub fn sha256(&self) -> String {
        crate::model::io::sha256_hex(&self.bytes)
    }

    fn parse(&self, opts: &TableOptions, gaps: bool) -> Result<Table, IngestError> {
        let path = &self.path;
        if self.format != TableFormat::Csv
            && let Some(name) = &opts.timestamp_column
        {
            // NPY has no timestamp column; ignoring a requested one would hide a mistake.
            return Err(IngestError::TimestampColumnInNpy {
                path: path.to_owned(),
                name: name.clone(),
            });
        }
        match self.format {
            TableFormat::Csv if gaps => csv::parse_csv_with_gaps(path, &self.bytes, opts),
            TableFormat::Csv => csv::parse_csv(path, &self.bytes, opts),
            TableFormat::Npy => parse_npy_table(path, &self.bytes, gaps),
            TableFormat::Npz => {
                let (shown, member) =
                    npz::member_npy(path, &self.bytes, "X").map_err(|e| match e {
                        IngestError::Npz { path, message } if message.contains("no member") => {
                            IngestError::Npz {
                                path,
                                message: format!(
                                    "{message}: an .npz input is read from its array X (rows × features), as ODDS and ADBench store it"
                                ),
                            }
                        }
                        other => other,
                    })?;
                let mut table = parse_npy_table(&shown, &member, gaps)?;
                table.path = path.to_owned();
                Ok(table)
            }
        }
    }
}

/// A 1-D array is a series of one feature: one column.
fn parse_npy_table(path: &Path, bytes: &[u8], gaps: bool) -> Result<Table, IngestError> {
    if gaps {
        npy::parse_npy_with_gaps(path, bytes)
    } else {
        npy::parse_npy_allow_1d(path, bytes)
    }
}

/// Reads a table file whole, once. The format is the name's extension (`.csv`, `.npy`, or
/// `.npz` for its array `X`; any case); a name without one (`/dev/stdin`, `/dev/fd/63` from a process substitution,
/// a FIFO) is read by its content: NPY when it starts with NPY's magic, CSV otherwise.
///
/// # Errors
/// [`IngestError::Io`] for a folder, a missing file (`-` says to give `/dev/stdin`) or a
/// read error; [`IngestError::UnsupportedFormat`] for another extension (before
/// reading); [`IngestError::UnknownContent`] for a compressed file (`.gz`, `.zst`, …) or a
/// name without an extension whose content is compressed or an archive.
pub fn read_data_file(path: &Path) -> Result<DataFile, IngestError> {
    if path.is_dir() {
        return Err(IngestError::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                "is a directory, not a data file",
            ),
        ));
    }
    if let Err(e) = std::fs::metadata(path) {
        // `-` is no name for standard input here (as for --config): say which one is.
        let e = if path.as_os_str() == "-" && e.kind() == std::io::ErrorKind::NotFound {
            std::io::Error::new(
                e.kind(),
                "no such file (for standard input, give /dev/stdin)",
            )
        } else {
            e
        };
        return Err(IngestError::io(path, e));
    }
    let extension = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    let named = match extension.as_deref() {
        Some("csv") => Some(TableFormat::Csv),
        Some("npy") => Some(TableFormat::Npy),
        Some("npz") => Some(TableFormat::Npz),
        None => None,
        // A compressed export: say how to read it without unpacking it to disk.
        Some(packed @ ("gz" | "zst" | "xz" | "bz2")) => {
            let cat = match packed {
                "gz" => "zcat",
                "zst" => "zstdcat",
                "xz" => "xzcat",
                _ => "bzcat",
            };
            return Err(IngestError::UnknownContent {
                path: path.to_owned(),
                what: format!(
                    "compressed (.{packed}): decompress it first, or read it through a pipe: --input <({cat} {})",
                    path.display()
                ),
            });
        }
        Some(other) => {
            return Err(IngestError::UnsupportedFormat {
                path: path.to_owned(),
                extension: other.to_owned(),
            });
        }
    };
    let bytes = read_bytes(path)?;
    let format = match named {
        Some(format) => format,
        None => sniff(path, &bytes)?,
    };
    Ok(DataFile {
        path: path.to_owned(),
        format,
        bytes,
    })
}

/// The format of a table read from a name without an extension, by its first bytes.
fn sniff(path: &Path, bytes: &[u8]) -> Result<TableFormat, IngestError> {
    let unknown = |what: &str| IngestError::UnknownContent {
        path: path.to_owned(),
        what: what.to_owned(),
    };
    if bytes.starts_with(npy::MAGIC) {
        Ok(TableFormat::Npy)
    } else if bytes.starts_with(b"\x1f\x8b") {
        Err(unknown("gzip-compressed data: decompress it first (zcat)"))
    } else if bytes.starts_with(b"\x28\xb5\x2f\xfd") {
        Err(unknown(
            "zstd-compressed data: decompress it first (zstdcat)",
        ))
    } else if bytes.starts_with(b"\xfd7zXZ\x00") {
        Err(unknown("xz-compressed data: decompress it first (xzcat)"))
    } else if bytes.starts_with(b"BZh") {
        Err(unknown(
            "bzip2-compressed data: decompress it first (bzcat)",
        ))
    } else if npz::is_zip(bytes) {
        Ok(TableFormat::Npz)
    } else {
        Ok(TableFormat::Csv)
    }
}

/// Where in a text file something went wrong: a line, optionally a named column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextPos {
    /// 1-based physical line number.
    pub line: usize,
    /// Column name from the header (or `column N` when there is no name yet).
    pub column: Option<String>,
}

impl TextPos {
    pub(crate) fn line(line: usize) -> Self {
        TextPos { line, column: None }
    }

    pub(crate) fn cell(line: usize, column: &str) -> Self {
        TextPos {
            line,
            column: Some(column.to_owned()),
        }
    }
}

impl fmt::Display for TextPos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}", self.line)?;
        if let Some(c) = &self.column {
            write!(f, ", column {:?}", Clipped(c))?;
        }
        Ok(())
    }
}

/// Text quoted from a bad input, shortened so that an error message stays short. Names an
/// operator must find again (topics, streams, metrics) use [`clipped_name`] instead.
#[derive(Clone, PartialEq, Eq)]
pub struct Clipped<'a>(pub &'a str);

/// Most characters of a topic, stream or metric name quoted in a log line: whole for any
/// sensible name (an ExaMon topic is about 60), bounded for a hostile one (MQTT allows 65,535).
pub const NAME_CHARS: usize = 256;

/// A name quoted in a log line, whole up to [`NAME_CHARS`] characters: see [`clipped_name`].
#[derive(Clone, PartialEq, Eq)]
pub struct ClippedName<'a>(&'a str);

/// A topic, stream or metric name for a log line: whole up to [`NAME_CHARS`] characters.
pub fn clipped_name(name: &str) -> ClippedName<'_> {
    ClippedName(name)
}

/// Up to `max` names, quoted (each clipped as [`Clipped`]), then how many more: the lists
/// of columns in ingest's and replay's messages.
pub(crate) fn name_list<S: AsRef<str>>(names: &[S], max: usize) -> String {
    let shown: Vec<String> = names
        .iter()
        .take(max)
        .map(|n| format!("{:?}", Clipped(n.as_ref())))
        .collect();
    match names.len().saturating_sub(max) {
        0 => shown.join(", "),
        more => format!("{} and {more} more", shown.join(", ")),
    }
}

/// `text` quoted, cut after `max` characters with a `…`.
fn quote_clipped(f: &mut fmt::Formatter<'_>, text: &str, max: usize) -> fmt::Result {
    match text.char_indices().nth(max) {
        None => write!(f, "{text:?}"),
        Some((cut, _)) => write!(f, "{:?}…", &text[..cut]),
    }
}

impl fmt::Debug for Clipped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        quote_clipped(f, self.0, 40)
    }
}

impl fmt::Debug for ClippedName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        quote_clipped(f, self.0, NAME_CHARS)
    }
}

/// Why a file could not be read. `Display` is one line that starts with the path.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{}: cannot read: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error(
        "{}: unsupported file type {:?}; supported: {}",
        .path.display(),
        .extension,
        SUPPORTED_TABLE_EXTENSIONS.iter().map(|e| format!(".{e}")).collect::<Vec<_>>().join(", ")
    )]
    UnsupportedFormat { path: PathBuf, extension: String },

    /// Compressed data or an archive where a table was wanted: `what` says which, and how
    /// to read it.
    #[error(
        "{}: {what}; a table is CSV text or an NPY array (a name without an extension is read by its content)",
        .path.display()
    )]
    UnknownContent { path: PathBuf, what: String },

    #[error("{}: empty file", .path.display())]
    Empty { path: PathBuf },

    #[error("{}: no data rows", .path.display())]
    NoRows { path: PathBuf },

    #[error("{}: no feature columns", .path.display())]
    NoFeatures { path: PathBuf },

    #[error("{}: {pos}: not valid UTF-8", .path.display())]
    NotUtf8 { path: PathBuf, pos: TextPos },

    #[error("{}: {pos}: {message}", .path.display())]
    Syntax {
        path: PathBuf,
        pos: TextPos,
        message: String,
    },

    #[error("{}: line {line}: expected {expected} fields, found {found}", .path.display())]
    FieldCount {
        path: PathBuf,
        line: usize,
        expected: usize,
        found: usize,
    },

    #[error("{}: line 1: duplicate column name {:?} (columns {first} and {second})", .path.display(), Clipped(.name))]
    DuplicateColumn {
        path: PathBuf,
        name: String,
        first: usize,
        second: usize,
    },

    #[error("{}: timestamp column {:?} is not in the header", .path.display(), Clipped(.name))]
    MissingTimestampColumn { path: PathBuf, name: String },

    #[error("{}: timestamp column {:?} was asked for, but NPY files have no named columns", .path.display(), Clipped(.name))]
    TimestampColumnInNpy { path: PathBuf, name: String },

    #[error(
        "{}: several columns could be the timestamp ({}); name one with timestamp_column",
        .path.display(),
        .candidates.join(", ")
    )]
    AmbiguousTimestampColumn {
        path: PathBuf,
        candidates: Vec<String>,
    },

    /// `hint` says what to do: how a gap is written, or to drop a text column.
    #[error("{}: {pos}: value {:?} is not a number: {hint}", .path.display(), Clipped(.value))]
    NotANumber {
        path: PathBuf,
        pos: TextPos,
        value: String,
        hint: &'static str,
    },

    #[error(
        "{}: {pos}: value {:?} is not a timestamp (epoch seconds, RFC 3339, or an ISO 8601 date or date-time such as 2024-03-01 or 2024-03-01 12:00[:00[.fff]], UTC unless it has an offset)",
        .path.display(),
        Clipped(.value)
    )]
    BadTimestamp {
        path: PathBuf,
        pos: TextPos,
        value: String,
    },

    #[error("{}: {pos}: NaN/Inf is not allowed", .path.display())]
    NonFinite { path: PathBuf, pos: TextPos },

    #[error("{}: {pos}: value {:?} is out of range for float32", .path.display(), Clipped(.value))]
    OutOfRange {
        path: PathBuf,
        pos: TextPos,
        value: String,
    },

    #[error("{}: row {row}, column {col} (0-based): NaN/Inf is not allowed", .path.display())]
    NonFiniteAt {
        path: PathBuf,
        row: usize,
        col: usize,
    },

    #[error("{}: row {row}, column {col} (0-based): value {value:e} is out of range for float32", .path.display())]
    OutOfRangeAt {
        path: PathBuf,
        row: usize,
        col: usize,
        value: f64,
    },

    /// An `.npz` that is no zip archive, a corrupt one, or a valid archive whose members
    /// are not what the reader needs (a missing `y`, a label that is not 0 or 1): the
    /// message says which.
    #[error("{}: {message}", .path.display())]
    Npz { path: PathBuf, message: String },

    #[error("{}: not an NPY file: {message}", .path.display())]
    NpyHeader { path: PathBuf, message: String },

    #[error("{}: unsupported dtype {:?}; supported: float16, float32, float64 and integer or bool types, little- or big-endian", .path.display(), Clipped(.descr))]
    UnsupportedDtype { path: PathBuf, descr: String },

    #[error("{}: expected a 2-D array, found shape {shape:?}", .path.display())]
    NotTwoD { path: PathBuf, shape: Vec<u64> },

    #[error(
        "{}: expected rows [tokens, d] or [batch, seq, d] (leading dimensions are flattened), found shape {shape:?}",
        .path.display()
    )]
    NotRows { path: PathBuf, shape: Vec<u64> },

    #[error(
        "{}: {}: header says {rows}×{cols} {dtype} ({expected} bytes of data) but the file has {actual} bytes of data",
        .path.display(),
        if .actual < .expected { "truncated" } else { "trailing bytes" }
    )]
    DataSize {
        path: PathBuf,
        rows: u64,
        cols: u64,
        dtype: &'static str,
        expected: u64,
        actual: u64,
    },

    #[error("{}: {pos}: label {:?} is not 0 or 1", .path.display(), Clipped(.value))]
    BadLabel {
        path: PathBuf,
        pos: TextPos,
        value: String,
    },

    #[error("{}: element {index} (0-based): label {value} is not 0 or 1", .path.display())]
    BadLabelAt {
        path: PathBuf,
        index: usize,
        value: f32,
    },

    #[error(
        "{}: labels must be a vector, one per row ([n] or [n, 1]), found shape {shape:?}",
        .path.display()
    )]
    LabelShape { path: PathBuf, shape: Vec<u64> },

    /// `note` is empty, or says (after a `; `) what the extra label likely is.
    #[error("{}: {found} labels, but the data has {expected} rows{note}", .path.display())]
    LabelCount {
        path: PathBuf,
        found: usize,
        expected: usize,
        note: &'static str,
    },
}

impl IngestError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        IngestError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Read a table, strictly, choosing the parser by the file extension (`.csv` or `.npy`,
/// any case) or, for a name without one (a pipe), by its content ([`read_data_file`]).
/// An `.npy` may be 2-D (rows × features) or 1-D (a univariate series: one feature, `f0`).
///
/// # Errors
/// [`IngestError::UnsupportedFormat`] for any other extension, and whatever
/// [`read_data_file`] and the format's reader reject ([`csv::read_csv`],
/// [`npy::read_npy`]).
pub fn read_table(path: &Path, opts: &TableOptions) -> Result<Table, IngestError> {
    read_data_file(path)?.table(opts)
}

/// Lowercase hex SHA-256 of a file's bytes, streamed (model provenance).
///
/// # Errors
/// [`IngestError::Io`] when the file cannot be opened or read.
pub fn file_sha256(path: &Path) -> Result<String, IngestError> {
    crate::model::io::file_sha256(path).map_err(|e| IngestError::io(path, e))
}

/// Read a whole file, mapping failures to [`IngestError::Io`] with the path.
pub(crate) fn read_bytes(path: &Path) -> Result<Vec<u8>, IngestError> {
    std::fs::read(path).map_err(|e| IngestError::io(path, e))
}

/// Split text bytes into lines (without `\n` or a trailing `\r`), after dropping a
/// UTF-8 BOM. Yields `(1-based line number, line bytes)`; the empty piece after a final
/// newline is not yielded.
pub(crate) fn lines(bytes: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let empty = bytes.is_empty();
    body.split(|&b| b == b'\n')
        .filter(move |_| !empty)
        .enumerate()
        .map(|(i, l)| (i + 1, l.strip_suffix(b"\r").unwrap_or(l)))
}

/// A line as UTF-8 text, or [`IngestError::NotUtf8`] naming the line.
pub(crate) fn line_str<'a>(
    path: &Path,
    line_no: usize,
    line: &'a [u8],
) -> Result<&'a str, IngestError> {
    std::str::from_utf8(line).map_err(|_| IngestError::NotUtf8 {
        path: path.to_owned(),
        pos: TextPos::line(line_no),
    })
}

/// Test helpers shared by the submodules' tests.
#[cfg(test)]
pub(crate) mod testutil {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A per-test scratch directory under the system temp dir, removed on drop.
    pub struct Scratch(pub PathBuf);

    impl Scratch {
        pub fn new(tag: &str) -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "darkwatch-ingest-{}-{}-{}",
                tag,
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).expect("create scratch dir");
            Scratch(dir)
        }

        pub fn write(&self, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, bytes).expect("write scratch file");
            p
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The bundled SMD slice, relative to the crate root.
    pub fn smd(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/smd")
            .join(name)
    }

    /// A tiny deterministic generator for fuzz inputs (xorshift64*).
    pub struct Fuzz(pub u64);

    impl Fuzz {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        pub fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    #[test]
    fn dispatches_on_extension_and_lists_supported() {
        let s = Scratch::new("dispatch");
        let p = s.write("data.parquet", b"x");
        let err = read_table(&p, &TableOptions::default()).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, IngestError::UnsupportedFormat { .. }),
            "{msg}"
        );
        assert!(
            msg.contains("data.parquet") && msg.contains(".csv, .npy, .npz"),
            "{msg}"
        );
        let p = s.write("UPPER.CSV", b"a,b\n1,2\n");
        assert_eq!(read_table(&p, &TableOptions::default()).unwrap().rows(), 1);
    }

    /// A pipe has no extension to go by (`/dev/stdin`, `/dev/fd/63` from `<(zcat …)`):
    /// such a name is read by its content. It was refused as `unsupported file type ""`.
    #[test]
    fn a_name_without_an_extension_is_read_by_its_content() {
        use super::npz::tests::npy;
        let s = Scratch::new("sniff");
        let opts = TableOptions::default();
        let p = s.write("63", b"a,b\n1,2\n");
        let f = read_data_file(&p).unwrap();
        assert_eq!(f.format, TableFormat::Csv);
        assert_eq!(f.table(&opts).unwrap().values, ndarray::array![[1.0, 2.0]]);
        let data: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let p = s.write("stdin", npy("<f4", "(2,)", &data));
        assert_eq!(read_table(&p, &opts).unwrap().values.dim(), (2, 1));
        // Text that is no table still says what is wrong with it.
        let p = s.write("noext", b"x");
        let err = read_table(&p, &opts).unwrap_err().to_string();
        assert!(err.ends_with("noext: no data rows"), "{err}");
        let p = s.write("packed", b"\x1f\x8b\x08\x00");
        let err = read_table(&p, &opts).unwrap_err().to_string();
        assert!(
            err.contains("gzip-compressed data: decompress it first (zcat)")
                && err.contains("read by its content"),
            "{err}"
        );
        // A zip archive is an .npz (its array X): see an_npz_gives_its_array_x.
        let p = s.write("data.csv.gz", b"\x1f\x8b\x08\x00");
        let err = read_table(&p, &opts).unwrap_err().to_string();
        assert!(
            err.contains(
                "compressed (.gz): decompress it first, or read it through a pipe: --input <(zcat "
            ) && err.contains("data.csv.gz)"),
            "{err}"
        );
        // The extension still decides when there is one.
        let p = s.write("data.txt", b"a\n1\n");
        assert!(matches!(
            read_table(&p, &opts),
            Err(IngestError::UnsupportedFormat { .. })
        ));
        let err = read_table(Path::new("-"), &opts).unwrap_err().to_string();
        assert_eq!(
            err,
            "-: cannot read: no such file (for standard input, give /dev/stdin)"
        );
    }

    /// `train --input x.npz` and `replay --input x.npz` were refused (`unsupported file
    /// type "npz"`) though the harness reads ODDS archives: the table is the array `X`.
    #[test]
    fn an_npz_gives_its_array_x() {
        use super::npz::tests::{npy, stored_zip};
        let s = Scratch::new("npz-x");
        let opts = TableOptions::default();
        let x: Vec<u8> = [1.0f64, 2.0, f64::NAN, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let y: Vec<u8> = [0i64, 1].iter().flat_map(|v| v.to_le_bytes()).collect();
        let zip = stored_zip(&[
            ("X.npy", npy("<f8", "(2, 2)", &x)),
            ("y.npy", npy("<i8", "(2,)", &y)),
        ]);
        for name in ["t.npz", "T.NPZ", "63"] {
            let p = s.write(name, &zip);
            let f = read_data_file(&p).unwrap();
            assert_eq!(f.format, TableFormat::Npz, "{name}");
            let t = f.table_with_gaps(&opts).unwrap();
            assert_eq!((t.values.dim(), t.values[[1, 1]]), ((2, 2), 4.0));
            assert!(t.values[[1, 0]].is_nan());
            assert_eq!(t.features, ["f0", "f1"]);
            assert_eq!(t.path, p);
            // Strictly read, the gap is an error that names the member.
            let err = f.table(&opts).unwrap_err().to_string();
            assert!(
                err.contains(&format!("{name}:X.npy: row 1, column 0")),
                "{err}"
            );
        }
        let p = s.write(
            "only_y.npz",
            stored_zip(&[("y.npy", npy("<i8", "(2,)", &y))]),
        );
        let err = read_table(&p, &opts).unwrap_err().to_string();
        assert!(
            err.ends_with("only_y.npz: the archive has no member X.npy (its members: y.npy): an .npz input is read from its array X (rows × features), as ODDS and ADBench store it"),
            "{err}"
        );
        let opts = TableOptions {
            timestamp_column: Some("ts".into()),
            features: None,
        };
        let p = s.write("t.npz", &zip);
        assert!(matches!(
            read_table(&p, &opts),
            Err(IngestError::TimestampColumnInNpy { .. })
        ));
    }

    /// `replay`, `demo` and `train` read an NPY's NaN and ±Inf as gaps, as a CSV's; the
    /// strict reader (the harness, labels) still refuses them.
    #[test]
    fn with_gaps_an_npy_reads_nan_and_inf_as_nan() {
        use super::npz::tests::npy;
        let s = Scratch::new("npy-gaps");
        let opts = TableOptions::default();
        let f32s: Vec<u8> = [1.0f32, f32::NAN, f32::INFINITY, 4.0, f32::NEG_INFINITY, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let f64s: Vec<u8> = [1.0f64, f64::NAN, f64::INFINITY, 4.0, f64::NEG_INFINITY, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        for (name, bytes) in [
            ("a.npy", npy("<f4", "(3, 2)", &f32s)),
            ("b.npy", npy("<f8", "(3, 2)", &f64s)),
        ] {
            let p = s.write(name, bytes);
            let f = read_data_file(&p).unwrap();
            let t = f.table_with_gaps(&opts).unwrap();
            let gaps: Vec<bool> = t.values.iter().map(|v| v.is_nan()).collect();
            assert_eq!(gaps, [false, true, true, false, true, false], "{name}");
            assert_eq!((t.values[[0, 0]], t.values[[2, 1]]), (1.0, 6.0), "{name}");
            let err = f.table(&opts).unwrap_err().to_string();
            assert!(err.contains("row 0, column 1 (0-based): NaN/Inf"), "{err}");
        }
        // A finite float64 beyond float32 is still no gap.
        let big: Vec<u8> = [1e39f64].iter().flat_map(|v| v.to_le_bytes()).collect();
        let p = s.write("big.npy", npy("<f8", "(1, 1)", &big));
        let err = read_data_file(&p)
            .unwrap()
            .table_with_gaps(&opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("out of range for float32"), "{err}");
        // Labels stay strict.
        let p = s.write("labels.npy", npy("<f4", "(3,)", &f32s[..12]));
        let err = read_labels(&p, None).unwrap_err().to_string();
        assert!(err.contains("NaN/Inf"), "{err}");
    }

    /// A univariate series saved as a 1-D `.npy` is n rows of one feature (it was refused
    /// as "expected a 2-D array").
    #[test]
    fn a_one_dimensional_npy_is_one_feature() {
        use super::npz::tests::npy;
        let s = Scratch::new("one-d");
        let data: Vec<u8> = [1.0f32, 2.0, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let p = s.write("series.npy", npy("<f4", "(3,)", &data));
        let t = read_table(&p, &TableOptions::default()).unwrap();
        assert_eq!(t.values.dim(), (3, 1));
        assert_eq!(t.features, ["f0"]);
        assert_eq!(t.values.column(0).to_vec(), vec![1.0, 2.0, 4.0]);
        // Three dimensions are still no table.
        let p = s.write("cube.npy", npy("<f4", "(1, 1, 3)", &data));
        let err = read_table(&p, &TableOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected a 2-D array"), "{err}");
    }

    #[test]
    fn missing_file_is_an_io_error_with_path() {
        let p = Path::new("/nonexistent/darkwatch/x.csv");
        let msg = read_table(p, &TableOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("/nonexistent/darkwatch/x.csv: cannot read"),
            "{msg}"
        );
        assert!(matches!(file_sha256(p), Err(IngestError::Io { .. })));
    }

    #[test]
    fn sha256_matches_known_digests() {
        let s = Scratch::new("sha");
        let p = s.write("abc.txt", b"abc");
        assert_eq!(
            file_sha256(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let p = s.write("empty", b"");
        assert_eq!(
            file_sha256(&p).unwrap(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // Larger than one read buffer.
        assert_eq!(
            file_sha256(&smd("machine-1-6_test.npy")).unwrap(),
            "6c3c6cefb6d5c3985b48ddee542beb2d28947581555ef38c46464499570f2faa"
        );
    }

    #[test]
    fn lines_strip_bom_cr_and_final_newline() {
        let got: Vec<_> = lines(b"\xEF\xBB\xBFa\r\nb\n\nc").collect();
        assert_eq!(
            got,
            vec![
                (1, &b"a"[..]),
                (2, &b"b"[..]),
                (3, &b""[..]),
                (4, &b"c"[..])
            ]
        );
        assert_eq!(lines(b"").count(), 0);
        assert_eq!(lines(b"\xEF\xBB\xBF").count(), 0);
        assert_eq!(lines(b"\n").collect::<Vec<_>>(), vec![(1, &b""[..])]);
    }

    #[test]
    fn clipped_values_keep_messages_short() {
        let long = "x".repeat(1000);
        let shown = format!("{:?}", Clipped(&long));
        assert!(shown.len() < 50, "{shown}");
        assert_eq!(format!("{:?}", Clipped("a\nb")), "\"a\\nb\"");
        // Names stay whole up to NAME_CHARS: an ExaMon topic's metric is its last level.
        let topic = "org/o/cluster/c/node/n2/plugin/p/chnl/data/f0";
        assert_eq!(format!("{:?}", clipped_name(topic)), format!("{topic:?}"));
        let shown = format!("{:?}", clipped_name(&long));
        assert_eq!(shown, format!("{:?}…", &long[..NAME_CHARS]));
    }

    #[test]
    fn every_error_displays_on_one_line() {
        let s = Scratch::new("oneline");
        let cases: Vec<(&str, &[u8])> = vec![
            ("a.csv", b""),
            ("b.csv", b"a,b\n"),
            ("c.csv", b"a,b\n1,2\n1\n"),
            ("d.csv", b"a,b\n1,\"x\ny\"\n"),
            ("e.csv", b"a,a\n1,2\n"),
            ("f.csv", b"a,b\n1,nan\n"),
            ("g.csv", b"a\n\xff\n"),
            ("h.npy", b"\x93NUMPY\x01\x00\x02\x00{}"),
            ("i.npy", b"garbage"),
            ("j.txt", b"0\n2\n"),
        ];
        for (name, bytes) in cases {
            let p = s.write(name, bytes);
            let err = if name.ends_with(".txt") {
                read_labels(&p, None).unwrap_err()
            } else {
                read_table(&p, &TableOptions::default()).unwrap_err()
            };
            let msg = err.to_string();
            assert!(!msg.contains('\n') && msg.contains(name), "{name}: {msg}");
        }
    }
}
