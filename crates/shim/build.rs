//! Compiles the subsets of two upstream APIs the shim speaks as a client (protox, no protoc):
//! containerd's containers service (the image a container was created from) and the Kubernetes
//! CRI v1 (which the tests and the benchmark use to drive containerd as the kubelet does).

fn main() {
    let protos = [
        ("proto/containerd", "containers.proto"),
        ("proto/cri", "api.proto"),
    ];
    for (dir, file) in protos {
        let path = format!("{dir}/{file}");
        println!("cargo:rerun-if-changed={path}");
        let fds = protox::compile([&path], [dir]).unwrap_or_else(|e| panic!("{path}: {e}"));
        tonic_prost_build::configure()
            .build_server(false)
            .compile_fds(fds)
            .unwrap_or_else(|e| panic!("cannot generate {path}: {e}"));
    }
}
