//! Which host wrote a record: its hostname and `/etc/machine-id`, so the logs
//! of many hosts can be merged and still say where each thing happened.

use std::{fmt, fs};

use serde::{Deserialize, Serialize};

/// Where the machine id lives (systemd's `machine-id(5)`).
pub const MACHINE_ID_PATH: &str = "/etc/machine-id";
/// The hostname of this UTS namespace (what `hostname` prints).
const HOSTNAME_PATH: &str = "/proc/sys/kernel/hostname";

/// A host, as its audit records name it.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Host {
    /// The hostname when the log was opened.
    pub name: String,
    /// `/etc/machine-id`: stable across renames and reinstalls of the agent;
    /// empty where the file is missing (a bare container).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub machine_id: String,
}

impl Host {
    /// This host, read now. Never fails: an unreadable part stays empty.
    pub fn this() -> Self {
        let read = |path: &str| {
            fs::read_to_string(path)
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        Self {
            name: read(HOSTNAME_PATH),
            machine_id: read(MACHINE_ID_PATH),
        }
    }

    /// The short form for tables: the name, else the machine id's start.
    pub fn label(&self) -> String {
        if !self.name.is_empty() {
            self.name.clone()
        } else if !self.machine_id.is_empty() {
            self.machine_id.chars().take(12).collect()
        } else {
            "unknown".into()
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_host_is_the_kernels_hostname_and_the_machine_id() {
        let h = Host::this();
        assert_eq!(
            h.name,
            fs::read_to_string(HOSTNAME_PATH).unwrap().trim(),
            "the UTS namespace's hostname"
        );
        if let Ok(id) = fs::read_to_string(MACHINE_ID_PATH) {
            assert_eq!(h.machine_id, id.trim());
        }
    }

    #[test]
    fn label_falls_back_to_the_machine_id_then_unknown() {
        let h = Host {
            name: String::new(),
            machine_id: "3d1219c7c4c5404aaa1f6d2a48adfda4".into(),
        };
        assert_eq!(h.label(), "3d1219c7c4c5");
        assert_eq!(Host::default().label(), "unknown");
    }
}
