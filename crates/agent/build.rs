//! Compiles the agent API (proto/coffer/agent/v1/agent.proto) with protox (no protoc needed).

fn main() {
    let proto = "proto/coffer/agent/v1/agent.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"]).expect("agent.proto does not compile");
    // Requests serialize to JSON: that is the policy's `input`.
    tonic_prost_build::configure()
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_fds(fds)
        .expect("cannot generate the agent API");
}
