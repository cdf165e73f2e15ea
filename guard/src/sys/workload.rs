//! What a cgroup path says about the workload: a systemd unit, a Docker
//! container, a Kubernetes pod.

use serde::Serialize;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Workload {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Full container id (Docker, containerd, CRI-O).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// Kubernetes pod UID (from a kubepods cgroup).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

impl Workload {
    /// Reads a cgroup v2 path such as `/system.slice/docker-<id>.scope`,
    /// `/docker/<id>`, `/kubepods.slice/kubepods-burstable.slice/
    /// kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope` or
    /// `/kubepods/besteffort/pod<uid>/<id>`.
    pub fn from_cgroup_path(path: &str) -> Self {
        let mut w = Self::default();
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let in_kubepods = parts.first().is_some_and(|p| p.starts_with("kubepods"));
        for (i, part) in parts.iter().enumerate() {
            if let Some(id) = container_id(part) {
                w.container_id = Some(id.to_owned());
            } else if in_kubepods && let Some(uid) = pod_uid(part) {
                w.pod_uid = Some(uid);
            } else if i > 0
                && is_hex_id(part)
                && (parts[i - 1] == "docker" || (in_kubepods && pod_uid(parts[i - 1]).is_some()))
            {
                // cgroupfs driver: the bare id below `docker/` or below the pod.
                w.container_id = Some((*part).to_owned());
            } else if part.ends_with(".service")
                || (part.ends_with(".scope") && w.container_id.is_none())
            {
                w.unit = Some((*part).to_owned());
            }
        }
        w
    }
}

fn is_hex_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`, `libpod-<id>.scope`.
fn container_id(part: &str) -> Option<&str> {
    let stem = part.strip_suffix(".scope")?;
    let (_, id) = stem.rsplit_once('-')?;
    is_hex_id(id).then_some(id)
}

/// `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid_with_underscores>.slice` (systemd).
fn pod_uid(part: &str) -> Option<String> {
    let raw = if let Some(stem) = part.strip_suffix(".slice") {
        stem.rsplit_once("-pod")?.1
    } else {
        part.strip_prefix("pod")?
    };
    let uid = raw.replace('_', "-");
    (uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')).then_some(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1c2d9a0b8e7f6a5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b";
    const UID: &str = "0d5a6f3e-1b2c-4d5e-8f9a-0b1c2d3e4f5a";

    #[test]
    fn systemd_unit() {
        let w = Workload::from_cgroup_path("/system.slice/nginx.service");
        assert_eq!(w.unit.as_deref(), Some("nginx.service"));
        assert_eq!(w.container_id, None);
    }

    #[test]
    fn docker_with_systemd_driver_and_cgroupfs_driver() {
        let w = Workload::from_cgroup_path(&format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(w.container_id.as_deref(), Some(ID));
        assert_eq!(w.unit, None);
        let w = Workload::from_cgroup_path(&format!("/docker/{ID}"));
        assert_eq!(w.container_id.as_deref(), Some(ID));
    }

    #[test]
    fn kubernetes_pods_both_drivers() {
        let systemd = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope",
            UID.replace('-', "_")
        );
        let w = Workload::from_cgroup_path(&systemd);
        assert_eq!(w.pod_uid.as_deref(), Some(UID));
        assert_eq!(w.container_id.as_deref(), Some(ID));
        let cgroupfs = format!("/kubepods/besteffort/pod{UID}/{ID}");
        let w = Workload::from_cgroup_path(&cgroupfs);
        assert_eq!(w.pod_uid.as_deref(), Some(UID));
        assert_eq!(w.container_id.as_deref(), Some(ID));
    }

    #[test]
    fn nothing_known() {
        assert_eq!(Workload::from_cgroup_path("/"), Workload::default());
        assert_eq!(
            Workload::from_cgroup_path("/user.slice/session-2.scope").container_id,
            None
        );
    }
}
