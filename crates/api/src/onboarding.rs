//! The onboarding bundle's files by name and mode: what `vmesh workload
//! entry configure` writes, what a join hands out (the server) and what the
//! agent installs. Names only; their contents and Istio's paths on the VM
//! are the agent crate's (`vmesh_agent::onboarding_files`).

/// One file of the bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BundleFile {
    /// Its name in the bundle.
    pub name: &'static str,
    /// Its mode there (install.sh gives the installed copy the same).
    pub mode: u32,
}

pub const CLUSTER_ENV: BundleFile = BundleFile {
    name: "cluster.env",
    mode: 0o644,
};
pub const MESH_YAML: BundleFile = BundleFile {
    name: "mesh.yaml",
    mode: 0o644,
};
pub const TOKEN: BundleFile = BundleFile {
    name: "istio-token",
    mode: 0o600,
};
pub const ROOT_CERT: BundleFile = BundleFile {
    name: "root-cert.pem",
    mode: 0o644,
};
pub const HOSTS: BundleFile = BundleFile {
    name: "hosts",
    mode: 0o644,
};
pub const AGENT_UNIT: BundleFile = BundleFile {
    name: "vmesh-agent.service",
    mode: 0o644,
};
pub const INSTALL_SH: BundleFile = BundleFile {
    name: "install.sh",
    mode: 0o755,
};

/// Every file of the bundle, in the order `configure` lists them.
pub const BUNDLE: [BundleFile; 7] = [
    CLUSTER_ENV,
    MESH_YAML,
    TOKEN,
    ROOT_CERT,
    HOSTS,
    AGENT_UNIT,
    INSTALL_SH,
];

impl BundleFile {
    /// The bundle file called `name`, if there is one.
    pub fn named(name: &str) -> Option<BundleFile> {
        BUNDLE.into_iter().find(|f| f.name == name)
    }
}
