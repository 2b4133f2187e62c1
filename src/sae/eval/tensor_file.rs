//! A `.safetensors` file opened by its header alone. `sae-score` streams a tensor of
//! activations from one a block at a time, and reads prompt ids or labels from a file of
//! activations without reading the activations: an input of hundreds of GB costs a block of
//! memory, not the file.

use std::fs;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::SafeTensorError;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};

use super::{DIRECT_BLOCK_BYTES, SaeEvalError, input_err};

/// The largest JSON header read, as the safetensors crate bounds it.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// A `.safetensors` file whose header has been read and checked against the file's length.
pub(super) struct TensorFile {
    path: PathBuf,
    file: fs::File,
    /// Where the tensors' data starts: after the 8-byte length and the JSON header.
    data_start: u64,
    /// The tensors, sorted by name.
    tensors: Vec<(String, TensorInfo)>,
}

impl TensorFile {
    /// Opens `path` and reads its header: the format's checks (offsets that tile the data,
    /// sizes that match shapes and dtypes) and a file exactly as long as the header says.
    ///
    /// # Errors
    /// I/O errors; a header that is not valid, and a file shorter or longer than its header
    /// says (a shorter one named as truncated), each naming the file.
    pub(super) fn open(path: &Path) -> Result<TensorFile, SaeEvalError> {
        let io = |source| SaeEvalError::Io {
            path: path.to_path_buf(),
            source,
        };
        let invalid =
            |e: SafeTensorError| input_err(path, format!("not a valid safetensors file: {e}"));
        let mut file = fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut n = [0u8; 8];
        if len < 8 {
            return Err(invalid(SafeTensorError::HeaderTooSmall));
        }
        file.read_exact(&mut n).map_err(io)?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER_BYTES {
            return Err(invalid(SafeTensorError::HeaderTooLarge));
        }
        if 8 + n > len {
            return Err(invalid(SafeTensorError::InvalidHeaderLength));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).map_err(io)?;
        let header =
            std::str::from_utf8(&header).map_err(|e| invalid(SafeTensorError::InvalidHeader(e)))?;
        let metadata: Metadata = serde_json::from_str(header)
            .map_err(|e| invalid(SafeTensorError::InvalidHeaderDeserialization(e)))?;
        let mut tensors: Vec<(String, TensorInfo)> = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| (name, info.clone()))
            .collect();
        tensors.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        // The format's checks (in `Metadata`) make the offsets tile 0..end.
        let end = tensors
            .iter()
            .map(|(_, t)| t.data_offsets.1 as u64)
            .max()
            .unwrap_or(0);
        let data_start = 8 + n;
        let have = len - data_start;
        if have < end {
            return Err(input_err(
                path,
                format!(
                    "truncated: the header's tensors hold {end} bytes of data but the file has \
                     {have}"
                ),
            ));
        }
        if have > end {
            return Err(invalid(SafeTensorError::MetadataIncompleteBuffer));
        }
        Ok(TensorFile {
            path: path.to_path_buf(),
            file,
            data_start,
            tensors,
        })
    }

    /// The tensor `name`, or the only tensor of the file; `flag` is the option that names
    /// it (`--tensor`, `--prompt-ids-tensor`, …), for the message when the file holds
    /// several and none was named.
    ///
    /// # Errors
    /// No tensor of that name, or several and no name, naming the file's tensors.
    pub(super) fn pick(&self, name: Option<&str>, flag: &str) -> Result<TensorInfo, SaeEvalError> {
        let names = || {
            self.tensors
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let found = match name {
            Some(n) => self.tensors.iter().find(|(t, _)| t == n).ok_or_else(|| {
                input_err(
                    &self.path,
                    format!("no tensor `{n}` (the file holds: {})", names()),
                )
            })?,
            None if self.tensors.len() == 1 => &self.tensors[0],
            None => {
                return Err(input_err(
                    &self.path,
                    format!(
                        "holds {} tensors ({}); name one with {flag}",
                        self.tensors.len(),
                        names()
                    ),
                ));
            }
        };
        Ok(found.1.clone())
    }

    /// Fills `buf` from `at` bytes into the data of `tensor`.
    ///
    /// # Errors
    /// I/O errors, and a file that ends early (cut short since it was opened).
    fn read_at(
        &mut self,
        tensor: &TensorInfo,
        at: u64,
        buf: &mut [u8],
    ) -> Result<(), SaeEvalError> {
        let io = |source| SaeEvalError::Io {
            path: self.path.clone(),
            source,
        };
        self.file
            .seek(SeekFrom::Start(
                self.data_start + tensor.data_offsets.0 as u64 + at,
            ))
            .map_err(io)?;
        match self.file.read_exact(buf) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(input_err(
                &self.path,
                "the file ended while it was read: truncated after it was opened?",
            )),
            Err(e) => Err(io(e)),
        }
    }

    /// All the bytes of `tensor`.
    ///
    /// # Errors
    /// As [`read_at`](Self::read_at).
    pub(super) fn read_all(&mut self, tensor: &TensorInfo) -> Result<Vec<u8>, SaeEvalError> {
        let mut bytes = vec![0u8; tensor.data_offsets.1 - tensor.data_offsets.0];
        self.read_at(tensor, 0, &mut bytes)?;
        Ok(bytes)
    }
}

/// A float tensor of activations, `[tokens, d]` or more dimensions (the leading ones
/// flattened into rows), open for reading its rows a block at a time.
pub(super) struct TensorRows {
    file: TensorFile,
    tensor: TensorInfo,
    /// Bytes per value: 2, 4 or 8.
    item: usize,
    /// The rows (the leading dimensions flattened) and their width.
    pub(super) rows: usize,
    pub(super) cols: usize,
}

impl TensorRows {
    /// Opens the tensor `name` of `path` (or its only tensor; `flag` names the option that
    /// names it).
    ///
    /// # Errors
    /// As [`TensorFile::open`] and [`TensorFile::pick`]; fewer than two dimensions, no rows
    /// or columns, or a dtype other than F32, F64, F16 or BF16.
    pub(super) fn open(
        path: &Path,
        name: Option<&str>,
        flag: &str,
    ) -> Result<TensorRows, SaeEvalError> {
        let file = TensorFile::open(path)?;
        let tensor = file.pick(name, flag)?;
        let shape = tensor.shape.as_slice();
        // The format's checks bound the product by the file's length, so it fits.
        let (rows, cols) = match shape {
            [lead @ .., cols] if !lead.is_empty() => (lead.iter().product::<usize>(), *cols),
            _ => {
                return Err(input_err(
                    path,
                    format!(
                        "activations must be [tokens, d] or [batch, seq, d] (leading dimensions \
                         are flattened), found shape {shape:?}"
                    ),
                ));
            }
        };
        if rows == 0 || cols == 0 {
            return Err(input_err(path, format!("empty activations {shape:?}")));
        }
        let item = match tensor.dtype {
            Dtype::F32 => 4,
            Dtype::F64 => 8,
            Dtype::F16 | Dtype::BF16 => 2,
            other => {
                return Err(input_err(
                    path,
                    format!("activations have dtype {other:?}, expected F32, F64, F16 or BF16"),
                ));
            }
        };
        Ok(TensorRows {
            file,
            tensor,
            item,
            rows,
            cols,
        })
    }

    /// The tensor's shape.
    pub(super) fn shape(&self) -> &[usize] {
        &self.tensor.shape
    }

    /// Reads rows `first..first + n` into `values` (replacing what it held) as float32,
    /// clamped to ±[`crate::sae::ACTIVATION_LIMIT`], [`DIRECT_BLOCK_BYTES`] of the file at
    /// a time.
    ///
    /// # Errors
    /// A value that is not finite as float32 (NaN, ±Inf, a float64 beyond float32's range),
    /// named by row and column; a file that ends early.
    pub(super) fn read_rows(
        &mut self,
        first: usize,
        n: usize,
        values: &mut Vec<f32>,
    ) -> Result<(), SaeEvalError> {
        debug_assert!(first + n <= self.rows);
        let (cols, item) = (self.cols, self.item);
        let count = n * cols;
        values.clear();
        values.reserve_exact(count);
        let mut block = vec![0u8; DIRECT_BLOCK_BYTES.min(count * item)];
        while values.len() < count {
            let start = values.len();
            let len = block.len().min((count - start) * item);
            let at = ((first * cols + start) * item) as u64;
            self.file.read_at(&self.tensor, at, &mut block[..len])?;
            let bytes = &block[..len];
            match self.tensor.dtype {
                Dtype::F32 => values.extend(
                    bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                ),
                Dtype::F64 => values.extend(
                    bytes
                        .chunks_exact(8)
                        .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32),
                ),
                Dtype::F16 => values.extend(
                    bytes
                        .chunks_exact(2)
                        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
                ),
                _ => values.extend(
                    bytes
                        .chunks_exact(2)
                        .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
                ),
            }
            if let Some(i) = values[start..].iter().position(|v| !v.is_finite()) {
                let at = first * cols + start + i;
                return Err(input_err(
                    &self.file.path,
                    format!(
                        "row {}, column {} (0-based): NaN/Inf is not allowed",
                        at / cols,
                        at % cols
                    ),
                ));
            }
        }
        crate::sae::clamp_activations(values);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ActivationBlocks, read_activations_shaped, read_ints};
    use super::*;
    use safetensors::tensor::TensorView;

    /// Writes `tensors` (name, dtype, shape, little-endian bytes) as a safetensors file.
    fn write(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    }

    fn value(i: usize) -> f32 {
        ((i * 37) % 211) as f32 / 16.0 - 6.5
    }

    /// Every float dtype, read in blocks of 7 rows (not a divisor of the row count) and
    /// whole, gives the values written (as the dtype holds them), from a file whose other
    /// tensors come before and after it.
    #[test]
    fn blocks_and_whole_reads_give_the_values_written() {
        let dir = tempfile::tempdir().unwrap();
        let (b, s, d) = (3, 11, 5);
        let n = b * s * d;
        type Enc = fn(f32) -> Vec<u8>;
        type Held = fn(f32) -> f32;
        let cases: [(Dtype, Enc, Held); 4] = [
            (Dtype::F32, |v| v.to_le_bytes().to_vec(), |v| v),
            (Dtype::F64, |v| f64::from(v).to_le_bytes().to_vec(), |v| v),
            (
                Dtype::F16,
                |v| f16::from_f32(v).to_le_bytes().to_vec(),
                |v| f16::from_f32(v).to_f32(),
            ),
            (
                Dtype::BF16,
                |v| bf16::from_f32(v).to_le_bytes().to_vec(),
                |v| bf16::from_f32(v).to_f32(),
            ),
        ];
        for (dtype, enc, held) in cases {
            let path = dir.path().join(format!("{dtype:?}.safetensors"));
            let acts: Vec<u8> = (0..n).flat_map(|i| enc(value(i))).collect();
            let ids: Vec<u8> = (0..b * s)
                .flat_map(|i| ((i / s) as i64).to_le_bytes())
                .collect();
            write(
                &path,
                &[
                    ("a_ids", Dtype::I64, vec![b * s], ids),
                    ("acts", dtype, vec![b, s, d], acts),
                    ("z", Dtype::F32, vec![2], vec![0; 8]),
                ],
            );
            let want: Vec<f32> = (0..n).map(|i| held(value(i))).collect();
            let (x, shape) = read_activations_shaped(&path, Some("acts")).unwrap();
            assert_eq!(shape, vec![b, s, d], "{dtype:?}");
            assert_eq!(x.as_slice().unwrap(), want.as_slice(), "{dtype:?} whole");
            let mut blocks = ActivationBlocks::open(&path, Some("acts"), "--tensor").unwrap();
            assert_eq!((blocks.rows, blocks.cols), (b * s, d));
            let mut got = Vec::new();
            let mut firsts = Vec::new();
            blocks
                .for_each(7, |first, x| {
                    firsts.push(first);
                    got.extend(x.iter().copied());
                    Ok(())
                })
                .unwrap();
            assert_eq!(firsts, vec![0, 7, 14, 21, 28], "{dtype:?}");
            assert_eq!(got, want, "{dtype:?} blocks");
            let ids = read_ints(&path, Some("a_ids"), b * s, "prompt ids").unwrap();
            assert_eq!(ids, (0..b * s).map(|i| (i / s) as i64).collect::<Vec<_>>());
        }
    }

    /// A value that is not finite is named by its row and column, also in a later block;
    /// a float64 beyond float32's range counts as one.
    #[test]
    fn a_bad_value_is_named_by_row_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        let mut v: Vec<f64> = (0..40 * 3).map(|i| f64::from(value(i))).collect();
        v[31 * 3 + 2] = 1e300;
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        write(&path, &[("acts", Dtype::F64, vec![40, 3], bytes)]);
        let mut blocks = ActivationBlocks::open(&path, None, "--tensor").unwrap();
        let e = blocks.for_each(8, |_, _| Ok(())).unwrap_err().to_string();
        assert!(e.contains("row 31, column 2 (0-based)"), "{e}");
        let e = read_activations_shaped(&path, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("row 31, column 2 (0-based)"), "{e}");
    }

    /// A file cut short, or with bytes after its data, is refused at open with what is
    /// wrong; so are a header that is not JSON, one whose length runs past the file, and
    /// a file too short for the length itself.
    #[test]
    fn damaged_files_are_refused_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        let bytes: Vec<u8> = (0..64 * 4).flat_map(|i| value(i).to_le_bytes()).collect();
        write(&path, &[("acts", Dtype::F32, vec![64, 4], bytes)]);
        let whole = fs::read(&path).unwrap();
        let err = |b: &[u8]| {
            fs::write(&path, b).unwrap();
            match TensorFile::open(&path) {
                Ok(_) => "opened".to_string(),
                Err(e) => e.to_string(),
            }
        };
        let e = err(&whole[..whole.len() - 100]);
        assert!(
            e.contains(
                "truncated: the header's tensors hold 1024 bytes of data but the file has 924"
            ),
            "{e}"
        );
        let mut longer = whole.clone();
        longer.extend([0u8; 3]);
        assert!(err(&longer).contains("not a valid safetensors file"));
        assert!(err(&whole[..5]).contains("header too small"));
        let mut bad_len = whole.clone();
        bad_len[..8].copy_from_slice(&(whole.len() as u64).to_le_bytes());
        assert!(err(&bad_len).contains("not a valid safetensors file"));
        let mut not_json = whole.clone();
        not_json[8] = b'[';
        assert!(err(&not_json).contains("not a valid safetensors file"));
        assert_eq!(err(&whole), "opened");
    }

    /// The pick errors name the file's tensors, sorted, and the option to use.
    #[test]
    fn picking_a_tensor_names_the_choices() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("two.safetensors");
        write(
            &path,
            &[
                ("zeta", Dtype::F32, vec![2, 2], vec![0; 16]),
                ("alpha", Dtype::F32, vec![2, 2], vec![0; 16]),
            ],
        );
        let f = TensorFile::open(&path).unwrap();
        let e = f.pick(None, "--tensor").unwrap_err().to_string();
        assert!(
            e.contains("holds 2 tensors (alpha, zeta); name one with --tensor"),
            "{e}"
        );
        let e = f.pick(Some("beta"), "--tensor").unwrap_err().to_string();
        assert!(
            e.contains("no tensor `beta` (the file holds: alpha, zeta)"),
            "{e}"
        );
        assert_eq!(f.pick(Some("zeta"), "--tensor").unwrap().shape, vec![2, 2]);
    }
}
