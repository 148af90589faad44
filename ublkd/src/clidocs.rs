//! Man pages and shell completions, generated from a binary's clap definition,
//! so they never drift from `--help` (packaging runs `ublkd man DIR`, `ublkctl
//! man DIR` and `ublkctl completions SHELL`).

use std::io::Write;
use std::path::{Path, PathBuf};

/// `--version`'s long form: the release and the formats it speaks, which decide
/// what it interoperates with (a server of another release, labels and records
/// written by one).
pub fn long_version() -> String {
    format!(
        "{}\nreplica protocol v{} (serves v2 owners too), replica label formats {} and {} (with snapshots), state record v{}",
        env!("CARGO_PKG_VERSION"),
        wire::version::ProtocolVersion::CURRENT.number(),
        wire::label::LABEL_FORMAT,
        wire::label::LABEL_FORMAT_LAYERED,
        crate::state::RECORD_VERSION,
    )
}

/// Section 8: both binaries are system administration commands.
const SECTION: &str = "8";

/// Write `NAME.8` for `cmd` and `NAME-SUB.8` for each visible subcommand (nested
/// ones too) into `dir`; returns the files written.
pub fn write_man(cmd: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    page(cmd, None, dir, &mut written)?;
    Ok(written)
}

fn page(
    cmd: clap::Command,
    parent: Option<&str>,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let name = match parent {
        Some(p) => format!("{p}-{}", cmd.get_name()),
        None => cmd.get_name().to_string(),
    };
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        page(sub.clone(), Some(&name), dir, written)?;
    }
    let path = dir.join(format!("{name}.{SECTION}"));
    let mut file = std::fs::File::create(&path)?;
    clap_mangen::Man::new(cmd.clone().name(name.clone()).display_name(&name))
        .section(SECTION)
        .source(format!("ublkd {}", env!("CARGO_PKG_VERSION")))
        .manual("ublkd")
        .render(&mut file)?;
    file.flush()?;
    written.push(path);
    Ok(())
}

/// The completion script of `cmd` for `shell`, to stdout.
pub fn completions(mut cmd: clap::Command, shell: clap_complete::Shell) {
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_per_visible_subcommand_with_its_options() {
        let cmd = clap::Command::new("tool")
            .about("A tool")
            .subcommand(
                clap::Command::new("status")
                    .about("Show one volume")
                    .arg(clap::Arg::new("volume").help("Which volume to show")),
            )
            .subcommand(clap::Command::new("secret").hide(true));
        let dir = tempfile::tempdir().unwrap();
        let files = write_man(cmd, dir.path()).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["tool-status.8", "tool.8"]);
        let status = std::fs::read_to_string(dir.path().join("tool-status.8")).unwrap();
        assert!(status.contains(".TH tool-status 8"), "{status}");
        assert!(status.contains("Which volume to show"), "{status}");
    }
}
