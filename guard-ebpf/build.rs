use which::which;

/// The crate links with `bpf-linker`, which cargo does not know about: rebuild when it changes.
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!("cargo:warning=bpf-linker not found on PATH: run `cargo xtask setup`"),
    }
}
