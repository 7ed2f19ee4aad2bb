//! Where `stat` and `top` read a VM from, behind one small trait: a VM started in-process (the binary's
//! `StartedVm`) or a running VM's control socket. Sample streaming over the socket plugs in here later.

use std::path::{Path, PathBuf};

use serde_json::Value;
use vmm::control::{ControlClient, ControlError, Request};
use vmm::exit_stats::VcpuExitStats;
use vmm::kvm_stats::{KvmStatsError, KvmStatsSnapshot};
use vmm::{Sample, SampleLoss};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("the VM's control socket {path}")]
    Socket {
        path: String,
        #[source]
        source: ControlError,
    },
    #[error("the VM's control socket {path} sent a reply that is not {what}: {detail}")]
    BadReply {
        path: String,
        what: &'static str,
        detail: String,
    },
    #[error("KVM's own counters are unavailable")]
    KvmStats(#[source] KvmStatsError),
    #[error("{0} is not available from this VM source yet")]
    Unsupported(&'static str),
}

/// A VM whose exits, KVM counters and samples can be read while it runs.
pub trait VmSource {
    /// Short description for headers: the kernel path or the socket.
    fn describe(&self) -> String;
    fn vcpu_count(&self) -> usize;
    /// Exit accounting of every vCPU since the start or the last reset; `reset` zeroes it after reading.
    fn exit_stats(&mut self, reset: bool) -> Result<Vec<VcpuExitStats>, SourceError>;
    /// KVM's own counters (binary stats fd), current values.
    fn kvm_stats(&mut self) -> Result<KvmStatsSnapshot, SourceError>;
    /// Moves up to `max` samples that have arrived into `out` without blocking. `Ok(false)`: no more will come.
    fn drain_samples(&mut self, out: &mut Vec<Sample>, max: usize) -> Result<bool, SourceError>;
    /// Samples lost so far, by cause.
    fn sample_loss(&self) -> SampleLoss;
    /// Whether the VM has ended (the source then only yields what was left over).
    fn has_ended(&self) -> bool;
    /// The guest kernel image, when the source knows it (default symbol source).
    fn guest_kernel(&self) -> Option<PathBuf>;
}

/// A running VM's control socket (JSON lines, protocol v1): exit statistics on one connection, samples (when
/// `start_sampling` was called) streaming on another.
pub struct ControlSocketSource {
    path: PathBuf,
    client: ControlClient,
    vcpus: usize,
    kernel: Option<PathBuf>,
    ended: bool,
    samples: Option<crate::feed::SampleFeed>,
}

impl ControlSocketSource {
    pub fn connect(path: &Path) -> Result<ControlSocketSource, SourceError> {
        let shown = path.display().to_string();
        let mut client = ControlClient::connect(path).map_err(|source| SourceError::Socket {
            path: shown.clone(),
            source,
        })?;
        let info = client
            .call(Request::Info)
            .map_err(|source| SourceError::Socket {
                path: shown.clone(),
                source,
            })?;
        let vcpus = info["info"]["vcpus"]
            .as_u64()
            .filter(|&n| n > 0)
            .ok_or_else(|| SourceError::BadReply {
                path: shown.clone(),
                what: "a VM description with a vCPU count",
                detail: truncate(&info.to_string()),
            })? as usize;
        let kernel = info["info"]["kernel"].as_str().map(PathBuf::from);
        Ok(ControlSocketSource {
            path: path.to_path_buf(),
            client,
            vcpus,
            kernel,
            ended: false,
            samples: None,
        })
    }

    /// Starts a sampling session on the VM (one per VM at a time).
    pub fn start_sampling(&mut self, freq: u32, callchains: bool) -> Result<(), SourceError> {
        let feed = crate::feed::SampleFeed::attach(&self.path, freq, callchains).map_err(|e| {
            SourceError::BadReply {
                path: self.path.display().to_string(),
                what: "a sampling session",
                detail: truncate(&format!("{e:#}")),
            }
        })?;
        self.samples = Some(feed);
        Ok(())
    }
}

impl VmSource for ControlSocketSource {
    fn describe(&self) -> String {
        format!("the VM at {}", self.path.display())
    }

    fn vcpu_count(&self) -> usize {
        self.vcpus
    }

    fn exit_stats(&mut self, reset: bool) -> Result<Vec<VcpuExitStats>, SourceError> {
        let path = self.path.display().to_string();
        let reply = match self.client.call(Request::ExitStats { reset }) {
            Ok(r) => r,
            Err(source) => {
                if matches!(source, ControlError::Io(_) | ControlError::BadReply(_)) {
                    self.ended = true;
                }
                return Err(SourceError::Socket { path, source });
            }
        };
        parse_exit_stats(&reply).map_err(|detail| {
            self.ended = true;
            SourceError::BadReply {
                path,
                what: "exit statistics",
                detail,
            }
        })
    }

    fn kvm_stats(&mut self) -> Result<KvmStatsSnapshot, SourceError> {
        Err(SourceError::Unsupported(
            "reading KVM's counters over the control socket",
        ))
    }

    fn drain_samples(&mut self, out: &mut Vec<Sample>, max: usize) -> Result<bool, SourceError> {
        let Some(feed) = &self.samples else {
            return Err(SourceError::Unsupported(
                "samples without a sampling session",
            ));
        };
        for _ in 0..max {
            match feed.next(std::time::Duration::ZERO) {
                crate::feed::Feed::Sample(s) => out.push(s),
                crate::feed::Feed::Idle => return Ok(true),
                crate::feed::Feed::Ended => {
                    self.ended = true;
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    fn sample_loss(&self) -> SampleLoss {
        self.samples.as_ref().map(|f| f.loss()).unwrap_or_default()
    }

    fn has_ended(&self) -> bool {
        self.ended
    }

    fn guest_kernel(&self) -> Option<PathBuf> {
        self.kernel.clone()
    }
}

fn parse_exit_stats(reply: &Value) -> Result<Vec<VcpuExitStats>, String> {
    let stats = reply
        .get("exit_stats")
        .ok_or_else(|| format!("no `exit_stats` in {}", truncate(&reply.to_string())))?;
    serde_json::from_value(stats.clone()).map_err(|e| e.to_string())
}

fn truncate(s: &str) -> String {
    const MAX: usize = 200;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use vmm::exit_stats::{ExitAgg, ExitKey};

    #[test]
    fn exit_stats_reply_round_trips_and_garbage_is_refused() {
        let stats = vec![VcpuExitStats {
            by_key: vec![(
                ExitKey::IoOut(0x3f8),
                ExitAgg {
                    count: 2,
                    total_ns: 30,
                    min_ns: 10,
                    max_ns: 20,
                    sum_sq_ns: 500.0,
                },
            )],
        }];
        let reply = json!({ "ok": true, "exit_stats": stats });
        assert_eq!(parse_exit_stats(&reply).unwrap()[0].by_key, stats[0].by_key);
        assert!(parse_exit_stats(&json!({ "ok": true }))
            .unwrap_err()
            .contains("no `exit_stats`"));
        assert!(parse_exit_stats(&json!({ "ok": true, "exit_stats": [{"by_key": 7}] })).is_err());
    }
}
