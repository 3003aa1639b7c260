//! The header of a NumPy `.npy` file, read and checked against the file's size before any
//! array data is allocated (candle's reader trusts the shape the header claims).
//!
//! Format (numpy.lib.format, versions 1.0 to 3.0): the magic `\x93NUMPY`, a major and minor
//! version byte, the header length (u16 little-endian in 1.0, u32 in 2.0 and 3.0), then a
//! Python dict literal `{'descr': '<f4', 'fortran_order': False, 'shape': (1, 4, 64, 64), }`
//! padded with spaces, then the data.
use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// The longest header we read: numpy writes a few hundred bytes; this bounds what a corrupt
/// length field can make us allocate.
const MAX_HEADER: usize = 1 << 16;

/// What a `.npy` header says about its array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyHeader {
    /// Bytes per element: 2 (`<f2`), 4 (`<f4`) or 8 (`<f8`).
    pub element_size: usize,
    pub shape: Vec<usize>,
    /// Where the data starts in the file.
    pub data_offset: usize,
}

impl NpyHeader {
    /// Bytes of data the header promises, or `None` when that overflows.
    pub fn data_len(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(self.element_size as u64, |n, &d| n.checked_mul(d as u64))
    }
}

/// Reads the header of the `.npy` file at `path` and checks that the data it describes is
/// exactly what the file holds: a little-endian float array in C order.
pub fn check_file(path: &Path) -> Result<NpyHeader> {
    let bad = |message: String| Error::Weights {
        path: path.to_path_buf(),
        message: format!("not a usable .npy file: {message}"),
    };
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut head = Vec::new();
    file.by_ref()
        .take((MAX_HEADER + 12) as u64)
        .read_to_end(&mut head)
        .map_err(|e| Error::io(path, e))?;
    let header = parse_header(&head).map_err(bad)?;
    let data = header
        .data_len()
        .ok_or_else(|| bad(format!("shape {:?} overflows", header.shape)))?;
    let have = file_len.saturating_sub(header.data_offset as u64);
    if data != have {
        return Err(bad(format!(
            "the header claims shape {:?} ({data} bytes of data), the file holds {have}",
            header.shape
        )));
    }
    Ok(header)
}

/// Parses the start of a `.npy` file (at least its whole header).
pub fn parse_header(bytes: &[u8]) -> std::result::Result<NpyHeader, String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("missing the \\x93NUMPY magic".into());
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!("unsupported format version {v}")),
    };
    if len > MAX_HEADER || bytes.len() < start + len {
        return Err(format!("header of {len} bytes is truncated or too long"));
    }
    let text = std::str::from_utf8(&bytes[start..start + len])
        .map_err(|_| "the header is not text".to_string())?;
    let descr = dict_value(text, "descr").ok_or("the header has no 'descr'")?;
    let element_size = match descr.trim_matches(|c| c == '\'' || c == '"') {
        "<f2" => 2,
        "<f4" => 4,
        "<f8" => 8,
        other => {
            return Err(format!(
                "dtype {other} is not supported (little-endian f16, f32 or f64)"
            ))
        }
    };
    match dict_value(text, "fortran_order") {
        Some("False") => {}
        Some("True") => {
            return Err("fortran_order arrays are not supported (save in C order)".into())
        }
        _ => return Err("the header has no valid 'fortran_order'".into()),
    }
    let shape_text = dict_value(text, "shape").ok_or("the header has no 'shape'")?;
    let inner = shape_text
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("shape {shape_text} is not a tuple"))?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("shape {shape_text}"))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(NpyHeader {
        element_size,
        shape,
        data_offset: start + len,
    })
}

/// The literal after `'key':` in the header dict: a quoted string, a tuple, or a word.
fn dict_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let at = text.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = text[at..].trim_start().strip_prefix(':')?.trim_start();
    let end = match rest.chars().next()? {
        '(' => rest.find(')')? + 1,
        q @ ('\'' | '"') => rest[1..].find(q)? + 2,
        _ => rest.find([',', '}']).unwrap_or(rest.len()),
    };
    Some(rest[..end].trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dict: &str) -> Vec<u8> {
        let mut h = dict.to_string();
        while !(10 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        let mut b = MAGIC.to_vec();
        b.extend([1, 0]);
        b.extend((h.len() as u16).to_le_bytes());
        b.extend(h.as_bytes());
        b
    }

    #[test]
    fn reads_numpy_headers() {
        let b = file("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 4, 8, 8), }");
        let h = parse_header(&b).unwrap();
        assert_eq!(h.shape, vec![1, 4, 8, 8]);
        assert_eq!(h.element_size, 4);
        assert_eq!(h.data_offset, 128);
        assert_eq!(h.data_len(), Some(4 * 256));
        let b = file("{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }");
        assert_eq!(parse_header(&b).unwrap().shape, vec![3]);
    }

    #[test]
    fn refuses_what_we_cannot_read() {
        for (dict, want) in [
            (
                "{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }",
                "dtype",
            ),
            (
                "{'descr': '<i8', 'fortran_order': False, 'shape': (1,), }",
                "dtype",
            ),
            (
                "{'descr': '<f4', 'fortran_order': True, 'shape': (1,), }",
                "fortran",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (a,), }",
                "shape",
            ),
        ] {
            let e = parse_header(&file(dict)).unwrap_err();
            assert!(e.contains(want), "{dict}: {e}");
        }
        assert!(parse_header(b"not numpy at all").is_err());
        let huge = file(
            "{'descr': '<f8', 'fortran_order': False, 'shape': (99999999999, 99999999999, 999999999), }",
        );
        assert_eq!(parse_header(&huge).unwrap().data_len(), None);
    }
}
