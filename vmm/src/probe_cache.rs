//! Where the probe's snippet results are kept between runs of the VMM on one host.
//!
//! Running the CPL0 snippets costs 10–15 ms on PVM hosts (each probe vCPU's first run is slow), more than the rest
//! of a test-guest boot. Their answers depend only on the host kernel, the loaded KVM module and the CPUID bits
//! that choose which snippets run, so they are stored under a key made of exactly those: the kernel's boot id,
//! the inode of each loaded KVM module's sysfs directory (new on every module load) and the CPUID inputs. Any
//! change makes a new key and the snippets run again. The file lives in a directory only this user can write.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;

const FILE_NAME: &str = "probe-v1.json";
const KVM_MODULES: [&str; 4] = ["kvm", "kvm_intel", "kvm_amd", "kvm_pvm"];

/// The key the stored results must match; `None` when the host gives nothing stable to key on.
pub fn key(cpuid_inputs: &str) -> Option<String> {
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let modules: Vec<String> = KVM_MODULES
        .iter()
        .filter_map(|m| {
            let meta = fs::metadata(format!("/sys/module/{m}")).ok()?;
            Some(format!("{m}:{}", meta.ino()))
        })
        .collect();
    Some(format!(
        "{} {} {} {}",
        env!("CARGO_PKG_VERSION"),
        boot_id.trim(),
        modules.join(","),
        cpuid_inputs
    ))
}

/// A directory only this user can write to, holding the stored results.
pub struct ProbeCache {
    dir: PathBuf,
}

impl ProbeCache {
    /// `$XDG_RUNTIME_DIR/kvm-prof`, else `/tmp/kvm-prof-UID`.
    pub fn open() -> Option<ProbeCache> {
        // SAFETY: getuid has no preconditions and cannot fail.
        let uid = unsafe { libc::getuid() };
        let dir = match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(d) if !d.is_empty() => PathBuf::from(d).join("kvm-prof"),
            _ => std::env::temp_dir().join(format!("kvm-prof-{uid}")),
        };
        ProbeCache::at(dir)
    }

    /// `dir`, created 0700 if missing, and used only if it is a real directory owned by this user and writable by
    /// no one else (so no other user can plant answers).
    pub fn at(dir: PathBuf) -> Option<ProbeCache> {
        // SAFETY: getuid has no preconditions and cannot fail.
        let uid = unsafe { libc::getuid() };
        let _ = fs::DirBuilder::new().mode(0o700).create(&dir);
        let meta = fs::symlink_metadata(&dir).ok()?;
        (meta.is_dir() && meta.uid() == uid && meta.mode() & 0o022 == 0)
            .then_some(ProbeCache { dir })
    }

    /// The stored payload, if it was stored under `key`.
    pub fn load(&self, key: &str) -> Option<serde_json::Value> {
        let path = self.dir.join(FILE_NAME);
        let meta = fs::symlink_metadata(&path).ok()?;
        // SAFETY: getuid has no preconditions and cannot fail.
        if !meta.is_file() || meta.uid() != unsafe { libc::getuid() } {
            return None;
        }
        let mut stored: serde_json::Value = serde_json::from_slice(&fs::read(&path).ok()?).ok()?;
        (stored.get("key")?.as_str()? == key).then(|| stored["results"].take())
    }

    /// Stores `results` under `key`, replacing the file atomically; failures only mean the next run probes again.
    pub fn store(&self, key: &str, results: serde_json::Value) {
        let tmp = self.dir.join(format!("{FILE_NAME}.{}", std::process::id()));
        let body = serde_json::json!({ "key": key, "results": results }).to_string();
        let written = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(body.as_bytes()));
        if written.is_err() || fs::rename(&tmp, self.dir.join(FILE_NAME)).is_err() {
            let _ = fs::remove_file(&tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_changes_with_the_cpuid_inputs_and_results_round_trip() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir().join(format!("probe-cache-test-{}", std::process::id()));
        let dir = base.join("kvm-prof");
        fs::create_dir_all(&base).unwrap();
        let cache = ProbeCache::at(dir.clone()).unwrap();
        let (a, b) = (key("1 2").unwrap(), key("1 3").unwrap());
        assert_ne!(a, b);
        cache.store(&a, serde_json::json!({ "x": 1 }));
        assert_eq!(cache.load(&a), Some(serde_json::json!({ "x": 1 })));
        assert_eq!(cache.load(&b), None);
        assert_eq!(
            fs::metadata(dir.join(FILE_NAME)).unwrap().mode() & 0o777,
            0o600
        );
        // A directory others can write to is not trusted.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(ProbeCache::at(dir.clone()).is_none());
        fs::remove_dir_all(&base).unwrap();
    }
}
