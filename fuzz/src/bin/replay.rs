//! Replays inputs through a fuzz target, on the stable toolchain without instrumentation:
//!
//! ```sh
//! cargo run -p smartcloudops-fuzz --bin replay -- decode_json fuzz/seeds/decode_json fuzz/corpus/decode_json
//! cargo run -p smartcloudops-fuzz --bin replay -- --all fuzz/seeds fuzz/corpus
//! ```
//!
//! A path may be a file or a folder (every file in it). With `--all`, each path is a folder
//! of per-target folders. A broken invariant panics, naming the input.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if path.is_dir() {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(path)? {
            let p = entry?.path();
            if p.is_file() {
                out.push(p);
            }
        }
        out.sort();
        Ok(out)
    } else {
        Ok(vec![path.to_path_buf()])
    }
}

fn replay(
    name: &str,
    target: smartcloudops_fuzz::Target,
    paths: &[PathBuf],
) -> std::io::Result<usize> {
    let mut count = 0;
    for path in paths {
        if !path.exists() {
            continue;
        }
        for file in files(path)? {
            let data = std::fs::read(&file)?;
            eprintln!("{name}: {}", file.display());
            target(&data);
            count += 1;
        }
    }
    Ok(count)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(first) = args.first() else {
        eprintln!("usage: replay TARGET PATH… | replay --all DIR…");
        return ExitCode::from(2);
    };
    let result = if first == "--all" {
        let roots: Vec<PathBuf> = args[1..].iter().map(PathBuf::from).collect();
        smartcloudops_fuzz::TARGETS
            .iter()
            .try_fold(0, |n, (name, target)| {
                let paths: Vec<PathBuf> = roots.iter().map(|r| r.join(name)).collect();
                let replayed = replay(name, *target, &paths)?;
                println!("{name}: {replayed} inputs replayed");
                Ok(n + replayed)
            })
    } else {
        let Some(target) = smartcloudops_fuzz::target(first) else {
            let names: Vec<&str> = smartcloudops_fuzz::TARGETS
                .iter()
                .map(|(n, _)| *n)
                .collect();
            eprintln!("no target `{first}`; the targets are {}", names.join(", "));
            return ExitCode::from(2);
        };
        let paths: Vec<PathBuf> = args[1..].iter().map(PathBuf::from).collect();
        replay(first, target, &paths).inspect(|n| println!("{first}: {n} inputs replayed"))
    };
    match result {
        Ok(0) => {
            eprintln!("no inputs found");
            ExitCode::FAILURE
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replay: {e}");
            ExitCode::FAILURE
        }
    }
}
