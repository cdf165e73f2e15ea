//! The inspector's parsers and classifier on arbitrary input: nf_tables netlink
//! messages (as a dump delivers them) or `iptables-legacy-save` text. Nothing
//! may panic; whatever decodes is analysed. The body lives in the guard crate
//! (`portguard::nft::fuzz`), where it builds and its seeds run with every test.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| portguard::nft::fuzz::one(data));
