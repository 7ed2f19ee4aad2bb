//! `perf-kvm stat record`'s output: one JSON document (format in docs/stat-top.md), read back by `stat report`.

use std::path::Path;

use serde::{Deserialize, Serialize};
use vmm::exit_stats::VcpuExitStats;
use vmm::kvm_stats::KvmStatsSnapshot;

pub const FORMAT_NAME: &str = "perf-kvm-stat";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StatFileError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a perf-kvm stat recording (expected JSON with \"format\": \"{FORMAT_NAME}\")")]
    NotARecording {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} is a perf-kvm stat recording of version {found}; this perf-kvm reads version {FORMAT_VERSION}")]
    Version { path: String, found: u32 },
}

/// Everything `stat report` needs, captured when `stat record` ends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatRecording {
    pub format: String,
    pub version: u32,
    /// What was recorded: the kernel path or the socket.
    pub target: String,
    pub vcpus: usize,
    /// Wall time from the start of the recording to its end.
    pub duration_ns: u64,
    /// The VMM's exit accounting, one table per vCPU.
    pub exit_stats: Vec<VcpuExitStats>,
    /// KVM's own counters at the end, when the host and the source provide them.
    pub kvm_stats: Option<KvmStatsSnapshot>,
    /// Why `kvm_stats` is missing.
    pub kvm_stats_missing: Option<String>,
    /// KVM tracepoint counts (`kvm:kvm_exit`, ...) over the run, where the host has them.
    #[serde(default)]
    pub tracepoints: Option<Vec<(String, u64)>>,
    /// Why `tracepoints` is missing.
    #[serde(default)]
    pub tracepoints_missing: Option<String>,
}

impl StatRecording {
    pub fn new(
        target: String,
        vcpus: usize,
        duration_ns: u64,
        exit_stats: Vec<VcpuExitStats>,
    ) -> StatRecording {
        StatRecording {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            target,
            vcpus,
            duration_ns,
            exit_stats,
            kvm_stats: None,
            kvm_stats_missing: None,
            tracepoints: None,
            tracepoints_missing: None,
        }
    }

    pub fn write(&self, path: &Path) -> Result<(), StatFileError> {
        let text = serde_json::to_string_pretty(self).expect("recordings serialize");
        std::fs::write(path, text + "\n").map_err(|source| StatFileError::Write {
            path: path.display().to_string(),
            source,
        })
    }

    pub fn read(path: &Path) -> Result<StatRecording, StatFileError> {
        let shown = path.display().to_string();
        let text = std::fs::read(path).map_err(|source| StatFileError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    fn parse(text: &[u8], shown: &str) -> Result<StatRecording, StatFileError> {
        #[derive(Deserialize)]
        struct Probe {
            format: String,
            version: u32,
        }
        let not_ours = |source| StatFileError::NotARecording {
            path: shown.to_string(),
            source,
        };
        let probe: Probe = serde_json::from_slice(text).map_err(not_ours)?;
        if probe.format != FORMAT_NAME {
            return Err(not_ours(serde::de::Error::custom(format!(
                "format is \"{}\"",
                probe.format
            ))));
        }
        if probe.version != FORMAT_VERSION {
            return Err(StatFileError::Version {
                path: shown.to_string(),
                found: probe.version,
            });
        }
        serde_json::from_slice(text).map_err(not_ours)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::exit_stats::{ExitAgg, ExitKey};

    #[test]
    fn round_trips_and_refuses_other_files() {
        let mut agg = ExitAgg::default();
        agg.add(1500);
        let rec = StatRecording::new(
            "guest.elf".into(),
            1,
            42,
            vec![VcpuExitStats {
                by_key: vec![(ExitKey::IoOut(0xf4), agg), (ExitKey::Hlt, agg)],
            }],
        );
        let text = serde_json::to_vec(&rec).unwrap();
        let back = StatRecording::parse(&text, "x").unwrap();
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(&rec).unwrap()
        );
        let err = StatRecording::parse(b"PERFILE2....", "perf.data").unwrap_err();
        assert!(
            err.to_string()
                .contains("perf.data is not a perf-kvm stat recording"),
            "{err}"
        );
        let other = br#"{"format":"something","version":1}"#;
        assert!(matches!(
            StatRecording::parse(other, "o"),
            Err(StatFileError::NotARecording { .. })
        ));
        let newer = br#"{"format":"perf-kvm-stat","version":9}"#;
        assert!(matches!(
            StatRecording::parse(newer, "n"),
            Err(StatFileError::Version { found: 9, .. })
        ));
    }
}
