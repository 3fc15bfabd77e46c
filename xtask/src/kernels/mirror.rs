//! The Debian archive to fetch from: `$DRAIN_AGENT_DEBIAN_MIRROR`, else the host's apt
//! sources (deb822 or one-line).

use std::{fs, path::PathBuf};

use anyhow::{Result, bail};

/// Environment variable that overrides the Debian archive taken from the host's apt sources.
const MIRROR_VARIABLE: &str = "DRAIN_AGENT_DEBIAN_MIRROR";

/// The Debian archive: `$DRAIN_AGENT_DEBIAN_MIRROR`, else the first non-security archive in
/// the host's apt sources (deb822 `.sources` files, then `sources.list`), so the matrix uses
/// whatever mirror this machine is allowed to reach.
pub fn debian_mirror() -> Result<String> {
    if let Ok(mirror) = std::env::var(MIRROR_VARIABLE)
        && !mirror.trim().is_empty()
    {
        return Ok(mirror.trim().trim_end_matches('/').to_owned());
    }
    let mut files: Vec<PathBuf> = fs::read_dir("/etc/apt/sources.list.d")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|path| path.extension().is_some_and(|ext| ext == "sources"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    for file in &files {
        let text = fs::read_to_string(file).unwrap_or_default();
        if let Some(mirror) = mirror_in_deb822(&text) {
            return Ok(mirror);
        }
    }
    let list = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    if let Some(mirror) = mirror_in_sources_list(&list) {
        return Ok(mirror);
    }
    bail!("cannot find a Debian archive in the host's apt sources; set {MIRROR_VARIABLE} to one")
}

/// Is this the main archive (not security, not a third party's)?
fn is_main_archive(uri: &str, suites: &str) -> bool {
    uri.starts_with("http")
        && uri.trim_end_matches('/').ends_with("/debian")
        && !suites.contains("-security")
}

fn mirror_in_deb822(text: &str) -> Option<String> {
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == name).then(|| value.trim().to_owned())
            })
        };
        let (Some(uris), suites) = (field("URIs"), field("Suites").unwrap_or_default()) else {
            continue;
        };
        if let Some(uri) = uris
            .split_whitespace()
            .find(|uri| is_main_archive(uri, &suites))
        {
            return Some(uri.trim_end_matches('/').to_owned());
        }
    }
    None
}

fn mirror_in_sources_list(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let mut words = line
            .split_whitespace()
            .skip_while(|word| *word == "deb")
            .skip_while(|word| word.starts_with('[') || word.ends_with(']'));
        if !line.trim_start().starts_with("deb ") {
            return None;
        }
        let uri = words.next()?;
        let suite = words.next().unwrap_or_default();
        is_main_archive(uri, suite).then(|| uri.trim_end_matches('/').to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_main_archive_in_deb822() {
        let text = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n\n\
                    Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            mirror_in_deb822(text).as_deref(),
            Some("http://mirror.example/debian")
        );
        let security_first = "URIs: http://mirror.example/debian\nSuites: bookworm-security\n\n\
                              URIs: http://other.example/debian/\nSuites: bookworm\n";
        assert_eq!(
            mirror_in_deb822(security_first).as_deref(),
            Some("http://other.example/debian")
        );
    }

    #[test]
    fn finds_the_main_archive_in_sources_list() {
        let text = "# comment\ndeb http://mirror.example/debian-security bookworm-security main\n\
                    deb [arch=amd64] http://mirror.example/debian/ bookworm main\n";
        assert_eq!(
            mirror_in_sources_list(text).as_deref(),
            Some("http://mirror.example/debian")
        );
    }
}
