//! Compiles the shim over ISA-L's inflater and links Debian's `libisal` (package
//! `libisal-dev` at build time, `libisal2` at run time).

fn main() {
    println!("cargo:rerun-if-changed=src/shim.c");
    let header = std::path::Path::new("/usr/include/isa-l/igzip_lib.h");
    let include = std::env::var_os("ISAL_INCLUDE_DIR");
    if include.is_none() && !header.exists() {
        println!(
            "cargo:warning=ISA-L's header {} is missing: install libisal-dev \
             (apt-get install libisal-dev), or set ISAL_INCLUDE_DIR",
            header.display()
        );
    }
    let mut build = cc::Build::new();
    build.file("src/shim.c").warnings(true).extra_warnings(true);
    if let Some(dir) = &include {
        build.include(dir);
    }
    build.compile("coffer_isal_shim");
    if let Some(dir) = std::env::var_os("ISAL_LIB_DIR") {
        println!("cargo:rustc-link-search=native={}", dir.to_string_lossy());
    }
    println!("cargo:rustc-link-lib=dylib=isal");
}
