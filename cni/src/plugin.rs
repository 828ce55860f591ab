//! The CNI commands. Each takes the parsed environment and configuration and returns what goes
//! to stdout; [`run`] is the process entry that turns errors into the spec's error JSON and a
//! non-zero exit, in this one place.

use std::io::{Read, Write};
use std::path::Path;

use std::net::IpAddr;

use serde_json::{Value, json};

use crate::dataplane::{Attach, Dataplane, Netlink, host_veth_name};
use crate::ipam::Ipam;
use crate::spec::{
    AddResult, CURRENT_VERSION, CniError, Command, Env, NetConf, SUPPORTED_VERSIONS, code,
};

/// Default MTU of pod interfaces when the configuration names none.
pub const DEFAULT_MTU: u32 = 1500;

/// Runs the plugin as a CNI runtime invokes it: environment, stdin, stdout. Returns the exit
/// status (0 on success).
pub fn run() -> u8 {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let env = Env::from_vars(|name| std::env::var(name).ok());
    let outcome = match read {
        Err(e) => Err(CniError::new(
            code::IO,
            "failed to read stdin",
            e.to_string(),
        )),
        Ok(_) => env.and_then(|env| execute(&env, &stdin, &Netlink)),
    };
    let version = serde_json::from_slice::<Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| CURRENT_VERSION.to_owned());
    let (output, status) = match outcome {
        Ok(Some(value)) => (value.to_string(), 0),
        Ok(None) => (String::new(), 0),
        Err(error) => (error.to_json(&version).to_string(), 1),
    };
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(output.as_bytes());
    let _ = stdout.flush();
    status
}

/// Executes one command; `Ok(None)` means success with nothing to print.
pub fn execute(
    env: &Env,
    stdin: &[u8],
    dataplane: &dyn Dataplane,
) -> Result<Option<Value>, CniError> {
    if env.command == Command::Version {
        return Ok(Some(
            json!({"cniVersion": CURRENT_VERSION, "supportedVersions": SUPPORTED_VERSIONS}),
        ));
    }
    let conf = NetConf::parse(stdin)?;
    match env.command {
        Command::Add => add(env, &conf, dataplane).map(Some),
        Command::Del => del(env, &conf, dataplane).map(|()| None),
        Command::Check => check(env, &conf, dataplane).map(|()| None),
        Command::Status => status(&conf).map(|()| None),
        Command::Gc => gc(&conf, dataplane).map(|()| None),
        Command::Version => unreachable!("handled above"),
    }
}

/// One IPAM per address family of the node: IPv4 (required), then IPv6 when dual-stack.
fn ipams(conf: &NetConf) -> Result<Vec<Ipam>, CniError> {
    let v4 = conf.ipv4_cidr().ok_or_else(|| CniError::new(code::TRY_AGAIN, "no pod CIDR yet", "the network configuration has no IPv4 \"podCIDRs\"; tug netd writes them once the node has a pod CIDR"))?;
    let mut ipams = vec![Ipam::open(Path::new(conf.data_dir()), &conf.name, v4)?];
    if let Some(v6) = conf.ipv6_cidr() {
        ipams.push(Ipam::open(Path::new(conf.data_dir()), &conf.name, v6)?);
    }
    Ok(ipams)
}

/// The attachment of `env`'s container with `addresses` (an IPv4 one required, IPv6 optional).
fn attachment<'a>(
    env: &'a Env,
    conf: &NetConf,
    addresses: &[IpAddr],
) -> Result<Attach<'a>, CniError> {
    let ip = addresses.iter().find_map(|a| {
        if let IpAddr::V4(v4) = a {
            Some(*v4)
        } else {
            None
        }
    });
    let ip = ip.ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "no IPv4 address",
            "an attachment needs an IPv4 address (prevResult has none)",
        )
    })?;
    let ip6 = addresses.iter().find_map(|a| {
        if let IpAddr::V6(v6) = a {
            Some(*v6)
        } else {
            None
        }
    });
    Ok(Attach {
        container_id: &env.container_id,
        ifname: &env.ifname,
        netns: env.netns.as_deref().unwrap_or_default(),
        ip,
        ip6,
        mtu: conf.mtu.unwrap_or(DEFAULT_MTU),
    })
}

fn release_all(ipams: &[Ipam], env: &Env) -> Result<(), CniError> {
    ipams
        .iter()
        .map(|ipam| ipam.release(&env.container_id, &env.ifname).map(|_| ()))
        .fold(Ok(()), Result::and)
}

fn add(env: &Env, conf: &NetConf, dataplane: &dyn Dataplane) -> Result<Value, CniError> {
    let ipams = ipams(conf)?;
    let mut addresses = Vec::new();
    for ipam in &ipams {
        match ipam.allocate(&env.container_id, &env.ifname) {
            Ok(ip) => addresses.push(ip),
            Err(error) => {
                let _ = release_all(&ipams, env);
                return Err(error);
            }
        }
    }
    let attach = attachment(env, conf, &addresses)?;
    match dataplane.setup(&attach) {
        // ptp: the pod owns exactly its own addresses.
        Ok(interfaces) => Ok(AddResult {
            interfaces: interfaces.to_vec(),
            addresses: addresses.into_iter().map(ipnet::IpNet::from).collect(),
        }
        .to_json(&conf.cni_version)),
        Err(error) => {
            // Leave nothing behind: the runtime will retry the ADD or give up with a DEL.
            let _ = dataplane.teardown(&env.container_id, &env.ifname);
            let _ = release_all(&ipams, env);
            Err(error)
        }
    }
}

fn del(env: &Env, conf: &NetConf, dataplane: &dyn Dataplane) -> Result<(), CniError> {
    // Best effort and idempotent: keep cleaning after a failure, report the first one.
    let teardown = dataplane.teardown(&env.container_id, &env.ifname);
    let release = match conf.ipv4_cidr() {
        Some(_) => ipams(conf).and_then(|ipams| release_all(&ipams, env)),
        None => Ok(()), // no pod CIDR: nothing can have been allocated
    };
    teardown.and(release)
}

fn check(env: &Env, conf: &NetConf, dataplane: &dyn Dataplane) -> Result<(), CniError> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "CHECK needs prevResult",
            "the configuration has no prevResult",
        )
    })?;
    let mut previous = Vec::new();
    for ip in prev["ips"].as_array().into_iter().flatten() {
        let address: ipnet::IpNet = ip["address"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| {
                CniError::new(
                    code::INVALID_CONFIG,
                    "invalid prevResult",
                    format!("prevResult ip {ip} has no CIDR address"),
                )
            })?;
        previous.push(address.addr());
    }
    let mut held = Vec::new();
    for ipam in ipams(conf)? {
        held.extend(
            ipam.allocations()?
                .into_iter()
                .filter(|a| a.container_id == env.container_id && a.ifname == env.ifname)
                .map(|a| a.ip),
        );
    }
    held.sort();
    let mut wanted = previous.clone();
    wanted.sort();
    if held != wanted {
        return Err(CniError::new(
            code::CHECK_FAILED,
            "the attachment is not as ADD left it",
            format!(
                "IPAM holds {held:?} for {}/{}, prevResult says {wanted:?}",
                env.container_id, env.ifname
            ),
        ));
    }
    let attach = attachment(env, conf, &previous)?;
    dataplane.check(&attach)
}

fn status(conf: &NetConf) -> Result<(), CniError> {
    let Some(_) = conf.ipv4_cidr() else {
        return Err(CniError::new(
            code::NOT_AVAILABLE,
            "the pod network is not ready",
            "no pod CIDR yet: tug netd writes it into the configuration once the node has one",
        ));
    };
    for ipam in ipams(conf)? {
        if ipam.free()? == 0 {
            return Err(CniError::new(
                code::NOT_AVAILABLE_FOR_ADD,
                "no free pod IP",
                "every address of one of the node's pod CIDRs is allocated",
            ));
        }
    }
    Ok(())
}

fn gc(conf: &NetConf, dataplane: &dyn Dataplane) -> Result<(), CniError> {
    let valid = conf.valid_attachments.clone().unwrap_or_default();
    let keep: Vec<String> = valid
        .iter()
        .map(|a| host_veth_name(&a.container_id, &a.ifname))
        .collect();
    let mut first_error = None;
    for veth in dataplane.host_veths()? {
        if !keep.contains(&veth)
            && let Err(e) = dataplane.delete_host_veth(&veth)
        {
            first_error.get_or_insert(e);
        }
    }
    if conf.ipv4_cidr().is_some() {
        let result = ipams(conf).and_then(|ipams| {
            ipams
                .iter()
                .map(|ipam| ipam.gc(&valid).map(|_| ()))
                .fold(Ok(()), Result::and)
        });
        if let Err(e) = result {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::Memory;
    use std::collections::BTreeMap;

    fn env(command: &str, id: &str) -> Env {
        let vars: BTreeMap<&str, String> = [
            ("CNI_COMMAND", command.to_owned()),
            ("CNI_CONTAINERID", id.to_owned()),
            ("CNI_IFNAME", "eth0".to_owned()),
            ("CNI_NETNS", "/run/netns/x".to_owned()),
        ]
        .into();
        Env::from_vars(|k| vars.get(k).cloned()).unwrap()
    }

    fn conf(dir: &Path, extra: Value) -> Vec<u8> {
        let mut conf = json!({"cniVersion": "1.0.0", "name": "tug", "type": "tug-cni", "podCIDRs": ["10.244.3.0/24"], "dataDir": dir});
        if let (Some(c), Some(e)) = (conf.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        serde_json::to_vec(&conf).unwrap()
    }

    #[test]
    fn add_returns_a_result_in_the_configured_version_and_del_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let dp = Memory::default();
        let result = execute(&env("ADD", "c1"), &conf(dir.path(), json!({})), &dp)
            .unwrap()
            .unwrap();
        assert_eq!(result["cniVersion"], "1.0.0");
        assert_eq!(result["ips"][0]["address"], "10.244.3.1/32");
        assert_eq!(result["interfaces"][1]["sandbox"], "/run/netns/x");
        for _ in 0..3 {
            assert_eq!(
                execute(&env("DEL", "c1"), &conf(dir.path(), json!({})), &dp).unwrap(),
                None
            );
        }
        assert!(dp.veths.borrow().is_empty());
    }

    #[test]
    fn a_failed_setup_releases_the_address() {
        let dir = tempfile::tempdir().unwrap();
        let dp = Memory {
            fail_setup: true,
            ..Default::default()
        };
        assert!(execute(&env("ADD", "c1"), &conf(dir.path(), json!({})), &dp).is_err());
        assert!(
            dp.veths.borrow().is_empty(),
            "the half-made veth is removed"
        );
        let ipam = Ipam::open(
            &dir.path().join("."),
            "tug",
            "10.244.3.0/24".parse::<ipnet::IpNet>().unwrap(),
        )
        .unwrap();
        assert!(
            ipam.allocations().unwrap().is_empty(),
            "the address is released"
        );
    }

    #[test]
    fn gc_keeps_valid_attachments_and_removes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let dp = Memory::default();
        for id in ["keep", "leak"] {
            execute(&env("ADD", id), &conf(dir.path(), json!({})), &dp).unwrap();
        }
        let gc_conf = conf(
            dir.path(),
            json!({"cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]}),
        );
        execute(
            &Env {
                command: Command::Gc,
                ..env("ADD", "x")
            },
            &gc_conf,
            &dp,
        )
        .unwrap();
        assert_eq!(*dp.veths.borrow(), [host_veth_name("keep", "eth0")]);
        let ipam = Ipam::open(
            dir.path(),
            "tug",
            "10.244.3.0/24".parse::<ipnet::IpNet>().unwrap(),
        )
        .unwrap();
        assert_eq!(ipam.allocations().unwrap().len(), 1);
    }

    #[test]
    fn status_check_and_version() {
        let dir = tempfile::tempdir().unwrap();
        let dp = Memory::default();
        let status_env = Env {
            command: Command::Status,
            ..env("ADD", "x")
        };
        assert_eq!(
            execute(&status_env, &conf(dir.path(), json!({})), &dp).unwrap(),
            None
        );
        let no_cidr = conf(dir.path(), json!({"podCIDRs": []}));
        assert_eq!(
            execute(&status_env, &no_cidr, &dp).unwrap_err().code,
            code::NOT_AVAILABLE
        );
        assert_eq!(
            execute(&env("ADD", "c"), &no_cidr, &dp).unwrap_err().code,
            code::TRY_AGAIN
        );

        let result = execute(&env("ADD", "c1"), &conf(dir.path(), json!({})), &dp)
            .unwrap()
            .unwrap();
        assert_eq!(
            execute(
                &env("CHECK", "c1"),
                &conf(dir.path(), json!({"prevResult": result})),
                &dp
            )
            .unwrap(),
            None
        );
        let wrong = json!({"ips": [{"address": "10.244.3.200/32"}]});
        assert_eq!(
            execute(
                &env("CHECK", "c1"),
                &conf(dir.path(), json!({"prevResult": wrong})),
                &dp
            )
            .unwrap_err()
            .code,
            code::CHECK_FAILED
        );
        assert_eq!(
            execute(&env("CHECK", "c1"), &conf(dir.path(), json!({})), &dp)
                .unwrap_err()
                .code,
            code::INVALID_CONFIG
        );

        let version = execute(
            &Env {
                command: Command::Version,
                ..env("ADD", "x")
            },
            b"{}",
            &dp,
        )
        .unwrap()
        .unwrap();
        assert_eq!(version["supportedVersions"], json!(SUPPORTED_VERSIONS));
    }
}
