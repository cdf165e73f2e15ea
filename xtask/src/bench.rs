//! `cargo xtask bench …`: one line per figure, `name value unit`.

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Which {
    /// bind()+close() with the guard attached versus not, and a bind storm.
    Bind,
}

pub fn bench(which: Which) -> anyhow::Result<()> {
    match which {
        Which::Bind => anyhow::bail!("bench bind: not built yet"),
    }
}
