//! `portguard k3s harden` as an operator runs it, against a temporary root.

use std::{fs, path::Path, process::Command};

use portguard_tests::portguard_bin;

fn harden(root: &Path, extra: &[&str]) -> (i32, String) {
    let out = Command::new(portguard_bin())
        .args(["k3s", "harden", "--root"])
        .arg(root)
        .args(extra)
        .output()
        .unwrap_or_else(|e| panic!("cannot run portguard: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().expect("exit code"), text)
}

#[test]
fn harden_writes_once_says_restart_then_changes_nothing_and_check_agrees() {
    let root = tempfile::tempdir().expect("temp root");
    let (code, text) = harden(root.path(), &["--check"]);
    assert_eq!(code, 1, "not hardened yet: {text}");
    assert!(text.contains("not hardened"), "{text}");

    let main = root.path().join("etc/rancher/k3s/config.yaml");
    fs::create_dir_all(main.parent().expect("parent")).expect("config dir");
    fs::write(&main, "disable: [metrics-server]\n").expect("main config");

    let (code, text) = harden(root.path(), &["--servicelb"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("created"), "{text}");
    assert!(text.contains("k3s must restart"), "{text}");
    let drop_in = root
        .path()
        .join("etc/rancher/k3s/config.yaml.d/90-portguard.yaml");
    let written = fs::read_to_string(&drop_in).expect("drop-in written");
    assert!(
        written.contains("disable+:\n  - traefik\n  - servicelb\n"),
        "{written}"
    );
    assert!(
        root.path()
            .join("var/lib/rancher/k3s/server/manifests/traefik.yaml.skip")
            .is_file()
    );
    assert_eq!(
        fs::read_to_string(&main).expect("main config"),
        "disable: [metrics-server]\n",
        "the main config is never edited"
    );

    let (code, text) = harden(root.path(), &[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("already hardened: nothing changed"), "{text}");
    assert!(!text.contains("must restart"), "{text}");
    assert_eq!(fs::read_to_string(&drop_in).expect("drop-in"), written);

    let (code, text) = harden(root.path(), &["--check"]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.starts_with("k3s: hardened: disabled [traefik, servicelb], traefik.yaml.skip present"),
        "{text}"
    );
}

#[test]
fn harden_into_an_unwritable_root_exits_2_with_the_path() {
    let root = tempfile::tempdir().expect("temp root");
    // A file where the config directory must go: no write can succeed, even as root.
    fs::create_dir_all(root.path().join("etc/rancher")).expect("dirs");
    fs::write(root.path().join("etc/rancher/k3s"), "").expect("blocking file");
    let (code, text) = harden(root.path(), &[]);
    assert_eq!(code, 2, "{text}");
    assert!(text.starts_with("portguard: error: cannot "), "{text}");
    assert!(text.contains("/etc/rancher/k3s/config.yaml.d"), "{text}");
    assert_eq!(
        text.matches("Not a directory").count(),
        1,
        "said once: {text}"
    );
}
