//! `cargo xtask bench …`: one line per figure, `name value unit`.

use crate::{setup, sh};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Which {
    /// bind()+close() with the guard attached versus not, and a bind storm.
    Bind,
}

pub fn bench(which: Which) -> anyhow::Result<()> {
    setup::setup()?;
    sh::require_root("the benchmarks")?;
    match which {
        Which::Bind => sh::cargo(&[
            "run",
            "--quiet",
            "--release",
            "--package",
            "portguard-tests",
            "--bin",
            "bench_bind",
        ]),
    }
}
