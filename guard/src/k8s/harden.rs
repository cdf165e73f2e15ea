//! k3s prevention: stop k3s from deploying its packaged Traefik (and, when asked,
//! ServiceLB) at the source, so that nothing has to be removed again after every
//! k3s start.
//!
//! Two files, both written atomically (temp file + rename) and only when their
//! content differs, so a second run changes nothing:
//! - a drop-in `ROOT/etc/rancher/k3s/config.yaml.d/90-portguard.yaml` with
//!   `disable+: [traefik]` (+ `servicelb`). `disable+` appends to what other config
//!   files disable instead of replacing it: a plain `disable:` in a drop-in would
//!   silently re-enable whatever the main config.yaml disables (k3s's "last value
//!   wins" rule for config files). The main config.yaml is never edited.
//! - the marker `ROOT/var/lib/rancher/k3s/server/manifests/traefik.yaml.skip`:
//!   k3s still writes its packaged `traefik.yaml` on every start, but its
//!   deploy controller does not apply a manifest that has a `.skip` sibling,
//!   so the marker also holds if the drop-in is lost.
//!
//! Either one keeps Traefik from being deployed again. The drop-in goes
//! beside the config file k3s actually reads ([`super::k3s_invocation`]:
//! `K3S_CONFIG_FILE`, `--config`). Neither takes effect before k3s restarts;
//! the caller says so.

use std::{
    collections::BTreeSet,
    fs,
    io::{self, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use serde::Serialize;

use super::k3s_invocation::discover;

/// The drop-in portguard owns; other drop-ins are never touched.
pub const DROP_IN_NAME: &str = "90-portguard.yaml";
pub const CONFIG_DIR: &str = "etc/rancher/k3s";
pub const MANIFESTS_DIR: &str = "var/lib/rancher/k3s/server/manifests";
pub const TRAEFIK_SKIP_MARKER: &str = "traefik.yaml.skip";

const DROP_IN_HEADER: &str = "\
# Written by `portguard k3s harden`: keeps k3s from deploying the packaged
# components below, whose LoadBalancer Services and svclb hostPorts take ports
# 80/443 away from the host's own services. `disable+` appends to what other
# config files disable. k3s reads this only when it starts.
# To re-enable a component, remove it here (or delete this file) and restart k3s.
";

/// A packaged k3s component that hardening can disable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Component {
    Traefik,
    Servicelb,
}

impl Component {
    pub fn name(self) -> &'static str {
        match self {
            Self::Traefik => "traefik",
            Self::Servicelb => "servicelb",
        }
    }

    pub(super) fn from_name(name: &str) -> Option<Self> {
        match name.trim() {
            "traefik" => Some(Self::Traefik),
            "servicelb" => Some(Self::Servicelb),
            _ => None,
        }
    }
}

/// The paths hardening touches below one root (`/` on a real host).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct K3sPaths {
    pub root: PathBuf,
}

impl K3sPaths {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn main_config(&self) -> PathBuf {
        self.root.join(CONFIG_DIR).join("config.yaml")
    }

    pub fn drop_in_dir(&self) -> PathBuf {
        self.root.join(CONFIG_DIR).join("config.yaml.d")
    }

    pub fn drop_in(&self) -> PathBuf {
        self.drop_in_dir().join(DROP_IN_NAME)
    }

    pub fn manifests_dir(&self) -> PathBuf {
        self.root.join(MANIFESTS_DIR)
    }

    pub fn skip_marker(&self) -> PathBuf {
        self.manifests_dir().join(TRAEFIK_SKIP_MARKER)
    }
}

#[derive(Debug, thiserror::Error)]
// The io::Error is in the message and deliberately not a `source`: anyhow's
// one-line chain at the CLI edge would print it twice.
pub enum HardenError {
    #[error("cannot create {path}: {error}")]
    CreateDir { path: PathBuf, error: io::Error },
    #[error("cannot read {path}: {error}")]
    Read { path: PathBuf, error: io::Error },
    #[error("cannot write {path}: {error}")]
    Write { path: PathBuf, error: io::Error },
}

/// What one run did to one file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileChange {
    Created,
    Updated,
    Unchanged,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HardenOutcome {
    pub drop_in: PathBuf,
    pub drop_in_change: FileChange,
    /// What the drop-in disables after this run.
    pub disabled: BTreeSet<Component>,
    pub skip_marker: PathBuf,
    pub skip_marker_change: FileChange,
}

impl HardenOutcome {
    /// True when this run wrote anything, so k3s must restart to apply it.
    pub fn changed(&self) -> bool {
        self.drop_in_change != FileChange::Unchanged
            || self.skip_marker_change != FileChange::Unchanged
    }
}

/// Writes the drop-in and the skip marker below `paths.root`, idempotently.
///
/// The drop-in only ever grows: a component that an earlier run disabled stays
/// disabled even when this run was not asked for it, so that re-running plain
/// `harden` (from an installer, say) never re-enables ServiceLB behind the
/// operator's back. Re-enabling is a deliberate edit of the drop-in.
pub fn harden(paths: &K3sPaths, servicelb: bool) -> Result<HardenOutcome, HardenError> {
    // Beside the config file k3s reads (K3S_CONFIG_FILE, --config), not a default.
    let invocation = discover(&paths.root, proc_of(&paths.root));
    let drop_in_dir = invocation.drop_in_dir();
    let drop_in = drop_in_dir.join(DROP_IN_NAME);
    let existing = read_optional(&drop_in)?;
    let mut disabled: BTreeSet<Component> = existing
        .as_deref()
        .map(|text| disabled_in(text).0)
        .unwrap_or_default();
    disabled.insert(Component::Traefik);
    if servicelb {
        disabled.insert(Component::Servicelb);
    }
    let wanted = drop_in_text(&disabled);
    let drop_in_change = match existing.as_deref() {
        Some(text) if text == wanted => FileChange::Unchanged,
        Some(_) => {
            write_atomically(&drop_in, wanted.as_bytes())?;
            FileChange::Updated
        }
        None => {
            create_dir(&drop_in_dir)?;
            write_atomically(&drop_in, wanted.as_bytes())?;
            FileChange::Created
        }
    };

    let skip_marker = paths.skip_marker();
    let skip_marker_change = if skip_marker.exists() {
        FileChange::Unchanged
    } else {
        create_dir(&paths.manifests_dir())?;
        // k3s only checks that the marker exists; the text is for the next reader.
        write_atomically(
            &skip_marker,
            b"# portguard k3s harden: k3s skips deploying its packaged traefik.yaml\n",
        )?;
        FileChange::Created
    };

    Ok(HardenOutcome {
        drop_in,
        drop_in_change,
        disabled,
        skip_marker,
        skip_marker_change,
    })
}

/// Whether the host is hardened, for `portguard check` and `harden --check`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HardeningStatus {
    /// Whether anything of k3s is there at all (config dir or server data dir).
    pub k3s_present: bool,
    /// Components disabled by k3s's config files or its command line.
    pub disabled: BTreeSet<Component>,
    /// The config files that disable something, in k3s's reading order.
    pub disabled_by: Vec<PathBuf>,
    /// Components disabled on k3s's command line (`--disable`), and where
    /// that command line was read.
    pub cli_disabled: BTreeSet<Component>,
    pub invocation: String,
    /// The config file k3s reads (`K3S_CONFIG_FILE`, `--config`, or the default).
    pub config: PathBuf,
    pub skip_marker: bool,
    /// Config files that could not be read or parsed: the status may be incomplete.
    pub unreadable: Vec<String>,
}

impl HardeningStatus {
    /// Traefik is not deployed again: disabled (config or command line), or
    /// its manifest skipped. Either one suffices.
    pub fn hardened(&self) -> bool {
        self.disabled.contains(&Component::Traefik) || self.skip_marker
    }

    /// One line for people.
    pub fn summary(&self) -> String {
        let disabled: Vec<_> = self.disabled.iter().map(|c| c.name()).collect();
        let state = if self.hardened() {
            "hardened"
        } else if !self.k3s_present {
            "not hardened (no k3s found)"
        } else {
            "NOT hardened"
        };
        format!(
            "k3s: {state}: disabled [{}]{}, traefik.yaml.skip {}",
            disabled.join(", "),
            if self.cli_disabled.is_empty() {
                String::new()
            } else {
                let cli: Vec<_> = self.cli_disabled.iter().map(|c| c.name()).collect();
                format!(" (command line: {})", cli.join(", "))
            },
            if self.skip_marker {
                "present"
            } else {
                "missing"
            }
        )
    }
}

/// Reads the k3s config files below `root` the way k3s does (config.yaml, then the
/// drop-ins in lexical order) and reports what they disable. Never fails: an
/// unreadable file is listed in `unreadable`, because `check` must keep going.
pub fn hardening_status(root: &Path) -> HardeningStatus {
    let paths = K3sPaths::new(root);
    let invocation = discover(root, proc_of(root));
    let files = invocation.config_files();
    let mut status = HardeningStatus {
        k3s_present: root.join(CONFIG_DIR).is_dir() || root.join("var/lib/rancher/k3s").is_dir(),
        disabled: BTreeSet::new(),
        disabled_by: Vec::new(),
        cli_disabled: invocation.cli_disabled.clone(),
        invocation: invocation.from.clone(),
        config: invocation.config.clone(),
        skip_marker: paths.skip_marker().exists(),
        unreadable: Vec::new(),
    };
    for file in files {
        let text = match fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                status.unreadable.push(format!("{}: {e}", file.display()));
                continue;
            }
        };
        let (found, parsed, replaces) = disabled_in(&text);
        if !parsed {
            status
                .unreadable
                .push(format!("{}: not valid YAML", file.display()));
            continue;
        }
        // A plain `disable:` replaces what earlier files said; `disable+:` appends.
        if replaces {
            status.disabled.clear();
            status.disabled_by.clear();
        }
        if !found.is_empty() {
            status.disabled.extend(found);
            status.disabled_by.push(file);
        }
    }
    // Command-line flags come after the files' values and append to them.
    status
        .disabled
        .extend(invocation.cli_disabled.iter().copied());
    status
}

/// The /proc to look for a running k3s in: only for the real root.
fn proc_of(root: &Path) -> Option<&'static Path> {
    (root == Path::new("/")).then(|| Path::new("/proc"))
}

/// The drop-in's full text for a set of components.
fn drop_in_text(disabled: &BTreeSet<Component>) -> String {
    let mut text = String::from(DROP_IN_HEADER);
    text.push_str("disable+:\n");
    for c in disabled {
        text.push_str("  - ");
        text.push_str(c.name());
        text.push('\n');
    }
    text
}

/// The components one k3s config file disables; whether it parsed; whether it
/// uses the replacing `disable` key (rather than only the appending `disable+`).
/// k3s accepts a list or a comma-separated string for list flags.
fn disabled_in(text: &str) -> (BTreeSet<Component>, bool, bool) {
    let Ok(doc) = serde_saphyr::from_str::<Option<serde_json::Value>>(text) else {
        return (BTreeSet::new(), false, false);
    };
    let Some(serde_json::Value::Object(map)) = doc else {
        // An empty file or a non-mapping disables nothing.
        return (BTreeSet::new(), true, false);
    };
    let mut found = BTreeSet::new();
    for key in ["disable", "disable+"] {
        let names: Vec<String> = match map.get(key) {
            Some(serde_json::Value::String(s)) => s.split(',').map(str::to_owned).collect(),
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .filter_map(|v| v.as_str())
                .flat_map(|s| s.split(','))
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        };
        found.extend(names.iter().filter_map(|n| Component::from_name(n)));
    }
    (found, true, map.contains_key("disable"))
}

fn read_optional(path: &Path) -> Result<Option<String>, HardenError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(HardenError::Read {
            path: path.to_owned(),
            error,
        }),
    }
}

fn create_dir(path: &Path) -> Result<(), HardenError> {
    fs::create_dir_all(path).map_err(|error| HardenError::CreateDir {
        path: path.to_owned(),
        error,
    })
}

/// Temp file in the same directory, fsync, rename over, fsync the directory: k3s
/// (or a crash) sees either the old file or the new one, never half of one.
fn write_atomically(path: &Path, content: &[u8]) -> Result<(), HardenError> {
    let err = |error| HardenError::Write {
        path: path.to_owned(),
        error,
    };
    let dir = path
        .parent()
        .ok_or_else(|| err(io::ErrorKind::InvalidInput.into()))?;
    let name = path
        .file_name()
        .ok_or_else(|| err(io::ErrorKind::InvalidInput.into()))?;
    // A dot name that k3s ignores (not *.yaml), unique per process.
    let tmp = dir.join(format!(
        ".{}.portguard-{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(content)?;
        file.set_permissions(fs::Permissions::from_mode(0o644))?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> tempfile::TempDir {
        tempfile::tempdir().expect("temp dir")
    }

    #[test]
    fn first_run_writes_both_files_second_run_changes_nothing() {
        let dir = root();
        let paths = K3sPaths::new(dir.path());
        let first = harden(&paths, false).unwrap();
        assert_eq!(first.drop_in_change, FileChange::Created);
        assert_eq!(first.skip_marker_change, FileChange::Created);
        assert!(first.changed());
        let text = fs::read_to_string(paths.drop_in()).unwrap();
        assert!(text.contains("disable+:\n  - traefik\n"), "{text}");
        assert!(!text.contains("servicelb"));
        assert!(paths.skip_marker().is_file());

        let second = harden(&paths, false).unwrap();
        assert_eq!(second.drop_in_change, FileChange::Unchanged);
        assert_eq!(second.skip_marker_change, FileChange::Unchanged);
        assert!(!second.changed());
        assert_eq!(fs::read_to_string(paths.drop_in()).unwrap(), text);
    }

    #[test]
    fn servicelb_is_added_and_never_dropped_by_a_later_plain_run() {
        let dir = root();
        let paths = K3sPaths::new(dir.path());
        harden(&paths, false).unwrap();
        let with_lb = harden(&paths, true).unwrap();
        assert_eq!(with_lb.drop_in_change, FileChange::Updated);
        assert_eq!(
            with_lb.disabled,
            BTreeSet::from([Component::Traefik, Component::Servicelb])
        );
        let plain = harden(&paths, false).unwrap();
        assert_eq!(plain.drop_in_change, FileChange::Unchanged);
        assert!(plain.disabled.contains(&Component::Servicelb));
    }

    #[test]
    fn other_drop_ins_and_the_main_config_are_left_alone() {
        let dir = root();
        let paths = K3sPaths::new(dir.path());
        fs::create_dir_all(paths.drop_in_dir()).unwrap();
        let main = "write-kubeconfig-mode: \"0644\"\ndisable:\n  - metrics-server\n";
        fs::write(paths.main_config(), main).unwrap();
        let other = paths.drop_in_dir().join("10-site.yaml");
        fs::write(&other, "node-label:\n  - site=a\n").unwrap();

        harden(&paths, true).unwrap();

        assert_eq!(fs::read_to_string(paths.main_config()).unwrap(), main);
        assert_eq!(
            fs::read_to_string(&other).unwrap(),
            "node-label:\n  - site=a\n"
        );
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(paths.drop_in_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn status_of_an_empty_root_is_not_hardened() {
        let dir = root();
        let status = hardening_status(dir.path());
        assert!(!status.hardened());
        assert!(!status.k3s_present);
        assert!(
            status.summary().contains("no k3s found"),
            "{}",
            status.summary()
        );
    }

    #[test]
    fn status_after_harden_is_hardened_and_names_the_drop_in() {
        let dir = root();
        let paths = K3sPaths::new(dir.path());
        harden(&paths, false).unwrap();
        let status = hardening_status(dir.path());
        assert!(status.hardened(), "{status:?}");
        assert_eq!(status.disabled_by, [paths.drop_in()]);
        assert_eq!(
            status.summary(),
            "k3s: hardened: disabled [traefik], traefik.yaml.skip present"
        );
    }

    #[test]
    fn status_reads_comma_lists_and_either_the_disable_or_the_marker_hardens() {
        let dir = root();
        let paths = K3sPaths::new(dir.path());
        fs::create_dir_all(paths.main_config().parent().unwrap()).unwrap();
        fs::write(paths.main_config(), "disable: traefik,servicelb\n").unwrap();
        let status = hardening_status(dir.path());
        assert_eq!(
            status.disabled,
            BTreeSet::from([Component::Traefik, Component::Servicelb])
        );
        assert!(status.hardened(), "the disable alone keeps Traefik away");
        fs::write(paths.main_config(), "disable: servicelb\n").unwrap();
        assert!(!hardening_status(dir.path()).hardened());
        fs::create_dir_all(paths.manifests_dir()).unwrap();
        fs::write(paths.skip_marker(), "").unwrap();
        assert!(
            hardening_status(dir.path()).hardened(),
            "the marker alone keeps its manifest from being applied"
        );
    }

    #[test]
    fn a_later_plain_disable_replaces_earlier_ones() {
        let dir = root();
        let paths = K3sPaths::new(dir.path());
        fs::create_dir_all(paths.drop_in_dir()).unwrap();
        fs::write(paths.main_config(), "disable: [traefik]\n").unwrap();
        fs::write(
            paths.drop_in_dir().join("50-other.yaml"),
            "disable:\n  - metrics-server\n",
        )
        .unwrap();
        let status = hardening_status(dir.path());
        assert!(status.disabled.is_empty(), "{status:?}");
    }

    #[test]
    fn broken_yaml_is_reported_not_fatal() {
        let dir = root();
        let paths = K3sPaths::new(dir.path());
        fs::create_dir_all(paths.drop_in_dir()).unwrap();
        fs::write(paths.drop_in_dir().join("20-bad.yaml"), "disable: [\n").unwrap();
        harden(&paths, false).unwrap();
        let status = hardening_status(dir.path());
        assert!(status.hardened());
        assert_eq!(status.unreadable.len(), 1, "{status:?}");
        assert!(status.unreadable[0].contains("20-bad.yaml"));
    }

    #[test]
    fn what_k3s_reads_is_what_counts_config_env_drop_ins_and_command_line() {
        let dir = root();
        let units = dir.path().join("etc/systemd/system");
        fs::create_dir_all(&units).unwrap();
        // The unit points k3s at another config file; its drop-in (upper-case
        // extension, as k3s accepts) disables Traefik.
        fs::write(
            units.join("k3s.service"),
            "[Service]\nExecStart=/usr/local/bin/k3s \\\n    server \\\n\t'--config' \\\n\t'/opt/k3s/c.yaml' \\\n",
        )
        .unwrap();
        let d = dir.path().join("opt/k3s/c.yaml.d");
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("10-x.YAML"), "disable: [traefik]\n").unwrap();
        // The default config file says nothing (k3s does not read it here).
        fs::create_dir_all(dir.path().join(CONFIG_DIR)).unwrap();
        let status = hardening_status(dir.path());
        assert!(status.hardened(), "{status:?}");
        assert_eq!(status.config, dir.path().join("opt/k3s/c.yaml"));
        assert_eq!(status.disabled_by, [d.join("10-x.YAML")]);
        // `harden` writes its drop-in where k3s reads.
        let out = harden(&K3sPaths::new(dir.path()), false).unwrap();
        assert_eq!(out.drop_in, d.join(DROP_IN_NAME));
        // A `--disable traefik` on the command line counts too.
        fs::remove_dir_all(dir.path().join("opt")).unwrap();
        fs::remove_file(K3sPaths::new(dir.path()).skip_marker()).unwrap();
        fs::write(
            units.join("k3s.service"),
            "[Service]\nExecStart=/usr/local/bin/k3s server --disable=traefik\n",
        )
        .unwrap();
        let status = hardening_status(dir.path());
        assert!(status.hardened(), "{status:?}");
        assert!(
            status.summary().contains("command line: traefik"),
            "{}",
            status.summary()
        );
    }
}
