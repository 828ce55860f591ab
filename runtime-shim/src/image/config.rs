//! The parts of an OCI image configuration a container is built from (entrypoint, command,
//! environment, working directory, user, stop signal), and resolving a user name through the
//! image's `/etc/passwd` and `/etc/group`.

use serde::Deserialize;

/// An image's run configuration (`config` in the OCI image config JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    /// `Entrypoint`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub cmd: Vec<String>,
    /// `Env`, as `KEY=value`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub env: Vec<String>,
    /// `WorkingDir`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub working_dir: String,
    /// `User`: `user[:group]`, each a name or a number.
    #[serde(default, deserialize_with = "null_as_default")]
    pub user: String,
    /// `StopSignal`, e.g. `SIGQUIT` or `3`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub stop_signal: String,
}

fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[derive(Deserialize)]
struct Document {
    #[serde(default)]
    config: Option<ImageConfig>,
}

/// Parses the run configuration out of an image config blob.
pub fn parse(blob: &[u8]) -> Result<ImageConfig, serde_json::Error> {
    Ok(serde_json::from_slice::<Document>(blob)?
        .config
        .unwrap_or_default())
}

/// A user as the container process runs: uid, gid and supplementary groups.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ids {
    /// User ID.
    pub uid: u32,
    /// Primary group ID.
    pub gid: u32,
}

/// Looks `name` (or a number) up in `passwd` content; returns uid and primary gid.
pub fn lookup_user(passwd: &str, name: &str) -> Option<Ids> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 4 {
            return None;
        }
        let matches = fields[0] == name || (name.parse::<u32>().is_ok() && fields[2] == name);
        if !matches {
            return None;
        }
        Some(Ids {
            uid: fields[2].parse().ok()?,
            gid: fields[3].parse().ok()?,
        })
    })
}

/// Looks a group `name` (or a number) up in `group` content.
pub fn lookup_group(group: &str, name: &str) -> Option<u32> {
    group.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 3 {
            return None;
        }
        (fields[0] == name || fields[2] == name)
            .then(|| fields[2].parse().ok())
            .flatten()
    })
}

/// The supplementary groups `user` belongs to in `group` content.
pub fn member_groups(group: &str, user: &str) -> Vec<u32> {
    group
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.len() >= 4 && fields[3].split(',').any(|member| member == user))
                .then(|| fields[2].parse().ok())
                .flatten()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_run_configuration_with_nulls_as_empty() {
        let blob = br#"{"architecture":"amd64","config":{"Entrypoint":null,"Cmd":["sh"],"Env":["PATH=/bin"],"WorkingDir":"/srv","User":"nobody","StopSignal":"SIGQUIT"},"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let config = parse(blob).unwrap();
        assert_eq!(config.entrypoint, Vec::<String>::new());
        assert_eq!(config.cmd, ["sh"]);
        assert_eq!(config.env, ["PATH=/bin"]);
        assert_eq!(config.working_dir, "/srv");
        assert_eq!(config.user, "nobody");
        assert_eq!(config.stop_signal, "SIGQUIT");
        assert_eq!(parse(br#"{"rootfs":{}}"#).unwrap(), ImageConfig::default());
    }

    #[test]
    fn users_and_groups_resolve_by_name_or_number() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65533:nobody:/:/bin/false\n";
        let group = "root:x:0:\nnogroup:x:65533:\nwheel:x:10:nobody,root\n";
        assert_eq!(
            lookup_user(passwd, "nobody"),
            Some(Ids {
                uid: 65534,
                gid: 65533
            })
        );
        assert_eq!(lookup_user(passwd, "0"), Some(Ids { uid: 0, gid: 0 }));
        assert_eq!(lookup_user(passwd, "daemon"), None);
        assert_eq!(lookup_group(group, "wheel"), Some(10));
        assert_eq!(lookup_group(group, "65533"), Some(65533));
        assert_eq!(member_groups(group, "nobody"), [10]);
    }
}
