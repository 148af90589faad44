//! A volume's lifecycle as users see it (`ublkctl status`). Live and Degraded
//! follow replica health while the device serves; the others are lifecycle steps.
//!
//! ```text
//! Stopped ──(start)───────────────────────────────────────────▶ Starting
//! Stopped | Starting ──(found our QUIESCED device)─────────────▶ Recovering
//! Starting | Recovering ──(device serving)────────────────────▶ Live | Degraded
//! Live ──(a replica left the read set)────────────────────────▶ Degraded
//! Degraded ──(every replica online again)─────────────────────▶ Live
//! Starting | Recovering | Live | Degraded ──(stop)────────────▶ Stopping
//! Stopping ──(device removed)─────────────────────────────────▶ Stopped
//! Starting | Recovering | Live | Degraded | Stopping ──(error)▶ Failed
//! Failed ──(recover)──────────────────────────────────────────▶ Starting | Recovering | Stopped
//! Starting | Recovering | Live | Degraded | Stopping ──(a newer owner took over)▶ Fenced
//! Fenced ──(recover, once that owner is gone)─────────────────▶ Starting | Stopped
//! ```

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    #[default]
    Stopped,
    /// Opening replicas (or waiting for one that holds the current data).
    Starting,
    Recovering,
    /// Serving, every replica online.
    Live,
    /// Serving with at least one replica not online.
    Degraded,
    Stopping,
    /// Could not start or lost its device; see the reason in status.
    Failed,
    /// A newer owner (higher generation) took the replicas: I/O fails and the
    /// device is removed. Restart the volume only once that owner is gone.
    Fenced,
}

impl VolumeState {
    pub const NAMES: [&'static str; 8] = [
        "Stopped",
        "Starting",
        "Recovering",
        "Live",
        "Degraded",
        "Stopping",
        "Failed",
        "Fenced",
    ];

    #[cfg(test)]
    const ALL: [VolumeState; 8] = [
        VolumeState::Stopped,
        VolumeState::Starting,
        VolumeState::Recovering,
        VolumeState::Live,
        VolumeState::Degraded,
        VolumeState::Stopping,
        VolumeState::Failed,
        VolumeState::Fenced,
    ];

    pub fn can_become(self, next: VolumeState) -> bool {
        use VolumeState::*;
        matches!(
            (self, next),
            (Stopped, Starting)
                | (Stopped | Starting, Recovering)
                | (Starting | Recovering, Live | Degraded)
                | (Live, Degraded)
                | (Degraded, Live)
                | (Starting | Recovering | Live | Degraded, Stopping)
                | (Stopping, Stopped)
                | (
                    Starting | Recovering | Live | Degraded | Stopping,
                    Failed | Fenced
                )
                | (Failed, Starting | Recovering | Stopped)
                | (Fenced, Starting | Stopped)
        )
    }

    pub fn is_serving(self) -> bool {
        matches!(self, VolumeState::Live | VolumeState::Degraded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use replication::testing::diagram_edges;

    #[test]
    fn the_diagram_and_can_become_say_the_same_thing() {
        let drawn = diagram_edges(include_str!("lifecycle.rs"), &VolumeState::NAMES);
        for (from, a) in VolumeState::NAMES.iter().zip(VolumeState::ALL) {
            for (to, b) in VolumeState::NAMES.iter().zip(VolumeState::ALL) {
                let is_drawn = drawn.contains(&(from.to_string(), to.to_string()));
                assert_eq!(
                    a.can_become(b),
                    is_drawn,
                    "{from} -> {to}: can_become and the diagram disagree"
                );
            }
        }
    }
}
