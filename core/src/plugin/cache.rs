//! Compiled components on disk (`<data-dir>/plugin-cache/`), so that a restart loads a
//! component in about a millisecond instead of compiling it again (seconds for a
//! Python component). A file is keyed by the component's sha256 and by wasmtime's
//! compatibility hash (its version and every compile setting), and starts with the
//! sha256 of the rest, checked before loading: a torn or damaged file is compiled
//! again, never loaded.

// Loading compiled code is `unsafe` in wasmtime: it trusts the bytes to be its own
// output. This module is the one place that does it, and only with bytes it wrote
// itself into a directory private to the engine's user, checked against their digest.
#![allow(unsafe_code)]

use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

pub struct CompileCache {
    dir: PathBuf,
    /// wasmtime's compatibility hash: a new wasmtime or setting never reads old files.
    compat: u64,
}

impl CompileCache {
    /// Opens (or makes, mode 0700) the cache directory for `engine`'s settings.
    pub fn open(dir: &Path, engine: &Engine) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        // Hashed by a fixed-key SipHash, so the same binary always names a file alike.
        #[allow(deprecated)]
        let mut hasher = std::hash::SipHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(Self { dir: dir.to_path_buf(), compat: hasher.finish() })
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}-{:016x}.cwasm", self.compat))
    }

    /// The compiled component for these bytes, when a sound file holds it.
    pub fn load(&self, engine: &Engine, sha256: &str) -> Option<Component> {
        let path = self.path(sha256);
        let file = std::fs::read(&path).ok()?;
        let (digest, code) = file.split_at_checked(32)?;
        if Sha256::digest(code).as_slice() != digest {
            tracing::warn!(file = %path.display(), "a compiled plugin on disk is damaged; compiling again");
            return None;
        }
        // SAFETY: `code` is what `store` wrote from wasmtime's own `serialize`, for this
        // wasmtime and these settings (both in the file name), unchanged since (the
        // digest), in a directory only the engine's user can write.
        match unsafe { Component::deserialize(engine, code) } {
            Ok(component) => Some(component),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "a compiled plugin did not load; compiling again");
                None
            }
        }
    }

    /// Keeps `component` for the next start; a failure only costs that start a compile.
    pub fn store(&self, sha256: &str, component: &Component) {
        let path = self.path(sha256);
        if let Err(e) = Self::write(&path, component) {
            tracing::warn!(file = %path.display(), error = %e, "could not keep a compiled plugin on disk");
        }
    }

    /// Deletes every file but the compiled `keep` of this wasmtime and settings: other
    /// uploads (what-if candidates, versions no longer stored), older wasmtimes, and
    /// temporary files a crash left. Returns how many went.
    pub fn prune(&self, keep: &std::collections::HashSet<String>) -> std::io::Result<usize> {
        let mut gone = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if !keep.iter().any(|sha| name == self.path(sha).file_name().and_then(|n| n.to_str()).unwrap_or_default()) {
                std::fs::remove_file(&path)?;
                gone += 1;
            }
        }
        Ok(gone)
    }

    fn write(path: &Path, component: &Component) -> anyhow::Result<()> {
        let code = component.serialize()?;
        // Its own temporary name: engines or `plugin test` runs may share the directory.
        let tmp = path.with_extension(format!("{}.tmp", uuid::Uuid::new_v4().simple()));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp)?;
        file.write_all(&Sha256::digest(&code))?;
        file.write_all(&code)?;
        file.sync_all()?;
        // Whole or not at all: a reader never sees half a file under the real name.
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compiled_component_comes_back_and_a_damaged_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::default();
        let cache = CompileCache::open(dir.path(), &engine).unwrap();
        // The smallest component there is: its magic, version and layer.
        let component = Component::new(&engine, b"\0asm\x0d\0\x01\0").unwrap();
        assert!(cache.load(&engine, "abc").is_none(), "nothing kept yet");
        cache.store("abc", &component);
        assert!(cache.load(&engine, "abc").is_some());

        let path = cache.path("abc");
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(cache.load(&engine, "abc").is_none(), "a flipped bit is caught by the digest");

        cache.store("abc", &component);
        cache.store("def", &component);
        std::fs::write(dir.path().join("abc-0000000000000000.cwasm"), b"an older wasmtime's").unwrap();
        let keep = ["abc".to_string()].into_iter().collect();
        assert_eq!(cache.prune(&keep).unwrap(), 2, "def and the older wasmtime's file go");
        assert!(cache.load(&engine, "abc").is_some() && cache.load(&engine, "def").is_none());
    }
}
