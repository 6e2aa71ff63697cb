//! Embeds `prompts/*.md` into the `moat` binary so `moat serve` needs no files beside it.

use std::fmt::Write as _;
use std::path::PathBuf;

fn main() {
    let dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")).join("../prompts");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("prompts/ exists at the workspace root")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "md") && p.file_name().is_some_and(|n| n != "README.md"))
        .collect();
    files.sort();
    let mut out = String::from(
        "/// Built-in prompt files: (file name, contents).\npub(crate) const BUILTIN: &[(&str, &str)] = &[\n",
    );
    for path in &files {
        println!("cargo:rerun-if-changed={}", path.display());
        let name = path.file_name().expect("listed files have names").to_string_lossy();
        let abs = path.canonicalize().expect("listed files exist");
        writeln!(out, "    ({name:?}, include_str!({:?})),", abs.display().to_string()).expect("writing to a String");
    }
    out.push_str("];\n");
    let dest = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("prompts.rs");
    std::fs::write(dest, out).expect("OUT_DIR is writable");
}
