//! `tracing` to stderr: text for people and journald, JSON lines for machines.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Text,
    /// One JSON object per event (for log shippers and tests).
    Json,
}

/// `RUST_LOG` wins when set; otherwise `-v` raises portguard's level.
pub fn init(format: LogFormat, verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "info,portguard=debug",
        _ => "debug,portguard=trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // try_init: a second call (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
