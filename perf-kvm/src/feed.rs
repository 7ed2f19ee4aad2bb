//! Samples from either an in-process VM or a running VM's control socket, behind one blocking interface.

use std::sync::Arc;

use vmm::sampler::SampleStream;

/// The feed itself.
pub enum SampleFeed {
    InProcess(SampleStream),
    Socket {
        rx: std::sync::mpsc::Receiver<vmm::Sample>,
        loss: Arc<std::sync::Mutex<vmm::SampleLoss>>,
        error: Arc<std::sync::Mutex<Option<String>>>,
    },
}

pub enum Feed {
    Sample(vmm::Sample),
    /// Nothing arrived within the timeout.
    Idle,
    /// The VM ended, or the socket closed.
    Ended,
}

impl SampleFeed {
    /// Attaches to a running VM's control socket and starts a sampling session there. A reader thread turns the
    /// stream into a channel, so the consumer can wait with a timeout without losing partial lines.
    pub fn attach(
        socket: &std::path::Path,
        freq: u32,
        callchains: bool,
    ) -> anyhow::Result<SampleFeed> {
        let mut client = vmm::control::ControlClient::connect(socket)?;
        client.start_sampling(freq, callchains)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1 << 16);
        let loss = Arc::new(std::sync::Mutex::new(vmm::SampleLoss::default()));
        let error = Arc::new(std::sync::Mutex::new(None));
        let (l, e) = (loss.clone(), error.clone());
        std::thread::Builder::new()
            .name("control-reader".into())
            .spawn(move || loop {
                match client.next_event() {
                    Ok(Some(vmm::control::StreamEvent::Sample(s))) => {
                        if tx.send(s).is_err() {
                            return;
                        }
                    }
                    Ok(Some(vmm::control::StreamEvent::Loss(now))) => {
                        *l.lock().unwrap_or_else(|p| p.into_inner()) = now
                    }
                    Ok(None) => return,
                    Err(err) => {
                        *e.lock().unwrap_or_else(|p| p.into_inner()) = Some(err.to_string());
                        return;
                    }
                }
            })?;
        Ok(SampleFeed::Socket { rx, loss, error })
    }

    pub fn next(&self, timeout: std::time::Duration) -> Feed {
        use std::sync::mpsc::RecvTimeoutError;
        let got = match self {
            SampleFeed::InProcess(s) => s.rx.recv_timeout(timeout),
            SampleFeed::Socket { rx, .. } => rx.recv_timeout(timeout),
        };
        match got {
            Ok(s) => Feed::Sample(s),
            Err(RecvTimeoutError::Timeout) => Feed::Idle,
            Err(RecvTimeoutError::Disconnected) => Feed::Ended,
        }
    }

    pub fn loss(&self) -> vmm::SampleLoss {
        match self {
            SampleFeed::InProcess(s) => s.loss.snapshot(),
            SampleFeed::Socket { loss, .. } => *loss.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// Why a socket stream broke off, if it did (garbage, a dead VMM).
    pub fn error(&self) -> Option<String> {
        match self {
            SampleFeed::InProcess(_) => None,
            SampleFeed::Socket { error, .. } => {
                error.lock().unwrap_or_else(|p| p.into_inner()).clone()
            }
        }
    }
}
