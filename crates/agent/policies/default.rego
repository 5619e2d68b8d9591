# Coffer's built-in agent policy: the container lifecycle and log reads are allowed; exec, writes
# to a container's stdin, file copies and policy changes are denied. A policy.rego in the
# initdata replaces this one entirely. Any request without a rule is denied.
package agent_policy

import rego.v1

default CreateSandboxRequest := true

default DestroySandboxRequest := true

default CreateContainerRequest := true

default StartContainerRequest := true

default RemoveContainerRequest := true

default WaitProcessRequest := true

default SignalProcessRequest := true

default ReadStreamRequest := true

default CloseStdinRequest := true

default TtyWinResizeRequest := true

default StatsContainerRequest := true

default ListContainersRequest := true

default GetGuestDetailsRequest := true

# Nonces for owner-signed exec: an exec still needs the owner's signature over it.
default IssueExecNonceRequest := true

default ExecProcessRequest := false

default WriteStreamRequest := false

default CopyFileRequest := false

# Files of configMap, secret, projected and downwardAPI volumes, copied in by the shim.
default SetVolumeRequest := true

# A pod VM's network, as the pod's network namespace on the node has it (the agent itself
# refuses malformed configurations and routes that would steer the KBS's traffic).
default SetNetworkRequest := true

default SetPolicyRequest := false
