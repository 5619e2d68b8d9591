# Coffer's pinned pod policy: the rules. `coffer policy generate` appends the workload's data
# (`policy_data := {…}`: the pod's namespace and name, and for each container its image digest,
# process, environment, user, capabilities, mounts and allowed execs; docs/policy.md describes
# it). A request is allowed only when its rule below is true; `denial` says why one was not, and
# `pull_image` is the digest the agent pulls instead of the tag the node names.
package agent_policy

import rego.v1

# The sandbox's lifecycle, reads and stats: nothing in them chooses what runs.
default CreateSandboxRequest := true

default DestroySandboxRequest := true

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

# A pod VM's network from the pod's namespace on the node: untrusted for confidentiality either
# way; the agent refuses malformed configurations and routes that would steer the KBS's traffic.
default SetNetworkRequest := true

# Nonces for owner-signed exec: such an exec still needs the owner's signature over it.
default IssueExecNonceRequest := true

# Never: files from the node outside a volume, and a policy the node chooses.
default CopyFileRequest := false

default SetPolicyRequest := false

# A file volume (configMap, secret, projected, downwardAPI) the shim copies in: only one that a
# container's mount in the policy names, with that kind (the kubelet's directory for it is
# `…/volumes/kubernetes.io~KIND/NAME`). Its files are the node's; the agent keeps them inside
# the volume and read-only.
default SetVolumeRequest := false

SetVolumeRequest if {
	input.kind in {"configmap", "secret", "projected", "downward-api"}
	source := sprintf("/var/lib/kubelet/pods/uid/volumes/kubernetes.io~%s/%s", [input.kind, input.volume])
	some c in policy_data.containers
	some p in c.mounts
	p.source_regex != null
	regex.match(p.source_regex, source)
}

# A file volume that containers mount only through subPaths (the kubelet binds those from
# `…/volume-subpaths/NAME/CONTAINER/INDEX`): the policy's mounts name it and its kind.
SetVolumeRequest if {
	input.kind in {"configmap", "secret", "projected", "downward-api"}
	some c in policy_data.containers
	some p in c.mounts
	object.get(p, "volume", null) == input.volume
	object.get(p, "kind", null) == input.kind
}

# The pod's own files: the kubelet's /etc/hosts, containerd's /etc/hostname and /etc/resolv.conf
# (one named file each, which the agent binds only at those places).
SetVolumeRequest if {
	input.kind == "pod-file"
	input.volume in {"hosts", "hostname", "resolv-conf"}
}

denial["SetVolumeRequest"] := msg if {
	not SetVolumeRequest
	msg := sprintf("no container of the policy mounts a %s volume named %q", [input.kind, input.volume])
}

# ---------------------------------------------------------------------------------------------
# CreateContainer: the container the node names must be one of the workload's, exactly.

default CreateContainerRequest := false

CreateContainerRequest if {
	entry
	count(create_problems) == 0
}

# The container's name: the CRI annotation when the node is a kubelet, else its id.
container_name := object.get(input.annotations, "io.kubernetes.cri.container-name", input.container_id)

# The workload's entry for that name (undefined: the workload has no such container).
entry := policy_data.containers[container_name]

# The image the agent pulls: the pinned digest, never the tag.
pull_image := entry.pull if CreateContainerRequest

# Why a CreateContainerRequest is refused: the first problem in field order.
denial["CreateContainerRequest"] := sort(create_problems)[0][1] if count(create_problems) > 0

create_problems contains [0, msg] if {
	policy_data.pod.namespace != null
	ns := object.get(input.annotations, "io.kubernetes.cri.sandbox-namespace", "")
	ns != policy_data.pod.namespace
	msg := sprintf("the pod's namespace is %q, the policy allows %q", [ns, policy_data.pod.namespace])
}

create_problems contains [1, msg] if {
	policy_data.pod.name_regex != null
	name := object.get(input.annotations, "io.kubernetes.cri.sandbox-name", "")
	not regex.match(policy_data.pod.name_regex, name)
	msg := sprintf("the pod's name is %q, the policy allows names matching %q", [name, policy_data.pod.name_regex])
}

create_problems contains [2, msg] if {
	not entry
	names := sort([n | some n, _ in policy_data.containers])
	msg := sprintf("container %q is not in the policy, which allows %v", [container_name, names])
}

create_problems contains [3, msg] if {
	not same_repository(entry.image)
	msg := sprintf("image is %q, the policy allows %s", [input.image, image_text(entry.image)])
}

create_problems contains [4, msg] if {
	same_repository(entry.image)
	not same_version(entry.image)
	msg := sprintf("image is %q, the policy allows %s", [input.image, image_text(entry.image)])
}

same_repository(img) if {
	input.image_ref.registry == img.registry
	input.image_ref.repository == img.repository
}

same_version(img) if input.image_ref.digest == img.digest

same_version(img) if {
	input.image_ref.digest == null
	img.tag != null
	input.image_ref.tag == img.tag
}

image_text(img) := s if {
	img.tag != null
	s := sprintf("%s/%s:%s (pinned to %s)", [img.registry, img.repository, img.tag, img.digest])
} else := sprintf("%s/%s@%s", [img.registry, img.repository, img.digest])

create_problems contains [5, msg] if {
	count(input.args) != count(entry.args)
	msg := sprintf("args is %v, the policy allows %v", [input.args, entry.args])
}

create_problems contains [5, msg] if {
	count(input.args) == count(entry.args)
	diffs := {i | some i, a in input.args; a != entry.args[i]}
	count(diffs) > 0
	i := min(diffs)
	msg := sprintf("args[%d] is %q, the policy allows %q", [i, input.args[i], entry.args[i]])
}

create_problems contains [6, msg] if {
	input.working_dir != entry.working_dir
	msg := sprintf("working_dir is %q, the policy allows %q", [input.working_dir, entry.working_dir])
}

# Environment: names only in messages (values may be secrets).
input_env := [[n, v] |
	some kv in input.env
	n := split(kv, "=")[0]
	v := trim_prefix(kv, concat("", [n, "="]))
]

input_env_names := {e[0] | some e in input_env}

env_allowed_by_pattern(name, value) if {
	some p in entry.env.patterns
	regex.match(p, concat("=", [name, value]))
}

create_problems contains [7, msg] if {
	some [name, value] in input_env
	expected := entry.env.pinned[name]
	value != expected
	msg := sprintf("env %s has a value the policy does not allow", [name])
}

create_problems contains [7, msg] if {
	some [name, value] in input_env
	not entry.env.pinned[name]
	re := entry.env.values[name]
	not regex.match(re, value)
	msg := sprintf("env %s has a value the policy does not allow", [name])
}

create_problems contains [7, msg] if {
	some [name, value] in input_env
	not entry.env.pinned[name]
	not entry.env.values[name]
	not name in entry.env.any_value
	not env_allowed_by_pattern(name, value)
	msg := sprintf("env %s is not allowed by the policy", [name])
}

create_problems contains [7, msg] if {
	some name, _ in entry.env.pinned
	not name in input_env_names
	msg := sprintf("env %s is missing; the policy requires it", [name])
}

create_problems contains [8, msg] if {
	entry.user.uid != null
	not input.user.uid == entry.user.uid
	msg := sprintf("user uid is %s, the policy allows %d", [input_user("uid"), entry.user.uid])
}

create_problems contains [8, msg] if {
	entry.user.gid != null
	not input.user.gid == entry.user.gid
	msg := sprintf("user gid is %s, the policy allows %d", [input_user("gid"), entry.user.gid])
}

input_user(field) := sprintf("%v", [input.user[field]]) if input.user[field] != null
else := "not given"

create_problems contains [9, msg] if {
	input.privileged != entry.privileged
	msg := sprintf("privileged is %v, the policy allows %v", [input.privileged, entry.privileged])
}

create_problems contains [10, msg] if {
	entry.capabilities != null
	extra := {c | some c in input.capabilities} - {c | some c in entry.capabilities}
	count(extra) > 0
	msg := sprintf("capabilities add %v, which the policy does not allow", [sort(extra)])
}

create_problems contains [10, msg] if {
	entry.capabilities != null
	missing := {c | some c in entry.capabilities} - {c | some c in input.capabilities}
	count(missing) > 0
	msg := sprintf("capabilities lack %v, which the policy gives the container", [sort(missing)])
}

create_problems contains [11, msg] if {
	input.read_only_rootfs != entry.read_only_rootfs
	msg := sprintf("read_only_rootfs is %v, the policy allows %v", [input.read_only_rootfs, entry.read_only_rootfs])
}

# Mounts: what the runtime itself sets up, and the workload's volumes and kubelet files.
runtime_filesystems := {
	"/proc": "proc",
	"/dev": "tmpfs",
	"/dev/pts": "devpts",
	"/dev/mqueue": "mqueue",
	"/sys": "sysfs",
	"/sys/fs/cgroup": "cgroup",
}

# containerd's files for every container of a pod sandbox.
runtime_binds := {"/etc/hostname", "/etc/resolv.conf", "/etc/hosts", "/dev/shm"}

is_read_only(m) := true if "ro" in m.options

else := false

rw_text(ro) := "read-only" if ro

else := "read-write"

mount_source_ok(p, m) if {
	p.source_regex == null
	not empty_dir(m)
}

mount_source_ok(p, m) if {
	p.source_regex != null
	regex.match(p.source_regex, m.source)
}

mount_ok(m) if {
	runtime_filesystems[m.destination] == m.type
	no_subpath_origin(m)
}

mount_ok(m) if {
	m.destination in runtime_binds
	m.type == "bind"
	not empty_dir(m)
	no_subpath_origin(m)
}

# What the shim says a subPath mount comes from (`coffer.volume=KIND/NAME`,
# `coffer.subpath=PATH`): the agent binds that path of that volume, so it must be the volume
# (and the subPath, when static) the policy names for that mount.
subpath_option(m, key) := substring(o, count(key), -1) if {
	some o in m.options
	startswith(o, key)
}

no_subpath_origin(m) if {
	not subpath_option(m, "coffer.volume=")
	not subpath_option(m, "coffer.subpath=")
}

subpath_ok(p, m) if no_subpath_origin(m)

subpath_ok(p, m) if {
	object.get(p, "sub_path", null) != null
	subpath_option(m, "coffer.volume=") == sprintf("%s/%s", [p.kind, p.volume])
	subpath_option(m, "coffer.subpath=") == p.sub_path
}

subpath_ok(p, m) if {
	object.get(p, "sub_path_any", false) == true
	subpath_option(m, "coffer.volume=") == sprintf("%s/%s", [p.kind, p.volume])
	subpath_option(m, "coffer.subpath=")
}

# The agent mounts an emptyDir wherever the node's spec names one, so an emptyDir is allowed only
# where the policy names its source: never over the runtime's files or a mount of any source.
empty_dir(m) if contains(m.source, "/volumes/kubernetes.io~empty-dir/")

mount_ok(m) if {
	some p in entry.mounts
	p.destination == m.destination
	mount_source_ok(p, m)
	is_read_only(m) == p.read_only
	subpath_ok(p, m)
}

create_problems contains [12, msg] if {
	some m in input.mounts
	not mount_ok(m)
	msg := mount_problem(m)
}

mount_problem(m) := msg if {
	some p in entry.mounts
	p.destination == m.destination
	mount_source_ok(p, m)
	is_read_only(m) == p.read_only
	not subpath_ok(p, m)
	msg := sprintf("mounts: %s is said to come from volume %q, path %q, which the policy does not allow there", [m.destination, object.get({"v": subpath_option(m, "coffer.volume=")}, "v", ""), object.get({"v": subpath_option(m, "coffer.subpath=")}, "v", "")])
} else := msg if {
	some p in entry.mounts
	p.destination == m.destination
	mount_source_ok(p, m)
	msg := sprintf("mounts: %s is %s, the policy allows it %s", [m.destination, rw_text(is_read_only(m)), rw_text(p.read_only)])
} else := sprintf("mounts: %s from %q is not the source the policy allows", [m.destination, m.source]) if {
	some p in entry.mounts
	p.destination == m.destination
} else := sprintf("mounts: %s (%s from %q) is not in the policy", [m.destination, m.type, m.source])

# Block volumes (volumeDevices): only at the device paths the policy names; the agent opens them
# with the key the initdata names for that path.
create_problems contains [12, msg] if {
	some d in input.block_devices
	not d.container_path in {p | some p in object.get(entry, "devices", [])}
	msg := sprintf("block device %s is not in the policy (volumeDevices)", [d.container_path])
}

create_problems contains [13, msg] if {
	input.tty != entry.tty
	msg := sprintf("tty is %v, the policy allows %v", [input.tty, entry.tty])
}

create_problems contains [13, msg] if {
	input.stdin != entry.stdin
	msg := sprintf("stdin is %v, the policy allows %v", [input.stdin, entry.stdin])
}

# ---------------------------------------------------------------------------------------------
# Exec: only the workload's own probe and hook commands (the agent names the container).

exec_entry := policy_data.containers[input.container.name]

default ExecProcessRequest := false

ExecProcessRequest if exec_entry.exec_any

ExecProcessRequest if {
	some allowed in exec_entry.exec
	allowed == input.args
	input.tty == false
	input.stdin == false
}

denial["ExecProcessRequest"] := msg if {
	not exec_entry
	msg := sprintf("exec in container %q: the container is not in the policy", [object.get(object.get(input, "container", {}), "name", input.container_id)])
}

denial["ExecProcessRequest"] := msg if {
	exec_entry
	not ExecProcessRequest
	msg := sprintf("exec of %v in container %q is not allowed; the policy allows %v", [input.args, input.container.name, exec_entry.exec])
}

# Writes to a container's stdin: only where the workload keeps it open.
default WriteStreamRequest := false

WriteStreamRequest if policy_data.containers[input.container.name].stdin == true

WriteStreamRequest if policy_data.containers[input.container.name].exec_any == true
