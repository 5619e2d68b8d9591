//! Compiles the local API (proto/coffer/cloud/v1/cloud.proto) with protox (no protoc needed).

fn main() {
    let proto = "proto/coffer/cloud/v1/cloud.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"]).expect("cloud.proto does not compile");
    tonic_prost_build::configure()
        .compile_fds(fds)
        .expect("cannot generate the cloud API");
}
