//! Image references as the CRI gives them, normalised the way containerd's CRI and docker do:
//! `busybox` is `docker.io/library/busybox:latest`, `local/x` is `docker.io/local/x:latest`,
//! `127.0.0.1:5000/a/b:1` keeps its registry.

/// A normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Registry host (and port): `docker.io`, `127.0.0.1:5000`.
    pub registry: String,
    /// Repository path within it: `library/busybox`.
    pub repository: String,
    /// Tag, when given or defaulted (`latest` when neither tag nor digest is given).
    pub tag: Option<String>,
    /// Digest (`sha256:<hex>`), when given.
    pub digest: Option<String>,
}

/// Why a reference does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {reference:?}: {why}")]
pub struct ReferenceError {
    /// The reference as given.
    pub reference: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl Reference {
    /// Parses and normalises `text`.
    pub fn parse(text: &str) -> Result<Reference, ReferenceError> {
        let error = |why| ReferenceError {
            reference: text.to_owned(),
            why,
        };
        if text.is_empty()
            || text.len() > 4096
            || text
                .chars()
                .any(|c| c.is_whitespace() || c.is_ascii_uppercase() && !text.contains('@'))
        {
            return Err(error(
                "empty, too long, or has white space or upper-case letters",
            ));
        }
        let (name, digest) = match text.split_once('@') {
            Some((name, digest)) => {
                let hex = digest
                    .strip_prefix("sha256:")
                    .ok_or_else(|| error("only sha256 digests are supported"))?;
                if hex.len() != 64
                    || !hex
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                {
                    return Err(error("a sha256 digest has 64 lower-case hex digits"));
                }
                (name, Some(digest.to_owned()))
            }
            None => (text, None),
        };
        let (registry, rest) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), rest.to_owned())
            }
            _ => ("docker.io".to_owned(), name.to_owned()),
        };
        // A tag is after the last ':' of the last path component.
        let (repository, tag) = match rest.rsplit_once(':').filter(|(_, tag)| !tag.contains('/')) {
            Some((repository, tag)) => (repository.to_owned(), Some(tag.to_owned())),
            None => (rest, None),
        };
        if repository.is_empty()
            || repository.split('/').any(|c| {
                c.is_empty()
                    || !c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            })
        {
            return Err(error(
                "repository path components are lower-case letters, digits, '.', '_' and '-'",
            ));
        }
        if tag.as_deref().is_some_and(|t| {
            t.is_empty()
                || t.len() > 128
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        }) {
            return Err(error("a tag is 1-128 letters, digits, '.', '_' or '-'"));
        }
        let repository = if registry == "docker.io" && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_owned())
        } else {
            tag
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The canonical name: `docker.io/library/busybox:latest`, `...@sha256:...`.
    pub fn name(&self) -> String {
        let mut name = format!("{}/{}", self.registry, self.repository);
        if let Some(tag) = &self.tag {
            name.push(':');
            name.push_str(tag);
        }
        if let Some(digest) = &self.digest {
            name.push('@');
            name.push_str(digest);
        }
        name
    }

    /// What to ask the registry's manifest endpoint for: the digest if pinned, else the tag.
    pub fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> String {
        Reference::parse(text).unwrap().name()
    }

    #[test]
    fn references_normalise_like_containerd_cri() {
        assert_eq!(name("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(name("local/x"), "docker.io/local/x:latest");
        assert_eq!(
            name("127.0.0.1:5000/tug-test/http:latest"),
            "127.0.0.1:5000/tug-test/http:latest"
        );
        assert_eq!(name("localhost/a:1.0"), "localhost/a:1.0");
        assert_eq!(
            name("registry.example/a/b/c"),
            "registry.example/a/b/c:latest"
        );
        let pinned = format!("quay.io/x/y@sha256:{}", "a".repeat(64));
        assert_eq!(name(&pinned), pinned);
        let r = Reference::parse("127.0.0.1:5000/tug-test/exit").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.manifest_ref()),
            ("127.0.0.1:5000", "tug-test/exit", "latest")
        );
    }

    #[test]
    fn bad_references_say_why() {
        for bad in [
            "",
            "Busybox",
            "a b",
            "x@md5:abc",
            "x@sha256:short",
            "reg.io//x",
            "x:bad/tag:",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} must not parse");
        }
        assert!(
            Reference::parse("UPPER")
                .unwrap_err()
                .to_string()
                .contains("\"UPPER\"")
        );
    }
}
