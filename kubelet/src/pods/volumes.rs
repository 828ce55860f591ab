//! Volumes and the kubelet-managed files of a pod, under `<root>/pods/<uid>/`:
//! `volumes/kubernetes.io~<plugin>/<name>` for emptyDir (a directory, or tmpfs for
//! `medium: Memory` with its `sizeLimit`), configMap, secret, downwardAPI and projected
//! (service-account token from TokenRequest, `ca.crt`, namespace) — secrets and projected
//! volumes on tmpfs so they never touch the disk — plus hostPath with its type checks, the
//! managed `/etc/hosts`, and one termination-message file per container instance. Content
//! volumes are written atomically: a new `..<timestamp>` directory, then the `..data` symlink
//! swapped to it, with the visible names as links through `..data`.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use k8s_cri::v1::{Mount, MountPropagation};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, ServiceAccount, Volume,
};
use kube::Api;
use kube::api::PostParams;

use super::observed::Observed;
use super::worker::Shared;

/// File contents with modes, relative paths.
type Files = BTreeMap<String, (Vec<u8>, u32)>;

fn plugin_dir(pod_dir: &Path, plugin: &str, name: &str) -> PathBuf {
    pod_dir
        .join("volumes")
        .join(format!("kubernetes.io~{plugin}"))
        .join(name)
}

fn is_mounted(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.display().to_string();
    text.lines()
        .any(|line| line.split(' ').nth(4) == Some(wanted.as_str()))
}

fn mount_tmpfs(path: &Path, size: Option<i64>) -> Result<(), String> {
    std::fs::create_dir_all(path).map_err(|e| format!("create {}: {e}", path.display()))?;
    if is_mounted(path) {
        return Ok(());
    }
    let options = match size {
        Some(bytes) if bytes > 0 => format!("mode=0755,size={bytes}"),
        _ => "mode=0755".to_owned(),
    };
    nix::mount::mount(
        Some("tmpfs"),
        path,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some(options.as_str()),
    )
    .map_err(|e| format!("mount tmpfs on {}: {e}", path.display()))
}

fn safe_relative(path: &str) -> Result<(), String> {
    let p = Path::new(path);
    if path.is_empty()
        || p.is_absolute()
        || p.components().any(|c| matches!(c, Component::ParentDir))
        || path.starts_with("..")
    {
        return Err(format!(
            "invalid path {path:?}: must be relative and must not contain '..'"
        ));
    }
    Ok(())
}

/// Writes `files` into `dir` atomically (the `..data` swap); files no longer present vanish.
pub fn write_atomic(dir: &Path, files: &Files) -> Result<(), String> {
    let fail =
        |what: &str, path: &Path, e: std::io::Error| format!("{what} {}: {e}", path.display());
    std::fs::create_dir_all(dir).map_err(|e| fail("create", dir, e))?;
    let data_link = dir.join("..data");
    // Unchanged content: nothing to do (no churn for readers).
    if let Ok(current) = std::fs::read_link(&data_link) {
        let current_dir = dir.join(&current);
        let same = files.iter().all(|(path, (bytes, mode))| {
            let file = current_dir.join(path);
            std::fs::read(&file).is_ok_and(|b| &b == bytes)
                && std::fs::metadata(&file).is_ok_and(|m| m.permissions().mode() & 0o7777 == *mode)
        }) && count_files(&current_dir) == files.len();
        if same {
            return Ok(());
        }
    }
    let stamp = jiff::Timestamp::now()
        .strftime("..%Y_%m_%d_%H_%M_%S.%f")
        .to_string();
    let fresh = dir.join(&stamp);
    std::fs::create_dir(&fresh).map_err(|e| fail("create", &fresh, e))?;
    std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| fail("chmod", &fresh, e))?;
    for (path, (bytes, mode)) in files {
        safe_relative(path)?;
        let target = fresh.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| fail("create", parent, e))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(*mode)
            .open(&target)
            .map_err(|e| fail("create", &target, e))?;
        std::io::Write::write_all(&mut file, bytes).map_err(|e| fail("write", &target, e))?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(*mode))
            .map_err(|e| fail("chmod", &target, e))?;
    }
    let tmp_link = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp_link);
    std::os::unix::fs::symlink(&stamp, &tmp_link).map_err(|e| fail("symlink", &tmp_link, e))?;
    let old = std::fs::read_link(&data_link).ok();
    std::fs::rename(&tmp_link, &data_link).map_err(|e| fail("rename", &data_link, e))?;
    // Visible names: one link per top-level entry through ..data.
    let tops: std::collections::BTreeSet<String> = files
        .keys()
        .map(|p| p.split('/').next().unwrap_or(p).to_owned())
        .collect();
    for top in &tops {
        let link = dir.join(top);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(top), &link)
                .map_err(|e| fail("symlink", &link, e))?;
        }
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("..") && !tops.contains(&name) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    if let Some(old) = old
        && old != Path::new(&stamp)
    {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

fn count_files(dir: &Path) -> usize {
    let mut count = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => count += count_files(&entry.path()),
                Ok(_) => count += 1,
                Err(_) => {}
            }
        }
    }
    count
}

fn project(
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    default_mode: u32,
    what: &str,
    optional: bool,
    out: &mut Files,
) -> Result<(), String> {
    match items {
        None => {
            for (key, bytes) in data {
                out.insert(key.clone(), (bytes.clone(), default_mode));
            }
        }
        Some(items) => {
            for item in items {
                match data.get(&item.key) {
                    Some(bytes) => {
                        let mode = item.mode.map(|m| m as u32).unwrap_or(default_mode);
                        out.insert(item.path.clone(), (bytes.clone(), mode));
                    }
                    None if optional => {}
                    None => {
                        return Err(format!(
                            "configmap references non-existent config key: {} ({what})",
                            item.key
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

fn config_map_bytes(map: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut data: BTreeMap<String, Vec<u8>> = map
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    for (k, v) in map.binary_data.iter().flatten() {
        data.insert(k.clone(), v.0.clone());
    }
    data
}

fn secret_bytes(secret: &Secret) -> BTreeMap<String, Vec<u8>> {
    secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect()
}

fn downward_file(pod: &Pod, item: &DownwardAPIVolumeFile) -> Result<Vec<u8>, String> {
    if let Some(field) = &item.field_ref {
        let render = |map: &Option<BTreeMap<String, String>>| {
            map.iter()
                .flatten()
                .map(|(k, v)| format!("{k}={v:?}\n"))
                .collect::<String>()
        };
        let text = match field.field_path.as_str() {
            "metadata.labels" => render(&pod.metadata.labels),
            "metadata.annotations" => render(&pod.metadata.annotations),
            path => super::env::field_value(pod, path, &Default::default())?,
        };
        return Ok(text.into_bytes());
    }
    if let Some(resource) = &item.resource_field_ref {
        let container = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .find(|c| Some(c.name.as_str()) == resource.container_name.as_deref())
            .cloned()
            .unwrap_or_default();
        let env_pod = pod.clone();
        let var: k8s_openapi::api::core::v1::EnvVar = k8s_openapi::api::core::v1::EnvVar {
            name: "X".into(),
            value_from: Some(k8s_openapi::api::core::v1::EnvVarSource {
                resource_field_ref: Some(resource.clone()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut probe = container.clone();
        probe.env = Some(vec![var]);
        let env = super::env::resolve(&env_pod, &probe, &Default::default(), &Default::default())?;
        return Ok(env
            .last()
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
            .into_bytes());
    }
    Err(format!(
        "downwardAPI item {:?} has neither fieldRef nor resourceFieldRef",
        item.path
    ))
}

/// The keys of a ConfigMap or a Secret, projected into files.
struct KeySource<'a> {
    secret: bool,
    name: &'a str,
    items: Option<&'a Vec<KeyToPath>>,
    optional: bool,
    mode: u32,
}

async fn add_keys(
    shared: &Shared,
    namespace: &str,
    source: KeySource<'_>,
    files: &mut Files,
) -> Result<(), String> {
    let (data, what) = if source.secret {
        let found = fetch::<Secret>(shared, namespace, source.name).await?;
        (found.map(|s| secret_bytes(&s)), "secret")
    } else {
        let found = fetch::<ConfigMap>(shared, namespace, source.name).await?;
        (found.map(|m| config_map_bytes(&m)), "configmap")
    };
    match data {
        Some(data) => project(
            &data,
            source.items,
            source.mode,
            source.name,
            source.optional,
            files,
        ),
        None if source.optional => Ok(()),
        None => Err(format!("{what} {:?} not found", source.name)),
    }
}

/// A namespaced object by name from the API (`None`: it does not exist, or there is no API).
pub async fn fetch<K>(shared: &Shared, namespace: &str, name: &str) -> Result<Option<K>, String>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let Some(client) = &shared.client else {
        return Ok(None);
    };
    Api::<K>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(|e| {
            format!(
                "get {} {name:?}: {e}",
                K::kind(&Default::default()).to_lowercase()
            )
        })
}

async fn service_account_token(
    shared: &Shared,
    pod: &Pod,
    audience: Option<String>,
    expiration: Option<i64>,
) -> Result<Vec<u8>, String> {
    let Some(client) = &shared.client else {
        return Err(
            "a service-account token needs the API server (standalone mode has none)".into(),
        );
    };
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let lifetime = expiration.unwrap_or(3607);
    let key = format!("{uid}/{}/{lifetime}", audience.clone().unwrap_or_default());
    let now = jiff::Timestamp::now().as_second();
    // Rotated at 80 % of its lifetime, as upstream's kubelet does.
    let cached = shared
        .tokens
        .lock()
        .expect("tokens lock")
        .get(&key)
        .cloned();
    if let Some((token, issued, expires)) = cached
        && now < issued + (expires - issued) * 8 / 10
    {
        return Ok(token);
    }
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audience.into_iter().collect(),
            expiration_seconds: Some(lifetime),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
    let reply: TokenRequest = api
        .create_subresource("token", &account, &PostParams::default(), &request)
        .await
        .map_err(|e| format!("request a token for service account {namespace}/{account}: {e}"))?;
    let status = reply
        .status
        .ok_or_else(|| format!("the token request for {namespace}/{account} returned no token"))?;
    let expires = status.expiration_timestamp.0.as_second();
    let token = status.token.into_bytes();
    shared
        .tokens
        .lock()
        .expect("tokens lock")
        .insert(key, (token.clone(), now, expires.max(now + 60)));
    Ok(token)
}

/// Rewrites the content volumes (configMap, secret, downwardAPI, projected) of a pod whose
/// volumes were set up, so running containers see updates.
pub async fn refresh(shared: &Shared, pod: &Pod) -> Result<(), String> {
    let pod_dir = shared.pod_dir(pod.metadata.uid.as_deref().unwrap_or_default());
    for volume in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let plugin = if volume.config_map.is_some() {
            "configmap"
        } else if volume.secret.is_some() {
            "secret"
        } else if volume.downward_api.is_some() {
            "downward-api"
        } else if volume.projected.is_some() {
            "projected"
        } else {
            continue;
        };
        if plugin_dir(&pod_dir, plugin, &volume.name)
            .join("..data")
            .exists()
        {
            prepare(shared, pod, volume)
                .await
                .map_err(|e| format!("refreshing volume {:?}: {e}", volume.name))?;
        }
    }
    Ok(())
}

/// A host path checked against its `type` (created for `DirectoryOrCreate` and
/// `FileOrCreate`), as for hostPath volumes and hostPath PersistentVolumes.
fn checked_host_path(path: &str, kind: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(path);
    let meta = std::fs::metadata(&path);
    use std::os::unix::fs::FileTypeExt;
    let bad = |what: &str| {
        Err(format!(
            "hostPath type check failed: {} is not {what}",
            path.display()
        ))
    };
    match kind {
        "" => {}
        "DirectoryOrCreate" => {
            if meta.is_err() {
                std::fs::create_dir_all(&path)
                    .map_err(|e| format!("create {}: {e}", path.display()))?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).ok();
            } else if !meta.as_ref().is_ok_and(|m| m.is_dir()) {
                return bad("a directory");
            }
        }
        "FileOrCreate" => {
            if meta.is_err() {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).ok();
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o644)
                    .open(&path)
                    .map_err(|e| format!("create {}: {e}", path.display()))?;
            } else if !meta.as_ref().is_ok_and(|m| m.is_file()) {
                return bad("a file");
            }
        }
        "Directory" if !meta.as_ref().is_ok_and(|m| m.is_dir()) => return bad("a directory"),
        "File" if !meta.as_ref().is_ok_and(|m| m.is_file()) => return bad("a file"),
        "Socket" if !meta.as_ref().is_ok_and(|m| m.file_type().is_socket()) => {
            return bad("a socket");
        }
        "CharDevice" if !meta.as_ref().is_ok_and(|m| m.file_type().is_char_device()) => {
            return bad("a character device");
        }
        "BlockDevice" if !meta.as_ref().is_ok_and(|m| m.file_type().is_block_device()) => {
            return bad("a block device");
        }
        "Directory" | "File" | "Socket" | "CharDevice" | "BlockDevice" => {}
        other => return Err(format!("unknown hostPath type {other:?}")),
    }
    Ok(path)
}

/// The host path of the PersistentVolume bound to the claim `namespace/claim_name`: the claim
/// must be Bound, its volume must be bound back to it, and the volume must be one a node can
/// mount by itself (`hostPath` or `local`).
async fn claimed_path(
    shared: &Shared,
    namespace: &str,
    claim_name: &str,
) -> Result<PathBuf, String> {
    use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
    let claim: PersistentVolumeClaim = fetch(shared, namespace, claim_name)
        .await?
        .ok_or_else(|| format!("persistentvolumeclaim {claim_name:?} not found"))?;
    let phase = claim
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    let volume_name = claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .unwrap_or_default();
    if phase != "Bound" || volume_name.is_empty() {
        return Err(format!(
            "PVC {namespace}/{claim_name} has non-bound phase ({phase:?}) or empty pvc.Spec.VolumeName ({volume_name:?})"
        ));
    }
    let Some(client) = &shared.client else {
        return Err("persistentVolumeClaim volumes need an API server".into());
    };
    let volume = Api::<PersistentVolume>::all(client.clone())
        .get_opt(&volume_name)
        .await
        .map_err(|e| format!("get persistentvolume {volume_name:?}: {e}"))?
        .ok_or_else(|| {
            format!(
                "persistentvolume {volume_name:?} (bound to PVC {namespace}/{claim_name}) not found"
            )
        })?;
    let spec = volume.spec.unwrap_or_default();
    let claim_ref = spec.claim_ref.clone().unwrap_or_default();
    let claim_uid = claim.metadata.uid.clone();
    if claim_ref.namespace.as_deref() != Some(namespace)
        || claim_ref.name.as_deref() != Some(claim_name)
        || (claim_ref.uid.is_some() && claim_uid.is_some() && claim_ref.uid != claim_uid)
    {
        return Err(format!(
            "persistentvolume {volume_name:?} is not bound to PVC {namespace}/{claim_name} (its claimRef is {}/{})",
            claim_ref.namespace.unwrap_or_default(),
            claim_ref.name.unwrap_or_default()
        ));
    }
    if spec.volume_mode.as_deref() == Some("Block") {
        return Err(format!(
            "persistentvolume {volume_name:?} has volumeMode Block, which tug's kubelet does not attach"
        ));
    }
    if let Some(host) = &spec.host_path {
        return checked_host_path(&host.path, host.type_.as_deref().unwrap_or(""));
    }
    if let Some(local) = &spec.local {
        let path = PathBuf::from(&local.path);
        return match std::fs::metadata(&path) {
            Ok(_) => Ok(path),
            Err(e) => Err(format!(
                "local persistentvolume {volume_name:?}: path {} on this node: {e}",
                path.display()
            )),
        };
    }
    Err(format!(
        "persistentvolume {volume_name:?} is neither hostPath nor local; tug's kubelet mounts no other volume plugins (no CSI)"
    ))
}

/// Materialises one volume; returns its host path.
async fn prepare(shared: &Shared, pod: &Pod, volume: &Volume) -> Result<PathBuf, String> {
    let pod_dir = shared.pod_dir(pod.metadata.uid.as_deref().unwrap_or_default());
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = &volume.name;
    if let Some(empty) = &volume.empty_dir {
        let dir = plugin_dir(&pod_dir, "empty-dir", name);
        if empty.medium.as_deref() == Some("Memory") {
            let size = empty
                .size_limit
                .as_ref()
                .and_then(|q| super::quantity::bytes(&q.0));
            mount_tmpfs(&dir, size)?;
        } else {
            std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
            .map_err(|e| format!("chmod {}: {e}", dir.display()))?;
        return Ok(dir);
    }
    if let Some(host) = &volume.host_path {
        return checked_host_path(&host.path, host.type_.as_deref().unwrap_or(""));
    }
    if let Some(claim) = &volume.persistent_volume_claim {
        return claimed_path(shared, &namespace, &claim.claim_name).await;
    }
    // A ConfigMap or a Secret: its keys as files (a Secret's on tmpfs).
    let keys = match (&volume.config_map, &volume.secret) {
        (Some(source), _) => Some((
            false,
            source.name.clone(),
            source.items.as_ref(),
            source.optional,
            source.default_mode,
        )),
        (None, Some(source)) => Some((
            true,
            source.secret_name.clone().unwrap_or_default(),
            source.items.as_ref(),
            source.optional,
            source.default_mode,
        )),
        (None, None) => None,
    };
    if let Some((secret, source_name, items, optional, default_mode)) = keys {
        let dir = plugin_dir(&pod_dir, if secret { "secret" } else { "configmap" }, name);
        if secret {
            mount_tmpfs(&dir, None)?;
        }
        let mut files = Files::new();
        add_keys(
            shared,
            &namespace,
            KeySource {
                secret,
                name: &source_name,
                items,
                optional: optional.unwrap_or(false),
                mode: default_mode.unwrap_or(0o644) as u32,
            },
            &mut files,
        )
        .await?;
        write_atomic(&dir, &files)?;
        return Ok(dir);
    }
    if let Some(source) = &volume.downward_api {
        let dir = plugin_dir(&pod_dir, "downward-api", name);
        let mode = source.default_mode.unwrap_or(0o644) as u32;
        let mut files = Files::new();
        for item in source.items.iter().flatten() {
            files.insert(
                item.path.clone(),
                (
                    downward_file(pod, item)?,
                    item.mode.map(|m| m as u32).unwrap_or(mode),
                ),
            );
        }
        write_atomic(&dir, &files)?;
        return Ok(dir);
    }
    if let Some(source) = &volume.projected {
        let dir = plugin_dir(&pod_dir, "projected", name);
        mount_tmpfs(&dir, None)?;
        let mode = source.default_mode.unwrap_or(0o644) as u32;
        let mut files = Files::new();
        for part in source.sources.iter().flatten() {
            if let Some(token) = &part.service_account_token {
                let bytes = service_account_token(
                    shared,
                    pod,
                    token.audience.clone(),
                    token.expiration_seconds,
                )
                .await?;
                files.insert(token.path.clone(), (bytes, mode));
            }
            if let Some(cm) = &part.config_map {
                let optional = cm.optional.unwrap_or(false);
                add_keys(
                    shared,
                    &namespace,
                    KeySource {
                        secret: false,
                        name: &cm.name,
                        items: cm.items.as_ref(),
                        optional,
                        mode,
                    },
                    &mut files,
                )
                .await?;
            }
            if let Some(s) = &part.secret {
                let optional = s.optional.unwrap_or(false);
                add_keys(
                    shared,
                    &namespace,
                    KeySource {
                        secret: true,
                        name: &s.name,
                        items: s.items.as_ref(),
                        optional,
                        mode,
                    },
                    &mut files,
                )
                .await?;
            }
            if let Some(downward) = &part.downward_api {
                for item in downward.items.iter().flatten() {
                    files.insert(
                        item.path.clone(),
                        (
                            downward_file(pod, item)?,
                            item.mode.map(|m| m as u32).unwrap_or(mode),
                        ),
                    );
                }
            }
        }
        write_atomic(&dir, &files)?;
        return Ok(dir);
    }
    Err(format!(
        "volume {name:?}: this volume type is not supported by tug's kubelet yet (supported: emptyDir, hostPath, configMap, secret, downwardAPI, projected)"
    ))
}

fn hosts_file(pod: &Pod, cluster_domain: &str, ips: &[String]) -> String {
    let mut text = String::from(
        "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
    );
    let (host, fqdn) = super::translate::hostname(pod, cluster_domain);
    for ip in ips {
        match &fqdn {
            Some(fqdn) => text.push_str(&format!("{ip}\t{fqdn}\t{host}\n")),
            None => text.push_str(&format!("{ip}\t{host}\n")),
        }
    }
    let aliases = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_aliases.clone())
        .unwrap_or_default();
    if !aliases.is_empty() {
        text.push_str("\n# Entries added by HostAliases.\n");
        for alias in aliases {
            text.push_str(&format!(
                "{}\t{}\n",
                alias.ip,
                alias.hostnames.unwrap_or_default().join("\t")
            ));
        }
    }
    text
}

fn termination_file(shared: &Shared, uid: &str, container: &str, attempt: u32) -> PathBuf {
    shared
        .pod_dir(uid)
        .join("containers")
        .join(container)
        .join(format!("{attempt}.termination-log"))
}

/// The mounts of one container instance: its volumeMounts (volumes prepared now), the managed
/// `/etc/hosts`, and its termination-message file.
pub async fn mounts(
    shared: &Shared,
    pod: &Pod,
    container: &Container,
    attempt: u32,
    ips: &[String],
) -> Result<Vec<Mount>, String> {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let volumes: HashMap<&str, &Volume> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| (v.name.as_str(), v))
        .collect();
    let mut out = Vec::new();
    let mut prepared: HashMap<String, PathBuf> = HashMap::new();
    for mount in container.volume_mounts.iter().flatten() {
        let volume = volumes.get(mount.name.as_str()).ok_or_else(|| {
            format!(
                "volumeMount {:?} names a volume the pod does not have",
                mount.name
            )
        })?;
        let host = match prepared.get(&mount.name) {
            Some(path) => path.clone(),
            None => {
                let path = prepare(shared, pod, volume).await.map_err(|e| {
                    format!("MountVolume.SetUp failed for volume {:?}: {e}", mount.name)
                })?;
                prepared.insert(mount.name.clone(), path.clone());
                path
            }
        };
        let mut host_path = host;
        if let Some(sub) = mount.sub_path.as_deref().filter(|s| !s.is_empty()) {
            safe_relative(sub)?;
            host_path = host_path.join(sub);
            if std::fs::symlink_metadata(&host_path).is_err() {
                std::fs::create_dir_all(&host_path)
                    .map_err(|e| format!("create subPath {}: {e}", host_path.display()))?;
            }
        }
        let propagation = match mount.mount_propagation.as_deref() {
            Some("HostToContainer") => MountPropagation::PropagationHostToContainer,
            Some("Bidirectional") => MountPropagation::PropagationBidirectional,
            _ => MountPropagation::PropagationPrivate,
        };
        out.push(Mount {
            container_path: mount.mount_path.clone(),
            host_path: host_path.display().to_string(),
            // A claim mounted read-only is read-only in every container.
            readonly: mount.read_only.unwrap_or(false)
                || volume
                    .persistent_volume_claim
                    .as_ref()
                    .is_some_and(|c| c.read_only == Some(true)),
            propagation: propagation as i32,
            ..Default::default()
        });
    }
    let pod_dir = shared.pod_dir(&uid);
    let host_network = spec.host_network.unwrap_or(false);
    if !host_network && !out.iter().any(|m| m.container_path == "/etc/hosts") {
        let path = pod_dir.join("etc-hosts");
        let text = hosts_file(pod, &shared.node.cluster_domain, ips);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            let tmp = pod_dir.join(".etc-hosts.tmp");
            std::fs::create_dir_all(&pod_dir)
                .map_err(|e| format!("create {}: {e}", pod_dir.display()))?;
            std::fs::write(&tmp, &text).map_err(|e| format!("write {}: {e}", tmp.display()))?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).ok();
            std::fs::rename(&tmp, &path).map_err(|e| format!("write {}: {e}", path.display()))?;
        }
        out.push(Mount {
            container_path: "/etc/hosts".into(),
            host_path: path.display().to_string(),
            ..Default::default()
        });
    }
    let message_path = container
        .termination_message_path
        .clone()
        .unwrap_or_else(|| "/dev/termination-log".into());
    if !message_path.is_empty() && !out.iter().any(|m| m.container_path == message_path) {
        let file = termination_file(shared, &uid, &container.name, attempt);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("create {}: {e}", parent.display()))?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o666)
            .open(&file)
            .map_err(|e| format!("create {}: {e}", file.display()))?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).ok();
        out.push(Mount {
            container_path: message_path,
            host_path: file.display().to_string(),
            ..Default::default()
        });
    }
    Ok(out)
}

/// Termination messages of the pod's exited instances: the file the container wrote (4 KiB at
/// most), or with `FallbackToLogsOnError` and a failure, the end of its log (80 lines, 2 KiB).
pub fn termination_messages(
    shared: &Shared,
    pod: &Pod,
    observed: &Observed,
) -> HashMap<String, String> {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let mut out = HashMap::new();
    for instance in observed.instances.iter().filter(|i| i.exited()) {
        let file = termination_file(shared, &uid, &instance.name, instance.attempt);
        let mut message = std::fs::read(&file)
            .map(|b| String::from_utf8_lossy(&b[..b.len().min(4096)]).into_owned())
            .unwrap_or_default();
        let fallback = super::translate::find_container(pod, &instance.name)
            .and_then(|c| c.termination_message_policy.as_deref())
            == Some("FallbackToLogsOnError");
        if message.is_empty() && fallback && instance.exit_code != 0 {
            message = log_tail(Path::new(&instance.log_path), 80, 2048);
        }
        if !message.is_empty() {
            out.insert(instance.id.clone(), message);
        }
    }
    out
}

/// The last `lines` lines (at most `bytes`) of a CRI-format log, without the record prefixes.
pub fn log_tail(path: &Path, lines: usize, bytes: usize) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return String::new();
    };
    let mut content: Vec<String> = Vec::new();
    let mut partial = String::new();
    for line in text.lines() {
        let mut parts = line.splitn(4, ' ');
        let (_, _, tag, body) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next().unwrap_or(""),
        );
        partial.push_str(body);
        if tag != Some("P") {
            content.push(std::mem::take(&mut partial));
        }
    }
    let start = content.len().saturating_sub(lines);
    let mut joined = content[start..].join("\n");
    if joined.len() > bytes {
        let mut cut = joined.len() - bytes;
        while !joined.is_char_boundary(cut) {
            cut += 1;
        }
        joined = joined[cut..].to_owned();
    }
    joined
}

/// Unmounts the pod's tmpfs volumes and removes its directory.
pub async fn teardown(pod_dir: &Path) {
    let dir = pod_dir.to_owned();
    let _ = tokio::task::spawn_blocking(move || {
        let prefix = format!("{}/", dir.display());
        if let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") {
            let mut points: Vec<&str> = text
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|p| p.starts_with(&prefix))
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for point in points {
                let _ = nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        if dir.exists()
            && let Err(error) = std::fs::remove_dir_all(&dir)
        {
            tracing::warn!(dir = %dir.display(), %error, "removing the pod's directory failed");
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_swap_the_data_link_and_drop_removed_keys() {
        let dir = std::env::temp_dir().join(format!("tug-atomic-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut files = Files::new();
        files.insert("a".into(), (b"one".to_vec(), 0o644));
        files.insert("nested/b".into(), (b"two".to_vec(), 0o400));
        write_atomic(&dir, &files).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "one");
        assert_eq!(
            std::fs::read_to_string(dir.join("nested/b")).unwrap(),
            "two"
        );
        assert_eq!(
            std::fs::metadata(dir.join("nested/b"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o400
        );
        let first = std::fs::read_link(dir.join("..data")).unwrap();
        // Same content: no swap.
        write_atomic(&dir, &files).unwrap();
        assert_eq!(std::fs::read_link(dir.join("..data")).unwrap(), first);
        files.remove("nested/b");
        files.insert("a".into(), (b"uno".to_vec(), 0o644));
        std::thread::sleep(std::time::Duration::from_millis(2));
        write_atomic(&dir, &files).unwrap();
        assert_ne!(std::fs::read_link(dir.join("..data")).unwrap(), first);
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "uno");
        assert!(!dir.join("nested").exists());
        assert!(!dir.join(&first).exists());
        assert!(write_atomic(&dir, &Files::from([("../x".to_owned(), (vec![], 0o644))])).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn log_tails_reassemble_partial_records() {
        let path = std::env::temp_dir().join(format!("tug-log-{}", std::process::id()));
        std::fs::write(&path, "2026-01-01T00:00:00Z stdout F first\n2026-01-01T00:00:00Z stderr P par\n2026-01-01T00:00:00Z stderr F tial\n2026-01-01T00:00:00Z stdout F last\n").unwrap();
        assert_eq!(log_tail(&path, 2, 2048), "partial\nlast");
        assert_eq!(log_tail(&path, 80, 6), "l\nlast");
        std::fs::remove_file(&path).unwrap();
    }
}
