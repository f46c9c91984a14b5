//! The commands' standard output (see the `say!` macro).

use std::io::Write;

/// Writes one line to stdout. A closed pipe ends the process with success, quietly: the reader
/// (`head`) has all it wanted. Any other write error (a full disk behind `>`) ends it with an error.
pub fn line(args: std::fmt::Arguments<'_>) {
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = writeln!(stdout, "{args}").and_then(|()| stdout.flush()) {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to standard output: {error}");
        std::process::exit(1);
    }
}

/// Writes bytes (whole lines) to stdout, as [`line`] does; always true (a closed pipe or a
/// write error ends the process).
pub fn bytes(bytes: &[u8]) -> bool {
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to standard output: {error}");
        std::process::exit(1);
    }
    true
}

/// `1 resource`, `2 resources`: a count with its noun, plural when it is not one.
pub fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("{n} {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_is_singular() {
        assert_eq!(super::count(1, "resource"), "1 resource");
        assert_eq!(super::count(0, "file"), "0 files");
        assert_eq!(super::count(2, "member"), "2 members");
    }
}
