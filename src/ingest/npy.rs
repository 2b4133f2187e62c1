//! NumPy `.npy` arrays: 2-D, float16/float32/float64 (or integer/bool, either byte order,
//! converted to float32, as in the ODDS tables), format versions 1.0, 2.0 and 3.0, C or
//! Fortran order. Features are named `f0..f{d-1}`; there are no timestamps. Activation
//! dumps (`[batch, seq, d]`) are read as rows by [`read_npy_rows`], which flattens the
//! leading dimensions.
//!
//! The header is a Python dict literal (`{'descr': '<f4', 'fortran_order': False,
//! 'shape': (23689, 38), }`), parsed here by a small literal reader rather than by
//! pattern matching, so that spacing, key order, quotes and `3L`-style integers written
//! by old NumPy versions all work. The data size is checked against the header before
//! anything is allocated for it.

use std::path::Path;

use ndarray::{Array2, ArrayD, IxDyn, ShapeBuilder};

use super::{IngestError, Table, read_bytes};

pub(crate) const MAGIC: &[u8] = b"\x93NUMPY";
/// Nesting limit for the header literal; real headers nest two deep.
const MAX_DEPTH: usize = 16;

/// Which array shapes a reader takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dims {
    /// `[rows, cols]` only.
    Two,
    /// `[rows, cols]`, or `[rows]` as one column.
    UpToTwo,
    /// `[..., rows, cols]`: every dimension but the last is flattened into rows.
    Rows,
}

/// Read a 2-D float `.npy` file as a [`Table`] (float64 is narrowed to float32).
///
/// # Errors
/// `Io`; `NpyHeader` (bad magic, version or header literal); `UnsupportedDtype`;
/// `NotTwoD`; `DataSize` (truncated or trailing bytes); `NoRows`; `NoFeatures`;
/// `NonFiniteAt` / `OutOfRangeAt` with the 0-based row and column of the first bad value.
pub fn read_npy(path: &Path) -> Result<Table, IngestError> {
    let bytes = read_bytes(path)?;
    parse_npy(path, &bytes)
}

/// Parse `.npy` bytes already in memory; `path` is only used in error messages.
///
/// # Errors
/// As [`read_npy`], minus `Io`.
pub fn parse_npy(path: &Path, bytes: &[u8]) -> Result<Table, IngestError> {
    parse(path, bytes, Dims::Two, false).map(|(t, _)| t)
}

/// As [`parse_npy`], but a 1-D array is also accepted, as one column (label vectors).
///
/// # Errors
/// As [`parse_npy`], except that 1-D is allowed.
pub fn parse_npy_allow_1d(path: &Path, bytes: &[u8]) -> Result<Table, IngestError> {
    parse(path, bytes, Dims::UpToTwo, false).map(|(t, _)| t)
}

/// As [`parse_npy_allow_1d`], but a NaN or ±Inf is read as a gap (NaN) instead of
/// refusing the file, as [`super::csv::read_csv_with_gaps`] reads a CSV's gaps: fill them
/// before use ([`crate::replay::fill_gaps`]). A finite float64 beyond float32 is still
/// an error.
///
/// # Errors
/// As [`parse_npy_allow_1d`], without `NonFiniteAt`.
pub fn parse_npy_with_gaps(path: &Path, bytes: &[u8]) -> Result<Table, IngestError> {
    parse(path, bytes, Dims::UpToTwo, true).map(|(t, _)| t)
}

/// Reads an array of rows of width `d`, `[tokens, d]` or with more leading dimensions
/// (`[batch, seq, d]`), which are flattened in row-major order: token `t` of sequence `b`
/// becomes row `b·seq + t`. Returns the rows and the file's shape.
///
/// # Errors
/// As [`read_npy`], with `NotRows` instead of `NotTwoD` for fewer than two dimensions; the
/// row of a bad value is the flattened row.
pub fn read_npy_rows(path: &Path) -> Result<(Table, Vec<u64>), IngestError> {
    let bytes = read_bytes(path)?;
    parse_npy_rows(path, &bytes)
}

/// [`read_npy_rows`] on bytes already in memory; `path` is only used in error messages.
///
/// # Errors
/// As [`read_npy_rows`], minus `Io`.
pub fn parse_npy_rows(path: &Path, bytes: &[u8]) -> Result<(Table, Vec<u64>), IngestError> {
    parse(path, bytes, Dims::Rows, false)
}

/// `gaps`: NaN and ±Inf become NaN (gaps) instead of an error.
fn parse(
    path: &Path,
    bytes: &[u8],
    dims: Dims,
    gaps: bool,
) -> Result<(Table, Vec<u64>), IngestError> {
    let header_err = |message: String| IngestError::NpyHeader {
        path: path.to_owned(),
        message,
    };
    if bytes.is_empty() {
        return Err(IngestError::Empty {
            path: path.to_owned(),
        });
    }
    if !bytes.starts_with(MAGIC) {
        return Err(header_err("missing the \\x93NUMPY magic".into()));
    }
    let (major, minor) = match bytes.get(6..8) {
        Some(&[major, minor]) => (major, minor),
        _ => return Err(header_err("file ends inside the version".into())),
    };
    let (len_bytes, header_start) = match major {
        1 => (2, 10),
        2 | 3 => (4, 12),
        _ => {
            return Err(header_err(format!(
                "unsupported format version {major}.{minor}"
            )));
        }
    };
    let header_len = match bytes.get(8..header_start) {
        Some(b) => b
            .iter()
            .rev()
            .fold(0usize, |acc, &x| (acc << 8) | usize::from(x)),
        None => return Err(header_err("file ends inside the header length".into())),
    };
    debug_assert_eq!(header_start - 8, len_bytes);
    let data_start = header_start
        .checked_add(header_len)
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| {
            header_err(format!(
                "header length {header_len} runs past the end of the file"
            ))
        })?;
    let raw_header = &bytes[header_start..data_start];
    // Versions 1 and 2 store the header as latin-1, version 3 as UTF-8.
    let header: String = if major == 3 {
        std::str::from_utf8(raw_header)
            .map_err(|_| header_err("header is not valid UTF-8".into()))?
            .to_owned()
    } else {
        raw_header.iter().map(|&b| char::from(b)).collect()
    };
    let NpyHeader {
        descr,
        fortran_order,
        shape,
    } = parse_header(&header).map_err(header_err)?;

    // A big-endian array (`>f8`, as some tools and old NumPy on POWER write) is read by
    // swapping each item's bytes into little-endian order first.
    let big_endian = descr.starts_with('>');
    let little = match descr.strip_prefix('>') {
        Some(rest) => format!("<{rest}"),
        None => descr.clone(),
    };
    let (item, dtype, decode): (u64, &'static str, Decode) = match little.as_str() {
        "<f4" => (4, "float32", Decode::F32),
        "<f2" => (2, "float16", Decode::F16),
        "<f8" => (
            8,
            "float64",
            Decode::Wide(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])),
        ),
        "|u1" | "<u1" | "|b1" => (1, "uint8", Decode::Wide(|c| f64::from(c[0]))),
        "|i1" | "<i1" => (1, "int8", Decode::Wide(|c| f64::from(c[0] as i8))),
        "<u2" => (
            2,
            "uint16",
            Decode::Wide(|c| f64::from(u16::from_le_bytes([c[0], c[1]]))),
        ),
        "<i2" => (
            2,
            "int16",
            Decode::Wide(|c| f64::from(i16::from_le_bytes([c[0], c[1]]))),
        ),
        "<u4" => (
            4,
            "uint32",
            Decode::Wide(|c| f64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        ),
        "<i4" => (
            4,
            "int32",
            Decode::Wide(|c| f64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        ),
        "<i8" => (
            8,
            "int64",
            Decode::Wide(|c| {
                i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f64
            }),
        ),
        "<u8" => (
            8,
            "uint64",
            Decode::Wide(|c| {
                u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f64
            }),
        ),
        _ => {
            return Err(IngestError::UnsupportedDtype {
                path: path.to_owned(),
                descr,
            });
        }
    };
    let (rows, cols) = match (dims, shape.as_slice()) {
        (_, &[rows, cols]) => (rows, cols),
        (Dims::UpToTwo, &[rows]) => (rows, 1),
        (Dims::Rows, [lead @ .., cols]) if !lead.is_empty() => (
            // An overflowing product cannot match the data: reported as truncated.
            lead.iter()
                .try_fold(1u64, |a, &n| a.checked_mul(n))
                .unwrap_or(u64::MAX),
            *cols,
        ),
        (Dims::Rows, _) => {
            return Err(IngestError::NotRows {
                path: path.to_owned(),
                shape,
            });
        }
        _ => {
            return Err(IngestError::NotTwoD {
                path: path.to_owned(),
                shape,
            });
        }
    };
    let mut data = &bytes[data_start..];
    let expected = rows.checked_mul(cols).and_then(|n| n.checked_mul(item));
    let actual = data.len() as u64;
    if expected != Some(actual) {
        return Err(IngestError::DataSize {
            path: path.to_owned(),
            rows,
            cols,
            dtype,
            expected: expected.unwrap_or(u64::MAX),
            actual,
        });
    }
    if rows == 0 {
        return Err(IngestError::NoRows {
            path: path.to_owned(),
        });
    }
    if cols == 0 {
        return Err(IngestError::NoFeatures {
            path: path.to_owned(),
        });
    }
    // Both fit in usize: their product is the length of a slice in memory.
    let (rows, cols) = (rows as usize, cols as usize);
    let swapped: Vec<u8>;
    if big_endian && item > 1 {
        swapped = data
            .chunks_exact(item as usize)
            .flat_map(|c| c.iter().rev().copied())
            .collect();
        data = &swapped;
    }
    let values = match decode {
        Decode::F32 | Decode::F16 => {
            let flat = if matches!(decode, Decode::F32) {
                data.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            } else {
                data.chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect()
            };
            let mut a = to_standard(flat, &shape, rows, cols, fortran_order);
            if gaps {
                a.mapv_inplace(|v| if v.is_finite() { v } else { f32::NAN });
            } else if let Some(((row, col), _)) = a.indexed_iter().find(|(_, v)| !v.is_finite()) {
                return Err(IngestError::NonFiniteAt {
                    path: path.to_owned(),
                    row,
                    col,
                });
            }
            a
        }
        Decode::Wide(decode) => {
            let flat = data.chunks_exact(item as usize).map(decode).collect();
            let wide = to_standard(flat, &shape, rows, cols, fortran_order);
            for ((row, col), &v) in wide.indexed_iter() {
                if !v.is_finite() && gaps {
                    continue;
                }
                if !v.is_finite() {
                    return Err(IngestError::NonFiniteAt {
                        path: path.to_owned(),
                        row,
                        col,
                    });
                }
                if !(v as f32).is_finite() {
                    return Err(IngestError::OutOfRangeAt {
                        path: path.to_owned(),
                        row,
                        col,
                        value: v,
                    });
                }
            }
            // An infinite float64 becomes a gap (NaN) here too, as float32 ones do.
            wide.mapv(|v| if v.is_finite() { v as f32 } else { f32::NAN })
        }
    };
    let table = Table {
        path: path.to_owned(),
        features: (0..cols).map(|j| format!("f{j}")).collect(),
        timestamps: None,
        values,
    };
    Ok((table, shape))
}

/// How a dtype's elements become float32.
#[derive(Debug, Clone, Copy)]
enum Decode {
    /// float32: as stored.
    F32,
    /// float16: each widened exactly (as the safetensors readers convert F16; every float16
    /// is a float32, subnormals included) straight into the output. Activation dumps are
    /// float16 and large: a float64 copy between would take four times the file's data.
    F16,
    /// Through float64, to check that each value fits in float32 (float64, integers).
    Wide(fn(&[u8]) -> f64),
}

/// A row-major `rows × cols` array from NPY's flat data of `shape` (whose elements number
/// `rows × cols`) in C or Fortran order; leading dimensions become rows in C order.
fn to_standard<T: Clone>(
    flat: Vec<T>,
    shape: &[u64],
    rows: usize,
    cols: usize,
    fortran_order: bool,
) -> Array2<T> {
    const CHECKED: &str = "data length was checked against the shape";
    if !fortran_order {
        return Array2::from_shape_vec((rows, cols), flat).expect(CHECKED);
    }
    if shape.len() <= 2 {
        let a = Array2::from_shape_vec((rows, cols).f(), flat).expect(CHECKED);
        return a.as_standard_layout().into_owned();
    }
    // Each dimension fits in usize: the product of all of them is a slice length.
    let dims: Vec<usize> = shape.iter().map(|&n| n as usize).collect();
    let a = ArrayD::from_shape_vec(IxDyn(&dims).f(), flat).expect(CHECKED);
    a.as_standard_layout()
        .into_owned()
        .into_shape_with_order((rows, cols))
        .expect(CHECKED)
}

/// The three keys NumPy writes.
#[derive(Debug, PartialEq)]
struct NpyHeader {
    descr: String,
    fortran_order: bool,
    shape: Vec<u64>,
}

fn parse_header(text: &str) -> Result<NpyHeader, String> {
    let mut p = LitParser {
        s: text.as_bytes(),
        i: 0,
    };
    let lit = p.value(0)?;
    p.skip_ws();
    if p.i != p.s.len() {
        return Err(format!(
            "unexpected text after the header dict at byte {}",
            p.i
        ));
    }
    let Lit::Dict(entries) = lit else {
        return Err("header is not a dict".into());
    };
    let get = |key: &str| {
        entries
            .iter()
            .find(|(k, _)| matches!(k, Lit::Str(s) if s == key))
            .map(|(_, v)| v)
            .ok_or_else(|| format!("header has no {key:?} key"))
    };
    let descr = match get("descr")? {
        Lit::Str(s) => s.clone(),
        // A list descr is a structured dtype.
        other => {
            return Err(format!(
                "'descr' is {} (structured dtypes are not supported)",
                other.kind()
            ));
        }
    };
    let fortran_order = match get("fortran_order")? {
        Lit::Bool(b) => *b,
        other => {
            return Err(format!(
                "'fortran_order' is {}, expected True or False",
                other.kind()
            ));
        }
    };
    let shape = match get("shape")? {
        Lit::Tuple(items) => items
            .iter()
            .map(|x| match x {
                Lit::Int(n) => Ok(*n),
                other => Err(format!("'shape' holds {}, expected integers", other.kind())),
            })
            .collect::<Result<Vec<u64>, String>>()?,
        other => return Err(format!("'shape' is {}, expected a tuple", other.kind())),
    };
    Ok(NpyHeader {
        descr,
        fortran_order,
        shape,
    })
}

/// The Python literal subset that NPY headers use.
#[derive(Debug, PartialEq)]
enum Lit {
    Str(String),
    Int(u64),
    Bool(bool),
    None,
    Tuple(Vec<Lit>),
    List(Vec<Lit>),
    Dict(Vec<(Lit, Lit)>),
}

impl Lit {
    fn kind(&self) -> &'static str {
        match self {
            Lit::Str(_) => "a string",
            Lit::Int(_) => "an integer",
            Lit::Bool(_) => "a bool",
            Lit::None => "None",
            Lit::Tuple(_) => "a tuple",
            Lit::List(_) => "a list",
            Lit::Dict(_) => "a dict",
        }
    }
}

struct LitParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl LitParser<'_> {
    fn skip_ws(&mut self) {
        while self.s.get(self.i).is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    fn value(&mut self, depth: usize) -> Result<Lit, String> {
        if depth > MAX_DEPTH {
            return Err("header nests too deeply".into());
        }
        self.skip_ws();
        let Some(&c) = self.s.get(self.i) else {
            return Err("header ends where a value was expected".into());
        };
        match c {
            b'\'' | b'"' => self.string(c).map(Lit::Str),
            b'0'..=b'9' => self.int(),
            b'(' => self.seq(b')', depth).map(Lit::Tuple),
            b'[' => self.seq(b']', depth).map(Lit::List),
            b'{' => self.dict(depth),
            _ => {
                let start = self.i;
                while self.s.get(self.i).is_some_and(|c| c.is_ascii_alphabetic()) {
                    self.i += 1;
                }
                match &self.s[start..self.i] {
                    b"True" => Ok(Lit::Bool(true)),
                    b"False" => Ok(Lit::Bool(false)),
                    b"None" => Ok(Lit::None),
                    _ => Err(format!(
                        "unexpected character {:?} at byte {start}",
                        char::from(c)
                    )),
                }
            }
        }
    }

    fn string(&mut self, quote: u8) -> Result<String, String> {
        let start = self.i;
        self.i += 1;
        let mut out = Vec::new();
        loop {
            match self.s.get(self.i) {
                None => return Err(format!("unterminated string starting at byte {start}")),
                Some(&c) if c == quote => {
                    self.i += 1;
                    return Ok(String::from_utf8_lossy(&out).into_owned());
                }
                Some(b'\\') => {
                    // Escapes never occur in NumPy headers; keep the escaped byte as is.
                    if let Some(&next) = self.s.get(self.i + 1) {
                        out.push(next);
                    }
                    self.i += 2;
                }
                Some(&c) => {
                    out.push(c);
                    self.i += 1;
                }
            }
        }
    }

    fn int(&mut self) -> Result<Lit, String> {
        let start = self.i;
        let mut n: u64 = 0;
        while let Some(&c) = self.s.get(self.i).filter(|c| c.is_ascii_digit()) {
            n = n
                .checked_mul(10)
                .and_then(|n| n.checked_add(u64::from(c - b'0')))
                .ok_or_else(|| format!("integer at byte {start} is too large"))?;
            self.i += 1;
        }
        // Python 2 long suffix, written by NumPy on some platforms.
        if matches!(self.s.get(self.i), Some(b'L' | b'l')) {
            self.i += 1;
        }
        Ok(Lit::Int(n))
    }

    /// Comma-separated values up to `close`, trailing comma allowed.
    fn seq(&mut self, close: u8, depth: usize) -> Result<Vec<Lit>, String> {
        self.i += 1;
        let mut items = Vec::new();
        loop {
            self.skip_ws();
            if self.s.get(self.i) == Some(&close) {
                self.i += 1;
                return Ok(items);
            }
            items.push(self.value(depth + 1)?);
            self.skip_ws();
            match self.s.get(self.i) {
                Some(b',') => self.i += 1,
                Some(&c) if c == close => {}
                _ => {
                    return Err(format!(
                        "expected ',' or {:?} at byte {}",
                        char::from(close),
                        self.i
                    ));
                }
            }
        }
    }

    fn dict(&mut self, depth: usize) -> Result<Lit, String> {
        self.i += 1;
        let mut entries = Vec::new();
        loop {
            self.skip_ws();
            if self.s.get(self.i) == Some(&b'}') {
                self.i += 1;
                return Ok(Lit::Dict(entries));
            }
            let key = self.value(depth + 1)?;
            self.skip_ws();
            if self.s.get(self.i) != Some(&b':') {
                return Err(format!("expected ':' at byte {}", self.i));
            }
            self.i += 1;
            let value = self.value(depth + 1)?;
            entries.push((key, value));
            self.skip_ws();
            match self.s.get(self.i) {
                Some(b',') => self.i += 1,
                Some(b'}') => {}
                _ => return Err(format!("expected ',' or '}}' at byte {}", self.i)),
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::testutil::*;
    use super::*;

    /// Build an NPY file: `header` is the dict text, padded as NumPy does.
    pub(crate) fn npy_bytes(major: u8, header: &str, data: &[u8]) -> Vec<u8> {
        let len_bytes = if major == 1 { 2 } else { 4 };
        let prefix = 6 + 2 + len_bytes;
        let mut h = header.to_owned();
        while !(prefix + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        let mut out = MAGIC.to_vec();
        out.extend([major, 0]);
        if major == 1 {
            out.extend((h.len() as u16).to_le_bytes());
        } else {
            out.extend((h.len() as u32).to_le_bytes());
        }
        out.extend(h.as_bytes());
        out.extend(data);
        out
    }

    fn f4(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn f8(values: &[f64]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn parse(bytes: &[u8]) -> Result<Table, IngestError> {
        parse_npy(Path::new("x.npy"), bytes)
    }

    fn err(bytes: &[u8]) -> String {
        parse(bytes).unwrap_err().to_string()
    }

    const C23: &str = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";

    #[test]
    fn reads_float32_c_order_all_versions() {
        let data = f4(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        for major in [1, 2, 3] {
            let t = parse(&npy_bytes(major, C23, &data)).unwrap();
            assert_eq!(t.values, ndarray::array![[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]);
            assert_eq!(t.features, ["f0", "f1", "f2"]);
            assert!(t.timestamps.is_none());
        }
    }

    #[test]
    fn reads_float64_and_fortran_order() {
        let h = "{'descr': '<f8', 'fortran_order': True, 'shape': (2, 3), }";
        // Column-major: columns [1,4], [2,5], [3,6].
        let t = parse(&npy_bytes(1, h, &f8(&[1.0, 4.0, 2.0, 5.0, 3.0, 6.0]))).unwrap();
        assert_eq!(t.values, ndarray::array![[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]);
        assert!(t.values.is_standard_layout());
    }

    #[test]
    fn header_variants_numpy_has_written() {
        let data = f4(&[1.0, 2.0]);
        for h in [
            "{'descr':'<f4','fortran_order':False,'shape':(1,2)}",
            "{\"shape\": (1L, 2L), \"fortran_order\": False, \"descr\": \"<f4\"}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2,), 'extra': [1, None]}",
        ] {
            assert_eq!(
                parse(&npy_bytes(1, h, &data)).unwrap().values,
                ndarray::array![[1.0, 2.0]],
                "{h}"
            );
        }
    }

    /// `np.save` of a `>f8` array (big-endian) was refused as an unsupported dtype: its
    /// items are byte-swapped on read, for every width, in either memory order.
    #[test]
    fn reads_big_endian_arrays() {
        let h = |descr: &str, fortran: &str| {
            format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': (2, 2), }}")
        };
        let want = ndarray::array![[1.5, -2.0], [3.0, 4.25]];
        let f8: Vec<u8> = [1.5f64, -2.0, 3.0, 4.25]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let f4: Vec<u8> = [1.5f32, -2.0, 3.0, 4.25]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let f2: Vec<u8> = [1.5f32, -2.0, 3.0, 4.25]
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_be_bytes())
            .collect();
        for (descr, data) in [(">f8", &f8), (">f4", &f4), (">f2", &f2)] {
            assert_eq!(
                parse(&npy_bytes(1, &h(descr, "False"), data))
                    .unwrap()
                    .values,
                want,
                "{descr}"
            );
        }
        // Fortran order: columns first.
        let cols: Vec<u8> = [1.5f64, 3.0, -2.0, 4.25]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        assert_eq!(
            parse(&npy_bytes(1, &h(">f8", "True"), &cols))
                .unwrap()
                .values,
            want
        );
        let i4: Vec<u8> = [-1i32, 2, 70000, 0]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        assert_eq!(
            parse(&npy_bytes(1, &h(">i4", "False"), &i4))
                .unwrap()
                .values,
            ndarray::array![[-1.0, 2.0], [70000.0, 0.0]]
        );
        let i2: Vec<u8> = [-1i16, 2, 7, 0]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        assert_eq!(
            parse(&npy_bytes(1, &h(">i2", "False"), &i2))
                .unwrap()
                .values,
            ndarray::array![[-1.0, 2.0], [7.0, 0.0]]
        );
        // A big-endian NaN is still found (and read as a gap where gaps are wanted).
        let nan: Vec<u8> = [1.0f64, f64::NAN, 3.0, 4.0]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        assert!(err(&npy_bytes(1, &h(">f8", "False"), &nan)).contains("row 0, column 1"));
    }

    #[test]
    fn rejects_bad_dtypes_and_shapes() {
        let h = |descr: &str, shape: &str| {
            format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}")
        };
        for descr in ["<c8", ">c8", "<U2"] {
            let msg = err(&npy_bytes(1, &h(descr, "(1, 1)"), &[0; 8]));
            assert_eq!(
                msg,
                format!(
                    "x.npy: unsupported dtype {descr:?}; supported: float16, float32, float64 and integer or bool types, little- or big-endian"
                )
            );
        }
        // Integer tables (the ODDS sets ship uint8 and int16) become float32.
        let t = parse(&npy_bytes(1, &h("<i2", "(1, 2)"), &[0xff, 0xff, 7, 0])).unwrap();
        assert_eq!(t.values.row(0).to_vec(), vec![-1.0, 7.0]);
        let t = parse(&npy_bytes(1, &h("|u1", "(1, 2)"), &[200, 3])).unwrap();
        assert_eq!(t.values.row(0).to_vec(), vec![200.0, 3.0]);
        let structured = "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }";
        assert!(
            err(&npy_bytes(1, structured, &[0; 4])).contains("structured dtypes are not supported")
        );
        assert_eq!(
            err(&npy_bytes(1, &h("<f4", "(4,)"), &[0; 16])),
            "x.npy: expected a 2-D array, found shape [4]"
        );
        assert_eq!(
            err(&npy_bytes(1, &h("<f4", "(1, 2, 2)"), &[0; 16])),
            "x.npy: expected a 2-D array, found shape [1, 2, 2]"
        );
        assert_eq!(
            err(&npy_bytes(1, &h("<f4", "(0, 3)"), &[])),
            "x.npy: no data rows"
        );
        assert_eq!(
            err(&npy_bytes(1, &h("<f4", "(3, 0)"), &[])),
            "x.npy: no feature columns"
        );
    }

    /// Activation dumps: float16 (as the safetensors readers convert it), and `[batch, seq,
    /// d]` read as `batch·seq` rows, token t of sequence b at row b·seq + t, in C and in
    /// Fortran order alike.
    #[test]
    fn reads_float16_and_flattens_leading_dimensions_into_rows() {
        let h = |descr: &str, fortran: &str, shape: &str| {
            format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}")
        };
        let halves: Vec<u8> = [1.0f32, -2.5, 0.099975586, 65504.0]
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let t = parse(&npy_bytes(1, &h("<f2", "False", "(2, 2)"), &halves)).unwrap();
        assert_eq!(
            t.values,
            ndarray::array![[1.0, -2.5], [0.099975586, 65504.0]]
        );
        let inf = half::f16::INFINITY.to_le_bytes();
        assert_eq!(
            err(&npy_bytes(1, &h("<f2", "False", "(1, 1)"), &inf)),
            "x.npy: row 0, column 0 (0-based): NaN/Inf is not allowed"
        );

        // [batch 2, seq 3, d 2]: element (b, t, j) holds 100·b + 10·t + j.
        let value = |b: usize, t: usize, j: usize| (100 * b + 10 * t + j) as f32;
        let c_order: Vec<f32> = (0..2)
            .flat_map(|b| (0..3).flat_map(move |t| (0..2).map(move |j| value(b, t, j))))
            .collect();
        let f_order: Vec<f32> = (0..2)
            .flat_map(|j| (0..3).flat_map(move |t| (0..2).map(move |b| value(b, t, j))))
            .collect();
        for (fortran, data) in [("False", c_order), ("True", f_order)] {
            let bytes = npy_bytes(1, &h("<f4", fortran, "(2, 3, 2)"), &f4(&data));
            let (t, shape) = parse_npy_rows(Path::new("x.npy"), &bytes).unwrap();
            assert_eq!(shape, [2, 3, 2]);
            assert_eq!(t.values.dim(), (6, 2), "{fortran}");
            for (b, s, j) in cube(2, 3, 2) {
                assert_eq!(t.values[[b * 3 + s, j]], value(b, s, j), "{fortran}");
            }
            // Tables stay 2-D.
            assert_eq!(
                err(&bytes),
                "x.npy: expected a 2-D array, found shape [2, 3, 2]"
            );
        }
        let rows = |shape: &str, data: &[u8]| {
            parse_npy_rows(
                Path::new("x.npy"),
                &npy_bytes(1, &h("<f4", "False", shape), data),
            )
        };
        let (t, shape) = rows("(2, 3)", &f4(&[0.0; 6])).unwrap();
        assert_eq!((t.values.dim(), shape), ((2, 3), vec![2, 3]));
        assert_eq!(
            rows("(4,)", &[0; 16]).unwrap_err().to_string(),
            "x.npy: expected rows [tokens, d] or [batch, seq, d] (leading dimensions are flattened), found shape [4]"
        );
        assert_eq!(
            rows("(2, 0, 3)", &[]).unwrap_err().to_string(),
            "x.npy: no data rows"
        );
        let mut bad = vec![0.0f32; 12];
        bad[9] = f32::NAN; // b 1, t 1, j 1: row 4
        assert_eq!(
            rows("(2, 3, 2)", &f4(&bad)).unwrap_err().to_string(),
            "x.npy: row 4, column 1 (0-based): NaN/Inf is not allowed"
        );
        assert!(
            rows("(99999999999, 99999999999, 2)", &[0; 8])
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
    }

    /// float16 goes straight to float32, with no float64 copy between: every value exactly,
    /// subnormals and signed zero included (checked against values built from powers of two,
    /// not through `half`); infinities and NaNs refused at their row and column, in C and
    /// Fortran order and in `[batch, seq, d]` dumps; big-endian refused by name.
    #[test]
    fn float16_decodes_exactly_into_float32() {
        let h = |fortran: &str, shape: &str| {
            format!("{{'descr': '<f2', 'fortran_order': {fortran}, 'shape': {shape}, }}")
        };
        let two = |e: i32| 2f32.powi(e);
        let cases: [(u16, f32); 12] = [
            (0x0000, 0.0),
            (0x8000, -0.0),
            (0x0001, two(-24)), // smallest subnormal
            (0x8001, -two(-24)),
            (0x0200, two(-15)),          // a subnormal power of two
            (0x03ff, 1023.0 * two(-24)), // largest subnormal
            (0x0400, two(-14)),          // smallest normal
            (0x3c00, 1.0),
            (0x3c01, 1.0 + two(-10)),    // one ulp above 1
            (0x3555, 1365.0 * two(-12)), // nearest to 1/3
            (0x7bff, 65504.0),           // largest finite
            (0xfbff, -65504.0),
        ];
        let bytes: Vec<u8> = cases.iter().flat_map(|(b, _)| b.to_le_bytes()).collect();
        let bits = |t: &Table| t.values.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let want: Vec<u32> = cases.iter().map(|(_, v)| v.to_bits()).collect();
        // C order, [4, 3]: the values in file order.
        let t = parse(&npy_bytes(1, &h("False", "(4, 3)"), &bytes)).unwrap();
        assert_eq!(bits(&t), want);
        // Fortran order, [3, 4]: the file holds the columns.
        let t = parse(&npy_bytes(2, &h("True", "(3, 4)"), &bytes)).unwrap();
        assert_eq!(t.values.dim(), (3, 4));
        for (k, (_, v)) in cases.iter().enumerate() {
            assert_eq!(t.values[[k % 3, k / 3]].to_bits(), v.to_bits(), "{k}");
        }
        // [batch 2, seq 3, d 2] rows.
        let (t, shape) = parse_npy_rows(
            Path::new("x.npy"),
            &npy_bytes(1, &h("False", "(2, 3, 2)"), &bytes),
        )
        .unwrap();
        assert_eq!((t.values.dim(), shape), ((6, 2), vec![2, 3, 2]));
        assert_eq!(bits(&t), want);

        // Infinities and NaNs (quiet, signalling, negative) are named where they are.
        for bad in [0x7c00u16, 0xfc00, 0x7e00, 0x7c01, 0xfe00] {
            let mut data = bytes.clone();
            // Flat index 7: C [4, 3] row 2, column 1; Fortran [3, 4] row 1, column 2.
            data[14..16].copy_from_slice(&bad.to_le_bytes());
            assert_eq!(
                err(&npy_bytes(1, &h("False", "(4, 3)"), &data)),
                "x.npy: row 2, column 1 (0-based): NaN/Inf is not allowed",
                "{bad:#06x}"
            );
            assert_eq!(
                err(&npy_bytes(1, &h("True", "(3, 4)"), &data)),
                "x.npy: row 1, column 2 (0-based): NaN/Inf is not allowed",
                "{bad:#06x}"
            );
        }
        // Truncated float16 data is reported in float16 bytes.
        assert_eq!(
            err(&npy_bytes(1, &h("False", "(4, 3)"), &bytes[..23])),
            "x.npy: truncated: header says 4×3 float16 (24 bytes of data) but the file has 23 bytes of data"
        );
    }

    fn cube(a: usize, b: usize, c: usize) -> impl Iterator<Item = (usize, usize, usize)> {
        (0..a).flat_map(move |i| (0..b).flat_map(move |j| (0..c).map(move |k| (i, j, k))))
    }

    #[test]
    fn data_size_must_match_the_header() {
        let h = "{'descr': '<f4', 'fortran_order': False, 'shape': (23688, 38), }";
        assert_eq!(
            err(&npy_bytes(1, h, &[0; 1200])),
            "x.npy: truncated: header says 23688×38 float32 (3600576 bytes of data) but the file has 1200 bytes of data"
        );
        assert_eq!(
            err(&npy_bytes(1, C23, &[0; 28])),
            "x.npy: trailing bytes: header says 2×3 float32 (24 bytes of data) but the file has 28 bytes of data"
        );
        let huge = "{'descr': '<f8', 'fortran_order': False, 'shape': (18446744073709551615, 2), }";
        assert!(err(&npy_bytes(1, huge, &[0; 8])).starts_with("x.npy: truncated"));
        let too_big =
            "{'descr': '<f8', 'fortran_order': False, 'shape': (99999999999999999999, 2), }";
        assert!(err(&npy_bytes(1, too_big, &[])).contains("too large"));
    }

    #[test]
    fn non_finite_values_name_row_and_column() {
        let mut v = vec![0.0f32; 6];
        v[5] = f32::NAN;
        v[4] = f32::INFINITY;
        assert_eq!(
            err(&npy_bytes(1, C23, &f4(&v))),
            "x.npy: row 1, column 1 (0-based): NaN/Inf is not allowed"
        );
        // Fortran order: flat index 1 is row 1, column 0, which comes after row 0 in row-major.
        let hf = "{'descr': '<f8', 'fortran_order': True, 'shape': (2, 3), }";
        let mut w = vec![0.0f64; 6];
        w[1] = f64::NAN;
        w[4] = f64::NEG_INFINITY; // row 0, column 2
        assert_eq!(
            err(&npy_bytes(1, hf, &f8(&w))),
            "x.npy: row 0, column 2 (0-based): NaN/Inf is not allowed"
        );
        let h8 = "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 2), }";
        assert_eq!(
            err(&npy_bytes(1, h8, &f8(&[1.0, 1e300]))),
            "x.npy: row 0, column 1 (0-based): value 1e300 is out of range for float32"
        );
    }

    #[test]
    fn malformed_headers() {
        assert_eq!(err(b""), "x.npy: empty file");
        assert!(err(b"PK\x03\x04").contains("missing the \\x93NUMPY magic"));
        assert!(err(b"\x93NUMPY").contains("version"));
        assert!(err(b"\x93NUMPY\x04\x00\x00\x00").contains("unsupported format version 4.0"));
        assert!(err(b"\x93NUMPY\x01\x00\x10").contains("header length"));
        assert!(err(b"\x93NUMPY\x01\x00\xff\x00{}").contains("runs past the end"));
        for h in [
            "{}",
            "[]",
            "{'descr': '<f4'",
            "{'descr' '<f4'}",
            "{'descr': <f4}",
            "{'descr': '<f4'}} x",
        ] {
            assert!(
                err(&npy_bytes(1, h, &[])).starts_with("x.npy: not an NPY file: "),
                "{h}"
            );
        }
        let deep = format!("{}{}", "(".repeat(100), ")".repeat(100));
        assert!(err(&npy_bytes(1, &deep, &[])).contains("nests too deeply"));
        let mut bad_utf8 = npy_bytes(3, C23, &[0; 24]);
        bad_utf8[13] = 0xff;
        assert!(err(&bad_utf8).contains("not valid UTF-8"));
    }

    #[test]
    fn bundled_smd_arrays() {
        let test = read_npy(&smd("machine-1-6_test.npy")).unwrap();
        assert_eq!(test.values.dim(), (23689, 38));
        let train = read_npy(&smd("machine-1-6_train.npy")).unwrap();
        assert_eq!(train.values.dim(), (23688, 38));
        // Min-max scaled by the authors.
        assert!(train.values.iter().all(|v| (-0.01..=1.01).contains(v)));
        assert_eq!(test.features[37], "f37");
    }

    #[test]
    fn random_and_truncated_bytes_never_panic() {
        let good = npy_bytes(1, C23, &f4(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
        let mut rng = Fuzz(0xBADC0DE);
        for cut in 0..good.len() {
            assert!(parse(&good[..cut]).is_err());
        }
        for round in 0..5000 {
            let bytes: Vec<u8> = if round % 2 == 0 {
                let mut b = good.clone();
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(b.len());
                    b[i] = rng.next() as u8;
                }
                b
            } else {
                let mut b = MAGIC.to_vec();
                b.extend((0..rng.below(200)).map(|_| rng.next() as u8));
                b
            };
            if let Err(e) = parse(&bytes) {
                let msg = e.to_string();
                assert!(msg.starts_with("x.npy: ") && !msg.contains('\n'), "{msg}");
            }
        }
    }
}
