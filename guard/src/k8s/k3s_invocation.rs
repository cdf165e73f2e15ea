//! How k3s is started on this host: which config file it reads and what its
//! command line disables, read the way k3s itself reads them
//! (k3s `pkg/configfilearg/parser.go`):
//! - the config file is `$K3S_CONFIG_FILE` if set, else `--config`/`-c`, else
//!   `/etc/rancher/k3s/config.yaml`; its drop-ins are the `.yaml`/`.yml`
//!   files (any case) in `<config>.d/`, in name order;
//! - flags on the command line come after the config file's: `--disable`
//!   there appends to what the files disable.
//!
//! The command line and environment come from the running k3s server
//! (`/proc/PID/cmdline`, `/proc/PID/environ`) when there is one, else from the
//! systemd unit the k3s installer writes (`k3s.service`'s `ExecStart`, and
//! `k3s.service.env` / `Environment=` for the environment).

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use super::harden::Component;

/// k3s's default config file, relative to the root.
pub const DEFAULT_CONFIG: &str = "etc/rancher/k3s/config.yaml";
/// The units the k3s installer writes (server, then agent).
const UNITS: [&str; 2] = [
    "etc/systemd/system/k3s.service",
    "etc/systemd/system/k3s-agent.service",
];
const CONFIG_ENV: &str = "K3S_CONFIG_FILE";

/// What k3s's start says about hardening.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct K3sInvocation {
    /// The config file k3s reads, below the root.
    pub config: PathBuf,
    /// Components the command line disables (`--disable traefik`).
    pub cli_disabled: BTreeSet<Component>,
    /// Where the command line was read: a process, a unit, or nothing found.
    pub from: String,
}

impl K3sInvocation {
    /// The config file and its drop-ins, in k3s's reading order.
    pub fn config_files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.config.clone()];
        let dir = PathBuf::from(format!("{}.d", self.config.display()));
        if let Ok(entries) = fs::read_dir(&dir) {
            let mut drop_ins: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().is_some_and(|n| {
                        let n = n.to_string_lossy().to_ascii_lowercase();
                        n.ends_with(".yaml") || n.ends_with(".yml")
                    })
                })
                .collect();
            drop_ins.sort();
            files.extend(drop_ins);
        }
        files
    }

    /// The drop-in directory k3s reads for this config file.
    pub fn drop_in_dir(&self) -> PathBuf {
        PathBuf::from(format!("{}.d", self.config.display()))
    }
}

/// Finds how k3s is started below `root`; `proc` is the /proc to look for a
/// running k3s server in (none: only the unit files).
pub fn discover(root: &Path, proc: Option<&Path>) -> K3sInvocation {
    if let Some(found) = proc.and_then(running_server) {
        return from_args(root, &found.0, &found.1, found.2);
    }
    for unit in UNITS {
        let path = root.join(unit);
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        let args = exec_start(&text);
        let mut env = unit_environment(&text);
        let env_file = fs::read_to_string(format!("{}.env", path.display())).unwrap_or_default();
        env.extend(env_lines(&env_file));
        return from_args(root, &args, &env, format!("unit {}", path.display()));
    }
    K3sInvocation {
        config: root.join(DEFAULT_CONFIG),
        cli_disabled: BTreeSet::new(),
        from: "no k3s unit or process found: k3s's defaults".into(),
    }
}

fn from_args(
    root: &Path,
    args: &[String],
    env: &[(String, String)],
    from: String,
) -> K3sInvocation {
    let env_config = env
        .iter()
        .rev()
        .find(|(k, v)| k == CONFIG_ENV && !v.is_empty())
        .map(|(_, v)| v.clone());
    let mut flag_config = None;
    let mut cli_disabled = BTreeSet::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with('-') => (n, Some(v.to_owned())),
            _ => (arg.as_str(), None),
        };
        let value = || inline.clone().or_else(|| args.get(i + 1).cloned());
        match name {
            "--config" | "-c" => flag_config = value(),
            "--disable" => {
                if let Some(v) = value() {
                    cli_disabled.extend(v.split(',').filter_map(Component::from_name));
                }
            }
            _ => {}
        }
        if inline.is_none() && matches!(name, "--config" | "-c" | "--disable") {
            i += 1;
        }
        i += 1;
    }
    let config = env_config.or(flag_config).map_or_else(
        || root.join(DEFAULT_CONFIG),
        |c| root.join(c.trim_start_matches('/')),
    );
    K3sInvocation {
        config,
        cli_disabled,
        from,
    }
}

/// A process's arguments, its environment, and what it is (for `from`).
type Started = (Vec<String>, Vec<(String, String)>, String);

/// The running k3s server: its arguments and environment, from /proc.
fn running_server(proc: &Path) -> Option<Started> {
    for entry in fs::read_dir(proc).ok()?.filter_map(Result::ok) {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_k3s = args
            .first()
            .is_some_and(|a| Path::new(a).file_name().is_some_and(|n| n == "k3s"));
        if !is_k3s || args.get(1).map(String::as_str) != Some("server") {
            continue;
        }
        let environ = fs::read(entry.path().join("environ")).unwrap_or_default();
        let env = environ
            .split(|b| *b == 0)
            .filter_map(|kv| {
                let kv = String::from_utf8_lossy(kv);
                kv.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
            })
            .collect();
        return Some((args, env, format!("process {}", name.to_string_lossy())));
    }
    None
}

/// `ExecStart=` of a unit, continuation lines joined, split like a shell
/// splits words (the installer quotes each argument in single quotes).
fn exec_start(unit: &str) -> Vec<String> {
    let joined = unit.replace("\\\n", " ");
    let Some(line) = joined
        .lines()
        .map(str::trim)
        .rfind(|l| l.starts_with("ExecStart="))
    else {
        return Vec::new();
    };
    shell_words(
        line.trim_start_matches("ExecStart=")
            .trim_start_matches(['-', '@', '+']),
    )
}

fn unit_environment(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix("Environment="))
        .flat_map(shell_words)
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// `KEY=value` lines of an environment file (quotes removed, comments skipped).
fn env_lines(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            let v = shell_words(v).into_iter().next().unwrap_or_default();
            Some((k.trim().to_owned(), v))
        })
        .collect()
}

fn shell_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `k3s.service` as the k3s installer writes it (install.sh,
    /// `create_systemd_service_file`), started with `--disable traefik`.
    const UNIT: &str = "[Unit]\nDescription=Lightweight Kubernetes\n\n[Service]\nType=notify\n\
EnvironmentFile=-/etc/default/%N\nEnvironmentFile=-/etc/sysconfig/%N\n\
EnvironmentFile=-/etc/systemd/system/k3s.service.env\nKillMode=process\n\
ExecStartPre=/bin/sh -xc '! /usr/bin/systemctl is-enabled --quiet nm-cloud-setup.service'\n\
ExecStart=/usr/local/bin/k3s \\\n    server \\\n\t'--disable' \\\n\t'traefik' \\\n\t'--write-kubeconfig-mode=644' \\\n\n";

    #[test]
    fn the_units_disable_and_the_env_files_config_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let units = dir.path().join("etc/systemd/system");
        fs::create_dir_all(&units).unwrap();
        fs::write(units.join("k3s.service"), UNIT).unwrap();
        fs::write(
            units.join("k3s.service.env"),
            "K3S_CONFIG_FILE='/opt/k3s/config.yaml'\n",
        )
        .unwrap();
        let inv = discover(dir.path(), None);
        assert_eq!(inv.cli_disabled, BTreeSet::from([Component::Traefik]));
        assert_eq!(inv.config, dir.path().join("opt/k3s/config.yaml"));
        assert!(inv.from.starts_with("unit "), "{}", inv.from);
    }

    #[test]
    fn config_flag_forms_and_the_default() {
        let root = Path::new("/r");
        let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let inv = from_args(
            root,
            &args(&["k3s", "server", "-c", "/x/c.yaml"]),
            &[],
            String::new(),
        );
        assert_eq!(inv.config, Path::new("/r/x/c.yaml"));
        let inv = from_args(
            root,
            &args(&[
                "k3s",
                "server",
                "--config=/y.yaml",
                "--disable=servicelb,traefik",
            ]),
            &[],
            String::new(),
        );
        assert_eq!(inv.config, Path::new("/r/y.yaml"));
        assert_eq!(inv.cli_disabled.len(), 2);
        // The environment wins over the flag, as in k3s.
        let env = [(CONFIG_ENV.to_owned(), "/e.yaml".to_owned())];
        let inv = from_args(
            root,
            &args(&["k3s", "server", "-c", "/x.yaml"]),
            &env,
            String::new(),
        );
        assert_eq!(inv.config, Path::new("/r/e.yaml"));
        let inv = discover(Path::new("/nonexistent-root"), None);
        assert_eq!(
            inv.config,
            Path::new("/nonexistent-root").join(DEFAULT_CONFIG)
        );
    }

    #[test]
    fn drop_ins_of_any_case_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("c.yaml");
        let d = dir.path().join("c.yaml.d");
        fs::create_dir_all(d.join("sub.yaml")).unwrap();
        for f in ["20-b.YAML", "10-a.yml", "30-c.txt", "05-z.Yaml"] {
            fs::write(d.join(f), "").unwrap();
        }
        let inv = K3sInvocation {
            config: config.clone(),
            ..Default::default()
        };
        let names: Vec<String> = inv
            .config_files()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["c.yaml", "05-z.Yaml", "10-a.yml", "20-b.YAML"]);
    }
}
