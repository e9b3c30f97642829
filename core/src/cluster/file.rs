//! The embedded default's operator switches: `control.json` in the data dir.

use std::path::{Path, PathBuf};

use super::Saved;

/// The embedded default's switches: `control.json` in the data dir, private to the
/// engine's user, written whole, synced and renamed into place. Callers serialise saves.
pub struct ControlFile(PathBuf);

impl ControlFile {
    pub fn new(data_dir: &Path) -> Self {
        Self(data_dir.join("control.json"))
    }

    /// The switches saved by an earlier run; none when there is no file yet.
    pub fn load(&self) -> std::io::Result<Saved> {
        match std::fs::read_to_string(&self.0) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", self.0.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Saved::default()),
            Err(e) => Err(e),
        }
    }

    pub fn save(&self, saved: &Saved) -> std::io::Result<()> {
        let tmp = self.0.with_extension("json.tmp");
        {
            use std::io::Write as _;
            let mut file = std::fs::File::create(&tmp)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            }
            file.write_all(&serde_json::to_vec(saved).expect("saved switches always serialize"))?;
            file.sync_all()?;
        }
        std::fs::rename(&tmp, &self.0)?;
        // The rename itself is durable only once the directory is.
        if let Some(dir) = self.0.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}
