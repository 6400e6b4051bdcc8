//! Tag pins: `[pins]` and the pins file, which `pullgate pin` writes.

use std::collections::HashMap;

use crate::oci::names::Digest;

/// Tag pins: (canonical name, tag) to digest.
#[derive(Debug, Clone, Default)]
pub struct Pins {
    by_name: HashMap<String, Vec<(String, Digest)>>,
}

impl Pins {
    /// Adds a pin; `Err` with the digest already pinned when the same tag is
    /// pinned to another digest.
    pub fn insert(&mut self, canonical: &str, tag: &str, digest: Digest) -> Result<(), Digest> {
        let tags = self.by_name.entry(canonical.to_owned()).or_default();
        match tags.iter().find(|(t, _)| t == tag) {
            Some((_, d)) if *d != digest => Err(*d),
            Some(_) => Ok(()),
            None => {
                tags.push((tag.to_owned(), digest));
                Ok(())
            }
        }
    }

    /// The digest `canonical:tag` is pinned to.
    pub fn get(&self, canonical: &str, tag: &str) -> Option<Digest> {
        self.by_name
            .get(canonical)?
            .iter()
            .find(|(t, _)| t == tag)
            .map(|(_, d)| *d)
    }

    pub fn len(&self) -> usize {
        self.by_name.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// Writes a pins file holding `pins` (`"name:tag" = "sha256:..."` under
/// `[pins]`), sorted, through a temp file and a rename: a failure leaves
/// the old file as it was.
pub fn write_pins_file(
    path: &std::path::Path,
    pins: &std::collections::BTreeMap<String, String>,
) -> std::io::Result<()> {
    let mut text = String::from(
        "# Tag pins: each tag resolves to its digest, with no upstream call.\n\
         # Written by `pullgate pin`; loaded through `pins_file` and reloaded on SIGHUP.\n\n[pins]\n",
    );
    for (image, digest) in pins {
        text.push_str(&format!(
            "{} = {}\n",
            toml::Value::String(image.clone()),
            toml::Value::String(digest.clone())
        ));
    }
    crate::fsutil::replace_file(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_resolve_per_name_and_tag_and_refuse_a_second_digest() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        let mut p = Pins::default();
        p.insert("docker.io/library/alpine", "3.20", a).unwrap();
        p.insert("docker.io/library/alpine", "3.20", a).unwrap();
        assert_eq!(p.insert("docker.io/library/alpine", "3.20", b), Err(a));
        p.insert("docker.io/library/alpine", "3.19", b).unwrap();
        assert_eq!(p.get("docker.io/library/alpine", "3.20"), Some(a));
        assert_eq!(p.get("docker.io/library/alpine", "3.19"), Some(b));
        assert_eq!(p.get("docker.io/library/alpine", "latest"), None);
        assert_eq!(p.get("docker.io/library/busybox", "3.20"), None);
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn pins_file_is_replaced_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pins.toml");
        std::fs::write(&path, "old").unwrap();
        let mut pins = std::collections::BTreeMap::new();
        pins.insert(
            "docker.io/library/alpine:3.20".to_owned(),
            Digest::of(b"x").to_string(),
        );
        write_pins_file(&path, &pins).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let table: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(
            table["pins"]["docker.io/library/alpine:3.20"].as_str(),
            Some(Digest::of(b"x").to_string().as_str())
        );
        // A directory that cannot be written: the old file stays.
        let missing = dir.path().join("no-such-dir").join("pins.toml");
        assert!(write_pins_file(&missing, &pins).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }
}
