# Coffer default attestation (appraisal) policy.
#
# input: the annotated evidence, {"tee": "<tee>", "<tee>": {claims}, "init_data": "<hex>", ...}
# data.reference: the reference values (named lists) set with `coffer kbs set-reference-values`.
#
# Every TEE without a rule below is contraindicated. `reason` is shown to the admin (audit log),
# never to the client.
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
