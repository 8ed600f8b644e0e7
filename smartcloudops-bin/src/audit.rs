//! `smartcloudops audit verify FILE…`: checks the hash chain of audit logs.

use std::path::PathBuf;
use std::process::ExitCode;

use smartcloudops_core::decision::audit;

/// Exit status when the chain is broken (a file that cannot be read is a runtime error, 1).
const EXIT_BROKEN: u8 = 4;

/// Verifies `files`, oldest first. One file alone is taken with its rotated predecessors
/// (`FILE.N` … `FILE.1`), so `audit verify audit.jsonl` checks the whole kept history.
pub(crate) fn verify(files: &[PathBuf]) -> ExitCode {
    let files: Vec<PathBuf> = match files {
        [one] => audit::files_of(one),
        many => many.to_vec(),
    };
    let report = match audit::verify(&files) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: reading the audit log: {e}");
            return ExitCode::from(1);
        }
    };
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    for b in &report.breaks {
        println!("{b}");
    }
    let span = match (report.first_seq, report.last_seq) {
        (Some(a), Some(b)) => format!("seq {a}..={b}"),
        _ => "no chained record".to_owned(),
    };
    if let Some(first) = report.first_seq.filter(|s| *s > 0) {
        println!(
            "note: the chain starts at seq {first}: earlier records were in files rotated away \
             or not given"
        );
    }
    if report.is_intact() {
        println!(
            "{}: ok: {} records, {span}, the chain is intact; last hash {}",
            names.join(", "),
            report.records,
            report.head.as_deref().unwrap_or("-")
        );
        ExitCode::SUCCESS
    } else {
        println!(
            "{}: BROKEN in {} place(s): {} records, {span}",
            names.join(", "),
            report.breaks.len(),
            report.records
        );
        ExitCode::from(EXIT_BROKEN)
    }
}
