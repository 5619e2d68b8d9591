# Coffer default attestation (appraisal) policy.
#
# input: the annotated evidence, {"tee": "<tee>", "<tee>": {claims}, "init_data": "<hex>", ...}
# data.reference: the reference values (named lists) set with `coffer kbs set-reference-values`.
#
# Every TEE without a rule below is contraindicated. `reason` is shown to the admin (audit log),
# never to the client.
#
# The KBS evaluates this policy, and only this one, on regorus's Rego VM, whose results its tests
# compare with the interpreter's for every rule below. The VM lets `x := ref` succeed when `ref`
# is undefined, where Rego fails the body: rules here test a reference (`data.reference[r]`)
# instead of assigning it.
package policy

import rego.v1

default status := "contraindicated"

default reason := "no appraisal rule accepts evidence of this TEE type"

# The sample TEE has no security at all. It reaches this policy only when the KBS runs with
# --allow-sample. It is affirming unless reference values restrict its svn or the initdata.
status := "affirming" if sample_ok

reason := "sample evidence accepted (sample TEE: testing only)" if sample_ok

reason := "sample svn is not in reference value sample_svn" if {
	input.tee == "sample"
	not svn_ok
}

reason := "initdata digest is not in reference value init_data" if {
	input.tee == "sample"
	svn_ok
	not init_data_ok
}

sample_ok if {
	input.tee == "sample"
	svn_ok
	init_data_ok
}

svn_ok if not data.reference.sample_svn

svn_ok if input.sample.svn in data.reference.sample_svn

init_data_ok if not data.reference.init_data

init_data_ok if input.init_data in data.reference.init_data

# AMD SEV-SNP (hardware roots; the evidence was already verified to AMD's roots). Affirming only
# when every check passes; otherwise `reason` lists the failed checks.
#   data.reference.measurement   accepted launch measurements (hex)
#   data.reference.init_data     accepted initdata digests (hex)
#   data.reference.snp_tcb_min   minimum TCBs: [{"bootloader": n, "tee": n, "snp": n, "microcode": n}]
status := "affirming" if {
	input.tee == "snp"
	count(snp_failures) == 0
}

reason := "all SEV-SNP checks passed" if {
	input.tee == "snp"
	count(snp_failures) == 0
}

reason := concat("; ", sort(snp_failures)) if {
	input.tee == "snp"
	count(snp_failures) > 0
}

snp_failures contains "measurement is not in reference value measurement" if {
	input.tee == "snp"
	not input.snp.measurement in object.get(data.reference, "measurement", [])
}

snp_failures contains "the guest policy allows debugging" if {
	input.tee == "snp"
	input.snp.policy_debug_allowed
}

snp_failures contains "initdata digest is not in reference value init_data" if {
	input.tee == "snp"
	not input.init_data in object.get(data.reference, "init_data", [])
}

snp_failures contains "reported TCB is below every entry of reference value snp_tcb_min (or none is registered)" if {
	input.tee == "snp"
	not snp_tcb_ok
}

snp_tcb_ok if {
	some min in data.reference.snp_tcb_min
	input.snp.reported_tcb.bootloader >= min.bootloader
	input.snp.reported_tcb.tee >= min.tee
	input.snp.reported_tcb.snp >= min.snp
	input.snp.reported_tcb.microcode >= min.microcode
}

# Intel TDX (DCAP quote verified to Intel's root with the configured collateral).
#   data.reference.mr_td            accepted MRTD values (hex)
#   data.reference.init_data        accepted initdata digests (hex), bound through MRCONFIGID
#   data.reference.tdx_tcb_status   accepted TCB statuses (default: ["UpToDate"])
#   data.reference.rtmr0 … rtmr3    accepted RTMR values (hex), each checked only when registered:
#                                   RTMR0 the firmware's configuration, RTMR1 the kernel, RTMR2 the
#                                   command line and initrd (as TDVF extends them), RTMR3 the OS's
status := "affirming" if {
	input.tee == "tdx"
	count(tdx_failures) == 0
}

reason := "all TDX checks passed" if {
	input.tee == "tdx"
	count(tdx_failures) == 0
}

reason := concat("; ", sort(tdx_failures)) if {
	input.tee == "tdx"
	count(tdx_failures) > 0
}

tdx_failures contains "MRTD is not in reference value mr_td" if {
	input.tee == "tdx"
	not input.tdx.mr_td in object.get(data.reference, "mr_td", [])
}

tdx_failures contains "the TD is debuggable" if {
	input.tee == "tdx"
	input.tdx.debug
}

tdx_failures contains "initdata digest is not in reference value init_data" if {
	input.tee == "tdx"
	not input.init_data in object.get(data.reference, "init_data", [])
}

tdx_failures contains "TCB status is not in reference value tdx_tcb_status" if {
	input.tee == "tdx"
	not input.tdx.tcb_status in object.get(data.reference, "tdx_tcb_status", ["UpToDate"])
}

tdx_failures contains sprintf("%s is not in reference value %s", [upper(r), r]) if {
	input.tee == "tdx"
	some r in ["rtmr0", "rtmr1", "rtmr2", "rtmr3"]
	data.reference[r]
	not input.tdx[r] in data.reference[r]
}

# IBM Secure Execution: the Ultravisor's HMAC-SHA512 measurement, under this session's key,
# matched a registered image's SE header tags, the session's user data (runtime data, then the
# initdata digest) and a configured host.
#   data.reference.se_image_tags        accepted SE images: their header tags (hex)
#   data.reference.init_data            accepted initdata digests (hex)
#   data.reference.se_attestation_phkh  accepted attesting host-key hashes (hex), checked only
#                                       when registered
status := "affirming" if {
	input.tee == "se"
	count(se_failures) == 0
}

reason := "all IBM SE checks passed" if {
	input.tee == "se"
	count(se_failures) == 0
}

reason := concat("; ", sort(se_failures)) if {
	input.tee == "se"
	count(se_failures) > 0
}

se_failures contains "SE image is not in reference value se_image_tags" if {
	input.tee == "se"
	not input.se.image_tags in object.get(data.reference, "se_image_tags", [])
}

se_failures contains "initdata digest is not in reference value init_data" if {
	input.tee == "se"
	not input.init_data in object.get(data.reference, "init_data", [])
}

se_failures contains "attesting host is not in reference value se_attestation_phkh" if {
	input.tee == "se"
	data.reference.se_attestation_phkh
	not input.se.attestation_phkh in data.reference.se_attestation_phkh
}

# Azure confidential VMs on SEV-SNP with a vTPM: the SNP report (bound to the vTPM key) is judged
# like bare SNP, and initdata is bound through PCR8.
status := "affirming" if {
	input.tee == "az-snp-vtpm"
	count(az_snp_failures) == 0
}

reason := "all Azure SNP vTPM checks passed" if {
	input.tee == "az-snp-vtpm"
	count(az_snp_failures) == 0
}

reason := concat("; ", sort(az_snp_failures)) if {
	input.tee == "az-snp-vtpm"
	count(az_snp_failures) > 0
}

az_snp_failures contains "measurement is not in reference value measurement" if {
	input.tee == "az-snp-vtpm"
	not input["az-snp-vtpm"].snp.measurement in object.get(data.reference, "measurement", [])
}

az_snp_failures contains "the guest policy allows debugging" if {
	input.tee == "az-snp-vtpm"
	input["az-snp-vtpm"].snp.policy_debug_allowed
}

az_snp_failures contains "initdata digest is not in reference value init_data" if {
	input.tee == "az-snp-vtpm"
	not input.init_data in object.get(data.reference, "init_data", [])
}

az_snp_failures contains "reported TCB is below every entry of reference value snp_tcb_min (or none is registered)" if {
	input.tee == "az-snp-vtpm"
	not az_snp_tcb_ok
}

az_snp_tcb_ok if {
	some min in data.reference.snp_tcb_min
	input["az-snp-vtpm"].snp.reported_tcb.bootloader >= min.bootloader
	input["az-snp-vtpm"].snp.reported_tcb.tee >= min.tee
	input["az-snp-vtpm"].snp.reported_tcb.snp >= min.snp
	input["az-snp-vtpm"].snp.reported_tcb.microcode >= min.microcode
}

# Azure confidential VMs on TDX with a vTPM: the TD quote is judged like bare TDX, and initdata is
# bound through PCR8.
status := "affirming" if {
	input.tee == "az-tdx-vtpm"
	count(az_tdx_failures) == 0
}

reason := "all Azure TDX vTPM checks passed" if {
	input.tee == "az-tdx-vtpm"
	count(az_tdx_failures) == 0
}

reason := concat("; ", sort(az_tdx_failures)) if {
	input.tee == "az-tdx-vtpm"
	count(az_tdx_failures) > 0
}

az_tdx_failures contains "MRTD is not in reference value mr_td" if {
	input.tee == "az-tdx-vtpm"
	not input["az-tdx-vtpm"].tdx.mr_td in object.get(data.reference, "mr_td", [])
}

az_tdx_failures contains "the TD is debuggable" if {
	input.tee == "az-tdx-vtpm"
	input["az-tdx-vtpm"].tdx.debug
}

az_tdx_failures contains "initdata digest is not in reference value init_data" if {
	input.tee == "az-tdx-vtpm"
	not input.init_data in object.get(data.reference, "init_data", [])
}

az_tdx_failures contains "TCB status is not in reference value tdx_tcb_status" if {
	input.tee == "az-tdx-vtpm"
	not input["az-tdx-vtpm"].tdx.tcb_status in object.get(data.reference, "tdx_tcb_status", ["UpToDate"])
}

az_tdx_failures contains sprintf("%s is not in reference value %s", [upper(r), r]) if {
	input.tee == "az-tdx-vtpm"
	some r in ["rtmr0", "rtmr1", "rtmr2", "rtmr3"]
	data.reference[r]
	not input["az-tdx-vtpm"].tdx[r] in data.reference[r]
}

# NVIDIA GPUs (additional evidence, submodules gpu0, gpu1, …): affirming only when the GPU's
# firmware id and driver version are registered.
#   data.reference.nvidia_fwid             accepted FWIDs (hex)
#   data.reference.nvidia_driver_version   accepted driver versions
status := "affirming" if {
	input.tee == "nvidia"
	count(nvidia_failures) == 0
}

reason := "all NVIDIA GPU checks passed" if {
	input.tee == "nvidia"
	count(nvidia_failures) == 0
}

reason := concat("; ", sort(nvidia_failures)) if {
	input.tee == "nvidia"
	count(nvidia_failures) > 0
}

nvidia_failures contains "GPU FWID is not in reference value nvidia_fwid" if {
	input.tee == "nvidia"
	not input.nvidia.fwid in object.get(data.reference, "nvidia_fwid", [])
}

nvidia_failures contains "GPU driver version is not in reference value nvidia_driver_version" if {
	input.tee == "nvidia"
	not input.nvidia.driver_version in object.get(data.reference, "nvidia_driver_version", [])
}

# Intel SGX enclaves (DCAP quote verified with the configured collateral).
#   data.reference.mr_enclave        accepted MRENCLAVE values (hex)
#   data.reference.sgx_tcb_status    accepted TCB statuses (default: ["UpToDate"])
status := "affirming" if {
	input.tee == "sgx"
	count(sgx_failures) == 0
}

reason := "all SGX checks passed" if {
	input.tee == "sgx"
	count(sgx_failures) == 0
}

reason := concat("; ", sort(sgx_failures)) if {
	input.tee == "sgx"
	count(sgx_failures) > 0
}

sgx_failures contains "MRENCLAVE is not in reference value mr_enclave" if {
	input.tee == "sgx"
	not input.sgx.mr_enclave in object.get(data.reference, "mr_enclave", [])
}

sgx_failures contains "the enclave is debuggable" if {
	input.tee == "sgx"
	input.sgx.debug
}

sgx_failures contains "TCB status is not in reference value sgx_tcb_status" if {
	input.tee == "sgx"
	not input.sgx.tcb_status in object.get(data.reference, "sgx_tcb_status", ["UpToDate"])
}
