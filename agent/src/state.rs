//! Files in the state directory: each one an envelope (magic, kind, format version, length,
//! CRC-32) around a payload, written atomically (temporary file, fsync, rename, fsync of the
//! directory). A file that fails any check is moved aside, never trusted and never fatal.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"HEADROOM";
const HEADER_LEN: usize = 8 + 8 + 4 + 8 + 4;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create state directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write state file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read state file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is not usable ({reason}); moved it to {moved_to}")]
    MovedAside {
        path: PathBuf,
        reason: String,
        moved_to: PathBuf,
    },
}

/// One kind of state file: its 8-byte tag and the format version this build reads and writes.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    pub tag: &'static [u8; 8],
    pub version: u32,
    pub file: &'static str,
}

pub const HISTORY: Kind = Kind {
    tag: b"HISTORY\0",
    version: 1,
    file: "history.bin",
};

pub const FORECASTS: Kind = Kind {
    tag: b"FORECAST",
    version: 1,
    file: "forecasts.bin",
};

#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn open(dir: &Path) -> Result<StateDir, StateError> {
        fs::create_dir_all(dir).map_err(|source| StateError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(StateDir {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn save(&self, kind: Kind, payload: &[u8]) -> Result<(), StateError> {
        self.save_with(kind, |w| w.write_all(payload))
    }

    /// Like [`StateDir::save`], with the payload written by `write` straight to the file, so a
    /// large state never has to be held in memory whole.
    pub fn save_with(
        &self,
        kind: Kind,
        write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<(), StateError> {
        use std::io::{Seek, SeekFrom};
        let path = self.dir.join(kind.file);
        let tmp = self.dir.join(format!(".{}.tmp", kind.file));
        let werr = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        let mut f = fs::File::create(&tmp).map_err(werr)?;
        // Length and checksum are patched in once the payload is written.
        f.write_all(&header(kind, 0, 0)).map_err(werr)?;
        let mut counted = Counted {
            inner: std::io::BufWriter::new(f.try_clone().map_err(werr)?),
            len: 0,
            crc: crc32fast::Hasher::new(),
        };
        write(&mut counted).map_err(werr)?;
        counted.inner.flush().map_err(werr)?;
        let Counted { inner, len, crc } = counted;
        drop(inner);
        let crc = crc.finalize();
        f.seek(SeekFrom::Start(0)).map_err(werr)?;
        f.write_all(&header(kind, len, crc)).map_err(werr)?;
        f.sync_all().map_err(werr)?;
        drop(f);
        fs::rename(&tmp, &path).map_err(werr)?;
        if let Ok(d) = fs::File::open(&self.dir) {
            // Makes the rename itself durable; failure only weakens crash safety.
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// The payload of a state file; `Ok(None)` when there is none. A file that is not ours, of
    /// another version, truncated or corrupt is renamed to `<file>.bad-<unix time>` and reported
    /// as [`StateError::MovedAside`] so the caller can log it and start fresh.
    pub fn load(&self, kind: Kind) -> Result<Option<Vec<u8>>, StateError> {
        let path = self.dir.join(kind.file);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        match decode(kind, &bytes) {
            Ok(payload) => Ok(Some(payload.to_vec())),
            Err(reason) => Err(self.move_aside(kind, reason)),
        }
    }

    /// For a payload that passed the envelope checks but that its reader rejects.
    pub fn move_aside(&self, kind: Kind, reason: String) -> StateError {
        let path = self.dir.join(kind.file);
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let moved_to = self.dir.join(format!("{}.bad-{stamp}", kind.file));
        if let Err(e) = fs::rename(&path, &moved_to) {
            return StateError::MovedAside {
                path,
                reason: format!("{reason}; and renaming it failed: {e}"),
                moved_to,
            };
        }
        StateError::MovedAside {
            path,
            reason,
            moved_to,
        }
    }
}

fn header(kind: Kind, len: u64, crc: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(kind.tag);
    h.extend_from_slice(&kind.version.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

/// Passes bytes through while counting them and computing their CRC-32.
struct Counted<W: Write> {
    inner: W,
    len: u64,
    crc: crc32fast::Hasher,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.len += n as u64;
        self.crc.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The bytes of a state file of `kind` around `payload`, as [`StateDir::save`] writes them.
pub fn envelope(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = header(kind, payload.len() as u64, crc32fast::hash(payload));
    out.extend_from_slice(payload);
    out
}

/// The payload of the bytes of a state file of `kind`, or what is wrong with them.
pub fn decode(kind: Kind, bytes: &[u8]) -> Result<&[u8], String> {
    check(kind, bytes)?;
    Ok(&bytes[HEADER_LEN..])
}

fn check(kind: Kind, bytes: &[u8]) -> Result<(), String> {
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err("not a headroom state file".into());
    }
    if &bytes[8..16] != kind.tag {
        return Err(format!(
            "holds {:?}, not {:?}",
            String::from_utf8_lossy(&bytes[8..16]),
            String::from_utf8_lossy(kind.tag)
        ));
    }
    let version = u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
    if version != kind.version {
        return Err(format!(
            "format version {version}, this build reads {}",
            kind.version
        ));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[20..28]);
    let len = u64::from_le_bytes(len);
    if len != (bytes.len() - HEADER_LEN) as u64 {
        return Err(format!(
            "payload is {} bytes, header says {len}",
            bytes.len() - HEADER_LEN
        ));
    }
    let crc = u32::from_le_bytes([bytes[28], bytes[29], bytes[30], bytes[31]]);
    if crc != crc32fast::hash(&bytes[HEADER_LEN..]) {
        return Err("checksum mismatch".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_and_names_what_is_wrong() {
        let bytes = envelope(FORECASTS, b"payload");
        assert_eq!(decode(FORECASTS, &bytes).unwrap(), b"payload");
        let t = tempfile::tempdir().unwrap();
        let s = StateDir::open(t.path()).unwrap();
        s.save(FORECASTS, b"payload").unwrap();
        assert_eq!(fs::read(t.path().join(FORECASTS.file)).unwrap(), bytes);
        let e = decode(HISTORY, &bytes).unwrap_err();
        assert!(e.contains("FORECAST"), "{e}");
        let e = decode(FORECASTS, &bytes[..bytes.len() - 1]).unwrap_err();
        assert!(e.contains("header says"), "{e}");
    }

    #[test]
    fn round_trip_and_missing() {
        let t = tempfile::tempdir().unwrap();
        let s = StateDir::open(&t.path().join("st")).unwrap();
        assert!(s.load(HISTORY).unwrap().is_none());
        s.save(HISTORY, b"payload").unwrap();
        assert_eq!(s.load(HISTORY).unwrap().unwrap(), b"payload");
    }

    #[test]
    fn corrupt_or_foreign_files_are_moved_aside() {
        let t = tempfile::tempdir().unwrap();
        let s = StateDir::open(t.path()).unwrap();
        for bad in [b"hello world, not ours at all".to_vec(), Vec::new()] {
            fs::write(t.path().join(HISTORY.file), &bad).unwrap();
            let e = s.load(HISTORY).unwrap_err();
            assert!(matches!(e, StateError::MovedAside { .. }), "{e}");
            assert!(!t.path().join(HISTORY.file).exists());
        }
        s.save(HISTORY, b"payload").unwrap();
        let mut bytes = fs::read(t.path().join(HISTORY.file)).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(t.path().join(HISTORY.file), &bytes).unwrap();
        let e = s.load(HISTORY).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        let moved = fs::read_dir(t.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".bad-")
            })
            .count();
        assert!(moved >= 1);
    }
}
