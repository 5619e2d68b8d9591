# Coffer default resource policy: release a resource only when every appraisal in the
# attestation token (the CPU TEE and any attached device) is affirming.
# Stricter than upstream Trustee's default, which ignores the status.
package policy

import rego.v1

default allow := false

allow if {
	count(input.submods) > 0
	every _, appraisal in input.submods {
		appraisal["ear.status"] == "affirming"
	}
}
