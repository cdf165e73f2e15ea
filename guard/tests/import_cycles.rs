//! No import cycles between the modules of `guard/src`: the top-level modules
//! (`nft`, `owners`, `policy`, …) and, inside `nft/`, its files. Reads the
//! sources (`use crate::…`, `crate::x::` paths, `use super::…` in `nft/`),
//! test modules left out, and fails naming each cycle it finds.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// Cycles known and being broken elsewhere (issue 12); each must disappear,
/// never be added to.
const KNOWN: &[&[&str]] = &[];

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).expect("readable source dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without comments and without its `#[cfg(test)]` tail.
fn code(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]") {
            break;
        }
        if t.starts_with("//") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The first path segments after each `prefix` (`crate::`, `super::`),
/// following `{a, b::c}` groups.
fn targets(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        let after = &rest[i + prefix.len()..];
        rest = after;
        if let Some(group) = after.strip_prefix('{') {
            let mut depth = 0;
            let mut at_start = true;
            let mut ident = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => at_start = true,
                    c if c.is_alphanumeric() || c == '_' => {
                        if at_start && depth == 0 {
                            ident.push(c);
                        }
                        continue;
                    }
                    _ => {}
                }
                if !ident.is_empty() {
                    out.insert(std::mem::take(&mut ident));
                    at_start = false;
                } else if !c.is_whitespace() && c != ',' {
                    at_start = false;
                }
            }
            if !ident.is_empty() {
                out.insert(ident);
            }
        } else {
            let ident: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !ident.is_empty() {
                out.insert(ident);
            }
        }
    }
    out.remove("self");
    out
}

/// Every elementary cycle's node set, once.
fn cycles(g: &Graph) -> BTreeSet<Vec<String>> {
    fn walk(
        g: &Graph,
        start: &str,
        at: &str,
        path: &mut Vec<String>,
        out: &mut BTreeSet<Vec<String>>,
    ) {
        for next in g.get(at).into_iter().flatten() {
            if next == start {
                let mut c = path.clone();
                c.sort();
                out.insert(c);
            } else if !path.contains(next) && next.as_str() > start {
                path.push(next.clone());
                walk(g, start, next, path, out);
                path.pop();
            }
        }
    }
    let mut out = BTreeSet::new();
    for start in g.keys() {
        walk(g, start, start, &mut vec![start.clone()], &mut out);
    }
    out
}

fn graphs() -> (Graph, Graph) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let top_level: BTreeSet<String> = files
        .iter()
        .map(|f| top(&src, f))
        .filter(|m| m != "lib" && m != "main")
        .collect();
    let nft_files: BTreeSet<String> = files
        .iter()
        .filter(|f| f.parent() == Some(&src.join("nft")))
        .filter_map(|f| f.file_stem()?.to_str().map(str::to_owned))
        .filter(|m| m != "mod")
        .collect();
    let (mut crate_graph, mut nft_graph) = (Graph::new(), Graph::new());
    for f in &files {
        let c = code(&fs::read_to_string(f).expect("readable source"));
        let from = top(&src, f);
        for to in targets(&c, "crate::") {
            if to != from && top_level.contains(&to) {
                crate_graph.entry(from.clone()).or_default().insert(to);
            }
        }
        if f.parent() == Some(&src.join("nft")) {
            let stem = f.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
            if stem == "mod" {
                continue;
            }
            let mut to_nft = targets(&c, "super::");
            to_nft.extend(targets(&c, "crate::nft::"));
            for to in to_nft {
                if to != stem && nft_files.contains(&to) {
                    nft_graph.entry(stem.to_owned()).or_default().insert(to);
                }
            }
        }
    }
    (crate_graph, nft_graph)
}

/// The top-level module a file belongs to (`nft` for `nft/xt.rs`).
fn top(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("a component");
    let name = first.as_os_str().to_string_lossy();
    name.trim_end_matches(".rs").to_owned()
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    let (g, _) = graphs();
    let known: BTreeSet<Vec<String>> = KNOWN
        .iter()
        .map(|c| c.iter().map(|s| (*s).to_owned()).collect())
        .collect();
    let new: Vec<_> = cycles(&g).difference(&known).cloned().collect();
    assert!(new.is_empty(), "import cycles: {new:?}\ngraph: {g:#?}");
}

#[test]
fn no_import_cycle_inside_nft_and_nft_does_not_know_owners() {
    let (g, nft) = graphs();
    let found = cycles(&nft);
    assert!(found.is_empty(), "import cycles in nft/: {found:?}");
    assert!(
        !g.get("nft").is_some_and(|t| t.contains("owners")),
        "nft imports owners: {:?}",
        g.get("nft")
    );
}

#[test]
fn the_parser_sees_grouped_and_plain_paths() {
    let c = "use crate::{\n    nft::{self, x},\n    owners::Y,\n};\nlet a = crate::policy::Z;";
    let t = targets(c, "crate::");
    assert_eq!(
        t.into_iter().collect::<Vec<_>>(),
        ["nft", "owners", "policy"]
    );
    let mut g = Graph::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("a".into());
    assert_eq!(cycles(&g).len(), 1);
}
