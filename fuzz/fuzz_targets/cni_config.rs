//! The CNI plugin's input: the environment (`CNI_*`) and the network configuration on stdin,
//! through every command, with an in-memory dataplane and IPAM in a scratch directory.
//!
//! Input: `KEY=VALUE` lines (the environment), an empty line, then stdin. Asserts:
//! - every failure is an error the spec allows (a code, a message) that serialises;
//! - an ADD's addresses lie in the configuration's pod CIDRs, and a second container never
//!   gets the same one;
//! - DEL (repeated) releases every address: nothing leaks.
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tug_cni::dataplane::Memory;
use tug_cni::ipam::Ipam;
use tug_cni::plugin::execute;
use tug_cni::spec::{CniError, Env, NetConf};

fn assert_spec_error(error: &CniError) {
    let json = error.to_json("1.0.0");
    let code = json["code"].as_u64().expect("an error has a numeric code");
    assert!(code >= 1, "error code {code} is not one the spec allows");
    assert!(
        json["msg"].as_str().is_some_and(|m| !m.is_empty()),
        "error without a message: {json}"
    );
    serde_json::to_string(&json).expect("the error serialises");
}

fn env_of(vars: &BTreeMap<String, String>, command: &str, id: &str) -> Option<Env> {
    let mut vars = vars.clone();
    vars.insert("CNI_COMMAND".into(), command.into());
    vars.insert("CNI_CONTAINERID".into(), id.into());
    Env::from_vars(|k| vars.get(k).cloned()).ok()
}

fuzz_target!(|data: &[u8]| {
    let (head, stdin) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (&data[..0], data),
    };
    let vars: BTreeMap<String, String> = String::from_utf8_lossy(head)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let env = match Env::from_vars(|k| vars.get(k).cloned()) {
        Ok(env) => env,
        Err(error) => return assert_spec_error(&error),
    };

    // IPAM state goes to a scratch directory, whatever dataDir the input names.
    let scratch = tempfile::tempdir().expect("scratch directory");
    let stdin = match serde_json::from_slice::<Value>(stdin) {
        Ok(Value::Object(mut conf)) => {
            conf.insert("dataDir".into(), scratch.path().to_string_lossy().into());
            serde_json::to_vec(&conf).expect("re-serialise")
        }
        _ => stdin.to_vec(),
    };
    let dataplane = Memory::default();
    let first = match execute(&env, &stdin, &dataplane) {
        Ok(result) => result,
        Err(error) => return assert_spec_error(&error),
    };
    let Ok(conf) = NetConf::parse(&stdin) else {
        return;
    };
    let in_pod_cidrs = |result: &Value| -> Vec<String> {
        let ips: Vec<String> = result["ips"]
            .as_array()
            .expect("an ADD result lists ips")
            .iter()
            .map(|ip| ip["address"].as_str().expect("an address").to_owned())
            .collect();
        for ip in &ips {
            let net: ipnet::IpNet = ip.parse().expect("addresses are CIDRs");
            assert!(
                conf.pod_cidrs.iter().any(|c| c.contains(&net.addr())),
                "ADD gave {ip}, outside the pod CIDRs {:?}",
                conf.pod_cidrs
            );
        }
        ips
    };
    if env.command != tug_cni::spec::Command::Add {
        return;
    }
    if let (Some(result), Some(other_env)) = (&first, env_of(&vars, "ADD", "fuzz-other")) {
        let mine = in_pod_cidrs(result);
        if let Ok(Some(other)) = execute(&other_env, &stdin, &dataplane) {
            let theirs = in_pod_cidrs(&other);
            assert!(
                mine.iter().all(|ip| !theirs.contains(ip)),
                "two containers got the same address: {mine:?} and {theirs:?}"
            );
        }
        for id in [env.container_id.as_str(), "fuzz-other"] {
            for _ in 0..2 {
                let del = env_of(&vars, "DEL", id).expect("a DEL environment");
                if let Err(error) = execute(&del, &stdin, &dataplane) {
                    panic!("DEL of {id} failed: {error:?}");
                }
            }
        }
        let cidrs = conf
            .ipv4_cidr()
            .map(ipnet::IpNet::from)
            .into_iter()
            .chain(conf.ipv6_cidr().map(ipnet::IpNet::from));
        for cidr in cidrs {
            let ipam =
                Ipam::open(Path::new(conf.data_dir()), &conf.name, cidr).expect("IPAM opens again");
            let left = ipam.allocations().expect("allocations list");
            assert!(left.is_empty(), "DEL leaked {left:?}");
        }
        assert!(dataplane.veths.borrow().is_empty(), "DEL left veths");
    }
});
