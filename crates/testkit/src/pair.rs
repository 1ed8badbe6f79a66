//! Two real sidecars for benchmarks: a payment VM (`vmesh server`, the demo
//! application on each of its ports, its agent and Envoy, inbound ports
//! captured) and a client VM (agent and Envoy, the service range captured),
//! in two network namespaces joined by a veth pair (client 10.46.0.1,
//! payment 10.46.0.2).

use std::path::Path;

use anyhow::Result;

use crate::mesh::{Mesh, capture_inbound, capture_service_range};
use crate::netns::{Namespace, link};

/// The two VMs and the mesh they are in; everything stops when dropped.
pub struct SidecarPair {
    pub payment: Namespace,
    pub client: Namespace,
    pub mesh: Mesh,
}

impl SidecarPair {
    /// The payment VM (`payment-service-sa` in vm-workloads, labels `app:
    /// payment-service`) serving the demo application on `ports`, the
    /// client (`frontend-sa` in frontend), `objects` applied before either
    /// agent starts; `tag` keeps namespaces apart from other pairs', and the
    /// two Envoys take base ids `base_id` and `base_id + 1`.
    pub fn start(
        vmesh: &str,
        envoy: &Path,
        dir: &Path,
        tag: &str,
        base_id: u32,
        ports: &[u16],
        objects: &str,
    ) -> Result<SidecarPair> {
        let id = std::process::id();
        let payment = Namespace::create(&format!("vmesh-{tag}pay-{id}"))?;
        let client = Namespace::create(&format!("vmesh-{tag}cli-{id}"))?;
        link(
            &client,
            "10.46.0.1",
            &payment,
            "10.46.0.2",
            &format!("{tag}{id}"),
        )?;
        let mesh = Mesh::new(vmesh, &payment, dir).with_envoy(envoy);
        mesh.start_server(&payment, &["--xds-addr", "0.0.0.0:15012"])?;
        for port in ports {
            let addr = format!("127.0.0.1:{port}");
            payment.spawn(
                &[vmesh, "demo-app", "--addr", &addr, "--name", "payment-vm"],
                &dir.join(format!("app-{port}.log")),
            )?;
        }
        for namespace in ["vm-workloads", "frontend"] {
            mesh.cli(&["create", "namespace", namespace])?;
        }
        mesh.apply("mesh.yaml", objects)?;
        capture_inbound(&payment, ports)?;
        mesh.start_agent(
            &payment,
            "127.0.0.1:15012",
            "vm-workloads",
            "payment-service-sa",
            "10.46.0.2",
            &["--label", "app=payment-service"],
            base_id,
        )?;
        capture_service_range(&client, "10.46.0.1")?;
        mesh.start_agent(
            &client,
            "10.46.0.2:15012",
            "frontend",
            "frontend-sa",
            "10.46.0.1",
            &["--label", "app=frontend"],
            base_id + 1,
        )?;
        Ok(SidecarPair {
            payment,
            client,
            mesh,
        })
    }

    /// CPU seconds the Envoys of both VMs have used so far.
    pub fn envoy_cpu_seconds(&self) -> f64 {
        self.cpu_seconds(|comm, _| comm == "envoy")
    }

    /// CPU seconds the agents of both VMs have used so far.
    pub fn agent_cpu_seconds(&self) -> f64 {
        self.cpu_seconds(|comm, args| comm == "vmesh" && args.first() == Some(&"agent"))
    }

    /// CPU seconds of the processes in either VM whose name (`comm`) and
    /// arguments (after the program) `pick` chooses.
    fn cpu_seconds(&self, pick: impl Fn(&str, &[&str]) -> bool) -> f64 {
        [&self.payment, &self.client]
            .iter()
            .flat_map(|ns| crate::netns::pids(ns.name()))
            .filter(|pid| {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                let cmdline =
                    std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let args: Vec<&str> = cmdline.split('\0').skip(1).collect();
                pick(comm.trim(), &args)
            })
            .filter_map(|pid| crate::process::cpu_seconds(&pid.to_string()).ok())
            .sum()
    }
}
